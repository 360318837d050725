//! The admin dashboard in a real browser: headless Chromium (Debian's
//! `chromium`) loads the page of a running 3-node cluster, runs its script,
//! and the DOM it renders shows the members, a service row and a figure that
//! updates. A screenshot is saved for people to look at.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

fn chromium() -> PathBuf {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        if let Some(path) = which(name) {
            return path;
        }
    }
    panic!("no headless browser: apt-get install chromium (.ci/run does)");
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Chromium, headless, with `virtual_ms` of page time to run the script.
fn browse(url: &str, virtual_ms: u32, output: &[&str]) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,700",
            &format!("--virtual-time-budget={virtual_ms}"),
        ])
        .args(output)
        .arg(url)
        .output()
        .expect("run chromium")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_renders_the_cluster_in_a_browser() {
    let c = TestCluster::start(3).await;
    let up = Upstream::start(0, 200).await;
    register_everywhere(&c, 1, "web", up.port, "http").await;
    for _ in 0..20 {
        assert_eq!(proxy_get(c.nodes[0].proxy, "web").await, 200);
    }
    // A rollout (waiting: no instance carries its tags) and a limit.
    let rollout = ["rollout", "web", "--from", "v1", "--to", "v2"];
    weft_at(&c, 0, &rollout, true).expect("rollout");
    weft_at(&c, 0, &["limit", "web", "300/s"], true).expect("limit");
    let url = format!("http://{}/", c.nodes[0].admin);
    // The page is HTML, built into the binary, with no outside resource.
    let page = Command::new("curl").args(["-sf", &url]).output().unwrap();
    let html = String::from_utf8_lossy(&page.stdout);
    assert!(html.contains("<title>weft dashboard</title>"), "{html}");
    for outside in [" src=", "<link", "@import", "url("] {
        assert!(
            !html.contains(outside),
            "the page loads something ({outside})"
        );
    }

    let dom = wait_for(
        Duration::from_secs(30),
        "the dashboard shows web's traffic",
        || {
            let url = url.clone();
            async move {
                let out = tokio::task::spawn_blocking(move || browse(&url, 4000, &["--dump-dom"]))
                    .await
                    .ok()?;
                let dom = String::from_utf8_lossy(&out.stdout).into_owned();
                // The row, with the cluster-wide rate already merged in.
                let rps = dom.split("data-field=\"rps\">").nth(1)?;
                let shown = rps.starts_with(|c: char| c.is_ascii_digit());
                let traffic =
                    dom.contains("data-rollout=\"web\"") && dom.contains("data-limit=\"web\"");
                (dom.contains("data-service=\"web\"") && shown && traffic).then_some(dom)
            }
        },
    )
    .await;
    for member in ["n1", "n2", "n3"] {
        assert!(
            dom.contains(&format!("data-member=\"{member}\"")),
            "member {member} missing:\n{dom}"
        );
    }
    assert!(dom.contains("<b id=\"node\">n1</b>"), "{dom}");
    // Live: the page refreshed itself more than once in 4 s of page time.
    let refreshes: u32 = dom
        .split("id=\"refreshes\">")
        .nth(1)
        .and_then(|rest| rest.split('<').next())
        .and_then(|n| n.parse().ok())
        .expect("a refresh counter");
    assert!(refreshes >= 2, "the page did not refresh: {refreshes}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let out = browse(&url, 3000, &[&format!("--screenshot={}", shot.display())]);
    assert!(out.status.success(), "{out:?}");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot of {size} bytes");
    eprintln!("dashboard screenshot: {}", shot.display());
}

/// The segment of `dom` that draws the edge `caller/service`, if drawn.
fn drawn_edge<'a>(dom: &'a str, caller: &str, service: &str) -> Option<&'a str> {
    let start = dom.find(&format!("data-edge=\"{caller}/{service}\""))?;
    let rest = &dom[start..];
    Some(&rest[..rest.find("</g>")?])
}

/// The service graph: services as boxes, each edge an arrow coloured by its
/// success; an edge whose service goes away turns red.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_draws_the_edges_and_a_failing_one_turns_red() {
    let c = TestCluster::start(2).await;
    let pay = Upstream::start(0, 200).await;
    let (status, reply) = put_json(
        &c.nodes[0].socket,
        "/v1/services",
        &serde_json::json!({"name": "shop", "port": 9, "outbound": true}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{reply}");
    let shop: std::net::SocketAddr = reply["outbound"].as_str().unwrap().parse().unwrap();
    register_everywhere(&c, 1, "pay", pay.port, "http").await;
    wait_for(Duration::from_secs(10), "n2 sees shop", || async {
        instance_ids(&c.nodes[1].socket, "shop")
            .await
            .filter(|ids| !ids.is_empty())
    })
    .await;
    let url = format!("http://{}/", c.nodes[0].admin);
    let edge_class = |want: &'static str| {
        let url = url.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || browse(&url, 3000, &["--dump-dom"]))
                .await
                .ok()?;
            let dom = String::from_utf8_lossy(&out.stdout).into_owned();
            let drawn = drawn_edge(&dom, "shop", "pay")?;
            (drawn.contains(&format!("class=\"{want}\"")) && dom.contains("data-box=\"shop\""))
                .then(|| drawn.to_string())
        }
    };

    for _ in 0..10 {
        assert_eq!(proxy_get(shop, "pay").await, 200);
    }
    wait_for(Duration::from_secs(30), "shop -> pay drawn green", || {
        edge_class("good")
    })
    .await;

    // pay goes away: shop's calls fail, and the arrow turns red.
    pay.stop();
    for _ in 0..30 {
        assert_ne!(proxy_get(shop, "pay").await, 200);
    }
    let drawn = wait_for(Duration::from_secs(30), "shop -> pay drawn red", || {
        edge_class("poor")
    })
    .await;
    assert!(drawn.contains("rps"), "the arrow is labelled: {drawn}");
}
