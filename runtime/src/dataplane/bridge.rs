//! Streams for a gateway instance (`zone:<zone>`, [`weft_gossip::zones`]):
//! a bridge relays them one hop closer to the zone that serves them.
//!
//! - A stream for another zone goes to a bridge of that zone.
//! - A stream for this bridge's own zone goes to an instance of the
//!   service here, picked as the outbound side picks; the head is rewritten
//!   to name it. When the instance is on this node, the stream is handed
//!   back to be served as any other.
//!
//! The relay reads the request head and the response head and passes the
//! rest of both streams through untouched. The caller the head names is
//! checked as a serving node checks it (a bridge's is believed, as it
//! checked it already); the last hop records the request's outcome, so the
//! serving zone learns from the calls other zones send it too.

use std::time::{Duration, Instant};

use quinn::{RecvStream, SendStream, VarInt};
use rand::seq::SliceRandom;
use weft_gossip::zones::{gateway_zone, is_gateway};
use weft_gossip::Protocol;

use super::endpoints::Endpoint;
use super::error::MeshError;
use super::inbound::{check_claim, refuse};
use super::request::{header_map, wire_pairs};
use super::tables::RouterSnapshot;
use super::DataPlane;
use crate::caller::{self, Caller};
use crate::outcome::{Outcome, OutcomeClass};
use crate::tunnel::{self, TunnelError};
use crate::wire::{RequestHead, ResponseHead, StreamKind};

/// The QUIC error code of a relayed reset.
const RESET: VarInt = VarInt::from_u32(1);

/// How much longer than the caller's deadline a relay waits for the next
/// hop's response head.
const HEAD_GRACE: Duration = Duration::from_secs(1);

/// What became of a stream for a gateway instance.
pub(super) enum Relayed {
    /// Relayed (or refused) and answered.
    Done,
    /// The instance picked is on this node: serve the rewritten head.
    Here(RequestHead, SendStream, RecvStream),
}

/// Relays a stream from `peer` for a gateway instance one hop on.
pub(super) async fn relay(
    dp: &DataPlane,
    peer: &str,
    mut head: RequestHead,
    mut send: SendStream,
    recv: RecvStream,
) -> Result<Relayed, TunnelError> {
    let snap = dp.router.load();
    let zone = gateway_zone(&head.instance).unwrap_or_default().to_string();
    let own_zone = snap.place.zone.as_deref() == Some(zone.as_str());
    if head.kind != StreamKind::Http || !(own_zone || snap.place.bridge) {
        refuse(&mut send, MeshError::BadRequest).await?;
        return Err(TunnelError::Stream(format!(
            "a {:?} stream for zone {zone} at a node that does not bridge to it",
            head.kind
        )));
    }
    admit_relayed_caller(&snap, peer, &mut head);
    let next = if own_zone {
        in_zone(dp, &snap, &head.service)
    } else {
        toward(&snap, &head.service, &head.instance)
    };
    let next = match next {
        Ok(next) => next,
        Err(error) => {
            refuse(&mut send, error).await?;
            return Ok(Relayed::Done);
        }
    };
    if own_zone {
        head.instance.clone_from(&next.instance.id);
        if next.instance.node == dp.node {
            return Ok(Relayed::Here(head, send, recv));
        }
    }
    metrics::counter!("weft_bridge_relayed_total", "zone" => zone).increment(1);
    let started = Instant::now();
    let answer = forward(dp, &next, &head, send, recv).await;
    if own_zone {
        record(dp, &head, answer, started);
    }
    Ok(Relayed::Done)
}

/// Checks the caller the head names as a serving node does
/// ([`check_claim`]), before the stream goes on.
fn admit_relayed_caller(snap: &RouterSnapshot, peer: &str, head: &mut RequestHead) {
    let mut headers = header_map(std::mem::take(&mut head.headers));
    check_claim(snap, peer, &head.service, &mut headers);
    head.headers = wire_pairs(&headers);
}

/// An instance of `service` in this zone; a gateway does not count (the
/// zone has no routable instance, and the stream must not leave it again).
fn in_zone(dp: &DataPlane, snap: &RouterSnapshot, service: &str) -> Result<Endpoint, MeshError> {
    let picked = dp.pick(snap, service, Protocol::Http, &[])?;
    if is_gateway(&picked.instance.id) {
        return Err(MeshError::NoHealthyInstance);
    }
    Ok(picked)
}

/// A bridge of the zone `gateway` leads to, among those not ejected.
fn toward(snap: &RouterSnapshot, service: &str, gateway: &str) -> Result<Endpoint, MeshError> {
    let now = Instant::now();
    let bridges: Vec<&Endpoint> = snap
        .endpoints
        .service(service)
        .iter()
        .filter(|e| e.instance.id == gateway && !e.is_ejected(now))
        .collect();
    bridges
        .choose(&mut rand::thread_rng())
        .map(|e| (*e).clone())
        .ok_or(MeshError::NoHealthyInstance)
}

/// How the next hop answered: its status, or the mesh error it or the
/// relay met.
type Answer = Result<u16, MeshError>;

/// Sends `head` to `next`'s node and passes both streams through.
async fn forward(
    dp: &DataPlane,
    next: &Endpoint,
    head: &RequestHead,
    mut send: SendStream,
    recv: RecvStream,
) -> Answer {
    let node = &next.instance.node;
    let opened = match next.instance.tunnel_addr {
        Some(addr) => dp.tunnels.open(node, addr, StreamKind::Http).await.ok(),
        None => None,
    };
    let Some((mut out_send, mut out_recv)) = opened else {
        let _ = refuse(&mut send, MeshError::UpstreamUnreachable).await;
        return Err(MeshError::UpstreamUnreachable);
    };
    // The caller gives up at its deadline and resets its stream; the
    // relay stops waiting for the head soon after, whatever the next hop
    // does.
    let patience = Duration::from_millis(u64::from(head.deadline_ms)) + HEAD_GRACE;
    dp.started(next);
    let started = Instant::now();
    let request = async {
        if tunnel::write_frame(&mut out_send, head).await.is_ok() {
            pipe(recv, out_send).await;
        }
    };
    let response = async {
        let answer =
            tokio::time::timeout(patience, tunnel::read_frame::<ResponseHead>(&mut out_recv)).await;
        dp.finished(next, started.elapsed());
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => {
                let _ = refuse(&mut send, MeshError::UpstreamUnreachable).await;
                return Err(MeshError::UpstreamUnreachable);
            }
            Err(_) => {
                let _ = refuse(&mut send, MeshError::UpstreamTimeout).await;
                let _ = out_recv.stop(RESET);
                return Err(MeshError::UpstreamTimeout);
            }
        };
        let status = match &answer.error {
            Some(code) => Err(MeshError::from_code(code).unwrap_or(MeshError::UpstreamUnreachable)),
            None => Ok(answer.status),
        };
        if tunnel::write_frame(&mut send, &answer).await.is_ok() {
            pipe(out_recv, send).await;
        }
        status
    };
    let ((), status) = tokio::join!(request, response);
    status
}

/// Bytes from `from` to `to` until either ends: a finish is passed on as
/// a finish, a reset or failure as a reset.
async fn pipe(mut from: RecvStream, mut to: SendStream) {
    loop {
        match from.read_chunk(64 * 1024, true).await {
            Ok(Some(chunk)) => {
                if to.write_chunk(chunk.bytes).await.is_err() {
                    let _ = from.stop(RESET);
                    return;
                }
            }
            Ok(None) => {
                let _ = to.finish();
                return;
            }
            Err(_) => {
                let _ = to.reset(RESET);
                return;
            }
        }
    }
}

/// Counts a request relayed into this zone as this node's call of the
/// service, by the caller the head names.
fn record(dp: &DataPlane, head: &RequestHead, answer: Answer, started: Instant) {
    let caller = head
        .headers
        .iter()
        .find(|(name, _)| name == caller::CALLER.as_str())
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
        .filter(|name| *name != caller::ANONYMOUS)
        .map_or(Caller::Anonymous, Caller::service);
    let (class, status) = match answer {
        Ok(status) => (OutcomeClass::from_status(status), Some(status)),
        // Not the service's doing.
        Err(error) if error.is_mesh_limit() => return,
        Err(MeshError::UpstreamTimeout) => (OutcomeClass::Timeout, None),
        Err(_) => (OutcomeClass::Unreachable, None),
    };
    dp.outcomes.record(Outcome {
        service: head.service.clone(),
        caller,
        class,
        status,
        latency: started.elapsed(),
        attempt: head.attempt,
        last: true,
    });
}
