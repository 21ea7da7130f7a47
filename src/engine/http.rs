//! The endpoints every role serves: `/healthz` (the process runs),
//! `/readyz` (the role is ready to take work: connected and not stopping)
//! and `/metrics` (Prometheus text). Roles add their own routes on top.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use super::stats::Stats;

/// Shared state of the health endpoints.
#[derive(Clone)]
pub struct Health {
    pub stats: Arc<Stats>,
    pub ready: Arc<AtomicBool>,
    /// More metrics to serve beside the engine's (the tool proxy's policy metrics).
    pub registry: Option<prometheus::Registry>,
}

impl Health {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            ready: Arc::new(AtomicBool::new(true)),
            registry: None,
        }
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
    let mut text = h.stats.render_metrics();
    if let Some(r) = &h.registry {
        let mut buf = Vec::new();
        let encoder = prometheus::TextEncoder::new();
        if prometheus::Encoder::encode(&encoder, &r.gather(), &mut buf).is_ok() {
            text.push_str(&String::from_utf8_lossy(&buf));
        }
    }
    text
}

/// Serve `router` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|s| *s).await;
        })
        .await
}
