//! The caps the mesh enforces itself. A request or connection refused at
//! one is counted in `weft_limit_refused_total{limit}` under the limit's
//! name, so a refusal is never blamed on an instance.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One of the mesh's own limits: the `limit` label of
/// `weft_limit_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// App connections to the proxy, at `--max-connections`.
    ProxyConnections,
    /// App connections to one TCP upstream listener.
    UpstreamConnections,
    /// Tunnel connections from peers.
    TunnelConnections,
    /// A request head over the size limit.
    RequestHead,
    /// An instance's response head too large or too slow.
    ResponseHead,
    /// A request that crossed too many weft hops (a loop).
    Hops,
    /// A request the proxy could not read.
    BadRequest,
    /// An admin request naming another host (DNS rebinding).
    AdminHost,
    /// Streams one peer has open at once.
    PeerStreams,
    /// Active connections to one local instance, over all peers.
    InstanceActive,
    /// A spliced connection (TCP, upgrade) that moved nothing for an hour.
    SpliceIdle,
    /// A streamed body that moved nothing for `--body-idle-timeout`.
    BodyIdle,
}

impl Limit {
    /// Every limit, so each counter exists at 0 from the start.
    pub const ALL: [Limit; 12] = [
        Limit::ProxyConnections,
        Limit::UpstreamConnections,
        Limit::TunnelConnections,
        Limit::RequestHead,
        Limit::ResponseHead,
        Limit::Hops,
        Limit::BadRequest,
        Limit::AdminHost,
        Limit::PeerStreams,
        Limit::InstanceActive,
        Limit::SpliceIdle,
        Limit::BodyIdle,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::ProxyConnections => "proxy_connections",
            Limit::UpstreamConnections => "upstream_connections",
            Limit::TunnelConnections => "tunnel_connections",
            Limit::RequestHead => "request_head",
            Limit::ResponseHead => "response_head",
            Limit::Hops => "hops",
            Limit::BadRequest => "bad_request",
            Limit::AdminHost => "admin_host",
            Limit::PeerStreams => "peer_streams",
            Limit::InstanceActive => "instance_active",
            Limit::SpliceIdle => "splice_idle",
            Limit::BodyIdle => "body_idle",
        }
    }

    /// Counts one refusal at this limit.
    pub fn count(self) {
        metrics::counter!("weft_limit_refused_total", "limit" => self.as_str()).increment(1);
    }
}

/// Caps on what apps and peers may open.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once per listener (proxy, each TCP upstream,
    /// tunnel connections from peers).
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
        }
    }
}

/// A per-listener connection cap: a connection over it is closed at once
/// and counted in `weft_limit_refused_total{limit}`.
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    limit: Limit,
    permits: Arc<Semaphore>,
}

impl ConnectionLimit {
    /// A cap of `max` connections, counted under `limit`.
    pub fn new(limit: Limit, max: usize) -> Self {
        ConnectionLimit {
            limit,
            permits: Arc::new(Semaphore::new(max)),
        }
    }

    /// A permit to hold while the connection lives, or `None` (counted) when
    /// the listener is full.
    pub fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.permits.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.limit.count();
            tracing::debug!(
                limit = self.limit.as_str(),
                "connection refused: listener at its cap"
            );
        }
        permit
    }
}

/// Accepts app connections on `listener` until the task is aborted: one
/// over `limit` is closed at once, each other goes to `serve` with its
/// permit. `what` names the listener in the log.
pub async fn accept_each(
    listener: TcpListener,
    limit: ConnectionLimit,
    what: &str,
    mut serve: impl FnMut(TcpStream, OwnedSemaphorePermit),
) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, what, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Some(permit) = limit.admit() {
            serve(stream, permit);
        }
    }
}
