//! The admin API's load views: balance, hotspots and rebalance
//! (docs/hotspots.md). The numbers come from [`crate::hotspot`]; table
//! sizes from each shard's primary, cached for a minute.

use super::pb;
use crate::backend::conn::ConnectParams;
use crate::backend::ServerConn;
use crate::hotspot::plan;
use crate::hotspot::report::{self, By, HotRules};
use crate::proxy::Proxy;
use crate::reshard::Reshard;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Sizes of the sharded tables per shard: (rows, bytes), -1 unknown.
type Sizes = Vec<(i64, i64)>;

const SIZES_FOR: Duration = Duration::from_secs(60);

fn names(proxy: &Proxy) -> Vec<String> {
    proxy
        .topology
        .load()
        .shards
        .iter()
        .map(|s| s.name.clone())
        .collect()
}

fn map(proxy: &Proxy) -> Result<Arc<crate::sharding::map::ShardMap>, String> {
    proxy.topology.load().map.clone().ok_or_else(|| {
        "sharding is not configured ([sharding] is missing): one shard holds everything".into()
    })
}

fn bucket_rows(rows: Vec<report::BucketRow>) -> Vec<pb::BucketLoad> {
    rows.into_iter()
        .map(|b| pb::BucketLoad {
            bucket: b.bucket,
            shard: b.shard,
            qps_10m: b.qps_10m,
            load: b.load,
            share: b.share,
        })
        .collect()
}

pub async fn balance(
    proxy: &Arc<Proxy>,
    r: pb::BalanceRequest,
) -> Result<pb::BalanceReply, String> {
    let by =
        By::parse(&r.by).ok_or_else(|| format!("unknown --by {:?}: time or statements", r.by))?;
    let map = map(proxy)?;
    let names = names(proxy);
    let snap = proxy.hotspots.snapshot();
    let (rows, skew) = report::balance(&snap, &map, &names, by);
    let sizes = sizes(proxy, &map, &super::database(proxy, &r.database)).await;
    let shards = rows
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let (rows, bytes) = sizes.get(i).copied().unwrap_or((-1, -1));
            pb::ShardLoad {
                shard: s.name,
                buckets: s.buckets,
                statements: s.statements,
                qps_1m: s.qps_1m,
                qps_10m: s.qps_10m,
                time_share: s.time_share,
                load: s.load,
                deviation: s.deviation,
                rows,
                bytes,
            }
        })
        .collect();
    Ok(pb::BalanceReply {
        shards,
        skew,
        by: by_name(by).into(),
        buckets: bucket_rows(report::heavy_buckets(
            &snap,
            &map,
            &names,
            by,
            r.buckets as usize,
        )),
        window_seconds: crate::hotspot::window_seconds(snap.now_s, true),
    })
}

pub fn hotspots(proxy: &Arc<Proxy>, r: pb::HotspotsRequest) -> Result<pb::HotspotsReply, String> {
    let map = map(proxy)?;
    let topology = proxy.topology.load();
    let names = names(proxy);
    let replicas: Vec<usize> = topology.shards.iter().map(|s| s.replicas.len()).collect();
    let config = proxy.config.load();
    let rules = HotRules::from_config(&config.hotspots);
    let limit = if r.limit == 0 { 10 } else { r.limit as usize };
    let snap = proxy.hotspots.snapshot();
    let keys = report::hot_keys(&snap, &map, &names, &replicas, &rules, limit)
        .into_iter()
        .map(|k| pb::HotKey {
            table: k.table,
            key: k.key,
            bucket: k.bucket,
            shard: k.shard,
            count: k.count,
            error: k.error,
            share: k.share,
            hot: k.hot,
            reason: k.reason,
            suggestions: k.suggestions,
        })
        .collect();
    Ok(pb::HotspotsReply {
        keys,
        buckets: bucket_rows(report::heavy_buckets(
            &snap,
            &map,
            &names,
            By::Statements,
            limit,
        )),
    })
}

pub async fn rebalance(
    proxy: &Arc<Proxy>,
    r: pb::RebalanceRequest,
) -> Result<pb::RebalanceReply, String> {
    let map = map(proxy)?;
    let names = names(proxy);
    let database = super::database(proxy, &r.database);
    let snap = proxy.hotspots.snapshot();
    let (by_name, fixed, buckets) = match r.by.as_str() {
        "size" => {
            // No per-bucket sizes are kept: a shard's bytes are spread
            // evenly over the buckets it owns.
            let sizes = sizes(proxy, &map, &database).await;
            if sizes.iter().any(|s| s.1 < 0) {
                return Err(
                    "the sizes of the sharded tables could not be read on every shard".into(),
                );
            }
            let owned: Vec<usize> = (0..names.len())
                .map(|s| map.owner.iter().filter(|o| **o as usize == s).count())
                .collect();
            let buckets = map
                .owner
                .iter()
                .map(|o| {
                    let s = *o as usize;
                    sizes.get(s).map_or(0.0, |x| x.1 as f64) / owned[s].max(1) as f64
                })
                .collect();
            ("size", vec![0.0; names.len()], buckets)
        }
        other => {
            let by = match other {
                "" | "load" | "time" => By::Time,
                "statements" => By::Statements,
                _ => return Err(format!("unknown --by {other:?}: load, statements or size")),
            };
            let (fixed, buckets) = report::loads(&snap, &map, names.len(), by);
            (
                if by == By::Time { "load" } else { "statements" },
                fixed,
                buckets,
            )
        }
    };
    let owner: Vec<usize> = map.owner.iter().map(|o| *o as usize).collect();
    let max_moves = if r.max_moves == 0 {
        64
    } else {
        r.max_moves as usize
    };
    let p = plan::rebalance(
        &fixed,
        &buckets,
        &owner,
        &vec![true; names.len()],
        max_moves,
    );
    let moves: Vec<pb::RebalanceMove> = p
        .steps
        .iter()
        .map(|s| pb::RebalanceMove {
            bucket: s.bucket,
            from: names[s.from].clone(),
            to: names[s.to].clone(),
            load: s.load,
        })
        .collect();
    let mut ids = Vec::new();
    if !r.dry_run && !p.steps.is_empty() {
        // One ReshardMove per receiving shard, each started when the one
        // before it has finished.
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for s in &p.steps {
            let to = names[s.to].clone();
            match groups.iter_mut().find(|g| g.0 == to) {
                Some(g) => g.1.push(s.bucket.to_string()),
                None => groups.push((to, vec![s.bucket.to_string()])),
            }
        }
        let (to, buckets) = groups.remove(0);
        ids = Reshard::start(proxy, &buckets, &to, &database)?;
        let proxy = proxy.clone();
        tokio::spawn(async move {
            for (to, buckets) in groups {
                loop {
                    if proxy.shutdown.is_cancelled() {
                        return;
                    }
                    if !proxy
                        .failover
                        .state()
                        .moves
                        .iter()
                        .any(|m| m.phase.active())
                    {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                if let Err(e) = Reshard::start(&proxy, &buckets, &to, &database) {
                    tracing::warn!(error = %e, %to, "rebalance: the next move could not start; the rest of the plan is dropped");
                    return;
                }
                tracing::info!(%to, buckets = buckets.join(","), "rebalance: next move started");
            }
        });
    }
    Ok(pb::RebalanceReply {
        moves,
        skew_before: plan::skew(&p.before),
        skew_after: plan::skew(&p.after),
        ids,
        by: by_name.into(),
    })
}

fn by_name(by: By) -> &'static str {
    match by {
        By::Time => "time",
        By::Statements => "statements",
    }
}

/// (row estimate, bytes) of the sharded tables on each shard's primary,
/// read at most once a minute per database.
async fn sizes(proxy: &Arc<Proxy>, map: &crate::sharding::map::ShardMap, database: &str) -> Sizes {
    sizes_within(proxy, map, database, SIZES_FOR).await
}

/// [`sizes`], read again when the cached ones are `max_age` old.
pub(crate) async fn sizes_within(
    proxy: &Arc<Proxy>,
    map: &crate::sharding::map::ShardMap,
    database: &str,
    max_age: Duration,
) -> Sizes {
    if let Some((at, db, s)) = crate::lock(&proxy.hotspots.table_sizes).as_ref() {
        if at.elapsed() < max_age && db == database {
            return s.clone();
        }
    }
    let tables: Vec<String> = map
        .sharded_tables()
        .into_iter()
        .map(|(_, name, _, _)| format!("'{}'", name.replace('\'', "''")))
        .collect();
    let topology = proxy.topology.load();
    let config = proxy.config.load();
    let (user, password) = config.probe_login();
    let mut out = Vec::new();
    for shard in &topology.shards {
        if tables.is_empty() {
            out.push((0, 0));
            continue;
        }
        let params = ConnectParams {
            addr: shard.primary.to_string(),
            database: database.to_owned(),
            user: user.clone(),
            password: password.clone(),
        };
        let sql = format!(
            "SELECT coalesce(sum(greatest(c.reltuples, 0))::int8, 0), coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8 \
             FROM pg_catalog.pg_class c WHERE c.relkind IN ('r', 'p') AND c.relname IN ({})",
            tables.join(", ")
        );
        let got = match ServerConn::connect(&params, config.pool.connect_timeout).await {
            Ok(mut c) => match c.query_rows(&sql).await {
                Ok(Ok(rows)) => rows.first().and_then(|r| {
                    let n = |i: usize| r.get(i)?.as_deref()?.parse::<i64>().ok();
                    Some((n(0)?, n(1)?))
                }),
                _ => None,
            },
            Err(_) => None,
        };
        out.push(got.unwrap_or((-1, -1)));
    }
    *crate::lock(&proxy.hotspots.table_sizes) =
        Some((Instant::now(), database.to_owned(), out.clone()));
    out
}
