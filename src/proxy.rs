//! The running proxy: shared state ([`Proxy`]), the accept loop, signal
//! handling (SIGTERM drains, SIGHUP reloads) and the maintenance task.
//!
//! Clients enter through [`Listener::run`]; each gets a task running
//! `frontend::handle_client`. Shutdown is a `CancellationToken` plus a
//! `TaskTracker`: the listener stops, idle clients are told and closed,
//! clients inside a transaction get `shutdown_timeout` to finish.

use crate::auth::AuthTable;
use crate::backend::Pools;
use crate::cancel::CancelRegistry;
use crate::config::Config;
use crate::frontend::statements::StatementRegistry;
use crate::metrics::GLOBAL;
use crate::topology::TopologyHandle;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub struct Proxy {
    pub config: ArcSwap<Config>,
    pub auth: ArcSwap<AuthTable>,
    pub topology: TopologyHandle,
    pub pools: Arc<Pools>,
    pub statements: StatementRegistry,
    pub cancels: CancelRegistry,
    /// Cancelled when the proxy stops, through [`Proxy::stop`] only
    /// (which also sets `stopping`).
    pub shutdown: CancellationToken,
    /// Set just before `shutdown` is cancelled: read without a lock on
    /// every idle client wait (`is_cancelled` takes one).
    stopping: std::sync::atomic::AtomicBool,
    pub tasks: TaskTracker,
    pub health: Arc<crate::health::Health>,
    pub catalogs: crate::router::Catalogs,
    pub placements: crate::frontend::sharding::PlacementCache,
    pub type_names: crate::frontend::scatter::TypeNames,
    pub scatter_plans: crate::frontend::scatter::ScatterCache,
    /// The two-phase commit decision log (None: it could not be opened;
    /// writes across shards are refused).
    pub twophase: Option<crate::twophase::DecisionLog>,
    pub failover: crate::failover::Failover,
    pub reshard: crate::reshard::Reshard,
    pub hotspots: crate::hotspot::Hotspots,
}

impl Proxy {
    /// Starts stopping: everything waiting on `shutdown` wakes.
    pub fn stop(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.shutdown.cancel();
    }

    /// Has [`Proxy::stop`] been called?
    pub fn stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The proxy for `config`, with the cluster state saved in
    /// `proxy.state_dir` (failovers before a restart stay in effect).
    pub fn new(config: Config) -> anyhow::Result<Arc<Proxy>> {
        let failover = crate::failover::Failover::open(&config.proxy.state_dir).map_err(|e| {
            anyhow::anyhow!(
                "cannot read the cluster state in {}: {e}",
                config.proxy.state_dir.display()
            )
        })?;
        let topology = failover.topology(&config);
        Ok(Arc::new(Proxy {
            failover,
            reshard: crate::reshard::Reshard::default(),
            hotspots: crate::hotspot::Hotspots::new(&config.hotspots),
            auth: ArcSwap::from_pointee(AuthTable::build(&config.users)),
            topology: TopologyHandle::new(topology),
            pools: Arc::new(Pools::new(config.pool.clone())),
            statements: StatementRegistry::default(),
            cancels: CancelRegistry::default(),
            shutdown: CancellationToken::new(),
            stopping: Default::default(),
            tasks: TaskTracker::new(),
            health: Arc::default(),
            catalogs: crate::router::Catalogs::default(),
            placements: Default::default(),
            type_names: Default::default(),
            scatter_plans: Default::default(),
            twophase: open_decision_log(&config),
            config: ArcSwap::from_pointee(config),
        }))
    }

    /// Applies a reloaded config: users, passwords and pool sizes change in
    /// place; connected clients stay.
    pub fn reload(&self, config: Config) {
        self.auth.store(Arc::new(AuthTable::build(&config.users)));
        self.hotspots.configure(&config.hotspots);
        let users = config.users.clone();
        self.pools.apply_settings(config.pool.clone(), |u| {
            users.iter().find(|c| c.name == u).and_then(|c| c.pool_size)
        });
        let mut next = self.failover.topology(&config);
        next.epoch = 0;
        let epoch = self.topology.publish(next);
        self.config.store(Arc::new(config));
        self.catalogs.clear();
        self.placements.clear();
        self.scatter_plans.clear();
        tracing::info!(topology_epoch = epoch, "configuration reloaded");
    }
}

/// The decision log, when there are shards to write across.
fn open_decision_log(config: &Config) -> Option<crate::twophase::DecisionLog> {
    if config.sharding.is_none() || config.shards.len() < 2 {
        return None;
    }
    let dir = &config.proxy.state_dir;
    match crate::twophase::DecisionLog::open(dir, config.proxy.node_id) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot open the two-phase commit log; writes across shards are refused");
            None
        }
    }
}

/// Accepts clients until shutdown.
pub struct Listener {
    pub listener: TcpListener,
    pub proxy: Arc<Proxy>,
}

impl Listener {
    pub async fn run(self) {
        let limit = self.proxy.config.load().proxy.max_client_connections;
        let permits = Arc::new(Semaphore::new(limit));
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                _ = self.proxy.shutdown.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(s) => {
                    backoff = Duration::from_millis(5);
                    s
                }
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            GLOBAL.client_connections.inc();
            let proxy = self.proxy.clone();
            match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    self.proxy.tasks.spawn(async move {
                        crate::frontend::handle_client(stream, peer, proxy).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    GLOBAL
                        .client_rejected
                        .with_label_values(&["too_many_clients"])
                        .inc();
                    self.proxy.tasks.spawn(crate::frontend::reject_client(
                        stream,
                        "53300",
                        "sorry, too many clients already",
                    ));
                }
            }
        }
    }
}

/// Runs the proxy until SIGTERM/SIGINT (or `proxy.shutdown`).
pub async fn serve(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<()> {
    let listen = config.proxy.listen;
    let metrics_listen = config.proxy.metrics_listen;
    let proxy = Proxy::new(config)?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    tracing::info!(%listen, "shardgate listening");
    start(proxy.clone(), listener, metrics_listen).await?;
    wait_for_signals(&proxy, config_path).await;
    drain(&proxy).await;
    Ok(())
}

/// Starts the listener, the metrics endpoint and maintenance as tasks.
pub async fn start(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    metrics_listen: Option<std::net::SocketAddr>,
) -> anyhow::Result<()> {
    if let Some(addr) = metrics_listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for metrics on {addr}: {e}"))?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
        let p = proxy.clone();
        proxy.tasks.spawn(async move {
            if let Err(e) = crate::metrics::serve_http(l, p).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    if let Some(addr) = proxy.config.load().admin.listen {
        let l = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen for the admin API on {addr}: {e}"))?;
        tracing::info!(%addr, "admin API on {addr}");
        let p = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(p, l).await {
                tracing::error!(error = %e, "admin API failed");
            }
        });
    }
    let p = proxy.clone();
    proxy.tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => p.pools.maintain().await,
                _ = p.shutdown.cancelled() => return,
            }
        }
    });
    // Prepared transactions left by a crash, then retries of unfinished
    // commits.
    proxy.tasks.spawn(crate::twophase::run(proxy.clone()));
    // Keys and shards becoming hot or cooling, logged.
    proxy.tasks.spawn(crate::hotspot::live::run(proxy.clone()));
    // Bucket moves a previous run left unfinished.
    crate::reshard::Reshard::resume_all(&proxy);
    // Health probes, until shutdown.
    let p = proxy.clone();
    tokio::spawn(async move {
        let stop = p.shutdown.clone();
        p.health.clone().run(p.clone(), stop).await
    });
    proxy.tasks.spawn(
        Listener {
            listener,
            proxy: proxy.clone(),
        }
        .run(),
    );
    Ok(())
}

async fn wait_for_signals(proxy: &Arc<Proxy>, config_path: Option<PathBuf>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; running until the shutdown token fires");
        proxy.shutdown.cancelled().await;
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: draining"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: draining"); break; }
            _ = hup.recv() => match &config_path {
                Some(path) => match Config::load(path) {
                    Ok(c) => proxy.reload(c),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: keeping the old configuration"),
                },
                None => tracing::warn!("SIGHUP: no configuration file to reload"),
            },
            _ = proxy.shutdown.cancelled() => break,
        }
    }
}

/// Stops accepting, lets transactions finish (bounded), closes pools.
pub async fn drain(proxy: &Arc<Proxy>) {
    proxy.stop();
    proxy.tasks.close();
    let timeout = proxy.config.load().proxy.shutdown_timeout;
    if tokio::time::timeout(timeout, proxy.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(?timeout, "shutdown timeout: closing remaining connections");
    }
    proxy.pools.close_all();
}
