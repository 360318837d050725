//! `weft keys ...`: the keyring commands. Each change is granted here, by
//! the operator whose certificate and key the command is given, over the
//! keyring the node holds now; the node checks the grant and gossip
//! carries the change to every node.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use hyper::Method;
use serde_json::{json, Value};
use weft_gossip::grant::Grant;
use weft_gossip::seal::{decode_key_base64, KeyId};
use weft_runtime::tls::OperatorKey;

use crate::keyring::{self, Change};
use crate::{cli, client, NodeError};

/// How long `weft keys rotate` waits for each step to reach every member.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs one `weft keys` command against the node at `socket`.
pub async fn run(socket: &Path, cmd: cli::KeysCommand) -> Result<(), NodeError> {
    let (request, operator) = match cmd {
        cli::KeysCommand::List { json } => {
            return crate::show(socket, "/v1/keys", json, client::keys_table).await
        }
        cli::KeysCommand::Rotate { operator } => return rotate(socket, &load(&operator)?).await,
        cli::KeysCommand::Install { key_file, operator } => {
            let key = read_secret_key(key_file.as_deref())?;
            let id = decode_key_base64(&key)
                .map(|k| KeyId::of(&k))
                .map_err(|e| NodeError::Config(format!("the key: {e}")))?;
            (Request::install(key, id), operator)
        }
        cli::KeysCommand::Use { key, operator } => {
            (Request::use_key(parse_key_id(&key)?), operator)
        }
        cli::KeysCommand::Remove { key, operator } => {
            (Request::remove(parse_key_id(&key)?), operator)
        }
    };
    let operator = load(&operator)?;
    let reply = request.send(socket, &operator).await?;
    println!(
        "key {} {}, granted by operator {}; the change reaches every node by gossip (see `weft keys list`)",
        reply["id"].as_str().unwrap_or("?"),
        request.done,
        operator.name
    );
    Ok(())
}

/// The operator's certificate and key a command signs with.
pub(crate) fn load(args: &cli::OperatorArgs) -> Result<OperatorKey, NodeError> {
    OperatorKey::load(&args.operator_cert, &args.operator_key)
        .map_err(|e| NodeError::Config(e.to_string()))
}

/// One keyring change, as the node's API takes it.
struct Request {
    change: Change,
    method: Method,
    path: String,
    key: Option<String>,
    done: &'static str,
}

impl Request {
    fn install(key: String, id: KeyId) -> Request {
        Request {
            change: Change::Install(id),
            method: Method::PUT,
            path: "/v1/keys".into(),
            key: Some(key),
            done: "installed",
        }
    }

    fn use_key(id: KeyId) -> Request {
        Request {
            change: Change::Use(id),
            method: Method::PUT,
            path: "/v1/keys/primary".into(),
            key: Some(id.to_string()),
            done: "is now the primary",
        }
    }

    fn remove(id: KeyId) -> Request {
        Request {
            change: Change::Remove(id),
            method: Method::DELETE,
            path: format!("/v1/keys/{id}"),
            key: None,
            done: "removed",
        }
    }

    /// Grants the change to the keyring the node holds now and sends it.
    async fn send(&self, socket: &Path, operator: &OperatorKey) -> Result<Value, NodeError> {
        let grant = grant(socket, operator, self.change).await?;
        let mut body = json!({ "grant": grant });
        if let Some(key) = &self.key {
            body["key"] = json!(key);
        }
        let (status, reply) =
            client::call(socket, self.method.clone(), &self.path, Some(body)).await?;
        client::check(status, &reply)?;
        Ok(reply)
    }
}

/// A new key, installed on every member, made the primary everywhere, and
/// the old primary removed: the whole rotation, each step once the last
/// reached every live member (a revoked node is none).
async fn rotate(socket: &Path, operator: &OperatorKey) -> Result<(), NodeError> {
    let old = list(socket).await?["primary"]
        .as_str()
        .and_then(|id| id.parse::<KeyId>().ok())
        .ok_or_else(|| NodeError::Io("the node listed no primary key".into()))?;
    let key: [u8; 32] = rand::random();
    let id = KeyId::of(&key);
    let encoded = base64::engine::general_purpose::STANDARD.encode(key);
    Request::install(encoded, id).send(socket, operator).await?;
    println!("installed key {id}; waiting until every member holds it");
    wait_everywhere(socket, id, "installed_on").await?;
    Request::use_key(id).send(socket, operator).await?;
    println!("key {id} is the primary; waiting until every member seals with it");
    wait_everywhere(socket, id, "primary_on").await?;
    Request::remove(old).send(socket, operator).await?;
    println!(
        "rotated: key {id} is the primary everywhere and key {old} is removed, granted by operator {}",
        operator.name
    );
    Ok(())
}

async fn list(socket: &Path) -> Result<Value, NodeError> {
    let (status, listed) = client::call(socket, Method::GET, "/v1/keys", None).await?;
    client::check(status, &listed)?;
    Ok(listed)
}

/// Polls until key `id`'s `count` (`installed_on`, `primary_on`) is every
/// live member.
async fn wait_everywhere(socket: &Path, id: KeyId, count: &str) -> Result<(), NodeError> {
    let deadline = tokio::time::Instant::now() + STEP_TIMEOUT;
    loop {
        let listed = list(socket).await?;
        let members = listed["members"].as_u64().unwrap_or(0);
        let done = listed["keys"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|k| k["id"] == id.to_string().as_str())
            .is_some_and(|k| k[count].as_u64() == Some(members));
        if done {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(NodeError::Conflict(format!(
                "key {id} did not reach every member within {STEP_TIMEOUT:?} ({count}); see `weft keys list`"
            )));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The operator's grant of `change` to the keyring the node now holds (its
/// version, primary and keys, as `GET /v1/keys` lists them).
async fn grant(socket: &Path, operator: &OperatorKey, change: Change) -> Result<Grant, NodeError> {
    let listed = list(socket).await?;
    let id = |v: &Value| v.as_str().and_then(|s| s.parse().ok());
    let primary = id(&listed["primary"])
        .ok_or_else(|| NodeError::Io("the node listed no primary key".into()))?;
    let ids: Vec<KeyId> = listed["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["installed_here"] == true)
        .filter_map(|k| id(&k["id"]))
        .collect();
    let version = listed["version"]
        .as_u64()
        .and_then(|v| v.checked_add(1))
        .ok_or_else(|| NodeError::Io("the node listed no keyring version to follow".into()))?;
    let (primary, ids) = change.apply(primary, &ids);
    Ok(operator.grant(keyring::OBJECT, version, &keyring::digest(primary, &ids)))
}

/// A gossip key from `file`, or from standard input.
fn read_secret_key(file: Option<&Path>) -> Result<String, NodeError> {
    use std::io::Read as _;
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("--key-file {}: {e}", path.display())))?,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .take(4096)
                .read_to_string(&mut text)
                .map_err(|e| {
                    NodeError::Config(format!("reading the key from standard input: {e}"))
                })?;
            text
        }
    };
    Ok(text.trim().to_string())
}

/// A key id, or the id of a base64 key.
fn parse_key_id(text: &str) -> Result<KeyId, NodeError> {
    text.parse()
        .or_else(|_| decode_key_base64(text).map(|k| KeyId::of(&k)))
        .map_err(|_| {
            NodeError::Config(format!(
                "{:?} is neither a key id (8 hex digits, from `weft keys list`) nor a base64 key",
                text.chars().take(16).collect::<String>()
            ))
        })
}
