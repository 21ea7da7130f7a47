//! Delivery: hand one task to the agent and get its outputs or an error.
//!
//! Owns the [`Delivery`] trait (object-safe, so `r4 run` can plug in
//! simulated agents) and [`HttpDelivery`], the agent protocol spoken to the
//! agent container over localhost. Retries, dead-lettering and completion
//! are the consumer's; this module makes exactly one attempt.
//!
//! # The agent protocol
//!
//! The engine sends `POST <agent-url>` with
//! - headers `Idempotency-Key: <task-id>:<step>` (for a compensation:
//!   `<task-id>:compensate:<step>`), the W3C `traceparent` of this hop,
//!   `Content-Type: application/json` and `X-R4-Deadline-Ms` (the time the
//!   agent has before the engine gives up on this attempt);
//! - body `{"task_id", "step", "kind": "task"|"compensate", "compensation"?,
//!   "payload", "attempt"}` where `step` is the agent's name and `attempt`
//!   the 1-based delivery count (it grows across engines and crashes).
//!
//! The key is the same for every attempt, every engine and every replay of
//! the step: an agent that applies its side effects at most once per key
//! makes the whole pipeline effectively-once.
//!
//! The agent answers
//! - `2xx` with `{"output": <json>}` (one output, published to every stream
//!   the agent `produces`), or `{"outputs": {"<stream>": <json>, ...}}` (per
//!   produced stream; streams left out get nothing), or an empty body / `{}`
//!   (the input payload is passed on unchanged);
//! - `4xx` (except 408 and 429): a permanent failure — the task goes to the
//!   DLQ at once;
//! - `5xx`, `408`, `429`, a timeout or a connection error: retryable.
//!
//! An error body may be `{"error": "<message>", "tool": "<tool>"}` (or the
//! tool in an `X-R4-Tool` header): the tool is recorded as the failing
//! dependency, and the repair role replays the task once that tool is
//! healthy again.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use rand::Rng;
use reqwest::header::{HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};
use tracing::Instrument;

/// Boxed future of [`Delivery::deliver`].
pub type DeliveryFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Outputs, DeliveryError>> + Send + 'a>>;

/// What the engine asks the agent to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    Task,
    Compensate,
}

/// One delivery attempt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryRequest {
    pub task_id: String,
    /// The agent (step) name.
    pub step: String,
    pub kind: RequestKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation: Option<String>,
    pub payload: serde_json::Value,
    pub attempt: u64,
    #[serde(skip)]
    pub idempotency_key: String,
    #[serde(skip)]
    pub traceparent: String,
    #[serde(skip)]
    pub deadline: Duration,
}

/// An agent's successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outputs {
    /// One output for every produced stream.
    All(serde_json::Value),
    /// Output per produced stream (by stream name).
    PerStream(BTreeMap<String, serde_json::Value>),
    /// Pass the input payload on to every produced stream.
    PassThrough,
}

/// A failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    /// Permanent: retrying cannot help (DLQ at once).
    pub permanent: bool,
    pub message: String,
    /// The dependency that failed, if the agent named one.
    pub tool: Option<String>,
    /// The agent itself could not be reached (connection refused or reset
    /// before an answer): not the task's failure — the engine pauses and
    /// waits for its agent instead of spending the task's deliveries.
    pub unreachable: bool,
}

impl DeliveryError {
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            permanent: false,
            message: message.into(),
            tool: None,
            unreachable: false,
        }
    }

    /// The agent could not be reached at all.
    pub fn unreachable(message: impl Into<String>) -> Self {
        Self {
            unreachable: true,
            ..Self::retryable(message)
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            permanent: true,
            message: message.into(),
            tool: None,
            unreachable: false,
        }
    }

    pub fn with_tool(mut self, tool: impl Into<String>) -> Self {
        self.tool = Some(tool.into());
        self
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)?;
        if let Some(t) = &self.tool {
            write!(f, " (tool {t})")?;
        }
        Ok(())
    }
}

/// Hand one task to the agent. Implementations make exactly one attempt and
/// honour `req.deadline`.
pub trait Delivery: Send + Sync {
    fn deliver<'a>(&'a self, req: &'a DeliveryRequest) -> DeliveryFuture<'a>;
}

/// The agent container over HTTP.
#[derive(Debug, Clone)]
pub struct HttpDelivery {
    client: reqwest::Client,
    url: String,
    /// `url`, parsed once (not on every delivery); `None` if it does not
    /// parse, and then every attempt fails with reqwest's own error.
    parsed: Option<reqwest::Url>,
    /// Largest answer read ([`Self::with_max_answer`]).
    max_answer: usize,
}

static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static DEADLINE_MS: HeaderName = HeaderName::from_static(DEADLINE_HEADER);

/// Header carrying the time the agent has for this attempt, in milliseconds.
pub const DEADLINE_HEADER: &str = "x-r4-deadline-ms";
/// Environment variable of the agent container naming the port it serves tasks on (the
/// controller sets it in every agent container it renders).
pub const AGENT_PORT_ENV: &str = "R4_AGENT_PORT";
/// The agent container's port when the spec names none (`agents[].port`).
pub const DEFAULT_AGENT_PORT: u16 = 8081;
/// Environment variable of the agent container naming the engine's tool proxy (set for an
/// agent with tools).
pub const TOOLS_URL_ENV: &str = "R4_TOOLS_URL";

/// Largest agent answer read unless [`HttpDelivery::with_max_answer`] says otherwise.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

impl HttpDelivery {
    pub fn new(url: impl Into<String>) -> Result<Self, reqwest::Error> {
        // The agent is a container of the same pod: no proxy, and a
        // redirect would be a misconfiguration, not something to follow
        // (reqwest's redirect layer also parses the URL on every request).
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(256)
            .tcp_nodelay(true)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        let url = url.into();
        Ok(Self {
            client,
            parsed: reqwest::Url::parse(&url).ok(),
            url,
            max_answer: MAX_RESPONSE_BYTES,
        })
    }

    /// Refuse answers longer than `bytes` (the engine passes
    /// [`super::limits::agent_answer_limit`]): read up to there, never buffered whole, and
    /// the attempt fails permanently — the same answer would come back.
    pub fn with_max_answer(mut self, bytes: usize) -> Self {
        self.max_answer = bytes;
        self
    }

    async fn attempt(&self, req: &DeliveryRequest) -> Result<Outputs, DeliveryError> {
        // One `r4.agent` span per request, a child of the delivery's context; the agent
        // receives the span's own (and passes it on to its tool calls).
        let span = crate::telemetry::trace::agent_span(&req.task_id, &req.step, req.attempt);
        let traceparent = crate::telemetry::trace::link(&span, Some(&req.traceparent));
        let res = self
            .request(req, &traceparent)
            .instrument(span.clone())
            .await;
        if res.is_err() {
            span.record("otel.status_code", "error");
        }
        res
    }

    async fn request(
        &self,
        req: &DeliveryRequest,
        traceparent: &str,
    ) -> Result<Outputs, DeliveryError> {
        let deadline_ms = u64::try_from(req.deadline.as_millis()).unwrap_or(u64::MAX);
        let post = match &self.parsed {
            Some(u) => self.client.post(u.clone()),
            None => self.client.post(&self.url),
        };
        let resp = post
            .timeout(req.deadline)
            .header(&IDEMPOTENCY_KEY, &req.idempotency_key)
            .header(&TRACEPARENT, traceparent)
            .header(&DEADLINE_MS, HeaderValue::from(deadline_ms))
            .json(req)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    // Nothing reached the agent: it is not running (yet).
                    return DeliveryError::unreachable(format!("agent unreachable: {e}"));
                }
                let what = if e.is_timeout() {
                    "timeout"
                } else {
                    "request error"
                };
                DeliveryError::retryable(format!("{what}: {}", e.without_url()))
            })?;
        let status = resp.status();
        tracing::Span::current().record("http.response.status_code", status.as_u16());
        let tool = resp
            .headers()
            .get("x-r4-tool")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = super::limits::read_body(resp, self.max_answer)
            .await
            .map_err(|e| match e {
                super::limits::BodyError::TooLarge { .. } => {
                    DeliveryError::permanent(format!("agent {e}"))
                }
                super::limits::BodyError::Read(_) => DeliveryError::retryable(format!("agent {e}")),
            })?;
        if status.is_success() {
            return parse_success(&body);
        }
        let (message, body_tool) = parse_error(&body);
        let permanent = status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS;
        Err(DeliveryError {
            permanent,
            message: format!("agent answered {}: {message}", status.as_u16()),
            tool: tool.or(body_tool),
            unreachable: false,
        })
    }
}

impl Delivery for HttpDelivery {
    fn deliver<'a>(&'a self, req: &'a DeliveryRequest) -> DeliveryFuture<'a> {
        // reqwest's per-request timeout covers connecting, the answer and
        // its body: one timer per delivery is enough.
        Box::pin(self.attempt(req))
    }
}

fn parse_success(body: &[u8]) -> Result<Outputs, DeliveryError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Outputs::PassThrough);
    }
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        DeliveryError::retryable(format!("agent answered 2xx with a non-JSON body: {e}"))
    })?;
    if let Some(o) = v.get("output") {
        return Ok(Outputs::All(o.clone()));
    }
    if let Some(per) = v.get("outputs") {
        let map = per.as_object().ok_or_else(|| {
            DeliveryError::permanent("agent answered `outputs` that is not an object")
        })?;
        return Ok(Outputs::PerStream(
            map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        ));
    }
    Ok(Outputs::PassThrough)
}

fn parse_error(body: &[u8]) -> (String, Option<String>) {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let msg = v
            .get("error")
            .and_then(|e| e.as_str())
            .map(str::to_owned)
            .unwrap_or_else(|| v.to_string());
        let tool = v.get("tool").and_then(|t| t.as_str()).map(str::to_owned);
        return (truncate(msg), tool);
    }
    (truncate(String::from_utf8_lossy(body).into_owned()), None)
}

fn truncate(mut s: String) -> String {
    if s.len() > 500 {
        let mut cut = 500;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// A random (version 4) UUID from the thread's CSPRNG, for task ids.
pub fn random_uuid() -> uuid::Uuid {
    uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_keeps_the_trace() {
        use crate::telemetry::trace::current_traceparent;
        let root = current_traceparent(None);
        let child = current_traceparent(Some(&root));
        assert_eq!(root.len(), 55);
        assert_eq!(root[3..35], child[3..35]);
        assert_ne!(root[36..52], child[36..52]);
        assert_ne!(current_traceparent(Some("garbage"))[3..35], root[3..35]);
        let other = current_traceparent(None);
        assert_ne!(root[3..35], other[3..35]);
        assert_eq!(random_uuid().get_version_num(), 4);
        assert_ne!(random_uuid(), random_uuid());
    }

    #[test]
    fn parses_answers() {
        assert_eq!(
            parse_success(br#"{"output": {"x": 1}}"#).unwrap(),
            Outputs::All(serde_json::json!({"x": 1}))
        );
        assert!(matches!(
            parse_success(br#"{"outputs": {"a": 1}}"#).unwrap(),
            Outputs::PerStream(m) if m.len() == 1 && m["a"] == 1
        ));
        assert_eq!(parse_success(b"").unwrap(), Outputs::PassThrough);
        assert_eq!(parse_success(b"{}").unwrap(), Outputs::PassThrough);
        assert!(parse_success(b"<html>").is_err());
        assert_eq!(
            parse_error(br#"{"error": "down", "tool": "bank"}"#),
            ("down".into(), Some("bank".into()))
        );
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_is_refused_while_it_streams() {
        use axum::routing::post;
        let app = axum::Router::new()
            .route("/big", post(|| async { "x".repeat(4096) }))
            .route(
                "/chunked",
                post(|| async {
                    let chunks = (0..64).map(|_| Ok::<_, std::io::Error>(vec![b' '; 512]));
                    axum::body::Body::from_stream(futures::stream::iter(chunks))
                }),
            )
            .route("/ok", post(|| async { r#"{"output": {"x": 1}}"# }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let req = DeliveryRequest {
            task_id: "t".into(),
            step: "a".into(),
            kind: RequestKind::Task,
            compensation: None,
            payload: serde_json::json!({}),
            attempt: 1,
            idempotency_key: "t:a".into(),
            traceparent: crate::telemetry::trace::current_traceparent(None),
            deadline: Duration::from_secs(5),
        };
        for path in ["big", "chunked"] {
            let d = HttpDelivery::new(format!("http://{addr}/{path}"))
                .unwrap()
                .with_max_answer(1024);
            let e = d.deliver(&req).await.unwrap_err();
            assert!(e.permanent, "{path}: {e}");
            assert!(e.message.contains("larger than 1024 bytes"), "{path}: {e}");
        }
        let d = HttpDelivery::new(format!("http://{addr}/ok"))
            .unwrap()
            .with_max_answer(1024);
        assert_eq!(
            d.deliver(&req).await.unwrap(),
            Outputs::All(serde_json::json!({"x": 1}))
        );
    }
}
