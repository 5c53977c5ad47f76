//! The `shardgate` command: `serve` runs the proxy; `up` and `down` start
//! and stop the local quick-start topology (real Postgres servers plus a
//! proxy in the background).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use shardgate::config::Config;
use shardgate::local::{LocalTopology, ServerOptions, APP_PASSWORD, APP_USER};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const DEFAULT_HOME: &str = "/tmp/shardgate";

#[derive(Parser)]
#[command(
    name = "shardgate",
    version,
    about = "A Postgres-wire-compatible sharding proxy"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the proxy with a configuration file.
    Serve {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start the local topology (3 shards; s0 has 2 streaming replicas) and
    /// a proxy on it in the background. Harmless to run twice.
    Up {
        #[arg(long, env = "SHARDGATE_HOME", default_value = DEFAULT_HOME)]
        home: PathBuf,
        /// s0 primary port; replicas take the next ports, s1 base+10, s2 base+20.
        #[arg(long, default_value_t = 16000)]
        base_port: u16,
        #[arg(long, default_value = "127.0.0.1:6432")]
        listen: String,
        #[arg(long, default_value = "127.0.0.1:9930")]
        metrics_listen: String,
        #[arg(long, default_value = "127.0.0.1:6433")]
        admin_listen: String,
    },
    /// Print the bucket, shard and servers of a sharding key.
    Locate {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        table: String,
        #[arg(long)]
        key: String,
    },
    /// Operate a running proxy through its admin API.
    Admin(shardgate::admin::cli::AdminArgs),
    /// Stop the proxy and every server started by `up`.
    Down {
        #[arg(long, env = "SHARDGATE_HOME", default_value = DEFAULT_HOME)]
        home: PathBuf,
    },
}

fn main() -> Result<()> {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, not in log files.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Cmd::Serve { config } => {
            let c = Config::load(&config)?;
            let runtime = match c.proxy.worker_threads {
                1 => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
                n => tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(if n == 0 { num_cpus() } else { n })
                    .enable_all()
                    .build()?,
            };
            runtime.block_on(shardgate::proxy::serve(c, Some(config)))
        }
        Cmd::Up {
            home,
            base_port,
            listen,
            metrics_listen,
            admin_listen,
        } => up(&home, base_port, &listen, &metrics_listen, &admin_listen),
        Cmd::Down { home } => down(&home),
        Cmd::Admin(args) => {
            restore_sigpipe();
            shardgate::admin::cli::run(args)
        }
        Cmd::Locate { config, table, key } => {
            let c = Config::load(&config)?;
            match shardgate::sharding::map::locate_report(&c, &table, &key) {
                Ok(report) => {
                    print!("{report}");
                    Ok(())
                }
                Err(e) => bail!("{e}"),
            }
        }
    }
}

/// `up`/`down` print for people and pipes (`| head`): die quietly on a
/// closed pipe like other command-line tools. `serve` keeps Rust's default
/// (SIGPIPE ignored), so a vanished client is an error, not a crash.
fn restore_sigpipe() {
    // SAFETY: resetting a signal disposition to its default has no
    // preconditions; no handler code is involved.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn pid_file(home: &Path) -> PathBuf {
    home.join("shardgate.pid")
}

fn running_pid(home: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(home))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .ok()
        .map(|_| pid)
}

fn up(
    home: &Path,
    base_port: u16,
    listen: &str,
    metrics_listen: &str,
    admin_listen: &str,
) -> Result<()> {
    restore_sigpipe();
    let topo = LocalTopology::up(home, base_port, &ServerOptions::default())?;
    let config_path = home.join("shardgate.toml");
    // The admin token survives a second `up` (a running proxy has it).
    let token = Config::load(&config_path)
        .ok()
        .and_then(|c| c.admin.token)
        .unwrap_or_else(|| {
            use rand::Rng;
            let bytes: [u8; 16] = rand::thread_rng().gen();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        });
    std::fs::write(
        &config_path,
        topo.config_toml(listen, metrics_listen, admin_listen, &token),
    )?;
    Config::load(&config_path)?;
    if let Some(pid) = running_pid(home) {
        if std::net::TcpStream::connect(listen).is_err() {
            // A proxy that is still draining after `down` or a signal.
            let deadline = Instant::now() + Duration::from_secs(35);
            while running_pid(home) == Some(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    if running_pid(home).is_none() {
        let log = std::fs::File::create(home.join("shardgate.log"))?;
        let mut command = std::process::Command::new(std::env::current_exe()?);
        command
            .args(["serve", "--config"])
            .arg(&config_path)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // A daemon in a session of its own, as `pgbouncer -d` and pg_ctl
        // start theirs: no terminal hangup reaches it, and where the kernel
        // shares CPU time between sessions (autogroup), it is not counted
        // with the shell (and pgbench) that started it. Measured: sharing
        // the shell's session cost it twice PgBouncer's context switches
        // per transaction (docs/benchmarks.md).
        // SAFETY: setsid is async-signal-safe; nothing else runs between
        // fork and exec.
        unsafe {
            command.pre_exec(|| {
                nix::unistd::setsid()
                    .map(|_| ())
                    .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().context("starting the proxy")?;
        std::fs::write(pid_file(home), child.id().to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(listen).is_err() {
            if Instant::now() > deadline {
                bail!(
                    "the proxy did not start listening on {listen}; see {}",
                    home.join("shardgate.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen, "6432"));
    println!(
        "shardgate is running on {listen} (config {}, log {})",
        config_path.display(),
        home.join("shardgate.log").display()
    );
    for (name, primary, reps) in &topo.shards {
        let reps: Vec<String> = reps.iter().map(|r| r.addr()).collect();
        println!(
            "  shard {name}: primary {} replicas [{}]",
            primary.addr(),
            reps.join(", ")
        );
    }
    println!("metrics: http://{metrics_listen}/metrics");
    println!("admin:   cargo run --release -- admin status   (API on {admin_listen}, token in the config)");
    println!("connect: psql \"postgres://{APP_USER}:{APP_PASSWORD}@{host}:{port}/{APP_USER}\"");
    if home == Path::new(DEFAULT_HOME) {
        println!("stop:    cargo run --release -- down");
    } else {
        println!(
            "stop:    cargo run --release -- down --home {}",
            home.display()
        );
    }
    Ok(())
}

fn down(home: &Path) -> Result<()> {
    restore_sigpipe();
    if let Some(pid) = running_pid(home) {
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(35);
        while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        println!("proxy stopped");
    }
    let _ = std::fs::remove_file(pid_file(home));
    LocalTopology::down(home)?;
    println!("servers under {} stopped", home.display());
    Ok(())
}

use std::os::unix::process::CommandExt;
