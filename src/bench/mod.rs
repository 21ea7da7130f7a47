//! `r4 bench`: each benchmark runs r4 against its peer in the same run and returns JSON.

pub mod agent_hedge;
pub mod breaker;
pub mod controller;
pub mod devcluster;
pub mod drill;
pub mod hedge;
pub mod killswitch;
pub mod killswitch_api;
pub mod pipeline;

use crate::api::validate::{Manifest, RefMode, validate_texts};

/// Resident set size now and at its peak, in bytes (Linux `/proc/self/status`; 0 elsewhere).
pub fn rss() -> (u64, u64) {
    rss_at("/proc/self/status")
}

/// [`rss`] of the process `pid` (a child's: `/proc/<pid>/status`).
pub fn rss_of(pid: u32) -> (u64, u64) {
    rss_at(&format!("/proc/{pid}/status"))
}

fn rss_at(path: &str) -> (u64, u64) {
    let Ok(s) = std::fs::read_to_string(path) else {
        return (0, 0);
    };
    let kb = |name: &str| {
        s.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("VmRSS:"), kb("VmHWM:"))
}

/// Bytes as MiB with one decimal.
pub(crate) fn mib(b: u64) -> f64 {
    (b as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

/// The worked example (workflow and its two policies), built in so a bench runs from anywhere.
const WORKED_EXAMPLE: [(&str, &str); 3] = [
    (
        "config/samples/payment-disputes.yaml",
        include_str!("../../config/samples/payment-disputes.yaml"),
    ),
    (
        "config/samples/default-policy.yaml",
        include_str!("../../config/samples/default-policy.yaml"),
    ),
    (
        "config/samples/bank-policy.yaml",
        include_str!("../../config/samples/bank-policy.yaml"),
    ),
];

/// The built-in worked example's manifests, validated with every reference resolved (the
/// drill and agent-hedge benches run it).
pub(crate) fn worked_example_manifests() -> Result<Vec<Manifest>, String> {
    let texts: Vec<(String, String)> = WORKED_EXAMPLE
        .iter()
        .map(|(s, t)| (s.to_string(), t.to_string()))
        .collect();
    let report = validate_texts(&texts, RefMode::Require);
    if let Some(e) = report.errors.first() {
        return Err(e.clone());
    }
    Ok(report.manifests.into_iter().map(|(_, m)| m).collect())
}
