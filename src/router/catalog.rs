//! What the router knows about functions, operators and casts of one
//! database: which are read-only, so a statement that calls them may run on
//! a replica.
//!
//! "Known read-only" is established like this, first match wins:
//!
//! 1. Built-in functions that write, take locks, change session state or
//!    only work on a primary ([`PRIMARY_ONLY`], [`PRIMARY_ONLY_PREFIXES`])
//!    and names in `routing.primary_functions`: never read-only.
//! 2. Names in `routing.read_only_functions`, and built-in volatile
//!    functions that do not write ([`VOLATILE_READ_ONLY`]: `random()`,
//!    `clock_timestamp()`, ...): read-only.
//! 3. Otherwise the database's own `pg_proc`, loaded from the primary: a
//!    name is read-only when every function of that name (all overloads, all
//!    schemas) is IMMUTABLE or STABLE. Unknown names are not read-only.
//!
//! Operators whose implementing function is VOLATILE and casts through a
//! VOLATILE function are loaded the same way; statements using them go to
//! the primary. Until a database's catalog is loaded, every statement of
//! that database goes to the primary.

use super::classify::Class;
use crate::config::RoutingConfig;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Instant;

/// Built-in functions that must run on the primary whatever their
/// volatility says (`txid_current()` is STABLE but assigns a transaction
/// id; `currval()` reads state that `nextval()` left on the primary).
pub const PRIMARY_ONLY: &[&str] = &[
    "nextval",
    "setval",
    "currval",
    "lastval",
    "set_config",
    "setseed",
    "pg_notify",
    "txid_current",
    "txid_current_if_assigned",
    "pg_current_xact_id",
    "pg_current_xact_id_if_assigned",
    "pg_export_snapshot",
    "pg_current_wal_lsn",
    "pg_current_wal_insert_lsn",
    "pg_current_wal_flush_lsn",
    "pg_logical_emit_message",
    "dblink_exec",
];

/// Prefixes of built-in function families that lock or write: advisory
/// locks and large objects.
pub const PRIMARY_ONLY_PREFIXES: &[&str] = &["pg_advisory", "pg_try_advisory", "lo_"];

/// Built-in VOLATILE functions that read only (their results differ per
/// call, not per server), plus the recovery-status functions whose whole
/// point is to report on the server they run on.
pub const VOLATILE_READ_ONLY: &[&str] = &[
    "random",
    "random_normal",
    "clock_timestamp",
    "timeofday",
    "gen_random_uuid",
    "uuid_generate_v4",
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "pg_is_in_recovery",
    "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn",
    "pg_last_xact_replay_timestamp",
];

/// Operators made only of these characters are what the lexical fast path
/// accepts; it is only used while none of them is volatile.
const PLAIN_OPERATORS: &[&str] = &[
    "=", "<>", "!=", "<", ">", "<=", ">=", "+", "-", "*", "/", "%", "||",
];

/// Classified texts kept per catalog; the map is cleared when full.
const CACHE_LIMIT: usize = 10_000;

#[derive(Default)]
pub struct FunctionPolicy {
    read_only: HashSet<String>,
    primary: HashSet<String>,
}

impl FunctionPolicy {
    pub fn from_config(c: &RoutingConfig) -> FunctionPolicy {
        FunctionPolicy {
            read_only: c
                .read_only_functions
                .iter()
                .map(|f| f.to_lowercase())
                .collect(),
            primary: c
                .primary_functions
                .iter()
                .map(|f| f.to_lowercase())
                .collect(),
        }
    }
}

pub struct Catalog {
    loaded: bool,
    /// Function name -> every function of that name is non-volatile.
    functions: HashMap<String, bool>,
    volatile_operators: HashSet<String>,
    volatile_casts: bool,
    aggregates: HashSet<String>,
    plain_operators_read_only: bool,
    policy: FunctionPolicy,
    cache: Mutex<HashMap<Box<[u8]>, Class>>,
    pub loaded_at: Instant,
    /// Different for every catalog built: a class remembered under one
    /// generation is not used with another catalog.
    generation: u64,
}

/// The next [`Catalog::generation`].
static GENERATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The rows a catalog is built from (see [`LOAD_SQL`]).
pub struct CatalogRows {
    pub functions: Vec<(String, bool)>,
    pub volatile_operators: Vec<String>,
    pub volatile_casts: bool,
    /// Names of aggregate functions (built-in and user-defined).
    pub aggregates: Vec<String>,
}

/// Run on the primary of a database, in one round trip: function names with
/// "all overloads non-volatile", then volatile operators, then whether any
/// cast uses a volatile function. One result set, tagged by kind.
pub const LOAD_SQL: &str = "\
SELECT 'f', proname::text, bool_and(provolatile <> 'v')::text FROM pg_catalog.pg_proc GROUP BY proname \
UNION ALL \
SELECT DISTINCT 'o', o.oprname::text, '' FROM pg_catalog.pg_operator o \
  JOIN pg_catalog.pg_proc p ON p.oid = o.oprcode WHERE p.provolatile = 'v' \
UNION ALL \
SELECT 'c', '', (count(*) > 0)::text FROM pg_catalog.pg_cast c \
  JOIN pg_catalog.pg_proc p ON p.oid = c.castfunc WHERE p.provolatile = 'v' \
UNION ALL \
SELECT DISTINCT 'a', proname::text, '' FROM pg_catalog.pg_proc WHERE prokind = 'a'";

impl CatalogRows {
    /// Reads the rows of [`LOAD_SQL`].
    pub fn from_rows(rows: Vec<Vec<Option<String>>>) -> CatalogRows {
        let mut out = CatalogRows {
            functions: Vec::new(),
            volatile_operators: Vec::new(),
            volatile_casts: false,
            aggregates: Vec::new(),
        };
        for row in rows {
            let [Some(kind), Some(name), Some(value)] =
                <[Option<String>; 3]>::try_from(row).unwrap_or([None, None, None])
            else {
                continue;
            };
            match kind.as_str() {
                "f" => out.functions.push((name, value == "true")),
                "o" => out.volatile_operators.push(name),
                "c" => out.volatile_casts = value == "true",
                "a" => out.aggregates.push(name),
                _ => {}
            }
        }
        out
    }
}

impl Catalog {
    pub fn new(rows: CatalogRows, policy: FunctionPolicy) -> Catalog {
        let volatile_operators: HashSet<String> = rows.volatile_operators.into_iter().collect();
        Catalog {
            loaded: true,
            plain_operators_read_only: PLAIN_OPERATORS
                .iter()
                .all(|o| !volatile_operators.contains(*o)),
            functions: rows.functions.into_iter().collect(),
            volatile_operators,
            volatile_casts: rows.volatile_casts,
            aggregates: rows.aggregates.into_iter().collect(),
            policy,
            cache: Mutex::new(HashMap::new()),
            loaded_at: Instant::now(),
            generation: next_generation(),
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The catalog of a database not loaded yet: nothing is known
    /// read-only.
    pub fn unloaded() -> Catalog {
        Catalog {
            loaded: false,
            functions: HashMap::new(),
            volatile_operators: HashSet::new(),
            volatile_casts: true,
            aggregates: HashSet::new(),
            plain_operators_read_only: false,
            policy: FunctionPolicy::default(),
            cache: Mutex::new(HashMap::new()),
            loaded_at: Instant::now(),
            generation: next_generation(),
        }
    }

    /// Whether `name` is an aggregate function in this database.
    pub fn is_aggregate(&self, name: &str) -> bool {
        self.aggregates.contains(name)
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn function_read_only(&self, name: &str) -> bool {
        let lower;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = name.to_ascii_lowercase();
            lower.as_str()
        } else {
            name
        };
        if PRIMARY_ONLY.contains(&name)
            || PRIMARY_ONLY_PREFIXES.iter().any(|p| name.starts_with(p))
            || self.policy.primary.contains(name)
        {
            return false;
        }
        if self.policy.read_only.contains(name) || VOLATILE_READ_ONLY.contains(&name) {
            return true;
        }
        self.loaded && self.functions.get(name) == Some(&true)
    }

    pub fn operator_read_only(&self, symbol: &str) -> bool {
        self.loaded && !self.volatile_operators.contains(symbol)
    }

    pub fn has_volatile_casts(&self) -> bool {
        self.volatile_casts
    }

    pub fn plain_operators_read_only(&self) -> bool {
        self.plain_operators_read_only
    }

    pub fn cached(&self, sql: &[u8]) -> Option<Class> {
        crate::lock(&self.cache).get(sql).copied()
    }

    pub fn remember(&self, sql: &[u8], class: Class) {
        let mut cache = crate::lock(&self.cache);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(sql.into(), class);
    }

    /// A catalog as a stock Postgres 15 database would load it, for unit
    /// tests of the classifier.
    #[cfg(test)]
    pub fn for_tests() -> Catalog {
        let functions = [
            ("lower", true),
            ("now", true),
            ("count", true),
            ("generate_series", true),
            ("random", false),
            ("nextval", false),
            ("setval", false),
            ("currval", false),
            ("pg_advisory_lock", false),
            ("pg_try_advisory_xact_lock", false),
            ("set_config", false),
            ("pg_notify", false),
            ("txid_current", true),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v))
        .collect();
        Catalog::new(
            CatalogRows {
                functions,
                volatile_operators: Vec::new(),
                volatile_casts: false,
                aggregates: Vec::new(),
            },
            FunctionPolicy::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        let policy = FunctionPolicy {
            read_only: ["my_reader", "nextval"].map(String::from).into(),
            primary: ["lower"].map(String::from).into(),
        };
        let cat = Catalog::new(
            CatalogRows {
                functions: vec![
                    ("lower".into(), true),
                    ("upper".into(), true),
                    ("my_writer".into(), false),
                ],
                volatile_operators: vec!["@@@".into()],
                volatile_casts: false,
                aggregates: Vec::new(),
            },
            policy,
        );
        assert!(cat.function_read_only("upper"));
        assert!(cat.function_read_only("UPPER"));
        assert!(!cat.function_read_only("lower"), "config primary list wins");
        assert!(cat.function_read_only("my_reader"), "config read-only list");
        assert!(
            !cat.function_read_only("nextval"),
            "built-in primary list wins"
        );
        assert!(!cat.function_read_only("my_writer"));
        assert!(!cat.function_read_only("never_heard_of"));
        assert!(cat.function_read_only("random"));
        assert!(!cat.function_read_only("pg_advisory_xact_lock_shared"));
        assert!(!cat.operator_read_only("@@@"));
        assert!(cat.operator_read_only("="));
        assert!(cat.plain_operators_read_only());
    }

    #[test]
    fn rows_decode() {
        let row = |k: &str, n: &str, v: &str| vec![Some(k.into()), Some(n.into()), Some(v.into())];
        let rows = CatalogRows::from_rows(vec![
            row("f", "lower", "true"),
            row("f", "nextval", "false"),
            row("o", "@@@", ""),
            row("c", "", "false"),
            vec![None],
        ]);
        assert_eq!(rows.functions.len(), 2);
        assert_eq!(rows.volatile_operators, vec!["@@@".to_owned()]);
        assert!(!rows.volatile_casts);
    }
}
