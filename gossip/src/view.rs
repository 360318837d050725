//! A plain picture of the cluster and the pure derivation of members from
//! it (the catalog's is in [`crate::catalog`]).
//!
//! chitchat fires no event when a key is deleted, so weft never maintains
//! state from events: every change produces a fresh [`ClusterView`]. A
//! node's keys are copied out of chitchat only when its version changes,
//! shared by every view until then, and parsed once ([`NodeKeys`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Serialize;

pub use crate::catalog::{Catalog, CatalogDeriver, CatalogDiff, Instance, Instances};
use crate::keys::Key;
use crate::records::{reads_schema, Health, NodeInfo, NodeStatus, ServiceRecord, ZoneOffer};
use crate::registration::parse_gossiped;

/// One node as seen in gossip, owned data only.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeSnapshot {
    /// Node name (chitchat node id).
    pub name: String,
    /// Start time of this incarnation; a restarted node has a higher one.
    pub generation: u64,
    /// Address peers gossip with.
    pub gossip_addr: SocketAddr,
    /// The failure detector counts it live.
    pub live: bool,
    /// The failure detector declared it dead.
    pub dead: bool,
    /// Time since its heartbeat last advanced, as seen from here.
    pub last_heard: Duration,
    /// Its non-deleted keys and values, shared with every earlier view
    /// taken since the node last changed them.
    pub kv: Arc<NodeKeys>,
}

/// One node's keys and values, with what the catalog reads from them (its
/// node record, its service records, its ejection votes) parsed once, on
/// first use: a view taken while the node changed nothing costs no parsing.
/// Derefs to the map; changing it through [`DerefMut`] drops what was
/// parsed.
#[derive(Debug, Default)]
pub struct NodeKeys {
    map: BTreeMap<String, String>,
    parsed: OnceLock<Parsed>,
}

#[derive(Debug, Default)]
pub(crate) struct Parsed {
    pub(crate) info: Option<NodeInfo>,
    /// `svc/<id>` records that pass a local registration's rules and whose
    /// id matches their key, with the
    /// health their owner concluded (`health/<id>`, in the same keys).
    pub(crate) records: Vec<(ServiceRecord, Health)>,
    /// `eject/<owner>/<id>` votes, as (owner, id).
    pub(crate) votes: Vec<(String, String)>,
    /// `zone/<zone>/<service>` offers a bridge wrote, as (zone, service,
    /// offer).
    pub(crate) offers: Vec<(String, String, ZoneOffer)>,
}

impl NodeKeys {
    /// The `zone/<zone>/<service>` offers among these keys, as (zone,
    /// service, offer), parsed once.
    pub fn offers(&self) -> &[(String, String, ZoneOffer)] {
        &self.parsed().offers
    }

    pub(crate) fn parsed(&self) -> &Parsed {
        self.parsed.get_or_init(|| {
            let mut parsed = Parsed {
                info: self
                    .map
                    .get("node")
                    .and_then(|raw| serde_json::from_str::<NodeInfo>(raw).ok()),
                ..Parsed::default()
            };
            // A node that writes a schema this build cannot read is a
            // member, but none of its records is believed.
            if parsed
                .info
                .as_ref()
                .is_some_and(|i| !reads_schema(i.schema))
            {
                return parsed;
            }
            for (raw_key, value) in &self.map {
                match Key::decode(raw_key) {
                    Some(Key::Svc(id)) => {
                        if let Some(record) = parse_gossiped(value, &id) {
                            let health = instance_health(&self.map, &record);
                            parsed.records.push((record, health));
                        }
                    }
                    Some(Key::Eject { node, id }) => parsed.votes.push((node, id)),
                    Some(Key::Zone { zone, service }) => {
                        if let Ok(offer) = serde_json::from_str::<ZoneOffer>(value) {
                            parsed.offers.push((zone, service, offer));
                        }
                    }
                    _ => {}
                }
            }
            parsed
        })
    }
}

impl Clone for NodeKeys {
    fn clone(&self) -> Self {
        NodeKeys::from(self.map.clone())
    }
}

impl PartialEq for NodeKeys {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl From<BTreeMap<String, String>> for NodeKeys {
    fn from(map: BTreeMap<String, String>) -> Self {
        NodeKeys {
            map,
            parsed: OnceLock::new(),
        }
    }
}

impl FromIterator<(String, String)> for NodeKeys {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Self {
        NodeKeys::from(iter.into_iter().collect::<BTreeMap<_, _>>())
    }
}

impl Deref for NodeKeys {
    type Target = BTreeMap<String, String>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl DerefMut for NodeKeys {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.parsed = OnceLock::new();
        &mut self.map
    }
}

/// Everything a node knows about the cluster at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    /// Name of the node that took the view.
    pub self_name: String,
    /// All node incarnations chitchat knows.
    pub nodes: Vec<NodeSnapshot>,
    /// How long without a heartbeat makes a live node `suspect`.
    pub suspect_after: Duration,
}

/// Membership state as shown to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heard from recently.
    Alive,
    /// Still counted live, but silent for several gossip rounds.
    Suspect,
    /// Declared dead by the failure detector.
    Dead,
    /// Shutting down: finishing its in-flight requests; its instances are
    /// no longer picked.
    Draining,
    /// Left on purpose (graceful shutdown).
    Left,
}

impl MemberState {
    /// The lowercase name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Draining => "draining",
            MemberState::Left => "left",
        }
    }
}

/// A member of the cluster, as `GET /v1/members` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Gossip address.
    pub gossip_addr: String,
    /// Tunnel address, once the node announced it (and it parses).
    pub tunnel_addr: Option<SocketAddr>,
    /// Admin address, once the node announced it.
    pub admin_addr: Option<String>,
    /// Membership state.
    pub state: MemberState,
    /// Milliseconds since its heartbeat last advanced.
    pub last_heard_ms: u64,
    /// weft version it runs.
    pub version: Option<String>,
    /// Incarnation (start time in ms): a restarted node has a new one.
    pub generation: u64,
    /// Its zone, when it was started in one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// It bridges its zone to the others.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub bridge: bool,
}

impl ClusterView {
    /// The newest incarnation of every node name.
    pub(crate) fn current_incarnations(&self) -> impl Iterator<Item = &NodeSnapshot> {
        let mut newest: BTreeMap<&str, &NodeSnapshot> = BTreeMap::new();
        for node in &self.nodes {
            let replace = match newest.get(node.name.as_str()) {
                None => true,
                Some(prev) => (node.generation, node.live) > (prev.generation, prev.live),
            };
            if replace {
                newest.insert(&node.name, node);
            }
        }
        newest.into_values()
    }

    /// Members with their user-facing state.
    pub fn members(&self) -> Vec<Member> {
        self.current_incarnations()
            .map(|node| {
                let info = node_info(node);
                let state = member_state(node, info, self.suspect_after);
                Member {
                    name: node.name.clone(),
                    gossip_addr: node.gossip_addr.to_string(),
                    tunnel_addr: info.and_then(NodeInfo::tunnel_addr),
                    admin_addr: info.map(|i| i.admin.clone()),
                    state,
                    last_heard_ms: if node.name == self.self_name {
                        0
                    } else {
                        node.last_heard.as_millis() as u64
                    },
                    version: info.map(|i| i.version.clone()),
                    generation: node.generation,
                    zone: info.and_then(|i| i.zone.clone()),
                    bridge: info.is_some_and(|i| i.bridge),
                }
            })
            .collect()
    }

    /// The catalog: instances registered on live, non-leaving nodes
    /// (derived whole; a [`CatalogDeriver`] kept across views derives only
    /// what changed).
    pub fn catalog(&self) -> Catalog {
        CatalogDeriver::default()
            .derive(self, None)
            .as_ref()
            .clone()
    }
}

fn node_info(node: &NodeSnapshot) -> Option<&NodeInfo> {
    node.kv.parsed().info.as_ref()
}

pub(crate) fn member_state(
    node: &NodeSnapshot,
    info: Option<&NodeInfo>,
    suspect_after: Duration,
) -> MemberState {
    match info.map(|i| i.status) {
        Some(NodeStatus::Left) => MemberState::Left,
        _ if node.dead || !node.live => MemberState::Dead,
        Some(NodeStatus::Draining) => MemberState::Draining,
        _ if node.last_heard > suspect_after => MemberState::Suspect,
        _ => MemberState::Alive,
    }
}

/// Health of an instance from its owner's own conclusion (`health/<id>`).
fn instance_health(keys: &BTreeMap<String, String>, record: &ServiceRecord) -> Health {
    match keys
        .get(&Key::Health(record.id.clone()).encode())
        .map(String::as_str)
    {
        Some("passing") => Health::Passing,
        Some("failing") => Health::Failing,
        _ if record.check.is_none() => Health::Passing,
        _ => Health::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Protocol;

    fn node(name: &str, generation: u64, live: bool, svcs: &[(&str, &str, u16)]) -> NodeSnapshot {
        let mut kv = BTreeMap::new();
        let info = NodeInfo {
            schema: crate::records::SCHEMA,
            tunnel: "127.0.0.1:7947".into(),
            admin: "127.0.0.1:9646".into(),
            version: "0.1.0".into(),
            status: NodeStatus::Alive,
            zone: None,
            bridge: false,
        };
        kv.insert("node".to_string(), serde_json::to_string(&info).unwrap());
        for (svc, id, port) in svcs {
            let rec = ServiceRecord::new(svc, id, *port, Protocol::Http);
            kv.insert(format!("svc/{id}"), serde_json::to_string(&rec).unwrap());
        }
        NodeSnapshot {
            name: name.into(),
            generation,
            gossip_addr: "127.0.0.1:7946".parse().unwrap(),
            live,
            dead: !live,
            last_heard: Duration::from_millis(100),
            kv: Arc::new(kv.into()),
        }
    }

    fn view(nodes: Vec<NodeSnapshot>) -> ClusterView {
        ClusterView {
            self_name: "n1".into(),
            nodes,
            suspect_after: Duration::from_secs(1),
        }
    }

    #[test]
    fn new_node_adds_its_instances() {
        let before = view(vec![node("n1", 1, true, &[("web", "w1", 8080)])]);
        let after = view(vec![
            node("n1", 1, true, &[("web", "w1", 8080)]),
            node("n2", 1, true, &[("web", "w2", 8081), ("db", "d1", 5432)]),
        ]);
        let diff = diff(&before, &after);
        assert_eq!(diff.added.len(), 2);
        assert!(diff.removed.is_empty());
        assert_eq!(after.catalog().instances("web").len(), 2);
        assert_eq!(after.catalog().instances("db")[0].node, "n2");
    }

    /// What the router's deriver says moved from `before` to `after`.
    fn diff(before: &ClusterView, after: &ClusterView) -> CatalogDiff {
        let mut deriver = CatalogDeriver::default();
        deriver.update(before);
        deriver.update(after).1
    }

    fn vote(mut voter: NodeSnapshot, owner: &str, id: &str) -> NodeSnapshot {
        Arc::make_mut(&mut voter.kv).insert(format!("eject/{owner}/{id}"), "1".into());
        voter
    }

    fn key(service: &str, node: &str, id: &str) -> (String, String, String) {
        (service.into(), node.into(), id.into())
    }

    /// Fed views in turn, a deriver gives each view's whole catalog, shares
    /// the lists that did not move, and says what moved.
    #[test]
    fn the_deriver_redoes_only_what_moved() {
        let n1 = node("n1", 1, true, &[("web", "w1", 8080)]);
        let n2 = node("n2", 1, true, &[("db", "d1", 5432)]);
        let mut deriver = CatalogDeriver::default();
        let v0 = view(vec![n1.clone(), n2.clone()]);
        let (c0, diff) = deriver.update(&v0);
        assert_eq!(*c0, v0.catalog());
        assert_eq!(diff.added.len(), 2);

        // Only an age moved: the same catalog, and nothing to say.
        let mut aged = n2.clone();
        aged.last_heard = Duration::from_secs(9);
        let (c1, diff) = deriver.update(&view(vec![n1.clone(), aged]));
        assert!(Arc::ptr_eq(&c0, &c1) && diff.is_empty());

        // New keys that list the same instances (a stats key): the same.
        let mut restated = n2.clone();
        Arc::make_mut(&mut restated.kv).insert("stats/db".into(), "{}".into());
        let (c2, diff) = deriver.update(&view(vec![n1.clone(), restated]));
        assert!(Arc::ptr_eq(&c0, &c2) && diff.is_empty());

        // n2 registers another db: db is rebuilt, web's list is shared.
        let n2 = node("n2", 1, true, &[("db", "d1", 5432), ("db", "d2", 5433)]);
        let v3 = view(vec![n1.clone(), n2.clone()]);
        let (c3, diff) = deriver.update(&v3);
        assert_eq!(*c3, v3.catalog());
        assert!(Arc::ptr_eq(&c0.services["web"], &c3.services["web"]));
        assert_eq!(diff.added, vec![key("db", "n2", "d2")]);

        // Two observers vote n1's w1 out: it changes though n1's keys did not.
        let n3 = vote(node("n3", 1, true, &[]), "n1", "w1");
        let n4 = vote(node("n4", 1, true, &[]), "n1", "w1");
        let v4 = view(vec![n1.clone(), n2.clone(), n3, n4]);
        let (c4, diff) = deriver.update(&v4);
        assert_eq!(*c4, v4.catalog());
        assert_eq!(c4.instances("web")[0].health, Health::Ejected);
        assert_eq!(diff.changed, vec![key("web", "n1", "w1")]);
        assert!(Arc::ptr_eq(&c3.services["db"], &c4.services["db"]));

        // n2 dies and the voters leave the view: db goes, w1 is back.
        let mut dead = n2;
        (dead.live, dead.dead) = (false, true);
        let v5 = view(vec![n1, dead]);
        let (c5, diff) = deriver.update(&v5);
        assert_eq!(*c5, v5.catalog());
        assert!(!c5.services.contains_key("db"));
        assert_eq!(
            diff.removed,
            vec![key("db", "n2", "d1"), key("db", "n2", "d2")]
        );
        assert_eq!(diff.changed, vec![key("web", "n1", "w1")]);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Whatever sequence of views it is fed, the deriver's catalog is
        /// the one derived whole from the latest view.
        #[test]
        fn the_deriver_agrees_with_a_whole_derivation(
            steps in proptest::collection::vec(
                proptest::collection::vec((0u8..4, 0u8..2, proptest::bool::ANY, 0u8..2), 2..8),
                1..12,
            )
        ) {
            let mut deriver = CatalogDeriver::default();
            // A node state seen again is the same snapshot (shared keys),
            // as chitchat's unchanged nodes are from view to view.
            let mut known = std::collections::HashMap::new();
            for step in steps {
                // (node, service, live, vote target) per entry.
                let nodes: Vec<NodeSnapshot> = step
                    .iter()
                    .map(|&(n, svc, live, target)| {
                        known
                            .entry((n, svc, live, target))
                            .or_insert_with(|| {
                                let (name, service) = (format!("n{n}"), format!("s{svc}"));
                                let id = format!("i{n}{svc}");
                                let snap = node(&name, 1, live, &[(&service, &id, 8000)]);
                                vote(snap, &format!("n{target}"), &format!("i{target}0"))
                            })
                            .clone()
                    })
                    .collect();
                let v = view(nodes);
                let (catalog, _) = deriver.update(&v);
                proptest::prop_assert_eq!(&*catalog, &v.catalog());
            }
        }
    }

    #[test]
    fn dead_node_instances_leave_the_catalog() {
        let before = view(vec![
            node("n1", 1, true, &[("web", "w1", 8080)]),
            node("n2", 1, true, &[("web", "w2", 8081)]),
        ]);
        let after = view(vec![
            node("n1", 1, true, &[("web", "w1", 8080)]),
            node("n2", 1, false, &[("web", "w2", 8081)]),
        ]);
        let diff = diff(&before, &after);
        assert_eq!(diff.removed, vec![("web".into(), "n2".into(), "w2".into())]);
        let members = after.members();
        assert_eq!(members[1].state, MemberState::Dead);
    }

    #[test]
    fn deleted_key_removes_instance() {
        let before = view(vec![node(
            "n1",
            1,
            true,
            &[("web", "w1", 8080), ("web", "w2", 8081)],
        )]);
        let after = view(vec![node("n1", 1, true, &[("web", "w1", 8080)])]);
        let diff = diff(&before, &after);
        assert_eq!(diff.removed, vec![("web".into(), "n1".into(), "w2".into())]);
        assert!(diff.added.is_empty());
    }

    #[test]
    fn replaced_registration_is_a_change() {
        let before = view(vec![node("n1", 1, true, &[("web", "w1", 8080)])]);
        let after = view(vec![node("n1", 1, true, &[("web", "w1", 9090)])]);
        let diff = diff(&before, &after);
        assert_eq!(diff.changed, vec![("web".into(), "n1".into(), "w1".into())]);
        assert_eq!(after.catalog().instances("web")[0].port, 9090);
    }

    #[test]
    fn restarted_node_newest_generation_wins() {
        let v = view(vec![
            node("n2", 1, false, &[("web", "old", 8080)]),
            node("n2", 2, true, &[("web", "new", 8080)]),
        ]);
        let cat = v.catalog();
        assert_eq!(cat.instances("web").len(), 1);
        assert_eq!(cat.instances("web")[0].id, "new");
        assert_eq!(v.members().len(), 1);
        assert_eq!(v.members()[0].state, MemberState::Alive);
    }

    #[test]
    fn left_node_is_left_and_serves_nothing() {
        let mut n2 = node("n2", 1, true, &[("web", "w2", 8081)]);
        let mut info: NodeInfo = serde_json::from_str(&n2.kv["node"]).unwrap();
        info.status = NodeStatus::Left;
        Arc::make_mut(&mut n2.kv).insert("node".into(), serde_json::to_string(&info).unwrap());
        let v = view(vec![node("n1", 1, true, &[]), n2]);
        assert!(v.catalog().instances("web").is_empty());
        assert_eq!(v.members()[1].state, MemberState::Left);
    }

    #[test]
    fn silent_live_node_is_suspect() {
        let mut n2 = node("n2", 1, true, &[]);
        n2.last_heard = Duration::from_secs(5);
        let v = view(vec![node("n1", 1, true, &[]), n2]);
        assert_eq!(v.members()[1].state, MemberState::Suspect);
    }

    #[test]
    fn ejection_needs_two_observers() {
        let mut n2 = node("n2", 1, true, &[]);
        Arc::make_mut(&mut n2.kv).insert("eject/n1/w1".into(), "1".into());
        let v = view(vec![
            node("n1", 1, true, &[("web", "w1", 8080)]),
            n2.clone(),
        ]);
        assert_eq!(v.catalog().instances("web")[0].health, Health::Passing);
        let mut n3 = node("n3", 1, true, &[]);
        Arc::make_mut(&mut n3.kv).insert("eject/n1/w1".into(), "1".into());
        let v = view(vec![
            node("n1", 1, true, &[("web", "w1", 8080)]),
            n2.clone(),
            n3.clone(),
        ]);
        assert_eq!(v.catalog().instances("web")[0].health, Health::Ejected);
        // A dead observer's vote does not count.
        n3.live = false;
        let v = view(vec![node("n1", 1, true, &[("web", "w1", 8080)]), n2, n3]);
        assert_eq!(v.catalog().instances("web")[0].health, Health::Passing);
    }

    #[test]
    fn a_vote_never_touches_the_voter_s_own_instance_of_the_same_id() {
        // n2 hosts its own w1 and votes against n1's w1: its vote is its own
        // `eject/n1/w1` key, so its instance keeps the health its checker wrote.
        let mut n2 = node("n2", 1, true, &[("web", "w1", 9090)]);
        Arc::make_mut(&mut n2.kv).insert("health/w1".into(), "passing".into());
        Arc::make_mut(&mut n2.kv).insert("eject/n1/w1".into(), "1".into());
        let mut n3 = node("n3", 1, true, &[]);
        Arc::make_mut(&mut n3.kv).insert("eject/n1/w1".into(), "1".into());
        let v = view(vec![node("n1", 1, true, &[("web", "w1", 8080)]), n2, n3]);
        let catalog = v.catalog();
        let health: Vec<(&str, Health)> = catalog
            .instances("web")
            .iter()
            .map(|i| (i.node.as_str(), i.health))
            .collect();
        assert!(health.contains(&("n1", Health::Ejected)), "{health:?}");
        assert!(health.contains(&("n2", Health::Passing)), "{health:?}");
    }

    #[test]
    fn keys_are_parsed_once_and_again_after_a_change() {
        let mut n1 = node("n1", 1, true, &[("web", "w1", 8080)]);
        let shared = n1.clone();
        assert_eq!(view(vec![n1.clone()]).catalog().instances("web").len(), 1);
        // A later view of the unchanged node shares the parsed keys.
        assert!(Arc::ptr_eq(&shared.kv, &n1.kv));
        // Changing the keys drops what was parsed: the new record counts.
        let rec = r#"{"name":"web","id":"w2","port":8081}"#;
        Arc::make_mut(&mut n1.kv).insert("svc/w2".into(), rec.into());
        assert_eq!(view(vec![n1]).catalog().instances("web").len(), 2);
        assert_eq!(view(vec![shared]).catalog().instances("web").len(), 1);
    }

    #[test]
    fn malformed_records_are_skipped() {
        let mut n1 = node("n1", 1, true, &[("web", "w1", 8080)]);
        Arc::make_mut(&mut n1.kv).insert("svc/bad".into(), "{not json".into());
        Arc::make_mut(&mut n1.kv).insert(
            "svc/w9".into(),
            r#"{"name":"web","id":"other","port":1}"#.into(),
        );
        let v = view(vec![n1]);
        assert_eq!(v.catalog().instances("web").len(), 1);
    }

    #[test]
    fn a_node_of_an_unreadable_schema_is_a_member_without_records() {
        let mut newer = node("n9", 1, true, &[("web", "w9", 8080)]);
        let mut info: NodeInfo = serde_json::from_str(&newer.kv["node"]).unwrap();
        info.schema = crate::records::SCHEMA + 2;
        Arc::make_mut(&mut newer.kv).insert("node".into(), serde_json::to_string(&info).unwrap());
        let parsed = newer.kv.parsed();
        assert!(parsed.info.is_some(), "still a member");
        assert!(parsed.records.is_empty(), "its records are not believed");
        // A record without the field is schema 1, as nodes before it wrote.
        let old = r#"{"tunnel":"a:1","admin":"a:2","version":"0.1.0","status":"alive"}"#;
        assert_eq!(serde_json::from_str::<NodeInfo>(old).unwrap().schema, 1);
    }
}
