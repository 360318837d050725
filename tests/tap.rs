//! `weft tap`, asked at one node, streams the requests made on another
//! (to an instance on a third) as they happen, filtered by service and by
//! status; a tap that ends leaves no listener behind on any node.

mod common;

use std::io::BufReader;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// A running `weft tap --json` and the lines it printed so far.
struct Tap {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl Tap {
    fn start(socket: &std::path::Path, args: &[&str]) -> Tap {
        let mut child = Command::new(weft_bin())
            .arg("--socket")
            .arg(socket)
            .arg("tap")
            .args(args)
            .arg("--json")
            .stdout(Stdio::piped())
            .spawn()
            .expect("weft tap");
        let lines = json_lines(BufReader::new(child.stdout.take().unwrap()));
        Tap { child, lines }
    }

    /// Waits until every node in `nodes` listens.
    async fn wait_listening(&self, nodes: &[&str]) {
        wait_for(Duration::from_secs(10), "every node listens", || async {
            let lines = self.lines.lock().unwrap();
            let listening = |n: &&str| {
                lines
                    .iter()
                    .any(|l| l["listening"] == true && l["node"] == *n)
            };
            nodes.iter().all(listening).then_some(())
        })
        .await;
    }

    /// The request lines, once there are `n`.
    async fn requests(&self, n: usize) -> Vec<Value> {
        wait_for(
            Duration::from_secs(10),
            &format!("{n} request lines"),
            || async {
                let lines: Vec<Value> = self
                    .lines
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|l| l.get("status").is_some())
                    .cloned()
                    .collect();
                (lines.len() >= n).then_some(lines)
            },
        )
        .await
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tap_at_one_node_sees_requests_made_at_another() {
    let c = TestCluster::start(3).await;
    let (ok, failing) = (Upstream::start(0, 200).await, Upstream::start(0, 500).await);
    for (name, port) in [("api", ok.port), ("broken", failing.port)] {
        let body = json!({"name": name, "port": port});
        let (status, reply) = put_json(&c.nodes[2].socket, "/v1/services", &body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        wait_for(Duration::from_secs(10), "n2 knows the service", || async {
            instance_ids(&c.nodes[1].socket, name)
                .await
                .filter(|ids| !ids.is_empty())
        })
        .await;
    }
    let api = Tap::start(&c.nodes[0].socket, &["api"]);
    let errors = Tap::start(&c.nodes[0].socket, &["--status", "5xx"]);
    api.wait_listening(&["n1", "n2", "n3"]).await;
    errors.wait_listening(&["n1", "n2", "n3"]).await;

    for _ in 0..5 {
        assert_eq!(proxy_get(c.nodes[1].proxy, "api").await, 200);
    }
    for _ in 0..3 {
        assert_eq!(proxy_get(c.nodes[1].proxy, "broken").await, 500);
    }

    let seen = api.requests(5).await;
    for line in &seen {
        assert_eq!(line["service"], "api", "{line}");
        assert_eq!(line["seen_by"], "n2", "made on n2: {line}");
        assert_eq!(line["node"], "n3", "served on n3: {line}");
        assert_eq!(line["caller"], "-", "{line}");
        assert_eq!(
            (line["method"].as_str(), line["path"].as_str()),
            (Some("GET"), Some("/"))
        );
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["attempts"], 1, "{line}");
        assert!(line["duration_ms"].as_f64().is_some(), "{line}");
    }
    let failed = errors.requests(3).await;
    assert!(
        failed
            .iter()
            .all(|l| l["service"] == "broken" && l["status"] == 500),
        "only the 5xx: {failed:#?}"
    );
    assert_eq!(api.requests(0).await.len(), 5, "no 500 of another service");

    // The local path: a request made on n3, served by n3's own instance.
    assert_eq!(proxy_get(c.nodes[2].proxy, "api").await, 200);
    let seen = api.requests(6).await;
    let local = &seen[5];
    assert_eq!(
        (local["seen_by"].as_str(), local["node"].as_str()),
        (Some("n3"), Some("n3")),
        "{local}"
    );

    // n2 restarts: the tap picks it up again and sees its requests.
    let mut c = c;
    c.restart(1);
    c.wait_converged(3, Duration::from_secs(20)).await;
    wait_for(
        Duration::from_secs(20),
        "the tap sees n2's requests again",
        || async {
            if proxy_get(c.nodes[1].proxy, "api").await != 200 {
                return None;
            }
            (api.requests(0).await.len() > 6).then_some(())
        },
    )
    .await;

    // Off once nobody listens: no listener left on any node.
    drop((api, errors));
    for node in &c.nodes {
        wait_for(
            Duration::from_secs(10),
            "the taps end everywhere",
            || async {
                let text = metrics_text(node.admin).await;
                (metric_sum(&text, "weft_tap_listeners", &[]) == 0.0).then_some(())
            },
        )
        .await;
    }

    // A bad filter is a clear error, not a stream.
    let out = Command::new(weft_bin())
        .arg("--socket")
        .arg(&c.nodes[0].socket)
        .args(["tap", "--status", "6xx"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--status"),
        "{out:?}"
    );
}
