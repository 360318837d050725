//! Cluster-wide rate limits: `weft limit api 300/s`, signed by an operator
//! and spread by gossip, holds the cluster's admitted total near 300 a
//! second while three nodes ask 50, 200 and 600 a second, then the
//! reverse; the node whose demand rose gets its share within 3 s. The
//! instance is on n1: n1's callers take the local path, the others the
//! tunnel. Over the limit, 429 `weft-error: rate-limited` with
//! `Retry-After`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Per second of a phase and per node: (admitted, limited).
type Tally = Vec<[(u32, u32); 3]>;

/// What every answer of a phase was.
#[derive(Default)]
struct Answers {
    tally: Tally,
    /// Answers neither 200 nor a well-formed 429.
    unexpected: Vec<String>,
}

/// Sends `rates[i]` GETs a second of `api` through node i's proxy for
/// `seconds`, each on its own schedule whatever the answers take (an open
/// loop), and tallies the answers by the second they were sent in.
async fn open_loop(
    client: &HttpClient,
    proxies: &[SocketAddr],
    rates: [u64; 3],
    seconds: u64,
) -> Answers {
    let answers = Arc::new(Mutex::new(Answers {
        tally: vec![[(0, 0); 3]; seconds as usize],
        unexpected: Vec::new(),
    }));
    let start = Instant::now();
    let mut senders = Vec::new();
    for (node, rate) in rates.into_iter().enumerate() {
        let (client, proxy, answers) = (client.clone(), proxies[node], answers.clone());
        senders.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate as u32);
            let mut inflight = Vec::new();
            for _ in 0..rate * seconds {
                ticks.tick().await;
                let second = start.elapsed().as_secs().min(seconds - 1) as usize;
                let (client, answers) = (client.clone(), answers.clone());
                inflight.push(tokio::spawn(async move {
                    let answer = call(&client, proxy).await;
                    let mut answers = answers.lock().unwrap();
                    match answer {
                        Ok(true) => answers.tally[second][node].0 += 1,
                        Ok(false) => answers.tally[second][node].1 += 1,
                        Err(e) => answers.unexpected.push(e),
                    }
                }));
            }
            for request in inflight {
                request.await.unwrap();
            }
        }));
    }
    for sender in senders {
        sender.await.unwrap();
    }
    Arc::try_unwrap(answers)
        .ok()
        .expect("every request done")
        .into_inner()
        .unwrap()
}

/// One GET of `api` through `proxy`: admitted (200), limited (a 429 that
/// says so and when to come back), or what else it was.
async fn call(client: &HttpClient, proxy: SocketAddr) -> Result<bool, String> {
    let req = hyper::Request::get(format!("http://{proxy}/"))
        .header("host", "api")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    match resp.status().as_u16() {
        200 => Ok(true),
        429 if header("weft-error").as_deref() == Some("rate-limited")
            && header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1)) =>
        {
            Ok(false)
        }
        status => Err(format!(
            "{status} weft-error {:?} retry-after {:?}",
            header("weft-error"),
            header("retry-after")
        )),
    }
}

/// Admitted requests a second, all nodes together, over `seconds`.
fn admitted_total(tally: &Tally, seconds: std::ops::Range<usize>) -> f64 {
    let n = seconds.len() as f64;
    let sum: u32 = tally[seconds]
        .iter()
        .flat_map(|s| s.iter().map(|(ok, _)| ok))
        .sum();
    f64::from(sum) / n
}

/// Admitted requests a second at `node`, over `seconds`.
fn admitted_at(tally: &Tally, node: usize, seconds: std::ops::Range<usize>) -> f64 {
    let n = seconds.len() as f64;
    let sum: u32 = tally[seconds].iter().map(|s| s[node].0).sum();
    f64::from(sum) / n
}

fn print(name: &str, rates: [u64; 3], tally: &Tally) {
    eprintln!("{name}: asked {rates:?} a second; admitted (limited) per second:");
    for (second, nodes) in tally.iter().enumerate() {
        let cells: Vec<String> = nodes
            .iter()
            .map(|(ok, limited)| format!("{ok:>4} ({limited:>4})"))
            .collect();
        let total: u32 = nodes.iter().map(|(ok, _)| ok).sum();
        eprintln!("  {second:>2}s  {}  total {total}", cells.join("  "));
    }
}

/// Runs `weft limit ARGS` against n1, signed when `signed`.
fn limit(c: &TestCluster, args: &[&str], signed: bool) -> std::process::Output {
    let (cert, key) = operator(c);
    let mut cmd = std::process::Command::new(weft_bin());
    cmd.arg("--socket")
        .arg(&c.nodes[0].socket)
        .arg("limit")
        .args(args);
    if signed {
        cmd.arg("--operator-cert")
            .arg(&cert)
            .arg("--operator-key")
            .arg(&key);
    }
    cmd.output().expect("weft limit")
}

/// Waits until every node enforces `rate` for api (`None`: no limit).
async fn enforced_everywhere(c: &TestCluster, rate: Option<&str>) {
    for node in &c.nodes {
        wait_for(
            Duration::from_secs(10),
            &format!("{} enforces {rate:?}", node.name),
            || async {
                let (_, body) = get(&node.socket, "/v1/health").await.ok()?;
                let limits = body["limits"].as_array()?;
                let held = limits.first().and_then(|l| l["rate"].as_str());
                (held == rate).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_admits_its_limit_and_shares_follow_demand() {
    let c = TestCluster::start(3).await;
    let instance = Upstream::start(0, 200).await;
    register_everywhere(&c, 0, "api", instance.port, "http").await;

    assert!(!limit(&c, &["api", "300/s"], false).status.success());
    let bad = limit(&c, &["api", "300/h"], true);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("COUNT/s"));
    let out = limit(&c, &["api", "300/s"], true);
    assert!(out.status.success(), "{out:?}");
    enforced_everywhere(&c, Some("300/s")).await;
    let listed = limit(&c, &[], false);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.contains("api") && table.contains("300/s"), "{table}");

    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build_http();
    let proxies: Vec<SocketAddr> = c.nodes.iter().map(|n| n.proxy).collect();
    let hits_before = instance.hits();
    let first = [50, 200, 600];
    let before = open_loop(&client, &proxies, first, 8).await;
    print("before the swap", first, &before.tally);
    let swapped = [600, 200, 50];
    let after = open_loop(&client, &proxies, swapped, 8).await;
    print("after it", swapped, &after.tally);

    for (name, answers) in [("before the swap", &before), ("after it", &after)] {
        assert!(
            answers.unexpected.is_empty(),
            "{name}: {:?}",
            &answers.unexpected[..answers.unexpected.len().min(5)]
        );
        // The first seconds are the shares settling (and, after the
        // swap, following the new demand).
        let total = admitted_total(&answers.tally, 3..8);
        assert!(
            (270.0..=330.0).contains(&total),
            "{name}: the cluster admitted {total:.0}/s against 300/s"
        );
    }
    // n1 asked 12x more after the swap: from its third second on it has
    // its share, 600 of the 850 asked: 212/s.
    let n1 = admitted_at(&after.tally, 0, 3..8);
    assert!(
        (180.0..=245.0).contains(&n1),
        "n1 admitted {n1:.0}/s after its demand rose (its share: 212/s)"
    );
    let admitted: u32 = [&before, &after]
        .iter()
        .flat_map(|a| a.tally.iter().flatten().map(|(ok, _)| ok))
        .sum();
    assert_eq!(
        instance.hits() - hits_before,
        u64::from(admitted),
        "every admitted request reached the instance, no limited one did"
    );
    let text = metrics_text(c.nodes[2].admin).await;
    assert!(
        metric_sum(
            &text,
            "weft_requests_rate_limited_total",
            &["service=\"api\""]
        ) > 0.0
    );
    assert!(metric_sum(&text, "weft_rate_limit_share", &["service=\"api\""]) > 0.0);

    // Cleared, nothing is limited.
    assert!(limit(&c, &["api", "--clear"], true).status.success());
    enforced_everywhere(&c, None).await;
    let open = open_loop(&client, &proxies, [100, 100, 100], 2).await;
    assert!(open.unexpected.is_empty(), "{:?}", open.unexpected);
    assert_eq!(admitted_total(&open.tally, 0..2), 300.0);
}
