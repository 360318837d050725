//! Separate hosts: every node in a network namespace of its own, with its
//! own address and the default ports (gossip 7946 and tunnel 7947 bound to
//! 0.0.0.0, proxy 4140 and admin 9646 on the host's loopback), as on real
//! machines.
//!
//! Each host's only link to the others is a TUN device, and this process is
//! the wire between them: the switch reads every IP packet a host sends,
//! asks the same [`Links`] the loopback relay uses what happens to it (the
//! UDP port says the channel: 7946 gossip, 7947 tunnel), and writes it into
//! the receiving host's device: now, later, twice or never. The kernel has
//! no netem; this gives partitions, loss, delay, duplication and reordering
//! between hosts all the same, without touching what the nodes bind or
//! advertise.
//!
//! Needs root and `ip`. Namespaces are named after this process and removed
//! on drop (their TUN devices go with them).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpListener;

use crate::fault::Channel;
use crate::links::Links;
use crate::tasks::Tasks;
use crate::ChaosError;

/// The node's default gossip port.
pub const GOSSIP_PORT: u16 = 7946;
/// The node's default tunnel port.
pub const TUNNEL_PORT: u16 = 7947;
/// The node's default proxy port (on the host's loopback).
pub const PROXY_PORT: u16 = 4140;

/// Hosts on one /24, `.1` upwards; node addresses end in 1..=250.
const MAX_HOSTS: usize = 250;
/// The devices' MTU: the largest IPv4 packet, so no datagram is fragmented
/// and a fault always hits a whole datagram.
const MTU: &str = "65535";
/// Name of each host's link device (inside its own namespace).
const DEVICE: &str = "wire0";

/// A running set of hosts and the switch between them; dropping it stops
/// the switch and removes the namespaces.
#[derive(Debug)]
pub struct Hosts {
    tag: String,
    subnet: [u8; 3],
    names: Vec<String>,
    links: Arc<Links>,
    tasks: Tasks,
}

/// One host's end of the wire.
struct Port {
    name: String,
    device: AsyncFd<File>,
}

impl Hosts {
    /// Creates one host per name (`names[0]` at `.1`) and starts the switch.
    /// Must run inside a tokio runtime. The error says why this machine
    /// cannot run hosts (not root, no `ip`, no TUN).
    pub async fn create(names: &[String]) -> Result<Hosts, ChaosError> {
        if names.is_empty() || names.len() > MAX_HOSTS {
            return Err(ChaosError::Scenario(format!(
                "hosts mode runs 1 to {MAX_HOSTS} nodes, not {}",
                names.len()
            )));
        }
        // SAFETY: geteuid(2) only reads this process's credentials.
        #[allow(unsafe_code)]
        if unsafe { libc::geteuid() } != 0 {
            return Err(ChaosError::Io(
                "separate hosts need root (network namespaces)".into(),
            ));
        }
        let pid = std::process::id();
        let hosts = Hosts {
            tag: format!("wc{}", pid % 100_000),
            subnet: [10, 150 + (pid % 50) as u8, (pid % 250) as u8],
            names: names.to_vec(),
            links: Arc::new(Links::default()),
            tasks: Tasks::default(),
        };
        let mut ports = Vec::new();
        for (i, name) in names.iter().enumerate() {
            ports.push(hosts.add_host(i, name).await?);
        }
        let ports = Arc::new(ports);
        for from in 0..ports.len() {
            hosts.tasks.spawn(carry(
                from,
                ports.clone(),
                hosts.links.clone(),
                hosts.subnet,
                hosts.tasks.clone(),
            ));
        }
        Ok(hosts)
    }

    /// Makes host `i`: its namespace, loopback, and wire device at `.i+1`.
    async fn add_host(&self, i: usize, name: &str) -> Result<Port, ChaosError> {
        let ns = self.ns(i);
        ip(&["netns", "add", &ns])?;
        let device = in_namespace(&ns, open_tun)
            .await
            .map_err(|e| ChaosError::Io(format!("host {name}: cannot open a TUN device: {e}")))?;
        let addr = format!("{}/24", self.addr_of(i));
        ip(&["-n", &ns, "addr", "add", &addr, "dev", DEVICE])?;
        ip(&["-n", &ns, "link", "set", DEVICE, "mtu", MTU, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // SAFETY: a `File` owns its descriptor, open until the `AsyncFd`
        // (which owns the `File`) drops, and always returns that same one.
        #[allow(unsafe_code)]
        let device = unsafe { AsyncFd::register(device) }
            .map_err(|e| ChaosError::Io(format!("host {name}: TUN device: {e}")))?;
        Ok(Port {
            name: name.to_string(),
            device,
        })
    }

    fn ns(&self, i: usize) -> String {
        format!("{}h{}", self.tag, i + 1)
    }

    fn index(&self, node: &str) -> Result<usize, ChaosError> {
        self.names
            .iter()
            .position(|n| n == node)
            .ok_or_else(|| ChaosError::Scenario(format!("unknown node {node}")))
    }

    fn addr_of(&self, i: usize) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, (i + 1) as u8)
    }

    /// The address `node`'s host has on the wire.
    pub fn addr(&self, node: &str) -> Result<Ipv4Addr, ChaosError> {
        Ok(self.addr_of(self.index(node)?))
    }

    /// `program args` to run on `node`'s host, as the program and
    /// arguments to spawn here (`ip netns exec` execs the program itself,
    /// so the PID is the program's and signals reach it).
    pub fn command(
        &self,
        node: &str,
        program: &Path,
        args: Vec<String>,
    ) -> Result<(PathBuf, Vec<String>), ChaosError> {
        let mut all = vec![
            "netns".to_string(),
            "exec".to_string(),
            self.ns(self.index(node)?),
            program.display().to_string(),
        ];
        all.extend(args);
        Ok((PathBuf::from("ip"), all))
    }

    /// A TCP address on this process's loopback that reaches `port` on
    /// `node`'s loopback (a port forward, one connection per connection),
    /// so the load generator can call a proxy bound where only its host
    /// sees it.
    pub async fn forward(&self, node: &str, port: u16) -> Result<SocketAddr, ChaosError> {
        let ns = self.ns(self.index(node)?);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| ChaosError::Io(format!("forward to {node}:{port}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ChaosError::Io(e.to_string()))?;
        self.tasks.spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((client, _)) => {
                        tokio::spawn(forward_one(client, ns.clone(), port));
                    }
                    // Out of descriptors, say: back off instead of spinning.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                }
            }
        });
        Ok(addr)
    }

    /// The rules in force on the wire and the per-link counters.
    pub fn links(&self) -> &Arc<Links> {
        &self.links
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        self.tasks.abort_all();
        for i in 0..self.names.len() {
            let _ = ip(&["netns", "del", &self.ns(i)]);
        }
    }
}

fn ip(args: &[&str]) -> Result<(), ChaosError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| ChaosError::Io(format!("ip: {e} (hosts mode needs iproute2)")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ChaosError::Io(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Runs `f` on a new thread inside network namespace `ns`: what it opens
/// (a device, a socket) stays in that namespace wherever it is used later.
async fn in_namespace<T, F>(ns: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own: it ends in the namespace, so no pooled thread
    // is ever left in the wrong one.
    std::thread::spawn(move || {
        let enter = || -> io::Result<T> {
            let file = File::open(&path)?;
            // SAFETY: setns(2) moves only this thread, which runs `f` and
            // ends; `file` is an open namespace descriptor.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        };
        let _ = tx.send(enter());
    });
    rx.await
        .map_err(|_| io::Error::other("namespace thread ended without an answer"))?
}

/// Opens a TUN device named [`DEVICE`] (IP packets, no extra header) in the
/// calling thread's namespace, non-blocking.
fn open_tun() -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    // SAFETY: an all-zero ifreq is a valid value (empty name, no flags).
    #[allow(unsafe_code)]
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (to, from) in req.ifr_name.iter_mut().zip(DEVICE.bytes()) {
        *to = from as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is, on an
    // open /dev/net/tun descriptor.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

async fn forward_one(mut client: tokio::net::TcpStream, ns: String, port: u16) {
    let connect = move || {
        let stream = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    };
    let Ok(stream) = in_namespace(&ns, connect).await else {
        return;
    };
    let Ok(mut upstream) = tokio::net::TcpStream::from_std(stream) else {
        return;
    };
    // Small requests and answers go through at once, as on a direct
    // connection (Nagle against delayed ACKs would add 40 ms stalls).
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// Where the switch sends one packet: the receiving host's index and, for
/// the nodes' own traffic, the channel whose faults apply.
#[derive(Debug, PartialEq, Eq)]
struct Route {
    to: usize,
    channel: Option<Channel>,
}

/// Reads the IPv4 header (and the UDP ports) of `packet`; `None` for what
/// is not for a host on `subnet` (IPv6 chatter, truncated packets).
fn route(packet: &[u8], subnet: [u8; 3], hosts: usize) -> Option<Route> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let dst = &packet[16..20];
    let host = usize::from(dst[3]);
    if dst[..3] != subnet || host == 0 || host > hosts {
        return None;
    }
    let header = usize::from(packet[0] & 0x0f) * 4;
    let ports = packet
        .get(header..header + 4)
        .filter(|_| packet[9] == libc::IPPROTO_UDP as u8);
    let channel = ports.and_then(|p| {
        let (src, dst) = (
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
        );
        if src == GOSSIP_PORT || dst == GOSSIP_PORT {
            Some(Channel::Gossip)
        } else if src == TUNNEL_PORT || dst == TUNNEL_PORT {
            Some(Channel::Tunnel)
        } else {
            None
        }
    });
    Some(Route {
        to: host - 1,
        channel,
    })
}

/// Carries every packet host `from` sends to its receiver.
async fn carry(
    from: usize,
    ports: Arc<Vec<Port>>,
    links: Arc<Links>,
    subnet: [u8; 3],
    tasks: Tasks,
) {
    let mut rng = StdRng::from_entropy();
    let mut buf = vec![0u8; 65_536];
    loop {
        let n = match ports[from]
            .device
            .async_io(Interest::READABLE, |mut f| f.read(&mut buf))
            .await
        {
            Ok(n) => n,
            Err(_) => return,
        };
        let Some(route) = route(&buf[..n], subnet, ports.len()) else {
            continue;
        };
        let sends = match route.channel {
            Some(channel) => {
                links
                    .decide(channel, &ports[from].name, &ports[route.to].name, &mut rng)
                    .sends
            }
            None => vec![Duration::ZERO],
        };
        for delay in sends {
            if delay.is_zero() {
                write(&ports[route.to], &buf[..n]).await;
            } else {
                let (ports, packet, to) = (ports.clone(), buf[..n].to_vec(), route.to);
                tasks.spawn(async move {
                    tokio::time::sleep(delay).await;
                    write(&ports[to], &packet).await;
                });
            }
        }
    }
}

/// Hands one packet to a host; a full device drops it, like a full link.
async fn write(port: &Port, packet: &[u8]) {
    let _ = port
        .device
        .async_io(Interest::WRITABLE, |mut f| f.write(packet))
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[9] = 17;
        p[12..16].copy_from_slice(&[10, 150, 7, 1]);
        p[16..20].copy_from_slice(&dst);
        p[20..22].copy_from_slice(&src_port.to_be_bytes());
        p[22..24].copy_from_slice(&dst_port.to_be_bytes());
        p
    }

    #[test]
    fn routes_by_address_and_names_the_channel_by_port() {
        let subnet = [10, 150, 7];
        assert_eq!(
            route(&udp([10, 150, 7, 3], 7946, 7946), subnet, 4),
            Some(Route {
                to: 2,
                channel: Some(Channel::Gossip)
            })
        );
        // A QUIC client's ephemeral port to the peer's tunnel port, and back.
        for (s, d) in [(40_000, 7947), (7947, 40_000)] {
            assert_eq!(
                route(&udp([10, 150, 7, 1], s, d), subnet, 4).and_then(|r| r.channel),
                Some(Channel::Tunnel)
            );
        }
        let mut icmp = udp([10, 150, 7, 2], 0, 0);
        icmp[9] = 1;
        assert_eq!(
            route(&icmp, subnet, 4),
            Some(Route {
                to: 1,
                channel: None
            })
        );
    }

    #[test]
    fn drops_what_is_not_for_a_host() {
        let subnet = [10, 150, 7];
        for dst in [[10, 150, 8, 1], [10, 150, 7, 0], [10, 150, 7, 5]] {
            assert_eq!(route(&udp(dst, 7946, 7946), subnet, 4), None);
        }
        let mut v6 = udp([10, 150, 7, 1], 7946, 7946);
        v6[0] = 0x60;
        assert_eq!(route(&v6, subnet, 4), None);
        assert_eq!(route(&[0x45; 10], subnet, 4), None);
        // A header that claims more than the packet has: no ports, still routed.
        let mut long = udp([10, 150, 7, 1], 7946, 7946);
        long[0] = 0x4f;
        assert_eq!(route(&long, subnet, 4).map(|r| r.channel), Some(None));
    }
}
