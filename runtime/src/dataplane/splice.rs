//! Raw bytes both ways between a local connection (TCP, or an upgraded
//! HTTP connection) and a tunnel stream. A FIN travels as a FIN (QUIC
//! `finish`), a reset as a reset (`RESET_STREAM` / `STOP_SENDING`), both
//! ways; the caller turns [`SpliceEnd::PeerReset`] into a TCP RST.

use quinn::{RecvStream, SendStream, VarInt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The QUIC error code weft uses for a reset passed through.
const RESET: VarInt = VarInt::from_u32(1);

/// First read buffer; it doubles up to [`MAX_BUF`] while reads fill it, so
/// a chatty connection stays small and a bulk one moves big writes.
const FIRST_BUF: usize = 4 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// How a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both directions finished cleanly.
    Closed,
    /// The local side reset (or failed); the tunnel stream was reset too.
    LocalReset,
    /// The far side reset the tunnel stream; the local side must be reset.
    PeerReset,
}

/// Copies until both directions are done or either side resets; returns the
/// local connection so the caller can reset it.
pub async fn splice<S>(io: S, mut send: SendStream, mut recv: RecvStream) -> (S, SpliceEnd)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut reader, mut writer) = tokio::io::split(io);
    let result = tokio::try_join!(
        to_tunnel(&mut reader, &mut send),
        from_tunnel(&mut recv, &mut writer)
    );
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
) -> Result<(), SpliceEnd> {
    loop {
        match recv.read_chunk(MAX_BUF, true).await {
            Ok(Some(chunk)) => {
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
