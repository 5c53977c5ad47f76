//! Messages a server sends: builders for the ones the proxy produces itself
//! (authentication requests, ParameterStatus, BackendKeyData, ReadyForQuery,
//! ErrorResponse, ParseComplete, ...) and parsers for the ones the session
//! must inspect (ReadyForQuery status, ErrorResponse fields, ParameterStatus,
//! CommandComplete tags).

use super::frame::{take_cstr, Frame};
use bytes::{BufMut, Bytes, BytesMut};

pub const AUTHENTICATION: u8 = b'R';
pub const PARAMETER_STATUS: u8 = b'S';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ERROR_RESPONSE: u8 = b'E';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NOTIFICATION: u8 = b'A';
pub const PARSE_COMPLETE: u8 = b'1';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const ROW_DESCRIPTION: u8 = b'T';
pub const NO_DATA: u8 = b'n';
pub const DATA_ROW: u8 = b'D';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const EMPTY_QUERY: u8 = b'I';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';

pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT: i32 = 3;
pub const AUTH_MD5: i32 = 5;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

fn frame(tag: u8, body: BytesMut) -> Frame {
    Frame {
        tag,
        body: body.freeze(),
    }
}

pub fn auth_request(code: i32, extra: &[u8]) -> Frame {
    let mut b = BytesMut::with_capacity(4 + extra.len());
    b.put_i32(code);
    b.put_slice(extra);
    frame(AUTHENTICATION, b)
}

pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut b = BytesMut::with_capacity(name.len() + value.len() + 2);
    b.put_slice(name.as_bytes());
    b.put_u8(0);
    b.put_slice(value.as_bytes());
    b.put_u8(0);
    frame(PARAMETER_STATUS, b)
}

pub fn backend_key_data(pid: i32, secret: i32) -> Frame {
    let mut b = BytesMut::with_capacity(8);
    b.put_i32(pid);
    b.put_i32(secret);
    frame(BACKEND_KEY_DATA, b)
}

pub fn ready_for_query(status: u8) -> Frame {
    // The three statuses Postgres sends need no allocation (the proxy
    // answers a deferred BEGIN with one per transaction).
    let body = match status {
        b'I' => Bytes::from_static(b"I"),
        b'T' => Bytes::from_static(b"T"),
        b'E' => Bytes::from_static(b"E"),
        other => Bytes::copy_from_slice(&[other]),
    };
    Frame {
        tag: READY_FOR_QUERY,
        body,
    }
}

/// A RowDescription of text columns (the proxy's own result sets).
pub fn row_description_text(names: &[&str]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(names.len() as i16);
    for name in names {
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_i32(0); // table oid
        b.put_i16(0); // column number
        b.put_i32(25); // text
        b.put_i16(-1); // variable length
        b.put_i32(-1); // no type modifier
        b.put_i16(0); // text format
    }
    frame(ROW_DESCRIPTION, b)
}

pub fn data_row(values: &[&str]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i16(values.len() as i16);
    for v in values {
        b.put_i32(v.len() as i32);
        b.put_slice(v.as_bytes());
    }
    frame(DATA_ROW, b)
}

pub fn command_complete(tag: &str) -> Frame {
    // The tags of the transaction control the proxy answers itself.
    let known: Option<&'static [u8]> = match tag {
        "BEGIN" => Some(b"BEGIN\0"),
        "COMMIT" => Some(b"COMMIT\0"),
        "ROLLBACK" => Some(b"ROLLBACK\0"),
        _ => None,
    };
    if let Some(body) = known {
        return Frame {
            tag: COMMAND_COMPLETE,
            body: Bytes::from_static(body),
        };
    }
    let mut b = BytesMut::with_capacity(tag.len() + 1);
    b.put_slice(tag.as_bytes());
    b.put_u8(0);
    frame(COMMAND_COMPLETE, b)
}

pub fn empty(tag: u8) -> Frame {
    Frame {
        tag,
        body: Bytes::new(),
    }
}

pub fn negotiate_protocol_version(minor: i32, unrecognized: &[&str]) -> Frame {
    let mut b = BytesMut::new();
    b.put_i32(minor);
    b.put_i32(unrecognized.len() as i32);
    for o in unrecognized {
        b.put_slice(o.as_bytes());
        b.put_u8(0);
    }
    frame(NEGOTIATE_PROTOCOL_VERSION, b)
}

/// An ErrorResponse (or NoticeResponse) the proxy writes itself.
pub fn error_response(severity: &str, code: &str, message: &str) -> Frame {
    notice_or_error(ERROR_RESPONSE, severity, code, message)
}

pub fn notice_response(code: &str, message: &str) -> Frame {
    notice_or_error(NOTICE_RESPONSE, "NOTICE", code, message)
}

fn notice_or_error(tag: u8, severity: &str, code: &str, message: &str) -> Frame {
    let mut b = BytesMut::with_capacity(severity.len() * 2 + code.len() + message.len() + 16);
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        b.put_u8(field);
        b.put_slice(value.as_bytes());
        b.put_u8(0);
    }
    b.put_u8(0);
    frame(tag, b)
}

/// Fields of an ErrorResponse or NoticeResponse.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

pub fn parse_error(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        rest = tail;
        let Some(value) = take_cstr(&mut rest) else {
            break;
        };
        match kind {
            b'V' => fields.severity = value.to_owned(),
            b'S' if fields.severity.is_empty() => fields.severity = value.to_owned(),
            b'C' => fields.code = value.to_owned(),
            b'M' => fields.message = value.to_owned(),
            _ => {}
        }
    }
    fields
}

/// SQLSTATE of an ErrorResponse without allocating; `None` if absent.
pub fn error_code(body: &[u8]) -> Option<[u8; 5]> {
    let mut rest = body;
    while let Some((&kind, tail)) = rest.split_first() {
        if kind == 0 {
            return None;
        }
        let end = tail.iter().position(|&b| b == 0)?;
        if kind == b'C' && end == 5 {
            let mut code = [0u8; 5];
            code.copy_from_slice(&tail[..5]);
            return Some(code);
        }
        rest = &tail[end + 1..];
    }
    None
}

pub fn parse_parameter_status(body: &[u8]) -> Option<(&str, &str)> {
    let mut rest = body;
    let name = take_cstr(&mut rest)?;
    let value = take_cstr(&mut rest)?;
    Some((name, value))
}

/// The command tag of a CommandComplete, e.g. `SELECT 1` or `SET`.
pub fn command_tag(body: &[u8]) -> &[u8] {
    match body.iter().position(|&b| b == 0) {
        Some(end) => &body[..end],
        None => body,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        let f = error_response("FATAL", "28P01", "password authentication failed");
        let e = parse_error(&f.body);
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert_eq!(e.message, "password authentication failed");
        assert_eq!(error_code(&f.body), Some(*b"28P01"));
        assert_eq!(error_code(b"\0"), None);
        assert_eq!(error_code(b"Cxx"), None);
    }

    #[test]
    fn parameter_status_round_trip() {
        let f = parameter_status("DateStyle", "ISO, MDY");
        assert_eq!(
            parse_parameter_status(&f.body),
            Some(("DateStyle", "ISO, MDY"))
        );
    }

    #[test]
    fn command_complete_and_ready_for_query_encode_their_tag_and_status() {
        for tag in ["BEGIN", "COMMIT", "ROLLBACK", "SELECT 1", "INSERT 0 3"] {
            let f = command_complete(tag);
            assert_eq!(f.tag, COMMAND_COMPLETE);
            assert_eq!(&f.body[..], [tag.as_bytes(), b"\0"].concat(), "{tag}");
        }
        for status in [b'I', b'T', b'E', b'X'] {
            let f = ready_for_query(status);
            assert_eq!(f.tag, READY_FOR_QUERY);
            assert_eq!(&f.body[..], [status], "{}", status as char);
        }
    }
}
