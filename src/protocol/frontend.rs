//! Messages a client sends, parsed only as far as the session needs: the
//! statement name and text of Parse, the statement a Bind or Describe refers
//! to, what a Close closes. Builders re-encode a message with a different
//! statement name (prepared statements are renamed per server connection in
//! transaction pooling).

use super::frame::{take_cbytes, take_cstr, Frame, ProtocolError};
use bytes::{BufMut, Bytes, BytesMut};

pub const QUERY: u8 = b'Q';
pub const PARSE: u8 = b'P';
pub const BIND: u8 = b'B';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const CLOSE: u8 = b'C';
pub const SYNC: u8 = b'S';
pub const FLUSH: u8 = b'H';
pub const TERMINATE: u8 = b'X';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const FUNCTION_CALL: u8 = b'F';
pub const PASSWORD: u8 = b'p';

/// Parse: name, query text, parameter type OIDs (kept raw).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a str,
    /// Raw bytes: the proxy forwards the text and never needs it as a
    /// string, so it is not UTF-8-checked on the hot path (the server does).
    pub query: &'a [u8],
    /// Everything after the query's NUL: the parameter type count and OIDs.
    pub param_types: &'a [u8],
}

pub fn parse_parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut rest = body;
    let name = take_cstr(&mut rest).ok_or(ProtocolError::Malformed("Parse"))?;
    let query = take_cbytes(&mut rest).ok_or(ProtocolError::Malformed("Parse"))?;
    if rest.len() < 2 {
        return Err(ProtocolError::Malformed("Parse"));
    }
    let n = i16::from_be_bytes([rest[0], rest[1]]);
    if n < 0 || rest.len() != 2 + 4 * n as usize {
        return Err(ProtocolError::Malformed("Parse"));
    }
    Ok(Parse {
        name,
        query,
        param_types: rest,
    })
}

pub fn build_parse(name: &str, query: &[u8], param_types: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + query.len() + 2 + param_types.len());
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(query);
    b.put_u8(0);
    b.put_slice(param_types);
    Frame {
        tag: PARSE,
        body: b.freeze(),
    }
}

/// Bind: the portal and statement names; the rest stays raw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind<'a> {
    pub portal: &'a [u8],
    pub statement: &'a str,
    /// Parameter formats, values and result formats, untouched.
    pub rest: &'a [u8],
}

pub fn parse_bind(body: &[u8]) -> Result<Bind<'_>, ProtocolError> {
    let mut rest = body;
    let portal = take_cbytes(&mut rest).ok_or(ProtocolError::Malformed("Bind"))?;
    let statement = take_cstr(&mut rest).ok_or(ProtocolError::Malformed("Bind"))?;
    Ok(Bind {
        portal,
        statement,
        rest,
    })
}

/// A Bind naming `statement`, written straight onto `out` (the per-Bind
/// path of renamed statements: no intermediate buffer).
pub fn encode_bind(portal: &[u8], statement: &str, rest: &[u8], out: &mut BytesMut) {
    let len = 4 + portal.len() + 1 + statement.len() + 1 + rest.len();
    out.reserve(1 + len);
    out.put_u8(BIND);
    out.put_i32(len as i32);
    out.put_slice(portal);
    out.put_u8(0);
    out.put_slice(statement.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
}

pub fn build_bind(portal: &[u8], statement: &str, rest: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(portal.len() + statement.len() + 2 + rest.len());
    b.put_slice(portal);
    b.put_u8(0);
    b.put_slice(statement.as_bytes());
    b.put_u8(0);
    b.put_slice(rest);
    Frame {
        tag: BIND,
        body: b.freeze(),
    }
}

/// Describe or Close target: 'S' statement or 'P' portal, and its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub kind: u8,
    pub name: &'a str,
}

pub fn parse_target<'a>(body: &'a [u8], what: &'static str) -> Result<Target<'a>, ProtocolError> {
    let (&kind, mut rest) = body.split_first().ok_or(ProtocolError::Malformed(what))?;
    if kind != b'S' && kind != b'P' {
        return Err(ProtocolError::Malformed(what));
    }
    let name = take_cstr(&mut rest).ok_or(ProtocolError::Malformed(what))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed(what));
    }
    Ok(Target { kind, name })
}

pub fn build_target(tag: u8, kind: u8, name: &str) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + 2);
    b.put_u8(kind);
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    Frame {
        tag,
        body: b.freeze(),
    }
}

/// The SQL text of a simple Query message.
pub fn parse_query(body: &[u8]) -> Result<&str, ProtocolError> {
    let mut rest = body;
    let q = take_cstr(&mut rest).ok_or(ProtocolError::Malformed("Query"))?;
    if !rest.is_empty() {
        return Err(ProtocolError::Malformed("Query"));
    }
    Ok(q)
}

pub fn build_query(sql: &str) -> Frame {
    let mut b = BytesMut::with_capacity(sql.len() + 1);
    b.put_slice(sql.as_bytes());
    b.put_u8(0);
    Frame {
        tag: QUERY,
        body: b.freeze(),
    }
}

/// The untagged startup packet (protocol 3.0) with its parameters.
pub fn build_startup(params: &[(&str, &str)]) -> BytesMut {
    let mut b = BytesMut::new();
    b.put_i32(0);
    b.put_i32(super::frame::PROTOCOL_V3);
    for (k, v) in params {
        b.put_slice(k.as_bytes());
        b.put_u8(0);
        b.put_slice(v.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    let len = b.len() as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

pub fn sync() -> Frame {
    Frame {
        tag: SYNC,
        body: Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_round_trip() {
        let f = build_parse("s1", b"select $1", &[0, 1, 0, 0, 0, 23]);
        let p = parse_parse(&f.body).unwrap();
        assert_eq!(p.name, "s1");
        assert_eq!(p.query, b"select $1");
        assert_eq!(p.param_types, &[0, 1, 0, 0, 0, 23]);
        assert!(parse_parse(b"s1\0select\0\0\x02\0\0\0\x17").is_err());
    }

    #[test]
    fn bind_rename_keeps_rest() {
        let f = build_bind(b"", "client_name", b"\0\0\0\x01\0\0\0\x011\0\0");
        let b = parse_bind(&f.body).unwrap();
        let g = build_bind(b.portal, "sg_7", b.rest);
        let c = parse_bind(&g.body).unwrap();
        assert_eq!(c.statement, "sg_7");
        assert_eq!(c.rest, b.rest);
        // Written in place: the same bytes as the frame, after whatever
        // was already in the buffer.
        let mut out = BytesMut::from(&b"xy"[..]);
        encode_bind(b.portal, "sg_7", b.rest, &mut out);
        let mut framed = BytesMut::from(&b"xy"[..]);
        g.encode(&mut framed);
        assert_eq!(out, framed);
    }

    #[test]
    fn startup_round_trip() {
        let mut b = build_startup(&[("user", "u"), ("database", "d")]);
        let s = crate::protocol::decode_startup(&mut b).unwrap().unwrap();
        assert_eq!(s.param("user"), Some("u"));
        assert_eq!(s.param("database"), Some("d"));
    }

    #[test]
    fn targets() {
        let f = build_target(CLOSE, b'S', "x");
        assert_eq!(
            parse_target(&f.body, "Close").unwrap(),
            Target {
                kind: b'S',
                name: "x"
            }
        );
        assert!(parse_target(b"Zx\0", "Close").is_err());
        assert!(parse_target(b"", "Close").is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = parse_parse(&bytes);
            let _ = parse_bind(&bytes);
            let _ = parse_target(&bytes, "Describe");
            let _ = parse_query(&bytes);
        }

        #[test]
        fn parse_messages_round_trip(name in "[a-z0-9_]{0,12}", query in "[ -~]{0,40}", n in 0i16..4) {
            let mut types = n.to_be_bytes().to_vec();
            for i in 0..n { types.extend_from_slice(&(i as i32 + 20).to_be_bytes()); }
            let f = build_parse(&name, query.as_bytes(), &types);
            let p = parse_parse(&f.body).unwrap();
            prop_assert_eq!(p.name, name.as_str());
            prop_assert_eq!(p.query, query.as_bytes());
            prop_assert_eq!(p.param_types, &types[..]);
        }
    }
}
