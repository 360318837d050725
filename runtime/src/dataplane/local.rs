//! Calling an instance on this host: pooled keep-alive clients, the URI
//! built from parts, the response head checked against the mesh's limit.

use std::time::Duration;

use http_body_util::BodyExt;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::error::MeshError;
use super::request::{header_bytes, strip_hop_by_hop};
use super::ProxyBody;
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
    http1: Client<HttpConnector, ProxyBody>,
    h2: Client<HttpConnector, ProxyBody>,
}

impl LocalClients {
    /// Clients that connect within `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let http1 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector.clone());
        let h2 = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .http2_max_header_list_size(H2_MAX_HEADER_LIST)
            .build(connector);
        LocalClients { http1, h2 }
    }

    /// Sends `req` (origin-form target, forwarded headers) to the instance on
    /// 127.0.0.1:`port`. The response's hop-by-hop headers are removed, except
    /// the upgrade headers of a 101.
    pub async fn call(
        &self,
        port: u16,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, LocalFailure> {
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
            .build()
            .map_err(|e| LocalFailure::Mesh(MeshError::BadRequest, format!("target: {e}")))?;
        let http2 = parts.version == http::Version::HTTP_2;
        if http2 {
            // The authority of an h2 request is its URI.
            parts.headers.remove(http::header::HOST);
        }
        let client = if http2 { &self.h2 } else { &self.http1 };
        let resp = client
            .request(Request::from_parts(parts, body))
            .await
            .map_err(|e| failure(port, &e))?;
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
        Ok(Response::from_parts(
            parts,
            body.map_err(Into::into).boxed(),
        ))
    }
}

/// A response head hyper would not read is over the mesh's limit, not the
/// instance's failure.
fn failure(port: u16, e: &hyper_util::client::legacy::Error) -> LocalFailure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse_too_large() {
                return LocalFailure::Mesh(
                    MeshError::ResponseHeadersTooLarge,
                    format!("127.0.0.1:{port} sent a response head over the limit"),
                );
            }
        }
        source = err.source();
    }
    LocalFailure::Unreachable(format!("127.0.0.1:{port}: {e}"))
}
