//! Running a cross-shard SELECT for a session: one server connection per
//! shard (replicas where the read/write rules allow), the phase-1 query
//! on all of them at once, then the combination the plan asks for
//! (`router::scatter`). Only outside a transaction: inside one, each shard
//! would need its own connection for the rest of the transaction.
//!
//! The answer reaches the client as if one server had produced it:
//! RowDescription, DataRows, CommandComplete (simple protocol), or the
//! same answers to Bind/Describe/Execute (extended protocol, in the
//! client's result formats).

use super::session::Session;
use crate::backend::pool::PooledConn;
use crate::protocol::backend as be;
use crate::protocol::frontend as fe;
use crate::protocol::Frame;
use crate::router::scatter::{rows_sql, Merge, ScatterPlan};
use bytes::{BufMut, Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::RwLock;

/// Rows a phase-2 query may combine; more is refused (54000) rather than
/// held in memory.
const MAX_MERGE_ROWS: usize = 200_000;

/// A client's Bind for a cross-shard statement: parameter types (from
/// Parse), parameter formats and values, and result formats.
pub(super) struct ScatterBind {
    pub types: Vec<u32>,
    /// Bind body after the statement name, up to the result formats.
    pub params: Bytes,
    pub result_formats: Vec<i16>,
}

/// The answer of a cross-shard statement run at Bind, handed out at
/// Describe and Execute.
pub(super) struct ScatterPortal {
    pub name: Vec<u8>,
    pub description: Frame,
    pub rows: Vec<Frame>,
    pub complete: Frame,
}

/// Type names (`format_type`) of built-in type OIDs, shared by all sessions
/// (user-defined types may differ per database and shard: looked up each
/// time).
#[derive(Default)]
pub struct TypeNames {
    names: RwLock<HashMap<u32, String>>,
}

/// Cross-shard plans by statement text, shared by all sessions: a plan is
/// parsed once, and the collation check of its tables is redone only
/// after `routing.catalog_refresh`.
#[derive(Default)]
pub struct ScatterCache {
    plans: RwLock<HashMap<String, std::sync::Arc<Cached>>>,
}

pub(super) struct Cached {
    plan: Result<ScatterPlan, String>,
    /// Relation names the statement reads (for the collation check).
    tables: Vec<String>,
    created: std::time::Instant,
    /// When the tables were last found free of non-default collations.
    collations_ok_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl ScatterCache {
    pub fn clear(&self) {
        crate::write(&self.plans).clear();
    }
}

/// Whether phase 2 compares values of the rows (sorts, groups, takes a
/// min or max, removes duplicates): then a column's own collation matters.
fn compares(plan: &ScatterPlan) -> bool {
    use crate::router::scatter::Partial;
    match &plan.merge {
        Merge::Concat { .. } => false,
        Merge::Final(f) => {
            !f.order_by.is_empty()
                || !f.group_by.is_empty()
                || f.distinct
                || f.aggregates
                    .iter()
                    .any(|a| matches!(a, Partial::Same(..) | Partial::Distinct { .. }))
        }
    }
}

/// The first OID of user-defined objects.
const FIRST_USER_OID: u32 = 16384;

/// Splits a Bind body (after the statement name) into the parameter part
/// and the result formats.
pub(super) fn split_bind(rest: &[u8]) -> Option<(Bytes, Vec<i16>)> {
    let mut at = 0usize;
    let get16 = |at: usize| -> Option<i16> {
        Some(i16::from_be_bytes(rest.get(at..at + 2)?.try_into().ok()?))
    };
    let nf = get16(at)?.max(0) as usize;
    at += 2 + 2 * nf;
    let np = get16(at)?.max(0) as usize;
    at += 2;
    for _ in 0..np {
        let len = i32::from_be_bytes(rest.get(at..at + 4)?.try_into().ok()?);
        at += 4 + len.max(0) as usize;
    }
    let params = Bytes::copy_from_slice(rest.get(..at)?);
    let nr = get16(at)?.max(0) as usize;
    let formats = (0..nr)
        .map(|i| get16(at + 2 + 2 * i))
        .collect::<Option<Vec<_>>>()?;
    Some((params, formats))
}

/// The phase-1 answer of one shard.
struct ShardAnswer {
    description: Option<Frame>,
    rows: Vec<Frame>,
    error: Option<Frame>,
    notices: Vec<Frame>,
}

fn read_answer(frames: Vec<Frame>) -> ShardAnswer {
    let mut a = ShardAnswer {
        description: None,
        rows: Vec::new(),
        error: None,
        notices: Vec::new(),
    };
    for f in frames {
        match f.tag {
            be::ROW_DESCRIPTION => a.description = Some(f),
            be::DATA_ROW => a.rows.push(f),
            be::ERROR_RESPONSE if a.error.is_none() => a.error = Some(f),
            be::NOTICE_RESPONSE => a.notices.push(f),
            _ => {}
        }
    }
    a
}

/// Rows (from the command tags) and bytes of one shard's answer, for the
/// load counters.
pub(super) fn frames_load(frames: &[Frame]) -> (u64, u64) {
    let mut rows = 0;
    let mut bytes = 0;
    for f in frames {
        bytes += f.wire_len() as u64;
        if f.tag == be::COMMAND_COMPLETE {
            let tag = f.body.strip_suffix(b"\0").unwrap_or(&f.body);
            rows += crate::hotspot::rows_of_tag(tag);
        }
    }
    (rows, bytes)
}

/// Column names and type OIDs of a RowDescription.
fn columns(desc: &Frame) -> Option<Vec<(String, u32)>> {
    let b = &desc.body;
    let n = i16::from_be_bytes(b.get(..2)?.try_into().ok()?).max(0) as usize;
    let mut at = 2;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let end = at + memchr::memchr(0, b.get(at..)?)?;
        let name = String::from_utf8_lossy(&b[at..end]).into_owned();
        at = end + 1;
        let oid = u32::from_be_bytes(b.get(at + 6..at + 10)?.try_into().ok()?);
        at += 18;
        out.push((name, oid));
    }
    Some(out)
}

/// A request in the extended protocol: Parse/Bind/Describe/Execute/Sync.
pub(super) fn extended_request(
    sql: &str,
    types: &[u32],
    params: &[u8],
    formats: &[i16],
) -> BytesMut {
    let mut out = BytesMut::new();
    let mut type_bytes = Vec::with_capacity(2 + 4 * types.len());
    type_bytes.extend_from_slice(&(types.len() as i16).to_be_bytes());
    for t in types {
        type_bytes.extend_from_slice(&t.to_be_bytes());
    }
    fe::build_parse("", sql.as_bytes(), &type_bytes).encode(&mut out);
    let mut rest = BytesMut::with_capacity(params.len() + 2 + 2 * formats.len());
    rest.put_slice(params);
    rest.put_i16(formats.len() as i16);
    for f in formats {
        rest.put_i16(*f);
    }
    fe::build_bind(b"", "", &rest).encode(&mut out);
    fe::build_target(fe::DESCRIBE, b'P', "").encode(&mut out);
    let mut exec = BytesMut::new();
    exec.put_u8(0);
    exec.put_i32(0);
    Frame {
        tag: fe::EXECUTE,
        body: exec.freeze(),
    }
    .encode(&mut out);
    Frame {
        tag: fe::SYNC,
        body: Bytes::new(),
    }
    .encode(&mut out);
    out
}

fn refusal(code: &str, message: String) -> Frame {
    crate::metrics::count_error(code.as_bytes());
    be::error_response("ERROR", code, &message)
}

/// A finished cross-shard answer: RowDescription, DataRows, CommandComplete
/// (or the error to give instead), plus notices.
pub(super) struct ScatterAnswer {
    pub notices: Vec<Frame>,
    pub result: Result<(Frame, Vec<Frame>, Frame), Frame>,
}

impl Session {
    /// Runs `sql` across `shards`. Never holds a server afterwards.
    pub(super) async fn run_scatter(
        &mut self,
        sql: &str,
        shards: &[usize],
        bind: Option<&ScatterBind>,
    ) -> ScatterAnswer {
        let fail = |code: &str, message: String| ScatterAnswer {
            notices: Vec::new(),
            result: Err(refusal(code, message)),
        };
        let Some(map) = self.shard_map() else {
            return fail("0A000", "shardgate: no shard map".into());
        };
        let cached = self.scatter_plan(&map, sql).await;
        let plan = match &cached.plan {
            Ok(p) => p.clone(),
            Err(m) => return fail("0A000", m.clone()),
        };
        let class = self.classify(sql.as_bytes());
        let read = self.routing.split && self.wants_replica(&class);
        let mut conns = match self.checkout_each(shards, read).await {
            Ok(c) => c,
            Err((code, message)) => return fail(&code, message),
        };
        crate::metrics::GLOBAL
            .scatter_queries
            .with_label_values(&[match plan.merge {
                Merge::Concat { .. } => "concat",
                Merge::Final(_) => "final",
            }])
            .inc();
        // During a bucket move, each shard's part leaves out the copies
        // it holds of buckets it does not own.
        // Empty when no move is under way: every shard gets the plan's
        // statement.
        let exclusions = std::mem::take(&mut self.routing.scatter_exclusions);
        let mut shard_sql = Vec::new();
        for s in shards.iter().filter(|_| !exclusions.is_empty()) {
            match exclusions.iter().find(|(i, _)| i == s) {
                Some((_, buckets)) => {
                    match crate::router::shard::exclude_buckets(&map, &plan.shard_sql, buckets) {
                        Ok(sql) => shard_sql.push(sql),
                        Err(what) => {
                            // Nothing was sent: the connections go back.
                            drop(conns);
                            return fail(
                                "0A000",
                                format!("shardgate: a bucket move is under way (see `shardgate admin reshard status`) and {what} is not supported across shards until it has cleaned up; give a sharding key"),
                            );
                        }
                    }
                }
                None => shard_sql.push(plan.shard_sql.clone()),
            }
        }
        let answer = match self.check_collations(&cached, &plan, &mut conns).await {
            Ok(()) => {
                self.scatter_phases(&plan, shards, &shard_sql, &mut conns, bind)
                    .await
            }
            Err(e) => ScatterAnswer {
                notices: Vec::new(),
                result: Err(e),
            },
        };
        for mut c in conns {
            if c.broken || c.tx_status != b'I' {
                drop(deadpool::managed::Object::take(c));
            } else {
                c.last_released = std::time::Instant::now();
            }
        }
        answer
    }

    /// The cached plan of a cross-shard SELECT (made now if missing or
    /// older than the catalog refresh).
    async fn scatter_plan(
        &mut self,
        map: &crate::sharding::map::ShardMap,
        sql: &str,
    ) -> std::sync::Arc<Cached> {
        let refresh = self.proxy.config.load().routing.catalog_refresh;
        if let Some(c) = crate::read(&self.proxy.scatter_plans.plans).get(sql) {
            if c.created.elapsed() < refresh {
                return c.clone();
            }
        }
        let catalog = self.loaded_catalog().await;
        let tables = crate::router::shard::relation_names(sql);
        // Refusals name the feature and the tables it met.
        let on = if tables.is_empty() {
            String::new()
        } else {
            format!(" (tables: {})", tables.join(", "))
        };
        let plan = match crate::router::shard::scatter_check(map, sql) {
            Err(what) => Err(format!(
                "shardgate: {what} is not supported across shards{on}"
            )),
            Ok(()) => crate::router::scatter::plan(sql, &|n| catalog.is_aggregate(n))
                .map_err(|what| format!("shardgate: {what} is not supported{on}")),
        };
        let cached = std::sync::Arc::new(Cached {
            plan,
            tables,
            created: std::time::Instant::now(),
            collations_ok_at: std::sync::Mutex::new(None),
        });
        let mut plans = crate::write(&self.proxy.scatter_plans.plans);
        if plans.len() >= 10_000 {
            plans.clear();
        }
        plans.insert(sql.to_string(), cached.clone());
        cached
    }

    /// Phase 2 sorts and compares with each expression's collation, but a
    /// column's own collation (COLLATE in its definition) does not travel
    /// with its values: when a compared statement reads a table with such
    /// a column, it is refused instead of answered in another order.
    async fn check_collations(
        &mut self,
        cached: &Cached,
        plan: &ScatterPlan,
        conns: &mut [PooledConn],
    ) -> Result<(), Frame> {
        if !compares(plan) || cached.tables.is_empty() {
            return Ok(());
        }
        let refresh = self.proxy.config.load().routing.catalog_refresh;
        if crate::lock(&cached.collations_ok_at).is_some_and(|t| t.elapsed() < refresh) {
            return Ok(());
        }
        let names: Vec<String> = cached
            .tables
            .iter()
            .map(|t| format!("'{}'", t.replace('\'', "''")))
            .collect();
        let sql = format!(
            "SELECT c.relname::text, a.attname::text FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
             WHERE c.relname IN ({}) AND a.attnum > 0 AND NOT a.attisdropped AND a.attcollation NOT IN (0, 100) LIMIT 1",
            names.join(", ")
        );
        let conn = conns.first_mut().expect("a shard connection");
        match conn.query_rows(&sql).await {
            Ok(Ok(rows)) if rows.is_empty() => {
                *crate::lock(&cached.collations_ok_at) = Some(std::time::Instant::now());
                Ok(())
            }
            Ok(Ok(rows)) => {
                let (t, c) = rows
                    .first()
                    .map(|r| {
                        (
                            r.first().cloned().flatten().unwrap_or_default(),
                            r.get(1).cloned().flatten().unwrap_or_default(),
                        )
                    })
                    .unwrap_or_default();
                Err(refusal(
                    "0A000",
                    format!("shardgate: sorting or comparing across shards a table with a column of its own collation ({t}.{c}) is not supported: the merge could not follow it"),
                ))
            }
            Ok(Err(e)) => Err(refusal(&e.code, e.message)),
            Err(e) => Err(refusal("08006", format!("shardgate: {e}"))),
        }
    }

    /// The function catalog, loaded now if it is not yet (aggregates must
    /// be known before a query is split).
    async fn loaded_catalog(&mut self) -> std::sync::Arc<crate::router::catalog::Catalog> {
        let catalog = self.catalog();
        if catalog.is_loaded() {
            return catalog;
        }
        let config = self.proxy.config.load_full();
        self.proxy
            .catalogs
            .load(
                &self.login.database,
                &self.primary_pool,
                &config.routing,
                config.pool.checkout_timeout,
            )
            .await;
        self.routing.catalog_recheck_at = None;
        self.catalog()
    }

    /// `shard_sql`: the phase-1 statement of each connection's shard
    /// (empty: the plan's statement for all).
    async fn scatter_phases(
        &mut self,
        plan: &ScatterPlan,
        shards: &[usize],
        shard_sql: &[String],
        conns: &mut Vec<PooledConn>,
        bind: Option<&ScatterBind>,
    ) -> ScatterAnswer {
        let mut notices = Vec::new();
        let max = self.max_message_size;
        // Phase 1: rows come back in the client's formats only when they
        // go straight to it.
        let request = |sql: &str| {
            match bind {
                None => {
                    let mut out = BytesMut::new();
                    fe::build_query(sql).encode(&mut out);
                    out
                }
                Some(b) => {
                    let formats: &[i16] = match plan.merge {
                        Merge::Concat { .. } => &b.result_formats,
                        Merge::Final(_) => &[],
                    };
                    extended_request(sql, &b.types, &b.params, formats)
                }
            }
            .freeze()
        };
        let common = request(&plan.shard_sql);
        // Each connection goes to its own task (the shards answer at once)
        // and comes back in order.
        let mut tasks = Vec::with_capacity(conns.len());
        for (i, mut conn) in std::mem::take(conns).into_iter().enumerate() {
            let req = match shard_sql.get(i) {
                Some(sql) if *sql != plan.shard_sql => request(sql),
                _ => common.clone(),
            };
            tasks.push(tokio::spawn(async move {
                let sent = std::time::Instant::now();
                let r = conn.exchange(&req, max).await;
                (conn, r, sent.elapsed())
            }));
        }
        let mut answers = Vec::with_capacity(tasks.len());
        let mut io_error = None;
        let counting = self.proxy.hotspots.enabled();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await {
                Ok((conn, r, elapsed)) => {
                    conns.push(conn);
                    match r {
                        Ok(frames) => {
                            if let Some(&shard) = shards.get(i).filter(|_| counting) {
                                let (rows, bytes) = frames_load(&frames);
                                self.proxy.hotspots.shard_part(shard, rows, bytes, elapsed);
                            }
                            answers.push(read_answer(frames))
                        }
                        Err(e) => io_error = Some(e.to_string()),
                    }
                }
                Err(e) => io_error = Some(e.to_string()),
            }
        }
        if let (Some(e), _) | (None, Some(e)) = (
            io_error,
            conns.is_empty().then(|| "no connection".to_string()),
        ) {
            return ScatterAnswer {
                notices,
                result: Err(refusal(
                    "08006",
                    format!("shardgate: a shard connection failed: {e}"),
                )),
            };
        }
        for a in &mut answers {
            notices.append(&mut a.notices);
        }
        if let Some(e) = answers.iter_mut().find_map(|a| a.error.take()) {
            return ScatterAnswer {
                notices,
                result: Err(e),
            };
        }
        let Some(description) = answers.iter().find_map(|a| a.description.clone()) else {
            return ScatterAnswer {
                notices,
                result: Err(refusal(
                    "XX000",
                    "shardgate: no row description from the shards".into(),
                )),
            };
        };
        match &plan.merge {
            Merge::Concat { offset, limit } => {
                let rows: Vec<Frame> = answers
                    .into_iter()
                    .flat_map(|a| a.rows)
                    .skip(*offset as usize)
                    .take(limit.map_or(usize::MAX, |l| l as usize))
                    .collect();
                let complete = be::command_complete(&format!("SELECT {}", rows.len()));
                ScatterAnswer {
                    notices,
                    result: Ok((description, rows, complete)),
                }
            }
            Merge::Final(f) => {
                // Phase 2 on the shards in turn.
                self.routing.turn = self.routing.turn.wrapping_add(1);
                let k = self.routing.turn % conns.len();
                let result = self
                    .final_phase(f, &description, answers, &mut conns[k], bind, &mut notices)
                    .await;
                ScatterAnswer { notices, result }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn final_phase(
        &mut self,
        f: &crate::router::scatter::FinalPlan,
        description: &Frame,
        answers: Vec<ShardAnswer>,
        conn: &mut PooledConn,
        bind: Option<&ScatterBind>,
        notices: &mut Vec<Frame>,
    ) -> Result<(Frame, Vec<Frame>, Frame), Frame> {
        let cols = columns(description)
            .ok_or_else(|| refusal("XX000", "shardgate: malformed row description".into()))?;
        let total: usize = answers.iter().map(|a| a.rows.len()).sum();
        if total > MAX_MERGE_ROWS {
            return Err(refusal(
                "54000",
                format!("shardgate: a query across shards would combine {total} rows (at most {MAX_MERGE_ROWS}); add a LIMIT or a sharding key"),
            ));
        }
        let types = self.type_names(conn, &cols).await?;
        let mut rows = Vec::with_capacity(total);
        for a in &answers {
            for r in &a.rows {
                let values = crate::backend::conn::parse_data_row(&r.body)
                    .ok_or_else(|| refusal("XX000", "shardgate: malformed data row".into()))?;
                rows.push(values);
            }
        }
        let names: Vec<String> = cols.iter().map(|c| c.0.clone()).collect();
        let sql = f
            .sql(&rows_sql(&rows, &types), &names, &types)
            .map_err(|what| refusal("0A000", format!("shardgate: {what} is not supported")))?;
        let request = match bind {
            None => {
                let mut out = BytesMut::new();
                fe::build_query(&sql).encode(&mut out);
                out
            }
            Some(b) => extended_request(&sql, &[], &[0, 0, 0, 0], &b.result_formats),
        };
        let frames = conn
            .exchange(&request, self.max_message_size)
            .await
            .map_err(|e| {
                refusal(
                    "08006",
                    format!("shardgate: a shard connection failed: {e}"),
                )
            })?;
        let mut answer = read_answer(frames);
        notices.append(&mut answer.notices);
        if let Some(e) = answer.error {
            return Err(e);
        }
        let description = answer
            .description
            .ok_or_else(|| refusal("XX000", "shardgate: no row description".into()))?;
        let complete = be::command_complete(&format!("SELECT {}", answer.rows.len()));
        Ok((description, answer.rows, complete))
    }

    /// `format_type` names of the columns' types, as the server of `conn`
    /// knows them.
    async fn type_names(
        &mut self,
        conn: &mut PooledConn,
        cols: &[(String, u32)],
    ) -> Result<Vec<String>, Frame> {
        let known = |oid: u32| {
            (oid < FIRST_USER_OID)
                .then(|| crate::read(&self.proxy.type_names.names).get(&oid).cloned())
                .flatten()
        };
        let missing: Vec<u32> = cols
            .iter()
            .map(|c| c.1)
            .filter(|o| known(*o).is_none())
            .collect();
        let mut fetched = HashMap::new();
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|o| o.to_string()).collect();
            let sql = format!(
                "SELECT oid::int8::text, format_type(oid, NULL) FROM pg_catalog.pg_type WHERE oid IN ({})",
                list.join(", ")
            );
            let rows = conn
                .query_rows(&sql)
                .await
                .map_err(|e| refusal("08006", format!("shardgate: {e}")))?
                .map_err(|e| refusal(&e.code, e.message))?;
            for r in rows {
                if let [Some(oid), Some(name)] = r.as_slice() {
                    if let Ok(oid) = oid.parse::<u32>() {
                        fetched.insert(oid, name.clone());
                    }
                }
            }
            let mut cache = crate::write(&self.proxy.type_names.names);
            for (oid, name) in &fetched {
                if *oid < FIRST_USER_OID {
                    cache.insert(*oid, name.clone());
                }
            }
        }
        cols.iter()
            .map(|c| {
                known(c.1)
                    .or_else(|| fetched.get(&c.1).cloned())
                    .ok_or_else(|| refusal("XX000", format!("shardgate: unknown type {}", c.1)))
            })
            .collect()
    }

    /// A statement that only reads (the cross-shard candidates).
    pub(super) fn is_read(&self, sql: &[u8]) -> bool {
        crate::router::classify::leading_keyword(sql).is_some_and(|w| {
            [&b"select"[..], b"with", b"values", b"table"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k))
        })
    }

    /// A Bind of a statement that needs several shards, outside a
    /// transaction: the statement runs now; Describe and Execute of the
    /// portal are answered from the result.
    pub(super) async fn scatter_bind(
        &mut self,
        bind: &fe::Bind<'_>,
        text: &[u8],
        types: Vec<u32>,
        shards: &[usize],
        write: bool,
    ) -> Result<(), super::session::SessionError> {
        let Some((params, result_formats)) = split_bind(bind.rest) else {
            return Err(super::session::SessionError::Fatal {
                code: "08P01".into(),
                message: "invalid Bind message".into(),
            });
        };
        let sql = String::from_utf8_lossy(text).into_owned();
        let portal = bind.portal.to_vec();
        let bind = ScatterBind {
            types,
            params,
            result_formats,
        };
        let answer = if write {
            self.run_multi_write(&sql, shards, Some(&bind)).await
        } else {
            self.run_scatter(&sql, shards, Some(&bind)).await
        };
        // Parses held back for the shard decision: the statement text was
        // analysed (and run) above; the server that runs it later
        // prepares it again.
        for owed in std::mem::take(&mut self.routing.owed) {
            if let super::sharding::Owed::Unnamed(_) = owed {
                self.unnamed_on_server = false;
            }
            self.push_reply(be::empty(be::PARSE_COMPLETE));
        }
        for n in answer.notices {
            self.push_reply(n);
        }
        match answer.result {
            Ok((description, rows, complete)) => {
                self.push_reply(be::empty(be::BIND_COMPLETE));
                self.routing.scatter_portal = Some(ScatterPortal {
                    name: portal,
                    description,
                    rows,
                    complete,
                });
            }
            Err(e) => {
                self.push_reply(e);
                self.skipping = true;
            }
        }
        Ok(())
    }

    /// Describe of the cross-shard portal: answered from its result.
    pub(super) fn scatter_describe(&mut self, kind: u8, name: &str) -> bool {
        let Some(p) = &self.routing.scatter_portal else {
            return false;
        };
        if kind != b'P' || p.name != name.as_bytes() {
            return false;
        }
        let d = p.description.clone();
        self.push_reply(d);
        true
    }

    /// Execute of the cross-shard portal: its rows (at most `max_rows`,
    /// then PortalSuspended, as Postgres does).
    pub(super) fn scatter_execute(&mut self, portal: &[u8], max_rows: i32) -> bool {
        let Some(p) = self.routing.scatter_portal.as_mut() else {
            return false;
        };
        if p.name != portal {
            return false;
        }
        let take = if max_rows > 0 {
            (max_rows as usize).min(p.rows.len())
        } else {
            p.rows.len()
        };
        let rows: Vec<Frame> = p.rows.drain(..take).collect();
        let done = p.rows.is_empty() && (max_rows <= 0 || take < max_rows as usize);
        let complete = p.complete.clone();
        for r in rows {
            self.push_reply(r);
        }
        if done {
            self.push_reply(complete);
        } else {
            self.push_reply(be::empty(be::PORTAL_SUSPENDED));
        }
        true
    }

    /// Close of the cross-shard portal.
    pub(super) fn scatter_close(&mut self, kind: u8, name: &str) -> bool {
        let matches = self
            .routing
            .scatter_portal
            .as_ref()
            .is_some_and(|p| kind == b'P' && p.name == name.as_bytes());
        if matches {
            self.routing.scatter_portal = None;
            self.push_reply(be::empty(be::CLOSE_COMPLETE));
        }
        matches
    }

    fn push_reply(&mut self, frame: Frame) {
        self.pipeline.push_back(super::pipeline::Expect::Synthetic {
            frame,
            client_name: None,
        });
    }

    /// A simple Query that needs several shards, outside a transaction: a
    /// read (`write` false) or a write.
    pub(super) async fn scatter_query(&mut self, sql: &str, shards: &[usize], write: bool) {
        let answer = if write {
            self.run_multi_write(sql, shards, None).await
        } else {
            self.run_scatter(sql, shards, None).await
        };
        self.emit_ready_synthetics();
        for n in answer.notices {
            n.encode(&mut self.to_client);
        }
        match answer.result {
            Ok((description, rows, complete)) => {
                // The simple protocol has no NoData.
                if description.tag != be::NO_DATA {
                    description.encode(&mut self.to_client);
                }
                for r in rows {
                    r.encode(&mut self.to_client);
                }
                complete.encode(&mut self.to_client);
            }
            Err(e) => e.encode(&mut self.to_client),
        }
        be::ready_for_query(b'I').encode(&mut self.to_client);
    }
}
