//! What every reconcile shares: the kube `Client`, the options, the event recorder, metrics,
//! the per-object error backoff, the connections to the workflows' Redis servers, the
//! reflector stores of the current term of leadership ([`super::cache`]), and the little the
//! controller remembers between reconciles (engine statistics over time, when a revision
//! became available, what it applied and wrote last). Nothing here decides anything.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::runtime::events::{Recorder, Reporter};

use super::analysis::Samples;
use super::backoff::ErrorBackoff;
use super::cache::{Applied, Caches, Written};
use super::metrics::ControllerMetrics;
use crate::api::workflow::{AgentWorkflowSpec, AgentWorkflowStatus};
use crate::queue::Queue;
use crate::queue::redis::RedisQueue;
use crate::telemetry::redact::redact_url;

/// Where the controller finds a workflow's queue.
#[derive(Clone)]
pub enum QueueSource {
    /// From the workflow's `spec.queue.redis` (`url`, or `urlSecretRef` read through the API):
    /// what the engines of the workflow's pods connect to.
    Spec,
    /// One queue for every workflow, whatever their spec says: `r4 dev` (its kubelet runs every
    /// engine on this queue) and `r4 controller --redis`.
    Shared(Arc<dyn Queue>),
}

/// How the controller runs.
#[derive(Clone)]
pub struct Options {
    /// Image of the engine sidecar and of the intake and repair roles.
    pub engine_image: String,
    /// Environment every rendered engine container gets on top of its own: the controller's
    /// OpenTelemetry export settings ([`forwarded_engine_env`]), so one Helm value turns
    /// tracing on for the whole workflow and not only for the controller.
    pub engine_env: Vec<(String, String)>,
    /// How often a workflow is reconciled again for the stats-driven parts of its status
    /// (queue depths, SLO, cost, analysis) when nothing else triggers it.
    pub stats_interval: Duration,
    /// Deadline of every API call and Redis step.
    pub api_timeout: Duration,
    /// Where the workflows' queues are.
    pub queue: QueueSource,
    /// Name that Events carry as their reporting controller, and this instance's id.
    pub reporter: String,
    pub instance: Option<String>,
    /// The counts of the client's API requests ([`super::rbac::recording_client`]), exported
    /// on `/metrics` as `r4_controller_api_requests_total`.
    pub api_requests: Option<super::rbac::Recorder>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            engine_image: default_engine_image(),
            engine_env: Vec::new(),
            stats_interval: Duration::from_secs(10),
            api_timeout: Duration::from_secs(10),
            queue: QueueSource::Spec,
            reporter: "r4-controller".into(),
            instance: None,
            api_requests: None,
        }
    }
}

/// The engine image of this release (the controller's own image runs the engine too).
pub fn default_engine_image() -> String {
    format!("ghcr.io/r4-dev/r4:{}", env!("CARGO_PKG_VERSION"))
}

/// The `OTEL_*` variables the controller hands on to the engines it renders: where and how to
/// export traces. Not `OTEL_SERVICE_NAME` (each engine names itself `r4-engine`) and not
/// `OTEL_EXPORTER_OTLP_HEADERS` (it may hold a collector token: a literal env value in a
/// Deployment would publish it to everyone who can read Deployments).
pub const FORWARDED_OTEL_ENV: [&str; 7] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
];

/// The forwarded variables that are set (non-empty) in `lookup`, in [`FORWARDED_OTEL_ENV`]
/// order (a stable order: the rendered pods change only when a value does).
pub fn forwarded_engine_env(lookup: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    FORWARDED_OTEL_ENV
        .iter()
        .filter_map(|name| {
            let v = lookup(name)?;
            (!v.trim().is_empty()).then(|| (name.to_string(), v))
        })
        .collect()
}

/// Per workflow, what the controller remembers between reconciles. Lost on restart: the
/// statistics window then starts again (an analysis in progress waits one window longer).
#[derive(Default)]
pub struct Memory {
    /// Readings of the workflow's engine statistics.
    pub samples: Samples,
    /// The revision this controller applied last: fresher than `status.currentRevision` in a
    /// cache that has not seen the last status write yet.
    pub applied: Option<i64>,
    /// The revision applied and when its Deployments were first seen available.
    pub available_since: Option<(i64, Timestamp)>,
    /// Deletion with `deletePolicy: Delete`: when the workflow's keys were first deleted, and
    /// how many keys all passes deleted.
    pub keys_deleted: Option<(std::time::Instant, usize)>,
    /// The children this controller applied, to skip an apply that would change nothing.
    pub children: Applied,
    /// The revisions as this controller last wrote them (a store may not show them yet).
    pub written: Option<Written>,
    /// The status this controller last wrote, and when (the same: a store may lag).
    pub status_written: Option<(AgentWorkflowStatus, std::time::Instant)>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub opts: Options,
    pub recorder: Recorder,
    pub metrics: Arc<ControllerMetrics>,
    pub backoff: ErrorBackoff,
    /// The drill runs of this controller ([`super::drill`]).
    pub drills: super::drill::Runs,
    queues: Mutex<HashMap<String, Arc<dyn Queue>>>,
    memory: Mutex<HashMap<String, Memory>>,
    /// The stores of the current term of leadership; `None` outside one (a reconcile then
    /// lists through the API).
    caches: RwLock<Option<Caches>>,
}

/// Errors of a reconcile; each has a small static label for the metrics.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("no answer from the Kubernetes API within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Queue(String),
    #[error("{0}")]
    Render(#[from] super::render::RenderError),
    #[error("finalizer: {0}")]
    Finalizer(String),
}

impl Error {
    /// Every [`Error::metric_label`], so the metrics can export each error class at 0 from the
    /// start.
    pub const METRIC_LABELS: [&'static str; 5] =
        ["kube", "timeout", "redis", "render", "finalizer"];

    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Timeout(_) => "timeout",
            Error::Queue(_) => "redis",
            Error::Render(_) => "render",
            Error::Finalizer(_) => "finalizer",
        }
    }
}

impl Context {
    pub fn new(client: kube::Client, opts: Options, metrics: Arc<ControllerMetrics>) -> Self {
        let reporter = Reporter {
            controller: opts.reporter.clone(),
            instance: opts.instance.clone(),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            opts,
            metrics,
            backoff: ErrorBackoff::new(Duration::from_millis(500), Duration::from_secs(300)),
            drills: super::drill::Runs::default(),
            queues: Mutex::new(HashMap::new()),
            memory: Mutex::new(HashMap::new()),
            caches: RwLock::new(None),
        }
    }

    /// Run one API call with the deadline.
    pub async fn api<T>(
        &self,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.opts.api_timeout, fut)
            .await
            .map_err(|_| Error::Timeout(self.opts.api_timeout))?
            .map_err(Error::Kube)
    }

    /// Run one Redis step with the deadline.
    pub async fn redis<T, E: std::fmt::Display>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.opts.api_timeout, fut)
            .await
            .map_err(|_| {
                Error::Queue(format!(
                    "{what}: no answer within {:?}",
                    self.opts.api_timeout
                ))
            })?
            .map_err(|e| Error::Queue(format!("{what}: {e}")))
    }

    /// The queue of a workflow: the shared one, or a connection (kept and reused) to the Redis
    /// its spec names. A `urlSecretRef` is read through the API each time (a rotated Secret
    /// takes effect at the next reconcile); only the URL's connection is cached.
    pub async fn queue(
        &self,
        namespace: &str,
        spec: &AgentWorkflowSpec,
    ) -> Result<Arc<dyn Queue>, Error> {
        let url = match &self.opts.queue {
            QueueSource::Shared(q) => return Ok(q.clone()),
            QueueSource::Spec => self.redis_url(namespace, spec).await?,
        };
        if let Some(q) = self.lock_queues().get(&url) {
            return Ok(q.clone());
        }
        let shown = redact_url(&url);
        let q = self
            .redis(&format!("connect to {shown}"), RedisQueue::connect(&url))
            .await?;
        let q: Arc<dyn Queue> = Arc::new(q);
        self.lock_queues().insert(url, q.clone());
        Ok(q)
    }

    async fn redis_url(&self, namespace: &str, spec: &AgentWorkflowSpec) -> Result<String, Error> {
        if let Some(url) = &spec.queue.redis.url {
            return Ok(url.clone());
        }
        let Some(r) = &spec.queue.redis.url_secret_ref else {
            return Err(Error::Queue(
                "spec.queue.redis: neither url nor urlSecretRef is set".into(),
            ));
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = self.api(secrets.get_opt(&r.name)).await?.ok_or_else(|| {
            Error::Queue(format!(
                "spec.queue.redis.urlSecretRef: secret {namespace}/{} not found",
                r.name
            ))
        })?;
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(&r.key))
            .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
            .or_else(|| {
                secret
                    .string_data
                    .as_ref()
                    .and_then(|d| d.get(&r.key))
                    .map(|s| s.trim().to_owned())
            })
            .ok_or_else(|| {
                Error::Queue(format!(
                    "spec.queue.redis.urlSecretRef: secret {namespace}/{} has no key {:?}",
                    r.name, r.key
                ))
            })?;
        Ok(value)
    }

    fn lock_queues(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<dyn Queue>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reflector stores of the current term, once every one has had its first list.
    pub async fn caches(&self) -> Result<Option<Caches>, Error> {
        let caches = self
            .caches
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(c) = &caches {
            c.ready(self.opts.api_timeout).await?;
        }
        Ok(caches)
    }

    /// A term of leadership starts (`Some`) or ends (`None`). What this controller wrote of
    /// revisions is forgotten either way: another leader may have written since.
    pub fn set_caches(&self, caches: Option<Caches>) {
        *self.caches.write().unwrap_or_else(|p| p.into_inner()) = caches;
        for m in self
            .memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values_mut()
        {
            m.written = None;
            m.status_written = None;
        }
    }

    /// Work on what the controller remembers of one workflow (`namespace/name`).
    pub fn memory<T>(&self, key: &str, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut m = self.memory.lock().unwrap_or_else(|p| p.into_inner());
        f(m.entry(key.to_owned()).or_default())
    }

    /// Forget a deleted workflow.
    pub fn forget(&self, key: &str) {
        self.memory
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.backoff.succeeded(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_export_settings_are_forwarded_and_empty_ones_are_not() {
        let env = |k: &str| match k {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318".to_string()),
            "OTEL_TRACES_SAMPLER" => Some("  ".to_string()),
            "OTEL_SERVICE_NAME" | "OTEL_EXPORTER_OTLP_HEADERS" => Some("x".to_string()),
            _ => None,
        };
        assert_eq!(
            forwarded_engine_env(env),
            vec![(
                "OTEL_EXPORTER_OTLP_ENDPOINT".to_string(),
                "http://collector:4318".to_string()
            )]
        );
    }
}
