//! The catalog's derivation at 10,000 instances (100 nodes of 100, in 100
//! services of one instance per node): whole, as a node does at start;
//! after one node's keys changed without touching its instances, and after
//! one more registration, as every node does on a change elsewhere; and
//! with nothing changed, as on every view at rest.
//!
//! `cargo bench -p weft-gossip --bench catalog`

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use weft_gossip::view::{CatalogDeriver, NodeKeys, NodeSnapshot};
use weft_gossip::ClusterView;

const NODES: usize = 100;
const PER_NODE: usize = 100;

fn record(service: usize, id: &str) -> String {
    serde_json::json!({"name": format!("svc{service}"), "id": id, "port": 8080 + service})
        .to_string()
}

fn node(i: usize) -> NodeSnapshot {
    let mut keys = BTreeMap::new();
    let info = serde_json::json!({
        "tunnel": format!("10.0.{}.{}:7947", i / 250, i % 250 + 1),
        "admin": "127.0.0.1:9646",
        "version": "bench",
        "status": "alive",
    });
    keys.insert("node".to_string(), info.to_string());
    for k in 0..PER_NODE {
        let id = format!("s{k}-{i}");
        keys.insert(format!("svc/{id}"), record(k, &id));
        keys.insert(format!("health/{id}"), "passing".to_string());
    }
    NodeSnapshot {
        name: format!("n{i}"),
        generation: 1,
        gossip_addr: ([127, 0, 0, 1], 7946).into(),
        live: true,
        dead: false,
        last_heard: Duration::from_millis(100),
        kv: Arc::new(NodeKeys::from(keys)),
    }
}

/// `view` with node 0's keys replaced by `change` applied to a copy.
fn changed(view: &ClusterView, change: impl FnOnce(&mut BTreeMap<String, String>)) -> ClusterView {
    let mut out = view.clone();
    let mut keys = NodeKeys::clone(&out.nodes[0].kv);
    change(&mut keys);
    out.nodes[0].kv = Arc::new(keys);
    out
}

fn derivation(c: &mut Criterion) {
    let view = ClusterView {
        self_name: "n0".into(),
        nodes: (0..NODES).map(node).collect(),
        suspect_after: Duration::from_secs(1),
    };
    // A stats key: new keys, the same instances.
    let restated = changed(&view, |keys| {
        keys.insert("stats/svc0".into(), "{}".into());
    });
    let registered = changed(&view, |keys| {
        keys.insert("svc/extra".into(), record(0, "extra"));
    });
    c.bench_function("catalog: whole, 10,000 instances", |b| {
        b.iter(|| black_box(view.catalog()))
    });
    let mut deriver = CatalogDeriver::default();
    deriver.update(&view);
    c.bench_function("catalog: nothing changed", |b| {
        b.iter(|| black_box(deriver.update(&view)))
    });
    // Each iteration is two one-node changes: there and back.
    for (name, other) in [
        ("catalog: one node's keys changed, x2", &restated),
        ("catalog: one node registered one more, x2", &registered),
    ] {
        c.bench_function(name, |b| {
            b.iter(|| {
                black_box(deriver.update(other));
                black_box(deriver.update(&view));
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = derivation
}
criterion_main!(benches);
