//! Body framing on a tunnel stream: pure, incremental, bounded.
//!
//! After the head frame an HTTP body travels as parts, each opening with a
//! 4-byte big-endian prefix:
//!
//! ```text
//! len in 1..=MAX_CHUNK   len bytes of body data follow
//! 0                      the body is over, no trailers
//! u32::MAX               one wire frame of trailers follows; the body is over
//! ```
//!
//! [`BodyDecoder`] turns bytes into [`BodyEvent`]s. It asks for at most the
//! bytes of the part it is in ([`BodyDecoder::wants`]), so a reader never
//! takes bytes that follow the body (an upgraded connection's raw bytes), and
//! it never allocates for a chunk: data is handed on as it arrives, and only
//! the 4-byte prefix and a trailers frame (at most [`MAX_FRAME`](super::MAX_FRAME)) are buffered.

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use super::{decode, encode, frame_len, Decoded, WireError, PREFIX_LEN};

/// Largest data chunk a sender announces; larger bodies go as several chunks.
pub const MAX_CHUNK: usize = 1024 * 1024;

const END: u32 = 0;
const TRAILERS: u32 = u32::MAX;

/// Header pairs (lowercase name, raw value), as in the heads.
pub type Headers = Vec<(String, Vec<u8>)>;

/// The trailers frame: the same bounded header list as a head carries.
#[derive(Debug, Serialize, Deserialize)]
struct Trailers(#[serde(with = "super::header_list")] Headers);

/// What a body decoder produced.
#[derive(Debug, Clone, PartialEq)]
pub enum BodyEvent {
    /// Body bytes (part of a chunk, as they arrived).
    Data(Bytes),
    /// Trailers; the body is over.
    Trailers(Headers),
    /// The body is over.
    End,
}

// === Encoding ===

/// The prefix of a data chunk of `len` bytes (`1..=MAX_CHUNK`).
pub fn data_prefix(len: usize) -> Result<[u8; PREFIX_LEN], WireError> {
    if len == 0 || len > MAX_CHUNK {
        return Err(WireError::Invalid(format!(
            "a body chunk holds 1 to {MAX_CHUNK} bytes, not {len}"
        )));
    }
    // MAX_CHUNK < u32::MAX, so the cast is exact.
    Ok((len as u32).to_be_bytes())
}

/// The marker that ends a body without trailers.
pub fn end_marker() -> [u8; PREFIX_LEN] {
    END.to_be_bytes()
}

/// The trailers part: the marker and one bounded frame.
pub fn encode_trailers(trailers: Headers) -> Result<Vec<u8>, WireError> {
    let frame = encode(&Trailers(trailers))?;
    let mut out = Vec::with_capacity(PREFIX_LEN + frame.len());
    out.extend_from_slice(&TRAILERS.to_be_bytes());
    out.extend_from_slice(&frame);
    Ok(out)
}

// === Decoding ===

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a part's prefix.
    Prefix,
    /// Inside a data chunk with this many bytes still to come.
    Data(usize),
    /// Reading the trailers frame (its own prefix, then its payload).
    Trailers,
    /// The body is over; nothing more belongs to it.
    Done,
}

/// Incremental decoder of one framed body.
#[derive(Debug)]
pub struct BodyDecoder {
    state: State,
    /// A part prefix read so far (no allocation per part).
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    /// The trailers frame read so far.
    buf: BytesMut,
}

impl Default for BodyDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl BodyDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> Self {
        BodyDecoder {
            state: State::Prefix,
            prefix: [0; PREFIX_LEN],
            prefix_len: 0,
            buf: BytesMut::new(),
        }
    }

    /// How many bytes the decoder takes next, at most: the rest of the
    /// current prefix, chunk or trailers frame; 0 once the body is over.
    pub fn wants(&self) -> usize {
        match self.state {
            State::Prefix => PREFIX_LEN - self.prefix_len,
            State::Data(remaining) => remaining,
            State::Trailers => match self.buf.first_chunk::<PREFIX_LEN>() {
                None => PREFIX_LEN - self.buf.len(),
                // A bad length is reported by `feed`; ask for nothing more.
                Some(prefix) => frame_len(*prefix)
                    .map(|len| PREFIX_LEN + len - self.buf.len())
                    .unwrap_or(0),
            },
            State::Done => 0,
        }
    }

    /// True once the end marker or the trailers were decoded.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Bytes held between calls (a partial prefix or trailers frame), so
    /// tests can show a chunk's announced length is never allocated.
    pub fn buffered(&self) -> usize {
        self.buf.capacity()
    }

    /// Takes the next bytes of the stream (`bytes.len() <= wants()`; any
    /// excess is an error, since it would belong to what follows the body)
    /// and returns the event they complete, if any.
    pub fn feed(&mut self, mut bytes: Bytes) -> Result<Option<BodyEvent>, WireError> {
        if bytes.len() > self.wants() {
            return Err(WireError::Invalid(format!(
                "{} bytes fed where the body wants {}",
                bytes.len(),
                self.wants()
            )));
        }
        match self.state {
            State::Done => Ok(None),
            State::Data(remaining) => {
                if bytes.is_empty() {
                    return Ok(None);
                }
                let left = remaining - bytes.len();
                self.state = if left == 0 {
                    State::Prefix
                } else {
                    State::Data(left)
                };
                Ok(Some(BodyEvent::Data(bytes.split_to(bytes.len()))))
            }
            State::Prefix => {
                self.prefix[self.prefix_len..self.prefix_len + bytes.len()].copy_from_slice(&bytes);
                self.prefix_len += bytes.len();
                if self.prefix_len < PREFIX_LEN {
                    return Ok(None);
                }
                self.prefix_len = 0;
                let value = u32::from_be_bytes(self.prefix);
                match value {
                    END => {
                        self.finish();
                        Ok(Some(BodyEvent::End))
                    }
                    TRAILERS => {
                        self.state = State::Trailers;
                        Ok(None)
                    }
                    len if len as usize > MAX_CHUNK => Err(WireError::TooLarge {
                        len: len as usize,
                        max: MAX_CHUNK,
                    }),
                    len => {
                        self.state = State::Data(len as usize);
                        Ok(None)
                    }
                }
            }
            State::Trailers => {
                self.buf.extend_from_slice(&bytes);
                match decode::<Trailers>(&self.buf)? {
                    Decoded::Incomplete { .. } => Ok(None),
                    Decoded::Frame { msg, .. } => {
                        self.finish();
                        Ok(Some(BodyEvent::Trailers(msg.0)))
                    }
                }
            }
        }
    }

    fn finish(&mut self) {
        self.state = State::Done;
        self.buf = BytesMut::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::MAX_FRAME;
    use proptest::prelude::*;

    /// One part of a body as a test describes it.
    #[derive(Debug, Clone)]
    enum Part {
        Data(Vec<u8>),
        Trailers(Headers),
    }

    fn encode_body(parts: &[Part]) -> Vec<u8> {
        let mut out = Vec::new();
        for part in parts {
            match part {
                Part::Data(d) if d.is_empty() => {}
                Part::Data(d) => {
                    out.extend_from_slice(&data_prefix(d.len()).unwrap());
                    out.extend_from_slice(d);
                }
                Part::Trailers(t) => {
                    out.extend_from_slice(&encode_trailers(t.clone()).unwrap());
                    return out;
                }
            }
        }
        out.extend_from_slice(&end_marker());
        out
    }

    /// Feeds `bytes` in pieces of at most `step` (and `wants()`), collecting
    /// the events; returns them and how many bytes the body used.
    fn decode_all(
        bytes: &[u8],
        step: usize,
    ) -> Result<(Vec<u8>, Option<Headers>, usize), WireError> {
        let mut d = BodyDecoder::new();
        let mut at = 0;
        let mut data = Vec::new();
        let mut trailers = None;
        while !d.is_done() && at < bytes.len() {
            let n = d.wants().min(step.max(1)).min(bytes.len() - at);
            match d.feed(Bytes::copy_from_slice(&bytes[at..at + n]))? {
                Some(BodyEvent::Data(b)) => data.extend_from_slice(&b),
                Some(BodyEvent::Trailers(t)) => trailers = Some(t),
                Some(BodyEvent::End) | None => {}
            }
            at += n;
        }
        Ok((data, trailers, at))
    }

    fn header() -> impl Strategy<Value = (String, Vec<u8>)> {
        (
            "[a-z][a-z0-9-]{0,12}",
            proptest::collection::vec(any::<u8>(), 0..24),
        )
    }

    fn part() -> impl Strategy<Value = Part> {
        prop_oneof![
            4 => proptest::collection::vec(any::<u8>(), 0..300).prop_map(Part::Data),
            1 => proptest::collection::vec(header(), 0..6).prop_map(Part::Trailers),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn round_trip_in_any_pieces(parts in proptest::collection::vec(part(), 0..8), step in 1usize..64, tail in proptest::collection::vec(any::<u8>(), 0..16)) {
            let mut bytes = encode_body(&parts);
            let body_len = bytes.len();
            bytes.extend_from_slice(&tail);
            let (data, trailers, used) = decode_all(&bytes, step).unwrap();
            let mut want_data = Vec::new();
            let mut want_trailers = None;
            for p in &parts {
                match p {
                    Part::Data(d) => want_data.extend_from_slice(d),
                    Part::Trailers(t) => { want_trailers = Some(t.clone()); break; }
                }
            }
            prop_assert_eq!(data, want_data);
            prop_assert_eq!(trailers, want_trailers);
            // Nothing after the body is taken: it belongs to an upgraded stream.
            prop_assert_eq!(used, body_len);
        }

        #[test]
        fn arbitrary_bytes_never_panic_or_buffer_much(bytes in proptest::collection::vec(any::<u8>(), 0..2048), step in 1usize..512) {
            let mut d = BodyDecoder::new();
            let mut at = 0;
            while at < bytes.len() && !d.is_done() {
                let n = d.wants().min(step).min(bytes.len() - at);
                if n == 0 { break; }
                if d.feed(Bytes::copy_from_slice(&bytes[at..at + n])).is_err() { break; }
                prop_assert!(d.buffered() <= PREFIX_LEN + MAX_FRAME);
                at += n;
            }
        }
    }

    #[test]
    fn an_announced_chunk_is_not_allocated() {
        let mut d = BodyDecoder::new();
        let prefix = data_prefix(MAX_CHUNK).unwrap();
        assert_eq!(d.feed(Bytes::copy_from_slice(&prefix)).unwrap(), None);
        assert_eq!(d.wants(), MAX_CHUNK);
        assert!(d.buffered() < 64, "buffered {}", d.buffered());
        let ev = d.feed(Bytes::from_static(b"abc")).unwrap();
        assert_eq!(ev, Some(BodyEvent::Data(Bytes::from_static(b"abc"))));
        assert_eq!(d.wants(), MAX_CHUNK - 3);
    }

    #[test]
    fn oversized_chunk_and_overfeeding_are_errors() {
        let mut d = BodyDecoder::new();
        let too_big = u32::try_from(MAX_CHUNK + 1).unwrap().to_be_bytes();
        assert!(matches!(
            d.feed(Bytes::copy_from_slice(&too_big)),
            Err(WireError::TooLarge { .. })
        ));
        let mut d = BodyDecoder::new();
        assert!(d.feed(Bytes::from_static(b"12345")).is_err());
        assert!(data_prefix(0).is_err());
        assert!(data_prefix(MAX_CHUNK + 1).is_err());
    }

    #[test]
    fn oversized_trailers_frame_is_refused_before_it_is_read() {
        let mut d = BodyDecoder::new();
        d.feed(Bytes::copy_from_slice(&TRAILERS.to_be_bytes()))
            .unwrap();
        let len = u32::try_from(MAX_FRAME + 1).unwrap().to_be_bytes();
        assert!(matches!(
            d.feed(Bytes::copy_from_slice(&len)),
            Err(WireError::TooLarge { .. })
        ));
        assert_eq!(d.wants(), 0);
    }
}
