//! COPY FROM STDIN into a sharded (or reference) table, outside a
//! transaction: a COPY on every shard's primary inside its own
//! transaction, the client's rows split among them by key
//! (`router::copy`), then the same two-phase commit as any write across
//! shards: all rows or none.

use super::multiwrite::{query, release};
use super::session::{Session, SessionError};
use crate::backend::pool::PooledConn;
use crate::protocol::backend as be;
use crate::protocol::frame::decode_frame;
use crate::protocol::frontend as fe;
use crate::protocol::Frame;
use crate::router::copy::{CopyPlan, Piece, RowSplitter};
use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Rows buffered for one shard before they are sent as one CopyData.
const FLUSH_AT: usize = 64 * 1024;

fn copy_data(out: &mut BytesMut, data: &[u8]) {
    out.put_u8(fe::COPY_DATA);
    out.put_i32(data.len() as i32 + 4);
    out.put_slice(data);
}

impl Session {
    /// Runs a COPY FROM STDIN that `plan` describes. Errors reach the
    /// client as an ErrorResponse; the session goes on.
    pub(super) async fn copy_sharded(
        &mut self,
        sql: &str,
        plan: CopyPlan,
    ) -> Result<(), SessionError> {
        let result = self.copy_sharded_inner(sql, &plan).await;
        self.emit_ready_synthetics();
        match result {
            Ok(Ok(rows)) => {
                be::command_complete(&format!("COPY {rows}")).encode(&mut self.to_client)
            }
            Ok(Err(error)) => {
                crate::metrics::count_error(b"0A000");
                error.encode(&mut self.to_client)
            }
            Err(e) => return Err(e),
        }
        be::ready_for_query(b'I').encode(&mut self.to_client);
        Ok(())
    }

    /// Ok(Ok(rows)), Ok(Err(error for the client)), or Err: the session
    /// ends (the client went away).
    async fn copy_sharded_inner(
        &mut self,
        sql: &str,
        plan: &CopyPlan,
    ) -> Result<Result<u64, Frame>, SessionError> {
        let error =
            |code: &str, message: String| Ok(Err(be::error_response("ERROR", code, &message)));
        let Some(map) = self.shard_map() else {
            return error("0A000", "shardgate: no shard map".into());
        };
        let proxy = self.proxy.clone();
        let Some(log) = proxy.twophase.as_ref() else {
            return error(
                "0A000",
                "shardgate: COPY across shards needs the two-phase commit log (proxy.state_dir)"
                    .into(),
            );
        };
        let shards: Vec<usize> = (0..self.proxy.topology.load().shards.len()).collect();
        let mut conns = match self.checkout_each(&shards, false).await {
            Ok(c) => c,
            // The client is told before any data is sent.
            Err((code, message)) => return error(&code, message),
        };
        let max = self.max_message_size;
        // Where the key is in a row.
        let key = match &plan.key {
            None => None,
            Some((column, ty)) => {
                let columns = if plan.columns.is_empty() {
                    match table_columns(&mut conns[0], &plan.table_sql).await {
                        Ok(c) => c,
                        Err(e) => {
                            release(conns);
                            return Ok(Err(e));
                        }
                    }
                } else {
                    plan.columns.clone()
                };
                match columns.iter().position(|c| c == column) {
                    Some(p) => Some((p, *ty)),
                    None => {
                        release(conns);
                        return error(
                            "0A000",
                            format!("shardgate: COPY into sharded table {} must include its sharding column {column}", plan.table),
                        );
                    }
                }
            }
        };
        // BEGIN and the COPY on every shard, up to CopyInResponse.
        let mut response = None;
        // Which connections are in COPY now (they need a CopyFail to leave
        // it if the whole COPY fails).
        let mut copying = vec![false; conns.len()];
        for (i, c) in conns.iter_mut().enumerate() {
            match start_copy(c, sql, max).await {
                Ok(r) => {
                    response = Some(r);
                    copying[i] = true;
                }
                Err(e) => {
                    abort(&mut conns, &copying, max).await;
                    return Ok(Err(e));
                }
            }
        }
        if let Some(r) = response {
            r.encode(&mut self.to_client);
        }
        self.flush_client().await?;
        // Rows, by key, until CopyDone or CopyFail.
        let mut splitter = RowSplitter::new(plan.format.clone(), key);
        let mut outs: Vec<BytesMut> = vec![BytesMut::new(); conns.len()];
        let mut failure: Option<Frame> = None;
        let reference = plan.key.is_none();
        loop {
            let frame = self.next_client_frame().await?;
            match frame.tag {
                fe::COPY_DATA => {
                    if failure.is_some() {
                        continue;
                    }
                    let mut route = |p: Piece| route_piece(&map, reference, p, &mut outs);
                    if let Err(e) = splitter.push(&frame.body, &mut route) {
                        failure = Some(be::error_response(
                            "ERROR",
                            "22P04",
                            &format!("shardgate: {e}"),
                        ));
                    }
                    for (i, out) in outs.iter_mut().enumerate() {
                        if out.len() >= FLUSH_AT {
                            if let Err(e) = conns[i].stream.write_all(out).await {
                                failure = Some(be::error_response(
                                    "ERROR",
                                    "08006",
                                    &format!("shardgate: a shard connection failed: {e}"),
                                ));
                            }
                            out.clear();
                        }
                    }
                }
                fe::COPY_DONE => break,
                fe::COPY_FAIL => {
                    let msg = String::from_utf8_lossy(
                        frame.body.strip_suffix(&[0]).unwrap_or(&frame.body),
                    )
                    .into_owned();
                    failure = Some(be::error_response(
                        "ERROR",
                        "57014",
                        &format!("COPY from stdin failed: {msg}"),
                    ));
                    break;
                }
                // Flush and Sync mean nothing during COPY.
                fe::FLUSH | fe::SYNC => {}
                other => {
                    failure = Some(be::error_response(
                        "ERROR",
                        "08P01",
                        &format!("unexpected message type 0x{other:02x} during COPY from stdin"),
                    ));
                    break;
                }
            }
        }
        if failure.is_none() {
            let mut route = |p: Piece| route_piece(&map, reference, p, &mut outs);
            if let Err(e) = splitter.finish(&mut route) {
                failure = Some(be::error_response(
                    "ERROR",
                    "22P04",
                    &format!("shardgate: {e}"),
                ));
            }
        }
        if let Some(f) = failure {
            abort(&mut conns, &copying, max).await;
            return Ok(Err(f));
        }
        // The rest of the rows, CopyDone, and each shard's count.
        let mut rows = 0u64;
        for i in 0..conns.len() {
            let c = &mut conns[i];
            let mut req = std::mem::take(&mut outs[i]);
            req.put_u8(fe::COPY_DONE);
            req.put_i32(4);
            copying[i] = false;
            let frames = match c.exchange(&req, max).await {
                Ok(f) => f,
                Err(e) => {
                    abort(&mut conns, &copying, max).await;
                    return error(
                        "08006",
                        format!("shardgate: a shard connection failed: {e}"),
                    );
                }
            };
            if let Some(e) = frames.iter().find(|f| f.tag == be::ERROR_RESPONSE) {
                let e = e.clone();
                abort(&mut conns, &copying, max).await;
                return Ok(Err(e));
            }
            rows += frames
                .iter()
                .find(|f| f.tag == be::COMMAND_COMPLETE)
                .and_then(|f| {
                    let tag = String::from_utf8_lossy(f.body.strip_suffix(&[0]).unwrap_or(&f.body))
                        .into_owned();
                    tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok())
                })
                .unwrap_or(0);
        }
        if reference {
            // Every shard got every row: the client copied each once.
            rows /= conns.len().max(1) as u64;
        }
        match super::multiwrite::commit_across(self, conns, &shards, log).await {
            Ok(()) => Ok(Ok(rows)),
            Err(e) => Ok(Err(e)),
        }
    }

    /// The next client message, reading from the socket as needed.
    async fn next_client_frame(&mut self) -> Result<Frame, SessionError> {
        loop {
            match decode_frame(&mut self.client_buf, self.max_message_size) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => {
                    return Err(SessionError::Fatal {
                        code: "08P01".into(),
                        message: format!("invalid message from client: {e}"),
                    })
                }
            }
            self.client_buf.reserve(16 * 1024);
            match self.client.read_buf(&mut self.client_buf).await {
                Ok(0) => return Err(SessionError::ClientGone),
                Ok(_) => {}
                Err(e) => return Err(SessionError::ClientIo(e)),
            }
        }
    }
}

/// Sends a piece of the stream to its shard's buffer (or every shard's).
fn route_piece(
    map: &crate::sharding::map::ShardMap,
    reference: bool,
    p: Piece,
    outs: &mut [BytesMut],
) {
    match p {
        Piece::All(b) => {
            for o in outs.iter_mut() {
                copy_data(o, b);
            }
        }
        Piece::Row(b, key) => {
            if reference {
                for o in outs.iter_mut() {
                    copy_data(o, b);
                }
                return;
            }
            // The splitter knows the key's type; NULL keys go to bucket 0.
            let shard = match &key {
                Some(k) => map.locate(key_type_of(k), k).shard,
                None => map.null_location().shard,
            };
            if let Some(o) = outs.get_mut(shard) {
                copy_data(o, b);
            }
        }
    }
}

/// The hash of a key depends on its value only (every integer type hashes
/// alike), so the value's own kind names a type that hashes it right.
fn key_type_of(k: &crate::sharding::hash::KeyValue) -> crate::sharding::hash::KeyType {
    use crate::sharding::hash::{KeyType, KeyValue};
    match k {
        KeyValue::Int(_) => KeyType::Int8,
        KeyValue::Text(_) => KeyType::Text,
        KeyValue::Uuid(_) => KeyType::Uuid,
    }
}

/// BEGIN, then the COPY statement, up to its CopyInResponse (or the
/// error for the client).
async fn start_copy(c: &mut PooledConn, sql: &str, max: usize) -> Result<Frame, Frame> {
    let lost = |e: String| {
        be::error_response(
            "ERROR",
            "08006",
            &format!("shardgate: a shard connection failed: {e}"),
        )
    };
    let frames = c
        .exchange(&query("BEGIN"), max)
        .await
        .map_err(|e| lost(e.to_string()))?;
    if let Some(e) = frames.into_iter().find(|f| f.tag == be::ERROR_RESPONSE) {
        return Err(e);
    }
    c.stream
        .write_all(&query(sql))
        .await
        .map_err(|e| lost(e.to_string()))?;
    let mut error = None;
    loop {
        let f = c.read_frame().await.map_err(|e| lost(e.to_string()))?;
        match f.tag {
            be::COPY_IN_RESPONSE => return Ok(f),
            be::ERROR_RESPONSE => error = Some(f),
            be::READY_FOR_QUERY => {
                c.tx_status = f.body.first().copied().unwrap_or(b'I');
                return Err(error.unwrap_or_else(|| {
                    be::error_response(
                        "ERROR",
                        "08P01",
                        "shardgate: the shard did not start the COPY",
                    )
                }));
            }
            _ => {}
        }
    }
}

/// Ends a failed COPY on every shard: CopyFail where a COPY still runs
/// (`copying`), then ROLLBACK; the connections go back to their pools.
async fn abort(conns: &mut Vec<PooledConn>, copying: &[bool], max: usize) {
    for (i, c) in conns.iter_mut().enumerate() {
        if copying.get(i).copied().unwrap_or(false) {
            let mut req = BytesMut::new();
            req.put_u8(fe::COPY_FAIL);
            let msg = b"shardgate: COPY aborted\0";
            req.put_i32(4 + msg.len() as i32);
            req.put_slice(msg);
            let _ = c.exchange(&req, max).await;
        }
        let _ = c.exchange(&query("ROLLBACK"), max).await;
    }
    release(std::mem::take(conns));
}

/// The table's column names in order (COPY without a column list).
async fn table_columns(c: &mut PooledConn, table_sql: &str) -> Result<Vec<String>, Frame> {
    let sql = format!(
        "SELECT attname::text FROM pg_catalog.pg_attribute WHERE attrelid = '{}'::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
        table_sql.replace('\'', "''")
    );
    match c.query_rows(&sql).await {
        Ok(Ok(rows)) => Ok(rows
            .into_iter()
            .filter_map(|mut r| r.pop().flatten())
            .collect()),
        Ok(Err(e)) => Err(be::error_response("ERROR", &e.code, &e.message)),
        Err(e) => Err(be::error_response("ERROR", "08006", &e.to_string())),
    }
}
