//! Two-phase commit for writes that span shards.
//!
//! Each shard's part runs in its own transaction on the shard's primary
//! and is prepared (`PREPARE TRANSACTION 'gid'`). Only when every part is
//! prepared does the proxy decide to commit: the decision is appended to
//! the decision log and fsync'd before any `COMMIT PREPARED` is sent. A
//! proxy that dies between the phases finds, on restart, every prepared
//! transaction it owns (`pg_prepared_xacts`, by the `sg_<node>_` prefix of
//! its gids): those with a logged decision are committed, and those
//! without one that a previous run of the proxy started (the gid carries
//! its start time) are rolled back — no shard keeps a prepared
//! transaction, no write is half applied, and a write this run is still
//! preparing is never touched. A commit that fails at run time (a shard unreachable) stays in
//! the log and is retried in the background until it succeeds.
//!
//! The log is a text file, one line per event (`commit <gid>` /
//! `done <gid>`), rewritten without finished entries at startup.

use crate::backend::conn::{ConnectParams, ServerConn};
use crate::config::Config;
use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

pub const LOG_FILE: &str = "twophase.log";

pub struct DecisionLog {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    node: u16,
    counter: AtomicU64,
    /// When this log was opened (ms since the Unix epoch): undecided gids
    /// older than this belong to a previous run.
    started_ms: u128,
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// The time a gid was made (`sg_<node>_<ms>_<n>`).
fn gid_ms(gid: &str) -> Option<u128> {
    gid.split('_').nth(2)?.parse().ok()
}

impl DecisionLog {
    /// Opens (creating) the log in `dir`.
    pub fn open(dir: &Path, node: u16) -> std::io::Result<DecisionLog> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        Ok(DecisionLog {
            path,
            file: Mutex::new(file),
            node,
            counter: AtomicU64::new(0),
            started_ms: now_ms(),
        })
    }

    /// A new global transaction id owned by this proxy.
    pub fn new_gid(&self) -> String {
        // Never before the start time, so no gid of this run looks old.
        let ms = now_ms().max(self.started_ms);
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        format!("sg_{}_{ms}_{n}", self.node)
    }

    /// The prefix of this proxy's gids.
    pub fn prefix(&self) -> String {
        format!("sg_{}_", self.node)
    }

    /// Records the decision to commit `gid`, durably, before phase two.
    pub fn commit(&self, gid: &str) -> std::io::Result<()> {
        let mut f = crate::lock(&self.file);
        writeln!(f, "commit {gid}")?;
        f.sync_data()
    }

    /// Records that every part of `gid` is committed.
    pub fn done(&self, gid: &str) -> std::io::Result<()> {
        let mut f = crate::lock(&self.file);
        writeln!(f, "done {gid}")
    }

    /// Gids decided but not known to be finished.
    pub fn pending(&self) -> std::io::Result<BTreeSet<String>> {
        let _guard = crate::lock(&self.file);
        read_pending(&self.path)
    }

    /// Rewrites the log with only the unfinished decisions.
    pub fn compact(&self) -> std::io::Result<()> {
        let mut f = crate::lock(&self.file);
        let pending = read_pending(&self.path)?;
        let tmp = self.path.with_extension("tmp");
        {
            let mut t = std::fs::File::create(&tmp)?;
            for gid in &pending {
                writeln!(t, "commit {gid}")?;
            }
            t.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        // The rename itself must survive a crash.
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        *f = std::fs::OpenOptions::new().append(true).open(&self.path)?;
        Ok(())
    }
}

fn read_pending(path: &Path) -> std::io::Result<BTreeSet<String>> {
    let file = std::fs::File::open(path)?;
    let mut pending = BTreeSet::new();
    for line in std::io::BufReader::new(file).lines() {
        let line = line?;
        match line.split_once(' ') {
            Some(("commit", gid)) => {
                pending.insert(gid.to_string());
            }
            Some(("done", gid)) => {
                pending.remove(gid);
            }
            _ => {}
        }
    }
    Ok(pending)
}

/// Finishes this proxy's prepared transactions on every primary: commits
/// those with a logged decision, rolls back undecided ones a previous run
/// started. Returns how many were committed and rolled back; errors (a
/// shard down, a role that may not finish the transaction) are reported
/// after the rest is done.
/// The primaries are the topology's (after a failover, the promoted ones:
/// a fenced former primary is never touched).
pub async fn recover(
    log: &DecisionLog,
    config: &Config,
    topology: &crate::topology::Topology,
) -> Result<(usize, usize), String> {
    let decided = log.pending().map_err(|e| e.to_string())?;
    let (user, password) = config.probe_login();
    let timeout = config.pool.connect_timeout;
    let mut committed_somewhere: HashSet<String> = HashSet::new();
    let mut unreachable = false;
    let mut errors = Vec::new();
    let (mut commits, mut rollbacks) = (0, 0);
    for shard in &topology.shards {
        let params = |database: &str| ConnectParams {
            addr: shard.primary.to_string(),
            database: database.to_string(),
            user: user.clone(),
            password: password.clone(),
        };
        let mut conn = match ServerConn::connect(&params(&config.health.database), timeout).await {
            Ok(c) => c,
            Err(e) => {
                errors.push(format!("{}: {e}", shard.name));
                unreachable = true;
                continue;
            }
        };
        let sql = format!(
            "SELECT gid, database FROM pg_catalog.pg_prepared_xacts WHERE gid LIKE '{}%'",
            log.prefix().replace('_', "\\_")
        );
        let rows = match conn.query_rows(&sql).await {
            Ok(Ok(rows)) => rows,
            Ok(Err(e)) => {
                errors.push(format!("{}: {}: {}", shard.name, e.code, e.message));
                unreachable = true;
                continue;
            }
            Err(e) => {
                errors.push(format!("{}: {e}", shard.name));
                unreachable = true;
                continue;
            }
        };
        for row in rows {
            let [Some(gid), Some(database)] = row.as_slice() else {
                continue;
            };
            let commit = decided.contains(gid);
            let stale = gid_ms(gid).is_some_and(|ms| ms < log.started_ms);
            if !commit && !stale {
                continue;
            }
            let mut db = match ServerConn::connect(&params(database), timeout).await {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("{}: {e}", shard.name));
                    unreachable = true;
                    continue;
                }
            };
            let verb = if commit { "COMMIT" } else { "ROLLBACK" };
            match db.run_internal(&format!("{verb} PREPARED '{gid}'")).await {
                Ok(None) => {
                    tracing::info!(%gid, shard = %shard.name, "two-phase recovery: {verb} PREPARED");
                    if commit {
                        commits += 1;
                        committed_somewhere.insert(gid.clone());
                    } else {
                        rollbacks += 1;
                    }
                }
                Ok(Some(e)) => {
                    errors.push(format!(
                        "{}: {verb} PREPARED {gid}: {}",
                        shard.name, e.message
                    ));
                    unreachable = true;
                }
                Err(e) => {
                    errors.push(format!("{}: {e}", shard.name));
                    unreachable = true;
                }
            }
        }
    }
    // A decided gid no shard still holds is finished.
    if !unreachable {
        for gid in &decided {
            let _ = log.done(gid);
        }
        log.compact().map_err(|e| e.to_string())?;
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    Ok((commits, rollbacks))
}

/// Startup recovery, then a retry every few seconds for decisions whose
/// commit did not reach every shard. Once a pass has reached every shard,
/// later passes run only while the log holds unfinished decisions: a pass
/// logs in to every primary (a SCRAM login costs milliseconds of CPU) and
/// rewrites the log, which an idle proxy should not do every 5 seconds.
pub async fn run(proxy: std::sync::Arc<crate::proxy::Proxy>) {
    let Some(log) = proxy.twophase.as_ref() else {
        return;
    };
    let mut swept = false;
    loop {
        let config = proxy.config.load_full();
        let due = !swept || log.pending().map_or(true, |p| !p.is_empty());
        if due && config.sharding.is_some() && config.shards.len() > 1 {
            match recover(log, &config, &proxy.topology.load()).await {
                Ok((c, r)) => {
                    swept = true;
                    if c + r > 0 {
                        tracing::info!(
                            committed = c,
                            rolled_back = r,
                            "two-phase recovery finished"
                        )
                    }
                }
                Err(e) => tracing::warn!(error = %e, "two-phase recovery failed; retrying"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = proxy.shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gids_carry_their_time_and_never_predate_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path(), 1).unwrap();
        let gid = log.new_gid();
        assert!(gid_ms(&gid).unwrap() >= log.started_ms);
        assert_eq!(gid_ms("sg_1_1700000000000_5"), Some(1_700_000_000_000));
        assert_eq!(gid_ms("other"), None);
    }

    #[test]
    fn log_keeps_undone_decisions() {
        let dir = tempfile::tempdir().unwrap();
        let log = DecisionLog::open(dir.path(), 7).unwrap();
        let (a, b) = (log.new_gid(), log.new_gid());
        assert!(a.starts_with("sg_7_") && a != b);
        log.commit(&a).unwrap();
        log.commit(&b).unwrap();
        log.done(&a).unwrap();
        assert_eq!(
            log.pending().unwrap().into_iter().collect::<Vec<_>>(),
            vec![b.clone()]
        );
        log.compact().unwrap();
        drop(log);
        let log = DecisionLog::open(dir.path(), 7).unwrap();
        assert_eq!(log.pending().unwrap().len(), 1);
        log.done(&b).unwrap();
        assert!(log.pending().unwrap().is_empty());
    }
}
