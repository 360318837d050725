//! The data plane: the outbound HTTP proxy, TCP upstreams, and the inbound side
//! of the tunnel, all reading the Router's snapshot without a mailbox round trip.
//!
//! # Layout
//!
//! - [`outbound`]: the HTTP/1.1 + h2c proxy apps call (`127.0.0.1:4140`).
//! - [`inbound`]: QUIC streams from peer nodes, handed to local instances.
//! - [`tcp`]: `weft upstream` listeners, one QUIC stream per connection.
//! - [`body`]: conversions between hyper bodies and tunnel streams.

pub mod body;
pub mod inbound;
pub mod outbound;
pub mod tcp;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use weft_gossip::Instance;

use weft_gossip::view::EJECTED_PREFIX;
use weft_gossip::{Key, MemberState};

use crate::gossip_writer::GossipWriter;
use crate::outcome::OutcomeSink;
use crate::policy::balancer::Balancer;
use crate::policy::episodes::{exponential_delay, learned_delay};
use crate::policy::outlier::{Change, OutlierConfig, OutlierDetector};
use crate::policy::retry::RetryBudget;
use crate::router::{RouterHandle, RouterSnapshot};
use crate::stats_aggregator::StatsHandle;
use crate::tunnel::TunnelPool;

/// Errors boxed inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy serves and sends.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The header that marks errors made by the mesh itself.
pub const WEFT_ERROR: &str = "weft-error";

/// Mesh error codes (DESIGN section 5).
pub mod codes {
    /// No such service in the catalog.
    pub const UNKNOWN_SERVICE: &str = "unknown-service";
    /// The service exists but has no routable instance.
    pub const NO_HEALTHY_INSTANCE: &str = "no-healthy-instance";
    /// No response head within the deadline.
    pub const UPSTREAM_TIMEOUT: &str = "upstream-timeout";
    /// The instance or its node could not be reached.
    pub const UPSTREAM_UNREACHABLE: &str = "upstream-unreachable";
    /// A retry was needed and the retry budget refused it.
    pub const RETRY_BUDGET_EXHAUSTED: &str = "retry-budget-exhausted";
}

/// How long a retry to the same instance waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RetryPolicy {
    /// The learned delay: how long this service's outages usually last.
    #[default]
    Learned,
    /// Envoy's default: 25 ms base, 250 ms cap, exponential, full jitter.
    Exponential,
}

impl RetryPolicy {
    /// Parses "learned" or "exponential".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "learned" => Some(RetryPolicy::Learned),
            "exponential" => Some(RetryPolicy::Exponential),
            _ => None,
        }
    }
}

/// Timeouts of the data plane.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP or QUIC connect.
    pub connect: Duration,
    /// Until the response head arrives.
    pub request: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(30),
        }
    }
}

/// Keep-alive clients to this node's own instances.
#[derive(Debug, Clone)]
pub struct LocalClients {
    http1: Client<HttpConnector, ProxyBody>,
    h2: Client<HttpConnector, ProxyBody>,
}

impl LocalClients {
    fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build(connector);
        LocalClients { http1, h2 }
    }

    /// The client for a request of this HTTP version.
    pub fn for_version(&self, version: http::Version) -> &Client<HttpConnector, ProxyBody> {
        if version == http::Version::HTTP_2 {
            &self.h2
        } else {
            &self.http1
        }
    }
}

/// Everything a connection task needs, shared.
#[derive(Debug)]
pub struct DataPlane {
    /// This node's name.
    pub node: String,
    /// The routing table.
    pub router: RouterHandle,
    /// Connections to peer nodes.
    pub tunnels: Arc<TunnelPool>,
    /// Clients to local instances.
    pub local: LocalClients,
    /// Where outcomes go.
    pub outcomes: OutcomeSink,
    /// Timeouts.
    pub timeouts: Timeouts,
    balancer: Mutex<Balancer<(String, String)>>,
    outliers: Mutex<OutlierDetector<(String, String)>>,
    writer: Option<GossipWriter>,
    budget: Mutex<RetryBudget>,
    stats: StatsHandle,
    policy: RetryPolicy,
}

/// What a data plane is built from.
#[derive(Debug)]
pub struct DataPlaneParts {
    /// This node's name.
    pub node: String,
    /// The routing table.
    pub router: RouterHandle,
    /// Connections to peer nodes.
    pub tunnels: Arc<TunnelPool>,
    /// Where outcomes go.
    pub outcomes: OutcomeSink,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Gossip writes (outlier votes); `None` in tests without gossip.
    pub writer: Option<GossipWriter>,
    /// Merged statistics (the learned delay).
    pub stats: StatsHandle,
    /// Default retry wait policy.
    pub policy: RetryPolicy,
}

impl DataPlane {
    /// A data plane from its parts.
    pub fn new(parts: DataPlaneParts) -> Arc<Self> {
        let DataPlaneParts {
            node,
            router,
            tunnels,
            outcomes,
            timeouts,
            writer,
            stats,
            policy,
        } = parts;
        let dp = Arc::new(DataPlane {
            node,
            router,
            tunnels,
            local: LocalClients::new(timeouts.connect),
            outcomes,
            timeouts,
            balancer: Mutex::new(Balancer::new(
                Duration::from_millis(30),
                Duration::from_secs(10),
            )),
            outliers: Mutex::new(OutlierDetector::new(OutlierConfig::default())),
            writer,
            budget: Mutex::new(RetryBudget::default()),
            stats,
            policy,
        });
        // Ejections end on their own; withdraw our gossip vote when they do.
        // Pooled tunnels to nodes that died, left or restarted are closed.
        let weak = Arc::downgrade(&dp);
        tokio::spawn(async move {
            let mut generations: HashMap<String, u64> = HashMap::new();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let Some(dp) = weak.upgrade() else { return };
                for m in &dp.router.load().members {
                    let gone = matches!(m.state, MemberState::Dead | MemberState::Left);
                    let previous = generations.insert(m.name.clone(), m.generation);
                    if gone || previous.is_some_and(|g| g != m.generation) {
                        dp.tunnels.evict(&m.name);
                    }
                }
                let expired = dp.outliers().expired(Instant::now());
                for (node, id) in expired {
                    tracing::info!(node, id, "outlier ejection ended");
                    if let (Some(w), true) = (&dp.writer, node != dp.node) {
                        w.delete(Key::Health(id));
                    }
                }
            }
        });
        dp
    }

    fn budget(&self) -> std::sync::MutexGuard<'_, RetryBudget> {
        self.budget.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a client request toward the retry budget.
    pub fn record_request(&self) {
        self.budget().record_request(Instant::now());
    }

    /// Asks the budget for one retry.
    pub fn try_retry(&self) -> bool {
        self.budget().try_withdraw(Instant::now())
    }

    /// Fraction of the retry budget in use.
    pub fn budget_used(&self) -> f64 {
        self.budget().used_fraction(Instant::now())
    }

    /// The wait before retry number `retry` (1 or 2) to an instance that was
    /// just tried, by the service's policy or this node's default.
    pub fn retry_wait(&self, service: &str, service_policy: Option<&str>, retry: u8) -> Duration {
        let policy = service_policy
            .and_then(RetryPolicy::parse)
            .unwrap_or(self.policy);
        let mut rng = rand::thread_rng();
        match policy {
            RetryPolicy::Exponential => exponential_delay(retry, &mut rng),
            RetryPolicy::Learned => {
                let (merged, start) = self.stats.episodes(service);
                learned_delay(start, Instant::now(), &merged, retry, &mut rng).wait
            }
        }
    }

    fn outliers(&self) -> std::sync::MutexGuard<'_, OutlierDetector<(String, String)>> {
        self.outliers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds one attempt's result to passive outlier detection.
    pub fn observe_outcome(&self, service: &str, key: &(String, String), failed: bool) {
        // The sibling list only matters for failures (the ejection cap).
        let siblings: Vec<(String, String)> = if failed {
            self.router
                .load()
                .catalog
                .instances(service)
                .iter()
                .map(|i| (i.node.clone(), i.id.clone()))
                .collect()
        } else {
            Vec::new()
        };
        let change = {
            let mut rng = rand::thread_rng();
            self.outliers()
                .observe(key, failed, &siblings, Instant::now(), &mut rng)
        };
        if let Change::Ejected(until) = change {
            let (node, id) = key;
            tracing::warn!(service, node, id, secs = ?until.saturating_duration_since(Instant::now()), "instance ejected by outlier detection");
            metrics::counter!("weft_outlier_ejections_total", "service" => service.to_string())
                .increment(1);
            // Vote in gossip; the owner's own instances are judged by its checks.
            if let (Some(w), true) = (&self.writer, *node != self.node) {
                w.set(Key::Health(id.clone()), format!("{EJECTED_PREFIX}{node}"));
            }
        }
    }

    /// True when every routable instance of `service` is ejected, so traffic
    /// goes to all of them anyway (Envoy's panic routing).
    pub fn in_panic(&self, snap: &RouterSnapshot, service: &str) -> bool {
        let now = Instant::now();
        let outliers = self.outliers();
        let routable: Vec<&Instance> = snap
            .catalog
            .instances(service)
            .iter()
            .filter(|i| matches!(i.health.as_str(), "passing" | "unknown" | "ejected"))
            .collect();
        !routable.is_empty()
            && routable.iter().all(|i| {
                i.health == "ejected" || outliers.is_ejected(&(i.node.clone(), i.id.clone()), now)
            })
    }

    fn balancer(&self) -> std::sync::MutexGuard<'_, Balancer<(String, String)>> {
        self.balancer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chooses an instance of `service` speaking `protocol`, or says why none.
    pub fn pick(
        &self,
        snap: &RouterSnapshot,
        service: &str,
        protocol: &str,
        exclude: &[(String, String)],
    ) -> Result<Instance, &'static str> {
        let all = snap.catalog.instances(service);
        if all.is_empty() {
            return Err(codes::UNKNOWN_SERVICE);
        }
        let now = Instant::now();
        let usable: Vec<&Instance> = all
            .iter()
            .filter(|i| {
                i.protocol == protocol
                    && matches!(i.health.as_str(), "passing" | "unknown" | "ejected")
            })
            .collect();
        let routable: Vec<&Instance> = {
            let outliers = self.outliers();
            let not_ejected: Vec<&Instance> = usable
                .iter()
                .copied()
                .filter(|i| {
                    i.health != "ejected"
                        && !outliers.is_ejected(&(i.node.clone(), i.id.clone()), now)
                })
                .collect();
            // Panic routing: when every usable instance is ejected, use them all.
            if not_ejected.is_empty() {
                usable
            } else {
                not_ejected
            }
        };
        let keys: Vec<(String, String)> = routable
            .iter()
            .map(|i| (i.node.clone(), i.id.clone()))
            .collect();
        let chosen = {
            let mut rng = rand::thread_rng();
            self.balancer()
                .pick_excluding(&keys, exclude, Instant::now(), &mut rng)
        };
        chosen
            .and_then(|(node, id)| {
                routable
                    .iter()
                    .find(|i| i.node == node && i.id == id)
                    .map(|i| (*i).clone())
            })
            .ok_or(codes::NO_HEALTHY_INSTANCE)
    }

    /// Marks the start of a request to an instance (raises its load).
    pub fn started(&self, key: &(String, String)) {
        self.balancer().start(key);
    }

    /// Marks the end of a request and feeds its latency to the balancer.
    pub fn finished(&self, key: &(String, String), latency: Duration) {
        let mut b = self.balancer();
        b.end(key);
        b.observe(key, latency, Instant::now());
    }
}

/// A response made by the mesh itself, with the `weft-error` header.
pub fn mesh_error(status: StatusCode, code: &str, detail: &str) -> Response<ProxyBody> {
    let body = Full::new(Bytes::from(format!("weft: {code}: {detail}\n")))
        .map_err(|never| match never {})
        .boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(code) {
        resp.headers_mut().insert(WEFT_ERROR, v);
    }
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The status that goes with a mesh error code.
pub fn status_for(code: &str) -> StatusCode {
    match code {
        codes::UPSTREAM_TIMEOUT => StatusCode::GATEWAY_TIMEOUT,
        codes::UPSTREAM_UNREACHABLE => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// Headers that belong to one hop and are never forwarded.
pub fn is_hop_by_hop(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "trailer"
            | "proxy-authorization"
            | "proxy-authenticate"
    )
}

/// Copies end-to-end headers, dropping hop-by-hop ones and those named in `Connection`.
pub fn end_to_end_headers(headers: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    let named: Vec<String> = headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect();
    headers
        .iter()
        .filter(|(name, value)| {
            let te_other_than_trailers = name.as_str() == "te" && value.as_bytes() != b"trailers";
            !(is_hop_by_hop(name)
                || te_other_than_trailers
                || named.iter().any(|n| n == name.as_str()))
        })
        .map(|(name, value)| (name.as_str().to_string(), value.as_bytes().to_vec()))
        .collect()
}

/// Rebuilds a header map from wire pairs, skipping anything invalid.
pub fn header_map(pairs: &[(String, Vec<u8>)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            if !is_hop_by_hop(&n) {
                map.append(n, v);
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        let kept = end_to_end_headers(&h);
        assert_eq!(kept, vec![("x-request-id".to_string(), b"abc".to_vec())]);
        let mut h = http::HeaderMap::new();
        h.insert("te", "trailers".parse().unwrap());
        assert_eq!(end_to_end_headers(&h).len(), 1);
    }

    #[test]
    fn header_map_skips_invalid() {
        let map = header_map(&[
            ("x-ok".into(), b"1".to_vec()),
            ("bad name".into(), b"1".to_vec()),
            ("x-bad-value".into(), b"a\nb".to_vec()),
            ("transfer-encoding".into(), b"chunked".to_vec()),
        ]);
        assert_eq!(map.len(), 1);
        assert_eq!(map["x-ok"], "1");
    }
}
