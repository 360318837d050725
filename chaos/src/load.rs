//! The load generator: open loop at a fixed rate through one node's proxy,
//! recording every request's outcome and latency.
//!
//! Open loop means request `k` is due at `start + k / rps` whether or not
//! earlier ones have answered, and its latency is measured from when it was
//! due, so a stall shows up in the numbers instead of slowing the load down
//! (no coordinated omission).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::scenario::LoadSpec;

/// Requests in flight above which new ones are recorded as not sent.
const MAX_IN_FLIGHT: usize = 8_192;

/// One request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Record {
    /// When it was due, in seconds after the load started.
    pub t: f64,
    /// From due to fully answered (or failed), in milliseconds.
    pub latency_ms: f64,
    /// `ok`, `http <status> [<weft-error>]`, `timeout`, `error <why>` or `not-sent`.
    pub outcome: String,
    /// The answering instance (the demo service's name) on success.
    pub server: Option<String>,
    /// GET, HEAD, OPTIONS, PUT, DELETE, TRACE.
    pub idempotent: bool,
}

impl Record {
    /// A 2xx answer.
    pub fn ok(&self) -> bool {
        self.outcome == "ok"
    }
}

/// Whether retrying `method` is safe (RFC 9110 section 9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Runs one stream for `duration` from `start`; returns every request, in
/// order of due time.
pub async fn run(
    spec: &LoadSpec,
    proxy: SocketAddr,
    start: Instant,
    duration: Duration,
) -> Vec<Record> {
    let method = Method::from_bytes(spec.method.as_bytes()).unwrap_or(Method::GET);
    let idempotent = is_idempotent(&method);
    let uri: http::Uri = match format!("http://{proxy}{}", spec.path).parse() {
        Ok(u) => u,
        Err(_) => return Vec::new(),
    };
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(MAX_IN_FLIGHT)
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let timeout = Duration::from_millis(spec.timeout_ms);
    let total = (f64::from(spec.rps) * duration.as_secs_f64()).round() as u64;
    let period = Duration::from_secs_f64(1.0 / f64::from(spec.rps));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (tx, mut rx) = mpsc::unbounded_channel::<Record>();
    for k in 0..total {
        let due = start + period.mul_f64(k as f64);
        tokio::time::sleep_until(due).await;
        let t = (due - start).as_secs_f64();
        if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
            let _ = tx.send(Record {
                t,
                latency_ms: 0.0,
                outcome: "not-sent".into(),
                server: None,
                idempotent,
            });
            continue;
        }
        in_flight.fetch_add(1, Ordering::Relaxed);
        let req = Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .header(http::header::HOST, spec.service.as_str())
            .body(Empty::new());
        let client = client.clone();
        let tx = tx.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let (outcome, server) = match req {
                Ok(req) => match tokio::time::timeout_at(due + timeout, call(&client, req)).await {
                    Ok(r) => r,
                    Err(_) => ("timeout".to_string(), None),
                },
                Err(e) => (format!("error {e}"), None),
            };
            in_flight.fetch_sub(1, Ordering::Relaxed);
            let _ = tx.send(Record {
                t,
                latency_ms: due.elapsed().as_secs_f64() * 1000.0,
                outcome,
                server,
                idempotent,
            });
        });
    }
    drop(tx);
    let mut records = Vec::with_capacity(total as usize);
    while let Some(r) = rx.recv().await {
        records.push(r);
    }
    records.sort_by(|a, b| a.t.total_cmp(&b.t));
    records
}

async fn call<C>(
    client: &Client<C, Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
) -> (String, Option<String>)
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = match client.request(req).await {
        Ok(r) => r,
        Err(e) => {
            let why = if e.is_connect() {
                "connect"
            } else {
                "transport"
            };
            return (format!("error {why}"), None);
        }
    };
    let status = resp.status();
    let mesh = resp
        .headers()
        .get("weft-error")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let body = match resp.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return ("error body".to_string(), None),
    };
    if status.is_success() {
        let server = (body.len() <= 128).then(|| String::from_utf8_lossy(&body).trim().to_string());
        return ("ok".to_string(), server);
    }
    let outcome = match mesh {
        Some(code) => format!("http {} {code}", status.as_u16()),
        None => format!("http {}", status.as_u16()),
    };
    (outcome, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_methods() {
        assert!(is_idempotent(&Method::GET));
        assert!(is_idempotent(&Method::PUT));
        assert!(!is_idempotent(&Method::POST));
        assert!(!is_idempotent(&Method::PATCH));
    }

    #[tokio::test]
    async fn open_loop_counts_every_request_even_without_a_server() {
        // Nothing listens on the port we just freed: every request fails fast.
        let port = crate::process::free_port().unwrap();
        let spec = LoadSpec {
            via: "n1".into(),
            service: "web".into(),
            rps: 200,
            method: "GET".into(),
            path: "/".into(),
            timeout_ms: 500,
        };
        let records = run(
            &spec,
            SocketAddr::from(([127, 0, 0, 1], port)),
            Instant::now(),
            Duration::from_millis(500),
        )
        .await;
        assert_eq!(records.len(), 100);
        assert!(records.iter().all(|r| !r.ok() && r.idempotent));
        assert!(records.windows(2).all(|w| w[0].t <= w[1].t));
    }
}
