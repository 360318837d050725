//! Errors the mesh itself answers with, each with its `weft-error` code and
//! status (DESIGN section 5).

use bytes::Bytes;
use hyper::{Response, StatusCode};

use super::ProxyBody;

/// The header that marks errors made by the mesh itself.
pub const WEFT_ERROR: &str = "weft-error";

/// An answer made by the mesh, not by an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshError {
    /// No such service in the catalog.
    UnknownService,
    /// The service exists but has no routable instance.
    NoHealthyInstance,
    /// No response head within the deadline.
    UpstreamTimeout,
    /// The instance or its node could not be reached.
    UpstreamUnreachable,
    /// A retry was needed and the retry budget refused it.
    RetryBudgetExhausted,
    /// The app's request head is over the mesh's limit.
    RequestHeadersTooLarge,
    /// The instance's response head is over the mesh's limit.
    ResponseHeadersTooLarge,
    /// The request has crossed too many mesh hops.
    LoopDetected,
    /// The request cannot be proxied as sent.
    BadRequest,
    /// A limit of the serving node was reached (streams from one peer,
    /// requests in flight to one instance): not the instance's fault.
    Overloaded,
    /// The cluster's intentions do not let this caller call this service.
    Forbidden,
    /// The cluster's rate limit for this service (or caller) is reached.
    RateLimited,
}

impl MeshError {
    const ALL: [MeshError; 12] = [
        MeshError::UnknownService,
        MeshError::NoHealthyInstance,
        MeshError::UpstreamTimeout,
        MeshError::UpstreamUnreachable,
        MeshError::RetryBudgetExhausted,
        MeshError::RequestHeadersTooLarge,
        MeshError::ResponseHeadersTooLarge,
        MeshError::LoopDetected,
        MeshError::BadRequest,
        MeshError::Overloaded,
        MeshError::Forbidden,
        MeshError::RateLimited,
    ];

    /// The `weft-error` value.
    pub fn code(self) -> &'static str {
        match self {
            MeshError::UnknownService => "unknown-service",
            MeshError::NoHealthyInstance => "no-healthy-instance",
            MeshError::UpstreamTimeout => "upstream-timeout",
            MeshError::UpstreamUnreachable => "upstream-unreachable",
            MeshError::RetryBudgetExhausted => "retry-budget-exhausted",
            MeshError::RequestHeadersTooLarge => "request-headers-too-large",
            MeshError::ResponseHeadersTooLarge => "response-headers-too-large",
            MeshError::LoopDetected => "loop-detected",
            MeshError::BadRequest => "bad-request",
            MeshError::Overloaded => "overloaded",
            MeshError::Forbidden => "forbidden",
            MeshError::RateLimited => "rate-limited",
        }
    }

    /// The error a `weft-error` code names (a peer's answer on the tunnel).
    pub fn from_code(code: &str) -> Option<MeshError> {
        Self::ALL.into_iter().find(|e| e.code() == code)
    }

    /// The HTTP status that goes with it.
    pub fn status(self) -> StatusCode {
        match self {
            MeshError::UnknownService
            | MeshError::NoHealthyInstance
            | MeshError::RetryBudgetExhausted
            | MeshError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            MeshError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            MeshError::UpstreamUnreachable | MeshError::ResponseHeadersTooLarge => {
                StatusCode::BAD_GATEWAY
            }
            MeshError::RequestHeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            MeshError::LoopDetected => StatusCode::LOOP_DETECTED,
            MeshError::BadRequest => StatusCode::BAD_REQUEST,
            MeshError::Forbidden => StatusCode::FORBIDDEN,
            MeshError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// A limit or protocol error of the mesh: the instance did nothing wrong,
    /// so this is never retried, never counted against the instance and never
    /// fed to outlier detection.
    pub fn is_mesh_limit(self) -> bool {
        matches!(
            self,
            MeshError::RequestHeadersTooLarge
                | MeshError::ResponseHeadersTooLarge
                | MeshError::LoopDetected
                | MeshError::BadRequest
                | MeshError::Overloaded
                | MeshError::Forbidden
                | MeshError::RateLimited
        )
    }

    /// The response the app gets: the status, `weft-error` and one line.
    pub fn response(self, detail: &str) -> Response<ProxyBody> {
        let code = self.code();
        let body = super::body::full(Bytes::from(format!("weft: {code}: {detail}\n")));
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status();
        resp.headers_mut()
            .insert(WEFT_ERROR, http::HeaderValue::from_static(code));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        resp
    }
}

impl std::fmt::Display for MeshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_parses_back() {
        for e in MeshError::ALL {
            assert_eq!(MeshError::from_code(e.code()), Some(e));
        }
        assert_eq!(MeshError::from_code("nonsense"), None);
    }

    #[test]
    fn limits_are_the_mesh_s_own() {
        assert!(MeshError::RequestHeadersTooLarge.is_mesh_limit());
        assert!(!MeshError::UpstreamUnreachable.is_mesh_limit());
        assert_eq!(MeshError::LoopDetected.status().as_u16(), 508);
        assert_eq!(MeshError::RequestHeadersTooLarge.status().as_u16(), 431);
    }
}
