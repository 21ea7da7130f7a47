//! OTLP export of the hop spans ([`super::trace`]), opt-in by the standard `OTEL_*` variables.
//!
//! Owns reading those variables ([`Config::from_env`]), building the exporter (OTLP over
//! HTTP/protobuf, reqwest with rustls, a batch processor on its own thread) and flushing it at
//! exit ([`shutdown`]). The layer that feeds it is installed by [`super::logging`].
//!
//! Nothing is exported unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as it is) or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (`/v1/traces` appended) is set. Also read:
//! `OTEL_SDK_DISABLED=true` and `OTEL_TRACES_EXPORTER=none` (export off),
//! `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL` (only `http/protobuf`), `OTEL_SERVICE_NAME` (default:
//! the command's, e.g. `r4-engine`), `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (checked
//! here, applied by the SDK); the SDK itself also reads `OTEL_EXPORTER_OTLP[_TRACES]_HEADERS`,
//! `_TIMEOUT` (the deadline of one export, 10 s by default), `OTEL_RESOURCE_ATTRIBUTES` and
//! `OTEL_BSP_*`. A malformed value is one line on standard error naming the variable, and
//! export stays off: a typo never stops the process, and never half-configures it.

use std::sync::Mutex;
use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};

/// What to export where.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The full URL spans are POSTed to (`…/v1/traces`).
    pub endpoint: String,
    /// `service.name` of the resource.
    pub service_name: String,
    /// Longest a finished span waits in the batch (`None`: `OTEL_BSP_SCHEDULE_DELAY`, else 5 s).
    pub schedule_delay: Option<Duration>,
}

const SAMPLERS: [&str; 6] = [
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
];

impl Config {
    /// Read the `OTEL_*` variables of the process (see the module doc): `Ok(None)` when export
    /// is off, `Err` (one line naming the variable) when a value is malformed.
    pub fn from_env(default_service: &str) -> Result<Option<Self>, String> {
        Self::from_vars(|k| std::env::var(k).ok(), default_service)
    }

    /// [`Self::from_env`] over any source of variables.
    pub fn from_vars(
        get: impl Fn(&str) -> Option<String>,
        default_service: &str,
    ) -> Result<Option<Self>, String> {
        let var = |k: &str| {
            get(k)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        match var("OTEL_SDK_DISABLED").map(|v| v.to_ascii_lowercase()) {
            None => {}
            Some(v) if v == "false" => {}
            Some(v) if v == "true" => return Ok(None),
            Some(v) => {
                return Err(format!("OTEL_SDK_DISABLED={v:?} (expected true or false)"));
            }
        }
        match var("OTEL_TRACES_EXPORTER").map(|v| v.to_ascii_lowercase()) {
            None => {}
            Some(v) if v == "otlp" => {}
            Some(v) if v == "none" => return Ok(None),
            Some(v) => {
                return Err(format!(
                    "OTEL_TRACES_EXPORTER={v:?} (expected otlp or none)"
                ));
            }
        }
        let (name, endpoint) = match (
            var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            var("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(e), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", e),
            (None, Some(base)) => (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{}/v1/traces", base.trim_end_matches('/')),
            ),
            (None, None) => return Ok(None),
        };
        match reqwest::Url::parse(&endpoint) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
            _ => {
                return Err(format!(
                    "{name}: not an http(s) URL with a host: {}",
                    crate::telemetry::redact::redact_url(&endpoint)
                ));
            }
        }
        for k in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(p) = var(k)
                && p != "http/protobuf"
            {
                return Err(format!("{k}={p:?} (only http/protobuf is supported)"));
            }
        }
        if let Some(s) = var("OTEL_TRACES_SAMPLER") {
            if !SAMPLERS.contains(&s.as_str()) {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER={s:?} (expected one of {})",
                    SAMPLERS.join(", ")
                ));
            }
            if s.ends_with("traceidratio")
                && let Some(a) = var("OTEL_TRACES_SAMPLER_ARG")
                && !a.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r))
            {
                return Err(format!(
                    "OTEL_TRACES_SAMPLER_ARG={a:?} (expected a ratio between 0 and 1)"
                ));
            }
        }
        Ok(Some(Self {
            endpoint,
            service_name: var("OTEL_SERVICE_NAME").unwrap_or_else(|| default_service.to_owned()),
            schedule_delay: None,
        }))
    }
}

/// The provider of the process, kept for [`shutdown`].
static PROVIDER: Mutex<Option<SdkTracerProvider>> = Mutex::new(None);

/// Build the exporter and its provider, remember it for [`shutdown`], and return the tracer
/// the layer writes to. Building opens no connection: an unreachable collector only costs
/// failed exports (logged by nobody; the spans are dropped), never the process.
pub fn tracer(cfg: &Config) -> Result<opentelemetry_sdk::trace::Tracer, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(cfg.endpoint.clone())
        .build()
        .map_err(|e| format!("OTLP exporter: {e}"))?;
    let mut batch = BatchConfigBuilder::default();
    if let Some(d) = cfg.schedule_delay {
        batch = batch.with_scheduled_delay(d);
    }
    let processor = BatchSpanProcessor::builder(exporter)
        .with_batch_config(batch.build())
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(
            Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build(),
        )
        .build();
    let tracer = provider.tracer("r4");
    if let Ok(mut slot) = PROVIDER.lock()
        && let Some(old) = slot.replace(provider)
    {
        let _ = old.shutdown();
    }
    Ok(tracer)
}

/// Export every finished span now (blocking; bounded by the exporter's timeout).
pub fn flush() {
    let provider = PROVIDER.lock().ok().and_then(|p| p.clone());
    if let Some(p) = provider {
        let _ = p.force_flush();
    }
}

/// Flush and stop the exporter: call once when the process ends (after its runtime has
/// stopped; blocking). A no-op when export is off.
pub fn shutdown() {
    let provider = PROVIDER.lock().ok().and_then(|mut p| p.take());
    if let Some(p) = provider {
        let _ = p.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Option<Config>, String> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_vars(|k| m.get(k).cloned(), "r4-engine")
    }

    #[test]
    fn off_unless_an_endpoint_is_set() {
        assert_eq!(cfg(&[]), Ok(None));
        assert_eq!(cfg(&[("OTEL_SERVICE_NAME", "x")]), Ok(None));
        assert_eq!(cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")]), Ok(None));
        let on = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")])
            .unwrap()
            .unwrap();
        assert_eq!(on.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(on.service_name, "r4-engine");
        let own = cfg(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://b/x"),
            ("OTEL_SERVICE_NAME", "mine"),
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(own.endpoint, "https://b/x");
        assert_eq!(own.service_name, "mine");
    }

    #[test]
    fn disabled_wins() {
        let e = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318");
        assert_eq!(cfg(&[e, ("OTEL_SDK_DISABLED", "TRUE")]), Ok(None));
        assert_eq!(cfg(&[e, ("OTEL_TRACES_EXPORTER", "none")]), Ok(None));
        assert!(cfg(&[e, ("OTEL_SDK_DISABLED", "false")]).unwrap().is_some());
    }

    #[test]
    fn a_malformed_value_names_its_variable() {
        let e = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318");
        for (vars, name) in [
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "ftp://x")],
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ),
            (vec![e, ("OTEL_SDK_DISABLED", "yes")], "OTEL_SDK_DISABLED"),
            (
                vec![e, ("OTEL_TRACES_EXPORTER", "jaeger")],
                "OTEL_TRACES_EXPORTER",
            ),
            (
                vec![e, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                vec![e, ("OTEL_TRACES_SAMPLER", "sometimes")],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                vec![
                    e,
                    ("OTEL_TRACES_SAMPLER", "traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
        ] {
            let err = cfg(&vars).unwrap_err();
            assert!(err.starts_with(name), "{err}");
            assert!(!err.contains('\n'), "{err}");
        }
    }

    #[test]
    fn an_endpoint_error_shows_no_credentials() {
        let err = cfg(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://user:s3cret@host/")]).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }
}
