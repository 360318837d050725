//! Where a scenario's nodes run and how they reach each other: on
//! loopback, each with ports of its own (and the fault relay in front of
//! them when link faults are wanted), or each on a host of its own
//! ([`Hosts`]). The runner asks it for each node's flags, the command that
//! runs a program where a node lives, the node's proxy address, and the
//! fault table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::fault::Channel;
use crate::hosts::{self, Hosts};
use crate::links::Links;
use crate::process::{bind_fresh_udp, free_port};
use crate::relay::{Front, Relay};
use crate::ChaosError;

/// How the nodes reach each other, and where link faults act.
pub(crate) enum Network {
    /// Every node on 127.0.0.1 with ports of its own; with a relay in
    /// front of each node's gossip and tunnel addresses when link faults
    /// are wanted.
    Loopback {
        ports: HashMap<String, LoopbackPorts>,
        relay: Option<Relay>,
    },
    /// Every node on a host of its own with the default ports.
    Hosts(Hosts),
}

/// One loopback node's ports: where it binds, what it advertises (the
/// relay's front, or the bind address without a relay).
pub(crate) struct LoopbackPorts {
    gossip: SocketAddr,
    advertise_gossip: SocketAddr,
    tunnel: SocketAddr,
    advertise_tunnel: SocketAddr,
    proxy: SocketAddr,
    admin: SocketAddr,
}

impl Network {
    /// Every node on a host of its own; needs root.
    pub(crate) async fn hosts(names: &[String]) -> Result<Network, ChaosError> {
        Ok(Network::Hosts(Hosts::create(names).await?))
    }

    /// Picks ports for every node and starts the relay if asked for.
    pub(crate) fn loopback(names: &[String], with_relay: bool) -> Result<Network, ChaosError> {
        let port =
            || -> Result<SocketAddr, ChaosError> { Ok(([127, 0, 0, 1], free_port()?).into()) };
        let mut fronts = Vec::new();
        let mut sources = HashMap::new();
        let mut ports = HashMap::new();
        for name in names {
            let (gossip, tunnel) = (port()?, port()?);
            let mut advertised = [gossip, tunnel];
            if with_relay {
                for (slot, (channel, target)) in
                    [(Channel::Gossip, gossip), (Channel::Tunnel, tunnel)]
                        .into_iter()
                        .enumerate()
                {
                    // Not a port already handed out to a node that binds it later.
                    let socket = bind_fresh_udp()?;
                    advertised[slot] = socket
                        .local_addr()
                        .map_err(|e| ChaosError::Io(e.to_string()))?;
                    fronts.push(Front {
                        node: name.clone(),
                        channel,
                        socket,
                        target,
                    });
                }
                sources.insert(gossip, name.clone());
                sources.insert(tunnel, name.clone());
            }
            let [advertise_gossip, advertise_tunnel] = advertised;
            ports.insert(
                name.clone(),
                LoopbackPorts {
                    gossip,
                    advertise_gossip,
                    tunnel,
                    advertise_tunnel,
                    proxy: port()?,
                    admin: port()?,
                },
            );
        }
        let relay = if with_relay {
            Some(Relay::start(fronts, sources).map_err(|e| ChaosError::Io(format!("relay: {e}")))?)
        } else {
            None
        };
        Ok(Network::Loopback { ports, relay })
    }

    fn ports<'a>(
        ports: &'a HashMap<String, LoopbackPorts>,
        node: &str,
    ) -> Result<&'a LoopbackPorts, ChaosError> {
        ports
            .get(node)
            .ok_or_else(|| ChaosError::Scenario(format!("unknown node {node}")))
    }

    /// The addresses and seeds `node` is started with: explicit ports on
    /// loopback; on hosts only the seeds (every port is the default and
    /// the node finds the address it advertises).
    pub(crate) fn node_args(
        &self,
        node: &str,
        names: &[String],
    ) -> Result<Vec<String>, ChaosError> {
        let others = names.iter().filter(|n| *n != node);
        match self {
            Network::Loopback { ports, .. } => {
                let own = Self::ports(ports, node)?;
                let mut seeds = Vec::new();
                for other in others {
                    seeds.push(Self::ports(ports, other)?.advertise_gossip.to_string());
                }
                Ok([
                    ("--gossip", own.gossip),
                    ("--advertise-gossip", own.advertise_gossip),
                    ("--tunnel", own.tunnel),
                    ("--advertise-tunnel", own.advertise_tunnel),
                    ("--proxy", own.proxy),
                    ("--admin", own.admin),
                ]
                .into_iter()
                .flat_map(|(flag, addr)| [flag.to_string(), addr.to_string()])
                .chain(["--seeds".to_string(), seeds.join(",")])
                .collect())
            }
            Network::Hosts(h) => {
                let mut seeds = Vec::new();
                for other in others {
                    seeds.push(format!("{}:{}", h.addr(other)?, hosts::GOSSIP_PORT));
                }
                Ok(vec!["--seeds".to_string(), seeds.join(",")])
            }
        }
    }

    /// The program and arguments that run `program args` where `node` lives.
    pub(crate) fn command(
        &self,
        node: &str,
        program: &Path,
        args: Vec<String>,
    ) -> Result<(PathBuf, Vec<String>), ChaosError> {
        match self {
            Network::Loopback { .. } => Ok((program.to_path_buf(), args)),
            Network::Hosts(h) => h.command(node, program, args),
        }
    }

    /// Where the load generator reaches `node`'s proxy.
    pub(crate) async fn proxy(&self, node: &str) -> Result<SocketAddr, ChaosError> {
        match self {
            Network::Loopback { ports, .. } => Ok(Self::ports(ports, node)?.proxy),
            Network::Hosts(h) => h.forward(node, hosts::PROXY_PORT).await,
        }
    }

    /// The fault table and counters, when link faults can be applied.
    pub(crate) fn links(&self) -> Option<&Arc<Links>> {
        match self {
            Network::Loopback { relay, .. } => relay.as_ref().map(Relay::links),
            Network::Hosts(h) => Some(h.links()),
        }
    }
}
