//! `shardgate admin ...`: the command-line client of the admin API.
//! Tables for people by default, `--json` for scripts.

use super::pb::{self, admin_client::AdminClient};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

#[derive(clap::Args)]
pub struct AdminArgs {
    /// The admin API, e.g. http://127.0.0.1:6433.
    #[arg(long, env = "SHARDGATE_ADMIN_ADDR")]
    pub addr: Option<String>,
    /// The API token (`[admin] token`).
    #[arg(long, env = "SHARDGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Take the address and token (and the drill's login) from this
    /// configuration file; default: the one `shardgate up` wrote.
    #[arg(long, short, env = "SHARDGATE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: AdminCmd,
}

#[derive(clap::Subcommand)]
pub enum AdminCmd {
    /// Shards, servers, roles, lag, epoch, health, fenced servers, last
    /// failovers.
    Status,
    /// Planned switchover: hold writes, let the target catch up, promote it.
    Switchover {
        #[arg(long)]
        shard: String,
        /// The replica to promote (host:port); default: the most advanced.
        #[arg(long)]
        to: Option<String>,
    },
    /// Make a fenced former primary (or a replica that stopped following)
    /// a replica of its shard's primary again (run on the database host: it
    /// stops the server, rewinds it with pg_rewind or, failing that, takes
    /// a fresh base backup, starts it as a replica) and take it back into
    /// service.
    Rejoin {
        /// The fenced server (host:port).
        #[arg(long)]
        server: String,
        /// Its data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Login on the new primary for pg_rewind / pg_basebackup.
        #[arg(long, default_value = "postgres")]
        source_user: String,
        #[arg(long, env = "PGPASSWORD", hide_env_values = true)]
        source_password: Option<String>,
    },
    /// Drills against the real cluster.
    Drill {
        #[command(subcommand)]
        what: DrillCmd,
    },
    /// Load per shard (last ten minutes) with a bar chart and the skew
    /// (docs/hotspots.md).
    Balance(super::hotspots_cli::BalanceArgs),
    /// The heaviest sharding keys and buckets; hot keys with what would
    /// help.
    Hotspots(super::hotspots_cli::HotspotsArgs),
    /// Bucket moves that even out the load (or size); --dry-run prints the
    /// plan only.
    Rebalance(super::hotspots_cli::RebalanceArgs),
    /// Move buckets between shards online (docs/resharding.md).
    Reshard {
        #[command(subcommand)]
        cmd: super::reshard_cli::ReshardCmd,
    },
}

#[derive(clap::Subcommand)]
pub enum DrillCmd {
    /// Fail a shard's primary (or switch it over) under a write load and
    /// report detection, promotion, the clients' write gap, their errors
    /// and any acknowledged write that is missing afterwards.
    Failover {
        #[arg(long)]
        shard: String,
        /// kill: SIGKILL the postmaster; stop: immediate shutdown;
        /// switchover: planned.
        #[arg(long, default_value = "kill")]
        mode: String,
        /// Postgres URL of the proxy for the load (default: from the
        /// configuration's listen address and first user).
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Required with kill and stop: the drill really fails the primary.
        #[arg(long)]
        i_understand_this_fails_the_primary: bool,
    },
}

/// Runs one admin command.
pub fn run(args: AdminArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

struct Target {
    addr: String,
    token: String,
    config: Option<crate::config::Config>,
}

fn target(args: &AdminArgs) -> Result<Target> {
    let path = args.config.clone().or_else(|| {
        let p = Path::new("/tmp/shardgate/shardgate.toml");
        p.exists().then(|| p.to_path_buf())
    });
    let config = match &path {
        Some(p) if args.addr.is_none() || args.token.is_none() || args.config.is_some() => {
            Some(crate::config::Config::load(p)?)
        }
        _ => None,
    };
    let addr = match (&args.addr, &config) {
        (Some(a), _) => a.clone(),
        (None, Some(c)) => format!(
            "http://{}",
            c.admin
                .listen
                .context("the configuration has no [admin] listen")?
        ),
        (None, None) => bail!("give --addr, or --config with an [admin] section"),
    };
    let token = match (&args.token, &config) {
        (Some(t), _) => t.clone(),
        (None, Some(c)) => c
            .admin
            .token
            .clone()
            .context("the configuration has no [admin] token")?,
        (None, None) => bail!("give --token (or SHARDGATE_ADMIN_TOKEN)"),
    };
    Ok(Target {
        addr,
        token,
        config,
    })
}

/// Adds the token to every call.
#[derive(Clone)]
pub struct AddToken(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for AddToken {
    // The signature is tonic's.
    #[allow(clippy::result_large_err)]
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

pub type Client = AdminClient<tonic::service::interceptor::InterceptedService<Channel, AddToken>>;

async fn connect(t: &Target) -> Result<Client> {
    let channel = Channel::from_shared(t.addr.clone())?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("cannot reach the admin API at {}", t.addr))?;
    let value = format!("Bearer {}", t.token).parse()?;
    Ok(AdminClient::with_interceptor(channel, AddToken(value)))
}

async fn run_async(args: AdminArgs) -> Result<()> {
    let t = target(&args)?;
    let mut c = connect(&t).await?;
    match &args.cmd {
        AdminCmd::Status => {
            let s = c.status(pb::StatusRequest {}).await?.into_inner();
            print_reply(&s, args.json, status_table)?;
        }
        AdminCmd::Reshard { cmd } => super::reshard_cli::run(&mut c, cmd, args.json).await?,
        AdminCmd::Balance(a) => super::hotspots_cli::balance(&mut c, a, args.json).await?,
        AdminCmd::Hotspots(a) => super::hotspots_cli::hotspots(&mut c, a, args.json).await?,
        AdminCmd::Rebalance(a) => super::hotspots_cli::rebalance(&mut c, a, args.json).await?,
        AdminCmd::Switchover { shard, to } => {
            let r = c
                .switchover(pb::SwitchoverRequest {
                    shard: shard.clone(),
                    to: to.clone().unwrap_or_default(),
                })
                .await
                .map_err(|e| anyhow::anyhow!("switchover refused: {}", e.message()))?
                .into_inner();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "shard {}: {} -> {} (writes paused {} ms; promotion {} ms)",
                    r.shard, r.old_primary, r.new_primary, r.pause_ms, r.promote_ms
                );
                println!(
                    "the old primary is fenced and read-only; make it a replica with: shardgate admin rejoin --server {} --data-dir <its data directory>",
                    r.old_primary
                );
            }
        }
        AdminCmd::Rejoin {
            server,
            data_dir,
            source_user,
            source_password,
        } => {
            let s = c.status(pb::StatusRequest {}).await?.into_inner();
            // A fenced former primary, or a replica that stopped following.
            let fenced = s.fenced.iter().any(|f| &f.addr == server);
            let shard = s
                .fenced
                .iter()
                .find(|f| &f.addr == server)
                .map(|f| f.shard.clone())
                .or_else(|| {
                    s.shards
                        .iter()
                        .find(|sh| {
                            sh.servers
                                .iter()
                                .any(|x| &x.addr == server && x.role == "replica")
                        })
                        .map(|sh| sh.name.clone())
                })
                .with_context(|| format!("{server} is neither fenced nor a replica"))?;
            let primary = s
                .shards
                .iter()
                .find(|sh| sh.name == shard)
                .and_then(|sh| sh.servers.iter().find(|x| x.role == "primary"))
                .context("the server's shard has no primary")?
                .addr
                .clone();
            resync(
                server,
                data_dir,
                &primary,
                source_user,
                source_password.as_deref(),
            )?;
            let epoch = if fenced {
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    match c
                        .rejoin(pb::RejoinRequest {
                            server: server.clone(),
                        })
                        .await
                    {
                        Ok(r) => break r.into_inner().epoch,
                        Err(e) if Instant::now() < deadline => {
                            tracing::debug!(error = %e.message(), "not yet");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        Err(e) => bail!("rejoin refused: {}", e.message()),
                    }
                }
            } else {
                s.epoch
            };
            // Done when the probes see it streaming from the primary: only
            // then does it take reads or count as a candidate for promotion.
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let s = c.status(pb::StatusRequest {}).await?.into_inner();
                let streaming = s.shards.iter().flat_map(|sh| &sh.servers).any(|x| {
                    &x.addr == server
                        && crate::health::same_server(&x.streaming_from, &primary)
                        && x.streamed_ms_ago < 2000
                });
                if streaming {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("{server} was resynchronised from {primary} but is not seen streaming from it after 60 s; see its server log");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            println!(
                "{server} is a replica of {primary} in shard {shard} again, streaming (topology epoch {epoch})"
            );
        }
        AdminCmd::Drill {
            what:
                DrillCmd::Failover {
                    shard,
                    mode,
                    url,
                    clients,
                    i_understand_this_fails_the_primary,
                },
        } => {
            if mode != "switchover" && !i_understand_this_fails_the_primary {
                bail!("--mode {mode} really fails the primary of shard {shard}; add --i-understand-this-fails-the-primary");
            }
            let url = match (url, &t.config) {
                (Some(u), _) => u.clone(),
                (None, Some(cfg)) => {
                    let u = cfg
                        .users
                        .first()
                        .context("no [[users]] in the configuration")?;
                    format!(
                        "host={} port={} user={} password={} dbname={}",
                        cfg.proxy.listen.ip(),
                        cfg.proxy.listen.port(),
                        u.name,
                        u.password.clone().unwrap_or_default(),
                        u.name
                    )
                }
                (None, None) => bail!("give --url (the proxy's Postgres URL)"),
            };
            let report = super::drill_client::failover(&mut c, shard, mode, &url, *clients).await?;
            print_reply(&report, args.json, DrillReport::table)?;
        }
    }
    Ok(())
}

/// Stops the fenced server, rewinds it onto `primary` (a fresh base backup
/// when pg_rewind cannot), keeps its own configuration files, and starts
/// it as a replica.
fn resync(
    server: &str,
    data_dir: &Path,
    primary: &str,
    user: &str,
    password: Option<&str>,
) -> Result<()> {
    use crate::local::{as_postgres, run, PgBin};
    let bin = PgBin::find().context("PostgreSQL binaries not found")?;
    let (host, port) = primary
        .rsplit_once(':')
        .context("primary address is not host:port")?;
    let ctl = |args: &[&str]| {
        run(as_postgres(&bin.tool("pg_ctl"))
            .args(args)
            .arg("-D")
            .arg(data_dir))
    };
    if ctl(&["status"]).is_ok() {
        println!("stopping {server}");
        ctl(&["stop", "-m", "fast", "-w", "-t", "120"])?;
    }
    // pg_rewind and pg_basebackup copy the source's configuration files;
    // the server keeps its own (port, paths, cluster_name).
    let keep = ["postgresql.conf", "pg_hba.conf", "pg_ident.conf"];
    let saved: Vec<(PathBuf, Vec<u8>)> = keep
        .iter()
        .filter_map(|f| {
            let p = data_dir.join(f);
            std::fs::read(&p).ok().map(|b| (p, b))
        })
        .collect();
    let source = format!("host={host} port={port} user={user} dbname=postgres");
    let env_pw = format!("PGPASSWORD={}", password.unwrap_or(""));
    println!("rewinding {server} onto {primary}");
    let rewound = run(as_postgres(Path::new("/usr/bin/env"))
        .arg(&env_pw)
        .arg(bin.tool("pg_rewind"))
        .arg("--target-pgdata")
        .arg(data_dir)
        .arg(format!("--source-server={source}"))
        .arg("--write-recovery-conf"));
    if let Err(e) = rewound {
        println!("pg_rewind failed ({e:#}); taking a fresh base backup");
        let aside = data_dir.with_extension(format!(
            "before-rejoin-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        ));
        std::fs::rename(data_dir, &aside)?;
        crate::local::make_postgres_dir(data_dir, 0o700)?;
        run(as_postgres(Path::new("/usr/bin/env"))
            .arg(&env_pw)
            .arg(bin.tool("pg_basebackup"))
            .args(["-h", host, "-p", port, "-U", user])
            .arg("-D")
            .arg(data_dir)
            .args(["-R", "-X", "stream", "-c", "fast"]))?;
        println!("the old data directory is kept in {}", aside.display());
    }
    for (p, bytes) in saved {
        std::fs::write(&p, bytes)?;
    }
    // Drop what fencing set (read-only) from the server's own settings.
    let auto = data_dir.join("postgresql.auto.conf");
    if let Ok(text) = std::fs::read_to_string(&auto) {
        let kept: String = text
            .lines()
            .filter(|l| !l.trim_start().starts_with("default_transaction_read_only"))
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&auto, kept)?;
    }
    std::fs::write(data_dir.join("standby.signal"), b"")?;
    let log = data_dir.join("server.log");
    println!("starting {server} as a replica of {primary}");
    run(as_postgres(&bin.tool("pg_ctl"))
        .arg("start")
        .arg("-D")
        .arg(data_dir)
        .arg("-l")
        .arg(&log)
        .args(["-w", "-t", "120"]))?;
    Ok(())
}

/// Prints a reply as JSON (`--json`) or as the table `table` draws.
pub(super) fn print_reply<T: serde::Serialize>(
    r: &T,
    json: bool,
    table: impl FnOnce(&T) -> String,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        print!("{}", table(r));
    }
    Ok(())
}

fn status_table(s: &pb::StatusReply) -> String {
    let mut out = format!("topology epoch {}\n\n", s.epoch);
    out.push_str(&format!(
        "{:<8} {:<22} {:<8} {:<5} {:<14} {:>12} {:>9}  {}\n",
        "SHARD", "SERVER", "ROLE", "UP", "LSN", "LAG BYTES", "LAG S", "NOTE"
    ));
    for sh in &s.shards {
        for x in &sh.servers {
            let note = if !x.up {
                x.reason.clone()
            } else if x.role == "primary" && x.in_recovery {
                "in recovery!".into()
            } else if x.role == "primary" && sh.writes_held {
                "writes held".into()
            } else {
                String::new()
            };
            let (lag_b, lag_s) = if x.role == "replica" && x.lag_bytes != u64::MAX {
                (x.lag_bytes.to_string(), format!("{:.3}", x.lag_seconds))
            } else {
                ("-".into(), "-".into())
            };
            out.push_str(&format!(
                "{:<8} {:<22} {:<8} {:<5} {:<14} {:>12} {:>9}  {}\n",
                sh.name,
                x.addr,
                x.role,
                if x.up { "yes" } else { "no" },
                crate::health::format_lsn(x.lsn),
                lag_b,
                lag_s,
                note
            ));
        }
    }
    if !s.fenced.is_empty() {
        out.push_str("\nfenced (no traffic until `shardgate admin rejoin`):\n");
        for f in &s.fenced {
            let state = if f.running_as_primary {
                "RUNNING AS A PRIMARY (split brain outside shardgate)"
            } else if !f.up {
                "down"
            } else if f.in_recovery {
                "running as a replica: ready to rejoin"
            } else {
                "up"
            };
            out.push_str(&format!("  {:<8} {:<22} {}\n", f.shard, f.addr, state));
        }
    }
    if !s.last_failovers.is_empty() {
        out.push_str("\nlast failovers:\n");
        for r in &s.last_failovers {
            out.push_str(&format!(
                "  {:<8} {:<10} {:<12} {} -> {}  detect {} ms, promote {} ms{}  {}\n",
                r.shard,
                r.kind,
                r.outcome,
                r.old_primary,
                r.new_primary,
                r.detect_ms,
                r.promote_ms,
                if r.kind == "switchover" {
                    format!(", writes paused {} ms", r.pause_ms)
                } else {
                    String::new()
                },
                r.message
            ));
        }
    }
    out
}

/// What one drill found.
#[derive(Debug, serde::Serialize)]
pub struct DrillReport {
    pub shard: String,
    pub mode: String,
    pub old_primary: String,
    pub new_primary: String,
    pub detect_ms: u64,
    pub promote_ms: u64,
    /// Switchover: how long writes were held.
    pub pause_ms: u64,
    /// Per client, the longest time without an acknowledged write around
    /// the fault: the median and the worst.
    pub write_gap_p50_ms: u64,
    pub write_gap_max_ms: u64,
    pub acknowledged: usize,
    pub errors: BTreeMap<String, usize>,
    pub missing_acknowledged: usize,
    /// Replicas not following the new primary (they need a rejoin).
    pub not_repointed: Vec<String>,
}

impl DrillReport {
    fn table(&self) -> String {
        let errors = if self.errors.is_empty() {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "drill failover --shard {} --mode {}\n\
             old primary          {}\n\
             new primary          {}\n\
             time to detect       {} ms\n\
             time to promote      {} ms\n{}\
             write gap (clients)  p50 {} ms, max {} ms\n\
             writes acknowledged  {}\n\
             client errors        {}\n\
             acknowledged writes missing afterwards: {}\n{}",
            self.shard,
            self.mode,
            self.old_primary,
            self.new_primary,
            self.detect_ms,
            self.promote_ms,
            if self.mode == "switchover" {
                format!("writes paused        {} ms\n", self.pause_ms)
            } else {
                String::new()
            },
            self.write_gap_p50_ms,
            self.write_gap_max_ms,
            self.acknowledged,
            errors,
            self.missing_acknowledged,
            if self.not_repointed.is_empty() {
                String::new()
            } else {
                format!(
                    "replicas not following the new primary (rejoin them): {}\n",
                    self.not_repointed.join(", ")
                )
            }
        )
    }
}

pub(super) mod load {
    use super::*;

    /// One client's record.
    #[derive(Default)]
    pub struct ClientLedger {
        pub acked: Vec<(i64, Instant)>,
        pub errors: BTreeMap<String, usize>,
    }

    /// Inserts into the drill ledger on one connection until `stop`.
    pub async fn writer(
        url: String,
        hint: String,
        client: i64,
        stop: Arc<AtomicBool>,
    ) -> Result<ClientLedger> {
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut ledger = ClientLedger::default();
        let mut seq = 0i64;
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let id = (client << 40) | seq;
            let r = c
                .execute(
                    &format!(
                        "{hint}INSERT INTO shardgate_drill_ledger (id, client) VALUES ($1, $2)"
                    ),
                    &[&id, &(client as i32)],
                )
                .await;
            match r {
                Ok(_) => ledger.acked.push((id, Instant::now())),
                Err(e) => {
                    let code = e
                        .code()
                        .map_or_else(|| "connection".to_string(), |c| c.code().to_string());
                    *ledger.errors.entry(code).or_default() += 1;
                    if e.is_closed() {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Ok(ledger)
    }

    pub fn ids(ledgers: &[ClientLedger]) -> BTreeSet<i64> {
        ledgers
            .iter()
            .flat_map(|l| l.acked.iter().map(|(id, _)| *id))
            .collect()
    }
}
