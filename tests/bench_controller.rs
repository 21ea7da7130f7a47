//! The two controller benchmarks through the real binary, at a small size: `r4 bench
//! controller` (the controller against `r4 dev` run as a child process) and `r4 bench
//! killswitch --via-api` (patches through the API to engines in process). They check the JSON
//! keys scripts read and that the figures are consistent with what was asked — not timings,
//! which depend on the machine.

use std::process::Command;

use serde_json::Value;

fn r4(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_r4"))
        .args(args)
        .output()
        .expect("run r4");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn last_json(stdout: &str) -> Value {
    let line = stdout.lines().last().expect("a last line");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn the_controller_bench_reconciles_every_workflow_and_counts_its_writes() {
    let (ok, out, err) = r4(&["bench", "controller", "--workflows", "20", "--json"]);
    assert!(ok, "r4 bench controller failed: {err}\n{out}");
    let v = last_json(&out);
    assert_eq!(v["workflows"], 20);
    let secs = f(&v, "reconcile_seconds");
    assert!(secs > 0.0 && secs < 120.0, "{v}");
    let peak = f(&v, "peak_rss_mb");
    let before = f(&v, "rss_mb_before_workflows");
    assert!(peak >= before && before > 0.0, "{v}");
    // Every workflow made at least its ControllerRevision, its status and its Deployments.
    let writes = f(&v, "writes_per_workflow");
    let status = f(&v, "status_writes_per_workflow");
    assert!(status >= 1.0, "{v}");
    assert!(writes >= status + 3.0, "{v}");
    // The controller's own count, read from its /metrics: at least one reconcile each.
    assert!(f(&v, "reconciles_per_workflow") >= 1.0, "{v}");
    let w = &v["writes"];
    assert_eq!(
        w["create apps/controllerrevisions"], 20,
        "one revision each: {v}"
    );
    assert!(
        w["patch apps/deployments"].as_u64().unwrap_or(0) >= 40,
        "two Deployments each: {v}"
    );
    let listed: u64 = w
        .as_object()
        .expect("writes")
        .values()
        .filter_map(Value::as_u64)
        .sum();
    assert_eq!(
        (listed as f64 / 20.0 * 100.0).round() / 100.0,
        writes,
        "writes_per_workflow is the breakdown's sum: {v}"
    );
}

#[test]
fn the_controller_bench_refuses_zero_workflows_in_one_line() {
    let (ok, _, err) = r4(&["bench", "controller", "--workflows", "0"]);
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("--workflows"), "{err}");
}

#[test]
fn the_killswitch_bench_via_the_api_sees_every_engine_stop_and_resume() {
    let (ok, out, err) = r4(&[
        "bench",
        "killswitch",
        "--via-api",
        "--engines",
        "6",
        "--rounds",
        "2",
        "--json",
    ]);
    assert!(ok, "r4 bench killswitch --via-api failed: {err}\n{out}");
    let v = last_json(&out);
    assert_eq!(v["engines"], 6);
    assert_eq!(v["rounds"], 2);
    assert_eq!(v["via"], "api");
    let (p50, p99, max) = (f(&v, "p50_ms"), f(&v, "p99_ms"), f(&v, "max_ms"));
    assert!(p50 <= p99 && p99 <= max, "{v}");
    // One sample per engine and round, each way; the slowest engine of a round is the max.
    assert_eq!(v["release"]["per_engine"]["samples"], 12, "{v}");
    let rounds = v["engage"]["every_engine_ms"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 2, "{v}");
    let slowest = rounds.iter().filter_map(Value::as_f64).fold(0.0, f64::max);
    assert_eq!(slowest, max, "{v}");
    // The controller wrote the state before the engines applied it.
    assert!(
        f(&v["controller_ms"], "max_ms") <= max.max(f(&v["release"]["per_engine"], "max_ms")),
        "{v}"
    );
    assert_eq!(v["controller_ms"]["samples"], 4, "{v}");
}
