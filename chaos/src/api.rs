//! A small client for a node's local socket API, with a deadline on every
//! call (a paused node accepts connections but never answers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use hyper::Method;
use serde_json::Value;

/// One request to a node's socket API, given up after `within`.
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
    within: Duration,
) -> Result<(u16, Value), String> {
    tokio::time::timeout(within, weft_client::request(socket, method, path, body))
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
        .map_err(|e| e.to_string())
}

/// Member name -> state, as one node sees it.
pub fn members(body: &Value) -> Option<BTreeMap<String, String>> {
    Some(
        body["members"]
            .as_array()?
            .iter()
            .filter_map(|m| {
                Some((
                    m["name"].as_str()?.to_string(),
                    m["state"].as_str()?.to_string(),
                ))
            })
            .collect(),
    )
}

/// Service -> instance ids, as one node sees it.
pub fn catalog(body: &Value) -> Option<BTreeMap<String, BTreeSet<String>>> {
    let services = body["services"].as_object()?;
    Some(
        services
            .iter()
            .map(|(name, list)| {
                let ids = list
                    .as_array()
                    .map(|l| {
                        l.iter()
                            .filter_map(|i| i["id"].as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                (name.clone(), ids)
            })
            .filter(|(_, ids): &(String, BTreeSet<String>)| !ids.is_empty())
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_members_and_catalog_and_tolerates_junk() {
        let m = serde_json::json!({"members":[{"name":"n1","state":"alive"},{"name":2}]});
        assert_eq!(members(&m).unwrap().len(), 1);
        let c = serde_json::json!({"services":{"web":[{"id":"a"},{"id":"b"}],"gone":[]}});
        let c = catalog(&c).unwrap();
        assert_eq!(c["web"].len(), 2);
        assert!(!c.contains_key("gone"));
        assert!(members(&Value::Null).is_none());
        assert!(catalog(&serde_json::json!({"services": 3})).is_none());
    }
}
