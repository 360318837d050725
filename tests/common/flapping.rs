//! The flapping scenario: a service down D of every P, called through the mesh
//! with the learned retry delay and with Envoy-style exponential backoff, side
//! by side in one run. Prints a table; returns the rows for assertions.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// One measured phase.
#[derive(Debug, Clone)]
pub struct Row {
    pub policy: &'static str,
    pub clients: usize,
    pub requests: u64,
    pub ok: u64,
    pub attempts: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub observer_delay_ms: Option<f64>,
}

impl Row {
    pub fn success(&self) -> f64 {
        self.ok as f64 / self.requests.max(1) as f64
    }
    pub fn attempts_per_request(&self) -> f64 {
        self.attempts as f64 / self.requests.max(1) as f64
    }
}

/// Scenario lengths.
#[derive(Debug, Clone, Copy)]
pub struct Lengths {
    pub warmup: Duration,
    pub phase: Duration,
    pub down: Duration,
    pub period: Duration,
    pub concurrent: usize,
    pub rate_per_client: f64,
}

impl Lengths {
    /// The CI form: about a minute.
    pub fn short() -> Self {
        Lengths {
            warmup: Duration::from_secs(12),
            phase: Duration::from_secs(8),
            down: Duration::from_millis(300),
            period: Duration::from_millis(1500),
            concurrent: 50,
            rate_per_client: 4.0,
        }
    }
    /// The form: 30 s phases.
    pub fn long() -> Self {
        Lengths {
            warmup: Duration::from_secs(30),
            phase: Duration::from_secs(30),
            ..Lengths::short()
        }
    }
}

/// A keep-alive HTTP/1.1 client to a node's proxy.
async fn client(proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(proxy).await.expect("proxy");
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// Runs `clients` clients for `len`, each at `rate` req/s (0 = back to
/// back); returns (requests, successes, sorted latencies in ms).
pub async fn load(
    proxy: SocketAddr,
    service: &'static str,
    clients: usize,
    rate: f64,
    len: Duration,
) -> (u64, u64, Vec<f64>) {
    let ok = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let end = Instant::now() + len;
    for i in 0..clients {
        let (ok, total) = (ok.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut sender = client(proxy).await;
            let period = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
            // Spread the clients' first requests over one period.
            let mut next = Instant::now()
                + period
                    .map(|p| p.mul_f64(i as f64 / clients as f64))
                    .unwrap_or_default();
            while Instant::now() < end {
                if let Some(p) = period {
                    tokio::time::sleep_until(next.into()).await;
                    next += p;
                }
                let req = Request::get(format!("http://{service}/"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let start = Instant::now();
                let status = match sender.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        let _ = resp.into_body().collect().await;
                        status
                    }
                    Err(_) => {
                        sender = client(proxy).await;
                        0
                    }
                };
                latencies.push(start.elapsed().as_secs_f64() * 1e3);
                total.fetch_add(1, Ordering::Relaxed);
                if status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client"));
    }
    all.sort_by(f64::total_cmp);
    (
        total.load(Ordering::Relaxed),
        ok.load(Ordering::Relaxed),
        all,
    )
}

/// The `p` quantile of sorted values.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

async fn observer_delay(socket: &Path, service: &str) -> Option<f64> {
    let (_, h) = get(socket, "/v1/health").await.ok()?;
    h["services"][service]["retry_delay_ms"].as_f64()
}

/// Runs the whole scenario and prints the table.
pub async fn run(lengths: Lengths) -> Vec<Row> {
    // n1: the measured caller; n2, n3: extra callers while learning;
    // n4: hosts the flapping instances; n5: never calls anything.
    let mut c = TestCluster::new();
    for _ in 0..5 {
        c.add_node();
    }
    c.wait_converged(5, Duration::from_secs(20)).await;
    let epoch = Instant::now();
    let flap = Behavior::Flap {
        down: lengths.down,
        period: lengths.period,
        epoch,
    };
    let learned = Upstream::with(0, flap).await;
    let exponential = Upstream::with(0, flap).await;
    for (name, port, policy) in [
        ("flap-learned", learned.port, "learned"),
        ("flap-exponential", exponential.port, "exponential"),
    ] {
        let (status, body) = put_json(
            &c.nodes[3].socket,
            "/v1/services",
            &serde_json::json!({"name": name, "port": port, "retry": policy}),
        )
        .await
        .expect("register");
        assert_eq!(status, 200, "{body}");
        for node in &c.nodes {
            wait_for(
                Duration::from_secs(10),
                "flapping service listed",
                || async { (!instance_ids(&node.socket, name).await?.is_empty()).then_some(()) },
            )
            .await;
        }
    }
    // Learning: three nodes call the learned service; every outage each of
    // them sees is one sample, gossiped and merged everywhere.
    let warm: Vec<_> = (0..3)
        .map(|i| {
            let proxy = c.nodes[i].proxy;
            tokio::spawn(load(proxy, "flap-learned", 1, 0.0, lengths.warmup))
        })
        .collect();
    for w in warm {
        w.await.expect("warm-up");
    }
    let observer = c.nodes[4].socket.clone();
    let mut rows = Vec::new();
    for (policy, service, upstream) in [
        ("learned", "flap-learned", &learned),
        ("exponential", "flap-exponential", &exponential),
    ] {
        for (clients, rate) in [(1usize, 0.0), (lengths.concurrent, lengths.rate_per_client)] {
            let before = upstream.hits();
            let (requests, ok, lat) =
                load(c.nodes[0].proxy, service, clients, rate, lengths.phase).await;
            rows.push(Row {
                policy,
                clients,
                requests,
                ok,
                attempts: upstream.hits() - before,
                p50_ms: pct(&lat, 0.5),
                p99_ms: pct(&lat, 0.99),
                observer_delay_ms: observer_delay(&observer, service).await,
            });
        }
    }
    println!(
        "# flapping service: down {} ms of every {} ms; warm-up {} s; phases {} s; node n5 never calls",
        lengths.down.as_millis(),
        lengths.period.as_millis(),
        lengths.warmup.as_secs(),
        lengths.phase.as_secs()
    );
    println!(
        "{:<12} {:>7} | {:>8} {:>9} {:>12} | {:>8} {:>8} | {:>22}",
        "policy",
        "clients",
        "requests",
        "success%",
        "attempts/req",
        "p50 ms",
        "p99 ms",
        "retry_delay_ms on n5"
    );
    for r in &rows {
        println!(
            "{:<12} {:>7} | {:>8} {:>9.3} {:>12.3} | {:>8.1} {:>8.1} | {:>22}",
            r.policy,
            r.clients,
            r.requests,
            100.0 * r.success(),
            r.attempts_per_request(),
            r.p50_ms,
            r.p99_ms,
            r.observer_delay_ms
                .map(|d| format!("{d:.0}"))
                .unwrap_or_else(|| "-".into())
        );
    }
    rows
}
