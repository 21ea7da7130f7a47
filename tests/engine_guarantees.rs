//! The engine's two central promises tried the way they broke before:
//! nothing accepted is lost (a backlog past `queue.maxLen`, an agent
//! container that is down, a dead engine's pending entries behind live
//! ones, an oversized output, a replay on a shared stream), each against a
//! real redis-server where the behaviour depends on Redis.

mod engine_common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine_common::*;
use r4::engine::delivery::Outputs;
use r4::engine::dlq::{self, Store};
use r4::engine::{AgentRole, DeliveryError, HttpDelivery, Intake};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

const WAIT: Duration = Duration::from_secs(60);

/// 5,000 tasks into a workflow with `maxLen: 1000` while no agent runs:
/// every task is either accepted (and completed once agents start) or
/// refused with 429 + Retry-After at submission. None is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_past_max_len_is_refused_never_lost() {
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "backlog",
        "    - {name: a, image: x, consumes: in, produces: [out]}\n    - {name: b, image: x, consumes: out, produces: [done]}",
        "  intake: {enabled: true}",
    ));
    let cfg = Arc::new(r4::engine::WorkflowConfig {
        max_len: Some(1000),
        ..(*cfg).clone()
    });
    let intake = Intake::new(cfg.clone(), q.clone(), "intake-1");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/tasks", listener.local_addr().unwrap());
    let (stop, rx) = watch::channel(false);
    let server = tokio::spawn(r4::engine::http::serve(listener, intake.router(), rx));
    let http = reqwest::Client::new();
    const N: usize = 5000;
    let submit = |keys: Vec<usize>| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            let mut refused = Vec::new();
            let mut accepted = Vec::new();
            for n in keys {
                let r = http
                    .post(&url)
                    .header("Idempotency-Key", format!("task-{n}"))
                    .body(json!({"n": n}).to_string())
                    .send()
                    .await
                    .unwrap();
                match r.status().as_u16() {
                    202 => {
                        let v: Value = r.json().await.unwrap();
                        accepted.push((n, v["task_id"].as_str().unwrap().to_owned()));
                    }
                    429 => {
                        assert_eq!(r.headers()["retry-after"], "1");
                        let v: Value = r.json().await.unwrap();
                        let msg = v["error"].as_str().unwrap();
                        assert!(msg.starts_with("queue.maxLen: "), "{msg}");
                        refused.push(n);
                    }
                    s => panic!("unexpected status {s}"),
                }
            }
            (accepted, refused)
        }
    };
    // Four clients at once, no agent running.
    let mut handles = Vec::new();
    for c in 0..4 {
        handles.push(tokio::spawn(submit((c..N).step_by(4).collect())));
    }
    let mut accepted: BTreeMap<usize, String> = BTreeMap::new();
    let mut refused = Vec::new();
    for h in handles {
        let (a, r) = h.await.unwrap();
        accepted.extend(a);
        refused.extend(r);
    }
    assert_eq!(accepted.len() + refused.len(), N);
    assert_eq!(accepted.len(), 1000, "exactly maxLen accepted");
    let input = cfg.keys.stream("in");
    assert_eq!(q.len(&input).await.unwrap(), 1000, "nothing trimmed");
    // Agents start: every accepted task completes.
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    let done_tasks = |agent: &ScriptedAgent| -> BTreeSet<String> {
        agent
            .calls_for("b")
            .into_iter()
            .map(|c| c.task_id)
            .collect()
    };
    eventually("accepted tasks complete", WAIT, || async {
        done_tasks(&agent).len() >= 1000
    })
    .await;
    // The refused ones are resubmitted while agents run (a client honouring
    // Retry-After) until all are in.
    let mut left = refused;
    let deadline = Instant::now() + WAIT;
    while !left.is_empty() {
        assert!(Instant::now() < deadline, "{} never accepted", left.len());
        let (a, r) = submit(left).await;
        accepted.extend(a);
        left = r;
        if !left.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    eventually("every task completes", WAIT, || async {
        done_tasks(&agent).len() >= N
    })
    .await;
    run.stop().await;
    let done = done_tasks(&agent);
    assert_eq!(done.len(), N);
    assert!(accepted.values().all(|id| done.contains(id)), "none lost");
    assert!(dlq(&q, &cfg).await.is_empty());
    let _ = stop.send(true);
    let _ = server.await;
}

/// An agent container that cannot be reached for 10 s (restarting) costs
/// no task a delivery: reads pause, `/readyz` says not ready, the held
/// entries keep their delivery count of 1, and every task is delivered
/// once the agent answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_down_for_ten_seconds_costs_no_delivery() {
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "agent-down",
        "    - {name: a, image: x, consumes: in, produces: [done], concurrency: 4}",
        "",
    ));
    // A port nothing listens on yet.
    let port = free_port();
    let delivery = HttpDelivery::new(format!("http://127.0.0.1:{port}/")).unwrap();
    let role = AgentRole::new(
        cfg.clone(),
        "a",
        q.clone(),
        Arc::new(delivery),
        "agent-down-1",
    )
    .unwrap()
    .with_options(fast_opts());
    let stats = role.stats();
    let (tx, rx) = watch::channel(false);
    let h = tokio::spawn(async move { role.run(rx).await.unwrap() });
    for i in 0..30 {
        add_task(&q, &cfg, "in", &format!("t{i}"), json!({"i": i})).await;
    }
    eventually("the agent is marked down", WAIT, || async {
        stats.agent_down()
    })
    .await;
    assert!(!stats.ready(), "/readyz fails while the agent is down");
    // Down for 10 s: ten visibility timeouts of this workflow.
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(dlq(&q, &cfg).await.is_empty());
    let pending = q
        .pending_summary(&cfg.keys.stream("in"), "a")
        .await
        .unwrap();
    assert!(pending.count <= 8, "reads paused: {} held", pending.count);
    // The agent comes up and records what it is asked.
    let seen: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let s2 = seen.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::post(move |body: axum::Json<Value>| {
            let s2 = s2.clone();
            async move {
                let id = body["task_id"].as_str().unwrap_or("").to_owned();
                let attempt = body["attempt"].as_u64().unwrap_or(0);
                s2.lock().unwrap().push((id, attempt));
                axum::Json(json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let agent_server = tokio::spawn(async move { axum::serve(listener, app).await });
    eventually("every task delivered", WAIT, || async {
        q.len(&cfg.keys.stream("done")).await.unwrap() == 30
    })
    .await;
    assert!(stats.ready(), "ready again");
    let seen = seen.lock().unwrap().clone();
    let ids: BTreeSet<&str> = seen.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 30);
    assert_eq!(seen.len(), 30, "each task delivered once");
    assert!(
        seen.iter().all(|(_, attempt)| *attempt == 1),
        "no delivery was spent while the agent was down: {seen:?}"
    );
    assert!(dlq(&q, &cfg).await.is_empty());
    let _ = tx.send(true);
    let _ = h.await;
    agent_server.abort();
}

/// A dead engine's 500 pending entries sit behind 700 entries a live
/// engine keeps working on: a new engine reclaims every one of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engines_entries_behind_live_ones_are_reclaimed() {
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "reclaim",
        "    - {name: a, image: x, consumes: in, produces: [done], concurrency: 8}",
        "",
    ));
    let input = cfg.keys.stream("in");
    q.ensure_group(&input, "a").await.unwrap();
    for i in 0..1200 {
        add_task(&q, &cfg, "in", &format!("t{i}"), json!({"i": i})).await;
    }
    let live: Vec<String> = q
        .read_group(&input, "a", "live", 700, Duration::ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let dead = q
        .read_group(&input, "a", "dead", 500, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((live.len(), dead.len()), (700, 500));
    // The live engine keeps its entries fresh.
    let (q2, input2, live2) = (q.clone(), input.clone(), live.clone());
    let keeper = tokio::spawn(async move {
        loop {
            let _ = q2.touch(&input2, "a", "live", &live2).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    let dead_ids: BTreeSet<String> = dead
        .iter()
        .map(|e| String::from_utf8_lossy(e.field("task_id").unwrap()).into_owned())
        .collect();
    eventually("all 500 reclaimed", WAIT, || async {
        let done: BTreeSet<String> = agent.calls().into_iter().map(|c| c.task_id).collect();
        dead_ids.iter().all(|id| done.contains(id))
    })
    .await;
    keeper.abort();
    let done: BTreeSet<String> = agent.calls().into_iter().map(|c| c.task_id).collect();
    assert!(
        live.len() == 700 && done.len() == 500,
        "only the dead engine's entries were taken: {}",
        done.len()
    );
    run.stop().await;
}

/// An output larger than the payload limit fails the producing step for
/// good (reason `oversized`); nothing reaches the next agent.
#[tokio::test]
async fn an_oversized_output_fails_the_producing_step() {
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(workflow(
        "oversized",
        "    - {name: a, image: x, consumes: in, produces: [ab]}\n    - {name: b, image: x, consumes: ab, produces: [done]}",
        "  intake: {enabled: true, maxPayloadBytes: 1024}",
    ));
    let agent = ScriptedAgent::new(|req, _| {
        if req.step == "a" {
            Ok(Outputs::All(json!({"blob": "x".repeat(5000)})))
        } else {
            Ok(Outputs::PassThrough)
        }
    });
    let run = start_agents(&cfg, &q, &agent);
    add_task(&q, &cfg, "in", "t-big", json!({"n": 1})).await;
    eventually("dead-lettered", WAIT, || async {
        q.len(&cfg.keys.dlq()).await.unwrap() == 1
    })
    .await;
    run.stop().await;
    let rec = &dlq(&q, &cfg).await[0];
    assert_eq!(
        (rec.reason.as_str(), rec.step.as_str(), rec.task_id.as_str()),
        ("oversized", "a", "t-big")
    );
    assert!(!rec.replayable);
    assert!(
        rec.error.contains("intake.maxPayloadBytes"),
        "{}",
        rec.error
    );
    assert_eq!(q.len(&cfg.keys.stream("ab")).await.unwrap(), 0);
    assert!(agent.calls_for("b").is_empty());
    assert_eq!(agent.calls_for("a").len(), 1, "permanent: not retried");
}

/// A record of an entry that could not be decoded keeps the raw task id;
/// the task's DLQ marker is set and cleared with the moves; a replay goes
/// to the step that failed, not to every agent reading the stream.
#[tokio::test]
async fn dlq_records_keep_ids_and_replay_targets_the_failed_step() {
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(workflow(
        "shared",
        "    - {name: a, image: x, consumes: in, produces: [done-a]}\n    - {name: b, image: x, consumes: in, produces: [done-b]}",
        "",
    ));
    let b_ok = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = b_ok.clone();
    let agent = ScriptedAgent::new(move |req, _| {
        if req.step == "b" && !ok.load(std::sync::atomic::Ordering::SeqCst) {
            Err(DeliveryError::permanent("b refuses"))
        } else {
            Ok(Outputs::PassThrough)
        }
    });
    let run = start_agents(&cfg, &q, &agent);
    // A malformed entry (payload not JSON) that carries a task id.
    q.add(
        &cfg.keys.stream("in"),
        r4::queue::fields([("task_id", "t-raw"), ("payload", "{not json")]),
        None,
    )
    .await
    .unwrap();
    add_task(&q, &cfg, "in", "t-shared", json!({"n": 1})).await;
    eventually("b dead-letters t-shared", WAIT, || async {
        dlq(&q, &cfg).await.iter().any(|r| r.task_id == "t-shared")
    })
    .await;
    let recs = dlq(&q, &cfg).await;
    let raw: Vec<_> = recs.iter().filter(|r| r.task_id == "t-raw").collect();
    assert_eq!(
        raw.len(),
        2,
        "both groups record the malformed entry by its id"
    );
    assert!(raw.iter().all(|r| r.reason == "malformed"));
    let marker = cfg.keys.task_dlq("t-shared");
    assert!(q.get(&marker).await.unwrap().is_some());
    let rec = recs.iter().find(|r| r.task_id == "t-shared").unwrap();
    assert_eq!(rec.step, "b");
    let a_calls_before = agent
        .calls_for("a")
        .iter()
        .filter(|c| c.task_id == "t-shared")
        .count();
    assert_eq!(a_calls_before, 1);
    b_ok.store(true, std::sync::atomic::Ordering::SeqCst);
    let moved = dlq::replay(q.as_ref(), &cfg.keys, Store::Dlq, rec, None)
        .await
        .unwrap();
    assert!(moved.is_some());
    assert!(q.get(&marker).await.unwrap().is_none(), "marker cleared");
    eventually("b completes the replay", WAIT, || async {
        q.len(&cfg.keys.stream("done-b")).await.unwrap() == 1
    })
    .await;
    run.stop().await;
    let a_calls = agent
        .calls_for("a")
        .iter()
        .filter(|c| c.task_id == "t-shared")
        .count();
    assert_eq!(a_calls, 1, "the replay went to b only");
    assert_eq!(q.len(&cfg.keys.stream("done-a")).await.unwrap(), 1);
}

/// `r4 dlq … --poison` lists, shows, replays and purges the poison stream
/// as the real binary does for the DLQ.
#[tokio::test]
async fn dlq_commands_act_on_the_poison_stream() {
    let server = r4::testutil::RedisServer::start().await.unwrap();
    let url = server.url();
    let q = r4::queue::redis::RedisQueue::connect(&url).await.unwrap();
    let keys = r4::queue::Keys::new("team", "wf");
    let rec = |task: &str| r4::engine::dlq::DlqRecord {
        id: String::new(),
        reason: "max_deliveries".into(),
        error: "503".into(),
        task_id: task.into(),
        step: "a".into(),
        source: "in".into(),
        entry_id: "1-0".into(),
        deliveries: 5,
        replays: 3,
        replayable: true,
        tool: None,
        dead_at_ms: r4::engine::task::now_ms(),
        engine: "e".into(),
        history: vec![],
        joins: Vec::new(),
        original: vec![
            ("task_id".into(), task.to_owned().into()),
            ("payload".into(), "{}".into()),
        ],
    };
    use r4::queue::Queue;
    let p1 = q
        .add(&keys.poison(), rec("p1").encode(), None)
        .await
        .unwrap();
    q.add(&keys.poison(), rec("p2").encode(), None)
        .await
        .unwrap();
    q.add(&keys.dlq(), rec("d1").encode(), None).await.unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_r4"))
            .args(args)
            .args(["--redis", url.as_str(), "--namespace", "team"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let t = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.success(), t)
    };
    let (ok, t) = run(&["dlq", "list", "wf", "--poison"]);
    assert!(
        ok && t.contains("p1") && t.contains("p2") && !t.contains("d1"),
        "{t}"
    );
    let (ok, t) = run(&["dlq", "show", "wf", &p1, "--poison"]);
    assert!(ok && t.contains("\"p1\""), "{t}");
    // Without --poison the same id names a DLQ entry, if any (ids are per stream).
    let (_, t) = run(&["dlq", "show", "wf", &p1]);
    assert!(!t.contains("\"p1\""), "{t}");
    let (ok, t) = run(&["dlq", "show", "wf", "9-9", "--poison"]);
    assert!(!ok && t.contains("no poison entry 9-9"), "{t}");
    let (ok, t) = run(&["dlq", "replay", "wf", "--id", &p1, "--poison"]);
    assert!(ok, "{t}");
    let back = q.range(&keys.stream("in"), "-", "+", 0).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].field("step").unwrap().as_ref(), b"a");
    let (ok, t) = run(&["dlq", "purge", "wf", "--poison", "--yes"]);
    assert!(ok && t.contains("purged 1"), "{t}");
    assert_eq!(q.len(&keys.poison()).await.unwrap(), 0);
    assert_eq!(q.len(&keys.dlq()).await.unwrap(), 1, "the DLQ is untouched");
}

/// A repair pass reads only the records that are due, not the whole DLQ:
/// counted by Redis itself.
#[tokio::test]
async fn a_repair_pass_reads_only_due_records() {
    let (redis, q) = queue(true).await;
    let Backend::Redis(server) = &redis else {
        unreachable!()
    };
    let cfg = Arc::new(workflow(
        "due",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    // 2,000 records nobody schedules (permanent failures) and one that is due.
    for i in 0..2000 {
        let f = r4::queue::fields([
            ("reason", "permanent".to_owned()),
            ("task_id", format!("p{i}")),
        ]);
        q.add(&cfg.keys.dlq(), f, None).await.unwrap();
    }
    let due = r4::queue::fields([
        ("reason", "max_deliveries"),
        ("task_id", "t-due"),
        ("step", "a"),
        ("source", "in"),
        ("replayable", "1"),
        ("f:task_id", "t-due"),
        ("f:payload", "{}"),
    ]);
    let id = q.add(&cfg.keys.dlq(), due, None).await.unwrap();
    q.schedule(&cfg.keys.dlq_due(), &id, 1).await.unwrap();
    let xrange_calls = || async {
        let mut c = ::redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .find(|l| l.starts_with("cmdstat_xrange:"))
            .and_then(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    let before = xrange_calls().await;
    let role = r4::engine::RepairRole::new(cfg.clone(), q.clone(), "repair-due");
    let report = role.pass().await.unwrap();
    let reads = xrange_calls().await - before;
    assert_eq!(report.replayed, 1, "{report:?}");
    // One XRANGE for the due record (plus at most the transfer's own check,
    // which runs inside its script and is not counted as a command call).
    assert!(reads <= 2, "{reads} XRANGE calls for one due record");
    assert_eq!(q.len(&cfg.keys.stream("in")).await.unwrap(), 1);
    assert_eq!(q.len(&cfg.keys.dlq()).await.unwrap(), 2000);
}

/// Entries waiting out a retry backoff keep their place among the entries
/// an engine holds: with the agent failing every task, the engine never
/// holds more than twice its concurrency (it used to release its slots on
/// backoff and read on, spending every task's deliveries in a second).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_in_backoff_keep_their_slot() {
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "backoff-held",
        "    - {name: a, image: x, consumes: in, produces: [done], concurrency: 2}",
        "",
    ));
    let agent = ScriptedAgent::new(|_, _| Err(DeliveryError::retryable("busy")));
    q.ensure_group(&cfg.keys.stream("in"), "a").await.unwrap();
    for i in 0..40 {
        add_task(&q, &cfg, "in", &format!("t{i}"), json!({"i": i})).await;
    }
    let run = start_agents(&cfg, &q, &agent);
    let input = cfg.keys.stream("in");
    let until = Instant::now() + Duration::from_secs(2);
    let mut most = 0;
    while Instant::now() < until {
        let p = q.pending_summary(&input, "a").await.unwrap();
        most = most.max(p.count);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    run.stop().await;
    assert!(most <= 4, "held {most} entries with concurrency 2");
    assert!(most >= 1, "the engine did work");
}

/// A task handler that panics is logged and counted; the engine stops
/// being ready; the entry stays pending and another engine completes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_makes_the_engine_unready_and_loses_nothing() {
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "panics",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    struct Panics;
    impl r4::engine::Delivery for Panics {
        fn deliver<'a>(
            &'a self,
            _req: &'a r4::engine::DeliveryRequest,
        ) -> r4::engine::delivery::DeliveryFuture<'a> {
            Box::pin(async { panic!("agent client bug") })
        }
    }
    let role = AgentRole::new(cfg.clone(), "a", q.clone(), Arc::new(Panics), "panicky")
        .unwrap()
        .with_options(fast_opts());
    let stats = role.stats();
    let (tx, rx) = watch::channel(false);
    let h = tokio::spawn(async move { role.run(rx).await.unwrap() });
    add_task(&q, &cfg, "in", "t-panic", json!({})).await;
    eventually("the panic is counted", WAIT, || async {
        stats.panics() >= 1
    })
    .await;
    assert!(!stats.ready(), "/readyz fails after a panic");
    let _ = tx.send(true);
    let _ = h.await;
    // A healthy engine takes the entry over after the visibility timeout.
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    eventually("completed by another engine", WAIT, || async {
        q.len(&cfg.keys.stream("done")).await.unwrap() == 1
    })
    .await;
    run.stop().await;
    assert!(dlq(&q, &cfg).await.is_empty());
}

/// The consumer of an engine that is gone (nothing pending, idle for four
/// visibility timeouts) is removed from the group by a live engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_of_gone_engines_are_removed() {
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "reap",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    let input = cfg.keys.stream("in");
    q.ensure_group(&input, "a").await.unwrap();
    // An engine that did its work and went away.
    add_task(&q, &cfg, "in", "t-before", json!({})).await;
    let got = q
        .read_group(&input, "a", "gone-1", 1, Duration::ZERO)
        .await
        .unwrap();
    q.ack(&input, "a", &[got[0].id.clone()]).await.unwrap();
    let names = |q: Arc<dyn r4::queue::Queue>, input: String| async move {
        q.consumers(&input, "a")
            .await
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
    };
    assert!(
        names(q.clone(), input.clone())
            .await
            .contains(&"gone-1".to_owned())
    );
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    eventually("the gone engine's consumer is removed", WAIT, || {
        let (q, input) = (q.clone(), input.clone());
        async move { !names(q, input).await.contains(&"gone-1".to_owned()) }
    })
    .await;
    // The live engine is not disturbed: it still takes work.
    add_task(&q, &cfg, "in", "t-after", json!({})).await;
    eventually("the live engine completes a task", WAIT, || async {
        agent.calls().iter().any(|c| c.task_id == "t-after")
    })
    .await;
    run.stop().await;
}

/// Every key the engine writes is one `Keys` builds: after a run through
/// completions, a saga, dead letters, replays, poison, kill switches, an
/// intake with keys and published stats, every key in Redis belongs to the
/// workflow and to one kind of `Keys` (matched by what `Keys` itself
/// builds, not by a hand-written list of names).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_written_comes_from_keys() {
    let (redis, q) = queue(true).await;
    let Backend::Redis(server) = &redis else {
        unreachable!()
    };
    let cfg = Arc::new(workflow(
        "all-keys",
        "    - {name: a, image: x, consumes: in, produces: [ab], saga: {compensate: undo-a}}\n    - {name: b, image: x, consumes: ab, produces: [done]}",
        "  intake: {enabled: true}",
    ));
    let agent = ScriptedAgent::new(|req, _| match (req.step.as_str(), req.task_id.as_str()) {
        ("b", "t-perm") => Err(DeliveryError::permanent("no")),
        ("b", "t-retry") => Err(DeliveryError::retryable("busy").with_tool("bank")),
        _ => Ok(Outputs::PassThrough),
    });
    let run = start_agents(&cfg, &q, &agent);
    let (stop_repair, rx) = watch::channel(false);
    let repair = r4::engine::RepairRole::new(cfg.clone(), q.clone(), "repair-keys")
        .with_interval(Duration::from_millis(30));
    let rh = tokio::spawn(async move { repair.run(rx).await.unwrap() });
    let intake = Intake::new(cfg.clone(), q.clone(), "intake-keys");
    intake
        .submit(json!({"n": 1}), Some("client-key-1"), None)
        .await
        .unwrap();
    for id in ["t-ok", "t-perm", "t-retry"] {
        add_task(&q, &cfg, "in", id, json!({})).await;
    }
    use r4::engine::killswitch::{self, Target};
    killswitch::engage(q.as_ref(), &cfg.keys, &Target::Tool("bank".into()))
        .await
        .unwrap();
    killswitch::release(q.as_ref(), &cfg.keys, &Target::Tool("bank".into()))
        .await
        .unwrap();
    eventually("t-retry quarantined as poison", WAIT, || async {
        q.len(&cfg.keys.poison()).await.unwrap() >= 1
    })
    .await;
    run.stop().await;
    let _ = stop_repair.send(true);
    let _ = rh.await;
    let mut c = ::redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let all: Vec<String> = ::redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(all.len() >= 10, "{all:?}");
    // The kinds, as Keys builds them: a name made of a marker splits each
    // builder's output into its fixed part.
    const M: &str = "\u{1}";
    let k = &cfg.keys;
    let exact = [
        k.dlq(),
        k.dlq_due(),
        k.poison(),
        k.killswitch(),
        k.killswitch_acks(),
        k.killswitch_version(),
        k.breakers(),
        k.topology(),
        k.policies(),
        k.policies_version(),
    ];
    let kinds: Vec<String> = [
        k.stream(M),
        k.inbox(M, M),
        k.idem(M),
        k.task(M),
        k.task_dlq(M),
        k.stats(M),
        k.fault(M, 0),
        k.checkpoint(M),
        k.attempts(M, M),
        k.saga(M),
        k.degraded(M),
        k.breaker(M),
        k.join(M, M),
        k.join_due(M),
    ]
    .iter()
    .map(|s| s.split(M).next().unwrap().to_owned())
    .collect();
    let mut seen_kinds = BTreeSet::new();
    for key in &all {
        assert!(key.starts_with(k.prefix()), "{key} is not the workflow's");
        if exact.contains(key) {
            seen_kinds.insert(key.clone());
            continue;
        }
        // The longest matching kind, so `task:` does not swallow `task-dlq:`.
        let kind = kinds
            .iter()
            .filter(|p| key.starts_with(p.as_str()) && key.len() > p.len())
            .max_by_key(|p| p.len());
        match kind {
            Some(p) => {
                seen_kinds.insert(p.clone());
            }
            None => panic!("{key} is not built by Keys"),
        }
    }
    // The run really wrote the kinds this test is about.
    for want in [k.stream(M), k.inbox(M, M), k.idem(M), k.saga(M), k.stats(M)] {
        let p = want.split(M).next().unwrap().to_owned();
        assert!(seen_kinds.contains(&p), "no {p} key written: {all:?}");
    }
    for want in [k.dlq(), k.poison(), k.killswitch(), k.killswitch_version()] {
        assert!(seen_kinds.contains(&want), "no {want}: {all:?}");
    }
}

/// An output stream at `maxLen` holds the producing step back — the entry
/// and the agent's answer are kept, no delivery is counted, nothing is
/// dead-lettered however long it lasts — and everything flows once the
/// next agent drains it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_output_stream_holds_the_step_back() {
    let (_redis, q) = queue(true).await;
    let base = workflow(
        "downstream-full",
        "    - {name: a, image: x, consumes: in, produces: [ab], concurrency: 2}\n    - {name: b, image: x, consumes: ab, produces: [done]}",
        "",
    );
    let cfg = Arc::new(r4::engine::WorkflowConfig {
        max_len: Some(3),
        ..base
    });
    r4::engine::consumer::ensure_groups(q.as_ref(), &cfg)
        .await
        .unwrap();
    for i in 0..10 {
        add_task(&q, &cfg, "in", &format!("t{i}"), json!({"i": i})).await;
    }
    // Only agent a runs; b's stream fills at 3.
    let agent = ScriptedAgent::ok();
    let a = AgentRole::new(cfg.clone(), "a", q.clone(), Arc::new(agent.clone()), "a-1")
        .unwrap()
        .with_options(fast_opts());
    let a_stats = a.stats();
    let (tx, rx) = watch::channel(false);
    let ha = tokio::spawn(async move { a.run(rx).await.unwrap() });
    eventually("the output stream is full", WAIT, || async {
        q.len(&cfg.keys.stream("ab")).await.unwrap() == 3
    })
    .await;
    // Five visibility timeouts (1 s each): nothing dead-lettered, nothing
    // redelivered, the backlog never past the limit.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(dlq(&q, &cfg).await.is_empty());
    assert_eq!(q.len(&cfg.keys.stream("ab")).await.unwrap(), 3);
    let p = q
        .pending_summary(&cfg.keys.stream("in"), "a")
        .await
        .unwrap();
    assert!(p.count <= 4, "held {} with concurrency 2", p.count);
    assert!(
        a_stats
            .render_metrics()
            .contains("r4_engine_backpressure_total")
    );
    // b starts and drains: every task completes, each delivered to a once.
    let b = AgentRole::new(cfg.clone(), "b", q.clone(), Arc::new(agent.clone()), "b-1")
        .unwrap()
        .with_options(fast_opts());
    let rx = tx.subscribe();
    let hb = tokio::spawn(async move { b.run(rx).await.unwrap() });
    eventually("all ten done", WAIT, || async {
        agent.calls_for("b").len() >= 10
    })
    .await;
    let _ = tx.send(true);
    let _ = ha.await;
    let _ = hb.await;
    let per_task: BTreeMap<String, usize> =
        agent
            .calls_for("a")
            .into_iter()
            .fold(BTreeMap::new(), |mut m, c| {
                *m.entry(c.task_id).or_default() += 1;
                m
            });
    assert_eq!(per_task.len(), 10);
    assert!(per_task.values().all(|n| *n == 1), "{per_task:?}");
    assert!(agent.calls_for("a").iter().all(|c| c.attempt == 1));
    assert!(dlq(&q, &cfg).await.is_empty());
}

/// An entry that was pending but is gone from its stream (deleted by hand,
/// or lost by a Redis without persistence) is dead-lettered as `trimmed`
/// by the engine whose claim finds it — accounted for, never ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_entry_gone_from_its_stream_is_dead_lettered_as_trimmed() {
    let (_redis, q) = queue(true).await;
    let cfg = Arc::new(workflow(
        "gone",
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ));
    let input = cfg.keys.stream("in");
    q.ensure_group(&input, "a").await.unwrap();
    let id = add_task(&q, &cfg, "in", "t-gone", json!({})).await;
    q.read_group(&input, "a", "dead", 1, Duration::ZERO)
        .await
        .unwrap();
    q.delete(&input, std::slice::from_ref(&id)).await.unwrap();
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    eventually("dead-lettered as trimmed", WAIT, || async {
        dlq(&q, &cfg).await.iter().any(|r| r.reason == "trimmed")
    })
    .await;
    run.stop().await;
    let recs = dlq(&q, &cfg).await;
    assert_eq!(recs.len(), 1);
    assert_eq!(
        (recs[0].entry_id.as_str(), recs[0].step.as_str()),
        (id.as_str(), "a")
    );
    assert_eq!(q.pending_summary(&input, "a").await.unwrap().count, 0);
    assert!(agent.calls().is_empty());
}
