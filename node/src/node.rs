//! `weft node`: wires gossip, the actors and the local API, and leaves gracefully.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::Supervisor;
use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::{signal, SignalKind};
use weft_gossip::{Cluster, ClusterConfig, Key, NodeInfo, NodeStatus};
use weft_runtime::access_log::AccessLog;
use weft_runtime::dataplane::inbound::Registered;
use weft_runtime::dataplane::tables::{RouterHandle, StatsHandle};
use weft_runtime::dataplane::{DataPlane, DataPlaneParts, InFlight, Limits, Timeouts};
use weft_runtime::gossip_writer::GossipWriter;
use weft_runtime::health_checker::HealthChecker;
use weft_runtime::listener::{Listener, StopAccepting, StopListening};
use weft_runtime::outcome::OutcomeSink;
use weft_runtime::router::Router;
use weft_runtime::stats_aggregator::StatsAggregator;
use weft_runtime::tls;
use weft_runtime::trace::Tracer;
use weft_runtime::tunnel::TunnelPool;

use crate::api::{self, ApiState, Faults};
use crate::bridge::{self, BetweenZones};
use crate::callers::CallerPorts;
use crate::cli::NodeArgs;
use crate::config::NodeConfig;
use crate::crl;
use crate::init;
use crate::keyring::ClusterKeys;
use crate::logging::{announce, Logging};
use crate::registry::Registry;
use crate::rollouts::RolloutDriver;
use crate::upstreams::Upstreams;
use crate::NodeError;

/// Runs a node until SIGTERM/SIGINT (exit 0 after a graceful leave) or until
/// gossip dies (an error: the node never serves a stale view silently).
pub fn run(cfg: NodeConfig, args: NodeArgs, logging: Logging) -> Result<(), NodeError> {
    create_private_dir(&cfg.data_dir)?;
    let cluster_dir = cluster_dir(&cfg)?;
    let key = init::read_gossip_key(&cluster_dir)?;
    let keys = Arc::new(ClusterKeys::load(&cfg.data_dir, &key)?);
    let registry = Arc::new(Registry::load(&cfg.data_dir)?);

    let workers = cfg.worker_threads;
    let system = actix::System::with_tokio_rt(move || {
        let mut rt = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = workers {
            rt.worker_threads(n);
        }
        rt.enable_all()
            .thread_name("weft-worker")
            .build()
            .expect("the tokio runtime must start")
    });
    let reload = Reload { args, logging };
    let result = system.block_on(serve(cfg, cluster_dir, keys, registry, reload));
    actix::System::current().stop();
    result
}

async fn serve(
    cfg: NodeConfig,
    cluster_dir: PathBuf,
    keys: Arc<ClusterKeys>,
    registry: Arc<Registry>,
    reload: Reload,
) -> Result<(), NodeError> {
    let advertise = match cfg.advertise_gossip {
        Some(a) => a,
        None => SocketAddr::new(detect_ip(&cfg.seeds), cfg.gossip.port()),
    };
    let advertise_tunnel = match cfg.advertise_tunnel {
        Some(a) => a,
        None => SocketAddr::new(advertise.ip(), cfg.tunnel.port()),
    };
    let socket = bind_socket(&cfg.socket)?;
    let admin = TcpListener::bind(cfg.admin)
        .await
        .map_err(|e| NodeError::Config(format!("--admin {}: {e}", cfg.admin)))?;
    let proxy = TcpListener::bind(cfg.proxy)
        .await
        .map_err(|e| NodeError::Config(format!("--proxy {}: {e}", cfg.proxy)))?;
    let crl_in_use = crl::effective(cfg.crl.as_deref(), &cfg.data_dir);
    let tunnel_tls = tunnel_tls(&cfg, &cluster_dir, crl_in_use.as_deref())?;
    let crls = {
        let (node_cfg, dir) = (cfg.clone(), cluster_dir.clone());
        let check: crl::Check = Arc::new(move |candidate: &Path| {
            self::tunnel_tls(&node_cfg, &dir, Some(candidate))
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        Arc::new(crl::Crls::new(&cfg.data_dir, crl_in_use.as_deref(), check))
    };
    let endpoint = tunnel_endpoint(tunnel_tls.server, cfg.tunnel)
        .map_err(|e| NodeError::Config(format!("--tunnel {}: {e}", cfg.tunnel)))?;

    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let info = NodeInfo {
        schema: weft_gossip::SCHEMA,
        tunnel: advertise_tunnel.to_string(),
        admin: admin
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| cfg.admin.to_string()),
        version: env!("CARGO_PKG_VERSION").to_string(),
        status: NodeStatus::Alive,
        zone: cfg.zone.clone(),
        bridge: cfg.bridge.is_some(),
    };
    let mut initial = vec![(Key::Node, to_json(&info)), (Key::Keyring, keys.record())];
    initial.extend(registry.initial_keys().await);
    let tunnels = Arc::new(TunnelPool::new(
        endpoint.clone(),
        tunnel_tls.client,
        tunnel_tls.trust,
        Timeouts::default().connect,
    ));
    let attestor = tls::NodeAttestor::new(&tunnel_tls.identity, tunnels.trust())
        .map_err(|e| NodeError::Config(e.to_string()))?;
    let cluster_cfg = ClusterConfig {
        node_name: cfg.name.clone(),
        generation,
        listen_addr: cfg.gossip,
        advertise_addr: advertise,
        seeds: cfg.seeds.clone(),
        interval: cfg.gossip_interval,
        cluster_id: bridge::zone_id(&cluster_id(&cluster_dir)?, cfg.zone.as_deref()),
        attestor: Some(Arc::new(attestor)),
    };
    let transport =
        weft_gossip::seal::SealedTransport::with_keyring(keys.ring()).with_advertised(advertise);
    let cluster = Cluster::start(&cluster_cfg, initial, &transport)
        .await
        .map_err(|e| NodeError::Config(format!("--gossip {}: {e}", cfg.gossip)))?;
    let cluster = Arc::new(cluster);
    export_gossip_counters(transport.stats(), cluster.clone());

    let metrics = install_metrics();
    let writer = GossipWriter::spawn(cluster.clone());
    keys.trust_operators(Arc::new(tls::OperatorAuthority::new(tunnels.trust())));
    keys.clone().follow(
        cluster.views(),
        writer.clone(),
        key_fetcher(&tunnels, cluster.views()),
    );
    crls.clone().follow(cluster.views(), writer.clone());
    let checker = {
        let writer = writer.clone();
        let registrations = registry.subscribe();
        Supervisor::start(move |_| HealthChecker::new(writer, registrations))
    };
    let upstreams = Arc::new(Upstreams::load(&cfg.data_dir)?);
    let callers = Arc::new(CallerPorts::load(&cfg.data_dir)?);
    let router_handle = RouterHandle::default();
    let stats = StatsHandle::default();
    let bridge = match &cfg.bridge {
        Some(bridge) => {
            let zone = (
                cfg.zone.as_deref().unwrap_or_default(),
                &*cluster,
                writer.clone(),
            );
            let tables = (router_handle.clone(), stats.clone());
            let between = BetweenZones {
                cfg: &cfg,
                bridge,
                cluster_id: cluster_id(&cluster_dir)?,
                generation,
                info: &info,
            };
            Some(
                between
                    .start(&tunnel_tls.identity, &tunnels, &keys, zone, tables)
                    .await?,
            )
        }
        None => None,
    };
    // A bridge routes from its zone's view joined with the other zones'
    // bridges; every other node from its zone's.
    let routing_views = bridge
        .as_ref()
        .map_or_else(|| cluster.views(), |b| b.views.clone());
    let (outcomes, outcome_rx) = OutcomeSink::channel(16 * 1024);
    let stats_aggregator = {
        let aggregator = StatsAggregator::new(
            cfg.name.clone(),
            stats.clone(),
            writer.clone(),
            routing_views.clone(),
            router_handle.clone(),
            outcome_rx,
        );
        Supervisor::start(move |_| aggregator)
    };
    let access = AccessLog::start(cfg.access_log.clone());
    let tracer = start_tracing(&cfg);
    let dataplane = DataPlane::new(DataPlaneParts {
        node: cfg.name.clone(),
        router: router_handle.clone(),
        tunnels: tunnels.clone(),
        outcomes,
        timeouts: Timeouts {
            body_idle: cfg.body_idle_timeout,
            ..Timeouts::default()
        },
        limits: Limits {
            max_connections: cfg.max_connections,
        },
        access: access.clone(),
        tracer,
        writer: Some(writer.clone()),
        stats: stats.clone(),
        policy: cfg.retry_policy,
        registered: Registered::new(registry.subscribe()),
        keys: Some(keys.clone() as Arc<dyn weft_runtime::dataplane::keys::KeyVault>),
    });
    let operators = || Arc::new(tls::OperatorAuthority::new(tunnels.trust()));
    let intentions = crate::intentions::load(&cfg.data_dir, dataplane.clone())?;
    let intentions = intentions.run(operators(), cluster.views(), writer.clone());
    let routes = crate::routes::load(&cfg.data_dir, dataplane.clone())?;
    let routes = routes.run(operators(), cluster.views(), writer.clone());
    let limits = crate::limits::load(&cfg.data_dir, dataplane.clone())?;
    let limits = limits.run(operators(), cluster.views(), writer.clone());
    crate::admission::follow(dataplane.clone(), cluster.views(), writer.clone());
    let rollouts = crate::rollouts::load(&cfg.data_dir)?;
    let rollouts = rollouts.run(operators(), cluster.views(), writer.clone());
    let rollouts =
        RolloutDriver::start(rollouts, dataplane.clone(), cluster.views(), writer.clone());
    let router = {
        let (views, handle, dp) = (routing_views, router_handle.clone(), dataplane.clone());
        Supervisor::start(move |_| Router::with_handle(views, handle).maintaining(dp))
    };
    let state = Arc::new(ApiState {
        node: cfg.name.clone(),
        cluster: cluster.clone(),
        keys,
        crls: crls.clone(),
        intentions,
        routes,
        limits,
        rollouts,
        registry: registry.clone(),
        router: router_handle.clone(),
        upstreams: upstreams.clone(),
        callers: callers.clone(),
        checker: checker.clone(),
        metrics,
        stats: stats.clone(),
        dataplane: dataplane.clone(),
        faults: Faults::from_env(),
        reserved_ports: vec![
            (cfg.proxy.port(), "proxy"),
            (cfg.admin.port(), "admin"),
            (cfg.tunnel.port(), "tunnel"),
        ],
    });
    let dataplane_in_flight = dataplane.in_flight.clone();
    let tunnel_endpoint = endpoint.clone();
    let listener = Listener::new(
        socket,
        admin,
        proxy,
        endpoint,
        dataplane,
        api::handler(state.clone()),
    );
    let listener = Supervisor::start(move |_| listener);
    if let Some(faults) = &state.faults {
        faults.arm(vec![
            ("listener", listener.clone().recipient()),
            ("router", router.recipient()),
            ("health_checker", checker.clone().recipient()),
            ("stats_aggregator", stats_aggregator.recipient()),
        ]);
    }
    upstreams.attach(listener.clone()).await;
    callers.attach(listener.clone()).await;

    announce(&format!(
        "weft node {} ready: gossip {} (advertised {}), tunnel {} (advertised {}), proxy {}, socket {}, admin {}",
        cfg.name,
        cfg.gossip,
        advertise,
        cfg.tunnel,
        advertise_tunnel,
        cfg.proxy,
        cfg.socket.display(),
        info.admin
    ));

    let running = Running {
        cfg,
        cluster_dir,
        cluster,
        between: bridge.map(|b| b.between),
        registry,
        listener,
        info,
        in_flight: dataplane_in_flight,
        endpoint: tunnel_endpoint,
        tunnels,
        access,
        reload,
        crls,
    };
    running.announce_joined();
    running.serve_until_stopped().await
}

/// The tunnel's QUIC endpoint, bound to `addr`, accepting datagrams up to
/// the tunnel's largest payload, with socket buffers that hold a burst of
/// segmentation-offload sends (the kernel's 208 KiB default drops them).
fn tunnel_endpoint(
    server: quinn::ServerConfig,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(tls::MAX_UDP_PAYLOAD)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let socket = std::net::UdpSocket::bind(addr)?;
    size_socket_buffers(&socket)?;
    quinn::Endpoint::new(
        config,
        Some(server),
        socket,
        Arc::new(weft_runtime::tunnel::TunnelRuntime),
    )
}

/// Bytes asked of the kernel for the tunnel socket's send and receive
/// buffers; it grants at most `net.core.rmem_max` / `wmem_max`.
const TUNNEL_SOCKET_BUFFER: usize = 8 * 1024 * 1024;

fn size_socket_buffers(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    let state = quinn::udp::UdpSocketState::new(socket.into())?;
    state.set_recv_buffer_size(socket.into(), TUNNEL_SOCKET_BUFFER)?;
    state.set_send_buffer_size(socket.into(), TUNNEL_SOCKET_BUFFER)?;
    // Linux reports twice what it grants (the other half is its own
    // bookkeeping). Under half the ask (4 MiB, which held a 1 GiB stream on
    // loopback without a drop) is worth telling the operator.
    let granted = state.recv_buffer_size(socket.into())? / 2;
    if granted < TUNNEL_SOCKET_BUFFER / 2 {
        tracing::warn!(
            granted,
            wanted = TUNNEL_SOCKET_BUFFER,
            "the tunnel's UDP receive buffer is smaller than asked; raise \
             net.core.rmem_max and net.core.wmem_max (sysctl) to at least {TUNNEL_SOCKET_BUFFER} \
             for fewer drops under load"
        );
    }
    Ok(())
}

/// The tunnel's TLS, both ends (this node's identity, issued from the
/// cluster CA or the operator's files), and whom it trusts.
struct TunnelTls {
    server: quinn::ServerConfig,
    client: quinn::ClientConfig,
    trust: tls::PeerTrust,
    /// The identity the configs were built from (it also signs gossip).
    identity: tls::Identity,
}

/// The tunnel's TLS with the revocation list `crl` (PEM file), if any.
fn tunnel_tls(
    cfg: &NodeConfig,
    cluster_dir: &Path,
    crl: Option<&Path>,
) -> Result<TunnelTls, NodeError> {
    let identity = match &cfg.cert_key {
        Some((cert, key)) => tls::Identity::load(&cluster_dir.join(init::CA_CERT), cert, key),
        None => tls::Identity::from_cluster_dir(cluster_dir, &cfg.name, &cfg.data_dir),
    }
    .and_then(|identity| match crl {
        Some(crl) => identity.with_crl(crl),
        None => Ok(identity),
    })
    .map_err(|e| NodeError::Config(e.to_string()))?;
    if identity.node != cfg.name {
        return Err(NodeError::Config(format!(
            "the certificate names node {:?}, but this node is --name {:?}: peers would refuse it; issue one with `weft cert issue {}`",
            identity.node, cfg.name, cfg.name
        )));
    }
    let config = |e: tls::TlsError| NodeError::Config(e.to_string());
    Ok(TunnelTls {
        server: tls::server_config(&identity).map_err(config)?,
        client: tls::client_config(&identity).map_err(config)?,
        trust: tls::PeerTrust::new(&identity).map_err(config)?,
        identity,
    })
}

/// What a SIGHUP needs: the flags (which win over the file) and the logger.
struct Reload {
    args: NodeArgs,
    logging: Logging,
}

/// A node that has started: what its signals act on.
struct Running {
    cfg: NodeConfig,
    cluster_dir: PathBuf,
    cluster: Arc<Cluster>,
    /// The pool between zones, when this node is a bridge.
    between: Option<Arc<Cluster>>,
    registry: Arc<Registry>,
    listener: actix::Addr<Listener>,
    info: NodeInfo,
    in_flight: InFlight,
    endpoint: quinn::Endpoint,
    tunnels: Arc<TunnelPool>,
    access: AccessLog,
    reload: Reload,
    crls: Arc<crl::Crls>,
}

impl Running {
    /// SIGHUP reloads; SIGTERM and SIGINT drain and leave; a dead gossip
    /// task stops the node rather than let it serve a stale view.
    async fn serve_until_stopped(self) -> Result<(), NodeError> {
        let sig = |kind| signal(kind).map_err(|e| NodeError::Io(e.to_string()));
        let (mut term, mut int, mut hup) = (
            sig(SignalKind::terminate())?,
            sig(SignalKind::interrupt())?,
            sig(SignalKind::hangup())?,
        );
        let terminated = self.cluster.terminated();
        tokio::pin!(terminated);
        let crl_changed = self.crls.changed();
        loop {
            tokio::select! {
                _ = hup.recv() => self.reload(),
                _ = crl_changed.notified() => self.reload_tls("a newer revocation list"),
                _ = term.recv() => return self.drain_and_leave("SIGTERM").await,
                _ = int.recv() => return self.drain_and_leave("SIGINT").await,
                res = &mut terminated => return self.gossip_died(res),
            }
        }
    }

    /// Prints, once, how many members the node found: the line that tells
    /// an operator the node joined (or that it is alone).
    fn announce_joined(&self) {
        let cluster = self.cluster.clone();
        let name = self.cfg.name.clone();
        let seeded = self
            .cfg
            .seeds
            .iter()
            .any(|s| *s != self.cfg.gossip.to_string());
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut views = cluster.views();
            loop {
                let alive: Vec<String> = {
                    let view = views.borrow_and_update();
                    view.members()
                        .into_iter()
                        .filter(|m| m.state == weft_gossip::MemberState::Alive)
                        .map(|m| m.name)
                        .collect()
                };
                let done = alive.len() > 1 || !seeded || tokio::time::Instant::now() >= deadline;
                if done {
                    if alive.len() > 1 {
                        announce(&format!(
                            "weft node {name} joined the cluster: {} members alive ({})",
                            alive.len(),
                            alive.join(", ")
                        ));
                    } else if seeded {
                        announce(&format!(
                            "weft node {name}: no other member answered within 10 s; still trying the seeds"
                        ));
                    } else {
                        announce(&format!(
                            "weft node {name} started a new cluster (no seeds); other nodes join with --seeds pointing here"
                        ));
                    }
                    return;
                }
                let _ = tokio::time::timeout_at(deadline, views.changed()).await;
            }
        });
    }

    /// Reloads what can change live: the log level and the access log from
    /// the config file, and the tunnel certificates from their files. A bad
    /// file is logged and changes nothing; the node never stops here.
    fn reload(&self) {
        match self.cfg.reload(&self.reload.args) {
            Ok(live) => {
                if let Err(e) = self.reload.logging.set_level(live.log_level.as_deref()) {
                    tracing::error!(error = %e, "SIGHUP: log level not changed");
                }
                self.access.reopen(live.access_log);
            }
            Err(e) => tracing::error!(error = %e, "SIGHUP: config file not reloaded"),
        }
        self.reload_tls("SIGHUP");
        tracing::info!(
            "SIGHUP: reloaded the log level, the access log, the certificates and the CRL"
        );
    }

    /// Reloads the certificates and the revocation list in use: tunnels to
    /// peers no longer trusted close.
    fn reload_tls(&self, why: &str) {
        let crl = crl::effective(self.cfg.crl.as_deref(), &self.cfg.data_dir);
        self.crls.reloaded(crl.as_deref());
        match tunnel_tls(&self.cfg, &self.cluster_dir, crl.as_deref()) {
            Ok(tunnel) => {
                self.endpoint.set_server_config(Some(tunnel.server));
                let closed = self.tunnels.reload(tunnel.client, tunnel.trust);
                if closed > 0 {
                    tracing::warn!(closed, why, "closed tunnels to peers no longer trusted");
                }
            }
            Err(e) => tracing::error!(error = %e, why, "certificates not reloaded"),
        }
    }

    /// Marks the node draining, closes its app ports, lets what is in
    /// flight finish (up to the drain timeout), then leaves.
    async fn drain_and_leave(self, sig: &str) -> Result<(), NodeError> {
        let Running {
            cfg,
            cluster,
            registry,
            listener,
            info,
            in_flight,
            between,
            ..
        } = self;
        announce(&format!(
            "weft node {}: {sig}: draining (up to {:?}), then leaving",
            cfg.name, cfg.drain_timeout
        ));
        let draining = NodeInfo {
            status: NodeStatus::Draining,
            ..info.clone()
        };
        let _ = cluster.set(&Key::Node, &to_json(&draining)).await;
        if let Some(between) = &between {
            let _ = between.set(&Key::Node, &to_json(&draining)).await;
        }
        listener.do_send(StopAccepting);
        // Peers stop picking our instances once they hear we drain.
        tokio::time::sleep(cluster.interval() * 2).await;
        let left_in_flight = drain(&in_flight, cfg.drain_timeout).await;
        if left_in_flight > 0 {
            tracing::warn!(
                in_flight = left_in_flight,
                "drain timeout: leaving with requests still in flight"
            );
        }
        let leaving = NodeInfo {
            status: NodeStatus::Left,
            ..info
        };
        let _ = cluster.set(&Key::Node, &to_json(&leaving)).await;
        if let Some(between) = &between {
            let _ = between.set(&Key::Node, &to_json(&leaving)).await;
        }
        registry.withdraw_all(&cluster).await;
        // Two gossip rounds carry the leave to peers before we go quiet.
        tokio::time::sleep(cluster.interval() * 2 + Duration::from_millis(100)).await;
        listener.do_send(StopListening);
        let _ = std::fs::remove_file(&cfg.socket);
        if let Ok(cluster) = Arc::try_unwrap(cluster) {
            cluster.shutdown().await;
        }
        announce(&format!("weft node {} left the cluster", cfg.name));
        Ok(())
    }

    fn gossip_died(&self, res: Result<(), weft_gossip::GossipError>) -> Result<(), NodeError> {
        let why = match res {
            Ok(()) => "gossip task stopped".to_string(),
            Err(e) => e.to_string(),
        };
        tracing::error!(error = %why, "gossip died; stopping the node rather than serving a stale view");
        let _ = std::fs::remove_file(&self.cfg.socket);
        Err(NodeError::Io(format!("gossip died: {why}")))
    }
}

/// Tells the health checker every change of the registrations, in order:
/// new ones are probed, removed ones stop being probed.
/// Waits until nothing is in flight or `timeout` passes; what is left.
async fn drain(in_flight: &InFlight, timeout: Duration) -> usize {
    let deadline = tokio::time::Instant::now() + timeout;
    while in_flight.count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    in_flight.count()
}

/// Installs the Prometheus recorder (once per process) and keeps it tidy.
fn install_metrics() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let seconds = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ];
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()),
            &seconds,
        )
        .ok()?;
    match builder.install_recorder() {
        Ok(handle) => {
            describe_metrics();
            export_alert_counters();
            let upkeep = handle.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    upkeep.run_upkeep();
                }
            });
            Some(handle)
        }
        Err(e) => {
            tracing::warn!(error = %e, "metrics disabled");
            None
        }
    }
}

/// Fetches a gossip key from a member over the tunnel, at the tunnel
/// address its gossip announces.
fn key_fetcher(
    tunnels: &Arc<TunnelPool>,
    views: tokio::sync::watch::Receiver<Arc<weft_gossip::ClusterView>>,
) -> crate::keyring::KeyFetcher {
    let tunnels = tunnels.clone();
    Arc::new(move |node: String, id: weft_gossip::seal::KeyId| {
        let tunnels = tunnels.clone();
        let addr = views
            .borrow()
            .members()
            .into_iter()
            .find(|m| m.name == node)
            .and_then(|m| m.tunnel_addr);
        Box::pin(async move {
            let addr = addr.ok_or_else(|| format!("{node} announces no tunnel address"))?;
            weft_runtime::dataplane::keys::fetch(&tunnels, &node, addr, &id.to_string())
                .await
                .map_err(|e| e.to_string())
        })
    })
}

/// Copies the gossip layer's counters into metrics once a second:
/// datagrams and messages refused by reason, node states not believed by
/// reason, what gossip ignored of its peers' word (claims about this node,
/// nodes past its cap), and bytes each way.
fn export_gossip_counters(seal: Arc<weft_gossip::seal::SealStats>, cluster: Arc<Cluster>) {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        loop {
            for (reason, n) in seal.rejected_by_reason() {
                metrics::counter!("weft_gossip_rejected_total", "reason" => reason).absolute(n);
            }
            for (reason, n) in cluster.rejections().by_reason() {
                metrics::counter!("weft_gossip_rejected_total", "reason" => reason).absolute(n);
            }
            for (reason, n) in cluster.ignored().await {
                metrics::counter!("weft_gossip_rejected_total", "reason" => reason).absolute(n);
            }
            let sent = seal.bytes_sent.load(Relaxed);
            let received = seal.bytes_received.load(Relaxed);
            metrics::counter!("weft_gossip_bytes_total", "direction" => "sent").absolute(sent);
            metrics::counter!("weft_gossip_bytes_total", "direction" => "received")
                .absolute(received);
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// Every series an alert watches, at 0 from the start: `increase(...)`
/// over a series that appears with its first event at 1 sees no increase,
/// so the first actor restart or refusal would never fire an alert.
fn export_alert_counters() {
    use weft_runtime::supervision::Named;
    let counters: [(&str, &str, &[&str]); 4] = [
        (
            "weft_actor_restarts_total",
            "actor",
            &[
                <weft_runtime::listener::Listener as Named>::NAME,
                <weft_runtime::router::Router as Named>::NAME,
                <HealthChecker as Named>::NAME,
                <StatsAggregator as Named>::NAME,
            ],
        ),
        (
            "weft_tunnel_refused_total",
            "reason",
            &[
                "handshake",
                "revoked",
                "untrusted",
                "no_node_name",
                "not_a_member",
                "too_many_connections",
                "unregistered_instance",
                "protocol_mismatch",
            ],
        ),
        (
            "weft_gossip_rejected_total",
            "reason",
            weft_gossip::seal::SealStats::REASONS,
        ),
        (
            "weft_gossip_rejected_total",
            "reason",
            &[
                "ungranted_keyring",
                "ungranted_intentions",
                "ungranted_routes",
                "ungranted_limits",
                "ungranted_rollouts",
            ],
        ),
    ];
    for (name, label, values) in counters {
        for &value in values {
            metrics::counter!(name, label => value).increment(0);
        }
    }
    for limit in weft_runtime::dataplane::Limit::ALL {
        metrics::counter!("weft_limit_refused_total", "limit" => limit.as_str()).increment(0);
    }
    for name in [
        "weft_caller_claims_rejected_total",
        "weft_outcomes_dropped_total",
        "weft_access_log_dropped_total",
        "weft_spans_exported_total",
    ] {
        metrics::counter!(name).increment(0);
    }
    for reason in ["queue_full", "export"] {
        metrics::counter!("weft_spans_dropped_total", "reason" => reason).increment(0);
    }
    metrics::gauge!("weft_tap_listeners").set(0.0);
}

/// The tracer of the data plane and, with `--otlp-endpoint`, the task that
/// exports its spans.
fn start_tracing(cfg: &NodeConfig) -> Tracer {
    let Some(traces) = &cfg.traces else {
        return Tracer::off();
    };
    let (tracer, spans) = Tracer::new(traces.sampling);
    tokio::spawn(crate::otlp::export(
        traces.endpoint.clone(),
        cfg.name.clone(),
        spans,
    ));
    tracer
}

/// Help text for every metric weft exports (DESIGN section 8).
fn describe_metrics() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "weft_requests_total",
        "Attempts by service, caller (the calling service, - through the shared proxy), direction (outbound: sent by this node; inbound: handed by this node to its own instance) and outcome class"
    );
    describe_counter!(
        "weft_access_log_dropped_total",
        "Access log lines dropped because the writer fell behind"
    );
    describe_gauge!(
        "weft_tap_listeners",
        "Taps listening to this node's requests (weft tap, here or at another node)"
    );
    describe_counter!(
        "weft_spans_exported_total",
        "Spans of traced requests the OTLP collector accepted"
    );
    describe_counter!(
        "weft_spans_dropped_total",
        "Spans of traced requests dropped, by reason: queue_full (the exporter fell behind), export (the collector refused or did not answer)"
    );
    describe_counter!(
        "weft_limit_refused_total",
        "Requests and connections the mesh refused at one of its own limits, by limit"
    );
    describe_histogram!(
        "weft_request_duration_seconds",
        Unit::Seconds,
        "Time to the response head of each attempt"
    );
    describe_counter!(
        "weft_retries_total",
        "Retry decisions by outcome: success, failure, budget_exhausted, not_retryable, not_bufferable, hedge_won, hedge_lost"
    );
    describe_counter!(
        "weft_retry_budget_exhausted_total",
        "Retries the retry budget refused"
    );
    describe_counter!(
        "weft_outage_holds_total",
        "Requests held before their first attempt because they arrived during an outage of the service (learned policy)"
    );
    describe_gauge!("weft_members", "Cluster members by state");
    describe_counter!(
        "weft_requests_rate_limited_total",
        "Requests (TCP: connections) refused at a cluster-wide rate limit (429 rate-limited), by service and caller, on the node that refused them"
    );
    describe_counter!(
        "weft_requests_overloaded_total",
        "Requests refused at once (503 overloaded) for their service's adaptive concurrency limit, by service and caller"
    );
    describe_counter!(
        "weft_requests_denied_total",
        "Calls the cluster's intentions denied (403 forbidden), by service and caller, on the node that refused them"
    );
    describe_counter!(
        "weft_caller_claims_rejected_total",
        "Requests whose calling node named a caller service it hosts no registration of; they went on as the anonymous caller"
    );
    describe_counter!(
        "weft_tunnel_streams_total",
        "QUIC streams opened to peer nodes"
    );
    describe_counter!(
        "weft_tunnel_connections_total",
        "QUIC connections established to peer nodes"
    );
    describe_counter!(
        "weft_tunnel_refused_total",
        "Tunnel connections and streams refused, by reason: handshake (no valid cluster certificate), revoked, untrusted, no_node_name, not_a_member, too_many_connections, unregistered_instance, protocol_mismatch"
    );
    describe_counter!(
        "weft_actor_restarts_total",
        "Actors restarted by their supervisor after a panic in a handler"
    );
    describe_counter!(
        "weft_gossip_rejected_total",
        "Gossip datagrams dropped before reaching gossip, by reason"
    );
    describe_counter!(
        "weft_gossip_bytes_total",
        "Bytes of sealed gossip datagrams sent and received"
    );
    describe_counter!(
        "weft_outlier_ejections_total",
        "Instances ejected by this node's passive outlier detection"
    );
    describe_counter!(
        "weft_outcomes_dropped_total",
        "Request outcomes dropped because the stats aggregator lagged"
    );
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Distinct clusters never mix: the id is derived from the cluster CA
/// certificate, which every node holds and which a gossip key rotation
/// leaves alone.
fn cluster_id(cluster_dir: &Path) -> Result<String, NodeError> {
    let ca = cluster_dir.join(init::CA_CERT);
    let pem =
        std::fs::read(&ca).map_err(|e| NodeError::Config(format!("{}: {e}", ca.display())))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| NodeError::Config(format!("{} holds no PEM certificate", ca.display())))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("weft-{hex}"))
}

/// The address this host is reached at, for a node bound to 0.0.0.0 without
/// `--advertise-gossip`: the source address of the route to the first seed
/// given as an address off loopback (on a host with several networks, the
/// one the cluster is on), else of the default route, else loopback. The
/// kernel picks the route; no packet is sent.
fn detect_ip(seeds: &[String]) -> std::net::IpAddr {
    let seed = seeds
        .iter()
        .filter_map(|s| s.parse::<SocketAddr>().ok())
        .find(|a| !a.ip().is_loopback() && !a.ip().is_unspecified());
    let outward = SocketAddr::from(([192, 0, 2, 1], 9));
    [seed, Some(outward)]
        .into_iter()
        .flatten()
        .find_map(|to| route_source(to).ok())
        .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]))
}

/// The local address the kernel would send from to reach `to`.
fn route_source(to: SocketAddr) -> std::io::Result<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(to)?;
    Ok(socket.local_addr()?.ip())
}

fn cluster_dir(cfg: &NodeConfig) -> Result<PathBuf, NodeError> {
    if let Some(dir) = &cfg.cluster {
        return Ok(dir.clone());
    }
    let dir = cfg.data_dir.join("cluster");
    if !dir.join(init::GOSSIP_KEY).exists() {
        init::init_cluster(&dir, false)?;
        announce(&format!(
            "weft: no --cluster given; created a single-host cluster in {} (copy it to other hosts, or pass --cluster, to let them join)",
            dir.display()
        ));
    }
    Ok(dir)
}

fn create_private_dir(dir: &Path) -> Result<(), NodeError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::Config(format!("--data-dir {}: {e}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| NodeError::Config(format!("--data-dir {}: {e}", dir.display())))
}

fn bind_socket(path: &Path) -> Result<UnixListener, NodeError> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(NodeError::Config(format!(
                "--socket {}: another weft node is serving this socket",
                path.display()
            )));
        }
        // A stale socket from a node that did not exit cleanly.
        let _ = std::fs::remove_file(path);
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| NodeError::Config(format!("--socket {}: {e}", path.display())))?;
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| NodeError::Config(format!("--socket {}: {e}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| NodeError::Config(format!("--socket {}: {e}", path.display())))?;
    Ok(listener)
}
