//! Fuzzes everything the proxy decodes from an untrusted client: the
//! startup packet, message framing and the Parse/Bind/Describe/Close/Query
//! parsers. Run: `cargo fuzz run client_messages --sanitizer none` (stable).
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use shardgate::protocol::frame::{decode_frame, decode_startup};
use shardgate::protocol::frontend as fe;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let _ = decode_startup(&mut buf);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(frame)) = decode_frame(&mut buf, 1 << 20) {
        let body = &frame.body[..];
        match frame.tag {
            b'P' => {
                let _ = fe::parse_parse(body);
            }
            b'B' => {
                let _ = fe::parse_bind(body);
            }
            b'D' | b'C' => {
                let _ = fe::parse_target(body, "target");
            }
            b'Q' => {
                if let Ok(q) = fe::parse_query(body) {
                    let _ = shardgate::sql::split_statements(q);
                }
            }
            _ => {}
        }
    }
});
