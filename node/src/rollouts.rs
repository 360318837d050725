//! The cluster's rollouts as this node holds and drives them: cluster
//! config (see [`crate::cluster_config`]) naming what to roll out, and a
//! task that, once a second, merges the progress every member gossips,
//! judges the current step from every member's statistics of it, moves
//! the split when the verdict says so, and gossips this node's progress
//! and statistics under `rollout`. Any node may advance a rollout; the
//! merge only moves forward, so all of them agree (see
//! [`weft_runtime::policy::rollout`]). And `weft rollout`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use hyper::Method;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;
use weft_gossip::{ClusterView, Key};
use weft_runtime::dataplane::rollouts::MeteredStep;
use weft_runtime::dataplane::DataPlane;
use weft_runtime::gossip_writer::GossipWriter;
use weft_runtime::policy::rollout::{
    judge, parse_steps, Phase, Progress, Rollout, Rollouts, StepStats, TagStats,
};

use crate::cli::RolloutArgs;
use crate::cluster_config::{config_record, ClusterConfig};
use crate::follow::{reports, OwnKey};
use crate::{client, config, config_command, NodeError};

config_record!(rollouts: Rollouts, "rollouts", Key::Rollouts);

/// This node's copy of the rollouts.
pub type ClusterRollouts = ClusterConfig<Record>;

/// Loads `rollouts.json` (missing: none under way).
pub fn load(data_dir: &Path) -> Result<ClusterRollouts, NodeError> {
    // The driver reads the config on every round; nothing to hand over.
    ClusterConfig::load(data_dir, Box::new(|_: &Record| {}))
}

/// How often a node judges every rollout and gossips its side.
const ROUND: Duration = Duration::from_secs(1);

/// What a node gossips of one rollout.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Report {
    progress: Progress,
    /// Its statistics of the step `progress` is at.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stats: Option<StepStats>,
}

/// One rollout as this node sees it (`/v1/health`'s `rollouts`).
#[derive(Debug, Clone, Serialize)]
pub struct RolloutStatus {
    /// The service rolled out.
    pub service: String,
    /// The stable tag.
    pub from: String,
    /// The canary's tag.
    pub to: String,
    /// Stepping, promoted or rolled back.
    pub phase: Phase,
    /// The step, counted from 1.
    pub step: usize,
    /// How many steps there are.
    pub steps: usize,
    /// The canary's share now, in percent.
    pub weight: u8,
    /// When the step or the final phase began, ms since the Unix epoch.
    pub since_ms: u64,
    /// Why it holds, moved, or ended where it did.
    pub why: String,
    /// The cluster's statistics of the stable tag in this step.
    pub stable: TagStats,
    /// The canary's.
    pub canary: TagStats,
}

/// Drives the rollouts on this node and shows where each stands.
#[derive(Debug)]
pub struct RolloutDriver {
    /// The rollouts operators asked for.
    pub config: Arc<ClusterRollouts>,
    dataplane: Arc<DataPlane>,
    status: Mutex<Vec<RolloutStatus>>,
}

impl RolloutDriver {
    /// Starts driving the rollouts of `config` every [`ROUND`].
    pub fn start(
        config: Arc<ClusterRollouts>,
        dataplane: Arc<DataPlane>,
        views: watch::Receiver<Arc<ClusterView>>,
        writer: GossipWriter,
    ) -> Arc<Self> {
        let driver = Arc::new(RolloutDriver {
            config,
            dataplane,
            status: Mutex::default(),
        });
        let this = driver.clone();
        tokio::spawn(async move {
            let mut own = OwnKey::new(Key::Rollout);
            let mut reports = BTreeMap::new();
            let mut rounds = tokio::time::interval(ROUND);
            rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                rounds.tick().await;
                let view = views.borrow().clone();
                reports = this.round(&view, &reports, unix_ms());
                own.write(&writer, &reports);
            }
        });
        driver
    }

    /// Every rollout as of the last round.
    pub fn status(&self) -> Vec<RolloutStatus> {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// One round: judges every rollout from this node's last reports and
    /// the other members', moves the data plane's splits and meters, and
    /// returns this node's new reports.
    fn round(
        &self,
        view: &ClusterView,
        mine: &BTreeMap<String, Report>,
        now_ms: u64,
    ) -> BTreeMap<String, Report> {
        let members: Vec<BTreeMap<String, Report>> =
            reports(view, &self.dataplane.node, &Key::Rollout).collect();
        let mut next = BTreeMap::new();
        let mut status = Vec::new();
        let mut splits = HashMap::new();
        let mut meters = HashMap::new();
        for (service, rollout) in &self.config.current().rollouts.services {
            let theirs: Vec<&Report> = members.iter().filter_map(|r| r.get(service)).collect();
            let (report, shown) = self.judge(service, rollout, mine.get(service), &theirs, now_ms);
            let at = &report.progress;
            metrics::gauge!("weft_rollout_canary_weight", "service" => service.clone())
                .set(f64::from(rollout.weight(at)));
            splits.insert(service.clone(), rollout.split(at));
            let metered = MeteredStep {
                started: at.started,
                step: at.step,
                from: rollout.from.clone(),
                to: rollout.to.clone(),
            };
            meters.insert(service.clone(), metered);
            status.push(shown);
            next.insert(service.clone(), report);
        }
        self.dataplane.set_rollout_splits(splits);
        self.dataplane.rollouts.meter(&meters);
        *self.status.lock().unwrap_or_else(|p| p.into_inner()) = status;
        next
    }

    /// Where `service`'s rollout stands after this round, from this
    /// node's last report and the other members': the report this node
    /// gossips and what it shows.
    fn judge(
        &self,
        service: &str,
        rollout: &Rollout,
        mine: Option<&Report>,
        theirs: &[&Report],
        now_ms: u64,
    ) -> (Report, RolloutStatus) {
        let known = || mine.into_iter().chain(theirs.iter().copied());
        let at = Progress::newest(rollout, known().map(|r| &r.progress), now_ms);
        let of_step = |s: &&StepStats| s.started == at.started && s.step == at.step;
        let here = self.dataplane.rollouts.stats(service);
        let here = here.as_ref().filter(of_step);
        let others = theirs
            .iter()
            .filter_map(|r| r.stats.as_ref())
            .filter(of_step);
        let cluster = cluster_stats(&at, here.into_iter().chain(others));
        let verdict = judge(rollout, &at, &cluster, now_ms);
        let moved = verdict.next.is_some();
        let at = match verdict.next {
            Some(next) => {
                announce(service, rollout, &next, &verdict.why);
                next
            }
            None => at,
        };
        let shown = RolloutStatus {
            service: service.to_string(),
            from: rollout.from.clone(),
            to: rollout.to.clone(),
            phase: at.phase,
            step: usize::from(at.step) + 1,
            steps: rollout.steps.len(),
            weight: rollout.weight(&at),
            since_ms: at.since_ms,
            why: verdict.why,
            stable: cluster.stable,
            canary: cluster.canary,
        };
        // Statistics belong to the step they were counted in.
        let stats = here
            .copied()
            .filter(|_| !moved && at.phase == Phase::Stepping);
        (
            Report {
                progress: at,
                stats,
            },
            shown,
        )
    }
}

/// The cluster's statistics of the step `at` is at: the members' reports
/// of it, added up.
fn cluster_stats<'a>(at: &Progress, reports: impl Iterator<Item = &'a StepStats>) -> StepStats {
    let all: Vec<&StepStats> = reports.collect();
    StepStats {
        started: at.started,
        step: at.step,
        stable: TagStats::merge(all.iter().map(|s| &s.stable)),
        canary: TagStats::merge(all.iter().map(|s| &s.canary)),
    }
}

/// Logs a move of `service`'s rollout to `at`.
fn announce(service: &str, rollout: &Rollout, at: &Progress, why: &str) {
    let weight = rollout.weight(at);
    match at.phase {
        Phase::RolledBack => {
            tracing::warn!(service, canary = rollout.to, why, "rollout rolled back")
        }
        Phase::Promoted => tracing::info!(service, canary = rollout.to, why, "rollout promoted"),
        Phase::Stepping => tracing::info!(
            service,
            canary = rollout.to,
            weight,
            why,
            "rollout advanced"
        ),
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs `weft rollout` against the node at `socket`.
pub async fn run(socket: &Path, args: RolloutArgs) -> Result<(), NodeError> {
    let service = match args.service.as_deref() {
        None | Some("status") => return status(socket, args.json).await,
        Some(service) => service.to_string(),
    };
    let rollout = if args.clear {
        None
    } else {
        Some(requested(socket, &service, &args).await?)
    };
    let operator = args
        .signing
        .operator("rollout")
        .map_err(NodeError::Config)?;
    let (version, operator) = config_command::change(socket, &operator, |held: Record| {
        Ok(Record {
            rollouts: held.rollouts.with(&service, rollout.clone())?,
            grant: None,
        })
    })
    .await?;
    let what = match &rollout {
        Some(r) => format!(
            "every node moves {service} from {} to {} by steps of {:?}% every {} s while the canary stays within bounds",
            r.from, r.to, r.steps, r.interval_secs
        ),
        None => format!("{service} follows its route again"),
    };
    println!(
        "rollouts version {version}, granted by operator {operator}; {what} (see `weft rollout status`)"
    );
    Ok(())
}

/// The rollout `args` ask for.
async fn requested(socket: &Path, service: &str, args: &RolloutArgs) -> Result<Rollout, NodeError> {
    let bad = |e: String| NodeError::Config(e);
    let Some(to) = args.to.as_deref() else {
        return Err(bad(format!(
            "give the canary's tag (e.g. `weft rollout {service} --to v2`) or --clear"
        )));
    };
    let from = match &args.from {
        Some(from) => from.clone(),
        None => stable_tag(socket, service, to).await?,
    };
    let mut rollout = Rollout::new(&from, to);
    if let Some(steps) = &args.steps {
        rollout.steps = parse_steps(steps).map_err(bad)?;
    }
    if let Some(interval) = &args.interval {
        let interval = config::parse_duration(interval).map_err(bad)?;
        rollout.interval_secs = u32::try_from(interval.as_secs()).unwrap_or(u32::MAX);
    }
    if let Some(rate) = &args.max_error_rate {
        rollout.max_error_rate = rate.parse().map_err(bad)?;
    }
    if let Some(ratio) = &args.max_p99 {
        rollout.max_p99 = ratio.parse().map_err(bad)?;
    }
    Ok(rollout)
}

/// The tag `service` is served by now, when `--from` is not given: the
/// heaviest other tag of its route, else the one other tag its instances
/// carry.
async fn stable_tag(socket: &Path, service: &str, to: &str) -> Result<String, NodeError> {
    let (status, routes) = client::call(socket, Method::GET, "/v1/routes", None).await?;
    client::check(status, &routes)?;
    let heaviest = routes["routes"]["splits"][service]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["tag"] != to)
        .max_by_key(|s| s["weight"].as_u64().unwrap_or(0))
        .and_then(|s| s["tag"].as_str());
    if let Some(tag) = heaviest {
        return Ok(tag.to_string());
    }
    let (status, catalog) = client::call(socket, Method::GET, "/v1/services", None).await?;
    client::check(status, &catalog)?;
    let mut tags: Vec<&str> = catalog["services"][service]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|i| {
            i["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
        })
        .filter(|t| *t != to)
        .collect();
    tags.sort_unstable();
    tags.dedup();
    match tags.as_slice() {
        [tag] => Ok(tag.to_string()),
        [] => Err(NodeError::Config(format!(
            "no instance of {service} carries a tag other than {to}: give the stable one with --from"
        ))),
        many => Err(NodeError::Config(format!(
            "{service}'s instances carry {}: say which one serves now with --from",
            many.join(", ")
        ))),
    }
}

/// `weft rollout status`: every rollout and where it stands.
async fn status(socket: &Path, json: bool) -> Result<(), NodeError> {
    let (status, health) = client::call(socket, Method::GET, "/v1/health", None).await?;
    client::check(status, &health)?;
    if json {
        println!("{:#}", health["rollouts"]);
        return Ok(());
    }
    print!("{}", client::rollouts_table(&health["rollouts"]));
    Ok(())
}
