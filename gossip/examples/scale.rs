//! The gossip scale harness: N nodes in one process, each with the node's
//! real gossip stack (chitchat behind the sealed transport, on its own
//! loopback UDP port, 250 ms rounds, the node's keys and view refresher,
//! and the router's derivation of members and catalog from every view),
//! each hosting one instance, all seeded with node 0 and started at once.
//! For each N it measures:
//!
//! - formation: until every node sees all N alive;
//! - registration propagation: a `svc/<id>` key written on a random node,
//!   until each node's view holds it (p50, p99 and the last node, pooled
//!   over the trials);
//! - kill: a random node stops without leaving (as under kill -9), until
//!   each survivor's view has it not alive (first survivor and last);
//! - rest: gossip bytes sent per node per second, and the CPU of the whole
//!   process per node, over a quiet window; false deaths (a live node seen
//!   not alive by anyone) during it; the process's resident memory;
//! - catalog: at one node, the whole derivation of the catalog from its
//!   view, the derivation after one node's keys changed (what the router
//!   does on a change elsewhere), and its JSON encoding (as `GET
//!   /v1/services` does), median of 20.
//!
//! `--zones Z` runs Z zones of N nodes each (`--nodes` is then per zone),
//! each its own gossip pool, and makes the first three nodes of each zone
//! bridges, which also gossip in one pool between zones at four times the
//! interval (as `weft node --zone --bridge` does). Formation then waits for
//! every node to see its zone and every bridge to see all bridges;
//! registration and kill are measured in the zone of the node they touch,
//! and a fourth row measures an offer a bridge writes reaching every other
//! bridge.
//!
//! `--heap` (built with `--features heap-profile`) profiles the heap
//! (dhat) from the start until the end of the rest window and writes
//! `dhat-heap-<N>.json`, whose bytes live at the end
//! `bench/heap_sites.py` sums by allocation site. It slows every
//! allocation: use it for memory, not for times.
//!
//! `--instances K` gives every node K instances instead of one (100 nodes
//! with 100 each is a 10,000-instance catalog). `--signed` gives every node
//! a certificate of one CA and signs and checks node state as a real node
//! does (`weft_gossip::attest`, with `weft_runtime::tls::NodeAttestor`).
//!
//! `ulimit -n 16384; cargo run --release -p weft-gossip --example scale --
//! --nodes 50,200 [--trials 10] [--rest 10] [--instances 1] [--port 30000] [--signed]
//! [--zones 3] [--heap]`
//!
//! Prints one table row per N. On a 2-core machine the larger N saturate
//! the CPU; the rest CPU column says how much.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::watch;
use weft_gossip::seal::{SealStats, SealedTransport};
use weft_gossip::view::{CatalogDeriver, NodeKeys};
use weft_gossip::{Cluster, ClusterConfig, ClusterView, Key};

const INTERVAL: Duration = Duration::from_millis(250);

/// Built with `--features heap-profile`: forwards to the system allocator
/// unless `--heap` starts a profiler.
#[cfg(feature = "heap-profile")]
#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[derive(Clone)]
struct Args {
    sizes: Vec<usize>,
    trials: usize,
    rest: Duration,
    instances: usize,
    port: u16,
    signed: bool,
    zones: usize,
    heap: bool,
}

/// Bridges per zone, as `docs/scale.md` plans.
const BRIDGES_PER_ZONE: usize = 3;

fn args() -> Args {
    let argv: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let sizes = value("--nodes")
        .unwrap_or_else(|| "50,200".into())
        .split(',')
        .map(|n| n.trim().parse().expect("--nodes N,M,..."))
        .collect();
    Args {
        sizes,
        trials: value("--trials").map_or(10, |t| t.parse().expect("--trials N")),
        rest: Duration::from_secs(
            value("--rest").map_or(10, |t| t.parse().expect("--rest SECONDS")),
        ),
        instances: value("--instances").map_or(1, |k| k.parse().expect("--instances K")),
        port: value("--port").map_or(30_000, |p| p.parse().expect("--port P")),
        signed: argv.iter().any(|a| a == "--signed"),
        zones: value("--zones").map_or(1, |z| z.parse().expect("--zones Z")),
        heap: argv.iter().any(|a| a == "--heap"),
    }
}

/// A certificate of one CA for each node, as `weft cert issue` makes them,
/// loaded as the node's signer of its gossip state.
struct Signers {
    dir: std::path::PathBuf,
    ca: (String, String),
}

impl Signers {
    fn new() -> Signers {
        let dir = std::env::temp_dir().join(format!("weft-scale-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let key = rcgen::KeyPair::generate().expect("CA key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "weft cluster CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).expect("CA cert");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("ca.pem");
        Signers {
            dir,
            ca: (cert.pem(), key.serialize_pem()),
        }
    }

    fn attestor(&self, name: &str) -> Arc<dyn weft_gossip::attest::Attestor> {
        use weft_runtime::tls;
        let (cert, key) = tls::issue_node_cert(&self.ca.0, &self.ca.1, name).expect("node cert");
        let (cert, key) = tls::write_node_cert(&self.dir, name, &cert, &key).expect("write");
        let id = tls::Identity::load(&self.dir.join("ca.pem"), &cert, &key).expect("identity");
        let trust = watch::channel(Arc::new(tls::PeerTrust::new(&id).expect("trust"))).1;
        Arc::new(tls::NodeAttestor::new(&id, trust).expect("attestor"))
    }
}

impl Drop for Signers {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One node of the harness.
struct Node {
    name: String,
    /// Its zone's index (0 without zones).
    zone: usize,
    cluster: Option<Cluster>,
    views: watch::Receiver<Arc<ClusterView>>,
    stats: Arc<SealStats>,
    /// The pool between zones, for a bridge.
    between: Option<Cluster>,
}

/// Where node `i` stands: its zone, of `per_zone` nodes, and whether it
/// bridges (only with more than one zone).
#[derive(Clone, Copy)]
struct Layout {
    per_zone: usize,
    zones: usize,
}

impl Layout {
    fn zone(self, i: usize) -> usize {
        i / self.per_zone
    }

    fn is_bridge(self, i: usize) -> bool {
        self.zones > 1 && i % self.per_zone < BRIDGES_PER_ZONE
    }

    /// The nodes of node `i`'s zone.
    fn zone_of(self, i: usize) -> std::ops::Range<usize> {
        let first = self.zone(i) * self.per_zone;
        first..first + self.per_zone
    }
}

async fn start_node(
    i: usize,
    port0: u16,
    instances: usize,
    key: [u8; 32],
    attestor: Option<Arc<dyn weft_gossip::attest::Attestor>>,
    layout: Layout,
) -> Node {
    let name = format!("n{i}");
    let addr: SocketAddr = ([127, 0, 0, 1], port0 + i as u16).into();
    let zone = layout.zone(i);
    let zone_seed = port0 + (zone * layout.per_zone) as u16;
    let config = ClusterConfig {
        node_name: name.clone(),
        generation: 1,
        listen_addr: addr,
        advertise_addr: addr,
        seeds: vec![format!("127.0.0.1:{zone_seed}")],
        interval: INTERVAL,
        cluster_id: if layout.zones > 1 {
            format!("scale/zone/z{zone}")
        } else {
            "scale".into()
        },
        attestor: attestor.clone(),
    };
    let mut info = serde_json::json!({
        "tunnel": format!("127.0.0.1:{}", port0 + 20_000 + i as u16),
        "admin": format!("127.0.0.1:{}", port0 + 30_000 + i as u16),
        "version": "scale",
        "status": "alive",
    });
    if layout.zones > 1 {
        info["zone"] = format!("z{zone}").into();
        info["bridge"] = layout.is_bridge(i).into();
    }
    let transport = SealedTransport::new(key).with_advertised(addr);
    let stats = transport.stats();
    // One instance per node by default, as most hosts have; `--instances`
    // for a large catalog (services of 100 instances, one on each node).
    let mut initial = vec![(Key::Node, info.to_string())];
    for k in 0..instances {
        let id = format!("s{k}-{i}");
        let record = serde_json::json!({"name": format!("svc{k}"), "id": id, "port": 8080 + k});
        initial.push((Key::svc(&id).expect("instance id"), record.to_string()));
        initial.push((Key::Health(id), "passing".to_string()));
    }
    let cluster = Cluster::start(&config, initial, &transport)
        .await
        .unwrap_or_else(|e| {
            panic!("{name} on {addr}: {e} (ulimit -n too low, or the port is taken?)")
        });
    let views = cluster.views();
    let between = if layout.is_bridge(i) {
        let addr: SocketAddr = ([127, 0, 0, 1], port0 + 10_000 + i as u16).into();
        let config = ClusterConfig {
            listen_addr: addr,
            advertise_addr: addr,
            seeds: vec![format!("127.0.0.1:{}", port0 + 10_000)],
            interval: INTERVAL * 4,
            cluster_id: "scale/zones".into(),
            ..config
        };
        let transport = SealedTransport::new(key).with_advertised(addr);
        let initial = vec![(Key::Node, info.to_string())];
        let between = Cluster::start(&config, initial, &transport)
            .await
            .unwrap_or_else(|e| panic!("{name} between zones on {addr}: {e}"));
        Some(between)
    } else {
        None
    };
    // What the node's router does with every view: the members, and the
    // catalog when its inputs moved.
    let mut derive = cluster.views();
    tokio::spawn(async move {
        let mut catalog = CatalogDeriver::default();
        while derive.changed().await.is_ok() {
            let view = derive.borrow_and_update().clone();
            std::hint::black_box(view.members());
            std::hint::black_box(catalog.update(&view));
        }
    });
    Node {
        name,
        zone,
        cluster: Some(cluster),
        views,
        stats,
        between,
    }
}

fn alive_in(view: &ClusterView) -> usize {
    view.nodes.iter().filter(|n| n.live).count()
}

/// Waits until `done` holds for the view of every node in `nodes` (by
/// index), recording when each got there (relative to `t0`); gives up at
/// `limit`. Returns the times, `None` for nodes that never did.
async fn each_until(
    nodes: &[Node],
    which: &[usize],
    t0: Instant,
    limit: Duration,
    done: impl Fn(&ClusterView) -> bool + Clone + Send + Sync + 'static,
) -> Vec<Option<Duration>> {
    let tasks: Vec<_> = which
        .iter()
        .map(|&i| {
            let mut views = nodes[i].views.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let wait = async {
                    loop {
                        if done(&views.borrow_and_update()) {
                            return t0.elapsed();
                        }
                        if views.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                };
                tokio::time::timeout_at((t0 + limit).into(), wait)
                    .await
                    .ok()
            })
        })
        .collect();
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("watcher"));
    }
    out
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// The process's CPU time so far (user + system), from /proc.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split(' ').collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15, so 11 and 12 after the name.
    let hz = 100.0;
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz)
}

struct Row {
    n: usize,
    zones: usize,
    /// An offer written in the pool between zones, until every other
    /// bridge holds it (`None` without zones).
    between_reach: Option<Duration>,
    formed: Option<Duration>,
    reg: Vec<Duration>,
    reg_missed: usize,
    dead_first: Option<Duration>,
    dead_all: Option<Duration>,
    bytes_per_node: f64,
    datagram_bytes: f64,
    vcpu: f64,
    false_deaths: usize,
    rss_mb: f64,
    instances: usize,
    derive: Duration,
    derive_one: Duration,
    encode: Duration,
}

/// `n` nodes per zone, in `args.zones` zones.
async fn measure(n: usize, args: &Args) -> Row {
    let layout = Layout {
        per_zone: n,
        zones: args.zones,
    };
    let total = n * args.zones;
    let key: [u8; 32] = rand::thread_rng().gen();
    // Live heap by allocation site, written when the rest window ends.
    let heap = args.heap.then(|| heap_profiler(total));
    let signers = args.signed.then(Signers::new);
    let mut attestors: Vec<_> = (0..total)
        .map(|i| signers.as_ref().map(|s| s.attestor(&format!("n{i}"))))
        .collect();
    let t0 = Instant::now();
    let started = futures_join_all((0..total).map(|i| {
        start_node(
            i,
            args.port,
            args.instances,
            key,
            attestors[i].take(),
            layout,
        )
    }))
    .await;
    let mut nodes = started;
    let all: Vec<usize> = (0..total).collect();
    // Every node sees its zone; every bridge sees every bridge.
    let formed = each_until(&nodes, &all, t0, Duration::from_secs(180), move |v| {
        alive_in(v) >= n
    })
    .await;
    let bridges = between_views(&nodes);
    let bridges_formed = each_until(
        &bridges,
        &(0..bridges.len()).collect::<Vec<_>>(),
        t0,
        Duration::from_secs(180),
        {
            let all_bridges = bridges.len();
            move |v| alive_in(v) >= all_bridges
        },
    )
    .await;
    let formed = formed
        .iter()
        .chain(&bridges_formed)
        .copied()
        .collect::<Option<Vec<_>>>()
        .and_then(|t| t.into_iter().max());

    // At rest: bytes, CPU and false deaths over a quiet window.
    let sent = |nodes: &[Node]| -> (u64, u64) {
        nodes.iter().fold((0, 0), |(b, d), x| {
            let bytes = x.stats.bytes_sent.load(Ordering::Relaxed);
            (
                b + bytes,
                d + x.stats.datagrams_sent.load(Ordering::Relaxed),
            )
        })
    };
    let (sent0, datagrams0) = sent(&nodes);
    let (cpu0, rest0) = (cpu_time(), Instant::now());
    // Nodes that saw a live node as not alive at some point.
    let mut doubting: HashSet<usize> = HashSet::new();
    while rest0.elapsed() < args.rest {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (i, x) in nodes.iter().enumerate() {
            if alive_in(&x.views.borrow()) < n {
                doubting.insert(i);
            }
        }
    }
    let false_deaths = doubting.len();
    drop(heap);
    let rss_mb = rss_bytes() as f64 / 1e6;
    let between_reach = offer_reach(&bridges, &nodes).await;
    let (derive, derive_one, encode) = catalog_costs(&nodes[0].views.borrow());
    let instances: usize = {
        let view = nodes[0].views.borrow();
        view.catalog()
            .services
            .values()
            .map(|list| list.len())
            .sum()
    };
    let secs = rest0.elapsed().as_secs_f64();
    let vcpu = (cpu_time().saturating_sub(cpu0)).as_secs_f64() / secs;
    let (sent1, datagrams1) = sent(&nodes);
    let bytes_per_node = (sent1 - sent0) as f64 / secs / total as f64;
    let datagram_bytes = (sent1 - sent0) as f64 / (datagrams1 - datagrams0).max(1) as f64;

    // Registration propagation.
    let mut reg = Vec::new();
    let mut reg_missed = 0;
    for trial in 0..args.trials {
        let owner = rand::thread_rng().gen_range(0..total);
        let id = format!("probe-{trial}");
        let key = Key::svc(&id).expect("probe id");
        let raw = key.encode();
        let owner_name = nodes[owner].name.clone();
        let record = serde_json::json!({"id": id, "name": "probe", "port": 8080});
        let t = Instant::now();
        if let Some(c) = &nodes[owner].cluster {
            c.set(&key, &record.to_string()).await.expect("set probe");
        }
        let zone: Vec<usize> = layout.zone_of(owner).collect();
        let seen = each_until(&nodes, &zone, t, Duration::from_secs(30), move |v| {
            v.nodes
                .iter()
                .any(|x| x.name == owner_name && x.kv.contains_key(&raw))
        })
        .await;
        for s in seen {
            match s {
                Some(d) => reg.push(d),
                None => reg_missed += 1,
            }
        }
    }
    reg.sort();

    // kill: one node stops without a goodbye.
    let victim = rand::thread_rng().gen_range(BRIDGES_PER_ZONE.min(n - 1)..n);
    let victim_name = nodes[victim].name.clone();
    if let Some(c) = nodes[victim].cluster.take() {
        c.shutdown().await;
    }
    let survivors: Vec<usize> = layout.zone_of(victim).filter(|&i| i != victim).collect();
    let t = Instant::now();
    let seen = each_until(&nodes, &survivors, t, Duration::from_secs(60), move |v| {
        v.nodes.iter().any(|x| x.name == victim_name && !x.live)
    })
    .await;
    let dead: Option<Vec<Duration>> = seen.into_iter().collect();
    let (dead_first, dead_all) = match dead {
        Some(d) => (d.iter().min().copied(), d.iter().max().copied()),
        None => (None, None),
    };
    // All at once: one after another takes minutes at the larger sizes.
    drop(bridges);
    let shutdowns: Vec<_> = nodes
        .iter_mut()
        .flat_map(|node| [node.cluster.take(), node.between.take()])
        .flatten()
        .map(|c| tokio::spawn(c.shutdown()))
        .collect();
    for s in shutdowns {
        let _ = s.await;
    }
    Row {
        n: total,
        zones: args.zones,
        between_reach,
        formed,
        reg,
        reg_missed,
        dead_first,
        dead_all,
        bytes_per_node,
        datagram_bytes,
        vcpu,
        false_deaths,
        rss_mb,
        instances,
        derive,
        derive_one,
        encode,
    }
}

/// The bridges' views of the pool between zones, as harness nodes (named
/// and zoned as their node), for [`each_until`].
fn between_views(nodes: &[Node]) -> Vec<Node> {
    nodes
        .iter()
        .filter_map(|node| {
            let between = node.between.as_ref()?;
            Some(Node {
                name: node.name.clone(),
                zone: node.zone,
                cluster: None,
                views: between.views(),
                stats: node.stats.clone(),
                between: None,
            })
        })
        .collect()
}

/// A bridge of the first zone offers a service in the pool between zones;
/// how long until every other bridge holds the offer.
async fn offer_reach(bridges: &[Node], nodes: &[Node]) -> Option<Duration> {
    let writer = nodes.iter().find_map(|n| n.between.as_ref())?;
    let key = Key::Zone {
        zone: "z0".into(),
        service: "probe".into(),
    };
    let raw = key.encode();
    let t = Instant::now();
    writer.set(&key, r#"{"healthy":1}"#).await.expect("offer");
    let which: Vec<usize> = (1..bridges.len()).collect();
    let seen = each_until(bridges, &which, t, Duration::from_secs(30), move |v| {
        v.nodes.iter().any(|x| x.kv.contains_key(&raw))
    })
    .await;
    seen.into_iter()
        .collect::<Option<Vec<_>>>()
        .and_then(|t| t.into_iter().max())
}

/// The heap profiler `--heap` runs: its file is written when it drops.
#[cfg(feature = "heap-profile")]
fn heap_profiler(nodes: usize) -> Box<dyn std::any::Any> {
    Box::new(
        dhat::Profiler::builder()
            .file_name(format!("dhat-heap-{nodes}.json"))
            .build(),
    )
}

#[cfg(not(feature = "heap-profile"))]
fn heap_profiler(_: usize) -> Box<dyn std::any::Any> {
    panic!("--heap needs the harness built with --features heap-profile");
}

/// The process's resident memory, from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Median of 20: deriving the whole catalog from `view`; deriving it
/// again after one node's keys changed (as the router does on a
/// registration elsewhere: only that node and its services are redone);
/// and encoding it as JSON (as `GET /v1/services` does).
fn catalog_costs(view: &ClusterView) -> (Duration, Duration, Duration) {
    let mut changed = view.clone();
    if let Some(node) = changed.nodes.first_mut() {
        let mut keys = NodeKeys::clone(&node.kv);
        // One more instance, a copy of one it has under a new id.
        let record = keys
            .iter()
            .find(|(k, _)| k.starts_with("svc/"))
            .and_then(|(_, v)| serde_json::from_str::<serde_json::Value>(v).ok());
        if let Some(mut record) = record {
            record["id"] = "scale-extra".into();
            keys.insert("svc/scale-extra".to_string(), record.to_string());
        }
        node.kv = Arc::new(keys);
    }
    let mut deriver = CatalogDeriver::default();
    deriver.update(view);
    let (mut derive, mut derive_one, mut encode) = (Vec::new(), Vec::new(), Vec::new());
    for k in 0..20 {
        let t = Instant::now();
        let catalog = std::hint::black_box(view.catalog());
        derive.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(deriver.update(if k % 2 == 0 { &changed } else { view }));
        derive_one.push(t.elapsed());
        let t = Instant::now();
        std::hint::black_box(serde_json::to_vec(&catalog).expect("json"));
        encode.push(t.elapsed());
    }
    for samples in [&mut derive, &mut derive_one, &mut encode] {
        samples.sort();
    }
    (
        quantile(&derive, 0.5),
        quantile(&derive_one, 0.5),
        quantile(&encode, 0.5),
    )
}

/// Starts all futures at once and collects their outputs in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("start"));
    }
    out
}

#[tokio::main]
async fn main() {
    let args = args();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "# gossip scale: {cores} cores, one process, 250 ms rounds, sealed transport{}; {} registration trials, {} s at rest",
        if args.signed { ", signed node state" } else { "" },
        args.trials,
        args.rest.as_secs()
    );
    println!("| nodes | zones | offer between zones | instances | formed | reg p50 ms | reg p99 ms | reg all ms | kill: first dead ms | kill: all dead ms | sent per node at rest | mean datagram | CPU at rest | nodes that saw a false death | RSS | catalog: derive whole / after one node changed / JSON |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (k, &n) in args.sizes.iter().enumerate() {
        // A fresh port range per size, so sockets of the last size that
        // are still closing never collide.
        let mut this = args.clone();
        this.port = args.port + k as u16 * 2_000;
        let r = measure(n, &this).await;
        let all = r.reg.last().copied();
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {:.1} KB/s | {:.0} B | {:.2} vCPU ({:.1} mCPU per node) | {} | {:.0} MB | {:.2} / {:.3} / {:.2} ms |",
            r.n,
            r.zones,
            r.between_reach.map_or("-".into(), |d| format!("{} ms", ms(d))),
            r.instances,
            r.formed.map_or("not within 180 s".into(), |d| format!("{:.1} s", d.as_secs_f64())),
            ms(quantile(&r.reg, 0.5)),
            ms(quantile(&r.reg, 0.99)),
            all.map_or("-".into(), ms),
            if r.reg_missed > 0 { format!(" ({} never)", r.reg_missed) } else { String::new() },
            r.dead_first.map_or("-".into(), ms),
            r.dead_all.map_or("not within 60 s".into(), ms),
            r.bytes_per_node / 1000.0,
            r.datagram_bytes,
            r.vcpu,
            r.vcpu * 1000.0 / r.n as f64,
            r.false_deaths,
            r.rss_mb,
            r.derive.as_secs_f64() * 1000.0,
            r.derive_one.as_secs_f64() * 1000.0,
            r.encode.as_secs_f64() * 1000.0,
        );
    }
}
