//! Prepared statements under transaction pooling.
//!
//! A client's named statement may be needed on any server connection. Each
//! Parse of a named statement gets its own server-side name `sg_<id>`
//! (never shared between clients, never reused after Close, so a statement
//! prepared before a schema change is not handed to a Parse made after it:
//! Postgres would fail it with "cached plan must not change result type").
//! Every server connection remembers which ids it has prepared; a Bind or
//! Describe for a statement the server lacks is preceded by an injected
//! Parse whose answer the client never sees.

use crate::protocol::frontend::{build_parse, Parse};
use crate::protocol::Frame;
use crate::router::catalog::Catalog;
use crate::router::classify::Class;
use bytes::Bytes;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

#[derive(Debug)]
pub struct Statement {
    pub id: u64,
    /// The server-side name, `sg_<id>`.
    pub name: String,
    /// Query text, NUL, parameter types: the identity of the statement.
    pub key: Bytes,
    /// Length of the query text at the front of `key`.
    text_len: usize,
    /// The parameter types (sharding keys in a Bind are decoded by them).
    pub types: Vec<u32>,
    /// A ready-to-send Parse under the server-side name.
    pub parse: Frame,
    /// The result shape (RowDescription body; empty for NoData) from the
    /// first server that prepared it. Postgres fixes a prepared statement's
    /// result type at Parse; when the statement is prepared again on
    /// another server connection after a schema change, the shapes differ
    /// and the client gets the error Postgres gives (0A000, cached plan
    /// must not change result type) instead of rows of another shape.
    pub shape: OnceLock<Bytes>,
    /// Set once a server's shape differed: like a Postgres prepared
    /// statement, it fails from then on until the client prepares it again.
    pub stale: AtomicBool,
    /// The text is a COPY.
    pub copy: bool,
    /// The text's routing class and the catalog generation it was found
    /// with (`generation << 8 | 0x80 | class bits`; 0: not yet): a
    /// statement bound again and again is classified once per catalog.
    class: AtomicU64,
}

impl Statement {
    /// The query text (the key up to its NUL).
    pub fn text(&self) -> &[u8] {
        &self.key[..self.text_len]
    }

    /// The query text, sharing `key`'s buffer.
    pub fn text_bytes(&self) -> Bytes {
        self.key.slice(..self.text_len)
    }

    /// The routing class of the statement's text `sql` under `catalog`.
    pub fn class(&self, sql: &[u8], catalog: &Catalog) -> Class {
        let generation = catalog.generation();
        let known = self.class.load(Ordering::Relaxed);
        if known != 0 && known >> 8 == generation {
            return Class::unpack(known as u8 & 0x7f);
        }
        let class = crate::router::classify::classify(sql, catalog);
        self.class.store(
            generation << 8 | 0x80 | u64::from(class.pack()),
            Ordering::Relaxed,
        );
        class
    }
}

/// Bound on the set of known-good texts (a client that prepares endless
/// distinct texts must not grow proxy memory without limit).
const MAX_VALIDATED: usize = 100_000;

/// Proxy-wide: statement ids, and which statement texts a server has
/// accepted before.
#[derive(Default)]
pub struct StatementRegistry {
    next_id: AtomicU64,
    /// Texts some server parsed successfully. A client's Parse of such a
    /// text is answered without a server connection: drivers that prepare
    /// synchronously (pgbench -M prepared: one thread, many connections)
    /// would otherwise wait for a connection another of their own
    /// connections holds. If the text stopped being valid (schema change),
    /// the error comes at Bind instead of Parse.
    validated: Mutex<HashSet<Bytes>>,
}

impl StatementRegistry {
    /// A new server-side statement for a client's Parse. `key` is the Parse
    /// body after the statement name (query text, NUL, parameter types).
    pub fn create(&self, parse: &Parse<'_>, key: Bytes) -> Statement {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let name = format!("sg_{id}");
        Statement {
            id,
            parse: build_parse(&name, parse.query, parse.param_types),
            name,
            text_len: parse.query.len(),
            types: crate::frontend::sharding::param_types(parse.param_types),
            key,
            shape: OnceLock::new(),
            stale: AtomicBool::new(false),
            class: AtomicU64::new(0),
            copy: crate::router::classify::leading_keyword(parse.query)
                .is_some_and(|w| w.eq_ignore_ascii_case(b"copy")),
        }
    }

    pub fn is_validated(&self, key: &[u8]) -> bool {
        crate::lock(&self.validated).contains(key)
    }

    pub fn mark_validated(&self, key: &Bytes) {
        let mut set = crate::lock(&self.validated);
        if set.len() >= MAX_VALIDATED {
            set.clear();
        }
        if !set.contains(&key[..]) {
            set.insert(key.clone());
        }
    }
}

/// A statement's result shape from its RowDescription: column names,
/// types, type modifiers and formats — without each column's table OID
/// and column number, which differ between shards that hold the same
/// table (so a statement described on one shard runs on another).
pub fn shape_of(row_description: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(row_description.len());
    let Some(head) = row_description.get(..2) else {
        return Bytes::copy_from_slice(row_description);
    };
    out.extend_from_slice(head);
    let mut at = 2;
    while at < row_description.len() {
        let Some(end) = memchr::memchr(0, &row_description[at..]).map(|e| at + e) else {
            return Bytes::copy_from_slice(row_description);
        };
        let Some(field) = row_description.get(end + 1..end + 19) else {
            return Bytes::copy_from_slice(row_description);
        };
        out.extend_from_slice(&row_description[at..=end]);
        // Table OID (4) and column number (2) left out; type OID, size,
        // modifier and format kept.
        out.extend_from_slice(&field[6..]);
        at = end + 19;
    }
    Bytes::from(out)
}
