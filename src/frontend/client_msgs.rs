//! Messages from the client: decide per message whether it is forwarded
//! raw, rewritten (prepared statement names), answered by the proxy, or
//! refused, and record what response the server now owes. This is the
//! general (async) path; `inline` handles the common messages that need
//! nothing awaited.

use super::pipeline::Expect;
use super::session::{Session, SessionError};
use crate::config::PoolMode;
use crate::protocol::backend as be;
use crate::protocol::frame::{decode_frame, peek_header, Frame, FrameRef};
use crate::protocol::frontend as fe;
use std::sync::Arc;
use std::time::Instant;

impl Session {
    /// Handles every complete message in the client buffer.
    pub(super) async fn handle_client_messages(&mut self) -> Result<(), SessionError> {
        loop {
            if self.must_wait_for_replica() {
                self.routing.paused = true;
                break;
            }
            // Messages handled inline other than Parse are read in place:
            // no frame is split off the buffer (which takes a reference on
            // it and drops it again, per message).
            if let Ok(Some((tag, total))) = peek_header(&self.client_buf, self.max_message_size) {
                if tag != fe::PARSE
                    && total <= self.client_buf.len()
                    && self.inline_ok(tag, (total > 5).then(|| self.client_buf[5]))
                {
                    let buf = std::mem::take(&mut self.client_buf);
                    let result = self.dispatch_in_place(
                        FrameRef {
                            tag,
                            body: &buf[5..total],
                        },
                        &buf[total..],
                    );
                    self.client_buf = buf;
                    if result? {
                        bytes::Buf::advance(&mut self.client_buf, total);
                        continue;
                    }
                    // Not handled: the general path takes it from the buffer.
                }
            }
            let frame = match decode_frame(&mut self.client_buf, self.max_message_size) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    return Err(SessionError::Fatal {
                        code: "08P01".into(),
                        message: format!("invalid message from client: {e}"),
                    })
                }
            };
            if frame.tag == fe::PARSE && self.inline_ok(frame.tag, frame.body.first().copied()) {
                self.routing.batch_open = true;
                self.inline_parse(frame)?;
                continue;
            }
            // `handle_client_message` spelled out: one async layer less
            // (each layer copies the dispatch's state once more).
            self.before_dispatch(&frame);
            let result = self.dispatch_client_message(frame).await;
            self.routing.pending_copy = None;
            self.routing.handed_class = None;
            result?;
        }
        self.emit_ready_synthetics();
        Ok(())
    }

    /// Handles one client message, keeping a copy of the messages of a
    /// read sent to a replica until it answers (see `routing.retry`).
    pub(super) async fn handle_client_message(&mut self, frame: Frame) -> Result<(), SessionError> {
        self.before_dispatch(&frame);
        let result = self.dispatch_client_message(frame).await;
        self.routing.pending_copy = None;
        result
    }

    /// What every message the general path dispatches goes through first:
    /// batch and retry recording, and the copy kept while a replica may
    /// still refuse the request.
    fn before_dispatch(&mut self, frame: &Frame) {
        let ends_batch = matches!(frame.tag, fe::SYNC | fe::QUERY);
        self.routing.batch_open = !ends_batch;
        if self.routing.retry.is_some() {
            self.record_for_retry(ends_batch, || frame.clone());
        }
        self.routing.pending_copy = (self.server.is_none()
            && self.routing.split
            && self.routing.replaying.is_none()
            && self
                .pipeline
                .iter()
                .all(|e| matches!(e, Expect::Synthetic { .. })))
        .then(|| (frame.clone(), ends_batch));
    }

    /// A message while a read is kept for a retry (`routing.retry`): kept
    /// too while its request is still being recorded (`ends`: it is the
    /// request's last); a second request behind the first ends the retry.
    pub(super) fn record_for_retry(&mut self, ends: bool, frame: impl FnOnce() -> Frame) {
        if self.routing.recording {
            self.routing.recording = !ends;
            if let Some(r) = self.routing.retry.as_mut() {
                r.push(frame());
            }
        } else {
            // A second request behind the first: no replay any more.
            self.routing.retry = None;
        }
    }

    async fn dispatch_client_message(&mut self, frame: Frame) -> Result<(), SessionError> {
        // Place statements with the current bucket map (a bucket move may
        // have switched owners). Inside a transaction only the map changes:
        // a statement whose bucket moved away from the transaction's shard
        // is then refused (or spreads the transaction) instead of reading
        // the old owner's leftover copy.
        if self.proxy.topology.epoch() != self.pool_epoch {
            if self.server.is_none() {
                self.refresh_pools();
            } else {
                self.shard_map = self.proxy.topology.load().sharded().cloned();
            }
        }
        let sharded = self.shard_map.is_some();
        // The previous transaction ended, but the server still owes the
        // answer to its commit-LSN probe: wait for it and release the
        // server, so this statement is placed on its own shard rather than
        // tied to that one.
        if sharded
            && matches!(frame.tag, fe::QUERY | fe::PARSE | fe::BIND)
            && self.server.as_ref().is_some_and(|s| s.tx_status == b'I')
            && !self.pipeline.is_empty()
            && self
                .pipeline
                .iter()
                .all(|e| matches!(e, super::pipeline::Expect::LsnProbe))
        {
            self.await_lsn_probes().await;
            self.maybe_release().await;
        }
        if sharded
            && !self.routing.owed.is_empty()
            && !matches!(
                frame.tag,
                fe::PARSE | fe::BIND | fe::DESCRIBE | fe::EXECUTE | fe::TERMINATE
            )
        {
            self.settle_owed().await;
        }
        // With shards, a Parse waits for its Bind and the BEGIN with it
        // (the Bind's key picks the shard).
        if self.routing.pending_begin.is_some()
            && !matches!(frame.tag, fe::QUERY | fe::TERMINATE | fe::FLUSH)
            && !(sharded && matches!(frame.tag, fe::PARSE | fe::BIND))
        {
            if sharded && frame.tag == fe::DESCRIBE {
                self.route_describe(&frame);
            }
            self.materialize_begin().await?;
        }
        match frame.tag {
            fe::QUERY => {
                if self.skipping {
                    return Ok(());
                }
                let text = frame.body.strip_suffix(&[0]).unwrap_or(&frame.body);
                // Found once: the checks below all start from it.
                let first = crate::router::classify::leading_keyword(text);
                if super::routing::is_command(first, text) {
                    // `SHOW shardgate.last_commit_lsn` right after a write
                    // must include it: take the answer to the write's
                    // position probe first (or learn it, unprobed).
                    if !self.pipeline.is_empty() {
                        self.await_lsn_probes().await;
                    }
                    if self.routing.unprobed != super::routing::Unprobed::No {
                        self.settle_commit_position().await?;
                    }
                }
                if self.shardgate_command(text, first) {
                    return Ok(());
                }
                if self.server.is_none() && self.mode == PoolMode::Transaction {
                    if self.routing.pending_begin.is_some() {
                        if self.buckets_held() {
                            self.wait_for_cutover(Some(text), None).await;
                        }
                        let refused = match self.route_shard(Some(text), None) {
                            Ok(None) => None,
                            Ok(Some(shards)) => Some(self.cross_shard_refusal(&shards)),
                            Err(e) => Some(e),
                        };
                        if let Some((code, message)) = refused {
                            self.refuse_query(code, &message).await;
                            return Ok(());
                        }
                        let begin = self.routing.pending_begin.take().expect("pending");
                        return self.run_after_begin(&frame, begin).await;
                    }
                    if self.defer_begin(text, first) {
                        return Ok(());
                    }
                }
                let copy = first.is_some_and(|w| w.eq_ignore_ascii_case(b"copy"));
                if sharded && copy && self.server.is_none() {
                    let map = self.shard_map().expect("sharded");
                    let sql = String::from_utf8_lossy(text).into_owned();
                    match crate::router::copy::plan_copy(&map, &sql) {
                        Some(Ok(plan)) => return Box::pin(self.copy_sharded(&sql, plan)).await,
                        Some(Err(what)) => {
                            let message = format!("shardgate: {what} is not supported");
                            self.refuse_query("0A000", &message).await;
                            return Ok(());
                        }
                        None => {}
                    }
                }
                if sharded
                    && self.spans_shards(text, first)
                    && Box::pin(self.multi_shard_control(text)).await?
                {
                    return Ok(());
                }
                if sharded {
                    if self.buckets_held() {
                        self.wait_for_cutover(Some(text), None).await;
                    }
                    let refused = match self.route_shard(Some(text), None) {
                        Ok(None) => None,
                        Ok(Some(shards)) if self.server.is_none() => {
                            let sql = String::from_utf8_lossy(text).into_owned();
                            let write = !self.is_read(text);
                            Box::pin(self.scatter_query(&sql, &shards, write)).await;
                            self.scatter_guard = None;
                            return Ok(());
                        }
                        Ok(Some(shards)) => Some(self.cross_shard_refusal(&shards)),
                        Err(e) => Some(e),
                    };
                    if let Some((code, message)) = refused {
                        self.refuse_query(code, &message).await;
                        return Ok(());
                    }
                    if let Some(to) = self.routing.switch_to.take() {
                        if let Err((code, message)) = self.switch_tx_shard(to).await {
                            self.refuse_query(&code, &message).await;
                            return Ok(());
                        }
                    }
                }
                let fresh = self.server.is_none();
                let class =
                    (fresh && self.routing.split).then(|| match self.routing.handed_class.take() {
                        Some(class) => class,
                        None => self.classify(text),
                    });
                let read = class.as_ref().is_some_and(|c| self.wants_replica(c));
                if !self.ensure_server(true, read).await {
                    return Ok(());
                }
                self.send_query(frame.as_ref(), first, class, copy);
            }
            fe::PARSE => self.on_parse(frame).await?,
            fe::BIND => self.on_bind(frame).await?,
            fe::DESCRIBE => self.on_describe(frame).await?,
            fe::EXECUTE => {
                if !self.execute_prelude(frame.as_ref()) || !self.ensure_server(false, false).await
                {
                    return Ok(());
                }
                self.execute_send(frame.as_ref());
            }
            fe::CLOSE => self.on_close(frame).await?,
            fe::SYNC => self.on_sync(frame.as_ref()),
            fe::FLUSH | fe::COPY_DATA => self.forward_if_attached(frame.as_ref()),
            fe::COPY_DONE | fe::COPY_FAIL => {
                self.forward_if_attached(frame.as_ref());
                self.copy_in = false;
                match self.routing.copy_lsn.take() {
                    // Simple protocol: the COPY ends with this message.
                    Some(true) if self.server.is_some() && self.on_replica.is_none() => {
                        self.push_lsn_probe()
                    }
                    // Extended: at the Sync that follows.
                    Some(false) => self.routing.lsn_due = true,
                    _ => {}
                }
            }
            fe::FUNCTION_CALL => {
                if self.skipping || !self.ensure_server(true, false).await {
                    return Ok(());
                }
                self.start_request();
                frame.encode(&mut self.to_server);
                self.pipeline.push_back(Expect::FunctionCall);
                // A fast-path function call (large objects) may write.
                let idle = self.server.as_ref().is_some_and(|s| s.tx_status == b'I');
                if self.routing.track_lsn && self.on_replica.is_none() && idle {
                    self.push_lsn_probe();
                }
            }
            fe::TERMINATE => return Err(SessionError::Terminate),
            other => {
                return Err(SessionError::Fatal {
                    code: "08P01".into(),
                    message: format!("invalid frontend message type {other}"),
                })
            }
        }
        Ok(())
    }

    /// Execute, up to needing a server: false when it is handled already
    /// (skipped after an error, answered by the proxy, or run across
    /// shards).
    pub(super) fn execute_prelude(&mut self, frame: FrameRef<'_>) -> bool {
        if self.skipping {
            return false;
        }
        let portal = frame.body.split(|b| *b == 0).next().unwrap_or(&[]);
        if self.proxy_execute(portal) {
            return false;
        }
        if self.routing.scatter_portal.is_some() {
            let max_rows = frame
                .body
                .get(portal.len() + 1..portal.len() + 5)
                .map_or(0, |b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            if self.scatter_execute(portal, max_rows) {
                return false;
            }
        }
        if self.server.is_some() {
            self.send_owed_parses();
        } else if self.shard_map.is_some() {
            let _ = self.route_shard(None, None);
        }
        true
    }

    /// Execute, on the server now held.
    pub(super) fn execute_send(&mut self, frame: FrameRef<'_>) {
        self.start_request();
        self.pool.metrics.queries.inc();
        frame.encode(&mut self.to_server);
        self.pipeline.push_back(Expect::Execute);
    }

    pub(super) fn on_sync(&mut self, frame: FrameRef<'_>) {
        if self.copy_in {
            // Ignored by a server in COPY FROM STDIN; no answer owed.
            self.forward_if_attached(frame);
        } else if self.server.is_some() {
            self.skipping = false;
            self.routing.scatter_portal = None;
            self.forget_unnamed_proxy_portal();
            frame.encode(&mut self.to_server);
            self.pipeline.push_back(Expect::Sync);
            if self.routing.lsn_due {
                self.routing.lsn_due = false;
                if self.on_replica.is_none() {
                    self.push_lsn_probe();
                }
            }
        } else {
            // Nothing reached a server since the last Sync: the proxy
            // answered everything itself and is idle.
            self.skipping = false;
            self.routing.scatter_portal = None;
            self.forget_unnamed_proxy_portal();
            self.emit_ready_synthetics();
            be::ready_for_query(b'I').encode(&mut self.to_client);
        }
    }

    pub(super) fn forward_if_attached(&mut self, frame: FrameRef<'_>) {
        if self.server.is_some() {
            frame.encode(&mut self.to_server);
        }
    }

    pub(super) fn start_request(&mut self) {
        if self.request_started.is_none() {
            self.request_started = Some(Instant::now());
        }
    }

    pub(super) fn renames(&self) -> bool {
        self.mode == PoolMode::Transaction
    }

    fn malformed(what: &str) -> SessionError {
        SessionError::Fatal {
            code: "08P01".into(),
            message: format!("invalid {what} message"),
        }
    }

    /// Checks out a server connection if none is held (a replica's if
    /// `read`). On failure the client gets the error (and, for a simple
    /// query, ReadyForQuery; for the extended protocol, the rest is skipped
    /// up to Sync).
    pub(super) async fn ensure_server(&mut self, simple: bool, read: bool) -> bool {
        if self.server.is_some() {
            return true;
        }
        let checkout = match self.attach_primary_spare(read) {
            true => Ok(()),
            false => self.checkout(read).await,
        };
        match checkout {
            Ok(()) => {
                self.send_owed_parses();
                true
            }
            Err((code, message)) => {
                tracing::warn!(%code, %message, "no server connection for client");
                self.emit_ready_synthetics();
                self.queue_error(&code, &message);
                if simple {
                    be::ready_for_query(b'I').encode(&mut self.to_client);
                } else {
                    self.skipping = true;
                }
                false
            }
        }
    }

    /// Parse, the part every Parse goes through: None when it is handled
    /// already (skipped after an error, or answered by the proxy).
    pub(super) fn parse_prelude<'f>(
        &mut self,
        frame: &'f Frame,
    ) -> Result<Option<fe::Parse<'f>>, SessionError> {
        if self.skipping {
            return Ok(None);
        }
        let parse = fe::parse_parse(&frame.body).map_err(|_| Self::malformed("Parse"))?;
        if self.proxy_parse(parse.name, parse.query) {
            return Ok(None);
        }
        // (Hashing a key costs more than the check: these maps are
        // almost always empty.)
        if parse.name.is_empty() && !self.routing.proxy_stmts.is_empty() {
            self.routing.proxy_stmts.remove("");
        }
        Ok(Some(parse))
    }

    /// The unnamed statement's Parse, sent with the Bind that picks the
    /// shard.
    pub(super) fn defer_unnamed_parse(&mut self, frame: Frame) {
        self.unnamed_parse = Some(frame.clone());
        self.unnamed_on_server = false;
        self.routing
            .owed
            .push(super::sharding::Owed::Unnamed(frame));
    }

    /// With shards, a Parse waits for the Bind whose key picks the shard
    /// — also inside a transaction that may move on to another shard; and
    /// behind Parses already waiting.
    pub(super) fn parse_deferred(&self) -> bool {
        self.shard_map.is_some()
            && (self.server.is_none()
                || (self.routing.tx_begin.is_some() && self.pipeline.is_empty()))
            || !self.routing.owed.is_empty()
    }

    /// The unnamed statement's Parse, on the server held.
    pub(super) fn send_unnamed_parse(&mut self, frame: Frame) {
        self.send_parse(&frame);
        self.unnamed_parse = Some(frame);
        self.unnamed_on_server = true;
    }

    /// The client's Parse as it is, on the server held.
    fn send_parse(&mut self, frame: &Frame) {
        frame.encode(&mut self.to_server);
        self.pipeline.push_back(Expect::Parse {
            stmt: None,
            client_name: None,
            injected: false,
        });
    }

    async fn on_parse(&mut self, frame: Frame) -> Result<(), SessionError> {
        let Some(parse) = self.parse_prelude(&frame)? else {
            return Ok(());
        };
        let defer = self.parse_deferred();
        if defer && parse.name.is_empty() {
            self.defer_unnamed_parse(frame);
            return Ok(());
        }
        if parse.name.is_empty() || !self.renames() {
            let read = self.batch_wants_replica(Some(parse.query), parse.name.is_empty());
            if !self.ensure_server(false, read).await {
                return Ok(());
            }
            if parse.name.is_empty() {
                self.send_unnamed_parse(frame);
            } else {
                self.send_parse(&frame);
            }
            return Ok(());
        }
        let name = parse.name.to_owned();
        if self.statements.contains_key(&name) || self.routing.proxy_stmts.contains_key(&name) {
            let error = be::error_response(
                "ERROR",
                "42P05",
                &format!("prepared statement \"{name}\" already exists"),
            );
            if self.server.is_none() {
                // No transaction to abort: answer and skip to Sync.
                self.pipeline.push_back(Expect::Synthetic {
                    frame: error,
                    client_name: None,
                });
                self.skipping = true;
                return Ok(());
            }
            self.fail_in_step(error);
            return Ok(());
        }
        let key = frame.body.slice(name.len() + 1..);
        let known_good = self.proxy.statements.is_validated(&key);
        let stmt = Arc::new(self.proxy.statements.create(&parse, key));
        if defer && !(known_good && self.routing.owed.is_empty()) {
            self.statements.insert(name.clone(), stmt.clone());
            self.routing
                .owed
                .push(super::sharding::Owed::Named(stmt, name));
            return Ok(());
        }
        if (self.server.is_none() || defer) && known_good {
            self.statements.insert(name.clone(), stmt);
            self.pipeline.push_back(Expect::Synthetic {
                frame: be::empty(be::PARSE_COMPLETE),
                client_name: Some(name),
            });
            return Ok(());
        }
        let read = self.batch_wants_replica(Some(parse.query), false);
        if !self.ensure_server(false, read).await {
            return Ok(());
        }
        self.statements.insert(name.clone(), stmt.clone());
        self.send_client_parse(stmt, name);
        Ok(())
    }

    /// Sends a client's named Parse (under the proxy's name) to the held
    /// server, with the Describe that records the statement's shape.
    pub(super) fn send_client_parse(
        &mut self,
        stmt: Arc<super::statements::Statement>,
        name: String,
    ) {
        if let Some(server) = self.server.as_mut() {
            server.prepared.insert(stmt.id);
        }
        stmt.parse.encode(&mut self.to_server);
        self.pipeline.push_back(Expect::Parse {
            stmt: Some(stmt.clone()),
            client_name: Some(name),
            injected: false,
        });
        self.push_shape_check(stmt, true);
    }

    /// Injects a Describe of `stmt` whose answer records or checks its shape.
    fn push_shape_check(&mut self, stmt: Arc<super::statements::Statement>, record: bool) {
        fe::build_target(fe::DESCRIBE, b'S', &stmt.name).encode(&mut self.to_server);
        self.pipeline.push_back(Expect::ShapeCheck { stmt, record });
    }

    /// Makes sure the server has `stmt`, injecting a Parse if not. A
    /// statement whose shape is known is checked on the new server before
    /// the client's message goes out (one round trip, on first use per
    /// server connection). Returns false when the statement must fail like
    /// a Postgres prepared statement after a schema change.
    async fn ensure_prepared(
        &mut self,
        stmt: &Arc<super::statements::Statement>,
    ) -> Result<bool, SessionError> {
        match self.prepare_on_server(stmt) {
            None => Ok(false),
            Some(false) => Ok(true),
            Some(true) => {
                self.wait_for_shape_check().await?;
                Ok(!stmt.stale.load(std::sync::atomic::Ordering::Relaxed))
            }
        }
    }

    /// `ensure_prepared` up to the wait: None for a stale statement, else
    /// whether its shape check must be awaited before the Bind goes out.
    pub(super) fn prepare_on_server(
        &mut self,
        stmt: &Arc<super::statements::Statement>,
    ) -> Option<bool> {
        if stmt.stale.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let server = self.server.as_mut().expect("ensured");
        if !server.prepared.insert(stmt.id) {
            return Some(false);
        }
        stmt.parse.encode(&mut self.to_server);
        self.pipeline.push_back(Expect::Parse {
            stmt: Some(stmt.clone()),
            client_name: None,
            injected: true,
        });
        let known = stmt.shape.get().is_some();
        self.push_shape_check(stmt.clone(), !known);
        Some(known)
    }

    /// Sends what is queued and processes server messages (forwarding the
    /// answers to earlier messages) until no shape check is pending.
    async fn wait_for_shape_check(&mut self) -> Result<(), SessionError> {
        use tokio::io::AsyncReadExt;
        // The server holds its answers until Sync or Flush.
        Frame {
            tag: fe::FLUSH,
            body: bytes::Bytes::new(),
        }
        .encode(&mut self.to_server);
        self.flush_server().await?;
        while self
            .pipeline
            .iter()
            .any(|e| matches!(e, Expect::ShapeCheck { .. }))
        {
            let server = self.server.as_mut().expect("attached");
            let server: &mut crate::backend::ServerConn = server;
            server.read_buf.reserve(4096);
            match server.stream.read_buf(&mut server.read_buf).await {
                Ok(n) if n > 0 => {}
                _ if self.routing.retry.is_some() && self.on_replica.is_some() => {
                    return Err(SessionError::ReplicaGone)
                }
                _ if self.primary_loss_recoverable() => {
                    // The caller sees no server and sends nothing.
                    self.recover_primary_loss();
                    return self.flush_client().await;
                }
                _ => return Err(self.server_lost()),
            }
            self.handle_server_bytes()?;
            self.flush_client().await?;
        }
        Ok(())
    }

    /// Answers a Bind or Describe of a stale statement with the error
    /// Postgres gives.
    pub(super) fn fail_stale_statement(&mut self) {
        let error = be::error_response("ERROR", "0A000", "cached plan must not change result type");
        self.fail_in_step(error);
    }

    /// Gives the client `error` for the current message, and makes the
    /// server fail at the same point (a Bind of a statement that does not
    /// exist), so it skips the rest up to Sync and aborts an open
    /// transaction exactly as Postgres would for the real error.
    pub(super) fn fail_in_step(&mut self, error: Frame) {
        let probe = fe::build_bind(b"", "shardgate_failed_message", &[0, 0, 0, 0, 0, 0]);
        probe.encode(&mut self.to_server);
        self.pipeline.push_back(Expect::ErrorInstead { error });
    }

    /// Re-sends the client's last unnamed Parse on a server that lacks it.
    pub(super) fn ensure_unnamed(&mut self) {
        if self.unnamed_on_server {
            return;
        }
        if let Some(parse) = &self.unnamed_parse {
            parse.encode(&mut self.to_server);
            self.unnamed_on_server = true;
            self.pipeline.push_back(Expect::Parse {
                stmt: None,
                client_name: None,
                injected: true,
            });
        }
    }

    /// A Bind, the general path (`inline_bind` handles the common case
    /// without awaiting; keep the two in step).
    async fn on_bind(&mut self, frame: Frame) -> Result<(), SessionError> {
        if self.skipping {
            return Ok(());
        }
        let bind = fe::parse_bind(&frame.body).map_err(|_| Self::malformed("Bind"))?;
        if self.routing.unprobed != super::routing::Unprobed::No
            && self.routing.proxy_stmts.contains_key(bind.statement)
        {
            self.settle_commit_position().await?;
        }
        if self.proxy_bind(bind.portal, bind.statement) {
            return Ok(());
        }
        // The named statement, looked up once: its text and types route
        // the Bind, and its server-side name is bound.
        let named = match bind.statement.is_empty() {
            true => None,
            false => self.statements.get(bind.statement).cloned(),
        };
        // The statement's text, when the shard routing below looked it up.
        let mut looked_up = None;
        if self.shard_map.is_some() {
            let unnamed_types;
            let (text, types) = match &named {
                Some(s) => (Some(s.text_bytes()), s.types.as_slice()),
                None if bind.statement.is_empty() => {
                    let (text, types) = self.unnamed_text_and_types();
                    unnamed_types = types;
                    (text, unnamed_types.as_slice())
                }
                // Unknown to the proxy: the server answers (e.g. 26000).
                None => (None, &[][..]),
            };
            if self.server.is_some() && !self.routing.tx_parked.is_empty() {
                if let Some(t) = text.as_deref() {
                    if super::sharding::pins_transaction(t)
                        || crate::router::classify::may_end_transaction(t)
                    {
                        return self
                            .refuse_extended(
                                "0A000",
                                "shardgate: a transaction that spans shards ends with a simple-protocol COMMIT or ROLLBACK and uses no SAVEPOINT, SET LOCAL or SET TRANSACTION",
                            )
                            .await;
                    }
                }
            } else if self.server.is_some() {
                if let Some(t) = text.as_deref() {
                    self.routing.tx_pinned |= super::sharding::pins_transaction(t);
                }
            }
            if self.buckets_held() {
                self.wait_for_cutover(text.as_deref(), Some((types, bind.rest)))
                    .await;
            }
            let routed = self.route_shard(text.as_deref(), Some((types, bind.rest)));
            let refused = match routed {
                Ok(None) => None,
                Ok(Some(shards))
                    if self.server.is_none()
                        && self.routing.pending_begin.is_none()
                        && text.is_some() =>
                {
                    let text = text.expect("checked");
                    let write = !self.is_read(&text);
                    let r =
                        Box::pin(self.scatter_bind(&bind, &text, types.to_vec(), &shards, write))
                            .await;
                    self.scatter_guard = None;
                    return r;
                }
                Ok(Some(shards)) => Some(self.cross_shard_refusal(&shards)),
                Err(e) => Some(e),
            };
            if let Some((code, message)) = refused {
                return self.refuse_extended(code, &message).await;
            }
            if let Some(to) = self.routing.switch_to.take() {
                if let Err((code, message)) = self.switch_tx_shard(to).await {
                    return self.refuse_extended(&code, &message).await;
                }
            }
            if self.server.is_some() {
                // Parses held back in a transaction that may move on to
                // another shard go to the server this Bind chose.
                self.send_owed_parses();
            }
            if self.routing.pending_begin.is_some() {
                self.materialize_begin().await?;
                if self.server.is_none() {
                    return Ok(());
                }
            }
            looked_up = Some(text);
        }
        let (text, class, read) =
            self.bind_text_and_read(looked_up, named.as_deref(), bind.statement, None);
        let stmt = named;
        if !self.ensure_server(false, read).await {
            return Ok(());
        }
        self.note_bind_commit(text.as_deref(), stmt.as_deref(), class);
        if bind.statement.is_empty() {
            self.ensure_unnamed();
            frame.encode(&mut self.to_server);
        } else if let Some(stmt) = stmt.filter(|_| self.renames()) {
            if !self.ensure_prepared(&stmt).await? {
                self.fail_stale_statement();
                return Ok(());
            }
            if self.server.is_none() {
                // The primary went away while the statement was prepared
                // on it; the message has failed.
                return Ok(());
            }
            fe::encode_bind(bind.portal, &stmt.name, bind.rest, &mut self.to_server);
        } else {
            // Unknown to the proxy: the server answers (e.g. 26000).
            frame.encode(&mut self.to_server);
        }
        self.pipeline.push_back(Expect::Bind);
        Ok(())
    }

    /// The Bound statement's text, when routing a new transaction or
    /// learning commit positions (shards with replicas) needs it
    /// (`looked_up`: found already by the shard routing); its class; and
    /// whether it may run on a replica. `after`: the client's messages
    /// behind the Bind, when not the client buffer (a Bind read in place).
    pub(super) fn bind_text_and_read(
        &mut self,
        looked_up: Option<Option<bytes::Bytes>>,
        named: Option<&super::statements::Statement>,
        name: &str,
        after: Option<&[u8]>,
    ) -> (
        Option<bytes::Bytes>,
        Option<crate::router::classify::Class>,
        bool,
    ) {
        let routes = self.server.is_none() && self.routing.split;
        let text = if routes || self.routing.track_lsn {
            looked_up.unwrap_or_else(|| match named {
                Some(s) => Some(s.text_bytes()),
                None => self.statement_text(name),
            })
        } else {
            None
        };
        let mut class = None;
        let read = routes
            && self.batch_wants_replica_classified(
                text.as_deref(),
                false,
                named,
                &mut class,
                after,
            );
        (text, class, read)
    }

    /// Read-your-writes: may the Bound statement commit, so that a
    /// position probe follows at Sync?
    pub(super) fn note_bind_commit(
        &mut self,
        text: Option<&[u8]>,
        stmt: Option<&super::statements::Statement>,
        class: Option<crate::router::classify::Class>,
    ) {
        if self.routing.track_lsn && self.on_replica.is_none() && !self.routing.lsn_due {
            self.routing.lsn_due = match text {
                Some(t) if stmt.map_or_else(|| is_copy(t), |s| s.copy) => {
                    if self.may_commit(t, None, class) {
                        self.routing.copy_lsn = Some(false);
                    }
                    false
                }
                Some(t) => self.may_commit(t, None, class),
                None => true,
            };
        }
    }

    /// A simple Query, on the server held, and the position probe that
    /// follows it when it may commit (read-your-writes). `first`: its
    /// leading keyword; `class`: its class, if it was classified.
    pub(super) fn send_query(
        &mut self,
        frame: FrameRef<'_>,
        first: Option<&[u8]>,
        class: Option<crate::router::classify::Class>,
        copy: bool,
    ) {
        self.start_request();
        self.pool.metrics.queries.inc();
        frame.encode(&mut self.to_server);
        self.pipeline.push_back(Expect::Query);
        // A replay after a replica refused the statement as a write: it
        // writes, whatever its text looked like.
        let wrote = std::mem::take(&mut self.routing.force_probe);
        let text = frame.body.strip_suffix(&[0]).unwrap_or(frame.body);
        if self.routing.track_lsn
            && self.on_replica.is_none()
            && (wrote || self.may_commit(text, Some(first), class))
        {
            if copy {
                // A query behind COPY FROM STDIN would arrive in the
                // middle of the copy data: probe after CopyDone.
                self.routing.copy_lsn = Some(true);
            } else {
                self.push_lsn_probe();
            }
        }
    }

    /// Describe, the part every Describe goes through: None when it is
    /// handled already (skipped after an error, answered by the proxy or
    /// across shards).
    pub(super) fn describe_prelude<'f>(
        &mut self,
        frame: FrameRef<'f>,
    ) -> Result<Option<fe::Target<'f>>, SessionError> {
        if self.skipping {
            return Ok(None);
        }
        let target =
            fe::parse_target(frame.body, "Describe").map_err(|_| Self::malformed("Describe"))?;
        if self.proxy_describe(target.kind, target.name)
            || self.scatter_describe(target.kind, target.name)
        {
            return Ok(None);
        }
        if self.server.is_some() {
            self.send_owed_parses();
        }
        Ok(Some(target))
    }

    async fn on_describe(&mut self, frame: Frame) -> Result<(), SessionError> {
        let Some(target) = self.describe_prelude(frame.as_ref())? else {
            return Ok(());
        };
        if self.server.is_none() && self.shard_map.is_some() {
            self.route_describe(&frame);
        }
        if self.server.is_none() {
            let text = if target.kind == b'S' && self.routing.split {
                self.statement_text(target.name)
            } else {
                None
            };
            let read = self.batch_wants_replica(text.as_deref(), false);
            if !self.ensure_server(false, read).await {
                return Ok(());
            }
        }
        let managed = (target.kind == b'S' && self.renames())
            .then(|| self.statements.get(target.name).cloned())
            .flatten();
        if let Some(stmt) = managed {
            if !self.ensure_prepared(&stmt).await? {
                self.fail_stale_statement();
                return Ok(());
            }
            if self.server.is_none() {
                return Ok(());
            }
            fe::build_target(fe::DESCRIBE, b'S', &stmt.name).encode(&mut self.to_server);
        } else {
            if target.kind == b'S' && target.name.is_empty() {
                self.ensure_unnamed();
            }
            frame.encode(&mut self.to_server);
        }
        self.pipeline.push_back(Expect::Describe);
        Ok(())
    }

    async fn on_close(&mut self, frame: Frame) -> Result<(), SessionError> {
        if self.skipping {
            return Ok(());
        }
        let target =
            fe::parse_target(&frame.body, "Close").map_err(|_| Self::malformed("Close"))?;
        if self.proxy_close(target.kind, target.name)
            || self.scatter_close(target.kind, target.name)
        {
            return Ok(());
        }
        if target.kind == b'S' && !target.name.is_empty() && self.renames() {
            // The server keeps the shared statement for other clients;
            // closing an unknown name is not an error in Postgres either.
            self.statements.remove(target.name);
            self.pipeline.push_back(Expect::Synthetic {
                frame: be::empty(be::CLOSE_COMPLETE),
                client_name: None,
            });
            return Ok(());
        }
        if target.kind == b'S' && target.name.is_empty() {
            self.unnamed_parse = None;
        }
        if self.server.is_none() {
            let _ = self.route_shard(None, None);
        }
        if !self.ensure_server(false, false).await {
            return Ok(());
        }
        frame.encode(&mut self.to_server);
        self.pipeline.push_back(Expect::Close);
        Ok(())
    }

    /// Sends the proxy's own answers that have reached the front.
    pub(super) fn emit_ready_synthetics(&mut self) {
        if !self.routing.held.is_empty()
            && matches!(self.pipeline.front(), Some(Expect::Synthetic { .. }))
        {
            // The proxy's own answer goes out: what was held goes first,
            // and the request is committed to its server.
            self.to_client.extend_from_slice(&self.routing.held);
            self.routing.held.clear();
            self.routing.retry = None;
        }
        while matches!(self.pipeline.front(), Some(Expect::Synthetic { .. })) {
            if let Some(Expect::Synthetic { frame, .. }) = self.pipeline.pop_front() {
                frame.encode(&mut self.to_client);
            }
        }
    }
}

/// A COPY statement (its FROM STDIN form must not have anything queued
/// behind it before the copy data ends).
fn is_copy(sql: &[u8]) -> bool {
    // Most texts are told apart by their first byte (this runs per Bind
    // of the unnamed statement).
    match sql.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'c' | b'C' | b'-' | b'/') => crate::router::classify::leading_keyword(sql)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"copy")),
        _ => false,
    }
}
