//! The learning scenario matrix: retry policies (learned, Envoy's
//! exponential backoff, none) against failure shapes, on one cluster of six
//! real nodes. n1 is the measured caller, n2 and n3 call while the learned
//! policy learns, n4 and n5 join n1 for the total outage, n5 never calls the
//! flapping services (the observer), n6 hosts every instance.
//!
//! Columns: success of the client requests, attempts per request, what the
//! failing instances received while failing relative to what they get when
//! healthy (1.0 = no extra load; retries push it up), and client latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// How long each part runs.
#[derive(Debug, Clone, Copy)]
pub struct Lengths {
    /// The learned policy's warm-up, three callers.
    pub warmup: Duration,
    /// Each measured phase.
    pub phase: Duration,
    /// Concurrent clients, and each one's rate.
    pub concurrent: usize,
    pub rate_per_client: f64,
    /// Shapes to run (all when empty).
    pub only: &'static [&'static str],
}

impl Lengths {
    /// The CI form: two shapes, short phases (about two minutes).
    pub fn short() -> Self {
        Lengths {
            warmup: Duration::from_secs(10),
            phase: Duration::from_secs(5),
            concurrent: 20,
            rate_per_client: 5.0,
            only: &[
                "flap 300/1500 ms",
                "private flap 250/1000 ms",
                "total outage, 5 callers",
            ],
        }
    }

    /// The README's form: every shape, 10 s phases (30 s for the 5 s
    /// outage, two of its periods).
    pub fn long() -> Self {
        Lengths {
            warmup: Duration::from_secs(20),
            phase: Duration::from_secs(10),
            concurrent: 50,
            rate_per_client: 4.0,
            only: &[],
        }
    }
}

/// One row of the matrix.
#[derive(Debug, Clone)]
pub struct Row {
    pub shape: &'static str,
    pub policy: &'static str,
    pub clients: usize,
    pub requests: u64,
    pub ok: u64,
    pub attempts: u64,
    /// What the failing instances got while failing / what they get healthy.
    pub failing_load: Option<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// `retry_delay_ms` on n5, which never called the service.
    pub observer_delay_ms: Option<f64>,
}

impl Row {
    pub fn success(&self) -> f64 {
        self.ok as f64 / self.requests.max(1) as f64
    }
    pub fn attempts_per_request(&self) -> f64 {
        self.attempts as f64 / self.requests.max(1) as f64
    }
    fn cells(&self) -> Cells {
        Cells {
            success: self.success(),
            attempts_per_request: self.attempts_per_request(),
            failing_load: self.failing_load,
            p50_ms: self.p50_ms,
            p99_ms: self.p99_ms,
            observer_delay_ms: self.observer_delay_ms,
        }
    }
}

/// The printed columns of a row: one run's, or the medians of several.
#[derive(Debug, Clone, Copy)]
struct Cells {
    success: f64,
    attempts_per_request: f64,
    failing_load: Option<f64>,
    p50_ms: f64,
    p99_ms: f64,
    observer_delay_ms: Option<f64>,
}

impl Cells {
    /// Each column's median over `all` (one row of every run).
    fn median(all: &[Cells]) -> Cells {
        let of = |f: &dyn Fn(&Cells) -> f64| {
            let mut v: Vec<f64> = all.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            pct(&v, 0.5)
        };
        let of_some = |f: &dyn Fn(&Cells) -> Option<f64>| {
            let mut v: Vec<f64> = all.iter().filter_map(f).collect();
            v.sort_by(f64::total_cmp);
            (!v.is_empty()).then(|| pct(&v, 0.5))
        };
        Cells {
            success: of(&|c| c.success),
            attempts_per_request: of(&|c| c.attempts_per_request),
            failing_load: of_some(&|c| c.failing_load),
            p50_ms: of(&|c| c.p50_ms),
            p99_ms: of(&|c| c.p99_ms),
            observer_delay_ms: of_some(&|c| c.observer_delay_ms),
        }
    }
}

const POLICIES: [&str; 3] = ["learned", "exponential", "none"];

/// A failure shape: how the instances of a service behave.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Every instance down for `down` of every `period`.
    Flap { down: u64, period: u64 },
    /// The same, called (and so learned) by n1 alone, measured with 1, 4
    /// and 16 back-to-back callers: no other node's statistics help.
    PrivateFlap { down: u64, period: u64 },
    /// One of three instances always failing.
    OneOfThree,
    /// A 400 ms pause on every 25th request of each of three instances;
    /// policies are hedging on and off, and a baseline without pauses.
    Spike,
    /// Always failing, called by five nodes.
    TotalOutage,
}

const SHAPES: [(&str, Shape); 10] = [
    (
        "flap 300/1500 ms",
        Shape::Flap {
            down: 300,
            period: 1500,
        },
    ),
    (
        "flap 100/600 ms",
        Shape::Flap {
            down: 100,
            period: 600,
        },
    ),
    (
        "flap 800/2400 ms",
        Shape::Flap {
            down: 800,
            period: 2400,
        },
    ),
    (
        "outage 5 s of 15 s",
        Shape::Flap {
            down: 5000,
            period: 15000,
        },
    ),
    (
        "private flap 100/800 ms",
        Shape::PrivateFlap {
            down: 100,
            period: 800,
        },
    ),
    (
        "private flap 250/1000 ms",
        Shape::PrivateFlap {
            down: 250,
            period: 1000,
        },
    ),
    (
        "private flap 500/2000 ms",
        Shape::PrivateFlap {
            down: 500,
            period: 2000,
        },
    ),
    ("one of three down", Shape::OneOfThree),
    ("latency spike", Shape::Spike),
    ("total outage, 5 callers", Shape::TotalOutage),
];

/// The services of one shape under one policy, and their instances.
struct Deployed {
    service: &'static str,
    policy: &'static str,
    upstreams: Vec<Upstream>,
    /// Share of the time (or of the instances) that fails, for the
    /// failing-load column.
    failing_share: f64,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

async fn deploy(c: &TestCluster, name: &str, shape: Shape, epoch: Instant) -> Vec<Deployed> {
    let policies: Vec<&'static str> = match shape {
        Shape::Spike => vec!["hedge", "no hedge", "no spike"],
        _ => POLICIES.to_vec(),
    };
    let mut out = Vec::new();
    for (p, policy) in policies.into_iter().enumerate() {
        let service = leak(format!(
            "s{}-{p}",
            SHAPES.iter().position(|(n, _)| *n == name).unwrap_or(0)
        ));
        let (behaviors, failing_share) = match shape {
            Shape::Flap { down, period } | Shape::PrivateFlap { down, period } => (
                vec![Behavior::Flap {
                    down: Duration::from_millis(down),
                    period: Duration::from_millis(period),
                    epoch,
                }],
                down as f64 / period as f64,
            ),
            Shape::OneOfThree => (
                vec![
                    Behavior::Fixed(200, Duration::ZERO),
                    Behavior::Fixed(200, Duration::ZERO),
                    Behavior::Fixed(503, Duration::ZERO),
                ],
                1.0 / 3.0,
            ),
            // The healthy baseline: the same three instances, none pausing.
            Shape::Spike if policy == "no spike" => {
                (vec![Behavior::Fixed(200, Duration::ZERO); 3], 0.0)
            }
            Shape::Spike => {
                let tail = Behavior::Tail {
                    every: 25,
                    delay: Duration::from_millis(400),
                };
                (vec![tail; 3], 0.0)
            }
            Shape::TotalOutage => (vec![Behavior::Fixed(503, Duration::ZERO)], 1.0),
        };
        let mut upstreams = Vec::new();
        for (i, behavior) in behaviors.into_iter().enumerate() {
            let upstream = Upstream::with(0, behavior).await;
            let mut body = serde_json::json!({
                "name": service, "id": format!("{service}-{i}"), "port": upstream.port,
            });
            match policy {
                "hedge" => body["hedge"] = true.into(),
                "no hedge" | "no spike" => {}
                retry => body["retry"] = retry.into(),
            }
            let (status, reply) = put_json(&c.nodes[5].socket, "/v1/services", &body)
                .await
                .expect("register");
            assert_eq!(status, 200, "{reply}");
            upstreams.push(upstream);
        }
        let count = upstreams.len();
        for node in &c.nodes {
            wait_for(Duration::from_secs(10), "instances listed", || async {
                (instance_ids(&node.socket, service).await?.len() == count).then_some(())
            })
            .await;
        }
        out.push(Deployed {
            service,
            policy,
            upstreams,
            failing_share,
        });
    }
    out
}

/// Calls `d.service` from `callers` with `clients` clients each for `len`.
async fn measure(
    c: &TestCluster,
    shape: &'static str,
    d: &Deployed,
    callers: &[usize],
    clients: usize,
    rate: f64,
    len: Duration,
) -> Row {
    let hits = |d: &Deployed| d.upstreams.iter().map(Upstream::hits).sum::<u64>();
    let failed = |d: &Deployed| {
        d.upstreams
            .iter()
            .map(|u| u.failed.load(std::sync::atomic::Ordering::Relaxed))
            .sum::<u64>()
    };
    let (hits0, failed0) = (hits(d), failed(d));
    let runs: Vec<_> = callers
        .iter()
        .map(|&i| tokio::spawn(load(c.nodes[i].proxy, d.service, clients, rate, len)))
        .collect();
    let (mut requests, mut ok, mut latencies) = (0, 0, Vec::new());
    for run in runs {
        let (r, o, l) = run.await.expect("load");
        requests += r;
        ok += o;
        latencies.extend(l);
    }
    latencies.sort_by(f64::total_cmp);
    // When healthy, the failing part gets its share of the requests, once.
    let expected = requests as f64 * d.failing_share;
    let failing_load = (expected > 0.0).then(|| (failed(d) - failed0) as f64 / expected);
    if std::env::var_os("LEARN_DEBUG").is_some() {
        let text = metrics_text(c.nodes[callers[0]].admin).await;
        for line in text
            .lines()
            .filter(|l| l.contains(d.service) && !l.contains("bucket"))
        {
            eprintln!("{} {} {clients}: {line}", shape, d.policy);
        }
    }
    let observer = get(&c.nodes[4].socket, "/v1/health").await.ok();
    Row {
        shape,
        policy: d.policy,
        clients: clients * callers.len(),
        requests,
        ok,
        attempts: hits(d) - hits0,
        failing_load,
        p50_ms: pct(&latencies, 0.5),
        p99_ms: pct(&latencies, 0.99),
        observer_delay_ms: observer
            .and_then(|(_, h)| h["services"][d.service]["retry_delay_ms"].as_f64()),
    }
}

/// Runs the matrix and prints it as a Markdown table.
pub async fn run(lengths: Lengths) -> Vec<Row> {
    let mut c = TestCluster::new();
    for _ in 0..6 {
        c.add_node();
    }
    c.wait_converged(6, Duration::from_secs(30)).await;
    let epoch = Instant::now();
    let mut rows = Vec::new();
    for (name, shape) in SHAPES {
        if !lengths.only.is_empty() && !lengths.only.contains(&name) {
            continue;
        }
        let deployed = deploy(&c, name, shape, epoch).await;
        if let Shape::TotalOutage = shape {
            // Measured once the outage has lasted a budget window (10 s),
            // so the budgets' reserve is spent: the steady state.
            // Measured over a whole budget window too: 5 callers x 30/s.
            let window = Duration::from_secs(10);
            for d in &deployed {
                let callers = [0, 1, 2, 3, 4];
                measure(&c, name, d, &callers, 6, 5.0, window).await;
                rows.push(measure(&c, name, d, &callers, 6, 5.0, lengths.phase.max(window)).await);
            }
            continue;
        }
        // The learned policy learns from three callers; the others have
        // nothing to learn.
        let phase = match shape {
            Shape::Flap { period, .. } | Shape::PrivateFlap { period, .. } => {
                lengths.phase.max(Duration::from_millis(2 * period))
            }
            _ => lengths.phase,
        };
        // A private flap is learned by n1 alone, one outage a period: its
        // warm-up lasts until the learned delay is trusted (20 outages).
        let (learners, warmup) = match shape {
            Shape::PrivateFlap { period, .. } => {
                (1, lengths.warmup.max(Duration::from_millis(25 * period)))
            }
            _ => (3, lengths.warmup),
        };
        if let Some(learned) = deployed
            .iter()
            .find(|d| d.policy == "learned" || d.policy == "hedge")
        {
            let warm: Vec<_> = (0..learners)
                .map(|i| tokio::spawn(load(c.nodes[i].proxy, learned.service, 1, 0.0, warmup)))
                .collect();
            for w in warm {
                w.await.expect("warm-up");
            }
        }
        for d in &deployed {
            if let Shape::PrivateFlap { .. } = shape {
                for clients in [1, 4, 16] {
                    rows.push(measure(&c, name, d, &[0], clients, 0.0, phase).await);
                }
                continue;
            }
            rows.push(measure(&c, name, d, &[0], 1, 0.0, phase).await);
            rows.push(
                measure(
                    &c,
                    name,
                    d,
                    &[0],
                    lengths.concurrent,
                    lengths.rate_per_client,
                    phase,
                )
                .await,
            );
        }
    }
    print_table(&rows, &lengths);
    rows
}

fn print_table(rows: &[Row], lengths: &Lengths) {
    let cells: Vec<(&Row, Cells)> = rows.iter().map(|r| (r, r.cells())).collect();
    print_cells(&cells, lengths, "one run");
}

/// Prints, for every row, the median of each column over `runs` (runs of
/// the same lengths list the same rows in the same order).
pub fn print_medians(runs: &[Vec<Row>], lengths: &Lengths) {
    let Some(first) = runs.first() else { return };
    let cells: Vec<(&Row, Cells)> = first
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let all: Vec<Cells> = runs
                .iter()
                .filter_map(|r| r.get(i))
                .map(Row::cells)
                .collect();
            (row, Cells::median(&all))
        })
        .collect();
    print_cells(&cells, lengths, &format!("medians of {} runs", runs.len()));
}

fn print_cells(rows: &[(&Row, Cells)], lengths: &Lengths, what: &str) {
    println!(
        "\n# learning matrix ({what}): warm-up {} s, phases {} s; retry delay as reported by n5, which never called\n",
        lengths.warmup.as_secs(),
        lengths.phase.as_secs()
    );
    println!("| shape | policy | clients | success % | attempts/req | failing load | p50 ms | p99 ms | retry delay on n5 |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (r, c) in rows {
        println!(
            "| {} | {} | {} | {:.2} | {:.3} | {} | {:.1} | {:.1} | {} |",
            r.shape,
            r.policy,
            r.clients,
            100.0 * c.success,
            c.attempts_per_request,
            c.failing_load
                .map(|x| format!("{x:.2}x"))
                .unwrap_or_else(|| "-".into()),
            c.p50_ms,
            c.p99_ms,
            c.observer_delay_ms
                .map(|d| format!("{d:.0} ms"))
                .unwrap_or_else(|| "-".into()),
        );
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
