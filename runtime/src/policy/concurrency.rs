//! Adaptive concurrency: a service registered with `"concurrency":
//! "adaptive"` gets a limit on its requests in flight, learned from its
//! latency, cluster-wide.
//!
//! Each node runs a gradient controller (as Netflix's concurrency-limits
//! and Envoy's adaptive concurrency filter do): every [`INTERVAL`] it
//! compares the latency it sees (the interval's median) with the latency
//! at low load, and moves the limit by that ratio plus a headroom of its
//! square root. The latency at low load is measured in probes: for one
//! interval the cluster admits only [`MIN_LIMIT`] requests (each node at
//! least one), when a node first sees the service and then every
//! [`PROBE_PERIOD`] at the same wall-clock moment on every node, so that
//! the whole cluster is quiet while it measures.
//!
//! The limit is the cluster's: nodes gossip theirs with their demand,
//! start each step from the mean of the live nodes' limits, and each
//! admits its share of it in proportion to its demand.
//!
//! Pure logic with `now` passed in.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::rate::DemandMeter;

/// How often the limit moves (given [`MIN_SAMPLES`]).
pub const INTERVAL: Duration = Duration::from_millis(250);

/// Latencies an interval needs before the limit moves on it.
const MIN_SAMPLES: usize = 8;

/// Latencies kept per interval (the rest are not needed for a median).
const MAX_SAMPLES: usize = 512;

/// The limit a service starts with, cluster-wide, once its latency at low
/// load is known.
pub const INITIAL_LIMIT: f64 = 20.0;

/// The smallest cluster-wide limit.
pub const MIN_LIMIT: f64 = 2.0;

/// The largest cluster-wide limit.
pub const MAX_LIMIT: f64 = 10_000.0;

/// How far over the low-load latency the service may run before the limit
/// shrinks.
const TOLERANCE: f64 = 0.1;

/// How often the cluster measures the latency at low load again.
pub const PROBE_PERIOD: Duration = Duration::from_secs(30);

/// How much of a new limit is taken each step.
const SMOOTHING: f64 = 0.5;

/// One service's limit as this node learns it.
#[derive(Debug, Clone)]
pub struct Gradient {
    limit: f64,
    min_rtt: Option<f64>,
    samples: Vec<f64>,
    /// Latencies of requests admitted in a probe.
    probed: Vec<f64>,
    started: Option<Instant>,
}

impl Default for Gradient {
    fn default() -> Self {
        Gradient {
            limit: INITIAL_LIMIT,
            min_rtt: None,
            samples: Vec::new(),
            probed: Vec::new(),
            started: None,
        }
    }
}

impl Gradient {
    /// The cluster-wide limit this node holds now.
    pub fn limit(&self) -> f64 {
        self.limit
    }

    /// The latency at low load, once known.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt.map(Duration::from_secs_f64)
    }

    /// One request's latency; `probed`: it was admitted in a probe.
    pub fn record(&mut self, latency: Duration, probed: bool, now: Instant) {
        self.started.get_or_insert(now);
        let samples = if probed {
            &mut self.probed
        } else {
            &mut self.samples
        };
        if samples.len() < MAX_SAMPLES {
            samples.push(latency.as_secs_f64());
        }
    }

    /// Moves the limit if an interval with enough samples has passed,
    /// starting from `cluster` (the mean of the live nodes' limits).
    /// `used`: whether the limit was nearly reached in the interval (an
    /// unused limit does not grow). Returns whether it moved.
    pub fn update(&mut self, cluster: f64, used: bool, now: Instant) -> bool {
        let Some(started) = self.started else {
            return false;
        };
        if now.saturating_duration_since(started) < INTERVAL {
            return false;
        }
        if !self.probed.is_empty() {
            self.min_rtt = Some(median(&mut self.probed));
            self.probed.clear();
        }
        let Some(min_rtt) = self.min_rtt else {
            return false;
        };
        if self.samples.len() < MIN_SAMPLES {
            return false;
        }
        let sample = median(&mut self.samples);
        self.samples.clear();
        self.started = None;
        let from = if cluster.is_finite() && cluster > 0.0 {
            cluster
        } else {
            self.limit
        };
        let gradient = (min_rtt * (1.0 + TOLERANCE) / sample).clamp(0.5, 1.5);
        let mut next = from * gradient + from.sqrt();
        if !used {
            next = next.min(from);
        }
        let next = from + SMOOTHING * (next - from);
        self.limit = next.clamp(MIN_LIMIT, MAX_LIMIT);
        true
    }
}

/// Whether the cluster probes now: the first [`INTERVAL`] of every
/// [`PROBE_PERIOD`] since the Unix epoch (`since_epoch`), the same moment
/// on every node whose clock is kept.
pub fn probing(since_epoch: Duration) -> bool {
    let period = PROBE_PERIOD.as_millis();
    since_epoch.as_millis() % period < INTERVAL.as_millis()
}

fn median(samples: &mut [f64]) -> f64 {
    let mid = samples.len() / 2;
    *samples.select_nth_unstable_by(mid, f64::total_cmp).1
}

/// One service's admission on one node: its controller, its demand, what
/// is in flight, and what the other nodes report.
#[derive(Debug, Clone, Default)]
pub struct ConcurrencyState {
    gradient: Gradient,
    demand: DemandMeter,
    in_flight: u32,
    /// The most in flight since the last step.
    peak: u32,
    others: Others,
}

/// What a node gossips of each service under adaptive concurrency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ConcurrencyReport {
    /// Its cluster-wide limit.
    #[serde(rename = "l")]
    pub limit: f64,
    /// Its demand, requests a second.
    #[serde(rename = "d")]
    pub demand: f64,
    /// Its requests in flight.
    #[serde(rename = "f")]
    pub in_flight: u32,
}

/// What the other live nodes report for a service.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Others {
    /// Their demand, requests a second, in all.
    pub demand: f64,
    /// The sum of their limits.
    pub limits: f64,
    /// How many reported a limit.
    pub nodes: u32,
}

/// A request refused for the service's concurrency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overloaded {
    /// In flight from this node when it refused.
    pub in_flight: u32,
    /// This node's share of the limit then.
    pub share: f64,
}

impl ConcurrencyState {
    /// Admits one more request if this node's share has room; it counts
    /// as in flight until [`ConcurrencyState::finish`]. `probe`: the
    /// cluster is measuring the latency at low load now (as is every node
    /// that has not measured it yet). Admitted, says whether in a probe.
    pub fn enter(&mut self, probe: bool, now: Instant) -> Result<bool, Overloaded> {
        self.demand.record(now);
        let probe = probe || self.gradient.min_rtt.is_none();
        let share = if probe {
            self.share_of(MIN_LIMIT, now)
        } else {
            self.share(now)
        };
        if f64::from(self.in_flight) + 1.0 > share.ceil() {
            return Err(Overloaded {
                in_flight: self.in_flight,
                share,
            });
        }
        self.in_flight += 1;
        if !probe {
            self.peak = self.peak.max(self.in_flight);
        }
        Ok(probe)
    }

    /// A request admitted by [`ConcurrencyState::enter`] (in a probe:
    /// `probed`) ended after `latency` (`None`: without an answer worth
    /// measuring).
    pub fn finish(&mut self, latency: Option<Duration>, probed: bool, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(latency) = latency {
            self.gradient.record(latency, probed, now);
        }
        let used = f64::from(self.peak) >= 0.8 * self.share(now).floor();
        if self.gradient.update(self.cluster_limit(), used, now) {
            self.peak = self.in_flight;
        }
    }

    /// This node's share of the cluster's limit: in proportion to its
    /// demand, at least one request.
    pub fn share(&mut self, now: Instant) -> f64 {
        self.share_of(self.cluster_limit(), now)
    }

    fn share_of(&mut self, limit: f64, now: Instant) -> f64 {
        let demand = self.demand.rate(now);
        super::rate::share(limit, demand, self.others.demand).max(1.0)
    }

    /// The mean of the live nodes' limits, this node's included.
    pub fn cluster_limit(&self) -> f64 {
        let nodes = f64::from(self.others.nodes) + 1.0;
        (self.others.limits + self.gradient.limit()) / nodes
    }

    /// This node's own limit, demand and in-flight count, for gossip.
    pub fn report(&mut self, now: Instant) -> ConcurrencyReport {
        ConcurrencyReport {
            limit: self.gradient.limit(),
            demand: self.demand.rate(now),
            in_flight: self.in_flight,
        }
    }

    /// Requests in flight from this node now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }

    /// What the other live nodes last reported.
    pub fn set_others(&mut self, others: Others) {
        self.others = others;
    }

    /// The latency at low load, once known.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.gradient.min_rtt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that serves `capacity` requests at once in `service` time
    /// each and queues the rest: a request's latency with `in_flight` in
    /// flight.
    fn latency(capacity: u32, service: Duration, in_flight: u32) -> Duration {
        let waves = in_flight.div_ceil(capacity).max(1);
        service * waves
    }

    /// Drives one node's state with `callers` always-busy callers against
    /// such a service for `seconds`; the in-flight counts seen.
    fn drive(state: &mut ConcurrencyState, callers: u32, seconds: u64) -> Vec<u32> {
        let t0 = Instant::now();
        let (capacity, service) = (10, Duration::from_millis(20));
        let mut seen = Vec::new();
        for step in 0..seconds * 50 {
            let now = t0 + Duration::from_millis(step * 20);
            let mut admitted = 0;
            let mut probed = false;
            for _ in 0..callers {
                if let Ok(probe) = state.enter(false, now) {
                    admitted += 1;
                    probed = probe;
                }
            }
            seen.push(admitted);
            let took = latency(capacity, service, admitted);
            for _ in 0..admitted {
                state.finish(Some(took), probed, now + took);
            }
        }
        seen
    }

    #[test]
    fn the_limit_settles_near_the_capacity() {
        let mut state = ConcurrencyState::default();
        let seen = drive(&mut state, 60, 30);
        let late = &seen[seen.len() - 250..];
        let mean = late.iter().sum::<u32>() as f64 / late.len() as f64;
        // Capacity 10: at least that many in flight (goodput), not so
        // many that requests wait a second wave for long.
        assert!((10.0..=20.0).contains(&mean), "{mean} in flight");
        assert_eq!(state.min_rtt(), Some(Duration::from_millis(20)));
    }

    #[test]
    fn every_node_probes_in_the_same_window() {
        let at = |ms: u64| probing(Duration::from_millis(ms));
        assert!(at(0) && at(60_000 + 249) && at(30_000 * 7 + 10));
        assert!(!at(250) && !at(29_999) && !at(60_000 + 250));
    }

    #[test]
    fn an_unused_limit_does_not_grow() {
        let mut state = ConcurrencyState::default();
        drive(&mut state, 2, 10);
        assert!(
            state.cluster_limit() <= INITIAL_LIMIT,
            "{}",
            state.cluster_limit()
        );
    }

    #[test]
    fn a_node_admits_its_share_of_the_cluster_limit() {
        let now = Instant::now();
        let mut state = ConcurrencyState::default();
        // Two others at limit 20 each, asking three times what this node does.
        state.set_others(Others {
            demand: 300.0,
            limits: 40.0,
            nodes: 2,
        });
        state.gradient.min_rtt = Some(0.01);
        for i in 0..100 {
            let _ = state.enter(false, now + Duration::from_millis(i * 10));
        }
        let at = now + Duration::from_millis(1000);
        let share = state.share(at);
        assert!((4.0..=6.0).contains(&share), "{share}");
        let refused = (0..10).find_map(|_| state.enter(false, at).err()).unwrap();
        assert_eq!(f64::from(refused.in_flight), refused.share.ceil());
    }

    #[test]
    fn a_slower_service_lowers_the_limit_and_recovery_raises_it() {
        let t0 = Instant::now();
        let mut g = Gradient::default();
        g.record(Duration::from_millis(10), true, t0);
        let feed = |g: &mut Gradient, ms: u64, from: u64| {
            let mut t = from;
            for _ in 0..40 {
                for _ in 0..10 {
                    g.record(
                        Duration::from_millis(ms),
                        false,
                        t0 + Duration::from_millis(t),
                    );
                }
                t += 300;
                g.update(g.limit(), true, t0 + Duration::from_millis(t));
            }
            t
        };
        let t = feed(&mut g, 10, 0);
        let high = g.limit();
        assert!(high > INITIAL_LIMIT, "grows while latency holds: {high}");
        let t = feed(&mut g, 40, t);
        let low = g.limit();
        assert!(low < high / 2.0, "shrinks on 4x latency: {low}");
        assert_eq!(g.min_rtt(), Some(Duration::from_millis(10)));
        feed(&mut g, 10, t);
        assert!(g.limit() > 4.0 * low, "grows back: {}", g.limit());
    }
}
