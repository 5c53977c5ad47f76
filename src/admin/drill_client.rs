//! The client side of `shardgate admin drill failover`: a built-in write
//! load through the proxy, the fault, and the report.

use super::cli::load::{self, ClientLedger};
use super::cli::DrillReport;
use super::pb;
use anyhow::{bail, Context, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cli::Client;

/// Load runs this long before the fault, and this long after the new
/// primary appears.
const WARMUP: Duration = Duration::from_secs(2);
const AFTER: Duration = Duration::from_secs(3);

fn primary_of(s: &pb::StatusReply, shard: &str) -> Option<String> {
    s.shards
        .iter()
        .find(|x| x.name == shard)?
        .servers
        .iter()
        .find(|x| x.role == "primary")
        .map(|x| x.addr.clone())
}

pub async fn failover(
    c: &mut Client,
    shard: &str,
    mode: &str,
    url: &str,
    clients: usize,
) -> Result<DrillReport> {
    if !matches!(mode, "kill" | "stop" | "switchover") {
        bail!("--mode must be kill, stop or switchover");
    }
    let before = c.status(pb::StatusRequest {}).await?.into_inner();
    let old = primary_of(&before, shard).with_context(|| format!("no shard named {shard:?}"))?;
    let hint = format!("/* shardgate: shard={shard} */ ");
    let (setup, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .context("connecting to the proxy for the drill's load")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    setup
        .batch_execute(&format!(
            "{hint}DROP TABLE IF EXISTS shardgate_drill_ledger; \
             CREATE TABLE shardgate_drill_ledger (id bigint PRIMARY KEY, client int NOT NULL, at timestamptz NOT NULL DEFAULT now())"
        ))
        .await
        .context("creating the drill ledger table through the proxy")?;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..clients)
        .map(|i| {
            tokio::spawn(load::writer(
                url.to_owned(),
                hint.clone(),
                i as i64 + 1,
                stop.clone(),
            ))
        })
        .collect();
    tokio::time::sleep(WARMUP).await;
    let fault_at = Instant::now();
    let mut pause_ms = 0;
    match mode {
        "switchover" => {
            let r = c
                .switchover(pb::SwitchoverRequest {
                    shard: shard.into(),
                    to: String::new(),
                })
                .await;
            match r {
                Ok(r) => pause_ms = r.into_inner().pause_ms,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    bail!("switchover refused: {}", e.message());
                }
            }
        }
        _ => {
            c.inject_fault(pb::FaultRequest {
                shard: shard.into(),
                mode: mode.into(),
            })
            .await
            .map_err(|e| anyhow::anyhow!("fault injection refused: {}", e.message()))?;
        }
    }
    let deadline = fault_at + Duration::from_secs(60);
    loop {
        let s = c.status(pb::StatusRequest {}).await?.into_inner();
        if primary_of(&s, shard).is_some_and(|p| p != old) {
            break;
        }
        if Instant::now() > deadline {
            stop.store(true, Ordering::Relaxed);
            bail!("no new primary for shard {shard} within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(AFTER).await;
    stop.store(true, Ordering::Relaxed);
    // The failover's report is recorded just after the new primary is
    // published, and its list of replicas that do not follow the new
    // primary once that check has ended (within about 10 s).
    let checked_by = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let s = c.status(pb::StatusRequest {}).await?.into_inner();
        let done = s
            .last_failovers
            .iter()
            .any(|r| r.shard == shard && r.new_primary != old && r.follow_checked);
        if done || Instant::now() > checked_by {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut ledgers: Vec<ClientLedger> = Vec::new();
    for w in writers {
        ledgers.push(w.await??);
    }
    // Everything acknowledged must be there, read back through the proxy
    // from the new primary.
    // From the primary: a replica may lag behind the last writes.
    setup
        .batch_execute("SET shardgate.target = primary")
        .await
        .context("routing the read-back to the primary")?;
    let rows = setup
        .query(&format!("{hint}SELECT id FROM shardgate_drill_ledger"), &[])
        .await
        .context("reading the ledger back")?;
    let present: std::collections::BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let acked = load::ids(&ledgers);
    let missing = acked.difference(&present).count();
    let mut gaps: Vec<u64> = ledgers
        .iter()
        .map(|l| {
            // The longest wait for an acknowledgement that ends after the
            // fault (the gap from the last write before it counts).
            let mut prev: Option<Instant> = None;
            let mut worst = Duration::ZERO;
            for &(_, t) in &l.acked {
                if let Some(p) = prev.filter(|_| t >= fault_at) {
                    worst = worst.max(t - p);
                }
                prev = Some(t);
            }
            worst.as_millis() as u64
        })
        .collect();
    gaps.sort_unstable();
    let mut errors = std::collections::BTreeMap::new();
    for l in &ledgers {
        for (k, v) in &l.errors {
            *errors.entry(k.clone()).or_default() += v;
        }
    }
    let report = status
        .last_failovers
        .iter()
        .find(|r| r.shard == shard)
        .cloned()
        .unwrap_or_default();
    Ok(DrillReport {
        shard: shard.into(),
        mode: mode.into(),
        old_primary: old,
        new_primary: primary_of(&status, shard).unwrap_or_default(),
        detect_ms: report.detect_ms,
        promote_ms: report.promote_ms,
        pause_ms,
        write_gap_p50_ms: gaps.get(gaps.len() / 2).copied().unwrap_or(0),
        write_gap_max_ms: gaps.last().copied().unwrap_or(0),
        acknowledged: acked.len(),
        errors,
        missing_acknowledged: missing,
        not_repointed: report.not_repointed,
    })
}
