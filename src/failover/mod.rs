//! Failover: notice a dead primary, promote the best replica, fence the old
//! primary, repoint the other replicas, publish a new topology epoch — and
//! the planned variant, switchover.
//!
//! Detection reads the health probes ([`crate::health`]): a primary is dead
//! after `failover.failed_probes` consecutive failures that were refused or
//! closed connections, or — when the probes time out instead (a stopped or
//! overloaded server still accepts TCP connections) — after failing
//! continuously for `failover.unresponsive_for`. A primary that is only slow
//! for a moment is left alone.
//!
//! Every change is first written to the store ([`crate::store`]), then
//! acted on: the chosen replica is recorded as the shard's primary and the
//! old one as fenced (with `promoting` set) before `pg_promote` runs, so a
//! proxy restarted at any point neither sends traffic to the old primary
//! nor forgets to finish the promotion.

pub mod conninfo;
mod promote;

use crate::backend::conn::{ConnectParams, ServerConn};
use crate::metrics::GLOBAL;
use crate::proxy::Proxy;
use crate::store::{ClusterState, ShardState, Store};
use crate::topology::Topology;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

pub use promote::Candidate;

/// What the last failover or switchover of a shard did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    pub shard: String,
    /// "failover" or "switchover".
    pub kind: String,
    /// "promoted", "no_candidate", "failed", "primary_back".
    pub outcome: String,
    pub old_primary: String,
    pub new_primary: String,
    /// First failed probe to the decision (failover), or pause to promote
    /// (switchover).
    pub detect_ms: u64,
    /// Decision to a published new primary.
    pub promote_ms: u64,
    /// Switchover: how long new writes were held.
    pub pause_ms: u64,
    /// The candidates that were considered, best first.
    pub candidates: Vec<Candidate>,
    /// Replicas that could not be repointed (they need `admin rejoin`).
    pub not_repointed: Vec<String>,
    pub message: String,
    /// Unix time (ms) when it ended.
    pub at_unix_ms: u64,
    /// The check that repointed replicas follow the new primary has ended:
    /// `not_repointed` is final.
    pub follow_checked: bool,
}

/// The control plane's failover state, shared by the prober, the sessions
/// (write hold) and the admin API.
pub struct Failover {
    store: Store,
    state: Mutex<ClusterState>,
    /// Shards with a failover or switchover under way.
    busy: Mutex<HashSet<String>>,
    /// Shards whose new writes are held (switchover), by name; `held_count`
    /// lets the data path skip the lock when none is.
    held: Mutex<HashSet<String>>,
    held_count: AtomicUsize,
    reports: Mutex<HashMap<String, Report>>,
    /// Fenced servers seen answering as primaries.
    split_brain: Mutex<HashSet<Arc<str>>>,
    /// Fenced servers already made read-only.
    read_only_done: Mutex<HashSet<Arc<str>>>,
    /// After a failover that could not promote, the next try waits.
    retry_at: Mutex<HashMap<String, Instant>>,
}

/// Pause between failover attempts on a shard that found no candidate.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl Failover {
    /// The controller with the state saved in `state_dir` (an unreadable
    /// state file is an error: starting from the configuration instead
    /// could send writes to a fenced primary).
    pub fn open(state_dir: &std::path::Path) -> std::io::Result<Failover> {
        let store = Store::new(state_dir);
        let state = store.load()?;
        Ok(Failover {
            store,
            state: Mutex::new(state),
            busy: Mutex::default(),
            held: Mutex::default(),
            held_count: AtomicUsize::new(0),
            reports: Mutex::default(),
            split_brain: Mutex::default(),
            read_only_done: Mutex::default(),
            retry_at: Mutex::default(),
        })
    }

    pub fn state(&self) -> ClusterState {
        crate::lock(&self.state).clone()
    }

    /// The topology `config` describes, with the control plane's changes.
    pub fn topology(&self, config: &crate::config::Config) -> Topology {
        let state = crate::lock(&self.state);
        Topology::build(config, &state, state.epoch.max(1))
    }

    pub fn reports(&self) -> Vec<Report> {
        crate::lock(&self.reports).values().cloned().collect()
    }

    /// Fenced servers that answer as primaries now.
    pub fn split_brain(&self) -> Vec<Arc<str>> {
        crate::lock(&self.split_brain).iter().cloned().collect()
    }

    /// Some shard's new writes are held.
    pub fn any_held(&self) -> bool {
        self.held_count.load(Ordering::Relaxed) > 0
    }

    /// New writes to `shard` must wait (a switchover is under way).
    pub fn is_held(&self, shard: &str) -> bool {
        self.any_held() && crate::lock(&self.held).contains(shard)
    }

    fn hold(&self, shard: &str, on: bool) {
        let mut held = crate::lock(&self.held);
        let changed = if on {
            held.insert(shard.to_owned())
        } else {
            held.remove(shard)
        };
        if changed {
            if on {
                self.held_count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.held_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether a write that cannot reach `shard`'s primary should wait for
    /// a failover rather than fail at once.
    pub fn may_wait(&self, proxy: &Proxy, topology: &Topology, shard: usize) -> bool {
        let Some(s) = topology.shards.get(shard) else {
            return false;
        };
        self.is_held(&s.name)
            || (proxy.config.load().failover.enabled && !s.replicas.is_empty())
            || crate::lock(&self.busy).contains(&s.name)
    }

    /// Called after every probe round: starts the failover of shards whose
    /// primary is dead, finishes promotions a crash interrupted, and
    /// watches fenced servers.
    pub fn after_probes(&self, proxy: &Arc<Proxy>) {
        // The topology now, not the one the probe round started with: a
        // failover may have finished meanwhile.
        let topology = proxy.topology.load();
        GLOBAL.topology_epoch.set(topology.epoch as i64);
        let config = proxy.config.load();
        let f = &config.failover;
        for shard in &topology.shards {
            let interrupted = crate::lock(&self.state)
                .shard(&shard.name)
                .is_some_and(|s| s.promoting);
            let streak = proxy.health.server(&shard.primary).streak();
            let dead = streak.is_dead(f, Instant::now());
            if !(interrupted || (f.enabled && dead && !shard.replicas.is_empty())) {
                continue;
            }
            if crate::lock(&self.retry_at)
                .get(&shard.name)
                .is_some_and(|t| Instant::now() < *t)
            {
                continue;
            }
            if !crate::lock(&self.busy).insert(shard.name.clone()) {
                continue;
            }
            let (proxy, name, dead) = (proxy.clone(), shard.name.clone(), shard.primary.clone());
            let since = streak.since.unwrap_or_else(Instant::now);
            tokio::spawn(async move {
                let report = if interrupted {
                    Some(promote::finish_interrupted(&proxy, &name).await)
                } else {
                    promote::fail_over(&proxy, &name, &dead, since).await
                };
                match report {
                    Some(r) => proxy.failover.finish(r),
                    None => {
                        crate::lock(&proxy.failover.busy).remove(&name);
                    }
                }
            });
        }
        self.watch_fenced(proxy, &topology);
    }

    /// Records a finished failover or switchover and frees the shard.
    fn finish(&self, mut report: Report) {
        report.at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        GLOBAL
            .failovers
            .with_label_values(&[&report.shard, &report.outcome])
            .inc();
        if report.outcome == "promoted" {
            tracing::warn!(
                shard = %report.shard,
                kind = %report.kind,
                old_primary = %report.old_primary,
                new_primary = %report.new_primary,
                detect_ms = report.detect_ms,
                promote_ms = report.promote_ms,
                "new primary"
            );
        } else {
            let again = crate::lock(&self.reports)
                .get(&report.shard)
                .is_some_and(|r| r.outcome == report.outcome && r.message == report.message);
            if !again {
                tracing::error!(shard = %report.shard, outcome = %report.outcome, message = %report.message, "failover did not promote");
            }
            crate::lock(&self.retry_at).insert(report.shard.clone(), Instant::now() + RETRY_AFTER);
        }
        crate::lock(&self.busy).remove(&report.shard);
        crate::lock(&self.reports).insert(report.shard.clone(), report);
    }

    /// Adds replicas found not following `primary` to `shard`'s report.
    fn not_following(&self, shard: &str, primary: &str, replicas: Vec<String>) {
        if let Some(r) = crate::lock(&self.reports)
            .get_mut(shard)
            .filter(|r| r.new_primary == primary)
        {
            r.follow_checked = true;
            for a in replicas {
                if !r.not_repointed.contains(&a) {
                    r.not_repointed.push(a);
                }
            }
        }
    }

    /// Saves `shard`'s new state with the next epoch; returns the epoch.
    fn save_shard(&self, shard: ShardState) -> std::io::Result<u64> {
        let mut state = crate::lock(&self.state);
        let mut next = state.clone();
        next.epoch = next.epoch.max(1) + 1;
        next.set_shard(shard);
        self.store.save(&next)?;
        *state = next;
        Ok(state.epoch)
    }

    /// Changes the saved state (durably, with a new epoch) and publishes
    /// the topology it describes.
    pub fn update_state<R>(
        &self,
        proxy: &Proxy,
        f: impl FnOnce(&mut ClusterState) -> R,
    ) -> std::io::Result<(R, u64)> {
        let r = {
            let mut state = crate::lock(&self.state);
            let mut next = state.clone();
            next.epoch = next.epoch.max(1) + 1;
            let r = f(&mut next);
            self.store.save(&next)?;
            *state = next;
            r
        };
        Ok((r, self.publish(proxy)))
    }

    /// Publishes the topology the saved state describes.
    fn publish(&self, proxy: &Proxy) -> u64 {
        let config = proxy.config.load();
        let t = self.topology(&config);
        let epoch = proxy.topology.publish(t);
        GLOBAL.topology_epoch.set(epoch as i64);
        epoch
    }

    /// Fenced servers: probed like the others; one answering as a primary
    /// is reported (log, metric, admin status) and, with
    /// `failover.fence_read_only`, made read-only.
    fn watch_fenced(&self, proxy: &Arc<Proxy>, topology: &Topology) {
        for f in &topology.fenced {
            let h = proxy.health.server(&f.addr);
            let primary = h.is_up() && !h.in_recovery();
            // Reported until it is seen running as a replica (a failed
            // probe alone does not clear it).
            let newly = {
                let mut sb = crate::lock(&self.split_brain);
                if primary {
                    sb.insert(f.addr.clone())
                } else {
                    if h.is_up() {
                        sb.remove(&f.addr);
                    }
                    false
                }
            };
            if newly {
                tracing::error!(
                    shard = %f.shard,
                    server = %f.addr,
                    "a fenced former primary is running as a primary again; shardgate sends it nothing — rejoin it as a replica (shardgate admin rejoin)"
                );
            }
            let alive = crate::lock(&self.split_brain).contains(&f.addr);
            GLOBAL
                .fenced_primary_alive
                .with_label_values(&[&f.shard, &f.addr])
                .set(alive as i64);
            if primary
                && proxy.config.load().failover.fence_read_only
                && crate::lock(&self.read_only_done).insert(f.addr.clone())
            {
                let (proxy, addr) = (proxy.clone(), f.addr.clone());
                tokio::spawn(async move {
                    if let Err(e) = promote::make_read_only(&proxy, &addr).await {
                        tracing::error!(server = %addr, error = %e, "could not make the fenced server read-only");
                        crate::lock(&proxy.failover.read_only_done).remove(&addr);
                    }
                });
            }
        }
    }

    /// Planned switchover of `shard` to `to` (or the best replica).
    pub async fn switchover(
        proxy: &Arc<Proxy>,
        shard: &str,
        to: Option<&str>,
    ) -> Result<Report, String> {
        if !crate::lock(&proxy.failover.busy).insert(shard.to_owned()) {
            return Err(format!(
                "a failover or switchover of shard {shard:?} is under way"
            ));
        }
        let result = promote::switchover(proxy, shard, to).await;
        proxy.failover.hold(shard, false);
        match result {
            Ok(report) => {
                proxy.failover.finish(report.clone());
                Ok(report)
            }
            Err(e) => {
                crate::lock(&proxy.failover.busy).remove(shard);
                Err(e)
            }
        }
    }

    /// Turns a fenced server back into a replica of its shard (after the
    /// operator re-synchronised it with `shardgate admin rejoin`).
    pub fn rejoin(&self, proxy: &Proxy, addr: &str) -> Result<(String, u64), String> {
        let topology = proxy.topology.load();
        let fenced = topology
            .fenced
            .iter()
            .find(|f| &*f.addr == addr)
            .ok_or_else(|| format!("{addr} is not a fenced server"))?;
        let shard = topology
            .shards
            .iter()
            .find(|s| s.name == fenced.shard)
            .ok_or_else(|| format!("shard {:?} is gone", fenced.shard))?;
        let h = proxy.health.server(&fenced.addr);
        if !(h.is_up() && h.in_recovery()) {
            return Err(format!(
                "{addr} is not running as a replica yet (up: {}, in recovery: {}); resynchronise it first",
                h.is_up(),
                h.in_recovery()
            ));
        }
        let mut st = self.shard_state(&topology, &shard.name);
        st.fenced.retain(|a| a != addr);
        if !st.replicas.iter().any(|a| a == addr) {
            st.replicas.push(addr.to_owned());
        }
        self.save_shard(st)
            .map_err(|e| format!("cannot save state: {e}"))?;
        crate::lock(&self.split_brain).remove(addr);
        crate::lock(&self.read_only_done).remove(addr);
        let epoch = self.publish(proxy);
        tracing::info!(server = addr, shard = %shard.name, epoch, "fenced server rejoined as a replica");
        Ok((shard.name.clone(), epoch))
    }

    /// The saved state of `shard`, or one made from the topology.
    fn shard_state(&self, topology: &Topology, shard: &str) -> ShardState {
        if let Some(s) = crate::lock(&self.state).shard(shard) {
            return s.clone();
        }
        let s = topology
            .shards
            .iter()
            .find(|s| s.name == shard)
            .expect("caller checked the shard exists");
        ShardState {
            name: s.name.clone(),
            primary: s.primary.to_string(),
            replicas: s.replicas.iter().map(|r| r.addr.to_string()).collect(),
            fenced: topology
                .fenced
                .iter()
                .filter(|f| f.shard == shard)
                .map(|f| f.addr.to_string())
                .collect(),
            promoting: false,
        }
    }
}

/// A connection for control-plane work, as the health probes log in.
pub(crate) async fn admin_conn(
    proxy: &Proxy,
    addr: &str,
    timeout: Duration,
) -> Result<ServerConn, String> {
    let config = proxy.config.load();
    let (user, password) = config.probe_login();
    let p = ConnectParams {
        addr: addr.to_owned(),
        database: config.health.database.clone(),
        user,
        password,
    };
    ServerConn::connect(&p, timeout)
        .await
        .map_err(|e| e.to_string())
}

/// Runs `sql` and returns its rows, errors as text.
pub(crate) async fn query(
    conn: &mut ServerConn,
    sql: &str,
) -> Result<Vec<Vec<Option<String>>>, String> {
    match conn.query_rows(sql).await {
        Ok(Ok(rows)) => Ok(rows),
        Ok(Err(e)) => Err(format!("{}: {}", e.code, e.message)),
        Err(e) => Err(e.to_string()),
    }
}

/// The first column of the first row.
pub(crate) fn first(rows: &[Vec<Option<String>>]) -> Option<String> {
    rows.first().and_then(|r| r.first().cloned().flatten())
}

/// Column `i` of a row, parsed; None if NULL, missing or unparsable.
pub(crate) fn cell<T: std::str::FromStr>(row: &[Option<String>], i: usize) -> Option<T> {
    row.get(i)?.as_deref()?.parse().ok()
}

/// A SQL string literal.
pub(crate) fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Sends `signal` (KILL, QUIT: immediate shutdown, INT: fast shutdown) to
/// the postmaster of the server at `addr`. It runs on the database host
/// through `COPY ... TO PROGRAM`, so it needs a superuser login (the probe
/// login); shardgate has no other way onto a remote server. Returns the
/// postmaster's pid.
pub(crate) async fn signal_postmaster(
    proxy: &Proxy,
    addr: &str,
    signal: &str,
) -> Result<u32, String> {
    let mut c = admin_conn(proxy, addr, Duration::from_secs(5)).await?;
    let rows = query(
        &mut c,
        "SELECT split_part(pg_read_file('postmaster.pid'), E'\\n', 1)",
    )
    .await?;
    let pid: u32 = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|p| p.trim().parse().ok())
        .ok_or("cannot read the postmaster's pid")?;
    // The server may go away before it answers.
    let _ = query(
        &mut c,
        &format!(
            "COPY (SELECT 1) TO PROGRAM {}",
            quote(&format!("kill -{signal} {pid}"))
        ),
    )
    .await;
    Ok(pid)
}
