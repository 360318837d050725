//! The values stored under weft's gossip keys, as compact JSON.

use serde::{Deserialize, Serialize};

/// The schema of the gossip records this build writes. A record may gain
/// optional fields within a schema (readers ignore what they do not know);
/// a change the schema before cannot read needs the next schema, and the
/// release that brings it still writes what the one before reads.
pub const SCHEMA: u8 = 1;

/// The oldest schema this build reads: its own and the one before (1 was
/// the first).
pub const OLDEST_SCHEMA: u8 = if SCHEMA > 1 { SCHEMA - 1 } else { 1 };

/// Whether this build reads records of `schema`.
pub fn reads_schema(schema: u8) -> bool {
    (OLDEST_SCHEMA..=SCHEMA).contains(&schema)
}

fn first_schema() -> u8 {
    1
}

/// How a node describes itself under the `node` key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The schema of the node's records ([`SCHEMA`] of its build; nodes
    /// from before the field wrote schema 1).
    #[serde(default = "first_schema")]
    pub schema: u8,
    /// Address of the node's QUIC tunnel endpoint.
    pub tunnel: String,
    /// Address of the node's admin HTTP endpoint.
    pub admin: String,
    /// weft version the node runs.
    pub version: String,
    /// Whether the node is serving, draining or gone.
    pub status: NodeStatus,
    /// The zone (gossip pool) the node was started in; `None` is the
    /// default zone, as nodes from before zones wrote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// The node is a bridge of its zone: it also gossips in the pool
    /// between zones and relays requests across them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bridge: bool,
}

impl NodeInfo {
    /// The tunnel address, parsed (`None` when it does not parse).
    pub fn tunnel_addr(&self) -> Option<std::net::SocketAddr> {
        self.tunnel.parse().ok()
    }
}

/// Lifecycle of a node as it announces it itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeStatus {
    /// Serving normally.
    Alive,
    /// Shutting down: its instances are being withdrawn.
    Draining,
    /// Left the cluster on purpose.
    Left,
}

/// Application protocol of an instance.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (and h2c if the instance speaks it).
    #[default]
    Http,
    /// Opaque TCP.
    Tcp,
}

impl Protocol {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

/// An instance's health as the catalog lists it: what its owner's checks
/// concluded, or `ejected` by the callers' outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Its checks pass (or it has no check).
    Passing,
    /// Not checked yet.
    Unknown,
    /// Ejected by two or more callers' outlier detection (gossiped votes).
    Ejected,
    /// Its checks fail: never routed to.
    Failing,
}

impl Health {
    /// The lowercase name used in gossip, JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Unknown => "unknown",
            Health::Ejected => "ejected",
            Health::Failing => "failing",
        }
    }

    /// Whether requests may go to it (ejected ones only in panic routing).
    pub fn routable(self) -> bool {
        self != Health::Failing
    }
}

/// How long a retry to the same instance waits.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RetryPolicy {
    /// The learned delay: how long this service's outages usually last.
    #[default]
    Learned,
    /// Envoy's default: 25 ms base, 250 ms cap, exponential, full jitter.
    Exponential,
    /// No retries at all (the baseline of the learning scenarios).
    None,
}

impl RetryPolicy {
    /// Parses "learned", "exponential" or "none".
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "learned" => Some(RetryPolicy::Learned),
            "exponential" => Some(RetryPolicy::Exponential),
            "none" => Some(RetryPolicy::None),
            _ => None,
        }
    }
}

/// A health check as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// HTTP GET path expected to answer 2xx.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
    /// TCP connect check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<bool>,
    /// TTL the service must refresh, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// Probe period override (default 2 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    /// Probe timeout override (default 1 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

impl ServiceRecord {
    /// A record with no check, tags or overrides.
    pub fn new(name: &str, id: &str, port: u16, protocol: Protocol) -> ServiceRecord {
        ServiceRecord {
            name: name.to_string(),
            id: id.to_string(),
            port,
            protocol,
            check: None,
            tags: Vec::new(),
            timeout_ms: None,
            retry: None,
            retry_non_idempotent: false,
            hedge: false,
            concurrency: None,
        }
    }
}

/// How many requests to an instance's service callers let in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Concurrency {
    /// A limit the nodes learn from the service's latency and share.
    Adaptive,
}

/// An instance hosted by a node, stored under `svc/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Service name.
    pub name: String,
    /// Instance id, unique on its node.
    pub id: String,
    /// Port on the node's loopback where the instance listens.
    pub port: u16,
    /// Application protocol.
    #[serde(default)]
    pub protocol: Protocol,
    /// Health check, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    /// Free-form tags.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Request timeout override for callers, in milliseconds (default 30 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Retry wait policy override: "learned" (default) or "exponential".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<String>,
    /// Callers may retry non-idempotent methods (POST, PATCH) too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub retry_non_idempotent: bool,
    /// Callers hedge idempotent requests: one more attempt to another
    /// instance once the cluster's p95 latency passed without an answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hedge: bool,
    /// Callers limit the requests in flight to the service (`"adaptive"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// What a zone offers of one service, stored under `zone/<zone>/<service>`
/// by bridges: in the pool between zones for their own zone, and in their
/// zone's pool for every other zone they heard of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneOffer {
    /// Routable instances of the service in the zone.
    pub healthy: u32,
    /// The zone's merged statistics of the service, as a `stats/<service>`
    /// summary (absent before the zone has any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<String>,
}
