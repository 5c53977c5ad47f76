//! Online resharding: moving buckets from one shard to another while the
//! application keeps reading and writing.
//!
//! A move is a state machine whose state lives in the store
//! (`cluster.json`, [`crate::store`]), so a restarted proxy resumes it or
//! rolls it back:
//!
//! 1. **Preparing**: schema on the target (copied with `pg_dump` when
//!    missing), then a publication on the source whose row filters select
//!    the moving buckets (the `postgres` hash computed by Postgres itself,
//!    [`crate::sharding::hash::bucket_sql`]). Postgres's own logical
//!    replication carries the stream rather than a decoder in the proxy:
//!    it applies changes transactionally in commit order, with row filters
//!    that turn an UPDATE moving a row into or out of the buckets into an
//!    INSERT or a DELETE.
//! 2. **Copying**: the replication slot is created over a WAL sender
//!    connection and exports its snapshot; shardgate copies the moving rows
//!    in that snapshot (`COPY ... TO STDOUT` into `COPY ... FROM STDIN`,
//!    rate-limited by `reshard.copy_bytes_per_second`), so nothing between
//!    copy and stream is lost, then subscribes the target to the slot.
//!    Reads and writes continue on the source.
//! 3. **CatchingUp**: the stream applies the source's changes; a marker row
//!    (`shardgate.move_marker`, part of the publication) bumped on the
//!    source and seen on the target proves the target has applied
//!    everything committed before it.
//! 4. **CuttingOver**: statements on the moving buckets are held in the
//!    proxy (the topology marks the buckets held); fence triggers on the
//!    source reject writes to them from anywhere else (their creation waits
//!    for writes already running on the tables); the marker round trip
//!    proves catch-up; per bucket, row counts and checksums of source and
//!    target are compared; then the new bucket map is saved and published
//!    and the held statements run on the new owner. A catch-up that takes
//!    longer than `reshard.cutover_timeout` releases the hold and retries;
//!    a checksum mismatch stops the move and names the buckets.
//! 5. **Switched**: the source keeps its copy (still fenced) for
//!    `reshard.cleanup_after`.
//! 6. **CleaningUp**: subscription (and with it the slot), publication,
//!    the moved rows on the source (in batches), fence triggers and the
//!    marker row are removed. A move that fails or is aborted removes the
//!    replication objects and the copied rows on the target the same way,
//!    so no replication slot is ever left behind.
//!
//! A move aborted after its cutover moves back through **reverse
//! replication**: a slot on the target (made before the cutover, advanced
//! to the target's WAL position at the switch) feeds a subscription on
//! the source; then the same catch-up, verification and cutover run in
//! the other direction (MovingBack, CuttingBack, MovedBack) and the
//! target's copy is removed.
//!
//! While any move is unfinished, a shard may hold copies of buckets it
//! does not own (before the cutover the target, after it the source until
//! cleanup). Reads across shards leave them out on that shard
//! ([`copies_not_owned`], [`crate::router::shard::exclude_buckets`]);
//! writes across shards naming a sharded table are refused (SQLSTATE
//! 0A000).

pub mod buckets;
mod steps;
mod verify;

/// The SQL functions that compute a murmur3 bucket inside Postgres
/// (installed on both sides of a move of a murmur3-sharded table).
pub const MURMUR3_SQL: &str = include_str!("murmur3.sql");

use crate::proxy::Proxy;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// One bucket move from one shard to another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Move {
    pub id: u64,
    pub from: String,
    pub to: String,
    /// Ranges (`"0-127"`).
    pub buckets: Vec<String>,
    /// The database the sharded tables live in.
    pub database: String,
    /// Tables moved, schema-qualified.
    #[serde(default)]
    pub tables: Vec<String>,
    pub phase: Phase,
    /// Why it failed, or what it is waiting for.
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub started_unix_ms: u64,
    #[serde(default)]
    pub switched_unix_ms: u64,
    #[serde(default)]
    pub finished_unix_ms: u64,
    /// How long statements on the moving buckets were held at the cutover.
    #[serde(default)]
    pub pause_ms: u64,
    #[serde(default)]
    pub cutover_attempts: u32,
    /// Rows in the moving buckets when the copy started, per table.
    #[serde(default)]
    pub rows_total: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// Replication objects were (maybe) created: a rollback removes the
    /// rows copied to the target.
    #[serde(default)]
    pub copy_started: bool,
    /// When the subscription (and with it the copy) was created, and when
    /// every table's copy had finished.
    #[serde(default)]
    pub copy_started_unix_ms: u64,
    #[serde(default)]
    pub copied_unix_ms: u64,
    /// Bytes the copy sent to the target (COPY text format).
    #[serde(default)]
    pub bytes_copied: u64,
    /// The target's WAL position at the cutover: a move back (an abort
    /// after the cutover) replays the target's changes from here.
    #[serde(default)]
    pub back_lsn: String,
    /// How long statements were held when the buckets moved back.
    #[serde(default)]
    pub back_pause_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Preparing,
    Copying,
    CatchingUp,
    CuttingOver,
    Switched,
    CleaningUp,
    /// Aborted after the cutover: the target's changes stream back to the
    /// source (reverse replication) until it has caught up.
    MovingBack,
    /// The moving buckets are held while the old map is restored.
    CuttingBack,
    /// The source owns the buckets again; the target's copy is removed.
    MovedBack,
    Done,
    Failed,
    Aborted,
}

impl Phase {
    /// Not finished: the source or the target holds rows it does not own.
    pub fn active(self) -> bool {
        !matches!(self, Phase::Done | Phase::Failed | Phase::Aborted)
    }

    /// Before the new map is published: an abort restores the old
    /// placement without moving anything back.
    pub fn before_cutover(self) -> bool {
        matches!(
            self,
            Phase::Preparing | Phase::Copying | Phase::CatchingUp | Phase::CuttingOver
        )
    }

    /// Statements on the moving buckets wait in the proxy.
    pub fn held(self) -> bool {
        matches!(self, Phase::CuttingOver | Phase::CuttingBack)
    }

    /// An abort after the cutover is under way.
    pub fn moving_back(self) -> bool {
        matches!(
            self,
            Phase::MovingBack | Phase::CuttingBack | Phase::MovedBack
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Copying => "copying",
            Phase::CatchingUp => "catching_up",
            Phase::CuttingOver => "cutting_over",
            Phase::Switched => "switched",
            Phase::CleaningUp => "cleaning_up",
            Phase::MovingBack => "moving_back",
            Phase::CuttingBack => "cutting_back",
            Phase::MovedBack => "moved_back",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Aborted => "aborted",
        }
    }
}

/// Live numbers of a running move (not persisted).
#[derive(Debug, Clone, Default)]
pub struct Progress {
    pub rows_copied: u64,
    pub tables_ready: u32,
    pub tables_total: u32,
    pub lag_bytes: u64,
    pub rows_per_second: f64,
}

/// What one source shard would send for a planned move.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PlannedMove {
    pub from: String,
    pub to: String,
    pub buckets: Vec<String>,
    pub tables: Vec<PlannedTable>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PlannedTable {
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
}

/// The proxy's resharding controller: which moves run in this process,
/// abort requests and live progress. The moves themselves are in the
/// cluster state.
#[derive(Default)]
pub struct Reshard {
    /// Statements running on several shards (they must not overlap with a
    /// copy or a cutover).
    scatters: Arc<std::sync::atomic::AtomicUsize>,
    running: std::sync::Mutex<HashSet<u64>>,
    abort: std::sync::Mutex<HashSet<u64>>,
    progress: std::sync::Mutex<HashMap<u64, Progress>>,
}

/// Finished moves kept in the state for `status`.
const KEEP_FINISHED: usize = 20;

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Counts a statement running on several shards while it lives.
pub struct ScatterGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ScatterGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Reshard {
    pub fn enter_scatter(&self) -> ScatterGuard {
        self.scatters
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        ScatterGuard(self.scatters.clone())
    }

    /// Waits until no statement that runs on several shards is running
    /// (those that start from now on see the move and are refused).
    pub(crate) async fn wait_scatters(&self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.scatters.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    pub fn progress(&self, id: u64) -> Option<Progress> {
        crate::lock(&self.progress).get(&id).cloned()
    }

    fn set_progress(&self, id: u64, p: Progress) {
        crate::lock(&self.progress).insert(id, p);
    }

    pub(super) fn abort_requested(&self, id: u64) -> bool {
        crate::lock(&self.abort).contains(&id)
    }

    /// Runs every unfinished move of the saved state (after a restart).
    pub fn resume_all(proxy: &Arc<Proxy>) {
        for m in proxy.failover.state().moves {
            if m.phase.active() {
                tracing::info!(id = m.id, phase = m.phase.name(), "resuming bucket move");
                Self::spawn(proxy, m.id);
            }
        }
    }

    fn spawn(proxy: &Arc<Proxy>, id: u64) {
        if !crate::lock(&proxy.reshard.running).insert(id) {
            return;
        }
        let p = proxy.clone();
        // Not a tracked task: shutdown does not wait for a move; its state
        // is saved and the next start resumes it.
        tokio::spawn(async move {
            // Stopped mid-phase at shutdown, as a crash would stop it:
            // every phase can be resumed from the saved state.
            tokio::select! {
                _ = steps::run(&p, id) => {}
                _ = p.shutdown.cancelled() => {}
            }
            crate::lock(&p.reshard.running).remove(&id);
        });
    }

    /// What moving `buckets` to shard `to` would copy, per source shard.
    pub async fn plan(
        proxy: &Arc<Proxy>,
        buckets: &[String],
        to: &str,
        database: &str,
    ) -> Result<Vec<PlannedMove>, String> {
        let groups = Self::groups(proxy, buckets, to)?;
        Self::estimate_groups(proxy, groups, to, database).await
    }

    /// Rows and bytes each group of buckets would copy from its owner.
    async fn estimate_groups(
        proxy: &Proxy,
        groups: Vec<(String, Vec<u32>)>,
        to: &str,
        database: &str,
    ) -> Result<Vec<PlannedMove>, String> {
        let mut out = Vec::new();
        for (from, b) in groups {
            out.push(PlannedMove {
                tables: steps::estimate(proxy, &from, database, &b).await?,
                from,
                to: to.to_owned(),
                buckets: buckets::ranges(&b),
            });
        }
        Ok(out)
    }

    /// `buckets` grouped by their owner's name, leaving out those `to`
    /// owns.
    fn by_owner(
        topology: &crate::topology::Topology,
        owner: &[u16],
        buckets: impl IntoIterator<Item = u32>,
        to: &str,
    ) -> Vec<(String, Vec<u32>)> {
        let mut groups: Vec<(String, Vec<u32>)> = Vec::new();
        for b in buckets {
            let name = &topology.shards[owner[b as usize] as usize].name;
            if name == to {
                continue;
            }
            match groups.iter_mut().find(|(s, _)| s == name) {
                Some((_, v)) => v.push(b),
                None => groups.push((name.clone(), vec![b])),
            }
        }
        groups
    }

    /// The moving buckets grouped by their current owner (buckets `to`
    /// already owns are left out).
    fn groups(
        proxy: &Proxy,
        ranges: &[String],
        to: &str,
    ) -> Result<Vec<(String, Vec<u32>)>, String> {
        let topology = proxy.topology.load();
        let map = topology
            .map
            .as_ref()
            .ok_or("resharding needs a [sharding] section")?;
        if !topology.shards.iter().any(|s| s.name == to) {
            return Err(format!("no shard named {to:?}"));
        }
        let wanted = buckets::parse(ranges, map.buckets)?;
        if wanted.is_empty() {
            return Err("no buckets given".into());
        }
        let groups = Self::by_owner(&topology, &map.owner, wanted, to);
        if groups.is_empty() {
            return Err(format!("shard {to:?} already owns every bucket given"));
        }
        Ok(groups)
    }

    /// Starts moving `buckets` to shard `to`: one move per source shard,
    /// run one after another. Returns the moves' ids.
    pub fn start(
        proxy: &Arc<Proxy>,
        ranges: &[String],
        to: &str,
        database: &str,
    ) -> Result<Vec<u64>, String> {
        let groups = Self::groups(proxy, ranges, to)?;
        let state = proxy.failover.state();
        if let Some(m) = state.moves.iter().find(|m| m.phase.active()) {
            return Err(format!(
                "move {} ({} -> {}, buckets {}) is still {}; wait for it or abort it",
                m.id,
                m.from,
                m.to,
                m.buckets.join(","),
                m.phase.name()
            ));
        }
        let first = state.moves.iter().map(|m| m.id).max().unwrap_or(0) + 1;
        let moves: Vec<Move> = groups
            .into_iter()
            .enumerate()
            .map(|(i, (from, b))| Move {
                id: first + i as u64,
                from,
                to: to.to_owned(),
                buckets: buckets::ranges(&b),
                database: database.to_owned(),
                started_unix_ms: now_ms(),
                ..Move::default()
            })
            .collect();
        let ids: Vec<u64> = moves.iter().map(|m| m.id).collect();
        proxy
            .failover
            .update_state(proxy, |s| s.moves.extend(moves))
            .map_err(|e| format!("cannot save the move: {e}"))?;
        let p = proxy.clone();
        let run = ids.clone();
        tokio::spawn(async move {
            // One at a time: each waits for the one before it.
            for id in run {
                if p.shutdown.is_cancelled() {
                    return;
                }
                Self::spawn(&p, id);
                while crate::lock(&p.reshard.running).contains(&id) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let failed = p
                    .failover
                    .state()
                    .moves
                    .iter()
                    .any(|m| m.id == id && m.phase != Phase::Done && !m.phase.active());
                if failed {
                    p.failover
                        .update_state(&p, |s| {
                            for m in s.moves.iter_mut().filter(|m| m.id > id && m.phase.active()) {
                                m.phase = Phase::Aborted;
                                m.message = format!("move {id} before it did not finish");
                                m.finished_unix_ms = now_ms();
                            }
                        })
                        .ok();
                    break;
                }
            }
        });
        Ok(ids)
    }

    /// The buckets a new shard takes so that every shard owns about B / N
    /// of them: each existing shard gives its excess over the fair share,
    /// from the end of its range.
    pub fn fair_share(owner: &[u16], shards: usize) -> Vec<u32> {
        let n = shards + 1;
        let fair = owner.len() / n;
        let mut counts = vec![0usize; shards];
        for o in owner {
            if let Some(c) = counts.get_mut(*o as usize) {
                *c += 1;
            }
        }
        let mut take = Vec::new();
        // Largest owners give first, until the new shard has its share.
        let mut order: Vec<usize> = (0..shards).collect();
        order.sort_by_key(|s| std::cmp::Reverse(counts[*s]));
        let mut wanted = fair;
        for s in order {
            let excess = counts[s].saturating_sub(fair).min(wanted);
            let mine: Vec<u32> = (0..owner.len() as u32)
                .filter(|b| owner[*b as usize] as usize == s)
                .collect();
            take.extend(mine.iter().rev().take(excess));
            wanted -= excess;
        }
        take.sort_unstable();
        take
    }

    /// `reshard add-shard`: registers shard `name` (saved in the cluster
    /// state; it should be added to the configuration later) and moves its
    /// fair share of buckets to it. With `dry_run`, only the plan.
    pub async fn add_shard(
        proxy: &Arc<Proxy>,
        name: &str,
        primary: &str,
        replicas: &[String],
        database: &str,
        dry_run: bool,
    ) -> Result<(Vec<PlannedMove>, Vec<u64>), String> {
        let topology = proxy.topology.load();
        let map = topology
            .map
            .as_ref()
            .ok_or("resharding needs a [sharding] section")?;
        if topology.shards.iter().any(|s| s.name == name) {
            return Err(format!("a shard named {name:?} exists already"));
        }
        for a in std::iter::once(primary).chain(replicas.iter().map(String::as_str)) {
            if a.rsplit_once(':')
                .is_none_or(|(_, p)| p.parse::<u16>().is_err())
            {
                return Err(format!("{a:?} is not host:port"));
            }
            if topology
                .shards
                .iter()
                .any(|s| &*s.primary == a || s.replicas.iter().any(|r| &*r.addr == a))
            {
                return Err(format!("{a} already serves another shard"));
            }
        }
        if map.owner.len() < topology.shards.len() + 1 {
            return Err(format!(
                "{} buckets cannot be shared by {} shards",
                map.owner.len(),
                topology.shards.len() + 1
            ));
        }
        let take = Self::fair_share(&map.owner, topology.shards.len());
        let ranges = buckets::ranges(&take);
        let groups = Self::by_owner(&topology, &map.owner, take, name);
        let plan = Self::estimate_groups(proxy, groups, name, database).await?;
        if dry_run {
            return Ok((plan, Vec::new()));
        }
        // The new shard must answer before anything is saved.
        steps::check_server(proxy, primary, database).await?;
        proxy
            .failover
            .update_state(proxy, |s| {
                s.shards.push(crate::store::ShardState {
                    name: name.to_owned(),
                    primary: primary.to_owned(),
                    replicas: replicas.to_vec(),
                    fenced: Vec::new(),
                    promoting: false,
                })
            })
            .map_err(|e| format!("cannot save the new shard: {e}"))?;
        tracing::warn!(shard = name, primary, buckets = %ranges.join(","), "shard added; moving its buckets to it");
        let ids = Self::start(proxy, &ranges, name, database)?;
        Ok((plan, ids))
    }

    /// Asks the running moves to stop and roll back. A move that has not
    /// cut over rolls back; one that has (and is not cleaning up yet)
    /// moves its buckets back through reverse replication.
    pub fn abort(proxy: &Arc<Proxy>) -> Result<Vec<u64>, String> {
        // Decided under the state's lock: the runner switching a move to
        // cleaning_up reads the abort requests under the same lock, so
        // an abort either wins or is told that cleanup began.
        let (ids, _) = proxy
            .failover
            .update_state(proxy, |s| {
                let active: Vec<&Move> = s.moves.iter().filter(|m| m.phase.active()).collect();
                if active.is_empty() {
                    return Err("no move is running".to_owned());
                }
                if let Some(m) = active.iter().find(|m| m.phase == Phase::CleaningUp) {
                    return Err(format!(
                        "move {} is cleaning up (the source's copy is being deleted); move its buckets back with `reshard move --buckets {} --to {}` once it is done",
                        m.id,
                        m.buckets.join(","),
                        m.from
                    ));
                }
                if let Some(m) = active
                    .iter()
                    .find(|m| m.phase == Phase::Switched && m.back_lsn.is_empty())
                {
                    return Err(format!(
                        "move {} cut over without a reverse replication slot (a move started by an older shardgate); move its buckets back with `reshard move --buckets {} --to {}` after its cleanup",
                        m.id,
                        m.buckets.join(","),
                        m.from
                    ));
                }
                let ids: Vec<u64> = active.iter().map(|m| m.id).collect();
                crate::lock(&proxy.reshard.abort).extend(ids.iter().copied());
                Ok(ids)
            })
            .map_err(|e| format!("cannot save the abort: {e}"))?;
        let ids = ids?;
        // Moves queued behind the running one never start.
        for id in &ids {
            if !crate::lock(&proxy.reshard.running).contains(id) {
                Self::spawn(proxy, *id);
            }
        }
        Ok(ids)
    }
}

/// Per shard index, the buckets of unfinished moves that the shard may
/// hold copies of without owning them under `topology`'s map (the target
/// before a cutover, the source after it until cleanup). A read across
/// shards leaves them out there.
pub fn copies_not_owned(
    proxy: &Proxy,
    topology: &crate::topology::Topology,
) -> Vec<(usize, Vec<u32>)> {
    let Some(map) = topology.map.as_ref() else {
        return Vec::new();
    };
    let mut out: Vec<(usize, Vec<u32>)> = Vec::new();
    for m in proxy
        .failover
        .state()
        .moves
        .iter()
        .filter(|m| m.phase.active())
    {
        let Ok(moving) = buckets::parse(&m.buckets, map.buckets) else {
            continue;
        };
        for name in [&m.from, &m.to] {
            let Some(i) = topology.shards.iter().position(|s| &s.name == name) else {
                continue;
            };
            let not_owned: Vec<u32> = moving
                .iter()
                .copied()
                .filter(|b| map.owner.get(*b as usize).is_some_and(|o| *o as usize != i))
                .collect();
            if not_owned.is_empty() {
                continue;
            }
            match out.iter_mut().find(|(s, _)| *s == i) {
                Some((_, list)) => list.extend(not_owned),
                None => out.push((i, not_owned)),
            }
        }
    }
    out
}

/// Sets fields of move `id` in the saved state and publishes the topology.
pub(crate) fn save(proxy: &Proxy, id: u64, f: impl FnOnce(&mut Move)) -> Result<Move, String> {
    let (m, _) = proxy
        .failover
        .update_state(proxy, |s| {
            let m = s.moves.iter_mut().find(|m| m.id == id)?;
            f(m);
            let out = m.clone();
            // Keep the unfinished moves and the last finished ones.
            let finished = s.moves.iter().filter(|m| !m.phase.active()).count();
            if finished > KEEP_FINISHED {
                let mut drop = finished - KEEP_FINISHED;
                s.moves.retain(|m| {
                    if drop > 0 && !m.phase.active() {
                        drop -= 1;
                        false
                    } else {
                        true
                    }
                });
            }
            Some(out)
        })
        .map_err(|e| format!("cannot save move {id}: {e}"))?;
    m.ok_or_else(|| format!("move {id} is gone from the state"))
}
