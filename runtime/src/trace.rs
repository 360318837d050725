//! Distributed traces (DESIGN section 9): the W3C trace context a request
//! carries (`traceparent`; `tracestate` passes through untouched) and the
//! spans this node records for a sampled request, one per mesh hop:
//!
//! - on the calling node, a server span for the request as the app sent it
//!   and a client span for each attempt (retries and hedges included), with
//!   the instance, attempt number, retry wait and `weft-error`;
//! - on the serving node, a server span for the attempt it hands to its
//!   instance, the child of the caller's attempt span.
//!
//! The instance sees a `traceparent` whose parent is the last weft span, so
//! its own spans hang under the mesh's. Spans leave through a bounded queue
//! ([`Tracer::record`] never waits); the exporter that drains it (OTLP) is
//! the node's business. With no exporter, nothing is parsed or recorded and
//! the headers pass through as any other.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::sync::mpsc;

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Spans waiting for the exporter; when it falls behind, newer spans are
/// dropped and counted in `weft_spans_dropped_total`.
pub const QUEUE: usize = 4096;

/// A trace's id: 16 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A span's id: 8 bytes, never all zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    fn random() -> Self {
        loop {
            let id: [u8; 16] = rand::random();
            if id != [0; 16] {
                return TraceId(id);
            }
        }
    }
}

impl SpanId {
    /// A fresh span id.
    pub fn random() -> Self {
        loop {
            let id: [u8; 8] = rand::random();
            if id != [0; 8] {
                return SpanId(id);
            }
        }
    }
}

/// Where a request stands in its trace: the trace and the span that is
/// the parent of whatever this hop records or calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: TraceId,
    /// The parent span, if the request came with one.
    pub parent: Option<SpanId>,
    /// The trace's flags (bit 0: sampled).
    pub flags: u8,
}

impl TraceContext {
    /// Reads a `traceparent` value (version `00`, or a later version's
    /// first four fields, as the spec asks). `None` for anything malformed:
    /// such a header is treated as absent.
    pub fn parse(value: &[u8]) -> Option<TraceContext> {
        let value = std::str::from_utf8(value).ok()?.trim();
        let mut fields = value.split('-');
        let version = fields.next()?;
        let (trace, parent, flags) = (fields.next()?, fields.next()?, fields.next()?);
        let later = fields.next();
        if version.len() != 2 || version == "ff" || (version == "00" && later.is_some()) {
            return None;
        }
        let _: u8 = u8::from_str_radix(version, 16).ok()?;
        let trace_id = TraceId(hex::<16>(trace)?);
        let parent = SpanId(hex::<8>(parent)?);
        let [flags] = hex::<1>(flags)?;
        if trace_id.0 == [0; 16] || parent.0 == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            parent: Some(parent),
            flags,
        })
    }

    /// Whether the trace is sampled (recorded).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` that makes `span` the parent of the next hop.
    pub fn header(&self, span: SpanId) -> HeaderValue {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id.0);
        s.push('-');
        push_hex(&mut s, &span.0);
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        HeaderValue::from_str(&s).expect("hex digits and dashes are a valid header value")
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
}

/// Whether a span is the mesh's side of a call it received or one it made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// A request received: from the app on the calling node, from a peer
    /// on the serving node.
    Server,
    /// An attempt sent to an instance.
    Client,
}

/// One span, as the exporter sends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Span {
    /// The trace it belongs to.
    pub trace_id: TraceId,
    /// Its own id.
    pub span_id: SpanId,
    /// Its parent's id (`None` for a trace this node started).
    pub parent: Option<SpanId>,
    /// The trace's flags, as received.
    pub flags: u8,
    /// `weft.request`, `weft.attempt` or `weft.inbound`.
    pub name: &'static str,
    /// Server or client.
    pub kind: SpanKind,
    /// When it began.
    pub start: SystemTime,
    /// When the response head was ready.
    pub end: SystemTime,
    /// What the mesh knows of the hop.
    pub hop: Hop,
}

/// The mesh's attributes of a span.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hop {
    /// The service called.
    pub service: String,
    /// The calling service (`-` for the anonymous caller).
    pub caller: String,
    /// The node that recorded the span.
    pub node: String,
    /// The instance called: `(node, id)`.
    pub instance: Option<(String, String)>,
    /// The HTTP method.
    pub method: String,
    /// The request target (path and query).
    pub path: String,
    /// The attempt's number (0 the first), for attempt and inbound spans.
    pub attempt: Option<u8>,
    /// Attempts made, for the request span.
    pub attempts: Option<u8>,
    /// Time waited before this attempt (or, for the request, before all of
    /// them) for the service to recover.
    pub retry_wait: Duration,
    /// The status answered.
    pub status: Option<u16>,
    /// The `weft-error` code when the mesh made the answer.
    pub error: Option<String>,
}

/// Decides which requests are traced and takes their spans. Cloned into
/// every place that records; off (the default) costs one branch.
#[derive(Debug, Clone, Default)]
pub struct Tracer(Option<Arc<Inner>>);

#[derive(Debug)]
struct Inner {
    /// Probability that a request arriving without a trace starts one.
    ratio: f64,
    spans: mpsc::Sender<Span>,
}

impl Tracer {
    /// No tracing: headers pass through, nothing is recorded.
    pub fn off() -> Self {
        Tracer(None)
    }

    /// A tracer that starts a trace for `ratio` of the requests that come
    /// without one, and the queue its spans leave by.
    pub fn new(ratio: f64) -> (Self, mpsc::Receiver<Span>) {
        let (spans, rx) = mpsc::channel(QUEUE);
        let ratio = if ratio.is_finite() {
            ratio.clamp(0.0, 1.0)
        } else {
            0.0
        };
        (Tracer(Some(Arc::new(Inner { ratio, spans }))), rx)
    }

    /// The sampled trace a request from an app joins: the one its
    /// `traceparent` names, or a new one for the sampling ratio of those
    /// without. `None`: nothing to record (unsampled traces pass through
    /// as they came).
    pub fn join(&self, headers: &HeaderMap) -> Option<TraceContext> {
        let inner = self.0.as_ref()?;
        match headers.get(TRACEPARENT) {
            Some(value) => TraceContext::parse(value.as_bytes()).filter(TraceContext::sampled),
            None if inner.ratio > 0.0 && rand::random::<f64>() < inner.ratio => {
                Some(TraceContext {
                    trace_id: TraceId::random(),
                    parent: None,
                    flags: 1,
                })
            }
            None => None,
        }
    }

    /// The sampled trace a peer's request continues, if any: the serving
    /// node never starts one (the caller decided).
    pub fn follow(&self, headers: &HeaderMap) -> Option<TraceContext> {
        self.0.as_ref()?;
        let value = headers.get(TRACEPARENT)?;
        TraceContext::parse(value.as_bytes()).filter(TraceContext::sampled)
    }

    /// Hands a finished span to the exporter without waiting; a full queue
    /// drops it.
    pub fn record(&self, span: Span) {
        let Some(inner) = &self.0 else { return };
        if inner.spans.try_send(span).is_err() {
            metrics::counter!("weft_spans_dropped_total", "reason" => "queue_full").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_round_trips() {
        let ctx = TraceContext::parse(SAMPLE.as_bytes()).unwrap();
        assert!(ctx.sampled());
        assert_eq!(
            ctx.parent,
            Some(SpanId(0x00f067aa0ba902b7u64.to_be_bytes()))
        );
        let again = ctx.header(ctx.parent.unwrap());
        assert_eq!(again.to_str().unwrap(), SAMPLE);
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad.as_bytes()), None, "{bad}");
        }
        // A later version may add fields after the four it shares with 00.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what";
        assert!(TraceContext::parse(later.as_bytes()).is_some());
    }

    #[test]
    fn sampling_follows_the_request_then_the_ratio() {
        let (always, _rx) = Tracer::new(1.0);
        let (never, _rx2) = Tracer::new(0.0);
        let none = HeaderMap::new();
        assert!(always.join(&none).is_some_and(|c| c.parent.is_none()));
        assert_eq!(never.join(&none), None);
        let mut sampled = HeaderMap::new();
        sampled.insert(TRACEPARENT, HeaderValue::from_static(SAMPLE));
        assert!(never.join(&sampled).is_some());
        let mut unsampled = HeaderMap::new();
        let off = SAMPLE.replace("-01", "-00");
        unsampled.insert(TRACEPARENT, HeaderValue::from_str(&off).unwrap());
        assert_eq!(always.join(&unsampled), None);
        assert_eq!(always.follow(&none), None);
        assert!(Tracer::off().join(&sampled).is_none());
    }

    #[test]
    fn a_full_queue_drops_instead_of_waiting() {
        let (tracer, mut rx) = Tracer::new(1.0);
        let span = Span {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            parent: None,
            flags: 1,
            name: "weft.request",
            kind: SpanKind::Server,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            hop: Hop::default(),
        };
        for _ in 0..QUEUE + 10 {
            tracer.record(span.clone());
        }
        let mut queued = 0;
        while rx.try_recv().is_ok() {
            queued += 1;
        }
        assert_eq!(queued, QUEUE);
    }
}
