//! The tool proxy: every tool call an agent makes goes through here, on localhost.
//!
//! It owns capability gating (an agent may only call the tools its spec lists), kill switches
//! on tools (failing closed: a new proxy refuses every call until the switch state has been
//! read, [`ToolProxy::set_killed`]), the idempotency decision (spec, else the MCP tool annotations `idempotentHint` /
//! `readOnlyHint`), and it applies each tool's `CircuitPolicy` stack from
//! [`crate::resilience`] — rebuilt, tool by tool, when a published CircuitPolicy set changes
//! the tool's policy ([`ToolProxy::apply`], [`super::policies`]). How a request reaches the
//! tool is a [`Transport`]: real HTTP in a
//! pod, a simulated tool in `r4 run`. It never fails a call with a Rust error: refusals and
//! failures become HTTP answers the agent can act on, with an `r4-degraded` header saying why.
//!
//! Endpoints (see [`ToolProxy::router`]):
//! - `POST /tools/{tool}[/{path…}]` — plain HTTP, forwarded to the tool's URL;
//! - `POST /mcp/{tool}` — MCP JSON-RPC; `tools/call` is governed per MCP tool name.
//!
//! The agent passes the `Idempotency-Key` it received with its task; the proxy forwards it, so
//! a retried, hedged or replayed call carries the same key to the tool.
//!
//! A ChaosDrill's tool faults ([`super::faults`]) are applied where the transport sits, inside
//! the policy stack, so timeouts, retries, hedges, the breaker and the fallback meet them as
//! they would meet the real failure: an outage is a connect error before anything is sent, added
//! latency runs inside the call's timeout, an injected error is an answer with its status and
//! `Retry-After`. [`supervise`] keeps the proxy's view of the faults current.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tracing::Instrument;

use tower::ServiceExt;
use tower::util::BoxCloneService;

use crate::api::policy::CircuitPolicySpec;
use crate::api::validate::FieldError;
use crate::api::workflow::{AgentWorkflowSpec, ToolProtocol, ToolSpec};
use crate::resilience::{
    BoxError, BreakerState, CountersSnapshot, HttpRequest, HttpResponse, Metrics, PolicyConfig,
    PolicyRequest, PolicyResponse, PolicyService, ResilienceError, Stack, Telemetry, build_stack,
};
use crate::telemetry::audit::{self, Auditor};
use crate::telemetry::trace;

/// How requests reach a tool.
pub type Transport = BoxCloneService<HttpRequest, HttpResponse, BoxError>;

/// Header naming why a call was refused or answered in degraded mode.
pub const DEGRADED_HEADER: &str = "r4-degraded";
/// Header carried by the idempotency key.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// One call through the proxy: the HTTP request plus what the policy needs to know about it.
#[derive(Clone, Debug)]
pub struct ToolCall {
    pub request: HttpRequest,
    /// Safe to repeat after it may have reached the tool (retry after a timeout, hedge).
    pub idempotent: bool,
    /// Has no side effect: may be answered from the fallback cache.
    pub read_only: bool,
    /// Requests sent to the tool for this call (first try, retries, hedges): shared by the
    /// clones the policy stack makes, counted where the transport is called (the audit's
    /// `attempts`).
    pub sent: Arc<AtomicU32>,
}

impl PolicyRequest for ToolCall {
    fn idempotent(&self) -> bool {
        self.idempotent || self.read_only
    }

    fn cache_key(&self) -> Option<String> {
        // Only a read-only answer may be served again: replaying a write's answer would claim an
        // effect that did not happen. The key is the question — method, path, body — and not who
        // asks it, so two tasks asking for the same statement share one cached answer.
        if !self.read_only {
            return None;
        }
        let path = match reqwest::Url::parse(&self.request.url) {
            Ok(u) => match u.query() {
                Some(q) => format!("{}?{q}", u.path()),
                None => u.path().to_owned(),
            },
            Err(_) => self.request.url.clone(),
        };
        let key = self.request.header(IDEMPOTENCY_HEADER);
        let body = cacheable_body(&self.request.body, key);
        Some(format!("{} {path} {body}", self.request.method))
    }
}

/// The body as a cache key: what differs per call although the question does not is removed —
/// the JSON-RPC `id`, any member named like an idempotency key (`idempotency_key`,
/// `idempotencyKey`, `Idempotency-Key`, at any depth) and any string equal to the call's
/// `Idempotency-Key`. JSON is re-serialised with sorted members, so member order does not
/// matter either. The `Idempotency-Key` header itself is never part of the key.
fn cacheable_body(body: &[u8], idempotency_key: Option<&str>) -> String {
    fn strip(v: &mut serde_json::Value, key: Option<&str>) {
        match v {
            serde_json::Value::Object(m) => {
                m.retain(|name, value| {
                    let name: String = name
                        .chars()
                        .filter(|c| c.is_ascii_alphanumeric())
                        .map(|c| c.to_ascii_lowercase())
                        .collect();
                    name != "idempotencykey" && !(key.is_some() && value.as_str() == key)
                });
                m.values_mut().for_each(|v| strip(v, key));
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|v| strip(v, key)),
            _ => {}
        }
    }
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(mut m)) => {
            m.remove("id");
            let mut v = serde_json::Value::Object(m);
            strip(&mut v, idempotency_key.filter(|k| !k.is_empty()));
            v.to_string()
        }
        _ => String::from_utf8_lossy(body).into_owned(),
    }
}

/// Idempotency and read-only hints of one MCP tool (from `tools/list` annotations).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct McpHints {
    pub idempotent: bool,
    pub read_only: bool,
}

struct ProxiedTool {
    spec: ToolSpec,
    protocol: ToolProtocol,
    /// Index in `spec.tools` (the policy resolution and the seed are per index).
    index: usize,
    /// The stack calls go through now; a policy reload replaces it (calls in flight keep the
    /// one they cloned).
    stack: RwLock<Arc<ToolStack>>,
    telemetry: Telemetry,
    /// MCP annotations per MCP tool name, when the spec leaves idempotency open.
    hints: RwLock<HashMap<String, McpHints>>,
}

/// One tool's policy stack and what it was built from.
struct ToolStack {
    /// `BoxCloneService` is `Send` but not `Sync`; each call clones it under this lock.
    service: Mutex<PolicyService<ToolCall, HttpResponse>>,
    breaker: Option<crate::resilience::Breaker>,
    /// The CircuitPolicy the tool resolved to (`None`: defaults): a reload rebuilds the
    /// stack only when this changes.
    policy: Option<CircuitPolicySpec>,
    /// The transport inside the stack, reused by a rebuild unless the proxy has a
    /// [`TransportFactory`].
    transport: Mutex<Transport>,
}

/// Makes a tool's transport for the policy it runs under (a real HTTP transport's own deadline
/// follows the policy's `timeout.overall`), for stacks a policy reload rebuilds.
pub type TransportFactory = Arc<dyn Fn(&ToolSpec, &PolicyConfig) -> Transport + Send + Sync>;

/// Called with a tool's name, its breaker and the CircuitPolicy the tool resolved to, for
/// breakers a policy reload builds (see [`ToolProxy::on_breaker`]).
type BreakerHook =
    Arc<dyn Fn(&str, &crate::resilience::Breaker, Option<&CircuitPolicySpec>) + Send + Sync>;

/// The proxy for one workflow.
pub struct ToolProxy {
    tools: BTreeMap<String, ProxiedTool>,
    /// Tools whose kill switch is engaged; `None` until the switch state is known.
    killed: RwLock<Option<BTreeSet<String>>>,
    /// The workflow spec (tools resolve their policy from it on a reload).
    workflow: AgentWorkflowSpec,
    seed: Option<u64>,
    /// Version of the published policy set the stacks run (0: the one given to `new`).
    policy_version: std::sync::atomic::AtomicU64,
    /// Serialises reloads (two appliers must not interleave their swaps).
    applying: Mutex<()>,
    factory: Option<TransportFactory>,
    breaker_hooks: Mutex<Vec<BreakerHook>>,
    /// The injected faults every stack's transport consults ([`ToolProxy::set_faults`]).
    faults: FaultSlot,
    /// Where every call's audit event goes ([`ToolProxy::with_audit`]).
    audit: Auditor,
}

/// The proxy's view of the injected faults, shared with every stack (a rebuilt one included).
type FaultSlot = Arc<RwLock<super::faults::FaultView>>;

/// Why the proxy refused a call before sending it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The tool is not declared in the workflow.
    UnknownTool,
    /// The agent's spec does not list the tool (capability gating).
    NotAllowed,
    /// The tool's kill switch is engaged.
    Killed,
    /// The kill-switch state has not been read yet: every call is refused until it is.
    SwitchUnknown,
}

/// The CircuitPolicy `spec.tools[i]` names (its own `policyRef`, else the workflow's), as
/// found in `policies`.
fn resolved_policy(
    spec: &AgentWorkflowSpec,
    policies: &BTreeMap<String, CircuitPolicySpec>,
    i: usize,
) -> Option<CircuitPolicySpec> {
    let t = spec.tools.get(i)?;
    let name = t.policy_ref.as_ref().or(spec.policy_ref.as_ref())?;
    policies.get(name).cloned()
}

fn tool_seed(seed: Option<u64>, i: usize) -> Option<u64> {
    seed.map(|s| s.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

fn build_tool_stack(
    cfg: &PolicyConfig,
    policy: Option<CircuitPolicySpec>,
    transport: Transport,
    telemetry: Telemetry,
    faults: (&str, &FaultSlot),
) -> ToolStack {
    let adapter = CallAdapter {
        transport: transport.clone(),
        tool: Arc::from(faults.0),
        faults: faults.1.clone(),
    };
    let Stack {
        service, breaker, ..
    } = build_stack(cfg, adapter, telemetry);
    ToolStack {
        service: Mutex::new(service),
        breaker,
        policy,
        transport: Mutex::new(transport),
    }
}

impl ToolProxy {
    /// Build the proxy for every tool of `spec`; `policies` are the workflow's CircuitPolicies by
    /// name, `transport` makes the way to reach each tool. `seed` makes the policies' random
    /// draws (jitter, throttling) repeatable.
    pub fn new(
        spec: &AgentWorkflowSpec,
        policies: &BTreeMap<String, CircuitPolicySpec>,
        transport: &dyn Fn(&ToolSpec) -> Transport,
        metrics: Option<Metrics>,
        seed: Option<u64>,
    ) -> Result<Self, FieldError> {
        let mut tools = BTreeMap::new();
        let faults: FaultSlot = Arc::default();
        for (i, t) in spec.tools.iter().enumerate() {
            let mut cfg = tool_policy(spec, policies, i)?;
            cfg.seed = tool_seed(seed, i);
            let telemetry = Telemetry::new(&t.name, metrics.clone());
            let stack = build_tool_stack(
                &cfg,
                resolved_policy(spec, policies, i),
                transport(t),
                telemetry.clone(),
                (&t.name, &faults),
            );
            tools.insert(
                t.name.clone(),
                ProxiedTool {
                    protocol: protocol_of(t),
                    spec: t.clone(),
                    index: i,
                    stack: RwLock::new(Arc::new(stack)),
                    telemetry,
                    hints: RwLock::new(HashMap::new()),
                },
            );
        }
        Ok(Self {
            tools,
            killed: RwLock::new(None),
            workflow: spec.clone(),
            seed,
            policy_version: std::sync::atomic::AtomicU64::new(0),
            applying: Mutex::new(()),
            factory: None,
            breaker_hooks: Mutex::new(Vec::new()),
            faults,
            audit: Auditor::default(),
        })
    }

    /// Apply the faults of `view` to every call from now on ([`supervise`] sets the view that
    /// follows the workflow's faults; until then none apply).
    pub fn set_faults(&self, view: super::faults::FaultView) {
        *write(&self.faults) = view;
    }

    /// How many tool calls met an injected fault.
    pub fn faults_applied(&self) -> u64 {
        read(&self.faults).applied()
    }

    /// Audit every call with `auditor` (without one, events name no workflow, agent or engine
    /// and go to the log only).
    pub fn with_audit(mut self, auditor: Auditor) -> Self {
        self.audit = auditor;
        self
    }

    /// Make the transports of the stacks a policy reload rebuilds with `factory` (without
    /// one, a rebuilt stack keeps the tool's transport).
    pub fn with_transport_factory(mut self, factory: TransportFactory) -> Self {
        self.factory = Some(factory);
        self
    }

    /// Call `hook` for every tool's breaker now, and for every breaker a policy reload builds
    /// later (to listen to its transitions), with the tool's name and the CircuitPolicy it
    /// resolved to.
    pub fn on_breaker(
        &self,
        hook: impl Fn(&str, &crate::resilience::Breaker, Option<&CircuitPolicySpec>)
        + Send
        + Sync
        + 'static,
    ) {
        let hook: BreakerHook = Arc::new(hook);
        // Registered before the current breakers are visited: a reload in between calls it
        // for its new breakers (at worst a breaker is seen twice, never missed).
        crate::resilience::lock(&self.breaker_hooks).push(hook.clone());
        for (name, t) in &self.tools {
            let stack = read(&t.stack).clone();
            if let Some(b) = &stack.breaker {
                hook(name, b, stack.policy.as_ref());
            }
        }
    }

    /// Call `hook` for every breaker a policy reload builds from now on (not for the current
    /// ones), e.g. to share it through Redis as the current ones were at start.
    pub fn on_new_breaker(
        &self,
        hook: impl Fn(&str, &crate::resilience::Breaker, Option<&CircuitPolicySpec>)
        + Send
        + Sync
        + 'static,
    ) {
        crate::resilience::lock(&self.breaker_hooks).push(Arc::new(hook));
    }

    /// Version of the published policy set the proxy runs (0: the one it was built with).
    pub fn policy_version(&self) -> u64 {
        self.policy_version
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Run the policies of `set`: rebuild the stack of each tool whose resolved policy
    /// changed, leave the others (their breaker state, budget and hedge histogram) untouched.
    /// Calls in flight finish on the stack they started with. All or nothing: when a tool
    /// cannot resolve its policy under the new set (a `policyRef` it lacks, a bad field), the
    /// error names the field and nothing changes. A set of the version running is ignored
    /// (one of another version is the newer one, see [`super::policies`]). Returns the tools
    /// rebuilt.
    pub fn apply(&self, set: &super::policies::PolicySet) -> Result<Vec<String>, FieldError> {
        let _one = crate::resilience::lock(&self.applying);
        if set.version == self.policy_version() {
            return Ok(Vec::new());
        }
        let mut rebuilt = Vec::new();
        for (name, t) in &self.tools {
            let policy = resolved_policy(&self.workflow, &set.policies, t.index);
            if read(&t.stack).policy == policy {
                continue;
            }
            let mut cfg = tool_policy(&self.workflow, &set.policies, t.index)?;
            cfg.seed = tool_seed(self.seed, t.index);
            rebuilt.push((name, policy, cfg));
        }
        let hooks: Vec<BreakerHook> = crate::resilience::lock(&self.breaker_hooks).clone();
        let mut names = Vec::new();
        for (name, policy, cfg) in rebuilt {
            let Some(t) = self.tools.get(name) else {
                continue;
            };
            let transport = match &self.factory {
                Some(f) => f(&t.spec, &cfg),
                None => crate::resilience::lock(&read(&t.stack).transport).clone(),
            };
            let stack = build_tool_stack(
                &cfg,
                policy,
                transport,
                t.telemetry.clone(),
                (name, &self.faults),
            );
            if let Some(b) = &stack.breaker {
                for hook in &hooks {
                    hook(name, b, stack.policy.as_ref());
                }
            }
            *write(&t.stack) = Arc::new(stack);
            names.push(name.clone());
        }
        self.policy_version
            .store(set.version, std::sync::atomic::Ordering::Relaxed);
        Ok(names)
    }

    /// The tools whose kill switch is engaged, as read (the kill-switch watcher keeps this
    /// current, see [`supervise`]). Until the first call every tool is refused
    /// ([`Refusal::SwitchUnknown`]): a proxy must not forward a call it may not know is killed.
    pub fn set_killed(&self, killed: BTreeSet<String>) {
        *write(&self.killed) = Some(killed);
    }

    /// Whether a tool is down for degraded-mode purposes: killed (or not known not to be)
    /// or its breaker open.
    pub fn is_down(&self, tool: &str) -> bool {
        if read(&self.killed).as_ref().is_none_or(|k| k.contains(tool)) {
            return true;
        }
        self.breaker(tool)
            .is_some_and(|b| b.state() == BreakerState::Open)
    }

    /// The spec of one declared tool.
    pub fn tool_spec(&self, tool: &str) -> Option<&ToolSpec> {
        self.tools.get(tool).map(|t| &t.spec)
    }

    /// Breaker state per tool (tools without a breaker are absent).
    pub fn breaker_states(&self) -> BTreeMap<String, BreakerState> {
        self.tools
            .iter()
            .filter_map(|(n, t)| {
                read(&t.stack)
                    .breaker
                    .as_ref()
                    .map(|b| (n.clone(), b.state()))
            })
            .collect()
    }

    /// The breaker of one tool now (a policy reload that rebuilds the tool's stack replaces
    /// it: to follow every breaker, use [`ToolProxy::on_breaker`]).
    pub fn breaker(&self, tool: &str) -> Option<crate::resilience::Breaker> {
        self.tools
            .get(tool)
            .and_then(|t| read(&t.stack).breaker.clone())
    }

    /// Policy counters per tool.
    pub fn counters(&self) -> BTreeMap<String, CountersSnapshot> {
        self.tools
            .iter()
            .map(|(n, t)| (n.clone(), t.telemetry.snapshot()))
            .collect()
    }

    /// Record MCP annotations for a tool (normally learnt with [`ToolProxy::discover_mcp`]).
    pub fn set_mcp_hints(&self, tool: &str, hints: HashMap<String, McpHints>) {
        if let Some(t) = self.tools.get(tool) {
            *write(&t.hints) = hints;
        }
    }

    /// Ask each MCP tool whose idempotency the spec leaves open for its `tools/list` and keep the
    /// annotations. A server that does not answer keeps the safe default (not idempotent).
    pub async fn discover_mcp(&self, transport: &(dyn Fn(&ToolSpec) -> Transport + Sync)) {
        for (name, t) in &self.tools {
            if t.protocol != ToolProtocol::Mcp || t.spec.idempotent.is_some() {
                continue;
            }
            let body =
                serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).to_string();
            let mut req = HttpRequest::post(t.spec.url.clone(), body.into_bytes());
            req.headers
                .push(("content-type".into(), "application/json".into()));
            let answer =
                tokio::time::timeout(Duration::from_secs(5), transport(&t.spec).oneshot(req)).await;
            if let Ok(Ok(resp)) = answer
                && resp.status == 200
            {
                self.set_mcp_hints(name, parse_tools_list(&resp.body));
            }
        }
    }

    /// Whether `agent_tools` may call `tool`, and whether it is up.
    pub fn check(&self, agent_tools: &[String], tool: &str) -> Result<(), Refusal> {
        if !self.tools.contains_key(tool) {
            return Err(Refusal::UnknownTool);
        }
        if !agent_tools.iter().any(|t| t == tool) {
            return Err(Refusal::NotAllowed);
        }
        match &*read(&self.killed) {
            None => Err(Refusal::SwitchUnknown),
            Some(killed) if killed.contains(tool) => Err(Refusal::Killed),
            Some(_) => Ok(()),
        }
    }

    /// Call `tool` on behalf of an agent allowed `agent_tools`. Always answers: refusals are
    /// 403/404/503 with an [`DEGRADED_HEADER`], policy rejections 503, timeouts 504.
    ///
    /// The call is one `r4.tool` span ([`trace::tool_span`]), a child of the `traceparent` the
    /// agent passed on; the tool receives the span's own. It ends in one audit event
    /// ([`audit`]).
    pub async fn call(
        &self,
        agent_tools: &[String],
        tool: &str,
        mut request: HttpRequest,
    ) -> HttpResponse {
        let started = tokio::time::Instant::now();
        let span = trace::tool_span(tool);
        let tp = trace::link(&span, request.header(trace::TRACEPARENT));
        request
            .headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case(trace::TRACEPARENT));
        request.headers.push((trace::TRACEPARENT.into(), tp));
        let key = request.header(IDEMPOTENCY_HEADER).map(str::to_owned);
        let sent = Arc::new(AtomicU32::new(0));
        let (resp, refused, mcp_tool) = self
            .governed(agent_tools, tool, request, sent.clone())
            .instrument(span.clone())
            .await;
        let reason = resp.header(DEGRADED_HEADER).and_then(|v| {
            v.split_once("reason=")
                .map(|(_, r)| r.split(';').next().unwrap_or(r).trim())
        });
        let outcome = match (refused, resp.status) {
            (true, _) => audit::Outcome::Refused,
            (false, s) if s < 400 => audit::Outcome::Ok,
            _ => audit::Outcome::Error,
        };
        let http_class = match resp.status {
            500.. => "http-5xx",
            _ => "http-4xx",
        };
        let degraded = matches!(
            reason,
            Some(
                "fallback"
                    | "breaker-open"
                    | "killed"
                    | "killswitch-unknown"
                    | "bulkhead-full"
                    | "throttled"
            )
        );
        span.record("http.response.status_code", resp.status);
        span.record("r4.degraded", degraded);
        if outcome != audit::Outcome::Ok {
            span.record("otel.status_code", "error");
        }
        span.in_scope(|| {
            self.audit.record(&audit::Call {
                tool,
                mcp_tool: mcp_tool.as_deref(),
                key: key.as_deref(),
                outcome,
                status: resp.status,
                error_class: (outcome != audit::Outcome::Ok).then(|| reason.unwrap_or(http_class)),
                degraded,
                reason,
                duration: started.elapsed(),
                attempts: sent.load(AtomicOrdering::Relaxed),
                at_ms: crate::engine::task::now_ms(),
            })
        });
        resp
    }

    /// The call through the gates and the tool's policy stack: the answer, whether the proxy
    /// refused it before sending anything, and the MCP tool it names.
    async fn governed(
        &self,
        agent_tools: &[String],
        tool: &str,
        mut request: HttpRequest,
        sent: Arc<AtomicU32>,
    ) -> (HttpResponse, bool, Option<String>) {
        if let Err(r) = self.check(agent_tools, tool) {
            return (refusal_response(tool, &r), true, None);
        }
        let Some(t) = self.tools.get(tool) else {
            return (refusal_response(tool, &Refusal::UnknownTool), true, None);
        };
        request.url = match forward_url(&t.spec.url, &request.url) {
            Ok(url) => url,
            Err(e) => {
                let msg = format!("tool {tool:?}: {e}");
                return (degraded(400, tool, "bad-path", &msg), true, None);
            }
        };
        let (idempotent, read_only, mcp_tool) = self.hints_for(t, &request.body);
        let call = ToolCall {
            request,
            idempotent,
            read_only,
            sent,
        };
        // The stack of this instant: a reload during the call does not change it.
        let stack = read(&t.stack).clone();
        let svc = crate::resilience::lock(&stack.service).clone();
        let resp = match svc.oneshot(call).await {
            Ok(resp) => {
                let mut resp = resp;
                if resp.is_fallback() {
                    resp.headers
                        .push((DEGRADED_HEADER.into(), format!("{tool}; reason=fallback")));
                }
                resp
            }
            Err(e) => error_response(tool, &e),
        };
        (resp, false, mcp_tool)
    }

    /// Whether a call is idempotent and read-only, and the MCP tool it calls.
    fn hints_for(&self, t: &ProxiedTool, body: &[u8]) -> (bool, bool, Option<String>) {
        let spec_idem = t.spec.idempotent;
        let spec_ro = t.spec.read_only;
        if t.protocol != ToolProtocol::Mcp {
            return (spec_idem.unwrap_or(false), spec_ro.unwrap_or(false), None);
        }
        let msg: serde_json::Value =
            serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
        match msg.get("method").and_then(|m| m.as_str()) {
            Some("tools/call") => {
                let name = msg
                    .pointer("/params/name")
                    .and_then(|n| n.as_str())
                    .unwrap_or("");
                let hint = read(&t.hints).get(name).copied().unwrap_or_default();
                (
                    spec_idem.unwrap_or(hint.idempotent),
                    spec_ro.unwrap_or(hint.read_only),
                    Some(name.to_owned()),
                )
            }
            // initialize, tools/list, ping: protocol chatter without effects.
            Some(_) => (true, spec_ro.unwrap_or(false), None),
            None => (spec_idem.unwrap_or(false), spec_ro.unwrap_or(false), None),
        }
    }
}

/// The runtime policy of `spec.tools[i]`: its `policyRef`, else the workflow's, plus its
/// fallback (see [`PolicyConfig::from_spec`] for the defaults, the overall deadline among
/// them). Errors name the field.
pub fn tool_policy(
    spec: &AgentWorkflowSpec,
    policies: &BTreeMap<String, CircuitPolicySpec>,
    i: usize,
) -> Result<PolicyConfig, FieldError> {
    let Some(t) = spec.tools.get(i) else {
        return Err(FieldError::new(format!("spec.tools[{i}]"), "no such tool"));
    };
    let policy = match t.policy_ref.as_ref().or(spec.policy_ref.as_ref()) {
        Some(name) => Some(policies.get(name).ok_or_else(|| {
            FieldError::new(
                format!("spec.tools[{i}].policyRef"),
                format!("CircuitPolicy {name:?} not found"),
            )
        })?),
        None => None,
    };
    PolicyConfig::from_spec(policy, t.fallback.as_ref()).map_err(|e| {
        FieldError::new(
            format!("spec.tools[{i}].{}", e.path.trim_start_matches("spec.")),
            e.message,
        )
    })
}

/// The wire protocol: the spec's, else MCP when the URL path ends in `/mcp`.
pub fn protocol_of(t: &ToolSpec) -> ToolProtocol {
    t.protocol.unwrap_or_else(|| {
        let path = t.url.split('?').next().unwrap_or("");
        if path.trim_end_matches('/').ends_with("/mcp") {
            ToolProtocol::Mcp
        } else {
            ToolProtocol::Http
        }
    })
}

/// The tool's URL plus the sub-path the agent asked for (`/tools/ledger/entries/7` →
/// `…/entries/7`), never anything outside the tool's URL.
///
/// A URL parser normalises `..`, `%2e%2e` and `\` and reads `?` and `#` as the start of the
/// query and fragment, so a sub-path holding them could reach another path of the tool's
/// host (`/tools/ledger/../admin`) or change its query. They are refused outright (the agent
/// gets a `400`), and so are percent-encoded `.`, `/`, `\`, `?`, `#`, `%` and control
/// characters, which a tool decoding the path once more would read the same way. Then the
/// joined URL is checked: same scheme, host and port as the base, path under the base path,
/// the base's own query and fragment unchanged.
pub fn forward_url(base: &str, sub: &str) -> Result<String, String> {
    if sub.is_empty() {
        return Ok(base.to_string());
    }
    check_sub_path(sub)?;
    let base_url = reqwest::Url::parse(base).map_err(|e| format!("tool URL: {e}"))?;
    let prefix = base_url.path().trim_end_matches('/').to_string();
    let mut joined = base_url.clone();
    joined.set_path(&format!("{prefix}/{}", sub.trim_start_matches('/')));
    let under = joined.scheme() == base_url.scheme()
        && joined.host_str() == base_url.host_str()
        && joined.port_or_known_default() == base_url.port_or_known_default()
        && joined.username() == base_url.username()
        && joined.password() == base_url.password()
        && joined.path().starts_with(&format!("{prefix}/"))
        && joined.query() == base_url.query()
        && joined.fragment() == base_url.fragment();
    if !under {
        return Err(format!("sub-path {sub:?} leaves the tool's URL"));
    }
    Ok(joined.into())
}

/// The characters and segments [`forward_url`] refuses in a sub-path.
fn check_sub_path(sub: &str) -> Result<(), String> {
    let refuse = |why: &str| Err(format!("sub-path {sub:?} {why}"));
    if let Some(c) = sub
        .chars()
        .find(|c| matches!(c, '?' | '#' | '\\') || c.is_control() || c.is_whitespace())
    {
        return refuse(&format!("may not contain {c:?}"));
    }
    let bytes = sub.as_bytes();
    for (i, _) in sub.match_indices('%') {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            None => return refuse("has a % that is not followed by two hex digits"),
            Some(b) if b < 0x20 || b == 0x7f || b"./\\?#%".contains(&b) => {
                return refuse(&format!("may not contain an encoded {:?}", b as char));
            }
            Some(_) => {}
        }
    }
    if sub.split('/').any(|seg| seg == "." || seg == "..") {
        return refuse("may not contain a '.' or '..' segment");
    }
    Ok(())
}

/// Annotations of an MCP `tools/list` answer: `result.tools[].{name, annotations}`.
pub fn parse_tools_list(body: &[u8]) -> HashMap<String, McpHints> {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let mut out = HashMap::new();
    for tool in v
        .pointer("/result/tools")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        let Some(name) = tool.get("name").and_then(|n| n.as_str()) else {
            continue;
        };
        let hint = |k: &str| {
            tool.pointer(&format!("/annotations/{k}"))
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
        };
        out.insert(
            name.to_string(),
            McpHints {
                idempotent: hint("idempotentHint"),
                read_only: hint("readOnlyHint"),
            },
        );
    }
    out
}

fn refusal_response(tool: &str, r: &Refusal) -> HttpResponse {
    let (status, reason, msg) = match r {
        Refusal::UnknownTool => (
            404,
            "unknown-tool",
            format!("tool {tool:?} is not declared in this workflow"),
        ),
        Refusal::NotAllowed => (
            403,
            "not-allowed",
            format!("this agent may not call tool {tool:?}"),
        ),
        Refusal::Killed => (
            503,
            "killed",
            format!("tool {tool:?} is stopped by its kill switch"),
        ),
        Refusal::SwitchUnknown => (
            503,
            "killswitch-unknown",
            format!("tool {tool:?}: kill switch state unknown (not read yet); retry shortly"),
        ),
    };
    degraded(status, tool, reason, &msg)
}

fn error_response(tool: &str, e: &ResilienceError) -> HttpResponse {
    let (status, reason) = match e {
        ResilienceError::BreakerOpen => (503, "breaker-open"),
        ResilienceError::BulkheadFull => (503, "bulkhead-full"),
        ResilienceError::Throttled => (503, "throttled"),
        ResilienceError::Timeout(_) => (504, "timeout"),
        ResilienceError::BudgetExhausted(inner) => return error_response(tool, inner),
        ResilienceError::Connect(_) => (502, "connect-error"),
        ResilienceError::Inner(_) => (502, "error"),
    };
    degraded(status, tool, reason, &format!("tool {tool:?}: {e}"))
}

fn degraded(status: u16, tool: &str, reason: &str, msg: &str) -> HttpResponse {
    let body = serde_json::json!({"error": msg, "tool": tool, "reason": reason}).to_string();
    let mut r = HttpResponse::new(status, body.into_bytes());
    r.headers
        .push(("content-type".into(), "application/json".into()));
    r.headers
        .push((DEGRADED_HEADER.into(), format!("{tool}; reason={reason}")));
    r
}

/// Adapts a transport (`HttpRequest`) to the stack's request type (`ToolCall`), and applies the
/// injected faults of its tool at the transport's place (see the module doc).
#[derive(Clone)]
struct CallAdapter {
    transport: Transport,
    tool: Arc<str>,
    faults: FaultSlot,
}

impl tower::Service<ToolCall> for CallAdapter {
    type Response = HttpResponse;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<HttpResponse, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        self.transport.poll_ready(cx)
    }

    fn call(&mut self, req: ToolCall) -> Self::Future {
        use super::faults::ToolFailure;
        req.sent.fetch_add(1, AtomicOrdering::Relaxed);
        let key = req.request.header(IDEMPOTENCY_HEADER).unwrap_or("");
        let fault = read(&self.faults).tool(&self.tool, key);
        if fault.is_none() {
            return Box::pin(self.transport.call(req.request));
        }
        let tool = self.tool.clone();
        // Not sent unless polled: an outage or an injected error never reaches the tool.
        let forward = match &fault.failure {
            None => Some(self.transport.call(req.request)),
            Some(_) => None,
        };
        Box::pin(async move {
            if !fault.latency.is_zero() {
                tokio::time::sleep(fault.latency).await;
            }
            match (fault.failure, forward) {
                (Some(ToolFailure::Outage { drill }), _) => {
                    let e: BoxError =
                        format!("tool {tool}: outage injected by ChaosDrill {drill}").into();
                    Err(ResilienceError::Connect(e).into())
                }
                (
                    Some(ToolFailure::Error {
                        drill,
                        status,
                        retry_after_seconds,
                    }),
                    _,
                ) => Ok(injected_error(&tool, &drill, status, retry_after_seconds)),
                (None, Some(forward)) => forward.await,
                (None, None) => Err(format!("tool {tool}: nothing to forward").into()),
            }
        })
    }
}

/// The answer of a ToolErrors fault: `status`, `Retry-After` when the drill sets one, a JSON
/// body naming the drill.
fn injected_error(tool: &str, drill: &str, status: u16, retry_after: Option<u64>) -> HttpResponse {
    let body = serde_json::json!({
        "error": format!("error {status} injected by ChaosDrill {drill}"),
        "tool": tool,
    })
    .to_string();
    let mut r = HttpResponse::new(status, body.into_bytes());
    r.headers
        .push(("content-type".into(), "application/json".into()));
    if let Some(s) = retry_after {
        r.headers.push(("retry-after".into(), s.to_string()));
    }
    r
}

/// How real HTTP requests reach one tool.
#[derive(Clone, Debug)]
pub struct HttpToolOptions {
    /// Headers added to every request (the tool's `headersFrom`), marked sensitive so no
    /// debug output shows them.
    pub headers: Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>,
    /// Deadline of one request, its answer included: the tool policy's `timeout.overall`,
    /// a second line behind the policy stack's own timer.
    pub timeout: Duration,
    /// Largest answer read ([`super::limits::MAX_TOOL_RESPONSE`]).
    pub max_response: usize,
}

impl Default for HttpToolOptions {
    fn default() -> Self {
        Self {
            headers: Vec::new(),
            timeout: crate::resilience::DEFAULT_OVERALL_TIMEOUT,
            max_response: super::limits::MAX_TOOL_RESPONSE,
        }
    }
}

/// The tool proxy's HTTP client: rustls trusting the webpki roots plus the PEM bundle
/// `ca_pem` (`--tools-ca-file`), connect timeout 2 s, and no redirect followed — a redirect
/// could take a call, and the credentials of its `headersFrom`, away from the tool's URL
/// (the 3xx goes back to the agent instead).
pub fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, String> {
    crate::tls::install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(2))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(pem) = ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("not a PEM certificate bundle: {}", e.without_url()))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build()
        .map_err(|e| format!("cannot build the HTTP client: {}", e.without_url()))
}

/// Real HTTP to a tool with the default [`HttpToolOptions`].
pub fn http_transport(client: reqwest::Client) -> Transport {
    http_transport_with(client, HttpToolOptions::default())
}

/// Real HTTP to a tool, with connect failures marked as such (the request never left, so even
/// a non-idempotent call may be retried). Errors never carry the URL (it may hold a token in
/// its query; the agent sees them); an answer over `max_response` bytes is refused.
pub fn http_transport_with(client: reqwest::Client, options: HttpToolOptions) -> Transport {
    let options = Arc::new(options);
    BoxCloneService::new(tower::service_fn(move |req: HttpRequest| {
        let client = client.clone();
        let options = options.clone();
        async move {
            let method = reqwest::Method::from_bytes(req.method.as_bytes())
                .map_err(|e| -> BoxError { format!("bad method {:?}: {e}", req.method).into() })?;
            let mut b = client
                .request(method, &req.url)
                .timeout(options.timeout)
                .body(req.body);
            for (k, v) in &req.headers {
                b = b.header(k, v);
            }
            for (k, v) in &options.headers {
                b = b.header(k, v);
            }
            let resp = match b.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    return Err(ResilienceError::Connect(Box::new(e.without_url())).into());
                }
                Err(e) if e.is_timeout() => {
                    return Err(ResilienceError::Timeout(options.timeout).into());
                }
                Err(e) => return Err(Box::new(e.without_url()) as BoxError),
            };
            let status = resp.status().as_u16();
            let headers = resp
                .headers()
                .iter()
                .filter_map(|(k, v)| {
                    v.to_str()
                        .ok()
                        .map(|v| (k.as_str().to_string(), v.to_string()))
                })
                .collect();
            let body = match super::limits::read_body(resp, options.max_response).await {
                Ok(b) => b.to_vec(),
                Err(super::limits::BodyError::Read(e)) if e.is_timeout() => {
                    return Err(ResilienceError::Timeout(options.timeout).into());
                }
                Err(e) => return Err(format!("tool {e}").into()),
            };
            Ok(HttpResponse {
                status,
                headers,
                body,
                fallback: false,
            })
        }
    }))
}

/// Default of `--tools-secrets-dir`: where the controller mounts the tools' `headersFrom`.
pub const DEFAULT_SECRETS_DIR: &str = "/var/run/secrets/r4/tools";

/// The `headersFrom` values of the tools named in `tools`, read from
/// `<dir>/<tool>/<header name in lower case>` (a trailing newline is dropped). A declared
/// header whose file is missing or unreadable is an error naming the field and the file —
/// a tool is never called without the credentials its spec asks for. Errors never hold a
/// value.
pub fn load_tool_headers(
    spec: &AgentWorkflowSpec,
    tools: &[String],
    dir: &std::path::Path,
) -> Result<
    BTreeMap<String, Vec<(reqwest::header::HeaderName, reqwest::header::HeaderValue)>>,
    String,
> {
    let mut out = BTreeMap::new();
    for (i, t) in spec.tools.iter().enumerate() {
        if !tools.contains(&t.name) || t.headers_from.is_empty() {
            continue;
        }
        let mut headers = Vec::new();
        for (j, h) in t.headers_from.iter().enumerate() {
            let field = format!("spec.tools[{i}].headersFrom[{j}]");
            let name = reqwest::header::HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("{field}.name: {:?} is not a header name", h.name))?;
            let path = dir.join(&t.name).join(name.as_str());
            let raw = std::fs::read(&path)
                .map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))?;
            let value = raw.strip_suffix(b"\n").unwrap_or(&raw);
            let value = value.strip_suffix(b"\r").unwrap_or(value);
            let mut value = reqwest::header::HeaderValue::from_bytes(value)
                .map_err(|_| format!("{field}: {} is not a valid header value", path.display()))?;
            value.set_sensitive(true);
            headers.push((name, value));
        }
        out.insert(t.name.clone(), headers);
    }
    Ok(out)
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

/// How often the proxy's counters are published (as often as an engine's stats).
const TOOL_STATS_EVERY: Duration = Duration::from_secs(1);

/// Keep a proxy in step with its workflow until `stop`: the tools' kill switches (spec and
/// Redis; the proxy refuses every call until they are first read), the published
/// CircuitPolicies (a new set rebuilds the stacks of the tools whose policy changed,
/// [`ToolProxy::apply`]; see [`super::policies`]) and the breaker states, published on every
/// transition and every rebuild (and refreshed while not closed, see
/// [`super::breakers::REFRESH`]) for the repair role and degraded mode of every engine of the
/// workflow; the injected faults ([`super::faults::follow`], applied from the first read on);
/// and the proxy's counters (retries, hedges, breaker trips, faults applied), published every
/// [`TOOL_STATS_EVERY`] as the stats of engine `<engine>-tools`, role `tools`.
pub async fn supervise(
    proxy: Arc<ToolProxy>,
    queue: Arc<dyn crate::queue::Queue>,
    cfg: Arc<super::WorkflowConfig>,
    engine: String,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use super::breakers::{BreakerRecord, BreakerState as Published, BreakerStates, REFRESH};
    let (tx, mut transitions) = tokio::sync::mpsc::unbounded_channel::<String>();
    {
        let tx = tx.clone();
        proxy.on_breaker(move |name, b, _| {
            let (tx, name) = (tx.clone(), name.to_owned());
            b.on_transition(move |_| {
                let _ = tx.send(name.clone());
            });
        });
    }
    let mut switches =
        super::killswitch::watch(queue.clone(), cfg.keys.clone(), cfg.spec_switches());
    let faults = super::faults::follow(queue.clone(), cfg.keys.clone());
    // Calls wait for the kill switches anyway; the faults are read by then, mostly.
    faults
        .first_read(super::faults::FIRST_READ.min(Duration::from_millis(200)))
        .await;
    proxy.set_faults(faults);
    // The proxy's own counters, published like an engine's (role `tools`) so the workflow's
    // stats add up its retries, hedges and breaker trips; its own id, as an agent role of the
    // same engine publishes under the engine's.
    let tool_stats = super::Stats::new(&format!("{engine}-tools"), "tools", None);
    let publish_tools = |final_ttl: bool| {
        let (q, keys, proxy, stats) = (queue.clone(), cfg.keys.clone(), proxy.clone(), &tool_stats);
        async move {
            let (mut retries, mut hedges, mut trips) = (0, 0, 0);
            for c in proxy.counters().values() {
                retries += c.retries;
                hedges += c.hedges;
                trips += c.breaker_trips;
            }
            stats.set_tool_counters(retries, hedges, trips, proxy.faults_applied());
            stats.set_policy_version(proxy.policy_version());
            let ttl = Duration::from_secs(if final_ttl { 30 } else { 15 });
            if let Err(e) = stats.publish(q.as_ref(), &keys, ttl).await {
                tracing::debug!(error = %e, "cannot publish the tool proxy's stats");
            }
        }
    };
    let mut stats_tick = tokio::time::interval(TOOL_STATS_EVERY);
    stats_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The published set first: the proxy refuses every call until the kill switches are
    // read in the loop below, so no call goes out under the file's policies when a newer set
    // is published.
    let first = super::policies::initial(queue.as_ref(), &cfg).await;
    if first.version != 0 {
        match proxy.apply(&first) {
            Ok(rebuilt) => tracing::info!(
                version = first.version,
                tools = %rebuilt.join(","),
                "policies reloaded"
            ),
            Err(e) => {
                tracing::warn!(version = first.version, error = %e, "published policies refused by the tool proxy; keeping the ones running")
            }
        }
    }
    let mut policies = super::policies::watch(queue.clone(), cfg.keys.clone(), first);
    let mut since: BTreeMap<String, u64> = BTreeMap::new();
    let mut tick = tokio::time::interval(REFRESH);
    let publish = |tool: String, state: BreakerState, since: u64| {
        let q = queue.clone();
        let keys = cfg.keys.clone();
        let engine = engine.clone();
        let failure_rate = proxy.counters().get(&tool).map_or(0.0, |c| {
            if c.calls == 0 {
                0.0
            } else {
                c.failures as f64 / c.calls as f64
            }
        });
        async move {
            let record = BreakerRecord {
                state: match state {
                    BreakerState::Closed => Published::Closed,
                    BreakerState::Open => Published::Open,
                    BreakerState::HalfOpen => Published::HalfOpen,
                },
                since_ms: since,
                updated_ms: super::task::now_ms(),
                engine,
                failure_rate,
            };
            if let Err(e) = BreakerStates::new(q.as_ref(), &keys)
                .publish(&tool, &record)
                .await
            {
                tracing::warn!(tool = %tool, error = %e, "cannot publish breaker state");
            }
        }
    };
    loop {
        {
            // The spec's switches are merged in by the watcher.
            let state = switches.borrow();
            if state.known {
                proxy.set_killed(state.tools.clone());
            }
        }
        tokio::select! {
            r = stop.changed() => if r.is_err() || *stop.borrow() {
                publish_tools(true).await;
                return;
            },
            _ = stats_tick.tick() => publish_tools(false).await,
            changed = switches.changed() => if changed.is_err() { return },
            changed = policies.changed() => {
                if changed.is_err() {
                    return;
                }
                let set = policies.borrow_and_update().clone();
                match proxy.apply(&set) {
                    Ok(rebuilt) => {
                        tracing::info!(
                            version = set.version,
                            tools = %rebuilt.join(","),
                            "policies reloaded"
                        );
                        // A rebuilt tool starts with a new breaker: say so.
                        for tool in rebuilt {
                            let _ = tx.send(tool);
                        }
                    }
                    Err(e) => tracing::warn!(
                        version = set.version,
                        running = proxy.policy_version(),
                        error = %e,
                        "published policies refused by the tool proxy; keeping the ones running"
                    ),
                }
            }
            Some(tool) = transitions.recv() => {
                let state = proxy.breaker(&tool).map_or(BreakerState::Closed, |b| b.state());
                let at = super::task::now_ms();
                since.insert(tool.clone(), at);
                publish(tool, state, at).await;
            }
            _ = tick.tick() => {
                for (tool, state) in proxy.breaker_states() {
                    if state != BreakerState::Closed {
                        let at = since.get(&tool).copied().unwrap_or_else(super::task::now_ms);
                        publish(tool, state, at).await;
                    }
                }
            }
        }
    }
}

/// HTTP front of the proxy for one agent (listen on localhost in the agent's pod).
pub mod http {
    use super::*;
    use axum::Router;
    use axum::body::Bytes;
    use axum::extract::{Path, State};
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;

    #[derive(Clone)]
    struct AppState {
        proxy: Arc<ToolProxy>,
        agent_tools: Arc<Vec<String>>,
    }

    /// `POST /tools/{tool}`, `POST /tools/{tool}/{*path}`, `POST /mcp/{tool}`; at most
    /// [`crate::engine::limits::MAX_IN_FLIGHT`] calls at once.
    pub fn router(proxy: Arc<ToolProxy>, agent_tools: Vec<String>) -> Router {
        let state = AppState {
            proxy,
            agent_tools: Arc::new(agent_tools),
        };
        let api = Router::new()
            .route("/tools/{tool}", post(plain))
            .route("/tools/{tool}/{*path}", post(plain_path))
            .route("/mcp/{tool}", post(plain))
            .with_state(state);
        crate::engine::limits::in_flight_limit(api, crate::engine::limits::MAX_IN_FLIGHT)
    }

    async fn plain(
        State(s): State<AppState>,
        Path(tool): Path<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        forward(s, tool, String::new(), headers, body).await
    }

    async fn plain_path(
        State(s): State<AppState>,
        Path((tool, path)): Path<(String, String)>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        forward(s, tool, path, headers, body).await
    }

    async fn forward(
        s: AppState,
        tool: String,
        path: String,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        let mut req = HttpRequest::post(path, body.to_vec());
        for name in [
            IDEMPOTENCY_HEADER,
            "content-type",
            "traceparent",
            "tracestate",
            "accept",
        ] {
            if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
                req.headers.push((name.to_string(), v.to_string()));
            }
        }
        let resp = s.proxy.call(&s.agent_tools, &tool, req).await;
        let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::BAD_GATEWAY);
        let mut out = (status, resp.body).into_response();
        for (k, v) in resp.headers {
            if let (Ok(k), Ok(v)) = (
                k.parse::<axum::http::HeaderName>(),
                v.parse::<axum::http::HeaderValue>(),
            ) {
                out.headers_mut().append(k, v);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::post;
    use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

    /// A loopback tool server: answers with the status the test sets, records the
    /// idempotency keys it saw and counts requests.
    #[derive(Clone, Default)]
    struct FakeTool {
        status: Arc<AtomicU32>,
        requests: Arc<AtomicUsize>,
        keys: Arc<Mutex<Vec<String>>>,
    }

    async fn serve(tool: FakeTool) -> String {
        let app = Router::new()
            .route(
                "/mcp",
                post({
                    let tool = tool.clone();
                    move |headers: HeaderMap, body: axum::body::Bytes| {
                        let tool = tool.clone();
                        async move { tool.answer(headers, body) }
                    }
                }),
            )
            .route(
                "/{*rest}",
                post(move |headers: HeaderMap, body: axum::body::Bytes| {
                    let tool = tool.clone();
                    async move { tool.answer(headers, body) }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    impl FakeTool {
        fn answer(&self, headers: HeaderMap, body: axum::body::Bytes) -> (StatusCode, String) {
            self.requests.fetch_add(1, Ordering::SeqCst);
            if let Some(k) = headers
                .get(IDEMPOTENCY_HEADER)
                .and_then(|v| v.to_str().ok())
            {
                self.keys.lock().unwrap().push(k.to_string());
            }
            let msg: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            if msg.get("method").and_then(|m| m.as_str()) == Some("tools/list") {
                let list = serde_json::json!({"jsonrpc": "2.0", "id": 1, "result": {"tools": [
                    {"name": "statement", "annotations": {"readOnlyHint": true, "idempotentHint": true}},
                    {"name": "refund", "annotations": {"readOnlyHint": false, "idempotentHint": false}}
                ]}});
                return (StatusCode::OK, list.to_string());
            }
            let status = match self.status.load(Ordering::SeqCst) {
                0 => 200,
                s => s as u16,
            };
            let n = self.requests.load(Ordering::SeqCst);
            (
                StatusCode::from_u16(status).unwrap(),
                format!("{{\"answer\":{n}}}"),
            )
        }
    }

    fn workflow(url: &str, extra_tool: &str) -> AgentWorkflowSpec {
        serde_yaml::from_str(&format!(
            r#"
queue: {{redis: {{url: "redis://localhost"}}}}
policyRef: pol
tools:
  - {{name: bank, url: "{url}/mcp", readOnly: true, idempotent: true, fallback: {{cache: {{ttl: 10m}}}}}}
  - {{name: ledger, url: "{url}/ledger"}}
  - {{name: mcp, url: "{url}/mcp"}}
{extra_tool}
agents:
  - {{name: a, image: i, consumes: in, tools: [bank, ledger, mcp]}}
"#
        ))
        .unwrap()
    }

    fn policies(yaml: &str) -> BTreeMap<String, CircuitPolicySpec> {
        BTreeMap::from([("pol".to_string(), serde_yaml::from_str(yaml).unwrap())])
    }

    /// A proxy whose switch state is known (nothing killed).
    fn proxy(url: &str, policy: &str) -> ToolProxy {
        let client = reqwest::Client::new();
        let p = ToolProxy::new(
            &workflow(url, ""),
            &policies(policy),
            &|_| http_transport(client.clone()),
            None,
            None,
        )
        .unwrap();
        p.set_killed(BTreeSet::new());
        p
    }

    fn tools() -> Vec<String> {
        vec!["bank".into(), "ledger".into(), "mcp".into()]
    }

    fn keyed(key: &str, body: &str) -> HttpRequest {
        let mut r = HttpRequest::post("", body.as_bytes().to_vec());
        r.headers.push((IDEMPOTENCY_HEADER.into(), key.into()));
        r
    }

    const RETRY: &str = "retry: {maxAttempts: 3, backoff: {initial: 1ms, max: 2ms}, budget: {ratio: 1, minPerSecond: 1000}}\n";

    #[tokio::test]
    async fn gates_unknown_unlisted_and_killed_tools() {
        let url = serve(FakeTool::default()).await;
        let p = proxy(&url, RETRY);
        let r = p.call(&tools(), "vault", keyed("k", "{}")).await;
        assert_eq!(r.status, 404);
        let r = p.call(&["bank".into()], "ledger", keyed("k", "{}")).await;
        assert_eq!(r.status, 403);
        assert_eq!(
            r.header(DEGRADED_HEADER),
            Some("ledger; reason=not-allowed")
        );
        p.set_killed(BTreeSet::from(["ledger".to_string()]));
        let r = p.call(&tools(), "ledger", keyed("k", "{}")).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header(DEGRADED_HEADER), Some("ledger; reason=killed"));
        assert!(p.is_down("ledger"));
        p.set_killed(BTreeSet::new());
        assert_eq!(
            p.call(&tools(), "ledger", keyed("k", "{}")).await.status,
            200
        );
    }

    /// Fail closed: nothing is forwarded before the kill switches have been read — not by a
    /// new proxy, not while the state cannot be read — and calls flow once it is known.
    #[tokio::test]
    async fn refuses_every_call_until_the_switch_state_is_read() {
        use crate::queue::memory::MemoryQueue;
        let tool = FakeTool::default();
        let url = serve(tool.clone()).await;
        let cfg = Arc::new(
            crate::engine::WorkflowConfig::new("ns", "wf", &workflow(&url, ""), None)
                .unwrap()
                .with_policies(policies(RETRY)),
        );
        let client = reqwest::Client::new();
        let p = Arc::new(
            cfg.tool_proxy(&|_| http_transport(client.clone()), None, None)
                .unwrap(),
        );
        let r = p.call(&tools(), "ledger", keyed("k", "{}")).await;
        assert_eq!(r.status, 503);
        assert_eq!(
            r.header(DEGRADED_HEADER),
            Some("ledger; reason=killswitch-unknown")
        );
        assert!(p.is_down("ledger"));
        // The state cannot be read (the key holds a string): still refused.
        let q: Arc<dyn crate::queue::Queue> = Arc::new(MemoryQueue::new());
        q.set(&cfg.keys.killswitch(), bytes::Bytes::from("x"), None)
            .await
            .unwrap();
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let sup = tokio::spawn(supervise(
            p.clone(),
            q.clone(),
            cfg.clone(),
            "e".into(),
            stop,
        ));
        tokio::time::sleep(crate::engine::killswitch::REREAD * 2).await;
        assert_eq!(p.check(&tools(), "ledger"), Err(Refusal::SwitchUnknown));
        assert_eq!(tool.requests.load(Ordering::SeqCst), 0, "nothing forwarded");
        q.del(&[cfg.keys.killswitch()]).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while p.check(&tools(), "ledger").is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the proxy never learnt the state"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            p.call(&tools(), "ledger", keyed("k", "{}")).await.status,
            200
        );
        stop_tx.send(true).unwrap();
        sup.await.unwrap();
    }

    #[tokio::test]
    async fn retries_an_idempotent_tool_with_the_same_key() {
        let tool = FakeTool::default();
        tool.status.store(503, Ordering::SeqCst);
        let url = serve(tool.clone()).await;
        let p = proxy(&url, RETRY);
        let r = p
            .call(
                &tools(),
                "bank",
                keyed("task-1:a", r#"{"method":"tools/call"}"#),
            )
            .await;
        assert_eq!(r.status, 503);
        assert_eq!(tool.requests.load(Ordering::SeqCst), 3, "three attempts");
        assert!(tool.keys.lock().unwrap().iter().all(|k| k == "task-1:a"));
        assert_eq!(p.counters()["bank"].retries, 2);
    }

    #[tokio::test]
    async fn never_retries_a_non_idempotent_call_that_reached_the_tool() {
        let tool = FakeTool::default();
        tool.status.store(500, Ordering::SeqCst);
        let url = serve(tool.clone()).await;
        let p = proxy(&url, RETRY);
        let r = p.call(&tools(), "ledger", keyed("task-1:b", "{}")).await;
        assert_eq!(r.status, 500);
        assert_eq!(tool.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn retries_a_non_idempotent_call_that_never_connected() {
        // Nothing listens on this port: every attempt fails to connect.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = proxy(&format!("http://127.0.0.1:{port}"), RETRY);
        let r = p.call(&tools(), "ledger", keyed("k", "{}")).await;
        assert_eq!(r.status, 502);
        assert_eq!(
            r.header(DEGRADED_HEADER),
            Some("ledger; reason=connect-error")
        );
        assert_eq!(p.counters()["ledger"].retries, 2);
    }

    /// Two tools on simulated transports: `slow` answers after 300 ms (policy `fast`),
    /// `flaky` always answers 500 (policy `brk`).
    fn reload_proxy() -> ToolProxy {
        let spec: AgentWorkflowSpec = serde_yaml::from_str(
            r#"
queue: {redis: {url: "redis://x"}}
tools:
  - {name: slow, url: "http://slow.invalid/x", policyRef: fast}
  - {name: flaky, url: "http://flaky.invalid/x", policyRef: brk}
agents:
  - {name: a, image: i, consumes: in, tools: [slow, flaky]}
"#,
        )
        .unwrap();
        let transport = |t: &ToolSpec| -> Transport {
            let slow = t.name == "slow";
            BoxCloneService::new(tower::service_fn(move |_: HttpRequest| async move {
                if slow {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok::<_, BoxError>(HttpResponse::new(200, b"{}".to_vec()))
                } else {
                    Ok(HttpResponse::new(500, b"{}".to_vec()))
                }
            }))
        };
        let p = ToolProxy::new(&spec, &reload_set(100, "brk"), &transport, None, None).unwrap();
        p.set_killed(BTreeSet::new());
        p
    }

    /// `fast` with the given per-attempt timeout; `brk` under the name `brk_name`.
    fn reload_set(per_attempt_ms: u64, brk_name: &str) -> BTreeMap<String, CircuitPolicySpec> {
        BTreeMap::from([
            (
                "fast".to_string(),
                serde_yaml::from_str(&format!("timeout: {{perAttempt: {per_attempt_ms}ms}}"))
                    .unwrap(),
            ),
            (
                brk_name.to_string(),
                serde_yaml::from_str("circuitBreaker: {failureRateThreshold: 0.5, window: {type: Count, size: 4}, minimumCalls: 4, openDuration: 1h}").unwrap(),
            ),
        ])
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_rebuilds_only_the_changed_tools() {
        use super::super::policies::PolicySet;
        let p = Arc::new(reload_proxy());
        let both = vec!["slow".to_string(), "flaky".to_string()];
        let rebuilt_breakers: Arc<Mutex<Vec<String>>> = Arc::default();
        {
            let seen = rebuilt_breakers.clone();
            p.on_new_breaker(move |tool, _, _| seen.lock().unwrap().push(tool.to_owned()));
        }
        assert_eq!(p.call(&both, "slow", keyed("k", "{}")).await.status, 504);
        for _ in 0..4 {
            p.call(&both, "flaky", keyed("k", "{}")).await;
        }
        assert_eq!(p.breaker_states()["flaky"], BreakerState::Open);
        // A call in flight when the set changes finishes on the stack it started with.
        let in_flight = tokio::spawn({
            let (p, both) = (p.clone(), both.clone());
            async move { p.call(&both, "slow", keyed("k", "{}")).await.status }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let v1 = PolicySet {
            version: 1,
            policies: reload_set(2000, "brk"),
        };
        assert_eq!(p.apply(&v1).unwrap(), ["slow"]);
        assert_eq!(p.policy_version(), 1);
        assert_eq!(in_flight.await.unwrap(), 504, "the old 100 ms deadline");
        let started = tokio::time::Instant::now();
        assert_eq!(p.call(&both, "slow", keyed("k", "{}")).await.status, 200);
        assert_eq!(started.elapsed(), Duration::from_millis(300));
        // The unchanged tool kept its breaker, still open.
        assert_eq!(p.breaker_states()["flaky"], BreakerState::Open);
        assert_eq!(
            p.call(&both, "flaky", keyed("k", "{}"))
                .await
                .header(DEGRADED_HEADER),
            Some("flaky; reason=breaker-open")
        );
        assert!(rebuilt_breakers.lock().unwrap().is_empty());
        // The version running: ignored.
        let old = PolicySet {
            version: 1,
            policies: reload_set(100, "brk"),
        };
        assert_eq!(p.apply(&old).unwrap(), Vec::<String>::new());
        // A set `flaky` cannot resolve its policy in: refused whole, nothing changes.
        let missing = PolicySet {
            version: 2,
            policies: reload_set(100, "other"),
        };
        let e = p.apply(&missing).unwrap_err();
        assert_eq!(e.path, "spec.tools[1].policyRef");
        assert_eq!(p.policy_version(), 1);
        assert_eq!(p.call(&both, "slow", keyed("k", "{}")).await.status, 200);
        // Changing the breaker's policy rebuilds it closed, and the hook hears of it.
        let mut changed = reload_set(2000, "brk");
        changed.insert(
            "brk".into(),
            serde_yaml::from_str("circuitBreaker: {failureRateThreshold: 0.9, window: {type: Count, size: 4}, minimumCalls: 4, openDuration: 1h}").unwrap(),
        );
        let v3 = PolicySet {
            version: 3,
            policies: changed,
        };
        assert_eq!(p.apply(&v3).unwrap(), ["flaky"]);
        assert_eq!(p.breaker_states()["flaky"], BreakerState::Closed);
        assert_eq!(*rebuilt_breakers.lock().unwrap(), ["flaky"]);
        // The tool's counters go on across rebuilds.
        assert!(
            p.counters()["flaky"].calls >= 5,
            "{:?}",
            p.counters()["flaky"]
        );
    }

    #[tokio::test]
    async fn opens_the_breaker_then_serves_cached_statements() {
        let tool = FakeTool::default();
        let url = serve(tool.clone()).await;
        let p = proxy(
            &url,
            "circuitBreaker: {failureRateThreshold: 0.5, window: {type: Count, size: 4}, minimumCalls: 4, openDuration: 1h}\n",
        );
        let q = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"statement","arguments":{"account":"42"}}}"#;
        let good = p.call(&tools(), "bank", keyed("t1", q)).await;
        assert_eq!(good.status, 200);
        tool.status.store(500, Ordering::SeqCst);
        // Same question, another JSON-RPC id: answered from the cache while the bank fails.
        let q2 = q.replace("\"id\":7", "\"id\":8");
        for _ in 0..4 {
            let r = p.call(&tools(), "bank", keyed("t2", &q2)).await;
            assert_eq!(r.status, 200);
            assert_eq!(r.body, good.body);
            assert_eq!(r.header(DEGRADED_HEADER), Some("bank; reason=fallback"));
        }
        assert_eq!(p.breaker_states()["bank"], BreakerState::Open);
        let sent = tool.requests.load(Ordering::SeqCst);
        // Open: nothing reaches the bank; a question never asked before has no cached answer.
        let other = q.replace("42", "43");
        let r = p.call(&tools(), "bank", keyed("t3", &other)).await;
        assert_eq!(r.status, 503);
        assert_eq!(r.header(DEGRADED_HEADER), Some("bank; reason=breaker-open"));
        assert_eq!(tool.requests.load(Ordering::SeqCst), sent);
        assert!(p.is_down("bank"));
        assert!(p.counters()["bank"].fallbacks >= 4);
    }

    #[test]
    fn the_cache_key_is_the_question_not_who_asks_it() {
        let key = |url: &str, key: &str, body: &str| {
            let mut c = ToolCall {
                request: keyed(key, body),
                idempotent: true,
                read_only: true,
                sent: Arc::default(),
            };
            c.request.url = url.to_owned();
            c.cache_key().unwrap()
        };
        let url = "http://bank:8080/mcp";
        let q = r#"{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"statement","arguments":{"account":"42"}}}"#;
        let base = key(url, "t1:investigation", q);
        assert!(
            !base.contains("t1:investigation") && !base.contains("bank:8080"),
            "{base}"
        );
        // Another task, another JSON-RPC id, members in another order: the same question.
        let reordered = r#"{"params":{"arguments":{"account":"42"},"name":"statement"},"method":"tools/call","id":"x-9","jsonrpc":"2.0"}"#;
        assert_eq!(key(url, "t2:investigation", reordered), base);
        // An idempotency key carried in the body, by name or by value, is not the question.
        let with_key = |k: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"statement","arguments":{{"account":"42","idempotency_key":"{k}"}},"_meta":{{"idempotencyKey":"{k}","request":"{k}"}}}}}}"#
            )
        };
        assert_eq!(
            key(url, "t3:investigation", &with_key("t3:investigation")),
            key(url, "t4:investigation", &with_key("t4:investigation")),
        );
        // A different question, path or method is a different key.
        assert_ne!(key(url, "t1:investigation", &q.replace("42", "43")), base);
        assert_ne!(key("http://bank:8080/mcp/v2", "t1:investigation", q), base);
        let mut get = ToolCall {
            request: keyed("t1:investigation", q),
            idempotent: true,
            read_only: true,
            sent: Arc::default(),
        };
        get.request.url = url.into();
        get.request.method = "PUT".into();
        assert_ne!(get.cache_key().unwrap(), base);
        // Writes are never cached.
        get.read_only = false;
        assert_eq!(get.cache_key(), None);
    }

    #[tokio::test]
    async fn mcp_annotations_decide_idempotency_per_tool() {
        let tool = FakeTool::default();
        let url = serve(tool.clone()).await;
        let client = reqwest::Client::new();
        let transport = move |_: &ToolSpec| http_transport(client.clone());
        let p = ToolProxy::new(
            &workflow(&url, ""),
            &policies(RETRY),
            &transport,
            None,
            None,
        )
        .unwrap();
        p.set_killed(BTreeSet::new());
        p.discover_mcp(&transport).await;
        tool.status.store(500, Ordering::SeqCst);
        let before = tool.requests.load(Ordering::SeqCst);
        let call = |name: &str| {
            format!(
                r#"{{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{{"name":"{name}"}}}}"#
            )
        };
        p.call(&tools(), "mcp", keyed("k1", &call("statement")))
            .await;
        assert_eq!(
            tool.requests.load(Ordering::SeqCst) - before,
            3,
            "idempotentHint: retried"
        );
        let before = tool.requests.load(Ordering::SeqCst);
        p.call(&tools(), "mcp", keyed("k2", &call("refund"))).await;
        assert_eq!(
            tool.requests.load(Ordering::SeqCst) - before,
            1,
            "not idempotent: not retried"
        );
    }

    #[tokio::test]
    async fn the_http_front_forwards_path_and_key() {
        let tool = FakeTool::default();
        let url = serve(tool.clone()).await;
        let p = Arc::new(proxy(&url, RETRY));
        let app = http::router(p, vec!["ledger".into()]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = reqwest::Client::new();
        let r = client
            .post(format!("http://{addr}/tools/ledger/entries"))
            .header(IDEMPOTENCY_HEADER, "task-9:resolution")
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(tool.keys.lock().unwrap().as_slice(), ["task-9:resolution"]);
        let r = client
            .post(format!("http://{addr}/tools/bank"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[DEGRADED_HEADER], "bank; reason=not-allowed");
    }

    #[tokio::test]
    async fn supervisor_publishes_breaker_states_and_applies_kill_switches() {
        use crate::engine::breakers::BreakerStates;
        use crate::engine::killswitch::{self, Target};
        use crate::queue::memory::MemoryQueue;
        let tool = FakeTool::default();
        tool.status.store(500, Ordering::SeqCst);
        let url = serve(tool.clone()).await;
        let policy = "circuitBreaker: {failureRateThreshold: 0.5, window: {type: Count, size: 4}, minimumCalls: 4, openDuration: 1h}\n";
        let cfg = Arc::new(
            crate::engine::WorkflowConfig::new("ns", "wf", &workflow(&url, ""), None)
                .unwrap()
                .with_policies(policies(policy)),
        );
        let client = reqwest::Client::new();
        let proxy = Arc::new(
            cfg.tool_proxy(&|_| http_transport(client.clone()), None, None)
                .unwrap(),
        );
        let q: Arc<dyn crate::queue::Queue> = Arc::new(MemoryQueue::new());
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let sup = tokio::spawn(supervise(
            proxy.clone(),
            q.clone(),
            cfg.clone(),
            "e1".into(),
            stop,
        ));
        // Calls are refused until the supervisor has read the kill switches.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while proxy.check(&tools(), "ledger") == Err(Refusal::SwitchUnknown) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "switches never read"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for _ in 0..4 {
            proxy.call(&tools(), "ledger", keyed("k", "{}")).await;
        }
        assert_eq!(proxy.breaker_states()["ledger"], BreakerState::Open);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let open = BreakerStates::new(q.as_ref(), &cfg.keys)
                .open_tools()
                .await
                .unwrap();
            if open == vec!["ledger".to_string()] {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "breaker state never published: {open:?}"
            );
            tokio::task::yield_now().await;
        }
        killswitch::engage(q.as_ref(), &cfg.keys, &Target::Tool("bank".into()))
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while proxy.check(&tools(), "bank") != Err(Refusal::Killed) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "kill switch never reached the proxy"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(true).unwrap();
        sup.await.unwrap();
    }

    #[test]
    fn protocol_follows_the_url_unless_set() {
        let t = |url: &str| ToolSpec {
            name: "t".into(),
            url: url.into(),
            protocol: None,
            policy_ref: None,
            idempotent: None,
            read_only: None,
            fallback: None,
            headers_from: Vec::new(),
            simulate: None,
        };
        assert_eq!(protocol_of(&t("http://x:8080/mcp")), ToolProtocol::Mcp);
        assert_eq!(protocol_of(&t("http://x:8080/mcp/")), ToolProtocol::Mcp);
        assert_eq!(
            protocol_of(&t("http://x:8080/v1/entries")),
            ToolProtocol::Http
        );
    }

    #[tokio::test]
    async fn errors_given_to_the_agent_carry_no_url() {
        // Nothing listens on this port; the URL's query holds a token.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = proxy(&format!("http://127.0.0.1:{port}/x?key=hunter2&"), RETRY);
        let r = p.call(&tools(), "ledger", keyed("k", "{}")).await;
        assert_eq!(r.status, 502);
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains("connect"), "{body}");
        assert!(
            !body.contains("hunter2") && !body.contains("127.0.0.1"),
            "{body}"
        );
    }

    /// A tool server whose routes never answer or answer `size` bytes (chunked or not).
    async fn serve_misbehaving(size: usize) -> String {
        let app = Router::new()
            .route(
                "/hang",
                post(|| async {
                    std::future::pending::<()>().await;
                    ""
                }),
            )
            .route("/big", post(move || async move { "x".repeat(size) }))
            .route(
                "/big-chunked",
                post(move || async move {
                    let chunks = (0..size / 512)
                        .map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 512])));
                    axum::body::Body::from_stream(futures::stream::iter(chunks))
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    fn one_tool(
        url: &str,
        policy: Option<&str>,
    ) -> (AgentWorkflowSpec, BTreeMap<String, CircuitPolicySpec>) {
        let spec = serde_yaml::from_str(&format!(
            "queue: {{redis: {{url: \"redis://x\"}}}}\n{}tools:\n  - {{name: t, url: \"{url}\"}}\nagents:\n  - {{name: a, image: i, consumes: in, tools: [t]}}\n",
            if policy.is_some() { "policyRef: pol\n" } else { "" }
        ))
        .unwrap();
        (spec, policy.map(policies).unwrap_or_default())
    }

    #[tokio::test]
    async fn a_tool_that_never_answers_fails_within_the_policy_timeout() {
        let url = serve_misbehaving(0).await;
        let (spec, pols) = one_tool(&format!("{url}/hang"), Some("timeout: {overall: 300ms}\n"));
        let client = reqwest::Client::new();
        let p = ToolProxy::new(
            &spec,
            &pols,
            &|_| http_transport(client.clone()),
            None,
            None,
        )
        .unwrap();
        p.set_killed(BTreeSet::new());
        let started = std::time::Instant::now();
        let r = p.call(&["t".into()], "t", keyed("k", "{}")).await;
        assert_eq!(r.status, 504);
        assert_eq!(r.header(DEGRADED_HEADER), Some("t; reason=timeout"));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_policy_a_hung_tool_fails_after_the_default_deadline() {
        let (spec, pols) = one_tool("http://tool.invalid/x", None);
        let hung: Transport = BoxCloneService::new(tower::service_fn(|_: HttpRequest| {
            std::future::pending::<Result<HttpResponse, BoxError>>()
        }));
        let p = ToolProxy::new(&spec, &pols, &|_| hung.clone(), None, None).unwrap();
        p.set_killed(BTreeSet::new());
        let started = tokio::time::Instant::now();
        let r = p.call(&["t".into()], "t", keyed("k", "{}")).await;
        assert_eq!(r.status, 504);
        assert_eq!(
            started.elapsed(),
            crate::resilience::DEFAULT_OVERALL_TIMEOUT
        );
    }

    #[tokio::test]
    async fn oversized_tool_answers_are_refused() {
        let url = serve_misbehaving(4096).await;
        let client = reqwest::Client::new();
        let options = HttpToolOptions {
            max_response: 1024,
            ..HttpToolOptions::default()
        };
        for path in ["/big", "/big-chunked"] {
            let (spec, pols) = one_tool(&format!("{url}{path}"), None);
            let p = ToolProxy::new(
                &spec,
                &pols,
                &|_| http_transport_with(client.clone(), options.clone()),
                None,
                None,
            )
            .unwrap();
            p.set_killed(BTreeSet::new());
            let r = p.call(&["t".into()], "t", keyed("k", "{}")).await;
            assert_eq!(r.status, 502, "{path}");
            let body = String::from_utf8_lossy(&r.body);
            assert!(
                body.contains("answer larger than 1024 bytes"),
                "{path}: {body}"
            );
        }
    }

    #[test]
    fn forward_url_never_leaves_the_base() {
        let bases = [
            "http://tool.example:8080/ledger",
            "https://tool.example/api/v1/",
            "http://10.0.0.1/x?tenant=7",
            "http://tool.example",
        ];
        let parts = [
            "a",
            "b",
            ".",
            "..",
            "/",
            "//",
            "%2e",
            "%2E",
            "%2e%2e",
            ".%2e",
            "%2f",
            "%2F",
            "%5c",
            "\\",
            "?",
            "#",
            "%3f",
            "%23",
            "%25",
            "%252e",
            "%00",
            "%",
            "%zz",
            "@",
            ":",
            ";",
            "~",
            "http:",
            "//evil.example",
            "é",
            " ",
            "\t",
            "&",
            "=",
            "x.y",
            "...",
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n as u64) as usize
        };
        let (mut accepted, mut refused) = (0, 0);
        for round in 0..50_000 {
            let base = bases[round % bases.len()];
            let sub: String = (0..1 + next(6)).map(|_| parts[next(parts.len())]).collect();
            let Ok(joined) = forward_url(base, &sub) else {
                refused += 1;
                continue;
            };
            accepted += 1;
            let (b, j) = (
                reqwest::Url::parse(base).unwrap(),
                reqwest::Url::parse(&joined).unwrap(),
            );
            let prefix = format!("{}/", b.path().trim_end_matches('/'));
            assert!(
                j.origin() == b.origin()
                    && j.path().starts_with(&prefix)
                    && j.query() == b.query()
                    && j.fragment().is_none()
                    && !j.path()[prefix.len()..]
                        .split('/')
                        .any(|s| s == "." || s == ".."),
                "{base} + {sub:?} = {joined}"
            );
            // What the tool receives parses back to the same URL: nothing left to normalise.
            assert_eq!(reqwest::Url::parse(j.as_str()).unwrap(), j, "{joined}");
        }
        assert!(accepted > 1000 && refused > 1000, "{accepted} / {refused}");
        // The plain cases.
        assert_eq!(
            forward_url("http://t/ledger", "entries/7").unwrap(),
            "http://t/ledger/entries/7"
        );
        assert_eq!(
            forward_url("http://t/api?k=1", "/entries").unwrap(),
            "http://t/api/entries?k=1"
        );
        assert_eq!(forward_url("http://t/mcp", "").unwrap(), "http://t/mcp");
        for bad in [
            "..",
            "a/../../admin",
            "%2e%2e/admin",
            "a?x=1",
            "a#f",
            "a\\b",
            "%252e%252e",
        ] {
            assert!(forward_url("http://t/ledger", bad).is_err(), "{bad}");
        }
    }

    /// One raw HTTP/1.1 request (no client-side URL normalisation); the status code.
    async fn raw_post(addr: std::net::SocketAddr, path: &str) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        text.split(' ').nth(1).unwrap_or("0").parse().unwrap_or(0)
    }

    #[tokio::test]
    async fn the_http_front_refuses_paths_that_leave_the_tool() {
        let tool = FakeTool::default();
        let url = serve(tool.clone()).await;
        let p = Arc::new(proxy(&url, RETRY));
        let app = http::router(p, vec!["ledger".into()]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        for path in [
            "/tools/ledger/%2e%2e/admin",
            "/tools/ledger/%2E%2e",
            "/tools/ledger/..%2fadmin",
            "/tools/ledger/a/%2e%2e/%2e%2e/admin",
            "/tools/ledger/%252e%252e/admin",
            "/tools/ledger/a%3Fdebug=1",
            "/tools/ledger/a%23frag",
            "/tools/ledger/a%5c..%5cadmin",
        ] {
            assert_eq!(raw_post(addr, path).await, 400, "{path}");
        }
        assert_eq!(
            tool.requests.load(Ordering::SeqCst),
            0,
            "nothing reached the tool"
        );
        assert_eq!(raw_post(addr, "/tools/ledger/entries/7").await, 200);
        assert_eq!(tool.requests.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn tool_credentials_come_from_files_and_are_sent() {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let s2 = seen.clone();
        let app = Router::new().route(
            "/api",
            post(move |h: HeaderMap| {
                let seen = s2.clone();
                async move {
                    let a = h.get("authorization").and_then(|v| v.to_str().ok());
                    seen.lock().unwrap().push(a.unwrap_or("").to_string());
                    "{}"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let spec: AgentWorkflowSpec = serde_yaml::from_str(&format!(
            r#"
queue: {{redis: {{url: "redis://x"}}}}
tools:
  - name: t
    url: "http://{addr}/api"
    headersFrom: [{{name: Authorization, secretRef: {{name: tool-creds, key: token}}}}]
agents:
  - {{name: a, image: i, consumes: in, tools: [t]}}
"#
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let e = load_tool_headers(&spec, &["t".into()], dir.path()).unwrap_err();
        assert!(
            e.starts_with("spec.tools[0].headersFrom[0]: cannot read ")
                && e.contains("t/authorization"),
            "{e}"
        );
        std::fs::create_dir(dir.path().join("t")).unwrap();
        std::fs::write(dir.path().join("t/authorization"), "Bearer s3cret-value\n").unwrap();
        assert!(
            load_tool_headers(&spec, &[], dir.path())
                .unwrap()
                .is_empty(),
            "only the agent's tools"
        );
        let mut headers = load_tool_headers(&spec, &["t".into()], dir.path()).unwrap();
        let h = headers.remove("t").unwrap();
        assert!(h[0].1.is_sensitive() && !format!("{h:?}").contains("s3cret"));
        let client = http_client(None).unwrap();
        let options = HttpToolOptions {
            headers: h,
            ..HttpToolOptions::default()
        };
        let p = ToolProxy::new(
            &spec,
            &BTreeMap::new(),
            &|_| http_transport_with(client.clone(), options.clone()),
            None,
            None,
        )
        .unwrap();
        p.set_killed(BTreeSet::new());
        assert_eq!(
            p.call(&["t".into()], "t", keyed("k", "{}")).await.status,
            200
        );
        assert_eq!(seen.lock().unwrap().as_slice(), ["Bearer s3cret-value"]);
    }
}
