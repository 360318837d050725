//! Services' own outbound ports (`"outbound"` in a registration): requests
//! an app sends through one are from that service (`weft-caller`), where
//! the shared proxy's are the anonymous caller's. Kept in the data dir, so
//! a restarted node opens the same address again, and served by the
//! Listener actor.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use actix::Addr;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use weft_runtime::listener::{AddCallerProxy, Listener, RemoveUpstream};

use crate::{store, NodeError};

/// Where a registration wants its outbound port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outbound {
    /// `true`: a free port on 127.0.0.1, which the reply names.
    Pick,
    /// `"127.0.0.1:P"`: that address (port 0 picks one on that address).
    At(SocketAddr),
}

impl Outbound {
    /// Reads a registration's `"outbound"` field: `true`, `false` (none) or
    /// a loopback address. Only loopback: whoever reaches the port speaks
    /// as the service.
    pub fn parse(value: &Value) -> Result<Option<Outbound>, String> {
        let at: SocketAddr = match value {
            Value::Bool(false) => return Ok(None),
            Value::Bool(true) => return Ok(Some(Outbound::Pick)),
            Value::String(s) => s.parse().map_err(|_| {
                format!("field \"outbound\": {s:?} is not an address like \"127.0.0.1:9190\"")
            })?,
            _ => {
                return Err(
                    "field \"outbound\" must be true or an address like \"127.0.0.1:9190\"".into(),
                )
            }
        };
        if !at.ip().is_loopback() {
            return Err(format!(
                "field \"outbound\": {} is not a loopback address, and whoever reaches the port calls as the service",
                at.ip()
            ));
        }
        Ok(Some(Outbound::At(at)))
    }

    fn address(self) -> SocketAddr {
        match self {
            Outbound::Pick => SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Outbound::At(at) => at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: String,
    service: String,
    listen: SocketAddr,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    callers: Vec<Entry>,
}

/// The outbound ports of this node's registrations, by instance id.
#[derive(Debug)]
pub struct CallerPorts {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, (String, SocketAddr)>>,
    listener: OnceLock<Addr<Listener>>,
}

impl CallerPorts {
    /// Loads `callers.json` from the data dir (missing means none).
    pub fn load(data_dir: &Path) -> Result<Self, NodeError> {
        let path = data_dir.join("callers.json");
        let stored: Stored = store::load(&path)?;
        let entries = stored
            .callers
            .into_iter()
            .map(|e| (e.id, (e.service, e.listen)))
            .collect();
        Ok(CallerPorts {
            path,
            entries: Mutex::new(entries),
            listener: OnceLock::new(),
        })
    }

    /// Connects to the Listener actor and re-opens the saved ports.
    pub async fn attach(&self, listener: Addr<Listener>) {
        let _ = self.listener.set(listener.clone());
        let entries = self.entries.lock().await.clone();
        for (id, (caller, listen)) in entries {
            match TcpListener::bind(listen).await {
                Ok(bound) => listener.do_send(AddCallerProxy {
                    caller,
                    listener: bound,
                }),
                Err(e) => {
                    tracing::error!(%listen, id, error = %e, "cannot re-open a saved outbound port")
                }
            }
        }
    }

    /// Opens the outbound port of registration `id` of `service` (moving it
    /// if it had another); returns the bound address.
    pub async fn open(
        &self,
        id: &str,
        service: &str,
        want: Outbound,
    ) -> Result<SocketAddr, NodeError> {
        let listener = self
            .listener
            .get()
            .ok_or_else(|| NodeError::Io("the node is still starting".into()))?;
        let mut entries = self.entries.lock().await;
        let previous = entries.remove(id);
        // A re-registration that picks again keeps its address.
        let address = match (want, &previous) {
            (Outbound::Pick, Some((_, at))) => *at,
            _ => want.address(),
        };
        if let Some((_, at)) = &previous {
            let _ = listener.send(RemoveUpstream(*at)).await;
        }
        let bound = TcpListener::bind(address)
            .await
            .and_then(|l| Ok((l.local_addr()?, l)));
        let (listen, bound) = match bound {
            Ok(ok) => ok,
            Err(e) => {
                self.restore(listener, &mut entries, id, previous).await;
                return Err(NodeError::Conflict(format!(
                    "field \"outbound\": cannot listen on {address}: {e}"
                )));
            }
        };
        entries.insert(id.to_string(), (service.to_string(), listen));
        if let Err(e) = self.persist(&entries) {
            entries.remove(id);
            self.restore(listener, &mut entries, id, previous).await;
            return Err(e);
        }
        listener.do_send(AddCallerProxy {
            caller: service.to_string(),
            listener: bound,
        });
        Ok(listen)
    }

    /// Closes the outbound port of registration `id`, if it has one.
    pub async fn close(&self, id: &str) -> Result<(), NodeError> {
        let mut entries = self.entries.lock().await;
        let Some(previous) = entries.remove(id) else {
            return Ok(());
        };
        if let Err(e) = self.persist(&entries) {
            entries.insert(id.to_string(), previous);
            return Err(e);
        }
        if let Some(listener) = self.listener.get() {
            let _ = listener.send(RemoveUpstream(previous.1)).await;
        }
        Ok(())
    }

    /// Serves `previous` again after a failed move.
    async fn restore(
        &self,
        listener: &Addr<Listener>,
        entries: &mut BTreeMap<String, (String, SocketAddr)>,
        id: &str,
        previous: Option<(String, SocketAddr)>,
    ) {
        let Some((caller, at)) = previous else {
            return;
        };
        if let Ok(bound) = TcpListener::bind(at).await {
            listener.do_send(AddCallerProxy {
                caller: caller.clone(),
                listener: bound,
            });
        }
        entries.insert(id.to_string(), (caller, at));
    }

    fn persist(&self, entries: &BTreeMap<String, (String, SocketAddr)>) -> Result<(), NodeError> {
        let stored = Stored {
            callers: entries
                .iter()
                .map(|(id, (service, listen))| Entry {
                    id: id.clone(),
                    service: service.clone(),
                    listen: *listen,
                })
                .collect(),
        };
        store::save(&self.path, &stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outbound_is_true_false_or_a_loopback_address() {
        assert_eq!(Outbound::parse(&json!(true)), Ok(Some(Outbound::Pick)));
        assert_eq!(Outbound::parse(&json!(false)), Ok(None));
        assert_eq!(
            Outbound::parse(&json!("127.0.0.1:9190")),
            Ok(Some(Outbound::At("127.0.0.1:9190".parse().unwrap())))
        );
        let public = Outbound::parse(&json!("0.0.0.0:9190")).unwrap_err();
        assert!(public.contains("not a loopback address"), "{public}");
        assert!(Outbound::parse(&json!("nine")).is_err());
        assert!(Outbound::parse(&json!(9190)).is_err());
    }
}
