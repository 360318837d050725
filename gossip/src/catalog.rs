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
use std::sync::Arc;

use serde::Serialize;

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
    /// "http" or "tcp".
    pub protocol: String,
    /// "passing", "failing", "unknown" or "ejected".
    pub health: String,
    /// Tags given at registration.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The hosting node's tunnel address.
    #[serde(skip)]
    pub tunnel_addr: Option<String>,
    /// Request timeout override (ms).
    #[serde(skip)]
    pub timeout_ms: Option<u64>,
    /// Retry wait policy override.
    #[serde(skip)]
    pub retry: Option<String>,
    /// Non-idempotent methods may be retried.
    #[serde(skip)]
    pub retry_non_idempotent: bool,
    /// Idempotent requests are hedged.
    #[serde(skip)]
    pub hedge: bool,
}

/// Service name -> instances, ordered for stable output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Catalog {
    /// Instances per service, sorted; a service's list is shared with the
    /// catalogs before it until one of its instances changes.
    #[serde(serialize_with = "shared_lists")]
    pub services: BTreeMap<String, Arc<[Instance]>>,
}

fn shared_lists<S: serde::Serializer>(
    services: &BTreeMap<String, Arc<[Instance]>>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_map(services.iter().map(|(name, list)| (name, &**list)))
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
    pub fn instances(&self, service: &str) -> &[Instance] {
        self.services.get(service).map_or(&[], |list| list)
    }

    /// What moved from `old` to `self`.
    pub fn diff(&self, old: &Catalog) -> CatalogDiff {
        let index = |c: &Catalog| -> BTreeMap<(String, String, String), Instance> {
            c.services
                .iter()
                .flat_map(|(svc, list)| {
                    list.iter()
                        .map(move |i| ((svc.clone(), i.node.clone(), i.id.clone()), i.clone()))
                })
                .collect()
        };
        let (new, old) = (index(self), index(old));
        let keys: BTreeSet<_> = new.keys().chain(old.keys()).cloned().collect();
        let mut diff = CatalogDiff::default();
        for key in keys {
            match (old.get(&key), new.get(&key)) {
                (None, Some(_)) => diff.added.push(key),
                (Some(_), None) => diff.removed.push(key),
                (Some(a), Some(b)) if a != b => diff.changed.push(key),
                _ => {}
            }
        }
        diff
    }
}

/// Derives catalogs from successive views, redoing only what changed.
#[derive(Debug, Default)]
pub struct CatalogDeriver {
    nodes: BTreeMap<String, Contribution>,
    catalog: Arc<Catalog>,
}

/// One node's part of the catalog and what it was derived from.
#[derive(Debug)]
struct Contribution {
    inputs: Inputs,
    /// Its instances per service, in catalog order.
    services: BTreeMap<String, Vec<Instance>>,
}

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
    fn instances(&self, node: &str) -> BTreeMap<String, Vec<Instance>> {
        let mut services: BTreeMap<String, Vec<Instance>> = BTreeMap::new();
        if !self.serving {
            return services;
        }
        let parsed = self.keys.parsed();
        let tunnel_addr = parsed.info.as_ref().map(|i| i.tunnel.clone());
        for (record, own_health) in &parsed.records {
            let votes = self
                .votes
                .iter()
                .find(|(id, _)| *id == record.id)
                .map_or(0, |(_, n)| *n);
            let health = if votes >= 2 && *own_health != "failing" {
                "ejected"
            } else {
                own_health
            };
            services
                .entry(record.name.clone())
                .or_default()
                .push(Instance {
                    id: record.id.clone(),
                    node: node.to_string(),
                    port: record.port,
                    protocol: record.protocol.as_str().to_string(),
                    health: health.to_string(),
                    tags: record.tags.clone(),
                    tunnel_addr: tunnel_addr.clone(),
                    timeout_ms: record.timeout_ms,
                    retry: record.retry.clone(),
                    retry_non_idempotent: record.retry_non_idempotent,
                    hedge: record.hedge,
                });
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
        let votes = votes(view);
        let mut diff = CatalogDiff::default();
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
            let services = inputs.instances(&node.name);
            let before = self.nodes.remove(&node.name).map(|c| c.services);
            let before = before.unwrap_or_default();
            compare(&before, &services, &mut diff, &mut dirty);
            self.nodes
                .insert(node.name.clone(), Contribution { inputs, services });
        }
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|name| !present.contains(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(c) = self.nodes.remove(&name) {
                compare(&c.services, &BTreeMap::new(), &mut diff, &mut dirty);
            }
        }
        if !dirty.is_empty() {
            self.catalog = Arc::new(self.rebuilt(dirty));
        }
        (Arc::clone(&self.catalog), diff)
    }

    /// The current catalog with the `dirty` services' lists made again
    /// from every node's part; the other lists are shared.
    fn rebuilt(&self, dirty: BTreeSet<String>) -> Catalog {
        let mut services = self.catalog.services.clone();
        for service in dirty {
            let mut list: Vec<Instance> = self
                .nodes
                .values()
                .filter_map(|c| c.services.get(&service))
                .flatten()
                .cloned()
                .collect();
            if list.is_empty() {
                services.remove(&service);
            } else {
                list.sort();
                services.insert(service, list.into());
            }
        }
        Catalog { services }
    }
}

/// Adds what moved between one node's parts `before` and `after` to
/// `diff`, and the services whose instances moved to `dirty`.
fn compare(
    before: &BTreeMap<String, Vec<Instance>>,
    after: &BTreeMap<String, Vec<Instance>>,
    diff: &mut CatalogDiff,
    dirty: &mut BTreeSet<String>,
) {
    let names: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for service in names {
        let (old, new) = (
            before.get(service).map_or(&[][..], Vec::as_slice),
            after.get(service).map_or(&[][..], Vec::as_slice),
        );
        if old == new {
            continue;
        }
        dirty.insert(service.clone());
        let key = |i: &Instance| (service.clone(), i.node.clone(), i.id.clone());
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
}
