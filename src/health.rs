//! Health and lag of every server, from background probes.
//!
//! Every `health.probe_interval` each server of the topology is asked, over a
//! connection kept open for the purpose, `pg_is_in_recovery()` and its WAL
//! position (the insert position on a primary, the replayed position on a
//! replica). From that:
//!
//! - a server whose probe fails (refused, closed, timed out, error) is down
//!   until a probe succeeds again; a session that cannot connect to a
//!   replica marks it down at once ([`ServerHealth::mark_down`]);
//! - a replica's lag in bytes is the primary's last insert position minus
//!   its replay position; its lag in time is how long ago the primary was
//!   last seen at or below the replica's replay position (from a short
//!   history of primary positions), so an idle primary does not make an
//!   up-to-date replica look stale;
//! - a replica's replay position is what read-your-writes compares a
//!   session's last commit with. A probe's reading can only be older than
//!   the truth, so the comparison errs toward the primary.

use crate::backend::conn::{ConnectParams, ServerConn};
use crate::topology::Topology;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// Primary positions kept for the time-lag computation.
const HISTORY: usize = 4096;

/// What the probes know about one server.
pub struct ServerHealth {
    pub addr: Arc<str>,
    up: AtomicBool,
    /// Set by the first successful probe.
    probed: AtomicBool,
    in_recovery: AtomicBool,
    /// Insert position (primary) or replayed position (replica).
    lsn: AtomicU64,
    lag_bytes: AtomicU64,
    lag_micros: AtomicU64,
    /// Transactions of this proxy running on the server now.
    pub outstanding: AtomicUsize,
    /// Why the server is not taking reads, for logs and metrics.
    reason: Mutex<&'static str>,
    conn: tokio::sync::Mutex<Option<ServerConn>>,
    /// A probe is running (a slow server is not probed twice at once).
    probing: AtomicBool,
    /// The current run of failed probes (failover detection).
    streak: Mutex<Streak>,
    /// On a primary: its synchronous replication, as last seen.
    sync: Mutex<SyncReplication>,
    /// On a replica: the server (`host:port`) its walreceiver was last
    /// seen streaming from, and when.
    streamed_from: Mutex<Option<(String, Instant)>>,
    /// On a primary: its WAL insert position from the last probe, and when
    /// that probe started (every commit finished before then is at or
    /// below it).
    position: Mutex<Option<(Instant, u64)>>,
    /// On a replica: it was last seen streaming from its shard's current
    /// primary (or never seen streaming at all). A replica still attached
    /// to a former primary may hold WAL the new one lacks; it gets no reads.
    follows_primary: AtomicBool,
}

/// Consecutive failed probes of one server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Streak {
    /// Failed probes since the last success.
    pub failures: u32,
    /// Of the latest failures, how many in a row were refused or closed
    /// connections and errors (not timeouts).
    pub hard: u32,
    /// When the first of them started.
    pub since: Option<Instant>,
}

impl Streak {
    /// Whether a primary with these failed probes is dead at `now`:
    /// `failed_probes` refused or closed connections in a row, or that many
    /// failures spanning `unresponsive_for` when probes time out.
    pub fn is_dead(&self, f: &crate::config::FailoverConfig, now: Instant) -> bool {
        self.failures >= f.failed_probes
            && (self.hard >= f.failed_probes
                || self
                    .since
                    .is_some_and(|t| now.saturating_duration_since(t) >= f.unresponsive_for))
    }
}

/// What a primary reported about synchronous replication.
#[derive(Debug, Clone, Default)]
pub struct SyncReplication {
    /// `synchronous_standby_names` (empty: asynchronous).
    pub standby_names: String,
    /// application_name of the standbys in state sync or quorum.
    pub sync_standbys: Vec<String>,
}

impl ServerHealth {
    fn new(addr: Arc<str>) -> ServerHealth {
        ServerHealth {
            addr,
            up: AtomicBool::new(false),
            probed: AtomicBool::new(false),
            in_recovery: AtomicBool::new(false),
            lsn: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(u64::MAX),
            lag_micros: AtomicU64::new(u64::MAX),
            outstanding: AtomicUsize::new(0),
            reason: Mutex::new("not probed yet"),
            conn: tokio::sync::Mutex::new(None),
            probing: AtomicBool::new(false),
            streak: Mutex::new(Streak::default()),
            sync: Mutex::new(SyncReplication::default()),
            streamed_from: Mutex::new(None),
            follows_primary: AtomicBool::new(true),
            position: Mutex::new(None),
        }
    }

    pub fn follows_primary(&self) -> bool {
        self.follows_primary.load(Ordering::Relaxed)
    }

    /// Where and when the replica was last seen streaming.
    pub fn streamed_from(&self) -> Option<(String, Instant)> {
        crate::lock(&self.streamed_from).clone()
    }

    /// The primary's WAL insert position as a probe that started after
    /// `t` found it: at or past every commit that finished before `t`.
    pub fn position_since(&self, t: Instant) -> Option<u64> {
        match *crate::lock(&self.position) {
            Some((started, lsn)) if started > t => Some(lsn),
            _ => None,
        }
    }

    pub fn streak(&self) -> Streak {
        *crate::lock(&self.streak)
    }

    pub fn sync_replication(&self) -> SyncReplication {
        crate::lock(&self.sync).clone()
    }

    fn probe_failed(&self, hard: bool) {
        let mut s = crate::lock(&self.streak);
        s.failures += 1;
        s.hard = if hard { s.hard + 1 } else { 0 };
        s.since.get_or_insert_with(Instant::now);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn in_recovery(&self) -> bool {
        self.in_recovery.load(Ordering::Relaxed)
    }

    pub fn lsn(&self) -> u64 {
        self.lsn.load(Ordering::Relaxed)
    }

    pub fn lag_bytes(&self) -> u64 {
        self.lag_bytes.load(Ordering::Relaxed)
    }

    pub fn lag(&self) -> Duration {
        Duration::from_micros(self.lag_micros.load(Ordering::Relaxed))
    }

    pub fn reason(&self) -> &'static str {
        *crate::lock(&self.reason)
    }

    /// A session failed to reach the server: no reads until a probe
    /// succeeds.
    pub fn mark_down(&self, reason: &'static str) {
        if self.up.swap(false, Ordering::Relaxed) {
            tracing::warn!(server = %self.addr, reason, "server marked down");
            crate::metrics::GLOBAL
                .replica_bans
                .with_label_values(&[&self.addr, reason])
                .inc();
        }
        *crate::lock(&self.reason) = reason;
    }

    /// Sets what a probe would have found (tests and benchmarks of
    /// routing; the prober itself goes through `probe`).
    #[doc(hidden)]
    pub fn set_for_tests(
        &self,
        up: bool,
        in_recovery: bool,
        lsn: u64,
        lag_bytes: u64,
        lag: Duration,
    ) {
        self.up.store(up, Ordering::Relaxed);
        self.in_recovery.store(in_recovery, Ordering::Relaxed);
        self.lsn.store(lsn, Ordering::Relaxed);
        self.lag_bytes.store(lag_bytes, Ordering::Relaxed);
        self.lag_micros
            .store(lag.as_micros() as u64, Ordering::Relaxed);
    }

    fn mark_up(&self) {
        *crate::lock(&self.streak) = Streak::default();
        if !self.up.swap(true, Ordering::Relaxed) && self.probed.load(Ordering::Relaxed) {
            tracing::info!(server = %self.addr, "server is back");
        }
        self.probed.store(true, Ordering::Relaxed);
        *crate::lock(&self.reason) = "";
    }
}

/// Recent (time, insert position) samples of one primary, oldest first.
type PositionHistory = VecDeque<(Instant, u64)>;

/// Health of every server in the topology, by address.
#[derive(Default)]
pub struct Health {
    servers: RwLock<HashMap<Arc<str>, Arc<ServerHealth>>>,
    /// Per shard (by primary address): recent (time, insert position).
    history: Mutex<HashMap<Arc<str>, PositionHistory>>,
}

impl Health {
    /// The entry for `addr` (created on first use, not yet probed: down).
    pub fn server(&self, addr: &Arc<str>) -> Arc<ServerHealth> {
        if let Some(s) = crate::read(&self.servers).get(addr) {
            return s.clone();
        }
        crate::write(&self.servers)
            .entry(addr.clone())
            .or_insert_with(|| Arc::new(ServerHealth::new(addr.clone())))
            .clone()
    }

    pub fn all(&self) -> Vec<Arc<ServerHealth>> {
        crate::read(&self.servers).values().cloned().collect()
    }

    /// Probes every server of `topology` (fenced ones too) once,
    /// concurrently, waiting at most `wait` (a slow server's probe goes on
    /// in the background and that server is skipped until it ends), then
    /// updates the replicas' lag.
    pub async fn probe_all(&self, topology: &Topology, params: &ProbeParams, wait: Duration) {
        let fenced = topology.fenced.iter().map(|f| &f.addr);
        let addrs = topology
            .shards
            .iter()
            .flat_map(|s| std::iter::once(&s.primary).chain(s.replicas.iter().map(|r| &r.addr)))
            .chain(fenced);
        let mut tasks = Vec::new();
        for addr in addrs {
            let server = self.server(addr);
            if server.probing.swap(true, Ordering::AcqRel) {
                continue;
            }
            let params = params.clone();
            tasks.push(tokio::spawn(async move {
                probe(&server, &params).await;
                server.probing.store(false, Ordering::Release);
            }));
        }
        let deadline = tokio::time::Instant::now() + wait;
        for t in tasks {
            if tokio::time::timeout_at(deadline, t).await.is_err() {
                break;
            }
        }
        let now = Instant::now();
        for shard in &topology.shards {
            let primary = self.server(&shard.primary);
            let mut history = crate::lock(&self.history);
            let h = history.entry(shard.primary.clone()).or_default();
            if primary.is_up() && !primary.in_recovery() {
                let lsn = primary.lsn();
                if h.back().is_none_or(|&(_, last)| lsn >= last) {
                    h.push_back((now, lsn));
                } else {
                    // The primary's position went backwards: another server
                    // answers at this address now. Start over.
                    h.clear();
                    h.push_back((now, lsn));
                }
                while h.len() > HISTORY {
                    h.pop_front();
                }
            }
            for r in &shard.replicas {
                let replica = self.server(&r.addr);
                let follows = replica
                    .streamed_from()
                    .is_none_or(|(from, _)| same_server(&from, &shard.primary));
                if replica.follows_primary.swap(follows, Ordering::Relaxed) && !follows {
                    tracing::warn!(replica = %r.addr, primary = %shard.primary, "replica does not stream from the primary: no reads until it does");
                }
                let (bytes, lag) = lag_of(h, replica.lsn(), now);
                replica.lag_bytes.store(bytes, Ordering::Relaxed);
                replica.lag_micros.store(
                    lag.as_micros().min(u64::MAX as u128) as u64,
                    Ordering::Relaxed,
                );
                crate::metrics::GLOBAL
                    .replica_lag_bytes
                    .with_label_values(&[&r.addr])
                    .set(bytes.min(i64::MAX as u64) as i64);
                crate::metrics::GLOBAL
                    .replica_lag_seconds
                    .with_label_values(&[&r.addr])
                    .set(lag.as_secs_f64());
            }
        }
    }

    /// Probes until `stop` fires.
    pub async fn run(
        self: Arc<Self>,
        proxy: Arc<crate::proxy::Proxy>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        loop {
            let config = proxy.config.load_full();
            let params = ProbeParams::from_config(&config);
            let topology = proxy.topology.load();
            let started = Instant::now();
            self.probe_all(&topology, &params, config.health.probe_interval)
                .await;
            proxy.failover.after_probes(&proxy);
            let wait = config
                .health
                .probe_interval
                .saturating_sub(started.elapsed());
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// Byte and time lag of a replica at `replayed`, given the primary's
/// position history (oldest first).
fn lag_of(history: &PositionHistory, replayed: u64, now: Instant) -> (u64, Duration) {
    let Some(&(_, latest)) = history.back() else {
        return (u64::MAX, Duration::MAX);
    };
    if replayed >= latest {
        return (0, Duration::ZERO);
    }
    let bytes = latest - replayed;
    // The newest sample the replica has caught up with: it is at least as
    // fresh as the primary was then. None: older than all we kept.
    let caught_up = history.partition_point(|&(_, lsn)| lsn <= replayed);
    let lag = match caught_up {
        0 => now - history[0].0,
        i => now - history[i - 1].0,
    };
    (bytes, lag)
}

#[derive(Clone)]
pub struct ProbeParams {
    pub database: String,
    pub user: String,
    pub password: Option<String>,
    pub timeout: Duration,
}

impl ProbeParams {
    pub fn from_config(config: &crate::config::Config) -> ProbeParams {
        let (user, password) = config.probe_login();
        ProbeParams {
            database: config.health.database.clone(),
            user,
            password,
            timeout: config.health.probe_timeout,
        }
    }
}

const PROBE_SQL: &str = "SELECT pg_is_in_recovery()::text, \
     (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_insert_lsn() END)::text, \
     CASE WHEN NOT pg_is_in_recovery() THEN current_setting('synchronous_standby_names') END, \
     CASE WHEN NOT pg_is_in_recovery() THEN (SELECT string_agg(application_name, ',') \
       FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')) END, \
     CASE WHEN pg_is_in_recovery() THEN (SELECT sender_host || ':' || sender_port \
       FROM pg_stat_wal_receiver WHERE status = 'streaming') END";

async fn probe(server: &ServerHealth, params: &ProbeParams) {
    let mut slot = server.conn.lock().await;
    let started = Instant::now();
    let result = tokio::time::timeout(params.timeout, async {
        if slot.as_ref().is_none_or(|c| c.broken) {
            let p = ConnectParams {
                addr: server.addr.to_string(),
                database: params.database.clone(),
                user: params.user.clone(),
                password: params.password.clone(),
            };
            *slot = Some(
                ServerConn::connect(&p, params.timeout)
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        let conn = slot.as_mut().expect("connected above");
        match conn.query_rows(PROBE_SQL).await {
            Ok(Ok(rows)) => Ok(rows),
            Ok(Err(e)) => Err(format!("{}: {}", e.code, e.message)),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    let rows = match result {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            tracing::debug!(server = %server.addr, error = %e, "probe failed");
            *slot = None;
            server.probe_failed(true);
            server.mark_down("probe failed");
            return;
        }
        Err(_) => {
            *slot = None;
            server.probe_failed(false);
            server.mark_down("probe timed out");
            return;
        }
    };
    let row = rows.into_iter().next().unwrap_or_default();
    let in_recovery = row.first().cloned().flatten().as_deref() == Some("true");
    let lsn = row
        .get(1)
        .cloned()
        .flatten()
        .and_then(|s| parse_lsn(&s))
        .unwrap_or(0);
    if in_recovery {
        if let Some(sender) = row.get(4).cloned().flatten() {
            *crate::lock(&server.streamed_from) = Some((sender, Instant::now()));
        }
    } else {
        let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let names = text(3);
        *crate::lock(&server.sync) = SyncReplication {
            standby_names: text(2),
            sync_standbys: names
                .split(',')
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect(),
        };
    }
    server.in_recovery.store(in_recovery, Ordering::Relaxed);
    server.lsn.store(lsn, Ordering::Relaxed);
    *crate::lock(&server.position) = (!in_recovery).then_some((started, lsn));
    server.mark_up();
}

/// Whether `a` and `b` (`host:port`) name the same server: equal, or the
/// same port on loopback names.
pub fn same_server(a: &str, b: &str) -> bool {
    let loopback = |h: &str| matches!(h, "localhost" | "127.0.0.1" | "::1" | "[::1]");
    match (a.rsplit_once(':'), b.rsplit_once(':')) {
        (Some((ha, pa)), Some((hb, pb))) => {
            pa == pb && (ha == hb || (loopback(ha) && loopback(hb)))
        }
        _ => a == b,
    }
}

/// Parses a `pg_lsn` text (`16/B374D848`).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u32::MAX as u64 && lo <= u32::MAX as u64).then_some((hi << 32) | lo)
}

/// Formats an LSN like Postgres does.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text() {
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("x/1"), None);
        assert_eq!(parse_lsn("1"), None);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn(&format_lsn(u64::MAX)), Some(u64::MAX));
    }

    #[test]
    fn lag_from_history() {
        let t0 = Instant::now();
        let s = |ms: u64| t0 + Duration::from_millis(ms);
        let h: VecDeque<_> = [(s(0), 100), (s(100), 200), (s(200), 200), (s(300), 500)].into();
        let now = s(400);
        // Caught up with the latest position: no lag.
        assert_eq!(lag_of(&h, 500, now), (0, Duration::ZERO));
        // At 200: as fresh as the primary was at 200 ms (the newest sample
        // at or below 200), 200 ms ago.
        assert_eq!(lag_of(&h, 250, now), (250, Duration::from_millis(200)));
        // Behind everything kept: at least as old as the oldest sample.
        assert_eq!(lag_of(&h, 50, now), (450, Duration::from_millis(400)));
        assert_eq!(lag_of(&VecDeque::new(), 1, now).0, u64::MAX);
    }

    #[test]
    fn dead_after_refused_probes_or_unresponsive_window() {
        let f = crate::config::FailoverConfig::default();
        let refused = ServerHealth::new("a".into());
        let timing_out = ServerHealth::new("b".into());
        for _ in 1..f.failed_probes {
            refused.probe_failed(true);
            timing_out.probe_failed(false);
        }
        let start = refused.streak().since.unwrap();
        assert!(!refused.streak().is_dead(&f, start));
        refused.probe_failed(true);
        timing_out.probe_failed(false);
        // Refused connections: dead at once, whatever the time.
        assert!(refused.streak().is_dead(&f, start));
        // Timeouts: dead only once they span `unresponsive_for`.
        let since = timing_out.streak().since.unwrap();
        assert!(!timing_out.streak().is_dead(&f, since));
        assert!(!timing_out
            .streak()
            .is_dead(&f, since + f.unresponsive_for - Duration::from_millis(1)));
        assert!(timing_out.streak().is_dead(&f, since + f.unresponsive_for));
        // A timeout breaks the run of refusals.
        refused.probe_failed(false);
        assert!(!refused.streak().is_dead(&f, start));
    }
}
