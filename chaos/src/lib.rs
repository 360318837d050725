//! weft-chaos: injects network, process and service faults into a real local
//! weft cluster and checks that nothing is lost.
//!
//! The kernel here has no netem, so network faults are injected in user
//! space by a UDP relay on every node's advertised gossip and tunnel
//! addresses. Process faults are real signals to real `weft node` processes;
//! service faults come from the `demo-service` binary's flags.
//!
//! # Layout
//!
//! - [`fault`]: pure link-fault policy (loss, delay, jitter, duplication,
//!   reordering, partitions); no IO.
//! - [`links`]: the rules in force and per-link counters.
//! - [`relay`]: the UDP relay that applies them per direction between
//!   loopback nodes.
//! - [`hosts`]: separate hosts (network namespaces, default ports) and the
//!   packet switch between them that applies the same rules.
//! - [`tasks`]: background tasks that end with their owner.
//! - [`process`]: spawning, `kill -9`, SIGSTOP/SIGCONT, restart; children die
//!   with their handles.
//! - [`api`]: a deadline-bound client for a node's local socket.
//! - [`load`]: the open-loop load generator.
//! - [`scenario`]: scenario files (TOML) and their validation.
//! - [`report`]: pure analysis of what was observed into invariants, the
//!   table and the JSON report.
//! - [`network`]: where the nodes run (loopback or separate hosts) and how
//!   they reach each other.
//! - [`runner`]: starts everything, applies the schedule, collects.

pub mod api;
pub mod fault;
pub mod hosts;
pub mod links;
pub mod load;
pub mod network;
pub mod process;
pub mod relay;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod tasks;

pub use report::Report;
pub use runner::{run, Options};
pub use scenario::Scenario;

/// Why a scenario could not run (failed invariants are not errors: they are
/// in the [`Report`]).
#[derive(Debug, thiserror::Error)]
pub enum ChaosError {
    /// The scenario file is unreadable or invalid.
    #[error("scenario: {0}")]
    Scenario(String),
    /// A file, socket or binary problem.
    #[error("{0}")]
    Io(String),
    /// A process could not be started or signalled.
    #[error("process: {0}")]
    Process(String),
    /// The cluster did not come up as expected.
    #[error("cluster: {0}")]
    Cluster(String),
}
