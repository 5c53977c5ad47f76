//! A session's server connection: checked out for a transaction (the
//! session's spare first, then the pool; a replica's for reads when one
//! qualifies), made to carry the client's session state, and given back
//! when the server reports idle with nothing outstanding, or dropped when
//! it cannot be reused.

use super::pipeline::Expect;
use super::session::{pools_for, Session};
use crate::backend::pool::PooledConn;
use crate::backend::Role;
use crate::cancel::CancelTarget;
use crate::config::PoolMode;
use crate::protocol::Frame;
use std::sync::Arc;
use std::time::Instant;

impl Session {
    /// Gets a server connection for the next transaction — a replica's
    /// when `read` and one qualifies, else the primary's — and makes it
    /// carry this client's session state. Errors are (SQLSTATE, message).
    pub(super) async fn checkout(&mut self, read: bool) -> Result<(), (String, String)> {
        if self.server.is_some() {
            return Ok(());
        }
        self.refresh_pools();
        let read = read && self.routing.replaying != Some(false);
        let mut tried = 0u64;
        loop {
            let replica = if read && self.routing.split {
                self.choose_replica(tried)?
            } else {
                None
            };
            match replica {
                None => {
                    // (It takes on the session's settings itself.)
                    self.checkout_primary().await?;
                    self.pool.metrics.routed.inc();
                    return Ok(());
                }
                Some(i) => {
                    self.pool = self.replicas[i].pool.clone();
                    match self.checkout_raw().await {
                        Ok(()) => {
                            let first = self.routing.pending_copy.take();
                            self.on_replica_attached(i, first);
                            break;
                        }
                        Err(e) if e.0.starts_with("08") => {
                            // Unreachable: out of rotation until a probe
                            // succeeds; try the next one.
                            self.replicas[i]
                                .candidate
                                .health
                                .mark_down("connect failed");
                            tried |= 1 << i.min(63);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        self.pool.metrics.routed.inc();
        self.sync_session_state().await
    }

    /// A connection to the shard's primary. While the shard has none (its
    /// primary is unreachable and failover may replace it, or a switchover
    /// holds writes) this waits up to `failover.hold_time` for a new
    /// topology epoch and then goes to the new primary.
    async fn checkout_primary(&mut self) -> Result<(), (String, String)> {
        let mut deadline = None;
        loop {
            self.pool = self.primary_pool.clone();
            // The common case costs one atomic load: no shard is held.
            let held = self.proxy.failover.any_held() && {
                let topology = self.proxy.topology.load();
                topology
                    .shards
                    .get(self.shard)
                    .is_some_and(|s| self.proxy.failover.is_held(&s.name))
            };
            let error = if held {
                None
            } else {
                // A connection that dies while taking on the session's
                // settings has run nothing of the client's: wait and retry.
                let r = match self.checkout_raw().await {
                    Ok(()) => self.sync_session_state().await,
                    Err(e) => Err(e),
                };
                match r {
                    Ok(()) => return Ok(()),
                    Err(e) if !may_be_failing_over(&e.0) => return Err(e),
                    Err(e) => Some(e),
                }
            };
            let topology = self.proxy.topology.load();
            let shard_name = topology.shards.get(self.shard).map(|s| s.name.as_str());
            if !held
                && !self
                    .proxy
                    .failover
                    .may_wait(&self.proxy, &topology, self.shard)
            {
                return Err(error.expect("not held: the checkout failed"));
            }
            let now = tokio::time::Instant::now();
            let hold = self.proxy.config.load().failover.hold_time;
            let until = *deadline.get_or_insert_with(|| {
                crate::metrics::GLOBAL.writes_held.inc();
                now + hold
            });
            if now >= until {
                let (_, why) = error.unwrap_or_default();
                return Err((
                    "08006".into(),
                    format!(
                        "shardgate: shard {:?} has no reachable primary; waited {} ms for a failover ({why})",
                        shard_name.unwrap_or("?"),
                        hold.as_millis()
                    ),
                ));
            }
            // Retry every 50 ms, or at once when a new topology appears.
            let mut changed = self.proxy.topology.subscribe();
            if changed.borrow_and_update().to_owned() == self.pool_epoch {
                let wake = until.min(now + std::time::Duration::from_millis(50));
                let _ = tokio::time::timeout_at(wake, changed.changed()).await;
            }
            self.refresh_pools();
        }
    }

    /// The replica for a read, or None for the primary.
    fn choose_replica(&mut self, tried: u64) -> Result<Option<usize>, (String, String)> {
        let config = self.proxy.config.load();
        let routing = &config.routing;
        let spare_on_replica = self
            .spare
            .as_ref()
            .is_some_and(|p| p.key.role == Role::Replica);
        if !spare_on_replica || !self.spare_may_stay() {
            // With a spare kept, the same turn picks the spare's replica
            // again while it still qualifies, for a while.
            self.routing.turn = self.routing.turn.wrapping_add(1);
        }
        match self.pick_replica(routing, tried) {
            Ok(i) => Ok(Some(i)),
            Err(reason) => {
                crate::metrics::GLOBAL
                    .read_fallbacks
                    .with_label_values(&[reason.as_str()])
                    .inc();
                if routing.no_replica == crate::config::NoReplica::Error
                    && reason != crate::router::NoReplica::ReadYourWrites
                {
                    return Err((
                        "57P03".into(),
                        format!(
                            "shardgate: no replica can take reads now ({}) and routing.no_replica = \"error\"",
                            reason.as_str()
                        ),
                    ));
                }
                Ok(None)
            }
        }
    }

    /// May a read keep to the spare's replica without a new pick? For
    /// [`REPICK_AFTER`](super::spare::REPICK_AFTER) after the connection
    /// left the pool.
    fn spare_may_stay(&self) -> bool {
        self.checked_out_at
            .saturating_duration_since(self.pooled_at)
            < super::spare::REPICK_AFTER
    }

    /// The replica a read picks at the current turn, or why none.
    fn pick_replica(
        &mut self,
        routing: &crate::config::RoutingConfig,
        tried: u64,
    ) -> Result<usize, crate::router::NoReplica> {
        let min_lsn = if routing.read_your_writes {
            self.commit_position().max(self.routing.min_lsn)
        } else {
            self.routing.min_lsn
        };
        crate::router::pick_replica(&self.replicas, routing, min_lsn, self.routing.turn, tried)
    }

    /// `checkout` for a read in its most common case with replicas,
    /// without its async layers: the session's spare is on one of the
    /// shard's replicas, the read would pick that replica again now (as
    /// `choose_replica` does while the spare may stay), and it carries the
    /// session's settings, with the topology unchanged. Then the spare is
    /// attached, and the read's first message `frame` (a Query, which
    /// `ends` the request, or a Bind) is kept for a retry elsewhere as
    /// `checkout` keeps it. False, with nothing checked out, otherwise
    /// (the spare may then be back in its pool).
    pub(super) fn attach_replica_spare(
        &mut self,
        frame: crate::protocol::frame::FrameRef<'_>,
        ends: bool,
    ) -> bool {
        if !self.routing.split
            || self.routing.replaying.is_some()
            || self.proxy.topology.epoch() != self.pool_epoch
            || !self.spare_may_stay()
            || !self
                .pipeline
                .iter()
                .all(|e| matches!(e, Expect::Synthetic { .. }))
        {
            return false;
        }
        let Some(spare) = self.spare.as_ref() else {
            return false;
        };
        let Some(i) = self
            .replicas
            .iter()
            .position(|r| Arc::ptr_eq(&r.pool, spare))
        else {
            return false;
        };
        let config = self.proxy.config.load();
        if self.pick_replica(&config.routing, 0) != Ok(i) {
            return false;
        }
        if !self.attach_spare(Some(i)) {
            return false;
        }
        self.on_replica_attached(i, Some((frame.to_frame(), ends)));
        self.pool.metrics.routed.inc();
        true
    }

    /// Replica `i`'s connection is now the session's: it counts as one
    /// more outstanding there, and the read's first message (`first`, and
    /// whether it ends the request) starts the copy kept for a retry.
    fn on_replica_attached(&mut self, i: usize, first: Option<(Frame, bool)>) {
        self.on_replica = Some(i);
        if let Some((frame, ends)) = first {
            // (The last retry's list, reused.)
            let mut frames = std::mem::take(&mut self.routing.retry_spare);
            frames.push(frame);
            self.routing.retry = Some(frames);
            self.routing.recording = !ends;
        }
        self.replicas[i]
            .candidate
            .health
            .outstanding
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Follows a topology change: the pools of the shard's servers now.
    pub(super) fn refresh_pools(&mut self) {
        // The epoch is one atomic read; the snapshot is loaded only when
        // it moved (this runs at every checkout).
        if self.proxy.topology.epoch() == self.pool_epoch {
            return;
        }
        let topology = self.proxy.topology.load();
        if topology.epoch != self.pool_epoch {
            self.shard_map = topology.sharded().cloned();
            if self.shard >= topology.shards.len() {
                self.shard = self.shard_map.as_ref().map_or(0, |m| m.default_shard);
            }
            let (primary, replicas) = pools_for(&self.proxy, &self.login, &topology, self.shard);
            self.primary_pool = primary;
            self.replicas = replicas;
            self.parked.clear();
            self.pool_epoch = topology.epoch;
            self.refresh_routing_flags();
        }
    }

    pub(super) fn refresh_routing_flags(&mut self) {
        let config = self.proxy.config.load();
        let has_replicas = !self.replicas.is_empty();
        self.routing.split =
            has_replicas && config.routing.read_write_split && self.mode == PoolMode::Transaction;
        self.routing.track_lsn = has_replicas && config.routing.read_your_writes;
    }

    /// The function catalog of this session's database (loading it in the
    /// background when missing or old).
    pub(super) fn catalog(&mut self) -> Arc<crate::router::catalog::Catalog> {
        if let (Some(c), Some(at)) = (&self.routing.catalog, self.routing.catalog_recheck_at) {
            if c.is_loaded() && self.checked_out_at < at {
                return c.clone();
            }
        }
        let config = self.proxy.config.load_full();
        let (catalog, load) = self
            .proxy
            .catalogs
            .get(&self.login.database, config.routing.catalog_refresh);
        if load {
            let (proxy, pool, db) = (
                self.proxy.clone(),
                self.primary_pool.clone(),
                self.login.database.clone(),
            );
            tokio::spawn(async move {
                proxy
                    .catalogs
                    .load(&db, &pool, &config.routing, config.pool.checkout_timeout)
                    .await;
            });
        }
        self.routing.catalog = Some(catalog.clone());
        self.routing.catalog_recheck_at =
            Instant::now().checked_add(std::time::Duration::from_secs(1));
        catalog
    }

    pub(super) async fn checkout_raw(&mut self) -> Result<(), (String, String)> {
        if self.spare.is_some() {
            let now = Instant::now();
            if let Some(conn) = self.take_spare(now) {
                self.checked_out_at = now;
                self.attach(conn);
                return Ok(());
            }
        }
        let wait = self.proxy.config.load().pool.checkout_timeout;
        // Boxed: every future that may check out (the dispatch of each
        // client message) would otherwise carry the pool's checkout future
        // (its wait timer, semaphore and deadpool state), copied whenever
        // the future moves. One allocation here, when there is no spare to
        // take. (The server connect inside it is boxed on its own, in
        // `ServerManager::create`: a checkout does not copy it.)
        let timer = self
            .wait_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(std::time::Duration::ZERO)));
        let conn = Box::pin(self.pool.checkout_timed(wait, Some(timer.as_mut())))
            .await
            .map_err(|e| e.client_error())?;
        self.checked_out_at = Instant::now();
        self.pooled_at = self.checked_out_at;
        self.attach(conn);
        Ok(())
    }

    /// `checkout` in its most common case, without its async layers: a
    /// transaction for the shard's primary (not a read a replica may
    /// take) while the session's spare is on the primary's pool and
    /// carries the session's settings, with the topology unchanged and no
    /// shard held for a failover. False, with nothing checked out,
    /// otherwise (the spare may then be back in its pool).
    pub(super) fn attach_primary_spare(&mut self, read: bool) -> bool {
        if (read && self.routing.split)
            || self.proxy.topology.epoch() != self.pool_epoch
            || self.proxy.failover.any_held()
            || !self
                .spare
                .as_ref()
                .is_some_and(|p| Arc::ptr_eq(p, &self.primary_pool))
        {
            return false;
        }
        if !self.attach_spare(None) {
            return false;
        }
        self.pool.metrics.routed.inc();
        true
    }

    /// The spare becomes the server connection for a transaction on the
    /// primary's pool, or on replica `replica`'s, when it is kept there
    /// and carries the session's settings. False, with nothing attached,
    /// otherwise (the spare may then be back in its pool).
    fn attach_spare(&mut self, replica: Option<usize>) -> bool {
        let pool = match replica {
            None => &self.primary_pool,
            Some(i) => &self.replicas[i].pool,
        };
        if !Arc::ptr_eq(&self.pool, pool) {
            self.pool = pool.clone();
        }
        let now = Instant::now();
        let Some(conn) = self.take_spare(now) else {
            return false;
        };
        if conn.session_fingerprint != self.vars.fingerprint() {
            // Settings to apply first: the general path does that.
            self.keep_spare(conn);
            return false;
        }
        self.checked_out_at = now;
        self.attach(conn);
        true
    }

    /// `conn` becomes the session's server connection.
    fn attach(&mut self, conn: PooledConn) {
        *crate::lock(&self.cancel_slot) = Some(CancelTarget {
            addr: conn.addr.clone(),
            pid: conn.pid,
            secret: conn.secret,
        });
        self.unnamed_on_server = false;
        self.server = Some(conn);
    }

    pub(super) async fn sync_session_state(&mut self) -> Result<(), (String, String)> {
        let server = self.server.as_mut().expect("checked out");
        if server.session_fingerprint == self.vars.fingerprint() {
            return Ok(());
        }
        let sql = self.vars.apply_sql();
        match server.run_internal(&sql).await {
            Ok(None) => {
                server.session_fingerprint = self.vars.fingerprint();
                Ok(())
            }
            Ok(Some(e)) => {
                // The connection's state is unknown now; do not reuse it.
                server.broken = true;
                self.drop_server();
                Err((e.code, e.message))
            }
            Err(e) => {
                self.drop_server();
                Err(("08006".into(), format!("shardgate: {e}")))
            }
        }
    }

    /// Returns the server connection to the pool when nothing is pending
    /// (first reading the session settings if the client changed them).
    pub(super) async fn maybe_release(&mut self) {
        let mut answered_at = self.answered_at.take();
        if self.mode != PoolMode::Transaction {
            return;
        }
        let Some(server) = self.server.as_mut() else {
            return;
        };
        if server.tx_status != b'I'
            || !self.pipeline.is_empty()
            || self.copy_in
            || self.skipping
            || self.pass_through > 0
            || !server.read_buf.is_empty()
        {
            return;
        }
        if self.vars.needs_capture() {
            // (After this round trip, the answer's time is old.)
            answered_at = None;
            match server.query_rows(super::vars::CAPTURE_SQL).await {
                Ok(Ok(rows)) => {
                    let rows = rows
                        .into_iter()
                        .filter_map(|mut r| {
                            let value = r.pop()??;
                            let name = r.pop()??;
                            Some((name, value))
                        })
                        .collect();
                    server.session_fingerprint = if self.vars.capture(rows) {
                        self.vars.fingerprint()
                    } else {
                        super::vars::DIRTY
                    };
                }
                Ok(Err(e)) => {
                    tracing::warn!(code = %e.code, message = %e.message, "reading session settings failed");
                    server.retire = true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading session settings failed");
                }
            }
        }
        if server.prepared.len() > self.max_prepared {
            server.retire = true;
        }
        // Keep the client's unnamed statement (re-sent if a later Bind needs
        // it) as its own copy, so it does not pin the read buffer it was
        // decoded from. Drivers send the same unnamed statement again and
        // again: the copy made last time is kept when it matches (a compare
        // instead of an allocation, a copy and a free per transaction).
        if let Some(parse) = self.unnamed_parse.as_mut() {
            if parse.body != self.unnamed_copy {
                self.unnamed_copy = bytes::Bytes::copy_from_slice(&parse.body);
            }
            parse.body = self.unnamed_copy.clone();
        }
        let now = answered_at.unwrap_or_else(Instant::now);
        server.last_released = now;
        self.pool
            .metrics
            .tx_duration
            .observe((now - self.checked_out_at).as_secs_f64());
        self.pool.metrics.transactions.inc();
        *crate::lock(&self.cancel_slot) = None;
        let conn = self.server.take().expect("checked");
        self.keep_spare(conn);
        self.routing.tx_begin = None;
        self.routing.tx_pinned = false;
        self.left_server();
    }

    /// Bookkeeping when the server connection is given up.
    pub(super) fn left_server(&mut self) {
        if self.routing.unprobed == super::routing::Unprobed::InFlight {
            // Given up idle (or dropped, which settled it first): the
            // unprobed commit has finished by now.
            self.routing.unprobed = super::routing::Unprobed::Since(Instant::now());
        }
        if let Some(i) = self.on_replica.take() {
            if let Some(r) = self.replicas.get(i) {
                r.candidate
                    .health
                    .outstanding
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        self.routing.retry = None;
    }

    /// Throws the server connection away instead of pooling it.
    pub(super) fn drop_server(&mut self) {
        if self.routing.unprobed == super::routing::Unprobed::InFlight {
            // An unprobed commit's outcome is unknown: reads of this shard
            // go to the primary from now on (read-your-writes).
            self.routing.last_commit_lsn = u64::MAX;
            self.routing.unprobed = super::routing::Unprobed::No;
        }
        if let Some(conn) = self.server.take() {
            *crate::lock(&self.cancel_slot) = None;
            drop(deadpool::managed::Object::take(conn));
            self.left_server();
        }
    }
}

/// Checkout errors that a failover may cure: the server cannot be
/// reached (08), is starting up or shutting down (57P0x), or its pool was
/// retired with it.
fn may_be_failing_over(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P0")
}
