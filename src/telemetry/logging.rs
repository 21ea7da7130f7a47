//! The process's log output: one `tracing` subscriber writing to standard error.
//!
//! - Filter: `RUST_LOG` (the `tracing-subscriber` `EnvFilter` syntax, e.g. `r4=debug`), else the
//!   default the command chose — long-running processes (`r4 engine`) log `info`, one-shot
//!   commands and simulations (`r4 validate`, `r4 run`, …) only `error`, so their own output
//!   stays what it is.
//! - Format: plain text, or one JSON object per line with `R4_LOG_FORMAT=json`. In JSON the
//!   event's fields sit at the top level next to `timestamp`, `level`, `target` and `message`,
//!   so the consumer's `{"message":"dead-lettered","task":…,"step":…,"reason":…}` is one
//!   line a log pipeline can index.
//!
//! - Trace ids: a JSON line logged inside a hop span ([`super::trace`]) starts with the
//!   span's `"trace_id"` and `"span_id"` — export on or off — so a log pipeline can jump from
//!   a line to its trace.
//!
//! Standard output is never written: it belongs to the command's result (`r4 crds`,
//! `r4 run --json`).

use std::io::IsTerminal;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

/// Environment variable choosing the format (`json` or `text`).
pub const FORMAT_ENV: &str = "R4_LOG_FORMAT";

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lines (colours on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

impl Format {
    /// Parse the value of [`FORMAT_ENV`]; `None` for anything but `json`/`text` (any case).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "text" | "" => Some(Format::Text),
            _ => None,
        }
    }
}

/// Install the subscriber: `RUST_LOG` or `default_filter`, the format from `R4_LOG_FORMAT`,
/// written to standard error, and — when the `OTEL_*` variables ask for it
/// ([`super::otlp::Config::from_env`]) — the OpenTelemetry layer exporting the hop spans as
/// service `r4`. Idempotent: when a subscriber is already installed (a second call, a test
/// harness) it is kept and this returns `false`. A bad `RUST_LOG`, `R4_LOG_FORMAT` or `OTEL_*`
/// value is reported in one line on standard error and the default is used (for `OTEL_*`:
/// export off) — a process must never end up blind, or stop, because of a typo.
pub fn init(default_filter: &str) -> bool {
    init_as(default_filter, "r4")
}

/// [`init`] with the `service.name` spans are exported under unless `OTEL_SERVICE_NAME` says
/// otherwise (`r4-engine`, `r4-controller`, …).
pub fn init_as(default_filter: &str, service: &str) -> bool {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => match EnvFilter::try_new(&spec) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("r4: ignoring RUST_LOG={spec:?} ({e}); logging at {default_filter:?}");
                EnvFilter::new(default_filter)
            }
        },
        _ => EnvFilter::new(default_filter),
    };
    let format = match std::env::var(FORMAT_ENV) {
        Ok(v) => Format::parse(&v).unwrap_or_else(|| {
            eprintln!("r4: ignoring {FORMAT_ENV}={v:?} (expected json or text); logging as text");
            Format::Text
        }),
        Err(_) => Format::Text,
    };
    let otlp = match super::otlp::Config::from_env(service) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("r4: ignoring {e}; trace export off");
            None
        }
    };
    let tracer = otlp.as_ref().and_then(|c| match super::otlp::tracer(c) {
        Ok(t) => Some(t),
        Err(e) => {
            eprintln!("r4: {e}; trace export off");
            None
        }
    });
    // `try_init` also turns the `log` records of dependencies into events.
    subscriber(
        filter,
        format,
        tracer,
        BoxMakeWriter::new(std::io::stderr),
        std::io::stderr().is_terminal(),
    )
    .try_init()
    .is_ok()
}

/// The subscriber of the process: the log layer (filtered by `filter`, written to `writer`)
/// and, with a `tracer`, the OpenTelemetry layer exporting the hop spans (target
/// [`super::trace::TARGET`] only, whatever the log filter says: `RUST_LOG=warn` must not cut
/// the traces). Public for tests that need the process's exact output in a buffer.
pub fn subscriber(
    filter: EnvFilter,
    format: Format,
    tracer: Option<opentelemetry_sdk::trace::Tracer>,
    writer: BoxMakeWriter,
    ansi: bool,
) -> impl tracing::Subscriber + Send + Sync {
    let log: Box<dyn Layer<Registry> + Send + Sync> = match format {
        Format::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .map_event_format(WithTraceIds)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
        Format::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(writer)
            .with_filter(filter)
            .boxed(),
    };
    let mut layers = vec![log];
    if let Some(t) = tracer {
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(t)
                .with_tracked_inactivity(false)
                .with_filter(Targets::new().with_target(super::trace::TARGET, tracing::Level::INFO))
                .boxed(),
        );
    }
    Registry::default().with(layers)
}

/// The JSON format with the `trace_id` and `span_id` of the event's span (see
/// [`super::trace::ids_in_scope`]) as the line's first fields, when it runs in a linked span.
struct WithTraceIds<F>(F);

impl<S, N, F> FormatEvent<S, N> for WithTraceIds<F>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let Some(ids) = ctx.event_scope().and_then(super::trace::ids_in_scope) else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        super::trace::splice_ids(&line, ids, &mut writer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_names() {
        assert_eq!(Format::parse("json"), Some(Format::Json));
        assert_eq!(Format::parse(" JSON "), Some(Format::Json));
        assert_eq!(Format::parse("text"), Some(Format::Text));
        assert_eq!(Format::parse(""), Some(Format::Text));
        assert_eq!(Format::parse("xml"), None);
    }

    /// A writer into a shared buffer.
    #[derive(Clone, Default)]
    struct Buf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(buf: &Buf) -> Vec<serde_json::Value> {
        String::from_utf8(buf.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    #[test]
    fn json_lines_in_a_hop_carry_its_trace_ids_without_export() {
        use crate::telemetry::trace;
        let buf = Buf::default();
        let w = buf.clone();
        let sub = subscriber(
            EnvFilter::new("info"),
            Format::Json,
            None,
            BoxMakeWriter::new(move || w.clone()),
            false,
        );
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let (deliver_tp, commit_tp) = tracing::subscriber::with_default(sub, || {
            tracing::info!(task = "t0", "outside any hop");
            let deliver = trace::delivery_span("t1", "a", "task", 1);
            let tp = trace::link(&deliver, Some(parent));
            deliver.in_scope(|| tracing::info!(task = "t1", "in the delivery"));
            let commit = deliver.in_scope(trace::commit_span);
            let ctp = trace::link(&commit, None);
            commit.in_scope(|| {
                // An inner span of no hop: the line carries the nearest hop's ids.
                tracing::info_span!("inner").in_scope(|| tracing::warn!("in the commit"));
            });
            (tp, ctp)
        });
        let deliver = trace::TraceIds::parse(&deliver_tp).unwrap();
        let commit = trace::TraceIds::parse(&commit_tp).unwrap();
        let got = lines(&buf);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got[0].get("trace_id").is_none(), "{}", got[0]);
        assert_eq!(got[1]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(got[1]["span_id"], deliver.span_hex());
        assert_eq!(got[1]["task"], "t1", "the event's own fields stay");
        assert_eq!(got[1]["message"], "in the delivery");
        assert_eq!(got[2]["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(got[2]["span_id"], commit.span_hex());
    }

    #[test]
    fn text_lines_show_the_ids_as_span_fields() {
        use crate::telemetry::trace;
        let buf = Buf::default();
        let w = buf.clone();
        let sub = subscriber(
            EnvFilter::new("info"),
            Format::Text,
            None,
            BoxMakeWriter::new(move || w.clone()),
            false,
        );
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        tracing::subscriber::with_default(sub, || {
            let s = trace::tool_span("bank");
            trace::link(&s, Some(parent));
            s.in_scope(|| tracing::info!("called"));
        });
        let out = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert!(
            out.contains("trace_id=0af7651916cd43dd8448eb211c80319c"),
            "{out}"
        );
    }

    #[test]
    fn a_second_init_keeps_the_first() {
        // The first call installs (quietly: "off" unless RUST_LOG says otherwise, this is
        // the whole test binary's subscriber); the second must keep it and not panic.
        let _ = init("off");
        assert!(!init("info"));
    }
}
