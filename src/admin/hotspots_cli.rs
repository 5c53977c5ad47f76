//! `shardgate admin balance | hotspots | rebalance` (docs/hotspots.md).

use super::cli::Client;
use super::pb;
use anyhow::Result;
use std::fmt::Write;

#[derive(clap::Args)]
pub struct BalanceArgs {
    /// What load means: time (server time) or statements; `bucket` also
    /// lists the heaviest buckets by server time (20 unless --buckets).
    #[arg(long, default_value = "time")]
    by: String,
    /// Also list this many of the heaviest buckets.
    #[arg(long, default_value_t = 0)]
    buckets: u32,
    /// The database of the sharded tables (default: the first user's).
    #[arg(long, default_value = "")]
    database: String,
}

#[derive(clap::Args)]
pub struct HotspotsArgs {
    /// Keys per table and buckets to list.
    #[arg(long, default_value_t = 10)]
    limit: u32,
}

#[derive(clap::Args)]
pub struct RebalanceArgs {
    /// load (server time), statements, or size (bytes of the sharded
    /// tables).
    #[arg(long, default_value = "load")]
    by: String,
    /// Print the plan only.
    #[arg(long)]
    dry_run: bool,
    #[arg(long, default_value_t = 64)]
    max_moves: u32,
    #[arg(long, default_value = "")]
    database: String,
}

pub async fn balance(c: &mut Client, a: &BalanceArgs, json: bool) -> Result<()> {
    let (by, buckets) = match a.by.as_str() {
        "bucket" | "buckets" => (
            "time".to_owned(),
            if a.buckets == 0 { 20 } else { a.buckets },
        ),
        _ => (a.by.clone(), a.buckets),
    };
    let r = c
        .balance(pb::BalanceRequest {
            by,
            buckets,
            database: a.database.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    super::cli::print_reply(&r, json, balance_table)
}

pub async fn hotspots(c: &mut Client, a: &HotspotsArgs, json: bool) -> Result<()> {
    let r = c
        .hotspots(pb::HotspotsRequest { limit: a.limit })
        .await
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
        .into_inner();
    super::cli::print_reply(&r, json, hotspots_table)
}

pub async fn rebalance(c: &mut Client, a: &RebalanceArgs, json: bool) -> Result<()> {
    let r = c
        .rebalance(pb::RebalanceRequest {
            by: a.by.clone(),
            dry_run: a.dry_run,
            max_moves: a.max_moves,
            database: a.database.clone(),
        })
        .await
        .map_err(|e| anyhow::anyhow!("rebalance refused: {}", e.message()))?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    if r.moves.is_empty() {
        println!(
            "no bucket move lowers the skew by {} (now {:.2})",
            r.by, r.skew_before
        );
        return Ok(());
    }
    println!("{:>7}  {:<10} {:<10} {:>12}", "bucket", "from", "to", r.by);
    for m in &r.moves {
        println!(
            "{:>7}  {:<10} {:<10} {:>12.0}",
            m.bucket, m.from, m.to, m.load
        );
    }
    println!(
        "skew by {}: {:.2} -> {:.2} (predicted)",
        r.by, r.skew_before, r.skew_after
    );
    if r.ids.is_empty() {
        println!("dry run: nothing started");
    } else {
        println!(
            "started move(s) {} (further receiving shards follow one at a time); follow with: shardgate admin reshard status --watch",
            r.ids
                .iter()
                .map(|i| i.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

const BAR: usize = 30;

fn bar(fraction: f64) -> String {
    let n = (fraction.clamp(0.0, 1.0) * BAR as f64).round() as usize;
    format!("{}{}", "█".repeat(n), "·".repeat(BAR - n))
}

fn human_bytes(b: i64) -> String {
    if b < 0 {
        return "?".into();
    }
    let mut v = b as f64;
    for unit in ["B", "kB", "MB", "GB", "TB"] {
        if v < 1024.0 {
            return format!("{v:.0} {unit}");
        }
        v /= 1024.0;
    }
    format!("{v:.0} PB")
}

pub fn balance_table(r: &pb::BalanceReply) -> String {
    let mut out = String::new();
    let max = r.shards.iter().map(|s| s.load).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "{:<10} {:>7} {:>12} {:>10} {:>9} {:>9} {:>7} {:>9}  load ({} over the last {:.0} s)",
        "shard",
        "buckets",
        "rows",
        "bytes",
        "qps 1m",
        "qps 10m",
        "time",
        "vs even",
        r.by,
        r.window_seconds
    );
    for s in &r.shards {
        let rows = if s.rows < 0 {
            "?".into()
        } else {
            s.rows.to_string()
        };
        let _ = writeln!(
            out,
            "{:<10} {:>7} {:>12} {:>10} {:>9.1} {:>9.1} {:>6.0}% {:>+8.0}%  {}",
            s.shard,
            s.buckets,
            rows,
            human_bytes(s.bytes),
            s.qps_1m,
            s.qps_10m,
            s.time_share * 100.0,
            s.deviation * 100.0,
            bar(if max > 0.0 { s.load / max } else { 0.0 })
        );
    }
    let _ = writeln!(out, "skew (max/mean {}): {:.2}", r.by, r.skew);
    if !r.buckets.is_empty() {
        let _ = writeln!(out, "\nheaviest buckets:");
        out.push_str(&bucket_table(&r.buckets, &r.by));
    }
    out
}

fn bucket_table(buckets: &[pb::BucketLoad], by: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>7}  {:<10} {:>9} {:>14} {:>14}",
        "bucket", "shard", "qps 10m", by, "share of shard"
    );
    for b in buckets {
        // Server time comes in microseconds.
        let load = if by == "time" {
            format!("{:.3} s", b.load / 1e6)
        } else {
            format!("{:.0}", b.load)
        };
        let _ = writeln!(
            out,
            "{:>7}  {:<10} {:>9.1} {:>14} {:>13.0}%",
            b.bucket,
            b.shard,
            b.qps_10m,
            load,
            b.share * 100.0
        );
    }
    out
}

pub fn hotspots_table(r: &pb::HotspotsReply) -> String {
    let mut out = String::new();
    if r.keys.is_empty() {
        out.push_str("no sharding keys counted yet\n");
    } else {
        let _ = writeln!(
            out,
            "{:<4} {:<20} {:<24} {:>7} {:<10} {:>10} {:>8} {:>15}",
            "", "table", "key", "bucket", "shard", "count", "± error", "share of shard"
        );
        for k in &r.keys {
            let _ = writeln!(
                out,
                "{:<4} {:<20} {:<24} {:>7} {:<10} {:>10.0} {:>8.0} {:>14.1}%",
                if k.hot { "HOT" } else { "" },
                k.table,
                k.key,
                k.bucket,
                k.shard,
                k.count,
                k.error,
                k.share * 100.0
            );
        }
        for k in r.keys.iter().filter(|k| k.hot) {
            let _ = writeln!(out, "\n{} key {} is hot: {}", k.table, k.key, k.reason);
            for s in &k.suggestions {
                let _ = writeln!(out, "  - {s}");
            }
        }
    }
    if !r.buckets.is_empty() {
        let _ = writeln!(out, "\nheaviest buckets:");
        out.push_str(&bucket_table(&r.buckets, "statements"));
    }
    out
}
