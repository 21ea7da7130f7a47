//! `r4 bench killswitch`: N engines of one agent on one Redis, each with
//! its own connections; time from engaging the workflow's kill switch to
//! every engine having stopped taking tasks (its acknowledgement, written
//! once it is out of its last read), over several engage/release rounds.
//! Tasks keep arriving throughout; deliveries after the last stop
//! acknowledgement are counted and must be 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::engine::delivery::{Delivery, DeliveryFuture, DeliveryRequest, Outputs};
use crate::engine::killswitch::{self, Target};
use crate::engine::task::{Task, now_ms};
use crate::engine::{AgentOptions, AgentRole, WorkflowConfig};
use crate::queue::Queue;
use crate::queue::redis::RedisQueue;
use crate::testutil::RedisServer;

struct Counting {
    n: Arc<AtomicU64>,
    stopped: Arc<AtomicBool>,
    late: Arc<AtomicU64>,
}

impl Delivery for Counting {
    fn deliver<'a>(&'a self, _req: &'a DeliveryRequest) -> DeliveryFuture<'a> {
        Box::pin(async move {
            self.n.fetch_add(1, Ordering::Relaxed);
            if self.stopped.load(Ordering::Relaxed) {
                self.late.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Outputs::PassThrough)
        })
    }
}

pub async fn run(
    redis: Option<String>,
    engines: usize,
    rounds: usize,
) -> Result<serde_json::Value, String> {
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
    let ns = format!("ks-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let yaml = r#"
apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {name: ks}
spec:
  queue: {redis: {url: "redis://unused"}}
  agents:
    - {name: worker, image: x, consumes: in, concurrency: 4}
"#;
    let cfg = Arc::new(
        WorkflowConfig::from_yaml("bench", yaml, None, Some(&ns)).map_err(|e| e.to_string())?,
    );
    let admin: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&url).await.map_err(|e| {
        format!(
            "--redis {}: {e}",
            crate::telemetry::redact::redact_url(&url)
        )
    })?);
    let delivered = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let late = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut ids = Vec::new();
    let mut handles = Vec::new();
    for i in 0..engines {
        let q: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&url).await.map_err(|e| {
            format!(
                "--redis {}: {e}",
                crate::telemetry::redact::redact_url(&url)
            )
        })?);
        let id = format!("ks-engine-{i}");
        let d = Counting {
            n: delivered.clone(),
            stopped: stopped.clone(),
            late: late.clone(),
        };
        let role = AgentRole::new(cfg.clone(), "worker", q, Arc::new(d), &id)
            .map_err(|e| e.to_string())?
            .with_options(AgentOptions::default());
        ids.push(id);
        handles.push(tokio::spawn(role.run(stop_rx.clone())));
    }
    // A steady trickle of tasks.
    let feeder = {
        let (q, cfg, stop) = (admin.clone(), cfg.clone(), stop_rx.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !*stop.borrow() {
                let t = Task::new(format!("t{i}"), json!({}));
                let _ = q.add(&cfg.keys.stream("in"), t.encode(), None).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // Every engine running and acknowledged.
    wait_acks(
        admin.as_ref(),
        &cfg.keys,
        engines,
        0,
        false,
        Duration::from_secs(20),
        POLL,
    )
    .await?;
    let mut samples = Vec::new();
    for _ in 0..rounds {
        let before = delivered.load(Ordering::Relaxed);
        let t0 = now_ms();
        let v = killswitch::engage(admin.as_ref(), &cfg.keys, &Target::All)
            .await
            .map_err(|e| e.to_string())?;
        let acks = wait_acks(
            admin.as_ref(),
            &cfg.keys,
            engines,
            v,
            true,
            Duration::from_secs(10),
            POLL,
        )
        .await?;
        stopped.store(true, Ordering::Relaxed);
        samples.extend(acks.iter().map(|a| a.at_ms.saturating_sub(t0)));
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Clear the flag before releasing: engines resume the moment the release lands, and
        // those deliveries are not "after stop".
        stopped.store(false, Ordering::Relaxed);
        let v = killswitch::release(admin.as_ref(), &cfg.keys, &Target::All)
            .await
            .map_err(|e| e.to_string())?;
        wait_acks(
            admin.as_ref(),
            &cfg.keys,
            engines,
            v,
            false,
            Duration::from_secs(10),
            POLL,
        )
        .await?;
        if delivered.load(Ordering::Relaxed) == before {
            return Err(
                "no task was delivered during a round; the bench is not measuring a busy system"
                    .into(),
            );
        }
    }
    let _ = stop_tx.send(true);
    let _ = feeder.await;
    for h in handles {
        let _ = h.await;
    }
    samples.sort_unstable();
    let pct =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    Ok(json!({
        "engines": engines,
        "rounds": rounds,
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": samples.last().copied().unwrap_or(0),
        "deliveries_after_stop": late.load(Ordering::Relaxed),
        "tasks_delivered": delivered.load(Ordering::Relaxed),
    }))
}

/// How often this bench reads the acknowledgements.
const POLL: Duration = Duration::from_millis(5);

/// Wait until `engines` agent engines acknowledge a state version at least `version` with
/// `stopped`, reading the acknowledgements every `poll`; their acknowledgements. (This bench
/// and `r4 bench killswitch --via-api` share it.)
pub(crate) async fn wait_acks(
    q: &dyn Queue,
    keys: &crate::queue::Keys,
    engines: usize,
    version: u64,
    stopped: bool,
    within: Duration,
    poll: Duration,
) -> Result<Vec<killswitch::Ack>, String> {
    let deadline = Instant::now() + within;
    loop {
        let acks: Vec<_> = killswitch::acks(q, keys)
            .await
            .map_err(|e| format!("read the acknowledgements: {e}"))?
            .into_iter()
            .filter(|a| a.agent.is_some() && a.version >= version && a.stopped == stopped)
            .collect();
        if acks.len() >= engines {
            return Ok(acks);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "only {} of {engines} engines acknowledged within {within:?}",
                acks.len()
            ));
        }
        tokio::time::sleep(poll).await;
    }
}
