//! Measures, on real local clusters: registration propagation to every node
//! (3 and 10 nodes, 20 trials each), kill -9 to "dead" on every survivor, and
//! the idle RSS of one node. Prints a table.
//!
//! `cargo build --release && cargo run --release --example propagation`

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

fn pct(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn propagation(n: usize, trials: usize, interval_ms: u64) -> (Vec<f64>, Vec<f64>, f64) {
    let mut c = TestCluster::new();
    c.interval_ms = interval_ms;
    for _ in 0..n {
        c.add_node();
    }
    c.wait_converged(n, Duration::from_secs(30)).await;
    let mut reg = Vec::new();
    for t in 0..trials {
        let src = &c.nodes[t % n].socket;
        let start = Instant::now();
        put_json(
            src,
            "/v1/services",
            &json!({"name": "probe", "id": format!("p{t}"), "port": 10_000 + t}),
        )
        .await
        .unwrap();
        for node in &c.nodes {
            let want = format!("p{t}");
            wait_for(Duration::from_secs(10), "propagation", || async {
                instance_ids(&node.socket, "probe")
                    .await?
                    .contains(&want)
                    .then_some(())
            })
            .await;
        }
        reg.push(start.elapsed().as_secs_f64() * 1e3);
    }
    reg.sort_by(f64::total_cmp);
    // Idle RSS of node 1 (after the trials).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = c.nodes[0].pid().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    // kill -9 the last node; time until every survivor reports it dead.
    let victim = n - 1;
    let name = c.nodes[victim].name.clone();
    let start = Instant::now();
    c.kill9(victim);
    let mut dead = Vec::new();
    for node in &c.nodes[..victim] {
        wait_for(Duration::from_secs(30), "dead", || async {
            (member_state(&node.socket, &name).await? == "dead").then_some(())
        })
        .await;
        dead.push(start.elapsed().as_secs_f64() * 1e3);
    }
    dead.sort_by(f64::total_cmp);
    (reg, dead, rss_kb / 1024.0)
}

#[tokio::main]
async fn main() {
    let interval: u64 = std::env::var("INTERVAL_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    println!(
        "# weft gossip measurements, gossip interval {interval} ms, binary {}",
        weft_bin().display()
    );
    println!(
        "{:<6} {:>6} | {:>9} {:>9} {:>9} | {:>14} {:>14} | {:>12}",
        "nodes",
        "trials",
        "reg p50ms",
        "reg p99ms",
        "reg max",
        "dead (first)ms",
        "dead (all)ms",
        "idle RSS MB"
    );
    for n in [3usize, 10] {
        let (reg, dead, rss) = propagation(n, 20, interval).await;
        println!(
            "{:<6} {:>6} | {:>9.0} {:>9.0} {:>9.0} | {:>14.0} {:>14.0} | {:>12.1}",
            n,
            reg.len(),
            pct(&reg, 0.5),
            pct(&reg, 0.99),
            reg.last().unwrap(),
            dead.first().unwrap(),
            dead.last().unwrap(),
            rss
        );
    }
}
