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
}

impl Health {
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            stats,
            ready: Arc::new(AtomicBool::new(true)),
        }
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
    if h.ready.load(Ordering::Relaxed) {
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
        h.stats.render_metrics(),
    )
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
