//! Node identity: certificates signed by the cluster CA, and the mTLS configs of the QUIC tunnel.

mod attestor;
mod der;
mod operator;

pub use attestor::NodeAttestor;
pub use operator::{operator_of_cert, OperatorAuthority, OperatorKey, OPERATOR_DOMAIN};

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::wire::TunnelVersion;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{client::WebPkiServerVerifier, RootCertStore};

/// The ALPN protocols of node-to-node tunnels, newest first (see
/// [`TunnelVersion`]); a peer that speaks none of them is refused.
pub fn alpn_protocols() -> Vec<Vec<u8>> {
    TunnelVersion::SPOKEN
        .iter()
        .map(|v| v.alpn().to_vec())
        .collect()
}

/// The tunnel version a connection's handshake settled on (a peer that
/// named none speaks the first one).
pub fn negotiated(conn: &quinn::Connection) -> TunnelVersion {
    conn.handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol)
        .and_then(|name| TunnelVersion::from_alpn(&name))
        .unwrap_or(TunnelVersion::V1)
}
/// DNS suffix of node names in certificates (`<node>.node.weft`).
pub const NODE_DOMAIN: &str = "node.weft";
/// File name of the cluster CA certificate in a cluster dir.
pub const CA_CERT_FILE: &str = "ca.pem";
/// File name of the cluster CA key in a cluster dir (only where certificates are issued).
pub const CA_KEY_FILE: &str = "ca.key";

/// How long an issued node certificate is valid.
const CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far `not_before` is backdated, so peers with slow clocks accept a fresh cert.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_BIDI_STREAMS: u32 = 4096;
/// Bytes a peer may have in flight on one stream before it must wait for us
/// to read: bounds what one slow instance makes the node buffer.
const STREAM_WINDOW: u32 = 1024 * 1024;
/// Bytes a peer may have in flight on one connection, all streams together.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// The largest UDP payload the tunnel sends or accepts, found per path by
/// MTU discovery: above Ethernet's 1452 where the path allows (jumbo frames,
/// loopback), and small enough that a batch of quinn's 10 segments stays
/// under the 64 KiB a UDP segmentation offload send may carry.
pub const MAX_UDP_PAYLOAD: u16 = 6500;
/// Packets a peer may take before it must acknowledge them (within its
/// 25 ms ACK delay all the same).
const ACK_ELICITING_THRESHOLD: u32 = 9;
/// Upper bound on the PEM files we read; a certificate or key is a few KiB.
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Errors of loading, issuing and using node certificates.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A PEM file is malformed or lacks the expected item.
    #[error("{0}")]
    Pem(String),
    /// A certificate or key is invalid, mismatched or not signed by the cluster CA.
    #[error("{0}")]
    Cert(String),
    /// A private key file can be read by group or others.
    #[error("{} can be read by group or others; run `chmod 600 {}`", .0.display(), .0.display())]
    InsecureKey(PathBuf),
    /// The TLS/QUIC configuration could not be built, or the node lacks a certificate.
    #[error("{0}")]
    Config(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The DNS name every node certificate carries, and the server name a client
/// dials: the handshake then proves the peer is the node gossip named.
pub fn node_server_name(node: &str) -> String {
    format!("{node}.{NODE_DOMAIN}")
}

/// Refuses node names that cannot be a DNS name or a file name, so a bad
/// `--name` fails at issue time rather than at the first handshake.
fn check_node_name(node: &str) -> Result<(), TlsError> {
    let bad = node.is_empty()
        || node.starts_with('.')
        || node.ends_with('.')
        || node.contains('/')
        || !node
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
    if bad || ServerName::try_from(node_server_name(node)).is_err() {
        return Err(TlsError::Config(format!(
            "node name {node:?} cannot be used in a certificate: use letters, digits, '-', '_' and inner '.'"
        )));
    }
    Ok(())
}

/// The ring provider, always passed explicitly: the process-wide default may
/// be unset or differ in other binaries linking this crate.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn first_cert_der(pem: &str, what: &str) -> Result<CertificateDer<'static>, TlsError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| TlsError::Pem(format!("{what} holds no PEM certificate")))?
        .map_err(|e| TlsError::Pem(format!("{what}: {e}")))
}

/// Rebuilds the CA's subject name for rcgen from the certificate's DER, so the
/// issuer field of leaves is byte-identical to the CA subject (webpki compares bytes).
fn ca_distinguished_name(subject: &[u8]) -> Result<DistinguishedName, TlsError> {
    let unsupported = |why: &str| TlsError::Cert(format!("CA subject name: {why}"));
    let rdns = der::name_rdns(subject).ok_or_else(|| unsupported("malformed"))?;
    let mut dn = DistinguishedName::new();
    for rdn in rdns {
        let [attr] = rdn.as_slice() else {
            return Err(unsupported("multi-valued names are not supported"));
        };
        let arcs = der::oid_arcs(attr.oid).ok_or_else(|| unsupported("bad attribute type"))?;
        let ty = DnType::from_oid(&arcs);
        if dn.get(&ty).is_some() {
            return Err(unsupported("repeated attribute types are not supported"));
        }
        let text = std::str::from_utf8(attr.value)
            .map_err(|_| unsupported("attribute is not text"))?
            .to_owned();
        let value = match attr.tag {
            0x0c => DnValue::Utf8String(text),
            0x13 => DnValue::PrintableString(
                text.try_into()
                    .map_err(|_| unsupported("bad PrintableString"))?,
            ),
            0x16 => DnValue::Ia5String(text.try_into().map_err(|_| unsupported("bad IA5String"))?),
            _ => return Err(unsupported("unsupported string type")),
        };
        dn.push(ty, value);
    }
    Ok(dn)
}

/// The CA as rcgen's signing issuer, its key, and its subject name (DER).
fn ca_issuer(
    ca_cert_pem: &str,
    ca_key_pem: &str,
) -> Result<(rcgen::Certificate, KeyPair, Vec<u8>), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)
        .map_err(|e| TlsError::Pem(format!("CA key is not a PEM private key: {e}")))?;
    let ca_der = first_cert_der(ca_cert_pem, "CA certificate")?;
    let ca = der::cert_fields(&ca_der)
        .ok_or_else(|| TlsError::Cert("CA certificate is not valid X.509".into()))?;
    if ca.spki.raw != ca_key.public_key_der().as_slice() {
        return Err(TlsError::Cert(
            "the CA key does not belong to the CA certificate".into(),
        ));
    }

    // rcgen 0.13 signs with an issuer `Certificate`; without its x509-parser
    // feature (no `from_ca_cert_pem`) we rebuild one from the CA's name and key.
    let mut issuer_params = CertificateParams::default();
    issuer_params.distinguished_name = ca_distinguished_name(ca.subject.raw)?;
    issuer_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    issuer_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let issuer = issuer_params
        .self_signed(&ca_key)
        .map_err(|e| TlsError::Cert(format!("CA: {e}")))?;
    Ok((issuer, ca_key, ca.subject.raw.to_vec()))
}

/// A revoked certificate, as `weft cert revoke` records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    /// The node the certificate was issued for.
    pub node: String,
    /// Its serial number, hex.
    pub serial: String,
    /// When it was revoked (unix seconds).
    pub revoked_at: u64,
}

impl Revoked {
    /// The record revoking the certificate in `cert_pem`, now.
    pub fn of(cert_pem: &str) -> Result<Revoked, TlsError> {
        let der = first_cert_der(cert_pem, "the certificate")?;
        let fields = der::cert_fields(&der)
            .ok_or_else(|| TlsError::Cert("the certificate is not valid X.509".into()))?;
        let node = node_of_cert(&der).ok_or_else(|| {
            TlsError::Cert(format!(
                "the certificate names no node (no *.{NODE_DOMAIN} name)"
            ))
        })?;
        let magnitude = match fields.serial {
            [0, rest @ ..] if !rest.is_empty() => rest,
            all => all,
        };
        let revoked_at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(Revoked {
            node,
            serial: magnitude.iter().map(|b| format!("{b:02x}")).collect(),
            revoked_at,
        })
    }

    fn serial_bytes(&self) -> Result<Vec<u8>, TlsError> {
        let bad = || TlsError::Cert(format!("revoked serial {:?} is not hex", self.serial));
        self.serial
            .as_bytes()
            .chunks(2)
            .map(|pair| {
                let hex = std::str::from_utf8(pair).ok().filter(|h| h.len() == 2);
                hex.and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(bad)
            })
            .collect()
    }
}

/// How long a revocation list is declared valid; peers do not enforce it,
/// so a node keeps refusing what it lists until it loads a new one.
const CRL_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// A revocation list (PEM) of the cluster CA listing every `revoked`
/// certificate, for `--crl`.
pub fn revocation_list(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    revoked: &[Revoked],
) -> Result<String, TlsError> {
    let (issuer, ca_key, _) = ca_issuer(ca_cert_pem, ca_key_pem)?;
    let now = SystemTime::now();
    let revoked_certs = revoked
        .iter()
        .map(|r| {
            Ok(rcgen::RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(&r.serial_bytes()?),
                revocation_time: (SystemTime::UNIX_EPOCH + Duration::from_secs(r.revoked_at))
                    .into(),
                reason_code: None,
                invalidity_date: None,
            })
        })
        .collect::<Result<Vec<_>, TlsError>>()?;
    let number = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let crl = rcgen::CertificateRevocationListParams {
        this_update: now.checked_sub(CLOCK_SKEW).unwrap_or(now).into(),
        next_update: (now + CRL_VALIDITY).into(),
        crl_number: rcgen::SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    }
    .signed_by(&issuer, &ca_key)
    .map_err(|e| TlsError::Cert(format!("revocation list: {e}")))?;
    crl.pem()
        .map_err(|e| TlsError::Cert(format!("revocation list: {e}")))
}

/// Issues a certificate for `node`, signed by the cluster CA: SAN
/// `<node>.node.weft`, CN `node`, usable as TLS server and client, valid one
/// year (backdated an hour for clock skew). Returns `(cert_pem, key_pem)`.
pub fn issue_node_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    node: &str,
) -> Result<(String, String), TlsError> {
    issue_cert(ca_cert_pem, ca_key_pem, node, Role::Node)
}

/// Issues an operator certificate for `name`, signed by the cluster CA:
/// SAN `<name>.operator.weft`, CN `name`, usable as a TLS client only (it
/// signs cluster config; no node accepts it as a node). Valid one year.
pub fn issue_operator_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    name: &str,
) -> Result<(String, String), TlsError> {
    issue_cert(ca_cert_pem, ca_key_pem, name, Role::Operator)
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Node,
    Operator,
}

fn issue_cert(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    name: &str,
    role: Role,
) -> Result<(String, String), TlsError> {
    check_node_name(name)?;
    let (issuer, ca_key, ca_subject) = ca_issuer(ca_cert_pem, ca_key_pem)?;
    let (dns_name, usages) = match role {
        Role::Node => (
            node_server_name(name),
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        ),
        Role::Operator => (
            format!("{name}.{OPERATOR_DOMAIN}"),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        ),
    };
    let mut params = CertificateParams::new(vec![dns_name])
        .map_err(|e| TlsError::Cert(format!("certificate for {name:?}: {e}")))?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    params.use_authority_key_identifier_extension = true;
    let now = SystemTime::now();
    params.not_before = now
        .checked_sub(CLOCK_SKEW)
        .unwrap_or(SystemTime::UNIX_EPOCH)
        .into();
    params.not_after = (now + CERT_VALIDITY).into();
    let key = KeyPair::generate().map_err(|e| TlsError::Cert(format!("key: {e}")))?;
    let cert = params
        .signed_by(&key, &issuer, &ca_key)
        .map_err(|e| TlsError::Cert(format!("certificate for {name:?}: {e}")))?;

    let same_name = der::cert_fields(cert.der()).map(|f| f.issuer.raw) == Some(&ca_subject[..]);
    if !same_name {
        return Err(TlsError::Cert(
            "cannot reproduce the CA's subject name in the issued certificate".into(),
        ));
    }
    Ok((cert.pem(), key.serialize_pem()))
}

/// The serial numbers a revocation list (DER) revokes, sorted: what two
/// lists are compared by when a newer one arrives by gossip (lists made by
/// `weft cert revoke` only grow). Its signature is checked where it is used.
pub fn crl_serials(der: &[u8]) -> Result<Vec<Vec<u8>>, TlsError> {
    let list = webpki::BorrowedCertRevocationList::from_der(der)
        .map_err(|e| TlsError::Pem(format!("not a revocation list: {e:?}")))?;
    let mut serials = Vec::new();
    for revoked in &list {
        let revoked = revoked.map_err(|e| TlsError::Pem(format!("revocation list: {e:?}")))?;
        serials.push(revoked.serial_number.to_vec());
    }
    serials.sort();
    Ok(serials)
}

/// The DER revocation lists in PEM `bytes`.
pub fn crls_of_pem(bytes: &[u8]) -> Result<Vec<Vec<u8>>, TlsError> {
    rustls_pemfile::crls(&mut &bytes[..])
        .map(|crl| {
            crl.map(|c| c.to_vec())
                .map_err(|e| TlsError::Pem(e.to_string()))
        })
        .collect()
}

/// A revocation list (DER) as PEM.
pub fn crl_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN X509 CRL-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END X509 CRL-----\n");
    pem
}

/// Writes `bytes` to `path` through a temporary file and a rename, with
/// `mode` set explicitly (not filtered by the umask), so a reader never sees a
/// half-written key or state file. The temporary name is random and created
/// new (`O_EXCL`), so another local user cannot plant a file or link there
/// to be written through; the directory is synced after the rename, so the
/// new file survives a power loss.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        // The mode above is filtered by the umask.
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_err(&tmp))?;
        f.write_all(bytes)
            .and_then(|_| f.sync_all())
            .map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return result;
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes `<dir>/<node>.pem` (0644) and `<dir>/<node>.key` (0600), each via a
/// temp file and rename so a crash never leaves a half-written key; returns the paths.
pub fn write_node_cert(
    dir: &Path,
    node: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(PathBuf, PathBuf), TlsError> {
    check_node_name(node)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let cert = dir.join(format!("{node}.pem"));
    let key = dir.join(format!("{node}.key"));
    write_atomic(&key, key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert, cert_pem.as_bytes(), 0o644)?;
    Ok((cert, key))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.len() > MAX_PEM_BYTES {
        return Err(TlsError::Pem(format!(
            "{} is too large for a PEM file ({} bytes)",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(io_err(path))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem(path)?;
    let certs = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Pem(format!(
            "{} holds no PEM certificate",
            path.display()
        )));
    }
    Ok(certs)
}

/// The node name a certificate was issued for: its `<name>.node.weft` DNS
/// SAN. A certificate without one names no node (its CN does not count: any
/// CA-signed certificate has a CN).
fn node_of_cert(der: &[u8]) -> Option<String> {
    name_in_domain(der, NODE_DOMAIN)
}

/// The `<name>` of a certificate's first `<name>.<domain>` DNS name.
fn name_in_domain(der: &[u8], domain: &str) -> Option<String> {
    let suffix = format!(".{domain}");
    der::dns_names(der)
        .into_iter()
        .find_map(|n| n.strip_suffix(&suffix).map(str::to_owned))
        .filter(|n| !n.is_empty())
}

/// This node's certificate chain, key and the cluster CA roots: everything the
/// QUIC tunnel needs to prove who it is and to check who the peer is.
pub struct Identity {
    /// The node name the certificate was issued for.
    pub node: String,
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    roots: Arc<RootCertStore>,
    crls: Vec<CertificateRevocationListDer<'static>>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("node", &self.node)
            .field("certs", &self.certs.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Loads a node identity and checks it before the node starts, so a bad
    /// file gives one clear error instead of failing every handshake: the key
    /// must be private (mode 0600), match the certificate, and the certificate
    /// must chain to `ca.pem` for server and client use.
    pub fn load(ca_pem: &Path, cert: &Path, key: &Path) -> Result<Identity, TlsError> {
        let meta = std::fs::metadata(key).map_err(io_err(key))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TlsError::InsecureKey(key.to_path_buf()));
        }
        let key_bytes = read_pem(key)?;
        let key_der = rustls_pemfile::private_key(&mut key_bytes.as_slice())
            .map_err(|e| TlsError::Pem(format!("{}: {e}", key.display())))?
            .ok_or_else(|| TlsError::Pem(format!("{} holds no PEM private key", key.display())))?;

        let mut roots = RootCertStore::empty();
        for ca in read_certs(ca_pem)? {
            roots.add(ca).map_err(|e| {
                TlsError::Cert(format!(
                    "{} is not a usable CA certificate: {e}",
                    ca_pem.display()
                ))
            })?;
        }
        let roots = Arc::new(roots);
        let certs = read_certs(cert)?;
        let provider = provider();

        CertifiedKey::from_der(certs.clone(), key_der.clone_key(), &provider).map_err(|e| {
            TlsError::Cert(format!(
                "{} does not match {}: {e}",
                key.display(),
                cert.display()
            ))
        })?;

        let (end_entity, intermediates) = match certs.split_first() {
            Some(split) => split,
            None => return Err(TlsError::Pem(format!("{} is empty", cert.display()))),
        };
        let node = node_of_cert(end_entity).ok_or_else(|| {
            TlsError::Cert(format!(
                "{} names no node (no *.{NODE_DOMAIN} name)",
                cert.display()
            ))
        })?;
        let server_name = ServerName::try_from(node_server_name(&node))
            .map_err(|e| TlsError::Cert(format!("{}: node name {node:?}: {e}", cert.display())))?;
        let not_signed = |e: rustls::Error| {
            TlsError::Cert(format!(
                "{} is not a node certificate of the cluster CA in {}: {e}",
                cert.display(),
                ca_pem.display()
            ))
        };
        let now = UnixTime::now();
        WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("server verifier: {e}")))?
            .verify_server_cert(end_entity, intermediates, &server_name, &[], now)
            .map_err(not_signed)?;
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))?
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(not_signed)?;

        Ok(Identity {
            node,
            certs,
            key: key_der,
            roots,
            crls: Vec::new(),
        })
    }

    /// Checks peers against the revocation lists in `crl` (PEM) as well,
    /// on both ends of every tunnel. Refuses a file that holds no list, a
    /// list the cluster CA did not sign, and a list that revokes this
    /// node's own certificate.
    pub fn with_crl(mut self, crl: &Path) -> Result<Identity, TlsError> {
        let bytes = read_pem(crl)?;
        let crls = rustls_pemfile::crls(&mut bytes.as_slice())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem(format!("{}: {e}", crl.display())))?;
        if crls.is_empty() {
            return Err(TlsError::Pem(format!(
                "{} holds no PEM revocation list (X509 CRL)",
                crl.display()
            )));
        }
        self.crls = crls;
        let (end_entity, intermediates) = self
            .certs
            .split_first()
            .ok_or_else(|| TlsError::Cert("the node certificate chain is empty".into()))?;
        self.client_verifier()?
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map_err(|e| match e {
                rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => {
                    TlsError::Cert(format!(
                        "{} revokes this node's own certificate ({}); issue a new one with `weft cert issue {}`",
                        crl.display(),
                        self.node,
                        self.node
                    ))
                }
                other => TlsError::Cert(format!(
                    "{} cannot be used with the cluster CA: {other}",
                    crl.display()
                )),
            })?;
        Ok(self)
    }

    fn client_verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("client verifier: {e}")))
    }

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), provider())
            .with_crls(self.crls.clone())
            .build()
            .map_err(|e| TlsError::Config(format!("server verifier: {e}")))
    }

    /// Where the cluster dir holds `ca.key`, the node issues itself a fresh
    /// certificate into `<data_dir>/tls/` and loads it (dev and single-host
    /// setups); otherwise it tells the operator how to issue one.
    pub fn from_cluster_dir(
        cluster_dir: &Path,
        node: &str,
        data_dir: &Path,
    ) -> Result<Identity, TlsError> {
        let ca_key_path = cluster_dir.join(CA_KEY_FILE);
        let ca_cert_path = cluster_dir.join(CA_CERT_FILE);
        if !ca_key_path.exists() {
            return Err(TlsError::Config(format!(
                "{} has no {CA_KEY_FILE}, so node {node:?} cannot issue its own certificate; \
                 run `weft cert issue {node} --cluster DIR --out DIR` where the CA key is \
                 and start the node with --cert FILE --key FILE",
                cluster_dir.display()
            )));
        }
        let meta = std::fs::metadata(&ca_key_path).map_err(io_err(&ca_key_path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TlsError::InsecureKey(ca_key_path));
        }
        let ca_cert_pem = String::from_utf8(read_pem(&ca_cert_path)?)
            .map_err(|_| TlsError::Pem(format!("{} is not text", ca_cert_path.display())))?;
        let ca_key_pem = String::from_utf8(read_pem(&ca_key_path)?)
            .map_err(|_| TlsError::Pem(format!("{} is not text", ca_key_path.display())))?;
        let (cert_pem, key_pem) = issue_node_cert(&ca_cert_pem, &ca_key_pem, node)?;
        let tls_dir = data_dir.join("tls");
        let (cert, key) = write_node_cert(&tls_dir, node, &cert_pem, &key_pem)?;
        tracing::info!(node, cert = %cert.display(), "issued node certificate from the cluster CA");
        Identity::load(&ca_cert_path, &cert, &key)
    }
}

fn transport() -> Result<quinn::TransportConfig, TlsError> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT)
            .map_err(|e| TlsError::Config(format!("idle timeout: {e}")))?,
    ));
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_BIDI_STREAMS));
    // weft opens bidirectional streams only: a peer may open no other kind,
    // and may not send datagrams.
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.datagram_receive_buffer_size(None);
    t.stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(u64::from(CONNECTION_WINDOW));
    // Both ends are weft, so each asks the other (QUIC's ACK frequency
    // extension) to acknowledge every tenth packet, not every second: most
    // acknowledgements then ride on a response, not in a packet of their own.
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(acks));
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(MAX_UDP_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Ok(t)
}

/// The tunnel's server side: TLS 1.3, ALPN `weft/N`, and a client certificate
/// from the cluster CA required, so only cluster nodes can open streams.
pub fn server_config(id: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let verifier = id.client_verifier()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(format!("TLS server: {e}")))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(format!("TLS server certificate: {e}")))?;
    tls.alpn_protocols = alpn_protocols();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(format!("QUIC server: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(Arc::new(transport()?));
    Ok(config)
}

/// The tunnel's client side: the server must present a CA-signed cert whose
/// SAN matches the name passed to `connect` (use [`node_server_name`] of the
/// node gossip says owns the instance), and we present our own node cert.
pub fn client_config(id: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let verifier = id.server_verifier()?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(format!("TLS client: {e}")))?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(id.certs.clone(), id.key.clone_key())
        .map_err(|e| TlsError::Config(format!("TLS client certificate: {e}")))?;
    tls.alpn_protocols = alpn_protocols();
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(format!("QUIC client: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport()?));
    Ok(config)
}

/// Whom this node trusts as peers: the cluster CA and its revocation
/// lists. Swapped on reload; connections already up are checked against the
/// new trust, so a revoked peer loses them too.
pub struct PeerTrust {
    client: Arc<dyn ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

impl fmt::Debug for PeerTrust {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerTrust").finish_non_exhaustive()
    }
}

/// Why a connection's peer is no longer trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Distrust {
    /// Its certificate is on a revocation list.
    Revoked,
    /// Its certificate no longer verifies (another CA, expired, ...).
    Untrusted,
}

impl Distrust {
    /// The `weft_tunnel_refused_total` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Distrust::Revoked => "revoked",
            Distrust::Untrusted => "untrusted",
        }
    }
}

impl PeerTrust {
    /// The trust of `id`'s CA roots and revocation lists.
    pub fn new(id: &Identity) -> Result<PeerTrust, TlsError> {
        Ok(PeerTrust {
            client: id.client_verifier()?,
            server: id.server_verifier()?,
        })
    }

    /// Checks again the certificate a peer presented when it dialed us.
    pub fn check_caller(&self, conn: &quinn::Connection) -> Result<(), Distrust> {
        let certs = peer_certs(conn).ok_or(Distrust::Untrusted)?;
        let (end_entity, intermediates) = certs.split_first().ok_or(Distrust::Untrusted)?;
        self.client
            .verify_client_cert(end_entity, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(distrust)
    }

    /// Checks again the certificate `node` presented when we dialed it.
    pub fn check_dialed(&self, conn: &quinn::Connection, node: &str) -> Result<(), Distrust> {
        let certs = peer_certs(conn).ok_or(Distrust::Untrusted)?;
        let (end_entity, intermediates) = certs.split_first().ok_or(Distrust::Untrusted)?;
        let name = ServerName::try_from(node_server_name(node)).map_err(|_| Distrust::Untrusted)?;
        self.server
            .verify_server_cert(end_entity, intermediates, &name, &[], UnixTime::now())
            .map(|_| ())
            .map_err(distrust)
    }
}

fn distrust(e: rustls::Error) -> Distrust {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked) => Distrust::Revoked,
        _ => Distrust::Untrusted,
    }
}

fn peer_certs(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|certs| *certs)
}

/// True if a tunnel handshake failed because the peer's certificate is
/// revoked (our verifier refused it, or the peer's refused ours).
pub fn is_revoked(e: &quinn::ConnectionError) -> bool {
    let revoked =
        quinn::TransportErrorCode::crypto(u8::from(rustls::AlertDescription::CertificateRevoked));
    match e {
        quinn::ConnectionError::TransportError(t) => t.code == revoked,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code == revoked,
        _ => false,
    }
}

/// The node name in the peer's (already CA-verified) certificate, for logs,
/// metrics and authorisation of what a peer may ask; `None` before the
/// handshake or if the certificate names no node.
pub fn peer_node(conn: &quinn::Connection) -> Option<String> {
    node_of_cert(peer_certs(conn)?.first()?)
}

#[cfg(test)]
pub(crate) mod tests;
