//! The client side: startup and authentication ([`startup`]), then the
//! per-client [`session::Session`] that forwards messages between the client
//! and a pooled server connection, tracking what it must (pipeline of owed
//! responses, prepared statements, session settings).

pub mod pipeline;
pub mod session;
pub mod startup;
pub mod statements;
pub mod vars;

mod checkout;
mod client_msgs;
pub mod copy;
mod inline;
pub mod multiwrite;
mod routing;
pub mod scatter;
mod server_msgs;
pub mod sharding;
mod spare;

use crate::metrics::GLOBAL;
use crate::protocol::backend as be;
use crate::proxy::Proxy;
use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Serves one client connection from accept to close.
pub async fn handle_client(mut stream: TcpStream, peer: SocketAddr, proxy: Arc<Proxy>) {
    GLOBAL.clients_active.inc();
    let mut buf = BytesMut::new();
    let timeout = proxy.config.load().proxy.handshake_timeout;
    let login = tokio::select! {
        r = tokio::time::timeout(timeout, startup::negotiate(&mut stream, &mut buf, &proxy)) => match r {
            Ok(r) => r,
            Err(_) => Err(startup::StartupError::Fatal {
                code: "08P01",
                message: "timeout expired during startup".into(),
            }),
        },
        _ = proxy.shutdown.cancelled() => Err(startup::StartupError::Fatal {
            code: "57P01",
            message: "terminating connection due to administrator command".into(),
        }),
    };
    match login {
        Ok(login) => {
            tracing::debug!(%peer, user = %login.user, database = %login.database, "client authenticated");
            session::Session::run(stream, buf, login, proxy).await;
        }
        Err(startup::StartupError::Fatal { code, message }) => {
            tracing::info!(%peer, code, %message, "client startup failed");
            GLOBAL.client_rejected.with_label_values(&[code]).inc();
            send_fatal(&mut stream, code, &message).await;
        }
        Err(e) => tracing::debug!(%peer, error = %e, "client startup ended"),
    }
    GLOBAL.clients_active.dec();
}

/// Refuses a client before startup (connection limit).
pub async fn reject_client(mut stream: TcpStream, code: &'static str, message: &'static str) {
    send_fatal(&mut stream, code, message).await;
}

async fn send_fatal(stream: &mut TcpStream, code: &str, message: &str) {
    crate::metrics::count_error(code.as_bytes());
    let mut out = BytesMut::new();
    be::error_response("FATAL", code, message).encode(&mut out);
    let _ = stream.write_all(&out).await;
    let _ = stream.shutdown().await;
}
