//! Routes: weighted splits of a service's traffic by instance tag (`weft
//! route payments v1=90 v2=10`), the same on every node of the cluster.
//!
//! Each request picks a tag by weight among the split's tags that have an
//! instance able to take it, then an instance of that tag as usual. A tag
//! with no such instance gets no share: its weight goes to the others in
//! proportion, and comes back with it. When none of the split's tags has
//! one, any instance of the service will do, as without a route.
//!
//! Pure logic: what a route is and which tag a request gets. Who may change
//! routes (an operator's grant), how they spread and where they are kept is
//! the node's business.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Most services with a route: the routes and their grant travel in one
/// gossip value.
pub const MAX_ROUTES: usize = 16;

/// Most tags one service's split names.
pub const MAX_TAGS: usize = 4;

/// The largest weight (weights are relative: `v1=9 v2=1` is `v1=90
/// v2=10`).
pub const MAX_WEIGHT: u32 = 10_000;

/// One tag's share of a split.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Split {
    /// Instances carrying this tag.
    pub tag: String,
    /// Its weight, relative to the others of the split.
    pub weight: u32,
}

/// The cluster's routes at one version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Routes {
    /// 0 before any operator change; each change adds one.
    pub version: u64,
    /// Per service, its split (sorted by tag).
    pub splits: BTreeMap<String, Vec<Split>>,
}

impl Routes {
    /// The split of `service`, if it has one.
    pub fn split(&self, service: &str) -> Option<&[Split]> {
        self.splits.get(service).map(Vec::as_slice)
    }

    /// The next version: `service` split as `splits` (`None` or empty:
    /// its route removed).
    pub fn with(&self, service: &str, splits: Option<Vec<Split>>) -> Result<Routes, String> {
        let mut next = self.clone();
        next.version = super::next_version(self.version, "routes")?;
        match splits.filter(|s| !s.is_empty()) {
            Some(mut splits) => {
                splits.sort_by(|a, b| a.tag.cmp(&b.tag));
                next.splits.insert(service.to_string(), splits);
            }
            None => {
                if next.splits.remove(service).is_none() {
                    return Err(format!("{service} has no route"));
                }
            }
        }
        next.validate()?;
        Ok(next)
    }

    /// Services are names, tags are 1-63 printable ASCII characters without
    /// `=`, unique and sorted per split; weights are at most
    /// [`MAX_WEIGHT`] and not all 0; at most [`MAX_ROUTES`] services and
    /// [`MAX_TAGS`] tags each.
    pub fn validate(&self) -> Result<(), String> {
        if self.splits.len() > MAX_ROUTES {
            return Err(format!(
                "{} routes; at most {MAX_ROUTES}",
                self.splits.len()
            ));
        }
        for (service, splits) in &self.splits {
            weft_gossip::keys::validate_name(service)
                .map_err(|_| format!("{service:?} is not a service name"))?;
            if splits.is_empty() || splits.len() > MAX_TAGS {
                return Err(format!("{service}: 1 to {MAX_TAGS} tags"));
            }
            for split in splits {
                let tag_ok = (1..=63).contains(&split.tag.len())
                    && split.tag.bytes().all(|b| b.is_ascii_graphic() && b != b'=');
                if !tag_ok {
                    return Err(format!("{service}: tag {:?} is not a tag", split.tag));
                }
                if split.weight > MAX_WEIGHT {
                    return Err(format!(
                        "{service}: weight {} of {} is over {MAX_WEIGHT}",
                        split.weight, split.tag
                    ));
                }
            }
            if !splits.windows(2).all(|w| w[0].tag < w[1].tag) {
                return Err(format!("{service}: tags must be sorted and unique"));
            }
            if splits.iter().all(|s| s.weight == 0) {
                return Err(format!("{service}: every weight is 0"));
            }
        }
        Ok(())
    }

    /// What an operator's grant signs: the hex SHA-256 of the canonical
    /// JSON of the version and the splits.
    pub fn digest(&self) -> String {
        weft_gossip::grant::digest_json(self)
    }
}

/// The tag a request gets: by weight among the tags of `splits` for which
/// `available` holds, with `roll` uniform in [0, 1). `None` when no tag
/// with a weight is available.
pub fn choose_tag(splits: &[Split], available: impl Fn(&str) -> bool, roll: f64) -> Option<&str> {
    let open = || splits.iter().filter(|s| s.weight > 0 && available(&s.tag));
    let total: u64 = open().map(|s| u64::from(s.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = (roll.clamp(0.0, 1.0) * total as f64) as u64;
    for split in open() {
        let weight = u64::from(split.weight);
        if point < weight {
            return Some(&split.tag);
        }
        point -= weight;
    }
    // `roll` of 1.0 (or rounding) lands past the end: the last open tag.
    open().last().map(|s| s.tag.as_str())
}

/// Parses `TAG=WEIGHT` arguments (`v1=90 v2=10`).
pub fn parse_splits(args: &[String]) -> Result<Vec<Split>, String> {
    args.iter()
        .map(|arg| {
            let (tag, weight) = arg
                .split_once('=')
                .ok_or_else(|| format!("{arg:?}: give TAG=WEIGHT, e.g. v2=10"))?;
            let weight = weight
                .parse()
                .map_err(|_| format!("{arg:?}: the weight must be a whole number"))?;
            Ok(Split {
                tag: tag.to_string(),
                weight,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn splits(pairs: &[(&str, u32)]) -> Vec<Split> {
        pairs
            .iter()
            .map(|(tag, weight)| Split {
                tag: (*tag).into(),
                weight: *weight,
            })
            .collect()
    }

    #[test]
    fn shares_follow_the_weights() {
        let s = splits(&[("v1", 90), ("v2", 10)]);
        let n = 10_000;
        let v2 = (0..n)
            .filter(|i| choose_tag(&s, |_| true, *i as f64 / n as f64) == Some("v2"))
            .count();
        assert_eq!(v2, 1_000);
        assert_eq!(choose_tag(&s, |_| true, 0.0), Some("v1"));
        assert_eq!(choose_tag(&s, |_| true, 1.0), Some("v2"));
    }

    #[test]
    fn an_unavailable_tag_gives_its_share_to_the_others() {
        let s = splits(&[("a", 50), ("b", 25), ("c", 25)]);
        let without_b = |t: &str| t != "b";
        let n = 1_000;
        let c = (0..n)
            .filter(|i| choose_tag(&s, without_b, *i as f64 / n as f64) == Some("c"))
            .count();
        assert_eq!(c, 333, "c's 25 of the 75 left");
        assert_eq!(choose_tag(&s, |_| false, 0.5), None);
        assert_eq!(
            choose_tag(&splits(&[("a", 0), ("b", 1)]), |t| t == "a", 0.5),
            None
        );
    }

    #[test]
    fn changes_are_versioned_and_checked() {
        let routes = Routes::default()
            .with("api", Some(splits(&[("v2", 10), ("v1", 90)])))
            .unwrap();
        assert_eq!(routes.version, 1);
        assert_eq!(routes.split("api").unwrap()[0].tag, "v1", "sorted by tag");
        let cleared = routes.with("api", None).unwrap();
        assert_eq!((cleared.version, cleared.split("api")), (2, None));
        assert!(cleared.with("api", None).is_err(), "no route to remove");
        for bad in [
            splits(&[("v1", 0)]),
            splits(&[("v1", MAX_WEIGHT + 1)]),
            splits(&[("v=1", 1)]),
            splits(&[("v1", 1), ("v1", 2)]),
        ] {
            assert!(
                Routes::default().with("api", Some(bad.clone())).is_err(),
                "{bad:?}"
            );
        }
        assert!(Routes::default()
            .with("Api", Some(splits(&[("v1", 1)])))
            .is_err());
        assert_ne!(routes.digest(), cleared.digest());
    }

    #[test]
    fn arguments_parse() {
        let args = vec!["v1=90".to_string(), "v2=10".to_string()];
        assert_eq!(
            parse_splits(&args).unwrap(),
            splits(&[("v1", 90), ("v2", 10)])
        );
        assert!(parse_splits(&["v1".to_string()]).is_err());
        assert!(parse_splits(&["v1=x".to_string()]).is_err());
    }
}
