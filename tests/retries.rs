//! End-to-end retries: idempotent requests go to another instance, the budget
//! bounds retries under a total outage, and a refused retry says so.

mod common;

use std::time::Duration;

use common::*;
use hyper::Method;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_requests_are_retried_on_another_instance() {
    let c = TestCluster::start(3).await;
    let bad = Upstream::start(0, 503).await;
    let good = Upstream::start(0, 200).await;
    register_everywhere(&c, 1, "api", bad.port, "http").await;
    register_everywhere(&c, 2, "api", good.port, "http").await;
    for _ in 0..30 {
        assert_eq!(proxy_get(c.nodes[0].proxy, "api").await, 200);
    }
    assert!(bad.hits() >= 1, "the failing instance was tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_idempotent_methods_are_retried_unless_the_service_opts_in() {
    let c = TestCluster::start(2).await;
    let down = Upstream::start(0, 503).await;
    register_everywhere(&c, 1, "api", down.port, "http").await;
    // POST: one attempt each, the app sees the instance's 503.
    for _ in 0..5 {
        let (status, err) = proxy_call(c.nodes[0].proxy, Method::POST, "api").await;
        assert_eq!((status, err), (503, None));
    }
    assert_eq!(down.hits(), 5, "POST must not be retried");
    // GET: retried (the budget's 10/s floor allows these few).
    proxy_call(c.nodes[0].proxy, Method::GET, "api").await;
    assert_eq!(down.hits(), 5 + 3, "GET gets two retries");

    // A service that opts in has its POSTs retried too.
    let opted = Upstream::start(0, 503).await;
    let (status, body) = put_json(
        &c.nodes[1].socket,
        "/v1/services",
        &serde_json::json!({"name": "jobs", "port": opted.port, "retry_non_idempotent": true}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    wait_for(Duration::from_secs(10), "jobs listed on n1", || async {
        (!instance_ids(&c.nodes[0].socket, "jobs").await?.is_empty()).then_some(())
    })
    .await;
    proxy_call(c.nodes[0].proxy, Method::POST, "jobs").await;
    assert_eq!(opted.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_total_outage_is_not_buried_in_retries() {
    let c = TestCluster::start(2).await;
    let down = Upstream::start(0, 503).await;
    register_everywhere(&c, 1, "api", down.port, "http").await;
    let proxy = c.nodes[0].proxy;
    // 8 concurrent clients, `n` requests each; returns (requests, refused retries).
    let burst = |n: usize| async move {
        let mut tasks = Vec::new();
        for _ in 0..8 {
            tasks.push(tokio::spawn(async move {
                let mut refused = 0;
                for _ in 0..n {
                    let (status, err) = proxy_call(proxy, Method::GET, "api").await;
                    assert_eq!(status, 503);
                    refused += usize::from(err.as_deref() == Some("retry-budget-exhausted"));
                }
                refused
            }));
        }
        let mut refused = 0;
        for t in tasks {
            refused += t.await.unwrap();
        }
        (8 * n, refused)
    };
    // The first seconds spend the budget's reserve.
    let (_, refused) = burst(40).await;
    assert!(refused > 0, "the budget never refused a retry");
    // Then: retries <= 20% of requests + 10/s.
    let before = down.hits();
    let start = std::time::Instant::now();
    let (requests, refused) = burst(100).await;
    let secs = start.elapsed().as_secs_f64();
    let attempts = down.hits() - before;
    let retries = attempts as f64 - requests as f64;
    let bound = 0.2 * requests as f64 + 10.0 * secs.ceil() + 10.0;
    eprintln!(
        "total outage: {requests} requests in {secs:.1}s, {attempts} attempts ({:.2}/request), {refused} refused retries, bound {bound:.0} retries",
        attempts as f64 / requests as f64
    );
    assert!(retries <= bound, "{retries} retries > {bound}");
    assert!(refused > 0);
}

/// Sends `rps` requests per second (open loop, one task each) through
/// `proxy` to `service` until `stop`; returns how many were sent.
async fn paced(
    proxy: std::net::SocketAddr,
    service: &'static str,
    rps: u32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> u64 {
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    let mut sent = 0;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tick.tick().await;
        tokio::spawn(async move { proxy_call(proxy, Method::GET, service).await });
        sent += 1;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_callers_in_a_total_outage_add_a_fifth_not_five_floors() {
    const RPS: u32 = 30;
    let mut c = TestCluster::new();
    for _ in 0..6 {
        c.add_node();
    }
    c.wait_converged(6, Duration::from_secs(30)).await;
    let down = Upstream::start(0, 503).await;
    register_everywhere(&c, 5, "api", down.port, "http").await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let callers: Vec<_> = c.nodes[..5]
        .iter()
        .map(|n| tokio::spawn(paced(n.proxy, "api", RPS, stop.clone())))
        .collect();
    // Past the first budget window (10 s), whose retries were spent before
    // every node heard the four other callers' summaries.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let (hits, start) = (down.hits(), std::time::Instant::now());
    tokio::time::sleep(Duration::from_secs(6)).await;
    let attempts = down.hits() - hits;
    let secs = start.elapsed().as_secs_f64();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut sent = 0;
    for caller in callers {
        sent += caller.await.unwrap();
    }
    assert!(sent > 0);
    // What the service normally gets: the callers' requests.
    let normal = f64::from(5 * RPS) * secs;
    let ratio = attempts as f64 / normal;
    eprintln!("total outage, 5 callers at {RPS}/s each: {attempts} attempts in {secs:.1} s, {ratio:.2}x the request rate");
    // Bounded by the per-service budgets (20% of requests plus a floor of
    // 10/s shared by the callers: at most 1.27x here) and by outlier
    // ejection, after which a failing instance gets only first attempts.
    assert!(
        ratio <= 1.3,
        "the failing service saw {ratio:.2}x its request rate"
    );
    assert!(ratio >= 1.1, "retries stopped altogether: {ratio:.2}x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_without_a_timeout_gets_one_learned_from_its_latency() {
    let c = TestCluster::start(1).await;
    let node = &c.nodes[0];
    let fast = Upstream::start(0, 200).await;
    let (status, body) = put_json(
        &node.socket,
        "/v1/services",
        &serde_json::json!({"name": "api", "port": fast.port, "id": "fast"}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let timeout_of =
        |body: &serde_json::Value| body["services"]["api"]["learned"]["timeout"].clone();
    let before = wait_for(Duration::from_secs(10), "api in /v1/health", || async {
        let (_, health) = get(&node.socket, "/v1/health").await.ok()?;
        let t = timeout_of(&health);
        (!t.is_null()).then_some(t)
    })
    .await;
    assert_eq!(before["source"], "default");
    assert_eq!(before["ms"], 30_000);

    // 1200 quick answers within the statistics window.
    let proxy = node.proxy;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        tasks.push(tokio::spawn(async move {
            for _ in 0..150 {
                assert_eq!(proxy_get(proxy, "api").await, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let learned = wait_for(Duration::from_secs(10), "a learned timeout", || async {
        let (_, health) = get(&node.socket, "/v1/health").await.ok()?;
        let t = timeout_of(&health);
        (t["source"] == "learned").then_some(t)
    })
    .await;
    let ms = learned["ms"].as_u64().unwrap();
    assert!((50..1_000).contains(&ms), "{learned}");
    assert!(learned["samples"].as_u64().unwrap() >= 1000, "{learned}");
    assert_eq!(learned["nodes"], 1);

    // The service turns slow: a request now ends at the learned timeout,
    // not after the 30 s default.
    let slow = Upstream::start_slow(0, 200, Duration::from_secs(5)).await;
    let (status, _) = put_json(
        &node.socket,
        "/v1/services",
        &serde_json::json!({"name": "api", "port": slow.port, "id": "fast"}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    wait_for(
        Duration::from_secs(10),
        "the slow instance in the catalog",
        || async {
            let (_, body) = get(&node.socket, "/v1/services").await.ok()?;
            (body["services"]["api"][0]["port"] == slow.port).then_some(())
        },
    )
    .await;
    let started = std::time::Instant::now();
    let (status, err) = proxy_call(proxy, Method::GET, "api").await;
    let took = started.elapsed();
    assert_eq!(status, 504, "{err:?}");
    assert!(
        took < Duration::from_secs(2),
        "took {took:?} with a learned {ms} ms timeout"
    );
    let table = std::process::Command::new(weft_bin())
        .arg("--socket")
        .arg(&node.socket)
        .arg("health")
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("learned"), "{table}");
}

/// `n` GETs through `proxy` from 4 concurrent clients; their latencies,
/// sorted.
async fn latencies(proxy: std::net::SocketAddr, service: &'static str, n: usize) -> Vec<Duration> {
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..n / 4 {
                let start = std::time::Instant::now();
                assert_eq!(proxy_get(proxy, service).await, 200);
                out.push(start.elapsed());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all.sort();
    all
}

/// Three instances on two nodes, each pausing 400 ms on one request in
/// 25 (beyond the p95), registered with `"hedge"` as given. Returns the
/// sorted latencies of 400 requests from n1, the attempts they took, and
/// the hedges that answered first.
async fn tail_latency(hedge: bool) -> (Vec<Duration>, u64, f64) {
    let c = TestCluster::start(3).await;
    let tail = Behavior::Tail {
        every: 25,
        delay: Duration::from_millis(400),
    };
    let upstreams = [
        Upstream::with(0, tail).await,
        Upstream::with(0, tail).await,
        Upstream::with(0, tail).await,
    ];
    for (i, (on, upstream)) in [1, 1, 2].into_iter().zip(&upstreams).enumerate() {
        let body = serde_json::json!({"name": "api", "id": format!("api-{i}"), "port": upstream.port, "hedge": hedge});
        let (status, reply) = put_json(&c.nodes[on].socket, "/v1/services", &body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
    }
    wait_for(Duration::from_secs(10), "three instances on n1", || async {
        (instance_ids(&c.nodes[0].socket, "api").await?.len() == 3).then_some(())
    })
    .await;
    let proxy = c.nodes[0].proxy;
    let hits = || upstreams.iter().map(Upstream::hits).sum::<u64>();
    // The p95 is learned first: hedging waits for 100 requests in the
    // cluster's window, which summaries bring within a second or two.
    latencies(proxy, "api", 200).await;
    let socket = c.nodes[0].socket.clone();
    wait_for(
        Duration::from_secs(10),
        "the cluster's latency of api",
        || async {
            let (_, health) = get(&socket, "/v1/health").await.ok()?;
            let samples = health["services"]["api"]["learned"]["timeout"]["samples"].as_u64()?;
            (samples >= 100).then_some(())
        },
    )
    .await;
    let before = hits();
    let measured = latencies(proxy, "api", 400).await;
    let attempts = hits() - before;
    let text = metrics_text(c.nodes[0].admin).await;
    let won = metric_sum(&text, "weft_retries_total", &["outcome=\"hedge_won\""]);
    (measured, attempts, won)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hedging_cuts_the_tail_of_a_service_that_opts_in() {
    let p99 = |l: &[Duration]| l[l.len() * 99 / 100];
    let (plain, plain_attempts, _) = tail_latency(false).await;
    let (hedged, attempts, won) = tail_latency(true).await;
    eprintln!(
        "tail every 25th request 400 ms: p99 {:?} unhedged ({plain_attempts} attempts), {:?} hedged ({attempts} attempts, {won} hedges won)",
        p99(&plain),
        p99(&hedged)
    );
    assert!(
        p99(&plain) >= Duration::from_millis(400),
        "the tail is there unhedged"
    );
    assert!(won > 0.0, "no hedge ever answered first");
    assert!(
        p99(&hedged) < Duration::from_millis(200),
        "hedged p99 {:?}",
        p99(&hedged)
    );
    assert!(attempts <= 460, "{attempts} attempts for 400 requests");
}
