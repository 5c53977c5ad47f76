//! The responses a server connection still owes the client, in order.
//!
//! Every message forwarded to the server that the server answers pushes an
//! [`Expect`]; server messages pop them. This is what lets the proxy answer
//! some messages itself (a Parse of a known-good text while no server is
//! held, a Close of a statement the proxy manages, a duplicate name) at
//! exactly the right position in the
//! response stream, drop the answers to messages it injected, and know when
//! the server connection is idle and free to return to the pool.

use super::statements::Statement;
use crate::protocol::Frame;
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug)]
pub enum Expect {
    /// A Parse forwarded to the server. `client_name` is set for a client's
    /// named statement; `injected` when the client never sent this Parse
    /// and must not see its ParseComplete.
    Parse {
        stmt: Option<Arc<Statement>>,
        client_name: Option<String>,
        injected: bool,
    },
    Bind,
    Describe,
    /// An injected Describe of a proxy-named statement: its
    /// ParameterDescription and RowDescription/NoData are not forwarded but
    /// recorded as the statement's shape (`record`) or compared with it.
    ShapeCheck {
        stmt: Arc<Statement>,
        record: bool,
    },
    Execute,
    Close,
    Sync,
    /// A simple Query (ends at ReadyForQuery).
    Query,
    FunctionCall,
    /// A response the proxy produces itself when it reaches the front. A
    /// ParseComplete the proxy answers carries the client's statement name
    /// so it can be undone if the server skips it after an error.
    Synthetic {
        frame: Frame,
        client_name: Option<String>,
    },
    /// The proxy's commit-position probe (read-your-writes), pipelined
    /// behind a client's Query or Sync: its whole answer, up to its
    /// ReadyForQuery, is the proxy's.
    LsnProbe,
    /// The server will fail this message (the proxy sent it something that
    /// errors on purpose, so the server's transaction state matches what
    /// Postgres would do); the client gets `error` instead.
    ErrorInstead {
        error: Frame,
    },
}

impl Expect {
    /// Entries that end at ReadyForQuery.
    pub fn is_sync_point(&self) -> bool {
        matches!(self, Expect::Sync | Expect::Query | Expect::FunctionCall)
    }
}

pub type Pipeline = VecDeque<Expect>;
