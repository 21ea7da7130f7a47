//! Kill switches and safe stop: the switch state in Redis, its change
//! notifications, the watcher every engine runs, acknowledgements, and the
//! names a switch may target.
//!
//! State: hash `r4:{ns/wf}:killswitch` with fields `all`, `agent:<name>`,
//! `tool:<name>` (`1` engaged, `0` or absent released) and `version` (from
//! the counter `killswitch:version`). [`set`] changes a field, bumps the
//! version and announces it on the channel `killswitch:chan` in ONE atomic
//! step ([`Queue::hset_versioned`]), so the version never goes backwards and
//! names one state. A [`watch`] re-reads the hash on every message, after
//! every (re)subscription and every [`REREAD`] — so a message lost while the
//! subscription was down cannot leave a switch unseen for longer than that.
//!
//! **Fail closed.** A watcher starts with the state *unknown*, and an unknown
//! state stops everything ([`SwitchState::stops`] and
//! [`SwitchState::tool_killed`] answer true) until the first successful read:
//! an engine started while its switch is engaged, or while Redis is
//! unreachable, takes no task and forwards no tool call. The switches of the
//! workflow's spec (`spec.killSwitches`) are merged into every state a
//! watcher publishes: engaged in the spec is engaged, whatever Redis says.
//!
//! The consumer (not this module) stops reading when the switch covers it
//! and reports it to an [`Acknowledger`], which keeps the engine's field of
//! the hash `killswitch:acks` (`{"version", "stopped", "at_ms"}`) current —
//! on every change and every [`ACK_REFRESH`] — and removes it when the engine
//! stops. [`acks`] drops (and deletes) acknowledgements older than
//! [`ACK_STALE`]: those of engines that died without saying so, which would
//! otherwise stay in the hash forever.
//!
//! Every engine also writes the workflow's agent and tool names on start
//! ([`publish_topology`]); `r4 kill --redis` checks its target against them,
//! so a typo is refused instead of engaging a switch nothing obeys.
//! Spec patching (`r4 kill` through the controller) lives elsewhere; this
//! module is what both the controller and `r4 kill --redis` call.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::api::workflow::{AgentWorkflowSpec, KillSwitchesSpec};
use crate::queue::{Keys, Queue, QueueError, fields};

/// How often a watcher re-reads the state even without a message.
pub const REREAD: Duration = Duration::from_millis(500);

/// How often an engine re-writes its acknowledgement when nothing changed.
pub const ACK_REFRESH: Duration = Duration::from_secs(5);

/// An acknowledgement older than this is an engine that is gone (6 missed
/// refreshes, 60 re-read periods): [`acks`] drops and deletes it.
pub const ACK_STALE: Duration = Duration::from_secs(30);

/// What a switch covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    All,
    Agent(String),
    Tool(String),
}

impl Target {
    /// `WORKFLOW` → All, `WORKFLOW/AGENT` → Agent; `tool:NAME` after the
    /// slash → Tool.
    pub fn parse_suffix(s: Option<&str>) -> Self {
        match s {
            None | Some("") => Target::All,
            Some(t) => match t.strip_prefix("tool:") {
                Some(tool) => Target::Tool(tool.to_owned()),
                None => Target::Agent(t.to_owned()),
            },
        }
    }

    fn field(&self) -> String {
        match self {
            Target::All => "all".into(),
            Target::Agent(a) => format!("agent:{a}"),
            Target::Tool(t) => format!("tool:{t}"),
        }
    }
}

/// The switches engaged in a workflow's spec (`spec.killSwitches`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecSwitches {
    pub all: bool,
    pub agents: BTreeSet<String>,
    pub tools: BTreeSet<String>,
}

impl SpecSwitches {
    pub fn from_spec(ks: Option<&KillSwitchesSpec>) -> Self {
        let engaged = |m: &std::collections::BTreeMap<String, bool>| {
            m.iter()
                .filter(|(_, on)| **on)
                .map(|(n, _)| n.clone())
                .collect()
        };
        match ks {
            None => Self::default(),
            Some(ks) => Self {
                all: ks.all,
                agents: engaged(&ks.agents),
                tools: engaged(&ks.tools),
            },
        }
    }
}

/// The switch state an engine acts on.
///
/// `Default` is the state before the first read: unknown, which stops
/// everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchState {
    /// Version of the Redis state (0 before the first [`set`], and while unknown).
    pub version: u64,
    /// Whether the state has been read at all. While false, every agent is
    /// stopped and every tool killed.
    pub known: bool,
    pub all: bool,
    pub agents: BTreeSet<String>,
    pub tools: BTreeSet<String>,
}

impl SwitchState {
    /// Whether an engine of `agent` (None: intake/repair) must stop taking
    /// tasks. True for everyone while the state is unknown.
    pub fn stops(&self, agent: Option<&str>) -> bool {
        !self.known || self.all || agent.is_some_and(|a| self.agents.contains(a))
    }

    /// Whether calls to `tool` must be refused. True for every tool while the
    /// state is unknown.
    pub fn tool_killed(&self, tool: &str) -> bool {
        !self.known || self.tools.contains(tool)
    }

    /// Add the switches engaged in the spec.
    pub fn merge(&mut self, spec: &SpecSwitches) {
        self.all |= spec.all;
        self.agents.extend(spec.agents.iter().cloned());
        self.tools.extend(spec.tools.iter().cloned());
    }
}

/// Read the current state from Redis (known, without the spec's switches).
pub async fn read(q: &dyn Queue, keys: &Keys) -> Result<SwitchState, QueueError> {
    let mut s = SwitchState {
        known: true,
        ..SwitchState::default()
    };
    for (k, v) in q.hgetall(&keys.killswitch()).await? {
        let on = v.as_ref() == b"1";
        if k == "version" {
            s.version = std::str::from_utf8(&v)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
        } else if k == "all" {
            s.all = on;
        } else if let Some(a) = k.strip_prefix("agent:") {
            if on {
                s.agents.insert(a.to_owned());
            }
        } else if let Some(t) = k.strip_prefix("tool:")
            && on
        {
            s.tools.insert(t.to_owned());
        }
    }
    Ok(s)
}

/// Engage (`on`) or release a switch; returns the new state version. One
/// atomic step: the field, the version and the announcement go together.
pub async fn set(q: &dyn Queue, keys: &Keys, target: &Target, on: bool) -> Result<u64, QueueError> {
    q.hset_versioned(
        &keys.killswitch(),
        &keys.killswitch_version(),
        &keys.killswitch_channel(),
        fields([(target.field(), if on { "1" } else { "0" })]),
    )
    .await
}

pub async fn engage(q: &dyn Queue, keys: &Keys, target: &Target) -> Result<u64, QueueError> {
    set(q, keys, target, true).await
}

pub async fn release(q: &dyn Queue, keys: &Keys, target: &Target) -> Result<u64, QueueError> {
    set(q, keys, target, false).await
}

/// One engine's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    #[serde(default)]
    pub engine: String,
    pub version: u64,
    pub stopped: bool,
    /// When the engine applied this state (stopped reading, or resumed).
    pub at_ms: u64,
    /// When the engine last confirmed it (refreshed every [`ACK_REFRESH`]):
    /// what [`acks`] judges liveness by.
    #[serde(default)]
    pub seen_ms: u64,
    /// The agent the engine serves (None: an intake or repair engine), so the controller
    /// can count, per switch, the engines of the agents it covers that acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

impl Ack {
    fn last_seen_ms(&self) -> u64 {
        self.at_ms.max(self.seen_ms)
    }
}

/// Record that `engine` (serving `agent`, if an agent engine) has applied state `version`
/// (stopped or running), now. Engines call this through an [`Acknowledger`], which also
/// refreshes it.
pub async fn acknowledge(
    q: &dyn Queue,
    keys: &Keys,
    engine: &str,
    agent: Option<&str>,
    version: u64,
    stopped: bool,
) -> Result<(), QueueError> {
    let now = super::task::now_ms();
    write_ack(
        q,
        keys,
        &Ack {
            engine: engine.to_owned(),
            version,
            stopped,
            at_ms: now,
            seen_ms: now,
            agent: agent.map(str::to_owned),
        },
    )
    .await
}

async fn write_ack(q: &dyn Queue, keys: &Keys, ack: &Ack) -> Result<(), QueueError> {
    q.hset(
        &keys.killswitch_acks(),
        vec![(
            ack.engine.clone(),
            Bytes::from(super::task::json_bytes(ack)),
        )],
    )
    .await
}

/// The latest acknowledgement of every live engine. Acknowledgements older
/// than [`ACK_STALE`] (or unreadable) belong to engines that are gone: they
/// are left out and deleted, so the hash holds one field per live engine.
/// (A live engine whose stale field is deleted in the instant it refreshes
/// it writes it again within [`ACK_REFRESH`].)
pub async fn acks(q: &dyn Queue, keys: &Keys) -> Result<Vec<Ack>, QueueError> {
    let oldest = super::task::now_ms().saturating_sub(ACK_STALE.as_millis() as u64);
    let mut live = Vec::new();
    let mut gone = Vec::new();
    for (engine, v) in q.hgetall(&keys.killswitch_acks()).await? {
        match serde_json::from_slice::<Ack>(&v) {
            Ok(a) if a.last_seen_ms() >= oldest => live.push(Ack { engine, ..a }),
            _ => gone.push(engine),
        }
    }
    if !gone.is_empty()
        && let Err(e) = q.hdel(&keys.killswitch_acks(), &gone).await
    {
        tracing::debug!(error = %e, "cannot delete stale kill-switch acknowledgements");
    }
    Ok(live)
}

/// Keeps one engine's acknowledgement current from a background task: the
/// engine reports what it applied with [`Acknowledger::set`] (cheap, never
/// waits; the time of the change is taken there); the task writes it on every
/// change and every [`ACK_REFRESH`] (retrying after [`REREAD`] when Redis
/// fails), and deletes the engine's field when the `Acknowledger` is dropped
/// (the engine stopped).
pub struct Acknowledger {
    /// `(version, stopped, at_ms)` last applied.
    tx: watch::Sender<Option<(u64, bool, u64)>>,
}

impl Acknowledger {
    /// Start the writer of `engine`'s acknowledgement; `agent` is the agent it serves (None:
    /// an intake or repair engine), recorded in every [`Ack`].
    pub fn start(q: Arc<dyn Queue>, keys: Keys, engine: String, agent: Option<String>) -> Self {
        let (tx, mut rx) = watch::channel(None::<(u64, bool, u64)>);
        tokio::spawn(async move {
            loop {
                let current = *rx.borrow_and_update();
                let wait = match current {
                    None => None,
                    Some((version, stopped, at_ms)) => {
                        let ack = Ack {
                            engine: engine.clone(),
                            version,
                            stopped,
                            at_ms,
                            seen_ms: super::task::now_ms(),
                            agent: agent.clone(),
                        };
                        Some(match write_ack(q.as_ref(), &keys, &ack).await {
                            Ok(()) => ACK_REFRESH,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot acknowledge kill switch");
                                REREAD
                            }
                        })
                    }
                };
                let closed = match wait {
                    None => rx.changed().await.is_err(),
                    Some(d) => tokio::select! {
                        r = rx.changed() => r.is_err(),
                        _ = tokio::time::sleep(d) => false,
                    },
                };
                if closed {
                    break;
                }
            }
            let _ = q.hdel(&keys.killswitch_acks(), &[engine]).await;
        });
        Self { tx }
    }

    /// The engine now applies state `version`, `stopped` or running.
    pub fn set(&self, version: u64, stopped: bool) {
        self.tx.send_if_modified(|cur| {
            if cur.is_some_and(|(v, s, _)| (v, s) == (version, stopped)) {
                return false;
            }
            *cur = Some((version, stopped, super::task::now_ms()));
            true
        });
    }
}

/// Start a watcher: a background task keeping the returned receiver on the
/// current state (subscribe + re-read on message, on resubscribe, every
/// [`REREAD`]), with `spec`'s switches merged in. The state starts unknown
/// (everything stopped) and stays so until a read succeeds. The task ends
/// when every receiver is dropped.
pub fn watch(q: Arc<dyn Queue>, keys: Keys, spec: SpecSwitches) -> watch::Receiver<SwitchState> {
    let (tx, rx) = watch::channel(SwitchState::default());
    tokio::spawn(async move {
        let refresh = |tx: &watch::Sender<SwitchState>, mut s: SwitchState| {
            s.merge(&spec);
            tx.send_if_modified(|cur| {
                if *cur != s {
                    *cur = s;
                    true
                } else {
                    false
                }
            });
        };
        let channel = keys.killswitch_channel();
        let (q, keys, tx, refresh) = (q.as_ref(), &keys, &tx, &refresh);
        super::follow::follow(q, &channel, REREAD, tx, |first| async move {
            match read(q, keys).await {
                Ok(s) => refresh(tx, s),
                Err(e) if first && !tx.borrow().known => {
                    tracing::warn!(error = %e, "cannot read the kill switches; stopped until they are read");
                }
                Err(_) => {}
            }
        })
        .await;
    });
    rx
}

/// The names a workflow's switches may target, as its engines run it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub agents: Vec<String>,
    pub tools: Vec<String>,
}

impl Topology {
    pub fn of(spec: &AgentWorkflowSpec) -> Self {
        Self {
            agents: spec.agents.iter().map(|a| a.name.clone()).collect(),
            tools: spec.tools.iter().map(|t| t.name.clone()).collect(),
        }
    }

    /// Whether `target` names something of this workflow; the error is one
    /// line naming what exists (`workflow` is how to call it in the message).
    pub fn check(&self, workflow: &str, target: &Target) -> Result<(), String> {
        let list = |names: &[String]| {
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        };
        match target {
            Target::All => Ok(()),
            Target::Agent(a) if self.agents.contains(a) => Ok(()),
            Target::Agent(a) => Err(format!(
                "unknown agent {a:?} in workflow {workflow} (agents: {})",
                list(&self.agents)
            )),
            Target::Tool(t) if self.tools.contains(t) => Ok(()),
            Target::Tool(t) => Err(format!(
                "unknown tool {t:?} in workflow {workflow} (tools: {})",
                list(&self.tools)
            )),
        }
    }
}

/// Record the workflow's names (every engine does on start; the latest
/// start wins, so a changed spec is reflected once its engines restart).
pub async fn publish_topology(q: &dyn Queue, keys: &Keys, t: &Topology) -> Result<(), QueueError> {
    q.set(
        &keys.topology(),
        Bytes::from(super::task::json_bytes(t)),
        None,
    )
    .await
}

/// The workflow's names as its engines last published them; `None` when no
/// engine of the workflow has run on this Redis.
pub async fn topology(q: &dyn Queue, keys: &Keys) -> Result<Option<Topology>, QueueError> {
    Ok(q.get(&keys.topology())
        .await?
        .and_then(|v| serde_json::from_slice(&v).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryQueue;
    use crate::queue::redis::RedisQueue;
    use futures::StreamExt;

    fn none() -> SpecSwitches {
        SpecSwitches::default()
    }

    #[tokio::test]
    async fn engage_release_and_watch() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let mut rx = watch(q.clone(), keys.clone(), none());
        let v1 = engage(q.as_ref(), &keys, &Target::Agent("coder".into()))
            .await
            .unwrap();
        let s = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.version == v1))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert!(s.stops(Some("coder")) && !s.stops(Some("planner")) && !s.stops(None));
        engage(q.as_ref(), &keys, &Target::Tool("bank".into()))
            .await
            .unwrap();
        let v3 = release(q.as_ref(), &keys, &Target::Agent("coder".into()))
            .await
            .unwrap();
        let s = read(q.as_ref(), &keys).await.unwrap();
        assert_eq!(s.version, v3);
        assert!(s.tool_killed("bank") && !s.stops(Some("coder")));
        acknowledge(q.as_ref(), &keys, "e1", Some("coder"), v3, false)
            .await
            .unwrap();
        let a = acks(q.as_ref(), &keys).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].engine.as_str(), a[0].version, a[0].stopped),
            ("e1", v3, false)
        );
        assert_eq!(a[0].agent.as_deref(), Some("coder"));
        // An acknowledgement written before acks named their agent still reads (no agent),
        // and one without an agent is written without the field.
        let old: Ack =
            serde_json::from_str(r#"{"engine":"e0","version":1,"stopped":true,"at_ms":5}"#)
                .unwrap();
        assert_eq!(old.agent, None);
        assert!(!serde_json::to_string(&old).unwrap().contains("agent"));
        assert_eq!(
            Target::parse_suffix(Some("tool:x")),
            Target::Tool("x".into())
        );
    }

    #[tokio::test]
    async fn a_missed_message_is_caught_by_the_reread() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf2");
        let mut rx = watch(q.clone(), keys.clone(), none());
        // Change the hash without publishing: only the periodic re-read sees it.
        q.hset(&keys.killswitch(), fields([("all", "1"), ("version", "7")]))
            .await
            .unwrap();
        tokio::time::timeout(REREAD * 3, rx.wait_for(|s| s.all && s.version == 7))
            .await
            .expect("seen within a few re-read periods")
            .unwrap();
    }

    #[test]
    fn an_unknown_state_stops_everything() {
        let s = SwitchState::default();
        assert!(!s.known);
        assert!(s.stops(None) && s.stops(Some("a")) && s.tool_killed("t"));
        let known = SwitchState {
            known: true,
            ..SwitchState::default()
        };
        assert!(!known.stops(None) && !known.stops(Some("a")) && !known.tool_killed("t"));
    }

    /// A state that cannot be read (here: the key holds a string) keeps everything stopped;
    /// the first good read releases it.
    #[tokio::test(start_paused = true)]
    async fn unreadable_state_stays_stopped_until_read() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "unreadable");
        q.set(&keys.killswitch(), Bytes::from("garbage"), None)
            .await
            .unwrap();
        let mut rx = watch(q.clone(), keys.clone(), none());
        tokio::time::sleep(REREAD * 10).await;
        assert!(!rx.borrow().known && rx.borrow().stops(Some("a")));
        q.del(&[keys.killswitch()]).await.unwrap();
        tokio::time::timeout(REREAD * 3, rx.wait_for(|s| s.known))
            .await
            .expect("known after the next re-read")
            .unwrap();
        assert!(!rx.borrow().stops(Some("a")));
    }

    /// Redis unreachable when the watcher starts: stopped, until Redis answers.
    #[tokio::test]
    async fn redis_unreachable_at_start_stays_stopped() {
        let mut server = crate::testutil::RedisServer::start()
            .await
            .expect("redis-server (make deps)");
        let q: Arc<dyn Queue> = Arc::new(RedisQueue::connect(&server.url()).await.unwrap());
        let keys = Keys::new("ns", "down");
        server.kill();
        let mut rx = watch(q.clone(), keys.clone(), none());
        tokio::time::sleep(REREAD * 4).await;
        assert!(
            !rx.borrow().known && rx.borrow().stops(Some("a")),
            "{:?}",
            *rx.borrow()
        );
        server.restart().await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), rx.wait_for(|s| s.known))
            .await
            .expect("known once Redis is back")
            .unwrap();
    }

    #[tokio::test]
    async fn spec_switches_are_merged_and_cannot_be_released_in_redis() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "spec");
        let spec = SpecSwitches {
            all: false,
            agents: BTreeSet::from(["a".to_string()]),
            tools: BTreeSet::from(["bank".to_string()]),
        };
        let mut rx = watch(q.clone(), keys.clone(), spec);
        let s = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.known))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert!(s.stops(Some("a")) && !s.stops(Some("b")) && !s.stops(None));
        assert!(s.tool_killed("bank") && !s.tool_killed("ledger"));
        let v = release(q.as_ref(), &keys, &Target::Agent("a".into()))
            .await
            .unwrap();
        let s = tokio::time::timeout(Duration::from_secs(2), rx.wait_for(|s| s.version == v))
            .await
            .unwrap()
            .unwrap()
            .clone();
        assert!(s.stops(Some("a")), "the spec keeps it engaged");
        let all = SpecSwitches {
            all: true,
            ..SpecSwitches::default()
        };
        let s = SwitchState {
            known: true,
            ..SwitchState::default()
        };
        let mut merged = s.clone();
        merged.merge(&all);
        assert!(merged.stops(None) && merged.stops(Some("x")));
    }

    /// Concurrent setters: every change gets its own version, the hash ends on the highest,
    /// and a wrong-typed key fails before anything is written.
    async fn set_is_one_step(q: Arc<dyn Queue>) {
        let keys = Keys::new("ns", &format!("atomic-{}", uuid::Uuid::new_v4().simple()));
        let mut sub = q.subscribe(&keys.killswitch_channel()).await.unwrap();
        let mut handles = Vec::new();
        for i in 0..40 {
            let (q, keys) = (q.clone(), keys.clone());
            handles.push(tokio::spawn(async move {
                let t = Target::Agent(format!("a{}", i % 4));
                set(q.as_ref(), &keys, &t, i % 2 == 0).await.unwrap()
            }));
        }
        let mut versions = Vec::new();
        for h in handles {
            versions.push(h.await.unwrap());
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=40).collect::<Vec<u64>>());
        assert_eq!(read(q.as_ref(), &keys).await.unwrap().version, 40);
        let first = tokio::time::timeout(Duration::from_secs(2), sub.next())
            .await
            .unwrap()
            .unwrap();
        assert!(std::str::from_utf8(&first).unwrap().parse::<u64>().is_ok());
        // A hash key of another type: refused, and the counter did not move.
        let bad = Keys::new("ns", &format!("bad-{}", uuid::Uuid::new_v4().simple()));
        q.set(&bad.killswitch(), Bytes::from("x"), None)
            .await
            .unwrap();
        assert!(set(q.as_ref(), &bad, &Target::All, true).await.is_err());
        assert_eq!(q.get(&bad.killswitch_version()).await.unwrap(), None);
    }

    #[tokio::test]
    async fn set_is_one_step_in_memory() {
        set_is_one_step(Arc::new(MemoryQueue::new())).await;
    }

    #[tokio::test]
    async fn set_is_one_step_on_redis() {
        let server = crate::testutil::RedisServer::start()
            .await
            .expect("redis-server (make deps)");
        set_is_one_step(Arc::new(RedisQueue::connect(&server.url()).await.unwrap())).await;
    }

    #[tokio::test(start_paused = true)]
    async fn acks_of_gone_engines_expire_and_live_ones_stay() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "acks");
        // An engine that died long ago left this behind.
        let long_ago =
            super::super::task::now_ms().saturating_sub(ACK_STALE.as_millis() as u64 + 1);
        let old = Ack {
            engine: "gone".into(),
            version: 1,
            stopped: false,
            at_ms: long_ago,
            seen_ms: long_ago,
            agent: None,
        };
        q.hset(
            &keys.killswitch_acks(),
            vec![(
                "gone".into(),
                Bytes::from(serde_json::to_vec(&old).unwrap()),
            )],
        )
        .await
        .unwrap();
        let live =
            Acknowledger::start(q.clone(), keys.clone(), "live".into(), Some("coder".into()));
        live.set(3, true);
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Much later, with no change: the live engine's refreshes keep it.
        tokio::time::sleep(ACK_STALE * 3).await;
        let a = acks(q.as_ref(), &keys).await.unwrap();
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(
            (a[0].engine.as_str(), a[0].version, a[0].stopped),
            ("live", 3, true)
        );
        assert_eq!(a[0].agent.as_deref(), Some("coder"), "the agent is named");
        assert!(
            a[0].seen_ms > a[0].at_ms,
            "refreshed, still saying when it stopped"
        );
        let fields: Vec<String> = q
            .hgetall(&keys.killswitch_acks())
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(fields, ["live"], "the stale field is deleted");
        // A stopped engine takes its field with it.
        drop(live);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(q.hgetall(&keys.killswitch_acks()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn topology_names_what_exists() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "topo");
        assert_eq!(topology(q.as_ref(), &keys).await.unwrap(), None);
        let t = Topology {
            agents: vec!["intake".into(), "enricher".into()],
            tools: vec![],
        };
        publish_topology(q.as_ref(), &keys, &t).await.unwrap();
        let t = topology(q.as_ref(), &keys).await.unwrap().unwrap();
        assert!(t.check("ns/topo", &Target::All).is_ok());
        assert!(
            t.check("ns/topo", &Target::Agent("enricher".into()))
                .is_ok()
        );
        assert_eq!(
            t.check("ns/topo", &Target::Agent("enrichr".into())),
            Err("unknown agent \"enrichr\" in workflow ns/topo (agents: intake, enricher)".into())
        );
        assert_eq!(
            t.check("ns/topo", &Target::Tool("bank".into())),
            Err("unknown tool \"bank\" in workflow ns/topo (tools: none)".into())
        );
    }
}
