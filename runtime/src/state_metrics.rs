//! Gauges of current state, rendered at scrape time from the routing table
//! and the statistics snapshot.
//!
//! The metrics recorder keeps every series it ever saw, so a gauge set per
//! service would outlive the service at its last value. These are drawn
//! from what is true now instead: a service that leaves the catalog leaves
//! `/metrics` in the same scrape.

use std::fmt::Write;

use crate::router::RouterSnapshot;
use crate::stats_aggregator::StatsSnapshot;

/// Health states `weft_instances` reports, every one per service (0 included).
const HEALTH: [&str; 4] = ["passing", "failing", "unknown", "ejected"];

/// Appends `weft_instances{service,health}` and
/// `weft_learned_retry_delay_seconds{service}` in Prometheus text format.
pub fn render(out: &mut String, routing: &RouterSnapshot, stats: &StatsSnapshot) {
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
                "weft_instances{{service=\"{}\",health=\"{health}\"}} {n}",
                escape(service)
            );
        }
    }
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
        );
        assert!(out.contains("# TYPE weft_instances gauge"));
        assert!(!out.contains("weft_instances{"), "{out}");
        assert!(!out.contains("weft_learned_retry_delay_seconds{"), "{out}");
    }
}
