//! The learning scenario matrix: the learned retry delay, Envoy-style
//! exponential backoff and no retries, against flapping services (three
//! timings), a 5 s outage, one of three instances down, a latency spike
//! (hedging on and off) and a total outage called by five nodes. Prints a
//! Markdown table (the README's).
//!
//! `cargo build --release && cargo run --release --example learning [-- --short]`

#[path = "../tests/common/mod.rs"]
mod common;

#[tokio::main]
async fn main() {
    let lengths = if std::env::args().any(|a| a == "--short") {
        common::learning::Lengths::short()
    } else {
        common::learning::Lengths::long()
    };
    common::learning::run(lengths).await;
}
