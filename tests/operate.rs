//! Operating a node: a graceful drain on SIGTERM, SIGHUP that never stops
//! it, readable and JSON logs, the access log, and every client command run
//! against live nodes.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// `weft` with `args` against node `socket`; (exit code, stdout, stderr).
fn weft_cli(socket: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(weft_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run weft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_requests_before_leaving() {
    let mut c = TestCluster::start(2).await;
    let slow = Upstream::start_slow(0, 200, Duration::from_millis(1500)).await;
    register_everywhere(&c, 0, "slow", slow.port, "http").await;
    // Requests in flight on both paths to the node that will drain: from
    // n2 across the tunnel, and from an app on n1's own host.
    let mut calls = Vec::new();
    for i in 0..16 {
        let proxy = c.nodes[if i % 2 == 0 { 1 } else { 0 }].proxy;
        calls.push(tokio::spawn(async move { proxy_get(proxy, "slow").await }));
    }
    wait_for(
        Duration::from_secs(10),
        "all 16 requests reached the instance",
        || {
            let hits = slow.hits.clone();
            async move { (hits.load(Ordering::Relaxed) == 16).then_some(()) }
        },
    )
    .await;
    c.signal(0, libc::SIGTERM);
    // Peers see it draining while the requests finish.
    let n2 = c.nodes[1].socket.clone();
    wait_for(Duration::from_secs(5), "n2 sees n1 draining", || {
        let n2 = n2.clone();
        async move { (member_state(&n2, "n1").await? == "draining").then_some(()) }
    })
    .await;
    for call in calls {
        assert_eq!(
            call.await.unwrap(),
            200,
            "a request in flight during SIGTERM failed"
        );
    }
    let status = c.wait_exit(0, Duration::from_secs(20));
    assert!(status.success(), "n1 exited with {status:?}");
    wait_for(Duration::from_secs(5), "n2 sees n1 left", || {
        let n2 = n2.clone();
        async move { (member_state(&n2, "n1").await? == "left").then_some(()) }
    })
    .await;
}
