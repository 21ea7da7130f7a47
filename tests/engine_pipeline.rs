//! The agent role end to end on both backends: the happy path through three
//! agents, retries, the DLQ, malformed entries, and a dead consumer's
//! entries being claimed.

mod engine_common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine_common::*;
use r4::engine::delivery::Outputs;
use r4::engine::task::Task;
use r4::engine::{DeliveryError, Intake};
use r4::queue::fields;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

async fn happy_path(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(three_agents("happy"));
    // b transforms its input; a and c pass it on.
    let agent = ScriptedAgent::new(|req, _| {
        if req.step == "b" {
            let n = req.payload["n"].as_i64().unwrap_or(-1);
            Ok(Outputs::All(json!({"n": n, "doubled": n * 2})))
        } else {
            Ok(Outputs::PassThrough)
        }
    });
    let run = start_agents(&cfg, &q, &agent);
    let intake = Intake::new(cfg.clone(), q.clone(), "intake-1");
    let mut ids = Vec::new();
    for n in 0..60 {
        ids.push(intake.submit(json!({"n": n}), None, None).await.unwrap().0);
    }
    let done = cfg.keys.stream("done");
    eventually("60 tasks done", WAIT, || async {
        q.len(&done).await.unwrap() == 60
    })
    .await;
    let out = q.range(&done, "-", "+", 0).await.unwrap();
    let mut seen: Vec<String> = Vec::new();
    for e in &out {
        let t = Task::decode(&e.fields, 1 << 20).unwrap();
        let n = t.payload["n"].as_i64().unwrap();
        assert_eq!(
            t.payload["doubled"],
            json!(n * 2),
            "b's output reached c and done"
        );
        assert!(t.traceparent.is_some());
        seen.push(t.task_id);
    }
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids, "every task exactly once");
    for step in ["a", "b", "c"] {
        let calls = agent.calls_for(step);
        assert_eq!(calls.len(), 60, "one delivery per task at {step}");
        assert!(
            calls
                .iter()
                .all(|c| c.attempt == 1 && c.idempotency_key == format!("{}:{step}", c.task_id))
        );
        assert!(calls.iter().all(|c| c.traceparent.starts_with("00-")));
    }
    assert!(dlq(&q, &cfg).await.is_empty());
    let st = intake.status(&ids[0]).await.unwrap();
    assert_eq!(st["state"], "completed", "{st}");
    // Each step is counted just after its completion is visible in Redis.
    eventually("180 steps counted", WAIT, || async {
        run.completed() == 180
    })
    .await;
    run.stop().await;
}

#[tokio::test]
async fn happy_path_through_three_agents_memory() {
    happy_path(false).await;
}

#[tokio::test]
async fn happy_path_through_three_agents_redis() {
    happy_path(true).await;
}

async fn retry_then_success(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(workflow(
        "retry",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    // Fails twice (5xx-like), then succeeds: within maxDeliveries 3.
    let agent = ScriptedAgent::new(|_, n| {
        if n < 2 {
            Err(DeliveryError::retryable(format!(
                "agent answered 503: try {n}"
            )))
        } else {
            Ok(Outputs::PassThrough)
        }
    });
    let run = start_agents(&cfg, &q, &agent);
    add_task(&q, &cfg, "in", "t-retry", json!({})).await;
    let done = cfg.keys.stream("done");
    eventually("task done", WAIT, || async {
        q.len(&done).await.unwrap() == 1
    })
    .await;
    let calls = agent.calls();
    assert_eq!(
        calls.iter().map(|c| c.attempt).collect::<Vec<_>>(),
        [1, 2, 3],
        "delivery count grows per retry"
    );
    // The step is counted just after its completion is visible in Redis.
    eventually("completion counted", WAIT, || async {
        run.stats[0].counters().completed == 1
    })
    .await;
    let c = run.stats[0].counters();
    assert_eq!((c.retries, c.completed, c.dead_lettered), (2, 1, 0));
    assert!(dlq(&q, &cfg).await.is_empty());
    // The attempt history of a completed entry is cleaned up.
    assert!(
        q.scan_prefix(&format!("{}:attempts:", cfg.keys.prefix()))
            .await
            .unwrap()
            .is_empty()
    );
    run.stop().await;
}

#[tokio::test]
async fn retry_then_success_memory() {
    retry_then_success(false).await;
}

#[tokio::test]
async fn retry_then_success_redis() {
    retry_then_success(true).await;
}

#[tokio::test]
async fn dead_letter_after_max_deliveries_with_history() {
    let (_b, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "dlq",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    let agent = ScriptedAgent::new(|_, n| {
        Err(DeliveryError::retryable(format!("boom {n}")).with_tool("bank-api"))
    });
    let run = start_agents(&cfg, &q, &agent);
    add_task(&q, &cfg, "in", "t-dead", json!({"keep": "me"})).await;
    eventually("dead-lettered", WAIT, || async {
        q.len(&cfg.keys.dlq()).await.unwrap() == 1
    })
    .await;
    let rec = &dlq(&q, &cfg).await[0];
    assert_eq!(rec.reason, "max_deliveries");
    assert_eq!(rec.task_id, "t-dead");
    assert_eq!((rec.step.as_str(), rec.source.as_str()), ("a", "in"));
    assert_eq!(rec.deliveries, 3);
    assert!(rec.replayable);
    assert_eq!(rec.tool.as_deref(), Some("bank-api"));
    assert!(rec.error.contains("boom 2"), "{}", rec.error);
    assert_eq!(
        rec.history.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        rec.history
            .iter()
            .all(|a| a.kind == "retryable" && a.tool.as_deref() == Some("bank-api"))
    );
    let payload = rec.original.iter().find(|(k, _)| k == "payload").unwrap();
    assert_eq!(payload.1, Bytes::from(r#"{"keep":"me"}"#));
    assert_eq!(agent.calls().len(), 3);
    assert_eq!(q.len(&cfg.keys.stream("done")).await.unwrap(), 0);
    let p = q
        .pending_summary(&cfg.keys.stream("in"), "a")
        .await
        .unwrap();
    assert_eq!(p.count, 0, "dead-lettered entry is acked");
    run.stop().await;
}

#[tokio::test]
async fn permanent_failure_goes_to_dlq_at_once() {
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(workflow(
        "perm",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    let agent =
        ScriptedAgent::new(|_, _| Err(DeliveryError::permanent("agent answered 422: bad input")));
    let run = start_agents(&cfg, &q, &agent);
    add_task(&q, &cfg, "in", "t-perm", json!({})).await;
    eventually("dead-lettered", WAIT, || async {
        q.len(&cfg.keys.dlq()).await.unwrap() == 1
    })
    .await;
    let rec = &dlq(&q, &cfg).await[0];
    assert_eq!(
        (rec.reason.as_str(), rec.replayable, rec.history.len()),
        ("permanent", false, 1)
    );
    assert_eq!(agent.calls().len(), 1);
    run.stop().await;
}

async fn malformed(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(workflow(
        "bad",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "  intake: {enabled: true, maxPayloadBytes: 64}",
    ));
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    let s = cfg.keys.stream("in");
    q.add(
        &s,
        fields([("task_id", "t1"), ("payload", "{not json")]),
        None,
    )
    .await
    .unwrap();
    q.add(&s, fields([("payload", "{}")]), None).await.unwrap();
    let big = format!("\"{}\"", "x".repeat(100));
    q.add(
        &s,
        vec![
            ("task_id".to_string(), Bytes::from("t3")),
            ("payload".to_string(), Bytes::from(big.clone())),
        ],
        None,
    )
    .await
    .unwrap();
    q.add(
        &s,
        fields([
            ("task_id", "t4"),
            ("payload", "{}"),
            ("type", "launch-missiles"),
        ]),
        None,
    )
    .await
    .unwrap();
    q.add(
        &s,
        fields([("task_id", "t5"), ("payload", "{}"), ("step", "nobody")]),
        None,
    )
    .await
    .unwrap();
    q.add(
        &s,
        vec![
            ("task_id".into(), Bytes::from_static(&[0xc3, 0x28])),
            ("payload".into(), Bytes::from("{}")),
        ],
        None,
    )
    .await
    .unwrap();
    add_task(&q, &cfg, "in", "good", json!({})).await;
    eventually("6 bad entries in the DLQ", WAIT, || async {
        q.len(&cfg.keys.dlq()).await.unwrap() == 6
    })
    .await;
    eventually("the good one done", WAIT, || async {
        q.len(&cfg.keys.stream("done")).await.unwrap() == 1
    })
    .await;
    // Handled concurrently: order the records by their source entry.
    let mut recs = dlq(&q, &cfg).await;
    recs.sort_by_key(|r| r4::queue::EntryId::parse(&r.entry_id).unwrap());
    let reasons: Vec<(String, String)> = recs
        .iter()
        .map(|r| (r.reason.clone(), r.error.clone()))
        .collect();
    let want = [
        "malformed",
        "malformed",
        "oversized",
        "unknown_type",
        "unknown_step",
        "malformed",
    ];
    assert_eq!(
        reasons.iter().map(|r| r.0.as_str()).collect::<Vec<_>>(),
        want,
        "{reasons:?}"
    );
    assert!(reasons[0].1.contains("not JSON"), "{reasons:?}");
    assert!(reasons[1].1.contains("missing task_id"));
    assert!(reasons[2].1.contains("limit 64"));
    assert!(reasons[4].1.contains("nobody"));
    assert_eq!(
        agent.calls().len(),
        1,
        "only the good task reached the agent"
    );
    // The corrupted bytes are kept as they came.
    let raw = recs[5].original.clone();
    assert_eq!(raw[0].1, Bytes::from_static(&[0xc3, 0x28]));
    run.stop().await;
}

#[tokio::test]
async fn malformed_oversized_unknown_go_to_dlq_memory() {
    malformed(false).await;
}

#[tokio::test]
async fn malformed_oversized_unknown_go_to_dlq_redis() {
    malformed(true).await;
}

#[tokio::test]
async fn dead_consumers_pending_entries_are_claimed() {
    let (_b, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "claim",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    let s = cfg.keys.stream("in");
    q.ensure_group(&s, "a").await.unwrap();
    for i in 0..5 {
        add_task(&q, &cfg, "in", &format!("t{i}"), json!({})).await;
    }
    // A consumer takes all five and dies without acking.
    assert_eq!(
        q.read_group(&s, "a", "dead-engine", 10, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        5
    );
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    eventually("claimed and done", WAIT, || async {
        q.len(&cfg.keys.stream("done")).await.unwrap() == 5
    })
    .await;
    let calls = agent.calls();
    assert_eq!(calls.len(), 5);
    assert!(
        calls.iter().all(|c| c.attempt == 2),
        "second delivery after the claim"
    );
    let p = q.pending_summary(&s, "a").await.unwrap();
    assert_eq!(p.count, 0);
    run.stop().await;
}

#[tokio::test]
async fn redelivered_completed_step_is_not_redone() {
    // The step completed (inbox key written) but the engine's entry is
    // delivered again (e.g. claimed): acked without a second delivery.
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(workflow(
        "dup",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    let s = cfg.keys.stream("in");
    q.ensure_group(&s, "a").await.unwrap();
    add_task(&q, &cfg, "in", "t-dup", json!({})).await;
    let e = q
        .read_group(&s, "a", "old", 1, Duration::ZERO)
        .await
        .unwrap()
        .remove(0);
    q.set(&cfg.keys.inbox("t-dup", "a"), Bytes::from("x"), None)
        .await
        .unwrap();
    let _ = e;
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    eventually("acked", WAIT, || async {
        q.pending_summary(&s, "a").await.unwrap().count == 0
    })
    .await;
    assert!(agent.calls().is_empty());
    assert_eq!(q.len(&cfg.keys.stream("done")).await.unwrap(), 0);
    eventually("the duplicate counted", WAIT, || async {
        run.stats[0].counters().duplicates == 1
    })
    .await;
    run.stop().await;
}
