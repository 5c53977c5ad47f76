//! The phases of a move, as SQL on the source and target primaries.

use super::verify::{checksums, differences, dirty_keys, row_hashes, unwatch_sql, watch_sql};
use super::{buckets, now_ms, save, Move, Phase, PlannedTable, Progress};
use crate::backend::conn::{ConnectParams, ServerConn};
use crate::failover::{cell, first, query, quote};
use crate::proxy::Proxy;
use crate::sharding::hash::{bucket_sql_installed, HashFunction, KeyType};
use futures::{SinkExt, StreamExt};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod cutover;

use cutover::{cutover, interrupted, keep_sql, lock_holders, unfence_sql, unkeep_sql};

/// A moved table: its qualified name as SQL and its bucket expression.
#[derive(Clone)]
pub(super) struct Table {
    /// `"public"."orders"`.
    pub(super) sql_name: String,
    /// `public.orders`, for messages and the state.
    pub(super) name: String,
    /// The bucket of a row, for a row alias `t` (`NEW`/`OLD` in triggers
    /// use [`Table::bucket_of`]).
    pub(super) column: String,
    pub(super) key_type: KeyType,
    pub(super) hash: HashFunction,
}

impl Table {
    pub(super) fn bucket_of(&self, row: &str, total: u32) -> String {
        let col = format!("{row}.{}", ident(&self.column));
        bucket_sql_installed(self.hash, self.key_type, &col, total)
    }

    pub(super) fn bucket_plain(&self, total: u32) -> String {
        bucket_sql_installed(self.hash, self.key_type, &ident(&self.column), total)
    }

    /// Postgres computes the bucket with built-in functions only (a
    /// publication row filter can select the rows).
    fn filterable(&self) -> bool {
        self.hash == HashFunction::Postgres
    }
}

pub(super) fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A connection to `database` on `addr` as the control-plane login.
async fn conn(proxy: &Proxy, addr: &str, database: &str) -> Result<ServerConn, String> {
    conn_with(proxy, addr, database, &[]).await
}

async fn conn_with(
    proxy: &Proxy,
    addr: &str,
    database: &str,
    extra: &[(&str, &str)],
) -> Result<ServerConn, String> {
    let config = proxy.config.load();
    let (user, password) = config.probe_login();
    let p = ConnectParams {
        addr: addr.to_owned(),
        database: database.to_owned(),
        user,
        password,
    };
    ServerConn::connect_with(&p, Duration::from_secs(5), extra)
        .await
        .map_err(|e| format!("{addr}: {e}"))
}

/// A tokio-postgres client for the copy (its COPY streams), as the
/// control-plane login.
async fn copy_client(
    proxy: &Proxy,
    addr: &str,
    database: &str,
) -> Result<tokio_postgres::Client, String> {
    let (client, connection) =
        tokio_postgres::connect(&conninfo(proxy, addr, database), tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn pg_err(addr: &str) -> impl Fn(tokio_postgres::Error) -> String + '_ {
    move |e| match e.as_db_error() {
        Some(d) => format!("{addr}: {}: {}", d.code().code(), d.message()),
        None => format!("{addr}: {e}"),
    }
}

/// A libpq connection string to `addr` for the target's subscription.
fn conninfo(proxy: &Proxy, addr: &str, database: &str) -> String {
    let config = proxy.config.load();
    let (user, password) = config.probe_login();
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "5432"));
    let v = |s: &str| format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"));
    let mut s = format!(
        "host={} port={} user={} dbname={}",
        v(host.trim_matches(['[', ']'])),
        v(port),
        v(&user),
        v(database)
    );
    if let Some(p) = password {
        s.push_str(&format!(" password={}", v(&p)));
    }
    s
}

/// Whether the catalog `table` has a row whose `column` is `name`
/// (a subscription, publication or slot of a move).
async fn catalog_has(
    c: &mut ServerConn,
    table: &str,
    column: &str,
    name: &str,
) -> Result<bool, String> {
    let sql = format!(
        "SELECT count(*) FROM {table} WHERE {column} = {}",
        quote(name)
    );
    Ok(num(&query(c, &sql).await?) > 0)
}

fn num(rows: &[Vec<Option<String>>]) -> u64 {
    first(rows).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn primary_of(proxy: &Proxy, shard: &str) -> Result<String, String> {
    proxy
        .topology
        .load()
        .shards
        .iter()
        .find(|s| s.name == shard)
        .map(|s| s.primary.to_string())
        .ok_or_else(|| format!("no shard named {shard:?}"))
}

/// The sharded tables that exist on `c`'s database.
async fn tables(proxy: &Proxy, c: &mut ServerConn) -> Result<Vec<Table>, String> {
    let topology = proxy.topology.load();
    let map = topology.map.as_ref().ok_or("no [sharding] section")?;
    let hash = map.hash;
    let mut out = Vec::new();
    for (schema, name, column, key_type) in map.sharded_tables() {
        let reference = match &schema {
            Some(s) => format!("{}.{}", ident(s), ident(&name)),
            None => ident(&name),
        };
        let rows = query(
            c,
            &format!(
                "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass({})",
                quote(&reference)
            ),
        )
        .await?;
        let Some(row) = rows.first() else { continue };
        let (Some(nsp), Some(rel)) = (row[0].clone(), row[1].clone()) else {
            continue;
        };
        out.push(Table {
            sql_name: format!("{}.{}", ident(&nsp), ident(&rel)),
            name: format!("{nsp}.{rel}"),
            column,
            key_type,
            hash,
        });
    }
    if out.iter().any(|t| !t.filterable()) {
        query(c, super::MURMUR3_SQL).await?;
    }
    Ok(out)
}

/// Checks that `addr` answers for `database` with the control-plane login.
pub(super) async fn check_server(proxy: &Proxy, addr: &str, database: &str) -> Result<(), String> {
    let mut c = conn(proxy, addr, database).await?;
    query(&mut c, "SELECT 1").await.map(|_| ())
}

/// Rows and bytes of the moving buckets on shard `from`, per table.
pub(super) async fn estimate(
    proxy: &Proxy,
    from: &str,
    database: &str,
    moving: &[u32],
) -> Result<Vec<PlannedTable>, String> {
    let total = proxy.topology.load().map.as_ref().map_or(1, |m| m.buckets);
    let addr = primary_of(proxy, from)?;
    let mut c = conn(proxy, &addr, database).await?;
    let mut out = Vec::new();
    for t in tables(proxy, &mut c).await? {
        let rows = query(
            &mut c,
            &format!(
                "SELECT count(*), COALESCE(sum(pg_column_size(t.*)), 0) FROM {} t WHERE {} = ANY ({})",
                t.sql_name,
                t.bucket_of("t", total),
                buckets::sql_array(moving)
            ),
        )
        .await?;
        let row = rows.first().map(Vec::as_slice).unwrap_or_default();
        out.push(PlannedTable {
            table: t.name,
            rows: cell(row, 0).unwrap_or(0),
            bytes: cell(row, 1).unwrap_or(0),
        });
    }
    Ok(out)
}

/// Everything a phase needs.
#[derive(Clone)]
pub(super) struct Ctx {
    pub(super) m: Move,
    pub(super) moving: Vec<u32>,
    pub(super) total: u32,
    pub(super) source: String,
    pub(super) target: String,
    pub(super) tables: Vec<Table>,
    /// The move back after an abort: `source`, `target` and the move's
    /// `from`/`to` are swapped, and the replication objects are the
    /// reverse ones (the marker row, fence and watch names stay: each
    /// lives on the server that writes it).
    pub(super) back: bool,
}

impl Ctx {
    /// The publication, slot and subscription of this direction.
    fn name(&self) -> String {
        if self.back {
            format!("sg_back_{}", self.m.id)
        } else {
            format!("sg_move_{}", self.m.id)
        }
    }

    /// The same move in the other direction.
    fn reversed(&self) -> Ctx {
        let mut c = self.clone();
        std::mem::swap(&mut c.m.from, &mut c.m.to);
        std::mem::swap(&mut c.source, &mut c.target);
        c.back = !c.back;
        c
    }

    /// The operator's abort applies (the move back itself ignores it).
    fn aborted(&self, proxy: &Proxy) -> bool {
        !self.back && proxy.reshard.abort_requested(self.m.id)
    }

    /// The phase a failed cutover returns to, and the one a cutover ends in.
    fn cutover_phases(&self) -> (Phase, Phase) {
        if self.back {
            (Phase::MovingBack, Phase::MovedBack)
        } else {
            (Phase::CatchingUp, Phase::Switched)
        }
    }

    fn filter(&self, t: &Table) -> String {
        format!(
            "{} = ANY ({})",
            t.bucket_plain(self.total),
            buckets::sql_array(&self.moving)
        )
    }

    /// The tables (with their index) whose publication cannot filter by
    /// bucket.
    fn unfilterable(&self) -> impl Iterator<Item = (usize, &Table)> {
        self.tables
            .iter()
            .enumerate()
            .filter(|(_, t)| !t.filterable())
    }

    /// A table of the publication: with the bucket filter where Postgres
    /// can compute it; otherwise every change is sent and the receiving
    /// side keeps those of the moving buckets ([`keep_sql`]).
    fn publication_member(&self, t: &Table) -> String {
        if t.filterable() {
            format!("{} WHERE ({})", t.sql_name, self.filter(t))
        } else {
            t.sql_name.clone()
        }
    }
}

async fn context(proxy: &Proxy, m: &Move) -> Result<Ctx, String> {
    let total = proxy
        .topology
        .load()
        .map
        .as_ref()
        .ok_or("no [sharding] section")?
        .buckets;
    let moving = buckets::parse(&m.buckets, total)?;
    let source = primary_of(proxy, &m.from)?;
    let target = primary_of(proxy, &m.to)?;
    let mut c = conn(proxy, &source, &m.database).await?;
    let tables = tables(proxy, &mut c).await?;
    Ok(Ctx {
        m: m.clone(),
        moving,
        total,
        source,
        target,
        tables,
        back: false,
    })
}

/// Runs move `id` from its saved phase to the end (or to a failure).
pub(super) async fn run(proxy: &Arc<Proxy>, id: u64) {
    loop {
        if proxy.shutdown.is_cancelled() {
            return;
        }
        let Some(m) = proxy
            .failover
            .state()
            .moves
            .into_iter()
            .find(|m| m.id == id)
        else {
            return;
        };
        if !m.phase.active() {
            return;
        }
        if proxy.reshard.abort_requested(id) && m.phase.before_cutover() {
            finish_rollback(proxy, &m, Phase::Aborted, "aborted by the operator".into()).await;
            return;
        }
        if proxy.reshard.abort_requested(id) && m.phase == Phase::Switched {
            let r = save(proxy, id, |m| {
                m.phase = Phase::MovingBack;
                m.message = "aborted by the operator after the cutover: moving back".into();
            });
            if let Err(e) = r {
                tracing::error!(id, error = %e, "bucket move state not saved");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            tracing::warn!(
                id,
                "bucket move aborted after the cutover; moving the buckets back"
            );
            continue;
        }
        let ctx = match context(proxy, &m).await {
            Ok(c) => c,
            Err(e) => {
                note(proxy, id, &format!("waiting: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let step = match m.phase {
            Phase::Preparing => prepare(proxy, &ctx).await.map(|()| Phase::Copying),
            Phase::Copying => copy(proxy, &ctx).await.map(|()| Phase::CatchingUp),
            Phase::CatchingUp => match catching_up(proxy, &ctx).await {
                Ok(()) => {
                    // Saving the phase publishes the held buckets.
                    let held = Instant::now();
                    match save(proxy, id, |m| m.phase = Phase::CuttingOver) {
                        Ok(_) => cutover(proxy, &ctx, held).await,
                        Err(e) => Err(Stop::Retry(e)),
                    }
                }
                Err(e) => Err(e),
            },
            // Interrupted (the proxy stopped during a cutover): undo the
            // fence and start the cutover over.
            Phase::CuttingOver => interrupted(proxy, &ctx).await,
            Phase::CuttingBack => interrupted(proxy, &ctx.reversed()).await,
            Phase::MovingBack => {
                let back = ctx.reversed();
                match moving_back(proxy, &ctx).await {
                    Ok(()) => {
                        let held = Instant::now();
                        match save(proxy, id, |m| m.phase = Phase::CuttingBack) {
                            Ok(_) => cutover(proxy, &back, held).await,
                            Err(e) => Err(Stop::Retry(e)),
                        }
                    }
                    Err(e) => Err(e),
                }
            }
            Phase::MovedBack => {
                finish_rollback(
                    proxy,
                    &m,
                    Phase::Aborted,
                    format!(
                        "aborted after the cutover: moved back to {} (paused {} ms)",
                        m.from, m.back_pause_ms
                    ),
                )
                .await;
                return;
            }
            Phase::Switched => {
                let grace = proxy.config.load().reshard.cleanup_after;
                let due = m.switched_unix_ms + grace.as_millis() as u64;
                let now = now_ms();
                if now < due {
                    tokio::time::sleep(Duration::from_millis((due - now).min(1000))).await;
                    continue;
                }
                Ok(Phase::CleaningUp)
            }
            Phase::CleaningUp => cleanup(proxy, &ctx).await.map(|()| Phase::Done),
            Phase::Done | Phase::Failed | Phase::Aborted => return,
        };
        match step {
            Ok(next) => {
                let r = save(proxy, id, |m| {
                    // An abort that came in while the grace period ended
                    // (read under the state's lock, as the abort is
                    // decided): move back instead of cleaning up.
                    let next = if next == Phase::CleaningUp
                        && proxy.reshard.abort_requested(id)
                        && !m.back_lsn.is_empty()
                    {
                        Phase::MovingBack
                    } else {
                        next
                    };
                    if m.phase != next {
                        tracing::info!(
                            id,
                            from = m.phase.name(),
                            to = next.name(),
                            "bucket move phase"
                        );
                    }
                    m.phase = next;
                    m.message.clear();
                    if !next.active() {
                        m.finished_unix_ms = now_ms();
                        crate::metrics::GLOBAL
                            .reshard_moves
                            .with_label_values(&[next.name()])
                            .inc();
                    }
                });
                if let Err(e) = r {
                    tracing::error!(id, error = %e, "bucket move state not saved");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(Stop::Fail(why)) if m.phase.moving_back() => {
                // The target owns the buckets and stays their owner: its
                // rows are the truth, so nothing is rolled back.
                tracing::error!(id, error = %why, "moving back failed; the move stays switched");
                let _ = save(proxy, id, |m| {
                    m.phase = Phase::Switched;
                    m.message = format!("moving back failed, the buckets stay on {}: {why}", m.to);
                });
                crate::lock(&proxy.reshard.abort).remove(&id);
            }
            Err(Stop::Fail(why)) => {
                tracing::error!(id, error = %why, "bucket move failed; rolling back");
                finish_rollback(proxy, &m, Phase::Failed, why).await;
                return;
            }
            Err(Stop::Retry(why)) => {
                note(proxy, id, &why);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(Stop::Aborted) => continue,
        }
    }
}

/// Why a phase did not finish.
pub(super) enum Stop {
    /// Try the phase again later (a server unreachable, a lock not taken).
    Retry(String),
    /// The move cannot go on: roll it back.
    Fail(String),
    /// The operator asked to abort.
    Aborted,
}

impl From<String> for Stop {
    fn from(e: String) -> Stop {
        Stop::Retry(e)
    }
}

impl From<&str> for Stop {
    fn from(e: &str) -> Stop {
        Stop::Retry(e.to_owned())
    }
}

fn note(proxy: &Proxy, id: u64, message: &str) {
    tracing::warn!(id, message, "bucket move waiting");
    let _ = save(proxy, id, |m| m.message = message.to_owned());
}

async fn finish_rollback(proxy: &Arc<Proxy>, m: &Move, phase: Phase, why: String) {
    loop {
        let result = match context(proxy, m).await {
            Ok(ctx) => rollback(proxy, &ctx).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => break,
            Err(e) => {
                note(proxy, m.id, &format!("rolling back: {e}"));
                if proxy.shutdown.is_cancelled() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    let _ = save(proxy, m.id, |m| {
        m.phase = phase;
        m.message = why;
        m.finished_unix_ms = now_ms();
    });
    crate::metrics::GLOBAL
        .reshard_moves
        .with_label_values(&[phase.name()])
        .inc();
    crate::lock(&proxy.reshard.abort).remove(&m.id);
}

const MARKER: &str = "CREATE SCHEMA IF NOT EXISTS shardgate; \
     CREATE TABLE IF NOT EXISTS shardgate.move_marker (id bigint PRIMARY KEY, n bigint NOT NULL)";

async fn prepare(proxy: &Proxy, ctx: &Ctx) -> Result<(), Stop> {
    // A half-done earlier attempt leaves nothing behind.
    rollback(proxy, ctx).await?;
    if ctx.tables.is_empty() {
        return Err(Stop::Fail(format!(
            "none of the [[sharding.tables]] exists in database {:?} on {}",
            ctx.m.database, ctx.source
        )));
    }
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    let mut t = conn(proxy, &ctx.target, &ctx.m.database).await?;
    if ctx.tables.iter().any(|tb| !tb.filterable()) {
        query(&mut t, super::MURMUR3_SQL).await?;
    }
    for tb in &ctx.tables {
        // Row filters on UPDATE and DELETE need the sharding column in the
        // replica identity (the primary key, usually).
        let rows = query(
            &mut s,
            &format!(
                "SELECT c.relreplident::text, \
                   (SELECT string_agg(a.attname, ',') FROM pg_index i JOIN pg_attribute a \
                      ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                    WHERE i.indrelid = c.oid AND ((c.relreplident = 'd' AND i.indisprimary) \
                      OR (c.relreplident = 'i' AND i.indisreplident))) \
                 FROM pg_class c WHERE c.oid = {}::regclass",
                quote(&tb.sql_name)
            ),
        )
        .await?;
        let row = rows.first().cloned().unwrap_or_default();
        let ident_kind = row.first().cloned().flatten().unwrap_or_default();
        let columns = row.get(1).cloned().flatten();
        let covered = ident_kind == "f"
            || columns
                .as_deref()
                .is_some_and(|c| c.split(',').any(|c| c == tb.column));
        if ident_kind == "n" || (ident_kind != "f" && columns.is_none()) {
            return Err(Stop::Fail(format!(
                "table {} has no primary key or replica identity; give it one (ALTER TABLE ... ADD PRIMARY KEY, or REPLICA IDENTITY USING INDEX) before moving its buckets",
                tb.name
            )));
        }
        if !covered {
            return Err(Stop::Fail(format!(
                "table {}: its replica identity ({}) does not include the sharding column {:?}; updates and deletes could not be filtered by bucket",
                tb.name,
                columns.unwrap_or_default(),
                tb.column
            )));
        }
        // The schema on the target.
        let exists = first(
            &query(
                &mut t,
                &format!("SELECT to_regclass({}) IS NOT NULL", quote(&tb.sql_name)),
            )
            .await?,
        );
        if exists.as_deref() != Some("t") {
            copy_schema(proxy, ctx, tb).await.map_err(Stop::Fail)?;
        }
        let stale = num(&query(
            &mut t,
            &format!(
                "SELECT count(*) FROM {} WHERE {}",
                tb.sql_name,
                ctx.filter(tb)
            ),
        )
        .await?);
        if stale > 0 {
            return Err(Stop::Fail(format!(
                "the target {} already has {stale} rows of table {} in the moving buckets (left from an earlier move?); remove them first",
                ctx.m.to, tb.name
            )));
        }
    }
    let id = ctx.m.id;
    query(&mut s, MARKER).await?;
    query(&mut t, MARKER).await?;
    query(
        &mut s,
        &format!("INSERT INTO shardgate.move_marker VALUES ({id}, 0) ON CONFLICT (id) DO UPDATE SET n = 0"),
    )
    .await?;
    query(
        &mut t,
        &format!("DELETE FROM shardgate.move_marker WHERE id = {id}"),
    )
    .await?;
    // What the copy will move, for progress and the ETA.
    let planned = estimate(proxy, &ctx.m.from, &ctx.m.database, &ctx.moving).await?;
    let (rows_total, bytes_total) = planned
        .iter()
        .fold((0, 0), |(r, b), p| (r + p.rows, b + p.bytes));
    let names: Vec<String> = ctx.tables.iter().map(|t| t.name.clone()).collect();
    save(proxy, id, |m| {
        m.tables = names;
        m.rows_total = rows_total;
        m.bytes_total = bytes_total;
    })?;
    // Statements across shards that began before the move was published
    // would see the copies: let them finish first.
    if !proxy.reshard.wait_scatters(Duration::from_secs(60)).await {
        return Err(Stop::Retry(
            "statements across shards have been running for 60 s; waiting for them before the copy"
                .into(),
        ));
    }
    save(proxy, id, |m| {
        m.copy_started = true;
        m.copy_started_unix_ms = now_ms();
    })?;
    let mut members: Vec<String> = ctx
        .tables
        .iter()
        .map(|t| ctx.publication_member(t))
        .collect();
    members.push(format!("shardgate.move_marker WHERE (id = {id})"));
    query(
        &mut s,
        &format!(
            "CREATE PUBLICATION {} FOR TABLE {}",
            ctx.name(),
            members.join(", ")
        ),
    )
    .await?;
    tracing::info!(id, from = %ctx.m.from, to = %ctx.m.to, buckets = %ctx.m.buckets.join(","), rows_total, "bucket move: prepared");
    Ok(())
}

/// Copies the schema of one table from the source to the target with the
/// Postgres tools installed beside shardgate.
async fn copy_schema(proxy: &Proxy, ctx: &Ctx, t: &Table) -> Result<(), String> {
    let bin = crate::local::PgBin::find().ok_or_else(|| {
        format!(
            "table {} does not exist on the target shard {:?}, and no pg_dump is installed here to copy its schema; create it there first",
            t.name, ctx.m.to
        )
    })?;
    let config = proxy.config.load();
    let (user, password) = config.probe_login();
    let url = |addr: &str| {
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr, "5432"));
        vec![
            "-h".to_string(),
            host.trim_matches(['[', ']']).to_string(),
            "-p".to_string(),
            port.to_string(),
            "-U".to_string(),
            user.clone(),
            "-d".to_string(),
            ctx.m.database.clone(),
        ]
    };
    let mut dump = tokio::process::Command::new(bin.tool("pg_dump"));
    // Owner and privileges come along: the application's login must be
    // able to use the table on the target as on the source.
    dump.args(url(&ctx.source))
        .args([
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            "-t",
        ])
        .arg(&t.sql_name);
    if let Some(p) = &password {
        dump.env("PGPASSWORD", p);
    }
    let out = dump.output().await.map_err(|e| format!("pg_dump: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pg_dump of {}: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut psql = tokio::process::Command::new(bin.tool("psql"));
    psql.args(url(&ctx.target))
        .args(["-v", "ON_ERROR_STOP=1", "-q"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    if let Some(p) = &password {
        psql.env("PGPASSWORD", p);
    }
    let mut child = psql.spawn().map_err(|e| format!("psql: {e}"))?;
    {
        use tokio::io::AsyncWriteExt;
        let mut stdin = child.stdin.take().ok_or("psql stdin")?;
        // The schema the table lives in may be missing too.
        let schema = t.sql_name.split('.').next().unwrap_or("public");
        stdin
            .write_all(format!("CREATE SCHEMA IF NOT EXISTS {schema};\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stdin
            .write_all(&out.stdout)
            .await
            .map_err(|e| e.to_string())?;
    }
    let done = child.wait_with_output().await.map_err(|e| e.to_string())?;
    if !done.status.success() {
        return Err(format!(
            "creating {} on the target: {}",
            t.name,
            String::from_utf8_lossy(&done.stderr).trim()
        ));
    }
    tracing::info!(table = %t.name, target = %ctx.target, "bucket move: schema copied to the target");
    Ok(())
}

/// Copies the rows of the moving buckets to the target and starts the
/// stream after them.
///
/// The copy runs in the snapshot the replication slot exports when it is
/// created (a WAL sender connection, `CREATE_REPLICATION_SLOT ... (SNAPSHOT
/// 'export')`), so the stream from the slot starts exactly where the copy's
/// view ends: nothing is lost or applied twice. shardgate drives the copy
/// itself (rather than the subscription's table synchronisation) so that
/// it can be rate-limited (`reshard.copy_bytes_per_second`) and counted.
/// The target takes the whole copy in one transaction: a copy interrupted
/// by a crash leaves nothing there, and starts over.
async fn copy(proxy: &Proxy, ctx: &Ctx) -> Result<(), Stop> {
    let name = ctx.name();
    let mut t = conn(proxy, &ctx.target, &ctx.m.database).await?;
    let subscribed = catalog_has(&mut t, "pg_subscription", "subname", &name).await?;
    if subscribed {
        // Copied and streaming already (the proxy stopped right after).
        return Ok(());
    }
    // What an interrupted attempt left: its slot, and rows it committed
    // (the marker row came in the same transaction: without it, the
    // target has none; prepare checked it had none before).
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    drop_slot(&mut s, &name, &ctx.source).await?;
    let committed = first(
        &query(
            &mut t,
            &format!(
                "SELECT count(*) FROM shardgate.move_marker WHERE id = {}",
                ctx.m.id
            ),
        )
        .await?,
    );
    if committed.as_deref() != Some("0") {
        delete_rows(&mut t, ctx, &ctx.tables).await?;
        query(
            &mut t,
            &format!("DELETE FROM shardgate.move_marker WHERE id = {}", ctx.m.id),
        )
        .await?;
    }

    let mut r = conn_with(
        proxy,
        &ctx.source,
        &ctx.m.database,
        &[("replication", "database")],
    )
    .await?;
    let slot = query(
        &mut r,
        &format!("CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'export')"),
    )
    .await?;
    let snapshot: String = slot
        .first()
        .and_then(|row| cell(row, 2))
        .ok_or("CREATE_REPLICATION_SLOT returned no snapshot")?;
    let src = copy_client(proxy, &ctx.source, &ctx.m.database).await?;
    let se = pg_err(&ctx.source);
    src.batch_execute(&format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
        quote(&snapshot)
    ))
    .await
    .map_err(&se)?;
    // The snapshot is imported: the WAL sender connection may go.
    drop(r);
    let dst = copy_client(proxy, &ctx.target, &ctx.m.database).await?;
    let te = pg_err(&ctx.target);
    // As the subscription's own copy: replica role (ordinary triggers and
    // foreign-key checks do not fire).
    dst.batch_execute("BEGIN; SET LOCAL session_replication_role = replica")
        .await
        .map_err(&te)?;
    let mut jobs: Vec<(String, String)> = ctx
        .tables
        .iter()
        .map(|tb| (tb.sql_name.clone(), ctx.filter(tb)))
        .collect();
    jobs.push(("shardgate.move_marker".into(), format!("id = {}", ctx.m.id)));
    let started = Instant::now();
    let mut rows = 0u64;
    let mut bytes = 0u64;
    for (i, (table, filter)) in jobs.iter().enumerate() {
        let columns: String = src
            .query_one(
                "SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = ''",
                &[table],
            )
            .await
            .map_err(&se)?
            .get(0);
        let out = src
            .copy_out(&format!(
                "COPY (SELECT {columns} FROM {table} WHERE {filter}) TO STDOUT"
            ))
            .await
            .map_err(&se)?;
        let sink = dst
            .copy_in(&format!("COPY {table} ({columns}) FROM STDIN"))
            .await
            .map_err(&te)?;
        futures::pin_mut!(out);
        futures::pin_mut!(sink);
        let mut buf = bytes::BytesMut::new();
        loop {
            let row = out.next().await.transpose().map_err(&se)?;
            if let Some(row) = &row {
                buf.extend_from_slice(row);
                rows += 1;
            }
            if buf.len() < 256 * 1024 && row.is_some() {
                continue;
            }
            bytes += buf.len() as u64;
            sink.send(buf.split().freeze()).await.map_err(&te)?;
            if proxy.shutdown.is_cancelled() {
                return Err(Stop::Retry("the proxy is stopping".into()));
            }
            if ctx.aborted(proxy) {
                return Err(Stop::Aborted);
            }
            let secs = started.elapsed().as_secs_f64().max(0.001);
            proxy.reshard.set_progress(
                ctx.m.id,
                Progress {
                    rows_copied: rows,
                    tables_ready: i as u32,
                    tables_total: jobs.len() as u32,
                    lag_bytes: 0,
                    rows_per_second: rows as f64 / secs,
                },
            );
            // The rate limit, re-read each chunk (a reload changes it).
            let limit = proxy.config.load().reshard.copy_bytes_per_second;
            if limit > 0 {
                let due = Duration::from_secs_f64(bytes as f64 / limit as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if row.is_none() {
                break;
            }
        }
        sink.as_mut().finish().await.map_err(&te)?;
    }
    dst.batch_execute("COMMIT").await.map_err(&te)?;
    src.batch_execute("COMMIT").await.map_err(&se)?;
    query(&mut t, &keep_sql(ctx)).await?;
    query(
        &mut t,
        &format!(
            "CREATE SUBSCRIPTION {name} CONNECTION {} PUBLICATION {name} \
             WITH (copy_data = false, create_slot = false, slot_name = {name})",
            quote(&conninfo(proxy, &ctx.source, &ctx.m.database))
        ),
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    tracing::info!(
        id = ctx.m.id,
        rows,
        bytes,
        secs,
        "bucket move: copied; streaming"
    );
    save(proxy, ctx.m.id, |m| {
        m.rows_total = rows.saturating_sub(1);
        m.bytes_copied = bytes;
        m.copied_unix_ms = now_ms();
    })?;
    Ok(())
}

/// WAL the slot has not confirmed yet.
async fn lag_bytes(s: &mut ServerConn, ctx: &Ctx) -> Result<u64, String> {
    let rows = query(
        s,
        &format!(
            "SELECT GREATEST(pg_current_wal_lsn() - confirmed_flush_lsn, 0)::bigint \
             FROM pg_replication_slots WHERE slot_name = {}",
            quote(&ctx.name())
        ),
    )
    .await?;
    Ok(num(&rows))
}

/// Bumps the marker on the source and waits (at most `within`) until the
/// target has applied it: everything committed on the source before is
/// then applied on the target. Returns false on timeout.
async fn round_trip(
    s: &mut ServerConn,
    t: &mut ServerConn,
    ctx: &Ctx,
    within: Duration,
) -> Result<bool, String> {
    let id = ctx.m.id;
    let n = num(&query(
        s,
        &format!("UPDATE shardgate.move_marker SET n = n + 1 WHERE id = {id} RETURNING n"),
    )
    .await?);
    if n == 0 {
        return Err("the move's marker row is missing on the source".into());
    }
    let deadline = Instant::now() + within;
    loop {
        let seen = num(&query(
            t,
            &format!("SELECT COALESCE(max(n), 0) FROM shardgate.move_marker WHERE id = {id}"),
        )
        .await?);
        if seen >= n {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The subscription's apply worker on the target, for messages.
async fn subscription_health(t: &mut ServerConn, ctx: &Ctx) -> String {
    let rows = query(
        t,
        &format!(
            "SELECT coalesce(w.pid::text, 'not running'), coalesce(w.received_lsn::text, '-'), \
               coalesce(st.apply_error_count, 0)::text \
             FROM pg_subscription s LEFT JOIN pg_stat_subscription w ON w.subid = s.oid AND w.relid IS NULL \
             LEFT JOIN pg_stat_subscription_stats st ON st.subid = s.oid WHERE s.subname = {}",
            quote(&ctx.name())
        ),
    )
    .await;
    match rows.as_deref() {
        Ok([r, ..]) => format!(
            "subscription {}: apply worker {}, received up to {}, {} apply errors (the target's server log says why)",
            ctx.name(),
            cell::<String>(r, 0).unwrap_or_default(),
            cell::<String>(r, 1).unwrap_or_default(),
            cell::<String>(r, 2).unwrap_or_default()
        ),
        Ok([]) => format!("subscription {} is missing on {}", ctx.name(), ctx.target),
        Err(e) => format!("subscription {}: {e}", ctx.name()),
    }
}

/// Waits until the stream keeps up: a marker round trip within the
/// cutover timeout.
async fn catching_up(proxy: &Proxy, ctx: &Ctx) -> Result<(), Stop> {
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    let mut t = conn(proxy, &ctx.target, &ctx.m.database).await?;
    if !ctx.back {
        prepare_back(&mut t, ctx).await?;
    }
    let within = proxy.config.load().reshard.cutover_timeout;
    loop {
        if ctx.aborted(proxy) {
            return Err(Stop::Aborted);
        }
        let lag = lag_bytes(&mut s, ctx).await.unwrap_or(0);
        proxy.reshard.set_progress(
            ctx.m.id,
            Progress {
                rows_copied: ctx.m.rows_total,
                tables_ready: ctx.tables.len() as u32 + 1,
                tables_total: ctx.tables.len() as u32 + 1,
                lag_bytes: lag,
                rows_per_second: 0.0,
            },
        );
        if round_trip(&mut s, &mut t, ctx, within).await? {
            break;
        }
        let worker = subscription_health(&mut t, ctx).await;
        note(
            proxy,
            ctx.m.id,
            &format!("the target has not applied the source's changes within {within:?}; {worker}"),
        );
    }
    // The first verification, outside the hold. A watch trigger records
    // from now on which keys of the moving buckets get written on the
    // source. Per bucket, the rows not written since must agree now; the
    // written ones are compared key by key while held, at the cutover.
    if let Err(e) = query(&mut s, &watch_sql(ctx)).await {
        let _ = query(&mut s, "ROLLBACK").await;
        let held = lock_holders(&mut s, ctx).await;
        return Err(Stop::Retry(format!(
            "installing the write watch failed ({e}{held}); retrying"
        )));
    }
    if !round_trip(&mut s, &mut t, ctx, within).await? {
        return Err(Stop::Retry("the target fell behind; retrying".into()));
    }
    // Each side is read in one snapshot (a repeatable-read transaction):
    // the source's first, the target's after it has applied everything
    // committed before the source's.
    let mut ss = conn(proxy, &ctx.source, &ctx.m.database).await?;
    let mut ts = conn(proxy, &ctx.target, &ctx.m.database).await?;
    query(&mut ss, "BEGIN ISOLATION LEVEL REPEATABLE READ").await?;
    let mut a = checksums(&mut ss, ctx, &ctx.moving).await?;
    if !round_trip(&mut s, &mut t, ctx, within).await? {
        return Err(Stop::Retry("the target fell behind; retrying".into()));
    }
    query(&mut ts, "BEGIN ISOLATION LEVEL REPEATABLE READ").await?;
    let mut b = checksums(&mut ts, ctx, &ctx.moving).await?;
    // Keys written since the watch began (read after both snapshots): their
    // rows may differ between the two; take them out of both sums, each as
    // its own snapshot saw them.
    let dirty = dirty_keys(&mut s, ctx).await?;
    for (sums, c) in [(&mut a, &mut ss), (&mut b, &mut ts)] {
        for ((table, _), (bucket, hash)) in row_hashes(c, ctx, &dirty).await? {
            if let Some(v) = sums.get_mut(&(table, bucket)) {
                v.0 = v.0.saturating_sub(1);
                v.1 = v.1.wrapping_sub(hash);
            }
        }
        query(c, "COMMIT").await?;
    }
    let bad = differences(&a, &b);
    if !bad.is_empty() {
        return Err(Stop::Fail(format!(
            "verification failed, nothing was switched: {}",
            bad.join("; ")
        )));
    }
    Ok(())
}

/// On the target, before the cutover: the publication and the logical
/// slot a move back replays the target's changes from. Created now, not
/// during the hold (a new slot waits for running transactions); advanced
/// to the cutover's WAL position once the map has switched, so what the
/// target applied for the source is never sent back.
async fn prepare_back(t: &mut ServerConn, ctx: &Ctx) -> Result<(), String> {
    let name = ctx.reversed().name();
    let has_publication = catalog_has(t, "pg_publication", "pubname", &name).await?;
    if !has_publication {
        let mut members: Vec<String> = ctx
            .tables
            .iter()
            .map(|tb| ctx.publication_member(tb))
            .collect();
        members.push(format!("shardgate.move_marker WHERE (id = {})", ctx.m.id));
        query(
            t,
            &format!("CREATE PUBLICATION {name} FOR TABLE {}", members.join(", ")),
        )
        .await?;
    }
    let has_slot = catalog_has(t, "pg_replication_slots", "slot_name", &name).await?;
    if !has_slot {
        query(
            t,
            &format!(
                "SELECT pg_create_logical_replication_slot({}, 'pgoutput')",
                quote(&name)
            ),
        )
        .await?;
    }
    Ok(())
}

/// Moves the reverse slot on the target to the cutover's WAL position
/// (if it is not there or past it yet).
async fn advance_back_slot(proxy: &Proxy, ctx: &Ctx) -> Result<(), String> {
    if ctx.m.back_lsn.is_empty() {
        return Ok(());
    }
    let name = ctx.reversed().name();
    let mut t = conn(proxy, &ctx.target, &ctx.m.database).await?;
    let rows = query(
        &mut t,
        &format!(
            "SELECT (confirmed_flush_lsn < {lsn}::pg_lsn)::text, active::text FROM pg_replication_slots WHERE slot_name = {name}",
            lsn = quote(&ctx.m.back_lsn),
            name = quote(&name)
        ),
    )
    .await?;
    let Some(row) = rows.first() else {
        return Err(format!(
            "the reverse replication slot {name} is missing on {}",
            ctx.target
        ));
    };
    if cell::<String>(row, 0).as_deref() == Some("true")
        && cell::<String>(row, 1).as_deref() == Some("false")
    {
        query(
            &mut t,
            &format!(
                "SELECT pg_replication_slot_advance({}, {}::pg_lsn)",
                quote(&name),
                quote(&ctx.m.back_lsn)
            ),
        )
        .await?;
    }
    Ok(())
}

/// An abort after the cutover: the forward stream stops, the target's
/// changes since the cutover stream back to the source (a subscription
/// there on the reverse slot), and the same catch-up and verification as
/// a move's run in the other direction.
async fn moving_back(proxy: &Proxy, ctx: &Ctx) -> Result<(), Stop> {
    // The forward stream would send the reverse stream's changes back.
    drop_replication(proxy, ctx).await?;
    let back = ctx.reversed();
    let name = back.name();
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    let subscribed = catalog_has(&mut s, "pg_subscription", "subname", &name).await?;
    if !subscribed {
        advance_back_slot(proxy, ctx).await.map_err(Stop::Fail)?;
        query(&mut s, &keep_sql(&back)).await?;
        query(
            &mut s,
            &format!(
                "CREATE SUBSCRIPTION {name} CONNECTION {} PUBLICATION {name} \
                 WITH (copy_data = false, create_slot = false, slot_name = {name})",
                quote(&conninfo(proxy, &ctx.target, &ctx.m.database))
            ),
        )
        .await?;
        tracing::info!(id = ctx.m.id, from = %ctx.m.to, to = %ctx.m.from, "bucket move: streaming back");
    }
    catching_up(proxy, &back).await
}

/// Deletes the rows of the moving buckets from `c` in batches (fence
/// triggers bypassed, as replication applies do).
async fn delete_rows<'a>(
    c: &mut ServerConn,
    ctx: &Ctx,
    tables: impl IntoIterator<Item = &'a Table>,
) -> Result<u64, String> {
    query(c, "SET session_replication_role = replica").await?;
    let mut total = 0;
    for t in tables {
        loop {
            let n = num(
                &query(
                    c,
                    &format!(
                        "WITH d AS (DELETE FROM {n} WHERE ctid = ANY (ARRAY(SELECT ctid FROM {n} WHERE {f} LIMIT 5000)) RETURNING 1) \
                         SELECT count(*) FROM d",
                        n = t.sql_name,
                        f = ctx.filter(t)
                    ),
                )
                .await?,
            );
            total += n;
            if n == 0 {
                break;
            }
        }
    }
    query(c, "RESET session_replication_role").await?;
    Ok(total)
}

/// Drops the subscription (and with it the slot), the publication and
/// any slot left by a crash.
async fn drop_replication(proxy: &Proxy, ctx: &Ctx) -> Result<(), String> {
    let name = ctx.name();
    let mut t = conn(proxy, &ctx.target, &ctx.m.database).await?;
    let exists = catalog_has(&mut t, "pg_subscription", "subname", &name).await?;
    if exists {
        query(&mut t, &format!("ALTER SUBSCRIPTION {name} DISABLE")).await?;
        // Dropping connects to the source to drop the slot; if the source
        // cannot be reached, detach the slot and drop it below.
        if query(&mut t, &format!("DROP SUBSCRIPTION IF EXISTS {name}"))
            .await
            .is_err()
        {
            query(
                &mut t,
                &format!("ALTER SUBSCRIPTION {name} SET (slot_name = NONE)"),
            )
            .await?;
            query(&mut t, &format!("DROP SUBSCRIPTION IF EXISTS {name}")).await?;
        }
    }
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    query(&mut s, &format!("DROP PUBLICATION IF EXISTS {name}")).await?;
    drop_slot(&mut s, &name, &ctx.source).await
}

/// Drops replication slot `name` on `s` if it exists. An active slot is
/// still in use by a WAL sender that is going away: wait for it.
async fn drop_slot(s: &mut ServerConn, name: &str, addr: &str) -> Result<(), String> {
    for _ in 0..50 {
        let rows = query(
            s,
            &format!(
                "SELECT active::text FROM pg_replication_slots WHERE slot_name = {}",
                quote(name)
            ),
        )
        .await?;
        match first(&rows).as_deref() {
            None => return Ok(()),
            Some("false") => {
                query(
                    s,
                    &format!("SELECT pg_drop_replication_slot({})", quote(name)),
                )
                .await?;
                return Ok(());
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    Err(format!("replication slot {name} on {addr} stays active"))
}

/// After the grace period: replication objects, the moved rows on the
/// source, fence triggers and the marker.
async fn cleanup(proxy: &Proxy, ctx: &Ctx) -> Result<(), Stop> {
    drop_replication(proxy, ctx).await?;
    drop_replication(proxy, &ctx.reversed()).await?;
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    let deleted = delete_rows(&mut s, ctx, &ctx.tables).await?;
    query(&mut s, &unfence_sql(ctx)).await?;
    query(&mut s, &forget_marker_sql(ctx)).await?;
    query(&mut s, &unkeep_sql(ctx)).await?;
    let mut t = conn(proxy, &ctx.target, &ctx.m.database).await?;
    // A move back that failed may have left its watch there.
    query(&mut t, &unfence_sql(ctx)).await?;
    query(&mut t, &unkeep_sql(ctx)).await?;
    query(&mut t, &forget_marker_sql(ctx)).await?;
    let id = ctx.m.id;
    tracing::info!(id, deleted, source = %ctx.source, "bucket move: cleaned up");
    Ok(())
}

/// Undoes a move that has not cut over: replication objects, the rows
/// copied to the target, fence triggers, the marker. Safe to repeat.
async fn rollback(proxy: &Proxy, ctx: &Ctx) -> Result<(), String> {
    rollback_inner(proxy, ctx).await?;
    save(proxy, ctx.m.id, |m| m.copy_started = false)?;
    Ok(())
}

fn copy_started(proxy: &Proxy, id: u64) -> bool {
    proxy
        .failover
        .state()
        .moves
        .iter()
        .any(|m| m.id == id && m.copy_started)
}

async fn rollback_inner(proxy: &Proxy, ctx: &Ctx) -> Result<(), String> {
    drop_replication(proxy, ctx).await?;
    drop_replication(proxy, &ctx.reversed()).await?;
    let mut s = conn(proxy, &ctx.source, &ctx.m.database).await?;
    query(&mut s, &unfence_sql(ctx)).await?;
    query(&mut s, &forget_marker_sql(ctx)).await?;
    query(&mut s, &unkeep_sql(ctx)).await?;
    let mut t = conn(proxy, &ctx.target, &ctx.m.database).await?;
    query(&mut t, &forget_marker_sql(ctx)).await?;
    query(&mut t, &unkeep_sql(ctx)).await?;
    // Rows copied so far: the target does not own these buckets. (Rows
    // that were there before the copy started are left alone: the move
    // refuses to start over them.)
    if !copy_started(proxy, ctx.m.id) {
        return Ok(());
    }
    let mut present = Vec::new();
    for tb in &ctx.tables {
        let sql = format!(
            "SELECT (to_regclass({}) IS NOT NULL)::text",
            quote(&tb.sql_name)
        );
        if first(&query(&mut t, &sql).await?).as_deref() == Some("true") {
            present.push(tb);
        }
    }
    delete_rows(&mut t, ctx, present).await?;
    // After a move back, the target was fenced while the map switched
    // back: its copy is gone now.
    query(&mut t, &unfence_sql(ctx)).await?;
    Ok(())
}

/// Deletes the move's marker row, if the marker table exists.
fn forget_marker_sql(ctx: &Ctx) -> String {
    format!(
        "DO $d$ BEGIN IF to_regclass('shardgate.move_marker') IS NOT NULL THEN \
         DELETE FROM shardgate.move_marker WHERE id = {}; END IF; END $d$",
        ctx.m.id
    )
}
