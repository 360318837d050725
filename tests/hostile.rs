//! A compromised member: it holds the cluster's gossip key and a node
//! certificate of its own (`evil`) signed by the cluster CA, and runs
//! weft's own gossip stack. It lies about others; every lie is refused and
//! counted, the victims keep serving, and no local port is reachable that
//! was not registered with its protocol.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use weft_gossip::attest::Attestor;
use weft_gossip::seal::SealedTransport;
use weft_gossip::{Cluster, ClusterConfig, Key, NodeInfo, NodeStatus, Protocol, ServiceRecord};
use weft_runtime::tls;
use weft_runtime::wire::{self, RequestHead, StreamKind};

/// The cluster id every node derives from the CA certificate.
fn cluster_id(cluster_dir: &Path) -> String {
    let pem = std::fs::read(cluster_dir.join("ca.pem")).unwrap();
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .unwrap()
        .unwrap();
    let digest = ring::digest::digest(&ring::digest::SHA256, &der);
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("weft-{hex}")
}

fn gossip_key(cluster_dir: &Path) -> [u8; 32] {
    use base64::Engine as _;
    let text = std::fs::read_to_string(cluster_dir.join("gossip.key")).unwrap();
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap()
        .try_into()
        .unwrap()
}

/// What the compromised host holds: the gossip key and `evil`'s
/// certificate and key, signed by the cluster CA.
struct Hostile {
    cluster_dir: std::path::PathBuf,
    seed: SocketAddr,
    attestor: Arc<dyn Attestor>,
    cert_pem: String,
    key_pem: String,
}

impl Hostile {
    fn new(c: &TestCluster) -> Hostile {
        let (cert_pem, key_pem) = ca_signed(&c.cluster_dir, &["evil.node.weft"], "evil");
        let dir = c.dir.path().join("evil");
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("evil.pem"), dir.join("evil.key"));
        std::fs::write(&cert, &cert_pem).unwrap();
        tls::write_atomic(&key, key_pem.as_bytes(), 0o600).unwrap();
        let identity = tls::Identity::load(&c.cluster_dir.join("ca.pem"), &cert, &key).unwrap();
        let trust =
            tokio::sync::watch::channel(Arc::new(tls::PeerTrust::new(&identity).unwrap())).1;
        Hostile {
            cluster_dir: c.cluster_dir.clone(),
            seed: c.nodes[0].gossip,
            attestor: Arc::new(tls::NodeAttestor::new(&identity, trust).unwrap()),
            cert_pem,
            key_pem,
        }
    }

    /// Joins gossip as `name` (incarnation `generation`) with `keys`,
    /// signing with evil's certificate when `signed`.
    async fn join(
        &self,
        name: &str,
        generation: u64,
        keys: Vec<(Key, String)>,
        signed: bool,
    ) -> Cluster {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = ClusterConfig {
            node_name: name.into(),
            generation,
            listen_addr: addr,
            advertise_addr: addr,
            seeds: vec![self.seed.to_string()],
            interval: Duration::from_millis(100),
            cluster_id: cluster_id(&self.cluster_dir),
            attestor: signed.then(|| self.attestor.clone()),
        };
        let transport = SealedTransport::new(gossip_key(&self.cluster_dir));
        Cluster::start(&config, keys, &transport).await.unwrap()
    }
}

fn node_info(tunnel: SocketAddr) -> String {
    serde_json::to_string(&NodeInfo {
        schema: weft_gossip::SCHEMA,
        tunnel: tunnel.to_string(),
        admin: "127.0.0.1:1".into(),
        version: "0.1.0".into(),
        status: NodeStatus::Alive,
        zone: None,
        bridge: false,
    })
    .unwrap()
}

fn instance(name: &str, id: &str, port: u16, protocol: Protocol) -> (Key, String) {
    let record = ServiceRecord::new(name, id, port, protocol);
    (
        Key::svc(id).unwrap(),
        serde_json::to_string(&record).unwrap(),
    )
}

/// A TCP port no one registered (an sshd or a database), counting the
/// connections it accepts.
async fn unregistered_port() -> (u16, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((_conn, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    (port, accepted)
}

/// A stream to `target`'s tunnel as evil, asking for `instance` of
/// `service` as `kind`; the mesh error the node answers with.
async fn ask(
    c: &TestCluster,
    target: usize,
    h: &Hostile,
    kind: StreamKind,
    service: &str,
    instance: &str,
) -> Option<String> {
    let (_endpoint, conn) = connect_as(c, target, &h.cert_pem, &h.key_pem)
        .await
        .expect("evil is a member");
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let head = RequestHead {
        version: wire::WIRE_VERSION,
        kind,
        service: service.into(),
        instance: instance.into(),
        method: String::new(),
        uri: String::new(),
        headers: Vec::new(),
        deadline_ms: 1000,
        attempt: 0,
        http2: false,
        end_stream: kind == StreamKind::Tcp,
    };
    send.write_all(&wire::encode(&head).unwrap()).await.unwrap();
    let answer = recv.read_to_end(64 * 1024).await.unwrap_or_default();
    let Ok(wire::Decoded::Frame { msg, .. }) = wire::decode::<wire::ResponseHead>(&answer) else {
        return None;
    };
    msg.error
}

async fn catalog(socket: &Path) -> Value {
    get(socket, "/v1/services").await.unwrap().1["services"].clone()
}

async fn counted(admin: SocketAddr, metric: &str, label: &str) {
    wait_for(
        Duration::from_secs(10),
        &format!("{metric}{{{label}}} counted"),
        || async move {
            let text = metrics_text(admin).await;
            (metric_sum(&text, metric, &[label]) >= 1.0).then_some(())
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_compromised_member_can_lie_only_about_itself() {
    let c = TestCluster::start(2).await;
    let (n1, n2) = (&c.nodes[0], &c.nodes[1]);
    let web = Upstream::start(0, 200).await;
    let (status, _) = put_json(
        &n2.socket,
        "/v1/services",
        &json!({"name": "web", "id": "web-1", "port": web.port}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "web reaches n1", || async {
        (instance_ids(&n1.socket, "web").await == Some(vec!["web-1".into()])).then_some(())
    })
    .await;
    let n2_generation = get(&n1.socket, "/v1/members").await.unwrap().1["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "n2")
        .map(|m| m["generation"].as_u64().unwrap())
        .unwrap();
    let (ssh_port, ssh_accepted) = unregistered_port().await;
    let h = Hostile::new(&c);

    // evil, a member in its own right, votes n2's web out, claims a huge,
    // instant window of web calls, and offers a keyring of the highest
    // version that adds a key of its own (no operator granted it).
    let stats = r#"{"v":1,"r":1000000000000,"f":0,"t":0,"q":1e9,"l50":0.0,"l99":0.0,"l999":0.0,"n":0,"er":0}"#;
    let primary = get(&n1.socket, "/v1/keys").await.unwrap().1["primary"].clone();
    let keyring = json!({
        "version": u64::MAX,
        "primary": primary,
        "keys": [primary, "0badc0de"],
    });
    let _evil = h
        .join(
            "evil",
            1,
            vec![
                (Key::Node, node_info("127.0.0.1:1".parse().unwrap())),
                (
                    Key::Eject {
                        node: "n2".into(),
                        id: "web-1".into(),
                    },
                    "1".into(),
                ),
                (Key::Stats("web".into()), stats.into()),
                (Key::Keyring, keyring.to_string()),
            ],
            true,
        )
        .await;
    // A newer incarnation of n2, hosting "ssh" on the unregistered port,
    // signed with evil's own certificate.
    let forged = vec![
        (Key::Node, node_info(n2.tunnel)),
        instance("ssh", "ssh-1", ssh_port, Protocol::Tcp),
    ];
    let _fake_n2 = h
        .join("n2", n2_generation + 1_000_000, forged.clone(), true)
        .await;
    // A node that signs nothing, with a second vote against web-1.
    let mut ghost = forged;
    ghost.push((
        Key::Eject {
            node: "n2".into(),
            id: "web-1".into(),
        },
        "1".into(),
    ));
    let _ghost = h.join("ghost", 1, ghost, false).await;

    // Each lie is refused and counted where it lands.
    counted(
        n1.admin,
        "weft_gossip_rejected_total",
        "reason=\"certificate_name_mismatch\"",
    )
    .await;
    counted(
        n1.admin,
        "weft_gossip_rejected_total",
        "reason=\"unsigned_state\"",
    )
    .await;
    counted(
        n2.admin,
        "weft_gossip_rejected_total",
        "reason=\"claims_about_self\"",
    )
    .await;
    wait_for(Duration::from_secs(10), "evil is a member", || async {
        (member_state(&n1.socket, "evil").await.as_deref() == Some("alive")).then_some(())
    })
    .await;

    // The tunnel: evil is a member, yet reaches nothing n2 did not register
    // with that protocol.
    assert_eq!(
        ask(&c, 1, &h, StreamKind::Tcp, "ssh", "ssh-1")
            .await
            .as_deref(),
        Some("no-healthy-instance")
    );
    assert_eq!(
        ask(&c, 1, &h, StreamKind::Tcp, "web", "web-1")
            .await
            .as_deref(),
        Some("bad-request")
    );
    counted(
        n2.admin,
        "weft_tunnel_refused_total",
        "reason=\"unregistered_instance\"",
    )
    .await;
    counted(
        n2.admin,
        "weft_tunnel_refused_total",
        "reason=\"protocol_mismatch\"",
    )
    .await;

    // evil names a caller it hosts no registration of (checkout lives on
    // n1): the request is served as the anonymous caller's, and counted.
    let (status, _) = put_json(
        &n1.socket,
        "/v1/services",
        &json!({"name": "checkout", "id": "checkout-1", "port": 9}),
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "n2 sees checkout", || async {
        instance_ids(&n2.socket, "checkout")
            .await
            .filter(|ids| !ids.is_empty())
    })
    .await;
    let answer = forward_as(
        &c,
        1,
        (&h.cert_pem, &h.key_pem),
        ("web", "web-1"),
        "checkout",
    )
    .await;
    assert_eq!(answer.map(|head| head.status), Some(200));
    counted(n2.admin, "weft_caller_claims_rejected_total", "").await;

    // Every view holds what the real nodes said, nothing the liar did.
    for node in [n1, n2] {
        let services = catalog(&node.socket).await;
        assert!(services.get("ssh").is_none(), "{services}");
        let web = &services["web"];
        assert_eq!(web.as_array().map(Vec::len), Some(1), "{services}");
        assert_eq!(web[0]["node"], "n2");
        assert_eq!(
            web[0]["health"], "passing",
            "one verified vote ejects nothing"
        );
        let members = get(&node.socket, "/v1/members").await.unwrap().1["members"].clone();
        let names: Vec<&str> = members
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["name"].as_str())
            .collect();
        assert!(!names.contains(&"ghost"), "{members}");
        let n2_seen = members
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "n2")
            .unwrap();
        assert_eq!(n2_seen["generation"], n2_generation, "{members}");
    }
    // evil's summary reached n1, and taught it no timeout: one node's
    // word (1e12 requests at p99.9 = 0) is not enough to learn from.
    let timeout = wait_for(
        Duration::from_secs(10),
        "evil's summary is merged",
        || async {
            let health = get(&n1.socket, "/v1/health").await.ok()?.1;
            let timeout = health["services"]["web"]["learned"]["timeout"].clone();
            (timeout["nodes"].as_u64() >= Some(1)).then_some(timeout)
        },
    )
    .await;
    assert_ne!(timeout["source"], "learned", "{timeout}");
    assert_eq!(timeout["ms"], 30_000, "{timeout}");
    // No node took the keyring no operator granted.
    counted(
        n1.admin,
        "weft_gossip_rejected_total",
        "reason=\"ungranted_keyring\"",
    )
    .await;
    for node in [n1, n2] {
        let keys = get(&node.socket, "/v1/keys").await.unwrap().1;
        assert_eq!(keys["version"], 0, "{keys}");
        let here = keys["keys"].as_array().unwrap().iter();
        assert_eq!(
            here.filter(|k| k["installed_here"] == true).count(),
            1,
            "{keys}"
        );
    }
    // The victims keep serving, through the mesh and with a timeout the
    // liar's statistics did not teach.
    for _ in 0..20 {
        assert_eq!(proxy_get(n1.proxy, "web").await, 200);
    }
    assert_eq!(
        ssh_accepted.load(Ordering::Relaxed),
        0,
        "the unregistered port was reached"
    );
}
