//! The gossip keyring, cluster-wide (DESIGN section 6, Consul's model).
//!
//! Every node keeps the installed keys in its data dir (`keyring.json`,
//! mode 0600) and gossips what it holds under its own `keyring` key: the
//! version, the ids of its keys and of its primary, and the operator's
//! grant, never the keys themselves (every member reads gossip, a revoked
//! one included). A change anywhere (`weft keys install|use|remove` on any
//! node) bumps the keyring's version; every node adopts the highest granted
//! version it sees on a live member and republishes it, so the change
//! reaches every node and survives its author leaving. A key a node lacks
//! it fetches from that member over the tunnel, whose mTLS checks the
//! cluster CA and CRL: a revoked node gets no new key.
//! Datagrams open under any installed key and are sealed under the primary
//! ([`weft_gossip::seal::Keyring`]).
//!
//! Rotation is install, use, remove. The two steps that could cut a node
//! off are refused until they are safe: `use` until every live member holds
//! the key, `remove` until no live member seals with it.
//!
//! Only an operator changes the keyring: each version after the first
//! carries an operator's [`Grant`] over its version and the ids of its keys
//! (the CLI signs it where the operator's key lives). A node adopts a
//! peer's keyring only when its grant verifies and matches it, its version
//! is the next one or later (checked arithmetic), and it still opens what
//! this node seals: a member without an operator key cannot push a keyring.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;
use tracing::{info, warn};
use weft_gossip::grant::{self, Authority, Grant};
use weft_gossip::seal::{decode_key_base64, KeyId, Keyring, SharedKeyring};
use weft_gossip::{ClusterView, Key};
use weft_runtime::gossip_writer::GossipWriter;

use crate::{store, NodeError};

/// Most keys a keyring holds (rotation needs two).
pub const MAX_KEYS: usize = 8;
/// The keyring's file in the data dir.
const FILE: &str = "keyring.json";

/// The grant's object name of the keyring.
pub const OBJECT: &str = "keyring";

/// The keyring as persisted and gossiped: base64 keys, primary included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringState {
    /// Bumped by every change anywhere in the cluster; the highest wins.
    pub version: u64,
    /// The key datagrams are sealed under.
    pub primary: String,
    /// Every installed key.
    pub keys: Vec<String>,
    /// The operator's grant of this version (none for version 0, the
    /// cluster dir's `gossip.key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<Grant>,
}

/// One keyring change, as an operator asks for it and grants it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Add a key.
    Install(KeyId),
    /// Seal under an installed key.
    Use(KeyId),
    /// Drop a key.
    Remove(KeyId),
}

impl Change {
    /// The primary and key ids after this change to `primary` and `ids`.
    pub fn apply(self, primary: KeyId, ids: &[KeyId]) -> (KeyId, Vec<KeyId>) {
        let mut ids = ids.to_vec();
        match self {
            Change::Install(id) if !ids.contains(&id) => ids.push(id),
            Change::Install(_) => {}
            Change::Use(id) => return (id, ids),
            Change::Remove(id) => ids.retain(|k| *k != id),
        }
        (primary, ids)
    }
}

/// What a keyring grant covers: the primary's id and every key's id,
/// sorted (keys themselves never leave the nodes' keyrings).
pub fn digest(primary: KeyId, ids: &[KeyId]) -> String {
    let mut ids: Vec<String> = ids.iter().map(KeyId::to_string).collect();
    ids.sort();
    grant::digest(format!("primary={primary};keys={}", ids.join(",")).as_bytes())
}

impl KeyringState {
    fn initial(key: &[u8; 32]) -> KeyringState {
        let key = encode(key);
        KeyringState {
            version: 0,
            primary: key.clone(),
            keys: vec![key],
            grant: None,
        }
    }

    /// Whether `authority` grants this version as it is.
    fn granted(&self, authority: &dyn Authority) -> Result<String, String> {
        KeyringRecord::of(self).granted(authority)
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

    /// The gossip value: the version, ids and grant as JSON.
    fn record(&self) -> String {
        serde_json::to_string(&KeyringRecord::of(self)).unwrap_or_default()
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

/// What a node gossips of its keyring: ids, never keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KeyringRecord {
    version: u64,
    /// The primary's id.
    primary: String,
    /// Every installed key's id.
    keys: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    grant: Option<Grant>,
}

impl KeyringRecord {
    fn of(state: &KeyringState) -> KeyringRecord {
        KeyringRecord {
            version: state.version,
            primary: state
                .primary_id()
                .map(|id| id.to_string())
                .unwrap_or_default(),
            keys: state.ids().iter().map(KeyId::to_string).collect(),
            grant: state.grant.clone(),
        }
    }

    fn primary_id(&self) -> Option<KeyId> {
        self.primary.parse().ok()
    }

    fn ids(&self) -> Vec<KeyId> {
        self.keys.iter().filter_map(|k| k.parse().ok()).collect()
    }

    fn holds(&self, id: KeyId) -> bool {
        self.ids().contains(&id)
    }

    /// Whether `authority` grants this version as it is.
    fn granted(&self, authority: &dyn Authority) -> Result<String, String> {
        let grant = self.grant.as_ref().ok_or("it carries no operator grant")?;
        let primary = self.primary_id().ok_or("its primary is not a key id")?;
        if self.keys.len() > MAX_KEYS || !self.holds(primary) {
            return Err("it is not a valid keyring".into());
        }
        if !grant.covers(OBJECT, self.version, &digest(primary, &self.ids())) {
            return Err("its grant is for another keyring".into());
        }
        authority.verify(grant)
    }

    /// Newer than `state`: a higher version; at equal versions (two changes
    /// made at once on two nodes) the same one wins everywhere.
    fn supersedes(&self, state: &KeyringState) -> bool {
        let other = KeyringRecord::of(state);
        (self.version, &self.primary, &self.keys) > (other.version, &other.primary, &other.keys)
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
    /// No operator grant, or one that does not verify (403).
    #[error("{0}")]
    Forbidden(String),
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
    /// Who may grant changes; until set, nothing is granted.
    authority: OnceLock<Arc<dyn Authority>>,
    /// Keys fetched from members, for a keyring not yet adopted.
    material: Mutex<std::collections::HashMap<KeyId, [u8; 32]>>,
    /// Ungranted keyrings already reported, by member and version.
    refused: Mutex<Vec<(String, u64)>>,
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
            authority: OnceLock::new(),
            material: Mutex::new(std::collections::HashMap::new()),
            refused: Mutex::new(Vec::new()),
        })
    }

    /// Checks operator grants with `authority` from now on.
    pub fn trust_operators(&self, authority: Arc<dyn Authority>) {
        let _ = self.authority.set(authority);
    }

    /// The next version of `state`, changed by `change` as `grant` grants.
    fn granted_change(
        &self,
        state: &KeyringState,
        mut next: KeyringState,
        grant: Grant,
    ) -> Result<KeyringState, KeysError> {
        next.version = state.version.checked_add(1).ok_or_else(|| {
            KeysError::Conflict("the keyring's version cannot grow any further".into())
        })?;
        next.grant = Some(grant);
        let authority = self.authority.get().ok_or_else(|| {
            KeysError::Forbidden("this node checks no operator grants yet".into())
        })?;
        match next.granted(authority.as_ref()) {
            Ok(operator) => {
                info!(operator, version = next.version, "keyring change granted");
                Ok(next)
            }
            Err(e) if next.grant.as_ref().is_some_and(|g| g.version != next.version) => {
                Err(KeysError::Conflict(format!(
                    "the keyring moved to version {} since the grant was made ({e}); run the command again",
                    state.version
                )))
            }
            Err(e) => Err(KeysError::Forbidden(format!(
                "keyring changes need an operator's grant; this one is refused: {e}"
            ))),
        }
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
    pub fn install(&self, key: &str, grant: Grant) -> Result<KeyId, KeysError> {
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
        next.keys.push(encode(&raw));
        let next = self.granted_change(&state, next, grant)?;
        self.apply(&mut state, next)?;
        info!(key = %id, "gossip key installed");
        Ok(id)
    }

    /// Makes an installed key the primary, once every live member holds it.
    pub fn use_primary(
        &self,
        key: &str,
        view: &ClusterView,
        grant: Grant,
    ) -> Result<KeyId, KeysError> {
        let id = parse_key_or_id(key)?;
        let mut state = self.lock();
        let encoded = state.find(id).cloned().ok_or_else(|| not_installed(id))?;
        if state.primary == encoded {
            return Ok(id);
        }
        let missing: Vec<&str> = member_keyrings(view)
            .filter(|(_, ring)| ring.as_ref().is_none_or(|r| !r.holds(id)))
            .map(|(name, _)| name)
            .collect();
        if !missing.is_empty() {
            return Err(KeysError::Conflict(format!(
                "key {id} is not yet installed on {}; wait until `weft keys list` shows it on every member",
                missing.join(", ")
            )));
        }
        let mut next = state.clone();
        next.primary = encoded;
        let next = self.granted_change(&state, next, grant)?;
        self.apply(&mut state, next)?;
        info!(key = %id, "gossip key is now the primary");
        Ok(id)
    }

    /// Removes a key no live member seals with any more.
    pub fn remove(&self, key: &str, view: &ClusterView, grant: Grant) -> Result<KeyId, KeysError> {
        let id = parse_key_or_id(key)?;
        let mut state = self.lock();
        let encoded = state.find(id).cloned().ok_or_else(|| not_installed(id))?;
        if state.primary == encoded {
            return Err(KeysError::Conflict(format!(
                "key {id} is the primary; make another key the primary first (`weft keys use`)"
            )));
        }
        let sealing: Vec<&str> = member_keyrings(view)
            .filter(|(_, ring)| ring.as_ref().and_then(KeyringRecord::primary_id) == Some(id))
            .map(|(name, _)| name)
            .collect();
        if !sealing.is_empty() {
            return Err(KeysError::Conflict(format!(
                "{} still seal with key {id}; wait until `weft keys list` shows the new primary everywhere",
                sealing.join(", ")
            )));
        }
        let mut next = state.clone();
        next.keys.retain(|k| *k != encoded);
        let next = self.granted_change(&state, next, grant)?;
        self.apply(&mut state, next)?;
        info!(key = %id, "gossip key removed");
        Ok(id)
    }

    /// Adopts the newest keyring among the live members' records that is
    /// granted by an operator, newer than this node's, and still opens what
    /// this node seals (it holds this node's primary, or its own primary is
    /// a key this node holds): a keyring that would cut this node off is
    /// never taken. When it names keys this node lacks, nothing changes and
    /// the answer says which to fetch from whom.
    pub fn adopt_newest(&self, view: &ClusterView) -> Option<Fetch> {
        let authority = self.authority.get()?;
        let current = self.lock().clone();
        let (holder, newest) = member_keyrings(view)
            .filter_map(|(name, ring)| Some((name, ring?)))
            .filter(|(_, ring)| ring.supersedes(&current))
            .filter(|(_, ring)| {
                let primary = current.primary_id();
                primary.is_some_and(|p| ring.holds(p))
                    || ring.primary_id().is_some_and(|p| current.find(p).is_some())
            })
            .filter(|(name, ring)| match ring.granted(authority.as_ref()) {
                Ok(_) => true,
                Err(e) => {
                    self.refused(name, ring, &e);
                    false
                }
            })
            .reduce(|a, b| if b.1.version > a.1.version { b } else { a })?;
        let material = self.material.lock().unwrap_or_else(PoisonError::into_inner);
        let key_of = |id: KeyId| {
            current
                .find(id)
                .cloned()
                .or_else(|| material.get(&id).map(encode))
        };
        let missing: Vec<KeyId> = newest
            .ids()
            .into_iter()
            .filter(|id| key_of(*id).is_none())
            .collect();
        if !missing.is_empty() {
            return Some(Fetch {
                from: holder.to_string(),
                missing,
            });
        }
        let next = KeyringState {
            version: newest.version,
            primary: key_of(newest.primary_id()?)?,
            keys: newest.ids().into_iter().filter_map(key_of).collect(),
            grant: newest.grant.clone(),
        };
        drop(material);
        let mut state = self.lock();
        if *state != current {
            return None;
        }
        let version = next.version;
        match self.apply(&mut state, next) {
            Ok(()) => info!(
                version,
                primary = %state.primary_id().map(|id| id.to_string()).unwrap_or_default(),
                keys = state.keys.len(),
                "adopted the cluster's keyring"
            ),
            Err(e) => warn!(error = %e, "could not adopt the cluster's keyring"),
        }
        None
    }

    /// Logs and counts (once per member and version) a keyring that a
    /// member gossips and no operator granted
    /// (`weft_gossip_rejected_total{reason="ungranted_keyring"}`).
    fn refused(&self, member: &str, ring: &KeyringRecord, why: &str) {
        let mut seen = self.refused.lock().unwrap_or_else(PoisonError::into_inner);
        let this = (member.to_string(), ring.version);
        if seen.contains(&this) {
            return;
        }
        if seen.len() >= 64 {
            seen.clear();
        }
        seen.push(this);
        metrics::counter!("weft_gossip_rejected_total", "reason" => "ungranted_keyring")
            .increment(1);
        warn!(
            member,
            version = ring.version,
            reason = why,
            "a member gossips a keyring no operator granted; not adopted"
        );
    }

    /// Keeps a key fetched from a member for the next adoption, if it is
    /// the key `id` names.
    fn learn(&self, id: KeyId, key: &[u8]) -> bool {
        let Ok(key) = <[u8; 32]>::try_from(key) else {
            return false;
        };
        if KeyId::of(&key) != id {
            return false;
        }
        let mut material = self.material.lock().unwrap_or_else(PoisonError::into_inner);
        if material.len() < MAX_KEYS {
            material.insert(id, key);
        }
        true
    }

    /// The key installed here under `id` (what a member may fetch over the
    /// tunnel).
    pub fn secret(&self, id: KeyId) -> Option<[u8; 32]> {
        let encoded = self.lock().find(id).cloned()?;
        decode_key_base64(&encoded).ok()
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
        let members: Vec<(&str, Option<KeyringRecord>)> = member_keyrings(view).collect();
        let mut ids: Vec<KeyId> = state.ids();
        for ring in members.iter().filter_map(|(_, r)| r.as_ref()) {
            for id in ring.ids() {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        let count = |pred: &dyn Fn(&KeyringRecord) -> bool| {
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
                    "installed_on": count(&|r| r.holds(id)),
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
    /// under the node's `keyring` key, adopts newer keyrings seen on live
    /// members, and fetches with `fetch` the keys they name that this node
    /// lacks.
    pub fn follow(
        self: Arc<Self>,
        mut views: watch::Receiver<Arc<ClusterView>>,
        writer: GossipWriter,
        fetch: KeyFetcher,
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
                        if let Some(needed) = self.adopt_newest(&view) {
                            self.fetch_missing(needed, &fetch).await;
                            self.adopt_newest(&view);
                        }
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

    async fn fetch_missing(&self, needed: Fetch, fetch: &KeyFetcher) {
        for id in needed.missing {
            match fetch(needed.from.clone(), id).await {
                Ok(key) if self.learn(id, &key) => {
                    info!(key = %id, from = needed.from, "fetched a gossip key over the tunnel");
                }
                Ok(_) => {
                    warn!(key = %id, from = needed.from, "a member sent a key that is not the one asked for")
                }
                Err(e) => {
                    warn!(key = %id, from = needed.from, error = %e, "could not fetch a gossip key")
                }
            }
        }
    }
}

impl weft_runtime::dataplane::keys::KeyVault for ClusterKeys {
    fn secret(&self, id: &str) -> Option<Vec<u8>> {
        ClusterKeys::secret(self, id.parse().ok()?).map(|k| k.to_vec())
    }
}

/// Keys a newer keyring names that this node lacks, and a live member
/// holding them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetch {
    /// The member whose keyring names them.
    pub from: String,
    /// Their ids.
    pub missing: Vec<KeyId>,
}

/// Fetches a key by id from a member (over the tunnel, in the node).
pub type KeyFetcher = Arc<
    dyn Fn(
            String,
            KeyId,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<u8>, String>> + Send>>
        + Send
        + Sync,
>;

/// Each live member's name and its gossiped keyring (`None`: not announced
/// or unreadable).
fn member_keyrings(view: &ClusterView) -> impl Iterator<Item = (&str, Option<KeyringRecord>)> {
    let key = Key::Keyring.encode();
    view.nodes.iter().filter(|n| n.live).map(move |node| {
        let ring = node
            .kv
            .get(&key)
            .and_then(|v| serde_json::from_str::<KeyringRecord>(v).ok());
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
            kv.insert("keyring".to_string(), ring.record());
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

    /// Grants signed by "the operator": a stand-in for the certificate
    /// check (`tls::OperatorAuthority`, tested with real certificates).
    #[derive(Debug)]
    struct TestOperators;

    fn stamp(object: &str, version: u64, digest: &str) -> String {
        format!("{object}/{version}/{digest}")
    }

    impl Authority for TestOperators {
        fn verify(&self, g: &Grant) -> Result<String, String> {
            let signed = g.cert == "operator" && g.sig == stamp(&g.object, g.version, &g.digest);
            signed.then(|| "ops".to_string()).ok_or("forged".into())
        }
    }

    fn operator_grant(version: u64, digest: String) -> Grant {
        Grant {
            object: OBJECT.into(),
            version,
            sig: stamp(OBJECT, version, &digest),
            digest,
            cert: "operator".into(),
        }
    }

    /// The operator's grant of `change` to what `keys` holds now.
    fn grant(keys: &ClusterKeys, change: Change) -> Grant {
        let state = keys.lock().clone();
        let (primary, ids) = change.apply(state.primary_id().unwrap(), &state.ids());
        operator_grant(state.version + 1, digest(primary, &ids))
    }

    /// `state` as an operator granted it.
    fn granted(mut state: KeyringState) -> KeyringState {
        let digest = digest(state.primary_id().unwrap(), &state.ids());
        state.grant = Some(operator_grant(state.version, digest));
        state
    }

    fn keys_in(dir: &Path) -> ClusterKeys {
        let keys = ClusterKeys::load(dir, &OLD).unwrap();
        keys.trust_operators(Arc::new(TestOperators));
        keys
    }

    #[test]
    fn rotation_is_refused_until_each_step_is_safe() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path());
        let new = encode(&NEW);
        let (old_id, new_id) = (KeyId::of(&OLD), KeyId::of(&NEW));
        keys.install(&new, grant(&keys, Change::Install(new_id)))
            .unwrap();
        let installed = keys.lock().clone();
        assert_eq!(installed.version, 1);
        let behind = KeyringState::initial(&OLD);

        // n2 has not heard of the new key: making it primary would cut n2 off.
        let lagging = view(vec![
            member("n1", Some(&installed)),
            member("n2", Some(&behind)),
        ]);
        let err = keys
            .use_primary(&new, &lagging, grant(&keys, Change::Use(new_id)))
            .unwrap_err();
        assert!(
            matches!(err, KeysError::Conflict(ref m) if m.contains("n2")),
            "{err}"
        );

        let everywhere = view(vec![
            member("n1", Some(&installed)),
            member("n2", Some(&installed)),
        ]);
        let id = keys
            .use_primary(
                &new_id.to_string(),
                &everywhere,
                grant(&keys, Change::Use(new_id)),
            )
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
                grant(&keys, Change::Remove(old_id)),
            )
            .unwrap_err();
        assert!(
            matches!(err, KeysError::Conflict(ref m) if m.contains("n2")),
            "{err}"
        );
        let err = keys
            .remove(&new, &everywhere, grant(&keys, Change::Remove(new_id)))
            .unwrap_err();
        assert!(
            matches!(err, KeysError::Conflict(ref m) if m.contains("primary")),
            "{err}"
        );

        let moved = view(vec![member("n1", Some(&used)), member("n2", Some(&used))]);
        keys.remove(&encode(&OLD), &moved, grant(&keys, Change::Remove(old_id)))
            .unwrap();
        assert_eq!(keys.ring().load().ids().count(), 1);
        assert!(matches!(
            keys.remove(&encode(&OLD), &moved, grant(&keys, Change::Remove(old_id))),
            Err(KeysError::Unknown(_))
        ));

        // Persisted: a restart keeps the rotated keyring over gossip.key.
        let reloaded = keys_in(dir.path());
        assert_eq!(reloaded.ring().load().primary_id(), KeyId::of(&NEW));
        assert_eq!(reloaded.lock().version, 3);
    }

    #[test]
    fn the_newest_granted_keyring_on_a_live_member_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path());
        let mut newer = KeyringState::initial(&OLD);
        newer.version = 5;
        newer.keys.push(encode(&NEW));
        newer.primary = encode(&NEW);
        let newer = granted(newer);
        let mut broken = newer.clone();
        broken.version = 9;
        broken.primary = "not a key".into();
        // A member without an operator key: the highest version there is.
        let mut forged = newer.clone();
        forged.version = u64::MAX;
        let mut dead = member(
            "n4",
            Some(&granted(KeyringState {
                version: 50,
                ..newer.clone()
            })),
        );
        dead.live = false;
        let members = view(vec![
            member("n2", Some(&newer)),
            member("n3", Some(&broken)),
            member("evil", Some(&forged)),
            dead,
        ]);
        // Gossip names the new key; its material comes from n2 (over the
        // tunnel, in the node), and only the key that id names is taken.
        let fetch = keys.adopt_newest(&members).expect("a key to fetch");
        assert_eq!(fetch.from, "n2");
        assert_eq!(fetch.missing, vec![KeyId::of(&NEW)]);
        assert!(!keys.learn(KeyId::of(&NEW), &[9; 32]));
        assert_eq!(keys.lock().version, 0);
        assert!(keys.learn(KeyId::of(&NEW), &NEW));
        assert_eq!(keys.adopt_newest(&members), None);
        assert_eq!(keys.lock().version, 5);
        assert!(
            !keys.record().contains(&encode(&NEW)),
            "gossip carries ids, never keys"
        );
        assert_eq!(keys.ring().load().primary_id(), KeyId::of(&NEW));
        // An older keyring never replaces a newer one.
        keys.adopt_newest(&view(vec![member(
            "n2",
            Some(&KeyringState::initial(&OLD)),
        )]));
        assert_eq!(keys.lock().version, 5);
        // A granted keyring that drops the key this node seals with, for
        // one it does not hold, would cut it off: not adopted.
        let mut elsewhere = KeyringState::initial(&[7; 32]);
        elsewhere.version = 6;
        keys.adopt_newest(&view(vec![member("n2", Some(&granted(elsewhere)))]));
        assert_eq!(keys.lock().version, 5);
    }

    #[test]
    fn only_an_operator_changes_the_keyring() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path());
        let new_id = KeyId::of(&NEW);
        let mut forged = grant(&keys, Change::Install(new_id));
        forged.cert = "evil".into();
        assert!(matches!(
            keys.install(&encode(&NEW), forged),
            Err(KeysError::Forbidden(_))
        ));
        // A grant for another change (here: another key) does not cover it.
        let other = grant(&keys, Change::Install(KeyId::of(&[9; 32])));
        assert!(keys.install(&encode(&NEW), other).is_err());
        // A grant made before the keyring moved says so.
        let stale = grant(&keys, Change::Install(new_id));
        keys.install(
            &encode(&[9; 32]),
            grant(&keys, Change::Install(KeyId::of(&[9; 32]))),
        )
        .unwrap();
        assert!(matches!(
            keys.install(&encode(&NEW), stale),
            Err(KeysError::Conflict(ref m)) if m.contains("run the command again")
        ));
        assert_eq!(keys.lock().version, 1);
    }

    #[test]
    fn bad_input_is_a_clear_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let keys = keys_in(dir.path());
        let any = || operator_grant(1, String::new());
        assert!(matches!(
            keys.install("AAAA", any()),
            Err(KeysError::Bad(_))
        ));
        assert!(matches!(
            keys.use_primary("nope", &view(vec![]), any()),
            Err(KeysError::Bad(_))
        ));
        assert!(matches!(
            keys.use_primary("0badc0de", &view(vec![]), any()),
            Err(KeysError::Unknown(_))
        ));
        for i in 2..=MAX_KEYS as u8 {
            let id = KeyId::of(&[i; 32]);
            keys.install(&encode(&[i; 32]), grant(&keys, Change::Install(id)))
                .unwrap();
        }
        assert!(matches!(
            keys.install(&encode(&[99; 32]), any()),
            Err(KeysError::Conflict(_))
        ));
        // Installing twice changes nothing.
        let version = keys.lock().version;
        keys.install(&encode(&[2; 32]), any()).unwrap();
        assert_eq!(keys.lock().version, version);
        let listed = keys.list(&view(vec![]));
        assert_eq!(listed["keys"].as_array().unwrap().len(), MAX_KEYS);
        assert!(
            !listed.to_string().contains(&encode(&OLD)),
            "keys are never listed"
        );
    }
}
