//! The Router actor: turns gossip views into the routing table and publishes it.
//!
//! Readers (API handlers and the data plane) call [`RouterHandle::load`]
//! and get an `Arc` of the latest snapshot: no lock, no actor round trip.
//! The table itself lives with the data plane that reads it
//! ([`crate::dataplane::tables`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::dataplane::endpoints::Endpoints;
use crate::dataplane::tables::{RouterHandle, RouterSnapshot};
use crate::dataplane::{DataPlane, Upkeep};
use crate::supervision::{guard, Named};
use actix::prelude::*;
use tokio::sync::watch;
use weft_gossip::view::{CatalogDeriver, CatalogDiff};
use weft_gossip::{zones, Catalog, ClusterView, Instance, Member, MemberState};

/// How often the router runs the data plane's upkeep
/// ([`DataPlane::maintain`]).
pub const MAINTENANCE: Duration = Duration::from_millis(250);

/// Owns the routing table; the only writer of the snapshot.
pub struct Router {
    handle: RouterHandle,
    views: watch::Receiver<Arc<ClusterView>>,
    /// The task forwarding views; it outlives restarts (same address).
    forwarding: bool,
    /// The data plane routing from this table, kept up by the router.
    dataplane: Option<Arc<DataPlane>>,
    /// The data plane's upkeep memory.
    upkeep: Upkeep,
    /// Derives each view's catalog from the last one's, redoing only the
    /// nodes whose keys or state moved.
    catalog: CatalogDeriver,
    /// The last derived catalog, the gateways other zones offered into it,
    /// and the catalog with them: kept while neither moves.
    zoned: Option<Zoned>,
}

/// A derived catalog with the gateways of other zones added.
struct Zoned {
    derived: Arc<Catalog>,
    gateways: BTreeMap<String, Vec<Arc<Instance>>>,
    catalog: Arc<Catalog>,
}

impl Router {
    /// A router fed by a stream of gossip views.
    pub fn new(views: watch::Receiver<Arc<ClusterView>>) -> (Self, RouterHandle) {
        let handle = RouterHandle::default();
        (Router::with_handle(views, handle.clone()), handle)
    }

    /// A router publishing into an existing handle (a restarted router keeps
    /// serving the readers of the old one).
    pub fn with_handle(views: watch::Receiver<Arc<ClusterView>>, handle: RouterHandle) -> Self {
        Router {
            handle,
            views,
            forwarding: false,
            dataplane: None,
            upkeep: Upkeep::default(),
            catalog: CatalogDeriver::default(),
            zoned: None,
        }
    }

    /// Also runs `dataplane`'s upkeep every [`MAINTENANCE`].
    pub fn maintaining(mut self, dataplane: Arc<DataPlane>) -> Self {
        self.dataplane = Some(dataplane);
        self
    }

    /// Publishes the routing table of `view`. Only the members (whose
    /// last-heard ages move) are always new; the catalog and endpoints of
    /// the previous snapshot are kept while the catalog does not move, and
    /// only the services that moved are rebuilt when it does.
    fn apply(&mut self, view: &Arc<ClusterView>) {
        let members = view.members();
        let previous = self.handle.load();
        export_member_gauges(&members);
        let (derived, diff) = self.catalog.update(view);
        let place = zones::Place::of(view);
        let catalog = self.with_gateways(derived, view, &place);
        let (catalog, endpoints) = if Arc::ptr_eq(&catalog, &previous.catalog) {
            (catalog, previous.endpoints.clone())
        } else {
            log_diff(&diff);
            let endpoints = Endpoints::build(&catalog, &previous.endpoints);
            (catalog, Arc::new(endpoints))
        };
        self.handle.publish(RouterSnapshot {
            members,
            catalog,
            endpoints,
            place,
        });
    }
}

impl Router {
    /// `derived` with the gateways to the services only other zones offer;
    /// the previous result while neither moved, so the endpoints are kept.
    fn with_gateways(
        &mut self,
        derived: Arc<Catalog>,
        view: &ClusterView,
        place: &zones::Place,
    ) -> Arc<Catalog> {
        let gateways = zones::gateways(view, place);
        if gateways.is_empty() {
            self.zoned = None;
            return derived;
        }
        if let Some(zoned) = &self.zoned {
            if Arc::ptr_eq(&zoned.derived, &derived) && zoned.gateways == gateways {
                return zoned.catalog.clone();
            }
        }
        let catalog = zones::with_gateways(&derived, &gateways);
        self.zoned = Some(Zoned {
            derived,
            gateways,
            catalog: catalog.clone(),
        });
        catalog
    }
}

fn log_diff(diff: &CatalogDiff) {
    for (svc, node, id) in &diff.added {
        tracing::info!(service = %svc, node = %node, id = %id, "instance joined the catalog");
    }
    for (svc, node, id) in &diff.removed {
        tracing::info!(service = %svc, node = %node, id = %id, "instance left the catalog");
    }
    for (svc, node, id) in &diff.changed {
        tracing::debug!(service = %svc, node = %node, id = %id, "instance changed");
    }
}

/// `weft_members{state}`.
fn export_member_gauges(members: &[Member]) {
    for state in [
        MemberState::Alive,
        MemberState::Suspect,
        MemberState::Dead,
        MemberState::Draining,
        MemberState::Left,
    ] {
        let n = members.iter().filter(|m| m.state == state).count();
        metrics::gauge!("weft_members", "state" => state.as_str()).set(n as f64);
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    /// Also after a restart: the table is rebuilt from the current view.
    fn started(&mut self, ctx: &mut Self::Context) {
        let initial = self.views.borrow().clone();
        guard(self, ctx, |this, _| this.apply(&initial));
        ctx.run_interval(MAINTENANCE, |this, ctx| {
            guard(this, ctx, |this, _| {
                if let Some(dp) = &this.dataplane {
                    dp.maintain(&mut this.upkeep);
                }
            });
        });
        if std::mem::replace(&mut self.forwarding, true) {
            return;
        }
        // Forward every new view to the actor; the task ends when gossip stops
        // or the actor goes away.
        let mut views = self.views.clone();
        let addr = ctx.address();
        tokio::spawn(async move {
            while views.changed().await.is_ok() {
                let view = views.borrow_and_update().clone();
                if addr.try_send(ViewChanged(view)).is_err() && !addr.connected() {
                    return;
                }
            }
        });
    }
}

impl Supervised for Router {}

impl Named for Router {
    const NAME: &'static str = "router";
}

crate::supervision::handle_crash!(Router);

/// A fresh gossip view arrived.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ViewChanged(pub Arc<ClusterView>);

impl Handler<ViewChanged> for Router {
    type Result = ();

    fn handle(&mut self, msg: ViewChanged, ctx: &mut Self::Context) {
        guard(self, ctx, |this, _| this.apply(&msg.0));
    }
}
