//! Every scenario in `chaos/scenarios/` against the real `weft` and
//! `demo-service` binaries: the short profiles run in CI, the long ones with
//! `cargo test -p weft-chaos -- --ignored`.
//!
//! The binaries are found through `WEFT_BIN` / `DEMO_SERVICE_BIN`, else next
//! to this test's directory (`cargo test` builds every workspace binary into
//! `target/<profile>/` before it runs integration tests). Scenarios run one at
//! a time: each one loads the machine on purpose.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use weft_chaos::{Options, Scenario};

static SERIAL: Mutex<()> = Mutex::new(());

/// Invariants that cannot hold until a named piece of weft lands. Their
/// numbers are printed and written to the report; the test does not fail on
/// them, and says so loudly when one starts passing (then remove the entry).
const PENDING: &[(&str, &str, &str)] = &[];

/// Invariants that measure speed. A debug build of weft on two cores runs
/// out of CPU (starved gossip then reports false deaths), so in a debug
/// `cargo test` these are printed as advisory; `cargo test --release` and
/// `weft-chaos run` against release binaries enforce them.
fn timing(invariant: &str) -> bool {
    matches!(
        invariant,
        "success_rate" | "false_deaths" | "p99_latency" | "reconvergence"
    ) || invariant.starts_with("detection(")
        || invariant.starts_with("share(")
}

fn binary(env: &str, name: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env) {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/scenarios-<hash> -> target/<profile>/<name>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join(name))
        .expect("target dir above the test executable")
}

/// Debug builds of weft cannot carry the scenarios' full rates on a
/// two-core machine (the nodes, not weft-chaos, run out of CPU, and starved
/// gossip then produces false deaths), so a debug `cargo test` runs the load
/// at a fifth of the rate; `WEFT_CHAOS_RATE_SCALE` overrides. Release
/// binaries run at the written rates: see chaos/README.md.
fn rate_scale() -> f64 {
    if let Some(x) = std::env::var("WEFT_CHAOS_RATE_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return x;
    }
    if cfg!(debug_assertions) {
        0.2
    } else {
        1.0
    }
}

/// Where the nodes run: all on loopback, or each on a host of its own.
#[derive(Clone, Copy, PartialEq)]
enum Network {
    Loopback,
    Hosts,
}

/// Why this machine cannot run separate hosts (network namespaces need root
/// and `ip`), if it cannot; probed once per test run.
fn hosts_unavailable() -> Option<String> {
    static PROBED: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    PROBED.get_or_init(probe_hosts).clone()
}

fn probe_hosts() -> Option<String> {
    let uid = std::process::Command::new("id").arg("-u").output();
    if !uid.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0") {
        return Some("not root".into());
    }
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !ip(&["-V"]) {
        return Some("no `ip` (iproute2)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("no /dev/net/tun".into());
    }
    // Root in a container may still be denied namespaces.
    let probe = format!("wcprobe{}", std::process::id());
    if !ip(&["netns", "add", &probe]) {
        return Some("`ip netns add` is not permitted here".into());
    }
    ip(&["netns", "del", &probe]);
    None
}

fn run(name: &str, long: bool) {
    run_on(name, long, Network::Loopback);
}

fn run_on(name: &str, long: bool, network: Network) {
    if network == Network::Hosts {
        if let Some(why) = hosts_unavailable() {
            eprintln!("skipped: {name} on separate hosts needs root and `ip` ({why})");
            return;
        }
    }
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"));
    let scenario = Scenario::load(&path).expect("scenario file is valid");
    let profile = if long { "long" } else { "short" };
    let on = match network {
        Network::Loopback => "",
        Network::Hosts => "-hosts",
    };
    let report_path = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("chaos")
        .join(format!("{name}-{profile}{on}.json"));
    let opts = Options {
        weft_bin: binary("WEFT_BIN", "weft"),
        demo_bin: binary("DEMO_SERVICE_BIN", "demo-service"),
        long,
        work_root: None,
        keep: false,
        hosts: network == Network::Hosts,
        report_path: Some(report_path.clone()),
        rate_scale: rate_scale(),
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let report = runtime
        .block_on(weft_chaos::run(&scenario, &opts))
        .unwrap_or_else(|e| panic!("scenario {name} could not run: {e}"));
    println!("{}", report.table());
    println!("report: {}", report_path.display());
    let mut failed = Vec::new();
    for v in &report.invariants {
        let pending = PENDING.iter().find(|(s, i, _)| *s == name && *i == v.name);
        match (v.passed, pending) {
            (true, Some(_)) => println!(
                "NOTE: pending invariant {name}/{} now passes ({}); remove it from PENDING",
                v.name, v.measured
            ),
            (false, Some((_, _, why))) => println!(
                "PENDING: {name}/{} measured {} against target {} ({why})",
                v.name, v.measured, v.target
            ),
            (false, None) if cfg!(debug_assertions) && timing(&v.name) => println!(
                "ADVISORY (debug build): {name}/{} measured {} against target {}",
                v.name, v.measured, v.target
            ),
            (false, None) => {
                failed.push(format!("{} {} (target {})", v.name, v.measured, v.target))
            }
            (true, None) => {}
        }
    }
    assert!(
        failed.is_empty(),
        "scenario {name} ({profile}) failed: {}",
        failed.join("; ")
    );
}

#[test]
fn kill_node() {
    run("kill-node", false);
}

#[test]
fn pause_node() {
    run("pause-node", false);
}

#[test]
fn gossip_loss() {
    run("gossip-loss", false);
}

#[test]
fn partition_heal() {
    run("partition-heal", false);
}

#[test]
fn slow_instance() {
    run("slow-instance", false);
}

#[test]
fn flapping() {
    run("flapping", false);
}

/// The same scenario with every node on a host of its own (default ports,
/// advertise detection), the faults applied by the switch between hosts.
#[test]
fn partition_heal_on_separate_hosts() {
    run_on("partition-heal", false, Network::Hosts);
}

#[test]
fn gossip_loss_on_separate_hosts() {
    run_on("gossip-loss", false, Network::Hosts);
}

#[test]
#[ignore = "long: about 3 minutes; cargo test -p weft-chaos -- --ignored"]
fn flapping_long() {
    run("flapping", true);
}

#[test]
#[ignore = "long: about 5 minutes; cargo test -p weft-chaos -- --ignored"]
fn kill_node_long() {
    run("kill-node", true);
}

#[test]
#[ignore = "long: about 4 minutes; cargo test -p weft-chaos -- --ignored"]
fn pause_node_long() {
    run("pause-node", true);
}

#[test]
#[ignore = "long: 60 s of gossip loss; cargo test -p weft-chaos -- --ignored"]
fn gossip_loss_long() {
    run("gossip-loss", true);
}

#[test]
#[ignore = "long: about 3 minutes; cargo test -p weft-chaos -- --ignored"]
fn partition_heal_long() {
    run("partition-heal", true);
}

#[test]
#[ignore = "long: about 3 minutes; cargo test -p weft-chaos -- --ignored"]
fn slow_instance_long() {
    run("slow-instance", true);
}
