//! The controller's HTTP endpoints: `GET /metrics` ([`super::metrics`]), `/healthz` and
//! `/readyz`. The connection limits (header and body deadlines, connection cap, graceful
//! drain) are the engine's server's ([`crate::engine::http::serve`]); this module adds a
//! deadline on every request ([`REQUEST_TIMEOUT`]) and the routes.
//!
//! - `/healthz` answers 200 while the process serves at all (liveness: a restart would not
//!   help otherwise).
//! - `/readyz` answers 200 exactly while the `ready` watch holds `true`. The controller sets
//!   it; its rule is: **ready once the API server answered and, while leading, once the
//!   watches have synced; a standby waiting on the lease is ready too.** A standby is a
//!   healthy replica — were it unready, a rolling update of a 2-replica Deployment would wait
//!   on it forever, and the metrics Service would hide the standby's `r4_controller_leader 0`.
//!   Whether a replica leads is the `r4_controller_leader` gauge's to say, not readiness'.
//!   A leader whose watches have not synced yet (or lost the API) is unready.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;
use tower::ServiceBuilder;

use super::metrics::ControllerMetrics;

/// Longest any request may take before it is answered 503 (rendering the metrics is
/// microseconds; this only bounds a stuck handler).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<ControllerMetrics>,
    ready: watch::Receiver<bool>,
}

/// The routes, each under [`REQUEST_TIMEOUT`].
pub fn router(metrics: Arc<ControllerMetrics>, ready: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(Endpoints { metrics, ready })
        .layer(
            ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                    (StatusCode::SERVICE_UNAVAILABLE, "request timed out\n")
                }))
                .timeout(REQUEST_TIMEOUT),
        )
}

async fn readyz(State(e): State<Endpoints>) -> impl IntoResponse {
    if *e.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

async fn render_metrics(State(e): State<Endpoints>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        e.metrics.render(),
    )
}

/// Bind `addr` and serve the endpoints until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<ControllerMetrics>,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = bind(addr).await?;
    serve_on(listener, metrics, ready, shutdown).await
}

/// Bind `addr` (port 0: any free port) and log the address bound, so a caller can learn the
/// port ([`tokio::net::TcpListener::local_addr`]) before serving with [`serve_on`].
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("metrics address {addr}: {e}")))?;
    if let Ok(bound) = listener.local_addr() {
        tracing::info!(addr = %bound, "controller metrics and health endpoints listening");
    }
    Ok(listener)
}

/// Serve the endpoints on `listener` until `shutdown` turns true.
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    metrics: Arc<ControllerMetrics>,
    ready: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    crate::engine::http::serve(listener, router(metrics, ready), shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(client: &reqwest::Client, url: String) -> (u16, String) {
        let r = tokio::time::timeout(Duration::from_secs(5), client.get(url).send())
            .await
            .expect("answer within 5 s")
            .expect("request");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    #[tokio::test]
    async fn scrape_health_and_readiness_over_http() {
        let metrics = Arc::new(ControllerMetrics::new());
        let (ready_tx, ready) = watch::channel(false);
        let (stop, shutdown) = watch::channel(false);
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve_on(listener, metrics.clone(), ready, shutdown));
        let client = reqwest::Client::new();
        let base = format!("http://{addr}");

        assert_eq!(get(&client, format!("{base}/healthz")).await.0, 200);
        assert_eq!(get(&client, format!("{base}/readyz")).await.0, 503);
        ready_tx.send_replace(true);
        assert_eq!(get(&client, format!("{base}/readyz")).await.0, 200);
        ready_tx.send_replace(false);
        assert_eq!(get(&client, format!("{base}/readyz")).await.0, 503);

        metrics.reconciled("AgentWorkflow", Duration::from_millis(5));
        metrics.set_leader(true);
        let (status, body) = get(&client, format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        assert!(
            body.contains("r4_controller_reconciles_total{kind=\"AgentWorkflow\"} 1"),
            "{body}"
        );
        assert!(body.contains("r4_controller_leader 1"), "{body}");
        assert_eq!(get(&client, format!("{base}/nope")).await.0, 404);

        stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .expect("task")
            .expect("serve");
        assert!(
            client
                .get(format!("{base}/healthz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .is_err(),
            "nothing listens after shutdown"
        );
    }

    #[tokio::test]
    async fn ready_dropped_sender_keeps_last_value() {
        // The controller task that owns `ready` ending must not panic the endpoint.
        let metrics = Arc::new(ControllerMetrics::new());
        let (ready_tx, ready) = watch::channel(true);
        drop(ready_tx);
        let app = router(metrics, ready);
        let r = tower::ServiceExt::oneshot(
            app,
            axum::http::Request::get("/readyz")
                .body(axum::body::Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
        assert_eq!(r.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn bind_error_names_the_address() {
        let taken = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = taken.local_addr().expect("addr");
        let e = bind(addr).await.expect_err("port in use");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
}
