//! Gauges of current state, rendered at scrape time from the routing table
//! and the statistics snapshot.
//!
//! The metrics recorder keeps every series it ever saw, so a gauge set per
//! service would outlive the service at its last value. These are drawn
//! from what is true now instead: a service that leaves the catalog leaves
//! `/metrics` in the same scrape.

use std::fmt::Write;
use weft_gossip::Health;

use crate::dataplane::admission::{Admission, ConcurrencyStatus, LimitStatus};
use crate::dataplane::tables::{RouterSnapshot, StatsSnapshot};

/// Health states `weft_instances` reports, every one per service (0 included).
const HEALTH: [Health; 4] = [
    Health::Passing,
    Health::Failing,
    Health::Unknown,
    Health::Ejected,
];

/// Appends, in Prometheus text format, `weft_instances{service,health}`,
/// `weft_learned_retry_delay_seconds{service}`,
/// `weft_effective_success_ratio{service}`,
/// `weft_edge_effective_success_ratio{caller,service}` and
/// `weft_retry_budget_used_ratio{service}` (from `budget_used`), per rate
/// limit `weft_rate_limit_share{service,caller}` and
/// `weft_rate_limit_demand{service,caller}`, and per service under
/// adaptive concurrency `weft_concurrency_limit{service}` and
/// `weft_concurrency_in_flight{service}` (from `admission`).
pub fn render(
    out: &mut String,
    routing: &RouterSnapshot,
    stats: &StatsSnapshot,
    budget_used: impl Fn(&str) -> f64,
    admission: &Admission,
) {
    instances(out, routing);
    learned_delays(out, stats);
    effective_success(out, stats);
    retry_budgets(out, routing, budget_used);
    rate_limits(out, &admission.status());
    concurrency(out, &admission.concurrency_status());
}

fn instances(out: &mut String, routing: &RouterSnapshot) {
    family(
        out,
        "weft_instances",
        "Instances in the catalog by service and health",
    );
    for (service, instances) in &routing.catalog.services {
        for health in HEALTH {
            let n = instances.iter().filter(|i| i.health == health).count();
            let _ = writeln!(
                out,
                "weft_instances{{service=\"{}\",health=\"{}\"}} {n}",
                escape(service),
                health.as_str()
            );
        }
    }
}

fn learned_delays(out: &mut String, stats: &StatsSnapshot) {
    family(
        out,
        "weft_learned_retry_delay_seconds",
        "Learned retry delay: the cluster-merged p90 outage length of the service",
    );
    for (service, s) in &stats.services {
        if let Some(ms) = s.retry_delay_ms() {
            let _ = writeln!(
                out,
                "weft_learned_retry_delay_seconds{{service=\"{}\"}} {}",
                escape(service),
                ms / 1000.0
            );
        }
    }
}

/// Per service (this node's requests) and per edge (cluster-wide).
fn effective_success(out: &mut String, stats: &StatsSnapshot) {
    family(
        out,
        "weft_effective_success_ratio",
        "Share of this node's requests to the service that succeeded after the mesh's retries",
    );
    for (service, s) in &stats.services {
        if let Some(rate) = s.effective.success_rate {
            let _ = writeln!(
                out,
                "weft_effective_success_ratio{{service=\"{}\"}} {rate}",
                escape(service)
            );
        }
    }
    family(
        out,
        "weft_edge_effective_success_ratio",
        "Share of a caller's requests to a service that succeeded after retries, cluster-wide",
    );
    for ((caller, service), e) in &stats.edges {
        if let Some(rate) = e.effective_success_rate {
            let _ = writeln!(
                out,
                "weft_edge_effective_success_ratio{{caller=\"{}\",service=\"{}\"}} {rate}",
                escape(caller),
                escape(service)
            );
        }
    }
}

fn retry_budgets(out: &mut String, routing: &RouterSnapshot, budget_used: impl Fn(&str) -> f64) {
    family(
        out,
        "weft_retry_budget_used_ratio",
        "Share of this node's retry budget for the service in use (1: retries are refused)",
    );
    for service in routing.catalog.services.keys() {
        let _ = writeln!(
            out,
            "weft_retry_budget_used_ratio{{service=\"{}\"}} {}",
            escape(service),
            budget_used(service)
        );
    }
}

/// This node's share and demand of each limit; `caller="*"` for a
/// service-wide one.
fn rate_limits(out: &mut String, limits: &[LimitStatus]) {
    let labels = |l: &LimitStatus| {
        let caller = l.limit.caller.as_deref().unwrap_or("*");
        format!(
            "service=\"{}\",caller=\"{}\"",
            escape(&l.limit.service),
            escape(caller)
        )
    };
    let (share, demand) = (
        "Requests a second this node admits under the cluster-wide rate limit",
        "Requests a second arriving at this node under the rate limit, admitted or not",
    );
    gauges(out, "weft_rate_limit_share", share, limits, labels, |l| {
        l.share
    });
    gauges(out, "weft_rate_limit_demand", demand, limits, labels, |l| {
        l.demand
    });
}

fn concurrency(out: &mut String, services: &[ConcurrencyStatus]) {
    let labels = |c: &ConcurrencyStatus| format!("service=\"{}\"", escape(&c.service));
    let (limit, in_flight) = (
        "The cluster-wide adaptive concurrency limit of the service, as this node holds it",
        "Requests to the service in flight from this node under adaptive concurrency",
    );
    gauges(
        out,
        "weft_concurrency_limit",
        limit,
        services,
        labels,
        |c| c.limit,
    );
    gauges(
        out,
        "weft_concurrency_in_flight",
        in_flight,
        services,
        labels,
        |c| f64::from(c.in_flight),
    );
}

/// A gauge family with a series per row (`labels`: the row's, escaped).
fn gauges<T>(
    out: &mut String,
    name: &str,
    help: &str,
    rows: &[T],
    labels: impl Fn(&T) -> String,
    value: impl Fn(&T) -> f64,
) {
    family(out, name, help);
    for row in rows {
        let _ = writeln!(out, "{name}{{{}}} {}", labels(row), value(row));
    }
}

fn family(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
}

/// A label value as the text format quotes it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_value_is_quoted_as_the_text_format_wants() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn a_service_absent_from_the_snapshots_has_no_series() {
        let mut out = String::new();
        render(
            &mut out,
            &RouterSnapshot::default(),
            &StatsSnapshot::default(),
            |_| 0.0,
            &Admission::default(),
        );
        assert!(out.contains("# TYPE weft_instances gauge"));
        assert!(!out.contains("weft_instances{"), "{out}");
        assert!(!out.contains("weft_learned_retry_delay_seconds{"), "{out}");
    }
}
