//! Operator certificates: the keys that sign cluster config
//! ([`weft_gossip::grant`]). An operator certificate is issued by the
//! cluster CA for `<name>.operator.weft`, for client use only, so it can
//! neither serve as a node nor be mistaken for one; a node certificate
//! cannot sign a grant.

use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::sign::Signer;
use tokio::sync::watch;
use weft_gossip::grant::{Authority, Grant};

use super::attestor::{choose_signer, sign_with, signature_verifies};
use super::{name_in_domain, read_certs, read_pem, PeerTrust, TlsError};

/// The DNS domain of operator certificates.
pub const OPERATOR_DOMAIN: &str = "operator.weft";

/// The operator a certificate was issued for (its `<name>.operator.weft`
/// DNS name).
pub fn operator_of_cert(der: &[u8]) -> Option<String> {
    name_in_domain(der, OPERATOR_DOMAIN)
}

/// An operator's certificate and key, loaded where the operator works
/// (the CLI), to sign grants.
pub struct OperatorKey {
    /// The operator's name.
    pub name: String,
    certificate: Vec<u8>,
    signer: Box<dyn Signer>,
}

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl OperatorKey {
    /// Loads an operator certificate (from `weft cert issue --operator`)
    /// and its key.
    pub fn load(cert: &Path, key: &Path) -> Result<OperatorKey, TlsError> {
        let certificate = read_certs(cert)?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::Pem(format!("{} holds no certificate", cert.display())))?;
        let name = operator_of_cert(&certificate).ok_or_else(|| {
            TlsError::Cert(format!(
                "{} is not an operator certificate (no *.{OPERATOR_DOMAIN} name); issue one with `weft cert issue --operator NAME`",
                cert.display()
            ))
        })?;
        let key_bytes = read_pem(key)?;
        let key_der = rustls_pemfile::private_key(&mut key_bytes.as_slice())
            .map_err(|e| TlsError::Pem(format!("{}: {e}", key.display())))?
            .ok_or_else(|| TlsError::Pem(format!("{} holds no PEM private key", key.display())))?;
        Ok(OperatorKey {
            name,
            certificate: certificate.to_vec(),
            signer: choose_signer(key_der)?,
        })
    }

    /// This operator's grant of `object` at `version` with `digest`.
    pub fn grant(&self, object: &str, version: u64, digest: &str) -> Grant {
        let b64 = base64::engine::general_purpose::STANDARD;
        let signature = sign_with(
            self.signer.as_ref(),
            &Grant::message(object, version, digest),
        );
        Grant {
            object: object.to_string(),
            version,
            digest: digest.to_string(),
            cert: b64.encode(&self.certificate),
            sig: b64.encode(signature),
        }
    }
}

/// Checks grants against the cluster CA and CRL the tunnel trusts
/// (reloaded on SIGHUP, so a revoked operator's grants stop counting).
#[derive(Debug)]
pub struct OperatorAuthority {
    trust: watch::Receiver<Arc<PeerTrust>>,
}

impl OperatorAuthority {
    /// An authority with the trust `trust` holds at each check.
    pub fn new(trust: watch::Receiver<Arc<PeerTrust>>) -> Self {
        OperatorAuthority { trust }
    }
}

impl Authority for OperatorAuthority {
    fn verify(&self, grant: &Grant) -> Result<String, String> {
        let b64 = base64::engine::general_purpose::STANDARD;
        let certificate = b64
            .decode(&grant.cert)
            .map_err(|_| "the grant's certificate is not base64".to_string())?;
        let signature = b64
            .decode(&grant.sig)
            .map_err(|_| "the grant's signature is not base64".to_string())?;
        let der = CertificateDer::from(certificate.as_slice());
        let trust = self.trust.borrow().clone();
        trust
            .client
            .verify_client_cert(&der, &[], UnixTime::now())
            .map_err(|e| format!("the grant's certificate is not trusted: {e}"))?;
        let name = operator_of_cert(&certificate)
            .ok_or_else(|| "the grant is not signed by an operator certificate".to_string())?;
        let message = Grant::message(&grant.object, grant.version, &grant.digest);
        if !signature_verifies(&certificate, &message, &signature) {
            return Err(format!("operator {name}'s signature does not verify"));
        }
        Ok(name)
    }
}
