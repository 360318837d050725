//! The cluster's routes (weighted splits by instance tag) as this node
//! holds them: cluster config (see [`crate::cluster_config`]) that the
//! data plane follows when it picks an instance; and `weft route`.

use std::path::Path;
use std::sync::Arc;

use weft_gossip::Key;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::policy::routes::{parse_splits, Routes};

use crate::cli::RouteArgs;
use crate::cluster_config::{config_record, ClusterConfig};
use crate::{client, config_command, NodeError};

config_record!(routes: Routes, "routes", Key::Routes);

/// This node's routes.
pub type ClusterRoutes = ClusterConfig<Record>;

/// Loads `routes.json` (missing: no splits) and hands each version adopted
/// to `dataplane`.
pub fn load(data_dir: &Path, dataplane: Arc<DataPlane>) -> Result<ClusterRoutes, NodeError> {
    ClusterConfig::load(
        data_dir,
        Box::new(move |record: &Record| dataplane.set_routes(Arc::new(record.routes.clone()))),
    )
}

/// Runs `weft route` against the node at `socket`.
pub async fn run(socket: &Path, args: RouteArgs) -> Result<(), NodeError> {
    let Some(service) = args.service.clone() else {
        return crate::show(socket, "/v1/routes", args.json, client::routes_table).await;
    };
    let splits = if args.clear {
        None
    } else if args.splits.is_empty() {
        return Err(NodeError::Config(format!(
            "give TAG=WEIGHT pairs (e.g. `weft route {service} v1=90 v2=10`) or --clear"
        )));
    } else {
        Some(parse_splits(&args.splits).map_err(NodeError::Config)?)
    };
    let operator = args.signing.operator("route").map_err(NodeError::Config)?;
    let (version, operator) = config_command::change(socket, &operator, |held: Record| {
        Ok(Record {
            routes: held.routes.with(&service, splits)?,
            grant: None,
        })
    })
    .await?;
    println!(
        "routes version {version}, granted by operator {operator}; every node splits {service} so once gossip brings it (see `weft route`)"
    );
    Ok(())
}
