//! How a node keeps cluster config it adopts from gossip (the revocation
//! list, the intentions) and its own gossip key for it in step.

use std::sync::Arc;

use tokio::sync::watch;
use weft_gossip::ClusterView;

/// Runs `on_view` with every new cluster view (to adopt what members
/// offer) and `on_change` whenever `own` moves (to offer what this node
/// adopted), until either source ends.
pub fn views_and_changes<T, V, C>(
    mut views: watch::Receiver<Arc<ClusterView>>,
    mut own: watch::Receiver<T>,
    mut on_view: V,
    mut on_change: C,
) where
    T: Send + Sync + 'static,
    V: FnMut(&ClusterView) + Send + 'static,
    C: FnMut(&T) + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let view = views.borrow_and_update().clone();
                    on_view(&view);
                }
                changed = own.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    on_change(&own.borrow_and_update());
                }
            }
        }
    });
}
