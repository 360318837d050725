//! The Stats aggregator actor: consumes request outcomes in batches, keeps
//! per-service windows and outage episodes, gossips a compact summary once a
//! second under `stats/<service>`, merges every node's summaries, and
//! publishes the cluster view (including the learned retry delay) for readers.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use tokio::sync::{mpsc, watch};
use weft_gossip::{zones, ClusterView, Health, Key};

use crate::caller::Caller;
use crate::dataplane::tables::{EdgeStats, RouterHandle, ServiceStats, StatsHandle, StatsSnapshot};
use crate::gossip_writer::GossipWriter;
use crate::outcome::{Outcome, OutcomeClass, RequestMetrics};
use crate::policy::episodes::{EpisodeStats, EpisodeTracker};
use crate::policy::stats::{merge, merge_trusting, ServiceWindow, Summary};
use crate::supervision::{guard, Named};

struct Local {
    service: String,
    attempts: ServiceWindow,
    requests: ServiceWindow,
    episodes: EpisodeTracker,
    healthy: Option<bool>,
    /// This node's requests to the service, by caller.
    edges: HashMap<Caller, Edge>,
}

/// One caller's requests to one service from this node.
struct Edge {
    attempts: ServiceWindow,
    requests: ServiceWindow,
    metrics: RequestMetrics,
}

impl Edge {
    fn new(service: &str, caller: &Caller) -> Self {
        Edge {
            attempts: ServiceWindow::default(),
            requests: ServiceWindow::default(),
            metrics: RequestMetrics::new(service, caller.as_str(), "outbound"),
        }
    }

    /// The gossip value of the edge now; `None` once its window is empty.
    fn summary(&self, now: Instant) -> Option<String> {
        let attempts = self.attempts.snapshot(now);
        (attempts.requests > 0).then(|| {
            Summary::new(&attempts, &EpisodeStats::default())
                .with_effective(&self.requests.snapshot(now))
                .encode()
        })
    }
}

impl Local {
    fn new(service: &str) -> Self {
        Local {
            service: service.to_string(),
            attempts: ServiceWindow::default(),
            requests: ServiceWindow::default(),
            episodes: EpisodeTracker::default(),
            healthy: None,
            edges: HashMap::new(),
        }
    }
}

/// Owns the statistics; the only writer of `stats/<service>`.
pub struct StatsAggregator {
    node: String,
    handle: StatsHandle,
    writer: GossipWriter,
    views: watch::Receiver<Arc<ClusterView>>,
    router: RouterHandle,
    outcomes: Option<mpsc::Receiver<Outcome>>,
    local: HashMap<String, Local>,
    /// What this node last wrote under each of its `stats/` and `edge/` keys.
    published: HashMap<Key, String>,
}

impl StatsAggregator {
    /// An aggregator draining `outcomes`.
    pub fn new(
        node: String,
        handle: StatsHandle,
        writer: GossipWriter,
        views: watch::Receiver<Arc<ClusterView>>,
        router: RouterHandle,
        outcomes: mpsc::Receiver<Outcome>,
    ) -> Self {
        StatsAggregator {
            node,
            handle,
            writer,
            views,
            router,
            outcomes: Some(outcomes),
            local: HashMap::new(),
            published: HashMap::new(),
        }
    }

    fn record(&mut self, o: Outcome, now: Instant) {
        let success = o.class == OutcomeClass::Success;
        let local = self
            .local
            .entry(o.service)
            .or_insert_with_key(|service| Local::new(service));
        let edge = local
            .edges
            .entry(o.caller)
            .or_insert_with_key(|caller| Edge::new(&local.service, caller));
        edge.metrics.record(o.class, o.latency);
        if o.class == OutcomeClass::Denied {
            // The caller's failure, not the service's: its edge only.
            for window in [&mut edge.attempts, &mut edge.requests] {
                window.record(now, false, o.class.as_str(), o.latency);
            }
            return;
        }
        for window in [&mut local.attempts, &mut edge.attempts] {
            window.record(now, success, o.class.as_str(), o.latency);
            if o.attempt > 0 {
                window.record_retry(now);
            }
        }
        if o.last {
            for window in [&mut local.requests, &mut edge.requests] {
                window.record(now, success, o.class.as_str(), o.latency);
            }
        }
        local.episodes.on_outcome(now, success);
    }

    /// Health-check outages count as episodes too: a service with no routable
    /// instance is down until one returns.
    fn follow_health(&mut self, now: Instant) {
        let snap = self.router.load();
        for (service, instances) in &snap.catalog.services {
            let healthy = instances
                .iter()
                .any(|i| matches!(i.health, Health::Passing | Health::Unknown));
            let local = self
                .local
                .entry(service.clone())
                .or_insert_with(|| Local::new(service));
            if local.healthy != Some(healthy) {
                if local.healthy.is_some() {
                    local.episodes.on_health_change(now, healthy);
                }
                local.healthy = Some(healthy);
            }
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        self.follow_health(now);
        self.publish_own(now);
        self.merge_view(now);
    }

    /// Gossips this node's summaries: one per service it called or saw an
    /// outage of, and one per edge that carried requests in the window (an
    /// edge gone quiet is deleted). Unchanged values are not written again.
    fn publish_own(&mut self, now: Instant) {
        let mut values: Vec<(Key, Option<String>)> = Vec::new();
        for (service, local) in &self.local {
            let window = local.attempts.snapshot(now);
            let episodes = local.episodes.stats();
            if window.requests > 0 || episodes.samples > 0 {
                let value = Summary::new(&window, &episodes).encode();
                values.push((Key::Stats(service.clone()), Some(value)));
            }
            for (caller, edge) in &local.edges {
                let key = Key::Edge {
                    service: service.clone(),
                    caller: caller.as_str().to_string(),
                };
                values.push((key, edge.summary(now)));
            }
        }
        for (key, value) in values {
            match value {
                Some(value) if self.published.get(&key) != Some(&value) => {
                    self.writer.set(key.clone(), value.clone());
                    self.published.insert(key, value);
                }
                Some(_) => {}
                None => {
                    if self.published.remove(&key).is_some() {
                        self.writer.delete(key);
                    }
                }
            }
        }
    }

    /// Merges every live node's summaries, ours included, and publishes
    /// the snapshot readers see.
    fn merge_view(&mut self, now: Instant) {
        let view = self.views.borrow().clone();
        let own_zone = self.router.load().place.zone.clone();
        let mut by_service: BTreeMap<String, Vec<(String, Summary)>> = BTreeMap::new();
        let mut by_edge: BTreeMap<(String, String), Vec<(String, Summary)>> = BTreeMap::new();
        // Other zones' summaries, one per zone and service (each of the
        // zone's bridges copies the same one).
        let mut offered: BTreeMap<(String, String), Summary> = BTreeMap::new();
        for node in view.nodes.iter().filter(|n| n.live) {
            for (zone, service, offer) in node.kv.offers() {
                if Some(zone) == own_zone.as_ref() {
                    continue;
                }
                if let Some(summary) = offer.stats.as_deref().and_then(Summary::decode) {
                    // Merged under its gateway's id, which no node's name is.
                    offered.insert((service.clone(), zones::gateway_id(zone)), summary);
                }
            }
            for (k, v) in node.kv.iter() {
                let summaries = match Key::decode(k) {
                    Some(Key::Stats(service)) => by_service.entry(service).or_default(),
                    Some(Key::Edge { service, caller }) => {
                        by_edge.entry((caller, service)).or_default()
                    }
                    _ => continue,
                };
                if let Some(summary) = Summary::decode(v) {
                    summaries.push((node.name.clone(), summary));
                }
            }
        }
        let mut services = BTreeMap::new();
        let names: BTreeSet<&String> = by_service
            .keys()
            .chain(self.local.keys())
            .chain(offered.keys().map(|(service, _)| service))
            .collect();
        for name in names {
            let own = by_service.get(name).map_or(&[][..], Vec::as_slice);
            let zone = merge(own, Some(&self.node));
            let mut from_zones = offered
                .range((name.clone(), String::new())..)
                .take_while(|((service, _), _)| service == name)
                .map(|((_, source), summary)| (source.clone(), *summary))
                .peekable();
            let cluster = if from_zones.peek().is_none() {
                zone
            } else {
                let all: Vec<(String, Summary)> = own.iter().cloned().chain(from_zones).collect();
                merge_trusting(&all, |n| *n == self.node || zones::is_gateway(n))
            };
            let (local, effective, episode_start, explore) = self
                .local
                .get(name)
                .map(|l| {
                    (
                        l.attempts.snapshot(now),
                        l.requests.snapshot(now),
                        l.episodes.current_episode_start(),
                        l.episodes.explores(),
                    )
                })
                .unwrap_or_default();
            let stats = ServiceStats {
                cluster,
                zone,
                local,
                effective,
                episode_start,
                explore,
                retries: local.retries,
            };
            services.insert(name.clone(), stats);
        }
        let edges = by_edge
            .into_iter()
            .filter(|(_, summaries)| !summaries.is_empty())
            .map(|(edge, summaries)| {
                let stats = EdgeStats {
                    cluster: merge(&summaries, Some(&self.node)),
                    effective_success_rate: effective_success(&summaries),
                };
                (edge, stats)
            })
            .collect();
        self.handle.publish(StatsSnapshot { services, edges });
    }
}

/// The success the calling apps saw, over the summaries that report it,
/// weighted by their attempts.
fn effective_success<N>(summaries: &[(N, Summary)]) -> Option<f64> {
    let (mut weight, mut sum) = (0.0, 0.0);
    for (_, s) in summaries {
        if let Some(errors) = s.effective_error_rate {
            let w = s.requests.max(1) as f64;
            weight += w;
            sum += w * (1.0 - errors);
        }
    }
    (weight > 0.0).then(|| sum / weight)
}

impl Actor for StatsAggregator {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        tracing::debug!(node = %self.node, "stats aggregator started");
        if let Some(mut rx) = self.outcomes.take() {
            let addr = ctx.address();
            tokio::spawn(async move {
                while let Some(outcomes) = next_batch(&mut rx).await {
                    if addr.send(OutcomeBatch(outcomes)).await.is_err() {
                        return;
                    }
                }
            });
        }
        ctx.run_interval(Duration::from_secs(1), |this, ctx| {
            guard(this, ctx, |this, _| this.tick());
        });
    }
}

impl Named for StatsAggregator {
    const NAME: &'static str = "stats_aggregator";
}

crate::supervision::handle_crash!(StatsAggregator);

/// The outcome forwarder outlives a restart (same address); the summaries
/// are published again in full, and merged ones come back from gossip.
impl Supervised for StatsAggregator {
    fn restarting(&mut self, _ctx: &mut Self::Context) {
        self.published.clear();
    }
}

/// How long the first outcome of a batch waits for others. The actor's
/// thread then wakes once per window, not once per request (at 2000
/// requests a second, a wake-up each cost more than the rest of the stats).
const BATCH_WINDOW: Duration = Duration::from_millis(25);
/// Most outcomes handed to the actor at once.
const MAX_BATCH: usize = 4096;

/// The next batch of outcomes: all that come within [`BATCH_WINDOW`] of the
/// first, up to [`MAX_BATCH`]; `None` once the data plane is gone.
async fn next_batch(rx: &mut mpsc::Receiver<Outcome>) -> Option<Vec<Outcome>> {
    let mut batch = Vec::new();
    if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
        return None;
    }
    tokio::time::sleep(BATCH_WINDOW).await;
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(outcome) => batch.push(outcome),
            Err(_) => break,
        }
    }
    Some(batch)
}

/// Outcomes drained from the data plane.
#[derive(Message)]
#[rtype(result = "()")]
struct OutcomeBatch(Vec<Outcome>);

impl Handler<OutcomeBatch> for StatsAggregator {
    type Result = ();

    fn handle(&mut self, msg: OutcomeBatch, ctx: &mut Self::Context) {
        guard(self, ctx, |this, _| this.record_batch(msg.0));
    }
}

impl StatsAggregator {
    fn record_batch(&mut self, outcomes: Vec<Outcome>) {
        let now = Instant::now();
        let mut touched: Vec<String> = Vec::new();
        for o in outcomes {
            if !touched.contains(&o.service) {
                touched.push(o.service.clone());
            }
            self.record(o, now);
        }
        // Keep the hot-path view of episode starts current between ticks;
        // the snapshot is copied only when one of them moved.
        let snap = self.handle.load();
        let moved: Vec<(String, Option<Instant>, bool)> = touched
            .into_iter()
            .filter_map(|service| {
                let local = self.local.get(&service)?;
                let start = local.episodes.current_episode_start();
                let explore = local.episodes.explores();
                let seen = snap.services.get(&service);
                let same = seen.is_some_and(|s| s.episode_start == start && s.explore == explore);
                (!same).then_some((service, start, explore))
            })
            .collect();
        if moved.is_empty() {
            return;
        }
        let mut next = (*snap).clone();
        for (service, start, explore) in moved {
            let entry = next.services.entry(service).or_default();
            entry.episode_start = start;
            entry.explore = explore;
        }
        self.handle.publish(next);
    }
}
