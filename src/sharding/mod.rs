//! Sharding: how a key finds its shard.
//!
//! ```text
//! key --canonical value--> hash --mod B--> bucket --bucket map--> shard
//! ```
//!
//! - [`map`]: the bucket map and table rules (part of the topology snapshot).
//! - [`ids`]: globally unique ids (`SHOW shardgate.next_id`).
//! - [`hash`]: the hash functions (`postgres`: the placement of
//!   `PARTITION BY HASH`; `murmur3`) and key parsing from text and binary.

pub mod hash;
pub mod ids;
pub mod map;

/// The largest bucket count a cluster may have.
pub const MAX_BUCKETS: u32 = 65536;
