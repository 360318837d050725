//! Rollouts: canaries that drive themselves (`weft rollout payments --to
//! v2`). The split between the stable tag and the canary moves step by
//! step (5, 25, 50, 100 % by default) while the canary's error rate and
//! p99, measured by the whole cluster, stay within bounds against the
//! stable tag's; it goes back to the stable tag at once when they do not.
//!
//! Three pieces, all pure (`now` passed in):
//!
//! - [`Rollouts`]: what an operator asked for, cluster config like the
//!   routes (signed, versioned, gossiped).
//! - [`Progress`]: where a rollout is. Every node gossips the progress it
//!   knows; [`Progress::newest`] merges them, and the merge only moves
//!   forward (a later step, then promoted, and rolled back over all), so
//!   any node may advance a rollout, one leaving does not stall it, and
//!   two that judge at once cannot fork it.
//! - [`judge`]: given the step's statistics from every node, whether to
//!   hold, advance, promote or roll back.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::routes::Split;

/// Most services under a rollout at once: the rollouts and their grant
/// travel in one gossip value, and so does each node's progress.
pub const MAX_ROLLOUTS: usize = 4;

/// Most steps of one rollout.
pub const MAX_STEPS: usize = 10;

/// The steps when none are given.
pub const DEFAULT_STEPS: [u8; 4] = [5, 25, 50, 100];

/// The shortest and longest time a step lasts.
pub const INTERVAL_SECS: std::ops::RangeInclusive<u32> = 1..=86_400;

/// Requests the canary must have served in a step before the step is
/// judged: fewer say nothing about an error rate of 1%, or a p99.
pub const MIN_SAMPLES: u64 = 20;

/// A p99 within this many microseconds of the stable tag's is never a
/// breach, whatever the ratio: under a few milliseconds, scheduling noise
/// is larger than any version's difference.
pub const P99_SLACK_US: u64 = 5_000;

/// A share of requests, in hundredths of a percent; written `1%`, `0.5%`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ErrorRate(u32);

impl ErrorRate {
    /// The share as a fraction of 1.
    pub fn fraction(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }
}

impl FromStr for ErrorRate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: give a percentage, e.g. 1% or 0.5%");
        let pct: f64 = s
            .strip_suffix('%')
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if !(0.0..=100.0).contains(&pct) {
            return Err(format!("{s:?}: between 0% and 100%"));
        }
        Ok(ErrorRate((pct * 100.0).round() as u32))
    }
}

impl fmt::Display for ErrorRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", f64::from(self.0) / 100.0)
    }
}

/// How many times the stable tag's p99 the canary's may be, in
/// hundredths; written `1.5x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct LatencyRatio(u32);

impl LatencyRatio {
    /// The ratio as a number.
    pub fn factor(self) -> f64 {
        f64::from(self.0) / 100.0
    }
}

impl FromStr for LatencyRatio {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?}: give a ratio to the stable tag's p99, e.g. 1.5x");
        let x: f64 = s
            .strip_suffix('x')
            .ok_or_else(bad)?
            .parse()
            .map_err(|_| bad())?;
        if !(1.0..=100.0).contains(&x) {
            return Err(format!("{s:?}: between 1x and 100x"));
        }
        Ok(LatencyRatio((x * 100.0).round() as u32))
    }
}

impl fmt::Display for LatencyRatio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x", self.factor())
    }
}

super::serde_as_text!(ErrorRate, LatencyRatio);

/// One service's rollout as the operator asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// The tag that serves now.
    pub from: String,
    /// The canary's tag.
    pub to: String,
    /// The canary's share at each step, in percent, rising to 100.
    pub steps: Vec<u8>,
    /// How long each step lasts before it is judged, in seconds.
    pub interval_secs: u32,
    /// The canary's error rate above which it is rolled back.
    pub max_error_rate: ErrorRate,
    /// The canary's p99 against the stable tag's above which it is rolled
    /// back.
    pub max_p99: LatencyRatio,
    /// The config version that started it: progress from an earlier
    /// rollout of the same service is not this one's. Set by
    /// [`Rollouts::with`].
    #[serde(default)]
    pub started: u64,
}

impl Rollout {
    /// A rollout of `to` over `from` with the default steps and bounds.
    pub fn new(from: &str, to: &str) -> Rollout {
        Rollout {
            from: from.to_string(),
            to: to.to_string(),
            steps: DEFAULT_STEPS.to_vec(),
            interval_secs: 30,
            max_error_rate: ErrorRate(100),
            max_p99: LatencyRatio(150),
            started: 0,
        }
    }

    /// The canary's share at `progress`, in percent.
    pub fn weight(&self, progress: &Progress) -> u8 {
        match progress.phase {
            Phase::Stepping => self
                .steps
                .get(usize::from(progress.step))
                .copied()
                .unwrap_or(0),
            Phase::Promoted => 100,
            Phase::RolledBack => 0,
        }
    }

    /// The split between the two tags at `progress`, sorted by tag.
    pub fn split(&self, progress: &Progress) -> Vec<Split> {
        let canary = u32::from(self.weight(progress));
        let mut split = vec![
            Split {
                tag: self.from.clone(),
                weight: 100 - canary,
            },
            Split {
                tag: self.to.clone(),
                weight: canary,
            },
        ];
        split.sort_by(|a, b| a.tag.cmp(&b.tag));
        split
    }

    fn validate(&self, service: &str) -> Result<(), String> {
        for tag in [&self.from, &self.to] {
            let ok = (1..=63).contains(&tag.len())
                && tag.bytes().all(|b| b.is_ascii_graphic() && b != b'=');
            if !ok {
                return Err(format!("{service}: {tag:?} is not a tag"));
            }
        }
        if self.from == self.to {
            return Err(format!("{service}: the canary's tag is the stable one"));
        }
        if self.steps.is_empty() || self.steps.len() > MAX_STEPS {
            return Err(format!("{service}: 1 to {MAX_STEPS} steps"));
        }
        let rising = self.steps.windows(2).all(|w| w[0] < w[1]);
        if !rising || self.steps[0] == 0 || self.steps.last() != Some(&100) {
            return Err(format!(
                "{service}: steps must rise from above 0 to 100 (e.g. 5,25,50,100)"
            ));
        }
        if !INTERVAL_SECS.contains(&self.interval_secs) {
            return Err(format!("{service}: the interval is 1 s to 1 day"));
        }
        Ok(())
    }
}

/// The cluster's rollouts at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollouts {
    /// 0 before any operator change; each change adds one.
    pub version: u64,
    /// Per service, its rollout.
    pub services: BTreeMap<String, Rollout>,
}

impl Rollouts {
    /// The next version: `service` rolled out as `rollout` (started by this
    /// version), or its rollout removed with `None`.
    pub fn with(&self, service: &str, rollout: Option<Rollout>) -> Result<Rollouts, String> {
        let mut next = self.clone();
        next.version = super::next_version(self.version, "rollouts")?;
        match rollout {
            Some(rollout) => {
                let started = next.version;
                next.services
                    .insert(service.to_string(), Rollout { started, ..rollout });
            }
            None => {
                if next.services.remove(service).is_none() {
                    return Err(format!("{service} has no rollout"));
                }
            }
        }
        next.validate()?;
        Ok(next)
    }

    /// Services are names, each rollout's tags, steps and interval are
    /// sound, no rollout claims to start after this version, and at most
    /// [`MAX_ROLLOUTS`] at once.
    pub fn validate(&self) -> Result<(), String> {
        if self.services.len() > MAX_ROLLOUTS {
            return Err(format!(
                "{} rollouts; at most {MAX_ROLLOUTS} at once",
                self.services.len()
            ));
        }
        for (service, rollout) in &self.services {
            weft_gossip::keys::validate_name(service)
                .map_err(|_| format!("{service:?} is not a service name"))?;
            rollout.validate(service)?;
            if rollout.started > self.version {
                return Err(format!("{service}: started after version {}", self.version));
            }
        }
        Ok(())
    }

    /// What an operator's grant signs.
    pub fn digest(&self) -> String {
        weft_gossip::grant::digest_json(self)
    }
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// At a step, being judged.
    Stepping,
    /// The canary passed every step and takes all the traffic.
    Promoted,
    /// The canary breached a bound and takes none.
    RolledBack,
}

/// How far one rollout has come, as a node gossips it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The rollout's [`Rollout::started`].
    pub started: u64,
    /// Index into the rollout's steps.
    pub step: u8,
    /// Stepping, promoted or rolled back.
    pub phase: Phase,
    /// When the step (or the final phase) began, ms since the Unix epoch.
    pub since_ms: u64,
    /// The stable tag's p99 from the last step where it had requests
    /// enough: the bar for a step where it has none (100%).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_p99_us: Option<u64>,
    /// Why the rollout is where it is (empty while it steps).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Progress {
    /// A rollout at its first step since `now_ms`.
    pub fn begin(rollout: &Rollout, now_ms: u64) -> Progress {
        Progress {
            started: rollout.started,
            step: 0,
            phase: Phase::Stepping,
            since_ms: now_ms,
            baseline_p99_us: None,
            reason: String::new(),
        }
    }

    /// The furthest of `known` for `rollout` (another rollout's progress is
    /// ignored), or its beginning at `now_ms`. Further is: rolled back over
    /// promoted over stepping, then a later step, then the step entered
    /// first; so every node that sees the same reports picks the same.
    pub fn newest<'a>(
        rollout: &Rollout,
        known: impl IntoIterator<Item = &'a Progress>,
        now_ms: u64,
    ) -> Progress {
        known
            .into_iter()
            .filter(|p| p.started == rollout.started && usize::from(p.step) < rollout.steps.len())
            .max_by_key(|p| (p.phase, p.step, std::cmp::Reverse(p.since_ms)))
            .cloned()
            .unwrap_or_else(|| Progress::begin(rollout, now_ms))
    }

    fn next(&self, phase: Phase, step: u8, now_ms: u64, reason: String) -> Progress {
        Progress {
            started: self.started,
            step,
            phase,
            since_ms: now_ms,
            baseline_p99_us: self.baseline_p99_us,
            reason,
        }
    }
}

/// One tag's requests in a step, as one node or the cluster saw them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagStats {
    /// Attempts that reached an instance of the tag.
    pub n: u64,
    /// Of those, failures (5xx, unreachable, timeout).
    pub errors: u64,
    /// Their p99 latency in microseconds (0 with none).
    pub p99_us: u64,
}

impl TagStats {
    /// The share of attempts that failed.
    pub fn error_rate(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.errors as f64 / self.n as f64
        }
    }

    /// The cluster's figure from each node's: counts add up, and the p99
    /// is the mean of the nodes' weighted by their requests (nodes see the
    /// same instances, so their p99s differ by their own paths only).
    pub fn merge<'a>(all: impl IntoIterator<Item = &'a TagStats>) -> TagStats {
        let mut total = TagStats::default();
        let mut weighted = 0u128;
        for s in all {
            total.n = total.n.saturating_add(s.n);
            total.errors = total.errors.saturating_add(s.errors.min(s.n));
            weighted += u128::from(s.n) * u128::from(s.p99_us);
        }
        if total.n > 0 {
            total.p99_us = u64::try_from(weighted / u128::from(total.n)).unwrap_or(u64::MAX);
        }
        total
    }
}

/// A node's statistics of one rollout's current step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStats {
    /// The rollout's [`Rollout::started`].
    pub started: u64,
    /// The step they were counted in.
    pub step: u8,
    /// The stable tag's requests.
    pub stable: TagStats,
    /// The canary's.
    pub canary: TagStats,
}

/// What [`judge`] concluded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The new progress, when the rollout moves.
    pub next: Option<Progress>,
    /// Why it holds or moves, for people.
    pub why: String,
}

/// Judges `rollout` at `at` from the cluster's statistics of the step,
/// `stats`, at `now_ms`: a breach rolls back at once; a step whose
/// interval has passed with the canary's requests enough and within bounds
/// advances (promotes after the last); otherwise it holds.
pub fn judge(rollout: &Rollout, at: &Progress, stats: &StepStats, now_ms: u64) -> Verdict {
    let hold = |why: String| Verdict { next: None, why };
    if at.phase != Phase::Stepping {
        return hold(at.reason.clone());
    }
    let weight = rollout.weight(at);
    let canary = &stats.canary;
    let measured = format!(
        "canary {} requests, {:.1}% errors, p99 {:.1} ms",
        canary.n,
        canary.error_rate() * 100.0,
        canary.p99_us as f64 / 1000.0
    );
    if canary.n >= MIN_SAMPLES {
        if let Some(breach) = breach(rollout, at, stats) {
            let reason = format!("rolled back at {weight}%: {breach}");
            return Verdict {
                next: Some(at.next(Phase::RolledBack, at.step, now_ms, reason.clone())),
                why: reason,
            };
        }
    }
    let elapsed_ms = now_ms.saturating_sub(at.since_ms);
    let interval_ms = u64::from(rollout.interval_secs) * 1000;
    if canary.n < MIN_SAMPLES {
        return hold(format!(
            "at {weight}% for {} s; waiting for {MIN_SAMPLES} canary requests ({measured})",
            elapsed_ms / 1000
        ));
    }
    if elapsed_ms < interval_ms {
        return hold(format!(
            "at {weight}% for {} s of {} s; {measured}",
            elapsed_ms / 1000,
            rollout.interval_secs
        ));
    }
    let mut passed = at.clone();
    if stats.stable.n >= MIN_SAMPLES {
        passed.baseline_p99_us = Some(stats.stable.p99_us);
    }
    let next_step = usize::from(at.step) + 1;
    let next = if next_step >= rollout.steps.len() {
        let reason = format!("promoted: {measured} at 100%");
        passed.next(Phase::Promoted, at.step, now_ms, reason)
    } else {
        passed.next(Phase::Stepping, at.step + 1, now_ms, String::new())
    };
    Verdict {
        why: format!("passed {weight}%: {measured}"),
        next: Some(next),
    }
}

/// The bound the canary breaks in this step, if any.
fn breach(rollout: &Rollout, at: &Progress, stats: &StepStats) -> Option<String> {
    let canary = &stats.canary;
    if canary.error_rate() > rollout.max_error_rate.fraction() {
        return Some(format!(
            "canary error rate {:.1}% over {} ({} of {} requests)",
            canary.error_rate() * 100.0,
            rollout.max_error_rate,
            canary.errors,
            canary.n
        ));
    }
    let baseline = if stats.stable.n >= MIN_SAMPLES {
        Some(stats.stable.p99_us)
    } else {
        at.baseline_p99_us
    }?;
    let bar = (baseline as f64 * rollout.max_p99.factor()) as u64;
    (canary.p99_us > bar && canary.p99_us > baseline + P99_SLACK_US).then(|| {
        format!(
            "canary p99 {:.1} ms over {} the stable tag's {:.1} ms",
            canary.p99_us as f64 / 1000.0,
            rollout.max_p99,
            baseline as f64 / 1000.0
        )
    })
}

/// Parses `--steps 5,25,50,100`.
pub fn parse_steps(s: &str) -> Result<Vec<u8>, String> {
    s.split(',')
        .map(|step| {
            step.trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= 100)
                .ok_or_else(|| format!("{step:?}: steps are percentages, e.g. 5,25,50,100"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout() -> Rollout {
        let mut r = Rollout::new("v1", "v2");
        r.interval_secs = 10;
        r.started = 3;
        r
    }

    fn stats(at: &Progress, canary: (u64, u64, u64), stable: (u64, u64)) -> StepStats {
        StepStats {
            started: at.started,
            step: at.step,
            canary: TagStats {
                n: canary.0,
                errors: canary.1,
                p99_us: canary.2,
            },
            stable: TagStats {
                n: stable.0,
                errors: 0,
                p99_us: stable.1,
            },
        }
    }

    #[test]
    fn a_good_canary_steps_to_promotion() {
        let r = rollout();
        let mut at = Progress::begin(&r, 0);
        let mut now = 0;
        let mut weights = vec![r.weight(&at)];
        while at.phase == Phase::Stepping {
            let healthy = stats(&at, (100, 0, 2_000), (900, 2_000));
            // Within the interval it holds, however good the numbers.
            assert_eq!(judge(&r, &at, &healthy, now + 9_999).next, None);
            now += 10_000;
            at = judge(&r, &at, &healthy, now).next.expect("passes its step");
            weights.push(r.weight(&at));
        }
        assert_eq!(weights, [5, 25, 50, 100, 100]);
        assert_eq!(at.phase, Phase::Promoted);
        assert_eq!(at.baseline_p99_us, Some(2_000));
        assert_eq!(r.split(&at)[1].weight, 100);
        assert_eq!(
            judge(&r, &at, &StepStats::default(), now + 99_000).next,
            None
        );
    }

    #[test]
    fn errors_or_a_slow_canary_roll_back_at_once() {
        let r = rollout();
        let at = Progress::begin(&r, 0);
        let failing = stats(&at, (40, 8, 2_000), (800, 2_000));
        let back = judge(&r, &at, &failing, 1_000).next.unwrap();
        assert_eq!((back.phase, r.weight(&back)), (Phase::RolledBack, 0));
        assert!(
            back.reason.contains("error rate 20.0% over 1%"),
            "{}",
            back.reason
        );
        assert_eq!(r.split(&back)[0].weight, 100, "all to v1");

        let slow = stats(&at, (40, 0, 20_000), (800, 10_000));
        let back = judge(&r, &at, &slow, 1_000).next.unwrap();
        assert!(
            back.reason.contains("p99 20.0 ms over 1.5x"),
            "{}",
            back.reason
        );
        // Twice as slow but within the slack of a fast service: no breach.
        let fast = stats(&at, (40, 0, 2_000), (800, 1_000));
        assert_eq!(judge(&r, &at, &fast, 1_000).next, None);
        // Too few requests to say anything: it waits, even past the interval.
        let few = stats(&at, (19, 19, 90_000), (800, 1_000));
        let held = judge(&r, &at, &few, 60_000);
        assert!(
            held.next.is_none() && held.why.contains("waiting"),
            "{}",
            held.why
        );
    }

    #[test]
    fn the_last_step_is_judged_against_the_stable_tags_earlier_p99() {
        let r = rollout();
        let at = Progress {
            step: 3,
            baseline_p99_us: Some(10_000),
            ..Progress::begin(&r, 0)
        };
        let slow = stats(&at, (500, 0, 30_000), (0, 0));
        assert_eq!(
            judge(&r, &at, &slow, 1_000).next.unwrap().phase,
            Phase::RolledBack
        );
    }

    #[test]
    fn progress_merges_forward_and_the_same_everywhere() {
        let r = rollout();
        let at = |step, phase, since_ms| Progress {
            step,
            phase,
            since_ms,
            ..Progress::begin(&r, 0)
        };
        let stale = Progress {
            started: 1,
            ..at(3, Phase::RolledBack, 0)
        };
        let reports = [
            at(1, Phase::Stepping, 50),
            at(2, Phase::Stepping, 90),
            at(2, Phase::Stepping, 70),
            stale,
        ];
        let newest = Progress::newest(&r, &reports, 999);
        assert_eq!(
            (newest.step, newest.since_ms),
            (2, 70),
            "the step first entered"
        );
        let reversed: Vec<_> = reports.iter().rev().cloned().collect();
        assert_eq!(Progress::newest(&r, &reversed, 5), newest);
        let back = at(0, Phase::RolledBack, 10);
        let promoted = at(3, Phase::Promoted, 100);
        assert_eq!(Progress::newest(&r, [&promoted, &back], 0), back);
        assert_eq!(Progress::newest(&r, [], 7), Progress::begin(&r, 7));
        let beyond = at(9, Phase::Stepping, 0);
        assert_eq!(Progress::newest(&r, [&beyond], 7).step, 0, "no such step");
    }

    #[test]
    fn cluster_stats_add_up() {
        let a = TagStats {
            n: 100,
            errors: 1,
            p99_us: 1_000,
        };
        let b = TagStats {
            n: 300,
            errors: 500,
            p99_us: 5_000,
        };
        let total = TagStats::merge([&a, &b]);
        assert_eq!((total.n, total.errors, total.p99_us), (400, 301, 4_000));
        assert_eq!(TagStats::merge([]), TagStats::default());
    }

    #[test]
    fn rollouts_are_versioned_and_checked() {
        let rollouts = Rollouts::default().with("api", Some(rollout())).unwrap();
        assert_eq!((rollouts.version, rollouts.services["api"].started), (1, 1));
        let again = rollouts.with("api", Some(rollout())).unwrap();
        assert_eq!(
            again.services["api"].started, 2,
            "a new rollout, new progress"
        );
        assert!(again.with("api", None).unwrap().services.is_empty());
        assert!(Rollouts::default().with("api", None).is_err());
        let bad = [
            Rollout::new("v1", "v1"),
            Rollout {
                steps: vec![50, 25, 100],
                ..rollout()
            },
            Rollout {
                steps: vec![5, 50],
                ..rollout()
            },
            Rollout {
                interval_secs: 0,
                ..rollout()
            },
            Rollout::new("v=1", "v2"),
        ];
        for r in bad {
            assert!(
                Rollouts::default().with("api", Some(r.clone())).is_err(),
                "{r:?}"
            );
        }
        assert_ne!(rollouts.digest(), again.digest());
    }

    #[test]
    fn bounds_and_steps_parse() {
        assert_eq!("1%".parse::<ErrorRate>().unwrap().fraction(), 0.01);
        assert_eq!("0.5%".parse::<ErrorRate>().unwrap().to_string(), "0.5%");
        assert!("1".parse::<ErrorRate>().is_err());
        assert!("101%".parse::<ErrorRate>().is_err());
        assert_eq!("1.5x".parse::<LatencyRatio>().unwrap().factor(), 1.5);
        assert!("0.5x".parse::<LatencyRatio>().is_err());
        assert_eq!(parse_steps("5, 25,100").unwrap(), [5, 25, 100]);
        assert!(parse_steps("5,x").is_err());
        assert!(parse_steps("5,200").is_err());
        let json = serde_json::to_string(&rollout()).unwrap();
        assert!(
            json.contains(r#""max_error_rate":"1%","max_p99":"1.5x""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Rollout>(&json).unwrap(), rollout());
    }
}
