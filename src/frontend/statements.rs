//! Prepared statements under transaction pooling.
//!
//! A client's named statement may be needed on any server connection. Each
//! distinct (query text, parameter types) gets one proxy-wide name
//! `sg_<id>`; a client's name maps to it; every server connection remembers
//! which ids it has prepared. A Bind or Describe for a statement the server
//! lacks is preceded by an injected Parse whose answer the client never
//! sees; a Parse the server already has is answered by the proxy.

use crate::protocol::frontend::{build_parse, Parse};
use crate::protocol::Frame;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The server-side name, `sg_<id>`.
    pub name: String,
    pub query: String,
    /// A ready-to-send Parse under the server-side name.
    pub parse: Frame,
    /// The statement is a SET/RESET, so its CommandComplete needs its text.
    pub is_set: bool,
    /// A server accepted this Parse once. A client's Parse of a validated
    /// statement is answered without a server connection: drivers that
    /// prepare synchronously (pgbench -M prepared, one thread for many
    /// connections) would otherwise wait for a connection that another of
    /// their own connections holds. A statement that stopped being valid
    /// (schema change) fails at Bind instead of Parse.
    pub validated: AtomicBool,
}

/// Bound on the proxy-wide registry (a client that prepares endless
/// distinct texts must not grow proxy memory without limit).
const MAX_CACHED_STATEMENTS: usize = 100_000;

/// Proxy-wide registry of statements by (query, parameter types).
#[derive(Default)]
pub struct StatementCache {
    by_text: Mutex<HashMap<Vec<u8>, Arc<Statement>>>,
    next_id: AtomicU64,
}

impl StatementCache {
    /// The shared statement for a client's Parse. `key` is the Parse body
    /// after the statement name: query text, NUL, parameter types.
    pub fn intern(&self, parse: &Parse<'_>, key: &[u8]) -> Arc<Statement> {
        let mut map = self.by_text.lock().expect("statement cache lock");
        if let Some(s) = map.get(key) {
            return s.clone();
        }
        if map.len() >= MAX_CACHED_STATEMENTS {
            // Forgetting is safe: sessions and servers keep what they hold;
            // a statement seen again just gets a new server-side name.
            map.clear();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("sg_{id}");
        let stmt = Arc::new(Statement {
            id,
            parse: build_parse(&name, parse.query, parse.param_types),
            name,
            query: parse.query.to_owned(),
            is_set: crate::sql::starts_with_set_or_reset(parse.query),
            validated: AtomicBool::new(false),
        });
        map.insert(key.to_vec(), stmt.clone());
        stmt
    }

    pub fn len(&self) -> usize {
        self.by_text.lock().expect("statement cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
