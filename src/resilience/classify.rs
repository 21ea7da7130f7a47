//! Request and response traits the layers need, plus a small HTTP-like
//! request/response pair (used by the tool proxy) implementing them.
//!
//! The layers stay generic over the inner `Service<Req>`; all they must know
//! is whether a request may be sent twice (`idempotent`), how to key a cached
//! answer (`cache_key`) and how a response or error should be classified.

use std::time::Duration;

use super::error::ResilienceError;

/// What the layers need to know about a request.
pub trait PolicyRequest: Clone + Send + 'static {
    /// Sending this request twice has the same effect as sending it once.
    /// Non-idempotent requests are never hedged and only retried after a
    /// connect error.
    fn idempotent(&self) -> bool;
    /// Key for the fallback cache; `None` disables caching for this request.
    fn cache_key(&self) -> Option<String>;
}

/// What the layers need to know about a response.
pub trait PolicyResponse: Clone + Send + 'static {
    fn outcome(&self) -> Outcome;
    /// Mark the response as served by the fallback layer.
    fn mark_fallback(&mut self);
    fn is_fallback(&self) -> bool;
    /// Build a static fallback answer; `None` if the value does not fit.
    fn from_static(value: &serde_json::Value) -> Option<Self>;
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(FailureClass),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureClass {
    Timeout,
    ConnectError,
    Status5xx,
    Status429 { retry_after: Option<Duration> },
    Other,
}

impl FailureClass {
    pub fn label(&self) -> &'static str {
        match self {
            FailureClass::Timeout => "timeout",
            FailureClass::ConnectError => "connect_error",
            FailureClass::Status5xx => "status_5xx",
            FailureClass::Status429 { .. } => "status_429",
            FailureClass::Other => "failure",
        }
    }
}

/// Classify a whole result (response or error) in one place.
pub fn outcome_of<R: PolicyResponse>(res: &Result<R, ResilienceError>) -> Outcome {
    match res {
        Ok(r) => r.outcome(),
        Err(e) => Outcome::Failure(e.failure_class()),
    }
}

/// A minimal HTTP-like request.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpRequest {
    pub method: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn get(url: impl Into<String>) -> Self {
        HttpRequest {
            method: "GET".into(),
            url: url.into(),
            ..Default::default()
        }
    }

    pub fn post(url: impl Into<String>, body: Vec<u8>) -> Self {
        HttpRequest {
            method: "POST".into(),
            url: url.into(),
            body,
            ..Default::default()
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }
}

impl PolicyRequest for HttpRequest {
    /// RFC 9110 idempotent methods, or any request carrying an
    /// `Idempotency-Key` (the server deduplicates it).
    fn idempotent(&self) -> bool {
        matches!(
            self.method.to_ascii_uppercase().as_str(),
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
        ) || self.header("idempotency-key").is_some()
    }

    /// Only safe reads are cached: replaying a cached POST answer would lie.
    fn cache_key(&self) -> Option<String> {
        match self.method.to_ascii_uppercase().as_str() {
            "GET" | "HEAD" => Some(format!("{} {}", self.method, self.url)),
            _ => None,
        }
    }
}

/// Header set on responses served by the fallback layer.
pub const FALLBACK_HEADER: &str = "x-r4-fallback";

/// A minimal HTTP-like response.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Served by the fallback layer (also visible as `x-r4-fallback: 1`).
    pub fallback: bool,
}

impl HttpResponse {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Self {
        HttpResponse {
            status,
            body: body.into(),
            ..Default::default()
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        header(&self.headers, name)
    }

    /// The wait a 429 asks for: `retry-after-ms` (milliseconds, as some APIs send for
    /// sub-second waits) if present, else `Retry-After` in delta-seconds form. The HTTP-date
    /// form is ignored (treated as absent) rather than guessed at.
    pub fn retry_after(&self) -> Option<Duration> {
        if let Some(ms) = self
            .header("retry-after-ms")
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(ms));
        }
        self.header("retry-after")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    }
}

impl PolicyResponse for HttpResponse {
    fn outcome(&self) -> Outcome {
        match self.status {
            429 => Outcome::Failure(FailureClass::Status429 {
                retry_after: self.retry_after(),
            }),
            500..=599 => Outcome::Failure(FailureClass::Status5xx),
            _ => Outcome::Success,
        }
    }

    fn mark_fallback(&mut self) {
        self.fallback = true;
        if self.header(FALLBACK_HEADER).is_none() {
            self.headers.push((FALLBACK_HEADER.into(), "1".into()));
        }
    }

    fn is_fallback(&self) -> bool {
        self.fallback
    }

    fn from_static(value: &serde_json::Value) -> Option<Self> {
        let body = serde_json::to_vec(value).ok()?;
        let mut r = HttpResponse::new(200, body);
        r.headers
            .push(("content-type".into(), "application/json".into()));
        Some(r)
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_statuses() {
        assert_eq!(HttpResponse::new(200, "").outcome(), Outcome::Success);
        assert_eq!(
            HttpResponse::new(503, "").outcome(),
            Outcome::Failure(FailureClass::Status5xx)
        );
        let mut r = HttpResponse::new(429, "");
        r.headers.push(("Retry-After".into(), "3".into()));
        assert_eq!(
            r.outcome(),
            Outcome::Failure(FailureClass::Status429 {
                retry_after: Some(Duration::from_secs(3))
            })
        );
        r.headers[0].1 = "Wed, 21 Oct 2015 07:28:00 GMT".into();
        assert_eq!(r.retry_after(), None);
        // A sub-second wait comes in milliseconds and wins over the rounded seconds.
        r.headers[0].1 = "1".into();
        r.headers.push(("retry-after-ms".into(), "250".into()));
        assert_eq!(r.retry_after(), Some(Duration::from_millis(250)));
    }

    #[test]
    fn idempotency_and_cache_keys() {
        assert!(HttpRequest::get("/a").idempotent());
        let mut p = HttpRequest::post("/a", vec![]);
        assert!(!p.idempotent());
        assert_eq!(p.cache_key(), None);
        p.headers.push(("Idempotency-Key".into(), "k1".into()));
        assert!(p.idempotent());
        assert_eq!(
            HttpRequest::get("/a").cache_key().as_deref(),
            Some("GET /a")
        );
    }

    #[test]
    fn fallback_marking() {
        let mut r = HttpResponse::from_static(&serde_json::json!({"ok": true})).unwrap();
        r.mark_fallback();
        assert!(r.is_fallback());
        assert_eq!(r.header(FALLBACK_HEADER), Some("1"));
    }
}
