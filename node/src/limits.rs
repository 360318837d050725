//! The cluster's rate limits as this node holds them: cluster config (see
//! [`crate::cluster_config`]) that the data plane's admission enforces
//! (the demand behind each node's share is gossiped by
//! [`crate::admission`]); and `weft limit`.

use std::path::Path;
use std::sync::Arc;

use hyper::Method;
use weft_gossip::Key;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::policy::rate::RateLimits;

use crate::cli::LimitArgs;
use crate::client;
use crate::cluster_config::{config_record, ClusterConfig};
use crate::{config_command, NodeError};

config_record!(limits: RateLimits, "limits", Key::Limits);

/// This node's rate limits.
pub type ClusterLimits = ClusterConfig<Record>;

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
