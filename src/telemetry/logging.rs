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
//! Standard output is never written: it belongs to the command's result (`r4 crds`,
//! `r4 run --json`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

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
/// written to standard error. Idempotent: when a subscriber is already installed (a second
/// call, a test harness) it is kept and this returns `false`. A bad `RUST_LOG` or
/// `R4_LOG_FORMAT` is reported in one line on standard error and the default is used — a
/// process must never end up blind because of a typo.
pub fn init(default_filter: &str) -> bool {
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        Format::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        Format::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
    installed.is_ok()
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

    #[test]
    fn a_second_init_keeps_the_first() {
        // The first call installs (quietly: "off" unless RUST_LOG says otherwise, this is
        // the whole test binary's subscriber); the second must keep it and not panic.
        let _ = init("off");
        assert!(!init("info"));
    }
}
