//! Configuration: the TOML file `shardgate serve --config` reads.
//!
//! Parsed with serde into [`Config`], then checked by [`Config::validate`],
//! which names the offending key in every error. The parsed config is an
//! immutable snapshot; SIGHUP builds a new one and swaps it in.
//! docs/configuration.md documents every key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: `{key}`: {problem}")]
    Invalid {
        path: String,
        key: String,
        problem: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub pool: PoolConfig,
    #[serde(default)]
    pub users: Vec<UserConfig>,
    #[serde(default)]
    pub shards: Vec<ShardConfig>,
    #[serde(default)]
    pub routing: RoutingConfig,
    #[serde(default)]
    pub health: HealthConfig,
    #[serde(default)]
    pub failover: FailoverConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub reshard: ReshardConfig,
    #[serde(default)]
    pub hotspots: HotspotsConfig,
    /// Absent: no sharding; every statement goes to the first shard.
    pub sharding: Option<ShardingConfig>,
}

/// How keys map to shards (see docs/configuration.md, `[sharding]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardingConfig {
    /// The bucket count B: key -> hash -> hash mod B -> owning shard. Fixed
    /// when the cluster is created.
    pub buckets: u32,
    #[serde(default = "default_hash")]
    pub hash: crate::sharding::hash::HashFunction,
    /// Where tables that are neither sharded nor reference tables live;
    /// defaults to the first shard.
    pub default_shard: Option<String>,
    #[serde(default)]
    pub tables: Vec<ShardedTableConfig>,
    /// Tables with a full copy on every shard.
    #[serde(default)]
    pub reference_tables: Vec<String>,
}

fn default_hash() -> crate::sharding::hash::HashFunction {
    crate::sharding::hash::HashFunction::Postgres
}

/// A sharded table: `name` (optionally `schema.name`), its sharding column
/// and that column's type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardedTableConfig {
    pub name: String,
    pub column: String,
    #[serde(rename = "type")]
    pub key_type: crate::sharding::hash::KeyType,
}

/// Buckets a shard owns: a number or an inclusive range `"lo-hi"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum BucketSpec {
    One(u32),
    Range(String),
}

impl BucketSpec {
    /// The inclusive range, or a description of what is wrong.
    pub fn range(&self) -> Result<(u32, u32), String> {
        match self {
            BucketSpec::One(b) => Ok((*b, *b)),
            BucketSpec::Range(s) => {
                let bad = || format!("{s:?} is not a bucket number or a range like \"0-341\"");
                let (lo, hi) = match s.split_once('-') {
                    Some((lo, hi)) => (lo.trim(), hi.trim()),
                    None => (s.trim(), s.trim()),
                };
                let lo: u32 = lo.parse().map_err(|_| bad())?;
                let hi: u32 = hi.parse().map_err(|_| bad())?;
                if lo > hi {
                    return Err(format!("{s:?}: the range is empty"));
                }
                Ok((lo, hi))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaSelection {
    /// Rotate over the eligible replicas, in proportion to their weights.
    RoundRobin,
    /// The eligible replica with the fewest queries in flight from this
    /// proxy, relative to its weight.
    LeastOutstanding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoReplica {
    /// Reads go to the primary when no replica qualifies.
    Primary,
    /// Reads fail with SQLSTATE 57P03 when no replica qualifies.
    Error,
}

/// Read/write splitting.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Send provably read-only statements to replicas. Off: everything goes
    /// to the primary.
    pub read_write_split: bool,
    pub replica_selection: ReplicaSelection,
    /// A replica further behind the primary than this many bytes of WAL
    /// gets no reads.
    pub max_replica_lag_bytes: Option<u64>,
    /// A replica further behind than this (time since the primary was at
    /// the replica's replay position) gets no reads.
    #[serde(with = "humantime_serde")]
    pub max_replica_lag: Option<Duration>,
    /// What a read does when no replica qualifies.
    pub no_replica: NoReplica,
    /// After a session's write commits, its reads go only to servers that
    /// have replayed that commit.
    pub read_your_writes: bool,
    /// Functions to treat as read-only although the catalog says VOLATILE
    /// (or does not know them).
    pub read_only_functions: Vec<String>,
    /// Functions whose statements always go to the primary.
    pub primary_functions: Vec<String>,
    /// How often each database's function catalog is reloaded.
    #[serde(with = "humantime_serde")]
    pub catalog_refresh: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            read_write_split: true,
            replica_selection: ReplicaSelection::RoundRobin,
            max_replica_lag_bytes: None,
            max_replica_lag: Some(Duration::from_secs(10)),
            no_replica: NoReplica::Primary,
            read_your_writes: true,
            read_only_functions: Vec::new(),
            primary_functions: Vec::new(),
            catalog_refresh: Duration::from_secs(60),
        }
    }
}

/// Background probes of every server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Time between probes of one server.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// A probe (connect + query) slower than this failed.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
    /// Role the probes log in as; defaults to the first [[users]] entry's
    /// server login.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Database the probes connect to.
    pub database: String,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            probe_interval: Duration::from_millis(100),
            probe_timeout: Duration::from_secs(1),
            user: None,
            password: None,
            database: "postgres".into(),
        }
    }
}

/// The admin API (gRPC, proto/admin.proto) that `shardgate admin` uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Where the API listens; absent: no admin API.
    pub listen: Option<SocketAddr>,
    /// Every call must carry `authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// Automatic failover of a shard whose primary died (docs/failover.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// Promote a replica when a primary is declared dead.
    pub enabled: bool,
    /// Consecutive failed probes before a primary is declared dead.
    pub failed_probes: u32,
    /// A primary whose probes time out (it accepts connections but does not
    /// answer: stopped, swapping, overloaded) is declared dead only after
    /// failing continuously this long. Refused or closed connections need
    /// only `failed_probes`.
    #[serde(with = "humantime_serde")]
    pub unresponsive_for: Duration,
    /// How long writes to a shard without a primary wait for the promotion
    /// before they fail.
    #[serde(with = "humantime_serde")]
    pub hold_time: Duration,
    /// Limit on `pg_promote(wait => true)`.
    #[serde(with = "humantime_serde")]
    pub promote_timeout: Duration,
    /// Without synchronous replication, the most WAL a replica may lack
    /// (behind the most advanced one) and still be promoted; None: any.
    pub max_lag_bytes: Option<u64>,
    /// A fenced former primary found running as a primary again is made
    /// read-only (`default_transaction_read_only`, existing sessions
    /// terminated).
    pub fence_read_only: bool,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            enabled: true,
            failed_probes: 3,
            unresponsive_for: Duration::from_secs(2),
            hold_time: Duration::from_secs(10),
            promote_timeout: Duration::from_secs(30),
            max_lag_bytes: None,
            fence_read_only: true,
        }
    }
}

/// Bucket moves (docs/resharding.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReshardConfig {
    /// How long the source keeps its copy of moved buckets (fenced against
    /// writes) before cleanup deletes it.
    #[serde(with = "humantime_serde")]
    pub cleanup_after: Duration,
    /// At the cutover, the longest the target may take to apply the
    /// source's last changes while statements on the moving buckets are
    /// held; longer, and the hold is released and the cutover retried.
    #[serde(with = "humantime_serde")]
    pub cutover_timeout: Duration,
    /// The most bytes per second a move's copy reads from the source
    /// (0: no limit). Re-read while the copy runs: a reload changes it.
    pub copy_bytes_per_second: u64,
}

impl Default for ReshardConfig {
    fn default() -> Self {
        ReshardConfig {
            cleanup_after: Duration::from_secs(600),
            cutover_timeout: Duration::from_millis(2000),
            copy_bytes_per_second: 0,
        }
    }
}

/// Load counting per shard, bucket and key (docs/hotspots.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotspotsConfig {
    /// Count load as statements are routed (off: the views stay empty).
    pub enabled: bool,
    /// Counters of the heavy-hitters sketch per sharded table: memory is
    /// bounded by this, and any key with more than 1/top_keys of a table's
    /// statements is sure to be tracked.
    pub top_keys: usize,
    /// Key and shard statement counts fade by half over this long.
    #[serde(with = "humantime_serde")]
    pub half_life: Duration,
    /// A key with at least this share of its shard's statements is hot.
    pub hot_key_share: f64,
    /// ... once the shard has counted at least this many recent
    /// statements (faded like the keys). A shard needs this many in the
    /// last minute to be judged hot.
    pub min_statements: u64,
    /// A shard whose last minute of server time is at least this multiple
    /// of the mean over shards is hot.
    pub hot_shard_load: f64,
    /// Per-bucket and per-key series in /metrics: the heaviest N only.
    pub metrics_top: usize,
}

impl Default for HotspotsConfig {
    fn default() -> Self {
        HotspotsConfig {
            enabled: true,
            top_keys: 256,
            half_life: Duration::from_secs(300),
            hot_key_share: 0.2,
            min_statements: 1000,
            hot_shard_load: 1.5,
            metrics_top: 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A server connection is held only while a transaction runs.
    Transaction,
    /// A server connection is held for the whole client connection.
    Session,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Address clients connect to.
    pub listen: SocketAddr,
    /// HTTP address for /metrics and /healthz; unset disables it.
    pub metrics_listen: Option<SocketAddr>,
    pub pool_mode: PoolMode,
    /// Largest client message accepted; bigger ones are a protocol error
    /// (protects memory from a hostile or broken client).
    pub max_message_size: usize,
    /// Client connections beyond this are refused with 53300.
    pub max_client_connections: usize,
    /// Time a client gets to finish startup and authentication.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Time in-flight transactions get to finish after SIGTERM.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Threads running client sessions. 1 (a single-threaded event loop,
    /// like PgBouncer) leaves the most CPU to Postgres on small machines;
    /// 0 means one per core.
    pub worker_threads: usize,
    /// This proxy's zone: replicas in the same zone are preferred for reads.
    pub zone: Option<String>,
    /// Where this proxy keeps state that must survive a restart (the
    /// two-phase commit decision log).
    pub state_dir: std::path::PathBuf,
    /// This proxy's number (0-1023), unique among the proxies of a
    /// cluster: it names the two-phase transactions it owns.
    pub node_id: u16,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            listen: "127.0.0.1:6432".parse().expect("static address"),
            metrics_listen: None,
            pool_mode: PoolMode::Transaction,
            max_message_size: 64 * 1024 * 1024,
            max_client_connections: 20_000,
            handshake_timeout: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(30),
            worker_threads: 1,
            zone: None,
            state_dir: "shardgate-state".into(),
            node_id: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Server connections kept open per pool even when idle.
    pub min_size: usize,
    /// Most server connections per pool (database, user, server).
    pub max_size: usize,
    /// How long a client waits for a free server connection before 53300.
    #[serde(with = "humantime_serde")]
    pub checkout_timeout: Duration,
    /// How long opening a server connection (TCP + auth) may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle server connections above min_size are closed after this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Server connections are closed (when idle) after this age, so server
    /// memory bloat and configuration changes do not live forever.
    #[serde(with = "humantime_serde")]
    pub server_lifetime: Duration,
    /// A connection idle for longer than this is checked for liveness
    /// before it is handed to a client.
    #[serde(with = "humantime_serde")]
    pub liveness_check_after: Duration,
    /// A server connection holding more proxy-prepared statements than this
    /// is closed when released, so server memory stays bounded.
    pub max_prepared_statements: usize,
    /// Transaction mode: a client keeps the server connection of its last
    /// transaction for its next one while no other client waits for that
    /// pool (see `frontend::spare`), which saves a pool checkout and return
    /// per transaction.
    pub keep_spare: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            min_size: 0,
            max_size: 20,
            checkout_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(600),
            server_lifetime: Duration::from_secs(3600),
            liveness_check_after: Duration::from_secs(10),
            max_prepared_statements: 1000,
            keep_spare: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMethod {
    #[serde(rename = "scram-sha-256")]
    ScramSha256,
    #[serde(rename = "md5")]
    Md5,
    #[serde(rename = "trust")]
    Trust,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    /// Plain text, an `md5...` hash or a `SCRAM-SHA-256$...` secret.
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default = "default_auth")]
    pub auth: AuthMethod,
    /// Role used on the servers; defaults to `name`.
    #[serde(default)]
    pub server_user: Option<String>,
    /// Password for the servers; defaults to `password` when that is plain.
    #[serde(default)]
    pub server_password: Option<String>,
    /// Overrides `pool.max_size` for this user's pools.
    #[serde(default)]
    pub pool_size: Option<usize>,
}

fn default_auth() -> AuthMethod {
    AuthMethod::ScramSha256
}

impl UserConfig {
    pub fn server_user(&self) -> &str {
        self.server_user.as_deref().unwrap_or(&self.name)
    }

    /// The password shardgate presents to servers.
    pub fn server_password(&self) -> Option<&str> {
        self.server_password.as_deref().or_else(|| {
            self.password
                .as_deref()
                .filter(|p| !is_md5_hash(p) && !p.starts_with("SCRAM-SHA-256$"))
        })
    }
}

pub fn is_md5_hash(p: &str) -> bool {
    p.len() == 35 && p.starts_with("md5") && p[3..].bytes().all(|b| b.is_ascii_hexdigit())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    pub name: String,
    /// `host:port` of the shard's primary.
    pub primary: String,
    /// The shard's streaming replicas: `"host:port"`, or a table with
    /// `addr`, `weight` and `zone`.
    #[serde(default)]
    pub replicas: Vec<ReplicaConfig>,
    /// With `[sharding]`: the buckets this shard owns. When no shard lists
    /// any, the buckets are split evenly in shard order.
    #[serde(default)]
    pub buckets: Vec<BucketSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ReplicaConfig {
    Addr(String),
    Full(ReplicaDetails),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaDetails {
    pub addr: String,
    /// Relative share of reads (0 = only when no other replica qualifies).
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub zone: Option<String>,
    /// Failover preference among replicas equally up to date (higher
    /// first; 0 = never promote).
    #[serde(default = "default_weight")]
    pub priority: u32,
}

fn default_weight() -> u32 {
    1
}

impl ReplicaConfig {
    pub fn addr(&self) -> &str {
        match self {
            ReplicaConfig::Addr(a) => a,
            ReplicaConfig::Full(d) => &d.addr,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            ReplicaConfig::Addr(_) => 1,
            ReplicaConfig::Full(d) => d.weight,
        }
    }

    pub fn zone(&self) -> Option<&str> {
        match self {
            ReplicaConfig::Addr(_) => None,
            ReplicaConfig::Full(d) => d.zone.as_deref(),
        }
    }

    pub fn priority(&self) -> u32 {
        match self {
            ReplicaConfig::Addr(_) => 1,
            ReplicaConfig::Full(d) => d.priority,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&text, &shown)
    }

    pub fn parse(text: &str, path: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    pub fn validate(&self, path: &str) -> Result<(), ConfigError> {
        let invalid = |key: String, problem: &str| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            problem: problem.to_owned(),
        };
        if self.pool.max_size == 0 {
            return Err(invalid("pool.max_size".into(), "must be at least 1"));
        }
        if self.pool.min_size > self.pool.max_size {
            return Err(invalid(
                "pool.min_size".into(),
                "must not exceed pool.max_size",
            ));
        }
        if self.hotspots.top_keys == 0 || self.hotspots.top_keys > 100_000 {
            return Err(invalid(
                "hotspots.top_keys".into(),
                "must be between 1 and 100000",
            ));
        }
        if !(self.hotspots.hot_key_share > 0.0 && self.hotspots.hot_key_share <= 1.0) {
            return Err(invalid(
                "hotspots.hot_key_share".into(),
                "must be a fraction above 0 and at most 1",
            ));
        }
        if !(self.hotspots.hot_shard_load > 1.0 && self.hotspots.hot_shard_load.is_finite()) {
            return Err(invalid(
                "hotspots.hot_shard_load".into(),
                "must be a number above 1 (a multiple of the mean load)",
            ));
        }
        if self.hotspots.metrics_top > 100 {
            return Err(invalid(
                "hotspots.metrics_top".into(),
                "must be at most 100 (it bounds the label cardinality of /metrics)",
            ));
        }
        if self.hotspots.half_life < Duration::from_secs(10) {
            return Err(invalid("hotspots.half_life".into(), "must be at least 10s"));
        }
        if self.proxy.max_message_size < 1024 {
            return Err(invalid(
                "proxy.max_message_size".into(),
                "must be at least 1024 bytes",
            ));
        }
        if self.users.is_empty() {
            return Err(invalid(
                "users".into(),
                "at least one [[users]] entry is needed",
            ));
        }
        for (i, u) in self.users.iter().enumerate() {
            let key = |k: &str| format!("users[{i}].{k}");
            if u.name.is_empty() {
                return Err(invalid(key("name"), "must not be empty"));
            }
            if self.users[..i].iter().any(|o| o.name == u.name) {
                return Err(invalid(
                    key("name"),
                    &format!("user {:?} is listed twice", u.name),
                ));
            }
            match (u.auth, u.password.as_deref()) {
                (AuthMethod::Trust, _) => {}
                (_, None) => {
                    return Err(invalid(key("password"), "required unless auth = \"trust\""))
                }
                (AuthMethod::Md5, Some(p)) if p.starts_with("SCRAM-SHA-256$") => {
                    return Err(invalid(
                        key("password"),
                        "a SCRAM secret cannot check md5 logins; give the plain password or an md5 hash",
                    ))
                }
                (AuthMethod::ScramSha256, Some(p)) if is_md5_hash(p) => {
                    return Err(invalid(
                        key("password"),
                        "an md5 hash cannot check SCRAM logins; give the plain password or a SCRAM secret",
                    ))
                }
                (AuthMethod::ScramSha256, Some(p))
                    if p.starts_with("SCRAM-SHA-256$")
                        && crate::auth::scram::ScramSecret::parse(p).is_none() =>
                {
                    return Err(invalid(key("password"), "malformed SCRAM-SHA-256 secret"));
                }
                _ => {}
            }
            if u.pool_size == Some(0) {
                return Err(invalid(key("pool_size"), "must be at least 1"));
            }
        }
        if self.shards.is_empty() {
            return Err(invalid(
                "shards".into(),
                "at least one [[shards]] entry is needed",
            ));
        }
        for (i, s) in self.shards.iter().enumerate() {
            if self.shards[..i].iter().any(|o| o.name == s.name) {
                return Err(invalid(
                    format!("shards[{i}].name"),
                    &format!("shard {:?} is listed twice", s.name),
                ));
            }
            check_host_port(&s.primary).map_err(|p| invalid(format!("shards[{i}].primary"), &p))?;
            for (j, r) in s.replicas.iter().enumerate() {
                check_host_port(r.addr())
                    .map_err(|p| invalid(format!("shards[{i}].replicas[{j}]"), &p))?;
                if r.addr() == s.primary || s.replicas[..j].iter().any(|o| o.addr() == r.addr()) {
                    return Err(invalid(
                        format!("shards[{i}].replicas[{j}]"),
                        &format!("{:?} is listed twice in the shard", r.addr()),
                    ));
                }
            }
        }
        if self.health.probe_interval.is_zero() {
            return Err(invalid("health.probe_interval".into(), "must be positive"));
        }
        if self.health.probe_timeout.is_zero() {
            return Err(invalid("health.probe_timeout".into(), "must be positive"));
        }
        if self.admin.listen.is_some() && self.admin.token.as_deref().is_none_or(|t| t.len() < 16) {
            return Err(invalid(
                "admin.token".into(),
                "the admin API needs a token of at least 16 characters",
            ));
        }
        if self.failover.failed_probes == 0 {
            return Err(invalid(
                "failover.failed_probes".into(),
                "must be at least 1",
            ));
        }
        if self.failover.promote_timeout.as_secs() < 1 {
            return Err(invalid(
                "failover.promote_timeout".into(),
                "must be at least 1s",
            ));
        }
        if self.health.user.is_none()
            && self
                .users
                .first()
                .is_some_and(|u| u.server_password().is_none())
            && self
                .users
                .first()
                .is_some_and(|u| u.auth != AuthMethod::Trust)
        {
            return Err(invalid(
                "health.user".into(),
                "the first [[users]] entry has no plain server password the probes could use; set health.user and health.password",
            ));
        }
        if self.routing.catalog_refresh.is_zero() {
            return Err(invalid(
                "routing.catalog_refresh".into(),
                "must be positive",
            ));
        }
        if self.proxy.node_id > 1023 {
            return Err(invalid(
                "proxy.node_id".into(),
                "must be between 0 and 1023",
            ));
        }
        self.validate_sharding()
            .map_err(|(key, problem)| invalid(key, &problem))
    }

    /// Checks `[sharding]` and the shards' bucket lists: (key, problem).
    fn validate_sharding(&self) -> Result<(), (String, String)> {
        let Some(sh) = &self.sharding else {
            if let Some(i) = self.shards.iter().position(|s| !s.buckets.is_empty()) {
                return Err((
                    format!("shards[{i}].buckets"),
                    "bucket lists need a [sharding] section".into(),
                ));
            }
            return Ok(());
        };
        if sh.buckets == 0 || sh.buckets > crate::sharding::MAX_BUCKETS {
            return Err((
                "sharding.buckets".into(),
                format!("must be between 1 and {}", crate::sharding::MAX_BUCKETS),
            ));
        }
        if self.shards.len() > 1 && self.proxy.pool_mode == PoolMode::Session {
            return Err((
                "proxy.pool_mode".into(),
                "\"session\" pins a client to one server, which cannot serve several shards; use \"transaction\"".into(),
            ));
        }
        if let Some(d) = &sh.default_shard {
            if !self.shards.iter().any(|s| &s.name == d) {
                return Err((
                    "sharding.default_shard".into(),
                    format!("no [[shards]] entry is named {d:?}"),
                ));
            }
        }
        crate::sharding::map::bucket_owners(self)?;
        let mut seen = std::collections::HashSet::new();
        for (i, t) in sh.tables.iter().enumerate() {
            if t.name.trim().is_empty() {
                return Err((
                    format!("sharding.tables[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if t.column.trim().is_empty() {
                return Err((
                    format!("sharding.tables[{i}].column"),
                    "must not be empty".into(),
                ));
            }
            if !seen.insert(crate::sharding::map::table_key(&t.name)) {
                return Err((
                    format!("sharding.tables[{i}].name"),
                    format!("table {:?} is listed twice", t.name),
                ));
            }
        }
        for (i, t) in sh.reference_tables.iter().enumerate() {
            if t.trim().is_empty() {
                return Err((
                    format!("sharding.reference_tables[{i}]"),
                    "must not be empty".into(),
                ));
            }
            if !seen.insert(crate::sharding::map::table_key(t)) {
                return Err((
                    format!("sharding.reference_tables[{i}]"),
                    format!("table {t:?} is listed twice (or is also a sharded table)"),
                ));
            }
        }
        Ok(())
    }

    /// The login the health probes use: (user, password).
    pub fn probe_login(&self) -> (String, Option<String>) {
        match &self.health.user {
            Some(u) => (u.clone(), self.health.password.clone()),
            None => {
                let u = &self.users[0];
                (
                    u.server_user().to_owned(),
                    u.server_password().map(str::to_owned),
                )
            }
        }
    }

    pub fn user(&self, name: &str) -> Option<&UserConfig> {
        self.users.iter().find(|u| u.name == name)
    }
}

fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    port.parse::<u16>()
        .map_err(|_| format!("{s:?} has an invalid port"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [proxy]
        listen = "127.0.0.1:7000"
        [pool]
        max_size = 4
        checkout_timeout = "2s"
        [[users]]
        name = "app"
        password = "secret"
        [[shards]]
        name = "s0"
        primary = "127.0.0.1:5432"
    "#;

    #[test]
    fn parses_good_config() {
        let c = Config::parse(GOOD, "t.toml").unwrap();
        assert_eq!(c.pool.max_size, 4);
        assert_eq!(c.pool.checkout_timeout, Duration::from_secs(2));
        assert_eq!(c.proxy.pool_mode, PoolMode::Transaction);
        assert_eq!(c.users[0].auth, AuthMethod::ScramSha256);
        assert_eq!(c.users[0].server_password(), Some("secret"));
    }

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        let e = err(&GOOD.replace("max_size = 4", "max_size = 0"));
        assert!(e.contains("pool.max_size"), "{e}");
        let e = err(&GOOD.replace("primary = \"127.0.0.1:5432\"", "primary = \"nowhere\""));
        assert!(e.contains("shards[0].primary"), "{e}");
        let e = err(&GOOD.replace("checkout_timeout = \"2s\"", "checkout_timeout = \"soon\""));
        assert!(e.contains("checkout_timeout"), "{e}");
        let e = err(&GOOD.replace("max_size = 4", "max_size = 4\nbogus = 1"));
        assert!(e.contains("bogus"), "{e}");
        let e = err(&GOOD.replace("password = \"secret\"", ""));
        assert!(e.contains("users[0].password"), "{e}");
        let e = err(&GOOD.replace("[proxy]", "[proxy]\npool_mode = \"statement\""));
        assert!(e.contains("pool_mode"), "{e}");
        for (line, key) in [
            ("hot_shard_load = 1.0", "hotspots.hot_shard_load"),
            ("metrics_top = 101", "hotspots.metrics_top"),
            ("half_life = \"1s\"", "hotspots.half_life"),
            ("hot_key_share = 0", "hotspots.hot_key_share"),
        ] {
            let e = err(&format!("{GOOD}\n[hotspots]\n{line}\n"));
            assert!(e.contains(key), "{line}: {e}");
        }
        let c = Config::parse(
            &format!("{GOOD}\n[hotspots]\nhot_shard_load = 2.5\nmetrics_top = 0\n"),
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.hotspots.hot_shard_load, 2.5);
        assert_eq!(c.hotspots.metrics_top, 0);
    }
}

#[cfg(test)]
mod example_tests {
    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../examples/shardgate.toml");
        let c = super::Config::parse(text, "examples/shardgate.toml").unwrap();
        assert_eq!(c.users.len(), 2);
        let docker = include_str!("../docker/shardgate.toml");
        super::Config::parse(docker, "docker/shardgate.toml").unwrap();
    }
}
