//! Measures, on a real 3-node cluster with default settings (250 ms gossip,
//! checks every 2 s, fall 3, rise 2): time from an upstream's death to
//! `failing` on a node that never called it, time from its return to
//! `passing`, the size of a stats summary, and gossip bytes per second per
//! node with 20 services that receive traffic. Prints a table.
//!
//! `cargo build --release && cargo run --release --example health_gossip`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

async fn gossip_bytes_sent(admin: std::net::SocketAddr) -> f64 {
    let out = tokio::process::Command::new("curl")
        .args(["-sf", &format!("http://{admin}/metrics")])
        .output()
        .await
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("weft_gossip_bytes_total{direction=\"sent\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn health_of(socket: &std::path::Path, service: &str) -> Option<String> {
    let (_, body) = get(socket, "/v1/services").await.ok()?;
    body["services"][service][0]["health"]
        .as_str()
        .map(String::from)
}

#[tokio::main]
async fn main() {
    let mut c = TestCluster::new();
    c.interval_ms = 250;
    for _ in 0..3 {
        c.add_node();
    }
    c.wait_converged(3, Duration::from_secs(20)).await;

    // Health: an upstream on n2 with the default check; n3 never calls it.
    let up = Upstream::start(0, 200).await;
    let (status, _) = put_json(
        &c.nodes[1].socket,
        "/v1/services",
        &json!({"name": "web", "port": up.port, "check": {"http": "/"}}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let n3 = c.nodes[2].socket.clone();
    wait_for(Duration::from_secs(20), "passing", || async {
        (health_of(&n3, "web").await? == "passing").then_some(())
    })
    .await;
    let port = up.stop();
    let t = Instant::now();
    wait_for(Duration::from_secs(30), "failing", || async {
        (health_of(&n3, "web").await? == "failing").then_some(())
    })
    .await;
    let to_failing = t.elapsed();
    let _up = Upstream::start(port, 200).await;
    let t = Instant::now();
    wait_for(Duration::from_secs(30), "passing again", || async {
        (health_of(&n3, "web").await? == "passing").then_some(())
    })
    .await;
    let to_passing = t.elapsed();

    // Gossip volume: 20 services spread over the nodes, all called from n1.
    let mut upstreams = Vec::new();
    for i in 0..20 {
        let u = Upstream::start(0, 200).await;
        register_everywhere(&c, i % 3, &format!("svc-{i}"), u.port, "http").await;
        upstreams.push(u);
    }
    let load_until = Instant::now() + Duration::from_secs(25);
    let proxy = c.nodes[0].proxy;
    let load = tokio::spawn(async move {
        let mut i = 0usize;
        while Instant::now() < load_until {
            proxy_get(proxy, &format!("svc-{}", i % 20)).await;
            i += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before: Vec<f64> = futures_join(&c).await;
    let window = Duration::from_secs(15);
    tokio::time::sleep(window).await;
    let after: Vec<f64> = futures_join(&c).await;
    load.await.unwrap();

    println!("# weft health and gossip measurements (3 nodes, 250 ms gossip, default checks)");
    println!(
        "upstream death -> failing on a node that never called it: {:.2} s",
        to_failing.as_secs_f64()
    );
    println!(
        "upstream return -> passing on that node:                  {:.2} s",
        to_passing.as_secs_f64()
    );
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        println!(
            "gossip sent by n{} with 20 services under traffic: {:.0} bytes/s",
            i + 1,
            (b - a) / window.as_secs_f64()
        );
    }
}

async fn futures_join(c: &TestCluster) -> Vec<f64> {
    let mut out = Vec::new();
    for node in &c.nodes {
        out.push(gossip_bytes_sent(node.admin).await);
    }
    out
}
