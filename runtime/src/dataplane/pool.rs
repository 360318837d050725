//! Keep-alive HTTP/1.1 connections to this node's own instances.
//!
//! One idle list per port. A request takes the newest idle connection that
//! is ready (or dials one); its connection comes back to the list when the
//! response body has been read to its end, inside the body's own poll: no
//! task and no channel per request. A body dropped before its end takes its
//! connection with it (hyper closes a connection whose response was not
//! read), and a 101 hands its connection to the upgrade.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::ProxyBody;

/// Idle connections kept per instance port.
const MAX_IDLE_PER_PORT: usize = 256;

/// How long a connection may sit idle before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request to a local instance got no response.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No connection within the connect timeout, or the connect failed.
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed before the response head was read.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// Idle HTTP/1.1 connections by instance port.
#[derive(Debug)]
pub struct Http1Pool {
    idle: Mutex<HashMap<u16, Vec<Idle>>>,
    connect_timeout: Duration,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<ProxyBody>,
    since: Instant,
}

impl Idle {
    fn usable(&self, now: Instant) -> bool {
        !self.sender.is_closed() && now.duration_since(self.since) < IDLE_TIMEOUT
    }
}

impl Http1Pool {
    /// An empty pool whose dials give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Arc<Self> {
        Arc::new(Http1Pool {
            idle: Mutex::new(HashMap::new()),
            connect_timeout,
        })
    }

    /// Sends `req` (origin-form target, `Host` set) to 127.0.0.1:`port` on
    /// an idle connection, or a new one. A request that a pooled connection
    /// closed under did not go out, and goes again on a new connection.
    pub async fn send(
        self: &Arc<Self>,
        port: u16,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<PooledBody>, PoolError> {
        loop {
            let (mut sender, reused) = match self.checkout(port) {
                Some(sender) => (sender, true),
                None => (self.connect(port).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => return Ok(self.give_back_after(port, sender, resp)),
                Err(mut failed) => match failed.take_message() {
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(failed.into_error().into()),
                },
            }
        }
    }

    /// The newest idle connection to `port` that can take a request now.
    /// Closed and expired ones are dropped; one still finishing its last
    /// response (rare: its body ended a moment ago) is left for later.
    fn checkout(&self, port: u16) -> Option<SendRequest<ProxyBody>> {
        let now = Instant::now();
        let mut idle = self.lock();
        let list = idle.get_mut(&port)?;
        list.retain(|conn| conn.usable(now));
        let ready = list.iter().rposition(|conn| conn.sender.is_ready())?;
        Some(list.remove(ready).sender)
    }

    async fn connect(&self, port: u16) -> Result<SendRequest<ProxyBody>, PoolError> {
        let connecting = TcpStream::connect(("127.0.0.1", port));
        let stream = tokio::time::timeout(self.connect_timeout, connecting)
            .await
            .map_err(|_| {
                PoolError::Connect(format!("no connection within {:?}", self.connect_timeout))
            })?
            .map_err(|e| PoolError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, port, "local instance connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// `resp`, whose body hands `sender` back when it ends. A response with
    /// no body hands it back now; after a 101 the connection belongs to the
    /// upgrade, and the sender goes.
    fn give_back_after(
        self: &Arc<Self>,
        port: u16,
        sender: SendRequest<ProxyBody>,
        resp: Response<Incoming>,
    ) -> Response<PooledBody> {
        let (parts, body) = resp.into_parts();
        let lease = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            None
        } else if body.is_end_stream() {
            self.give_back(port, sender);
            None
        } else {
            Some(Lease {
                pool: Arc::clone(self),
                port,
                sender,
            })
        };
        Response::from_parts(parts, PooledBody { body, lease })
    }

    fn give_back(&self, port: u16, sender: SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lock();
        let list = idle.entry(port).or_default();
        // Checkouts drop the dead; a full list is swept before it refuses.
        if list.len() >= MAX_IDLE_PER_PORT {
            list.retain(|conn| conn.usable(now));
        }
        if list.len() < MAX_IDLE_PER_PORT {
            list.push(Idle { sender, since: now });
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u16, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A connection lent to one response, until its body ends.
#[derive(Debug)]
struct Lease {
    pool: Arc<Http1Pool>,
    port: u16,
    sender: SendRequest<ProxyBody>,
}

/// A local instance's response body; at its end the connection goes back
/// to the pool.
#[derive(Debug)]
pub struct PooledBody {
    body: Incoming,
    lease: Option<Lease>,
}

impl PooledBody {
    fn end(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.pool.give_back(lease.port, lease.sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.end(),
            Some(Ok(_)) if self.body.is_end_stream() => self.end(),
            // A failed body leaves its connection unusable: it is dropped.
            Some(Err(_)) => self.lease = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Full};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;

    use super::*;
    use crate::dataplane::body;

    /// A hyper HTTP/1.1 server on a free port that answers `/` with 1 kB and
    /// `/close` with `Connection: close`; it counts the connections it took.
    async fn server() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = service_fn(|req: Request<Incoming>| async move {
                        let mut resp = Response::new(Full::new(Bytes::from(vec![b'x'; 1024])));
                        if req.uri().path() == "/close" {
                            resp.headers_mut()
                                .insert(http::header::CONNECTION, "close".parse().unwrap());
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (port, accepted)
    }

    fn get(path: &str) -> Request<ProxyBody> {
        Request::get(path)
            .header(http::header::HOST, "up")
            .body(body::empty())
            .unwrap()
    }

    async fn read(resp: Response<PooledBody>) -> usize {
        resp.into_body().collect().await.unwrap().to_bytes().len()
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_gives_its_connection_back() {
        let (port, accepted) = server().await;
        let pool = Http1Pool::new(Duration::from_secs(1));
        for _ in 0..20 {
            let resp = pool.send(port, get("/")).await.unwrap();
            assert_eq!(read(resp).await, 1024);
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "20 requests, one after another"
        );
    }

    #[tokio::test]
    async fn a_body_dropped_early_takes_its_connection_along() {
        let (port, accepted) = server().await;
        let pool = Http1Pool::new(Duration::from_secs(1));
        drop(pool.send(port, get("/")).await.unwrap());
        let resp = pool.send(port, get("/")).await.unwrap();
        assert_eq!(read(resp).await, 1024);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_instance_closed_is_not_used_again() {
        let (port, accepted) = server().await;
        let pool = Http1Pool::new(Duration::from_secs(1));
        for _ in 0..5 {
            let resp = pool.send(port, get("/close")).await.unwrap();
            assert_eq!(read(resp).await, 1024);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn no_instance_is_a_connect_error() {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap().port()
        };
        let pool = Http1Pool::new(Duration::from_secs(1));
        let err = pool.send(port, get("/")).await.unwrap_err();
        assert!(matches!(err, PoolError::Connect(_)), "{err}");
    }
}
