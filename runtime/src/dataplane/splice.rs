//! Raw bytes both ways between a local connection (TCP, or an upgraded
//! HTTP connection) and a tunnel stream. A FIN travels as a FIN (QUIC
//! `finish`), a reset as a reset (`RESET_STREAM` / `STOP_SENDING`), both
//! ways; the caller turns [`SpliceEnd::PeerReset`] into a TCP RST.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::Limit;

/// The QUIC error code weft uses for a reset passed through.
const RESET: VarInt = VarInt::from_u32(1);

/// First read buffer; it doubles up to [`MAX_BUF`] while reads fill it, so
/// a chatty connection stays small and a bulk one moves big writes.
const FIRST_BUF: usize = 4 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// A splice with no byte either way for this long is reset both ways, so
/// a peer cannot hold connections open forever (Envoy's TCP proxy default).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both directions finished cleanly.
    Closed,
    /// The local side reset (or failed); the tunnel stream was reset too.
    LocalReset,
    /// The far side reset the tunnel stream; the local side must be reset.
    PeerReset,
    /// Nothing moved for [`IDLE_TIMEOUT`]: both sides are reset.
    Idle,
}

impl SpliceEnd {
    /// Whether the caller must reset the local connection too.
    pub fn resets_local(self) -> bool {
        matches!(self, SpliceEnd::PeerReset | SpliceEnd::Idle)
    }
}

/// When bytes last moved either way, for the idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if last + idle <= Instant::now() {
                return;
            }
            tokio::time::sleep_until(last + idle).await;
        }
    }
}

/// Copies until both directions are done or either side resets; returns the
/// local connection so the caller can reset it.
pub async fn splice<S>(io: S, mut send: SendStream, mut recv: RecvStream) -> (S, SpliceEnd)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let activity = Activity::new();
    let copy = async {
        tokio::try_join!(
            to_tunnel(&mut reader, &mut send, &activity),
            from_tunnel(&mut recv, &mut writer, &activity)
        )
    };
    let result = tokio::select! {
        result = copy => result,
        () = activity.idle_for(IDLE_TIMEOUT) => {
            Limit::SpliceIdle.count();
            Err(SpliceEnd::Idle)
        }
    };
    let end = match result {
        Ok(_) => {
            // Let the peer read everything we sent before the stream goes.
            let _ = send.stopped().await;
            SpliceEnd::Closed
        }
        Err(end) => {
            let _ = send.reset(RESET);
            let _ = recv.stop(RESET);
            end
        }
    };
    (reader.unsplit(writer), end)
}

async fn to_tunnel<R: AsyncRead + Unpin>(
    reader: &mut R,
    send: &mut SendStream,
    activity: &Activity,
) -> Result<(), SpliceEnd> {
    let mut buf = vec![0u8; FIRST_BUF];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => {
                let _ = send.finish();
                return Ok(());
            }
            Ok(n) => n,
            Err(_) => return Err(SpliceEnd::LocalReset),
        };
        activity.touch();
        if send.write_all(&buf[..n]).await.is_err() {
            // The far side stopped reading: it reset.
            return Err(SpliceEnd::PeerReset);
        }
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

async fn from_tunnel<W: AsyncWrite + Unpin>(
    recv: &mut RecvStream,
    writer: &mut W,
    activity: &Activity,
) -> Result<(), SpliceEnd> {
    loop {
        match recv.read_chunk(MAX_BUF, true).await {
            Ok(Some(chunk)) => {
                activity.touch();
                if writer.write_all(&chunk.bytes).await.is_err() {
                    return Err(SpliceEnd::LocalReset);
                }
            }
            Ok(None) => {
                let _ = writer.shutdown().await;
                return Ok(());
            }
            Err(_) => return Err(SpliceEnd::PeerReset),
        }
    }
}

/// Closes a TCP connection with an RST instead of a FIN (SO_LINGER 0).
pub fn reset_tcp(stream: tokio::net::TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
