//! Test harness: starts real `weft node` processes on 127.0.0.1 and talks to
//! their Unix sockets with a hyper client. Shared by the end-to-end tests and
//! the measurement examples.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The weft binary under test.
pub fn weft_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WEFT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_weft") {
        return PathBuf::from(p);
    }
    // Examples live in target/<profile>/examples/, the binary one level up.
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("weft"))
        .expect("weft binary next to the example")
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// `weft init` of a cluster dir `cluster` under `parent`; returns its path.
pub fn init_cluster(parent: &Path) -> PathBuf {
    let cluster_dir = parent.join("cluster");
    let out = Command::new(weft_bin())
        .args(["init", "--dir"])
        .arg(&cluster_dir)
        .output()
        .expect("weft init");
    assert!(out.status.success(), "weft init failed: {out:?}");
    cluster_dir
}

/// Ports handed out lie in `[FIRST_PORT, FIRST_PORT + PORTS)`: below Linux's
/// ephemeral range (32768 up), so no connection's or client socket's port
/// taken by the kernel between our check and the node's bind can clash.
const FIRST_PORT: u16 = 20_000;
const PORTS: u16 = 12_700;

/// A port free for both TCP and UDP on 127.0.0.1, unique within this process.
/// Each test process starts at its own offset, so concurrent ones rarely meet.
pub fn free_port() -> u16 {
    let offset = (std::process::id() % 127) as u16 * 100;
    loop {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = FIRST_PORT + (offset + n % PORTS) % PORTS;
        let tcp = TcpListener::bind(("127.0.0.1", port)).is_ok();
        let udp = UdpSocket::bind(("127.0.0.1", port)).is_ok();
        if tcp && udp {
            return port;
        }
    }
}

/// One running (or stopped) node.
pub struct Node {
    pub name: String,
    pub data_dir: PathBuf,
    pub socket: PathBuf,
    pub gossip: SocketAddr,
    pub admin: SocketAddr,
    pub proxy: SocketAddr,
    pub tunnel: SocketAddr,
    pub args: Vec<String>,
    pub log: PathBuf,
    pub child: Option<Child>,
    /// The `weft` binary it runs (another release's, in upgrade tests).
    pub bin: PathBuf,
}

impl Node {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.bin)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("WEFT_TEST_FAULTS", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn weft node");
        self.child = Some(child);
    }
}

/// A local cluster of real nodes in a temp dir.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub cluster_dir: PathBuf,
    pub nodes: Vec<Node>,
    pub interval_ms: u64,
    /// The binary new nodes run.
    pub bin: PathBuf,
}

impl TestCluster {
    /// `weft init` plus `n` nodes seeded at the first; waits until every node
    /// lists all `n` as alive.
    pub async fn start(n: usize) -> TestCluster {
        let mut c = TestCluster::new();
        for _ in 0..n {
            c.add_node();
        }
        c.wait_converged(n, Duration::from_secs(15)).await;
        c
    }

    /// An initialised cluster dir without nodes.
    pub fn new() -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let cluster_dir = init_cluster(dir.path());
        TestCluster {
            dir,
            cluster_dir,
            nodes: Vec::new(),
            interval_ms: 100,
            bin: weft_bin(),
        }
    }

    /// Starts one more node; returns its index.
    pub fn add_node(&mut self) -> usize {
        let cluster_dir = self.cluster_dir.clone();
        self.add_node_in(&cluster_dir)
    }

    /// Starts a node with the given cluster dir (another cluster's, to test isolation).
    pub fn add_node_in(&mut self, cluster_dir: &Path) -> usize {
        self.add_node_full(cluster_dir, &[])
    }

    /// Starts one more node with extra `weft node` flags.
    pub fn add_node_with(&mut self, extra: &[&str]) -> usize {
        let cluster_dir = self.cluster_dir.clone();
        self.add_node_full(&cluster_dir, extra)
    }

    fn add_node_full(&mut self, cluster_dir: &Path, extra: &[&str]) -> usize {
        let i = self.nodes.len();
        let name = format!("n{}", i + 1);
        let data_dir = self.dir.path().join(&name);
        let socket = data_dir.join("weft.sock");
        let gossip: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let tunnel: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let proxy: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let seed = self.nodes.first().map(|n| n.gossip).unwrap_or(gossip);
        let mut args = vec![
            "node".to_string(),
            "--name".into(),
            name.clone(),
            "--cluster".into(),
            cluster_dir.display().to_string(),
            "--gossip".into(),
            gossip.to_string(),
            "--tunnel".into(),
            tunnel.to_string(),
            "--proxy".into(),
            proxy.to_string(),
            "--admin".into(),
            admin.to_string(),
            "--seeds".into(),
            seed.to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--gossip-interval".into(),
            format!("{}ms", self.interval_ms),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let log = self.dir.path().join(format!("{name}.log"));
        let mut node = Node {
            name,
            data_dir,
            socket,
            gossip,
            admin,
            proxy,
            tunnel,
            args,
            log,
            child: None,
            bin: self.bin.clone(),
        };
        node.spawn();
        self.nodes.push(node);
        i
    }

    /// Starts node `i` again with the same flags and data dir, after a
    /// SIGKILL if it still runs (a second process would find its ports
    /// taken while the first one went on serving).
    pub fn restart(&mut self, i: usize) {
        self.kill9(i);
        self.nodes[i].spawn();
    }

    /// Replaces node `i` by the same node (name, flags, data dir) running
    /// `bin`, as a rolling upgrade does: SIGTERM, wait for its drain to end,
    /// start the other binary.
    pub fn replace(&mut self, i: usize, bin: &Path) {
        let status = self.signal_and_wait(i, libc::SIGTERM, Duration::from_secs(40));
        assert!(
            status.success(),
            "{} drained with {status}",
            self.nodes[i].name
        );
        self.nodes[i].bin = bin.to_path_buf();
        self.nodes[i].spawn();
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal to node `i` (it keeps running, or not, as it decides).
    pub fn signal(&self, i: usize, sig: i32) {
        let pid = self.nodes[i].pid().expect("node running");
        #[allow(unsafe_code)]
        // SAFETY: kill(2) on the pid of our own child, not yet reaped.
        unsafe {
            libc::kill(pid, sig);
        }
    }

    /// Sends a signal and waits (bounded) for the exit status.
    pub fn signal_and_wait(&mut self, i: usize, sig: i32, within: Duration) -> ExitStatus {
        self.signal(i, sig);
        self.wait_exit(i, within)
    }

    /// Waits (bounded) for node `i` to exit; its status.
    pub fn wait_exit(&mut self, i: usize, within: Duration) -> ExitStatus {
        let mut child = self.nodes[i].child.take().expect("node running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("node {} did not exit within {within:?}", self.nodes[i].name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until every running node lists `n` alive members.
    pub async fn wait_converged(&self, n: usize, within: Duration) {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let socket = node.socket.clone();
            wait_for(
                within,
                &format!("{} sees {n} alive members", node.name),
                || {
                    let socket = socket.clone();
                    async move {
                        let (_, body) = get(&socket, "/v1/members").await.ok()?;
                        let alive = body["members"]
                            .as_array()?
                            .iter()
                            .filter(|m| m["state"] == "alive")
                            .count();
                        (alive == n).then_some(())
                    }
                },
            )
            .await;
        }
    }

    /// The last lines of every node's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let text = std::fs::read_to_string(&node.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(30)..];
            out.push_str(&format!("--- {} ---\n{}\n", node.name, tail.join("\n")));
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// Polls `probe` every 25 ms until it yields a value or `within` passes (then panics).
pub async fn wait_for<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One request over a node's Unix socket (raw body); status and JSON (Null if not JSON).
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Vec<u8>,
) -> std::io::Result<(u16, Value)> {
    weft_client::request_raw(socket, method, path, Bytes::from(body))
        .await
        .map_err(std::io::Error::other)
}

pub async fn get(socket: &Path, path: &str) -> std::io::Result<(u16, Value)> {
    request(socket, Method::GET, path, Vec::new()).await
}

pub async fn put_json(socket: &Path, path: &str, body: &Value) -> std::io::Result<(u16, Value)> {
    request(socket, Method::PUT, path, serde_json::to_vec(body).unwrap()).await
}

pub async fn delete(socket: &Path, path: &str) -> std::io::Result<(u16, Value)> {
    request(socket, Method::DELETE, path, Vec::new()).await
}

/// Ids of the instances of `service` that `socket`'s node lists.
pub async fn instance_ids(socket: &Path, service: &str) -> Option<Vec<String>> {
    let (_, body) = get(socket, "/v1/services").await.ok()?;
    Some(
        body["services"][service]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(|i| i["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// State of member `name` as `socket`'s node reports it.
/// The health of instance `id` as node `socket` sees it in the catalog.
pub async fn health_of(socket: &std::path::Path, service: &str, id: &str) -> Option<String> {
    let (_, body) = get(socket, "/v1/services").await.ok()?;
    body["services"][service]
        .as_array()?
        .iter()
        .find(|i| i["id"] == id)
        .and_then(|i| i["health"].as_str().map(String::from))
}

pub async fn member_state(socket: &Path, name: &str) -> Option<String> {
    let (_, body) = get(socket, "/v1/members").await.ok()?;
    body["members"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == name)
        .and_then(|m| m["state"].as_str().map(String::from))
}

/// Registers an `api` instance tagged `tag` on node `node` at `port`,
/// checked every 200 ms by TCP connect (no probe counts as a request).
pub async fn register_tagged_api(c: &TestCluster, node: usize, tag: &str, port: u16) {
    let body = serde_json::json!({"name": "api", "id": format!("api-{tag}-{node}"),
        "port": port, "tags": [tag], "check": {"tcp": true, "interval_ms": 200}});
    let (status, reply) = put_json(&c.nodes[node].socket, "/v1/services", &body)
        .await
        .unwrap();
    assert_eq!(status, 200, "{reply}");
}

/// Registers `service` on node `socket` at `port` (with `extra` JSON fields) and
/// waits until every node in `all` lists the instance.
pub async fn register_everywhere(
    c: &TestCluster,
    on: usize,
    service: &str,
    port: u16,
    protocol: &str,
) -> String {
    let (status, body) = put_json(
        &c.nodes[on].socket,
        "/v1/services",
        &serde_json::json!({"name": service, "port": port, "protocol": protocol}),
    )
    .await
    .expect("register");
    assert_eq!(status, 200, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    for node in c.nodes.iter().filter(|n| n.child.is_some()) {
        let id = id.clone();
        wait_for(Duration::from_secs(10), "registration propagates", || {
            let socket = node.socket.clone();
            let id = id.clone();
            async move {
                instance_ids(&socket, service)
                    .await?
                    .contains(&id)
                    .then_some(())
            }
        })
        .await;
    }
    id
}

/// How a test upstream answers.
#[derive(Debug, Clone, Copy)]
pub enum Behavior {
    /// Always this status, after this delay.
    Fixed(u16, Duration),
    /// 503 during the first `down` of every `period` (counted from `epoch`), else 200.
    Flap {
        down: Duration,
        period: Duration,
        epoch: Instant,
    },
    /// 200, but every `every`-th request (by this upstream's count) only
    /// after `delay`: a tail, like a pause in the instance.
    Tail { every: u64, delay: Duration },
    /// 200 after `service_time`, serving at most `concurrent` requests at
    /// once; the rest wait their turn (a fixed capacity).
    Capacity {
        concurrent: usize,
        service_time: Duration,
    },
    /// Every `every`-th request (by this upstream's count) `status`, the
    /// rest 200: a version that fails a share of its requests.
    FailEvery { every: u64, status: u16 },
}

/// A real HTTP/1.1 upstream on 127.0.0.1 that counts the requests it gets.
pub struct Upstream {
    pub port: u16,
    pub hits: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Requests answered with a 5xx (those that reached it during an outage).
    pub failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Answers `status` at once.
    pub async fn start(port: u16, status: u16) -> Upstream {
        Upstream::with(port, Behavior::Fixed(status, Duration::ZERO)).await
    }

    /// Answers `status` after `delay`.
    pub async fn start_slow(port: u16, status: u16, delay: Duration) -> Upstream {
        Upstream::with(port, Behavior::Fixed(status, delay)).await
    }

    /// Any behaviour; port 0 picks a free one.
    pub async fn with(port: u16, behavior: Behavior) -> Upstream {
        let listener = wait_for(Duration::from_secs(5), "bind upstream", || async {
            tokio::net::TcpListener::bind(("127.0.0.1", port))
                .await
                .ok()
        })
        .await;
        let port = listener.local_addr().unwrap().port();
        let hits = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = hits.clone();
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failures = failed.clone();
        let capacity = std::sync::Arc::new(tokio::sync::Semaphore::new(match behavior {
            Behavior::Capacity { concurrent, .. } => concurrent,
            _ => 0,
        }));
        let task = tokio::spawn(async move {
            // Connections live in this set: aborting the server drops them all,
            // as a dying process would.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counter = counter.clone();
                let failures = failures.clone();
                let capacity = capacity.clone();
                conns.spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let counter = counter.clone();
                        let failures = failures.clone();
                        let capacity = capacity.clone();
                        async move {
                            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let status = match behavior {
                                Behavior::Tail { every, delay } => {
                                    if (n + 1).is_multiple_of(every.max(1)) {
                                        tokio::time::sleep(delay).await;
                                    }
                                    200
                                }
                                Behavior::FailEvery { every, status } => {
                                    if (n + 1).is_multiple_of(every.max(1)) {
                                        status
                                    } else {
                                        200
                                    }
                                }
                                Behavior::Capacity { service_time, .. } => {
                                    let _turn = capacity.acquire().await;
                                    tokio::time::sleep(service_time).await;
                                    200
                                }
                                Behavior::Fixed(status, delay) => {
                                    // A zero sleep still waits for the timer's next tick (1 ms).
                                    if !delay.is_zero() {
                                        tokio::time::sleep(delay).await;
                                    }
                                    status
                                }
                                Behavior::Flap {
                                    down,
                                    period,
                                    epoch,
                                } => {
                                    let phase = Duration::from_nanos(
                                        (epoch.elapsed().as_nanos() % period.as_nanos().max(1))
                                            as u64,
                                    );
                                    if phase < down {
                                        503
                                    } else {
                                        200
                                    }
                                }
                            };
                            if status >= 500 {
                                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            let mut resp = hyper::Response::new(http_body_util::Full::new(
                                Bytes::from_static(b"ok"),
                            ));
                            *resp.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream {
            port,
            hits,
            failed,
            task,
        }
    }

    /// Requests received so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops serving, closing every connection; returns the port.
    pub fn stop(self) -> u16 {
        self.task.abort();
        self.port
    }
}

/// One request through a node's proxy on a fresh connection: (status, weft-error).
pub async fn proxy_call(proxy: SocketAddr, method: Method, service: &str) -> (u16, Option<String>) {
    let stream = tokio::net::TcpStream::connect(proxy).await.expect("proxy");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{service}/"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let err = resp
        .headers()
        .get("weft-error")
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    (resp.status().as_u16(), err)
}

/// The text of a node's `/metrics`.
pub async fn metrics_text(admin: SocketAddr) -> String {
    let stream = tokio::net::TcpStream::connect(admin).await.expect("admin");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = Request::get("/metrics")
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("metrics");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

/// The sum of every sample of `metric` whose labels include all of `labels`
/// (`name="value"` pairs), from Prometheus text.
pub fn metric_sum(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// GET through a node's proxy; the status.
pub async fn proxy_get(proxy: SocketAddr, service: &str) -> u16 {
    proxy_call(proxy, Method::GET, service).await.0
}

/// The learning scenario matrix.
pub mod learning;

/// A certificate for `names` signed by the cluster's CA (as anyone holding
/// `ca.key` could make), PEM cert and key.
pub fn ca_signed(cluster: &std::path::Path, names: &[&str], cn: &str) -> (String, String) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose,
    };
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(cluster.join("ca.key")).unwrap()).unwrap();
    let mut issuer = CertificateParams::default();
    issuer
        .distinguished_name
        .push(DnType::CommonName, "weft cluster CA");
    issuer.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    issuer.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = issuer.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer, &ca_key).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// An operator certificate and key for the cluster (`weft cert issue
/// --operator`), issued once per cluster dir.
pub fn operator(c: &TestCluster) -> (std::path::PathBuf, std::path::PathBuf) {
    let out = c.dir.path().join("operator");
    let (cert, key) = (out.join("ops.pem"), out.join("ops.key"));
    if !cert.exists() {
        let done = std::process::Command::new(weft_bin())
            .args(["cert", "issue", "ops", "--operator", "--cluster"])
            .arg(&c.cluster_dir)
            .arg("--out")
            .arg(&out)
            .output()
            .expect("run weft cert issue --operator");
        assert!(
            done.status.success(),
            "{}",
            String::from_utf8_lossy(&done.stderr)
        );
    }
    (cert, key)
}

/// A client that keeps its connections to the proxies open.
pub type PooledClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// A [`PooledClient`] that keeps up to 1024 idle connections per proxy.
pub fn pooled_client() -> PooledClient {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build_http()
}

/// A response's status and head, or why there is none.
pub type Answer = Result<(u16, hyper::HeaderMap), String>;

/// One GET of `service` through `proxy` on a pooled connection.
pub async fn pooled_get(client: &PooledClient, proxy: SocketAddr, service: &str) -> Answer {
    let req = Request::get(format!("http://{proxy}/"))
        .header("host", service)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    Ok((resp.status().as_u16(), resp.headers().clone()))
}

/// One request of an [`open_loop`].
pub struct Sent {
    /// The index of the proxy it went through.
    pub proxy: usize,
    /// The second of the load it was sent in.
    pub second: usize,
    /// How long its answer took.
    pub took: Duration,
    /// The answer; none within the loop's patience is an error.
    pub answer: Answer,
}

/// `rates[i]` GETs a second of `service` through `proxies[i]` for
/// `seconds`, each sent on its own schedule whatever the answers take (an
/// open loop); every request, once all are answered or `patience` passed
/// for each.
pub async fn open_loop(
    client: &PooledClient,
    proxies: &[SocketAddr],
    rates: &[u64],
    service: &str,
    seconds: u64,
    patience: Duration,
) -> Vec<Sent> {
    let start = Instant::now();
    let service: std::sync::Arc<str> = service.into();
    let mut senders = Vec::new();
    for (i, (&proxy, &rate)) in proxies.iter().zip(rates).enumerate() {
        let (client, service) = (client.clone(), service.clone());
        senders.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(Duration::from_secs(1) / rate as u32);
            let mut requests = Vec::new();
            for _ in 0..rate * seconds {
                ticks.tick().await;
                let second = start.elapsed().as_secs().min(seconds - 1) as usize;
                let (client, service) = (client.clone(), service.clone());
                requests.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer =
                        tokio::time::timeout(patience, pooled_get(&client, proxy, &service))
                            .await
                            .unwrap_or_else(|_| Err(format!("no answer within {patience:?}")));
                    Sent {
                        proxy: i,
                        second,
                        took: sent.elapsed(),
                        answer,
                    }
                }));
            }
            let mut all = Vec::new();
            for request in requests {
                all.push(request.await.expect("request task"));
            }
            all
        }));
    }
    let mut all = Vec::new();
    for sender in senders {
        all.extend(sender.await.expect("sender task"));
    }
    all
}

/// `weft ARGS` against node `node`'s socket, signed as the cluster's
/// operator when `as_operator` (never by an operator named in the
/// environment otherwise): stdout on success, stderr on failure.
pub fn weft_at(
    c: &TestCluster,
    node: usize,
    args: &[&str],
    as_operator: bool,
) -> Result<String, String> {
    let mut cmd = Command::new(weft_bin());
    cmd.arg("--socket")
        .arg(&c.nodes[node].socket)
        .args(args)
        .env_remove("WEFT_OPERATOR_CERT")
        .env_remove("WEFT_OPERATOR_KEY");
    if as_operator {
        let (cert, key) = operator(c);
        cmd.arg("--operator-cert")
            .arg(cert)
            .arg("--operator-key")
            .arg(key);
    }
    let out = cmd.output().expect("run weft");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// An HTTP GET head for `instance` of `service` that names `caller`
/// (`weft-caller`), sent straight over a tunnel connection to node
/// `target` presenting `cert_pem`/`key_pem`: the head the node answers
/// with, if it answers one.
pub async fn forward_as(
    c: &TestCluster,
    target: usize,
    (cert_pem, key_pem): (&str, &str),
    (service, instance): (&str, &str),
    caller: &str,
) -> Option<weft_runtime::wire::ResponseHead> {
    use weft_runtime::wire::{self, RequestHead, StreamKind};
    let (_endpoint, conn) = connect_as(c, target, cert_pem, key_pem).await.ok()?;
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    let head = RequestHead {
        version: wire::WIRE_VERSION,
        kind: StreamKind::Http,
        service: service.into(),
        instance: instance.into(),
        method: "GET".into(),
        uri: "/".into(),
        headers: vec![
            ("host".into(), service.as_bytes().to_vec()),
            ("weft-caller".into(), caller.as_bytes().to_vec()),
        ],
        deadline_ms: 5000,
        attempt: 0,
        http2: false,
        end_stream: true,
    };
    send.write_all(&wire::encode(&head).ok()?).await.ok()?;
    send.finish().ok()?;
    let answer = recv.read_to_end(64 * 1024).await.unwrap_or_default();
    match wire::decode::<wire::ResponseHead>(&answer) {
        Ok(wire::Decoded::Frame { msg, .. }) => Some(msg),
        _ => None,
    }
}

/// A QUIC connection to node `target` presenting `cert_pem`/`key_pem`
/// (with its endpoint, which must outlive it).
pub async fn connect_as(
    c: &TestCluster,
    target: usize,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(quinn::Endpoint, quinn::Connection), Box<dyn std::error::Error>> {
    use rustls::pki_types::pem::PemObject;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca_pem = std::fs::read(c.cluster_dir.join("ca.pem"))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&ca_pem) {
        roots.add(cert?)?;
    }
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)?;
    tls.alpn_protocols = vec![b"weft/1".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(std::sync::Arc::new(crypto)));
    let name = format!("{}.node.weft", c.nodes[target].name);
    let conn = endpoint.connect(c.nodes[target].tunnel, &name)?.await?;
    Ok((endpoint, conn))
}

/// A Python virtual environment under the test build's temp dir with
/// `packages` installed from PyPI, made once and kept (a `.ready` file
/// marks a finished one); its `python`.
pub fn python_venv(name: &str, packages: &[&str]) -> PathBuf {
    let base = option_env!("CARGO_TARGET_TMPDIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("venv-{name}"));
    let ready = dir.join(".ready");
    let wanted = packages.join(" ");
    if std::fs::read_to_string(&ready).ok().as_deref() == Some(wanted.as_str()) {
        return dir.join("bin/python");
    }
    // Built beside, then moved into place: concurrent tests never see half
    // a venv.
    let building = dir.with_extension(format!("{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&building);
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&building)
        .status()
        .expect("python3 -m venv");
    assert!(made.success(), "python3 -m venv failed");
    let pip = Command::new(building.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check"])
        .args(packages)
        .status()
        .expect("pip install");
    assert!(pip.success(), "pip install {wanted} failed");
    std::fs::write(building.join(".ready"), &wanted).expect("mark the venv ready");
    let _ = std::fs::remove_dir_all(&dir);
    if std::fs::rename(&building, &dir).is_err() {
        // Another test moved its copy in first.
        let _ = std::fs::remove_dir_all(&building);
    }
    dir.join("bin/python")
}

/// Collects the JSON lines `reader` gives (a child's standard output) on a
/// thread of their own, as they come.
pub fn json_lines(
    reader: impl std::io::BufRead + Send + 'static,
) -> std::sync::Arc<std::sync::Mutex<Vec<Value>>> {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        for line in reader.lines().map_while(Result::ok) {
            let value = serde_json::from_str(&line).expect("a JSON line");
            sink.lock().unwrap().push(value);
        }
    });
    lines
}

/// Runs `cmd` with `input` on its standard input; its output.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}
