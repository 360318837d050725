//! The scenario runner: starts the cluster, the services, the relay and the
//! load, applies the timed faults, watches membership, then hands what it saw
//! to [`report::analyse`](crate::report::analyse).
//!
//! Every wait is a poll with a deadline. Every process is owned by a
//! [`Proc`] and dies with it, so an error or a panic leaves nothing running.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::Method;
use serde_json::json;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::api;
use crate::fault::NodeSet;
use crate::links::Links;
use crate::load::{self, Record};
use crate::network::Network;
use crate::process::{spawn_demo, Proc};
use crate::report::{self, Event, EventKind, Inputs, Obs, Registration, Report};
use crate::scenario::{FaultSpec, LoadSpec, Scenario};
use crate::ChaosError;

/// How often the monitor polls every node.
const POLL: Duration = Duration::from_millis(100);
/// Deadline of one API call.
const CALL: Duration = Duration::from_millis(400);

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `weft` binary.
    pub weft_bin: PathBuf,
    /// The `demo-service` binary.
    pub demo_bin: PathBuf,
    /// Run the `[long]` profile.
    pub long: bool,
    /// Parent of the work dir (default: the system temp dir).
    pub work_root: Option<PathBuf>,
    /// Keep the work dir (logs, data dirs) even when everything passed.
    pub keep: bool,
    /// Where to write the JSON report.
    pub report_path: Option<PathBuf>,
    /// Run every node on a host of its own (network namespaces, default
    /// ports); needs root.
    pub hosts: bool,
    /// Multiplies every load stream's rate (1.0: as written). Debug builds
    /// of weft cannot carry 500 rps on two cores; the report says the scale.
    pub rate_scale: f64,
}

/// One node's addresses and process.
struct NodeRun {
    name: String,
    socket: PathBuf,
    proxy: SocketAddr,
    proc: Proc,
}

/// Aborts tasks when dropped (the monitor must not outlive the run).
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Runs `scenario` and returns its report (also written to
/// `opts.report_path`). Errors mean the run could not happen at all; failed
/// invariants are in the report.
pub async fn run(scenario: &Scenario, opts: &Options) -> Result<Report, ChaosError> {
    let profile = scenario.profile(opts.long)?.clone();
    if !(opts.rate_scale > 0.0 && opts.rate_scale <= 10.0) {
        return Err(ChaosError::Scenario(format!(
            "rate scale {} must be in (0, 10]",
            opts.rate_scale
        )));
    }
    let profile_name = if opts.long { "long" } else { "short" };
    for bin in [&opts.weft_bin, &opts.demo_bin] {
        if !bin.is_file() {
            return Err(ChaosError::Io(format!(
                "{} not found (build the workspace, or pass --weft / --demo-service)",
                bin.display()
            )));
        }
    }
    let root = opts.work_root.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&root)
        .map_err(|e| ChaosError::Io(format!("{}: {e}", root.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!("weft-chaos-{}-", scenario.name))
        .tempdir_in(&root)
        .map_err(|e| ChaosError::Io(format!("work dir in {}: {e}", root.display())))?;
    let dir = tmp.path().to_path_buf();

    let outcome = drive(scenario, &profile, profile_name, opts, &dir).await;
    let mut report = match outcome {
        Ok(report) => report,
        // The nodes' logs say why the run could not happen: keep them.
        Err(e) => {
            let kept = tmp.keep();
            eprintln!(
                "weft-chaos: logs of the failed run are in {}",
                kept.display()
            );
            return Err(e);
        }
    };
    report.rate_scale = opts.rate_scale;
    if !report.passed || opts.keep {
        let kept = tmp.keep();
        report.work_dir = Some(kept.display().to_string());
    }
    if let Some(path) = &opts.report_path {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| ChaosError::Io(format!("{}: {e}", parent.display())))?;
        }
        let text =
            serde_json::to_string_pretty(&report).map_err(|e| ChaosError::Io(e.to_string()))?;
        std::fs::write(path, text)
            .map_err(|e| ChaosError::Io(format!("{}: {e}", path.display())))?;
    }
    Ok(report)
}

async fn drive(
    scenario: &Scenario,
    profile: &crate::scenario::Profile,
    profile_name: &str,
    opts: &Options,
    dir: &Path,
) -> Result<Report, ChaosError> {
    let names = scenario.node_names();
    let cluster_dir = dir.join("cluster");
    init_cluster(&opts.weft_bin, &cluster_dir).await?;

    let network = if opts.hosts {
        Network::hosts(&names).await?
    } else {
        Network::loopback(&names, scenario.cluster.relay)?
    };
    let mut nodes = Vec::new();
    for name in &names {
        let data_dir = dir.join(name);
        let socket = data_dir.join("weft.sock");
        let mut args: Vec<String> = vec![
            "node".into(),
            "--name".into(),
            name.clone(),
            "--cluster".into(),
            cluster_dir.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--gossip-interval".into(),
            format!("{}ms", scenario.cluster.gossip_interval_ms),
        ];
        args.extend(network.node_args(name, &names)?);
        let (program, args) = network.command(name, &opts.weft_bin, args)?;
        let log = dir.join(format!("{name}.log"));
        let proc = Proc::spawn(name, &program, args, &log)?;
        nodes.push(NodeRun {
            name: name.clone(),
            socket,
            proxy: network.proxy(name).await?,
            proc,
        });
    }
    wait_converged(&nodes, Duration::from_secs(30)).await?;

    // Services, registered before any fault.
    let mut services = Vec::new();
    let mut registrations = Vec::new();
    for spec in &scenario.instances {
        let label = format!("{}@{}", spec.service, spec.node);
        let args = vec![
            "--name".to_string(),
            label.clone(),
            "--error-rate".into(),
            spec.error_rate.to_string(),
            "--latency-ms".into(),
            spec.latency_ms.to_string(),
            "--flap-down-ms".into(),
            spec.flap_down_ms.to_string(),
            "--flap-period-ms".into(),
            spec.flap_period_ms.to_string(),
        ];
        let log = dir.join(format!("{label}.log"));
        let (program, args) = network.command(&spec.node, &opts.demo_bin, args)?;
        let (proc, addr) = spawn_demo(&label, &program, args, &log, Duration::from_secs(10))?;
        services.push(proc);
        let node = node_by_name(&nodes, &spec.node)?;
        let body = json!({"name": spec.service, "port": addr.port(), "protocol": "http"});
        let (status, answer) = api::request(
            &node.socket,
            Method::PUT,
            "/v1/services",
            Some(&body),
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| ChaosError::Cluster(format!("register {label}: {e}")))?;
        let id = answer["id"]
            .as_str()
            .filter(|_| status == 200)
            .ok_or_else(|| {
                ChaosError::Cluster(format!("register {label}: status {status}: {answer}"))
            })?;
        registrations.push(Registration {
            id: id.to_string(),
            service: spec.service.clone(),
            node: spec.node.clone(),
        });
    }
    wait_catalog(&nodes, &registrations, Duration::from_secs(30)).await?;

    // The clock starts a little ahead so the monitor has a baseline.
    let start = Instant::now() + Duration::from_millis(500);
    let duration = Duration::from_secs_f64(profile.duration_s);
    let timeline = Arc::new(Mutex::new(Vec::<Obs>::new()));
    let monitor = AbortOnDrop(
        nodes
            .iter()
            .map(|n| {
                tokio::spawn(watch(
                    n.name.clone(),
                    n.socket.clone(),
                    start,
                    timeline.clone(),
                ))
            })
            .collect(),
    );
    let mut load_tasks = Vec::new();
    for spec in &scenario.load {
        let proxy = node_by_name(&nodes, &spec.via)?.proxy;
        let mut spec = spec.clone();
        spec.rps = ((f64::from(spec.rps) * opts.rate_scale).round() as u32).max(1);
        load_tasks.push(tokio::spawn(async move {
            let records = load::run(&spec, proxy, start, duration).await;
            (spec, records)
        }));
    }

    // The fault schedule.
    let mut events: Vec<Event> = Vec::new();
    let mut partitions = Vec::new();
    let plan = schedule(&profile.faults);
    let mut rule_ids: HashMap<usize, Vec<u64>> = HashMap::new();
    for (at, action) in plan {
        tokio::time::sleep_until(start + Duration::from_secs_f64(at)).await;
        let t = start.elapsed().as_secs_f64();
        let ev = apply(
            &action,
            &mut nodes,
            network.links(),
            &mut rule_ids,
            &mut partitions,
        )?;
        if let Some((kind, node, detail)) = ev {
            events.push(Event {
                t,
                kind,
                node,
                detail,
            });
        }
    }
    tokio::time::sleep_until(start + duration).await;
    let mut loads: Vec<(LoadSpec, Vec<Record>)> = Vec::new();
    for task in load_tasks {
        let (spec, records) = task
            .await
            .map_err(|e| ChaosError::Cluster(format!("load task failed: {e}")))?;
        loads.push((spec, records));
    }
    if let Some(links) = network.links() {
        let mut faults = links.faults();
        if !faults.rules().is_empty() {
            faults.clear();
            events.push(Event {
                t: start.elapsed().as_secs_f64(),
                kind: EventKind::Heal,
                node: None,
                detail: "heal all link faults (end of load)".into(),
            });
        }
    }

    // Settle: wait (bounded) until every running node shows the expected view.
    if let Some(last) = report::last_event(&events) {
        let bound = scenario.invariants.max_reconverge_s.unwrap_or(5.0);
        let deadline = start + Duration::from_secs_f64(last + bound + 5.0);
        loop {
            let done = {
                let obs = lock(&timeline);
                report::reconverged_at(&obs, &events, &names, &registrations, last).is_some()
            };
            if done || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
    }
    // One more poll round so the final views are fresh.
    tokio::time::sleep(POLL * 3).await;
    drop(monitor);

    let mut crashes = Vec::new();
    for n in &mut nodes {
        if let Some(status) = n.proc.exited() {
            let log = dir.join(format!("{}.log", n.name));
            crashes.push(format!(
                "node {} exited on its own: {status}; last log line: {}",
                n.name,
                last_line(&log)
            ));
        }
    }
    for s in &mut services {
        if let Some(status) = s.exited() {
            crashes.push(format!("service {} exited on its own: {status}", s.label));
        }
    }
    let link_stats = network.links().map(|l| l.stats()).unwrap_or_default();
    let obs = lock(&timeline).clone();
    let report = report::analyse(&Inputs {
        scenario: &scenario.name,
        profile: profile_name,
        duration_s: profile.duration_s,
        nodes: &names,
        invariants: &scenario.invariants,
        partitions: &partitions,
        events: &events,
        obs: &obs,
        loads: &loads,
        registrations: &registrations,
        crashes: &crashes,
        relay: link_stats,
    });
    // Timeline for later reading, beside the logs.
    if let Ok(text) = serde_json::to_string(&obs) {
        let _ = std::fs::write(dir.join("timeline.json"), text);
    }
    // Processes first: the network (and its namespaces) outlives them.
    drop(services);
    drop(nodes);
    drop(network);
    Ok(report)
}

/// The last line of a log, without colour codes (a node that exits says why).
fn last_line(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip an ANSI escape: ESC [ ... letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn node_by_name<'a>(nodes: &'a [NodeRun], name: &str) -> Result<&'a NodeRun, ChaosError> {
    nodes
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| ChaosError::Scenario(format!("unknown node {name}")))
}

async fn init_cluster(weft: &Path, dir: &Path) -> Result<(), ChaosError> {
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(weft)
            .args(["init", "--dir"])
            .arg(dir)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| ChaosError::Cluster("weft init did not finish within 30 s".into()))?
    .map_err(|e| ChaosError::Io(format!("weft init: {e}")))?;
    if !out.status.success() {
        return Err(ChaosError::Cluster(format!(
            "weft init failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Polls until every node lists all `n` nodes as alive.
async fn wait_converged(nodes: &[NodeRun], within: Duration) -> Result<(), ChaosError> {
    let n = nodes.len();
    wait_all_nodes(nodes, "/v1/members", within, |body| {
        api::members(body)
            .map(|m| m.values().filter(|s| *s == "alive").count() == n)
            .unwrap_or(false)
    })
    .await
    .map_err(|()| {
        ChaosError::Cluster(format!(
            "the {n} nodes did not all see each other alive within {within:?}"
        ))
    })
}

/// Polls until every node lists every registration.
async fn wait_catalog(
    nodes: &[NodeRun],
    regs: &[Registration],
    within: Duration,
) -> Result<(), ChaosError> {
    wait_all_nodes(nodes, "/v1/services", within, |body| {
        api::catalog(body)
            .map(|c| {
                regs.iter()
                    .all(|r| c.get(&r.service).is_some_and(|s| s.contains(&r.id)))
            })
            .unwrap_or(false)
    })
    .await
    .map_err(|()| {
        ChaosError::Cluster(format!(
            "registrations did not reach every node within {within:?}"
        ))
    })
}

/// Polls `GET path` on every node until `ok` holds for all of them at once,
/// or `within` passes.
async fn wait_all_nodes(
    nodes: &[NodeRun],
    path: &str,
    within: Duration,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> Result<(), ()> {
    let deadline = Instant::now() + within;
    loop {
        let mut all = true;
        for node in nodes {
            all &= match api::request(&node.socket, Method::GET, path, None, CALL).await {
                Ok((200, body)) => ok(&body),
                _ => false,
            };
        }
        if all {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls one node forever (until aborted), recording what it says.
async fn watch(name: String, socket: PathBuf, start: Instant, out: Arc<Mutex<Vec<Obs>>>) {
    let secs = |now: Instant| {
        if now >= start {
            (now - start).as_secs_f64()
        } else {
            -(start - now).as_secs_f64()
        }
    };
    loop {
        let tick = Instant::now();
        let members = api::request(&socket, Method::GET, "/v1/members", None, CALL).await;
        let t = secs(Instant::now());
        let services = api::request(&socket, Method::GET, "/v1/services", None, CALL).await;
        if let (Ok((200, m)), Ok((200, s))) = (members, services) {
            if let (Some(members), Some(catalog)) = (api::members(&m), api::catalog(&s)) {
                lock(&out).push(Obs {
                    t,
                    observer: name.clone(),
                    members,
                    catalog,
                });
            }
        }
        tokio::time::sleep_until(tick + POLL).await;
    }
}

/// One step of the fault schedule.
#[derive(Debug, Clone)]
enum Action {
    Kill(String),
    Restart(String),
    Pause(String),
    Resume(String),
    LinkOn(usize, FaultSpec),
    LinkOff(usize),
    PartitionOn(usize, Vec<Vec<String>>),
    PartitionOff(usize),
    HealAll,
}

/// Expands the faults into timed actions, in time order (stable for ties).
fn schedule(faults: &[FaultSpec]) -> Vec<(f64, Action)> {
    let mut out = Vec::new();
    for (i, f) in faults.iter().enumerate() {
        match f {
            FaultSpec::Kill { at_s, node } => out.push((*at_s, Action::Kill(node.clone()))),
            FaultSpec::Restart { at_s, node } => out.push((*at_s, Action::Restart(node.clone()))),
            FaultSpec::Pause { at_s, node, for_s } => {
                out.push((*at_s, Action::Pause(node.clone())));
                out.push((at_s + for_s, Action::Resume(node.clone())));
            }
            FaultSpec::Link { at_s, for_s, .. } => {
                out.push((*at_s, Action::LinkOn(i, f.clone())));
                if let Some(d) = for_s {
                    out.push((at_s + d, Action::LinkOff(i)));
                }
            }
            FaultSpec::Partition {
                at_s,
                for_s,
                groups,
            } => {
                out.push((*at_s, Action::PartitionOn(i, groups.clone())));
                if let Some(d) = for_s {
                    out.push((at_s + d, Action::PartitionOff(i)));
                }
            }
            FaultSpec::Heal { at_s } => out.push((*at_s, Action::HealAll)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

type Applied = Option<(EventKind, Option<String>, String)>;

fn apply(
    action: &Action,
    nodes: &mut [NodeRun],
    links: Option<&Arc<Links>>,
    rule_ids: &mut HashMap<usize, Vec<u64>>,
    partitions: &mut Vec<Vec<Vec<String>>>,
) -> Result<Applied, ChaosError> {
    let need_links = || {
        links.ok_or_else(|| {
            ChaosError::Scenario("link faults need cluster.relay = true or --hosts".into())
        })
    };
    Ok(match action {
        Action::Kill(n) => {
            node_mut(nodes, n)?.proc.kill9();
            Some((EventKind::Kill, Some(n.clone()), format!("kill -9 {n}")))
        }
        Action::Restart(n) => {
            node_mut(nodes, n)?.proc.restart()?;
            Some((
                EventKind::Restart,
                Some(n.clone()),
                format!("restart {n} on its data dir"),
            ))
        }
        Action::Pause(n) => {
            node_mut(nodes, n)?.proc.pause()?;
            Some((EventKind::Pause, Some(n.clone()), format!("SIGSTOP {n}")))
        }
        Action::Resume(n) => {
            node_mut(nodes, n)?.proc.resume()?;
            Some((EventKind::Resume, Some(n.clone()), format!("SIGCONT {n}")))
        }
        Action::LinkOn(i, spec) => {
            let links = need_links()?;
            let FaultSpec::Link {
                channel,
                from,
                to,
                symmetric,
                ..
            } = spec
            else {
                return Ok(None);
            };
            let fault = spec.link_fault().unwrap_or_default();
            let (from_set, to_set) = (NodeSet::of(from.clone()), NodeSet::of(to.clone()));
            let mut faults = links.faults();
            let mut ids = vec![faults.add(
                channel.channels(),
                from_set.clone(),
                to_set.clone(),
                fault.clone(),
            )];
            if *symmetric {
                ids.push(faults.add(channel.channels(), to_set, from_set, fault.clone()));
            }
            rule_ids.insert(*i, ids);
            let who = |v: &Vec<String>| {
                if v.is_empty() {
                    "*".to_string()
                } else {
                    v.join(",")
                }
            };
            Some((
                EventKind::LinkFault,
                None,
                format!(
                    "{} {} -> {}{}: loss {:.0}%, delay {} ms ± {} ms, dup {:.0}%, reorder {:.0}%",
                    channel_name(*channel),
                    who(from),
                    who(to),
                    if *symmetric { " (both ways)" } else { "" },
                    fault.loss * 100.0,
                    fault.delay_ms,
                    fault.jitter_ms,
                    fault.duplicate * 100.0,
                    fault.reorder * 100.0
                ),
            ))
        }
        Action::LinkOff(i) | Action::PartitionOff(i) => {
            let links = need_links()?;
            let mut faults = links.faults();
            for id in rule_ids.remove(i).unwrap_or_default() {
                faults.remove(id);
            }
            Some((EventKind::Heal, None, "heal".into()))
        }
        Action::PartitionOn(i, groups) => {
            let links = need_links()?;
            let (a, b) = (
                NodeSet::of(groups[0].clone()),
                NodeSet::of(groups[1].clone()),
            );
            let ids = links.faults().partition(&a, &b);
            rule_ids.insert(*i, ids.to_vec());
            partitions.push(groups.clone());
            Some((
                EventKind::Partition,
                None,
                format!(
                    "partition {} | {}",
                    groups[0].join(","),
                    groups[1].join(",")
                ),
            ))
        }
        Action::HealAll => {
            let links = need_links()?;
            links.faults().clear();
            rule_ids.clear();
            Some((EventKind::Heal, None, "heal all link faults".into()))
        }
    })
}

fn node_mut<'a>(nodes: &'a mut [NodeRun], name: &str) -> Result<&'a mut NodeRun, ChaosError> {
    nodes
        .iter_mut()
        .find(|n| n.name == name)
        .ok_or_else(|| ChaosError::Scenario(format!("unknown node {name}")))
}

fn channel_name(c: crate::scenario::ChannelSel) -> &'static str {
    match c {
        crate::scenario::ChannelSel::Gossip => "gossip",
        crate::scenario::ChannelSel::Tunnel => "tunnel",
        crate::scenario::ChannelSel::Both => "gossip+tunnel",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_orders_and_expands_ends() {
        let faults = vec![
            FaultSpec::Pause {
                at_s: 5.0,
                node: "n2".into(),
                for_s: 5.0,
            },
            FaultSpec::Kill {
                at_s: 1.0,
                node: "n3".into(),
            },
            FaultSpec::Partition {
                at_s: 2.0,
                for_s: Some(1.0),
                groups: vec![vec!["n1".into()], vec!["n2".into()]],
            },
        ];
        let s = schedule(&faults);
        let times: Vec<f64> = s.iter().map(|(t, _)| *t).collect();
        assert_eq!(times, [1.0, 2.0, 3.0, 5.0, 10.0]);
        assert!(matches!(s[4].1, Action::Resume(_)));
        assert!(matches!(s[2].1, Action::PartitionOff(2)));
    }
}
