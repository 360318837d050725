//! Scenario files: the cluster, the services, the load, the timed faults and
//! the invariants, read from TOML and checked before anything starts.
//!
//! Nodes are always named `n1` .. `nN`. Fault times are seconds after the
//! load starts. A file has a `[short]` profile (what CI runs) and may have a
//! `[long]` one (run with `--long`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fault::{Channel, LinkFault};
use crate::ChaosError;

/// A whole scenario file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Short name, used in reports.
    pub name: String,
    /// What the scenario shows.
    #[serde(default)]
    pub description: String,
    /// The cluster to start.
    pub cluster: ClusterSpec,
    /// Demo service instances, each beside one node.
    #[serde(default)]
    pub instances: Vec<InstanceSpec>,
    /// Load streams (open loop, fixed rate).
    #[serde(default)]
    pub load: Vec<LoadSpec>,
    /// What must hold.
    #[serde(default)]
    pub invariants: Invariants,
    /// The CI profile.
    pub short: Profile,
    /// The long profile (`--long`).
    pub long: Option<Profile>,
}

/// Cluster shape.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    /// Number of nodes, named n1..nN.
    pub nodes: usize,
    /// `--gossip-interval` in milliseconds.
    #[serde(default = "default_interval")]
    pub gossip_interval_ms: u64,
    /// Put the fault relay in front of every node (needed for link faults).
    #[serde(default = "yes")]
    pub relay: bool,
}

fn default_interval() -> u64 {
    100
}

fn yes() -> bool {
    true
}

/// One demo-service instance.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// Service name to register.
    pub service: String,
    /// Node it runs beside and registers with.
    pub node: String,
    /// `--error-rate`.
    #[serde(default)]
    pub error_rate: f64,
    /// `--latency-ms`.
    #[serde(default)]
    pub latency_ms: u64,
    /// `--flap-down-ms`.
    #[serde(default)]
    pub flap_down_ms: u64,
    /// `--flap-period-ms`.
    #[serde(default)]
    pub flap_period_ms: u64,
}

/// One load stream through one node's proxy.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSpec {
    /// Node whose proxy carries the load.
    pub via: String,
    /// Service to call.
    pub service: String,
    /// Requests per second, open loop.
    pub rps: u32,
    /// HTTP method.
    #[serde(default = "default_method")]
    pub method: String,
    /// Path.
    #[serde(default = "default_path")]
    pub path: String,
    /// Client timeout per request in milliseconds.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_method() -> String {
    "GET".into()
}

fn default_path() -> String {
    "/".into()
}

fn default_timeout() -> u64 {
    2000
}

/// The invariants; absent bounds are not checked. Lost registrations and
/// crashed processes are always checked.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Invariants {
    /// Minimum success rate of idempotent requests, over all load streams.
    pub min_success_rate: Option<f64>,
    /// Count the success rate only over requests due this many seconds after
    /// the load started (a learning phase the scenario describes).
    pub success_after_s: Option<f64>,
    /// Bound on kill -9 / SIGSTOP to "dead" on every other running node (s).
    pub max_detection_s: Option<f64>,
    /// Bound from the last fault's end to identical, expected membership and
    /// catalog on every running node (s).
    pub max_reconverge_s: Option<f64>,
    /// No node that no fault targeted is ever declared dead.
    #[serde(default = "yes")]
    pub no_false_deaths: bool,
    /// Bound on the p99 latency of all requests (ms).
    pub max_p99_ms: Option<f64>,
    /// Bound on the share of requests one node's instance serves.
    pub max_share: Option<ShareBound>,
}

impl Default for Invariants {
    fn default() -> Self {
        Invariants {
            min_success_rate: None,
            success_after_s: None,
            max_detection_s: None,
            max_reconverge_s: None,
            no_false_deaths: true,
            max_p99_ms: None,
            max_share: None,
        }
    }
}

/// "The instance beside `node` serves at most `share` of the requests."
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShareBound {
    /// Node whose instance is meant.
    pub node: String,
    /// Upper bound in [0, 1].
    pub share: f64,
}

/// A timed run.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Seconds of load.
    pub duration_s: f64,
    /// Faults, in any order.
    #[serde(default)]
    pub faults: Vec<FaultSpec>,
}

/// Which channels a link fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelSel {
    /// Gossip only.
    Gossip,
    /// Tunnel only.
    Tunnel,
    /// Both.
    Both,
}

impl ChannelSel {
    /// The channels meant.
    pub fn channels(self) -> Vec<Channel> {
        match self {
            ChannelSel::Gossip => vec![Channel::Gossip],
            ChannelSel::Tunnel => vec![Channel::Tunnel],
            ChannelSel::Both => vec![Channel::Gossip, Channel::Tunnel],
        }
    }
}

/// One timed fault.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FaultSpec {
    /// `kill -9` a node.
    Kill {
        /// Seconds after load start.
        at_s: f64,
        /// Node.
        node: String,
    },
    /// Start a killed node again, same flags and data dir.
    Restart {
        /// Seconds after load start.
        at_s: f64,
        /// Node.
        node: String,
    },
    /// SIGSTOP, then SIGCONT after `for_s`.
    Pause {
        /// Seconds after load start.
        at_s: f64,
        /// Node.
        node: String,
        /// How long the node stays stopped.
        for_s: f64,
    },
    /// Degrade links from `from` to `to` (empty: every node).
    Link {
        /// Seconds after load start.
        at_s: f64,
        /// Healed after this long (absent: until a `heal` or the end).
        for_s: Option<f64>,
        /// Channels.
        channel: ChannelSel,
        /// Senders (empty: all).
        #[serde(default)]
        from: Vec<String>,
        /// Receivers (empty: all).
        #[serde(default)]
        to: Vec<String>,
        /// Also apply from `to` to `from`.
        #[serde(default)]
        symmetric: bool,
        /// Drop probability.
        #[serde(default)]
        loss: f64,
        /// Fixed delay.
        #[serde(default)]
        delay_ms: u64,
        /// Extra uniform delay.
        #[serde(default)]
        jitter_ms: u64,
        /// Duplication probability.
        #[serde(default)]
        duplicate: f64,
        /// Reordering probability.
        #[serde(default)]
        reorder: f64,
        /// Hold time of a reordered datagram.
        #[serde(default)]
        reorder_ms: u64,
    },
    /// Drop everything between two groups, both channels, both ways.
    Partition {
        /// Seconds after load start.
        at_s: f64,
        /// Healed after this long (absent: until a `heal` or the end).
        for_s: Option<f64>,
        /// The two sides.
        groups: Vec<Vec<String>>,
    },
    /// Remove every link fault and partition.
    Heal {
        /// Seconds after load start.
        at_s: f64,
    },
}

impl FaultSpec {
    /// When it starts.
    pub fn at_s(&self) -> f64 {
        match self {
            FaultSpec::Kill { at_s, .. }
            | FaultSpec::Restart { at_s, .. }
            | FaultSpec::Pause { at_s, .. }
            | FaultSpec::Link { at_s, .. }
            | FaultSpec::Partition { at_s, .. }
            | FaultSpec::Heal { at_s } => *at_s,
        }
    }

    /// The link fault of a `link` entry.
    pub fn link_fault(&self) -> Option<LinkFault> {
        match self {
            FaultSpec::Link {
                loss,
                delay_ms,
                jitter_ms,
                duplicate,
                reorder,
                reorder_ms,
                ..
            } => Some(LinkFault {
                loss: *loss,
                delay_ms: *delay_ms,
                jitter_ms: *jitter_ms,
                duplicate: *duplicate,
                reorder: *reorder,
                reorder_ms: *reorder_ms,
            }),
            _ => None,
        }
    }
}

impl Scenario {
    /// Reads and validates a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ChaosError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ChaosError::Scenario(format!("{}: {e}", path.display())))?;
        Scenario::parse(&text).map_err(|e| match e {
            ChaosError::Scenario(m) => ChaosError::Scenario(format!("{}: {m}", path.display())),
            other => other,
        })
    }

    /// Parses and validates scenario text.
    pub fn parse(text: &str) -> Result<Scenario, ChaosError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ChaosError::Scenario(e.to_string()))?;
        s.validate().map_err(ChaosError::Scenario)?;
        Ok(s)
    }

    /// Node names n1..nN.
    pub fn node_names(&self) -> Vec<String> {
        (1..=self.cluster.nodes).map(|i| format!("n{i}")).collect()
    }

    /// The profile to run.
    pub fn profile(&self, long: bool) -> Result<&Profile, ChaosError> {
        if long {
            self.long
                .as_ref()
                .ok_or_else(|| ChaosError::Scenario(format!("{} has no [long] profile", self.name)))
        } else {
            Ok(&self.short)
        }
    }

    fn validate(&self) -> Result<(), String> {
        if !(2..=16).contains(&self.cluster.nodes) {
            return Err(format!(
                "cluster.nodes = {} must be in 2..=16",
                self.cluster.nodes
            ));
        }
        if !(10..=10_000).contains(&self.cluster.gossip_interval_ms) {
            return Err("cluster.gossip_interval_ms must be in 10..=10000".into());
        }
        let names = self.node_names();
        let known = |n: &str, what: &str| -> Result<(), String> {
            if names.iter().any(|k| k == n) {
                Ok(())
            } else {
                Err(format!(
                    "{what}: unknown node {n:?} (nodes are n1..n{})",
                    names.len()
                ))
            }
        };
        for i in &self.instances {
            known(&i.node, "instances.node")?;
            if !(0.0..=1.0).contains(&i.error_rate) {
                return Err(format!(
                    "instances.error_rate = {} must be in [0, 1]",
                    i.error_rate
                ));
            }
            if i.flap_down_ms > 0 && i.flap_period_ms == 0 {
                return Err("instances.flap_down_ms needs flap_period_ms".into());
            }
            if i.service.is_empty() {
                return Err("instances.service must not be empty".into());
            }
        }
        for l in &self.load {
            known(&l.via, "load.via")?;
            if !(1..=20_000).contains(&l.rps) {
                return Err(format!("load.rps = {} must be in 1..=20000", l.rps));
            }
            if http::Method::from_bytes(l.method.as_bytes()).is_err() {
                return Err(format!("load.method {:?} is not an HTTP method", l.method));
            }
            if !l.path.starts_with('/') || l.path.parse::<http::Uri>().is_err() {
                return Err(format!("load.path {:?} must be an absolute path", l.path));
            }
            if !(10..=120_000).contains(&l.timeout_ms) {
                return Err("load.timeout_ms must be in 10..=120000".into());
            }
        }
        let inv = &self.invariants;
        if let Some(r) = inv.min_success_rate {
            if !(0.0..=1.0).contains(&r) {
                return Err("invariants.min_success_rate must be in [0, 1]".into());
            }
        }
        if let Some(b) = &inv.max_share {
            known(&b.node, "invariants.max_share.node")?;
        }
        for (label, p) in [("short", Some(&self.short)), ("long", self.long.as_ref())] {
            let Some(p) = p else { continue };
            if !(p.duration_s > 0.0 && p.duration_s <= 3600.0) {
                return Err(format!("{label}.duration_s must be in (0, 3600]"));
            }
            for f in &p.faults {
                let at = f.at_s();
                if !(at >= 0.0 && at <= p.duration_s) {
                    return Err(format!(
                        "{label}.faults: at_s = {at} must be within the run (0..={})",
                        p.duration_s
                    ));
                }
                match f {
                    FaultSpec::Kill { node, .. } | FaultSpec::Restart { node, .. } => {
                        known(node, "faults.node")?
                    }
                    FaultSpec::Pause { node, for_s, .. } => {
                        known(node, "faults.node")?;
                        if !(*for_s > 0.0 && *for_s <= 3600.0) {
                            return Err("pause.for_s must be in (0, 3600]".into());
                        }
                    }
                    FaultSpec::Link {
                        from, to, for_s, ..
                    } => {
                        for n in from.iter().chain(to) {
                            known(n, "link")?;
                        }
                        check_for(*for_s)?;
                        if let Some(lf) = f.link_fault() {
                            lf.validate()
                                .map_err(|e| format!("{label}.faults link: {e}"))?;
                        }
                    }
                    FaultSpec::Partition { groups, for_s, .. } => {
                        if groups.len() != 2 || groups.iter().any(Vec::is_empty) {
                            return Err("partition.groups must be two non-empty lists".into());
                        }
                        for n in groups.iter().flatten() {
                            known(n, "partition.groups")?;
                        }
                        if groups[0].iter().any(|n| groups[1].contains(n)) {
                            return Err("partition.groups must not overlap".into());
                        }
                        check_for(*for_s)?;
                    }
                    FaultSpec::Heal { .. } => {}
                }
            }
        }
        Ok(())
    }
}

fn check_for(for_s: Option<f64>) -> Result<(), String> {
    match for_s {
        Some(d) if !(d > 0.0 && d <= 3600.0) => Err("for_s must be in (0, 3600]".into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
[cluster]
nodes = 3
[[instances]]
service = "web"
node = "n2"
[[load]]
via = "n1"
service = "web"
rps = 100
[invariants]
min_success_rate = 0.999
[short]
duration_s = 10
faults = [
  { kind = "kill", at_s = 2, node = "n2" },
  { kind = "link", at_s = 1, for_s = 3, channel = "gossip", loss = 0.3 },
  { kind = "partition", at_s = 4, groups = [["n1"], ["n2", "n3"]] },
]
"#;

    #[test]
    fn parses_a_good_file() {
        let s = Scenario::parse(OK).unwrap();
        assert_eq!(s.node_names(), ["n1", "n2", "n3"]);
        assert_eq!(s.short.faults.len(), 3);
        assert!(s.invariants.no_false_deaths);
        assert!(s.profile(true).is_err());
        let lf = s.short.faults[1].link_fault().unwrap();
        assert!((lf.loss - 0.3).abs() < 1e-9);
    }

    #[test]
    fn rejects_bad_input_with_a_message() {
        for (from, to, why) in [
            (
                "node = \"n2\"\n[[load]]",
                "node = \"n9\"\n[[load]]",
                "unknown node",
            ),
            ("rps = 100", "rps = 0", "load.rps"),
            ("loss = 0.3", "loss = 3.0", "loss"),
            ("at_s = 2,", "at_s = 99,", "within the run"),
            ("[\"n1\"], [\"n2\"", "[\"n1\"], [\"n1\"", "overlap"),
            ("kind = \"kill\"", "kind = \"explode\"", "explode"),
        ] {
            let text = OK.replace(from, to);
            assert_ne!(text, OK, "{from}");
            let err = Scenario::parse(&text).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
        assert!(Scenario::parse("not toml [").is_err());
        assert!(Scenario::parse("").is_err());
    }
}
