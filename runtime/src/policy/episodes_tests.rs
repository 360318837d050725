use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

const MS: Duration = Duration::from_millis(1);

/// Feeds `n` episodes of `len` each, spaced by one second of success,
/// seen closely (a failure right before the recovery), so each is an exact
/// sample.
fn episodes(t: &mut EpisodeTracker, now: &mut Instant, n: usize, len: Duration) {
    for _ in 0..n {
        t.on_outcome(*now, true);
        *now += Duration::from_secs(1);
        t.on_outcome(*now, false);
        *now += len;
        t.on_outcome(*now, false);
        t.on_outcome(*now, true);
    }
}

fn stats(samples: u64, p90: f64, p99: f64) -> EpisodeStats {
    EpisodeStats {
        samples,
        p50_ms: Some(p90 / 2.0),
        p90_ms: Some(p90),
        p99_ms: Some(p99),
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= b.abs() * 0.011 + 1e-9
}

// === EpisodeTracker ===

#[test]
fn episode_runs_from_first_failure_after_success_to_next_success() {
    let mut t = EpisodeTracker::new();
    let mut now = Instant::now();
    assert_eq!(t.on_outcome(now, true), None);
    now += 10 * MS;
    let start = now;
    assert_eq!(t.on_outcome(now, false), None);
    assert_eq!(t.current_episode_start(), Some(start));
    // Further failures do not move the start.
    now += 40 * MS;
    t.on_outcome(now, false);
    assert_eq!(t.current_episode_start(), Some(start));
    now += 60 * MS;
    assert_eq!(t.on_outcome(now, true), Some(100 * MS));
    assert_eq!(t.current_episode_start(), None);
    // The outage lasted between 40 ms (the last failure) and 100 ms.
    let s = t.stats();
    assert_eq!(s.samples, 1);
    assert!(close(s.p50_ms.unwrap(), 70.0), "{s:?}");
    assert!(close(s.p90_ms.unwrap(), 70.0), "{s:?}");
    // A success while up ends nothing.
    assert_eq!(t.on_outcome(now + MS, true), None);
    assert_eq!(t.stats().samples, 1);
}

#[test]
fn failures_before_any_success_do_not_open_an_episode() {
    let mut t = EpisodeTracker::new();
    let now = Instant::now();
    t.on_outcome(now, false);
    assert_eq!(t.current_episode_start(), None);
    assert_eq!(t.on_outcome(now + 5 * MS, true), None);
    assert_eq!(t.stats(), EpisodeStats::default());
}

#[test]
fn health_changes_open_and_close_episodes_like_requests() {
    let mut t = EpisodeTracker::new();
    let base = Instant::now();
    t.on_health_change(base, true);
    t.on_health_change(base + MS, false);
    assert_eq!(t.current_episode_start(), Some(base + MS));
    // A request success closes a health-opened episode: one state machine.
    assert_eq!(t.on_outcome(base + 301 * MS, true), Some(300 * MS));
    t.on_outcome(base + 400 * MS, false);
    assert_eq!(t.on_health_change(base + 600 * MS, true), Some(200 * MS));
    assert_eq!(t.stats().samples, 2);
}

#[test]
fn quantiles_follow_the_durations() {
    let mut t = EpisodeTracker::new();
    let mut now = Instant::now();
    // 1..=100 ms: p50 ~ 50, p90 ~ 90, p99 ~ 99.
    for i in 1..=100u32 {
        episodes(&mut t, &mut now, 1, MS * i);
    }
    // The median and the tail come from the sketch; the p90 is the
    // learned estimate (here chasing outages that grow every time), and
    // the tail is never below it.
    let s = t.stats();
    assert_eq!(s.samples, 100);
    assert!(close(s.p50_ms.unwrap(), 50.0), "{s:?}");
    let p90 = s.p90_ms.unwrap();
    assert!((80.0..=120.0).contains(&p90), "{s:?}");
    assert!(s.p99_ms.unwrap() >= p90.max(99.0) * 0.99, "{s:?}");
}

#[test]
fn time_going_backwards_records_zero_not_a_panic() {
    let mut t = EpisodeTracker::new();
    let base = Instant::now() + Duration::from_secs(100);
    t.on_outcome(base, true);
    t.on_outcome(base, false);
    assert_eq!(
        t.on_outcome(base - Duration::from_secs(50), true),
        Some(Duration::ZERO)
    );
    assert_eq!(t.stats().samples, 1);
    assert!(t.stats().p99_ms.unwrap() <= 0.1 + 1e-9, "{:?}", t.stats());
}

#[test]
fn old_episodes_age_out_after_two_rotations() {
    let mut t = EpisodeTracker::with_rotation(Duration::from_secs(60));
    let mut now = Instant::now();
    episodes(&mut t, &mut now, 10, 500 * MS);
    assert_eq!(t.stats().samples, 10);
    // One rotation later the old ones still count, beside the new ones.
    now += Duration::from_secs(60);
    episodes(&mut t, &mut now, 5, 50 * MS);
    assert_eq!(t.stats().samples, 15);
    // Another rotation: the first ten are gone, recent behaviour wins.
    now += Duration::from_secs(60);
    episodes(&mut t, &mut now, 1, 50 * MS);
    let s = t.stats();
    assert_eq!(s.samples, 6);
    assert!(close(s.p50_ms.unwrap(), 50.0), "{s:?}");
    // A long silence forgets everything at the next event.
    now += Duration::from_secs(1000);
    t.on_outcome(now, true);
    assert_eq!(t.stats().samples, 0);
}

#[test]
fn an_episode_spanning_a_rotation_is_recorded() {
    let mut t = EpisodeTracker::with_rotation(Duration::from_secs(60));
    let base = Instant::now();
    t.on_outcome(base, true);
    t.on_outcome(base + MS, false);
    assert_eq!(
        t.on_outcome(base + Duration::from_secs(90), true),
        Some(Duration::from_secs(90) - MS)
    );
    assert_eq!(t.stats().samples, 1);
}

#[test]
fn absurd_durations_are_capped() {
    let mut t = EpisodeTracker::new();
    let base = Instant::now();
    t.on_outcome(base, true);
    t.on_outcome(base, false);
    t.on_outcome(base + Duration::from_secs(86_400 * 30), true);
    let p = t.stats().p99_ms.unwrap();
    assert!(p <= crate::policy::stats::MAX_MS, "{p}");
}

// === outage_hold ===

#[test]
fn a_request_in_a_young_outage_is_held_at_most_past_the_p99_by_the_margin() {
    let mut rng = StdRng::seed_from_u64(7);
    let start = Instant::now();
    let learned = stats(100, 300.0, 500.0);
    for _ in 0..100 {
        let hold = outage_hold(Some(start), start + 100 * MS, &learned, &mut rng)
            .expect("held: 650 ms of 1.5 times the p99 are left");
        assert!((650 * MS..=780 * MS).contains(&hold), "{hold:?}");
    }
    // Never longer than a retry may wait.
    let long = stats(100, 9000.0, 9500.0);
    let hold = outage_hold(Some(start), start, &long, &mut rng).expect("held");
    assert!(hold <= MAX_WAIT.mul_f64(MAX_STRETCH), "{hold:?}");
}

#[test]
fn nothing_is_held_without_an_open_episode_enough_samples_or_time_left() {
    let mut rng = StdRng::seed_from_u64(8);
    let start = Instant::now();
    let learned = stats(100, 300.0, 500.0);
    // The service is up.
    assert_eq!(outage_hold(None, start, &learned, &mut rng), None);
    // Too few episodes to trust.
    let young = stats(MIN_SAMPLES - 1, 300.0, 500.0);
    assert_eq!(outage_hold(Some(start), start, &young, &mut rng), None);
    // This outage already outlived the usual one, or almost.
    for elapsed in [750 * MS, 748 * MS, 5 * 1000 * MS] {
        assert_eq!(
            outage_hold(Some(start), start + elapsed, &learned, &mut rng),
            None,
            "{elapsed:?}"
        );
    }
}

// === learned_delay ===

#[test]
fn falls_back_to_envoy_below_twenty_samples() {
    let mut rng = StdRng::seed_from_u64(1);
    let now = Instant::now();
    for samples in [0, 1, 19] {
        for retry in [1u8, 2] {
            let d = learned_delay(
                Some(now),
                now,
                &stats(samples, 800.0, 1500.0),
                retry,
                true,
                &mut rng,
            );
            assert_eq!(d.source, DelaySource::Fallback);
            assert!(d.wait <= FALLBACK_BASE * u32::from(retry), "{d:?}");
        }
    }
    // Enough samples but no quantile (a garbled merge): fallback too.
    let none = EpisodeStats {
        samples: 100,
        ..EpisodeStats::default()
    };
    let d = learned_delay(None, now, &none, 1, true, &mut rng);
    assert_eq!(d.source, DelaySource::Fallback);
}

#[test]
fn first_retry_waits_for_p90_second_for_p99() {
    let mut rng = StdRng::seed_from_u64(2);
    let start = Instant::now();
    let now = start + 100 * MS;
    let merged = stats(20, 400.0, 900.0);
    let mut explored = 0;
    for _ in 0..1000 {
        let d1 = learned_delay(Some(start), now, &merged, 1, true, &mut rng);
        match d1.source {
            DelaySource::Learned => {
                assert!(d1.wait >= 300 * MS && d1.wait <= 360 * MS, "{d1:?}")
            }
            // 60% of the p90, from the episode start.
            DelaySource::Explore => {
                explored += 1;
                assert_eq!(d1.wait, 140 * MS, "{d1:?}");
            }
            DelaySource::Fallback => panic!("{d1:?}"),
        }
        let d2 = learned_delay(Some(start), now, &merged, 2, true, &mut rng);
        assert_eq!(
            d2.source,
            DelaySource::Learned,
            "second retries never explore"
        );
        assert!(d2.wait >= 800 * MS && d2.wait <= 960 * MS, "{d2:?}");
    }
    // One first retry in five explores.
    assert!((150..250).contains(&explored), "{explored}");
}

#[test]
fn a_second_retry_after_the_p99_still_waits_a_quarter_of_the_p90() {
    let mut rng = StdRng::seed_from_u64(3);
    let start = Instant::now();
    let merged = stats(100, 400.0, 500.0);
    for _ in 0..100 {
        let d = learned_delay(Some(start), start + 700 * MS, &merged, 2, true, &mut rng);
        assert_eq!(d.source, DelaySource::Learned);
        assert!((100 * MS..=120 * MS).contains(&d.wait), "{d:?}");
        // The first retry after the p90 goes at once.
        let d = learned_delay(Some(start), start + 700 * MS, &merged, 1, false, &mut rng);
        assert!(d.wait <= MIN_WAIT.mul_f64(MAX_STRETCH), "{d:?}");
    }
}

#[test]
fn wait_is_clamped_then_stretched() {
    let mut rng = StdRng::seed_from_u64(3);
    let start = Instant::now();
    // Episode older than p90: the wait would be negative, so 5 ms.
    let late = start + Duration::from_secs(3);
    let merged = stats(50, 400.0, 900.0);
    let mut max_seen = Duration::ZERO;
    for _ in 0..1000 {
        let d = learned_delay(Some(start), late, &merged, 1, true, &mut rng);
        assert!(
            d.wait >= MIN_WAIT && d.wait <= MIN_WAIT.mul_f64(MAX_STRETCH),
            "{d:?}"
        );
        max_seen = max_seen.max(d.wait);
    }
    // The stretch actually varies (no lockstep).
    assert!(max_seen > MIN_WAIT.mul_f64(1.1));
    // A huge p99 is capped at 2 s before the stretch.
    let slow = stats(50, 400.0, 60_000.0);
    for _ in 0..1000 {
        let d = learned_delay(Some(start), start, &slow, 2, true, &mut rng);
        assert!(
            d.wait >= MAX_WAIT && d.wait <= MAX_WAIT.mul_f64(MAX_STRETCH),
            "{d:?}"
        );
    }
    // A tiny p90 is raised to 5 ms.
    let fast = stats(50, 0.5, 1.0);
    let d = learned_delay(Some(start), start, &fast, 1, true, &mut rng);
    assert!(d.wait >= MIN_WAIT);
}

#[test]
fn unknown_episode_start_counts_from_now() {
    let mut rng = StdRng::seed_from_u64(4);
    let now = Instant::now();
    let d = learned_delay(None, now, &stats(20, 400.0, 900.0), 1, true, &mut rng);
    assert_eq!(d.source, DelaySource::Learned);
    assert!(d.wait >= 400 * MS && d.wait <= 480 * MS, "{d:?}");
}

#[test]
fn retry_numbers_outside_one_and_two_are_safe() {
    let mut rng = StdRng::seed_from_u64(5);
    let now = Instant::now();
    let merged = stats(20, 400.0, 900.0);
    let d0 = learned_delay(Some(now), now, &merged, 0, true, &mut rng);
    assert!(d0.wait <= 480 * MS, "0 behaves as the first retry: {d0:?}");
    let d9 = learned_delay(Some(now), now, &merged, 255, true, &mut rng);
    assert!(d9.wait >= 900 * MS, "later retries use the p99: {d9:?}");
    for n in [0u8, 1, 2, 3, 4, 5, 100, 255] {
        assert!(exponential_delay(n, &mut rng) <= FALLBACK_CAP);
    }
}

// === exponential_delay ===

#[test]
fn exponential_delay_is_envoys_full_jitter() {
    let mut rng = StdRng::seed_from_u64(6);
    for (retry, ceiling) in [
        (1u8, 25u64),
        (2, 50),
        (3, 100),
        (4, 200),
        (5, 250),
        (6, 250),
    ] {
        let ceiling = Duration::from_millis(ceiling);
        let n = 4000u32;
        let mut sum = Duration::ZERO;
        for _ in 0..n {
            let d = exponential_delay(retry, &mut rng);
            assert!(d <= ceiling, "retry {retry}: {d:?}");
            sum += d;
        }
        // Uniform on [0, ceiling]: the mean is about half the ceiling.
        let mean = (sum / n).as_secs_f64();
        let half = ceiling.as_secs_f64() / 2.0;
        assert!(
            (mean - half).abs() < half * 0.1,
            "retry {retry}: mean {mean}"
        );
    }
}

#[test]
fn same_seed_same_delays() {
    let now = Instant::now();
    let merged = stats(30, 300.0, 700.0);
    let run = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..20)
            .map(|i| learned_delay(Some(now), now, &merged, 1 + (i % 2), true, &mut rng).wait)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(9), run(9));
}

fn any_ms() -> impl Strategy<Value = Option<f64>> {
    prop_oneof![
        Just(None),
        Just(Some(f64::NAN)),
        Just(Some(f64::INFINITY)),
        Just(Some(f64::NEG_INFINITY)),
        Just(Some(f64::MAX)),
        any::<f64>().prop_map(Some),
        (0.0..5000.0f64).prop_map(Some),
    ]
}

proptest! {
    /// Whatever the merged statistics say (they come from peers), the wait
    /// stays within [0, 2.4 s] and nothing panics.
    #[test]
    fn learned_delay_is_always_bounded(
        samples in any::<u64>(),
        p50 in any_ms(),
        p90 in any_ms(),
        p99 in any_ms(),
        retry in any::<u8>(),
        elapsed_ms in 0u64..10_000,
        started in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let mut rng = StdRng::seed_from_u64(seed);
        let start = Instant::now();
        let now = start + Duration::from_millis(elapsed_ms);
        let merged = EpisodeStats { samples, p50_ms: p50, p90_ms: p90, p99_ms: p99 };
        let d = learned_delay(started.then_some(start), now, &merged, retry, true, &mut rng);
        match d.source {
            DelaySource::Learned | DelaySource::Explore => {
                prop_assert!(d.wait >= MIN_WAIT);
                prop_assert!(d.wait <= MAX_WAIT.mul_f64(MAX_STRETCH));
            }
            DelaySource::Fallback => prop_assert!(d.wait <= FALLBACK_CAP),
        }
    }

    /// Any sequence of outcomes keeps the tracker consistent: samples equal
    /// the closed episodes, quantiles are ordered.
    #[test]
    fn tracker_counts_closed_episodes(events in proptest::collection::vec((any::<bool>(), 0u64..1_000), 0..200)) {
        let mut t = EpisodeTracker::new();
        let mut now = Instant::now();
        let mut closed = 0u64;
        for (ok, gap) in events {
            now += Duration::from_millis(gap);
            if t.on_outcome(now, ok).is_some() {
                closed += 1;
            }
        }
        let s = t.stats();
        prop_assert_eq!(s.samples, closed);
        if closed > 0 {
            let (a, b, c) = (s.p50_ms.unwrap(), s.p90_ms.unwrap(), s.p99_ms.unwrap());
            prop_assert!(a <= b && b <= c);
        } else {
            prop_assert_eq!(s.p50_ms, None);
        }
    }
}
