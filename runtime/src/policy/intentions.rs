//! Intentions: which caller may call which service.
//!
//! A rule names a source (a service, `-` for the anonymous caller of the
//! shared proxy, or `*`), a destination (a service or `*`) and an action.
//! The most specific rule that matches decides, as Consul's intentions do:
//! an exact source and destination, then any source to an exact
//! destination, then an exact source to any destination, then `*` to `*`;
//! without a match, the cluster default. A (source, destination) pair has
//! at most one rule, so no two rules tie.
//!
//! Pure logic: what the rules are and what they decide. Who may change
//! them (an operator's grant), how they spread and where they are kept is
//! the node's business.

use serde::{Deserialize, Serialize};

/// The wildcard source or destination.
pub const ANY: &str = "*";

/// Most rules one set holds: the set and its grant travel in one gossip
/// value (4 KiB).
pub const MAX_RULES: usize = 32;

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The call goes on.
    Allow,
    /// The call is refused with 403 `forbidden`.
    Deny,
}

impl Action {
    /// `allow` or `deny`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }

    /// Parses `allow` or `deny`.
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A service, `-` or `*`.
    pub source: String,
    /// A service or `*`.
    pub destination: String,
    /// What the rule decides.
    pub action: Action,
}

impl Rule {
    /// How specific the rule is (higher wins), if it matches.
    fn matches(&self, caller: &str, service: &str) -> Option<u8> {
        let source = if self.source == caller {
            2
        } else if self.source == ANY {
            0
        } else {
            return None;
        };
        let destination = if self.destination == service {
            1
        } else if self.destination == ANY {
            0
        } else {
            return None;
        };
        // An exact destination outranks an exact source.
        Some(destination * 4 + source)
    }

    /// `source -> destination: action`.
    pub fn describe(&self) -> String {
        format!(
            "{} -> {}: {}",
            self.source,
            self.destination,
            self.action.as_str()
        )
    }
}

/// What the intentions decide for one call, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Allow or deny.
    pub action: Action,
    /// The rule that decided; `None` means the default did.
    pub rule: Option<Rule>,
}

impl Decision {
    /// Why, in words (`weft-error` detail, `weft intentions check`).
    pub fn reason(&self) -> String {
        match &self.rule {
            Some(rule) => format!("rule {}", rule.describe()),
            None => format!("the cluster default ({})", self.action.as_str()),
        }
    }
}

/// The cluster's intentions at one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Intentions {
    /// 0 before any operator change; each change adds one.
    pub version: u64,
    /// What a call no rule matches gets.
    pub default: Action,
    /// At most one per (source, destination), sorted.
    pub rules: Vec<Rule>,
}

impl Default for Intentions {
    /// Version 0: everything allowed, as before any intention exists.
    fn default() -> Self {
        Intentions {
            version: 0,
            default: Action::Allow,
            rules: Vec::new(),
        }
    }
}

/// A change an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Sets the rule of (source, destination).
    Set(Rule),
    /// Removes the rule of (source, destination).
    Remove {
        /// The rule's source.
        source: String,
        /// The rule's destination.
        destination: String,
    },
    /// Sets the cluster default.
    Default(Action),
}

impl Intentions {
    /// What `caller`'s call to `service` gets.
    pub fn decide(&self, caller: &str, service: &str) -> Decision {
        let best = self
            .rules
            .iter()
            .filter_map(|rule| Some((rule.matches(caller, service)?, rule)))
            .max_by_key(|(rank, _)| *rank);
        match best {
            Some((_, rule)) => Decision {
                action: rule.action,
                rule: Some(rule.clone()),
            },
            None => Decision {
                action: self.default,
                rule: None,
            },
        }
    }

    /// Whether every call is allowed (the common case, checked first on
    /// the hot path).
    pub fn allows_all(&self) -> bool {
        self.default == Action::Allow && self.rules.iter().all(|r| r.action == Action::Allow)
    }

    /// The next version with `change` made, or why it cannot be.
    pub fn changed(&self, change: Change) -> Result<Intentions, String> {
        let mut next = self.clone();
        next.version = super::next_version(self.version, "intentions")?;
        match change {
            Change::Set(rule) => {
                next.rules
                    .retain(|r| (&r.source, &r.destination) != (&rule.source, &rule.destination));
                next.rules.push(rule);
            }
            Change::Remove {
                source,
                destination,
            } => {
                let before = next.rules.len();
                next.rules
                    .retain(|r| (&r.source, &r.destination) != (&source, &destination));
                if next.rules.len() == before {
                    return Err(format!("no rule {source} -> {destination}"));
                }
            }
            Change::Default(action) => next.default = action,
        }
        next.rules
            .sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
        next.validate()?;
        Ok(next)
    }

    /// Names are services, `-` (sources only) or `*`; pairs are unique
    /// and sorted; at most [`MAX_RULES`].
    pub fn validate(&self) -> Result<(), String> {
        if self.rules.len() > MAX_RULES {
            return Err(format!("{} rules; at most {MAX_RULES}", self.rules.len()));
        }
        for rule in &self.rules {
            let source_ok = rule.source == ANY
                || rule.source == crate::caller::ANONYMOUS
                || weft_gossip::keys::validate_name(&rule.source).is_ok();
            if !source_ok {
                return Err(format!(
                    "source {:?} must be a service name, - or *",
                    rule.source
                ));
            }
            let destination_ok = rule.destination == ANY
                || weft_gossip::keys::validate_name(&rule.destination).is_ok();
            if !destination_ok {
                return Err(format!(
                    "destination {:?} must be a service name or *",
                    rule.destination
                ));
            }
        }
        let sorted = self
            .rules
            .windows(2)
            .all(|w| (&w[0].source, &w[0].destination) < (&w[1].source, &w[1].destination));
        if !sorted {
            return Err("rules must be sorted and unique by (source, destination)".into());
        }
        Ok(())
    }

    /// What an operator's grant signs: the hex SHA-256 of the canonical
    /// JSON of the version, the default and the rules.
    pub fn digest(&self) -> String {
        weft_gossip::grant::digest_json(self)
    }
}

#[cfg(test)]
#[path = "intentions_tests.rs"]
mod tests;
