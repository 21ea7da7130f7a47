//! Fan-out and join on the real engine, on both queue backends: a triage
//! agent feeds two branches, a decision agent joins their outputs. Each
//! joined task reaches the decision once with both parts; a dead branch
//! fails its join at once and a replay of it reopens the join; a join whose
//! branch never arrives times out to the DLQ with what it has and what it
//! misses, and the completed branch's saga compensation starts.

mod engine_common;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine_common::*;
use r4::engine::delivery::RequestKind;
use r4::engine::dlq::{self, Store};
use r4::engine::{DeliveryError, Outputs};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn fan_in(name: &str, timeout: &str) -> r4::engine::WorkflowConfig {
    workflow(
        name,
        &format!(
            r#"    - {{name: triage, image: x, consumes: tickets, produces: [to-lookup, to-fraud]}}
    - {{name: lookup, image: x, consumes: to-lookup, produces: [lookups], saga: {{compensate: forget-statement}}}}
    - {{name: fraud, image: x, consumes: to-fraud, produces: [fraud-scores]}}
    - {{name: decide, image: x, consumes: decisions, produces: [done], join: {{streams: [lookups, fraud-scores], timeout: {timeout}}}}}"#
        ),
        "",
    )
}

async fn joins_every_branch_once(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(fan_in("join-once", "30s"));
    // The fraud branch of t-dead fails for good on its first delivery and
    // succeeds once replayed; t-silent's fraud branch produces nothing.
    let fraud_calls: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let seen = fraud_calls.clone();
    let agent = ScriptedAgent::new(move |req, _| {
        if req.kind != RequestKind::Task {
            return Ok(Outputs::PassThrough);
        }
        match req.step.as_str() {
            "lookup" => Ok(Outputs::All(json!({"statement": req.task_id}))),
            "fraud" => {
                let n = {
                    let mut m = seen.lock().unwrap();
                    let n = m.entry(req.task_id.clone()).or_default();
                    *n += 1;
                    *n
                };
                match req.task_id.as_str() {
                    "t-dead" if n == 1 => Err(DeliveryError::permanent("fraud model refused")),
                    "t-silent" => Ok(Outputs::PerStream(BTreeMap::new())),
                    _ => Ok(Outputs::All(json!({"score": n}))),
                }
            }
            _ => Ok(Outputs::PassThrough),
        }
    });
    let run = start_agents(&cfg, &q, &agent);
    let ids: Vec<String> = (0..30).map(|i| format!("t-{i}")).collect();
    for id in ids.iter().map(String::as_str).chain(["t-dead"]) {
        add_task(&q, &cfg, "tickets", id, json!({"ticket": id})).await;
    }
    let done = cfg.keys.stream("done");
    eventually("30 joined tasks decided", WAIT, || async {
        q.len(&done).await.unwrap() >= 30
    })
    .await;
    eventually("t-dead's branch dead-lettered", WAIT, || async {
        dlq(&q, &cfg).await.iter().any(|r| r.task_id == "t-dead")
    })
    .await;
    // Every joined task reached the decision once, with both parts.
    let decided = agent.calls_for("decide");
    for id in &ids {
        let calls: Vec<_> = decided.iter().filter(|c| &c.task_id == id).collect();
        assert_eq!(calls.len(), 1, "{id} decided {} times", calls.len());
        assert_eq!(
            calls[0].payload,
            json!({"lookups": {"statement": id}, "fraud-scores": {"score": 1}}),
            "{id}"
        );
    }
    // The dead branch failed its join at once: no decision, one record,
    // naming the join it failed.
    let recs = dlq(&q, &cfg).await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    assert_eq!(recs[0].reason, dlq::reason::PERMANENT);
    assert_eq!(recs[0].step, "fraud");
    assert_eq!(recs[0].joins.len(), 1);
    assert_eq!(recs[0].joins[0].agent, "decide");
    assert!(decided.iter().all(|c| c.task_id != "t-dead"));
    assert!(
        q.due(&cfg.keys.join_due("decide"), u64::MAX, 10)
            .await
            .unwrap()
            .is_empty(),
        "a failed join is not waiting for a timeout"
    );
    // Replaying the dead branch reopens the join, which completes.
    let moved = dlq::replay(q.as_ref(), &cfg.keys, Store::Dlq, &recs[0], None)
        .await
        .unwrap();
    assert!(moved.is_some());
    eventually("t-dead decided after the replay", WAIT, || async {
        agent
            .calls_for("decide")
            .iter()
            .any(|c| c.task_id == "t-dead")
    })
    .await;
    let last = agent
        .calls_for("decide")
        .into_iter()
        .filter(|c| c.task_id == "t-dead")
        .collect::<Vec<_>>();
    assert_eq!(last.len(), 1);
    assert_eq!(
        last[0].payload,
        json!({"lookups": {"statement": "t-dead"}, "fraud-scores": {"score": 2}})
    );
    assert_eq!(q.len(&done).await.unwrap(), 31);
    run.stop().await;
}

async fn a_join_missing_a_branch_times_out(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(fan_in("join-timeout", "1s"));
    let silent = Arc::new(AtomicU64::new(0));
    let s2 = silent.clone();
    let agent = ScriptedAgent::new(move |req, _| match (&req.kind, req.step.as_str()) {
        (RequestKind::Task, "lookup") => Ok(Outputs::All(json!({"statement": 7}))),
        (RequestKind::Task, "fraud") => {
            s2.fetch_add(1, Ordering::SeqCst);
            Ok(Outputs::PerStream(BTreeMap::new()))
        }
        _ => Ok(Outputs::PassThrough),
    });
    let run = start_agents(&cfg, &q, &agent);
    add_task(&q, &cfg, "tickets", "t-silent", json!({})).await;
    eventually("the join timed out", WAIT, || async {
        dlq(&q, &cfg).await.iter().any(|r| r.task_id == "t-silent")
    })
    .await;
    let recs = dlq(&q, &cfg).await;
    assert_eq!(recs.len(), 1, "{recs:#?}");
    let r = &recs[0];
    assert_eq!(r.reason, dlq::reason::JOIN_TIMEOUT);
    assert_eq!(r.step, "decide");
    assert!(
        r.error.contains("has [lookups]") && r.error.contains("misses [fraud-scores]"),
        "{}",
        r.error
    );
    assert_eq!(
        r.original,
        vec![(
            "lookups".to_string(),
            bytes::Bytes::from(r#"{"statement":7}"#)
        )]
    );
    assert!(!r.replayable);
    // The completed branch is compensated.
    eventually("lookup compensated", WAIT, || async {
        agent
            .calls_for("lookup")
            .iter()
            .any(|c| c.kind == RequestKind::Compensate && c.task_id == "t-silent")
    })
    .await;
    // A join that timed out is not replayed (its missing branch is what to
    // replay), and it is dead-lettered once however many sweeps pass.
    let err = dlq::replay(q.as_ref(), &cfg.keys, Store::Dlq, r, None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("join that timed out"), "{err}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(dlq(&q, &cfg).await.len(), 1);
    assert!(agent.calls_for("decide").is_empty());
    assert_eq!(silent.load(Ordering::SeqCst), 1);
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_joins_every_branch_once() {
    joins_every_branch_once(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_joins_every_branch_once() {
    joins_every_branch_once(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_join_missing_a_branch_times_out() {
    a_join_missing_a_branch_times_out(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_a_join_missing_a_branch_times_out() {
    a_join_missing_a_branch_times_out(true).await;
}
