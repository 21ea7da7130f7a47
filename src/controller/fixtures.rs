//! Test fixtures for the reconcilers, in the kube-rs way: the `kube::Client` of the [`Context`]
//! talks to a `tower_test::mock` service, and an [`ApiServer`] on the other end receives every
//! request, checks it against the next [`Step`] of a script (method, path, the query parameters
//! that matter, a look into the JSON body) and answers it with a realistic object. A request
//! the script does not expect — one too many, or out of order — fails the test, so a test
//! states exactly which API calls a reconcile makes.
//!
//! The workflow's Redis is real but local: [`QueueSource::Shared`] with an in-memory queue, so
//! the kill-switch, stats and policy steps run the engine's own code. What a reconcile must
//! decide is the tests' (in `workflow.rs`); this file only plays the API server.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use super::context::{Context, Options, QueueSource};
use super::metrics::ControllerMetrics;
use super::workflow::FINALIZER;
use crate::api::policy::CircuitPolicy;
use crate::api::workflow::AgentWorkflow;
use crate::queue::memory::MemoryQueue;

pub const NS: &str = "default";
pub const WF: &str = "disputes";
pub const POLICY: &str = "default-policy";
pub const WF_UID: &str = "0b9e4c2a-6d1f-4e8b-a3c7-5f2d9e1a7b40";

/// Path prefixes of the API groups a reconcile talks to.
pub const CORE: &str = "/api/v1/namespaces/default";
pub const APPS: &str = "/apis/apps/v1/namespaces/default";
pub const R4: &str = "/apis/r4.dev/v1alpha1/namespaces/default";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/default/events";

/// A workflow as the API server hands it over after the finalizer was added: in `default`,
/// with a uid, generation 1, two agents, the intake, a default policy.
pub fn workflow() -> AgentWorkflow {
    let wf = json!({
        "apiVersion": "r4.dev/v1alpha1",
        "kind": "AgentWorkflow",
        "metadata": {
            "name": WF, "namespace": NS, "uid": WF_UID, "generation": 1,
            "resourceVersion": "100", "finalizers": [FINALIZER],
        },
        "spec": {
            "queue": {"redis": {"url": "redis://redis.r4-system:6379/0"}},
            "policyRef": POLICY,
            "agents": [
                {"name": "triage", "image": "ghcr.io/acme/triage:1.0", "consumes": "tickets", "produces": ["cases"]},
                {"name": "resolve", "image": "ghcr.io/acme/resolve:1.0", "replicas": 2, "consumes": "cases"},
            ],
            "intake": {"enabled": true},
        },
    });
    from_json(wf, "workflow")
}

/// The CircuitPolicy the workflow names.
pub fn policy() -> CircuitPolicy {
    from_json(
        json!({
            "apiVersion": "r4.dev/v1alpha1",
            "kind": "CircuitPolicy",
            "metadata": {"name": POLICY, "namespace": NS, "uid": "1d4f0c3b-2a9e-4b7d-8c61-0e5a3f2b9d17", "resourceVersion": "50", "generation": 1},
            "spec": {
                "timeout": {"perAttempt": "2s", "overall": "10s"},
                "retry": {"maxAttempts": 3, "backoff": {"initial": "100ms", "max": "5s", "multiplier": 2, "jitter": "Full"}},
                "circuitBreaker": {"failureRateThreshold": 0.5, "window": {"type": "Count", "size": 100}, "minimumCalls": 20, "openDuration": "30s", "halfOpenCalls": 3},
            },
        }),
        "policy",
    )
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> T {
    match serde_json::from_value(v) {
        Ok(t) => t,
        Err(e) => panic!("test {what} does not deserialize: {e}"),
    }
}

/// A context whose client talks to the returned [`ApiServer`] and whose every workflow uses
/// the returned in-memory queue.
pub fn context() -> (Arc<Context>, ApiServer, Arc<MemoryQueue>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, NS);
    let queue = Arc::new(MemoryQueue::new());
    let opts = Options {
        engine_image: "ghcr.io/r4-dev/r4:test".into(),
        api_timeout: Duration::from_secs(5),
        queue: QueueSource::Shared(queue.clone()),
        ..Options::default()
    };
    let metrics = Arc::new(ControllerMetrics::default());
    let ctx = Arc::new(Context::new(client, opts, metrics));
    (ctx, ApiServer { handle }, queue)
}

/// A request as the API server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when empty).
    pub body: Value,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if !self.query.is_empty() {
            let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(f, "?{}", q.join("&"))?;
        }
        Ok(())
    }
}

type Check = Box<dyn FnOnce(&Seen) + Send>;
type Answer = Box<dyn FnOnce(&Seen) -> (StatusCode, Value) + Send>;

/// One request the script expects, and its answer.
pub struct Step {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<String>,
    check: Option<Check>,
    answer: Answer,
}

impl Step {
    fn new(method: Method, path: String) -> Self {
        Step {
            method,
            path,
            query: Vec::new(),
            content_type: None,
            check: None,
            answer: Box::new(|seen: &Seen| (StatusCode::OK, created(&seen.body))),
        }
    }

    /// A GET of one object, answered with `object`.
    pub fn get(path: impl Into<String>, object: Value) -> Self {
        Step::new(Method::GET, path.into()).answer(StatusCode::OK, object)
    }

    /// A GET answered `404 NotFound`, as the API server does.
    pub fn get_missing(path: impl Into<String>, kind_plural: &str, name: &str) -> Self {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{kind_plural} \"{name}\" not found"), "reason": "NotFound",
            "details": {"name": name, "kind": kind_plural}, "code": 404,
        });
        Step::new(Method::GET, path.into()).answer(StatusCode::NOT_FOUND, status)
    }

    /// A LIST of the workflow's children of `kind` (label selector `r4.dev/workflow=<WF>`),
    /// answered with `items`.
    pub fn list(path: impl Into<String>, kind: &str, items: Vec<Value>) -> Self {
        let list = json!({
            "apiVersion": "v1", "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": "200"}, "items": items,
        });
        Step::new(Method::GET, path.into())
            .query("labelSelector", &format!("{}={WF}", super::WORKFLOW_LABEL))
            .answer(StatusCode::OK, list)
    }

    /// A POST (create), answered with the object as created (uid, resourceVersion).
    pub fn create(path: impl Into<String>) -> Self {
        Step::new(Method::POST, path.into())
    }

    /// An Event about the workflow (events.k8s.io) with this reason.
    pub fn event(reason: &'static str) -> Self {
        Step::create(EVENTS).check(move |s| {
            assert_eq!(s.body["reason"], reason, "event reason: {}", s.body);
            assert_eq!(
                s.body["regarding"]["name"], WF,
                "event regarding: {}",
                s.body
            );
            assert_eq!(s.body["regarding"]["kind"], "AgentWorkflow");
        })
    }

    /// A server-side apply by the controller's field manager, forced, answered with the
    /// object as applied.
    pub fn apply(path: impl Into<String>) -> Self {
        Step::new(Method::PATCH, path.into())
            .query("fieldManager", super::FIELD_MANAGER)
            .query("force", "true")
            .content_type("application/apply-patch+yaml")
    }

    /// A JSON merge patch (answered with its own body unless [`Step::answer`] says otherwise).
    pub fn merge_patch(path: impl Into<String>) -> Self {
        Step::new(Method::PATCH, path.into()).content_type("application/merge-patch+json")
    }

    /// The status PATCH of the workflow: a merge patch, answered with the workflow as patched.
    pub fn patch_status(wf: &AgentWorkflow) -> Self {
        let mut current = serde_json::to_value(wf).unwrap_or(Value::Null);
        Step::merge_patch(format!("{R4}/agentworkflows/{WF}/status")).answer_with(move |seen| {
            json_patch::merge(&mut current, &seen.body);
            (StatusCode::OK, current)
        })
    }

    /// A query parameter the request must carry with this value.
    pub fn query(mut self, key: &str, value: &str) -> Self {
        self.query.push((key.to_owned(), value.to_owned()));
        self
    }

    pub fn content_type(mut self, ct: &str) -> Self {
        self.content_type = Some(ct.to_owned());
        self
    }

    /// Look into the request (its body, mostly); panics there fail the test.
    pub fn check(mut self, f: impl FnOnce(&Seen) + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }

    pub fn answer(self, status: StatusCode, body: Value) -> Self {
        self.answer_with(move |_| (status, body))
    }

    pub fn answer_with(
        mut self,
        f: impl FnOnce(&Seen) -> (StatusCode, Value) + Send + 'static,
    ) -> Self {
        self.answer = Box::new(f);
        self
    }
}

/// What the API server gives back for a created or applied object: the body with the
/// metadata the server sets.
pub fn created(body: &Value) -> Value {
    let mut v = body.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.entry("uid")
            .or_insert_with(|| json!(uuid::Uuid::new_v4().to_string()));
        m.insert("resourceVersion".into(), json!("300"));
        m.entry("generation").or_insert(json!(1));
        m.entry("creationTimestamp")
            .or_insert(json!("2026-01-01T00:00:00Z"));
    }
    v
}

/// The fake API server: the other end of the context's client.
pub struct ApiServer {
    handle: mock::Handle<Request<Body>, Response<Body>>,
}

impl ApiServer {
    /// Drive `fut` (a reconcile) while answering its requests by `script`, in order. Fails the
    /// test on a request the script does not expect next, on a step left unanswered when
    /// `fut` is done, and on a request still pending afterwards. Returns `fut`'s output and
    /// every request seen.
    pub async fn run<F: Future>(&mut self, script: Vec<Step>, fut: F) -> (F::Output, Vec<Seen>) {
        let mut steps = script.into_iter();
        let mut seen = Vec::new();
        let mut fut = std::pin::pin!(fut);
        let deadline = tokio::time::sleep(Duration::from_secs(30));
        let mut deadline = std::pin::pin!(deadline);
        let out = loop {
            tokio::select! {
                out = &mut fut => break out,
                req = self.handle.next_request() => {
                    let Some((req, respond)) = req else {
                        panic!("the client was dropped while the reconcile ran");
                    };
                    let s = read(req).await;
                    let Some(step) = steps.next() else {
                        panic!("unexpected request {s} after every scripted one (body: {})", s.body);
                    };
                    let (status, body) = answer(step, &s, seen.len());
                    seen.push(s);
                    let mut resp = Response::new(Body::from(body.to_string().into_bytes()));
                    *resp.status_mut() = status;
                    resp.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        http::HeaderValue::from_static("application/json"),
                    );
                    respond.send_response(resp);
                }
                () = &mut deadline => panic!("the reconcile did not finish within 30s; requests so far: {}", list(&seen)),
            }
        };
        let left: Vec<String> = steps.map(|s| format!("{} {}", s.method, s.path)).collect();
        assert!(
            left.is_empty(),
            "the reconcile ended before the scripted requests {left:?}; it made: {}",
            list(&seen)
        );
        if let Some(Some((req, _))) = self.handle.next_request().now_or_never() {
            panic!(
                "a request was left unanswered after the reconcile: {} {}",
                req.method(),
                req.uri()
            );
        }
        (out, seen)
    }
}

fn list(seen: &[Seen]) -> String {
    let v: Vec<String> = seen.iter().map(|s| s.to_string()).collect();
    format!("[{}]", v.join(", "))
}

fn answer(step: Step, s: &Seen, index: usize) -> (StatusCode, Value) {
    let at = format!("request #{index} ({s})");
    assert_eq!(s.method, step.method, "{at}: method");
    assert_eq!(s.path, step.path, "{at}: path");
    for (k, v) in &step.query {
        assert_eq!(s.query.get(k), Some(v), "{at}: query parameter {k}");
    }
    if let Some(ct) = &step.content_type {
        assert_eq!(s.content_type.as_ref(), Some(ct), "{at}: content type");
    }
    if let Some(check) = step.check {
        check(s);
    }
    (step.answer)(s)
}

async fn read(req: Request<Body>) -> Seen {
    let (parts, body) = req.into_parts();
    let bytes = match body.collect_bytes().await {
        Ok(b) => b,
        Err(e) => panic!(
            "cannot read the body of {} {}: {e}",
            parts.method, parts.uri
        ),
    };
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => panic!("{} {}: body is not JSON: {e}", parts.method, parts.uri),
        }
    };
    let query = parts
        .uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect();
    Seen {
        method: parts.method,
        path: parts.uri.path().to_owned(),
        query,
        content_type: parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
    }
}

/// Percent-decoding of a query component (`+` is a space).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(c) => {
                        out.push(c);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

mod workflow_reconcile;
