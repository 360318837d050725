//! chitchat's own `UdpSocket` used as the codec over private loopback
//! sockets: envelopes to bytes before sealing, bytes to envelopes after
//! opening (chitchat's byte encoding is private to it).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context as _;
use chitchat::transport::{RecvOutcome, Socket as _, UdpSocket as ChitchatUdpSocket};
use chitchat::{ChitchatEnvelope, ChitchatMessage, ProtocolVersion};
use tokio::net::UdpSocket as TokioUdpSocket;
use tracing::debug;

/// Deadline for one trip through a loopback codec socket.
const CODEC_TIMEOUT: Duration = Duration::from_secs(1);
/// Receive buffer size (larger than any UDP payload).
pub(super) const RECV_BUF_LEN: usize = 65_536;

pub(super) fn loopback_any() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Encodes envelopes to bytes via a chitchat `UdpSocket` and a loopback tap.
pub(super) struct Encoder {
    codec_tx: ChitchatUdpSocket,
    codec_tx_addr: SocketAddr,
    tap: TokioUdpSocket,
    tap_addr: SocketAddr,
    pub(super) buf: Vec<u8>,
}

impl Encoder {
    pub(super) async fn open() -> anyhow::Result<Encoder> {
        let codec_tx = ChitchatUdpSocket::open(loopback_any()).await?;
        let codec_tx_addr = codec_tx.local_addr()?;
        let tap = TokioUdpSocket::bind(loopback_any()).await?;
        let tap_addr = tap.local_addr()?;
        Ok(Encoder {
            codec_tx,
            codec_tx_addr,
            tap,
            tap_addr,
            buf: vec![0u8; RECV_BUF_LEN],
        })
    }

    /// Encodes `envelope`; the bytes are `self.buf[..len]`.
    pub(super) async fn encode(&mut self, envelope: ChitchatEnvelope) -> anyhow::Result<usize> {
        // Drop anything left over from an interrupted earlier encode.
        while self.tap.try_recv_from(&mut self.buf).is_ok() {}
        self.codec_tx
            .send(self.tap_addr, envelope)
            .await
            .context("chitchat could not encode the message")?;
        let deadline = tokio::time::Instant::now() + CODEC_TIMEOUT;
        loop {
            let (len, from) = tokio::time::timeout_at(deadline, self.tap.recv_from(&mut self.buf))
                .await
                .context("timed out reading the encoded message back")?
                .context("failed to read the encoded message back")?;
            if from == self.codec_tx_addr {
                return Ok(len);
            }
            debug!(%from, "discarding foreign datagram on the gossip encode tap");
        }
    }
}

/// Decodes bytes to envelopes via a chitchat `UdpSocket` (`codec_rx`), fed by
/// `replayer`, with a `fence` envelope marking the end of each attempt.
pub(super) struct Decoder {
    replayer: TokioUdpSocket,
    replayer_addr: SocketAddr,
    fence: ChitchatUdpSocket,
    fence_addr: SocketAddr,
    codec_rx: ChitchatUdpSocket,
    codec_rx_addr: SocketAddr,
}

fn fence_envelope() -> ChitchatEnvelope {
    ChitchatEnvelope {
        version: ProtocolVersion::V0,
        message: ChitchatMessage::BadCluster,
    }
}

impl Decoder {
    pub(super) async fn open() -> anyhow::Result<Decoder> {
        let replayer = TokioUdpSocket::bind(loopback_any()).await?;
        let replayer_addr = replayer.local_addr()?;
        let fence = ChitchatUdpSocket::open(loopback_any()).await?;
        let fence_addr = fence.local_addr()?;
        let codec_rx = ChitchatUdpSocket::open(loopback_any()).await?;
        let codec_rx_addr = codec_rx.local_addr()?;
        Ok(Decoder {
            replayer,
            replayer_addr,
            fence,
            fence_addr,
            codec_rx,
            codec_rx_addr,
        })
    }

    /// Returns the decoded message (if it decoded) and whether the codec
    /// sockets must be replaced (their queue may hold leftovers).
    pub(super) async fn decode(&mut self, message: &[u8]) -> (Option<RecvOutcome>, bool) {
        if let Err(err) = self.replayer.send_to(message, self.codec_rx_addr).await {
            debug!(error = %err, "failed to replay gossip message to the codec");
            return (None, true);
        }
        if let Err(err) = self.fence.send(self.codec_rx_addr, fence_envelope()).await {
            debug!(error = %err, "failed to send the codec fence");
            return (None, true);
        }
        let deadline = tokio::time::Instant::now() + CODEC_TIMEOUT;
        let mut decoded = None;
        loop {
            match tokio::time::timeout_at(deadline, self.codec_rx.recv()).await {
                Err(_elapsed) => return (decoded, true),
                Ok(Err(err)) => {
                    debug!(error = %err, "gossip decode codec failed");
                    return (decoded, true);
                }
                Ok(Ok(outcome)) if outcome.from_addr == self.fence_addr => {
                    // Fence before the message means it did not decode; a
                    // late (reordered) message could then be mistaken for
                    // the next one, so start over with fresh sockets.
                    let reset = decoded.is_none();
                    return (decoded, reset);
                }
                Ok(Ok(outcome)) if outcome.from_addr == self.replayer_addr && decoded.is_none() => {
                    decoded = Some(outcome);
                }
                Ok(Ok(outcome)) => {
                    debug!(from = %outcome.from_addr, "discarding foreign datagram on the gossip decode codec");
                }
            }
        }
    }
}
