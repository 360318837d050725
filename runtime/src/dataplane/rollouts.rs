//! What this node measures of each rollout's current step: every attempt
//! that reaches the stable tag or the canary, counted with its latency,
//! so the node can gossip its side of the step's statistics (see
//! [`crate::policy::rollout`]).
//!
//! With no rollout the request path pays one `ArcSwap` load and an empty
//! map's lookup per attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use sketches_ddsketch::DDSketch;

use super::endpoints::Endpoint;
use crate::policy::rollout::{StepStats, TagStats};
use crate::policy::stats::{duration_ms, new_sketch, quantile};

/// Which step of which rollout a meter counts, and the two tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeteredStep {
    /// The rollout's `started`.
    pub started: u64,
    /// Its step.
    pub step: u8,
    /// The stable tag.
    pub from: String,
    /// The canary's tag.
    pub to: String,
}

/// One tag's attempts in a step.
struct TagMeter {
    n: u64,
    errors: u64,
    latency: DDSketch,
}

impl Default for TagMeter {
    fn default() -> Self {
        TagMeter {
            n: 0,
            errors: 0,
            latency: new_sketch(),
        }
    }
}

impl std::fmt::Debug for TagMeter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TagMeter")
            .field("n", &self.n)
            .field("errors", &self.errors)
            .finish_non_exhaustive()
    }
}

impl TagMeter {
    fn observe(&mut self, failed: bool, latency: Duration) {
        self.n += 1;
        self.errors += u64::from(failed);
        self.latency.add(duration_ms(latency));
    }

    fn stats(&self) -> TagStats {
        let p99_ms = quantile(&self.latency, 0.99).unwrap_or(0.0);
        TagStats {
            n: self.n,
            errors: self.errors,
            p99_us: (p99_ms * 1000.0) as u64,
        }
    }
}

/// One service's meter for one step.
#[derive(Debug)]
struct Meter {
    step: MeteredStep,
    /// Stable tag, canary.
    tags: Mutex<[TagMeter; 2]>,
}

impl Meter {
    fn observe(&self, endpoint: &Endpoint, failed: bool, latency: Duration) {
        let side = if endpoint.has_tag(&self.step.to) {
            1
        } else if endpoint.has_tag(&self.step.from) {
            0
        } else {
            return;
        };
        let mut tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        tags[side].observe(failed, latency);
    }

    fn stats(&self) -> StepStats {
        let tags = self.tags.lock().unwrap_or_else(|p| p.into_inner());
        StepStats {
            started: self.step.started,
            step: self.step.step,
            stable: tags[0].stats(),
            canary: tags[1].stats(),
        }
    }
}

/// The meters of the rollouts under way, by service.
#[derive(Debug, Default)]
pub struct RolloutMeters {
    meters: ArcSwap<HashMap<String, Arc<Meter>>>,
}

impl RolloutMeters {
    /// Counts one attempt to `endpoint` of `service`, if `service` is under
    /// a rollout and the endpoint carries one of its tags.
    pub fn observe(&self, service: &str, endpoint: &Endpoint, failed: bool, latency: Duration) {
        let meters = self.meters.load();
        if meters.is_empty() {
            return;
        }
        if let Some(meter) = meters.get(service) {
            meter.observe(endpoint, failed, latency);
        }
    }

    /// Meters exactly `steps` from now on: a service whose step is
    /// unchanged keeps its counts, a new step starts from zero, and a
    /// service not listed is no longer metered.
    pub fn meter(&self, steps: &HashMap<String, MeteredStep>) {
        let current = self.meters.load();
        let unchanged = steps
            .iter()
            .all(|(service, step)| current.get(service).is_some_and(|m| &m.step == step));
        if unchanged && current.len() == steps.len() {
            return;
        }
        let next = steps
            .iter()
            .map(|(service, step)| {
                let meter = match current.get(service) {
                    Some(m) if &m.step == step => m.clone(),
                    _ => Arc::new(Meter {
                        step: step.clone(),
                        tags: Mutex::default(),
                    }),
                };
                (service.clone(), meter)
            })
            .collect();
        self.meters.store(Arc::new(next));
    }

    /// This node's statistics of `service`'s current step so far.
    pub fn stats(&self, service: &str) -> Option<StepStats> {
        self.meters.load().get(service).map(|m| m.stats())
    }
}
