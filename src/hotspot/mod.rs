//! Where the load is: counters per shard and per bucket, and the heaviest
//! sharding keys of each sharded table, counted as statements are routed.
//!
//! The data path takes one short lock per request, never held across an
//! await. The session notes each statement it places on a shard in its
//! [`Request`] (no lock); when the server answers ReadyForQuery,
//! [`Hotspots::answered`] counts, in one go, one statement for each shard
//! and, for a statement with one sharding key, one for the key's bucket
//! and one for the key in its table's Space-Saving sketch ([`sketch`]);
//! then the server time (from the request to ReadyForQuery), rows and
//! bytes, for the shard and for the bucket of the request's key, if it
//! had one.
//!
//! Counters keep totals and two sliding windows: the last minute (six
//! 10-second slots) and the last ten minutes (ten 1-minute slots). Slots
//! are reset lazily when a count lands in a new period, so nothing ticks.
//! Sketches and the per-shard statement counts their shares are measured
//! against fade by half every `hotspots.half_life`, so a key that was hot
//! an hour ago is not reported as hot now.
//!
//! [`report`] turns the counters into the operator's views (balance, hot
//! keys and buckets) and [`plan`] into bucket moves that even the load;
//! [`watch`] and [`live`] log keys and shards that become hot or cool, and
//! export it all as metrics.

pub mod live;
pub mod plan;
pub mod report;
pub mod sketch;
pub mod watch;

use crate::sharding::hash::KeyValue;
use sketch::SpaceSaving;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Load of one period (or of all time).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counts {
    pub statements: u64,
    pub rows: u64,
    pub bytes: u64,
    /// Server time, microseconds.
    pub server_us: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.statements += o.statements;
        self.rows += o.rows;
        self.bytes += o.bytes;
        self.server_us += o.server_us;
    }
}

const SHORT_SLOTS: usize = 6;
const SHORT_SLOT_S: u64 = 10;
const LONG_SLOTS: usize = 10;
const LONG_SLOT_S: u64 = 60;

/// Totals and the two sliding windows of one shard or bucket.
#[derive(Debug, Clone, Default)]
pub struct Windowed {
    short: [(u64, Counts); SHORT_SLOTS],
    long: [(u64, Counts); LONG_SLOTS],
    pub total: Counts,
}

impl Windowed {
    fn add(&mut self, now_s: u64, c: &Counts) {
        // Periods are numbered from 1 so that slot 0 of a fresh counter
        // (period 0) never counts as current.
        let p = now_s / SHORT_SLOT_S + 1;
        let slot = &mut self.short[(p % SHORT_SLOTS as u64) as usize];
        if slot.0 != p {
            *slot = (p, Counts::default());
        }
        slot.1.add(c);
        let p = now_s / LONG_SLOT_S + 1;
        let slot = &mut self.long[(p % LONG_SLOTS as u64) as usize];
        if slot.0 != p {
            *slot = (p, Counts::default());
        }
        slot.1.add(c);
        self.total.add(c);
    }

    /// The load of the last minute (`long`: false) or ten minutes.
    pub fn window(&self, now_s: u64, long: bool) -> Counts {
        let (slots, len, n): (&[(u64, Counts)], u64, u64) = if long {
            (&self.long, LONG_SLOT_S, LONG_SLOTS as u64)
        } else {
            (&self.short, SHORT_SLOT_S, SHORT_SLOTS as u64)
        };
        let p = now_s / len + 1;
        let mut sum = Counts::default();
        for (period, c) in slots {
            if *period + n > p && *period <= p {
                sum.add(c);
            }
        }
        sum
    }
}

/// Seconds a window covers at `now_s` seconds after the counters started
/// (its oldest slot may be partly before the start).
pub fn window_seconds(now_s: u64, long: bool) -> f64 {
    let (len, n) = if long {
        (LONG_SLOT_S, LONG_SLOTS as u64)
    } else {
        (SHORT_SLOT_S, SHORT_SLOTS as u64)
    };
    let full = (n - 1) * len + now_s % len + 1;
    full.min(now_s + 1) as f64
}

/// The heaviest keys of one sharded table.
pub struct TableSketch {
    /// (key, its bucket).
    pub keys: SpaceSaving<(KeyValue, u32)>,
}

#[derive(Default)]
struct Inner {
    shards: Vec<Windowed>,
    buckets: Vec<Windowed>,
    /// Statements per shard, faded like the sketches (the denominator of a
    /// key's share).
    shard_faded: Vec<f64>,
    tables: hashbrown::HashMap<Arc<str>, TableSketch>,
    /// Seconds since `started` at the last count.
    now_s: u64,
    /// Fading steps (of `FADE_STEP`) applied so far.
    faded_steps: u64,
}

/// The counters of one proxy.
pub struct Hotspots {
    enabled: AtomicBool,
    /// `hotspots.top_keys`, read per keyed statement without a lock.
    top_keys: AtomicUsize,
    started: Instant,
    inner: Mutex<Inner>,
    /// `hotspots.half_life` in milliseconds (read per request, no lock).
    half_life_ms: AtomicU64,
    /// The admin views' cache of table sizes per shard: (read at, database,
    /// (row estimate, bytes) per shard).
    pub table_sizes: Mutex<Option<TableSizes>>,
    /// Which keys and shards are hot, as of the last look ([`live`]).
    pub watcher: Mutex<watch::Watcher>,
}

pub type TableSizes = (Instant, String, Vec<(i64, i64)>);

/// Fading runs in steps of this length.
const FADE_STEP: Duration = Duration::from_secs(10);

impl Hotspots {
    pub fn new(config: &crate::config::HotspotsConfig) -> Self {
        Hotspots {
            enabled: AtomicBool::new(config.enabled),
            top_keys: AtomicUsize::new(config.top_keys),
            started: Instant::now(),
            inner: Mutex::new(Inner::default()),
            table_sizes: Mutex::new(None),
            watcher: Mutex::new(watch::Watcher::default()),
            half_life_ms: AtomicU64::new(config.half_life.as_millis() as u64),
        }
    }

    /// Takes a reloaded `[hotspots]` section.
    pub fn configure(&self, config: &crate::config::HotspotsConfig) {
        self.enabled.store(config.enabled, Ordering::Relaxed);
        self.top_keys.store(config.top_keys, Ordering::Relaxed);
        self.half_life_ms
            .store(config.half_life.as_millis() as u64, Ordering::Relaxed);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// Counts a request the server has answered (ReadyForQuery, at `now`)
    /// after `elapsed` on `shard`: its statements, keys, rows and bytes,
    /// under one lock. Leaves `req` empty for the next request.
    pub fn answered(&self, shard: usize, req: &mut Request, elapsed: Duration, now: Instant) {
        let mut inner = self.lock_at(now);
        let c = Counts {
            statements: 0,
            rows: std::mem::take(&mut req.rows),
            bytes: std::mem::take(&mut req.bytes),
            server_us: elapsed.as_micros() as u64,
        };
        let bucket = req.bucket.take();
        if let [(s, key)] = req.routed.as_slice() {
            if *s == shard && key.as_ref().map(|k| k.bucket) == bucket {
                // The usual request, one statement: its rows and time go
                // in with it (one add per counter rather than two).
                self.count_statements(&mut inner, req, &c);
                return;
            }
        }
        self.count_statements(&mut inner, req, &Counts::default());
        let now_s = inner.now_s;
        grow(&mut inner.shards, shard);
        inner.shards[shard].add(now_s, &c);
        if let Some(b) = bucket {
            grow(&mut inner.buckets, b as usize);
            inner.buckets[b as usize].add(now_s, &c);
        }
    }

    /// One shard's part of a statement that ran on several at once (a
    /// cross-shard read): a statement for the shard, with its rows, bytes
    /// and server time. It has no single key, so no bucket counts it.
    pub fn shard_part(&self, shard: usize, rows: u64, bytes: u64, elapsed: Duration) {
        let mut req = Request::default();
        req.routed(shard, None);
        req.rows = rows;
        req.bytes = bytes;
        self.answered(shard, &mut req, elapsed, Instant::now());
    }

    /// Counts the statements `req` holds now (a long pipeline before its
    /// Sync, so that the list stays short).
    pub fn flush_statements(&self, req: &mut Request) {
        let mut inner = self.lock_at(Instant::now());
        self.count_statements(&mut inner, req, &Counts::default());
    }

    /// The counters, their clock advanced and faded to `now`.
    fn lock_at(&self, now: Instant) -> std::sync::MutexGuard<'_, Inner> {
        let now = now.saturating_duration_since(self.started);
        let half_life = self.half_life();
        let mut inner = crate::lock(&self.inner);
        inner.now_s = inner.now_s.max(now.as_secs());
        inner.fade(now, half_life);
        inner
    }

    /// Counts the statements of `req`, each with `with` added.
    fn count_statements(&self, inner: &mut Inner, req: &mut Request, with: &Counts) {
        let now_s = inner.now_s;
        let one = Counts {
            statements: 1,
            ..*with
        };
        for (s, key) in req.routed.drain(..) {
            grow(&mut inner.shards, s);
            inner.shards[s].add(now_s, &one);
            if inner.shard_faded.len() <= s {
                inner.shard_faded.resize(s + 1, 0.0);
            }
            inner.shard_faded[s] += 1.0;
            let Some(hit) = key else { continue };
            grow(&mut inner.buckets, hit.bucket as usize);
            inner.buckets[hit.bucket as usize].add(now_s, &one);
            let key = (hit.key, hit.bucket);
            match inner.tables.get_mut(&hit.table) {
                Some(t) => t.keys.add(&key, 1.0),
                None => {
                    let mut keys = SpaceSaving::new(self.top_keys.load(Ordering::Relaxed));
                    keys.add(&key, 1.0);
                    inner.tables.insert(hit.table, TableSketch { keys });
                }
            }
        }
    }

    /// A copy of the counters for a report, faded up to now.
    pub fn snapshot(&self) -> Snapshot {
        let now = self.started.elapsed();
        let half_life = self.half_life();
        let mut inner = crate::lock(&self.inner);
        inner.now_s = inner.now_s.max(now.as_secs());
        inner.fade(now, half_life);
        Snapshot {
            now_s: inner.now_s,
            shards: inner.shards.clone(),
            buckets: inner.buckets.clone(),
            shard_faded: inner.shard_faded.clone(),
            tables: inner
                .tables
                .iter()
                .map(|(t, s)| TableKeys {
                    table: t.to_string(),
                    top: s.keys.top(usize::MAX),
                    total: s.keys.total(),
                    unmonitored_bound: s.keys.unmonitored_bound(),
                })
                .collect(),
        }
    }

    fn half_life(&self) -> Duration {
        Duration::from_millis(self.half_life_ms.load(Ordering::Relaxed))
    }
}

impl Inner {
    fn fade(&mut self, now: Duration, half_life: Duration) {
        let steps = now.as_secs() / FADE_STEP.as_secs();
        if steps <= self.faded_steps {
            return;
        }
        let n = (steps - self.faded_steps).min(10_000) as f64;
        self.faded_steps = steps;
        let factor = 0.5f64.powf(n * FADE_STEP.as_secs_f64() / half_life.as_secs_f64().max(1.0));
        for t in self.tables.values_mut() {
            t.keys.decay(factor);
        }
        for s in &mut self.shard_faded {
            *s *= factor;
        }
    }
}

fn grow(v: &mut Vec<Windowed>, i: usize) {
    if v.len() <= i {
        v.resize(i + 1, Windowed::default());
    }
}

/// The row count a command tag reports (`SELECT 5`, `INSERT 0 5`,
/// `UPDATE 5`, `COPY 5` ...); 0 for tags without one.
pub fn rows_of_tag(tag: &[u8]) -> u64 {
    // Read right to left: one pass, no UTF-8 check or str::parse (this
    // runs once per command tag).
    let (mut n, mut scale, mut digits) = (0u64, 1u64, 0usize);
    for &b in tag.iter().rev() {
        if !b.is_ascii_digit() {
            break;
        }
        if digits == 19 {
            return 0; // more than u64 holds: no real row count
        }
        n += u64::from(b - b'0') * scale;
        scale = scale.wrapping_mul(10);
        digits += 1;
    }
    if digits == 0 || digits == tag.len() || tag[tag.len() - digits - 1] != b' ' {
        return 0;
    }
    n
}

/// One request's load, gathered by its session as statements are placed
/// and counted in one go when the server answers ([`Hotspots::answered`]):
/// one lock per request, not one per statement.
#[derive(Debug, Default)]
pub struct Request {
    /// Statements placed: (shard, the single key, if any).
    routed: Vec<(usize, Option<KeyHit>)>,
    /// The bucket of the last keyed statement: the server time, rows and
    /// bytes of the request count for it.
    pub bucket: Option<u32>,
    /// Rows (from command tags) and bytes the server sent.
    pub rows: u64,
    pub bytes: u64,
}

impl Request {
    /// A statement placed on `shard`; `key`: its table, sharding key and
    /// bucket when it has exactly one key.
    pub fn routed(&mut self, shard: usize, key: Option<KeyHit>) {
        if let Some(h) = &key {
            self.bucket = Some(h.bucket);
        }
        self.routed.push((shard, key));
    }

    /// Statements noted and not yet counted.
    pub fn pending(&self) -> usize {
        self.routed.len()
    }
}

/// One statement's single sharding key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHit {
    pub table: Arc<str>,
    pub key: KeyValue,
    pub bucket: u32,
}

/// The heaviest keys of one table at snapshot time.
#[derive(Debug, Clone)]
pub struct TableKeys {
    pub table: String,
    /// (key, bucket), heaviest first.
    pub top: Vec<sketch::Counter<(KeyValue, u32)>>,
    pub total: f64,
    pub unmonitored_bound: f64,
}

/// The counters at one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub now_s: u64,
    pub shards: Vec<Windowed>,
    pub buckets: Vec<Windowed>,
    pub shard_faded: Vec<f64>,
    pub tables: Vec<TableKeys>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_slide_and_totals_stay() {
        let mut w = Windowed::default();
        let one = Counts {
            statements: 1,
            rows: 2,
            bytes: 3,
            server_us: 4,
        };
        for s in 0..600 {
            w.add(s, &one);
        }
        assert_eq!(w.total.statements, 600);
        // At second 599: the short window holds 50 full seconds + 10.
        assert_eq!(w.window(599, false).statements, 60);
        assert_eq!(w.window(599, true).statements, 600);
        // Ten quiet minutes later both windows are empty.
        assert_eq!(w.window(1300, false), Counts::default());
        assert_eq!(w.window(1300, true), Counts::default());
        assert_eq!(w.total.rows, 1200);
        assert_eq!(window_seconds(599, false), 60.0);
        assert_eq!(window_seconds(5, false), 6.0);
    }

    #[test]
    fn keys_and_buckets_are_counted_and_fade() {
        let h = Hotspots::new(&crate::config::HotspotsConfig::default());
        let hit = KeyHit {
            table: "t".into(),
            key: KeyValue::Int(7),
            bucket: 3,
        };
        let mut req = Request::default();
        for _ in 0..10 {
            req.routed(1, Some(hit.clone()));
        }
        req.routed(0, None);
        req.rows = 5;
        req.bytes = 100;
        h.answered(1, &mut req, Duration::from_millis(2), Instant::now());
        assert!(req.routed.is_empty() && req.bucket.is_none() && req.rows == 0);
        let s = h.snapshot();
        assert_eq!(s.shards[1].total.statements, 10);
        assert_eq!(s.shards[0].total.statements, 1);
        assert_eq!(s.buckets[3].total.rows, 5);
        assert_eq!(s.buckets[3].total.server_us, 2000);
        assert_eq!(s.tables[0].top[0].key, (KeyValue::Int(7), 3));
        assert_eq!(s.tables[0].top[0].count, 10.0);
        let mut inner = crate::lock(&h.inner);
        inner.fade(Duration::from_secs(300), Duration::from_secs(300));
        assert!((inner.shard_faded[1] - 5.0).abs() < 1e-9);
    }

    #[test]
    fn one_statement_requests_count_like_any_other() {
        let h = Hotspots::new(&crate::config::HotspotsConfig::default());
        let hit = |bucket| KeyHit {
            table: "t".into(),
            key: KeyValue::Int(7),
            bucket,
        };
        let answer = |routed: Vec<(usize, Option<KeyHit>)>| {
            let mut req = Request::default();
            for (s, k) in routed {
                req.routed(s, k);
            }
            req.rows = 5;
            req.bytes = 100;
            h.answered(2, &mut req, Duration::from_micros(30), Instant::now());
        };
        answer(vec![(2, Some(hit(4)))]); // one statement, keyed
        answer(vec![(2, None)]); // one statement, no key
        answer(vec![(1, None)]); // one statement on another shard
        let s = h.snapshot();
        let total = |w: &Windowed| w.total;
        assert_eq!(
            total(&s.shards[2]),
            Counts {
                statements: 2,
                rows: 15,
                bytes: 300,
                server_us: 90,
            }
        );
        assert_eq!(
            total(&s.buckets[4]),
            Counts {
                statements: 1,
                rows: 5,
                bytes: 100,
                server_us: 30,
            }
        );
        assert_eq!(total(&s.shards[1]).statements, 1);
        assert_eq!(total(&s.shards[1]).rows, 0);
        assert_eq!(s.shards[2].window(s.now_s, false).rows, 15);
    }

    #[test]
    fn rows_of_tags() {
        assert_eq!(rows_of_tag(b"SELECT 5"), 5);
        assert_eq!(rows_of_tag(b"INSERT 0 12"), 12);
        assert_eq!(rows_of_tag(b"BEGIN"), 0);
        assert_eq!(rows_of_tag(b"CREATE TABLE"), 0);
        assert_eq!(rows_of_tag(b"12"), 0);
        assert_eq!(rows_of_tag(b"SELECT 0"), 0);
        assert_eq!(rows_of_tag(b"COPY 1234567890123"), 1234567890123);
        assert_eq!(rows_of_tag(b"SELECT 99999999999999999999"), 0);
    }
}
