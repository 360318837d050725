//! Pure, synchronously tested decision logic: no IO, no tokio, no actix.
//! Time comes in as a `now: Instant` argument and randomness as an `Rng`.

pub mod balancer;
pub mod concurrency;
pub mod episodes;
#[cfg(test)]
mod flap_sim_tests;
pub mod health;
pub mod intentions;
pub mod outlier;
pub mod rate;
pub mod recovery;
pub mod retry;
pub mod routes;
pub mod stats;
