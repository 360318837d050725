//! The learned retry delay against Envoy-style exponential backoff on a
//! flapping service (down 300 ms of every 1.5 s), 30 s phases: sequential and
//! 50 concurrent clients. Prints a table.
//!
//! `cargo build --release && cargo run --release --example flapping`

#[path = "../tests/common/mod.rs"]
mod common;

#[tokio::main]
async fn main() {
    let lengths = if std::env::args().any(|a| a == "--short") {
        common::flapping::Lengths::short()
    } else {
        common::flapping::Lengths::long()
    };
    common::flapping::run(lengths).await;
}
