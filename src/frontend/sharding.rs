//! The session's side of sharding: choosing the shard a transaction runs
//! on, from the statement's placement (`router::shard`), the Bind
//! parameters, hints and `shardgate.sharding_key`.
//!
//! A server connection belongs to one shard. With no server held, the
//! first statement of a transaction picks the shard (a Parse is held back
//! until the Bind that carries its key arrives). While a server is held,
//! every statement must belong to its shard; one that needs another shard
//! or several shards fails with SQLSTATE 0A000 — raised by the held server
//! itself, so its transaction is aborted exactly as Postgres would abort
//! it.

use super::pipeline::Expect;
use super::session::{Session, SessionError};
use crate::protocol::backend as be;
use crate::protocol::frontend as fe;
use crate::protocol::Frame;
use crate::router::shard::{Params, Placement, Target};
use crate::sharding::hash::{KeyType, KeyValue};
use crate::sharding::map::ShardMap;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// A Parse held back until the shard is known; its ParseComplete (or
/// error) still reaches the client in order.
pub(super) enum Owed {
    Unnamed(Frame),
    Named(Arc<super::statements::Statement>, String),
}

/// Statements a request notes for the load counters before they are
/// counted without waiting for its ReadyForQuery (a long pipeline).
const PENDING_STATEMENTS: usize = 256;

/// The longest a statement waits for a bucket move's cutover.
const CUTOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Placements by statement text, shared by all sessions.
#[derive(Default)]
pub struct PlacementCache {
    map: RwLock<HashMap<bytes::Bytes, Arc<Placement>>>,
}

/// Distinct texts kept; a client generating endless texts resets it.
const MAX_CACHED: usize = 20_000;

impl PlacementCache {
    pub fn get(&self, map: &ShardMap, sql: &[u8]) -> Arc<Placement> {
        if let Some(p) = crate::read(&self.map).get(sql) {
            return p.clone();
        }
        let text = String::from_utf8_lossy(sql);
        let p = Arc::new(crate::router::shard::place(map, &text));
        let mut cache = crate::write(&self.map);
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(bytes::Bytes::copy_from_slice(sql), p.clone());
        p
    }

    pub fn clear(&self) {
        crate::write(&self.map).clear();
    }
}

/// What a shard hint (`/* shardgate: shard=N */`, `/* shardgate: key=K */`)
/// asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShardHint {
    Shard(String),
    Key(String),
}

/// The first shard hint in a comment of `sql`.
pub fn shard_hint(sql: &[u8]) -> Option<ShardHint> {
    use crate::router::classify::{block_comments, shardgate_comment};
    for body in block_comments(sql).filter_map(shardgate_comment) {
        for word in String::from_utf8_lossy(body).split_whitespace() {
            let unquote = |v: &str| v.trim_matches(|c| c == '\'' || c == '"').to_owned();
            if let Some(v) = word.strip_prefix("shard=") {
                return Some(ShardHint::Shard(unquote(v)));
            }
            if let Some(v) = word.strip_prefix("key=") {
                return Some(ShardHint::Key(unquote(v)));
            }
        }
    }
    None
}

/// The shard a hint names: a shard's name, or its index.
pub fn hinted_shard(
    topology: &crate::topology::Topology,
    map: &ShardMap,
    hint: &ShardHint,
    sql: &str,
) -> Result<usize, String> {
    match hint {
        ShardHint::Shard(s) => topology
            .shards
            .iter()
            .position(|sh| &sh.name == s)
            .or_else(|| {
                s.parse::<usize>()
                    .ok()
                    .filter(|i| *i < topology.shards.len())
            })
            .ok_or_else(|| format!("shardgate: no shard {s:?}")),
        ShardHint::Key(k) => {
            let (ty, v) = key_for(map, sql, k)?;
            Ok(map.locate(ty, &v).shard)
        }
    }
}

/// A key given as text, read as the type of the sharded table the
/// statement names (or, naming none, as an integer, a uuid or text — the
/// first that fits).
pub fn key_for(map: &ShardMap, sql: &str, key: &str) -> Result<(KeyType, KeyValue), String> {
    let ty = map.key_type_in(sql).unwrap_or_else(|| {
        if KeyType::Int8.parse_text(key).is_ok() {
            KeyType::Int8
        } else if KeyType::Uuid.parse_text(key).is_ok() {
            KeyType::Uuid
        } else {
            KeyType::Text
        }
    });
    ty.parse_text(key)
        .map(|v| (ty, v))
        .map_err(|e| format!("shardgate: sharding key {key:?}: {e}"))
}

/// Format codes and values of a Bind.
pub struct BindValues<'a> {
    pub formats: Vec<i16>,
    pub values: Vec<Option<&'a [u8]>>,
}

/// Reads a Bind's parameters (the bytes after the statement name).
pub fn bind_values(rest: &[u8]) -> Option<BindValues<'_>> {
    let mut r = rest;
    let mut take = |n: usize| -> Option<&[u8]> {
        let (a, b) = r.split_at_checked(n)?;
        r = b;
        Some(a)
    };
    let nf = i16::from_be_bytes(take(2)?.try_into().ok()?);
    let mut formats = Vec::with_capacity(nf.max(0) as usize);
    for _ in 0..nf.max(0) {
        formats.push(i16::from_be_bytes(take(2)?.try_into().ok()?));
    }
    let np = i16::from_be_bytes(take(2)?.try_into().ok()?);
    let mut values = Vec::with_capacity(np.max(0) as usize);
    for _ in 0..np.max(0) {
        let len = i32::from_be_bytes(take(4)?.try_into().ok()?);
        values.push(if len < 0 {
            None
        } else {
            Some(take(len as usize)?)
        });
    }
    Some(BindValues { formats, values })
}

/// Parameter type OIDs after a Parse's query text (`n`, then n OIDs).
pub fn param_types(after_text: &[u8]) -> Vec<u32> {
    let Some(n) = after_text.get(..2) else {
        return Vec::new();
    };
    let n = i16::from_be_bytes([n[0], n[1]]).max(0) as usize;
    (0..n)
        .filter_map(|i| after_text.get(2 + 4 * i..6 + 4 * i))
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

impl Session {
    /// The bucket map when statements must be placed (several shards).
    pub(super) fn shard_map(&self) -> Option<Arc<ShardMap>> {
        self.shard_map.clone()
    }

    /// Picks the shard for a statement: selects it when no server is held,
    /// checks it against the held server's shard otherwise. `text` is the
    /// statement text (None: anywhere will do); `bind` its Parse parameter
    /// types and the Bind's formats and values. Err is the message of a
    /// 0A000 (or other) refusal: (SQLSTATE, message). Ok(Some(shards)):
    /// the statement needs several shards (a cross-shard read may run
    /// them; see [`Self::cross_shard_refusal`] otherwise).
    pub(super) fn route_shard(
        &mut self,
        text: Option<&[u8]>,
        bind: Option<(&[u32], &[u8])>,
    ) -> Result<Option<Vec<usize>>, (&'static str, String)> {
        self.scatter_guard = None;
        self.routing.key_hit = None;
        let Some(map) = self.shard_map() else {
            return Ok(None);
        };
        let target = match text {
            None => Target::Anywhere,
            Some(sql) => self.target_of(&map, sql, bind)?,
        };
        let want = match target {
            Target::Anywhere => {
                if self.server.is_none() {
                    self.select_shard(map.default_shard);
                }
                self.count_routed(self.shard);
                return Ok(None);
            }
            Target::Shard(s) => s,
            Target::Shards(shards, _) => {
                // Counted before the check: a move that starts now waits
                // for this statement, or this statement sees the move.
                let guard = self.proxy.reshard.enter_scatter();
                let current = self.proxy.topology.load();
                self.routing.scatter_exclusions.clear();
                if current.map.as_ref().is_some_and(|m| m.moving) {
                    let sql = text.unwrap_or_default();
                    let tables = map.mentioned_sharded_tables(&String::from_utf8_lossy(sql));
                    if !tables.is_empty() {
                        // A read leaves out, on each shard, the copies it
                        // does not own; a write would change them.
                        if !self.is_read(sql) {
                            return Err((
                                "0A000",
                                format!(
                                    "shardgate: a bucket move is under way (see `shardgate admin reshard status`): statements that write across shards to the sharded table(s) {} are refused until it has cleaned up, because a shard still holds copies of buckets it does not own; give a sharding key",
                                    tables.join(", ")
                                ),
                            ));
                        }
                        self.routing.scatter_exclusions =
                            crate::reshard::copies_not_owned(&self.proxy, &current);
                    }
                }
                self.scatter_guard = Some(guard);
                return Ok(Some(shards));
            }
            Target::Refuse(m) => return Err(("0A000", format!("shardgate: {m}"))),
            Target::Hold => {
                return Err((
                    "40001",
                    "shardgate: the key's bucket is being moved to another shard and its cutover took too long; retry the statement".into(),
                ))
            }
        };
        if self.server.is_some() {
            if want != self.shard {
                if let Some(why) = self.cannot_spread() {
                    return Err((
                        "0A000",
                        format!(
                            "shardgate: this statement belongs to shard {}, but the transaction runs on shard {}, and {why}",
                            self.shard_name(want),
                            self.shard_name(self.shard)
                        ),
                    ));
                }
                self.routing.switch_to = Some(want);
            }
            self.count_routed(want);
            return Ok(None);
        }
        self.select_shard(want);
        self.count_routed(want);
        Ok(None)
    }

    /// `route_shard` for a Bind or Query handled inline, when placing it needs
    /// nothing awaited: false (nothing counted, nothing to undo) for a
    /// statement across shards, refused, or moving the transaction on to
    /// another shard. With no server held, the shard is selected; the
    /// caller counts the statement (`count_routed`) once it goes out.
    pub(super) fn place_inline(
        &mut self,
        text: Option<&[u8]>,
        bind: Option<(&[u32], &[u8])>,
    ) -> bool {
        self.scatter_guard = None;
        self.routing.key_hit = None;
        let Some(map) = self.shard_map() else {
            return true;
        };
        let want = match text {
            None => None,
            Some(sql) => match self.target_of(&map, sql, bind) {
                Ok(Target::Anywhere) => None,
                Ok(Target::Shard(s)) => Some(s),
                _ => return false,
            },
        };
        if self.server.is_some() {
            return want.is_none_or(|s| s == self.shard);
        }
        self.select_shard(want.unwrap_or(map.default_shard));
        true
    }

    /// Notes a statement placed on `shard` (and its key, if it has one)
    /// for the load views; they count it when the server answers.
    pub(super) fn count_routed(&mut self, shard: usize) {
        let hit = self.routing.key_hit.take();
        if self.proxy.hotspots.enabled() {
            self.routing.load.routed(shard, hit);
            if self.routing.load.pending() >= PENDING_STATEMENTS {
                self.proxy.hotspots.flush_statements(&mut self.routing.load);
            }
        }
    }

    /// Is a bucket move cutting over (holding statements of its keys)?
    /// Checked before `wait_for_cutover` is called, so that the common
    /// case builds no future.
    pub(super) fn buckets_held(&self) -> bool {
        self.shard_map.as_ref().is_some_and(|m| !m.held.is_empty())
    }

    /// Waits (at most [`CUTOVER_WAIT`]) while the statement's key is in a
    /// bucket a move is cutting over; the session then places it with the
    /// new bucket map.
    pub(super) async fn wait_for_cutover(
        &mut self,
        text: Option<&[u8]>,
        bind: Option<(&[u32], &[u8])>,
    ) {
        let Some(sql) = text else { return };
        // Per statement: no clone, no clock unless a bucket is held.
        if !self.buckets_held() {
            return;
        }
        let limit = tokio::time::Instant::now() + CUTOVER_WAIT;
        let mut counted = false;
        loop {
            let Some(map) = self.shard_map() else { return };
            if map.held.is_empty() || !matches!(self.target_of(&map, sql, bind), Ok(Target::Hold)) {
                return;
            }
            if !counted {
                crate::metrics::GLOBAL.reshard_held.inc();
                counted = true;
            }
            let now = tokio::time::Instant::now();
            if now >= limit {
                return;
            }
            let mut changed = self.proxy.topology.subscribe();
            changed.borrow_and_update();
            let wake = limit.min(now + std::time::Duration::from_millis(20));
            let _ = tokio::time::timeout_at(wake, changed.changed()).await;
            self.shard_map = self.proxy.topology.load().sharded().cloned();
        }
    }

    /// Why the open transaction cannot move on to another shard, if it
    /// cannot: it must have been begun by a BEGIN the proxy knows, be
    /// healthy and idle between statements, on a primary, and not use
    /// savepoints or transaction-local settings.
    fn cannot_spread(&self) -> Option<&'static str> {
        let server = self.server.as_ref()?;
        if self.routing.tx_begin.is_none() {
            return Some(
                "only a transaction begun with a plain BEGIN (simple protocol) can span shards",
            );
        }
        if server.tx_status != b'T' {
            return Some("the transaction is not open and healthy");
        }
        if self.on_replica.is_some() {
            return Some("a read-only transaction on replicas cannot span shards");
        }
        if self.routing.tx_pinned {
            return Some("it used SAVEPOINT, SET LOCAL or SET TRANSACTION, which act on one shard");
        }
        if self.copy_in {
            return Some("a COPY is running");
        }
        if self.proxy.twophase.is_none() {
            return Some("the two-phase commit log (proxy.state_dir) could not be opened");
        }
        None
    }

    /// Moves the open transaction on to shard `to`: the current server
    /// waits (in its transaction) among `tx_parked`, and `to`'s server —
    /// already in this transaction, or newly begun with the same BEGIN —
    /// becomes the session's.
    pub(super) async fn switch_tx_shard(&mut self, to: usize) -> Result<(), (String, String)> {
        // What the current server still owes the client comes first.
        if self.drain_pipeline().await.is_err() {
            return Err((
                "08006".into(),
                "shardgate: the shard's server connection was lost".into(),
            ));
        }
        let Some(current) = self.server.take() else {
            return Ok(());
        };
        self.left_server();
        *crate::lock(&self.cancel_slot) = None;
        self.routing.tx_parked.push((self.shard, current));
        if let Some(i) = self.routing.tx_parked.iter().position(|(s, _)| *s == to) {
            let (_, conn) = self.routing.tx_parked.swap_remove(i);
            self.select_shard(to);
            *crate::lock(&self.cancel_slot) = Some(crate::cancel::CancelTarget {
                addr: conn.addr.clone(),
                pid: conn.pid,
                secret: conn.secret,
            });
            self.server = Some(conn);
            return Ok(());
        }
        self.select_shard(to);
        let begun = match self.checkout(false).await {
            Ok(()) => {
                let begin = self
                    .routing
                    .tx_begin
                    .clone()
                    .unwrap_or_else(|| "BEGIN".into());
                let server = self.server.as_mut().expect("checked out");
                match server.run_internal(&begin).await {
                    Ok(None) => Ok(()),
                    Ok(Some(e)) => Err((e.code, e.message)),
                    Err(e) => Err(("08006".into(), format!("shardgate: {e}"))),
                }
            }
            Err(e) => Err(e),
        };
        if begun.is_err() {
            // Back to the shard the transaction was on, so the error
            // fails the transaction there.
            self.drop_server();
            if let Some((shard, conn)) = self.routing.tx_parked.pop() {
                self.select_shard(shard);
                self.server = Some(conn);
            }
        }
        begun
    }

    /// The transaction-control side of a statement inside a transaction
    /// (sharding), first part: notes statements that pin the transaction
    /// to its shard. Returns true when the transaction spans shards, and
    /// `multi_shard_control` must see the statement. Kept apart so that
    /// the common case awaits (and boxes) nothing.
    /// `first`: the text's leading keyword.
    pub(super) fn spans_shards(&mut self, sql: &[u8], first: Option<&[u8]>) -> bool {
        if self.server.is_none() {
            return false;
        }
        if self.routing.tx_parked.is_empty() {
            self.routing.tx_pinned |= pins_transaction_after(first, sql);
            return false;
        }
        true
    }

    /// Ends a transaction that spans shards, or refuses what it cannot
    /// carry (after `spans_shards`). Returns true when the statement was
    /// handled here.
    pub(super) async fn multi_shard_control(&mut self, sql: &[u8]) -> Result<bool, SessionError> {
        let pins = pins_transaction(sql);
        if let Some(tag) = super::routing::empty_transaction_end(sql) {
            self.end_multi_shard_tx(tag == "COMMIT").await?;
            return Ok(true);
        }
        if pins || crate::router::classify::may_end_transaction(sql) {
            let message = "shardgate: in a transaction that spans shards, end it with a plain COMMIT or ROLLBACK, and use no SAVEPOINT, SET LOCAL or SET TRANSACTION";
            self.refuse_query("0A000", message).await;
            return Ok(true);
        }
        Ok(false)
    }

    /// COMMIT or ROLLBACK of a transaction that spans shards (simple
    /// protocol): every shard's part prepared and committed together, or
    /// all rolled back. A transaction that failed on any shard rolls back
    /// (COMMIT answers ROLLBACK, as Postgres does).
    pub(super) async fn end_multi_shard_tx(&mut self, commit: bool) -> Result<(), SessionError> {
        self.drain_pipeline().await?;
        let mut conns = Vec::new();
        let mut shards = Vec::new();
        if let Some(active) = self.server.take() {
            self.left_server();
            conns.push(active);
            shards.push(self.shard);
        }
        for (s, c) in std::mem::take(&mut self.routing.tx_parked) {
            conns.push(c);
            shards.push(s);
        }
        *crate::lock(&self.cancel_slot) = None;
        self.routing.tx_begin = None;
        self.routing.tx_pinned = false;
        let failed = conns.iter().any(|c| c.tx_status != b'T');
        let max = self.max_message_size;
        self.emit_ready_synthetics();
        if !commit || failed {
            for c in conns.iter_mut() {
                let _ = c.exchange(&super::multiwrite::query("ROLLBACK"), max).await;
            }
            super::multiwrite::release(conns);
            be::command_complete("ROLLBACK").encode(&mut self.to_client);
        } else {
            let proxy = self.proxy.clone();
            let log = proxy.twophase.as_ref().expect("checked before spreading");
            match super::multiwrite::commit_across(self, conns, &shards, log).await {
                Ok(()) => be::command_complete("COMMIT").encode(&mut self.to_client),
                Err(e) => e.encode(&mut self.to_client),
            }
        }
        be::ready_for_query(b'I').encode(&mut self.to_client);
        Ok(())
    }

    /// Waits for everything the held server still owes (asking it to
    /// answer what is pending with a Flush), forwarding it to the client.
    pub(super) async fn drain_pipeline(&mut self) -> Result<(), SessionError> {
        use tokio::io::AsyncReadExt;
        self.emit_ready_synthetics();
        if self.pipeline.is_empty() {
            return Ok(());
        }
        Frame {
            tag: fe::FLUSH,
            body: bytes::Bytes::new(),
        }
        .encode(&mut self.to_server);
        self.flush_server().await?;
        loop {
            self.emit_ready_synthetics();
            if self.pipeline.is_empty() {
                return Ok(());
            }
            let Some(server) = self.server.as_mut() else {
                return Err(self.server_lost());
            };
            let server: &mut crate::backend::ServerConn = server;
            server.read_buf.reserve(16 * 1024);
            match server.stream.read_buf(&mut server.read_buf).await {
                Ok(n) if n > 0 => {}
                _ => return Err(self.server_lost()),
            }
            self.handle_server_bytes()?;
            self.flush_client().await?;
        }
    }

    /// Why a statement that needs `shards` cannot run: inside a
    /// transaction (which holds one shard), or as a write.
    pub(super) fn cross_shard_refusal(&self, shards: &[usize]) -> (&'static str, String) {
        crate::metrics::GLOBAL.cross_shard_refusals.inc();
        let names: Vec<String> = shards.iter().map(|s| self.shard_name(*s)).collect();
        // Outside a transaction such statements run across shards; this
        // is only reached inside one.
        let why = "a statement that needs several shards at once is not supported inside a transaction (run it outside, where it commits atomically on every shard)";
        (
            "0A000",
            format!(
                "shardgate: this statement needs shards {}: {why} — restrict it to one sharding key, or name a shard with /* shardgate: shard=NAME */",
                names.join(", ")
            ),
        )
    }

    fn target_of(
        &mut self,
        map: &Arc<ShardMap>,
        sql: &[u8],
        bind: Option<(&[u32], &[u8])>,
    ) -> Result<Target, (&'static str, String)> {
        let hint = shard_hint(sql).or_else(|| self.routing.shard_setting.clone());
        if let Some(hint) = hint {
            if let ShardHint::Key(k) = &hint {
                if !map.held.is_empty() {
                    if let Ok((ty, v)) = key_for(map, &String::from_utf8_lossy(sql), k) {
                        if map.is_held(map.locate(ty, &v).bucket) {
                            return Ok(Target::Hold);
                        }
                    }
                }
            }
            let topology = self.proxy.topology.load();
            let text = String::from_utf8_lossy(sql);
            return hinted_shard(&topology, map, &hint, &text)
                .map(Target::Shard)
                .map_err(|m| ("22023", m));
        }
        // A text that names no configured table needs neither a parse nor
        // the placement cache (whose lookup hashes the whole text, and
        // which texts with ever new literals would only churn).
        let mentioned = crate::router::shard::mentioned(map, sql);
        let unmentioned = crate::router::shard::unmentioned_given(map, sql, mentioned);
        if mentioned && bind.is_none() {
            // Simple protocol: place the text with its literals taken out,
            // so a statement sent with ever new keys is analysed once.
            if let Some(target) = self.target_by_normalized(map, sql) {
                return Ok(target);
            }
        }
        let cached;
        let placement = if unmentioned {
            &Placement::Unmentioned
        } else {
            cached = self.proxy.placements.get(map, sql);
            &*cached
        };
        // Only keys need the Bind's values decoded.
        let values;
        let params = match bind {
            Some((types, rest)) if matches!(placement, Placement::Keys { .. }) => {
                values = bind_values(rest);
                values.as_ref().map(|b| Params {
                    types,
                    formats: &b.formats,
                    values: &b.values,
                })
            }
            _ => None,
        };
        let target = if self.proxy.hotspots.enabled() {
            placement.resolve_noting(map, params.as_ref(), Some(&mut self.routing.key_hit))
        } else {
            placement.resolve(map, params.as_ref())
        };
        // A statement that names no configured table may name no table at
        // all (SELECT now(), SET ...): inside a transaction on another
        // shard, tell that apart from one reading default-shard tables.
        if *placement == Placement::Unmentioned
            && self.server.is_some()
            && self.shard != map.default_shard
        {
            let full = crate::router::shard::analyse(map, &String::from_utf8_lossy(sql));
            return Ok(full.resolve(map, None));
        }
        Ok(target)
    }

    /// Text and parameter types of the unnamed statement (a named one
    /// keeps both itself).
    pub(super) fn unnamed_text_and_types(&self) -> (Option<bytes::Bytes>, Vec<u32>) {
        let Some(text) = self.statement_text("") else {
            return (None, Vec::new());
        };
        // Body of a Parse of the unnamed statement: "\0" query "\0" types.
        let types = self
            .unnamed_parse
            .as_ref()
            .and_then(|p| p.body.get(text.len() + 2..))
            .map_or_else(Vec::new, param_types);
        (Some(text), types)
    }

    /// A Describe with no server held: the statement's shard when its text
    /// alone decides one, else the default shard (describing runs nothing).
    pub(super) fn route_describe(&mut self, frame: &Frame) {
        let Some(map) = self.shard_map() else {
            return;
        };
        let text = match fe::parse_target(&frame.body, "Describe") {
            Ok(t) if t.kind == b'S' => self.statement_text(t.name),
            _ => None,
        };
        let shard = match text.map(|t| self.target_of(&map, &t, None)) {
            Some(Ok(Target::Shard(s))) => s,
            _ => map.default_shard,
        };
        self.select_shard(shard);
    }

    /// The target of a simple-protocol text through the placement of its
    /// literal-free form, when that placement names keys (or needs no
    /// shard in particular); None otherwise (the text is placed as is).
    fn target_by_normalized(&mut self, map: &ShardMap, sql: &[u8]) -> Option<Target> {
        let text = std::str::from_utf8(sql).ok()?;
        let (norm, literals) = crate::router::shard::normalize_literals(text)?;
        if literals.is_empty() {
            return None;
        }
        let placement = self.proxy.placements.get(map, norm.as_bytes());
        if !matches!(*placement, Placement::Keys { .. }) {
            return None;
        }
        let values: Vec<Option<&[u8]>> = literals.iter().map(|l| Some(l.as_bytes())).collect();
        let params = Params {
            types: &[],
            formats: &[],
            values: &values,
        };
        let mut hit = None;
        let noting = self.proxy.hotspots.enabled().then_some(&mut hit);
        match placement.resolve_noting(map, Some(&params), noting) {
            t @ (Target::Shard(_) | Target::Anywhere) => {
                self.routing.key_hit = hit;
                Some(t)
            }
            // Several shards, or a literal that is not a key: as written.
            _ => None,
        }
    }

    fn shard_name(&self, i: usize) -> String {
        let topology = self.proxy.topology.load();
        topology
            .shards
            .get(i)
            .map_or_else(|| i.to_string(), |s| s.name.clone())
    }

    /// Records a commit position the session reached on `shard`.
    pub(super) fn note_commit_lsn(&mut self, shard: usize, lsn: u64) {
        if shard == self.shard {
            self.routing.last_commit_lsn = self.routing.last_commit_lsn.max(lsn);
            return;
        }
        if self.commit_lsns.len() <= shard {
            self.commit_lsns.resize(shard + 1, Default::default());
        }
        self.commit_lsns[shard].0 = self.commit_lsns[shard].0.max(lsn);
    }

    /// One server connection of each of `shards` (a replica's when `read`
    /// and the rules allow), held by the caller rather than the session:
    /// statements that run on several shards at once.
    pub(super) async fn checkout_each(
        &mut self,
        shards: &[usize],
        read: bool,
    ) -> Result<Vec<crate::backend::pool::PooledConn>, (String, String)> {
        let mut conns = Vec::new();
        for &s in shards {
            self.select_shard(s);
            // On error the connections taken so far are idle and go back
            // to their pools when dropped.
            self.checkout(read).await?;
            self.pool.metrics.queries.inc();
            if let Some(c) = self.server.take() {
                self.left_server();
                conns.push(c);
            }
        }
        *crate::lock(&self.cancel_slot) = None;
        Ok(conns)
    }

    /// Makes shard `i` the session's (no server may be held).
    pub(super) fn select_shard(&mut self, i: usize) {
        if i == self.shard || self.server.is_some() {
            return;
        }
        if self.parked.len() <= i.max(self.shard) {
            self.parked.resize_with(i.max(self.shard) + 1, || None);
            self.commit_lsns
                .resize(i.max(self.shard) + 1, Default::default());
        }
        self.commit_lsns[self.shard] = (self.routing.last_commit_lsn, self.routing.unprobed);
        let topology = self.proxy.topology.load();
        let (primary, replicas) = match self.parked[i].take() {
            Some(p) => p,
            None => super::session::pools_for(&self.proxy, &self.login, &topology, i),
        };
        let old_primary = std::mem::replace(&mut self.primary_pool, primary);
        let old_replicas = std::mem::replace(&mut self.replicas, replicas);
        self.parked[self.shard] = Some((old_primary, old_replicas));
        self.pool = self.primary_pool.clone();
        self.shard = i;
        (self.routing.last_commit_lsn, self.routing.unprobed) = self.commit_lsns[i];
        self.refresh_routing_flags();
    }

    /// `SET shardgate.sharding_key` / `shardgate.shard`: checked now, used
    /// for every statement without a hint of its own until RESET.
    pub(super) fn check_shard_setting(
        &mut self,
        hint: ShardHint,
    ) -> Result<(), (&'static str, String)> {
        let topology = self.proxy.topology.load();
        let Some(map) = topology.map.clone() else {
            return Err((
                "55000",
                "shardgate: sharding is not configured ([sharding] is missing)".into(),
            ));
        };
        hinted_shard(&topology, &map, &hint, "").map_err(|m| ("22023", m))?;
        self.routing.shard_setting = Some(hint);
        Ok(())
    }

    /// Refuses the current simple Query with `message`, raised by a server
    /// so that an open transaction fails as Postgres fails it.
    pub(super) async fn refuse_query(&mut self, code: &str, message: &str) {
        if self.server.is_none() && self.routing.pending_begin.is_none() {
            self.emit_ready_synthetics();
            self.queue_error(code, message);
            be::ready_for_query(b'I').encode(&mut self.to_client);
            return;
        }
        if self.server.is_none() {
            // Inside a deferred BEGIN: start it so the error aborts it.
            if let Some(map) = self.shard_map() {
                self.select_shard(map.default_shard);
            }
            if self.materialize_begin().await.is_err() || self.server.is_none() {
                self.queue_error(code, message);
                be::ready_for_query(b'I').encode(&mut self.to_client);
                return;
            }
        }
        fe::build_query(&raise_sql(code, message)).encode(&mut self.to_server);
        self.pipeline.push_back(Expect::Query);
    }

    /// Refuses the current extended-protocol message with `message`: the
    /// held (or a default-shard) server fails at the same point.
    pub(super) async fn refuse_extended(
        &mut self,
        code: &str,
        message: &str,
    ) -> Result<(), SessionError> {
        if self.server.is_none() {
            if let Some(map) = self.shard_map() {
                self.select_shard(map.default_shard);
            }
            if self.routing.pending_begin.is_some() {
                self.materialize_begin().await?;
            }
            if !self.ensure_server(false, false).await {
                return Ok(());
            }
        }
        self.fail_in_step(be::error_response("ERROR", code, message));
        crate::metrics::count_error(code.as_bytes());
        Ok(())
    }

    /// Sends the Parses held back for the shard decision, in order, on the
    /// server just checked out.
    pub(super) fn send_owed_parses(&mut self) {
        if self.routing.owed.is_empty() {
            return;
        }
        let mut owed = std::mem::take(&mut self.routing.owed);
        for owed in owed.drain(..) {
            match owed {
                Owed::Unnamed(frame) => {
                    frame.encode(&mut self.to_server);
                    self.unnamed_on_server = true;
                    self.pipeline.push_back(Expect::Parse {
                        stmt: None,
                        client_name: None,
                        injected: false,
                    });
                }
                Owed::Named(stmt, name) => self.send_client_parse(stmt, name),
            }
        }
        // The list keeps its allocation for the next request.
        if self.routing.owed.is_empty() {
            self.routing.owed = owed;
        }
    }

    /// Held-back Parses must be answered before a message the proxy
    /// answers itself (or one that needs no particular shard).
    pub(super) async fn settle_owed(&mut self) {
        if self.routing.owed.is_empty() {
            return;
        }
        if self.server.is_some() {
            self.send_owed_parses();
            return;
        }
        if let Some(map) = self.shard_map() {
            self.select_shard(map.default_shard);
        }
        self.ensure_server(false, false).await;
    }
}

/// SAVEPOINT, RELEASE, ROLLBACK TO, SET LOCAL, SET TRANSACTION: they act
/// on one server's transaction.
pub(super) fn pins_transaction(sql: &[u8]) -> bool {
    pins_transaction_after(crate::router::classify::leading_keyword(sql), sql)
}

/// [`pins_transaction`], given the text's leading keyword.
pub(super) fn pins_transaction_after(first: Option<&[u8]>, sql: &[u8]) -> bool {
    // Runs on every statement inside a transaction: most are told apart
    // by their leading keyword, without a lowercased copy of the text.
    if let Some(word) = first {
        if !["savepoint", "release", "rollback", "set"]
            .iter()
            .any(|k| word.eq_ignore_ascii_case(k.as_bytes()))
        {
            return false;
        }
    }
    let s = String::from_utf8_lossy(sql);
    let text = crate::sql::strip_leading(&s).to_lowercase();
    let mut words = text
        .split(|c: char| !c.is_alphanumeric() && c != '_')
        .filter(|w| !w.is_empty());
    matches!(
        (words.next(), words.next()),
        (Some("savepoint" | "release"), _)
            | (Some("rollback"), Some("to"))
            | (Some("set"), Some("local" | "transaction" | "constraints"))
    )
}

/// A statement that makes Postgres raise `code`/`message` itself.
fn raise_sql(code: &str, message: &str) -> String {
    let message = message.replace('\'', "''").replace("$sg$", "");
    let code: String = code.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("DO $sg$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{message}'; END$sg$")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_that_pin_a_transaction() {
        for sql in [
            "SAVEPOINT a",
            " /* c */ release a",
            "-- c\nsavepoint a",
            "ROLLBACK TO a",
            "rollback to savepoint a",
            "SET LOCAL work_mem = '1MB'",
            "set transaction read only",
            "SET CONSTRAINTS ALL DEFERRED",
        ] {
            assert!(pins_transaction(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "rollback",
            "set work_mem = '1MB'",
            "UPDATE t SET x = 1",
            "select 1",
            "savepoints",
            "",
        ] {
            assert!(!pins_transaction(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn hints() {
        assert_eq!(
            shard_hint(b"/* shardgate: shard=s1 */ select 1"),
            Some(ShardHint::Shard("s1".into()))
        );
        assert_eq!(
            shard_hint(b"select 1 /* shardgate: key='42' */"),
            Some(ShardHint::Key("42".into()))
        );
        assert_eq!(shard_hint(b"/* shardgate: primary */ select 1"), None);
        assert_eq!(shard_hint(b"select 'shard=1'"), None);
    }

    #[test]
    fn bind_parameters() {
        // 1 format (binary), 2 values: 8 bytes and NULL, 0 result formats.
        let mut b = vec![0, 1, 0, 1, 0, 2, 0, 0, 0, 8];
        b.extend_from_slice(&42i64.to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&[0, 0]);
        let v = bind_values(&b).unwrap();
        assert_eq!(v.formats, vec![1]);
        assert_eq!(v.values, vec![Some(&42i64.to_be_bytes()[..]), None]);
        assert!(bind_values(&b[..9]).is_none());
        assert_eq!(param_types(&[0, 1, 0, 0, 0, 20]), vec![20]);
        assert!(raise_sql("0A000", "it's").contains("'it''s'"));
    }
}
