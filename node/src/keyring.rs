//! The gossip keyring, cluster-wide (DESIGN section 6, Consul's model).
//!
//! Every node keeps the installed keys in its data dir (`keyring.json`,
//! mode 0600) and gossips them under its own `keyring` key, sealed like all
//! gossip, so only key holders read them. A change anywhere (`weft keys
//! install|use|remove` on any node) bumps the keyring's version; every node
//! adopts the highest version it sees on a live member and republishes it,
//! so the change reaches every node and survives its author leaving.
//! Datagrams open under any installed key and are sealed under the primary
//! ([`weft_gossip::seal::Keyring`]).
//!
//! Rotation is install, use, remove. The two steps that could cut a node
//! off are refused until they are safe: `use` until every live member holds
//! the key, `remove` until no live member seals with it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_gossip::seal::{decode_key_base64, KeyId, Keyring, SharedKeyring};
use weft_gossip::{ClusterView, Key};
use weft_runtime::gossip_writer::GossipWriter;

use crate::{store, NodeError};

/// Most keys a keyring holds (rotation needs two).
pub const MAX_KEYS: usize = 8;
/// The keyring's file in the data dir.
const FILE: &str = "keyring.json";

/// The keyring as persisted and gossiped: base64 keys, primary included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringState {
    /// Bumped by every change anywhere in the cluster; the highest wins.
    pub version: u64,
    /// The key datagrams are sealed under.
    pub primary: String,
    /// Every installed key.
    pub keys: Vec<String>,
}

impl KeyringState {
    fn initial(key: &[u8; 32]) -> KeyringState {
        let key = encode(key);
        KeyringState {
            version: 0,
            primary: key.clone(),
            keys: vec![key],
        }
    }

    /// The sealing keyring, if every key decodes, the primary is installed
    /// and there are at most [`MAX_KEYS`].
    fn keyring(&self) -> Result<Keyring, String> {
        if self.keys.len() > MAX_KEYS {
            return Err(format!("{} keys (at most {MAX_KEYS})", self.keys.len()));
        }
        if !self.keys.contains(&self.primary) {
            return Err("the primary is not among the installed keys".into());
        }
        let primary = decode_key_base64(&self.primary).map_err(|e| e.to_string())?;
        let others = self
            .keys
            .iter()
            .map(|k| decode_key_base64(k).map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Keyring::new(&primary, &others))
    }

    /// Newer: a higher version; at equal versions (two changes made at once
    /// on two nodes) the same one wins everywhere.
    fn supersedes(&self, other: &KeyringState) -> bool {
        (self.version, &self.primary, &self.keys) > (other.version, &other.primary, &other.keys)
    }

    /// The gossip value: the state as JSON.
    fn record(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().filter_map(|k| id_of(k)).collect()
    }

    fn primary_id(&self) -> Option<KeyId> {
        id_of(&self.primary)
    }

    fn find(&self, id: KeyId) -> Option<&String> {
        self.keys.iter().find(|k| id_of(k) == Some(id))
    }
}

fn encode(key: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(key)
}

fn id_of(encoded: &str) -> Option<KeyId> {
    decode_key_base64(encoded).ok().map(|k| KeyId::of(&k))
}

/// Why a keyring change was refused; each maps to one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    /// Not a base64 32-byte key or an 8-hex-digit id (400).
    #[error("{0}")]
    Bad(String),
    /// No such key installed (404).
    #[error("{0}")]
    Unknown(String),
    /// Not safe or not possible now (409).
    #[error("{0}")]
    Conflict(String),
    /// The data dir could not be written (500).
    #[error("{0}")]
    Io(String),
}

/// The node's keyring: the state, the sealing keyring the gossip transport
/// reads, and the file they are kept in.
#[derive(Debug)]
pub struct ClusterKeys {
    state: Mutex<KeyringState>,
    ring: SharedKeyring,
    path: PathBuf,
    changes: watch::Sender<KeyringState>,
}

impl ClusterKeys {
    /// The keyring of `data_dir`, or, on a node's first start, one holding
    /// the cluster's `gossip.key`. Once a node has a keyring, it takes
    /// precedence over `gossip.key` (which may be older than a rotation).
    pub fn load(data_dir: &Path, cluster_key: &[u8; 32]) -> Result<ClusterKeys, NodeError> {
        let path = data_dir.join(FILE);
        let saved: Option<KeyringState> = store::load(&path)?;
        let state = match saved {
            Some(state) => {
                if state.find(KeyId::of(cluster_key)).is_none() {
                    warn!(keyring = %path.display(),
                        "the cluster dir's gossip.key is not in this node's keyring; the keyring wins (add it with `weft keys install` if it is still in use)");
                }
                state
            }
            None => {
                let state = KeyringState::initial(cluster_key);
                store::save(&path, &state)?;
                state
            }
        };
        let ring = state.keyring().map_err(|e| {
            NodeError::Config(format!("{} is not a valid keyring: {e}", path.display()))
        })?;
        let (changes, _) = watch::channel(state.clone());
        Ok(ClusterKeys {
            state: Mutex::new(state),
            ring: Arc::new(arc_swap::ArcSwap::from_pointee(ring)),
            path,
            changes,
        })
    }

    /// The keyring the gossip transport seals and opens with.
    pub fn ring(&self) -> SharedKeyring {
        self.ring.clone()
    }

    /// The gossip value of the current state.
    pub fn record(&self) -> String {
        self.lock().record()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, KeyringState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Installs a base64 key (already installed: nothing changes).
    pub fn install(&self, key: &str) -> Result<KeyId, KeysError> {
        let raw = decode_key_base64(key).map_err(|e| KeysError::Bad(e.to_string()))?;
        let id = KeyId::of(&raw);
        let mut state = self.lock();
        if state.find(id).is_some() {
            return Ok(id);
        }
        if state.keys.len() >= MAX_KEYS {
            return Err(KeysError::Conflict(format!(
                "the keyring holds {MAX_KEYS} keys already; remove one first"
            )));
        }
        let mut next = state.clone();
        next.version += 1;
        next.keys.push(encode(&raw));
        self.apply(&mut state, next)?;
        info!(key = %id, "gossip key installed");
        Ok(id)
    }

    /// Makes an installed key the primary, once every live member holds it.
    pub fn use_primary(&self, key: &str, view: &ClusterView) -> Result<KeyId, KeysError> {
        let id = parse_key_or_id(key)?;
        let mut state = self.lock();
        let encoded = state.find(id).cloned().ok_or_else(|| not_installed(id))?;
        if state.primary == encoded {
            return Ok(id);
        }
        let missing: Vec<&str> = member_keyrings(view)
            .filter(|(_, ring)| ring.as_ref().is_none_or(|r| r.find(id).is_none()))
            .map(|(name, _)| name)
            .collect();
        if !missing.is_empty() {
            return Err(KeysError::Conflict(format!(
                "key {id} is not yet installed on {}; wait until `weft keys list` shows it on every member",
                missing.join(", ")
            )));
        }
        let mut next = state.clone();
        next.version += 1;
        next.primary = encoded;
        self.apply(&mut state, next)?;
        info!(key = %id, "gossip key is now the primary");
        Ok(id)
    }

    /// Removes a key no live member seals with any more.
    pub fn remove(&self, key: &str, view: &ClusterView) -> Result<KeyId, KeysError> {
        let id = parse_key_or_id(key)?;
        let mut state = self.lock();
        let encoded = state.find(id).cloned().ok_or_else(|| not_installed(id))?;
        if state.primary == encoded {
            return Err(KeysError::Conflict(format!(
                "key {id} is the primary; make another key the primary first (`weft keys use`)"
            )));
        }
        let sealing: Vec<&str> = member_keyrings(view)
            .filter(|(_, ring)| ring.as_ref().and_then(KeyringState::primary_id) == Some(id))
            .map(|(name, _)| name)
            .collect();
        if !sealing.is_empty() {
            return Err(KeysError::Conflict(format!(
                "{} still seal with key {id}; wait until `weft keys list` shows the new primary everywhere",
                sealing.join(", ")
            )));
        }
        let mut next = state.clone();
        next.version += 1;
        next.keys.retain(|k| *k != encoded);
        self.apply(&mut state, next)?;
        info!(key = %id, "gossip key removed");
        Ok(id)
    }

    /// Adopts the newest valid keyring among the live members' records.
    pub fn adopt_newest(&self, view: &ClusterView) {
        let newest = member_keyrings(view)
            .filter_map(|(_, ring)| ring)
            .filter(|ring| ring.keyring().is_ok())
            .reduce(|a, b| if b.supersedes(&a) { b } else { a });
        let Some(newest) = newest else { return };
        let mut state = self.lock();
        if !newest.supersedes(&state) {
            return;
        }
        let version = newest.version;
        match self.apply(&mut state, newest) {
            Ok(()) => info!(
                version,
                primary = %state.primary_id().map(|id| id.to_string()).unwrap_or_default(),
                keys = state.keys.len(),
                "adopted the cluster's keyring"
            ),
            Err(e) => warn!(error = %e, "could not adopt the cluster's keyring"),
        }
    }

    /// Persists `next`, swaps the sealing keyring and announces it.
    fn apply(&self, state: &mut KeyringState, next: KeyringState) -> Result<(), KeysError> {
        let ring = next.keyring().map_err(KeysError::Conflict)?;
        store::save(&self.path, &next).map_err(|e| KeysError::Io(e.to_string()))?;
        self.ring.store(Arc::new(ring));
        *state = next;
        self.changes.send_replace(state.clone());
        Ok(())
    }

    /// `GET /v1/keys`: every key any live member holds, with how many hold
    /// it and seal with it. Keys themselves are never shown, only ids.
    pub fn list(&self, view: &ClusterView) -> Value {
        let state = self.lock().clone();
        let members: Vec<(&str, Option<KeyringState>)> = member_keyrings(view).collect();
        let mut ids: Vec<KeyId> = state.ids();
        for ring in members.iter().filter_map(|(_, r)| r.as_ref()) {
            for id in ring.ids() {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        let count = |pred: &dyn Fn(&KeyringState) -> bool| {
            members
                .iter()
                .filter(|(_, r)| r.as_ref().is_some_and(pred))
                .count()
        };
        let keys: Vec<Value> = ids
            .iter()
            .map(|&id| {
                json!({
                    "id": id.to_string(),
                    "installed_here": state.find(id).is_some(),
                    "primary_here": state.primary_id() == Some(id),
                    "installed_on": count(&|r| r.find(id).is_some()),
                    "primary_on": count(&|r| r.primary_id() == Some(id)),
                })
            })
            .collect();
        json!({
            "version": state.version,
            "primary": state.primary_id().map(|id| id.to_string()),
            "members": members.len(),
            "keys": keys,
        })
    }

    /// Keeps gossip and the keyring in step: publishes every local change
    /// under the node's `keyring` key and adopts newer keyrings seen on
    /// live members.
    pub fn follow(
        self: Arc<Self>,
        mut views: watch::Receiver<Arc<ClusterView>>,
        writer: GossipWriter,
    ) {
        let mut changes = self.changes.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = views.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let view = views.borrow_and_update().clone();
                        self.adopt_newest(&view);
                    }
                    changed = changes.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let state = changes.borrow_and_update().clone();
                        writer.set(Key::Keyring, state.record());
                    }
                }
            }
        });
    }
}

/// Each live member's name and its gossiped keyring (`None`: not announced
/// or unreadable).
fn member_keyrings(view: &ClusterView) -> impl Iterator<Item = (&str, Option<KeyringState>)> {
    let key = Key::Keyring.encode();
    view.nodes.iter().filter(|n| n.live).map(move |node| {
        let ring = node
            .kv
            .get(&key)
            .and_then(|v| serde_json::from_str::<KeyringState>(v).ok());
        (node.name.as_str(), ring)
    })
}

fn parse_key_or_id(text: &str) -> Result<KeyId, KeysError> {
    if let Ok(id) = text.parse::<KeyId>() {
        return Ok(id);
    }
    decode_key_base64(text).map(|k| KeyId::of(&k)).map_err(|_| {
        KeysError::Bad(format!(
            "{:?} is neither a base64 32-byte key nor an 8-hex-digit key id",
            text.chars().take(16).collect::<String>()
        ))
    })
}

fn not_installed(id: KeyId) -> KeysError {
    KeysError::Unknown(format!("key {id} is not installed on this node"))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::time::Duration;

    use weft_gossip::view::NodeSnapshot;

    use super::*;

    const OLD: [u8; 32] = [1; 32];
    const NEW: [u8; 32] = [2; 32];

    fn member(name: &str, ring: Option<&KeyringState>) -> NodeSnapshot {
        let mut kv = BTreeMap::new();
        if let Some(ring) = ring {
            kv.insert("keyring".to_string(), serde_json::to_string(ring).unwrap());
        }
        NodeSnapshot {
            name: name.to_string(),
            generation: 1,
            gossip_addr: SocketAddr::from(([127, 0, 0, 1], 7946)),
            live: true,
            dead: false,
            last_heard: Duration::ZERO,
            kv: std::sync::Arc::new(kv.into()),
        }
    }

    fn view(members: Vec<NodeSnapshot>) -> ClusterView {
        ClusterView {
            self_name: "n1".into(),
            nodes: members,
            suspect_after: Duration::from_secs(1),
        }
    }

    fn keys_in(dir: &Path) -> ClusterKeys {
        ClusterKeys::load(dir, &OLD).unwrap()
    }

    #[test]
    fn rotation_is_refused_until_each_step_is_safe() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path());
        let new = encode(&NEW);
        keys.install(&new).unwrap();
        let installed = keys.lock().clone();
        assert_eq!(installed.version, 1);
        let behind = KeyringState::initial(&OLD);

        // n2 has not heard of the new key: making it primary would cut n2 off.
        let lagging = view(vec![
            member("n1", Some(&installed)),
            member("n2", Some(&behind)),
        ]);
        let err = keys.use_primary(&new, &lagging).unwrap_err();
        assert!(
            matches!(err, KeysError::Conflict(ref m) if m.contains("n2")),
            "{err}"
        );

        let everywhere = view(vec![
            member("n1", Some(&installed)),
            member("n2", Some(&installed)),
        ]);
        let id = keys
            .use_primary(&KeyId::of(&NEW).to_string(), &everywhere)
            .unwrap();
        assert_eq!(keys.ring().load().primary_id(), id);

        // n2 still seals with the old key: removing it would cut n2 off.
        let used = keys.lock().clone();
        let err = keys
            .remove(
                &encode(&OLD),
                &view(vec![
                    member("n1", Some(&used)),
                    member("n2", Some(&installed)),
                ]),
            )
            .unwrap_err();
        assert!(
            matches!(err, KeysError::Conflict(ref m) if m.contains("n2")),
            "{err}"
        );
        let err = keys.remove(&new, &everywhere).unwrap_err();
        assert!(
            matches!(err, KeysError::Conflict(ref m) if m.contains("primary")),
            "{err}"
        );

        let moved = view(vec![member("n1", Some(&used)), member("n2", Some(&used))]);
        keys.remove(&encode(&OLD), &moved).unwrap();
        assert_eq!(keys.ring().load().ids().count(), 1);
        assert!(matches!(
            keys.remove(&encode(&OLD), &moved),
            Err(KeysError::Unknown(_))
        ));

        // Persisted: a restart keeps the rotated keyring over gossip.key.
        let reloaded = keys_in(dir.path());
        assert_eq!(reloaded.ring().load().primary_id(), KeyId::of(&NEW));
        assert_eq!(reloaded.lock().version, 3);
    }

    #[test]
    fn the_newest_valid_keyring_on_a_live_member_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path());
        let mut newer = KeyringState::initial(&OLD);
        newer.version = 5;
        newer.keys.push(encode(&NEW));
        newer.primary = encode(&NEW);
        let mut broken = newer.clone();
        broken.version = 9;
        broken.primary = "not a key".into();
        let mut dead = member(
            "n4",
            Some(&{
                let mut s = newer.clone();
                s.version = 50;
                s
            }),
        );
        dead.live = false;
        keys.adopt_newest(&view(vec![
            member("n2", Some(&newer)),
            member("n3", Some(&broken)),
            dead,
        ]));
        assert_eq!(keys.lock().version, 5);
        assert_eq!(keys.ring().load().primary_id(), KeyId::of(&NEW));
        // An older keyring never replaces a newer one.
        keys.adopt_newest(&view(vec![member(
            "n2",
            Some(&KeyringState::initial(&OLD)),
        )]));
        assert_eq!(keys.lock().version, 5);
    }

    #[test]
    fn bad_input_is_a_clear_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path());
        assert!(matches!(keys.install("AAAA"), Err(KeysError::Bad(_))));
        assert!(matches!(
            keys.use_primary("nope", &view(vec![])),
            Err(KeysError::Bad(_))
        ));
        assert!(matches!(
            keys.use_primary("0badc0de", &view(vec![])),
            Err(KeysError::Unknown(_))
        ));
        for i in 2..=MAX_KEYS as u8 {
            keys.install(&encode(&[i; 32])).unwrap();
        }
        assert!(matches!(
            keys.install(&encode(&[99; 32])),
            Err(KeysError::Conflict(_))
        ));
        // Installing twice changes nothing.
        let version = keys.lock().version;
        keys.install(&encode(&[2; 32])).unwrap();
        assert_eq!(keys.lock().version, version);
        let listed = keys.list(&view(vec![]));
        assert_eq!(listed["keys"].as_array().unwrap().len(), MAX_KEYS);
        assert!(
            !listed.to_string().contains(&encode(&OLD)),
            "keys are never listed"
        );
    }
}
