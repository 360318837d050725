//! Two zones of three nodes, each with one bridge: a service only zone B
//! runs is called from zone A through both bridges, and zone A learns how
//! long its outages last from zone B's statistics.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;

/// A node of `zone`; a bridge gets `bridge` as its --bridge address and
/// seeds the pool between zones at `bridge_seed`.
fn zone_node(
    c: &mut TestCluster,
    zone: &str,
    seed: Option<SocketAddr>,
    bridge: Option<(SocketAddr, Option<SocketAddr>)>,
) -> usize {
    let mut extra = vec!["--zone".to_string(), zone.to_string()];
    if let Some(seed) = seed {
        extra.extend(["--seeds".to_string(), seed.to_string()]);
    }
    if let Some((listen, seed)) = bridge {
        extra.extend(["--bridge".to_string(), listen.to_string()]);
        if let Some(seed) = seed {
            extra.extend(["--bridge-seeds".to_string(), seed.to_string()]);
        }
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    c.add_node_with(&extra)
}

/// The alive members node `i` lists, by name.
async fn alive(c: &TestCluster, i: usize) -> Option<Vec<String>> {
    let (_, body) = get(&c.nodes[i].socket, "/v1/members").await.ok()?;
    let mut names: Vec<String> = body["members"]
        .as_array()?
        .iter()
        .filter(|m| m["state"] == "alive")
        .filter_map(|m| m["name"].as_str().map(String::from))
        .collect();
    names.sort();
    Some(names)
}

async fn wait_members(c: &TestCluster, i: usize, expected: &[&str]) {
    let what = format!("{} lists {expected:?} alive", c.nodes[i].name);
    wait_for(Duration::from_secs(20), &what, || async {
        (alive(c, i).await? == expected).then_some(())
    })
    .await;
}

/// Node `i`'s learned retry delay of `service` and the outage samples
/// behind it, from `GET /v1/health`.
async fn learned_delay(c: &TestCluster, i: usize, service: &str) -> Option<(f64, u64)> {
    let (_, body) = get(&c.nodes[i].socket, "/v1/health").await.ok()?;
    let s = &body["services"][service];
    Some((s["retry_delay_ms"].as_f64()?, s["outage_samples"].as_u64()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zone_a_calls_a_service_of_zone_b_through_the_bridges_and_learns_its_outages() {
    let mut c = TestCluster::new();
    let (bridge_a, bridge_b): (SocketAddr, SocketAddr) = (
        ([127, 0, 0, 1], free_port()).into(),
        ([127, 0, 0, 1], free_port()).into(),
    );
    // Zone a: n1 (bridge), n2, n3. Zone b: n4 (bridge), n5, n6.
    zone_node(&mut c, "a", None, Some((bridge_a, None)));
    zone_node(&mut c, "a", None, None);
    zone_node(&mut c, "a", None, None);
    let b_seed = c.nodes.len();
    zone_node(&mut c, "b", None, Some((bridge_b, Some(bridge_a))));
    let seed = Some(c.nodes[b_seed].gossip);
    zone_node(&mut c, "b", seed, None);
    zone_node(&mut c, "b", seed, None);

    // Each zone's nodes see their zone; a bridge also sees the other's.
    wait_members(&c, 1, &["n1", "n2", "n3"]).await;
    wait_members(&c, 4, &["n4", "n5", "n6"]).await;
    wait_members(&c, 0, &["n1", "n2", "n3", "n4"]).await;
    wait_members(&c, 3, &["n1", "n4", "n5", "n6"]).await;
    let table = weft_at(&c, 0, &["members"], false).expect("weft members");
    let n4 = table
        .lines()
        .find(|l| l.starts_with("n4"))
        .unwrap_or_default();
    assert!(n4.ends_with("b (bridge)"), "{table}");

    // echo runs in zone b only, down 300 ms of every second.
    let epoch = Instant::now();
    let flap = Behavior::Flap {
        down: Duration::from_millis(300),
        period: Duration::from_secs(1),
        epoch,
    };
    let upstream = Upstream::with(free_port(), flap).await;
    let (status, body) = put_json(
        &c.nodes[5].socket,
        "/v1/services",
        &serde_json::json!({"name": "echo", "port": upstream.port}),
    )
    .await
    .expect("register");
    assert_eq!(status, 200, "{body}");

    // Zone a lists echo as reachable through its bridge.
    wait_for(
        Duration::from_secs(20),
        "n2 lists a gateway to zone b",
        || async {
            let ids = instance_ids(&c.nodes[1].socket, "echo").await?;
            (ids == ["zone:b"]).then_some(())
        },
    )
    .await;

    // A request from zone a reaches the instance in zone b.
    let before = upstream.hits();
    let answered = wait_for(
        Duration::from_secs(10),
        "n2's proxy reaches echo",
        || async {
            let (status, _) = proxy_call(c.nodes[1].proxy, Method::GET, "echo").await;
            (status == 200).then_some(status)
        },
    )
    .await;
    assert_eq!(answered, 200);
    assert!(upstream.hits() > before, "the instance in zone b answered");
    // Through both bridges: n1 relayed it toward zone b, n4 into it.
    for bridge in [0, 3] {
        let relayed = metric_sum(
            &metrics_text(c.nodes[bridge].admin).await,
            "weft_bridge_relayed_total",
            &["zone=\"b\""],
        );
        assert!(relayed >= 1.0, "{} relayed {relayed}", c.nodes[bridge].name);
    }

    // Zone b's callers (n5 and n6) learn the outages; zone a, which calls
    // echo no more, learns the same delay from zone b's summary.
    let callers = [c.nodes[4].proxy, c.nodes[5].proxy];
    let deadline = Instant::now() + Duration::from_secs(60);
    let (delay, samples) = loop {
        for proxy in callers {
            for _ in 0..10 {
                proxy_call(proxy, Method::GET, "echo").await;
            }
        }
        if let Some((delay, samples)) = learned_delay(&c, 2, "echo").await {
            if samples >= 5 {
                break (delay, samples);
            }
        }
        assert!(
            Instant::now() < deadline,
            "n3 (zone a) learned no delay of echo in 60 s; zone b's n4 says {:?}\n{}",
            learned_delay(&c, 3, "echo").await,
            c.logs()
        );
    };
    let in_b = learned_delay(&c, 3, "echo").await;
    eprintln!("n3 (zone a) learned {delay} ms from {samples} outages; n4 (zone b) {in_b:?}");
    // Callers see an outage from their first failure to their first
    // success, so a few samples of 300 ms outages spread below 300 ms.
    assert!(
        (100.0..=600.0).contains(&delay),
        "n3 learned {delay} ms from {samples} outages of 300 ms"
    );
}
