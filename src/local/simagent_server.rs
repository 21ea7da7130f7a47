//! `r4 sim-agent`: a simulated agent behind the real agent protocol, so a cluster (kind in the
//! e2e workflow) has an agent container to run without anyone writing one.
//!
//! It owns the agent side of the protocol that [`crate::engine::delivery`] speaks: `POST /tasks`
//! with the body `{task_id, step, kind, payload, attempt}` and the headers `Idempotency-Key`,
//! `traceparent` and `X-R4-Deadline-Ms`; `GET /healthz` and `GET /readyz`. Its behaviour is a
//! few knobs ([`Options`]): a latency drawn from [`LatencyModel`] (the model of `r4 run`'s
//! simulated agents), a share of retryable (503) and of permanent (422) failures, and tool calls
//! made per delivery through the engine's tool proxy, carrying the delivery's key and trace.
//! What the engine does with the answers (retries, DLQ, degraded mode) is the engine's; this
//! module makes one answer per request and keeps no state between requests.
//!
//! # Answers
//! - `200 {"output": <payload + "r4_sim" record>}` — the payload passed on with
//!   `"r4_sim": {"agent", "step", "attempt"}` added (plus `"calls"`, the tool answers, and
//!   `"degraded"`, the `r4-degraded` values of answers a fallback gave). A compensation is
//!   answered `200 {}` after the latency, without failures or tool calls.
//! - `400 {"error"}` — a request the protocol does not allow (bad JSON, a missing field, no
//!   `Idempotency-Key`, a bad `X-R4-Deadline-Ms`, a payload that is not a JSON object): the
//!   engine dead-letters it at once, which is what a malformed task deserves.
//! - `422 {"error"[, "tool"]}` — a simulated permanent failure, or a tool answered a 4xx other
//!   than 408/429 (a refusal or a bad call: asking again cannot help).
//! - `503 {"error"[, "tool"]}` — a simulated failure, or a tool failed (5xx, 408, 429, the
//!   proxy unreachable, a killed tool or an open breaker): retryable, and the `tool` field names
//!   the dependency, so the engine's degraded mode and the repair role act on it.
//! - `504 {"error"[, "tool"]}` — the task's deadline (`X-R4-Deadline-Ms`) ran out here.
//!
//! Every await of a request is bounded by its deadline: the latency is cut at it, and each tool
//! call's own timeout is what is left of it ([`call_timeout`]), so a late answer says what ran
//! out of time (the agent, or the tool it names).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use rand::Rng;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::sim::LatencyModel;
use crate::api::workflow::LatencySpec;
use crate::engine::delivery::{DeliveryRequest, RequestKind};
use crate::engine::tools::{DEGRADED_HEADER, IDEMPOTENCY_HEADER};
use crate::telemetry::trace::TRACEPARENT;

// The agent protocol's names are the engine's (`engine::delivery`), which the controller
// renders into the agent container too.
pub use crate::engine::delivery::{
    AGENT_PORT_ENV, DEADLINE_HEADER, DEFAULT_AGENT_PORT, TOOLS_URL_ENV,
};
/// The tool proxy without [`TOOLS_URL_ENV`] (`r4 engine --tools-listen`'s default).
pub const DEFAULT_TOOLS_URL: &str = "http://127.0.0.1:8082";
/// The deadline of a request without [`DEADLINE_HEADER`] (a hand-made `curl`).
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// The longest deadline honoured: a larger header value is cut to this (no request should hold
/// a connection for longer, and an instant that far ahead could not be represented).
pub const MAX_DEADLINE: Duration = Duration::from_secs(3600);
/// Largest request body read (the engine's payloads are bounded by `maxPayloadBytes`, 1 MiB by
/// default); a larger one is answered 413.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// How the simulated agent behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// Named in every output's `r4_sim.agent` and in the logs.
    pub name: String,
    /// Latency of every delivery.
    pub latency: LatencySpec,
    /// Share of task deliveries answered 503 (retryable).
    pub error_rate: f64,
    /// Share of task deliveries answered 422 (permanent); drawn before `error_rate`.
    pub fail_permanently_rate: f64,
    /// Tool calls made per task delivery, in order.
    pub calls: Vec<ToolTarget>,
    /// Base URL of the engine's tool proxy (`…/tools/<tool>[/path]` is appended).
    pub tools_url: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: "sim-agent".into(),
            // `--latency 10ms`.
            latency: LatencySpec {
                median_ms: 10.0,
                p99_ms: Some(10.0),
                tail: None,
            },
            error_rate: 0.0,
            fail_permanently_rate: 0.0,
            calls: Vec::new(),
            tools_url: DEFAULT_TOOLS_URL.into(),
        }
    }
}

/// One tool call per delivery: `TOOL` or `TOOL/path` (`POST <tools-url>/tools/TOOL[/path]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolTarget {
    pub tool: String,
    /// Empty, or the path after the tool's name starting with `/`.
    pub path: String,
}

impl std::str::FromStr for ToolTarget {
    type Err = String;

    /// `bank`, `bank/statements/latest`: a tool name as a workflow spells it (letters, digits,
    /// `-`, `_`, `.`), then an optional path without spaces, `?` or `#`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (tool, path) = match s.split_once('/') {
            Some((t, p)) => (t, format!("/{p}")),
            None => (s, String::new()),
        };
        let name_ok = !tool.is_empty()
            && tool
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(format!(
                "expected TOOL or TOOL/path with TOOL a tool's name, got {s:?}"
            ));
        }
        if path == "/" || path.contains("//") {
            return Err(format!("empty path segment in {s:?}"));
        }
        if path
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '?' || c == '#')
        {
            return Err(format!("the path of {s:?} may not hold spaces, `?` or `#`"));
        }
        Ok(Self {
            tool: tool.to_owned(),
            path,
        })
    }
}

impl std::fmt::Display for ToolTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.tool, self.path)
    }
}

/// `--latency`: `MEDIAN` (every delivery takes about that long) or `MEDIAN,P99` (log-normal
/// through both, as `simulate.latency` in a manifest), each a duration (`20ms`, `1s`);
/// `P99` may not be below `MEDIAN`.
pub fn parse_latency(s: &str) -> Result<LatencySpec, String> {
    let ms = |part: &str| crate::api::parse_duration(part.trim()).map(|d| d.as_secs_f64() * 1000.0);
    let (median, p99) = match s.split_once(',') {
        Some((m, p)) => (ms(m)?, ms(p)?),
        None => {
            let m = ms(s)?;
            (m, m)
        }
    };
    if p99 < median {
        return Err(format!("the p99 of {s:?} is below its median"));
    }
    if median > MAX_DEADLINE.as_secs_f64() * 1000.0 {
        return Err(format!(
            "{s:?} is longer than any deadline ({MAX_DEADLINE:?})"
        ));
    }
    Ok(LatencySpec {
        median_ms: median,
        p99_ms: Some(p99),
        tail: None,
    })
}

/// `--error-rate`, `--fail-permanently-rate`: a fraction in [0, 1].
pub fn parse_rate(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("expected a fraction in [0, 1], got {s:?}")),
    }
}

/// `--tools-url`: an `http://` or `https://` URL.
pub fn parse_tools_url(s: &str) -> Result<String, String> {
    match reqwest::Url::parse(s) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {
            Ok(s.trim_end_matches('/').to_owned())
        }
        Ok(_) => Err(format!("expected an http:// or https:// URL, got {s:?}")),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// `R4_SIM_NAME`: the agent's name (`--name`).
pub const NAME_ENV: &str = "R4_SIM_NAME";
/// `R4_SIM_LATENCY`: `--latency`.
pub const LATENCY_ENV: &str = "R4_SIM_LATENCY";
/// `R4_SIM_ERROR_RATE`: `--error-rate`.
pub const ERROR_RATE_ENV: &str = "R4_SIM_ERROR_RATE";
/// `R4_SIM_FAIL_PERMANENTLY_RATE`: `--fail-permanently-rate`.
pub const FAIL_PERMANENTLY_RATE_ENV: &str = "R4_SIM_FAIL_PERMANENTLY_RATE";
/// `R4_SIM_CALLS`: `--call`, comma-separated.
pub const CALLS_ENV: &str = "R4_SIM_CALLS";

/// The options a container's environment gives (`lookup` reads one variable): the `R4_SIM_*`
/// variables and [`TOOLS_URL_ENV`], each read as its flag reads it, the defaults of the flags
/// otherwise, and `default_name` when [`NAME_ENV`] is unset. `r4 dev` runs a sim-agent
/// container from its `env` with this; `r4 sim-agent` reads the same variables through its
/// flags. An error names the variable.
pub fn options_from_env(
    lookup: impl Fn(&str) -> Option<String>,
    default_name: &str,
) -> Result<Options, String> {
    let named = |var: &str, e: String| format!("{var}: {e}");
    let mut o = Options {
        name: lookup(NAME_ENV)
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| default_name.to_owned()),
        ..Options::default()
    };
    if let Some(v) = lookup(LATENCY_ENV) {
        o.latency = parse_latency(&v).map_err(|e| named(LATENCY_ENV, e))?;
    }
    if let Some(v) = lookup(ERROR_RATE_ENV) {
        o.error_rate = parse_rate(&v).map_err(|e| named(ERROR_RATE_ENV, e))?;
    }
    if let Some(v) = lookup(FAIL_PERMANENTLY_RATE_ENV) {
        o.fail_permanently_rate =
            parse_rate(&v).map_err(|e| named(FAIL_PERMANENTLY_RATE_ENV, e))?;
    }
    if let Some(v) = lookup(CALLS_ENV) {
        o.calls = v
            .split(',')
            .filter(|c| !c.trim().is_empty())
            .map(|c| c.trim().parse::<ToolTarget>())
            .collect::<Result<_, _>>()
            .map_err(|e| named(CALLS_ENV, e))?;
    }
    if let Some(v) = lookup(TOOLS_URL_ENV) {
        o.tools_url = parse_tools_url(&v).map_err(|e| named(TOOLS_URL_ENV, e))?;
    }
    Ok(o)
}

/// The address to listen on: `listen` if given, else `0.0.0.0:<port>` with the port from
/// [`AGENT_PORT_ENV`]'s value `port_env` (what the controller gives the agent container),
/// else [`DEFAULT_AGENT_PORT`]. Errors name the variable.
pub fn listen_addr(
    listen: Option<SocketAddr>,
    port_env: Option<&str>,
) -> Result<SocketAddr, String> {
    if let Some(a) = listen {
        return Ok(a);
    }
    let port = match port_env {
        None => DEFAULT_AGENT_PORT,
        Some(v) => v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("{AGENT_PORT_ENV}: expected a port in 1..65535, got {v:?}"))?,
    };
    Ok(SocketAddr::from(([0, 0, 0, 0], port)))
}

/// The time a request may take, from its [`DEADLINE_HEADER`] (milliseconds): absent →
/// [`DEFAULT_DEADLINE`], above [`MAX_DEADLINE`] → `MAX_DEADLINE`, not a number → an error
/// naming the header.
pub fn request_deadline(header: Option<&str>) -> Result<Duration, String> {
    let Some(v) = header else {
        return Ok(DEFAULT_DEADLINE);
    };
    let ms: u64 = v
        .trim()
        .parse()
        .map_err(|_| format!("X-R4-Deadline-Ms: expected milliseconds, got {v:?}"))?;
    Ok(Duration::from_millis(ms).min(MAX_DEADLINE))
}

/// The timeout of a tool call started at `now` for a request due at `deadline`: what is left,
/// or `None` when nothing is (the call is not made).
pub fn call_timeout(deadline: Instant, now: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(now)
        .filter(|d| !d.is_zero())
}

/// The simulated agent: its options, latency model and HTTP client (every replica of the
/// router shares one).
pub struct SimAgentServer {
    opts: Options,
    latency: LatencyModel,
    client: reqwest::Client,
}

/// One answer: status and JSON body.
struct Answer {
    status: StatusCode,
    body: Value,
    /// Why it is not a 200, for the log line.
    reason: Option<String>,
}

impl Answer {
    fn ok(body: Value) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            reason: None,
        }
    }

    fn fail(status: StatusCode, error: String, tool: Option<&str>) -> Self {
        let mut body = json!({ "error": error });
        if let Some(t) = tool {
            body["tool"] = json!(t);
        }
        Self {
            status,
            body,
            reason: Some(error),
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body)).into_response()
    }
}

impl SimAgentServer {
    /// An agent with `opts` (validated by the parsers above; a rate out of range is clamped).
    pub fn new(opts: Options) -> Result<Self, String> {
        // Tool calls go to the engine in the same pod: no proxy, no redirect to follow.
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            latency: LatencyModel::new(&opts.latency),
            opts: Options {
                error_rate: opts.error_rate.clamp(0.0, 1.0),
                fail_permanently_rate: opts.fail_permanently_rate.clamp(0.0, 1.0),
                ..opts
            },
            client,
        })
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    /// `POST /tasks`, `GET /healthz`, `GET /readyz`.
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/tasks", post(tasks))
            .route("/healthz", get(|| async { "ok\n" }))
            // Ready as soon as it listens: it needs nothing else. Once stopping it accepts no
            // connection, so a probe fails from then on.
            .route("/readyz", get(|| async { "ready\n" }))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self)
    }

    /// Serve on `listener` until `stop` turns true; then the listener closes and the requests
    /// in flight finish (within the engine's HTTP drain limit, as every r4 server's).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        crate::engine::http::serve(listener, self.router(), stop).await
    }

    /// The request of a `POST /tasks`, or why the protocol does not allow it.
    fn parse(&self, headers: &HeaderMap, body: &[u8]) -> Result<DeliveryRequest, String> {
        let header = |name: &str| -> Result<Option<&str>, String> {
            headers
                .get(name)
                .map(|v| {
                    v.to_str()
                        .map_err(|_| format!("{name}: not a visible ASCII string"))
                })
                .transpose()
        };
        let mut req: DeliveryRequest =
            serde_json::from_slice(body).map_err(|e| format!("body: {e}"))?;
        req.idempotency_key = header(IDEMPOTENCY_HEADER)?
            .filter(|k| !k.trim().is_empty())
            .ok_or("Idempotency-Key: missing")?
            .to_owned();
        req.traceparent = header(TRACEPARENT)?.unwrap_or_default().to_owned();
        req.deadline = request_deadline(header(DEADLINE_HEADER)?)?;
        if req.kind == RequestKind::Task && !req.payload.is_object() {
            return Err("payload: must be a JSON object".into());
        }
        Ok(req)
    }

    /// One delivery, within its deadline.
    async fn work(&self, req: &DeliveryRequest, deadline: Instant) -> Answer {
        let (delay, permanent, fails) = {
            let mut rng = rand::rng();
            (
                self.latency.sample(&mut rng),
                rng.random::<f64>() < self.opts.fail_permanently_rate,
                rng.random::<f64>() < self.opts.error_rate,
            )
        };
        // Each phase is bounded by the deadline itself (the sleep here, each call's timeout
        // below), so the answer names what ran out of time.
        let wake = Instant::now() + delay;
        if wake > deadline {
            tokio::time::sleep_until(deadline).await;
            return Answer::fail(
                StatusCode::GATEWAY_TIMEOUT,
                format!(
                    "{}: the task's deadline ({} ms) ran out",
                    self.opts.name,
                    req.deadline.as_millis()
                ),
                None,
            );
        }
        tokio::time::sleep_until(wake).await;
        if req.kind == RequestKind::Compensate {
            return Answer::ok(json!({}));
        }
        if permanent {
            return Answer::fail(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!(
                    "{}: simulated permanent failure (--fail-permanently-rate)",
                    self.opts.name
                ),
                None,
            );
        }
        if fails {
            return Answer::fail(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{}: simulated failure (--error-rate)", self.opts.name),
                None,
            );
        }
        let mut calls = Vec::new();
        let mut degraded = Vec::new();
        for target in &self.opts.calls {
            let (status, marker) = match self.call(target, req, deadline).await {
                Ok(answer) => answer,
                Err(a) => return a,
            };
            calls.push(json!({"tool": target.tool, "status": status}));
            degraded.extend(marker);
        }
        let mut record = json!({
            "agent": self.opts.name,
            "step": req.step,
            "attempt": req.attempt,
        });
        if !calls.is_empty() {
            record["calls"] = Value::Array(calls);
        }
        if !degraded.is_empty() {
            record["degraded"] = json!(degraded);
        }
        let mut output = req.payload.clone();
        if let Some(o) = output.as_object_mut() {
            o.insert("r4_sim".into(), record);
        }
        Answer::ok(json!({ "output": output }))
    }

    /// One tool call through the proxy: its status and `r4-degraded` value when it answered
    /// below 400, else the answer the delivery gets.
    async fn call(
        &self,
        target: &ToolTarget,
        req: &DeliveryRequest,
        deadline: Instant,
    ) -> Result<(u16, Option<String>), Answer> {
        let tool = target.tool.as_str();
        let timed_out = || {
            Answer::fail(
                StatusCode::GATEWAY_TIMEOUT,
                format!("tool {tool}: no answer within the task's deadline"),
                Some(tool),
            )
        };
        let Some(timeout) = call_timeout(deadline, Instant::now()) else {
            return Err(timed_out());
        };
        let url = format!("{}/tools/{target}", self.opts.tools_url);
        let mut post = self
            .client
            .post(&url)
            .timeout(timeout)
            .header(IDEMPOTENCY_HEADER, &req.idempotency_key)
            .json(&json!({
                "task_id": req.task_id,
                "step": req.step,
                "attempt": req.attempt,
                "payload": req.payload,
            }));
        if !req.traceparent.is_empty() {
            post = post.header(TRACEPARENT, &req.traceparent);
        }
        let resp = match post.send().await {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(timed_out()),
            Err(e) => {
                // reqwest's own text is "error sending request"; the cause is in its sources.
                let mut cause: &dyn std::error::Error = &e;
                while let Some(inner) = cause.source() {
                    cause = inner;
                }
                let what = if e.is_connect() {
                    format!("cannot reach the tool proxy at {}", self.opts.tools_url)
                } else {
                    "the call failed".to_string()
                };
                return Err(Answer::fail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("tool {tool}: {what}: {cause}"),
                    Some(tool),
                ));
            }
        };
        let status = resp.status();
        let marker = resp
            .headers()
            .get(DEGRADED_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if status.as_u16() < 400 {
            return Ok((status.as_u16(), marker));
        }
        let why = match &marker {
            Some(m) => format!("tool {tool} answered {} ({m})", status.as_u16()),
            None => format!("tool {tool} answered {}", status.as_u16()),
        };
        let permanent = status.is_client_error()
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS;
        let to = if permanent {
            StatusCode::UNPROCESSABLE_ENTITY
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        Err(Answer::fail(to, why, Some(tool)))
    }
}

async fn tasks(State(s): State<Arc<SimAgentServer>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let req = match s.parse(&headers, &body) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(agent = %s.opts.name, status = 400, reason = %e, "delivery refused");
            return Answer::fail(StatusCode::BAD_REQUEST, e, None).into_response();
        }
    };
    let deadline = started + req.deadline;
    let answer = s.work(&req, deadline).await;
    tracing::debug!(
        agent = %s.opts.name,
        task = %req.task_id,
        step = %req.step,
        kind = ?req.kind,
        attempt = req.attempt,
        key = %req.idempotency_key,
        status = answer.status.as_u16(),
        reason = answer.reason.as_deref().unwrap_or(""),
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "delivery answered"
    );
    answer.into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[test]
    fn a_containers_environment_gives_the_options_and_names_a_bad_variable() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = options_from_env(env(&[]), "pod-1").unwrap();
        assert_eq!(
            o,
            Options {
                name: "pod-1".into(),
                ..Options::default()
            }
        );
        let o = options_from_env(
            env(&[
                ("R4_SIM_NAME", "resolver"),
                ("R4_SIM_LATENCY", "20ms,200ms"),
                ("R4_SIM_ERROR_RATE", "0.25"),
                ("R4_SIM_FAIL_PERMANENTLY_RATE", "0.5"),
                ("R4_SIM_CALLS", "bank, ledger/entries"),
                ("R4_TOOLS_URL", "http://127.0.0.1:9/"),
            ]),
            "pod-1",
        )
        .unwrap();
        assert_eq!(o.name, "resolver");
        assert_eq!(o.latency.median_ms, 20.0);
        assert_eq!(o.latency.p99_ms, Some(200.0));
        assert_eq!((o.error_rate, o.fail_permanently_rate), (0.25, 0.5));
        let calls: Vec<String> = o.calls.iter().map(ToString::to_string).collect();
        assert_eq!(calls, ["bank", "ledger/entries"]);
        assert_eq!(o.tools_url, "http://127.0.0.1:9");
        for (pairs, var) in [
            (&[("R4_SIM_LATENCY", "soon")][..], "R4_SIM_LATENCY"),
            (&[("R4_SIM_ERROR_RATE", "2")][..], "R4_SIM_ERROR_RATE"),
            (
                &[("R4_SIM_FAIL_PERMANENTLY_RATE", "-1")][..],
                "R4_SIM_FAIL_PERMANENTLY_RATE",
            ),
            (&[("R4_SIM_CALLS", "bank,Not A Tool")][..], "R4_SIM_CALLS"),
            (&[("R4_TOOLS_URL", "ftp://x")][..], "R4_TOOLS_URL"),
        ] {
            let pairs: &'static [(&'static str, &'static str)] =
                Box::leak(pairs.to_vec().into_boxed_slice());
            let e = options_from_env(env(pairs), "p").unwrap_err();
            assert!(e.starts_with(&format!("{var}: ")), "{e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn flags_parse_and_bad_values_say_why() {
        let l = parse_latency("20ms").unwrap();
        assert_eq!((l.median_ms, l.p99_ms), (20.0, Some(20.0)));
        let l = parse_latency("20ms,1s").unwrap();
        assert_eq!((l.median_ms, l.p99_ms), (20.0, Some(1000.0)));
        assert!(
            parse_latency("1s,20ms")
                .unwrap_err()
                .contains("below its median")
        );
        assert!(
            parse_latency("fast")
                .unwrap_err()
                .contains("invalid duration")
        );
        assert!(
            parse_latency("2h")
                .unwrap_err()
                .contains("longer than any deadline")
        );

        assert_eq!(parse_rate("0.25"), Ok(0.25));
        assert_eq!(parse_rate("1"), Ok(1.0));
        for bad in ["-0.1", "1.5", "NaN", "half", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }

        let t: ToolTarget = "bank".parse().unwrap();
        assert_eq!((t.tool.as_str(), t.path.as_str()), ("bank", ""));
        let t: ToolTarget = "bank-api/statements/latest".parse().unwrap();
        assert_eq!(
            (t.tool.as_str(), t.path.as_str()),
            ("bank-api", "/statements/latest")
        );
        assert_eq!(t.to_string(), "bank-api/statements/latest");
        for bad in [
            "",
            "/x",
            "bank/",
            "bank//x",
            "ba nk",
            "bank/a b",
            "bank/x?y=1",
            "bänk",
        ] {
            assert!(bad.parse::<ToolTarget>().is_err(), "{bad:?}");
        }

        assert_eq!(
            parse_tools_url("http://127.0.0.1:8082/").as_deref(),
            Ok("http://127.0.0.1:8082")
        );
        assert!(parse_tools_url("ftp://x").is_err());
        assert!(parse_tools_url("127.0.0.1:8082").is_err());
    }

    #[test]
    fn the_listen_address_follows_the_controllers_port() {
        let given: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(listen_addr(Some(given), Some("9000")), Ok(given));
        assert_eq!(
            listen_addr(None, Some("9000")),
            Ok("0.0.0.0:9000".parse().unwrap())
        );
        assert_eq!(listen_addr(None, None), Ok("0.0.0.0:8081".parse().unwrap()));
        for bad in ["", "0", "65536", "http"] {
            let e = listen_addr(None, Some(bad)).unwrap_err();
            assert!(e.starts_with("R4_AGENT_PORT: "), "{e}");
        }
    }

    #[test]
    fn the_deadline_header_bounds_every_call() {
        assert_eq!(request_deadline(None), Ok(DEFAULT_DEADLINE));
        assert_eq!(
            request_deadline(Some("250")),
            Ok(Duration::from_millis(250))
        );
        assert_eq!(
            request_deadline(Some("18446744073709551615")),
            Ok(MAX_DEADLINE)
        );
        let e = request_deadline(Some("soon")).unwrap_err();
        assert!(e.starts_with("X-R4-Deadline-Ms: "), "{e}");
        assert!(request_deadline(Some("-5")).is_err());

        let now = Instant::now();
        let due = now + Duration::from_millis(300);
        assert_eq!(call_timeout(due, now), Some(Duration::from_millis(300)));
        assert_eq!(
            call_timeout(due, now + Duration::from_millis(200)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(call_timeout(due, due), None, "nothing left: no call");
        assert_eq!(call_timeout(due, due + Duration::from_millis(1)), None);
    }

    fn server(opts: Options) -> Arc<SimAgentServer> {
        Arc::new(SimAgentServer::new(opts).unwrap())
    }

    async fn post(app: &Router, headers: &[(&str, &str)], body: Value) -> (StatusCode, Value) {
        let mut req =
            axum::http::Request::post("/tasks").header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app
            .clone()
            .oneshot(req.body(axum::body::Body::from(body.to_string())).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    fn task(payload: Value) -> Value {
        json!({"task_id": "t1", "step": "a", "kind": "task", "payload": payload, "attempt": 2})
    }

    #[tokio::test(start_paused = true)]
    async fn a_delivery_takes_its_latency_and_passes_the_payload_on() {
        let app = server(Options {
            name: "sim-1".into(),
            latency: parse_latency("40ms").unwrap(),
            ..Options::default()
        })
        .router();
        let t0 = Instant::now();
        let (status, body) =
            post(&app, &[("idempotency-key", "t1:a")], task(json!({"n": 1}))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(t0.elapsed(), Duration::from_millis(40));
        assert_eq!(
            body,
            json!({"output": {"n": 1, "r4_sim": {"agent": "sim-1", "step": "a", "attempt": 2}}})
        );
        // A compensation: acknowledged, nothing passed on.
        let mut c = task(json!({"n": 1}));
        c["kind"] = json!("compensate");
        c["compensation"] = json!("refund");
        let (status, body) = post(&app, &[("idempotency-key", "t1:compensate:a")], c).await;
        assert_eq!((status, body), (StatusCode::OK, json!({})));
    }

    #[tokio::test(start_paused = true)]
    async fn a_latency_past_the_deadline_is_cut_at_the_deadline() {
        let app = server(Options {
            latency: parse_latency("5s").unwrap(),
            ..Options::default()
        })
        .router();
        let t0 = Instant::now();
        let (status, body) = post(
            &app,
            &[("idempotency-key", "t1:a"), ("x-r4-deadline-ms", "120")],
            task(json!({})),
        )
        .await;
        assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
        assert_eq!(t0.elapsed(), Duration::from_millis(120));
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("deadline (120 ms)"),
            "{body}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failure_rates_answer_retryable_and_permanent() {
        let retryable = server(Options {
            error_rate: 1.0,
            ..Options::default()
        })
        .router();
        let (status, body) = post(&retryable, &[("idempotency-key", "k")], task(json!({}))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        let permanent = server(Options {
            error_rate: 1.0,
            fail_permanently_rate: 1.0,
            ..Options::default()
        })
        .router();
        let (status, body) = post(&permanent, &[("idempotency-key", "k")], task(json!({}))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("--fail-permanently-rate")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_protocol_does_not_allow_is_a_400_naming_it() {
        let app = server(Options::default()).router();
        let key = [("idempotency-key", "t1:a")];
        let cases = [
            (&[][..], task(json!({})), "Idempotency-Key: missing"),
            (
                &key[..],
                json!({"step": "a"}),
                "body: missing field `task_id`",
            ),
            (
                &key[..],
                task(json!([1, 2])),
                "payload: must be a JSON object",
            ),
            (
                &[("idempotency-key", "t1:a"), ("x-r4-deadline-ms", "later")][..],
                task(json!({})),
                "X-R4-Deadline-Ms: expected milliseconds",
            ),
        ];
        for (headers, body, want) in cases {
            let (status, answer) = post(&app, headers, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
            let e = answer["error"].as_str().unwrap();
            assert!(e.starts_with(want), "{e} / {want}");
            assert!(!e.contains('\n'), "one line: {e}");
        }
    }
}
