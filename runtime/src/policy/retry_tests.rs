use proptest::prelude::*;

use super::*;

// === conditions ===

#[test]
fn retryable_results() {
    use AttemptResult::*;
    for r in [
        ConnectFailed,
        Reset,
        Timeout,
        Response(502),
        Response(503),
        Response(504),
    ] {
        assert!(is_retryable(r), "{r:?}");
    }
    for s in [
        0,
        100,
        200,
        204,
        301,
        400,
        404,
        429,
        500,
        501,
        505,
        599,
        999,
        u16::MAX,
    ] {
        assert!(!is_retryable(Response(s)), "{s}");
    }
}

#[test]
fn idempotent_methods() {
    for m in ["GET", "HEAD", "OPTIONS", "PUT", "DELETE"] {
        assert!(method_is_idempotent(m), "{m}");
    }
    for m in [
        "POST", "PATCH", "CONNECT", "TRACE", "get", "", "GET ", "G\u{0}ET",
    ] {
        assert!(!method_is_idempotent(m), "{m:?}");
    }
}

#[test]
fn limits_match_the_design() {
    assert_eq!(MAX_RETRIES, 2);
    assert_eq!(MAX_BUFFERED_BODY, 65_536);
}

// === RetryBudget ===

fn withdraw_all(b: &mut RetryBudget, now: Instant) -> usize {
    let mut n = 0;
    while b.try_withdraw(now) {
        n += 1;
        assert!(n <= 1_000_000, "budget never ran out");
    }
    n
}

#[test]
fn idle_service_gets_the_floor() {
    let mut b = RetryBudget::default();
    let now = Instant::now();
    assert_eq!(b.used_fraction(now), 0.0);
    // 10 per second over 10 s.
    assert_eq!(withdraw_all(&mut b, now), 100);
    assert_eq!(b.used_fraction(now), 1.0);
}

#[test]
fn requests_earn_a_fifth_of_a_retry_each() {
    let mut b = RetryBudget::default();
    let now = Instant::now();
    for _ in 0..1000 {
        b.record_request(now);
    }
    for _ in 0..150 {
        assert!(b.try_withdraw(now));
    }
    // 150 of 0.2 * 1000 + 10 * 10.
    assert!((b.used_fraction(now) - 0.5).abs() < 1e-9);
    assert_eq!(withdraw_all(&mut b, now), 150);
    assert!(!b.try_withdraw(now));
    assert_eq!(b.used_fraction(now), 1.0);
}

#[test]
fn steady_traffic_gets_ratio_plus_floor() {
    // 100 requests/s for 60 s, asking for a retry after every request: the
    // budget settles at 20 + 10 retries per second.
    let mut b = RetryBudget::default();
    let base = Instant::now();
    let mut granted_last_10s = 0;
    for i in 0..6000u32 {
        let now = base + Duration::from_millis(10) * i;
        b.record_request(now);
        if b.try_withdraw(now) && i >= 5000 {
            granted_last_10s += 1;
        }
    }
    assert!(
        (290..=310).contains(&granted_last_10s),
        "{granted_last_10s}"
    );
}

#[test]
fn credit_from_before_a_lull_does_not_pay_for_a_later_burst() {
    let mut b = RetryBudget::default();
    let base = Instant::now();
    for _ in 0..1000 {
        b.record_request(base);
    }
    // Five quiet seconds later, [t, t + ttl] holds no request: only the floor.
    assert_eq!(withdraw_all(&mut b, base + Duration::from_secs(5)), 100);
}

#[test]
fn credits_and_debits_expire_after_the_ttl() {
    let mut b = RetryBudget::default();
    let base = Instant::now();
    b.record_request(base);
    assert_eq!(withdraw_all(&mut b, base), 100);
    // Still within ttl (plus the current bucket): refused.
    assert!(!b.try_withdraw(base + Duration::from_millis(9_999)));
    assert!(!b.try_withdraw(base + Duration::from_millis(10_050)));
    // One bucket past the ttl everything from `base` is gone; the refused
    // attempts above were not counted.
    let later = base + Duration::from_millis(10_100);
    assert_eq!(b.used_fraction(later), 0.0);
    assert_eq!(withdraw_all(&mut b, later), 100);
}

#[test]
fn a_budget_of_nothing_refuses_everything() {
    let now = Instant::now();
    for (ratio, floor) in [(0.0, 0.0), (f64::NAN, f64::NAN), (-1.0, f64::NEG_INFINITY)] {
        let mut b = RetryBudget::new(ratio, floor, Duration::from_secs(10));
        for _ in 0..100 {
            b.record_request(now);
        }
        assert!(!b.try_withdraw(now), "{ratio} {floor}");
        assert_eq!(b.used_fraction(now), 0.0);
    }
}

#[test]
fn odd_ttls_and_clocks_do_not_panic() {
    let base = Instant::now() + Duration::from_secs(10_000);
    for ttl in [
        Duration::ZERO,
        Duration::from_nanos(1),
        Duration::from_nanos(12_345_678_901),
        Duration::MAX,
    ] {
        let mut b = RetryBudget::new(0.2, 10.0, ttl);
        b.record_request(base);
        b.record_request(base - Duration::from_secs(5_000));
        let _ = b.try_withdraw(base + Duration::from_secs(1));
        let _ = b.try_withdraw(base - Duration::from_secs(9_000));
        let f = b.used_fraction(base - Duration::from_secs(9_999));
        assert!((0.0..=1.0).contains(&f));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The documented guarantee: for every closed interval [s, s + ttl], the
    /// retries allowed in it are at most ratio * (requests in (s - w, s + ttl])
    /// + min_per_sec * ttl, where w = ttl / 100 is the bucket width.
    #[test]
    fn withdrawals_stay_within_ratio_plus_floor(
        ttl_ms in prop_oneof![Just(1_000u64), Just(2_000), Just(10_000)],
        ratio in 0.0..1.0f64,
        min_per_sec in 0.0..20.0f64,
        events in proptest::collection::vec((0u64..300, prop::bool::weighted(0.6)), 1..400),
    ) {
        let ttl = Duration::from_millis(ttl_ms);
        let w = ttl_ms / u64::from(BUDGET_BUCKETS);
        let mut b = RetryBudget::new(ratio, min_per_sec, ttl);
        let base = Instant::now();
        let mut t = 0u64;
        // Event times are shifted by ttl so windows starting before the first
        // event are plain indices.
        let shift = ttl_ms + w;
        let mut requests = Vec::new();
        let mut granted = Vec::new();
        for (gap, is_request) in events {
            t += gap;
            let now = base + Duration::from_millis(t);
            if is_request {
                b.record_request(now);
                requests.push(t + shift);
            } else if b.try_withdraw(now) {
                granted.push(t + shift);
            }
        }
        let end = (t + shift + ttl_ms + 2) as usize;
        let prefix = |times: &[u64]| {
            let mut c = vec![0u64; end + 1];
            for &x in times {
                c[x as usize + 1] += 1;
            }
            for i in 1..=end {
                c[i] += c[i - 1];
            }
            c
        };
        let (req, ret) = (prefix(&requests), prefix(&granted));
        // count of events in [lo, hi]
        let count = |c: &[u64], lo: u64, hi: u64| c[(hi + 1) as usize] - c[lo as usize];
        let floor = min_per_sec * ttl.as_secs_f64();
        for s in w..(t + shift + 1) {
            let hi = s + ttl_ms;
            let retries = count(&ret, s, hi);
            let earned = count(&req, s + 1 - w, hi);
            prop_assert!(
                retries as f64 <= ratio * earned as f64 + floor + 1e-9,
                "window at {}: {} retries, {} requests", s, retries, earned
            );
        }
    }

    /// used_fraction is always a fraction.
    #[test]
    fn used_fraction_is_in_unit_interval(
        events in proptest::collection::vec((0u64..2_000, any::<bool>()), 0..200),
    ) {
        let mut b = RetryBudget::default();
        let mut now = Instant::now();
        for (gap, is_request) in events {
            now += Duration::from_millis(gap);
            if is_request { b.record_request(now) } else { let _ = b.try_withdraw(now); }
            let f = b.used_fraction(now);
            prop_assert!((0.0..=1.0).contains(&f));
        }
    }
}

#[test]
fn the_floor_is_shared_by_the_nodes_calling_a_service() {
    let t0 = Instant::now();
    // No requests: only the floor, 10/s over 10 s, split five ways.
    let mut alone = ServiceBudget::default();
    let mut crowd = ServiceBudget::default();
    let count = |b: &mut ServiceBudget, callers: usize| {
        (0..1000).filter(|_| b.try_withdraw(callers, t0)).count()
    };
    assert_eq!(count(&mut alone, 1), 100);
    assert_eq!(count(&mut crowd, 5), 20);
    assert!(crowd.used_fraction(t0) >= 1.0 - 1e-9);
    assert!(ServiceBudget::default().used_fraction(t0) < 0.1);
    // Requests earn 20% of a retry each, on top.
    for _ in 0..100 {
        crowd.record_request(t0);
    }
    assert_eq!(count(&mut crowd, 5), 20);
}
