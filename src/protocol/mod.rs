//! Postgres wire protocol v3: framing, the few message parsers routing and
//! session tracking need, and builders for the messages the proxy itself
//! sends. No I/O lives here: every decoder takes a `BytesMut` and returns
//! `Ok(None)` when the frame is not complete yet, so it can be unit- and
//! property-tested (and fuzzed, see `fuzz/`) without sockets.
//!
//! Data enters as raw bytes from a client or server socket and leaves either
//! as a [`Frame`] (tag + body, still raw bytes, forwarded unchanged unless a
//! caller needs to look inside) or as a parsed message (`Parse`, `Bind`, ...).

pub mod backend;
pub mod frame;
pub mod frontend;

pub use frame::{decode_frame, decode_startup, Frame, FrameRef, ProtocolError, Startup};
