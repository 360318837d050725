//! The node's local registrations: persisted in the data dir, announced in gossip.
//!
//! A registration is written to disk before it is gossiped, so a node that
//! restarts on the same data dir announces exactly what it had. Registering an
//! existing id replaces it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};
use weft_gossip::{Cluster, Key, ServiceRecord};

use crate::{store, NodeError};

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    services: Vec<ServiceRecord>,
}

/// Most registrations one node holds. Each one is two gossip keys of this
/// node (`svc/<id>` and `health/<id>`), and a node's keys travel in its
/// gossip deltas: the cap keeps a node's share of every round bounded, and
/// a cluster of 100 nodes still holds 25,600 instances.
pub const MAX_REGISTRATIONS: usize = 256;

/// Local registrations.
#[derive(Debug)]
pub struct Registry {
    path: PathBuf,
    services: Mutex<BTreeMap<String, ServiceRecord>>,
    /// Every change, published while the lock is held, so a watcher (the
    /// health checker) sees the registrations in the order they happened.
    changes: watch::Sender<Vec<ServiceRecord>>,
}

impl Registry {
    /// Loads `services.json` from the data dir (missing means none).
    pub fn load(data_dir: &std::path::Path) -> Result<Self, NodeError> {
        let path = data_dir.join("services.json");
        let stored: Stored = store::load(&path)?;
        let services: BTreeMap<String, ServiceRecord> = stored
            .services
            .into_iter()
            .map(|s| (s.id.clone(), s))
            .collect();
        let (changes, _) = watch::channel(services.values().cloned().collect());
        Ok(Registry {
            path,
            services: Mutex::new(services),
            changes,
        })
    }

    /// The registrations now and after every change.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ServiceRecord>> {
        self.changes.subscribe()
    }

    fn publish(&self, services: &BTreeMap<String, ServiceRecord>) {
        self.changes
            .send_replace(services.values().cloned().collect());
    }

    /// The gossip keys to announce at start.
    pub async fn initial_keys(&self) -> Vec<(Key, String)> {
        self.services
            .lock()
            .await
            .values()
            .filter_map(|s| Some((Key::svc(&s.id).ok()?, serde_json::to_string(s).ok()?)))
            .collect()
    }

    /// The registration with this id.
    pub async fn get(&self, id: &str) -> Option<ServiceRecord> {
        self.services.lock().await.get(id).cloned()
    }

    /// Adds or replaces a registration: disk first, then gossip.
    pub async fn put(
        &self,
        cluster: &Arc<Cluster>,
        record: ServiceRecord,
    ) -> Result<(), NodeError> {
        let key = Key::svc(&record.id).map_err(|e| NodeError::Invalid(e.to_string()))?;
        let value = serde_json::to_string(&record).map_err(|e| NodeError::Io(e.to_string()))?;
        weft_gossip::keys::validate_value(&value).map_err(|e| NodeError::Invalid(e.to_string()))?;
        let mut services = self.services.lock().await;
        if !services.contains_key(&record.id) && services.len() >= MAX_REGISTRATIONS {
            return Err(NodeError::Conflict(format!(
                "this node holds {MAX_REGISTRATIONS} registrations, the most one node may hold; \
                 remove one, or register {:?} on another node",
                record.id
            )));
        }
        let previous = services.insert(record.id.clone(), record.clone());
        if let Err(e) = self.persist(&services) {
            match previous {
                Some(p) => services.insert(p.id.clone(), p),
                None => services.remove(&record.id),
            };
            return Err(e);
        }
        self.publish(&services);
        cluster
            .set(&key, &value)
            .await
            .map_err(|e| NodeError::Invalid(e.to_string()))
    }

    /// Removes a registration; `Ok(false)` when the id is unknown.
    pub async fn remove(&self, cluster: &Arc<Cluster>, id: &str) -> Result<bool, NodeError> {
        let mut services = self.services.lock().await;
        let Some(previous) = services.remove(id) else {
            return Ok(false);
        };
        if let Err(e) = self.persist(&services) {
            services.insert(previous.id.clone(), previous);
            return Err(e);
        }
        self.publish(&services);
        if let Ok(key) = Key::svc(id) {
            cluster.delete(&key).await;
        }
        Ok(true)
    }

    /// Withdraws every registration from gossip (graceful leave) without
    /// forgetting them on disk, so a restart announces them again.
    pub async fn withdraw_all(&self, cluster: &Arc<Cluster>) {
        for key in cluster.own_keys("svc/").await {
            if let Some(key) = Key::decode(&key) {
                cluster.delete(&key).await;
            }
        }
    }

    fn persist(&self, services: &BTreeMap<String, ServiceRecord>) -> Result<(), NodeError> {
        let stored = Stored {
            services: services.values().cloned().collect(),
        };
        store::save(&self.path, &stored)
    }
}
