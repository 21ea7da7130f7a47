//! Degraded mode: deciding whether an agent runs degraded (a tool in its
//! `degradedMode.whenToolsDown` is down) and broadcasting the downgrade.
//!
//! A tool is down when it is killed (`killSwitches.tools` in the spec, or
//! the `tool:<name>` kill switch in Redis) or its published breaker is open
//! ([`super::breakers`]). What a degraded consumer then does with a task
//! (route, pause, fail) is the consumer's; this module only decides and
//! announces: key `r4:{ns/wf}:degraded:<agent>` (JSON, removed on recovery)
//! and a message on `r4:{ns/wf}:degraded:chan`.
//!
//! Fallback first: a tool whose breaker is open but whose fallback may still
//! answer (a cache of earlier answers, a static answer; see
//! [`super::config::WorkflowConfig::fallback_may_answer`]) is listed in
//! [`Downgrade::fallback`]. While every down tool is such a tool, tasks are
//! still delivered ([`Downgrade::before_delivery`] is false) and only those
//! whose call the fallback could not answer are downgraded, after delivery.
//! A killed tool is refused by the proxy before any fallback, so it never
//! counts as served.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::api::workflow::DegradedAction;
use crate::queue::{Keys, Queue, QueueError};

use super::config::Agent;

/// An agent's active downgrade.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Downgrade {
    pub agent: String,
    pub action: DegradedAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
    /// The required tools that are down.
    pub tools: Vec<String>,
    /// Of `tools`, those whose fallback may still answer for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback: Vec<String>,
    pub since_ms: u64,
}

impl Downgrade {
    /// Whether tasks are downgraded before they are delivered: some down tool has no fallback
    /// that could answer for it. Otherwise tasks are delivered and only a failure attributed
    /// to a down tool downgrades the task ([`Downgrade::covers`]).
    pub fn before_delivery(&self) -> bool {
        self.tools.iter().any(|t| !self.fallback.contains(t))
    }

    /// Whether a failure attributed to `tool` is this downgrade's to handle.
    pub fn covers(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t == tool)
    }
}

/// The downgrade `agent` is in, given the tools that are down and, among them, those whose
/// fallback may answer for them (`served`).
pub fn decide(
    agent: &Agent,
    down: &BTreeSet<String>,
    served: &BTreeSet<String>,
) -> Option<Downgrade> {
    let mode = agent.degraded.as_ref()?;
    let tools: Vec<String> = mode
        .when_tools_down
        .iter()
        .filter(|t| down.contains(*t))
        .cloned()
        .collect();
    let fallback = tools
        .iter()
        .filter(|t| served.contains(*t))
        .cloned()
        .collect();
    (!tools.is_empty()).then(|| Downgrade {
        agent: agent.name.clone(),
        action: mode.action,
        to: mode.to.clone(),
        tools,
        fallback,
        since_ms: super::task::now_ms(),
    })
}

/// Announce a change (`None`: back to normal).
pub async fn broadcast(
    q: &dyn Queue,
    keys: &Keys,
    agent: &str,
    d: Option<&Downgrade>,
) -> Result<(), QueueError> {
    let key = keys.degraded(agent);
    match d {
        Some(d) => {
            let json = Bytes::from(super::task::json_bytes(d));
            q.set(&key, json.clone(), None).await?;
            q.publish(&keys.degraded_channel(), json).await?;
        }
        None => {
            q.del(std::slice::from_ref(&key)).await?;
            let msg = serde_json::json!({"agent": agent, "recovered": true});
            q.publish(&keys.degraded_channel(), Bytes::from(msg.to_string()))
                .await?;
        }
    }
    Ok(())
}

/// The current downgrade of `agent` as broadcast, if any.
pub async fn current(
    q: &dyn Queue,
    keys: &Keys,
    agent: &str,
) -> Result<Option<Downgrade>, QueueError> {
    Ok(q.get(&keys.degraded(agent))
        .await?
        .and_then(|b| serde_json::from_slice(&b).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::workflow::DegradedMode;

    #[test]
    fn decides_on_required_tools_only() {
        let agent = Agent {
            name: "inv".into(),
            consumes: "in".into(),
            produces: vec![],
            tools: vec!["bank".into(), "crm".into()],
            concurrency: 1,
            compensate: None,
            join: None,
            hedge: None,
            degraded: Some(DegradedMode {
                when_tools_down: vec!["bank".into()],
                action: DegradedAction::Route,
                to: Some("manual".into()),
            }),
        };
        let down = |t: &[&str]| t.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        let none = BTreeSet::new();
        assert!(decide(&agent, &down(&["crm"]), &none).is_none());
        let d = decide(&agent, &down(&["bank", "crm"]), &none).unwrap();
        assert_eq!(d.tools, vec!["bank".to_owned()]);
        assert_eq!(d.to.as_deref(), Some("manual"));
        assert!(d.before_delivery() && d.covers("bank") && !d.covers("crm"));
        // The bank's fallback answers for it: tasks are delivered, failures downgraded.
        let d = decide(&agent, &down(&["bank", "crm"]), &down(&["bank", "crm"])).unwrap();
        assert_eq!(d.fallback, vec!["bank".to_owned()]);
        assert!(!d.before_delivery() && d.covers("bank"));
    }
}
