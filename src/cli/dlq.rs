//! `r4 dlq list|show|replay|purge WORKFLOW [--poison]`: inspect and act on
//! a workflow's dead-letter stream (or, with `--poison`, its poison stream:
//! what the repair role quarantined) in its Redis.

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use super::CliError;
use super::engine::{connect, within};
use super::runtime;
use crate::engine::dlq::{self, DlqRecord, Store};
use crate::queue::Keys;

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DlqCommand {
    /// List entries with their reasons and ages.
    List {
        #[command(flatten)]
        at: DlqTarget,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Show one entry with its attempt history.
    Show {
        #[command(flatten)]
        at: DlqTarget,
        /// DLQ entry id (from `list`).
        id: String,
    },
    /// Replay entries through the same idempotent path (same task id).
    Replay {
        #[command(flatten)]
        at: DlqTarget,
        /// Entry ids to replay.
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<String>,
        /// Replay every entry.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Delete every entry (asks for confirmation).
    Purge {
        #[command(flatten)]
        at: DlqTarget,
        /// Do not ask.
        #[arg(long)]
        yes: bool,
    },
}

/// Which workflow's DLQ.
#[derive(Debug, Clone, clap::Args)]
pub struct DlqTarget {
    /// The workflow.
    pub workflow: String,
    /// Redis URL of the workflow's queue.
    #[arg(long, env = "R4_REDIS_URL", hide_env_values = true)]
    pub redis: String,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Act on the poison stream (quarantined tasks) instead of the DLQ.
    #[arg(long)]
    pub poison: bool,
}

const T: Duration = Duration::from_secs(30);

fn internal(e: impl std::fmt::Display) -> CliError {
    CliError::Internal(e.to_string())
}

fn record_json(r: &DlqRecord) -> serde_json::Value {
    serde_json::json!({
        "id": r.id, "reason": r.reason, "error": r.error, "task_id": r.task_id,
        "step": r.step, "source": r.source, "deliveries": r.deliveries,
        "replays": r.replays, "replayable": r.replayable, "tool": r.tool,
        "age_seconds": r.age_secs(),
    })
}

pub fn run(cmd: DlqCommand) -> Result<ExitCode, CliError> {
    let at = match &cmd {
        DlqCommand::List { at, .. }
        | DlqCommand::Show { at, .. }
        | DlqCommand::Replay { at, .. }
        | DlqCommand::Purge { at, .. } => at.clone(),
    };
    let keys = Keys::new(&at.namespace, &at.workflow);
    let store = if at.poison { Store::Poison } else { Store::Dlq };
    let name = store.name();
    runtime()?.block_on(async move {
        let q = connect(&at.redis).await?;
        let q = q.as_ref();
        match cmd {
            DlqCommand::List { json, .. } => {
                let recs = within("list", T, dlq::list(q, &keys, store, 0))
                    .await?
                    .map_err(internal)?;
                if json {
                    for r in &recs {
                        println!("{}", record_json(r));
                    }
                } else {
                    println!(
                        "{:<20} {:>8} {:<15} {:<10} {:<38} ERROR",
                        "ID", "AGE", "REASON", "STEP", "TASK"
                    );
                    for r in &recs {
                        let mut err = r.error.clone();
                        err.truncate(80);
                        println!(
                            "{:<20} {:>7}s {:<15} {:<10} {:<38} {err}",
                            r.id,
                            r.age_secs(),
                            r.reason,
                            r.step,
                            r.task_id
                        );
                    }
                    eprintln!(
                        "{} entr{}",
                        recs.len(),
                        if recs.len() == 1 { "y" } else { "ies" }
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Show { id, .. } => {
                let rec = within("show", T, dlq::show(q, &keys, store, &id))
                    .await?
                    .map_err(|e| CliError::Usage(e.to_string()))?
                    .ok_or_else(|| CliError::Usage(format!("no {name} entry {id}")))?;
                let mut v = record_json(&rec);
                v["history"] = serde_json::to_value(&rec.history).unwrap_or_default();
                v["original"] = rec
                    .original
                    .iter()
                    .map(|(k, b)| {
                        (
                            k.clone(),
                            serde_json::Value::String(String::from_utf8_lossy(b).into_owned()),
                        )
                    })
                    .collect::<serde_json::Map<_, _>>()
                    .into();
                println!("{}", serde_json::to_string_pretty(&v).map_err(internal)?);
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Replay { ids, all, .. } => {
                let recs = within("list", T, dlq::list(q, &keys, store, 0))
                    .await?
                    .map_err(internal)?;
                let chosen: Vec<&DlqRecord> =
                    recs.iter().filter(|r| all || ids.contains(&r.id)).collect();
                if let Some(missing) = ids.iter().find(|i| !recs.iter().any(|r| &r.id == *i)) {
                    return Err(CliError::Usage(format!("no {name} entry {missing}")));
                }
                let mut n = 0;
                for r in chosen {
                    match within("replay", T, dlq::replay(q, &keys, store, r, None)).await? {
                        Ok(Some(new)) => {
                            n += 1;
                            println!(
                                "replayed {} (task {}) to {} as {new}",
                                r.id, r.task_id, r.source
                            );
                        }
                        Ok(None) => println!("{} was no longer in the {name} stream", r.id),
                        Err(e) => eprintln!("cannot replay {}: {e}", r.id),
                    }
                }
                eprintln!("{n} replayed");
                Ok(ExitCode::SUCCESS)
            }
            DlqCommand::Purge { yes, .. } => {
                let n = within("len", T, q.len(&store.key(&keys)))
                    .await?
                    .map_err(internal)?;
                if !yes {
                    if !std::io::stdin().is_terminal() {
                        return Err(CliError::Usage(
                            "refusing to purge without a terminal to confirm; pass --yes".into(),
                        ));
                    }
                    print!(
                        "purge {n} {name} entries of {}/{}? type 'yes': ",
                        at.namespace, at.workflow
                    );
                    let _ = std::io::stdout().flush();
                    let mut line = String::new();
                    let _ = std::io::stdin().lock().read_line(&mut line);
                    if line.trim() != "yes" {
                        eprintln!("not purged");
                        return Ok(ExitCode::from(1));
                    }
                }
                let gone = within("purge", T, dlq::purge(q, &keys, store))
                    .await?
                    .map_err(internal)?;
                println!("purged {gone} entries");
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}
