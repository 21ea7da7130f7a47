//! Every size limit and timeout of the engine's HTTP edges, in one place.
//!
//! Servers (intake API, tool proxy, health and metrics — [`super::http::serve`]):
//! - a request's **headers** must arrive within [`ServerLimits::header_read_timeout`]
//!   (hyper's HTTP/1 header timer; it also closes a keep-alive connection idle that long),
//!   so a client that sends half a header (slowloris) is disconnected;
//! - its **body** must have arrived [`ServerLimits::body_read_timeout`] after its headers
//!   ([`DeadlineBody`]: one deadline for the whole body, so a client trickling a byte now
//!   and then is cut too — `tower_http`'s body timeout restarts on every frame and would not
//!   be); the intake answers `408`;
//! - at most [`ServerLimits::max_connections`] connections are open at once; one more is
//!   closed as soon as it is accepted;
//! - the API routes (not `/healthz`, `/readyz`, `/metrics`, so a busy pod is not killed by
//!   its liveness probe) serve at most [`MAX_IN_FLIGHT`] requests at once
//!   (`tower::limit::GlobalConcurrencyLimitLayer` behind `LoadShedLayer`); one more is
//!   answered `503` with `Retry-After: 1` at once, never queued.
//!
//! Clients:
//! - a tool's answer is read up to [`MAX_TOOL_RESPONSE`] bytes, an agent's up to
//!   [`agent_answer_limit`]; a longer one is refused with a clear error while it streams in
//!   (never buffered whole);
//! - every tool call is bounded by its policy's `timeout.overall` (default
//!   [`crate::resilience::DEFAULT_OVERALL_TIMEOUT`]), which the HTTP client enforces too.
//!
//! Payload rules (size, JSON, nesting) are the task envelope's ([`super::task`]); the batch
//! limits are the intake's ([`super::intake`]).

use std::time::Duration;

use axum::Router;
use axum::error_handling::HandleErrorLayer;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use tower::ServiceBuilder;

/// Largest tool answer the proxy reads (16 MiB).
pub const MAX_TOOL_RESPONSE: usize = 16 << 20;

/// Room for the agent answer's envelope around its outputs.
pub const AGENT_ANSWER_ENVELOPE: usize = 64 << 10;

/// API requests served at once per server; the next is answered `503` at once.
pub const MAX_IN_FLIGHT: usize = 1024;

/// Largest agent answer read: one payload per produced stream (each within the workflow's
/// `intake.maxPayloadBytes`, the limit of every hop) plus the JSON envelope.
pub fn agent_answer_limit(max_payload: usize, produced_streams: usize) -> usize {
    max_payload
        .saturating_mul(produced_streams.max(1))
        .saturating_add(AGENT_ANSWER_ENVELOPE)
}

/// Limits of one HTTP server.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    /// Time for a request's headers to arrive (and the longest a kept-alive connection may
    /// idle between requests).
    pub header_read_timeout: Duration,
    /// Time for a request's body to arrive once its headers have.
    pub body_read_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// How long a stopping server waits for its open requests.
    pub drain_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            max_connections: 4096,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Cap `router`'s routes at `max` requests in flight; the next one is answered `503` with
/// `Retry-After: 1` at once. Apply it to API routes before merging the health routes.
pub fn in_flight_limit(router: Router, max: usize) -> Router {
    router.route_layer(
        ServiceBuilder::new()
            .layer(HandleErrorLayer::new(|_: tower::BoxError| async {
                overloaded()
            }))
            .load_shed()
            .layer(tower::limit::GlobalConcurrencyLimitLayer::new(max)),
    )
}

fn overloaded() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(axum::http::header::RETRY_AFTER, "1")],
        axum::Json(serde_json::json!({"error": "too many requests in flight; retry"})),
    )
        .into_response()
}

pin_project_lite::pin_project! {
    /// A request body that fails with [`BodyDeadline`] once its deadline has passed, however
    /// the bytes trickle in.
    pub struct DeadlineBody<B> {
        #[pin]
        body: B,
        #[pin]
        deadline: tokio::time::Sleep,
    }
}

impl<B> DeadlineBody<B> {
    /// `body`, to be read completely within `timeout` from now.
    pub fn new(body: B, timeout: Duration) -> Self {
        Self {
            body,
            deadline: tokio::time::sleep(timeout),
        }
    }
}

/// The error of a [`DeadlineBody`] read too late.
#[derive(Debug, thiserror::Error)]
#[error("request body not received in time")]
pub struct BodyDeadline;

impl<B> http_body::Body for DeadlineBody<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<tower::BoxError>,
{
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, tower::BoxError>>> {
        use std::future::Future;
        use std::task::Poll;
        let this = self.project();
        if let Poll::Ready(frame) = this.body.poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if this.deadline.poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyDeadline))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether a failed body read was the body deadline (answer `408`) rather than a length
/// limit or a client gone.
pub fn is_body_timeout(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyDeadline>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Why a response body was not read.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("answer larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("reading the answer: {0}")]
    Read(reqwest::Error),
}

/// Read `resp`'s body, refusing it as soon as it exceeds `limit` bytes (by its
/// `Content-Length` before reading, or while it streams in). Errors carry no URL.
pub async fn read_body(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    let announced = resp.content_length();
    if announced.is_some_and(|l| l > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut buf = BytesMut::with_capacity(
        announced.map_or(0, |l| usize::try_from(l).unwrap_or(limit).min(limit)),
    );
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.without_url()))?
    {
        if buf.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        if buf.is_empty() && announced == Some(chunk.len() as u64) {
            // The whole body in one chunk (the usual small answer): no copy.
            return Ok(chunk);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_answers_leave_room_for_every_output() {
        assert_eq!(agent_answer_limit(1000, 0), 1000 + AGENT_ANSWER_ENVELOPE);
        assert_eq!(agent_answer_limit(1000, 3), 3000 + AGENT_ANSWER_ENVELOPE);
        assert_eq!(agent_answer_limit(usize::MAX, 3), usize::MAX);
    }
}
