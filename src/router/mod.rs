//! Where a statement goes. One place decides; the session asks when it
//! needs a server connection (at the start of a transaction) with the
//! topology snapshot it loaded.
//!
//! - [`classify`]: may this SQL text run on a replica?
//! - [`catalog`]: which functions of a database are read-only.
//! - [`pick_replica`]: which replica, given health, lag, weights, zones and
//!   the session's read-your-writes position.
//!
//! Today every shard is shard 0; sharding plugs in here (sharding keys)
//! without the session changing shape.

pub mod catalog;
pub mod classify;
pub mod copy;
pub mod scatter;
pub mod shard;

use crate::config::{ReplicaSelection, RoutingConfig};
use crate::health::ServerHealth;
use catalog::{Catalog, CatalogRows, FunctionPolicy};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock, Mutex, RwLock};

/// A session's `SET shardgate.target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetOverride {
    /// Classify each statement.
    #[default]
    Auto,
    /// Everything to the primary.
    Primary,
    /// Treat every statement as read-only (read-your-writes and lag limits
    /// still apply; a write fails on the replica and is retried on the
    /// primary when nothing reached the client yet).
    Replica,
}

impl TargetOverride {
    pub fn parse(s: &str) -> Option<TargetOverride> {
        match s.to_ascii_lowercase().as_str() {
            "auto" | "default" => Some(TargetOverride::Auto),
            "primary" => Some(TargetOverride::Primary),
            "replica" => Some(TargetOverride::Replica),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TargetOverride::Auto => "auto",
            TargetOverride::Primary => "primary",
            TargetOverride::Replica => "replica",
        }
    }
}

/// Decides whether a classified text may go to a replica.
pub fn wants_replica(
    class: &classify::Class,
    target: TargetOverride,
    default_read_only: bool,
) -> bool {
    match class.hint {
        classify::Hint::Primary => return false,
        classify::Hint::Replica => return true,
        classify::Hint::None => {}
    }
    match target {
        TargetOverride::Primary => false,
        TargetOverride::Replica => true,
        TargetOverride::Auto => class.read_only(default_read_only),
    }
}

/// One replica as the router sees it.
pub struct Candidate {
    pub health: Arc<ServerHealth>,
    pub weight: u32,
    pub same_zone: bool,
}

impl AsRef<Candidate> for Candidate {
    fn as_ref(&self) -> &Candidate {
        self
    }
}

/// Why a read went to the primary although the shard has replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoReplica {
    /// Replicas are up and within lag limits but none has replayed the
    /// session's last commit yet.
    ReadYourWrites,
    /// Replicas are up but too far behind.
    Lag,
    /// No replica is up (or none is in recovery).
    Down,
}

impl NoReplica {
    pub fn as_str(self) -> &'static str {
        match self {
            NoReplica::ReadYourWrites => "read_your_writes",
            NoReplica::Lag => "lag",
            NoReplica::Down => "down",
        }
    }
}

/// Picks the replica for a read: up, in recovery, within the lag limits,
/// replayed at least `min_lsn`; same-zone replicas first; weight 0 only when
/// nothing else qualifies; then round-robin by weight (`turn` is a counter
/// the caller advances) or the fewest outstanding transactions per weight.
/// Candidates whose bit is set in `skip` are left out (already tried).
pub fn pick_replica<C: AsRef<Candidate>>(
    candidates: &[C],
    routing: &RoutingConfig,
    min_lsn: u64,
    turn: usize,
    skip: u64,
) -> Result<usize, NoReplica> {
    let mut reason = NoReplica::Down;
    // Bit i set: candidate i qualifies. (Shards have few replicas; more
    // than 64 are ignored beyond the 64th.)
    let mut ok: u64 = 0;
    for (i, c) in candidates.iter().map(AsRef::as_ref).enumerate().take(64) {
        if skip & (1 << i) != 0 {
            continue;
        }
        let h = &c.health;
        if !h.is_up() || !h.in_recovery() || !h.follows_primary() {
            continue;
        }
        let lagging = routing
            .max_replica_lag_bytes
            .is_some_and(|max| h.lag_bytes() > max)
            || routing.max_replica_lag.is_some_and(|max| h.lag() > max);
        if lagging {
            if reason == NoReplica::Down {
                reason = NoReplica::Lag;
            }
            continue;
        }
        if h.lsn() < min_lsn {
            reason = NoReplica::ReadYourWrites;
            continue;
        }
        ok |= 1 << i;
    }
    if ok == 0 {
        return Err(reason);
    }
    // Narrow to the best tier: same zone, then positive weight.
    let narrow = |set: u64, keep: &dyn Fn(&Candidate) -> bool| -> u64 {
        let mut out = 0;
        for (i, c) in candidates.iter().map(AsRef::as_ref).enumerate().take(64) {
            if set & (1 << i) != 0 && keep(c) {
                out |= 1 << i;
            }
        }
        if out == 0 {
            set
        } else {
            out
        }
    };
    let ok = narrow(ok, &|c| c.same_zone);
    let ok = narrow(ok, &|c| c.weight > 0);
    let members = || (0..candidates.len().min(64)).filter(move |i| ok & (1 << i) != 0);
    let weight = |i: usize| candidates[i].as_ref().weight.max(1) as usize;
    match routing.replica_selection {
        ReplicaSelection::RoundRobin => {
            let total: usize = members().map(weight).sum();
            let mut k = turn % total;
            for i in members() {
                if k < weight(i) {
                    return Ok(i);
                }
                k -= weight(i);
            }
            unreachable!("k < total")
        }
        ReplicaSelection::LeastOutstanding => {
            // Fewest in flight per unit of weight; ties rotate by `turn`.
            let n = candidates.len().max(1);
            Ok(members()
                .min_by_key(|&i| {
                    let load = candidates[i]
                        .as_ref()
                        .health
                        .outstanding
                        .load(std::sync::atomic::Ordering::Relaxed);
                    ((load * 1024) / weight(i), (i + n - turn % n) % n)
                })
                .expect("ok is not empty"))
        }
    }
}

/// Function catalogs by database, loaded from the primary on first use and
/// refreshed every `routing.catalog_refresh`.
#[derive(Default)]
pub struct Catalogs {
    loaded: RwLock<HashMap<String, Arc<Catalog>>>,
    loading: Mutex<HashSet<String>>,
}

static UNLOADED: LazyLock<Arc<Catalog>> = LazyLock::new(|| Arc::new(Catalog::unloaded()));

impl Catalogs {
    /// The catalog of `database`, and whether it should be (re)loaded now.
    pub fn get(&self, database: &str, refresh: std::time::Duration) -> (Arc<Catalog>, bool) {
        match crate::read(&self.loaded).get(database) {
            Some(c) => {
                let stale = c.loaded_at.elapsed() > refresh;
                (c.clone(), stale && self.claim(database))
            }
            None => (UNLOADED.clone(), self.claim(database)),
        }
    }

    fn claim(&self, database: &str) -> bool {
        crate::lock(&self.loading).insert(database.to_owned())
    }

    /// Loads `database`'s catalog over a connection of its primary pool.
    pub async fn load(
        &self,
        database: &str,
        pool: &crate::backend::pool::PoolEntry,
        routing: &RoutingConfig,
        wait: std::time::Duration,
    ) {
        let result = match pool.checkout(wait).await {
            Ok(mut conn) => match conn.query_rows(catalog::LOAD_SQL).await {
                Ok(Ok(rows)) => Ok(rows),
                Ok(Err(e)) => Err(format!("{}: {}", e.code, e.message)),
                Err(e) => Err(e.to_string()),
            },
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(rows) => {
                let catalog = Catalog::new(
                    CatalogRows::from_rows(rows),
                    FunctionPolicy::from_config(routing),
                );
                tracing::debug!(database, "function catalog loaded");
                crate::write(&self.loaded).insert(database.to_owned(), Arc::new(catalog));
            }
            Err(e) => {
                tracing::warn!(database, error = %e, "loading the function catalog failed; reads of this database go to the primary")
            }
        }
        crate::lock(&self.loading).remove(database);
    }

    /// Forgets every catalog (configuration reloaded: the function lists
    /// may have changed).
    pub fn clear(&self) {
        crate::write(&self.loaded).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Health;

    fn routing() -> RoutingConfig {
        RoutingConfig::default()
    }

    #[test]
    fn nothing_qualifies_before_probes() {
        let health = Health::default();
        let a = health.server(&"r1:1".into());
        let cands = [Candidate {
            health: a,
            weight: 1,
            same_zone: false,
        }];
        assert_eq!(
            pick_replica(&cands, &routing(), 0, 0, 0),
            Err(NoReplica::Down)
        );
        assert!(pick_replica::<Candidate>(&[], &routing(), 0, 0, 0).is_err());
    }

    fn replica(health: &Health, name: &str, lsn: u64, lag_ms: u64) -> Arc<ServerHealth> {
        let h = health.server(&name.into());
        h.set_for_tests(
            true,
            true,
            lsn,
            lag_ms * 1000,
            std::time::Duration::from_millis(lag_ms),
        );
        h
    }

    fn picks(cands: &[Candidate], routing: &RoutingConfig, min_lsn: u64, n: usize) -> Vec<usize> {
        (0..n)
            .map(|t| pick_replica(cands, routing, min_lsn, t, 0).unwrap())
            .collect()
    }

    #[test]
    fn weights_zones_lag_and_positions() {
        let health = Health::default();
        let a = replica(&health, "a:1", 100, 0);
        let b = replica(&health, "b:1", 200, 0);
        let c = replica(&health, "c:1", 300, 5000);
        let cand = |h: &Arc<ServerHealth>, weight, same_zone| Candidate {
            health: h.clone(),
            weight,
            same_zone,
        };
        let mut routing = routing();
        routing.max_replica_lag = Some(std::time::Duration::from_secs(1));

        // Round robin by weight; the lagging one gets nothing.
        let cands = [cand(&a, 1, false), cand(&b, 3, false), cand(&c, 1, false)];
        let got = picks(&cands, &routing, 0, 8);
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 2);
        assert_eq!(got.iter().filter(|&&i| i == 1).count(), 6);
        assert!(!got.contains(&2));

        // Read-your-writes: only replicas that replayed the position.
        assert_eq!(picks(&cands, &routing, 150, 4), vec![1; 4]);
        assert_eq!(
            pick_replica(&cands, &routing, 250, 0, 0),
            Err(NoReplica::ReadYourWrites)
        );
        // Lag limit off: the far one qualifies by position.
        routing.max_replica_lag = None;
        assert_eq!(picks(&cands, &routing, 250, 3), vec![2; 3]);
        routing.max_replica_lag = Some(std::time::Duration::from_secs(1));

        // Zone affinity, and weight 0 only as a last resort.
        let cands = [cand(&a, 1, false), cand(&b, 1, true)];
        assert_eq!(picks(&cands, &routing, 0, 4), vec![1; 4]);
        let cands = [cand(&a, 0, false), cand(&b, 1, false)];
        assert_eq!(picks(&cands, &routing, 0, 4), vec![1; 4]);
        assert_eq!(picks(&cands, &routing, 150, 2), vec![1; 2]);
        let cands = [cand(&a, 0, false), cand(&c, 1, false)];
        assert_eq!(picks(&cands, &routing, 0, 2), vec![0; 2]);

        // Replicas already tried are skipped.
        let cands = [cand(&a, 1, false), cand(&b, 1, false)];
        assert_eq!(pick_replica(&cands, &routing, 0, 0, 0b01), Ok(1));
        assert_eq!(pick_replica(&cands, &routing, 0, 1, 0b01), Ok(1));
        assert_eq!(
            pick_replica(&cands, &routing, 0, 0, 0b11),
            Err(NoReplica::Down)
        );

        // Down or promoted (not in recovery): out.
        b.set_for_tests(false, true, 200, 0, std::time::Duration::ZERO);
        let cands = [cand(&b, 1, false)];
        assert_eq!(
            pick_replica(&cands, &routing, 0, 0, 0),
            Err(NoReplica::Down)
        );
        b.set_for_tests(true, false, 200, 0, std::time::Duration::ZERO);
        assert_eq!(
            pick_replica(&cands, &routing, 0, 0, 0),
            Err(NoReplica::Down)
        );
        let cands = [cand(&c, 1, false)];
        assert_eq!(pick_replica(&cands, &routing, 0, 0, 0), Err(NoReplica::Lag));
    }

    #[test]
    fn least_outstanding() {
        let health = Health::default();
        let a = replica(&health, "a:1", 0, 0);
        let b = replica(&health, "b:1", 0, 0);
        let mut routing = routing();
        routing.replica_selection = ReplicaSelection::LeastOutstanding;
        let cands = [
            Candidate {
                health: a.clone(),
                weight: 1,
                same_zone: false,
            },
            Candidate {
                health: b.clone(),
                weight: 2,
                same_zone: false,
            },
        ];
        a.outstanding.store(1, std::sync::atomic::Ordering::Relaxed);
        b.outstanding.store(1, std::sync::atomic::Ordering::Relaxed);
        // Per unit of weight, b is less loaded.
        assert_eq!(pick_replica(&cands, &routing, 0, 0, 0), Ok(1));
        b.outstanding.store(3, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(pick_replica(&cands, &routing, 0, 0, 0), Ok(0));
    }

    #[test]
    fn overrides() {
        let read = classify::Class::default();
        let write = classify::Class::WRITE;
        assert!(wants_replica(&read, TargetOverride::Auto, false));
        assert!(!wants_replica(&write, TargetOverride::Auto, false));
        assert!(!wants_replica(&read, TargetOverride::Primary, false));
        assert!(wants_replica(&write, TargetOverride::Replica, false));
        let hinted = classify::Class {
            hint: classify::Hint::Primary,
            ..read
        };
        assert!(!wants_replica(&hinted, TargetOverride::Replica, false));
        assert_eq!(
            TargetOverride::parse("Replica"),
            Some(TargetOverride::Replica)
        );
        assert_eq!(TargetOverride::parse("x"), None);
    }
}
