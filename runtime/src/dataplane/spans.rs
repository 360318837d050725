//! The spans of one sampled request (see [`crate::trace`]): on the node it
//! entered, a server span for the request and a client span per attempt;
//! on the serving node, one server span for the attempt it received.

use std::time::{Duration, SystemTime};

use http::HeaderMap;
use hyper::Response;

use super::error::WEFT_ERROR;
use super::request::Forward;
use crate::trace::{Hop, Span, SpanId, SpanKind, TraceContext, Tracer, TRACEPARENT};

/// A sampled request on the node it entered.
#[derive(Debug)]
pub(super) struct RequestSpans {
    ctx: TraceContext,
    request: SpanId,
    started: SystemTime,
    /// What every span of the request says.
    base: Hop,
    /// The attempt in flight: its span, when it began, the wait before it.
    attempt: Option<(SpanId, SystemTime, Duration)>,
    /// Waited since the last attempt ended.
    waited: Duration,
}

impl RequestSpans {
    /// Begins the request's span as `fwd` entered on `node`.
    pub(super) fn begin(ctx: TraceContext, fwd: &Forward, node: &str) -> Self {
        RequestSpans {
            ctx,
            request: SpanId::random(),
            started: SystemTime::now(),
            base: Hop {
                service: fwd.service.clone(),
                caller: fwd.caller.as_str().to_string(),
                node: node.to_string(),
                method: fwd.method.as_str().to_string(),
                path: fwd.target.path().to_string(),
                ..Hop::default()
            },
            attempt: None,
            waited: Duration::ZERO,
        }
    }

    /// Time spent waiting for the service to recover before the next
    /// attempt.
    pub(super) fn waited(&mut self, wait: Duration) {
        self.waited += wait;
    }

    /// Begins an attempt: its span becomes the parent the instance's node
    /// sees in `headers`.
    pub(super) fn begin_attempt(&mut self, headers: &mut HeaderMap) {
        let span = SpanId::random();
        headers.insert(TRACEPARENT, self.ctx.header(span));
        let wait = std::mem::take(&mut self.waited);
        self.attempt = Some((span, SystemTime::now(), wait));
    }

    /// Ends the attempt in flight: number `attempt`, at `instance`, answered
    /// with `resp`.
    pub(super) fn end_attempt<B>(
        &mut self,
        tracer: &Tracer,
        attempt: u8,
        instance: (String, String),
        resp: &Response<B>,
    ) {
        let Some((span_id, start, wait)) = self.attempt.take() else {
            return;
        };
        tracer.record(Span {
            trace_id: self.ctx.trace_id,
            span_id,
            parent: Some(self.request),
            flags: self.ctx.flags,
            name: "weft.attempt",
            kind: SpanKind::Client,
            start,
            end: SystemTime::now(),
            hop: Hop {
                instance: Some(instance),
                attempt: Some(attempt),
                retry_wait: wait,
                ..answered(&self.base, resp)
            },
        });
    }

    /// Ends the request's span: `attempts` made, `waited` in all, `resp`
    /// the answer the app gets.
    pub(super) fn end<B>(
        self,
        tracer: &Tracer,
        attempts: u8,
        waited: Duration,
        instance: Option<(String, String)>,
        resp: &Response<B>,
    ) {
        tracer.record(Span {
            trace_id: self.ctx.trace_id,
            span_id: self.request,
            parent: self.ctx.parent,
            flags: self.ctx.flags,
            name: "weft.request",
            kind: SpanKind::Server,
            start: self.started,
            end: SystemTime::now(),
            hop: Hop {
                instance,
                attempts: Some(attempts),
                retry_wait: waited,
                ..answered(&self.base, resp)
            },
        });
    }
}

/// A peer's attempt on the node that serves it.
#[derive(Debug)]
pub(super) struct InboundSpan {
    ctx: TraceContext,
    span: SpanId,
    started: SystemTime,
}

impl InboundSpan {
    /// Begins the span of a peer's attempt that came with a sampled trace
    /// in `headers`; the instance sees this span as its parent.
    pub(super) fn begin(tracer: &Tracer, headers: &mut HeaderMap) -> Option<Self> {
        let ctx = tracer.follow(headers)?;
        let span = SpanId::random();
        headers.insert(TRACEPARENT, ctx.header(span));
        Some(InboundSpan {
            ctx,
            span,
            started: SystemTime::now(),
        })
    }

    /// Ends it: `hop` says what was called, `status` and `error` how it
    /// went.
    pub(super) fn end(self, tracer: &Tracer, hop: Hop) {
        tracer.record(Span {
            trace_id: self.ctx.trace_id,
            span_id: self.span,
            parent: self.ctx.parent,
            flags: self.ctx.flags,
            name: "weft.inbound",
            kind: SpanKind::Server,
            start: self.started,
            end: SystemTime::now(),
            hop,
        });
    }
}

/// `base` with the status and `weft-error` of `resp`.
fn answered<B>(base: &Hop, resp: &Response<B>) -> Hop {
    Hop {
        status: Some(resp.status().as_u16()),
        error: resp
            .headers()
            .get(WEFT_ERROR)
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        ..base.clone()
    }
}
