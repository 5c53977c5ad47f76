//! `shardgate admin reshard ...`: plan, start, watch and abort bucket moves.

use super::cli::Client;
use super::pb;
use anyhow::{bail, Result};
use std::io::Write;
use std::time::Duration;

#[derive(clap::Subcommand)]
pub enum ReshardCmd {
    /// What moving buckets to a shard would copy (rows and bytes per source
    /// shard and table); nothing changes.
    Plan {
        #[command(flatten)]
        what: MoveArgs,
    },
    /// Move buckets to a shard while the application keeps running: copy,
    /// catch up, verify, cut over (statements on those buckets wait a
    /// moment), clean up.
    Move {
        #[command(flatten)]
        what: MoveArgs,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Return at once instead of showing progress until the move has
        /// cut over.
        #[arg(long)]
        detach: bool,
    },
    /// Register a new shard (its primary must run with wal_level =
    /// logical and have the database and logins) and move its fair share
    /// of buckets to it, one source shard after another.
    AddShard {
        #[arg(long)]
        name: String,
        /// host:port of its primary.
        #[arg(long)]
        primary: String,
        /// host:port of a replica (repeat for several).
        #[arg(long = "replica")]
        replicas: Vec<String>,
        #[arg(long, default_value = "")]
        database: String,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
        /// Return at once instead of showing progress.
        #[arg(long)]
        detach: bool,
    },
    /// Phase, rows copied, rate, lag and ETA of each move.
    Status {
        /// Keep showing progress until no move is running.
        #[arg(long)]
        watch: bool,
    },
    /// Stop the unfinished moves and roll them back (only before their
    /// cutover; the source is untouched).
    Abort,
}

#[derive(clap::Args)]
pub struct MoveArgs {
    /// Buckets: a range such as 0-127, a number, or a comma-separated list.
    #[arg(long, required = true, num_args = 1..)]
    buckets: Vec<String>,
    /// The shard that gets them.
    #[arg(long)]
    to: String,
    /// The database the sharded tables live in (default: the first
    /// [[users]] entry's name).
    #[arg(long, default_value = "")]
    database: String,
}

impl MoveArgs {
    fn request(&self) -> pb::ReshardMoveRequest {
        pb::ReshardMoveRequest {
            buckets: self.buckets.clone(),
            to: self.to.clone(),
            database: self.database.clone(),
        }
    }
}

pub async fn run(c: &mut Client, cmd: &ReshardCmd, json: bool) -> Result<()> {
    match cmd {
        ReshardCmd::Plan { what }
        | ReshardCmd::Move {
            what,
            dry_run: true,
            ..
        } => {
            let plan = c
                .reshard_plan(what.request())
                .await
                .map_err(|e| anyhow::anyhow!("{}", e.message()))?
                .into_inner();
            super::cli::print_reply(&plan, json, plan_table)?;
        }
        ReshardCmd::Move { what, detach, .. } => {
            let ids = c
                .reshard_move(what.request())
                .await
                .map_err(|e| anyhow::anyhow!("move refused: {}", e.message()))?
                .into_inner()
                .ids;
            if json && *detach {
                println!("{}", serde_json::to_string(&ids)?);
                return Ok(());
            }
            if !json {
                println!("started move(s) {ids:?}");
            }
            if !*detach {
                let end = watch(c, &ids, json).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&end)?);
                }
                let failed: Vec<&pb::MoveStatus> = end
                    .iter()
                    .filter(|m| matches!(m.phase.as_str(), "failed" | "aborted"))
                    .collect();
                if let Some(m) = failed.first() {
                    bail!("move {} {}: {}", m.id, m.phase, m.message);
                }
            }
        }
        ReshardCmd::Status { watch: follow } => {
            let s = c
                .reshard_status(pb::ReshardStatusRequest {})
                .await?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", status_table(&s.moves));
            }
            if *follow {
                let ids: Vec<u64> = s
                    .moves
                    .iter()
                    .filter(|m| active(&m.phase))
                    .map(|m| m.id)
                    .collect();
                watch(c, &ids, json).await?;
            }
        }
        ReshardCmd::AddShard {
            name,
            primary,
            replicas,
            database,
            dry_run,
            detach,
        } => {
            let r = c
                .reshard_add_shard(pb::AddShardRequest {
                    name: name.clone(),
                    primary: primary.clone(),
                    replicas: replicas.clone(),
                    database: database.clone(),
                    dry_run: *dry_run,
                })
                .await
                .map_err(|e| anyhow::anyhow!("add-shard refused: {}", e.message()))?
                .into_inner();
            let plan = pb::ReshardPlanReply {
                moves: r.moves.clone(),
            };
            if json && (*dry_run || *detach) {
                println!("{}", serde_json::to_string_pretty(&r)?);
                return Ok(());
            }
            if !json {
                print!("{}", plan_table(&plan));
            }
            if *dry_run {
                return Ok(());
            }
            if !json {
                println!("shard {name} added; started move(s) {:?}", r.ids);
            }
            if !*detach {
                let end = watch(c, &r.ids, json).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&end)?);
                }
                if let Some(m) = end
                    .iter()
                    .find(|m| matches!(m.phase.as_str(), "failed" | "aborted"))
                {
                    bail!("move {} {}: {}", m.id, m.phase, m.message);
                }
            }
        }
        ReshardCmd::Abort => {
            let ids = c
                .reshard_abort(pb::ReshardAbortRequest {})
                .await
                .map_err(|e| anyhow::anyhow!("abort refused: {}", e.message()))?
                .into_inner()
                .ids;
            if json {
                println!("{}", serde_json::to_string(&ids)?);
            } else {
                println!("aborting move(s) {ids:?}: a move that has not cut over rolls back, one that has moves its buckets back; `shardgate admin reshard status` shows when they are aborted");
            }
        }
    }
    Ok(())
}

fn active(phase: &str) -> bool {
    !matches!(phase, "done" | "failed" | "aborted")
}

/// Shows progress until every move in `ids` has cut over (switched) or
/// ended; returns their last status.
async fn watch(c: &mut Client, ids: &[u64], json: bool) -> Result<Vec<pb::MoveStatus>> {
    let tty = !json && std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut last = String::new();
    loop {
        let s = c
            .reshard_status(pb::ReshardStatusRequest {})
            .await?
            .into_inner();
        let mine: Vec<pb::MoveStatus> = s
            .moves
            .into_iter()
            .filter(|m| ids.contains(&m.id))
            .collect();
        let settled = mine
            .iter()
            .all(|m| !active(&m.phase) || matches!(m.phase.as_str(), "switched" | "cleaning_up"));
        if !json {
            let lines: Vec<String> = mine.iter().map(progress_line).collect();
            let text = lines.join("\n");
            if tty {
                print!("\r\x1b[J{text}");
                // Back to the first line, to redraw in place.
                if !settled && lines.len() > 1 {
                    print!("\x1b[{}A\r", lines.len() - 1);
                }
                std::io::stdout().flush().ok();
            } else if text != last {
                println!("{text}");
            }
            last = text;
        }
        if settled {
            if tty {
                println!();
            }
            return Ok(mine);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn bar(done: u64, total: u64) -> String {
    const WIDTH: usize = 24;
    let filled = if total == 0 {
        WIDTH
    } else {
        ((done.min(total) as f64 / total as f64) * WIDTH as f64).round() as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(WIDTH - filled))
}

fn progress_line(m: &pb::MoveStatus) -> String {
    let mut s = format!(
        "move {} {} -> {} buckets {}: {:<12} {} {}/{} rows",
        m.id,
        m.from,
        m.to,
        m.buckets.join(","),
        m.phase,
        bar(m.rows_copied, m.rows_total),
        m.rows_copied,
        m.rows_total
    );
    if m.rows_per_second > 0.0 && m.phase == "copying" {
        s.push_str(&format!(
            ", {:.0} rows/s, ETA {:.0} s",
            m.rows_per_second, m.eta_seconds
        ));
    }
    if m.copied_unix_ms > m.copy_started_unix_ms && m.bytes_copied > 0 {
        let secs = (m.copied_unix_ms - m.copy_started_unix_ms) as f64 / 1000.0;
        s.push_str(&format!(
            ", copied {:.1} MB in {secs:.1} s ({:.1} MB/s)",
            m.bytes_copied as f64 / 1e6,
            m.bytes_copied as f64 / 1e6 / secs.max(0.001)
        ));
    }
    if m.lag_bytes > 0 {
        s.push_str(&format!(", lag {} bytes", m.lag_bytes));
    }
    if m.switched_unix_ms > 0 {
        s.push_str(&format!(", writes to its buckets paused {} ms", m.pause_ms));
    }
    if m.back_pause_ms > 0 {
        s.push_str(&format!(", {} ms moving back", m.back_pause_ms));
    }
    if !m.message.is_empty() {
        s.push_str(&format!(" ({})", m.message));
    }
    s
}

fn plan_table(p: &pb::ReshardPlanReply) -> String {
    let mut out = String::new();
    for m in &p.moves {
        let rows: u64 = m.tables.iter().map(|t| t.rows).sum();
        let bytes: u64 = m.tables.iter().map(|t| t.bytes).sum();
        out.push_str(&format!(
            "{} -> {}: buckets {} ({} rows, {} bytes)\n",
            m.from,
            m.to,
            m.buckets.join(","),
            rows,
            bytes
        ));
        for t in &m.tables {
            out.push_str(&format!(
                "    {:<32} {:>12} rows {:>14} bytes\n",
                t.table, t.rows, t.bytes
            ));
        }
    }
    out
}

fn status_table(moves: &[pb::MoveStatus]) -> String {
    if moves.is_empty() {
        return "no bucket moves\n".into();
    }
    let mut out = String::new();
    for m in moves {
        out.push_str(&progress_line(m));
        out.push('\n');
    }
    out
}
