//! `r4 drill run|abort|history DRILL`: what a person does to a ChaosDrill without `kubectl
//! patch` — ask for a run now, abort the run in progress, read the runs.
//!
//! Owns the requests' form (the annotations [`RUN_REQUESTED`] / [`ABORT_REQUESTED`] set to the
//! time of the request, so each request is a new value the controller serves once), when a
//! command refuses (a run already in progress, a suspended drill, nothing to abort), what
//! `--wait` waits for, and the history table. Leaves to others: acting on the requests and
//! writing the status (the drill controller, `crate::controller::drill`) and reaching the API
//! ([`super::kube`]).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use k8s_openapi::jiff::{Timestamp, Unit};
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::kube::{FIELD_MANAGER, Kube, KubeArgs};
use super::{CliError, runtime};
use crate::api::drill::{ChaosDrill, DrillPhase, DrillRun};
use crate::controller::drill::{ABORT_REQUESTED, RUN_REQUESTED, summary};

/// How often `--wait` reads the status again.
const POLL: Duration = Duration::from_millis(200);
/// `--wait` alone: a drill runs for minutes.
const DEFAULT_WAIT: &str = "15m";

/// `r4 drill`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum DrillCommand {
    /// Start a run now (sets the annotation r4.dev/run-requested); refused while one runs.
    Run(ActArgs),
    /// Abort the run in progress: its faults are cleared at once (sets r4.dev/abort-requested).
    Abort(ActArgs),
    /// The drill's runs with every figure.
    History(HistoryArgs),
}

/// Arguments of `r4 drill run` and `r4 drill abort`.
#[derive(Debug, Clone, clap::Args)]
pub struct ActArgs {
    /// The ChaosDrill.
    pub drill: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Wait until the run ended (`--wait` alone: 15m; `--wait=2m`), then print it.
    #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
          default_missing_value = DEFAULT_WAIT, value_parser = parse_wait)]
    pub wait: Option<Duration>,
    /// With --wait: print the run as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `r4 drill history`.
#[derive(Debug, Clone, clap::Args)]
pub struct HistoryArgs {
    /// The ChaosDrill.
    pub drill: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The runs as JSON (`status.runs`, oldest first).
    #[arg(long)]
    pub json: bool,
}

fn parse_wait(s: &str) -> Result<Duration, String> {
    let d = crate::api::common::parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than 0".into());
    }
    Ok(d)
}

/// `r4 drill …`.
pub fn run(cmd: DrillCommand) -> Result<ExitCode, CliError> {
    let rt = runtime()?;
    match cmd {
        DrillCommand::Run(a) => rt.block_on(request(&a, true)),
        DrillCommand::Abort(a) => rt.block_on(request(&a, false)),
        DrillCommand::History(a) => rt.block_on(history(&a)),
    }
}

async fn get(kube: &Kube, name: &str) -> Result<ChaosDrill, CliError> {
    kube.call(
        format_args!("cannot read chaosdrill {}/{name}", kube.namespace),
        kube.api::<ChaosDrill>().get_opt(name),
    )
    .await?
    .ok_or_else(|| {
        CliError::Usage(format!(
            "chaosdrill {}/{name} not found (see `kubectl get drill -A`)",
            kube.namespace
        ))
    })
}

fn phase(d: &ChaosDrill) -> Option<DrillPhase> {
    d.status.as_ref().and_then(|s| s.phase)
}

/// Why `r4 drill run` (`start`) or `r4 drill abort` refuses, if it does.
pub fn refusal(d: &ChaosDrill, start: bool) -> Option<String> {
    let running = phase(d) == Some(DrillPhase::Running);
    let since = d
        .status
        .as_ref()
        .and_then(|s| s.last_run_at.clone())
        .unwrap_or_else(|| "an unknown time".into());
    match (start, running) {
        (true, true) => Some(format!(
            "a run is in progress (started {since}); `r4 drill abort {}` first",
            d.metadata.name.as_deref().unwrap_or("")
        )),
        (true, false) if d.spec.suspend => {
            Some("the drill is suspended (spec.suspend: true)".into())
        }
        (false, false) => Some(format!(
            "no run in progress (phase {})",
            phase(d).map_or("unknown".to_owned(), |p| format!("{p:?}"))
        )),
        _ => None,
    }
}

async fn request(args: &ActArgs, start: bool) -> Result<ExitCode, CliError> {
    let kube = Kube::connect(&args.kube).await?;
    let d = get(&kube, &args.drill).await?;
    let name = format!("{}/{}", kube.namespace, args.drill);
    if let Some(why) = refusal(&d, start) {
        return Err(CliError::Usage(format!("chaosdrill {name}: {why}")));
    }
    let before = d.status.as_ref().and_then(|s| s.last_run_at.clone());
    let value = Timestamp::now()
        .round(Unit::Millisecond)
        .unwrap_or_else(|_| Timestamp::now())
        .to_string();
    let (annotation, verb) = if start {
        (RUN_REQUESTED, "run")
    } else {
        (ABORT_REQUESTED, "abort")
    };
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    let started = Instant::now();
    kube.call(
        format_args!("cannot patch chaosdrill {name}"),
        kube.api::<ChaosDrill>().patch(
            &args.drill,
            &params,
            &Patch::Merge(json!({"metadata": {"annotations": {annotation: value}}})),
        ),
    )
    .await?;
    println!("{verb} of chaosdrill {name} requested ({annotation}={value})");
    let Some(wait) = args.wait else {
        return Ok(ExitCode::SUCCESS);
    };
    let deadline = started + wait;
    loop {
        let d = get(&kube, &args.drill).await?;
        let status = d.status.clone().unwrap_or_default();
        let served = if start {
            status.last_run_request.as_deref() == Some(value.as_str())
        } else {
            status.last_abort_request.as_deref() == Some(value.as_str())
        };
        let running = status.phase == Some(DrillPhase::Running);
        if served && !running {
            if start && status.last_run_at == before {
                return Err(CliError::Internal(format!(
                    "chaosdrill {name}: the controller did not start the run (see `kubectl describe drill {}`)",
                    args.drill
                )));
            }
            let Some(run) = status.runs.last() else {
                return Err(CliError::Internal(format!(
                    "chaosdrill {name}: no run recorded"
                )));
            };
            if args.json {
                println!("{}", serde_json::to_string(run).unwrap_or_default());
            } else {
                println!("chaosdrill {name}: {}", summary(run));
            }
            return Ok(if run.verdict.as_deref() == Some("Passed") || !start {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        if Instant::now() >= deadline {
            return Err(CliError::Internal(format!(
                "chaosdrill {name}: the {verb} did not finish within {wait:?} (phase {}, request {})",
                status
                    .phase
                    .map_or("unknown".to_owned(), |p| format!("{p:?}")),
                if served { "served" } else { "not seen yet" }
            )));
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

async fn history(args: &HistoryArgs) -> Result<ExitCode, CliError> {
    let kube = Kube::connect(&args.kube).await?;
    let d = get(&kube, &args.drill).await?;
    let runs = d.status.clone().unwrap_or_default().runs;
    if args.json {
        println!("{}", serde_json::to_string(&runs).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", table(&runs));
    Ok(ExitCode::SUCCESS)
}

/// The runs as a table, oldest first; "no runs yet" without any.
pub fn table(runs: &[DrillRun]) -> String {
    if runs.is_empty() {
        return "no runs yet\n".into();
    }
    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.1}s"));
    let mut rows = vec![
        [
            "STARTED", "VERDICT", "SCORE", "FAILOVER", "RECOVERY", "DLQ+", "REPLAYED", "TASKS",
            "LOST", "DUP", "REASON",
        ]
        .map(str::to_owned),
    ];
    for r in runs {
        rows.push([
            r.started_at.clone(),
            r.verdict.clone().unwrap_or_else(|| "-".into()),
            r.score.map_or("-".to_owned(), |s| format!("{s:.0}")),
            secs(r.failover_seconds),
            secs(r.recovery_seconds),
            r.dlq_growth.to_string(),
            r.dlq_replayed.to_string(),
            r.tasks_processed.to_string(),
            r.tasks_lost.to_string(),
            r.duplicate_effects.to_string(),
            r.aborted_because
                .clone()
                .or_else(|| r.reason.clone())
                .unwrap_or_default(),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::drill::ChaosDrillStatus;

    fn drill(phase: Option<DrillPhase>, suspend: bool) -> ChaosDrill {
        let mut d: ChaosDrill = serde_json::from_value(json!({
            "apiVersion": "r4.dev/v1alpha1", "kind": "ChaosDrill",
            "metadata": {"name": "d", "namespace": "ns"},
            "spec": {"workflowRef": "wf", "duration": "10s", "suspend": suspend,
                     "faults": [{"type": "ToolOutage", "tool": "bank"}]}
        }))
        .expect("drill");
        d.status = Some(ChaosDrillStatus {
            phase,
            ..ChaosDrillStatus::default()
        });
        d
    }

    #[test]
    fn run_refuses_while_running_or_suspended_abort_without_a_run() {
        assert!(refusal(&drill(Some(DrillPhase::Succeeded), false), true).is_none());
        assert!(refusal(&drill(None, false), true).is_none());
        let r = refusal(&drill(Some(DrillPhase::Running), false), true).expect("refused");
        assert!(r.contains("r4 drill abort d"), "{r}");
        assert!(
            refusal(&drill(None, true), true)
                .expect("refused")
                .contains("suspend")
        );
        assert!(refusal(&drill(Some(DrillPhase::Running), true), false).is_none());
        assert!(
            refusal(&drill(Some(DrillPhase::Aborted), false), false)
                .expect("refused")
                .contains("no run in progress")
        );
    }

    #[test]
    fn the_table_has_a_row_per_run_and_aligned_columns() {
        assert_eq!(table(&[]), "no runs yet\n");
        let runs = [
            DrillRun {
                started_at: "2026-11-29T19:00:00Z".into(),
                verdict: Some("Passed".into()),
                score: Some(92.4),
                failover_seconds: Some(1.25),
                tasks_processed: 120,
                ..DrillRun::default()
            },
            DrillRun {
                started_at: "2026-11-29T20:00:00Z".into(),
                verdict: Some("Aborted".into()),
                aborted_because: Some("suspended".into()),
                ..DrillRun::default()
            },
        ];
        let t = table(&runs);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert!(lines[0].starts_with("STARTED"));
        assert!(
            lines[1].contains("Passed") && lines[1].contains("92") && lines[1].contains("1.2s")
        );
        assert!(lines[2].ends_with("suspended"), "{t}");
        let col = |l: &str| {
            l.find("VERDICT")
                .or_else(|| l.find("Passed"))
                .or_else(|| l.find("Aborted"))
        };
        assert_eq!(col(lines[0]), col(lines[1]));
        assert_eq!(col(lines[1]), col(lines[2]));
    }
}
