//! Learned hedging (DESIGN section 7), for services registered with
//! `"hedge": true`: when the first attempt of an idempotent request has not
//! answered after the cluster's p95 latency, one more attempt goes to
//! another instance. The first answer wins; the other attempt is dropped,
//! which resets its tunnel stream (or its local connection). A hedge draws
//! from the service's retry budget, so a slow service is not buried under
//! hedges, and each is counted in `weft_retries_total{outcome}` as
//! `hedge_won` (the hedge answered first) or `hedge_lost`.

use std::time::{Duration, Instant};

use weft_gossip::Instance;

use super::endpoints::Endpoint;
use super::outbound::{pick_http, Attempt, Failure};
use super::{DataPlane, ProxyBody};
use crate::policy::attempts::AttemptPlan;
use crate::policy::retry;
use hyper::Response;

/// How long to wait before hedging the attempt `plan` is at, to
/// `instance`, if the request may be hedged at all (see
/// [`AttemptPlan::hedge_after`]).
pub(super) fn delay(
    dp: &DataPlane,
    plan: &AttemptPlan,
    service: &str,
    instance: &Instance,
    method: &http::Method,
) -> Option<Duration> {
    let hedgeable = instance.hedge && retry::method_is_idempotent(method.as_str());
    if !hedgeable {
        return None;
    }
    let stats = dp.stats.load();
    let cluster = &stats.services.get(service)?.cluster;
    plan.hedge_after(hedgeable, cluster.p95_ms, cluster.requests)
}

/// What a possibly hedged attempt came to: the instance that answered
/// first and its result.
pub(super) struct Raced {
    /// The instance whose answer is used (the hedge's, if it won).
    pub endpoint: Endpoint,
    /// Its answer.
    pub result: Result<Response<ProxyBody>, Failure>,
}

/// Sends `first` (to `primary`) and, after `after` without an answer, a
/// hedge with `second_body` to another instance; the first answer wins.
pub(super) async fn race(
    first: Attempt<'_>,
    primary: &Endpoint,
    first_body: ProxyBody,
    second_body: ProxyBody,
    after: Duration,
) -> Raced {
    let dp = first.dp;
    let service = first.fwd.service.as_str();
    let sent = first.send(first_body, None);
    tokio::pin!(sent);
    tokio::select! {
        result = &mut sent => return Raced { endpoint: primary.clone(), result },
        () = tokio::time::sleep(after) => {}
    }
    let other = pick_http(dp, service, std::slice::from_ref(primary));
    let other = match other {
        Ok(other) if !other.same(primary) && dp.try_retry(service) => other,
        _ => {
            return Raced {
                endpoint: primary.clone(),
                result: sent.await,
            }
        }
    };
    let hedge = Attempt {
        instance: &other.instance,
        remaining: first.remaining.saturating_sub(after),
        attempt: 1,
        ..first
    };
    dp.started(&other);
    let hedge_start = Instant::now();
    let hedged = hedge.send(second_body, None);
    tokio::pin!(hedged);
    let (winner, result, outcome) = tokio::select! {
        result = &mut sent => (primary.clone(), result, "hedge_lost"),
        result = &mut hedged => (other.clone(), result, "hedge_won"),
    };
    // The loser is dropped with this function, which resets its stream; it
    // counts as no outcome. The attempt loop ends the primary's load.
    dp.finished(&other, hedge_start.elapsed());
    metrics::counter!("weft_retries_total", "service" => service.to_string(), "outcome" => outcome)
        .increment(1);
    Raced {
        endpoint: winner,
        result,
    }
}
