//! The Listener actor: owns the accept loops and hands each connection to a task.
//!
//! It listens on the local socket and admin address (the local API), the
//! outbound proxy, the QUIC tunnel endpoint, and every TCP upstream.
//!
//! The actor decides what is listened on and stops it; the per-connection work
//! (HTTP/1.1 parsing, the handler) runs in plain tokio tasks, bounded by a
//! semaphore so a flood of connections cannot exhaust the node.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use actix::prelude::*;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::caller::Caller;
use crate::dataplane::request::Entrance;
use crate::dataplane::{inbound, named, outbound, tcp, DataPlane};
use crate::supervision::{guard, Named};

/// Where a request came from: the local socket may change state, the admin
/// address only reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The node's Unix socket (mode 0660).
    Socket,
    /// The admin TCP address.
    Admin,
}

/// The body of a local API response: most are one JSON document, a tap
/// streams lines until the client goes.
pub type ApiBody = UnsyncBoxBody<Bytes, std::convert::Infallible>;

/// The boxed future an [`HttpHandler`] returns.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<ApiBody>> + Send>>;

/// The application that answers requests on the local endpoints.
pub type HttpHandler = Arc<dyn Fn(Request<Incoming>, Origin) -> ResponseFuture + Send + Sync>;

/// Most concurrent connections per listener.
const MAX_CONNECTIONS: usize = 1024;

/// Owns the accept loops: local socket, admin address, outbound proxy, QUIC
/// endpoint and TCP upstreams.
pub struct Listener {
    socket: Option<UnixListener>,
    admin: Option<TcpListener>,
    proxy: Option<TcpListener>,
    tunnel: Option<quinn::Endpoint>,
    dataplane: Arc<DataPlane>,
    handler: HttpHandler,
    loops: Vec<JoinHandle<()>>,
    proxy_loop: Option<JoinHandle<()>>,
    /// App ports besides the shared proxy, by address: TCP upstreams (the
    /// service they reach) and services' own outbound proxies (the caller).
    upstreams: HashMap<SocketAddr, (String, JoinHandle<()>)>,
}

impl Listener {
    /// A listener for already-bound endpoints (binding happens before start so
    /// that a busy address is a clear start-up error).
    pub fn new(
        socket: UnixListener,
        admin: TcpListener,
        proxy: TcpListener,
        tunnel: quinn::Endpoint,
        dataplane: Arc<DataPlane>,
        handler: HttpHandler,
    ) -> Self {
        Listener {
            socket: Some(socket),
            admin: Some(admin),
            proxy: Some(proxy),
            tunnel: Some(tunnel),
            dataplane,
            handler,
            loops: Vec::new(),
            proxy_loop: None,
            upstreams: HashMap::new(),
        }
    }
}

impl Actor for Listener {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        if let Some(socket) = self.socket.take() {
            let handler = self.handler.clone();
            self.loops
                .push(tokio::spawn(accept_api(socket, handler, Origin::Socket)));
        }
        if let Some(admin) = self.admin.take() {
            let handler = self.handler.clone();
            self.loops
                .push(tokio::spawn(accept_api(admin, handler, Origin::Admin)));
        }
        if let Some(proxy) = self.proxy.take() {
            let dp = self.dataplane.clone();
            self.proxy_loop = Some(tokio::spawn(outbound::serve(proxy, dp, Entrance::shared())));
        }
        if let Some(endpoint) = self.tunnel.take() {
            let dp = self.dataplane.clone();
            self.loops.push(tokio::spawn(inbound::serve(endpoint, dp)));
        }
    }
}

impl Named for Listener {
    const NAME: &'static str = "listener";
}

crate::supervision::handle_crash!(Listener);

/// The accept loops are tasks of their own: a restarted Listener finds
/// them still serving and keeps its table of upstreams.
impl Supervised for Listener {}

impl Listener {
    fn add_upstream(&mut self, msg: AddUpstream) {
        let Ok(addr) = msg.listener.local_addr() else {
            return;
        };
        let task = tokio::spawn(tcp::serve(
            msg.listener,
            msg.service.clone(),
            self.dataplane.clone(),
            Caller::Anonymous,
        ));
        self.serve_port(addr, msg.service, task);
    }

    fn add_caller_proxy(&mut self, msg: AddCallerProxy) {
        let Ok(addr) = msg.listener.local_addr() else {
            return;
        };
        let caller = Caller::service(&msg.caller);
        let dp = self.dataplane.clone();
        let task = match msg.reaches {
            Some(service) => tokio::spawn(named::serve(msg.listener, dp, caller, service)),
            None => {
                let entrance = Entrance {
                    caller,
                    service: None,
                };
                tokio::spawn(outbound::serve(msg.listener, dp, entrance))
            }
        };
        self.serve_port(addr, msg.caller, task);
    }

    /// Keeps `task` as what serves `addr`, ending whatever served it before.
    fn serve_port(&mut self, addr: SocketAddr, service: String, task: JoinHandle<()>) {
        if let Some((_, old)) = self.upstreams.insert(addr, (service, task)) {
            old.abort();
        }
    }

    /// Closes the proxy and the TCP upstream ports; connections already
    /// accepted go on in their own tasks.
    fn stop_accepting(&mut self) {
        if let Some(task) = self.proxy_loop.take() {
            task.abort();
        }
        for (_, (_, task)) in self.upstreams.drain() {
            task.abort();
        }
    }
}

/// Stop accepting app connections (a draining node): the proxy and TCP
/// upstream ports close, the local API and the tunnel keep serving.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopAccepting;

impl Handler<StopAccepting> for Listener {
    type Result = ();

    fn handle(&mut self, _msg: StopAccepting, ctx: &mut Self::Context) {
        guard(self, ctx, |this, _| this.stop_accepting());
    }
}

/// Serve a TCP upstream: connections to `listener` reach `service`.
/// Replaces an upstream already on the same address.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddUpstream {
    /// Service the port reaches.
    pub service: String,
    /// The bound local port.
    pub listener: TcpListener,
}

impl Handler<AddUpstream> for Listener {
    type Result = ();

    fn handle(&mut self, msg: AddUpstream, ctx: &mut Self::Context) {
        guard(self, ctx, |this, _| this.add_upstream(msg));
    }
}

/// Serve a service's own outbound proxy (any service, named by each
/// request) or one of its named upstreams (one service): what goes through
/// `listener` is `caller`'s. Replaces whatever served the same address.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AddCallerProxy {
    /// The registered service whose calls these are.
    pub caller: String,
    /// The one service a named upstream reaches; `None`: the outbound proxy.
    pub reaches: Option<String>,
    /// The bound local port.
    pub listener: TcpListener,
}

impl Handler<AddCallerProxy> for Listener {
    type Result = ();

    fn handle(&mut self, msg: AddCallerProxy, ctx: &mut Self::Context) {
        guard(self, ctx, |this, _| this.add_caller_proxy(msg));
    }
}

/// Stop serving the TCP upstream or caller proxy on an address.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RemoveUpstream(pub SocketAddr);

impl Handler<RemoveUpstream> for Listener {
    type Result = bool;

    fn handle(&mut self, msg: RemoveUpstream, ctx: &mut Self::Context) -> bool {
        guard(self, ctx, |this, _| match this.upstreams.remove(&msg.0) {
            Some((_, task)) => {
                task.abort();
                true
            }
            None => false,
        })
        .unwrap_or(false)
    }
}

/// Stop accepting new connections.
#[derive(Message)]
#[rtype(result = "()")]
pub struct StopListening;

impl Handler<StopListening> for Listener {
    type Result = ();

    fn handle(&mut self, _msg: StopListening, _ctx: &mut Self::Context) {
        for task in self.loops.drain(..) {
            task.abort();
        }
        self.stop_accepting();
    }
}

/// A listening socket the local API is served on.
trait Accept: Send + 'static {
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Io> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Accept for TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_one(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = self.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Accepts API connections, at most [`MAX_CONNECTIONS`] at once.
async fn accept_api<L: Accept>(listener: L, handler: HttpHandler, origin: Origin) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        match listener.accept_one().await {
            Ok(stream) => {
                let handler = handler.clone();
                tokio::spawn(async move {
                    serve(TokioIo::new(stream), handler, origin).await;
                    drop(permit);
                });
            }
            Err(err) => {
                tracing::warn!(error = %err, ?origin, "API accept failed");
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
