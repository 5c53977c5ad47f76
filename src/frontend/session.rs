//! One client's session after authentication.
//!
//! The loop reads client messages ([`super::client_msgs`]) and, while a
//! server connection is checked out, server messages
//! ([`super::server_msgs`]), forwarding raw bytes both ways. In transaction
//! pooling the server connection is checked out when a message needs a
//! server and returned as soon as the server reports idle (ReadyForQuery
//! 'I') with nothing outstanding; in session pooling it is held to the end.

use super::pipeline::Pipeline;
use super::startup::Login;
use super::statements::Statement;
use super::vars::SessionVars;
use crate::backend::pool::{PoolEntry, PooledConn};
use crate::backend::PoolKey;
use crate::cancel::{CancelSlot, CancelTarget};
use crate::config::PoolMode;
use crate::metrics::count_error;
use crate::protocol::backend as be;
use crate::protocol::Frame;
use crate::proxy::Proxy;
use bytes::BytesMut;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    pub(super) pool: Arc<PoolEntry>,
    pub(super) pool_epoch: u64,
    pub(super) server: Option<PooledConn>,
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
    pub(super) statements: HashMap<String, Arc<Statement>>,
    /// The last unnamed Parse, re-sent if a later Bind lands on another
    /// server connection; and whether the current server has it.
    pub(super) unnamed_parse: Option<Frame>,
    pub(super) unnamed_on_server: bool,
    pub(super) vars: SessionVars,
    pub(super) request_started: Option<Instant>,
    pub(super) cancel_key: (i32, i32),
    pub(super) cancel_slot: CancelSlot,
}

impl Session {
    pub async fn run(client: TcpStream, client_buf: BytesMut, login: Login, proxy: Arc<Proxy>) {
        let config = proxy.config.load_full();
        let (cancel_key, cancel_slot) = proxy.cancels.register();
        let topology = proxy.topology.load();
        let pool = pool_for(&proxy, &login, &topology);
        let mut s = Session {
            mode: config.proxy.pool_mode,
            max_message_size: config.proxy.max_message_size,
            max_prepared: config.pool.max_prepared_statements,
            pool_epoch: topology.epoch,
            pool,
            client,
            client_buf,
            to_client: BytesMut::new(),
            to_server: BytesMut::new(),
            login,
            server: None,
            checked_out_at: Instant::now(),
            pipeline: Pipeline::new(),
            skipping: false,
            copy_in: false,
            pass_through: 0,
            to_client_shares_read_buf: false,
            statements: HashMap::new(),
            unnamed_parse: None,
            unnamed_on_server: false,
            vars: SessionVars::default(),
            request_started: None,
            cancel_key,
            cancel_slot,
            proxy,
        };
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
            if self.server.is_none() {
                if self.proxy.shutdown.is_cancelled() {
                    return Err(shutdown_error());
                }
                self.release_idle_buffers();
                tokio::select! {
                    r = self.client.readable() => r.map_err(SessionError::ClientIo)?,
                    _ = self.proxy.shutdown.cancelled() => return Err(shutdown_error()),
                };
                self.client_buf.reserve(READ_CHUNK);
                // One poll of an AsyncRead read (not try_read): tokio sees a
                // short read and skips the EAGAIN read after it. Readiness
                // can be stale; then the poll clears it and we wait again
                // (still watching for shutdown).
                let n = {
                    let read = self.client.read_buf(&mut self.client_buf);
                    let mut read = std::pin::pin!(read);
                    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                    match read.as_mut().poll(&mut cx) {
                        std::task::Poll::Ready(r) => r.map_err(SessionError::ClientIo)?,
                        std::task::Poll::Pending => continue,
                    }
                };
                if n == 0 {
                    return Err(SessionError::ClientGone);
                }
                self.on_client_data().await?;
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
                tokio::select! {
                    r = self.client.read_buf(&mut self.client_buf) => {
                        if r.map_err(SessionError::ClientIo)? == 0 {
                            return Err(SessionError::ClientGone);
                        }
                        self.on_client_data().await?;
                    }
                    r = stream.read_buf(read_buf) => {
                        match r {
                            Ok(n) if n > 0 => self.on_server_data().await?,
                            _ => return Err(self.server_lost()),
                        }
                    }
                }
            }
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
        self.maybe_release().await;
        Ok(())
    }

    /// The server connection died under a client: like a crashed backend,
    /// the client is told and disconnected.
    pub(super) fn server_lost(&mut self) -> SessionError {
        if let Some(s) = self.server.as_mut() {
            s.broken = true;
            tracing::warn!(server = %s.addr, "server closed the connection unexpectedly");
        }
        SessionError::Fatal {
            code: "08006".into(),
            message: "shardgate: server closed the connection unexpectedly".into(),
        }
    }

    pub(super) async fn flush_client(&mut self) -> Result<(), SessionError> {
        if !self.to_client.is_empty() {
            self.client
                .write_all(&self.to_client)
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
        if server.stream.write_all(&self.to_server).await.is_err() {
            return Err(self.server_lost());
        }
        self.to_server.clear();
        Ok(())
    }

    /// Gets a server connection for the next transaction and makes it
    /// carry this client's session state. Errors are (SQLSTATE, message).
    pub(super) async fn checkout(&mut self) -> Result<(), (String, String)> {
        if self.server.is_some() {
            return Ok(());
        }
        self.checkout_raw().await?;
        self.sync_session_state().await
    }

    async fn checkout_raw(&mut self) -> Result<(), (String, String)> {
        let topology = self.proxy.topology.load();
        if topology.epoch != self.pool_epoch {
            self.pool = pool_for(&self.proxy, &self.login, &topology);
            self.pool_epoch = topology.epoch;
        }
        let wait = self.proxy.config.load().pool.checkout_timeout;
        let conn = self
            .pool
            .checkout(wait)
            .await
            .map_err(|e| e.client_error())?;
        *crate::lock(&self.cancel_slot) = Some(CancelTarget {
            addr: conn.addr.clone(),
            pid: conn.pid,
            secret: conn.secret,
        });
        self.checked_out_at = Instant::now();
        self.unnamed_on_server = false;
        self.server = Some(conn);
        Ok(())
    }

    async fn sync_session_state(&mut self) -> Result<(), (String, String)> {
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
        // decoded from.
        if let Some(parse) = self.unnamed_parse.as_mut() {
            parse.body = bytes::Bytes::copy_from_slice(&parse.body);
        }
        let now = Instant::now();
        server.last_released = now;
        self.pool
            .metrics
            .tx_duration
            .observe((now - self.checked_out_at).as_secs_f64());
        self.pool.metrics.transactions.inc();
        *crate::lock(&self.cancel_slot) = None;
        self.server = None;
    }

    /// Throws the server connection away instead of pooling it.
    pub(super) fn drop_server(&mut self) {
        if let Some(conn) = self.server.take() {
            *crate::lock(&self.cancel_slot) = None;
            drop(deadpool::managed::Object::take(conn));
        }
    }

    /// End of session: pool the server connection if it is clean,
    /// otherwise close it (a client that vanished mid-transaction must
    /// never hand its transaction to someone else).
    async fn finish(&mut self) {
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

fn shutdown_error() -> SessionError {
    SessionError::Fatal {
        code: "57P01".into(),
        message: "terminating connection due to administrator command".into(),
    }
}

fn pool_for(proxy: &Proxy, login: &Login, topology: &crate::topology::Topology) -> Arc<PoolEntry> {
    let target = crate::router::route_transaction(topology);
    let shard = &topology.shards[target.shard];
    let config = proxy.config.load();
    let user = config.user(&login.user);
    let key = PoolKey {
        shard: target.shard,
        role: target.role,
        addr: shard.primary.clone(),
        database: login.database.clone(),
        user: user.map_or(login.user.clone(), |u| u.server_user().to_owned()),
    };
    proxy.pools.get_or_create(
        &key,
        user.and_then(|u| u.server_password()),
        user.and_then(|u| u.pool_size),
    )
}
