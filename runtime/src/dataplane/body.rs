//! Moving HTTP bodies between hyper and tunnel streams without buffering them.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use quinn::{RecvStream, SendStream};

use super::request::header_map;
use super::{BoxError, Busy, Limit, ProxyBody};
use crate::tunnel::{self, TunnelError};
use crate::wire::body::{BodyDecoder, BodyEvent};

/// A body that is over before it starts (`is_end_stream` is true, so
/// HTTP/2 ends the stream with the head).
pub fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// `body`, holding `busy` until the body ends or is dropped, so a request
/// counts as in flight until its last byte is sent.
pub fn guarded(body: ProxyBody, busy: Busy) -> ProxyBody {
    Guarded { body, _busy: busy }.boxed()
}

struct Guarded {
    body: ProxyBody,
    _busy: Busy,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A body of bytes already in hand.
pub fn full(data: Bytes) -> ProxyBody {
    http_body_util::Full::new(data)
        .map_err(|never| match never {})
        .boxed()
}

/// The error of a body that moved nothing for `idle` (a stalled peer, app
/// or instance), counted as `weft_limit_refused_total{limit="body_idle"}`.
fn idle_error(idle: Duration) -> TunnelError {
    Limit::BodyIdle.count();
    TunnelError::Stream(format!("body moved nothing for {idle:?}"))
}

/// A hyper body that reads framed chunks from a tunnel stream as they
/// arrive; it fails when no frame comes for `idle`.
pub fn from_tunnel(recv: RecvStream, idle: Duration) -> ProxyBody {
    FromTunnel {
        frames: Box::pin(tunnel_frames(recv, idle)),
        ended: false,
    }
    .boxed()
}

/// A frame of a tunnel body, and whether it is the body's last.
type TunnelFrame = Result<(Frame<Bytes>, bool), BoxError>;

/// What [`tunnel_frames`] carries from one frame to the next: the stream,
/// its decoder, and an event already read past the frame just given.
type Reading = (
    RecvStream,
    BodyDecoder,
    Option<Result<BodyEvent, TunnelError>>,
);

/// The body's frames. After data it looks at what else has already come:
/// the end usually comes with the last data, and seeing it then lets the
/// body say it is over with that frame (so HTTP/2 ends the stream on its
/// last DATA frame, and a writer bounded by content-length that polls no
/// further still sees the FIN taken, not a STOP_SENDING sent).
fn tunnel_frames(
    recv: RecvStream,
    idle: Duration,
) -> impl futures::Stream<Item = TunnelFrame> + Send + Sync {
    use futures::FutureExt as _;
    let start: Option<Reading> = Some((recv, BodyDecoder::new(), None));
    futures::stream::unfold(start, move |state| async move {
        let (mut recv, mut decoder, ahead) = state?;
        let event = match ahead {
            Some(event) => event,
            None => tokio::time::timeout(idle, tunnel::read_body(&mut recv, &mut decoder))
                .await
                .unwrap_or_else(|_| Err(idle_error(idle))),
        };
        match event {
            Ok(BodyEvent::Data(b)) => {
                match tunnel::read_body(&mut recv, &mut decoder).now_or_never() {
                    Some(Ok(BodyEvent::End)) => {
                        tunnel::close_read(recv);
                        Some((Ok((Frame::data(b), true)), None))
                    }
                    ahead => Some((Ok((Frame::data(b), false)), Some((recv, decoder, ahead)))),
                }
            }
            Ok(BodyEvent::Trailers(t)) => {
                tunnel::close_read(recv);
                Some((Ok((Frame::trailers(header_map(t)), true)), None))
            }
            Ok(BodyEvent::End) => {
                tunnel::close_read(recv);
                None
            }
            Err(e) => Some((Err(BoxError::from(e)), None)),
        }
    })
}

struct FromTunnel {
    frames: Pin<Box<dyn futures::Stream<Item = TunnelFrame> + Send + Sync>>,
    ended: bool,
}

impl Body for FromTunnel {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        use futures::StreamExt as _;
        if self.ended {
            return Poll::Ready(None);
        }
        let next = std::task::ready!(self.frames.poll_next_unpin(cx));
        self.ended = !matches!(next, Some(Ok((_, false))));
        Poll::Ready(next.map(|frame| frame.map(|(frame, _)| frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// Bytes of ready body frames gathered into one write before it goes.
const BATCH_LIMIT: usize = 64 * 1024;

/// Streams a hyper body into a tunnel stream after `batch` (the stream's
/// head, or nothing), then ends it. Frames the body has ready join the
/// batch: the first wait yields once, so the task reading the instance can
/// hand over the body that came with its head, and a small response leaves
/// as one packet (head, body, end and FIN) rather than two or three. It
/// fails when the body gives no frame for `idle`, or a batch (at most
/// 64 KiB) waits that long for the stream to take it.
pub async fn to_tunnel<B>(
    mut body: B,
    send: &mut SendStream,
    mut batch: tunnel::Batch,
    idle: Duration,
) -> Result<(), TunnelError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use futures::FutureExt as _;
    let mut yielded = false;
    loop {
        if body.is_end_stream() {
            batch.end(None)?;
            break;
        }
        if batch.len() >= BATCH_LIMIT {
            write_within(&mut batch, send, idle).await?;
        }
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None if !yielded && !batch.is_empty() => {
                yielded = true;
                tunnel::let_queued_tasks_run().await;
                continue;
            }
            None => {
                write_within(&mut batch, send, idle).await?;
                tokio::time::timeout(idle, body.frame())
                    .await
                    .map_err(|_| idle_error(idle))?
            }
        };
        let Some(frame) = next else {
            batch.end(None)?;
            break;
        };
        let frame = frame.map_err(|e| TunnelError::Stream(format!("body: {e}")))?;
        match frame.into_data() {
            Ok(data) => batch.data(data)?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let pairs = trailers
                        .iter()
                        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                        .collect();
                    batch.end(Some(pairs))?;
                    break;
                }
            }
        }
    }
    write_within(&mut batch, send, idle).await
}

/// Writes `batch`, failing if the peer takes none of it for `idle`.
async fn write_within(
    batch: &mut tunnel::Batch,
    send: &mut SendStream,
    idle: Duration,
) -> Result<(), TunnelError> {
    tokio::time::timeout(idle, batch.write(send))
        .await
        .unwrap_or_else(|_| Err(idle_error(idle)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{read_frame, Batch};
    use crate::wire::ResponseHead;

    /// Longer than any test here waits.
    const IDLE: Duration = Duration::from_secs(30);

    fn head() -> ResponseHead {
        ResponseHead {
            status: 200,
            headers: vec![("content-length".into(), b"1024".to_vec())],
            error: None,
            end_stream: false,
        }
    }

    /// A response whose body is in hand leaves as one STREAM frame (head,
    /// body, end and FIN together), the reader knows the body is over with
    /// its data, and neither side stops the other's stream.
    #[tokio::test]
    async fn a_small_response_is_one_frame_and_no_stream_is_stopped() {
        let (caller, served, _endpoints) = crate::tls::tests::connected_pair().await;
        let (mut request, mut response) = caller.open_bi().await.unwrap();
        request.write_all(b"request").await.unwrap();
        request.finish().unwrap();
        let (mut send, mut recv) = served.accept_bi().await.unwrap();
        let mut got = [0u8; 7];
        recv.read_exact(&mut got).await.unwrap();
        tunnel::close_read(recv);

        let frames_before = served.stats().frame_tx.stream;
        let data = Bytes::from(vec![7u8; 1024]);
        to_tunnel(
            full(data.clone()),
            &mut send,
            Batch::with_frame(&head()).unwrap(),
            IDLE,
        )
        .await
        .unwrap();
        send.finish().unwrap();

        let got: ResponseHead = read_frame(&mut response).await.unwrap();
        assert_eq!(got.status, 200);
        let mut body = from_tunnel(response, IDLE);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), data);
        assert!(body.is_end_stream(), "the end came with the data");
        assert!(body.frame().await.is_none());
        assert_eq!(served.stats().frame_tx.stream - frames_before, 1);

        // Both sides' STOP_SENDING would have left by the next round trip.
        let (mut probe, _probe_recv) = caller.open_bi().await.unwrap();
        probe.write_all(b"x").await.unwrap();
        let _probed = served.accept_bi().await.unwrap();
        assert_eq!(caller.stats().frame_tx.stop_sending, 0);
        assert_eq!(served.stats().frame_tx.stop_sending, 0);
    }

    /// A body that is not ready when the head goes does not hold the head
    /// back: the head leaves, then the body as it comes.
    #[tokio::test]
    async fn a_head_does_not_wait_for_a_slow_body() {
        let (caller, served, _endpoints) = crate::tls::tests::connected_pair().await;
        let (mut request, mut response) = caller.open_bi().await.unwrap();
        request.write_all(b"go").await.unwrap();
        let (mut send, _recv) = served.accept_bi().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let slow = http_body_util::StreamBody::new(tokio_stream_of(rx));
        let writer = tokio::spawn(async move {
            to_tunnel(slow, &mut send, Batch::with_frame(&head()).unwrap(), IDLE).await?;
            send.finish()
                .map_err(|e| TunnelError::Stream(e.to_string()))
        });
        let got: ResponseHead =
            tokio::time::timeout(std::time::Duration::from_secs(5), read_frame(&mut response))
                .await
                .expect("the head arrives before any body")
                .unwrap();
        assert_eq!(got.status, 200);
        tx.send(Ok(Frame::data(Bytes::from_static(b"late"))))
            .await
            .unwrap();
        drop(tx);
        let mut body = from_tunnel(response, IDLE);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"late"));
        assert!(body.frame().await.is_none());
        writer.await.unwrap().unwrap();
    }

    fn tokio_stream_of<T: Send + 'static>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> + Send + Unpin {
        Box::pin(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }))
    }

    /// A peer that sends a head and then nothing: the body fails after the
    /// idle time instead of holding the stream for good.
    #[tokio::test]
    async fn a_body_that_stops_coming_fails_after_the_idle_time() {
        let (caller, served, _endpoints) = crate::tls::tests::connected_pair().await;
        let (mut request, _response) = caller.open_bi().await.unwrap();
        request.write_all(b"go").await.unwrap();
        let (_send, mut recv) = served.accept_bi().await.unwrap();
        let mut got = [0u8; 2];
        recv.read_exact(&mut got).await.unwrap();

        let idle = Duration::from_millis(200);
        let start = std::time::Instant::now();
        let mut body = from_tunnel(recv, idle);
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("the body gives up by itself")
            .expect("an error, not the end");
        let error = frame.expect_err("a stalled body is an error").to_string();
        assert!(error.contains("moved nothing"), "{error}");
        assert!(start.elapsed() >= idle, "{:?}", start.elapsed());
        drop(request);
    }

    /// A local body that stops giving frames: the copy into the tunnel
    /// fails after the idle time, with what came before already sent.
    #[tokio::test]
    async fn a_stalled_local_body_ends_the_copy_after_the_idle_time() {
        let (caller, served, _endpoints) = crate::tls::tests::connected_pair().await;
        let (mut request, mut response) = caller.open_bi().await.unwrap();
        request.write_all(b"go").await.unwrap();
        let (mut send, _recv) = served.accept_bi().await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        tx.send(Ok(Frame::data(Bytes::from_static(b"early"))))
            .await
            .unwrap();
        let stalled = http_body_util::StreamBody::new(tokio_stream_of(rx));

        let idle = Duration::from_millis(200);
        let copied = tokio::time::timeout(
            Duration::from_secs(5),
            to_tunnel(
                stalled,
                &mut send,
                Batch::with_frame(&head()).unwrap(),
                idle,
            ),
        )
        .await
        .expect("the copy gives up by itself");
        let error = copied.expect_err("a stalled body is an error").to_string();
        assert!(error.contains("moved nothing"), "{error}");
        let got: ResponseHead = read_frame(&mut response).await.unwrap();
        assert_eq!(got.status, 200);
        let mut body = from_tunnel(response, IDLE);
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), Bytes::from_static(b"early"));
        drop(tx);
    }
}
