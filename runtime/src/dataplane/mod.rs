//! The data plane: the outbound HTTP proxy, TCP upstreams, and the inbound side
//! of the tunnel, all reading the Router's snapshot without a mailbox round trip.
//!
//! # Layout
//!
//! - [`outbound`]: the HTTP/1.1 + h2c proxy apps call (`127.0.0.1:4140`).
//! - [`inbound`]: QUIC streams from peer nodes, handed to local instances.
//! - `bridge`: streams for another zone's gateway, relayed one hop on.
//! - [`tcp`]: `weft upstream` listeners, one QUIC stream per connection.
//! - [`named`]: a service's named upstreams, HTTP or TCP by the target.
//! - [`request`]: what is forwarded of a request (target, headers, hops).
//! - [`local`]: calls to instances on this host.
//! - [`error`]: the errors the mesh answers with (`weft-error`).
//! - [`splice`]: raw bytes between a connection and a tunnel stream.
//! - [`body`]: conversions between hyper bodies and tunnel streams.
//! - [`limits`]: the caps the mesh enforces itself, each counted by name.
//! - [`admission`]: the cluster's rate limits and adaptive concurrency.
//! - [`rollouts`]: each rollout's step, measured per tag.
//! - [`tables`]: the routing table and statistics the actors publish.
//! - [`endpoints`]: the routing table's typed instances and the pick.
//! - `hedge`: a second attempt raced against a slow first one (learned).
//! - `pool`: keep-alive HTTP/1.1 connections to this node's own instances.
//! - `spans`: the spans of a sampled request and its attempts.
//! - [`keys`]: gossip keys handed to members that ask over the tunnel.
//! - [`tap`]: request lines for `weft tap`, made only while someone listens.

pub mod admission;
pub mod body;
mod bridge;
pub mod endpoints;
pub mod error;
mod hedge;
pub mod inbound;
pub mod keys;
pub mod limits;
pub mod local;
pub mod named;
pub mod outbound;
mod pool;
pub mod request;
pub mod rollouts;
mod spans;
pub mod splice;
pub mod tables;
pub mod tap;
pub mod tcp;

pub use error::{MeshError, WEFT_ERROR};
pub use inbound::count_refused;
pub use limits::{ConnectionLimit, Limit, Limits};
pub use local::LocalClients;
pub use weft_gossip::RetryPolicy;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;

use weft_gossip::{Catalog, Key, MemberState, Protocol};

use self::endpoints::{Endpoint, Endpoints, InstanceKey, ServiceState};
use self::tables::{RouterHandle, RouterSnapshot, StatsHandle};
use crate::access_log::AccessLog;
use crate::gossip_writer::GossipWriter;
use crate::outcome::OutcomeSink;
use crate::policy::episodes::{exponential_delay, learned_delay, outage_hold};
use crate::policy::intentions::{Action, Decision, Intentions};
use crate::policy::outlier::Change;
use crate::policy::retry::ServiceBudget;
use crate::policy::routes::{Routes, Split};
use crate::policy::stats::learned_timeout;
use crate::trace::Tracer;
use crate::tunnel::TunnelPool;

/// Errors boxed inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type the proxy serves and sends.
pub type ProxyBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// The default of [`Timeouts::body_idle`]: long enough for a slow upload
/// or a quiet stream of events, short enough that a stalled peer does not
/// hold a stream for good.
pub const DEFAULT_BODY_IDLE: Duration = Duration::from_secs(5 * 60);

/// Timeouts of the data plane.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// TCP or QUIC connect.
    pub connect: Duration,
    /// Until the response head arrives, unless the service sets its own.
    pub request: Duration,
    /// How long an app connection may take to send a request head.
    pub header_read: Duration,
    /// How long a streamed body may move nothing, either way, before its
    /// stream is reset (Envoy's stream idle timeout).
    pub body_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(1),
            request: Duration::from_secs(30),
            header_read: Duration::from_secs(10),
            body_idle: DEFAULT_BODY_IDLE,
        }
    }
}

/// Where a request timeout came from, as `/v1/health` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutSource {
    /// The service's own `timeout_ms`.
    Configured,
    /// Learned from the cluster's latency (DESIGN section 7).
    Learned,
    /// The node's default, until enough is known.
    Default,
}

impl TimeoutSource {
    /// The JSON and table name.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutSource::Configured => "configured",
            TimeoutSource::Learned => "learned",
            TimeoutSource::Default => "default",
        }
    }
}

/// Requests and connections in flight, so a draining node knows when it may
/// leave. A [`Busy`] guard counts one while it lives.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<AtomicUsize>);

/// One request or connection in flight; dropping it ends it.
#[derive(Debug)]
pub struct Busy(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more until the guard is dropped.
    pub fn track(&self) -> Busy {
        self.0.fetch_add(1, Ordering::Relaxed);
        Busy(self.0.clone())
    }

    /// How many are in flight now.
    pub fn count(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
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
    /// Connection caps.
    pub limits: Limits,
    /// What is in flight (requests until their body ends, connections).
    pub in_flight: InFlight,
    /// One line per proxied request, when enabled.
    pub access: AccessLog,
    /// The spans of sampled requests, when tracing is on.
    pub tracer: Tracer,
    /// Request lines for `weft tap`, made only while someone listens.
    pub tap: Arc<tap::Tap>,
    /// The serving side's metrics, handles resolved per service.
    pub inbound_metrics: inbound::InboundMetrics,
    /// This node's own registrations: what peers may reach here.
    pub registered: inbound::Registered,
    /// The cluster's rate limits, this node's share of each.
    pub admission: admission::Admission,
    /// Active streams per local instance, capped.
    pub instance_slots: inbound::InstanceSlots,
    /// The gossip keys this node hands to members that ask.
    pub keys: Option<Arc<dyn keys::KeyVault>>,
    /// The rollouts under way, each step's attempts counted per tag.
    pub rollouts: rollouts::RolloutMeters,
    /// The cluster's intentions this node adopted (everything allowed
    /// until an operator says otherwise).
    intentions: ArcSwap<Intentions>,
    /// The splits requests follow: the cluster's routes, with each
    /// rollout's split over its service's route.
    routes: ArcSwap<Routes>,
    /// What `routes` is made of.
    splits: Mutex<SplitSources>,
    /// This node's name as a `weft-caller-node` value, made once.
    pub(crate) node_header: http::HeaderValue,
    writer: Option<GossipWriter>,
    stats: StatsHandle,
    policy: RetryPolicy,
}

/// The splits the data plane follows are made of: the routes the cluster
/// adopted and the split of each rollout under way.
#[derive(Debug, Default)]
struct SplitSources {
    routes: Arc<Routes>,
    rollouts: HashMap<String, Vec<Split>>,
}

impl SplitSources {
    fn effective(&self) -> Arc<Routes> {
        if self.rollouts.is_empty() {
            return self.routes.clone();
        }
        let mut routes = Routes::clone(&self.routes);
        for (service, split) in &self.rollouts {
            routes.splits.insert(service.clone(), split.clone());
        }
        Arc::new(routes)
    }
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
    /// Connection caps.
    pub limits: Limits,
    /// The access log (`AccessLog::off()` when not wanted).
    pub access: AccessLog,
    /// Tracing (`Tracer::off()` when not wanted).
    pub tracer: Tracer,
    /// Gossip writes (outlier votes); `None` in tests without gossip.
    pub writer: Option<GossipWriter>,
    /// Merged statistics (the learned delay).
    pub stats: StatsHandle,
    /// Default retry wait policy.
    pub policy: RetryPolicy,
    /// This node's own registrations (`Registered::none()` for a node
    /// that serves no instances).
    pub registered: inbound::Registered,
    /// The gossip keys this node hands to members that ask.
    pub keys: Option<Arc<dyn keys::KeyVault>>,
}

/// What [`DataPlane::maintain`] remembers between runs.
#[derive(Debug, Default)]
pub struct Upkeep {
    /// Each member's incarnation, as of the last run.
    generations: HashMap<String, u64>,
    /// The catalog departed instances were last forgotten against.
    catalog: Option<Arc<Catalog>>,
    /// Every service's state as of that catalog.
    services: Vec<Arc<ServiceState>>,
    /// Services that left the catalog while this node had one of their
    /// instances ejected: kept until the ejection ends, so the gossip vote
    /// is withdrawn (a vote left behind would count against an instance
    /// that comes back with the same id).
    departed: Vec<Arc<ServiceState>>,
}

impl Upkeep {
    /// Forgets the outlier state of instances that left the catalog
    /// `endpoints` were built from, so the detectors do not grow with
    /// instance churn (their load and latency go with the last snapshot
    /// that lists them), and keeps the services that left while one of
    /// their instances is ejected.
    fn forget_departed(&mut self, endpoints: &Endpoints) {
        for (service, state) in endpoints.service_states() {
            let live: HashSet<(&str, &str)> = endpoints
                .service(service)
                .iter()
                .map(|e| (e.instance.node.as_str(), e.instance.id.as_str()))
                .collect();
            state
                .outliers()
                .retain(|(node, id)| live.contains(&(node.as_str(), id.as_str())));
        }
        let current: Vec<Arc<ServiceState>> = endpoints
            .service_states()
            .map(|(_, state)| Arc::clone(state))
            .collect();
        let listed: HashSet<*const ServiceState> = current.iter().map(Arc::as_ptr).collect();
        for gone in std::mem::replace(&mut self.services, current) {
            if listed.contains(&Arc::as_ptr(&gone)) {
                continue;
            }
            let still_ejected = {
                let mut outliers = gone.outliers();
                outliers.retain(|_| false);
                !outliers.is_empty()
            };
            if still_ejected {
                self.departed.push(gone);
            }
        }
    }
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
            limits,
            access,
            tracer,
            writer,
            stats,
            policy,
            registered,
            keys,
        } = parts;
        let node_header =
            http::HeaderValue::from_str(&node).unwrap_or(http::HeaderValue::from_static("-"));
        Arc::new(DataPlane {
            node,
            router,
            tunnels,
            local: LocalClients::new(timeouts.connect),
            outcomes,
            timeouts,
            limits,
            in_flight: InFlight::default(),
            access,
            tracer,
            tap: Arc::default(),
            inbound_metrics: inbound::InboundMetrics::default(),
            registered,
            admission: admission::Admission::default(),
            instance_slots: inbound::InstanceSlots::default(),
            keys,
            rollouts: rollouts::RolloutMeters::default(),
            intentions: ArcSwap::default(),
            routes: ArcSwap::default(),
            splits: Mutex::default(),
            node_header,
            writer,
            stats,
            policy,
        })
    }

    /// Enforces `intentions` from now on.
    pub fn set_intentions(&self, intentions: Arc<Intentions>) {
        self.intentions.store(intentions);
    }

    /// Splits traffic by `routes` from now on (a rollout's split still
    /// wins for its service).
    pub fn set_routes(&self, routes: Arc<Routes>) {
        let mut sources = self.splits.lock().unwrap_or_else(|p| p.into_inner());
        sources.routes = routes;
        self.routes.store(sources.effective());
    }

    /// Splits each service of `rollouts` as given, over its route, from
    /// now on.
    pub fn set_rollout_splits(&self, rollouts: HashMap<String, Vec<Split>>) {
        let mut sources = self.splits.lock().unwrap_or_else(|p| p.into_inner());
        if sources.rollouts == rollouts {
            return;
        }
        sources.rollouts = rollouts;
        self.routes.store(sources.effective());
    }

    /// Whether `caller` may call `service` under the cluster's intentions.
    /// A denial is counted (`weft_requests_denied_total{service,caller}`)
    /// and comes back with the decision that made it.
    pub fn authorize(&self, caller: &str, service: &str) -> Result<(), Decision> {
        let intentions = self.intentions.load();
        if intentions.allows_all() {
            return Ok(());
        }
        let decision = intentions.decide(caller, service);
        if decision.action == Action::Allow {
            return Ok(());
        }
        metrics::counter!("weft_requests_denied_total",
            "service" => service.to_string(), "caller" => caller.to_string())
        .increment(1);
        Err(decision)
    }

    /// The data plane's upkeep, run by its driver a few times a second:
    /// pooled tunnels to nodes that died,
    /// left or restarted are closed, state of departed instances is
    /// forgotten when the catalog moved, and when an ejection ends this
    /// node's gossip vote is withdrawn. `upkeep` is the driver's memory
    /// between runs.
    pub fn maintain(&self, upkeep: &mut Upkeep) {
        let snap = self.router.load();
        for m in &snap.members {
            let gone = matches!(m.state, MemberState::Dead | MemberState::Left);
            let restarted = match upkeep.generations.get_mut(&m.name) {
                Some(g) => std::mem::replace(g, m.generation) != m.generation,
                None => {
                    upkeep.generations.insert(m.name.clone(), m.generation);
                    false
                }
            };
            if gone || restarted {
                self.tunnels.evict(&m.name);
            }
        }
        let catalog_moved = !upkeep
            .catalog
            .as_ref()
            .is_some_and(|seen| Arc::ptr_eq(seen, &snap.catalog));
        if catalog_moved {
            upkeep.forget_departed(&snap.endpoints);
            upkeep.catalog = Some(Arc::clone(&snap.catalog));
        }
        let now = Instant::now();
        let states = snap.endpoints.service_states().map(|(_, state)| state);
        for state in states.chain(&upkeep.departed) {
            for (node, id) in state.outliers().expired(now) {
                tracing::info!(node, id, "outlier ejection ended");
                if let (Some(w), true) = (&self.writer, node != self.node) {
                    w.delete(Key::Eject { node, id });
                }
            }
        }
        upkeep.departed.retain(|state| !state.outliers().is_empty());
    }

    /// Runs `f` on `service`'s retry budget (`None` when the catalog does
    /// not list the service). The lock is the service's own.
    fn budget<T>(&self, service: &str, f: impl FnOnce(&mut ServiceBudget) -> T) -> Option<T> {
        let snap = self.router.load();
        let state = snap.endpoints.service_state(service)?;
        let mut budget = state.budget();
        Some(f(&mut budget))
    }

    /// Counts a client request toward `service`'s retry budget.
    pub fn record_request(&self, service: &str) {
        self.budget(service, |b| b.record_request(Instant::now()));
    }

    /// Asks `service`'s budget for one retry; the cluster-wide floor is
    /// shared with the other nodes that call it.
    pub fn try_retry(&self, service: &str) -> bool {
        let callers = self
            .stats
            .load()
            .services
            .get(service)
            .map_or(1, |s| s.cluster.nodes);
        self.budget(service, |b| b.try_withdraw(callers, Instant::now()))
            .unwrap_or(false)
    }

    /// The timeout of a request to `service`: `configured_ms` (the
    /// instance's `timeout_ms`) if set, else the one learned from the
    /// cluster's latency, else the default.
    pub fn request_timeout(
        &self,
        service: &str,
        configured_ms: Option<u64>,
    ) -> (Duration, TimeoutSource) {
        if let Some(ms) = configured_ms {
            return (Duration::from_millis(ms), TimeoutSource::Configured);
        }
        let learned = self
            .stats
            .load()
            .services
            .get(service)
            .and_then(|s| learned_timeout(&s.cluster));
        match learned {
            Some(timeout) => (timeout, TimeoutSource::Learned),
            None => (self.timeouts.request, TimeoutSource::Default),
        }
    }

    /// Fraction of `service`'s retry budget in use on this node.
    pub fn budget_used(&self, service: &str) -> f64 {
        self.budget(service, |b| b.used_fraction(Instant::now()))
            .unwrap_or(0.0)
    }

    /// A service's retry policy: its own, else this node's.
    pub fn retry_policy(&self, service_policy: Option<RetryPolicy>) -> RetryPolicy {
        service_policy.unwrap_or(self.policy)
    }

    /// The wait before retry number `retry` (1 or 2) to an instance that was
    /// just tried, by the service's policy or this node's default.
    pub fn retry_wait(
        &self,
        service: &str,
        service_policy: Option<RetryPolicy>,
        retry: u8,
    ) -> Duration {
        let mut rng = rand::thread_rng();
        match self.retry_policy(service_policy) {
            RetryPolicy::None => Duration::ZERO,
            RetryPolicy::Exponential => exponential_delay(retry, &mut rng),
            RetryPolicy::Learned => {
                let (merged, start, explore) = self.stats.episodes(service);
                learned_delay(start, Instant::now(), &merged, retry, explore, &mut rng).wait
            }
        }
    }

    /// Holds a request to `service` that arrived during an outage (see
    /// [`outage_hold`]; only under the learned policy) until the outage ends
    /// or the hold runs out, whichever comes first (not at all when the
    /// hold would reach `deadline`). Returns how long it waited (zero: not held).
    pub async fn hold_in_outage(
        &self,
        service: &str,
        service_policy: Option<RetryPolicy>,
        deadline: Instant,
    ) -> Duration {
        if self.retry_policy(service_policy) != RetryPolicy::Learned {
            return Duration::ZERO;
        }
        let (merged, start, _) = self.stats.episodes(service);
        let began = Instant::now();
        let Some(hold) = outage_hold(start, began, &merged, &mut rand::thread_rng()) else {
            return Duration::ZERO;
        };
        let until = began + hold;
        if until >= deadline {
            return Duration::ZERO;
        }
        // Subscribed before the outage is checked again below, so its end
        // cannot slip between the check and the wait.
        let mut published = self.stats.subscribe();
        metrics::counter!("weft_outage_holds_total", "service" => service.to_string()).increment(1);
        while self.stats.in_outage(service) {
            tokio::select! {
                changed = published.changed() => if changed.is_err() { break },
                () = tokio::time::sleep_until(until.into()) => break,
            }
        }
        began.elapsed()
    }

    /// Feeds one attempt's result to passive outlier detection, the
    /// service's own. A success to an instance the detector holds nothing
    /// for takes no lock.
    pub fn observe_outcome(&self, service: &str, endpoint: &Endpoint, failed: bool) {
        if !failed && !endpoint.state.is_suspect() {
            return;
        }
        let snap = self.router.load();
        let Some(state) = snap.endpoints.service_state(service) else {
            return;
        };
        let key = endpoint.key();
        // The sibling list only matters for failures (the ejection cap).
        let siblings: Vec<InstanceKey> = if failed {
            snap.endpoints
                .service(service)
                .iter()
                .map(Endpoint::key)
                .collect()
        } else {
            Vec::new()
        };
        let change = {
            let mut rng = rand::thread_rng();
            let mut outliers = state.outliers();
            let change = outliers.observe(&key, failed, &siblings, Instant::now(), &mut rng);
            endpoint.state.set_suspect(!outliers.is_quiet(&key));
            change
        };
        if let Change::Ejected(until) = change {
            endpoint.state.eject_until(until);
            let (node, id) = key;
            tracing::warn!(service, node, id, secs = ?until.saturating_duration_since(Instant::now()), "instance ejected by outlier detection");
            metrics::counter!("weft_outlier_ejections_total", "service" => service.to_string())
                .increment(1);
            // Vote in gossip; the owner's own instances are judged by its
            // checks, and a gateway to another zone is no one's instance.
            let votes = node != self.node && !weft_gossip::zones::is_gateway(&id);
            if let (Some(w), true) = (&self.writer, votes) {
                w.set(Key::Eject { node, id }, "1".to_string());
            }
        }
    }

    /// True when every routable instance of `service` is ejected, so traffic
    /// goes to all of them anyway (Envoy's panic routing).
    pub fn in_panic(&self, snap: &RouterSnapshot, service: &str) -> bool {
        let now = Instant::now();
        let mut routable = snap
            .endpoints
            .service(service)
            .iter()
            .filter(|e| e.instance.health.routable())
            .peekable();
        routable.peek().is_some() && routable.all(|e| e.is_ejected(now))
    }

    /// Chooses an instance of `service` speaking `protocol` in `snap`
    /// ([`Endpoints::pick`](endpoints::Endpoints::pick)).
    pub fn pick(
        &self,
        snap: &RouterSnapshot,
        service: &str,
        protocol: Protocol,
        tried: &[Endpoint],
    ) -> Result<Endpoint, MeshError> {
        let routes = self.routes.load();
        snap.endpoints
            .pick(
                service,
                protocol,
                routes.split(service),
                tried,
                Instant::now(),
                &mut rand::thread_rng(),
            )
            .cloned()
    }

    /// Marks the start of a request to an instance (raises its load).
    pub fn started(&self, endpoint: &Endpoint) {
        endpoint.state.start();
    }

    /// Marks the end of a request and feeds its latency to the balancer.
    pub fn finished(&self, endpoint: &Endpoint, latency: Duration) {
        endpoint.state.finish(latency, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use weft_gossip::{Catalog, Health};

    use super::endpoints::tests::instance;
    use super::*;

    /// A catalog of `api` with instances `ids` on n2 (none: no `api`).
    fn catalog(ids: &[&str]) -> Catalog {
        let instances = ids.iter().map(|id| instance("n2", id, Health::Passing));
        endpoints::tests::catalog(instances.collect())
    }

    /// Ejects `id` of `api` in `endpoints`' outlier detection at `now`.
    fn eject(endpoints: &Endpoints, id: &str, now: Instant) {
        let state = endpoints.service_state("api").unwrap();
        let siblings: Vec<InstanceKey> =
            endpoints.service("api").iter().map(Endpoint::key).collect();
        let key = ("n2".to_string(), id.to_string());
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..5 {
            state
                .outliers()
                .observe(&key, true, &siblings, now, &mut rng);
        }
        assert!(state.outliers().is_ejected(&key, now));
    }

    #[test]
    fn a_service_that_leaves_keeps_its_ejections_until_they_end() {
        let now = Instant::now();
        let mut upkeep = Upkeep::default();
        let first = Endpoints::build(&catalog(&["a", "b", "c"]), &Endpoints::default());
        upkeep.forget_departed(&first);
        eject(&first, "a", now);
        // b leaves: its state goes; a stays ejected in the same service.
        let second = Endpoints::build(&catalog(&["a", "c"]), &first);
        upkeep.forget_departed(&second);
        assert!(upkeep.departed.is_empty());
        // The whole service leaves while a is ejected.
        let third = Endpoints::build(&catalog(&[]), &second);
        upkeep.forget_departed(&third);
        assert_eq!(upkeep.departed.len(), 1, "kept until the ejection ends");
        let ended = upkeep.departed[0]
            .outliers()
            .expired(now + Duration::from_secs(400));
        assert_eq!(ended, vec![("n2".to_string(), "a".to_string())]);
    }
}
