//! Link faults as pure decisions: given the rules in force, what happens to
//! one datagram from node A to node B (dropped, delayed, duplicated).
//!
//! No sockets and no clock here: the relay asks [`FaultTable::decide`] with
//! its own random source and acts on the answer, so the policy is tested
//! with plain `#[test]`s and a seeded RNG.

use std::collections::BTreeSet;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Which UDP traffic a rule touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Sealed chitchat gossip.
    Gossip,
    /// QUIC tunnels (the data plane).
    Tunnel,
}

impl Channel {
    /// Lower-case name, as in scenario files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Gossip => "gossip",
            Channel::Tunnel => "tunnel",
        }
    }
}

/// A set of node names; empty means every node (including unknown sources).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSet(pub BTreeSet<String>);

impl NodeSet {
    /// Every node.
    pub fn any() -> Self {
        NodeSet(BTreeSet::new())
    }

    /// Exactly these nodes.
    pub fn of<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        NodeSet(names.into_iter().map(Into::into).collect())
    }

    /// Whether `node` is in the set.
    pub fn contains(&self, node: &str) -> bool {
        self.0.is_empty() || self.0.contains(node)
    }
}

/// What happens to datagrams on one directed link.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LinkFault {
    /// Probability in [0, 1] that a datagram is dropped (1.0: partitioned).
    pub loss: f64,
    /// Fixed delay added to every datagram.
    pub delay_ms: u64,
    /// Uniform extra delay in [0, jitter_ms] per datagram.
    pub jitter_ms: u64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by `reorder_ms` so that
    /// later ones overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held (default 20 ms when 0).
    pub reorder_ms: u64,
}

impl LinkFault {
    /// Drops everything: one side of a partition.
    pub fn partition() -> Self {
        LinkFault {
            loss: 1.0,
            ..LinkFault::default()
        }
    }

    /// Checks the probabilities are probabilities and delays are sane.
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("loss", self.loss),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} = {p} must be in [0, 1]"));
            }
        }
        for (name, ms) in [
            ("delay_ms", self.delay_ms),
            ("jitter_ms", self.jitter_ms),
            ("reorder_ms", self.reorder_ms),
        ] {
            if ms > 60_000 {
                return Err(format!("{name} = {ms} must be at most 60000"));
            }
        }
        Ok(())
    }
}

/// One rule: a fault on the links from `from` to `to` on `channels`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rule {
    /// Handle to remove the rule again.
    pub id: u64,
    /// Channels it applies to.
    pub channels: Vec<Channel>,
    /// Senders.
    pub from: NodeSet,
    /// Receivers.
    pub to: NodeSet,
    /// The fault.
    pub fault: LinkFault,
}

impl Rule {
    fn matches(&self, channel: Channel, from: &str, to: &str) -> bool {
        from != to
            && self.channels.contains(&channel)
            && self.from.contains(from)
            && self.to.contains(to)
    }
}

/// The rules in force; several rules on one link combine (losses compound,
/// delays add, the largest duplicate and reorder probabilities win).
#[derive(Debug, Clone, Default)]
pub struct FaultTable {
    rules: Vec<Rule>,
    next_id: u64,
}

impl FaultTable {
    /// Adds a rule; returns its id.
    pub fn add(
        &mut self,
        channels: Vec<Channel>,
        from: NodeSet,
        to: NodeSet,
        fault: LinkFault,
    ) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        self.rules.push(Rule {
            id,
            channels,
            from,
            to,
            fault,
        });
        id
    }

    /// Adds a partition between `a` and `b` on every channel, both ways;
    /// returns the two rule ids.
    pub fn partition(&mut self, a: &NodeSet, b: &NodeSet) -> [u64; 2] {
        let all = vec![Channel::Gossip, Channel::Tunnel];
        [
            self.add(all.clone(), a.clone(), b.clone(), LinkFault::partition()),
            self.add(all, b.clone(), a.clone(), LinkFault::partition()),
        ]
    }

    /// Removes a rule; false if it was not there.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.id != id);
        self.rules.len() != before
    }

    /// Removes every rule (heal everything).
    pub fn clear(&mut self) {
        self.rules.clear();
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The combined fault on one directed link.
    pub fn effective(&self, channel: Channel, from: &str, to: &str) -> Option<LinkFault> {
        let mut matching = self
            .rules
            .iter()
            .filter(|r| r.matches(channel, from, to))
            .peekable();
        matching.peek()?;
        let mut keep = 1.0;
        let mut out = LinkFault::default();
        for r in matching {
            let f = &r.fault;
            keep *= 1.0 - f.loss;
            out.delay_ms = out.delay_ms.saturating_add(f.delay_ms);
            out.jitter_ms = out.jitter_ms.saturating_add(f.jitter_ms);
            out.duplicate = out.duplicate.max(f.duplicate);
            out.reorder = out.reorder.max(f.reorder);
            out.reorder_ms = out.reorder_ms.max(f.reorder_ms);
        }
        out.loss = 1.0 - keep;
        Some(out)
    }

    /// What to do with one datagram on `from -> to`.
    pub fn decide<R: Rng>(&self, channel: Channel, from: &str, to: &str, rng: &mut R) -> Verdict {
        match self.effective(channel, from, to) {
            None => Verdict::pass(),
            Some(f) => decide(&f, rng),
        }
    }
}

/// The fate of one datagram: a send delay per copy; no copies means dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// One entry per copy to send, each with its delay.
    pub sends: Vec<Duration>,
    /// The copy count went up by duplication.
    pub duplicated: bool,
    /// The datagram was held back to be overtaken.
    pub reordered: bool,
}

impl Verdict {
    /// Forward once, now.
    pub fn pass() -> Self {
        Verdict {
            sends: vec![Duration::ZERO],
            duplicated: false,
            reordered: false,
        }
    }

    /// Whether the datagram is dropped.
    pub fn dropped(&self) -> bool {
        self.sends.is_empty()
    }
}

/// Applies one link's fault to one datagram.
pub fn decide<R: Rng>(f: &LinkFault, rng: &mut R) -> Verdict {
    if f.loss >= 1.0 || (f.loss > 0.0 && rng.gen_bool(f.loss)) {
        return Verdict {
            sends: Vec::new(),
            duplicated: false,
            reordered: false,
        };
    }
    let one = |rng: &mut R| {
        let jitter = if f.jitter_ms > 0 {
            rng.gen_range(0..=f.jitter_ms * 1000)
        } else {
            0
        };
        Duration::from_millis(f.delay_ms) + Duration::from_micros(jitter)
    };
    let mut first = one(rng);
    let reordered = f.reorder > 0.0 && rng.gen_bool(f.reorder);
    if reordered {
        let hold = if f.reorder_ms == 0 { 20 } else { f.reorder_ms };
        first += Duration::from_millis(hold);
    }
    let mut sends = vec![first];
    let duplicated = f.duplicate > 0.0 && rng.gen_bool(f.duplicate);
    if duplicated {
        sends.push(one(rng));
    }
    Verdict {
        sends,
        duplicated,
        reordered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    #[test]
    fn no_rule_passes_unchanged() {
        let t = FaultTable::default();
        assert_eq!(
            t.decide(Channel::Gossip, "n1", "n2", &mut rng()),
            Verdict::pass()
        );
    }

    #[test]
    fn partition_drops_both_ways_only_across_groups() {
        let mut t = FaultTable::default();
        let a = NodeSet::of(["n1", "n2"]);
        let b = NodeSet::of(["n3", "n4"]);
        let ids = t.partition(&a, &b);
        let mut r = rng();
        for ch in [Channel::Gossip, Channel::Tunnel] {
            assert!(t.decide(ch, "n1", "n3", &mut r).dropped());
            assert!(t.decide(ch, "n4", "n2", &mut r).dropped());
            assert!(!t.decide(ch, "n1", "n2", &mut r).dropped());
            assert!(!t.decide(ch, "n3", "n4", &mut r).dropped());
        }
        for id in ids {
            assert!(t.remove(id));
        }
        assert!(!t.decide(Channel::Gossip, "n1", "n3", &mut r).dropped());
    }

    #[test]
    fn loss_rate_is_close_to_the_setting() {
        let f = LinkFault {
            loss: 0.3,
            ..LinkFault::default()
        };
        let mut r = rng();
        let dropped = (0..100_000)
            .filter(|_| decide(&f, &mut r).dropped())
            .count();
        assert!((28_500..31_500).contains(&dropped), "{dropped}");
    }

    #[test]
    fn losses_compound_and_delays_add() {
        let mut t = FaultTable::default();
        let half = LinkFault {
            loss: 0.5,
            delay_ms: 10,
            ..LinkFault::default()
        };
        t.add(
            vec![Channel::Gossip],
            NodeSet::any(),
            NodeSet::any(),
            half.clone(),
        );
        t.add(
            vec![Channel::Gossip],
            NodeSet::of(["n1"]),
            NodeSet::any(),
            half,
        );
        let f = t.effective(Channel::Gossip, "n1", "n2").unwrap();
        assert!((f.loss - 0.75).abs() < 1e-9);
        assert_eq!(f.delay_ms, 20);
        let f = t.effective(Channel::Gossip, "n2", "n1").unwrap();
        assert!((f.loss - 0.5).abs() < 1e-9);
        assert!(t.effective(Channel::Tunnel, "n1", "n2").is_none());
    }

    #[test]
    fn jitter_stays_in_bounds_and_duplicates_get_two_sends() {
        let f = LinkFault {
            delay_ms: 5,
            jitter_ms: 10,
            duplicate: 1.0,
            ..LinkFault::default()
        };
        let mut r = rng();
        for _ in 0..1000 {
            let v = decide(&f, &mut r);
            assert!(v.duplicated);
            assert_eq!(v.sends.len(), 2);
            for d in v.sends {
                assert!(d >= Duration::from_millis(5) && d <= Duration::from_millis(15));
            }
        }
    }

    #[test]
    fn reordered_datagrams_are_held_back() {
        let f = LinkFault {
            reorder: 1.0,
            reorder_ms: 30,
            ..LinkFault::default()
        };
        let v = decide(&f, &mut rng());
        assert!(v.reordered);
        assert_eq!(v.sends, vec![Duration::from_millis(30)]);
    }

    #[test]
    fn a_node_never_faults_itself() {
        let mut t = FaultTable::default();
        t.add(
            vec![Channel::Gossip],
            NodeSet::any(),
            NodeSet::any(),
            LinkFault::partition(),
        );
        assert!(!t.decide(Channel::Gossip, "n1", "n1", &mut rng()).dropped());
    }

    #[test]
    fn validation_rejects_bad_numbers() {
        let bad = LinkFault {
            loss: 1.5,
            ..LinkFault::default()
        };
        assert!(bad.validate().is_err());
        let bad = LinkFault {
            delay_ms: 120_000,
            ..LinkFault::default()
        };
        assert!(bad.validate().is_err());
        assert!(LinkFault::partition().validate().is_ok());
    }
}
