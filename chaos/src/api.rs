//! A small client for a node's local socket API, with a deadline on every
//! call (a paused node accepts connections but never answers).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// One HTTP/1.1 request over a Unix socket; status and JSON (Null if not JSON).
pub async fn request(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<&Value>,
    within: Duration,
) -> Result<(u16, Value), String> {
    let call = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("connect {}: {e}", socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let bytes = body
            .map(|b| serde_json::to_vec(b).unwrap_or_default())
            .unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "weft")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    };
    tokio::time::timeout(within, call)
        .await
        .map_err(|_| format!("no answer within {within:?}"))?
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
