//! Online bucket moves against real servers: buckets move to a shard that
//! owned none while writers insert, update and delete through shardgate;
//! verification catches a corrupted row on the target; an abort before the
//! cutover restores the old placement. Every test has its own servers and
//! state directory.

mod common;

use common::{private_cluster, runtime, start_proxy_text, TestProxy};
use shardgate::local::PgServer;
use shardgate::reshard::{Phase, Reshard};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BUCKETS: u32 = 64;

fn state_dir() -> std::path::PathBuf {
    // RUST_LOG=shardgate=info shows what the proxy did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    tempfile::tempdir().unwrap().keep()
}

/// Three shards: s0 owns buckets 0-31, s1 32-63, s2 none (a shard just
/// added). `items` is sharded by id.
fn setup(reshard: &str) -> (TestProxy, Vec<PgServer>) {
    setup_hash(reshard, "postgres")
}

fn setup_hash(reshard: &str, hash: &str) -> (TestProxy, Vec<PgServer>) {
    let servers: Vec<PgServer> = (0..3).map(|_| private_cluster(0).0).collect();
    let state = state_dir();
    let base = common::config_text(
        &servers[0].addr(),
        "max_size = 20",
        &format!("state_dir = {:?}", state.display().to_string()),
    );
    // The application's login is not a superuser; the control plane logs
    // in as postgres (as `shardgate up` sets it up).
    let text = format!(
        "{base}buckets = [\"0-31\"]\n\n[[shards]]\nname = \"s1\"\nprimary = \"{}\"\nbuckets = [\"32-63\"]\n\n[[shards]]\nname = \"s2\"\nprimary = \"{}\"\n\n[sharding]\nbuckets = {BUCKETS}\nhash = \"{hash}\"\n\n[[sharding.tables]]\nname = \"items\"\ncolumn = \"id\"\ntype = \"int8\"\n\n[health]\nuser = \"postgres\"\npassword = \"postgres\"\n\n[reshard]\n{reshard}\n",
        servers[1].addr(),
        servers[2].addr()
    );
    for s in &servers {
        s.psql("postgres", "ALTER ROLE app NOSUPERUSER").unwrap();
    }
    // The table exists on the shards that own buckets; the move copies its
    // schema (and owner) to s2.
    for s in &servers[..2] {
        s.psql(
            "app",
            "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL); ALTER TABLE items OWNER TO app",
        )
        .unwrap();
    }
    (start_proxy_text(&text), servers)
}

async fn direct(s: &PgServer) -> tokio_postgres::Client {
    common::connect_url(&format!(
        "host=127.0.0.1 port={} user=postgres password=postgres dbname=app",
        s.port
    ))
    .await
    .unwrap()
}

/// The rows of `items` on one server.
async fn rows_on(s: &PgServer) -> BTreeMap<i64, i64> {
    let c = direct(s).await;
    let exists: bool = c
        .query_one("SELECT to_regclass('items') IS NOT NULL", &[])
        .await
        .unwrap()
        .get(0);
    if !exists {
        return BTreeMap::new();
    }
    c.query("SELECT id, v FROM items", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// Replication slots, publications and subscriptions left on a server.
async fn leftovers(s: &PgServer) -> Vec<String> {
    let c = direct(s).await;
    let mut out = Vec::new();
    for q in [
        "SELECT 'slot ' || slot_name FROM pg_replication_slots",
        "SELECT 'publication ' || pubname FROM pg_publication",
        "SELECT 'subscription ' || subname FROM pg_subscription",
        "SELECT 'trigger ' || tgname FROM pg_trigger WHERE tgname LIKE 'shardgate%'",
    ] {
        for r in c.query(q, &[]).await.unwrap() {
            out.push(r.get(0));
        }
    }
    out
}

fn moves(tp: &TestProxy) -> Vec<shardgate::reshard::Move> {
    tp.proxy.failover.state().moves
}

async fn start_move(tp: &TestProxy, buckets: &[&str], to: &str) -> Result<Vec<u64>, String> {
    let proxy = tp.proxy.clone();
    let buckets: Vec<String> = buckets.iter().map(|b| b.to_string()).collect();
    let to = to.to_owned();
    runtime()
        .spawn(async move { Reshard::start(&proxy, &buckets, &to, "app") })
        .await
        .unwrap()
}

/// Waits until every move has ended (at most `within`).
async fn until_ended(tp: &TestProxy, within: Duration) -> Vec<shardgate::reshard::Move> {
    let deadline = Instant::now() + within;
    loop {
        let m = moves(tp);
        if !m.is_empty() && m.iter().all(|m| !m.phase.active()) {
            return m;
        }
        assert!(Instant::now() < deadline, "moves did not end: {m:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a writer saw: the acknowledged value of each of its keys (None:
/// deleted), and its errors.
#[derive(Default)]
struct Ledger {
    rows: BTreeMap<i64, Option<i64>>,
    errors: Vec<String>,
    ops: u64,
}

/// Inserts, updates and deletes random keys of its own (id % writers ==
/// me) through the proxy until `stop`.
async fn writer(url: String, me: i64, writers: i64, stop: Arc<AtomicBool>) -> Ledger {
    let c = common::connect_url(&url).await.unwrap();
    let ins = c
        .prepare("INSERT INTO items (id, v) VALUES ($1, $2)")
        .await
        .unwrap();
    let upd = c
        .prepare("UPDATE items SET v = v + 1 WHERE id = $1 RETURNING v")
        .await
        .unwrap();
    let del = c.prepare("DELETE FROM items WHERE id = $1").await.unwrap();
    let mut l = Ledger::default();
    // Keys 0..2000 were loaded before; this writer inserts above them.
    for id in (0..2000).filter(|i| i % writers == me) {
        l.rows.insert(id, Some(id));
    }
    let mut next = 2000 + me;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ me as u64;
    while !stop.load(Ordering::Relaxed) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let live: Vec<i64> = l
            .rows
            .iter()
            .filter(|(_, v)| v.is_some())
            .map(|(k, _)| *k)
            .collect();
        let pick = live[(seed % live.len() as u64) as usize];
        let r = match seed % 10 {
            0..=3 => {
                let id = next;
                next += writers;
                c.execute(&ins, &[&id, &0i64]).await.map(|_| {
                    l.rows.insert(id, Some(0));
                })
            }
            4..=8 => c.query_one(&upd, &[&pick]).await.map(|r| {
                l.rows.insert(pick, Some(r.get(0)));
            }),
            _ => c.execute(&del, &[&pick]).await.map(|_| {
                l.rows.insert(pick, None);
            }),
        };
        l.ops += 1;
        if let Err(e) = r {
            l.errors.push(format!(
                "{}: {}",
                common::code(&e),
                e.as_db_error()
                    .map_or(e.to_string(), |d| d.message().to_owned())
            ));
        }
    }
    l
}

/// Asks the proxy to abort its moves.
async fn abort(tp: &TestProxy) {
    let proxy = tp.proxy.clone();
    runtime()
        .spawn(async move { Reshard::abort(&proxy) })
        .await
        .unwrap()
        .unwrap();
}

/// Stops the writers; their merged ledger, errors and operation count.
async fn stop_writers(
    stop: &AtomicBool,
    writers: Vec<tokio::task::JoinHandle<Ledger>>,
) -> (BTreeMap<i64, Option<i64>>, Vec<String>, u64) {
    stop.store(true, Ordering::Relaxed);
    let mut ledger = BTreeMap::new();
    let mut errors = Vec::new();
    let mut ops = 0;
    for w in writers {
        let l = w.await.unwrap();
        ledger.extend(l.rows);
        errors.extend(l.errors);
        ops += l.ops;
    }
    (ledger, errors, ops)
}

/// Every acknowledged row exactly once, on its owner as the map says now,
/// with its value; nothing else anywhere.
fn assert_ledger(tp: &TestProxy, on: &[BTreeMap<i64, i64>], ledger: &BTreeMap<i64, Option<i64>>) {
    for (id, want) in ledger {
        let holders: Vec<usize> = (0..on.len()).filter(|s| on[*s].contains_key(id)).collect();
        match want {
            Some(v) => {
                assert_eq!(holders, vec![owner(tp, *id)], "key {id}");
                assert_eq!(on[holders[0]][id], *v, "key {id}");
            }
            None => assert!(holders.is_empty(), "deleted key {id} is on {holders:?}"),
        }
    }
    let total: usize = on.iter().map(|r| r.len()).sum();
    assert_eq!(total, ledger.values().filter(|v| v.is_some()).count());
}

/// Where `id` lives, as the proxy's map says now.
fn location(tp: &TestProxy, id: i64) -> shardgate::sharding::map::Location {
    let t = tp.proxy.topology.load();
    t.map.as_ref().unwrap().locate(
        shardgate::sharding::hash::KeyType::Int8,
        &shardgate::sharding::hash::KeyValue::Int(id),
    )
}

/// The shard index owning `id`'s bucket, as the proxy's map says now.
fn owner(tp: &TestProxy, id: i64) -> usize {
    location(tp, id).shard
}

/// Inserts keys 0..n (value = key) through the proxy.
async fn load(c: &tokio_postgres::Client, n: i64) {
    for id in 0..n {
        c.execute("INSERT INTO items (id, v) VALUES ($1, $1)", &[&id])
            .await
            .unwrap();
    }
}

/// No replication slot, publication, subscription or shardgate trigger
/// is left on any server.
async fn assert_clean(servers: &[PgServer]) {
    for s in servers {
        assert_eq!(leftovers(s).await, Vec::<String>::new(), "on {}", s.addr());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_move_to_a_new_shard_under_writes_with_nothing_lost() {
    let (tp, servers) = setup("cleanup_after = \"0s\"");
    let c = tp.connect().await;
    load(&c, 2000).await;
    let before: Vec<usize> = rows_on_all(&servers)
        .await
        .iter()
        .map(|r| r.len())
        .collect();
    assert_eq!(before[2], 0, "s2 owns nothing yet");

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| tokio::spawn(writer(tp.url("app", "app", "app"), w, 3, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Half of each shard's buckets go to s2: two moves, one per source.
    let ids = start_move(&tp, &["16-31", "48-63"], "s2").await.unwrap();
    assert_eq!(ids.len(), 2);
    // While a move runs, a write across shards on items is refused (it
    // would change the copies); reads are answered
    // (`reads_across_shards_during_a_move_count_every_row_once`).
    until_phase(&tp, "a move", |m| m.phase.active()).await;
    let e = c
        .simple_query("UPDATE items SET v = v WHERE v < 0")
        .await
        .unwrap_err();
    assert_eq!(common::code(&e), "0A000", "{e}");
    // So is DDL on it (logical replication would not carry it).
    let e = c
        .simple_query("ALTER TABLE items ADD COLUMN note text")
        .await
        .unwrap_err();
    assert_eq!(common::code(&e), "0A000", "{e}");
    let message = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("bucket move is under way"), "{message}");
    let ended = until_ended(&tp, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ledger, errors, ops) = stop_writers(&stop, writers).await;
    for m in &ended {
        assert_eq!(m.phase, Phase::Done, "{m:#?}");
        assert!(m.pause_ms < 5000, "{m:#?}");
    }
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert!(ops > 100, "the writers did too little: {ops}");

    let on = rows_on_all(&servers).await;
    assert_ledger(&tp, &on, &ledger);
    let total: usize = on.iter().map(|r| r.len()).sum();
    assert!(!on[2].is_empty(), "s2 got no rows");
    assert_clean(&servers).await;
    // The refusal is lifted: a scatter read answers from the new owners.
    let count: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as usize, total);
}

async fn rows_on_all(servers: &[PgServer]) -> Vec<BTreeMap<i64, i64>> {
    let mut out = Vec::new();
    for s in servers {
        out.push(rows_on(s).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verification_catches_a_corrupted_row_and_switches_nothing() {
    let (tp, servers) = setup("cleanup_after = \"0s\"");
    let c = tp.connect().await;
    load(&c, 500).await;
    // The target's copy of key 7 is altered as it arrives (a trigger that
    // fires for replication too): a corruption the verification must see.
    let s2 = direct(&servers[2]).await;
    s2.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
         ALTER TABLE items OWNER TO app;
         CREATE FUNCTION corrupt() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.id = 7 THEN NEW.v := -1; END IF; RETURN NEW; END $$;
         CREATE TRIGGER corrupt BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION corrupt();
         ALTER TABLE items ENABLE ALWAYS TRIGGER corrupt;",
    )
    .await
    .unwrap();
    let bucket = location(&tp, 7).bucket;
    let owner_before = owner(&tp, 7);
    start_move(&tp, &[&bucket.to_string()], "s2").await.unwrap();
    let ended = until_ended(&tp, Duration::from_secs(60)).await;
    let m = &ended[0];
    assert_eq!(m.phase, Phase::Failed, "{m:#?}");
    assert!(
        m.message
            .contains(&format!("bucket {bucket} of public.items")),
        "{}",
        m.message
    );
    // Nothing switched, the copy on the target is gone, nothing left over.
    assert_eq!(owner(&tp, 7), owner_before);
    let v: i64 = c
        .query_one("SELECT v FROM items WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 7);
    assert!(rows_on(&servers[2]).await.is_empty());
    assert_clean(&servers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_during_the_copy_restores_the_old_placement() {
    let (tp, servers) = setup("cleanup_after = \"0s\"");
    let c = tp.connect().await;
    load(&c, 300).await;
    // A slow copy: every row takes 20 ms to arrive on the target.
    let s2 = direct(&servers[2]).await;
    s2.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
         ALTER TABLE items OWNER TO app;
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION slow();
         ALTER TABLE items ENABLE ALWAYS TRIGGER slow;",
    )
    .await
    .unwrap();
    let before = rows_on_all(&servers).await;
    start_move(&tp, &["0-31"], "s2").await.unwrap();
    common::eventually("the copy runs", || async {
        moves(&tp).iter().any(|m| m.phase == Phase::Copying)
    })
    .await;
    abort(&tp).await;
    let ended = until_ended(&tp, Duration::from_secs(60)).await;
    assert_eq!(ended[0].phase, Phase::Aborted, "{:#?}", ended[0]);
    let after = rows_on_all(&servers).await;
    assert_eq!(
        after, before,
        "the source is untouched, the target empty again"
    );
    for id in [0i64, 1, 2, 299] {
        assert_ne!(owner(&tp, id), 2);
    }
    assert_clean(&servers).await;
    // Scatter reads work again.
    let n: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 300);
}

/// Writers run through the whole of it; the ledger ends on the old
/// owners exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_after_the_cutover_moves_the_buckets_back_with_nothing_lost() {
    // A long grace period: the move waits in `switched` for the abort.
    let (tp, servers) = setup("cleanup_after = \"10m\"");
    let c = tp.connect().await;
    load(&c, 2000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| tokio::spawn(writer(tp.url("app", "app", "app"), w, 3, stop.clone())))
        .collect();
    start_move(&tp, &["16-31"], "s2").await.unwrap();
    until_phase(&tp, "switched", |m| m.phase == Phase::Switched).await;
    assert!(moves(&tp)[0].back_lsn.contains('/'), "{:#?}", moves(&tp));
    // The new owner takes writes for a while: they must come back.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let on_target = rows_on(&servers[2]).await.len();
    assert!(on_target > 0, "s2 got no rows");
    abort(&tp).await;
    let ended = until_ended(&tp, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ledger, errors, _) = stop_writers(&stop, writers).await;
    let m = &ended[0];
    assert_eq!(m.phase, Phase::Aborted, "{m:#?}");
    assert!(m.message.contains("moved back"), "{m:#?}");
    assert!(m.back_pause_ms < 5000, "{m:#?}");
    assert!(errors.is_empty(), "client errors: {errors:?}");
    // The old placement: nothing on s2, every acknowledged row once, on
    // its owner (s0 or s1), with its value.
    let on = rows_on_all(&servers).await;
    assert!(on[2].is_empty(), "s2 kept {} rows", on[2].len());
    assert!(
        (0..2000).all(|id| owner(&tp, id) < 2),
        "a bucket stayed on s2"
    );
    assert_ledger(&tp, &on, &ledger);
    let total: usize = on.iter().map(|r| r.len()).sum();
    assert_clean(&servers).await;
    let n: i64 = c
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n as usize, total);
}

/// `reshard.copy_bytes_per_second` paces the copy: it cannot have taken
/// less than its bytes at that rate (a lower bound, which a slow machine
/// only exceeds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_keeps_to_its_rate_limit() {
    const LIMIT: u64 = 4096;
    let (tp, servers) = setup(&format!(
        "cleanup_after = \"0s\"\ncopy_bytes_per_second = {LIMIT}"
    ));
    let c = tp.connect().await;
    load(&c, 3000).await;
    let before: BTreeMap<i64, i64> = rows_on_all(&servers).await.into_iter().flatten().collect();
    start_move(&tp, &["0-31"], "s2").await.unwrap();
    let ended = until_ended(&tp, Duration::from_secs(120)).await;
    let m = &ended[0];
    assert_eq!(m.phase, Phase::Done, "{m:#?}");
    assert!(m.bytes_copied > 2 * LIMIT, "{m:#?}");
    let took_ms = m.copied_unix_ms - m.copy_started_unix_ms;
    assert!(
        took_ms >= m.bytes_copied * 1000 / LIMIT,
        "{} bytes copied in {took_ms} ms at most {LIMIT} bytes/s",
        m.bytes_copied
    );
    let on = rows_on_all(&servers).await;
    for (id, v) in &before {
        let holders: Vec<usize> = (0..3).filter(|s| on[*s].contains_key(id)).collect();
        assert_eq!(holders, vec![owner(&tp, *id)], "key {id}");
        assert_eq!(on[holders[0]][id], *v);
    }
    assert_clean(&servers).await;
}

/// Postgres computes a murmur3 bucket exactly as the proxy does (the SQL
/// functions a move installs), for int, text of every length up to three
/// blocks (multibyte too) and uuid keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn murmur3_buckets_computed_in_postgres_match_the_proxy() {
    use shardgate::sharding::hash::{
        bucket, bucket_sql_installed, HashFunction, KeyType, KeyValue,
    };
    let (server, _) = private_cluster(0);
    let c = direct(&server).await;
    c.batch_execute(shardgate::reshard::MURMUR3_SQL)
        .await
        .unwrap();
    // A large prime bucket count compares nearly all of the hash.
    const B: u32 = 4_294_967_291;
    let f = HashFunction::Murmur3;
    let mut ints: Vec<i64> = vec![0, 1, -1, i64::MIN, i64::MAX, 42, 1 << 40];
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..200 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ints.push(seed as i64);
        ints.push((seed % 100_000) as i64);
    }
    let sql = bucket_sql_installed(f, KeyType::Int8, "k", B);
    let rows = c
        .query(
            &format!("SELECT k, {sql} FROM unnest($1::int8[]) k"),
            &[&ints],
        )
        .await
        .unwrap();
    for r in rows {
        let k: i64 = r.get(0);
        let got: i64 = r.get(1);
        assert_eq!(
            got as u32,
            bucket(f, KeyType::Int8, &KeyValue::Int(k), B),
            "int {k}"
        );
    }
    let mut texts: Vec<String> = (0..50)
        .map(|n| "abcdefghij".repeat(5)[..n].to_string())
        .collect();
    texts.extend(["é", "日本語のキー", "user:1234", "ünïcödé-ключ-🙂"].map(String::from));
    let sql = bucket_sql_installed(f, KeyType::Text, "k", B);
    let rows = c
        .query(
            &format!("SELECT k, {sql} FROM unnest($1::text[]) k"),
            &[&texts],
        )
        .await
        .unwrap();
    for r in rows {
        let k: String = r.get(0);
        let got: i64 = r.get(1);
        assert_eq!(
            got as u32,
            bucket(f, KeyType::Text, &KeyValue::Text(k.clone()), B),
            "text {k:?}"
        );
    }
    let sql = bucket_sql_installed(f, KeyType::Uuid, "k", B);
    let rows = c
        .query(
            &format!("SELECT k::text, uuid_send(k), {sql} FROM (SELECT gen_random_uuid() k FROM generate_series(1, 50)) x"),
            &[],
        )
        .await
        .unwrap();
    for r in rows {
        let bytes: Vec<u8> = r.get(1);
        let got: i64 = r.get(2);
        let u: [u8; 16] = bytes.try_into().unwrap();
        assert_eq!(
            got as u32,
            bucket(f, KeyType::Uuid, &KeyValue::Uuid(u), B),
            "uuid {}",
            r.get::<_, String>(0)
        );
    }
}

/// Tables on the murmur3 hash move too: the publication sends every
/// change and the receiving side keeps the moving buckets' (a trigger).
/// One move completes, a second is aborted after its cutover and moves
/// back, under writers throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn murmur3_tables_move_and_move_back_under_writes() {
    let (tp, servers) = setup_hash("cleanup_after = \"3s\"", "murmur3");
    let c = tp.connect().await;
    load(&c, 2000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| tokio::spawn(writer(tp.url("app", "app", "app"), w, 2, stop.clone())))
        .collect();
    start_move(&tp, &["16-31"], "s2").await.unwrap();
    let first = until_ended(&tp, Duration::from_secs(120)).await;
    assert_eq!(first[0].phase, Phase::Done, "{:#?}", first[0]);
    start_move(&tp, &["48-63"], "s2").await.unwrap();
    until_phase(&tp, "switched", |m| m.id == 2 && m.phase == Phase::Switched).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    abort(&tp).await;
    let ended = until_ended(&tp, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ledger, errors, _) = stop_writers(&stop, writers).await;
    let second = ended.iter().find(|m| m.id == 2).unwrap();
    assert_eq!(second.phase, Phase::Aborted, "{second:#?}");
    assert!(second.message.contains("moved back"), "{second:#?}");
    assert!(errors.is_empty(), "client errors: {errors:?}");
    let on = rows_on_all(&servers).await;
    for id in ledger.keys() {
        let l = location(&tp, *id);
        assert_eq!(l.shard == 2, (16..32).contains(&l.bucket), "key {id}");
    }
    assert_ledger(&tp, &on, &ledger);
    assert_clean(&servers).await;
}

/// Reads across shards while buckets move: each shard leaves out the
/// copies it holds of buckets it does not own (the target's before the
/// cutover, the source's after it), so every phase answers with every row
/// exactly once. No writers: the truth is fixed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_across_shards_during_a_move_count_every_row_once() {
    let (tp, servers) = setup("cleanup_after = \"2s\"");
    // Every shard has the table (a read across shards reads all of them).
    servers[2]
        .psql(
            "app",
            "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL); ALTER TABLE items OWNER TO app",
        )
        .unwrap();
    let c = tp.connect().await;
    load(&c, 1000).await;
    let truth: BTreeMap<i64, i64> = rows_on_all(&servers).await.into_iter().flatten().collect();
    let count = truth.len() as i64;
    let sum: i64 = truth.values().sum();
    let ids: Vec<i64> = truth.keys().copied().collect();
    start_move(&tp, &["16-31", "48-63"], "s2").await.unwrap();
    let mut phases = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = moves(&tp);
        if now.iter().all(|m| !m.phase.active()) {
            break;
        }
        assert!(Instant::now() < deadline, "moves did not end: {now:#?}");
        for m in now.iter().filter(|m| m.phase.active()) {
            phases.insert(m.phase.name());
        }
        let r = c
            .query_one("SELECT count(*), sum(v)::int8 FROM items", &[])
            .await
            .unwrap();
        assert_eq!(
            (r.get::<_, i64>(0), r.get::<_, i64>(1)),
            (count, sum),
            "during {now:?}"
        );
        let r = c
            .query_one("SELECT count(*) FROM items i WHERE i.v >= $1", &[&0i64])
            .await
            .unwrap();
        assert_eq!(r.get::<_, i64>(0), count);
        let got: Vec<i64> = c
            .query("SELECT id FROM items ORDER BY id", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(got, ids);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The copies were read around: on the target before the cutover, on
    // the source after it.
    assert!(phases.contains("catching_up"), "{phases:?}");
    assert!(phases.contains("switched"), "{phases:?}");
    assert!(moves(&tp).iter().all(|m| m.phase == Phase::Done));
    assert_clean(&servers).await;
}

/// Stops a proxy the way a crash would stop its move: mid-phase.
fn kill(tp: TestProxy) {
    tp.proxy.stop();
}

async fn until_phase(tp: &TestProxy, what: &str, f: impl Fn(&shardgate::reshard::Move) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !moves(tp).iter().any(&f) {
        assert!(
            Instant::now() < deadline,
            "never reached {what}: {:#?}",
            moves(tp)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_resumes_after_the_proxy_dies_during_copy_catch_up_and_cutover() {
    let (tp, servers) = setup("cleanup_after = \"0s\"\ncutover_timeout = \"500ms\"");
    // The same configuration (and state directory) for every restart.
    let text = tp.proxy.config.load_full();
    let c = tp.connect().await;
    load(&c, 200).await;
    drop(c);
    let before: BTreeMap<i64, i64> = rows_on_all(&servers).await.into_iter().flatten().collect();
    // A slow copy (10 ms per row on the target) to die in.
    let s2 = direct(&servers[2]).await;
    s2.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL);
         ALTER TABLE items OWNER TO app;
         CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.01); RETURN NEW; END $$;
         CREATE FUNCTION slow_marker() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
         CREATE TRIGGER slow BEFORE INSERT ON items FOR EACH ROW EXECUTE FUNCTION slow();
         ALTER TABLE items ENABLE ALWAYS TRIGGER slow;
         -- Every catch-up proof (a marker round trip) takes 300 ms: a
         -- cutover lasts long enough to die in.
         CREATE SCHEMA shardgate;
         CREATE TABLE shardgate.move_marker (id bigint PRIMARY KEY, n bigint NOT NULL);
         CREATE TRIGGER slow_marker BEFORE UPDATE ON shardgate.move_marker FOR EACH ROW
           EXECUTE FUNCTION slow_marker();
         ALTER TABLE shardgate.move_marker ENABLE ALWAYS TRIGGER slow_marker;",
    )
    .await
    .unwrap();
    start_move(&tp, &["0-31"], "s2").await.unwrap();
    until_phase(&tp, "copying", |m| m.phase == Phase::Copying).await;
    kill(tp);

    // A transaction on the source holds a lock on the table that the
    // write watch (a trigger) needs: the move stays in catching up.
    let s0 = direct(&servers[0]).await;
    s0.batch_execute("BEGIN; LOCK TABLE items IN ROW EXCLUSIVE MODE")
        .await
        .unwrap();
    let tp = common::start_proxy_config(text.as_ref().clone());
    until_phase(&tp, "catching up, waiting for a lock", |m| {
        m.phase == Phase::CatchingUp && m.message.contains("lock timeout")
    })
    .await;
    kill(tp);
    s0.batch_execute("COMMIT").await.unwrap();
    let tp = common::start_proxy_config(text.as_ref().clone());
    until_phase(&tp, "cutting over", |m| m.phase == Phase::CuttingOver).await;
    kill(tp);

    let tp = common::start_proxy_config(text.as_ref().clone());
    let ended = until_ended(&tp, Duration::from_secs(120)).await;
    assert_eq!(ended[0].phase, Phase::Done, "{:#?}", ended[0]);
    let on = rows_on_all(&servers).await;
    for (id, v) in &before {
        let holders: Vec<usize> = (0..3).filter(|s| on[*s].contains_key(id)).collect();
        assert_eq!(holders, vec![owner(&tp, *id)], "key {id}");
        assert_eq!(on[holders[0]][id], *v);
    }
    assert_eq!(on.iter().map(|r| r.len()).sum::<usize>(), before.len());
    assert_clean(&servers).await;
}

/// The move back is resumed like the move: the proxy dies while the
/// target's changes stream back and again while the buckets are held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_back_resumes_after_the_proxy_dies() {
    let (tp, servers) = setup("cleanup_after = \"10m\"\ncutover_timeout = \"1s\"");
    let text = tp.proxy.config.load_full();
    let c = tp.connect().await;
    load(&c, 200).await;
    start_move(&tp, &["0-31"], "s2").await.unwrap();
    until_phase(&tp, "switched", |m| m.phase == Phase::Switched).await;
    // Writes on the new owner: they must survive the move back.
    let mut want: BTreeMap<i64, i64> = rows_on_all(&servers).await.into_iter().flatten().collect();
    for id in 0..200i64 {
        if owner(&tp, id) != 2 {
            continue;
        }
        match id % 3 {
            0 => {
                c.execute("UPDATE items SET v = v + 1000 WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                *want.get_mut(&id).unwrap() += 1000;
            }
            1 => {
                c.execute("DELETE FROM items WHERE id = $1", &[&id])
                    .await
                    .unwrap();
                want.remove(&id);
            }
            _ => {
                let new = id + 10_000;
                c.execute("INSERT INTO items (id, v) VALUES ($1, $1)", &[&new])
                    .await
                    .unwrap();
                want.insert(new, new);
            }
        }
    }
    drop(c);
    // Every catch-up proof back takes 300 ms: phases long enough to die in.
    let s0 = direct(&servers[0]).await;
    s0.batch_execute(
        "CREATE FUNCTION slow_marker() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$;
         CREATE TRIGGER slow_marker BEFORE UPDATE ON shardgate.move_marker FOR EACH ROW
           EXECUTE FUNCTION slow_marker();
         ALTER TABLE shardgate.move_marker ENABLE ALWAYS TRIGGER slow_marker;",
    )
    .await
    .unwrap();
    abort(&tp).await;
    until_phase(&tp, "moving back", |m| m.phase == Phase::MovingBack).await;
    kill(tp);
    let tp = common::start_proxy_config(text.as_ref().clone());
    until_phase(&tp, "cutting back", |m| m.phase == Phase::CuttingBack).await;
    kill(tp);
    let tp = common::start_proxy_config(text.as_ref().clone());
    let ended = until_ended(&tp, Duration::from_secs(120)).await;
    assert_eq!(ended[0].phase, Phase::Aborted, "{:#?}", ended[0]);
    let on = rows_on_all(&servers).await;
    assert!(on[2].is_empty(), "s2 kept {} rows", on[2].len());
    for (id, v) in &want {
        let holders: Vec<usize> = (0..3).filter(|s| on[*s].contains_key(id)).collect();
        assert_eq!(holders, vec![owner(&tp, *id)], "key {id}");
        assert_eq!(on[holders[0]][id], *v, "key {id}");
    }
    assert_eq!(on.iter().map(|r| r.len()).sum::<usize>(), want.len());
    assert_clean(&servers).await;
}

/// Found by bench/reshard.sh: after a write on a shard with replicas the
/// proxy asks the server for the commit's WAL position (read-your-writes).
/// A client's next autocommit statement, for another shard, arrived while
/// that answer was outstanding and was refused as if a transaction were
/// open on the first shard.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autocommit_writes_alternating_shards_are_not_tied_to_the_previous_shard() {
    let (p0, reps) = private_cluster(1);
    let p1 = private_cluster(0).0;
    let state = state_dir();
    let base = common::config_text(
        &p0.addr(),
        "max_size = 10",
        &format!("state_dir = {:?}", state.display().to_string()),
    );
    let text = format!(
        "{base}replicas = [\"{}\"]\n\n[[shards]]\nname = \"s1\"\nprimary = \"{}\"\n\n[sharding]\nbuckets = {BUCKETS}\n\n[[sharding.tables]]\nname = \"items\"\ncolumn = \"id\"\ntype = \"int8\"\n",
        reps[0].addr(),
        p1.addr()
    );
    let tp = start_proxy_text(&text);
    let c = tp.connect().await;
    c.simple_query("CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL)")
        .await
        .unwrap();
    let mut errors = Vec::new();
    for id in 0..400i64 {
        if let Err(e) = c
            .simple_query(&format!("INSERT INTO items (id, v) VALUES ({id}, 0)"))
            .await
        {
            errors.push(format!("{id}: {e}"));
        }
    }
    assert!(
        errors.is_empty(),
        "{} errors: {:?}",
        errors.len(),
        &errors[..errors.len().min(3)]
    );
    let on = rows_on_all(&[p0, p1]).await;
    assert_eq!(on.iter().map(|r| r.len()).sum::<usize>(), 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_shard_takes_a_fair_share_under_writes_and_survives_a_restart() {
    let servers: Vec<PgServer> = (0..3).map(|_| private_cluster(0).0).collect();
    let state = state_dir();
    let base = common::config_text(
        &servers[0].addr(),
        "max_size = 20",
        &format!("state_dir = {:?}", state.display().to_string()),
    );
    // Two shards configured; the third server is not in the configuration.
    let text = format!(
        "{base}buckets = [\"0-31\"]\n\n[[shards]]\nname = \"s1\"\nprimary = \"{}\"\nbuckets = [\"32-63\"]\n\n[sharding]\nbuckets = {BUCKETS}\n\n[[sharding.tables]]\nname = \"items\"\ncolumn = \"id\"\ntype = \"int8\"\n\n[health]\nuser = \"postgres\"\npassword = \"postgres\"\n\n[reshard]\ncleanup_after = \"0s\"\n",
        servers[1].addr(),
    );
    for s in &servers {
        s.psql("postgres", "ALTER ROLE app NOSUPERUSER").unwrap();
    }
    for s in &servers[..2] {
        s.psql(
            "app",
            "CREATE TABLE items (id bigint PRIMARY KEY, v bigint NOT NULL); ALTER TABLE items OWNER TO app",
        )
        .unwrap();
    }
    let tp = start_proxy_text(&text);
    let c = tp.connect().await;
    load(&c, 2000).await;
    let stop = Arc::new(AtomicBool::new(false));
    let w = tokio::spawn(writer(tp.url("app", "app", "app"), 0, 1, stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let proxy = tp.proxy.clone();
    let s2 = servers[2].addr();
    let (plan, ids) = runtime()
        .spawn(async move { Reshard::add_shard(&proxy, "s2", &s2, &[], "app", false).await })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(plan.len(), 2, "{plan:?}");
    assert_eq!(ids.len(), 2);
    let ended = until_ended(&tp, Duration::from_secs(120)).await;
    stop.store(true, Ordering::Relaxed);
    let l = w.await.unwrap();
    assert!(ended.iter().all(|m| m.phase == Phase::Done), "{ended:#?}");
    assert!(l.errors.is_empty(), "client errors: {:?}", l.errors);

    // About a third of the buckets each.
    let counts = |tp: &TestProxy| {
        let t = tp.proxy.topology.load();
        let map = t.map.as_ref().unwrap();
        let mut n = vec![0; t.shards.len()];
        for o in &map.owner {
            n[*o as usize] += 1;
        }
        n
    };
    assert_eq!(counts(&tp), vec![21, 22, 21]);
    let on = rows_on_all(&servers).await;
    for (id, want) in &l.rows {
        let holders: Vec<usize> = (0..3).filter(|s| on[*s].contains_key(id)).collect();
        match want {
            Some(v) => {
                assert_eq!(holders, vec![owner(&tp, *id)], "key {id}");
                assert_eq!(on[holders[0]][id], *v);
            }
            None => assert!(holders.is_empty(), "deleted key {id} on {holders:?}"),
        }
    }
    // A restarted proxy (same configuration, without s2) keeps s2 and its
    // buckets, and routes to it.
    let config = tp.proxy.config.load_full();
    kill(tp);
    let tp = common::start_proxy_config(config.as_ref().clone());
    assert_eq!(counts(&tp), vec![21, 22, 21]);
    let (id, v) = l
        .rows
        .iter()
        .find_map(|(id, v)| v.filter(|_| owner(&tp, *id) == 2).map(|v| (*id, v)))
        .expect("a live key on s2");
    let c = tp.connect().await;
    let got: i64 = c
        .query_one("SELECT v FROM items WHERE id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(got, v);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_open_across_a_cutover_never_reads_the_old_copy() {
    let (tp, _servers) = setup("cleanup_after = \"0s\"");
    let c = tp.connect().await;
    load(&c, 200).await;
    let moving = |id: i64| (16..=31).contains(&location(&tp, id).bucket);
    let k = (0..200i64).find(|id| moving(*id)).unwrap();
    // A transaction on s0 reads the key before the move...
    let t = tp.connect().await;
    t.batch_execute("BEGIN").await.unwrap();
    let v: i64 = t
        .query_one(&format!("SELECT v FROM items WHERE id = {k}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, k);
    start_move(&tp, &["16-31"], "s2").await.unwrap();
    // (The cleanup then waits for this transaction: dropping the fence
    // needs a lock its read holds.)
    until_phase(&tp, "cut over", |m| {
        matches!(m.phase, Phase::Switched | Phase::CleaningUp)
    })
    .await;
    // ... and again after the cutover, when the key lives on s2 and was
    // changed there. The transaction (begun with a plain BEGIN) spreads to
    // s2 and reads the new value, or is refused; it never answers from
    // s0's old copy.
    c.execute("UPDATE items SET v = -1 WHERE id = $1", &[&k])
        .await
        .unwrap();
    match t
        .query_one(&format!("SELECT v FROM items WHERE id = {k}"), &[])
        .await
    {
        Ok(row) => assert_eq!(row.get::<_, i64>(0), -1, "read the old owner's copy"),
        Err(e) => assert_eq!(common::code(&e), "0A000", "{e}"),
    }
    t.batch_execute("ROLLBACK").await.unwrap();
    let ended = until_ended(&tp, Duration::from_secs(60)).await;
    assert_eq!(ended[0].phase, Phase::Done, "{:#?}", ended[0]);
    let v: i64 = t
        .query_one(&format!("SELECT v FROM items WHERE id = {k}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, -1);
}
