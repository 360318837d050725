//! The tunnel codec: the only module that touches bincode.
//!
//! Every QUIC bidirectional stream between nodes opens with one frame holding a
//! [`RequestHead`]; the answer opens with one frame holding a [`ResponseHead`];
//! HTTP bodies then flow as framed parts ([`body`]), TCP streams and upgraded
//! connections as raw bytes. A frame is a 4-byte big-endian payload length
//! followed by a bincode 2 payload (standard config, decode limit
//! [`MAX_FRAME`]). Keeping every bincode call here means the format can be
//! swapped (for postcard, say) by editing one file.
//!
//! Nothing a peer sends can make this module panic or allocate more than the
//! frame it announced, and that announcement is checked against [`MAX_FRAME`]
//! before anything is read or allocated.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod body;

/// Largest HTTP request or response head the mesh admits, counted as the
/// bytes of the method, target and every header name and value. The proxy
/// refuses larger heads (431 / 502) before anything crosses the tunnel.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Largest payload of one frame, in bytes: a head of [`MAX_HEAD_BYTES`] plus
/// its encoding overhead (at most [`MAX_HEADERS`] pairs of length varints,
/// service and instance names), so the frame limit never refuses what the
/// HTTP side admits. Bounds what we send and what we accept alike.
pub const MAX_FRAME: usize = MAX_HEAD_BYTES + 8 * 1024;

/// Length of the big-endian length prefix, so async readers know how much to
/// read before calling [`frame_len`].
pub const PREFIX_LEN: usize = 4;

/// Version of the head format. A node refuses heads from another version
/// instead of guessing at their meaning; bump it on any incompatible change.
pub const WIRE_VERSION: u8 = 2;

/// A version of the tunnel protocol, named in the handshake by ALPN
/// (`weft/N`). Both ends offer every version they speak, newest first, and
/// the newest both speak wins (the server's order decides). A release
/// speaks its own version and the one before, so adjacent releases always
/// agree on one; a stream kind a version lacks is never sent on a
/// connection of that version.
///
/// - `weft/1`: HTTP, TCP and key streams, heads of format [`WIRE_VERSION`].
/// - `weft/2`: `weft/1` and tap streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TunnelVersion {
    /// `weft/1`.
    V1,
    /// `weft/2`.
    V2,
}

impl TunnelVersion {
    /// The versions this build speaks, newest (most preferred) first.
    pub const SPOKEN: [TunnelVersion; 2] = [TunnelVersion::V2, TunnelVersion::V1];

    /// Its ALPN protocol name.
    pub fn alpn(self) -> &'static [u8] {
        match self {
            TunnelVersion::V1 => b"weft/1",
            TunnelVersion::V2 => b"weft/2",
        }
    }

    /// The version an ALPN protocol name stands for, if this build speaks it.
    pub fn from_alpn(name: &[u8]) -> Option<TunnelVersion> {
        Self::SPOKEN.into_iter().find(|v| v.alpn() == name)
    }

    /// Whether streams of `kind` may be sent on a connection of this version.
    pub fn carries(self, kind: StreamKind) -> bool {
        match kind {
            StreamKind::Http | StreamKind::Tcp | StreamKind::Key => true,
            StreamKind::Tap => self >= TunnelVersion::V2,
        }
    }
}

impl std::fmt::Display for TunnelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(self.alpn()).unwrap_or("weft/?"))
    }
}

/// Most headers one head may carry. Checked while decoding (so a peer cannot
/// make us build a long list) and by [`RequestHead::validate`] (so we never
/// send what the other side would refuse).
pub const MAX_HEADERS: usize = 256;

/// The bincode configuration of every frame. The limit makes bincode refuse a
/// length field that claims more bytes than a frame can hold before it
/// allocates for it.
fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME>()
}

// === Errors ===

/// Why a frame could not be encoded, decoded or accepted. The tunnel maps
/// these to a refused stream; none of them is a reason to drop the connection
/// of a well-behaved peer except `TooLarge` and `Malformed`.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// A frame is larger than [`MAX_FRAME`]; refused before buffering it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// Payload length that was announced or produced.
        len: usize,
        /// The limit it broke.
        max: usize,
    },
    /// The payload is not a valid encoding of the expected message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The peer speaks another version of the head format.
    #[error("unsupported wire version {0} (this node speaks {WIRE_VERSION})")]
    UnsupportedVersion(u8),
    /// The head decoded but breaks a rule of the contract (empty service, bad
    /// header name, too many headers).
    #[error("invalid head: {0}")]
    Invalid(String),
}

// === Messages ===

/// What a stream carries after its head, so the receiving node knows whether
/// to speak HTTP to the instance or splice raw TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamKind {
    /// One HTTP request and its response.
    Http,
    /// A raw TCP connection (`weft upstream`).
    Tcp,
    /// A request for a gossip key by id (a node that lacks a key the
    /// cluster's keyring names asks a member that holds it).
    Key,
    /// A tap of the node's requests (`weft tap` asked at another node):
    /// request lines follow the response head until the asker stops.
    Tap,
}

/// First frame of every tunnel stream: everything the remote node needs to
/// reach its local instance and to honour the caller's deadline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestHead {
    /// Format version, [`WIRE_VERSION`] when we send; checked on receipt.
    pub version: u8,
    /// HTTP request or raw TCP.
    pub kind: StreamKind,
    /// Service name, as in the catalog.
    pub service: String,
    /// Instance of that service that the sending node chose.
    pub instance: String,
    /// HTTP method (empty for TCP).
    pub method: String,
    /// Request target (path and query; empty for TCP).
    pub uri: String,
    /// HTTP headers as (lowercase name, raw value); values are bytes because
    /// HTTP allows non-UTF-8 header values.
    #[serde(with = "header_list")]
    pub headers: Vec<(String, Vec<u8>)>,
    /// Remaining time budget in milliseconds, so the remote node stops working
    /// when the caller has given up.
    pub deadline_ms: u32,
    /// 0 for the first try, then the retry number (for stats and logs).
    pub attempt: u8,
    /// The caller spoke HTTP/2 (h2c, gRPC): the instance is called with h2 too.
    pub http2: bool,
    /// The request has no body: no body framing follows the head, and the
    /// instance sees the request end with its head (HTTP/2 END_STREAM).
    pub end_stream: bool,
}

/// A [`RequestHead`] borrowed from the request it describes, for sending:
/// it encodes to the same bytes without copying the request's strings and
/// headers into owned ones first.
#[derive(Debug, Serialize)]
pub struct RequestHeadRef<'a> {
    /// As [`RequestHead::version`].
    pub version: u8,
    /// As [`RequestHead::kind`].
    pub kind: StreamKind,
    /// As [`RequestHead::service`].
    pub service: &'a str,
    /// As [`RequestHead::instance`].
    pub instance: &'a str,
    /// As [`RequestHead::method`].
    pub method: &'a str,
    /// As [`RequestHead::uri`].
    pub uri: &'a str,
    /// As [`RequestHead::headers`]: every value of the map, in its order.
    #[serde(serialize_with = "header_list::serialize_map")]
    pub headers: &'a http::HeaderMap,
    /// As [`RequestHead::deadline_ms`].
    pub deadline_ms: u32,
    /// As [`RequestHead::attempt`].
    pub attempt: u8,
    /// As [`RequestHead::http2`].
    pub http2: bool,
    /// As [`RequestHead::end_stream`].
    pub end_stream: bool,
}

/// First frame of every response on a tunnel stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseHead {
    /// HTTP status of the instance, or the mesh status when `error` is set.
    pub status: u16,
    /// Response headers as (lowercase name, raw value).
    #[serde(with = "header_list")]
    pub headers: Vec<(String, Vec<u8>)>,
    /// Mesh error code (for example `upstream-unreachable`) when the remote
    /// node itself failed, so the caller can tell it from an instance's own
    /// 502 and decide whether to retry.
    pub error: Option<String>,
    /// The response has no body: no body framing follows the head, and the
    /// app sees the response end with its head. A gRPC Trailers-Only
    /// response (every gRPC error) is one HEADERS frame that ends the
    /// stream; clients read its status only in that form.
    pub end_stream: bool,
}

/// Result of [`decode`] on a buffer that may not hold a whole frame yet, so a
/// caller can keep reading without a second parse of the prefix.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<T> {
    /// A whole frame was decoded.
    Frame {
        /// The decoded message.
        msg: T,
        /// Bytes of the buffer the frame used (prefix included); the rest
        /// belongs to the stream body.
        used: usize,
    },
    /// More bytes are needed.
    Incomplete {
        /// Total buffer length (from the start of the frame) needed to decode:
        /// [`PREFIX_LEN`] until the prefix is known, then prefix plus payload.
        needed: usize,
    },
}

// === impl RequestHead ===

impl RequestHead {
    /// The head of a stream that asks a node itself rather than one of its
    /// instances (a gossip key, a tap): `what` names the request within
    /// `service`.
    pub fn control(
        kind: StreamKind,
        service: &str,
        what: &str,
        uri: String,
        deadline_ms: u32,
    ) -> Self {
        RequestHead {
            version: WIRE_VERSION,
            kind,
            service: service.to_string(),
            instance: what.to_string(),
            method: String::new(),
            uri,
            headers: Vec::new(),
            deadline_ms,
            attempt: 0,
            http2: false,
            end_stream: true,
        }
    }

    /// Checks the rules bincode cannot express, so a node refuses a bad head
    /// with a clear error instead of failing later on the instance side.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.version != WIRE_VERSION {
            return Err(WireError::UnsupportedVersion(self.version));
        }
        check_name("service", &self.service)?;
        check_name("instance", &self.instance)?;
        check_headers(&self.headers)
    }
}

/// Service and instance names are catalog keys and appear in logs and
/// headers: non-empty, printable ASCII without spaces.
fn check_name(what: &str, name: &str) -> Result<(), WireError> {
    if name.is_empty() {
        return Err(WireError::Invalid(format!("{what} name is empty")));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(WireError::Invalid(format!(
            "{what} name {name:?} is not printable ASCII"
        )));
    }
    Ok(())
}

/// Header names must be valid HTTP tokens already in lowercase (the form
/// HTTP/2 requires and `http::HeaderName` produces).
fn check_headers(headers: &[(String, Vec<u8>)]) -> Result<(), WireError> {
    if headers.len() > MAX_HEADERS {
        return Err(WireError::Invalid(format!(
            "{} headers, at most {MAX_HEADERS} allowed",
            headers.len()
        )));
    }
    for (name, _) in headers {
        match http::HeaderName::from_bytes(name.as_bytes()) {
            Ok(parsed) if parsed.as_str() == name => {}
            _ => {
                return Err(WireError::Invalid(format!(
                    "header name {name:?} is not a lowercase HTTP token"
                )))
            }
        }
    }
    Ok(())
}

// === Framing ===

/// Bytes reserved for a frame before it is encoded: a head with a dozen
/// ordinary headers fits, a bigger one grows the buffer as needed.
const TYPICAL_FRAME: usize = 512;

/// Encodes `msg` as one frame (length prefix and payload), refusing payloads
/// over [`MAX_FRAME`] so we never send what the peer must refuse.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    // Room for a usual head up front: grown write by write from the prefix
    // alone, the buffer moved about seven times per head.
    let mut out = Vec::with_capacity(TYPICAL_FRAME);
    out.extend_from_slice(&[0u8; PREFIX_LEN]);
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| WireError::Malformed(format!("cannot encode: {e}")))?;
    let len = out.len().saturating_sub(PREFIX_LEN);
    let prefix =
        u32::try_from(len)
            .ok()
            .filter(|_| len <= MAX_FRAME)
            .ok_or(WireError::TooLarge {
                len,
                max: MAX_FRAME,
            })?;
    if let Some(head) = out.get_mut(..PREFIX_LEN) {
        head.copy_from_slice(&prefix.to_be_bytes());
    }
    Ok(out)
}

/// Payload length announced by a prefix, checked against [`MAX_FRAME`], for
/// async readers that read the prefix and then exactly that many bytes.
pub fn frame_len(prefix: [u8; PREFIX_LEN]) -> Result<usize, WireError> {
    let len = usize::try_from(u32::from_be_bytes(prefix)).unwrap_or(usize::MAX);
    if len > MAX_FRAME {
        return Err(WireError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Decodes one frame from the start of `buf`, or says how many bytes are
/// needed. Bytes after the frame are left alone (they are the body). A
/// payload that does not decode to exactly its announced length is
/// `Malformed`: trailing bytes inside a frame mean the peer and we disagree
/// on the format.
pub fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<Decoded<T>, WireError> {
    let Some(prefix) = buf.first_chunk::<PREFIX_LEN>() else {
        return Ok(Decoded::Incomplete { needed: PREFIX_LEN });
    };
    let len = frame_len(*prefix)?;
    let total = PREFIX_LEN + len;
    let Some(payload) = buf.get(PREFIX_LEN..total) else {
        return Ok(Decoded::Incomplete { needed: total });
    };
    let (msg, read) = bincode::serde::decode_from_slice::<T, _>(payload, config())
        .map_err(|e| WireError::Malformed(describe(&e)))?;
    if read != len {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after a {read}-byte message",
            len.saturating_sub(read)
        )));
    }
    Ok(Decoded::Frame { msg, used: total })
}

/// One readable line for a bincode decode error (its `Display` is the
/// `Debug` form), naming the common cases in the peer's terms.
fn describe(e: &bincode::error::DecodeError) -> String {
    use bincode::error::DecodeError as E;
    match e {
        E::UnexpectedEnd { .. } => "payload ends inside a field".to_owned(),
        E::LimitExceeded => format!("a length field claims more than the {MAX_FRAME}-byte frame"),
        E::UnexpectedVariant { found, .. } => format!("unknown enum variant {found}"),
        E::Utf8 { .. } => "a string is not valid UTF-8".to_owned(),
        E::OtherString(s) => s.clone(),
        E::Other(s) => (*s).to_owned(),
        other => other.to_string(),
    }
}

// === Header lists ===

/// Serde glue for header lists: values go out as byte strings and come back
/// through `deserialize_byte_buf`, so every length a peer sends is checked
/// against the frame limit before anything is allocated; the list itself is
/// capped at [`MAX_HEADERS`].
mod header_list {
    use std::fmt;

    use serde::de::{self, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{MAX_FRAME, MAX_HEADERS};

    type Headers = Vec<(String, Vec<u8>)>;

    struct BytesRef<'a>(&'a [u8]);

    impl Serialize for BytesRef<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub(super) fn serialize<S: Serializer>(headers: &Headers, s: S) -> Result<S::Ok, S::Error> {
        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
        serialize_pairs(headers.len(), pairs, s)
    }

    /// The same list from a header map: each value as one pair.
    pub(super) fn serialize_map<S: Serializer>(
        headers: &&http::HeaderMap,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let pairs = headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes()));
        serialize_pairs(headers.len(), pairs, s)
    }

    fn serialize_pairs<'a, S: Serializer>(
        len: usize,
        pairs: impl Iterator<Item = (&'a str, &'a [u8])>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(len))?;
        for (name, value) in pairs {
            seq.serialize_element(&(name, BytesRef(value)))?;
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Headers, D::Error> {
        d.deserialize_seq(HeadersVisitor)
    }

    struct HeadersVisitor;

    impl<'de> Visitor<'de> for HeadersVisitor {
        type Value = Headers;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "at most {MAX_HEADERS} (name, value) pairs")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Headers, A::Error> {
            let hint = seq.size_hint().unwrap_or(0);
            if hint > MAX_HEADERS {
                return Err(de::Error::custom(format!(
                    "{hint} headers, at most {MAX_HEADERS} allowed"
                )));
            }
            let mut out = Vec::with_capacity(hint);
            while let Some((name, OwnedBytes(value))) =
                seq.next_element::<(String, OwnedBytes)>()?
            {
                if out.len() == MAX_HEADERS {
                    return Err(de::Error::custom(format!(
                        "more than {MAX_HEADERS} headers"
                    )));
                }
                out.push((name, value));
            }
            Ok(out)
        }
    }

    struct OwnedBytes(Vec<u8>);

    impl<'de> Deserialize<'de> for OwnedBytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_byte_buf(BytesVisitor).map(OwnedBytes)
        }
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a header value as bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        // Formats without a byte-string type send a sequence of u8.
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_FRAME));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests;
