//! The inbound side of the tunnel: streams from peer nodes, handed to this
//! node's own instances.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Endpoint, RecvStream, SendStream};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use weft_gossip::{MemberState, Protocol, ServiceRecord};

use super::bridge::{self, Relayed};
use super::error::MeshError;
use super::local::LocalFailure;
use super::request::{header_map, is_upgrade, wire_pairs, Forward};
use super::spans::InboundSpan;
use super::splice::{reset_tcp, splice};
use super::tables::RouterSnapshot;
use super::{body, ConnectionLimit, DataPlane, Limit, ProxyBody};
use crate::caller::{self, Claim};
use crate::outcome::{OutcomeClass, RequestMetrics};
use crate::policy::intentions::Decision;
use crate::trace::Hop;
use crate::tunnel::{self, TunnelError};
use crate::wire::body::{BodyDecoder, BodyEvent};
use crate::wire::{RequestHead, ResponseHead, StreamKind, TunnelVersion};

/// How long a peer may take to send a stream's header frame.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections one peer node may hold to this node at once (its pool keeps
/// one; reconnects and races briefly make more).
const MAX_CONNECTIONS_PER_PEER: usize = 8;

/// Streams one peer node may have open here at once, over all its
/// connections: each may dial a local connection.
const MAX_STREAMS_PER_PEER: usize = 4096;

/// Requests and connections in flight to one local instance at once, from
/// all peers: the local pool caps idle connections, this caps active ones.
const MAX_ACTIVE_PER_INSTANCE: usize = 2048;

/// How long an unknown caller may take to appear in this node's view of the
/// cluster (a node that just joined is heard of within a few gossip rounds).
const MEMBERSHIP_WAIT: Duration = Duration::from_secs(3);

/// Accepts tunnel connections until the endpoint closes.
pub async fn serve(endpoint: Endpoint, dp: Arc<DataPlane>) {
    let limit = ConnectionLimit::new(Limit::TunnelConnections, dp.limits.max_connections);
    let peers = Arc::new(PeerCounts::default());
    while let Some(incoming) = endpoint.accept().await {
        let Some(permit) = limit.admit() else {
            incoming.refuse();
            continue;
        };
        let (dp, peers) = (dp.clone(), peers.clone());
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    let reason = if crate::tls::is_revoked(&e) {
                        "revoked"
                    } else {
                        "handshake"
                    };
                    count_refused(reason);
                    tracing::warn!(error = %e, reason, "refused a tunnel connection");
                    return;
                }
            };
            let Some(peer) = admit(&dp, &conn, &peers).await else {
                return;
            };
            let version = crate::tls::negotiated(&conn);
            let mut trust = dp.tunnels.trust();
            loop {
                let accepted = tokio::select! {
                    accepted = conn.accept_bi() => accepted,
                    Ok(()) = trust.changed() => {
                        let checked = trust.borrow_and_update().check_caller(&conn);
                        if let Err(distrust) = checked {
                            count_refused(distrust.reason());
                            tracing::warn!(caller = peer.name, reason = distrust.reason(),
                                "closed a tunnel from a peer no longer trusted");
                            conn.close(quinn::VarInt::from_u32(3), distrust.reason().as_bytes());
                            break;
                        }
                        continue;
                    }
                };
                match accepted {
                    Ok((send, recv)) => {
                        let dp = dp.clone();
                        let caller = peer.name.clone();
                        let slot = peer.streams.clone().try_acquire_owned().ok();
                        tokio::spawn(async move {
                            if let Err(e) =
                                handle_stream(&dp, (&caller, version), slot, send, recv).await
                            {
                                tracing::debug!(error = %e, caller, "inbound stream failed");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, caller = peer.name, "tunnel connection closed");
                        break;
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Counts a refused or closed tunnel connection by reason.
pub fn count_refused(reason: &'static str) {
    metrics::counter!("weft_tunnel_refused_total", "reason" => reason).increment(1);
}

/// Checks who is calling, on top of the TLS handshake (which proved a
/// certificate of the cluster CA): the certificate must name a node, that
/// node must be a live member, and it may hold only a few connections.
/// A refusal closes the connection with a reason and is counted.
async fn admit(
    dp: &DataPlane,
    conn: &quinn::Connection,
    peers: &Arc<PeerCounts>,
) -> Option<PeerGuard> {
    let refuse = |reason: &'static str, detail: String| {
        count_refused(reason);
        tracing::warn!(remote = %conn.remote_address(), reason, "refused a tunnel connection: {detail}");
        conn.close(quinn::VarInt::from_u32(2), reason.as_bytes());
        None
    };
    let Some(name) = crate::tls::peer_node(conn) else {
        return refuse("no_node_name", "its certificate names no node".into());
    };
    if !wait_for_member(dp, &name).await {
        return refuse(
            "not_a_member",
            format!("{name} is not a live member of the cluster"),
        );
    }
    match peers.enter(&name) {
        Some(guard) => Some(guard),
        None => refuse(
            "too_many_connections",
            format!("{name} already holds {MAX_CONNECTIONS_PER_PEER} connections"),
        ),
    }
}

/// True once `name` is a live member (alive, suspect or draining) in the
/// router's view, waiting up to [`MEMBERSHIP_WAIT`] for a node that just
/// joined.
async fn wait_for_member(dp: &DataPlane, name: &str) -> bool {
    let deadline = tokio::time::Instant::now() + MEMBERSHIP_WAIT;
    loop {
        let live = dp.router.load().members.iter().any(|m| {
            m.name == name
                && matches!(
                    m.state,
                    MemberState::Alive | MemberState::Suspect | MemberState::Draining
                )
        });
        if live || tokio::time::Instant::now() >= deadline {
            return live;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Connections held per peer node, and the streams its connections share.
#[derive(Debug, Default)]
struct PeerCounts(std::sync::Mutex<HashMap<String, (usize, Arc<Semaphore>)>>);

/// One connection of a peer; gives its place back when dropped.
struct PeerGuard {
    name: String,
    counts: Arc<PeerCounts>,
    /// Stream slots of this peer, shared by all its connections.
    streams: Arc<Semaphore>,
}

impl PeerCounts {
    fn enter(self: &Arc<Self>, name: &str) -> Option<PeerGuard> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let (held, streams) = counts
            .entry(name.to_string())
            .or_insert_with(|| (0, Arc::new(Semaphore::new(MAX_STREAMS_PER_PEER))));
        if *held >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *held += 1;
        Some(PeerGuard {
            name: name.to_string(),
            counts: self.clone(),
            streams: streams.clone(),
        })
    }
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((held, _)) = counts.get_mut(&self.name) {
            *held -= 1;
            if *held == 0 {
                counts.remove(&self.name);
            }
        }
    }
}

/// Slots of active requests and connections per local instance port.
#[derive(Debug, Default)]
pub struct InstanceSlots(std::sync::Mutex<HashMap<u16, Arc<Semaphore>>>);

impl InstanceSlots {
    /// A slot for one more stream to the instance on `port`, or `None`
    /// when it has [`MAX_ACTIVE_PER_INSTANCE`]. Ports are those of local
    /// registrations, so the map stays as small as the registry.
    fn admit(&self, port: u16) -> Option<OwnedSemaphorePermit> {
        let slots = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(port)
            .or_insert_with(|| Arc::new(Semaphore::new(MAX_ACTIVE_PER_INSTANCE)))
            .clone();
        slots.try_acquire_owned().ok()
    }
}

/// Answers a stream with a mesh error instead of an instance's response.
pub(super) async fn refuse(send: &mut SendStream, error: MeshError) -> Result<(), TunnelError> {
    let head = ResponseHead {
        status: error.status().as_u16(),
        headers: Vec::new(),
        error: Some(error.code().to_string()),
        end_stream: true,
    };
    tunnel::write_frame(send, &head).await?;
    let _ = send.finish();
    Ok(())
}

/// One stream from `peer`, on a connection of tunnel `version`.
async fn handle_stream(
    dp: &DataPlane,
    (peer, version): (&str, TunnelVersion),
    peer_slot: Option<OwnedSemaphorePermit>,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), TunnelError> {
    let _busy = dp.in_flight.track();
    let Some(_peer_slot) = peer_slot else {
        Limit::PeerStreams.count();
        return refuse(&mut send, MeshError::Overloaded).await;
    };
    let head: RequestHead = tokio::time::timeout(HEAD_TIMEOUT, tunnel::read_frame(&mut recv))
        .await
        .map_err(|_| TunnelError::Stream("no header frame in time".into()))??;
    if let Err(e) = head.validate() {
        refuse(&mut send, MeshError::BadRequest).await?;
        return Err(e.into());
    }
    if !version.carries(head.kind) {
        refuse(&mut send, MeshError::BadRequest).await?;
        return Err(TunnelError::Stream(format!(
            "a {:?} stream on a tunnel {version} connection",
            head.kind
        )));
    }
    if super::keys::is_key_request(&head) {
        tunnel::close_read(recv);
        return super::keys::serve(dp, &head, send).await;
    }
    if super::tap::is_tap_request(&head) {
        tunnel::close_read(recv);
        return super::tap::serve(dp, &head, send).await;
    }
    let (head, mut send, recv) = if weft_gossip::zones::is_gateway(&head.instance) {
        match bridge::relay(dp, peer, head, send, recv).await? {
            Relayed::Done => return Ok(()),
            Relayed::Here(head, send, recv) => (head, send, recv),
        }
    } else {
        (head, send, recv)
    };
    let admitted = match dp.registered.authorize(&head) {
        Ok(admitted) => admitted,
        Err(refusal) => {
            count_refused(refusal.reason());
            tracing::warn!(service = head.service, instance = head.instance,
                kind = ?head.kind, reason = refusal.reason(), "refused a tunnel stream");
            return refuse(&mut send, refusal.answer()).await;
        }
    };
    let Some(_instance_slot) = dp.instance_slots.admit(admitted.port) else {
        Limit::InstanceActive.count();
        return refuse(&mut send, MeshError::Overloaded).await;
    };
    // The peer says how long its caller waits; this node works no longer
    // than the instance's own timeout (or the node's default) allows.
    let longest = admitted.timeout.unwrap_or(dp.timeouts.request);
    let deadline = Duration::from_millis(u64::from(head.deadline_ms.max(1))).min(longest);
    let port = admitted.port;
    match head.kind {
        StreamKind::Http => {
            Inbound {
                dp,
                peer,
                head,
                port,
                deadline,
            }
            .http(send, recv)
            .await
        }
        StreamKind::Tcp => {
            let mut headers = header_map(head.headers);
            if admit_caller(dp, peer, &head.service, &mut headers).is_err() {
                let mut send = send;
                return refuse(&mut send, MeshError::Forbidden).await;
            }
            tcp(dp, port, send, recv).await
        }
        // Key and tap requests name no instance; `authorize` refuses them
        // already.
        StreamKind::Key | StreamKind::Tap => {
            let mut send = send;
            refuse(&mut send, MeshError::BadRequest).await
        }
    }
}

/// This node's own registrations, as its registry last published them: the
/// only instances a peer may reach through this node. The gossip catalog is
/// never asked, since any member can write a record that names this node
/// (a forged incarnation with a port of its choosing).
#[derive(Debug, Clone)]
pub struct Registered(watch::Receiver<Vec<ServiceRecord>>);

/// A local instance a stream may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    /// Its port on loopback.
    pub port: u16,
    /// Its registered request timeout, if it set one.
    pub timeout: Option<Duration>,
}

/// Why a stream was refused before any instance was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No local registration has that service and instance id.
    Unregistered,
    /// The instance is registered with the other protocol (a raw TCP stream
    /// to an HTTP instance, or the reverse).
    ProtocolMismatch,
}

impl Refusal {
    /// The `weft_tunnel_refused_total{reason}` label.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Unregistered => "unregistered_instance",
            Refusal::ProtocolMismatch => "protocol_mismatch",
        }
    }

    fn answer(self) -> MeshError {
        match self {
            Refusal::Unregistered => MeshError::NoHealthyInstance,
            Refusal::ProtocolMismatch => MeshError::BadRequest,
        }
    }
}

impl Registered {
    /// Follows the registry's published registrations.
    pub fn new(registrations: watch::Receiver<Vec<ServiceRecord>>) -> Self {
        Registered(registrations)
    }

    /// A node with no registrations (tests of the outbound side alone).
    pub fn none() -> Self {
        Registered(watch::channel(Vec::new()).1)
    }

    /// The instance `head` names, when this node registered it under that
    /// service with the stream's protocol.
    pub fn authorize(&self, head: &RequestHead) -> Result<Admitted, Refusal> {
        let registrations = self.0.borrow();
        let record = registrations
            .iter()
            .find(|r| r.id == head.instance && r.name == head.service)
            .ok_or(Refusal::Unregistered)?;
        let speaks = match head.kind {
            StreamKind::Http => Protocol::Http,
            StreamKind::Tcp => Protocol::Tcp,
            StreamKind::Key | StreamKind::Tap => return Err(Refusal::Unregistered),
        };
        if record.protocol != speaks {
            return Err(Refusal::ProtocolMismatch);
        }
        Ok(Admitted {
            port: record.port,
            timeout: record.timeout_ms.map(Duration::from_millis),
        })
    }
}

/// A peer's HTTP request for one of this node's instances.
struct Inbound<'a> {
    dp: &'a DataPlane,
    /// The calling node, as its certificate names it.
    peer: &'a str,
    head: RequestHead,
    port: u16,
    /// How long the instance may take to answer.
    deadline: Duration,
}

impl Inbound<'_> {
    async fn http(mut self, mut send: SendStream, mut recv: RecvStream) -> Result<(), TunnelError> {
        let mut req = match Forward::from_wire(&mut self.head, body::empty()) {
            Ok(req) => req,
            Err(detail) => {
                refuse(&mut send, MeshError::BadRequest).await?;
                return Err(TunnelError::Stream(detail));
            }
        };
        let Ok(caller) = admit_caller(self.dp, self.peer, &self.head.service, req.headers_mut())
        else {
            return refuse(&mut send, MeshError::Forbidden).await;
        };
        let caller = caller.to_str().unwrap_or(caller::ANONYMOUS);
        let span = InboundSpan::begin(&self.dp.tracer, req.headers_mut());
        // An upgrade's body is read here, so the stream is left at the raw
        // bytes that follow a 101.
        let upgrade = is_upgrade(req.headers());
        let recv = match (upgrade, self.head.end_stream) {
            (true, true) => Some(recv),
            (true, false) => {
                *req.body_mut() = read_whole_body(&mut recv).await?;
                Some(recv)
            }
            (false, true) => {
                tunnel::close_read(recv);
                None
            }
            (false, false) => {
                *req.body_mut() = body::from_tunnel(recv, self.dp.timeouts.body_idle);
                None
            }
        };
        let start = Instant::now();
        let result = tokio::time::timeout(self.deadline, self.dp.local.call(self.port, req)).await;
        let failed = match result {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(LocalFailure::Unreachable(detail))) => {
                tracing::debug!(detail, "local instance unreachable");
                self.record(caller, OutcomeClass::Unreachable, start);
                Err(MeshError::UpstreamUnreachable)
            }
            Ok(Err(LocalFailure::Mesh(error, detail))) => {
                tracing::debug!(detail, %error, "refused by the mesh's limits");
                Err(error)
            }
            Err(_) => {
                self.record(caller, OutcomeClass::Timeout, start);
                Err(MeshError::UpstreamTimeout)
            }
        };
        if let Some(span) = span {
            span.end(&self.dp.tracer, self.hop(caller, &failed));
        }
        let mut resp = match failed {
            Ok(resp) => resp,
            Err(error) => return refuse(&mut send, error).await,
        };
        let status = resp.status();
        self.record(caller, OutcomeClass::from_status(status.as_u16()), start);
        let end_stream = hyper::body::Body::is_end_stream(resp.body());
        let head = ResponseHead {
            status: status.as_u16(),
            headers: wire_pairs(resp.headers()),
            error: None,
            end_stream,
        };
        let mut head = tunnel::Batch::with_frame(&head)?;
        if let (Some(recv), hyper::StatusCode::SWITCHING_PROTOCOLS) = (recv, status) {
            let upgraded = hyper::upgrade::on(&mut resp);
            head.write(&mut send).await?;
            let io = upgraded
                .await
                .map_err(|e| TunnelError::Stream(format!("upgrade: {e}")))?;
            splice(hyper_util::rt::TokioIo::new(io), send, recv).await;
            return Ok(());
        }
        if end_stream {
            head.write(&mut send).await?;
        } else {
            body::to_tunnel(
                resp.into_body(),
                &mut send,
                head,
                self.dp.timeouts.body_idle,
            )
            .await?;
        }
        let _ = send.finish();
        Ok(())
    }

    fn record(&self, caller: &str, class: OutcomeClass, start: Instant) {
        self.dp
            .inbound_metrics
            .record(&self.head.service, caller, class, start.elapsed());
    }

    /// What this node's span of the attempt says: the instance's answer,
    /// or the mesh error that stood in for it.
    fn hop<B>(&self, caller: &str, answer: &Result<hyper::Response<B>, MeshError>) -> Hop {
        let (status, error) = match answer {
            Ok(resp) => (resp.status().as_u16(), None),
            Err(error) => (error.status().as_u16(), Some(error.code().to_string())),
        };
        Hop {
            service: self.head.service.clone(),
            caller: caller.to_string(),
            node: self.dp.node.clone(),
            instance: Some((self.dp.node.clone(), self.head.instance.clone())),
            method: self.head.method.clone(),
            path: self
                .head
                .uri
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string(),
            attempt: Some(self.head.attempt),
            status: Some(status),
            error,
            ..Hop::default()
        }
    }
}

/// Believes the caller `peer` names in a request for `service` only if
/// the peer hosts that service (in `routing`'s catalog), and names the
/// peer; a bridge's caller and calling node are believed as it relays
/// them, as it or the bridge before it checked them.
pub(super) fn check_claim(
    routing: &RouterSnapshot,
    peer: &str,
    service: &str,
    headers: &mut http::HeaderMap,
) {
    let vouched = headers.contains_key(caller::CALLER_NODE) && routing.is_bridge(peer);
    if vouched {
        return;
    }
    let hosts = |caller: &str| {
        routing
            .catalog
            .instances(caller)
            .iter()
            .any(|i| i.node == peer)
    };
    if caller::admit_claim(headers, peer, hosts) == Claim::NotHosted {
        metrics::counter!("weft_caller_claims_rejected_total").increment(1);
        tracing::warn!(
            peer,
            service,
            "a peer named a caller it hosts no registration of; treated as the anonymous caller"
        );
    }
}

/// [`check_claim`], then the cluster's intentions again here, where the
/// instance is (the calling node checked them already). The caller the
/// instance is told, or the denial.
fn admit_caller(
    dp: &DataPlane,
    peer: &str,
    service: &str,
    headers: &mut http::HeaderMap,
) -> Result<http::HeaderValue, Decision> {
    check_claim(&dp.router.load(), peer, service, headers);
    let caller = headers
        .get(caller::CALLER)
        .cloned()
        .unwrap_or(http::HeaderValue::from_static(caller::ANONYMOUS));
    let name = caller.to_str().unwrap_or(caller::ANONYMOUS);
    if let Err(denied) = dp.authorize(name, service) {
        tracing::debug!(
            caller = name,
            service,
            reason = denied.reason(),
            "refused by the cluster's intentions"
        );
        return Err(denied);
    }
    Ok(caller)
}

/// Reads a (small) framed body to its end, leaving the stream after it.
async fn read_whole_body(recv: &mut RecvStream) -> Result<ProxyBody, TunnelError> {
    let mut decoder = BodyDecoder::new();
    let mut data = bytes::BytesMut::new();
    loop {
        match tunnel::read_body(recv, &mut decoder).await? {
            BodyEvent::Data(b)
                if data.len() + b.len() <= crate::policy::retry::MAX_BUFFERED_BODY =>
            {
                data.extend_from_slice(&b)
            }
            BodyEvent::Data(_) => {
                return Err(TunnelError::Stream("upgrade request body too large".into()))
            }
            BodyEvent::Trailers(_) | BodyEvent::End => break,
        }
    }
    Ok(body::full(data.freeze()))
}

async fn tcp(
    dp: &DataPlane,
    port: u16,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<(), TunnelError> {
    let conn =
        tokio::time::timeout(dp.timeouts.connect, TcpStream::connect(("127.0.0.1", port))).await;
    let Ok(Ok(stream)) = conn else {
        return refuse(&mut send, MeshError::UpstreamUnreachable).await;
    };
    let _ = stream.set_nodelay(true);
    tunnel::write_frame(
        &mut send,
        &ResponseHead {
            status: 200,
            headers: Vec::new(),
            error: None,
            end_stream: false,
        },
    )
    .await?;
    let (stream, end) = splice(stream, send, recv).await;
    if end.resets_local() {
        reset_tcp(stream);
    }
    Ok(())
}

/// The serving side's metrics (`weft_requests_total{direction="inbound"}`
/// and its duration histogram), with the handles of each (service, caller)
/// edge resolved once: counting a request costs a read lock and two atomic
/// updates, no label lookup and no copy. The caller's statistics already
/// count each attempt once, so inbound requests feed the metrics only.
/// Callers are believed ones (a service the calling node hosts) or `-`, so
/// the edges are bounded by the catalog.
#[derive(Debug, Default)]
pub struct InboundMetrics(std::sync::RwLock<HashMap<String, HashMap<String, Arc<RequestMetrics>>>>);

impl InboundMetrics {
    /// Counts one request from `caller` handed to an instance of `service`.
    pub fn record(&self, service: &str, caller: &str, class: OutcomeClass, latency: Duration) {
        let known = self
            .0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(service)
            .and_then(|callers| callers.get(caller))
            .cloned();
        let handles = known.unwrap_or_else(|| self.register(service, caller));
        handles.record(class, latency);
    }

    fn register(&self, service: &str, caller: &str) -> Arc<RequestMetrics> {
        let handles = Arc::new(RequestMetrics::new(service, caller, "inbound"));
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(service.to_string())
            .or_default()
            .insert(caller.to_string(), handles.clone());
        handles
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WIRE_VERSION;

    fn head(kind: StreamKind, service: &str, instance: &str) -> RequestHead {
        RequestHead {
            version: WIRE_VERSION,
            kind,
            service: service.into(),
            instance: instance.into(),
            method: String::new(),
            uri: String::new(),
            headers: vec![],
            deadline_ms: 1000,
            attempt: 0,
            http2: false,
            end_stream: true,
        }
    }

    /// Only what this node registered is reachable, with the protocol it
    /// was registered with; the registrations are read as they change.
    #[test]
    fn a_stream_reaches_only_a_registered_instance_of_its_protocol() {
        let (tx, rx) = watch::channel(vec![
            ServiceRecord::new("web", "web-1", 8080, Protocol::Http),
            ServiceRecord::new("db", "db-1", 5432, Protocol::Tcp),
        ]);
        let registered = Registered::new(rx);
        let ok = |kind, service, id| {
            registered
                .authorize(&head(kind, service, id))
                .map(|a| a.port)
        };
        assert_eq!(ok(StreamKind::Http, "web", "web-1"), Ok(8080));
        assert_eq!(ok(StreamKind::Tcp, "db", "db-1"), Ok(5432));
        assert_eq!(
            ok(StreamKind::Tcp, "web", "web-1"),
            Err(Refusal::ProtocolMismatch)
        );
        assert_eq!(
            ok(StreamKind::Http, "db", "db-1"),
            Err(Refusal::ProtocolMismatch)
        );
        // An id under another service's name, or one never registered.
        assert_eq!(
            ok(StreamKind::Tcp, "db", "web-1"),
            Err(Refusal::Unregistered)
        );
        assert_eq!(
            ok(StreamKind::Tcp, "ssh", "ssh-1"),
            Err(Refusal::Unregistered)
        );
        tx.send_replace(vec![]);
        assert_eq!(
            ok(StreamKind::Http, "web", "web-1"),
            Err(Refusal::Unregistered)
        );
    }
}
