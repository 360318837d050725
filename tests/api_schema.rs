//! The API contract, checked by a tool weft did not write: schemathesis
//! (PyPI) generates requests from `docs/api.yaml` and sends them to a live
//! node, over its Unix socket (through a byte relay, since schemathesis
//! speaks TCP) and over its admin address. No answer may be a 5xx or fall
//! outside the document, and the node must still serve afterwards.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A TCP address whose connections are relayed byte for byte to `socket`.
async fn unix_relay(socket: &Path) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let socket = socket.to_path_buf();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let socket = socket.clone();
            tokio::spawn(async move {
                if let Ok(mut unix) = tokio::net::UnixStream::connect(&socket).await {
                    let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
                }
            });
        }
    });
    addr
}

/// Runs schemathesis against `url` with the document; its report.
fn schemathesis(python: &Path, url: &str) -> (bool, String) {
    let spec = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/api.yaml");
    // Its state (a cache of crashes, reports) goes to the build's temp dir,
    // not into the source tree.
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("schemathesis");
    std::fs::create_dir_all(&scratch).expect("schemathesis' scratch dir");
    let out = Command::new(python)
        .current_dir(&scratch)
        .args(["-m", "schemathesis.cli", "run"])
        .arg(&spec)
        .args(["--url", url])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            // A tap streams until the client goes: not a request-response.
            "--exclude-path",
            "/v1/tap",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            "30",
            "--seed",
            "7",
            "--workers",
            "1",
            "--request-timeout",
            "10",
            "--generation-database",
            "none",
            "--no-color",
        ])
        .output()
        .expect("run schemathesis");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

/// The JSON pointer of the schema of `method` `path`'s 200 answer in
/// `docs/api.yaml`.
fn answer_schema(path: &str, method: &str) -> String {
    format!(
        "/paths/{}/{method}/responses/200/content/application~1json/schema",
        path.replace('~', "~0").replace('/', "~1")
    )
}

/// Checks that `weft ARGS --json` matches the schema at `pointer` in
/// `docs/api.yaml`.
fn cli_output_matches(python: &Path, socket: &Path, args: &[&str], pointer: &str) {
    let out = Command::new(weft_bin())
        .arg("--socket")
        .arg(socket)
        .args(args)
        .arg("--json")
        .output()
        .expect("run weft");
    assert!(out.status.success(), "weft {args:?}: {out:?}");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let verdict = run_with_input(
        Command::new(python)
            .arg(root.join("tests/clients/check_schema.py"))
            .arg(root.join("docs/api.yaml"))
            .arg(pointer),
        &out.stdout,
    );
    assert!(
        verdict.status.success(),
        "weft {args:?} --json does not match {pointer}:\n{}\n{}",
        String::from_utf8_lossy(&verdict.stdout),
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_requests_get_no_server_error_and_only_documented_answers() {
    let python = python_venv(
        "schemathesis",
        &["schemathesis==4.32.5", "jsonschema==4.26.0"],
    );
    let c = TestCluster::start(1).await;
    let node = &c.nodes[0];
    let relay = unix_relay(&node.socket).await;
    for (what, url) in [
        ("socket", format!("http://{relay}")),
        ("admin", format!("http://{}", node.admin)),
    ] {
        let (ok, report) = tokio::task::spawn_blocking({
            let python = python.clone();
            move || schemathesis(&python, &url)
        })
        .await
        .unwrap();
        assert!(ok, "schemathesis against the {what} address:\n{report}");
        eprintln!("schemathesis against the {what} address:\n{report}");
    }
    // The CLI's JSON is the API's, with a service, an upstream and some
    // traffic in it so that no list is empty.
    let instance = Upstream::start(0, 200).await;
    register_everywhere(&c, 0, "web", instance.port, "http").await;
    assert_eq!(proxy_get(node.proxy, "web").await, 200);
    let (status, _) = common::put_json(
        &node.socket,
        "/v1/upstreams",
        &serde_json::json!({"service": "web", "listen": format!("127.0.0.1:{}", free_port())}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let rollout = ["rollout", "web", "--from", "v1", "--to", "v2"];
    weft_at(&c, 0, &rollout, true).expect("rollout");
    wait_for(Duration::from_secs(5), "the rollout under way", || async {
        let (_, health) = get(&node.socket, "/v1/health").await.ok()?;
        (health["rollouts"][0]["service"] == "web").then_some(())
    })
    .await;
    let health = answer_schema("/v1/health", "get");
    for (args, pointer) in [
        (&["services"][..], answer_schema("/v1/services", "get")),
        (&["members"], answer_schema("/v1/members", "get")),
        (&["health"], health.clone()),
        (&["edges"], answer_schema("/v1/edges", "get")),
        (
            &["intentions", "list"],
            answer_schema("/v1/intentions", "get"),
        ),
        (&["route"], answer_schema("/v1/routes", "get")),
        (&["limit"], answer_schema("/v1/limits", "get")),
        (
            &["rollout", "status"],
            format!("{health}/properties/rollouts"),
        ),
        (&["keys", "list"], answer_schema("/v1/keys", "get")),
    ] {
        cli_output_matches(&python, &node.socket, args, &pointer);
    }
    // Still serving, and still whole.
    wait_for(Duration::from_secs(5), "the node answers", || async {
        let (status, body) = get(&node.socket, "/v1/members").await.ok()?;
        (status == 200 && body["members"][0]["state"] == "alive").then_some(())
    })
    .await;
    assert!(!metrics_text(node.admin).await.is_empty());
}
