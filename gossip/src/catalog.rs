//! The service catalog, and its derivation from gossip views at the cost
//! of what changed.
//!
//! chitchat fires no event when a key is deleted, so the catalog is never
//! maintained from events: it is derived from each new [`ClusterView`]. A
//! [`CatalogDeriver`] kept across views remembers each node's part of the
//! catalog with the inputs it came from (the node's keys, which views share
//! until the node changes them, whether it serves, and the ejection votes
//! about its instances). A new view costs a comparison per node; only the
//! nodes whose inputs moved are derived again, only the services whose
//! instances they changed are rebuilt, and every other service's list is
//! shared with the previous catalog. [`CatalogDeriver::update`] also says
//! what moved, from the changed nodes alone.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::records::{Health, NodeInfo, Protocol, RetryPolicy};
use crate::view::{member_state, ClusterView, MemberState, NodeKeys, NodeSnapshot};

/// One instance of a service, as the catalog lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, PartialOrd, Ord)]
pub struct Instance {
    /// Instance id.
    pub id: String,
    /// Node hosting it.
    pub node: String,
    /// Port on that node's loopback.
    pub port: u16,
    /// What it speaks.
    pub protocol: Protocol,
    /// Its health, as routing sees it.
    pub health: Health,
    /// Tags given at registration.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The hosting node's tunnel address (parsed once per change of the
    /// node's keys).
    #[serde(skip)]
    pub tunnel_addr: Option<SocketAddr>,
    /// Request timeout override (ms).
    #[serde(skip)]
    pub timeout_ms: Option<u64>,
    /// Retry wait policy override.
    #[serde(skip)]
    pub retry: Option<RetryPolicy>,
    /// Non-idempotent methods may be retried.
    #[serde(skip)]
    pub retry_non_idempotent: bool,
    /// Idempotent requests are hedged.
    #[serde(skip)]
    pub hedge: bool,
    /// Callers learn and share a limit on the service's requests in flight.
    #[serde(skip)]
    pub adaptive_concurrency: bool,
}

/// Service name -> instances, ordered for stable output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Catalog {
    /// Instances per service, sorted; a service's list is shared with the
    /// catalogs before it until one of its instances changes.
    #[serde(serialize_with = "shared_lists")]
    pub services: BTreeMap<String, Instances>,
}

/// One service's instances, sorted. The list and each instance in it are
/// shared: with earlier catalogs while they do not change, and with the
/// data plane's endpoints.
pub type Instances = Arc<[Arc<Instance>]>;

fn shared_lists<S: serde::Serializer>(
    services: &BTreeMap<String, Instances>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    struct List<'a>(&'a [Arc<Instance>]);
    impl Serialize for List<'_> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.collect_seq(self.0.iter().map(|i| &**i))
        }
    }
    serializer.collect_map(services.iter().map(|(name, list)| (name, List(list))))
}

/// What changed between two catalogs, for logs and events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CatalogDiff {
    /// (service, node, id) that appeared.
    pub added: Vec<(String, String, String)>,
    /// (service, node, id) that disappeared.
    pub removed: Vec<(String, String, String)>,
    /// (service, node, id) whose record changed.
    pub changed: Vec<(String, String, String)>,
}

impl CatalogDiff {
    /// True when nothing moved.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl Catalog {
    /// Instances of one service.
    pub fn instances(&self, service: &str) -> &[Arc<Instance>] {
        self.services.get(service).map_or(&[], |list| list)
    }
}

/// Derives catalogs from successive views, redoing only what changed.
#[derive(Debug, Default)]
pub struct CatalogDeriver {
    /// Each node's inputs, and the services it has instances of.
    nodes: BTreeMap<String, Known>,
    /// Service -> node -> that node's instances of it, sorted.
    parts: BTreeMap<String, BTreeMap<String, Vec<Arc<Instance>>>>,
    catalog: Arc<Catalog>,
    /// What the last view said of each node. A view that says the same
    /// (every view at rest) is answered without looking further.
    last: Vec<Seen>,
}

/// What a view says of one node that the catalog reads without parsing.
#[derive(Debug)]
struct Seen {
    /// Held, so compared by identity: no other keys can take its address.
    keys: Arc<NodeKeys>,
    generation: u64,
    live: bool,
    dead: bool,
}

impl Seen {
    fn of(node: &NodeSnapshot) -> Seen {
        Seen {
            keys: Arc::clone(&node.kv),
            generation: node.generation,
            live: node.live,
            dead: node.dead,
        }
    }

    fn still(&self, node: &NodeSnapshot) -> bool {
        Arc::ptr_eq(&self.keys, &node.kv)
            && (self.generation, self.live, self.dead) == (node.generation, node.live, node.dead)
    }
}

/// What the deriver knows of one node.
#[derive(Debug)]
struct Known {
    inputs: Inputs,
    services: Vec<String>,
}

/// One node's instances per service.
type Part = BTreeMap<String, Vec<Arc<Instance>>>;

/// Everything a node's part of the catalog depends on.
#[derive(Debug)]
struct Inputs {
    /// Compared by identity: views share a node's keys until they change.
    keys: Arc<NodeKeys>,
    generation: u64,
    /// Live and neither left, dead nor draining.
    serving: bool,
    /// (instance id, other live nodes voting to eject it), for the node's
    /// instances that have votes.
    votes: Vec<(String, usize)>,
}

impl PartialEq for Inputs {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.keys, &other.keys)
            && self.generation == other.generation
            && self.serving == other.serving
            && self.votes == other.votes
    }
}

/// Observers of each (owner, instance id): the other live nodes whose
/// outlier detectors wrote `eject/<owner>/<id>`.
type Votes<'a> = BTreeMap<(&'a str, &'a str), usize>;

fn votes(view: &ClusterView) -> Votes<'_> {
    let mut observers = Votes::new();
    for node in view.current_incarnations().filter(|n| n.live) {
        for (owner, id) in &node.kv.parsed().votes {
            if *owner != node.name {
                *observers.entry((owner, id)).or_default() += 1;
            }
        }
    }
    observers
}

impl Inputs {
    fn of(node: &NodeSnapshot, view: &ClusterView, votes: &Votes<'_>) -> Inputs {
        let info = node.kv.parsed().info.as_ref();
        let serving = node.live
            && !matches!(
                member_state(node, info, view.suspect_after),
                MemberState::Left | MemberState::Dead | MemberState::Draining
            );
        let name = node.name.as_str();
        let votes = votes
            .range((name, "")..)
            .take_while(|((owner, _), _)| *owner == name)
            .map(|((_, id), n)| (id.to_string(), *n))
            .collect();
        Inputs {
            keys: Arc::clone(&node.kv),
            generation: node.generation,
            serving,
            votes,
        }
    }

    /// The node's instances per service.
    ///
    /// An instance is `ejected` cluster-wide only when two or more other
    /// live nodes' outlier detectors say so, so one sick or partitioned
    /// caller cannot take it out of the whole mesh.
    fn instances(&self, node: &str) -> Part {
        let mut services = Part::new();
        if !self.serving {
            return services;
        }
        let parsed = self.keys.parsed();
        let tunnel_addr = parsed.info.as_ref().and_then(NodeInfo::tunnel_addr);
        for (record, own_health) in &parsed.records {
            let votes = self
                .votes
                .iter()
                .find(|(id, _)| *id == record.id)
                .map_or(0, |(_, n)| *n);
            let health = if votes >= 2 && *own_health != Health::Failing {
                Health::Ejected
            } else {
                *own_health
            };
            services
                .entry(record.name.clone())
                .or_default()
                .push(Arc::new(Instance {
                    id: record.id.clone(),
                    node: node.to_string(),
                    port: record.port,
                    protocol: record.protocol,
                    health,
                    tags: record.tags.clone(),
                    tunnel_addr,
                    timeout_ms: record.timeout_ms,
                    retry: record.retry.as_deref().and_then(RetryPolicy::parse),
                    retry_non_idempotent: record.retry_non_idempotent,
                    hedge: record.hedge,
                    adaptive_concurrency: record.concurrency.is_some(),
                }));
        }
        for list in services.values_mut() {
            list.sort();
        }
        services
    }
}

impl CatalogDeriver {
    /// The catalog of `view` and what moved since the previous call (the
    /// same `Arc` when nothing did).
    pub fn update(&mut self, view: &ClusterView) -> (Arc<Catalog>, CatalogDiff) {
        let mut diff = CatalogDiff::default();
        let catalog = self.derive(view, Some(&mut diff));
        (catalog, diff)
    }

    /// [`CatalogDeriver::update`], saying what moved only into `diff`.
    pub(crate) fn derive(
        &mut self,
        view: &ClusterView,
        mut diff: Option<&mut CatalogDiff>,
    ) -> Arc<Catalog> {
        let unmoved = self.last.len() == view.nodes.len()
            && self
                .last
                .iter()
                .zip(&view.nodes)
                .all(|(seen, node)| seen.still(node));
        if unmoved {
            return Arc::clone(&self.catalog);
        }
        self.last = view.nodes.iter().map(Seen::of).collect();
        let votes = votes(view);
        let mut dirty = BTreeSet::new();
        let mut present = BTreeSet::new();
        for node in view.current_incarnations() {
            present.insert(node.name.as_str());
            let inputs = Inputs::of(node, view, &votes);
            if self
                .nodes
                .get(&node.name)
                .is_some_and(|known| known.inputs == inputs)
            {
                continue;
            }
            let part = inputs.instances(&node.name);
            let services = self.replace(&node.name, part, diff.as_deref_mut(), &mut dirty);
            self.nodes
                .insert(node.name.clone(), Known { inputs, services });
        }
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|name| !present.contains(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.replace(&name, Part::new(), diff.as_deref_mut(), &mut dirty);
            self.nodes.remove(&name);
        }
        if !dirty.is_empty() {
            self.catalog = Arc::new(self.rebuilt(dirty));
        }
        Arc::clone(&self.catalog)
    }

    /// Makes `part` `node`'s part of the catalog, adding what moved to
    /// `diff` and the services whose instances moved to `dirty`; returns
    /// the services it has instances of.
    fn replace(
        &mut self,
        node: &str,
        part: Part,
        mut diff: Option<&mut CatalogDiff>,
        dirty: &mut BTreeSet<String>,
    ) -> Vec<String> {
        let before = self
            .nodes
            .get(node)
            .map_or(&[][..], |known| known.services.as_slice());
        for service in before.iter().filter(|s| !part.contains_key(*s)) {
            let Some(nodes) = self.parts.get_mut(service) else {
                continue;
            };
            if let Some(old) = nodes.remove(node) {
                if let Some(diff) = diff.as_deref_mut() {
                    compare(service, &old, &[], diff);
                }
                mark(dirty, service);
            }
            if nodes.is_empty() {
                self.parts.remove(service);
            }
        }
        let mut has = Vec::with_capacity(part.len());
        for (service, new) in part {
            if !self.parts.contains_key(&service) {
                self.parts.insert(service.clone(), BTreeMap::new());
            }
            let nodes = self.parts.get_mut(&service).expect("inserted above");
            let old = nodes.get_mut(node);
            if old.as_deref() != Some(&new) {
                if let Some(diff) = diff.as_deref_mut() {
                    compare(
                        &service,
                        old.as_deref().map_or(&[][..], Vec::as_slice),
                        &new,
                        diff,
                    );
                }
                mark(dirty, &service);
                match old {
                    Some(slot) => *slot = new,
                    None => {
                        nodes.insert(node.to_string(), new);
                    }
                }
            }
            has.push(service);
        }
        has
    }

    /// The current catalog with the `dirty` services' lists made again
    /// from every node's part; the other lists are shared.
    fn rebuilt(&self, dirty: BTreeSet<String>) -> Catalog {
        let mut services = self.catalog.services.clone();
        for service in dirty {
            match self.parts.get(&service) {
                None => {
                    services.remove(&service);
                }
                Some(nodes) => {
                    let mut list: Vec<Arc<Instance>> = nodes.values().flatten().cloned().collect();
                    list.sort();
                    services.insert(service, list.into());
                }
            }
        }
        Catalog { services }
    }
}

/// Notes that `service`'s list must be made again.
fn mark(dirty: &mut BTreeSet<String>, service: &str) {
    if !dirty.contains(service) {
        dirty.insert(service.to_string());
    }
}

/// Adds what moved in `service` between one node's instances `old` and
/// `new` to `diff`.
fn compare(service: &str, old: &[Arc<Instance>], new: &[Arc<Instance>], diff: &mut CatalogDiff) {
    let key = |i: &Instance| (service.to_string(), i.node.clone(), i.id.clone());
    for i in new {
        match old.iter().find(|o| o.id == i.id) {
            None => diff.added.push(key(i)),
            Some(o) if o != i => diff.changed.push(key(i)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|i| i.id == o.id) {
            diff.removed.push(key(o));
        }
    }
}
