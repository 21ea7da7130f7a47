//! `r4 bench pipeline`: tasks/s through intake → engine → agent → ack,
//! against a bare XREADGROUP/XACK consumer on the same Redis, with the same
//! payloads, the same loopback agent and the same concurrency, in one run.
//!
//! The bare peer XADDs each payload and its consumers XREADGROUP a batch,
//! POST each task to the agent and XACK it — the least a hand-written
//! consumer does. r4 adds the intake HTTP hop, the envelope, the atomic
//! completion (outputs + XACK + inbox key) and its bookkeeping. The
//! per-task overhead is the engine's time per task minus the time spent
//! waiting for the agent.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::engine::{AgentOptions, AgentRole, HttpDelivery, Intake, WorkflowConfig};
use crate::queue::redis::RedisQueue;
use crate::queue::{Queue, fields};
use crate::testutil::RedisServer;

/// Consumer slots of each contender, and concurrent submitters.
const CONCURRENCY: usize = 32;
const SUBMITTERS: usize = 32;

fn workflow(ns: &str) -> Result<WorkflowConfig, String> {
    let yaml = r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: bench}
spec:
  queue: {redis: {url: "redis://unused"}, visibilityTimeout: 30s}
  agents:
    - {name: worker, image: x, consumes: in, concurrency: 32}
"#;
    WorkflowConfig::from_yaml("bench", yaml, None, Some(ns)).map_err(|e| e.to_string())
}

fn payload(i: usize) -> serde_json::Value {
    json!({"ticket": i, "customer": format!("c-{}", i % 977), "amount_cents": (i * 37) % 100_000, "note": "x".repeat(64)})
}

/// Run both contenders with `tasks` tasks each.
pub async fn run(redis: Option<String>, tasks: usize) -> Result<serde_json::Value, String> {
    let _server;
    let url = match redis {
        Some(u) => u,
        None => {
            let s = RedisServer::start().await.map_err(|e| e.to_string())?;
            let u = s.url();
            _server = s;
            u
        }
    };
    let q: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&url).await.map_err(|e| e.to_string())?);
    // The loopback agent: answers every task with an empty 200 (pass-through).
    let hits = Arc::new(AtomicU64::new(0));
    let h = hits.clone();
    let app = Router::new().route(
        "/tasks",
        post(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::Relaxed);
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let agent_url = format!(
        "http://{}/tasks",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let ns = format!("bench-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let bare_tps = bare(q.clone(), &ns, &agent_url, tasks).await?;
    let (r4_tps, p50, p99) = through_r4(q.clone(), &ns, &agent_url, tasks).await?;
    Ok(json!({
        "bare": {"tasks_per_sec": bare_tps.round()},
        "r4": {"tasks_per_sec": r4_tps.round(), "overhead_us_p50": p50, "overhead_us_p99": p99},
        "tasks": tasks,
        "ratio": (r4_tps / bare_tps * 1000.0).round() / 1000.0,
    }))
}

async fn bare(q: Arc<dyn Queue>, ns: &str, agent_url: &str, tasks: usize) -> Result<f64, String> {
    let stream = crate::queue::Keys::new(ns, "bare").stream("in");
    q.ensure_group(&stream, "g")
        .await
        .map_err(|e| e.to_string())?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut consumers = Vec::new();
    for c in 0..CONCURRENCY {
        let (q, stream, client, url, done, stop) = (
            q.clone(),
            stream.clone(),
            client.clone(),
            agent_url.to_owned(),
            done.clone(),
            stop_rx.clone(),
        );
        consumers.push(tokio::spawn(async move {
            let name = format!("bare-{c}");
            while !*stop.borrow() {
                let Ok(batch) = q
                    .read_group(&stream, "g", &name, 1, Duration::from_millis(100))
                    .await
                else {
                    continue;
                };
                for e in batch {
                    let body = e.field("payload").cloned().unwrap_or_default();
                    let ok = client
                        .post(&url)
                        .header("Idempotency-Key", e.id.as_str())
                        .timeout(Duration::from_secs(5))
                        .body(body)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if ok
                        && q.ack(&stream, "g", std::slice::from_ref(&e.id))
                            .await
                            .is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    let mut producers = Vec::new();
    for p in 0..SUBMITTERS {
        let (q, stream) = (q.clone(), stream.clone());
        producers.push(tokio::spawn(async move {
            let mut i = p;
            while i < tasks {
                let body = serde_json::to_vec(&payload(i)).unwrap_or_default();
                let _ = q
                    .add(
                        &stream,
                        fields([("task_id", i.to_string().into_bytes()), ("payload", body)]),
                        None,
                    )
                    .await;
                i += SUBMITTERS;
            }
        }));
    }
    for p in producers {
        let _ = p.await;
    }
    wait_until(
        || done.load(Ordering::Relaxed) as usize >= tasks,
        Duration::from_secs(60),
    )
    .await?;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    for c in consumers {
        let _ = c.await;
    }
    Ok(tasks as f64 / elapsed.as_secs_f64())
}

async fn through_r4(
    q: Arc<dyn Queue>,
    ns: &str,
    agent_url: &str,
    tasks: usize,
) -> Result<(f64, u64, u64), String> {
    let cfg = Arc::new(workflow(ns)?);
    let delivery = HttpDelivery::new(agent_url).map_err(|e| e.to_string())?;
    let role = AgentRole::new(
        cfg.clone(),
        "worker",
        q.clone(),
        Arc::new(delivery),
        "bench-worker",
    )
    .map_err(|e| e.to_string())?
    .with_options(AgentOptions {
        read_block: Duration::from_millis(100),
        batch: CONCURRENCY,
        drain: Duration::from_secs(5),
        ..Default::default()
    });
    let stats = role.stats();
    let (stop_tx, stop_rx) = watch::channel(false);
    let engine = tokio::spawn(role.run(stop_rx.clone()));
    let intake = Intake::new(cfg.clone(), q.clone(), "bench-intake");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| e.to_string())?;
    let base = format!(
        "http://{}/v1/tasks",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let server = tokio::spawn(crate::engine::http::serve(
        listener,
        intake.router(),
        stop_rx,
    ));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..SUBMITTERS {
        let (client, base) = (client.clone(), base.clone());
        producers.push(tokio::spawn(async move {
            let mut i = p;
            while i < tasks {
                let body = serde_json::to_vec(&payload(i)).unwrap_or_default();
                let _ = client
                    .post(&base)
                    .timeout(Duration::from_secs(5))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                i += SUBMITTERS;
            }
        }));
    }
    for p in producers {
        let _ = p.await;
    }
    wait_until(
        || stats.counters().completed as usize >= tasks,
        Duration::from_secs(60),
    )
    .await?;
    let elapsed = started.elapsed();
    let _ = stop_tx.send(true);
    let _ = engine.await;
    let _ = server.await;
    let o = stats.overhead();
    Ok((
        tasks as f64 / elapsed.as_secs_f64(),
        o.value_at_quantile(0.5),
        o.value_at_quantile(0.99),
    ))
}

async fn wait_until(mut cond: impl FnMut() -> bool, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            return Err(format!("bench did not finish within {within:?}"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
