//! The inbound side of the tunnel: streams from peer nodes, handed to this
//! node's own instances.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::{Endpoint, RecvStream, SendStream};
use tokio::net::TcpStream;

use super::error::MeshError;
use super::local::LocalFailure;
use super::request::{header_map, is_upgrade, wire_pairs, Forward};
use super::splice::{reset_tcp, splice, SpliceEnd};
use super::{body, ConnectionLimit, DataPlane, ProxyBody};
use crate::outcome::{Direction, Outcome, OutcomeClass};
use crate::tunnel::{self, TunnelError};
use crate::wire::body::{BodyDecoder, BodyEvent};
use crate::wire::{RequestHead, ResponseHead, StreamKind};

/// How long a peer may take to send a stream's header frame.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts tunnel connections until the endpoint closes.
pub async fn serve(endpoint: Endpoint, dp: Arc<DataPlane>) {
    let limit = ConnectionLimit::new("tunnel_connections", dp.limits.max_connections);
    while let Some(incoming) = endpoint.accept().await {
        let Some(permit) = limit.admit() else {
            incoming.refuse();
            continue;
        };
        let dp = dp.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    metrics::counter!("weft_tunnel_refused_total").increment(1);
                    tracing::warn!(error = %e, "refused a tunnel connection");
                    return;
                }
            };
            loop {
                match conn.accept_bi().await {
                    Ok((send, recv)) => {
                        let dp = dp.clone();
                        tokio::spawn(async move {
                            if let Err(e) = handle_stream(&dp, send, recv).await {
                                tracing::debug!(error = %e, "inbound stream failed");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "tunnel connection closed");
                        break;
                    }
                }
            }
            drop(permit);
        });
    }
}

/// Answers a stream with a mesh error instead of an instance's response.
async fn refuse(send: &mut SendStream, error: MeshError) -> Result<(), TunnelError> {
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

async fn handle_stream(
    dp: &DataPlane,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), TunnelError> {
    let _busy = dp.in_flight.track();
    let head: RequestHead = tokio::time::timeout(HEAD_TIMEOUT, tunnel::read_frame(&mut recv))
        .await
        .map_err(|_| TunnelError::Stream("no header frame in time".into()))??;
    if let Err(e) = head.validate() {
        refuse(&mut send, MeshError::BadRequest).await?;
        return Err(e.into());
    }
    // Only instances this node hosts, as the catalog says, are reachable.
    let port = {
        let snap = dp.router.load();
        snap.catalog
            .instances(&head.service)
            .iter()
            .find(|i| i.node == dp.node && i.id == head.instance)
            .map(|i| i.port)
    };
    let Some(port) = port else {
        return refuse(&mut send, MeshError::NoHealthyInstance).await;
    };
    match head.kind {
        StreamKind::Http => Inbound { dp, head, port }.http(send, recv).await,
        StreamKind::Tcp => tcp(dp, port, send, recv).await,
    }
}

/// A peer's HTTP request for one of this node's instances.
struct Inbound<'a> {
    dp: &'a DataPlane,
    head: RequestHead,
    port: u16,
}

impl Inbound<'_> {
    async fn http(self, mut send: SendStream, mut recv: RecvStream) -> Result<(), TunnelError> {
        let upgrade = is_upgrade(&header_map(&self.head.headers));
        // An upgrade's body is read here, so the stream is left at the raw
        // bytes that follow a 101.
        let (body, recv) = match (upgrade, self.head.end_stream) {
            (true, true) => (body::empty(), Some(recv)),
            (true, false) => (read_whole_body(&mut recv).await?, Some(recv)),
            (false, true) => (body::empty(), None),
            (false, false) => (body::from_tunnel(recv), None),
        };
        let req = match Forward::from_wire(&self.head, body) {
            Ok(req) => req,
            Err(detail) => {
                refuse(&mut send, MeshError::BadRequest).await?;
                return Err(TunnelError::Stream(detail));
            }
        };
        let start = Instant::now();
        let deadline = Duration::from_millis(u64::from(self.head.deadline_ms.max(1)));
        let result = tokio::time::timeout(deadline, self.dp.local.call(self.port, req)).await;
        let mut resp = match result {
            Ok(Ok(resp)) => resp,
            Ok(Err(LocalFailure::Unreachable(detail))) => {
                tracing::debug!(detail, "local instance unreachable");
                self.record(OutcomeClass::Unreachable, None, start);
                return refuse(&mut send, MeshError::UpstreamUnreachable).await;
            }
            Ok(Err(LocalFailure::Mesh(error, detail))) => {
                tracing::debug!(detail, %error, "refused by the mesh's limits");
                return refuse(&mut send, error).await;
            }
            Err(_) => {
                self.record(OutcomeClass::Timeout, None, start);
                return refuse(&mut send, MeshError::UpstreamTimeout).await;
            }
        };
        let status = resp.status();
        self.record(
            OutcomeClass::from_status(status.as_u16()),
            Some(status.as_u16()),
            start,
        );
        let end_stream = hyper::body::Body::is_end_stream(resp.body());
        let head = ResponseHead {
            status: status.as_u16(),
            headers: wire_pairs(resp.headers()),
            error: None,
            end_stream,
        };
        if let (Some(recv), hyper::StatusCode::SWITCHING_PROTOCOLS) = (recv, status) {
            let upgraded = hyper::upgrade::on(&mut resp);
            tunnel::write_frame(&mut send, &head).await?;
            let io = upgraded
                .await
                .map_err(|e| TunnelError::Stream(format!("upgrade: {e}")))?;
            splice(hyper_util::rt::TokioIo::new(io), send, recv).await;
            return Ok(());
        }
        tunnel::write_frame(&mut send, &head).await?;
        if !end_stream {
            body::to_tunnel(resp.into_body(), &mut send).await?;
        }
        let _ = send.finish();
        Ok(())
    }

    fn record(&self, class: OutcomeClass, status: Option<u16>, start: Instant) {
        self.dp.outcomes.record(Outcome {
            service: self.head.service.clone(),
            node: self.dp.node.clone(),
            instance: self.head.instance.clone(),
            class,
            status,
            latency: start.elapsed(),
            attempt: self.head.attempt,
            last: true,
            direction: Direction::Inbound,
        });
    }
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
    if end == SpliceEnd::PeerReset {
        reset_tcp(stream);
    }
    Ok(())
}
