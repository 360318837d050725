//! Cluster-wide rate limits: `weft limit payments 300/s` admits 300
//! requests a second to `payments` from all callers on all nodes together,
//! with no limiter service.
//!
//! Every node measures the demand it sees for each limit (requests
//! arriving a second, admitted or not) and gossips it. A node's share of a
//! limit is the limit times its demand over the cluster's demand, so a node
//! whose callers ask more gets more, within a gossip round of asking. Each
//! node admits its share with a token bucket.
//!
//! Pure logic: what a limit is, the demand meter, the share and the bucket,
//! with `now` passed in. Who may change limits (an operator's grant), how
//! they and the demand spread, is the node's business.

use std::fmt;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Most limits in the cluster: they and their grant travel in one gossip
/// value, and every node gossips its demand for each.
pub const MAX_LIMITS: usize = 32;

/// The largest count a rate may name.
pub const MAX_COUNT: u32 = 10_000_000;

/// How long the demand meter looks back.
pub const DEMAND_WINDOW: Duration = Duration::from_secs(1);

/// How much of its rate a bucket may hand out at once (at least one
/// request): small, so that the cluster's total stays near the limit.
const BURST: Duration = Duration::from_millis(100);

/// The unit of a rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Per {
    /// `/s`.
    Second,
    /// `/m`.
    Minute,
}

impl Per {
    fn seconds(self) -> f64 {
        match self {
            Per::Second => 1.0,
            Per::Minute => 60.0,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Per::Second => "s",
            Per::Minute => "m",
        }
    }
}

/// A rate, `300/s` or `20/m`; written that way in JSON too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rate {
    /// Requests...
    pub count: u32,
    /// ...per this.
    pub per: Per,
}

impl Rate {
    /// Requests a second.
    pub fn per_second(self) -> f64 {
        f64::from(self.count) / self.per.seconds()
    }
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?}: give a rate as COUNT/s or COUNT/m, e.g. 300/s");
        let (count, per) = s.split_once('/').ok_or_else(bad)?;
        let per = match per {
            "s" => Per::Second,
            "m" => Per::Minute,
            _ => return Err(bad()),
        };
        let count: u32 = count.parse().map_err(|_| bad())?;
        if count == 0 || count > MAX_COUNT {
            return Err(format!("{s:?}: the count must be 1 to {MAX_COUNT}"));
        }
        Ok(Rate { count, per })
    }
}

super::serde_as_text!(Rate);

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.count, self.per.suffix())
    }
}

/// One limit: requests to `service` (from `caller` only, when named).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// The service limited.
    pub service: String,
    /// Only this caller's requests count (and are limited); `None`: every
    /// caller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<String>,
    /// The cluster-wide rate.
    pub rate: Rate,
}

impl RateLimit {
    /// The name its demand is gossiped under: `service`, or
    /// `service/caller`.
    pub fn scope(&self) -> String {
        match &self.caller {
            Some(caller) => format!("{}/{caller}", self.service),
            None => self.service.clone(),
        }
    }

    /// Whether a request of `caller` to `service` counts against it.
    pub fn applies(&self, service: &str, caller: &str) -> bool {
        self.service == service && self.caller.as_deref().is_none_or(|c| c == caller)
    }
}

/// The cluster's rate limits at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// 0 before any operator change; each change adds one.
    pub version: u64,
    /// Sorted by service, then caller (service-wide first).
    pub limits: Vec<RateLimit>,
}

impl RateLimits {
    /// Whether no limit is set (the request path's one check then).
    pub fn is_empty(&self) -> bool {
        self.limits.is_empty()
    }

    /// The next version: `service`'s limit for `caller` set to `rate`
    /// (`None`: removed).
    pub fn with(
        &self,
        service: &str,
        caller: Option<&str>,
        rate: Option<Rate>,
    ) -> Result<RateLimits, String> {
        let mut next = self.clone();
        next.version = super::next_version(self.version, "limits")?;
        let same = |l: &RateLimit| l.service == service && l.caller.as_deref() == caller;
        let held = next.limits.iter().position(same);
        match (rate, held) {
            (Some(rate), Some(i)) => next.limits[i].rate = rate,
            (Some(rate), None) => next.limits.push(RateLimit {
                service: service.to_string(),
                caller: caller.map(String::from),
                rate,
            }),
            (None, Some(i)) => {
                next.limits.remove(i);
            }
            (None, None) => return Err(format!("{} has no limit", scope(service, caller))),
        }
        next.limits.sort_by(|a, b| order(a).cmp(&order(b)));
        next.validate()?;
        Ok(next)
    }

    /// Services and callers are names (or `-`, the anonymous caller), at
    /// most one limit per (service, caller), sorted; at most
    /// [`MAX_LIMITS`].
    pub fn validate(&self) -> Result<(), String> {
        if self.limits.len() > MAX_LIMITS {
            return Err(format!(
                "{} limits; at most {MAX_LIMITS}",
                self.limits.len()
            ));
        }
        for limit in &self.limits {
            // The anonymous caller (the shared proxy's) may have a limit too.
            let caller = limit
                .caller
                .iter()
                .filter(|c| *c != crate::caller::ANONYMOUS);
            for name in std::iter::once(&limit.service).chain(caller) {
                weft_gossip::keys::validate_name(name)
                    .map_err(|_| format!("{name:?} is not a service name"))?;
            }
            // A deserialized rate was parsed, but a built one may not be.
            if limit.rate.count == 0 || limit.rate.count > MAX_COUNT {
                return Err(format!(
                    "{}: rate {} is out of range",
                    limit.scope(),
                    limit.rate
                ));
            }
        }
        if !self.limits.windows(2).all(|w| order(&w[0]) < order(&w[1])) {
            return Err("limits must be sorted and unique per service and caller".into());
        }
        Ok(())
    }

    /// What an operator's grant signs: the hex SHA-256 of the canonical
    /// JSON of the version and the limits.
    pub fn digest(&self) -> String {
        weft_gossip::grant::digest_json(self)
    }
}

fn order(limit: &RateLimit) -> (&str, Option<&str>) {
    (&limit.service, limit.caller.as_deref())
}

fn scope(service: &str, caller: Option<&str>) -> String {
    match caller {
        Some(caller) => format!("{service} (caller {caller})"),
        None => service.to_string(),
    }
}

/// Requests arriving a second, over the last [`DEMAND_WINDOW`]: the count
/// of the current window plus the part of the previous one still inside
/// the look-back.
#[derive(Debug, Clone, Default)]
pub struct DemandMeter {
    started: Option<Instant>,
    current: u32,
    previous: u32,
}

impl DemandMeter {
    /// One request arrived.
    pub fn record(&mut self, now: Instant) {
        self.roll(now);
        self.current = self.current.saturating_add(1);
    }

    /// Requests a second now.
    pub fn rate(&mut self, now: Instant) -> f64 {
        self.roll(now);
        let Some(started) = self.started else {
            return 0.0;
        };
        let into = now.saturating_duration_since(started).as_secs_f64();
        let window = DEMAND_WINDOW.as_secs_f64();
        let previous_part = (1.0 - into / window).max(0.0);
        (f64::from(self.previous) * previous_part + f64::from(self.current)) / window
    }

    fn roll(&mut self, now: Instant) {
        let started = *self.started.get_or_insert(now);
        let windows = now.saturating_duration_since(started).as_nanos() / DEMAND_WINDOW.as_nanos();
        match windows {
            0 => return,
            1 => self.previous = self.current,
            _ => self.previous = 0,
        }
        self.current = 0;
        let skipped = DEMAND_WINDOW * u32::try_from(windows).unwrap_or(u32::MAX);
        self.started = Some(started + skipped);
    }
}

/// This node's share of `rate` (requests a second) when it sees `own`
/// demand and the other nodes report `others` in all: in proportion to
/// demand, all of it while nobody else asks.
pub fn share(rate: f64, own: f64, others: f64) -> f64 {
    let total = own + others.max(0.0);
    if total <= 0.0 || own >= total {
        return rate;
    }
    rate * own.max(0.0) / total
}

/// A token bucket whose rate follows the node's share.
#[derive(Debug, Clone, Default)]
pub struct TokenBucket {
    tokens: f64,
    rate: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    /// Takes one token, or says how long until one is due.
    pub fn take(&mut self, rate: f64, now: Instant) -> Result<(), Duration> {
        let burst = (rate * BURST.as_secs_f64()).max(1.0);
        let elapsed = match self.last {
            Some(last) => now.saturating_duration_since(last).as_secs_f64(),
            // A new bucket starts full.
            None => f64::INFINITY,
        };
        self.tokens = (self.tokens + elapsed * self.rate).min(burst);
        self.rate = rate;
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if rate <= 0.0 {
            return Err(DEMAND_WINDOW);
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / rate))
    }
}

/// One limit as one node enforces it: its demand and its bucket.
#[derive(Debug, Clone, Default)]
pub struct LimitState {
    demand: DemandMeter,
    bucket: TokenBucket,
    /// What the other live nodes last reported, in all.
    others: f64,
}

/// A request refused at a limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OverLimit {
    /// When the next request could be admitted.
    pub retry_after: Duration,
    /// This node's share when it refused, requests a second.
    pub share: f64,
}

impl LimitState {
    /// Counts a request against `rate` and admits it if this node's share
    /// has room.
    pub fn admit(&mut self, rate: Rate, now: Instant) -> Result<(), OverLimit> {
        self.demand.record(now);
        let share = self.share(rate, now);
        self.bucket
            .take(share, now)
            .map_err(|retry_after| OverLimit { retry_after, share })
    }

    /// This node's demand now, requests a second.
    pub fn demand(&mut self, now: Instant) -> f64 {
        self.demand.rate(now)
    }

    /// This node's share of `rate` now, requests a second.
    pub fn share(&mut self, rate: Rate, now: Instant) -> f64 {
        share(rate.per_second(), self.demand.rate(now), self.others)
    }

    /// The other live nodes' demand, as gossip last reported it.
    pub fn set_others(&mut self, others: f64) {
        self.others = others;
    }

    /// What [`LimitState::set_others`] last gave.
    pub fn others(&self) -> f64 {
        self.others
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(s: &str) -> Rate {
        s.parse().unwrap()
    }

    #[test]
    fn rates_parse_and_print() {
        assert_eq!(rate("300/s").per_second(), 300.0);
        assert_eq!(rate("30/m").per_second(), 0.5);
        assert_eq!(rate("30/m").to_string(), "30/m");
        for bad in ["300", "0/s", "x/s", "3/h", "-1/s", "20000000/s"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&rate("7/s")).unwrap();
        assert_eq!(json, "\"7/s\"");
        assert!(serde_json::from_str::<Rate>("\"7/h\"").is_err());
    }

    #[test]
    fn changes_are_versioned_sorted_and_checked() {
        let limits = RateLimits::default()
            .with("api", Some("web"), Some(rate("10/s")))
            .unwrap()
            .with("api", None, Some(rate("100/s")))
            .unwrap();
        assert_eq!(limits.version, 2);
        assert_eq!(limits.limits[0].caller, None, "service-wide first");
        let changed = limits.with("api", None, Some(rate("50/s"))).unwrap();
        assert_eq!(changed.limits.len(), 2);
        assert_eq!(changed.limits[0].rate, rate("50/s"));
        let removed = changed.with("api", Some("web"), None).unwrap();
        assert_eq!(removed.limits.len(), 1);
        assert!(removed.with("api", Some("web"), None).is_err());
        assert!(RateLimits::default()
            .with("Api", None, Some(rate("1/s")))
            .is_err());
        let anonymous = RateLimits::default().with("api", Some("-"), Some(rate("5/s")));
        assert!(anonymous.is_ok(), "the shared proxy's callers");
        assert!(RateLimits::default()
            .with("api", Some("-x"), Some(rate("5/s")))
            .is_err());
        assert_ne!(limits.digest(), changed.digest());
        let mut unsorted = limits.clone();
        unsorted.limits.reverse();
        assert!(unsorted.validate().is_err());
    }

    #[test]
    fn a_limit_applies_to_its_caller_or_to_all() {
        let all = RateLimit {
            service: "api".into(),
            caller: None,
            rate: rate("1/s"),
        };
        let web = RateLimit {
            caller: Some("web".into()),
            ..all.clone()
        };
        assert!(all.applies("api", "-") && all.applies("api", "web"));
        assert!(web.applies("api", "web") && !web.applies("api", "-"));
        assert!(!all.applies("db", "web"));
        assert_eq!((all.scope(), web.scope()), ("api".into(), "api/web".into()));
    }

    #[test]
    fn demand_is_requests_over_the_last_second() {
        let t0 = Instant::now();
        let mut meter = DemandMeter::default();
        assert_eq!(meter.rate(t0), 0.0);
        // 100 a second for 3 seconds.
        for i in 0..300 {
            meter.record(t0 + Duration::from_millis(i * 10));
        }
        let at = |ms| t0 + Duration::from_millis(ms);
        let steady = meter.rate(at(3000));
        assert!((95.0..=105.0).contains(&steady), "{steady}");
        assert!(meter.rate(at(3500)) < steady, "fades once requests stop");
        assert_eq!(meter.rate(at(5000)), 0.0, "gone after two windows");
    }

    #[test]
    fn shares_follow_demand() {
        assert_eq!(share(300.0, 50.0, 0.0), 300.0, "alone: all of it");
        assert_eq!(share(300.0, 0.0, 0.0), 300.0);
        assert_eq!(share(300.0, 0.0, 100.0), 0.0);
        let shares = [
            share(300.0, 50.0, 800.0),
            share(300.0, 200.0, 650.0),
            share(300.0, 600.0, 250.0),
        ];
        let total: f64 = shares.iter().sum();
        assert!((total - 300.0).abs() < 1e-9, "{shares:?}");
        assert!(shares[2] > 200.0 && shares[0] < 20.0, "{shares:?}");
    }

    #[test]
    fn a_bucket_admits_its_rate_and_says_when_to_come_back() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::default();
        // 1000 arrivals a second for 2 seconds against 100 a second.
        let admitted = (0..2000)
            .filter(|i| bucket.take(100.0, t0 + Duration::from_millis(*i)).is_ok())
            .count();
        assert!((200..=212).contains(&admitted), "{admitted}");
        let now = t0 + Duration::from_millis(2000);
        let _ = bucket.take(100.0, now);
        let wait = bucket.take(100.0, now).unwrap_err();
        assert!(wait <= Duration::from_millis(10), "{wait:?}");
        let _ = bucket.take(0.0, now);
        assert_eq!(bucket.take(0.0, now).unwrap_err(), DEMAND_WINDOW);
    }

    /// Three nodes with uneven demand that then swaps, each reporting its
    /// demand to the others once a second (as gossip does): the cluster
    /// admits the limit within 10%, and a node whose demand rises has its
    /// proportional share within 3 s.
    #[test]
    fn three_nodes_admit_the_limit_together() {
        let limit = rate("300/s");
        let t0 = Instant::now();
        let mut nodes: Vec<LimitState> = vec![LimitState::default(); 3];
        let mut admitted = [[0u32; 3]; 20];
        // Demand per node, requests a second; swapped at 10 s.
        let demand = |second: u64| match second {
            0..10 => [50, 200, 600],
            _ => [600, 200, 50],
        };
        let mut reported = [0.0; 3];
        for ms in 0..20_000u64 {
            let now = t0 + Duration::from_millis(ms);
            let second = ms / 1000;
            if ms % 1000 == 500 {
                for (i, node) in nodes.iter_mut().enumerate() {
                    reported[i] = node.demand(now);
                }
                for (i, node) in nodes.iter_mut().enumerate() {
                    node.set_others(reported.iter().sum::<f64>() - reported[i]);
                }
            }
            for (i, node) in nodes.iter_mut().enumerate() {
                let per_second = demand(second)[i];
                // Evenly spaced arrivals at that rate.
                let arrivals = (ms + 1) * per_second / 1000 - ms * per_second / 1000;
                for _ in 0..arrivals {
                    if node.admit(limit, now).is_ok() {
                        admitted[second as usize][i] += 1;
                    }
                }
            }
        }
        let steady = |seconds: std::ops::Range<usize>| {
            let n = seconds.len() as f64;
            seconds
                .map(|s| admitted[s].iter().sum::<u32>() as f64)
                .sum::<f64>()
                / n
        };
        for (range, name) in [(2..10, "before the swap"), (13..20, "after it")] {
            let total = steady(range);
            assert!((270.0..=330.0).contains(&total), "{name}: {total}/s");
        }
        // n1's demand rose 12x at 10 s: by 13 s it has its share (600 of
        // 850 asked: 212/s).
        let n1 = admitted[12][0];
        assert!(
            (190..=235).contains(&n1),
            "n1 admitted {n1} in its third second"
        );
    }
}
