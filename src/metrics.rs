//! Prometheus metrics and the HTTP endpoint that serves them.
//!
//! The registry is the one piece of global mutable state (STYLE.md rule 5).
//! Hot-path counters are cached handles (`PoolMetrics`), so counting costs
//! an atomic add, never a label lookup. Gauges that describe pools are
//! computed when /metrics is scraped.

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, LazyLock};

pub struct Global {
    pub registry: Registry,
    pub clients_active: IntGauge,
    pub client_connections: IntCounter,
    pub client_rejected: IntCounterVec,
    pub errors: IntCounterVec,
    waiting: IntGaugeVec,
    checkout_timeouts: IntCounterVec,
    connects: IntCounterVec,
    connect_errors: IntCounterVec,
    transactions: IntCounterVec,
    queries: IntCounterVec,
    tx_duration: HistogramVec,
    query_duration: HistogramVec,
    server_conns: IntGaugeVec,
    routed: IntCounterVec,
    /// Reads sent to the primary although replicas exist, by reason.
    pub read_fallbacks: IntCounterVec,
    pub replica_bans: IntCounterVec,
    pub replica_lag_bytes: IntGaugeVec,
    pub replica_lag_seconds: GaugeVec,
    pub read_retries: IntCounter,
    /// Cross-shard SELECTs by how their rows were combined.
    pub scatter_queries: IntCounterVec,
    /// Statements refused because they need several shards in a way
    /// shardgate does not support.
    pub cross_shard_refusals: IntCounter,
    /// Writes across shards by outcome (committed, rolled_back).
    pub twophase: IntCounterVec,
    /// Failovers by shard and outcome (promoted, no_candidate, failed).
    pub failovers: IntCounterVec,
    /// Seconds from the first failed probe to the decision, and from the
    /// decision to a new primary, of the last failover per shard.
    pub failover_seconds: GaugeVec,
    /// 1 while a fenced former primary answers as a primary.
    pub fenced_primary_alive: IntGaugeVec,
    pub topology_epoch: IntGauge,
    /// Statements that waited for a shard's primary (failover hold).
    pub writes_held: IntCounter,
    /// How long statements on moving buckets were held at each cutover.
    pub reshard_pause_ms: Histogram,
    /// Statements that waited for a bucket move's cutover.
    pub reshard_held: IntCounter,
    /// Bucket moves by outcome (done, failed, aborted).
    pub reshard_moves: IntCounterVec,
}

/// Latency buckets from 50 µs to 10 s.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

/// A registry whose metric names start with `shardgate_`.
pub fn registry() -> Registry {
    Registry::new_custom(Some("shardgate".into()), None).expect("valid prefix")
}

/// Registers a metric built from constant names and labels (a bad one is
/// a programming error) and returns its handle.
pub fn register<M>(registry: &Registry, metric: prometheus::Result<M>) -> M
where
    M: prometheus::core::Collector + Clone + 'static,
{
    let m = metric.expect("valid metric definition");
    registry
        .register(Box::new(m.clone()))
        .expect("metric registered once");
    m
}

/// Encodes everything in `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .expect("text encoding into a Vec cannot fail");
    String::from_utf8(out).expect("Prometheus text is UTF-8")
}

fn build() -> Global {
    let registry = registry();
    let pool_labels = &["pool"];
    macro_rules! reg {
        ($m:expr) => {
            register(&registry, $m)
        };
    }
    Global {
        clients_active: reg!(IntGauge::new(
            "clients_active",
            "Client connections open now"
        )),
        client_connections: reg!(IntCounter::new(
            "client_connections_total",
            "Client connections accepted"
        )),
        client_rejected: reg!(IntCounterVec::new(
            Opts::new(
                "client_rejected_total",
                "Client connections refused, by reason"
            ),
            &["reason"]
        )),
        errors: reg!(IntCounterVec::new(
            Opts::new(
                "errors_total",
                "ErrorResponses sent to clients, by SQLSTATE class (first two characters)"
            ),
            &["class"]
        )),
        waiting: reg!(IntGaugeVec::new(
            Opts::new("clients_waiting", "Clients waiting for a server connection"),
            pool_labels
        )),
        checkout_timeouts: reg!(IntCounterVec::new(
            Opts::new(
                "checkout_timeouts_total",
                "Checkouts that timed out (53300)"
            ),
            pool_labels
        )),
        connects: reg!(IntCounterVec::new(
            Opts::new("server_connects_total", "Server connections opened"),
            pool_labels
        )),
        connect_errors: reg!(IntCounterVec::new(
            Opts::new(
                "server_connect_errors_total",
                "Server connections that failed to open"
            ),
            pool_labels
        )),
        transactions: reg!(IntCounterVec::new(
            Opts::new(
                "transactions_total",
                "Transactions (server checkouts) completed"
            ),
            pool_labels
        )),
        queries: reg!(IntCounterVec::new(
            Opts::new(
                "queries_total",
                "Queries (simple Query and Execute messages) run, by pool and route (primary/replica)"
            ),
            &["pool", "route"]
        )),
        tx_duration: reg!(HistogramVec::new(
            HistogramOpts::new(
                "transaction_duration_seconds",
                "Time a server connection was held per transaction"
            )
            .buckets(BUCKETS.to_vec()),
            pool_labels
        )),
        query_duration: reg!(HistogramVec::new(
            HistogramOpts::new(
                "query_duration_seconds",
                "Time from a client request (Query or first message before Sync) to ReadyForQuery"
            )
            .buckets(BUCKETS.to_vec()),
            pool_labels
        )),
        server_conns: reg!(IntGaugeVec::new(
            Opts::new("server_connections", "Server connections by pool and state"),
            &["pool", "state"]
        )),
        routed: reg!(IntCounterVec::new(
            Opts::new(
                "routed_total",
                "Server checkouts (transactions) by route and server"
            ),
            &["route", "server"]
        )),
        scatter_queries: reg!(IntCounterVec::new(
            Opts::new(
                "scatter_queries_total",
                "Cross-shard SELECTs, by merge (concat: rows concatenated; final: combined by a second query)"
            ),
            &["merge"]
        )),
        twophase: reg!(IntCounterVec::new(
            Opts::new(
                "twophase_transactions_total",
                "Writes across shards (two-phase commit), by outcome"
            ),
            &["outcome"]
        )),
        failovers: reg!(IntCounterVec::new(
            Opts::new("failovers_total", "Automatic failovers, by shard and outcome"),
            &["shard", "outcome"]
        )),
        failover_seconds: reg!(GaugeVec::new(
            Opts::new(
                "failover_last_seconds",
                "The last failover of a shard: phase = detect (first failed probe to decision) or promote (decision to new primary)"
            ),
            &["shard", "phase"]
        )),
        fenced_primary_alive: reg!(IntGaugeVec::new(
            Opts::new(
                "fenced_primary_alive",
                "1 while a fenced former primary answers as a primary (split brain outside shardgate)"
            ),
            &["shard", "server"]
        )),
        topology_epoch: reg!(IntGauge::new(
            "topology_epoch",
            "Epoch of the published topology"
        )),
        reshard_pause_ms: reg!(Histogram::with_opts(
            HistogramOpts::new(
                "reshard_cutover_pause_seconds",
                "How long statements on the moving buckets were held at a bucket move's cutover"
            )
            .buckets(BUCKETS.to_vec())
        )),
        reshard_held: reg!(IntCounter::new(
            "reshard_statements_held_total",
            "Statements that waited for a bucket move's cutover"
        )),
        reshard_moves: reg!(IntCounterVec::new(
            Opts::new("reshard_moves_total", "Bucket moves that ended, by outcome"),
            &["outcome"]
        )),
        writes_held: reg!(IntCounter::new(
            "writes_held_total",
            "Statements that waited for a shard without a reachable primary"
        )),
        cross_shard_refusals: reg!(IntCounter::new(
            "cross_shard_refusals_total",
            "Statements refused with 0A000 because they need several shards in an unsupported way"
        )),
        read_fallbacks: reg!(IntCounterVec::new(
            Opts::new(
                "read_fallbacks_total",
                "Read-only transactions sent to the primary of a shard that has replicas, by reason (read_your_writes, lag, down, none)"
            ),
            &["reason"]
        )),
        replica_bans: reg!(IntCounterVec::new(
            Opts::new(
                "server_bans_total",
                "Times a server was taken out of rotation, by reason"
            ),
            &["server", "reason"]
        )),
        replica_lag_bytes: reg!(IntGaugeVec::new(
            Opts::new(
                "replica_lag_bytes",
                "WAL bytes between the primary's insert position and the replica's replay position, at the last probe"
            ),
            &["server"]
        )),
        replica_lag_seconds: reg!(GaugeVec::new(
            Opts::new(
                "replica_lag_seconds",
                "How long ago the primary was at the replica's replay position, at the last probe"
            ),
            &["server"]
        )),
        read_retries: reg!(IntCounter::new(
            "read_retries_total",
            "Reads retried on another server after a replica failed before answering"
        )),
        registry,
    }
}

pub static GLOBAL: LazyLock<Global> = LazyLock::new(build);

/// Cached per-pool metric handles.
#[derive(Clone)]
pub struct PoolMetrics {
    pub waiting: IntGauge,
    pub checkout_timeouts: IntCounter,
    pub connects: IntCounter,
    pub connect_errors: IntCounter,
    pub transactions: IntCounter,
    pub queries: IntCounter,
    pub tx_duration: Histogram,
    pub query_duration: Histogram,
    /// Checkouts from this pool, labelled by route and server.
    pub routed: IntCounter,
}

impl PoolMetrics {
    pub fn new(pool: &str, route: &str, server: &str) -> PoolMetrics {
        let g = &*GLOBAL;
        let l = &[pool];
        PoolMetrics {
            waiting: g.waiting.with_label_values(l),
            checkout_timeouts: g.checkout_timeouts.with_label_values(l),
            connects: g.connects.with_label_values(l),
            connect_errors: g.connect_errors.with_label_values(l),
            transactions: g.transactions.with_label_values(l),
            queries: g.queries.with_label_values(&[pool, route]),
            tx_duration: g.tx_duration.with_label_values(l),
            query_duration: g.query_duration.with_label_values(l),
            routed: g.routed.with_label_values(&[route, server]),
        }
    }
}

/// Counts an ErrorResponse sent to a client.
pub fn count_error(sqlstate: &[u8]) {
    let class = std::str::from_utf8(sqlstate.get(..2).unwrap_or(b"??")).unwrap_or("??");
    GLOBAL.errors.with_label_values(&[class]).inc();
}

/// Renders every metric in the Prometheus text format.
pub fn render(proxy: &crate::proxy::Proxy) -> String {
    let g = &*GLOBAL;
    for p in proxy.pools.all() {
        let s = p.pool.status();
        let label = p.key.label();
        let spares = p.spares();
        g.server_conns
            .with_label_values(&[&label, "active"])
            .set(s.size.saturating_sub(s.available).saturating_sub(spares) as i64);
        g.server_conns
            .with_label_values(&[&label, "idle"])
            .set(s.available as i64);
        g.server_conns
            .with_label_values(&[&label, "spare"])
            .set(spares as i64);
    }
    let mut text = encode(&g.registry);
    text.push_str(&crate::hotspot::live::render(proxy));
    text
}

/// Serves /metrics and /healthz until the proxy shuts down.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    proxy: Arc<crate::proxy::Proxy>,
) -> std::io::Result<()> {
    let shutdown = proxy.shutdown.clone();
    use axum::{routing::get, Router};
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let proxy = proxy.clone();
                async move {
                    (
                        [("content-type", "text/plain; version=0.0.4")],
                        render(&proxy),
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
