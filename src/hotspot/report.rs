//! The operator's views of the counters: shard balance, the heaviest
//! buckets and the hot keys with what would help.

use super::plan::skew;
use super::{window_seconds, Counts, Snapshot};
use crate::sharding::map::ShardMap;

/// What "load" means in a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum By {
    /// Server time (send to ReadyForQuery): what a shard spends.
    Time,
    /// Statements routed.
    Statements,
}

impl By {
    pub fn parse(s: &str) -> Option<By> {
        match s {
            "time" | "load" | "" => Some(By::Time),
            "statements" | "queries" => Some(By::Statements),
            _ => None,
        }
    }

    pub fn of(self, c: &Counts) -> f64 {
        match self {
            By::Time => c.server_us as f64,
            By::Statements => c.statements as f64,
        }
    }
}

/// One shard in `shardgate admin balance`.
#[derive(Debug, Clone, Default)]
pub struct ShardRow {
    pub name: String,
    pub buckets: u32,
    pub statements: u64,
    pub qps_1m: f64,
    pub qps_10m: f64,
    /// Share of all shards' server time in the last ten minutes.
    pub time_share: f64,
    /// Load (of the chosen kind) in the last ten minutes.
    pub load: f64,
    /// load / mean load - 1.
    pub deviation: f64,
}

/// The shards' balance over the last ten minutes, and max/mean of `by`.
pub fn balance(snap: &Snapshot, map: &ShardMap, names: &[String], by: By) -> (Vec<ShardRow>, f64) {
    let secs_1m = window_seconds(snap.now_s, false);
    let secs_10m = window_seconds(snap.now_s, true);
    let windows: Vec<(Counts, Counts, Counts)> = (0..names.len())
        .map(|s| {
            snap.shards.get(s).map_or_else(Default::default, |w| {
                (
                    w.window(snap.now_s, false),
                    w.window(snap.now_s, true),
                    w.total,
                )
            })
        })
        .collect();
    let total_time: f64 = windows.iter().map(|w| w.1.server_us as f64).sum();
    let loads: Vec<f64> = windows.iter().map(|w| by.of(&w.1)).collect();
    let mean = loads.iter().sum::<f64>() / names.len().max(1) as f64;
    let rows = names
        .iter()
        .enumerate()
        .map(|(s, name)| {
            let (short, long, total) = &windows[s];
            ShardRow {
                name: name.clone(),
                buckets: map.owner.iter().filter(|o| **o as usize == s).count() as u32,
                statements: total.statements,
                qps_1m: short.statements as f64 / secs_1m,
                qps_10m: long.statements as f64 / secs_10m,
                time_share: if total_time > 0.0 {
                    long.server_us as f64 / total_time
                } else {
                    0.0
                },
                load: loads[s],
                deviation: if mean > 0.0 {
                    loads[s] / mean - 1.0
                } else {
                    0.0
                },
            }
        })
        .collect();
    (rows, skew(&loads))
}

/// Loads per shard and per bucket over the last ten minutes: (outside any
/// bucket per shard, per bucket).
pub fn loads(snap: &Snapshot, map: &ShardMap, shards: usize, by: By) -> (Vec<f64>, Vec<f64>) {
    let mut fixed: Vec<f64> = (0..shards)
        .map(|s| {
            snap.shards
                .get(s)
                .map_or(0.0, |w| by.of(&w.window(snap.now_s, true)))
        })
        .collect();
    let buckets: Vec<f64> = (0..map.buckets as usize)
        .map(|b| {
            snap.buckets
                .get(b)
                .map_or(0.0, |w| by.of(&w.window(snap.now_s, true)))
        })
        .collect();
    for (b, l) in buckets.iter().enumerate() {
        let s = map.owner[b] as usize;
        if s < shards {
            fixed[s] = (fixed[s] - l).max(0.0);
        }
    }
    (fixed, buckets)
}

/// Whole loads per shard (bucket and non-bucket) and per bucket.
fn shard_and_bucket_loads(
    snap: &Snapshot,
    map: &ShardMap,
    shards: usize,
    by: By,
) -> (Vec<f64>, Vec<f64>) {
    let (mut load, buckets) = loads(snap, map, shards, by);
    for (b, l) in buckets.iter().enumerate() {
        if let Some(s) = load.get_mut(map.owner[b] as usize) {
            *s += l;
        }
    }
    (load, buckets)
}

/// One of the heaviest buckets.
#[derive(Debug, Clone)]
pub struct BucketRow {
    pub bucket: u32,
    pub shard: String,
    pub qps_10m: f64,
    pub load: f64,
    /// Of its shard's load.
    pub share: f64,
}

pub fn heavy_buckets(
    snap: &Snapshot,
    map: &ShardMap,
    names: &[String],
    by: By,
    n: usize,
) -> Vec<BucketRow> {
    let (shard_load, buckets) = shard_and_bucket_loads(snap, map, names.len(), by);
    let secs = window_seconds(snap.now_s, true);
    let mut rows: Vec<BucketRow> = buckets
        .iter()
        .enumerate()
        .filter(|(_, l)| **l > 0.0)
        .map(|(b, l)| {
            let s = map.owner[b] as usize;
            let statements = snap.buckets[b].window(snap.now_s, true).statements;
            BucketRow {
                bucket: b as u32,
                shard: names.get(s).cloned().unwrap_or_else(|| s.to_string()),
                qps_10m: statements as f64 / secs,
                load: *l,
                share: if shard_load[s] > 0.0 {
                    l / shard_load[s]
                } else {
                    0.0
                },
            }
        })
        .collect();
    rows.sort_by(|a, b| b.load.total_cmp(&a.load));
    rows.truncate(n);
    rows
}

/// A heavy sharding key.
#[derive(Debug, Clone)]
pub struct HotKey {
    pub table: String,
    pub key: String,
    pub bucket: u32,
    pub shard: String,
    /// Its statements (faded), an overestimate by at most `error`.
    pub count: f64,
    pub error: f64,
    /// Of its shard's statements (faded alike).
    pub share: f64,
    /// Its shard's statements (faded): "hot" needs at least
    /// `min_statements` of them.
    pub shard_statements: f64,
    pub hot: bool,
    pub reason: String,
    pub suggestions: Vec<String>,
}

/// Thresholds of "hot", from `[hotspots]`.
#[derive(Debug, Clone)]
pub struct HotRules {
    /// A key with at least this share of its shard's statements is hot.
    pub key_share: f64,
    /// ... once its shard has counted at least this many (faded)
    /// statements; a shard needs this many in the last minute to be
    /// judged hot.
    pub min_statements: f64,
    /// A shard whose last-minute load is at least this multiple of the
    /// mean over shards is hot.
    pub shard_load: f64,
}

impl HotRules {
    pub fn from_config(h: &crate::config::HotspotsConfig) -> HotRules {
        HotRules {
            key_share: h.hot_key_share,
            min_statements: h.min_statements as f64,
            shard_load: h.hot_shard_load,
        }
    }
}

/// The `n` heaviest keys of every table, hot ones flagged with a reason
/// and what would help. `replicas[s]`: how many replicas shard s has.
pub fn hot_keys(
    snap: &Snapshot,
    map: &ShardMap,
    names: &[String],
    replicas: &[usize],
    rules: &HotRules,
    n: usize,
) -> Vec<HotKey> {
    let (shard_load, buckets) = shard_and_bucket_loads(snap, map, names.len(), By::Statements);
    let mean = shard_load.iter().sum::<f64>() / names.len().max(1) as f64;
    let name = |s: usize| names.get(s).cloned().unwrap_or_else(|| s.to_string());
    let mut out = Vec::new();
    for t in &snap.tables {
        for c in t.top.iter().take(n) {
            let (key, bucket) = &c.key;
            let s = map.owner.get(*bucket as usize).map_or(0, |o| *o as usize);
            let shard_total = snap.shard_faded.get(s).copied().unwrap_or(0.0);
            let share = if shard_total > 0.0 {
                (c.count / shard_total).min(1.0)
            } else {
                0.0
            };
            let hot = share >= rules.key_share && shard_total >= rules.min_statements;
            let mut suggestions = Vec::new();
            let mut reason = String::new();
            if hot {
                reason = format!(
                    "{:.0}% of shard {}'s statements (at least {:.0}%; the shard counted {:.0} recent statements)",
                    share * 100.0,
                    name(s),
                    (c.count - c.error) / shard_total * 100.0,
                    shard_total
                );
                let bucket_load = buckets.get(*bucket as usize).copied().unwrap_or(0.0);
                let bucket_share = if shard_load[s] > 0.0 {
                    bucket_load / shard_load[s]
                } else {
                    0.0
                };
                // Move the key's bucket to the least loaded other shard, if
                // that lowers the skew.
                if let Some(to) = (0..names.len())
                    .filter(|x| *x != s)
                    .min_by(|a, b| shard_load[*a].total_cmp(&shard_load[*b]))
                {
                    let mut after = shard_load.clone();
                    after[s] -= bucket_load;
                    after[to] += bucket_load;
                    if skew(&after) < skew(&shard_load) - 0.01 {
                        suggestions.push(format!(
                            "move bucket {bucket} to shard {} (skew {:.2} -> {:.2}): shardgate admin reshard move --buckets {bucket} --to {}",
                            name(to),
                            skew(&shard_load),
                            skew(&after),
                            name(to)
                        ));
                    }
                }
                if share >= 0.9 * bucket_share && bucket_load > mean {
                    suggestions.push(format!(
                        "isolate the key: its bucket alone carries more than an even share, so moving it only moves the problem; move the other buckets off shard {} (shardgate admin rebalance) so the key has the shard to itself",
                        name(s)
                    ));
                }
                let r = replicas.get(s).copied().unwrap_or(0);
                suggestions.push(if r > 0 {
                    format!(
                        "serve its reads from shard {}'s {r} replica(s) (routing.read_write_split, or /* shardgate: replica */ on its reads)",
                        name(s)
                    )
                } else {
                    format!(
                        "add a replica to shard {} and serve the key's reads from it",
                        name(s)
                    )
                });
            }
            out.push(HotKey {
                table: t.table.clone(),
                key: key.to_string(),
                bucket: *bucket,
                shard: name(s),
                count: c.count,
                error: c.error,
                share,
                shard_statements: shard_total,
                hot,
                reason,
                suggestions,
            });
        }
    }
    out.sort_by(|a, b| b.share.total_cmp(&a.share));
    out
}
