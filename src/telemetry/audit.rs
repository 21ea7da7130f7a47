//! The audit log of tool calls (the seed's "MCP audit logs"): every call an agent makes through
//! the tool proxy is ONE event saying who called which tool with which key, how it ended,
//! whether it was answered in degraded mode, how long it took and how many requests it cost.
//!
//! Owns the event's fields ([`Call`]) and where it goes: always a `tracing` event with target
//! [`TARGET`] (`r4::audit`, so a log pipeline can route it, e.g. `RUST_LOG=info,r4::audit=off`
//! to drop it); optionally also an entry of the workflow's Redis stream `r4:{ns/wf}:audit`
//! ([`crate::queue::Keys::audit`]) capped at the last `N` entries ([`Auditor::with_stream`],
//! `R4_AUDIT_STREAM_MAXLEN` on the engine). The tool proxy ([`crate::engine::tools`]) decides
//! the outcome and calls [`Auditor::record`].
//!
//! Never in an event: header values (a tool's `headersFrom` credentials come from Secrets),
//! bodies, the tool's URL. The key is the agent's `Idempotency-Key`, which names a task step,
//! not a secret.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::queue::{Fields, Queue};

/// The `tracing` target of audit events.
pub const TARGET: &str = "r4::audit";

/// Variable of `r4 engine --audit-stream-maxlen`, turning the audit stream on: how many
/// entries it keeps.
pub const STREAM_MAXLEN_ENV: &str = "R4_AUDIT_STREAM_MAXLEN";

/// Longest a stream write may take before it is given up (and logged).
const STREAM_DEADLINE: Duration = Duration::from_secs(2);

/// Who makes the calls a proxy audits.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Who {
    /// `namespace/name` of the workflow.
    pub workflow: String,
    /// The agent (step) whose calls these are.
    pub agent: String,
    /// The engine (pod) running the proxy.
    pub engine: String,
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The tool answered below 400 (the fallback's answer included).
    Ok,
    /// The tool answered 400 or more, or the call failed (timeout, connect error, breaker…).
    Error,
    /// The proxy refused the call before sending it (unknown, not allowed, killed).
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Refused => "refused",
        }
    }
}

/// One audited call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call<'a> {
    pub tool: &'a str,
    /// The MCP tool (`params.name` of a `tools/call`), if any.
    pub mcp_tool: Option<&'a str>,
    /// The `Idempotency-Key` the agent sent.
    pub key: Option<&'a str>,
    pub outcome: Outcome,
    /// The HTTP status given to the agent.
    pub status: u16,
    /// Why it failed, as the proxy's `r4-degraded` reason (`timeout`, `breaker-open`,
    /// `connect-error`, `killed`, …) or `http-4xx`/`http-5xx` for the tool's own answer.
    pub error_class: Option<&'a str>,
    /// Answered in degraded mode: by the fallback, or refused by a breaker, kill switch,
    /// bulkhead or throttle.
    pub degraded: bool,
    /// The `r4-degraded` reason, when there is one.
    pub reason: Option<&'a str>,
    pub duration: Duration,
    /// Requests sent to the tool for this call (first try, retries and hedges).
    pub attempts: u32,
    /// When the call ended, in ms since the epoch on the caller's clock (the engine's, which
    /// is virtual under `r4 run`): given by the caller so this module needs nothing of the
    /// engine above it.
    pub at_ms: u64,
}

/// Where a proxy's audit events go.
#[derive(Clone, Default)]
pub struct Auditor {
    who: Who,
    stream: Option<Stream>,
}

/// The writer of the audit stream: one task, fed in call order.
#[derive(Clone)]
struct Stream {
    tx: mpsc::Sender<Fields>,
    key: String,
    maxlen: u64,
}

/// Events waiting for the stream writer; past this the stream misses events (the log keeps
/// them): a slow Redis must not grow the engine's memory or hold up tool calls.
const STREAM_BACKLOG: usize = 1024;

impl std::fmt::Debug for Auditor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auditor")
            .field("who", &self.who)
            .field("stream", &self.stream.as_ref().map(|s| (&s.key, s.maxlen)))
            .finish()
    }
}

impl Auditor {
    /// Events naming `who`, as `tracing` events only.
    pub fn new(who: Who) -> Self {
        Self { who, stream: None }
    }

    /// Also append every event to the stream `key` of `queue`, keeping its last `maxlen`
    /// entries (older ones are trimmed by the write itself). One background task writes
    /// them in call order (call this inside the runtime): a call never waits for it, a
    /// failed write is one warning, not a failed call, and past [`STREAM_BACKLOG`] waiting
    /// events the stream misses some (the log still has them).
    pub fn with_stream(mut self, queue: Arc<dyn Queue>, key: String, maxlen: u64) -> Self {
        let maxlen = maxlen.max(1);
        let (tx, mut rx) = mpsc::channel::<Fields>(STREAM_BACKLOG);
        let stream = key.clone();
        tokio::spawn(async move {
            while let Some(fields) = rx.recv().await {
                let write = queue.add(&stream, fields, Some(maxlen));
                match tokio::time::timeout(STREAM_DEADLINE, write).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(stream = %stream, error = %e, "cannot write the audit stream")
                    }
                    Err(_) => {
                        tracing::warn!(stream = %stream, "cannot write the audit stream: timeout")
                    }
                }
            }
        });
        self.stream = Some(Stream { tx, key, maxlen });
        self
    }

    /// Emit the event of `call` (and queue its stream entry).
    pub fn record(&self, call: &Call<'_>) {
        let ms = u64::try_from(call.duration.as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            target: TARGET,
            workflow = %self.who.workflow,
            agent = %self.who.agent,
            engine = %self.who.engine,
            tool = %call.tool,
            mcp_tool = call.mcp_tool,
            key = call.key,
            outcome = call.outcome.as_str(),
            status = call.status,
            error_class = call.error_class,
            degraded = call.degraded,
            reason = call.reason,
            duration_ms = ms,
            attempts = call.attempts,
            "tool call"
        );
        let Some(s) = &self.stream else {
            return;
        };
        if s.tx.try_send(self.fields(call, ms)).is_err() {
            tracing::debug!(stream = %s.key, "audit stream writer behind or stopped: event left out of the stream");
        }
    }

    /// The stream entry: the event's fields, absent ones left out.
    fn fields(&self, call: &Call<'_>, ms: u64) -> Fields {
        let mut f: Fields = Vec::with_capacity(14);
        let mut put = |k: &str, v: String| f.push((k.to_owned(), Bytes::from(v)));
        put("workflow", self.who.workflow.clone());
        put("agent", self.who.agent.clone());
        put("engine", self.who.engine.clone());
        put("tool", call.tool.to_owned());
        if let Some(m) = call.mcp_tool {
            put("mcp_tool", m.to_owned());
        }
        if let Some(k) = call.key {
            put("key", k.to_owned());
        }
        put("outcome", call.outcome.as_str().to_owned());
        put("status", call.status.to_string());
        if let Some(c) = call.error_class {
            put("error_class", c.to_owned());
        }
        put("degraded", call.degraded.to_string());
        if let Some(r) = call.reason {
            put("reason", r.to_owned());
        }
        put("duration_ms", ms.to_string());
        put("attempts", call.attempts.to_string());
        put("at_ms", call.at_ms.to_string());
        if let Some(ids) = crate::telemetry::trace::ids_of(&tracing::Span::current()) {
            put("trace_id", ids.trace_hex());
        }
        f
    }
}
