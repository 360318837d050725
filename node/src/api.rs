//! The local API: JSON over HTTP/1.1 on the node's Unix socket (read-write)
//! and its admin address (read-only).
//!
//! Every request body is bounded (64 KiB) and validated field by field; a bad
//! request gets a 4xx with `{"error": "..."}` naming the field, never a crash.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use weft_gossip::grant::Grant;
use weft_gossip::keys::validate_name;
use weft_gossip::{Cluster, Health};
use weft_runtime::dataplane::tables::RouterHandle;
use weft_runtime::dataplane::tap::{self, ClusterLine, Filter, Line};
use weft_runtime::listener::{ApiBody, HttpHandler, Origin};

use crate::callers::{CallerPorts, Wanted};
use crate::cluster_config::{ClusterConfig, ConfigRecord, Refused};
use crate::intentions::ClusterIntentions;
use crate::keyring::{ClusterKeys, KeysError};
use crate::limits::ClusterLimits;
use crate::registry::Registry;
use crate::rollouts::RolloutDriver;
use crate::routes::ClusterRoutes;
use crate::upstreams::Upstreams;
use crate::NodeError;
use metrics_exporter_prometheus::PrometheusHandle;
use weft_gossip::registration::parse_registration;
use weft_runtime::dataplane::tables::StatsHandle;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::health_checker::{HealthChecker, TtlPass};
use weft_runtime::supervision::Crash;

/// This API described in OpenAPI 3.1 (`docs/api.yaml`), as JSON.
static OPENAPI: std::sync::LazyLock<Value> = std::sync::LazyLock::new(|| {
    serde_norway::from_str(include_str!("../../docs/api.yaml"))
        .unwrap_or_else(|e| json!({ "error": format!("docs/api.yaml: {e}") }))
});

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// What the API handlers share.
#[derive(Debug)]
pub struct ApiState {
    /// This node's name.
    pub node: String,
    /// Gossip, for writing own keys.
    pub cluster: Arc<Cluster>,
    /// The gossip keyring (`/v1/keys`, socket only).
    pub keys: Arc<ClusterKeys>,
    /// The revocation list in use (`PUT /v1/crl`, socket only).
    pub crls: Arc<crate::crl::Crls>,
    /// The cluster's intentions (`PUT /v1/intentions`, socket only).
    pub intentions: Arc<ClusterIntentions>,
    /// The cluster's routes (`PUT /v1/routes`, socket only).
    pub routes: Arc<ClusterRoutes>,
    /// The cluster's rate limits (`PUT /v1/limits`, socket only).
    pub limits: Arc<ClusterLimits>,
    /// The cluster's rollouts and where each stands (`PUT /v1/rollouts`,
    /// socket only).
    pub rollouts: Arc<RolloutDriver>,
    /// Local registrations.
    pub registry: Arc<Registry>,
    /// The routing table.
    pub router: RouterHandle,
    /// TCP upstreams.
    pub upstreams: Arc<Upstreams>,
    /// Services' own outbound ports.
    pub callers: Arc<CallerPorts>,
    /// The health checker, told about every registration change.
    pub checker: actix::Addr<HealthChecker>,
    /// Renders `/metrics`.
    pub metrics: Option<PrometheusHandle>,
    /// Request statistics, local and merged.
    pub stats: StatsHandle,
    /// The data plane (retry budget use).
    pub dataplane: Arc<DataPlane>,
    /// The fault-injection endpoint, armed only under `WEFT_TEST_FAULTS=1`.
    pub faults: Option<Arc<Faults>>,
    /// This node's own ports, which no instance may use (the proxy would
    /// call itself): (port, what it is).
    pub reserved_ports: Vec<(u16, &'static str)>,
}

/// `PUT /v1/debug/crash/{actor}` makes that actor's handler panic, to
/// show that supervision restarts it while the node keeps serving. Served
/// on the socket only, and only by a node started with `WEFT_TEST_FAULTS=1`.
#[derive(Debug, Default)]
pub struct Faults {
    targets: std::sync::OnceLock<Vec<(&'static str, actix::Recipient<Crash>)>>,
}

impl Faults {
    /// Armed when the environment asks for it.
    pub fn from_env() -> Option<Arc<Faults>> {
        (std::env::var("WEFT_TEST_FAULTS").as_deref() == Ok("1")).then(Arc::default)
    }

    /// The actors it can crash, once they run.
    pub fn arm(&self, targets: Vec<(&'static str, actix::Recipient<Crash>)>) {
        let _ = self.targets.set(targets);
    }

    fn crash(&self, actor: &str) -> Reply {
        let target = self
            .targets
            .get()
            .into_iter()
            .flatten()
            .find(|(name, _)| *name == actor);
        match target {
            Some((name, recipient)) => {
                recipient.do_send(Crash);
                reply(StatusCode::OK, &json!({ "crashed": name }))
            }
            None => error(
                StatusCode::NOT_FOUND,
                format!(
                    "no actor {actor:?}; one of listener, router, health_checker, stats_aggregator"
                ),
            ),
        }
    }
}

/// The handler the Listener serves.
pub fn handler(state: Arc<ApiState>) -> HttpHandler {
    Arc::new(move |req, origin| {
        let state = state.clone();
        Box::pin(async move { route(&state, req, origin).await })
    })
}

/// `GET /v1/tap?service=S&caller=C&status=5xx`: the requests of every node
/// as they happen, one JSON object a line, until the client hangs up.
/// Served on the socket only: the lines name paths and callers.
fn tap(state: &ApiState, query: &str) -> Reply {
    let filter = match Filter::from_query(query) {
        Ok(filter) => filter,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(tap) = tap::cluster(&state.dataplane, filter) else {
        let busy = format!("this node serves {} taps already", tap::MAX_LISTENERS);
        return error(StatusCode::SERVICE_UNAVAILABLE, busy);
    };
    let lines = futures::stream::unfold(tap, |mut tap| async move {
        let mut text = serde_json::to_vec(&tap_json(tap.next().await?)).unwrap_or_default();
        text.push(b'\n');
        Some((Ok(Frame::data(Bytes::from(text))), tap))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/x-ndjson")
        .body(StreamBody::new(lines).boxed_unsync())
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// One tap line as JSON: a request (the access log's fields, and the node
/// that saw it), lines lost, a node that listens or one that cannot.
fn tap_json(line: ClusterLine) -> Value {
    match line {
        ClusterLine::Listening(node) => json!({ "node": node, "listening": true }),
        ClusterLine::From(node, Line::Request(entry)) => {
            let mut value = json!(*entry);
            value["seen_by"] = json!(node);
            value
        }
        ClusterLine::From(node, Line::Dropped(n)) => json!({ "node": node, "dropped": n }),
        ClusterLine::Unreachable(node, why) => json!({ "node": node, "error": why }),
    }
}

/// An answer: one JSON document (or page, or metrics), or a stream.
type Reply = Response<ApiBody>;

/// A body of `bytes`, all at once.
fn full(bytes: Bytes) -> ApiBody {
    Full::new(bytes).boxed_unsync()
}

fn reply(status: StatusCode, body: &Value) -> Reply {
    let mut text = serde_json::to_vec(body).unwrap_or_default();
    text.push(b'\n');
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Whether the admin address may answer a request with this `Host`: an
/// IP literal, `localhost` or the node's own name, with any port, or none
/// (HTTP/1.0). A web page whose DNS name an attacker rebinds to this
/// address (DNS rebinding) sends its own name, and reads nothing.
fn admin_host_allowed(host: Option<&hyper::header::HeaderValue>, node: &str) -> bool {
    let Some(host) = host else { return true };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((v6, _port)) => return v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name.eq_ignore_ascii_case(node)
        || name.parse::<std::net::Ipv4Addr>().is_ok()
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Reply {
    reply(status, &json!({ "error": msg.to_string() }))
}

async fn route(state: &ApiState, req: Request<Incoming>, origin: Origin) -> Reply {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let read_only = origin == Origin::Admin;
    if read_only && !admin_host_allowed(req.headers().get(hyper::header::HOST), &state.node) {
        weft_runtime::dataplane::Limit::AdminHost.count();
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            "the admin address answers only to localhost, an IP address or the node's name",
        );
    }
    match (&method, segments.as_slice()) {
        (&Method::GET, [""]) if read_only => dashboard(),
        (&Method::GET, ["v1", "services"]) => get_services(state),
        (&Method::GET, ["v1", "members"]) => get_members(state),
        (&Method::GET, ["v1", "health"]) => get_health(state),
        (&Method::GET, ["v1", "edges"]) => get_edges(state),
        (&Method::GET, ["v1", "openapi.json"]) => reply(StatusCode::OK, &OPENAPI),
        (&Method::GET, ["v1", "intentions"]) => {
            reply(StatusCode::OK, &json!(state.intentions.current()))
        }
        (&Method::GET, ["v1", "routes"]) => reply(StatusCode::OK, &json!(state.routes.current())),
        (&Method::GET, ["v1", "limits"]) => reply(StatusCode::OK, &json!(state.limits.current())),
        (&Method::GET, ["v1", "rollouts"]) => {
            reply(StatusCode::OK, &json!(state.rollouts.config.current()))
        }
        (&Method::GET, ["v1", "upstreams"]) => get_upstreams(state).await,
        (&Method::GET, ["metrics"]) if read_only => get_metrics(state),
        (_, ["v1", ..]) if read_only && method != Method::GET => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "the admin address is read-only; use the node's socket",
        ),
        (&Method::PUT, ["v1", "services"]) => match read_json(req).await {
            Ok(body) => put_service(state, &body).await,
            Err(reply) => reply,
        },
        (&Method::PUT, ["v1", "debug", "crash", actor]) => match &state.faults {
            Some(faults) => faults.crash(actor),
            None => error(
                StatusCode::NOT_FOUND,
                format!("no endpoint {method} {path}"),
            ),
        },
        (&Method::DELETE, ["v1", "services", id]) => delete_service(state, id).await,
        (&Method::PUT, ["v1", "services", id, "ttl"]) => ttl_pass(state, id).await,
        (&Method::PUT, ["v1", "upstreams"]) => match read_json(req).await {
            Ok(body) => put_upstream(state, &body).await,
            Err(reply) => reply,
        },
        (&Method::DELETE, ["v1", "upstreams", listen]) => delete_upstream(state, listen).await,
        (_, ["v1", "keys", ..]) if read_only => error(
            StatusCode::FORBIDDEN,
            "the keyring is served on the node's socket only",
        ),
        (_, ["v1", "tap"]) if read_only => error(
            StatusCode::FORBIDDEN,
            "the tap is served on the node's socket only",
        ),
        (&Method::GET, ["v1", "tap"]) => tap(state, req.uri().query().unwrap_or_default()),
        (_, ["v1", "crl"]) if read_only => error(
            StatusCode::FORBIDDEN,
            "the revocation list is handed over the node's socket only",
        ),
        (&Method::PUT, ["v1", "crl"]) => match read_json(req).await {
            Ok(body) => put_crl(state, &body),
            Err(reply) => reply,
        },
        (&Method::PUT, ["v1", "intentions"]) => match read_json(req).await {
            Ok(body) => put_config(&state.intentions, body),
            Err(reply) => reply,
        },
        (&Method::PUT, ["v1", "routes"]) => match read_json(req).await {
            Ok(body) => put_config(&state.routes, body),
            Err(reply) => reply,
        },
        (&Method::PUT, ["v1", "limits"]) => match read_json(req).await {
            Ok(body) => put_config(&state.limits, body),
            Err(reply) => reply,
        },
        (&Method::PUT, ["v1", "rollouts"]) => match read_json(req).await {
            Ok(body) => put_config(&state.rollouts.config, body),
            Err(reply) => reply,
        },
        (&Method::GET, ["v1", "keys"]) => reply(
            StatusCode::OK,
            &state.keys.list(&state.cluster.views().borrow()),
        ),
        (&Method::PUT, ["v1", "keys"]) => match read_key_change(req, true).await {
            Ok((key, grant)) => keys_reply(state.keys.install(&key, grant), "installed"),
            Err(reply) => reply,
        },
        (&Method::PUT, ["v1", "keys", "primary"]) => match read_key_change(req, true).await {
            Ok((key, grant)) => {
                let view = state.cluster.views().borrow().clone();
                keys_reply(state.keys.use_primary(&key, &view, grant), "primary")
            }
            Err(reply) => reply,
        },
        (&Method::DELETE, ["v1", "keys", id]) => {
            let id = id.to_string();
            match read_key_change(req, false).await {
                Ok((_, grant)) => {
                    let view = state.cluster.views().borrow().clone();
                    keys_reply(state.keys.remove(&id, &view, grant), "removed")
                }
                Err(reply) => reply,
            }
        }
        (
            _,
            ["v1", "services"]
            | ["v1", "members"]
            | ["v1", "health"]
            | ["v1", "edges"]
            | ["v1", "openapi.json"]
            | ["v1", "tap"]
            | ["v1", "intentions"]
            | ["v1", "routes"]
            | ["v1", "limits"]
            | ["v1", "rollouts"]
            | ["v1", "services", _]
            | ["v1", "services", _, "ttl"]
            | ["v1", "upstreams"]
            | ["v1", "upstreams", _]
            | ["v1", "keys"]
            | ["v1", "keys", _]
            | ["v1", "crl"],
        ) => error(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}"),
        ),
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no endpoint {method} {path}"),
        ),
    }
}

/// The dashboard: one self-contained page, built into the binary.
fn dashboard() -> Reply {
    const PAGE: &str = include_str!("dashboard.html");
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/html; charset=utf-8")
        .header("cache-control", "no-cache")
        .body(full(Bytes::from_static(PAGE.as_bytes())))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "dashboard"))
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Reply> {
    let too_large = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|n| n > MAX_BODY as u64);
    if too_large {
        return Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body exceeds {MAX_BODY} bytes"),
        ));
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body exceeds {MAX_BODY} bytes"),
            ))
        }
        Err(e) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("cannot read body: {e}"),
            ))
        }
    };
    serde_json::from_slice(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            format!("body is not valid JSON: {e}"),
        )
    })
}

/// The `"key"` field of a keyring request.
/// A keyring change's body: `{"key", "grant"}` (`key` only when `with_key`),
/// the grant signed by an operator (`weft keys` makes it).
async fn read_key_change(req: Request<Incoming>, with_key: bool) -> Result<(String, Grant), Reply> {
    let body = read_json(req).await?;
    let key = match body.get("key").and_then(Value::as_str) {
        Some(key) => key.to_string(),
        None if !with_key => String::new(),
        None => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "field \"key\" (a base64 key or a key id) is required",
            ))
        }
    };
    let grant = match body.get("grant") {
        Some(grant) => serde_json::from_value::<Grant>(grant.clone())
            .map_err(|e| error(StatusCode::BAD_REQUEST, format!("field \"grant\": {e}")))?,
        None => {
            return Err(error(
                StatusCode::FORBIDDEN,
                "keyring changes need an operator's grant: run `weft keys` with --operator-cert and --operator-key (from `weft cert issue --operator NAME`)",
            ))
        }
    };
    Ok((key, grant))
}

/// `PUT /v1/crl {"crl": PEM}`: a revocation list of the cluster CA, adopted
/// when it revokes more than the one in use, then passed on by gossip.
fn put_crl(state: &ApiState, body: &Value) -> Reply {
    let Some(pem) = body.get("crl").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "field \"crl\" (a PEM revocation list from `weft cert revoke`) is required",
        );
    };
    match state.crls.offer(pem.as_bytes()) {
        Ok(adopted) => {
            let revoked = weft_runtime::tls::crls_of_pem(pem.as_bytes())
                .ok()
                .and_then(|l| l.into_iter().next())
                .and_then(|der| weft_runtime::tls::crl_serials(&der).ok())
                .map_or(0, |s| s.len());
            reply(
                StatusCode::OK,
                &json!({ "adopted": adopted, "revoked": revoked }),
            )
        }
        Err(e) => error(
            StatusCode::BAD_REQUEST,
            format!("the list cannot be used: {e}"),
        ),
    }
}

fn keys_reply(result: Result<weft_gossip::seal::KeyId, KeysError>, done: &str) -> Reply {
    match result {
        Ok(id) => reply(
            StatusCode::OK,
            &json!({ "id": id.to_string(), "result": done }),
        ),
        Err(e) => {
            let status = match e {
                KeysError::Bad(_) => StatusCode::BAD_REQUEST,
                KeysError::Forbidden(_) => StatusCode::FORBIDDEN,
                KeysError::Unknown(_) => StatusCode::NOT_FOUND,
                KeysError::Conflict(_) => StatusCode::CONFLICT,
                KeysError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            error(status, e)
        }
    }
}

async fn put_service(state: &ApiState, body: &Value) -> Reply {
    // The outbound ports are this node's business: they are not gossiped.
    let mut body = body.clone();
    let wanted = match Wanted::take_from(&mut body) {
        Ok(wanted) => wanted,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let record = match parse_registration(&body, &state.node) {
        Ok(r) => r,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    if let Some((port, what)) = state.reserved_ports.iter().find(|(p, _)| *p == record.port) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("field \"port\": {port} is this node's {what} port"),
        );
    }
    let (id, service) = (record.id.clone(), record.name.clone());
    // Registered again without ports, the old ones close.
    let opened = match state.callers.open(&id, &service, &wanted).await {
        Ok(opened) => opened,
        Err(e) => return node_error(e),
    };
    if let Err(e) = state.registry.put(&state.cluster, record).await {
        let _ = state.callers.close(&id).await;
        return node_error(e);
    }
    let mut answer = json!({ "id": id });
    if let Some(at) = opened.outbound {
        answer["outbound"] = json!(at.to_string());
    }
    if !opened.upstreams.is_empty() {
        let upstreams: Vec<Value> = opened
            .upstreams
            .iter()
            .map(|(service, at)| json!({"service": service, "listen": at.to_string()}))
            .collect();
        answer["upstreams"] = json!(upstreams);
    }
    reply(StatusCode::OK, &answer)
}

/// A registry or port failure as the API answers it.
fn node_error(e: NodeError) -> Reply {
    match e {
        NodeError::Invalid(msg) => error(StatusCode::BAD_REQUEST, msg),
        NodeError::Conflict(msg) => error(StatusCode::CONFLICT, msg),
        e => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn delete_service(state: &ApiState, id: &str) -> Reply {
    match state.registry.remove(&state.cluster, id).await {
        Ok(true) => match state.callers.close(id).await {
            Ok(()) => reply(StatusCode::OK, &json!({ "id": id })),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        },
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("no local service with id {id:?}"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Validates `{"service","listen"}`.
pub fn parse_upstream(body: &Value) -> Result<(String, std::net::SocketAddr), String> {
    let obj = body.as_object().ok_or("body must be a JSON object")?;
    if let Some(unknown) = obj
        .keys()
        .find(|k| !["service", "listen", "public"].contains(&k.as_str()))
    {
        return Err(format!("unknown field {unknown:?}"));
    }
    let service = obj
        .get("service")
        .and_then(Value::as_str)
        .ok_or("field \"service\" must be a string")?;
    validate_name(service)
        .map_err(|_| "field \"service\" must match [a-z0-9][a-z0-9-]{0,62}".to_string())?;
    let listen: std::net::SocketAddr = obj
        .get("listen")
        .and_then(Value::as_str)
        .ok_or("field \"listen\" must be a string like \"127.0.0.1:15432\"")?
        .parse()
        .map_err(|_| "field \"listen\" must be an IP:port address".to_string())?;
    if listen.port() == 0 {
        return Err("field \"listen\" needs a port".into());
    }
    let public = match obj.get("public") {
        None => false,
        Some(v) => v
            .as_bool()
            .ok_or("field \"public\" must be true or false")?,
    };
    if !listen.ip().is_loopback() {
        if !public {
            return Err(format!(
                "field \"listen\": {} is not a loopback address, and a TCP upstream reaches {service} without mTLS; set \"public\": true to open it anyway",
                listen.ip()
            ));
        }
        tracing::warn!(service, %listen, "TCP upstream open beyond loopback: anyone who reaches {listen} reaches {service}, without mTLS");
    }
    Ok((service.to_string(), listen))
}

async fn put_upstream(state: &ApiState, body: &Value) -> Reply {
    let (service, listen) = match parse_upstream(body) {
        Ok(v) => v,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    match state.upstreams.add(service.clone(), listen).await {
        Ok(()) => reply(
            StatusCode::OK,
            &json!({"service": service, "listen": listen.to_string()}),
        ),
        Err(e) => node_error(e),
    }
}

async fn delete_upstream(state: &ApiState, listen: &str) -> Reply {
    let Ok(addr) = listen.parse() else {
        return error(
            StatusCode::BAD_REQUEST,
            "the path must end in an IP:port address",
        );
    };
    match state.upstreams.remove(addr).await {
        Ok(true) => reply(StatusCode::OK, &json!({"listen": listen})),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no upstream on {listen}")),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

async fn get_upstreams(state: &ApiState) -> Reply {
    let list: Vec<Value> = state
        .upstreams
        .list()
        .await
        .into_iter()
        .map(|(listen, service)| json!({"service": service, "listen": listen.to_string()}))
        .collect();
    reply(StatusCode::OK, &json!({ "upstreams": list }))
}

async fn ttl_pass(state: &ApiState, id: &str) -> Reply {
    // The registry decides what exists: a deregistered id is 404 at once,
    // even before the checker has heard of the change.
    if state.registry.get(id).await.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("no local service with id {id:?}"),
        );
    }
    match state.checker.send(TtlPass(id.to_string())).await {
        Ok(true) => reply(StatusCode::OK, &json!({ "id": id })),
        Ok(false) => error(
            StatusCode::BAD_REQUEST,
            format!("service {id:?} has no ttl check"),
        ),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

fn instance_json(i: &weft_gossip::Instance) -> Value {
    json!({
        "id": i.id,
        "node": i.node,
        "port": i.port,
        "protocol": i.protocol,
        "health": i.health,
        "tags": i.tags,
    })
}

fn services_json(state: &ApiState) -> serde_json::Map<String, Value> {
    let snap = state.router.load();
    snap.catalog
        .services
        .iter()
        .map(|(name, list)| {
            (
                name.clone(),
                Value::Array(list.iter().map(|i| instance_json(i)).collect()),
            )
        })
        .collect()
}

fn members_json(state: &ApiState) -> Value {
    let snap = state.router.load();
    serde_json::to_value(&snap.members).unwrap_or(Value::Null)
}

fn get_services(state: &ApiState) -> Reply {
    reply(StatusCode::OK, &json!({ "services": services_json(state) }))
}

fn get_members(state: &ApiState) -> Reply {
    reply(StatusCode::OK, &json!({ "members": members_json(state) }))
}

/// The recorder's series, then the gauges of current state (drawn now, so
/// a departed service has none).
fn get_metrics(state: &ApiState) -> Reply {
    let Some(handle) = &state.metrics else {
        return error(StatusCode::SERVICE_UNAVAILABLE, "metrics are not enabled");
    };
    let mut text = handle.render();
    weft_runtime::state_metrics::render(
        &mut text,
        &state.router.load(),
        &state.stats.load(),
        |service| state.dataplane.budget_used(service),
        &state.dataplane.admission,
    );
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/plain; version=0.0.4")
        .body(full(Bytes::from(text)))
        .unwrap_or_else(|_| error(StatusCode::INTERNAL_SERVER_ERROR, "render failed"))
}

fn round(v: Option<f64>, places: i32) -> Value {
    let scale = 10f64.powi(places);
    v.filter(|x| x.is_finite())
        .map(|x| json!((x * scale).round() / scale))
        .unwrap_or(Value::Null)
}

/// Each rate limit with this node's demand and share of it, requests a
/// second.
fn limits_json(state: &ApiState) -> Vec<Value> {
    let status = state.dataplane.admission.status();
    status
        .into_iter()
        .map(|l| {
            json!({
                "service": l.limit.service,
                "caller": l.limit.caller,
                "rate": l.limit.rate,
                "demand": round(Some(l.demand), 1),
                "share": round(Some(l.share), 1),
                "cluster_demand": round(Some(l.cluster_demand), 1),
            })
        })
        .collect()
}

/// Each service under adaptive concurrency as this node sees it.
fn concurrency_json(state: &ApiState) -> Vec<Value> {
    let status = state.dataplane.admission.concurrency_status();
    status
        .into_iter()
        .map(|c| {
            json!({
                "service": c.service,
                "limit": round(Some(c.limit), 1),
                "share": round(Some(c.share), 1),
                "in_flight": c.in_flight,
                "min_rtt_ms": round(c.min_rtt.map(|d| d.as_secs_f64() * 1000.0), 2),
            })
        })
        .collect()
}

/// A new version of a cluster config object (the intentions, the routes)
/// with its operator grant.
fn put_config<R: ConfigRecord>(config: &ClusterConfig<R>, body: Value) -> Reply {
    let record: R = match serde_json::from_value(body) {
        Ok(record) => record,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{}: {e}", R::OBJECT)),
    };
    let version = record.version();
    match config.adopt(record) {
        Ok(operator) => reply(
            StatusCode::OK,
            &json!({"version": version, "operator": operator}),
        ),
        Err(e @ Refused::Invalid(_)) => error(StatusCode::BAD_REQUEST, e),
        Err(e @ Refused::Stale { .. }) => error(StatusCode::CONFLICT, e),
        Err(e @ Refused::Ungranted(_)) => error(StatusCode::FORBIDDEN, e),
        Err(Refused::Store(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e),
    }
}

/// Every (caller, service) edge the cluster's nodes reported, merged.
fn get_edges(state: &ApiState) -> Reply {
    let stats = state.stats.load();
    let edges: Vec<Value> = stats
        .edges
        .iter()
        .map(|((caller, service), e)| {
            json!({
                "caller": caller,
                "service": service,
                "rps": round(Some(e.cluster.rps), 2),
                "success_rate": round(e.cluster.success_rate, 4),
                "effective_success_rate": round(e.effective_success_rate, 4),
                "p50_ms": round(e.cluster.p50_ms, 2),
                "p99_ms": round(e.cluster.p99_ms, 2),
                "retries": e.cluster.retries,
                "nodes": e.cluster.nodes,
            })
        })
        .collect();
    reply(StatusCode::OK, &json!({ "edges": edges }))
}

fn get_health(state: &ApiState) -> Reply {
    let snap = state.router.load();
    let stats = state.stats.load();
    let mut names: Vec<&String> = snap.catalog.services.keys().collect();
    names.extend(stats.services.keys());
    names.sort();
    names.dedup();
    let services: serde_json::Map<String, Value> = names
        .into_iter()
        .map(|name| {
            let list = snap.catalog.instances(name);
            let passing = list.iter().filter(|i| i.health == Health::Passing).count();
            let ejected = list.iter().filter(|i| i.health == Health::Ejected).count();
            let s = stats.services.get(name).cloned().unwrap_or_default();
            let configured = list.iter().find_map(|i| i.timeout_ms);
            let (timeout, timeout_source) = state.dataplane.request_timeout(name, configured);
            (
                name.clone(),
                json!({
                    "instances": list.iter().map(|i| instance_json(i)).collect::<Vec<_>>(),
                    "healthy": passing,
                    "ejected": ejected,
                    "total": list.len(),
                    "panic": state.dataplane.in_panic(&snap, name),
                    "rps": round((s.cluster.nodes > 0).then_some(s.cluster.rps), 2),
                    "success_rate": round(s.cluster.success_rate, 4),
                    "p50_ms": round(s.cluster.p50_ms, 2),
                    "p99_ms": round(s.cluster.p99_ms, 2),
                    "retry_delay_ms": round(s.retry_delay_ms(), 1),
                    "outage_samples": s.cluster.episodes.samples,
                    "timeout_ms": timeout.as_millis() as u64,
                    "learned": {
                        "retry_delay": {
                            "ms": round(s.retry_delay_ms(), 1),
                            "samples": s.cluster.episodes.samples,
                            "nodes": s.cluster.episode_nodes,
                        },
                        "timeout": {
                            "ms": timeout.as_millis() as u64,
                            "source": timeout_source.as_str(),
                            "samples": s.cluster.successes,
                            "nodes": s.cluster.latency_nodes,
                        },
                    },
                    "retries": s.cluster.retries,
                    "retry_budget_used": round(Some(state.dataplane.budget_used(name)), 3),
                    "local": {
                        "rps": round(Some(s.local.rps), 2),
                        "success_rate": round(s.local.success_rate, 4),
                        "effective_success_rate": round(s.effective.success_rate, 4),
                        "p50_ms": round(s.local.p50_ms, 2),
                        "p99_ms": round(s.local.p99_ms, 2),
                        "retries": s.retries,
                    },
                }),
            )
        })
        .collect();
    reply(
        StatusCode::OK,
        &json!({
            "node": state.node,
            "members": members_json(state),
            "services": services,
            "limits": limits_json(state),
            "concurrency": concurrency_json(state),
            "rollouts": state.rollouts.status(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_parses_and_names_every_endpoint() {
        assert_eq!(OPENAPI["openapi"], "3.1.0", "{}", *OPENAPI);
        let paths = OPENAPI["paths"].as_object().expect("paths");
        for path in [
            "/v1/services",
            "/v1/services/{id}",
            "/v1/services/{id}/ttl",
            "/v1/members",
            "/v1/health",
            "/v1/edges",
            "/v1/intentions",
            "/v1/routes",
            "/v1/limits",
            "/v1/rollouts",
            "/v1/upstreams",
            "/v1/upstreams/{listen}",
            "/v1/keys",
            "/v1/keys/primary",
            "/v1/keys/{id}",
            "/v1/crl",
            "/v1/tap",
            "/v1/openapi.json",
            "/metrics",
            "/",
        ] {
            assert!(paths.contains_key(path), "{path} is not described");
        }
    }

    #[test]
    fn upstreams_beyond_loopback_must_be_asked_for() {
        let ok = parse_upstream(&json!({"service": "db", "listen": "127.0.0.1:15432"}));
        assert_eq!(ok.unwrap().1.port(), 15432);
        let err = parse_upstream(&json!({"service": "db", "listen": "0.0.0.0:15432"})).unwrap_err();
        assert!(
            err.contains("\"listen\"") && err.contains("\"public\": true"),
            "{err}"
        );
        let public = json!({"service": "db", "listen": "0.0.0.0:15432", "public": true});
        assert!(parse_upstream(&public).is_ok());
        let bad = json!({"service": "db", "listen": "127.0.0.1:1", "public": "yes"});
        assert!(parse_upstream(&bad).unwrap_err().contains("\"public\""));
    }

    #[test]
    fn the_admin_address_answers_only_its_own_names() {
        let allowed = |host: &str| {
            let value = hyper::header::HeaderValue::from_str(host).unwrap();
            admin_host_allowed(Some(&value), "n1")
        };
        for host in [
            "localhost",
            "LOCALHOST:9646",
            "127.0.0.1:9646",
            "10.0.0.7",
            "[::1]:9646",
            "n1:9646",
        ] {
            assert!(allowed(host), "{host}");
        }
        for host in [
            "attacker.example",
            "attacker.example:9646",
            "n2",
            "[evil]:1",
            "127.0.0.1.nip.io",
        ] {
            assert!(!allowed(host), "{host}");
        }
        assert!(admin_host_allowed(None, "n1"));
    }
}
