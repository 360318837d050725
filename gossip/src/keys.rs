//! The gossip key schema: every key a weft node writes, encoded and decoded in one place.
//!
//! Keys are short ASCII strings written only by their owner. chitchat can panic
//! on keys that start with a multi-byte character, so nothing that is not
//! validated here is ever written.

use crate::GossipError;

/// Longest instance id or service name accepted in a key.
pub const MAX_ID_LEN: usize = 128;
/// Largest value weft writes under one key (a catalog of 1000 instances must still gossip).
pub const MAX_VALUE_LEN: usize = 4 * 1024;

/// A typed gossip key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// The node's own record: addresses, version, status.
    Node,
    /// The gossip keyring this node holds (sealed like all gossip).
    Keyring,
    /// The node's certificate (base64 DER), which signs its state.
    Cert,
    /// The node's signature over all its other keys ([`crate::attest`]),
    /// rewritten after every change, so it is always its newest key.
    Sig,
    /// The revocation list the node uses (base64 DER, signed by the CA).
    Crl,
    /// The cluster's intentions the node adopted, with their operator grant.
    Intentions,
    /// The cluster's routes (weighted splits by tag) the node adopted, with
    /// their operator grant.
    Routes,
    /// The cluster's rate limits the node adopted, with their operator
    /// grant.
    Limits,
    /// The demand this node sees for each rate limit (requests a second),
    /// from which every node takes its share.
    Demand,
    /// What this node learned of each service under adaptive concurrency
    /// (its limit, demand and requests in flight).
    Concurrency,
    /// The cluster's rollouts the node adopted, with their operator grant.
    Rollouts,
    /// How far each rollout has come as this node knows it, and its
    /// statistics of the current step.
    Rollout,
    /// An instance this node hosts.
    Svc(String),
    /// What this node's checker or outlier detector concluded about an instance.
    Health(String),
    /// This node's compact statistics summary for a service.
    Stats(String),
    /// `eject/<node>/<id>`: this node's outlier detector voted to eject
    /// `node`'s instance `id`. A key of the voter's own, so a vote never
    /// touches the owner's `health/<id>`, and withdrawing it is a delete.
    Eject {
        /// The node that hosts the instance.
        node: String,
        /// The instance.
        id: String,
    },
    /// `edge/<service>/<caller>`: this node's compact statistics of
    /// `caller`'s requests to `service` (`-` is the anonymous caller).
    Edge {
        /// The service called.
        service: String,
        /// The calling service, or `-`.
        caller: String,
    },
    /// `zone/<zone>/<service>`: what `zone` offers of `service`, written by
    /// bridges ([`crate::records::ZoneOffer`]).
    Zone {
        /// The zone that offers it.
        zone: String,
        /// The service.
        service: String,
    },
}

impl Key {
    /// Builds a key after checking that its id is acceptable.
    pub fn svc(id: &str) -> Result<Self, GossipError> {
        validate_id(id)?;
        Ok(Key::Svc(id.to_string()))
    }

    /// The string stored in chitchat.
    pub fn encode(&self) -> String {
        match self {
            Key::Node => "node".to_string(),
            Key::Keyring => "keyring".to_string(),
            Key::Cert => "cert".to_string(),
            Key::Sig => "sig".to_string(),
            Key::Crl => "crl".to_string(),
            Key::Intentions => "intentions".to_string(),
            Key::Routes => "routes".to_string(),
            Key::Limits => "limits".to_string(),
            Key::Demand => "demand".to_string(),
            Key::Concurrency => "concurrency".to_string(),
            Key::Rollouts => "rollouts".to_string(),
            Key::Rollout => "rollout".to_string(),
            Key::Svc(id) => format!("svc/{id}"),
            Key::Health(id) => format!("health/{id}"),
            Key::Stats(svc) => format!("stats/{svc}"),
            Key::Eject { node, id } => format!("eject/{node}/{id}"),
            Key::Edge { service, caller } => format!("edge/{service}/{caller}"),
            Key::Zone { zone, service } => format!("zone/{zone}/{service}"),
        }
    }

    /// Parses a chitchat key; unknown or malformed keys are `None` and ignored.
    pub fn decode(raw: &str) -> Option<Self> {
        match raw {
            "node" => return Some(Key::Node),
            "keyring" => return Some(Key::Keyring),
            "cert" => return Some(Key::Cert),
            "sig" => return Some(Key::Sig),
            "crl" => return Some(Key::Crl),
            "intentions" => return Some(Key::Intentions),
            "routes" => return Some(Key::Routes),
            "limits" => return Some(Key::Limits),
            "demand" => return Some(Key::Demand),
            "concurrency" => return Some(Key::Concurrency),
            "rollouts" => return Some(Key::Rollouts),
            "rollout" => return Some(Key::Rollout),
            _ => {}
        }
        let (prefix, rest) = raw.split_once('/')?;
        if prefix == "eject" {
            let (node, id) = rest.split_once('/')?;
            validate_name(node).ok()?;
            validate_id(id).ok()?;
            return Some(Key::Eject {
                node: node.to_string(),
                id: id.to_string(),
            });
        }
        if prefix == "edge" {
            let (service, caller) = rest.split_once('/')?;
            validate_name(service).ok()?;
            if caller != "-" {
                validate_name(caller).ok()?;
            }
            return Some(Key::Edge {
                service: service.to_string(),
                caller: caller.to_string(),
            });
        }
        if prefix == "zone" {
            let (zone, service) = rest.split_once('/')?;
            validate_name(zone).ok()?;
            validate_name(service).ok()?;
            return Some(Key::Zone {
                zone: zone.to_string(),
                service: service.to_string(),
            });
        }
        if validate_id(rest).is_err() {
            return None;
        }
        match prefix {
            "svc" => Some(Key::Svc(rest.to_string())),
            "health" => Some(Key::Health(rest.to_string())),
            "stats" => Some(Key::Stats(rest.to_string())),
            _ => None,
        }
    }
}

/// Instance ids: `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`.
pub fn validate_id(id: &str) -> Result<(), GossipError> {
    let mut chars = id.chars();
    let ok_first = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok_first || !ok_rest || id.len() > MAX_ID_LEN {
        return Err(GossipError::Invalid(format!(
            "id {id:?} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}"
        )));
    }
    Ok(())
}

/// Service and node names: `[a-z0-9][a-z0-9-]{0,62}` (a DNS label).
pub fn validate_name(name: &str) -> Result<(), GossipError> {
    let mut chars = name.chars();
    let ok_first = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok_rest = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if !ok_first || !ok_rest || name.len() > 63 {
        return Err(GossipError::Invalid(format!(
            "name {name:?} must match [a-z0-9][a-z0-9-]{{0,62}}"
        )));
    }
    Ok(())
}

/// Checks that a value can be written: ASCII-safe JSON and small.
pub fn validate_value(value: &str) -> Result<(), GossipError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(GossipError::Invalid(format!(
            "value of {} bytes exceeds {MAX_VALUE_LEN}",
            value.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        for key in [
            Key::Node,
            Key::Intentions,
            Key::Routes,
            Key::Limits,
            Key::Demand,
            Key::Concurrency,
            Key::Rollouts,
            Key::Rollout,
            Key::Svc("web-n1-8080".into()),
            Key::Health("db.1".into()),
            Key::Stats("web".into()),
            Key::Eject {
                node: "n2".into(),
                id: "web-n2-80".into(),
            },
            Key::Edge {
                service: "payments".into(),
                caller: "checkout".into(),
            },
            Key::Edge {
                service: "payments".into(),
                caller: "-".into(),
            },
            Key::Zone {
                zone: "eu-west".into(),
                service: "payments".into(),
            },
        ] {
            assert_eq!(Key::decode(&key.encode()), Some(key));
        }
    }

    #[test]
    fn foreign_keys_are_ignored() {
        for raw in [
            "",
            "svc/",
            "svc/é",
            "nodes",
            "other/x",
            "svc/a/b",
            "svc/-x",
            "eject/n1",
            "eject/N1/x",
            "eject/n1/a b",
            "eject/n1/x/y",
            "edge/web",
            "zone/eu",
            "zone/EU/web",
            "zone/eu/web/x",
            "edge/web/Admin",
            "edge/web/--",
            "edge/web/a/b",
        ] {
            assert_eq!(Key::decode(raw), None, "{raw:?}");
        }
    }

    #[test]
    fn ids_and_names_are_validated() {
        assert!(validate_id("web-1").is_ok());
        assert!(validate_id("Web_1.a").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("é").is_err());
        assert!(validate_id(&"a".repeat(129)).is_err());
        assert!(validate_name("web").is_ok());
        assert!(validate_name("web-2").is_ok());
        assert!(validate_name("Web").is_err());
        assert!(validate_name("-web").is_err());
        assert!(validate_name(&"a".repeat(64)).is_err());
        assert!(Key::svc("ok").is_ok());
        assert!(Key::svc("not ok").is_err());
    }

    #[test]
    fn values_are_bounded() {
        assert!(validate_value("{}").is_ok());
        assert!(validate_value(&"x".repeat(MAX_VALUE_LEN + 1)).is_err());
    }
}
