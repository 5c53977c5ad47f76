//! Test harness: real Postgres servers (started once per test binary, on
//! free ports in a temp dir, as the `postgres` OS user, stopped at exit) and
//! in-process proxies on a shared background runtime.

#![allow(dead_code)]

pub mod raw;

use shardgate::config::Config;
use shardgate::local::{free_port, make_postgres_dir, PgBin, PgServer, ServerOptions};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

pub struct Cluster {
    pub primary: PgServer,
    pub root: PathBuf,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static REPLICAS: OnceLock<Vec<PgServer>> = OnceLock::new();
static SHARDS: OnceLock<Vec<PgServer>> = OnceLock::new();
static TO_STOP: Mutex<Vec<PgServer>> = Mutex::new(Vec::new());
static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

extern "C" fn stop_servers() {
    let servers = std::mem::take(&mut *TO_STOP.lock().unwrap_or_else(|e| e.into_inner()));
    for s in servers {
        let _ = s.stop("immediate");
        let _ = std::fs::remove_dir_all(&s.data_dir);
    }
    if let Some(c) = CLUSTER.get() {
        let _ = std::fs::remove_dir_all(&c.root);
    }
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("shardgate-test-state-{}", std::process::id())),
    );
}

/// The shared primary, with logins for every server auth method:
/// app/app (SCRAM), md5user/md5pw (md5), pwuser/pwpw (cleartext),
/// trustuser (trust).
pub fn cluster() -> &'static Cluster {
    CLUSTER.get_or_init(|| {
        let bin = PgBin::find_or_install().expect("PostgreSQL available");
        let root = std::env::temp_dir().join(format!("shardgate-test-{}", std::process::id()));
        make_postgres_dir(&root, 0o755).expect("temp dir");
        let opts = ServerOptions {
            fast_unsafe: true,
            max_connections: 100,
            ..ServerOptions::default()
        };
        let primary = PgServer::init_primary(&bin, &root.join("primary"), free_port().unwrap(), &opts)
            .expect("primary starts");
        TO_STOP.lock().unwrap().push(primary.clone());
        // SAFETY: registering a plain extern "C" fn with no captured state.
        unsafe { libc::atexit(stop_servers) };
        let hba = primary.data_dir.join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).unwrap();
        std::fs::write(
            &hba,
            format!(
                "host all md5user 127.0.0.1/32 md5\nhost all pwuser 127.0.0.1/32 password\nhost all trustuser 127.0.0.1/32 trust\n{old}"
            ),
        )
        .unwrap();
        for sql in [
            "create role app login superuser password 'app'",
            "create database app owner app",
            "set password_encryption = 'md5'; create role md5user login password 'md5pw'",
            "create role pwuser login password 'pwpw'",
            "create role trustuser login",
            "create role liveuser login password 'livepw'",
            "grant all on database app to md5user, pwuser, trustuser, liveuser",
            "select pg_reload_conf()",
        ] {
            primary.psql("postgres", sql).expect("test roles created");
        }
        primary.psql("app", "grant all on schema public to public").expect("schema grant");
        Cluster { primary, root }
    })
}

/// Two streaming replicas of the shared primary (`pg_basebackup -R`),
/// made on first use.
pub fn replicas() -> &'static [PgServer] {
    REPLICAS.get_or_init(|| {
        let c = cluster();
        let opts = ServerOptions {
            fast_unsafe: true,
            max_connections: 100,
            ..ServerOptions::default()
        };
        // pg_basebackup logs in as postgres over TCP (SCRAM).
        c.primary
            .psql("postgres", "alter role postgres password 'postgres'")
            .expect("superuser password");
        (1..=2)
            .map(|i| {
                let r = PgServer::init_replica(
                    &c.primary,
                    &c.root.join(format!("replica{i}")),
                    free_port().unwrap(),
                    &opts,
                )
                .expect("replica starts");
                TO_STOP.lock().unwrap().push(r.clone());
                r.wait_ready(Duration::from_secs(60))
                    .expect("replica ready");
                r
            })
            .collect()
    })
}

/// Two more primaries (shards s1 and s2 next to the shared primary as s0),
/// each with the `app` login and database, made on first use.
pub fn shard_primaries() -> &'static [PgServer] {
    SHARDS.get_or_init(|| {
        let c = cluster();
        let bin = PgBin::find_or_install().expect("PostgreSQL available");
        let opts = ServerOptions {
            fast_unsafe: true,
            max_connections: 100,
            ..ServerOptions::default()
        };
        (1..=2)
            .map(|i| {
                let s = PgServer::init_primary(
                    &bin,
                    &c.root.join(format!("shard{i}")),
                    free_port().unwrap(),
                    &opts,
                )
                .expect("shard primary starts");
                TO_STOP.lock().unwrap().push(s.clone());
                for sql in [
                    "create role app login superuser password 'app'",
                    "create database app owner app",
                ] {
                    s.psql("postgres", sql).expect("shard roles created");
                }
                s
            })
            .collect()
    })
}

/// A primary of its own with `replicas` streaming replicas, for tests that
/// kill, stop or promote servers. Each has the `app` login (superuser) and
/// database; `postgres` logs in with password `postgres`.
pub fn private_cluster(replicas: usize) -> (PgServer, Vec<PgServer>) {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let c = cluster();
    let bin = PgBin::find_or_install().expect("PostgreSQL available");
    let opts = ServerOptions {
        fast_unsafe: true,
        max_connections: 100,
        ..ServerOptions::default()
    };
    let root = c.root.join(format!("private{n}"));
    make_postgres_dir(&root, 0o755).expect("private cluster dir");
    let primary = PgServer::init_primary(&bin, &root.join("primary"), free_port().unwrap(), &opts)
        .expect("private primary starts");
    TO_STOP.lock().unwrap().push(primary.clone());
    for sql in [
        "create role app login superuser password 'app'",
        "create database app owner app",
    ] {
        primary
            .psql("postgres", sql)
            .expect("private roles created");
    }
    let replicas = (1..=replicas)
        .map(|i| {
            let r = PgServer::init_replica(
                &primary,
                &root.join(format!("replica{i}")),
                free_port().unwrap(),
                &opts,
            )
            .expect("private replica starts");
            TO_STOP.lock().unwrap().push(r.clone());
            r.wait_ready(Duration::from_secs(60))
                .expect("private replica ready");
            r
        })
        .collect();
    (primary, replicas)
}

/// A proxy config over three shards — the shared primary (s0) and
/// `shard_primaries()` (s1, s2) — with `buckets` buckets owned unevenly
/// and interleaved (for 64: s0 0-9 and 40-63, s1 10-29, s2 30-39), the
/// given reference tables and sharded tables (name, column, type), and
/// `proxy_extra` in `[proxy]`.
pub fn three_shard_config(
    buckets: u32,
    proxy_extra: &str,
    reference: &[&str],
    tables: &[(&str, &str, &str)],
) -> String {
    let c = cluster();
    let s = shard_primaries();
    let (a, b, cut) = (buckets * 10 / 64, buckets * 30 / 64, buckets * 40 / 64);
    let mut text = config_text(
        &c.primary.addr(),
        "max_size = 10\ncheckout_timeout = \"5s\"",
        proxy_extra,
    );
    text.push_str(&format!(
        "buckets = [\"0-{}\", \"{cut}-{}\"]\n\n[[shards]]\nname = \"s1\"\nprimary = \"{}\"\nbuckets = [\"{a}-{}\"]\n\n[[shards]]\nname = \"s2\"\nprimary = \"{}\"\nbuckets = [\"{b}-{}\"]\n\n[sharding]\nbuckets = {buckets}\nreference_tables = {:?}\n",
        a - 1,
        buckets - 1,
        s[0].addr(),
        b - 1,
        s[1].addr(),
        cut - 1,
        reference
    ));
    for (name, column, ty) in tables {
        text.push_str(&format!(
            "\n[[sharding.tables]]\nname = \"{name}\"\ncolumn = \"{column}\"\ntype = \"{ty}\"\n"
        ));
    }
    text
}

pub fn runtime() -> &'static tokio::runtime::Runtime {
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

/// A config for the shared primary; `extra` is appended TOML (users, pool
/// settings). Users app (scram), md5client (md5 client auth, server login
/// app), trustclient (trust) and the server-auth users are included.
pub fn config_text(primary: &str, pool: &str, proxy_extra: &str) -> String {
    // State (the two-phase commit log) in the temp dir, not the working
    // directory, unless the test chose a place.
    let state = if proxy_extra.contains("state_dir") {
        String::new()
    } else {
        format!(
            "state_dir = \"{}\"",
            std::env::temp_dir()
                .join(format!("shardgate-test-state-{}", std::process::id()))
                .display()
        )
    };
    format!(
        r#"
[proxy]
listen = "127.0.0.1:0"
handshake_timeout = "3s"
shutdown_timeout = "5s"
{state}
{proxy_extra}

[pool]
{pool}

[[users]]
name = "app"
password = "app"

[[users]]
name = "md5client"
auth = "md5"
password = "md5secret"
server_user = "app"
server_password = "app"

[[users]]
name = "trustclient"
auth = "trust"
server_user = "app"
server_password = "app"

[[users]]
name = "md5user"
password = "md5pw"

[[users]]
name = "pwuser"
password = "pwpw"

[[users]]
name = "trustuser"
auth = "trust"

[[users]]
name = "liveuser"
password = "livepw"

[[shards]]
name = "s0"
primary = "{primary}"
"#
    )
}

pub struct TestProxy {
    pub addr: SocketAddr,
    pub proxy: Arc<shardgate::proxy::Proxy>,
}

/// Starts an in-process proxy in front of the shared primary.
pub fn start_proxy(pool: &str, proxy_extra: &str) -> TestProxy {
    let c = cluster();
    start_proxy_for(&c.primary.addr(), pool, proxy_extra)
}

pub fn start_proxy_for(primary: &str, pool: &str, proxy_extra: &str) -> TestProxy {
    start_proxy_text(&config_text(primary, pool, proxy_extra))
}

/// Starts an in-process proxy with this configuration text.
pub fn start_proxy_text(text: &str) -> TestProxy {
    start_proxy_config(Config::parse(text, "test.toml").expect("valid test config"))
}

/// Starts an in-process proxy with this configuration.
pub fn start_proxy_config(config: Config) -> TestProxy {
    // The proxy runs on its own runtime, not the test's.
    let rt = runtime();
    std::thread::scope(|s| {
        s.spawn(|| {
            rt.block_on(async {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let addr = listener.local_addr().unwrap();
                let proxy = shardgate::proxy::Proxy::new(config).expect("proxy state readable");
                shardgate::proxy::start(proxy.clone(), listener, None)
                    .await
                    .unwrap();
                TestProxy { addr, proxy }
            })
        })
        .join()
        .expect("proxy started")
    })
}

impl TestProxy {
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        let password = if password.is_empty() {
            String::new()
        } else {
            format!(" password={password}")
        };
        format!(
            "host=127.0.0.1 port={} user={user}{password} dbname={db}",
            self.addr.port()
        )
    }

    pub async fn connect(&self) -> tokio_postgres::Client {
        self.connect_as("app", "app", "app")
            .await
            .expect("connect through proxy")
    }

    pub async fn connect_as(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect_url(&self.url(user, password, db)).await
    }
}

/// A tokio-postgres client for `url`, its connection driven in the background.
pub async fn connect_url(url: &str) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A direct connection to the shared primary as the superuser app.
pub async fn direct() -> tokio_postgres::Client {
    let port = cluster().primary.port;
    connect_url(&format!(
        "host=127.0.0.1 port={port} user=app password=app dbname=app"
    ))
    .await
    .expect("direct connection to the test primary")
}

/// Server connections of `user` in a given state, as the server sees them.
pub async fn server_backends(user: &str, state: &str) -> i64 {
    let d = direct().await;
    d.query_one(
        "select count(*) from pg_stat_activity where usename = $1 and state = $2 and pid <> pg_backend_pid()",
        &[&user, &state],
    )
    .await
    .unwrap()
    .get(0)
}

/// The first row's first column of a simple query.
pub async fn scalar(c: &tokio_postgres::Client, sql: &str) -> String {
    c.simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => {
                Some(r.get(0).unwrap_or("NULL").to_owned())
            }
            _ => None,
        })
        .expect("a row")
}

/// Polls `f` until it is true or 10 s pass.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The SQLSTATE of a tokio-postgres error.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_owned())
        .unwrap_or_else(|| format!("no code: {e}"))
}
