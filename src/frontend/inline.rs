//! The fast path for client messages: a message that needs nothing
//! awaited (no checkout wait, no shape check, no answer to wait for) is
//! handled synchronously, in place in the client buffer, instead of going
//! through the async dispatch, whose state is copied once per layer and
//! per message. Each inline handler mirrors its general counterpart in
//! `client_msgs` (keep the two in step) and, when the message needs the
//! general path after all, hands it back before doing anything that path
//! would do a second time.

use super::pipeline::Expect;
use super::session::{Session, SessionError};
use crate::protocol::frame::{Frame, FrameRef};
use crate::protocol::frontend as fe;

impl Session {
    /// May this message (its tag and first body byte) skip the async
    /// dispatch, which costs a copy of its state per message? Execute,
    /// Sync, Flush, CopyData and a portal's Describe need no wait on a
    /// held server; with shards, the unnamed statement's Parse is held
    /// back for its Bind (between transactions, and inside one that may
    /// move on to another shard) or sent on. Not when anything about the
    /// session calls for the general path: a read kept for a retry
    /// (except for the Execute, Sync, Flush and Describe that complete
    /// its request), a deferred BEGIN, owed Parses, a new topology.
    pub(super) fn inline_ok(&self, tag: u8, first: Option<u8>) -> bool {
        let held = self.server.is_some();
        let inline = match tag {
            fe::EXECUTE | fe::SYNC | fe::FLUSH | fe::COPY_DATA => held,
            // `inline_bind` and `inline_query` check the rest (and may
            // hand the message back).
            fe::BIND | fe::QUERY => true,
            fe::DESCRIBE => held && first == Some(b'P'),
            // The unnamed statement (its empty name: the body starts with
            // a NUL): held back with shards and no server; inside a
            // transaction, held back or sent on as `on_parse` decides.
            fe::PARSE => {
                first == Some(0)
                    && match &self.server {
                        None => self.shard_map.is_some(),
                        Some(s) => s.tx_status != b'I',
                    }
            }
            _ => false,
        };
        // (`dispatch_in_place` records those for the retry.)
        inline
            && (self.routing.retry.is_none()
                || matches!(tag, fe::EXECUTE | fe::SYNC | fe::FLUSH | fe::DESCRIBE))
            && self.routing.pending_begin.is_none()
            && (self.routing.owed.is_empty() || matches!(tag, fe::PARSE | fe::BIND))
            && self.proxy.topology.epoch() == self.pool_epoch
    }

    /// A message `inline_ok` passed, other than Parse. As
    /// `handle_client_message` would, minus what it keeps for a replica
    /// retry (a server is held, or a Bind attaches one on the primary).
    /// Returns false for a Bind or Query that needs the general path after
    /// all.
    /// `after`: the client's messages behind this one (the rest of its
    /// batch, to vouch for a read).
    pub(super) fn dispatch_in_place(
        &mut self,
        frame: FrameRef<'_>,
        after: &[u8],
    ) -> Result<bool, SessionError> {
        let ends = matches!(frame.tag, fe::SYNC | fe::QUERY);
        self.routing.batch_open = !ends;
        if self.routing.retry.is_some() {
            self.record_for_retry(ends, || frame.to_frame());
        }
        match frame.tag {
            fe::BIND => return Ok(self.inline_bind(frame, after)),
            fe::QUERY => return Ok(self.inline_query(frame)),
            fe::EXECUTE => {
                if self.execute_prelude(frame) {
                    self.execute_send(frame);
                }
            }
            fe::SYNC => self.on_sync(frame),
            fe::DESCRIBE => {
                if self.describe_prelude(frame)?.is_some() {
                    frame.encode(&mut self.to_server);
                    self.pipeline.push_back(Expect::Describe);
                }
            }
            _ => self.forward_if_attached(frame),
        }
        Ok(true)
    }

    /// The unnamed statement's Parse `inline_ok` passed: held back or
    /// sent on, as `on_parse` would.
    pub(super) fn inline_parse(&mut self, frame: Frame) -> Result<(), SessionError> {
        if self.parse_prelude(&frame)?.is_some() {
            if self.parse_deferred() {
                self.defer_unnamed_parse(frame);
            } else {
                self.send_unnamed_parse(frame);
            }
        }
        Ok(())
    }

    /// What an inline Bind or Query needs of the session: not skipping
    /// to Sync, no bucket cutover, and a held server with no transaction
    /// spread over shards and no position probe still owed.
    fn may_place_inline(&self) -> bool {
        !self.skipping
            && !self.buckets_held()
            && self.server.as_ref().is_none_or(|s| {
                self.routing.tx_parked.is_empty()
                    && (s.tx_status != b'I' || self.pipeline.is_empty())
            })
    }

    /// A simple Query that needs nothing awaited, handled in place as
    /// `dispatch_client_message` would (keep the two in step). False,
    /// before anything the general path would do a second time, for
    /// `shardgate.*` commands, BEGIN (which the proxy may answer itself),
    /// COPY, a statement across shards or moving the transaction on to
    /// another, a read for a replica other than the spare's, and a write
    /// with no spare on the primary to attach.
    fn inline_query(&mut self, frame: FrameRef<'_>) -> bool {
        if !self.may_place_inline() {
            return false;
        }
        let text = frame.body.strip_suffix(&[0]).unwrap_or(frame.body);
        let first = crate::router::classify::leading_keyword(text);
        let special = |w: &[u8]| {
            [&b"begin"[..], b"start", b"copy"]
                .iter()
                .any(|k| w.eq_ignore_ascii_case(k))
        };
        if first.is_some_and(special) || super::routing::is_command(first, text) {
            return false;
        }
        let sharded = self.shard_map.is_some();
        // A read for a replica is handled here only when the session's
        // spare is on a replica (`attach_replica_spare` checks the rest);
        // otherwise it takes the general path, which places it on its
        // shard too: handed back before it is placed here, so that it is
        // placed once. (Placement may move the session to a shard with or
        // without replicas; the general path decides for that shard.)
        let mut class = None;
        let mut read = false;
        if self.server.is_none() && self.routing.split {
            let c = self.classify(text);
            read = self.wants_replica(&c);
            let spare_on_replica = self
                .spare
                .as_ref()
                .is_some_and(|p| p.key.role == crate::backend::Role::Replica);
            if read && !spare_on_replica {
                self.routing.handed_class = Some(c);
                return false;
            }
            class = Some(c);
        }
        if sharded && !self.place_inline(Some(text), None) {
            self.routing.handed_class = class;
            return false;
        }
        if read {
            // (Handed back, it is placed again: rare, a new pick is due.)
            if !self.attach_replica_spare(frame, true) {
                self.routing.handed_class = class;
                return false;
            }
            if sharded {
                self.count_routed(self.shard);
            }
            self.send_query(frame, first, class, false);
            return true;
        }
        if class.is_none() && self.server.is_none() && self.routing.split {
            class = Some(self.classify(text));
        }
        if self.server.is_none() {
            if !self.attach_primary_spare(false) {
                // The general path takes the class rather than the
                // classification again.
                self.routing.handed_class = class;
                return false;
            }
            self.send_owed_parses();
        } else if sharded {
            // Only records a statement that pins the transaction (no
            // transaction is spread over shards here).
            self.spans_shards(text, first);
        }
        if sharded {
            self.count_routed(self.shard);
        }
        self.send_query(frame, first, class, false);
        true
    }

    /// A Bind that needs nothing awaited, handled in place as `on_bind`
    /// would (keep the two in step). False, before anything the general
    /// path would do a second time, when the Bind needs that path:
    /// statements the proxy answers, a bucket cutover, a transaction
    /// spread over shards or moving on to another, a position probe still
    /// owed, a statement the proxy does not know, a read for a replica,
    /// no spare on the primary to attach, or a prepared statement whose
    /// shape must be checked on this connection first.
    fn inline_bind(&mut self, frame: FrameRef<'_>, after: &[u8]) -> bool {
        if !self.may_place_inline()
            || !self.routing.proxy_stmts.is_empty()
            || !self.routing.proxy_portals.is_empty()
        {
            return false;
        }
        let Ok(bind) = fe::parse_bind(frame.body) else {
            return false;
        };
        let named = match bind.statement.is_empty() {
            true => None,
            false => match self.statements.get(bind.statement) {
                Some(s) => Some(s.clone()),
                None => return false,
            },
        };
        let mut looked_up = None;
        if self.shard_map.is_some() {
            let unnamed_types;
            let (text, types) = match &named {
                Some(s) => (Some(s.text_bytes()), s.types.as_slice()),
                None => {
                    let (text, types) = self.unnamed_text_and_types();
                    unnamed_types = types;
                    (text, unnamed_types.as_slice())
                }
            };
            if !self.place_inline(text.as_deref(), Some((types, bind.rest))) {
                return false;
            }
            if self.server.is_some() {
                if let Some(t) = text.as_deref() {
                    self.routing.tx_pinned |= super::sharding::pins_transaction(t);
                }
                self.send_owed_parses();
            }
            looked_up = Some(text);
        }
        let (text, class, read) =
            self.bind_text_and_read(looked_up, named.as_deref(), bind.statement, Some(after));
        let mut on_spare_replica = false;
        if self.server.is_none() {
            // (A read handed back after placement is placed again: rare,
            // a new pick of replica is due.)
            let attached = match read {
                true => self.attach_replica_spare(frame, false),
                false => self.attach_primary_spare(false),
            };
            if !attached {
                return false;
            }
            on_spare_replica = read;
            self.send_owed_parses();
        }
        let stmt = named.filter(|_| self.renames());
        if let Some(s) = &stmt {
            let server = self.server.as_ref().expect("attached");
            if s.shape.get().is_some()
                && !server.prepared.contains(&s.id)
                && !s.stale.load(std::sync::atomic::Ordering::Relaxed)
            {
                // Its shape is checked on this connection first (the
                // general path finds the server attached and goes on, and
                // records this Bind for the read's retry itself).
                if on_spare_replica {
                    if let Some(r) = self.routing.retry.as_mut() {
                        r.clear();
                    }
                }
                return false;
            }
        }
        if self.shard_map.is_some() {
            self.count_routed(self.shard);
        }
        self.note_bind_commit(text.as_deref(), stmt.as_deref(), class);
        if bind.statement.is_empty() {
            self.ensure_unnamed();
            frame.encode(&mut self.to_server);
        } else if let Some(stmt) = stmt {
            if self.prepare_on_server(&stmt).is_none() {
                self.fail_stale_statement();
                return true;
            }
            fe::encode_bind(bind.portal, &stmt.name, bind.rest, &mut self.to_server);
        } else {
            frame.encode(&mut self.to_server);
        }
        self.pipeline.push_back(Expect::Bind);
        true
    }
}
