//! The counters of a running proxy as it goes: a look every ten seconds
//! that logs keys and shards becoming hot or cooling ([`super::watch`]),
//! and the hot-spot metrics added to /metrics at each scrape.
//!
//! Label cardinality is bounded: one series per shard, and per bucket and
//! per key only for the `hotspots.metrics_top` heaviest. The per-scrape
//! series are built in a registry of their own each time, so a bucket or
//! key that leaves the top N leaves /metrics too instead of going stale.

use super::report::{self, By, HotKey, HotRules};
use super::watch::{self, Change};
use crate::proxy::Proxy;
use prometheus::{Gauge, GaugeVec, IntCounterVec, Opts};
use std::sync::Arc;
use std::time::Duration;

/// How often the watcher looks.
pub const LOOK_EVERY: Duration = Duration::from_secs(10);

/// Key label values are cut to this many characters.
const MAX_KEY_LABEL: usize = 100;

/// What one look sees.
struct Look {
    names: Vec<String>,
    snap: super::Snapshot,
    map: Arc<crate::sharding::map::ShardMap>,
    keys: Vec<HotKey>,
    heat: Vec<watch::ShardHeat>,
    rules: HotRules,
}

fn look(proxy: &Proxy) -> Option<Look> {
    if !proxy.hotspots.enabled() {
        return None;
    }
    let topology = proxy.topology.load();
    let map = topology.map.clone()?;
    let names: Vec<String> = topology.shards.iter().map(|s| s.name.clone()).collect();
    let replicas: Vec<usize> = topology.shards.iter().map(|s| s.replicas.len()).collect();
    let rules = HotRules::from_config(&proxy.config.load().hotspots);
    let snap = proxy.hotspots.snapshot();
    let keys = report::hot_keys(&snap, &map, &names, &replicas, &rules, usize::MAX);
    let heat = watch::shard_heat(&snap, &names);
    Some(Look {
        names,
        snap,
        map,
        keys,
        heat,
        rules,
    })
}

/// Looks once: updates which keys and shards are hot, logs what changed
/// and returns it.
pub fn tick(proxy: &Proxy) -> Vec<Change> {
    let Some(l) = look(proxy) else {
        return Vec::new();
    };
    let changes = crate::lock(&proxy.hotspots.watcher).update(&l.keys, &l.heat, &l.rules);
    for c in &changes {
        c.log();
    }
    changes
}

/// Table sizes are read again after this long.
const SIZES_EVERY: Duration = Duration::from_secs(60);

/// Looks every [`LOOK_EVERY`], and reads the sharded tables' sizes every
/// [`SIZES_EVERY`], until shutdown (which does not wait for a shard that
/// is slow to answer the size query).
pub async fn run(proxy: Arc<Proxy>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(LOOK_EVERY) => {}
            _ = proxy.shutdown.cancelled() => return,
        }
        tick(&proxy);
        tokio::select! {
            _ = refresh_sizes(&proxy, SIZES_EVERY - LOOK_EVERY / 2) => {}
            _ = proxy.shutdown.cancelled() => return,
        }
    }
}

/// Reads the row estimates and bytes of the sharded tables on every
/// shard's primary (`pg_class`) unless the cached ones are younger than
/// `max_age`; `admin balance` and /metrics show them.
pub async fn refresh_sizes(proxy: &Arc<Proxy>, max_age: Duration) {
    if !proxy.hotspots.enabled() {
        return;
    }
    let Some(map) = proxy.topology.load().map.clone() else {
        return;
    };
    let database = crate::admin::database(proxy, "");
    crate::admin::hotspots::sizes_within(proxy, &map, &database, max_age).await;
}

/// The hot-spot metrics in the Prometheus text format (empty without
/// `[sharding]` or with counting off).
pub fn render(proxy: &Proxy) -> String {
    let Some(l) = look(proxy) else {
        return String::new();
    };
    let top = proxy.config.load().hotspots.metrics_top;
    let registry = crate::metrics::registry();
    macro_rules! reg {
        ($m:expr) => {
            crate::metrics::register(&registry, $m)
        };
    }
    let shard = &["shard"];
    let counter =
        |name: &str, help: &str| reg!(prometheus::CounterVec::new(Opts::new(name, help), shard));
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        reg!(GaugeVec::new(Opts::new(name, help), labels))
    };
    let statements = reg!(IntCounterVec::new(
        Opts::new(
            "shard_statements_total",
            "Statements run on the shard (a statement across shards counts on each)"
        ),
        shard
    ));
    let rows = counter(
        "shard_rows_total",
        "Rows returned or affected on the shard, from command tags",
    );
    let bytes = counter(
        "shard_bytes_total",
        "Bytes of server messages relayed from the shard",
    );
    let server_seconds = counter(
        "shard_server_seconds_total",
        "Server time on the shard: request sent to ReadyForQuery",
    );
    let buckets = gauge("shard_buckets", "Buckets the shard owns", shard);
    let qps = gauge(
        "shard_qps",
        "Statements per second on the shard over the last minute",
        shard,
    );
    let ratio = gauge(
        "shard_load_ratio",
        "The shard's server time over the last minute divided by the mean over shards (1 is an even share)",
        shard,
    );
    let hot = gauge(
        "shard_hot",
        "1 while the shard is hot (load ratio at least hotspots.hot_shard_load), as of the last look",
        shard,
    );
    for (s, name) in l.names.iter().enumerate() {
        let w = l.snap.shards.get(s).map(|w| w.total).unwrap_or_default();
        let labels = &[name.as_str()];
        statements.with_label_values(labels).inc_by(w.statements);
        rows.with_label_values(labels).inc_by(w.rows as f64);
        bytes.with_label_values(labels).inc_by(w.bytes as f64);
        server_seconds
            .with_label_values(labels)
            .inc_by(w.server_us as f64 / 1e6);
        let owned = l.map.owner.iter().filter(|o| **o as usize == s).count();
        buckets.with_label_values(labels).set(owned as f64);
        if let Some(h) = l.heat.get(s) {
            qps.with_label_values(labels).set(h.qps);
            ratio.with_label_values(labels).set(h.load_ratio);
        }
        let is_hot = crate::lock(&proxy.hotspots.watcher).is_hot_shard(name);
        hot.with_label_values(labels)
            .set(f64::from(u8::from(is_hot)));
    }
    let table_rows = gauge(
        "shard_table_rows",
        "Row estimate (pg_class.reltuples) of the sharded tables on the shard, read once a minute",
        shard,
    );
    let table_bytes = gauge(
        "shard_table_bytes",
        "Bytes (pg_total_relation_size) of the sharded tables on the shard, read once a minute",
        shard,
    );
    if let Some((_, _, sizes)) = crate::lock(&proxy.hotspots.table_sizes).as_ref() {
        for (name, (rows, bytes)) in l.names.iter().zip(sizes) {
            // -1: the shard could not be read.
            if *rows >= 0 && *bytes >= 0 {
                table_rows.with_label_values(&[name]).set(*rows as f64);
                table_bytes.with_label_values(&[name]).set(*bytes as f64);
            }
        }
    }
    let (_, skew) = report::balance(&l.snap, &l.map, &l.names, By::Time);
    reg!(Gauge::new(
        "shard_skew",
        "Max over mean of the shards' server time over the last ten minutes (1 is even), as shardgate admin balance"
    ))
    .set(skew);

    let bucket_labels = &["bucket", "shard"];
    let bucket_qps = gauge(
        "bucket_qps",
        "Statements per second over the last ten minutes, for the hotspots.metrics_top heaviest buckets",
        bucket_labels,
    );
    let bucket_share = gauge(
        "bucket_load_share",
        "The bucket's share of its shard's statements over the last ten minutes (heaviest buckets only)",
        bucket_labels,
    );
    for b in report::heavy_buckets(&l.snap, &l.map, &l.names, By::Statements, top) {
        let bucket = b.bucket.to_string();
        let labels = &[bucket.as_str(), b.shard.as_str()];
        bucket_qps.with_label_values(labels).set(b.qps_10m);
        bucket_share.with_label_values(labels).set(b.share);
    }

    let key_labels = &["table", "key", "shard"];
    let key_share = gauge(
        "hot_key_share",
        "The key's share of its shard's recent statements (faded by hotspots.half_life), for the hotspots.metrics_top heaviest keys",
        key_labels,
    );
    let key_statements = gauge(
        "hot_key_statements",
        "The key's recent statements (faded by hotspots.half_life; an overestimate by at most the sketch's error)",
        key_labels,
    );
    let key_hot = gauge(
        "hot_key_hot",
        "1 while the key is hot (share at least hotspots.hot_key_share), as of the last look",
        key_labels,
    );
    let watcher = crate::lock(&proxy.hotspots.watcher);
    for k in l.keys.iter().take(top) {
        let key: String = k.key.chars().take(MAX_KEY_LABEL).collect();
        let labels = &[k.table.as_str(), key.as_str(), k.shard.as_str()];
        key_share.with_label_values(labels).set(k.share);
        key_statements.with_label_values(labels).set(k.count);
        let is_hot = watcher.is_hot_key(&k.table, &k.key);
        key_hot
            .with_label_values(labels)
            .set(f64::from(u8::from(is_hot)));
    }
    reg!(Gauge::new(
        "hot_keys",
        "Keys hot as of the last look (all of them, not only the top N)"
    ))
    .set(watcher.hot_key_count() as f64);
    drop(watcher);

    crate::metrics::encode(&registry)
}
