//! The node certificate as the signer of its gossip state
//! ([`weft_gossip::attest`]): signing with the node's key, and checking a
//! peer's state against the cluster CA, the CRL and the name in the
//! certificate, with the same trust the tunnel uses (reloaded on SIGHUP).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::sign::Signer;
use rustls::SignatureScheme;
use tokio::sync::watch;
use weft_gossip::attest::{Attestor, Rejection};

use super::{node_of_cert, provider, Identity, PeerTrust, TlsError};

/// Signature schemes a node key may sign its state with, by preference.
const SCHEMES: [SignatureScheme; 4] = [
    SignatureScheme::ED25519,
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::RSA_PSS_SHA256,
];

/// Certificate verdicts kept at most (one per node name).
const MAX_VERDICTS: usize = 4096;

/// Signs this node's gossip state and checks its peers'.
pub struct NodeAttestor {
    certificate: Vec<u8>,
    signer: Box<dyn Signer>,
    trust: watch::Receiver<Arc<PeerTrust>>,
    /// What each node's certificate was found to be, under which trust:
    /// a certificate is checked once per node and trust, not per state.
    verdicts: Mutex<HashMap<String, Verdict>>,
}

struct Verdict {
    certificate: Vec<u8>,
    trust: Arc<PeerTrust>,
    result: Result<(), Rejection>,
}

impl std::fmt::Debug for NodeAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAttestor").finish_non_exhaustive()
    }
}

impl NodeAttestor {
    /// Signs with `identity`'s key; checks peers with the trust `trust`
    /// holds at each check.
    pub fn new(
        identity: &Identity,
        trust: watch::Receiver<Arc<PeerTrust>>,
    ) -> Result<NodeAttestor, TlsError> {
        let signer = choose_signer(identity.key.clone_key())?;
        let certificate = identity
            .certs
            .first()
            .ok_or_else(|| TlsError::Cert("no node certificate".into()))?
            .to_vec();
        Ok(NodeAttestor {
            certificate,
            signer,
            trust,
            verdicts: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `certificate` is a node certificate of the cluster, not
    /// revoked, naming `node`.
    fn check_certificate(&self, node: &str, certificate: &[u8]) -> Result<(), Rejection> {
        let trust = self.trust.borrow().clone();
        let mut verdicts = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = verdicts.get(node) {
            if v.certificate == certificate && Arc::ptr_eq(&v.trust, &trust) {
                return v.result;
            }
        }
        let der = CertificateDer::from(certificate);
        let result = match trust.client.verify_client_cert(&der, &[], UnixTime::now()) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked)) => {
                Err(Rejection::RevokedCertificate)
            }
            Err(_) => Err(Rejection::UntrustedCertificate),
            Ok(_) if node_of_cert(certificate).as_deref() != Some(node) => {
                Err(Rejection::CertificateNameMismatch)
            }
            Ok(_) => Ok(()),
        };
        if verdicts.len() >= MAX_VERDICTS {
            verdicts.clear();
        }
        verdicts.insert(
            node.to_string(),
            Verdict {
                certificate: certificate.to_vec(),
                trust,
                result,
            },
        );
        result
    }
}

impl Attestor for NodeAttestor {
    fn certificate(&self) -> &[u8] {
        &self.certificate
    }

    fn epoch(&self) -> usize {
        Arc::as_ptr(&self.trust.borrow()) as usize
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        sign_with(self.signer.as_ref(), message)
    }

    fn verify(
        &self,
        node: &str,
        certificate: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), Rejection> {
        self.check_certificate(node, certificate)?;
        if signature_verifies(certificate, message, signature) {
            Ok(())
        } else {
            Err(Rejection::BadSignature)
        }
    }
}

/// A signer for `key` with the first of [`SCHEMES`] it supports.
pub(super) fn choose_signer(key: PrivateKeyDer<'static>) -> Result<Box<dyn Signer>, TlsError> {
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Cert(format!("signing key: {e}")))?;
    key.choose_scheme(&SCHEMES)
        .ok_or_else(|| TlsError::Cert("the key cannot sign with Ed25519, ECDSA or RSA-PSS".into()))
}

/// The scheme (two bytes, big-endian) and the signature of `message`.
pub(super) fn sign_with(signer: &dyn Signer, message: &[u8]) -> Vec<u8> {
    let mut out = u16::from(signer.scheme()).to_be_bytes().to_vec();
    match signer.sign(message) {
        Ok(signature) => out.extend_from_slice(&signature),
        // The verifier refuses it as badly signed, and says so.
        Err(e) => tracing::error!(error = %e, "cannot sign"),
    }
    out
}

/// Whether `certificate`'s key made `signature` (from [`sign_with`]) over
/// `message`.
pub(super) fn signature_verifies(certificate: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let Some((scheme, signature)) = signature.split_first_chunk::<2>() else {
        return false;
    };
    let scheme = SignatureScheme::from(u16::from_be_bytes(*scheme));
    let der = CertificateDer::from(certificate);
    let Ok(cert) = webpki::EndEntityCert::try_from(&der) else {
        return false;
    };
    provider()
        .signature_verification_algorithms
        .mapping
        .iter()
        .filter(|(s, _)| *s == scheme)
        .flat_map(|(_, algorithms)| algorithms.iter())
        .any(|alg| cert.verify_signature(*alg, message, signature).is_ok())
}
