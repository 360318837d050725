//! The Listener actor: owns the accept loops and hands each connection to a task.
//!
//! The actor decides what is listened on and stops it; the per-connection work
//! (HTTP/1.1 parsing, the handler) runs in plain tokio tasks, bounded by a
//! semaphore so a flood of connections cannot exhaust the node.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Where a request came from: the local socket may change state, the admin
/// address only reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The node's Unix socket (mode 0660).
    Socket,
    /// The admin TCP address.
    Admin,
}

/// The boxed future an [`HttpHandler`] returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

/// The application that answers requests on the local endpoints.
pub type HttpHandler = Arc<dyn Fn(Request<Incoming>, Origin) -> ResponseFuture + Send + Sync>;

/// Most concurrent connections per listener.
const MAX_CONNECTIONS: usize = 1024;

/// Owns the accept loops of the local socket and the admin address.
pub struct Listener {
    socket: Option<UnixListener>,
    admin: Option<TcpListener>,
    handler: HttpHandler,
    loops: Vec<JoinHandle<()>>,
}

impl Listener {
    /// A listener for already-bound endpoints (binding happens before start so
    /// that a busy address is a clear start-up error).
    pub fn new(socket: UnixListener, admin: TcpListener, handler: HttpHandler) -> Self {
        Listener {
            socket: Some(socket),
            admin: Some(admin),
            handler,
            loops: Vec::new(),
        }
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        if let Some(socket) = self.socket.take() {
            let handler = self.handler.clone();
            self.loops.push(tokio::spawn(accept_unix(socket, handler)));
        }
        if let Some(admin) = self.admin.take() {
            let handler = self.handler.clone();
            self.loops.push(tokio::spawn(accept_tcp(admin, handler)));
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        for task in self.loops.drain(..) {
            task.abort();
        }
    }
}

/// Stop accepting new connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopListening;

impl Handler<StopListening> for Listener {
    type Result = ();

    fn handle(&mut self, _msg: StopListening, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

async fn accept_unix(listener: UnixListener, handler: HttpHandler) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve(TokioIo::new(stream), handler, Origin::Socket).await;
                    drop(permit);
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "local socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn accept_tcp(listener: TcpListener, handler: HttpHandler) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve(TokioIo::new(stream), handler, Origin::Admin).await;
                    drop(permit);
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve<I>(io: I, handler: HttpHandler, origin: Origin)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |req| {
        let fut = handler(req, origin);
        async move { Ok::<_, Infallible>(fut.await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(64 * 1024 + 8 * 1024)
        .header_read_timeout(std::time::Duration::from_secs(10))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(io, service);
    if let Err(err) = conn.await {
        tracing::debug!(error = %err, "local API connection ended with an error");
    }
}
