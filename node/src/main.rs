//! The `weft` binary: the node and its command-line clients.
//!
//! # Layout
//!
//! - `cli`: clap definitions of every command and flag.
//! - `config`: flags over `WEFT_*` over TOML over defaults, validated.
//! - `init`: `weft init` (cluster CA and gossip key).
//! - `node`: `weft node`, wiring gossip, actors and the local API; signals.
//! - `logging`: text or JSON logs with a level SIGHUP can change.
//! - `registry`: local registrations, persisted and announced.
//! - `store`: atomically written JSON state files.
//! - `upstreams`: TCP upstreams, persisted and served by the Listener.
//! - `api`: the JSON API on the local socket and the admin address.
//! - `client`: the CLI clients and their tables.
//! - `demo`: `weft demo`, a whole mesh on this machine.
//! - `dashboard.html`: the admin page, built into the binary.

// jemalloc, as linkerd2-proxy and ztunnel use: a proxy allocates per
// request from many threads, and glibc's malloc cost 14 % of a node's CPU
// under load.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod api;
mod cli;
mod client;
mod config;
mod demo;
mod init;
mod keyring;
mod logging;
mod node;
mod registry;
mod store;
mod upstreams;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use hyper::Method;
use serde_json::json;

use cli::{Cli, Command};
use logging::{LogFormat, Logging};

/// Errors of the `weft` binary; each maps to an exit code and one line.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad flags, environment or config file (exit 64).
    #[error("{0}")]
    Config(String),
    /// A request was refused as invalid.
    #[error("{0}")]
    Invalid(String),
    /// A file or system call failed.
    #[error("{0}")]
    Io(String),
    /// The request conflicts with the node's state (an address in use).
    #[error("{0}")]
    Conflict(String),
    /// A client command could not reach the node (exit 69).
    #[error("{0}")]
    Client(String),
    /// The node answered a client command with an error (exit 1).
    #[error("{0}")]
    Refused(String),
}

impl NodeError {
    fn exit_code(&self) -> u8 {
        match self {
            NodeError::Config(_) | NodeError::Invalid(_) => 64,
            NodeError::Io(_) | NodeError::Conflict(_) | NodeError::Refused(_) => 1,
            NodeError::Client(_) => 69,
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return ExitCode::SUCCESS;
            }
            // One line: clap's first, with the list under it when it ends
            // with a colon (the missing arguments, say).
            let rendered = e.render().to_string();
            let mut lines = rendered.lines();
            let first = lines.next().unwrap_or("invalid arguments");
            let mut line = first.trim_start_matches("error: ").to_string();
            if line.ends_with(':') {
                let listed: Vec<&str> = lines
                    .take_while(|l| l.starts_with(char::is_whitespace))
                    .map(str::trim)
                    .collect();
                line = format!("{line} {}", listed.join(", "));
            }
            eprintln!("weft: {line} (see weft --help)");
            return ExitCode::from(64);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run(cli: Cli) -> Result<(), NodeError> {
    match cli.command {
        Command::Init { dir, force } => {
            Logging::init(LogFormat::Text, None);
            init::init_cluster(&dir, force)?;
            println!(
                "created cluster in {}: ca.pem, ca.key (keep private), gossip.key (keep private)",
                dir.display()
            );
            Ok(())
        }
        Command::Cert(cli::CertCommand::Issue {
            name,
            operator,
            cluster,
            out,
        }) => {
            weft_gossip::keys::validate_name(&name)
                .map_err(|e| NodeError::Config(e.to_string()))?;
            let read = |f: &str| {
                std::fs::read_to_string(cluster.join(f)).map_err(|e| {
                    NodeError::Config(format!(
                        "--cluster {}: cannot read {f}: {e}",
                        cluster.display()
                    ))
                })
            };
            let issue = if operator {
                weft_runtime::tls::issue_operator_cert
            } else {
                weft_runtime::tls::issue_node_cert
            };
            let (cert, key) = issue(&read(init::CA_CERT)?, &read(init::CA_KEY)?, &name)
                .map_err(|e| NodeError::Config(e.to_string()))?;
            std::fs::create_dir_all(&out)
                .map_err(|e| NodeError::Config(format!("--out {}: {e}", out.display())))?;
            let (cert_path, key_path) =
                weft_runtime::tls::write_node_cert(&out, &name, &cert, &key)
                    .map_err(|e| NodeError::Io(e.to_string()))?;
            if operator {
                println!(
                    "issued {} and {} for operator {name} ({name}.{}); pass them to `weft keys` as --operator-cert and --operator-key, and keep the key off the nodes",
                    cert_path.display(),
                    key_path.display(),
                    weft_runtime::tls::OPERATOR_DOMAIN
                );
            } else {
                println!(
                    "issued {} and {} for node {name} ({}); start it with --cert and --key and a cluster dir holding only ca.pem and gossip.key",
                    cert_path.display(),
                    key_path.display(),
                    weft_runtime::tls::node_server_name(&name)
                );
            }
            Ok(())
        }
        Command::Cert(cli::CertCommand::Revoke { cert, cluster }) => {
            let (revoked, count) = init::revoke(&cluster, &cert)?;
            println!(
                "revoked the certificate of node {} (serial {}); {} now lists {count}: copy it to every node's --crl file and send them SIGHUP",
                revoked.node,
                revoked.serial,
                cluster.join(init::CRL).display()
            );
            Ok(())
        }
        Command::Demo { run_for } => {
            Logging::init(LogFormat::Text, None);
            let limit = run_for
                .map(|raw| {
                    config::parse_duration(&raw)
                        .map_err(|e| NodeError::Config(format!("--for {raw:?}: {e}")))
                })
                .transpose()?;
            demo::run(limit)
        }
        Command::Node(args) => {
            let cfg = config::NodeConfig::resolve(&args, cli.socket.as_deref())?;
            let logging = Logging::init(cfg.log_format, cfg.log_level.as_deref());
            node::run(cfg, *args, logging)
        }
        other => {
            Logging::init(LogFormat::Text, None);
            client_command(other, cli.socket.as_deref())
        }
    }
}

fn client_command(cmd: Command, socket: Option<&std::path::Path>) -> Result<(), NodeError> {
    let socket = client::resolve_socket(socket)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| NodeError::Io(e.to_string()))?;
    rt.block_on(async move {
        match cmd {
            Command::Register(a) => {
                let mut body = json!({"name": a.name, "port": a.port, "protocol": a.protocol});
                if let Some(id) = a.id {
                    body["id"] = json!(id);
                }
                if let Some(path) = a.check_http {
                    body["check"] = json!({"http": path});
                } else if a.check_tcp {
                    body["check"] = json!({"tcp": true});
                } else if let Some(ttl) = a.ttl {
                    let ttl = config::parse_duration(&ttl)
                        .map_err(|e| NodeError::Config(format!("--ttl {ttl:?}: {e}")))?;
                    body["check"] = json!({"ttl_ms": ttl.as_millis() as u64});
                }
                if !a.tags.is_empty() {
                    body["tags"] = json!(a.tags);
                }
                let (status, reply) =
                    client::call(&socket, Method::PUT, "/v1/services", Some(body)).await?;
                client::check(status, &reply)?;
                println!("registered {}", reply["id"].as_str().unwrap_or("?"));
                Ok(())
            }
            Command::Upstream {
                service,
                listen,
                public,
            } => {
                let body = json!({"service": service, "listen": listen, "public": public});
                let (status, reply) =
                    client::call(&socket, Method::PUT, "/v1/upstreams", Some(body)).await?;
                client::check(status, &reply)?;
                println!("{listen} now reaches {service}");
                Ok(())
            }
            Command::Deregister { id } => {
                let path = format!("/v1/services/{id}");
                let (status, reply) = client::call(&socket, Method::DELETE, &path, None).await?;
                client::check(status, &reply)?;
                println!("deregistered {id}");
                Ok(())
            }
            Command::Keys(keys) => keys_command(&socket, keys).await,
            Command::Services { json } => {
                show(&socket, "/v1/services", json, client::services_table).await
            }
            Command::Members { json } => {
                show(&socket, "/v1/members", json, client::members_table).await
            }
            Command::Health { json, watch } => {
                if !watch {
                    return show(&socket, "/v1/health", json, client::health_table).await;
                }
                loop {
                    let (status, body) =
                        client::call(&socket, Method::GET, "/v1/health", None).await?;
                    client::check(status, &body)?;
                    print!(
                        "\x1b[2J\x1b[H{}",
                        if json {
                            format!("{body:#}\n")
                        } else {
                            client::health_table(&body)
                        }
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Command::Init { .. } | Command::Node(_) | Command::Cert(_) | Command::Demo { .. } => {
                unreachable!("handled before")
            }
        }
    })
}

async fn keys_command(socket: &std::path::Path, cmd: cli::KeysCommand) -> Result<(), NodeError> {
    use weft_gossip::seal::KeyId;
    let (change, operator, method, path, key, done) = match cmd {
        cli::KeysCommand::List { json } => {
            return show(socket, "/v1/keys", json, client::keys_table).await
        }
        cli::KeysCommand::Install { key_file, operator } => {
            let key = read_secret_key(key_file.as_deref())?;
            let id = weft_gossip::seal::decode_key_base64(&key)
                .map(|k| KeyId::of(&k))
                .map_err(|e| NodeError::Config(format!("the key: {e}")))?;
            let change = keyring::Change::Install(id);
            (
                change,
                operator,
                Method::PUT,
                "/v1/keys".to_string(),
                Some(key),
                "installed",
            )
        }
        cli::KeysCommand::Use { key, operator } => {
            let id = parse_key_id(&key)?;
            let path = "/v1/keys/primary".to_string();
            let change = keyring::Change::Use(id);
            (
                change,
                operator,
                Method::PUT,
                path,
                Some(id.to_string()),
                "is now the primary",
            )
        }
        cli::KeysCommand::Remove { key, operator } => {
            let id = parse_key_id(&key)?;
            let path = format!("/v1/keys/{id}");
            (
                keyring::Change::Remove(id),
                operator,
                Method::DELETE,
                path,
                None,
                "removed",
            )
        }
    };
    let operator =
        weft_runtime::tls::OperatorKey::load(&operator.operator_cert, &operator.operator_key)
            .map_err(|e| NodeError::Config(e.to_string()))?;
    let grant = keyring_grant(socket, &operator, change).await?;
    let mut body = json!({ "grant": grant });
    if let Some(key) = key {
        body["key"] = json!(key);
    }
    let (status, reply) = client::call(socket, method, &path, Some(body)).await?;
    client::check(status, &reply)?;
    println!(
        "key {} {done}, granted by operator {}; the change reaches every node by gossip (see `weft keys list`)",
        reply["id"].as_str().unwrap_or("?"),
        operator.name
    );
    Ok(())
}

/// The operator's grant of `change` to the keyring the node now holds (its
/// version, primary and keys, as `GET /v1/keys` lists them).
async fn keyring_grant(
    socket: &std::path::Path,
    operator: &weft_runtime::tls::OperatorKey,
    change: keyring::Change,
) -> Result<weft_gossip::grant::Grant, NodeError> {
    let (status, listed) = client::call(socket, Method::GET, "/v1/keys", None).await?;
    client::check(status, &listed)?;
    let id = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse().ok());
    let primary = id(&listed["primary"])
        .ok_or_else(|| NodeError::Io("the node listed no primary key".into()))?;
    let ids: Vec<weft_gossip::seal::KeyId> = listed["keys"]
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
    let digest = keyring::digest(primary, &ids);
    Ok(operator.grant(keyring::OBJECT, version, &digest))
}

/// A gossip key from `file`, or from standard input.
fn read_secret_key(file: Option<&std::path::Path>) -> Result<String, NodeError> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| NodeError::Config(format!("--key-file {}: {e}", path.display())))?,
        None => {
            use std::io::Read as _;
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
fn parse_key_id(text: &str) -> Result<weft_gossip::seal::KeyId, NodeError> {
    use weft_gossip::seal::{decode_key_base64, KeyId};
    text.parse()
        .or_else(|_| decode_key_base64(text).map(|k| KeyId::of(&k)))
        .map_err(|_| {
            NodeError::Config(format!(
                "{:?} is neither a key id (8 hex digits, from `weft keys list`) nor a base64 key",
                text.chars().take(16).collect::<String>()
            ))
        })
}

async fn show(
    socket: &std::path::Path,
    path: &str,
    json: bool,
    render: fn(&serde_json::Value) -> String,
) -> Result<(), NodeError> {
    let (status, body) = client::call(socket, Method::GET, path, None).await?;
    client::check(status, &body)?;
    if json {
        println!("{body:#}");
    } else {
        print!("{}", render(&body));
    }
    Ok(())
}
