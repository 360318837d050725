//! The routing table's hot half: per service, the instances a request may go
//! to (the catalog's typed records) and indexed when the catalog changes
//! rather than per request.
//!
//! Each [`Endpoint`] carries its instance's load, latency estimate and
//! ejection in an [`EndpointState`] that every snapshot listing the instance
//! shares, so connection tasks update it without a node-wide lock: a request
//! takes one uncontended per-instance lock to start, one to finish, and
//! `pick` allocates nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng;
use weft_gossip::view::Instances;
use weft_gossip::{Catalog, Health, Instance, Protocol};

use super::MeshError;
use crate::policy::balancer::{pick_preferring, PeakEwma, DEFAULT_DECAY, DEFAULT_RTT};
use crate::policy::outlier::{OutlierConfig, OutlierDetector};
use crate::policy::retry::ServiceBudget;
use crate::policy::routes::{choose_tag, Split};

/// The instant every [`EndpointState`] time is counted from, so times fit
/// in atomics.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn since_epoch(t: Instant) -> u64 {
    u64::try_from(t.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX)
}

/// One instance's live state on this node, shared by every snapshot that
/// lists the instance.
#[derive(Debug)]
pub struct EndpointState {
    /// Latency estimate and requests in flight (an uncontended lock of its
    /// own: held for a few arithmetic operations).
    ewma: Mutex<PeakEwma>,
    /// Ejected by this node's outlier detection until this many nanoseconds
    /// after [`epoch`]; 0 when never ejected.
    ejected_until: AtomicU64,
    /// The outlier detector holds state for it (failures counted, an
    /// ejection served, a pardon pending), so a success must be reported;
    /// when false a success changes nothing and takes no lock.
    suspect: AtomicBool,
}

impl EndpointState {
    fn new(now: Instant) -> Self {
        EndpointState {
            ewma: Mutex::new(PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, now)),
            ejected_until: AtomicU64::new(0),
            suspect: AtomicBool::new(false),
        }
    }

    fn ewma(&self) -> std::sync::MutexGuard<'_, PeakEwma> {
        self.ewma.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The balancer's cost at `now` (see [`PeakEwma::cost`]).
    pub fn cost(&self, now: Instant) -> f64 {
        self.ewma().cost(now)
    }

    /// Counts a request sent to the instance.
    pub fn start(&self) {
        self.ewma().start();
    }

    /// Counts a request finished after `latency`.
    pub fn finish(&self, latency: Duration, now: Instant) {
        let mut e = self.ewma();
        e.end();
        e.observe(latency, now);
    }

    /// Whether this node's outlier detection has it ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > since_epoch(now)
    }

    /// Mirrors an ejection decided by the outlier detector.
    pub fn eject_until(&self, until: Instant) {
        self.ejected_until
            .store(since_epoch(until).max(1), Ordering::Relaxed);
    }

    /// Whether a success must be reported to the outlier detector.
    pub fn is_suspect(&self) -> bool {
        self.suspect.load(Ordering::Relaxed)
    }

    /// Mirrors whether the outlier detector holds state for it.
    pub fn set_suspect(&self, suspect: bool) {
        self.suspect.store(suspect, Ordering::Relaxed);
    }
}

/// One service's live state on this node, shared by every snapshot that
/// lists the service: its retry budget and its instances' outlier
/// detection, each behind a lock of its own, so requests to different
/// services never wait for each other.
#[derive(Debug)]
pub struct ServiceState {
    budget: Mutex<ServiceBudget>,
    outliers: Mutex<OutlierDetector<InstanceKey>>,
}

/// (node, id): an instance's key for the outlier detector and logs.
pub type InstanceKey = (String, String);

impl Default for ServiceState {
    fn default() -> Self {
        ServiceState {
            budget: Mutex::default(),
            outliers: Mutex::new(OutlierDetector::new(OutlierConfig::default())),
        }
    }
}

impl ServiceState {
    /// The service's retry budget on this node.
    pub fn budget(&self) -> std::sync::MutexGuard<'_, ServiceBudget> {
        self.budget.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's outlier detection of the service's instances.
    pub fn outliers(&self) -> std::sync::MutexGuard<'_, OutlierDetector<InstanceKey>> {
        self.outliers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One routable instance: its catalog record and its shared state.
/// Cloning it is two reference counts.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The catalog's record (typed: health, protocol, retry policy and
    /// tunnel address were parsed once, when the catalog changed).
    pub instance: Arc<Instance>,
    /// Load, latency and ejection on this node.
    pub state: Arc<EndpointState>,
}

impl Endpoint {
    /// (node, id): the instance's key for the outlier detector and logs.
    pub fn key(&self) -> InstanceKey {
        (self.instance.node.clone(), self.instance.id.clone())
    }

    /// Whether it is ejected at `now`: by gossip (two callers' votes) or by
    /// this node's own outlier detection.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.instance.health == Health::Ejected || self.state.is_ejected(now)
    }

    /// Whether `self` and `other` are the same instance.
    pub fn same(&self, other: &Endpoint) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    /// Whether its instance carries `tag`.
    pub fn has_tag(&self, tag: &str) -> bool {
        self.instance.tags.iter().any(|t| t == tag)
    }
}

/// Every service's endpoints, built from a catalog.
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    services: HashMap<String, ServiceEndpoints>,
}

/// One service's endpoints and state, and the catalog list they were
/// built from.
#[derive(Debug, Clone)]
struct ServiceEndpoints {
    /// Compared by identity: the catalog shares a service's list until one
    /// of its instances changes.
    instances: Instances,
    endpoints: Arc<[Endpoint]>,
    state: Arc<ServiceState>,
}

impl Endpoints {
    /// The endpoints of `catalog`. A service whose catalog list is the one
    /// `previous` was built from keeps its endpoints as they are; in the
    /// others, instances already in `previous` keep their state (load,
    /// latency, ejection) and new ones start fresh. A service keeps its
    /// state (retry budget) while the catalog lists it. The cost is the
    /// size of the services that changed.
    pub fn build(catalog: &Catalog, previous: &Endpoints) -> Endpoints {
        let now = Instant::now();
        let services = catalog
            .services
            .iter()
            .map(|(name, instances)| {
                let before = previous.services.get(name);
                let service = match before {
                    Some(b) if Arc::ptr_eq(&b.instances, instances) => b.clone(),
                    _ => ServiceEndpoints {
                        instances: Arc::clone(instances),
                        endpoints: endpoints_of(instances, before, now),
                        state: before.map(|b| Arc::clone(&b.state)).unwrap_or_default(),
                    },
                };
                (name.clone(), service)
            })
            .collect();
        Endpoints { services }
    }

    /// The endpoints of `service` (empty when unknown).
    pub fn service(&self, service: &str) -> &[Endpoint] {
        self.services.get(service).map_or(&[], |s| &s.endpoints)
    }

    /// The state of `service` on this node (`None` when the catalog does
    /// not list it).
    pub fn service_state(&self, service: &str) -> Option<&ServiceState> {
        self.services.get(service).map(|s| &*s.state)
    }

    /// Every service's state, by name.
    pub fn service_states(&self) -> impl Iterator<Item = (&str, &Arc<ServiceState>)> {
        self.services
            .iter()
            .map(|(name, s)| (name.as_str(), &s.state))
    }

    /// Chooses an instance of `service` speaking `protocol`, or says why
    /// none: the power of two choices by peak-EWMA cost among the routable
    /// instances that are not ejected (all routable ones when every one
    /// is: panic routing), avoiding those in `tried` when another exists.
    /// With a `split`, first a tag by weight among the tags that have such
    /// an instance, then an instance of that tag. Allocates nothing.
    pub fn pick<R: Rng + ?Sized>(
        &self,
        service: &str,
        protocol: Protocol,
        split: Option<&[Split]>,
        tried: &[Endpoint],
        now: Instant,
        rng: &mut R,
    ) -> Result<&Endpoint, MeshError> {
        let all = self.service(service);
        if all.is_empty() {
            return Err(MeshError::UnknownService);
        }
        let usable = |e: &Endpoint| e.instance.protocol == protocol && e.instance.health.routable();
        let fresh = |e: &Endpoint| usable(e) && !e.is_ejected(now);
        let panic = !all.iter().any(fresh);
        let eligible = |e: &Endpoint| if panic { usable(e) } else { fresh(e) };
        let tag = split.and_then(|split| {
            let available = |tag: &str| all.iter().any(|e| eligible(e) && e.has_tag(tag));
            choose_tag(split, available, rng.gen())
        });
        let in_split = |e: &Endpoint| eligible(e) && tag.is_none_or(|t| e.has_tag(t));
        let untried = |e: &Endpoint| !tried.iter().any(|t| t.same(e));
        pick_preferring(all, in_split, untried, |e| e.state.cost(now), rng)
            .ok_or(MeshError::NoHealthyInstance)
    }
}

/// Typed endpoints of one service's `instances`, sharing the state of the
/// ones `before` already had.
fn endpoints_of(
    instances: &[Arc<Instance>],
    before: Option<&ServiceEndpoints>,
    now: Instant,
) -> Arc<[Endpoint]> {
    let known: HashMap<(&str, &str), &Arc<EndpointState>> = before
        .map_or(&[][..], |b| &b.endpoints)
        .iter()
        .map(|e| ((e.instance.node.as_str(), e.instance.id.as_str()), &e.state))
        .collect();
    instances
        .iter()
        .map(|i| Endpoint {
            instance: Arc::clone(i),
            state: known
                .get(&(i.node.as_str(), i.id.as_str()))
                .map_or_else(|| Arc::new(EndpointState::new(now)), |s| Arc::clone(s)),
        })
        .collect()
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// An HTTP instance `id` on `node`, with nothing registered but its port.
    pub(in crate::dataplane) fn instance(node: &str, id: &str, health: Health) -> Instance {
        Instance {
            id: id.into(),
            node: node.into(),
            port: 8080,
            protocol: Protocol::Http,
            health,
            tags: Vec::new(),
            tunnel_addr: None,
            timeout_ms: None,
            retry: None,
            retry_non_idempotent: false,
            hedge: false,
            adaptive_concurrency: false,
        }
    }

    /// A catalog of the service `api` with `instances` (none: no `api`).
    pub(in crate::dataplane) fn catalog(instances: Vec<Instance>) -> Catalog {
        let mut c = Catalog::default();
        if !instances.is_empty() {
            let list: Instances = instances.into_iter().map(Arc::new).collect();
            c.services.insert("api".into(), list);
        }
        c
    }

    #[test]
    fn an_instance_keeps_its_state_across_catalog_changes() {
        let first = Endpoints::build(
            &catalog(vec![instance("n1", "a", Health::Passing)]),
            &Endpoints::default(),
        );
        let a = first.service("api")[0].clone();
        a.state.start();
        let second = Endpoints::build(
            &catalog(vec![
                instance("n1", "a", Health::Failing),
                instance("n2", "b", Health::Unknown),
            ]),
            &first,
        );
        let eps = second.service("api");
        assert!(eps[0].same(&a), "the same instance shares its state");
        let kept = |e: &Endpoints| e.service_state("api").map(|s| s as *const ServiceState);
        assert_eq!(kept(&first), kept(&second), "the service keeps its budget");
        assert_eq!(eps[0].instance.health, Health::Failing);
        assert!(!eps[1].same(&a));
        assert_eq!(eps[1].instance.health, Health::Unknown);
        assert!(second.service("other").is_empty());
    }

    #[test]
    fn an_ejection_ends_on_its_own() {
        let now = Instant::now();
        let s = EndpointState::new(now);
        assert!(!s.is_ejected(now));
        s.eject_until(now + Duration::from_secs(5));
        assert!(s.is_ejected(now + Duration::from_secs(4)));
        assert!(!s.is_ejected(now + Duration::from_secs(6)));
    }
}
