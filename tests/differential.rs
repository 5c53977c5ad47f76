//! The differential test: the same generated rows loaded into three shards
//! through shardgate and into one plain Postgres database (the oracle),
//! then a corpus of read queries run against both and the answers
//! compared. shardgate may refuse a query with SQLSTATE 0A000; it may never
//! answer differently from one Postgres, nor fail it otherwise.
//!
//! Data: `differential/data.rs` (seeded generator). Queries:
//! `differential/corpus.rs`. Running a query in either protocol:
//! `differential/run.rs`; verdicts and the summary:
//! `differential/compare.rs`. Run with
//! `cargo test --test differential -- --nocapture` to see the summary.

mod common;
#[path = "differential/compare.rs"]
mod compare;
#[path = "differential/corpus.rs"]
mod corpus;
#[path = "differential/data.rs"]
mod data;
#[path = "differential/run.rs"]
mod run;

use common::{cluster, connect_url, shard_primaries, start_proxy_text, TestProxy};
use compare::{compare, Tally};
use corpus::Case;
use run::{run_extended, run_simple, Outcome};
use shardgate::config::Config;
use shardgate::local::PgServer;
use shardgate::sharding::map::ShardMap;
use std::sync::OnceLock;
use std::time::Instant;
use tokio_postgres::Client;

const BUCKETS: u32 = 64;

/// Runs (a query in one protocol) that must be answered, and answered
/// equally: a floor, so that a change cannot quietly answer less. The
/// single-shard routing of bb62912 answered 270 (one key, same-shard IN
/// lists, key joins, reference tables alone, statements failing alike
/// everywhere); with the cross-shard SELECTs of e626d5b it is 856, and
/// 865 once shapes are compared across shards (parameterised point
/// lookups) and reference-side outer joins are refused. Raise it as more
/// is answered.
const MIN_ANSWERED: usize = 865;

/// The session time zone on both sides: timestamptz output, date_trunc
/// and ::date depend on it, and the data crosses its DST changes.
const TIME_ZONE: &str = "Europe/Berlin";

fn config_text() -> String {
    common::three_shard_config(
        BUCKETS,
        "",
        &["df_countries"],
        &[
            ("df_customers", "id", "int8"),
            ("df_orders", "customer_id", "int8"),
            ("df_events", "tenant", "text"),
            ("df_devices", "id", "uuid"),
        ],
    )
}

struct Setup {
    proxy: TestProxy,
    map: ShardMap,
    data: data::Dataset,
}

/// Schema on every shard and in the oracle, rows loaded (sharded tables
/// through the proxy, the reference table on each shard directly), row
/// counts checked. Once per test binary; call outside `rt().block_on`.
fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        // DDL through shardgate on sharded tables is refused: directly.
        for s in shards() {
            s.psql("app", data::SCHEMA).expect("schema on shard");
        }
        let primary = &cluster().primary;
        primary
            .psql("postgres", "drop database if exists df_oracle")
            .expect("drop oracle");
        primary
            .psql("postgres", "create database df_oracle owner app")
            .expect("oracle database");
        primary
            .psql("df_oracle", data::SCHEMA)
            .expect("schema in oracle");
        let text = config_text();
        let map = ShardMap::from_config(&Config::parse(&text, "t.toml").unwrap()).unwrap();
        let setup = Setup {
            proxy: start_proxy_text(&text),
            map,
            data: data::generate(),
        };
        rt().block_on(load(&setup));
        setup
    })
}

fn shards() -> Vec<&'static PgServer> {
    let mut v = vec![&cluster().primary];
    v.extend(shard_primaries().iter());
    v
}

async fn shard_client(i: usize) -> Client {
    connect_direct(shards()[i].port, "app").await
}

async fn oracle_client() -> Client {
    connect_direct(cluster().primary.port, "df_oracle").await
}

async fn proxy_client(proxy: &TestProxy) -> Client {
    let c = proxy.connect().await;
    c.batch_execute(&format!("set timezone = '{TIME_ZONE}'"))
        .await
        .unwrap();
    c
}

/// A direct connection (to a shard or the oracle) in the test's time zone,
/// so that rows read as text compare between them.
async fn connect_direct(port: u16, db: &str) -> Client {
    let c = connect_url(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname={db}"
    ))
    .await
    .expect("direct connection");
    c.batch_execute(&format!("set timezone = '{TIME_ZONE}'"))
        .await
        .unwrap();
    c
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

/// The corpus only reads; the writable-CTE test writes (and rolls back).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rows a multi-row INSERT through the proxy may hold: one shard's only
/// (a statement writing to several shards is refused).
const INSERT_BATCH: usize = 200;

async fn load(st: &Setup) {
    let proxy = st.proxy.connect().await;
    let oracle = oracle_client().await;
    let mut expected = Vec::new();
    for table in st.data.sharded() {
        let ty = table.key_type.expect("sharded");
        let mut by_shard: Vec<Vec<usize>> = vec![Vec::new(); 3];
        for (i, key) in table.keys.iter().enumerate() {
            let value = ty.parse_text(key).expect("generated key parses");
            by_shard[st.map.locate(ty, &value).shard].push(i);
        }
        for rows in &by_shard {
            for chunk in rows.chunks(INSERT_BATCH) {
                let sql = table.insert_sql(chunk);
                proxy
                    .simple_query(&sql)
                    .await
                    .unwrap_or_else(|e| panic!("load {} through the proxy: {e}", table.name));
            }
        }
        let all: Vec<usize> = (0..table.rows.len()).collect();
        for chunk in all.chunks(1000) {
            oracle
                .simple_query(&table.insert_sql(chunk))
                .await
                .unwrap_or_else(|e| panic!("load {} into the oracle: {e}", table.name));
        }
        expected.push((
            table.name,
            by_shard.iter().map(Vec::len).collect::<Vec<_>>(),
        ));
    }
    // The reference table: a full copy on every shard, written directly
    // (writes to reference tables through shardgate are refused).
    let countries = &st.data.countries;
    let all: Vec<usize> = (0..countries.rows.len()).collect();
    for i in 0..3 {
        shard_client(i)
            .await
            .simple_query(&countries.insert_sql(&all))
            .await
            .expect("reference rows on shard");
    }
    oracle
        .simple_query(&countries.insert_sql(&all))
        .await
        .expect("reference rows in oracle");

    // Each shard holds exactly the rows the map gives it, and together
    // exactly the oracle's.
    for (table, per_shard) in expected {
        let mut on_shards = Vec::new();
        for i in 0..3 {
            on_shards.push(count(&shard_client(i).await, table).await);
        }
        let want: Vec<i64> = per_shard.iter().map(|n| *n as i64).collect();
        assert_eq!(on_shards, want, "{table}: rows per shard");
        assert!(
            on_shards.iter().all(|n| *n > 0),
            "{table}: every shard has rows"
        );
        assert_eq!(
            on_shards.iter().sum::<i64>(),
            count(&oracle, table).await,
            "{table}: shards together hold the oracle's rows"
        );
    }
    for i in 0..3 {
        assert_eq!(
            count(&shard_client(i).await, "df_countries").await,
            countries.rows.len() as i64
        );
    }
    assert!(st.data.total_rows() >= 10_000, "{}", st.data.total_rows());
}

async fn count(c: &Client, table: &str) -> i64 {
    c.query_one(&format!("select count(*) from {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A connection through the proxy; a new one if a query broke it (a
/// broken connection is recorded as that query's failure).
async fn usable(c: Client, proxy: &TestProxy) -> Client {
    if c.is_closed() {
        proxy_client(proxy).await
    } else {
        c
    }
}

#[test]
fn sharded_answers_equal_one_postgres() {
    let _s = serial();
    let st = setup();
    let cases = corpus::build(&st.map, &st.data);
    assert!(cases.len() >= 200, "corpus has {} queries", cases.len());
    rt().block_on(async {
        let started = Instant::now();
        let mut proxy = proxy_client(&st.proxy).await;
        let oracle = oracle_client().await;
        assert_eq!(
            common::scalar(&proxy, "show timezone").await,
            TIME_ZONE,
            "the session time zone follows the client through the proxy"
        );
        let mut tally = Tally::default();
        for case in &cases {
            tally.by_category.entry(case.category).or_default().0 += 1;
            let want = run_extended(&oracle, &case.sql, &case.params).await;
            if let Outcome::Error { code, message } = &want {
                if !case.fails {
                    tally
                        .corpus_errors
                        .push(format!("{} -> {code} {message}", case.sql));
                    continue;
                }
            }
            let got = run_extended(&proxy, &case.sql, &case.params).await;
            tally.record(case, "extended", compare(case, &got, &want));
            proxy = usable(proxy, &st.proxy).await;
            if !case.params.is_empty() {
                continue;
            }
            let mut want_simple = run_simple(&oracle, &case.sql).await;
            // The simple protocol does not say which columns are floats.
            if let (
                Outcome::Rows { floats, .. },
                Outcome::Rows {
                    floats: extended, ..
                },
            ) = (&mut want_simple, &want)
            {
                if floats.len() == extended.len() {
                    floats.clone_from(extended);
                }
            }
            let got = run_simple(&proxy, &case.sql).await;
            tally.record(case, "simple", compare(case, &got, &want_simple));
            proxy = usable(proxy, &st.proxy).await;
        }
        let report = tally.report(cases.len(), started.elapsed().as_secs_f64());
        let sizes: Vec<String> = st
            .data
            .sharded()
            .iter()
            .chain([&&st.data.countries])
            .map(|t| format!("{} {}", t.name, t.rows.len()))
            .collect();
        println!(
            "data: {} rows ({}), seed {:#x}\n{report}",
            st.data.total_rows(),
            sizes.join(", "),
            data::SEED
        );
        assert!(
            tally.corpus_errors.is_empty(),
            "queries the oracle cannot run:\n{report}"
        );
        assert!(
            tally.failed.is_empty(),
            "shardgate answered differently from one Postgres:\n{report}"
        );
        assert!(
            tally.equal >= MIN_ANSWERED,
            "only {} runs answered (floor {MIN_ANSWERED}):\n{report}",
            tally.equal
        );
    });
}

const SHARDED_TABLES: [&str; 4] = ["df_customers", "df_orders", "df_events", "df_devices"];

/// Per sharded table: row count and a checksum of the rows as text.
async fn table_sums(c: &Client) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for t in SHARDED_TABLES {
        let row = c
            .query_one(
                &format!(
                    "select count(*), coalesce(sum(hashtext(t::text)::int8), 0)::int8 from {t} t"
                ),
                &[],
            )
            .await
            .unwrap();
        out.push((row.get(0), row.get(1)));
    }
    out
}

/// `table_sums` of every shard.
async fn fingerprint() -> Vec<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    for i in 0..3 {
        out.push(table_sums(&shard_client(i).await).await);
    }
    out
}

/// The shards together hold exactly the oracle's rows.
async fn assert_shards_hold_the_oracles_rows(oracle: &Client, after: &str) {
    let mut together = vec![(0, 0); SHARDED_TABLES.len()];
    for shard in fingerprint().await {
        for (sum, (n, h)) in together.iter_mut().zip(shard) {
            sum.0 += n;
            sum.1 += h;
        }
    }
    assert_eq!(
        together,
        table_sums(oracle).await,
        "after {after}: the shards' rows of {SHARDED_TABLES:?} differ from the oracle's"
    );
}

/// Writable CTEs over sharded tables. First each inside a transaction
/// rolled back on both sides (refused with 0A000 or answered as the oracle
/// answers; no shard changed). Then in autocommit: a refusal must leave
/// every shard as it was; a write shardgate answers is applied to the
/// oracle too, and must answer alike and leave the shards holding exactly
/// the oracle's rows (so the read corpus stays valid whichever runs first).
#[test]
fn writable_ctes_are_refused_or_applied_alike() {
    let _s = serial();
    let st = setup();
    let other = (1..200i64)
        .find(|k| {
            use shardgate::sharding::hash::{KeyType, KeyValue};
            st.map.locate(KeyType::Int8, &KeyValue::Int(*k)).shard
                != st.map.locate(KeyType::Int8, &KeyValue::Int(7)).shard
        })
        .unwrap();
    let rolled_back = [
        "with d as (delete from df_orders where customer_id = 42 returning id) select count(*) from d".to_string(),
        "with d as (delete from df_orders where qty < 0 returning id) select count(*) from d".into(),
        "with u as (update df_customers set vip = not vip where score > 0 returning id) select count(*) from u".into(),
        "with u as (update df_orders set note = 'x' where customer_id = 7 returning id) select count(*) from df_orders where note = 'x'".into(),
        format!("with i as (insert into df_orders (customer_id, id) values (7, -1), ({other}, -2) returning id) select count(*) from i"),
        "with i as (insert into df_orders (customer_id, id) select id, -id from df_customers where country = 'de' returning id) select count(*) from i".into(),
        "with d as (delete from df_events where tenant = 'acme' returning *) insert into df_events select * from d".into(),
        "with m as (delete from df_devices where owner = 7 returning *) select count(*) from m".into(),
        "with d as (delete from df_orders where customer_id = 7 returning *) select count(*), sum(amount) from d".into(),
    ];
    // Small changes, so that the read corpus keeps its shape.
    let autocommit = [
        "with d as (delete from df_orders where customer_id = 2002 and qty < 10 returning id) select count(*) from d".to_string(),
        "with d as (delete from df_orders where qty = -5 and note is not null returning id, amount) select * from d".into(),
        "with u as (update df_customers set vip = not vip where score > 49900 returning id, vip) select * from u".into(),
        format!("with i as (insert into df_orders (customer_id, id, amount) values (7, -1, 1), ({other}, -2, 2) returning id) select count(*) from i"),
        "with u as (update df_events set n = n + 1 where kind = 'érreur' and n = 0 returning seq) select count(*) from u".into(),
        "with d as (delete from df_devices where owner = -120 returning id) select * from d".into(),
        "with u as (update df_orders set note = 'moved' where customer_id = 2001 and qty > 90 returning id) select count(*) from df_orders where note = 'moved'".into(),
        "with d as (delete from df_events where tenant = 't-10' and seq % 7 = 0 returning *) insert into df_events (tenant, seq, kind, n, at) select tenant, seq + 100000, kind, n, at from d".into(),
    ];
    let case = |sql: &str| Case {
        category: "writable CTE",
        sql: sql.to_owned(),
        ordered: false,
        params: Vec::new(),
        fails: false,
    };
    rt().block_on(async {
        let oracle = oracle_client().await;
        assert_shards_hold_the_oracles_rows(&oracle, "loading").await;
        let mut tally = Tally::default();

        let before = fingerprint().await;
        for sql in &rolled_back {
            for protocol in ["simple", "extended"] {
                let proxy = proxy_client(&st.proxy).await;
                let mut outcomes = Vec::new();
                for c in [&proxy, &oracle] {
                    c.batch_execute("begin").await.unwrap();
                    let o = if protocol == "simple" {
                        run_simple(c, sql).await
                    } else {
                        run_extended(c, sql, &[]).await
                    };
                    let _ = c.batch_execute("rollback").await;
                    outcomes.push(o);
                }
                let verdict = compare(&case(sql), &outcomes[0], &outcomes[1]);
                tally.record(&case(sql), &format!("{protocol}, rolled back"), verdict);
            }
        }
        assert_eq!(
            fingerprint().await,
            before,
            "a rolled-back write changed a shard"
        );

        let proxy = proxy_client(&st.proxy).await;
        for sql in &autocommit {
            let before = fingerprint().await;
            let got = run_simple(&proxy, sql).await;
            let refused = matches!(&got, Outcome::Error { code, message }
                if code == "0A000" && message.starts_with("shardgate"));
            if refused {
                assert_eq!(
                    fingerprint().await,
                    before,
                    "refused, yet a shard changed: {sql}"
                );
                let verdict = compare(&case(sql), &got, &got);
                tally.record(&case(sql), "simple, autocommit", verdict);
                continue;
            }
            let want = run_simple(&oracle, sql).await;
            let verdict = compare(&case(sql), &got, &want);
            tally.record(&case(sql), "simple, autocommit", verdict);
            assert_shards_hold_the_oracles_rows(&oracle, sql).await;
        }

        let report = tally.report(rolled_back.len() + autocommit.len(), 0.0);
        println!("{report}");
        assert!(tally.failed.is_empty(), "{report}");
    });
}
