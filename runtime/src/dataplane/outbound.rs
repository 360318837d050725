//! The outbound proxy: apps send HTTP/1.1 or h2c here; the service is the
//! request's authority (absolute-form URI or Host header).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_gossip::Instance;

use super::{
    body, codes, end_to_end_headers, header_map, mesh_error, status_for, BoxError, DataPlane,
    ProxyBody,
};
use crate::outcome::{Outcome, OutcomeClass};
use crate::policy::retry::{self, AttemptResult};
use crate::tunnel::{self, TunnelError};
use crate::wire::{RequestHead, ResponseHead, StreamKind, WIRE_VERSION};
use bytes::Bytes;
use http_body_util::{Full, StreamBody};
use hyper::body::Frame;

/// Accepts app connections until the task is aborted.
pub async fn serve(listener: TcpListener, dp: Arc<DataPlane>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let dp = dp.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let dp = dp.clone();
                async move { Ok::<_, Infallible>(handle(dp, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "proxy connection ended with an error");
            }
        });
    }
}

/// The service a request is for: the authority's host, without port.
pub fn service_of<B>(req: &Request<B>) -> Option<String> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
            let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
            Some(host.to_string())
        })?;
    let name = authority.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

async fn handle(dp: Arc<DataPlane>, req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(service) = service_of(&req) else {
        return mesh_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "no service: send an absolute URI or a Host header naming the service",
        );
    };
    let mut instance = {
        let snap = dp.router.load();
        match dp.pick(&snap, &service, "http", &[]) {
            Ok(i) => i,
            Err(code) => {
                return mesh_error(status_for(code), code, &format!("service {service:?}"))
            }
        }
    };
    let timeout = instance
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(dp.timeouts.request);
    let deadline = Instant::now() + timeout;
    let retry_method =
        retry::method_is_idempotent(req.method().as_str()) || instance.retry_non_idempotent;
    dp.record_request();
    let (parts, body) = req.into_parts();
    let head = Head::from(&parts);
    // Bodies up to 64 KiB are kept so that an attempt can be sent again.
    let mut body = if retry_method {
        Replay::buffer(body).await
    } else {
        Replay::Once(Some(body.map_err(Into::into).boxed()))
    };
    let mut tried: Vec<(String, String)> = Vec::new();
    let mut attempt: u8 = 0;
    loop {
        let key = (instance.node.clone(), instance.id.clone());
        let Some(attempt_body) = body.next() else {
            // Cannot happen: a streamed body is never retried.
            return mesh_error(
                StatusCode::BAD_GATEWAY,
                codes::UPSTREAM_UNREACHABLE,
                "body already sent",
            );
        };
        dp.started(&key);
        let start = Instant::now();
        let remaining = deadline.saturating_duration_since(start);
        let result = tokio::time::timeout(
            remaining,
            forward(
                &dp,
                &service,
                &instance,
                head.request(attempt_body),
                attempt,
            ),
        )
        .await;
        let latency = start.elapsed();
        dp.finished(&key, latency);
        let (class, status, result_kind, resp) = classify(result, timeout);
        let retryable = retry::is_retryable(result_kind);
        dp.observe_outcome(&service, &key, retryable);
        if attempt > 0 {
            let outcome = if retryable { "failure" } else { "success" };
            metrics::counter!("weft_retries_total", "service" => service.clone(), "outcome" => outcome)
                .increment(1);
        }
        // Decide whether another attempt is due before reporting this one.
        let time_left = deadline.saturating_duration_since(Instant::now());
        let verdict = if !retryable || attempt >= retry::MAX_RETRIES || time_left.is_zero() {
            Verdict::Done
        } else if !retry_method {
            Verdict::Refused("not_retryable")
        } else if body.is_streamed() {
            Verdict::Refused("not_bufferable")
        } else if !dp.try_retry() {
            Verdict::BudgetExhausted
        } else {
            Verdict::Retry
        };
        dp.outcomes.record(Outcome {
            service: service.clone(),
            node: instance.node.clone(),
            instance: instance.id.clone(),
            class,
            status,
            latency,
            attempt,
            last: verdict != Verdict::Retry,
        });
        match verdict {
            Verdict::Done => return resp,
            Verdict::Refused(why) => {
                metrics::counter!("weft_retries_total", "service" => service.clone(), "outcome" => why)
                    .increment(1);
                return resp;
            }
            Verdict::BudgetExhausted => {
                metrics::counter!("weft_retries_total", "service" => service.clone(), "outcome" => "budget_exhausted")
                    .increment(1);
                metrics::counter!("weft_retry_budget_exhausted_total", "service" => service.clone())
                    .increment(1);
                return mesh_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    codes::RETRY_BUDGET_EXHAUSTED,
                    &format!(
                        "attempt failed ({}) and the retry budget is spent",
                        status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| class.as_str().to_string())
                    ),
                );
            }
            Verdict::Retry => {}
        }
        tried.push(key);
        let next = {
            let snap = dp.router.load();
            dp.pick(&snap, &service, "http", &tried)
        };
        let Ok(next) = next else { return resp };
        drop(resp);
        attempt += 1;
        // Another instance: go now. The same one again: wait as long as this
        // service usually takes to recover (or Envoy's backoff, if asked).
        let same = tried.iter().any(|k| k.0 == next.node && k.1 == next.id);
        if same {
            let wait = dp.retry_wait(&service, next.retry.as_deref(), attempt);
            let wait = wait.min(deadline.saturating_duration_since(Instant::now()));
            tokio::time::sleep(wait).await;
        }
        instance = next;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Done,
    Retry,
    Refused(&'static str),
    BudgetExhausted,
}

type AttemptOutput = Result<Result<Response<ProxyBody>, Failure>, tokio::time::error::Elapsed>;

/// Turns an attempt into (class, status, retry input, response for the app).
fn classify(
    result: AttemptOutput,
    timeout: Duration,
) -> (
    OutcomeClass,
    Option<u16>,
    AttemptResult,
    Response<ProxyBody>,
) {
    match result {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            (
                OutcomeClass::from_status(status),
                Some(status),
                AttemptResult::Response(status),
                resp,
            )
        }
        Ok(Err(Failure::Remote(code, detail))) => {
            let (class, kind) = if code == codes::UPSTREAM_TIMEOUT {
                (OutcomeClass::Timeout, AttemptResult::Timeout)
            } else {
                (OutcomeClass::Unreachable, AttemptResult::ConnectFailed)
            };
            (
                class,
                None,
                kind,
                mesh_error(status_for(&code), &code, &detail),
            )
        }
        Ok(Err(Failure::Unreachable(detail))) => (
            OutcomeClass::Unreachable,
            None,
            AttemptResult::ConnectFailed,
            mesh_error(
                StatusCode::BAD_GATEWAY,
                codes::UPSTREAM_UNREACHABLE,
                &detail,
            ),
        ),
        Err(_) => (
            OutcomeClass::Timeout,
            None,
            AttemptResult::Timeout,
            mesh_error(
                StatusCode::GATEWAY_TIMEOUT,
                codes::UPSTREAM_TIMEOUT,
                &format!("no response within {timeout:?}"),
            ),
        ),
    }
}

/// The parts of a request needed to send it again.
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Head {
    fn from(parts: &http::request::Parts) -> Self {
        Head {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
        }
    }

    fn request(&self, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// A request body that can be sent again (buffered) or only once (streamed).
enum Replay {
    Buffered(Bytes),
    Once(Option<ProxyBody>),
}

impl Replay {
    /// Reads up to [`retry::MAX_BUFFERED_BODY`]; a larger body streams once,
    /// with what was read put back in front.
    async fn buffer(mut body: Incoming) -> Replay {
        use hyper::body::Body as _;
        if body.is_end_stream() {
            return Replay::Buffered(Bytes::new());
        }
        if body.size_hint().lower() > retry::MAX_BUFFERED_BODY as u64 {
            return Replay::Once(Some(body.map_err(Into::into).boxed()));
        }
        let mut read: Vec<Bytes> = Vec::new();
        let mut total = 0usize;
        loop {
            match body.frame().await {
                None => {
                    let mut all = bytes::BytesMut::with_capacity(total);
                    for b in read {
                        all.extend_from_slice(&b);
                    }
                    return Replay::Buffered(all.freeze());
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        total += data.len();
                        read.push(data);
                        if total > retry::MAX_BUFFERED_BODY {
                            return Replay::Once(Some(prepend(read, body, None)));
                        }
                    }
                    Err(frame) => return Replay::Once(Some(prepend(read, body, Some(frame)))),
                },
                Some(Err(e)) => {
                    let err: BoxError = e.into();
                    let failed = futures::stream::iter(vec![Err::<Frame<Bytes>, BoxError>(err)]);
                    return Replay::Once(Some(StreamBody::new(failed).boxed()));
                }
            }
        }
    }

    fn is_streamed(&self) -> bool {
        matches!(self, Replay::Once(_))
    }

    fn next(&mut self) -> Option<ProxyBody> {
        match self {
            Replay::Buffered(b) => {
                Some(Full::new(b.clone()).map_err(|never| match never {}).boxed())
            }
            Replay::Once(body) => body.take(),
        }
    }
}

/// `read` chunks, then an optional non-data frame, then the rest of `body`.
fn prepend(read: Vec<Bytes>, body: Incoming, extra: Option<Frame<Bytes>>) -> ProxyBody {
    use futures::StreamExt;
    let head = read
        .into_iter()
        .map(|b| Ok::<_, BoxError>(Frame::data(b)))
        .chain(extra.map(Ok));
    let rest = http_body_util::BodyStream::new(body).map(|f| f.map_err(BoxError::from));
    BodyExt::boxed(StreamBody::new(futures::stream::iter(head).chain(rest)))
}

/// Why an attempt produced no response from the instance.
#[derive(Debug)]
pub enum Failure {
    /// The instance or its node could not be reached.
    Unreachable(String),
    /// The remote node answered with a mesh error code.
    Remote(String, String),
}

impl From<TunnelError> for Failure {
    fn from(e: TunnelError) -> Self {
        Failure::Unreachable(e.to_string())
    }
}

async fn forward(
    dp: &DataPlane,
    service: &str,
    instance: &Instance,
    req: Request<ProxyBody>,
    attempt: u8,
) -> Result<Response<ProxyBody>, Failure> {
    if instance.node == dp.node {
        return forward_local(dp, service, instance.port, req).await;
    }
    let addr: SocketAddr = instance
        .tunnel_addr
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            Failure::Unreachable(format!(
                "node {} announced no tunnel address",
                instance.node
            ))
        })?;
    let (mut send, mut recv) = dp.tunnels.open(&instance.node, addr).await?;
    let (parts, body) = req.into_parts();
    let head = RequestHead {
        version: WIRE_VERSION,
        kind: StreamKind::Http,
        service: service.to_string(),
        instance: instance.id.clone(),
        method: parts.method.as_str().to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string()),
        headers: with_host(end_to_end_headers(&parts.headers), service, &parts),
        deadline_ms: u32::try_from(dp.timeouts.request.as_millis()).unwrap_or(u32::MAX),
        attempt,
        http2: parts.version == http::Version::HTTP_2,
    };
    if hyper::body::Body::is_end_stream(&body) {
        // No body (most GETs): head, end marker and FIN in one write, no task.
        tunnel::write_head_and_end(&mut send, &head).await?;
        let _ = send.finish();
    } else {
        tunnel::write_frame(&mut send, &head).await?;
        // The request body streams while we wait for the response head.
        tokio::spawn(async move {
            if let Err(e) = body::to_tunnel(body, &mut send).await {
                tracing::debug!(error = %e, "request body to tunnel failed");
                let _ = send.reset(quinn::VarInt::from_u32(1));
                return;
            }
            let _ = send.finish();
        });
    }
    let head: ResponseHead = tunnel::read_frame(&mut recv).await?;
    if let Some(code) = head.error {
        return Err(Failure::Remote(
            code,
            format!("reported by node {}", instance.node),
        ));
    }
    let mut resp = Response::new(body::from_tunnel(recv));
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = header_map(&head.headers);
    Ok(resp)
}

/// HTTP/1.1 needs a Host; keep the app's (the service name) when the request had none.
fn with_host(
    mut headers: Vec<(String, Vec<u8>)>,
    service: &str,
    parts: &http::request::Parts,
) -> Vec<(String, Vec<u8>)> {
    if parts.version != http::Version::HTTP_2 && !headers.iter().any(|(n, _)| n == "host") {
        headers.push(("host".to_string(), service.as_bytes().to_vec()));
    }
    headers
}

/// Sends a request to an instance on this host.
pub async fn forward_local(
    dp: &DataPlane,
    service: &str,
    port: u16,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, Failure> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: http::Uri = format!("http://127.0.0.1:{port}{path}")
        .parse()
        .map_err(|e| Failure::Unreachable(format!("bad path: {e}")))?;
    let headers = header_map(&with_host(
        end_to_end_headers(&parts.headers),
        service,
        &parts,
    ));
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = if parts.version == http::Version::HTTP_2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    *out.headers_mut() = headers;
    if out.version() == http::Version::HTTP_2 {
        out.headers_mut().remove(http::header::HOST);
    }
    let client = dp.local.for_version(out.version());
    match client.request(out).await {
        Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed())),
        Err(e) => Err(Failure::Unreachable(format!("127.0.0.1:{port}: {e}"))),
    }
}
