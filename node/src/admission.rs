//! What a node gossips for admission, and takes from the others: its
//! demand for each rate limit (`demand`) and what it learned of each
//! service under adaptive concurrency (`concurrency`). Each node's share of
//! a cluster-wide number follows from these.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use weft_gossip::{ClusterView, Key};
use weft_runtime::dataplane::admission::Demand;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::gossip_writer::GossipWriter;
use weft_runtime::policy::concurrency::{ConcurrencyReport, Others};

use crate::follow::{reports, OwnKey};

/// How often a node gossips its side and takes the others' into its
/// shares: with gossip's own round on top, a node whose demand rises gets
/// its share within about a second.
const INTERVAL: Duration = Duration::from_millis(500);

/// The largest number a node may report for demand or a limit: a larger
/// one is read as this (a malformed one as none).
const MAX_REPORTED: f64 = 1e9;

/// Every [`INTERVAL`] until the node stops: gossips this node's demand and
/// concurrency reports (when they change) and gives the data plane what
/// the other live members report.
pub fn follow(
    dataplane: Arc<DataPlane>,
    views: watch::Receiver<Arc<ClusterView>>,
    writer: GossipWriter,
) {
    tokio::spawn(async move {
        let mut demand = OwnKey::new(Key::Demand);
        let mut concurrency = OwnKey::new(Key::Concurrency);
        let mut ticks = tokio::time::interval(INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let admission = &dataplane.admission;
            demand.write(&writer, &rounded_demand(&admission.demand()));
            concurrency.write(&writer, &rounded_reports(&admission.concurrency_reports()));
            let view = views.borrow().clone();
            admission.set_others(&others_demand(&view, &dataplane.node));
            admission.set_concurrency_others(&others_concurrency(&view, &dataplane.node));
        }
    });
}

/// To a tenth, so that a steady load is not written again every round.
fn tenth(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn rounded_demand(demand: &Demand) -> Demand {
    demand
        .iter()
        .map(|(scope, rps)| (scope.clone(), tenth(*rps)))
        .filter(|(_, rps)| *rps > 0.0)
        .collect()
}

fn rounded_reports(
    reports: &BTreeMap<String, ConcurrencyReport>,
) -> BTreeMap<String, ConcurrencyReport> {
    reports
        .iter()
        .map(|(service, r)| {
            let rounded = ConcurrencyReport {
                limit: tenth(r.limit),
                demand: tenth(r.demand),
                in_flight: r.in_flight,
            };
            (service.clone(), rounded)
        })
        .collect()
}

/// A reported number believed within bounds, or none.
fn believed(x: f64) -> Option<f64> {
    (x.is_finite() && x > 0.0).then(|| x.min(MAX_REPORTED))
}

/// The demand every other live member reports, summed per limit.
fn others_demand(view: &ClusterView, me: &str) -> Demand {
    let mut sum = Demand::new();
    for report in reports::<Demand>(view, me, &Key::Demand) {
        for (scope, rps) in report {
            if let Some(rps) = believed(rps) {
                *sum.entry(scope).or_default() += rps;
            }
        }
    }
    sum
}

/// What every other live member reports per service under adaptive
/// concurrency, summed.
fn others_concurrency(view: &ClusterView, me: &str) -> BTreeMap<String, Others> {
    let mut sum: BTreeMap<String, Others> = BTreeMap::new();
    let all = reports::<BTreeMap<String, ConcurrencyReport>>(view, me, &Key::Concurrency);
    for report in all {
        for (service, r) in report {
            let others = sum.entry(service).or_default();
            others.demand += believed(r.demand).unwrap_or(0.0);
            if let Some(limit) = believed(r.limit) {
                others.limits += limit;
                others.nodes += 1;
            }
        }
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_is_written_rounded_and_without_zeros() {
        let demand = Demand::from([("api".into(), 12.345), ("db".into(), 0.01)]);
        let rounded = serde_json::to_string(&rounded_demand(&demand)).unwrap();
        assert_eq!(rounded, r#"{"api":12.3}"#);
    }

    #[test]
    fn reported_numbers_are_bounded() {
        assert_eq!(believed(f64::NAN), None);
        assert_eq!(believed(-1.0), None);
        assert_eq!(believed(1e300), Some(MAX_REPORTED));
    }
}
