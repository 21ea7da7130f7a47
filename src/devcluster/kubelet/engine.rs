//! Engine containers: a container that runs `r4 engine …` runs that engine role here, in
//! process, on the same code as `r4 run` (`crate::local`): the agent role delivers to a
//! simulated agent built from the workflow's `simulate:` block and calls simulated tools
//! through the real tool proxy; intake and repair roles are the real ones. Every engine of
//! `r4 dev` shares the kubelet's queue (the embedded one, or `r4 dev --redis`), so the pods of
//! one workflow share its streams.
//!
//! # The pod layout this supports
//! - **Which containers**: a container whose image's repository is `r4` or ends in `/r4`
//!   (`r4:dev`, `ghcr.io/acme/r4:0.1`), or a native sidecar (an init container with
//!   `restartPolicy: Always`) of any image whose command runs `r4 engine`, when its
//!   `command` + `args` read `[r4] engine --role agent|intake|repair …` (the binary may be
//!   omitted — the image's entrypoint is `r4` — or named by any path ending in `r4`). An r4
//!   container running another subcommand is simulated like any image.
//! - **Arguments**: those of `r4 engine` (`--role`, `--agent`, `--workflow-file`,
//!   `--workflow`, `--namespace`, `--engine-id`; `--redis`, `--listen`, `--tools-listen`,
//!   `--agent-url`, `--tools-ca-file`, `--tools-secrets-dir` are accepted and not used: the
//!   queue is the kubelet's, the agent and tools are simulated). Anything else is refused as
//!   the real CLI would, and the container crash-loops with the reason.
//! - **The workflow file** (`--workflow-file PATH`, the workflow and its CircuitPolicies as
//!   multi-document YAML) comes from a ConfigMap volume mounted in that container: a mount
//!   whose `mountPath` is a directory holding PATH (the key is the rest of the path, or the
//!   `items[]` entry whose `path` it is), or a `subPath` mount of one key at PATH. The
//!   ConfigMap is read through the kube `Client` each time the container starts.
//! - **Intake tokens**: `R4_INTAKE_TOKEN` in the container's `env`, as a `value` or a
//!   `secretKeyRef` (read through the `Client`). A workflow with `spec.intake.auth` and no
//!   token crash-loops, as `r4 engine` refuses to start.
//! - The intake serves its API on `127.0.0.1` at a port the system picks (every pod of
//!   `r4 dev` shares one address), logged when it starts.
//! - The engine id is `--engine-id`, else the pod's name.
//! - **A sim-agent container** beside an agent engine ([`sim_agent_container`]: the
//!   `r4-sim-agent` image, or the r4 image with `args: [sim-agent]`) is run for real: its
//!   [`SimAgentServer`] on a loopback port, configured by the container's `R4_SIM_*` env values,
//!   the engine delivering to it over HTTP as `r4 engine` does to an agent container, and the
//!   tool proxy's HTTP front on another port for its tool calls (the simulated tools behind).
//!   Then the agent's `simulate:` block is not needed; any other agent image is played from it.
//!
//! Readiness is the engine's `/readyz` answer, taken in process: the role runs, its agent
//! answers and no task handler panicked ([`crate::engine::Stats::ready`]); so an agent the
//! engine found down (a `simulate:` outage) makes its pod not Ready, as on a cluster. A role
//! that stops by itself has exited: the kubelet restarts it after a back-off.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use kube::Api;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::runtime::{PodRuntime, Probe, Running};
use crate::api::workflow::ToolSpec;
use crate::engine::stats::Stats;
use crate::engine::{self, AgentRole, Intake, RepairRole, WorkflowConfig, killswitch, tools};
use crate::local::sim::EffectLedger;
use crate::local::simagent::{Finished, SimAgent};
use crate::local::simagent_server::{Options, SimAgentServer, options_from_env};
use crate::local::simtool::SimTool;
use crate::queue::Queue;

/// The role an engine container runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Agent,
    Intake,
    Repair,
}

/// `r4 engine`'s arguments, as far as the kubelet uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineCommand {
    pub role: Role,
    pub agent: Option<String>,
    pub workflow_file: String,
    pub workflow: Option<String>,
    pub namespace: Option<String>,
    pub engine_id: Option<String>,
}

/// Flags of `r4 engine` that take a value and that the kubelet does not use.
const IGNORED_FLAGS: &[&str] = &[
    "redis",
    "listen",
    "tools-listen",
    "agent-url",
    "tools-ca-file",
    "tools-secrets-dir",
];

/// Whether `image`'s repository is `r4` (`r4:dev`, `ghcr.io/acme/r4:0.1`, `r4@sha256:…`).
pub fn is_r4_image(image: &str) -> bool {
    repository_name(image) == "r4"
}

/// The repository of `r4 sim-agent`'s image (`make sim-agent-image`, the e2e's agents).
pub const SIM_AGENT_REPOSITORY: &str = "r4-sim-agent";

/// The last path segment of `image`'s repository, without tag or digest.
fn repository_name(image: &str) -> &str {
    let repo = image.split('@').next().unwrap_or(image);
    // A tag follows the last `:` after the last `/` (a registry port comes before a `/`).
    let last = repo.rsplit('/').next().unwrap_or(repo);
    last.split(':').next().unwrap_or(last)
}

/// The pod's container that runs the simulated agent behind the real agent protocol, if one
/// does: the [`SIM_AGENT_REPOSITORY`] image (any registry and tag) with neither `command` nor
/// `args` (its own `sim-agent` command), or the r4 image with `args: [sim-agent]`. It is
/// configured by its `env` values (`R4_SIM_*`, [`options_from_env`]); other arguments are
/// refused when the engine starts, since `r4 dev` does not run the CLI's flags.
pub fn sim_agent_container(pod: &Pod) -> Option<&Container> {
    pod.spec.as_ref()?.containers.iter().find(|c| {
        let image = c.image.as_deref().unwrap_or("");
        let argv = command_line(c);
        (repository_name(image) == SIM_AGENT_REPOSITORY)
            || (is_r4_image(image) && argv.first() == Some(&"sim-agent"))
    })
}

/// The container's `command` then `args`, as the words a process would get.
fn command_line(c: &Container) -> Vec<&str> {
    c.command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .map(String::as_str)
        .collect()
}

/// The simulated agent's options from its container (see [`sim_agent_container`]); an error
/// names what is refused.
fn sim_agent_options(pod: &Pod, c: &Container) -> Result<Options, String> {
    let argv = command_line(c);
    let own = repository_name(c.image.as_deref().unwrap_or("")) == SIM_AGENT_REPOSITORY;
    if (own && !argv.is_empty()) || (!own && argv != ["sim-agent"]) {
        return Err(format!(
            "container {:?}: r4 dev runs a sim-agent container configured by its env (R4_SIM_*), not by arguments {argv:?}",
            c.name
        ));
    }
    let env: BTreeMap<&str, Option<&str>> = c
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.as_str(), e.value.as_deref()))
        .collect();
    if let Some((name, _)) = env
        .iter()
        .find(|(n, v)| n.starts_with("R4_SIM_") && v.is_none())
    {
        return Err(format!(
            "container {:?}: env {name}: r4 dev reads R4_SIM_* from a value, not valueFrom",
            c.name
        ));
    }
    let default_name = pod.metadata.name.clone().unwrap_or_else(|| c.name.clone());
    // R4_TOOLS_URL and R4_AGENT_PORT are the pod's wiring: here the kubelet's own.
    options_from_env(
        |k| {
            (k != crate::local::simagent_server::TOOLS_URL_ENV)
                .then(|| env.get(k).copied().flatten().map(str::to_owned))
                .flatten()
        },
        &default_name,
    )
    .map_err(|e| format!("container {:?}: {e}", c.name))
}

/// The words after the `r4` binary when the container's `command` + `args` run `r4 engine`.
fn engine_argv(c: &Container, entrypoint_is_r4: bool) -> Option<Vec<String>> {
    let argv: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    let (first, rest) = argv.split_first()?;
    let binary_named = first == "r4" || first.ends_with("/r4");
    let rest = if binary_named {
        rest
    } else if entrypoint_is_r4 && c.command.is_none() {
        argv.as_slice()
    } else {
        return None;
    };
    let (sub, flags) = rest.split_first()?;
    (sub == "engine").then(|| flags.to_vec())
}

/// Whether `c` is an engine container (see the module docs): `Some` with its parsed arguments
/// (or why they are refused), `None` when it is not one.
pub fn engine_command(c: &Container, sidecar: bool) -> Option<Result<EngineCommand, String>> {
    let r4_image = c.image.as_deref().is_some_and(is_r4_image);
    if !r4_image && !sidecar {
        return None;
    }
    let flags = engine_argv(c, r4_image)?;
    Some(parse_engine_args(&flags))
}

/// Parse `r4 engine`'s flags (`--flag value` or `--flag=value`), refusing what the real CLI
/// refuses: unknown flags, a missing `--role` or `--workflow-file`, `--role agent` without
/// `--agent`.
pub fn parse_engine_args(flags: &[String]) -> Result<EngineCommand, String> {
    let mut values: BTreeMap<String, String> = BTreeMap::new();
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        let Some(name) = f.strip_prefix("--") else {
            return Err(format!("r4 engine: unexpected argument {f:?}"));
        };
        let (name, value) = match name.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => {
                let v = it
                    .next()
                    .ok_or_else(|| format!("r4 engine: --{name} needs a value"))?;
                (name.to_string(), v.clone())
            }
        };
        let known = matches!(
            name.as_str(),
            "role" | "agent" | "workflow-file" | "workflow" | "namespace" | "engine-id"
        ) || IGNORED_FLAGS.contains(&name.as_str());
        if !known {
            return Err(format!("r4 engine: unexpected argument '--{name}'"));
        }
        values.insert(name, value);
    }
    let role = match values.get("role").map(String::as_str) {
        Some("agent") => Role::Agent,
        Some("intake") => Role::Intake,
        Some("repair") => Role::Repair,
        Some(other) => {
            return Err(format!(
                "r4 engine: invalid value {other:?} for '--role': agent, intake or repair"
            ));
        }
        None => return Err("r4 engine: --role is required".into()),
    };
    let workflow_file = values
        .remove("workflow-file")
        .ok_or("r4 engine: --workflow-file is required")?;
    let agent = values.remove("agent");
    if role == Role::Agent && agent.is_none() {
        return Err("--role agent needs --agent NAME".into());
    }
    Ok(EngineCommand {
        role,
        agent,
        workflow_file,
        workflow: values.remove("workflow"),
        namespace: values.remove("namespace"),
        engine_id: values.remove("engine-id"),
    })
}

/// Where a file a container reads comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSource {
    ConfigMap { name: String, key: String },
    Secret { name: String, key: String },
}

/// The ConfigMap or Secret key behind `path` in `container` of `pod`: the volume mounted at
/// the longest `mountPath` holding it (see the module docs).
pub fn file_source(pod: &Pod, container: &Container, path: &str) -> Result<FileSource, String> {
    let volumes = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut mounts: Vec<_> = container.volume_mounts.iter().flatten().collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.mount_path.len()));
    for m in mounts {
        let base = m.mount_path.trim_end_matches('/');
        let rel = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if m.mount_path == path => sub.to_string(),
            Some(_) => continue,
            None => match path.strip_prefix(base).and_then(|r| r.strip_prefix('/')) {
                Some(r) if !r.is_empty() => r.to_string(),
                _ => continue,
            },
        };
        let Some(v) = volumes.iter().find(|v| v.name == m.name) else {
            return Err(format!(
                "{path}: volumeMount {:?} names no volume of the pod",
                m.name
            ));
        };
        let (items, source) = if let Some(cm) = &v.config_map {
            (
                &cm.items,
                FileSource::ConfigMap {
                    name: cm.name.clone(),
                    key: String::new(),
                },
            )
        } else if let Some(s) = &v.secret {
            (
                &s.items,
                FileSource::Secret {
                    name: s.secret_name.clone().unwrap_or_default(),
                    key: String::new(),
                },
            )
        } else {
            return Err(format!(
                "{path}: volume {:?} is neither a configMap nor a secret (r4 dev mounts only those)",
                v.name
            ));
        };
        let key = match items {
            Some(items) if !items.is_empty() => items
                .iter()
                .find(|i| i.path == rel)
                .map(|i| i.key.clone())
                .ok_or_else(|| format!("{path}: volume {:?} has no item at {rel:?}", v.name))?,
            _ => rel,
        };
        return Ok(match source {
            FileSource::ConfigMap { name, .. } => FileSource::ConfigMap { name, key },
            FileSource::Secret { name, .. } => FileSource::Secret { name, key },
        });
    }
    Err(format!(
        "{path}: no configMap or secret volume is mounted there in container {:?}",
        container.name
    ))
}

/// Runs engine containers in process (see the module docs).
pub struct EngineRuntime {
    client: kube::Client,
    queue: Arc<dyn Queue>,
    ledger: Arc<EffectLedger>,
    seed: u64,
    started: AtomicU64,
    api_timeout: Duration,
    stop_timeout: Duration,
}

impl EngineRuntime {
    pub fn new(
        client: kube::Client,
        queue: Arc<dyn Queue>,
        seed: u64,
        api_timeout: Duration,
    ) -> Self {
        EngineRuntime {
            client,
            queue,
            ledger: Arc::new(EffectLedger::new()),
            seed,
            started: AtomicU64::new(0),
            api_timeout,
            stop_timeout: Duration::from_secs(30),
        }
    }

    /// Effects the simulated tools of every engine applied, and how many of them were
    /// duplicates (both must be what the tasks asked for: the tools count them, not the
    /// engine).
    pub fn effects(&self) -> (u64, u64) {
        (self.ledger.effects(), self.ledger.duplicate_effects())
    }
}

/// A running engine role.
struct EngineContainer {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    stats: Arc<Stats>,
    exited: Arc<OnceLock<String>>,
    stop_timeout: Duration,
}

impl Running for EngineContainer {
    fn ready(&self) -> Probe {
        if let Some(why) = self.exited.get() {
            return Probe::Exited(why.clone());
        }
        if self.task.is_finished() {
            return Probe::Exited("the engine stopped".into());
        }
        if self.stats.ready() {
            Probe::Ready
        } else {
            Probe::NotReady
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        let EngineContainer {
            stop,
            mut task,
            stop_timeout,
            ..
        } = *self;
        Box::pin(async move {
            let _ = stop.send(true);
            if tokio::time::timeout(stop_timeout, &mut task).await.is_err() {
                tracing::warn!("an engine did not stop within {stop_timeout:?}; aborted");
                task.abort();
            }
        })
    }
}

impl PodRuntime for EngineRuntime {
    fn runs(&self, pod: &Pod, container: &Container) -> bool {
        let sidecar = pod
            .spec
            .as_ref()
            .and_then(|s| s.init_containers.as_ref())
            .is_some_and(|ic| {
                ic.iter()
                    .any(|c| c.name == container.name && super::podstatus::is_sidecar(c))
            });
        engine_command(container, sidecar).is_some()
    }

    fn start(
        &self,
        pod: &Pod,
        container: &Container,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, String>> {
        let n = self.started.fetch_add(1, Ordering::Relaxed);
        let ctx = StartContext {
            client: self.client.clone(),
            queue: self.queue.clone(),
            ledger: self.ledger.clone(),
            seed: self.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            api_timeout: self.api_timeout,
            stop_timeout: self.stop_timeout,
        };
        let (pod, container) = (pod.clone(), container.clone());
        Box::pin(async move { ctx.start(&pod, &container).await })
    }
}

struct StartContext {
    client: kube::Client,
    queue: Arc<dyn Queue>,
    ledger: Arc<EffectLedger>,
    seed: u64,
    api_timeout: Duration,
    stop_timeout: Duration,
}

impl StartContext {
    async fn read(&self, namespace: &str, src: &FileSource) -> Result<String, String> {
        let missing = |what: &str, name: &str, key: &str| {
            format!("{what} {namespace}/{name} has no key {key:?}")
        };
        match src {
            FileSource::ConfigMap { name, key } => {
                let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), namespace);
                let cm = tokio::time::timeout(self.api_timeout, api.get(name))
                    .await
                    .map_err(|_| {
                        format!(
                            "configmap {namespace}/{name}: no answer within {:?}",
                            self.api_timeout
                        )
                    })?
                    .map_err(|e| format!("configmap {namespace}/{name}: {e}"))?;
                if let Some(v) = cm.data.as_ref().and_then(|d| d.get(key)) {
                    return Ok(v.clone());
                }
                cm.binary_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .ok_or_else(|| missing("configmap", name, key))
            }
            FileSource::Secret { name, key } => {
                let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let s = tokio::time::timeout(self.api_timeout, api.get(name))
                    .await
                    .map_err(|_| {
                        format!(
                            "secret {namespace}/{name}: no answer within {:?}",
                            self.api_timeout
                        )
                    })?
                    .map_err(|e| format!("secret {namespace}/{name}: {e}"))?;
                if let Some(v) = s.data.as_ref().and_then(|d| d.get(key)) {
                    return Ok(String::from_utf8_lossy(&v.0).into_owned());
                }
                s.string_data
                    .as_ref()
                    .and_then(|d| d.get(key))
                    .cloned()
                    .ok_or_else(|| missing("secret", name, key))
            }
        }
    }

    /// `R4_INTAKE_TOKEN` of the container: its value, or the Secret key it refers to.
    async fn intake_tokens(
        &self,
        namespace: &str,
        c: &Container,
    ) -> Result<Option<engine::auth::Tokens>, String> {
        let Some(var) = c
            .env
            .iter()
            .flatten()
            .find(|e| e.name == engine::auth::TOKEN_ENV)
        else {
            return Ok(None);
        };
        let text = if let Some(v) = &var.value {
            v.clone()
        } else if let Some(r) = var
            .value_from
            .as_ref()
            .and_then(|f| f.secret_key_ref.as_ref())
        {
            self.read(
                namespace,
                &FileSource::Secret {
                    name: r.name.clone(),
                    key: r.key.clone(),
                },
            )
            .await?
        } else {
            return Ok(None);
        };
        engine::auth::Tokens::parse(&text)
            .map(Some)
            .map_err(|e| format!("{}: {e}", engine::auth::TOKEN_ENV))
    }

    async fn start(self, pod: &Pod, c: &Container) -> Result<Box<dyn Running>, String> {
        let sidecar = super::podstatus::is_sidecar(c);
        let cmd = engine_command(c, sidecar).ok_or("not an engine container")??;
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let src = file_source(pod, c, &cmd.workflow_file)?;
        let text = self.read(&namespace, &src).await?;
        let cfg = WorkflowConfig::from_yaml(
            &cmd.workflow_file,
            &text,
            cmd.workflow.as_deref(),
            cmd.namespace.as_deref(),
        )
        .map_err(|e| e.to_string())?;
        let cfg = Arc::new(cfg);
        let id = cmd
            .engine_id
            .clone()
            .or_else(|| pod.metadata.name.clone())
            .unwrap_or_else(|| engine::engine_id("engine"));
        if let Err(e) = killswitch::publish_topology(
            self.queue.as_ref(),
            &cfg.keys,
            &killswitch::Topology::of(&cfg.spec),
        )
        .await
        {
            tracing::warn!(error = %e, "cannot publish the workflow's names for r4 kill");
        }
        let (stop, stop_rx) = watch::channel(false);
        let exited: Arc<OnceLock<String>> = Arc::new(OnceLock::new());
        let (stats, task) = match cmd.role {
            Role::Agent => {
                let sim_http = sim_agent_container(pod)
                    .map(|a| sim_agent_options(pod, a))
                    .transpose()?;
                self.agent(
                    &cfg,
                    cmd.agent.as_deref().unwrap_or(""),
                    &id,
                    sim_http,
                    stop_rx,
                )
                .await?
            }
            Role::Repair => {
                let role = RepairRole::new(cfg.clone(), self.queue.clone(), &id);
                let stats = role.stats();
                (
                    stats,
                    tokio::spawn(async move { role.run(stop_rx).await.map_err(|e| e.to_string()) }),
                )
            }
            Role::Intake => {
                let tokens = self.intake_tokens(&namespace, c).await?;
                if cfg.spec.intake.as_ref().is_some_and(|i| i.auth.is_some()) && tokens.is_none() {
                    return Err(format!(
                        "spec.intake.auth is set but {} is not: the intake would be open",
                        engine::auth::TOKEN_ENV
                    ));
                }
                let intake = Intake::with_options(
                    cfg.clone(),
                    self.queue.clone(),
                    &id,
                    engine::intake::IntakeOptions {
                        tokens,
                        ..Default::default()
                    },
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
                let addr = listener.local_addr().map_err(|e| e.to_string())?;
                tracing::info!(pod = %id, listen = %addr, workflow = %cfg.name, "intake listening");
                let stats = intake.stats();
                let stats_task = tokio::spawn(engine::consumer::publish_stats(
                    self.queue.clone(),
                    cfg.keys.clone(),
                    intake.stats(),
                    stop_rx.clone(),
                ));
                let router = intake.router();
                (
                    stats,
                    tokio::spawn(async move {
                        let r = engine::http::serve(listener, router, stop_rx).await;
                        let _ = stats_task.await;
                        r.map_err(|e| e.to_string())
                    }),
                )
            }
        };
        let why = exited.clone();
        let task = tokio::spawn(async move {
            let reason = match task.await {
                Ok(Ok(())) => "the engine stopped".to_string(),
                Ok(Err(e)) => e,
                Err(e) => format!("the engine panicked: {e}"),
            };
            let _ = why.set(reason);
        });
        tracing::info!(engine = %id, role = ?cmd.role, workflow = %format_args!("{}/{}", cfg.namespace, cfg.name), "engine started in process");
        Ok(Box::new(EngineContainer {
            stop,
            task,
            stats,
            exited,
            stop_timeout: self.stop_timeout,
        }))
    }

    /// The agent role of `agent` with its simulated agent and simulated tools, as `r4 run`
    /// builds them — or, when the pod's agent container is a sim agent (`sim_http`), that
    /// agent served over HTTP on loopback and delivered to as `r4 engine` delivers to an agent
    /// container, its tool calls through the proxy's HTTP front (the simulated tools behind).
    #[allow(clippy::type_complexity)]
    async fn agent(
        &self,
        cfg: &Arc<WorkflowConfig>,
        agent: &str,
        id: &str,
        sim_http: Option<Options>,
        stop_rx: watch::Receiver<bool>,
    ) -> Result<(Arc<Stats>, JoinHandle<Result<(), String>>), String> {
        let Some((i, spec)) = cfg
            .spec
            .agents
            .iter()
            .enumerate()
            .find(|(_, a)| a.name == agent)
        else {
            return Err(format!("agent {agent:?} is not in workflow {}", cfg.name));
        };
        if spec.simulate.is_none() && sim_http.is_none() {
            return Err(format!(
                "spec.agents[{i}].simulate: required by r4 dev: agent {agent:?} has no image to run here, describe it with a simulate block"
            ));
        }
        let origin = tokio::time::Instant::now();
        let mut sims: BTreeMap<String, Arc<SimTool>> = BTreeMap::new();
        for (j, t) in cfg.spec.tools.iter().enumerate() {
            if t.simulate.is_none() {
                if spec.tools.contains(&t.name) {
                    return Err(format!(
                        "spec.tools[{j}].simulate: required by r4 dev: tool {:?} is not called for real here, describe it with a simulate block",
                        t.name
                    ));
                }
                continue;
            }
            let tool = SimTool::new(t, self.seed ^ (100 + j as u64), origin, self.ledger.clone())
                .map_err(|e| format!("spec.tools[{j}].simulate: {e}"))?;
            sims.insert(t.name.clone(), Arc::new(tool));
        }
        let transport = |t: &ToolSpec| match sims.get(&t.name) {
            Some(s) => s.transport(),
            None => {
                let name = t.name.clone();
                tower::util::BoxCloneService::new(tower::service_fn(move |_| {
                    let name = name.clone();
                    async move {
                        Err::<crate::resilience::HttpResponse, _>(
                            format!("tool {name} is not simulated").into(),
                        )
                    }
                }))
            }
        };
        let proxy = Arc::new(
            cfg.tool_proxy(&transport, None, Some(self.seed))
                .map_err(|e| e.to_string())?,
        );
        let supervisor = tokio::spawn(tools::supervise(
            proxy.clone(),
            self.queue.clone(),
            cfg.clone(),
            id.to_string(),
            stop_rx.clone(),
        ));
        let (delivery, servers): (Arc<dyn engine::delivery::Delivery>, Vec<JoinHandle<()>>) =
            match sim_http {
                None => {
                    let terminal: Vec<String> = cfg
                        .terminal_agents()
                        .iter()
                        .map(|a| a.name.clone())
                        .collect();
                    let is_terminal = terminal.iter().any(|t| t == agent);
                    let finished = Arc::new(Finished::new(terminal));
                    let sim = SimAgent::new(spec, self.seed, proxy, finished, self.ledger.clone())
                        .map_err(|e| format!("spec.agents[{i}].simulate: {e}"))?
                        .terminal(is_terminal);
                    (Arc::new(sim), Vec::new())
                }
                Some(mut opts) => {
                    let bind = || async {
                        tokio::net::TcpListener::bind("127.0.0.1:0")
                            .await
                            .and_then(|l| l.local_addr().map(|a| (l, a)))
                            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))
                    };
                    // The proxy's HTTP front, as `r4 engine --tools-listen` serves it.
                    let (tools_listener, tools_addr) = bind().await?;
                    let tools_router = tools::http::router(proxy, spec.tools.clone());
                    let tools_server = {
                        let stop = stop_rx.clone();
                        tokio::spawn(async move {
                            if let Err(e) =
                                engine::http::serve(tools_listener, tools_router, stop).await
                            {
                                tracing::warn!(error = %e, "the tool proxy's HTTP front ended");
                            }
                        })
                    };
                    opts.tools_url = format!("http://{tools_addr}");
                    let (agent_listener, agent_addr) = bind().await?;
                    tracing::info!(engine = %id, agent = %opts.name, listen = %agent_addr, tools = %opts.tools_url, "sim-agent container serving POST /tasks");
                    let server = Arc::new(SimAgentServer::new(opts)?);
                    let agent_server = {
                        let stop = stop_rx.clone();
                        tokio::spawn(async move {
                            if let Err(e) = server.serve(agent_listener, stop).await {
                                tracing::warn!(error = %e, "the sim-agent container's server ended");
                            }
                        })
                    };
                    let http = cfg
                        .agent_delivery(agent, format!("http://{agent_addr}/tasks"))
                        .map_err(|e| format!("the sim-agent container's URL: {e}"))?;
                    (Arc::new(http), vec![tools_server, agent_server])
                }
            };
        let role = AgentRole::new(cfg.clone(), agent, self.queue.clone(), delivery, id)
            .map_err(|e| e.to_string())?;
        let stats = role.stats();
        let task = tokio::spawn(async move {
            let r = role.run(stop_rx).await.map_err(|e| e.to_string());
            let _ = supervisor.await;
            for s in servers {
                let _ = s.await;
            }
            r
        });
        Ok((stats, task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapVolumeSource, KeyToPath, PodSpec, Volume, VolumeMount,
    };

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn r4_images_are_recognised_by_their_repository() {
        for yes in [
            "r4",
            "r4:dev",
            "ghcr.io/acme/r4:0.1",
            "localhost:5000/r4",
            "r4@sha256:abc",
        ] {
            assert!(is_r4_image(yes), "{yes}");
        }
        for no in [
            "ghcr.io/acme/r4x:1",
            "ghcr.io/r4/agent:1",
            "redis:7",
            "localhost:5000/x",
        ] {
            assert!(!is_r4_image(no), "{no}");
        }
    }

    #[test]
    fn engine_arguments_parse_as_the_real_cli_reads_them() {
        let args = s(&[
            "--role",
            "agent",
            "--agent=investigation",
            "--workflow-file",
            "/etc/r4/workflow.yaml",
            "--redis",
            "redis://redis:6379",
            "--listen",
            "0.0.0.0:8080",
        ]);
        let cmd = parse_engine_args(&args).unwrap();
        assert_eq!(cmd.role, Role::Agent);
        assert_eq!(cmd.agent.as_deref(), Some("investigation"));
        assert_eq!(cmd.workflow_file, "/etc/r4/workflow.yaml");
        // The same arguments are accepted by `r4 engine` itself.
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            engine: crate::cli::engine::EngineArgs,
        }
        let mut argv = vec!["r4".to_string()];
        argv.extend(args);
        let real = Cli::try_parse_from(argv).unwrap();
        assert_eq!(real.engine.agent.as_deref(), Some("investigation"));

        assert!(
            parse_engine_args(&s(&["--role", "agent", "--workflow-file", "f"]))
                .unwrap_err()
                .contains("--agent")
        );
        assert!(
            parse_engine_args(&s(&["--role", "intake"]))
                .unwrap_err()
                .contains("--workflow-file")
        );
        assert!(
            parse_engine_args(&s(&["--role", "boss", "--workflow-file", "f"]))
                .unwrap_err()
                .contains("--role")
        );
        assert!(
            parse_engine_args(&s(&["--role", "repair", "--workflow-file", "f", "--fast"]))
                .unwrap_err()
                .contains("--fast")
        );
        assert!(
            parse_engine_args(&s(&["--role"]))
                .unwrap_err()
                .contains("needs a value")
        );
    }

    fn container(image: &str, command: Option<&[&str]>, args: &[&str]) -> Container {
        Container {
            name: "engine".into(),
            image: Some(image.into()),
            command: command.map(s),
            args: Some(s(args)),
            ..Default::default()
        }
    }

    #[test]
    fn engine_containers_are_found_by_image_or_as_sidecars_running_r4_engine() {
        let args = ["engine", "--role", "repair", "--workflow-file", "/w/f.yaml"];
        assert!(matches!(
            engine_command(&container("ghcr.io/acme/r4:dev", None, &args), false),
            Some(Ok(_))
        ));
        assert!(matches!(
            engine_command(
                &container("r4:dev", Some(&["/usr/local/bin/r4"][..]), &args),
                false
            ),
            Some(Ok(_))
        ));
        // Another subcommand of r4, or another image: not an engine.
        assert!(engine_command(&container("r4:dev", None, &["controller"]), false).is_none());
        assert!(engine_command(&container("ghcr.io/acme/agent:1", None, &args), false).is_none());
        // A native sidecar of any image that runs `r4 engine`.
        assert!(matches!(
            engine_command(
                &container("ghcr.io/acme/tools:1", Some(&["r4"][..]), &args),
                true
            ),
            Some(Ok(_))
        ));
        assert!(engine_command(&container("ghcr.io/acme/tools:1", None, &args), true).is_none());
        // Bad arguments are an engine that refuses to start.
        assert!(matches!(
            engine_command(&container("r4", None, &["engine", "--role", "x"]), false),
            Some(Err(_))
        ));
    }

    fn pod_with(volumes: Vec<Volume>, mounts: Vec<VolumeMount>) -> (Pod, Container) {
        let c = Container {
            name: "engine".into(),
            volume_mounts: Some(mounts),
            ..Default::default()
        };
        let p = Pod {
            spec: Some(PodSpec {
                containers: vec![c.clone()],
                volumes: Some(volumes),
                ..Default::default()
            }),
            ..Default::default()
        };
        (p, c)
    }

    fn cm_volume(name: &str, cm: &str, items: Option<Vec<KeyToPath>>) -> Volume {
        Volume {
            name: name.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cm.into(),
                items,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn mount(name: &str, path: &str, sub: Option<&str>) -> VolumeMount {
        VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            sub_path: sub.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn the_workflow_file_is_found_in_the_configmap_mounted_there() {
        let (p, c) = pod_with(
            vec![cm_volume("wf", "payments-r4", None)],
            vec![mount("wf", "/etc/r4/", None)],
        );
        assert_eq!(
            file_source(&p, &c, "/etc/r4/workflow.yaml"),
            Ok(FileSource::ConfigMap {
                name: "payments-r4".into(),
                key: "workflow.yaml".into()
            })
        );
        assert!(
            file_source(&p, &c, "/etc/other/workflow.yaml")
                .unwrap_err()
                .contains("no configMap")
        );
        // items map paths to keys; subPath mounts one key at one path.
        let (p, c) = pod_with(
            vec![
                cm_volume(
                    "wf",
                    "a",
                    Some(vec![KeyToPath {
                        key: "spec".into(),
                        path: "w.yaml".into(),
                        mode: None,
                        user: None,
                    }]),
                ),
                cm_volume("one", "b", None),
            ],
            vec![
                mount("wf", "/etc/r4", None),
                mount("one", "/etc/r4/override.yaml", Some("main")),
            ],
        );
        assert_eq!(
            file_source(&p, &c, "/etc/r4/w.yaml"),
            Ok(FileSource::ConfigMap {
                name: "a".into(),
                key: "spec".into()
            })
        );
        assert_eq!(
            file_source(&p, &c, "/etc/r4/override.yaml"),
            Ok(FileSource::ConfigMap {
                name: "b".into(),
                key: "main".into()
            })
        );
        assert!(
            file_source(&p, &c, "/etc/r4/x.yaml")
                .unwrap_err()
                .contains("no item")
        );
    }

    const WORKFLOW: &str = "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {name: pay}\nspec:\n  queue: {redis: {url: \"redis://x\"}}\n  tools:\n    - {name: bank, url: \"http://bank/mcp\", idempotent: true, simulate: {latency: {medianMs: 5}}}\n  agents:\n    - {name: a, image: i, consumes: in, produces: [out], tools: [bank], simulate: {latency: {medianMs: 5}, calls: [bank]}}\n    - {name: b, image: i, consumes: out}\n";

    fn engine_pod(agent: &str) -> (Pod, Container) {
        let c = Container {
            name: "engine".into(),
            image: Some("ghcr.io/acme/r4:dev".into()),
            args: Some(s(&[
                "engine",
                "--role",
                "agent",
                "--agent",
                agent,
                "--workflow-file",
                "/etc/r4/workflow.yaml",
                "--redis",
                "redis://redis:6379",
            ])),
            volume_mounts: Some(vec![mount("wf", "/etc/r4", None)]),
            ..Default::default()
        };
        let p = Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("pay-a-abc-xyz12".into()),
                namespace: Some("default".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![c.clone()],
                volumes: Some(vec![cm_volume("wf", "pay-r4", None)]),
                ..Default::default()
            }),
            status: None,
        };
        (p, c)
    }

    /// Answer the ConfigMap read with the workflow.
    async fn serve_configmap(api: &mut crate::devcluster::kubelet::fixtures::ApiServer) {
        let (req, _) = api.next().await;
        assert_eq!(
            req.uri().path(),
            "/api/v1/namespaces/default/configmaps/pay-r4"
        );
        api.reply(
            200,
            serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "pay-r4", "namespace": "default"},
                "data": {"workflow.yaml": WORKFLOW}
            }),
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_agent_pod_runs_the_real_engine_role_on_the_shared_queue() {
        use crate::devcluster::kubelet::fixtures::ApiServer;
        let (client, mut api) = ApiServer::new();
        let queue: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
        let rt = EngineRuntime::new(client, queue.clone(), 7, Duration::from_secs(10));
        let (pod, c) = engine_pod("a");
        assert!(rt.runs(&pod, &c));
        let server = tokio::spawn(async move {
            serve_configmap(&mut api).await;
            api
        });
        let running = rt.start(&pod, &c).await.unwrap();
        let _api = server.await.unwrap();
        assert_eq!(running.ready(), Probe::Ready);
        // A task submitted by an intake on the same queue is worked on by this engine: its
        // simulated agent calls the simulated bank through the real tool proxy.
        let cfg = Arc::new(WorkflowConfig::from_yaml("w", WORKFLOW, None, None).unwrap());
        let intake = Intake::new(cfg, queue.clone(), "intake-0");
        intake
            .submit(serde_json::json!({"n": 1}), None, None)
            .await
            .unwrap();
        let done = tokio::time::timeout(Duration::from_secs(60), async {
            while rt.effects().0 < 1 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(
            done.is_ok(),
            "the engine did not work the task within 60 s of virtual time"
        );
        assert_eq!(rt.effects(), (1, 0));
        running.stop().await;
    }

    /// An engine pod whose agent container is `image` (with `args` and `env`), beside the
    /// engine container of agent "a" (the agent has no `simulate:` need then).
    fn sim_agent_pod(image: &str, args: Option<&[&str]>, env: &[(&str, &str)]) -> (Pod, Container) {
        let (mut p, c) = engine_pod("a");
        let agent = Container {
            name: "agent".into(),
            image: Some(image.into()),
            args: args.map(s),
            env: Some(
                env.iter()
                    .map(|(n, v)| k8s_openapi::api::core::v1::EnvVar {
                        name: (*n).into(),
                        value: Some((*v).into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        };
        if let Some(spec) = p.spec.as_mut() {
            spec.containers.push(agent);
        }
        (p, c)
    }

    #[test]
    fn sim_agent_containers_are_found_by_image_or_r4_sim_agent_args() {
        let found = |image: &str, args: Option<&[&str]>| {
            let (p, _) = sim_agent_pod(image, args, &[]);
            sim_agent_container(&p).is_some()
        };
        assert!(found("r4-sim-agent:e2e", None));
        assert!(found(
            "registry.local:5000/team/r4-sim-agent@sha256:abc",
            None
        ));
        assert!(found("ghcr.io/acme/r4:dev", Some(&["sim-agent"])));
        assert!(!found("ghcr.io/acme/r4:dev", Some(&["engine"])));
        assert!(!found("ghcr.io/acme/resolver:1.2", None));
        assert!(!found("ghcr.io/acme/r4-sim-agent-fork:1", None));
        // Found but refused: flags r4 dev would not apply, a variable it cannot read.
        let (p, _) = sim_agent_pod(
            "r4-sim-agent:e2e",
            Some(&["sim-agent", "--error-rate", "1"]),
            &[],
        );
        let e = sim_agent_options(&p, sim_agent_container(&p).unwrap()).unwrap_err();
        assert!(e.contains("configured by its env"), "{e}");
        let (p, _) = sim_agent_pod("r4-sim-agent:e2e", None, &[("R4_SIM_ERROR_RATE", "2")]);
        let e = sim_agent_options(&p, sim_agent_container(&p).unwrap()).unwrap_err();
        assert!(e.contains("R4_SIM_ERROR_RATE"), "{e}");
        let (p, _) = sim_agent_pod("r4-sim-agent:e2e", None, &[("R4_SIM_LATENCY", "3ms")]);
        let o = sim_agent_options(&p, sim_agent_container(&p).unwrap()).unwrap();
        assert_eq!(
            (o.name.as_str(), o.latency.median_ms),
            ("pay-a-abc-xyz12", 3.0)
        );
    }

    /// A sim-agent container is run for real: the engine delivers over HTTP (the agent
    /// protocol) to the agent served on loopback, whose tool call goes through the proxy's
    /// HTTP front to the simulated bank — one effect per task.
    #[tokio::test]
    async fn a_sim_agent_container_is_served_over_the_real_agent_protocol() {
        use crate::devcluster::kubelet::fixtures::ApiServer;
        let (client, mut api) = ApiServer::new();
        let queue: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
        let rt = EngineRuntime::new(client, queue.clone(), 7, Duration::from_secs(10));
        let (pod, c) = sim_agent_pod(
            "r4-sim-agent:e2e",
            None,
            &[("R4_SIM_LATENCY", "1ms"), ("R4_SIM_CALLS", "bank")],
        );
        assert!(rt.runs(&pod, &c));
        let server = tokio::spawn(async move {
            serve_configmap(&mut api).await;
            api
        });
        let running = rt.start(&pod, &c).await.unwrap();
        let _api = server.await.unwrap();
        let cfg = Arc::new(WorkflowConfig::from_yaml("w", WORKFLOW, None, None).unwrap());
        let intake = Intake::new(cfg.clone(), queue.clone(), "intake-0");
        for n in 0..3 {
            intake
                .submit(serde_json::json!({"n": n}), None, None)
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while rt.effects().0 < 3 {
            assert!(
                std::time::Instant::now() < deadline,
                "3 tasks not worked through the sim agent within 20 s: effects {:?}",
                rt.effects()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rt.effects(), (3, 0), "one bank effect per task, none twice");
        // The agent's answer is what went on: the payload with the sim agent's record.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let out = loop {
            let out = queue
                .range(&cfg.keys.stream("out"), "-", "+", 0)
                .await
                .unwrap();
            if out.len() == 3 {
                break out;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{} outputs",
                out.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let text = format!("{out:?}");
        assert!(text.contains("r4_sim"), "{text}");
        running.stop().await;
    }

    /// The in-process engine follows the CircuitPolicies published for its workflow, as a
    /// pod's would: no restart, and its published stats say which version it runs.
    #[tokio::test(start_paused = true)]
    async fn an_agent_pod_takes_published_policies_without_a_restart() {
        use crate::devcluster::kubelet::fixtures::ApiServer;
        let (client, mut api) = ApiServer::new();
        let queue: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
        let rt = EngineRuntime::new(client, queue.clone(), 7, Duration::from_secs(10));
        let (pod, c) = engine_pod("a");
        let server = tokio::spawn(async move {
            serve_configmap(&mut api).await;
            api
        });
        let running = rt.start(&pod, &c).await.unwrap();
        let _api = server.await.unwrap();
        let keys = crate::queue::Keys::new("default", "pay");
        let policy: crate::api::policy::CircuitPolicySpec =
            serde_yaml::from_str("timeout: {perAttempt: 2s}").unwrap();
        let v = engine::policies::publish(
            queue.as_ref(),
            &keys,
            &std::collections::BTreeMap::from([("p".to_string(), policy)]),
        )
        .await
        .unwrap();
        let taken = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let stats = engine::stats::read_workflow(queue.as_ref(), &keys)
                    .await
                    .unwrap();
                if stats.engines.iter().any(|e| e.policy_version == v) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        assert!(
            taken.is_ok(),
            "the engine never reported policy version {v}"
        );
        assert_eq!(running.ready(), Probe::Ready);
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn an_engine_that_cannot_run_its_agent_or_read_its_workflow_crashes_with_the_reason() {
        use crate::devcluster::kubelet::fixtures::ApiServer;
        let (client, mut api) = ApiServer::new();
        let queue: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
        let rt = EngineRuntime::new(client, queue, 7, Duration::from_secs(10));
        // Agent b has no simulate block.
        let (pod, c) = engine_pod("b");
        let server = tokio::spawn(async move {
            serve_configmap(&mut api).await;
            // Then: the ConfigMap is not there.
            let (_, _) = api.next().await;
            api.reply(404, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404, "message": "configmaps \"pay-r4\" not found"}));
            api
        });
        let err = rt.start(&pod, &c).await.err().unwrap();
        assert!(
            err.starts_with("spec.agents[1].simulate: required by r4 dev"),
            "{err}"
        );
        let err = rt.start(&pod, &c).await.err().unwrap();
        assert!(err.contains("configmap default/pay-r4"), "{err}");
        let _api = server.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn intake_and_repair_pods_run_their_roles_and_an_open_intake_is_refused() {
        use crate::devcluster::kubelet::fixtures::ApiServer;
        use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, SecretKeySelector};
        let workflow = WORKFLOW.replace(
            "spec:\n",
            "spec:\n  intake: {enabled: true, auth: {tokenSecretRef: {name: intake-token, key: token}}}\n  repair: {enabled: true}\n",
        );
        let (client, mut api) = ApiServer::new();
        let queue: Arc<dyn Queue> = Arc::new(crate::queue::memory::MemoryQueue::new());
        let rt = EngineRuntime::new(client, queue, 7, Duration::from_secs(10));
        let role = |role: &str| {
            let (mut p, mut c) = engine_pod("a");
            c.args = Some(s(&[
                "engine",
                "--role",
                role,
                "--workflow-file",
                "/etc/r4/workflow.yaml",
            ]));
            p.spec.as_mut().unwrap().containers = vec![c.clone()];
            (p, c)
        };
        let w = workflow.clone();
        let server = tokio::spawn(async move {
            let configmap = serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "pay-r4", "namespace": "default"},
                "data": {"workflow.yaml": w}
            });
            // Repair; the open intake; the intake with its token from a Secret.
            for _ in 0..3 {
                api.next().await;
                api.reply(200, configmap.clone());
            }
            let (req, _) = api.next().await;
            assert_eq!(
                req.uri().path(),
                "/api/v1/namespaces/default/secrets/intake-token"
            );
            api.reply(
                200,
                serde_json::json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "intake-token", "namespace": "default"},
                    // base64 of "0123456789abcdef0123"
                    "data": {"token": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM="}
                }),
            );
            api
        });
        let (p, c) = role("repair");
        let repair = rt.start(&p, &c).await.unwrap();
        assert_eq!(repair.ready(), Probe::Ready);
        repair.stop().await;

        let (p, c) = role("intake");
        let err = rt.start(&p, &c).await.err().unwrap();
        assert!(err.contains("the intake would be open"), "{err}");

        let (mut p, mut c) = role("intake");
        c.env = Some(vec![EnvVar {
            name: "R4_INTAKE_TOKEN".into(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: "intake-token".into(),
                    key: "token".into(),
                    optional: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        }]);
        p.spec.as_mut().unwrap().containers = vec![c.clone()];
        let intake = rt.start(&p, &c).await.unwrap();
        assert_eq!(intake.ready(), Probe::Ready);
        intake.stop().await;
        let _api = server.await.unwrap();
    }
}
