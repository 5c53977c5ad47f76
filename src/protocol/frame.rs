//! Framing: split a byte stream into messages.
//!
//! A regular message is `tag: u8, len: i32 (includes itself), body`. The
//! first message a client sends has no tag: `len: i32, code: i32, ...`.

use bytes::{Buf, Bytes, BytesMut};

/// Protocol 3.0.
pub const PROTOCOL_V3: i32 = 196_608;
pub const SSL_REQUEST_CODE: i32 = 80_877_103;
pub const GSSENC_REQUEST_CODE: i32 = 80_877_104;
pub const CANCEL_REQUEST_CODE: i32 = 80_877_102;

/// Startup packets are small; Postgres itself caps them at 10000 bytes.
pub const MAX_STARTUP_LEN: usize = 10_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    InvalidLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

impl ProtocolError {
    /// SQLSTATE a client is told: 08P01 protocol_violation for everything
    /// except the version mismatch, which Postgres reports as 0A000.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            ProtocolError::UnsupportedVersion { .. } => "0A000",
            ProtocolError::TooLarge { .. } => "08P01",
            _ => "08P01",
        }
    }
}

/// One tagged message, body without tag and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub body: Bytes,
}

impl Frame {
    /// Total encoded size (tag + length + body).
    pub fn wire_len(&self) -> usize {
        5 + self.body.len()
    }

    pub fn encode(&self, out: &mut BytesMut) {
        self.as_ref().encode(out);
    }

    pub fn as_ref(&self) -> FrameRef<'_> {
        FrameRef {
            tag: self.tag,
            body: &self.body,
        }
    }
}

/// A tagged message read in place, from the buffer it arrived in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub tag: u8,
    pub body: &'a [u8],
}

impl FrameRef<'_> {
    /// An owned copy.
    pub fn to_frame(&self) -> Frame {
        Frame {
            tag: self.tag,
            body: Bytes::copy_from_slice(self.body),
        }
    }

    pub fn encode(&self, out: &mut BytesMut) {
        out.reserve(5 + self.body.len());
        out.extend_from_slice(&[self.tag]);
        out.extend_from_slice(&((self.body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(self.body);
    }
}

/// Reads the header of the message at the start of `buf`: tag and total
/// wire length. `None` when fewer than 5 bytes are buffered.
pub fn peek_header(buf: &[u8], max_len: usize) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::InvalidLength(len as i64));
    }
    let len = len as usize;
    if len > max_len {
        return Err(ProtocolError::TooLarge { len, max: max_len });
    }
    Ok(Some((buf[0], len + 1)))
}

/// Splits one complete tagged message off the front of `buf`.
pub fn decode_frame(buf: &mut BytesMut, max_len: usize) -> Result<Option<Frame>, ProtocolError> {
    let Some((tag, total)) = peek_header(buf, max_len)? else {
        return Ok(None);
    };
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(5);
    Ok(Some(Frame {
        tag,
        body: frame.freeze(),
    }))
}

/// The untagged first message of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel {
        pid: i32,
        secret: i32,
    },
    /// Protocol 3.x startup with its parameters (user, database, ...).
    Startup {
        minor: u16,
        params: Vec<(String, String)>,
    },
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            Startup::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Decodes the untagged startup-phase message.
pub fn decode_startup(buf: &mut BytesMut) -> Result<Option<Startup>, ProtocolError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(ProtocolError::InvalidLength(len as i64));
    }
    let len = len as usize;
    if len > MAX_STARTUP_LEN {
        return Err(ProtocolError::TooLarge {
            len,
            max: MAX_STARTUP_LEN,
        });
    }
    if buf.len() < len {
        buf.reserve(len - buf.len());
        return Ok(None);
    }
    let mut msg = buf.split_to(len);
    msg.advance(4);
    let code = msg.get_i32();
    match code {
        SSL_REQUEST_CODE if len == 8 => Ok(Some(Startup::Ssl)),
        GSSENC_REQUEST_CODE if len == 8 => Ok(Some(Startup::GssEnc)),
        CANCEL_REQUEST_CODE if len == 16 => {
            let pid = msg.get_i32();
            let secret = msg.get_i32();
            Ok(Some(Startup::Cancel { pid, secret }))
        }
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE | CANCEL_REQUEST_CODE => {
            Err(ProtocolError::Malformed("startup"))
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(ProtocolError::UnsupportedVersion { major, minor });
            }
            let params = parse_startup_params(&msg)?;
            Ok(Some(Startup::Startup { minor, params }))
        }
    }
}

fn parse_startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, ProtocolError> {
    let mut params = Vec::new();
    loop {
        let key = take_cstr(&mut body).ok_or(ProtocolError::Malformed("startup"))?;
        if key.is_empty() {
            break;
        }
        let value = take_cstr(&mut body).ok_or(ProtocolError::Malformed("startup"))?;
        params.push((key.to_owned(), value.to_owned()));
    }
    Ok(params)
}

/// The position of the NUL that ends the string at the front of `buf`.
/// Most names in the extended protocol are empty (the unnamed statement
/// and portal): those skip the search, whose setup costs more than the
/// one-byte check.
fn cstr_end(buf: &[u8]) -> Option<usize> {
    match buf.first() {
        Some(0) => Some(0),
        _ => memchr::memchr(0, buf),
    }
}

/// Takes a NUL-terminated UTF-8 string off the front of `buf`.
pub fn take_cstr<'a>(buf: &mut &'a [u8]) -> Option<&'a str> {
    let end = cstr_end(buf)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?;
    *buf = &buf[end + 1..];
    Some(s)
}

/// Takes a NUL-terminated byte string off the front of `buf`.
pub fn take_cbytes<'a>(buf: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = cstr_end(buf)?;
    let s = &buf[..end];
    *buf = &buf[end + 1..];
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame_bytes(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        v.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn a_message_read_in_place_encodes_as_its_frame() {
        let frame = Frame {
            tag: b'E',
            body: Bytes::from_static(b"\0\0\0\0\0"),
        };
        let mut out = BytesMut::from(&b"x"[..]);
        frame.as_ref().encode(&mut out);
        assert_eq!(&out[1..], &frame_bytes(b'E', b"\0\0\0\0\0")[..]);
        assert_eq!(out[0], b'x', "appended after what was there");
    }

    #[test]
    fn strings_are_taken_up_to_their_nul() {
        let mut rest: &[u8] = b"\0name\0tail";
        assert_eq!(take_cstr(&mut rest), Some(""));
        assert_eq!(take_cbytes(&mut rest), Some(&b"name"[..]));
        assert_eq!(rest, b"tail");
        assert_eq!(take_cstr(&mut rest), None, "no NUL: nothing taken");
        assert_eq!(rest, b"tail");
        let mut empty: &[u8] = b"";
        assert_eq!(take_cbytes(&mut empty), None);
        let mut bad: &[u8] = b"\xff\0";
        assert_eq!(take_cstr(&mut bad), None, "not UTF-8");
    }

    #[test]
    fn partial_frames_wait_for_more() {
        let bytes = frame_bytes(b'Q', b"select 1\0");
        for cut in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..cut]);
            assert_eq!(decode_frame(&mut buf, 1 << 20).unwrap(), None);
            assert_eq!(buf.len(), cut, "nothing consumed on a partial frame");
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let f = decode_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(&f.body[..], b"select 1\0");
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 3][..]);
        assert_eq!(
            decode_frame(&mut buf, 100),
            Err(ProtocolError::InvalidLength(3))
        );
        let mut buf = BytesMut::from(&[b'Q', 0xff, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            decode_frame(&mut buf, 100),
            Err(ProtocolError::InvalidLength(-1))
        );
        let mut buf = BytesMut::from(&[b'Q', 0, 1, 0, 0][..]);
        assert!(matches!(
            decode_frame(&mut buf, 100),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn startup_variants() {
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x2f][..]);
        assert_eq!(decode_startup(&mut buf).unwrap(), Some(Startup::Ssl));
        let mut buf = BytesMut::from(&[0, 0, 0, 8, 4, 0xd2, 0x16, 0x30][..]);
        assert_eq!(decode_startup(&mut buf).unwrap(), Some(Startup::GssEnc));
        let mut v = vec![0, 0, 0, 16];
        v.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        v.extend_from_slice(&7i32.to_be_bytes());
        v.extend_from_slice(&9i32.to_be_bytes());
        let mut buf = BytesMut::from(&v[..]);
        assert_eq!(
            decode_startup(&mut buf).unwrap(),
            Some(Startup::Cancel { pid: 7, secret: 9 })
        );
        let mut body = PROTOCOL_V3.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0bob\0database\0db\0\0");
        let mut v = ((body.len() + 4) as i32).to_be_bytes().to_vec();
        v.extend_from_slice(&body);
        let mut buf = BytesMut::from(&v[..]);
        let s = decode_startup(&mut buf).unwrap().unwrap();
        assert_eq!(s.param("user"), Some("bob"));
        assert_eq!(s.param("database"), Some("db"));
    }

    #[test]
    fn garbage_startup_is_rejected() {
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\n\r\n"[..]);
        assert!(decode_startup(&mut buf).is_err());
        let mut v = vec![0, 0, 0, 8];
        v.extend_from_slice(&0x0002_0000i32.to_be_bytes());
        let mut buf = BytesMut::from(&v[..]);
        assert!(matches!(
            decode_startup(&mut buf),
            Err(ProtocolError::UnsupportedVersion { major: 2, .. })
        ));
    }

    proptest! {
        #[test]
        fn any_frame_round_trips_through_any_split(
            frames in proptest::collection::vec((any::<u8>(), proptest::collection::vec(any::<u8>(), 0..64)), 1..8),
            split in 0usize..512,
        ) {
            let mut wire = Vec::new();
            for (tag, body) in &frames {
                wire.extend_from_slice(&frame_bytes(*tag, body));
            }
            let split = split.min(wire.len());
            let mut buf = BytesMut::from(&wire[..split]);
            let mut out = Vec::new();
            while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
                out.push(f);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(f) = decode_frame(&mut buf, 1 << 20).unwrap() {
                out.push(f);
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(out.len(), frames.len());
            for (f, (tag, body)) in out.iter().zip(&frames) {
                prop_assert_eq!(f.tag, *tag);
                prop_assert_eq!(&f.body[..], &body[..]);
                let mut enc = BytesMut::new();
                f.encode(&mut enc);
                prop_assert_eq!(&enc[..], &frame_bytes(*tag, body)[..]);
            }
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut buf = BytesMut::from(&bytes[..]);
            let _ = decode_startup(&mut buf);
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode_frame(&mut buf, 1 << 16) {}
        }
    }
}
