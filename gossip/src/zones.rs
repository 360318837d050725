//! Zones: one gossip pool each, joined by bridges.
//!
//! A node started in a zone gossips only with its zone. A bridge also
//! gossips in the pool between zones, where it writes what its zone offers
//! (`zone/<zone>/<service>`), and copies what every other zone offers into
//! its zone's pool under the same keys. A service with no routable instance
//! in a node's zone then has *gateway* instances in its catalog, one per
//! next hop and zone that offers it:
//!
//! - on a node that is not a bridge, its zone's bridges;
//! - on a bridge, the bridges of the zone that offers it (the bridge's view
//!   is its zone's joined with the pool between zones, [`join`]).
//!
//! A gateway instance's id is `zone:<zone>`, which no registration can
//! take (ids have no `:`); the node that receives a stream for it relays
//! the stream to the next hop instead of calling a local instance.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::catalog::{Catalog, Instance};
use crate::records::{Health, NodeStatus, Protocol, ZoneOffer};
use crate::view::{ClusterView, NodeSnapshot};

/// The id prefix of gateway instances.
const GATEWAY_PREFIX: &str = "zone:";

/// The id of the gateway instance that leads to `zone`.
pub fn gateway_id(zone: &str) -> String {
    format!("{GATEWAY_PREFIX}{zone}")
}

/// The zone a gateway instance id leads to; `None` for a registered
/// instance's id.
pub fn gateway_zone(id: &str) -> Option<&str> {
    id.strip_prefix(GATEWAY_PREFIX)
}

/// Whether `id` is a gateway's rather than a registered instance's.
pub fn is_gateway(id: &str) -> bool {
    gateway_zone(id).is_some()
}

/// Where the node that took a view stands: its zone and whether it
/// bridges it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Place {
    /// Its zone (`None`: the default zone).
    pub zone: Option<String>,
    /// It is a bridge.
    pub bridge: bool,
}

impl Place {
    /// What the view's own node announced of itself.
    pub fn of(view: &ClusterView) -> Place {
        let me = view.nodes.iter().find(|n| n.name == view.self_name);
        me.and_then(|n| n.kv.parsed().info.as_ref())
            .map(|info| Place {
                zone: info.zone.clone(),
                bridge: info.bridge,
            })
            .unwrap_or_default()
    }
}

/// A bridge's view: its zone's nodes and, from the pool between zones, the
/// bridges of the other zones (its own zone's bridges are in both pools;
/// the zone's copy is kept).
pub fn join(zone: &ClusterView, between: &ClusterView) -> ClusterView {
    let own = Place::of(zone).zone;
    let mut joined = zone.clone();
    joined.nodes.extend(
        between
            .nodes
            .iter()
            .filter(|n| zone_of(n) != Some(own.as_deref()))
            .cloned(),
    );
    joined
}

/// The zone a node announced (`Some(None)`: the default zone), `None`
/// before it announced anything.
fn zone_of(node: &NodeSnapshot) -> Option<Option<&str>> {
    let info = node.kv.parsed().info.as_ref()?;
    Some(info.zone.as_deref())
}

/// The gateway instances of every service another zone offers, by service:
/// the next hops toward each zone that has a routable instance of it, from
/// the view of a node standing at `me`.
pub fn gateways(view: &ClusterView, me: &Place) -> BTreeMap<String, Vec<Arc<Instance>>> {
    let mut out: BTreeMap<String, Vec<Arc<Instance>>> = BTreeMap::new();
    // The default zone has no bridges: nothing leads out of it.
    if me.zone.is_none() {
        return out;
    }
    for node in view.current_incarnations() {
        if node.name == view.self_name || !node.live {
            continue;
        }
        let Some(info) = node.kv.parsed().info.as_ref() else {
            continue;
        };
        if info.status != NodeStatus::Alive || !info.bridge {
            continue;
        }
        let same_zone = info.zone == me.zone;
        for (zone, service, offer) in node.kv.offers() {
            let offered_by_own_zone = me.zone.as_deref() == Some(zone.as_str());
            // A bridge's next hop is the offering zone's own bridge; any
            // other node's is a bridge of its zone.
            let next_hop = if me.bridge {
                info.zone.as_deref() == Some(zone.as_str())
            } else {
                same_zone
            };
            if offer.healthy == 0 || offered_by_own_zone || !next_hop {
                continue;
            }
            out.entry(service.clone())
                .or_default()
                .push(Arc::new(Instance {
                    id: gateway_id(zone),
                    node: node.name.clone(),
                    port: 0,
                    protocol: Protocol::Http,
                    health: Health::Passing,
                    tags: Vec::new(),
                    tunnel_addr: info.tunnel_addr(),
                    timeout_ms: None,
                    retry: None,
                    retry_non_idempotent: false,
                    hedge: false,
                    adaptive_concurrency: false,
                }));
        }
    }
    for list in out.values_mut() {
        list.sort();
    }
    out
}

/// What every other zone offers, from the pool between zones: per (zone,
/// service), the offer of the zone's live bridge that counts the most
/// routable instances.
pub fn other_zones(between: &ClusterView) -> BTreeMap<(String, String), ZoneOffer> {
    let own = Place::of(between).zone;
    let mut out: BTreeMap<(String, String), ZoneOffer> = BTreeMap::new();
    for node in between.current_incarnations() {
        let Some(info) = node.kv.parsed().info.as_ref() else {
            continue;
        };
        if !node.live || info.status != NodeStatus::Alive || info.zone == own {
            continue;
        }
        for (zone, service, offer) in node.kv.offers() {
            // A bridge speaks for its own zone only.
            if info.zone.as_deref() != Some(zone.as_str()) {
                continue;
            }
            let key = (zone.clone(), service.clone());
            if out.get(&key).is_none_or(|o| o.healthy < offer.healthy) {
                out.insert(key, offer.clone());
            }
        }
    }
    out
}

/// `catalog` with the gateway instances of each service that has no
/// routable instance of its own zone; the same catalog when none applies.
pub fn with_gateways(
    catalog: &Arc<Catalog>,
    gateways: &BTreeMap<String, Vec<Arc<Instance>>>,
) -> Arc<Catalog> {
    let mut services = None;
    for (service, via) in gateways {
        let own = catalog.instances(service);
        if own.iter().any(|i| i.health.routable()) {
            continue;
        }
        let list: Vec<Arc<Instance>> = own.iter().chain(via).cloned().collect();
        services
            .get_or_insert_with(|| catalog.services.clone())
            .insert(service.clone(), list.into());
    }
    match services {
        Some(services) => Arc::new(Catalog { services }),
        None => catalog.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Key;
    use crate::records::NodeInfo;
    use crate::view::NodeKeys;

    fn node(name: &str, zone: &str, bridge: bool, offers: &[(&str, &str, u32)]) -> NodeSnapshot {
        let info = NodeInfo {
            schema: crate::SCHEMA,
            tunnel: "127.0.0.1:7000".into(),
            admin: "127.0.0.1:7001".into(),
            version: "test".into(),
            status: NodeStatus::Alive,
            zone: Some(zone.into()),
            bridge,
        };
        let mut kv: Vec<(String, String)> =
            vec![("node".into(), serde_json::to_string(&info).unwrap())];
        for (zone, service, healthy) in offers {
            let key = Key::Zone {
                zone: (*zone).into(),
                service: (*service).into(),
            };
            let offer = ZoneOffer {
                healthy: *healthy,
                stats: None,
            };
            kv.push((key.encode(), serde_json::to_string(&offer).unwrap()));
        }
        NodeSnapshot {
            name: name.into(),
            generation: 1,
            gossip_addr: "127.0.0.1:7002".parse().unwrap(),
            live: true,
            dead: false,
            last_heard: std::time::Duration::ZERO,
            kv: Arc::new(kv.into_iter().collect::<NodeKeys>()),
        }
    }

    fn view(me: &str, nodes: Vec<NodeSnapshot>) -> ClusterView {
        ClusterView {
            self_name: me.into(),
            nodes,
            suspect_after: std::time::Duration::from_secs(5),
        }
    }

    fn hops(view: &ClusterView, service: &str) -> Vec<(String, String)> {
        gateways(view, &Place::of(view))
            .get(service)
            .map(|list| {
                list.iter()
                    .map(|i| (i.node.clone(), i.id.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_node_reaches_other_zones_through_its_own_bridges() {
        let v = view(
            "a2",
            vec![
                node("a2", "a", false, &[]),
                node("a1", "a", true, &[("b", "echo", 1), ("a", "web", 2)]),
                node("a3", "a", false, &[("b", "echo", 1)]),
            ],
        );
        // a3 is no bridge; its own zone's offer of web is no gateway.
        assert_eq!(hops(&v, "echo"), [("a1".into(), "zone:b".into())]);
        assert!(hops(&v, "web").is_empty());
    }

    #[test]
    fn a_bridge_reaches_another_zone_through_that_zones_bridges() {
        let zone = view(
            "a1",
            vec![
                node("a1", "a", true, &[("b", "echo", 1)]),
                node("a9", "a", true, &[("b", "echo", 1)]),
            ],
        );
        let between = view(
            "a1",
            vec![
                node("a1", "a", true, &[("a", "web", 1)]),
                node("b1", "b", true, &[("b", "echo", 3), ("b", "gone", 0)]),
            ],
        );
        let offered = other_zones(&between);
        let echo = &offered[&("b".to_string(), "echo".to_string())];
        assert_eq!(echo.healthy, 3);
        assert!(
            !offered.contains_key(&("a".to_string(), "web".to_string())),
            "own zone"
        );
        let joined = join(&zone, &between);
        assert_eq!(joined.nodes.len(), 3, "a1's copy from between is dropped");
        assert_eq!(hops(&joined, "echo"), [("b1".into(), "zone:b".into())]);
        assert!(hops(&joined, "gone").is_empty(), "no healthy instance");
    }

    #[test]
    fn gateways_stand_in_only_where_the_zone_has_no_routable_instance() {
        let v = view(
            "a2",
            vec![
                node("a2", "a", false, &[]),
                node("a1", "a", true, &[("b", "echo", 1)]),
            ],
        );
        let empty = Arc::new(Catalog::default());
        let with = with_gateways(&empty, &gateways(&v, &Place::of(&v)));
        assert_eq!(with.instances("echo")[0].id, "zone:b");
        assert_eq!(gateway_zone(&with.instances("echo")[0].id), Some("b"));

        let mut own = Catalog::default();
        let mut local = (*with.instances("echo")[0]).clone();
        local.id = "echo-1".into();
        local.node = "a2".into();
        own.services
            .insert("echo".into(), vec![Arc::new(local)].into());
        let own = Arc::new(own);
        assert!(Arc::ptr_eq(
            &own,
            &with_gateways(&own, &gateways(&v, &Place::of(&v)))
        ));
    }
}
