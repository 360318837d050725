//! Admission: whether a request may go on at all. Two checks, each
//! sharing a cluster-wide number among the nodes in proportion to the
//! demand each sees against the demand the others gossip:
//!
//! - the cluster's rate limits ([`crate::policy::rate`]), asked before an
//!   instance is picked; with no limit set, a request pays one atomic load;
//! - adaptive concurrency ([`crate::policy::concurrency`]) for services
//!   registered with it: a [`Slot`] holds a request in flight.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crate::policy::concurrency::{self, ConcurrencyReport, ConcurrencyState, Others, Overloaded};
use crate::policy::rate::{LimitState, OverLimit, RateLimit, RateLimits};
use arc_swap::ArcSwap;

/// Demand per limit scope (`service` or `service/caller`), requests a
/// second: what a node gossips, and what the others add up to.
pub type Demand = BTreeMap<String, f64>;

/// The cluster's rate limits and adaptive concurrency as this node
/// enforces them.
#[derive(Debug, Default)]
pub struct Admission {
    limits: ArcSwap<RateLimits>,
    /// Per limit scope, this node's demand and bucket.
    states: Mutex<HashMap<String, LimitState>>,
    /// Per service under adaptive concurrency, this node's controller.
    concurrency: Mutex<HashMap<String, ConcurrencyState>>,
}

/// A request admitted under its service's adaptive concurrency: in flight
/// until dropped, with the latency of its last attempt.
#[derive(Debug)]
pub struct Slot<'a> {
    admission: &'a Admission,
    service: String,
    probed: bool,
    latency: Option<Duration>,
}

impl Slot<'_> {
    /// An attempt took `latency`.
    pub fn observe(&mut self, latency: Duration) {
        self.latency = Some(latency);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut states = self.admission.lock_concurrency();
        if let Some(state) = states.get_mut(&self.service) {
            state.finish(self.latency, self.probed, Instant::now());
        }
    }
}

/// One service under adaptive concurrency as this node sees it now.
#[derive(Debug, Clone)]
pub struct ConcurrencyStatus {
    /// The service.
    pub service: String,
    /// The cluster-wide limit (the mean of the live nodes').
    pub limit: f64,
    /// This node's share of it.
    pub share: f64,
    /// This node's requests in flight.
    pub in_flight: u32,
    /// The latency at low load, once measured.
    pub min_rtt: Option<Duration>,
}

/// A request refused at a rate limit.
#[derive(Debug, Clone)]
pub struct RateLimited {
    /// The limit that refused it.
    pub limit: RateLimit,
    /// When to come back, and this node's share.
    pub over: OverLimit,
}

/// One limit as this node sees it now.
#[derive(Debug, Clone)]
pub struct LimitStatus {
    /// The limit.
    pub limit: RateLimit,
    /// Requests a second arriving here.
    pub demand: f64,
    /// Requests a second this node admits.
    pub share: f64,
    /// Requests a second arriving at all live nodes, this one's included
    /// (the others' as gossip last reported it).
    pub cluster_demand: f64,
}

impl Admission {
    /// Enforces `limits` from now on; a removed limit's state goes.
    pub fn set_limits(&self, limits: Arc<RateLimits>) {
        let scopes: Vec<String> = limits.limits.iter().map(RateLimit::scope).collect();
        self.limits.store(limits);
        self.lock().retain(|scope, _| scopes.contains(scope));
    }

    /// Counts a request of `caller` to `service` against every limit that
    /// applies to it, and admits it if this node's share of each has room.
    /// A refusal is counted in
    /// `weft_requests_rate_limited_total{service,caller}`.
    pub fn check(&self, service: &str, caller: &str) -> Result<(), RateLimited> {
        let limits = self.limits.load();
        if limits.is_empty() {
            return Ok(());
        }
        let applying = limits.limits.iter().filter(|l| l.applies(service, caller));
        let mut states = None;
        let now = Instant::now();
        for limit in applying {
            let states = states.get_or_insert_with(|| self.lock());
            let state = states.entry(limit.scope()).or_default();
            if let Err(over) = state.admit(limit.rate, now) {
                metrics::counter!("weft_requests_rate_limited_total",
                    "service" => service.to_string(), "caller" => caller.to_string())
                .increment(1);
                let limit = limit.clone();
                return Err(RateLimited { limit, over });
            }
        }
        Ok(())
    }

    /// This node's demand per limit that saw any, for gossip.
    pub fn demand(&self) -> Demand {
        let now = Instant::now();
        self.lock()
            .iter_mut()
            .map(|(scope, state)| (scope.clone(), state.demand(now)))
            .filter(|(_, demand)| *demand > 0.0)
            .collect()
    }

    /// What the other live nodes report, summed per scope.
    pub fn set_others(&self, others: &Demand) {
        let limits = self.limits.load();
        let mut states = self.lock();
        for limit in &limits.limits {
            let scope = limit.scope();
            let reported = others.get(&scope).copied().unwrap_or(0.0);
            states.entry(scope).or_default().set_others(reported);
        }
    }

    /// Every limit with this node's demand and share now.
    pub fn status(&self) -> Vec<LimitStatus> {
        let limits = self.limits.load();
        let now = Instant::now();
        let mut states = self.lock();
        limits
            .limits
            .iter()
            .map(|limit| {
                let state = states.entry(limit.scope()).or_default();
                let demand = state.demand(now);
                LimitStatus {
                    limit: limit.clone(),
                    demand,
                    share: state.share(limit.rate, now),
                    cluster_demand: demand + state.others(),
                }
            })
            .collect()
    }

    /// Admits a request to `service` (registered with adaptive
    /// concurrency) if this node's share of its limit has room.
    pub fn enter(&self, service: &str) -> Result<Slot<'_>, Overloaded> {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let probe = concurrency::probing(since_epoch);
        let mut states = self.lock_concurrency();
        let state = match states.get_mut(service) {
            Some(state) => state,
            None => states.entry(service.to_string()).or_default(),
        };
        let probed = state.enter(probe, Instant::now())?;
        Ok(Slot {
            admission: self,
            service: service.to_string(),
            probed,
            latency: None,
        })
    }

    /// This node's report of each service under adaptive concurrency, for
    /// gossip.
    pub fn concurrency_reports(&self) -> BTreeMap<String, ConcurrencyReport> {
        let now = Instant::now();
        self.lock_concurrency()
            .iter_mut()
            .map(|(service, state)| (service.clone(), state.report(now)))
            .collect()
    }

    /// What the other live nodes report, per service.
    pub fn set_concurrency_others(&self, others: &BTreeMap<String, Others>) {
        for (service, state) in self.lock_concurrency().iter_mut() {
            state.set_others(others.get(service).copied().unwrap_or_default());
        }
    }

    /// Every service under adaptive concurrency, as this node sees it now.
    pub fn concurrency_status(&self) -> Vec<ConcurrencyStatus> {
        let now = Instant::now();
        let mut states = self.lock_concurrency();
        let mut all: Vec<ConcurrencyStatus> = states
            .iter_mut()
            .map(|(service, state)| ConcurrencyStatus {
                service: service.clone(),
                limit: state.cluster_limit(),
                share: state.share(now),
                in_flight: state.in_flight(),
                min_rtt: state.min_rtt(),
            })
            .collect();
        all.sort_by(|a, b| a.service.cmp(&b.service));
        all
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, LimitState>> {
        self.states.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_concurrency(&self) -> MutexGuard<'_, HashMap<String, ConcurrencyState>> {
        self.concurrency.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(spec: &[(&str, Option<&str>, &str)]) -> Arc<RateLimits> {
        let mut limits = RateLimits::default();
        for (service, caller, rate) in spec {
            limits = limits
                .with(service, *caller, Some(rate.parse().unwrap()))
                .unwrap();
        }
        Arc::new(limits)
    }

    #[test]
    fn nothing_is_limited_until_a_limit_is_set() {
        let admission = Admission::default();
        assert!((0..1000).all(|_| admission.check("api", "-").is_ok()));
        assert!(admission.demand().is_empty());
    }

    #[test]
    fn a_caller_limit_counts_only_that_caller() {
        let admission = Admission::default();
        admission.set_limits(limits(&[("api", Some("web"), "5/s")]));
        assert!((0..100).all(|_| admission.check("api", "batch").is_ok()));
        let refused = (0..100)
            .filter_map(|_| admission.check("api", "web").err())
            .collect::<Vec<_>>();
        assert!(refused.len() >= 90, "{}", refused.len());
        assert_eq!(refused[0].limit.scope(), "api/web");
        let demand = admission.demand();
        assert_eq!(demand.keys().collect::<Vec<_>>(), ["api/web"]);
        assert!(demand["api/web"] >= 100.0, "{demand:?}");
    }

    #[test]
    fn the_others_demand_shrinks_the_share_and_a_removed_limit_goes() {
        let admission = Admission::default();
        admission.set_limits(limits(&[("api", None, "100/s")]));
        admission.check("api", "-").unwrap();
        let alone = admission.status()[0].share;
        assert_eq!(alone, 100.0);
        admission.set_others(&Demand::from([("api".to_string(), 1000.0)]));
        let shared = admission.status()[0].share;
        assert!(shared < 1.0, "{shared}");
        admission.set_limits(Arc::new(RateLimits::default()));
        assert!(admission.status().is_empty() && admission.demand().is_empty());
    }
}
