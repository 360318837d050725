//! The revocation list, cluster-wide: a list the cluster CA signed travels
//! by gossip, so cutting a node out takes one command on one node, not a
//! visit to every host.
//!
//! Each node publishes the list it uses under its `crl` key (DER, base64).
//! A node adopts a member's list when it revokes more (lists made by `weft
//! cert revoke` only grow), is signed by the cluster CA and does not revoke
//! this node's own certificate; it keeps the list in its data dir
//! (`crl.pem`), reloads its tunnel trust (closing the tunnels of peers it
//! revokes) and publishes it in turn. `PUT /v1/crl` (`weft cert publish-crl
//! FILE`) hands a node a new list the same way. A forged list fails the CA's
//! signature check; the node states of revoked nodes stop being believed
//! (`weft_gossip::attest`), so they leave every view.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use base64::Engine as _;
use tokio::sync::{watch, Notify};
use weft_gossip::{ClusterView, Key};
use weft_runtime::gossip_writer::GossipWriter;
use weft_runtime::tls;

/// The adopted list's file in the data dir.
pub const FILE: &str = "crl.pem";

/// Unusable lists remembered (so each is parsed and logged once), at most.
const MAX_REFUSED: usize = 64;

/// Checks that a candidate list (a PEM file) can be used by this node.
pub type Check = Arc<dyn Fn(&Path) -> Result<(), String> + Send + Sync>;

/// This node's revocation list and how it moves.
pub struct Crls {
    data_dir: PathBuf,
    check: Check,
    /// The list in use.
    current: Mutex<Option<List>>,
    /// Told when the list in use changed: the node reloads its trust.
    changed: Arc<Notify>,
    published: watch::Sender<Option<Vec<u8>>>,
}

impl std::fmt::Debug for Crls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Crls")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// A revocation list and the serials it revokes.
#[derive(Debug, Clone)]
struct List {
    der: Vec<u8>,
    serials: Vec<Vec<u8>>,
}

impl List {
    /// The first list in `pem`.
    fn of_pem(pem: &[u8]) -> Result<List, String> {
        let der = tls::crls_of_pem(pem)
            .map_err(|e| e.to_string())?
            .into_iter()
            .next()
            .ok_or("no PEM revocation list (X509 CRL)")?;
        let serials = tls::crl_serials(&der).map_err(|e| e.to_string())?;
        Ok(List { der, serials })
    }

    /// Whether it revokes all `other` does, and more (lists made by `weft
    /// cert revoke` only grow).
    fn extends(&self, other: Option<&List>) -> bool {
        let known: &[Vec<u8>] = other.map_or(&[], |l| &l.serials);
        self.serials.len() > known.len() && known.iter().all(|s| self.serials.contains(s))
    }
}

/// The list `path` holds, if any.
fn read(path: &Path) -> Option<List> {
    List::of_pem(&std::fs::read(path).ok()?).ok()
}

/// The list a node starts with: its `--crl` file or the one it adopted,
/// whichever revokes more.
pub fn effective(configured: Option<&Path>, data_dir: &Path) -> Option<PathBuf> {
    let adopted = data_dir.join(FILE);
    let count = |p: &Path| read(p).map_or(0, |l| l.serials.len());
    match configured {
        Some(c) if !adopted.exists() || count(c) >= count(&adopted) => Some(c.to_path_buf()),
        _ if adopted.exists() => Some(adopted),
        _ => None,
    }
}

impl Crls {
    /// The list in `in_use` (if any); `check` says whether a new list is
    /// usable.
    pub fn new(data_dir: &Path, in_use: Option<&Path>, check: Check) -> Crls {
        let current = in_use.and_then(read);
        let (published, _) = watch::channel(current.as_ref().map(|l| l.der.clone()));
        Crls {
            data_dir: data_dir.to_path_buf(),
            check,
            current: Mutex::new(current),
            changed: Arc::new(Notify::new()),
            published,
        }
    }

    /// Takes the list in `path` (reloaded on SIGHUP) as the one in use when
    /// it revokes more, and publishes it.
    pub fn reloaded(&self, path: Option<&Path>) {
        let Some(list) = path.and_then(read) else {
            return;
        };
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if list.extends(current.as_ref()) {
            self.published.send_replace(Some(list.der.clone()));
            *current = Some(list);
        }
    }

    /// Wakes when the list in use changed.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    /// Offers a list (PEM): adopted when it revokes more than the one in
    /// use and this node can use it. `Ok(false)`: not newer, nothing done.
    pub fn offer(&self, pem: &[u8]) -> Result<bool, String> {
        let list = List::of_pem(pem)?;
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if !list.extends(current.as_ref()) {
            return Ok(false);
        }
        let text = tls::crl_pem(&list.der);
        let candidate = self.data_dir.join(".crl-candidate.pem");
        tls::write_atomic(&candidate, text.as_bytes(), 0o644).map_err(|e| e.to_string())?;
        let checked = (self.check)(&candidate);
        let _ = std::fs::remove_file(&candidate);
        checked?;
        let path = self.data_dir.join(FILE);
        tls::write_atomic(&path, text.as_bytes(), 0o644).map_err(|e| e.to_string())?;
        tracing::warn!(
            revoked = list.serials.len(),
            "adopted a newer revocation list; reloading tunnel trust"
        );
        self.published.send_replace(Some(list.der.clone()));
        *current = Some(list);
        self.changed.notify_one();
        Ok(true)
    }

    /// Publishes the list in use under this node's `crl` key, and adopts
    /// newer lists that live members publish.
    pub fn follow(self: Arc<Self>, views: watch::Receiver<Arc<ClusterView>>, writer: GossipWriter) {
        use base64::engine::general_purpose::STANDARD as B64;
        let mut published = self.published.subscribe();
        if let Some(der) = published.borrow_and_update().clone() {
            writer.set(Key::Crl, B64.encode(der));
        }
        let ours = self.published.subscribe();
        let mut refused: Vec<String> = Vec::new();
        let adopt = move |view: &ClusterView| {
            // Most members publish the list this node uses: only another
            // one is worth parsing.
            let ours = ours.borrow().as_ref().map(|der| B64.encode(der));
            for offered in member_lists(view) {
                if Some(&offered) == ours.as_ref() || refused.contains(&offered) {
                    continue;
                }
                let Ok(der) = B64.decode(&offered) else {
                    continue;
                };
                if let Err(e) = self.offer(tls::crl_pem(&der).as_bytes()) {
                    tracing::warn!(error = %e, "a member publishes a revocation list this node cannot use");
                    if refused.len() >= MAX_REFUSED {
                        refused.clear();
                    }
                    refused.push(offered);
                }
            }
        };
        let offer = move |der: &Option<Vec<u8>>| {
            if let Some(der) = der {
                writer.set(Key::Crl, B64.encode(der));
            }
        };
        crate::follow::views_and_changes(views, published, adopt, offer);
    }
}

/// The lists live members publish (base64 DER), one of each.
fn member_lists(view: &ClusterView) -> Vec<String> {
    let key = Key::Crl.encode();
    let mut lists: Vec<String> = view
        .nodes
        .iter()
        .filter(|n| n.live)
        .filter_map(|n| n.kv.get(&key).cloned())
        .collect();
    lists.sort();
    lists.dedup();
    lists
}
