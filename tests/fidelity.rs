//! The mesh is invisible: what an app sends and gets through weft is what it
//! would send and get direct, on the local path and across the tunnel; and
//! the mesh's own limits are reported as the mesh's, never as the
//! instance's. Clients are curl and hyper; servers are hyper and plain TCP.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A mirror upstream: answers with the request it saw as JSON (method,
/// target, version, headers, body length), and counts requests.
/// `/big-head` answers with a 70 KiB response header, `/hop` with
/// hop-by-hop response headers, `/slow` after 3 s.
async fn mirror() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async move { Ok::<_, Infallible>(reflect(req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, hits)
}

async fn reflect(req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(n, v)| (n.to_string(), json!(v.to_str().unwrap_or("?"))))
        .collect();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let seen = json!({
        "method": parts.method.as_str(),
        "target": parts.uri.to_string(),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "body_len": body.len(),
    });
    let mut resp = Response::new(Full::new(Bytes::from(seen.to_string())));
    match parts.uri.path() {
        "/big-head" => {
            resp.headers_mut()
                .insert("x-big", "b".repeat(70 * 1024).parse().unwrap());
        }
        "/hop" => {
            let h = resp.headers_mut();
            h.insert("connection", "x-hop-only".parse().unwrap());
            h.insert("x-hop-only", "1".parse().unwrap());
            h.insert("keep-alive", "timeout=5".parse().unwrap());
            h.insert("x-end-to-end", "kept".parse().unwrap());
        }
        "/slow" => tokio::time::sleep(Duration::from_secs(3)).await,
        _ => {}
    }
    resp
}

/// One request on a fresh HTTP/1.1 connection to `proxy`.
async fn call(proxy: SocketAddr, req: Request<Full<Bytes>>) -> (u16, hyper::HeaderMap, Bytes) {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

fn get(service: &str, path: &str) -> hyper::http::request::Builder {
    Request::get(path).header("host", service)
}

fn empty() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// curl through `proxy`, as an app would use it; (status, body).
fn curl(proxy: SocketAddr, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20", "-x", &format!("http://{proxy}")])
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl (apt-get install curl)");
    assert!(out.status.success(), "curl {args:?}: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

/// Two nodes; a mirror instance of `web` on n1. Paths: n2's proxy reaches
/// it through the tunnel, n1's directly.
async fn two_nodes_with_mirror() -> (TestCluster, Arc<AtomicU64>) {
    let c = TestCluster::start(2).await;
    let (port, hits) = mirror().await;
    register_everywhere(&c, 0, "web", port, "http").await;
    (c, hits)
}

fn paths(c: &TestCluster) -> [(SocketAddr, &'static str); 2] {
    [(c.nodes[1].proxy, "remote"), (c.nodes[0].proxy, "local")]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heads_up_to_64_kib_cross_and_larger_ones_are_the_mesh_s_refusal() {
    let (c, hits) = two_nodes_with_mirror().await;
    for (proxy, label) in paths(&c) {
        // A 20 KiB cookie and a 60 KiB header block both arrive whole.
        let cookie = "c".repeat(20 * 1024);
        let req = get("web", "/")
            .header("cookie", &cookie)
            .body(empty())
            .unwrap();
        let (status, _, body) = call(proxy, req).await;
        assert_eq!(status, 200, "{label}");
        let seen: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            seen["headers"]["cookie"].as_str().unwrap().len(),
            cookie.len()
        );
        let mut req = get("web", "/");
        for i in 0..6 {
            req = req.header(format!("x-block-{i}"), "v".repeat(10 * 1024));
        }
        let (status, _, _) = call(proxy, req.body(empty()).unwrap()).await;
        assert_eq!(status, 200, "{label}: a 60 KiB head is within the limit");

        // Over 64 KiB: 431 from the mesh before any instance is picked.
        let before = hits.load(Ordering::Relaxed);
        let req = get("web", "/")
            .header("cookie", "c".repeat(70 * 1024))
            .body(empty())
            .unwrap();
        let (status, headers, _) = call(proxy, req).await;
        assert_eq!(status, 431, "{label}");
        assert_eq!(
            headers["weft-error"], "request-headers-too-large",
            "{label}"
        );
        assert_eq!(
            hits.load(Ordering::Relaxed),
            before,
            "{label}: the instance was called"
        );

        // A response head over 64 KiB: 502 from the mesh, sent once (GET is
        // retryable, but a limit is never retried) and never blamed on the
        // instance, however often it happens.
        for _ in 0..8 {
            let before = hits.load(Ordering::Relaxed);
            let (status, headers, _) =
                call(proxy, get("web", "/big-head").body(empty()).unwrap()).await;
            assert_eq!(status, 502, "{label}");
            assert_eq!(
                headers["weft-error"], "response-headers-too-large",
                "{label}"
            );
            assert_eq!(hits.load(Ordering::Relaxed), before + 1, "{label}: retried");
        }
        let (status, _, _) = call(proxy, get("web", "/").body(empty()).unwrap()).await;
        assert_eq!(
            status, 200,
            "{label}: the instance was ejected for the mesh's limit"
        );
    }
    // Nor do the statistics count the limit as the instance's failure.
    let socket = c.nodes[1].socket.clone();
    let rate = wait_for(Duration::from_secs(10), "n2 has statistics for web", || {
        let socket = socket.clone();
        async move {
            let (_, health) = get_json(&socket, "/v1/health").await;
            health["services"]["web"]["local"]["success_rate"].as_f64()
        }
    })
    .await;
    assert_eq!(rate, 1.0);
    let text = metrics_text(c.nodes[1].admin).await;
    assert!(
        metric_sum(
            &text,
            "weft_limit_refused_total",
            &["limit=\"request_head\""]
        ) >= 1.0
    );
    assert!(
        metric_sum(
            &text,
            "weft_limit_refused_total",
            &["limit=\"response_head\""]
        ) >= 8.0
    );
}

async fn get_json(socket: &std::path::Path, path: &str) -> (u16, Value) {
    common::get(socket, path).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_targets_methods_and_http_versions_arrive_as_sent() {
    let (c, _) = two_nodes_with_mirror().await;
    for (proxy, label) in paths(&c) {
        // Absolute-form with a query, as curl -x sends it.
        let (status, body) = curl(proxy, &["http://web/a/b?x=1&y=%20"]);
        assert_eq!(status, 200, "{label}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["target"], "/a/b?x=1&y=%20", "{label}");
        assert_eq!(seen["headers"]["host"], "web", "{label}");

        // OPTIONS * reaches the instance as OPTIONS *.
        let (status, body) = curl(
            proxy,
            &["-X", "OPTIONS", "--request-target", "*", "http://web/"],
        );
        assert_eq!(status, 200, "{label}: {body}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (seen["method"].as_str(), seen["target"].as_str()),
            (Some("OPTIONS"), Some("*")),
            "{label}"
        );

        // * with another method, and a target that is no URI path: 400.
        let (status, body) = curl(proxy, &["--request-target", "*", "http://web/"]);
        assert_eq!(status, 400, "{label}: {body}");
        assert!(body.contains("bad-request"), "{label}: {body}");

        // HTTP/1.0 clients get an answer (and the instance a request).
        let (status, body) = curl(proxy, &["--http1.0", "http://web/old"]);
        assert_eq!(status, 200, "{label}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["target"], "/old", "{label}");

        // Expect: 100-continue with a 200 KiB upload: the body arrives whole.
        let file = c.dir.path().join("upload.bin");
        std::fs::write(&file, vec![b'u'; 200 * 1024]).unwrap();
        let data = format!("@{}", file.display());
        let (status, body) = curl(
            proxy,
            &[
                "-H",
                "Expect: 100-continue",
                "--data-binary",
                &data,
                "http://web/up",
            ],
        );
        assert_eq!(status, 200, "{label}");
        let seen: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(seen["body_len"], 200 * 1024, "{label}");
        assert_eq!(seen["method"], "POST", "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_by_hop_headers_stop_at_the_mesh_on_both_paths() {
    let (c, _) = two_nodes_with_mirror().await;
    for (proxy, label) in paths(&c) {
        let req = get("web", "/hop")
            .header("connection", "keep-alive, x-private")
            .header("x-private", "secret")
            .header("keep-alive", "timeout=5")
            .header("proxy-authorization", "Basic Zm9vOmJhcg==")
            .header("te", "gzip")
            .header("x-request-id", "abc")
            .body(empty())
            .unwrap();
        let (status, headers, body) = call(proxy, req).await;
        assert_eq!(status, 200, "{label}");
        let seen: Value = serde_json::from_slice(&body).unwrap();
        let sent = seen["headers"].as_object().unwrap();
        for gone in ["x-private", "keep-alive", "proxy-authorization", "te"] {
            assert!(
                !sent.contains_key(gone),
                "{label}: the instance saw {gone}: {sent:?}"
            );
        }
        assert_eq!(sent["x-request-id"], "abc", "{label}");
        assert_eq!(sent["weft-hops"], "1", "{label}");
        // And the instance's hop-by-hop response headers stop too.
        assert!(!headers.contains_key("x-hop-only"), "{label}: {headers:?}");
        assert!(!headers.contains_key("keep-alive"), "{label}: {headers:?}");
        assert_eq!(headers["x-end-to-end"], "kept", "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loops_are_refused_at_registration_and_by_hop_count() {
    let (c, _) = two_nodes_with_mirror().await;
    let n1 = &c.nodes[0];
    // Registering the node's own ports would make the proxy call itself.
    for (port, what) in [
        (n1.proxy.port(), "proxy"),
        (n1.admin.port(), "admin"),
        (n1.tunnel.port(), "tunnel"),
    ] {
        let (status, body) = put_json(
            &n1.socket,
            "/v1/services",
            &json!({"name": "self", "port": port}),
        )
        .await
        .unwrap();
        assert_eq!(status, 400, "{what}: {body}");
        let msg = body["error"].as_str().unwrap();
        assert!(msg.contains("\"port\"") && msg.contains(what), "{msg}");
    }
    // A request that already crossed 8 hops.
    let req = get("web", "/")
        .header("weft-hops", "8")
        .body(empty())
        .unwrap();
    let (status, headers, _) = call(c.nodes[1].proxy, req).await;
    assert_eq!(status, 508);
    assert_eq!(headers["weft-error"], "loop-detected");

    // A real loop: an instance that sends every request back into the mesh,
    // to itself. The hop count ends it.
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_port = relay.local_addr().unwrap().port();
    let proxy = n1.proxy;
    let relayed = Arc::new(AtomicU64::new(0));
    let count = relayed.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = relay.accept().await else {
                return;
            };
            let count = count.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    count.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut again = Request::get("/").header("host", "loop");
                        if let Some(h) = req.headers().get("weft-hops") {
                            again = again.header("weft-hops", h);
                        }
                        let (status, headers, body) =
                            call(proxy, again.body(empty()).unwrap()).await;
                        let mut resp = Response::new(Full::new(body));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        if let Some(e) = headers.get("weft-error") {
                            resp.headers_mut().insert("weft-error", e.clone());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    register_everywhere(&c, 0, "loop", relay_port, "http").await;
    let (status, headers, _) =
        call(c.nodes[1].proxy, get("loop", "/").body(empty()).unwrap()).await;
    assert_eq!(status, 508);
    assert_eq!(headers["weft-error"], "loop-detected");
    assert_eq!(
        relayed.load(Ordering::Relaxed),
        8,
        "hops 1..=8 reached the relay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_timeout_bounds_every_path() {
    let c = TestCluster::start(2).await;
    let (port, hits) = mirror().await;
    let (status, body) = put_json(
        &c.nodes[0].socket,
        "/v1/services",
        &json!({"name": "slow", "port": port, "timeout_ms": 400}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    for node in &c.nodes {
        let socket = node.socket.clone();
        let id = id.clone();
        wait_for(Duration::from_secs(10), "slow registered", || {
            let socket = socket.clone();
            let id = id.clone();
            async move {
                instance_ids(&socket, "slow")
                    .await?
                    .contains(&id)
                    .then_some(())
            }
        })
        .await;
    }
    for (proxy, label) in paths(&c) {
        let started = Instant::now();
        let (status, headers, _) = call(proxy, get("slow", "/slow").body(empty()).unwrap()).await;
        assert_eq!(status, 504, "{label}");
        assert_eq!(headers["weft-error"], "upstream-timeout", "{label}");
        // One attempt: the deadline covers retries too, and the instance
        // needs 3 s.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{label}: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(hits.load(Ordering::Relaxed), 2, "one attempt per request");
    // The serving node got the time remaining, not a fresh 30 s: it gave up
    // on its instance itself (an inbound timeout), at the service's deadline.
    let admin = c.nodes[0].admin;
    wait_for(
        Duration::from_secs(2),
        "n1 times out its own call",
        || async move {
            let text = metrics_text(admin).await;
            let labels = [
                "direction=\"inbound\"",
                "service=\"slow\"",
                "class=\"timeout\"",
            ];
            (metric_sum(&text, "weft_requests_total", &labels) >= 1.0).then_some(())
        },
    )
    .await;
}

/// A TCP server that resets every connection after reading `first` bytes, or
/// (reader mode) reports what a read saw after the client went away.
async fn resetting_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 5];
                if s.read_exact(&mut buf).await.is_ok() && &buf == b"reset" {
                    let _ = s.set_zero_linger();
                    drop(s);
                } else {
                    let _ = s.write_all(b"bye").await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    port
}

/// A TCP server that reports how each connection ended: "fin" or "reset".
async fn observing_server() -> (u16, tokio::sync::mpsc::Receiver<&'static str>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = s.write_all(b"hello").await;
                let mut sink = Vec::new();
                let end = match s.read_to_end(&mut sink).await {
                    Ok(_) => "fin",
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
                    Err(_) => "other",
                };
                let _ = tx.send(end).await;
            });
        }
    });
    (port, rx)
}

async fn open_upstream(c: &TestCluster, on: usize, service: &str) -> SocketAddr {
    let listen: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let (status, body) = put_json(
        &c.nodes[on].socket,
        "/v1/upstreams",
        &json!({"service": service, "listen": listen.to_string()}),
    )
    .await
    .unwrap();
    // The port is bound before the API answers; no probe connection (the
    // observer would count it).
    assert_eq!(status, 200, "{body}");
    listen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_resets_arrive_as_resets_and_fins_as_fins() {
    let c = TestCluster::start(2).await;
    let reset_port = resetting_server().await;
    let (observe_port, mut ends) = observing_server().await;
    register_everywhere(&c, 0, "resetter", reset_port, "tcp").await;
    register_everywhere(&c, 0, "observer", observe_port, "tcp").await;
    for (node, label) in [(1, "remote"), (0, "local")] {
        // The instance resets: the client reads ECONNRESET, not a clean end.
        let listen = open_upstream(&c, node, "resetter").await;
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(b"reset").await.unwrap();
        let mut buf = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("bounded");
        let err = read.expect_err(&format!("{label}: a reset arrived as a FIN"));
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{label}: {err}"
        );

        // A FIN stays a FIN: the answer, then a clean end.
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.write_all(b"close").await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("bounded")
            .expect("clean end");
        assert_eq!(buf, b"bye", "{label}");

        // The client resets: the instance sees ECONNRESET.
        let listen = open_upstream(&c, node, "observer").await;
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        let mut hello = [0u8; 5];
        s.read_exact(&mut hello).await.unwrap();
        s.set_zero_linger().unwrap();
        drop(s);
        let end = tokio::time::timeout(Duration::from_secs(10), ends.recv())
            .await
            .expect("bounded");
        assert_eq!(end, Some("reset"), "{label}");
        // The client half-closes: the instance sees a FIN.
        let mut s = tokio::net::TcpStream::connect(listen).await.unwrap();
        s.read_exact(&mut hello).await.unwrap();
        s.shutdown().await.unwrap();
        let end = tokio::time::timeout(Duration::from_secs(10), ends.recv())
            .await
            .expect("bounded");
        assert_eq!(end, Some("fin"), "{label}");
    }
}

/// `weft_requests_total` of service web in `direction` on the node at
/// `admin`, once it has reached `at_least` (counters lag their requests).
async fn requests_counted(admin: SocketAddr, direction: &'static str, at_least: f64) -> f64 {
    let label = format!("direction=\"{direction}\"");
    wait_for(
        Duration::from_secs(10),
        "the node counts the requests",
        || {
            let label = label.clone();
            async move {
                let text = metrics_text(admin).await;
                let n = metric_sum(&text, "weft_requests_total", &[&label, "service=\"web\""]);
                (n >= at_least).then_some(n)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_serving_node_counts_inbound_requests() {
    let (c, _) = two_nodes_with_mirror().await;
    for _ in 0..5 {
        let (status, _, _) = call(c.nodes[1].proxy, get("web", "/").body(empty()).unwrap()).await;
        assert_eq!(status, 200);
    }
    let admin = c.nodes[0].admin;
    assert_eq!(requests_counted(admin, "inbound", 5.0).await, 5.0);
    // The caller counts them as outbound (its stats aggregator takes
    // outcomes in batches); the server does not double them.
    assert_eq!(
        requests_counted(c.nodes[1].admin, "outbound", 5.0).await,
        5.0
    );
    let text = metrics_text(admin).await;
    assert_eq!(
        metric_sum(
            &text,
            "weft_requests_total",
            &["direction=\"outbound\"", "service=\"web\""]
        ),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listeners_cap_connections_and_time_out_slow_heads() {
    let mut c = TestCluster::new();
    c.add_node_with(&["--max-connections", "2"]);
    c.wait_converged(1, Duration::from_secs(15)).await;
    let proxy = c.nodes[0].proxy;
    // Two connections held open; a third is closed at once, and counted.
    let held1 = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let held2 = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let admin = c.nodes[0].admin;
    let mut third = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let _ = third
        .write_all(b"GET / HTTP/1.1\r\nhost: web\r\n\r\n")
        .await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .expect("the third connection is closed");
    assert!(
        read.is_err() || buf.is_empty(),
        "served over the cap: {buf:?}"
    );
    wait_for(
        Duration::from_secs(5),
        "the refusal is counted",
        || async move {
            let text = metrics_text(admin).await;
            (metric_sum(
                &text,
                "weft_limit_refused_total",
                &["limit=\"proxy_connections\""],
            ) >= 1.0)
                .then_some(())
        },
    )
    .await;
    // A freed slot serves again.
    drop(held1);
    let (status, headers) = wait_for(Duration::from_secs(5), "a slot frees", || async move {
        let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        let resp = sender
            .send_request(get("nosuch", "/").body(empty()).unwrap())
            .await
            .ok()?;
        Some((resp.status().as_u16(), resp.headers().clone()))
    })
    .await;
    assert_eq!(
        (status, &headers["weft-error"]),
        (
            503,
            &"unknown-service"
                .parse::<hyper::header::HeaderValue>()
                .unwrap()
        )
    );
    // A connection that never finishes its head is closed by the header
    // read timeout (10 s), not held forever.
    drop(held2);
    let mut slow = tokio::net::TcpStream::connect(proxy).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok(),
        "a half-sent head held its connection for 30 s"
    );
}

/// A request is from the service whose outbound port it entered, or from
/// the anonymous caller `-` through the shared proxy; the instance is told
/// the caller and the calling node, and what the app wrote under those
/// names never arrives. Local and remote paths alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_caller_is_known_from_where_a_request_entered() {
    let (c, _) = two_nodes_with_mirror().await;
    let mut outbound = Vec::new();
    for node in &c.nodes {
        let body = json!({"name": "checkout", "port": 9, "outbound": true});
        let (status, reply) = common::put_json(&node.socket, "/v1/services", &body)
            .await
            .unwrap();
        assert_eq!(status, 200, "{reply}");
        let at: SocketAddr = reply["outbound"].as_str().unwrap().parse().unwrap();
        assert!(at.ip().is_loopback() && at.port() != 0, "{reply}");
        outbound.push(at);
    }
    // web's node believes n2's checkout once it has heard of it.
    wait_for(
        Duration::from_secs(10),
        "n1 sees checkout on n2",
        || async {
            let ids = instance_ids(&c.nodes[0].socket, "checkout").await?;
            (ids.len() == 2).then_some(())
        },
    )
    .await;

    let n1_proxy = c.nodes[0].proxy;
    let n2_proxy = c.nodes[1].proxy;
    let cases = [
        (outbound[1], "checkout", "n2", "remote, checkout's port"),
        (outbound[0], "checkout", "n1", "local, checkout's port"),
        (n2_proxy, "-", "n2", "remote, shared proxy"),
        (n1_proxy, "-", "n1", "local, shared proxy"),
    ];
    for (port, caller, node, label) in cases {
        let req = get("web", "/who")
            .header("weft-caller", "admin")
            .header("weft-caller-node", "vault")
            .body(empty())
            .unwrap();
        let (status, _, body) = call(port, req).await;
        assert_eq!(status, 200, "{label}");
        let seen: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(seen["headers"]["weft-caller"], caller, "{label}: {seen}");
        assert_eq!(seen["headers"]["weft-caller-node"], node, "{label}: {seen}");
    }

    // A named upstream reaches one service, whatever the request names,
    // as the registering service's call; a TCP service is spliced.
    let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    register_everywhere(&c, 0, "db", echo_port, "tcp").await;
    let (web_at, db_at) = (free_port(), free_port());
    let body = json!({"name": "reports", "port": 9, "upstreams": [
        {"service": "web", "listen": format!("127.0.0.1:{web_at}")},
        {"service": "db", "listen": format!("127.0.0.1:{db_at}")},
    ]});
    let (status, reply) = common::put_json(&c.nodes[1].socket, "/v1/services", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply["upstreams"].as_array().map(Vec::len),
        Some(2),
        "{reply}"
    );
    wait_for(Duration::from_secs(10), "n1 sees reports", || async {
        instance_ids(&c.nodes[0].socket, "reports")
            .await
            .filter(|ids| !ids.is_empty())
    })
    .await;
    let web_port: SocketAddr = format!("127.0.0.1:{web_at}").parse().unwrap();
    let (status, _, body) = call(web_port, get("localhost", "/named").body(empty()).unwrap()).await;
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["headers"]["weft-caller"], "reports", "{seen}");
    assert_eq!(seen["target"], "/named", "{seen}");
    let mut db = tokio::net::TcpStream::connect(("127.0.0.1", db_at))
        .await
        .unwrap();
    db.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    db.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");

    // Both ends count each edge: n2 sent web one request as checkout and
    // one as `-`, and n1 served both (its own callers' went straight to
    // the instance, not through the tunnel).
    let edge = |text: &str, caller: &str, direction: &str| {
        metric_sum(
            text,
            "weft_requests_total",
            &[
                "service=\"web\"",
                &format!("caller=\"{caller}\""),
                &format!("direction=\"{direction}\""),
            ],
        )
    };
    let (n1_admin, n2_admin) = (c.nodes[0].admin, c.nodes[1].admin);
    let text = wait_for(Duration::from_secs(5), "n2 counts its edges", || async {
        let text = metrics_text(n2_admin).await;
        (edge(&text, "checkout", "outbound") >= 1.0 && edge(&text, "-", "outbound") >= 1.0)
            .then_some(text)
    })
    .await;
    assert_eq!(edge(&text, "checkout", "outbound"), 1.0, "{text}");
    let text = metrics_text(n1_admin).await;
    assert_eq!(edge(&text, "checkout", "inbound"), 1.0, "{text}");
    assert_eq!(edge(&text, "-", "inbound"), 1.0, "{text}");

    // Deregistered, the port closes.
    let id = instance_ids(&c.nodes[1].socket, "checkout")
        .await
        .unwrap()
        .into_iter()
        .find(|id| id.contains("n2"))
        .expect("checkout on n2");
    let (status, _) = common::delete(&c.nodes[1].socket, &format!("/v1/services/{id}"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    wait_for(
        Duration::from_secs(5),
        "the outbound port closes",
        || async { tokio::net::TcpStream::connect(outbound[1]).await.err() },
    )
    .await;
}
