//! The outbound proxy: apps send HTTP/1.1 or h2c here; the service is the
//! request's authority (absolute-form URI or Host header).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use weft_gossip::Instance;

use super::{
    body, codes, end_to_end_headers, header_map, mesh_error, status_for, DataPlane, ProxyBody,
};
use crate::outcome::{Outcome, OutcomeClass};
use crate::tunnel::{self, TunnelError};
use crate::wire::{RequestHead, ResponseHead, StreamKind, WIRE_VERSION};

/// Accepts app connections until the task is aborted.
pub async fn serve(listener: TcpListener, dp: Arc<DataPlane>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let dp = dp.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let dp = dp.clone();
                async move { Ok::<_, Infallible>(handle(dp, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "proxy connection ended with an error");
            }
        });
    }
}

/// The service a request is for: the authority's host, without port.
pub fn service_of<B>(req: &Request<B>) -> Option<String> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.host().to_string())
        .or_else(|| {
            let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
            let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
            Some(host.to_string())
        })?;
    let name = authority.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

async fn handle(dp: Arc<DataPlane>, req: Request<Incoming>) -> Response<ProxyBody> {
    let Some(service) = service_of(&req) else {
        return mesh_error(
            StatusCode::BAD_REQUEST,
            "bad-request",
            "no service: send an absolute URI or a Host header naming the service",
        );
    };
    let snap = dp.router.load();
    let instance = match dp.pick(&snap, &service, "http", &[]) {
        Ok(i) => i,
        Err(code) => return mesh_error(status_for(code), code, &format!("service {service:?}")),
    };
    drop(snap);
    let key = (instance.node.clone(), instance.id.clone());
    dp.started(&key);
    let start = Instant::now();
    let result =
        tokio::time::timeout(dp.timeouts.request, forward(&dp, &service, &instance, req)).await;
    let latency = start.elapsed();
    dp.finished(&key, latency);
    let (class, status, resp) = match result {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            (OutcomeClass::from_status(status), Some(status), resp)
        }
        Ok(Err(Failure::Remote(code, detail))) => {
            let class = if code == codes::UPSTREAM_TIMEOUT {
                OutcomeClass::Timeout
            } else {
                OutcomeClass::Unreachable
            };
            (class, None, mesh_error(status_for(&code), &code, &detail))
        }
        Ok(Err(Failure::Unreachable(detail))) => (
            OutcomeClass::Unreachable,
            None,
            mesh_error(
                StatusCode::BAD_GATEWAY,
                codes::UPSTREAM_UNREACHABLE,
                &detail,
            ),
        ),
        Err(_) => (
            OutcomeClass::Timeout,
            None,
            mesh_error(
                StatusCode::GATEWAY_TIMEOUT,
                codes::UPSTREAM_TIMEOUT,
                &format!("no response within {:?}", dp.timeouts.request),
            ),
        ),
    };
    let failed = match class {
        OutcomeClass::Unreachable => true,
        OutcomeClass::ServerError => matches!(status, Some(502..=504)),
        _ => false,
    };
    dp.observe_outcome(&service, &key, failed);
    dp.outcomes.record(Outcome {
        service,
        node: instance.node,
        instance: instance.id,
        class,
        status,
        latency,
        attempt: 0,
    });
    resp
}

/// Why an attempt produced no response from the instance.
#[derive(Debug)]
pub enum Failure {
    /// The instance or its node could not be reached.
    Unreachable(String),
    /// The remote node answered with a mesh error code.
    Remote(String, String),
}

impl From<TunnelError> for Failure {
    fn from(e: TunnelError) -> Self {
        Failure::Unreachable(e.to_string())
    }
}

async fn forward(
    dp: &DataPlane,
    service: &str,
    instance: &Instance,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Failure> {
    if instance.node == dp.node {
        return forward_local(
            dp,
            service,
            instance.port,
            req.map(|b| b.map_err(Into::into).boxed()),
        )
        .await;
    }
    let addr: SocketAddr = instance
        .tunnel_addr
        .as_deref()
        .and_then(|a| a.parse().ok())
        .ok_or_else(|| {
            Failure::Unreachable(format!(
                "node {} announced no tunnel address",
                instance.node
            ))
        })?;
    let (mut send, mut recv) = dp.tunnels.open(&instance.node, addr).await?;
    let (parts, body) = req.into_parts();
    let head = RequestHead {
        version: WIRE_VERSION,
        kind: StreamKind::Http,
        service: service.to_string(),
        instance: instance.id.clone(),
        method: parts.method.as_str().to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".to_string()),
        headers: with_host(end_to_end_headers(&parts.headers), service, &parts),
        deadline_ms: u32::try_from(dp.timeouts.request.as_millis()).unwrap_or(u32::MAX),
        attempt: 0,
        http2: parts.version == http::Version::HTTP_2,
    };
    tunnel::write_frame(&mut send, &head).await?;
    // The request body streams while we wait for the response head.
    tokio::spawn(async move {
        if let Err(e) = body::to_tunnel(body, &mut send).await {
            tracing::debug!(error = %e, "request body to tunnel failed");
            let _ = send.reset(quinn::VarInt::from_u32(1));
            return;
        }
        let _ = send.finish();
    });
    let head: ResponseHead = tunnel::read_frame(&mut recv).await?;
    if let Some(code) = head.error {
        return Err(Failure::Remote(
            code,
            format!("reported by node {}", instance.node),
        ));
    }
    let mut resp = Response::new(body::from_tunnel(recv));
    *resp.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = header_map(&head.headers);
    Ok(resp)
}

/// HTTP/1.1 needs a Host; keep the app's (the service name) when the request had none.
fn with_host(
    mut headers: Vec<(String, Vec<u8>)>,
    service: &str,
    parts: &http::request::Parts,
) -> Vec<(String, Vec<u8>)> {
    if parts.version != http::Version::HTTP_2 && !headers.iter().any(|(n, _)| n == "host") {
        headers.push(("host".to_string(), service.as_bytes().to_vec()));
    }
    headers
}

/// Sends a request to an instance on this host.
pub async fn forward_local(
    dp: &DataPlane,
    service: &str,
    port: u16,
    req: Request<ProxyBody>,
) -> Result<Response<ProxyBody>, Failure> {
    let (parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let uri: http::Uri = format!("http://127.0.0.1:{port}{path}")
        .parse()
        .map_err(|e| Failure::Unreachable(format!("bad path: {e}")))?;
    let headers = header_map(&with_host(
        end_to_end_headers(&parts.headers),
        service,
        &parts,
    ));
    let mut out = Request::new(body);
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.version_mut() = if parts.version == http::Version::HTTP_2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    *out.headers_mut() = headers;
    if out.version() == http::Version::HTTP_2 {
        out.headers_mut().remove(http::header::HOST);
    }
    let client = dp.local.for_version(out.version());
    match client.request(out).await {
        Ok(resp) => Ok(resp.map(|b| b.map_err(Into::into).boxed())),
        Err(e) => Err(Failure::Unreachable(format!("127.0.0.1:{port}: {e}"))),
    }
}
