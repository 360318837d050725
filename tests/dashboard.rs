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
                (dom.contains("data-service=\"web\"") && shown).then_some(dom)
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
