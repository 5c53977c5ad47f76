//! A local topology of real PostgreSQL servers on loopback, started the
//! same way by `shardgate up`, the integration tests and CI: Postgres is
//! installed with apt-get when missing, servers run as the `postgres` OS
//! user (Postgres refuses root), replicas are made with
//! `pg_basebackup -R` and stream from their primary.
//!
//! Blocking code (it runs external programs); call it before starting a
//! runtime or from `spawn_blocking`.

use anyhow::{anyhow, bail, Context, Result};
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Where the Postgres programs are.
#[derive(Debug, Clone)]
pub struct PgBin {
    pub dir: PathBuf,
}

impl PgBin {
    /// Finds the newest installed Postgres, installing it with apt-get if
    /// there is none and we are root.
    pub fn find_or_install() -> Result<PgBin> {
        if let Some(b) = Self::find() {
            return Ok(b);
        }
        if !nix::unistd::Uid::effective().is_root() {
            bail!("PostgreSQL server binaries not found; install PostgreSQL (e.g. apt-get install postgresql) and try again");
        }
        eprintln!("PostgreSQL not found: installing it with apt-get");
        run(Command::new("apt-get").arg("update").arg("-q"))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-q", "postgresql", "postgresql-contrib"])
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
        Self::find()
            .ok_or_else(|| anyhow!("apt-get installed postgresql, but initdb is still missing"))
    }

    pub fn find() -> Option<PgBin> {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = e.path().join("bin");
                bin.join("initdb").exists().then_some((v, bin))
            })
            .collect();
        versions.sort();
        versions.pop().map(|(_, dir)| PgBin { dir })
    }

    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Runs a Postgres program as the `postgres` OS user when we are root.
pub fn as_postgres(program: &Path) -> Command {
    if nix::unistd::Uid::effective().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed ({}): {}{}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes `dir` exist and belong to the `postgres` user (when root).
pub fn make_postgres_dir(dir: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if nix::unistd::Uid::effective().is_root() {
        let user = nix::unistd::User::from_name("postgres")?
            .ok_or_else(|| anyhow!("the postgres OS user does not exist"))?;
        std::os::unix::fs::chown(dir, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Settings for servers we start.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Password of the `postgres` superuser for TCP logins (SCRAM).
    pub superuser_password: String,
    /// fsync off: for throwaway test clusters only.
    pub fast_unsafe: bool,
    pub max_connections: u32,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            superuser_password: "postgres".into(),
            fast_unsafe: false,
            max_connections: 200,
        }
    }
}

/// One Postgres server (primary or replica) we manage.
#[derive(Debug, Clone)]
pub struct PgServer {
    pub bin: PgBin,
    pub data_dir: PathBuf,
    pub port: u16,
}

impl PgServer {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
    }

    /// Creates a primary's data directory (if it has none) and starts it.
    pub fn init_primary(
        bin: &PgBin,
        data_dir: &Path,
        port: u16,
        opts: &ServerOptions,
    ) -> Result<PgServer> {
        let s = PgServer {
            bin: bin.clone(),
            data_dir: data_dir.to_path_buf(),
            port,
        };
        if !s.initialized() {
            make_postgres_dir(data_dir, 0o700)?;
            let pwfile = data_dir.with_extension("pw");
            std::fs::write(&pwfile, format!("{}\n", opts.superuser_password))?;
            make_readable_by_postgres(&pwfile)?;
            let r = run(as_postgres(&bin.tool("initdb"))
                .arg("-D")
                .arg(data_dir)
                .args([
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--locale=C.UTF-8",
                    "--no-instructions",
                ])
                .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
                .arg(format!("--pwfile={}", pwfile.display())));
            let _ = std::fs::remove_file(&pwfile);
            r?;
            s.append_conf(&[
                "listen_addresses = '127.0.0.1'".into(),
                // logical: online resharding streams changes between shards.
                "wal_level = logical".into(),
                // Writes across shards commit with PREPARE TRANSACTION.
                "max_prepared_transactions = 64".into(),
                "max_wal_senders = 10".into(),
                "hot_standby = on".into(),
                // pg_rewind can turn a failed-over primary into a replica.
                "wal_log_hints = on".into(),
                // Replicas repointed by a failover reconnect within a second.
                "wal_retrieve_retry_interval = '1s'".into(),
                "wal_keep_size = '256MB'".into(),
                format!("max_connections = {}", opts.max_connections),
                "shared_buffers = '128MB'".into(),
                if opts.fast_unsafe {
                    "fsync = off".into()
                } else {
                    "fsync = on".into()
                },
                if opts.fast_unsafe {
                    "full_page_writes = off".into()
                } else {
                    String::new()
                },
            ])?;
            s.set_port_conf()?;
        }
        s.start()?;
        Ok(s)
    }

    /// Makes a streaming replica of `primary` with `pg_basebackup -R`.
    pub fn init_replica(
        primary: &PgServer,
        data_dir: &Path,
        port: u16,
        opts: &ServerOptions,
    ) -> Result<PgServer> {
        let s = PgServer {
            bin: primary.bin.clone(),
            data_dir: data_dir.to_path_buf(),
            port,
        };
        if !s.initialized() {
            make_postgres_dir(data_dir, 0o700)?;
            run(as_postgres(Path::new("/usr/bin/env"))
                .arg(format!("PGPASSWORD={}", opts.superuser_password))
                .arg(primary.bin.tool("pg_basebackup"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    "postgres",
                ])
                .arg("-D")
                .arg(data_dir)
                .args(["-R", "-X", "stream", "-c", "fast"]))?;
            s.set_port_conf()?;
        }
        s.start()?;
        Ok(s)
    }

    fn append_conf(&self, lines: &[String]) -> Result<()> {
        let path = self.data_dir.join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new().append(true).open(&path)?;
        writeln!(f, "\n# added by shardgate")?;
        for l in lines.iter().filter(|l| !l.is_empty()) {
            writeln!(f, "{l}")?;
        }
        Ok(())
    }

    fn set_port_conf(&self) -> Result<()> {
        // Sockets in the data directory: /var/run/postgresql may not exist
        // or belong to another cluster.
        self.append_conf(&[
            format!("port = {}", self.port),
            // The name a replica has as a standby (synchronous_standby_names).
            format!("cluster_name = 'sg_{}'", self.port),
            format!("unix_socket_directories = '{}'", self.data_dir.display()),
        ])
    }

    pub fn is_running(&self) -> bool {
        as_postgres(&self.bin.tool("pg_ctl"))
            .arg("status")
            .arg("-D")
            .arg(&self.data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    pub fn start(&self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let log = self.data_dir.join("server.log");
        run(as_postgres(&self.bin.tool("pg_ctl"))
            .arg("start")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "120"]))
        .with_context(|| {
            format!(
                "starting Postgres on port {} (log: {})",
                self.port,
                log.display()
            )
        })?;
        Ok(())
    }

    pub fn stop(&self, mode: &str) -> Result<()> {
        if !self.is_running() {
            return Ok(());
        }
        run(as_postgres(&self.bin.tool("pg_ctl"))
            .arg("stop")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", mode, "-w", "-t", "60"]))?;
        Ok(())
    }

    /// Runs SQL as the superuser over the server's Unix socket.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String> {
        run(as_postgres(&self.bin.tool("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .arg("-h")
            .arg(&self.data_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ]))
    }

    /// Waits until the server accepts SQL (a replica, after start).
    pub fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.psql("postgres", "select 1") {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

fn make_readable_by_postgres(path: &Path) -> Result<()> {
    if nix::unistd::Uid::effective().is_root() {
        let user = nix::unistd::User::from_name("postgres")?
            .ok_or_else(|| anyhow!("the postgres OS user does not exist"))?;
        std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))?;
    }
    Ok(())
}

/// The quick-start topology: shard s0 = primary + two replicas, shards
/// s1 and s2 = one primary each.
#[derive(Debug, Clone)]
pub struct LocalTopology {
    pub home: PathBuf,
    pub base_port: u16,
    pub shards: Vec<(String, PgServer, Vec<PgServer>)>,
}

/// The application login created on every primary by `shardgate up`.
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app";

impl LocalTopology {
    /// Starts (or finds running) every server of the quick-start topology.
    pub fn up(home: &Path, base_port: u16, opts: &ServerOptions) -> Result<LocalTopology> {
        let bin = PgBin::find_or_install()?;
        make_postgres_dir(home, 0o755)?;
        let mut shards = Vec::new();
        for (i, replicas) in [(0u16, 2u16), (1, 0), (2, 0)] {
            let name = format!("s{i}");
            let port = base_port + 10 * i;
            let primary =
                PgServer::init_primary(&bin, &home.join(format!("{name}-primary")), port, opts)?;
            let mut reps = Vec::new();
            for r in 1..=replicas {
                reps.push(PgServer::init_replica(
                    &primary,
                    &home.join(format!("{name}-replica{r}")),
                    port + r,
                    opts,
                )?);
            }
            shards.push((name, primary, reps));
        }
        for (_, primary, reps) in &shards {
            primary.wait_ready(Duration::from_secs(60))?;
            let exists = primary.psql(
                "postgres",
                &format!("select 1 from pg_roles where rolname = '{APP_USER}'"),
            )?;
            if exists.trim().is_empty() {
                primary.psql(
                    "postgres",
                    &format!("create role {APP_USER} login createdb password '{APP_PASSWORD}'"),
                )?;
                primary.psql(
                    "postgres",
                    &format!("create database {APP_USER} owner {APP_USER}"),
                )?;
            }
            for r in reps {
                r.wait_ready(Duration::from_secs(60))?;
            }
        }
        Ok(LocalTopology {
            home: home.to_path_buf(),
            base_port,
            shards,
        })
    }

    /// A shardgate config for this topology.
    pub fn config_toml(
        &self,
        listen: &str,
        metrics_listen: &str,
        admin_listen: &str,
        admin_token: &str,
    ) -> String {
        let mut t = format!(
            "# Written by `shardgate up` for the local topology in {home}.\n\
             [proxy]\nlisten = \"{listen}\"\nmetrics_listen = \"{metrics_listen}\"\npool_mode = \"transaction\"\nstate_dir = \"{home}/state\"\n\n\
             [admin]\nlisten = \"{admin_listen}\"\ntoken = \"{admin_token}\"\n\n\
             # Probes and failover log in as the superuser (pg_promote, pg_stat_replication).\n\
             [health]\nuser = \"postgres\"\npassword = \"postgres\"\n\n\
             [pool]\nmax_size = 20\nmin_size = 0\ncheckout_timeout = \"5s\"\n\n\
             [[users]]\nname = \"{APP_USER}\"\npassword = \"{APP_PASSWORD}\"\nauth = \"scram-sha-256\"\n",
            home = self.home.display()
        );
        for (name, primary, reps) in &self.shards {
            let reps: Vec<String> = reps.iter().map(|r| format!("\"{}\"", r.addr())).collect();
            t.push_str(&format!(
                "\n[[shards]]\nname = \"{name}\"\nprimary = \"{}\"\nreplicas = [{}]\n",
                primary.addr(),
                reps.join(", ")
            ));
        }
        t.push_str(
            "\n[sharding]\nbuckets = 1024\n\
             # Tables not listed here live on s0. Declare a sharded table, then\n\
             # create it through shardgate (DDL on it runs on every shard):\n\
             #   [[sharding.tables]]\n\
             #   name = \"accounts\"\n\
             #   column = \"id\"\n\
             #   type = \"int8\"\n",
        );
        t
    }

    /// Stops every server found under `home` (fast shutdown).
    pub fn down(home: &Path) -> Result<()> {
        let Some(bin) = PgBin::find() else {
            return Ok(());
        };
        let Ok(entries) = std::fs::read_dir(home) else {
            return Ok(());
        };
        let mut dirs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.join("PG_VERSION").exists())
            .collect();
        // Replicas first, so primaries do not wait for their walsenders.
        dirs.sort_by_key(|p| !p.to_string_lossy().contains("replica"));
        for d in dirs {
            let s = PgServer {
                bin: bin.clone(),
                data_dir: d.clone(),
                port: 0,
            };
            s.stop("fast")
                .with_context(|| format!("stopping Postgres in {}", d.display()))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_start_config_is_valid_and_sharded() {
        let server = |port: u16| PgServer {
            bin: PgBin {
                dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            },
            data_dir: PathBuf::from("/nonexistent"),
            port,
        };
        let topo = LocalTopology {
            home: PathBuf::from("/tmp/sg-home"),
            base_port: 16000,
            shards: vec![
                (
                    "s0".into(),
                    server(16000),
                    vec![server(16001), server(16002)],
                ),
                ("s1".into(), server(16010), vec![]),
                ("s2".into(), server(16020), vec![]),
            ],
        };
        let text = topo.config_toml(
            "127.0.0.1:6432",
            "127.0.0.1:9930",
            "127.0.0.1:6433",
            "0123456789abcdef0123",
        );
        let config = crate::config::Config::parse(&text, "up.toml").unwrap();
        assert_eq!(config.shards.len(), 3);
        assert_eq!(config.proxy.state_dir, PathBuf::from("/tmp/sg-home/state"));
        let t = crate::topology::Topology::from_config(&config, 1);
        let map = t.sharded().expect("sharded");
        assert_eq!((map.buckets, map.default_shard), (1024, 0));
    }
}
