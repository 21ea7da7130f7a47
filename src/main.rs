//! The `r4` command: parses the command line and dispatches. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// r4 keeps teams of autonomous agents working through failures.
#[derive(Parser, Debug)]
#[command(name = "r4", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the three CustomResourceDefinitions (what crds/ holds).
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
    /// Check manifests offline against the schema and the controller's rules.
    Validate {
        /// Files to check (each may hold several YAML documents); `-` reads standard input.
        #[arg(short = 'f', long = "file", value_name = "FILE", required = true, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Treat references to objects not in the given files as errors.
        #[arg(long)]
        require_refs: bool,
    },
    /// The operator: reconciles AgentWorkflows and CircuitPolicies into agent Deployments,
    /// queue wiring and kill switches; versioned rollback; leader-elected.
    Controller(r4::cli::controller::ControllerArgs),
    /// Print the controller's RBAC (what config/rbac/role.yaml holds; `make rbac`).
    #[command(hide = true)]
    Rbac,
    /// A local Kubernetes API on loopback that kubectl works against (CRDs, Deployments, Pods,
    /// …), with a kubeconfig for it: for trying and testing the operator without a cluster.
    Dev(r4::cli::dev::DevArgs),
    /// The resilience engine of a managed pod: one role (agent sidecar, intake or repair).
    Engine(r4::cli::engine::EngineArgs),
    /// A simulated agent container: serves the engine's POST /tasks with a set latency, failure
    /// rates and tool calls through the engine's tool proxy (the e2e's agent image).
    SimAgent(r4::cli::simagent::SimAgentArgs),
    /// Run a workflow on one machine, no cluster: simulated agents and tools, the real engine,
    /// live progress and a report.
    Run(r4::cli::run::RunArgs),
    /// Engage a kill switch: WORKFLOW (all agents), WORKFLOW/AGENT or WORKFLOW/tool:TOOL
    /// (patches spec.killSwitches; with --redis, sets it directly in Redis).
    Kill(r4::cli::workflow::KillArgs),
    /// Release a kill switch engaged with `r4 kill`.
    Resume(r4::cli::workflow::KillArgs),
    /// Roll a workflow back to its previous Healthy revision, or --to N (patches spec.rollbackTo).
    Rollback(r4::cli::workflow::RollbackArgs),
    /// Start, abort, or list the runs of a ChaosDrill.
    Drill {
        #[command(subcommand)]
        command: r4::cli::drill::DrillCommand,
    },
    /// Inspect and act on a workflow's dead-letter queue.
    Dlq {
        #[command(subcommand)]
        command: r4::cli::dlq::DlqCommand,
    },
    /// One screen of a workflow: conditions, revisions, agents, kill switches, queue and DLQ,
    /// breakers, SLO, error budget and incident cost.
    Status(r4::cli::workflow::StatusArgs),
    /// Benchmarks: r4 against its peer in the same run, JSON out.
    Bench {
        #[command(subcommand)]
        bench: BenchCommand,
    },
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Tasks/s through intake -> engine -> agent -> ack against a bare XREADGROUP/XACK consumer.
    Pipeline {
        /// Redis to measure on; without it a private redis-server is started.
        #[arg(long)]
        redis: Option<String>,
        /// Tasks per contender and round.
        #[arg(long, default_value_t = 20000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
        tasks: u64,
        /// Tasks per submission: r4 POSTs /v1/tasks:batch with this many, the bare peer pipelines as many XADDs (1: one at a time).
        #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=1000))]
        batch: u64,
        /// Interleaved rounds of every contender (medians are reported).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=20))]
        rounds: u64,
        /// Print only the JSON object (on one line).
        #[arg(long)]
        json: bool,
    },
    /// Time from engaging a kill switch to every engine having stopped taking tasks.
    Killswitch {
        /// Redis to measure on; without it a private redis-server is started (with --via-api,
        /// one in-memory queue).
        #[arg(long)]
        redis: Option<String>,
        /// From a merge patch of spec.killSwitches through r4 dev's API (kubelet, engines and
        /// controller in this process) instead of setting the switch in Redis directly.
        #[arg(long)]
        via_api: bool,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=500))]
        engines: u64,
        /// Engage/release rounds.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Print only the JSON object (on one line).
        #[arg(long)]
        json: bool,
    },
    /// Tail latency against a heavy-tailed tool: no hedging, tower::hedge and r4's hedge.
    Hedge {
        /// Print only the JSON object (on one line).
        #[arg(long)]
        json: bool,
        /// Measured calls per contender.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
        calls: u64,
        /// Calls before measuring, so both hedgers have a warm latency histogram.
        #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
        warmup: u64,
        /// Seed of the tool's latency sequence.
        #[arg(long, default_value_t = 7)]
        seed: u64,
    },
    /// The worked example's slow-agent profile three times on the virtual clock: no hedging,
    /// tool hedging only, tool + agent hedging (p99/p99.9, failure rate, extra work).
    AgentHedge {
        /// Print only the JSON object (on one line).
        #[arg(long)]
        json: bool,
        /// Tasks per configuration.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(100..=1_000_000))]
        tasks: u64,
        /// Seed of every random draw (the same for the three runs).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// The dev API of `r4 dev`: objects created/s, watch events/s, and peak memory holding
    /// 1,000 workflows with their children.
    Devcluster {
        /// Print only the JSON object (on one line).
        #[arg(long)]
        json: bool,
        /// ConfigMaps created and watched.
        #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        objects: u64,
        /// AgentWorkflows held with their children.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(0..=100_000))]
        workflows: u64,
    },
    /// Time and memory of the controller reconciling N AgentWorkflows on `r4 dev`'s API (run
    /// as a child process, without its kubelet).
    Controller {
        /// Print only the JSON object (on one line).
        #[arg(long)]
        json: bool,
        /// AgentWorkflows created and reconciled.
        #[arg(long, default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        workflows: u64,
    },
    /// A dependency that goes down then recovers: how fast the breaker opens and closes.
    Breaker {
        /// Print only the JSON object (on one line).
        #[arg(long)]
        json: bool,
    },
    /// The worked example's chaos drill under `r4 run --drill` on the virtual clock, once per
    /// seed: failover, recovery, lost and duplicated tasks, fault schedule error.
    Drill(r4::cli::run::BenchDrillArgs),
}

/// What is logged without `RUST_LOG`: long-running processes report at `info` (r4's own
/// events; dependencies only from `warn`); one-shot commands and simulations only errors, so
/// their output is theirs (`r4 run` would otherwise print every simulated dead letter).
fn default_log_filter(command: &Command) -> &'static str {
    match command {
        Command::Engine(_) | Command::Controller(_) | Command::Dev(_) | Command::SimAgent(_) => {
            "warn,r4=info"
        }
        // kube-rs logs a failed request at error level; the command's own one line says it.
        Command::Kill(_)
        | Command::Resume(_)
        | Command::Rollback(_)
        | Command::Status(_)
        | Command::Drill { .. } => "error,kube_client=off",
        _ => "error",
    }
}

/// `service.name` of the spans a command exports (`OTEL_SERVICE_NAME` overrides it).
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Engine(_) => "r4-engine",
        Command::Controller(_) => "r4-controller",
        Command::Dev(_) => "r4-dev",
        Command::SimAgent(_) => "r4-sim-agent",
        _ => "r4",
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // One line that names the flag; clap's usage hint would make it three.
            let text = e.to_string();
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let mut line = lines
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ")
                .to_string();
            if line.ends_with(':') {
                // "the following required arguments were not provided:" — name them.
                let named: Vec<&str> = lines.take_while(|l| !l.starts_with("Usage:")).collect();
                line = format!("{line} {}", named.join(", "));
            } else if let Some(values) = lines.find(|l| l.starts_with("[possible values:")) {
                // An unknown value of a closed set: say which ones exist.
                line = format!("{line} {values}");
            }
            eprintln!("r4: {line}");
            return ExitCode::from(2);
        }
    };
    r4::telemetry::init_as(default_log_filter(&cli.command), service_name(&cli.command));
    let result = match cli.command {
        Command::Crds { out_dir } => r4::cli::crds(out_dir.as_deref()),
        Command::Rbac => {
            print!("{}", r4::controller::rbac::role_yaml());
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate {
            files,
            require_refs,
        } => r4::cli::validate(&files, require_refs),
        Command::Bench { bench } => match bench {
            BenchCommand::Hedge {
                json,
                calls,
                warmup,
                seed,
            } => r4::cli::bench_hedge(json, calls, warmup, seed),
            BenchCommand::Breaker { json } => r4::cli::bench_breaker(json),
            BenchCommand::Drill(args) => r4::cli::run::bench_drill(args),
            BenchCommand::AgentHedge { json, tasks, seed } => {
                r4::cli::bench_agent_hedge(json, tasks, seed)
            }
            BenchCommand::Devcluster {
                json,
                objects,
                workflows,
            } => r4::cli::bench_devcluster(json, objects as usize, workflows as usize),
            BenchCommand::Pipeline {
                redis,
                tasks,
                batch,
                rounds,
                json,
            } => {
                let opts = r4::bench::pipeline::Options {
                    redis,
                    tasks: tasks as usize,
                    batch: batch as usize,
                    rounds: rounds as usize,
                };
                r4::cli::engine::bench_pipeline(opts, json)
            }
            BenchCommand::Controller { json, workflows } => {
                r4::cli::bench_controller(json, workflows as usize)
            }
            BenchCommand::Killswitch {
                redis,
                via_api: true,
                engines,
                rounds,
                json,
            } => r4::cli::bench_killswitch_via_api(redis, engines as usize, rounds as usize, json),
            BenchCommand::Killswitch {
                redis,
                via_api: false,
                engines,
                rounds,
                json,
            } => r4::cli::engine::bench_killswitch(
                redis.as_deref(),
                engines as usize,
                rounds as usize,
                json,
            ),
        },
        Command::Engine(args) => r4::cli::engine::engine(args),
        Command::Controller(args) => r4::cli::controller::controller(args),
        Command::Dev(args) => r4::cli::dev::dev(args),
        Command::Kill(k) => r4::cli::workflow::kill(k, true),
        Command::Resume(k) => r4::cli::workflow::kill(k, false),
        Command::Rollback(args) => r4::cli::workflow::rollback(args),
        Command::Status(args) => r4::cli::workflow::status(args),
        Command::Dlq { command } => r4::cli::dlq::run(command),
        Command::Drill { command } => r4::cli::drill::run(command),
        Command::Run(args) => r4::cli::run::run(args),
        Command::SimAgent(args) => r4::cli::simagent::sim_agent(args),
    };
    // Every span still in the exporter's batch leaves before the process does.
    r4::telemetry::shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("r4: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
