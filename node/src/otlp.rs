//! Span export over OTLP/gRPC (`--otlp-endpoint`): one task drains the data
//! plane's span queue in batches and sends each to the collector, one call
//! at a time. A collector that is down or slow costs dropped spans
//! (`weft_spans_dropped_total{reason="export"}`), never a request's time:
//! the queue in front of this task is bounded and never waited on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1 as otlp;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use weft_runtime::trace::{Span, SpanKind};

/// Spans sent in one export call at most.
const BATCH: usize = 512;
/// The longest a span waits for its batch to fill.
const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// The longest one export call may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends the spans that arrive on `spans` to the collector at `endpoint`
/// until the queue closes, as node `node`.
pub async fn export(endpoint: http::Uri, node: String, mut spans: mpsc::Receiver<Span>) {
    let channel = Channel::builder(endpoint.clone())
        .connect_timeout(Duration::from_secs(5))
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    let mut client = TraceServiceClient::new(channel);
    let resource = resource(&node);
    let mut batch = Vec::with_capacity(BATCH);
    let mut warned = false;
    loop {
        let deadline = tokio::time::sleep(FLUSH_EVERY);
        tokio::pin!(deadline);
        // Fill a batch, or send what came within the flush period.
        while batch.len() < BATCH {
            tokio::select! {
                span = spans.recv() => match span {
                    Some(span) => batch.push(to_otlp(span)),
                    None => break,
                },
                () = &mut deadline => break,
            }
        }
        if batch.is_empty() {
            if spans.is_closed() && spans.is_empty() {
                return;
            }
            continue;
        }
        let count = batch.len() as u64;
        let request = ExportTraceServiceRequest {
            resource_spans: vec![otlp::ResourceSpans {
                resource: Some(resource.clone()),
                scope_spans: vec![otlp::ScopeSpans {
                    scope: Some(scope()),
                    spans: std::mem::take(&mut batch),
                    schema_url: String::new(),
                }],
                schema_url: String::new(),
            }],
        };
        match client.export(request).await {
            Ok(_) => {
                metrics::counter!("weft_spans_exported_total").increment(count);
                warned = false;
            }
            Err(status) => {
                metrics::counter!("weft_spans_dropped_total", "reason" => "export")
                    .increment(count);
                // One warning per outage of the collector, not one a batch.
                if !warned {
                    tracing::warn!(%endpoint, error = %status.message(), code = ?status.code(),
                        "could not export spans; dropping them until the collector answers");
                    warned = true;
                }
            }
        }
    }
}

/// Who sent the spans: the `weft` service on node `node`.
fn resource(node: &str) -> Resource {
    Resource {
        attributes: vec![
            string("service.name", "weft"),
            string("service.instance.id", node),
            string("weft.node", node),
        ],
        ..Resource::default()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope {
        name: "weft".to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        ..InstrumentationScope::default()
    }
}

/// A span in OTLP's terms: the hop's facts become `weft.*` attributes, the
/// status `http.response.status_code`, a `weft-error` the span's error.
fn to_otlp(span: Span) -> otlp::Span {
    let hop = span.hop;
    let mut attributes = vec![
        string("weft.service", &hop.service),
        string("weft.caller", &hop.caller),
        string("weft.node", &hop.node),
        string("http.request.method", &hop.method),
        string("url.path", &hop.path),
    ];
    if let Some((node, id)) = &hop.instance {
        attributes.push(string("weft.instance", id));
        attributes.push(string("weft.instance.node", node));
    }
    if let Some(attempt) = hop.attempt {
        attributes.push(int("weft.attempt", i64::from(attempt)));
    }
    if let Some(attempts) = hop.attempts {
        attributes.push(int("weft.attempts", i64::from(attempts)));
    }
    let wait_ms = i64::try_from(hop.retry_wait.as_millis()).unwrap_or(i64::MAX);
    attributes.push(int("weft.retry_wait_ms", wait_ms));
    if let Some(status) = hop.status {
        attributes.push(int("http.response.status_code", i64::from(status)));
    }
    let status = match &hop.error {
        Some(error) => {
            attributes.push(string("weft.error", error));
            otlp::Status {
                message: error.clone(),
                code: otlp::status::StatusCode::Error as i32,
            }
        }
        None if hop.status.is_some_and(|s| s >= 500) => otlp::Status {
            message: String::new(),
            code: otlp::status::StatusCode::Error as i32,
        },
        None => otlp::Status::default(),
    };
    let kind = match span.kind {
        SpanKind::Server => otlp::span::SpanKind::Server,
        SpanKind::Client => otlp::span::SpanKind::Client,
    };
    otlp::Span {
        trace_id: span.trace_id.0.to_vec(),
        span_id: span.span_id.0.to_vec(),
        parent_span_id: span.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
        flags: u32::from(span.flags),
        name: span.name.to_string(),
        kind: kind as i32,
        start_time_unix_nano: unix_nanos(span.start),
        end_time_unix_nano: unix_nanos(span.end),
        attributes,
        status: Some(status),
        ..otlp::Span::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn string(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..KeyValue::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}
