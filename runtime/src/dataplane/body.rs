//! Moving HTTP bodies between hyper and tunnel streams without buffering them.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
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
    let start = Some((recv, BodyDecoder::new()));
    let frames = futures::stream::unfold(start, |state| async move {
        let (mut recv, mut decoder) = state?;
        match tunnel::read_body(&mut recv, &mut decoder).await {
            Ok(BodyEvent::Data(b)) => Some((Ok(Frame::data(b)), Some((recv, decoder)))),
            Ok(BodyEvent::Trailers(t)) => Some((Ok(Frame::trailers(header_map(&t))), None)),
            Ok(BodyEvent::End) => None,
            Err(e) => Some((Err(BoxError::from(e)), None)),
        }
    });
    StreamBody::new(frames).boxed()
}

/// Streams a hyper body into a tunnel stream, chunk by chunk, then ends it.
pub async fn to_tunnel<B>(mut body: B, send: &mut SendStream) -> Result<(), TunnelError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| TunnelError::Stream(format!("body: {e}")))?;
        match frame.into_data() {
            Ok(data) => tunnel::write_data(send, data).await?,
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let pairs = trailers
                        .iter()
                        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
                        .collect();
                    return tunnel::write_end(send, Some(pairs)).await;
                }
            }
        }
    }
    tunnel::write_end(send, None).await
}
