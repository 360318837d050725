//! The cluster's rate limits as this node holds them: cluster config (see
//! [`crate::cluster_config`]) that the data plane's admission enforces;
//! the demand this node gossips for each limit and reads from the others;
//! and `weft limit`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::sync::watch;
use weft_gossip::{ClusterView, Key};
use weft_runtime::dataplane::admission::Demand;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::gossip_writer::GossipWriter;
use weft_runtime::policy::rate::RateLimits;

use crate::cli::LimitArgs;
use crate::client;
use crate::cluster_config::{config_record, ClusterConfig};
use crate::{config_command, NodeError};

config_record!(limits: RateLimits, "limits", Key::Limits);

/// This node's rate limits.
pub type ClusterLimits = ClusterConfig<Record>;

/// How often a node gossips its demand and takes the others' into its
/// shares: with gossip's own round on top, a node whose demand rises gets
/// its share within about a second.
const DEMAND_INTERVAL: Duration = Duration::from_millis(500);

/// Demand a node may report for one limit, requests a second: a larger
/// number is read as this (a malformed one as none).
const MAX_REPORTED: f64 = 1e9;

/// Loads `limits.json` (missing: no limits) and hands each version adopted
/// to `dataplane`.
pub fn load(data_dir: &Path, dataplane: Arc<DataPlane>) -> Result<ClusterLimits, NodeError> {
    ClusterConfig::load(
        data_dir,
        Box::new(move |record: &Record| {
            dataplane
                .admission
                .set_limits(Arc::new(record.limits.clone()))
        }),
    )
}

/// Gossips this node's demand for each limit (when it changes) and gives
/// the data plane what the other live members report, every
/// [`DEMAND_INTERVAL`] until the node stops.
pub fn follow_demand(
    dataplane: Arc<DataPlane>,
    views: watch::Receiver<Arc<ClusterView>>,
    writer: GossipWriter,
) {
    tokio::spawn(async move {
        let mut written = String::new();
        let mut ticks = tokio::time::interval(DEMAND_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let own = encode(&dataplane.admission.demand());
            if own != written {
                if own == "{}" {
                    writer.delete(Key::Demand);
                } else {
                    writer.set(Key::Demand, own.clone());
                }
                written = own;
            }
            let others = others_demand(&views.borrow(), &dataplane.node);
            dataplane.admission.set_others(&others);
        }
    });
}

/// Demand rounded to a tenth of a request a second, so that a steady load
/// is not written again every round.
fn encode(demand: &Demand) -> String {
    let rounded: Demand = demand
        .iter()
        .map(|(scope, rps)| (scope.clone(), (rps * 10.0).round() / 10.0))
        .filter(|(_, rps)| *rps > 0.0)
        .collect();
    serde_json::to_string(&rounded).unwrap_or_default()
}

/// The demand every other live member reports, summed per limit.
fn others_demand(view: &ClusterView, me: &str) -> Demand {
    let key = Key::Demand.encode();
    let mut sum = Demand::new();
    let reports = view
        .nodes
        .iter()
        .filter(|n| n.live && n.name != me)
        .filter_map(|n| serde_json::from_str::<Demand>(n.kv.get(&key)?).ok());
    for report in reports {
        for (scope, rps) in report {
            if rps.is_finite() && rps > 0.0 {
                *sum.entry(scope).or_default() += rps.min(MAX_REPORTED);
            }
        }
    }
    sum
}

/// Runs `weft limit` against the node at `socket`.
pub async fn run(socket: &Path, args: LimitArgs) -> Result<(), NodeError> {
    let Some(service) = args.service.clone() else {
        return list(socket, args.json).await;
    };
    let rate = match (&args.rate, args.clear) {
        (_, true) => None,
        (Some(rate), false) => Some(rate.parse().map_err(NodeError::Config)?),
        (None, false) => {
            return Err(NodeError::Config(format!(
                "give a rate (e.g. `weft limit {service} 300/s`) or --clear"
            )))
        }
    };
    let operator = args.signing.operator("limit").map_err(NodeError::Config)?;
    let caller = args.caller.as_deref();
    let (version, operator) = config_command::change(socket, &operator, |held: Record| {
        Ok(Record {
            limits: held.limits.with(&service, caller, rate)?,
            grant: None,
        })
    })
    .await?;
    let scope = match caller {
        Some(caller) => format!("{caller}'s calls to {service}"),
        None => service,
    };
    let what = match rate {
        Some(rate) => format!("admits {scope} at {rate} in all"),
        None => format!("stops limiting {scope}"),
    };
    println!(
        "limits version {version}, granted by operator {operator}; the cluster {what} once gossip brings it (see `weft limit`)"
    );
    Ok(())
}

/// `weft limit` with no service: the limits, and this node's demand and
/// share of each (from `/v1/health`).
async fn list(socket: &Path, json: bool) -> Result<(), NodeError> {
    let (status, body) = client::call(socket, Method::GET, "/v1/limits", None).await?;
    client::check(status, &body)?;
    if json {
        println!("{body:#}");
        return Ok(());
    }
    let (status, health) = client::call(socket, Method::GET, "/v1/health", None).await?;
    client::check(status, &health)?;
    print!("{}", client::limits_table(&body, &health));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_is_written_rounded_and_without_zeros() {
        let demand = Demand::from([("api".into(), 12.345), ("db".into(), 0.01)]);
        assert_eq!(encode(&demand), r#"{"api":12.3}"#);
        assert_eq!(encode(&Demand::new()), "{}");
    }
}
