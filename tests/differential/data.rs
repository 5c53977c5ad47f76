//! The differential test's data set: the schema and a deterministic
//! (seeded) generator of rows, as SQL literals, for four sharded tables and
//! one reference table.
//!
//! The rows are chosen to make wrong merges visible: NULLs in every
//! non-key column, duplicate values and whole duplicate rows, a few hot
//! keys holding a large share of the rows (so one shard has far more than
//! the others), negative and extreme keys, mixed-case and non-ASCII text
//! (whose order depends on the collation), equal sort keys, timestamps on
//! both sides of daylight-saving changes, and numerics written with
//! different scales.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use shardgate::sharding::hash::KeyType;

pub const SEED: u64 = 0x5eed_d1ff;

/// The schema, the same on every shard and in the oracle database.
pub const SCHEMA: &str = "
drop table if exists df_customers, df_orders, df_events, df_devices, df_countries;
create table df_customers (id int8 not null, name text, country text, created timestamptz,
    score numeric(10,2), ratio float8, vip bool);
create table df_orders (customer_id int8 not null, id int8 not null, amount numeric, qty int4,
    status text, placed date, note text);
create table df_events (tenant text not null, seq int8 not null, kind text, n int2, at timestamp);
create table df_devices (id uuid not null, owner int8, label varchar(20));
create table df_countries (code text, name text, region text);
";

/// Customers with many orders (skew): 7 alone has about a sixth of them.
pub const HOT_CUSTOMERS: [i64; 4] = [7, 42, -3, 1000];
/// Customer ids at the edges of int8 (and one beyond float8 precision).
pub const EXTREME_CUSTOMERS: [i64; 4] = [i64::MIN, i64::MAX, 1 << 40, 9_007_199_254_740_993];

/// Tenants; the first is hot. Case and accents differ on purpose, and ''
/// is a key like any other.
pub const TENANTS: [&str; 16] = [
    "acme", "Acme", "ACME", "émigré", "Émigré", "zeta", "Zeta", "a", "B", "b", "é", "", "t-01",
    "t-02", "t-10", "ärger",
];

const NAMES: [&str; 24] = [
    "alice",
    "Alice",
    "ALICE",
    "bob",
    "Bob",
    "émile",
    "Émile",
    "zoë",
    "Zoe",
    "ångström",
    "a",
    "B",
    "é",
    "",
    "O'Brien",
    "d'Artagnan",
    "Ærø",
    "straße",
    "STRASSE",
    "ıi",
    "日本",
    "zz top",
    "  padded ",
    "tab\there",
];

/// The reference table: lower- and upper-case codes, a NULL region.
const COUNTRIES: [(&str, &str, Option<&str>); 20] = [
    ("de", "Deutschland", Some("Europe")),
    ("fr", "France", Some("Europe")),
    ("at", "Österreich", Some("Europe")),
    ("es", "España", Some("Europe")),
    ("ie", "Éire", Some("Europe")),
    ("ax", "Åland", Some("Europe")),
    ("is", "Ísland", Some("europe")),
    ("us", "United States", Some("Americas")),
    ("ca", "Canada", Some("Americas")),
    ("br", "Brasil", Some("Americas")),
    ("jp", "日本", Some("Asia")),
    ("cn", "中国", Some("Asia")),
    ("in", "India", Some("Asia")),
    ("tr", "Türkiye", Some("Asia")),
    ("au", "Australia", Some("Oceania")),
    ("nz", "New Zealand", Some("Oceania")),
    ("za", "South Africa", Some("Africa")),
    ("eg", "Egypt", None),
    ("aq", "Antarctica", None),
    ("DE", "Deutschland (upper)", Some("Europe")),
];

/// Codes customers live in: most are in the reference table, 'zz' and
/// 'Fr' are not.
const CUSTOMER_COUNTRIES: [&str; 12] = [
    "de", "de", "de", "fr", "at", "us", "us", "jp", "ax", "is", "zz", "Fr",
];

const STATUSES: [&str; 8] = [
    "new",
    "paid",
    "shipped",
    "Shipped",
    "cancelled",
    "returned",
    "ÉCHEC",
    "ß",
];
const NOTES: [&str; 9] = [
    "gift", "Gift", "urgent", "éclair", "zebra", "Ärger", "", "a", "B",
];
const KINDS: [&str; 5] = ["click", "view", "Buy", "buy", "érreur"];
const LABELS: [&str; 6] = ["garage", "Küche", "kitchen", "Kitchen", "büro", "x"];

pub struct Table {
    pub name: &'static str,
    pub columns: &'static [&'static str],
    /// The sharding key's type; None for the reference table.
    pub key_type: Option<KeyType>,
    /// Rows as SQL literals (`NULL`, `'text'`, `12.5`, ...).
    pub rows: Vec<Vec<String>>,
    /// Each row's sharding key as its literal's text (what the proxy
    /// parses); empty for the reference table.
    pub keys: Vec<String>,
}

impl Table {
    /// `insert into name (columns) values (...), (...)` for these rows.
    pub fn insert_sql(&self, rows: &[usize]) -> String {
        let values: Vec<String> = rows
            .iter()
            .map(|i| format!("({})", self.rows[*i].join(", ")))
            .collect();
        format!(
            "insert into {} ({}) values {}",
            self.name,
            self.columns.join(", "),
            values.join(", ")
        )
    }
}

pub struct Dataset {
    pub customers: Table,
    pub orders: Table,
    pub events: Table,
    pub devices: Table,
    pub countries: Table,
}

impl Dataset {
    pub fn sharded(&self) -> [&Table; 4] {
        [&self.customers, &self.orders, &self.events, &self.devices]
    }

    pub fn total_rows(&self) -> usize {
        self.sharded().iter().map(|t| t.rows.len()).sum::<usize>() + self.countries.rows.len()
    }

    /// The device ids as stored (lower-case, hyphenated), in load order.
    pub fn device_ids(&self) -> Vec<String> {
        self.devices
            .keys
            .iter()
            .map(|k| canonical_uuid(k))
            .collect()
    }
}

pub fn generate() -> Dataset {
    let mut g = Gen {
        rng: StdRng::seed_from_u64(SEED),
    };
    let customer_ids = customer_ids();
    let customers = g.customers(&customer_ids);
    let orders = g.orders(&customer_ids);
    let events = g.events();
    let devices = g.devices(&customer_ids);
    let countries = Table {
        name: "df_countries",
        columns: &["code", "name", "region"],
        key_type: None,
        rows: COUNTRIES
            .iter()
            .map(|(c, n, r)| vec![quote(c), quote(n), r.map_or("NULL".into(), quote)])
            .collect(),
        keys: Vec::new(),
    };
    Dataset {
        customers,
        orders,
        events,
        devices,
        countries,
    }
}

/// 1..=1100 with gaps (multiples of 13), -1..=-120, and the extremes.
fn customer_ids() -> Vec<i64> {
    let mut ids: Vec<i64> = (1..=1100).filter(|i| i % 13 != 0).collect();
    ids.extend((1..=120).map(|i: i64| -i));
    ids.extend(EXTREME_CUSTOMERS);
    ids
}

struct Gen {
    rng: StdRng,
}

impl Gen {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.gen_bool(p)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.rng.gen_range(0..items.len())]
    }

    /// `NULL` with probability `p`, else `f()`.
    fn or_null(&mut self, p: f64, f: impl FnOnce(&mut Self) -> String) -> String {
        if self.chance(p) {
            "NULL".into()
        } else {
            f(self)
        }
    }

    /// A timestamp within three hours of a daylight-saving change (Europe
    /// and the US, both directions), on a 15-minute grid so that values
    /// repeat; sometimes with microseconds.
    fn dst_instant(&mut self) -> i64 {
        let changes = [
            days_from_civil(2023, 3, 26) * 86_400 + 3_600,
            days_from_civil(2023, 10, 29) * 86_400 + 3_600,
            days_from_civil(2023, 3, 12) * 86_400 + 7 * 3_600,
            days_from_civil(2023, 11, 5) * 86_400 + 6 * 3_600,
        ];
        self.pick(&changes) + self.rng.gen_range(-12i64..=12) * 900
    }

    fn timestamp(&mut self) -> String {
        let secs = self.dst_instant();
        let micros = if self.chance(0.2) {
            format!(".{:06}", self.rng.gen_range(0..1_000_000))
        } else {
            String::new()
        };
        format!("{}{micros}", format_timestamp(secs))
    }

    fn customers(&mut self, ids: &[i64]) -> Table {
        let mut rows = Vec::new();
        let mut keys = Vec::new();
        for id in ids {
            let name = self.or_null(0.05, |g| quote(g.pick(&NAMES)));
            let country = self.or_null(0.08, |g| quote(g.pick(&CUSTOMER_COUNTRIES)));
            let created = self.or_null(0.05, |g| {
                let t = g.timestamp();
                quote(&format!("{t}+00"))
            });
            let score = self.or_null(0.1, |g| {
                if g.chance(0.2) {
                    g.pick(&["0", "1.5", "-1.5", "100", "0.10"]).to_string()
                } else {
                    decimal(g.rng.gen_range(-5_000_000..5_000_000), 2)
                }
            });
            let ratio = self.or_null(0.1, |g| {
                if g.chance(0.15) {
                    g.pick(&[
                        "0.1",
                        "0.2",
                        "0.3",
                        "-0",
                        "1e-10",
                        "1e10",
                        "0.3333333333333333",
                    ])
                    .to_string()
                } else {
                    format!("{:?}", g.rng.gen_range(-500.0f64..500.0))
                }
            });
            let vip = self.or_null(0.2, |g| g.pick(&["true", "false"]).to_string());
            rows.push(vec![
                id.to_string(),
                name,
                country,
                created,
                score,
                ratio,
                vip,
            ]);
            keys.push(id.to_string());
        }
        Table {
            name: "df_customers",
            columns: &["id", "name", "country", "created", "score", "ratio", "vip"],
            key_type: Some(KeyType::Int8),
            rows,
            keys,
        }
    }

    fn orders(&mut self, customers: &[i64]) -> Table {
        let mut rows = Vec::new();
        let mut keys = Vec::new();
        for i in 0..6000i64 {
            let customer = match self.rng.gen_range(0..100) {
                0..=14 => 7,
                15..=19 => 42,
                20..=22 => -3,
                23..=24 => 1000,
                // Orders of customers that do not exist.
                25..=27 => self.pick(&[2000i64, 2001, 2002, -500, -501]),
                _ => self.pick(customers),
            };
            let amount = self.or_null(0.07, |g| {
                if g.chance(0.2) {
                    g.pick(&["10", "10.0", "10.00", "0.001", "-0.5", "99999.9999"])
                        .to_string()
                } else {
                    let scale = g.rng.gen_range(0..=4);
                    decimal(g.rng.gen_range(-50_000..5_000_000), scale)
                }
            });
            let qty = self.or_null(0.05, |g| g.rng.gen_range(-5..=100).to_string());
            let status = self.or_null(0.05, |g| quote(g.pick(&STATUSES)));
            let placed = self.or_null(0.03, |g| {
                let day = days_from_civil(2022, 1, 1) + g.rng.gen_range(0..1100);
                quote(&format_timestamp(day * 86_400)[..10])
            });
            let note = self.or_null(0.8, |g| {
                let n = g.pick(&NOTES);
                if g.chance(0.3) {
                    quote(&format!("{n} {}", g.rng.gen_range(0..5)))
                } else {
                    quote(n)
                }
            });
            rows.push(vec![
                customer.to_string(),
                (100_000 + i).to_string(),
                amount,
                qty,
                status,
                placed,
                note,
            ]);
            keys.push(customer.to_string());
        }
        Table {
            name: "df_orders",
            columns: &[
                "customer_id",
                "id",
                "amount",
                "qty",
                "status",
                "placed",
                "note",
            ],
            key_type: Some(KeyType::Int8),
            rows,
            keys,
        }
    }

    fn events(&mut self) -> Table {
        let mut rows = Vec::new();
        let mut keys = Vec::new();
        for seq in 1..=2800i64 {
            let tenant = if self.chance(0.3) {
                TENANTS[0]
            } else {
                self.pick(&TENANTS)
            };
            let kind = self.or_null(0.1, |g| quote(g.pick(&KINDS)));
            let n = self.or_null(0.1, |g| {
                if g.chance(0.05) {
                    g.pick(&["-32768", "32767"]).to_string()
                } else {
                    g.rng.gen_range(-100..=100).to_string()
                }
            });
            // Local wall-clock times around the changes, including ones
            // that do not exist or exist twice in Europe/Berlin.
            let at = self.or_null(0.05, |g| quote(&g.timestamp()));
            rows.push(vec![quote(tenant), seq.to_string(), kind, n, at]);
            keys.push(tenant.to_string());
        }
        Table {
            name: "df_events",
            columns: &["tenant", "seq", "kind", "n", "at"],
            key_type: Some(KeyType::Text),
            rows,
            keys,
        }
    }

    fn devices(&mut self, customers: &[i64]) -> Table {
        let mut rows = Vec::new();
        let mut keys = Vec::new();
        for i in 0..900 {
            let bytes: [u8; 16] = self.rng.gen();
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let canonical = format!(
                "{}-{}-{}-{}-{}",
                &hex[0..8],
                &hex[8..12],
                &hex[12..16],
                &hex[16..20],
                &hex[20..]
            );
            // The same kind of key written three ways: the proxy must
            // hash what Postgres stores, not the spelling.
            let written = match i % 10 {
                0..=6 => canonical,
                7 | 8 => canonical.to_uppercase(),
                _ => format!("{{{hex}}}"),
            };
            let owner = self.or_null(0.15, |g| {
                if g.chance(0.2) {
                    g.pick(&HOT_CUSTOMERS).to_string()
                } else {
                    g.pick(customers).to_string()
                }
            });
            let label = self.or_null(0.2, |g| {
                let l = g.pick(&LABELS);
                if g.chance(0.5) {
                    quote(&format!("{l}-{}", g.rng.gen_range(0..20)))
                } else {
                    quote(l)
                }
            });
            rows.push(vec![quote(&written), owner, label]);
            keys.push(written);
        }
        Table {
            name: "df_devices",
            columns: &["id", "owner", "label"],
            key_type: Some(KeyType::Uuid),
            rows,
            keys,
        }
    }
}

/// A SQL string literal (standard_conforming_strings is on).
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `v / 10^scale` written with exactly `scale` decimals.
fn decimal(v: i64, scale: u32) -> String {
    if scale == 0 {
        return v.to_string();
    }
    let p = 10i64.pow(scale);
    let sign = if v < 0 { "-" } else { "" };
    let a = v.abs();
    format!("{sign}{}.{:0w$}", a / p, a % p, w = scale as usize)
}

fn canonical_uuid(written: &str) -> String {
    let hex: String = written
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_lowercase();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS` of seconds since the epoch (UTC).
fn format_timestamp(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rest = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rest / 3600,
        rest / 60 % 60,
        rest % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_round_trips() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(format_timestamp(0), "1970-01-01 00:00:00");
        let d = days_from_civil(2024, 2, 29);
        assert_eq!(format_timestamp(d * 86_400 + 3_661), "2024-02-29 01:01:01");
        assert_eq!(decimal(-1250, 2), "-12.50");
        assert_eq!(decimal(5, 3), "0.005");
    }
}
