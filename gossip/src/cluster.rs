//! Starts chitchat with weft's settings and turns its state into [`ClusterView`]s.
//!
//! The node writes only its own keys, through [`Cluster::set`] and
//! [`Cluster::delete`]. A refresher task rebuilds the view whenever chitchat's
//! live set or versions move, when a node's liveness or suspicion moves
//! (checked every gossip interval), and at least once a second so that
//! "last heard" ages stay current.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::Transport;
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, Heartbeat,
    ProtocolVersion,
};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::attest::{self, Attestor, Incarnation, Rejections, StateCheck};
use crate::keys::{validate_value, Key};
use crate::view::{ClusterView, NodeKeys, NodeSnapshot};
use crate::GossipError;

/// Dead nodes are forgotten after this long (DESIGN section 6).
pub const DEAD_NODE_GRACE: Duration = Duration::from_secs(15 * 60);
/// Tombstones of deleted keys are kept this long.
pub const TOMBSTONE_GRACE: Duration = Duration::from_secs(60 * 60);
/// phi accrual threshold.
pub const PHI_THRESHOLD: f64 = 8.0;
/// Heartbeat intervals kept per peer for phi accrual. chitchat's phi is
/// the time since the last heartbeat over the mean interval, so the window
/// only sets how long a history that mean covers: 100 intervals is 25-50 s
/// at 250 ms rounds. Every node keeps one window per peer, 8 bytes an
/// interval: at 1,000 nodes, 1,000 intervals were 8 KB per peer and 8 GB
/// across a one-process harness, 100 are 0.8 KB.
pub const SAMPLING_WINDOW: usize = 100;

/// What a node needs to join the cluster.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Unique node name.
    pub node_name: String,
    /// Incarnation: the start time in ms, so a restarted node is new.
    pub generation: u64,
    /// Local UDP address to bind.
    pub listen_addr: SocketAddr,
    /// Address other nodes use to reach this one.
    pub advertise_addr: SocketAddr,
    /// Seed addresses (`host:port`).
    pub seeds: Vec<String>,
    /// Gossip round period.
    pub interval: Duration,
    /// Nodes with another cluster id ignore each other.
    pub cluster_id: String,
    /// Signs this node's state and checks every other node's
    /// ([`crate::attest`]); `None` believes every member about every node
    /// (the scale harness and tests of the gossip layer alone).
    pub attestor: Option<Arc<dyn Attestor>>,
}

impl ClusterConfig {
    /// chitchat's configuration, every field set on purpose.
    fn chitchat_config(&self) -> ChitchatConfig {
        ChitchatConfig {
            chitchat_id: ChitchatId::new(
                self.node_name.as_str(),
                self.generation,
                self.advertise_addr,
            ),
            cluster_id: self.cluster_id.clone(),
            gossip_interval: self.interval,
            listen_addr: self.listen_addr,
            seed_nodes: self.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                phi_threshold: PHI_THRESHOLD,
                sampling_window_size: SAMPLING_WINDOW,
                // A heartbeat gap longer than this is not a sample (a paused node).
                max_interval: Duration::from_secs(10),
                // New peers start with the real interval, not a 5 s guess.
                initial_interval: self.interval,
                dead_node_grace_period: DEAD_NODE_GRACE,
            },
            marked_for_deletion_grace_period: TOMBSTONE_GRACE,
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: ProtocolVersion::V1,
        }
    }
}

/// A running gossip membership.
pub struct Cluster {
    handle: ChitchatHandle,
    views: watch::Receiver<Arc<ClusterView>>,
    refresher: JoinHandle<()>,
    /// Wakes the refresher when this node wrote its own keys, so its own
    /// view has them before any peer can (a peer may route to a new
    /// instance as soon as gossip brings it, and this node checks its own
    /// catalog before serving it).
    own_change: Arc<Notify>,
    interval: Duration,
    attestor: Option<Arc<dyn Attestor>>,
    rejections: Arc<Rejections>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.handle.chitchat_id())
            .finish()
    }
}

impl Cluster {
    /// Binds the gossip socket and starts chitchat with the node's initial keys.
    pub async fn start(
        config: &ClusterConfig,
        initial: Vec<(Key, String)>,
        transport: &dyn Transport,
    ) -> Result<Self, GossipError> {
        let mut kvs = Vec::with_capacity(initial.len() + 1);
        for (key, value) in initial {
            validate_value(&value)?;
            kvs.push((key.encode(), value));
        }
        if let Some(attestor) = &config.attestor {
            kvs.push((
                Key::Cert.encode(),
                attest::certificate_value(attestor.as_ref()),
            ));
        }
        let handle = spawn_chitchat(config.chitchat_config(), kvs, transport)
            .await
            .map_err(|e| GossipError::Start(format!("{e:#}")))?;
        let attestor = config.attestor.clone();
        if let Some(attestor) = &attestor {
            handle
                .with_chitchat(|c| sign_own_state(c, attestor.as_ref()))
                .await;
        }
        let rejections = Arc::new(Rejections::default());
        let (tx, views) = watch::channel(Arc::new(ClusterView::default()));
        let chitchat = handle.chitchat();
        let interval = config.interval;
        let own_change = Arc::new(Notify::new());
        let mut refresher = Refresher::new(interval, config.node_name.clone());
        if let Some(attestor) = &attestor {
            refresher.check = Some(StateCheck::new(attestor.clone(), rejections.clone()));
        }
        let refresher = tokio::spawn(refresh_views(chitchat, tx, refresher, own_change.clone()));
        Ok(Cluster {
            handle,
            views,
            refresher,
            own_change,
            interval,
            attestor,
            rejections,
        })
    }

    /// Node states not believed, by reason (zeros included).
    pub fn rejections(&self) -> Arc<Rejections> {
        self.rejections.clone()
    }

    /// Writes one of this node's keys.
    pub async fn set(&self, key: &Key, value: &str) -> Result<(), GossipError> {
        validate_value(value)?;
        let key = key.encode();
        let attestor = self.attestor.as_deref();
        self.handle
            .with_chitchat(|c| {
                c.self_node_state().set(&key, value);
                if let Some(attestor) = attestor {
                    sign_own_state(c, attestor);
                }
            })
            .await;
        self.own_change.notify_one();
        Ok(())
    }

    /// Deletes one of this node's keys (peers learn it by diffing, not by event).
    pub async fn delete(&self, key: &Key) {
        let key = key.encode();
        let attestor = self.attestor.as_deref();
        self.handle
            .with_chitchat(|c| {
                if c.self_node_state().get(&key).is_some() {
                    c.self_node_state().delete(&key);
                    if let Some(attestor) = attestor {
                        sign_own_state(c, attestor);
                    }
                }
            })
            .await;
        self.own_change.notify_one();
    }

    /// This node's own keys that start with `prefix`.
    pub async fn own_keys(&self, prefix: &str) -> Vec<String> {
        self.handle
            .with_chitchat(|c| {
                c.self_node_state()
                    .key_values()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, _)| k.to_string())
                    .collect()
            })
            .await
    }

    /// What gossip ignored of its peers' word, by reason (the
    /// `weft_gossip_rejected_total` label): `claims_about_self`, a peer
    /// speaking of this node itself (its own id, or a newer incarnation of
    /// its name: only this node writes its own state), and
    /// `nodes_over_cap`, nodes not taken in past chitchat's cap.
    pub async fn ignored(&self) -> [(&'static str, u64); 2] {
        self.handle
            .with_chitchat(|c| {
                [
                    ("claims_about_self", c.claims_about_self_ignored()),
                    ("nodes_over_cap", c.nodes_over_cap()),
                ]
            })
            .await
    }

    /// A stream of fresh views.
    pub fn views(&self) -> watch::Receiver<Arc<ClusterView>> {
        self.views.clone()
    }

    /// The gossip round period.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// Resolves when chitchat's gossip task ends, with its error if it failed.
    pub fn terminated(&self) -> impl std::future::Future<Output = Result<(), GossipError>> {
        let watcher = self.handle.termination_watcher();
        async move {
            watcher
                .await
                .map_err(|e| GossipError::Stopped(format!("{e:#}")))
        }
    }

    /// Stops gossiping.
    pub async fn shutdown(self) {
        self.refresher.abort();
        let _ = self.handle.shutdown().await;
    }
}

/// Writes this node's `sig` over its current keys: its newest version, so
/// whoever holds it holds every key it covers.
fn sign_own_state(chitchat: &mut chitchat::Chitchat, attestor: &dyn Attestor) {
    let id = chitchat.self_chitchat_id().clone();
    let sig = attest::sign(
        attestor,
        Incarnation::of(&id),
        chitchat.self_node_state().key_values(),
    );
    chitchat.self_node_state().set(Key::Sig.encode(), sig);
}

/// `id`'s keys: the cached copy while its max version has not moved, else
/// a fresh one (cached for the next views).
fn current_keys(
    cache: &mut HashMap<ChitchatId, (u64, Arc<NodeKeys>)>,
    id: &ChitchatId,
    state: &chitchat::NodeState,
) -> Arc<NodeKeys> {
    let version = state.max_version();
    if let Some((seen, kv)) = cache.get(id) {
        if *seen == version {
            return Arc::clone(kv);
        }
    }
    let kv: Arc<NodeKeys> = Arc::new(
        state
            .key_values()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    );
    cache.insert(id.clone(), (version, Arc::clone(&kv)));
    kv
}

/// A view is republished at least this often at rest, so "last heard"
/// ages in the members list stay current.
const VIEW_REFRESH: Duration = Duration::from_secs(1);

/// Rebuilds the view on every chitchat change (live set or versions) or
/// write of this node's own keys and,
/// at each gossip interval, when a node's liveness or suspicion moved or
/// [`VIEW_REFRESH`] has passed. At rest that is once a second, not every
/// interval: each view costs every consumer a catalog derivation.
async fn refresh_views(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    tx: watch::Sender<Arc<ClusterView>>,
    mut refresher: Refresher,
    own_change: Arc<Notify>,
) {
    let interval = refresher.interval;
    let mut changes = chitchat.lock().await.live_nodes_changes();
    let mut chitchat_moved = true;
    loop {
        let view = {
            let guard = chitchat.lock().await;
            refresher.next_view(&guard, Instant::now(), chitchat_moved)
        };
        if let Some(view) = view {
            if tx.send(Arc::new(view)).is_err() {
                return;
            }
        }
        chitchat_moved = tokio::select! {
            changed = changes.changed() => if changed.is_err() { return } else { true },
            _ = own_change.notified() => true,
            _ = tokio::time::sleep(interval) => false,
        };
    }
}

/// What the refresher remembers between views.
struct Refresher {
    self_name: String,
    interval: Duration,
    /// Which of each peer's keys to believe; `None` believes all.
    check: Option<StateCheck>,
    /// Four silent rounds make a live node suspect; phi 8 declares it dead later.
    suspect_after: Duration,
    /// When each node's heartbeat last moved.
    heard: HashMap<ChitchatId, (Heartbeat, Instant)>,
    /// Each node's keys as of its max version: copied again only when it moved.
    keys: HashMap<ChitchatId, (u64, Arc<NodeKeys>)>,
    /// What the last view said of every node, hashed.
    last_signature: u64,
    last_published: Option<Instant>,
}

impl Refresher {
    fn new(interval: Duration, self_name: String) -> Self {
        Refresher {
            self_name,
            interval,
            check: None,
            suspect_after: interval * 4,
            heard: HashMap::new(),
            keys: HashMap::new(),
            last_signature: 0,
            last_published: None,
        }
    }

    /// The next view, or `None` when nothing a consumer acts on moved
    /// since the last one (and it is younger than [`VIEW_REFRESH`]).
    fn next_view(
        &mut self,
        chitchat: &chitchat::Chitchat,
        now: Instant,
        chitchat_moved: bool,
    ) -> Option<ClusterView> {
        let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
        let dead: HashSet<&ChitchatId> = chitchat.dead_nodes().collect();
        let signature = self.signature(chitchat, &live, &dead, now);
        let fresh = self
            .last_published
            .is_some_and(|at| now.duration_since(at) < VIEW_REFRESH);
        if !chitchat_moved && fresh && signature == self.last_signature {
            return None;
        }
        self.last_signature = signature;
        self.last_published = Some(now);
        let own = chitchat.self_chitchat_id();
        let mut nodes = Vec::with_capacity(chitchat.node_states().len());
        for (id, state) in chitchat.node_states() {
            let keys = current_keys(&mut self.keys, id, state);
            let kv = match &mut self.check {
                Some(check) if id != own => {
                    match check.believe(id, state.max_version(), &keys) {
                        Some(believed) => believed,
                        // Never verified: not a member as far as weft knows.
                        None => continue,
                    }
                }
                _ => keys,
            };
            nodes.push(NodeSnapshot {
                name: id.node_id.to_string(),
                generation: id.generation_id,
                gossip_addr: id.gossip_advertise_addr,
                live: live.contains(id),
                dead: dead.contains(id),
                last_heard: self
                    .heard
                    .get(id)
                    .map_or(Duration::ZERO, |(_, at)| now.duration_since(*at)),
                kv,
            });
        }
        let known = self.keys.len();
        self.keys
            .retain(|id, _| chitchat.node_states().contains_key(id));
        if let (Some(check), true) = (&mut self.check, self.keys.len() < known) {
            check.retain(|id| chitchat.node_states().contains_key(id));
        }
        Some(ClusterView {
            self_name: self.self_name.clone(),
            nodes,
            suspect_after: self.suspect_after,
        })
    }

    /// Notes every node's heartbeat and hashes what a view says of it:
    /// identity, key version, liveness and suspicion. Allocates only for
    /// a node heard of for the first time.
    fn signature(
        &mut self,
        chitchat: &chitchat::Chitchat,
        live: &HashSet<&ChitchatId>,
        dead: &HashSet<&ChitchatId>,
        now: Instant,
    ) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for (id, state) in chitchat.node_states() {
            let beat = state.heartbeat();
            let heard_at = match self.heard.get_mut(id) {
                Some(entry) => {
                    if entry.0 != beat {
                        *entry = (beat, now);
                    }
                    entry.1
                }
                None => {
                    self.heard.insert(id.clone(), (beat, now));
                    now
                }
            };
            let suspect = now.duration_since(heard_at) > self.suspect_after;
            (
                id,
                state.max_version(),
                live.contains(id),
                dead.contains(id),
                suspect,
            )
                .hash(&mut hasher);
        }
        self.heard
            .retain(|id, _| chitchat.node_states().contains_key(id));
        hasher.finish()
    }
}
