//! Load balancing: power of two choices over peak-EWMA latency.
//!
//! Each endpoint carries a [`PeakEwma`] latency estimate: a slow response
//! raises it at once (the peak), faster ones pull it down exponentially, and
//! with no traffic it drifts toward zero so an endpoint that was slow once is
//! tried again later. Its cost is that estimate times the requests in flight
//! plus one. [`Balancer::pick`] samples two distinct candidates at random and
//! takes the cheaper (Mitzenmacher's power of two choices, as in Linkerd and
//! tower), which avoids herding every request onto the one fastest endpoint.
//!
//! Pure logic: time comes in as `now`, randomness as an [`Rng`].

use std::collections::HashMap;
use std::hash::Hash;
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

// === impl Balancer ===

/// Per-endpoint estimates plus the P2C choice, so callers only say which
/// endpoints are eligible and report what happened.
#[derive(Debug, Clone)]
pub struct Balancer<K> {
    endpoints: HashMap<K, PeakEwma>,
    default_rtt: Duration,
    decay: Duration,
}

impl<K: Eq + Hash + Clone> Default for Balancer<K> {
    /// Linkerd's defaults: [`DEFAULT_RTT`] and [`DEFAULT_DECAY`].
    fn default() -> Self {
        Self::new(DEFAULT_RTT, DEFAULT_DECAY)
    }
}

impl<K: Eq + Hash + Clone> Balancer<K> {
    /// A balancer that assumes `default_rtt` for new endpoints and forgets
    /// peaks with time constant `decay`.
    pub fn new(default_rtt: Duration, decay: Duration) -> Self {
        Self {
            endpoints: HashMap::new(),
            default_rtt,
            decay,
        }
    }

    /// Chooses among `candidates` (the healthy instances of a service):
    /// `None` when empty, the only one when alone, else the cheaper of two
    /// distinct random ones. Endpoints seen for the first time are
    /// registered at the default RTT.
    pub fn pick<R: Rng>(&mut self, candidates: &[K], now: Instant, rng: &mut R) -> Option<K> {
        self.choose(candidates.len(), |i| candidates.get(i), now, rng)
    }

    /// Like [`Balancer::pick`], but avoids `exclude` (the instances already
    /// tried) when any other candidate exists, so a retry prefers another
    /// instance; falls back to the excluded ones rather than giving up.
    pub fn pick_excluding<R: Rng>(
        &mut self,
        candidates: &[K],
        exclude: &[K],
        now: Instant,
        rng: &mut R,
    ) -> Option<K> {
        pick_preferring(
            candidates,
            |_| true,
            |k| !exclude.contains(k),
            |k| self.entry(k, now).cost(now),
            rng,
        )
        .cloned()
    }

    /// Records a measured round trip to `key` (registering it if new).
    pub fn observe(&mut self, key: &K, rtt: Duration, now: Instant) {
        self.entry(key, now).observe(rtt, now);
    }

    /// Counts a request sent to `key`. Call it after [`Balancer::pick`] or
    /// [`Balancer::observe`] registered the endpoint; an unknown key is
    /// ignored (there is no `now` to start its estimate).
    pub fn start(&mut self, key: &K) {
        if let Some(e) = self.endpoints.get_mut(key) {
            e.start();
        }
    }

    /// Counts a request to `key` finished; pairs with [`Balancer::start`].
    pub fn end(&mut self, key: &K) {
        if let Some(e) = self.endpoints.get_mut(key) {
            e.end();
        }
    }

    /// Current cost of `key` (default RTT if never seen), for metrics and
    /// the routing snapshot.
    pub fn cost(&self, key: &K, now: Instant) -> f64 {
        self.endpoints
            .get(key)
            .map_or_else(|| nanos(self.default_rtt), |e| e.cost(now))
    }

    /// The estimate of `key`, if it has been registered.
    pub fn endpoint(&self, key: &K) -> Option<&PeakEwma> {
        self.endpoints.get(key)
    }

    /// Forgets endpoints for which `keep` is false (instances that left the
    /// catalog), so the map does not grow forever.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.endpoints.retain(|k, _| keep(k));
    }

    fn entry(&mut self, key: &K, now: Instant) -> &mut PeakEwma {
        let (default_rtt, decay) = (self.default_rtt, self.decay);
        self.endpoints
            .entry(key.clone())
            .or_insert_with(|| PeakEwma::new(default_rtt, decay, now))
    }

    /// P2C over `n` candidates reachable through `nth`.
    fn choose<'a, R: Rng>(
        &mut self,
        n: usize,
        nth: impl Fn(usize) -> Option<&'a K>,
        now: Instant,
        rng: &mut R,
    ) -> Option<K>
    where
        K: 'a,
    {
        p2c(n, nth, |k| self.entry(k, now).cost(now), rng).cloned()
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
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(cost_ns: f64) -> f64 {
        cost_ns / 1e6
    }

    #[test]
    fn empty_gives_none_and_single_is_always_chosen() {
        let mut b = Balancer::<&str>::default();
        let mut rng = StdRng::seed_from_u64(1);
        let now = Instant::now();
        assert_eq!(b.pick(&[], now, &mut rng), None);
        b.observe(&"only", Duration::from_secs(5), now);
        for _ in 0..100 {
            assert_eq!(b.pick(&["only"], now, &mut rng), Some("only"));
        }
    }

    #[test]
    fn fast_endpoint_wins_over_slow() {
        let mut b = Balancer::default();
        let mut rng = StdRng::seed_from_u64(7);
        let mut now = Instant::now();
        let candidates = ["slow", "fast"];
        let mut fast = 0;
        for _ in 0..10_000 {
            let k = b.pick(&candidates, now, &mut rng).unwrap();
            b.start(&k);
            let rtt = if k == "fast" {
                fast += 1;
                5 * MS
            } else {
                200 * MS
            };
            b.observe(&k, rtt, now);
            b.end(&k);
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
        let mut b = Balancer::default();
        let mut rng = StdRng::seed_from_u64(3);
        b.observe(&"busy", 10 * MS, now);
        b.observe(&"idle", 10 * MS, now);
        b.start(&"busy");
        for _ in 0..1_000 {
            assert_eq!(b.pick(&["busy", "idle"], now, &mut rng), Some("idle"));
        }
        b.end(&"busy");
        assert_eq!(b.cost(&"busy", now), b.cost(&"idle", now));
    }

    #[test]
    fn equal_endpoints_share_evenly() {
        let mut b = Balancer::default();
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
        let mut b = Balancer::default();
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
        let mut b = Balancer::default();
        let mut rng = StdRng::seed_from_u64(9);
        let now = Instant::now();
        // Make the excluded one the cheapest: it must still be avoided.
        b.observe(&"tried", MS, now);
        b.observe(&"b", 100 * MS, now);
        b.observe(&"c", 100 * MS, now);
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
        let mut b = Balancer::default();
        let mut rng = StdRng::seed_from_u64(2);
        let now = Instant::now();
        b.observe(&"measured", 50 * MS, now);
        assert!((ms(b.cost(&"new", now)) - 30.0).abs() < 1e-9);
        for _ in 0..100 {
            assert_eq!(b.pick(&["measured", "new"], now, &mut rng), Some("new"));
        }
        assert!(b.endpoint(&"new").is_some());
    }

    #[test]
    fn retain_forgets_departed_endpoints() {
        let mut b = Balancer::default();
        let now = Instant::now();
        b.observe(&"stay", MS, now);
        b.observe(&"go", MS, now);
        b.retain(|k| *k == "stay");
        assert!(b.endpoint(&"stay").is_some());
        assert!(b.endpoint(&"go").is_none());
        // Unknown keys are ignored by start/end.
        b.start(&"go");
        b.end(&"go");
        assert!(b.endpoint(&"go").is_none());
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
