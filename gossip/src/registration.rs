//! The registration a service sends (`PUT /v1/services`), validated field
//! by field into a [`ServiceRecord`]: a bad request names the first bad
//! field, and nothing a client sends panics the node (fuzzed in
//! `fuzz/fuzz_targets/api_registration.rs`).

use serde_json::Value;

use crate::keys::{validate_id, validate_name};
use crate::records::{Check, Concurrency, Protocol, RetryPolicy, ServiceRecord};

/// Validates a registration request, naming the first bad field.
pub fn parse_registration(body: &Value, node: &str) -> Result<ServiceRecord, String> {
    let obj = body.as_object().ok_or("body must be a JSON object")?;
    const KNOWN: [&str; 11] = [
        "name",
        "port",
        "id",
        "protocol",
        "check",
        "tags",
        "timeout_ms",
        "retry",
        "retry_non_idempotent",
        "hedge",
        "concurrency",
    ];
    if let Some(unknown) = obj.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(format!("unknown field {unknown:?}"));
    }
    let name = obj
        .get("name")
        .ok_or("field \"name\" is required")?
        .as_str()
        .ok_or("field \"name\" must be a string")?;
    validate_name(name)
        .map_err(|_| "field \"name\" must match [a-z0-9][a-z0-9-]{0,62}".to_string())?;
    let port = obj
        .get("port")
        .ok_or("field \"port\" is required")?
        .as_u64()
        .ok_or("field \"port\" must be an integer between 1 and 65535")?;
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or("field \"port\" must be an integer between 1 and 65535")?;
    let id = match obj.get("id") {
        None | Some(Value::Null) => format!("{name}-{node}-{port}"),
        Some(Value::String(id)) => {
            validate_id(id).map_err(|_| {
                "field \"id\" must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}".to_string()
            })?;
            id.clone()
        }
        Some(_) => return Err("field \"id\" must be a string".into()),
    };
    let protocol = match obj.get("protocol") {
        None | Some(Value::Null) => Protocol::Http,
        Some(Value::String(p)) if p == "http" => Protocol::Http,
        Some(Value::String(p)) if p == "tcp" => Protocol::Tcp,
        Some(_) => return Err("field \"protocol\" must be \"http\" or \"tcp\"".into()),
    };
    let check = match obj.get("check") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_check(v)?),
    };
    let tags = match obj.get("tags") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => {
            let mut tags = Vec::with_capacity(items.len());
            for item in items {
                let tag = item
                    .as_str()
                    .filter(|t| !t.is_empty() && t.len() <= 64 && t.is_ascii())
                    .ok_or("field \"tags\" must be ASCII strings of 1 to 64 characters")?;
                tags.push(tag.to_string());
            }
            if tags.len() > 32 {
                return Err("field \"tags\" holds at most 32 tags".into());
            }
            tags
        }
        Some(_) => return Err("field \"tags\" must be an array of strings".into()),
    };
    let timeout_ms = match obj.get("timeout_ms") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|ms| (1..=3_600_000).contains(ms))
                .ok_or("field \"timeout_ms\" must be an integer between 1 and 3600000")?,
        ),
    };
    let retry = match obj.get("retry") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if RetryPolicy::parse(p).is_some() => Some(p.clone()),
        Some(_) => {
            return Err("field \"retry\" must be \"learned\", \"exponential\" or \"none\"".into())
        }
    };
    let retry_non_idempotent = match obj.get("retry_non_idempotent") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("field \"retry_non_idempotent\" must be true or false".into()),
    };
    let hedge = match obj.get("hedge") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("field \"hedge\" must be true or false".into()),
    };
    let concurrency = match obj.get("concurrency") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "adaptive" => Some(Concurrency::Adaptive),
        Some(_) => return Err("field \"concurrency\" must be \"adaptive\"".into()),
    };
    Ok(ServiceRecord {
        name: name.to_string(),
        id,
        port,
        protocol,
        check,
        tags,
        timeout_ms,
        retry,
        retry_non_idempotent,
        hedge,
        concurrency,
    })
}

/// A record another node gossips under `svc/<id>`, held to the rules of a
/// local registration (names, ids, ports, checks, tags, timeouts), so
/// nothing reaches the catalog that this node would refuse from its own
/// clients; its id must be the key's.
pub fn parse_gossiped(value: &str, id: &str) -> Option<ServiceRecord> {
    let body: Value = serde_json::from_str(value).ok()?;
    body.get("id")?;
    let record = parse_registration(&body, "-").ok()?;
    (record.id == id).then_some(record)
}

fn parse_check(v: &Value) -> Result<Check, String> {
    let obj = v.as_object().ok_or("field \"check\" must be an object")?;
    let kinds: Vec<(&String, &Value)> = obj
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "interval_ms" | "timeout_ms"))
        .collect();
    if kinds.len() != 1 {
        return Err(
            "field \"check\" must hold exactly one of \"http\", \"tcp\", \"ttl_ms\"".into(),
        );
    }
    let period = |field: &str| -> Result<Option<u64>, String> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|ms| (100..=3_600_000).contains(ms))
                .map(Some)
                .ok_or(format!(
                    "field \"check.{field}\" must be an integer between 100 and 3600000"
                )),
        }
    };
    let mut check = Check {
        http: None,
        tcp: None,
        ttl_ms: None,
        interval_ms: period("interval_ms")?,
        timeout_ms: period("timeout_ms")?,
    };
    match kinds.into_iter().next() {
        Some((k, Value::String(path))) if k == "http" => {
            if !path.starts_with('/') || !path.is_ascii() || path.len() > 1024 {
                return Err("field \"check.http\" must be an ASCII path starting with /".into());
            }
            check.http = Some(path.clone());
        }
        Some((k, Value::Bool(true))) if k == "tcp" => check.tcp = Some(true),
        Some((k, n)) if k == "ttl_ms" => {
            let ms = n
                .as_u64()
                .filter(|ms| (100..=86_400_000).contains(ms))
                .ok_or("field \"check.ttl_ms\" must be an integer between 100 and 86400000")?;
            check.ttl_ms = Some(ms);
        }
        Some((k, _)) => {
            return Err(format!(
                "field \"check.{k}\" is not valid; use {{\"http\":\"/path\"}}, {{\"tcp\":true}} or {{\"ttl_ms\":N}}"
            ))
        }
        None => unreachable!("length checked above"),
    }
    Ok(check)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(v: Value) -> Result<ServiceRecord, String> {
        parse_registration(&v, "n1")
    }

    /// What a node gossips reads back as it was; what a local client could
    /// not register is refused from a peer too.
    #[test]
    fn a_gossiped_record_is_held_to_the_registration_rules() {
        let r = parse(
            json!({"name": "db", "port": 5432, "id": "db.1", "protocol": "tcp",
            "check": {"tcp": true, "interval_ms": 500}, "tags": ["primary"], "timeout_ms": 900,
            "retry": "exponential", "hedge": true}),
        )
        .unwrap();
        let gossiped = serde_json::to_string(&r).unwrap();
        assert_eq!(parse_gossiped(&gossiped, "db.1"), Some(r.clone()));
        assert_eq!(parse_gossiped(&gossiped, "db.2"), None, "another key's id");
        let mut bad = r;
        bad.port = 0;
        assert_eq!(
            parse_gossiped(&serde_json::to_string(&bad).unwrap(), "db.1"),
            None
        );
        bad.port = 1;
        bad.name = "Not A Name".into();
        assert_eq!(
            parse_gossiped(&serde_json::to_string(&bad).unwrap(), "db.1"),
            None
        );
        bad.name = "db".into();
        bad.tags = vec!["t".into(); 33];
        assert_eq!(
            parse_gossiped(&serde_json::to_string(&bad).unwrap(), "db.1"),
            None
        );
        assert_eq!(
            parse_gossiped(r#"{"name":"db","port":1}"#, "db-n1-1"),
            None,
            "no id"
        );
        assert_eq!(parse_gossiped("not json", "db.1"), None);
    }

    #[test]
    fn minimal_registration_gets_defaults() {
        let r = parse(json!({"name": "web", "port": 8080})).unwrap();
        assert_eq!(r.id, "web-n1-8080");
        assert_eq!(r.protocol, Protocol::Http);
        assert!(r.check.is_none());
    }

    #[test]
    fn full_registration() {
        let r = parse(
            json!({"name": "db", "port": 5432, "id": "db.1", "protocol": "tcp",
            "check": {"tcp": true}, "tags": ["primary"]}),
        )
        .unwrap();
        assert_eq!(r.id, "db.1");
        assert_eq!(r.protocol, Protocol::Tcp);
        assert_eq!(r.check.unwrap().tcp, Some(true));
        assert_eq!(r.tags, vec!["primary".to_string()]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!([]), "object"),
            (json!({"port": 1}), "\"name\""),
            (json!({"name": 3, "port": 1}), "\"name\""),
            (json!({"name": "Web", "port": 1}), "\"name\""),
            (json!({"name": "web"}), "\"port\""),
            (json!({"name": "web", "port": 0}), "\"port\""),
            (json!({"name": "web", "port": 65536}), "\"port\""),
            (json!({"name": "web", "port": -1}), "\"port\""),
            (json!({"name": "web", "port": "80"}), "\"port\""),
            (json!({"name": "web", "port": 80, "id": "a b"}), "\"id\""),
            (
                json!({"name": "web", "port": 80, "protocol": "udp"}),
                "\"protocol\"",
            ),
            (
                json!({"name": "web", "port": 80, "check": {"http": "x"}}),
                "check.http",
            ),
            (
                json!({"name": "web", "port": 80, "check": {"ttl_ms": 1}}),
                "check.ttl_ms",
            ),
            (
                json!({"name": "web", "port": 80, "check": {"grpc": 1}}),
                "check.grpc",
            ),
            (json!({"name": "web", "port": 80, "tags": "x"}), "\"tags\""),
            (json!({"name": "web", "port": 80, "extra": 1}), "\"extra\""),
        ];
        for (body, needle) in cases {
            let err = parse(body.clone()).unwrap_err();
            assert!(err.contains(needle), "{body} -> {err}");
        }
    }
}
