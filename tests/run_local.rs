//! `r4 run` as a user runs it: the real binary, the worked example, the embedded queue and a
//! real redis-server; the figures come from its `--json` line.

use std::process::Command;

use serde_json::Value;

fn r4() -> Command {
    Command::new(env!("CARGO_BIN_EXE_r4"))
}

fn sample(name: &str) -> String {
    format!("{}/config/samples/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Run `r4 run ARGS --json`; the report is the last line of standard output.
fn run_json(args: &[&str]) -> Value {
    let (ok, v, stderr) = run_json_status(args);
    assert!(ok, "r4 run {args:?} failed: {stderr}\n{v}");
    v
}

/// Run `r4 run ARGS --json`: (exit status 0?, the report, standard error).
fn run_json_status(args: &[&str]) -> (bool, Value, String) {
    let out = r4()
        .arg("run")
        .args(args)
        .arg("--json")
        .output()
        .expect("run r4");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let last = stdout.lines().last().unwrap_or_default();
    let v = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("last line is not JSON ({e}): {last}\n{stderr}"));
    (out.status.success(), v, stderr)
}

/// Standard error without the lines saying where policies were taken from.
fn complaint(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| !l.contains("taken from"))
        .collect()
}

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn assert_accounted(v: &Value) {
    let submitted = n(v, "submitted");
    assert_eq!(
        n(v, "completed") + n(v, "dead_lettered") + n(v, "routed"),
        submitted,
        "{v}"
    );
    assert_eq!(n(v, "lost"), 0, "{v}");
    assert_eq!(n(v, "duplicate_effects"), 0, "{v}");
}

#[test]
fn the_worked_example_accounts_for_every_task() {
    // 5,000 tasks are 150 s of the sample's traffic; the README's 20,000-task runs are
    // checked by `make check-readme` (scripts/worked-example.sh).
    let v = run_json(&["-f", &sample("payment-disputes.yaml"), "--tasks", "5000"]);
    assert_eq!(n(&v, "submitted"), 5000);
    assert_accounted(&v);
    assert_eq!(
        n(&v, "effects"),
        5000,
        "one ledger effect per resolved dispute: {v}"
    );
    for k in ["p50", "p95", "p99", "p999"] {
        assert!(
            v["latency_ms"][k].as_f64().is_some_and(|x| x > 0.0),
            "{k}: {v}"
        );
    }
    for k in ["success_rate", "p95_latency_ms", "error_budget_remaining"] {
        assert!(v["slo"][k].is_number(), "slo.{k}: {v}");
    }
    assert!(v["incident_cost"]["daily_cost"].is_number());
    assert!(v["tasks_per_sec"].as_f64().is_some_and(|x| x > 0.0));
}

/// The default load is the workflow's own traffic (`economics.tasksPerMinute: 2000`), and
/// the report says so; per-tool and per-agent figures add up to the totals.
#[test]
fn the_report_says_the_load_and_breaks_figures_down_per_tool_and_agent() {
    let v = run_json(&["-f", &sample("payment-disputes.yaml"), "--tasks", "1000"]);
    assert_eq!(v["load"]["model"], "open", "{v}");
    let rate = v["load"]["tasks_per_sec"].as_f64().unwrap();
    assert!((rate - 2000.0 / 60.0).abs() < 1e-9, "{v}");
    assert_eq!(v["load"]["source"], "economics.tasksPerMinute 2000");
    // 1,000 tasks at 33.3/s take 30 s of virtual time: the traffic was not a closed loop.
    assert!(v["elapsed_seconds"].as_f64().unwrap() >= 29.0, "{v}");
    let tools = v["tools"].as_object().unwrap();
    assert_eq!(tools.keys().collect::<Vec<_>>(), ["bank-api", "ledger"]);
    let sum = |k: &str| tools.values().map(|t| t[k].as_u64().unwrap()).sum::<u64>();
    assert_eq!(
        sum("retries"),
        n(&v, "retries"),
        "retries are tool retries: {v}"
    );
    assert_eq!(sum("hedges"), n(&v, "hedges"));
    assert_eq!(sum("fallbacks"), n(&v, "fallbacks"));
    let bank = &tools["bank-api"];
    // One statement query per task, and one per shadow delivery of the hedged investigation
    // agent that got as far as its call before it was cancelled.
    let shadows = n(
        &v["agents"]["investigation"]["hedging"],
        "shadow_deliveries",
    );
    assert!(
        (1000..=1000 + shadows).contains(&n(bank, "calls")),
        "one statement query per task: {bank}"
    );
    // The bank received each call, each hedge and each retry (and the requests of attempts
    // the agent gave up on before the call ended, or that an agent hedge cancelled: one per
    // hedge at most).
    let sent = n(bank, "calls") + n(bank, "hedges") + n(bank, "retries");
    let redelivered = n(&v["agents"]["investigation"], "redeliveries");
    let cancelled = n(&v["agents"]["investigation"]["hedging"], "hedges");
    assert!(
        (sent..=sent + redelivered + cancelled).contains(&n(bank, "requests")),
        "{bank}"
    );
    for k in ["throttle", "bulkhead", "budget"] {
        assert!(bank["rejected"][k].is_u64(), "{bank}");
    }
    assert!(bank["breaker_open_seconds"].is_number());
    let agents = v["agents"].as_object().unwrap();
    assert_eq!(
        agents.keys().collect::<Vec<_>>(),
        ["intake", "investigation", "resolution"]
    );
    let redeliveries: u64 = agents.values().map(|a| n(a, "redeliveries")).sum();
    assert_eq!(redeliveries, n(&v, "redeliveries"));
    for (name, a) in agents {
        assert_eq!(n(a, "completed"), 1000, "{name}: {a}");
        // A step a shadow won had its primary delivery cancelled (not answered); a race
        // both answered counts both.
        let (wins, shadows) = match a.get("hedging") {
            Some(h) => (n(h, "shadow_wins"), n(h, "shadow_deliveries")),
            None => (0, 0),
        };
        let answered = n(a, "deliveries") + wins;
        let due = 1000 + n(a, "redeliveries");
        assert!((due..=due + shadows).contains(&answered), "{name}: {a}");
    }
    let timeline = v["timeline"].as_array().unwrap();
    assert_eq!(timeline.len(), 10);
    for s in timeline {
        assert_eq!(s["breakers"]["bank-api"], "closed", "{s}");
        assert!(s["tasks_per_sec"].as_f64().unwrap() > 20.0, "{s}");
    }
    // The text report has the same load line, the tables and the timeline.
    let out = r4()
        .args([
            "run",
            "-f",
            &sample("payment-disputes.yaml"),
            "--tasks",
            "300",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("load: open loop at 33.3 tasks/s (economics.tasksPerMinute 2000)"),
        "{text}"
    );
    for want in [
        "bank-api",
        "investigation",
        "deliveries",
        "timeline",
        "tool retries",
    ] {
        assert!(text.contains(want), "{want} missing in\n{text}");
    }
    let closed = run_json(&[
        "-f",
        &sample("payment-disputes.yaml"),
        "--tasks",
        "300",
        "--closed-loop",
    ]);
    assert_eq!(closed["load"]["model"], "closed", "{closed}");
    assert_eq!(closed["load"]["source"], "--closed-loop");
    assert!(
        closed["elapsed_seconds"].as_f64().unwrap() < 9.0,
        "{closed}"
    );
}

/// A fan-out: a task is completed only when every branch finished it. The `risk` branch
/// fails every call, so nothing completes, every task is dead-lettered, and the SLO line
/// cannot read 100% (today's rule, "any terminal agent finished it", said completed 500).
#[test]
fn a_task_completes_only_when_every_branch_of_a_fan_out_finished() {
    let v = run_json(&["-f", &fixture("fanout-workflow.yaml"), "--tasks", "500"]);
    assert_eq!(n(&v, "completed"), 0, "{v}");
    assert_eq!(n(&v, "dead_lettered"), 500, "{v}");
    assert_accounted(&v);
    assert_eq!(v["slo"]["success_rate"].as_f64(), Some(0.0), "{v}");
    assert_eq!(
        v["incident_cost"]["failure_rate"].as_f64(),
        Some(1.0),
        "{v}"
    );
    assert_eq!(n(&v["agents"]["notify"], "completed"), 500, "{v}");
    assert_eq!(n(&v["agents"]["risk"], "completed"), 0, "{v}");
    assert_eq!(n(&v["agents"]["risk"], "dead_lettered"), 500, "{v}");
    assert_eq!(
        n(&v["tools"]["scorer"], "errors"),
        n(&v["tools"]["scorer"], "calls")
    );

    // Both branches healthy: every task completes, each branch saw each task once.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("fanout-workflow.yaml")).unwrap();
    let healthy = text.replace("errorRate: 1.0", "errorRate: 0.0");
    assert_ne!(healthy, text);
    let path = dir.path().join("fanout.yaml");
    std::fs::write(&path, healthy).unwrap();
    let v = run_json(&["-f", path.to_str().unwrap(), "--tasks", "500"]);
    assert_eq!(n(&v, "completed"), 500, "{v}");
    assert_eq!(v["slo"]["success_rate"].as_f64(), Some(1.0), "{v}");
    assert_accounted(&v);
}

/// A run that cannot finish (the worker pauses while its tool is down, with no end) ends
/// within a bounded virtual time, exits 1 with one line saying why, and counts the waiting
/// tasks as paused, never as lost. A closed loop still submits every task.
#[test]
fn a_run_that_cannot_finish_ends_and_says_where_the_tasks_wait() {
    let wf = fixture("paused-workflow.yaml");
    for load in [&["--rate", "50"][..], &["--closed-loop", "--seed", "7"]] {
        let mut args = vec!["-f", &wf, "--tasks", "120"];
        args.extend(load);
        let (ok, v, stderr) = run_json_status(&args);
        assert!(!ok, "exit status 1: {v}");
        assert_eq!(n(&v, "submitted"), 120, "every task submitted: {v}");
        assert_eq!(n(&v, "paused"), 120, "{v}");
        assert_eq!(n(&v, "lost"), 0, "{v}");
        assert_eq!(n(&v, "in_flight"), 0, "{v}");
        let lines = complaint(&stderr);
        assert_eq!(lines.len(), 1, "one line: {stderr}");
        assert!(
            lines[0].starts_with("r4 run: 120 tasks did not finish within ")
                && lines[0].ends_with(
                    " of virtual time: 120 paused (agent worker: degraded mode Pause, bank down)"
                ),
            "{stderr}"
        );
        assert_eq!(v["slo"]["success_rate"].as_f64(), Some(0.0), "{v}");
    }
    // Backpressure on top (queue.maxLen): the tasks the intake kept refusing are counted
    // under their own name, and so are those held at the intake agent, whose output is full.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("paused-workflow.yaml")).unwrap();
    let full = text.replace(
        "visibilityTimeout: 1s}",
        "visibilityTimeout: 1s, maxLen: 100}",
    );
    assert_ne!(full, text);
    let path = dir.path().join("full.yaml");
    std::fs::write(&path, full).unwrap();
    let (ok, v, stderr) = run_json_status(&["-f", path.to_str().unwrap(), "--tasks", "400"]);
    assert!(!ok);
    assert_eq!(n(&v, "lost"), 0, "{v}");
    assert!(n(&v, "not_submitted") > 0, "{v}");
    assert!(n(&v, "paused") > 0 && n(&v, "in_flight") > 0, "{v}");
    assert_eq!(n(&v, "submitted") + n(&v, "not_submitted"), 400, "{v}");
    assert_eq!(
        n(&v, "paused") + n(&v, "in_flight"),
        n(&v, "submitted"),
        "{v}"
    );
    let lines = complaint(&stderr);
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("not submitted"), "{stderr}");
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("wall_seconds");
        v
    };
    let args = [
        "-f",
        &sample("payment-disputes.yaml"),
        "--tasks",
        "3000",
        "--seed",
        "42",
    ];
    assert_eq!(strip(run_json(&args)), strip(run_json(&args)));
}

/// What tool hedging leaves is the agent's own slowness: agent hedging (a shadow delivery to
/// another replica) cuts it, within its cap, and loses or duplicates nothing.
#[test]
fn agent_hedging_cuts_what_tool_hedging_leaves() {
    let args = [
        "-f",
        &sample("payment-disputes.yaml"),
        "--tasks",
        "5000",
        "--seed",
        "3",
    ];
    let both = run_json(&args);
    let mut off = args.to_vec();
    off.extend(["--disable", "agent-hedge"]);
    let tool_only = run_json(&off);
    let h = &both["agents"]["investigation"]["hedging"];
    assert!(n(h, "hedges") > 0 && n(h, "shadow_wins") > 0, "{h}");
    // The sample's cap: 2% of the agent's deliveries.
    assert!(h["extra_work"].as_f64().unwrap() <= 0.03, "{h}");
    assert!(
        tool_only["agents"]["investigation"]
            .get("hedging")
            .is_none()
    );
    let late = |v: &Value| n(v, "late");
    assert!(
        late(&both) * 2 < late(&tool_only),
        "late {} vs {}",
        late(&both),
        late(&tool_only)
    );
    assert_accounted(&both);
    assert_eq!(n(&both, "effects"), 5000, "{both}");
}

#[test]
fn hedging_cuts_the_tail_and_the_failure_cost() {
    let args = [
        "-f",
        &sample("payment-disputes.yaml"),
        "--tasks",
        "5000",
        "--seed",
        "3",
        // Tool hedging alone (the agent's own hedging is the next test's).
        "--disable",
        "agent-hedge",
    ];
    let with = run_json(&args);
    let mut off = args.to_vec();
    off.extend(["--disable", "hedge"]);
    let without = run_json(&off);
    assert_eq!(n(&without, "hedges"), 0);
    assert!(n(&with, "hedges") > 0);
    // At most 5% extra requests to the bank (one bank call per task).
    assert!(n(&with, "hedges") <= 5000 / 20, "{with}");
    let fr = |v: &Value| v["incident_cost"]["failure_rate"].as_f64().unwrap();
    assert!(
        fr(&with) < fr(&without),
        "hedging should lower the failure rate: {} vs {}",
        fr(&with),
        fr(&without)
    );
    let p99 = |v: &Value| v["latency_ms"]["p99"].as_f64().unwrap();
    assert!(
        p99(&with) * 5.0 < p99(&without),
        "p99 {} vs {}",
        p99(&with),
        p99(&without)
    );
    assert_accounted(&with);
    assert_accounted(&without);
}

#[test]
fn an_outage_trips_the_breaker_and_loses_nothing() {
    let v = run_json(&[
        "-f",
        &fixture("outage-workflow.yaml"),
        "--tasks",
        "3000",
        "--rate",
        "100",
    ]);
    assert_accounted(&v);
    assert!(n(&v, "breaker_trips") >= 1, "{v}");
    assert!(
        n(&v, "fallbacks") + n(&v, "routed") > 0,
        "the outage must be absorbed somehow: {v}"
    );
    // The 20 s outage shows: the bank's breaker was open for a while, and the timeline has
    // slices with the breaker open and slices with it closed.
    let open = v["tools"]["bank"]["breaker_open_seconds"].as_f64().unwrap();
    assert!(open > 1.0 && open < 25.0, "{v}");
    let states: Vec<&str> = v["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["breakers"]["bank"].as_str().unwrap())
        .collect();
    assert!(
        states.contains(&"open") && states.contains(&"closed"),
        "{states:?}"
    );
}

/// A closed loop does not count a dead-lettered task that the repair role will replay as
/// done: during an outage it stops offering new tasks instead of pushing the whole workload
/// into the outage (today every dead-lettering made room for one more task).
#[test]
fn a_closed_loop_waits_for_replays_instead_of_feeding_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(fixture("outage-workflow.yaml")).unwrap();
    // No fallback and no degraded mode: during the outage every task is dead-lettered, and
    // replayed 5 s later (after the outage, for most).
    let bare = text
        .replace("      fallback: {cache: {ttl: 10m}}\n", "")
        .replace(
            "      degradedMode: {whenToolsDown: [bank], action: Route, to: manual-review}\n",
            "",
        )
        .replace(
            "outages: [{after: 5s, for: 20s}]",
            "outages: [{after: 5s, for: 4s}]",
        );
    assert_eq!(bare.matches("fallback").count(), 0);
    let path = dir.path().join("bare.yaml");
    std::fs::write(&path, bare).unwrap();
    let v = run_json(&[
        "-f",
        path.to_str().unwrap(),
        "--tasks",
        "3000",
        "--closed-loop",
    ]);
    assert_accounted(&v);
    let window = n(&v["load"], "max_in_flight");
    let dead = n(&v["agents"]["worker"], "dead_lettered");
    assert!(dead > 0, "the outage dead-letters tasks: {v}");
    assert!(
        dead <= 2 * window,
        "at most about one window of tasks goes into the outage: {dead} dead-letterings, window {window}: {v}"
    );
}

#[test]
fn a_real_redis_gives_the_same_accounting() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let server = rt
        .block_on(r4::testutil::RedisServer::start())
        .expect("redis-server (make deps)");
    let v = run_json(&[
        "-f",
        &sample("payment-disputes.yaml"),
        "--tasks",
        "3000",
        // The sample's own 33.3 tasks/s would take 90 s of wall clock here.
        "--closed-loop",
        "--redis",
        &server.url(),
    ]);
    assert_eq!(n(&v, "submitted"), 3000);
    assert_eq!(v["clock"], "real");
    assert_accounted(&v);
    // The run cleaned up after itself: its keys were under a namespace of its own.
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let size: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(size, 0);
}

fn fails_with(args: &[&str], expected: &str) {
    let out = r4().args(args).output().expect("run r4");
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?} in {stderr}"
    );
}

#[test]
fn bad_flags_and_manifests_get_one_line_naming_them() {
    let wf = sample("payment-disputes.yaml");
    fails_with(&["run", "-f", &wf, "--tasks", "0"], "--tasks");
    fails_with(&["run", "-f", &wf, "--rate", "-5"], "--rate");
    fails_with(
        &["run", "-f", &wf, "--disable", "magic"],
        "[possible values: hedge, agent-hedge, retry, breaker, bulkhead, throttle, fallback]",
    );
    // Negative numbers get the same clear message as --rate, not "unexpected argument".
    fails_with(
        &["run", "-f", &wf, "--tasks", "-5"],
        "--tasks <TASKS>': must be a whole number of tasks",
    );
    fails_with(
        &["run", "-f", &wf, "--seed", "-5"],
        "--seed <SEED>': must be a whole number",
    );
    // A file with several workflows: --workflow picks one, and the error says so.
    {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(&wf).unwrap();
        let two = format!(
            "{text}\n---\n{}",
            text.replace("name: payment-disputes", "name: other-flow")
        );
        let path = dir.path().join("two.yaml");
        std::fs::write(&path, two).unwrap();
        for p in ["default-policy.yaml", "bank-policy.yaml"] {
            std::fs::copy(sample(p), dir.path().join(p)).unwrap();
        }
        let two = path.to_str().unwrap();
        fails_with(
            &["run", "-f", two, "--tasks", "5"],
            "several AgentWorkflows in the given files (payment-disputes, other-flow); choose one with --workflow NAME",
        );
        fails_with(
            &["run", "-f", two, "--workflow", "nope", "--tasks", "5"],
            "--workflow: no AgentWorkflow named \"nope\" in the given files (found: payment-disputes, other-flow)",
        );
        let out = r4()
            .args([
                "run",
                "-f",
                two,
                "--workflow",
                "other-flow",
                "--tasks",
                "5",
                "--json",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // r4 validate finds the policies next to the workflow file, as r4 run does.
        let out = r4()
            .args(["validate", "--require-refs", "-f", two])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        assert!(
            err.contains("CircuitPolicy \"bank-policy\" taken from"),
            "{err}"
        );
    }
    fails_with(
        &["run", "-f", "/nonexistent/wf.yaml"],
        "/nonexistent/wf.yaml",
    );
    fails_with(&["run"], "--file");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&wf).unwrap();
    let no_sim = text.replacen(
        "      simulate:\n        latency: {medianMs: 2, p99Ms: 8}\n",
        "",
        1,
    );
    assert_ne!(no_sim, text);
    let path = dir.path().join("wf.yaml");
    std::fs::write(&path, &no_sim).unwrap();
    for p in ["default-policy.yaml", "bank-policy.yaml"] {
        std::fs::copy(sample(p), dir.path().join(p)).unwrap();
    }
    fails_with(
        &["run", "-f", path.to_str().unwrap()],
        "spec.agents[0].simulate: required by r4 run",
    );
    let bad = text.replacen("concurrency: 32", "concurrency: 0", 1);
    std::fs::write(&path, &bad).unwrap();
    fails_with(
        &["run", "-f", path.to_str().unwrap()],
        "spec.agents[1].concurrency: must be >= 1, got 0",
    );
    let stopped = text.replacen(
        "agents: {resolution: false}",
        "agents: {resolution: true}",
        1,
    );
    assert_ne!(stopped, text);
    std::fs::write(&path, &stopped).unwrap();
    fails_with(
        &["run", "-f", path.to_str().unwrap()],
        "spec.killSwitches.agents.resolution: engaged",
    );
    std::fs::write(&path, &bad).unwrap();
    let out = r4()
        .args(["run", "-f", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1,
        "one line"
    );
}

#[test]
fn a_last_agent_that_publishes_to_a_sink_still_completes_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sample("payment-disputes.yaml")).unwrap();
    let archived = text.replacen(
        "      consumes: resolutions\n",
        "      consumes: resolutions\n      produces: [archive]\n",
        1,
    );
    assert_ne!(archived, text);
    let path = dir.path().join("wf.yaml");
    std::fs::write(&path, archived).unwrap();
    for p in ["default-policy.yaml", "bank-policy.yaml"] {
        std::fs::copy(sample(p), dir.path().join(p)).unwrap();
    }
    let v = run_json(&["-f", path.to_str().unwrap(), "--tasks", "500"]);
    assert_eq!(n(&v, "completed"), 500, "{v}");
    assert_accounted(&v);
}

/// The live view only exists on a terminal; what it computes is unit-tested in
/// `local::run` (`ProgressMeter`). Here: the exit status is 0 for a run that settled.
#[test]
fn a_settled_run_exits_zero_with_nothing_on_stderr_but_policy_sources() {
    let out = r4()
        .args([
            "run",
            "-f",
            &sample("payment-disputes.yaml"),
            "--tasks",
            "200",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(complaint(&String::from_utf8_lossy(&out.stderr)).is_empty());
}

/// The SLO line uses the SLO: a task completed slower than
/// `slo.p95LatencyMs` is not a success there either (it is a failure in
/// the cost model), so "SLO success 100%" beside such failures is impossible.
#[test]
fn the_slo_success_rate_counts_slow_completions_as_failures() {
    let out = r4()
        .args([
            "run",
            "-f",
            &sample("payment-disputes.yaml"),
            "--tasks",
            "3000",
            "--disable",
            "hedge",
            "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    let completed = v["completed"].as_f64().unwrap();
    let submitted = v["submitted"].as_f64().unwrap();
    let success = v["slo"]["success_rate"].as_f64().unwrap();
    let failure = v["incident_cost"]["failure_rate"].as_f64().unwrap();
    assert!(failure > 0.0, "the bank's tail makes some tasks late: {v}");
    assert!(success < completed / submitted, "{v}");
    assert!(
        (success + failure - 1.0).abs() < 1e-9,
        "SLO success and the cost model's failures add up: {success} + {failure}"
    );
}

/// Fallback first (issue 10): the bank's statements are cached (calls draw their account from
/// `keySpace: 1000`, and 20 s at 100 tasks/s come before the 20 s outage, so all but about
/// e^-2 ≈ 13.5% of the accounts are cached by then). During the outage most tasks complete
/// from the cache and only the misses are routed to manual review — not every task of the
/// outage, as when degraded mode routed everything once the breaker opened.
#[test]
fn during_an_outage_cached_answers_complete_and_only_misses_are_routed() {
    let v = run_json(&[
        "-f",
        &fixture("fallback-outage.yaml"),
        "--tasks",
        "6000",
        "--rate",
        "100",
        "--seed",
        "1",
    ]);
    assert_accounted(&v);
    assert!(n(&v, "breaker_trips") >= 1, "{v}");
    let during_outage = 100 * 20;
    let expected_misses = during_outage as f64 * (1.0f64 - 1.0 / 1000.0).powi(2000);
    let routed = n(&v, "routed") as f64;
    assert!(
        routed >= expected_misses * 0.5 && routed <= expected_misses * 1.6,
        "routed {routed}: expected about the {expected_misses:.0} cache misses of the {during_outage} tasks during the outage: {v}"
    );
    assert!(
        n(&v, "fallbacks") as f64 >= (during_outage as f64 - expected_misses) * 0.8,
        "the cache answers the rest: {v}"
    );
    assert!(n(&v, "dead_lettered") * 100 <= n(&v, "submitted"), "{v}");
}

/// An agent outage window (`simulate.outages` on an agent) is its container gone: connection
/// refused. The engine pauses that agent's reads rather than failing its tasks, so the run
/// still completes every task, only later.
#[test]
fn an_agent_outage_pauses_its_engine_and_fails_no_task() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(sample("payment-disputes.yaml")).unwrap();
    let down = text.replacen(
        "        latency: {medianMs: 3, p99Ms: 10}\n        calls: [ledger]\n",
        "        latency: {medianMs: 3, p99Ms: 10}\n        calls: [ledger]\n        outages: [{after: 1s, for: 5s}]\n",
        1,
    );
    assert_ne!(down, text);
    let path = dir.path().join("wf.yaml");
    std::fs::write(&path, down).unwrap();
    for p in ["default-policy.yaml", "bank-policy.yaml"] {
        std::fs::copy(sample(p), dir.path().join(p)).unwrap();
    }
    let v = run_json(&[
        "-f",
        path.to_str().unwrap(),
        "--tasks",
        "3000",
        "--seed",
        "2",
    ]);
    assert_accounted(&v);
    assert_eq!(n(&v, "completed"), 3000, "{v}");
    assert_eq!(n(&v, "dead_lettered"), 0, "{v}");
    // The tasks waiting for the resolution agent finished after it came back.
    assert!(v["latency_ms"]["p999"].as_f64().unwrap() >= 4000.0, "{v}");
}

/// The fan-out/fan-in sample: `decide` joins the lookup and fraud branches. Every task is
/// accounted for; each completed task was decided exactly once (one joined delivery per task,
/// never one per branch); the KYC outage in the fraud branch dead-letters branches, whose
/// joins fail at once and reopen when the repair role replays them, so those tasks end late,
/// not lost.
#[test]
fn the_fan_in_sample_joins_each_task_once() {
    let v = run_json(&[
        "-f",
        &sample("chargeback-triage.yaml"),
        "--tasks",
        "1200",
        "--seed",
        "3",
    ]);
    assert_accounted(&v);
    assert_eq!(n(&v, "submitted"), 1200, "{v}");
    assert_eq!(n(&v, "lost"), 0, "{v}");
    let completed = n(&v, "completed");
    let decide = &v["agents"]["decide"];
    assert_eq!(n(decide, "completed"), completed, "{v}");
    assert_eq!(
        n(decide, "deliveries"),
        completed,
        "one joined delivery per task: {v}"
    );
    for branch in ["triage", "lookup"] {
        assert_eq!(n(&v["agents"][branch], "completed"), 1200, "{branch}: {v}");
    }
    // The outage shows: the fraud branch was dead-lettered and replayed, the KYC breaker
    // opened, and the replayed tasks completed late.
    assert!(n(&v["agents"]["fraud"], "dead_lettered") > 0, "{v}");
    assert!(n(&v, "replays") > 0, "{v}");
    assert!(
        v["tools"]["kyc-api"]["breaker_open_seconds"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{v}"
    );
    assert!(n(&v, "late") > 0, "{v}");
}
