//! The Router actor: turns gossip views into the routing table and publishes it.
//!
//! Readers (API handlers, and the data plane later) call [`RouterHandle::load`]
//! and get an `Arc` of the latest snapshot: no lock, no actor round trip.

use std::sync::Arc;
use std::time::Instant;

use crate::supervision::{guard, Named};
use actix::prelude::*;
use arc_swap::ArcSwap;
use tokio::sync::watch;
use weft_gossip::{Catalog, ClusterView, Member, MemberState};

/// One immutable routing table.
#[derive(Debug, Clone)]
pub struct RouterSnapshot {
    /// Members and their states.
    pub members: Vec<Member>,
    /// Service name -> instances.
    pub catalog: Catalog,
    /// When this snapshot was derived.
    pub taken_at: Instant,
}

impl Default for RouterSnapshot {
    fn default() -> Self {
        RouterSnapshot {
            members: Vec::new(),
            catalog: Catalog::default(),
            taken_at: Instant::now(),
        }
    }
}

/// Cheap, cloneable read access to the latest snapshot.
#[derive(Debug, Clone, Default)]
pub struct RouterHandle {
    current: Arc<ArcSwap<RouterSnapshot>>,
}

impl RouterHandle {
    /// The latest snapshot.
    pub fn load(&self) -> Arc<RouterSnapshot> {
        self.current.load_full()
    }
}

/// Owns the routing table; the only writer of the snapshot.
pub struct Router {
    handle: RouterHandle,
    views: watch::Receiver<Arc<ClusterView>>,
    /// The task forwarding views; it outlives restarts (same address).
    forwarding: bool,
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
        }
    }

    fn apply(&mut self, view: &ClusterView) {
        let catalog = view.catalog();
        let previous = self.handle.load();
        let diff = catalog.diff(&previous.catalog);
        for (svc, node, id) in &diff.added {
            tracing::info!(service = %svc, node = %node, id = %id, "instance joined the catalog");
        }
        for (svc, node, id) in &diff.removed {
            tracing::info!(service = %svc, node = %node, id = %id, "instance left the catalog");
        }
        for (svc, node, id) in &diff.changed {
            tracing::debug!(service = %svc, node = %node, id = %id, "instance changed");
        }
        let members = view.members();
        export_gauges(&members, &catalog, &previous.catalog);
        self.handle.current.store(Arc::new(RouterSnapshot {
            members,
            catalog,
            taken_at: Instant::now(),
        }));
    }
}

/// `weft_members{state}` and `weft_instances{service,health}`; series of
/// services that disappeared drop to zero rather than keep a stale value.
fn export_gauges(members: &[Member], catalog: &Catalog, previous: &Catalog) {
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
    const HEALTH: [&str; 4] = ["passing", "failing", "unknown", "ejected"];
    for (service, instances) in &catalog.services {
        for health in HEALTH {
            let n = instances.iter().filter(|i| i.health == health).count();
            metrics::gauge!("weft_instances", "service" => service.clone(), "health" => health)
                .set(n as f64);
        }
    }
    for service in previous.services.keys() {
        if !catalog.services.contains_key(service) {
            for health in HEALTH {
                metrics::gauge!("weft_instances", "service" => service.clone(), "health" => health)
                    .set(0.0);
            }
        }
    }
}

impl Actor for Router {
    type Context = Context<Self>;

    /// Also after a restart: the table is rebuilt from the current view.
    fn started(&mut self, ctx: &mut Self::Context) {
        let initial = self.views.borrow().clone();
        guard(self, ctx, |this, _| this.apply(&initial));
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
