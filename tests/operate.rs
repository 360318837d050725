//! Operating a node: a graceful drain on SIGTERM, SIGHUP that never stops
//! it, readable and JSON logs, the access log, and every client command run
//! against live nodes.

mod common;

use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use hyper::Method;
use serde_json::Value;

/// `weft` with `args` against node `socket`; (exit code, stdout, stderr).
fn weft_cli(socket: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(weft_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run weft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_requests_before_leaving() {
    let mut c = TestCluster::start(2).await;
    let slow = Upstream::start_slow(0, 200, Duration::from_millis(1500)).await;
    register_everywhere(&c, 0, "slow", slow.port, "http").await;
    // Requests in flight on both paths to the node that will drain: from
    // n2 across the tunnel, and from an app on n1's own host.
    let mut calls = Vec::new();
    for i in 0..16 {
        let proxy = c.nodes[if i % 2 == 0 { 1 } else { 0 }].proxy;
        calls.push(tokio::spawn(async move { proxy_get(proxy, "slow").await }));
    }
    wait_for(
        Duration::from_secs(10),
        "all 16 requests reached the instance",
        || {
            let hits = slow.hits.clone();
            async move { (hits.load(Ordering::Relaxed) == 16).then_some(()) }
        },
    )
    .await;
    c.signal(0, libc::SIGTERM);
    // Peers see it draining while the requests finish.
    let n2 = c.nodes[1].socket.clone();
    wait_for(Duration::from_secs(5), "n2 sees n1 draining", || {
        let n2 = n2.clone();
        async move { (member_state(&n2, "n1").await? == "draining").then_some(()) }
    })
    .await;
    for call in calls {
        assert_eq!(
            call.await.unwrap(),
            200,
            "a request in flight during SIGTERM failed"
        );
    }
    let status = c.wait_exit(0, Duration::from_secs(20));
    assert!(status.success(), "n1 exited with {status:?}");
    wait_for(Duration::from_secs(5), "n2 sees n1 left", || {
        let n2 = n2.clone();
        async move { (member_state(&n2, "n1").await? == "left").then_some(()) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_client_command_works_against_live_nodes() {
    let c = TestCluster::start(2).await;
    let (n1, n2) = (c.nodes[0].socket.clone(), c.nodes[1].socket.clone());
    let web = Upstream::start(0, 200).await;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_port = tcp.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        while let Ok((mut s, _)) = tcp.accept().await {
            let _ = s.write_all(b"db says hi\n").await;
        }
    });

    // register, one per check kind; each prints the id it got.
    let port = web.port.to_string();
    let (code, out, err) = weft_cli(
        &n1,
        &["register", "web", "--port", &port, "--check-http", "/"],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("registered web-n1-{port}"));
    let tcp_port = tcp_port.to_string();
    let args = [
        "register",
        "db",
        "--port",
        &tcp_port,
        "--protocol",
        "tcp",
        "--check-tcp",
    ];
    let (code, _, err) = weft_cli(&n1, &args);
    assert_eq!(code, 0, "{err}");
    let args = [
        "register", "batch", "--port", "9", "--id", "batch-1", "--ttl", "30s",
    ];
    let (code, out, err) = weft_cli(&n1, &args);
    assert_eq!((code, out.trim()), (0, "registered batch-1"), "{err}");

    // services: the table and JSON, seen from the other node once gossip
    // and the checks have run.
    let web_id = format!("web-n1-{port}");
    let table = wait_for(
        Duration::from_secs(15),
        "n2 lists web passing, batch-1 and db",
        || {
            let n2 = n2.clone();
            let web_id = web_id.clone();
            async move {
                let (code, out, _) = weft_cli(&n2, &["services"]);
                let row = out.lines().find(|l| l.contains(&web_id))?.to_string();
                // Every registration of n1 has reached n2, not only web's.
                let all = out.contains("batch-1") && out.contains("db-n1-");
                (code == 0 && row.contains("passing") && all).then_some(out)
            }
        },
    )
    .await;
    assert!(table.starts_with("SERVICE"), "{table}");
    assert!(
        table.contains("batch-1") && table.contains("db-n1-"),
        "{table}"
    );
    let (code, out, _) = weft_cli(&n2, &["services", "--json"]);
    assert_eq!(code, 0);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["services"]["db"][0]["protocol"], "tcp", "{json}");

    // members: both nodes alive, in a table and in JSON.
    let (code, out, _) = weft_cli(&n1, &["members"]);
    assert_eq!(code, 0);
    assert!(
        out.lines().filter(|l| l.contains("alive")).count() == 2,
        "{out}"
    );
    let (_, out, _) = weft_cli(&n1, &["members", "--json"]);
    let json: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["members"].as_array().unwrap().len(), 2);

    // health after some traffic: the table names the service, JSON has rps.
    for _ in 0..10 {
        assert_eq!(proxy_get(c.nodes[1].proxy, "web").await, 200);
    }
    let out = wait_for(
        Duration::from_secs(10),
        "n2's health shows web's traffic",
        || {
            let n2 = n2.clone();
            async move {
                let (_, out, _) = weft_cli(&n2, &["health", "--json"]);
                let json: Value = serde_json::from_str(&out).ok()?;
                (json["services"]["web"]["rps"].as_f64()? > 0.0).then_some(())
            }
        },
    )
    .await;
    let _: () = out;
    let (code, out, _) = weft_cli(&n2, &["health"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("RETRY DELAY") && out.lines().any(|l| l.starts_with("web ")),
        "{out}"
    );

    // health --watch redraws every second on a terminal.
    let script = format!(
        "{} --socket {} health --watch",
        weft_bin().display(),
        n2.display()
    );
    let watched = Command::new("timeout")
        .args(["3.5", "script", "-qfec", &script, "/dev/null"])
        .output()
        .expect("script (bsdutils)");
    let screen = String::from_utf8_lossy(&watched.stdout);
    let redraws = screen.matches("\x1b[2J").count();
    assert!(redraws >= 3, "{redraws} redraws in 3.5 s: {screen}");
    assert!(screen.contains("web"), "{screen}");

    // upstream: a local port on n2 that reaches db on n1.
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (code, out, err) = weft_cli(&n2, &["upstream", "db", "--listen", &listen.to_string()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), format!("{listen} now reaches db"));
    let greeting = wait_for(
        Duration::from_secs(10),
        "db answers through the upstream",
        || async move {
            use tokio::io::AsyncReadExt;
            let mut s = tokio::net::TcpStream::connect(listen).await.ok()?;
            let mut buf = vec![0u8; 11];
            s.read_exact(&mut buf).await.ok()?;
            Some(buf)
        },
    )
    .await;
    assert_eq!(greeting, b"db says hi\n");

    // deregister: gone everywhere; an unknown id is the node's refusal
    // (exit 1, not 69: the node was reached).
    let (code, out, _) = weft_cli(&n1, &["deregister", "batch-1"]);
    assert_eq!((code, out.trim()), (0, "deregistered batch-1"));
    wait_for(Duration::from_secs(10), "batch-1 gone from n2", || {
        let n2 = n2.clone();
        async move {
            (!instance_ids(&n2, "batch")
                .await?
                .contains(&"batch-1".to_string()))
            .then_some(())
        }
    })
    .await;
    let (code, _, err) = weft_cli(&n1, &["deregister", "batch-1"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("batch-1"), "{err}");
}

/// The lines of a node's log that parse as JSON objects.
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn logs_access_log_and_sighup() {
    let mut c = TestCluster::new();
    c.add_node();
    let config = c.dir.path().join("n2.toml");
    std::fs::write(&config, "log_level = \"warn\"\n").unwrap();
    let access = c.dir.path().join("access.log");
    let (config_arg, access_arg) = (config.display().to_string(), access.display().to_string());
    c.add_node_with(&[
        "--config",
        &config_arg,
        "--access-log",
        &access_arg,
        "--log-format",
        "json",
    ]);
    c.wait_converged(2, Duration::from_secs(15)).await;
    let up = Upstream::start(0, 200).await;
    register_everywhere(&c, 0, "web", up.port, "http").await;

    // Readable startup lines: where the node listens, and that it joined.
    let n1_log = std::fs::read_to_string(&c.nodes[0].log).unwrap();
    assert!(
        n1_log.contains("weft node n1 ready: gossip 127.0.0.1:"),
        "{n1_log}"
    );
    let n2_log = wait_for(Duration::from_secs(10), "n2 says it joined", || {
        let path = c.nodes[1].log.clone();
        async move {
            let text = std::fs::read_to_string(path).ok()?;
            text.contains("joined the cluster: 2 members alive")
                .then_some(text)
        }
    })
    .await;
    // --log-format json: every line n2 wrote is a JSON object.
    for line in n2_log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    assert!(
        !json_lines(&n2_log).iter().any(|v| v["level"] == "DEBUG"),
        "debug lines at warn"
    );

    // The access log: one JSON line per request, with what an operator needs.
    for _ in 0..3 {
        assert_eq!(proxy_get(c.nodes[1].proxy, "web").await, 200);
    }
    assert_eq!(proxy_get(c.nodes[1].proxy, "nosuch").await, 503);
    let entries = wait_for(Duration::from_secs(5), "4 access log lines", || {
        let access = access.clone();
        async move {
            let lines = json_lines(&std::fs::read_to_string(access).ok()?);
            (lines.len() >= 4).then_some(lines)
        }
    })
    .await;
    let web = &entries[0];
    assert_eq!(web["service"], "web", "{web}");
    assert_eq!(web["status"], 200);
    assert_eq!(web["node"], "n1");
    assert_eq!(web["method"], "GET");
    assert_eq!(web["attempts"], 1);
    assert!(web["duration_ms"].as_f64().unwrap() > 0.0);
    assert!(web["time"].as_str().unwrap().ends_with('Z'));
    assert!(web["instance"].as_str().unwrap().starts_with("web-n1-"));
    assert_eq!(
        entries[3]["weft_error"], "unknown-service",
        "{}",
        entries[3]
    );

    // SIGHUP: the config file's new level applies, the access log is
    // reopened (rotated away, then written anew), and the node keeps serving.
    std::fs::write(&config, "log_level = \"debug\"\n").unwrap();
    let rotated = c.dir.path().join("access.log.1");
    std::fs::rename(&access, &rotated).unwrap();
    c.signal(1, libc::SIGHUP);
    wait_for(Duration::from_secs(10), "debug lines after SIGHUP", || {
        let path = c.nodes[1].log.clone();
        async move {
            let text = std::fs::read_to_string(path).ok()?;
            json_lines(&text)
                .iter()
                .any(|v| v["level"] == "DEBUG")
                .then_some(())
        }
    })
    .await;
    assert_eq!(proxy_get(c.nodes[1].proxy, "web").await, 200);
    let n1 = c.nodes[0].socket.clone();
    assert_eq!(member_state(&n1, "n2").await.as_deref(), Some("alive"));
    wait_for(Duration::from_secs(5), "a new access log after SIGHUP", || {
        let access = access.clone();
        async move { (json_lines(&std::fs::read_to_string(access).ok()?).len() == 1).then_some(()) }
    })
    .await;
    // A broken config file is reported and changes nothing.
    std::fs::write(&config, "log_level = 7\n").unwrap();
    c.signal(1, libc::SIGHUP);
    wait_for(Duration::from_secs(10), "n2 reports the bad file", || {
        let path = c.nodes[1].log.clone();
        async move {
            let text = std::fs::read_to_string(path).ok()?;
            text.contains("config file not reloaded").then_some(())
        }
    })
    .await;
    assert_eq!(proxy_get(c.nodes[1].proxy, "web").await, 200);
    assert!(
        c.nodes[1]
            .child
            .as_mut()
            .unwrap()
            .try_wait()
            .unwrap()
            .is_none(),
        "SIGHUP stopped the node"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_actor_is_restarted_and_the_node_keeps_serving() {
    let c = TestCluster::start(2).await;
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let upstream = Upstream::start(free_port(), 200).await;
    let (status, body) = put_json(
        &n2.socket,
        "/v1/services",
        &serde_json::json!({"name": "api", "port": upstream.port, "check": {"http": "/", "interval_ms": 100}}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    let passing = |socket: std::path::PathBuf| {
        let id = id.clone();
        async move { (health_of(&socket, "api", &id).await? == "passing").then_some(()) }
    };
    wait_for(Duration::from_secs(10), "api passing on n1", || {
        passing(n1.socket.clone())
    })
    .await;

    for (round, actor) in ["listener", "router", "health_checker", "stats_aggregator"]
        .into_iter()
        .enumerate()
    {
        for node in [n1, n2] {
            let path = format!("/v1/debug/crash/{actor}");
            let (status, body) = put_json(&node.socket, &path, &serde_json::json!({}))
                .await
                .unwrap();
            assert_eq!(status, 200, "{body}");
        }
        for node in [n1, n2] {
            wait_for(
                Duration::from_secs(10),
                &format!("{actor} restart counted"),
                || async {
                    let text = metrics_text(node.admin).await;
                    let label = format!("actor=\"{actor}\"");
                    (metric_sum(&text, "weft_actor_restarts_total", &[&label]) == 1.0).then_some(())
                },
            )
            .await;
        }
        // Traffic, gossip and health go on, and each actor still does its job.
        let requests_before = metric_sum(&metrics_text(n1.admin).await, "weft_requests_total", &[]);
        assert_eq!(
            proxy_get(n1.proxy, "api").await,
            200,
            "after crashing {actor}"
        );
        c.wait_converged(2, Duration::from_secs(10)).await;
        wait_for(Duration::from_secs(10), "api still passing", || {
            passing(n1.socket.clone())
        })
        .await;
        // A new registration is probed and routed (health checker, router).
        let other = Upstream::start(free_port(), 200).await;
        let name = format!("after-{round}");
        let (status, body) = put_json(
            &n2.socket,
            "/v1/services",
            &serde_json::json!({"name": name, "port": other.port, "check": {"tcp": true, "interval_ms": 100}}),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
        let new_id = body["id"].as_str().unwrap().to_string();
        wait_for(
            Duration::from_secs(10),
            "the new instance passes",
            || async { (health_of(&n1.socket, &name, &new_id).await? == "passing").then_some(()) },
        )
        .await;
        let (status, weft_error) = proxy_call(n1.proxy, Method::GET, &name).await;
        assert_eq!(
            status, 200,
            "after crashing {actor}: weft-error {weft_error:?}"
        );
        // Outcomes are still counted (stats aggregator), and an upstream
        // port still opens (listener).
        wait_for(
            Duration::from_secs(10),
            "outcomes still recorded",
            || async {
                let now = metric_sum(&metrics_text(n1.admin).await, "weft_requests_total", &[]);
                (now > requests_before).then_some(())
            },
        )
        .await;
        let listen = format!("127.0.0.1:{}", free_port());
        let (status, body) = put_json(
            &n1.socket,
            "/v1/upstreams",
            &serde_json::json!({"service": "api", "listen": listen}),
        )
        .await
        .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // The endpoint is the test's: off unless WEFT_TEST_FAULTS=1, never on admin.
    let (status, _) = put_json(&n1.socket, "/v1/debug/crash/nobody", &serde_json::json!({}))
        .await
        .unwrap();
    assert_eq!(status, 404);
}
