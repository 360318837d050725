//! `weft-chaos`: runs a scenario file against a real local cluster, prints a
//! table, writes a JSON report, and exits 1 when an invariant fails.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use weft_chaos::{Options, Scenario};

/// Fault injection for weft.
#[derive(Debug, Parser)]
#[command(name = "weft-chaos", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a scenario: start the cluster, load and faults, check invariants.
    Run {
        /// Scenario file, e.g. chaos/scenarios/kill-node.toml.
        scenario: PathBuf,
        /// Run the [long] profile instead of the short (CI) one.
        #[arg(long)]
        long: bool,
        /// Where to write the JSON report [default: chaos-report-NAME.json].
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// The weft binary [default: next to weft-chaos, else `weft` on PATH].
        #[arg(long, env = "WEFT_BIN", value_name = "FILE")]
        weft: Option<PathBuf>,
        /// The demo-service binary [default: next to weft-chaos].
        #[arg(long, env = "DEMO_SERVICE_BIN", value_name = "FILE")]
        demo_service: Option<PathBuf>,
        /// Directory for the work dir (logs, data dirs) [default: system temp].
        #[arg(long, value_name = "DIR")]
        work_dir: Option<PathBuf>,
        /// Keep the work dir even when everything passed.
        #[arg(long)]
        keep: bool,
        /// Run every node on a host of its own: a network namespace with its
        /// own address and the default ports (7946, 7947, 4140, 9646),
        /// joined through this process, which applies the link faults.
        /// Needs root and `ip`.
        #[arg(long)]
        hosts: bool,
        /// Multiply every load rate (e.g. 0.2 against debug builds).
        #[arg(long, default_value_t = 1.0, value_name = "X")]
        rate_scale: f64,
    },
    /// Check scenario files without running them.
    Check {
        /// Scenario files.
        #[arg(required = true)]
        scenarios: Vec<PathBuf>,
    },
}

/// A sibling binary of this executable, or `name` on PATH.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|d| d.join(name))
                    .find(|p| p.is_file())
            })
        })
        .unwrap_or_else(|| Path::new(name).to_path_buf())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { scenarios } => {
            let mut ok = true;
            for path in scenarios {
                match Scenario::load(&path) {
                    Ok(s) => println!("{}: ok ({})", path.display(), s.name),
                    Err(e) => {
                        eprintln!("weft-chaos: {e}");
                        ok = false;
                    }
                }
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(64)
            }
        }
        Command::Run {
            scenario,
            long,
            report,
            weft,
            demo_service,
            work_dir,
            keep,
            hosts,
            rate_scale,
        } => {
            let scenario = match Scenario::load(&scenario) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("weft-chaos: {e}");
                    return ExitCode::from(64);
                }
            };
            let opts = Options {
                weft_bin: weft.unwrap_or_else(|| sibling("weft")),
                demo_bin: demo_service.unwrap_or_else(|| sibling("demo-service")),
                long,
                work_root: work_dir,
                keep,
                hosts,
                rate_scale,
                report_path: Some(report.unwrap_or_else(|| {
                    PathBuf::from(format!("chaos-report-{}.json", scenario.name))
                })),
            };
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("weft-chaos: cannot start the runtime: {e}");
                    return ExitCode::from(70);
                }
            };
            let result = runtime.block_on(async {
                tokio::select! {
                    r = weft_chaos::run(&scenario, &opts) => Some(r),
                    // Dropping the run kills every process it started.
                    _ = tokio::signal::ctrl_c() => None,
                }
            });
            match result {
                None => {
                    eprintln!("weft-chaos: interrupted; every started process was killed");
                    ExitCode::from(130)
                }
                Some(Err(e)) => {
                    eprintln!("weft-chaos: {e}");
                    ExitCode::from(69)
                }
                Some(Ok(report)) => {
                    print!("{}", report.table());
                    if let Some(path) = &opts.report_path {
                        println!("report: {}", path.display());
                    }
                    if report.passed {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
    }
}
