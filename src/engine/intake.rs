//! The intake role: the Task Intake API.
//!
//! - `POST /v1/tasks`: body = the task payload, a JSON object of at most
//!   `intake.maxPayloadBytes` (default 1 MiB). Optional `Idempotency-Key`
//!   header: the same key always yields the same task id and one stream
//!   entry ([`Queue::submit_idempotent`], kept for `idempotency.ttl`).
//!   Answers `202 {"task_id", "duplicate"}`, or `400`/`413` with
//!   `{"error": "<one line>"}`, `422` when the key was used before with
//!   another payload (Stripe's rule; nothing is enqueued), `429` with
//!   `Retry-After` when the entry stream's backlog is at `queue.maxLen`
//!   (backpressure: nothing accepted is ever dropped, so the intake says no
//!   instead), or `503` when the queue is unreachable.
//! - `POST /v1/tasks:batch`: body `{"tasks": [{"payload": {...},
//!   "idempotency_key"?: "..."}, ...]}`, 1..=[`MAX_BATCH`] tasks, at most
//!   [`MAX_BATCH_BODY`] bytes, each payload within the payload limit. The
//!   whole batch is validated first (a bad task is a `400`/`413` naming
//!   `tasks[i]`, and nothing is enqueued), then enqueued in ONE atomic step
//!   ([`Queue::submit_batch`]): all of it or none of it. Answers `202
//!   {"tasks": [{"task_id", "duplicate"}, ...]}` in request order. For
//!   producers with many small tasks: one HTTP exchange and one Redis
//!   round trip per batch instead of per task.
//! - `GET /v1/tasks/{id}`: `{"task_id", "state", "steps"}` where state is
//!   `dead_lettered` (a DLQ marker exists), `completed` (every terminal
//!   agent's inbox key exists), `in_progress` (some step completed) or
//!   `pending` (nothing recorded yet — queued, or an unknown id: the intake
//!   keeps no per-task record of its own, so a submission costs one write).
//!   Inbox keys live for `idempotency.ttl`, so status is known that long.
//! - `/healthz`, `/readyz`, `/metrics` ([`super::http`]).
//!
//! A payload is accepted only if the engine can read it later: the intake checks it with
//! [`task::check_payload`], the rules `Task::decode` applies (size, JSON with valid UTF-8
//! strings and no lone surrogate escapes, nesting at most [`task::MAX_DEPTH`]); a refusal is
//! a `400` with the reason (naming `tasks[i]` in a batch).
//!
//! The API routes serve at most [`IntakeOptions::max_in_flight`] requests at once, and a body
//! that does not arrive in time is answered `408` ([`super::limits`]).
//!
//! With bearer tokens ([`super::auth`]) every `/v1/…` route answers `401` without a valid
//! one, and idempotency keys live in the authenticated client's own key space.

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

use serde_json::value::RawValue;

use crate::queue::{Queue, QueueError, Submission};

use super::auth::{self, Tokens};
use super::limits;

use super::config::WorkflowConfig;
use super::delivery::random_uuid;
use super::http::{self, Health};
use super::stats::{Outcome, Stats};
use super::task::{self, Task};
use crate::telemetry::trace;
use tracing::Instrument;

/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;

/// Most tasks in one `POST /v1/tasks:batch`.
pub const MAX_BATCH: usize = 1000;

/// Largest `POST /v1/tasks:batch` body (each payload is also held to the
/// workflow's payload limit).
pub const MAX_BATCH_BODY: usize = 16 << 20;

/// A task of [`Intake::submit_batch`]: its payload (JSON object text the
/// caller has validated) and optional idempotency key.
#[derive(Debug, Clone)]
pub struct BatchTask {
    pub payload: Bytes,
    pub idempotency_key: Option<String>,
}

/// How an intake serves, besides its workflow.
#[derive(Debug)]
pub struct IntakeOptions {
    /// Bearer tokens to require on `/v1/…` (`None`: open).
    pub tokens: Option<Tokens>,
    /// API requests served at once; the next is answered `503`.
    pub max_in_flight: usize,
}

impl Default for IntakeOptions {
    fn default() -> Self {
        Self {
            tokens: None,
            max_in_flight: limits::MAX_IN_FLIGHT,
        }
    }
}

/// The intake role.
pub struct Intake {
    cfg: Arc<WorkflowConfig>,
    queue: Arc<dyn Queue>,
    stats: Arc<Stats>,
    /// The workflow's consumer groups exist (created before the first
    /// submission, so the entry stream refuses past `maxLen` instead of
    /// being capped like the end of a graph).
    prepared: std::sync::atomic::AtomicBool,
    options: IntakeOptions,
    /// The workflow's policy as published sets change it, once [`Intake::router`] started
    /// following them (the idempotency-key TTL of submissions from then on).
    policy: std::sync::OnceLock<tokio::sync::watch::Receiver<(u64, Arc<super::config::Policy>)>>,
}

/// The client a request authenticated as (an extension set by the auth layer).
#[derive(Clone)]
struct Client(Arc<str>);

/// The authenticated client's id, whose key space the request's idempotency keys live in.
fn client_id(c: &Option<axum::Extension<Client>>) -> Option<&str> {
    c.as_ref().map(|c| &*c.0.0)
}

impl Intake {
    pub fn new(cfg: Arc<WorkflowConfig>, queue: Arc<dyn Queue>, engine_id: &str) -> Arc<Self> {
        Self::with_options(cfg, queue, engine_id, IntakeOptions::default())
    }

    /// An intake with explicit [`IntakeOptions`] (authentication, in-flight limit).
    pub fn with_options(
        cfg: Arc<WorkflowConfig>,
        queue: Arc<dyn Queue>,
        engine_id: &str,
        options: IntakeOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            cfg,
            queue,
            stats: Arc::new(Stats::new(engine_id, "intake", None)),
            prepared: std::sync::atomic::AtomicBool::new(false),
            options,
            policy: std::sync::OnceLock::new(),
        })
    }

    /// TTL of the idempotency keys of a submission now: the published policy's, else the
    /// file's.
    fn idempotency_ttl(&self) -> std::time::Duration {
        match self.policy.get() {
            Some(rx) => rx.borrow().1.idempotency_ttl,
            None => self.cfg.policy.idempotency_ttl,
        }
    }

    /// Create the workflow's consumer groups once, before the first write.
    async fn prepare(&self) -> Result<(), QueueError> {
        use std::sync::atomic::Ordering;
        if !self.prepared.load(Ordering::Acquire) {
            super::consumer::ensure_groups(self.queue.as_ref(), &self.cfg).await?;
            self.prepared.store(true, Ordering::Release);
        }
        Ok(())
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// The full router: API (authenticated when tokens are set, at most `max_in_flight` at
    /// once) + health endpoints (open, unlimited). Serving it starts following the published
    /// CircuitPolicies ([`super::policies::follow`]; within a Tokio runtime).
    pub fn router(self: &Arc<Self>) -> Router {
        if tokio::runtime::Handle::try_current().is_ok() {
            self.policy.get_or_init(|| {
                // Not awaited here (a router is built synchronously): until the first read
                // (at once), submissions keep keys for the file's TTL.
                let file = super::policies::PolicySet::from_file(&self.cfg);
                super::policies::follow(
                    self.queue.clone(),
                    self.cfg.clone(),
                    self.stats.clone(),
                    file,
                )
            });
        }
        let mut api = Router::new()
            .route("/v1/tasks", post(submit))
            .route("/v1/tasks:batch", post(submit_batch))
            .route("/v1/tasks/{id}", get(status));
        if self.options.tokens.is_some() {
            api = api.route_layer(axum::middleware::from_fn_with_state(
                self.clone(),
                authenticate,
            ));
        }
        let api = api.with_state(self.clone());
        limits::in_flight_limit(api, self.options.max_in_flight).merge(http::router(
            Health::new(self.stats.clone()).for_workflow(&self.cfg.namespace, &self.cfg.name),
        ))
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
        self.prepare().await?;
        let stream = self.cfg.keys.stream(self.cfg.entry_stream());
        // The entry carries the context of the write (`r4.publish`): the engine's delivery
        // span is its child.
        let publish = trace::publish_span(&stream);
        let mut t = Task::new(String::new(), serde_json::Value::Null);
        t.traceparent = Some(trace::link(&publish, traceparent));
        t.submitted_ms = Some(task::now_ms());
        match idempotency_key {
            Some(key) => {
                let one = Submission {
                    idem_key: Some(self.cfg.keys.idem(key)),
                    fingerprint: Some(fingerprint(&payload)),
                    task_id: random_uuid().to_string(),
                    fields: t.encode_with_payload(false, payload),
                };
                let s = self
                    .queue
                    .submit_batch(&stream, self.idempotency_ttl(), vec![one], self.cfg.max_len)
                    .instrument(publish)
                    .await?
                    .pop()
                    .ok_or_else(|| QueueError::Protocol("empty submit reply".into()))?;
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
                    .instrument(publish)
                    .await?;
                Ok((t.task_id, true))
            }
        }
    }

    /// Enqueue `tasks` in one atomic step (see [`Queue::submit_batch`]):
    /// returns `(task id, created)` per task, in order. Every entry carries
    /// the context of the batch's one `r4.publish` span, a child of
    /// `traceparent`.
    pub async fn submit_batch(
        &self,
        tasks: Vec<BatchTask>,
        traceparent: Option<&str>,
    ) -> Result<Vec<(String, bool)>, crate::queue::QueueError> {
        self.prepare().await?;
        let stream = self.cfg.keys.stream(self.cfg.entry_stream());
        let now = task::now_ms();
        let publish = trace::publish_span(&stream);
        let tp = trace::link(&publish, traceparent);
        let items = tasks
            .into_iter()
            .map(|bt| {
                let mut t = Task::new(String::new(), serde_json::Value::Null);
                t.traceparent = Some(tp.clone());
                t.submitted_ms = Some(now);
                Submission {
                    idem_key: bt.idempotency_key.as_deref().map(|k| self.cfg.keys.idem(k)),
                    fingerprint: bt
                        .idempotency_key
                        .as_ref()
                        .map(|_| fingerprint(&bt.payload)),
                    task_id: random_uuid().to_string(),
                    fields: t.encode_with_payload(false, bt.payload),
                }
            })
            .collect();
        let done = self
            .queue
            .submit_batch(&stream, self.idempotency_ttl(), items, self.cfg.max_len)
            .instrument(publish)
            .await?;
        Ok(done
            .into_iter()
            .map(|d| {
                let created = d.created();
                (d.task_id, created)
            })
            .collect())
    }

    /// Count an accepted submission; its answer.
    fn accepted(&self, task_id: String, created: bool, took: Duration) -> serde_json::Value {
        let outcome = if created {
            Outcome::Completed
        } else {
            Outcome::Duplicate
        };
        self.stats.record(outcome, took, Duration::ZERO);
        json!({"task_id": task_id, "duplicate": !created})
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

/// The digest an idempotency key is bound with: a resend with the same key
/// and another payload is refused (`422`), not answered with another
/// task's id.
/// The JSON is canonicalised first (parsed and written back with sorted
/// keys and no spaces), so a resend that formats the same payload
/// differently is still the same request.
fn fingerprint(payload: &[u8]) -> String {
    use sha2::Digest;
    let canonical = serde_json::from_slice::<serde_json::Value>(payload)
        .ok()
        .and_then(|v| serde_json::to_vec(&v).ok());
    let bytes = canonical.as_deref().unwrap_or(payload);
    hex::encode(&sha2::Sha256::digest(bytes)[..16])
}

/// Seconds a client is asked to wait when the backlog is full.
const RETRY_AFTER_SECS: u64 = 1;

/// The answer to a queue refusal or failure. `batch`: name the task of a
/// batch a conflict is about.
fn refusal(e: QueueError, batch: bool) -> Response {
    match e {
        QueueError::Full {
            stream,
            backlog,
            limit,
        } => {
            let name = stream.rsplit(':').next().unwrap_or(&stream).to_owned();
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "queue.maxLen: stream {name:?} holds {backlog} unfinished tasks (limit {limit}); retry later"
                ),
            );
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(RETRY_AFTER_SECS),
            );
            r
        }
        QueueError::Conflict { index, task_id } => {
            let what = if batch {
                format!("tasks[{index}].idempotency_key")
            } else {
                "Idempotency-Key".to_owned()
            };
            error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("{what}: already used for another payload (task {task_id})"),
            )
        }
        e => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("queue unavailable: {e}"),
        ),
    }
}

/// The auth layer of the API routes (only with tokens): a request passes only with a valid
/// bearer token, and carries its [`Client`] on.
async fn authenticate(
    State(intake): State<Arc<Intake>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(tokens) = &intake.options.tokens else {
        return next.run(req).await;
    };
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match tokens.authenticate(header) {
        Ok(client) => {
            let client = Client(Arc::from(client));
            req.extensions_mut().insert(client);
            next.run(req).await
        }
        Err(e) => {
            let mut r = error(StatusCode::UNAUTHORIZED, e.message());
            if let Ok(v) = axum::http::HeaderValue::from_str(&e.challenge()) {
                r.headers_mut()
                    .insert(axum::http::header::WWW_AUTHENTICATE, v);
            }
            r
        }
    }
}

/// Read a request body of at most `limit` bytes: `413` beyond it, `408` when it did not
/// arrive within the server's body deadline ([`limits::DeadlineBody`]).
async fn read_body(body: Body, limit: usize, what: &str) -> Result<Bytes, Response> {
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if limits::is_body_timeout(&e) {
            error(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            )
        } else {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("{what} larger than {limit} bytes"),
            )
        }
    })
}

async fn submit(
    State(intake): State<Arc<Intake>>,
    client: Option<axum::Extension<Client>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let limit = intake.cfg.max_payload_bytes;
    let bytes = match read_body(body, limit, "payload").await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    // The engine's own rules, without building a value: the body is stored as it came.
    if let Err(e) = task::check_payload(&bytes, limit) {
        return error(StatusCode::BAD_REQUEST, format!("payload {e}"));
    }
    // Valid JSON whose first token is `{` is an object.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return error(StatusCode::BAD_REQUEST, "body must be a JSON object");
    }
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if valid_key(k) => Some(auth::scoped_key(client_id(&client), k)),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("Idempotency-Key {}", key_rule()),
                );
            }
        },
    };
    let span = trace::intake_span("/v1/tasks");
    let tp = trace::link(
        &span,
        headers
            .get(trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    let submitted = queue_call(intake.submit_raw(bytes, key.as_deref(), Some(&tp)), false);
    match submitted.instrument(span).await {
        Ok((task_id, created)) => {
            let took = started.elapsed();
            (
                StatusCode::ACCEPTED,
                Json(intake.accepted(task_id, created, took)),
            )
                .into_response()
        }
        Err(refusal) => refusal,
    }
}

/// A queue call of a request handler, bounded by [`QUEUE_DEADLINE`]; a
/// failure is the answer to give ([`refusal`]).
async fn queue_call<T>(
    fut: impl Future<Output = Result<T, crate::queue::QueueError>>,
    batch: bool,
) -> Result<T, Response> {
    match tokio::time::timeout(QUEUE_DEADLINE, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(refusal(e, batch)),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue unavailable: timeout",
        )),
    }
}

/// Longest a request waits for the queue before answering `503`.
const QUEUE_DEADLINE: Duration = Duration::from_secs(10);

/// What an idempotency key must be.
fn key_rule() -> String {
    format!("must be 1..={MAX_IDEMPOTENCY_KEY} printable ASCII characters")
}

fn valid_key(k: &str) -> bool {
    !k.is_empty() && k.len() <= MAX_IDEMPOTENCY_KEY && k.bytes().all(|b| b.is_ascii_graphic())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchBody<'a> {
    #[serde(borrow)]
    tasks: Tasks<'a>,
}

/// The raw tasks of a batch; an element the reader refuses (invalid UTF-8 inside it, say)
/// is named `tasks[i]` in the error.
struct Tasks<'a>(Vec<&'a RawValue>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Tasks<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Elements<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Elements<'a> {
            type Value = Tasks<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of tasks")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Tasks<'a>, A::Error> {
                let mut out = Vec::new();
                loop {
                    let i = out.len();
                    match seq.next_element::<&'de RawValue>() {
                        Ok(Some(raw)) => out.push(raw),
                        Ok(None) => return Ok(Tasks(out)),
                        Err(e) => {
                            return Err(serde::de::Error::custom(format!("tasks[{i}]: {e}")));
                        }
                    }
                }
            }
        }
        d.deserialize_seq(Elements(std::marker::PhantomData))
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    idempotency_key: Option<String>,
}

/// Parse and check a batch body; nothing is enqueued unless all of it is
/// good. Payloads are slices of `body` (no copy); keys are put in `client`'s key space.
fn parse_batch(
    body: &Bytes,
    max_payload: usize,
    client: Option<&str>,
) -> Result<Vec<BatchTask>, (StatusCode, String)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, m);
    let parsed: BatchBody<'_> = serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        if msg.starts_with("tasks[") {
            bad(msg)
        } else {
            bad(format!("body: {msg}"))
        }
    })?;
    if parsed.tasks.0.is_empty() || parsed.tasks.0.len() > MAX_BATCH {
        return Err(bad(format!(
            "tasks: must hold 1..={MAX_BATCH} tasks, got {}",
            parsed.tasks.0.len()
        )));
    }
    let mut out = Vec::with_capacity(parsed.tasks.0.len());
    for (i, raw) in parsed.tasks.0.iter().enumerate() {
        let item: BatchItem<'_> =
            serde_json::from_str(raw.get()).map_err(|e| bad(format!("tasks[{i}]: {e}")))?;
        let text = item.payload.get().as_bytes();
        if !text.starts_with(b"{") {
            return Err(bad(format!("tasks[{i}].payload: must be a JSON object")));
        }
        match task::check_payload(text, max_payload) {
            Ok(()) => {}
            Err(task::PayloadError::TooLarge { .. }) => {
                return Err((
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("tasks[{i}].payload: larger than {max_payload} bytes"),
                ));
            }
            Err(e @ task::PayloadError::NotJson(_)) => {
                return Err(bad(format!("tasks[{i}].payload {e}")));
            }
        }
        if let Some(k) = &item.idempotency_key
            && !valid_key(k)
        {
            return Err(bad(format!("tasks[{i}].idempotency_key: {}", key_rule())));
        }
        out.push(BatchTask {
            payload: body.slice_ref(text),
            idempotency_key: item.idempotency_key.map(|k| auth::scoped_key(client, &k)),
        });
    }
    Ok(out)
}

async fn submit_batch(
    State(intake): State<Arc<Intake>>,
    client: Option<axum::Extension<Client>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let bytes = match read_body(body, MAX_BATCH_BODY, "batch body").await {
        Ok(b) => b,
        Err(refusal) => return refusal,
    };
    let tasks = match parse_batch(&bytes, intake.cfg.max_payload_bytes, client_id(&client)) {
        Ok(t) => t,
        Err((status, msg)) => return error(status, msg),
    };
    let span = trace::intake_span("/v1/tasks:batch");
    span.record("r4.tasks", tasks.len());
    let tp = trace::link(
        &span,
        headers
            .get(trace::TRACEPARENT)
            .and_then(|v| v.to_str().ok()),
    );
    match queue_call(intake.submit_batch(tasks, Some(&tp)), true)
        .instrument(span)
        .await
    {
        Ok(done) => {
            let per_task = started.elapsed() / u32::try_from(done.len()).unwrap_or(1).max(1);
            let answer: Vec<_> = done
                .into_iter()
                .map(|(task_id, created)| intake.accepted(task_id, created, per_task))
                .collect();
            (StatusCode::ACCEPTED, Json(json!({"tasks": answer}))).into_response()
        }
        Err(refusal) => refusal,
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
