//! Pure, synchronously tested decision logic: no IO, no tokio, no actix.
//! Time comes in as a `now: Instant` argument and randomness as an `Rng`.

pub mod attempts;
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
pub mod rollout;
pub mod routes;
pub mod stats;

/// Serde for a value written as text (`300/s`, `1%`, `1.5x`): with
/// `#[serde(try_from = "String", into = "String")]` on the type, it is read
/// through its `FromStr` and written through its `Display`.
macro_rules! serde_as_text {
    ($($t:ty),+) => {$(
        impl TryFrom<String> for $t {
            type Error = String;

            fn try_from(s: String) -> Result<Self, String> {
                s.parse()
            }
        }

        impl From<$t> for String {
            fn from(value: $t) -> String {
                value.to_string()
            }
        }
    )+};
}
use serde_as_text;

/// The version after `version` of the cluster config object named
/// `object` (`"routes"`), or why there is none.
fn next_version(version: u64, object: &str) -> Result<u64, String> {
    version
        .checked_add(1)
        .ok_or_else(|| format!("the {object}' version cannot grow further"))
}
