//! A rolling upgrade: a cluster of the previous release (the commit in
//! `compat/previous-release`, built once by `compat/build-previous.sh`)
//! under steady load has its nodes replaced one at a time by this build.
//! Old and new nodes gossip and carry each other's requests throughout:
//! no request fails and the membership is whole after every step.

mod common;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::json;

/// The previous release's binary, built on first use.
fn previous_release() -> PathBuf {
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../compat/build-previous.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("run compat/build-previous.sh");
    assert!(
        out.status.success(),
        "building the previous release failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// Sends GETs for `api` through the proxies of the nodes marked in
/// service, in turn, until told to stop; every status it got.
fn steady_load(
    proxies: Vec<std::net::SocketAddr>,
    serving: Arc<Vec<AtomicBool>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<(usize, u16)>> {
    tokio::spawn(async move {
        let mut answers = Vec::new();
        let mut next = 0;
        while !stop.load(Ordering::Relaxed) {
            next = (next + 1) % proxies.len();
            if !serving[next].load(Ordering::Relaxed) {
                continue;
            }
            answers.push((next, proxy_get(proxies[next], "api").await));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        answers
    })
}

/// Waits until node `i` sees an `api` instance on every node.
async fn sees_every_instance(c: &TestCluster, i: usize) {
    wait_for(
        Duration::from_secs(20),
        &format!("n{} sees api on every node", i + 1),
        || async {
            let (_, body) = get(&c.nodes[i].socket, "/v1/services").await.ok()?;
            let nodes: Vec<&str> = body["services"]["api"]
                .as_array()?
                .iter()
                .filter(|inst| inst["health"] == "passing")
                .filter_map(|inst| inst["node"].as_str())
                .collect();
            (nodes.len() == c.nodes.len()).then_some(())
        },
    )
    .await;
}

/// With n1 new and n2, n3 old: a tap at n1 listens on n1 and says that
/// the old nodes (tunnel weft/1) have no tap, without sending them a
/// stream they could not read.
async fn tap_needs_the_new_tunnel_version(c: &TestCluster) {
    use http_body_util::BodyExt;
    let (status, mut body) = weft_client::stream(&c.nodes[0].socket, "/v1/tap")
        .await
        .unwrap();
    assert_eq!(status, 200);
    // The nodes' own lines (request lines of the load come too).
    let mut text = String::new();
    let about_nodes = |text: &str| -> Vec<serde_json::Value> {
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l.get("status").is_none())
            .collect()
    };
    while about_nodes(&text).len() < 3 {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("tap lines within 10 s")
            .expect("the tap goes on")
            .unwrap();
        text.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap()));
    }
    for line in &about_nodes(&text) {
        match line["node"].as_str() {
            Some("n1") => assert_eq!(line["listening"], true, "{line}"),
            _ => {
                let error = line["error"].as_str().unwrap_or_default();
                assert!(error.contains("weft/1"), "an old node: {line}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_replaced_one_at_a_time_by_this_build_lose_no_request() {
    let old = previous_release();
    let new = weft_bin();
    let mut c = TestCluster::new();
    c.bin = old.clone();
    for _ in 0..3 {
        c.add_node();
    }
    c.wait_converged(3, Duration::from_secs(30)).await;
    let mut instances = Vec::new();
    for i in 0..3 {
        let instance = Upstream::start(0, 200).await;
        let body = json!({"name": "api", "port": instance.port});
        let (status, reply) = put_json(&c.nodes[i].socket, "/v1/services", &body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        instances.push(instance);
    }
    for i in 0..3 {
        sees_every_instance(&c, i).await;
    }

    let serving = Arc::new((0..3).map(|_| AtomicBool::new(true)).collect::<Vec<_>>());
    let stop = Arc::new(AtomicBool::new(false));
    let proxies = c.nodes.iter().map(|n| n.proxy).collect();
    let load = steady_load(proxies, serving.clone(), stop.clone());
    for i in 0..3 {
        // Its own apps stop using it while it restarts (their host's node is
        // the one being upgraded); every other node keeps calling it.
        serving[i].store(false, Ordering::Relaxed);
        c.replace(i, &new);
        c.wait_converged(3, Duration::from_secs(30)).await;
        for j in 0..3 {
            sees_every_instance(&c, j).await;
        }
        serving[i].store(true, Ordering::Relaxed);
        if i == 0 {
            tap_needs_the_new_tunnel_version(&c).await;
        }
        // Some requests through every node, old and new, before the next.
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let answers = load.await.unwrap();
    let failed: Vec<&(usize, u16)> = answers.iter().filter(|(_, s)| *s != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the upgrade: {failed:?}\n{}",
        failed.len(),
        answers.len(),
        c.logs()
    );
    assert!(answers.len() > 100, "only {} requests", answers.len());
    eprintln!("{} requests through the upgrade, all 200", answers.len());
    for (i, instance) in instances.iter().enumerate() {
        assert!(
            instance.hits() > 0,
            "the instance on n{} was never called",
            i + 1
        );
    }
    // Every node now runs this build.
    for node in &c.nodes {
        assert_eq!(node.bin, new);
    }
}
