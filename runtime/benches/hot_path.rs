//! The per-request and per-change pieces of the data plane, each alone:
//! `cargo bench -p weft-runtime --bench hot_path`.
//!
//! - `pick`: the power of two choices over a service's endpoints, as every
//!   request does;
//! - `service_lookup`: a service's endpoints in a snapshot of 100 services;
//! - `endpoints_build`: the typed endpoints of a 10,000-instance catalog, as
//!   the router builds them when the catalog changes;
//! - `wire`: a request head framed and parsed, as every tunnel stream does;
//! - `summary`: a peer's gossiped statistics encoded, decoded, and 50 of
//!   them merged, as the stats aggregator does every second.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use weft_gossip::{Catalog, Health, Instance, Protocol};
use weft_runtime::dataplane::endpoints::Endpoints;
use weft_runtime::policy::episodes::EpisodeStats;
use weft_runtime::policy::stats::{merge, Summary};
use weft_runtime::wire::{self, Decoded, RequestHead, StreamKind, WIRE_VERSION};

fn instance(service: usize, node: usize) -> Instance {
    Instance {
        id: format!("svc{service}-{node}"),
        node: format!("node-{node}"),
        port: 8080,
        protocol: Protocol::Http,
        health: Health::Passing,
        tags: Vec::new(),
        tunnel_addr: None,
        timeout_ms: None,
        retry: None,
        retry_non_idempotent: false,
        hedge: false,
        adaptive_concurrency: false,
    }
}

/// `services` services of `per_service` instances each.
fn catalog(services: usize, per_service: usize) -> Catalog {
    let mut c = Catalog::default();
    for s in 0..services {
        let list = (0..per_service).map(|n| Arc::new(instance(s, n))).collect();
        c.services.insert(format!("svc{s}"), list);
    }
    c
}

fn pick(c: &mut Criterion) {
    let endpoints = Endpoints::build(&catalog(100, 10), &Endpoints::default());
    let mut rng = rand::thread_rng();
    let now = Instant::now();
    c.bench_function("pick: p2c over 10 endpoints", |b| {
        b.iter(|| {
            let e = endpoints
                .pick(black_box("svc42"), Protocol::Http, None, &[], now, &mut rng)
                .expect("endpoint");
            black_box(e);
        })
    });
    let tried = [endpoints.service("svc42")[3].clone()];
    c.bench_function("pick: retry, one tried", |b| {
        b.iter(|| {
            let e = endpoints
                .pick(
                    black_box("svc42"),
                    Protocol::Http,
                    None,
                    &tried,
                    now,
                    &mut rng,
                )
                .expect("endpoint");
            black_box(e);
        })
    });
    c.bench_function("pick: start and finish one request", |b| {
        let e = endpoints.service("svc42")[0].clone();
        b.iter(|| {
            e.state.start();
            e.state.finish(Duration::from_micros(400), now);
        })
    });
}

fn service_lookup(c: &mut Criterion) {
    let endpoints = Endpoints::build(&catalog(100, 10), &Endpoints::default());
    c.bench_function("service_lookup: 1 of 100 services", |b| {
        b.iter(|| black_box(endpoints.service(black_box("svc77")).len()))
    });
}

fn endpoints_build(c: &mut Criterion) {
    let big = catalog(100, 100);
    let previous = Endpoints::build(&big, &Endpoints::default());
    c.bench_function("endpoints_build: 10,000 instances, all new", |b| {
        b.iter(|| black_box(Endpoints::build(&big, &Endpoints::default())))
    });
    // What a registration costs: one service's list is new.
    let mut changed = big.clone();
    let mut list = changed.services["svc7"].to_vec();
    list.push(Arc::new(instance(7, 100)));
    changed.services.insert("svc7".into(), list.into());
    c.bench_function(
        "endpoints_build: 10,000 instances, 1 service changed",
        |b| b.iter(|| black_box(Endpoints::build(&changed, &previous))),
    );
}

fn request_head() -> RequestHead {
    RequestHead {
        version: WIRE_VERSION,
        kind: StreamKind::Http,
        service: "web".into(),
        instance: "web-1".into(),
        method: "GET".into(),
        uri: "/api/v1/items?page=2".into(),
        headers: vec![
            ("host".into(), b"web".to_vec()),
            ("user-agent".into(), b"curl/8.5.0".to_vec()),
            ("accept".into(), b"*/*".to_vec()),
            ("x-request-id".into(), b"7f1c9a2e-5b8d-4e36-9c1f".to_vec()),
        ],
        deadline_ms: 2_500,
        attempt: 0,
        http2: false,
        end_stream: true,
    }
}

fn wire_head(c: &mut Criterion) {
    let head = request_head();
    c.bench_function("wire: encode a request head", |b| {
        b.iter(|| black_box(wire::encode(black_box(&head)).expect("encode")))
    });
    let bytes = wire::encode(&head).expect("encode");
    c.bench_function("wire: decode a request head", |b| {
        b.iter(|| match wire::decode::<RequestHead>(black_box(&bytes)) {
            Ok(Decoded::Frame { msg, .. }) => black_box(msg),
            other => panic!("not a frame: {other:?}"),
        })
    });
}

fn summary(i: u64) -> Summary {
    Summary {
        requests: 1_000 + i,
        failures: 10 + i % 7,
        retries: 3,
        rps: 100.0,
        p50_ms: Some(1.2),
        p95_ms: Some(4.5),
        p99_ms: Some(9.0 + i as f64 / 10.0),
        p999_ok_ms: Some(20.0),
        episodes: EpisodeStats {
            samples: 12,
            p50_ms: Some(280.0),
            p90_ms: Some(450.0),
            p99_ms: Some(610.0),
        },
        error_rate: 0.01,
        effective_error_rate: None,
    }
}

fn summaries(c: &mut Criterion) {
    let one = summary(0);
    c.bench_function("summary: encode", |b| {
        b.iter(|| black_box(black_box(&one).encode()))
    });
    let encoded = one.encode();
    c.bench_function("summary: decode", |b| {
        b.iter(|| black_box(Summary::decode(black_box(&encoded)).expect("valid")))
    });
    let fifty: Vec<(usize, Summary)> = (0..50).map(|i| (i, summary(i as u64))).collect();
    c.bench_function("summary: merge 50 nodes", |b| {
        b.iter(|| black_box(merge(black_box(&fifty), Some(&0))))
    });
}

criterion_group!(
    benches,
    pick,
    service_lookup,
    endpoints_build,
    wire_head,
    summaries
);
criterion_main!(benches);
