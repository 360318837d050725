//! The fault table in force and the per-link counters, shared by the two
//! wires a scenario can run on: the UDP [`relay`](crate::relay) between
//! loopback nodes and the packet [`switch`](crate::hosts) between hosts.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use rand::rngs::StdRng;
use serde::Serialize;

use crate::fault::{Channel, FaultTable, Verdict};

/// Counters of one directed link.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct LinkStats {
    /// Datagrams forwarded (copies included).
    pub forwarded: u64,
    /// Datagrams dropped by a fault.
    pub dropped: u64,
    /// Datagrams sent twice.
    pub duplicated: u64,
    /// Datagrams held back to be overtaken.
    pub reordered: u64,
    /// Datagrams delayed by more than zero.
    pub delayed: u64,
}

/// One row of [`Links::stats`].
#[derive(Debug, Clone, Serialize)]
pub struct LinkStatsRow {
    /// Channel.
    pub channel: Channel,
    /// Sender node (`?` for an unknown source).
    pub from: String,
    /// Receiver node.
    pub to: String,
    /// Counters.
    #[serde(flatten)]
    pub stats: LinkStats,
}

/// The rules in force and what they did, per directed link.
#[derive(Debug, Default)]
pub struct Links {
    table: Mutex<FaultTable>,
    stats: Mutex<BTreeMap<(Channel, String, String), LinkStats>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Links {
    /// The fault table, to add or remove rules (on command or by schedule).
    pub fn faults(&self) -> MutexGuard<'_, FaultTable> {
        lock(&self.table)
    }

    /// Per-link counters so far.
    pub fn stats(&self) -> Vec<LinkStatsRow> {
        lock(&self.stats)
            .iter()
            .map(|((channel, from, to), s)| LinkStatsRow {
                channel: *channel,
                from: from.clone(),
                to: to.clone(),
                stats: s.clone(),
            })
            .collect()
    }

    /// What happens to one datagram from `from` to `to`, counted.
    pub fn decide(&self, channel: Channel, from: &str, to: &str, rng: &mut StdRng) -> Verdict {
        let verdict = self.faults().decide(channel, from, to, rng);
        let mut stats = lock(&self.stats);
        let s = stats
            .entry((channel, from.to_string(), to.to_string()))
            .or_default();
        if verdict.dropped() {
            s.dropped += 1;
        } else {
            s.forwarded += verdict.sends.len() as u64;
            s.duplicated += u64::from(verdict.duplicated);
            s.reordered += u64::from(verdict.reordered);
            s.delayed += u64::from(verdict.sends.iter().any(|d| !d.is_zero()));
        }
        verdict
    }
}
