//! The server side of failover drills: making a primary fail for real.

use super::pb;
use crate::proxy::Proxy;
use std::time::SystemTime;

/// Sends SIGKILL (`kill`) or SIGQUIT (`stop`: an immediate shutdown, as
/// `pg_ctl stop -m immediate`) to the postmaster of `shard`'s primary
/// ([`crate::failover::signal_postmaster`]).
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
    let addr = proxy
        .topology
        .load()
        .shards
        .iter()
        .find(|s| s.name == shard)
        .ok_or_else(|| format!("no shard named {shard:?}"))?
        .primary
        .to_string();
    let at_unix_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let pid = crate::failover::signal_postmaster(proxy, &addr, signal).await?;
    tracing::warn!(shard, server = %addr, pid, mode, "drill: failed the primary");
    Ok(pb::FaultReply {
        server: addr,
        at_unix_ms,
    })
}
