//! shardgate: a Postgres-wire-compatible sharding proxy.
//!
//! A client connects as to Postgres; shardgate authenticates it, then
//! forwards its messages to pooled connections to real Postgres servers.
//!
//! - [`protocol`]: message framing and the few parsers/builders needed; no I/O.
//! - [`auth`]: the server side of SCRAM-SHA-256 and MD5 for clients.
//! - [`frontend`]: client startup and the per-client session loop.
//! - [`router`]: decides which shard and role a transaction goes to.
//! - [`topology`]: the versioned snapshot of shards and servers.
//! - [`backend`]: server connections and their pools.
//! - [`cancel`]: CancelRequest forwarding.
//! - [`metrics`]: Prometheus metrics and the /metrics, /healthz endpoint.
//! - [`proxy`]: shared state, listener, signals, shutdown.
//! - [`config`]: the TOML configuration.
//! - [`sharding`]: keys, hashes and the bucket map.
//! - [`twophase`]: the decision log and recovery of cross-shard commits.
//! - [`admin`]: the gRPC admin API and the `shardgate admin` CLI.
//! - [`failover`]: dead-primary detection, promotion, fencing, switchover.
//! - [`store`]: the persisted cluster state (primaries, fenced servers,
//!   epoch).
//! - [`sql`]: lexical SQL helpers (statement splitting, keywords).
//! - [`local`]: starts a local topology of real Postgres servers
//!   (`shardgate up` / `down`, and the test harness).

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cancel;
pub mod config;
pub mod failover;
pub mod frontend;
pub mod health;
pub mod hotspot;
pub mod local;
pub mod metrics;
pub mod protocol;
pub mod proxy;
pub mod reshard;
pub mod router;
pub mod sharding;
pub mod sql;
pub mod store;
pub mod topology;
pub mod twophase;

/// Locks a mutex, ignoring poisoning: the data behind our locks stays
/// consistent even if a holder panicked (each critical section is a single
/// map or slot update), and one panicking task must not take every other
/// client down with it.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn read<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn write<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}
