//! TCP upstreams (`weft upstream`): local ports that reach a service,
//! persisted in the data dir and served by the Listener actor.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use actix::Addr;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use weft_runtime::listener::{AddUpstream, Listener, RemoveUpstream};

use crate::{store, NodeError};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    service: String,
    listen: SocketAddr,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    upstreams: Vec<Entry>,
}

/// The node's TCP upstreams.
#[derive(Debug)]
pub struct Upstreams {
    path: PathBuf,
    entries: Mutex<BTreeMap<SocketAddr, String>>,
    listener: OnceLock<Addr<Listener>>,
}

impl Upstreams {
    /// Loads `upstreams.json` from the data dir (missing means none).
    pub fn load(data_dir: &Path) -> Result<Self, NodeError> {
        let path = data_dir.join("upstreams.json");
        let stored: Stored = store::load(&path)?;
        let entries = stored
            .upstreams
            .into_iter()
            .map(|e| (e.listen, e.service))
            .collect();
        Ok(Upstreams {
            path,
            entries: Mutex::new(entries),
            listener: OnceLock::new(),
        })
    }

    /// Connects to the Listener actor and re-opens the saved upstreams.
    pub async fn attach(&self, listener: Addr<Listener>) {
        let _ = self.listener.set(listener.clone());
        let entries = self.entries.lock().await.clone();
        for (listen, service) in entries {
            match TcpListener::bind(listen).await {
                Ok(l) => listener.do_send(AddUpstream {
                    service,
                    listener: l,
                }),
                Err(e) => {
                    tracing::error!(%listen, service, error = %e, "cannot re-open saved upstream")
                }
            }
        }
    }

    /// Opens (or re-points) an upstream.
    pub async fn add(&self, service: String, listen: SocketAddr) -> Result<(), NodeError> {
        let listener = self
            .listener
            .get()
            .ok_or_else(|| NodeError::Io("the node is still starting".into()))?;
        let mut entries = self.entries.lock().await;
        if entries.contains_key(&listen) {
            // Ours already: free the port, then bind again for the new service.
            let _ = listener.send(RemoveUpstream(listen)).await;
        }
        let bound = TcpListener::bind(listen)
            .await
            .map_err(|e| NodeError::Conflict(format!("cannot listen on {listen}: {e}")))?;
        let previous = entries.insert(listen, service.clone());
        if let Err(e) = self.persist(&entries) {
            match previous {
                Some(p) => entries.insert(listen, p),
                None => entries.remove(&listen),
            };
            return Err(e);
        }
        listener.do_send(AddUpstream {
            service,
            listener: bound,
        });
        Ok(())
    }

    /// Closes an upstream; `Ok(false)` if there was none on that address.
    pub async fn remove(&self, listen: SocketAddr) -> Result<bool, NodeError> {
        let mut entries = self.entries.lock().await;
        let Some(previous) = entries.remove(&listen) else {
            return Ok(false);
        };
        if let Err(e) = self.persist(&entries) {
            entries.insert(listen, previous);
            return Err(e);
        }
        if let Some(listener) = self.listener.get() {
            let _ = listener.send(RemoveUpstream(listen)).await;
        }
        Ok(true)
    }

    /// (listen, service) pairs.
    pub async fn list(&self) -> Vec<(SocketAddr, String)> {
        self.entries
            .lock()
            .await
            .iter()
            .map(|(l, s)| (*l, s.clone()))
            .collect()
    }

    fn persist(&self, entries: &BTreeMap<SocketAddr, String>) -> Result<(), NodeError> {
        let stored = Stored {
            upstreams: entries
                .iter()
                .map(|(listen, service)| Entry {
                    service: service.clone(),
                    listen: *listen,
                })
                .collect(),
        };
        store::save(&self.path, &stored)
    }
}
