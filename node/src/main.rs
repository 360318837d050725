//! The `weft` binary: the node and its command-line clients.
//!
//! # Layout
//!
//! - `cli`: clap definitions of every command and flag.
//! - `config`: flags over `WEFT_*` over TOML over defaults, validated.
//! - `init`: `weft init` (cluster CA and gossip key).
//! - `node`: `weft node`, wiring gossip, actors and the local API; signals.
//! - `bridge`: a bridge's pool between zones, its joined view and offers.
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

mod admission;
mod api;
mod bridge;
mod callers;
mod cli;
mod client;
mod cluster_config;
mod config;
mod config_command;
mod crl;
mod demo;
mod follow;
mod init;
mod intentions;
mod intentions_command;
mod keyring;
mod keys_command;
mod limits;
mod logging;
mod node;
mod otlp;
mod registry;
mod rollouts;
mod routes;
mod store;
mod tap_command;
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
                match a.outbound.as_deref() {
                    None => {}
                    Some("auto") => body["outbound"] = json!(true),
                    Some(at) => body["outbound"] = json!(at),
                }
                if !a.upstreams.is_empty() {
                    let upstreams = a
                        .upstreams
                        .iter()
                        .map(|u| match u.split_once('=') {
                            Some((service, listen)) => Ok(json!({"service": service, "listen": listen})),
                            None => Err(NodeError::Config(format!(
                                "--upstream {u:?} must be SERVICE=ADDR, e.g. payments=127.0.0.1:9191"
                            ))),
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    body["upstreams"] = json!(upstreams);
                }
                let (status, reply) =
                    client::call(&socket, Method::PUT, "/v1/services", Some(body)).await?;
                client::check(status, &reply)?;
                println!("registered {}", reply["id"].as_str().unwrap_or("?"));
                if let Some(at) = reply["outbound"].as_str() {
                    println!(
                        "its outbound proxy: {at} (requests through it are from {})",
                        a.name
                    );
                }
                for u in reply["upstreams"].as_array().into_iter().flatten() {
                    println!(
                        "{} reaches {} as {}",
                        u["listen"].as_str().unwrap_or("?"),
                        u["service"].as_str().unwrap_or("?"),
                        a.name
                    );
                }
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
            Command::Keys(keys) => keys_command::run(&socket, keys).await,
            Command::Intentions(cmd) => intentions_command::run(&socket, cmd).await,
            Command::Route(args) => routes::run(&socket, args).await,
            Command::Limit(args) => limits::run(&socket, args).await,
            Command::Rollout(args) => rollouts::run(&socket, args).await,
            Command::Cert(cli::CertCommand::PublishCrl { crl }) => {
                let pem = std::fs::read_to_string(&crl)
                    .map_err(|e| NodeError::Config(format!("{}: {e}", crl.display())))?;
                let (status, reply) =
                    client::call(&socket, Method::PUT, "/v1/crl", Some(json!({ "crl": pem })))
                        .await?;
                client::check(status, &reply)?;
                if reply["adopted"] == true {
                    println!(
                        "the node adopted the list ({} revoked); every node adopts it by gossip",
                        reply["revoked"]
                    );
                } else {
                    println!("the node already uses this list or a newer one");
                }
                Ok(())
            }
            Command::Services { json } => {
                show(&socket, "/v1/services", json, client::services_table).await
            }
            Command::Members { json } => {
                show(&socket, "/v1/members", json, client::members_table).await
            }
            Command::Edges { service, json } => {
                let (status, mut body) =
                    client::call(&socket, Method::GET, "/v1/edges", None).await?;
                client::check(status, &body)?;
                if let (Some(service), Some(edges)) = (service, body["edges"].as_array_mut()) {
                    edges.retain(|e| e["service"] == *service || e["caller"] == *service);
                }
                if json {
                    println!("{body:#}");
                } else {
                    print!("{}", client::edges_table(&body));
                }
                Ok(())
            }
            Command::Tap {
                service,
                caller,
                status,
                json,
            } => tap_command::run(&socket, service, caller, status, json).await,
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

pub(crate) async fn show(
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
