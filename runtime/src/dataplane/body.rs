//! Moving HTTP bodies between hyper and tunnel streams without buffering them.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use quinn::{RecvStream, SendStream};

use super::request::header_map;
use super::{BoxError, Busy, ProxyBody};
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

/// A hyper body that reads framed chunks from a tunnel stream as they arrive.
pub fn from_tunnel(recv: RecvStream) -> ProxyBody {
    FromTunnel {
        frames: Box::pin(tunnel_frames(recv)),
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
fn tunnel_frames(recv: RecvStream) -> impl futures::Stream<Item = TunnelFrame> + Send + Sync {
    use futures::FutureExt as _;
    let start: Option<Reading> = Some((recv, BodyDecoder::new(), None));
    futures::stream::unfold(start, |state| async move {
        let (mut recv, mut decoder, ahead) = state?;
        let event = match ahead {
            Some(event) => event,
            None => tunnel::read_body(&mut recv, &mut decoder).await,
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
                Some((Ok((Frame::trailers(header_map(&t)), true)), None))
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
/// as one packet (head, body, end and FIN) rather than two or three.
pub async fn to_tunnel<B>(
    mut body: B,
    send: &mut SendStream,
    mut batch: tunnel::Batch,
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
            batch.write(send).await?;
        }
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None if !yielded && !batch.is_empty() => {
                yielded = true;
                tunnel::let_queued_tasks_run().await;
                continue;
            }
            None => {
                batch.write(send).await?;
                body.frame().await
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
    batch.write(send).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::{read_frame, Batch};
    use crate::wire::ResponseHead;

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
        )
        .await
        .unwrap();
        send.finish().unwrap();

        let got: ResponseHead = read_frame(&mut response).await.unwrap();
        assert_eq!(got.status, 200);
        let mut body = from_tunnel(response);
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
            to_tunnel(slow, &mut send, Batch::with_frame(&head()).unwrap()).await?;
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
        let mut body = from_tunnel(response);
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
}
