//! An entry point for weft's fuzz target `chitchat_delta` (a weft patch;
//! see PATCHES.md): arbitrary delta operations, decoded as a peer's would
//! be, applied to a real chitchat state.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::sync::watch;

use crate::delta::Delta;
use crate::digest::Digest;
use crate::serialize::Serializable;
use crate::{
    Chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig, Heartbeat, ProtocolVersion,
};

/// Decodes `data` as a run of uncompressed delta operations (the ops a
/// delta's compressed stream holds once inflated) and, when they make a
/// delta, applies it twice to a chitchat state that has heard of every
/// node it names, then computes and encodes the delta this state would
/// send to a peer that knows nothing. Panics only on a bug.
pub fn apply_delta_ops(data: &[u8]) {
    let Ok(delta) = Delta::from_plain_ops(data) else {
        return;
    };
    let Ok(again) = Delta::from_plain_ops(data) else {
        unreachable!("the same bytes decoded once");
    };
    let mut chitchat = fuzz_node();
    for node_delta in &delta.node_deltas {
        chitchat.report_heartbeat(&node_delta.chitchat_id, Heartbeat(1));
    }
    chitchat.process_delta(delta);
    chitchat.process_delta(again);
    chitchat.update_nodes_liveness();
    let empty = Digest::default();
    let reply =
        chitchat
            .cluster_state
            .compute_partial_delta_respecting_mtu(&empty, 65_000, &HashSet::new());
    let mut buf = Vec::new();
    reply.serialize(&mut buf);
}

fn fuzz_node() -> Chitchat {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 7946));
    let config = ChitchatConfig {
        chitchat_id: ChitchatId::new("n1".to_string(), 1_000, addr),
        cluster_id: "fuzz".to_string(),
        gossip_interval: Duration::from_millis(250),
        listen_addr: addr,
        seed_nodes: Vec::new(),
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    };
    let (_seeds_tx, seeds) = watch::channel(HashSet::new());
    Chitchat::with_chitchat_id_and_seeds(config, seeds, vec![("node".into(), "{}".into())])
}
