//! Traces through the mesh, exported over OTLP to a real receiver (the
//! OpenTelemetry project's generated gRPC service, in Python): a request
//! through two nodes is one trace of the caller's and the server's spans,
//! parent and child, and the instance sees the server's span as its
//! parent; a retried request shows both attempts.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// The receiver and the spans it printed so far.
struct Receiver {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let python = python_venv("otlp", &["opentelemetry-proto==1.45.2", "grpcio==1.85.3"]);
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/clients/otlp_receiver.py");
        let mut child = Command::new(python)
            .arg(script)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the OTLP receiver");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).expect("the receiver's port");
        let port = first
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .expect("listening PORT");
        let spans = json_lines(out);
        Receiver { child, port, spans }
    }

    /// The spans of `trace`, once there are `n` of them.
    async fn trace(&self, trace: &str, n: usize) -> Vec<Value> {
        wait_for(
            Duration::from_secs(20),
            &format!("{n} spans of {trace}"),
            || async {
                let spans: Vec<Value> = self
                    .spans
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|s| s["trace_id"] == trace)
                    .cloned()
                    .collect();
                (spans.len() >= n).then_some(spans)
            },
        )
        .await
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An instance that remembers each request's `traceparent` by path, and
/// answers 503 to the first request for `/fail-once`.
async fn instance() -> (u16, Arc<Mutex<HashMap<String, Vec<String>>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<HashMap<String, Vec<String>>>> = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<_>| {
                    let record = record.clone();
                    async move {
                        let parent = req
                            .headers()
                            .get("traceparent")
                            .map(|v| v.to_str().unwrap().to_string())
                            .unwrap_or_default();
                        let path = req.uri().path().to_string();
                        let mut seen = record.lock().unwrap();
                        let earlier = seen.entry(path.clone()).or_default();
                        earlier.push(parent);
                        let status = if path == "/fail-once" && earlier.len() == 1 {
                            503
                        } else {
                            200
                        };
                        let mut resp = hyper::Response::new(Full::new(Bytes::from_static(b"ok")));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

/// GET `path` of `service` through `proxy`, with `traceparent` if given.
async fn call(
    proxy: std::net::SocketAddr,
    service: &str,
    path: &str,
    traceparent: Option<&str>,
) -> u16 {
    let stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::get(format!("http://{service}{path}"));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    resp.status().as_u16()
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    let mut found: Vec<&Value> = spans.iter().filter(|s| s["name"] == name).collect();
    found.sort_by_key(|s| s["attributes"]["weft.attempt"].as_i64());
    found
}

/// The (trace id, parent span id) of a `traceparent` value.
fn parts(traceparent: &str) -> (String, String) {
    let fields: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(fields.len(), 4, "{traceparent}");
    (fields[1].to_string(), fields[2].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_through_two_nodes_is_one_trace_and_a_retry_shows_its_attempts() {
    let receiver = Receiver::start();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let flags = ["--otlp-endpoint", &endpoint, "--trace-sampling", "1"];
    let mut c = TestCluster::new();
    c.add_node_with(&flags);
    c.add_node_with(&flags);
    c.wait_converged(2, Duration::from_secs(15)).await;
    let (port, seen) = instance().await;
    let body = json!({"name": "api", "port": port});
    let (status, reply) = put_json(&c.nodes[1].socket, "/v1/services", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    wait_for(Duration::from_secs(10), "n1 knows api", || async {
        instance_ids(&c.nodes[0].socket, "api")
            .await
            .filter(|ids| !ids.is_empty())
    })
    .await;

    // No traceparent: n1 starts the trace (sampling 1).
    assert_eq!(call(c.nodes[0].proxy, "api", "/ok", None).await, 200);
    let given = seen.lock().unwrap()["/ok"][0].clone();
    let (trace, instance_parent) = parts(&given);
    let spans = receiver.trace(&trace, 3).await;
    let request = named(&spans, "weft.request");
    let attempts = named(&spans, "weft.attempt");
    let inbound = named(&spans, "weft.inbound");
    assert_eq!(
        (request.len(), attempts.len(), inbound.len()),
        (1, 1, 1),
        "{spans:#?}"
    );
    let (request, attempt, inbound) = (request[0], attempts[0], inbound[0]);
    assert_eq!(request["parent_span_id"], "", "n1 started the trace");
    assert_eq!(request["node"], "n1");
    assert_eq!(request["kind"], "SPAN_KIND_SERVER");
    assert_eq!(attempt["parent_span_id"], request["span_id"]);
    assert_eq!(attempt["kind"], "SPAN_KIND_CLIENT");
    assert_eq!(attempt["node"], "n1");
    assert_eq!(attempt["attributes"]["weft.instance.node"], "n2");
    assert_eq!(
        inbound["parent_span_id"], attempt["span_id"],
        "server span is the attempt's child"
    );
    assert_eq!(inbound["node"], "n2");
    assert_eq!(inbound["kind"], "SPAN_KIND_SERVER");
    assert_eq!(
        inbound["span_id"], instance_parent,
        "the instance's parent is n2's span"
    );
    for span in [request, attempt, inbound] {
        assert_eq!(span["attributes"]["weft.service"], "api");
        assert_eq!(span["attributes"]["weft.caller"], "-");
        assert_eq!(span["attributes"]["http.response.status_code"], 200);
    }

    // The local path: an instance on n1 itself. The request and its attempt
    // are n1's spans; the instance's parent is the attempt.
    let (near_port, near_seen) = instance().await;
    let body = json!({"name": "near", "port": near_port});
    let (status, reply) = put_json(&c.nodes[0].socket, "/v1/services", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
    wait_for(Duration::from_secs(10), "n1 routes to near", || async {
        instance_ids(&c.nodes[0].socket, "near")
            .await
            .filter(|ids| !ids.is_empty())
    })
    .await;
    assert_eq!(call(c.nodes[0].proxy, "near", "/ok", None).await, 200);
    let given = near_seen.lock().unwrap()["/ok"][0].clone();
    let (trace, instance_parent) = parts(&given);
    let spans = receiver.trace(&trace, 2).await;
    let request = named(&spans, "weft.request");
    let attempts = named(&spans, "weft.attempt");
    assert_eq!(
        (spans.len(), request.len(), attempts.len()),
        (2, 1, 1),
        "{spans:#?}"
    );
    assert_eq!(attempts[0]["parent_span_id"], request[0]["span_id"]);
    assert_eq!(
        attempts[0]["span_id"], instance_parent,
        "the instance's parent is the attempt"
    );
    assert_eq!(attempts[0]["attributes"]["weft.instance.node"], "n1");

    // An app's own sampled trace, retried once: two attempts under the
    // request, each with n2's span under it.
    let app_trace = "0af7651916cd43dd8448eb211c80319c";
    let app_span = "b7ad6b7169203331";
    let traceparent = format!("00-{app_trace}-{app_span}-01");
    assert_eq!(
        call(c.nodes[0].proxy, "api", "/fail-once", Some(&traceparent)).await,
        200
    );
    let spans = receiver.trace(app_trace, 5).await;
    let request = named(&spans, "weft.request");
    let attempts = named(&spans, "weft.attempt");
    let inbound = named(&spans, "weft.inbound");
    assert_eq!(
        (request.len(), attempts.len(), inbound.len()),
        (1, 2, 2),
        "{spans:#?}"
    );
    assert_eq!(
        request[0]["parent_span_id"], app_span,
        "the app's span is the parent"
    );
    assert_eq!(request[0]["attributes"]["weft.attempts"], 2);
    let statuses: Vec<&Value> = attempts
        .iter()
        .map(|a| &a["attributes"]["http.response.status_code"])
        .collect();
    assert_eq!(statuses, [503, 200]);
    assert_eq!(attempts[0]["attributes"]["weft.attempt"], 0);
    assert_eq!(attempts[1]["attributes"]["weft.attempt"], 1);
    assert_eq!(attempts[0]["status_code"], "STATUS_CODE_ERROR");
    for (attempt, server) in attempts.iter().zip(&inbound) {
        assert_eq!(attempt["parent_span_id"], request[0]["span_id"]);
        assert_eq!(server["parent_span_id"], attempt["span_id"]);
    }
    let given = seen.lock().unwrap()["/fail-once"].clone();
    assert_eq!(given.len(), 2);
    for (tp, server) in given.iter().zip(&inbound) {
        let (trace, parent) = parts(tp);
        assert_eq!(trace, app_trace, "the app's trace goes on");
        assert_eq!(server["span_id"], parent);
    }
}
