//! Cluster state: the shards, their servers and roles, as one immutable
//! snapshot with an epoch. The data path loads the current snapshot once per
//! transaction (an `ArcSwap` load, no lock); the control plane (failover,
//! resharding, reload) publishes a new snapshot with a higher epoch.

use crate::config::Config;
use crate::sharding::map::ShardMap;
use arc_swap::ArcSwap;
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub name: String,
    pub primary: Arc<str>,
    pub replicas: Vec<Replica>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub addr: Arc<str>,
    /// Relative share of reads; 0 = used only when no other replica
    /// qualifies.
    pub weight: u32,
    pub zone: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Bumped by every published change; pools keyed by an older epoch's
    /// server addresses are retired by the control plane.
    pub epoch: u64,
    pub shards: Vec<Shard>,
    /// The bucket map and table rules; None without `[sharding]` (then
    /// everything goes to the first shard).
    pub map: Option<Arc<ShardMap>>,
}

impl Topology {
    pub fn from_config(config: &Config, epoch: u64) -> Topology {
        Topology {
            epoch,
            shards: config
                .shards
                .iter()
                .map(|s| Shard {
                    name: s.name.clone(),
                    primary: s.primary.as_str().into(),
                    replicas: s
                        .replicas
                        .iter()
                        .map(|r| Replica {
                            addr: r.addr().into(),
                            weight: r.weight(),
                            zone: r.zone().map(Into::into),
                        })
                        .collect(),
                })
                .collect(),
            map: ShardMap::from_config(config).map(Arc::new),
        }
    }

    /// The map when statements must be placed on one of several shards.
    pub fn sharded(&self) -> Option<&Arc<ShardMap>> {
        self.map.as_ref().filter(|_| self.shards.len() > 1)
    }
}

/// The published topology.
pub struct TopologyHandle {
    current: ArcSwap<Topology>,
}

impl TopologyHandle {
    pub fn new(t: Topology) -> TopologyHandle {
        TopologyHandle {
            current: ArcSwap::from_pointee(t),
        }
    }

    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// Publishes `next` if it differs from the current shape; the epoch is
    /// always one past the current one.
    pub fn publish(&self, mut next: Topology) -> u64 {
        let cur = self.current.load();
        if cur.shards == next.shards && cur.map == next.map {
            return cur.epoch;
        }
        next.epoch = cur.epoch + 1;
        let epoch = next.epoch;
        self.current.store(Arc::new(next));
        epoch
    }
}
