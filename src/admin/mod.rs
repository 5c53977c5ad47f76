//! The admin API: a gRPC service (proto/admin.proto, served with tonic) on
//! `[admin] listen`, every call authorised by `[admin] token`. The
//! `shardgate admin` CLI ([`cli`]) is its client and reaches into nothing
//! else.

pub mod cli;
mod drill;
mod drill_client;
pub mod hotspots;
mod hotspots_cli;
mod reshard_cli;

use crate::failover::{Failover, Report};
use crate::proxy::Proxy;
use crate::reshard::{Phase, Reshard};
use std::sync::Arc;
use tonic::{Request, Response, Status};

pub mod pb {
    tonic::include_proto!("shardgate.admin.v1");
}

use pb::admin_server::{Admin, AdminServer};

struct Service {
    proxy: Arc<Proxy>,
}

/// Serves the API on `listener` until the proxy shuts down.
pub async fn serve(proxy: Arc<Proxy>, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
    let token = proxy
        .config
        .load()
        .admin
        .token
        .clone()
        .ok_or_else(|| anyhow::anyhow!("admin.token is not set"))?;
    let check = CheckToken(sha(&format!("Bearer {token}")));
    let shutdown = proxy.shutdown.clone();
    let incoming = tonic::transport::server::TcpIncoming::from_listener(listener, true, None)
        .map_err(|e| anyhow::anyhow!("admin listener: {e}"))?;
    tonic::transport::Server::builder()
        .add_service(AdminServer::with_interceptor(Service { proxy }, check))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Refuses calls without the token.
#[derive(Clone)]
struct CheckToken([u8; 32]);

impl tonic::service::Interceptor for CheckToken {
    // The signature is tonic's.
    #[allow(clippy::result_large_err)]
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // Digests compared, so the time taken says nothing of the token.
        if sha(given) == self.0 {
            Ok(req)
        } else {
            Err(Status::unauthenticated("a valid admin token is required"))
        }
    }
}

fn sha(s: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).into()
}

fn report_pb(r: Report) -> pb::FailoverReport {
    pb::FailoverReport {
        shard: r.shard,
        kind: r.kind,
        outcome: r.outcome,
        old_primary: r.old_primary,
        new_primary: r.new_primary,
        detect_ms: r.detect_ms,
        promote_ms: r.promote_ms,
        pause_ms: r.pause_ms,
        candidates: r
            .candidates
            .into_iter()
            .map(|c| pb::Candidate {
                addr: c.addr,
                lsn: c.lsn,
                name: c.name,
                priority: c.priority,
                eligible: c.eligible,
                excluded: c.excluded,
            })
            .collect(),
        not_repointed: r.not_repointed,
        message: r.message,
        at_unix_ms: r.at_unix_ms,
        follow_checked: r.follow_checked,
    }
}

#[tonic::async_trait]
impl Admin for Service {
    async fn status(
        &self,
        _: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        let p = &self.proxy;
        let t = p.topology.load();
        let server = |addr: &Arc<str>, role: &str| {
            let h = p.health.server(addr);
            let streamed = h.streamed_from();
            pb::ServerStatus {
                addr: addr.to_string(),
                role: role.into(),
                up: h.is_up(),
                in_recovery: h.in_recovery(),
                lsn: h.lsn(),
                lag_bytes: if role == "replica" { h.lag_bytes() } else { 0 },
                lag_seconds: if role == "replica" {
                    h.lag().as_secs_f64().min(1e9)
                } else {
                    0.0
                },
                reason: h.reason().into(),
                streaming_from: streamed
                    .as_ref()
                    .map(|(f, _)| f.clone())
                    .unwrap_or_default(),
                streamed_ms_ago: streamed
                    .map(|(_, at)| at.elapsed().as_millis() as u64)
                    .unwrap_or(0),
            }
        };
        let owned = t.map.as_ref().map(|m| m.owner.clone());
        let shards = t
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| pb::ShardStatus {
                name: s.name.clone(),
                servers: std::iter::once(server(&s.primary, "primary"))
                    .chain(s.replicas.iter().map(|r| server(&r.addr, "replica")))
                    .collect(),
                buckets: owned
                    .as_ref()
                    .map_or(0, |o| o.iter().filter(|&&b| b as usize == i).count() as u32),
                writes_held: p.failover.is_held(&s.name),
            })
            .collect();
        let split = p.failover.split_brain();
        let fenced = t
            .fenced
            .iter()
            .map(|f| {
                let h = p.health.server(&f.addr);
                pb::FencedServer {
                    shard: f.shard.clone(),
                    addr: f.addr.to_string(),
                    running_as_primary: split.contains(&f.addr),
                    up: h.is_up(),
                    in_recovery: h.in_recovery(),
                }
            })
            .collect();
        let mut reports = p.failover.reports();
        reports.sort_by(|a, b| a.shard.cmp(&b.shard));
        Ok(Response::new(pb::StatusReply {
            epoch: t.epoch,
            shards,
            fenced,
            last_failovers: reports.into_iter().map(report_pb).collect(),
        }))
    }

    async fn switchover(
        &self,
        req: Request<pb::SwitchoverRequest>,
    ) -> Result<Response<pb::FailoverReport>, Status> {
        let r = req.into_inner();
        let to = Some(r.to.as_str()).filter(|t| !t.is_empty());
        Failover::switchover(&self.proxy, &r.shard, to)
            .await
            .map(|r| Response::new(report_pb(r)))
            .map_err(Status::failed_precondition)
    }

    async fn rejoin(
        &self,
        req: Request<pb::RejoinRequest>,
    ) -> Result<Response<pb::RejoinReply>, Status> {
        let r = req.into_inner();
        self.proxy
            .failover
            .rejoin(&self.proxy, &r.server)
            .map(|(shard, epoch)| Response::new(pb::RejoinReply { shard, epoch }))
            .map_err(Status::failed_precondition)
    }

    async fn inject_fault(
        &self,
        req: Request<pb::FaultRequest>,
    ) -> Result<Response<pb::FaultReply>, Status> {
        let r = req.into_inner();
        drill::inject_fault(&self.proxy, &r.shard, &r.mode)
            .await
            .map(Response::new)
            .map_err(Status::failed_precondition)
    }

    async fn reshard_plan(
        &self,
        req: Request<pb::ReshardMoveRequest>,
    ) -> Result<Response<pb::ReshardPlanReply>, Status> {
        let r = req.into_inner();
        let moves = Reshard::plan(
            &self.proxy,
            &r.buckets,
            &r.to,
            &database(&self.proxy, &r.database),
        )
        .await
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::ReshardPlanReply {
            moves: moves.into_iter().map(planned_pb).collect(),
        }))
    }

    async fn balance(
        &self,
        req: Request<pb::BalanceRequest>,
    ) -> Result<Response<pb::BalanceReply>, Status> {
        hotspots::balance(&self.proxy, req.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::failed_precondition)
    }

    async fn hotspots(
        &self,
        req: Request<pb::HotspotsRequest>,
    ) -> Result<Response<pb::HotspotsReply>, Status> {
        hotspots::hotspots(&self.proxy, req.into_inner())
            .map(Response::new)
            .map_err(Status::failed_precondition)
    }

    async fn rebalance(
        &self,
        req: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::RebalanceReply>, Status> {
        hotspots::rebalance(&self.proxy, req.into_inner())
            .await
            .map(Response::new)
            .map_err(Status::failed_precondition)
    }

    async fn reshard_move(
        &self,
        req: Request<pb::ReshardMoveRequest>,
    ) -> Result<Response<pb::ReshardMoveReply>, Status> {
        let r = req.into_inner();
        Reshard::start(
            &self.proxy,
            &r.buckets,
            &r.to,
            &database(&self.proxy, &r.database),
        )
        .map(|ids| Response::new(pb::ReshardMoveReply { ids }))
        .map_err(Status::failed_precondition)
    }

    async fn reshard_status(
        &self,
        _: Request<pb::ReshardStatusRequest>,
    ) -> Result<Response<pb::ReshardStatusReply>, Status> {
        let moves = self
            .proxy
            .failover
            .state()
            .moves
            .into_iter()
            .map(|m| {
                let live = self
                    .proxy
                    .reshard
                    .progress(m.id)
                    .filter(|_| m.phase.active());
                let p = live.unwrap_or_default();
                let rows_copied = match m.phase {
                    Phase::Preparing => 0,
                    Phase::Copying => p.rows_copied,
                    _ => m.rows_total,
                };
                let eta = if m.phase == Phase::Copying && p.rows_per_second > 0.0 {
                    m.rows_total.saturating_sub(rows_copied) as f64 / p.rows_per_second
                } else {
                    0.0
                };
                pb::MoveStatus {
                    id: m.id,
                    from: m.from,
                    to: m.to,
                    buckets: m.buckets,
                    database: m.database,
                    phase: m.phase.name().into(),
                    message: m.message,
                    rows_total: m.rows_total,
                    rows_copied,
                    tables_ready: p.tables_ready,
                    tables_total: p.tables_total,
                    lag_bytes: p.lag_bytes,
                    rows_per_second: p.rows_per_second,
                    eta_seconds: eta,
                    pause_ms: m.pause_ms,
                    cutover_attempts: m.cutover_attempts,
                    started_unix_ms: m.started_unix_ms,
                    switched_unix_ms: m.switched_unix_ms,
                    finished_unix_ms: m.finished_unix_ms,
                    bytes_total: m.bytes_total,
                    copy_started_unix_ms: m.copy_started_unix_ms,
                    copied_unix_ms: m.copied_unix_ms,
                    back_pause_ms: m.back_pause_ms,
                    bytes_copied: m.bytes_copied,
                }
            })
            .collect();
        Ok(Response::new(pb::ReshardStatusReply { moves }))
    }

    async fn reshard_add_shard(
        &self,
        req: Request<pb::AddShardRequest>,
    ) -> Result<Response<pb::AddShardReply>, Status> {
        let r = req.into_inner();
        let (plan, ids) = Reshard::add_shard(
            &self.proxy,
            &r.name,
            &r.primary,
            &r.replicas,
            &database(&self.proxy, &r.database),
            r.dry_run,
        )
        .await
        .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::AddShardReply {
            moves: plan.into_iter().map(planned_pb).collect(),
            ids,
        }))
    }

    async fn reshard_abort(
        &self,
        _: Request<pb::ReshardAbortRequest>,
    ) -> Result<Response<pb::ReshardMoveReply>, Status> {
        Reshard::abort(&self.proxy)
            .map(|ids| Response::new(pb::ReshardMoveReply { ids }))
            .map_err(Status::failed_precondition)
    }
}

fn planned_pb(m: crate::reshard::PlannedMove) -> pb::PlannedMove {
    pb::PlannedMove {
        from: m.from,
        to: m.to,
        buckets: m.buckets,
        tables: m
            .tables
            .into_iter()
            .map(|t| pb::PlannedTable {
                table: t.table,
                rows: t.rows,
                bytes: t.bytes,
            })
            .collect(),
    }
}

/// The database of a move: as given, else the first user's.
pub(crate) fn database(proxy: &crate::proxy::Proxy, given: &str) -> String {
    if !given.is_empty() {
        return given.to_owned();
    }
    proxy
        .config
        .load()
        .users
        .first()
        .map(|u| u.name.clone())
        .unwrap_or_else(|| "postgres".into())
}
