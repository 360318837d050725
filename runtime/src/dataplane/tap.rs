//! Tap (`weft tap`, `GET /v1/tap`): live request lines from every node of
//! the cluster, as `linkerd viz tap` gives them. Each request is one line,
//! made on the node it entered (with its attempts, the instance that
//! answered and the status the app got).
//!
//! A node's [`Tap`] is off until someone listens: the request path pays
//! one atomic load for it. Listeners are few ([`MAX_LISTENERS`] a node)
//! and each has a bounded queue ([`QUEUE`] lines); one that falls behind
//! loses lines and is told how many. The node asked fans out over the
//! tunnel (a [`StreamKind::Tap`] stream to each live member, and to members
//! that join or come back while it lasts), so a tap from any node sees the
//! whole cluster.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use weft_gossip::MemberState;

use super::error::MeshError;
use super::DataPlane;
use crate::access_log::AccessEntry;
use crate::tunnel::{self, TunnelError};
use crate::wire::{RequestHead, ResponseHead, StreamKind};

/// Taps listening on one node at once, local and from peers.
pub const MAX_LISTENERS: usize = 16;

/// Lines a listener may lag behind before it loses some.
pub const QUEUE: usize = 1024;

/// The `service` of a tap stream's head.
const SERVICE: &str = "weft-tap";

/// One node's requests, for whoever listens.
#[derive(Debug)]
pub struct Tap {
    listeners: AtomicUsize,
    lines: broadcast::Sender<Arc<AccessEntry>>,
}

impl Default for Tap {
    fn default() -> Self {
        Tap {
            listeners: AtomicUsize::new(0),
            lines: broadcast::channel(QUEUE).0,
        }
    }
}

impl Tap {
    /// Whether anyone listens: only then is a line made.
    #[inline]
    pub fn on(&self) -> bool {
        self.listeners.load(Ordering::Relaxed) > 0
    }

    /// Offers one request's line to the listeners.
    pub fn publish(&self, line: AccessEntry) {
        let _ = self.lines.send(Arc::new(line));
    }

    /// Starts listening for lines that pass `filter`, unless
    /// [`MAX_LISTENERS`] already do.
    pub fn listen(self: &Arc<Self>, filter: Filter) -> Option<Listener> {
        let taken = self
            .listeners
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_LISTENERS).then_some(n + 1)
            });
        taken.ok()?;
        metrics::gauge!("weft_tap_listeners").increment(1.0);
        Some(Listener {
            tap: self.clone(),
            lines: self.lines.subscribe(),
            filter,
        })
    }
}

/// One listener; the tap goes off when the last is dropped.
#[derive(Debug)]
pub struct Listener {
    tap: Arc<Tap>,
    lines: broadcast::Receiver<Arc<AccessEntry>>,
    filter: Filter,
}

impl Listener {
    /// The next line that passes the filter, or how many were lost.
    pub async fn next(&mut self) -> Line {
        loop {
            match self.lines.recv().await {
                Ok(line) if self.filter.passes(&line) => return Line::Request(line),
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => return Line::Dropped(n),
                // The sender lives as long as the tap, which this holds.
                Err(broadcast::error::RecvError::Closed) => std::future::pending::<()>().await,
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.tap.listeners.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!("weft_tap_listeners").decrement(1.0);
    }
}

/// What a tap yields: a request, or word of lines lost.
#[derive(Debug, Clone, PartialEq)]
pub enum Line {
    /// One request, as the node it entered saw it.
    Request(Arc<AccessEntry>),
    /// Lines a listener lost by falling behind.
    Dropped(u64),
}

/// A [`Line`] on a tap stream, after its response head.
#[derive(Debug, Serialize, Deserialize)]
enum Frame {
    Request(Box<AccessEntry>),
    Dropped(u64),
}

impl From<Line> for Frame {
    fn from(line: Line) -> Self {
        match line {
            Line::Request(entry) => Frame::Request(Box::new(Arc::unwrap_or_clone(entry))),
            Line::Dropped(n) => Frame::Dropped(n),
        }
    }
}

impl From<Frame> for Line {
    fn from(frame: Frame) -> Self {
        match frame {
            Frame::Request(entry) => Line::Request(Arc::from(entry)),
            Frame::Dropped(n) => Line::Dropped(n),
        }
    }
}

/// Which requests a tap shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only this service.
    pub service: Option<String>,
    /// Only this caller (`-` the anonymous one).
    pub caller: Option<String>,
    /// Only these statuses.
    pub status: Option<Status>,
}

/// A status filter: `5xx` (a class) or `503` (one status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 100 times the class digit up to the next hundred.
    Class(u16),
    /// Exactly this status.
    Exact(u16),
}

impl Status {
    /// `5xx`, `4XX` or a status code.
    pub fn parse(s: &str) -> Option<Status> {
        let s = s.trim().to_ascii_lowercase();
        match s.strip_suffix("xx") {
            Some(class) => match class.parse::<u16>() {
                Ok(c @ 1..=5) => Some(Status::Class(c)),
                _ => None,
            },
            None => match s.parse::<u16>() {
                Ok(code @ 100..=599) => Some(Status::Exact(code)),
                _ => None,
            },
        }
    }

    fn passes(self, status: u16) -> bool {
        match self {
            Status::Class(c) => status / 100 == c,
            Status::Exact(code) => status == code,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Status::Class(c) => write!(f, "{c}xx"),
            Status::Exact(code) => write!(f, "{code}"),
        }
    }
}

impl Filter {
    /// Reads `service=..&caller=..&status=5xx` (any may be absent).
    pub fn from_query(query: &str) -> Result<Filter, String> {
        let mut filter = Filter::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "service" => filter.service = Some(value.to_string()),
                "caller" => filter.caller = Some(value.to_string()),
                "status" => {
                    let status = Status::parse(value).ok_or_else(|| {
                        format!("status {value:?}: give a class such as 5xx or a code such as 503")
                    })?;
                    filter.status = Some(status);
                }
                other => return Err(format!("unknown tap filter {other:?}")),
            }
        }
        Ok(filter)
    }

    /// The query [`Filter::from_query`] reads back.
    pub fn to_query(&self) -> String {
        let mut pairs = Vec::new();
        if let Some(service) = &self.service {
            pairs.push(format!("service={service}"));
        }
        if let Some(caller) = &self.caller {
            pairs.push(format!("caller={caller}"));
        }
        if let Some(status) = self.status {
            pairs.push(format!("status={status}"));
        }
        pairs.join("&")
    }

    fn passes(&self, line: &AccessEntry) -> bool {
        self.service
            .as_deref()
            .is_none_or(|s| line.service.as_deref() == Some(s))
            && self.caller.as_deref().is_none_or(|c| line.caller == c)
            && self.status.is_none_or(|s| s.passes(line.status))
    }
}

/// What the tap of a whole cluster yields: a node's line or word of a node
/// that could not be tapped.
#[derive(Debug, Clone, PartialEq)]
pub enum ClusterLine {
    /// `node` listens now: lines of its requests from here on will come.
    Listening(String),
    /// A line from `node` (this node's name for its own).
    From(String, Line),
    /// `node` could not be tapped, and why.
    Unreachable(String, String),
}

/// A tap of the whole cluster: lines from this node and from every live
/// member. Dropping it stops every node's part.
#[derive(Debug)]
pub struct ClusterTap {
    lines: mpsc::Receiver<ClusterLine>,
    _parts: JoinSet<()>,
}

impl ClusterTap {
    /// The next line from any node; `None` once every part has ended.
    pub async fn next(&mut self) -> Option<ClusterLine> {
        self.lines.recv().await
    }
}

/// How often a cluster tap looks for members it is not tapping (joined,
/// restarted, or lost for a moment).
const RESCAN: Duration = Duration::from_secs(2);

/// Taps this node and every other live member for `filter`, and members
/// that join or come back while it lasts; `None` when this node has
/// [`MAX_LISTENERS`] taps already.
pub fn cluster(dp: &Arc<DataPlane>, filter: Filter) -> Option<ClusterTap> {
    let local = dp.tap.listen(filter.clone())?;
    let (out, lines) = mpsc::channel(QUEUE);
    let mut parts = JoinSet::new();
    parts.spawn(relay_local(dp.node.clone(), local, out.clone()));
    parts.spawn(follow_members(dp.clone(), filter, out));
    Some(ClusterTap {
        lines,
        _parts: parts,
    })
}

/// This node's own lines, until the tap's reader goes.
async fn relay_local(node: String, mut local: Listener, out: mpsc::Sender<ClusterLine>) {
    if out
        .send(ClusterLine::Listening(node.clone()))
        .await
        .is_err()
    {
        return;
    }
    loop {
        let line = local.next().await;
        if out
            .send(ClusterLine::From(node.clone(), line))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// How one member's part of a tap ended.
struct PeerEnded {
    peer: String,
    /// It had been listening (so a failure now is news).
    listened: bool,
    error: Option<String>,
}

/// Taps every live member, again each one whose part ended, every
/// [`RESCAN`], until the tap's reader goes. A member that cannot be tapped
/// is reported once until it listens again.
async fn follow_members(dp: Arc<DataPlane>, filter: Filter, out: mpsc::Sender<ClusterLine>) {
    let mut parts: JoinSet<PeerEnded> = JoinSet::new();
    let mut tapping: HashSet<String> = HashSet::new();
    let mut failing: HashSet<String> = HashSet::new();
    let mut rescan = tokio::time::interval(RESCAN);
    loop {
        tokio::select! {
            _ = rescan.tick() => {
                for (peer, addr) in peers(&dp) {
                    if tapping.insert(peer.clone()) {
                        let (dp, filter, out) = (dp.clone(), filter.clone(), out.clone());
                        parts.spawn(async move { tap_peer(&dp, peer, addr, &filter, &out).await });
                    }
                }
            }
            Some(Ok(ended)) = parts.join_next() => {
                tapping.remove(&ended.peer);
                if ended.listened {
                    failing.remove(&ended.peer);
                }
                if let Some(error) = ended.error {
                    if failing.insert(ended.peer.clone())
                        && out.send(ClusterLine::Unreachable(ended.peer, error)).await.is_err()
                    {
                        return;
                    }
                }
            }
            () = out.closed() => return,
        }
    }
}

/// One member's part of a tap, until it or the reader ends.
async fn tap_peer(
    dp: &DataPlane,
    peer: String,
    addr: Option<SocketAddr>,
    filter: &Filter,
    out: &mpsc::Sender<ClusterLine>,
) -> PeerEnded {
    let (listened, ended) = match open(dp, &peer, addr, filter).await {
        Ok(stream) => (true, relay(&peer, stream, out).await),
        Err(e) => (false, Err(e)),
    };
    PeerEnded {
        peer,
        listened,
        error: ended.err().map(|e| e.to_string()),
    }
}

/// Live members other than this node, with their tunnel addresses.
fn peers(dp: &DataPlane) -> Vec<(String, Option<SocketAddr>)> {
    dp.router
        .load()
        .members
        .iter()
        .filter(|m| m.name != dp.node)
        .filter(|m| {
            matches!(
                m.state,
                MemberState::Alive | MemberState::Suspect | MemberState::Draining
            )
        })
        .map(|m| (m.name.clone(), m.tunnel_addr))
        .collect()
}

/// Asks `peer` for its tap; the stream its lines come on, once it listens.
async fn open(
    dp: &DataPlane,
    peer: &str,
    addr: Option<SocketAddr>,
    filter: &Filter,
) -> Result<(SendStream, RecvStream), TunnelError> {
    let addr = addr.ok_or_else(|| TunnelError::Stream("it announces no tunnel address".into()))?;
    let (mut send, mut recv) = dp.tunnels.open(peer, addr, StreamKind::Tap).await?;
    // A tap has no deadline; it asks for all of the node's requests.
    let head = RequestHead::control(StreamKind::Tap, SERVICE, "all", filter.to_query(), u32::MAX);
    tunnel::write_frame(&mut send, &head).await?;
    let _ = send.finish();
    let reply: ResponseHead = tunnel::read_frame(&mut recv).await?;
    if let Some(error) = reply.error {
        return Err(TunnelError::Stream(format!("refused: {error}")));
    }
    Ok((send, recv))
}

/// Relays `peer`'s lines to `out` until either side ends.
async fn relay(
    peer: &str,
    (_send, mut recv): (SendStream, RecvStream),
    out: &mpsc::Sender<ClusterLine>,
) -> Result<(), TunnelError> {
    if out
        .send(ClusterLine::Listening(peer.to_string()))
        .await
        .is_err()
    {
        return Ok(());
    }
    loop {
        let frame: Frame = tunnel::read_frame(&mut recv).await?;
        if out
            .send(ClusterLine::From(peer.to_string(), frame.into()))
            .await
            .is_err()
        {
            return Ok(());
        }
    }
}

/// Whether `head` asks for this node's tap.
pub(super) fn is_tap_request(head: &RequestHead) -> bool {
    head.kind == StreamKind::Tap && head.service == SERVICE
}

/// Streams this node's lines to the peer that asked, until it stops
/// reading.
pub(super) async fn serve(
    dp: &DataPlane,
    head: &RequestHead,
    mut send: SendStream,
) -> Result<(), TunnelError> {
    let Ok(filter) = Filter::from_query(&head.uri) else {
        return super::inbound::refuse(&mut send, MeshError::BadRequest).await;
    };
    let Some(mut listener) = dp.tap.listen(filter) else {
        return super::inbound::refuse(&mut send, MeshError::Overloaded).await;
    };
    let ready = ResponseHead {
        status: 200,
        headers: Vec::new(),
        error: None,
        end_stream: false,
    };
    tunnel::write_frame(&mut send, &ready).await?;
    loop {
        let line = tokio::select! {
            line = listener.next() => line,
            // The asking node went away (its tap ended).
            _ = send.stopped() => return Ok(()),
        };
        tunnel::write_frame(&mut send, &Frame::from(line)).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(service: &str, caller: &str, status: u16) -> AccessEntry {
        AccessEntry {
            time: String::new(),
            service: Some(service.into()),
            caller: caller.into(),
            instance: None,
            node: None,
            method: "GET".into(),
            path: "/".into(),
            status,
            duration_ms: 1.0,
            attempts: 1,
            retry_wait_ms: 0.0,
            weft_error: None,
        }
    }

    #[test]
    fn filters_read_back_and_select() {
        let f = Filter::from_query("service=api&caller=web&status=5xx").unwrap();
        assert_eq!(Filter::from_query(&f.to_query()).unwrap(), f);
        assert!(f.passes(&line("api", "web", 503)));
        assert!(!f.passes(&line("api", "web", 200)));
        assert!(!f.passes(&line("api", "-", 503)));
        assert!(!f.passes(&line("db", "web", 503)));
        let exact = Filter::from_query("status=404").unwrap();
        assert!(exact.passes(&line("x", "-", 404)) && !exact.passes(&line("x", "-", 400)));
        assert!(Filter::default().passes(&line("x", "-", 200)));
        for bad in ["status=6xx", "status=abc", "status=99", "colour=red"] {
            assert!(Filter::from_query(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn off_until_listened_to_and_bounded() {
        let tap = Arc::new(Tap::default());
        assert!(!tap.on());
        let mut listeners: Vec<Listener> = (0..MAX_LISTENERS)
            .map(|_| tap.listen(Filter::default()).unwrap())
            .collect();
        assert!(tap.on());
        assert!(
            tap.listen(Filter::default()).is_none(),
            "at most {MAX_LISTENERS}"
        );
        tap.publish(line("api", "-", 200));
        assert!(
            matches!(listeners[0].next().await, Line::Request(l) if l.service.as_deref() == Some("api"))
        );
        // One that falls behind is told how many it lost.
        for _ in 0..QUEUE + 5 {
            tap.publish(line("api", "-", 200));
        }
        assert_eq!(listeners[1].next().await, Line::Dropped(6));
        listeners.clear();
        assert!(!tap.on());
    }
}
