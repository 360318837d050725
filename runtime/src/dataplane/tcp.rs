//! TCP upstreams: a local port that reaches a service; each accepted
//! connection is one QUIC stream (or a direct connection when the chosen
//! instance is on this host). A FIN travels as a FIN and a reset as a reset,
//! both ways.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OwnedSemaphorePermit;
use weft_gossip::Protocol;

use super::limits::accept_each;
use super::splice::{reset_tcp, splice};
use super::{ConnectionLimit, DataPlane, Limit, MeshError};
use crate::caller::Caller;
use crate::outcome::{Outcome, OutcomeClass};
use crate::tunnel;
use crate::wire::{RequestHead, ResponseHead, StreamKind, WIRE_VERSION};

/// How long the serving node may take to say it reached the instance (its
/// connect is bounded by a second; the rest is the tunnel's round trip).
const REPLY_HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts connections for `service` until the task is aborted; they are
/// `caller`'s (the anonymous caller on a `weft upstream` port).
pub async fn serve(listener: TcpListener, service: String, dp: Arc<DataPlane>, caller: Caller) {
    let limit = ConnectionLimit::new(Limit::UpstreamConnections, dp.limits.max_connections);
    accept_each(listener, limit, "tcp upstream", |stream, permit| {
        let connection =
            serve_connection(dp.clone(), service.clone(), caller.clone(), stream, permit);
        tokio::spawn(connection);
    })
    .await;
}

/// Carries one app connection to `service`, holding `permit`.
pub(super) async fn serve_connection(
    dp: Arc<DataPlane>,
    service: String,
    caller: Caller,
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    if let Err(e) = connect(&dp, &service, &caller, stream).await {
        tracing::info!(service, ?peer, error = %e, "upstream connection refused");
    }
    drop(permit);
}

async fn connect(
    dp: &DataPlane,
    service: &str,
    caller: &Caller,
    client: TcpStream,
) -> Result<(), String> {
    let _busy = dp.in_flight.track();
    if let Err(denied) = dp.authorize(caller.as_str(), service) {
        dp.outcomes.record(Outcome::denied(service, caller));
        reset_tcp(client);
        return Err(format!("forbidden by {}", denied.reason()));
    }
    // A TCP service's limit counts connections.
    if let Err(limited) = dp.admission.check(service, caller.as_str()) {
        reset_tcp(client);
        return Err(format!(
            "over the rate limit {} of {}",
            limited.limit.rate,
            limited.limit.scope()
        ));
    }
    let endpoint = {
        let snap = dp.router.load();
        dp.pick(&snap, service, Protocol::Tcp, &[])
            .map_err(|e| e.to_string())?
    };
    let instance = &endpoint.instance;
    let start = Instant::now();
    let record = |class| {
        let failed = class != OutcomeClass::Success;
        dp.rollouts
            .observe(service, &endpoint, failed, start.elapsed());
        dp.outcomes.record(Outcome {
            service: service.to_string(),
            caller: caller.clone(),
            class,
            status: None,
            latency: start.elapsed(),
            attempt: 0,
            last: true,
        })
    };
    if instance.node == dp.node {
        let upstream = tokio::time::timeout(
            dp.timeouts.connect,
            TcpStream::connect(("127.0.0.1", instance.port)),
        )
        .await;
        let Ok(Ok(upstream)) = upstream else {
            record(OutcomeClass::Unreachable);
            return Err(format!("127.0.0.1:{} unreachable", instance.port));
        };
        record(OutcomeClass::Success);
        splice_local(client, upstream).await;
        return Ok(());
    }
    let addr = instance
        .tunnel_addr
        .ok_or_else(|| format!("node {} announced no tunnel address", instance.node))?;
    let opened = dp.tunnels.open(&instance.node, addr, StreamKind::Tcp).await;
    let (mut send, mut recv) = match opened {
        Ok(pair) => pair,
        Err(e) => {
            record(OutcomeClass::Unreachable);
            return Err(e.to_string());
        }
    };
    let head = RequestHead {
        version: WIRE_VERSION,
        kind: StreamKind::Tcp,
        service: service.to_string(),
        instance: instance.id.clone(),
        method: String::new(),
        uri: String::new(),
        headers: vec![(
            crate::caller::CALLER.as_str().to_string(),
            caller.as_str().as_bytes().to_vec(),
        )],
        deadline_ms: u32::try_from(dp.timeouts.request.as_millis()).unwrap_or(u32::MAX),
        attempt: 0,
        http2: false,
        end_stream: false,
    };
    tunnel::write_frame(&mut send, &head)
        .await
        .map_err(|e| e.to_string())?;
    // The serving node answers once it reached the instance (a connect).
    let reply = tokio::time::timeout(REPLY_HEAD_TIMEOUT, tunnel::read_frame(&mut recv)).await;
    let reply: ResponseHead = match reply {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            record(OutcomeClass::Unreachable);
            return Err(e.to_string());
        }
        Err(_) => {
            record(OutcomeClass::Timeout);
            return Err(format!("no reply head within {REPLY_HEAD_TIMEOUT:?}"));
        }
    };
    if let Some(code) = reply.error {
        let mesh_limit = MeshError::from_code(&code).is_some_and(MeshError::is_mesh_limit);
        if !mesh_limit {
            record(OutcomeClass::Unreachable);
        }
        return Err(code);
    }
    record(OutcomeClass::Success);
    let (client, end) = splice(client, send, recv).await;
    if end.resets_local() {
        reset_tcp(client);
    }
    Ok(())
}

/// Both ways between two local TCP connections, half-closes kept; when one
/// side resets (or fails), the other is reset too.
async fn splice_local(client: TcpStream, upstream: TcpStream) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let result = tokio::try_join!(
        pump(&mut client_read, &mut upstream_write),
        pump(&mut upstream_read, &mut client_write)
    );
    if result.is_err() {
        if let (Ok(client), Ok(upstream)) = (
            client_read.reunite(client_write),
            upstream_read.reunite(upstream_write),
        ) {
            reset_tcp(client);
            reset_tcp(upstream);
        }
    }
}

/// Copies until EOF, then half-closes the writer.
async fn pump(reader: &mut OwnedReadHalf, writer: &mut OwnedWriteHalf) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buf[..n]).await?;
    }
}
