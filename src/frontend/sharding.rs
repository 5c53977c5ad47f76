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
    let mut rest = sql;
    while let Some(start) = memchr::memmem::find(rest, b"/*") {
        let body = &rest[start + 2..];
        let end = memchr::memmem::find(body, b"*/").unwrap_or(body.len());
        let comment = String::from_utf8_lossy(&body[..end]);
        if let Some(at) = comment.find("shardgate:") {
            for word in comment[at + 10..].split_whitespace() {
                let unquote = |v: &str| v.trim_matches(|c| c == '\'' || c == '"').to_owned();
                if let Some(v) = word.strip_prefix("shard=") {
                    return Some(ShardHint::Shard(unquote(v)));
                }
                if let Some(v) = word.strip_prefix("key=") {
                    return Some(ShardHint::Key(unquote(v)));
                }
            }
        }
        rest = &body[end.min(body.len())..];
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
                return Ok(None);
            }
            Target::Shard(s) => s,
            Target::Shards(shards, _) => return Ok(Some(shards)),
            Target::Refuse(m) => return Err(("0A000", format!("shardgate: {m}"))),
        };
        if self.server.is_some() {
            if want != self.shard {
                return Err((
                    "0A000",
                    format!(
                        "shardgate: this statement belongs to shard {}, but the transaction runs on shard {}; transactions across shards are not supported yet",
                        self.shard_name(want),
                        self.shard_name(self.shard)
                    ),
                ));
            }
            return Ok(None);
        }
        self.select_shard(want);
        Ok(None)
    }

    /// Why a statement that needs `shards` cannot run: inside a
    /// transaction (which holds one shard), or as a write.
    pub(super) fn cross_shard_refusal(&self, shards: &[usize]) -> (&'static str, String) {
        crate::metrics::GLOBAL.cross_shard_refusals.inc();
        let names: Vec<String> = shards.iter().map(|s| self.shard_name(*s)).collect();
        let why = if self.server.is_some() || self.routing.pending_begin.is_some() {
            "statements across shards inside a transaction are not supported yet"
        } else {
            "writes across shards are not supported yet"
        };
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
            let topology = self.proxy.topology.load();
            let text = String::from_utf8_lossy(sql);
            return hinted_shard(&topology, map, &hint, &text)
                .map(Target::Shard)
                .map_err(|m| ("22023", m));
        }
        let placement = self.proxy.placements.get(map, sql);
        let values;
        let params = match bind {
            Some((types, rest)) => {
                values = bind_values(rest);
                values.as_ref().map(|b| Params {
                    types,
                    formats: &b.formats,
                    values: &b.values,
                })
            }
            None => None,
        };
        let target = placement.resolve(map, params.as_ref());
        // A statement that names no configured table may name no table at
        // all (SELECT now(), SET ...): inside a transaction on another
        // shard, tell that apart from one reading default-shard tables.
        if *placement == Placement::Unmentioned
            && self.server.is_some()
            && self.shard != map.default_shard
        {
            let full = crate::router::shard::analyse(map, &String::from_utf8_lossy(sql));
            return Ok(full.resolve(map, params.as_ref()));
        }
        Ok(target)
    }

    /// Text and parameter types of a statement named in Bind/Describe.
    pub(super) fn statement_text_and_types(&self, name: &str) -> (Option<bytes::Bytes>, Vec<u32>) {
        let body = if name.is_empty() {
            self.unnamed_parse.as_ref().map(|p| p.body.slice(1..))
        } else {
            self.statements.get(name).map(|s| s.key.clone())
        };
        let Some(body) = body else {
            return (None, Vec::new());
        };
        let Some(end) = memchr::memchr(0, &body) else {
            return (None, Vec::new());
        };
        (Some(body.slice(..end)), param_types(&body[end + 1..]))
    }

    /// A Describe with no server held: the statement's shard when its text
    /// alone decides one, else the default shard (describing runs nothing).
    pub(super) fn route_describe(&mut self, frame: &Frame) {
        let Some(map) = self.shard_map() else {
            return;
        };
        let text = match fe::parse_target(&frame.body, "Describe") {
            Ok(t) if t.kind == b'S' => self.statement_text_and_types(t.name).0,
            _ => None,
        };
        let shard = match text.map(|t| self.target_of(&map, &t, None)) {
            Some(Ok(Target::Shard(s))) => s,
            _ => map.default_shard,
        };
        self.select_shard(shard);
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
            self.commit_lsns.resize(shard + 1, 0);
        }
        self.commit_lsns[shard] = self.commit_lsns[shard].max(lsn);
    }

    /// Makes shard `i` the session's (no server may be held).
    pub(super) fn select_shard(&mut self, i: usize) {
        if i == self.shard || self.server.is_some() {
            return;
        }
        if self.parked.len() <= i.max(self.shard) {
            self.parked.resize_with(i.max(self.shard) + 1, || None);
            self.commit_lsns.resize(i.max(self.shard) + 1, 0);
        }
        self.commit_lsns[self.shard] = self.routing.last_commit_lsn;
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
        self.routing.last_commit_lsn = self.commit_lsns[i];
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
        for owed in std::mem::take(&mut self.routing.owed) {
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
    }

    /// Held-back Parses must be answered before a message the proxy
    /// answers itself (or one that needs no particular shard).
    pub(super) async fn settle_owed(&mut self) {
        if self.routing.owed.is_empty() || self.server.is_some() {
            return;
        }
        if let Some(map) = self.shard_map() {
            self.select_shard(map.default_shard);
        }
        self.ensure_server(false, false).await;
    }
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
