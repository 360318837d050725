//! QUIC tunnels between nodes: one pooled connection per peer, the reads
//! and writes of a stream's frames, and the runtime quinn's drivers run on
//! ([`TunnelRuntime`]).
//!
//! A stream starts with a [`wire`](crate::wire) header frame. HTTP bodies then
//! travel in the framing of [`wire::body`] (this file only does the IO); TCP
//! streams and upgraded connections carry raw bytes after the heads.

use crate::tls::PeerTrust;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use quinn::{Connection, Endpoint, RecvStream, SendStream};

use crate::wire::body::{self, BodyDecoder, BodyEvent};
use crate::wire::{self, StreamKind, WireError};

/// Errors on a tunnel stream.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// Could not connect to the peer node.
    #[error("cannot connect to node {node} at {addr}: {reason}")]
    Connect {
        /// Peer node.
        node: String,
        /// Its tunnel address.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The stream failed mid-way.
    #[error("tunnel stream failed: {0}")]
    Stream(String),
    /// The peer sent something malformed.
    #[error("tunnel protocol error: {0}")]
    Wire(#[from] WireError),
}

/// Outbound side: connections to peer nodes, reused across requests.
#[derive(Debug)]
pub struct TunnelPool {
    endpoint: Endpoint,
    /// This node's client TLS; swapped when certificates are reloaded.
    client: ArcSwap<quinn::ClientConfig>,
    /// Whom peers must be; connections of both directions are checked
    /// against it again when it changes.
    trust: tokio::sync::watch::Sender<Arc<PeerTrust>>,
    connections: Mutex<HashMap<PeerKey, Connection>>,
    /// One dial at a time per peer: requests that find no connection wait
    /// for the handshake in flight rather than each starting their own (a
    /// burst on a cold pool would exceed the peer's limit on connections
    /// per node). Each slot remembers its last failed dial, so the waiters
    /// share its outcome instead of dialing a dead peer one after another.
    dialing: Mutex<HashMap<PeerKey, Arc<tokio::sync::Mutex<Option<DialFailure>>>>>,
    connect_timeout: Duration,
}

/// A peer node and its tunnel address.
type PeerKey = (String, SocketAddr);

/// When a dial failed, and why.
type DialFailure = (Instant, String);

impl TunnelPool {
    /// A pool dialing from `endpoint` with `client` TLS.
    pub fn new(
        endpoint: Endpoint,
        client: quinn::ClientConfig,
        trust: PeerTrust,
        connect_timeout: Duration,
    ) -> Self {
        TunnelPool {
            endpoint,
            client: ArcSwap::from_pointee(client),
            trust: tokio::sync::watch::Sender::new(Arc::new(trust)),
            connections: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            connect_timeout,
        }
    }

    /// New connections use `client` (reloaded certificates); connections
    /// already up stay unless their peer fails `trust` (a revoked
    /// certificate): those are closed and counted. Returns how many
    /// pooled connections were closed.
    pub fn reload(&self, client: quinn::ClientConfig, trust: PeerTrust) -> usize {
        self.client.store(Arc::new(client));
        let mut closed = 0;
        self.lock()
            .retain(|(node, _), conn| match trust.check_dialed(conn, node) {
                Ok(()) => true,
                Err(distrust) => {
                    crate::dataplane::count_refused(distrust.reason());
                    tracing::warn!(
                        node,
                        reason = distrust.reason(),
                        "closed the tunnel to a peer no longer trusted"
                    );
                    conn.close(quinn::VarInt::from_u32(3), distrust.reason().as_bytes());
                    closed += 1;
                    false
                }
            });
        self.trust.send_replace(Arc::new(trust));
        closed
    }

    /// The current peer trust, and its changes (for accepted connections).
    pub fn trust(&self) -> tokio::sync::watch::Receiver<Arc<PeerTrust>> {
        self.trust.subscribe()
    }

    /// The endpoint, for the accept loop.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The pooled connection to `key`, if it is still open.
    fn pooled(&self, key: &PeerKey) -> Option<Connection> {
        self.lock()
            .get(key)
            .filter(|conn| conn.close_reason().is_none())
            .cloned()
    }

    async fn connection(&self, node: &str, addr: SocketAddr) -> Result<Connection, TunnelError> {
        let key = (node.to_string(), addr);
        if let Some(conn) = self.pooled(&key) {
            return Ok(conn);
        }
        let slot = Arc::clone(
            self.dialing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let waited_from = Instant::now();
        let mut last_failure = slot.lock().await;
        // Whoever dialed while we waited either connected or failed: share
        // the outcome.
        if let Some(conn) = self.pooled(&key) {
            return Ok(conn);
        }
        let err = |reason: String| TunnelError::Connect {
            node: node.to_string(),
            addr,
            reason,
        };
        if let Some((at, reason)) = &*last_failure {
            if *at >= waited_from {
                return Err(err(reason.clone()));
            }
        }
        match self.dial(node, addr).await {
            Ok(conn) => {
                *last_failure = None;
                metrics::counter!("weft_tunnel_connections_total").increment(1);
                self.lock().insert(key, conn.clone());
                Ok(conn)
            }
            Err(reason) => {
                *last_failure = Some((Instant::now(), reason.clone()));
                Err(err(reason))
            }
        }
    }

    /// One handshake with `node` at `addr`, bounded by the connect timeout.
    async fn dial(&self, node: &str, addr: SocketAddr) -> Result<Connection, String> {
        let connecting = self
            .endpoint
            .connect_with(
                (**self.client.load()).clone(),
                addr,
                &crate::tls::node_server_name(node),
            )
            .map_err(|e| e.to_string())?;
        tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| format!("no handshake within {:?}", self.connect_timeout))?
            .map_err(|e| e.to_string())
    }

    /// Opens one bidirectional stream of `kind` to `node`, reconnecting if
    /// the pooled connection was lost; refused at once when the tunnel
    /// version the two nodes agreed on has no such streams.
    pub async fn open(
        &self,
        node: &str,
        addr: SocketAddr,
        kind: StreamKind,
    ) -> Result<(SendStream, RecvStream), TunnelError> {
        for attempt in 0..2 {
            let conn = self.connection(node, addr).await?;
            let version = crate::tls::negotiated(&conn);
            if !version.carries(kind) {
                return Err(TunnelError::Stream(format!(
                    "{node} speaks tunnel {version}, which has no {kind:?} streams (an older weft)"
                )));
            }
            match conn.open_bi().await {
                Ok(pair) => {
                    metrics::counter!("weft_tunnel_streams_total").increment(1);
                    return Ok(pair);
                }
                Err(e) if attempt == 0 => {
                    tracing::debug!(node, error = %e, "pooled tunnel connection lost; reconnecting");
                    self.lock().remove(&(node.to_string(), addr));
                }
                Err(e) => return Err(TunnelError::Stream(e.to_string())),
            }
        }
        Err(TunnelError::Stream("unreachable".into()))
    }

    /// Closes and forgets the pooled connections to `node`: it died, left or
    /// restarted, and a connection to its old process would hang until idle
    /// timeout (a new process cannot reset a connection it never knew).
    pub fn evict(&self, node: &str) {
        self.dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(n, _), _| n != node);
        let mut pool = self.lock();
        pool.retain(|(n, _), conn| {
            let keep = n != node;
            if !keep {
                conn.close(quinn::VarInt::from_u32(0), b"peer restarted or gone");
            }
            keep
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PeerKey, Connection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes one wire frame.
pub async fn write_frame<T: serde::Serialize>(
    send: &mut SendStream,
    msg: &T,
) -> Result<(), TunnelError> {
    Batch::with_frame(msg)?.write(send).await
}

/// Reads one wire frame (bounded by the wire limit).
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut RecvStream,
) -> Result<T, TunnelError> {
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| TunnelError::Stream(format!("reading frame length: {e}")))?;
    let len = wire::frame_len(prefix)?;
    let mut buf = vec![0u8; 4 + len];
    buf[..4].copy_from_slice(&prefix);
    recv.read_exact(&mut buf[4..])
        .await
        .map_err(|e| TunnelError::Stream(format!("reading frame: {e}")))?;
    match wire::decode(&buf)? {
        wire::Decoded::Frame { msg, .. } => Ok(msg),
        wire::Decoded::Incomplete { .. } => Err(TunnelError::Stream("truncated frame".into())),
    }
}

/// Bytes for one stream write. quinn packs what one write hands it into as
/// few packets as fit, where each separate write may leave in a packet of
/// its own: a small response framed in one batch is one packet.
#[derive(Debug, Default)]
pub struct Batch {
    chunks: Vec<Bytes>,
    len: usize,
}

impl Batch {
    /// A batch that starts with `msg`'s wire frame (a stream's head).
    pub fn with_frame<T: serde::Serialize>(msg: &T) -> Result<Batch, TunnelError> {
        let mut batch = Batch::default();
        batch.push(Bytes::from(wire::encode(msg)?));
        Ok(batch)
    }

    /// Adds body data, as chunks of at most [`body::MAX_CHUNK`] bytes.
    pub fn data(&mut self, mut data: Bytes) -> Result<(), TunnelError> {
        while !data.is_empty() {
            let piece = data.split_to(data.len().min(body::MAX_CHUNK));
            self.push(Bytes::copy_from_slice(&body::data_prefix(piece.len())?));
            self.push(piece);
        }
        Ok(())
    }

    /// Adds the end of a body, with optional trailers.
    pub fn end(&mut self, trailers: Option<body::Headers>) -> Result<(), TunnelError> {
        let bytes = match trailers {
            Some(t) => body::encode_trailers(t)?,
            None => body::end_marker().to_vec(),
        };
        self.push(Bytes::from(bytes));
        Ok(())
    }

    /// Bytes in the batch.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes the whole batch to `send` and empties it.
    pub async fn write(&mut self, send: &mut SendStream) -> Result<(), TunnelError> {
        send.write_all_chunks(&mut self.chunks)
            .await
            .map_err(|e| TunnelError::Stream(e.to_string()))?;
        self.chunks.clear();
        self.len = 0;
        Ok(())
    }

    fn push(&mut self, bytes: Bytes) {
        self.len += bytes.len();
        self.chunks.push(bytes);
    }
}

/// Lets go of a stream whose data has all been read. The FIN usually comes
/// with the last data: taking it here spares the peer the STOP_SENDING (and
/// its acknowledgement) that quinn sends for a stream dropped unfinished.
pub fn close_read(mut recv: RecvStream) {
    use futures::FutureExt as _;
    // Anything but "finished, now" leaves the drop to stop the stream, which
    // is right: the peer is still sending, and nothing more is wanted.
    let _ = recv.read_chunk(1, true).now_or_never();
}

/// Reads the next body event, taking no byte that follows the body.
pub async fn read_body(
    recv: &mut RecvStream,
    decoder: &mut BodyDecoder,
) -> Result<BodyEvent, TunnelError> {
    loop {
        let wants = decoder.wants();
        if wants == 0 {
            return Ok(BodyEvent::End);
        }
        let chunk = recv
            .read_chunk(wants, true)
            .await
            .map_err(|e| TunnelError::Stream(format!("body ended early: {e}")))?
            .ok_or_else(|| TunnelError::Stream("body ended early: stream finished".into()))?;
        if let Some(event) = decoder.feed(chunk.bytes)? {
            return Ok(event);
        }
    }
}

/// quinn on tokio, with one change: a connection's driver, when woken,
/// lets the tasks already queued run before it does. Every stream write
/// wakes the driver; tokio would run it right after the writer (its LIFO
/// slot), so each request left in a datagram of its own. Behind the queue,
/// one driver poll sends what a whole round of requests wrote: fewer
/// packets, each carrying several streams' frames, and fewer `sendmsg`s.
#[derive(Debug)]
pub struct TunnelRuntime;

impl quinn::Runtime for TunnelRuntime {
    fn new_timer(&self, at: Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::TokioRuntime.new_timer(at)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        tokio::spawn(BehindTheQueue {
            inner: future,
            yielded: false,
        });
    }

    fn wrap_udp_socket(
        &self,
        socket: std::net::UdpSocket,
    ) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }

    fn now(&self) -> Instant {
        quinn::TokioRuntime.now()
    }
}

/// A future that answers each wake-up by first going to the back of the
/// run queue, then polling `inner`.
struct BehindTheQueue {
    inner: Pin<Box<dyn Future<Output = ()> + Send>>,
    yielded: bool,
}

impl Future for BehindTheQueue {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if !std::mem::replace(&mut self.yielded, true) {
            return step_back(cx);
        }
        self.yielded = false;
        self.inner.as_mut().poll(cx)
    }
}

/// Lets the tasks already queued on this worker run before the caller goes
/// on. A task that wakes itself is queued behind the others (not in tokio's
/// LIFO slot), and unlike `tokio::task::yield_now` it does not wait for a
/// turn of the IO driver, which costs an `epoll_wait` when nothing else is
/// due.
pub async fn let_queued_tasks_run() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if std::mem::replace(&mut yielded, true) {
            Poll::Ready(())
        } else {
            step_back(cx)
        }
    })
    .await
}

/// Pending, with this task woken again: it goes to the back of the queue.
fn step_back(cx: &mut Context<'_>) -> Poll<()> {
    cx.waker().wake_by_ref();
    Poll::Pending
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests written in one round of tasks leave together: the driver,
    /// woken by the first write, runs after the other writers, so their
    /// frames share packets instead of taking a datagram each. (Counted
    /// with the caller's ACKs of the peer's packets: 4-6 here, against 16-21
    /// with quinn's own tokio runtime.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn writes_of_one_round_share_datagrams() {
        const STREAMS: usize = 16;
        let (caller, served, _endpoints) = crate::tls::tests::connected_pair().await;
        let mut streams = Vec::new();
        for _ in 0..STREAMS {
            streams.push(caller.open_bi().await.unwrap().0);
        }
        // Each writer waits for one signal, as connection tasks wait for
        // their sockets; the signal, given on the worker as the IO driver's
        // wake-ups are, queues them all at once.
        let go = Arc::new(tokio::sync::Notify::new());
        let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let writers: Vec<_> = streams
            .into_iter()
            .map(|mut send| {
                let (go, waiting) = (go.clone(), waiting.clone());
                tokio::spawn(async move {
                    let signal = go.notified();
                    waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    signal.await;
                    send.write_all(&[7u8; 100]).await.unwrap();
                    send.finish().unwrap();
                    send
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        while waiting.load(std::sync::atomic::Ordering::SeqCst) < STREAMS {
            assert!(Instant::now() < deadline, "the writers never started");
            tokio::task::yield_now().await;
        }
        let before = caller.stats().udp_tx.datagrams;
        tokio::spawn(async move { go.notify_waiters() });
        for writer in writers {
            let _kept_open = writer.await.unwrap();
        }
        let mut received = 0;
        while received < STREAMS {
            let (_send, mut recv) = served.accept_bi().await.unwrap();
            assert_eq!(recv.read_to_end(1024).await.unwrap().len(), 100);
            received += 1;
        }
        let sent = caller.stats().udp_tx.datagrams - before;
        assert!(
            sent as usize <= STREAMS / 2,
            "{STREAMS} streams written in one round left in {sent} datagrams"
        );
    }
}
