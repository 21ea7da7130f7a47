//! Agent-level hedging on a real Redis: two engines of one agent, each with its own agent
//! container. A delivery that has not answered by the hedge delay goes to the other engine's
//! container too (same `Idempotency-Key`); the first answer completes the step through the
//! normal atomic completion, exactly once: one output, the entry acked, the loser cancelled.

mod engine_common;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine_common::{add_task, eventually, fast_opts, queue};
use r4::engine::delivery::DeliveryFuture;
use r4::engine::{AgentRole, Delivery, DeliveryRequest, Outputs, WorkflowConfig};
use r4::queue::Queue;
use tokio::sync::watch;

/// One agent container: answers after `first` on the first delivery of a key (whichever
/// container gets it) and after `again` on later ones; logs who was asked what and which
/// deliveries ran to their end (a cancelled one does not).
#[derive(Clone)]
struct Container {
    name: &'static str,
    first: Duration,
    again: Duration,
    log: Arc<Mutex<Vec<(&'static str, String)>>>,
    finished: Arc<Mutex<Vec<(&'static str, String)>>>,
}

impl Delivery for Container {
    fn deliver<'a>(&'a self, req: &'a DeliveryRequest) -> DeliveryFuture<'a> {
        Box::pin(async move {
            let n = {
                let mut log = self.log.lock().unwrap();
                let n = log
                    .iter()
                    .filter(|(_, k)| *k == req.idempotency_key)
                    .count();
                log.push((self.name, req.idempotency_key.clone()));
                n
            };
            tokio::time::sleep(if n == 0 { self.first } else { self.again }).await;
            self.finished
                .lock()
                .unwrap()
                .push((self.name, req.idempotency_key.clone()));
            Ok(Outputs::PassThrough)
        })
    }
}

fn workflow(delay: &str) -> WorkflowConfig {
    let yaml = format!(
        r#"apiVersion: r4.dev/v1alpha1
kind: AgentWorkflow
metadata: {{name: hedged}}
spec:
  queue:
    redis: {{url: "redis://127.0.0.1:6379/0"}}
    visibilityTimeout: 10s
  policyRef: fast
  agents:
    - name: w
      image: x
      consumes: in
      produces: [out]
      idempotent: true
      hedge: {{delay: {{fixed: {delay}}}, maxExtraLoad: 1.0}}
---
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {{name: fast}}
spec:
  timeout: {{perAttempt: 5s}}
  retry:
    maxAttempts: 3
    backoff: {{initial: 10ms, max: 40ms, multiplier: 2, jitter: None}}
  deadLetter: {{maxDeliveries: 3, retention: 1h, replay: {{automatic: false}}}}
"#
    );
    WorkflowConfig::from_yaml(
        "test",
        &yaml,
        None,
        Some(&format!(
            "ns-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        )),
    )
    .unwrap()
}

struct Pair {
    cfg: Arc<WorkflowConfig>,
    q: Arc<dyn Queue>,
    stop: watch::Sender<bool>,
    handles: Vec<tokio::task::JoinHandle<()>>,
    hedges: Vec<Arc<r4::engine::hedge::AgentHedge>>,
    stats: Vec<Arc<r4::engine::stats::Stats>>,
    log: Arc<Mutex<Vec<(&'static str, String)>>>,
    finished: Arc<Mutex<Vec<(&'static str, String)>>>,
}

/// Two engines of agent `w`, containers "c1" and "c2".
async fn two_engines(q: Arc<dyn Queue>, first: Duration, again: Duration) -> Pair {
    two_engines_with(q, first, again, "100ms").await
}

async fn two_engines_with(
    q: Arc<dyn Queue>,
    first: Duration,
    again: Duration,
    delay: &str,
) -> Pair {
    let cfg = Arc::new(workflow(delay));
    let (stop, rx) = watch::channel(false);
    let log = Arc::new(Mutex::new(Vec::new()));
    let finished = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    let mut hedges = Vec::new();
    let mut stats = Vec::new();
    for name in ["c1", "c2"] {
        let container = Container {
            name,
            first,
            again,
            log: log.clone(),
            finished: finished.clone(),
        };
        let role = AgentRole::new(
            cfg.clone(),
            "w",
            q.clone(),
            Arc::new(container),
            &format!("engine-{name}"),
        )
        .unwrap()
        .with_options(fast_opts());
        hedges.push(role.hedge().expect("the agent hedges"));
        stats.push(role.stats());
        let rx = rx.clone();
        handles.push(tokio::spawn(async move { role.run(rx).await.unwrap() }));
    }
    // Both engines must have said they take hedges (the peers a hedge may go to).
    let (q2, cfg2) = (q.clone(), cfg.clone());
    eventually("both engines take hedges", Duration::from_secs(10), || {
        let (q, cfg) = (q2.clone(), cfg2.clone());
        async move {
            q.hgetall(&cfg.keys.hedge_peers("w"))
                .await
                .map(|f| f.len() == 2)
                .unwrap_or(false)
        }
    })
    .await;
    Pair {
        cfg,
        q,
        stop,
        handles,
        hedges,
        stats,
        log,
        finished,
    }
}

impl Pair {
    async fn outputs(&self) -> usize {
        self.q
            .range(&self.cfg.keys.stream("out"), "-", "+", 0)
            .await
            .unwrap()
            .len()
    }

    async fn pending(&self) -> u64 {
        self.q
            .pending_summary(&self.cfg.keys.stream("in"), "w")
            .await
            .unwrap()
            .count
    }

    fn sum(&self, f: impl Fn(&r4::engine::hedge::AgentHedge) -> u64) -> u64 {
        self.hedges.iter().map(|h| f(h)).sum()
    }

    /// `r4_engine_agent_hedges_total{event}` summed over both engines' `/metrics` text.
    fn exported(&self, event: &str) -> u64 {
        let prefix = format!("r4_engine_agent_hedges_total{{agent=\"w\",event=\"{event}\"}} ");
        self.stats
            .iter()
            .map(|s| {
                s.render_metrics()
                    .lines()
                    .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.parse::<u64>().ok()))
                    .unwrap_or_else(|| panic!("no {prefix} series"))
            })
            .sum()
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for h in self.handles {
            let _ = tokio::time::timeout(Duration::from_secs(10), h).await;
        }
    }
}

#[tokio::test]
async fn a_slow_primary_loses_to_the_shadow_exactly_once() {
    let (_server, q) = queue(true).await;
    // The first delivery of the task takes 1.5 s (a long model call); the shadow's 20 ms.
    let p = two_engines(q, Duration::from_millis(1500), Duration::from_millis(20)).await;
    add_task(&p.q, &p.cfg, "in", "t1", serde_json::json!({"n": 1})).await;
    eventually("the step completed", Duration::from_secs(5), || async {
        p.outputs().await == 1 && p.pending().await == 0
    })
    .await;
    // Completed by the shadow, well before the primary would have answered.
    assert_eq!(p.sum(|h| h.sent.load(Ordering::Relaxed)), 1);
    assert_eq!(p.sum(|h| h.shadow_wins.load(Ordering::Relaxed)), 1);
    // The same counts on /metrics.
    assert_eq!(p.exported("sent"), 1);
    assert_eq!(p.exported("shadow"), 1);
    assert_eq!(p.exported("shadow_won"), 1);
    let log = p.log.lock().unwrap().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_ne!(
        log[0].0, log[1].0,
        "the shadow is another container: {log:?}"
    );
    assert_eq!(log[0].1, "t1:w");
    assert_eq!(log[1].1, "t1:w", "same Idempotency-Key");
    // The primary's delivery was cancelled: it never ran to its end, and nothing else came.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let finished = p.finished.lock().unwrap().clone();
    assert_eq!(finished, vec![log[1].clone()], "{finished:?}");
    assert_eq!(p.outputs().await, 1, "exactly one output");
    assert_eq!(p.pending().await, 0);
    p.stop().await;
}

#[tokio::test]
async fn a_primary_that_answers_first_completes_and_cancels_the_shadow() {
    let (_server, q) = queue(true).await;
    // The primary answers at 300 ms (after the 100 ms delay, so it is hedged); the shadow would
    // take 2 s.
    let p = two_engines(q, Duration::from_millis(300), Duration::from_millis(2000)).await;
    add_task(&p.q, &p.cfg, "in", "t2", serde_json::json!({"n": 2})).await;
    eventually("the step completed", Duration::from_secs(5), || async {
        p.outputs().await == 1 && p.pending().await == 0
    })
    .await;
    assert_eq!(p.sum(|h| h.sent.load(Ordering::Relaxed)), 1);
    // The shadow's delivery is cancelled by the primary's "done" note.
    let log = p.log.lock().unwrap().clone();
    eventually("the shadow delivered", Duration::from_secs(2), || async {
        p.log.lock().unwrap().len() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2300)).await;
    let finished = p.finished.lock().unwrap().clone();
    assert_eq!(
        finished.len(),
        1,
        "the shadow ran to its end: {finished:?} {log:?}"
    );
    assert_eq!(p.sum(|h| h.shadow_wins.load(Ordering::Relaxed)), 0);
    assert_eq!(p.outputs().await, 1, "exactly one output");
    p.stop().await;
}

#[tokio::test]
async fn many_tasks_with_hedges_complete_once_each() {
    let (_server, q) = queue(true).await;
    // Every first delivery is slow enough to be hedged: the cap (100% here) lets each go.
    let p = two_engines(q, Duration::from_millis(400), Duration::from_millis(250)).await;
    for i in 0..40 {
        add_task(
            &p.q,
            &p.cfg,
            "in",
            &format!("m{i}"),
            serde_json::json!({"i": i}),
        )
        .await;
    }
    eventually("every step completed", Duration::from_secs(20), || async {
        p.outputs().await >= 40 && p.pending().await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let outs =
        p.q.range(&p.cfg.keys.stream("out"), "-", "+", 0)
            .await
            .unwrap();
    let mut ids: Vec<String> = outs
        .iter()
        .filter_map(|e| e.field("task_id"))
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect();
    ids.sort();
    let n = ids.len();
    ids.dedup();
    assert_eq!(
        (n, ids.len()),
        (40, 40),
        "one output per task, none duplicated"
    );
    assert!(p.sum(|h| h.sent.load(Ordering::Relaxed)) > 0);
    p.stop().await;
}

#[tokio::test]
async fn a_killed_agent_is_not_hedged() {
    use r4::engine::killswitch::{self, Target};
    let (_server, q) = queue(true).await;
    // The primary takes 3 s; the hedge would go at 1.5 s — but the agent's kill switch is
    // engaged meanwhile: the in-flight delivery finishes (safe stop), no shadow is asked.
    let p = two_engines_with(
        q,
        Duration::from_millis(3000),
        Duration::from_millis(20),
        "1500ms",
    )
    .await;
    add_task(&p.q, &p.cfg, "in", "k1", serde_json::json!({"n": 1})).await;
    eventually(
        "the primary delivery started",
        Duration::from_secs(5),
        || async { p.log.lock().unwrap().len() == 1 },
    )
    .await;
    let v = killswitch::engage(p.q.as_ref(), &p.cfg.keys, &Target::Agent("w".into()))
        .await
        .unwrap();
    eventually(
        "both engines stopped reading",
        Duration::from_secs(5),
        || async {
            killswitch::acks(p.q.as_ref(), &p.cfg.keys)
                .await
                .map(|a| a.iter().filter(|x| x.version >= v && x.stopped).count() >= 2)
                .unwrap_or(false)
        },
    )
    .await;
    eventually("the step completed", Duration::from_secs(6), || async {
        p.outputs().await == 1 && p.pending().await == 0
    })
    .await;
    assert_eq!(p.sum(|h| h.sent.load(Ordering::Relaxed)), 0);
    assert_eq!(p.sum(|h| h.shadow_deliveries.load(Ordering::Relaxed)), 0);
    assert_eq!(p.exported("sent"), 0);
    assert_eq!(p.exported("shadow"), 0);
    assert_eq!(p.log.lock().unwrap().len(), 1, "no shadow delivery");
    p.stop().await;
}
