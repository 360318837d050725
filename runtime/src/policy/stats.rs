//! Per-service request statistics: local window, gossiped summary, cluster merge.
//!
//! - [`ServiceWindow`] keeps the last 10 s of one service's outcomes on this
//!   node in a ring of 1 s buckets, each with counters and a DDSketch of
//!   latencies (merged on read). Memory is bounded by the ring.
//! - [`Summary`] is what a node publishes once a second: window counts, rps,
//!   latency quantiles and the outage-episode statistics of
//!   [`super::episodes`]. Its JSON encoding is compact (well under 1 KiB) and
//!   [`Summary::decode`] treats every byte as hostile: it never panics,
//!   rejects malformed or inconsistent input and clamps absurd magnitudes.
//! - [`merge`] folds all nodes' summaries into one [`ClusterStats`].
//!
//! Pure logic: time comes in as `now`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config, DDSketch};

use super::episodes::EpisodeStats;

/// Length of the local window: long enough to smooth a burst, short enough
/// that the dashboard shows an outage within seconds.
pub const WINDOW: Duration = Duration::from_secs(10);

/// Width of one ring bucket: the granularity at which old outcomes expire.
pub const BUCKET: Duration = Duration::from_secs(1);

/// Largest latency or episode duration kept, in milliseconds (one hour);
/// bounds the sketches and rejects nonsense from peers.
pub const MAX_MS: f64 = 3_600_000.0;

/// Largest count accepted from a peer; a window of 10 s never holds more.
pub const MAX_COUNT: u64 = 1_000_000_000_000;

/// Largest request rate accepted from a peer.
pub const MAX_RPS: f64 = 1e9;

/// Upper bound of an encoded [`Summary`]; DESIGN section 6 promises <= 1 KiB
/// for `stats/<service>`.
pub const MAX_ENCODED: usize = 1024;

/// Version tag of the wire format; bumped only on incompatible changes, new
/// optional fields keep it.
pub const WIRE_VERSION: u8 = 1;

// === sketch helpers (shared with episodes) ===

/// A sketch of durations in milliseconds. Every sketch in the policy module
/// comes from here so that any two of them can be merged (DDSketch refuses
/// to merge different configs). 1% relative error; values below 1 µs count as
/// zero; at most 2048 bins (about 16 KiB), collapsing the lowest first.
pub(crate) fn new_sketch() -> DDSketch {
    DDSketch::new(Config::new(0.01, 2048, 1e-3))
}

/// Milliseconds of `d`, capped at [`MAX_MS`] so sketches stay small.
pub(crate) fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e3).min(MAX_MS)
}

/// Quantile `q` of `sketch`, `None` when it is empty.
pub(crate) fn quantile(sketch: &DDSketch, q: f64) -> Option<f64> {
    sketch
        .quantile(q)
        .ok()
        .flatten()
        .filter(|v| v.is_finite())
        .map(|v| v.clamp(0.0, MAX_MS))
}

// === impl ServiceWindow ===

/// Failed requests by class, so operators can tell a crashing service from
/// an unreachable host from a slow one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureCounts {
    /// 5xx from the instance.
    pub server_error: u64,
    /// Connect failure or reset.
    pub unreachable: u64,
    /// No response head in time.
    pub timeout: u64,
    /// A failure with a class label this module does not know.
    pub other: u64,
}

impl FailureCounts {
    /// All failures, whatever the class.
    pub fn total(&self) -> u64 {
        self.server_error
            .saturating_add(self.unreachable)
            .saturating_add(self.timeout)
            .saturating_add(self.other)
    }

    fn add(&mut self, o: &FailureCounts) {
        self.server_error = self.server_error.saturating_add(o.server_error);
        self.unreachable = self.unreachable.saturating_add(o.unreachable);
        self.timeout = self.timeout.saturating_add(o.timeout);
        self.other = self.other.saturating_add(o.other);
    }
}

/// What the window holds now: the input of the summary and of the
/// dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct WindowStats {
    /// Attempts recorded (successes + failures).
    pub requests: u64,
    /// Attempts that succeeded.
    pub successes: u64,
    /// Attempts that failed (the sum of `failure_classes`).
    pub failures: u64,
    /// The failures split by class.
    pub failure_classes: FailureCounts,
    /// Retries sent.
    pub retries: u64,
    /// Requests per second over the part of the window that has elapsed
    /// (at least one bucket), so the first seconds after start are not
    /// underestimated tenfold.
    pub rps: f64,
    /// successes / requests, `None` without requests.
    pub success_rate: Option<f64>,
    /// Median latency in ms, `None` without requests.
    pub p50_ms: Option<f64>,
    /// 95th percentile latency in ms, `None` without requests.
    pub p95_ms: Option<f64>,
    /// 99th percentile latency in ms, `None` without requests.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile latency of the successful attempts in ms (`None`
    /// without successes): what a learned timeout is made of, free of the
    /// timeouts themselves.
    pub p999_ok_ms: Option<f64>,
}

#[derive(Clone)]
struct Bucket {
    /// Absolute bucket number since the window's origin; `u64::MAX` = unused.
    index: u64,
    successes: u64,
    failures: FailureCounts,
    retries: u64,
    latency: DDSketch,
    /// Latency of the successful attempts only.
    ok_latency: DDSketch,
}

impl Bucket {
    fn empty() -> Self {
        Bucket {
            index: u64::MAX,
            successes: 0,
            failures: FailureCounts::default(),
            retries: 0,
            latency: new_sketch(),
            ok_latency: new_sketch(),
        }
    }
}

/// The recent outcomes of one service on this node, kept by the stats
/// aggregator and read once a second to build the [`Summary`].
#[derive(Clone)]
pub struct ServiceWindow {
    width: Duration,
    buckets: Vec<Bucket>,
    /// Time of bucket 0, set by the first event.
    origin: Option<Instant>,
    /// Highest bucket number written; time never goes back behind it.
    latest: u64,
}

impl std::fmt::Debug for ServiceWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceWindow")
            .field("width", &self.width)
            .field("buckets", &self.buckets.len())
            .field("latest", &self.latest)
            .finish()
    }
}

impl Default for ServiceWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceWindow {
    /// The standard window: [`WINDOW`] in buckets of [`BUCKET`].
    pub fn new() -> Self {
        Self::with_window(WINDOW, BUCKET)
    }

    /// A window of `window` in buckets of `bucket` (rounded up to whole
    /// buckets, between 1 and 3600 of them; a zero bucket becomes 1 ms).
    pub fn with_window(window: Duration, bucket: Duration) -> Self {
        let width = bucket.max(Duration::from_millis(1));
        let n = window.as_nanos().div_ceil(width.as_nanos()).clamp(1, 3600) as usize;
        ServiceWindow {
            width,
            buckets: vec![Bucket::empty(); n],
            origin: None,
            latest: 0,
        }
    }

    /// Records one finished attempt. `class_label` is the
    /// [`crate::outcome::OutcomeClass`] label (`server_error`,
    /// `unreachable`, `timeout`); it only matters for failures.
    pub fn record(&mut self, now: Instant, success: bool, class_label: &str, latency: Duration) {
        let b = self.bucket_mut(now);
        if success {
            b.successes = b.successes.saturating_add(1);
            b.ok_latency.add(duration_ms(latency));
        } else {
            let slot = match class_label {
                "server_error" => &mut b.failures.server_error,
                "unreachable" => &mut b.failures.unreachable,
                "timeout" => &mut b.failures.timeout,
                _ => &mut b.failures.other,
            };
            *slot = slot.saturating_add(1);
        }
        b.latency.add(duration_ms(latency));
    }

    /// Records one retry sent, for the retry ratio on the dashboard and in
    /// the summary.
    pub fn record_retry(&mut self, now: Instant) {
        let b = self.bucket_mut(now);
        b.retries = b.retries.saturating_add(1);
    }

    /// The statistics of the last window as of `now`.
    pub fn snapshot(&self, now: Instant) -> WindowStats {
        let Some(origin) = self.origin else {
            return WindowStats::default();
        };
        let k = self.index(origin, now).max(self.latest);
        let n = self.buckets.len() as u64;
        let first = (k + 1).saturating_sub(n);

        let mut successes = 0u64;
        let mut failures = FailureCounts::default();
        let mut retries = 0u64;
        let mut latency = new_sketch();
        let mut ok_latency = new_sketch();
        for b in self
            .buckets
            .iter()
            .filter(|b| b.index >= first && b.index <= k)
        {
            successes = successes.saturating_add(b.successes);
            failures.add(&b.failures);
            retries = retries.saturating_add(b.retries);
            // Same config everywhere (new_sketch), so this cannot fail.
            let _ = latency.merge(&b.latency);
            let _ = ok_latency.merge(&b.ok_latency);
        }
        let failed = failures.total();
        let requests = successes.saturating_add(failed);

        // Span covered: from the start of the oldest live bucket (or the
        // origin) to now, at least one bucket.
        let width = self.width.as_secs_f64();
        let now_rel = now
            .saturating_duration_since(origin)
            .as_secs_f64()
            .max(k as f64 * width);
        let span = (now_rel - first as f64 * width).max(width);

        let has = requests > 0;
        WindowStats {
            requests,
            successes,
            failures: failed,
            failure_classes: failures,
            retries,
            rps: requests as f64 / span,
            success_rate: has.then(|| successes as f64 / requests as f64),
            p50_ms: if has { quantile(&latency, 0.5) } else { None },
            p95_ms: if has { quantile(&latency, 0.95) } else { None },
            p99_ms: if has { quantile(&latency, 0.99) } else { None },
            p999_ok_ms: if successes > 0 {
                quantile(&ok_latency, 0.999)
            } else {
                None
            },
        }
    }

    /// Absolute bucket number of `now`.
    fn index(&self, origin: Instant, now: Instant) -> u64 {
        let nanos = now.saturating_duration_since(origin).as_nanos() / self.width.as_nanos();
        u64::try_from(nanos).unwrap_or(u64::MAX - 1)
    }

    /// The bucket for `now`, reset if it still holds an older second. Time
    /// that goes backwards is treated as the latest time seen.
    fn bucket_mut(&mut self, now: Instant) -> &mut Bucket {
        let origin = *self.origin.get_or_insert(now);
        let k = self.index(origin, now).max(self.latest);
        self.latest = k;
        // `with_window` makes at least one bucket, so the slot is in range.
        let slot = (k % self.buckets.len() as u64) as usize;
        let b = &mut self.buckets[slot];
        if b.index != k {
            *b = Bucket::empty();
            b.index = k;
        }
        b
    }
}

// === impl Summary ===

/// One node's view of one service, gossiped under `stats/<service>` once a
/// second so every node can merge the cluster's experience of it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    /// Attempts in the window.
    pub requests: u64,
    /// Failed attempts in the window.
    pub failures: u64,
    /// Retries sent in the window.
    pub retries: u64,
    /// Requests per second.
    pub rps: f64,
    /// Median latency in ms (`None` without requests).
    pub p50_ms: Option<f64>,
    /// 95th percentile latency in ms (`None` without requests).
    pub p95_ms: Option<f64>,
    /// 99th percentile latency in ms (`None` without requests).
    pub p99_ms: Option<f64>,
    /// 99.9th percentile latency of successful attempts in ms (`None`
    /// without successes).
    pub p999_ok_ms: Option<f64>,
    /// Outage-episode durations seen by this node.
    pub episodes: EpisodeStats,
    /// failures / requests in the window (0 without requests).
    pub error_rate: f64,
    /// Failed client requests (their last attempts) / client requests: the
    /// failures the app saw after retries. Reported for edges (`None`
    /// otherwise, and from nodes that do not report it).
    pub effective_error_rate: Option<f64>,
}

/// The JSON shape: one- to three-letter keys keep the value small.
#[derive(Serialize, Deserialize)]
struct Wire {
    v: u8,
    /// requests
    r: u64,
    /// failures
    f: u64,
    /// retries
    t: u64,
    /// rps
    q: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l95: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l99: Option<f64>,
    /// p99.9 of successful attempts (absent from older nodes)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    l999: Option<f64>,
    /// episode samples
    n: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e50: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e90: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    e99: Option<f64>,
    /// error rate
    er: f64,
    /// effective error rate (edges only)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ee: Option<f64>,
}

/// Rounds to `1 / scale` so the JSON stays short (0.001 ms is far below
/// the sketch's 1% error).
fn round(x: f64, scale: f64) -> f64 {
    (x * scale).round() / scale
}

/// Checks an optional quantile: present values must be finite and not
/// negative; too large ones are clamped.
fn check_ms(v: Option<f64>) -> Result<Option<f64>, ()> {
    match v {
        None => Ok(None),
        Some(x) if x.is_finite() && x >= 0.0 => Ok(Some(x.min(MAX_MS))),
        Some(_) => Err(()),
    }
}

/// Quantiles must not decrease with the rank.
fn ordered(values: &[Option<f64>]) -> bool {
    let present: Vec<f64> = values.iter().flatten().copied().collect();
    present.windows(2).all(|w| matches!(w, [a, b] if a <= b))
}

impl Summary {
    /// Builds the summary of a window and the episode statistics of the
    /// same service, so the aggregator does not restate the formulae.
    pub fn new(window: &WindowStats, episodes: &EpisodeStats) -> Self {
        Summary {
            requests: window.requests,
            failures: window.failures,
            retries: window.retries,
            rps: window.rps,
            p50_ms: window.p50_ms,
            p95_ms: window.p95_ms,
            p99_ms: window.p99_ms,
            p999_ok_ms: window.p999_ok_ms,
            episodes: *episodes,
            error_rate: if window.requests == 0 {
                0.0
            } else {
                window.failures as f64 / window.requests as f64
            },
            effective_error_rate: None,
        }
    }

    /// A zone's merged statistics as one summary, for other zones: what
    /// was not learned (a quantile fewer than two nodes reported) is left
    /// out, and so are episodes without their quantiles.
    pub fn of_merged(cluster: &ClusterStats) -> Self {
        let mut episodes = cluster.episodes;
        if episodes.p50_ms.is_none() || episodes.p90_ms.is_none() || episodes.p99_ms.is_none() {
            episodes = EpisodeStats::default();
        }
        let summary = Summary {
            requests: cluster.requests,
            failures: cluster.failures.min(cluster.requests),
            retries: cluster.retries,
            rps: cluster.rps,
            p50_ms: cluster.p50_ms,
            p95_ms: cluster.p95_ms,
            p99_ms: cluster.p99_ms,
            p999_ok_ms: cluster.p999_ok_ms,
            episodes,
            error_rate: cluster.success_rate.map_or(0.0, |ok| 1.0 - ok),
            effective_error_rate: None,
        };
        // Medians of different weights need not stay in order: keep the
        // episodes, which are what other zones learn from, over latency.
        if summary.normalized().is_some() {
            summary
        } else {
            Summary {
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
                p999_ok_ms: None,
                ..summary
            }
        }
    }

    /// Adds the effective error rate of the client requests in `requests`.
    pub fn with_effective(mut self, requests: &WindowStats) -> Self {
        self.effective_error_rate =
            (requests.requests > 0).then(|| requests.failures as f64 / requests.requests as f64);
        self
    }

    /// The gossip value: compact JSON, at most [`MAX_ENCODED`] bytes for any
    /// summary (values are clamped first, so NaN never reaches the wire).
    pub fn encode(&self) -> String {
        let s = self.normalized().unwrap_or_default();
        let wire = Wire {
            v: WIRE_VERSION,
            r: s.requests,
            f: s.failures,
            t: s.retries,
            q: round(s.rps, 1e3),
            l50: s.p50_ms.map(|x| round(x, 1e3)),
            l95: s.p95_ms.map(|x| round(x, 1e3)),
            l99: s.p99_ms.map(|x| round(x, 1e3)),
            l999: s.p999_ok_ms.map(|x| round(x, 1e3)),
            n: s.episodes.samples,
            e50: s.episodes.p50_ms.map(|x| round(x, 1e3)),
            e90: s.episodes.p90_ms.map(|x| round(x, 1e3)),
            e99: s.episodes.p99_ms.map(|x| round(x, 1e3)),
            er: round(s.error_rate, 1e4),
            ee: s.effective_error_rate.map(|x| round(x, 1e4)),
        };
        serde_json::to_string(&wire).unwrap_or_default()
    }

    /// Parses a peer's gossip value. `None` for anything malformed, of
    /// another version, negative, non-finite or inconsistent (more failures
    /// than requests, decreasing quantiles, episode samples without
    /// quantiles); magnitudes beyond the `MAX_*` limits are clamped.
    pub fn decode(s: &str) -> Option<Summary> {
        // A valid value is far smaller; refuse to parse megabytes.
        if s.len() > 4 * MAX_ENCODED {
            return None;
        }
        let w: Wire = serde_json::from_str(s).ok()?;
        if w.v != WIRE_VERSION {
            return None;
        }
        Summary {
            requests: w.r,
            failures: w.f,
            retries: w.t,
            rps: w.q,
            p50_ms: w.l50,
            p95_ms: w.l95,
            p99_ms: w.l99,
            p999_ok_ms: w.l999,
            episodes: EpisodeStats {
                samples: w.n,
                p50_ms: w.e50,
                p90_ms: w.e90,
                p99_ms: w.e99,
            },
            error_rate: w.er,
            effective_error_rate: w.ee,
        }
        .normalized()
    }

    /// The checks of [`Summary::decode`], also applied before encoding and
    /// merging so locally built summaries obey the same rules.
    fn normalized(&self) -> Option<Summary> {
        if self.failures > self.requests {
            return None;
        }
        if !(self.rps.is_finite() && self.rps >= 0.0) {
            return None;
        }
        let rate = |x: f64| x.is_finite() && (0.0..=1.0).contains(&x);
        if !rate(self.error_rate) || !self.effective_error_rate.is_none_or(rate) {
            return None;
        }
        let has_requests = self.requests > 0;
        let (p50, p95, p99) = if has_requests {
            (
                check_ms(self.p50_ms).ok()?,
                check_ms(self.p95_ms).ok()?,
                check_ms(self.p99_ms).ok()?,
            )
        } else {
            (None, None, None)
        };
        if !ordered(&[p50, p95, p99]) {
            return None;
        }
        let successes = self.requests - self.failures;
        let p999_ok = if successes > 0 {
            check_ms(self.p999_ok_ms).ok()?
        } else {
            None
        };
        let e = &self.episodes;
        let episodes = if e.samples == 0 {
            EpisodeStats::default()
        } else {
            let q = [
                check_ms(e.p50_ms).ok()?,
                check_ms(e.p90_ms).ok()?,
                check_ms(e.p99_ms).ok()?,
            ];
            if q.iter().any(Option::is_none) || !ordered(&q) {
                return None;
            }
            EpisodeStats {
                samples: e.samples.min(MAX_COUNT),
                p50_ms: q[0],
                p90_ms: q[1],
                p99_ms: q[2],
            }
        };
        let requests = self.requests.min(MAX_COUNT);
        Some(Summary {
            requests,
            failures: self.failures.min(requests),
            retries: self.retries.min(MAX_COUNT),
            rps: self.rps.min(MAX_RPS),
            p50_ms: p50,
            p95_ms: p95,
            p99_ms: p99,
            p999_ok_ms: p999_ok,
            episodes,
            error_rate: self.error_rate,
            effective_error_rate: self.effective_error_rate,
        })
    }
}

// === merge ===

/// The cluster's view of one service: what `weft health`, the dashboard and
/// the learned retry delay use.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ClusterStats {
    /// Summaries that passed validation and were merged.
    pub nodes: usize,
    /// Attempts in the window, all nodes.
    pub requests: u64,
    /// Failed attempts, all nodes.
    pub failures: u64,
    /// Retries sent, all nodes.
    pub retries: u64,
    /// Total requests per second.
    pub rps: f64,
    /// The nodes' success rates' median, weighted by (capped) requests;
    /// `None` without requests.
    pub success_rate: Option<f64>,
    /// The nodes' medians' weighted median (see [`merge`]).
    pub p50_ms: Option<f64>,
    /// The nodes' p95s' weighted median: when a hedged request sends its
    /// second attempt.
    pub p95_ms: Option<f64>,
    /// The nodes' p99s' weighted median (see [`merge`]).
    pub p99_ms: Option<f64>,
    /// Successful attempts, all nodes, each peer's count capped (see
    /// [`merge`]).
    pub successes: u64,
    /// Nodes whose summary had successful attempts.
    pub latency_nodes: usize,
    /// The nodes' p99.9s of successful attempts' weighted median: the
    /// input of [`learned_timeout`].
    pub p999_ok_ms: Option<f64>,
    /// Nodes whose summary had outage episodes.
    pub episode_nodes: usize,
    /// Episode quantiles (weighted medians) and the capped total samples:
    /// the input of [`super::episodes::learned_delay`].
    pub episodes: EpisodeStats,
}

/// One quantity as every node reported it: (value, claimed weight, is
/// this node's own), for a robust merge.
#[derive(Default)]
struct Votes(Vec<(f64, u64, bool)>);

impl Votes {
    fn add(&mut self, value: Option<f64>, weight: u64, own: bool) {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            if weight > 0 {
                self.0.push((v, weight, own));
            }
        }
    }

    /// The most a peer's vote weighs: the lower median of the claimed
    /// weights. One node claiming a huge count weighs no more than a
    /// typical node, so it cannot outvote the others.
    fn cap(&self) -> u64 {
        let mut weights: Vec<u64> = self.0.iter().map(|&(_, w, _)| w).collect();
        weights.sort_unstable();
        weights
            .get(weights.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(0)
    }

    /// Each vote with its weight capped; this node's own is believed whole.
    fn capped(&self) -> Vec<(f64, u64)> {
        let cap = self.cap();
        self.0
            .iter()
            .map(|&(v, w, own)| (v, if own { w } else { w.min(cap) }))
            .collect()
    }

    /// The sum of the capped weights: the count a learned number waits for.
    fn weight(&self) -> u64 {
        self.capped()
            .iter()
            .fold(0u64, |sum, &(_, w)| sum.saturating_add(w))
    }

    /// The weighted median of the values by capped weight (the mean of the
    /// two middle values when the weight splits exactly in half).
    fn median(&self) -> Option<f64> {
        let mut votes = self.capped();
        votes.sort_by(|a, b| a.0.total_cmp(&b.0));
        let total: u128 = votes.iter().map(|&(_, w)| u128::from(w)).sum();
        let mut below = 0u128;
        for (i, &(v, w)) in votes.iter().enumerate() {
            below += u128::from(w);
            if below * 2 > total {
                return Some(v);
            }
            if below * 2 == total {
                return Some(votes.get(i + 1).map_or(v, |next| (v + next.0) / 2.0));
            }
        }
        None
    }

    /// The median, when it may teach this node something: it saw the
    /// quantity itself, or at least two nodes report it.
    fn learned(&self) -> Option<f64> {
        let trusted = self.0.len() >= 2 || self.0.iter().any(|&(_, _, own)| own);
        self.median().filter(|_| trusted)
    }
}

/// Merges the summaries of one service from all nodes (`N` identifies a
/// node; `own` is this node's, whose observations it trusts).
///
/// Counts and rps are summed as claimed; they are only shown. What this
/// node acts on is robust to one lying node: each merged quantile is the
/// weighted median of the nodes' quantiles (latency weighted by requests,
/// p99.9 by successes, episode durations by episode samples), every peer's
/// weight is capped at the median claimed weight, the sample counts that
/// learning waits for are the capped sums, and the learned timeout, hedge
/// point and retry delay need two nodes or this node's own observations.
/// Nodes without requests (or without episodes) weigh nothing in the
/// corresponding quantiles. Invalid summaries are skipped.
pub fn merge<N: PartialEq>(summaries: &[(N, Summary)], own: Option<&N>) -> ClusterStats {
    merge_trusting(summaries, |node| own == Some(node))
}

/// [`merge`], believing whole every summary `trusted` names (this node's
/// own, and the merged summaries of other zones, which their bridges
/// already merged robustly).
pub fn merge_trusting<N>(summaries: &[(N, Summary)], trusted: impl Fn(&N) -> bool) -> ClusterStats {
    let mut out = ClusterStats::default();
    let mut requests = Votes::default();
    let (mut l50, mut l95, mut l99, mut l999) = (
        Votes::default(),
        Votes::default(),
        Votes::default(),
        Votes::default(),
    );
    let (mut e50, mut e90, mut e99) = (Votes::default(), Votes::default(), Votes::default());
    for (node, s) in summaries {
        let Some(s) = s.normalized() else { continue };
        let own = trusted(node);
        out.nodes += 1;
        out.requests = out.requests.saturating_add(s.requests);
        out.failures = out.failures.saturating_add(s.failures);
        out.retries = out.retries.saturating_add(s.retries);
        out.rps += s.rps;
        let successes = s.requests - s.failures;
        if s.requests > 0 {
            requests.add(Some(successes as f64 / s.requests as f64), s.requests, own);
        }
        l50.add(s.p50_ms, s.requests, own);
        l95.add(s.p95_ms, s.requests, own);
        l99.add(s.p99_ms, s.requests, own);
        if successes > 0 {
            out.latency_nodes += 1;
        }
        l999.add(s.p999_ok_ms, successes, own);
        let e = &s.episodes;
        if e.samples > 0 {
            out.episode_nodes += 1;
        }
        e50.add(e.p50_ms, e.samples, own);
        e90.add(e.p90_ms, e.samples, own);
        e99.add(e.p99_ms, e.samples, own);
    }
    out.success_rate = requests.median();
    out.p50_ms = l50.median();
    out.p95_ms = l95.learned();
    out.p99_ms = l99.median();
    out.successes = l999.weight();
    out.p999_ok_ms = l999.learned();
    out.episodes.samples = e90.weight();
    out.episodes.p50_ms = e50.learned();
    out.episodes.p90_ms = e90.learned();
    out.episodes.p99_ms = e99.learned();
    out
}

// === learned timeout ===

/// Successful attempts, cluster-wide, before a timeout is learned.
pub const TIMEOUT_MIN_SAMPLES: u64 = 1000;
/// Shortest learned timeout.
pub const TIMEOUT_MIN: Duration = Duration::from_millis(50);
/// Longest learned timeout (the default of services that set none).
pub const TIMEOUT_MAX: Duration = Duration::from_secs(30);

/// The request timeout of a service without `timeout_ms` (DESIGN section
/// 7): twice the cluster's p99.9 latency of successful attempts, in [50 ms,
/// 30 s], once 1000 of them are in the window; `None` before that.
pub fn learned_timeout(cluster: &ClusterStats) -> Option<Duration> {
    if cluster.successes < TIMEOUT_MIN_SAMPLES {
        return None;
    }
    let p999 = cluster
        .p999_ok_ms
        .filter(|ms| ms.is_finite() && *ms >= 0.0)?;
    let ms = (2.0 * p999).min(MAX_MS);
    Some(Duration::from_secs_f64(ms / 1e3).clamp(TIMEOUT_MIN, TIMEOUT_MAX))
}

#[cfg(test)]
#[path = "stats_tests.rs"]
mod tests;
