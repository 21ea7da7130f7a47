//! The endpoints every role serves: `/healthz` (the process runs),
//! `/readyz` (the role is ready to take work: connected and not stopping)
//! and `/metrics` (Prometheus text). Roles add their own routes on top. [`serve`] runs every
//! HTTP server of the engine under the limits of [`super::limits`].

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use super::limits::{DeadlineBody, ServerLimits};
use super::stats::Stats;

/// Shared state of the health endpoints.
#[derive(Clone)]
pub struct Health {
    pub stats: Arc<Stats>,
    pub ready: Arc<AtomicBool>,
    /// More metrics to serve beside the engine's (the tool proxy's policy metrics).
    pub registry: Option<prometheus::Registry>,
    /// Labels every served series carries (`namespace`, `workflow`): one scrape config for
    /// every engine, and the dashboards and alerts group by workflow without relabelling.
    pub labels: Vec<(String, String)>,
}

impl Health {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            ready: Arc::new(AtomicBool::new(true)),
            registry: None,
            labels: Vec::new(),
        }
    }

    /// Label every served series with the workflow it belongs to (`namespace`, `workflow`).
    pub fn for_workflow(mut self, namespace: &str, workflow: &str) -> Self {
        self.labels = vec![
            ("namespace".into(), namespace.into()),
            ("workflow".into(), workflow.into()),
        ];
        self
    }

    /// Serve `registry`'s metrics on `/metrics` too.
    pub fn with_registry(mut self, registry: prometheus::Registry) -> Self {
        self.registry = Some(registry);
        self
    }
}

/// `/healthz`, `/readyz`, `/metrics`.
pub fn router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(h): State<Health>) -> impl IntoResponse {
    if h.ready.load(Ordering::Relaxed) && h.stats.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        render(&h),
    )
}

fn render(h: &Health) -> String {
    let mut families = h.stats.gather();
    if let Some(r) = &h.registry {
        families.extend(r.gather());
    }
    label_families(&mut families, &h.labels);
    let mut buf = Vec::new();
    if prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &families, &mut buf).is_err() {
        return String::new();
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// Add `labels` to every metric of `families` (a label the metric already has is kept as is).
pub fn label_families(
    families: &mut [prometheus::proto::MetricFamily],
    labels: &[(String, String)],
) {
    if labels.is_empty() {
        return;
    }
    for f in families.iter_mut() {
        for m in f.mut_metric().iter_mut() {
            let mut pairs = m.take_label();
            for (k, v) in labels {
                if pairs.iter().any(|p| p.name() == k) {
                    continue;
                }
                let mut p = prometheus::proto::LabelPair::default();
                p.set_name(k.clone());
                p.set_value(v.clone());
                pairs.push(p);
            }
            pairs.sort_by(|a, b| a.name().cmp(b.name()));
            m.set_label(pairs);
        }
    }
}

/// Serve `router` on `listener` until `shutdown` turns true, with the default
/// [`ServerLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_with(listener, router, shutdown, ServerLimits::default()).await
}

/// Serve `router` on `listener` until `shutdown` turns true, under `limits` (see
/// [`super::limits`]): HTTP/1.1 with hyper's header read timeout, a deadline on every request
/// body, at most `max_connections` open. On shutdown the listener closes, open connections
/// finish their current request (graceful) and are waited for at most `drain_timeout`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
    limits: ServerLimits,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let body_deadline = limits.body_read_timeout;
    loop {
        let accepted = tokio::select! {
            _ = async { drop(shutdown.wait_for(|s| *s).await) } => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning; the
                // connections already open keep being served.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: close at once rather than queue (the client sees a reset).
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service =
            router
                .clone()
                .map_request(move |req: axum::http::Request<hyper::body::Incoming>| {
                    req.map(|b| axum::body::Body::new(DeadlineBody::new(b, body_deadline)))
                });
        let conn = builder.serve_connection(
            TokioIo::new(stream),
            hyper_util::service::TowerToHyperService::new(service),
        );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(limits.drain_timeout, graceful.shutdown()).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every served series names its workflow, the engine's and the extra registry's alike; a
    /// series that already has the label keeps its own value.
    #[test]
    fn metrics_carry_the_workflow_labels() {
        let stats = Arc::new(Stats::new("e1", "agent", Some("a")));
        let extra = prometheus::Registry::new();
        let g = prometheus::IntGaugeVec::new(prometheus::Opts::new("x_gauge", "x"), &["workflow"])
            .expect("gauge");
        extra.register(Box::new(g.clone())).expect("register");
        g.with_label_values(&["other"]).set(1);
        let h = Health::new(stats)
            .with_registry(extra)
            .for_workflow("team", "shop");
        let text = render(&h);
        assert!(
            text.contains(
                "r4_engine_tasks_total{agent=\"a\",namespace=\"team\",outcome=\"completed\",workflow=\"shop\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("x_gauge{namespace=\"team\",workflow=\"other\"} 1"),
            "{text}"
        );
        // Without labels nothing is added.
        let plain = render(&Health::new(Arc::new(Stats::new("e2", "intake", None))));
        assert!(!plain.contains("workflow="), "{plain}");
    }
}
