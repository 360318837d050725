//! The learning matrix, short form: a flapping service, a flap only one
//! node calls, and a total outage called by five nodes, each under the
//! learned policy, Envoy's backoff and no retries. The long form is
//! `cargo run --release --example learning`.

mod common;

use common::learning::{run, Lengths, Row};

fn row<'a>(rows: &'a [Row], shape: &str, policy: &str, clients: usize) -> &'a Row {
    rows.iter()
        .find(|r| r.shape.starts_with(shape) && r.policy == policy && r.clients == clients)
        .unwrap_or_else(|| panic!("no row {shape} {policy} {clients}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_learned_policy_recovers_more_with_fewer_retries() {
    let lengths = Lengths::short();
    let rows = run(lengths).await;
    let concurrent = lengths.concurrent;
    let learned = row(&rows, "flap", "learned", concurrent);
    let exponential = row(&rows, "flap", "exponential", concurrent);
    let none = row(&rows, "flap", "none", concurrent);
    // Retries help, and learned ones help most.
    assert!(
        learned.success() > exponential.success(),
        "{learned:?} vs {exponential:?}"
    );
    assert!(
        exponential.success() >= none.success(),
        "{exponential:?} vs {none:?}"
    );
    assert!(learned.success() >= 0.99, "{learned:?}");
    // Requests that arrive during an outage wait for its end instead of
    // failing into it: the failing instance is left mostly alone.
    let quiet = |r: &Row| r.failing_load.expect("failing load");
    assert!(
        quiet(learned) < 0.5 * quiet(exponential),
        "{learned:?} vs {exponential:?}"
    );
    assert!((none.attempts_per_request() - 1.0).abs() < 0.01, "{none:?}");
    // n5 never called the service yet knows how long its outages last.
    let delay = learned
        .observer_delay_ms
        .expect("the observer's retry delay");
    assert!(
        (240.0..=360.0).contains(&delay),
        "n5's retry_delay_ms {delay} for 300 ms outages"
    );
    // A total outage called by five nodes: retries stay inside the budget.
    for policy in ["learned", "exponential"] {
        let r = row(&rows, "total outage", policy, 30);
        let load = r.failing_load.expect("failing load");
        assert!(load <= 1.3, "{policy}: the failing service saw {load:.2}x");
    }
    let r = row(&rows, "total outage", "none", 30);
    assert!(r.failing_load.expect("failing load") <= 1.01, "{r:?}");
    // A flap only n1 calls, one request at a time: retries wait until the
    // service is back (the release build's long form holds >= 99.9 %; this
    // debug build on a shared machine gets a little slack).
    let private = row(&rows, "private flap", "learned", 1);
    assert!(private.success() >= 0.998, "{private:?}");
    assert!(private.attempts_per_request() <= 1.3, "{private:?}");
}
