//! Integration tests: real Postgres, real clients (tokio-postgres, psql,
//! pgbench, and a raw protocol client), shardgate in between.

mod common;

use common::raw::{self, Raw};
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_extended_and_prepared_queries() {
    let p = start_proxy("max_size = 2", "");
    let c = p.connect().await;
    let msgs = c.simple_query("select 1; select 'two'").await.unwrap();
    let rows: Vec<&str> = msgs
        .iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["1", "two"]);
    let r = c.query_one("select $1::int + 1", &[&41i32]).await.unwrap();
    assert_eq!(r.get::<_, i32>(0), 42);
    // A named statement reused across transactions, while other clients
    // move the server connections around.
    let stmt = c.prepare("select $1::text || '!'").await.unwrap();
    for i in 0..20 {
        let other = p.connect().await;
        other.simple_query("select 1").await.unwrap();
        let s: String = c
            .query_one(&stmt, &[&format!("x{i}")])
            .await
            .unwrap()
            .get(0);
        assert_eq!(s, format!("x{i}!"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_and_errors_inside_them() {
    let p = start_proxy("max_size = 2", "");
    let c = p.connect().await;
    c.batch_execute("create table if not exists t_tx (id int primary key)")
        .await
        .unwrap();
    c.batch_execute("truncate t_tx").await.unwrap();
    c.batch_execute("begin; insert into t_tx values (1)")
        .await
        .unwrap();
    let e = c
        .batch_execute("insert into t_tx values (1)")
        .await
        .unwrap_err();
    assert_eq!(code(&e), "23505");
    let e = c.batch_execute("select 1").await.unwrap_err();
    assert_eq!(code(&e), "25P02", "aborted transaction stays aborted");
    c.batch_execute("rollback").await.unwrap();
    let n: i64 = c
        .query_one("select count(*) from t_tx", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let mut c2 = p.connect().await;
    let tx = c2.transaction().await.unwrap();
    tx.execute("insert into t_tx values ($1)", &[&7i32])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let n: i64 = c
        .query_one("select count(*) from t_tx", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out_through_extended_protocol() {
    use futures::{SinkExt, StreamExt};
    let p = start_proxy("max_size = 2", "");
    let c = p.connect().await;
    c.batch_execute("create table if not exists t_copy (id int, v text); truncate t_copy")
        .await
        .unwrap();
    let sink = c.copy_in("copy t_copy from stdin").await.unwrap();
    futures::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..5000 {
        data.push_str(&format!("{i}\tvalue {i}\n"));
    }
    sink.send(bytes::Bytes::from(data)).await.unwrap();
    let n = sink.finish().await.unwrap();
    assert_eq!(n, 5000);
    let stream = c
        .copy_out("copy (select * from t_copy order by id) to stdout")
        .await
        .unwrap();
    futures::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 5000);
    // The session is still in step afterwards.
    let n: i64 = c
        .query_one("select count(*) from t_copy", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_the_right_server() {
    let p = start_proxy("max_size = 4", "");
    let c = p.connect().await;
    let token = c.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    });
    let started = std::time::Instant::now();
    let e = c.batch_execute("select pg_sleep(20)").await.unwrap_err();
    assert_eq!(code(&e), "57014");
    assert!(started.elapsed() < Duration::from_secs(15));
    canceller.await.unwrap();
    c.batch_execute("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_share_few_server_connections() {
    let p = start_proxy("max_size = 3\ncheckout_timeout = \"20s\"", "");
    let mut tasks = Vec::new();
    for i in 0..40 {
        let c = p.connect_as("app", "app", "app").await.unwrap();
        tasks.push(tokio::spawn(async move {
            let stmt = c.prepare("select $1::int * 2").await.unwrap();
            for j in 0..25 {
                let v: i32 = c.query_one(&stmt, &[&(i * 100 + j)]).await.unwrap().get(0);
                assert_eq!(v, (i * 100 + j) * 2);
                c.simple_query("begin; select 1; commit").await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let size = p.proxy.pools.all()[0].pool.status().size;
    assert!(size <= 3, "pool grew to {size}");
}

async fn show(c: &tokio_postgres::Client, what: &str) -> String {
    scalar(c, &format!("show {what}")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_settings_do_not_leak_between_clients() {
    let p = start_proxy("max_size = 1", "");
    let a = p.connect().await;
    let b = p.connect().await;
    a.batch_execute("set statement_timeout = '1234ms'")
        .await
        .unwrap();
    a.batch_execute("set application_name = 'client_a'")
        .await
        .unwrap();
    assert_eq!(show(&b, "statement_timeout").await, "0");
    assert_eq!(show(&b, "application_name").await, "");
    assert_eq!(show(&a, "statement_timeout").await, "1234ms");
    assert_eq!(show(&a, "application_name").await, "client_a");
    // A SET rolled back with its transaction is not replayed.
    a.batch_execute("begin; set work_mem = '7MB'; rollback")
        .await
        .unwrap();
    b.batch_execute("select 1").await.unwrap();
    assert_eq!(show(&a, "work_mem").await, "4MB");
    // SET LOCAL never outlives its transaction.
    a.batch_execute("begin; set local work_mem = '9MB'; commit")
        .await
        .unwrap();
    assert_eq!(show(&a, "work_mem").await, "4MB");
    a.batch_execute("reset all").await.unwrap();
    b.batch_execute("select 1").await.unwrap();
    assert_eq!(show(&a, "statement_timeout").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_errors_match_postgres() {
    let p = start_proxy("max_size = 2", "");
    let e = p.connect_as("app", "wrong", "app").await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    let e = p.connect_as("nobody", "x", "app").await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    let e = p.connect_as("app", "app", "no_such_db").await.unwrap_err();
    assert_eq!(code(&e), "3D000");
    // MD5 and trust client auth.
    let c = p.connect_as("md5client", "md5secret", "app").await.unwrap();
    c.simple_query("select 1").await.unwrap();
    let e = p.connect_as("md5client", "nope", "app").await.unwrap_err();
    assert_eq!(code(&e), "28P01");
    let c = p.connect_as("trustclient", "", "app").await.unwrap();
    c.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_auth_methods() {
    let p = start_proxy("max_size = 2", "");
    for (user, pw) in [("md5user", "md5pw"), ("pwuser", "pwpw"), ("trustuser", "")] {
        let c = p
            .connect_as(user, pw, "app")
            .await
            .unwrap_or_else(|e| panic!("{user}: {e}"));
        let who: String = c
            .query_one("select current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_parameters_are_reported_and_honoured() {
    let p = start_proxy("max_size = 1", "");
    let (mut r, msgs) = Raw::login(
        p.addr,
        &[
            ("DateStyle", "German, DMY"),
            ("application_name", "rawtest"),
            ("client_encoding", "LATIN1"),
        ],
    )
    .await;
    let status: Vec<(String, String)> = msgs
        .iter()
        .filter(|f| f.tag == b'S')
        .map(|f| {
            let (k, v) = shardgate::protocol::backend::parse_parameter_status(&f.body).unwrap();
            (k.to_owned(), v.to_owned())
        })
        .collect();
    let get = |k: &str| status.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(get("DateStyle").as_deref(), Some("German, DMY"));
    assert_eq!(get("client_encoding").as_deref(), Some("LATIN1"));
    assert_eq!(get("application_name").as_deref(), Some("rawtest"));
    assert!(get("server_version").is_some());
    assert!(msgs.iter().any(|f| f.tag == b'K'), "BackendKeyData sent");
    // Another client takes the only server connection in between.
    let other = p.connect().await;
    other.simple_query("select 1").await.unwrap();
    r.send(&[raw::query(
        "select to_char(date '2024-03-01', 'DD.MM.YYYY')::date::text, chr(233)",
    )])
    .await;
    let msgs = r.read_until_ready().await;
    let row = msgs.iter().find(|f| f.tag == b'D').expect("a row");
    assert!(
        row.body.windows(10).any(|w| w == b"01.03.2024"),
        "German DateStyle applied"
    );
    // 'é' encoded as LATIN1 is one byte 0xE9.
    assert!(
        row.body.ends_with(&[0xE9]),
        "client_encoding applied: {:?}",
        row.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_without_sync_gets_answers() {
    let p = start_proxy("max_size = 2", "");
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    r.send(&[
        raw::parse("", "select 42"),
        raw::bind(""),
        raw::execute(),
        raw::flush(),
    ])
    .await;
    let mut tags = String::new();
    while let Some(f) = r.read_within(Duration::from_secs(3)).await {
        tags.push(f.tag as char);
        if f.tag == b'C' {
            break;
        }
    }
    assert_eq!(tags, "12DC", "answers arrive after Flush, before any Sync");
    r.send(&[raw::sync()]).await;
    assert_eq!(Raw::tags(&r.read_until_ready().await), "Z");
}

/// The unnamed statement outlives its transaction, as on Postgres: a Bind
/// in a later transaction, on whatever server connection that gets, runs
/// the statement the client parsed last, also after it parsed another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unnamed_statement_outlives_its_transaction() {
    let p = start_proxy("max_size = 1", "");
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    let other = p.connect().await;
    let again = [raw::bind(""), raw::execute(), raw::sync()];
    for value in ["41", "42"] {
        let parse = raw::parse("", &format!("select {value}"));
        let first = [parse, raw::bind(""), raw::execute(), raw::sync()];
        one_row(&mut r, &first, "12DCZ", value).await;
        // Another client takes the only server connection in between.
        other.simple_query("select 0").await.unwrap();
        for _ in 0..2 {
            one_row(&mut r, &again, "2DCZ", value).await;
            other.simple_query("select 0").await.unwrap();
        }
    }
}

/// Sends `frames`; the answer's messages are `tags`, with one row ending
/// in `value`.
async fn one_row(r: &mut Raw, frames: &[shardgate::protocol::Frame], tags: &str, value: &str) {
    r.send(frames).await;
    let msgs = r.read_until_ready().await;
    assert_eq!(Raw::tags(&msgs), tags);
    let row = msgs.iter().find(|f| f.tag == b'D').expect("a row");
    assert!(
        row.body.ends_with(value.as_bytes()),
        "{value} expected: {:?}",
        row.body
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_and_parse_answers_stay_in_order() {
    let p = start_proxy("max_size = 1", "");
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    // Prepare s1 (reaches the server), then in one pipeline: re-use it,
    // close it, and parse it again (the proxy answers some of these itself).
    r.send(&[raw::parse("s1", "select 1"), raw::sync()]).await;
    assert_eq!(Raw::tags(&r.read_until_ready().await), "1Z");
    r.send(&[
        raw::bind("s1"),
        raw::execute(),
        raw::close_statement("s1"),
        raw::parse("s1", "select 1"),
        raw::bind("s1"),
        raw::execute(),
        raw::close_statement("nope"),
        raw::sync(),
    ])
    .await;
    assert_eq!(Raw::tags(&r.read_until_ready().await), "2DC312DC3Z");
    // A duplicate name fails like Postgres, and the rest up to Sync is skipped.
    r.send(&[
        raw::parse("s1", "select 2"),
        raw::bind("s1"),
        raw::execute(),
        raw::sync(),
    ])
    .await;
    let msgs = r.read_until_ready().await;
    assert_eq!(Raw::tags(&msgs), "EZ");
    assert_eq!(
        shardgate::protocol::backend::parse_error(&msgs[0].body).code,
        "42P05"
    );
    // Close alone with no server held is answered by the proxy.
    r.send(&[raw::close_statement("s1"), raw::sync()]).await;
    assert_eq!(Raw::tags(&r.read_until_ready().await), "3Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_statement_with_begin_stays_in_step() {
    let p = start_proxy("max_size = 1", "");
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    r.send(&[raw::query("begin; select 1; select 2")]).await;
    let msgs = r.read_until_ready().await;
    assert_eq!(Raw::tags(&msgs), "CTDCTDCZ");
    assert_eq!(&msgs.last().unwrap().body[..], b"T");
    r.send(&[raw::query("select 3; commit")]).await;
    let msgs = r.read_until_ready().await;
    assert_eq!(Raw::tags(&msgs), "TDCCZ");
    assert_eq!(&msgs.last().unwrap().body[..], b"I");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_timeout_is_53300() {
    let p = start_proxy("max_size = 1\ncheckout_timeout = \"300ms\"", "");
    let holder = p.connect().await;
    holder.batch_execute("begin; select 1").await.unwrap();
    let waiter = p.connect_as("app", "app", "app").await;
    // Startup itself needs a server connection: it may fail, or the query does.
    let e = match waiter {
        Err(e) => e,
        Ok(w) => w.batch_execute("select 1").await.unwrap_err(),
    };
    assert_eq!(code(&e), "53300");
    holder.batch_execute("commit").await.unwrap();
    p.connect().await.batch_execute("select 1").await.unwrap();
}

const TEN_S: Duration = Duration::from_secs(10);

/// A session keeps its wait timer from one checkout to the next: a wait
/// that got a connection leaves it set, and a later wait of the same
/// session still ends in 53300 at its own deadline, not never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_wait_of_the_same_session_still_times_out() {
    let p = start_proxy("max_size = 1\ncheckout_timeout = \"1s\"", "");
    let waiter = std::sync::Arc::new(p.connect().await);
    let holder = p.connect().await;
    let hold = "begin; select 1";
    // First wait: the holder commits while the waiter waits.
    holder.batch_execute(hold).await.unwrap();
    let w = waiter.clone();
    let first = tokio::spawn(async move { w.batch_execute("select 1").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    holder.batch_execute("commit").await.unwrap();
    tokio::time::timeout(TEN_S, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Second wait: nobody lets go.
    holder.batch_execute(hold).await.unwrap();
    let e = tokio::time::timeout(TEN_S, waiter.batch_execute("select 1"))
        .await
        .expect("the second wait ended")
        .unwrap_err();
    assert_eq!(code(&e), "53300");
    holder.batch_execute("commit").await.unwrap();
    tokio::time::timeout(TEN_S, waiter.batch_execute("select 1"))
        .await
        .unwrap()
        .unwrap();
}

/// The pool of the test user `app` (database `app`).
fn app_pool(p: &TestProxy) -> std::sync::Arc<shardgate::backend::pool::PoolEntry> {
    p.proxy
        .pools
        .all()
        .into_iter()
        .find(|e| e.key.user == "app" && e.key.database == "app")
        .expect("the app pool")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_keeps_its_server_connection_between_transactions_until_idle() {
    let p = start_proxy("max_size = 3", "");
    let c = p.connect().await;
    let pid = scalar(&c, "select pg_backend_pid()").await;
    let pool = app_pool(&p);
    // Kept as the client's spare (just after the client has its answer):
    // checked out, but no transaction runs.
    eventually("the client keeps a spare", || async {
        pool.spares() == 1 && pool.in_use() == 0
    })
    .await;
    for _ in 0..5 {
        assert_eq!(scalar(&c, "select pg_backend_pid()").await, pid);
    }
    // Another client takes the spare rather than a new connection: spares
    // do not make the pool grow.
    let other = p.connect().await;
    assert_eq!(scalar(&other, "select pg_backend_pid()").await, pid);
    assert_eq!(pool.pool.status().size, 1);
    drop(other);
    // The other client's session ends in its own task: wait until its
    // connection is back in the pool (else the next checkout may open a
    // new one, as it should).
    eventually("the other client's connection is back", || async {
        pool.spares() == 0 && pool.in_use() == 0
    })
    .await;
    assert_eq!(scalar(&c, "select pg_backend_pid()").await, pid);
    // (Retried: other tests' proxies share the metric's label.)
    eventually("the spare is in /metrics", || async {
        let spare = shardgate::metrics::render(&p.proxy).lines().any(|l| {
            l.starts_with("shardgate_server_connections{") && l.ends_with("state=\"spare\"} 1")
        });
        spare && pool.spares() == 1
    })
    .await;
    // Idle for a while, it goes back to the pool; the next transaction
    // takes it out of the pool again.
    eventually("an idle client's spare goes back to the pool", || async {
        pool.spares() == 0 && pool.pool.status().available == 1
    })
    .await;
    assert_eq!(scalar(&c, "select pg_backend_pid()").await, pid);
    // A client that leaves gives its spare back at once.
    drop(c);
    eventually("the spare of a client that left is pooled", || async {
        pool.spares() == 0 && pool.pool.status().available == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spare_goes_back_when_another_client_needs_a_connection() {
    // One server connection, and a wait far shorter than the 1 s after
    // which an idle spare goes back on its own: the other client gets the
    // connection only if the spare is taken back for it.
    let p = start_proxy("max_size = 1\ncheckout_timeout = \"500ms\"", "");
    let a = p.connect().await;
    a.batch_execute("set application_name = 'client a'")
        .await
        .unwrap();
    assert_eq!(scalar(&a, "select 1").await, "1");
    let pool = app_pool(&p);
    // (The proxy keeps it just after the client has its answer.)
    eventually("client a keeps a spare", || async { pool.spares() == 1 }).await;
    let b = p.connect().await;
    b.batch_execute("set application_name = 'client b'")
        .await
        .unwrap();
    // Both alternate on the one connection, each with its own settings.
    for i in 0..10 {
        let sql = "select current_setting('application_name')";
        assert_eq!(scalar(&a, sql).await, "client a", "round {i}");
        assert_eq!(scalar(&b, sql).await, "client b", "round {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keep_spare_the_connection_goes_back_after_each_transaction() {
    let p = start_proxy("max_size = 2\nkeep_spare = false", "");
    let c = p.connect().await;
    assert_eq!(scalar(&c, "select 1").await, "1");
    let pool = app_pool(&p);
    eventually("the connection is pooled", || async {
        pool.pool.status().available == 1
    })
    .await;
    assert_eq!(pool.spares(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_down_gives_connection_error_not_hang() {
    let port = shardgate::local::free_port().unwrap();
    let p = start_proxy_for(
        &format!("127.0.0.1:{port}"),
        "max_size = 1\nconnect_timeout = \"2s\"",
        "",
    );
    let started = std::time::Instant::now();
    let e = p.connect_as("app", "app", "app").await.unwrap_err();
    assert_eq!(code(&e), "08001");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The proxy keeps serving.
    let e = p.connect_as("app", "app", "app").await.unwrap_err();
    assert_eq!(code(&e), "08001");
}

async fn expect_error_or_close(r: &mut Raw, want: &str) {
    match r.read().await {
        None => {}
        Some(f) => {
            assert_eq!(f.tag, b'E', "expected ErrorResponse");
            let e = shardgate::protocol::backend::parse_error(&f.body);
            assert_eq!(e.code, want, "{}", e.message);
            assert!(r.read().await.is_none(), "connection closed after FATAL");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_cleanly() {
    let p = start_proxy("max_size = 2", "max_message_size = 65536");
    // Garbage instead of a startup packet.
    let mut r = Raw::open(p.addr).await;
    r.send_bytes(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    expect_error_or_close(&mut r, "08P01").await;
    // Startup length that is negative / tiny / huge.
    for len in [-5i32, 3, 1 << 30] {
        let mut r = Raw::open(p.addr).await;
        r.send_bytes(&len.to_be_bytes()).await;
        r.send_bytes(&[0u8; 8]).await;
        expect_error_or_close(&mut r, "08P01").await;
    }
    // After login: message lengths that are negative, tiny, or over the cap.
    for header in [
        [b'Q', 0xff, 0xff, 0xff, 0xf0],
        [b'Q', 0, 0, 0, 2],
        [b'Q', 0x10, 0, 0, 0],
    ] {
        let (mut r, _) = Raw::login(p.addr, &[]).await;
        r.send_bytes(&header).await;
        expect_error_or_close(&mut r, "08P01").await;
    }
    // Unknown message type.
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    r.send_bytes(&[b'y', 0, 0, 0, 4]).await;
    expect_error_or_close(&mut r, "08P01").await;
    // Malformed Parse.
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    r.send_bytes(&[b'P', 0, 0, 0, 6, b'x', 0]).await;
    expect_error_or_close(&mut r, "08P01").await;
    // Everyone else is still served, and nothing leaked.
    let c = p.connect().await;
    c.simple_query("select 1").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vanishing_clients_do_not_leak_server_connections() {
    let p = start_proxy("max_size = 1\ncheckout_timeout = \"5s\"", "");
    let c = p.connect().await;
    c.batch_execute("create table if not exists t_vanish (v text)")
        .await
        .unwrap();
    drop(c);
    // Mid-transaction.
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    r.send(&[raw::query("begin; insert into t_vanish values ('lost')")])
        .await;
    r.read_until_ready().await;
    drop(r);
    // Mid-COPY.
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    r.send(&[raw::query("copy t_vanish from stdin")]).await;
    let f = r.read().await.unwrap();
    assert_eq!(f.tag, b'G');
    r.send(&[shardgate::protocol::Frame {
        tag: b'd',
        body: bytes::Bytes::from_static(b"half a row"),
    }])
    .await;
    drop(r);
    // The single pooled connection must be usable and clean.
    let c = p.connect().await;
    assert_eq!(
        scalar(&c, "select count(*) from t_vanish where v = 'lost'").await,
        "0"
    );
    eventually("no server connection left idle in transaction", || async {
        server_backends("trustclient", "idle in transaction").await == 0
            && server_backends("app", "idle in transaction").await == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_and_pgbench_work_through_the_proxy() {
    let p = start_proxy("max_size = 4", "");
    let port = p.addr.port().to_string();
    let pg = shardgate::local::PgBin::find().unwrap();
    let out = tokio::process::Command::new(pg.tool("psql"))
        .args([
            "-X",
            "-A",
            "-t",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-d",
            "app",
        ])
        .args([
            "-c",
            "select 6*7",
            "-c",
            "begin",
            "-c",
            "select 1/0",
            "-c",
            "rollback",
        ])
        .env("PGPASSWORD", "app")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("42"), "{stdout} {stderr}");
    assert!(stderr.contains("division by zero"), "{stderr}");
    let pgbench = |args: Vec<&'static str>| {
        let port = port.clone();
        let tool = pg.tool("pgbench");
        async move {
            let out = tokio::process::Command::new(tool)
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "app"])
                .args(&args)
                .arg("app")
                .env("PGPASSWORD", "app")
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "pgbench {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        }
    };
    pgbench(vec!["-i", "-s", "1", "-q"]).await;
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(vec!["-c", "8", "-j", "2", "-t", "50", "-M", mode]).await;
        assert!(out.contains("number of failed transactions: 0"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_mode_cleans_connections_between_clients() {
    let p = start_proxy("max_size = 1", "pool_mode = \"session\"");
    {
        let a = p.connect().await;
        a.batch_execute("set search_path = 'nowhere'; prepare q as select 1")
            .await
            .unwrap();
        let stmt = a.prepare("select $1::int").await.unwrap();
        let v: i32 = a.query_one(&stmt, &[&5i32]).await.unwrap().get(0);
        assert_eq!(v, 5);
        assert_eq!(scalar(&a, "execute q").await, "1");
    }
    let b = p.connect().await;
    assert_eq!(show(&b, "search_path").await, "\"$user\", public");
    let e = b.batch_execute("execute q").await.unwrap_err();
    assert_eq!(
        code(&e),
        "26000",
        "prepared statements of the previous client are gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_queries_and_errors() {
    // Counters are process-wide; other tests run in parallel. SQLSTATE class
    // P0 (raised by PL/pgSQL) is produced by this test only, so its count
    // must rise by exactly the errors raised here.
    fn p0_errors() -> u64 {
        shardgate::metrics::GLOBAL
            .errors
            .with_label_values(&["P0"])
            .get()
    }
    let p = start_proxy("max_size = 1", "");
    let c = p.connect().await;
    let before = p0_errors();
    for _ in 0..3 {
        let e = c
            .simple_query("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = 'P0002'; END $$")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "P0002");
    }
    assert_eq!(p0_errors() - before, 3);
    let text = shardgate::metrics::render(&p.proxy);
    for name in [
        "shardgate_errors_total{class=\"P0\"}",
        "shardgate_queries_total{pool=",
        "shardgate_server_connections{pool=",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_for_unknown_databases_are_forgotten() {
    let p = start_proxy("max_size = 1", "");
    for i in 0..5 {
        let e = p
            .connect_as("app", "app", &format!("nope_{i}"))
            .await
            .unwrap_err();
        assert_eq!(code(&e), "3D000");
    }
    let c = p.connect().await;
    c.simple_query("select 1").await.unwrap();
    eventually("unused pools are dropped by maintenance", || async {
        p.proxy.pools.all().len() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_and_gssenc_requests_are_declined_then_startup_works() {
    let p = start_proxy("max_size = 1", "");
    for code in [80877103i32, 80877104] {
        let mut r = Raw::open(p.addr).await;
        let mut req = 8i32.to_be_bytes().to_vec();
        req.extend_from_slice(&code.to_be_bytes());
        r.send_bytes(&req).await;
        let mut answer = [0u8; 1];
        use tokio::io::AsyncReadExt;
        r.stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
        r.send_bytes(&raw::startup_packet(&[
            ("user", "trustclient"),
            ("database", "app"),
        ]))
        .await;
        let msgs = r.read_until_ready().await;
        assert_eq!(msgs.last().unwrap().tag, b'Z');
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_pass_through() {
    let p = start_proxy("max_size = 1", "");
    let (mut r, _) = Raw::login(p.addr, &[]).await;
    r.send(&[raw::query(
        "DO $$ BEGIN RAISE NOTICE 'hello from the server'; END $$",
    )])
    .await;
    let msgs = r.read_until_ready().await;
    let notice = msgs
        .iter()
        .find(|f| f.tag == b'N')
        .expect("a NoticeResponse");
    let n = shardgate::protocol::backend::parse_error(&notice.body);
    assert_eq!(n.message, "hello from the server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_idle_server_connections_are_replaced() {
    let p = start_proxy("max_size = 2\nliveness_check_after = \"0s\"", "");
    let c = p.connect_as("liveuser", "livepw", "app").await.unwrap();
    c.simple_query("select 1").await.unwrap();
    let d = direct().await;
    d.simple_query(
        "select pg_terminate_backend(pid) from pg_stat_activity where usename = 'liveuser'",
    )
    .await
    .unwrap();
    eventually("the server has closed the pooled connection", || async {
        server_backends("liveuser", "idle").await == 0
    })
    .await;
    // The next transaction gets a fresh connection instead of an error.
    assert_eq!(scalar(&c, "select 41 + 1").await, "42");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_with_too_many_prepared_statements_are_retired() {
    let p = start_proxy("max_size = 1\nmax_prepared_statements = 3", "");
    let c = p.connect().await;
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..8 {
        let stmt = c
            .prepare(&format!("select {i} + $1::int, pg_backend_pid()"))
            .await
            .unwrap();
        let row = c.query_one(&stmt, &[&1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
        pids.insert(row.get::<_, i32>(1));
    }
    // One pooled connection at a time; it is replaced once it holds more
    // than 3 proxy-prepared statements.
    assert!(
        pids.len() >= 2,
        "server connection never replaced: {pids:?}"
    );
}
