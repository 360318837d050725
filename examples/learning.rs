//! The learning scenario matrix: the learned retry delay, Envoy-style
//! exponential backoff and no retries, against flapping services (three
//! timings), a 5 s outage, one of three instances down, a latency spike
//! (hedging on and off) and a total outage called by five nodes. Prints a
//! Markdown table (the README's).
//!
//! `cargo build --release && cargo run --release --example learning [-- --short] [--runs N] [--only SHAPE]...`
//! (with `--runs N`, each run's table and then the medians of the N runs)

#[path = "../tests/common/mod.rs"]
mod common;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut lengths = if args.iter().any(|a| a == "--short") {
        common::learning::Lengths::short()
    } else {
        common::learning::Lengths::long()
    };
    // `--only SHAPE`, repeatable: run just those shapes.
    let only: Vec<&'static str> = args
        .windows(2)
        .filter(|w| w[0] == "--only")
        .map(|w| &*Box::leak(w[1].clone().into_boxed_str()))
        .collect();
    if !only.is_empty() {
        lengths.only = Box::leak(only.into_boxed_slice());
    }
    let runs = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .map_or(1, |n| n.parse().expect("--runs N"));
    let mut all = Vec::new();
    for _ in 0..runs {
        all.push(common::learning::run(lengths).await);
    }
    if runs > 1 {
        common::learning::print_medians(&all, &lengths);
    }
}
