//! Starts chitchat with weft's settings and turns its state into [`ClusterView`]s.
//!
//! The node writes only its own keys, through [`Cluster::set`] and
//! [`Cluster::delete`]. A refresher task rebuilds the view whenever chitchat's
//! live set or versions move, and at least once per gossip interval so that
//! "last heard" ages and suspicion stay current.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::Transport;
use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, Heartbeat,
    ProtocolVersion,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::keys::{validate_value, Key};
use crate::view::{ClusterView, NodeKeys, NodeSnapshot};
use crate::GossipError;

/// Dead nodes are forgotten after this long (DESIGN section 6).
pub const DEAD_NODE_GRACE: Duration = Duration::from_secs(15 * 60);
/// Tombstones of deleted keys are kept this long.
pub const TOMBSTONE_GRACE: Duration = Duration::from_secs(60 * 60);
/// phi accrual threshold.
pub const PHI_THRESHOLD: f64 = 8.0;

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
                sampling_window_size: 1_000,
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
    interval: Duration,
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
        let mut kvs = Vec::with_capacity(initial.len());
        for (key, value) in initial {
            validate_value(&value)?;
            kvs.push((key.encode(), value));
        }
        let handle = spawn_chitchat(config.chitchat_config(), kvs, transport)
            .await
            .map_err(|e| GossipError::Start(format!("{e:#}")))?;
        let (tx, views) = watch::channel(Arc::new(ClusterView::default()));
        let chitchat = handle.chitchat();
        let interval = config.interval;
        let self_name = config.node_name.clone();
        let refresher = tokio::spawn(refresh_views(chitchat, tx, interval, self_name));
        Ok(Cluster {
            handle,
            views,
            refresher,
            interval,
        })
    }

    /// Writes one of this node's keys.
    pub async fn set(&self, key: &Key, value: &str) -> Result<(), GossipError> {
        validate_value(value)?;
        let key = key.encode();
        self.handle
            .with_chitchat(|c| c.self_node_state().set(&key, value))
            .await;
        Ok(())
    }

    /// Deletes one of this node's keys (peers learn it by diffing, not by event).
    pub async fn delete(&self, key: &Key) {
        let key = key.encode();
        self.handle
            .with_chitchat(|c| {
                if c.self_node_state().get(&key).is_some() {
                    c.self_node_state().delete(&key)
                }
            })
            .await;
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

/// Rebuilds the view on every chitchat change and at least once per interval.
async fn refresh_views(
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    tx: watch::Sender<Arc<ClusterView>>,
    interval: Duration,
    self_name: String,
) {
    let mut changes = chitchat.lock().await.live_nodes_watcher();
    let mut heard: HashMap<ChitchatId, (Heartbeat, Instant)> = HashMap::new();
    // Each node's keys as of its max version: copied again only when it moved.
    let mut keys: HashMap<ChitchatId, (u64, Arc<NodeKeys>)> = HashMap::new();
    // Four silent rounds make a live node suspect; phi 8 declares it dead later.
    let suspect_after = interval * 4;
    loop {
        let view = {
            let guard = chitchat.lock().await;
            let now = Instant::now();
            let live: HashSet<&ChitchatId> = guard.live_nodes().collect();
            let dead: HashSet<&ChitchatId> = guard.dead_nodes().collect();
            let nodes = guard
                .node_states()
                .iter()
                .map(|(id, state)| {
                    let beat = state.heartbeat();
                    let entry = heard.entry(id.clone()).or_insert((beat, now));
                    if entry.0 != beat {
                        *entry = (beat, now);
                    }
                    NodeSnapshot {
                        name: id.node_id.to_string(),
                        generation: id.generation_id,
                        gossip_addr: id.gossip_advertise_addr,
                        live: live.contains(id),
                        dead: dead.contains(id),
                        last_heard: now.duration_since(entry.1),
                        kv: current_keys(&mut keys, id, state),
                    }
                })
                .collect();
            heard.retain(|id, _| guard.node_states().contains_key(id));
            keys.retain(|id, _| guard.node_states().contains_key(id));
            ClusterView {
                self_name: self_name.clone(),
                nodes,
                suspect_after,
            }
        };
        if tx.send(Arc::new(view)).is_err() {
            return;
        }
        tokio::select! {
            changed = changes.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
