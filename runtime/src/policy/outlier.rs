//! Passive outlier detection: an instance that keeps failing this node's own
//! requests is ejected for a jittered, growing time, never more than half of a
//! service's instances at once.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use rand::Rng;

/// Settings (Envoy's consecutive-gateway-failure defaults, scaled to weft).
#[derive(Debug, Clone, Copy)]
pub struct OutlierConfig {
    /// Consecutive failures (connect failure, 502, 503, 504) that eject.
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each further ejection.
    pub base_ejection: Duration,
    /// Longest ejection.
    pub max_ejection: Duration,
    /// Most of a service's instances ejected at once, as a fraction.
    pub max_ejected_fraction: f64,
    /// A returned instance that stays clean this long starts over at the base time.
    pub forgive_after: Duration,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
            max_ejected_fraction: 0.5,
            forgive_after: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Default)]
struct InstanceState {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
    last_return: Option<Instant>,
}

/// What an observed outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing.
    None,
    /// The instance was ejected until the given time.
    Ejected(Instant),
}

/// Outlier state of the instances this node calls, keyed by instance.
#[derive(Debug, Default)]
pub struct OutlierDetector<K> {
    config: OutlierConfig,
    instances: HashMap<K, InstanceState>,
}

impl<K: Eq + Hash + Clone> OutlierDetector<K> {
    /// A detector with `config`.
    pub fn new(config: OutlierConfig) -> Self {
        OutlierDetector {
            config,
            instances: HashMap::new(),
        }
    }

    /// Whether `key` is ejected at `now`.
    pub fn is_ejected(&self, key: &K, now: Instant) -> bool {
        self.instances
            .get(key)
            .and_then(|s| s.ejected_until)
            .is_some_and(|until| until > now)
    }

    /// Whether a success to `key` would change nothing: no failures
    /// counted, no ejection served and no pardon pending (see
    /// [`OutlierConfig::forgive_after`]).
    pub fn is_quiet(&self, key: &K) -> bool {
        self.instances.get(key).is_none_or(|s| {
            s.consecutive == 0 && s.ejected_until.is_none() && s.last_return.is_none()
        })
    }

    /// Records one outcome of a request to `key`; `siblings` are the keys of
    /// every instance of its service (only read when a failure reaches the
    /// threshold, so a success may pass an empty slice).
    pub fn observe<R: Rng>(
        &mut self,
        key: &K,
        failed: bool,
        siblings: &[K],
        now: Instant,
        rng: &mut R,
    ) -> Change {
        let cfg = self.config;
        {
            let state = self.instances.entry(key.clone()).or_default();
            if let Some(until) = state.ejected_until {
                if until > now {
                    return Change::None;
                }
                state.ejected_until = None;
                state.last_return = Some(now);
            }
            if !failed {
                state.consecutive = 0;
                if state
                    .last_return
                    .is_some_and(|t| now.saturating_duration_since(t) >= cfg.forgive_after)
                {
                    state.ejections = 0;
                    state.last_return = None;
                }
                return Change::None;
            }
            state.consecutive = state.consecutive.saturating_add(1);
            if state.consecutive < cfg.consecutive_failures {
                return Change::None;
            }
        }
        // Only now, at the threshold, look at the siblings: the cap on ejections.
        let ejected_siblings = siblings
            .iter()
            .filter(|k| *k != key && self.is_ejected(k, now))
            .count();
        let allowed = (siblings.len().max(1) as f64 * cfg.max_ejected_fraction).floor() as usize;
        if ejected_siblings + 1 > allowed {
            return Change::None;
        }
        let Some(state) = self.instances.get_mut(key) else {
            return Change::None;
        };
        state.consecutive = 0;
        let factor = 2u32.saturating_pow(state.ejections.min(16));
        let base = cfg
            .base_ejection
            .saturating_mul(factor)
            .min(cfg.max_ejection);
        let jitter = rng.gen_range(1.0..1.2);
        let time = base.mul_f64(jitter).min(cfg.max_ejection);
        state.ejections = state.ejections.saturating_add(1);
        let until = now + time;
        state.ejected_until = Some(until);
        Change::Ejected(until)
    }

    /// Whether it holds no instance's state.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// Instances whose ejection ended by `now` (each reported once).
    pub fn expired(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        for (key, state) in &mut self.instances {
            if state.ejected_until.is_some_and(|until| until <= now) {
                state.ejected_until = None;
                state.last_return = Some(now);
                out.push(key.clone());
            }
        }
        out
    }

    /// Forgets instances that left the catalog, except those still
    /// ejected: their ejection runs out as usual and [`expired`] reports it,
    /// so the caller withdraws its vote (a vote left behind would count
    /// against an instance that comes back with the same id).
    ///
    /// [`expired`]: OutlierDetector::expired
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.instances
            .retain(|k, state| keep(k) || state.ejected_until.is_some());
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn det() -> OutlierDetector<&'static str> {
        OutlierDetector::new(OutlierConfig::default())
    }

    #[test]
    fn five_consecutive_failures_eject_with_growing_time() {
        let mut d = det();
        let mut rng = StdRng::seed_from_u64(1);
        let t0 = Instant::now();
        let sib = ["a", "b", "c", "d"];
        for i in 0..4 {
            assert_eq!(
                d.observe(&"a", true, &sib, t0, &mut rng),
                Change::None,
                "{i}"
            );
        }
        let Change::Ejected(until) = d.observe(&"a", true, &sib, t0, &mut rng) else {
            panic!("not ejected");
        };
        let first = until - t0;
        assert!(
            first >= Duration::from_secs(5) && first < Duration::from_secs(6),
            "{first:?}"
        );
        assert!(d.is_ejected(&"a", t0 + Duration::from_secs(4)));
        let back = until + Duration::from_millis(1);
        assert!(!d.is_ejected(&"a", back));
        assert_eq!(d.expired(back), vec!["a"]);
        // Second ejection: twice as long.
        let mut last = Change::None;
        for _ in 0..5 {
            last = d.observe(&"a", true, &sib, back, &mut rng);
        }
        let Change::Ejected(until2) = last else {
            panic!("not ejected again")
        };
        let second = until2 - back;
        assert!(
            second >= Duration::from_secs(10) && second < Duration::from_secs(12),
            "{second:?}"
        );
    }

    #[test]
    fn departed_instances_are_forgotten_once_their_ejection_ends() {
        let mut d = det();
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let sib = ["a", "b", "c", "d"];
        d.observe(&"b", false, &sib, t0, &mut rng);
        let mut change = Change::None;
        for _ in 0..5 {
            change = d.observe(&"a", true, &sib, t0, &mut rng);
        }
        let Change::Ejected(until) = change else {
            panic!("not ejected")
        };
        // Both leave the catalog: b is forgotten now; a stays while ejected,
        // so its end is still reported and its vote withdrawn.
        d.retain(|_| false);
        assert!(d.is_ejected(&"a", t0));
        assert_eq!(d.instances.len(), 1);
        assert!(!d.is_empty());
        assert_eq!(d.expired(until), vec!["a"]);
        d.retain(|_| false);
        assert!(d.is_empty());
    }

    #[test]
    fn a_success_resets_the_count() {
        let mut d = det();
        let mut rng = StdRng::seed_from_u64(2);
        let t0 = Instant::now();
        let sib = ["a", "b"];
        for _ in 0..4 {
            d.observe(&"a", true, &sib, t0, &mut rng);
        }
        d.observe(&"a", false, &sib, t0, &mut rng);
        for _ in 0..4 {
            assert_eq!(d.observe(&"a", true, &sib, t0, &mut rng), Change::None);
        }
    }

    #[test]
    fn never_more_than_half_ejected() {
        let mut d = det();
        let mut rng = StdRng::seed_from_u64(3);
        let t0 = Instant::now();
        let sib = ["a", "b"];
        for _ in 0..5 {
            d.observe(&"a", true, &sib, t0, &mut rng);
        }
        assert!(d.is_ejected(&"a", t0));
        for _ in 0..20 {
            assert_eq!(d.observe(&"b", true, &sib, t0, &mut rng), Change::None);
        }
        assert!(!d.is_ejected(&"b", t0));
        // A lone instance is never ejected.
        for _ in 0..20 {
            assert_eq!(
                d.observe(&"solo", true, &["solo"], t0, &mut rng),
                Change::None
            );
        }
    }

    #[test]
    fn ejection_time_is_capped() {
        let mut d = det();
        let mut rng = StdRng::seed_from_u64(4);
        let mut now = Instant::now();
        let sib = ["a", "b"];
        let mut longest = Duration::ZERO;
        for _ in 0..12 {
            for _ in 0..5 {
                if let Change::Ejected(until) = d.observe(&"a", true, &sib, now, &mut rng) {
                    longest = longest.max(until - now);
                    now = until + Duration::from_millis(1);
                }
            }
        }
        assert_eq!(longest, Duration::from_secs(300));
    }

    #[test]
    fn clean_period_forgives() {
        let mut d = det();
        let mut rng = StdRng::seed_from_u64(5);
        let t0 = Instant::now();
        let sib = ["a", "b"];
        for _ in 0..5 {
            d.observe(&"a", true, &sib, t0, &mut rng);
        }
        let back = t0 + Duration::from_secs(7);
        d.observe(&"a", false, &sib, back, &mut rng);
        d.observe(&"a", false, &sib, back + Duration::from_secs(61), &mut rng);
        let later = back + Duration::from_secs(62);
        let mut last = Change::None;
        for _ in 0..5 {
            last = d.observe(&"a", true, &sib, later, &mut rng);
        }
        let Change::Ejected(until) = last else {
            panic!()
        };
        assert!(
            until - later < Duration::from_secs(6),
            "back at the base time"
        );
    }
}
