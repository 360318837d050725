//! weft's gossip layer: a thin, typed wrapper around chitchat.
//!
//! # Layout
//!
//! - [`keys`]: the key schema (`node`, `svc/<id>`, `health/<id>`, `stats/<service>`),
//!   validated before anything is written, so only short ASCII keys reach chitchat.
//! - [`records`]: the JSON values stored under those keys; [`registration`]:
//!   the registration request a service sends, validated into a record.
//! - [`view`]: a plain, owned picture of the cluster (members, their keys,
//!   liveness) and the derivation of members from it.
//! - [`catalog`]: the service catalog, derived from views at the cost of
//!   what changed.
//! - [`cluster`]: starts chitchat with weft's configuration, keeps the node's own
//!   keys, and publishes a fresh [`view::ClusterView`] on every change.
//! - [`attest`]: signed node state: each node signs its keys with its
//!   certificate, and receivers believe only what verifies.
//! - [`grant`]: operator grants, the signatures that cluster config needs.
//! - [`zones`]: zones joined by bridges: the view a bridge routes from and
//!   the gateway instances that stand in for other zones' services.
//! - [`seal`]: the authenticated gossip transport (AEAD-sealed datagrams) and its keyring.

pub mod attest;
pub mod catalog;
pub mod cluster;
pub mod grant;
pub mod keys;
pub mod records;
pub mod registration;
pub mod seal;
pub mod view;
pub mod zones;

pub use cluster::{Cluster, ClusterConfig};
pub use keys::Key;
pub use records::{
    Check, Health, NodeInfo, NodeStatus, Protocol, RetryPolicy, ServiceRecord, ZoneOffer, SCHEMA,
};
pub use view::{Catalog, ClusterView, Instance, Member, MemberState, NodeKeys};

/// Errors of the gossip layer.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// A key or value does not fit the schema (non-ASCII, too long, bad id).
    #[error("invalid gossip key or value: {0}")]
    Invalid(String),
    /// chitchat could not start (port in use, bad seed).
    #[error("gossip failed to start: {0}")]
    Start(String),
    /// The gossip task stopped.
    #[error("gossip stopped: {0}")]
    Stopped(String),
}
