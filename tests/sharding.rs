//! Sharding against three real primaries: rows land on exactly the shard
//! the bucket map names (checked on each shard directly, and by Postgres
//! computing each row's bucket itself), keys route alike from literals,
//! text Bind values and binary Bind values, and what cannot run on one
//! shard is refused with 0A000 — never answered from the wrong shard.

mod common;

use common::{cluster, code, connect_url, scalar, shard_primaries, start_proxy_text, TestProxy};
use shardgate::config::Config;
use shardgate::sharding::hash::{bucket_sql, HashFunction, KeyType, KeyValue};
use shardgate::sharding::map::ShardMap;
use std::sync::OnceLock;
use tokio_postgres::Client;

const BUCKETS: u32 = 64;

fn config_text() -> String {
    let state = std::env::temp_dir().join(format!("shardgate-test-state-{}", std::process::id()));
    common::three_shard_config(
        BUCKETS,
        &format!("state_dir = \"{}\"", state.display()),
        &["sg_countries"],
        &[
            ("sg_orders", "customer_id", "int8"),
            ("sg_items", "customer_id", "int8"),
            ("sg_users", "name", "text"),
            ("sg_devices", "id", "uuid"),
            ("sg_small", "k", "int2"),
            ("sg_mid", "k", "int4"),
        ],
    )
}

const SCHEMA: &str = "
drop table if exists sg_orders, sg_items, sg_users, sg_devices, sg_small, sg_mid, sg_countries, sg_plain;
create table sg_orders (id bigserial, customer_id bigint not null, total numeric, country text);
create table sg_items (customer_id bigint not null, sku text);
create table sg_users (name text primary key, age int);
create table sg_devices (id uuid primary key, label text);
create table sg_small (k smallint primary key);
create table sg_mid (k int primary key);
create table sg_countries (code text primary key, name text);
insert into sg_countries values ('de', 'Germany'), ('fr', 'France');
";

struct Setup {
    proxy: TestProxy,
    map: ShardMap,
}

/// The proxy, with the schema created on every shard directly (DDL
/// through shardgate on sharded tables is refused until it can run on
/// every shard atomically).
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        for s in servers() {
            s.psql("app", SCHEMA).expect("schema on shard");
        }
        let text = config_text();
        let map = ShardMap::from_config(&Config::parse(&text, "t.toml").unwrap()).unwrap();
        Setup {
            proxy: start_proxy_text(&text),
            map,
        }
    })
}

fn servers() -> Vec<&'static shardgate::local::PgServer> {
    let mut v = vec![&cluster().primary];
    v.extend(shard_primaries().iter());
    v
}

async fn shard_client(i: usize) -> Client {
    let port = servers()[i].port;
    connect_url(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=app"
    ))
    .await
    .expect("direct connection to a shard")
}

fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// The tests share the tables: one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

async fn truncate_all() {
    for i in 0..3 {
        shard_client(i)
            .await
            .batch_execute("truncate sg_orders, sg_items, sg_users, sg_devices, sg_small, sg_mid")
            .await
            .unwrap();
    }
}

/// Checks on every shard, directly, that each row of `table` is on the
/// shard the map names for its key, and that Postgres itself computes the
/// same bucket for it (`bucket_sql`). Returns the rows per shard.
async fn check_placement(map: &ShardMap, table: &str, column: &str, ty: KeyType) -> Vec<usize> {
    let expr = bucket_sql(HashFunction::Postgres, ty, column, BUCKETS).unwrap();
    let mut per_shard = Vec::new();
    for i in 0..3 {
        let c = shard_client(i).await;
        let rows = c
            .query(&format!("select {column}::text, {expr} from {table}"), &[])
            .await
            .unwrap();
        for r in &rows {
            let key: String = r.get(0);
            let pg_bucket: i64 = r.get(1);
            let v = ty.parse_text(&key).unwrap();
            let loc = map.locate(ty, &v);
            assert_eq!(loc.bucket as i64, pg_bucket, "{table} key {key}: bucket");
            assert_eq!(
                loc.shard, i,
                "{table} key {key} (bucket {}) is on shard {i}",
                loc.bucket
            );
        }
        per_shard.push(rows.len());
    }
    per_shard
}

#[test]
fn rows_land_where_the_map_says() {
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let c = st.proxy.connect().await;
        // int8 keys: literals (simple protocol), binary Bind (tokio-postgres
        // sends i64 in binary), and text Bind values (raw protocol below).
        for k in -150i64..150 {
            c.simple_query(&format!(
                "insert into sg_orders (customer_id, total) values ({k}, {k}.5)"
            ))
            .await
            .unwrap();
        }
        let ins = c
            .prepare("insert into sg_orders (customer_id, total) values ($1, 1)")
            .await
            .unwrap();
        for k in [i64::MIN, i64::MAX, i32::MIN as i64, 1 << 40, 987_654_321] {
            c.execute(&ins, &[&k]).await.unwrap();
        }
        // Multi-row VALUES on one shard: keys 7 and 7.
        c.simple_query("insert into sg_orders (customer_id, total) values (7, 1), (7, 2)")
            .await
            .unwrap();
        for i in 0..200i32 {
            let name = format!("user-{i}-ü");
            c.execute(
                "insert into sg_users (name, age) values ($1, $2)",
                &[&name, &i],
            )
            .await
            .unwrap();
        }
        c.simple_query("insert into sg_users (name) values ('')")
            .await
            .unwrap();
        c.simple_query("insert into sg_users (name) values ('O''Brien')")
            .await
            .unwrap();
        for i in 0..100u32 {
            let id = format!(
                "{:08x}-0000-4000-8000-{:012x}",
                i.wrapping_mul(2654435761),
                i
            );
            c.simple_query(&format!(
                "insert into sg_devices (id, label) values ('{id}', 'd{i}')"
            ))
            .await
            .unwrap();
            // The same key written another way reaches the same row (a
            // second shard would take it as a new row).
            let other = format!("{{{}}}", id.to_uppercase().replace('-', ""));
            c.simple_query(&format!(
                "insert into sg_devices (id, label) values ('{other}', 'x') on conflict do nothing"
            ))
            .await
            .unwrap_or_else(|e| panic!("{other}: {e}"));
        }
        for k in [-32768i16, -1, 0, 1, 32767] {
            c.execute("insert into sg_small (k) values ($1)", &[&k])
                .await
                .unwrap();
        }
        for k in [i32::MIN, -5, 0, 5, i32::MAX] {
            c.execute("insert into sg_mid (k) values ($1)", &[&k])
                .await
                .unwrap();
        }

        let orders = check_placement(&st.map, "sg_orders", "customer_id", KeyType::Int8).await;
        assert_eq!(orders.iter().sum::<usize>(), 300 + 5 + 2);
        assert!(
            orders.iter().all(|n| *n > 0),
            "every shard has rows: {orders:?}"
        );
        let users = check_placement(&st.map, "sg_users", "name", KeyType::Text).await;
        assert_eq!(users.iter().sum::<usize>(), 202);
        let devices = check_placement(&st.map, "sg_devices", "id", KeyType::Uuid).await;
        assert_eq!(devices.iter().sum::<usize>(), 100);
        check_placement(&st.map, "sg_small", "k", KeyType::Int2).await;
        check_placement(&st.map, "sg_mid", "k", KeyType::Int4).await;

        // Every key reads back through the proxy, by literal and by
        // parameter, with exactly its own rows.
        for k in -150i64..150 {
            let n = scalar(
                &c,
                &format!("select count(*) from sg_orders where customer_id = {k}"),
            )
            .await;
            assert_eq!(n, if k == 7 { "3" } else { "1" }, "key {k}");
            let row = c
                .query_one(
                    "select count(*) from sg_orders where customer_id = $1",
                    &[&k],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, i64>(0), if k == 7 { 3 } else { 1 });
        }
        let n = scalar(&c, "select count(*) from sg_users where name = 'O''Brien'").await;
        assert_eq!(n, "1");
        let n = scalar(&c, "select age from sg_users where name = 'user-42-ü'").await;
        assert_eq!(n, "42");
    });
}

/// A Bind with one text-format parameter, through the raw protocol.
fn text_bind(stmt: &str, value: &str) -> shardgate::protocol::Frame {
    let mut rest = vec![0, 0, 0, 1];
    rest.extend_from_slice(&(value.len() as i32).to_be_bytes());
    rest.extend_from_slice(value.as_bytes());
    rest.extend_from_slice(&[0, 0]);
    shardgate::protocol::frontend::build_bind(b"", stmt, &rest)
}

#[test]
fn text_bind_values_route_like_literals() {
    use common::raw::{execute, parse, sync, Raw};
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let (mut r, _) = Raw::login(st.proxy.addr, &[]).await;
        for k in [-3i64, 0, 11, 12345, 99_999_999_999] {
            r.send(&[
                parse(
                    "",
                    "insert into sg_orders (customer_id, total) values ($1, 1)",
                ),
                text_bind("", &format!(" {k} ")),
                execute(),
                sync(),
            ])
            .await;
            let frames = r.read_until_ready().await;
            assert_eq!(Raw::tags(&frames), "12CZ", "key {k}");
        }
        check_placement(&st.map, "sg_orders", "customer_id", KeyType::Int8).await;
        let c = st.proxy.connect().await;
        assert_eq!(
            scalar(
                &c,
                "select count(*) from sg_orders where customer_id = 12345"
            )
            .await,
            "1"
        );
    });
}

#[test]
fn what_one_shard_cannot_answer_is_refused() {
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let c = st.proxy.connect().await;
        // Keys 1..=40 cover every shard.
        for k in 1..=40 {
            c.simple_query(&format!("insert into sg_orders (customer_id) values ({k})"))
                .await
                .unwrap();
        }
        let (a, b) = two_keys_on_different_shards(&st.map);
        for sql in [
            "select customer_id, rank() over (order by total) from sg_orders".to_string(),
            "select * from sg_orders where total = (select max(total) from sg_orders)".into(),
            format!("select * from sg_orders where customer_id in ({a}, {b}) for update"),
            "update sg_orders set customer_id = 5 where customer_id = 4".into(),
            "insert into sg_orders (total) values (1)".into(),
            "insert into sg_orders (customer_id) select 1".into(),
            format!("with x as (insert into sg_orders (customer_id) values ({a}), ({b}) returning *) select * from x"),
            format!("select * from sg_orders o join sg_items i on o.id = i.customer_id where o.customer_id = {a}"),
        ] {
            let e = c.simple_query(&sql).await.expect_err(&sql);
            assert_eq!(code(&e), "0A000", "{sql}: {e}");
            // Extended protocol too (tokio-postgres prepares, then binds).
            let e = c.query(sql.as_str(), &[]).await.expect_err(&sql);
            assert_eq!(code(&e), "0A000", "{sql} (extended): {e}");
        }
        // Nothing was half-done: still 40 rows, none changed.
        let mut total = 0;
        for i in 0..3 {
            let d = shard_client(i).await;
            let n: i64 = d
                .query_one("select count(*) from sg_orders where total is null", &[])
                .await
                .unwrap()
                .get(0);
            total += n;
        }
        assert_eq!(total, 40);

        // Same-shard transactions commit normally; statements without
        // tables run on the transaction's shard.
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!("update sg_orders set total = 3 where customer_id = {a}"))
            .await
            .unwrap();
        c.simple_query("select now(), 1 + 1").await.unwrap();
        c.simple_query(&format!("select * from sg_orders where customer_id = {a}"))
            .await
            .unwrap();
        c.simple_query("commit").await.unwrap();
        let n = scalar(&c, &format!("select total from sg_orders where customer_id = {a}")).await;
        assert_eq!(n, "3");
    });
}

/// Two keys whose rows live on different shards.
fn two_keys_on_different_shards(map: &ShardMap) -> (i64, i64) {
    let shard = |k: i64| map.locate(KeyType::Int8, &KeyValue::Int(k)).shard;
    let b = (2..100).find(|k| shard(*k) != shard(1)).unwrap();
    (1, b)
}

#[test]
fn hints_settings_reference_and_unsharded_tables() {
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let c = st.proxy.connect().await;
        for k in 1..=60 {
            c.simple_query(&format!("insert into sg_orders (customer_id) values ({k})"))
                .await
                .unwrap();
        }
        let mut direct_counts = Vec::new();
        for i in 0..3 {
            let d = shard_client(i).await;
            let n: i64 = d.query_one("select count(*) from sg_orders", &[]).await.unwrap().get(0);
            direct_counts.push(n.to_string());
        }
        for (i, name) in ["s0", "s1", "s2"].iter().enumerate() {
            let by_name = scalar(&c, &format!("/* shardgate: shard={name} */ select count(*) from sg_orders")).await;
            assert_eq!(by_name, direct_counts[i], "shard {name}");
            let by_index = scalar(&c, &format!("select count(*) from sg_orders /* shardgate: shard={i} */")).await;
            assert_eq!(by_index, direct_counts[i]);
        }
        // key= hint and the session setting pick the key's shard.
        let k = 17i64;
        let shard = st.map.locate(KeyType::Int8, &KeyValue::Int(k)).shard;
        let hinted = scalar(&c, &format!("/* shardgate: key={k} */ select count(*) from sg_orders")).await;
        assert_eq!(hinted, direct_counts[shard]);
        c.simple_query(&format!("set shardgate.sharding_key = '{k}'")).await.unwrap();
        assert_eq!(scalar(&c, "show shardgate.sharding_key").await, k.to_string());
        assert_eq!(scalar(&c, "select count(*) from sg_orders").await, direct_counts[shard]);
        let row = c.query_one("select count(*) from sg_orders", &[]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0).to_string(), direct_counts[shard]);
        c.simple_query("reset shardgate.sharding_key").await.unwrap();
        assert_eq!(scalar(&c, "select count(*) from sg_orders").await, "60");
        let e = c.simple_query("set shardgate.shard = 'nope'").await.unwrap_err();
        assert_eq!(code(&e), "22023");
        // Globally unique ids, answered by the proxy, in both protocols.
        let first: i64 = scalar(&c, "show shardgate.next_id").await.parse().unwrap();
        let second: i64 = c
            .query_one("show shardgate.next_id", &[])
            .await
            .unwrap()
            .get::<_, String>(0)
            .parse()
            .unwrap();
        assert!(first > 0 && second > first, "{first} then {second}");

        // Reference tables are read from any shard; joined with a key.
        assert_eq!(scalar(&c, "select name from sg_countries where code = 'de'").await, "Germany");
        let n = scalar(&c, "select count(*) from sg_orders o join sg_countries c on c.code = 'fr' where o.customer_id = 5").await;
        assert_eq!(n, "1");

        // Tables shardgate does not know live on the default shard (s0).
        c.simple_query("create table sg_plain (x int); insert into sg_plain values (1), (2)")
            .await
            .unwrap();
        assert_eq!(scalar(&c, "select count(*) from sg_plain").await, "2");
        for i in 0..3 {
            let d = shard_client(i).await;
            let exists: bool = d
                .query_one("select to_regclass('sg_plain') is not null", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(exists, i == 0, "sg_plain on shard {i}");
        }
        c.simple_query("drop table sg_plain").await.unwrap();
    });
}

/// Rows of a query as text (simple protocol).
async fn rows(c: &Client, sql: &str) -> Result<Vec<Vec<Option<String>>>, tokio_postgres::Error> {
    let msgs = c.simple_query(sql).await?;
    Ok(msgs
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
            }
            _ => None,
        })
        .collect())
}

#[test]
fn cross_shard_reads_match_an_unsharded_copy() {
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let c = st.proxy.connect().await;
        // The same rows in a sharded table and in an unsharded one (which
        // lives whole on the default shard): the unsharded answer is the
        // oracle.
        c.batch_execute(
            "drop table if exists sg_oracle; create table sg_oracle (id bigserial, customer_id bigint not null, total numeric, country text)",
        )
        .await
        .unwrap();
        let countries = ["de", "fr", "Éire", "at", "be", "", "Zz"];
        for k in 0..120i64 {
            let total = if k % 11 == 0 { "NULL".to_string() } else { format!("{}.{}", k * 7 % 50, k % 3) };
            let country = if k % 13 == 0 { "NULL".to_string() } else { format!("'{}'", countries[(k % 7) as usize]) };
            for table in ["sg_orders", "sg_oracle"] {
                c.simple_query(&format!(
                    "insert into {table} (customer_id, total, country) values ({k}, {total}, {country})"
                ))
                .await
                .unwrap();
            }
        }
        let queries = [
            "select count(*) from T",
            "select count(total), sum(total), min(total), max(total), avg(total) from T",
            "select count(*), sum(customer_id), avg(customer_id) from T where customer_id > 1000",
            "select country, count(*), sum(total) from T group by country order by country nulls first",
            "select country, count(*) from T group by country having count(*) > 16 order by 2 desc, 1",
            "select customer_id, total from T order by total desc nulls last, customer_id limit 7",
            "select customer_id from T order by customer_id limit 5 offset 100",
            "select customer_id from T order by customer_id offset 118",
            "select distinct country from T order by country",
            "select count(distinct country), count(*) from T",
            "select customer_id % 5 as m, avg(total) from T group by customer_id % 5 order by m",
            "select country from T order by country collate \"C\", customer_id limit 10",
            "select upper(country) u, max(customer_id) from T where total is not null group by 1 order by 1",
            "select customer_id, total from T where customer_id in (3, 4, 5, 6, 7, 8) order by 1",
            "select c.name, count(*) from T o join sg_countries c on c.code = o.country group by c.name order by 1",
            "select count(*) from T limit 0",
        ];
        for q in queries {
            let sharded = q.replace(" T", " sg_orders");
            let oracle = q.replace(" T", " sg_oracle");
            let got = rows(&c, &sharded).await.unwrap_or_else(|e| panic!("{sharded}: {e}"));
            let want = rows(&c, &oracle).await.unwrap();
            assert_eq!(got, want, "{sharded}");
            // Extended protocol, binary results (tokio-postgres), through
            // a text cast of every column so rows compare as text.
            let stmt = c.prepare(&sharded).await.unwrap();
            let n = stmt.columns().len();
            let got: Vec<Vec<Option<String>>> = c
                .query(&stmt, &[])
                .await
                .unwrap_or_else(|e| panic!("{sharded} (extended): {e}"))
                .iter()
                .map(|r| (0..n).map(|i| text_of(r, i)).collect())
                .collect();
            assert_eq!(got, want, "{sharded} (extended)");
        }
        // Parameters in a cross-shard query.
        let got = c
            .query_one("select count(*) from sg_orders where customer_id > $1", &[&100i64])
            .await
            .unwrap()
            .get::<_, i64>(0);
        assert_eq!(got, 19);
        // What a shard cannot compute alone is refused, not answered.
        for q in [
            "select customer_id, row_number() over (order by customer_id) from sg_orders",
            "select customer_id from sg_orders union all select customer_id from sg_orders",
            "select * from sg_orders where total > (select avg(total) from sg_orders)",
            "select string_agg(country, ',') from sg_orders",
            "select o.customer_id from sg_orders o join sg_oracle x on x.id = o.id",
            "select * from sg_orders o join sg_items i on o.id = i.customer_id",
        ] {
            let e = c.simple_query(q).await.unwrap_err();
            assert_eq!(code(&e), "0A000", "{q}: {e}");
            let message = e.as_db_error().map(|d| d.message().to_string()).unwrap_or_default();
            assert!(message.contains("sg_orders"), "the refusal names the table: {message}");
        }
        c.batch_execute("drop table sg_oracle").await.unwrap();
        // A column with its own collation: a merge that sorts it is
        // refused rather than ordered by the database default.
        for i in 0..3 {
            shard_client(i)
                .await
                .batch_execute("alter table sg_users alter column name type text collate \"C\"")
                .await
                .unwrap();
        }
        let e = c.simple_query("select name from sg_users order by name").await.unwrap_err();
        assert_eq!(code(&e), "0A000", "{e}");
        // Concatenation compares nothing: still answered.
        c.simple_query("select name from sg_users").await.unwrap();
        for i in 0..3 {
            shard_client(i)
                .await
                .batch_execute("alter table sg_users alter column name type text collate \"default\"")
                .await
                .unwrap();
        }
    });
}

/// A binary result column as the text Postgres would print (the types the
/// test queries return).
fn text_of(r: &tokio_postgres::Row, i: usize) -> Option<String> {
    use tokio_postgres::types::Type;
    let ty = r.columns()[i].type_().clone();
    match ty {
        Type::INT8 => r.get::<_, Option<i64>>(i).map(|v| v.to_string()),
        Type::INT4 => r.get::<_, Option<i32>>(i).map(|v| v.to_string()),
        Type::TEXT => r.get::<_, Option<String>>(i),
        Type::NUMERIC => r.get::<_, Option<PgNumeric>>(i).map(|v| v.0),
        other => panic!("type {other} in a test query"),
    }
}

/// Numeric in binary, printed as Postgres prints it.
struct PgNumeric(String);

impl<'a> tokio_postgres::types::FromSql<'a> for PgNumeric {
    fn from_sql(
        _: &tokio_postgres::types::Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        let word = |i: usize| i16::from_be_bytes([raw[2 * i], raw[2 * i + 1]]);
        let (ndigits, weight, sign, dscale) = (
            word(0) as usize,
            word(1) as i32,
            word(2) as u16,
            word(3) as usize,
        );
        let digits: Vec<i32> = (0..ndigits).map(|i| word(4 + i) as i32).collect();
        let mut int = String::new();
        for w in 0..=weight.max(0) {
            let d = if w <= weight {
                digits.get(w as usize).copied().unwrap_or(0)
            } else {
                0
            };
            if int.is_empty() {
                if w <= weight {
                    int = d.to_string();
                }
            } else {
                int.push_str(&format!("{d:04}"));
            }
        }
        if weight < 0 || int.is_empty() {
            int = "0".into();
        }
        let mut frac = String::new();
        let mut w = weight + 1;
        while frac.len() < dscale {
            let d = if w >= 0 {
                digits.get(w as usize).copied().unwrap_or(0)
            } else {
                0
            };
            frac.push_str(&format!("{d:04}"));
            w += 1;
        }
        frac.truncate(dscale);
        let mut s = if sign == 0x4000 {
            format!("-{int}")
        } else {
            int
        };
        if dscale > 0 {
            s.push('.');
            s.push_str(&frac);
        }
        Ok(PgNumeric(s))
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::NUMERIC
    }
}

#[test]
fn writes_across_shards_are_atomic() {
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let c = st.proxy.connect().await;
        let (a, b) = two_keys_on_different_shards(&st.map);
        // A multi-row INSERT split by shard, with RETURNING and the summed
        // command tag.
        let rows = c
            .simple_query(&format!(
                "insert into sg_orders (customer_id, total) values ({a}, 1), ({b}, 2), (3, 3), (4, 4), (5, 5) returning customer_id"
            ))
            .await
            .unwrap();
        let returned = rows
            .iter()
            .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
            .count();
        assert_eq!(returned, 5);
        assert!(matches!(rows.last(), Some(tokio_postgres::SimpleQueryMessage::CommandComplete(5))));
        // The same through the extended protocol, parameters renumbered
        // per shard.
        let n = c
            .execute(
                "insert into sg_orders (customer_id, total) values ($1, $2), ($3, $4)",
                &[&a, &rust_decimal_free(10), &b, &rust_decimal_free(20)],
            )
            .await
            .unwrap();
        assert_eq!(n, 2);
        let placement = check_placement(&st.map, "sg_orders", "customer_id", KeyType::Int8).await;
        assert_eq!(placement.iter().sum::<usize>(), 7);
        // UPDATE and DELETE without a key run on every shard.
        let n = c.execute("update sg_orders set total = total * 10 where total < 10", &[]).await.unwrap();
        assert_eq!(n, 5);
        assert_eq!(scalar(&c, "select sum(total) from sg_orders").await, "180");
        // DDL and reference tables reach every shard.
        c.simple_query("create index sg_orders_total on sg_orders (total)").await.unwrap();
        c.simple_query("insert into sg_countries values ('it', 'Italy')").await.unwrap();
        for i in 0..3 {
            let d = shard_client(i).await;
            let idx: bool = d
                .query_one("select to_regclass('sg_orders_total') is not null", &[])
                .await
                .unwrap()
                .get(0);
            assert!(idx, "index on shard {i}");
            let n: i64 = d
                .query_one("select count(*) from sg_countries where code = 'it'", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 1, "reference row on shard {i}");
        }
        c.simple_query("drop index sg_orders_total").await.unwrap();
        for i in 0..3 {
            let d = shard_client(i).await;
            let idx: bool = d
                .query_one("select to_regclass('sg_orders_total') is null", &[])
                .await
                .unwrap()
                .get(0);
            assert!(idx, "index dropped on shard {i}");
        }
        c.simple_query("delete from sg_countries where code = 'it'").await.unwrap();

        // One shard refuses its part: nothing is written anywhere.
        let n = c.execute("delete from sg_orders", &[]).await.unwrap();
        assert_eq!(n, 7);
        c.simple_query("create unique index sg_orders_uniq on sg_orders (customer_id, total)")
            .await
            .unwrap();
        c.simple_query(&format!("insert into sg_orders (customer_id, total) values ({b}, 200)"))
            .await
            .unwrap();
        let e = c
            .simple_query(&format!(
                "insert into sg_orders (customer_id, total) values ({a}, 777), ({b}, 200)"
            ))
            .await
            .unwrap_err();
        assert_eq!(code(&e), "23505", "{e}");
        assert_eq!(
            scalar(&c, "select count(*) from sg_orders where total = 777").await,
            "0",
            "the other shard's part was rolled back"
        );
        c.simple_query("drop index sg_orders_uniq").await.unwrap();
        for i in 0..3 {
            let d = shard_client(i).await;
            let n: i64 = d
                .query_one("select count(*) from pg_prepared_xacts", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0, "no prepared transaction left on shard {i}");
        }
    });
}

/// A numeric parameter without a decimal crate: bound as text.
fn rust_decimal_free(v: i64) -> NumericText {
    NumericText(v.to_string())
}

#[derive(Debug)]
struct NumericText(String);

impl tokio_postgres::types::ToSql for NumericText {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        // Numeric binary: one base-10000 digit group is enough here.
        let v: i16 = self.0.parse()?;
        out.extend_from_slice(&1i16.to_be_bytes()); // ndigits
        out.extend_from_slice(&0i16.to_be_bytes()); // weight
        out.extend_from_slice(&0u16.to_be_bytes()); // sign
        out.extend_from_slice(&0i16.to_be_bytes()); // dscale
        out.extend_from_slice(&v.to_be_bytes());
        Ok(tokio_postgres::types::IsNull::No)
    }
    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        *ty == tokio_postgres::types::Type::NUMERIC
    }
    tokio_postgres::types::to_sql_checked!();
}

/// COPY FROM STDIN through the raw protocol: the statement, the data in
/// `chunks` (CopyData each), CopyDone; returns the message tags and the
/// error's SQLSTATE if any.
async fn raw_copy(
    addr: std::net::SocketAddr,
    sql: &str,
    chunks: &[&[u8]],
) -> (String, Option<String>) {
    use common::raw::{query, Raw};
    let (mut r, _) = Raw::login(addr, &[]).await;
    r.send(&[query(sql)]).await;
    let first = r.read().await.expect("an answer");
    let mut tags = String::from(first.tag as char);
    if first.tag != b'G' {
        let rest = r.read_until_ready().await;
        tags.push_str(&Raw::tags(&rest));
        return (tags, error_code(&first));
    }
    let mut frames: Vec<shardgate::protocol::Frame> = chunks
        .iter()
        .map(|c| shardgate::protocol::Frame {
            tag: b'd',
            body: bytes::Bytes::copy_from_slice(c),
        })
        .collect();
    frames.push(shardgate::protocol::Frame {
        tag: b'c',
        body: bytes::Bytes::new(),
    });
    r.send(&frames).await;
    let rest = r.read_until_ready().await;
    tags.push_str(&Raw::tags(&rest));
    let code = rest.iter().find(|f| f.tag == b'E').and_then(error_code);
    (tags, code)
}

fn error_code(f: &shardgate::protocol::Frame) -> Option<String> {
    if f.tag != b'E' {
        return None;
    }
    let mut rest = &f.body[..];
    while let Some((&kind, tail)) = rest.split_first() {
        let end = tail.iter().position(|b| *b == 0)?;
        if kind == b'C' {
            return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
        }
        rest = &tail[end + 1..];
    }
    None
}

#[test]
fn copy_splits_rows_by_key() {
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let addr = st.proxy.addr;
        // Text format, rows cut across CopyData messages, escapes and NULLs.
        let mut text = String::new();
        for k in 0..100 {
            text.push_str(&format!("{k}\t{k}.5\tcountry\\t{k}\n"));
        }
        text.push_str("100\t\\N\t\\N\n");
        let bytes = text.as_bytes();
        let chunks: Vec<&[u8]> = bytes.chunks(37).collect();
        let (tags, err) = raw_copy(
            addr,
            "copy sg_orders (customer_id, total, country) from stdin",
            &chunks,
        )
        .await;
        assert_eq!((tags.as_str(), err), ("GCZ", None));
        // CSV with a header and a quoted newline, keys as text.
        let csv = b"name,age\n\"multi\nline\",1\nplain,2\n\"with \"\"quotes\"\"\",3\n";
        let (tags, err) = raw_copy(
            addr,
            "copy sg_users (name, age) from stdin with (format csv, header true)",
            &[csv],
        )
        .await;
        assert_eq!((tags.as_str(), err), ("GCZ", None));
        // Binary: int8 keys without a column list.
        let mut bin = b"PGCOPY\n\xff\r\n\0".to_vec();
        bin.extend_from_slice(&[0; 8]);
        for k in 500i64..520 {
            // id, customer_id, total, country
            bin.extend_from_slice(&4i16.to_be_bytes());
            for _ in 0..2 {
                bin.extend_from_slice(&8i32.to_be_bytes());
                bin.extend_from_slice(&k.to_be_bytes());
            }
            for _ in 0..2 {
                bin.extend_from_slice(&(-1i32).to_be_bytes());
            }
        }
        bin.extend_from_slice(&(-1i16).to_be_bytes());
        let (tags, err) = raw_copy(
            addr,
            "copy sg_orders from stdin (format binary)",
            &[&bin[..40], &bin[40..]],
        )
        .await;
        assert_eq!((tags.as_str(), err), ("GCZ", None));
        let per_shard = check_placement(&st.map, "sg_orders", "customer_id", KeyType::Int8).await;
        assert_eq!(per_shard.iter().sum::<usize>(), 121);
        let users = check_placement(&st.map, "sg_users", "name", KeyType::Text).await;
        assert_eq!(users.iter().sum::<usize>(), 3);
        let c = st.proxy.connect().await;
        assert_eq!(
            scalar(&c, "select country from sg_orders where customer_id = 7").await,
            "country\t7"
        );
        assert_eq!(
            scalar(&c, "select age from sg_users where name = 'multi\nline'").await,
            "1"
        );

        // A bad row on one shard: no shard keeps any row of the COPY.
        let bad = b"1000\t1\tx\n1001\tnot-a-number\tx\n1002\t1\tx\n1003\t1\tx\n";
        let (tags, err) = raw_copy(
            addr,
            "copy sg_orders (customer_id, total, country) from stdin",
            &[bad],
        )
        .await;
        assert_eq!(err.as_deref(), Some("22P02"), "{tags}");
        assert_eq!(
            scalar(
                &c,
                "select count(*) from sg_orders where customer_id >= 1000"
            )
            .await,
            "0"
        );
        assert_eq!(scalar(&c, "select count(*) from sg_orders").await, "121");
        for i in 0..3 {
            let d = shard_client(i).await;
            let n: i64 = d
                .query_one("select count(*) from pg_prepared_xacts", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0);
        }
        // Reference tables get every row on every shard.
        let (tags, err) = raw_copy(
            addr,
            "copy sg_countries from stdin",
            &[b"nl\tNetherlands\n"],
        )
        .await;
        assert_eq!((tags.as_str(), err), ("GCZ", None));
        for i in 0..3 {
            let d = shard_client(i).await;
            let n: i64 = d
                .query_one("select count(*) from sg_countries where code = 'nl'", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 1, "shard {i}");
        }
        c.simple_query("delete from sg_countries where code = 'nl'")
            .await
            .unwrap();
    });
}

#[test]
fn transactions_span_shards_with_two_phase_commit() {
    let _s = serial();
    let st = setup();
    rt().block_on(async {
        truncate_all().await;
        let mut c = st.proxy.connect().await;
        let other = st.proxy.connect().await;
        let (a, b) = two_keys_on_different_shards(&st.map);
        let count = |k: i64| format!("select count(*) from sg_orders where customer_id = {k}");
        // Simple protocol: writes on two shards, invisible until COMMIT.
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!(
            "insert into sg_orders (customer_id, total) values ({a}, 1)"
        ))
        .await
        .unwrap();
        c.simple_query(&format!(
            "insert into sg_orders (customer_id, total) values ({b}, 2)"
        ))
        .await
        .unwrap();
        c.simple_query(&format!(
            "update sg_orders set total = 10 where customer_id = {a}"
        ))
        .await
        .unwrap();
        assert_eq!(
            scalar(
                &c,
                &format!("select total from sg_orders where customer_id = {a}")
            )
            .await,
            "10"
        );
        assert_eq!(
            scalar(&other, &count(b)).await,
            "0",
            "not visible before COMMIT"
        );
        c.simple_query("commit").await.unwrap();
        assert_eq!(scalar(&other, &count(a)).await, "1");
        assert_eq!(scalar(&other, &count(b)).await, "1");
        check_placement(&st.map, "sg_orders", "customer_id", KeyType::Int8).await;

        // ROLLBACK undoes every shard's part.
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!("delete from sg_orders where customer_id = {a}"))
            .await
            .unwrap();
        c.simple_query(&format!("delete from sg_orders where customer_id = {b}"))
            .await
            .unwrap();
        c.simple_query("rollback").await.unwrap();
        assert_eq!(scalar(&other, &count(a)).await, "1");
        assert_eq!(scalar(&other, &count(b)).await, "1");

        // An error on one shard: COMMIT rolls back everything.
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!(
            "insert into sg_orders (customer_id, total) values ({a}, 5)"
        ))
        .await
        .unwrap();
        c.simple_query(&format!(
            "insert into sg_orders (customer_id, total) values ({b}, 5)"
        ))
        .await
        .unwrap();
        let e = c
            .simple_query(&format!(
                "insert into sg_orders (customer_id, total) values ({b}, 'x')"
            ))
            .await
            .unwrap_err();
        assert_eq!(code(&e), "22P02");
        let e = c.simple_query("select 1").await.unwrap_err();
        assert_eq!(code(&e), "25P02");
        // COMMIT of a failed transaction rolls back (as Postgres does).
        c.simple_query("commit").await.unwrap();
        assert_eq!(
            scalar(&other, "select count(*) from sg_orders where total = 5").await,
            "0"
        );

        // SAVEPOINT after spreading is refused (it would act on one shard).
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!(
            "insert into sg_orders (customer_id, total) values ({a}, 6)"
        ))
        .await
        .unwrap();
        c.simple_query(&format!(
            "insert into sg_orders (customer_id, total) values ({b}, 6)"
        ))
        .await
        .unwrap();
        let e = c.simple_query("savepoint s1").await.unwrap_err();
        assert_eq!(code(&e), "0A000");
        c.simple_query("rollback").await.unwrap();
        // A SAVEPOINT first keeps the transaction on its shard.
        c.simple_query("begin").await.unwrap();
        c.simple_query(&format!(
            "insert into sg_orders (customer_id, total) values ({a}, 7)"
        ))
        .await
        .unwrap();
        c.simple_query("savepoint s1").await.unwrap();
        let e = c
            .simple_query(&format!(
                "insert into sg_orders (customer_id, total) values ({b}, 7)"
            ))
            .await
            .unwrap_err();
        assert_eq!(code(&e), "0A000");
        c.simple_query("rollback").await.unwrap();
        assert_eq!(
            scalar(
                &other,
                "select count(*) from sg_orders where total in (6, 7)"
            )
            .await,
            "0"
        );

        // Extended protocol statements (tokio-postgres) inside such a
        // transaction; COMMIT is a simple query in tokio-postgres.
        let tx = c.transaction().await.unwrap();
        tx.execute(
            "insert into sg_orders (customer_id, total) values ($1, 8)",
            &[&a],
        )
        .await
        .unwrap();
        tx.execute(
            "insert into sg_orders (customer_id, total) values ($1, 8)",
            &[&b],
        )
        .await
        .unwrap();
        let n: i64 = tx
            .query_one(
                "select count(*) from sg_orders where customer_id = $1 and total = 8",
                &[&a],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1);
        tx.commit().await.unwrap();
        assert_eq!(
            scalar(&other, "select count(*) from sg_orders where total = 8").await,
            "2"
        );
        for i in 0..3 {
            let d = shard_client(i).await;
            let n: i64 = d
                .query_one("select count(*) from pg_prepared_xacts", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(n, 0);
        }
    });
}
