//! What the actors publish and the data plane reads on every request: the
//! routing table (written by the Router from gossip views) and the merged
//! statistics (written by the Stats aggregator), each behind an `ArcSwap`
//! so a reader takes no lock and waits on no actor. They live here, below
//! the actors that write them, so the data plane names no actor.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use weft_gossip::zones::Place;
use weft_gossip::{Catalog, Member};

use super::endpoints::Endpoints;
use crate::policy::episodes::EpisodeStats;
use crate::policy::stats::{ClusterStats, WindowStats};

/// One immutable routing table.
#[derive(Debug, Clone, Default)]
pub struct RouterSnapshot {
    /// Members and their states.
    pub members: Vec<Member>,
    /// Service name -> instances (shared with the previous snapshot while
    /// it does not change).
    pub catalog: Arc<Catalog>,
    /// The same instances, typed for the data plane, with their load.
    pub endpoints: Arc<Endpoints>,
    /// This node's zone, and whether it bridges it.
    pub place: Place,
}

impl RouterSnapshot {
    /// Whether `node` is a live member that bridges zones.
    pub fn is_bridge(&self, node: &str) -> bool {
        self.members.iter().any(|m| m.name == node && m.bridge)
    }
}

/// Cheap, cloneable read access to the latest snapshot.
#[derive(Debug, Clone, Default)]
pub struct RouterHandle {
    current: Arc<ArcSwap<RouterSnapshot>>,
}

impl RouterHandle {
    /// The latest snapshot.
    pub fn load(&self) -> Arc<RouterSnapshot> {
        self.current.load_full()
    }

    /// Publishes `snapshot` to every reader (the router only).
    pub(crate) fn publish(&self, snapshot: RouterSnapshot) {
        self.current.store(Arc::new(snapshot));
    }
}

/// What readers see for one service.
#[derive(Debug, Clone, Default)]
pub struct ServiceStats {
    /// Merged over every node's summary, and the summaries of other zones
    /// that offer the service.
    pub cluster: ClusterStats,
    /// Merged over this zone's nodes alone: what a bridge offers other
    /// zones (the same as `cluster` without zones).
    pub zone: ClusterStats,
    /// This node's attempts.
    pub local: WindowStats,
    /// This node's client requests (last attempts only): the success the app saw.
    pub effective: WindowStats,
    /// Start of the outage episode in progress on this node, if any.
    pub episode_start: Option<Instant>,
    /// This node's retries should explore now and then (it calls alone).
    pub explore: bool,
    /// Retries this node sent in the window.
    pub retries: u64,
}

impl ServiceStats {
    /// The learned retry delay shown to users: the merged p90 outage length.
    pub fn retry_delay_ms(&self) -> Option<f64> {
        self.cluster.episodes.p90_ms
    }
}

/// What readers see for one (caller, service) edge, merged over every
/// node that sent requests along it.
#[derive(Debug, Clone, Copy, Default)]
pub struct EdgeStats {
    /// Attempts: rps, success, latency, retries.
    pub cluster: ClusterStats,
    /// The success the calling apps saw after retries, weighted by the
    /// nodes' attempts.
    pub effective_success_rate: Option<f64>,
}

/// The published statistics of every known service and edge.
#[derive(Debug, Clone, Default)]
pub struct StatsSnapshot {
    /// Per service.
    pub services: BTreeMap<String, ServiceStats>,
    /// Per (caller, service); `-` is the anonymous caller.
    pub edges: BTreeMap<(String, String), EdgeStats>,
}

/// Lock-free read access to the latest statistics.
#[derive(Debug, Clone)]
pub struct StatsHandle {
    current: Arc<ArcSwap<StatsSnapshot>>,
    /// Bumped with every published snapshot, so a request held during an
    /// outage wakes when the outage ends.
    published: Arc<watch::Sender<u64>>,
}

impl Default for StatsHandle {
    fn default() -> Self {
        StatsHandle {
            current: Arc::default(),
            published: Arc::new(watch::Sender::new(0)),
        }
    }
}

impl StatsHandle {
    /// The latest snapshot.
    pub fn load(&self) -> Arc<StatsSnapshot> {
        self.current.load_full()
    }

    /// Wakes (`changed()`) each time a snapshot is published.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.published.subscribe()
    }

    /// Whether an outage episode of `service` is in progress on this node.
    pub fn in_outage(&self, service: &str) -> bool {
        self.current
            .load()
            .services
            .get(service)
            .is_some_and(|s| s.episode_start.is_some())
    }

    /// Publishes `snapshot` to every reader (the stats aggregator only).
    pub(crate) fn publish(&self, snapshot: StatsSnapshot) {
        self.current.store(Arc::new(snapshot));
        self.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Merged episode statistics, this node's episode start and whether its
    /// retries explore, for `service`.
    pub fn episodes(&self, service: &str) -> (EpisodeStats, Option<Instant>, bool) {
        let snap = self.current.load();
        snap.services
            .get(service)
            .map(|s| (s.cluster.episodes, s.episode_start, s.explore))
            .unwrap_or((EpisodeStats::default(), None, true))
    }
}
