//! Running a write that spans shards (a multi-row INSERT whose rows belong
//! to several shards, an UPDATE/DELETE without a sharding key, DDL on a
//! sharded or reference table, a write to a reference table) as one atomic
//! statement: each shard's part in its own transaction on the shard's
//! primary, every part prepared, the decision logged (`twophase`), then
//! every part committed. Any part failing rolls every part back, and the
//! client gets that part's error.
//!
//! Only outside a transaction (a transaction holds one shard's server).

use super::scatter::{ScatterAnswer, ScatterBind};
use super::session::Session;
use crate::backend::pool::PooledConn;
use crate::protocol::backend as be;
use crate::protocol::frontend as fe;
use crate::protocol::Frame;
use crate::router::shard::WritePart;
use bytes::{BufMut, BytesMut};

/// Pauses for the crash tests (`SHARDGATE_FAILPOINT`): the test kills the
/// proxy while it waits after every part is prepared (`twophase-prepared`,
/// before the decision) or after the decision is logged
/// (`twophase-decided`, before any COMMIT PREPARED).
async fn failpoint(name: &str, gid: &str) {
    static F: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let armed = F.get_or_init(|| std::env::var("SHARDGATE_FAILPOINT").ok());
    if armed.as_deref() == Some(name) {
        tracing::warn!(%gid, failpoint = name, "pausing at failpoint");
        std::future::pending::<()>().await;
    }
}

/// One shard's part: what it answered, and whether it is prepared.
struct PartOutcome {
    frames: Vec<Frame>,
    error: Option<Frame>,
    prepared: bool,
}

pub(super) fn query(sql: &str) -> BytesMut {
    let mut out = BytesMut::new();
    fe::build_query(sql).encode(&mut out);
    out
}

/// A part in the extended protocol with the client's parameters it uses.
fn part_request(part: &WritePart, bind: &ScatterBind) -> Option<BytesMut> {
    let values = super::sharding::bind_values(&bind.params)?;
    let (types, formats, params) = match &part.params {
        None => (
            bind.types.clone(),
            values.formats.clone(),
            values.values.clone(),
        ),
        Some(used) => {
            let format_of = |i: usize| match values.formats.as_slice() {
                [] => 0,
                [one] => *one,
                many => many.get(i).copied().unwrap_or(0),
            };
            let types: Vec<u32> = used
                .iter()
                .map(|i| bind.types.get(*i).copied().unwrap_or(0))
                .collect();
            let formats: Vec<i16> = used.iter().map(|i| format_of(*i)).collect();
            let params: Vec<Option<&[u8]>> = used
                .iter()
                .map(|i| values.values.get(*i).copied().flatten())
                .collect();
            (types, formats, params)
        }
    };
    let mut rest = BytesMut::new();
    rest.put_i16(formats.len() as i16);
    for f in &formats {
        rest.put_i16(*f);
    }
    rest.put_i16(params.len() as i16);
    for p in &params {
        match p {
            None => rest.put_i32(-1),
            Some(v) => {
                rest.put_i32(v.len() as i32);
                rest.put_slice(v);
            }
        }
    }
    Some(super::scatter::extended_request(
        &part.sql,
        &types,
        &rest,
        &bind.result_formats,
    ))
}

/// Runs BEGIN, the part, and PREPARE TRANSACTION (or ROLLBACK after an
/// error) on one connection.
async fn run_part(conn: &mut PooledConn, request: &[u8], gid: &str, max: usize) -> PartOutcome {
    let failed = |e: String| PartOutcome {
        frames: Vec::new(),
        error: Some(be::error_response(
            "ERROR",
            "08006",
            &format!("shardgate: a shard connection failed: {e}"),
        )),
        prepared: false,
    };
    match conn.exchange(&query("BEGIN"), max).await {
        Ok(f) if !f.iter().any(|f| f.tag == be::ERROR_RESPONSE) => {}
        Ok(f) => {
            return PartOutcome {
                error: f.into_iter().find(|f| f.tag == be::ERROR_RESPONSE),
                frames: Vec::new(),
                prepared: false,
            }
        }
        Err(e) => return failed(e.to_string()),
    }
    let frames = match conn.exchange(request, max).await {
        Ok(f) => f,
        Err(e) => return failed(e.to_string()),
    };
    let error = frames.iter().find(|f| f.tag == be::ERROR_RESPONSE).cloned();
    if error.is_some() {
        let _ = conn.exchange(&query("ROLLBACK"), max).await;
        return PartOutcome {
            frames,
            error,
            prepared: false,
        };
    }
    match conn
        .exchange(&query(&format!("PREPARE TRANSACTION '{gid}'")), max)
        .await
    {
        Ok(f) => {
            let error = f.into_iter().find(|f| f.tag == be::ERROR_RESPONSE);
            PartOutcome {
                prepared: error.is_none(),
                frames,
                error,
            }
        }
        Err(e) => failed(e.to_string()),
    }
}

/// Adds up the row counts of the parts' command tags (`INSERT 0 n`,
/// `UPDATE n`, `DELETE n`); other tags are the first part's.
fn combined_tag(tags: &[String]) -> String {
    let Some(first) = tags.first() else {
        return String::new();
    };
    let Some((head, _)) = first.rsplit_once(' ') else {
        return first.clone();
    };
    let counts: Option<Vec<u64>> = tags
        .iter()
        .map(|t| t.rsplit_once(' ').and_then(|(_, n)| n.parse().ok()))
        .collect();
    match counts {
        Some(c)
            if matches!(
                head.split(' ').next(),
                Some("INSERT" | "UPDATE" | "DELETE" | "MERGE")
            ) =>
        {
            format!("{head} {}", c.iter().sum::<u64>())
        }
        _ => first.clone(),
    }
}

impl Session {
    /// Runs a write across shards atomically. Never holds a server
    /// afterwards.
    pub(super) async fn run_multi_write(
        &mut self,
        sql: &str,
        shards: &[usize],
        bind: Option<&ScatterBind>,
    ) -> ScatterAnswer {
        let fail = |code: &str, message: String| ScatterAnswer {
            notices: Vec::new(),
            result: Err(be::error_response("ERROR", code, &message)),
        };
        let Some(map) = self.shard_map() else {
            return fail("0A000", "shardgate: no shard map".into());
        };
        if self.proxy.twophase.is_none() {
            return fail(
                "0A000",
                "shardgate: writes across shards need the two-phase commit log (proxy.state_dir), which could not be opened".into(),
            );
        }
        let values = bind.and_then(|b| super::sharding::bind_values(&b.params));
        let params = match (bind, &values) {
            (Some(b), Some(v)) => Some(crate::router::shard::Params {
                types: &b.types,
                formats: &v.formats,
                values: &v.values,
            }),
            _ => None,
        };
        let parts = match crate::router::shard::split_write(&map, sql, shards, params.as_ref()) {
            Ok(p) => p,
            Err(what) => return fail("0A000", format!("shardgate: {what} is not supported")),
        };
        if parts.len() == 1 {
            // All rows on one shard after all (keys resolved by value).
            return self.run_single_part(&parts[0], bind).await;
        }
        let shards: Vec<usize> = parts.iter().map(|p| p.shard).collect();
        let conns = match self.checkout_each(&shards, false).await {
            Ok(c) => c,
            Err((code, message)) => return fail(&code, message),
        };
        let proxy = self.proxy.clone();
        let log = proxy.twophase.as_ref().expect("checked");
        let gid = log.new_gid();
        let max = self.max_message_size;
        let mut tasks = Vec::new();
        for (mut conn, part) in conns.into_iter().zip(&parts) {
            let request = match bind {
                None => Some(query(&part.sql)),
                Some(b) => part_request(part, b),
            };
            let gid = gid.clone();
            let shard = part.shard;
            tasks.push(tokio::spawn(async move {
                let sent = std::time::Instant::now();
                let outcome = match request {
                    Some(r) => run_part(&mut conn, &r, &gid, max).await,
                    None => PartOutcome {
                        frames: Vec::new(),
                        error: Some(be::error_response("ERROR", "08P01", "invalid Bind message")),
                        prepared: false,
                    },
                };
                (conn, outcome, shard, sent.elapsed())
            }));
        }
        let mut done = Vec::new();
        let counting = self.proxy.hotspots.enabled();
        for t in tasks {
            if let Ok((conn, outcome, shard, elapsed)) = t.await {
                if counting {
                    let (rows, bytes) = super::scatter::frames_load(&outcome.frames);
                    self.proxy.hotspots.shard_part(shard, rows, bytes, elapsed);
                }
                done.push((conn, outcome));
            }
        }
        let all_prepared = done.len() == parts.len() && done.iter().all(|(_, o)| o.prepared);
        if !all_prepared {
            count_outcome("rolled_back");
            // Roll back what was prepared; the client gets the first error.
            let error = done
                .iter()
                .find_map(|(_, o)| o.error.clone())
                .unwrap_or_else(|| {
                    be::error_response("ERROR", "08006", "shardgate: a shard part was lost")
                });
            for (conn, o) in &mut done {
                if o.prepared {
                    let _ = conn
                        .exchange(&query(&format!("ROLLBACK PREPARED '{gid}'")), max)
                        .await;
                }
            }
            release(done.into_iter().map(|(c, _)| c));
            return ScatterAnswer {
                notices: Vec::new(),
                result: Err(error),
            };
        }
        let (conns, outcomes): (Vec<PooledConn>, Vec<PartOutcome>) = done.into_iter().unzip();
        if let Err(e) = decide_and_commit(self, conns, &shards, &gid, log).await {
            return ScatterAnswer {
                notices: Vec::new(),
                result: Err(e),
            };
        }
        ScatterAnswer {
            notices: Vec::new(),
            result: Ok(merge_outcomes(outcomes)),
        }
    }

    /// A write whose rows all belong to one shard: run like any statement
    /// there (no two-phase commit needed).
    async fn run_single_part(
        &mut self,
        part: &WritePart,
        bind: Option<&ScatterBind>,
    ) -> ScatterAnswer {
        let fail = |code: &str, message: String| ScatterAnswer {
            notices: Vec::new(),
            result: Err(be::error_response("ERROR", code, &message)),
        };
        self.select_shard(part.shard);
        if let Err((code, message)) = self.checkout(false).await {
            return fail(&code, message);
        }
        let Some(mut conn) = self.server.take() else {
            return fail("08006", "shardgate: no connection".into());
        };
        self.left_server();
        let request = match bind {
            None => Some(query(&part.sql)),
            Some(b) => part_request(part, b),
        };
        let Some(request) = request else {
            return fail("08P01", "invalid Bind message".into());
        };
        let max = self.max_message_size;
        let mut request = request;
        request.extend_from_slice(&query(LSN_SQL));
        let outcome = match conn.exchange_n(&request, max, 2).await {
            Ok(mut frames) => {
                // The position probe's answer is the proxy's.
                let probe_at = frames
                    .iter()
                    .position(|f| f.tag == be::READY_FOR_QUERY)
                    .map_or(frames.len(), |i| i + 1);
                let probe = frames.split_off(probe_at);
                if let Some(lsn) = commit_position(&probe) {
                    self.note_commit_lsn(part.shard, lsn);
                }
                PartOutcome {
                    error: frames.iter().find(|f| f.tag == be::ERROR_RESPONSE).cloned(),
                    frames,
                    prepared: true,
                }
            }
            Err(e) => PartOutcome {
                frames: Vec::new(),
                error: Some(be::error_response("ERROR", "08006", &e.to_string())),
                prepared: false,
            },
        };
        release(std::iter::once(conn));
        if let Some(e) = outcome.error {
            return ScatterAnswer {
                notices: Vec::new(),
                result: Err(e),
            };
        }
        ScatterAnswer {
            notices: Vec::new(),
            result: Ok(merge_outcomes(vec![outcome])),
        }
    }
}

/// Prepares the open transaction on every connection (`shards[i]` is the
/// shard of `conns[i]`), then decides and commits: a write across shards
/// whose statements have run (COPY).
pub(super) async fn commit_across(
    s: &mut Session,
    mut conns: Vec<PooledConn>,
    shards: &[usize],
    log: &crate::twophase::DecisionLog,
) -> Result<(), Frame> {
    let gid = log.new_gid();
    let max = s.max_message_size;
    let mut prepared = 0;
    let mut error = None;
    for c in conns.iter_mut() {
        match c
            .exchange(&query(&format!("PREPARE TRANSACTION '{gid}'")), max)
            .await
        {
            Ok(f) => match f.into_iter().find(|f| f.tag == be::ERROR_RESPONSE) {
                None => prepared += 1,
                Some(e) => {
                    error = Some(e);
                    break;
                }
            },
            Err(e) => {
                error = Some(be::error_response("ERROR", "08006", &e.to_string()));
                break;
            }
        }
    }
    if let Some(e) = error {
        count_outcome("rolled_back");
        for (i, c) in conns.iter_mut().enumerate() {
            let undo = if i < prepared {
                format!("ROLLBACK PREPARED '{gid}'")
            } else {
                "ROLLBACK".to_string()
            };
            let _ = c.exchange(&query(&undo), max).await;
        }
        release(conns);
        return Err(e);
    }
    decide_and_commit(s, conns, shards, &gid, log).await
}

fn count_outcome(outcome: &str) {
    crate::metrics::GLOBAL
        .twophase
        .with_label_values(&[outcome])
        .inc();
}

/// Every connection holds a transaction prepared as `gid`: log the
/// decision (durably), then COMMIT PREPARED everywhere and learn the
/// commit positions (read-your-writes). A commit that does not reach a
/// shard is left to the background recovery: the decision stands.
async fn decide_and_commit(
    s: &mut Session,
    mut conns: Vec<PooledConn>,
    shards: &[usize],
    gid: &str,
    log: &crate::twophase::DecisionLog,
) -> Result<(), Frame> {
    let max = s.max_message_size;
    failpoint("twophase-prepared", gid).await;
    if let Err(e) = log.commit(gid) {
        count_outcome("rolled_back");
        for conn in conns.iter_mut() {
            let _ = conn
                .exchange(&query(&format!("ROLLBACK PREPARED '{gid}'")), max)
                .await;
        }
        release(conns);
        return Err(be::error_response(
            "ERROR",
            "58030",
            &format!("shardgate: cannot record the commit decision: {e}"),
        ));
    }
    count_outcome("committed");
    failpoint("twophase-decided", gid).await;
    let mut tasks = Vec::new();
    for (mut conn, shard) in conns.into_iter().zip(shards.iter().copied()) {
        let gid = gid.to_string();
        tasks.push(tokio::spawn(async move {
            // The commit, then the position read-your-writes needs.
            let mut request = query(&format!("COMMIT PREPARED '{gid}'"));
            request.extend_from_slice(&query(LSN_SQL));
            let r = conn.exchange_n(&request, max, 2).await;
            let ok = matches!(&r, Ok(f) if !f.iter().any(|f| f.tag == be::ERROR_RESPONSE));
            let lsn = r.ok().and_then(|f| commit_position(&f));
            (conn, ok, shard, lsn)
        }));
    }
    let mut all_committed = true;
    let mut conns = Vec::new();
    for t in tasks {
        match t.await {
            Ok((conn, ok, shard, lsn)) => {
                all_committed &= ok;
                conns.push(conn);
                if let Some(lsn) = lsn {
                    s.note_commit_lsn(shard, lsn);
                }
            }
            Err(_) => all_committed = false,
        }
    }
    release(conns);
    if all_committed {
        let _ = log.done(gid);
    } else {
        tracing::warn!(%gid, "COMMIT PREPARED did not reach every shard; recovery will retry");
    }
    Ok(())
}

/// The commit position read after a write (read-your-writes).
const LSN_SQL: &str = "SELECT pg_current_wal_insert_lsn()::text";

/// The position in the answer to [`LSN_SQL`].
fn commit_position(frames: &[Frame]) -> Option<u64> {
    let row = frames.iter().rev().find(|f| f.tag == be::DATA_ROW)?;
    let values = crate::backend::conn::parse_data_row(&row.body)?;
    crate::health::parse_lsn(values.first()?.as_deref()?)
}

/// The parts' answers as one: the first RowDescription (or NoData), every
/// row, and a command tag with the summed count.
fn merge_outcomes(outcomes: Vec<PartOutcome>) -> (Frame, Vec<Frame>, Frame) {
    let mut description = None;
    let mut rows = Vec::new();
    let mut tags = Vec::new();
    for o in outcomes {
        for f in o.frames {
            match f.tag {
                be::ROW_DESCRIPTION | be::NO_DATA if description.is_none() => description = Some(f),
                be::DATA_ROW => rows.push(f),
                be::COMMAND_COMPLETE => {
                    let tag = f.body.strip_suffix(&[0]).unwrap_or(&f.body);
                    tags.push(String::from_utf8_lossy(tag).into_owned());
                }
                _ => {}
            }
        }
    }
    (
        description.unwrap_or_else(|| be::empty(be::NO_DATA)),
        rows,
        be::command_complete(&combined_tag(&tags)),
    )
}

/// Returns connections to their pools (closing any left mid-transaction).
pub(super) fn release(conns: impl IntoIterator<Item = PooledConn>) {
    for mut c in conns {
        if c.broken || c.tx_status != b'I' {
            drop(deadpool::managed::Object::take(c));
        } else {
            c.last_released = std::time::Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_add_up() {
        let t = |v: &[&str]| combined_tag(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(t(&["INSERT 0 2", "INSERT 0 3"]), "INSERT 0 5");
        assert_eq!(t(&["UPDATE 1", "UPDATE 0", "UPDATE 4"]), "UPDATE 5");
        assert_eq!(t(&["CREATE TABLE", "CREATE TABLE"]), "CREATE TABLE");
        assert_eq!(t(&["CREATE INDEX", "CREATE INDEX"]), "CREATE INDEX");
    }
}
