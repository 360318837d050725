//! Services' own ports: the outbound proxy (`"outbound"` in a
//! registration) and named upstreams (`"upstreams"`). What an app sends
//! through one is that service's call (`weft-caller`), where the shared
//! proxy's are the anonymous caller's. Kept in the data dir, so a
//! restarted node opens the same addresses again, and served by the
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

/// Most named upstreams one registration may ask for.
pub const MAX_UPSTREAMS: usize = 16;

/// What a registration asks for: its own outbound proxy, named upstreams.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    /// The outbound proxy port, if any.
    pub outbound: Option<Outbound>,
    /// (service, listen) of each named upstream.
    pub upstreams: Vec<(String, SocketAddr)>,
}

impl Wanted {
    /// Reads a registration's `"outbound"` and `"upstreams"` fields (taken
    /// out of `body`: they are this node's business, not gossiped).
    pub fn take_from(body: &mut Value) -> Result<Wanted, String> {
        let Some(obj) = body.as_object_mut() else {
            return Ok(Wanted::default());
        };
        let outbound = match obj.remove("outbound") {
            Some(value) => Outbound::parse(&value)?,
            None => None,
        };
        let upstreams = match obj.remove("upstreams") {
            Some(value) => parse_upstreams(&value)?,
            None => Vec::new(),
        };
        Ok(Wanted {
            outbound,
            upstreams,
        })
    }

    fn is_empty(&self) -> bool {
        self.outbound.is_none() && self.upstreams.is_empty()
    }
}

/// `[{"service","listen"}]`: loopback addresses with a port, each once.
fn parse_upstreams(value: &Value) -> Result<Vec<(String, SocketAddr)>, String> {
    let list = value
        .as_array()
        .ok_or("field \"upstreams\" must be a list of {\"service\", \"listen\"}")?;
    if list.len() > MAX_UPSTREAMS {
        return Err(format!("field \"upstreams\": at most {MAX_UPSTREAMS}"));
    }
    let mut out: Vec<(String, SocketAddr)> = Vec::new();
    for item in list {
        let (service, listen) =
            crate::api::parse_upstream(item).map_err(|e| format!("field \"upstreams\": {e}"))?;
        if !listen.ip().is_loopback() {
            return Err(format!(
                "field \"upstreams\": {listen} is not a loopback address, and whoever reaches it calls as the service"
            ));
        }
        if out.iter().any(|(_, l)| *l == listen) {
            return Err(format!("field \"upstreams\": {listen} twice"));
        }
        out.push((service, listen));
    }
    Ok(out)
}

/// The ports opened for a registration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Opened {
    /// The outbound proxy's address.
    pub outbound: Option<SocketAddr>,
    /// (service, listen) of each named upstream.
    pub upstreams: Vec<(String, SocketAddr)>,
}

/// One port: its address, and the service it reaches (`None`: the
/// outbound proxy, which reaches what each request names).
type Port = (SocketAddr, Option<String>);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    id: String,
    service: String,
    listen: SocketAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reaches: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    callers: Vec<Entry>,
}

/// A registration's caller name and ports.
type Ports = (String, Vec<Port>);

/// The outbound ports of this node's registrations, by instance id.
#[derive(Debug)]
pub struct CallerPorts {
    path: PathBuf,
    entries: Mutex<BTreeMap<String, Ports>>,
    listener: OnceLock<Addr<Listener>>,
}

impl CallerPorts {
    /// Loads `callers.json` from the data dir (missing means none).
    pub fn load(data_dir: &Path) -> Result<Self, NodeError> {
        let path = data_dir.join("callers.json");
        let stored: Stored = store::load(&path)?;
        let mut entries: BTreeMap<String, Ports> = BTreeMap::new();
        for e in stored.callers {
            entries
                .entry(e.id)
                .or_insert_with(|| (e.service.clone(), Vec::new()))
                .1
                .push((e.listen, e.reaches));
        }
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
        for (id, (caller, ports)) in entries {
            for (listen, reaches) in ports {
                match TcpListener::bind(listen).await {
                    Ok(bound) => listener.do_send(AddCallerProxy {
                        caller: caller.clone(),
                        reaches,
                        listener: bound,
                    }),
                    Err(e) => {
                        tracing::error!(%listen, id, error = %e, "cannot re-open a saved outbound port")
                    }
                }
            }
        }
    }

    /// Opens the ports registration `id` of `caller` wants (and closes the
    /// ones it had that it no longer wants).
    pub async fn open(&self, id: &str, caller: &str, wanted: &Wanted) -> Result<Opened, NodeError> {
        let listener = self
            .listener
            .get()
            .ok_or_else(|| NodeError::Io("the node is still starting".into()))?;
        let mut entries = self.entries.lock().await;
        let previous = entries.remove(id);
        stop(listener, previous.as_ref()).await;
        if wanted.is_empty() {
            if let Err(e) = self.persist(&entries) {
                restore(listener, &mut entries, id, previous).await;
                return Err(e);
            }
            return Ok(Opened::default());
        }
        let bound = match bind(wanted, previous.as_ref()).await {
            Ok(bound) => bound,
            Err(e) => {
                restore(listener, &mut entries, id, previous).await;
                return Err(e);
            }
        };
        let ports: Vec<Port> = bound
            .iter()
            .map(|(at, reaches, _)| (*at, reaches.clone()))
            .collect();
        entries.insert(id.to_string(), (caller.to_string(), ports));
        if let Err(e) = self.persist(&entries) {
            entries.remove(id);
            restore(listener, &mut entries, id, previous).await;
            return Err(e);
        }
        let mut opened = Opened::default();
        for (at, reaches, bound) in bound {
            match &reaches {
                Some(service) => opened.upstreams.push((service.clone(), at)),
                None => opened.outbound = Some(at),
            }
            listener.do_send(AddCallerProxy {
                caller: caller.to_string(),
                reaches,
                listener: bound,
            });
        }
        Ok(opened)
    }

    /// Closes the ports of registration `id`, if it has any.
    pub async fn close(&self, id: &str) -> Result<(), NodeError> {
        self.open(id, "", &Wanted::default()).await.map(|_| ())
    }

    fn persist(&self, entries: &BTreeMap<String, Ports>) -> Result<(), NodeError> {
        let stored = Stored {
            callers: entries
                .iter()
                .flat_map(|(id, (service, ports))| {
                    ports.iter().map(|(listen, reaches)| Entry {
                        id: id.clone(),
                        service: service.clone(),
                        listen: *listen,
                        reaches: reaches.clone(),
                    })
                })
                .collect(),
        };
        store::save(&self.path, &stored)
    }
}

/// Stops serving `ports`.
async fn stop(listener: &Addr<Listener>, ports: Option<&Ports>) {
    for (at, _) in ports.map(|(_, p)| p.as_slice()).unwrap_or_default() {
        let _ = listener.send(RemoveUpstream(*at)).await;
    }
}

/// Binds every port `wanted` names. An outbound proxy that picks its port
/// keeps the one it had.
async fn bind(
    wanted: &Wanted,
    previous: Option<&Ports>,
) -> Result<Vec<(SocketAddr, Option<String>, TcpListener)>, NodeError> {
    let had = previous
        .and_then(|(_, ports)| ports.iter().find(|(_, reaches)| reaches.is_none()))
        .map(|(at, _)| *at);
    let outbound = wanted.outbound.map(|want| match (want, had) {
        (Outbound::Pick, Some(at)) => at,
        (want, _) => want.address(),
    });
    let mut bound = Vec::new();
    let asked = outbound.map(|at| (at, None, "outbound")).into_iter().chain(
        wanted
            .upstreams
            .iter()
            .map(|(s, at)| (*at, Some(s.clone()), "upstreams")),
    );
    for (address, reaches, field) in asked {
        let listener = TcpListener::bind(address)
            .await
            .and_then(|l| Ok((l.local_addr()?, l)))
            .map_err(|e| {
                NodeError::Conflict(format!(
                    "field \"{field}\": cannot listen on {address}: {e}"
                ))
            })?;
        bound.push((listener.0, reaches, listener.1));
    }
    Ok(bound)
}

/// Serves `previous` again after a failed change.
async fn restore(
    listener: &Addr<Listener>,
    entries: &mut BTreeMap<String, Ports>,
    id: &str,
    previous: Option<Ports>,
) {
    let Some((caller, ports)) = previous else {
        return;
    };
    for (at, reaches) in &ports {
        if let Ok(bound) = TcpListener::bind(*at).await {
            listener.do_send(AddCallerProxy {
                caller: caller.clone(),
                reaches: reaches.clone(),
                listener: bound,
            });
        }
    }
    entries.insert(id.to_string(), (caller, ports));
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
