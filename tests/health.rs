//! End-to-end health and statistics: real nodes, real checks, real traffic.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A tiny HTTP server that answers 200 on every path until dropped.
struct Upstream {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    async fn start(port: u16, status: u16) -> Upstream {
        let listener = wait_for(Duration::from_secs(5), "bind upstream", || async {
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .ok()
        })
        .await;
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the server drops them all,
            // as a dying process would.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| async move {
                        let mut resp = hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        ));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { port, task }
    }

    fn stop(self) -> u16 {
        self.task.abort();
        self.port
    }
}

async fn health_of(socket: &std::path::Path, service: &str, id: &str) -> Option<String> {
    let (_, body) = get(socket, "/v1/services").await.ok()?;
    body["services"][service]
        .as_array()?
        .iter()
        .find(|i| i["id"] == id)
        .and_then(|i| i["health"].as_str().map(String::from))
}

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
