//! What each `r4` subcommand does once its arguments are parsed: read inputs, call the library,
//! print for people (or JSON for scripts) and choose the exit code.

pub mod controller;
pub mod dev;
pub mod dlq;
pub mod drill;
pub mod engine;
pub mod kube;
pub mod run;
pub mod simagent;
pub mod workflow;

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use crate::api::{self, validate};

/// A failure a user should read as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Internal(String),
    #[error("`r4 {0}` is not yet available in this build")]
    NotYet(String),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) | CliError::Io(..) => 2,
            CliError::Internal(_) | CliError::NotYet(_) => 1,
        }
    }
}

/// Read a file, or standard input for `-`.
pub fn read_input(path: &Path) -> Result<String, CliError> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .map_err(|e| CliError::Io("-".into(), e))?;
        return Ok(s);
    }
    std::fs::read_to_string(path).map_err(|e| CliError::Io(path.display().to_string(), e))
}

/// `r4 crds [--out-dir DIR]`.
pub fn crds(out_dir: Option<&Path>) -> Result<ExitCode, CliError> {
    let internal = |e: serde_yaml::Error| CliError::Internal(format!("cannot render CRD: {e}"));
    match out_dir {
        None => print!("{}", api::crds_yaml().map_err(internal)?),
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| CliError::Io(dir.display().to_string(), e))?;
            for crd in api::crds() {
                let path = dir.join(api::crd_file_name(&crd));
                std::fs::write(&path, api::crd_yaml(&crd).map_err(internal)?)
                    .map_err(|e| CliError::Io(path.display().to_string(), e))?;
                println!("wrote {}", path.display());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `r4 validate -f FILE…`: exit 0 when every document is valid, 1 naming each bad field.
pub fn validate(files: &[std::path::PathBuf], require_refs: bool) -> Result<ExitCode, CliError> {
    let mut texts = Vec::new();
    for f in files {
        texts.push((f.display().to_string(), read_input(f)?));
    }
    let mode = if require_refs {
        validate::RefMode::Require
    } else {
        validate::RefMode::Warn
    };
    let first = validate::validate_texts(&texts, validate::RefMode::Warn);
    texts.extend(policies_beside(&first.manifests, "r4 validate")?);
    let report = validate::validate_texts(&texts, mode);
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for e in &report.errors {
        eprintln!("{e}");
    }
    if report.errors.is_empty() {
        if report.manifests.is_empty() {
            eprintln!("no manifests found");
            return Ok(ExitCode::from(1));
        }
        for (source, m) in &report.manifests {
            println!("{source}: {}/{} valid", m.kind(), m.name());
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{} error(s)", report.errors.len());
        Ok(ExitCode::from(1))
    }
}

/// The CircuitPolicies the workflows in `manifests` name that are not among
/// them, read from `<name>.yaml` next to the workflow's file (what `r4 run`
/// and `r4 validate` do, so a workflow and its policies can live side by
/// side); each one found is said on standard error as `<who>: …`.
pub(crate) fn policies_beside(
    manifests: &[(String, validate::Manifest)],
    who: &str,
) -> Result<Vec<(String, String)>, CliError> {
    use std::collections::BTreeSet;
    use std::path::Path;
    let have: BTreeSet<&str> = manifests
        .iter()
        .filter(|(_, m)| matches!(m, validate::Manifest::Policy(_)))
        .map(|(_, m)| m.name())
        .collect();
    let mut extra: Vec<(String, String)> = Vec::new();
    for (source, m) in manifests {
        let validate::Manifest::Workflow(w) = m else {
            continue;
        };
        let dir = Path::new(source.split('#').next().unwrap_or(""))
            .parent()
            .unwrap_or(Path::new("."));
        let wanted = w
            .spec
            .policy_ref
            .iter()
            .chain(w.spec.tools.iter().filter_map(|t| t.policy_ref.as_ref()));
        for name in wanted {
            let path = dir.join(format!("{name}.yaml"));
            let shown = path.display().to_string();
            if !have.contains(name.as_str())
                && path.is_file()
                && !extra.iter().any(|(p, _)| *p == shown)
            {
                eprintln!("{who}: CircuitPolicy {name:?} taken from {shown}");
                extra.push((shown, read_input(&path)?));
            }
        }
    }
    Ok(extra)
}

/// The multi-threaded runtime every networked subcommand runs on.
pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Internal(format!("cannot start the async runtime: {e}")))
}

/// Print a bench result: pretty for people, one line with `--json` (the last line either way).
pub(crate) fn print_json(value: &serde_json::Value, json: bool) -> Result<ExitCode, CliError> {
    let text = if json {
        serde_json::to_string(value)
    } else {
        serde_json::to_string_pretty(value)
    };
    println!(
        "{}",
        text.map_err(|e| CliError::Internal(format!("cannot print result: {e}")))?
    );
    Ok(ExitCode::SUCCESS)
}

/// `r4 bench hedge`.
pub fn bench_hedge(json: bool, calls: u64, warmup: u64, seed: u64) -> Result<ExitCode, CliError> {
    let opts = crate::bench::hedge::HedgeBenchOpts {
        calls: calls as usize,
        warmup_calls: warmup as usize,
        seed,
        ..Default::default()
    };
    let value = runtime()?.block_on(crate::bench::hedge::run(opts));
    print_json(&value, json)
}

/// `r4 bench agent-hedge`.
pub fn bench_agent_hedge(json: bool, tasks: u64, seed: u64) -> Result<ExitCode, CliError> {
    let opts = crate::bench::agent_hedge::AgentHedgeBenchOpts { tasks, seed };
    let value = crate::bench::agent_hedge::run(opts)
        .map_err(|e| CliError::Internal(format!("r4 bench agent-hedge: {e}")))?;
    print_json(&value, json)
}

/// `r4 bench breaker`.
pub fn bench_breaker(json: bool) -> Result<ExitCode, CliError> {
    let value = runtime()?.block_on(crate::bench::breaker::run(Default::default()));
    print_json(&value, json)
}

/// `r4 bench devcluster`.
pub fn bench_devcluster(
    json: bool,
    objects: usize,
    workflows: usize,
) -> Result<ExitCode, CliError> {
    let opts = crate::bench::devcluster::DevBenchOpts {
        objects,
        workflows,
        ..Default::default()
    };
    let value = runtime()?
        .block_on(crate::bench::devcluster::run(opts))
        .map_err(|e| CliError::Internal(format!("r4 bench devcluster: {e}")))?;
    print_json(&value, json)
}

/// `r4 bench controller`: the API server is this binary's `r4 dev`, run as a child process.
pub fn bench_controller(json: bool, workflows: usize) -> Result<ExitCode, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Internal(format!("cannot find the r4 binary: {e}")))?;
    let opts = crate::bench::controller::ControllerBenchOpts {
        workflows,
        ..Default::default()
    };
    // A Ctrl-C drops the bench, and with it the child API server (killed on drop).
    let value = runtime()?
        .block_on(async {
            let signal = shutdown_signal();
            tokio::select! {
                r = crate::bench::controller::run(&exe, opts) => r,
                _ = signal => Err("interrupted".to_string()),
            }
        })
        .map_err(|e| CliError::Internal(format!("r4 bench controller: {e}")))?;
    if !json {
        print_controller_table(&value);
    }
    print_json(&value, json)
}

fn print_controller_table(v: &serde_json::Value) {
    println!("controller: {} workflows", v["workflows"]);
    println!("  reconciled in        {} s", v["reconcile_seconds"]);
    println!("  controller peak RSS  {} MiB", v["peak_rss_mb"]);
    println!("  writes / workflow    {}", v["writes_per_workflow"]);
    println!("  status / workflow    {}", v["status_writes_per_workflow"]);
}

/// `r4 bench killswitch --via-api`.
pub fn bench_killswitch_via_api(
    redis: Option<String>,
    engines: usize,
    rounds: usize,
    json: bool,
) -> Result<ExitCode, CliError> {
    let opts = crate::bench::killswitch_api::ViaApiOpts {
        redis,
        engines,
        rounds,
    };
    let value = runtime()?
        .block_on(crate::bench::killswitch_api::run(opts))
        .map_err(|e| CliError::Internal(format!("r4 bench killswitch --via-api: {e}")))?;
    if !json {
        println!(
            "killswitch via the API: {} engines, {} rounds",
            value["engines"], value["rounds"]
        );
        println!(
            "  engage  p50 {} ms  p99 {} ms  max {} ms",
            value["p50_ms"], value["p99_ms"], value["max_ms"]
        );
        let r = &value["release"]["per_engine"];
        println!(
            "  release p50 {} ms  p99 {} ms  max {} ms",
            r["p50_ms"], r["p99_ms"], r["max_ms"]
        );
        let c = &value["controller_ms"];
        println!(
            "  patch -> controller wrote the state: p50 {} ms  max {} ms",
            c["p50_ms"], c["max_ms"]
        );
    }
    print_json(&value, json)
}

/// Install the SIGINT and SIGTERM handlers now and return what resolves on the first of them:
/// a signal that arrives while the command is still starting is then a graceful stop, not the
/// default action (the process killed mid-start). Call it first, inside the runtime.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let handlers = {
        use tokio::signal::unix::{SignalKind, signal};
        signal(SignalKind::interrupt()).and_then(|i| Ok((i, signal(SignalKind::terminate())?)))
    };
    async move {
        #[cfg(unix)]
        if let Ok((mut int, mut term)) = handlers {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `WORKFLOW[/AGENT|/tool:TOOL]` → the workflow's name and what the switch covers.
pub(crate) fn parse_target(
    target: &str,
) -> Result<(String, crate::engine::killswitch::Target), CliError> {
    let (workflow, rest) = match target.split_once('/') {
        Some((w, a)) => (w, Some(a)),
        None => (target, None),
    };
    if workflow.is_empty() || rest == Some("") || rest == Some("tool:") {
        return Err(CliError::Usage(format!(
            "bad target {target:?}: expected WORKFLOW[/AGENT|/tool:TOOL]"
        )));
    }
    Ok((
        workflow.to_owned(),
        crate::engine::killswitch::Target::parse_suffix(rest),
    ))
}
