use proptest::prelude::*;

use super::*;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= b.abs() * 0.011 + 1e-9
}

fn episodes(samples: u64, p50: f64, p90: f64, p99: f64) -> EpisodeStats {
    EpisodeStats {
        samples,
        p50_ms: Some(p50),
        p90_ms: Some(p90),
        p99_ms: Some(p99),
    }
}

fn summary(requests: u64, failures: u64, p50: f64, p99: f64) -> Summary {
    Summary {
        requests,
        failures,
        retries: 0,
        rps: requests as f64 / 10.0,
        p50_ms: (requests > 0).then_some(p50),
        p99_ms: (requests > 0).then_some(p99),
        p95_ms: None,
        p999_ok_ms: None,
        episodes: EpisodeStats::default(),
        error_rate: if requests == 0 {
            0.0
        } else {
            failures as f64 / requests as f64
        },
        effective_error_rate: None,
    }
}

// === ServiceWindow ===

#[test]
fn empty_window_has_no_rates() {
    let w = ServiceWindow::new();
    let s = w.snapshot(Instant::now());
    assert_eq!(s, WindowStats::default());
    assert_eq!(s.success_rate, None);
    assert_eq!(s.p99_ms, None);
}

#[test]
fn counts_classes_rates_and_latency() {
    let mut w = ServiceWindow::new();
    let base = Instant::now();
    // 100 requests over 5 s: latencies 1..=100 ms, every 10th fails.
    for i in 1..=100u32 {
        let now = base + 50 * MS * i;
        let ok = i % 10 != 0;
        let class = match i % 30 {
            0 => "timeout",
            10 => "unreachable",
            _ => "server_error",
        };
        w.record(now, ok, if ok { "success" } else { class }, MS * i);
    }
    w.record_retry(base + SEC);
    w.record_retry(base + 2 * SEC);
    let s = w.snapshot(base + 5 * SEC);
    assert_eq!(s.requests, 100);
    assert_eq!(s.successes, 90);
    assert_eq!(s.failures, 10);
    assert_eq!(
        s.failure_classes,
        FailureCounts {
            server_error: 3,
            unreachable: 4,
            timeout: 3,
            other: 0
        }
    );
    assert_eq!(s.retries, 2);
    assert_eq!(s.success_rate, Some(0.9));
    // 100 requests over the 4.95 s elapsed since the first one.
    assert!(close(s.rps, 100.0 / 4.95), "{}", s.rps);
    assert!(close(s.p50_ms.unwrap(), 50.0), "{s:?}");
    assert!(close(s.p99_ms.unwrap(), 99.0), "{s:?}");
}

#[test]
fn unknown_failure_labels_count_as_other() {
    let mut w = ServiceWindow::new();
    let now = Instant::now();
    w.record(now, false, "weird", MS);
    w.record(now, false, "success", MS);
    let s = w.snapshot(now);
    assert_eq!(s.failure_classes.other, 2);
    assert_eq!(s.failures, 2);
    assert_eq!(s.success_rate, Some(0.0));
}

#[test]
fn old_buckets_expire_after_the_window() {
    let mut w = ServiceWindow::new();
    let base = Instant::now();
    for i in 0..20u32 {
        // One request per second, latency growing: the old fast ones leave.
        w.record(base + SEC * i, true, "success", MS * (i + 1));
    }
    let now = base + 19 * SEC + 500 * MS;
    let s = w.snapshot(now);
    // Buckets 10..=19 are live: 10 requests over 9.5 s... but the window
    // starts at the beginning of bucket 10, so the span is exactly 9.5 s.
    assert_eq!(s.requests, 10);
    assert!(close(s.rps, 10.0 / 9.5), "{}", s.rps);
    assert!(s.p50_ms.unwrap() >= 11.0 * 0.99, "{s:?}");
    // Long after, nothing is left, even without new writes.
    let later = w.snapshot(base + 100 * SEC);
    assert_eq!(later.requests, 0);
    assert_eq!(later.p50_ms, None);
    assert_eq!(later.rps, 0.0);
}

#[test]
fn a_ring_slot_is_reused_for_a_new_second() {
    let mut w = ServiceWindow::new();
    let base = Instant::now();
    w.record(base, true, "success", MS);
    w.record_retry(base);
    // Same slot (10 s later), new second: the old counts are gone.
    w.record(base + 10 * SEC, false, "timeout", 9 * MS);
    let s = w.snapshot(base + 10 * SEC);
    assert_eq!((s.requests, s.successes, s.retries), (1, 0, 0));
    assert!(close(s.p99_ms.unwrap(), 9.0));
}

#[test]
fn first_second_rps_is_not_inflated() {
    let mut w = ServiceWindow::new();
    let base = Instant::now();
    for _ in 0..5 {
        w.record(base, true, "success", MS);
    }
    // At the very first instant the span is floored at one bucket.
    assert_eq!(w.snapshot(base).rps, 5.0);
}

#[test]
fn time_going_backwards_does_not_panic_or_lose_data() {
    let mut w = ServiceWindow::new();
    let base = Instant::now() + 1000 * SEC;
    w.record(base, true, "success", MS);
    w.record(base + 5 * SEC, true, "success", MS);
    w.record(base - 500 * SEC, true, "success", MS);
    w.record_retry(base - 500 * SEC);
    let s = w.snapshot(base - 900 * SEC);
    assert_eq!(s.requests, 3);
    assert_eq!(s.retries, 1);
}

#[test]
fn huge_latencies_are_capped() {
    let mut w = ServiceWindow::new();
    let now = Instant::now();
    w.record(now, true, "success", Duration::from_secs(u64::MAX));
    assert!(w.snapshot(now).p99_ms.unwrap() <= MAX_MS);
}

#[test]
fn degenerate_window_shapes_work() {
    let now = Instant::now();
    for (window, bucket) in [
        (Duration::ZERO, Duration::ZERO),
        (SEC, Duration::ZERO),
        (Duration::from_secs(1_000_000), MS),
    ] {
        let mut w = ServiceWindow::with_window(window, bucket);
        w.record(now, true, "success", MS);
        w.record(now + 3 * SEC, true, "success", MS);
        let s = w.snapshot(now + 3 * SEC);
        assert!(s.requests >= 1 && s.rps.is_finite());
    }
}

// === Summary ===

fn worst_case() -> Summary {
    Summary {
        requests: u64::MAX,
        failures: u64::MAX,
        retries: u64::MAX,
        rps: f64::MAX,
        p50_ms: Some(MAX_MS - 0.000_123_456_789),
        p99_ms: Some(MAX_MS - 0.000_123_456_78),
        p95_ms: None,
        p999_ok_ms: None,
        episodes: EpisodeStats {
            samples: u64::MAX,
            p50_ms: Some(MAX_MS - 0.333_333_333_333),
            p90_ms: Some(MAX_MS - 0.222_222_222_222),
            p99_ms: Some(MAX_MS - 0.111_111_111_111),
        },
        error_rate: 0.123_456_789_123_456_78,
        effective_error_rate: None,
    }
}

#[test]
fn encoding_is_compact_even_in_the_worst_case() {
    let s = worst_case().encode();
    assert!(s.len() <= MAX_ENCODED, "{} bytes: {s}", s.len());
    // In practice it is far smaller still.
    assert!(s.len() <= 256, "{} bytes: {s}", s.len());
    let d = Summary::decode(&s).expect("own encoding decodes");
    assert_eq!(d.requests, MAX_COUNT);
    assert_eq!(d.rps, MAX_RPS);
}

#[test]
fn round_trip_keeps_values() {
    let s = Summary {
        requests: 1234,
        failures: 34,
        retries: 7,
        rps: 123.4,
        p50_ms: Some(3.25),
        p99_ms: Some(87.5),
        p95_ms: None,
        p999_ok_ms: None,
        episodes: episodes(42, 120.0, 380.0, 950.5),
        error_rate: 34.0 / 1234.0,
        effective_error_rate: Some(0.01),
    };
    let text = s.encode();
    let d = Summary::decode(&text).unwrap();
    assert_eq!(d.requests, 1234);
    assert_eq!(d.failures, 34);
    assert_eq!(d.retries, 7);
    assert_eq!(d.rps, 123.4);
    assert_eq!(d.p50_ms, Some(3.25));
    assert_eq!(d.p99_ms, Some(87.5));
    assert_eq!(d.episodes, s.episodes);
    assert!((d.error_rate - s.error_rate).abs() < 1e-4);
    assert!(text.starts_with("{\"v\":1,"), "{text}");
}

#[test]
fn summary_from_window_and_episodes() {
    let mut w = ServiceWindow::new();
    let now = Instant::now();
    w.record(now, true, "success", 10 * MS);
    w.record(now, false, "server_error", 20 * MS);
    w.record_retry(now);
    let s = Summary::new(&w.snapshot(now), &episodes(3, 1.0, 2.0, 3.0));
    assert_eq!((s.requests, s.failures, s.retries), (2, 1, 1));
    assert_eq!(s.error_rate, 0.5);
    assert_eq!(s.episodes.samples, 3);
    assert!(Summary::decode(&s.encode()).is_some());
    // An empty window gives a valid summary too.
    let empty = Summary::new(&WindowStats::default(), &EpisodeStats::default());
    assert_eq!(Summary::decode(&empty.encode()), Some(empty));
}

#[test]
fn nan_never_reaches_the_wire() {
    let mut s = summary(10, 1, 1.0, 2.0);
    s.rps = f64::NAN;
    s.p99_ms = Some(f64::INFINITY);
    let text = s.encode();
    assert!(!text.contains("null") && !text.contains("NaN"), "{text}");
    // An invalid summary encodes as the empty one rather than as garbage.
    assert_eq!(Summary::decode(&text), Some(Summary::default()));
}

#[test]
fn decode_rejects_garbage_and_inconsistency() {
    let ok = r#"{"v":1,"r":10,"f":1,"t":0,"q":1.0,"l50":1.0,"l99":2.0,"n":3,"e50":1.0,"e90":2.0,"e99":3.0,"er":0.1}"#;
    assert!(Summary::decode(ok).is_some());
    let bad = [
        "",
        "null",
        "[]",
        "{}",
        "{\"v\":1}",
        "not json",
        "\u{0}\u{ff}",
        // other version
        r#"{"v":2,"r":10,"f":1,"t":0,"q":1.0,"n":0,"er":0.1}"#,
        // negative count, float count
        r#"{"v":1,"r":-10,"f":1,"t":0,"q":1.0,"n":0,"er":0.1}"#,
        r#"{"v":1,"r":10.5,"f":1,"t":0,"q":1.0,"n":0,"er":0.1}"#,
        // more failures than requests
        r#"{"v":1,"r":1,"f":2,"t":0,"q":1.0,"n":0,"er":0.1}"#,
        // negative rps, NaN-ish values, overflow
        r#"{"v":1,"r":10,"f":1,"t":0,"q":-1.0,"n":0,"er":0.1}"#,
        r#"{"v":1,"r":10,"f":1,"t":0,"q":NaN,"n":0,"er":0.1}"#,
        r#"{"v":1,"r":10,"f":1,"t":0,"q":1e400,"n":0,"er":0.1}"#,
        r#"{"v":1,"r":10,"f":1,"t":0,"q":null,"n":0,"er":0.1}"#,
        // error rate out of range
        r#"{"v":1,"r":10,"f":1,"t":0,"q":1.0,"n":0,"er":1.5}"#,
        // negative latency, decreasing latency quantiles
        r#"{"v":1,"r":10,"f":1,"t":0,"q":1.0,"l50":-1.0,"n":0,"er":0.1}"#,
        r#"{"v":1,"r":10,"f":1,"t":0,"q":1.0,"l50":5.0,"l99":2.0,"n":0,"er":0.1}"#,
        // episode samples without quantiles, or decreasing ones
        r#"{"v":1,"r":10,"f":1,"t":0,"q":1.0,"n":3,"er":0.1}"#,
        r#"{"v":1,"r":10,"f":1,"t":0,"q":1.0,"n":3,"e50":3.0,"e90":2.0,"e99":1.0,"er":0.1}"#,
        r#"{"v":1,"r":10,"f":1,"t":0,"q":1.0,"n":3,"e50":1.0,"e90":2.0,"e99":-3.0,"er":0.1}"#,
        // wrong type
        r#"{"v":1,"r":"10","f":1,"t":0,"q":1.0,"n":0,"er":0.1}"#,
    ];
    for b in bad {
        assert_eq!(Summary::decode(b), None, "accepted {b}");
    }
    // Oversized input is refused before parsing.
    let huge = format!("{}{}", " ".repeat(1 << 20), ok);
    assert_eq!(Summary::decode(&huge), None);
    // Deep nesting does not overflow the stack.
    let deep = format!("{}{}", "[".repeat(4000), "]".repeat(4000));
    assert_eq!(Summary::decode(&deep), None);
}

#[test]
fn decode_clamps_absurd_magnitudes_and_normalizes() {
    let text = r#"{"v":1,"r":18446744073709551615,"f":5,"t":18446744073709551615,"q":1e300,"l50":1e200,"l99":1e300,"n":0,"e50":5.0,"e90":6.0,"e99":7.0,"er":0.0,"future":[1,2]}"#;
    let s = Summary::decode(text).unwrap();
    assert_eq!(s.requests, MAX_COUNT);
    assert_eq!(s.retries, MAX_COUNT);
    assert_eq!(s.rps, MAX_RPS);
    assert_eq!(s.p50_ms, Some(MAX_MS));
    assert_eq!(s.p99_ms, Some(MAX_MS));
    // No episode samples: stray quantiles are dropped.
    assert_eq!(s.episodes, EpisodeStats::default());
    // No requests: latency is dropped.
    let idle = r#"{"v":1,"r":0,"f":0,"t":0,"q":0,"l50":4.0,"n":0,"er":0}"#;
    assert_eq!(Summary::decode(idle).unwrap().p50_ms, None);
}

// === merge ===

#[test]
fn merge_takes_weighted_medians_with_capped_peers() {
    let mut a = summary(300, 30, 10.0, 100.0);
    a.retries = 4;
    a.episodes = episodes(10, 100.0, 200.0, 300.0);
    let mut b = summary(100, 0, 30.0, 200.0);
    b.retries = 1;
    b.episodes = episodes(30, 200.0, 400.0, 700.0);
    // An idle node: no requests, no episodes; it must not drag latency down.
    let idle = summary(0, 0, 0.0, 0.0);
    let nodes = [("a", a), ("b", b), ("idle", idle)];
    let m = merge(&nodes, None);
    // Counts are shown as claimed.
    assert_eq!(m.nodes, 3);
    assert_eq!(m.requests, 400);
    assert_eq!(m.failures, 30);
    assert_eq!(m.retries, 5);
    assert!(close(m.rps, 40.0));
    // Each peer weighs at most the lower median claim (100 requests, 10
    // episodes): a and b weigh the same, and the median is their mean.
    assert_eq!(m.success_rate, Some(0.95));
    assert!(close(m.p50_ms.unwrap(), 20.0), "{m:?}");
    assert!(close(m.p99_ms.unwrap(), 150.0), "{m:?}");
    assert_eq!(m.episodes.samples, 20);
    assert!(close(m.episodes.p50_ms.unwrap(), 150.0), "{m:?}");
    assert!(close(m.episodes.p90_ms.unwrap(), 300.0), "{m:?}");
    assert!(close(m.episodes.p99_ms.unwrap(), 500.0), "{m:?}");
    // This node's own observations weigh what they are.
    let m = merge(&nodes, Some(&"a"));
    assert!(close(m.p50_ms.unwrap(), 10.0), "{m:?}");
    assert_eq!(m.episodes.samples, 20);
    assert!(close(m.episodes.p90_ms.unwrap(), 300.0), "{m:?}");
}

#[test]
fn a_node_that_never_called_learns_once_two_others_agree() {
    let mut caller = summary(50, 5, 1.0, 2.0);
    caller.episodes = episodes(25, 100.0, 300.0, 500.0);
    let me = summary(0, 0, 0.0, 0.0);
    // One node's word alone teaches nothing: it could be lying.
    let m = merge(&[("me", me), ("caller", caller)], Some(&"me"));
    assert_eq!(m.episodes.p90_ms, None);
    let m = merge(&[("me", me), ("c1", caller), ("c2", caller)], Some(&"me"));
    assert_eq!(m.episodes.samples, 50);
    assert_eq!(m.episodes.p90_ms, caller.episodes.p90_ms);
    // The caller trusts its own observations.
    let m = merge(&[("me", me), ("caller", caller)], Some(&"caller"));
    assert_eq!(m.episodes, caller.episodes);
}

/// Three honest nodes, one liar: whatever the liar claims (a huge count
/// with extreme values, or modest counts with extreme values), no number
/// this node learns or acts on moves by more than a fifth.
#[test]
fn one_lying_node_moves_no_learned_number_by_more_than_a_fifth() {
    let honest = |requests: u64, p999: f64, p90: f64| {
        let mut s = summary(requests, requests / 50, 10.0, 40.0);
        s.p95_ms = Some(30.0);
        s.p999_ok_ms = Some(p999);
        s.episodes = episodes(requests / 20, p90 * 0.6, p90, p90 * 1.3);
        s
    };
    let liar = |requests: u64, ms: f64| {
        let mut s = summary(requests, 0, ms, ms);
        s.p95_ms = Some(ms);
        s.p999_ok_ms = Some(ms);
        s.episodes = episodes(requests, ms, ms, ms);
        s
    };
    let nodes = vec![
        ("me", honest(1000, 80.0, 300.0)),
        ("n2", honest(1200, 90.0, 320.0)),
        ("n3", honest(800, 85.0, 280.0)),
    ];
    let truth = merge(&nodes, Some(&"me"));
    let timeout = learned_timeout(&truth).unwrap();
    let liars = [
        liar(MAX_COUNT, 0.0),
        liar(MAX_COUNT, MAX_MS),
        liar(1000, 0.0),
        liar(1000, MAX_MS),
    ];
    for lie in liars {
        let mut with_liar = nodes.clone();
        with_liar.push(("liar", lie));
        let m = merge(&with_liar, Some(&"me"));
        let moved = |a: Option<f64>, b: Option<f64>| {
            let (a, b) = (a.unwrap(), b.unwrap());
            (a - b).abs() / b
        };
        for (what, by) in [
            ("p99.9", moved(m.p999_ok_ms, truth.p999_ok_ms)),
            ("p95", moved(m.p95_ms, truth.p95_ms)),
            ("p99", moved(m.p99_ms, truth.p99_ms)),
            (
                "episode p90",
                moved(m.episodes.p90_ms, truth.episodes.p90_ms),
            ),
            (
                "episode p99",
                moved(m.episodes.p99_ms, truth.episodes.p99_ms),
            ),
            ("success rate", moved(m.success_rate, truth.success_rate)),
        ] {
            assert!(by <= 0.2, "{what} moved by {by:.2} with {lie:?}");
        }
        let learned = learned_timeout(&m).unwrap();
        let ratio = learned.as_secs_f64() / timeout.as_secs_f64();
        assert!(
            (0.8..=1.2).contains(&ratio),
            "timeout {learned:?} vs {timeout:?}"
        );
    }
}

#[test]
fn merge_of_nothing_and_of_invalid_is_empty() {
    assert_eq!(merge::<&str>(&[], None), ClusterStats::default());
    let mut bad = summary(10, 20, 1.0, 2.0);
    bad.rps = f64::NAN;
    let m = merge(&[(1u32, bad)], None);
    assert_eq!(m, ClusterStats::default());
}

fn any_summary() -> impl Strategy<Value = Summary> {
    (
        0u64..2_000_000_000_000,
        any::<u64>(),
        any::<u64>(),
        0.0..2e9f64,
        (0.0..4e6f64, 0.0..4e6f64),
        any::<u64>(),
        (0.0..4e6f64, 0.0..4e6f64, 0.0..4e6f64),
    )
        .prop_map(|(r, f, t, q, (l1, l2), n, (e1, e2, e3))| {
            let failures = if r == 0 { 0 } else { f % (r + 1) };
            let mut e = [e1, e2, e3];
            e.sort_by(f64::total_cmp);
            Summary {
                requests: r,
                failures,
                retries: t,
                rps: q,
                p50_ms: (r > 0).then_some(l1.min(l2)),
                p99_ms: (r > 0).then_some(l1.max(l2)),
                p95_ms: None,
                p999_ok_ms: None,
                episodes: EpisodeStats {
                    samples: n,
                    p50_ms: (n > 0).then_some(e[0]),
                    p90_ms: (n > 0).then_some(e[1]),
                    p99_ms: (n > 0).then_some(e[2]),
                },
                error_rate: if r == 0 {
                    0.0
                } else {
                    failures as f64 / r as f64
                },
                effective_error_rate: (r > 0).then_some(failures as f64 / r as f64),
            }
        })
}

proptest! {
    /// Whatever a peer sends, decoding never panics.
    #[test]
    fn decode_never_panics_on_text(s in "\\PC{0,300}") {
        let _ = Summary::decode(&s);
    }

    /// Nor on near-miss JSON with arbitrary numbers in every field.
    #[test]
    fn decode_never_panics_on_numbers(
        v in prop_oneof![Just("1".to_string()), "-?[0-9]{1,3}"],
        nums in proptest::collection::vec(
            prop_oneof![
                "-?[0-9]{1,25}",
                "-?[0-9]{1,5}\\.[0-9]{1,5}(e[+-]?[0-9]{1,3})?",
                Just("null".to_string()),
            ],
            11,
        ),
    ) {
        let keys = ["r", "f", "t", "q", "l50", "l99", "n", "e50", "e90", "e99", "er"];
        let body: Vec<String> = keys.iter().zip(&nums).map(|(k, n)| format!("\"{k}\":{n}")).collect();
        let text = format!("{{\"v\":{v},{}}}", body.join(","));
        if let Some(s) = Summary::decode(&text) {
            prop_assert!(s.failures <= s.requests);
            prop_assert!(s.rps.is_finite() && s.rps >= 0.0 && s.rps <= MAX_RPS);
        }
    }

    /// Every valid summary survives the trip, within the encoding's rounding,
    /// and always fits the gossip limit.
    #[test]
    fn round_trip_any_valid_summary(s in any_summary()) {
        let text = s.encode();
        prop_assert!(text.len() <= MAX_ENCODED);
        let d = Summary::decode(&text).expect("valid summary decodes");
        prop_assert_eq!(d.requests, s.requests.min(MAX_COUNT));
        prop_assert_eq!(d.episodes.samples, s.episodes.samples.min(MAX_COUNT));
        prop_assert!(d.failures <= d.requests);
        let near = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) => (a - b.min(MAX_MS)).abs() <= 1e-3,
            (None, None) => true,
            _ => false,
        };
        prop_assert!(near(d.p50_ms, s.p50_ms) && near(d.p99_ms, s.p99_ms));
        prop_assert!(near(d.episodes.p90_ms, s.episodes.p90_ms));
    }

    /// Merging valid summaries gives finite, bounded, ordered results.
    #[test]
    fn merge_is_bounded(list in proptest::collection::vec(any_summary(), 0..20)) {
        let pairs: Vec<(usize, Summary)> = list.into_iter().enumerate().collect();
        let m = merge(&pairs, Some(&0));
        prop_assert!(m.rps.is_finite());
        if let Some(r) = m.success_rate {
            prop_assert!((0.0..=1.0).contains(&r));
        }
        let e = m.episodes;
        if let (Some(a), Some(b), Some(c)) = (e.p50_ms, e.p90_ms, e.p99_ms) {
            // Weighted medians of ordered triples stay ordered.
            prop_assert!(a <= b + 1e-6 && b <= c + 1e-6 && c <= MAX_MS + 1e-6);
        }
    }
}

#[test]
fn a_timeout_is_learned_from_successes_once_there_are_enough() {
    let t0 = Instant::now();
    let mut w = ServiceWindow::new();
    // Successes take 10 ms, a few 40 ms; failures (timeouts) take 30 s and
    // must not teach the timeout anything.
    for i in 0..1500u32 {
        let latency = if i % 500 == 0 { 40 } else { 10 };
        w.record(t0, true, "", Duration::from_millis(latency));
    }
    for _ in 0..20 {
        w.record(t0, false, "timeout", Duration::from_secs(30));
    }
    let window = w.snapshot(t0);
    let p999 = window.p999_ok_ms.unwrap();
    assert!((35.0..45.0).contains(&p999), "{window:?}");
    let summary = Summary::new(&window, &EpisodeStats::default());
    let decoded = Summary::decode(&summary.encode()).unwrap();
    assert_eq!(decoded.p999_ok_ms.map(f64::round), Some(p999.round()));
    let merged = merge(&[("n1", decoded), ("n2", decoded)], None);
    assert_eq!(merged.latency_nodes, 2);
    let timeout = learned_timeout(&merged).unwrap();
    assert!(
        timeout >= Duration::from_millis(70) && timeout <= Duration::from_millis(90),
        "{timeout:?}"
    );
    // Too few successes: nothing learned; a fast service gets at least 50 ms.
    let few = ClusterStats {
        successes: 999,
        p999_ok_ms: Some(10.0),
        ..ClusterStats::default()
    };
    assert_eq!(learned_timeout(&few), None);
    let fast = ClusterStats {
        successes: 5000,
        p999_ok_ms: Some(1.0),
        ..ClusterStats::default()
    };
    assert_eq!(learned_timeout(&fast), Some(TIMEOUT_MIN));
    let slow = ClusterStats {
        successes: 5000,
        p999_ok_ms: Some(1e9),
        ..ClusterStats::default()
    };
    assert_eq!(learned_timeout(&slow), Some(TIMEOUT_MAX));
}

#[test]
fn an_edge_summary_carries_its_effective_error_rate_and_nothing_outside_0_to_1() {
    let mut s = summary(100, 10, 1.0, 5.0);
    s.effective_error_rate = Some(0.02);
    let back = Summary::decode(&s.encode()).unwrap();
    assert_eq!(back.effective_error_rate, Some(0.02));
    // A service summary has none, and an older node's value decodes.
    assert_eq!(
        Summary::decode(&summary(1, 0, 1.0, 1.0).encode())
            .unwrap()
            .effective_error_rate,
        None
    );
    for bad in ["1.5", "-0.1", "1e400"] {
        let value = s.encode().replace("\"ee\":0.02", &format!("\"ee\":{bad}"));
        assert!(Summary::decode(&value).is_none(), "{value}");
    }
}
