//! One ordered queue for the node's own gossip writes from actors, so that two
//! quick changes of the same key land in the order they were decided.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;
use weft_gossip::{Cluster, Key};

/// Sends set/delete of the node's own keys to the single writer task.
#[derive(Debug, Clone)]
pub struct GossipWriter {
    tx: mpsc::UnboundedSender<(Key, Option<String>)>,
}

impl GossipWriter {
    /// Starts the writer task for `cluster`.
    pub fn spawn(cluster: Arc<Cluster>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<(Key, Option<String>)>();
        tokio::spawn(async move {
            while let Some((key, value)) = rx.recv().await {
                match value {
                    Some(v) => {
                        if let Err(e) = cluster.set(&key, &v).await {
                            tracing::warn!(key = %key.encode(), error = %e, "gossip write refused");
                        }
                    }
                    None => cluster.delete(&key).await,
                }
            }
        });
        GossipWriter { tx }
    }

    /// Writes `key = value`.
    pub fn set(&self, key: Key, value: String) {
        let _ = self.tx.send((key, Some(value)));
    }

    /// Deletes `key`.
    pub fn delete(&self, key: Key) {
        let _ = self.tx.send((key, None));
    }

    /// Makes a set of keys `wanted`, given that `written` was written
    /// last: writes what changed, deletes what is no longer wanted, and
    /// remembers `wanted` as written.
    pub fn sync(&self, written: &mut BTreeMap<Key, String>, wanted: BTreeMap<Key, String>) {
        for (key, value) in &wanted {
            if written.get(key) != Some(value) {
                self.set(key.clone(), value.clone());
            }
        }
        for key in written.keys() {
            if !wanted.contains_key(key) {
                self.delete(key.clone());
            }
        }
        *written = wanted;
    }
}
