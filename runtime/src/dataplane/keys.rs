//! Gossip keys handed from node to node over the tunnel, never through
//! gossip: a node that sees the cluster's keyring name a key it lacks asks
//! a member that holds it. The tunnel's mTLS (the cluster CA and CRL) and
//! the acceptor's membership check decide who may ask, so a revoked node
//! gets no new key.

use std::net::SocketAddr;

use quinn::SendStream;

use super::error::MeshError;
use super::DataPlane;
use crate::tunnel::{self, TunnelError, TunnelPool};
use crate::wire::{RequestHead, ResponseHead, StreamKind};

/// The `service` of a key request's head.
const SERVICE: &str = "weft-keyring";
/// The response header that carries the key.
const KEY_HEADER: &str = "weft-key";

/// Where a node's installed gossip keys are found, by id.
pub trait KeyVault: Send + Sync + std::fmt::Debug {
    /// The key installed here whose id is `id` (8 hex digits).
    fn secret(&self, id: &str) -> Option<Vec<u8>>;
}

/// Answers a peer's request for the key `head.instance` names.
pub(super) async fn serve(
    dp: &DataPlane,
    head: &RequestHead,
    mut send: SendStream,
) -> Result<(), TunnelError> {
    let secret = dp.keys.as_ref().and_then(|k| k.secret(&head.instance));
    let Some(secret) = secret else {
        return super::inbound::refuse(&mut send, MeshError::NoHealthyInstance).await;
    };
    let reply = ResponseHead {
        status: 200,
        headers: vec![(KEY_HEADER.to_string(), secret)],
        error: None,
        end_stream: true,
    };
    tunnel::write_frame(&mut send, &reply).await?;
    let _ = send.finish();
    Ok(())
}

/// Whether `head` asks for a gossip key rather than an instance.
pub(super) fn is_key_request(head: &RequestHead) -> bool {
    head.kind == StreamKind::Key && head.service == SERVICE
}

/// Asks `node` (its tunnel at `addr`) for the gossip key `id`.
pub async fn fetch(
    tunnels: &TunnelPool,
    node: &str,
    addr: SocketAddr,
    id: &str,
) -> Result<Vec<u8>, TunnelError> {
    let (mut send, mut recv) = tunnels.open(node, addr, StreamKind::Key).await?;
    let head = RequestHead::control(StreamKind::Key, SERVICE, id, String::new(), 5_000);
    tunnel::write_frame(&mut send, &head).await?;
    let _ = send.finish();
    let reply: ResponseHead = tunnel::read_frame(&mut recv).await?;
    if let Some(error) = reply.error {
        return Err(TunnelError::Stream(format!("{node} refused: {error}")));
    }
    reply
        .headers
        .into_iter()
        .find(|(name, _)| name == KEY_HEADER)
        .map(|(_, key)| key)
        .ok_or_else(|| TunnelError::Stream(format!("{node} answered without a key")))
}
