//! Criterion benchmarks for per-message work on the data path:
//! framing a client message, parsing a Bind, and the SQL splitter that runs
//! when a server reports a SET.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use shardgate::protocol::frame::decode_frame;
use shardgate::protocol::frontend as fe;

fn bench(c: &mut Criterion) {
    let mut wire = BytesMut::new();
    fe::build_query("SELECT abalance FROM pgbench_accounts WHERE aid = 48213;").encode(&mut wire);
    let wire = wire.freeze();
    c.bench_function("decode_frame/simple_query", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&wire[..]);
            black_box(decode_frame(&mut buf, 1 << 20).unwrap())
        })
    });
    let bind = fe::build_bind(b"", "P_1", b"\0\0\0\x01\0\0\0\x0548213\0\0");
    c.bench_function("parse_bind+rename", |b| {
        b.iter(|| {
            let p = fe::parse_bind(black_box(&bind.body)).unwrap();
            black_box(fe::build_bind(p.portal, "sg_17", p.rest))
        })
    });
    c.bench_function("split_statements/3", |b| {
        b.iter(|| {
            black_box(shardgate::sql::split_statements(black_box(
                "SET a = 1; SELECT 'x;y'; RESET b",
            )))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
