//! The learned retry delay against Envoy-style backoff on a flapping service,
//! short form (about a minute). The long form is
//! `cargo run --release --example flapping`.

mod common;

use common::flapping::{run, Lengths};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn learned_delay_beats_exponential_backoff_on_a_flapping_service() {
    let rows = run(Lengths::short()).await;
    let learned: Vec<_> = rows.iter().filter(|r| r.policy == "learned").collect();
    let exponential: Vec<_> = rows.iter().filter(|r| r.policy == "exponential").collect();
    for r in &learned {
        assert!(
            r.success() >= 0.99,
            "learned, {} clients: {:.4}",
            r.clients,
            r.success()
        );
        assert!(
            r.attempts_per_request() <= 1.3,
            "learned, {} clients: {:.3} attempts per request",
            r.clients,
            r.attempts_per_request()
        );
    }
    // The observer never called the service yet knows how long it stays down.
    let delay = learned[1]
        .observer_delay_ms
        .expect("observer reports a retry delay");
    assert!(
        (200.0..=450.0).contains(&delay),
        "observer's retry_delay_ms {delay}"
    );
    // Side by side: exponential backoff gives up inside the outage.
    for (l, e) in learned.iter().zip(&exponential) {
        assert!(
            l.success() > e.success(),
            "learned {:.4} vs exponential {:.4}",
            l.success(),
            e.success()
        );
    }
}
