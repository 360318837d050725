//! End-to-end health and statistics: real nodes, real checks, real traffic.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_turns_failing_everywhere_and_recovers() {
    let c = TestCluster::start(3).await;
    let up = Upstream::start(0, 200).await;
    let (status, body) = put_json(
        &c.nodes[1].socket,
        "/v1/services",
        &json!({"name": "web", "port": up.port, "check": {"http": "/health", "interval_ms": 200, "timeout_ms": 200}}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let n3 = c.nodes[2].socket.clone();
    wait_for(Duration::from_secs(10), "passing on n3", || async {
        (health_of(&n3, "web", &id).await? == "passing").then_some(())
    })
    .await;

    // The upstream dies: fall (3) x interval (200 ms) + gossip.
    let port = up.stop();
    let died = Instant::now();
    wait_for(Duration::from_secs(10), "failing on n3", || async {
        (health_of(&n3, "web", &id).await? == "failing").then_some(())
    })
    .await;
    let to_failing = died.elapsed();
    assert!(
        to_failing >= Duration::from_millis(400),
        "no flapping on one probe: {to_failing:?}"
    );

    let _up = Upstream::start(port, 200).await;
    let back = Instant::now();
    wait_for(Duration::from_secs(10), "passing again on n3", || async {
        (health_of(&n3, "web", &id).await? == "passing").then_some(())
    })
    .await;
    eprintln!(
        "death->failing on n3: {to_failing:?}, return->passing: {:?}",
        back.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_checks_pass_while_refreshed_and_fail_when_not() {
    let c = TestCluster::start(2).await;
    let s = c.nodes[0].socket.clone();
    let (status, body) = put_json(
        &s,
        "/v1/services",
        &json!({"name": "job", "port": 9999, "check": {"ttl_ms": 400}}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let n2 = c.nodes[1].socket.clone();
    wait_for(
        Duration::from_secs(5),
        "unknown before the first refresh",
        || async { (health_of(&n2, "job", &id).await? == "unknown").then_some(()) },
    )
    .await;
    let (status, _) = request(
        &s,
        hyper::Method::PUT,
        &format!("/v1/services/{id}/ttl"),
        vec![],
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(5), "passing after refresh", || async {
        (health_of(&n2, "job", &id).await? == "passing").then_some(())
    })
    .await;
    wait_for(
        Duration::from_secs(5),
        "failing after the TTL lapses",
        || async { (health_of(&n2, "job", &id).await? == "failing").then_some(()) },
    )
    .await;
    let (status, _) = request(&s, hyper::Method::PUT, "/v1/services/nope/ttl", vec![])
        .await
        .unwrap();
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_502_instance_is_ejected_by_callers_and_needs_two_observers_cluster_wide() {
    let c = TestCluster::start(4).await;
    // The bad instance fails fast, so latency-based balancing alone would
    // favour it: the case passive outlier detection exists for.
    let good = Upstream::start_slow(0, 200, Duration::from_millis(40)).await;
    let bad = Upstream::start(0, 502).await;
    register_everywhere(&c, 1, "web", good.port, "http").await;
    let bad_id = register_everywhere(&c, 2, "web", bad.port, "http").await;

    // n1 calls: at most 5 failures, then every request lands on the good instance.
    let mut failures = 0;
    for _ in 0..20 {
        if proxy_get(c.nodes[0].proxy, "web").await != 200 {
            failures += 1;
        }
    }
    assert!(failures <= 5, "{failures} failed requests before ejection");
    for _ in 0..5 {
        assert_eq!(proxy_get(c.nodes[0].proxy, "web").await, 200);
    }
    // One observer alone: n4 (never called) still sees the instance as passing.
    let n4 = c.nodes[3].socket.clone();
    let quiet = Instant::now() + Duration::from_secs(1);
    while Instant::now() < quiet {
        assert_eq!(health_of(&n4, "web", &bad_id).await.unwrap(), "passing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A second observer (n2) agrees: now the whole mesh treats it as ejected.
    let mut n2_failures = 0;
    for _ in 0..20 {
        if proxy_get(c.nodes[1].proxy, "web").await != 200 {
            n2_failures += 1;
        }
    }
    assert!(n2_failures <= 5, "{n2_failures} failed requests from n2");
    // Both callers keep calling, so a vote that expired (5 s) is renewed
    // however slow this machine is.
    let (p1, p2) = (c.nodes[0].proxy, c.nodes[1].proxy);
    wait_for(Duration::from_secs(20), "ejected seen by n4", || async {
        proxy_get(p1, "web").await;
        proxy_get(p2, "web").await;
        (health_of(&n4, "web", &bad_id).await? == "ejected").then_some(())
    })
    .await;
    // n4 itself never sends to it now.
    for _ in 0..10 {
        assert_eq!(proxy_get(c.nodes[3].proxy, "web").await, 200);
    }
    drop(good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_sent_nothing_reports_what_others_saw() {
    let c = TestCluster::start(3).await;
    let up = Upstream::start_slow(0, 200, Duration::from_millis(5)).await;
    register_everywhere(&c, 1, "api", up.port, "http").await;
    for _ in 0..50 {
        assert_eq!(proxy_get(c.nodes[0].proxy, "api").await, 200);
    }
    // n3 never called api: it learns rps, success and latency from gossip.
    let n3 = c.nodes[2].socket.clone();
    let health = wait_for(
        Duration::from_secs(10),
        "n3 reports api statistics",
        || async {
            let (_, h) = get(&n3, "/v1/health").await.ok()?;
            let api = h["services"]["api"].clone();
            (api["rps"].as_f64()? > 0.0 && api["p99_ms"].as_f64().is_some()).then_some(api)
        },
    )
    .await;
    assert_eq!(health["success_rate"], 1.0, "{health}");
    let p99 = health["p99_ms"].as_f64().unwrap();
    assert!(p99 >= 5.0, "p99 {p99} includes the upstream's 5 ms");
    assert_eq!(
        health["local"]["rps"], 0.0,
        "n3 itself sent nothing: {health}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_metrics_pass_promtool() {
    let c = TestCluster::start(2).await;
    let up = Upstream::start(0, 200).await;
    let id = register_everywhere(&c, 1, "api", up.port, "http").await;
    for _ in 0..5 {
        proxy_get(c.nodes[0].proxy, "api").await;
    }
    let admin = c.nodes[0].admin;
    let text = wait_for(Duration::from_secs(10), "metrics list requests", || async {
        let out = tokio::process::Command::new("curl")
            .args(["-sf", &format!("http://{admin}/metrics")])
            .output()
            .await
            .ok()?;
        let text = String::from_utf8(out.stdout).ok()?;
        text.contains("weft_requests_total").then_some(text)
    })
    .await;
    for name in [
        "weft_requests_total",
        "weft_request_duration_seconds_bucket",
        "weft_members",
        "weft_instances",
        "weft_tunnel_streams_total",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
    }
    let promtool =
        which("promtool").expect("promtool (Debian package prometheus) is installed by .ci/run");
    let out = run_with_input(
        std::process::Command::new(promtool).args(["check", "metrics"]),
        text.as_bytes(),
    );
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A departed service's instance series go, not linger at zero.
    let api = [r#"service="api""#];
    assert_eq!(metric_sum(&text, "weft_instances", &api), 1.0, "{text}");
    // The dashboard's gauges: n1's requests to api all succeeded, and its
    // retry budget for api is unused.
    let effective = wait_for(
        Duration::from_secs(10),
        "api's effective success",
        || async {
            let text = metrics_text(admin).await;
            let line = text
                .lines()
                .find(|l| l.starts_with(r#"weft_effective_success_ratio{service="api"}"#))?;
            line.rsplit(' ').next()?.parse::<f64>().ok()
        },
    )
    .await;
    assert_eq!(effective, 1.0);
    assert_eq!(
        metric_sum(&text, "weft_retry_budget_used_ratio", &api),
        0.0,
        "{text}"
    );
    assert!(
        text.contains(r#"weft_retry_budget_used_ratio{service="api"}"#),
        "{text}"
    );
    let (status, _) = delete(&c.nodes[1].socket, &format!("/v1/services/{id}"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    wait_for(
        Duration::from_secs(10),
        "api leaves n1's /metrics",
        || async {
            let text = metrics_text(admin).await;
            (!text.contains(r#"weft_instances{service="api""#)).then_some(())
        },
    )
    .await;
}

fn which(cmd: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(cmd))
            .find(|p| p.is_file())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregistering_stops_probes_and_ttl_refreshes() {
    let c = TestCluster::start(1).await;
    let s = c.nodes[0].socket.clone();
    let up = Upstream::start(0, 200).await;
    let body = json!({"name": "web", "port": up.port, "id": "w1",
        "check": {"http": "/", "interval_ms": 100, "timeout_ms": 100}});
    let (status, _) = put_json(&s, "/v1/services", &body).await.unwrap();
    assert_eq!(status, 200);
    let ttl = json!({"name": "batch", "port": 9, "id": "b1", "check": {"ttl_ms": 5000}});
    assert_eq!(put_json(&s, "/v1/services", &ttl).await.unwrap().0, 200);
    wait_for(Duration::from_secs(5), "the checker probes w1", || async {
        (up.hits() >= 3).then_some(())
    })
    .await;
    assert_eq!(
        request(&s, hyper::Method::PUT, "/v1/services/b1/ttl", vec![])
            .await
            .unwrap()
            .0,
        200
    );

    assert_eq!(delete(&s, "/v1/services/w1").await.unwrap().0, 200);
    assert_eq!(delete(&s, "/v1/services/b1").await.unwrap().0, 200);
    // A TTL refresh for a deregistered id is 404 at once.
    let (status, body) = request(&s, hyper::Method::PUT, "/v1/services/b1/ttl", vec![])
        .await
        .unwrap();
    assert_eq!(status, 404, "{body}");
    // Probes stop: at most one already in flight, then none for 10 intervals.
    let settled = up.hits() + 1;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        up.hits() <= settled,
        "probes went on after deregistration: {}",
        up.hits()
    );
}
