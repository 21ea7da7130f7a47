//! Kill switches through the API: `spec.killSwitches` is the source of truth; the controller
//! makes the workflow's Redis state (the engine's `killswitch` module: hash, version, channel)
//! say the same, and reports per switch in `status.killSwitches.<name>` when it was engaged, the
//! state version that set it and how many engines acknowledged that version.
//!
//! Names in the status: `all`, the agent's name, `tool:<name>`. A switch released in the spec
//! is released in Redis too — with a controller, a switch set directly with `r4 kill --redis`
//! lasts until the next reconcile.
//!
//! Counting: an engine acknowledged a switch when its acknowledgement (the engine's
//! `killswitch::Ack`) is for a state version at least the one that set the switch — it acts on
//! a state that includes the change. Engines covered: `all` → every agent engine; an agent →
//! its engines; `tool:<t>` → the engines of the agents that use `t`. Expected: the pods of the
//! covered agents' Deployments (`status.replicas`).

use std::collections::BTreeMap;

use crate::api::workflow::{AgentWorkflowSpec, KillSwitchStatus};
use crate::engine::killswitch::{self, Ack, SpecSwitches, SwitchState, Target};
use crate::queue::{Keys, Queue, QueueError};

/// Every switch the spec names, with whether it is engaged (`all` always; agents and tools
/// named in `spec.killSwitches`, engaged or not, and every engaged one).
pub fn desired(spec: &AgentWorkflowSpec) -> BTreeMap<String, (Target, bool)> {
    let mut out = BTreeMap::new();
    let ks = spec.kill_switches.clone().unwrap_or_default();
    out.insert("all".to_owned(), (Target::All, ks.all));
    for (a, on) in &ks.agents {
        out.insert(a.clone(), (Target::Agent(a.clone()), *on));
    }
    for (t, on) in &ks.tools {
        out.insert(format!("tool:{t}"), (Target::Tool(t.clone()), *on));
    }
    out
}

/// Make Redis say what the spec says. Returns the state after the changes and, for every switch
/// this call changed, the version of the change.
///
/// Redis fields for agents and tools the spec does not name are released if engaged (the spec
/// is the truth); each change is one atomic versioned step of the engine's module.
pub async fn sync(
    q: &dyn Queue,
    keys: &Keys,
    spec: &AgentWorkflowSpec,
) -> Result<(SwitchState, BTreeMap<String, u64>), QueueError> {
    let current = killswitch::read(q, keys).await?;
    let want = SpecSwitches::from_spec(spec.kill_switches.as_ref());
    let mut changed = BTreeMap::new();
    let mut state = current.clone();
    if current.all != want.all {
        let v = killswitch::set(q, keys, &Target::All, want.all).await?;
        changed.insert("all".to_owned(), v);
        state.all = want.all;
        state.version = v;
    }
    for a in current.agents.symmetric_difference(&want.agents) {
        let on = want.agents.contains(a);
        let v = killswitch::set(q, keys, &Target::Agent(a.clone()), on).await?;
        changed.insert(a.clone(), v);
        state.version = v;
    }
    for t in current.tools.symmetric_difference(&want.tools) {
        let on = want.tools.contains(t);
        let v = killswitch::set(q, keys, &Target::Tool(t.clone()), on).await?;
        changed.insert(format!("tool:{t}"), v);
        state.version = v;
    }
    state.agents = want.agents;
    state.tools = want.tools;
    Ok((state, changed))
}

/// What the status says of every switch (pure).
///
/// - `previous`: the status as it was (keeps `since` and `stateVersion` of unchanged switches);
/// - `changed`: versions of the changes [`sync`] just made;
/// - `redis_version`: the state version now (for a switch whose setting version is unknown —
///   the status was lost — the current version is the conservative choice);
/// - `acks`: the live engines' acknowledgements; `replicas`: pods per agent.
pub fn status(
    spec: &AgentWorkflowSpec,
    previous: &BTreeMap<String, KillSwitchStatus>,
    changed: &BTreeMap<String, u64>,
    redis_version: Option<u64>,
    acks: &[Ack],
    replicas: &BTreeMap<String, i32>,
    now: &str,
) -> BTreeMap<String, KillSwitchStatus> {
    let mut out = BTreeMap::new();
    for (name, (target, engaged)) in desired(spec) {
        let before = previous.get(&name);
        // `all` released and never engaged says nothing worth a line.
        if name == "all"
            && !engaged
            && before.is_none_or(|b| !b.engaged)
            && !changed.contains_key(&name)
        {
            continue;
        }
        let version = match changed.get(&name) {
            Some(v) => Some(*v),
            None => before
                .filter(|b| b.engaged == engaged)
                .and_then(|b| b.state_version.map(|v| v as u64))
                .or(redis_version),
        };
        let agents: Vec<&str> = match &target {
            Target::All => spec.agents.iter().map(|a| a.name.as_str()).collect(),
            Target::Agent(a) => vec![a.as_str()],
            Target::Tool(t) => spec
                .agents
                .iter()
                .filter(|a| a.tools.contains(t))
                .map(|a| a.name.as_str())
                .collect(),
        };
        let expected: i32 = agents
            .iter()
            .map(|a| replicas.get(*a).copied().unwrap_or(0))
            .sum();
        let acknowledged = acks
            .iter()
            .filter(|k| k.agent.as_deref().is_some_and(|a| agents.contains(&a)))
            .filter(|k| version.is_some_and(|v| k.version >= v))
            .count();
        let since = if engaged {
            before
                .filter(|b| b.engaged)
                .and_then(|b| b.since.clone())
                .or_else(|| Some(now.to_owned()))
        } else {
            None
        };
        out.insert(
            name,
            KillSwitchStatus {
                engaged,
                since,
                state_version: version.map(|v| v as i64),
                acknowledged: i32::try_from(acknowledged).unwrap_or(i32::MAX),
                expected,
            },
        );
    }
    out
}

/// The printer column: `off`, `all`, or the engaged names.
pub fn summary(switches: &BTreeMap<String, KillSwitchStatus>) -> String {
    let engaged: Vec<&str> = switches
        .iter()
        .filter(|(_, s)| s.engaged)
        .map(|(n, _)| n.as_str())
        .collect();
    if engaged.is_empty() {
        "off".into()
    } else if engaged.contains(&"all") {
        "all".into()
    } else {
        engaged.join(",")
    }
}

/// Whether every engaged or just-changed switch is acknowledged by every expected engine.
pub fn settled(switches: &BTreeMap<String, KillSwitchStatus>) -> bool {
    switches.values().all(|s| s.acknowledged >= s.expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryQueue;

    fn spec(yaml: &str) -> AgentWorkflowSpec {
        serde_yaml::from_str(yaml).expect("test spec")
    }

    const BASE: &str = r#"
queue: {redis: {url: "redis://localhost:6379"}}
tools: [{name: bank, url: "http://bank:80"}]
agents:
  - {name: a, image: a, consumes: in, produces: [mid], tools: [bank]}
  - {name: b, image: b, consumes: mid}
"#;

    fn ack(engine: &str, agent: &str, version: u64) -> Ack {
        Ack {
            engine: engine.into(),
            agent: Some(agent.into()),
            version,
            stopped: true,
            at_ms: 1,
            seen_ms: 1,
        }
    }

    #[tokio::test]
    async fn sync_makes_redis_say_what_the_spec_says_and_only_changes_what_differs() {
        let q = MemoryQueue::new();
        let keys = Keys::new("ns", "wf");
        let mut s = spec(BASE);
        let (state, changed) = sync(&q, &keys, &s).await.unwrap();
        assert!(changed.is_empty(), "{changed:?}");
        assert!(!state.all);
        s.kill_switches = Some(crate::api::workflow::KillSwitchesSpec {
            all: false,
            agents: [("a".to_string(), true), ("b".to_string(), false)].into(),
            tools: [("bank".to_string(), true)].into(),
        });
        let (_, changed) = sync(&q, &keys, &s).await.unwrap();
        assert_eq!(changed.keys().collect::<Vec<_>>(), ["a", "tool:bank"]);
        let r = killswitch::read(&q, &keys).await.unwrap();
        assert!(r.agents.contains("a") && r.tools.contains("bank") && !r.all);
        // Nothing differs: nothing written, the version stays.
        let (_, again) = sync(&q, &keys, &s).await.unwrap();
        assert!(again.is_empty());
        assert_eq!(
            killswitch::read(&q, &keys).await.unwrap().version,
            r.version
        );
        // A switch engaged directly in Redis but not in the spec is released.
        killswitch::engage(&q, &keys, &Target::Agent("b".into()))
            .await
            .unwrap();
        let (_, fixed) = sync(&q, &keys, &s).await.unwrap();
        assert_eq!(fixed.keys().collect::<Vec<_>>(), ["b"]);
        assert!(
            !killswitch::read(&q, &keys)
                .await
                .unwrap()
                .agents
                .contains("b")
        );
    }

    #[test]
    fn acknowledgements_count_only_covered_engines_on_a_new_enough_version() {
        let mut s = spec(BASE);
        s.kill_switches = Some(crate::api::workflow::KillSwitchesSpec {
            all: false,
            agents: [("a".to_string(), true)].into(),
            tools: [("bank".to_string(), true)].into(),
        });
        let changed = BTreeMap::from([("a".to_string(), 7), ("tool:bank".to_string(), 8)]);
        let acks = vec![
            ack("a-1", "a", 8),
            ack("a-2", "a", 6), // not yet
            ack("b-1", "b", 9), // not covered by `a`
        ];
        let replicas = BTreeMap::from([("a".to_string(), 2), ("b".to_string(), 1)]);
        let st = status(
            &s,
            &BTreeMap::new(),
            &changed,
            Some(9),
            &acks,
            &replicas,
            "T0",
        );
        let a = &st["a"];
        assert!(a.engaged);
        assert_eq!((a.acknowledged, a.expected), (1, 2));
        assert_eq!(a.state_version, Some(7));
        assert_eq!(a.since.as_deref(), Some("T0"));
        // `a` uses the tool: a-1 has applied version 8, the tool's change; a-2 has not.
        let bank = &st["tool:bank"];
        assert_eq!((bank.acknowledged, bank.expected), (1, 2));
        assert!(!st.contains_key("all"), "never engaged: no line");
        assert!(!settled(&st));
        assert_eq!(summary(&st), "a,tool:bank");
        // Next reconcile: nothing changed; since and version are kept.
        let acks = vec![ack("a-1", "a", 8), ack("a-2", "a", 8)];
        let st2 = status(&s, &st, &BTreeMap::new(), Some(9), &acks, &replicas, "T1");
        assert_eq!(st2["a"].since.as_deref(), Some("T0"));
        assert_eq!(st2["a"].state_version, Some(7));
        assert_eq!((st2["a"].acknowledged, st2["a"].expected), (2, 2));
        assert!(settled(&st2));
    }

    #[test]
    fn releasing_clears_since_and_asks_for_new_acknowledgements() {
        let mut s = spec(BASE);
        s.kill_switches = Some(crate::api::workflow::KillSwitchesSpec {
            all: true,
            ..Default::default()
        });
        let replicas = BTreeMap::from([("a".to_string(), 1), ("b".to_string(), 1)]);
        let on = status(
            &s,
            &BTreeMap::new(),
            &BTreeMap::from([("all".to_string(), 3)]),
            Some(3),
            &[ack("a-1", "a", 3), ack("b-1", "b", 3)],
            &replicas,
            "T0",
        );
        assert_eq!(summary(&on), "all");
        assert_eq!((on["all"].acknowledged, on["all"].expected), (2, 2));
        s.kill_switches = None;
        let off = status(
            &s,
            &on,
            &BTreeMap::from([("all".to_string(), 4)]),
            Some(4),
            &[ack("a-1", "a", 3), ack("b-1", "b", 4)],
            &replicas,
            "T1",
        );
        assert!(!off["all"].engaged);
        assert_eq!(off["all"].since, None);
        assert_eq!((off["all"].acknowledged, off["all"].expected), (1, 2));
        assert_eq!(summary(&off), "off");
    }
}
