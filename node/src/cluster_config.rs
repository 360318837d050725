//! Cluster config that operators change (the intentions, the routes): each
//! object is versioned, and a version is adopted only with an operator's
//! grant over its digest. A node keeps what it adopted in its data dir (a
//! full cluster restart keeps it), gossips it under the object's key (it
//! outlives the node that wrote it: every node that adopted it offers it),
//! adopts any newer granted version a live member offers, and hands each
//! adopted version to whoever enforces it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use weft_gossip::grant::{Authority, Grant};
use weft_gossip::{ClusterView, Key};
use weft_runtime::gossip_writer::GossipWriter;

use crate::{store, NodeError};

/// One version of a config object with the operator's grant that made it
/// (none for version 0), as it is stored, gossiped and sent to the API.
pub trait ConfigRecord:
    Clone + Default + Serialize + DeserializeOwned + std::fmt::Debug + Send + 'static
{
    /// The name grants give the object; also its file (`<OBJECT>.json`).
    const OBJECT: &'static str;
    /// Its gossip key.
    fn key() -> Key;
    /// Its version: 0 before any operator change, then one more each.
    fn version(&self) -> u64;
    /// The digest an operator's grant covers.
    fn digest(&self) -> String;
    /// Whether its content obeys the object's rules.
    fn validate(&self) -> Result<(), String>;
    /// The operator's grant.
    fn grant(&self) -> Option<&Grant>;
    /// The same version with `grant`.
    fn with_grant(self, grant: Grant) -> Self;
}

/// Declares `Record`, the stored form of a config object: the object under
/// `$field` (which has a `version` and `digest()` and `validate()`) and the
/// operator's grant, named `$object` in grants and files, gossiped under
/// `$key`.
macro_rules! config_record {
    ($field:ident: $type:ty, $object:literal, $key:expr) => {
        /// One version and the operator's grant that made it (none for
        /// version 0).
        #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Record {
            /// The object.
            pub $field: $type,
            /// The operator's signature over the version and its digest.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub grant: Option<weft_gossip::grant::Grant>,
        }

        impl $crate::cluster_config::ConfigRecord for Record {
            const OBJECT: &'static str = $object;

            fn key() -> weft_gossip::Key {
                $key
            }

            fn version(&self) -> u64 {
                self.$field.version
            }

            fn digest(&self) -> String {
                self.$field.digest()
            }

            fn validate(&self) -> Result<(), String> {
                self.$field.validate()
            }

            fn grant(&self) -> Option<&weft_gossip::grant::Grant> {
                self.grant.as_ref()
            }

            fn with_grant(self, grant: weft_gossip::grant::Grant) -> Self {
                Record {
                    grant: Some(grant),
                    ..self
                }
            }
        }
    };
}
pub(crate) use config_record;

/// Why a version was not adopted.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// Malformed content.
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

/// What is done with each version adopted (and the one loaded at start).
pub type Apply<R> = Box<dyn Fn(&R) + Send + Sync>;

/// This node's copy of one config object.
pub struct ClusterConfig<R> {
    path: PathBuf,
    current: Mutex<R>,
    authority: OnceLock<Arc<dyn Authority>>,
    apply: Apply<R>,
    /// Bumped on every adoption, so gossip carries it.
    adopted: watch::Sender<u64>,
    /// Offered values refused already: not checked (or logged) again.
    refused: Mutex<Vec<String>>,
}

impl<R: ConfigRecord> std::fmt::Debug for ClusterConfig<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("object", &R::OBJECT)
            .field("version", &self.lock().version())
            .finish()
    }
}

/// Refused values remembered (a member could offer new ones without end).
const MAX_REFUSED: usize = 16;

impl<R: ConfigRecord> ClusterConfig<R> {
    /// Loads `<OBJECT>.json` from `data_dir` (missing: version 0) and
    /// applies it.
    pub fn load(data_dir: &Path, apply: Apply<R>) -> Result<Self, NodeError> {
        let path = data_dir.join(format!("{}.json", R::OBJECT));
        let record: R = store::load(&path)?;
        record
            .validate()
            .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
        apply(&record);
        Ok(ClusterConfig {
            path,
            current: Mutex::new(record),
            authority: OnceLock::new(),
            apply,
            adopted: watch::Sender::new(0),
            refused: Mutex::new(Vec::new()),
        })
    }

    /// Starts the object's life in the cluster: grants are checked with
    /// `authority` (the cluster's operators) from now on, and gossip and
    /// the object are kept in step (see [`ClusterConfig::follow`]).
    pub fn run(
        self,
        authority: Arc<dyn Authority>,
        views: watch::Receiver<Arc<ClusterView>>,
        writer: GossipWriter,
    ) -> Arc<Self> {
        let _ = self.authority.set(authority);
        let this = Arc::new(self);
        this.clone().follow(views, writer);
        this
    }

    /// The version held now.
    pub fn current(&self) -> R {
        self.lock().clone()
    }

    /// Adopts `record` if it is newer, valid and granted; returns the
    /// operator who granted it.
    pub fn adopt(&self, record: R) -> Result<String, Refused> {
        record.validate().map_err(Refused::Invalid)?;
        let grant = record
            .grant()
            .ok_or_else(|| Refused::Ungranted("no grant".into()))?;
        if !grant.covers(R::OBJECT, record.version(), &record.digest()) {
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
        if record.version() <= current.version() {
            return Err(Refused::Stale {
                offered: record.version(),
                held: current.version(),
            });
        }
        store::save(&self.path, &record).map_err(Refused::Store)?;
        (self.apply)(&record);
        tracing::info!(
            object = R::OBJECT,
            version = record.version(),
            operator,
            "adopted cluster config"
        );
        *current = record;
        drop(current);
        self.adopted.send_modify(|n| *n = n.wrapping_add(1));
        Ok(operator)
    }

    /// Keeps gossip and the object in step: offers what this node holds
    /// under the object's key, and adopts newer granted versions live
    /// members offer.
    fn follow(self: Arc<Self>, views: watch::Receiver<Arc<ClusterView>>, writer: GossipWriter) {
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
        if record.version() > 0 {
            if let Ok(value) = serde_json::to_string(&record) {
                writer.set(R::key(), value);
            }
        }
    }

    /// Adopts the newest granted version live members offer, if newer than
    /// ours. A newer one without a valid grant is counted
    /// (`weft_gossip_rejected_total{reason="ungranted_<object>"}`) once.
    fn adopt_newest(&self, view: &ClusterView) {
        let held = self.lock().version();
        let key = R::key().encode();
        let mut offers: Vec<(u64, &String, R)> = view
            .nodes
            .iter()
            .filter(|n| n.live)
            .filter_map(|n| n.kv.get(&key))
            .filter_map(|raw| Some((raw, serde_json::from_str::<R>(raw).ok()?)))
            .map(|(raw, record)| (record.version(), raw, record))
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
                    let reason = format!("ungranted_{}", R::OBJECT);
                    metrics::counter!("weft_gossip_rejected_total", "reason" => reason)
                        .increment(1);
                    tracing::warn!(object = R::OBJECT, version, error = %e,
                        "did not adopt the cluster config a member offers");
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

    fn lock(&self) -> std::sync::MutexGuard<'_, R> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }
}
