//! Who calls whom, from any node: a chain of three services on three
//! nodes, called through their own outbound ports and the shared proxy;
//! every node lists the same edges with their rates and success.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Registers `name` on `node` (with its own outbound port when `outbound`);
/// the outbound address, if any.
async fn register(
    c: &TestCluster,
    node: usize,
    name: &str,
    port: u16,
    outbound: bool,
) -> Option<SocketAddr> {
    let body = json!({"name": name, "port": port, "outbound": outbound});
    let (status, reply) = put_json(&c.nodes[node].socket, "/v1/services", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    reply["outbound"].as_str().map(|a| a.parse().unwrap())
}

/// `n` GETs of `service` through `port`; all must answer 200.
async fn calls(port: SocketAddr, service: &str, n: usize) {
    for _ in 0..n {
        let (status, _) = proxy_call(port, hyper::Method::GET, service).await;
        assert_eq!(status, 200, "{service} through {port}");
    }
}

fn edge<'a>(edges: &'a [Value], caller: &str, service: &str) -> Option<&'a Value> {
    edges
        .iter()
        .find(|e| e["caller"] == caller && e["service"] == service)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_lists_the_edges_of_a_chain() {
    let c = TestCluster::start(3).await;
    let (b_instance, c_instance) = (Upstream::start(0, 200).await, Upstream::start(0, 200).await);
    let a_out = register(&c, 0, "a", 9, true).await.expect("a's port");
    let b_out = register(&c, 1, "b", b_instance.port, true)
        .await
        .expect("b's port");
    register(&c, 2, "c", c_instance.port, false).await;
    for node in &c.nodes {
        for service in ["a", "b", "c"] {
            wait_for(
                Duration::from_secs(10),
                "the chain is in every catalog",
                || async {
                    instance_ids(&node.socket, service)
                        .await
                        .filter(|ids| !ids.is_empty())
                },
            )
            .await;
        }
    }

    calls(a_out, "b", 20).await;
    calls(b_out, "c", 10).await;
    calls(c.nodes[0].proxy, "c", 5).await;

    for node in &c.nodes {
        let edges = wait_for(
            Duration::from_secs(10),
            "every edge reaches the node",
            || async {
                let (_, body) = get(&node.socket, "/v1/edges").await.ok()?;
                let edges = body["edges"].as_array()?.clone();
                [("a", "b"), ("b", "c"), ("-", "c")]
                    .iter()
                    .all(|(from, to)| edge(&edges, from, to).is_some())
                    .then_some(edges)
            },
        )
        .await;
        assert_eq!(edges.len(), 3, "{}: {edges:?}", node.name);
        for (from, to) in [("a", "b"), ("b", "c"), ("-", "c")] {
            let e = edge(&edges, from, to).unwrap();
            assert!(e["rps"].as_f64().unwrap() > 0.0, "{e}");
            assert_eq!(e["success_rate"], 1.0, "{e}");
            assert_eq!(e["effective_success_rate"], 1.0, "{e}");
            assert!(e["p99_ms"].as_f64().is_some(), "{e}");
            assert_eq!(e["nodes"], 1, "{e}");
        }
    }

    // `weft edges b` from the node that hosts neither end.
    let out = std::process::Command::new(weft_bin())
        .args(["--socket"])
        .arg(&c.nodes[2].socket)
        .args(["edges", "b", "--json"])
        .output()
        .expect("weft edges");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pairs: Vec<(String, String)> = body["edges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["caller"].as_str().unwrap().into(),
                e["service"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(pairs, [("a".into(), "b".into()), ("b".into(), "c".into())]);
    let table = std::process::Command::new(weft_bin())
        .args(["--socket"])
        .arg(&c.nodes[0].socket)
        .arg("edges")
        .output()
        .expect("weft edges");
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.starts_with("CALLER"), "{text}");
    assert_eq!(text.lines().count(), 4, "{text}");
}
