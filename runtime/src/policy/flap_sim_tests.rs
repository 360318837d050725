//! A sequential caller against a fixed-length flap, simulated: the episode
//! tracker and the learned waits as the data plane uses them, with time
//! passed in. What the learning matrix measures on real nodes, in a second.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::SeedableRng;

use super::episodes::{learned_delay, outage_hold, EpisodeStats, EpisodeTracker};
use super::retry::MAX_RETRIES;

/// A healthy request's round trip.
const CALL: Duration = Duration::from_micros(300);
/// How often the merged statistics are published.
const PUBLISH: Duration = Duration::from_secs(1);
/// How long the first outcome of a batch waits for others before the
/// tracker sees them (the stats aggregator's batch window).
const BATCH: Duration = Duration::from_millis(25);

/// Outcomes on their way to the tracker, in batches.
struct Batches {
    tracker: EpisodeTracker,
    pending: Vec<(Instant, bool)>,
    closes: Option<Instant>,
}

impl Batches {
    fn record(&mut self, at: Instant, ok: bool) {
        self.deliver(at);
        self.pending.push((at, ok));
        self.closes.get_or_insert(at + BATCH);
    }

    /// Hands the tracker the batch whose window closed by `now`.
    fn deliver(&mut self, now: Instant) {
        let Some(closes) = self.closes.filter(|c| *c <= now) else {
            return;
        };
        // The aggregator stamps a batch's outcomes with its own time.
        for (_, ok) in self.pending.drain(..) {
            self.tracker.on_outcome(closes, ok);
        }
        self.closes = None;
    }
}

struct Flap {
    down: Duration,
    period: Duration,
    epoch: Instant,
}

impl Flap {
    fn failing(&self, at: Instant) -> bool {
        let since = at.saturating_duration_since(self.epoch).as_nanos() % self.period.as_nanos();
        since < self.down.as_nanos()
    }
}

#[derive(Debug, Default)]
struct Tally {
    requests: u64,
    ok: u64,
    attempts: u64,
}

/// One caller, back to back, for `length`; returns the tally of the last
/// `measured` of it (the rest is warm-up).
fn run(down_ms: u64, period_ms: u64, length: Duration, measured: Duration, seed: u64) -> Tally {
    let mut rng = StdRng::seed_from_u64(seed);
    let epoch = Instant::now();
    let flap = Flap {
        down: Duration::from_millis(down_ms),
        period: Duration::from_millis(period_ms),
        epoch,
    };
    let mut b = Batches {
        tracker: EpisodeTracker::new(),
        pending: Vec::new(),
        closes: None,
    };
    let mut merged = EpisodeStats::default();
    let mut published = epoch;
    let mut now = epoch + Duration::from_millis(1);
    let mut tally = Tally::default();
    let end = epoch + length;
    let measure_from = end - measured;
    while now < end {
        b.deliver(now);
        if now >= published + PUBLISH {
            merged = b.tracker.stats();
            published = now;
        }
        let counted = now >= measure_from;
        if let Some(hold) = outage_hold(b.tracker.current_episode_start(), now, &merged, &mut rng) {
            now += hold;
        }
        let mut attempt = 0u8;
        let ok = loop {
            let failed = flap.failing(now);
            now += CALL;
            b.record(now, !failed);
            if counted {
                tally.attempts += 1;
            }
            if !failed {
                break true;
            }
            if attempt >= MAX_RETRIES {
                break false;
            }
            attempt += 1;
            b.deliver(now);
            let delay = learned_delay(
                b.tracker.current_episode_start(),
                now,
                &merged,
                attempt,
                b.tracker.explores(),
                &mut rng,
            );
            now += delay.wait;
        };
        if counted {
            tally.requests += 1;
            tally.ok += u64::from(ok);
        }
    }
    tally
}

/// The shapes and the matrix's: once learned (the first minute),
/// a lone caller loses under one request in a thousand and sends under 1.3
/// attempts per request, whatever the seed.
#[test]
fn a_lone_sequential_caller_rides_out_fixed_flaps() {
    for (down, period) in [
        (100, 800),
        (250, 1000),
        (500, 2000),
        (300, 1500),
        (100, 600),
    ] {
        for seed in 0..3 {
            let t = run(
                down,
                period,
                Duration::from_secs(180),
                Duration::from_secs(120),
                seed,
            );
            let success = t.ok as f64 / t.requests as f64;
            let attempts = t.attempts as f64 / t.requests as f64;
            let shape = format!("flap {down}/{period} seed {seed}: {t:?}");
            assert!(success >= 0.999, "{shape}: success {success}");
            assert!(attempts <= 1.3, "{shape}: {attempts} attempts per request");
        }
    }
}
