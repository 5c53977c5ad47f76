//! Globally unique 64-bit ids for sharded primary keys, answered by the
//! proxy (`SHOW shardgate.next_id`), snowflake style:
//!
//! ```text
//! 0 | 41 bits: ms since 2026-01-01 UTC | 10 bits: proxy.node_id | 12 bits: sequence
//! ```
//!
//! Ids from one proxy only grow (4096 per millisecond; a busier
//! millisecond borrows from the next, and a clock that steps back is
//! ignored until it catches up). Ids from different proxies differ in the
//! node bits, so each proxy of a cluster needs its own `proxy.node_id`.
//! They are positive bigints, roughly time-ordered, and need no table or
//! round trip to a database: an application asks for one, then inserts
//! with it as the key, so the proxy can route the INSERT.

use std::sync::atomic::{AtomicU64, Ordering};

/// 2026-01-01T00:00:00Z in ms since the Unix epoch.
pub const EPOCH_MS: u64 = 1_767_225_600_000;

const SEQ_BITS: u32 = 12;
const NODE_BITS: u32 = 10;

/// The last (time << 12 | sequence) handed out by this process.
static LAST: AtomicU64 = AtomicU64::new(0);

/// The next id for `node` (0-1023).
pub fn next_id(node: u16) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        .saturating_sub(EPOCH_MS);
    let stamp = next_stamp(now);
    compose(stamp >> SEQ_BITS, node, stamp & ((1 << SEQ_BITS) - 1))
}

fn next_stamp(now_ms: u64) -> u64 {
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = (now_ms << SEQ_BITS).max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => last = actual,
        }
    }
}

fn compose(ms: u64, node: u16, seq: u64) -> i64 {
    let ms = ms & ((1 << 41) - 1);
    ((ms << (NODE_BITS + SEQ_BITS)) | ((node as u64 & 0x3ff) << SEQ_BITS) | seq) as i64
}

/// The parts of an id: (ms since [`EPOCH_MS`], node, sequence).
pub fn parts(id: i64) -> (u64, u16, u64) {
    let id = id as u64;
    (
        id >> (NODE_BITS + SEQ_BITS),
        ((id >> SEQ_BITS) & 0x3ff) as u16,
        id & ((1 << SEQ_BITS) - 1),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_grow_carry_the_node_and_are_positive() {
        let mut prev = 0i64;
        for _ in 0..20_000 {
            let id = next_id(513);
            assert!(id > prev);
            assert_eq!(parts(id).1, 513);
            prev = id;
        }
        // 20,000 ids in well under 5 ms would overflow the sequence: the
        // time part borrows from the next millisecond instead.
        let (a, b) = (next_stamp(5), next_stamp(5));
        assert!(b > a);
        assert!(compose(1 << 40, 1023, 4095) > 0);
    }
}
