//! The shardgate binary under signals: SIGTERM drains, SIGHUP reloads.

mod common;

use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Proc {
    child: Child,
    port: u16,
    config: std::path::PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

fn config_for(port: u16, app_password: &str) -> String {
    config_text(
        &cluster().primary.addr(),
        "max_size = 2",
        &format!("metrics_listen = \"127.0.0.1:{}\"", port + 1),
    )
    .replace(
        "listen = \"127.0.0.1:0\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    )
    .replacen(
        "name = \"app\"\npassword = \"app\"",
        &format!("name = \"app\"\npassword = \"{app_password}\"\nserver_password = \"app\""),
        1,
    )
}

fn spawn() -> Proc {
    // Two adjacent free ports: the proxy and its metrics endpoint.
    let port = loop {
        let p = shardgate::local::free_port().unwrap();
        if p < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok() {
            break p;
        }
    };
    let config = std::env::temp_dir().join(format!("shardgate-signals-{port}.toml"));
    std::fs::write(&config, config_for(port, "app")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shardgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "shardgate did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Proc {
        child,
        port,
        config,
    }
}

async fn connect(
    port: u16,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_url(&format!(
        "host=127.0.0.1 port={port} user=app password={password} dbname=app"
    ))
    .await
}

fn signal(p: &Proc, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.child.id() as i32), sig).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_transactions_finish() {
    cluster();
    let mut p = spawn();
    let busy = connect(p.port, "app").await.unwrap();
    let idle = connect(p.port, "app").await.unwrap();
    busy.batch_execute("create table if not exists t_sigterm (v int)")
        .await
        .unwrap();
    busy.batch_execute("begin; insert into t_sigterm values (1)")
        .await
        .unwrap();
    signal(&p, nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The idle client was told and closed; no new clients are accepted.
    assert!(idle.simple_query("select 1").await.is_err());
    assert!(connect(p.port, "app").await.is_err());
    // The open transaction still commits.
    busy.batch_execute("insert into t_sigterm values (2); commit")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            assert!(status.success(), "clean exit, got {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shardgate did not exit after draining"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n: i64 = direct()
        .await
        .query_one("select count(*) from t_sigterm", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n >= 2, "committed rows are there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_users_without_dropping_clients() {
    cluster();
    let p = spawn();
    let old = connect(p.port, "app").await.unwrap();
    std::fs::write(&p.config, config_for(p.port, "rotated")).unwrap();
    signal(&p, nix::sys::signal::Signal::SIGHUP);
    let mut reloaded = false;
    for _ in 0..50 {
        if connect(p.port, "rotated").await.is_ok() {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "new password accepted after SIGHUP");
    let e = connect(p.port, "app").await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    old.simple_query("select 1")
        .await
        .expect("existing client kept");
    // A broken file keeps the old configuration.
    std::fs::write(&p.config, "this is not toml [").unwrap();
    signal(&p, nix::sys::signal::Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    connect(p.port, "rotated")
        .await
        .expect("old config kept after a bad reload");
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_over_http() {
    cluster();
    let p = spawn();
    let c = connect(p.port, "app").await.unwrap();
    c.simple_query("select 1").await.unwrap();
    let health = http_get(p.port + 1, "/healthz").await;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok\n"),
        "{health}"
    );
    let metrics = http_get(p.port + 1, "/metrics").await;
    for name in [
        "shardgate_clients_active 1",
        "shardgate_queries_total{pool=\"app/app@",
        "shardgate_server_connections{pool=\"app/app@",
        "shardgate_query_duration_seconds_bucket",
        "shardgate_transaction_duration_seconds_count",
    ] {
        assert!(metrics.contains(name), "missing {name} in {metrics}");
    }
}
