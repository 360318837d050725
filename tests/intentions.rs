//! Intentions end to end: an operator's deny reaches every node by gossip,
//! holds on the caller's node and again on the serving node, names the rule
//! that matched, and survives a full restart of the cluster.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

async fn version(c: &TestCluster, node: usize) -> Option<u64> {
    let (_, body) = get(&c.nodes[node].socket, "/v1/intentions").await.ok()?;
    body["intentions"]["version"].as_u64()
}

/// A GET of payments through `port`: status, weft-error, body.
async fn pay(port: SocketAddr) -> (u16, Option<String>, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-D", "-", "-H", "Host: payments"])
        .arg(format!("http://{port}/"))
        .output()
        .await
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let error = text
        .lines()
        .find_map(|l| l.strip_prefix("weft-error: "))
        .map(|v| v.trim().to_string());
    (status, error, text)
}

/// n1 (by its own certificate) forwards checkout's call to payments on n2
/// straight over the tunnel: the mesh error n2 answers with, on its own.
async fn forwarded_as_n1(c: &TestCluster, instance: &str) -> Option<String> {
    let (cert, key) = ca_signed(&c.cluster_dir, &["n1.node.weft"], "n1");
    forward_as(c, 1, (&cert, &key), ("payments", instance), "checkout")
        .await
        .expect("n2 answers")
        .error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deny_reaches_every_node_holds_on_both_ends_and_survives_a_restart() {
    let mut c = TestCluster::start(3).await;
    let payments = Upstream::start(0, 200).await;
    let (status, reply) = put_json(
        &c.nodes[0].socket,
        "/v1/services",
        &json!({"name": "checkout", "port": 9, "outbound": true}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{reply}");
    let checkout: SocketAddr = reply["outbound"].as_str().unwrap().parse().unwrap();
    let instance = register_everywhere(&c, 1, "payments", payments.port, "http").await;
    wait_for(Duration::from_secs(10), "n2 sees checkout", || async {
        instance_ids(&c.nodes[1].socket, "checkout")
            .await
            .filter(|ids| !ids.is_empty())
    })
    .await;
    assert_eq!(pay(checkout).await.0, 200);
    assert_eq!(forwarded_as_n1(&c, &instance).await, None);

    // No operator, no change: the CLI needs the certificate, and the node
    // refuses a version without a grant.
    assert!(weft_at(
        &c,
        2,
        &["intentions", "deny", "checkout", "payments"],
        false
    )
    .is_err());
    let ungranted = json!({"intentions": {"version": 1, "default": "allow",
        "rules": [{"source": "checkout", "destination": "payments", "action": "deny"}]}});
    let (status, body) = put_json(&c.nodes[2].socket, "/v1/intentions", &ungranted)
        .await
        .unwrap();
    assert_eq!(status, 403, "{body}");

    // The operator denies checkout -> payments at n3; every node holds it,
    // and calls the new policy still allows (the shared proxy's, on two
    // nodes) go on answering 200 throughout the change.
    let allowed = [c.nodes[0].proxy, c.nodes[2].proxy];
    let steady = tokio::spawn(async move {
        let mut answers = Vec::new();
        for _ in 0..40 {
            for proxy in allowed {
                answers.push(pay(proxy).await.0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        answers
    });
    let started = Instant::now();
    weft_at(&c, 2, &["intentions", "deny", "checkout", "payments"], true).expect("deny");
    for node in 0..3 {
        wait_for(Duration::from_secs(10), "version 1 everywhere", || async {
            (version(&c, node).await == Some(1)).then_some(())
        })
        .await;
    }
    eprintln!(
        "intentions version 1 on 3 nodes {:?} after the command",
        started.elapsed()
    );
    let answers = steady.await.unwrap();
    assert!(
        answers.iter().all(|s| *s == 200),
        "an allowed call failed during the change: {answers:?}"
    );

    // The caller's node refuses, naming the rule; the instance sees nothing.
    let hits = payments.hits();
    let (status, error, text) = pay(checkout).await;
    assert_eq!(
        (status, error.as_deref()),
        (403, Some("forbidden")),
        "{text}"
    );
    assert!(text.contains("rule checkout -> payments: deny"), "{text}");
    assert_eq!(payments.hits(), hits);
    let metrics = metrics_text(c.nodes[0].admin).await;
    let denied = ["service=\"payments\"", "caller=\"checkout\""];
    assert_eq!(
        metric_sum(&metrics, "weft_requests_denied_total", &denied),
        1.0
    );
    // The denied call fails its edge, seen from any node; payments itself
    // is not blamed.
    let edge = wait_for(
        Duration::from_secs(10),
        "n3 sees the denied edge",
        || async {
            let (_, body) = get(&c.nodes[2].socket, "/v1/edges").await.ok()?;
            let edge = body["edges"]
                .as_array()?
                .iter()
                .find(|e| e["caller"] == "checkout" && e["service"] == "payments")?
                .clone();
            (edge["success_rate"].as_f64()? < 1.0).then_some(edge)
        },
    )
    .await;
    assert_eq!(
        edge["success_rate"], 0.5,
        "one call went through, one was denied: {edge}"
    );
    let (_, health) = get(&c.nodes[0].socket, "/v1/health").await.unwrap();
    assert_eq!(
        health["services"]["payments"]["local"]["success_rate"], 1.0,
        "n1's attempts to payments all succeeded: {health}"
    );
    // The serving node refuses on its own too.
    assert_eq!(
        forwarded_as_n1(&c, &instance).await.as_deref(),
        Some("forbidden")
    );
    // Others still call: the shared proxy's anonymous caller.
    assert_eq!(pay(c.nodes[0].proxy).await.0, 200);
    let check = weft_at(
        &c,
        1,
        &["intentions", "check", "checkout", "payments"],
        false,
    )
    .unwrap();
    assert!(
        check.contains("deny by rule checkout -> payments: deny"),
        "{check}"
    );
    let check = weft_at(&c, 1, &["intentions", "check", "-", "payments"], false).unwrap();
    assert!(check.contains("allow by the cluster default"), "{check}");

    // A full restart: every node comes back with version 1 from its disk,
    // and checkout's port with it.
    for node in 0..3 {
        c.kill9(node);
    }
    for node in 0..3 {
        c.restart(node);
    }
    c.wait_converged(3, Duration::from_secs(30)).await;
    for node in 0..3 {
        assert_eq!(version(&c, node).await, Some(1), "n{}", node + 1);
    }
    let (status, error, _) = wait_for(
        Duration::from_secs(10),
        "checkout's port is back",
        || async {
            let answer = pay(checkout).await;
            (answer.0 != 0).then_some(answer)
        },
    )
    .await;
    assert_eq!((status, error.as_deref()), (403, Some("forbidden")));

    // Removing the rule lets the call through again.
    weft_at(
        &c,
        0,
        &["intentions", "remove", "checkout", "payments"],
        true,
    )
    .expect("remove");
    wait_for(
        Duration::from_secs(10),
        "the call goes through again",
        || async { (pay(checkout).await.0 == 200).then_some(()) },
    )
    .await;
    let listed: Value =
        serde_json::from_str(&weft_at(&c, 1, &["intentions", "list", "--json"], false).unwrap())
            .unwrap();
    assert_eq!(listed["intentions"]["version"], 2, "{listed}");
}
