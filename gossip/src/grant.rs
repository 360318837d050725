//! Operator grants: cluster config that only an operator can change.
//!
//! Cluster config (the gossip keyring now; intentions, limits and routes
//! later) is spread by gossip and adopted by every node, so a member that
//! could write it could rule the cluster. Each version of such an object
//! therefore carries a [`Grant`]: an operator certificate's signature over
//! the object's name, its version and a digest of its content. A node
//! adopts a version only when its grant verifies ([`Authority`]) and
//! matches the content it came with; a member without an operator's key
//! can publish what it likes and nobody adopts it.

use serde::{Deserialize, Serialize};

/// Separates grants from anything else an operator key signs.
const DOMAIN: &[u8] = b"weft operator grant v1\0";

/// An operator's signature on one version of a cluster config object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The object, e.g. `keyring`.
    pub object: String,
    /// The version granted; each change is the previous version plus one.
    pub version: u64,
    /// The object's digest at that version (hex SHA-256, as the object
    /// defines it).
    pub digest: String,
    /// The operator's certificate, base64 DER.
    pub cert: String,
    /// The signature over [`Grant::message`], base64.
    pub sig: String,
}

impl Grant {
    /// The bytes an operator signs for `object` at `version` with `digest`.
    pub fn message(object: &str, version: u64, digest: &str) -> Vec<u8> {
        let mut message = DOMAIN.to_vec();
        for field in [object.as_bytes(), &version.to_be_bytes(), digest.as_bytes()] {
            message.extend_from_slice(&(field.len() as u64).to_be_bytes());
            message.extend_from_slice(field);
        }
        message
    }

    /// Whether this grant is for `object` at `version` with `digest` (its
    /// signature is the [`Authority`]'s to check).
    pub fn covers(&self, object: &str, version: u64, digest: &str) -> bool {
        self.object == object && self.version == version && self.digest == digest
    }
}

/// Checks grants: the certificate is an operator certificate of the
/// cluster CA (not revoked) and signed the grant.
pub trait Authority: Send + Sync + std::fmt::Debug {
    /// The operator's name, or why the grant is refused.
    fn verify(&self, grant: &Grant) -> Result<String, String>;
}

/// Hex SHA-256 of the canonical JSON of `object`: what an operator's grant
/// over a cluster config object covers.
pub fn digest_json<T: Serialize>(object: &T) -> String {
    digest(&serde_json::to_vec(object).unwrap_or_default())
}

/// Hex SHA-256 of `bytes`: the digest objects put in their grants.
pub fn digest(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
