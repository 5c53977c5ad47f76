//! The bucket map: which shard owns each bucket, and which tables are
//! sharded (by which column), copied to every shard (reference tables) or
//! kept on the default shard (everything else).
//!
//! A [`ShardMap`] is part of the immutable topology snapshot; resharding and
//! failover publish a new snapshot with a higher epoch.

use super::hash::{self, HashFunction, KeyType, KeyValue};
use crate::config::Config;
use std::collections::HashMap;

/// How a configured table is placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableRule {
    /// Rows spread over the shards by `column` (lower-cased).
    Sharded { column: String, key_type: KeyType },
    /// A full copy on every shard.
    Reference,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    pub buckets: u32,
    pub hash: HashFunction,
    /// Bucket -> index of its shard in the topology.
    pub owner: Vec<u16>,
    pub default_shard: usize,
    /// How many shards there are (some may own no bucket).
    pub shards: usize,
    /// Table name -> (schema if the config named one, rule).
    tables: HashMap<String, Vec<(Option<String>, TableRule)>>,
    /// Bit n set: some configured table name is n bytes long (n < 64; bit
    /// 63 stands for 63 and longer). Words of other lengths are skipped
    /// without comparing them to every name.
    name_lengths: u64,
    /// Buckets whose statements wait: a bucket move is cutting them over
    /// (empty: none).
    pub held: Vec<bool>,
    /// A bucket move is unfinished: some shard holds copies of buckets it
    /// does not own, so statements on sharded tables must not run on
    /// several shards.
    pub moving: bool,
}

/// Where a key lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub bucket: u32,
    pub shard: usize,
}

/// The bit of [`ShardMap::name_lengths`] for a name `len` bytes long.
fn length_bit(len: usize) -> u64 {
    1 << len.min(63)
}

impl ShardMap {
    /// The map `[sharding]` describes; None without that section.
    pub fn from_config(config: &Config) -> Option<ShardMap> {
        let sh = config.sharding.as_ref()?;
        let owner = bucket_owners(config).ok()?;
        let default_shard = sh
            .default_shard
            .as_ref()
            .and_then(|d| config.shards.iter().position(|s| &s.name == d))
            .unwrap_or(0);
        let mut tables: HashMap<String, Vec<(Option<String>, TableRule)>> = HashMap::new();
        let mut add = |name: &str, rule: TableRule| {
            let (schema, table) = split_name(name);
            tables.entry(table).or_default().push((schema, rule));
        };
        for t in &sh.tables {
            add(
                &t.name,
                TableRule::Sharded {
                    column: t.column.trim().to_lowercase(),
                    key_type: t.key_type,
                },
            );
        }
        for t in &sh.reference_tables {
            add(t, TableRule::Reference);
        }
        let name_lengths = tables.keys().fold(0, |m, t| m | length_bit(t.len()));
        Some(ShardMap {
            buckets: sh.buckets,
            hash: sh.hash,
            owner,
            default_shard,
            shards: config.shards.len(),
            tables,
            name_lengths,
            held: Vec::new(),
            moving: false,
        })
    }

    /// Whether statements on `bucket` must wait for a cutover.
    pub fn is_held(&self, bucket: u32) -> bool {
        !self.held.is_empty() && self.held.get(bucket as usize).copied().unwrap_or(false)
    }

    /// The sharded tables: (schema if configured, name, column, type).
    pub fn sharded_tables(&self) -> Vec<(Option<String>, String, String, KeyType)> {
        let mut out = Vec::new();
        for (name, entries) in &self.tables {
            for (schema, rule) in entries {
                if let TableRule::Sharded { column, key_type } = rule {
                    out.push((schema.clone(), name.clone(), column.clone(), *key_type));
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        out
    }

    /// The bucket and shard of a key of a column of type `ty`.
    pub fn locate(&self, ty: KeyType, key: &KeyValue) -> Location {
        let bucket = hash::bucket(self.hash, ty, key, self.buckets);
        Location {
            bucket,
            shard: self.owner[bucket as usize] as usize,
        }
    }

    /// Where a NULL key lives: Postgres hash partitioning puts NULL in the
    /// partition of remainder 0.
    pub fn null_location(&self) -> Location {
        Location {
            bucket: 0,
            shard: self.owner[0] as usize,
        }
    }

    /// The rule for a table referenced as `schema.name` (names already
    /// case-folded as Postgres does). A config entry without a schema
    /// matches any schema; an unqualified reference matches any entry of
    /// that name (it may resolve to it through search_path).
    pub fn table(&self, schema: Option<&str>, name: &str) -> Option<&TableRule> {
        let entries = self.tables.get(name)?;
        entries
            .iter()
            .find(|(s, _)| match (s, schema) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            })
            .map(|(_, r)| r)
    }

    /// The key type of the first sharded table `sql` names.
    pub fn key_type_in(&self, sql: &str) -> Option<KeyType> {
        let lower = sql.to_lowercase();
        let mut found: Vec<(usize, KeyType)> = Vec::new();
        for (name, entries) in &self.tables {
            for (_, rule) in entries {
                if let TableRule::Sharded { key_type, .. } = rule {
                    if let Some(at) = lower.find(name.as_str()) {
                        if self.mentions_table_word(&lower, name) {
                            found.push((at, *key_type));
                        }
                    }
                }
            }
        }
        found.sort_by_key(|f| f.0);
        found.first().map(|f| f.1)
    }

    /// Whether any sharded or reference table is configured.
    pub fn has_tables(&self) -> bool {
        !self.tables.is_empty()
    }

    /// Whether `sql` contains a configured table's name as a word (case
    /// insensitive). False means no statement in it can touch a sharded or
    /// reference table, so it needs no parsing to be placed.
    pub fn mentions_table(&self, sql: &[u8]) -> bool {
        let mut i = 0;
        while i < sql.len() {
            let c = sql[i];
            if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 {
                let start = i;
                while i < sql.len()
                    && (sql[i].is_ascii_alphanumeric()
                        || sql[i] == b'_'
                        || sql[i] == b'$'
                        || sql[i] >= 0x80)
                {
                    i += 1;
                }
                let word = &sql[start..i];
                if self.name_lengths & length_bit(word.len()) != 0
                    && self
                        .tables
                        .keys()
                        .any(|t| t.as_bytes().eq_ignore_ascii_case(word))
                {
                    return true;
                }
            } else {
                i += 1;
            }
        }
        false
    }

    /// The names of the configured tables that `sql` mentions.
    pub fn mentioned_tables(&self, sql: &str) -> Vec<String> {
        let lower = sql.to_lowercase();
        let mut names: Vec<String> = self
            .tables
            .keys()
            .filter(|t| self.mentions_table_word(&lower, t))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The sharded tables `sql` mentions (a lexical check: a word that
    /// names one counts, wherever it is).
    pub fn mentioned_sharded_tables(&self, sql: &str) -> Vec<String> {
        let lower = sql.to_lowercase();
        let mut names: Vec<String> = self
            .tables
            .iter()
            .filter(|(_, rules)| {
                rules
                    .iter()
                    .any(|(_, r)| matches!(r, TableRule::Sharded { .. }))
            })
            .map(|(t, _)| t)
            .filter(|t| self.mentions_table_word(&lower, t))
            .cloned()
            .collect();
        names.sort();
        names
    }

    fn mentions_table_word(&self, lower: &str, table: &str) -> bool {
        let is_word = |c: char| c.is_alphanumeric() || c == '_' || c == '$';
        lower.match_indices(table).any(|(i, m)| {
            !lower[..i].chars().next_back().is_some_and(is_word)
                && !lower[i + m.len()..].chars().next().is_some_and(is_word)
        })
    }
}

/// What `shardgate locate --table T --key K` prints: the key's bucket,
/// shard and servers under `config`.
pub fn locate_report(config: &Config, table: &str, key: &str) -> Result<String, String> {
    let map = ShardMap::from_config(config).ok_or(
        "sharding is not configured ([sharding] is missing): every table is on the first shard",
    )?;
    let topology = crate::topology::Topology::from_config(config, 0);
    let (schema, name) = split_name(table);
    let servers = |shard: usize| {
        let s = &topology.shards[shard];
        let mut out = format!(
            "shard {}
  primary  {}
",
            s.name, s.primary
        );
        for r in &s.replicas {
            out.push_str(&format!(
                "  replica  {}
",
                r.addr
            ));
        }
        out
    };
    match map.table(schema.as_deref(), &name) {
        Some(TableRule::Sharded { column, key_type }) => {
            let v = key_type.parse_text(key).map_err(|e| e.to_string())?;
            let loc = map.locate(*key_type, &v);
            Ok(format!(
                "table {table}: sharded by {column} ({}), hash {}, {} buckets
key {v} -> bucket {} -> {}",
                key_type.sql_name(),
                match map.hash {
                    HashFunction::Postgres => "postgres",
                    HashFunction::Murmur3 => "murmur3",
                },
                map.buckets,
                loc.bucket,
                servers(loc.shard)
            ))
        }
        Some(TableRule::Reference) => Ok(format!(
            "table {table}: reference table, a full copy on every shard
{}",
            (0..topology.shards.len()).map(servers).collect::<String>()
        )),
        None => Ok(format!(
            "table {table}: not sharded, lives on the default shard
{}",
            servers(map.default_shard)
        )),
    }
}

/// Splits a configured `schema.table` name (case-folded like an unquoted
/// Postgres identifier unless written in double quotes).
fn split_name(name: &str) -> (Option<String>, String) {
    let fold = |s: &str| {
        let s = s.trim();
        match s.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
            Some(q) => q.to_owned(),
            None => s.to_lowercase(),
        }
    };
    match name.trim().rsplit_once('.') {
        Some((schema, table)) => (Some(fold(schema)), fold(table)),
        None => (None, fold(name)),
    }
}

/// A configured table's identity for duplicate checks.
pub fn table_key(name: &str) -> String {
    let (schema, table) = split_name(name);
    match schema {
        Some(s) => format!("{s}.{table}"),
        None => table,
    }
}

/// Bucket -> shard index from the config: the shards' `buckets` lists, or an
/// even contiguous split when no shard lists any. Errors name the key.
pub fn bucket_owners(config: &Config) -> Result<Vec<u16>, (String, String)> {
    let Some(sh) = &config.sharding else {
        return Ok(vec![0]);
    };
    let n = sh.buckets as usize;
    let shards = config.shards.len().max(1);
    if shards > u16::MAX as usize {
        return Err(("shards".into(), "too many shards".into()));
    }
    if config.shards.iter().all(|s| s.buckets.is_empty()) {
        return Ok((0..n).map(|b| (b * shards / n) as u16).collect());
    }
    let mut owner: Vec<Option<u16>> = vec![None; n];
    for (i, s) in config.shards.iter().enumerate() {
        for (j, spec) in s.buckets.iter().enumerate() {
            let key = format!("shards[{i}].buckets[{j}]");
            let (lo, hi) = spec.range().map_err(|p| (key.clone(), p))?;
            if hi as usize >= n {
                return Err((
                    key,
                    format!("bucket {hi} is out of range: sharding.buckets = {n}"),
                ));
            }
            for b in lo..=hi {
                if let Some(prev) = owner[b as usize] {
                    return Err((
                        key,
                        format!(
                            "bucket {b} is also owned by shard {:?}",
                            config.shards[prev as usize].name
                        ),
                    ));
                }
                owner[b as usize] = Some(i as u16);
            }
        }
    }
    if let Some(b) = owner.iter().position(Option::is_none) {
        return Err((
            "shards.buckets".into(),
            format!("bucket {b} is owned by no shard (every bucket of 0..{n} needs an owner)"),
        ));
    }
    Ok(owner.into_iter().map(|o| o.unwrap_or(0)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Result<Config, String> {
        let text = format!(
            r#"
[[users]]
name = "app"
password = "app"
[[shards]]
name = "a"
primary = "127.0.0.1:1"
{extra}
"#
        );
        Config::parse(&text, "t.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn even_split_and_explicit_ranges() {
        let c = config(
            "[[shards]]\nname = \"b\"\nprimary = \"127.0.0.1:2\"\n[[shards]]\nname = \"c\"\nprimary = \"127.0.0.1:3\"\n[sharding]\nbuckets = 9\n",
        )
        .unwrap();
        let m = ShardMap::from_config(&c).unwrap();
        assert_eq!(m.owner, vec![0, 0, 0, 1, 1, 1, 2, 2, 2]);
        assert_eq!(m.default_shard, 0);

        let c = config(
            "buckets = [\"0-1\", 5]\n[[shards]]\nname = \"b\"\nprimary = \"127.0.0.1:2\"\nbuckets = [\"2-4\"]\n[sharding]\nbuckets = 6\ndefault_shard = \"b\"\n",
        )
        .unwrap();
        let m = ShardMap::from_config(&c).unwrap();
        assert_eq!(m.owner, vec![0, 0, 1, 1, 1, 0]);
        assert_eq!(m.default_shard, 1);
    }

    #[test]
    fn bad_maps_name_the_key() {
        let two = "[[shards]]\nname = \"b\"\nprimary = \"127.0.0.1:2\"\n";
        for (extra, key) in [
            (format!("buckets = [\"0-3\"]\n{two}buckets = [3]\n[sharding]\nbuckets = 4\n"), "shards[1].buckets[0]"),
            (format!("buckets = [\"0-2\"]\n{two}[sharding]\nbuckets = 4\n"), "shards.buckets"),
            (format!("buckets = [\"0-9\"]\n{two}[sharding]\nbuckets = 4\n"), "shards[0].buckets[0]"),
            (format!("buckets = [\"x\"]\n{two}[sharding]\nbuckets = 4\n"), "shards[0].buckets[0]"),
            (format!("{two}[sharding]\nbuckets = 0\n"), "sharding.buckets"),
            (format!("{two}[sharding]\nbuckets = 8\ndefault_shard = \"z\"\n"), "sharding.default_shard"),
            (format!("{two}[sharding]\nbuckets = 8\nreference_tables = [\"t\"]\n[[sharding.tables]]\nname = \"T\"\ncolumn = \"id\"\ntype = \"int8\"\n"), "sharding.reference_tables[0]"),
            (format!("{two}[sharding]\nbuckets = 8\n[[sharding.tables]]\nname = \"t\"\ncolumn = \"id\"\ntype = \"float\"\n"), "type"),
            (format!("{two}[proxy]\npool_mode = \"session\"\n[sharding]\nbuckets = 8\n"), "proxy.pool_mode"),
            ("buckets = [1]\n".to_string(), "shards[0].buckets"),
        ] {
            let e = config(&extra).unwrap_err();
            assert!(e.contains(key), "{extra}: {e}");
        }
    }

    #[test]
    fn locate_prints_bucket_shard_and_servers() {
        let c = config(
            "replicas = [\"127.0.0.1:5\"]\n[[shards]]\nname = \"b\"\nprimary = \"127.0.0.1:2\"\n[sharding]\nbuckets = 8\nreference_tables = [\"r\"]\n[[sharding.tables]]\nname = \"t\"\ncolumn = \"id\"\ntype = \"int8\"\n",
        )
        .unwrap();
        let m = ShardMap::from_config(&c).unwrap();
        let loc = m.locate(KeyType::Int8, &KeyValue::Int(42));
        let out = locate_report(&c, "t", "42").unwrap();
        assert!(
            out.contains(&format!("key 42 -> bucket {} -> shard", loc.bucket)),
            "{out}"
        );
        assert!(
            out.contains(["127.0.0.1:1", "127.0.0.1:2"][loc.shard]),
            "{out}"
        );
        assert!(locate_report(&c, "t", "x")
            .unwrap_err()
            .contains("invalid input syntax"));
        assert!(locate_report(&c, "r", "1").unwrap().contains("every shard"));
        assert!(locate_report(&c, "other", "1")
            .unwrap()
            .contains("default shard\nshard a"));
    }

    #[test]
    fn table_lookup_and_mentions() {
        let c = config(
            "[sharding]\nbuckets = 8\nreference_tables = [\"geo.countries\"]\n[[sharding.tables]]\nname = \"Orders\"\ncolumn = \"Customer_ID\"\ntype = \"int8\"\n",
        )
        .unwrap();
        let m = ShardMap::from_config(&c).unwrap();
        let sharded = TableRule::Sharded {
            column: "customer_id".into(),
            key_type: KeyType::Int8,
        };
        assert_eq!(m.table(None, "orders"), Some(&sharded));
        assert_eq!(m.table(Some("public"), "orders"), Some(&sharded));
        assert_eq!(
            m.table(Some("geo"), "countries"),
            Some(&TableRule::Reference)
        );
        assert_eq!(m.table(Some("other"), "countries"), None);
        assert_eq!(m.table(None, "countries"), Some(&TableRule::Reference));
        assert!(m.mentions_table(b"select * from ORDERS where x = 1"));
        assert!(!m.mentions_table(b"select * from orders_archive"));
        assert!(!m.mentions_table(b"select 1"));
        assert_eq!(
            m.mentioned_tables("SELECT * FROM Orders o JOIN countries c ON true"),
            vec!["countries".to_string(), "orders".to_string()]
        );
    }
}
