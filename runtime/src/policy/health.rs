//! The health state machine of one checked instance: rise/fall thresholds so a
//! single blip does not flap, and TTL expiry for checks the service refreshes.

use std::time::{Duration, Instant};

use weft_gossip::Health;

/// Consecutive results needed to change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Passes needed to become passing.
    pub rise: u32,
    /// Failures needed to become failing.
    pub fall: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { rise: 2, fall: 3 }
    }
}

/// Rise/fall state of one instance.
#[derive(Debug, Clone)]
pub struct HealthState {
    state: Health,
    passes: u32,
    failures: u32,
    thresholds: Thresholds,
}

impl HealthState {
    /// A new instance starts unknown; its first result decides quickly (one
    /// pass or one failure), later changes need the thresholds.
    pub fn new(thresholds: Thresholds) -> Self {
        HealthState {
            state: Health::Unknown,
            passes: 0,
            failures: 0,
            thresholds,
        }
    }

    /// Current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Feeds one check result; returns the new state if it changed.
    pub fn observe(&mut self, passed: bool) -> Option<Health> {
        if passed {
            self.passes = self.passes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.passes = 0;
        }
        let next = match self.state {
            Health::Unknown if passed => Health::Passing,
            Health::Unknown => Health::Failing,
            Health::Failing if self.passes >= self.thresholds.rise.max(1) => Health::Passing,
            Health::Passing if self.failures >= self.thresholds.fall.max(1) => Health::Failing,
            same => same,
        };
        if next != self.state {
            self.state = next;
            Some(next)
        } else {
            None
        }
    }
}

/// A TTL check: passing while the service refreshes it in time.
#[derive(Debug, Clone)]
pub struct Ttl {
    ttl: Duration,
    last_refresh: Option<Instant>,
}

impl Ttl {
    /// A TTL that has not been refreshed yet.
    pub fn new(ttl: Duration) -> Self {
        Ttl {
            ttl,
            last_refresh: None,
        }
    }

    /// The service said it is alive.
    pub fn refresh(&mut self, now: Instant) {
        self.last_refresh = Some(now);
    }

    /// Whether the TTL holds at `now` (`None` before the first refresh).
    pub fn passing(&self, now: Instant) -> Option<bool> {
        self.last_refresh
            .map(|t| now.saturating_duration_since(t) <= self.ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_result_decides_then_thresholds_apply() {
        let mut h = HealthState::new(Thresholds::default());
        assert_eq!(h.state(), Health::Unknown);
        assert_eq!(h.observe(true), Some(Health::Passing));
        // One and two failures are blips.
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.state(), Health::Passing);
        // Three in a row fail it.
        h.observe(false);
        h.observe(false);
        assert_eq!(h.observe(false), Some(Health::Failing));
        // One pass is not enough to rise.
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(false), None);
        assert_eq!(h.observe(true), None);
        assert_eq!(h.observe(true), Some(Health::Passing));
    }

    #[test]
    fn unknown_fails_on_first_failure() {
        let mut h = HealthState::new(Thresholds::default());
        assert_eq!(h.observe(false), Some(Health::Failing));
    }

    #[test]
    fn alternating_results_never_flap() {
        let mut h = HealthState::new(Thresholds::default());
        h.observe(true);
        for i in 0..100 {
            assert_eq!(h.observe(i % 2 == 0), None);
        }
        assert_eq!(h.state(), Health::Passing);
    }

    #[test]
    fn ttl_expires() {
        let t0 = Instant::now();
        let mut ttl = Ttl::new(Duration::from_secs(10));
        assert_eq!(ttl.passing(t0), None);
        ttl.refresh(t0);
        assert_eq!(ttl.passing(t0 + Duration::from_secs(10)), Some(true));
        assert_eq!(ttl.passing(t0 + Duration::from_millis(10_001)), Some(false));
        ttl.refresh(t0 + Duration::from_secs(20));
        assert_eq!(ttl.passing(t0 + Duration::from_secs(25)), Some(true));
    }
}
