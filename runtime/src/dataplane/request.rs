//! What the proxy forwards of a request: the service, a checked request
//! target, the end-to-end headers and the hop count, worked out once and
//! used the same way on the local and the remote path.

use http::header::{CONNECTION, HOST, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};

use super::error::MeshError;
use super::ProxyBody;
use crate::caller::Caller;
use crate::wire::{RequestHead, RequestHeadRef, StreamKind, MAX_HEAD_BYTES, WIRE_VERSION};

/// The header that counts mesh hops.
pub const HOPS: HeaderName = HeaderName::from_static("weft-hops");

/// Most mesh hops a request may cross before it is refused as a loop.
pub const MAX_HOPS: u32 = 8;

/// Where a request entered the mesh: who calls through that port and, for
/// a named upstream, the one service the port reaches whatever the request
/// names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entrance {
    /// Who calls through the port.
    pub caller: Caller,
    /// The service a named upstream reaches; `None`: the request names it.
    pub service: Option<String>,
}

impl Entrance {
    /// The shared proxy port: the anonymous caller, any service.
    pub fn shared() -> Self {
        Entrance {
            caller: Caller::Anonymous,
            service: None,
        }
    }
}

/// A request as the mesh forwards it.
#[derive(Debug, Clone)]
pub struct Forward {
    /// The service named by the authority.
    pub service: String,
    /// The method.
    pub method: Method,
    /// Origin-form target (or `*` for `OPTIONS *`).
    pub target: PathAndQuery,
    /// The app spoke HTTP/2 (h2c, gRPC).
    pub http2: bool,
    /// HTTP/1.1 upgrade (WebSocket and others): after a 101 the stream
    /// carries raw bytes.
    pub upgrade: bool,
    /// End-to-end headers, the hop count, the caller and, for upgrades,
    /// the upgrade headers; `Host` for HTTP/1.
    pub headers: HeaderMap,
    /// Where the request entered the mesh.
    pub caller: Caller,
}

/// Why a request cannot be forwarded: the error and a line for the app.
pub type Refusal = (MeshError, String);

impl Forward {
    /// Checks and reads an app's request head that entered through
    /// `entrance`; takes its headers.
    pub fn parse(
        parts: &mut http::request::Parts,
        entrance: &Entrance,
    ) -> Result<Forward, Refusal> {
        let size = head_size(&parts.method, &parts.uri, &parts.headers);
        if size > MAX_HEAD_BYTES {
            return Err((
                MeshError::RequestHeadersTooLarge,
                format!("request head of {size} bytes exceeds {MAX_HEAD_BYTES}"),
            ));
        }
        let target = target(&parts.method, &parts.uri)?;
        let service = match &entrance.service {
            Some(service) => service.clone(),
            None => service_of(&parts.uri, &parts.headers).ok_or((
                MeshError::BadRequest,
                "no service: send an absolute URI or a Host header naming the service".to_string(),
            ))?,
        };
        let hops = hops(&parts.headers)?;
        let http2 = parts.version == Version::HTTP_2;
        let upgrade = !http2 && is_upgrade(&parts.headers);
        let mut headers = std::mem::take(&mut parts.headers);
        strip_hop_by_hop(&mut headers, upgrade);
        headers.insert(HOPS, HeaderValue::from(hops + 1));
        entrance.caller.stamp(&mut headers);
        if !http2 && !headers.contains_key(HOST) {
            if let Ok(host) = HeaderValue::from_str(&service) {
                headers.insert(HOST, host);
            }
        }
        Ok(Forward {
            service,
            method: parts.method.clone(),
            target,
            http2,
            upgrade,
            headers,
            caller: entrance.caller.clone(),
        })
    }

    /// The request for an instance on this host (the local client adds the
    /// instance's address).
    pub fn request(&self, body: ProxyBody) -> Request<ProxyBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.target.clone().into();
        *req.version_mut() = if self.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// The head that carries this request across the tunnel, borrowed
    /// from it.
    pub fn wire_head<'a>(
        &'a self,
        instance: &'a str,
        deadline_ms: u32,
        attempt: u8,
        end_stream: bool,
    ) -> RequestHeadRef<'a> {
        RequestHeadRef {
            version: WIRE_VERSION,
            kind: StreamKind::Http,
            service: &self.service,
            instance,
            method: self.method.as_str(),
            uri: self.target.as_str(),
            headers: &self.headers,
            deadline_ms,
            attempt,
            http2: self.http2,
            end_stream,
        }
    }

    /// The request a peer's head describes, for this node's instance (the
    /// head's headers are taken, not copied).
    pub fn from_wire(
        head: &mut RequestHead,
        body: ProxyBody,
    ) -> Result<Request<ProxyBody>, String> {
        let method =
            Method::from_bytes(head.method.as_bytes()).map_err(|e| format!("bad method: {e}"))?;
        let target: PathAndQuery = head.uri.parse().map_err(|e| format!("bad target: {e}"))?;
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = target.into();
        *req.version_mut() = if head.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *req.headers_mut() = header_map(std::mem::take(&mut head.headers));
        Ok(req)
    }
}

/// The bytes of a head that count toward [`MAX_HEAD_BYTES`].
pub fn head_size(method: &Method, uri: &http::Uri, headers: &HeaderMap) -> usize {
    let target = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    method.as_str().len() + target + header_bytes(headers)
}

/// The bytes of a header list: every name and value.
pub fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len())
        .sum()
}

/// Origin-form and absolute-form targets, and `*` for OPTIONS only.
fn target(method: &Method, uri: &http::Uri) -> Result<PathAndQuery, Refusal> {
    let bad = |why: &str| (MeshError::BadRequest, why.to_string());
    if *method == Method::CONNECT {
        return Err(bad("CONNECT is not proxied; register the service as tcp"));
    }
    match uri.path_and_query() {
        Some(pq) if pq.as_str() == "*" => {
            if *method == Method::OPTIONS {
                Ok(pq.clone())
            } else {
                Err(bad("the target * is for OPTIONS only"))
            }
        }
        Some(pq) if pq.as_str().starts_with('/') => Ok(pq.clone()),
        // `http://web` has no path: it means `/`.
        None if uri.authority().is_some() => Ok(PathAndQuery::from_static("/")),
        _ => Err(bad(
            "the request target must be origin-form or absolute-form",
        )),
    }
}

/// The service a request is for: the authority's host, without port.
pub fn service_of(uri: &http::Uri, headers: &HeaderMap) -> Option<String> {
    let host = match uri.authority() {
        Some(a) => a.host().to_string(),
        None => {
            let host = headers.get(HOST)?.to_str().ok()?;
            let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
            host.to_string()
        }
    };
    let name = host.trim_end_matches('.').to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

/// Hops already crossed; a request at [`MAX_HOPS`] is a loop.
fn hops(headers: &HeaderMap) -> Result<u32, Refusal> {
    let Some(value) = headers.get(HOPS) else {
        return Ok(0);
    };
    let hops: u32 = value
        .to_str()
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .ok_or((MeshError::BadRequest, format!("{HOPS} must be a number")))?;
    if hops >= MAX_HOPS {
        return Err((
            MeshError::LoopDetected,
            format!("the request crossed {hops} mesh hops (at most {MAX_HOPS})"),
        ));
    }
    Ok(hops)
}

/// Tokens of the `Connection` header, lowercased.
fn connection_tokens(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// An HTTP/1.1 upgrade the instance should see (`h2c` is the proxy's own
/// business and is never passed on).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    let upgrade_to = headers.get(UPGRADE).and_then(|v| v.to_str().ok());
    connection_tokens(headers).iter().any(|t| t == "upgrade")
        && upgrade_to.is_some_and(|u| !u.trim().eq_ignore_ascii_case("h2c"))
}

/// Leaves the end-to-end headers of a request or response, in place:
/// hop-by-hop headers, those named in `Connection`, `TE` other than
/// `trailers`, and `Expect` (the proxy has already answered `100-continue`
/// to its client) are removed. For an upgrade, `Connection: upgrade` and the
/// `Upgrade` header are kept, since the instance (or the app, in a 101)
/// must see them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_to = if upgrade {
        headers.get(UPGRADE).cloned()
    } else {
        None
    };
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    for name in named {
        headers.remove(name);
    }
    if headers
        .get(http::header::TE)
        .is_some_and(|v| v.as_bytes() != b"trailers")
    {
        headers.remove(http::header::TE);
    }
    headers.remove(http::header::EXPECT);
    if let Some(to) = upgrade_to {
        headers.insert(UPGRADE, to);
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Headers that belong to one hop and are never forwarded.
const HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    UPGRADE,
    http::header::TRAILER,
    http::header::PROXY_AUTHORIZATION,
    http::header::PROXY_AUTHENTICATE,
];

/// Header pairs for the wire.
pub fn wire_pairs(headers: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect()
}

/// A header map from wire pairs, skipping anything invalid. The sender
/// already removed hop-by-hop headers (and kept the upgrade ones on purpose).
/// Each value's bytes become the header value as they are, not copied.
pub fn header_map(pairs: Vec<(String, Vec<u8>)>) -> HeaderMap {
    let mut map = HeaderMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_maybe_shared(bytes::Bytes::from(value)),
        ) {
            map.append(n, v);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(parts: &mut http::request::Parts) -> Result<Forward, Refusal> {
        Forward::parse(parts, &Entrance::shared())
    }

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn refused(mut p: http::request::Parts) -> MeshError {
        parse(&mut p).unwrap_err().0
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-request-id"], "abc");
        let mut h = HeaderMap::new();
        h.insert("te", "trailers".parse().unwrap());
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut p = parts(
            "GET",
            "/chat",
            &[
                ("host", "chat"),
                ("connection", "keep-alive, Upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-key", "k"),
            ],
        );
        let f = parse(&mut p).unwrap();
        assert!(f.upgrade);
        assert_eq!(f.headers["connection"], "upgrade");
        assert_eq!(f.headers["upgrade"], "websocket");
        assert_eq!(f.headers["sec-websocket-key"], "k");
        let mut h2c = parts(
            "GET",
            "/",
            &[
                ("host", "web"),
                ("connection", "upgrade"),
                ("upgrade", "h2c"),
            ],
        );
        let f = parse(&mut h2c).unwrap();
        assert!(!f.upgrade);
        assert!(!f.headers.contains_key("upgrade"));
    }

    #[test]
    fn request_targets() {
        let f = parse(&mut parts("GET", "http://web/a?b=1", &[])).unwrap();
        assert_eq!((f.service.as_str(), f.target.as_str()), ("web", "/a?b=1"));
        let f = parse(&mut parts("GET", "http://Web.:8080", &[])).unwrap();
        assert_eq!((f.service.as_str(), f.target.as_str()), ("web", "/"));
        let f = parse(&mut parts("GET", "/x", &[("host", "web:80")])).unwrap();
        assert_eq!((f.service.as_str(), f.target.as_str()), ("web", "/x"));
        let f = parse(&mut parts("OPTIONS", "*", &[("host", "web")])).unwrap();
        assert_eq!(f.target.as_str(), "*");
        assert_eq!(
            refused(parts("GET", "*", &[("host", "web")])),
            MeshError::BadRequest
        );
        assert_eq!(
            refused(parts("CONNECT", "web:443", &[])),
            MeshError::BadRequest
        );
        assert_eq!(refused(parts("GET", "/x", &[])), MeshError::BadRequest);
    }

    #[test]
    fn hops_are_counted_and_bounded() {
        let f = parse(&mut parts("GET", "/", &[("host", "web")])).unwrap();
        assert_eq!(f.headers[HOPS], "1");
        let f = parse(&mut parts(
            "GET",
            "/",
            &[("host", "web"), ("weft-hops", "7")],
        ))
        .unwrap();
        assert_eq!(f.headers[HOPS], "8");
        let p = parts("GET", "/", &[("host", "web"), ("weft-hops", "8")]);
        assert_eq!(refused(p), MeshError::LoopDetected);
        let p = parts("GET", "/", &[("host", "web"), ("weft-hops", "x")]);
        assert_eq!(refused(p), MeshError::BadRequest);
    }

    #[test]
    fn heads_over_the_limit_are_refused() {
        let big = "a".repeat(MAX_HEAD_BYTES);
        let p = parts("GET", "/", &[("host", "web"), ("cookie", &big)]);
        assert_eq!(refused(p), MeshError::RequestHeadersTooLarge);
        let fits = "a".repeat(MAX_HEAD_BYTES - 100);
        assert!(parse(&mut parts(
            "GET",
            "/",
            &[("host", "web"), ("cookie", &fits)]
        ))
        .is_ok());
    }
}
