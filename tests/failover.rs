//! Failover against real servers: a primary killed (kill -9, and `pg_ctl
//! stop -m immediate`) under a write load through shardgate, a primary
//! stopped (SIGSTOP) for less than the detection window, a planned
//! switchover under load, fencing of a returning old primary, a
//! restarted proxy that keeps the new topology, and a commit position the
//! dead primary can no longer tell.
//!
//! Every test has its own servers (`private_cluster`) and its own state
//! directory: they kill and promote servers.

mod common;

use common::{private_cluster, runtime, start_proxy_text, TestProxy};
use shardgate::local::PgServer;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Detection settings for the tests (the defaults, with a shorter probe
/// timeout so a stopped server is noticed in time).
const FAILOVER: &str = r#"
[health]
probe_interval = "100ms"
probe_timeout = "500ms"

[failover]
failed_probes = 3
unresponsive_for = "2s"
hold_time = "15s"
"#;

fn state_dir() -> std::path::PathBuf {
    // RUST_LOG=shardgate=info shows what the proxy did.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let d = tempfile::tempdir().unwrap().keep();
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A proxy config for shard s0 = `primary` with `replicas`, plus `more`
/// (extra shards, sections).
fn config(
    state: &std::path::Path,
    primary: &PgServer,
    replicas: &[PgServer],
    more: &str,
) -> String {
    format!(
        "{}{more}\n{FAILOVER}",
        shard_config(state, primary, replicas)
    )
}

/// The config up to the shard's replica list, for tests that write their
/// own `[health]` and `[failover]` sections.
fn shard_config(state: &std::path::Path, primary: &PgServer, replicas: &[PgServer]) -> String {
    let list: Vec<String> = replicas.iter().map(|r| format!("{:?}", r.addr())).collect();
    let base = common::config_text(
        &primary.addr(),
        "max_size = 20",
        &format!("state_dir = {:?}", state.display().to_string()),
    );
    format!("{base}replicas = [{}]\n", list.join(", "))
}

/// What a writer saw.
#[derive(Default, Debug)]
struct Ledger {
    acked: BTreeSet<i64>,
    errors: BTreeMap<String, usize>,
    /// Longest time between two acknowledged writes.
    max_gap: Duration,
}

/// Inserts ids from `first` upwards through the proxy on one connection
/// (alternating simple and extended protocol) until `stop`; never
/// reconnects.
fn spawn_writer(
    url: String,
    table: &'static str,
    hint: &'static str,
    first: i64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Ledger> {
    runtime().spawn(async move {
        let c = common::connect_url(&url).await.expect("writer connects");
        let mut ledger = Ledger::default();
        let mut last_ack = Instant::now();
        let mut id = first;
        while !stop.load(Ordering::Relaxed) {
            let r = if id % 2 == 0 {
                c.batch_execute(&format!("{hint}insert into {table}(id) values ({id})"))
                    .await
            } else {
                c.execute(
                    &format!("{hint}insert into {table}(id) values ($1)"),
                    &[&id],
                )
                .await
                .map(|_| ())
            };
            match r {
                Ok(()) => {
                    ledger.acked.insert(id);
                    ledger.max_gap = ledger.max_gap.max(last_ack.elapsed());
                    last_ack = Instant::now();
                }
                Err(e) => {
                    let code = e
                        .code()
                        .map_or("none".to_string(), |c| c.code().to_string());
                    *ledger.errors.entry(code).or_default() += 1;
                    if e.is_closed() {
                        panic!("the writer's connection was closed: {e}");
                    }
                }
            }
            id += 1;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ledger
    })
}

fn ids_on(server: &PgServer, table: &str) -> BTreeSet<i64> {
    server
        .psql("app", &format!("select id from {table}"))
        .unwrap()
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.parse().unwrap())
        .collect()
}

fn postmaster_pid(server: &PgServer) -> i32 {
    std::fs::read_to_string(server.data_dir.join("postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// The postmaster and all its children.
fn server_pids(server: &PgServer) -> Vec<i32> {
    let pm = postmaster_pid(server);
    let mut pids = vec![pm];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...
        let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let ppid: i32 = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        if ppid == pm {
            pids.push(pid);
        }
    }
    pids
}

fn signal(pids: &[i32], sig: nix::sys::signal::Signal) {
    for &p in pids {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), sig);
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn primary_of(p: &TestProxy, shard: usize) -> String {
    p.proxy.topology.load().shards[shard].primary.to_string()
}

fn make_ledger(primary: &PgServer, table: &str) {
    primary
        .psql(
            "app",
            &format!("create table {table} (id bigint primary key, at timestamptz default now())"),
        )
        .unwrap();
}

/// Waits until every replica has replayed the primary's current position.
fn wait_replicated(primary: &PgServer, replicas: &[PgServer]) {
    let lsn = primary
        .psql("postgres", "select pg_current_wal_lsn()")
        .unwrap();
    for r in replicas {
        wait_for("replication", Duration::from_secs(30), || {
            r.psql(
                "postgres",
                &format!("select pg_last_wal_replay_lsn() >= '{}'", lsn.trim()),
            )
            .unwrap()
            .trim()
                == "t"
        });
    }
}

#[test]
fn killed_primary_with_synchronous_replication_loses_no_acknowledged_write() {
    let (primary, replicas) = private_cluster(2);
    let names: Vec<String> = replicas.iter().map(|r| format!("sg_{}", r.port)).collect();
    primary
        .psql(
            "postgres",
            &format!(
                "alter system set synchronous_standby_names = 'FIRST 1 ({})'",
                names.join(", ")
            ),
        )
        .unwrap();
    primary.psql("postgres", "select pg_reload_conf()").unwrap();
    make_ledger(&primary, "ledger");
    wait_for("a synchronous standby", Duration::from_secs(30), || {
        primary
            .psql(
                "postgres",
                "select count(*) from pg_stat_replication where sync_state = 'sync'",
            )
            .unwrap()
            .trim()
            == "1"
    });
    let sync_name = primary
        .psql(
            "postgres",
            "select application_name from pg_stat_replication where sync_state = 'sync'",
        )
        .unwrap()
        .trim()
        .to_string();
    let sync_addr = replicas
        .iter()
        .find(|r| format!("sg_{}", r.port) == sync_name)
        .expect("the sync standby is one of ours")
        .addr();
    wait_replicated(&primary, &replicas);

    let state = state_dir();
    let text = config(&state, &primary, &replicas, "");
    let p = start_proxy_text(&text);
    wait_for(
        "probes of the sync standbys",
        Duration::from_secs(10),
        || {
            !p.proxy
                .health
                .server(&primary.addr().as_str().into())
                .sync_replication()
                .sync_standbys
                .is_empty()
        },
    );

    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(p.url("app", "app", "app"), "ledger", "", 1, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    signal(
        &[postmaster_pid(&primary)],
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for("a new primary", Duration::from_secs(20), || {
        primary_of(&p, 0) != primary.addr()
    });
    let failover_took = killed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let ledger = runtime().block_on(writer).unwrap();

    let report = p.proxy.failover.reports().pop().expect("a failover report");
    eprintln!("failover after {failover_took:?}: {report:?}");
    eprintln!(
        "writer: {} acknowledged, errors {:?}, longest gap {:?}",
        ledger.acked.len(),
        ledger.errors,
        ledger.max_gap
    );
    assert_eq!(report.outcome, "promoted");
    assert_eq!(
        report.new_primary, sync_addr,
        "only the synchronous standby may be chosen"
    );
    let new_primary = replicas.iter().find(|r| r.addr() == sync_addr).unwrap();
    let other = replicas.iter().find(|r| r.addr() != sync_addr).unwrap();
    // Writes went on after the failover on the same connection.
    let last_acked = *ledger.acked.last().unwrap();
    assert!(ledger.acked.len() > 50, "{ledger:?}");
    let on_new = ids_on(new_primary, "ledger");
    let missing: Vec<_> = ledger.acked.difference(&on_new).collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes missing: {missing:?}"
    );
    assert!(on_new.contains(&last_acked));
    // Every error says the connection was lost (class 08).
    assert!(
        ledger.errors.keys().all(|c| c.starts_with("08")),
        "{:?}",
        ledger.errors
    );
    // The other replica follows the new primary.
    wait_for(
        "the other replica to follow",
        Duration::from_secs(30),
        || ids_on(other, "ledger").contains(&last_acked),
    );
    let topo = p.proxy.topology.load();
    assert_eq!(&*topo.shards[0].replicas[0].addr, other.addr().as_str());
    assert_eq!(&*topo.fenced[0].addr, primary.addr().as_str());

    // The old primary comes back as a primary: it gets nothing, is
    // reported, and is made read-only.
    primary.start().unwrap();
    let before = ids_on(&primary, "ledger");
    wait_for("split brain reported", Duration::from_secs(10), || {
        !p.proxy.failover.split_brain().is_empty()
    });
    wait_for(
        "the fenced server made read-only",
        Duration::from_secs(10),
        || {
            primary
                .psql("app", "show default_transaction_read_only")
                .map(|s| s.trim() == "on")
                .unwrap_or(false)
        },
    );
    runtime().block_on(async {
        let c = p.connect().await;
        for id in 1_000_000..1_000_050i64 {
            c.execute("insert into ledger(id) values ($1)", &[&id])
                .await
                .unwrap();
        }
        for _ in 0..20 {
            c.query("select count(*) from ledger", &[]).await.unwrap();
        }
    });
    assert_eq!(
        ids_on(&primary, "ledger"),
        before,
        "the fenced server got writes"
    );
    assert!(ids_on(new_primary, "ledger").contains(&1_000_049));

    // A restarted proxy keeps the new topology, not the config's primary.
    let p2 = start_proxy_text(&text);
    assert_eq!(primary_of(&p2, 0), sync_addr);
    assert!(p2
        .proxy
        .topology
        .load()
        .fenced
        .iter()
        .any(|f| *f.addr == *primary.addr()));
    runtime().block_on(async {
        let c = p2.connect().await;
        c.execute("insert into ledger(id) values (2000000)", &[])
            .await
            .unwrap();
    });
    assert!(ids_on(new_primary, "ledger").contains(&2_000_000));
    assert!(!ids_on(&primary, "ledger").contains(&2_000_000));
}

#[test]
fn stopped_primary_fails_over_and_the_other_shard_carries_on() {
    let (primary, replicas) = private_cluster(2);
    let (other_primary, _) = private_cluster(0);
    make_ledger(&primary, "ledger");
    make_ledger(&other_primary, "ledger");
    wait_replicated(&primary, &replicas);
    let state = state_dir();
    let more = format!(
        r#"
[[shards]]
name = "s1"
primary = "{}"

[sharding]
buckets = 16

[[sharding.tables]]
name = "ledger"
column = "id"
type = "int8"
"#,
        other_primary.addr()
    );
    let p = start_proxy_text(&config(&state, &primary, &replicas, &more));
    let stop = Arc::new(AtomicBool::new(false));
    let url = p.url("app", "app", "app");
    let w0 = spawn_writer(
        url.clone(),
        "ledger",
        "/* shardgate: shard=s0 */ ",
        1,
        stop.clone(),
    );
    let w1 = spawn_writer(url, "ledger", "/* shardgate: shard=s1 */ ", 1, stop.clone());
    std::thread::sleep(Duration::from_secs(2));
    primary.stop("immediate").unwrap();
    wait_for("a new primary", Duration::from_secs(20), || {
        primary_of(&p, 0) != primary.addr()
    });
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let l0 = runtime().block_on(w0).unwrap();
    let l1 = runtime().block_on(w1).unwrap();
    eprintln!(
        "s0 writer: {} acked, errors {:?}, gap {:?}; s1 writer: {} acked, errors {:?}, gap {:?}",
        l0.acked.len(),
        l0.errors,
        l0.max_gap,
        l1.acked.len(),
        l1.errors,
        l1.max_gap
    );
    let report = p.proxy.failover.reports().pop().unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.outcome, "promoted");
    // The other shard saw nothing.
    assert!(l1.errors.is_empty(), "{:?}", l1.errors);
    assert_eq!(ids_on(&other_primary, "ledger"), l1.acked);
    // Shard s0 went on, on the new primary.
    let new_primary = replicas
        .iter()
        .find(|r| r.addr() == report.new_primary)
        .unwrap();
    let on_new = ids_on(new_primary, "ledger");
    let last = *l0.acked.last().unwrap();
    assert!(on_new.contains(&last));
    // Asynchronous replication: losses are possible in principle; after a
    // clean-ish immediate stop of an idle-ish server, report them.
    let lost = l0.acked.difference(&on_new).count();
    eprintln!("acknowledged writes missing on s0 after failover: {lost}");
    assert!(
        l0.errors.keys().all(|c| c.starts_with("08")),
        "{:?}",
        l0.errors
    );
}

#[test]
fn brief_sigstop_of_the_primary_is_not_failed_over() {
    let (primary, replicas) = private_cluster(1);
    make_ledger(&primary, "ledger");
    wait_replicated(&primary, &replicas);
    let state = state_dir();
    let p = start_proxy_text(&config(&state, &primary, &replicas, ""));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = spawn_writer(p.url("app", "app", "app"), "ledger", "", 1, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    let epoch = p.proxy.topology.load().epoch;
    let pids = server_pids(&primary);
    signal(&pids, nix::sys::signal::Signal::SIGSTOP);
    std::thread::sleep(Duration::from_millis(1200));
    signal(&pids, nix::sys::signal::Signal::SIGCONT);
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let ledger = runtime().block_on(writer).unwrap();
    eprintln!(
        "writer: {} acked, errors {:?}, gap {:?}",
        ledger.acked.len(),
        ledger.errors,
        ledger.max_gap
    );
    assert_eq!(p.proxy.topology.load().epoch, epoch, "no new topology");
    assert_eq!(primary_of(&p, 0), primary.addr());
    assert!(p.proxy.failover.reports().is_empty());
    assert!(ledger.errors.is_empty(), "{:?}", ledger.errors);
    assert!(
        ledger.max_gap >= Duration::from_secs(1),
        "the stop was felt"
    );
    assert_eq!(ids_on(&primary, "ledger"), ledger.acked);
}

#[test]
fn switchover_under_load_loses_nothing_and_errors_nothing() {
    let (primary, replicas) = private_cluster(2);
    make_ledger(&primary, "ledger");
    wait_replicated(&primary, &replicas);
    let state = state_dir();
    let p = start_proxy_text(&config(&state, &primary, &replicas, ""));
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..3)
        .map(|w| {
            spawn_writer(
                p.url("app", "app", "app"),
                "ledger",
                "",
                1 + w * 10_000_000,
                stop.clone(),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let target = replicas[1].addr();
    let report = runtime()
        .block_on(shardgate::failover::Failover::switchover(
            &p.proxy,
            "s0",
            Some(&target),
        ))
        .expect("switchover");
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let mut acked = BTreeSet::new();
    for w in writers {
        let l = runtime().block_on(w).unwrap();
        assert!(l.errors.is_empty(), "client errors: {:?}", l.errors);
        acked.extend(l.acked);
    }
    eprintln!(
        "switchover: {report:?}; {} writes acknowledged",
        acked.len()
    );
    assert_eq!(report.new_primary, target);
    assert_eq!(primary_of(&p, 0), target);
    let on_new = ids_on(&replicas[1], "ledger");
    let missing: Vec<_> = acked.difference(&on_new).collect();
    assert!(missing.is_empty(), "lost: {missing:?}");
    // The old primary was shut down cleanly; started again it is fenced
    // and read-only, and took no write after the pause.
    assert!(!primary.is_running());
    primary.start().unwrap();
    let on_old = ids_on(&primary, "ledger");
    assert!(on_old.is_subset(&on_new));
    // The other replica follows the new primary.
    let last = *acked.last().unwrap();
    wait_for(
        "the other replica to follow",
        Duration::from_secs(30),
        || ids_on(&replicas[0], "ledger").contains(&last),
    );
}

/// The drill's load on the quick-start shape: three shards with
/// `[sharding]`, an unsharded table addressed with a shard hint, four
/// clients on the extended protocol (tokio-postgres prepares, executes and
/// closes a statement per insert). Every id is written once, so a
/// duplicate-key error means a statement ran twice.
#[test]
fn killed_primary_on_a_sharded_config_never_runs_a_statement_twice() {
    let (primary, replicas) = private_cluster(2);
    let (s1, _) = private_cluster(0);
    let (s2, _) = private_cluster(0);
    // Synchronous (either replica): no acknowledged write may be lost.
    primary
        .psql(
            "postgres",
            &format!(
                "alter system set synchronous_standby_names = 'ANY 1 (sg_{}, sg_{})'",
                replicas[0].port, replicas[1].port
            ),
        )
        .unwrap();
    primary.psql("postgres", "select pg_reload_conf()").unwrap();
    make_ledger(&primary, "drill");
    wait_replicated(&primary, &replicas);
    let state = state_dir();
    let more = format!(
        "\n[[shards]]\nname = \"s1\"\nprimary = \"{}\"\n\n[[shards]]\nname = \"s2\"\nprimary = \"{}\"\n\n[sharding]\nbuckets = 1024\n",
        s1.addr(),
        s2.addr()
    );
    let p = start_proxy_text(&config(&state, &primary, &replicas, &more));
    wait_for(
        "probes of the sync standbys",
        Duration::from_secs(10),
        || {
            p.proxy
                .health
                .server(&primary.addr().as_str().into())
                .sync_replication()
                .sync_standbys
                .len()
                == 2
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (1..=4i64)
        .map(|client| {
            let (url, stop) = (p.url("app", "app", "app"), stop.clone());
            runtime().spawn(async move {
                let c = common::connect_url(&url).await.unwrap();
                let mut errors: BTreeMap<String, usize> = BTreeMap::new();
                let mut acked = BTreeSet::new();
                let mut seq = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let id = (client << 40) | seq;
                    match c
                        .execute(
                            "/* shardgate: shard=s0 */ insert into drill (id) values ($1)",
                            &[&id],
                        )
                        .await
                    {
                        Ok(_) => {
                            acked.insert(id);
                        }
                        Err(e) => {
                            let code = e.code().map_or("closed".into(), |c| c.code().to_string());
                            *errors.entry(code).or_default() += 1;
                            if e.is_closed() {
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                (acked, errors)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    signal(
        &[postmaster_pid(&primary)],
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for("a new primary", Duration::from_secs(20), || {
        primary_of(&p, 0) != primary.addr()
    });
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let mut errors: BTreeMap<String, usize> = BTreeMap::new();
    let mut acked = BTreeSet::new();
    for w in writers {
        let (a, e) = runtime().block_on(w).unwrap();
        acked.extend(a);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    eprintln!("{} acknowledged, errors {errors:?}", acked.len());
    assert!(
        errors.keys().all(|c| c.starts_with("08")),
        "a client saw {errors:?}"
    );
    let new = replicas
        .iter()
        .find(|r| r.addr() == primary_of(&p, 0))
        .unwrap();
    assert!(acked.is_subset(&ids_on(new, "drill")));
}

/// A replica that stopped following the primary (here: its
/// primary_conninfo points nowhere) lacks an unknown amount of data; it is
/// never promoted, even when it is the only replica left.
#[test]
fn a_replica_that_stopped_following_is_never_promoted() {
    let (primary, replicas) = private_cluster(2);
    make_ledger(&primary, "ledger");
    wait_replicated(&primary, &replicas);
    let stale = &replicas[0];
    stale
        .psql(
            "postgres",
            "alter system set primary_conninfo = 'host=127.0.0.1 port=1 user=postgres'",
        )
        .unwrap();
    stale.psql("postgres", "select pg_reload_conf()").unwrap();
    replicas[1].stop("fast").unwrap();
    let state = state_dir();
    let p = start_proxy_text(&config(&state, &primary, &replicas, ""));
    std::thread::sleep(Duration::from_secs(1));
    primary
        .psql("app", "insert into ledger(id) values (1)")
        .unwrap();
    signal(
        &[postmaster_pid(&primary)],
        nix::sys::signal::Signal::SIGKILL,
    );
    wait_for("a failover decision", Duration::from_secs(20), || {
        !p.proxy.failover.reports().is_empty()
    });
    let report = p.proxy.failover.reports().pop().unwrap();
    eprintln!("{report:?}");
    assert_eq!(report.outcome, "no_candidate");
    let c = report
        .candidates
        .iter()
        .find(|c| c.addr == stale.addr())
        .unwrap();
    assert!(c.excluded.contains("streaming"), "{c:?}");
    assert_eq!(primary_of(&p, 0), primary.addr());
    assert_eq!(
        stale
            .psql("postgres", "select pg_is_in_recovery()")
            .unwrap()
            .trim(),
        "t"
    );
}

/// `SHOW shardgate.last_commit_lsn` after a commit whose position the proxy
/// never learned (pinned to the primary, no probe sent), with the primary
/// gone before it could be asked: an error (08006), never a stale position.
#[test]
fn last_commit_lsn_unknown_when_the_primary_cannot_be_asked() {
    let (primary, replicas) = private_cluster(1);
    make_ledger(&primary, "ledger");
    wait_replicated(&primary, &replicas);
    let state = state_dir();
    // No failover, and no health probe after the write (a probe that
    // started after a commit also tells its position).
    let text = format!(
        "{}[health]\nprobe_interval = \"1h\"\n[failover]\nenabled = false\n",
        shard_config(&state, &primary, &replicas)
    );
    let p = start_proxy_text(&text);
    runtime().block_on(async {
        let c = common::connect_url(&p.url("app", "app", "app"))
            .await
            .expect("connects");
        c.batch_execute("set shardgate.target = primary")
            .await
            .unwrap();
        c.batch_execute("insert into ledger (id) values (1)")
            .await
            .unwrap();
        // Asked while the primary is up, the position is learned.
        let up = c
            .simple_query("show shardgate.last_commit_lsn")
            .await
            .expect("the primary answers");
        assert!(up
            .iter()
            .any(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_))));
        c.batch_execute("insert into ledger (id) values (2)")
            .await
            .unwrap();
        signal(&server_pids(&primary), nix::sys::signal::Signal::SIGKILL);
        let e = c
            .simple_query("show shardgate.last_commit_lsn")
            .await
            .expect_err("the position is unknown");
        assert_eq!(e.code().map(|c| c.code()), Some("08006"), "{e:?}");
        let message = e.as_db_error().map(|d| d.message().to_owned());
        assert!(
            message.as_deref().is_some_and(|m| m.contains("unknown")),
            "{message:?}"
        );
    });
}
