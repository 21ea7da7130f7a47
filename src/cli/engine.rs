//! `r4 engine`, `r4 kill` / `r4 resume` (direct, with `--redis`) and the
//! engine benches' command wrappers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::{CliError, print_json, read_input, runtime};
use crate::engine::killswitch;
use crate::engine::{self, AgentRole, Intake, RepairRole, WorkflowConfig, http};
use crate::queue::redis::RedisQueue;
use crate::queue::{Keys, Queue};
use crate::telemetry::redact::redact_url;

/// Which role an engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    Agent,
    Intake,
    Repair,
}

/// Arguments of `r4 engine`.
#[derive(Debug, Clone, clap::Args)]
pub struct EngineArgs {
    /// The role of this engine.
    #[arg(long, value_enum)]
    pub role: Role,
    /// The workflow and its policies (multi-document YAML, as for `r4 validate`).
    #[arg(long, value_name = "FILE")]
    pub workflow_file: PathBuf,
    /// The AgentWorkflow to run when the file holds several.
    #[arg(long)]
    pub workflow: Option<String>,
    /// The agent this engine serves (role agent).
    #[arg(long)]
    pub agent: Option<String>,
    /// Redis URL (`rediss://` for TLS; a private CA's PEM bundle in R4_REDIS_CA_FILE).
    #[arg(long, env = "R4_REDIS_URL", hide_env_values = true)]
    pub redis: String,
    /// Namespace of the workflow (hash tag of its keys); default: the manifest's, else `default`.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Address of the HTTP endpoints (intake API, /healthz, /readyz, /metrics).
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: String,
    /// Address of the tool proxy the agent container calls its tools through (role agent with
    /// tools; localhost only: it applies the policies, not authentication; port 0 = any).
    #[arg(long, default_value = "127.0.0.1:8082")]
    pub tools_listen: String,
    /// URL the agent container takes tasks on (role agent).
    #[arg(long, default_value = "http://127.0.0.1:8081/tasks")]
    pub agent_url: String,
    /// Engine id (consumer name); default: the agent or role name plus a random suffix.
    #[arg(long, env = "R4_ENGINE_ID")]
    pub engine_id: Option<String>,
    /// PEM bundle of CA certificates to trust for `https://` tools, besides the webpki roots.
    #[arg(long, env = "R4_TOOLS_CA_FILE", value_name = "FILE")]
    pub tools_ca_file: Option<PathBuf>,
    /// Directory of the tools' `headersFrom` values: one file `<tool>/<header name in lower
    /// case>` each (role agent).
    #[arg(long, env = "R4_TOOLS_SECRETS_DIR", value_name = "DIR", default_value = crate::engine::tools::DEFAULT_SECRETS_DIR)]
    pub tools_secrets_dir: PathBuf,
    /// Also append every tool call's audit event to the workflow's Redis stream
    /// `r4:{ns/wf}:audit`, keeping its last N entries (role agent; unset: log only).
    #[arg(long, env = crate::telemetry::audit::STREAM_MAXLEN_ENV, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub audit_stream_maxlen: Option<u64>,
}

/// The agent's tool proxy: policy stacks over real HTTP, MCP annotations learnt, kill switches
/// and breaker states kept current, breakers shared through Redis where the policy says so,
/// served on `--tools-listen`. Returns the server task.
async fn start_tool_proxy(
    args: &EngineArgs,
    cfg: &Arc<WorkflowConfig>,
    agent: &str,
    q: Arc<dyn Queue>,
    id: &str,
    stop: watch::Receiver<bool>,
    registry: &prometheus::Registry,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, CliError> {
    use crate::engine::tools::{self, HttpToolOptions, ToolProxy};
    let ca = match &args.tools_ca_file {
        Some(p) => Some(
            crate::tls::read_ca_file(p)
                .map_err(|e| CliError::Usage(format!("--tools-ca-file: {e}")))?,
        ),
        None => None,
    };
    let client = tools::http_client(ca.as_deref()).map_err(CliError::Internal)?;
    let allowed = cfg
        .agent(agent)
        .map(|a| a.tools.clone())
        .unwrap_or_default();
    // Per tool: its credentials (headersFrom), and the deadline of its policy's
    // `timeout.overall` — of the policy it runs, so a reload that changes it rebuilds the
    // transport too (the factory).
    let headers = Arc::new(
        tools::load_tool_headers(&cfg.spec, &allowed, &args.tools_secrets_dir)
            .map_err(CliError::Usage)?,
    );
    let factory: tools::TransportFactory = Arc::new(
        move |t: &crate::api::workflow::ToolSpec, policy: &crate::resilience::PolicyConfig| {
            let mut o = HttpToolOptions {
                headers: headers.get(&t.name).cloned().unwrap_or_default(),
                ..HttpToolOptions::default()
            };
            if let Some(d) = policy.timeout.as_ref().and_then(|t| t.overall) {
                o.timeout = d;
            }
            tools::http_transport_with(client.clone(), o)
        },
    );
    let mut initial = std::collections::BTreeMap::new();
    for (i, t) in cfg.spec.tools.iter().enumerate() {
        let policy = tools::tool_policy(&cfg.spec, &cfg.policies, i)
            .map_err(|e| CliError::Usage(e.to_string()))?;
        initial.insert(t.name.clone(), policy);
    }
    let initial = Arc::new(initial);
    let transport = {
        let factory = factory.clone();
        move |t: &crate::api::workflow::ToolSpec| match initial.get(&t.name) {
            Some(p) => factory(t, p),
            None => factory(t, &crate::resilience::PolicyConfig::default()),
        }
    };
    let proxy: Arc<ToolProxy> =
        Arc::new(
            cfg.tool_proxy(
                &transport,
                Some(crate::resilience::Metrics::register(registry).map_err(|e| {
                    CliError::Internal(format!("cannot register policy metrics: {e}"))
                })?),
                None,
            )
            .map_err(|e| CliError::Usage(e.to_string()))?
            .with_transport_factory(factory)
            .with_audit(auditor(args, cfg, agent, &q, id)),
        );
    {
        // Learn MCP annotations in the background: a slow or absent MCP server must not hold up
        // the engine; until then its tools keep the safe default (not idempotent).
        let (proxy, transport) = (proxy.clone(), transport.clone());
        tokio::spawn(async move { proxy.discover_mcp(&transport).await });
    }
    let shared = |p: Option<&crate::api::policy::CircuitPolicySpec>| {
        p.and_then(|p| p.circuit_breaker.as_ref())
            .and_then(|cb| cb.shared)
            .unwrap_or(false)
    };
    // The sync task of each shared breaker, so a breaker a reload replaces stops syncing.
    let syncs: Arc<
        std::sync::Mutex<std::collections::BTreeMap<String, tokio::task::JoinHandle<()>>>,
    > = Arc::default();
    let mut store = None;
    for t in &cfg.spec.tools {
        let policy = t
            .policy_ref
            .as_ref()
            .or(cfg.spec.policy_ref.as_ref())
            .and_then(|p| cfg.policies.get(p));
        if let (true, Some(b)) = (shared(policy), proxy.breaker(&t.name)) {
            let store = match &store {
                Some(s) => s,
                None => store.insert(shared_breaker_store(&args.redis, &cfg.keys).await?),
            };
            let sync = store
                .attach(&b, Duration::from_secs(1))
                .await
                .map_err(|e| {
                    CliError::Internal(format!("cannot share breaker of {}: {e}", t.name))
                })?;
            crate::resilience::lock(&syncs).insert(t.name.clone(), sync);
        }
    }
    {
        // Breakers a policy reload builds: shared as their policy says, from the background
        // (a failure is logged; the breaker then works for this engine alone).
        let (url, keys) = (args.redis.clone(), cfg.keys.clone());
        let store = Arc::new(tokio::sync::OnceCell::new_with(store));
        proxy.on_new_breaker(move |tool, b, policy| {
            if let Some(old) = crate::resilience::lock(&syncs).remove(tool) {
                old.abort();
            }
            if !shared(policy) {
                return;
            }
            let (url, keys, store, syncs) =
                (url.clone(), keys.clone(), store.clone(), syncs.clone());
            let (tool, b) = (tool.to_owned(), b.clone());
            tokio::spawn(async move {
                let attached = async {
                    let store = store
                        .get_or_try_init(|| shared_breaker_store(&url, &keys))
                        .await
                        .map_err(|e| e.to_string())?;
                    store
                        .attach(&b, Duration::from_secs(1))
                        .await
                        .map_err(|e| e.to_string())
                };
                match attached.await {
                    Ok(sync) => {
                        crate::resilience::lock(&syncs).insert(tool, sync);
                    }
                    Err(e) => {
                        tracing::warn!(tool = %tool, error = %e, "cannot share the rebuilt breaker")
                    }
                }
            });
        });
    }
    tokio::spawn(tools::supervise(
        proxy.clone(),
        q,
        cfg.clone(),
        id.to_string(),
        stop.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(&args.tools_listen)
        .await
        .map_err(|e| CliError::Io(args.tools_listen.clone(), e))?;
    Ok(tokio::spawn(http::serve(
        listener,
        tools::http::router(proxy, allowed),
        stop,
    )))
}

/// Who the tool proxy's audit events name, and the audit stream if asked for.
fn auditor(
    args: &EngineArgs,
    cfg: &WorkflowConfig,
    agent: &str,
    q: &Arc<dyn Queue>,
    id: &str,
) -> crate::telemetry::audit::Auditor {
    use crate::telemetry::audit::{Auditor, Who};
    let a = Auditor::new(Who {
        workflow: format!("{}/{}", cfg.namespace, cfg.name),
        agent: agent.to_owned(),
        engine: id.to_owned(),
    });
    match args.audit_stream_maxlen {
        Some(n) => a.with_stream(q.clone(), cfg.keys.audit(), n),
        None => a,
    }
}

/// The store that shares breakers through Redis (`circuitBreaker.shared`).
async fn shared_breaker_store(
    url: &str,
    keys: &Keys,
) -> Result<crate::resilience::SharedBreakerStore, CliError> {
    let k = keys.clone();
    let names = crate::resilience::SharedBreakerKeys::new(
        move |tool| k.breaker(tool),
        keys.breaker_channel(),
    );
    within(
        "connecting to Redis for shared breakers",
        Duration::from_secs(10),
        crate::resilience::SharedBreakerStore::connect(url, names),
    )
    .await?
    .map_err(|e| CliError::Usage(format!("cannot connect to {}: {e}", redact_url(url))))
}

pub(crate) async fn connect(url: &str) -> Result<Arc<dyn Queue>, CliError> {
    let q = RedisQueue::connect(url)
        .await
        .map_err(|e| CliError::Usage(format!("cannot connect to {}: {e}", redact_url(url))))?;
    Ok(Arc::new(q))
}

/// `r4 engine …`: run one role until SIGTERM/SIGINT, then stop safely.
pub fn engine(args: EngineArgs) -> Result<ExitCode, CliError> {
    let text = read_input(&args.workflow_file)?;
    let cfg = WorkflowConfig::from_yaml(
        &args.workflow_file.display().to_string(),
        &text,
        args.workflow.as_deref(),
        args.namespace.as_deref(),
    )
    .map_err(|e| CliError::Usage(e.to_string()))?;
    let cfg = Arc::new(cfg);
    if args.role == Role::Agent {
        let name = args
            .agent
            .as_deref()
            .ok_or_else(|| CliError::Usage("--role agent needs --agent NAME".into()))?;
        if cfg.agent(name).is_none() {
            return Err(CliError::Usage(format!(
                "agent {name:?} is not in workflow {}",
                cfg.name
            )));
        }
    }
    let rt = runtime()?;
    rt.block_on(run_engine(args, cfg))
}

async fn run_engine(args: EngineArgs, cfg: Arc<WorkflowConfig>) -> Result<ExitCode, CliError> {
    let signal = super::shutdown_signal();
    // Settled before connecting: an intake that would run open by mistake never starts.
    let mut intake_opts = match args.role {
        Role::Intake => Some(intake_options(&cfg)?),
        _ => None,
    };
    let q = connect(&args.redis).await?;
    // Say what this workflow is made of, so `r4 kill` can refuse a name nothing obeys.
    if let Err(e) =
        killswitch::publish_topology(q.as_ref(), &cfg.keys, &killswitch::Topology::of(&cfg.spec))
            .await
    {
        tracing::warn!(error = %e, "cannot publish the workflow's names for r4 kill");
    }
    let name = match args.role {
        Role::Agent => args.agent.clone().unwrap_or_default(),
        Role::Intake => "intake".into(),
        Role::Repair => "repair".into(),
    };
    let id = args
        .engine_id
        .clone()
        .unwrap_or_else(|| engine::engine_id(&name));
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .map_err(|e| CliError::Io(args.listen.clone(), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Io(args.listen.clone(), e))?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        signal.await;
        tracing::info!("stopping safely");
        let _ = tx.send(true);
    });
    let internal = |e: engine::EngineError| CliError::Internal(e.to_string());
    tracing::info!(
        engine = %id,
        role = ?args.role,
        workflow = %format_args!("{}/{}", cfg.namespace, cfg.name),
        listen = %addr,
        "engine started"
    );
    match args.role {
        Role::Agent => {
            let delivery = cfg
                .agent_delivery(&name, args.agent_url.clone())
                .map_err(|e| CliError::Usage(format!("--agent-url: {e}")))?;
            let registry = prometheus::Registry::new();
            // An agent without tools has nothing to proxy: no listener, no port to collide on.
            let has_tools = cfg.agent(&name).is_some_and(|a| !a.tools.is_empty());
            let tools = if has_tools {
                Some(
                    start_tool_proxy(&args, &cfg, &name, q.clone(), &id, rx.clone(), &registry)
                        .await?,
                )
            } else {
                None
            };
            let role =
                AgentRole::new(cfg.clone(), &name, q, Arc::new(delivery), &id).map_err(internal)?;
            let server = tokio::spawn(http::serve(
                listener,
                http::router(
                    http::Health::new(role.stats())
                        .with_registry(registry)
                        .for_workflow(&cfg.namespace, &cfg.name),
                ),
                rx.clone(),
            ));
            role.run(rx).await.map_err(internal)?;
            let _ = server.await;
            if let Some(tools) = tools {
                let _ = tools.await;
            }
        }
        Role::Intake => {
            let options = intake_opts.take().unwrap_or_default();
            let intake = Intake::with_options(cfg.clone(), q.clone(), &id, options);
            let stats_task = tokio::spawn(engine::consumer::publish_stats(
                q,
                cfg.keys.clone(),
                intake.stats(),
                rx.clone(),
            ));
            http::serve(listener, intake.router(), rx)
                .await
                .map_err(|e| CliError::Io(addr.to_string(), e))?;
            let _ = stats_task.await;
        }
        Role::Repair => {
            let role = RepairRole::new(cfg.clone(), q, &id);
            let server = tokio::spawn(http::serve(
                listener,
                http::router(
                    http::Health::new(role.stats()).for_workflow(&cfg.namespace, &cfg.name),
                ),
                rx.clone(),
            ));
            role.run(rx).await.map_err(internal)?;
            let _ = server.await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The intake's options: bearer tokens from the environment ([`engine::auth`]). A workflow
/// whose spec asks for `intake.auth` and an engine given no token refuse to start: an intake
/// must not open by accident.
fn intake_options(cfg: &WorkflowConfig) -> Result<engine::intake::IntakeOptions, CliError> {
    let tokens = engine::auth::Tokens::from_env().map_err(CliError::Usage)?;
    let required = cfg.spec.intake.as_ref().is_some_and(|i| i.auth.is_some());
    if required && tokens.is_none() {
        return Err(CliError::Usage(format!(
            "spec.intake.auth is set but neither {} nor {} is: the intake would be open",
            engine::auth::TOKEN_FILE_ENV,
            engine::auth::TOKEN_ENV
        )));
    }
    Ok(engine::intake::IntakeOptions {
        tokens,
        ..Default::default()
    })
}

/// `r4 kill WORKFLOW[/AGENT|/tool:TOOL]` / `r4 resume …` directly in Redis. The target must
/// name something that exists: with `-f`, in the manifest; else in the names the workflow's
/// engines published on start. A workflow no engine ever ran, or a name it does not have, is
/// refused with the names it does have — a switch nothing obeys would only look engaged.
pub fn kill_switch(
    target: &str,
    redis: Option<&str>,
    namespace: Option<&str>,
    file: Option<&std::path::Path>,
    engage: bool,
) -> Result<ExitCode, CliError> {
    let Some(url) = redis else {
        return Err(CliError::Usage(
            "the direct mode sets the switch in Redis: it needs --redis URL (without it, r4 kill patches the spec through the Kubernetes API)".into(),
        ));
    };
    let (workflow, t) = super::parse_target(target)?;
    let workflow = workflow.as_str();
    // With -f, the manifest names the parts (and the namespace, unless --namespace does).
    let from_file = match file {
        Some(path) => {
            let text = read_input(path)?;
            let cfg = WorkflowConfig::from_yaml(
                &path.display().to_string(),
                &text,
                Some(workflow),
                namespace,
            )
            .map_err(|e| {
                CliError::Usage(format!(
                    "workflow {workflow:?} from {}: {e}",
                    path.display()
                ))
            })?;
            Some((cfg.namespace.clone(), killswitch::Topology::of(&cfg.spec)))
        }
        None => None,
    };
    let namespace = match &from_file {
        Some((ns, _)) => ns.clone(),
        None => namespace.unwrap_or("default").to_owned(),
    };
    let keys = Keys::new(&namespace, workflow);
    let name = format!("{namespace}/{workflow}");
    runtime()?.block_on(async {
        let q = connect(url).await?;
        let topology = match from_file {
            Some((_, t)) => t,
            None => killswitch::topology(q.as_ref(), &keys)
                .await
                .map_err(|e| CliError::Internal(e.to_string()))?
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "unknown workflow {name}: no engine of it has run on this Redis (check --namespace, or pass -f WORKFLOW.yaml to take its agents and tools from the manifest)"
                    ))
                })?,
        };
        topology.check(&name, &t).map_err(CliError::Usage)?;
        let res = if engage {
            killswitch::engage(q.as_ref(), &keys, &t).await
        } else {
            killswitch::release(q.as_ref(), &keys, &t).await
        };
        let v = res.map_err(|e| CliError::Internal(e.to_string()))?;
        println!(
            "{} {target} (state version {v})",
            if engage { "engaged" } else { "released" }
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `r4 bench pipeline`.
pub fn bench_pipeline(
    opts: crate::bench::pipeline::Options,
    json: bool,
) -> Result<ExitCode, CliError> {
    let value = runtime()?
        .block_on(crate::bench::pipeline::run(opts))
        .map_err(CliError::Internal)?;
    print_json(&value, json)
}

/// `r4 bench killswitch`.
pub fn bench_killswitch(
    redis: Option<&str>,
    engines: usize,
    rounds: usize,
    json: bool,
) -> Result<ExitCode, CliError> {
    let value = runtime()?
        .block_on(crate::bench::killswitch::run(
            redis.map(str::to_owned),
            engines,
            rounds,
        ))
        .map_err(CliError::Internal)?;
    print_json(&value, json)
}

/// Deadline helper for CLI awaits.
pub(crate) async fn within<T>(
    what: &str,
    d: Duration,
    f: impl std::future::Future<Output = T>,
) -> Result<T, CliError> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| CliError::Internal(format!("{what}: no answer within {d:?}")))
}
