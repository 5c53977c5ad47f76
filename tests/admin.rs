//! The admin API and the `shardgate admin` CLI against a real proxy process
//! and real servers: status, the token, a failover drill with --mode kill
//! (synchronous replication: nothing acknowledged may be missing), rejoin of
//! the killed primary with pg_rewind, and a switchover drill back to it.

mod common;

use common::private_cluster;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "test-token-0123456789";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn admin(config: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .arg("admin")
        .arg("--config")
        .arg(config)
        .args(args)
        .env("PGPASSWORD", "postgres")
        .output()
        .unwrap()
}

fn admin_json(config: &std::path::Path, args: &[&str]) -> serde_json::Value {
    admin_json_or_log(config, std::path::Path::new("/dev/null"), args)
}

/// `admin_json`, showing the proxy's log when the command fails.
fn admin_json_or_log(
    config: &std::path::Path,
    log: &std::path::Path,
    args: &[&str],
) -> serde_json::Value {
    let out = admin(config, args);
    assert!(
        out.status.success(),
        "shardgate admin {args:?} failed: {}{}\nproxy log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(log).unwrap_or_default()
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Waits until `primary` has a synchronous standby and the proxy's probes
/// have seen `replica` streaming twice since (so a whole probe round of the
/// primary, with its pg_stat_replication, came after it). A fixed sleep was
/// too short on a loaded machine: the drill then found no eligible standby.
fn wait_for_sync_standby(
    primary: &shardgate::local::PgServer,
    config: &std::path::Path,
    replica: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let sync = "select count(*) from pg_stat_replication where sync_state = 'sync'";
    while primary.psql("postgres", sync).unwrap().trim() != "1" {
        assert!(Instant::now() < deadline, "no synchronous standby");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..2 {
        let since = Instant::now();
        loop {
            let s = admin_json(config, &["--json", "status"]);
            let seen = s["shards"][0]["servers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|x| x["addr"] == replica)
                .filter(|x| x["streaming_from"].as_str().is_some_and(|f| !f.is_empty()))
                .and_then(|x| x["streamed_ms_ago"].as_u64())
                .is_some_and(|ago| u128::from(ago) < since.elapsed().as_millis());
            if seen {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "probes did not see {replica}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn primary(status: &serde_json::Value) -> String {
    status["shards"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["role"] == "primary")
        .unwrap()["addr"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn status_drill_rejoin_and_switchover_through_the_cli() {
    let (old, replicas) = private_cluster(1);
    let replica = &replicas[0];
    old.psql(
        "postgres",
        &format!(
            "alter system set synchronous_standby_names = 'sg_{}'",
            replica.port
        ),
    )
    .unwrap();
    old.psql("postgres", "select pg_reload_conf()").unwrap();

    let dir = tempfile::tempdir().unwrap();
    let port = shardgate::local::free_port().unwrap();
    let admin_port = shardgate::local::free_port().unwrap();
    let text = common::config_text(
        &old.addr(),
        "max_size = 10",
        &format!(
            "state_dir = {:?}",
            dir.path().join("state").display().to_string()
        ),
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    let text = format!(
        "{text}replicas = [\"{}\"]\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken = \"{TOKEN}\"\n\n[health]\nprobe_timeout = \"500ms\"\n",
        replica.addr()
    );
    let config = dir.path().join("shardgate.toml");
    std::fs::write(&config, &text).unwrap();
    let _proxy = Proc(
        Command::new(env!("CARGO_BIN_EXE_shardgate"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("proxy.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
        assert!(Instant::now() < deadline, "the admin API did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The failover promotes only a standby its probes saw synchronous: wait
    // for the primary to report one, then for two probe rounds after that.
    wait_for_sync_standby(&old, &config, &replica.addr());

    let s = admin_json(&config, &["--json", "status"]);
    assert_eq!(primary(&s), old.addr());
    assert_eq!(s["shards"][0]["servers"].as_array().unwrap().len(), 2);
    let table = admin(&config, &["status"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("topology epoch"));

    // A wrong token is refused.
    let out = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["admin", "--addr"])
        .arg(format!("http://127.0.0.1:{admin_port}"))
        .args(["--token", "wrong-token-wrong-token", "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A destructive drill needs its confirmation flag.
    let out = admin(
        &config,
        &["drill", "failover", "--shard", "s0", "--mode", "kill"],
    );
    assert!(!out.status.success());

    let url = format!("host=127.0.0.1 port={port} user=app password=app dbname=app");
    let log = dir.path().join("proxy.log");
    let r = admin_json_or_log(
        &config,
        &log,
        &[
            "--json",
            "drill",
            "failover",
            "--shard",
            "s0",
            "--mode",
            "kill",
            "--url",
            &url,
            "--i-understand-this-fails-the-primary",
        ],
    );
    eprintln!("kill drill: {r}");
    assert_eq!(r["new_primary"], replica.addr().as_str());
    assert_eq!(r["missing_acknowledged"], 0);
    assert!(r["acknowledged"].as_u64().unwrap() > 100);
    for code in r["errors"].as_object().unwrap().keys() {
        assert!(code.starts_with("08"), "client error {code}");
    }

    let s = admin_json(&config, &["--json", "status"]);
    assert_eq!(primary(&s), replica.addr());
    assert_eq!(s["fenced"][0]["addr"], old.addr().as_str());
    assert_eq!(s["last_failovers"][0]["outcome"], "promoted", "{s}");

    // The killed primary comes back as a replica of the new one.
    let out = admin(
        &config,
        &[
            "rejoin",
            "--server",
            &old.addr(),
            "--data-dir",
            old.data_dir.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "rejoin: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let s = admin_json(&config, &["--json", "status"]);
    assert!(s["fenced"].as_array().unwrap().is_empty(), "{s}");
    let servers = s["shards"][0]["servers"].as_array().unwrap();
    assert!(servers
        .iter()
        .any(|x| x["addr"] == old.addr().as_str() && x["role"] == "replica"));
    assert_eq!(
        old.psql("postgres", "select pg_is_in_recovery()")
            .unwrap()
            .trim(),
        "t"
    );

    // And a planned switchover back to it: no client errors, nothing lost.
    let r = admin_json_or_log(
        &config,
        &log,
        &[
            "--json",
            "drill",
            "failover",
            "--shard",
            "s0",
            "--mode",
            "switchover",
            "--url",
            &url,
        ],
    );
    eprintln!("switchover drill: {r}");
    assert_eq!(r["new_primary"], old.addr().as_str());
    assert_eq!(r["missing_acknowledged"], 0);
    assert!(r["errors"].as_object().unwrap().is_empty(), "{r}");
}
