//! `r4 kill` / `r4 resume` (through the Kubernetes API), `r4 rollback` and `r4 status`: what a
//! person does to a running AgentWorkflow — patch one field of its spec, or read its status.
//!
//! Owns which field each command patches (`spec.killSwitches.{all,agents.<a>,tools.<t>}`,
//! `spec.rollbackTo`), when a command refuses (a target or revision the workflow does not have),
//! what `--wait` waits for, and how the status reads for a person. Leaves to others: acting on
//! the patches and writing the status (the controller), reaching the API ([`super::kube`]),
//! the switch state in Redis (`r4 kill --redis`, [`super::engine::kill_switch`]) and how breaker
//! states are stored ([`crate::engine::breakers`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::kube::{FIELD_MANAGER, Kube, KubeArgs, one_line};
use super::{CliError, runtime};
use crate::api::workflow::{
    AgentWorkflow, AgentWorkflowStatus, KillSwitchStatus, KillSwitchesSpec,
};
use crate::engine::breakers::{BreakerRecord, BreakerState, BreakerStates};
use crate::engine::killswitch::{Target, Topology};
use crate::queue::Keys;
use crate::telemetry::redact::redact_url;

/// How often `--wait` reads the status again.
const POLL: Duration = Duration::from_millis(100);

/// Deadline of reading breaker states from Redis for `r4 status` (connect and read): a Redis
/// this machine cannot reach must not hold up the screen.
const REDIS_DEADLINE: Duration = Duration::from_secs(2);

/// `--wait` alone.
const DEFAULT_WAIT: &str = "30s";

/// Arguments of `r4 kill` and `r4 resume`.
#[derive(Debug, Clone, clap::Args)]
pub struct KillArgs {
    /// WORKFLOW (the whole workflow), WORKFLOW/AGENT or WORKFLOW/tool:TOOL.
    pub target: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Set the switch directly in this Redis instead of patching the spec: no cluster needed
    /// (the namespace is then the manifest's with -f, else `default`).
    #[arg(long, env = "R4_REDIS_URL", hide_env_values = true)]
    pub redis: Option<String>,
    /// With --redis: check the target against this manifest instead of the names the
    /// workflow's engines published in Redis (for a workflow none of whose engines has started).
    #[arg(short = 'f', long = "file", value_name = "WORKFLOW.yaml")]
    pub file: Option<PathBuf>,
    /// Wait until every engine acknowledged the switch (`--wait` alone: 30s; `--wait=2m`).
    #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
          default_missing_value = DEFAULT_WAIT, value_parser = parse_wait)]
    pub wait: Option<Duration>,
}

/// Arguments of `r4 rollback`.
#[derive(Debug, Clone, clap::Args)]
pub struct RollbackArgs {
    /// The AgentWorkflow.
    pub workflow: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// The revision to apply again (default: the newest Healthy one older than the current).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
    pub to: Option<i64>,
    /// Wait until the controller applied the revision (`--wait` alone: 30s; `--wait=2m`).
    #[arg(long, value_name = "DURATION", num_args = 0..=1, require_equals = true,
          default_missing_value = DEFAULT_WAIT, value_parser = parse_wait)]
    pub wait: Option<Duration>,
}

/// Arguments of `r4 status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// The AgentWorkflow.
    pub workflow: String,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Read breaker states from this Redis (default: the spec's queue.redis, its urlSecretRef
    /// read through the API).
    #[arg(long, env = "R4_REDIS_URL", hide_env_values = true)]
    pub redis: Option<String>,
    /// Print one JSON object (status and breakers) instead of the screen.
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

/// The switch's key in `status.killSwitches`: `all`, the agent's name, or `tool:<name>`.
pub fn switch_name(target: &Target) -> String {
    match target {
        Target::All => "all".into(),
        Target::Agent(a) => a.clone(),
        Target::Tool(t) => format!("tool:{t}"),
    }
}

/// Whether the spec engages the switch (absent = released).
pub fn spec_engaged(ks: Option<&KillSwitchesSpec>, target: &Target) -> bool {
    let Some(ks) = ks else { return false };
    match target {
        Target::All => ks.all,
        Target::Agent(a) => ks.agents.get(a).copied().unwrap_or(false),
        Target::Tool(t) => ks.tools.get(t).copied().unwrap_or(false),
    }
}

/// The JSON merge patch that sets one switch and touches nothing else.
pub fn switch_patch(target: &Target, engage: bool) -> Value {
    let switches = match target {
        Target::All => json!({"all": engage}),
        Target::Agent(a) => json!({"agents": {a: engage}}),
        Target::Tool(t) => json!({"tools": {t: engage}}),
    };
    json!({"spec": {"killSwitches": switches}})
}

/// Whether the status shows the switch in state `engage` acknowledged by every engine. When
/// the status already showed that state before the patch (a stale status: the previous change
/// not yet reconciled), only a later state version counts.
pub fn switch_settled(
    entry: Option<&KillSwitchStatus>,
    engage: bool,
    newer_than: Option<i64>,
) -> bool {
    entry.is_some_and(|e| {
        e.engaged == engage
            && e.acknowledged == e.expected
            && e.state_version
                .is_some_and(|v| newer_than.is_none_or(|old| v > old))
    })
}

/// What the status says of one switch, for a person.
fn describe_switch(entry: Option<&KillSwitchStatus>, now_ms: i64) -> String {
    let Some(e) = entry else {
        return "no entry for it yet (is the controller running?)".into();
    };
    let mut s = String::from(if e.engaged { "engaged" } else { "released" });
    if let (true, Some(since)) = (e.engaged, &e.since) {
        let _ = write!(s, " since {since}");
        if let Some(age) = age_of(since, now_ms) {
            let _ = write!(s, " ({age} ago)");
        }
    }
    let _ = write!(
        s,
        ", acknowledged by {}/{} engines",
        e.acknowledged, e.expected
    );
    match e.state_version {
        Some(v) => {
            let _ = write!(s, " (state version {v})");
        }
        None => s.push_str(" (no state version yet)"),
    }
    s
}

/// `r4 kill` (`engage`) / `r4 resume`: through the API, or directly in Redis with `--redis`.
pub fn kill(args: KillArgs, engage: bool) -> Result<ExitCode, CliError> {
    if let Some(url) = args.redis.as_deref() {
        if args.wait.is_some() {
            return Err(CliError::Usage(
                "--wait reads the workflow's status through the Kubernetes API; it does not apply with --redis".into(),
            ));
        }
        return super::engine::kill_switch(
            &args.target,
            Some(url),
            args.kube.namespace.as_deref(),
            args.file.as_deref(),
            engage,
        );
    }
    if args.file.is_some() {
        return Err(CliError::Usage(
            "-f applies only with --redis: through the Kubernetes API the workflow's spec names its agents and tools".into(),
        ));
    }
    let (workflow, target) = super::parse_target(&args.target)?;
    runtime()?.block_on(kill_via_api(&args, &workflow, &target, engage))
}

async fn kill_via_api(
    args: &KillArgs,
    workflow: &str,
    target: &Target,
    engage: bool,
) -> Result<ExitCode, CliError> {
    let kube = connect_or_hint(&args.kube).await?;
    let aw = get_workflow(&kube, workflow).await?;
    let name = format!("{}/{workflow}", kube.namespace);
    Topology::of(&aw.spec)
        .check(&name, target)
        .map_err(CliError::Usage)?;
    let key = switch_name(target);
    let before = aw
        .status
        .as_ref()
        .and_then(|s| s.kill_switches.get(&key))
        .cloned();
    let state = if engage { "engaged" } else { "released" };
    let started = Instant::now();
    let already = spec_engaged(aw.spec.kill_switches.as_ref(), target) == engage;
    if already {
        println!("kill switch {key} already {state} on {name}");
    } else {
        merge_patch(&kube, workflow, switch_patch(target, engage)).await?;
        println!("kill switch {key} {state} on {name}");
    }
    let Some(wait) = args.wait else {
        return Ok(ExitCode::SUCCESS);
    };
    // A status that already showed the new state before we patched is stale: wait for a
    // later state version. Without a patch the current answer is the one to report.
    let newer_than = before
        .as_ref()
        .filter(|b| !already && b.engaged == engage)
        .and_then(|b| b.state_version);
    let settled = poll_until(&kube, workflow, started + wait, |aw| {
        let entry = aw.status.as_ref().and_then(|s| s.kill_switches.get(&key));
        switch_settled(entry, engage, newer_than)
    })
    .await?;
    let entry = settled
        .last
        .as_ref()
        .and_then(|aw| aw.status.as_ref())
        .and_then(|s| s.kill_switches.get(&key));
    match entry {
        Some(e) if settled.done => {
            println!(
                "kill switch {key} on {name} acknowledged by {}/{} engines in {:.1}s",
                e.acknowledged,
                e.expected,
                started.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        _ => Err(CliError::Internal(format!(
            "kill switch {key} on {name} not acknowledged within {wait:?}: status says {}",
            describe_switch(entry, now_ms())
        ))),
    }
}

/// JSON-merge-patch the workflow as the CLI's field manager: only the fields in `patch` change.
async fn merge_patch(kube: &Kube, workflow: &str, patch: Value) -> Result<(), CliError> {
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    kube.call(
        format_args!("cannot patch agentworkflow {}/{workflow}", kube.namespace),
        kube.api::<AgentWorkflow>()
            .patch(workflow, &params, &Patch::Merge(patch)),
    )
    .await?;
    Ok(())
}

/// What [`poll_until`] saw.
struct Polled {
    /// Whether the condition held before the deadline.
    done: bool,
    /// The workflow as last read (`None` if no read finished before the deadline).
    last: Option<AgentWorkflow>,
}

/// Read the workflow every [`POLL`] until `done` holds for it or `deadline` passes. Only an
/// API failure is an error; the deadline is an answer (`done: false`, what was last read).
async fn poll_until(
    kube: &Kube,
    workflow: &str,
    deadline: Instant,
    done: impl Fn(&AgentWorkflow) -> bool,
) -> Result<Polled, CliError> {
    let api = kube.api::<AgentWorkflow>();
    let mut last = None;
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(Polled { done: false, last });
        }
        let read = kube
            .call_within(
                remaining,
                format_args!("cannot read agentworkflow {}/{workflow}", kube.namespace),
                api.get_opt(workflow),
            )
            .await;
        let aw = match read {
            Ok(Some(aw)) => aw,
            Ok(None) => return Err(not_found(kube, workflow)),
            // The deadline, not the API, ended this read.
            Err(_) if Instant::now() >= deadline => return Ok(Polled { done: false, last }),
            Err(e) => return Err(e),
        };
        if done(&aw) {
            return Ok(Polled {
                done: true,
                last: Some(aw),
            });
        }
        last = Some(aw);
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// The revision `r4 rollback` applies: `to` when the workflow has it, else the newest Healthy
/// revision older than the current one. The error is one line listing the revisions.
pub fn rollback_target(
    name: &str,
    status: Option<&AgentWorkflowStatus>,
    to: Option<i64>,
) -> Result<(i64, i64), String> {
    let not_reconciled =
        || format!("{name} has no revisions yet: the controller has not reconciled it");
    let status = status.ok_or_else(not_reconciled)?;
    let current = status.current_revision.ok_or_else(not_reconciled)?;
    let listed = || {
        status
            .revisions
            .iter()
            .map(|r| format!("{} {}", r.revision, r.phase))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match to {
        Some(n) if status.revisions.iter().any(|r| r.revision == n) => Ok((n, current)),
        Some(n) => Err(format!(
            "revision {n} is not a revision of {name} (revisions: {})",
            listed()
        )),
        None => status
            .revisions
            .iter()
            .filter(|r| r.revision < current && r.phase == "Healthy")
            .map(|r| r.revision)
            .max()
            .map(|n| (n, current))
            .ok_or_else(|| {
                format!(
                    "no Healthy revision of {name} older than the current {current} (revisions: {})",
                    listed()
                )
            }),
    }
}

/// `r4 rollback WORKFLOW [--to N] [--wait[=D]]`.
pub fn rollback(args: RollbackArgs) -> Result<ExitCode, CliError> {
    runtime()?.block_on(rollback_via_api(&args))
}

async fn rollback_via_api(args: &RollbackArgs) -> Result<ExitCode, CliError> {
    let kube = Kube::connect(&args.kube).await?;
    let workflow = args.workflow.as_str();
    let aw = get_workflow(&kube, workflow).await?;
    let name = format!("{}/{workflow}", kube.namespace);
    let (to, current) =
        rollback_target(&name, aw.status.as_ref(), args.to).map_err(CliError::Usage)?;
    // A pending request for another revision is replaced, even by the current one: that is
    // how a mistaken `r4 rollback` is taken back before the controller acts on it.
    let pending = aw.spec.rollback_to.as_ref().map(|r| r.revision);
    if to == current && pending.is_none_or(|p| p == to) {
        println!("{name} is already at revision {to}");
        return Ok(ExitCode::SUCCESS);
    }
    let started = Instant::now();
    merge_patch(
        &kube,
        workflow,
        json!({"spec": {"rollbackTo": {"revision": to}}}),
    )
    .await?;
    match pending {
        Some(p) if p != to => println!(
            "rollback of {name} to revision {to} requested (current: {current}; replaces the pending request for revision {p})"
        ),
        _ => println!("rollback of {name} to revision {to} requested (current: {current})"),
    }
    let Some(wait) = args.wait else {
        return Ok(ExitCode::SUCCESS);
    };
    let applied = |aw: &AgentWorkflow| {
        (
            aw.status.as_ref().and_then(|s| s.current_revision),
            aw.spec.rollback_to.is_some(),
        )
    };
    let polled = poll_until(&kube, workflow, started + wait, |aw| {
        applied(aw) == (Some(to), false)
    })
    .await?;
    if polled.done {
        println!(
            "{name} rolled back to revision {to} in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let (cur, pending) = polled.last.as_ref().map_or((None, true), applied);
    Err(CliError::Internal(format!(
        "rollback of {name} to revision {to} not done within {wait:?}: current revision {}, spec.rollbackTo {}",
        cur.map_or("unknown".into(), |c| c.to_string()),
        if pending { "still set" } else { "removed" }
    )))
}

/// Breaker states as read for `r4 status`: by tool, or why they are unknown.
pub type Breakers = Result<BTreeMap<String, BreakerRecord>, String>;

/// `r4 status WORKFLOW [--json]`.
pub fn status(args: StatusArgs) -> Result<ExitCode, CliError> {
    runtime()?.block_on(status_via_api(&args))
}

async fn status_via_api(args: &StatusArgs) -> Result<ExitCode, CliError> {
    let kube = Kube::connect(&args.kube).await?;
    let aw = get_workflow(&kube, &args.workflow).await?;
    let breakers = read_breakers(&kube, &aw, args.redis.as_deref()).await;
    if args.json {
        let v = status_json(&kube.namespace, &aw, &breakers);
        println!(
            "{}",
            serde_json::to_string(&v)
                .map_err(|e| CliError::Internal(format!("cannot print the status: {e}")))?
        );
    } else {
        print!("{}", render(&kube.namespace, &aw, &breakers, now_ms()));
    }
    Ok(ExitCode::SUCCESS)
}

/// The workflow's published breaker states: from `redis`, else the spec's URL (or its Secret,
/// read through the API). Never fails: what cannot be read is the reason they are unknown.
async fn read_breakers(kube: &Kube, aw: &AgentWorkflow, redis: Option<&str>) -> Breakers {
    let url = match redis {
        Some(u) => u.to_owned(),
        None => redis_url_of(kube, aw).await?,
    };
    let keys = Keys::new(&kube.namespace, &aw_name(aw));
    let read = async {
        let config = crate::queue::redis::RedisConfig {
            op_timeout: REDIS_DEADLINE,
            connect_timeout: REDIS_DEADLINE,
        };
        let q = crate::queue::redis::RedisQueue::connect_with(&url, config)
            .await
            .map_err(|e| e.to_string())?;
        BreakerStates::new(&q, &keys)
            .read_all()
            .await
            .map_err(|e| e.to_string())
    };
    let unreachable = |why: String| {
        one_line(&format!(
            "Redis not reachable from here: {}: {why}",
            redact_url(&url)
        ))
    };
    match tokio::time::timeout(REDIS_DEADLINE, read).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(unreachable(e)),
        Err(_) => Err(unreachable(format!("no answer within {REDIS_DEADLINE:?}"))),
    }
}

/// The spec's Redis URL; a `urlSecretRef` is read through the API (if this user may).
async fn redis_url_of(kube: &Kube, aw: &AgentWorkflow) -> Result<String, String> {
    let redis = &aw.spec.queue.redis;
    if let Some(url) = &redis.url {
        return Ok(url.clone());
    }
    let Some(r) = &redis.url_secret_ref else {
        return Err("the spec names no Redis (queue.redis)".into());
    };
    let what = format!("Secret {}/{}", kube.namespace, r.name);
    let secret = kube
        .call(
            format_args!("cannot read {what}"),
            kube.api::<k8s_openapi::api::core::v1::Secret>()
                .get(&r.name),
        )
        .await
        .map_err(|e| e.to_string())?;
    let value = secret
        .data
        .as_ref()
        .and_then(|d| d.get(&r.key))
        .ok_or_else(|| format!("{what} has no key {:?}", r.key))?;
    String::from_utf8(value.0.clone())
        .map(|s| s.trim().to_owned())
        .map_err(|_| format!("{what} key {:?} is not UTF-8", r.key))
}

fn aw_name(aw: &AgentWorkflow) -> String {
    aw.metadata.name.clone().unwrap_or_default()
}

/// The one JSON object of `r4 status --json`.
pub fn status_json(namespace: &str, aw: &AgentWorkflow, breakers: &Breakers) -> Value {
    let desired: BTreeMap<&str, i32> = aw
        .spec
        .agents
        .iter()
        .map(|a| (a.name.as_str(), a.replicas.unwrap_or(1)))
        .collect();
    let (breakers, breakers_error) = match breakers {
        Ok(b) => (json!(b), Value::Null),
        Err(e) => (Value::Null, json!(e)),
    };
    json!({
        "namespace": namespace,
        "name": aw_name(aw),
        "generation": aw.metadata.generation,
        "reconciled": aw.status.is_some(),
        "status": aw.status,
        "desired_replicas": desired,
        "slo_target": aw.spec.slo,
        "kill_switches_spec": aw.spec.kill_switches,
        "breakers": breakers,
        "breakers_error": breakers_error,
    })
}

/// The screen of `r4 status`: one page, for a person.
pub fn render(namespace: &str, aw: &AgentWorkflow, breakers: &Breakers, now_ms: i64) -> String {
    let name = format!("{namespace}/{}", aw_name(aw));
    let mut out = String::new();
    let w = &mut out;
    let Some(st) = &aw.status else {
        let _ = writeln!(
            w,
            "AgentWorkflow {name}: not reconciled yet (no status: is the controller running?)"
        );
        let _ = writeln!(w, "agents (desired):");
        for a in &aw.spec.agents {
            let _ = writeln!(w, "  {:<24} {}", a.name, a.replicas.unwrap_or(1));
        }
        render_breakers(w, aw, breakers, now_ms);
        return out;
    };
    let _ = write!(w, "AgentWorkflow {name}");
    match (aw.metadata.generation, st.observed_generation) {
        (Some(g), Some(o)) if o < g => {
            let _ = writeln!(
                w,
                "  (status is of generation {o}, the spec is at {g}: the controller has not caught up)"
            );
        }
        (Some(g), _) => {
            let _ = writeln!(w, "  (generation {g})");
        }
        _ => {
            let _ = writeln!(w);
        }
    }

    // Conditions: the three a person asks first, then the rest as the controller wrote them.
    let order = ["Ready", "Valid", "Degraded"];
    let mut conditions: Vec<_> = st.conditions.iter().collect();
    conditions.sort_by_key(|c| {
        order
            .iter()
            .position(|o| *o == c.type_)
            .unwrap_or(order.len())
    });
    let _ = writeln!(w, "conditions:");
    if conditions.is_empty() {
        let _ = writeln!(w, "  none yet");
    }
    for c in conditions {
        let _ = writeln!(
            w,
            "  {:<18} {:<6} {}{}",
            c.type_,
            c.status,
            c.reason,
            if c.message.is_empty() {
                String::new()
            } else {
                format!(": {}", one_line(&c.message))
            }
        );
    }

    // Revisions, newest first; the list is bounded so the screen stays one screen.
    let _ = write!(
        w,
        "revision: {}",
        st.current_revision
            .map_or("none yet".into(), |r| r.to_string())
    );
    if !st.revisions.is_empty() {
        let shown: Vec<String> = st
            .revisions
            .iter()
            .take(6)
            .map(|r| {
                let mut s = format!("{} {}", r.revision, r.phase);
                if let Some(reason) = &r.reason {
                    let _ = write!(s, " ({})", one_line(reason));
                }
                if Some(r.revision) == st.current_revision {
                    s.push_str(" [current]");
                }
                s
            })
            .collect();
        let _ = write!(w, "  (revisions: {}", shown.join(", "));
        if st.revisions.len() > 6 {
            let _ = write!(w, ", {} older", st.revisions.len() - 6);
        }
        let _ = write!(w, ")");
    }
    if let Some(r) = &aw.spec.rollback_to {
        let _ = write!(w, "  rollback to {} requested", r.revision);
    }
    let _ = writeln!(w);

    // Agents: ready of desired, and their switches.
    let _ = writeln!(w, "agents:                  READY    KILL SWITCH");
    for a in &aw.spec.agents {
        let desired = a.replicas.unwrap_or(1);
        let s = st.agents.iter().find(|s| s.name == a.name);
        let ready = s.map_or("?".into(), |s| s.ready_replicas.to_string());
        let switch = match s {
            Some(s) if s.kill_switch.engaged => "engaged",
            Some(_) => "off",
            None => "?",
        };
        let _ = writeln!(
            w,
            "  {:<22} {:<8} {switch}",
            a.name,
            format!("{ready}/{desired}")
        );
    }

    // Kill switches: what the status says, and where the spec asks for something else.
    let spec = crate::engine::killswitch::SpecSwitches::from_spec(aw.spec.kill_switches.as_ref());
    let mut names: Vec<String> = st.kill_switches.keys().cloned().collect();
    let wanted = spec
        .all
        .then(|| "all".to_owned())
        .into_iter()
        .chain(spec.agents.iter().cloned())
        .chain(spec.tools.iter().map(|t| format!("tool:{t}")));
    for n in wanted {
        if !names.contains(&n) {
            names.push(n);
        }
    }
    let _ = write!(w, "kill switches:");
    if names.is_empty() {
        let _ = writeln!(w, " none engaged");
    } else {
        let _ = writeln!(w);
    }
    for n in names {
        let entry = st.kill_switches.get(&n);
        let wants = match n.strip_prefix("tool:") {
            Some(t) => spec.tools.contains(t),
            None if n == "all" => spec.all,
            None => spec.agents.contains(&n),
        };
        let mut line = describe_switch(entry, now_ms);
        if entry.is_some_and(|e| e.engaged != wants) {
            let _ = write!(
                line,
                "; the spec says {}, not applied yet",
                if wants { "engaged" } else { "released" }
            );
        }
        let _ = writeln!(w, "  {n:<22} {line}");
    }

    match &st.queue {
        Some(q) => {
            let _ = writeln!(
                w,
                "queue: depth {}, pending {}, DLQ {}{}",
                q.depth,
                q.pending,
                q.dlq_depth,
                if q.dlq_depth > 0 {
                    format!(" (oldest {} old)", age(q.oldest_dlq_age_seconds))
                } else {
                    String::new()
                }
            );
        }
        None => {
            let _ = writeln!(w, "queue: not measured yet");
        }
    }
    render_breakers(w, aw, breakers, now_ms);

    let target = aw.spec.slo.as_ref();
    match &st.slo {
        Some(s) => {
            let _ = write!(w, "SLO: success rate {}", percent(s.success_rate));
            if let Some(t) = target {
                let _ = write!(
                    w,
                    " (target {}{})",
                    percent(t.success_rate),
                    if s.success_rate < t.success_rate {
                        ", MISSED"
                    } else {
                        ""
                    }
                );
            }
            let _ = write!(w, ", p95 {:.0} ms", s.p95_latency_ms);
            if let Some(t) = target.and_then(|t| t.p95_latency_ms) {
                let _ = write!(
                    w,
                    " (target {t} ms{})",
                    if s.p95_latency_ms > t as f64 {
                        ", MISSED"
                    } else {
                        ""
                    }
                );
            }
            let _ = writeln!(
                w,
                ", error budget remaining {}{}",
                percent(s.error_budget_remaining),
                if s.error_budget_remaining <= 0.0 {
                    " (SPENT)"
                } else {
                    ""
                }
            );
        }
        None => {
            let _ = writeln!(w, "SLO: not measured yet");
        }
    }
    match &st.incident_cost {
        Some(c) => {
            let _ = writeln!(
                w,
                "incident cost: failure rate {}, {:.2} per day",
                percent(c.failure_rate),
                c.daily_cost
            );
        }
        None => {
            let _ = writeln!(w, "incident cost: not measured yet");
        }
    }
    out
}

fn render_breakers(w: &mut String, aw: &AgentWorkflow, breakers: &Breakers, now_ms: i64) {
    let b = match breakers {
        Err(e) => {
            let _ = writeln!(w, "breakers: unknown ({e})");
            return;
        }
        Ok(b) => b,
    };
    if aw.spec.tools.is_empty() && b.is_empty() {
        let _ = writeln!(w, "breakers: none (no tools)");
        return;
    }
    let mut parts = Vec::new();
    let tools = aw.spec.tools.iter().map(|t| t.name.clone()).chain(
        b.keys()
            .filter(|k| !aw.spec.tools.iter().any(|t| &t.name == *k))
            .cloned(),
    );
    for tool in tools {
        parts.push(match b.get(&tool) {
            None => format!("{tool} no recent record"),
            Some(r) => {
                let state = match r.state {
                    BreakerState::Closed => "closed",
                    BreakerState::Open => "OPEN",
                    BreakerState::HalfOpen => "half-open",
                };
                let mut s = format!("{tool} {state}");
                if r.state != BreakerState::Closed {
                    let since =
                        now_ms.saturating_sub(i64::try_from(r.since_ms).unwrap_or(i64::MAX));
                    let _ = write!(
                        s,
                        " for {} (failure rate {})",
                        age(since / 1000),
                        percent(r.failure_rate)
                    );
                }
                s
            }
        });
    }
    let _ = writeln!(w, "breakers: {}", parts.join(", "));
}

/// Two decimals where one would hide the difference (99.91% against 99.5%, 0.35%).
fn percent(x: f64) -> String {
    let p = x * 100.0;
    if (p != 100.0 && p > 99.0) || (p != 0.0 && p.abs() < 1.0) {
        format!("{p:.2}%")
    } else {
        format!("{p:.1}%")
    }
}

/// `45s`, `12m`, `3h4m`, `2d3h`.
fn age(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h{}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// How long ago an RFC 3339 time was, if it parses.
fn age_of(rfc3339: &str, now_ms: i64) -> Option<String> {
    let t: k8s_openapi::jiff::Timestamp = rfc3339.parse().ok()?;
    Some(age((now_ms - t.as_millisecond()) / 1000))
}

fn now_ms() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_millisecond()
}

/// [`Kube::connect`], whose "no kubeconfig" refusal also points at `--redis`.
async fn connect_or_hint(args: &KubeArgs) -> Result<Kube, CliError> {
    Kube::connect(args).await.map_err(|e| match e {
        CliError::Usage(m) if m.starts_with("no kubeconfig found") => CliError::Usage(format!(
            "{m}; or pass --redis URL to set the switch directly in Redis"
        )),
        other => other,
    })
}

/// Read the workflow; absent is one line naming namespace/name.
async fn get_workflow(kube: &Kube, workflow: &str) -> Result<AgentWorkflow, CliError> {
    kube.call(
        format_args!("cannot read agentworkflow {}/{workflow}", kube.namespace),
        kube.api::<AgentWorkflow>().get_opt(workflow),
    )
    .await?
    .ok_or_else(|| not_found(kube, workflow))
}

fn not_found(kube: &Kube, workflow: &str) -> CliError {
    CliError::Usage(format!(
        "agentworkflow {}/{workflow} not found (see `kubectl get aw -A`)",
        kube.namespace
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::workflow::RevisionStatus;

    fn status(current: i64, revs: &[(i64, &str)]) -> AgentWorkflowStatus {
        AgentWorkflowStatus {
            current_revision: Some(current),
            revisions: revs
                .iter()
                .map(|(n, p)| RevisionStatus {
                    revision: *n,
                    hash: None,
                    phase: (*p).into(),
                    reason: None,
                })
                .collect(),
            ..AgentWorkflowStatus::default()
        }
    }

    #[test]
    fn rollback_picks_the_newest_healthy_older_revision() {
        let s = status(3, &[(3, "Failed"), (2, "Healthy"), (1, "Healthy")]);
        assert_eq!(rollback_target("d/w", Some(&s), None), Ok((2, 3)));
        assert_eq!(rollback_target("d/w", Some(&s), Some(1)), Ok((1, 3)));
        assert_eq!(
            rollback_target("d/w", Some(&s), Some(9)),
            Err(
                "revision 9 is not a revision of d/w (revisions: 3 Failed, 2 Healthy, 1 Healthy)"
                    .into()
            )
        );
        // A rollback to 2 that failed, then current 2 again: 1 is Failed, 3 is newer.
        let s = status(2, &[(3, "Healthy"), (2, "Healthy"), (1, "Failed")]);
        assert_eq!(
            rollback_target("d/w", Some(&s), None),
            Err("no Healthy revision of d/w older than the current 2 (revisions: 3 Healthy, 2 Healthy, 1 Failed)".into())
        );
        assert!(rollback_target("d/w", None, None).is_err_and(|e| e.contains("not reconciled")));
    }

    #[test]
    fn a_switch_is_settled_only_when_every_engine_acknowledged_a_fresh_state() {
        let e = |engaged, ack, exp, v: Option<i64>| KillSwitchStatus {
            engaged,
            since: None,
            state_version: v,
            acknowledged: ack,
            expected: exp,
        };
        assert!(switch_settled(Some(&e(true, 3, 3, Some(4))), true, None));
        assert!(!switch_settled(Some(&e(true, 2, 3, Some(4))), true, None));
        assert!(!switch_settled(Some(&e(true, 3, 3, None)), true, None));
        assert!(!switch_settled(Some(&e(false, 3, 3, Some(4))), true, None));
        assert!(!switch_settled(None, true, None));
        // Stale: the status showed version 4 engaged before the patch.
        assert!(!switch_settled(
            Some(&e(true, 3, 3, Some(4))),
            true,
            Some(4)
        ));
        assert!(switch_settled(Some(&e(true, 3, 3, Some(5))), true, Some(4)));
    }

    #[test]
    fn the_screen_says_when_the_status_lags_the_spec() {
        let mut aw: AgentWorkflow = serde_yaml::from_str(
            "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {name: pay, generation: 3}\nspec:\n  queue: {redis: {url: \"redis://r\"}}\n  agents: [{name: a, image: i, consumes: in}]\n  killSwitches: {all: true, agents: {a: false}}\n",
        )
        .unwrap();
        aw.status = Some(AgentWorkflowStatus {
            observed_generation: Some(2),
            kill_switches: [(
                "a".to_owned(),
                KillSwitchStatus {
                    engaged: true,
                    since: Some("2026-01-01T00:00:00Z".into()),
                    state_version: Some(9),
                    acknowledged: 0,
                    expected: 2,
                },
            )]
            .into(),
            ..AgentWorkflowStatus::default()
        });
        let now = "2026-01-01T00:05:00Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .unwrap()
            .as_millisecond();
        let screen = render(
            "ns",
            &aw,
            &Err("Redis not reachable from here: x".into()),
            now,
        );
        for says in [
            "AgentWorkflow ns/pay  (status is of generation 2, the spec is at 3: the controller has not caught up)",
            "  a                      engaged since 2026-01-01T00:00:00Z (5m ago), acknowledged by 0/2 engines (state version 9); the spec says released, not applied yet",
            "  all                    no entry for it yet (is the controller running?)",
            "  a                      ?/1      ?",
            "breakers: unknown (Redis not reachable from here: x)",
            "SLO: not measured yet",
        ] {
            assert!(screen.contains(says), "{screen}\nshould say {says:?}");
        }
    }

    #[test]
    fn targets_and_patches() {
        assert_eq!(
            super::super::parse_target("pay/tool:bank").ok(),
            Some(("pay".into(), Target::Tool("bank".into())))
        );
        for bad in ["", "/a", "pay/", "pay/tool:"] {
            assert!(super::super::parse_target(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            switch_patch(&Target::Agent("a".into()), false),
            json!({"spec": {"killSwitches": {"agents": {"a": false}}}})
        );
        assert_eq!(switch_name(&Target::Tool("bank".into())), "tool:bank");
        assert_eq!(age(59), "59s");
        assert_eq!(age(3_700), "1h1m");
        assert_eq!(percent(0.9991), "99.91%");
        assert_eq!(percent(0.82), "82.0%");
    }
}
