//! Messages from the server: forwarded as raw bytes in the order they
//! arrive, while the few that matter are inspected to pop the pipeline,
//! drop answers to injected messages, slot in the proxy's own answers,
//! and learn transaction status, parameters and session changes.
//!
//! Large messages (DataRow, CopyData) are forwarded as they stream in,
//! without waiting for the whole message.

use super::pipeline::Expect;
use super::session::{Session, SessionError};
use crate::metrics::count_error;
use crate::protocol::backend as be;
use crate::protocol::frame::peek_header;
use bytes::{Buf, BytesMut};

/// Below this, forwarding copies (cheaper than giving up the read
/// buffer's allocation); above it, bytes go to the client without a copy.
const ZERO_COPY_MIN: usize = 8192;

/// What happens to one server message.
enum Action {
    Forward,
    Drop,
    Replace(crate::protocol::Frame),
    /// Keep the message back (a replica's answer that may still be thrown
    /// away for a retry elsewhere).
    Hold,
    /// Send what was held, then this message.
    Release,
}

/// Messages that never change session or pipeline state.
fn passes_through(tag: u8) -> bool {
    matches!(
        tag,
        be::DATA_ROW | be::COPY_DATA | be::COPY_DONE | be::NOTICE_RESPONSE | be::NOTIFICATION
    )
}

impl Session {
    pub(super) fn handle_server_bytes(&mut self) -> Result<(), SessionError> {
        let Some(server) = self.server.as_mut() else {
            return Ok(());
        };
        let mut buf = std::mem::take(&mut server.read_buf);
        let result = self.scan_server_bytes(&mut buf);
        if let Some(server) = self.server.as_mut() {
            server.read_buf = buf;
        }
        result
    }

    fn scan_server_bytes(&mut self, buf: &mut BytesMut) -> Result<(), SessionError> {
        let mut pos = self.pass_through.min(buf.len());
        self.pass_through -= pos;
        let mut start = 0;
        while pos < buf.len() {
            let header =
                peek_header(&buf[pos..], usize::MAX).map_err(|e| self.desync(&e.to_string()))?;
            let Some((tag, total)) = header else { break };
            if passes_through(tag)
                && self.routing.retry.is_none()
                && !matches!(self.pipeline.front(), Some(Expect::LsnProbe))
            {
                if pos + total <= buf.len() {
                    pos += total;
                } else {
                    self.pass_through = pos + total - buf.len();
                    pos = buf.len();
                }
                continue;
            }
            if pos + total > buf.len() {
                buf.reserve(pos + total - buf.len());
                break;
            }
            let action = self.on_server_message(tag, &buf[pos + 5..pos + total])?;
            match action {
                Action::Forward => pos += total,
                Action::Drop | Action::Replace(_) => {
                    self.to_client.extend_from_slice(&buf[start..pos]);
                    if let Action::Replace(f) = action {
                        f.encode(&mut self.to_client);
                    }
                    pos += total;
                    start = pos;
                }
                Action::Hold => {
                    self.to_client.extend_from_slice(&buf[start..pos]);
                    self.routing.held.extend_from_slice(&buf[pos..pos + total]);
                    pos += total;
                    start = pos;
                }
                Action::Release => {
                    self.to_client.extend_from_slice(&buf[start..pos]);
                    self.to_client.extend_from_slice(&self.routing.held);
                    self.routing.held.clear();
                    start = pos;
                    pos += total;
                }
            }
            if matches!(self.pipeline.front(), Some(Expect::Synthetic { .. })) {
                self.to_client.extend_from_slice(&buf[start..pos]);
                start = pos;
                self.emit_ready_synthetics();
            }
        }
        if start == 0 && pos >= ZERO_COPY_MIN && self.to_client.is_empty() {
            // A large run of untouched server bytes (a result set streaming
            // through): hand the bytes themselves to the client writer
            // instead of copying them.
            self.to_client = buf.split_to(pos);
            self.to_client_shares_read_buf = true;
        } else {
            self.to_client.extend_from_slice(&buf[start..pos]);
            buf.advance(pos);
        }
        Ok(())
    }

    fn desync(&mut self, what: &str) -> SessionError {
        if let Some(s) = self.server.as_mut() {
            s.broken = true;
        }
        tracing::error!(what, "server protocol out of step; closing the session");
        SessionError::Fatal {
            code: "08P01".into(),
            message: format!("shardgate: server protocol out of step ({what})"),
        }
    }

    fn on_server_message(&mut self, tag: u8, body: &[u8]) -> Result<Action, SessionError> {
        match self.pipeline.front() {
            Some(Expect::LsnProbe) => {
                self.on_lsn_probe_message(tag, body);
                return Ok(Action::Drop);
            }
            _ if self.routing.retry.is_some() => return self.on_retryable_answer(tag, body),
            _ => {}
        }
        self.on_server_message_inner(tag, body)
    }

    fn on_server_message_inner(&mut self, tag: u8, body: &[u8]) -> Result<Action, SessionError> {
        match tag {
            be::READY_FOR_QUERY => {
                let status = body.first().copied().unwrap_or(b'I');
                while let Some(e) = self.pipeline.pop_front() {
                    if e.is_sync_point() {
                        break;
                    }
                    self.undo(e);
                }
                self.copy_in = false;
                self.routing.drop_begin_tag = false;
                let server = self.server.as_mut().expect("attached");
                server.tx_status = status;
                if let Some(t) = self.request_started.take() {
                    let now = std::time::Instant::now();
                    // (The release that usually follows reads it too.)
                    self.answered_at = Some(now);
                    let elapsed = now.saturating_duration_since(t);
                    self.pool
                        .metrics
                        .query_duration
                        .observe(elapsed.as_secs_f64());
                    if self.shard_map.is_some() && self.proxy.hotspots.enabled() {
                        self.proxy.hotspots.answered(
                            self.shard,
                            &mut self.routing.load,
                            elapsed,
                            now,
                        );
                    }
                }
                if !self.pipeline.is_empty() {
                    self.request_started = Some(std::time::Instant::now());
                }
                Ok(Action::Forward)
            }
            be::ERROR_RESPONSE => {
                self.copy_in = false;
                let code = be::error_code(body);
                if code.is_some_and(|c| c.starts_with(b"57P") || c.starts_with(b"08")) {
                    // Admin shutdown, crash, connection failure: the server
                    // will close; never reuse it.
                    if let Some(s) = self.server.as_mut() {
                        s.broken = true;
                    }
                    let fields = be::parse_error(body);
                    if matches!(fields.severity.as_str(), "FATAL" | "PANIC")
                        && self.primary_loss_recoverable()
                    {
                        // The primary is going away; the client keeps its
                        // session and hears of it when the connection
                        // closes (`recover_primary_loss`).
                        self.routing.lost_error = Some(fields);
                        return Ok(Action::Drop);
                    }
                }
                match self.pipeline.front() {
                    Some(Expect::Query | Expect::FunctionCall) | None => {
                        count_error(&code.unwrap_or(*b"XX000"));
                        Ok(Action::Forward)
                    }
                    Some(_) => {
                        let first = self.pipeline.pop_front().expect("front exists");
                        let action = match first {
                            Expect::ErrorInstead { error } => {
                                count_error(&be::error_code(&error.body).unwrap_or(*b"XX000"));
                                Action::Replace(error)
                            }
                            other => {
                                count_error(&code.unwrap_or(*b"XX000"));
                                self.undo(other);
                                Action::Forward
                            }
                        };
                        // The server skips everything up to the next Sync.
                        while let Some(e) = self.pipeline.front() {
                            if matches!(e, Expect::Sync) {
                                break;
                            }
                            let e = self.pipeline.pop_front().expect("front exists");
                            self.undo(e);
                        }
                        if self.pipeline.is_empty() {
                            self.skipping = true;
                        }
                        Ok(action)
                    }
                }
            }
            be::PARAMETER_STATUS => {
                if let Some(s) = self.server.as_mut() {
                    s.note_parameter(body);
                }
                Ok(Action::Forward)
            }
            be::PARSE_COMPLETE => match self.pipeline.pop_front() {
                Some(Expect::Parse { stmt, injected, .. }) => {
                    if let Some(stmt) = stmt {
                        self.proxy.statements.mark_validated(&stmt.key);
                    }
                    Ok(if injected {
                        Action::Drop
                    } else {
                        Action::Forward
                    })
                }
                _ => Err(self.desync("unexpected ParseComplete")),
            },
            be::BIND_COMPLETE => self.expect_pop(|e| matches!(e, Expect::Bind), "BindComplete"),
            be::CLOSE_COMPLETE => self.expect_pop(|e| matches!(e, Expect::Close), "CloseComplete"),
            be::PARAMETER_DESCRIPTION => Ok(match self.pipeline.front() {
                Some(Expect::ShapeCheck { .. }) => Action::Drop,
                _ => Action::Forward,
            }),
            be::ROW_DESCRIPTION | be::NO_DATA => match self.pipeline.front() {
                Some(Expect::Describe) => {
                    self.pipeline.pop_front();
                    Ok(Action::Forward)
                }
                Some(Expect::ShapeCheck { .. }) => {
                    if let Some(Expect::ShapeCheck { stmt, record }) = self.pipeline.pop_front() {
                        let shape = if tag == be::ROW_DESCRIPTION {
                            super::statements::shape_of(body)
                        } else {
                            bytes::Bytes::new()
                        };
                        if record {
                            let _ = stmt.shape.set(shape);
                        } else if stmt.shape.get().is_some_and(|known| *known != shape) {
                            stmt.stale.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                    Ok(Action::Drop)
                }
                _ => Ok(Action::Forward),
            },
            be::COMMAND_COMPLETE | be::EMPTY_QUERY | be::PORTAL_SUSPENDED => {
                match self.pipeline.front() {
                    Some(Expect::Query) if self.routing.drop_begin_tag => {
                        // The deferred BEGIN's own tag: the client had it.
                        self.routing.drop_begin_tag = false;
                        if tag == be::COMMAND_COMPLETE && be::command_tag(body) == b"BEGIN" {
                            return Ok(Action::Drop);
                        }
                    }
                    Some(Expect::Query) => {}
                    Some(Expect::Execute) => {
                        self.pipeline.pop_front();
                    }
                    _ => return Err(self.desync("unexpected command completion")),
                }
                if tag == be::COMMAND_COMPLETE {
                    self.note_command_tag(be::command_tag(body));
                }
                Ok(Action::Forward)
            }
            be::COPY_IN_RESPONSE => {
                self.copy_in = true;
                // Syncs the client pipelined behind the COPY are ignored by
                // a server in copy-in mode: no ReadyForQuery comes for them.
                let mut i = 1;
                while i < self.pipeline.len() {
                    if matches!(self.pipeline[i], Expect::Sync) {
                        self.pipeline.remove(i);
                    } else {
                        i += 1;
                    }
                }
                Ok(Action::Forward)
            }
            _ => Ok(Action::Forward),
        }
    }

    /// A server message while the request could still be re-run elsewhere
    /// (`routing.retry`): a simple Query refused as a write (25006) is
    /// dropped with everything up to its ReadyForQuery and re-run on the
    /// primary; a replica backend's FATAL for a shutdown (57P01, 57P02)
    /// is dropped and the read re-run when the connection closes; the
    /// answers that come before any result (ParseComplete, BindComplete,
    /// descriptions) are held back; the first result, error or anything
    /// else commits the request to this server and releases what was
    /// held.
    fn on_retryable_answer(&mut self, tag: u8, body: &[u8]) -> Result<Action, SessionError> {
        if self.routing.retry_on_primary {
            if tag == be::READY_FOR_QUERY {
                while let Some(e) = self.pipeline.pop_front() {
                    if e.is_sync_point() {
                        break;
                    }
                }
                if let Some(s) = self.server.as_mut() {
                    s.tx_status = body.first().copied().unwrap_or(b'I');
                }
                self.request_started = None;
            }
            return Ok(Action::Drop);
        }
        if tag == be::ERROR_RESPONSE
            && self.on_replica.is_some()
            && matches!(be::error_code(body), Some(c) if &c == b"57P01" || &c == b"57P02")
        {
            // The replica's backend is ending before the read produced
            // anything (a fast or immediate shutdown, a crash elsewhere on
            // that server, pg_terminate_backend): Postgres closes the
            // connection after this FATAL, and the read is re-run
            // elsewhere then (`on_server_eof`).
            return Ok(Action::Drop);
        }
        let simple = matches!(self.pipeline.front(), Some(Expect::Query));
        if simple && tag == be::ERROR_RESPONSE && be::error_code(body) == Some(*b"25006") {
            self.routing.retry_on_primary = true;
            self.routing.held.clear();
            return Ok(Action::Drop);
        }
        let holdable = matches!(
            tag,
            be::PARSE_COMPLETE
                | be::BIND_COMPLETE
                | be::CLOSE_COMPLETE
                | be::PARAMETER_DESCRIPTION
                | be::ROW_DESCRIPTION
                | be::NO_DATA
                | be::NOTICE_RESPONSE
                | be::PARAMETER_STATUS
        );
        let action = self.on_server_message_inner(tag, body)?;
        if holdable {
            return Ok(match action {
                Action::Forward => Action::Hold,
                Action::Replace(f) => {
                    f.encode(&mut self.routing.held);
                    Action::Drop
                }
                other => other,
            });
        }
        if let Some(mut frames) = self.routing.retry.take() {
            // A long request's list is not kept.
            if frames.capacity() <= 16 {
                frames.clear();
                self.routing.retry_spare = frames;
            }
        }
        Ok(match action {
            Action::Forward => Action::Release,
            Action::Replace(f) => {
                self.to_client.extend_from_slice(&self.routing.held);
                self.routing.held.clear();
                Action::Replace(f)
            }
            other => {
                self.to_client.extend_from_slice(&self.routing.held);
                self.routing.held.clear();
                other
            }
        })
    }

    fn expect_pop(
        &mut self,
        ok: impl Fn(&Expect) -> bool,
        what: &str,
    ) -> Result<Action, SessionError> {
        match self.pipeline.front() {
            Some(e) if ok(e) => {
                self.pipeline.pop_front();
                Ok(Action::Forward)
            }
            _ => Err(self.desync(&format!("unexpected {what}"))),
        }
    }

    fn note_command_tag(&mut self, tag: &[u8]) {
        self.vars.note_command(tag);
        self.routing.load.rows += crate::hotspot::rows_of_tag(tag);
        if matches!(tag, b"DISCARD ALL" | b"DEALLOCATE ALL") {
            // The server dropped every prepared statement of the session,
            // ours included; the client's are gone as Postgres says.
            self.statements.clear();
            self.unnamed_parse = None;
            if let Some(s) = self.server.as_mut() {
                s.prepared.clear();
            }
        }
    }

    /// Reverts what the proxy assumed when it sent a message the server
    /// then failed or skipped.
    pub(super) fn undo(&mut self, e: Expect) {
        match e {
            Expect::Parse {
                stmt, client_name, ..
            } => {
                if let (Some(stmt), Some(server)) = (&stmt, self.server.as_mut()) {
                    server.prepared.remove(&stmt.id);
                }
                if let Some(name) = client_name {
                    self.statements.remove(&name);
                }
                if stmt.is_none() {
                    // A failed unnamed Parse leaves no unnamed statement.
                    self.unnamed_on_server = false;
                    self.unnamed_parse = None;
                }
            }
            Expect::Synthetic {
                client_name: Some(name),
                ..
            } => {
                self.statements.remove(&name);
            }
            _ => {}
        }
    }
}
