//! `r4 bench pipeline`: tasks/s through intake → engine → agent → ack,
//! against a bare XREADGROUP/XACK consumer on the same Redis, with the same
//! payloads, the same loopback agent and the same concurrency, in one run.
//!
//! The bare peer XADDs each payload (in pipelines of the submit batch size,
//! one round trip per batch) and its consumers XREADGROUP, POST each task
//! to the agent and XACK it — the least a hand-written consumer does. r4
//! adds the intake HTTP hop, the envelope, the atomic completion (outputs +
//! XACK + inbox key) and its bookkeeping. Three contenders:
//!
//! - `bare`: the peer;
//! - `r4`: producers `POST /v1/tasks:batch` with `batch` tasks per request
//!   (the peer pipelines the same number of XADDs per round trip);
//! - `r4_per_request`: one `POST /v1/tasks` per task, which costs an HTTP
//!   exchange per task the peer does not make.
//!
//! Each contender runs `rounds` times, interleaved and in a rotating order
//! (so a noisy neighbour hurts all of them alike); tasks/s are the medians
//! of the rounds and each ratio is the median of the per-round ratios
//! against the peer of the same round.
//! The per-task overhead is the engine's time per task minus the time spent
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
use crate::queue::Queue;
use crate::queue::redis::RedisQueue;
use crate::testutil::RedisServer;

/// Consumer slots of each contender, and concurrent submitters.
const CONCURRENCY: usize = 32;
const SUBMITTERS: usize = 32;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Redis to measure on; `None`: a private `redis-server`.
    pub redis: Option<String>,
    /// Tasks per contender and round.
    pub tasks: usize,
    /// Tasks per submission of `bare` and `r4` (1: one at a time).
    pub batch: usize,
    /// Rounds of every contender.
    pub rounds: usize,
}

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

/// The task numbers submitter `p` sends, in submissions of `batch`.
fn submissions(p: usize, tasks: usize, batch: usize) -> impl Iterator<Item = Vec<usize>> {
    let mine: Vec<usize> = (p..tasks).step_by(SUBMITTERS).collect();
    let chunks: Vec<Vec<usize>> = mine.chunks(batch.max(1)).map(<[usize]>::to_vec).collect();
    chunks.into_iter()
}

/// One contender's figures in one round.
struct Figures {
    tasks_per_sec: f64,
    overhead_p50: u64,
    overhead_p99: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Contender {
    Bare,
    R4Batch,
    R4PerRequest,
}

/// Run every contender `opts.rounds` times.
pub async fn run(opts: Options) -> Result<serde_json::Value, String> {
    if opts.rounds == 0 || opts.batch == 0 {
        return Err("rounds and batch must be at least 1".into());
    }
    let _server;
    let url = match &opts.redis {
        Some(u) => u.clone(),
        None => {
            let s = RedisServer::start().await.map_err(|e| e.to_string())?;
            let u = s.url();
            _server = s;
            u
        }
    };
    let q: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&url).await.map_err(|e| {
        format!(
            "--redis {}: {e}",
            crate::telemetry::redact::redact_url(&url)
        )
    })?);
    let raw = crate::tls::redis_client(&url)
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
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
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let order = [Contender::Bare, Contender::R4Batch, Contender::R4PerRequest];
    let mut figures: Vec<(Contender, Figures)> = Vec::new();
    for round in 0..opts.rounds {
        for k in 0..order.len() {
            let who = order[(round + k) % order.len()];
            let ns = format!("bench-{}-{round}-{k}", &run_id[..8]);
            let f = match who {
                Contender::Bare => bare(&q, raw.clone(), &ns, &agent_url, &opts).await?,
                Contender::R4Batch => {
                    through_r4(&q, &ns, &agent_url, opts.tasks, opts.batch).await?
                }
                Contender::R4PerRequest => through_r4(&q, &ns, &agent_url, opts.tasks, 1).await?,
            };
            figures.push((who, f));
            // Leave the next contender an empty Redis.
            let keys = q
                .scan_prefix(&crate::queue::Keys::namespace_prefix(&ns))
                .await
                .map_err(|e| e.to_string())?;
            if !keys.is_empty() {
                q.del(&keys).await.map_err(|e| e.to_string())?;
            }
        }
    }
    let median = |who: Contender, pick: &dyn Fn(&Figures) -> f64| {
        let mut v: Vec<f64> = figures
            .iter()
            .filter(|(w, _)| *w == who)
            .map(|(_, f)| pick(f))
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let tps = |w| median(w, &|f: &Figures| f.tasks_per_sec);
    let p50 = |w| median(w, &|f: &Figures| f.overhead_p50 as f64);
    let p99 = |w| median(w, &|f: &Figures| f.overhead_p99 as f64);
    // Each round's contenders ran back to back: the ratio is the median of
    // the per-round (paired) ratios, which cancels drift between rounds.
    let ratio = |w: Contender| {
        let of = |x: Contender| {
            figures
                .iter()
                .filter(move |(c, _)| *c == x)
                .map(|(_, f)| f.tasks_per_sec)
        };
        let mut r: Vec<f64> = of(w).zip(of(Contender::Bare)).map(|(a, b)| a / b).collect();
        r.sort_by(f64::total_cmp);
        (r[r.len() / 2] * 1000.0).round() / 1000.0
    };
    let all = |w: Contender| -> Vec<f64> {
        figures
            .iter()
            .filter(|(x, _)| *x == w)
            .map(|(_, f)| f.tasks_per_sec.round())
            .collect()
    };
    Ok(json!({
        "bare": {"tasks_per_sec": tps(Contender::Bare).round(), "rounds": all(Contender::Bare)},
        "r4": {
            "tasks_per_sec": tps(Contender::R4Batch).round(),
            "overhead_us_p50": p50(Contender::R4Batch),
            "overhead_us_p99": p99(Contender::R4Batch),
            "rounds": all(Contender::R4Batch),
        },
        "r4_per_request": {
            "tasks_per_sec": tps(Contender::R4PerRequest).round(),
            "overhead_us_p50": p50(Contender::R4PerRequest),
            "overhead_us_p99": p99(Contender::R4PerRequest),
            "ratio": ratio(Contender::R4PerRequest),
            "rounds": all(Contender::R4PerRequest),
        },
        "ratio": ratio(Contender::R4Batch),
        "submit_batch": opts.batch,
        "tasks": opts.tasks,
        "rounds": opts.rounds,
        "statistic": "tasks_per_sec: median of rounds; ratio: median of per-round ratios",
    }))
}

async fn bare(
    q: &Arc<dyn Queue>,
    raw: ::redis::aio::MultiplexedConnection,
    ns: &str,
    agent_url: &str,
    opts: &Options,
) -> Result<Figures, String> {
    let tasks = opts.tasks;
    let stream = crate::queue::Keys::new(ns, "bare").stream("in");
    q.ensure_group(&stream, "g")
        .await
        .map_err(|e| e.to_string())?;
    let url = reqwest::Url::parse(agent_url).map_err(|e| e.to_string())?;
    let client = client()?;
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut consumers = Vec::new();
    for c in 0..CONCURRENCY {
        let (q, stream, client, url, done, stop) = (
            q.clone(),
            stream.clone(),
            client.clone(),
            url.clone(),
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
                        .post(url.clone())
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
        let (mut conn, stream) = (raw.clone(), stream.clone());
        let batch = opts.batch;
        producers.push(tokio::spawn(async move {
            for chunk in submissions(p, tasks, batch) {
                let mut pipe = ::redis::pipe();
                for i in chunk {
                    let body = serde_json::to_vec(&payload(i)).unwrap_or_default();
                    pipe.cmd("XADD")
                        .arg(&stream)
                        .arg("*")
                        .arg("task_id")
                        .arg(i)
                        .arg("payload")
                        .arg(body)
                        .ignore();
                }
                let _: Result<(), _> = pipe.query_async(&mut conn).await;
            }
        }));
    }
    join_within(producers, Duration::from_secs(60)).await?;
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
    Ok(Figures {
        tasks_per_sec: tasks as f64 / elapsed.as_secs_f64(),
        overhead_p50: 0,
        overhead_p99: 0,
    })
}

async fn through_r4(
    q: &Arc<dyn Queue>,
    ns: &str,
    agent_url: &str,
    tasks: usize,
    batch: usize,
) -> Result<Figures, String> {
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
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let path = if batch > 1 {
        "/v1/tasks:batch"
    } else {
        "/v1/tasks"
    };
    let url = reqwest::Url::parse(&format!("http://{addr}{path}")).map_err(|e| e.to_string())?;
    let server = tokio::spawn(crate::engine::http::serve(
        listener,
        intake.router(),
        stop_rx,
    ));
    let client = client()?;
    let started = Instant::now();
    let mut producers = Vec::new();
    for p in 0..SUBMITTERS {
        let (client, url) = (client.clone(), url.clone());
        producers.push(tokio::spawn(async move {
            for chunk in submissions(p, tasks, batch) {
                let body = if batch > 1 {
                    let items: Vec<_> = chunk
                        .into_iter()
                        .map(|i| json!({"payload": payload(i)}))
                        .collect();
                    serde_json::to_vec(&json!({"tasks": items}))
                } else {
                    serde_json::to_vec(&payload(chunk[0]))
                };
                let _ = client
                    .post(url.clone())
                    .header("content-type", "application/json")
                    .body(body.unwrap_or_default())
                    .send()
                    .await;
            }
        }));
    }
    join_within(producers, Duration::from_secs(60)).await?;
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
    Ok(Figures {
        tasks_per_sec: tasks as f64 / elapsed.as_secs_f64(),
        overhead_p50: o.value_at_quantile(0.5),
        overhead_p99: o.value_at_quantile(0.99),
    })
}

/// The HTTP client of the bench's own callers (the bare consumer and the
/// r4 submitters alike): pooled, no redirects, no proxy.
fn client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())
}

/// Wait for the submitters; no per-request timers (the peer's producers
/// have none either), one deadline for all of them instead.
async fn join_within(
    handles: Vec<tokio::task::JoinHandle<()>>,
    within: Duration,
) -> Result<(), String> {
    let all = futures::future::join_all(handles);
    tokio::time::timeout(within, all)
        .await
        .map(|_| ())
        .map_err(|_| format!("submitters did not finish within {within:?}"))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_is_submitted_once_in_batches() {
        for (tasks, batch) in [(1000, 1), (1000, 32), (100, 7), (5, 32)] {
            let mut all: Vec<usize> = Vec::new();
            for p in 0..SUBMITTERS {
                for chunk in submissions(p, tasks, batch) {
                    assert!(!chunk.is_empty() && chunk.len() <= batch);
                    all.extend(chunk);
                }
            }
            all.sort_unstable();
            assert_eq!(all, (0..tasks).collect::<Vec<_>>());
        }
    }
}
