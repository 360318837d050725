//! What may be retried, and the budget that keeps retries from multiplying load.
//!
//! The rules of DESIGN section 5: only idempotent methods, only failures that
//! happened before the response reached the client (connect failure, reset,
//! timeout before headers, 502/503/504), at most [`MAX_RETRIES`], bodies up to
//! [`MAX_BUFFERED_BODY`]. The [`RetryBudget`] is Finagle's and Linkerd's: a
//! retry is allowed while, over every stretch of the last `ttl`, retries
//! stay within `ratio * requests + min_per_sec * ttl`. [`ServiceBudget`]
//! is one service's, and shares the floor among the nodes calling the
//! service, so the floor does not grow with the size of the cluster.
//!
//! Pure logic: time comes in as `now`.

use std::time::{Duration, Instant};

/// Most retries of one request: two retries recover from the transient
/// failures worth recovering from, more only add load to a sick service.
pub const MAX_RETRIES: u8 = 2;

/// Largest request body buffered so it can be sent again; bigger bodies are
/// streamed and their requests not retried.
pub const MAX_BUFFERED_BODY: usize = 64 * 1024;

/// Buckets the budget's window is cut into: the granularity at which old
/// requests and retries expire (100 ms for the default 10 s).
pub const BUDGET_BUCKETS: u32 = 100;

// === retry conditions ===

/// How one attempt ended, as far as retrying is concerned. `Reset` and
/// `Timeout` mean *before the response head*: once the head went to the
/// client, nothing can be retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptResult {
    /// The instance answered with this status.
    Response(u16),
    /// No connection could be made: the request never reached the instance.
    ConnectFailed,
    /// The connection or stream was reset before the response head.
    Reset,
    /// No response head within the per-try deadline.
    Timeout,
}

/// Whether a failed attempt is worth another try: the failures that say
/// "this instance, now" rather than "this request" (a 500 or a 4xx would fail
/// again).
pub fn is_retryable(result: AttemptResult) -> bool {
    match result {
        AttemptResult::Response(status) => matches!(status, 502..=504),
        AttemptResult::ConnectFailed | AttemptResult::Reset | AttemptResult::Timeout => true,
    }
}

/// Whether sending the request twice has the same effect as sending it once
/// (RFC 9110 section 9.2.2, without TRACE), so a retry cannot duplicate a side
/// effect. Methods are case-sensitive: `get` is not `GET`.
pub fn method_is_idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE")
}

// === impl RetryBudget ===

/// The binding constraint of the budget at one instant.
struct Tightest {
    /// Smallest `allowed - retries` over the window's suffixes.
    slack: f64,
    /// Largest `retries / allowed` over the window's suffixes.
    used: f64,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// Absolute bucket number since the origin; `u64::MAX` = unused.
    index: u64,
    requests: u64,
    retries: u64,
}

const EMPTY: Slot = Slot {
    index: u64::MAX,
    requests: 0,
    retries: 0,
};

/// Bounds retries to a share of requests plus a small floor, so that when a
/// service is failing, retries cannot turn into a multiplier of its load
/// (the retry storm), while a quiet service can still retry at all.
///
/// Time is cut into [`BUDGET_BUCKETS`] buckets of width `w = ttl / 100`; a
/// bucket counts for `ttl` after it ends. A retry at `now` is allowed when,
/// for *every* suffix of that window (the buckets from some bucket up to
/// the current one), `retries + 1 <= ratio * requests + min_per_sec *
/// ttl_secs`. In steady traffic this is Finagle's and Linkerd's budget
/// (retries <= ratio * requests + min_per_sec); unlike a plain token bucket it
/// does not let credit earned before a lull pay for a burst after it.
///
/// Guarantee (property-tested): for every closed interval `[s, s + ttl]`, the
/// retries allowed in it are at most `ratio *` (requests in `(s - w, s +
/// ttl]`) `+ min_per_sec * ttl_secs`; the slack is the requests of one
/// bucket width before the interval. Memory: 101 slots; each call walks
/// them once.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    ratio: f64,
    min_per_sec: f64,
    ttl: Duration,
    width_nanos: u128,
    /// Buckets behind the current one that still count (`ceil(ttl / w)`).
    span: u64,
    slots: Vec<Slot>,
    origin: Option<Instant>,
    latest: u64,
}

impl Default for RetryBudget {
    /// DESIGN section 5: retries <= 20% of requests + 10 per second, over 10 s.
    fn default() -> Self {
        Self::new(0.2, 10.0, Duration::from_secs(10))
    }
}

/// A configured rate or ratio; anything negative or not finite means 0.
fn non_negative(x: f64) -> f64 {
    if x.is_finite() && x > 0.0 {
        x
    } else {
        0.0
    }
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request plus `min_per_sec`,
    /// where requests and retries count for `ttl` (at least 1 ms).
    pub fn new(ratio: f64, min_per_sec: f64, ttl: Duration) -> Self {
        let ttl = ttl.max(Duration::from_millis(1));
        let width_nanos = (ttl.as_nanos() / u128::from(BUDGET_BUCKETS)).max(1);
        let span = u64::try_from(ttl.as_nanos().div_ceil(width_nanos)).unwrap_or(u64::MAX);
        // span is BUDGET_BUCKETS or one more (rounding), never huge.
        let slots = vec![EMPTY; (span as usize).saturating_add(1)];
        RetryBudget {
            ratio: non_negative(ratio),
            min_per_sec: non_negative(min_per_sec),
            ttl,
            width_nanos,
            span,
            slots,
            origin: None,
            latest: 0,
        }
    }

    /// Changes the floor (retries per second allowed without requests).
    pub fn set_min_per_sec(&mut self, min_per_sec: f64) {
        self.min_per_sec = non_negative(min_per_sec);
    }

    /// Deposits one original request (not a retry): each one earns `ratio`
    /// of a retry for the next `ttl`.
    pub fn record_request(&mut self, now: Instant) {
        let s = self.slot_mut(now);
        s.requests = s.requests.saturating_add(1);
    }

    /// Asks to send one retry at `now`; `true` (and the retry is counted)
    /// when the budget allows it, `false` when the caller must give up and
    /// answer `weft-error: retry-budget-exhausted`.
    pub fn try_withdraw(&mut self, now: Instant) -> bool {
        if self.tightest(now).slack >= 1.0 {
            let s = self.slot_mut(now);
            s.retries = s.retries.saturating_add(1);
            true
        } else {
            false
        }
    }

    /// How much of the budget is spent, in [0, 1]: the largest `retries /
    /// allowed` over the window's suffixes, so it reaches 1 exactly when
    /// retries start being refused. The `retry_budget_used` an operator
    /// watches to see a budget about to bind.
    pub fn used_fraction(&self, now: Instant) -> f64 {
        self.tightest(now).used.min(1.0)
    }

    /// Absolute bucket of `now`, never behind the latest one written.
    fn current(&self, now: Instant) -> u64 {
        let Some(origin) = self.origin else {
            return 0;
        };
        let k = now.saturating_duration_since(origin).as_nanos() / self.width_nanos;
        u64::try_from(k).unwrap_or(u64::MAX - 1).max(self.latest)
    }

    /// Walks the window newest bucket first and checks every suffix (the
    /// buckets from some bucket up to the current one): a retry must fit the
    /// budget of each of them, not only of the whole window. Checking only
    /// the whole window would let requests from before a lull pay for a
    /// burst of retries after it, and then some `ttl`-long interval would
    /// hold more retries than its own requests allow.
    fn tightest(&self, now: Instant) -> Tightest {
        let k = self.current(now);
        let reserve = self.min_per_sec * self.ttl.as_secs_f64();
        let len = self.slots.len() as u64;
        let (mut requests, mut retries) = (0u64, 0u64);
        let mut out = Tightest {
            slack: f64::INFINITY,
            used: 0.0,
        };
        for back in 0..=self.span.min(k) {
            let index = k - back;
            // `new` makes span + 1 >= 2 slots and the span + 1 live buckets
            // map to distinct slots, so the index is in range.
            let slot = self.slots[(index % len) as usize];
            if slot.index == index {
                requests = requests.saturating_add(slot.requests);
                retries = retries.saturating_add(slot.retries);
            }
            let allowed = self.ratio * requests as f64 + reserve;
            out.slack = out.slack.min(allowed - retries as f64);
            let used = if allowed > 0.0 {
                retries as f64 / allowed
            } else if retries > 0 {
                1.0
            } else {
                0.0
            };
            out.used = out.used.max(used);
        }
        out
    }

    fn slot_mut(&mut self, now: Instant) -> &mut Slot {
        self.origin.get_or_insert(now);
        let k = self.current(now);
        self.latest = k;
        // `new` makes span + 1 >= 2 slots, so the index is in range.
        let i = (k % self.slots.len() as u64) as usize;
        let s = &mut self.slots[i];
        if s.index != k {
            *s = Slot { index: k, ..EMPTY };
        }
        s
    }
}

// === impl ServiceBudget ===

/// One service's retries on this node: 20% of this node's requests to it,
/// plus this node's share of a floor of 10 retries per second for the
/// service, cluster-wide: the floor is split evenly among the nodes calling
/// it (gossip's summaries say how many). So however many nodes call a
/// failing service, it sees at most 1.2 times its requests plus 10 per
/// second, not 10 per second more for every caller.
#[derive(Debug, Clone)]
pub struct ServiceBudget {
    budget: RetryBudget,
    floor_per_sec: f64,
}

impl Default for ServiceBudget {
    /// 20% of requests plus 10/s cluster-wide, over 10 s.
    fn default() -> Self {
        ServiceBudget::new(0.2, 10.0, Duration::from_secs(10))
    }
}

impl ServiceBudget {
    /// A budget of `ratio` retries per request plus a cluster-wide
    /// `floor_per_sec`, counted over `ttl`.
    pub fn new(ratio: f64, floor_per_sec: f64, ttl: Duration) -> Self {
        ServiceBudget {
            budget: RetryBudget::new(ratio, floor_per_sec, ttl),
            floor_per_sec: non_negative(floor_per_sec),
        }
    }

    /// Counts one original request.
    pub fn record_request(&mut self, now: Instant) {
        self.budget.record_request(now);
    }

    /// Asks for one retry to a service that `callers` nodes call (this
    /// one included; at least 1).
    pub fn try_withdraw(&mut self, callers: usize, now: Instant) -> bool {
        let share = self.floor_per_sec / callers.max(1) as f64;
        self.budget.set_min_per_sec(share);
        self.budget.try_withdraw(now)
    }

    /// How much of the budget is spent, in [0, 1].
    pub fn used_fraction(&self, now: Instant) -> f64 {
        self.budget.used_fraction(now)
    }
}

#[cfg(test)]
#[path = "retry_tests.rs"]
mod tests;
