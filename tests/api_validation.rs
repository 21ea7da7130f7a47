//! `r4 validate` semantics: for each kind a valid manifest is accepted, and each invalid one is
//! refused with the field path in the message. The same function backs the controller's
//! `Valid` condition and `r4 run`.

use r4::api::validate::{RefMode, cel_errors, cel_rule_report, validate_texts};

const WORKFLOW: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: wf}
spec:
  queue: {redis: {url: "redis://localhost:6379"}, maxLen: 1000}
  policyRef: pol
  tools:
    - {name: bank-api, url: "http://bank:8080/mcp", idempotent: true, fallback: {cache: {ttl: 10m}}}
    - {name: ledger, url: "http://ledger:8080/"}
  agents:
    - {name: intake, image: i:1, consumes: tickets, produces: [investigations]}
    - name: investigation
      image: i:2
      consumes: investigations
      produces: [resolutions]
      tools: [bank-api]
      degradedMode: {whenToolsDown: [bank-api], action: Route, to: manual-review}
    - {name: resolution, image: i:3, consumes: resolutions, tools: [ledger], saga: {compensate: refund-reversal}}
  killSwitches: {all: false, agents: {resolution: false}, tools: {ledger: false}}
  rollout: {strategy: Automatic, progressDeadlineSeconds: 120, analysis: {minSuccessRate: 0.98}}
  slo: {successRate: 0.995, p95LatencyMs: 1500}
  economics: {marginPerTask: 0.08, remediationCostPerFailure: 3.5}
"#;

const POLICY: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: pol}
spec:
  timeout: {perAttempt: 2s, overall: 10s}
  retry:
    maxAttempts: 3
    backoff: {initial: 100ms, max: 5s, multiplier: 2, jitter: Full}
    budget: {ratio: 0.1, minPerSecond: 10}
    retryOn: [Timeout, ConnectError, Status5xx, Status429]
  hedge: {enabled: true, delay: {percentile: 95}, maxExtraLoad: 0.05, onlyIdempotent: true}
  circuitBreaker:
    failureRateThreshold: 0.5
    slowCallRateThreshold: 0.8
    slowCallDuration: 1s
    window: {type: Count, size: 100}
    minimumCalls: 20
    openDuration: 30s
    halfOpenCalls: 3
  bulkhead: {maxConcurrent: 64}
  deadLetter: {maxDeliveries: 5, retention: 168h, replay: {automatic: true, maxReplays: 3, backoff: 1m}}
  idempotency: {ttl: auto}
"#;

const DRILL: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: ChaosDrill
metadata: {name: drill}
spec:
  workflowRef: wf
  schedule: "0 3 * * 1"
  duration: 5m
  faults:
    - {type: ToolOutage, tool: bank-api, after: 30s, for: 2m}
    - {type: ToolLatency, tool: bank-api, latencyMs: 800, percent: 50}
    - {type: ToolErrors, tool: bank-api, errorRate: 0.3}
    - {type: MessageCorruption, stream: investigations, percent: 5}
    - {type: PodKill, agent: investigation, count: 1}
    - {type: QueueThrottle, stream: tickets, maxPerSecond: 10}
  guardrails: {abortIf: {successRateBelow: 0.9, dlqDepthAbove: 1000}}
  expect: {maxRecoverySeconds: 60, maxLostTasks: 0, maxDuplicateEffects: 0}
"#;

fn errors_of(doc: &str) -> Vec<String> {
    validate_texts(&[("t.yaml".into(), doc.into())], RefMode::Warn).errors
}

/// Replace `from` (which must occur) by `to` in `base`.
fn edit(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "fixture does not contain {from:?}");
    base.replacen(from, to, 1)
}

fn assert_refused(doc: &str, expected: &str) {
    let errs = errors_of(doc);
    assert!(
        errs.iter().any(|e| e.contains(expected)),
        "expected an error containing {expected:?}, got {errs:#?}"
    );
}

#[test]
fn valid_manifests_are_accepted_together() {
    let text = format!("{WORKFLOW}\n---\n{POLICY}\n---\n{DRILL}");
    let report = validate_texts(&[("all.yaml".into(), text)], RefMode::Require);
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    assert_eq!(report.manifests.len(), 3);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}

#[test]
fn every_sample_validates() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/samples");
    let mut texts = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            texts.push((
                path.display().to_string(),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
    assert!(texts.len() >= 4);
    let report = validate_texts(&texts, RefMode::Require);
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    assert!(report.warnings.is_empty(), "{:#?}", report.warnings);
}

#[test]
fn invalid_workflows_are_refused_naming_the_field() {
    let cases = [
        (
            edit(
                WORKFLOW,
                "tools: [bank-api]",
                "tools: [bank-api]\n      hedge: {delay: {percentile: 97}}",
            ),
            "spec.agents[1].hedge: only an agent marked idempotent: true may be hedged",
        ),
        (
            edit(
                WORKFLOW,
                "tools: [bank-api]",
                "tools: [bank-api]\n      idempotent: true\n      hedge: {delay: {percentile: 97, fixed: 800ms}}",
            ),
            "spec.agents[1].hedge.delay: exactly one of percentile and fixed must be set",
        ),
        (
            edit(
                WORKFLOW,
                "tools: [bank-api]",
                "tools: [bank-api]\n      idempotent: true\n      hedge: {delay: {fixed: 800ms}, maxExtraLoad: 0}",
            ),
            "spec.agents[1].hedge.maxExtraLoad: must be > 0 and <= 1",
        ),
        (
            edit(WORKFLOW, "tools: [ledger]", "tools: [ledger, vault]"),
            "spec.agents[2].tools: unknown tool \"vault\"",
        ),
        (
            edit(WORKFLOW, "name: resolution, image", "name: intake, image"),
            "spec.agents[2].name: duplicate agent \"intake\"",
        ),
        (
            edit(
                WORKFLOW,
                "agents: {resolution: false}",
                "agents: {payments: true}",
            ),
            "spec.killSwitches.agents.payments: unknown agent",
        ),
        (
            edit(WORKFLOW, "tools: {ledger: false}", "tools: {vault: true}"),
            "spec.killSwitches.tools.vault: unknown tool",
        ),
        (
            edit(WORKFLOW, "maxLen: 1000", "maxLen: 5"),
            "spec.queue.maxLen: must be >= 100, got 5",
        ),
        (
            edit(
                WORKFLOW,
                "url: \"redis://localhost:6379\"",
                "url: \"http://localhost\"",
            ),
            "spec.queue.redis.url: \"http://localhost\" does not match",
        ),
        (
            edit(
                WORKFLOW,
                "{redis: {url: \"redis://localhost:6379\"}",
                "{redis: {}",
            ),
            "exactly one of url and urlSecretRef must be set",
        ),
        (
            edit(WORKFLOW, "name: bank-api, url", "name: Bank_API, url"),
            "spec.tools[0].name: \"Bank_API\" does not match a DNS-1123 label",
        ),
        (
            edit(WORKFLOW, "strategy: Automatic", "strategy: Sometimes"),
            "spec.rollout.strategy: must be one of \"Automatic\", \"Manual\", got \"Sometimes\"",
        ),
        (
            edit(WORKFLOW, "minSuccessRate: 0.98", "minSuccessRate: 1.5"),
            "spec.rollout.analysis.minSuccessRate: must be <= 1, got 1.5",
        ),
        (
            edit(
                WORKFLOW,
                "action: Route, to: manual-review",
                "action: Route",
            ),
            "spec.agents[1].degradedMode.to: required when action is Route",
        ),
        (
            edit(
                WORKFLOW,
                "produces: [resolutions]",
                "produces: [investigations]",
            ),
            "spec.agents[1].produces",
        ),
        (
            edit(
                WORKFLOW,
                "slo: {successRate: 0.995",
                "slo: {successRate: 1.0",
            ),
            "spec.slo.successRate: must be < 1",
        ),
        (
            edit(WORKFLOW, "ttl: 10m", "ttl: 10 minutes"),
            "spec.tools[0].fallback.cache.ttl",
        ),
    ];
    for (doc, expected) in &cases {
        assert_refused(doc, expected);
    }
    // Unknown fields are errors, at any depth.
    assert_refused(
        &edit(WORKFLOW, "policyRef: pol", "policyRef: pol\n  colour: blue"),
        "spec.colour: unknown field",
    );
    assert_refused(
        &edit(WORKFLOW, "saga: {compensate", "saga: {undo: x, compensate"),
        "spec.agents[2].saga.undo: unknown field",
    );
    // Wrong types name the field.
    assert_refused(
        &edit(WORKFLOW, "maxLen: 1000", "maxLen: lots"),
        "spec.queue.maxLen: must be an integer, got string \"lots\"",
    );
    // Required fields.
    assert_refused(
        &edit(
            WORKFLOW,
            "{name: intake, image: i:1, consumes: tickets,",
            "{name: intake, image: i:1,",
        ),
        "spec.agents[0].consumes: required field missing",
    );
    // No entry stream.
    assert_refused(
        &edit(WORKFLOW, "consumes: tickets", "consumes: resolutions"),
        "no entry stream",
    );
    // Two producers of one stream: the reader would run once per producer.
    assert_refused(
        &edit(
            WORKFLOW,
            "produces: [investigations]}",
            "produces: [investigations, resolutions]}",
        ),
        "spec.agents[1].produces: stream \"resolutions\" is produced by agents \"intake\" and \"investigation\"",
    );
    // A cycle reachable from the entry stream (through a degraded route).
    assert_refused(
        &edit(
            WORKFLOW,
            "action: Route, to: manual-review}",
            "action: Route, to: manual-review}\n    - {name: reviewer, image: i:4, consumes: manual-review, produces: [tickets-again]}\n    - {name: again, image: i:5, consumes: tickets-again, produces: [investigations]}",
        ),
        "form a cycle reachable from \"tickets\"",
    );
    // Names too long for child objects.
    let long = "a".repeat(60);
    assert_refused(
        &edit(
            WORKFLOW,
            "metadata: {name: wf}",
            &format!("metadata: {{name: {long}}}"),
        ),
        "would be",
    );
}

/// An agent whose input stream nothing writes would wait forever: refused, unless the stream is
/// declared as written from outside (`spec.inputs`).
#[test]
fn a_stream_nothing_feeds_is_refused_unless_declared_as_input() {
    let orphan = edit(
        WORKFLOW,
        "    - {name: resolution,",
        "    - {name: audit, image: i:4, consumes: audit-log}\n    - {name: resolution,",
    );
    let errs = errors_of(&orphan);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("spec.agents[2].consumes: agent \"audit\" consumes stream \"audit-log\", which no agent produces")
            && errs[0].contains("it feeds \"tickets\"")
            && errs[0].contains("spec.inputs"),
        "{errs:#?}"
    );
    // Declared as written from outside: valid, and the intake still feeds tickets.
    let declared = edit(&orphan, "  agents:\n", "  inputs: [audit-log]\n  agents:\n");
    assert!(
        errors_of(&declared).is_empty(),
        "{:#?}",
        errors_of(&declared)
    );
    let report = validate_texts(&[("t.yaml".into(), declared)], RefMode::Warn);
    let Some((_, r4::api::validate::Manifest::Workflow(w))) = report.manifests.first() else {
        panic!("no workflow");
    };
    assert_eq!(r4::api::validate::entry_stream(&w.spec), Some("tickets"));
    // A degraded-mode route feeds the stream it names.
    let routed = edit(
        WORKFLOW,
        "    - {name: resolution,",
        "    - {name: review, image: i:4, consumes: manual-review}\n    - {name: resolution,",
    );
    assert!(errors_of(&routed).is_empty(), "{:#?}", errors_of(&routed));
    // An input no agent reads, or twice.
    assert_refused(
        &edit(WORKFLOW, "  agents:\n", "  inputs: [nowhere]\n  agents:\n"),
        "spec.inputs[0]: no agent consumes stream \"nowhere\"",
    );
    assert_refused(
        &edit(WORKFLOW, "  agents:\n", "  inputs: [Bad_Name]\n  agents:\n"),
        "spec.inputs[0]: \"Bad_Name\" is not a DNS-1123 label",
    );
}

/// Every problem of a document in one report: a schema error no longer hides the semantic and
/// CEL rules, and nothing is said about the values the schema already refused.
#[test]
fn every_error_of_a_document_is_reported_at_once() {
    // A wrong type (schema) and a duplicate agent name (semantic rule).
    let doc = edit(
        &edit(WORKFLOW, "name: resolution, image", "name: intake, image"),
        "{name: intake, image: i:1, consumes: tickets,",
        "{name: intake, image: i:1, replicas: two, consumes: tickets,",
    );
    let errs = errors_of(&doc);
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.agents[0].replicas: must be an integer")),
        "{errs:#?}"
    );
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.agents[2].name: duplicate agent \"intake\"")),
        "{errs:#?}"
    );
    // An unknown field, a missing required field, and a policy rule elsewhere.
    let doc = edit(
        &edit(
            &edit(
                WORKFLOW,
                "maxLen: 1000}",
                "maxLen: 1000, visibilityTimeout: 10ms}",
            ),
            "{name: ledger, url: \"http://ledger:8080/\"}",
            "{name: ledger}",
        ),
        "  policyRef: pol\n",
        "  policyRef: pol\n  colour: blue\n",
    );
    let errs = errors_of(&doc);
    for expected in [
        "spec.colour: unknown field",
        "spec.tools[1].url: required field missing",
        "spec.queue.visibilityTimeout: must be at least 1s",
    ] {
        assert!(
            errs.iter().any(|e| e.contains(expected)),
            "expected {expected:?} in {errs:#?}"
        );
    }
    assert_eq!(errs.len(), 3, "nothing about placeholders: {errs:#?}");
    // A missing agent name: said once, not again as a duplicate or an unknown kill switch.
    let doc = edit(WORKFLOW, "{name: resolution, image: i:3,", "{image: i:3,");
    let errs = errors_of(&doc);
    assert!(
        errs.iter()
            .any(|e| e.contains("spec.agents[2].name: required field missing")),
        "{errs:#?}"
    );
    assert!(!errs.iter().any(|e| e.contains("duplicate")), "{errs:#?}");
    // A bad discriminator: nothing about the fields its placeholder would require.
    let doc = edit(
        WORKFLOW,
        "action: Route, to: manual-review",
        "action: Teleport",
    );
    let errs = errors_of(&doc);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("spec.agents[1].degradedMode.action: must be one of"),
        "{errs:#?}"
    );
}

#[test]
fn invalid_policies_are_refused_naming_the_field() {
    let cases = [
        (
            edit(POLICY, "maxAttempts: 3", "maxAttempts: 0"),
            "spec.retry.maxAttempts: must be >= 1, got 0",
        ),
        (
            edit(POLICY, "initial: 100ms", "initial: 10s"),
            "spec.retry.backoff.initial: must be <= backoff.max (5s), got 10s",
        ),
        (
            edit(POLICY, "perAttempt: 2s", "perAttempt: 20s"),
            "spec.timeout.perAttempt: must be <= timeout.overall",
        ),
        (
            edit(POLICY, "jitter: Full", "jitter: Random"),
            "spec.retry.backoff.jitter: must be one of",
        ),
        (
            edit(POLICY, "Status429]", "Status418]"),
            "spec.retry.retryOn[3]: must be one of",
        ),
        (
            edit(POLICY, "Status429]", "Timeout]"),
            "spec.retry.retryOn[3]: duplicate entry \"Timeout\"",
        ),
        (
            edit(POLICY, "ratio: 0.1", "ratio: 2"),
            "spec.retry.budget.ratio: must be <= 1, got 2",
        ),
        (
            edit(
                POLICY,
                "delay: {percentile: 95}",
                "delay: {percentile: 95, fixed: 100ms}",
            ),
            "spec.hedge.delay: exactly one of percentile and fixed",
        ),
        (
            edit(POLICY, "maxExtraLoad: 0.05", "maxExtraLoad: 0"),
            "spec.hedge.maxExtraLoad: must be > 0 when hedging is enabled",
        ),
        (
            edit(
                POLICY,
                "window: {type: Count, size: 100}",
                "window: {type: Count}",
            ),
            "spec.circuitBreaker.window.size: required for a Count window",
        ),
        (
            edit(
                POLICY,
                "window: {type: Count, size: 100}",
                "window: {type: Sliding, size: 100}",
            ),
            "spec.circuitBreaker.window.type: must be one of",
        ),
        (
            edit(POLICY, "minimumCalls: 20", "minimumCalls: 200"),
            "spec.circuitBreaker.minimumCalls: must be <= window.size (100), got 200",
        ),
        (
            edit(POLICY, "openDuration: 30s", "openDuration: 30x"),
            "spec.circuitBreaker.openDuration: \"30x\" does not match a duration",
        ),
        (
            edit(POLICY, "openDuration: 30s", "openDuration: 30"),
            "spec.circuitBreaker.openDuration: must be a string, got integer 30",
        ),
        (
            edit(POLICY, "openDuration: 30s", "openDuration: 0s"),
            "spec.circuitBreaker.openDuration: must be greater than 0",
        ),
        (
            edit(
                POLICY,
                "failureRateThreshold: 0.5",
                "failureRateThreshold: 0",
            ),
            "spec.circuitBreaker.failureRateThreshold: must be >= 0.01, got 0",
        ),
        (
            edit(POLICY, "maxConcurrent: 64", "maxConcurrent: 0"),
            "spec.bulkhead.maxConcurrent: must be >= 1, got 0",
        ),
        (
            edit(POLICY, "maxDeliveries: 5", "maxDeliveries: 500"),
            "spec.deadLetter.maxDeliveries: must be <= 100, got 500",
        ),
        (
            edit(POLICY, "retention: 168h", "retention: 10s"),
            "spec.deadLetter.retention: must be at least 1m",
        ),
        (
            edit(POLICY, "ttl: auto", "ttl: 1m"),
            "spec.idempotency.ttl: 1m is shorter than the retry and replay horizon",
        ),
        (
            edit(POLICY, "ttl: auto", "ttl: forever"),
            "spec.idempotency.ttl: \"forever\" does not match",
        ),
        (
            edit(POLICY, "    slowCallDuration: 1s\n", ""),
            "spec.circuitBreaker.slowCallDuration: required when slowCallRateThreshold is set",
        ),
        (
            edit(POLICY, "bulkhead:", "bulkheads:"),
            "spec.bulkheads: unknown field",
        ),
    ];
    for (doc, expected) in &cases {
        assert_refused(doc, expected);
    }
}

#[test]
fn invalid_drills_are_refused_naming_the_field() {
    let cases = [
        (
            edit(
                DRILL,
                "schedule: \"0 3 * * 1\"",
                "schedule: \"every monday\"",
            ),
            "spec.schedule: invalid cron expression",
        ),
        (
            edit(DRILL, "schedule: \"0 3 * * 1\"", "schedule: \"0 99 * * 1\""),
            "spec.schedule: invalid cron expression",
        ),
        (
            edit(DRILL, "duration: 5m", "duration: 5d"),
            "spec.duration: \"5d\" does not match a duration",
        ),
        (
            edit(DRILL, "duration: 5m", "duration: 48h"),
            "spec.duration: must be at most 24h",
        ),
        (
            edit(DRILL, "after: 30s, for: 2m", "after: 4m, for: 2m"),
            "spec.faults[0]: fault window ends at 6m but the drill lasts 5m",
        ),
        (
            edit(
                DRILL,
                "{type: ToolOutage, tool: bank-api,",
                "{type: ToolOutage,",
            ),
            "spec.faults[0].tool: required for a ToolOutage fault",
        ),
        (
            edit(
                DRILL,
                "{type: ToolLatency, tool: bank-api, latencyMs: 800,",
                "{type: ToolLatency, tool: bank-api,",
            ),
            "spec.faults[1].latencyMs: required for a ToolLatency fault",
        ),
        (
            edit(DRILL, "errorRate: 0.3", "errorRate: 3"),
            "spec.faults[2].errorRate: must be <= 1, got 3",
        ),
        (
            edit(
                DRILL,
                "stream: investigations, percent: 5",
                "stream: investigations, percent: 500",
            ),
            "spec.faults[3].percent: must be <= 100, got 500",
        ),
        (
            edit(
                DRILL,
                "agent: investigation, count: 1",
                "tool: bank-api, count: 1",
            ),
            "spec.faults[4].tool: not used by a PodKill fault",
        ),
        (
            edit(DRILL, "{type: QueueThrottle", "{type: NetworkPartition"),
            "spec.faults[5].type: must be one of",
        ),
        (
            edit(DRILL, "successRateBelow: 0.9", "successRateBelow: -1"),
            "spec.guardrails.abortIf.successRateBelow: must be >= 0, got -1",
        ),
        (
            edit(DRILL, "maxLostTasks: 0", "maxLostTasks: -3"),
            "spec.expect.maxLostTasks: must be >= 0, got -3",
        ),
        (
            edit(DRILL, "workflowRef: wf", "workflowRef: Payment Disputes"),
            "spec.workflowRef: \"Payment Disputes\" does not match a DNS-1123 label",
        ),
    ];
    for (doc, expected) in &cases {
        assert_refused(doc, expected);
    }
    assert_refused(
        &edit(DRILL, "expect:", "expectations:"),
        "spec.expectations: unknown field",
    );
    assert_refused(
        &edit(DRILL, "faults:\n", "faults: []\n  oldFaults:\n"),
        "spec.faults: must have at least 1 item(s), got 0",
    );
}

#[test]
fn drill_targets_are_checked_against_the_workflow_in_the_same_files() {
    let bad = edit(
        DRILL,
        "{type: PodKill, agent: investigation",
        "{type: PodKill, agent: reviewer",
    );
    let text = format!("{WORKFLOW}\n---\n{POLICY}\n---\n{bad}");
    let report = validate_texts(&[("x.yaml".into(), text)], RefMode::Warn);
    assert!(
        report
            .errors
            .iter()
            .any(|e| e
                .contains("spec.faults[4].agent: unknown agent \"reviewer\" in workflow \"wf\"")),
        "{:#?}",
        report.errors
    );
}

#[test]
fn unresolved_references_warn_or_fail_by_mode() {
    let warn = validate_texts(&[("w.yaml".into(), WORKFLOW.into())], RefMode::Warn);
    assert!(warn.errors.is_empty(), "{:#?}", warn.errors);
    assert!(
        warn.warnings
            .iter()
            .any(|w| w.contains("spec.policyRef: CircuitPolicy \"pol\" not found"))
    );
    let strict = validate_texts(&[("w.yaml".into(), WORKFLOW.into())], RefMode::Require);
    assert!(strict.errors.iter().any(|w| w.contains("spec.policyRef")));
}

#[test]
fn bad_documents_name_the_document() {
    assert_refused(
        "apiVersion: r4.dev/v1\nkind: AgentWorkflow\nmetadata: {name: x}\n",
        "apiVersion: must be \"r4.dev/v1alpha1\"",
    );
    assert_refused(
        "apiVersion: r4.dev/v1alpha1\nkind: Workflow\nmetadata: {name: x}\n",
        "kind: unknown kind \"Workflow\"",
    );
    assert_refused(
        "apiVersion: r4.dev/v1alpha1\nkind: CircuitPolicy\nspec: {}\n",
        "metadata.name: required field missing",
    );
    assert_refused("a: [unclosed\n", "t.yaml#1: invalid YAML");
    let two = format!(
        "{POLICY}\n---\n{}",
        edit(POLICY, "maxAttempts: 3", "maxAttempts: 0")
    );
    assert_refused(&two, "t.yaml#2: CircuitPolicy/pol: spec.retry.maxAttempts");
}

#[test]
fn cel_rules_fire_as_the_api_server_would() {
    let yaml = |s: &str| -> serde_json::Value { serde_yaml::from_str(s).unwrap() };
    let expect = |doc: &str, msg: &str| {
        let errs = cel_errors(&yaml(doc));
        assert!(
            errs.iter().any(|e| e.message.contains(msg)),
            "expected CEL error {msg:?}, got {errs:#?}"
        );
    };
    assert!(cel_errors(&yaml(WORKFLOW)).is_empty());
    assert!(cel_errors(&yaml(POLICY)).is_empty());
    assert!(cel_errors(&yaml(DRILL)).is_empty());
    expect(
        &edit(WORKFLOW, "tools: [ledger]", "tools: [vault]"),
        "every agent tool must name a tool declared",
    );
    expect(
        &edit(WORKFLOW, "name: resolution, image", "name: intake, image"),
        "agent names must be unique",
    );
    expect(
        &edit(WORKFLOW, "agents: {resolution: false}", "agents: {x: true}"),
        "killSwitches.agents keys must name declared agents",
    );
    expect(
        &edit(WORKFLOW, "tools: {ledger: false}", "tools: {x: true}"),
        "killSwitches.tools keys must name declared tools",
    );
    expect(
        &edit(
            WORKFLOW,
            "action: Route, to: manual-review",
            "action: Route",
        ),
        "action Route needs `to`",
    );
    expect(
        &edit(
            WORKFLOW,
            "produces: [resolutions]",
            "produces: [investigations]",
        ),
        "must not produce the stream it consumes",
    );
    expect(
        &edit(POLICY, "initial: 100ms", "initial: 10s"),
        "backoff.initial must be <= backoff.max",
    );
    expect(
        &edit(POLICY, "perAttempt: 2s", "perAttempt: 1m"),
        "timeout.perAttempt must be <= timeout.overall",
    );
    expect(
        &edit(POLICY, "delay: {percentile: 95}", "delay: {}"),
        "exactly one of percentile and fixed",
    );
    expect(
        &edit(
            POLICY,
            "window: {type: Count, size: 100}",
            "window: {type: Time}",
        ),
        "a Time window needs seconds",
    );
    expect(
        &edit(POLICY, "minimumCalls: 20", "minimumCalls: 101"),
        "minimumCalls must be <= window.size",
    );
    expect(
        &edit(
            DRILL,
            "{type: ToolOutage, tool: bank-api,",
            "{type: ToolOutage,",
        ),
        "need `tool`",
    );
    expect(
        &edit(
            DRILL,
            "{type: PodKill, agent: investigation,",
            "{type: PodKill,",
        ),
        "PodKill and AgentSlowdown need `agent`",
    );
    // rollbackTo must name an existing revision once the status lists revisions.
    let with_status = format!(
        "{WORKFLOW}  rollbackTo: {{revision: 9}}\nstatus:\n  revisions: [{{revision: 1, phase: Healthy}}]\n"
    );
    expect(
        &with_status,
        "rollbackTo.revision must be an existing revision",
    );
    let ok = with_status.replace("revision: 9", "revision: 1");
    assert!(cel_errors(&yaml(&ok)).is_empty());
}

#[test]
fn every_cel_rule_compiles_and_fits_the_api_server_cost_budget() {
    let report = cel_rule_report();
    assert!(
        report.len() >= 20,
        "expected the CRDs to carry their CEL rules, found {}",
        report.len()
    );
    for (kind, rule, warnings) in report {
        assert!(warnings.is_empty(), "{kind}: rule {rule:?}: {warnings:?}");
    }
}

#[test]
fn references_resolve_across_documents_without_a_namespace() {
    let wf = WORKFLOW.replace(
        "metadata: {name: wf}",
        "metadata: {name: wf, namespace: payments}",
    );
    let same = validate_texts(
        &[("a.yaml".into(), format!("{wf}\n---\n{POLICY}"))],
        RefMode::Require,
    );
    assert!(
        same.errors.is_empty(),
        "a policy without a namespace goes wherever it is applied: {:#?}",
        same.errors
    );
    let other = POLICY.replace(
        "metadata: {name: pol}",
        "metadata: {name: pol, namespace: billing}",
    );
    let apart = validate_texts(
        &[("a.yaml".into(), format!("{wf}\n---\n{other}"))],
        RefMode::Require,
    );
    assert!(
        apart
            .errors
            .iter()
            .any(|e| e.contains("spec.policyRef: CircuitPolicy \"pol\" not found")),
        "{:#?}",
        apart.errors
    );
}

#[test]
fn tool_credentials_live_in_secrets_not_in_urls() {
    let with_tool = |tool: &str| {
        WORKFLOW.replace(
            "    - {name: bank-api, url: \"http://bank:8080/mcp\", idempotent: true, fallback: {cache: {ttl: 10m}}}",
            tool,
        )
    };
    let errors = |text: String| validate_texts(&[("a.yaml".into(), text)], RefMode::Warn).errors;
    for url in [
        "https://user:pass@bank:8443/mcp",
        "http://token@bank:8080/mcp",
        "https://u:p%40ss@bank/mcp?x=@",
    ] {
        let e = errors(with_tool(&format!(
            "    - {{name: bank-api, url: \"{url}\", idempotent: true}}"
        )));
        assert!(
            e.iter()
                .any(|e| e.contains("spec.tools[0].url: must not carry credentials")),
            "{url}: {e:#?}"
        );
    }
    // An '@' after the host is a path, not credentials; headersFrom is the way.
    let ok = errors(with_tool(
        "    - name: bank-api\n      url: \"https://bank:8443/v1/@me\"\n      headersFrom: [{name: Authorization, secretRef: {name: bank, key: token}}]",
    ));
    assert!(ok.is_empty(), "{ok:#?}");
    let e = errors(with_tool(
        "    - name: bank-api\n      url: \"https://bank/mcp\"\n      headersFrom:\n        - {name: Authorization, secretRef: {name: b, key: t}}\n        - {name: authorization, secretRef: {name: b, key: u}}\n        - {name: Idempotency-Key, secretRef: {name: b, key: k}}",
    ));
    for says in [
        "spec.tools[0].headersFrom[1].name: duplicate header",
        "spec.tools[0].headersFrom[2].name: \"Idempotency-Key\" is set by the tool proxy",
    ] {
        assert!(e.iter().any(|e| e.contains(says)), "{says}: {e:#?}");
    }
}

#[test]
fn a_policy_field_with_no_effect_where_it_is_used_is_a_warning() {
    // POLICY sets deadLetter and idempotency; used for a tool they do nothing.
    let wf = edit(
        WORKFLOW,
        "{name: ledger, url: \"http://ledger:8080/\"}",
        "{name: ledger, url: \"http://ledger:8080/\", policyRef: pol}",
    );
    let text = format!("{wf}\n---\n{POLICY}");
    let report = validate_texts(&[("all.yaml".into(), text)], RefMode::Require);
    assert!(report.errors.is_empty(), "{:#?}", report.errors);
    assert_eq!(report.warnings.len(), 1, "{:#?}", report.warnings);
    assert!(
        report.warnings[0].contains(
            "spec.tools[1].policyRef: CircuitPolicy \"pol\" sets deadLetter and idempotency, which has no effect on a tool's calls"
        ),
        "{}",
        report.warnings[0]
    );
}

/// A fan-out and fan-in: `triage` feeds two branches, `decide` joins their outputs.
const FAN_IN: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: fan}
spec:
  queue: {redis: {url: "redis://localhost:6379"}}
  agents:
    - {name: triage, image: i:1, consumes: tickets, produces: [to-lookup, to-fraud]}
    - {name: lookup, image: i:2, consumes: to-lookup, produces: [lookups]}
    - {name: fraud, image: i:3, consumes: to-fraud, produces: [fraud-scores]}
    - {name: decide, image: i:4, consumes: decisions, join: {streams: [lookups, fraud-scores], timeout: 5m}}
"#;

#[test]
fn a_join_is_the_fan_in_and_its_mistakes_are_named() {
    assert!(errors_of(FAN_IN).is_empty(), "{:#?}", errors_of(FAN_IN));
    let report = validate_texts(&[("t.yaml".into(), FAN_IN.into())], RefMode::Warn);
    let Some((_, r4::api::validate::Manifest::Workflow(w))) = report.manifests.first() else {
        panic!("no workflow");
    };
    assert_eq!(
        r4::api::validate::entry_stream(&w.spec),
        Some("tickets"),
        "the join's input is written by the join, not the intake"
    );
    // Without the join, two producers of one stream are refused, and the
    // message says how to fan in.
    let no_join = edit(FAN_IN, "produces: [fraud-scores]}", "produces: [lookups]}");
    let no_join = edit(
        &no_join,
        "consumes: decisions, join: {streams: [lookups, fraud-scores], timeout: 5m}}",
        "consumes: lookups}",
    );
    assert_refused(
        &no_join,
        "spec.agents[2].produces: stream \"lookups\" is produced by agents \"lookup\" and \"fraud\"",
    );
    assert_refused(&no_join, "join: {streams: [...]}");
    // A joined stream nobody produces, or that an agent also reads.
    assert_refused(
        &edit(FAN_IN, "[lookups, fraud-scores]", "[lookups, scores]"),
        "spec.agents[3].join.streams[1]: no agent produces stream \"scores\"",
    );
    assert_refused(
        &edit(
            FAN_IN,
            "    - {name: decide,",
            "    - {name: spy, image: i:5, consumes: lookups}\n    - {name: decide,",
        ),
        "join.streams[0]: stream \"lookups\" is consumed by agent \"spy\"",
    );
    // The joining agent's input is the join's alone.
    assert_refused(
        &edit(
            FAN_IN,
            "produces: [lookups]}",
            "produces: [lookups, decisions]}",
        ),
        "spec.agents[3].consumes: agent \"decide\" joins its input \"decisions\", which agent \"lookup\" also produces",
    );
    assert_refused(
        &edit(FAN_IN, "timeout: 5m", "timeout: 10ms"),
        "spec.agents[3].join.timeout: must be at least 1s",
    );
    assert_refused(
        &edit(FAN_IN, "[lookups, fraud-scores]", "[lookups, lookups]"),
        "spec.agents[3].join.streams[1]: duplicate stream \"lookups\"",
    );
    // A cycle through a join is a cycle.
    assert_refused(
        &edit(
            FAN_IN,
            "join: {streams: [lookups, fraud-scores], timeout: 5m}}",
            "produces: [to-fraud-2], join: {streams: [lookups, fraud-scores], timeout: 5m}}\n    - {name: loop, image: i:5, consumes: to-fraud-2, produces: [to-fraud]}",
        ),
        "form a cycle reachable from \"tickets\"",
    );
}

/// The `simulate:` models: a tail is a fixed `ms` or a `pareto` distribution (exactly one, in
/// the schema's CEL and in `r4 validate`), windows must parse, numbers stay in range.
#[test]
fn simulate_blocks_are_checked_naming_the_field() {
    let sim = |tool: &str, agent: &str| {
        edit(
            &edit(
                WORKFLOW,
                "{name: ledger, url: \"http://ledger:8080/\"}",
                &format!("{{name: ledger, url: \"http://ledger:8080/\", simulate: {tool}}}"),
            ),
            "saga: {compensate: refund-reversal}",
            &format!("saga: {{compensate: refund-reversal}}, simulate: {agent}"),
        )
    };
    let good = sim(
        "{latency: {medianMs: 5, tail: {probability: 0.01, pareto: {scaleMs: 500, shape: 1.5}}}, keySpace: 5000, throttle: {rate: 0.02, retryAfterMs: 500, windows: [{after: 1m, for: 30s}]}}",
        "{latency: {medianMs: 3, tail: {probability: 0.01, ms: 2000}}, calls: [ledger], outages: [{after: 1m, for: 10s}], slowdowns: [{after: 2m, for: 1m, factor: 4}]}",
    );
    let errs = errors_of(&good);
    assert!(errs.is_empty(), "{errs:#?}");
    let yaml = |s: &str| -> serde_json::Value { serde_yaml::from_str(s).unwrap() };
    assert!(cel_errors(&yaml(&good)).is_empty());
    for tail in [
        "{probability: 0.01}",
        "{probability: 0.01, ms: 100, pareto: {scaleMs: 500, shape: 1.5}}",
    ] {
        let doc = sim(
            &format!("{{latency: {{medianMs: 5, tail: {tail}}}}}"),
            "{latency: {medianMs: 3}}",
        );
        assert_refused(
            &doc,
            "spec.tools[1].simulate.latency.tail: exactly one of ms and pareto must be set",
        );
        let cel = cel_errors(&yaml(&doc));
        assert!(
            cel.iter()
                .any(|e| e.message.contains("exactly one of ms and pareto")),
            "{cel:#?}"
        );
    }
    let cases = [
        (
            sim(
                "{latency: {medianMs: 5}}",
                "{latency: {medianMs: 3, tail: {probability: 0.5}}}",
            ),
            "spec.agents[2].simulate.latency.tail: exactly one of ms and pareto",
        ),
        (
            sim(
                "{latency: {medianMs: 5, tail: {probability: 0.1, pareto: {scaleMs: 500, shape: 0}}}}",
                "{latency: {medianMs: 3}}",
            ),
            "spec.tools[1].simulate.latency.tail.pareto.shape",
        ),
        (
            sim(
                "{latency: {medianMs: 5}, keySpace: 0}",
                "{latency: {medianMs: 3}}",
            ),
            "spec.tools[1].simulate.keySpace",
        ),
        (
            sim(
                "{latency: {medianMs: 5}, throttle: {rate: 1.5, retryAfterMs: 500}}",
                "{latency: {medianMs: 3}}",
            ),
            "spec.tools[1].simulate.throttle.rate",
        ),
        (
            sim(
                "{latency: {medianMs: 5}, throttle: {rate: 0.5, retryAfterMs: 500, windows: [{after: 1m, for: 0s}]}}",
                "{latency: {medianMs: 3}}",
            ),
            "spec.tools[1].simulate.throttle.windows[0].for: must be greater than 0",
        ),
        (
            sim(
                "{latency: {medianMs: 5}}",
                "{latency: {medianMs: 3}, outages: [{after: soon, for: 1m}]}",
            ),
            "spec.agents[2].simulate.outages[0].after",
        ),
        (
            sim(
                "{latency: {medianMs: 5}}",
                "{latency: {medianMs: 3}, slowdowns: [{after: 1m, for: 1m, factor: 0.5}]}",
            ),
            "spec.agents[2].simulate.slowdowns[0].factor",
        ),
    ];
    for (doc, expected) in &cases {
        assert_refused(doc, expected);
    }
}
