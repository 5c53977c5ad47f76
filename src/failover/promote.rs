//! Choosing, promoting and following a new primary.

use super::{admin_conn, conninfo, first, query, quote, Report};
use crate::health::{parse_lsn, SyncReplication};
use crate::proxy::Proxy;
use crate::topology::{Shard, Topology};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A replica considered for promotion.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Candidate {
    pub addr: String,
    /// WAL received (flushed) or replayed, whichever is further.
    pub lsn: u64,
    /// Its name as a standby (application_name, else cluster_name).
    pub name: String,
    pub priority: u32,
    pub same_zone: bool,
    pub eligible: bool,
    /// Why it may not be promoted.
    pub excluded: String,
}

/// Unplanned failover of `shard`, whose primary `dead` failed its probes
/// since `since`. None when `dead` is no longer the shard's primary (a
/// failover that ended meanwhile already replaced it).
pub(super) async fn fail_over(
    proxy: &Arc<Proxy>,
    shard: &str,
    dead: &str,
    since: Instant,
) -> Option<Report> {
    let decided = Instant::now();
    let topology = proxy.topology.load();
    let mut report = Report {
        shard: shard.to_owned(),
        kind: "failover".into(),
        detect_ms: decided.duration_since(since).as_millis() as u64,
        ..Report::default()
    };
    let s = topology
        .shards
        .iter()
        .find(|s| s.name == shard && &*s.primary == dead)?;
    report.old_primary = s.primary.to_string();
    let timeout = proxy.config.load().health.probe_timeout;
    // A primary that restarted faster than detection keeps its role.
    let back = tokio::time::timeout(timeout, async {
        let mut c = admin_conn(proxy, &s.primary, timeout).await.ok()?;
        query(&mut c, "SELECT pg_is_in_recovery()::text").await.ok()
    })
    .await
    .ok()
    .flatten();
    if back.as_deref().and_then(first).as_deref() == Some("false") {
        report.outcome = "primary_back".into();
        report.message = "the primary answered again before promotion".into();
        return Some(report);
    }
    let sync = proxy.health.server(&s.primary).sync_replication();
    let timeout = proxy.config.load().health.probe_timeout;
    let candidates = survey(proxy, s, &sync, since, timeout).await;
    report.candidates = candidates.clone();
    let Some(best) = candidates.into_iter().find(|c| c.eligible) else {
        report.outcome = "no_candidate".into();
        report.message = if sync.standby_names.is_empty() {
            "no reachable replica may be promoted".into()
        } else {
            format!(
                "synchronous replication is configured ({:?}) and no synchronous standby is reachable; promoting another could lose acknowledged commits",
                sync.standby_names
            )
        };
        return Some(report);
    };
    promote_to(proxy, &topology, s, &best.addr, decided, &mut report).await;
    Some(report)
}

/// Finishes a promotion the saved state says was decided but not
/// confirmed (the proxy stopped in the middle).
pub(super) async fn finish_interrupted(proxy: &Arc<Proxy>, shard: &str) -> Report {
    let started = Instant::now();
    let mut report = Report {
        shard: shard.to_owned(),
        kind: "failover".into(),
        ..Report::default()
    };
    let Some(mut st) = proxy.failover.state().shard(shard).cloned() else {
        report.outcome = "failed".into();
        return report;
    };
    report.new_primary = st.primary.clone();
    report.old_primary = st.fenced.last().cloned().unwrap_or_default();
    let timeout = proxy.config.load().failover.promote_timeout;
    if let Err(e) = promote(proxy, &st.primary, timeout).await {
        report.outcome = "failed".into();
        report.message = format!("finishing the promotion of {}: {e}", st.primary);
        return report;
    }
    report.not_repointed = repoint_all(proxy, &st.primary, &st.replicas).await;
    st.promoting = false;
    if let Err(e) = proxy.failover.save_shard(st) {
        report.outcome = "failed".into();
        report.message = format!("cannot save state: {e}");
        return report;
    }
    proxy.failover.publish(proxy);
    report.outcome = "promoted".into();
    report.promote_ms = started.elapsed().as_millis() as u64;
    report
}

/// Records `target` as the primary and the old one as fenced, promotes
/// `target`, repoints the other replicas and publishes the new epoch.
async fn promote_to(
    proxy: &Arc<Proxy>,
    topology: &Topology,
    shard: &Shard,
    target: &str,
    decided: Instant,
    report: &mut Report,
) {
    let old = shard.primary.to_string();
    report.new_primary = target.to_owned();
    let mut st = proxy.failover.shard_state(topology, &shard.name);
    st.primary = target.to_owned();
    st.replicas.retain(|a| a != target);
    if !st.fenced.contains(&old) {
        st.fenced.push(old.clone());
    }
    st.promoting = true;
    if let Err(e) = proxy.failover.save_shard(st.clone()) {
        report.outcome = "failed".into();
        report.message = format!("cannot save the decision, not promoting: {e}");
        return;
    }
    // Nothing goes to the old primary from here on.
    proxy.pools.retire(&old);
    let timeout = proxy.config.load().failover.promote_timeout;
    if let Err(e) = promote(proxy, target, timeout).await {
        // The saved state still says `promoting`: the next probe round
        // tries again.
        report.outcome = "failed".into();
        report.message = format!("promoting {target}: {e}");
        return;
    }
    report.not_repointed = repoint_all(proxy, target, &st.replicas).await;
    st.promoting = false;
    let replicas = st.replicas.clone();
    if let Err(e) = proxy.failover.save_shard(st) {
        report.outcome = "failed".into();
        report.message = format!("promoted {target} but cannot save state: {e}");
        return;
    }
    let epoch = proxy.failover.publish(proxy);
    report.promote_ms = decided.elapsed().as_millis() as u64;
    report.outcome = "promoted".into();
    report.message = format!("topology epoch {epoch}");
    let repointed: Vec<String> = replicas
        .into_iter()
        .filter(|r| !report.not_repointed.contains(r))
        .collect();
    tokio::spawn(check_following(
        proxy.clone(),
        shard.name.clone(),
        target.to_owned(),
        repointed,
    ));
}

/// How long a repointed replica has to start streaming from the new
/// primary (a walreceiver that lost its primary retries every
/// `wal_retrieve_retry_interval`, 5 s by default).
const FOLLOW_WITHIN: Duration = Duration::from_secs(10);

/// Repointed replicas must be seen streaming from the new primary; one
/// that cannot follow (it had WAL the new primary lacks) is logged and
/// added to the shard's report: it needs a rejoin.
async fn check_following(
    proxy: Arc<Proxy>,
    shard: String,
    primary: String,
    mut waiting: Vec<String>,
) {
    let since = Instant::now();
    // The report this completes is recorded when promote_to returns.
    tokio::time::sleep(Duration::from_millis(200)).await;
    while !waiting.is_empty() && since.elapsed() < FOLLOW_WITHIN {
        tokio::time::sleep(Duration::from_millis(100)).await;
        waiting.retain(|r| {
            !proxy
                .health
                .server(&r.as_str().into())
                .streamed_from()
                .is_some_and(|(from, at)| {
                    crate::health::same_server(&from, &primary) && at >= since
                })
        });
    }
    for r in &waiting {
        tracing::error!(replica = %r, new_primary = %primary, "replica is not streaming from the new primary; rejoin it (shardgate admin rejoin)");
    }
    proxy.failover.not_following(&shard, &primary, waiting);
}

/// `pg_promote(wait => true)` on `addr`; a server already out of recovery
/// counts as promoted.
async fn promote(proxy: &Proxy, addr: &str, timeout: Duration) -> Result<(), String> {
    let connect = proxy.config.load().health.probe_timeout;
    let mut c = admin_conn(proxy, addr, connect).await?;
    let rows = query(&mut c, "SELECT pg_is_in_recovery()::text").await?;
    if first(&rows).as_deref() == Some("false") {
        return Ok(());
    }
    let sql = format!(
        "SELECT pg_promote(true, {})::text",
        timeout.as_secs().clamp(1, i32::MAX as u64)
    );
    let rows = tokio::time::timeout(timeout + Duration::from_secs(1), query(&mut c, &sql))
        .await
        .map_err(|_| "pg_promote did not return in time".to_string())??;
    match first(&rows).as_deref() {
        Some("true") => Ok(()),
        _ => Err("pg_promote returned false (promotion not finished in time)".into()),
    }
}

/// Points every replica in `replicas` at `primary`; returns those that
/// could not be repointed.
async fn repoint_all(proxy: &Proxy, primary: &str, replicas: &[String]) -> Vec<String> {
    let mut failed = Vec::new();
    for r in replicas {
        if let Err(e) = repoint(proxy, r, primary).await {
            tracing::error!(replica = %r, new_primary = primary, error = %e, "could not repoint replica");
            failed.push(r.clone());
        }
    }
    failed
}

/// `primary_conninfo` of `replica` pointed at `primary` (its physical slot
/// created there first), then a configuration reload: the walreceiver
/// reconnects and follows the new timeline.
async fn repoint(proxy: &Proxy, replica: &str, primary: &str) -> Result<(), String> {
    let timeout = proxy.config.load().health.probe_timeout;
    let mut c = admin_conn(proxy, replica, timeout).await?;
    let rows = query(
        &mut c,
        "SELECT current_setting('primary_conninfo'), current_setting('primary_slot_name')",
    )
    .await?;
    let row = rows.into_iter().next().unwrap_or_default();
    let info = row.first().cloned().flatten().unwrap_or_default();
    let slot = row.get(1).cloned().flatten().unwrap_or_default();
    let new_info = conninfo::repoint(&info, primary)
        .ok_or_else(|| format!("cannot parse primary_conninfo {info:?}"))?;
    if !slot.is_empty() {
        let mut p = admin_conn(proxy, primary, timeout).await?;
        query(
            &mut p,
            &format!(
                "SELECT pg_create_physical_replication_slot({0}, true) \
                 WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = {0})",
                quote(&slot)
            ),
        )
        .await?;
    }
    query(
        &mut c,
        &format!("ALTER SYSTEM SET primary_conninfo = {}", quote(&new_info)),
    )
    .await?;
    query(&mut c, "SELECT pg_reload_conf()").await?;
    tracing::info!(replica, new_primary = primary, "replica repointed");
    Ok(())
}

/// A replica must have been seen streaming from the primary this long
/// before the primary's first failed probe (or the switchover) at the
/// latest: one that had stopped following it (a broken connection, a
/// timeline it could not follow) lacks an unknown amount of data.
const STREAMING_GRACE: Duration = Duration::from_secs(2);

/// The replicas of `shard` as promotion candidates, best first.
pub(super) async fn survey(
    proxy: &Proxy,
    shard: &Shard,
    sync: &SyncReplication,
    since: Instant,
    timeout: Duration,
) -> Vec<Candidate> {
    let config = proxy.config.load();
    let zone = config.proxy.zone.clone();
    let mut found: Vec<Candidate> = Vec::new();
    let lookups = shard.replicas.iter().map(|r| async {
        let mut c = Candidate {
            addr: r.addr.to_string(),
            priority: r.priority,
            same_zone: zone.is_some() && r.zone.as_deref() == zone.as_deref(),
            ..Candidate::default()
        };
        let row = async {
            let mut conn = admin_conn(proxy, &r.addr, timeout).await?;
            let rows = query(
                &mut conn,
                "SELECT pg_is_in_recovery()::text, \
                 COALESCE(pg_last_wal_receive_lsn(), '0/0')::text, \
                 COALESCE(pg_last_wal_replay_lsn(), '0/0')::text, \
                 current_setting('cluster_name'), current_setting('primary_conninfo')",
            )
            .await?;
            Ok::<_, String>(rows.into_iter().next().unwrap_or_default())
        };
        match tokio::time::timeout(timeout, row).await {
            Ok(Ok(row)) => {
                let text = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
                let lsn = |i: usize| parse_lsn(&text(i)).unwrap_or(0);
                c.lsn = lsn(1).max(lsn(2));
                c.name = conninfo::get(&text(4), "application_name")
                    .filter(|n| !n.is_empty())
                    .or_else(|| Some(text(3)).filter(|n| !n.is_empty()))
                    .unwrap_or_else(|| "walreceiver".into());
                if text(0) != "true" {
                    c.excluded = "not in recovery".into();
                }
            }
            Ok(Err(e)) => c.excluded = format!("unreachable: {e}"),
            Err(_) => c.excluded = "unreachable: timed out".into(),
        }
        c
    });
    found.extend(futures::future::join_all(lookups).await);
    let best_lsn = found
        .iter()
        .filter(|c| c.excluded.is_empty())
        .map(|c| c.lsn)
        .max()
        .unwrap_or(0);
    for c in &mut found {
        if !c.excluded.is_empty() {
            continue;
        }
        let streamed = proxy.health.server(&c.addr.as_str().into()).streamed_from();
        let following = streamed.as_ref().is_some_and(|(from, at)| {
            crate::health::same_server(from, &shard.primary) && *at + STREAMING_GRACE >= since
        });
        if !following {
            c.excluded = match streamed {
                Some((from, at)) => format!(
                    "not following the primary: last seen streaming from {from} {} ms before it failed",
                    since.saturating_duration_since(at).as_millis()
                ),
                None => "never seen streaming from the primary".into(),
            };
        } else if c.priority == 0 {
            c.excluded = "priority 0".into();
        } else if !sync.standby_names.trim().is_empty() && !sync.sync_standbys.contains(&c.name) {
            c.excluded = format!(
                "not a synchronous standby (name {:?}; synchronous: {:?})",
                c.name, sync.sync_standbys
            );
        } else if config
            .failover
            .max_lag_bytes
            .is_some_and(|max| best_lsn - c.lsn > max)
        {
            c.excluded = format!(
                "{} bytes behind the most advanced replica",
                best_lsn - c.lsn
            );
        }
        c.eligible = c.excluded.is_empty();
    }
    found.sort_by(|a, b| {
        b.eligible
            .cmp(&a.eligible)
            .then(b.lsn.cmp(&a.lsn))
            .then(b.priority.cmp(&a.priority))
            .then(b.same_zone.cmp(&a.same_zone))
            .then(a.addr.cmp(&b.addr))
    });
    found
}

/// Makes a fenced server that runs as a primary refuse writes: new
/// transactions default to read-only and existing client sessions are
/// ended.
pub(super) async fn make_read_only(proxy: &Proxy, addr: &str) -> Result<(), String> {
    let timeout = proxy.config.load().health.probe_timeout;
    let mut c = admin_conn(proxy, addr, timeout).await?;
    query(
        &mut c,
        "ALTER SYSTEM SET default_transaction_read_only = on",
    )
    .await?;
    query(&mut c, "SELECT pg_reload_conf()").await?;
    query(
        &mut c,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
    )
    .await?;
    tracing::warn!(server = addr, "fenced server made read-only");
    Ok(())
}

/// Planned switchover of `shard` to `to` (or the best replica): hold new
/// writes, let running transactions finish, stop writes at the old
/// primary, wait until the target has replayed everything, shut the old
/// primary down cleanly, promote the target, repoint the rest, publish,
/// release.
pub(super) async fn switchover(
    proxy: &Arc<Proxy>,
    shard: &str,
    to: Option<&str>,
) -> Result<Report, String> {
    let topology = proxy.topology.load();
    let s = topology
        .shards
        .iter()
        .find(|s| s.name == shard)
        .ok_or_else(|| format!("no shard named {shard:?}"))?;
    // Planned: no hurry to rule out a replica that is slow to answer.
    let timeout = proxy
        .config
        .load()
        .health
        .probe_timeout
        .max(Duration::from_secs(5));
    let candidates = survey(
        proxy,
        s,
        &SyncReplication::default(),
        Instant::now(),
        timeout,
    )
    .await;
    let target = match to {
        Some(addr) => candidates
            .iter()
            .find(|c| c.addr == addr)
            .ok_or_else(|| format!("{addr} is not a replica of shard {shard:?}"))?,
        None => candidates.iter().find(|c| c.eligible).ok_or_else(|| {
            let why: Vec<String> = candidates
                .iter()
                .map(|c| format!("{}: {}", c.addr, c.excluded))
                .collect();
            format!(
                "shard {shard:?} has no replica that may be promoted ({})",
                why.join("; ")
            )
        })?,
    };
    if !target.excluded.is_empty() && target.excluded != "priority 0" {
        return Err(format!(
            "{} cannot be promoted: {}",
            target.addr, target.excluded
        ));
    }
    let target = target.clone();
    let old = s.primary.to_string();
    let hold_time = proxy.config.load().failover.hold_time;
    let mut report = Report {
        shard: shard.to_owned(),
        kind: "switchover".into(),
        old_primary: old.clone(),
        candidates: candidates.clone(),
        ..Report::default()
    };
    let paused = Instant::now();
    let deadline = paused + hold_time / 2;
    proxy.failover.hold(shard, true);
    // Transactions already running on the old primary finish first.
    while proxy.pools.in_use(&old) > 0 {
        if Instant::now() >= deadline {
            return Err(format!(
                "{} transaction(s) still running on the primary after {:?}; nothing was changed",
                proxy.pools.in_use(&old),
                hold_time / 2
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let timeout = proxy.config.load().health.probe_timeout;
    let mut c = admin_conn(proxy, &old, timeout).await?;
    query(
        &mut c,
        "ALTER SYSTEM SET default_transaction_read_only = on",
    )
    .await?;
    query(&mut c, "SELECT pg_reload_conf()").await?;
    crate::lock(&proxy.failover.read_only_done).insert(old.as_str().into());
    let undo = |mut c: crate::backend::conn::ServerConn| async move {
        let _ = query(&mut c, "ALTER SYSTEM RESET default_transaction_read_only").await;
        let _ = query(&mut c, "SELECT pg_reload_conf()").await;
    };
    let lsn = match query(&mut c, "SELECT pg_current_wal_insert_lsn()::text").await {
        Ok(rows) => first(&rows).and_then(|l| parse_lsn(&l)).unwrap_or(u64::MAX),
        Err(e) => {
            undo(c).await;
            return Err(e);
        }
    };
    // Wait until the target has replayed everything the old primary wrote.
    let mut t = admin_conn(proxy, &target.addr, timeout).await?;
    loop {
        let rows = query(
            &mut t,
            "SELECT COALESCE(pg_last_wal_replay_lsn(), '0/0')::text",
        )
        .await?;
        if first(&rows).and_then(|l| parse_lsn(&l)).unwrap_or(0) >= lsn {
            break;
        }
        if Instant::now() >= paused + hold_time {
            undo(c).await;
            crate::lock(&proxy.failover.read_only_done).remove(old.as_str());
            return Err(format!(
                "{} did not replay up to {} within {hold_time:?}; nothing was changed",
                target.addr,
                crate::health::format_lsn(lsn)
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // A clean (fast) shutdown of the old primary: its walsenders send
    // everything up to the shutdown checkpoint before they exit, so no
    // replica ends up ahead of the target (one that was could not follow
    // the new timeline), and the old primary can rejoin without losing
    // anything.
    if let Err(e) = super::signal_postmaster(proxy, &old, "INT").await {
        undo(c).await;
        crate::lock(&proxy.failover.read_only_done).remove(old.as_str());
        return Err(format!("cannot shut down {old}: {e}; nothing was changed"));
    }
    drop(c);
    let others: Vec<String> = s
        .replicas
        .iter()
        .map(|r| r.addr.to_string())
        .filter(|a| *a != target.addr)
        .collect();
    // Settled when the old primary is gone and no replica streams from it
    // any more: its walsenders exit only after their standbys confirmed the
    // shutdown checkpoint, so every replica then has all of its WAL (a
    // refused connection alone is not enough: the target could still be
    // short of the shutdown checkpoint, and a replica that got it would be
    // ahead of the new timeline and unable to follow).
    let settle = Instant::now() + hold_time / 2;
    loop {
        let down = admin_conn(proxy, &old, timeout).await.is_err();
        let target_at = wal_position(proxy, &target.addr, timeout).await;
        let mut ahead = false;
        let mut streaming = target_at.is_some_and(|w| w.streaming);
        for o in &others {
            if let Some(w) = wal_position(proxy, o, timeout).await {
                streaming |= w.streaming;
                ahead |= target_at.is_some_and(|t| w.received > t.received);
            }
        }
        let caught_up = target_at.is_some_and(|w| w.replayed >= w.received);
        if down && !streaming && caught_up && !ahead {
            break;
        }
        if Instant::now() >= settle {
            tracing::warn!(old = %old, target = %target.addr, down, streaming, caught_up, ahead, "switchover: promoting before the old primary's shutdown was seen to settle");
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report.detect_ms = paused.elapsed().as_millis() as u64;
    let decided = Instant::now();
    promote_to(proxy, &topology, s, &target.addr, decided, &mut report).await;
    report.pause_ms = paused.elapsed().as_millis() as u64;
    if report.outcome != "promoted" {
        return Err(report.message);
    }
    Ok(report)
}

#[derive(Clone, Copy)]
struct WalPosition {
    received: u64,
    replayed: u64,
    /// Its WAL receiver is connected and streaming.
    streaming: bool,
}

/// A replica's WAL positions; None if unreachable.
async fn wal_position(proxy: &Proxy, addr: &str, timeout: Duration) -> Option<WalPosition> {
    let mut c = admin_conn(proxy, addr, timeout).await.ok()?;
    let rows = query(
        &mut c,
        "SELECT COALESCE(pg_last_wal_receive_lsn(), '0/0')::text, \
         COALESCE(pg_last_wal_replay_lsn(), '0/0')::text, \
         EXISTS (SELECT 1 FROM pg_stat_wal_receiver WHERE status = 'streaming')::text",
    )
    .await
    .ok()?;
    let row = rows.into_iter().next()?;
    let lsn = |i: usize| row.get(i).cloned().flatten().and_then(|l| parse_lsn(&l));
    Some(WalPosition {
        received: lsn(0)?,
        replayed: lsn(1)?,
        streaming: row.get(2).cloned().flatten().as_deref() == Some("true"),
    })
}
