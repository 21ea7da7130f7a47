//! Trace context of the hops a task makes: one `tracing` span per hop, linked into one W3C
//! trace by the `traceparent` strings that stream entries and HTTP headers already carry.
//!
//! Owns the hop spans' names and fields ([`intake_span`], [`publish_span`], [`delivery_span`],
//! [`agent_span`], [`tool_span`], [`commit_span`]), turning a received `traceparent` into the
//! span's parent and the span into the `traceparent` to send on ([`link`]), and the ids a
//! span's log lines carry ([`TraceIds`], [`ids_in_scope`]). It leaves exporting to
//! [`super::otlp`] and writing log lines to [`super::logging`]; the hop sites in the engine
//! only create a span, call [`link`], and run their work inside the span.
//!
//! Two modes, one behaviour for the caller:
//! - export on (the OpenTelemetry layer is installed): the span is a real OpenTelemetry span;
//!   its parent is the received `traceparent` and the `traceparent` sent on names it, so the
//!   spans the collector receives form one trace with correct parent links;
//! - export off: the same ids are made here (the received trace id, a fresh span id), so every
//!   `traceparent` stays well-formed and log lines still carry the task's trace id.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rand::Rng;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Registry;
use tracing_subscriber::registry::LookupSpan;

/// The `tracing` target of every hop span (the OpenTelemetry layer exports only these).
pub const TARGET: &str = "r4::trace";

/// The W3C header (and stream-entry field) carrying the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// A span's place in a trace: what a `traceparent` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    /// 128-bit trace id, never zero.
    pub trace_id: u128,
    /// 64-bit span id, never zero.
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceIds {
    /// Parse a version-00 `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`); `None` for anything
    /// malformed or with an all-zero id (invalid by W3C).
    pub fn parse(traceparent: &str) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !(hex(version, 2) && version != "ff" && hex(trace, 32) && hex(span, 16) && hex(flags, 2))
        {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(Self {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// A new span of `parent`'s trace (a new trace without one), with a fresh span id.
    pub fn child_of(parent: Option<Self>) -> Self {
        let mut rng = rand::rng();
        let span_id = rng.random::<u64>().max(1);
        match parent {
            Some(p) => Self { span_id, ..p },
            None => Self {
                trace_id: rng.random::<u128>().max(1),
                span_id,
                sampled: true,
            },
        }
    }

    /// The `traceparent` naming this span.
    pub fn traceparent(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }

    /// The trace id as 32 lower-case hex digits (the form collectors and log pipelines use).
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lower-case hex digits.
    pub fn span_hex(&self) -> String {
        format!("{:016x}", self.span_id)
    }

    fn from_otel(sc: &SpanContext) -> Option<Self> {
        sc.is_valid().then(|| Self {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            sampled: sc.is_sampled(),
        })
    }

    fn to_otel(self) -> SpanContext {
        SpanContext::new(
            TraceId::from_bytes(self.trace_id.to_be_bytes()),
            SpanId::from_bytes(self.span_id.to_be_bytes()),
            if self.sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            true,
            TraceState::NONE,
        )
    }
}

/// Make `span` a hop of the trace `parent` names (a received `traceparent`; `None` or a
/// malformed one: the span's parent in this process, else a new trace), record its
/// `trace_id`/`span_id` fields, and return the `traceparent` to send on — the span's own
/// context when exporting, ids made here otherwise. Always well-formed, whatever `parent` is
/// and even for a disabled span.
pub fn link(span: &Span, parent: Option<&str>) -> String {
    let parent = parent.and_then(TraceIds::parse);
    if let Some(p) = parent {
        // Only the OpenTelemetry layer acts on this; without it, a no-op.
        let cx = opentelemetry::Context::new().with_remote_span_context(p.to_otel());
        let _ = span.set_parent(cx);
    }
    let ids = TraceIds::from_otel(span.context().span().span_context())
        .unwrap_or_else(|| TraceIds::child_of(parent.or_else(|| in_process_parent(span))));
    span.record("trace_id", tracing::field::display(ids.trace_hex()));
    span.record("span_id", tracing::field::display(ids.span_hex()));
    store(span, ids);
    ids.traceparent()
}

/// The `traceparent` of the innermost linked span the current code runs in (`fallback`'s
/// child when there is none, e.g. without a subscriber): for an entry written inside a hop.
pub fn current_traceparent(fallback: Option<&str>) -> String {
    let here = Span::current();
    match ids_of(&here) {
        Some(ids) => ids.traceparent(),
        None => TraceIds::child_of(fallback.and_then(TraceIds::parse)).traceparent(),
    }
}

/// The ids of `span` or of its nearest linked ancestor.
pub fn ids_of(span: &Span) -> Option<TraceIds> {
    let mut found = None;
    span.with_subscriber(|(id, dispatch)| {
        if let Some(reg) = dispatch.downcast_ref::<Registry>()
            && let Some(s) = reg.span(id)
        {
            found = ids_in_scope(s.scope());
        }
    });
    found
}

/// The ids of the first linked span of `scope` (leaf first): what a log line inside it carries.
pub fn ids_in_scope<'a, R: LookupSpan<'a>>(
    scope: tracing_subscriber::registry::Scope<'a, R>,
) -> Option<TraceIds> {
    scope
        .into_iter()
        .find_map(|s| s.extensions().get::<TraceIds>().copied())
}

/// The ids of the span's in-process parent (export off: the trace a child span joins).
fn in_process_parent(span: &Span) -> Option<TraceIds> {
    let mut found = None;
    span.with_subscriber(|(id, dispatch)| {
        if let Some(reg) = dispatch.downcast_ref::<Registry>()
            && let Some(s) = reg.span(id)
            && let Some(p) = s.parent()
        {
            found = ids_in_scope(p.scope());
        }
    });
    found
}

/// Keep the span's ids where the log formatter finds them.
fn store(span: &Span, ids: TraceIds) {
    span.with_subscriber(|(id, dispatch)| {
        if let Some(reg) = dispatch.downcast_ref::<Registry>()
            && let Some(s) = reg.span(id)
        {
            s.extensions_mut().replace(ids);
        }
    });
}

/// Prefix `json` (one JSON object, as the JSON formatter writes it) with the `trace_id` and
/// `span_id` fields of `ids`.
pub(crate) fn splice_ids(
    json: &str,
    ids: TraceIds,
    out: &mut impl std::fmt::Write,
) -> std::fmt::Result {
    match json.strip_prefix('{') {
        Some(rest) => {
            write!(
                out,
                "{{\"trace_id\":\"{:032x}\",\"span_id\":\"{:016x}\"",
                ids.trace_id, ids.span_id
            )?;
            if !rest.trim_start().starts_with('}') {
                out.write_char(',')?;
            }
            out.write_str(rest)
        }
        None => out.write_str(json),
    }
}

// The hop spans. Every one declares `trace_id` and `span_id` (filled by `link`) and the
// OpenTelemetry span kind; their names are the span names a collector shows.

/// `r4.intake`: one `POST /v1/tasks` (or `:batch`) of the intake API (server).
pub fn intake_span(route: &'static str) -> Span {
    tracing::info_span!(target: TARGET, "r4.intake", otel.kind = "server", http.route = route,
        trace_id = Empty, span_id = Empty, r4.tasks = Empty)
}

/// `r4.publish`: writing task entries to `stream` (producer); the entries carry its context.
pub fn publish_span(stream: &str) -> Span {
    tracing::info_span!(target: TARGET, "r4.publish", otel.kind = "producer",
        messaging.destination.name = stream, trace_id = Empty, span_id = Empty)
}

/// `r4.deliver`: the engine delivering one step of a task to its agent, every attempt and the
/// completion included (consumer); its parent is the entry's `traceparent`.
pub fn delivery_span(task_id: &str, step: &str, kind: &'static str, delivery: u64) -> Span {
    tracing::info_span!(target: TARGET, "r4.deliver", otel.kind = "consumer",
        r4.task_id = task_id, r4.step = step, r4.kind = kind, r4.delivery = delivery,
        trace_id = Empty, span_id = Empty)
}

/// `r4.agent`: one HTTP request to the agent container (client); the agent receives its
/// context as `traceparent`.
pub fn agent_span(task_id: &str, step: &str, attempt: u64) -> Span {
    tracing::info_span!(target: TARGET, "r4.agent", otel.kind = "client",
        r4.task_id = task_id, r4.step = step, r4.attempt = attempt,
        http.response.status_code = Empty, otel.status_code = Empty,
        trace_id = Empty, span_id = Empty)
}

/// `r4.tool`: one tool call through the tool proxy, every attempt and hedge of the policy
/// stack included (client); the tool receives its context as `traceparent`.
pub fn tool_span(tool: &str) -> Span {
    tracing::info_span!(target: TARGET, "r4.tool", otel.kind = "client", r4.tool = tool,
        http.response.status_code = Empty, r4.degraded = Empty, otel.status_code = Empty,
        trace_id = Empty, span_id = Empty)
}

/// `r4.commit`: the atomic step that acks an entry and publishes its outputs.
pub fn commit_span() -> Span {
    tracing::info_span!(target: TARGET, "r4.commit", otel.kind = "internal",
        r4.outcome = Empty, trace_id = Empty, span_id = Empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn traceparent_round_trip() {
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let ids = TraceIds::parse(tp).unwrap();
        assert_eq!(ids.traceparent(), tp);
        assert!(ids.sampled);
        assert!(
            !TraceIds::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
                .unwrap()
                .sampled
        );
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319z-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-xx",
        ] {
            assert_eq!(TraceIds::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn without_a_subscriber_link_keeps_the_trace_and_stays_well_formed() {
        let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let out = link(&Span::none(), Some(parent));
        let ids = TraceIds::parse(&out).unwrap();
        assert_eq!(ids.trace_hex(), "0af7651916cd43dd8448eb211c80319c");
        assert_ne!(ids.span_hex(), "b7ad6b7169203331");
        let fresh = TraceIds::parse(&link(&Span::none(), Some("garbage"))).unwrap();
        assert_ne!(fresh.trace_id, ids.trace_id);
        assert!(TraceIds::parse(&current_traceparent(None)).is_some());
    }

    #[test]
    fn export_off_children_join_their_parents_trace() {
        let sub = tracing_subscriber::registry()
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink));
        tracing::subscriber::with_default(sub, || {
            let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
            let deliver = delivery_span("t", "s", "task", 1);
            let tp = link(&deliver, Some(parent));
            let ids = TraceIds::parse(&tp).unwrap();
            assert_eq!(ids.trace_hex(), "0af7651916cd43dd8448eb211c80319c");
            assert!(!ids.sampled, "the parent's sampling decision is kept");
            assert_eq!(ids_of(&deliver), Some(ids));
            // A span linked without a received context joins its in-process parent's trace.
            let commit = deliver.in_scope(commit_span);
            let c = TraceIds::parse(&link(&commit, None)).unwrap();
            assert_eq!(c.trace_id, ids.trace_id);
            assert_ne!(c.span_id, ids.span_id);
            assert_eq!(
                commit.in_scope(|| current_traceparent(None)),
                c.traceparent()
            );
        });
    }

    #[test]
    fn splice_puts_the_ids_first() {
        let ids =
            TraceIds::parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        let mut s = String::new();
        splice_ids("{\"a\":1}\n", ids, &mut s).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["trace_id"], "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(v["span_id"], "b7ad6b7169203331");
        assert_eq!(v["a"], 1);
        let mut e = String::new();
        splice_ids("{}", ids, &mut e).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&e).is_ok(), "{e}");
    }
}
