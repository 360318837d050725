//! The cluster's intentions as this node holds them: cluster config (see
//! [`crate::cluster_config`]) that the data plane enforces on both ends of
//! every call.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use weft_gossip::grant::Grant;
use weft_gossip::Key;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::policy::intentions::Intentions;

use crate::cluster_config::{ClusterConfig, ConfigRecord};
use crate::NodeError;

/// The name grants give this object.
pub const OBJECT: &str = "intentions";

/// One version and the operator's grant that made it (none for version 0).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    /// The rules and the default.
    pub intentions: Intentions,
    /// The operator's signature over the version and its digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Grant>,
}

impl ConfigRecord for Record {
    const OBJECT: &'static str = OBJECT;

    fn key() -> Key {
        Key::Intentions
    }

    fn version(&self) -> u64 {
        self.intentions.version
    }

    fn digest(&self) -> String {
        self.intentions.digest()
    }

    fn validate(&self) -> Result<(), String> {
        self.intentions.validate()
    }

    fn grant(&self) -> Option<&Grant> {
        self.grant.as_ref()
    }

    fn with_grant(self, grant: Grant) -> Self {
        Record {
            grant: Some(grant),
            ..self
        }
    }
}

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
