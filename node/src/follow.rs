//! How a node keeps cluster config it adopts from gossip (the revocation
//! list, the intentions) and its own gossip key for it in step, and how it
//! writes and reads the reports each member gossips of itself (demand,
//! concurrency, rollout progress).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use tokio::sync::watch;
use weft_gossip::{ClusterView, Key};
use weft_runtime::gossip_writer::GossipWriter;

/// Runs `on_view` with every new cluster view (to adopt what members
/// offer) and `on_change` whenever `own` moves (to offer what this node
/// adopted), until either source ends.
pub fn views_and_changes<T, V, C>(
    mut views: watch::Receiver<Arc<ClusterView>>,
    mut own: watch::Receiver<T>,
    mut on_view: V,
    mut on_change: C,
) where
    T: Send + Sync + 'static,
    V: FnMut(&ClusterView) + Send + 'static,
    C: FnMut(&T) + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let view = views.borrow_and_update().clone();
                    on_view(&view);
                }
                changed = own.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    on_change(&own.borrow_and_update());
                }
            }
        }
    });
}

/// One of this node's gossip keys, written only when its value changes and
/// deleted when there is nothing to say.
pub struct OwnKey {
    key: Key,
    written: String,
}

impl OwnKey {
    /// A key nothing was written to yet.
    pub fn new(key: Key) -> Self {
        OwnKey {
            key,
            written: "{}".into(),
        }
    }

    /// Writes `value` if it changed (an empty map deletes the key).
    pub fn write<T: serde::Serialize>(
        &mut self,
        writer: &GossipWriter,
        value: &BTreeMap<String, T>,
    ) {
        let value = serde_json::to_string(value).unwrap_or_default();
        if value == self.written {
            return;
        }
        if value == "{}" {
            writer.delete(self.key.clone());
        } else {
            writer.set(self.key.clone(), value.clone());
        }
        self.written = value;
    }
}

/// Every other live member's value of `key`, parsed.
pub fn reports<'a, T: DeserializeOwned>(
    view: &'a ClusterView,
    me: &'a str,
    key: &Key,
) -> impl Iterator<Item = T> + 'a {
    let key = key.encode();
    view.nodes
        .iter()
        .filter(move |n| n.live && n.name != me)
        .filter_map(move |n| serde_json::from_str(n.kv.get(&key)?).ok())
}
