//! The inbound side of the tunnel: streams from peer nodes, handed to this
//! node's own instances.

use std::sync::Arc;
use std::time::Duration;

use hyper::Request;
use quinn::{Endpoint, RecvStream, SendStream};
use tokio::net::TcpStream;

use super::outbound::{forward_local, Failure};
use super::{body, codes, DataPlane};
use crate::tunnel::{self, TunnelError};
use crate::wire::{RequestHead, ResponseHead, StreamKind};

/// How long a peer may take to send a stream's header frame.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts tunnel connections until the endpoint closes.
pub async fn serve(endpoint: Endpoint, dp: Arc<DataPlane>) {
    while let Some(incoming) = endpoint.accept().await {
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
                        return;
                    }
                }
            }
        });
    }
}

fn refusal(code: &str, status: u16) -> ResponseHead {
    ResponseHead {
        status,
        headers: Vec::new(),
        error: Some(code.to_string()),
    }
}

async fn handle_stream(
    dp: &DataPlane,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), TunnelError> {
    let head: RequestHead = tokio::time::timeout(HEAD_TIMEOUT, tunnel::read_frame(&mut recv))
        .await
        .map_err(|_| TunnelError::Stream("no header frame in time".into()))??;
    if let Err(e) = head.validate() {
        let _ = tunnel::write_frame(&mut send, &refusal("bad-request", 400)).await;
        let _ = send.finish();
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
        tunnel::write_frame(&mut send, &refusal(codes::NO_HEALTHY_INSTANCE, 503)).await?;
        let _ = send.finish();
        return Ok(());
    };
    match head.kind {
        StreamKind::Http => http(dp, head, port, send, recv).await,
        StreamKind::Tcp => tcp(dp, port, send, recv).await,
    }
}

async fn http(
    dp: &DataPlane,
    head: RequestHead,
    port: u16,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<(), TunnelError> {
    let mut req = Request::new(body::from_tunnel(recv));
    *req.method_mut() = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|e| TunnelError::Stream(format!("bad method: {e}")))?;
    *req.uri_mut() = head
        .uri
        .parse()
        .map_err(|e| TunnelError::Stream(format!("bad uri: {e}")))?;
    if head.http2 {
        *req.version_mut() = http::Version::HTTP_2;
    }
    *req.headers_mut() = super::header_map(&head.headers);
    let deadline = Duration::from_millis(u64::from(head.deadline_ms.max(1)));
    let result = tokio::time::timeout(deadline, forward_local(dp, &head.service, port, req)).await;
    let resp = match result {
        Ok(Ok(resp)) => resp,
        Ok(Err(Failure::Unreachable(detail) | Failure::Remote(_, detail))) => {
            tracing::debug!(detail, "local instance unreachable");
            tunnel::write_frame(&mut send, &refusal(codes::UPSTREAM_UNREACHABLE, 502)).await?;
            let _ = send.finish();
            return Ok(());
        }
        Err(_) => {
            tunnel::write_frame(&mut send, &refusal(codes::UPSTREAM_TIMEOUT, 504)).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let (parts, body) = resp.into_parts();
    let head = ResponseHead {
        status: parts.status.as_u16(),
        headers: super::end_to_end_headers(&parts.headers),
        error: None,
    };
    tunnel::write_frame(&mut send, &head).await?;
    body::to_tunnel(body, &mut send).await?;
    let _ = send.finish();
    Ok(())
}

async fn tcp(
    dp: &DataPlane,
    port: u16,
    mut send: SendStream,
    mut recv: RecvStream,
) -> Result<(), TunnelError> {
    let conn =
        tokio::time::timeout(dp.timeouts.connect, TcpStream::connect(("127.0.0.1", port))).await;
    let stream = match conn {
        Ok(Ok(s)) => s,
        _ => {
            tunnel::write_frame(&mut send, &refusal(codes::UPSTREAM_UNREACHABLE, 502)).await?;
            let _ = send.finish();
            return Ok(());
        }
    };
    let _ = stream.set_nodelay(true);
    tunnel::write_frame(
        &mut send,
        &ResponseHead {
            status: 200,
            headers: Vec::new(),
            error: None,
        },
    )
    .await?;
    super::tcp::splice(stream, send, &mut recv).await;
    Ok(())
}
