//! The CLI clients: talk to the local node over its Unix socket and print
//! aligned tables (or the raw JSON with `--json`).

use std::path::{Path, PathBuf};

use hyper::Method;
use serde_json::Value;
use weft_client::ClientError;

use crate::NodeError;

/// Finds the socket: `--socket`/`WEFT_SOCKET`, else the one node under `./weft-data`.
pub fn resolve_socket(flag: Option<&Path>) -> Result<PathBuf, NodeError> {
    if let Some(p) = flag {
        return Ok(p.to_path_buf());
    }
    let found: Vec<PathBuf> = std::fs::read_dir("./weft-data")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("weft.sock"))
        .filter(|p| p.exists())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(NodeError::Client(
            "no node socket found under ./weft-data; pass --socket PATH or set WEFT_SOCKET".into(),
        )),
        many => Err(NodeError::Client(format!(
            "several node sockets under ./weft-data ({}); pass --socket PATH or set WEFT_SOCKET",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// One request to the node; returns (status, JSON body).
pub async fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(u16, Value), NodeError> {
    weft_client::request(socket, method, path, body.as_ref())
        .await
        .map_err(|e| match e {
            ClientError::Unreachable { .. } => {
                NodeError::Client(format!("{e}; is `weft node` running?"))
            }
            ClientError::Exchange { .. } => NodeError::Client(e.to_string()),
        })
}

/// Turns an error reply into a one-line error.
pub fn check(status: u16, body: &Value) -> Result<(), NodeError> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    let msg = body
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("no error message");
    Err(NodeError::Refused(format!(
        "the node refused: {msg} (HTTP {status})"
    )))
}

/// Aligned columns, like `kubectl get` or `linkerd viz stat`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(text.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.2}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// `weft services` as a table.
pub fn services_table(body: &Value) -> String {
    let mut rows = Vec::new();
    if let Some(services) = body.get("services").and_then(Value::as_object) {
        for (name, list) in services {
            for i in list.as_array().into_iter().flatten() {
                rows.push(vec![
                    name.clone(),
                    s(&i["id"]),
                    s(&i["node"]),
                    s(&i["port"]),
                    s(&i["protocol"]),
                    s(&i["health"]),
                ]);
            }
        }
    }
    table(
        &["SERVICE", "ID", "NODE", "PORT", "PROTOCOL", "HEALTH"],
        &rows,
    )
}

/// `weft intentions list` as a table.
pub fn intentions_table(body: &Value) -> String {
    let intentions = &body["intentions"];
    let mut out = format!(
        "version {}, default {}\n\n",
        s(&intentions["version"]),
        s(&intentions["default"])
    );
    let rows: Vec<Vec<String>> = intentions["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| vec![s(&r["source"]), s(&r["destination"]), s(&r["action"])])
        .collect();
    out.push_str(&table(&["SOURCE", "DESTINATION", "ACTION"], &rows));
    out
}

/// `weft route` (no service) as a table: one row per service and tag.
pub fn routes_table(body: &Value) -> String {
    let routes = &body["routes"];
    let mut out = format!("version {}\n\n", s(&routes["version"]));
    let rows: Vec<Vec<String>> = routes["splits"]
        .as_object()
        .into_iter()
        .flatten()
        .flat_map(|(service, splits)| {
            splits
                .as_array()
                .into_iter()
                .flatten()
                .map(move |split| vec![service.clone(), s(&split["tag"]), s(&split["weight"])])
        })
        .collect();
    out.push_str(&table(&["SERVICE", "TAG", "WEIGHT"], &rows));
    out
}

/// One row per limit: its rate, then this node's demand and share.
pub fn limits_table(limits: &Value, health: &Value) -> String {
    let here = |limit: &Value, field: &str| {
        let same = |h: &&Value| h["service"] == limit["service"] && h["caller"] == limit["caller"];
        health["limits"]
            .as_array()
            .and_then(|all| all.iter().find(same))
            .map_or("-".into(), |h| format!("{}/s", s(&h[field])))
    };
    let mut out = format!("version {}\n\n", s(&limits["limits"]["version"]));
    let rows: Vec<Vec<String>> = limits["limits"]["limits"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|limit| {
            let caller = limit["caller"].as_str().unwrap_or("*").to_string();
            vec![
                s(&limit["service"]),
                caller,
                s(&limit["rate"]),
                here(limit, "demand"),
                here(limit, "share"),
                here(limit, "cluster_demand"),
            ]
        })
        .collect();
    let headers = [
        "SERVICE",
        "CALLER",
        "RATE",
        "DEMAND HERE",
        "SHARE HERE",
        "CLUSTER DEMAND",
    ];
    out.push_str(&table(&headers, &rows));
    out
}

/// `weft rollout status` as a table: one line per rollout, and why it
/// stands where it does.
pub fn rollouts_table(rollouts: &Value) -> String {
    let tag = |t: &Value| {
        let n = t["n"].as_u64().unwrap_or(0);
        let errors = t["errors"].as_u64().unwrap_or(0) as f64;
        let p99 = t["p99_us"].as_u64().unwrap_or(0) as f64 / 1000.0;
        match n {
            0 => "-".to_string(),
            n => format!(
                "{n} req, {:.1}% err, p99 {p99:.1} ms",
                errors * 100.0 / n as f64
            ),
        }
    };
    let all = rollouts.as_array().map(Vec::as_slice).unwrap_or_default();
    if all.is_empty() {
        return "no rollouts\n".into();
    }
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|r| {
            vec![
                s(&r["service"]),
                format!("{} -> {}", s(&r["from"]), s(&r["to"])),
                format!("{}/{}", s(&r["step"]), s(&r["steps"])),
                format!("{}%", s(&r["weight"])),
                s(&r["phase"]),
                tag(&r["canary"]),
                tag(&r["stable"]),
            ]
        })
        .collect();
    let headers = [
        "SERVICE",
        "TAGS",
        "STEP",
        "CANARY",
        "PHASE",
        "CANARY STATS",
        "STABLE STATS",
    ];
    let mut out = table(&headers, &rows);
    for r in all {
        out.push_str(&format!("\n{}: {}", s(&r["service"]), s(&r["why"])));
    }
    out.push('\n');
    out
}

/// `weft edges` as a table.
pub fn edges_table(body: &Value) -> String {
    let pct = |v: &Value| match v.as_f64() {
        Some(f) => format!("{:.2}%", f * 100.0),
        None => "-".into(),
    };
    let rows: Vec<Vec<String>> = body
        .get("edges")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["caller"]),
                s(&e["service"]),
                s(&e["rps"]),
                pct(&e["success_rate"]),
                pct(&e["effective_success_rate"]),
                s(&e["p50_ms"]),
                s(&e["p99_ms"]),
                s(&e["retries"]),
            ]
        })
        .collect();
    table(
        &[
            "CALLER",
            "SERVICE",
            "RPS",
            "SUCCESS",
            "EFFECTIVE",
            "P50 MS",
            "P99 MS",
            "RETRIES",
        ],
        &rows,
    )
}

/// `weft members` as a table; with a ZONE column when members are in
/// zones (a bridge's zone is marked `(bridge)`).
pub fn members_table(body: &Value) -> String {
    let members: &[Value] = body
        .get("members")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    let zoned = members.iter().any(|m| m.get("zone").is_some());
    let rows: Vec<Vec<String>> = members
        .iter()
        .map(|m| {
            let mut row = vec![
                s(&m["name"]),
                s(&m["state"]),
                s(&m["gossip_addr"]),
                s(&m["tunnel_addr"]),
                s(&m["last_heard_ms"]),
            ];
            if zoned {
                let bridge = if m["bridge"] == true { " (bridge)" } else { "" };
                row.push(format!("{}{bridge}", s(&m["zone"])));
            }
            row
        })
        .collect();
    let mut headers = vec!["NAME", "STATE", "GOSSIP", "TUNNEL", "LAST HEARD (ms)"];
    if zoned {
        headers.push("ZONE");
    }
    table(&headers, &rows)
}

/// `weft keys list`: a key per row, with how many live members hold it
/// (`INSTALLED 3/3`) and seal with it.
pub fn keys_table(body: &Value) -> String {
    let members = body["members"].as_u64().unwrap_or(0);
    let rows: Vec<Vec<String>> = body
        .get("keys")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|k| {
            let here = match (k["primary_here"].as_bool(), k["installed_here"].as_bool()) {
                (Some(true), _) => "primary",
                (_, Some(true)) => "installed",
                _ => "-",
            };
            vec![
                s(&k["id"]),
                here.to_string(),
                format!("{}/{members}", s(&k["installed_on"])),
                format!("{}/{members}", s(&k["primary_on"])),
            ]
        })
        .collect();
    table(&["KEY", "THIS NODE", "INSTALLED", "PRIMARY"], &rows)
}

/// The learned retry delay and where it comes from, e.g. `182 (40
/// outages, 3 nodes)`; `-` until an outage was seen.
fn learned_delay(v: &Value) -> String {
    match v["ms"].as_f64() {
        Some(ms) => format!(
            "{ms:.0} ({} outages, {} nodes)",
            s(&v["samples"]),
            s(&v["nodes"])
        ),
        None => "-".into(),
    }
}

/// `weft health` as two tables: members, then services.
pub fn health_table(body: &Value) -> String {
    let mut out = format!("node {}\n\n", s(&body["node"]));
    out.push_str(&members_table(body));
    out.push('\n');
    let pct = |v: &Value| match v.as_f64() {
        Some(f) => format!("{:.2}%", f * 100.0),
        None => "-".into(),
    };
    let rows: Vec<Vec<String>> = body
        .get("services")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .map(|(name, v)| {
            let mut healthy = format!("{}/{}", s(&v["healthy"]), s(&v["total"]));
            if v["panic"] == Value::Bool(true) {
                healthy.push_str(" PANIC");
            }
            vec![
                name.clone(),
                healthy,
                pct(&v["success_rate"]),
                pct(&v["local"]["effective_success_rate"]),
                s(&v["rps"]),
                s(&v["p50_ms"]),
                s(&v["p99_ms"]),
                learned_delay(&v["learned"]["retry_delay"]),
                format!(
                    "{} {}",
                    s(&v["learned"]["timeout"]["ms"]),
                    s(&v["learned"]["timeout"]["source"])
                ),
                s(&v["retries"]),
                pct(&v["retry_budget_used"]),
            ]
        })
        .collect();
    out.push_str(&table(
        &[
            "SERVICE",
            "HEALTHY",
            "SUCCESS",
            "EFFECTIVE",
            "RPS",
            "P50 (ms)",
            "P99 (ms)",
            "RETRY DELAY (ms, from)",
            "TIMEOUT (ms)",
            "RETRIES",
            "BUDGET USED",
        ],
        &rows,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "LONG HEADER"],
            &[
                vec!["xxxx".into(), "1".into()],
                vec!["y".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A     LONG HEADER\nxxxx  1\ny     22\n");
    }

    #[test]
    fn services_render() {
        let body = json!({"services": {"web": [{"id": "w1", "node": "n1", "port": 80,
            "protocol": "http", "health": "passing"}]}});
        let t = services_table(&body);
        assert!(
            t.contains("web      w1  n1    80    http      passing"),
            "{t}"
        );
    }
}
