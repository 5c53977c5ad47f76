//! Crash test of cross-shard commits: the proxy (the real binary) is
//! killed between the two phases of a write that spans shards, then
//! started again. With the decision logged, every part must end up
//! committed; killed before the decision, every part must be rolled back.
//! Either way no prepared transaction stays behind on any shard.

mod common;

use common::{cluster, connect_url, shard_primaries};
use shardgate::local::{free_port, PgServer};
use shardgate::sharding::hash::{KeyType, KeyValue};
use shardgate::sharding::map::ShardMap;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn servers() -> Vec<&'static PgServer> {
    let mut v = vec![&cluster().primary];
    v.extend(shard_primaries().iter());
    v
}

fn config(port: u16, state: &Path) -> String {
    let s = servers();
    format!(
        r#"
[proxy]
listen = "127.0.0.1:{port}"
state_dir = "{}"
node_id = 3

[[users]]
name = "app"
password = "app"

[[shards]]
name = "s0"
primary = "{}"

[[shards]]
name = "s1"
primary = "{}"

[[shards]]
name = "s2"
primary = "{}"

[sharding]
buckets = 16

[[sharding.tables]]
name = "tp_orders"
column = "id"
type = "int8"
"#,
        state.display(),
        s[0].addr(),
        s[1].addr(),
        s[2].addr()
    )
}

fn start(config: &Path, failpoint: Option<&str>) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shardgate"));
    cmd.args(["serve", "--config"]).arg(config);
    if let Some(f) = failpoint {
        cmd.env("SHARDGATE_FAILPOINT", f);
    }
    cmd.env("RUST_LOG", "warn");
    cmd.spawn().expect("shardgate starts")
}

async fn wait_until<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn on_shard(i: usize, sql: &str) -> i64 {
    let port = servers()[i].port;
    let c = connect_url(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=app"
    ))
    .await
    .unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

async fn total(sql: &str) -> i64 {
    let mut n = 0;
    for i in 0..3 {
        n += on_shard(i, sql).await;
    }
    n
}

async fn proxy_client(port: u16) -> Option<tokio_postgres::Client> {
    connect_url(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=app"
    ))
    .await
    .ok()
}

/// Kills the proxy between the phases at `failpoint`, restarts it, and
/// returns the rows of the write that became visible.
async fn crash_between_phases(failpoint: &str, keys: (i64, i64), value: i64) -> i64 {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().unwrap();
    let path = dir.path().join("shardgate.toml");
    std::fs::write(&path, config(port, &dir.path().join("state"))).unwrap();
    let mut child = start(&path, Some(failpoint));
    wait_until("the proxy listens", || proxy_client(port).map_some()).await;
    let client = proxy_client(port).await.unwrap();
    let sql = format!(
        "insert into tp_orders (id, v) values ({}, {value}), ({}, {value})",
        keys.0, keys.1
    );
    let write = tokio::spawn(async move { client.simple_query(&sql).await.map(|_| ()) });
    wait_until("both parts are prepared", || async {
        total("select count(*) from pg_prepared_xacts where gid like 'sg\\_3\\_%'").await == 2
    })
    .await;
    if failpoint == "twophase-decided" {
        let log = dir.path().join("state").join(shardgate::twophase::LOG_FILE);
        wait_until("the decision is logged", || {
            let log = log.clone();
            async move { std::fs::read_to_string(log).is_ok_and(|s| s.contains("commit sg_3_")) }
        })
        .await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let outcome = write.await.unwrap();
    assert!(outcome.is_err(), "the client saw its connection end");
    let sel = format!("select count(*) from tp_orders where v = {value}");
    assert_eq!(
        total(&sel).await,
        0,
        "nothing visible while the proxy is down"
    );

    let mut child = start(&path, None);
    wait_until("recovery finishes", || async {
        total("select count(*) from pg_prepared_xacts where gid like 'sg\\_3\\_%'").await == 0
    })
    .await;
    let visible = total(&sel).await;
    child.kill().unwrap();
    child.wait().unwrap();
    visible
}

trait MapSome {
    fn map_some(self) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = Option<tokio_postgres::Client>>> MapSome for F {
    async fn map_some(self) -> bool {
        self.await.is_some()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_phases_is_resolved_on_restart() {
    for s in servers() {
        s.psql(
            "app",
            "drop table if exists tp_orders; create table tp_orders (id int8 primary key, v int8)",
        )
        .unwrap();
    }
    let map = {
        let dir = tempfile::tempdir().unwrap();
        let text = config(1, dir.path());
        ShardMap::from_config(&shardgate::config::Config::parse(&text, "t.toml").unwrap()).unwrap()
    };
    let shard = |k: i64| map.locate(KeyType::Int8, &KeyValue::Int(k)).shard;
    let pair = |from: i64| {
        let b = (from + 1..from + 200)
            .find(|k| shard(*k) != shard(from))
            .unwrap();
        (from, b)
    };
    // Decided before the crash: committed on every shard after restart.
    assert_eq!(
        crash_between_phases("twophase-decided", pair(1), 100).await,
        2
    );
    // Prepared but not decided: rolled back everywhere.
    assert_eq!(
        crash_between_phases("twophase-prepared", pair(500), 200).await,
        0
    );
}
