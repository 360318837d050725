//! Signed node state: a member can speak only for itself.
//!
//! The gossip key admits every member, and chitchat applies any member's
//! word about any node. So each node signs what it publishes: it puts its
//! certificate under `cert` and, after every write or delete, a signature
//! over all its other keys under `sig` (in the same chitchat lock, so
//! `sig` is always its newest version). A receiver that holds a node's
//! `sig` holds every key that signature covers, since chitchat delivers a
//! node's keys in version order; a delta cut short by the datagram size
//! fails the check until the rest arrives.
//!
//! A receiver believes a node's keys only when they verify
//! ([`StateCheck`]): the certificate is the cluster CA's, not revoked, and
//! names the node, and it signed exactly these keys for this incarnation.
//! Otherwise it keeps the last keys of that node that verified, or leaves a
//! node that never verified out of every view. When the trust moves (a new
//! CRL), every state is checked again, and a node whose certificate no
//! longer verifies leaves every view. The crypto (certificates,
//! the CRL, signatures) is an [`Attestor`] the node passes in, so this
//! crate needs no TLS stack.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use base64::Engine as _;
use chitchat::ChitchatId;

use crate::view::NodeKeys;

/// Separates weft's state signatures from anything else a node key signs.
const DOMAIN: &[u8] = b"weft node state v1\0";

/// The keys the signing scheme itself writes.
pub const CERT_KEY: &str = "cert";
/// See [`CERT_KEY`].
pub const SIG_KEY: &str = "sig";

/// Why a node's state was not believed (the `weft_gossip_rejected_total`
/// reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// No `cert` or no `sig`, or not base64.
    Unsigned,
    /// The signature does not cover these keys.
    BadSignature,
    /// The certificate is not the cluster CA's (or expired).
    UntrustedCertificate,
    /// The certificate is on the CA's revocation list.
    RevokedCertificate,
    /// The certificate names another node.
    CertificateNameMismatch,
}

impl Rejection {
    /// Every reason, in counter order.
    pub const ALL: [Rejection; 5] = [
        Rejection::Unsigned,
        Rejection::BadSignature,
        Rejection::UntrustedCertificate,
        Rejection::RevokedCertificate,
        Rejection::CertificateNameMismatch,
    ];

    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::Unsigned => "unsigned_state",
            Rejection::BadSignature => "bad_state_signature",
            Rejection::UntrustedCertificate => "untrusted_certificate",
            Rejection::RevokedCertificate => "revoked_certificate",
            Rejection::CertificateNameMismatch => "certificate_name_mismatch",
        }
    }
}

/// The crypto behind signed state: this node's certificate and key, and
/// the cluster's trust (CA, CRL).
pub trait Attestor: Send + Sync + std::fmt::Debug {
    /// This node's certificate, DER.
    fn certificate(&self) -> &[u8];
    /// Signs `message` with this node's certificate key.
    fn sign(&self, message: &[u8]) -> Vec<u8>;
    /// Which trust (CA roots and CRL) verdicts are made under; it moves
    /// when the trust is reloaded, and every state is checked again.
    fn epoch(&self) -> usize {
        0
    }
    /// Checks that `certificate` (DER) is a valid, unrevoked node
    /// certificate of the cluster naming `node`, and that its key made
    /// `signature` over `message`.
    fn verify(
        &self,
        node: &str,
        certificate: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), Rejection>;
}

/// Who a state belongs to: the parts of its chitchat id.
#[derive(Debug, Clone, Copy)]
pub struct Incarnation<'a> {
    /// Node name.
    pub name: &'a str,
    /// Generation (start time).
    pub generation: u64,
    /// Gossip address.
    pub gossip_addr: SocketAddr,
}

impl<'a> Incarnation<'a> {
    /// The incarnation chitchat's id names.
    pub fn of(id: &'a ChitchatId) -> Self {
        Incarnation {
            name: &id.node_id,
            generation: id.generation_id,
            gossip_addr: id.gossip_advertise_addr,
        }
    }
}

/// The bytes a node signs: a domain tag, its incarnation, and every key and
/// value but `sig`, in key order, each length-prefixed.
pub fn signed_message<'k>(
    who: Incarnation<'_>,
    keys: impl Iterator<Item = (&'k str, &'k str)>,
) -> Vec<u8> {
    let mut message = Vec::with_capacity(1024);
    message.extend_from_slice(DOMAIN);
    let mut field = |bytes: &[u8]| {
        message.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        message.extend_from_slice(bytes);
    };
    field(who.name.as_bytes());
    field(&who.generation.to_be_bytes());
    field(who.gossip_addr.to_string().as_bytes());
    for (key, value) in keys.filter(|(k, _)| *k != SIG_KEY) {
        field(key.as_bytes());
        field(value.as_bytes());
    }
    message
}

/// The `sig` value for `keys` (sorted, as chitchat keeps them).
pub fn sign<'k>(
    attestor: &dyn Attestor,
    who: Incarnation<'_>,
    keys: impl Iterator<Item = (&'k str, &'k str)>,
) -> String {
    let signature = attestor.sign(&signed_message(who, keys));
    base64::engine::general_purpose::STANDARD.encode(signature)
}

/// The `cert` value of this node.
pub fn certificate_value(attestor: &dyn Attestor) -> String {
    base64::engine::general_purpose::STANDARD.encode(attestor.certificate())
}

/// Rejections counted by reason, shared with whoever exports them.
#[derive(Debug, Default)]
pub struct Rejections([AtomicU64; 5]);

impl Rejections {
    fn count(&self, r: Rejection) {
        self.0[r as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// `(reason, count)` for every reason, zeros included.
    pub fn by_reason(&self) -> Vec<(&'static str, u64)> {
        Rejection::ALL
            .iter()
            .map(|r| (r.reason(), self.0[*r as usize].load(Ordering::Relaxed)))
            .collect()
    }
}

/// What a receiver last concluded about one node incarnation.
#[derive(Debug)]
struct Checked {
    /// The max version whose keys were checked (pass or fail), and the
    /// trust they were checked under.
    version: u64,
    epoch: usize,
    /// The newest keys that verified, if any ever did.
    keys: Option<Arc<NodeKeys>>,
}

impl Rejection {
    /// Whether the rejection is of the node itself (its certificate), not
    /// of one state: then none of its keys is believed any more, the last
    /// verified ones included (a revoked node leaves every view).
    fn of_the_node(self) -> bool {
        matches!(
            self,
            Rejection::UntrustedCertificate
                | Rejection::RevokedCertificate
                | Rejection::CertificateNameMismatch
        )
    }
}

/// The receiving side: which of each node's keys to believe. Each state is
/// checked once per version it reaches, not per view.
#[derive(Debug)]
pub struct StateCheck {
    attestor: Arc<dyn Attestor>,
    checked: HashMap<ChitchatId, Checked>,
    rejections: Arc<Rejections>,
}

impl StateCheck {
    /// A check with `attestor`'s trust, counting into `rejections`.
    pub fn new(attestor: Arc<dyn Attestor>, rejections: Arc<Rejections>) -> Self {
        StateCheck {
            attestor,
            checked: HashMap::new(),
            rejections,
        }
    }

    /// The keys of `who` to believe, given its current keys at `version`:
    /// these when they verify, else the last that did; `None` for a node
    /// that never verified.
    pub fn believe(
        &mut self,
        id: &ChitchatId,
        version: u64,
        keys: &Arc<NodeKeys>,
    ) -> Option<Arc<NodeKeys>> {
        let epoch = self.attestor.epoch();
        if let Some(checked) = self.checked.get(id) {
            if checked.version == version && checked.epoch == epoch {
                return checked.keys.clone();
            }
        }
        let who = Incarnation::of(id);
        let verdict = self.verify(who, keys);
        let checked = self.checked.entry(id.clone()).or_insert(Checked {
            version,
            epoch,
            keys: None,
        });
        (checked.version, checked.epoch) = (version, epoch);
        match verdict {
            Ok(()) => checked.keys = Some(Arc::clone(keys)),
            Err(rejection) => {
                self.rejections.count(rejection);
                if rejection.of_the_node() {
                    checked.keys = None;
                }
                tracing::debug!(
                    node = who.name,
                    reason = rejection.reason(),
                    "gossip state not believed"
                );
            }
        }
        checked.keys.clone()
    }

    /// Forgets incarnations `keep` says are gone.
    pub fn retain(&mut self, mut keep: impl FnMut(&ChitchatId) -> bool) {
        self.checked.retain(|id, _| keep(id));
    }

    fn verify(&self, who: Incarnation<'_>, keys: &NodeKeys) -> Result<(), Rejection> {
        let decode = |key: &str| {
            let value = keys.get(key).ok_or(Rejection::Unsigned)?;
            base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|_| Rejection::Unsigned)
        };
        let certificate = decode(CERT_KEY)?;
        let signature = decode(SIG_KEY)?;
        let message = signed_message(who, keys.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.attestor
            .verify(who.name, &certificate, &message, &signature)
    }
}
