//! Request outcomes: what the data plane reports for every request, through one
//! bounded channel, so statistics never sit on the request path.

use std::time::Duration;

use tokio::sync::mpsc;

use crate::caller::Caller;

/// How a request ended, as the statistics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeClass {
    /// 1xx-4xx from the instance.
    Success,
    /// 5xx from the instance.
    ServerError,
    /// The mesh could not reach the instance (connect failure, reset).
    Unreachable,
    /// No response head within the deadline.
    Timeout,
    /// The cluster's intentions refused the call before any instance was
    /// picked: it counts for its edge (the caller saw it fail), never for
    /// the service.
    Denied,
}

impl OutcomeClass {
    /// Classifies an HTTP status from the instance.
    pub fn from_status(status: u16) -> Self {
        if status >= 500 {
            OutcomeClass::ServerError
        } else {
            OutcomeClass::Success
        }
    }

    /// Every class, in a fixed order (metrics handles are indexed by it).
    pub const ALL: [OutcomeClass; 5] = [
        OutcomeClass::Success,
        OutcomeClass::ServerError,
        OutcomeClass::Unreachable,
        OutcomeClass::Timeout,
        OutcomeClass::Denied,
    ];

    /// Position in [`Self::ALL`].
    pub fn index(self) -> usize {
        match self {
            OutcomeClass::Success => 0,
            OutcomeClass::ServerError => 1,
            OutcomeClass::Unreachable => 2,
            OutcomeClass::Timeout => 3,
            OutcomeClass::Denied => 4,
        }
    }

    /// The label used in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeClass::Success => "success",
            OutcomeClass::ServerError => "server_error",
            OutcomeClass::Unreachable => "unreachable",
            OutcomeClass::Timeout => "timeout",
            OutcomeClass::Denied => "denied",
        }
    }
}

/// One (caller, service) edge's `weft_requests_total` counters (one per
/// class) and its `weft_request_duration_seconds` histogram for one
/// direction, resolved once: recording costs two atomic updates, no label
/// lookup and no copy.
#[derive(Debug)]
pub struct RequestMetrics {
    by_class: [metrics::Counter; 5],
    duration: metrics::Histogram,
}

impl RequestMetrics {
    /// The handles of `caller`'s requests to `service` in `direction`
    /// ("outbound" or "inbound").
    pub fn new(service: &str, caller: &str, direction: &'static str) -> Self {
        RequestMetrics {
            by_class: OutcomeClass::ALL.map(|class| {
                metrics::counter!(
                    "weft_requests_total",
                    "service" => service.to_string(),
                    "caller" => caller.to_string(),
                    "direction" => direction,
                    "class" => class.as_str()
                )
            }),
            duration: metrics::histogram!(
                "weft_request_duration_seconds",
                "service" => service.to_string(),
                "caller" => caller.to_string(),
                "direction" => direction
            ),
        }
    }

    /// Counts one request of `class` that took `latency`.
    pub fn record(&self, class: OutcomeClass, latency: Duration) {
        self.by_class[class.index()].increment(1);
        self.duration.record(latency.as_secs_f64());
    }
}

/// One finished attempt.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Service called.
    pub service: String,
    /// Where the request entered the mesh.
    pub caller: Caller,
    /// How it ended.
    pub class: OutcomeClass,
    /// Status code when there was a response.
    pub status: Option<u16>,
    /// Time to the response head (or to the failure).
    pub latency: Duration,
    /// 0 for the first attempt, 1.. for retries.
    pub attempt: u8,
    /// The last attempt of its request: its class is what the app saw.
    pub last: bool,
}

impl Outcome {
    /// A call the cluster's intentions refused on this node.
    pub fn denied(service: &str, caller: &Caller) -> Outcome {
        Outcome {
            service: service.to_string(),
            caller: caller.clone(),
            class: OutcomeClass::Denied,
            status: Some(403),
            latency: Duration::ZERO,
            attempt: 0,
            last: true,
        }
    }
}

/// Where the data plane sends outcomes; never blocks, drops when full.
#[derive(Debug, Clone)]
pub struct OutcomeSink {
    tx: mpsc::Sender<Outcome>,
}

impl OutcomeSink {
    /// A sink and the receiving end the stats aggregator drains in batches.
    pub fn channel(capacity: usize) -> (Self, mpsc::Receiver<Outcome>) {
        let (tx, rx) = mpsc::channel(capacity);
        (OutcomeSink { tx }, rx)
    }

    /// Records one outcome; drops it (and counts the drop) if the consumer lags.
    pub fn record(&self, outcome: Outcome) {
        if self.tx.try_send(outcome).is_err() {
            metrics::counter!("weft_outcomes_dropped_total").increment(1);
        }
    }
}
