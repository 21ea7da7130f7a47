//! `r4 bench killswitch --via-api`: from a JSON merge patch of `spec.killSwitches` through the
//! Kubernetes API (what `kubectl patch --type merge` sends) to every engine of the workflow
//! having applied it, over several engage/release rounds.
//!
//! Owns the setup and the measurement only: `r4 dev`'s API, its kubelet (the engines of the
//! pods run in this process, simulated agents) and the controller, unchanged, all on one queue
//! (in memory, or `--redis URL`). One workflow of two agents whose replicas sum to `engines`.
//!
//! An engine has applied a change when its kill-switch acknowledgement (the engine's
//! `killswitch::Ack`) is for a state version newer than the one before the patch, with the new
//! `stopped`. Figures: per engine, the time from sending the patch to its acknowledgement's
//! `at_ms` (when it applied it); `p50_ms`/`p99_ms`/`max_ms` are over engage samples (the SPEC's
//! keys), `release` has the same over release samples. `controller_ms` splits the path: from
//! the patch to the controller's write of the new state in the queue (polled every 2 ms), the
//! rest is the engines'.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::Instant;

use super::killswitch::wait_acks;
use crate::api::policy::CircuitPolicy;
use crate::api::workflow::AgentWorkflow;
use crate::controller::context::{Options, QueueSource};
use crate::controller::run::RunOptions;
use crate::devcluster::kubelet::{self, KubeletOptions};
use crate::engine::killswitch;
use crate::engine::task::{Task, now_ms};
use crate::queue::memory::MemoryQueue;
use crate::queue::redis::RedisQueue;
use crate::queue::{Keys, Queue};

/// What to measure.
#[derive(Clone, Debug)]
pub struct ViaApiOpts {
    /// Redis for the queue; `None`: one in-memory queue.
    pub redis: Option<String>,
    /// Agent engines (pods) of the workflow.
    pub engines: usize,
    /// Engage/release rounds.
    pub rounds: usize,
}

/// How often the acknowledgements are read (finer than the Redis-direct bench's: the figure
/// here includes the controller's reaction).
const POLL: Duration = Duration::from_millis(2);

const NAME: &str = "ks-bench";
const NS: &str = "default";

fn workflow(engines: usize) -> Result<AgentWorkflow, String> {
    let first = engines.div_ceil(2);
    let second = engines - first;
    let mut agents = format!(
        "    - {{name: sorter, image: \"ghcr.io/acme/sorter:1.0\", replicas: {first}, consumes: tickets, produces: [sorted], simulate: {{latency: {{medianMs: 2, p99Ms: 5}}}}}}\n"
    );
    if second > 0 {
        agents.push_str(&format!(
            "    - {{name: solver, image: \"ghcr.io/acme/solver:1.0\", replicas: {second}, consumes: sorted, simulate: {{latency: {{medianMs: 2, p99Ms: 5}}}}}}\n"
        ));
    }
    let yaml = format!(
        "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {{name: {NAME}}}\nspec:\n  \
         queue: {{redis: {{url: \"redis://unused.invalid:6379/0\"}}}}\n  policyRef: ks-policy\n  \
         agents:\n{agents}"
    );
    serde_yaml::from_str(&yaml).map_err(|e| format!("bench workflow: {e}"))
}

const POLICY: &str = r#"
apiVersion: r4.dev/v1alpha1
kind: CircuitPolicy
metadata: {name: ks-policy}
spec:
  timeout: {perAttempt: 2s}
"#;

/// Percentiles of sorted samples (nearest rank).
fn summary(samples: &mut [u64]) -> Value {
    samples.sort_unstable();
    if samples.is_empty() {
        return json!({"p50_ms": 0, "p99_ms": 0, "max_ms": 0, "samples": 0});
    }
    let pct =
        |p: f64| samples[((samples.len() as f64 * p).ceil() as usize).clamp(1, samples.len()) - 1];
    json!({
        "p50_ms": pct(0.5),
        "p99_ms": pct(0.99),
        "max_ms": samples[samples.len() - 1],
        "samples": samples.len(),
    })
}

async fn within<T>(
    what: &str,
    d: Duration,
    f: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, String> {
    tokio::time::timeout(d, f)
        .await
        .map_err(|_| format!("{what}: no answer within {d:?}"))?
        .map_err(|e| format!("{what}: {e}"))
}

/// Run the benchmark; the JSON report, or a one-line error.
pub async fn run(opts: ViaApiOpts) -> Result<Value, String> {
    if opts.engines == 0 || opts.rounds == 0 {
        return Err("--engines and --rounds must be at least 1".into());
    }
    let (queue, redis_url): (Arc<dyn Queue>, Option<String>) = match &opts.redis {
        Some(url) => {
            let shown = crate::telemetry::redact::redact_url(url);
            let q = tokio::time::timeout(Duration::from_secs(10), RedisQueue::connect(url))
                .await
                .map_err(|_| format!("--redis {shown}: no answer within 10 s"))?
                .map_err(|e| format!("--redis {shown}: {e}"))?;
            (Arc::new(q), Some(url.clone()))
        }
        None => (Arc::new(MemoryQueue::new()), None),
    };
    let handle = crate::devcluster::start(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        crate::devcluster::Options::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let client =
        crate::devcluster::client(&handle.url()).map_err(|e| format!("kube client: {e}"))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let result = measure(&client, queue, redis_url, &opts, stop_rx).await;
    // The kubelet and the controller are told to stop (and end with the runtime); the API last.
    let _ = stop_tx.send(true);
    let _ = handle.stop().await;
    result
}

async fn measure(
    client: &Client,
    queue: Arc<dyn Queue>,
    redis_url: Option<String>,
    opts: &ViaApiOpts,
    stop: watch::Receiver<bool>,
) -> Result<Value, String> {
    let engines = opts.engines;
    super::controller::create_crds(client).await?;
    let kopts = KubeletOptions {
        redis: redis_url,
        ready_delay: Duration::from_millis(100),
        ..KubeletOptions::default()
    };
    tokio::spawn(kubelet::run_on(
        client.clone(),
        kopts,
        queue.clone(),
        stop.clone(),
    ));
    let run_opts = RunOptions {
        controller: Options {
            queue: QueueSource::Shared(queue.clone()),
            stats_interval: Duration::from_secs(2),
            instance: Some("r4-bench".into()),
            ..Options::default()
        },
        metrics_listen: None,
        leader: None,
    };
    tokio::spawn(crate::controller::run::run(client.clone(), run_opts, stop));

    let policies: Api<CircuitPolicy> = Api::namespaced(client.clone(), NS);
    let policy: CircuitPolicy = serde_yaml::from_str(POLICY).map_err(|e| format!("policy: {e}"))?;
    within(
        "create the CircuitPolicy",
        Duration::from_secs(10),
        policies.create(&PostParams::default(), &policy),
    )
    .await?;
    let workflows: Api<AgentWorkflow> = Api::namespaced(client.clone(), NS);
    within(
        "create the workflow",
        Duration::from_secs(10),
        workflows.create(&PostParams::default(), &workflow(engines)?),
    )
    .await?;
    let keys = Keys::new(NS, NAME);

    // Every engine running and acknowledged (not stopped) before the first round.
    eprintln!("r4 bench killswitch --via-api: waiting for {engines} engines");
    wait_acks(
        queue.as_ref(),
        &keys,
        engines,
        0,
        false,
        Duration::from_secs(120),
        POLL,
    )
    .await?;
    // A steady trickle of tasks, so engines are busy reading when a switch lands.
    let feeder = {
        let (q, stream) = (queue.clone(), keys.stream("tickets"));
        tokio::spawn(async move {
            let mut i = 0u64;
            loop {
                let t = Task::new(format!("t{i}"), json!({}));
                let _ = q.add(&stream, t.encode(), None).await;
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let mut engage = Vec::new();
    let mut release = Vec::new();
    let mut engage_all = Vec::new();
    let mut release_all = Vec::new();
    let mut controller_ms = Vec::new();
    let result = async {
        for round in 0..opts.rounds {
            for (on, samples, all) in [
                (true, &mut engage, &mut engage_all),
                (false, &mut release, &mut release_all),
            ] {
                let before = killswitch::read(queue.as_ref(), &keys)
                    .await
                    .map_err(|e| format!("read the kill-switch state: {e}"))?
                    .version;
                let t0 = now_ms();
                let patch = json!({"spec": {"killSwitches": {"all": on}}});
                within(
                    "patch spec.killSwitches",
                    Duration::from_secs(10),
                    workflows.patch(NAME, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await?;
                // When the controller wrote the new state.
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    let v = killswitch::read(queue.as_ref(), &keys)
                        .await
                        .map_err(|e| format!("read the kill-switch state: {e}"))?
                        .version;
                    if v > before {
                        controller_ms.push(now_ms().saturating_sub(t0));
                        break;
                    }
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "round {round}: the controller did not write the kill switch (all={on}) within 10 s"
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                let acks =
                    wait_acks(queue.as_ref(), &keys, engines, before + 1, on, Duration::from_secs(10), POLL)
                        .await
                        .map_err(|e| format!("round {round}, all={on}: {e}"))?;
                let times: Vec<u64> = acks.iter().map(|a| a.at_ms.saturating_sub(t0)).collect();
                all.push(times.iter().copied().max().unwrap_or(0));
                samples.extend(times);
            }
        }
        Ok::<(), String>(())
    }
    .await;
    feeder.abort();
    result?;
    let mut e = summary(&mut engage);
    let r = summary(&mut release);
    let c = summary(&mut controller_ms);
    let mut rounds_engage = engage_all.clone();
    let all_engaged = summary(&mut rounds_engage);
    let mut rounds_release = release_all.clone();
    let all_released = summary(&mut rounds_release);
    if let Value::Object(m) = &mut e {
        m.remove("samples");
    }
    Ok(json!({
        "bench": "killswitch",
        "via": "api",
        "engines": engines,
        "rounds": opts.rounds,
        "p50_ms": e["p50_ms"],
        "p99_ms": e["p99_ms"],
        "max_ms": e["max_ms"],
        "engage": {"per_engine": e, "every_engine_ms": engage_all},
        "release": {"per_engine": r, "every_engine_ms": release_all},
        "every_engine_engaged": all_engaged,
        "every_engine_released": all_released,
        "controller_ms": c,
        "queue": if opts.redis.is_some() { "redis" } else { "memory" },
        "measured": "p50/p99/max: per engine, from sending the merge patch of spec.killSwitches.all=true to the engine's acknowledgement of the new state (stopped); release is the same for all=false; controller_ms: from the patch to the controller's write of the new state in the queue",
        "goal": {"p99_ms": 1000},
        "within_goal": engage.last().copied().unwrap_or(u64::MAX) < 1000
            && release.last().copied().unwrap_or(u64::MAX) < 1000,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_workflow_splits_the_engines_over_two_agents() {
        let wf = workflow(51).expect("workflow");
        let r: Vec<i32> = wf
            .spec
            .agents
            .iter()
            .map(|a| a.replicas.unwrap_or(1))
            .collect();
        assert_eq!(r, vec![26, 25]);
        let wf = workflow(1).expect("workflow");
        assert_eq!(wf.spec.agents.len(), 1);
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let mut s: Vec<u64> = (1..=100).rev().collect();
        let v = summary(&mut s);
        assert_eq!(v["p50_ms"], 50);
        assert_eq!(v["p99_ms"], 99);
        assert_eq!(v["max_ms"], 100);
        assert_eq!(summary(&mut [])["samples"], 0);
    }
}
