//! Everything that talks to Postgres servers: raw server connections
//! ([`conn::ServerConn`]: connect, authenticate, remember the server's
//! parameters and prepared statements) and the pools that hold them
//! ([`pool::Pools`], one deadpool pool per (shard, role, database, user)).
//!
//! Client bytes enter through a checked-out `ServerConn`'s socket; the
//! session forwards the answers. Nothing here decodes rows.

pub mod conn;
pub mod pool;

pub use conn::{ConnectError, ServerConn};
pub use pool::{CheckoutError, PoolKey, Pools, Role};
