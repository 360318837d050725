//! Canaries that drive themselves: `weft rollout api --to v2`, signed by an
//! operator, moves api's traffic to v2 step by step while three real nodes
//! measure v2 against v1, on the local and the remote path. A good canary
//! is promoted to 100% even though a node dies mid-rollout, and every
//! surviving node agrees on it; one that fails 20% of its requests is
//! rolled back at its first step, having seen no more than that step's
//! share of the requests.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// Requests sent at the proxies of some nodes until stopped, a few at a
/// time on each, counting the answers that were not 200.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(c: &TestCluster, nodes: &[usize]) -> Load {
        let (stop, sent, failed) = (Arc::default(), Arc::default(), Arc::default());
        let mut tasks = Vec::new();
        for &node in nodes {
            for _ in 0..2 {
                let proxy = c.nodes[node].proxy;
                let (stop, sent, failed): (Arc<AtomicBool>, Arc<AtomicU64>, Arc<AtomicU64>) =
                    (Arc::clone(&stop), Arc::clone(&sent), Arc::clone(&failed));
                tasks.push(tokio::spawn(async move {
                    let client = pooled_client();
                    while !stop.load(Ordering::Relaxed) {
                        let ok = matches!(pooled_get(&client, proxy, "api").await, Ok((200, _)));
                        sent.fetch_add(1, Ordering::Relaxed);
                        failed.fetch_add(u64::from(!ok), Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }));
            }
        }
        Load {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    /// Stops it; returns (sent, not 200).
    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        (
            self.sent.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

/// Waits until `node` sees `n` passing instances of api.
async fn sees_instances(c: &TestCluster, node: usize, n: usize) {
    wait_for(
        Duration::from_secs(15),
        "every api instance passing",
        || async {
            let (_, body) = get(&c.nodes[node].socket, "/v1/services").await.ok()?;
            let passing = body["services"]["api"]
                .as_array()?
                .iter()
                .filter(|i| i["health"] == "passing")
                .count();
            (passing == n).then_some(())
        },
    )
    .await;
}

/// api's rollout as `node` shows it in `/v1/health`.
async fn rollout_at(c: &TestCluster, node: usize) -> Option<Value> {
    let (_, health) = get(&c.nodes[node].socket, "/v1/health").await.ok()?;
    health["rollouts"]
        .as_array()?
        .iter()
        .find(|r| r["service"] == "api")
        .cloned()
}

/// Waits until `node` shows api's rollout in `phase`, noting every canary
/// weight it shows on the way.
async fn until_phase(c: &TestCluster, node: usize, phase: &str, within: Duration) -> Vec<u64> {
    let mut weights: Vec<u64> = Vec::new();
    let deadline = Instant::now() + within;
    loop {
        if let Some(r) = rollout_at(c, node).await {
            let weight = r["weight"].as_u64().unwrap();
            if weights.last() != Some(&weight) {
                eprintln!("n{}: {weight}% {}: {}", node + 1, r["phase"], r["why"]);
                weights.push(weight);
            }
            if r["phase"] == phase {
                return weights;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {phase} within {within:?}: {weights:?}, {:?}",
            rollout_at(c, node).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `n` requests through n1 and n3; returns how many got 200.
async fn burst(c: &TestCluster, n: usize) -> usize {
    let client = pooled_client();
    let mut ok = 0;
    for i in 0..n {
        let proxy = c.nodes[if i % 2 == 0 { 0 } else { 2 }].proxy;
        ok += usize::from(matches!(
            pooled_get(&client, proxy, "api").await,
            Ok((200, _))
        ));
    }
    ok
}

/// v1 on n1 and n2, v2 (behaving as `canary`) on n1 and n3: each tag is
/// local to some callers and remote to others. A route sends everything
/// to v1, as before any release.
async fn cluster_with(canary: Behavior) -> (TestCluster, Vec<Upstream>, Vec<Upstream>) {
    let c = TestCluster::start(3).await;
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for node in [0, 1] {
        let up = Upstream::start(0, 200).await;
        register_tagged_api(&c, node, "v1", up.port).await;
        v1.push(up);
    }
    for node in [0, 2] {
        let up = Upstream::with(0, canary).await;
        register_tagged_api(&c, node, "v2", up.port).await;
        v2.push(up);
    }
    weft_at(&c, 0, &["route", "api", "v1=1"], true).expect("route");
    for node in 0..3 {
        sees_instances(&c, node, 4).await;
        wait_for(Duration::from_secs(10), "the route everywhere", || async {
            let (_, body) = get(&c.nodes[node].socket, "/v1/routes").await.ok()?;
            (body["routes"]["version"] == 1).then_some(())
        })
        .await;
    }
    (c, v1, v2)
}

fn hits(instances: &[Upstream]) -> u64 {
    instances.iter().map(Upstream::hits).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_good_canary_is_promoted_though_a_node_leaves_mid_rollout() {
    let (mut c, v1, v2) = cluster_with(Behavior::Fixed(200, Duration::ZERO)).await;
    let load = Load::start(&c, &[0, 2]);
    let args = [
        "rollout",
        "api",
        "--to",
        "v2",
        "--steps",
        "5,25,50,100",
        "--interval",
        "2s",
        "--max-p99",
        "3x",
    ];
    assert!(weft_at(&c, 0, &args, false).is_err(), "unsigned");
    let said = weft_at(&c, 0, &args, true).expect("rollout");
    assert!(said.contains("from v1 to v2"), "{said}");

    // n2 dies once the canary has 25%; n1 and n3 carry the rollout on.
    let started = Instant::now();
    let early = until_phase(&c, 0, "stepping", Duration::from_secs(10)).await;
    wait_for(Duration::from_secs(30), "the rollout at 25%", || async {
        let r = rollout_at(&c, 0).await?;
        (r["weight"] == 25).then_some(())
    })
    .await;
    c.kill9(1);
    let weights = until_phase(&c, 0, "promoted", Duration::from_secs(60)).await;
    eprintln!(
        "promoted in {:?}; n1 saw {early:?} then {weights:?}",
        started.elapsed()
    );
    assert!(
        weights.windows(2).all(|w| w[0] < w[1]) && weights.last() == Some(&100),
        "{weights:?}"
    );
    let (sent, failed) = load.stop().await;
    eprintln!("{sent} requests during the rollout, {failed} not 200 (n2's death)");

    // Every surviving node comes to hold the same outcome: nothing forked.
    // (Two nodes that promote in the same round differ in the instant
    // until gossip brings each the other's, and both keep the earlier.)
    let agreed = wait_for(Duration::from_secs(10), "n1 and n3 agree", || async {
        let (n1, n3) = (rollout_at(&c, 0).await?, rollout_at(&c, 2).await?);
        let same = |f: &str| n1[f] == n3[f];
        (same("phase") && same("step") && same("since_ms")).then_some(n3)
    })
    .await;
    assert_eq!(agreed["phase"], "promoted");
    let status = weft_at(&c, 2, &["rollout", "status"], false).expect("status");
    assert!(
        status.contains("promoted") && status.contains("v1 -> v2"),
        "{status}"
    );

    // v2 takes everything now.
    let before = (hits(&v1), hits(&v2));
    assert_eq!(burst(&c, 200).await, 200);
    assert_eq!(hits(&v1), before.0, "no request reached v1");
    assert_eq!(hits(&v2) - before.1, 200);

    // Clearing the rollout gives api back to its route (none: any tag).
    weft_at(&c, 0, &["rollout", "api", "--clear"], true).expect("clear");
    wait_for(Duration::from_secs(10), "the rollout cleared", || async {
        rollout_at(&c, 2).await.is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_failing_a_fifth_of_its_requests_is_rolled_back_at_its_first_step() {
    let canary = Behavior::FailEvery {
        every: 5,
        status: 500,
    };
    let (c, v1, v2) = cluster_with(canary).await;
    let load = Load::start(&c, &[0, 1, 2]);
    let started = Instant::now();
    weft_at(
        &c,
        1,
        &["rollout", "api", "--to", "v2", "--interval", "5s"],
        true,
    )
    .expect("rollout");
    let weights = until_phase(&c, 0, "rolled_back", Duration::from_secs(30)).await;
    let took = started.elapsed();
    let (sent, failed) = load.stop().await;
    let (v1_hits, v2_hits) = (hits(&v1), hits(&v2));
    let share = v2_hits as f64 / (v1_hits + v2_hits) as f64;
    let r = rollout_at(&c, 0).await.unwrap();
    eprintln!(
        "rolled back after {took:?}: {}; {sent} requests, {failed} not 200; v2 saw {v2_hits} ({:.2}%)",
        r["why"],
        share * 100.0
    );
    assert_eq!(weights.last(), Some(&0), "{weights:?}");
    assert!(
        weights.iter().all(|w| *w <= 5),
        "never past 5%: {weights:?}"
    );
    assert_eq!(
        (r["step"].as_u64(), r["weight"].as_u64()),
        (Some(1), Some(0))
    );
    assert!(r["why"].as_str().unwrap().contains("error rate"), "{r}");
    assert!(took < Duration::from_secs(5), "within one interval");
    // The first step's 5%, give or take the noise of ~1000 requests.
    assert!(
        share <= 0.07,
        "v2 saw {:.2}% of the requests",
        share * 100.0
    );
    for node in [1, 2] {
        until_phase(&c, node, "rolled_back", Duration::from_secs(10)).await;
    }

    // v1 takes everything again.
    let before = hits(&v2);
    assert_eq!(burst(&c, 200).await, 200);
    assert_eq!(hits(&v2), before, "no request reached v2");
}
