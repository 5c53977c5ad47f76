//! The session's side of read/write splitting: classifying what the client
//! sends, deciding whether a transaction may start on a replica, learning
//! commit positions for read-your-writes, and the `shardgate.*` session
//! commands.
//!
//! Read-your-writes costs one small query per write transaction and no
//! round trip per read: when a client's Query or Sync may have committed a
//! write on the primary, `SELECT pg_current_wal_insert_lsn()` is pipelined
//! right behind it on the same connection (its answer is dropped), so the
//! session learns a position at or past its commit without waiting. Reads
//! then go only to replicas whose last probed replay position has reached
//! it; the probe of a replica can only be older than the truth, so the
//! check errs toward the primary, never toward a stale read.

use super::pipeline::Expect;
use super::session::Session;
use crate::health::{format_lsn, parse_lsn};
use crate::protocol::backend as be;
use crate::protocol::frame::peek_header;
use crate::protocol::frontend as fe;
use crate::router::classify::{classify, Class};
use crate::router::TargetOverride;

/// The position probe pipelined behind a write.
const LSN_SQL: &str = "SELECT pg_current_wal_insert_lsn()::text";

/// A commit of a session pinned to the primary (`shardgate.target =
/// primary`) is not probed: none of its reads needs the position. Should
/// one need it later (a replica hint, the target set back, `SHOW
/// shardgate.last_commit_lsn`), the primary's own health probe supplies a
/// position at or past the commit once a probe has started after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Unprobed {
    /// Every commit was probed.
    #[default]
    No,
    /// Sent on the server connection still held; it may not have finished.
    InFlight,
    /// Finished by this time.
    Since(std::time::Instant),
}

/// The last text [`Session::classify_repeated`] classified.
#[derive(Default)]
pub(super) struct LastClass {
    text: Vec<u8>,
    /// Of the catalog it was classified with (0: none yet; generations
    /// start at 1).
    generation: u64,
    class: Class,
}

impl LastClass {
    /// Longer texts are not kept (an idle session's memory stays small).
    const MAX_TEXT: usize = 512;
}

impl Session {
    pub(super) fn classify(&mut self, sql: &[u8]) -> Class {
        let catalog = self.catalog();
        classify(sql, &catalog)
    }

    /// Classifies a text that is not a named statement's, remembering the
    /// last one: drivers send the same unnamed statement for every
    /// execution, and clients the same BEGIN for every transaction (a
    /// named statement keeps its class itself).
    fn classify_repeated(
        &mut self,
        sql: &[u8],
        catalog: &crate::router::catalog::Catalog,
    ) -> Class {
        let last = &mut self.routing.last_class;
        if last.generation == catalog.generation() && last.text == sql {
            return last.class;
        }
        let class = classify(sql, catalog);
        if sql.len() <= LastClass::MAX_TEXT {
            last.text.clear();
            last.text.extend_from_slice(sql);
            last.generation = catalog.generation();
            last.class = class;
        }
        class
    }

    /// Could running `sql` on the held primary connection commit a write
    /// (so a position probe should follow it)? Outside a transaction: any
    /// statement that may commit data (not reads, not SET); inside one:
    /// only COMMIT/END (or a statement list), a cheap lexical check.
    /// `first`: the text's leading keyword, when the caller has found it.
    pub(super) fn may_commit(
        &mut self,
        sql: &[u8],
        first: Option<Option<&[u8]>>,
        class: Option<Class>,
    ) -> bool {
        let idle = self.server.as_ref().is_some_and(|s| s.tx_status == b'I');
        if !idle {
            let first = first.unwrap_or_else(|| crate::router::classify::leading_keyword(sql));
            return crate::router::classify::may_end_transaction_after(first, sql);
        }
        let class = match class {
            Some(c) => c,
            None => self.classify(sql),
        };
        class.may_commit
    }

    pub(super) fn wants_replica(&self, class: &Class) -> bool {
        crate::router::wants_replica(class, self.routing.target, self.vars.default_read_only())
    }

    /// Query text of a statement the client names in Bind or Describe (a
    /// slice of the stored Parse, not a copy).
    pub(super) fn statement_text(&self, name: &str) -> Option<bytes::Bytes> {
        if !name.is_empty() {
            return Some(self.statements.get(name)?.text_bytes());
        }
        // Body of a Parse of the unnamed statement: "\0" query "\0" ...
        let body = self.unnamed_parse.as_ref()?.body.slice(1..);
        let end = memchr::memchr(0, &body)?;
        Some(body.slice(..end))
    }

    /// May the extended-protocol batch that starts with the current message
    /// (a statement with text `first`) run on a replica? Every statement it
    /// parses or binds before Sync must be read-only, and the Sync must
    /// already be here: what is not here yet cannot be vouched for.
    /// `unnamed_parse`: the current message is a Parse of the unnamed
    /// statement (later Binds of "" in the batch refer to it).
    /// A Sync ends the unnamed portal a proxy-answered statement left.
    pub(super) fn forget_unnamed_proxy_portal(&mut self) {
        if !self.routing.proxy_portals.is_empty() {
            self.routing.proxy_portals.remove(&b""[..]);
        }
    }

    pub(super) fn batch_wants_replica(
        &mut self,
        first: Option<&[u8]>,
        unnamed_parse: bool,
    ) -> bool {
        self.batch_wants_replica_classified(first, unnamed_parse, None, &mut None, None)
    }

    /// [`Self::batch_wants_replica`], leaving `first`'s class in `class`
    /// when it was classified (so the caller need not classify it again).
    /// `stmt`: the prepared statement whose text `first` is (its class is
    /// remembered there). `after`: the messages behind the current one,
    /// when not the client buffer (a message read in place).
    pub(super) fn batch_wants_replica_classified(
        &mut self,
        first: Option<&[u8]>,
        unnamed_parse: bool,
        stmt: Option<&super::statements::Statement>,
        class: &mut Option<Class>,
        after: Option<&[u8]>,
    ) -> bool {
        if self.server.is_some() || !self.routing.split {
            return false;
        }
        let Some(first) = first else { return false };
        let catalog = self.catalog();
        let first_class = match stmt {
            Some(s) => s.class(first, &catalog),
            None => self.classify_repeated(first, &catalog),
        };
        *class = Some(first_class);
        self.wants_replica(&first_class)
            && self.buffered_batch_read_only(&catalog, unnamed_parse.then_some(first), after)
    }

    /// Is the next request in the client buffer (a simple Query, or
    /// extended-protocol messages up to a Sync that is already here)
    /// read-only?
    pub(super) fn next_request_read_only(&mut self) -> bool {
        let Ok(Some((tag, total))) = peek_header(&self.client_buf, self.max_message_size) else {
            return false;
        };
        let catalog = self.catalog();
        if tag != fe::QUERY {
            return self.buffered_batch_read_only(&catalog, None, None);
        }
        if self.client_buf.len() < total {
            return false;
        }
        let text = self.client_buf[5..total].strip_suffix(&[0]).unwrap_or(&[]);
        parse_command_bytes(text) || self.replica_ok(text, &catalog)
    }

    /// May this statement text go to a replica (classification, hints,
    /// session overrides)?
    fn replica_ok(&self, sql: &[u8], catalog: &crate::router::catalog::Catalog) -> bool {
        self.wants_replica(&classify(sql, catalog))
    }

    /// Scans the buffered client messages up to a Sync: every statement
    /// parsed or bound must be read-only. `unnamed`: the text of the
    /// unnamed statement the batch's current message parses, if any.
    /// `after`: the messages to scan, when not the client buffer.
    fn buffered_batch_read_only<'a>(
        &'a self,
        catalog: &crate::router::catalog::Catalog,
        mut unnamed: Option<&'a [u8]>,
        after: Option<&'a [u8]>,
    ) -> bool {
        let mut rest = after.unwrap_or(&self.client_buf[..]);
        loop {
            let Ok(Some((tag, total))) = peek_header(rest, self.max_message_size) else {
                return false;
            };
            if rest.len() < total {
                return false;
            }
            let body = &rest[5..total];
            let ok = match tag {
                fe::SYNC => return true,
                fe::PARSE => match fe::parse_parse(body) {
                    Ok(p) => {
                        if p.name.is_empty() {
                            unnamed = Some(p.query);
                        }
                        self.replica_ok(p.query, catalog)
                    }
                    Err(_) => false,
                },
                fe::BIND => match fe::parse_bind(body) {
                    Ok(b) if b.statement.is_empty() && unnamed.is_some() => {
                        self.replica_ok(unnamed.unwrap_or_default(), catalog)
                    }
                    Ok(b) => match self.statements.get(b.statement) {
                        Some(s) if !b.statement.is_empty() => {
                            self.wants_replica(&s.class(s.text(), catalog))
                        }
                        _ => self
                            .statement_text(b.statement)
                            .is_some_and(|t| self.replica_ok(&t, catalog)),
                    },
                    Err(_) => false,
                },
                fe::DESCRIBE | fe::EXECUTE | fe::CLOSE | fe::FLUSH => true,
                _ => false,
            };
            if !ok {
                return false;
            }
            rest = &rest[total..];
        }
    }

    /// Holding a replica with an earlier request still answering: the next
    /// request may follow it there only if it is read-only too; otherwise
    /// the client's input waits until the replica connection is free.
    pub(super) fn must_wait_for_replica(&mut self) -> bool {
        self.on_replica.is_some()
            && !self.routing.batch_open
            && !self.pipeline.is_empty()
            && !self.client_buf.is_empty()
            && !self.next_request_read_only()
    }

    /// A simple-protocol `BEGIN` (exactly one, with modes any server
    /// accepts) while no server is held: answered by the proxy, and sent in
    /// front of the client's next statement. That saves the round trip of
    /// the BEGIN, and lets `BEGIN` followed by `SET TRANSACTION READ ONLY`
    /// start on a replica. Returns false when `sql` is not such a BEGIN.
    pub(super) fn defer_begin(&mut self, sql: &[u8], first: Option<&[u8]>) -> bool {
        let Some(word) = first else {
            return false;
        };
        if !(word.eq_ignore_ascii_case(b"begin") || word.eq_ignore_ascii_case(b"start")) {
            return false;
        }
        let catalog = self.catalog();
        let class = self.classify_repeated(sql, &catalog);
        if !class.single_begin {
            return false;
        }
        let replica_ok = self.wants_replica(&class);
        self.routing.pending_begin = Some((bytes::Bytes::copy_from_slice(sql), replica_ok));
        self.push_synthetic(be::command_complete("BEGIN"));
        self.push_synthetic(be::ready_for_query(b'T'));
        true
    }

    /// The client's first statement after a deferred BEGIN: both go to
    /// the server in one Query (`BEGIN; <statement>`), so a BEGIN that
    /// fails keeps the statement from running outside the transaction. A
    /// transaction ended before it ran anything is answered by the proxy.
    pub(super) async fn run_after_begin(
        &mut self,
        frame: &crate::protocol::Frame,
        (begin, begin_replica_ok): (bytes::Bytes, bool),
    ) -> Result<(), super::session::SessionError> {
        let text = frame.body.strip_suffix(&[0]).unwrap_or(&frame.body);
        if let Some(tag) = empty_transaction_end(text) {
            self.push_synthetic(be::command_complete(tag));
            self.push_synthetic(be::ready_for_query(b'I'));
            return Ok(());
        }
        let read = self.routing.split
            && (begin_replica_ok || {
                let class = self.classify(text);
                class.read_only_tx && self.wants_replica(&class)
            });
        // The combined text is not replayed elsewhere: no retry.
        self.routing.pending_copy = None;
        if !self.ensure_server(true, read).await {
            return Ok(());
        }
        let begin = begin.strip_suffix(b";").unwrap_or(&begin);
        self.routing.tx_begin = Some(String::from_utf8_lossy(begin).into_owned());
        let mut body = bytes::BytesMut::with_capacity(begin.len() + text.len() + 4);
        body.extend_from_slice(begin);
        body.extend_from_slice(b";\n");
        body.extend_from_slice(text);
        body.extend_from_slice(&[0]);
        crate::protocol::Frame {
            tag: fe::QUERY,
            body: body.freeze(),
        }
        .encode(&mut self.to_server);
        self.start_request();
        self.pool.metrics.queries.inc();
        self.pipeline.push_back(Expect::Query);
        self.routing.drop_begin_tag = true;
        if self.routing.track_lsn
            && self.on_replica.is_none()
            && crate::router::classify::may_end_transaction(text)
        {
            self.push_lsn_probe();
        }
        Ok(())
    }

    /// A deferred BEGIN meets a message that cannot be sent with it (the
    /// extended protocol): run the BEGIN on a server first, waiting for
    /// its answer. If the BEGIN itself fails the session ends: the client
    /// was told its transaction had begun.
    pub(super) async fn materialize_begin(&mut self) -> Result<(), super::session::SessionError> {
        use super::session::SessionError;
        let Some((begin, replica_ok)) = self.routing.pending_begin.take() else {
            return Ok(());
        };
        self.routing.pending_copy = None;
        let read = self.routing.split && replica_ok;
        if let Err((code, message)) = self.checkout(read).await {
            // Like any failed checkout: this request fails (the rest is
            // skipped up to Sync) and the session goes on, outside a
            // transaction.
            self.emit_ready_synthetics();
            self.queue_error(&code, &message);
            self.skipping = true;
            return Ok(());
        }
        let sql = String::from_utf8_lossy(&begin).into_owned();
        self.routing.tx_begin = Some(sql.trim_end().trim_end_matches(';').to_string());
        let Some(server) = self.server.as_mut() else {
            return Err(self.server_lost());
        };
        match server.run_internal(&sql).await {
            Ok(None) => {
                // Parses held back for the shard decision follow the BEGIN.
                self.send_owed_parses();
                Ok(())
            }
            Ok(Some(e)) => Err(SessionError::Fatal {
                code: e.code,
                message: format!("shardgate: BEGIN failed on the server: {}", e.message),
            }),
            Err(_) => Err(self.server_lost()),
        }
    }

    /// Pipelines the commit-position probe behind what was just queued for
    /// the primary, unless the session is pinned to the primary (the
    /// commit is noted as unprobed instead).
    pub(super) fn push_lsn_probe(&mut self) {
        if self.routing.target == TargetOverride::Primary {
            self.routing.unprobed = Unprobed::InFlight;
            return;
        }
        self.send_lsn_probe();
    }

    fn send_lsn_probe(&mut self) {
        fe::build_query(LSN_SQL).encode(&mut self.to_server);
        self.pipeline.push_back(Expect::LsnProbe);
        self.routing.probed_lsn = None;
    }

    /// Handles the answer to a position probe (the front of the
    /// pipeline); nothing of it reaches the client.
    pub(super) fn on_lsn_probe_message(&mut self, tag: u8, body: &[u8]) {
        match tag {
            be::DATA_ROW => {
                self.routing.probed_lsn = first_text_column(body).and_then(parse_lsn);
            }
            be::READY_FOR_QUERY => {
                self.pipeline.pop_front();
                let Some(server) = self.server.as_mut() else {
                    return;
                };
                // Only a probe that ran outside a transaction follows a
                // commit (the client's own ReadyForQuery set this status).
                let committed = server.tx_status == b'I';
                server.tx_status = body.first().copied().unwrap_or(b'I');
                if committed {
                    if let Some(lsn) = self.routing.probed_lsn.take() {
                        self.routing.last_commit_lsn = self.routing.last_commit_lsn.max(lsn);
                    }
                }
            }
            _ => {}
        }
    }

    /// The position a replica must have replayed for this session's reads
    /// of its shard (read-your-writes): its last probed commit, or after
    /// an unprobed one the primary's position from a health probe that
    /// started after it; u64::MAX (the primary) until there is one.
    pub(super) fn commit_position(&mut self) -> u64 {
        let since = match self.routing.unprobed {
            Unprobed::No => return self.routing.last_commit_lsn,
            Unprobed::InFlight => return u64::MAX,
            Unprobed::Since(t) => t,
        };
        let health = self.proxy.health.server(&self.primary_pool.key.addr);
        let Some(lsn) = health.position_since(since) else {
            return u64::MAX;
        };
        self.routing.last_commit_lsn = self.routing.last_commit_lsn.max(lsn);
        self.routing.unprobed = Unprobed::No;
        self.routing.last_commit_lsn
    }

    /// Learns the position of an unprobed commit for `SHOW
    /// shardgate.last_commit_lsn`: waits for what the held server still
    /// owes (the commit among it), then asks the primary. Without an
    /// answer the SHOW fails rather than report an older position.
    pub(super) async fn settle_commit_position(
        &mut self,
    ) -> Result<(), super::session::SessionError> {
        if self.routing.unprobed == Unprobed::InFlight {
            self.drain_pipeline().await?;
            self.routing.unprobed = Unprobed::Since(std::time::Instant::now());
        }
        // From the primary's health probe, when one started after it.
        self.commit_position();
        if self.routing.unprobed == Unprobed::No {
            return Ok(());
        }
        // The held server when it is the primary and idle (session
        // pooling holds it for good), else one from the pool.
        let held = self.on_replica.is_none()
            && self.pipeline.is_empty()
            && self.server.as_ref().is_some_and(|s| s.tx_status == b'I');
        let mut pooled = None;
        if !held {
            let wait = self.proxy.config.load().pool.checkout_timeout;
            // Boxed: see `checkout_raw`.
            pooled = Box::pin(self.primary_pool.checkout(wait)).await.ok();
        }
        let conn = if held {
            self.server.as_deref_mut()
        } else {
            pooled.as_deref_mut()
        };
        let Some(conn) = conn else {
            return Ok(());
        };
        let lsn = match conn.query_rows(LSN_SQL).await {
            Ok(Ok(rows)) => rows
                .first()
                .and_then(|r| r.first().cloned().flatten())
                .and_then(|t| parse_lsn(&t)),
            _ => {
                conn.broken = true;
                None
            }
        };
        if let Some(lsn) = lsn {
            self.routing.last_commit_lsn = self.routing.last_commit_lsn.max(lsn);
            self.routing.unprobed = Unprobed::No;
        }
        Ok(())
    }

    /// `SHOW`/`SET`/`RESET shardgate.<name>` in a simple Query: answered by
    /// the proxy. Returns false for anything else.
    pub(super) fn shardgate_command(&mut self, sql: &[u8], first: Option<&[u8]>) -> bool {
        if !is_command(first, sql) {
            return false;
        }
        let Ok(sql) = std::str::from_utf8(sql) else {
            return false;
        };
        let Some(cmd) = parse_command(sql) else {
            return false;
        };
        let status = if self.routing.pending_begin.is_some() {
            b'T'
        } else {
            self.server.as_ref().map_or(b'I', |s| s.tx_status)
        };
        let mut frames = Vec::new();
        if status == b'E' {
            frames.push(be::error_response(
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
        } else {
            match self.run_command(cmd) {
                Ok(mut out) => frames.append(&mut out),
                Err((code, message)) => {
                    crate::metrics::count_error(code.as_bytes());
                    frames.push(be::error_response("ERROR", code, &message));
                }
            }
        }
        frames.push(be::ready_for_query(status));
        for frame in frames {
            self.pipeline.push_back(Expect::Synthetic {
                frame,
                client_name: None,
            });
        }
        true
    }

    /// A client's answer the proxy gives itself, in order with the server's.
    fn push_synthetic(&mut self, frame: crate::protocol::Frame) {
        self.pipeline.push_back(Expect::Synthetic {
            frame,
            client_name: None,
        });
    }

    /// Fails the current extended-protocol message with `error`, the way
    /// Postgres would: the rest up to Sync is skipped and an open
    /// transaction is aborted.
    fn fail_extended(&mut self, error: crate::protocol::Frame) {
        if self.server.is_some() {
            self.fail_in_step(error);
        } else {
            self.push_synthetic(error);
            self.skipping = true;
        }
    }

    /// Parse of a `SHOW`/`SET`/`RESET shardgate.*` text: a statement the
    /// proxy answers. Returns false for any other text.
    pub(super) fn proxy_parse(&mut self, name: &str, query: &[u8]) -> bool {
        if !parse_command_bytes(query) {
            return false;
        }
        if !name.is_empty()
            && (self.statements.contains_key(name) || self.routing.proxy_stmts.contains_key(name))
        {
            let error = be::error_response(
                "ERROR",
                "42P05",
                &format!("prepared statement \"{name}\" already exists"),
            );
            self.fail_extended(error);
            return true;
        }
        if name.is_empty() {
            self.unnamed_parse = None;
        }
        let text = String::from_utf8_lossy(query).into_owned();
        self.routing.proxy_stmts.insert(name.to_owned(), text);
        self.push_synthetic(be::empty(be::PARSE_COMPLETE));
        true
    }

    /// Bind of a proxy statement. Any other Bind replaces a proxy portal of
    /// the same name.
    pub(super) fn proxy_bind(&mut self, portal: &[u8], statement: &str) -> bool {
        if self.routing.proxy_stmts.is_empty() && self.routing.proxy_portals.is_empty() {
            return false;
        }
        match self.routing.proxy_stmts.get(statement) {
            Some(text) => {
                let text = text.clone();
                self.routing.proxy_portals.insert(portal.to_vec(), text);
                self.push_synthetic(be::empty(be::BIND_COMPLETE));
                true
            }
            None => {
                self.routing.proxy_portals.remove(portal);
                false
            }
        }
    }

    pub(super) fn proxy_describe(&mut self, kind: u8, name: &str) -> bool {
        if self.routing.proxy_stmts.is_empty() && self.routing.proxy_portals.is_empty() {
            return false;
        }
        let text = if kind == b'S' {
            self.routing.proxy_stmts.get(name)
        } else {
            self.routing.proxy_portals.get(name.as_bytes())
        };
        let Some(text) = text.cloned() else {
            return false;
        };
        if kind == b'S' {
            self.push_synthetic(crate::protocol::Frame {
                tag: be::PARAMETER_DESCRIPTION,
                body: bytes::Bytes::from_static(&[0, 0]),
            });
        }
        let desc = match parse_command(&text) {
            Some(Command::Show(name)) => be::row_description_text(&[&format!("shardgate.{name}")]),
            _ => be::empty(be::NO_DATA),
        };
        self.push_synthetic(desc);
        true
    }

    pub(super) fn proxy_execute(&mut self, portal: &[u8]) -> bool {
        if self.routing.proxy_portals.is_empty() {
            return false;
        }
        let Some(text) = self.routing.proxy_portals.get(portal).cloned() else {
            return false;
        };
        let Some(cmd) = parse_command(&text) else {
            return false;
        };
        if self.server.as_ref().is_some_and(|s| s.tx_status == b'E') {
            self.fail_extended(be::error_response(
                "ERROR",
                "25P02",
                "current transaction is aborted, commands ignored until end of transaction block",
            ));
            return true;
        }
        match self.run_command(cmd) {
            Ok(frames) => {
                // Execute answers without the RowDescription (Describe
                // gives it).
                for f in frames.into_iter().filter(|f| f.tag != be::ROW_DESCRIPTION) {
                    self.push_synthetic(f);
                }
            }
            Err((code, message)) => {
                crate::metrics::count_error(code.as_bytes());
                self.fail_extended(be::error_response("ERROR", code, &message));
            }
        }
        true
    }

    pub(super) fn proxy_close(&mut self, kind: u8, name: &str) -> bool {
        let removed = if kind == b'S' {
            self.routing.proxy_stmts.remove(name).is_some()
        } else {
            self.routing.proxy_portals.remove(name.as_bytes()).is_some()
        };
        if removed {
            self.push_synthetic(be::empty(be::CLOSE_COMPLETE));
        }
        removed
    }

    /// A `shardgate.*` setting from the startup packet.
    pub(super) fn set_startup_option(
        &mut self,
        name: &str,
        value: &str,
    ) -> Result<(), (&'static str, String)> {
        let name = name["shardgate.".len()..].to_ascii_lowercase();
        self.run_command(Command::Set(name, Some(value.into()), "SET"))
            .map(|_| ())
    }

    fn run_command(
        &mut self,
        cmd: Command<'_>,
    ) -> Result<Vec<crate::protocol::Frame>, (&'static str, String)> {
        let unknown = |name: &str| {
            (
                "42704",
                format!("unrecognized configuration parameter \"shardgate.{name}\""),
            )
        };
        match cmd {
            Command::Show(name) => {
                let value = match name.as_str() {
                    "target" => self.routing.target.as_str().to_owned(),
                    "min_lsn" => format_lsn(self.routing.min_lsn),
                    "last_commit_lsn" if self.routing.unprobed != Unprobed::No => {
                        return Err((
                            "08006",
                            "shardgate: the position of this session's last commit is unknown: the primary did not answer its probe".into(),
                        ))
                    }
                    "last_commit_lsn" => format_lsn(self.routing.last_commit_lsn),
                    "next_id" => {
                        let node = self.proxy.config.load().proxy.node_id;
                        crate::sharding::ids::next_id(node).to_string()
                    }
                    "sharding_key" => match &self.routing.shard_setting {
                        Some(super::sharding::ShardHint::Key(k)) => k.clone(),
                        _ => String::new(),
                    },
                    "shard" => match &self.routing.shard_setting {
                        Some(super::sharding::ShardHint::Shard(s)) => s.clone(),
                        _ => String::new(),
                    },
                    _ => return Err(unknown(&name)),
                };
                let column = format!("shardgate.{name}");
                Ok(vec![
                    be::row_description_text(&[&column]),
                    be::data_row(&[&value]),
                    be::command_complete("SHOW"),
                ])
            }
            Command::Set(name, value, tag) => {
                match (name.as_str(), value) {
                    ("target", Some(v)) => {
                        self.routing.target = TargetOverride::parse(&v).ok_or((
                            "22023",
                            format!("invalid value for parameter \"shardgate.target\": \"{v}\" (primary, replica or auto)"),
                        ))?;
                    }
                    ("target", None) => self.routing.target = TargetOverride::Auto,
                    ("min_lsn", Some(v)) => {
                        self.routing.min_lsn = parse_lsn(&v).ok_or((
                            "22023",
                            format!("invalid value for parameter \"shardgate.min_lsn\": \"{v}\" (an LSN such as 0/16B3748)"),
                        ))?;
                    }
                    ("min_lsn", None) => self.routing.min_lsn = 0,
                    ("sharding_key", Some(v)) => {
                        self.check_shard_setting(super::sharding::ShardHint::Key(v.into_owned()))?
                    }
                    ("shard", Some(v)) => {
                        self.check_shard_setting(super::sharding::ShardHint::Shard(v.into_owned()))?
                    }
                    ("sharding_key" | "shard", None) => self.routing.shard_setting = None,
                    ("last_commit_lsn", _) => {
                        return Err((
                            "55P02",
                            "parameter \"shardgate.last_commit_lsn\" cannot be changed".into(),
                        ))
                    }
                    _ => return Err(unknown(&name)),
                }
                Ok(vec![be::command_complete(tag)])
            }
        }
    }
}

fn parse_command_bytes(sql: &[u8]) -> bool {
    could_be_command(sql) && std::str::from_utf8(sql).is_ok_and(|s| parse_command(s).is_some())
}

/// The cheap test every Query and Parse passes through: SHOW, SET or
/// RESET first, and `shardgate.` somewhere.
pub(super) fn could_be_command(sql: &[u8]) -> bool {
    is_command(crate::router::classify::leading_keyword(sql), sql)
}

/// [`could_be_command`] with the text's leading keyword already found.
pub(super) fn is_command(first: Option<&[u8]>, sql: &[u8]) -> bool {
    let Some(word) = first else {
        return false;
    };
    (word.eq_ignore_ascii_case(b"show")
        || word.eq_ignore_ascii_case(b"set")
        || word.eq_ignore_ascii_case(b"reset"))
        && sql
            .windows(10)
            .any(|w| w.eq_ignore_ascii_case(b"shardgate."))
}

/// `COMMIT`/`END`/`ROLLBACK`/`ABORT` alone: the command tag that ends an
/// empty transaction.
pub(super) fn empty_transaction_end(sql: &[u8]) -> Option<&'static str> {
    // Most texts are told apart by their first word, without a UTF-8
    // check and a split of the whole text (this runs on the first
    // statement of every transaction whose BEGIN the proxy answered).
    let word = crate::router::classify::leading_keyword(sql)?;
    if !["commit", "end", "rollback", "abort"]
        .iter()
        .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
    {
        return None;
    }
    let text = std::str::from_utf8(sql)
        .ok()?
        .trim()
        .trim_end_matches(';')
        .trim();
    // (No lowercased copies: this runs on every statement of a
    // transaction on a sharded topology.)
    let mut words = text.split_ascii_whitespace();
    let first = words.next()?;
    match (words.next(), words.next()) {
        (None, _) => {}
        (Some(w), None)
            if w.eq_ignore_ascii_case("work") || w.eq_ignore_ascii_case("transaction") => {}
        _ => return None,
    }
    let is = |k: &str| first.eq_ignore_ascii_case(k);
    if is("commit") || is("end") {
        Some("COMMIT")
    } else if is("rollback") || is("abort") {
        Some("ROLLBACK")
    } else {
        None
    }
}

/// The first column of a DataRow as text.
fn first_text_column(body: &[u8]) -> Option<&str> {
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let v = body.get(6..6 + usize::try_from(len).ok()?)?;
    std::str::from_utf8(v).ok()
}

#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    Show(String),
    /// SET name = value (Some) or RESET name / SET name TO DEFAULT (None),
    /// with the command tag to answer.
    Set(String, Option<std::borrow::Cow<'a, str>>, &'static str),
}

/// Recognizes `SHOW shardgate.x`, `SET [SESSION] shardgate.x {=|TO} v`,
/// `SET shardgate.x TO DEFAULT` and `RESET shardgate.x`, with an optional
/// trailing semicolon.
fn parse_command(sql: &str) -> Option<Command<'_>> {
    let s = crate::sql::strip_leading(sql);
    let (word, rest) = next_word(s)?;
    let word = word.to_ascii_lowercase();
    if !matches!(word.as_str(), "show" | "set" | "reset") {
        return None;
    }
    let mut rest = rest;
    if word == "set" {
        if let Some((w, r)) = next_word(rest) {
            if w.eq_ignore_ascii_case("session") {
                rest = r;
            }
        }
    }
    let rest = rest.trim_start();
    let prefix = "shardgate.";
    if rest.len() < prefix.len() || !rest[..prefix.len()].eq_ignore_ascii_case(prefix) {
        return None;
    }
    let rest = &rest[prefix.len()..];
    let name_len = rest
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    let name = rest[..name_len].to_ascii_lowercase();
    let rest = rest[name_len..].trim_start();
    let end = |r: &str| r.trim().trim_end_matches(';').trim().is_empty();
    match word.as_str() {
        "show" | "reset" if !end(rest) => None,
        "show" => Some(Command::Show(name)),
        "reset" => Some(Command::Set(name, None, "RESET")),
        _ => {
            let rest = if let Some(r) = rest.strip_prefix('=') {
                r
            } else {
                let (w, r) = next_word(rest)?;
                if !w.eq_ignore_ascii_case("to") {
                    return None;
                }
                r
            };
            let rest = rest.trim();
            let rest = rest.strip_suffix(';').unwrap_or(rest).trim_end();
            let value: std::borrow::Cow<'_, str> = if let Some(q) = rest.strip_prefix('\'') {
                let inner = q.strip_suffix('\'')?;
                if inner.replace("''", "").contains('\'') {
                    return None;
                }
                inner.replace("''", "'").into()
            } else {
                if rest.is_empty() || rest.contains(char::is_whitespace) {
                    return None;
                }
                rest.into()
            };
            if value.eq_ignore_ascii_case("default") && !rest.starts_with('\'') {
                return Some(Command::Set(name, None, "SET"));
            }
            Some(Command::Set(name, Some(value), "SET"))
        }
    }
}

fn next_word(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    let len = s
        .bytes()
        .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
        .count();
    (len > 0).then(|| (&s[..len], &s[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        assert_eq!(
            parse_command("SHOW shardgate.last_commit_lsn"),
            Some(Command::Show("last_commit_lsn".into()))
        );
        assert_eq!(
            parse_command("  show Shardgate.Target ; "),
            Some(Command::Show("target".into()))
        );
        assert_eq!(
            parse_command("set shardgate.target = replica"),
            Some(Command::Set("target".into(), Some("replica".into()), "SET"))
        );
        assert_eq!(
            parse_command("SET SESSION shardgate.min_lsn TO '0/16B3748';"),
            Some(Command::Set(
                "min_lsn".into(),
                Some("0/16B3748".into()),
                "SET"
            ))
        );
        assert_eq!(
            parse_command("set shardgate.target to default"),
            Some(Command::Set("target".into(), None, "SET"))
        );
        assert_eq!(
            parse_command("RESET shardgate.target"),
            Some(Command::Set("target".into(), None, "RESET"))
        );
        assert_eq!(parse_command("show work_mem"), None);
        assert_eq!(parse_command("set shardgate.target = a b"), None);
        assert_eq!(parse_command("show shardgate.target; select 1"), None);
        assert_eq!(parse_command("select 1"), None);
        assert_eq!(parse_command("set local shardgate.target = primary"), None);
    }

    #[test]
    fn cheap_command_test() {
        assert!(could_be_command(b"SHOW Shardgate.target"));
        assert!(could_be_command(b" /* x */ set shardgate.min_lsn = '0/1'"));
        assert!(!could_be_command(
            b"SELECT abalance FROM pgbench_accounts WHERE aid = 1"
        ));
        assert!(!could_be_command(b"set work_mem = '1MB'"));
    }

    #[test]
    fn empty_transactions() {
        assert_eq!(empty_transaction_end(b"COMMIT"), Some("COMMIT"));
        assert_eq!(empty_transaction_end(b" end work; "), Some("COMMIT"));
        assert_eq!(
            empty_transaction_end(b"rollback transaction"),
            Some("ROLLBACK")
        );
        assert_eq!(empty_transaction_end(b"abort"), Some("ROLLBACK"));
        assert_eq!(empty_transaction_end(b"Commit Transaction"), Some("COMMIT"));
        assert_eq!(empty_transaction_end(b"END;"), Some("COMMIT"));
        assert_eq!(empty_transaction_end(b"commit work work"), None);
        assert_eq!(empty_transaction_end(b"commit later"), None);
        assert_eq!(empty_transaction_end(b"update t set x = 1"), None);
        assert_eq!(empty_transaction_end(b"commit and chain"), None);
        assert_eq!(empty_transaction_end(b"commit; select 1"), None);
        assert_eq!(empty_transaction_end(b"rollback to savepoint a"), None);
        assert_eq!(empty_transaction_end(b"commit prepared 'x'"), None);
        assert_eq!(empty_transaction_end(b"\n\tROLLBACK\n"), Some("ROLLBACK"));
        assert_eq!(empty_transaction_end(b"endless"), None);
        assert_eq!(empty_transaction_end(b""), None);
    }

    #[test]
    fn data_row_text() {
        let row = be::data_row(&["0/16B3748"]);
        assert_eq!(first_text_column(&row.body), Some("0/16B3748"));
        assert_eq!(first_text_column(&[0, 1, 255, 255, 255, 255]), None);
    }
}
