//! A bridge's part in zones ([`weft_gossip::zones`]): a second gossip pool
//! between zones ([`BetweenZones`]), the view the bridge routes from (its
//! zone's joined with that pool), and once a second the offers it writes:
//! its zone's services into the pool between zones, every other zone's
//! into its zone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use weft_gossip::seal::SealedTransport;
use weft_gossip::zones::{self, is_gateway};
use weft_gossip::{Cluster, ClusterConfig, ClusterView, Key, NodeInfo, ZoneOffer};
use weft_runtime::dataplane::tables::{RouterHandle, StatsHandle};
use weft_runtime::gossip_writer::GossipWriter;
use weft_runtime::policy::stats::Summary;
use weft_runtime::tls;
use weft_runtime::tunnel::TunnelPool;

use crate::config::{BridgeConfig, NodeConfig};
use crate::keyring::ClusterKeys;
use crate::NodeError;

/// How often the offers are written (when they changed).
const OFFER_PERIOD: Duration = Duration::from_secs(1);

/// The pool between zones, rounds this many times slower than a zone's:
/// it holds a few bridges per zone, and what it carries changes slowly.
pub const ROUND_FACTOR: u32 = 4;

/// The chitchat cluster id of the pool between zones.
pub fn between_id(cluster_id: &str) -> String {
    format!("{cluster_id}/zones")
}

/// The chitchat cluster id of `zone`'s pool (the default zone keeps the
/// cluster's id, so nodes from before zones stay in it).
pub fn zone_id(cluster_id: &str, zone: Option<&str>) -> String {
    match zone {
        Some(zone) => format!("{cluster_id}/zone/{zone}"),
        None => cluster_id.to_string(),
    }
}

/// What a running bridge holds.
pub struct Bridge {
    /// The pool between zones.
    pub between: Arc<Cluster>,
    /// The bridge's zone view joined with the pool between zones.
    pub views: watch::Receiver<Arc<ClusterView>>,
}

impl Bridge {
    /// Joins the pool between zones and starts the view joiner and the
    /// offer writer.
    async fn start(
        config: &ClusterConfig,
        initial: Vec<(Key, String)>,
        transport: &SealedTransport,
        (own_zone, zone, zone_writer): (&str, &Cluster, GossipWriter),
        tables: (RouterHandle, StatsHandle),
    ) -> Result<Bridge, weft_gossip::GossipError> {
        let between = Arc::new(Cluster::start(config, initial, transport).await?);
        let views = joined_views(zone.views(), between.views());
        let offers = Offers {
            own_zone: own_zone.to_string(),
            between_views: between.views(),
            between_writer: GossipWriter::spawn(between.clone()),
            zone_writer,
            router: tables.0,
            stats: tables.1,
            written_between: BTreeMap::new(),
            written_zone: BTreeMap::new(),
        };
        tokio::spawn(offers.run());
        Ok(Bridge { between, views })
    }
}

/// What a bridge needs to join the pool between zones.
pub struct BetweenZones<'a> {
    /// The node's configuration (name, interval, advertised address).
    pub cfg: &'a NodeConfig,
    /// Its `--bridge` address and seeds.
    pub bridge: &'a BridgeConfig,
    /// The cluster's id, from which the pool's is made.
    pub cluster_id: String,
    /// The node's incarnation, the same in both pools.
    pub generation: u64,
    /// The node record it writes in both pools.
    pub info: &'a NodeInfo,
}

impl BetweenZones<'_> {
    /// Joins the pool between zones, sealed with the cluster's gossip keys
    /// and signed with the node's certificate as its zone's pool is.
    pub async fn start(
        self,
        identity: &tls::Identity,
        tunnels: &TunnelPool,
        keys: &ClusterKeys,
        zone: (&str, &Cluster, GossipWriter),
        tables: (RouterHandle, StatsHandle),
    ) -> Result<Bridge, NodeError> {
        let listen = self.bridge.listen;
        let advertise = if listen.ip().is_unspecified() {
            let ip = self.cfg.advertise_gossip.map_or(listen.ip(), |a| a.ip());
            SocketAddr::new(ip, listen.port())
        } else {
            listen
        };
        let attestor = tls::NodeAttestor::new(identity, tunnels.trust())
            .map_err(|e| NodeError::Config(e.to_string()))?;
        let config = ClusterConfig {
            node_name: self.cfg.name.clone(),
            generation: self.generation,
            listen_addr: listen,
            advertise_addr: advertise,
            seeds: self.bridge.seeds.clone(),
            interval: self.cfg.gossip_interval * ROUND_FACTOR,
            cluster_id: between_id(&self.cluster_id),
            attestor: Some(Arc::new(attestor)),
        };
        let transport = weft_gossip::seal::SealedTransport::with_keyring(keys.ring())
            .with_advertised(advertise);
        let initial = vec![(
            Key::Node,
            serde_json::to_string(self.info).unwrap_or_default(),
        )];
        Bridge::start(&config, initial, &transport, zone, tables)
            .await
            .map_err(|e| NodeError::Config(format!("--bridge {listen}: {e}")))
    }
}

/// A watch of `zone` joined with `between`, new whenever either moves.
fn joined_views(
    mut zone: watch::Receiver<Arc<ClusterView>>,
    mut between: watch::Receiver<Arc<ClusterView>>,
) -> watch::Receiver<Arc<ClusterView>> {
    let first = zones::join(&zone.borrow_and_update(), &between.borrow_and_update());
    let (tx, rx) = watch::channel(Arc::new(first));
    tokio::spawn(async move {
        loop {
            tokio::select! {
                moved = zone.changed() => if moved.is_err() { return },
                moved = between.changed() => if moved.is_err() { return },
            }
            let joined = zones::join(&zone.borrow_and_update(), &between.borrow_and_update());
            if tx.send(Arc::new(joined)).is_err() {
                return;
            }
        }
    });
    rx
}

/// Writes the offers, each only when it changed; withdraws what is no
/// longer offered.
struct Offers {
    own_zone: String,
    between_views: watch::Receiver<Arc<ClusterView>>,
    between_writer: GossipWriter,
    zone_writer: GossipWriter,
    router: RouterHandle,
    stats: StatsHandle,
    written_between: BTreeMap<Key, String>,
    written_zone: BTreeMap<Key, String>,
}

impl Offers {
    async fn run(mut self) {
        let mut tick = tokio::time::interval(OFFER_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let own = self.own_offers();
            self.between_writer.sync(&mut self.written_between, own);
            let theirs = zones::other_zones(&self.between_views.borrow())
                .into_iter()
                .map(|((zone, service), offer)| (Key::Zone { zone, service }, json(&offer)))
                .collect();
            self.zone_writer.sync(&mut self.written_zone, theirs);
        }
    }

    /// This zone's services with an instance in it (gateways are other
    /// zones'), with the zone's merged statistics of each.
    fn own_offers(&self) -> BTreeMap<Key, String> {
        let (routing, stats) = (self.router.load(), self.stats.load());
        let mut offers = BTreeMap::new();
        for (service, instances) in &routing.catalog.services {
            let own: Vec<_> = instances.iter().filter(|i| !is_gateway(&i.id)).collect();
            if own.is_empty() {
                continue;
            }
            let healthy = own.iter().filter(|i| i.health.routable()).count();
            let merged = stats.services.get(service).map(|s| s.zone);
            let offer = ZoneOffer {
                healthy: u32::try_from(healthy).unwrap_or(u32::MAX),
                stats: merged
                    .filter(|m| m.requests > 0 || m.episodes.samples > 0)
                    .map(|m| Summary::of_merged(&m).encode()),
            };
            let key = Key::Zone {
                zone: self.own_zone.clone(),
                service: service.clone(),
            };
            offers.insert(key, json(&offer));
        }
        offers
    }
}

fn json(offer: &ZoneOffer) -> String {
    serde_json::to_string(offer).unwrap_or_default()
}
