//! The cluster's intentions as this node holds them.
//!
//! A version is adopted only with an operator's grant over its digest. The
//! node keeps what it adopted in the data dir (a full cluster restart
//! keeps it), gossips it under `intentions` (it outlives the node that
//! wrote it: every node that adopted it offers it), adopts any newer
//! granted version a live member offers, and hands each adopted version to
//! the data plane, which enforces it on both ends of every call.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_gossip::grant::{Authority, Grant};
use weft_gossip::{ClusterView, Key};
use weft_runtime::dataplane::DataPlane;
use weft_runtime::gossip_writer::GossipWriter;
use weft_runtime::policy::intentions::Intentions;

use crate::{store, NodeError};

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

/// Why a version was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Malformed rules.
    #[error("{0}")]
    Invalid(String),
    /// Not newer than what the node holds.
    #[error("version {offered} is not newer than version {held}, which this node holds")]
    Stale {
        /// The version offered.
        offered: u64,
        /// The version held.
        held: u64,
    },
    /// No grant, a grant for something else, or one no operator signed.
    #[error("not granted: {0}")]
    Ungranted(String),
    /// The data dir could not keep it.
    #[error("{0}")]
    Store(NodeError),
}

/// This node's intentions.
#[derive(Debug)]
pub struct ClusterIntentions {
    path: PathBuf,
    current: Mutex<Record>,
    authority: OnceLock<Arc<dyn Authority>>,
    dataplane: Arc<DataPlane>,
    /// Bumped on every adoption, so gossip carries it.
    adopted: watch::Sender<u64>,
    /// Offered values refused already: not checked (or logged) again.
    refused: Mutex<Vec<String>>,
}

/// Refused values remembered (a member could offer new ones without end).
const MAX_REFUSED: usize = 16;

impl ClusterIntentions {
    /// Loads `intentions.json` (missing: everything allowed) and hands it
    /// to the data plane.
    pub fn load(data_dir: &Path, dataplane: Arc<DataPlane>) -> Result<Self, NodeError> {
        let path = data_dir.join("intentions.json");
        let record: Record = store::load(&path)?;
        record
            .intentions
            .validate()
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        dataplane.set_intentions(Arc::new(record.intentions.clone()));
        Ok(ClusterIntentions {
            path,
            current: Mutex::new(record),
            authority: OnceLock::new(),
            dataplane,
            adopted: watch::Sender::new(0),
            refused: Mutex::new(Vec::new()),
        })
    }

    /// Checks grants with `authority` from now on.
    pub fn trust_operators(&self, authority: Arc<dyn Authority>) {
        let _ = self.authority.set(authority);
    }

    /// The version held now.
    pub fn current(&self) -> Record {
        self.lock().clone()
    }

    /// Adopts `record` if it is newer, valid and granted; returns the
    /// operator who granted it.
    pub fn adopt(&self, record: Record) -> Result<String, Refused> {
        let intentions = &record.intentions;
        intentions.validate().map_err(Refused::Invalid)?;
        let grant = record
            .grant
            .as_ref()
            .ok_or_else(|| Refused::Ungranted("no grant".into()))?;
        if !grant.covers(OBJECT, intentions.version, &intentions.digest()) {
            return Err(Refused::Ungranted(
                "the grant is for another object, version or content".into(),
            ));
        }
        let authority = self
            .authority
            .get()
            .ok_or_else(|| Refused::Ungranted("the node is still starting".into()))?;
        let operator = authority.verify(grant).map_err(Refused::Ungranted)?;
        let mut current = self.lock();
        if intentions.version <= current.intentions.version {
            return Err(Refused::Stale {
                offered: intentions.version,
                held: current.intentions.version,
            });
        }
        store::save(&self.path, &record).map_err(Refused::Store)?;
        self.dataplane
            .set_intentions(Arc::new(record.intentions.clone()));
        tracing::info!(
            version = intentions.version,
            operator,
            "adopted the cluster's intentions"
        );
        *current = record;
        drop(current);
        self.adopted.send_modify(|n| *n = n.wrapping_add(1));
        Ok(operator)
    }

    /// Keeps gossip and the intentions in step: offers what this node
    /// holds under `intentions`, and adopts newer granted versions live
    /// members offer.
    pub fn follow(self: Arc<Self>, views: watch::Receiver<Arc<ClusterView>>, writer: GossipWriter) {
        self.offer(&writer);
        let adopted = self.adopted.subscribe();
        let this = self.clone();
        crate::follow::views_and_changes(
            views,
            adopted,
            move |view| this.adopt_newest(view),
            move |_| self.offer(&writer),
        );
    }

    fn offer(&self, writer: &GossipWriter) {
        let record = self.current();
        if record.intentions.version > 0 {
            if let Ok(value) = serde_json::to_string(&record) {
                writer.set(Key::Intentions, value);
            }
        }
    }

    /// Adopts the newest granted version live members offer, if newer than
    /// ours. A newer one without a valid grant is counted
    /// (`weft_gossip_rejected_total{reason="ungranted_intentions"}`) once.
    fn adopt_newest(&self, view: &ClusterView) {
        let held = self.lock().intentions.version;
        let key = Key::Intentions.encode();
        let mut offers: Vec<(u64, &String, Record)> = view
            .nodes
            .iter()
            .filter(|n| n.live)
            .filter_map(|n| n.kv.get(&key))
            .filter_map(|raw| Some((raw, serde_json::from_str::<Record>(raw).ok()?)))
            .map(|(raw, record)| (record.intentions.version, raw, record))
            .filter(|(version, _, _)| *version > held)
            .collect();
        offers.sort_by_key(|(version, _, _)| std::cmp::Reverse(*version));
        for (version, raw, record) in offers {
            if self.refused_before(raw) {
                continue;
            }
            match self.adopt(record) {
                Ok(_) | Err(Refused::Stale { .. }) => return,
                Err(e) => {
                    metrics::counter!("weft_gossip_rejected_total", "reason" => "ungranted_intentions")
                        .increment(1);
                    tracing::warn!(version, error = %e, "did not adopt the intentions a member offers");
                    self.remember_refused(raw);
                }
            }
        }
    }

    fn refused_before(&self, raw: &str) -> bool {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.iter().any(|r| r == raw)
    }

    fn remember_refused(&self, raw: &str) {
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if refused.len() >= MAX_REFUSED {
            refused.remove(0);
        }
        refused.push(raw.to_string());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}
