//! `weft init`: the cluster's CA and gossip key, made once per cluster.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use base64::Engine;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use ring::rand::{SecureRandom, SystemRandom};

use weft_runtime::tls::{self, Revoked};

use crate::{store, NodeError};

/// The CA certificate, shared with every node.
pub const CA_CERT: &str = "ca.pem";
/// The CA key: only where certificates are issued.
pub const CA_KEY: &str = "ca.key";
/// The gossip sealing key (32 bytes, base64).
pub const GOSSIP_KEY: &str = "gossip.key";

/// Creates `dir` with a new CA and gossip key. Refuses to overwrite without `force`.
pub fn init_cluster(dir: &Path, force: bool) -> Result<(), NodeError> {
    let existing: Vec<&str> = [CA_CERT, CA_KEY, GOSSIP_KEY]
        .into_iter()
        .filter(|f| dir.join(f).exists())
        .collect();
    if !existing.is_empty() && !force {
        return Err(NodeError::Config(format!(
            "{} already holds a cluster ({}); use --force to replace it",
            dir.display(),
            existing.join(", ")
        )));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| NodeError::Io(format!("cannot create {}: {e}", dir.display())))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));

    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| NodeError::Io(format!("CA parameters: {e}")))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "weft cluster CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 24 * 3600)).into();
    let key = KeyPair::generate().map_err(|e| NodeError::Io(format!("CA key: {e}")))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| NodeError::Io(format!("CA certificate: {e}")))?;

    let mut secret = [0u8; 32];
    SystemRandom::new()
        .fill(&mut secret)
        .map_err(|_| NodeError::Io("no system randomness for the gossip key".into()))?;
    let gossip = base64::engine::general_purpose::STANDARD.encode(secret);

    write_file(&dir.join(CA_CERT), cert.pem().as_bytes(), 0o644)?;
    write_file(&dir.join(CA_KEY), key.serialize_pem().as_bytes(), 0o600)?;
    write_file(
        &dir.join(GOSSIP_KEY),
        format!("{gossip}\n").as_bytes(),
        0o600,
    )?;
    Ok(())
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeError> {
    weft_runtime::tls::write_atomic(path, bytes, mode).map_err(|e| NodeError::Io(e.to_string()))
}

/// The cluster's revoked certificates, kept where the CA key is.
pub const REVOKED: &str = "revoked.json";
/// The revocation list `weft cert revoke` writes, for every node's `--crl`.
pub const CRL: &str = "crl.pem";

/// Revokes the node certificate `cert`: records it in `revoked.json` and
/// rewrites `crl.pem`, both in the cluster dir (which must hold `ca.key`).
/// Returns the record and how many certificates the list now revokes.
pub fn revoke(cluster: &Path, cert: &Path) -> Result<(Revoked, usize), NodeError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("cannot read {}: {e}", path.display())))
    };
    let record = Revoked::of(&read(cert)?)
        .map_err(|e| NodeError::Config(format!("{}: {e}", cert.display())))?;
    let revoked_path = cluster.join(REVOKED);
    let mut revoked: Vec<Revoked> = store::load(&revoked_path)?;
    if !revoked.iter().any(|r| r.serial == record.serial) {
        revoked.push(record.clone());
    }
    let crl = tls::revocation_list(
        &read(&cluster.join(CA_CERT))?,
        &read(&cluster.join(CA_KEY))?,
        &revoked,
    )
    .map_err(|e| NodeError::Config(e.to_string()))?;
    store::save(&revoked_path, &revoked)?;
    tls::write_atomic(&cluster.join(CRL), crl.as_bytes(), 0o644)
        .map_err(|e| NodeError::Io(e.to_string()))?;
    Ok((record, revoked.len()))
}

/// Reads the 32-byte gossip key of a cluster dir, refusing files others can read.
pub fn read_gossip_key(dir: &Path) -> Result<[u8; 32], NodeError> {
    let path = dir.join(GOSSIP_KEY);
    let meta = std::fs::metadata(&path).map_err(|e| {
        NodeError::Config(format!(
            "--cluster {}: cannot read {GOSSIP_KEY} ({e}); create a cluster with `weft init --dir DIR`",
            dir.display()
        ))
    })?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(NodeError::Config(format!(
            "{} is readable by others; run chmod 600 on it",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(&path)
        .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|_| NodeError::Config(format!("{} is not base64", path.display())))?;
    bytes
        .try_into()
        .map_err(|_| NodeError::Config(format!("{} must hold 32 bytes", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_private_files_and_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = dir.path().join("c");
        init_cluster(&cluster, false).unwrap();
        for (f, mode) in [(CA_CERT, 0o644), (CA_KEY, 0o600), (GOSSIP_KEY, 0o600)] {
            let m = std::fs::metadata(cluster.join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(m, mode, "{f}");
        }
        let key = read_gossip_key(&cluster).unwrap();
        assert_ne!(key, [0u8; 32]);
        let err = init_cluster(&cluster, false).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        init_cluster(&cluster, true).unwrap();
        assert_ne!(read_gossip_key(&cluster).unwrap(), key);
        assert!(std::fs::read_to_string(cluster.join(CA_CERT))
            .unwrap()
            .starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        init_cluster(dir.path(), false).unwrap();
        std::fs::set_permissions(
            dir.path().join(GOSSIP_KEY),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(read_gossip_key(dir.path()).is_err());
    }
}
