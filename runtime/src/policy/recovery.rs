//! How long a service takes to recover, learned without feeding on itself
//! (DESIGN section 7, second generation).
//!
//! An outage episode does not measure the outage: it only says that the
//! service recovered after the last failure this node saw (`lower`, time
//! since the episode's first failure) and before the first success it saw
//! (`upper`). A retry sent after a learned wait that succeeds says only that
//! the outage was shorter than the wait, so recording `upper` makes the
//! estimate creep up with every generation, and nothing ever moves it down.
//!
//! Each episode is therefore a censored observation, and the retry wait
//! itself is the experiment: a retry at the learned wait `theta` asks "is
//! the outage over by `theta`?". [`RecoveryEstimate`] is a stochastic
//! approximation of the `level` quantile of the outage length in log space
//! (Robbins-Monro on current-status data): an episode that saw a failure at
//! or after `theta` moves it up by `STEP * level`, one that recovered by the
//! (stretched) wait moves it down by `STEP * (1 - level)`, and one with no
//! attempt near `theta` teaches nothing. At the fixed point a retry at the
//! learned wait fails `1 - level` of the time: the estimate sits at the
//! quantile, from above or below.
//!
//! Moving down by `STEP * (1 - level)` is slow, so an episode that was over
//! well before the estimate (by `EXPLORE_FRACTION` of it) moves it down
//! [`STRONG`] times as far. Concurrent callers see such episodes whenever
//! the estimate is too high; a single sequential caller only waits the
//! learned time, so the learned wait now and then explores:
//! [`super::episodes::learned_delay`] sends a first retry at
//! `EXPLORE_FRACTION` of the wait instead. Near the fixed point early
//! retries fail, so exploring costs one early attempt now and then (inside
//! the retry budget) and biases nothing there.
//!
//! Pure logic: durations in, an estimate out.

use std::time::Duration;

/// Log-space step of one observation: an up-step moves the estimate by
/// `e^(0.2 * 0.9)`, about +20%, the noise it keeps at its fixed point.
pub const STEP: f64 = 0.2;

/// Share of the learned wait an exploring first retry waits.
pub const EXPLORE_FRACTION: f64 = 0.6;

/// How much more an episode over well before the estimate moves it down
/// than one over by the learned wait. Near the fixed point of a steady
/// outage no episode is over that early, so it biases nothing there; for
/// outages of varied length it pulls the p90 down by about a tenth.
pub const STRONG: f64 = 6.0;

/// Chance that a first retry explores instead of waiting the learned time.
pub const EXPLORE_PROBABILITY: f64 = 0.2;

/// Stretch of a learned wait: a success within `MAX_STRETCH * theta` answers
/// the question the wait asked (see [`super::episodes::MAX_STRETCH`]).
const MAX_STRETCH: f64 = super::episodes::MAX_STRETCH;

/// Bounds of the estimate in milliseconds (0.1 ms to what a summary holds).
const MIN_MS: f64 = 0.1;
const MAX_MS: f64 = super::stats::MAX_MS;

/// What an episode told about the outage, relative to its first failure.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Censored {
    /// The last failure seen came this long after the first one.
    pub lower: Duration,
    /// The first success came this long after the first failure.
    pub upper: Duration,
}

impl Censored {
    /// The midpoint of what is known: the sample the quantile sketch keeps
    /// for the median and the tail.
    pub fn midpoint(&self) -> Duration {
        (self.lower + self.upper.max(self.lower)) / 2
    }
}

/// The `level` quantile of a service's outage length, learned from
/// censored episodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecoveryEstimate {
    level: f64,
    log_ms: Option<f64>,
    observed: u64,
}

impl RecoveryEstimate {
    /// An estimate of the `level` quantile (clamped to [0.5, 0.999]).
    pub fn new(level: f64) -> Self {
        RecoveryEstimate {
            level: if level.is_finite() {
                level.clamp(0.5, 0.999)
            } else {
                0.9
            },
            log_ms: None,
            observed: 0,
        }
    }

    /// The estimate in milliseconds, once an episode was seen.
    pub fn ms(&self) -> Option<f64> {
        self.log_ms.map(|l| l.exp().clamp(MIN_MS, MAX_MS))
    }

    /// Episodes observed.
    pub fn observed(&self) -> u64 {
        self.observed
    }

    /// Learns from one episode.
    pub fn observe(&mut self, episode: Censored) {
        self.observed = self.observed.saturating_add(1);
        let lower = ms(episode.lower);
        let upper = ms(episode.upper).max(lower);
        let Some(log_theta) = self.log_ms else {
            // The first episode: the middle of what it bounds.
            let start = (lower + upper) / 2.0;
            self.log_ms = Some(start.clamp(MIN_MS, MAX_MS).ln());
            return;
        };
        let theta = log_theta.exp();
        let step = if lower >= theta {
            // Still failing at or after the estimate: the outage is longer.
            STEP * self.level
        } else if upper <= theta * EXPLORE_FRACTION * MAX_STRETCH {
            // Back well before the estimate (an early retry, or callers
            // that saw the recovery closely): strong evidence it is high.
            -STEP * (1.0 - self.level) * STRONG
        } else if upper <= theta * MAX_STRETCH {
            // Back by the learned wait.
            -STEP * (1.0 - self.level)
        } else {
            // No attempt near the estimate: nothing to learn about it.
            0.0
        };
        self.log_ms = Some((log_theta + step).clamp(MIN_MS.ln(), MAX_MS.ln()));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
#[path = "recovery_tests.rs"]
mod tests;
