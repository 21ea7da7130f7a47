//! The intake role: the Task Intake API.
//!
//! - `POST /v1/tasks`: body = the task payload, a JSON object of at most
//!   `intake.maxPayloadBytes` (default 1 MiB). Optional `Idempotency-Key`
//!   header: the same key always yields the same task id and one stream
//!   entry ([`Queue::submit_idempotent`], kept for `idempotency.ttl`).
//!   Answers `202 {"task_id", "duplicate"}`, or `400`/`413` with
//!   `{"error": "<one line>"}`, or `503` when the queue is unreachable.
//! - `GET /v1/tasks/{id}`: `{"task_id", "state", "steps"}` where state is
//!   `dead_lettered` (a DLQ marker exists), `completed` (every terminal
//!   agent's inbox key exists), `in_progress` (some step completed) or
//!   `pending` (nothing recorded yet — queued, or an unknown id: the intake
//!   keeps no per-task record of its own, so a submission costs one write).
//!   Inbox keys live for `idempotency.ttl`, so status is known that long.
//! - `/healthz`, `/readyz`, `/metrics` ([`super::http`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::json;
use tokio::time::Instant;

use crate::queue::Queue;

use super::config::WorkflowConfig;
use super::delivery::{child_traceparent, random_uuid};
use super::http::{self, Health};
use super::stats::{Outcome, Stats};
use super::task::{self, Task};

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// The intake role.
pub struct Intake {
    cfg: Arc<WorkflowConfig>,
    queue: Arc<dyn Queue>,
    stats: Arc<Stats>,
}

impl Intake {
    pub fn new(cfg: Arc<WorkflowConfig>, queue: Arc<dyn Queue>, engine_id: &str) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            queue,
            stats: Arc::new(Stats::new(engine_id, "intake", None)),
        })
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The full router: API + health endpoints.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/tasks", post(submit))
            .route("/v1/tasks/{id}", get(status))
            .with_state(self.clone())
            .merge(http::router(Health::new(self.stats.clone())))
    }

    /// Submit one payload (what `POST /v1/tasks` does after parsing):
    /// returns the task id and whether this call created it.
    pub async fn submit(
        &self,
        payload: serde_json::Value,
        idempotency_key: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<(String, bool), crate::queue::QueueError> {
        let raw = Bytes::from(task::json_bytes(&payload));
        self.submit_raw(raw, idempotency_key, traceparent).await
    }

    /// [`Self::submit`] with the payload as JSON text the caller has
    /// validated (a JSON object), stored as it is: one JSON pass per
    /// submission instead of parse, re-encode and copy.
    async fn submit_raw(
        &self,
        payload: Bytes,
        idempotency_key: Option<&str>,
        traceparent: Option<&str>,
    ) -> Result<(String, bool), crate::queue::QueueError> {
        let stream = self.cfg.keys.stream(self.cfg.entry_stream());
        let mut t = Task::new(String::new(), serde_json::Value::Null);
        t.traceparent = Some(child_traceparent(traceparent));
        t.submitted_ms = Some(task::now_ms());
        match idempotency_key {
            Some(key) => {
                let s = self
                    .queue
                    .submit_idempotent(
                        &self.cfg.keys.idem(key),
                        self.cfg.policy.idempotency_ttl,
                        &stream,
                        t.encode_with_payload(false, payload),
                        self.cfg.max_len,
                    )
                    .await?;
                let created = s.created();
                Ok((s.task_id, created))
            }
            None => {
                t.task_id = random_uuid().to_string();
                self.queue
                    .add(
                        &stream,
                        t.encode_with_payload(true, payload),
                        self.cfg.max_len,
                    )
                    .await?;
                Ok((t.task_id, true))
            }
        }
    }

    /// Status of a task (see the module docs).
    pub async fn status(&self, id: &str) -> Result<serde_json::Value, crate::queue::QueueError> {
        let keys = &self.cfg.keys;
        if let Some(reason) = self.queue.get(&keys.task_dlq(id)).await? {
            return Ok(json!({"task_id": id, "state": "dead_lettered",
                "reason": String::from_utf8_lossy(&reason)}));
        }
        let mut steps = serde_json::Map::new();
        for a in &self.cfg.agents {
            let done = self.queue.get(&keys.inbox(id, &a.name)).await?.is_some();
            steps.insert(a.name.clone(), json!(if done { "done" } else { "pending" }));
        }
        let terminal = self.cfg.terminal_agents();
        let all = !terminal.is_empty() && terminal.iter().all(|a| steps[&a.name] == "done");
        let any = steps.values().any(|v| v == "done");
        let state = if all {
            "completed"
        } else if any {
            "in_progress"
        } else {
            "pending"
        };
        Ok(json!({"task_id": id, "state": state, "steps": steps}))
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
}

async fn submit(State(intake): State<Arc<Intake>>, headers: HeaderMap, body: Body) -> Response {
    let started = Instant::now();
    let limit = intake.cfg.max_payload_bytes;
    let bytes: Bytes = match axum::body::to_bytes(body, limit).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("payload larger than {limit} bytes"),
            );
        }
    };
    // Validate without building a value: the body is stored as it came.
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
        return error(StatusCode::BAD_REQUEST, format!("body is not JSON: {e}"));
    }
    // Valid JSON whose first token is `{` is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return error(StatusCode::BAD_REQUEST, "body must be a JSON object");
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k)
                if !k.is_empty()
                    && k.len() <= MAX_IDEMPOTENCY_KEY
                    && k.bytes().all(|b| b.is_ascii_graphic()) =>
            {
                Some(k)
            }
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "Idempotency-Key must be 1..={MAX_IDEMPOTENCY_KEY} printable ASCII characters"
                    ),
                );
            }
        },
    };
    let tp = headers.get("traceparent").and_then(|v| v.to_str().ok());
    let fut = intake.submit_raw(bytes, key, tp);
    match tokio::time::timeout(Duration::from_secs(10), fut).await {
        Ok(Ok((task_id, created))) => {
            let outcome = if created {
                Outcome::Completed
            } else {
                Outcome::Duplicate
            };
            intake
                .stats
                .record(outcome, started.elapsed(), Duration::ZERO);
            (
                StatusCode::ACCEPTED,
                Json(json!({"task_id": task_id, "duplicate": !created})),
            )
                .into_response()
        }
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("queue unavailable: {e}"),
        ),
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue unavailable: timeout",
        ),
    }
}

async fn status(State(intake): State<Arc<Intake>>, Path(id): Path<String>) -> Response {
    if !task::valid_task_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid task id");
    }
    match intake.status(&id).await {
        Ok(v) => (StatusCode::OK, Json(v)).into_response(),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("queue unavailable: {e}"),
        ),
    }
}
