//! The sealed transport end to end: real chitchat nodes gossiping over
//! `SealedTransport` on loopback, with foreign keys, garbage floods and
//! values large enough to need fragmentation.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::{
    spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion,
};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::net::UdpSocket as TokioUdpSocket;
use weft_gossip::seal::{SealStats, SealedTransport, SEAL_VERSION};

const KEY: [u8; 32] = [7u8; 32];

fn loopback_any() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}
// ---- end to end with chitchat --------------------------------------

const GOSSIP_INTERVAL: Duration = Duration::from_millis(100);
const CLUSTER: &str = "weft-seal-test";

fn free_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind(loopback_any()).unwrap();
    socket.local_addr().unwrap()
}

struct Node {
    handle: ChitchatHandle,
    id: ChitchatId,
    stats: Arc<SealStats>,
}

async fn start_node(name: &str, seeds: &[SocketAddr], transport: SealedTransport) -> Node {
    let listen_addr = free_addr();
    let id = ChitchatId::new(name.to_string(), 1, listen_addr);
    let config = ChitchatConfig {
        chitchat_id: id.clone(),
        cluster_id: CLUSTER.to_string(),
        gossip_interval: GOSSIP_INTERVAL,
        listen_addr,
        seed_nodes: seeds.iter().map(ToString::to_string).collect(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(10),
            initial_interval: GOSSIP_INTERVAL,
            dead_node_grace_period: Duration::from_secs(15 * 60),
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    };
    let stats = transport.stats();
    let handle = spawn_chitchat(config, Vec::new(), &transport)
        .await
        .unwrap();
    Node { handle, id, stats }
}

async fn start_cluster(transport: impl Fn() -> SealedTransport) -> Vec<Node> {
    let first = start_node("node-1", &[], transport()).await;
    let seed = first.id.gossip_advertise_addr;
    let second = start_node("node-2", &[seed], transport()).await;
    let third = start_node("node-3", &[seed], transport()).await;
    vec![first, second, third]
}

async fn wait_for<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn value_on(observer: &Node, owner: &ChitchatId, key: &str) -> Option<String> {
    observer
        .handle
        .with_chitchat(|c| {
            c.node_state(owner)
                .and_then(|s| s.get(key))
                .map(str::to_string)
        })
        .await
}

async fn set(node: &Node, key: &str, value: &str) {
    node.handle
        .with_chitchat(|c| c.self_node_state().set(key, value))
        .await;
}

async fn all_see(nodes: &[Node], owner: &ChitchatId, key: &str, value: &str) -> bool {
    for node in nodes {
        if value_on(node, owner, key).await.as_deref() != Some(value) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_converges_and_foreign_key_never_joins() {
    let nodes = start_cluster(|| SealedTransport::new(KEY)).await;
    set(&nodes[0], "k", "v").await;
    let owner = nodes[0].id.clone();
    wait_for("k=v on every node", Duration::from_secs(20), || {
        all_see(&nodes, &owner, "k", "v")
    })
    .await;
    for node in &nodes {
        assert_eq!(
            node.stats.rejected_total(),
            0,
            "{:?}",
            node.stats.rejected_by_reason()
        );
        assert!(node.stats.messages_received.load(Ordering::Relaxed) > 0);
    }

    let intruder = start_node(
        "intruder",
        &[
            nodes[0].id.gossip_advertise_addr,
            nodes[1].id.gossip_advertise_addr,
        ],
        SealedTransport::new([0x42; 32]),
    )
    .await;
    set(&intruder, "evil", "1").await;
    let first_stats = nodes[0].stats.clone();
    let second_stats = nodes[1].stats.clone();
    wait_for("bad_seal rejections", Duration::from_secs(20), || {
        let done = first_stats.rejected_bad_seal.load(Ordering::Relaxed) >= 10
            && second_stats.rejected_bad_seal.load(Ordering::Relaxed) >= 10;
        async move { done }
    })
    .await;
    // Meanwhile the cluster kept working.
    set(&nodes[2], "k3", "v3").await;
    let owner3 = nodes[2].id.clone();
    wait_for("k3 on every node", Duration::from_secs(20), || {
        all_see(&nodes, &owner3, "k3", "v3")
    })
    .await;
    for node in &nodes {
        let members = node
            .handle
            .with_chitchat(|c| c.node_states().keys().cloned().collect::<Vec<_>>())
            .await;
        assert!(
            !members.contains(&intruder.id),
            "intruder joined {:?}",
            node.id
        );
        assert_eq!(members.len(), 3);
        assert_eq!(value_on(node, &intruder.id, "evil").await, None);
    }
    let intruder_view = intruder
        .handle
        .with_chitchat(|c| c.node_states().len())
        .await;
    assert_eq!(intruder_view, 1, "intruder learnt nothing");
    assert_eq!(intruder.stats.messages_received.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_flood_is_rejected_and_cluster_still_converges() {
    let nodes = start_cluster(|| SealedTransport::new(KEY)).await;
    set(&nodes[0], "k", "v").await;
    let owner = nodes[0].id.clone();
    wait_for("k=v on every node", Duration::from_secs(20), || {
        all_see(&nodes, &owner, "k", "v")
    })
    .await;

    let target = nodes[0].id.gossip_advertise_addr;
    let stats = nodes[0].stats.clone();
    let before = stats.rejected_total();
    let attacker = TokioUdpSocket::bind(loopback_any()).await.unwrap();
    let mut rng = StdRng::seed_from_u64(7);
    const GARBAGE: u64 = 20_000;
    let mut payload = vec![0u8; 1_500];
    for i in 0..GARBAGE {
        let len = rng.gen_range(0..payload.len());
        rng.fill_bytes(&mut payload[..len]);
        if i % 2 == 0 {
            if let Some(b) = payload.first_mut() {
                *b = SEAL_VERSION; // looks sealed: must fail authentication
            }
        }
        attacker.send_to(&payload[..len], target).await.unwrap();
        if i % 64 == 63 {
            // Pace the flood so the kernel buffer does not drop it all.
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    wait_for("garbage rejected", Duration::from_secs(20), || {
        let done = stats.rejected_total() - before >= GARBAGE;
        async move { done }
    })
    .await;
    let rejected = stats.rejected_total() - before;
    assert_eq!(rejected, GARBAGE, "{:?}", stats.rejected_by_reason());
    assert!(stats.rejected_bad_seal.load(Ordering::Relaxed) > 0);
    assert!(stats.rejected_malformed.load(Ordering::Relaxed) > 0);
    assert_eq!(stats.reader_restarts.load(Ordering::Relaxed), 0);

    set(&nodes[0], "after", "flood").await;
    wait_for(
        "cluster converges after flood",
        Duration::from_secs(20),
        || all_see(&nodes, &owner, "after", "flood"),
    )
    .await;
}

/// A value of about `len` bytes that chitchat's zstd blocks cannot shrink:
/// characters of all UTF-8 lengths, weighted so that byte values come out
/// near uniform.
fn incompressible_value(rng: &mut StdRng, len: usize) -> String {
    let mut value = String::new();
    while value.len() < len {
        let pick = rng.gen_range(0..179u32);
        let c = if pick < 128 {
            char::from_u32(rng.gen_range(0..0x80))
        } else if pick < 158 {
            char::from_u32(rng.gen_range(0x80..0x800))
        } else if pick < 174 {
            char::from_u32(rng.gen_range(0x800..0x10000))
        } else {
            char::from_u32(rng.gen_range(0x10000..0x110000))
        };
        if let Some(c) = c {
            value.push(c);
        }
    }
    value
}

async fn large_values_propagate_with(transport: impl Fn() -> SealedTransport) -> Vec<Node> {
    let nodes = start_cluster(transport).await;
    let mut rng = StdRng::seed_from_u64(11);
    // 200 KiB in 400 values of 512 bytes. chitchat fills a delta until the
    // next key-value does not fit, so a full datagram is short of 65,507
    // bytes by less than one key-value: with ~530-byte key-values every
    // full datagram exceeds 65,000 bytes once sealed (with 1 KiB values it
    // lands just below, and nothing is fragmented).
    let values: Vec<(String, String)> = (0..400)
        .map(|i| (format!("big/{i:03}"), incompressible_value(&mut rng, 512)))
        .collect();
    nodes[0]
        .handle
        .with_chitchat(|c| {
            for (k, v) in &values {
                c.self_node_state().set(k, v);
            }
        })
        .await;
    let owner = nodes[0].id.clone();
    wait_for(
        "400 large values on every node",
        Duration::from_secs(30),
        || async {
            for node in &nodes[1..] {
                let complete = node
                    .handle
                    .with_chitchat(|c| {
                        c.node_state(&owner).is_some_and(|state| {
                            values.iter().all(|(k, v)| state.get(k) == Some(v.as_str()))
                        })
                    })
                    .await;
                if !complete {
                    return false;
                }
            }
            true
        },
    )
    .await;
    for node in &nodes {
        assert_eq!(
            node.stats.rejected_total(),
            0,
            "{:?}",
            node.stats.rejected_by_reason()
        );
        assert_eq!(node.stats.decode_failures.load(Ordering::Relaxed), 0);
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_values_propagate() {
    let nodes = large_values_propagate_with(|| SealedTransport::new(KEY)).await;
    let fragmented: u64 = nodes
        .iter()
        .map(|n| n.stats.fragmented_messages.load(Ordering::Relaxed))
        .sum();
    assert!(
        fragmented > 0,
        "chitchat never filled a datagram past 65,000 bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_values_propagate_in_small_datagrams() {
    let nodes =
        large_values_propagate_with(|| SealedTransport::new(KEY).with_max_datagram_len(1_400))
            .await;
    let fragmented: u64 = nodes
        .iter()
        .map(|n| n.stats.fragmented_messages.load(Ordering::Relaxed))
        .sum();
    assert!(fragmented > 0);
}
