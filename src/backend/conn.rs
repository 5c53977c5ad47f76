//! One raw server connection: TCP, startup, authentication as the proxy's
//! server-side credentials, and what the proxy must remember about it.

use crate::protocol::backend as be;
use crate::protocol::frame::{decode_frame, Frame};
use bytes::{BufMut, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Server messages may be large (a DataRow of a big value); the limit only
/// protects the startup phase where the proxy buffers whole messages.
const MAX_STARTUP_MESSAGE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("could not connect to server {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
    #[error("timed out connecting to server {0}")]
    Timeout(String),
    /// The server refused the login with this ErrorResponse; passed to the
    /// client as it is (e.g. 3D000 for an unknown database).
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(be::ErrorFields),
    #[error("server {addr} asks for a password, but none is configured for user {user:?}")]
    NoPassword { addr: String, user: String },
    #[error("server {addr}: unsupported authentication request {code}")]
    UnsupportedAuth { addr: String, code: i32 },
    #[error("server {addr}: protocol error during startup: {detail}")]
    Protocol { addr: String, detail: String },
}

impl ConnectError {
    /// SQLSTATE and message a client may see.
    pub fn client_error(&self) -> (String, String) {
        match self {
            ConnectError::Server(f) => (f.code.clone(), f.message.clone()),
            ConnectError::Io { .. } | ConnectError::Timeout(_) => {
                ("08001".into(), format!("shardgate: {self}"))
            }
            _ => ("08006".into(), format!("shardgate: {self}")),
        }
    }
}

/// Credentials and target of a server connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ConnectParams {
    pub addr: String,
    pub database: String,
    pub user: String,
    pub password: Option<String>,
}

/// A connection to a Postgres server that speaks on behalf of clients.
pub struct ServerConn {
    pub stream: TcpStream,
    pub addr: std::sync::Arc<str>,
    /// BackendKeyData, for forwarding CancelRequests.
    pub pid: i32,
    pub secret: i32,
    /// Latest value of every ParameterStatus the server reported.
    pub params: HashMap<String, String>,
    /// The values reported right after connecting (no client state).
    pub initial_params: std::sync::Arc<HashMap<String, String>>,
    /// Proxy-named prepared statements that exist on this connection.
    pub prepared: hashbrown::HashSet<u64>,
    /// Which client session state (SETs) is applied; 0 is the pristine
    /// state right after connecting.
    pub session_fingerprint: u64,
    /// Transaction status from the last ReadyForQuery.
    pub tx_status: u8,
    /// Set when the connection must not be reused (protocol state unknown).
    pub broken: bool,
    /// Set when the connection is healthy but should be closed instead of
    /// reused (too many prepared statements, for example).
    pub retire: bool,
    pub last_released: Instant,
    /// When the pool's `server_lifetime` runs out (None: never, or a
    /// connection made outside a pool).
    pub expires_at: Option<Instant>,
    /// Reused read buffer: keeps its allocation across transactions.
    pub read_buf: BytesMut,
}

impl ServerConn {
    pub async fn connect(p: &ConnectParams, timeout: Duration) -> Result<ServerConn, ConnectError> {
        Self::connect_with(p, timeout, &[]).await
    }

    /// [`Self::connect`] with more startup parameters (`replication`, for
    /// a WAL sender connection).
    pub async fn connect_with(
        p: &ConnectParams,
        timeout: Duration,
        extra: &[(&str, &str)],
    ) -> Result<ServerConn, ConnectError> {
        match tokio::time::timeout(timeout, Self::connect_inner(p, extra)).await {
            Ok(r) => r,
            Err(_) => Err(ConnectError::Timeout(p.addr.clone())),
        }
    }

    async fn connect_inner(
        p: &ConnectParams,
        extra: &[(&str, &str)],
    ) -> Result<ServerConn, ConnectError> {
        let io = |source| ConnectError::Io {
            addr: p.addr.clone(),
            source,
        };
        let stream = TcpStream::connect(&p.addr).await.map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let mut conn = ServerConn {
            stream,
            addr: p.addr.as_str().into(),
            pid: 0,
            secret: 0,
            params: HashMap::new(),
            initial_params: Default::default(),
            prepared: hashbrown::HashSet::default(),
            session_fingerprint: 0,
            tx_status: b'I',
            broken: false,
            retire: false,
            last_released: Instant::now(),
            expires_at: None,
            read_buf: BytesMut::with_capacity(8192),
        };
        let mut params = vec![("user", p.user.as_str()), ("database", p.database.as_str())];
        params.extend_from_slice(extra);
        let startup = crate::protocol::frontend::build_startup(&params);
        conn.stream.write_all(&startup).await.map_err(io)?;
        conn.authenticate(p).await?;
        // After AuthenticationOk: ParameterStatus*, BackendKeyData, ReadyForQuery.
        loop {
            let f = conn.read_frame().await?;
            match f.tag {
                be::PARAMETER_STATUS => conn.note_parameter(&f.body),
                be::BACKEND_KEY_DATA if f.body.len() == 8 => {
                    conn.pid = i32::from_be_bytes(f.body[..4].try_into().expect("4 bytes"));
                    conn.secret = i32::from_be_bytes(f.body[4..].try_into().expect("4 bytes"));
                }
                be::READY_FOR_QUERY => {
                    conn.initial_params = std::sync::Arc::new(conn.params.clone());
                    return Ok(conn);
                }
                be::ERROR_RESPONSE => return Err(ConnectError::Server(be::parse_error(&f.body))),
                be::NOTICE_RESPONSE | be::NEGOTIATE_PROTOCOL_VERSION => {}
                other => {
                    return Err(conn.protocol(format!("unexpected message {:?}", other as char)))
                }
            }
        }
    }

    fn protocol(&self, detail: String) -> ConnectError {
        ConnectError::Protocol {
            addr: self.addr.to_string(),
            detail,
        }
    }

    async fn authenticate(&mut self, p: &ConnectParams) -> Result<(), ConnectError> {
        let password = || {
            p.password
                .as_deref()
                .ok_or_else(|| ConnectError::NoPassword {
                    addr: p.addr.clone(),
                    user: p.user.clone(),
                })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let f = self.read_frame().await?;
            if f.tag == be::ERROR_RESPONSE {
                return Err(ConnectError::Server(be::parse_error(&f.body)));
            }
            if f.tag != be::AUTHENTICATION || f.body.len() < 4 {
                return Err(
                    self.protocol(format!("expected authentication, got {:?}", f.tag as char))
                );
            }
            let code = i32::from_be_bytes(f.body[..4].try_into().expect("4 bytes"));
            let data = &f.body[4..];
            match code {
                be::AUTH_OK => return Ok(()),
                be::AUTH_CLEARTEXT => {
                    let mut body = password()?.as_bytes().to_vec();
                    body.push(0);
                    self.send_password(body).await?;
                }
                be::AUTH_MD5 if data.len() == 4 => {
                    let salt = [data[0], data[1], data[2], data[3]];
                    let hash = postgres_protocol::authentication::md5_hash(
                        p.user.as_bytes(),
                        password()?.as_bytes(),
                        salt,
                    );
                    let mut body = hash.into_bytes();
                    body.push(0);
                    self.send_password(body).await?;
                }
                be::AUTH_SASL => {
                    let offered = data
                        .split(|&b| b == 0)
                        .any(|m| m == crate::auth::scram::MECHANISM.as_bytes());
                    if !offered {
                        return Err(ConnectError::UnsupportedAuth {
                            addr: p.addr.clone(),
                            code,
                        });
                    }
                    let s = ScramSha256::new(password()?.as_bytes(), ChannelBinding::unsupported());
                    let mut body = BytesMut::new();
                    body.put_slice(crate::auth::scram::MECHANISM.as_bytes());
                    body.put_u8(0);
                    body.put_i32(s.message().len() as i32);
                    body.put_slice(s.message());
                    self.send_password(body.to_vec()).await?;
                    scram = Some(s);
                }
                be::AUTH_SASL_CONTINUE => {
                    let s = scram
                        .as_mut()
                        .ok_or_else(|| self.protocol("SASL continue without start".into()))?;
                    s.update(data)
                        .map_err(|e| self.protocol(format!("SCRAM: {e}")))?;
                    let msg = s.message().to_vec();
                    self.send_password(msg).await?;
                }
                be::AUTH_SASL_FINAL => {
                    let mut s = scram
                        .take()
                        .ok_or_else(|| self.protocol("SASL final without start".into()))?;
                    s.finish(data)
                        .map_err(|e| self.protocol(format!("SCRAM server proof: {e}")))?;
                }
                code => {
                    return Err(ConnectError::UnsupportedAuth {
                        addr: p.addr.clone(),
                        code,
                    })
                }
            }
        }
    }

    async fn send_password(&mut self, body: Vec<u8>) -> Result<(), ConnectError> {
        let mut out = BytesMut::with_capacity(body.len() + 5);
        out.put_u8(b'p');
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(&body);
        self.stream
            .write_all(&out)
            .await
            .map_err(|source| ConnectError::Io {
                addr: self.addr.to_string(),
                source,
            })
    }

    /// Reads one whole message (startup phase only; the session forwards
    /// later traffic without buffering whole messages).
    pub async fn read_frame(&mut self) -> Result<Frame, ConnectError> {
        loop {
            match decode_frame(&mut self.read_buf, MAX_STARTUP_MESSAGE) {
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(self.protocol(e.to_string())),
            }
            let n = self
                .stream
                .read_buf(&mut self.read_buf)
                .await
                .map_err(|source| ConnectError::Io {
                    addr: self.addr.to_string(),
                    source,
                })?;
            if n == 0 {
                return Err(ConnectError::Io {
                    addr: self.addr.to_string(),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    /// Sends `request` and returns every message up to and including
    /// ReadyForQuery (cross-shard queries, whose answers the proxy
    /// combines before the client sees them).
    pub async fn exchange(
        &mut self,
        request: &[u8],
        max_message: usize,
    ) -> Result<Vec<Frame>, ConnectError> {
        self.exchange_n(request, max_message, 1).await
    }

    /// [`Self::exchange`] for a request of `readies` pipelined parts: reads
    /// up to the last of their ReadyForQuery messages.
    pub async fn exchange_n(
        &mut self,
        request: &[u8],
        max_message: usize,
        readies: usize,
    ) -> Result<Vec<Frame>, ConnectError> {
        let mut readies = readies.max(1);
        if let Err(source) = self.stream.write_all(request).await {
            self.broken = true;
            return Err(ConnectError::Io {
                addr: self.addr.to_string(),
                source,
            });
        }
        let mut frames = Vec::new();
        loop {
            let frame = match decode_frame(&mut self.read_buf, max_message) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    self.read_buf.reserve(16384);
                    let source = match self.stream.read_buf(&mut self.read_buf).await {
                        Ok(n) if n > 0 => continue,
                        Ok(_) => std::io::ErrorKind::UnexpectedEof.into(),
                        Err(e) => e,
                    };
                    self.broken = true;
                    return Err(ConnectError::Io {
                        addr: self.addr.to_string(),
                        source,
                    });
                }
                Err(e) => {
                    self.broken = true;
                    return Err(self.protocol(e.to_string()));
                }
            };
            match frame.tag {
                be::PARAMETER_STATUS => self.note_parameter(&frame.body),
                be::READY_FOR_QUERY => {
                    self.tx_status = frame.body.first().copied().unwrap_or(b'I');
                    frames.push(frame);
                    readies -= 1;
                    if readies == 0 {
                        return Ok(frames);
                    }
                    continue;
                }
                _ => {}
            }
            frames.push(frame);
        }
    }

    pub fn note_parameter(&mut self, body: &[u8]) {
        if let Some((k, v)) = be::parse_parameter_status(body) {
            if self.params.get(k).map(String::as_str) != Some(v) {
                self.params.insert(k.to_owned(), v.to_owned());
            }
        }
    }

    /// Runs `sql` (simple protocol) and discards its results, remembering
    /// ParameterStatus changes. Used to apply or reset session state between
    /// clients. Returns the first error the server reported.
    pub async fn run_internal(
        &mut self,
        sql: &str,
    ) -> Result<Option<be::ErrorFields>, ConnectError> {
        Ok(self.query_rows(sql).await?.err())
    }

    /// Runs `sql` (simple protocol) and returns its rows as text, or the
    /// server's error. For the proxy's own small queries.
    pub async fn query_rows(
        &mut self,
        sql: &str,
    ) -> Result<Result<Vec<Vec<Option<String>>>, be::ErrorFields>, ConnectError> {
        let mut out = BytesMut::new();
        crate::protocol::frontend::build_query(sql).encode(&mut out);
        if let Err(source) = self.stream.write_all(&out).await {
            self.broken = true;
            return Err(ConnectError::Io {
                addr: self.addr.to_string(),
                source,
            });
        }
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            let f = match self.read_frame().await {
                Ok(f) => f,
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            };
            match f.tag {
                be::DATA_ROW => match parse_data_row(&f.body) {
                    Some(r) => rows.push(r),
                    None => {
                        self.broken = true;
                        return Err(self.protocol("malformed DataRow".into()));
                    }
                },
                be::PARAMETER_STATUS => self.note_parameter(&f.body),
                be::ERROR_RESPONSE if error.is_none() => error = Some(be::parse_error(&f.body)),
                be::READY_FOR_QUERY => {
                    self.tx_status = f.body.first().copied().unwrap_or(b'I');
                    return Ok(match error {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    });
                }
                _ => {}
            }
        }
    }

    /// Cheap liveness check for an idle connection: a server that closed
    /// the socket (restart, idle kill) shows EOF or a pending FATAL.
    pub fn looks_alive(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// The text values of a DataRow (None for NULL).
pub fn parse_data_row(body: &[u8]) -> Option<Vec<Option<String>>> {
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut rest = &body[2..];
    let mut out = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = i32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
        rest = &rest[4..];
        if len < 0 {
            out.push(None);
        } else {
            let v = rest.get(..len as usize)?;
            out.push(Some(String::from_utf8_lossy(v).into_owned()));
            rest = &rest[len as usize..];
        }
    }
    Some(out)
}

impl Drop for ServerConn {
    /// Says goodbye with Terminate when the protocol is in step, so the
    /// server logs a clean disconnect (and rolls back anything open) rather
    /// than a reset. A non-blocking write: a full socket just skips it.
    fn drop(&mut self) {
        if !self.broken {
            let _ = self.stream.try_write(&[b'X', 0, 0, 0, 4]);
        }
    }
}

/// Sends a CancelRequest for (pid, secret) to the server at `addr`.
pub async fn send_cancel(addr: &str, pid: i32, secret: i32) -> std::io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut msg = BytesMut::with_capacity(16);
    msg.put_i32(16);
    msg.put_i32(crate::protocol::frame::CANCEL_REQUEST_CODE);
    msg.put_i32(pid);
    msg.put_i32(secret);
    stream.write_all(&msg).await?;
    // The server closes the connection when done; wait for that so the
    // cancel has been delivered before we report success.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
    Ok(())
}
