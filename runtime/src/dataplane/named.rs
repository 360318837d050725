//! A service's named upstreams: local ports that each reach one service as
//! the registering service's calls, HTTP or raw TCP by what that service's
//! instances speak (asked per connection, so a service registered later
//! is reached as it speaks).

use std::sync::Arc;

use tokio::net::TcpListener;
use weft_gossip::Protocol;

use super::limits::accept_each;
use super::request::Entrance;
use super::{outbound, tcp, ConnectionLimit, DataPlane, Limit};

/// Accepts connections until the task is aborted; each reaches `service`
/// as `caller`'s call.
pub async fn serve(
    listener: TcpListener,
    dp: Arc<DataPlane>,
    caller: crate::caller::Caller,
    service: String,
) {
    let limit = ConnectionLimit::new(Limit::UpstreamConnections, dp.limits.max_connections);
    let entrance = Entrance {
        caller,
        service: Some(service.clone()),
    };
    accept_each(listener, limit, "named upstream", |stream, permit| {
        if speaks_tcp(&dp, &service) {
            let caller = entrance.caller.clone();
            let connection =
                tcp::serve_connection(dp.clone(), service.clone(), caller, stream, permit);
            tokio::spawn(connection);
        } else {
            tokio::spawn(outbound::serve_connection(
                dp.clone(),
                entrance.clone(),
                stream,
                permit,
            ));
        }
    })
    .await;
}

/// Whether `service`'s instances speak raw TCP (an unknown service is
/// answered over HTTP: `unknown-service`).
fn speaks_tcp(dp: &DataPlane, service: &str) -> bool {
    dp.router
        .load()
        .catalog
        .services
        .get(service)
        .is_some_and(|instances| {
            !instances.is_empty() && instances.iter().all(|i| i.protocol == Protocol::Tcp)
        })
}
