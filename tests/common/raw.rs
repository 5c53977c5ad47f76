//! A minimal raw protocol client for tests that need exact control over
//! the bytes (pipelining, Flush without Sync, malformed input).

#![allow(dead_code)]

use bytes::BytesMut;
use shardgate::protocol::frame::{decode_frame, Frame};
use shardgate::protocol::frontend as fe;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    fe::build_startup(params).to_vec()
}

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Connects as the trust-authenticated user and waits for ReadyForQuery.
    pub async fn login(addr: SocketAddr, extra: &[(&str, &str)]) -> (Raw, Vec<Frame>) {
        let mut r = Raw::open(addr).await;
        let mut params = vec![("user", "trustclient"), ("database", "app")];
        params.extend_from_slice(extra);
        r.send_bytes(&startup_packet(&params)).await;
        let msgs = r.read_until_ready().await;
        (r, msgs)
    }

    pub async fn send_bytes(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.unwrap();
    }

    pub async fn send(&mut self, frames: &[Frame]) {
        let mut out = BytesMut::new();
        for f in frames {
            f.encode(&mut out);
        }
        self.send_bytes(&out).await;
    }

    /// Next message, or None on EOF; panics after 10 s of silence.
    pub async fn read(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = decode_frame(&mut self.buf, 1 << 30).unwrap() {
                return Some(f);
            }
            let n =
                tokio::time::timeout(Duration::from_secs(10), self.stream.read_buf(&mut self.buf))
                    .await
                    .expect("no answer within 10 s")
                    .unwrap_or(0);
            if n == 0 {
                return None;
            }
        }
    }

    /// Waits briefly and reports whether any message arrives.
    pub async fn read_within(&mut self, d: Duration) -> Option<Frame> {
        tokio::time::timeout(d, self.read()).await.ok().flatten()
    }

    pub async fn read_until_ready(&mut self) -> Vec<Frame> {
        let mut out = Vec::new();
        while let Some(f) = self.read().await {
            let done = f.tag == b'Z';
            out.push(f);
            if done {
                break;
            }
        }
        out
    }

    pub fn tags(frames: &[Frame]) -> String {
        frames.iter().map(|f| f.tag as char).collect()
    }
}

pub fn parse(name: &str, sql: &str) -> Frame {
    fe::build_parse(name, sql.as_bytes(), &[0, 0])
}
pub fn bind(stmt: &str) -> Frame {
    fe::build_bind(b"", stmt, &[0, 0, 0, 0, 0, 0])
}
pub fn execute() -> Frame {
    Frame {
        tag: b'E',
        body: bytes::Bytes::from_static(b"\0\0\0\0\0"),
    }
}
pub fn describe_portal() -> Frame {
    fe::build_target(b'D', b'P', "")
}
pub fn close_statement(name: &str) -> Frame {
    fe::build_target(b'C', b'S', name)
}
pub fn sync() -> Frame {
    fe::sync()
}
pub fn flush() -> Frame {
    Frame {
        tag: b'H',
        body: bytes::Bytes::new(),
    }
}
pub fn query(sql: &str) -> Frame {
    fe::build_query(sql)
}
