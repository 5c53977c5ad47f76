//! Cluster state: the shards, their servers and roles, as one immutable
//! snapshot with an epoch. The data path loads the current snapshot once per
//! transaction (an `ArcSwap` load, no lock); the control plane (failover,
//! resharding, reload) publishes a new snapshot with a higher epoch.

use crate::config::Config;
use crate::sharding::map::ShardMap;
use crate::store::ClusterState;
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
    /// Failover preference among equally advanced replicas (higher first;
    /// 0 = never promoted).
    pub priority: u32,
}

impl Replica {
    /// A replica the configuration does not list (the control plane added
    /// it): default weight and priority, no zone.
    fn unconfigured(addr: &str) -> Replica {
        Replica {
            addr: addr.into(),
            weight: 1,
            zone: None,
            priority: 1,
        }
    }
}

/// A former primary that must not get traffic again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fenced {
    pub shard: String,
    pub addr: Arc<str>,
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
    /// Servers failover took out of service (probed only to notice one
    /// running as a primary again).
    pub fenced: Vec<Fenced>,
}

impl Topology {
    /// The configured topology, with the shards the control plane changed
    /// (failover, rejoin) as `state` says.
    pub fn build(config: &Config, state: &ClusterState, epoch: u64) -> Topology {
        let mut t = Topology::from_config(config, epoch);
        for shard in &mut t.shards {
            let Some(st) = state.shard(&shard.name) else {
                continue;
            };
            let configured = |addr: &str| {
                config
                    .shards
                    .iter()
                    .flat_map(|s| &s.replicas)
                    .find(|r| r.addr() == addr)
            };
            shard.primary = st.primary.as_str().into();
            shard.replicas = st
                .replicas
                .iter()
                .map(|addr| match configured(addr) {
                    Some(r) => Replica {
                        addr: addr.as_str().into(),
                        weight: r.weight(),
                        zone: r.zone().map(Into::into),
                        priority: r.priority(),
                    },
                    None => Replica::unconfigured(addr),
                })
                .collect();
            t.fenced.extend(st.fenced.iter().map(|a| Fenced {
                shard: shard.name.clone(),
                addr: a.as_str().into(),
            }));
        }
        // Shards added at run time (`reshard add-shard`), after the
        // configured ones.
        for st in &state.shards {
            if t.shards.iter().any(|s| s.name == st.name) {
                continue;
            }
            t.shards.push(Shard {
                name: st.name.clone(),
                primary: st.primary.as_str().into(),
                replicas: st
                    .replicas
                    .iter()
                    .map(|a| Replica::unconfigured(a))
                    .collect(),
            });
            t.fenced.extend(st.fenced.iter().map(|a| Fenced {
                shard: st.name.clone(),
                addr: a.as_str().into(),
            }));
        }
        if let Some(map) = t.map.as_mut() {
            let map = Arc::make_mut(map);
            map.shards = t.shards.len();
            // Bucket owners resharding changed.
            for o in &state.buckets {
                let Some(i) = t.shards.iter().position(|s| s.name == o.shard) else {
                    continue;
                };
                if let Ok(list) = crate::reshard::buckets::parse(&o.buckets, map.buckets) {
                    for b in list {
                        map.owner[b as usize] = i as u16;
                    }
                }
            }
            for m in state.moves.iter().filter(|m| m.phase.active()) {
                map.moving = true;
                if m.phase.held() {
                    if map.held.is_empty() {
                        map.held = vec![false; map.buckets as usize];
                    }
                    if let Ok(list) = crate::reshard::buckets::parse(&m.buckets, map.buckets) {
                        for b in list {
                            map.held[b as usize] = true;
                        }
                    }
                }
            }
        }
        t
    }

    pub fn from_config(config: &Config, epoch: u64) -> Topology {
        Topology {
            epoch,
            fenced: Vec::new(),
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
                            priority: r.priority(),
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
    /// The current epoch, readable without touching the snapshot.
    epoch: std::sync::atomic::AtomicU64,
    /// The current epoch, for tasks that wait for a change (writes held
    /// while a shard has no primary).
    changed: tokio::sync::watch::Sender<u64>,
}

impl TopologyHandle {
    pub fn new(t: Topology) -> TopologyHandle {
        TopologyHandle {
            epoch: std::sync::atomic::AtomicU64::new(t.epoch),
            changed: tokio::sync::watch::Sender::new(t.epoch),
            current: ArcSwap::from_pointee(t),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn load(&self) -> Arc<Topology> {
        self.current.load_full()
    }

    /// Notified at every published change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Publishes `next` if it differs from the current shape; the epoch is
    /// `next.epoch` or one past the current one, whichever is higher.
    pub fn publish(&self, mut next: Topology) -> u64 {
        let cur = self.current.load();
        if cur.shards == next.shards && cur.map == next.map && cur.fenced == next.fenced {
            return cur.epoch;
        }
        next.epoch = next.epoch.max(cur.epoch + 1);
        let epoch = next.epoch;
        self.current.store(Arc::new(next));
        self.epoch
            .store(epoch, std::sync::atomic::Ordering::Release);
        self.changed.send_replace(epoch);
        epoch
    }
}
