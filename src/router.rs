//! Where a statement goes. One place decides; the session asks per
//! transaction (when it needs a server connection) with the topology
//! snapshot it loaded.
//!
//! Today every statement goes to the primary of the first shard: read/write
//! splitting and sharding plug in here (statement classification, sharding
//! keys) without the session changing shape.

use crate::backend::Role;
use crate::topology::Topology;

/// A routing decision: one server of one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub shard: usize,
    pub role: Role,
}

/// Picks the server for the next transaction of a session.
pub fn route_transaction(topology: &Topology) -> Target {
    debug_assert!(
        !topology.shards.is_empty(),
        "config validation requires a shard"
    );
    Target {
        shard: 0,
        role: Role::Primary,
    }
}
