//! `weft tap`: the node's `/v1/tap` stream, printed a line per request as
//! it comes, until Ctrl-C or the node goes.

use std::path::Path;

use bytes::{Buf, BytesMut};
use http_body_util::BodyExt;
use serde_json::Value;
use weft_runtime::dataplane::tap::{Filter, Status};

use crate::NodeError;

/// Longest line accepted from the node.
const MAX_LINE: usize = 64 * 1024;

/// Streams the cluster's requests that pass the filter.
pub async fn run(
    socket: &Path,
    service: Option<String>,
    caller: Option<String>,
    status: Option<String>,
    json: bool,
) -> Result<(), NodeError> {
    let status = match status {
        Some(s) => Some(Status::parse(&s).ok_or_else(|| {
            NodeError::Client(format!(
                "--status {s:?}: give a class such as 5xx or a code such as 503"
            ))
        })?),
        None => None,
    };
    let filter = Filter {
        service,
        caller,
        status,
    };
    let path = format!("/v1/tap?{}", filter.to_query());
    let (code, mut body) = weft_client::stream(socket, &path)
        .await
        .map_err(|e| NodeError::Client(format!("{e}; is `weft node` running?")))?;
    let mut pending = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| NodeError::Client(format!("the tap ended: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let line = pending.split_to(end + 1);
            let value: Value = serde_json::from_slice(&line[..end]).unwrap_or(Value::Null);
            if !(200..300).contains(&code) {
                let why = value["error"]
                    .as_str()
                    .unwrap_or("the node refused the tap");
                return Err(NodeError::Client(why.to_string()));
            }
            show(&value, json);
        }
        if pending.len() > MAX_LINE {
            pending.advance(pending.len());
        }
    }
    Err(NodeError::Client("the node closed the tap".into()))
}

/// One line: JSON as it came, or for people.
fn show(line: &Value, json: bool) {
    if json {
        println!("{line}");
        return;
    }
    let node = line["node"].as_str().unwrap_or("?");
    if line["listening"] == true {
        eprintln!("# tapping {node}");
    } else if let Some(error) = line["error"].as_str() {
        eprintln!("# cannot tap {node}: {error}");
    } else if let Some(n) = line["dropped"].as_u64() {
        eprintln!("# {node}: {n} lines dropped (this tap fell behind)");
    } else {
        println!("{}", request_line(line));
    }
}

/// `TIME CALLER -> SERVICE NODE/INSTANCE METHOD PATH STATUS LATENCY ATTEMPTS`.
fn request_line(line: &Value) -> String {
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let instance = match (line["node"].as_str(), line["instance"].as_str()) {
        (Some(node), Some(id)) => format!("{node}/{id}"),
        _ => "-".to_string(),
    };
    let mut out = format!(
        "{} {} -> {} {} {} {} {} {:.1}ms attempts={}",
        s(&line["time"]),
        s(&line["caller"]),
        s(&line["service"]),
        instance,
        s(&line["method"]),
        s(&line["path"]),
        line["status"],
        line["duration_ms"].as_f64().unwrap_or(0.0),
        line["attempts"],
    );
    if let Some(error) = line["weft_error"].as_str() {
        out.push_str(&format!(" weft-error={error}"));
    }
    out
}
