//! Weighted splits by instance tag: `weft route api v1=90 v2=10`, signed
//! by an operator and spread by gossip, splits 10,000 requests made from
//! three nodes within 2 points of the weights; when the v2 instance fails
//! its check, v1 takes all, and v2's share comes back with it.

mod common;

use std::time::Duration;

use common::*;

/// `n` GETs of `api` through every node's proxy, `per_node` at a time on
/// each; all must answer 200.
async fn load(c: &TestCluster, n: usize, per_node: usize) {
    let proxies: Vec<_> = c.nodes.iter().map(|node| node.proxy).collect();
    let workers = proxies.len() * per_node;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let proxy = proxies[w % proxies.len()];
        let share = n / workers + usize::from(w < n % workers);
        tasks.push(tokio::spawn(async move {
            for _ in 0..share {
                assert_eq!(proxy_get(proxy, "api").await, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Waits until every node sees `passing` instances of api with `tag`.
async fn everywhere(c: &TestCluster, tag: &str, passing: usize) {
    for node in &c.nodes {
        wait_for(
            Duration::from_secs(15),
            &format!("{} sees {passing} passing {tag}", node.name),
            || async {
                let (_, body) = get(&node.socket, "/v1/services").await.ok()?;
                let n = body["services"]["api"]
                    .as_array()?
                    .iter()
                    .filter(|i| i["health"] == "passing" && i["tags"][0] == tag)
                    .count();
                (n == passing).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_split_holds_its_weights_and_an_unhealthy_tag_gives_its_share_back() {
    let c = TestCluster::start(3).await;
    let mut v1 = Vec::new();
    for node in 0..3 {
        let instance = Upstream::start(0, 200).await;
        register_tagged_api(&c, node, "v1", instance.port).await;
        v1.push(instance);
    }
    let v2 = Upstream::start(0, 200).await;
    let v2_port = v2.port;
    register_tagged_api(&c, 2, "v2", v2_port).await;
    everywhere(&c, "v1", 3).await;
    everywhere(&c, "v2", 1).await;

    // A change needs an operator; n1 takes it and gossip brings it to all.
    assert!(weft_at(&c, 0, &["route", "api", "v1=90", "v2=10"], false).is_err());
    weft_at(&c, 0, &["route", "api", "v1=90", "v2=10"], true).expect("route");
    for node in &c.nodes {
        wait_for(
            Duration::from_secs(10),
            "routes version 1 everywhere",
            || async {
                let (_, body) = get(&node.socket, "/v1/routes").await.ok()?;
                (body["routes"]["version"] == 1).then_some(())
            },
        )
        .await;
    }

    let v1_hits = |v1: &[Upstream]| v1.iter().map(Upstream::hits).sum::<u64>();
    let share = |v1_before: u64, v2_before: u64, v2_now: u64, v1_now: u64| {
        let (a, b) = ((v1_now - v1_before) as f64, (v2_now - v2_before) as f64);
        b / (a + b)
    };
    load(&c, 10_000, 8).await;
    let measured = share(0, 0, v2.hits(), v1_hits(&v1));
    eprintln!("v2's share of 10,000 requests from 3 nodes: {measured:.4}");
    assert!(
        (measured - 0.10).abs() <= 0.02,
        "v2 got {measured:.4} of the requests"
    );

    // v2 fails its check: v1 takes every request, none fails.
    let v2_hits = v2.hits();
    v2.stop();
    everywhere(&c, "v2", 0).await;
    let before = v1_hits(&v1);
    load(&c, 1_000, 4).await;
    assert_eq!(v1_hits(&v1) - before, 1_000);

    // v2 comes back, and with it its share.
    let v2 = Upstream::start(v2_port, 200).await;
    everywhere(&c, "v2", 1).await;
    let before = v1_hits(&v1);
    load(&c, 3_000, 4).await;
    let measured = share(before, 0, v2.hits(), v1_hits(&v1));
    assert!(
        (measured - 0.10).abs() <= 0.03,
        "v2 got {measured:.4} after it came back"
    );
    assert!(v2_hits > 0);

    // `weft route` lists it; --clear removes it.
    let text = weft_at(&c, 0, &["route"], false).expect("route");
    assert!(
        text.contains("api") && text.contains("v2") && text.contains("10"),
        "{text}"
    );
    weft_at(&c, 0, &["route", "api", "--clear"], true).expect("route --clear");
    let (_, body) = get(&c.nodes[0].socket, "/v1/routes").await.unwrap();
    assert_eq!(body["routes"]["version"], 2);
    assert!(body["routes"]["splits"]["api"].is_null(), "{body}");
}
