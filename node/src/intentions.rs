//! The cluster's intentions as this node holds them: cluster config (see
//! [`crate::cluster_config`]) that the data plane enforces on both ends of
//! every call.

use std::path::Path;
use std::sync::Arc;

use weft_gossip::Key;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::policy::intentions::Intentions;

use crate::cluster_config::{config_record, ClusterConfig};
use crate::NodeError;

config_record!(intentions: Intentions, "intentions", Key::Intentions);

/// This node's intentions.
pub type ClusterIntentions = ClusterConfig<Record>;

/// Loads `intentions.json` (missing: everything allowed) and hands each
/// version adopted to `dataplane`.
pub fn load(data_dir: &Path, dataplane: Arc<DataPlane>) -> Result<ClusterIntentions, NodeError> {
    ClusterConfig::load(
        data_dir,
        Box::new(move |record: &Record| {
            dataplane.set_intentions(Arc::new(record.intentions.clone()))
        }),
    )
}
