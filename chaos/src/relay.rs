//! The UDP fault relay: sits on every node's advertised gossip and tunnel
//! addresses and forwards to the real bind addresses, applying the
//! [`FaultTable`] per direction.
//!
//! It works like a per-peer NAT. For node X, a front socket listens on X's
//! advertised address. Each distinct source S gets a dedicated socket that
//! forwards S's datagrams to X's bind address; X answers that socket (weft
//! replies to the source of what it receives) and the relay sends the answer
//! back to S from the front socket, so S only ever sees X's advertised
//! address. Sources are named by their bind address, so every datagram has a
//! known direction (S -> X or X -> S) and a fault can hit one direction only.
//!
//! Nothing a datagram contains can panic the relay: it never parses payloads,
//! ignores receive errors, and caps the number of peers per front.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::net::UdpSocket;

use crate::fault::Channel;
use crate::links::Links;
use crate::tasks::Tasks;

/// Largest datagram relayed (gossip fills up to the UDP maximum).
const MAX_DATAGRAM: usize = 65_536;
/// Distinct sources one front accepts; others are dropped.
const MAX_PEERS_PER_FRONT: usize = 256;

/// One relayed address: datagrams to `front` reach `target`.
#[derive(Debug)]
pub struct Front {
    /// Node that owns the real address.
    pub node: String,
    /// Gossip or tunnel.
    pub channel: Channel,
    /// The advertised address, already bound (so nobody else takes it).
    pub socket: std::net::UdpSocket,
    /// The node's bind address.
    pub target: SocketAddr,
}

/// A running relay; dropping it stops every task and frees the ports.
#[derive(Debug)]
pub struct Relay {
    links: Arc<Links>,
    tasks: Tasks,
}

struct Shared {
    links: Arc<Links>,
    tasks: Tasks,
    sources: HashMap<SocketAddr, String>,
}

impl Relay {
    /// Starts relaying every front; `sources` names nodes by the address they
    /// send from (their bind addresses). Must run inside a tokio runtime.
    pub fn start(
        fronts: Vec<Front>,
        sources: HashMap<SocketAddr, String>,
    ) -> std::io::Result<Relay> {
        let links = Arc::new(Links::default());
        let tasks = Tasks::default();
        let shared = Arc::new(Shared {
            links: links.clone(),
            tasks: tasks.clone(),
            sources,
        });
        for front in fronts {
            front.socket.set_nonblocking(true)?;
            let socket = Arc::new(UdpSocket::from_std(front.socket)?);
            tasks.spawn(run_front(
                shared.clone(),
                socket,
                front.node,
                front.channel,
                front.target,
            ));
        }
        Ok(Relay { links, tasks })
    }

    /// The rules in force and the per-link counters.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// Sends `data` now or after `delay` (a spawned timer, so order may change).
async fn deliver(
    shared: &Shared,
    socket: &Arc<UdpSocket>,
    data: &[u8],
    to: SocketAddr,
    delay: Duration,
) {
    if delay.is_zero() {
        let _ = socket.send_to(data, to).await;
        return;
    }
    let socket = socket.clone();
    let data = data.to_vec();
    shared.tasks.spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = socket.send_to(&data, to).await;
    });
}

async fn run_front(
    shared: Arc<Shared>,
    front: Arc<UdpSocket>,
    node: String,
    channel: Channel,
    target: SocketAddr,
) {
    let mut rng = StdRng::from_entropy();
    let mut peers: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, src) = match front.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                // ICMP errors surface here; they say nothing about the next datagram.
                tokio::task::yield_now().await;
                continue;
            }
        };
        let from = shared
            .sources
            .get(&src)
            .cloned()
            .unwrap_or_else(|| "?".to_string());
        let verdict = shared.links.decide(channel, &from, &node, &mut rng);
        if verdict.dropped() {
            continue;
        }
        let peer = match peers.get(&src) {
            Some(p) => p.clone(),
            None => {
                if peers.len() >= MAX_PEERS_PER_FRONT {
                    continue;
                }
                let Ok(sock) = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await else {
                    continue;
                };
                let sock = Arc::new(sock);
                shared.tasks.spawn(run_back(
                    shared.clone(),
                    sock.clone(),
                    front.clone(),
                    node.clone(),
                    from.clone(),
                    channel,
                    target,
                    src,
                ));
                peers.insert(src, sock.clone());
                sock
            }
        };
        for delay in verdict.sends {
            deliver(&shared, &peer, &buf[..n], target, delay).await;
        }
    }
}

/// Relays `node`'s answers to `src` (named `peer_name`) back through the front.
#[allow(clippy::too_many_arguments)]
async fn run_back(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    node: String,
    peer_name: String,
    channel: Channel,
    target: SocketAddr,
    src: SocketAddr,
) {
    let mut rng = StdRng::from_entropy();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(_) => {
                tokio::task::yield_now().await;
                continue;
            }
        };
        if from != target {
            continue;
        }
        let verdict = shared.links.decide(channel, &node, &peer_name, &mut rng);
        for delay in verdict.sends {
            deliver(&shared, &front, &buf[..n], src, delay).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault::{LinkFault, NodeSet};

    async fn echo() -> (Arc<UdpSocket>, SocketAddr) {
        let s = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = s.local_addr().unwrap();
        let e = s.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            while let Ok((n, from)) = e.recv_from(&mut buf).await {
                let _ = e.send_to(&buf[..n], from).await;
            }
        });
        (s, addr)
    }

    async fn roundtrip(client: &UdpSocket, front: SocketAddr, msg: &[u8]) -> Option<SocketAddr> {
        client.send_to(msg, front).await.unwrap();
        let mut buf = [0u8; 2048];
        let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
        // Skip echoes of earlier datagrams.
        loop {
            match tokio::time::timeout_at(deadline, client.recv_from(&mut buf)).await {
                Ok(Ok((n, from))) if &buf[..n] == msg => return Some(from),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    #[tokio::test]
    async fn relays_both_ways_and_partitions_on_command() {
        let (_server, target) = echo().await;
        let front = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sources = HashMap::from([(client.local_addr().unwrap(), "a".to_string())]);
        let relay = Relay::start(
            vec![Front {
                node: "b".into(),
                channel: Channel::Gossip,
                socket: front,
                target,
            }],
            sources,
        )
        .unwrap();
        // Replies come from the advertised (front) address.
        assert_eq!(
            roundtrip(&client, front_addr, b"one").await,
            Some(front_addr)
        );
        // Only the reply direction is cut: requests still arrive, answers do not.
        let id = relay.links().faults().add(
            vec![Channel::Gossip],
            NodeSet::of(["b"]),
            NodeSet::of(["a"]),
            LinkFault::partition(),
        );
        assert_eq!(roundtrip(&client, front_addr, b"two").await, None);
        assert!(relay.links().faults().remove(id));
        assert_eq!(
            roundtrip(&client, front_addr, b"three").await,
            Some(front_addr)
        );
        let stats = relay.links().stats();
        let back = stats.iter().find(|r| r.from == "b").unwrap();
        assert_eq!(back.stats.dropped, 1);
        assert_eq!(back.stats.forwarded, 2);
        let fwd = stats.iter().find(|r| r.from == "a").unwrap();
        assert_eq!(fwd.stats.forwarded, 3);
    }

    #[tokio::test]
    async fn garbage_and_unknown_sources_do_not_stop_it() {
        let (_server, target) = echo().await;
        let front = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        let relay = Relay::start(
            vec![Front {
                node: "b".into(),
                channel: Channel::Tunnel,
                socket: front,
                target,
            }],
            HashMap::new(),
        )
        .unwrap();
        let stranger = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        stranger.send_to(&[], front_addr).await.unwrap();
        stranger
            .send_to(&vec![0xff; 60_000], front_addr)
            .await
            .unwrap();
        assert_eq!(
            roundtrip(&stranger, front_addr, b"hi").await,
            Some(front_addr)
        );
        assert!(relay.links().stats().iter().any(|r| r.from == "?"));
    }
}
