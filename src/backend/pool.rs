//! Server connection pools: one deadpool pool per (shard, role, database,
//! user), created on first use. deadpool supplies the wait queue, sizing
//! and checkout timeouts; [`ServerManager`] supplies our connection type and
//! the checks a connection passes before it is handed to a client.
//! A maintenance task enforces idle timeout, lifetime and `min_size`.

use super::conn::{ConnectError, ConnectParams, ServerConn};
use crate::config::PoolConfig;
use crate::metrics::PoolMetrics;
use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult, Timeouts};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        }
    }
}

/// Which pool: the server (by shard, role and address, so a topology change
/// that moves a role to another server gets a fresh pool) and the login.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub shard: usize,
    pub role: Role,
    pub addr: Arc<str>,
    pub database: String,
    pub user: String,
}

impl PoolKey {
    /// A short label for logs and metrics.
    pub fn label(&self) -> String {
        format!("{}/{}@{}", self.user, self.database, self.addr)
    }
}

/// A spare (a connection a session keeps between its transactions) idle
/// this long goes back to the pool at the next maintenance pass.
pub const SPARE_IDLE: Duration = Duration::from_secs(1);

/// How deadpool makes and checks our connections.
pub struct ServerManager {
    params: ConnectParams,
    connect_timeout: Duration,
    /// Connections idle longer than this get a liveness probe at checkout.
    liveness_check_after: Duration,
    /// Connections older than this are not handed out again.
    lifetime: Duration,
    metrics: PoolMetrics,
}

impl managed::Manager for ServerManager {
    // Boxed: deadpool moves the object several times per checkout and
    // return; moving a pointer instead of the whole connection state is
    // measurably cheaper (callgrind: ~1000 instructions per transaction).
    type Type = Box<ServerConn>;
    type Error = ConnectError;

    async fn create(&self) -> Result<Box<ServerConn>, ConnectError> {
        // The connect future boxed too (a few KB of login state): deadpool's
        // checkout future embeds this one, and a checkout that waits moves
        // it, which would copy those bytes per transaction.
        let r = Box::pin(ServerConn::connect(&self.params, self.connect_timeout))
            .await
            .map(|mut c| {
                // A deadline, so the per-checkout check is one comparison.
                c.expires_at = std::time::Instant::now().checked_add(self.lifetime);
                Box::new(c)
            });
        match &r {
            Ok(_) => self.metrics.connects.inc(),
            Err(e) => {
                self.metrics.connect_errors.inc();
                tracing::warn!(server = %self.params.addr, error = %e, "server connect failed");
            }
        }
        r
    }

    async fn recycle(
        &self,
        conn: &mut Box<ServerConn>,
        _: &Metrics,
    ) -> RecycleResult<ConnectError> {
        if conn.broken || conn.retire || conn.tx_status != b'I' {
            return Err(RecycleError::message("connection not idle"));
        }
        self.reusable(conn, std::time::Instant::now())
            .map_err(RecycleError::message)
    }
}

impl ServerManager {
    /// Why an idle connection must not be handed out at `now`, if it
    /// must not: past its lifetime, or closed by the server while idle
    /// (probed only after `liveness_check_after`). For pooled connections
    /// and spares alike.
    fn reusable(&self, conn: &ServerConn, now: std::time::Instant) -> Result<(), &'static str> {
        if conn.expires_at.is_some_and(|at| now > at) {
            return Err("connection lifetime reached");
        }
        if now.saturating_duration_since(conn.last_released) > self.liveness_check_after
            && !conn.looks_alive()
        {
            tracing::debug!(server = %conn.addr, "idle server connection was closed by the server");
            return Err("connection closed by server");
        }
        Ok(())
    }
}

pub type ServerPool = managed::Pool<ServerManager>;
pub type PooledConn = Object<ServerManager>;

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no server connection available within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Connect(ConnectError),
    #[error("the pool is closed")]
    Closed,
}

impl CheckoutError {
    /// SQLSTATE and message for the client.
    pub fn client_error(&self) -> (String, String) {
        match self {
            CheckoutError::Timeout(d) => (
                "53300".into(),
                format!(
                    "shardgate: all server connections are busy; no connection became free within {} ms",
                    d.as_millis()
                ),
            ),
            CheckoutError::Connect(e) => e.client_error(),
            CheckoutError::Closed => (
                "57P01".into(),
                "shardgate: the server pool is shutting down".into(),
            ),
        }
    }
}

/// One pool and its cached metric handles.
pub struct PoolEntry {
    pub key: PoolKey,
    pub pool: ServerPool,
    pub metrics: PoolMetrics,
    /// Connections sessions keep between their transactions, by session
    /// (`frontend::spare`): checked out as far as deadpool knows, but
    /// running nothing. Kept here rather than in the session so that a
    /// checkout that would wait can take them back without waking anyone.
    shelf: Mutex<hashbrown::HashMap<u64, PooledConn>>,
    /// Checkouts waiting for a connection right now.
    waiters: AtomicUsize,
}

/// Counts a waiting checkout for as long as it waits (also when the
/// waiting future is dropped).
struct Waiting<'a>(&'a PoolEntry);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.waiting.dec();
    }
}

impl PoolEntry {
    pub async fn checkout(&self, wait: Duration) -> Result<PooledConn, CheckoutError> {
        self.checkout_timed(wait, None).await
    }

    /// `checkout`, a wait for a connection ended by `timer` when one is
    /// given (set here to the deadline). A timer the caller keeps across
    /// checkouts stays in tokio's timer wheel, and moving a registered
    /// timer's deadline later is one atomic swap; a fresh timer per wait is
    /// an insert and a removal under the timer lock (callgrind, 64 clients
    /// sharing 20 connections: about 300 instructions fewer per
    /// transaction, docs/benchmarks.md).
    pub async fn checkout_timed(
        &self,
        wait: Duration,
        timer: Option<std::pin::Pin<&mut tokio::time::Sleep>>,
    ) -> Result<PooledConn, CheckoutError> {
        // A spare before a new connection or a wait: keeping spares must
        // not make the pool grow, nor anyone wait.
        self.give_back_spare_if_none_idle();
        // Fast path: a free connection, no timer. Recycling an idle
        // connection is a few flag checks (and a non-blocking socket probe
        // for long-idle ones), so it needs no timeout either.
        let immediate = Timeouts {
            wait: Some(Duration::ZERO),
            create: None,
            recycle: None,
        };
        match self.pool.timeout_get(&immediate).await {
            Ok(conn) => return Ok(conn),
            Err(PoolError::Timeout(_)) => {}
            Err(e) => return Err(self.map_error(e, wait)),
        }
        let timeouts = Timeouts {
            wait: Some(wait),
            create: None,
            recycle: None,
        };
        self.waiters.fetch_add(1, Ordering::SeqCst);
        self.metrics.waiting.inc();
        let _waiting = Waiting(self);
        // Spares go back first: no session keeps one while others wait.
        self.give_back_spares(|_| false);
        let Some(mut timer) = timer else {
            return self
                .pool
                .timeout_get(&timeouts)
                .await
                .map_err(|e| self.map_error(e, wait));
        };
        timer.as_mut().reset(tokio::time::Instant::now() + wait);
        let untimed = Timeouts {
            wait: None,
            ..timeouts
        };
        let r = tokio::select! {
            biased;
            r = self.pool.timeout_get(&untimed) => r,
            () = timer.as_mut() => Err(PoolError::Timeout(managed::TimeoutType::Wait)),
        };
        r.map_err(|e| self.map_error(e, wait))
    }

    /// Connections running a transaction now: checked out, not kept as a
    /// spare.
    pub fn in_use(&self) -> usize {
        let s = self.pool.status();
        s.size
            .saturating_sub(s.available)
            .saturating_sub(self.spares())
    }

    /// Connections kept as spares now.
    pub fn spares(&self) -> usize {
        crate::lock(&self.shelf).len()
    }

    /// Keeps `conn`, just released idle by session `id`, as that session's
    /// spare. False (and the connection goes back to the pool) when a
    /// checkout waits, the pool is closed, or the connection must not be
    /// reused.
    pub fn shelve(&self, id: u64, conn: PooledConn) -> bool {
        if conn.broken || conn.retire || self.pool.is_closed() {
            return false;
        }
        let mut shelf = crate::lock(&self.shelf);
        // Checked under the lock a waiter takes after counting itself: a
        // waiter either sees this spare or is seen here.
        if self.waiters.load(Ordering::SeqCst) > 0 {
            return false;
        }
        shelf.insert(id, conn);
        true
    }

    /// Session `id`'s spare, if it is still kept, for a transaction
    /// starting at `now`. A spare past its lifetime, or closed by the
    /// server while idle longer than `liveness_check_after`, is not
    /// returned (the same checks a pooled connection passes).
    pub fn unshelve(&self, id: u64, now: std::time::Instant) -> Option<PooledConn> {
        let conn = crate::lock(&self.shelf).remove(&id)?;
        if self.pool.is_closed() {
            return None;
        }
        match self.pool.manager().reusable(&conn, now) {
            Ok(()) => Some(conn),
            Err(_) => {
                // Closed rather than pooled: the pool's own check would
                // only turn it away again.
                drop(Object::take(conn));
                None
            }
        }
    }

    /// Session `id`'s spare goes back to the pool.
    pub fn give_back(&self, id: u64) {
        drop(crate::lock(&self.shelf).remove(&id));
    }

    /// One spare goes back to the pool when it has no idle connection.
    fn give_back_spare_if_none_idle(&self) {
        let spare = {
            let mut shelf = crate::lock(&self.shelf);
            if shelf.is_empty() || self.pool.status().available > 0 {
                return;
            }
            let Some(&id) = shelf.keys().next() else {
                return;
            };
            shelf.remove(&id)
        };
        drop(spare);
    }

    /// Spares for which `keep` is false go back to the pool.
    fn give_back_spares(&self, keep: impl Fn(&ServerConn) -> bool) {
        let back: Vec<PooledConn> = {
            let mut shelf = crate::lock(&self.shelf);
            if shelf.is_empty() {
                return;
            }
            shelf.extract_if(|_, c| !keep(c)).map(|(_, c)| c).collect()
        };
        // Dropped outside the lock: each returns to deadpool.
        drop(back);
    }

    /// Closes the pool: idle connections and spares close, checkouts fail.
    pub fn close(&self) {
        self.pool.close();
        self.give_back_spares(|_| false);
    }

    fn map_error(&self, e: PoolError<ConnectError>, wait: Duration) -> CheckoutError {
        match e {
            PoolError::Timeout(_) => {
                self.metrics.checkout_timeouts.inc();
                CheckoutError::Timeout(wait)
            }
            PoolError::Backend(e) => CheckoutError::Connect(e),
            PoolError::PostCreateHook(_) | PoolError::NoRuntimeSpecified | PoolError::Closed => {
                CheckoutError::Closed
            }
        }
    }
}

/// All pools, keyed by [`PoolKey`].
pub struct Pools {
    pools: RwLock<HashMap<PoolKey, Arc<PoolEntry>>>,
    settings: RwLock<PoolConfig>,
}

impl Pools {
    pub fn new(settings: PoolConfig) -> Pools {
        Pools {
            pools: RwLock::new(HashMap::new()),
            settings: RwLock::new(settings),
        }
    }

    /// The pool for `key`, created on first use.
    pub fn get_or_create(
        &self,
        key: &PoolKey,
        password: Option<&str>,
        max_size: Option<usize>,
    ) -> Arc<PoolEntry> {
        if let Some(p) = crate::read(&self.pools).get(key) {
            return p.clone();
        }
        let mut pools = crate::write(&self.pools);
        if let Some(p) = pools.get(key) {
            return p.clone();
        }
        let s = crate::read(&self.settings).clone();
        let metrics = PoolMetrics::new(&key.label(), key.role.as_str(), &key.addr);
        let manager = ServerManager {
            params: ConnectParams {
                addr: key.addr.to_string(),
                database: key.database.clone(),
                user: key.user.clone(),
                password: password.map(str::to_owned),
            },
            connect_timeout: s.connect_timeout,
            liveness_check_after: s.liveness_check_after,
            lifetime: s.server_lifetime,
            metrics: metrics.clone(),
        };
        let pool = managed::Pool::builder(manager)
            .max_size(max_size.unwrap_or(s.max_size))
            .queue_mode(managed::QueueMode::Lifo)
            .create_timeout(Some(s.connect_timeout))
            .runtime(deadpool::Runtime::Tokio1)
            .build()
            .expect("a runtime is set, so building cannot fail");
        let entry = Arc::new(PoolEntry {
            key: key.clone(),
            pool,
            metrics,
            shelf: Mutex::new(hashbrown::HashMap::new()),
            waiters: AtomicUsize::new(0),
        });
        pools.insert(key.clone(), entry.clone());
        entry
    }

    pub fn all(&self) -> Vec<Arc<PoolEntry>> {
        crate::read(&self.pools).values().cloned().collect()
    }

    /// Applies reloaded sizes: the default size to every pool unless a
    /// per-user size is given by `user_size`.
    pub fn apply_settings(&self, settings: PoolConfig, user_size: impl Fn(&str) -> Option<usize>) {
        for p in self.all() {
            let size = user_size(&p.key.user).unwrap_or(settings.max_size);
            if p.pool.status().max_size != size {
                tracing::info!(pool = %p.key.label(), size, "resizing pool");
                p.pool.resize(size);
            }
        }
        *crate::write(&self.settings) = settings;
    }

    /// One maintenance pass: close connections idle past the idle timeout
    /// (keeping `min_size`) or past their lifetime, then open connections up
    /// to `min_size`; forget pools nobody uses (a client probing database
    /// names, or servers a newer topology no longer lists).
    pub async fn maintain(&self) {
        let s = crate::read(&self.settings).clone();
        crate::write(&self.pools).retain(|_, p| {
            // Only the map holds it: no session uses it, and it is empty.
            Arc::strong_count(p) > 1 || p.pool.status().size > 0
        });
        for p in self.all() {
            // Spares idle for a while go back, so that idle timeout,
            // lifetime and liveness checks apply to them as in the pool
            // (and the spare of a session that ended without giving it
            // back does not stay out).
            p.give_back_spares(|c| c.last_released.elapsed() < SPARE_IDLE);
            let status = p.pool.status();
            let mut removable = status.size.saturating_sub(s.min_size);
            let removed = p.pool.retain(|conn, m| {
                let expired =
                    m.age() > s.server_lifetime || conn.last_released.elapsed() > s.idle_timeout;
                if expired && removable > 0 {
                    removable -= 1;
                    false
                } else {
                    true
                }
            });
            if !removed.removed.is_empty() {
                tracing::debug!(pool = %p.key.label(), closed = removed.removed.len(), "closed idle server connections");
            }
            let status = p.pool.status();
            let missing = s.min_size.min(status.max_size).saturating_sub(status.size);
            if missing > 0 {
                let mut held = Vec::with_capacity(missing);
                for _ in 0..missing {
                    match p.checkout(s.connect_timeout).await {
                        Ok(c) => held.push(c),
                        Err(e) => {
                            tracing::warn!(pool = %p.key.label(), error = %e, "could not open min_size connections");
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Closes the pools of the server at `addr` (a fenced former primary):
    /// idle connections close, checkouts fail, and the pools are forgotten.
    pub fn retire(&self, addr: &str) {
        crate::write(&self.pools).retain(|k, p| {
            let keep = &*k.addr != addr;
            if !keep {
                p.close();
            }
            keep
        });
    }

    /// Connections to `addr` checked out now (transactions running there).
    pub fn in_use(&self, addr: &str) -> usize {
        crate::read(&self.pools)
            .iter()
            .filter(|(k, _)| &*k.addr == addr)
            .map(|(_, p)| p.in_use())
            .sum()
    }

    /// Closes every pool (shutdown).
    pub fn close_all(&self) {
        for p in self.all() {
            p.close();
        }
    }
}
