//! Calling an instance on this host: pooled keep-alive clients, the URI
//! built from parts, the response head checked against the mesh's limit.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::MeshError;
use super::pool::Http1Pool;
use super::request::{header_bytes, strip_hop_by_hop};
use super::{BoxError, ProxyBody};
use crate::wire::{MAX_HEADERS, MAX_HEAD_BYTES};

/// The h2 header list limit that admits a head of [`MAX_HEAD_BYTES`] (HPACK
/// counts 32 bytes a header on top of name and value).
pub const H2_MAX_HEADER_LIST: u32 = (MAX_HEAD_BYTES + 32 * MAX_HEADERS + 4096) as u32;

/// Why a call to a local instance produced no response.
#[derive(Debug)]
pub enum LocalFailure {
    /// The instance could not be reached, or failed mid-response.
    Unreachable(String),
    /// A limit or protocol error of the mesh (not the instance's fault).
    Mesh(MeshError, String),
}

/// Keep-alive clients to this node's own instances.
#[derive(Debug, Clone)]
pub struct LocalClients {
    http1: Arc<Http1Pool>,
    h2: Client<HttpConnector, ProxyBody>,
}

impl LocalClients {
    /// Clients that connect within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_max_header_list_size(H2_MAX_HEADER_LIST)
            .build(connector);
        LocalClients {
            http1: Http1Pool::new(connect_timeout),
            h2,
        }
    }

    /// Sends `req` (origin-form target, forwarded headers) to the instance on
    /// 127.0.0.1:`port`. The response's hop-by-hop headers are removed, except
    /// the upgrade headers of a 101.
    pub async fn call(
        &self,
        port: u16,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, LocalFailure> {
        let resp = if req.version() == http::Version::HTTP_2 {
            self.call_h2(port, req).await
        } else {
            self.call_http1(port, req).await
        };
        let resp = resp.map_err(|e| failure(port, &*e))?;
        let size = header_bytes(resp.headers());
        if size > MAX_HEAD_BYTES {
            return Err(LocalFailure::Mesh(
                MeshError::ResponseHeadersTooLarge,
                format!("response head of {size} bytes exceeds {MAX_HEAD_BYTES}"),
            ));
        }
        let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, upgrade);
        Ok(Response::from_parts(parts, body))
    }

    /// An HTTP/1.1 request, on a pooled connection.
    async fn call_http1(
        &self,
        port: u16,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        if !req.headers().contains_key(http::header::HOST) {
            let host = http::HeaderValue::from_str(&format!("127.0.0.1:{port}"))?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        let resp = self.http1.send(port, req).await?;
        Ok(resp.map(|body| body.map_err(Into::into).boxed()))
    }

    /// An h2 request (the app spoke h2), whose authority is its URI.
    async fn call_h2(
        &self,
        port: u16,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        let (mut parts, body) = req.into_parts();
        let target = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        parts.uri = http::Uri::builder()
            .scheme("http")
            .authority(format!("127.0.0.1:{port}"))
            .path_and_query(target)
            .build()?;
        parts.headers.remove(http::header::HOST);
        let resp = self.h2.request(Request::from_parts(parts, body)).await?;
        Ok(resp.map(|body| body.map_err(Into::into).boxed()))
    }
}

/// A response head hyper would not read is over the mesh's limit, not the
/// instance's failure.
fn failure(port: u16, e: &(dyn std::error::Error + 'static)) -> LocalFailure {
    let too_large = std::iter::successors(Some(e), |e| e.source()).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_parse_too_large)
    });
    if too_large {
        return LocalFailure::Mesh(
            MeshError::ResponseHeadersTooLarge,
            format!("127.0.0.1:{port} sent a response head over the limit"),
        );
    }
    LocalFailure::Unreachable(format!("127.0.0.1:{port}: {e}"))
}
