//! The client's side of connection startup: SSL/GSSAPI negotiation (both
//! declined for now), CancelRequest, the startup packet, and password
//! authentication. Ends with an authenticated [`Login`] or a FATAL error.

use crate::auth::scram::{ScramSecret, ServerFirst, MECHANISM};
use crate::auth::Verifier;
use crate::protocol::backend as be;
use crate::protocol::frame::{decode_frame, decode_startup, Frame, ProtocolError, Startup};
use crate::protocol::frontend as fe;
use crate::proxy::Proxy;
use bytes::{Buf, BytesMut};
use rand::RngCore;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Password messages are small; anything bigger is an attack or a bug.
const MAX_AUTH_MESSAGE: usize = 8192;

/// Why startup ended without a session. `Fatal` carries what the client is
/// told; the others close the connection silently (the client left).
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("{code}: {message}")]
    Fatal { code: &'static str, message: String },
    #[error("client closed the connection during startup")]
    Closed,
    #[error("i/o error during startup: {0}")]
    Io(#[from] std::io::Error),
    #[error("cancel request handled")]
    Cancelled,
}

impl From<ProtocolError> for StartupError {
    fn from(e: ProtocolError) -> Self {
        StartupError::Fatal {
            code: e.sqlstate(),
            message: match e {
                ProtocolError::InvalidLength(_) | ProtocolError::TooLarge { .. } => {
                    "invalid length of startup packet".into()
                }
                other => other.to_string(),
            },
        }
    }
}

fn fatal(code: &'static str, message: impl Into<String>) -> StartupError {
    StartupError::Fatal {
        code,
        message: message.into(),
    }
}

/// An authenticated client.
#[derive(Debug)]
pub struct Login {
    pub user: String,
    pub database: String,
    /// Startup parameters that are settings (application_name, DateStyle,
    /// client_encoding, `options -c` values, ...).
    pub settings: Vec<(String, String)>,
}

pub async fn negotiate(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    proxy: &Arc<Proxy>,
) -> Result<Login, StartupError> {
    let (minor, params) = loop {
        let msg = read_startup(stream, buf).await?;
        match msg {
            Startup::Ssl | Startup::GssEnc => {
                if !buf.is_empty() {
                    // Bytes after an SSLRequest before our answer would be
                    // injected into the TLS stream (CVE-2021-23214 class).
                    return Err(fatal("08P01", "unexpected data after SSL request"));
                }
                stream.write_all(b"N").await?;
            }
            Startup::Cancel { pid, secret } => {
                proxy.cancels.cancel((pid, secret)).await;
                return Err(StartupError::Cancelled);
            }
            Startup::Startup { minor, params } => break (minor, params),
        }
    };
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let user = get("user").filter(|u| !u.is_empty()).ok_or_else(|| {
        fatal(
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
    })?;
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if get("replication").is_some_and(|r| r != "false" && r != "0" && r != "off") {
        return Err(fatal(
            "0A000",
            "shardgate does not support replication connections",
        ));
    }
    let unrecognized: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.as_str())
        .collect();
    if minor > 0 || !unrecognized.is_empty() {
        let mut out = BytesMut::new();
        be::negotiate_protocol_version(0, &unrecognized).encode(&mut out);
        stream.write_all(&out).await?;
    }
    authenticate(stream, buf, proxy, &user).await?;
    let mut settings = Vec::new();
    for (k, v) in &params {
        if k == "options" {
            settings.extend(super::vars::parse_options(v));
        } else if super::vars::is_setting(k) && !k.starts_with("_pq_.") {
            settings.push((k.clone(), v.clone()));
        }
    }
    Ok(Login {
        user,
        database,
        settings,
    })
}

async fn read_startup(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<Startup, StartupError> {
    loop {
        if let Some(s) = decode_startup(buf)? {
            return Ok(s);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(StartupError::Closed);
        }
    }
}

async fn read_password_message(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
) -> Result<Frame, StartupError> {
    loop {
        if let Some(f) = decode_frame(buf, MAX_AUTH_MESSAGE)? {
            if f.tag != fe::PASSWORD {
                return Err(fatal(
                    "08P01",
                    format!("expected password response, got message type {}", f.tag),
                ));
            }
            return Ok(f);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(StartupError::Closed);
        }
    }
}

async fn send(stream: &mut TcpStream, frame: Frame) -> Result<(), StartupError> {
    let mut out = BytesMut::with_capacity(frame.wire_len());
    frame.encode(&mut out);
    stream.write_all(&out).await?;
    Ok(())
}

fn auth_failed(user: &str) -> StartupError {
    fatal(
        "28P01",
        format!("password authentication failed for user \"{user}\""),
    )
}

async fn authenticate(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    proxy: &Arc<Proxy>,
    user: &str,
) -> Result<(), StartupError> {
    let verifier = proxy.auth.load().get(user);
    match verifier.as_deref() {
        Some(Verifier::Trust) => {}
        Some(Verifier::Md5 { hash }) => {
            let mut salt = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut salt);
            send(stream, be::auth_request(be::AUTH_MD5, &salt)).await?;
            let f = read_password_message(stream, buf).await?;
            let expected = crate::auth::md5::expected_response(hash, salt);
            let got = f.body.strip_suffix(&[0]).unwrap_or(&f.body);
            if got != expected.as_bytes() {
                return Err(auth_failed(user));
            }
        }
        Some(Verifier::Scram(secret)) => scram(stream, buf, user, secret, true).await?,
        // Unknown user: the same exchange against a secret nobody has,
        // so the answer does not reveal which users exist.
        None => scram(stream, buf, user, &ScramSecret::mock(user), false).await?,
    }
    send(stream, be::auth_request(be::AUTH_OK, &[])).await
}

async fn scram(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    user: &str,
    secret: &ScramSecret,
    known: bool,
) -> Result<(), StartupError> {
    let mut mechanisms = MECHANISM.as_bytes().to_vec();
    mechanisms.extend_from_slice(&[0, 0]);
    send(stream, be::auth_request(be::AUTH_SASL, &mechanisms)).await?;
    let f = read_password_message(stream, buf).await?;
    let mut body = &f.body[..];
    let mechanism = crate::protocol::frame::take_cstr(&mut body)
        .ok_or_else(|| fatal("08P01", "malformed SASL initial response"))?;
    if mechanism != MECHANISM {
        return Err(fatal(
            "08P01",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    if body.len() < 4 {
        return Err(fatal("08P01", "malformed SASL initial response"));
    }
    let len = body.get_i32();
    if len < 0 || len as usize != body.len() {
        return Err(fatal("08P01", "malformed SASL initial response"));
    }
    let state = ServerFirst::start(body, secret)
        .map_err(|e| fatal("08P01", format!("malformed SCRAM message: {e}")))?;
    send(
        stream,
        be::auth_request(be::AUTH_SASL_CONTINUE, state.message().as_bytes()),
    )
    .await?;
    let f = read_password_message(stream, buf).await?;
    match state.finish(&f.body, secret) {
        Ok(server_final) if known => {
            send(
                stream,
                be::auth_request(be::AUTH_SASL_FINAL, server_final.as_bytes()),
            )
            .await
        }
        Ok(_) | Err(crate::auth::scram::ScramError::WrongPassword) => Err(auth_failed(user)),
        Err(e) => Err(fatal("08P01", format!("malformed SCRAM message: {e}"))),
    }
}
