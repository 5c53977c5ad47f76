//! The server side of failover drills: making a primary fail for real.

use super::pb;
use crate::failover::{admin_conn, query, quote};
use crate::proxy::Proxy;
use std::time::{Duration, SystemTime};

/// Sends SIGKILL (`kill`) or SIGQUIT (`stop`: an immediate shutdown, as
/// `pg_ctl stop -m immediate`) to the postmaster of `shard`'s primary. It
/// runs on the database host through `COPY ... TO PROGRAM`, so it needs the
/// superuser login the probes use; shardgate has no other way onto a
/// remote server.
pub(super) async fn inject_fault(
    proxy: &Proxy,
    shard: &str,
    mode: &str,
) -> Result<pb::FaultReply, String> {
    let signal = match mode {
        "kill" => "KILL",
        "stop" => "QUIT",
        other => return Err(format!("unknown fault mode {other:?} (kill or stop)")),
    };
    let topology = proxy.topology.load();
    let s = topology
        .shards
        .iter()
        .find(|s| s.name == shard)
        .ok_or_else(|| format!("no shard named {shard:?}"))?;
    let addr = s.primary.to_string();
    let mut c = admin_conn(proxy, &addr, Duration::from_secs(5)).await?;
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
    let at_unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    tracing::warn!(shard, server = %addr, pid, mode, "drill: failing the primary");
    // The server may die before it answers.
    let _ = query(
        &mut c,
        &format!(
            "COPY (SELECT 1) TO PROGRAM {}",
            quote(&format!("kill -{signal} {pid}"))
        ),
    )
    .await;
    Ok(pb::FaultReply {
        server: addr,
        at_unix_ms,
    })
}
