//! `weft intentions ...`: each change is made here over the version the
//! node holds, granted by the operator whose certificate and key the
//! command is given; the node checks the grant and gossip carries the new
//! version to every node.

use std::path::Path;

use crate::cli::IntentionsCommand;
use crate::intentions::{Record, OBJECT};
use crate::{client, keys_command, NodeError};
use hyper::Method;
use weft_runtime::policy::intentions::{Action, Change, Rule};

/// Runs one `weft intentions` command against the node at `socket`.
pub async fn run(socket: &Path, cmd: IntentionsCommand) -> Result<(), NodeError> {
    let (change, operator) = match cmd {
        IntentionsCommand::List { json } => {
            return crate::show(socket, "/v1/intentions", json, client::intentions_table).await
        }
        IntentionsCommand::Check {
            source,
            destination,
        } => {
            let held = fetch(socket).await?;
            let decision = held.intentions.decide(&source, &destination);
            println!(
                "{source} -> {destination}: {} by {} (intentions version {})",
                decision.action.as_str(),
                decision.reason(),
                held.intentions.version
            );
            return Ok(());
        }
        IntentionsCommand::Allow {
            source,
            destination,
            operator,
        } => (set(source, destination, Action::Allow), operator),
        IntentionsCommand::Deny {
            source,
            destination,
            operator,
        } => (set(source, destination, Action::Deny), operator),
        IntentionsCommand::Remove {
            source,
            destination,
            operator,
        } => (
            Change::Remove {
                source,
                destination,
            },
            operator,
        ),
        IntentionsCommand::Default { action, operator } => {
            let action = Action::parse(&action).ok_or_else(|| {
                NodeError::Config(format!("default {action:?} must be allow or deny"))
            })?;
            (Change::Default(action), operator)
        }
    };
    let operator = keys_command::load(&operator)?;
    let held = fetch(socket).await?;
    let next = held.intentions.changed(change).map_err(NodeError::Config)?;
    let grant = operator.grant(OBJECT, next.version, &next.digest());
    let version = next.version;
    let record = Record {
        intentions: next,
        grant: Some(grant),
    };
    let body = serde_json::to_value(&record).map_err(|e| NodeError::Io(e.to_string()))?;
    let (status, reply) = client::call(socket, Method::PUT, "/v1/intentions", Some(body)).await?;
    client::check(status, &reply)?;
    println!(
        "intentions version {version}, granted by operator {}; every node enforces it once gossip brings it (see `weft intentions list`)",
        operator.name
    );
    Ok(())
}

fn set(source: String, destination: String, action: Action) -> Change {
    Change::Set(Rule {
        source,
        destination,
        action,
    })
}

async fn fetch(socket: &Path) -> Result<Record, NodeError> {
    let (status, body) = client::call(socket, Method::GET, "/v1/intentions", None).await?;
    client::check(status, &body)?;
    serde_json::from_value(body).map_err(|e| NodeError::Io(format!("intentions: {e}")))
}
