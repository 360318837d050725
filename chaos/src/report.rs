//! From what was observed to what it means: pure analysis of the load
//! records, the membership timeline and the fault log into a [`Report`] of
//! invariants, plus the printed table.
//!
//! No IO and no clock: every time is seconds after the load started, so the
//! checks are tested on hand-made timelines.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde::Serialize;

use crate::links::LinkStatsRow;
use crate::load::Record;
use crate::scenario::{Invariants, LoadSpec};

/// Service -> instance ids.
pub type Catalog = BTreeMap<String, BTreeSet<String>>;

/// One poll of one node's `/v1/members` and `/v1/services`.
#[derive(Debug, Clone, Serialize)]
pub struct Obs {
    /// Seconds after load start (negative: before).
    pub t: f64,
    /// The node asked.
    pub observer: String,
    /// Member -> state.
    pub members: BTreeMap<String, String>,
    /// Its catalog.
    pub catalog: Catalog,
}

/// What the runner did, when.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Event {
    /// Seconds after load start.
    pub t: f64,
    /// What happened.
    pub kind: EventKind,
    /// Node affected, for process faults.
    pub node: Option<String>,
    /// Human description.
    pub detail: String,
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// kill -9.
    Kill,
    /// Started again on the same data dir.
    Restart,
    /// SIGSTOP.
    Pause,
    /// SIGCONT.
    Resume,
    /// A link fault began.
    LinkFault,
    /// A partition began.
    Partition,
    /// Link faults or partitions ended.
    Heal,
}

/// A registration made before the faults.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    /// Instance id.
    pub id: String,
    /// Service.
    pub service: String,
    /// Node it was registered with.
    pub node: String,
}

/// Everything the analysis needs.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// Scenario name.
    pub scenario: &'a str,
    /// `short` or `long`.
    pub profile: &'a str,
    /// Seconds of load.
    pub duration_s: f64,
    /// All node names.
    pub nodes: &'a [String],
    /// The bounds.
    pub invariants: &'a Invariants,
    /// Partition groups used (pairs across them may see each other dead).
    pub partitions: &'a [Vec<Vec<String>>],
    /// The fault log.
    pub events: &'a [Event],
    /// The membership timeline.
    pub obs: &'a [Obs],
    /// Each load stream and its records.
    pub loads: &'a [(LoadSpec, Vec<Record>)],
    /// Registrations made before the faults.
    pub registrations: &'a [Registration],
    /// Processes that exited on their own.
    pub crashes: &'a [String],
    /// Relay counters.
    pub relay: Vec<LinkStatsRow>,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Scenario.
    pub scenario: String,
    /// Profile.
    pub profile: String,
    /// Seconds of load.
    pub duration_s: f64,
    /// Load rates were multiplied by this (1.0: as in the scenario file).
    pub rate_scale: f64,
    /// Every invariant held.
    pub passed: bool,
    /// Invariant verdicts.
    pub invariants: Vec<Verdict>,
    /// Per load stream.
    pub loads: Vec<LoadSummary>,
    /// The fault log.
    pub events: Vec<Event>,
    /// Kill/pause -> dead on every other running node.
    pub detections: Vec<Detection>,
    /// From the last fault event to the expected view everywhere.
    pub reconvergence: Option<Reconvergence>,
    /// "observer saw member dead at t" for members no fault touched.
    pub false_deaths: Vec<String>,
    /// Registration ids missing on some running node at the end.
    pub lost_registrations: Vec<String>,
    /// Processes that exited on their own.
    pub crashes: Vec<String>,
    /// Relay counters per directed link.
    pub relay: Vec<LinkStatsRow>,
    /// Where logs and the work dir were (filled in by the runner).
    pub work_dir: Option<String>,
}

/// One invariant.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Name.
    pub name: String,
    /// Target, readable.
    pub target: String,
    /// Measured, readable.
    pub measured: String,
    /// Held.
    pub passed: bool,
}

/// Numbers of one load stream.
#[derive(Debug, Clone, Serialize)]
pub struct LoadSummary {
    /// Node whose proxy carried it.
    pub via: String,
    /// Service.
    pub service: String,
    /// Target rate.
    pub rps: u32,
    /// Requests due.
    pub sent: u64,
    /// 2xx answers.
    pub ok: u64,
    /// Everything else.
    pub failed: u64,
    /// ok / sent over idempotent requests.
    pub success_rate: f64,
    /// Failures by outcome.
    pub failures: BTreeMap<String, u64>,
    /// Latency quantiles over all requests (ms).
    pub p50_ms: f64,
    /// p90.
    pub p90_ms: f64,
    /// p99.
    pub p99_ms: f64,
    /// Max.
    pub max_ms: f64,
    /// Due time of the first failed request.
    pub first_failure_t: Option<f64>,
    /// Due time of the last failed request.
    pub last_failure_t: Option<f64>,
    /// Successful answers by answering instance.
    pub servers: BTreeMap<String, u64>,
    /// Per second: [t, sent, ok].
    pub per_second: Vec<[u64; 3]>,
}

/// Detection of one process fault.
#[derive(Debug, Clone, Serialize)]
pub struct Detection {
    /// The node killed or paused.
    pub node: String,
    /// kill or pause.
    pub kind: EventKind,
    /// When.
    pub at: f64,
    /// Seconds until every other running node said "dead" (None: never).
    pub seconds: Option<f64>,
    /// Per observer.
    pub per_observer: BTreeMap<String, Option<f64>>,
}

/// Reconvergence after the last fault event.
#[derive(Debug, Clone, Serialize)]
pub struct Reconvergence {
    /// The last fault event.
    pub from_t: f64,
    /// Seconds until every running node had the expected members and catalog
    /// (None: not within the observation).
    pub seconds: Option<f64>,
}

// === node states from the fault log ===

/// Whether `node` runs and is not stopped at `t` (events at `t` included).
pub fn up_at(events: &[Event], node: &str, t: f64) -> bool {
    let mut up = true;
    for e in events
        .iter()
        .filter(|e| e.t <= t && e.node.as_deref() == Some(node))
    {
        match e.kind {
            EventKind::Kill | EventKind::Pause => up = false,
            EventKind::Restart | EventKind::Resume => up = true,
            _ => {}
        }
    }
    up
}

fn when_back(events: &[Event], node: &str, after: f64) -> Option<f64> {
    events
        .iter()
        .filter(|e| e.t > after && e.node.as_deref() == Some(node))
        .find(|e| matches!(e.kind, EventKind::Restart | EventKind::Resume))
        .map(|e| e.t)
}

/// Time of the last fault event (the end of the last disruption).
pub fn last_event(events: &[Event]) -> Option<f64> {
    events.iter().map(|e| e.t).reduce(f64::max)
}

/// The catalog every running node should show once things settle.
pub fn expected_catalog(registrations: &[Registration], up: &BTreeSet<String>) -> Catalog {
    let mut c = Catalog::new();
    for r in registrations.iter().filter(|r| up.contains(&r.node)) {
        c.entry(r.service.clone()).or_default().insert(r.id.clone());
    }
    c
}

fn view_ok(o: &Obs, up: &BTreeSet<String>, nodes: &[String], expected: &Catalog) -> bool {
    let members_ok = nodes.iter().all(|n| {
        let state = o.members.get(n).map(String::as_str);
        if up.contains(n) {
            state == Some("alive")
        } else {
            state != Some("alive") && state != Some("suspect")
        }
    });
    members_ok && &o.catalog == expected
}

/// First time at or after `from` when every running node's latest poll
/// (taken at or after `from`) shows the expected members and catalog.
pub fn reconverged_at(
    obs: &[Obs],
    events: &[Event],
    nodes: &[String],
    registrations: &[Registration],
    from: f64,
) -> Option<f64> {
    let up: BTreeSet<String> = nodes
        .iter()
        .filter(|n| up_at(events, n, from))
        .cloned()
        .collect();
    let expected = expected_catalog(registrations, &up);
    let mut latest: BTreeMap<&str, bool> = BTreeMap::new();
    let mut sorted: Vec<&Obs> = obs
        .iter()
        .filter(|o| o.t >= from && up.contains(&o.observer))
        .collect();
    sorted.sort_by(|a, b| a.t.total_cmp(&b.t));
    for o in sorted {
        latest.insert(&o.observer, view_ok(o, &up, nodes, &expected));
        if latest.len() == up.len() && latest.values().all(|ok| *ok) {
            return Some(o.t);
        }
    }
    None
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn summarize(spec: &LoadSpec, records: &[Record]) -> LoadSummary {
    let mut lat: Vec<f64> = records.iter().map(|r| r.latency_ms).collect();
    lat.sort_by(f64::total_cmp);
    let mut failures = BTreeMap::new();
    let mut servers = BTreeMap::new();
    let mut per_second: BTreeMap<u64, [u64; 3]> = BTreeMap::new();
    for r in records {
        let sec = r.t.max(0.0) as u64;
        let row = per_second.entry(sec).or_insert([sec, 0, 0]);
        row[1] += 1;
        if r.ok() {
            row[2] += 1;
            if let Some(s) = &r.server {
                *servers.entry(s.clone()).or_insert(0) += 1;
            }
        } else {
            *failures.entry(r.outcome.clone()).or_insert(0) += 1;
        }
    }
    let idem: Vec<&Record> = records.iter().filter(|r| r.idempotent).collect();
    let idem_ok = idem.iter().filter(|r| r.ok()).count();
    let ok = records.iter().filter(|r| r.ok()).count() as u64;
    let failed_t: Vec<f64> = records.iter().filter(|r| !r.ok()).map(|r| r.t).collect();
    LoadSummary {
        via: spec.via.clone(),
        service: spec.service.clone(),
        rps: spec.rps,
        sent: records.len() as u64,
        ok,
        failed: records.len() as u64 - ok,
        success_rate: if idem.is_empty() {
            1.0
        } else {
            idem_ok as f64 / idem.len() as f64
        },
        failures,
        p50_ms: quantile(&lat, 0.5),
        p90_ms: quantile(&lat, 0.9),
        p99_ms: quantile(&lat, 0.99),
        max_ms: lat.last().copied().unwrap_or(0.0),
        first_failure_t: failed_t.first().copied(),
        last_failure_t: failed_t.last().copied(),
        servers,
        per_second: per_second.into_values().collect(),
    }
}

fn detections(inp: &Inputs<'_>) -> Vec<Detection> {
    let mut out = Vec::new();
    for e in inp
        .events
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Kill | EventKind::Pause))
    {
        let Some(victim) = e.node.as_deref() else {
            continue;
        };
        let back = when_back(inp.events, victim, e.t).unwrap_or(f64::INFINITY);
        let mut per_observer = BTreeMap::new();
        for o in inp.nodes.iter().filter(|n| *n != victim) {
            if !up_at(inp.events, o, e.t) {
                continue;
            }
            let seen = inp
                .obs
                .iter()
                .filter(|x| &x.observer == o && x.t >= e.t && x.t <= back)
                .filter(|x| x.members.get(victim).map(String::as_str) == Some("dead"))
                .map(|x| x.t - e.t)
                .reduce(f64::min);
            per_observer.insert(o.clone(), seen);
        }
        let seconds = if per_observer.values().all(Option::is_some) {
            per_observer.values().flatten().copied().reduce(f64::max)
        } else {
            None
        };
        out.push(Detection {
            node: victim.to_string(),
            kind: e.kind,
            at: e.t,
            seconds,
            per_observer,
        });
    }
    out
}

fn false_deaths(inp: &Inputs<'_>) -> Vec<String> {
    let targeted: BTreeSet<&str> = inp
        .events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                EventKind::Kill | EventKind::Pause | EventKind::Restart | EventKind::Resume
            )
        })
        .filter_map(|e| e.node.as_deref())
        .collect();
    let across = |a: &str, b: &str| {
        inp.partitions.iter().any(|groups| {
            let side = |n: &str| groups.iter().position(|g| g.iter().any(|x| x == n));
            matches!((side(a), side(b)), (Some(x), Some(y)) if x != y)
        })
    };
    let mut sorted: Vec<&Obs> = inp.obs.iter().collect();
    sorted.sort_by(|a, b| a.t.total_cmp(&b.t));
    let mut dead_now: BTreeSet<(String, String)> = BTreeSet::new();
    let mut out = Vec::new();
    // A node that was just restarted or resumed has not heard from anyone
    // yet (its failure detector starts from silence); its first views are a
    // startup transient, not the cluster declaring someone dead.
    let grace = inp.invariants.max_reconverge_s.unwrap_or(5.0);
    let recovering = |node: &str, t: f64| {
        !up_at(inp.events, node, t)
            || inp.events.iter().any(|e| {
                e.node.as_deref() == Some(node)
                    && matches!(e.kind, EventKind::Restart | EventKind::Resume)
                    && e.t <= t
                    && t - e.t <= grace
            })
    };
    for o in sorted {
        if recovering(&o.observer, o.t) {
            continue;
        }
        for (m, state) in &o.members {
            if targeted.contains(m.as_str()) || across(&o.observer, m) || *m == o.observer {
                continue;
            }
            let key = (o.observer.clone(), m.clone());
            if state == "dead" {
                if dead_now.insert(key) {
                    out.push(format!("{} saw {m} dead at t={:.1}s", o.observer, o.t));
                }
            } else {
                dead_now.remove(&key);
            }
        }
    }
    out
}

fn lost_registrations(inp: &Inputs<'_>) -> Vec<String> {
    let end = inp
        .obs
        .iter()
        .map(|o| o.t)
        .reduce(f64::max)
        .unwrap_or(inp.duration_s);
    let up: BTreeSet<String> = inp
        .nodes
        .iter()
        .filter(|n| up_at(inp.events, n, end))
        .cloned()
        .collect();
    let expected = expected_catalog(inp.registrations, &up);
    let mut lost = BTreeSet::new();
    for n in &up {
        let latest = inp
            .obs
            .iter()
            .filter(|o| &o.observer == n)
            .max_by(|a, b| a.t.total_cmp(&b.t));
        for (svc, ids) in &expected {
            for id in ids {
                let present = latest
                    .map(|o| o.catalog.get(svc).is_some_and(|s| s.contains(id)))
                    .unwrap_or(false);
                if !present {
                    lost.insert(format!("{id} (missing on {n})"));
                }
            }
        }
    }
    lost.into_iter().collect()
}

/// Runs every check.
pub fn analyse(inp: &Inputs<'_>) -> Report {
    let loads: Vec<LoadSummary> = inp.loads.iter().map(|(s, r)| summarize(s, r)).collect();
    let detections = detections(inp);
    let reconvergence = last_event(inp.events).map(|from| Reconvergence {
        from_t: from,
        seconds: reconverged_at(inp.obs, inp.events, inp.nodes, inp.registrations, from)
            .map(|t| t - from),
    });
    let false_deaths = false_deaths(inp);
    let lost = lost_registrations(inp);
    let inv = inp.invariants;
    let mut verdicts = Vec::new();
    let mut push = |name: &str, target: String, measured: String, passed: bool| {
        verdicts.push(Verdict {
            name: name.into(),
            target,
            measured,
            passed,
        })
    };
    if let Some(min) = inv.min_success_rate {
        let all: Vec<&Record> = inp
            .loads
            .iter()
            .flat_map(|(_, r)| r)
            .filter(|r| r.idempotent && r.t >= inv.success_after_s.unwrap_or(0.0))
            .collect();
        let ok = all.iter().filter(|r| r.ok()).count();
        let rate = if all.is_empty() {
            0.0
        } else {
            ok as f64 / all.len() as f64
        };
        push(
            "success_rate",
            match inv.success_after_s {
                Some(after) => format!(">= {:.2}% after {after} s", min * 100.0),
                None => format!(">= {:.2}%", min * 100.0),
            },
            format!(
                "{:.3}% ({} failed of {})",
                rate * 100.0,
                all.len() - ok,
                all.len()
            ),
            !all.is_empty() && rate >= min,
        );
    }
    push(
        "lost_registrations",
        "0".into(),
        lost.len().to_string(),
        lost.is_empty(),
    );
    push(
        "node_crashes",
        "0".into(),
        inp.crashes.len().to_string(),
        inp.crashes.is_empty(),
    );
    if let Some(max) = inv.max_detection_s {
        for d in &detections {
            push(
                &format!("detection({} {})", kind_name(d.kind), d.node),
                format!("<= {max:.1} s"),
                fmt_secs(d.seconds),
                d.seconds.is_some_and(|s| s <= max),
            );
        }
    }
    if let (Some(max), Some(r)) = (inv.max_reconverge_s, &reconvergence) {
        push(
            "reconvergence",
            format!("<= {max:.1} s"),
            fmt_secs(r.seconds),
            r.seconds.is_some_and(|s| s <= max),
        );
    }
    if inv.no_false_deaths {
        push(
            "false_deaths",
            "0".into(),
            false_deaths.len().to_string(),
            false_deaths.is_empty(),
        );
    }
    if let Some(max) = inv.max_p99_ms {
        let mut lat: Vec<f64> = inp
            .loads
            .iter()
            .flat_map(|(_, r)| r.iter().map(|x| x.latency_ms))
            .collect();
        lat.sort_by(f64::total_cmp);
        let p99 = quantile(&lat, 0.99);
        push(
            "p99_latency",
            format!("<= {max:.0} ms"),
            format!("{p99:.1} ms"),
            !lat.is_empty() && p99 <= max,
        );
    }
    if let Some(bound) = &inv.max_share {
        let suffix = format!("@{}", bound.node);
        let (mine, total) = loads.iter().fold((0u64, 0u64), |(m, t), l| {
            let mine: u64 = l
                .servers
                .iter()
                .filter(|(s, _)| s.ends_with(&suffix))
                .map(|(_, c)| *c)
                .sum();
            (m + mine, t + l.servers.values().sum::<u64>())
        });
        let share = if total == 0 {
            0.0
        } else {
            mine as f64 / total as f64
        };
        push(
            &format!("share({})", bound.node),
            format!("<= {:.1}%", bound.share * 100.0),
            format!("{:.1}% ({mine} of {total})", share * 100.0),
            total > 0 && share <= bound.share,
        );
    }
    Report {
        scenario: inp.scenario.to_string(),
        profile: inp.profile.to_string(),
        duration_s: inp.duration_s,
        rate_scale: 1.0,
        passed: verdicts.iter().all(|v| v.passed),
        invariants: verdicts,
        loads,
        events: inp.events.to_vec(),
        detections,
        reconvergence,
        false_deaths,
        lost_registrations: lost,
        crashes: inp.crashes.to_vec(),
        relay: inp.relay.clone(),
        work_dir: None,
    }
}

fn kind_name(k: EventKind) -> &'static str {
    match k {
        EventKind::Kill => "kill",
        EventKind::Restart => "restart",
        EventKind::Pause => "pause",
        EventKind::Resume => "resume",
        EventKind::LinkFault => "link",
        EventKind::Partition => "partition",
        EventKind::Heal => "heal",
    }
}

fn fmt_secs(s: Option<f64>) -> String {
    match s {
        Some(s) => format!("{s:.2} s"),
        None => "never".into(),
    }
}

impl Report {
    /// The invariant named `name`, if checked.
    pub fn verdict(&self, name: &str) -> Option<&Verdict> {
        self.invariants.iter().find(|v| v.name == name)
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "scenario {} ({}, {:.0} s of load{}): {}",
            self.scenario,
            self.profile,
            self.duration_s,
            if (self.rate_scale - 1.0).abs() > 1e-9 {
                format!(", load rates x{}", self.rate_scale)
            } else {
                String::new()
            },
            if self.passed { "PASS" } else { "FAIL" }
        );
        for e in &self.events {
            let _ = writeln!(s, "  t={:>6.2}s  {}", e.t, e.detail);
        }
        for l in &self.loads {
            let _ = writeln!(
                s,
                "load via {} -> {} @ {} rps: {} sent, {} ok ({:.3}%), {} failed; latency p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.0} ms",
                l.via,
                l.service,
                l.rps,
                l.sent,
                l.ok,
                l.success_rate * 100.0,
                l.failed,
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.max_ms
            );
            for (why, n) in &l.failures {
                let _ = writeln!(s, "    failed {n:>6}  {why}");
            }
            if let (Some(a), Some(b)) = (l.first_failure_t, l.last_failure_t) {
                let _ = writeln!(s, "    failures between t={a:.2}s and t={b:.2}s");
            }
            let served: Vec<String> = l.servers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            let _ = writeln!(s, "    served by {}", served.join(", "));
        }
        for d in &self.detections {
            let _ = writeln!(
                s,
                "detection: {} {} at t={:.2}s -> dead everywhere after {}",
                kind_name(d.kind),
                d.node,
                d.at,
                fmt_secs(d.seconds)
            );
        }
        if let Some(r) = &self.reconvergence {
            let _ = writeln!(
                s,
                "reconvergence: {} after the last fault event (t={:.2}s)",
                fmt_secs(r.seconds),
                r.from_t
            );
        }
        for f in self.false_deaths.iter().take(5) {
            let _ = writeln!(s, "false death: {f}");
        }
        for l in self.lost_registrations.iter().take(5) {
            let _ = writeln!(s, "lost registration: {l}");
        }
        for c in &self.crashes {
            let _ = writeln!(s, "crash: {c}");
        }
        let _ = writeln!(
            s,
            "{:<22} {:<12} {:<34} result",
            "invariant", "target", "measured"
        );
        for v in &self.invariants {
            let _ = writeln!(
                s,
                "{:<22} {:<12} {:<34} {}",
                v.name,
                v.target,
                v.measured,
                if v.passed { "pass" } else { "FAIL" }
            );
        }
        if let Some(w) = &self.work_dir {
            let _ = writeln!(s, "logs: {w}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["n1".into(), "n2".into(), "n3".into()]
    }

    fn obs(t: f64, observer: &str, states: &[(&str, &str)], ids: &[&str]) -> Obs {
        Obs {
            t,
            observer: observer.into(),
            members: states
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect(),
            catalog: if ids.is_empty() {
                Catalog::new()
            } else {
                Catalog::from([(
                    "web".to_string(),
                    ids.iter().map(|s| s.to_string()).collect(),
                )])
            },
        }
    }

    fn ev(t: f64, kind: EventKind, node: &str) -> Event {
        Event {
            t,
            kind,
            node: Some(node.into()),
            detail: String::new(),
        }
    }

    fn regs() -> Vec<Registration> {
        ["n2", "n3"]
            .iter()
            .map(|n| Registration {
                id: format!("web-{n}"),
                service: "web".into(),
                node: n.to_string(),
            })
            .collect()
    }

    #[test]
    fn kill_detection_reconvergence_and_no_lost_registrations() {
        let nodes = names();
        let events = vec![ev(10.0, EventKind::Kill, "n2")];
        let all = [("n1", "alive"), ("n2", "alive"), ("n3", "alive")];
        let n2dead = [("n1", "alive"), ("n2", "dead"), ("n3", "alive")];
        let timeline = vec![
            obs(9.0, "n1", &all, &["web-n2", "web-n3"]),
            obs(9.0, "n3", &all, &["web-n2", "web-n3"]),
            obs(11.0, "n1", &n2dead, &["web-n3"]),
            obs(
                11.5,
                "n3",
                &[("n1", "alive"), ("n2", "suspect"), ("n3", "alive")],
                &["web-n2", "web-n3"],
            ),
            obs(12.0, "n3", &n2dead, &["web-n3"]),
        ];
        let inv = Invariants {
            max_detection_s: Some(5.0),
            max_reconverge_s: Some(5.0),
            ..Invariants::default()
        };
        let r = analyse(&Inputs {
            scenario: "t",
            profile: "short",
            duration_s: 20.0,
            nodes: &nodes,
            invariants: &inv,
            partitions: &[],
            events: &events,
            obs: &timeline,
            loads: &[],
            registrations: &regs(),
            crashes: &[],
            relay: Vec::new(),
        });
        assert_eq!(r.detections[0].seconds, Some(2.0));
        assert_eq!(r.reconvergence.as_ref().unwrap().seconds, Some(2.0));
        assert!(r.lost_registrations.is_empty());
        assert!(r.false_deaths.is_empty());
        assert!(r.passed, "{}", r.table());
    }

    #[test]
    fn a_missing_instance_is_lost_and_an_untouched_dead_node_is_false() {
        let nodes = names();
        let all = [("n1", "alive"), ("n2", "alive"), ("n3", "alive")];
        let timeline = vec![
            obs(
                1.0,
                "n1",
                &[("n1", "alive"), ("n2", "alive"), ("n3", "dead")],
                &["web-n2"],
            ),
            obs(2.0, "n1", &all, &["web-n2"]),
            obs(2.0, "n2", &all, &["web-n2", "web-n3"]),
            obs(2.0, "n3", &all, &["web-n2", "web-n3"]),
        ];
        let inv = Invariants::default();
        let r = analyse(&Inputs {
            scenario: "t",
            profile: "short",
            duration_s: 3.0,
            nodes: &nodes,
            invariants: &inv,
            partitions: &[],
            events: &[],
            obs: &timeline,
            loads: &[],
            registrations: &regs(),
            crashes: &[],
            relay: Vec::new(),
        });
        assert_eq!(r.lost_registrations, ["web-n3 (missing on n1)"]);
        assert_eq!(r.false_deaths.len(), 1);
        assert!(!r.passed);
        // Across a partition the same observation is expected, not false.
        let parts = vec![vec![vec!["n1".to_string()], vec!["n2".into(), "n3".into()]]];
        let r = analyse(&Inputs {
            scenario: "t",
            profile: "short",
            duration_s: 3.0,
            nodes: &nodes,
            invariants: &inv,
            partitions: &parts,
            events: &[],
            obs: &timeline,
            loads: &[],
            registrations: &regs(),
            crashes: &[],
            relay: Vec::new(),
        });
        assert!(r.false_deaths.is_empty());
    }

    #[test]
    fn load_summary_counts_and_quantiles() {
        let spec = LoadSpec {
            via: "n1".into(),
            service: "web".into(),
            rps: 10,
            method: "GET".into(),
            path: "/".into(),
            timeout_ms: 1000,
        };
        let mut records: Vec<Record> = (0..100)
            .map(|i| Record {
                t: f64::from(i) / 10.0,
                latency_ms: f64::from(i),
                outcome: "ok".into(),
                server: Some(if i % 4 == 0 { "web@n2" } else { "web@n3" }.into()),
                idempotent: true,
            })
            .collect();
        records[50].outcome = "http 502 upstream-unreachable".into();
        records[50].server = None;
        let s = summarize(&spec, &records);
        assert_eq!((s.sent, s.ok, s.failed), (100, 99, 1));
        assert!((s.success_rate - 0.99).abs() < 1e-9);
        assert_eq!(s.p50_ms, 49.0);
        assert_eq!(s.p99_ms, 98.0);
        assert_eq!(s.first_failure_t, Some(5.0));
        assert_eq!(s.per_second.len(), 10);
        assert_eq!(s.servers["web@n2"], 25);
    }

    #[test]
    fn up_at_follows_the_log() {
        let events = vec![
            ev(1.0, EventKind::Pause, "n2"),
            ev(6.0, EventKind::Resume, "n2"),
            ev(8.0, EventKind::Kill, "n2"),
        ];
        assert!(up_at(&events, "n2", 0.5));
        assert!(!up_at(&events, "n2", 3.0));
        assert!(up_at(&events, "n2", 7.0));
        assert!(!up_at(&events, "n2", 9.0));
        assert!(up_at(&events, "n1", 9.0));
        assert_eq!(when_back(&events, "n2", 1.0), Some(6.0));
    }
}
