//! Who calls: the service a request comes from, known from where it entered
//! the mesh and never from anything the app can write.
//!
//! A request that enters through a service's own outbound port is from that
//! service; one that enters through the shared proxy is from the anonymous
//! caller `-`. The calling node stamps `weft-caller` on the forwarded head
//! after removing whatever the app sent under that name. The serving node
//! believes the name only when the peer that sent it (named by its mTLS
//! certificate) hosts a registration of that service, and tells the instance
//! `weft-caller` and `weft-caller-node`.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The calling service, as the instance is told.
pub const CALLER: HeaderName = HeaderName::from_static("weft-caller");

/// The calling node, as the instance is told.
pub const CALLER_NODE: HeaderName = HeaderName::from_static("weft-caller-node");

/// The anonymous caller's name: a request through the shared proxy.
pub const ANONYMOUS: &str = "-";

/// Where a request entered the mesh.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The shared proxy port: any local process.
    Anonymous,
    /// A service's own outbound port; the name as a header value, made
    /// once, so stamping a request copies nothing.
    Service(HeaderValue),
}

impl Caller {
    /// The caller a service's outbound port stamps (a name that is no
    /// header value, which a validated service name never is, is `-`).
    pub fn service(name: &str) -> Self {
        HeaderValue::from_str(name).map_or(Caller::Anonymous, Caller::Service)
    }

    /// The name in headers, metrics and logs (`-` for the anonymous caller).
    pub fn as_str(&self) -> &str {
        match self {
            Caller::Anonymous => ANONYMOUS,
            Caller::Service(name) => name.to_str().unwrap_or(ANONYMOUS),
        }
    }

    /// On the calling node: replaces whatever caller headers the app sent
    /// with this caller's name.
    pub fn stamp(&self, headers: &mut HeaderMap) {
        headers.remove(CALLER_NODE);
        let value = match self {
            Caller::Anonymous => HeaderValue::from_static(ANONYMOUS),
            Caller::Service(name) => name.clone(),
        };
        headers.insert(CALLER, value);
    }
}

/// What the serving node made of a peer's caller claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The anonymous caller, or a service the peer hosts.
    Believed,
    /// A service the peer hosts no registration of: the request goes on as
    /// the anonymous caller's.
    NotHosted,
    /// No caller named (a node of an earlier release): the anonymous caller.
    Absent,
}

/// On the serving node, for a request a peer forwarded: keeps the caller it
/// names only when `hosts(peer, service)` says the peer hosts that service,
/// and names the calling node from its certificate, whatever the head said.
pub fn admit_claim(headers: &mut HeaderMap, peer: &str, hosts: impl FnOnce(&str) -> bool) -> Claim {
    let claim = match headers.get(CALLER).map(HeaderValue::to_str) {
        None => Claim::Absent,
        Some(Ok(ANONYMOUS)) => Claim::Believed,
        Some(Ok(service)) if hosts(service) => Claim::Believed,
        Some(_) => Claim::NotHosted,
    };
    if claim != Claim::Believed {
        headers.insert(CALLER, HeaderValue::from_static(ANONYMOUS));
    }
    match HeaderValue::from_str(peer) {
        Ok(node) => name_node(headers, &node),
        Err(_) => drop(headers.remove(CALLER_NODE)),
    }
    claim
}

/// Tells the instance which node the request came from.
pub fn name_node(headers: &mut HeaderMap, node: &HeaderValue) {
    headers.insert(CALLER_NODE, node.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forged() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(CALLER, HeaderValue::from_static("admin"));
        h.insert(CALLER_NODE, HeaderValue::from_static("vault"));
        h
    }

    #[test]
    fn the_calling_node_replaces_what_the_app_wrote() {
        let mut h = forged();
        Caller::service("checkout").stamp(&mut h);
        assert_eq!(h[CALLER], "checkout");
        assert!(!h.contains_key(CALLER_NODE));
        let mut h = forged();
        Caller::Anonymous.stamp(&mut h);
        assert_eq!(h[CALLER], "-");
    }

    #[test]
    fn a_peer_is_believed_only_for_services_it_hosts() {
        let mut h = forged();
        Caller::service("checkout").stamp(&mut h);
        let claim = admit_claim(&mut h, "n1", |s| s == "checkout");
        assert_eq!(claim, Claim::Believed);
        assert_eq!(h[CALLER], "checkout");
        assert_eq!(h[CALLER_NODE], "n1");

        let mut h = forged();
        let claim = admit_claim(&mut h, "evil", |_| false);
        assert_eq!(claim, Claim::NotHosted);
        assert_eq!(h[CALLER], "-");
        assert_eq!(h[CALLER_NODE], "evil");

        // No claim at all (an older node): the anonymous caller.
        let mut h = HeaderMap::new();
        assert_eq!(admit_claim(&mut h, "n1", |_| true), Claim::Absent);
        assert_eq!(h[CALLER], "-");
        // The anonymous caller needs no host.
        let mut h = HeaderMap::new();
        Caller::Anonymous.stamp(&mut h);
        assert_eq!(admit_claim(&mut h, "n1", |_| false), Claim::Believed);
    }
}
