//! Kill switches fail closed: an engine takes no task until it has read its switch, so one
//! started while its switch is engaged (in Redis or in the spec), while the switch cannot be
//! read, or while Redis is unreachable delivers nothing — and resumes once released.
//! Deliveries are counted by the agent itself.

mod engine_common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use engine_common::*;
use r4::engine::WorkflowConfig;
use r4::engine::killswitch::{self, Target};
use r4::queue::Queue;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// How long "nothing delivered" is watched once the engine has shown it is running and
/// stopped: several re-read periods and read blocks.
const QUIET: Duration = Duration::from_millis(1500);

fn one_agent(name: &str) -> Arc<WorkflowConfig> {
    Arc::new(workflow(
        name,
        "    - {name: a, image: x, consumes: in, produces: [done]}",
        "",
    ))
}

async fn add_tasks(q: &Arc<dyn Queue>, cfg: &WorkflowConfig, stream: &str, n: usize) {
    for i in 0..n {
        add_task(q, cfg, stream, &format!("{stream}-{i}"), json!({})).await;
    }
}

/// Wait until the engine of `agent` says it is stopped at `version` or later: it is running
/// its loop and has applied (at least) that state.
async fn stopped_at(q: &Arc<dyn Queue>, cfg: &WorkflowConfig, engine: &str, version: u64) {
    eventually("the engine acknowledged its stop", WAIT, || async {
        killswitch::acks(q.as_ref(), &cfg.keys)
            .await
            .unwrap()
            .iter()
            .any(|a| a.engine == engine && a.stopped && a.version >= version)
    })
    .await;
}

async fn all_delivered(agent: &ScriptedAgent, n: usize) {
    eventually(&format!("{n} deliveries"), WAIT, || async {
        agent.calls().len() >= n
    })
    .await;
}

/// Engaged in Redis before the engine starts: not one delivery until released.
async fn engaged_before_start(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = one_agent("engaged");
    add_tasks(&q, &cfg, "in", 10).await;
    let v = killswitch::engage(q.as_ref(), &cfg.keys, &Target::Agent("a".into()))
        .await
        .unwrap();
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    stopped_at(&q, &cfg, &run.stats[0].engine_id, v).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(agent.calls().len(), 0, "a task was taken while engaged");
    killswitch::release(q.as_ref(), &cfg.keys, &Target::Agent("a".into()))
        .await
        .unwrap();
    all_delivered(&agent, 10).await;
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn engaged_before_start_delivers_nothing_memory() {
    engaged_before_start(false).await;
}

#[tokio::test]
async fn engaged_before_start_delivers_nothing_redis() {
    engaged_before_start(true).await;
}

/// `killSwitches.agents.a: true` in the spec: agent a never reads a task (not even after
/// Redis says released), while agent b of the same workflow works.
async fn engaged_in_the_spec(redis: bool) {
    let (_b, q) = queue(redis).await;
    let cfg = Arc::new(workflow(
        "spec-killed",
        "    - {name: a, image: x, consumes: in, produces: [mid]}\n    - {name: b, image: x, consumes: mid, produces: [done]}",
        "  killSwitches: {agents: {a: true}}",
    ));
    add_tasks(&q, &cfg, "in", 10).await;
    add_tasks(&q, &cfg, "mid", 5).await;
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    eventually("agent b works", WAIT, || async {
        agent.calls_for("b").len() == 5
    })
    .await;
    stopped_at(&q, &cfg, &run.stats[0].engine_id, 0).await;
    // Releasing in Redis does not override the spec.
    killswitch::release(q.as_ref(), &cfg.keys, &Target::Agent("a".into()))
        .await
        .unwrap();
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        agent.calls_for("a").len(),
        0,
        "agent a is killed in the spec"
    );
    assert_eq!(agent.calls().len(), 5);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn engaged_in_the_spec_delivers_nothing_memory() {
    engaged_in_the_spec(false).await;
}

#[tokio::test]
async fn engaged_in_the_spec_delivers_nothing_redis() {
    engaged_in_the_spec(true).await;
}

/// `killSwitches.all: true` stops every agent.
#[tokio::test(start_paused = true)]
async fn all_engaged_in_the_spec_stops_every_agent() {
    let (_b, q) = queue(false).await;
    let cfg = Arc::new(workflow(
        "spec-all",
        "    - {name: a, image: x, consumes: in, produces: [mid]}\n    - {name: b, image: x, consumes: mid, produces: [done]}",
        "  killSwitches: {all: true}",
    ));
    add_tasks(&q, &cfg, "in", 3).await;
    add_tasks(&q, &cfg, "mid", 3).await;
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    for s in &run.stats {
        stopped_at(&q, &cfg, &s.engine_id, 0).await;
    }
    tokio::time::sleep(QUIET).await;
    assert_eq!(agent.calls().len(), 0);
    run.stop().await;
}

/// The switch state cannot be read (its key holds a string, so every read fails): the engine
/// stays stopped; once it can be read, it works.
#[tokio::test(start_paused = true)]
async fn unreadable_switch_state_delivers_nothing() {
    let (_b, q) = queue(false).await;
    let cfg = one_agent("unreadable");
    add_tasks(&q, &cfg, "in", 10).await;
    q.set(&cfg.keys.killswitch(), Bytes::from("garbage"), None)
        .await
        .unwrap();
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    stopped_at(&q, &cfg, &run.stats[0].engine_id, 0).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        agent.calls().len(),
        0,
        "a task was taken with the state unknown"
    );
    q.del(&[cfg.keys.killswitch()]).await.unwrap();
    all_delivered(&agent, 10).await;
    run.stop().await;
}

/// Redis unreachable when the engine starts, and back with the switch engaged (AOF): the
/// engine never delivers until the switch is released.
#[tokio::test]
async fn redis_unreachable_at_start_delivers_nothing() {
    let mut server = r4::testutil::RedisServer::start_with_aof()
        .await
        .expect("redis-server (make deps)");
    let q: Arc<dyn Queue> = Arc::new(
        r4::queue::redis::RedisQueue::connect(&server.url())
            .await
            .unwrap(),
    );
    let cfg = one_agent("unreachable");
    add_tasks(&q, &cfg, "in", 10).await;
    let v = killswitch::engage(q.as_ref(), &cfg.keys, &Target::All)
        .await
        .unwrap();
    server.kill();
    let agent = ScriptedAgent::ok();
    let run = start_agents(&cfg, &q, &agent);
    // The engine is up and retrying while Redis is away.
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.restart().await.unwrap();
    stopped_at(&q, &cfg, &run.stats[0].engine_id, v).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(agent.calls().len(), 0, "a task was taken while engaged");
    killswitch::release(q.as_ref(), &cfg.keys, &Target::All)
        .await
        .unwrap();
    all_delivered(&agent, 10).await;
    run.stop().await;
}
