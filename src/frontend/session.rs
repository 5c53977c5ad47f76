//! One client's session after authentication.
//!
//! The loop reads client messages ([`super::client_msgs`]) and, while a
//! server connection is checked out, server messages
//! ([`super::server_msgs`]), forwarding raw bytes both ways. In transaction
//! pooling the server connection is checked out when a message needs a
//! server and returned as soon as the server reports idle (ReadyForQuery
//! 'I') with nothing outstanding; in session pooling it is held to the end
//! (checkout, attach and release: [`super::checkout`]).

use super::pipeline::{Expect, Pipeline};
use super::startup::Login;
use super::statements::Statement;
use super::vars::SessionVars;
use crate::backend::pool::{PoolEntry, PooledConn};
use crate::backend::{PoolKey, Role};
use crate::cancel::CancelSlot;
use crate::config::PoolMode;
use crate::metrics::count_error;
use crate::protocol::backend as be;
use crate::protocol::Frame;
use crate::proxy::Proxy;
use bytes::BytesMut;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Maps keyed by names a client chooses, looked up on every Bind: hashbrown
/// with its default hasher (foldhash, randomly seeded per process) is
/// several times cheaper than SipHash, and a map belongs to one session,
/// so a client colliding keys only slows itself.
pub(super) type FastMap<K, V> = hashbrown::HashMap<K, V>;

/// Why a session ends. Only `Fatal` tells the client anything.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("client i/o: {0}")]
    ClientIo(std::io::Error),
    #[error("client closed the connection")]
    ClientGone,
    #[error("{code}: {message}")]
    Fatal { code: String, message: String },
    #[error("client terminated the session")]
    Terminate,
    /// A replica went away while a read on it could still be re-run
    /// elsewhere; the session loop re-runs it (never reaches the client).
    #[error("replica connection lost before it answered")]
    ReplicaGone,
}

pub struct Session {
    pub(super) proxy: Arc<Proxy>,
    pub(super) client: TcpStream,
    /// Client bytes not yet decoded (at most one partial message).
    pub(super) client_buf: BytesMut,
    pub(super) to_client: BytesMut,
    pub(super) to_server: BytesMut,
    pub(super) login: Login,
    pub(super) mode: PoolMode,
    pub(super) max_message_size: usize,
    /// `pool.max_prepared_statements`.
    pub(super) max_prepared: usize,
    /// The pool of the server connection held (or last held).
    pub(super) pool: Arc<PoolEntry>,
    pub(super) pool_epoch: u64,
    /// The shard's primary pool and its replicas (rebuilt on a topology
    /// change).
    pub(super) primary_pool: Arc<PoolEntry>,
    pub(super) replicas: Vec<ReplicaSlot>,
    /// The shard whose pools `primary_pool` and `replicas` are.
    pub(super) shard: usize,
    /// Other shards' pools, kept while the session uses another shard.
    pub(super) parked: Vec<Option<(Arc<PoolEntry>, Vec<ReplicaSlot>)>>,
    /// Per shard: the session's last commit position there, and whether
    /// a later commit went unprobed.
    pub(super) commit_lsns: Vec<(u64, super::routing::Unprobed)>,
    /// The bucket map when there are several shards to choose from.
    pub(super) shard_map: Option<Arc<crate::sharding::map::ShardMap>>,
    /// Counts a statement running on several shards (bucket moves wait
    /// for it).
    pub(super) scatter_guard: Option<crate::reshard::ScatterGuard>,
    /// Which replica the held server connection belongs to (None: the
    /// primary).
    pub(super) on_replica: Option<usize>,
    pub(super) routing: RoutingState,
    pub(super) server: Option<PooledConn>,
    /// The pool whose shelf keeps this session's spare: the server
    /// connection of its last transaction, kept for the next one (see
    /// [`super::spare`]).
    pub(super) spare: Option<Arc<PoolEntry>>,
    /// This session's name on pool shelves.
    pub(super) spare_id: u64,
    /// When the connection held or kept now came out of its pool.
    pub(super) pooled_at: Instant,
    /// `pool.keep_spare` when the client connected.
    pub(super) keep_spare: bool,
    /// Completes when the proxy shuts down. One future for the whole
    /// session: registered with the token once, not at every idle wait.
    shutdown_wait: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
    /// `shutdown_wait` has been polled and registered its waker.
    shutdown_armed: bool,
    pub(super) checked_out_at: Instant,
    /// Responses the server still owes, in order.
    pub(super) pipeline: Pipeline,
    /// After an error in the extended protocol, Postgres discards messages
    /// until Sync; the proxy does the same for messages it would handle.
    pub(super) skipping: bool,
    /// The server is in COPY FROM STDIN: Sync and Flush are ignored by it.
    pub(super) copy_in: bool,
    /// Bytes of a large server message still to forward unexamined.
    pub(super) pass_through: usize,
    /// `to_client` is a zero-copy slice of the server read buffer.
    pub(super) to_client_shares_read_buf: bool,
    /// Client statement name -> proxy-wide statement (transaction mode).
    pub(super) statements: FastMap<String, Arc<Statement>>,
    /// The last unnamed Parse, re-sent if a later Bind lands on another
    /// server connection; and whether the current server has it.
    pub(super) unnamed_parse: Option<Frame>,
    pub(super) unnamed_on_server: bool,
    /// The body `unnamed_parse` was last copied to at a release.
    pub(super) unnamed_copy: bytes::Bytes,
    /// Ends a checkout's wait for a connection; kept from one wait to the
    /// next (see `PoolEntry::checkout_timed`).
    pub(super) wait_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    pub(super) vars: SessionVars,
    pub(super) request_started: Option<Instant>,
    /// When the server last answered a request (its ReadyForQuery), for
    /// the release right after it: one clock read less per transaction.
    /// Taken by the next `maybe_release`, released or not.
    pub(super) answered_at: Option<Instant>,
    pub(super) cancel_key: (i32, i32),
    pub(super) cancel_slot: CancelSlot,
}

/// A replica of the session's shard: its pool, and what the router weighs.
pub(super) struct ReplicaSlot {
    pub pool: Arc<PoolEntry>,
    pub candidate: crate::router::Candidate,
}

impl AsRef<crate::router::Candidate> for ReplicaSlot {
    fn as_ref(&self) -> &crate::router::Candidate {
        &self.candidate
    }
}

/// Read/write splitting state of one session.
#[derive(Default)]
pub(super) struct RoutingState {
    /// Reads may go to replicas (transaction pooling, splitting on, the
    /// shard has replicas).
    pub split: bool,
    /// For the cross-shard read being placed while a bucket move is under
    /// way: per shard index, the buckets it holds copies of but does not
    /// own (its part of the read leaves them out).
    pub scatter_exclusions: Vec<(usize, Vec<u32>)>,
    /// Learn commit positions (read-your-writes on, the shard has
    /// replicas).
    pub track_lsn: bool,
    pub target: crate::router::TargetOverride,
    /// The session's last commit on the primary (its insert position right
    /// after the commit).
    pub last_commit_lsn: u64,
    /// A commit after `last_commit_lsn` whose position was not probed
    /// (the session was pinned to the primary).
    pub unprobed: super::routing::Unprobed,
    /// `SET shardgate.min_lsn`: reads at least this fresh.
    pub min_lsn: u64,
    /// The last text classified by `classify_repeated`, and its class.
    pub last_class: super::routing::LastClass,
    /// A write may have committed since the last position probe: probe
    /// after the next Sync.
    pub lsn_due: bool,
    /// A COPY may have written: probe when the client ends it (Some(true):
    /// simple protocol, right after CopyDone; Some(false): at the next
    /// Sync).
    pub copy_lsn: Option<bool>,
    /// A BEGIN the proxy answered itself while no server is held: its text
    /// and whether the transaction may run on a replica. It is sent in
    /// front of the client's next statement.
    pub pending_begin: Option<(bytes::Bytes, bool)>,
    /// The next CommandComplete `BEGIN` answers that deferred BEGIN.
    pub drop_begin_tag: bool,
    /// `shardgate.*` commands prepared through the extended protocol:
    /// statement name -> text, portal name -> text.
    pub proxy_stmts: FastMap<String, String>,
    pub proxy_portals: FastMap<Vec<u8>, String>,
    /// The next simple Query is a replay of a statement a replica refused
    /// as a write: probe the commit position after it.
    pub force_probe: bool,
    /// The position the in-flight probe returned.
    pub probed_lsn: Option<u64>,
    /// Round-robin counter.
    pub turn: usize,
    pub catalog: Option<Arc<crate::router::catalog::Catalog>>,
    /// When the catalog is next looked up (a second after the last time).
    pub catalog_recheck_at: Option<Instant>,
    /// The client messages sent to a replica since it was checked out, kept
    /// while no answer to them has reached the client: they can be re-run
    /// elsewhere if the replica goes away (or refuses a write).
    pub retry: Option<Vec<Frame>>,
    /// The last `retry`'s list, emptied, for the next one (a replica read
    /// of several messages would otherwise allocate and grow a list).
    pub retry_spare: Vec<Frame>,
    /// Still adding messages to `retry` (until the Sync or Query).
    pub recording: bool,
    /// The message being handled, and whether it ends its request: becomes
    /// `retry` if it checks out a replica.
    pub pending_copy: Option<(Frame, bool)>,
    /// The class `inline_query` found for the Query it handed back to the
    /// general path (a read for a replica, or no spare): used there
    /// instead of classifying the text again, and cleared after that
    /// message.
    pub handed_class: Option<crate::router::classify::Class>,
    /// The FATAL error a primary sent before closing a connection whose
    /// loss the client will be told of as an ERROR.
    pub lost_error: Option<crate::protocol::backend::ErrorFields>,
    /// Server answers held back while the request may still be re-run.
    pub held: bytes::BytesMut,
    /// The replica refused it as a write (25006): re-run on the primary at
    /// its ReadyForQuery.
    pub retry_on_primary: bool,
    /// The last client message dispatched did not end a request (no Sync
    /// or Query yet).
    pub batch_open: bool,
    /// Client input is held back until the replica connection is free
    /// (see `must_wait_for_replica`).
    pub paused: bool,
    /// A replay is running: Some(true) routes reads again, Some(false)
    /// sends everything to the primary; no second replay is armed.
    pub replaying: Option<bool>,
    /// Parses held back until the shard is known (sharding).
    pub owed: Vec<super::sharding::Owed>,
    /// `SET shardgate.sharding_key` / `shardgate.shard`: where statements
    /// go when they carry no hint of their own.
    pub shard_setting: Option<super::sharding::ShardHint>,
    /// The result of a cross-shard statement bound but not yet executed
    /// (gone at Sync, like the portal it stands for).
    pub scatter_portal: Option<super::scatter::ScatterPortal>,
    /// The BEGIN that started the open transaction (known when the proxy
    /// deferred it): a transaction that moves on to another shard begins
    /// there the same way.
    pub tx_begin: Option<String>,
    /// The open transaction used SAVEPOINT, SET LOCAL or SET TRANSACTION:
    /// it cannot spread to another shard (those act on one server).
    pub tx_pinned: bool,
    /// Target shard of a statement that moves the open transaction on to
    /// another shard (set by `route_shard`, done by `switch_tx_shard`).
    pub switch_to: Option<usize>,
    /// Servers of the other shards the open transaction has written to,
    /// in its own transaction on each: committed together (two-phase) at
    /// COMMIT.
    pub tx_parked: Vec<(usize, PooledConn)>,
    /// The load counters' view of the request under way: the sharding
    /// key of the statement being placed, and what the request did so far.
    pub key_hit: Option<crate::hotspot::KeyHit>,
    pub load: crate::hotspot::Request,
}

impl Session {
    pub async fn run(client: TcpStream, client_buf: BytesMut, login: Login, proxy: Arc<Proxy>) {
        let config = proxy.config.load_full();
        let (cancel_key, cancel_slot) = proxy.cancels.register();
        let topology = proxy.topology.load();
        let shard_map = topology.sharded().cloned();
        let shard = shard_map.as_ref().map_or(0, |m| m.default_shard);
        let (pool, replicas) = pools_for(&proxy, &login, &topology, shard);
        let mut s = Session {
            shard,
            parked: Vec::new(),
            commit_lsns: Vec::new(),
            shard_map,
            scatter_guard: None,
            mode: config.proxy.pool_mode,
            max_message_size: config.proxy.max_message_size,
            max_prepared: config.pool.max_prepared_statements,
            pool_epoch: topology.epoch,
            primary_pool: pool.clone(),
            pool,
            replicas,
            on_replica: None,
            routing: RoutingState::default(),
            client,
            client_buf,
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
            login,
            server: None,
            spare: None,
            spare_id: super::spare::new_id(),
            pooled_at: Instant::now(),
            keep_spare: config.pool.keep_spare,
            shutdown_wait: Box::pin(proxy.shutdown.clone().cancelled_owned()),
            shutdown_armed: false,
            checked_out_at: Instant::now(),
            pipeline: Pipeline::new(),
            skipping: false,
            copy_in: false,
            pass_through: 0,
            to_client_shares_read_buf: false,
            statements: FastMap::default(),
            unnamed_parse: None,
            unnamed_on_server: false,
            unnamed_copy: bytes::Bytes::new(),
            wait_timer: None,
            vars: SessionVars::default(),
            request_started: None,
            answered_at: None,
            cancel_key,
            cancel_slot,
            proxy,
        };
        s.refresh_routing_flags();
        // Sessions start their round-robin at different replicas.
        s.routing.turn = s.cancel_key.1 as u32 as usize;
        let result = match s.start().await {
            Ok(()) => s.serve().await,
            Err(e) => Err(e),
        };
        match result {
            Err(SessionError::Fatal { code, message }) => {
                count_error(code.as_bytes());
                be::error_response("FATAL", &code, &message).encode(&mut s.to_client);
                let _ = s.flush_client().await;
            }
            Err(SessionError::ClientIo(e)) => tracing::debug!(error = %e, "client i/o error"),
            _ => {}
        }
        s.finish().await;
        let _ = s.client.shutdown().await;
        s.proxy.cancels.unregister(s.cancel_key);
    }

    /// After authentication: check the database and user on a real server,
    /// apply the client's startup settings, and report parameters.
    async fn start(&mut self) -> Result<(), SessionError> {
        let settings = std::mem::take(&mut self.login.settings);
        // shardgate.* settings (`options=-c shardgate.target=primary` in a
        // connection string) are the proxy's, never sent to servers.
        let (ours, settings): (Vec<_>, Vec<_>) = settings
            .into_iter()
            .partition(|(k, _)| k.to_ascii_lowercase().starts_with("shardgate."));
        for (name, value) in ours {
            self.set_startup_option(&name, &value)
                .map_err(|(code, message)| SessionError::Fatal {
                    code: code.into(),
                    message,
                })?;
        }
        self.checkout_raw()
            .await
            .map_err(|(code, message)| SessionError::Fatal { code, message })?;
        let server = self.server.as_ref().expect("checked out");
        // Keep only settings that differ from what a fresh server connection
        // reports, so a client that asks for the defaults costs nothing per
        // transaction. (Not the connection's current values: another
        // client's settings may be applied to it right now.)
        let settings: Vec<(String, String)> = settings
            .into_iter()
            .filter(|(k, v)| {
                server
                    .initial_params
                    .iter()
                    .find(|(n, _)| n.eq_ignore_ascii_case(k))
                    .is_none_or(|(_, cur)| cur != v)
            })
            .collect();
        self.vars = SessionVars::new(settings);
        self.sync_session_state()
            .await
            .map_err(|(code, message)| SessionError::Fatal { code, message })?;
        let server = self.server.as_ref().expect("checked out");
        let mut params: Vec<(&String, &String)> = server.params.iter().collect();
        params.sort();
        for (k, v) in params {
            be::parameter_status(k, v).encode(&mut self.to_client);
        }
        be::backend_key_data(self.cancel_key.0, self.cancel_key.1).encode(&mut self.to_client);
        be::ready_for_query(b'I').encode(&mut self.to_client);
        self.flush_client().await?;
        self.maybe_release().await;
        Ok(())
    }

    async fn serve(&mut self) -> Result<(), SessionError> {
        loop {
            if self.routing.paused && !self.must_wait_for_replica() {
                // Input held back while a replica answered: go on with it.
                self.routing.paused = false;
                self.client_step().await?;
                continue;
            }
            if self.server.is_none() {
                if self.proxy.stopping() {
                    return Err(shutdown_error());
                }
                self.release_idle_buffers();
                let n = if self.client_buf.capacity() - self.client_buf.len() >= 512 {
                    // The buffer was kept (few clients): wait in the read
                    // itself, one readiness check fewer per transaction.
                    let (client, buf, proxy) =
                        (&mut self.client, &mut self.client_buf, &self.proxy);
                    let (wait, armed) = (&mut self.shutdown_wait, &mut self.shutdown_armed);
                    tokio::select! {
                        biased;
                        r = client.read_buf(buf) => r.map_err(SessionError::ClientIo)?,
                        _ = std::future::poll_fn(|cx| poll_stop(wait.as_mut(), armed, proxy, cx)) => {
                            return Err(shutdown_error())
                        }
                    }
                } else {
                    match self.wait_then_read().await? {
                        Some(n) => n,
                        None => continue,
                    }
                };
                if n == 0 {
                    return Err(SessionError::ClientGone);
                }
                self.client_step().await?;
            } else {
                let server: &mut crate::backend::ServerConn =
                    self.server.as_mut().expect("checked");
                let (stream, read_buf) = (&mut server.stream, &mut server.read_buf);
                if self.client_buf.capacity() - self.client_buf.len() < 512 {
                    self.client_buf.reserve(READ_CHUNK);
                }
                if read_buf.capacity() - read_buf.len() < 1024 {
                    read_buf.reserve(SERVER_READ_CHUNK);
                }
                // Server first: its answers drain before more client
                // input is taken (and no random branch order per wait).
                tokio::select! {
                    biased;
                    r = stream.read_buf(read_buf) => {
                        match r {
                            Ok(n) if n > 0 => {
                                self.routing.load.bytes += n as u64;
                                self.on_server_data().await?
                            }
                            _ => self.on_server_eof().await?,
                        }
                    }
                    r = self.client.read_buf(&mut self.client_buf) => {
                        if r.map_err(SessionError::ClientIo)? == 0 {
                            return Err(SessionError::ClientGone);
                        }
                        self.client_step().await?;
                    }
                }
            }
        }
    }

    /// An idle client without a kept buffer: wait for input without one
    /// (10,000 idle clients hold no buffer memory), then read. None: the
    /// readiness was stale; wait again.
    async fn wait_then_read(&mut self) -> Result<Option<usize>, SessionError> {
        let (client, proxy) = (&self.client, &self.proxy);
        let (wait, armed) = (&mut self.shutdown_wait, &mut self.shutdown_armed);
        // poll_read_ready, not readable(): the socket's own waker slot
        // instead of a waiter list taken and left per wait.
        tokio::select! {
            biased;
            r = std::future::poll_fn(|cx| client.poll_read_ready(cx)) => {
                r.map_err(SessionError::ClientIo)?
            }
            _ = std::future::poll_fn(|cx| poll_stop(wait.as_mut(), armed, proxy, cx)) => {
                return Err(shutdown_error())
            }
        };
        self.client_buf.reserve(READ_CHUNK);
        // One poll of an AsyncRead read (not try_read): tokio sees a short
        // read and skips the EAGAIN read after it. Readiness can be stale;
        // then the poll clears it and we wait again (still watching for
        // shutdown).
        let read = self.client.read_buf(&mut self.client_buf);
        let mut read = std::pin::pin!(read);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match read.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(r) => r.map(Some).map_err(SessionError::ClientIo),
            std::task::Poll::Pending => Ok(None),
        }
    }

    /// With many clients connected, an idle client holds no buffer memory
    /// (10,000 idle clients must fit in a small footprint); with few, a
    /// client keeps its buffers between transactions, which saves an
    /// allocation and a free per buffer per transaction.
    fn release_idle_buffers(&mut self) {
        const KEEP_BUFFERS_BELOW_CLIENTS: i64 = 1000;
        const MAX_KEPT: usize = 64 * 1024;
        let crowded = crate::metrics::GLOBAL.clients_active.get() >= KEEP_BUFFERS_BELOW_CLIENTS;
        if self.client_buf.is_empty() && (crowded || self.client_buf.capacity() > MAX_KEPT) {
            self.client_buf = BytesMut::new();
        }
        if crowded || self.to_client.capacity() > MAX_KEPT {
            self.to_client = BytesMut::new();
        }
        if crowded || self.to_server.capacity() > MAX_KEPT {
            self.to_server = BytesMut::new();
        }
        if crowded {
            self.routing.retry_spare = Vec::new();
            self.unnamed_copy = bytes::Bytes::new();
            self.wait_timer = None;
        }
    }

    /// Handles buffered client input; a replica lost in the middle of it
    /// is recovered from by re-running the read elsewhere.
    async fn client_step(&mut self) -> Result<(), SessionError> {
        loop {
            match self.on_client_data().await {
                Err(SessionError::ReplicaGone) => self.on_server_eof().await?,
                r => return r,
            }
        }
    }

    async fn on_client_data(&mut self) -> Result<(), SessionError> {
        self.handle_client_messages().await?;
        self.flush_server().await?;
        self.flush_client().await?;
        self.maybe_release().await;
        Ok(())
    }

    async fn on_server_data(&mut self) -> Result<(), SessionError> {
        self.handle_server_bytes()?;
        self.flush_client().await?;
        if self.routing.retry_on_primary && self.pipeline.is_empty() {
            // The replica refused the read as a write and is idle again.
            self.routing.retry_on_primary = false;
            let frames = self.routing.retry.take();
            self.maybe_release().await;
            if self.server.is_some() {
                self.drop_server();
            }
            self.routing.retry = frames;
            return self.replay_read(false).await;
        }
        self.maybe_release().await;
        Ok(())
    }

    /// The server closed the connection. A read sent to a replica that
    /// has not answered yet is re-run elsewhere; anything else is lost
    /// with the connection.
    async fn on_server_eof(&mut self) -> Result<(), SessionError> {
        let Some(i) = self.on_replica.filter(|_| self.routing.retry.is_some()) else {
            if self.primary_loss_recoverable() {
                self.recover_primary_loss();
                self.flush_client().await?;
                return Ok(());
            }
            return Err(self.server_lost());
        };
        let replica = &self.replicas[i];
        replica.candidate.health.mark_down("connection lost");
        // Its other pooled connections are most likely dead too.
        replica.pool.pool.retain(|_, _| false);
        if let Some(s) = self.server.as_mut() {
            s.broken = true;
        }
        let frames = self.routing.retry.take();
        self.drop_server();
        self.routing.retry = frames;
        self.replay_read(true).await
    }

    /// Re-runs the client messages kept in `routing.retry` on another
    /// server: after a replica vanished (`read`: route as a read again;
    /// that replica is now down) or refused the statement as a write (on
    /// the primary). Done at most once per request.
    async fn replay_read(&mut self, read: bool) -> Result<(), SessionError> {
        let Some(frames) = self.routing.retry.take() else {
            return Ok(());
        };
        crate::metrics::GLOBAL.read_retries.inc();
        tracing::debug!(
            read,
            messages = frames.len(),
            "re-running a read on another server"
        );
        // Answers the proxy gave itself before the read (a ParseComplete of
        // a known statement) still go out; the dead server's do not.
        self.routing.held.clear();
        self.emit_ready_synthetics();
        self.pipeline.clear();
        self.skipping = false;
        self.copy_in = false;
        self.pass_through = 0;
        self.unnamed_on_server = false;
        for f in &frames {
            if f.tag == crate::protocol::frontend::PARSE {
                if let Ok(p) = crate::protocol::frontend::parse_parse(&f.body) {
                    self.statements.remove(p.name);
                }
            }
        }
        self.routing.replaying = Some(read);
        // Refused as a write: learn the commit position after it runs.
        self.routing.force_probe = !read;
        let mut result = Ok(());
        for f in frames {
            result = self.handle_client_message(f).await;
            if result.is_err() {
                break;
            }
        }
        self.routing.replaying = None;
        self.routing.force_probe = false;
        result?;
        self.emit_ready_synthetics();
        self.flush_server().await?;
        self.flush_client().await
    }

    /// The primary's connection died while it owed the client nothing, or
    /// answers to whole requests that began no transaction the client
    /// knows of: the client can be told with errors and keep its session
    /// (its next statement waits for the failover). Inside a transaction,
    /// or with a half-forwarded message or an unfinished batch
    /// outstanding, it cannot.
    ///
    /// Recovery leaves the session skipping to the next Sync when the last
    /// request it failed had not reached its Sync (the client's current
    /// message, whose statement the proxy was preparing).
    pub(super) fn primary_loss_recoverable(&self) -> bool {
        self.on_replica.is_none()
            && self.mode == PoolMode::Transaction
            && self.server.as_ref().is_some_and(|s| s.tx_status == b'I')
            && self.routing.tx_begin.is_none()
            && self.pass_through == 0
            && !self.copy_in
            && self
                .pipeline
                .iter()
                .rev()
                .find(|e| !matches!(e, Expect::LsnProbe))
                .is_none_or(|e| e.is_sync_point())
            || self.pipeline.iter().all(|e| {
                // Only the proxy's own preparation of a statement for
                // the client's current message is outstanding.
                matches!(
                    e,
                    Expect::Parse { injected: true, .. }
                        | Expect::ShapeCheck { .. }
                        | Expect::LsnProbe
                )
            })
    }

    /// Answers what the lost connection still owed the way Postgres
    /// answers a failed request: the first request (partly answered,
    /// perhaps) fails where it stands; each later one gets the answers the
    /// proxy makes itself up to its first message that needed the server,
    /// which fails; every request ends with ReadyForQuery. The error is
    /// class 08 — the outcome is unknown, so nothing is re-run. The pool's
    /// other idle connections to that server are dropped.
    pub(super) fn recover_primary_loss(&mut self) {
        let addr = self.server.as_ref().map(|s| s.addr.clone());
        if let Some(s) = self.server.as_mut() {
            s.broken = true;
        }
        self.pool.pool.retain(|_, _| false);
        self.drop_server();
        if self.pipeline.iter().any(|e| matches!(e, Expect::LsnProbe)) {
            // The position of a commit the client was told of is lost: its
            // reads go to the primary from now on (read-your-writes).
            self.routing.last_commit_lsn = u64::MAX;
        }
        if self.pipeline.iter().all(|e| matches!(e, Expect::LsnProbe)) {
            // Nothing owed: the server went away between requests.
            self.pipeline.clear();
            tracing::debug!(server = ?addr, "idle primary connection lost");
            return;
        }
        tracing::warn!(server = ?addr, "primary connection lost; the client's outstanding requests failed");
        self.routing.held.clear();
        self.routing.retry = None;
        self.skipping = false;
        self.unnamed_on_server = false;
        self.request_started = None;
        let shard = self
            .proxy
            .topology
            .load()
            .shards
            .get(self.shard)
            .map_or_else(String::new, |s| s.name.clone());
        let why = match self.routing.lost_error.take() {
            Some(e) => format!(" ({}: {})", e.code, e.message),
            None => String::new(),
        };
        let error = be::error_response(
            "ERROR",
            "08006",
            &format!(
                "shardgate: lost the connection to the primary of shard {shard:?} before it answered{why}; the statement may or may not have taken effect"
            ),
        );
        let mut failed = false;
        let fail = |s: &mut Session, failed: &mut bool| {
            if !*failed {
                count_error(b"08006");
                error.encode(&mut s.to_client);
                *failed = true;
            }
        };
        fail(self, &mut failed);
        for e in std::mem::take(&mut self.pipeline) {
            match e {
                Expect::LsnProbe | Expect::ShapeCheck { .. } => {}
                Expect::Sync => {
                    be::ready_for_query(b'I').encode(&mut self.to_client);
                    failed = false;
                }
                Expect::Query | Expect::FunctionCall => {
                    fail(self, &mut failed);
                    be::ready_for_query(b'I').encode(&mut self.to_client);
                    failed = false;
                }
                Expect::Synthetic { frame, .. } if frame.tag == be::READY_FOR_QUERY => {
                    frame.encode(&mut self.to_client);
                    failed = false;
                }
                Expect::Synthetic { frame, .. } if !failed => frame.encode(&mut self.to_client),
                other => {
                    if !matches!(other, Expect::Synthetic { .. }) {
                        fail(self, &mut failed);
                    }
                    self.undo(other);
                }
            }
        }
        // A request cut short before its Sync: skip the rest of it, as
        // Postgres does after an error.
        self.skipping = failed;
    }

    /// The server connection died under a client: like a crashed backend,
    /// the client is told and disconnected.
    #[track_caller]
    pub(super) fn server_lost(&mut self) -> SessionError {
        if let Some(s) = self.server.as_mut() {
            s.broken = true;
            tracing::warn!(server = %s.addr, at = %std::panic::Location::caller(), "server closed the connection unexpectedly");
        }
        SessionError::Fatal {
            code: "08006".into(),
            message: "shardgate: server closed the connection unexpectedly".into(),
        }
    }

    pub(super) async fn flush_client(&mut self) -> Result<(), SessionError> {
        if !self.to_client.is_empty() {
            write_all(&mut self.client, &self.to_client)
                .await
                .map_err(SessionError::ClientIo)?;
            if self.to_client_shares_read_buf {
                // Let go of the server read buffer so it can be reused.
                self.to_client = BytesMut::new();
                self.to_client_shares_read_buf = false;
            } else {
                self.to_client.clear();
            }
        }
        Ok(())
    }

    pub(super) async fn flush_server(&mut self) -> Result<(), SessionError> {
        if self.to_server.is_empty() {
            return Ok(());
        }
        let Some(server) = self.server.as_mut() else {
            self.to_server.clear();
            return Ok(());
        };
        if write_all(&mut server.stream, &self.to_server)
            .await
            .is_err()
        {
            if (self.routing.retry.is_some() && self.on_replica.is_some())
                || self.primary_loss_recoverable()
            {
                // A replica that vanished under a read: the read side sees
                // the closed connection next and re-runs the read.
                self.to_server.clear();
                return Ok(());
            }
            return Err(self.server_lost());
        }
        self.to_server.clear();
        Ok(())
    }

    /// End of session: pool the server connection if it is clean,
    /// otherwise close it (a client that vanished mid-transaction must
    /// never hand its transaction to someone else).
    async fn finish(&mut self) {
        self.give_back_spare();
        if self.server.is_none() {
            return;
        }
        self.drain_lsn_probes().await;
        let Some(server) = self.server.as_mut() else {
            return;
        };
        let idle = server.tx_status == b'I'
            && !server.broken
            && self.pipeline.is_empty()
            && !self.copy_in
            && self.pass_through == 0;
        if !idle {
            self.drop_server();
            return;
        }
        if self.mode == PoolMode::Session {
            // Session pooling: the next client must get a clean session.
            match server.run_internal("DISCARD ALL").await {
                Ok(None) => {
                    server.prepared.clear();
                    server.session_fingerprint = 0;
                }
                _ => {
                    self.drop_server();
                    return;
                }
            }
        }
        if let Some(server) = self.server.as_mut() {
            server.last_released = Instant::now();
        }
        self.server = None;
        self.left_server();
    }

    /// A client that leaves right after a write: its position probe is
    /// still answering. Read that answer (briefly) so the connection can go
    /// back to the pool instead of being closed.
    async fn drain_lsn_probes(&mut self) {
        self.await_lsn_probes().await;
        self.to_client.clear();
    }

    /// Waits (at most 1 s) for the answers to the commit-LSN probes that
    /// are all the server still owes, so the connection can be released.
    pub(super) async fn await_lsn_probes(&mut self) {
        let deadline = Instant::now() + std::time::Duration::from_secs(1);
        while !self.pipeline.is_empty()
            && self
                .pipeline
                .iter()
                .all(|e| matches!(e, super::pipeline::Expect::LsnProbe))
        {
            let Some(server) = self.server.as_mut() else {
                return;
            };
            let server: &mut crate::backend::ServerConn = server;
            if server.read_buf.capacity() - server.read_buf.len() < 1024 {
                server.read_buf.reserve(SERVER_READ_CHUNK);
            }
            let read = tokio::time::timeout_at(
                deadline.into(),
                server.stream.read_buf(&mut server.read_buf),
            );
            match read.await {
                Ok(Ok(n)) if n > 0 => {
                    if self.handle_server_bytes().is_err() {
                        return;
                    }
                }
                _ => return,
            }
        }
    }

    /// Queues an ErrorResponse the proxy itself sends.
    pub(super) fn queue_error(&mut self, code: &str, message: &str) {
        count_error(code.as_bytes());
        be::error_response("ERROR", code, message).encode(&mut self.to_client);
    }
}

/// Bytes reserved for one read from a client.
const READ_CHUNK: usize = 4096;
/// Bytes reserved for one read from a server (result sets stream through).
const SERVER_READ_CHUNK: usize = 16384;

/// Writes all of `buf`: at once when the socket takes it (the usual case,
/// a few hundred bytes into an empty send buffer: no write future, no
/// cooperative-scheduling budget), else waiting for room.
async fn write_all(stream: &mut TcpStream, buf: &[u8]) -> std::io::Result<()> {
    match stream.try_write(buf) {
        Ok(n) if n == buf.len() => Ok(()),
        Ok(n) => stream.write_all(&buf[n..]).await,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => stream.write_all(buf).await,
        Err(e) => Err(e),
    }
}

/// The wait for the proxy to stop. Once it is registered (with this
/// task's waker, which stays the same for the task's life) only a stop
/// wakes it, so it is polled again only then: each poll takes three locks.
fn poll_stop(
    wait: std::pin::Pin<&mut tokio_util::sync::WaitForCancellationFutureOwned>,
    armed: &mut bool,
    proxy: &Proxy,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<()> {
    if *armed && !proxy.stopping() {
        return std::task::Poll::Pending;
    }
    let poll = wait.poll(cx);
    *armed = poll.is_pending();
    poll
}

fn shutdown_error() -> SessionError {
    SessionError::Fatal {
        code: "57P01".into(),
        message: "terminating connection due to administrator command".into(),
    }
}

/// The pools of one shard: the primary's, and each replica's with its
/// health entry.
pub(super) fn pools_for(
    proxy: &Proxy,
    login: &Login,
    topology: &crate::topology::Topology,
    shard_index: usize,
) -> (Arc<PoolEntry>, Vec<ReplicaSlot>) {
    let shard = &topology.shards[shard_index];
    let config = proxy.config.load();
    let user = config.user(&login.user);
    let pool = |role: Role, addr: &Arc<str>| {
        let key = PoolKey {
            shard: shard_index,
            role,
            addr: addr.clone(),
            database: login.database.clone(),
            user: user.map_or(login.user.clone(), |u| u.server_user().to_owned()),
        };
        proxy.pools.get_or_create(
            &key,
            user.and_then(|u| u.server_password()),
            user.and_then(|u| u.pool_size),
        )
    };
    let zone = config.proxy.zone.as_deref();
    let replicas = shard
        .replicas
        .iter()
        .map(|r| ReplicaSlot {
            pool: pool(Role::Replica, &r.addr),
            candidate: crate::router::Candidate {
                health: proxy.health.server(&r.addr),
                weight: r.weight,
                same_zone: zone.is_some() && r.zone.as_deref() == zone,
            },
        })
        .collect();
    (pool(Role::Primary, &shard.primary), replicas)
}
