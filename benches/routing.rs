//! Criterion benchmarks for the per-statement routing decision (read/write
//! splitting): classification on the lexical fast path, from the cache,
//! through a full parse, and the replica pick. docs/benchmarks.md records
//! the results (`cargo bench --bench routing`).

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use shardgate::config::RoutingConfig;
use shardgate::health::Health;
use shardgate::router::catalog::{Catalog, CatalogRows, FunctionPolicy};
use shardgate::router::classify::classify;
use shardgate::router::{pick_replica, wants_replica, Candidate, TargetOverride};
use std::time::Duration;

fn catalog() -> Catalog {
    // About the size of a stock database's pg_proc (2,600 names).
    let mut functions: Vec<(String, bool)> =
        (0..2600).map(|i| (format!("f{i}"), i % 10 != 0)).collect();
    functions.extend(
        [
            "lower",
            "upper",
            "count",
            "sum",
            "now",
            "coalesce",
            "date_trunc",
        ]
        .map(|f| (f.to_owned(), true)),
    );
    Catalog::new(
        CatalogRows {
            functions,
            volatile_operators: Vec::new(),
            volatile_casts: false,
            aggregates: Vec::new(),
        },
        FunctionPolicy::default(),
    )
}

fn bench(c: &mut Criterion) {
    let cat = catalog();
    let mut g = c.benchmark_group("classify");
    g.bench_function("fast_path/pgbench_select", |b| {
        b.iter(|| {
            black_box(classify(
                black_box(b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"),
                &cat,
            ))
        })
    });
    let cached = b"SELECT lower(name), count(*) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 GROUP BY 1";
    classify(cached, &cat);
    g.bench_function("cached/join_with_functions", |b| {
        b.iter(|| black_box(classify(black_box(cached), &cat)))
    });
    g.bench_function("keyword/insert", |b| {
        b.iter(|| {
            black_box(classify(
                black_box(b"INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (1, 2, 3, 4, CURRENT_TIMESTAMP);"),
                &cat,
            ))
        })
    });
    let mut n = 0u64;
    g.bench_function("uncached_parse/join_with_functions", |b| {
        b.iter(|| {
            // A new literal each time: a cache miss and a full parse.
            n += 1;
            let sql = format!("SELECT lower(name), count(*) FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = {n} GROUP BY 1");
            black_box(classify(sql.as_bytes(), &cat))
        })
    });
    g.finish();

    let health = Health::default();
    let a = health.server(&"127.0.0.1:1".into());
    let b2 = health.server(&"127.0.0.1:2".into());
    a.set_for_tests(true, true, 1000, 0, Duration::ZERO);
    b2.set_for_tests(true, true, 1000, 0, Duration::ZERO);
    let routing = RoutingConfig::default();
    // Built once per session (per topology change), as the session does.
    let cands = [
        Candidate {
            health: a,
            weight: 1,
            same_zone: false,
        },
        Candidate {
            health: b2,
            weight: 1,
            same_zone: false,
        },
    ];
    let mut turn = 0usize;
    c.bench_function("route/fast_path_select_to_replica", |b| {
        b.iter(|| {
            let class = classify(
                black_box(b"SELECT abalance FROM pgbench_accounts WHERE aid = 48213;"),
                &cat,
            );
            let read = wants_replica(&class, TargetOverride::Auto, false);
            turn += 1;
            black_box((read, pick_replica(&cands, &routing, 500, turn, 0)))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
