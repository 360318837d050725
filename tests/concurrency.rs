//! Adaptive concurrency: an instance that serves 4 requests at once in
//! 20 ms each (200 a second), registered with `"concurrency":
//! "adaptive"`, called from three nodes at three times its capacity. The
//! nodes learn and share a limit: goodput stays near capacity, admitted
//! requests keep near their unloaded latency, and the rest get 503
//! `weft-error: overloaded` at once. Side by side, the same load on the
//! same kind of instance without the limit queues without end.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const CAPACITY: Behavior = Behavior::Capacity {
    concurrent: 4,
    service_time: Duration::from_millis(20),
};

/// Requests a second the instance can serve.
const CAPACITY_RPS: f64 = 200.0;

/// The answers of a load phase.
#[derive(Default)]
struct Answers {
    /// Latencies of 200s, by the second they were sent in.
    served: Vec<Vec<Duration>>,
    /// Latencies of 503 overloaded.
    refused: Vec<Duration>,
    /// Anything else (a timeout of the client included).
    other: Vec<String>,
}

/// `rate` GETs a second of `service` through each of `proxies` for
/// `seconds` (an open loop); a request the client gave up on after
/// `patience` is `other`.
async fn load(
    client: &PooledClient,
    proxies: &[SocketAddr],
    service: &str,
    rate: u64,
    seconds: u64,
    patience: Duration,
) -> Answers {
    let mut answers = Answers {
        served: vec![Vec::new(); seconds as usize],
        ..Answers::default()
    };
    let rates = vec![rate; proxies.len()];
    for sent in open_loop(client, proxies, &rates, service, seconds, patience).await {
        match overloaded(sent.answer) {
            Ok(200) => answers.served[sent.second].push(sent.took),
            Ok(503) => answers.refused.push(sent.took),
            Ok(status) => answers.other.push(format!("status {status}")),
            Err(e) => answers.other.push(e),
        }
    }
    answers
}

/// The status, with a 503 only if the mesh made it for overload.
fn overloaded(answer: Answer) -> Result<u16, String> {
    let (status, headers) = answer?;
    let error = headers.get("weft-error");
    match status {
        503 if error.is_some_and(|e| e == "overloaded") => Ok(503),
        503 => Err(format!("503 weft-error {error:?}")),
        status => Ok(status),
    }
}

fn quantile(latencies: &mut [Duration], q: f64) -> Duration {
    latencies.sort();
    let i = ((latencies.len() as f64 * q).ceil() as usize).clamp(1, latencies.len()) - 1;
    latencies[i]
}

fn served_in(answers: &Answers, seconds: std::ops::Range<usize>) -> Vec<Duration> {
    answers.served[seconds].iter().flatten().copied().collect()
}

async fn register(c: &TestCluster, service: &str, port: u16, adaptive: bool) {
    let mut body = json!({"name": service, "port": port});
    if adaptive {
        body["concurrency"] = json!("adaptive");
    }
    let (status, reply) = put_json(&c.nodes[0].socket, "/v1/services", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    for node in &c.nodes {
        wait_for(
            Duration::from_secs(10),
            "registration everywhere",
            || async {
                let ids = instance_ids(&node.socket, service).await?;
                (!ids.is_empty()).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_share_a_learned_limit_and_keep_latency_at_three_times_capacity() {
    let c = TestCluster::start(3).await;
    let capped = Upstream::with(0, CAPACITY).await;
    let raw = Upstream::with(0, CAPACITY).await;
    register(&c, "capped", capped.port, true).await;
    register(&c, "raw", raw.port, false).await;
    let client = pooled_client();
    let proxies: Vec<SocketAddr> = c.nodes.iter().map(|n| n.proxy).collect();

    // Unloaded: one request at a time from each node.
    let mut unloaded = Vec::new();
    for _ in 0..20 {
        for &proxy in &proxies {
            let sent = Instant::now();
            assert_eq!(
                overloaded(pooled_get(&client, proxy, "capped").await),
                Ok(200)
            );
            unloaded.push(sent.elapsed());
        }
    }
    let unloaded_p99 = quantile(&mut unloaded, 0.99);

    // Three times the capacity, from three nodes.
    let per_node = (3.0 * CAPACITY_RPS / 3.0) as u64;
    let patience = Duration::from_secs(5);
    let limited = load(&client, &proxies, "capped", per_node, 10, patience).await;
    let mut steady = served_in(&limited, 3..10);
    let goodput = steady.len() as f64 / 7.0;
    let admitted_p99 = quantile(&mut steady, 0.99);
    let mut refused = limited.refused.clone();
    let refused_p50 = quantile(&mut refused, 0.5);
    let refused_p99 = quantile(&mut refused, 0.99);

    // The same load without a limit, for a shorter while.
    let unlimited = load(&client, &proxies, "raw", per_node, 4, patience).await;
    let mut raw_latencies = served_in(&unlimited, 0..4);
    let raw_p99 = quantile(&mut raw_latencies, 0.99);

    eprintln!(
        "capacity {CAPACITY_RPS}/s, offered {}/s from 3 nodes\n\
         unloaded p99 {unloaded_p99:?}\n\
         adaptive: goodput {goodput:.0}/s (seconds 3-10), admitted p99 {admitted_p99:?}, \
         refused {} (p50 {refused_p50:?}, p99 {refused_p99:?}), other {}\n\
         no limit: served {} in 4 s, p99 {raw_p99:?}, other {}",
        3 * per_node,
        limited.refused.len(),
        limited.other.len(),
        raw_latencies.len(),
        unlimited.other.len(),
    );
    assert!(
        limited.other.is_empty(),
        "{:?}",
        &limited.other[..limited.other.len().min(5)]
    );
    assert!(
        goodput >= 0.9 * CAPACITY_RPS,
        "goodput {goodput:.0}/s against a capacity of {CAPACITY_RPS}/s"
    );
    assert!(
        admitted_p99 <= unloaded_p99 * 2,
        "admitted p99 {admitted_p99:?} against unloaded p99 {unloaded_p99:?}"
    );
    assert!(
        refused_p50 < Duration::from_millis(5),
        "a refusal took {refused_p50:?} (median)"
    );
    assert!(
        raw_p99 > admitted_p99 * 4 || !unlimited.other.is_empty(),
        "without a limit the queue should grow: p99 {raw_p99:?}"
    );

    // Every node holds the limit and shows it.
    let (_, health) = get(&c.nodes[2].socket, "/v1/health").await.unwrap();
    let shown = &health["concurrency"][0];
    assert_eq!(shown["service"], "capped", "{health}");
    assert!(shown["limit"].as_f64().unwrap() >= 4.0, "{shown}");
    let text = metrics_text(c.nodes[2].admin).await;
    assert!(
        metric_sum(
            &text,
            "weft_requests_overloaded_total",
            &["service=\"capped\""]
        ) > 0.0
    );
}
