//! Kill switches and safe stop: the switch state in Redis, its change
//! notifications, the watcher every engine runs, and acknowledgements.
//!
//! State: hash `r4:{ns/wf}:killswitch` with fields `all`, `agent:<name>`,
//! `tool:<name>` (`1` engaged, `0` or absent released) and `version` (from
//! the counter `killswitch:version`, bumped on every change). Every change
//! is announced on the channel `killswitch:chan` (the message is the
//! version). A [`watch`] re-reads the hash on every message, after every
//! (re)subscription and every [`REREAD`] — so a message lost while the
//! subscription was down cannot leave a switch unseen for longer than that.
//!
//! The consumer (not this module) stops reading when the switch covers it
//! and then calls [`acknowledge`]: hash `killswitch:acks`, one field per
//! engine, `{"version", "stopped", "at_ms"}`, which a controller counts.
//! Spec patching (`r4 kill` through the controller) lives elsewhere; this
//! module is what both the controller and `r4 kill --redis` call.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::queue::{Keys, Queue, QueueError, fields};

/// How often a watcher re-reads the state even without a message.
pub const REREAD: Duration = Duration::from_millis(500);

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

/// The switch state as read from Redis.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchState {
    pub version: u64,
    pub all: bool,
    pub agents: BTreeSet<String>,
    pub tools: BTreeSet<String>,
}

impl SwitchState {
    /// Whether an engine of `agent` (None: intake/repair) must stop taking tasks.
    pub fn stops(&self, agent: Option<&str>) -> bool {
        self.all || agent.is_some_and(|a| self.agents.contains(a))
    }

    pub fn tool_killed(&self, tool: &str) -> bool {
        self.tools.contains(tool)
    }
}

/// Read the current state.
pub async fn read(q: &dyn Queue, keys: &Keys) -> Result<SwitchState, QueueError> {
    let mut s = SwitchState::default();
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

/// Engage (`on`) or release a switch; returns the new state version.
pub async fn set(q: &dyn Queue, keys: &Keys, target: &Target, on: bool) -> Result<u64, QueueError> {
    let version = q.incr(&keys.killswitch_version(), 1).await?;
    let version = u64::try_from(version).unwrap_or(0);
    q.hset(
        &keys.killswitch(),
        fields([
            (target.field(), if on { "1" } else { "0" }.to_owned()),
            ("version".to_owned(), version.to_string()),
        ]),
    )
    .await?;
    q.publish(&keys.killswitch_channel(), Bytes::from(version.to_string()))
        .await?;
    Ok(version)
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
    pub at_ms: u64,
}

/// Record that `engine` has applied state `version` (stopped or running).
pub async fn acknowledge(
    q: &dyn Queue,
    keys: &Keys,
    engine: &str,
    version: u64,
    stopped: bool,
) -> Result<(), QueueError> {
    let ack = Ack {
        engine: engine.to_owned(),
        version,
        stopped,
        at_ms: super::task::now_ms(),
    };
    q.hset(
        &keys.killswitch_acks(),
        vec![(
            engine.to_owned(),
            Bytes::from(super::task::json_bytes(&ack)),
        )],
    )
    .await
}

/// Every engine's latest acknowledgement.
pub async fn acks(q: &dyn Queue, keys: &Keys) -> Result<Vec<Ack>, QueueError> {
    Ok(q.hgetall(&keys.killswitch_acks())
        .await?
        .into_iter()
        .filter_map(|(engine, v)| {
            serde_json::from_slice::<Ack>(&v)
                .ok()
                .map(|a| Ack { engine, ..a })
        })
        .collect())
}

/// Start a watcher: a background task keeping the returned receiver on the
/// current state (subscribe + re-read on message, on resubscribe, every
/// [`REREAD`]). It ends when every receiver is dropped.
pub fn watch(q: Arc<dyn Queue>, keys: Keys) -> watch::Receiver<SwitchState> {
    let (tx, rx) = watch::channel(SwitchState::default());
    tokio::spawn(async move {
        let refresh = |tx: &watch::Sender<SwitchState>, s: SwitchState| {
            tx.send_if_modified(|cur| {
                if *cur != s {
                    *cur = s;
                    true
                } else {
                    false
                }
            });
        };
        while !tx.is_closed() {
            let sub = tokio::time::timeout(
                Duration::from_secs(5),
                q.subscribe(&keys.killswitch_channel()),
            )
            .await;
            // Read after subscribing, so a change between the two is seen.
            if let Ok(s) = read(q.as_ref(), &keys).await {
                refresh(&tx, s);
            }
            let Ok(Ok(mut sub)) = sub else {
                tokio::time::sleep(REREAD).await;
                continue;
            };
            let mut tick = tokio::time::interval(REREAD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    msg = sub.next() => if msg.is_none() { break },
                    _ = tick.tick() => {},
                    _ = tx.closed() => return,
                }
                if let Ok(s) = read(q.as_ref(), &keys).await {
                    refresh(&tx, s);
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryQueue;

    #[tokio::test]
    async fn engage_release_and_watch() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let mut rx = watch(q.clone(), keys.clone());
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
        acknowledge(q.as_ref(), &keys, "e1", v3, false)
            .await
            .unwrap();
        let a = acks(q.as_ref(), &keys).await.unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!(
            (a[0].engine.as_str(), a[0].version, a[0].stopped),
            ("e1", v3, false)
        );
        assert_eq!(
            Target::parse_suffix(Some("tool:x")),
            Target::Tool("x".into())
        );
    }

    #[tokio::test]
    async fn a_missed_message_is_caught_by_the_reread() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf2");
        let mut rx = watch(q.clone(), keys.clone());
        // Change the hash without publishing: only the periodic re-read sees it.
        q.hset(&keys.killswitch(), fields([("all", "1"), ("version", "7")]))
            .await
            .unwrap();
        tokio::time::timeout(REREAD * 3, rx.wait_for(|s| s.all && s.version == 7))
            .await
            .expect("seen within a few re-read periods")
            .unwrap();
    }
}
