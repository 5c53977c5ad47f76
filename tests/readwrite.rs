//! Read/write splitting against a real primary with two streaming
//! replicas: where each kind of statement runs (checked by the port of the
//! server that answered), read-your-writes under deterministic replica lag,
//! lag exclusion, and a replica killed under read load.

mod common;

use common::{cluster, replicas, scalar, start_proxy_text, TestProxy};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

/// A proxy in front of the shared primary and both replicas.
fn proxy_with(extra: &str) -> TestProxy {
    let c = cluster();
    let r = replicas();
    let mut text = common::config_text(
        &c.primary.addr(),
        "max_size = 10\ncheckout_timeout = \"5s\"",
        "",
    );
    text.push_str(&format!(
        "replicas = [\"{}\", \"{}\"]\n{extra}\n",
        r[0].addr(),
        r[1].addr()
    ));
    start_proxy_text(&text)
}

/// The tests share the replicas and change them (delay, stop): one at a
/// time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn primary_port() -> u16 {
    cluster().primary.port
}

fn replica_ports() -> Vec<u16> {
    replicas().iter().map(|r| r.port).collect()
}

/// The port of the server that answered a simple query whose first column
/// is `inet_server_port()` (or `show port`).
async fn port(c: &Client, sql: &str) -> u16 {
    scalar(c, sql).await.parse().expect("a port")
}

/// The same through the extended protocol.
async fn port_ext(c: &Client, sql: &str) -> u16 {
    let row = c.query_one(sql, &[]).await.expect(sql);
    row.get::<_, i32>(0) as u16
}

/// Reads sent to the primary for `reason`, so far (all proxies of this
/// test process; the tests run one at a time).
fn fallbacks(reason: &str) -> u64 {
    shardgate::metrics::GLOBAL
        .read_fallbacks
        .with_label_values(&[reason])
        .get()
}

/// Checkouts the proxy made so far: (to the primary, to replicas).
fn routed(p: &TestProxy) -> (u64, u64) {
    let text = shardgate::metrics::render(&p.proxy);
    let mut out = (0, 0);
    for line in text
        .lines()
        .filter(|l| l.starts_with("shardgate_routed_total{"))
    {
        let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        if line.contains("route=\"primary\"") {
            out.0 += n as u64;
        } else {
            out.1 += n as u64;
        }
    }
    out
}

async fn ran_on_primary(c: &Client, sql: &str) -> bool {
    port(c, sql).await == primary_port()
}

/// Waits until `sql` (a SELECT of inet_server_port()) lands on a replica:
/// the proxy loads the function catalog and the first probes on start.
async fn wait_for_replica_reads(c: &Client) {
    common::eventually("reads reach a replica", || async {
        replica_ports().contains(&port(c, "select inet_server_port()").await)
    })
    .await;
}

/// A new session whose reads are at least as fresh as `lsn`
/// (`SET shardgate.min_lsn`).
async fn reader_at(p: &TestProxy, lsn: &str) -> Client {
    let c = p.connect().await;
    c.batch_execute(&format!("set shardgate.min_lsn = '{lsn}'"))
        .await
        .unwrap();
    c
}

/// Waits until both replicas have replayed everything the primary has now.
async fn wait_replicas_caught_up() {
    let d = common::direct().await;
    let lsn = scalar(&d, "select pg_current_wal_insert_lsn()::text").await;
    for r in replicas() {
        let url = format!(
            "host=127.0.0.1 port={} user=app password=app dbname=app",
            r.port
        );
        let rc = common::connect_url(&url).await.expect("replica connection");
        let sql = format!("select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn");
        common::eventually("replica caught up", || async {
            scalar(&rc, &sql).await == "t"
        })
        .await;
    }
}

fn setup_schema() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        replicas();
        cluster()
            .primary
            .psql(
                "app",
                "create table if not exists rwt (id bigint primary key, v int);
                 insert into rwt values (1, 1) on conflict do nothing;
                 create sequence if not exists rws;
                 create or replace function f_volatile() returns int language sql volatile as 'select 1';
                 create or replace function f_stable() returns int language sql stable as 'select 1';
                 create or replace function f_listed() returns int language sql volatile as 'select 1';
                 create or replace function f_mislabeled() returns bigint language sql stable as 'select nextval(''rws'')';
                 create or replace function f_slow() returns int language sql stable as 'select 1 from pg_sleep(0.5)';
                 grant all on all tables in schema public to public;
                 grant all on all sequences in schema public to public;",
            )
            .expect("schema");
    });
}

#[test]
fn routing_rules() {
    let _serial = serial();
    setup_schema();
    let p = proxy_with("[routing]\nread_only_functions = [\"f_listed\"]");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        wait_replicas_caught_up().await;
        let c = p.connect().await;
        wait_for_replica_reads(&c).await;
        let replica = |port: u16| replica_ports().contains(&port);

        // Read-only: replicas, in both protocols.
        for sql in [
            "select inet_server_port()",
            "select inet_server_port(), f_stable()",
            "select inet_server_port(), f_listed()",
            "select inet_server_port(), lower('X'), now(), random()",
            "select inet_server_port() from rwt where id = 1",
            "with x as (select 1) select inet_server_port() from x",
        ] {
            assert!(replica(port(&c, sql).await), "simple: {sql}");
            assert!(replica(port_ext(&c, sql).await), "extended: {sql}");
        }
        assert!(replica(port(&c, "show port").await), "SHOW");

        // Everything else: the primary.
        for sql in [
            "select inet_server_port() from rwt where id = 1 for update",
            "select inet_server_port() from rwt where id = 1 for share",
            "with u as (update rwt set v = v where id = 1 returning 1) select inet_server_port() from u",
            "select inet_server_port(), nextval('rws')",
            "select inet_server_port(), pg_try_advisory_xact_lock(1)",
            "select inet_server_port(), f_volatile()",
            "select inet_server_port(), set_config('application_name', 'x', true)",
            "insert into rwt values (1000 + nextval('rws'), 0) returning inet_server_port()",
            "update rwt set v = v where id = 1 returning inet_server_port()",
            "/* shardgate: primary */ select inet_server_port()",
            "select inet_server_port() from rwt where id = 1 for no key update",
            // sqlparser does not parse ROWS FROM: unparseable goes to the primary.
            "select inet_server_port() from rows from (generate_series(1, 1)) x",
        ] {
            // Fresh sessions: one that wrote reads from the primary anyway
            // (read-your-writes), which would hide a misrouted statement.
            let fresh = p.connect().await;
            assert!(ran_on_primary(&fresh, sql).await, "simple: {sql}");
            let fresh = p.connect().await;
            assert_eq!(port_ext(&fresh, sql).await, primary_port(), "extended: {sql}");
        }

        // Statements whose result cannot name the server: where they ran is
        // read from the proxy's per-route checkout counter.
        for (sql, expect_primary) in [
            ("explain analyze select 1", false),
            ("explain select * from rwt", false),
            ("explain analyze update rwt set v = v where id = 1", true),
            ("select 1 as x into temporary rw_into", true),
            ("listen rw_channel", true),
            ("notify rw_channel", true),
            ("select pg_advisory_lock(42), pg_advisory_unlock(42)", true),
        ] {
            let fresh = p.connect().await;
            let (primary_before, replica_before) = routed(&p);
            fresh.batch_execute(sql).await.expect(sql);
            let (primary_after, replica_after) = routed(&p);
            if expect_primary {
                assert_eq!((primary_after - primary_before, replica_after - replica_before), (1, 0), "{sql}");
            } else {
                assert_eq!((primary_after - primary_before, replica_after - replica_before), (0, 1), "{sql}");
            }
        }
        {
            let fresh = p.connect().await;
            let (primary_before, replica_before) = routed(&p);
            let sink = fresh.copy_in("copy rwt (id, v) from stdin").await.unwrap();
            futures::pin_mut!(sink);
            use futures::SinkExt;
            sink.send(bytes::Bytes::from_static(b"777777\t1\n")).await.unwrap();
            sink.finish().await.unwrap();
            let (primary_after, replica_after) = routed(&p);
            // tokio-postgres prepares the COPY first: two checkouts, both
            // on the primary.
            assert_eq!(primary_after - primary_before, 2, "COPY FROM STDIN");
            assert_eq!(replica_after, replica_before, "COPY FROM STDIN");
            fresh.batch_execute("delete from rwt where id = 777777").await.unwrap();
        }
        {
            // psql's \copy: COPY FROM STDIN in the simple protocol, with the
            // read-your-writes probe that must wait for the copy to end.
            let bin = shardgate::local::PgBin::find().expect("psql");
            let port = p.addr.port().to_string();
            let out = tokio::task::spawn_blocking(move || {
                use std::io::Write;
                let mut child = std::process::Command::new(bin.tool("psql"))
                    .args(["-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", &port, "-U", "app", "-d", "app"])
                    .args(["-c", "\\copy rwt (id, v) from stdin", "-c", "select count(*) from rwt where id between 888000 and 888999", "-At"])
                    .env("PGPASSWORD", "app")
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .unwrap();
                let mut stdin = child.stdin.take().unwrap();
                for i in 0..100 {
                    writeln!(stdin, "{}\t1", 888000 + i).unwrap();
                }
                writeln!(stdin, "\\.").unwrap();
                drop(stdin);
                child.wait_with_output().unwrap()
            })
            .await
            .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "psql \\copy: {}", String::from_utf8_lossy(&out.stderr));
            assert!(stdout.lines().any(|l| l.trim() == "100"), "{stdout}");
            c.batch_execute("delete from rwt where id between 888000 and 888999").await.unwrap();
        }

        // Transactions: one server for the whole block; the primary unless
        // declared read-only.
        c.batch_execute("begin").await.unwrap();
        assert!(ran_on_primary(&c, "select inet_server_port()").await);
        assert!(ran_on_primary(&c, "select inet_server_port()").await);
        c.batch_execute("commit").await.unwrap();
        // This session committed (its writes above, this block): its reads
        // stay on the primary until a replica has replayed that far.
        wait_for_replica_reads(&c).await;
        for begin in ["begin read only", "start transaction isolation level repeatable read, read only"] {
            c.batch_execute(begin).await.unwrap();
            let first = port(&c, "select inet_server_port()").await;
            assert!(replica(first), "{begin}");
            for _ in 0..5 {
                assert_eq!(port(&c, "select inet_server_port()").await, first, "{begin}: same server");
            }
            c.batch_execute("commit").await.unwrap();
        }
        let in_one = scalar(&c, "begin; set transaction read only; select inet_server_port()").await;
        assert!(replica(in_one.parse().unwrap()), "BEGIN; SET TRANSACTION READ ONLY");
        c.batch_execute("commit").await.unwrap();
        c.batch_execute("set default_transaction_read_only = on").await.unwrap();
        c.batch_execute("begin").await.unwrap();
        assert!(replica(port(&c, "select inet_server_port()").await), "default_transaction_read_only");
        c.batch_execute("commit").await.unwrap();
        c.batch_execute("reset default_transaction_read_only").await.unwrap();

        // Session overrides.
        wait_for_replica_reads(&c).await;
        c.batch_execute("set shardgate.target = primary").await.unwrap();
        assert_eq!(scalar(&c, "show shardgate.target").await, "primary");
        assert!(ran_on_primary(&c, "select inet_server_port()").await);
        assert!(replica(port(&c, "/* shardgate: replica */ select inet_server_port()").await));
        c.batch_execute("set shardgate.target = replica").await.unwrap();
        assert!(replica(port(&c, "select inet_server_port(), f_volatile()").await));
        // A write sent to a replica by the override is refused there
        // (25006) and re-run on the primary: the client sees the answer.
        assert!(ran_on_primary(&c, "select inet_server_port(), nextval('rws')").await);
        c.batch_execute("reset shardgate.target").await.unwrap();
        wait_for_replica_reads(&c).await;
        assert_eq!(scalar(&c, "show shardgate.target").await, "auto");
        // A function declared STABLE that writes goes to a replica by its
        // label, is refused there (25006), and runs on the primary instead.
        let retries = |p: &TestProxy| {
            let m = shardgate::metrics::render(&p.proxy);
            m.lines()
                .find(|l| l.starts_with("shardgate_read_retries_total "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let before = retries(&p);
        assert!(ran_on_primary(&c, "select inet_server_port(), f_mislabeled()").await);
        assert_eq!(retries(&p), before + 1.0);
        wait_for_replica_reads(&c).await;
        let e = c.batch_execute("set shardgate.target = sideways").await.unwrap_err();
        assert_eq!(common::code(&e), "22023");
        let e = c.batch_execute("show shardgate.nonsense").await.unwrap_err();
        assert_eq!(common::code(&e), "42704");

        // The same through the extended protocol (tokio-postgres prepares
        // every statement; psycopg 3 and asyncpg do too).
        c.execute("set shardgate.target = primary", &[]).await.unwrap();
        let shown: String = c.query_one("show shardgate.target", &[]).await.unwrap().get(0);
        assert_eq!(shown, "primary");
        assert_eq!(port_ext(&c, "select inet_server_port()").await, primary_port());
        let show = c.prepare("show shardgate.target").await.unwrap();
        c.execute("reset shardgate.target", &[]).await.unwrap();
        let shown: String = c.query_one(&show, &[]).await.unwrap().get(0);
        assert_eq!(shown, "auto");
        let e = c.execute("set shardgate.target = sideways", &[]).await.unwrap_err();
        assert_eq!(common::code(&e), "22023");
        c.batch_execute("begin").await.unwrap();
        let lsn: String = c.query_one("show shardgate.last_commit_lsn", &[]).await.unwrap().get(0);
        assert!(lsn.contains('/'), "{lsn}");
        let e = c.query_one("show shardgate.nonsense", &[]).await.unwrap_err();
        assert_eq!(common::code(&e), "42704");
        // Like any error, it aborted the transaction.
        let e = c.query_one("select 1", &[]).await.unwrap_err();
        assert_eq!(common::code(&e), "25P02");
        c.batch_execute("rollback").await.unwrap();
        wait_for_replica_reads(&c).await;

        // The same from the connection string (startup option).
        let pinned = common::connect_url(&format!(
            "{} options='-c shardgate.target=primary'",
            p.url("app", "app", "app")
        ))
        .await
        .unwrap();
        assert!(ran_on_primary(&pinned, "select inet_server_port()").await);
        assert_eq!(scalar(&pinned, "show shardgate.target").await, "primary");

        // Prepared statements reused across transactions keep their routes.
        let read = c.prepare("select inet_server_port()").await.unwrap();
        let lock = c.prepare("select inet_server_port() from rwt where id = 1 for update").await.unwrap();
        for _ in 0..5 {
            let r: i32 = c.query_one(&read, &[]).await.unwrap().get(0);
            assert!(replica(r as u16));
        }
        for _ in 0..5 {
            let l: i32 = c.query_one(&lock, &[]).await.unwrap().get(0);
            assert_eq!(l as u16, primary_port());
        }

        // Unnamed statements (Parse "" + Bind + Execute + Sync in one go):
        // the Bind refers to the Parse in the same batch, not to the
        // session's previous unnamed statement.
        let fresh = p.connect().await;
        let locked = fresh
            .query_typed("select inet_server_port() from rwt where id = 1 for update", &[])
            .await
            .unwrap();
        assert_eq!(locked[0].get::<_, i32>(0) as u16, primary_port());
        wait_for_replica_reads(&fresh).await;
        let read = fresh.query_typed("select inet_server_port()", &[]).await.unwrap();
        assert!(replica(read[0].get::<_, i32>(0) as u16), "unnamed read after an unnamed write");
        // Only prepared statements after a write: once the replicas have
        // replayed it, reads go back to them (the write's connection, kept
        // between transactions, does not keep them on the primary).
        let writer = p.connect().await;
        let (write, read) = (
            writer.prepare("update rwt set v = v where id = 1 returning inet_server_port()").await.unwrap(),
            writer.prepare("select inet_server_port()").await.unwrap(),
        );
        let wrote: i32 = writer.query_one(&write, &[]).await.unwrap().get(0);
        assert_eq!(wrote as u16, primary_port());
        wait_replicas_caught_up().await;
        common::eventually("prepared reads reach a replica after a write", || async {
            let r: i32 = writer.query_one(&read, &[]).await.unwrap().get(0);
            replica(r as u16)
        })
        .await;

        // A pipelined read and write (tokio-postgres pipelines concurrent
        // queries): the write must not follow the read to the replica.
        for _ in 0..20 {
            let (r, w) = tokio::join!(
                c.query_one("select inet_server_port()", &[]),
                c.query_one("update rwt set v = v + 1 where id = 1 returning inet_server_port()", &[]),
            );
            r.expect("pipelined read");
            let w: i32 = w.expect("pipelined write").get(0);
            assert_eq!(w as u16, primary_port());
        }

        // This proxy's probes know both replicas and their lag.
        for r in replicas() {
            let h = p.proxy.health.server(&r.addr().into());
            assert!(h.is_up() && h.in_recovery(), "{}", r.addr());
            assert_ne!(h.lag_bytes(), u64::MAX, "lag of {} never computed", r.addr());
        }
    });
}

/// One replica replays 300 ms late. Writers read back their own rows
/// thousands of times: never a stale read. Sessions that did not write keep
/// reading from replicas, and with `max_replica_lag` below the delay the
/// late replica gets no reads at all.
#[test]
fn read_your_writes_with_a_lagging_replica() {
    let _serial = serial();
    setup_schema();
    let r = &replicas()[0];
    r.psql(
        "postgres",
        "alter system set recovery_min_apply_delay = '300ms'",
    )
    .unwrap();
    r.psql("postgres", "select pg_reload_conf()").unwrap();
    let p = proxy_with("[routing]\nmax_replica_lag = \"1h\"");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stale = Arc::new(AtomicUsize::new(0));
    rt.block_on(async {
        wait_replicas_caught_up().await;
        cluster()
            .primary
            .psql(
                "app",
                "create table if not exists ryw (id bigint primary key, writer int)",
            )
            .unwrap();
        let c = p.connect().await;
        wait_for_replica_reads(&c).await;

        // A reader that never writes: its reads use replicas throughout.
        let reader = p.connect().await;
        let ryw_fallbacks = fallbacks("read_your_writes");
        let mut tasks = Vec::new();
        for w in 0..4i64 {
            let c = p.connect().await;
            let stale = stale.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..500i64 {
                    let id = w * 1_000_000 + i;
                    // Simple and extended protocol alternately.
                    if i % 2 == 0 {
                        c.batch_execute(&format!("insert into ryw values ({id}, {w})"))
                            .await
                            .unwrap();
                        let n =
                            scalar(&c, &format!("select count(*) from ryw where id = {id}")).await;
                        if n != "1" {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        c.execute("insert into ryw values ($1, $2)", &[&id, &(w as i32)])
                            .await
                            .unwrap();
                        let n: i64 = c
                            .query_one("select count(*) from ryw where id = $1", &[&id])
                            .await
                            .unwrap()
                            .get(0);
                        if n != 1 {
                            stale.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }));
        }
        let mut reader_on_replicas = 0;
        for _ in 0..50 {
            if replica_ports().contains(&port(&reader, "select inet_server_port()").await) {
                reader_on_replicas += 1;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(
            stale.load(Ordering::Relaxed),
            0,
            "stale reads of own writes"
        );
        assert!(
            fallbacks("read_your_writes") > ryw_fallbacks,
            "read-your-writes never held a read back"
        );
        assert_eq!(
            reader_on_replicas, 50,
            "a session that never wrote reads from replicas"
        );

        // A write after a pause, when the replica has replayed every
        // earlier position of the session: only this write's own position
        // keeps the read that follows it off the replica (300 ms behind).
        let paused = p.connect().await;
        for i in 0..4i64 {
            tokio::time::sleep(Duration::from_millis(900)).await;
            let id = 9_000_000 + i;
            let n: i64 = if i % 2 == 0 {
                paused
                    .execute("insert into ryw values ($1, 9)", &[&id])
                    .await
                    .unwrap();
                paused
                    .query_one("select count(*) from ryw where id = $1", &[&id])
                    .await
                    .unwrap()
                    .get(0)
            } else {
                paused
                    .batch_execute(&format!("insert into ryw values ({id}, 9)"))
                    .await
                    .unwrap();
                scalar(&paused, &format!("select count(*) from ryw where id = {id}"))
                    .await
                    .parse()
                    .unwrap()
            };
            assert_eq!(n, 1, "write {i} after a pause read back stale");
        }

        // Handing the position to another connection.
        // SHOW right after a write includes it (the proxy takes the answer
        // to the write's position probe first; this raced once): twenty
        // times over.
        for i in 2..22 {
            let lsn = scalar(&c, "show shardgate.last_commit_lsn").await;
            c.batch_execute(&format!("insert into ryw values (-{i}, -1)"))
                .await
                .unwrap();
            let after = scalar(&c, "show shardgate.last_commit_lsn").await;
            assert_ne!(lsn, after, "a commit moves the session's position");
        }
        c.batch_execute("insert into ryw values (-1, -1)")
            .await
            .unwrap();
        let after = scalar(&c, "show shardgate.last_commit_lsn").await;
        let other = reader_at(&p, &after).await;
        assert_eq!(
            scalar(&other, "select count(*) from ryw where id = -1").await,
            "1"
        );
        assert_eq!(scalar(&other, "show shardgate.min_lsn").await, after);

        // A session pinned to the primary does not probe its commits; a
        // replica hint right after a write still reads it (on the primary
        // until a health probe of the primary has passed the commit), and
        // later reads of it reach replicas again.
        let pinned = p.connect().await;
        pinned
            .batch_execute("set shardgate.target = primary")
            .await
            .unwrap();
        let hinted = |id: i64| {
            format!(
                "/* shardgate: replica */ select count(*)::text || ' ' || inet_server_port() from ryw where id = {id}"
            )
        };
        let mut hinted_on_replicas = 0;
        for i in 0..100i64 {
            let id = 4_000_000_000 + i;
            if i % 2 == 0 {
                pinned
                    .batch_execute(&format!("insert into ryw values ({id}, 7)"))
                    .await
                    .unwrap();
            } else {
                pinned
                    .execute("insert into ryw values ($1, 7)", &[&id])
                    .await
                    .unwrap();
            }
            let answer = scalar(&pinned, &hinted(id)).await;
            let (n, at) = answer.split_once(' ').unwrap();
            assert_eq!(n, "1", "stale read of an unprobed commit (on port {at})");
            hinted_on_replicas += usize::from(at != primary_port().to_string());
        }
        eprintln!("pinned session: {hinted_on_replicas} of 100 hinted read-backs on replicas");
        let last = 4_000_000_099i64;
        common::eventually("a hinted read of an old commit reaches a replica", || async {
            let answer = scalar(&pinned, &hinted(last)).await;
            let (n, at) = answer.split_once(' ').unwrap();
            assert_eq!(n, "1");
            at != primary_port().to_string()
        })
        .await;
        // Its position, simple and extended protocol, right after a write:
        // handed to another session, that session reads the write.
        for (i, extended) in [(1i64, false), (2, true)] {
            let id = 4_100_000_000 + i;
            // The insert's own WAL position, before its commit record.
            let inserted = scalar(
                &pinned,
                &format!("insert into ryw values ({id}, 7) returning pg_current_wal_insert_lsn()::text"),
            )
            .await;
            let lsn = if extended {
                pinned
                    .query_one("show shardgate.last_commit_lsn", &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0)
            } else {
                scalar(&pinned, "show shardgate.last_commit_lsn").await
            };
            assert_eq!(
                scalar(&pinned, &format!("select '{lsn}'::pg_lsn > '{inserted}'::pg_lsn")).await,
                "t",
                "SHOW (extended: {extended}) gave {lsn}, not past the insert at {inserted}"
            );
            let other = reader_at(&p, &lsn).await;
            assert_eq!(
                scalar(&other, &format!("select count(*) from ryw where id = {id}")).await,
                "1",
                "position {lsn} from SHOW (extended: {extended}) misses the commit"
            );
        }
    });

    // Lag limit below the delay: the late replica gets no reads while
    // writes keep it behind.
    let strict = proxy_with("[routing]\nmax_replica_lag = \"100ms\"");
    rt.block_on(async {
        let writer = strict.connect().await;
        let reader = strict.connect().await;
        wait_for_replica_reads(&reader).await;
        let late = r.port;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d2 = done.clone();
        let w = tokio::spawn(async move {
            let mut i = 0i64;
            while !d2.load(Ordering::Relaxed) {
                writer
                    .execute("insert into ryw values ($1, 9)", &[&(2_000_000_000 + i)])
                    .await
                    .unwrap();
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        // Let the lag build up and be probed.
        tokio::time::sleep(Duration::from_millis(800)).await;
        let (mut on_late, mut on_other) = (0, 0);
        let other = replicas()[1].port;
        for _ in 0..40 {
            let at = port(&reader, "select inet_server_port()").await;
            on_late += usize::from(at == late);
            on_other += usize::from(at == other);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done.store(true, Ordering::Relaxed);
        w.await.unwrap();
        assert_eq!(on_late, 0, "the lagging replica got reads");
        assert!(on_other > 0, "reads left the replicas altogether");
    });

    // The same write-then-read loop without read-your-writes: stale reads
    // appear (so the zero above is the feature, not the timing).
    let careless = proxy_with("[routing]\nmax_replica_lag = \"1h\"\nread_your_writes = false");
    rt.block_on(async {
        let c = careless.connect().await;
        wait_for_replica_reads(&c).await;
        let mut stale = 0;
        for i in 0..200i64 {
            let id = 3_000_000_000 + i;
            c.batch_execute(&format!("insert into ryw values ({id}, 0)"))
                .await
                .unwrap();
            if scalar(&c, &format!("select count(*) from ryw where id = {id}")).await != "1" {
                stale += 1;
            }
        }
        eprintln!("without read-your-writes: {stale} of 200 read-backs were stale");
        assert!(
            stale > 0,
            "no stale read without read-your-writes: the test proves nothing"
        );
    });
    r.psql("postgres", "alter system reset recovery_min_apply_delay")
        .unwrap();
    r.psql("postgres", "select pg_reload_conf()").unwrap();
}

/// A replica stopped with `-m immediate` under read load: reads outside
/// transactions see no error; the replica takes reads again once it is
/// back.
#[test]
fn killed_replica_under_read_load() {
    let _serial = serial();
    setup_schema();
    let p = proxy_with("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let victim = &replicas()[1];
    rt.block_on(async {
        wait_replicas_caught_up().await;
        let c = p.connect().await;
        wait_for_replica_reads(&c).await;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let errors = Arc::new(AtomicUsize::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for k in 0..6 {
            let c = p.connect().await;
            let (stop, errors, reads) = (stop.clone(), errors.clone(), reads.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = if k % 2 == 0 {
                        c.simple_query("select inet_server_port(), count(*) from rwt")
                            .await
                            .map(|_| ())
                    } else {
                        c.query("select inet_server_port(), count(*) from rwt", &[])
                            .await
                            .map(|_| ())
                    };
                    match r {
                        Ok(()) => reads.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("read failed: {e:?}");
                            errors.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    };
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = victim.clone();
        tokio::task::spawn_blocking(move || v.stop("immediate").unwrap())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let v = victim.clone();
        tokio::task::spawn_blocking(move || v.start().unwrap())
            .await
            .unwrap();
        common::eventually("the replica takes reads again", || async {
            let mut seen = false;
            for _ in 0..10 {
                seen |= port(&c, "select inet_server_port()").await == victim.port;
            }
            seen
        })
        .await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        assert!(reads.load(Ordering::Relaxed) > 100);
        assert_eq!(
            errors.load(Ordering::Relaxed),
            0,
            "client errors while a replica died"
        );
    });
}

/// Terminates (pg_terminate_backend) the backends running a statement
/// like `pattern` on whichever replica runs one, once: the replica's port.
async fn terminate_on_a_replica(pattern: &'static str) -> u16 {
    let sql = format!(
        "select count(pg_terminate_backend(pid)) from pg_stat_activity \
         where query like '{pattern}' and pid <> pg_backend_pid()"
    );
    for _ in 0..100 {
        for r in replicas() {
            let url = format!(
                "host=127.0.0.1 port={} user=app password=app dbname=app",
                r.port
            );
            let Ok(d) = common::connect_url(&url).await else {
                continue;
            };
            if scalar(&d, &sql).await != "0" {
                return r.port;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no statement like {pattern} ran on a replica");
}

/// Runs `read` (a read of `f_slow()` that answers with the server's port)
/// while its backend on a replica is terminated: it must answer from
/// another server, re-run once.
async fn rerun_when_its_replica_backend_dies(
    what: &str,
    read: impl std::future::Future<Output = u16>,
) {
    let retries = shardgate::metrics::GLOBAL.read_retries.get();
    let killer = tokio::spawn(terminate_on_a_replica("%f_slow()%"));
    let ran_on = tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer after the replica connection died"));
    let killed_on = killer.await.unwrap();
    assert_ne!(
        ran_on, killed_on,
        "{what}: answered by the terminated backend's server"
    );
    assert_eq!(
        shardgate::metrics::GLOBAL.read_retries.get(),
        retries + 1,
        "{what}: the read was re-run once"
    );
}

/// The server connection of a read in flight on a replica dies (its
/// backend is terminated): the read is re-run elsewhere and the client
/// gets its answer, in the simple and the extended protocol, on a session
/// that keeps its replica connection between reads.
#[test]
fn a_read_whose_replica_connection_dies_is_rerun() {
    let _serial = serial();
    setup_schema();
    let p = proxy_with("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        wait_replicas_caught_up().await;
        let c = p.connect().await;
        let read = c
            .prepare("select inet_server_port(), f_slow()")
            .await
            .unwrap();
        for protocol in ["simple", "extended", "prepared"] {
            wait_for_replica_reads(&c).await;
            let answer = async {
                match protocol {
                    "simple" => port(&c, "select inet_server_port(), f_slow()").await,
                    "extended" => port_ext(&c, "select inet_server_port(), f_slow()").await,
                    _ => c.query_one(&read, &[]).await.unwrap().get::<_, i32>(0) as u16,
                }
            };
            rerun_when_its_replica_backend_dies(protocol, answer).await;
        }
    });
}

/// With `[sharding]` on, an unnamed statement's Parse waits for its Bind
/// (whose key picks the shard), and both are handled in place. Its reads
/// go back to replicas after a write, and one whose replica connection
/// dies is re-run.
#[test]
fn unnamed_statements_with_sharding_on() {
    let _serial = serial();
    setup_schema();
    let p = proxy_with("\n[sharding]\nbuckets = 16");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        wait_replicas_caught_up().await;
        let c = p.connect().await;
        wait_for_replica_reads(&c).await;
        let first_port = |rows: Vec<tokio_postgres::Row>| rows[0].get::<_, i32>(0) as u16;
        let wrote = c
            .query_typed(
                "update rwt set v = v where id = 1 returning inet_server_port()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(first_port(wrote), primary_port());
        // Read-your-writes: right after the write, on the primary (no
        // probe has seen a replica replay the write yet).
        let read = c
            .query_typed("select inet_server_port()", &[])
            .await
            .unwrap();
        assert_eq!(first_port(read), primary_port());
        common::eventually("unnamed reads reach a replica after a write", || async {
            let read = c
                .query_typed("select inet_server_port()", &[])
                .await
                .unwrap();
            replica_ports().contains(&first_port(read))
        })
        .await;
        let read = async {
            let rows = c
                .query_typed("select inet_server_port(), f_slow()", &[])
                .await
                .unwrap();
            first_port(rows)
        };
        rerun_when_its_replica_backend_dies("unnamed", read).await;
    });
}

/// No replica can take reads (the only one is not running): reads go to
/// the primary, or fail with 57P03 when `routing.no_replica = "error"`;
/// writes are unaffected either way.
#[test]
fn no_replica_available() {
    let _serial = serial();
    setup_schema();
    let c = cluster();
    let dead = format!("127.0.0.1:{}", shardgate::local::free_port().unwrap());
    let config = |extra: &str| {
        let mut text = common::config_text(&c.primary.addr(), "max_size = 4", "");
        text.push_str(&format!("replicas = [\"{dead}\"]\n{extra}\n"));
        start_proxy_text(&text)
    };
    let fallback = config("");
    let strict = config("[routing]\nno_replica = \"error\"");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let a = fallback.connect().await;
        let b = strict.connect().await;
        // Give the probes time to find the replica down.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let down_before = fallbacks("down");
        for _ in 0..3 {
            assert!(ran_on_primary(&a, "select inet_server_port()").await);
        }
        common::eventually("57P03 once the catalog is loaded", || async {
            match b.simple_query("select inet_server_port()").await {
                Err(e) => common::code(&e) == "57P03",
                Ok(_) => false,
            }
        })
        .await;
        let e = b
            .query_one("select inet_server_port()", &[])
            .await
            .unwrap_err();
        assert_eq!(common::code(&e), "57P03");
        let message = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(message.contains("no replica can take reads"), "{message}");
        assert!(
            ran_on_primary(
                &b,
                "update rwt set v = v where id = 1 returning inet_server_port()"
            )
            .await
        );
        assert!(
            fallbacks("down") > down_before,
            "no fallback counted as down"
        );
    });
}

/// A simple-protocol BEGIN is answered by the proxy and sent with the next
/// statement: transactions behave exactly as before (atomic, errors abort
/// them, ROLLBACK undoes), an empty one never takes a server, and `BEGIN`
/// then `SET TRANSACTION READ ONLY` starts on a replica.
#[test]
fn deferred_begin() {
    let _serial = serial();
    setup_schema();
    let p = proxy_with("");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        wait_replicas_caught_up().await;
        let mut c = p.connect().await;
        wait_for_replica_reads(&c).await;
        let d = common::direct().await;

        c.batch_execute("begin").await.unwrap();
        c.batch_execute("set transaction read only").await.unwrap();
        let first = port(&c, "select inet_server_port()").await;
        assert!(
            replica_ports().contains(&first),
            "BEGIN, then SET TRANSACTION READ ONLY"
        );
        assert_eq!(port(&c, "select inet_server_port()").await, first);
        c.batch_execute("commit").await.unwrap();

        // Empty transactions take no server connection.
        let before = routed(&p);
        c.batch_execute("begin").await.unwrap();
        c.batch_execute("commit").await.unwrap();
        c.batch_execute("start transaction").await.unwrap();
        c.batch_execute("rollback").await.unwrap();
        assert_eq!(routed(&p), before);

        // Atomicity, through the simple and the extended protocol.
        c.batch_execute("begin").await.unwrap();
        c.batch_execute("insert into rwt values (555001, 1)")
            .await
            .unwrap();
        c.execute("insert into rwt values ($1, 1)", &[&555002i64])
            .await
            .unwrap();
        c.batch_execute("rollback").await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.execute("insert into rwt values ($1, 1)", &[&555003i64])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let rows: Vec<i64> = d
            .query(
                "select id from rwt where id between 555000 and 555999 order by id",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(rows, vec![555003]);

        // An error aborts the transaction like on Postgres.
        c.batch_execute("begin").await.unwrap();
        let e = c.batch_execute("select 1/0").await.unwrap_err();
        assert_eq!(common::code(&e), "22012");
        let e = c.batch_execute("select 1").await.unwrap_err();
        assert_eq!(common::code(&e), "25P02");
        c.batch_execute("rollback").await.unwrap();
        assert_eq!(scalar(&c, "select 1").await, "1");

        // Serializable is not deferred (a hot standby refuses it) and runs
        // on the primary.
        c.batch_execute("begin isolation level serializable")
            .await
            .unwrap();
        assert!(ran_on_primary(&c, "select inet_server_port()").await);
        c.batch_execute("commit").await.unwrap();
        d.batch_execute("delete from rwt where id between 555000 and 555999")
            .await
            .unwrap();
    });
}
