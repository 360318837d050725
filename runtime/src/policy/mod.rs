//! Pure, synchronously tested decision logic: no IO, no tokio, no actix.
//! Time comes in as a `now: Instant` argument and randomness as an `Rng`.

pub mod balancer;
