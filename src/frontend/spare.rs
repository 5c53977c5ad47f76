//! A client's server connection kept between its transactions.
//!
//! In transaction mode a server connection goes back to the pool when the
//! server reports the transaction over. While no other client waits for
//! that pool, handing it back and taking it out again for the client's
//! next transaction only costs work: a deadpool checkout and return are
//! about a tenth of the proxy's own instructions per select-only
//! transaction (callgrind, docs/benchmarks.md). So the session keeps the
//! connection as a *spare* on its pool's shelf ([`PoolEntry::shelve`]),
//! and its next transaction on the same pool takes it back from there.
//!
//! A spare runs nothing: the server reported it idle, it carries only this
//! client's own session settings (the same fingerprint check as any
//! checkout applies them), and the client's cancel key does not point at
//! it. It goes back to the pool as soon as that helps anyone:
//! - a checkout of the pool would wait: it takes every spare back first,
//!   and a release while a checkout waits keeps no spare;
//! - it has been idle for `SPARE_IDLE` (pool maintenance, each second), so
//!   the pool's idle timeout and checks apply to idle connections as
//!   before;
//! - the next transaction needs another pool (another shard or replica, a
//!   new topology), or the connection is past `pool.server_lifetime`;
//! - the session ends;
//! - the pool closes.
//!
//! The shelf is on the pool, not in the session, so taking spares back
//! wakes no idle session: an idle client with a spare waits exactly like
//! one without.

use super::session::Session;
use crate::backend::pool::PooledConn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A client reading from replicas picks its replica again (round robin,
/// or least outstanding) at least this often, even while its spare still
/// qualifies: reads spread to a replica that comes back or is added.
pub const REPICK_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// Names sessions on pool shelves.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub(super) fn new_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl Session {
    /// Keeps `conn`, released idle from the session's current pool, as the
    /// spare when allowed; otherwise it goes back to the pool.
    pub(super) fn keep_spare(&mut self, conn: PooledConn) {
        if self.keep_spare && self.pool.shelve(self.spare_id, conn) {
            self.spare = Some(self.pool.clone());
        }
    }

    /// The spare, when it is still kept and fits a transaction on the
    /// session's current pool starting at `now`. A spare of another pool
    /// goes back to it.
    pub(super) fn take_spare(&mut self, now: Instant) -> Option<PooledConn> {
        let pool = self.spare.take()?;
        let conn = pool.unshelve(self.spare_id, now)?;
        if std::sync::Arc::ptr_eq(&pool, &self.pool) {
            Some(conn)
        } else {
            None
        }
    }

    /// The spare goes back to its pool (the session ends).
    pub(super) fn give_back_spare(&mut self) {
        if let Some(pool) = self.spare.take() {
            pool.give_back(self.spare_id);
        }
    }
}
