//! mTLS over real QUIC endpoints on 127.0.0.1: who may connect, and to whom.

use super::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

/// A CA like `weft init` makes; returns `(cert_pem, key_pem)`.
fn make_ca() -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "weft cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + Duration::from_secs(10 * 365 * 24 * 3600)).into();
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

static DIRS: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let n = DIRS.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir =
            std::env::temp_dir().join(format!("weft-tls-{tag}-{}-{n}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Issues a cert for `node` from the CA and loads it as an Identity.
fn identity(dir: &Path, ca: &(String, String), node: &str) -> Identity {
    let ca_path = dir.join(format!("ca-{node}.pem"));
    std::fs::write(&ca_path, &ca.0).unwrap();
    let (cert, key) = issue_node_cert(&ca.0, &ca.1, node).unwrap();
    let (cert, key) = write_node_cert(dir, node, &cert, &key).unwrap();
    Identity::load(&ca_path, &cert, &key).unwrap()
}

fn pem_to_parts(
    cert_pem: &str,
    key_pem: &str,
) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
    let certs = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .unwrap()
        .unwrap();
    (certs, key)
}

fn roots_of(ca_pem: &str) -> Arc<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    Arc::new(roots)
}

/// Two nodes' tunnel connection over loopback, with weft's own TLS,
/// transport settings and runtime: `(caller's side, server's side)`, and the
/// endpoints to keep alive for as long as the connection is used.
pub(crate) async fn connected_pair() -> (quinn::Connection, quinn::Connection, [quinn::Endpoint; 2])
{
    let dir = TempDir::new("pair");
    let ca = make_ca();
    let n1 = identity(&dir.0, &ca, "n1");
    let n2 = identity(&dir.0, &ca, "n2");
    let endpoint = |server: Option<quinn::ServerConfig>| {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let runtime = Arc::new(crate::tunnel::TunnelRuntime);
        quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime).unwrap()
    };
    let server = endpoint(Some(server_config(&n2).unwrap()));
    let client = endpoint(None);
    let dialed = client
        .connect_with(
            client_config(&n1).unwrap(),
            server.local_addr().unwrap(),
            &node_server_name("n2"),
        )
        .unwrap();
    let accepted = async { server.accept().await.unwrap().await.unwrap() };
    let (caller, served) = tokio::join!(dialed, accepted);
    (caller.unwrap(), served, [client, server])
}

/// A test server: answers "ping" with "pong" on every bidi stream, and reports
/// the node name of each peer it served.
struct Server {
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    peers: tokio::sync::mpsc::UnboundedReceiver<Option<String>>,
    served: Arc<AtomicUsize>,
}

fn serve(id: &Identity) -> Server {
    let endpoint =
        quinn::Endpoint::server(server_config(id).unwrap(), "127.0.0.1:0".parse().unwrap())
            .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, peers) = tokio::sync::mpsc::unbounded_channel();
    let served = Arc::new(AtomicUsize::new(0));
    let ep = endpoint.clone();
    let count = served.clone();
    tokio::spawn(async move {
        while let Some(incoming) = ep.accept().await {
            let tx = tx.clone();
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let _ = tx.send(peer_node(&conn));
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let Ok(msg) = recv.read_to_end(64).await else {
                        return;
                    };
                    if msg == b"ping" {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = send.write_all(b"pong").await;
                        let _ = send.finish();
                    }
                }
            });
        }
    });
    Server {
        endpoint,
        addr,
        peers,
        served,
    }
}

/// Connects, sends "ping" on a bidi stream and returns the reply and the
/// server's node name; any failure (handshake, refusal, timeout) is an Err.
async fn ping(
    config: quinn::ClientConfig,
    addr: SocketAddr,
    server_name: &str,
) -> Result<(Vec<u8>, Option<String>), String> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let attempt = async {
        let conn = endpoint
            .connect_with(config, addr, server_name)
            .map_err(|e| format!("connect: {e}"))?
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| format!("open: {e}"))?;
        send.write_all(b"ping")
            .await
            .map_err(|e| format!("write: {e}"))?;
        send.finish().map_err(|e| format!("finish: {e}"))?;
        let reply = recv.read_to_end(64).await.map_err(|e| {
            let why = conn
                .close_reason()
                .map(|r| r.to_string())
                .unwrap_or_default();
            format!("read: {e}: {why}")
        })?;
        Ok::<_, String>((reply, peer_node(&conn)))
    };
    let result = tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .map_err(|_| "timed out".to_string())
        .and_then(|r| r);
    endpoint.close(0u32.into(), b"done");
    result
}

#[tokio::test]
async fn node_to_node_ping_pong_with_mutual_auth() {
    let dir = TempDir::new("pingpong");
    let ca = make_ca();
    let n1 = identity(&dir.0, &ca, "n1");
    let n2 = identity(&dir.0, &ca, "n2");
    assert_eq!(n1.node, "n1");
    assert_eq!(n2.node, "n2");
    let mut server = serve(&n2);

    let (reply, server_node) = ping(
        client_config(&n1).unwrap(),
        server.addr,
        &node_server_name("n2"),
    )
    .await
    .unwrap();
    assert_eq!(reply, b"pong");
    assert_eq!(server_node.as_deref(), Some("n2"));
    assert_eq!(server.peers.recv().await, Some(Some("n1".to_string())));
    assert_eq!(server.served.load(Ordering::SeqCst), 1);
    server.endpoint.close(0u32.into(), b"done");
}

#[tokio::test]
async fn wrong_server_name_is_refused() {
    let dir = TempDir::new("wrongname");
    let ca = make_ca();
    let n1 = identity(&dir.0, &ca, "n1");
    let n2 = identity(&dir.0, &ca, "n2");
    let server = serve(&n2);
    let err = ping(
        client_config(&n1).unwrap(),
        server.addr,
        &node_server_name("n3"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("handshake"), "{err}");
    assert_eq!(server.served.load(Ordering::SeqCst), 0);
    server.endpoint.close(0u32.into(), b"done");
}

#[tokio::test]
async fn self_signed_or_missing_client_cert_is_refused() {
    let dir = TempDir::new("selfsigned");
    let ca = make_ca();
    let n2 = identity(&dir.0, &ca, "n2");
    let server = serve(&n2);

    // A self-signed cert that names a node, but not from the cluster CA.
    let mut params = CertificateParams::new(vec![node_server_name("evil")]).unwrap();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, "evil");
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (certs, key) = pem_to_parts(&cert.pem(), &key.serialize_pem());
    let evil = Identity {
        node: "evil".into(),
        certs,
        key,
        roots: roots_of(&ca.0),
        crls: Vec::new(),
    };
    let err = ping(
        client_config(&evil).unwrap(),
        server.addr,
        &node_server_name("n2"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("handshake failed"), "{err}");

    // No client certificate at all.
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots_of(&ca.0))
        .with_no_client_auth();
    let mut tls = tls;
    tls.alpn_protocols = alpn_protocols();
    let anon = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ));
    let err = ping(anon, server.addr, &node_server_name("n2"))
        .await
        .unwrap_err();
    assert!(err.contains("handshake failed"), "{err}");

    assert_eq!(server.served.load(Ordering::SeqCst), 0);
    server.endpoint.close(0u32.into(), b"done");
}

#[tokio::test]
async fn cert_from_another_ca_is_refused_both_ways() {
    let dir = TempDir::new("otherca");
    let ca = make_ca();
    let other = make_ca();
    let n2 = identity(&dir.0, &ca, "n2");
    let server = serve(&n2);

    // Client cert from the other CA, while trusting the right CA: the server refuses.
    let (cert, key) = issue_node_cert(&other.0, &other.1, "n1").unwrap();
    let (certs, key) = pem_to_parts(&cert, &key);
    let stranger = Identity {
        node: "n1".into(),
        certs,
        key,
        roots: roots_of(&ca.0),
        crls: Vec::new(),
    };
    let err = ping(
        client_config(&stranger).unwrap(),
        server.addr,
        &node_server_name("n2"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("handshake failed"), "{err}");

    // A server from the other CA: the client refuses it.
    let impostor = identity(&dir.0, &other, "n3");
    let impostor_server = serve(&impostor);
    let n1 = identity(&dir.0, &ca, "n1");
    let err = ping(
        client_config(&n1).unwrap(),
        impostor_server.addr,
        &node_server_name("n3"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("handshake"), "{err}");

    assert_eq!(server.served.load(Ordering::SeqCst), 0);
    assert_eq!(impostor_server.served.load(Ordering::SeqCst), 0);
    server.endpoint.close(0u32.into(), b"done");
    impostor_server.endpoint.close(0u32.into(), b"done");
}

#[test]
fn load_refuses_a_key_readable_by_others() {
    let dir = TempDir::new("insecure");
    let ca = make_ca();
    let ca_path = dir.0.join("ca.pem");
    std::fs::write(&ca_path, &ca.0).unwrap();
    let (cert, key) = issue_node_cert(&ca.0, &ca.1, "n1").unwrap();
    let (cert, key) = write_node_cert(&dir.0, "n1", &cert, &key).unwrap();
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&cert).unwrap().permissions().mode() & 0o777,
        0o644
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Identity::load(&ca_path, &cert, &key).unwrap_err();
    assert!(
        matches!(err, TlsError::InsecureKey(ref p) if p == &key),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("chmod 600") && msg.contains("n1.key"), "{msg}");
}

#[test]
fn load_refuses_a_cert_from_another_ca_and_a_mismatched_key() {
    let dir = TempDir::new("mismatch");
    let ca = make_ca();
    let other = make_ca();
    let ca_path = dir.0.join("ca.pem");
    std::fs::write(&ca_path, &ca.0).unwrap();

    let (cert, key) = issue_node_cert(&other.0, &other.1, "n1").unwrap();
    let (cert_path, key_path) = write_node_cert(&dir.0, "n1", &cert, &key).unwrap();
    let err = Identity::load(&ca_path, &cert_path, &key_path).unwrap_err();
    assert!(matches!(err, TlsError::Cert(_)), "{err}");

    let (cert, _) = issue_node_cert(&ca.0, &ca.1, "n2").unwrap();
    let (_, other_key) = issue_node_cert(&ca.0, &ca.1, "n2").unwrap();
    let (cert_path, key_path) = write_node_cert(&dir.0, "n2", &cert, &other_key).unwrap();
    let err = Identity::load(&ca_path, &cert_path, &key_path).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

#[test]
fn issue_rejects_bad_input_without_panicking() {
    let ca = make_ca();
    let other = make_ca();
    assert!(matches!(
        issue_node_cert("not pem", &ca.1, "n1"),
        Err(TlsError::Pem(_))
    ));
    assert!(matches!(
        issue_node_cert(&ca.0, "not pem", "n1"),
        Err(TlsError::Pem(_))
    ));
    assert!(matches!(
        issue_node_cert(&ca.0, &other.1, "n1"),
        Err(TlsError::Cert(_))
    ));
    for bad in ["", "a/b", "../x", "a b", ".n", "n."] {
        assert!(
            matches!(issue_node_cert(&ca.0, &ca.1, bad), Err(TlsError::Config(_))),
            "{bad:?}"
        );
    }
    let junk = "-----BEGIN CERTIFICATE-----\nMAMCAQA=\n-----END CERTIFICATE-----\n";
    assert!(issue_node_cert(junk, &ca.1, "n1").is_err());
}

#[test]
fn issued_cert_names_the_node() {
    let ca = make_ca();
    let (cert, _) = issue_node_cert(&ca.0, &ca.1, "web-1.dc2").unwrap();
    let (certs, _) = pem_to_parts(&cert, &ca.1);
    assert_eq!(der::dns_names(&certs[0]), vec!["web-1.dc2.node.weft"]);
    assert_eq!(der::common_name(&certs[0]).as_deref(), Some("web-1.dc2"));
    assert_eq!(node_of_cert(&certs[0]).as_deref(), Some("web-1.dc2"));
}

#[test]
fn from_cluster_dir_issues_when_it_holds_the_ca_key() {
    let cluster = TempDir::new("cluster");
    let data = TempDir::new("data");
    let ca = make_ca();
    std::fs::write(cluster.0.join(CA_CERT_FILE), &ca.0).unwrap();
    let key_path = cluster.0.join(CA_KEY_FILE);
    std::fs::write(&key_path, &ca.1).unwrap();
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();

    let id = Identity::from_cluster_dir(&cluster.0, "n7", &data.0).unwrap();
    assert_eq!(id.node, "n7");
    assert!(data.0.join("tls/n7.pem").exists());
    assert!(data.0.join("tls/n7.key").exists());

    std::fs::remove_file(&key_path).unwrap();
    let err = Identity::from_cluster_dir(&cluster.0, "n7", &data.0).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("weft cert issue n7") && msg.contains("--cert"),
        "{msg}"
    );
}

#[test]
fn revocation_lists_are_checked_before_they_are_used() {
    let dir = TempDir::new("crl");
    let ca = make_ca();
    let n1 = identity(&dir.0, &ca, "n1");
    let (n2_cert, _) = issue_node_cert(&ca.0, &ca.1, "n2").unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };

    // Revoking n2 leaves n1 usable, and n1 now distrusts n2's certificate.
    let revoked_n2 = Revoked::of(&n2_cert).unwrap();
    assert_eq!(revoked_n2.node, "n2");
    let list = write(
        "n2.crl",
        &revocation_list(&ca.0, &ca.1, &[revoked_n2]).unwrap(),
    );
    let n1 = n1.with_crl(&list).unwrap();
    let n2_der = first_cert_der(&n2_cert, "n2").unwrap();
    let verdict = n1
        .client_verifier()
        .unwrap()
        .verify_client_cert(&n2_der, &[], UnixTime::now());
    assert!(
        matches!(
            verdict,
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked
            ))
        ),
        "{verdict:?}"
    );

    // A list revoking this node's own certificate, a list of another CA,
    // and a file holding no list are refused with a reason.
    let n1_again = identity(&dir.0, &ca, "n1");
    let n1_pem = std::fs::read_to_string(dir.0.join("n1.pem")).unwrap();
    let own = write(
        "own.crl",
        &revocation_list(&ca.0, &ca.1, &[Revoked::of(&n1_pem).unwrap()]).unwrap(),
    );
    let err = n1_again.with_crl(&own).unwrap_err().to_string();
    assert!(err.contains("revokes this node's own certificate"), "{err}");
    let other = make_ca();
    let foreign = write(
        "foreign.crl",
        &revocation_list(&other.0, &other.1, &[]).unwrap(),
    );
    let err = identity(&dir.0, &ca, "n1")
        .with_crl(&foreign)
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot be used with the cluster CA"), "{err}");
    let not_a_list = write("cert.pem", &n2_cert);
    let err = identity(&dir.0, &ca, "n1")
        .with_crl(&not_a_list)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no PEM revocation list"), "{err}");
}

/// The trust `id` has, as a watch the signer and checkers read.
fn trust_of(id: &Identity) -> tokio::sync::watch::Receiver<Arc<PeerTrust>> {
    tokio::sync::watch::channel(Arc::new(PeerTrust::new(id).unwrap())).1
}

/// A node's state signature verifies only with that node's certificate
/// and only over what it signed; another CA's, a revoked and a
/// misnamed certificate are each refused with their reason.
#[test]
fn gossip_state_is_believed_only_from_its_own_node() {
    use weft_gossip::attest::{Attestor, Rejection};
    let dir = TempDir::new("attest");
    let ca = make_ca();
    let n1 = identity(&dir.0, &ca, "n1");
    let n2 = identity(&dir.0, &ca, "n2");
    let n2_pem = std::fs::read_to_string(dir.0.join("n2.pem")).unwrap();
    let signer = NodeAttestor::new(&n2, trust_of(&n2)).unwrap();
    let checker = NodeAttestor::new(&n1, trust_of(&n1)).unwrap();
    let cert = signer.certificate().to_vec();
    let signature = signer.sign(b"n2's keys");
    assert_eq!(
        checker.verify("n2", &cert, b"n2's keys", &signature),
        Ok(())
    );
    assert_eq!(
        checker.verify("n2", &cert, b"other keys", &signature),
        Err(Rejection::BadSignature)
    );
    assert_eq!(
        checker.verify("n3", &cert, b"n2's keys", &signature),
        Err(Rejection::CertificateNameMismatch)
    );
    let elsewhere = TempDir::new("attest-stranger");
    let stranger = identity(&elsewhere.0, &make_ca(), "n2");
    let forged = NodeAttestor::new(&stranger, trust_of(&stranger)).unwrap();
    assert_eq!(
        checker.verify(
            "n2",
            forged.certificate(),
            b"n2's keys",
            &forged.sign(b"n2's keys")
        ),
        Err(Rejection::UntrustedCertificate)
    );
    // Once n1 reloads a list revoking n2, n2's state is not believed.
    let list = dir.0.join("n2.crl");
    std::fs::write(
        &list,
        revocation_list(&ca.0, &ca.1, &[Revoked::of(&n2_pem).unwrap()]).unwrap(),
    )
    .unwrap();
    let revoking = identity(&dir.0, &ca, "n1").with_crl(&list).unwrap();
    let checker = NodeAttestor::new(&revoking, trust_of(&revoking)).unwrap();
    assert_eq!(
        checker.verify("n2", &cert, b"n2's keys", &signature),
        Err(Rejection::RevokedCertificate)
    );
}

/// Grants verify only from an operator certificate of the cluster CA, over
/// exactly what was granted; a node certificate cannot grant.
#[test]
fn only_an_operator_certificate_grants() {
    use weft_gossip::grant::Authority;
    let dir = TempDir::new("operator");
    let ca = make_ca();
    let n1 = identity(&dir.0, &ca, "n1");
    let authority = OperatorAuthority::new(trust_of(&n1));
    let (cert, key) = issue_operator_cert(&ca.0, &ca.1, "alice").unwrap();
    let (cert, key) = write_node_cert(&dir.0, "alice", &cert, &key).unwrap();
    let alice = OperatorKey::load(&cert, &key).unwrap();
    assert_eq!(alice.name, "alice");
    let grant = alice.grant("keyring", 7, "abc");
    assert_eq!(authority.verify(&grant), Ok("alice".to_string()));
    let mut moved = grant.clone();
    moved.version = u64::MAX;
    assert!(authority
        .verify(&moved)
        .unwrap_err()
        .contains("does not verify"));
    // A node's certificate and key are no operator's.
    let err = OperatorKey::load(&dir.0.join("n1.pem"), &dir.0.join("n1.key")).unwrap_err();
    assert!(
        err.to_string().contains("not an operator certificate"),
        "{err}"
    );
    // Another CA's operator is nobody here.
    let other = make_ca();
    let (cert, key) = issue_operator_cert(&other.0, &other.1, "mallory").unwrap();
    let (cert, key) = write_node_cert(&dir.0, "mallory", &cert, &key).unwrap();
    let mallory = OperatorKey::load(&cert, &key).unwrap();
    assert!(authority
        .verify(&mallory.grant("keyring", 7, "abc"))
        .unwrap_err()
        .contains("not trusted"));
}
