//! One request's attempts as a pure plan, in quinn-proto's style: the
//! outbound proxy's loop does the IO (pick, send, wait) and hands each
//! attempt's result here with the time; the plan answers respond, retry
//! (after a wait when the same instance is tried again) or, for a slow
//! first attempt, hedge. The retry budget comes in as a closure, the time
//! as `now`, so every branch is tested without a socket.

use std::time::{Duration, Instant};

use super::retry::{self, AttemptResult};
use super::stats::MAX_MS;

/// Requests in the cluster's window before its p95 is trusted for hedging.
pub const HEDGE_MIN_REQUESTS: u64 = 100;

/// Whether a request may be sent more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    /// Its method may be retried and its body is kept.
    Yes,
    /// Its method (or an upgrade, or the retry policy `none`) forbids it.
    NotRetryable,
    /// Its body was too large to keep: it streamed once.
    NotBufferable,
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Answer the app with this attempt's response: it succeeded, failed in
    /// a way another try would not mend, or tries or time ran out.
    Respond,
    /// Another try was due but the request cannot be sent again: answer
    /// with this attempt's response (the label says why, for metrics).
    Refused(&'static str),
    /// Another try was due but the service's retry budget is spent.
    BudgetExhausted,
    /// Try again.
    Retry,
}

/// The attempts of one request.
#[derive(Debug, Clone)]
pub struct AttemptPlan {
    deadline: Instant,
    per_attempt: Duration,
    replay: Replay,
    attempt: u8,
}

impl AttemptPlan {
    /// A request that began at `now`, bounded by `overall`, whose attempts
    /// may each take `per_attempt`.
    pub fn new(now: Instant, overall: Duration, per_attempt: Duration, replay: Replay) -> Self {
        AttemptPlan {
            deadline: now + overall,
            per_attempt,
            replay,
            attempt: 0,
        }
    }

    /// The attempt under way: 0 for the first.
    pub fn attempt(&self) -> u8 {
        self.attempt
    }

    /// When the whole request must be answered.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// How long the attempt starting at `now` may take.
    pub fn window(&self, now: Instant) -> Duration {
        self.deadline
            .saturating_duration_since(now)
            .min(self.per_attempt)
    }

    /// How long to wait before hedging this attempt, if it may be hedged:
    /// only a first attempt of a replayable request that is `hedgeable` (an
    /// idempotent method to a service registered with `hedge`), after the
    /// cluster's p95 (`p95_ms` over `requests`) once enough requests back it.
    pub fn hedge_after(
        &self,
        hedgeable: bool,
        p95_ms: Option<f64>,
        requests: u64,
    ) -> Option<Duration> {
        if !hedgeable || self.attempt > 0 || self.replay != Replay::Yes {
            return None;
        }
        let p95 =
            p95_ms.filter(|ms| requests >= HEDGE_MIN_REQUESTS && ms.is_finite() && *ms >= 0.0)?;
        Some(Duration::from_secs_f64(p95.min(MAX_MS) / 1e3).max(Duration::from_millis(1)))
    }

    /// The answer to the attempt that ended `result` at `now`. A retry
    /// asks `withdraw` (the service's retry budget) only when everything
    /// else allows it, and moves the plan to the next attempt.
    pub fn after(
        &mut self,
        result: AttemptResult,
        now: Instant,
        withdraw: impl FnOnce() -> bool,
    ) -> Next {
        if !retry::is_retryable(result)
            || self.attempt >= retry::MAX_RETRIES
            || now >= self.deadline
        {
            return Next::Respond;
        }
        match self.replay {
            Replay::NotRetryable => return Next::Refused("not_retryable"),
            Replay::NotBufferable => return Next::Refused("not_bufferable"),
            Replay::Yes => {}
        }
        if !withdraw() {
            return Next::BudgetExhausted;
        }
        self.attempt += 1;
        Next::Retry
    }

    /// The wait before the next attempt at `now`: none on another instance;
    /// on the one just tried, `wait()` (the service's learned delay or
    /// backoff, asked for only then), cut short by the deadline.
    pub fn wait(
        &self,
        same_instance: bool,
        wait: impl FnOnce() -> Duration,
        now: Instant,
    ) -> Duration {
        if !same_instance {
            return Duration::ZERO;
        }
        wait().min(self.deadline.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAILED: AttemptResult = AttemptResult::Response(503);

    fn plan(replay: Replay) -> (AttemptPlan, Instant) {
        let now = Instant::now();
        let plan = AttemptPlan::new(now, Duration::from_secs(10), Duration::from_secs(2), replay);
        (plan, now)
    }

    #[test]
    fn a_success_or_a_lasting_failure_is_answered() {
        let (mut p, now) = plan(Replay::Yes);
        assert_eq!(
            p.after(AttemptResult::Response(200), now, || true),
            Next::Respond
        );
        assert_eq!(
            p.after(AttemptResult::Response(500), now, || true),
            Next::Respond
        );
        assert_eq!(p.attempt(), 0);
    }

    #[test]
    fn a_transient_failure_is_retried_at_most_twice() {
        let (mut p, now) = plan(Replay::Yes);
        assert_eq!(p.after(FAILED, now, || true), Next::Retry);
        assert_eq!(p.after(AttemptResult::Timeout, now, || true), Next::Retry);
        assert_eq!(p.attempt(), 2);
        assert_eq!(
            p.after(AttemptResult::ConnectFailed, now, || true),
            Next::Respond
        );
    }

    #[test]
    fn the_budget_is_asked_last_and_only_when_a_retry_is_due() {
        let (mut p, now) = plan(Replay::Yes);
        let mut asked = false;
        p.after(AttemptResult::Response(200), now, || {
            asked = true;
            true
        });
        assert!(!asked, "a success draws nothing from the budget");
        assert_eq!(p.after(FAILED, now, || false), Next::BudgetExhausted);
        let (mut streamed, now) = plan(Replay::NotBufferable);
        let mut asked = false;
        let next = streamed.after(FAILED, now, || {
            asked = true;
            true
        });
        assert_eq!(next, Next::Refused("not_bufferable"));
        assert!(!asked, "a request that cannot be sent again draws nothing");
        let (mut post, now) = plan(Replay::NotRetryable);
        assert_eq!(
            post.after(FAILED, now, || true),
            Next::Refused("not_retryable")
        );
    }

    #[test]
    fn time_bounds_every_attempt_and_every_wait() {
        let (mut p, now) = plan(Replay::Yes);
        assert_eq!(p.window(now), Duration::from_secs(2));
        let late = now + Duration::from_millis(9_500);
        assert_eq!(p.window(late), Duration::from_millis(500));
        assert_eq!(
            p.wait(true, || Duration::from_secs(3), late),
            Duration::from_millis(500)
        );
        assert_eq!(
            p.wait(false, || Duration::from_secs(3), late),
            Duration::ZERO
        );
        assert_eq!(
            p.wait(true, || Duration::from_millis(40), now),
            Duration::from_millis(40)
        );
        let over = now + Duration::from_secs(10);
        assert_eq!(
            p.after(FAILED, over, || true),
            Next::Respond,
            "no time left"
        );
        assert_eq!(p.window(over), Duration::ZERO);
    }

    #[test]
    fn only_a_first_replayable_attempt_is_hedged_once_p95_is_known() {
        let (mut p, now) = plan(Replay::Yes);
        let after = p.hedge_after(true, Some(12.5), 500);
        assert_eq!(after, Some(Duration::from_micros(12_500)));
        assert_eq!(
            p.hedge_after(false, Some(12.5), 500),
            None,
            "not registered"
        );
        assert_eq!(
            p.hedge_after(true, Some(12.5), 99),
            None,
            "too few requests"
        );
        assert_eq!(p.hedge_after(true, None, 500), None);
        assert_eq!(p.hedge_after(true, Some(f64::NAN), 500), None);
        assert_eq!(
            p.hedge_after(true, Some(0.0), 500),
            Some(Duration::from_millis(1)),
            "at least 1 ms"
        );
        let (streamed, _) = plan(Replay::NotBufferable);
        assert_eq!(streamed.hedge_after(true, Some(12.5), 500), None);
        p.after(FAILED, now, || true);
        assert_eq!(
            p.hedge_after(true, Some(12.5), 500),
            None,
            "a retry is not hedged"
        );
    }
}
