//! The CLI side of cluster config (`weft intentions`, `weft route`): a
//! change is made here over the version the node holds, granted by the
//! operator whose certificate and key the command is given; the node
//! checks the grant and gossip carries the new version to every node.

use std::path::Path;

use hyper::Method;

use crate::cli::OperatorArgs;
use crate::cluster_config::ConfigRecord;
use crate::{client, keys_command, NodeError};

/// The version of `R` the node at `socket` holds.
pub async fn fetch<R: ConfigRecord>(socket: &Path) -> Result<R, NodeError> {
    let (status, body) = client::call(socket, Method::GET, &path::<R>(), None).await?;
    client::check(status, &body)?;
    serde_json::from_value(body).map_err(|e| NodeError::Io(format!("{}: {e}", R::OBJECT)))
}

/// Makes `change` of the version the node holds, signs the result as the
/// operator and hands it to the node; the version made and who granted it.
pub async fn change<R: ConfigRecord>(
    socket: &Path,
    operator: &OperatorArgs,
    change: impl FnOnce(R) -> Result<R, String>,
) -> Result<(u64, String), NodeError> {
    let operator = keys_command::load(operator)?;
    let next = change(fetch::<R>(socket).await?).map_err(NodeError::Config)?;
    let grant = operator.grant(R::OBJECT, next.version(), &next.digest());
    let record = next.with_grant(grant);
    let body = serde_json::to_value(&record).map_err(|e| NodeError::Io(e.to_string()))?;
    let (status, reply) = client::call(socket, Method::PUT, &path::<R>(), Some(body)).await?;
    client::check(status, &reply)?;
    Ok((record.version(), operator.name))
}

fn path<R: ConfigRecord>() -> String {
    format!("/v1/{}", R::OBJECT)
}
