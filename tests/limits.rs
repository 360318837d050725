//! Cluster-wide rate limits: `weft limit api 300/s`, signed by an operator
//! and spread by gossip, holds the cluster's admitted total near 300 a
//! second while three nodes ask 50, 200 and 600 a second, then the
//! reverse; the node whose demand rose gets its share within 3 s. The
//! instance is on n1: n1's callers take the local path, the others the
//! tunnel. Over the limit, 429 `weft-error: rate-limited` with
//! `Retry-After`.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;

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
/// `seconds` (an open loop) and tallies the answers by the second they were
/// sent in.
async fn open_loop_api(
    client: &PooledClient,
    proxies: &[SocketAddr],
    rates: [u64; 3],
    seconds: u64,
) -> Answers {
    let mut answers = Answers {
        tally: vec![[(0, 0); 3]; seconds as usize],
        unexpected: Vec::new(),
    };
    let patience = Duration::from_secs(30);
    for sent in open_loop(client, proxies, &rates, "api", seconds, patience).await {
        let cell = &mut answers.tally[sent.second][sent.proxy];
        match admitted(sent.answer) {
            Ok(true) => cell.0 += 1,
            Ok(false) => cell.1 += 1,
            Err(e) => answers.unexpected.push(e),
        }
    }
    answers
}

/// Admitted (200), limited (a 429 that says so and when to come back), or
/// what else it was.
fn admitted(answer: Answer) -> Result<bool, String> {
    let (status, headers) = answer?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    match status {
        200 => Ok(true),
        429 if header("weft-error") == Some("rate-limited")
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

    assert!(weft_at(&c, 0, &["limit", "api", "300/s"], false).is_err());
    let bad = weft_at(&c, 0, &["limit", "api", "300/h"], true).unwrap_err();
    assert!(bad.contains("COUNT/s"), "{bad}");
    weft_at(&c, 0, &["limit", "api", "300/s"], true).expect("limit");
    enforced_everywhere(&c, Some("300/s")).await;
    let table = weft_at(&c, 0, &["limit"], false).expect("limit");
    assert!(table.contains("api") && table.contains("300/s"), "{table}");

    let client = pooled_client();
    let proxies: Vec<SocketAddr> = c.nodes.iter().map(|n| n.proxy).collect();
    let hits_before = instance.hits();
    let first = [50, 200, 600];
    let before = open_loop_api(&client, &proxies, first, 8).await;
    print("before the swap", first, &before.tally);
    let swapped = [600, 200, 50];
    let after = open_loop_api(&client, &proxies, swapped, 8).await;
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
    weft_at(&c, 0, &["limit", "api", "--clear"], true).expect("limit --clear");
    enforced_everywhere(&c, None).await;
    let open = open_loop_api(&client, &proxies, [100, 100, 100], 2).await;
    assert!(open.unexpected.is_empty(), "{:?}", open.unexpected);
    assert_eq!(admitted_total(&open.tally, 0..2), 300.0);
}
