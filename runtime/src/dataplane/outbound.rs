//! The outbound proxy: apps send HTTP/1.x or h2c here; the service is the
//! request's authority (absolute-form URI or Host header).
//!
//! A request passes once through: [`Forward::parse`] (target, limits, hops),
//! the attempt loop (pick, forward, classify, retry decision) and, for an
//! upgrade, the splice of the two upgraded connections.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use weft_gossip::{Instance, Protocol};

use super::admission::RateLimited;
use super::endpoints::Endpoint;
use super::error::{MeshError, WEFT_ERROR};
use super::hedge;
use super::limits::accept_each;
use super::local::{LocalFailure, H2_MAX_HEADER_LIST};
use super::request::{header_map, Entrance, Forward};
use super::spans::RequestSpans;
use super::splice::splice;
use super::{
    body, BoxError, ConnectionLimit, DataPlane, Limit, ProxyBody, RetryPolicy, TimeoutSource,
};
use crate::access_log::{rfc3339, AccessEntry};
use crate::caller;
use crate::outcome::{Outcome, OutcomeClass};
use crate::policy::attempts::{AttemptPlan, Next, Replay};
use crate::policy::concurrency::Overloaded;
use crate::policy::intentions::Decision;
use crate::policy::retry::{self, AttemptResult};
use crate::tunnel::{self, TunnelError};
use crate::wire::{ResponseHead, StreamKind};

/// Accepts app connections until the task is aborted; their requests
/// entered through `entrance` (the shared proxy port, a service's own
/// outbound port).
pub async fn serve(listener: TcpListener, dp: Arc<DataPlane>, entrance: Entrance) {
    let limit = ConnectionLimit::new(Limit::ProxyConnections, dp.limits.max_connections);
    accept_each(listener, limit, "proxy", |stream, permit| {
        tokio::spawn(serve_connection(
            dp.clone(),
            entrance.clone(),
            stream,
            permit,
        ));
    })
    .await;
}

/// Serves one app connection's HTTP/1.1 or h2c requests, holding `permit`.
pub(super) async fn serve_connection(
    dp: Arc<DataPlane>,
    entrance: Entrance,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let header_read = dp.timeouts.header_read;
    let service = service_fn(move |req| {
        let (dp, entrance) = (dp.clone(), entrance.clone());
        async move { Ok::<_, Infallible>(handle(dp, entrance, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(H2_MAX_HEADER_LIST);
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "proxy connection ended with an error");
    }
    drop(permit);
}

/// One app request, in flight until its response body ends.
async fn handle(
    dp: Arc<DataPlane>,
    entrance: Entrance,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let busy = dp.in_flight.track();
    let started = (SystemTime::now(), Instant::now());
    let method = req.method().clone();
    let (log, tap) = (dp.access.enabled(), dp.tap.on());
    let mut record = Record {
        logged: log || tap,
        ..Record::default()
    };
    let resp = proxy(&dp, &entrance, req, &mut record).await;
    if let Some(spans) = record.spans.take() {
        let instance = record.instance.clone();
        spans.end(&dp.tracer, record.attempts, record.waited, instance, &resp);
    }
    if record.logged {
        let entry = record.entry(started, &method, &entrance, &resp);
        if tap {
            dp.tap.publish(entry.clone());
        }
        if log {
            dp.access.record(entry);
        }
    }
    resp.map(|b| body::guarded(b, busy))
}

/// What is known of a request as it goes, for the access log and the tap
/// (filled in only when one of them is on: nothing is copied for them
/// otherwise) and for its trace, when sampled.
#[derive(Debug, Default)]
struct Record {
    logged: bool,
    service: Option<String>,
    path: String,
    instance: Option<(String, String)>,
    attempts: u8,
    waited: Duration,
    spans: Option<RequestSpans>,
}

impl Record {
    fn entry(
        self,
        (wall, start): (SystemTime, Instant),
        method: &http::Method,
        entrance: &Entrance,
        resp: &Response<ProxyBody>,
    ) -> AccessEntry {
        let (node, instance) = self.instance.unzip();
        AccessEntry {
            time: rfc3339(wall),
            service: self.service,
            caller: entrance.caller.as_str().to_string(),
            instance,
            node,
            method: method.to_string(),
            path: self.path,
            status: resp.status().as_u16(),
            duration_ms: start.elapsed().as_secs_f64() * 1000.0,
            attempts: self.attempts,
            retry_wait_ms: self.waited.as_secs_f64() * 1000.0,
            weft_error: resp
                .headers()
                .get(WEFT_ERROR)
                .and_then(|v| v.to_str().ok())
                .map(String::from),
        }
    }

    /// Time spent waiting for the service to recover.
    fn wait(&mut self, wait: Duration) {
        self.waited += wait;
        if let Some(spans) = &mut self.spans {
            spans.waited(wait);
        }
    }
}

async fn proxy(
    dp: &DataPlane,
    entrance: &Entrance,
    req: Request<Incoming>,
    record: &mut Record,
) -> Response<ProxyBody> {
    let (mut parts, body) = req.into_parts();
    let mut fwd = match Forward::parse(&mut parts, entrance) {
        Ok(f) => f,
        Err((error, detail)) => return refuse(error, &detail),
    };
    record.spans = dp
        .tracer
        .join(&fwd.headers)
        .map(|ctx| RequestSpans::begin(ctx, &fwd, &dp.node));
    if let Some(refused) = refusal(dp, &fwd) {
        return refused;
    }
    // Only an upgrade takes hyper's pending-upgrade handle out of the request.
    let upgrade = if fwd.upgrade {
        parts.extensions.remove::<OnUpgrade>()
    } else {
        None
    };
    if record.logged {
        record.service = Some(fwd.service.clone());
        record.path = fwd.target.path().to_string();
    }
    let endpoint = match pick_http(dp, &fwd.service, &[]) {
        Ok(e) => e,
        Err(error) => return no_instance(error, &fwd.service),
    };
    // A configured timeout bounds the whole request; a learned one each
    // attempt (retry waits come on top, inside the default).
    let (timeout, source) = dp.request_timeout(&fwd.service, endpoint.instance.timeout_ms);
    let (overall, per_attempt) = match source {
        TimeoutSource::Learned => (dp.timeouts.request, timeout),
        TimeoutSource::Configured | TimeoutSource::Default => (timeout, timeout),
    };
    let began = Instant::now();
    let may_retry = !fwd.upgrade
        && dp.retry_policy(endpoint.instance.retry) != RetryPolicy::None
        && (retry::method_is_idempotent(fwd.method.as_str())
            || endpoint.instance.retry_non_idempotent);
    dp.record_request(&fwd.service);
    // Bodies up to 64 KiB are kept so that an attempt can be sent again.
    let body = if may_retry {
        RequestBody::buffer(body).await
    } else {
        RequestBody::Once(Some(body.map_err(Into::into).boxed()))
    };
    let replay = match (may_retry, body.is_streamed()) {
        (false, _) => Replay::NotRetryable,
        (true, true) => Replay::NotBufferable,
        (true, false) => Replay::Yes,
    };
    let plan = AttemptPlan::new(began, overall, per_attempt, replay);
    let request = Attempts {
        dp,
        fwd: &mut fwd,
        timeout,
        plan,
        body,
        upgrade,
    };
    request.run(endpoint, record).await
}

/// The answer when the cluster's intentions or limits refuse a request,
/// before any instance is picked.
fn refusal(dp: &DataPlane, fwd: &Forward) -> Option<Response<ProxyBody>> {
    if let Err(denied) = dp.authorize(fwd.caller.as_str(), &fwd.service) {
        dp.outcomes
            .record(Outcome::denied(&fwd.service, &fwd.caller));
        return Some(forbidden(fwd.caller.as_str(), &fwd.service, &denied));
    }
    let limited = dp
        .admission
        .check(&fwd.service, fwd.caller.as_str())
        .err()?;
    Some(rate_limited(&limited))
}

/// A request on its way through its attempts: the IO around an
/// [`AttemptPlan`], which decides.
struct Attempts<'a> {
    dp: &'a DataPlane,
    fwd: &'a mut Forward,
    timeout: Duration,
    plan: AttemptPlan,
    body: RequestBody,
    upgrade: Option<OnUpgrade>,
}

impl Attempts<'_> {
    /// Sends the request to `endpoint`, then as the plan says, until it
    /// answers the app.
    async fn run(mut self, mut endpoint: Endpoint, record: &mut Record) -> Response<ProxyBody> {
        let dp = self.dp;
        let service = self.fwd.service.clone();
        // Arrived during an outage: wait for the recovery, then pick again.
        let retry_policy = endpoint.instance.retry;
        let held = dp
            .hold_in_outage(&service, retry_policy, self.plan.deadline())
            .await;
        if !held.is_zero() {
            record.wait(held);
            endpoint = match pick_http(dp, &service, &[]) {
                Ok(e) => e,
                Err(error) => return no_instance(error, &service),
            };
        }
        // A service under adaptive concurrency: this node's share of its limit.
        let mut slot = None;
        if endpoint.instance.adaptive_concurrency {
            match dp.admission.enter(&service) {
                Ok(admitted) => slot = Some(admitted),
                Err(over) => return overloaded(&service, self.fwd.caller.as_str(), &over),
            }
        }
        let mut tried: Vec<Endpoint> = Vec::new();
        loop {
            let attempt = self.plan.attempt();
            record.attempts = attempt + 1;
            let start = Instant::now();
            let (answered, result) = match self.send(&endpoint, start, record).await {
                Some(sent) => sent,
                // Cannot happen: a streamed body is never retried.
                None => return MeshError::UpstreamUnreachable.response("body already sent"),
            };
            let latency = start.elapsed();
            dp.finished(&endpoint, latency);
            if let Some(slot) = &mut slot {
                slot.observe(latency);
            }
            // A hedge that answered first is this attempt's instance.
            endpoint = answered;
            if record.logged || record.spans.is_some() {
                record.instance = Some(endpoint.key());
            }
            let (class, status, result_kind, resp) = match classify(result) {
                Classified::Instance(class, status, kind, resp) => (class, status, kind, resp),
                // The mesh's own limit: not the instance's doing, never retried.
                Classified::MeshLimit(resp) => return resp,
            };
            if let (Some(spans), Some(instance)) = (&mut record.spans, &record.instance) {
                spans.end_attempt(&dp.tracer, attempt, instance.clone(), &resp);
            }
            let retryable = retry::is_retryable(result_kind);
            dp.observe_outcome(&service, &endpoint, retryable);
            dp.rollouts
                .observe(&service, &endpoint, class != OutcomeClass::Success, latency);
            if attempt > 0 {
                let outcome = if retryable { "failure" } else { "success" };
                count_retry(&service, outcome);
            }
            // Decide whether another attempt is due before reporting this one.
            let next = self
                .plan
                .after(result_kind, Instant::now(), || dp.try_retry(&service));
            dp.outcomes.record(Outcome {
                service: service.clone(),
                caller: self.fwd.caller.clone(),
                class,
                status,
                latency,
                attempt,
                last: next != Next::Retry,
            });
            match next {
                Next::Respond => return resp,
                Next::Refused(why) => {
                    count_retry(&service, why);
                    return resp;
                }
                Next::BudgetExhausted => return budget_exhausted(&service, class, status),
                Next::Retry => {}
            }
            tried.push(endpoint.clone());
            let Ok(next) = pick_http(dp, &service, &tried) else {
                return resp;
            };
            drop(resp);
            // Another instance: go now. The same one again: wait as long as
            // this service usually takes to recover (or Envoy's backoff).
            let same = tried.iter().any(|t| t.same(&next));
            let policy_wait = || dp.retry_wait(&service, next.instance.retry, self.plan.attempt());
            let wait = self.plan.wait(same, policy_wait, Instant::now());
            if !wait.is_zero() {
                record.wait(wait);
                tokio::time::sleep(wait).await;
            }
            endpoint = next;
        }
    }

    /// One attempt at `endpoint` starting at `start`, raced against a hedge
    /// when the plan says so: the instance that answered and its answer
    /// (`None` when the body is gone).
    async fn send(
        &mut self,
        endpoint: &Endpoint,
        start: Instant,
        record: &mut Record,
    ) -> Option<(Endpoint, Result<Response<ProxyBody>, Failure>)> {
        let dp = self.dp;
        let attempt_body = self.body.next()?;
        dp.started(endpoint);
        if let Some(spans) = &mut record.spans {
            spans.begin_attempt(&mut self.fwd.headers);
        }
        let remaining = self.plan.window(start);
        let sent = Attempt {
            dp,
            fwd: self.fwd,
            instance: &endpoint.instance,
            remaining,
            attempt: self.plan.attempt(),
        };
        let hedge = hedge::delay(
            dp,
            &self.plan,
            &self.fwd.service,
            &endpoint.instance,
            &self.fwd.method,
        )
        .and_then(|after| self.body.next().map(|second| (after, second)));
        let answered = match hedge {
            Some((after, second_body)) => {
                let raced = hedge::race(sent, endpoint, attempt_body, second_body, after);
                match tokio::time::timeout(remaining, raced).await {
                    Ok(raced) => (raced.endpoint, raced.result),
                    Err(_) => (endpoint.clone(), Err(self.timed_out())),
                }
            }
            None => {
                let sent = sent.send(attempt_body, self.upgrade.take());
                match tokio::time::timeout(remaining, sent).await {
                    Ok(result) => (endpoint.clone(), result),
                    Err(_) => (endpoint.clone(), Err(self.timed_out())),
                }
            }
        };
        Some(answered)
    }

    fn timed_out(&self) -> Failure {
        Failure(
            MeshError::UpstreamTimeout,
            format!("no response within {:?}", self.timeout),
        )
    }
}

/// Counts a retry's fate in `weft_retries_total{service,outcome}`.
fn count_retry(service: &str, outcome: &'static str) {
    metrics::counter!("weft_retries_total", "service" => service.to_string(), "outcome" => outcome)
        .increment(1);
}

/// The answer when an attempt failed, a retry was due and the service's
/// retry budget is spent (counted).
fn budget_exhausted(
    service: &str,
    class: OutcomeClass,
    status: Option<u16>,
) -> Response<ProxyBody> {
    count_retry(service, "budget_exhausted");
    metrics::counter!("weft_retry_budget_exhausted_total", "service" => service.to_string())
        .increment(1);
    let what = status.map_or_else(|| class.as_str().to_string(), |s| s.to_string());
    MeshError::RetryBudgetExhausted.response(&format!(
        "attempt failed ({what}) and the retry budget is spent"
    ))
}

/// An HTTP instance of `service` from the current routing table, not one
/// of `tried` when another exists, or why there is none.
pub(super) fn pick_http(
    dp: &DataPlane,
    service: &str,
    tried: &[Endpoint],
) -> Result<Endpoint, MeshError> {
    let snap = dp.router.load();
    dp.pick(&snap, service, Protocol::Http, tried)
}

/// The answer when [`pick_http`] found no instance.
fn no_instance(error: MeshError, service: &str) -> Response<ProxyBody> {
    error.response(&format!("service {service:?}"))
}

/// A call the cluster's intentions deny: 403, with the rule that decided.
pub(super) fn forbidden(caller: &str, service: &str, denied: &Decision) -> Response<ProxyBody> {
    MeshError::Forbidden.response(&format!(
        "{caller} may not call {service}: {}",
        denied.reason()
    ))
}

/// A call over the cluster's rate limit: 429 with `Retry-After` (whole
/// seconds, at least 1).
fn rate_limited(limited: &RateLimited) -> Response<ProxyBody> {
    let RateLimited { limit, over } = limited;
    let mut resp = MeshError::RateLimited.response(&format!(
        "{} is limited to {} across the cluster; this node's share is {:.1}/s now",
        limit.scope(),
        limit.rate,
        over.share
    ));
    let seconds = over.retry_after.as_secs_f64().ceil().max(1.0) as u64;
    resp.headers_mut()
        .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
    resp
}

/// A call over its service's adaptive concurrency limit: 503 at once,
/// counted in `weft_requests_overloaded_total{service,caller}`.
fn overloaded(service: &str, caller: &str, over: &Overloaded) -> Response<ProxyBody> {
    metrics::counter!("weft_requests_overloaded_total",
        "service" => service.to_string(), "caller" => caller.to_string())
    .increment(1);
    MeshError::Overloaded.response(&format!(
        "{service} has {} requests in flight from this node, its share ({:.1}) of the cluster's adaptive concurrency limit",
        over.in_flight, over.share
    ))
}

/// A request the proxy refuses before any instance is picked.
fn refuse(error: MeshError, detail: &str) -> Response<ProxyBody> {
    let limit = match error {
        MeshError::RequestHeadersTooLarge => Limit::RequestHead,
        MeshError::LoopDetected => Limit::Hops,
        _ => Limit::BadRequest,
    };
    limit.count();
    error.response(detail)
}

/// Why an attempt produced no response from the instance.
#[derive(Debug)]
pub struct Failure(pub MeshError, pub String);

impl From<TunnelError> for Failure {
    fn from(e: TunnelError) -> Self {
        Failure(MeshError::UpstreamUnreachable, e.to_string())
    }
}

impl From<LocalFailure> for Failure {
    fn from(f: LocalFailure) -> Self {
        match f {
            LocalFailure::Unreachable(detail) => Failure(MeshError::UpstreamUnreachable, detail),
            LocalFailure::Mesh(error, detail) => Failure(error, detail),
        }
    }
}

/// An attempt as the statistics and the retry rules see it.
enum Classified {
    /// The instance answered or failed: (class, status, retry input, response).
    Instance(
        OutcomeClass,
        Option<u16>,
        AttemptResult,
        Response<ProxyBody>,
    ),
    /// The mesh's own limit or protocol error.
    MeshLimit(Response<ProxyBody>),
}

fn classify(result: Result<Response<ProxyBody>, Failure>) -> Classified {
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            Classified::Instance(
                OutcomeClass::from_status(status),
                Some(status),
                AttemptResult::Response(status),
                resp,
            )
        }
        Err(Failure(error, detail)) if error.is_mesh_limit() => {
            Limit::ResponseHead.count();
            Classified::MeshLimit(error.response(&detail))
        }
        Err(Failure(error, detail)) => {
            let (class, kind) = if error == MeshError::UpstreamTimeout {
                (OutcomeClass::Timeout, AttemptResult::Timeout)
            } else {
                (OutcomeClass::Unreachable, AttemptResult::ConnectFailed)
            };
            Classified::Instance(class, None, kind, error.response(&detail))
        }
    }
}

/// One attempt of a request at one instance.
pub(super) struct Attempt<'a> {
    pub(super) dp: &'a DataPlane,
    pub(super) fwd: &'a Forward,
    pub(super) instance: &'a Instance,
    pub(super) remaining: Duration,
    pub(super) attempt: u8,
}

impl Attempt<'_> {
    pub(super) async fn send(
        &self,
        body: ProxyBody,
        upgrade: Option<OnUpgrade>,
    ) -> Result<Response<ProxyBody>, Failure> {
        if self.instance.node == self.dp.node {
            self.local(body, upgrade).await
        } else {
            self.remote(body, upgrade).await
        }
    }

    /// The instance is on this host: call it directly.
    async fn local(
        &self,
        body: ProxyBody,
        upgrade: Option<OnUpgrade>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let mut req = self.fwd.request(body);
        caller::name_node(req.headers_mut(), &self.dp.node_header);
        let mut resp = self.dp.local.call(self.instance.port, req).await?;
        if let (Some(client), StatusCode::SWITCHING_PROTOCOLS) = (upgrade, resp.status()) {
            let instance = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let (Ok(client), Ok(instance)) = (client.await, instance.await) else {
                    return;
                };
                let (mut a, mut b) = (TokioIo::new(client), TokioIo::new(instance));
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            });
        }
        Ok(resp)
    }

    /// The instance is on another node: one stream on the pooled tunnel.
    async fn remote(
        &self,
        body: ProxyBody,
        upgrade: Option<OnUpgrade>,
    ) -> Result<Response<ProxyBody>, Failure> {
        let node = &self.instance.node;
        let addr = self.instance.tunnel_addr.ok_or_else(|| {
            Failure(
                MeshError::UpstreamUnreachable,
                format!("node {node} announced no tunnel address"),
            )
        })?;
        let (mut send, mut recv) = self.dp.tunnels.open(node, addr, StreamKind::Http).await?;
        let idle = self.dp.timeouts.body_idle;
        let deadline_ms = u32::try_from(self.remaining.as_millis())
            .unwrap_or(u32::MAX)
            .max(1);
        let end_stream = hyper::body::Body::is_end_stream(&body);
        let mut head = tunnel::Batch::with_frame(&self.fwd.wire_head(
            &self.instance.id,
            deadline_ms,
            self.attempt,
            end_stream,
        ))?;
        if upgrade.is_some() {
            // After a 101 the stream carries raw bytes: any body goes first.
            if end_stream {
                head.write(&mut send).await?;
            } else {
                body::to_tunnel(body, &mut send, head, idle).await?;
            }
        } else if end_stream {
            // No body (most GETs): the head and the FIN, no task.
            head.write(&mut send).await?;
            let _ = send.finish();
            return response(node, tunnel::read_frame(&mut recv).await?, recv, idle);
        } else {
            // The request body streams while we wait for the response head;
            // what of it is ready goes with the head.
            tokio::spawn(async move {
                if let Err(e) = body::to_tunnel(body, &mut send, head, idle).await {
                    tracing::debug!(error = %e, "request body to tunnel failed");
                    let _ = send.reset(quinn::VarInt::from_u32(1));
                    return;
                }
                let _ = send.finish();
            });
            return response(node, tunnel::read_frame(&mut recv).await?, recv, idle);
        }
        let head: ResponseHead = tunnel::read_frame(&mut recv).await?;
        match upgrade {
            Some(client) if head.status == 101 && head.error.is_none() => {
                let head = ResponseHead {
                    end_stream: true,
                    ..head
                };
                let resp = response(node, head, None::<quinn::RecvStream>, idle)?;
                tokio::spawn(async move {
                    if let Ok(client) = client.await {
                        splice(TokioIo::new(client), send, recv).await;
                    }
                });
                Ok(resp)
            }
            _ => response(node, head, recv, idle),
        }
    }
}

/// The app's response from a peer's response head and the stream's body.
/// A head that ends the stream gives a body that is over before it starts,
/// so the app gets one HEADERS frame with END_STREAM, as the instance sent.
/// The body fails if it moves nothing for `idle`.
fn response(
    node: &str,
    head: ResponseHead,
    body: impl Into<Option<quinn::RecvStream>>,
    idle: Duration,
) -> Result<Response<ProxyBody>, Failure> {
    if let Some(code) = head.error {
        let error = MeshError::from_code(&code).unwrap_or(MeshError::UpstreamUnreachable);
        return Err(Failure(error, format!("reported by node {node}")));
    }
    let body = match body.into() {
        Some(recv) if !head.end_stream => body::from_tunnel(recv, idle),
        Some(recv) => {
            tunnel::close_read(recv);
            body::empty()
        }
        None => body::empty(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = header_map(head.headers);
    Ok(resp)
}

/// A request body that can be sent again (buffered) or only once (streamed).
enum RequestBody {
    Buffered(Bytes),
    Once(Option<ProxyBody>),
}

impl RequestBody {
    /// Reads up to [`retry::MAX_BUFFERED_BODY`]; a larger body streams once,
    /// with what was read put back in front.
    async fn buffer(mut body: Incoming) -> RequestBody {
        use hyper::body::Body as _;
        if body.is_end_stream() {
            return RequestBody::Buffered(Bytes::new());
        }
        if body.size_hint().lower() > retry::MAX_BUFFERED_BODY as u64 {
            return RequestBody::Once(Some(body.map_err(Into::into).boxed()));
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
                    return RequestBody::Buffered(all.freeze());
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        total += data.len();
                        read.push(data);
                        if total > retry::MAX_BUFFERED_BODY {
                            return RequestBody::Once(Some(prepend(read, body, None)));
                        }
                    }
                    Err(frame) => return RequestBody::Once(Some(prepend(read, body, Some(frame)))),
                },
                Some(Err(e)) => {
                    let err: BoxError = e.into();
                    let failed = futures::stream::iter(vec![Err::<Frame<Bytes>, BoxError>(err)]);
                    return RequestBody::Once(Some(StreamBody::new(failed).boxed()));
                }
            }
        }
    }

    fn is_streamed(&self) -> bool {
        matches!(self, RequestBody::Once(_))
    }

    fn next(&mut self) -> Option<ProxyBody> {
        match self {
            RequestBody::Buffered(b) => Some(body::full(b.clone())),
            RequestBody::Once(body) => body.take(),
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
