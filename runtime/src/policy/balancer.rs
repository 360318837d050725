//! Load balancing: power of two choices over peak-EWMA latency.
//!
//! Each endpoint carries a [`PeakEwma`] latency estimate: a slow response
//! raises it at once (the peak), faster ones pull it down exponentially, and
//! with no traffic it drifts toward zero so an endpoint that was slow once is
//! tried again later. Its cost is that estimate times the requests in flight
//! plus one. [`pick_preferring`] samples two distinct candidates at random
//! and takes the cheaper (Mitzenmacher's power of two choices, as in Linkerd and
//! tower), which avoids herding every request onto the one fastest endpoint.
//!
//! Pure logic: time comes in as `now`, randomness as an [`Rng`].

use std::time::{Duration, Instant};

use rand::Rng;

/// RTT assumed for an endpoint we have never measured (Linkerd's default):
/// low enough that new instances get traffic, high enough that a measured
/// fast endpoint is preferred.
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);

/// Time constant of the exponential decay (Linkerd's default): how long a
/// latency peak keeps weighing on an endpoint.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

fn nanos(d: Duration) -> f64 {
    d.as_secs_f64() * 1e9
}

// === impl PeakEwma ===

/// Latency estimate and load of one endpoint, so the balancer can compare
/// endpoints by expected wait rather than by a stale average.
#[derive(Debug, Clone)]
pub struct PeakEwma {
    cost_ns: f64,
    stamp: Instant,
    pending: u32,
    decay_ns: f64,
}

impl PeakEwma {
    /// Starts at `default_rtt` so an unmeasured endpoint competes fairly
    /// with measured ones; `decay` is the time constant of the average.
    pub fn new(default_rtt: Duration, decay: Duration, now: Instant) -> Self {
        Self {
            cost_ns: nanos(default_rtt),
            stamp: now,
            pending: 0,
            // A zero decay would divide by zero; 1 ns means "no memory".
            decay_ns: nanos(decay).max(1.0),
        }
    }

    /// Folds in a measured round trip: a slower one replaces the estimate at
    /// once (so a struggling endpoint is avoided immediately), a faster one
    /// moves it exponentially, weighted by the time since the last sample.
    pub fn observe(&mut self, rtt: Duration, now: Instant) {
        let rtt_ns = nanos(rtt);
        if rtt_ns > self.cost_ns {
            self.cost_ns = rtt_ns;
        } else {
            let w = self.weight(now);
            self.cost_ns = self.cost_ns * w + rtt_ns * (1.0 - w);
        }
        self.stamp = self.stamp.max(now);
    }

    /// Counts a request sent to this endpoint, so load raises its cost before
    /// any latency is measured.
    pub fn start(&mut self) {
        self.pending = self.pending.saturating_add(1);
    }

    /// Counts a request finished (success or failure); pairs with
    /// [`PeakEwma::start`].
    pub fn end(&mut self) {
        self.pending = self.pending.saturating_sub(1);
    }

    /// Requests in flight, for metrics and tests.
    pub fn pending(&self) -> u32 {
        self.pending
    }

    /// Latency estimate decayed toward zero for the time since the last
    /// sample, so idle endpoints get probed again; what the router publishes.
    pub fn latency(&self, now: Instant) -> Duration {
        Duration::from_secs_f64(self.decayed_ns(now) / 1e9)
    }

    /// What the balancer minimises: decayed estimate times (pending + 1), in
    /// nanoseconds.
    pub fn cost(&self, now: Instant) -> f64 {
        self.decayed_ns(now) * (f64::from(self.pending) + 1.0)
    }

    fn decayed_ns(&self, now: Instant) -> f64 {
        self.cost_ns * self.weight(now)
    }

    /// exp(-elapsed / decay): how much of the old estimate remains.
    fn weight(&self, now: Instant) -> f64 {
        let elapsed = nanos(now.saturating_duration_since(self.stamp));
        (-elapsed / self.decay_ns).exp()
    }
}

/// The power of two choices among the `items` that `eligible` accepts,
/// preferring those `fresh` also accepts (instances not tried yet) and
/// falling back to every eligible one rather than giving up. Allocates
/// nothing: the candidates are counted, then the two drawn are found again.
pub fn pick_preferring<'a, T, R: Rng + ?Sized>(
    items: &'a [T],
    eligible: impl Fn(&T) -> bool,
    fresh: impl Fn(&T) -> bool,
    cost: impl FnMut(&&'a T) -> f64,
    rng: &mut R,
) -> Option<&'a T> {
    let preferred = |t: &&T| eligible(t) && fresh(t);
    let n = items.iter().filter(preferred).count();
    if n > 0 {
        return p2c(n, |i| items.iter().filter(preferred).nth(i), cost, rng);
    }
    let any = |t: &&T| eligible(t);
    let n = items.iter().filter(any).count();
    p2c(n, |i| items.iter().filter(any).nth(i), cost, rng)
}

/// The power of two choices over `n` candidates reachable through `nth`:
/// `None` when there are none, the only one when alone, else the cheaper
/// by `cost` of two distinct random ones (ties go to the first, itself a
/// uniform random choice). Allocates nothing.
pub fn p2c<T, R: Rng + ?Sized>(
    n: usize,
    nth: impl Fn(usize) -> Option<T>,
    mut cost: impl FnMut(&T) -> f64,
    rng: &mut R,
) -> Option<T> {
    match n {
        0 => None,
        1 => nth(0),
        _ => {
            let i = rng.gen_range(0..n);
            let mut j = rng.gen_range(0..n - 1);
            if j >= i {
                j += 1;
            }
            let (a, b) = (nth(i)?, nth(j)?);
            let (cost_a, cost_b) = (cost(&a), cost(&b));
            Some(if cost_b < cost_a { b } else { a })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Endpoints by name, each with its estimate, chosen among as the
    /// routing table does: [`pick_preferring`] over the estimates' costs.
    #[derive(Default)]
    struct Pool(HashMap<&'static str, PeakEwma>);

    impl Pool {
        fn endpoint(&mut self, key: &'static str, now: Instant) -> &mut PeakEwma {
            self.0
                .entry(key)
                .or_insert_with(|| PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, now))
        }

        fn observe(&mut self, key: &'static str, rtt: Duration, now: Instant) {
            self.endpoint(key, now).observe(rtt, now);
        }

        fn cost(&mut self, key: &'static str, now: Instant) -> f64 {
            self.endpoint(key, now).cost(now)
        }

        /// P2C among `candidates`, avoiding `exclude` while another exists.
        fn pick_excluding(
            &mut self,
            candidates: &[&'static str],
            exclude: &[&'static str],
            now: Instant,
            rng: &mut StdRng,
        ) -> Option<&'static str> {
            for k in candidates {
                self.endpoint(k, now);
            }
            let estimates = &self.0;
            pick_preferring(
                candidates,
                |_| true,
                |k| !exclude.contains(k),
                |k| estimates[**k].cost(now),
                rng,
            )
            .copied()
        }

        fn pick(
            &mut self,
            candidates: &[&'static str],
            now: Instant,
            rng: &mut StdRng,
        ) -> Option<&'static str> {
            self.pick_excluding(candidates, &[], now, rng)
        }
    }

    fn ms(cost_ns: f64) -> f64 {
        cost_ns / 1e6
    }

    #[test]
    fn empty_gives_none_and_single_is_always_chosen() {
        let mut b = Pool::default();
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        assert_eq!(b.pick(&[], now, &mut rng), None);
        b.observe("only", Duration::from_secs(5), now);
        for _ in 0..100 {
            assert_eq!(b.pick(&["only"], now, &mut rng), Some("only"));
        }
    }

    #[test]
    fn fast_endpoint_wins_over_slow() {
        let mut b = Pool::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut now = Instant::now();
        let candidates = ["slow", "fast"];
        let mut fast = 0;
        for _ in 0..10_000 {
            let k = b.pick(&candidates, now, &mut rng).unwrap();
            b.endpoint(k, now).start();
            let rtt = if k == "fast" {
                fast += 1;
                5 * MS
            } else {
                200 * MS
            };
            b.observe(k, rtt, now);
            b.endpoint(k, now).end();
            now += 10 * MS;
        }
        assert!(fast > 9_000, "fast got {fast} of 10000");
        // The slow one is still probed now and then (its estimate decays).
        assert!(fast < 10_000, "slow endpoint never retried");
    }

    #[test]
    fn one_slow_sample_is_a_peak_that_decays() {
        let mut now = Instant::now();
        let mut e = PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, now);
        let step = 100 * MS;
        for _ in 0..600 {
            now += step;
            e.observe(5 * MS, now);
        }
        assert!((ms(e.cost(now)) - 5.0).abs() < 0.5, "{}", ms(e.cost(now)));

        e.observe(200 * MS, now);
        assert!(
            (ms(e.cost(now)) - 200.0).abs() < 1e-6,
            "peak not taken at once"
        );

        // One decay period later it still weighs (about 5 + 195/e).
        for _ in 0..100 {
            now += step;
            e.observe(5 * MS, now);
        }
        assert!(ms(e.cost(now)) > 50.0, "{}", ms(e.cost(now)));

        // After five periods in all it is back near the fast latency.
        for _ in 0..400 {
            now += step;
            e.observe(5 * MS, now);
        }
        assert!(ms(e.cost(now)) < 7.0, "{}", ms(e.cost(now)));
    }

    #[test]
    fn idle_estimate_drifts_toward_zero() {
        let now = Instant::now();
        let mut e = PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, now);
        e.observe(200 * MS, now);
        let later = now + DEFAULT_DECAY;
        let expected = 200.0 / std::f64::consts::E;
        assert!((ms(e.cost(later)) - expected).abs() < 1e-6);
        assert!(e.latency(later) < e.latency(now));
    }

    #[test]
    fn pending_requests_raise_cost() {
        let now = Instant::now();
        let mut e = PeakEwma::new(DEFAULT_RTT, DEFAULT_DECAY, now);
        let idle = e.cost(now);
        e.start();
        e.start();
        assert_eq!(e.pending(), 2);
        assert!((e.cost(now) - 3.0 * idle).abs() < 1e-6);
        e.end();
        e.end();
        e.end(); // an extra end never underflows
        assert_eq!(e.pending(), 0);
        assert!((e.cost(now) - idle).abs() < 1e-6);

        // In the balancer, a loaded endpoint loses to an idle equal one.
        let mut b = Pool::default();
        let mut rng = StdRng::seed_from_u64(3);
        b.observe("busy", 10 * MS, now);
        b.observe("idle", 10 * MS, now);
        b.endpoint("busy", now).start();
        for _ in 0..1_000 {
            assert_eq!(b.pick(&["busy", "idle"], now, &mut rng), Some("idle"));
        }
        b.endpoint("busy", now).end();
        assert_eq!(b.cost("busy", now), b.cost("idle", now));
    }

    #[test]
    fn equal_endpoints_share_evenly() {
        let mut b = Pool::default();
        let mut rng = StdRng::seed_from_u64(11);
        let now = Instant::now();
        let mut a = 0;
        for _ in 0..10_000 {
            if b.pick(&["a", "b"], now, &mut rng) == Some("a") {
                a += 1;
            }
        }
        assert!((4_000..=6_000).contains(&a), "a got {a} of 10000");
    }

    #[test]
    fn picks_are_distinct_pairs_among_many() {
        // With three equal endpoints every one gets roughly a third.
        let mut b = Pool::default();
        let mut rng = StdRng::seed_from_u64(5);
        let now = Instant::now();
        let keys = ["a", "b", "c"];
        let mut counts = HashMap::new();
        for _ in 0..9_000 {
            *counts
                .entry(b.pick(&keys, now, &mut rng).unwrap())
                .or_insert(0) += 1;
        }
        for k in keys {
            let c = counts.get(k).copied().unwrap_or(0);
            assert!((2_400..=3_600).contains(&c), "{k} got {c}");
        }
    }

    #[test]
    fn pick_excluding_prefers_others() {
        let mut b = Pool::default();
        let mut rng = StdRng::seed_from_u64(9);
        let now = Instant::now();
        // Make the excluded one the cheapest: it must still be avoided.
        b.observe("tried", MS, now);
        b.observe("b", 100 * MS, now);
        b.observe("c", 100 * MS, now);
        for _ in 0..1_000 {
            let k = b
                .pick_excluding(&["tried", "b", "c"], &["tried"], now, &mut rng)
                .unwrap();
            assert_ne!(k, "tried");
        }
        assert_eq!(
            b.pick_excluding(&["tried", "b"], &["tried"], now, &mut rng),
            Some("b")
        );
        // Nothing else: fall back rather than fail.
        assert_eq!(
            b.pick_excluding(&["tried"], &["tried"], now, &mut rng),
            Some("tried")
        );
        let k = b.pick_excluding(&["tried", "b"], &["tried", "b"], now, &mut rng);
        assert_eq!(k, Some("tried"), "fallback should still prefer the cheaper");
        assert_eq!(b.pick_excluding(&[], &["tried"], now, &mut rng), None);
    }

    #[test]
    fn unknown_endpoints_start_at_default_rtt() {
        let mut b = Pool::default();
        let mut rng = StdRng::seed_from_u64(2);
        let now = Instant::now();
        b.observe("measured", 50 * MS, now);
        assert!((ms(b.cost("new", now)) - 30.0).abs() < 1e-9);
        for _ in 0..100 {
            assert_eq!(b.pick(&["measured", "new"], now, &mut rng), Some("new"));
        }
    }

    #[test]
    fn zero_decay_does_not_produce_nan() {
        let now = Instant::now();
        let mut e = PeakEwma::new(DEFAULT_RTT, Duration::ZERO, now);
        e.observe(MS, now);
        assert!(e.cost(now).is_finite());
        assert!(e.cost(now + MS).is_finite());
    }
}
