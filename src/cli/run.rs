//! `r4 run`: load the workflow (and the policies it names), run it on one machine, show live
//! progress on a terminal and print the report (a table, or one JSON line with `--json`); with
//! `--drill`, a ChaosDrill runs against it ([`crate::local::drill`]) and the exit status says
//! whether it passed.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use super::{CliError, read_input};
use crate::api::validate::{Manifest, RefMode, validate_texts};
use crate::local::run::{self, Load, Mechanism, Progress, RunOptions};
use crate::queue::Queue;

/// Arguments of `r4 run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The workflow (and any CircuitPolicy files); policies a workflow names that are not given
    /// are looked up as `<name>.yaml` next to the workflow file.
    #[arg(short = 'f', long = "file", value_name = "FILE", required = true, num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// The AgentWorkflow to run, when the files hold several.
    #[arg(long, value_name = "NAME")]
    pub workflow: Option<String>,
    /// Tasks to submit [default: 2000; with --drill, as many as the load offers until the drill
    /// has ended].
    #[arg(long, value_parser = parse_tasks, allow_hyphen_values = true)]
    pub tasks: Option<u64>,
    /// Submit at this many tasks per second (open loop). Default: the workflow's own traffic,
    /// `spec.economics.tasksPerMinute / 60`, or a closed loop when that is not set.
    #[arg(long, value_name = "TASKS_PER_SEC", value_parser = parse_rate, allow_hyphen_values = true, conflicts_with = "closed_loop")]
    pub rate: Option<f64>,
    /// Keep as many tasks unsettled as the agents can work on, instead of the workflow's rate.
    #[arg(long)]
    pub closed_loop: bool,
    /// Run on this Redis instead of the embedded queue (real clock instead of the virtual one).
    #[arg(long, value_name = "URL")]
    pub redis: Option<String>,
    /// Print the report as one JSON object (the last line).
    #[arg(long)]
    pub json: bool,
    /// Seed of every random draw (latencies, errors, jitter): the same seed, the same run.
    #[arg(long, default_value_t = 1, value_parser = parse_seed, allow_hyphen_values = true)]
    pub seed: u64,
    /// Switch a mechanism off in every policy, to compare (repeatable).
    #[arg(long, value_enum, value_name = "MECHANISM")]
    pub disable: Vec<Mechanism>,
    /// A ChaosDrill to run against the workflow meanwhile: its faults injected into this run's
    /// engines on the run's clock, its verdict, failover, recovery and timeline in the report;
    /// exit status 1 unless it passed.
    #[arg(long, value_name = "DRILL.yaml")]
    pub drill: Option<PathBuf>,
}

fn parse_tasks(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if (1..=10_000_000).contains(&n) => Ok(n),
        _ => Err(format!(
            "must be a whole number of tasks in [1, 10000000], got {s:?}"
        )),
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("must be a whole number in [0, {}], got {s:?}", u64::MAX))
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 && r <= 1_000_000.0 => Ok(r),
        _ => Err(format!(
            "must be a number of tasks per second in (0, 1000000], got {s:?}"
        )),
    }
}

/// Load the files, then any policy the workflows name that is missing, from beside them.
pub(crate) fn load(files: &[PathBuf]) -> Result<Vec<Manifest>, CliError> {
    let mut texts = Vec::new();
    for f in files {
        texts.push((f.display().to_string(), read_input(f)?));
    }
    let first = validate_texts(&texts, RefMode::Warn);
    if !first.errors.is_empty() {
        return Err(manifest_errors(&first.errors));
    }
    texts.extend(super::policies_beside(&first.manifests, "r4 run")?);
    let report = validate_texts(&texts, RefMode::Require);
    if !report.errors.is_empty() {
        return Err(manifest_errors(&report.errors));
    }
    Ok(report.manifests.into_iter().map(|(_, m)| m).collect())
}

fn manifest_errors(errors: &[String]) -> CliError {
    for e in errors.iter().skip(1) {
        eprintln!("{e}");
    }
    let more = if errors.len() > 1 {
        format!(" (and {} more above)", errors.len() - 1)
    } else {
        String::new()
    };
    CliError::Usage(format!(
        "{}{more}",
        errors.first().cloned().unwrap_or_default()
    ))
}

/// `r4 run …`.
pub fn run(args: RunArgs) -> Result<ExitCode, CliError> {
    let manifests = load(&args.files)?;
    let namespace = match &args.redis {
        // A fresh namespace per run: every key carries it, so runs on one Redis never mix.
        Some(_) => format!("r4-run-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
        None => "r4-run".to_string(),
    };
    let cfg = run::prepare(
        &manifests,
        args.workflow.as_deref(),
        &namespace,
        &args.disable,
    )
    .map_err(|e| CliError::Usage(e.to_string()))?;
    let load = Load::choose(&cfg, args.rate, args.closed_loop)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let drill = match &args.drill {
        Some(path) => {
            let text = read_input(path)?;
            let source = path.display().to_string();
            Some(crate::local::drill::load(&source, &text, &cfg).map_err(|e| manifest_errors(&e))?)
        }
        None => None,
    };
    let progress = std::io::stderr().is_terminal();
    let opts = RunOptions {
        tasks: args.tasks,
        load,
        seed: args.seed,
        progress,
        clock: if args.redis.is_some() {
            "real"
        } else {
            "virtual"
        },
        drill,
    };
    let bar = progress.then(|| {
        let bar = indicatif::ProgressBar::new(args.tasks.unwrap_or(run::DEFAULT_TASKS));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} done  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let on_progress = |p: &Progress| {
        if let Some(bar) = &bar {
            // Without a count (a drill's load) the total grows with the submissions.
            bar.set_length(p.total.max(1));
            bar.set_position(p.done);
            let breakers: Vec<String> = p
                .breakers
                .iter()
                .map(|(t, s)| format!("{t}={s:?}"))
                .collect();
            let replays = if p.replays_due > 0 {
                format!(" ({} replays due)", p.replays_due)
            } else {
                String::new()
            };
            let drill = p
                .drill
                .as_ref()
                .map_or_else(String::new, |d| format!("  drill {d}"));
            bar.set_message(format!(
                "{:.0} tasks/s  DLQ {}{replays}  breakers {}{drill}",
                p.tasks_per_sec,
                p.dead_lettered,
                if breakers.is_empty() {
                    "-".into()
                } else {
                    breakers.join(",")
                }
            ));
        }
    };
    let report = match &args.redis {
        None => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .start_paused(true)
                .build()
                .map_err(|e| CliError::Internal(format!("cannot start the runtime: {e}")))?;
            rt.block_on(async {
                let q: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
                run::run(cfg, q, &opts, on_progress).await
            })
        }
        Some(url) => {
            let rt = super::runtime()?;
            rt.block_on(async {
                let q = super::engine::connect(url).await?;
                let keys = cfg.keys.clone();
                let result = run::run(cfg, q.clone(), &opts, on_progress).await;
                // The run's keys are its own (fresh namespace): leave the Redis as it was.
                if let Ok(found) = q.scan_prefix(keys.prefix()).await {
                    for chunk in found.chunks(500) {
                        let _ = q.del(chunk).await;
                    }
                }
                Ok::<_, CliError>(result)
            })?
        }
    }
    .map_err(|e| CliError::Internal(e.to_string()))?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if args.json {
        println!("{}", report.to_json_line());
    } else {
        println!(
            "r4 run: {} tasks through {}",
            report.submitted,
            args.files[0].display()
        );
        print!("{}", report.to_table());
    }
    // One line on standard error saying why the exit status is 1.
    let mut why = report
        .unfinished_because
        .clone()
        .into_iter()
        .collect::<Vec<_>>();
    if report.lost > 0 || report.duplicate_effects > 0 {
        why.push(format!(
            "{} lost, {} duplicate effects",
            report.lost, report.duplicate_effects
        ));
    }
    if let Some(d) = &report.drill
        && d.verdict != "Passed"
    {
        let because = d
            .aborted_because
            .as_ref()
            .or(d.reason.as_ref())
            .map_or_else(String::new, |r| format!(": {r}"));
        why.push(format!("drill {} {}{because}", d.name, d.verdict));
    }
    if !why.is_empty() {
        eprintln!("r4 run: {}", why.join("; "));
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}

/// Arguments of `r4 bench drill`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchDrillArgs {
    /// Runs, with seeds 1..=N.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub seeds: u64,
    /// The workflow (and CircuitPolicy files) instead of the built-in worked example.
    #[arg(short = 'f', long = "file", value_name = "FILE", num_args = 1..)]
    pub files: Vec<PathBuf>,
    /// The ChaosDrill instead of the worked example's `bank-outage`.
    #[arg(long, value_name = "DRILL.yaml")]
    pub drill: Option<PathBuf>,
    /// Print only the JSON object (on one line).
    #[arg(long)]
    pub json: bool,
}

/// `r4 bench drill`: exit status 1 when any seed lost a task or duplicated an effect.
pub fn bench_drill(args: BenchDrillArgs) -> Result<ExitCode, CliError> {
    let manifests = if args.files.is_empty() {
        None
    } else {
        Some(load(&args.files)?)
    };
    let drill = match &args.drill {
        Some(path) => Some((path.display().to_string(), read_input(path)?)),
        None => None,
    };
    let opts = crate::bench::drill::DrillBenchOpts {
        seeds: args.seeds,
        manifests,
        drill,
    };
    let value = crate::bench::drill::run(opts)
        .map_err(|e| CliError::Usage(format!("r4 bench drill: {e}")))?;
    if !args.json {
        let f = |k: &str, q: &str| {
            value[k][q]
                .as_f64()
                .map_or_else(|| "-".to_string(), |v| format!("{v:.1} s"))
        };
        println!(
            "drill {}: {} seeds on the virtual clock",
            value["drill"].as_str().unwrap_or("?"),
            value["seeds"]
        );
        println!(
            "  failover   p50 {}  max {}",
            f("failover_seconds", "p50"),
            f("failover_seconds", "max")
        );
        println!(
            "  recovery   p50 {}  max {}",
            f("recovery_seconds", "p50"),
            f("recovery_seconds", "max")
        );
        println!(
            "  lost {}  duplicate effects {}",
            value["lost"], value["duplicate_effects"]
        );
        let e = &value["schedule_error_ms"];
        println!(
            "  fault schedule error: start ≤ {} ms, end ≤ {} ms (runner); first/last applied by the engines ≤ {} / {} ms",
            e["start_max"], e["end_max"], e["applied_start_max"], e["applied_end_max"]
        );
        println!("  verdicts {}", value["verdicts"]);
    }
    super::print_json(&value, args.json)?;
    let bad = value["lost"].as_u64() != Some(0) || value["duplicate_effects"].as_u64() != Some(0);
    if bad {
        eprintln!(
            "r4 bench drill: {} lost, {} duplicate effects",
            value["lost"], value["duplicate_effects"]
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
