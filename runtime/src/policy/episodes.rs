//! Outage episodes of a service and the retry delay learned from how long they last.
//!
//! An *episode* starts at the first failed attempt after a success and ends at
//! the next success (DESIGN section 7). Health-check transitions feed the same
//! state machine. Finished episode durations go into a DDSketch, so a node can
//! say "this service usually comes back after 180 ms, almost always within
//! 400 ms", and gossip that as [`EpisodeStats`].
//!
//! [`learned_delay`] turns the cluster-merged statistics into a wait before a
//! retry: wait until the episode has lasted its p90 (first retry) or p99
//! (second retry). With too few samples it falls back to Envoy's jittered
//! exponential backoff, which [`exponential_delay`] also offers on its own for
//! side-by-side comparison.
//!
//! Memory is bounded and recent behaviour wins: durations go into the
//! *current* of two sketches; every [`ROTATION`] the current one becomes the
//! *previous* one and the old previous one is dropped. Statistics read both, so
//! they always cover between one and two rotation periods (5 to 10 minutes) of
//! episodes. A DDSketch keeps at most 2048 bins, whatever the number of
//! samples.
//!
//! Pure logic: time comes in as `now`, randomness as an [`Rng`].

use std::time::{Duration, Instant};

use rand::Rng;
use sketches_ddsketch::DDSketch;

use super::recovery::{Censored, RecoveryEstimate, EXPLORE_FRACTION, EXPLORE_PROBABILITY};
use super::stats::{duration_ms, new_sketch, quantile};

/// Samples needed before the learned delay is trusted: below this the
/// quantiles are mostly noise (the p99 of 10 samples is their maximum).
pub const MIN_SAMPLES: u64 = 20;

/// Shortest learned wait: below this a retry would most likely hit the same
/// outage again, and timers are not that precise anyway.
pub const MIN_WAIT: Duration = Duration::from_millis(5);

/// Longest learned wait before jitter: a caller waiting longer than this is
/// better served by an error it can handle itself.
pub const MAX_WAIT: Duration = Duration::from_secs(2);

/// Largest stretch applied to a learned wait, so clients that saw the same
/// episode do not all retry at the same instant.
pub const MAX_STRETCH: f64 = 1.2;

/// Shortest wait before a second retry, as a share of the p90: a first
/// retry that failed after the p90 met an outage longer than usual, and
/// retrying it 5 ms later would most likely fail again.
pub const LATE_RETRY_SHARE: f64 = 0.25;

/// How far past the p99 a request that arrived during an outage may be held
/// (see [`outage_hold`]), waiting for the probes to see the recovery.
pub const HOLD_MARGIN: f64 = 1.5;

/// Envoy's default base interval, used until enough episodes were seen.
pub const FALLBACK_BASE: Duration = Duration::from_millis(25);

/// Envoy's default cap (10 times the base).
pub const FALLBACK_CAP: Duration = Duration::from_millis(250);

/// How long a sketch collects durations before it becomes the previous one;
/// statistics cover between one and two of these, so a service whose recovery
/// changed is relearned within ten minutes.
pub const ROTATION: Duration = Duration::from_secs(5 * 60);

// === impl EpisodeStats ===

/// Quantiles of outage durations: what a node gossips and what the cluster
/// merges, so a node that never called a service still knows how it fails.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EpisodeStats {
    /// Finished episodes behind the quantiles; the weight when merging.
    pub samples: u64,
    /// Median duration in milliseconds (`None` without samples).
    pub p50_ms: Option<f64>,
    /// 90th percentile in milliseconds: the wait before a first retry.
    pub p90_ms: Option<f64>,
    /// 99th percentile in milliseconds: the wait before a second retry.
    pub p99_ms: Option<f64>,
}

// === impl EpisodeTracker ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing seen yet: a failure now has no known start, so it does not
    /// open an episode (its duration would be a guess).
    Unknown,
    /// Last signal was a success.
    Up,
    /// In an episode since the first failure after a success; the last
    /// failure so far bounds the outage from below.
    Down {
        since: Instant,
        last_failure: Instant,
    },
}

/// Outage episodes of one service as seen from this node: the input of the
/// learned retry delay.
#[derive(Clone)]
pub struct EpisodeTracker {
    state: State,
    /// The p90 of the outage length, from censored episodes: the learned
    /// wait before a first retry.
    recovery: RecoveryEstimate,
    /// The last finished episode bounded the outage loosely (see
    /// [`Self::explores`]).
    last_seen_loosely: bool,
    /// Midpoints of the episodes' bounds, for the median and the tail.
    current: DDSketch,
    previous: DDSketch,
    rotated_at: Option<Instant>,
    rotation: Duration,
}

impl std::fmt::Debug for EpisodeTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpisodeTracker")
            .field("state", &self.state)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Default for EpisodeTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl EpisodeTracker {
    /// A tracker that rotates its sketches every [`ROTATION`].
    pub fn new() -> Self {
        Self::with_rotation(ROTATION)
    }

    /// A tracker with another rotation period, for tests and experiments
    /// (a zero period is raised to one second).
    pub fn with_rotation(rotation: Duration) -> Self {
        EpisodeTracker {
            state: State::Unknown,
            recovery: RecoveryEstimate::new(0.9),
            last_seen_loosely: true,
            current: new_sketch(),
            previous: new_sketch(),
            rotated_at: None,
            rotation: rotation.max(Duration::from_secs(1)),
        }
    }

    /// Feeds one attempt outcome; returns how long the episode it ended
    /// lasted as seen here (first failure to first success), if any, so the
    /// caller can log or export it.
    pub fn on_outcome(&mut self, now: Instant, success: bool) -> Option<Duration> {
        self.rotate(now);
        match (self.state, success) {
            (
                State::Down {
                    since,
                    last_failure,
                },
                true,
            ) => {
                let episode = Censored {
                    lower: last_failure.saturating_duration_since(since),
                    upper: now.saturating_duration_since(since),
                };
                self.current.add(duration_ms(episode.midpoint()));
                self.recovery.observe(episode);
                self.last_seen_loosely = episode.lower < episode.upper / 2;
                self.state = State::Up;
                Some(episode.upper)
            }
            (_, true) => {
                self.state = State::Up;
                None
            }
            (State::Down { since, .. }, false) => {
                self.state = State::Down {
                    since,
                    last_failure: now,
                };
                None
            }
            (State::Up, false) => {
                self.state = State::Down {
                    since: now,
                    last_failure: now,
                };
                None
            }
            (State::Unknown, false) => None,
        }
    }

    /// Feeds a health transition of the service, so outages found by probes
    /// count like outages found by requests (unhealthy opens an episode,
    /// healthy closes it).
    pub fn on_health_change(&mut self, now: Instant, healthy: bool) -> Option<Duration> {
        self.on_outcome(now, healthy)
    }

    /// Whether this node's retries should now and then explore: when its
    /// last outage was seen loosely (the last failure came before half of
    /// the time to the first success), as when every caller waited out the
    /// learned delay. Callers that kept failing until the recovery saw it
    /// closely, and need no early retries to learn that outages got shorter.
    pub fn explores(&self) -> bool {
        self.last_seen_loosely
    }

    /// When the ongoing episode started, the anchor of the learned wait;
    /// `None` when the service is up (or its state is unknown).
    pub fn current_episode_start(&self) -> Option<Instant> {
        match self.state {
            State::Down { since, .. } => Some(since),
            State::Unknown | State::Up => None,
        }
    }

    /// What this node gossips: the learned p90 (see [`RecoveryEstimate`]),
    /// and the median and p99 of the episodes' midpoints, over the last one
    /// to two rotation periods (kept ordered around the p90).
    pub fn stats(&self) -> EpisodeStats {
        let mut all = self.current.clone();
        // Both sketches come from `new_sketch`, so the configs match and the
        // merge cannot fail; ignoring the result keeps this panic-free.
        let _ = all.merge(&self.previous);
        let samples = all.count() as u64;
        let p90 = if samples == 0 {
            None
        } else {
            self.recovery.ms().or_else(|| quantile(&all, 0.9))
        };
        let bounded = |q: Option<f64>, pick: fn(f64, f64) -> f64| match (q, p90) {
            (Some(q), Some(p90)) => Some(pick(q, p90)),
            (q, _) => q,
        };
        EpisodeStats {
            samples,
            p50_ms: bounded(quantile(&all, 0.5), f64::min),
            p90_ms: p90,
            p99_ms: bounded(quantile(&all, 0.99), f64::max),
        }
    }

    /// Ages the sketches: after one period the current becomes the previous,
    /// after two with no event both are empty.
    fn rotate(&mut self, now: Instant) {
        let Some(at) = self.rotated_at else {
            self.rotated_at = Some(now);
            return;
        };
        let elapsed = now.saturating_duration_since(at);
        if elapsed < self.rotation {
            return;
        }
        self.previous = if elapsed >= self.rotation.saturating_mul(2) {
            new_sketch()
        } else {
            std::mem::replace(&mut self.current, new_sketch())
        };
        self.current = new_sketch();
        self.rotated_at = Some(now);
    }
}

// === learned delay ===

/// Which policy chose a wait, for metrics and for the comparison with Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DelaySource {
    /// From the cluster's episode quantiles.
    Learned,
    /// Envoy's default backoff, because fewer than [`MIN_SAMPLES`] episodes
    /// are known.
    Fallback,
    /// An early first retry (a share of the learned wait), so the learned
    /// delay can move down when outages got shorter.
    Explore,
}

/// A wait before a retry and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delay {
    /// How long to wait before sending the retry.
    pub wait: Duration,
    /// Which policy produced `wait`.
    pub source: DelaySource,
}

/// How long to wait before retry `retry_number` (1 or 2) of a service that
/// has no other healthy instance: until the ongoing episode has lasted as
/// long as most episodes do (p90, then p99), when the cluster has seen at
/// least [`MIN_SAMPLES`] of them.
///
/// The learned wait is `episode_start + quantile - now`, clamped to
/// [[`MIN_WAIT`], [`MAX_WAIT`]] and then stretched by a uniform factor in
/// [1, [`MAX_STRETCH`]], so it never exceeds 2.4 s. With `explore` (see
/// [`EpisodeTracker::explores`]) one first retry in five explores instead:
/// it waits until [`EXPLORE_FRACTION`] of the p90 (unstretched), which is
/// how a lone caller learns that outages got shorter (see
/// [`super::recovery`]). With `episode_start`
/// unknown the episode is taken to start now. Retry numbers above 2 use the
/// p99; 0 is treated as 1.
pub fn learned_delay<R: Rng + ?Sized>(
    episode_start: Option<Instant>,
    now: Instant,
    merged: &EpisodeStats,
    retry_number: u8,
    explore: bool,
    rng: &mut R,
) -> Delay {
    let quantile_ms = if retry_number <= 1 {
        merged.p90_ms
    } else {
        merged.p99_ms
    };
    let Some(target) = trusted_ms(merged, quantile_ms) else {
        return Delay {
            wait: exponential_delay(retry_number, rng),
            source: DelaySource::Fallback,
        };
    };
    let elapsed =
        episode_start.map_or(Duration::ZERO, |start| now.saturating_duration_since(start));
    if explore && retry_number <= 1 && rng.gen_bool(EXPLORE_PROBABILITY) {
        let early = target.mul_f64(EXPLORE_FRACTION);
        return Delay {
            wait: early.saturating_sub(elapsed).clamp(MIN_WAIT, MAX_WAIT),
            source: DelaySource::Explore,
        };
    }
    let floor = match trusted_ms(merged, merged.p90_ms) {
        Some(p90) if retry_number >= 2 => p90.mul_f64(LATE_RETRY_SHARE),
        _ => Duration::ZERO,
    };
    let wait = target
        .saturating_sub(elapsed)
        .max(floor)
        .clamp(MIN_WAIT, MAX_WAIT);
    let stretch = rng.gen_range(1.0..=MAX_STRETCH);
    Delay {
        wait: wait.mul_f64(stretch),
        source: DelaySource::Learned,
    }
}

/// How long at most a new request to a service in an outage waits before
/// its first attempt, or `None` to send it now.
///
/// While an episode is open here (the service's last attempt failed) and is
/// younger than the cluster's p99, a request sent now would most likely fail
/// and then wait for its retry anyway. Held instead, it costs no retry from
/// the budget and adds no load to the failing service. The caller ends the
/// hold as soon as the episode closes (a retry, an exploring retry or a
/// health check saw the service answer), and at the latest when the episode
/// has lasted [`HOLD_MARGIN`] times the p99 (at most [`MAX_WAIT`], stretched
/// like a retry), so that an estimate a little short does not release every
/// held request into the outage at once. Nothing is held before
/// [`MIN_SAMPLES`] episodes are known, once the episode outlived that (this
/// outage is not a usual one: fail fast and let the retry decide), or when
/// less than [`MIN_WAIT`] is left.
pub fn outage_hold<R: Rng + ?Sized>(
    episode_start: Option<Instant>,
    now: Instant,
    merged: &EpisodeStats,
    rng: &mut R,
) -> Option<Duration> {
    let start = episode_start?;
    let target = trusted_ms(merged, merged.p99_ms)?.mul_f64(HOLD_MARGIN);
    let left = target.checked_sub(now.saturating_duration_since(start))?;
    (left >= MIN_WAIT).then(|| left.min(MAX_WAIT).mul_f64(rng.gen_range(1.0..=MAX_STRETCH)))
}

/// A merged quantile as a duration, once [`MIN_SAMPLES`] episodes back it.
fn trusted_ms(merged: &EpisodeStats, quantile_ms: Option<f64>) -> Option<Duration> {
    match quantile_ms {
        Some(ms) if merged.samples >= MIN_SAMPLES && ms.is_finite() && ms >= 0.0 => {
            // Capped so the conversion cannot overflow.
            Some(Duration::from_secs_f64(ms.min(1e9) / 1e3))
        }
        _ => None,
    }
}

/// Envoy's default retry backoff (base 25 ms, cap 250 ms, full jitter): a
/// uniform wait in [0, min(base * 2^(retry_number - 1), cap)]. Used until
/// enough episodes are known, and for services configured with the
/// `exponential` policy, so both can be compared on the same traffic.
pub fn exponential_delay<R: Rng + ?Sized>(retry_number: u8, rng: &mut R) -> Duration {
    // 2^4 * 25 ms already exceeds the cap; capping the shift avoids overflow.
    let shift = u32::from(retry_number.saturating_sub(1).min(16));
    let ceiling = FALLBACK_BASE.saturating_mul(1 << shift).min(FALLBACK_CAP);
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.gen_range(0..=nanos))
}

#[cfg(test)]
#[path = "episodes_tests.rs"]
mod tests;
