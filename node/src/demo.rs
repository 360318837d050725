//! `weft demo`: a whole mesh on this machine with no setup. Three nodes (child
//! processes of this binary) on free loopback ports, demo services (a
//! frontend that calls a catalog and payments; one payments instance flaps),
//! steady traffic through the mesh, operator config at work (an intention,
//! a rollout of catalog's v2, a rate limit on payments), the live health,
//! rollout and limit tables every second and the dashboard URL. Ctrl-C or
//! `--for` stops everything it started and removes its files.

use std::convert::Infallible;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;

use weft_runtime::caller::ANONYMOUS;
use weft_runtime::policy::intentions::{Action, Change, Intentions, Rule};
use weft_runtime::policy::rate::RateLimits;
use weft_runtime::policy::rollout::{Rollout, Rollouts};
use weft_runtime::tls::OperatorKey;

use crate::cluster_config::ConfigRecord;
use crate::{client, init, intentions, limits, rollouts, NodeError};

const NODES: usize = 3;

/// Runs the demo until Ctrl-C, or for `limit`.
pub fn run(limit: Option<Duration>) -> Result<(), NodeError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| NodeError::Io(e.to_string()))?;
    let dir = WorkDir::create()?;
    let mut nodes = Nodes::default();
    let result = rt.block_on(demo(&dir, &mut nodes, limit));
    nodes.stop();
    let removed = dir.path.display().to_string();
    drop(dir);
    match &result {
        Ok(()) => println!("\nweft demo: stopped {NODES} nodes and removed {removed}"),
        Err(e) => eprintln!("weft demo: {e}; stopped every node and removed {removed}"),
    }
    result
}

async fn demo(dir: &WorkDir, nodes: &mut Nodes, limit: Option<Duration>) -> Result<(), NodeError> {
    let cluster = dir.path.join("cluster");
    init::init_cluster(&cluster, false)?;
    println!(
        "weft demo: starting {NODES} nodes in {}",
        dir.path.display()
    );
    for i in 0..NODES {
        nodes.start(i, &dir.path, &cluster)?;
    }
    nodes.wait_formed(Duration::from_secs(30)).await?;
    let services = DemoServices::start().await?;
    services.register(nodes).await?;
    configure(&cluster, &dir.path, nodes).await?;
    tokio::spawn(traffic(nodes.list[0].proxy, "frontend", 20));
    tokio::spawn(traffic(nodes.list[2].proxy, "payments", 10));
    // Denied: catalog answers frontend only.
    tokio::spawn(traffic(nodes.list[1].proxy, "catalog", 2));
    let dashboard = format!("http://{}/", nodes.list[0].admin);
    println!("weft demo: {NODES} nodes up; dashboard at {dashboard}");
    let started = Instant::now();
    let until = limit.map(|d| started + d);
    let tty = std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if until.is_some_and(|u| Instant::now() >= u) {
            return Ok(());
        }
        if let Some(exited) = nodes.exited() {
            return Err(NodeError::Io(format!(
                "node {exited} exited; its log is in {}",
                dir.path.display()
            )));
        }
        let (_, health) =
            client::call(&nodes.list[0].socket, Method::GET, "/v1/health", None).await?;
        let mut out = std::io::stdout().lock();
        if tty {
            let _ = write!(out, "\x1b[2J\x1b[H");
        }
        let _ = writeln!(
            out,
            "weft demo, {}s: frontend calls catalog and payments through the mesh; payments-2 fails 400 ms of every 2 s",
            started.elapsed().as_secs()
        );
        let _ = writeln!(out, "{}", client::health_table(&health));
        let _ = writeln!(
            out,
            "catalog v2 rolling out by itself (weft rollout status)\n{}",
            client::rollouts_table(&health["rollouts"])
        );
        if let Ok((_, limits)) =
            client::call(&nodes.list[0].socket, Method::GET, "/v1/limits", None).await
        {
            let _ = writeln!(
                out,
                "the shared proxy's calls to payments limited across the cluster (weft limit)\n{}",
                client::limits_table(&limits, &health)
            );
        }
        if let Ok((_, edges)) =
            client::call(&nodes.list[0].socket, Method::GET, "/v1/edges", None).await
        {
            let _ = writeln!(
                out,
                "who calls whom (weft edges)\n{}",
                client::edges_table(&edges)
            );
        }
        let _ = writeln!(
            out,
            "dashboard: {dashboard}   Ctrl-C stops the demo and removes its files"
        );
        let _ = out.flush();
    }
}

/// The demo's cluster config, signed by an operator certificate issued for
/// the demo: one intention (the shared proxy's anonymous caller may not
/// call catalog directly; frontend may), so one edge of the graph shows a
/// deny; a rollout of catalog's v2 in steps of 5 s; and a limit of 5
/// requests a second on the anonymous caller's 10 a second to payments
/// (frontend's calls are not limited).
async fn configure(cluster: &Path, dir: &Path, nodes: &Nodes) -> Result<(), NodeError> {
    let operator = demo_operator(cluster, dir)?;
    let socket = &nodes.list[0].socket;
    let intentions = Intentions::default()
        .changed(Change::Set(Rule {
            source: "-".into(),
            destination: "catalog".into(),
            action: Action::Deny,
        }))
        .map_err(NodeError::Io)?;
    let record = intentions::Record {
        intentions,
        grant: None,
    };
    put_signed(&operator, socket, "/v1/intentions", record).await?;
    let rollout = Rollout {
        steps: vec![25, 50, 100],
        interval_secs: 5,
        ..Rollout::new("v1", "v2")
    };
    let rollouts = Rollouts::default()
        .with("catalog", Some(rollout))
        .map_err(NodeError::Io)?;
    let record = rollouts::Record {
        rollouts,
        grant: None,
    };
    put_signed(&operator, socket, "/v1/rollouts", record).await?;
    let rate = "5/s".parse().map_err(NodeError::Io)?;
    let limits = RateLimits::default()
        .with("payments", Some(ANONYMOUS), Some(rate))
        .map_err(NodeError::Io)?;
    let record = limits::Record {
        limits,
        grant: None,
    };
    put_signed(&operator, socket, "/v1/limits", record).await
}

/// An operator certificate for the demo, from its cluster's CA.
fn demo_operator(cluster: &Path, dir: &Path) -> Result<OperatorKey, NodeError> {
    let read = |f: &str| {
        std::fs::read_to_string(cluster.join(f)).map_err(|e| NodeError::Io(format!("{f}: {e}")))
    };
    let tls_error = |e: weft_runtime::tls::TlsError| NodeError::Io(e.to_string());
    let (cert, key) =
        weft_runtime::tls::issue_operator_cert(&read(init::CA_CERT)?, &read(init::CA_KEY)?, "demo")
            .map_err(tls_error)?;
    let (cert, key) =
        weft_runtime::tls::write_node_cert(&dir.join("operator"), "demo", &cert, &key)
            .map_err(tls_error)?;
    OperatorKey::load(&cert, &key).map_err(tls_error)
}

/// `record` signed by `operator`, put at `path` of the node at `socket`.
async fn put_signed<R: ConfigRecord>(
    operator: &OperatorKey,
    socket: &Path,
    path: &str,
    record: R,
) -> Result<(), NodeError> {
    let grant = operator.grant(R::OBJECT, record.version(), &record.digest());
    let body =
        serde_json::to_value(record.with_grant(grant)).map_err(|e| NodeError::Io(e.to_string()))?;
    let (status, reply) = client::call(socket, Method::PUT, path, Some(body)).await?;
    client::check(status, &reply)
}

// === The work dir ===

/// A fresh temporary directory, removed when dropped.
struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    fn create() -> Result<Self, NodeError> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let path = std::env::temp_dir().join(format!("weft-demo-{}-{stamp}", std::process::id()));
        std::fs::create_dir_all(&path)
            .map_err(|e| NodeError::Io(format!("cannot create {}: {e}", path.display())))?;
        Ok(WorkDir { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// === The nodes ===

struct DemoNode {
    name: String,
    gossip: u16,
    socket: PathBuf,
    proxy: SocketAddr,
    admin: SocketAddr,
    child: Child,
}

#[derive(Default)]
struct Nodes {
    list: Vec<DemoNode>,
}

impl Nodes {
    fn start(&mut self, i: usize, dir: &Path, cluster: &Path) -> Result<(), NodeError> {
        let name = format!("demo-{}", i + 1);
        let data = dir.join(&name);
        let [gossip, tunnel, proxy, admin] = [(); 4].map(|_| free_port());
        let seed = format!(
            "127.0.0.1:{}",
            self.list.first().map_or(gossip, |n| n.gossip)
        );
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .map_err(|e| NodeError::Io(e.to_string()))?;
        let exe = std::env::current_exe().map_err(|e| NodeError::Io(e.to_string()))?;
        let mut cmd = Command::new(exe);
        cmd.arg("node")
            .args(["--name", &name])
            .arg("--cluster")
            .arg(cluster)
            .arg("--data-dir")
            .arg(&data)
            .args(["--gossip", &format!("127.0.0.1:{gossip}")])
            .args(["--tunnel", &format!("127.0.0.1:{tunnel}")])
            .args(["--proxy", &format!("127.0.0.1:{proxy}")])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .args(["--seeds", &seed])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| NodeError::Io(e.to_string()))?)
            .stderr(log);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| NodeError::Io(format!("cannot start {name}: {e}")))?;
        self.list.push(DemoNode {
            name,
            gossip,
            socket: data.join("weft.sock"),
            proxy: ([127, 0, 0, 1], proxy).into(),
            admin: ([127, 0, 0, 1], admin).into(),
            child,
        });
        Ok(())
    }

    /// Waits until every node lists every node alive.
    async fn wait_formed(&mut self, within: Duration) -> Result<(), NodeError> {
        let deadline = Instant::now() + within;
        for node in &self.list {
            loop {
                let alive = client::call(&node.socket, Method::GET, "/v1/members", None)
                    .await
                    .ok()
                    .and_then(|(_, body)| {
                        let members = body["members"].as_array()?.clone();
                        Some(members.iter().filter(|m| m["state"] == "alive").count())
                    })
                    .unwrap_or(0);
                if alive == NODES {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(NodeError::Io(format!(
                        "the demo cluster did not form within {within:?} ({} sees {alive} of {NODES})",
                        node.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The name of a node that exited on its own, if any.
    fn exited(&mut self) -> Option<String> {
        self.list
            .iter_mut()
            .find_map(|n| matches!(n.child.try_wait(), Ok(Some(_))).then(|| n.name.clone()))
    }

    /// SIGTERM every node (a graceful leave), then SIGKILL what is left.
    fn stop(&mut self) {
        for node in &self.list {
            signal(&node.child, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for node in &mut self.list {
            while Instant::now() < deadline && matches!(node.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
    }
}

#[allow(unsafe_code)]
fn signal(child: &Child, sig: i32) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the pid of a child this process started and has
        // not reaped yet.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// The node gets SIGTERM if the demo itself dies (even by SIGKILL).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches only
    // the child's own process attributes between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
}

/// A loopback port free for TCP and UDP (the OS picks it).
fn free_port() -> u16 {
    loop {
        let Ok(tcp) = std::net::TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = tcp.local_addr().map(|a| a.port()) else {
            continue;
        };
        if std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

// === The demo services ===

/// How a demo instance answers.
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// A JSON answer after `delay_ms`.
    Steady { delay_ms: u64 },
    /// 503 for the first `down_ms` of every `period_ms`.
    Flapping { down_ms: u64, period_ms: u64 },
    /// Calls catalog and payments through its own outbound proxy port (the
    /// one its registration got back), so
    /// they see `weft-caller: frontend`.
    Frontend {
        outbound: &'static OnceLock<SocketAddr>,
    },
}

struct Instance {
    service: &'static str,
    node: usize,
    /// Its version's tag, for the service rolled out.
    tag: Option<&'static str>,
    port: u16,
    /// Where to put its own outbound proxy port, if it calls others.
    outbound: Option<&'static OnceLock<SocketAddr>>,
}

struct DemoServices {
    instances: Vec<Instance>,
}

impl DemoServices {
    async fn start() -> Result<Self, NodeError> {
        static FRONTEND_OUTBOUND: OnceLock<SocketAddr> = OnceLock::new();
        let outbound = &FRONTEND_OUTBOUND;
        let plan = [
            ("frontend", 0, None, Behaviour::Frontend { outbound }),
            ("catalog", 1, Some("v1"), Behaviour::Steady { delay_ms: 5 }),
            ("catalog", 2, Some("v2"), Behaviour::Steady { delay_ms: 6 }),
            ("payments", 1, None, Behaviour::Steady { delay_ms: 12 }),
            (
                "payments",
                2,
                None,
                Behaviour::Flapping {
                    down_ms: 400,
                    period_ms: 2000,
                },
            ),
        ];
        let mut instances = Vec::new();
        for (service, node, tag, behaviour) in plan {
            let port = serve(service, behaviour).await?;
            let outbound = match behaviour {
                Behaviour::Frontend { outbound } => Some(outbound),
                _ => None,
            };
            instances.push(Instance {
                service,
                node,
                tag,
                port,
                outbound,
            });
        }
        Ok(DemoServices { instances })
    }

    /// Registers each instance with the node on "its host", with an HTTP check.
    async fn register(&self, nodes: &Nodes) -> Result<(), NodeError> {
        for (i, inst) in self.instances.iter().enumerate() {
            // frontend-1, catalog-1, catalog-2, payments-1, payments-2.
            let nth = self.instances[..=i]
                .iter()
                .filter(|o| o.service == inst.service)
                .count();
            let mut body = json!({
                "name": inst.service,
                "port": inst.port,
                "id": format!("{}-{nth}", inst.service),
                "check": {"http": "/health", "interval_ms": 1000},
            });
            if inst.outbound.is_some() {
                body["outbound"] = json!(true);
            }
            if let Some(tag) = inst.tag {
                body["tags"] = json!([tag]);
            }
            let socket = &nodes.list[inst.node].socket;
            let (status, reply) =
                client::call(socket, Method::PUT, "/v1/services", Some(body)).await?;
            client::check(status, &reply)?;
            let given = reply["outbound"].as_str().and_then(|a| a.parse().ok());
            if let (Some(slot), Some(at)) = (inst.outbound, given) {
                let _ = slot.set(at);
            }
        }
        Ok(())
    }
}

async fn serve(service: &'static str, behaviour: Behaviour) -> Result<u16, NodeError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| NodeError::Io(e.to_string()))?;
    let port = listener
        .local_addr()
        .map_err(|e| NodeError::Io(e.to_string()))?
        .port();
    let epoch = Instant::now();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let client = Arc::new(client);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let client = client.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let client = client.clone();
                    async move {
                        Ok::<_, Infallible>(answer(service, behaviour, epoch, &client, req).await)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(port)
}

type DemoClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn answer(
    service: &str,
    behaviour: Behaviour,
    epoch: Instant,
    client: &DemoClient,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let health = req.uri().path() == "/health";
    let (status, body) = match behaviour {
        Behaviour::Steady { delay_ms } => {
            if !health {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            }
            (StatusCode::OK, json!({"service": service, "ok": true}))
        }
        Behaviour::Flapping { down_ms, period_ms } => {
            let phase = epoch.elapsed().as_millis() as u64 % period_ms.max(1);
            if phase < down_ms && !health {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"service": service, "ok": false}),
                )
            } else {
                (StatusCode::OK, json!({"service": service, "ok": true}))
            }
        }
        Behaviour::Frontend { outbound } if !health => {
            let Some(&outbound) = outbound.get() else {
                return Response::builder()
                    .status(StatusCode::SERVICE_UNAVAILABLE)
                    .body(Full::new(Bytes::from_static(b"not registered yet")))
                    .unwrap_or_default();
            };
            let catalog = call_through(client, outbound, "catalog").await;
            let payments = call_through(client, outbound, "payments").await;
            let ok = catalog == Some(200) && payments == Some(200);
            let status = if ok {
                StatusCode::OK
            } else {
                StatusCode::BAD_GATEWAY
            };
            (
                status,
                json!({"service": service, "catalog": catalog, "payments": payments}),
            )
        }
        Behaviour::Frontend { .. } => (StatusCode::OK, json!({"service": service, "ok": true})),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp
}

/// One GET to `service` through a node's proxy: the status, if any.
async fn call_through(client: &DemoClient, proxy: SocketAddr, service: &str) -> Option<u16> {
    let req = Request::get(format!("http://{proxy}/"))
        .header("host", service)
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), client.request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Some(status)
}

/// Steady traffic: `rps` GETs a second to `service` through `proxy`.
async fn traffic(proxy: SocketAddr, service: &'static str, rps: u64) {
    let client: DemoClient = Client::builder(TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let client = Arc::new(client);
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / rps.max(1)));
    loop {
        tick.tick().await;
        let client = client.clone();
        tokio::spawn(async move { call_through(&client, proxy, service).await });
    }
}
