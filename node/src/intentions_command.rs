//! `weft intentions ...` (changes go through [`crate::config_command`]).

use std::path::Path;

use crate::cli::IntentionsCommand;
use crate::intentions::Record;
use crate::{client, config_command, NodeError};
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
            let held: Record = config_command::fetch(socket).await?;
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
    let (version, operator) = config_command::change(socket, &operator, |held: Record| {
        Ok(Record {
            intentions: held.intentions.changed(change)?,
            grant: None,
        })
    })
    .await?;
    println!(
        "intentions version {version}, granted by operator {operator}; every node enforces it once gossip brings it (see `weft intentions list`)"
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
