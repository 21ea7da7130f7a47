//! Live CircuitPolicies: the set of policies a workflow's engines run, published in Redis by
//! the controller and followed by every engine without a restart.
//!
//! Owns the published state and its watcher. State: hash `Keys::policies` with the fields
//! `policies` (the JSON of the whole set, by policy name) and `version` (from the counter
//! `Keys::policies_version`). [`publish`] writes both and announces the version on
//! `Keys::policies_channel` in ONE atomic step ([`Queue::hset_versioned`]), so a version
//! names exactly one set. A [`watch`] re-reads on every announcement, after every
//! (re)subscription and every [`REREAD`]: a lost announcement delays a reload by one period
//! at most. The published version only grows, so a set of another version than the one
//! running is the newer one — also when it is lower: the counter went back because Redis
//! lost or replaced its data (a restart without persistence, a failover to a replica that
//! lagged), and what Redis holds now is what the controller publishes from then on, so an
//! engine that waited for a version above its own would ignore every publication until it
//! restarts. A set that does not parse or does not validate is refused (one warning naming
//! the field) and the engine keeps what it runs.
//!
//! What applies a set is left to the roles: the tool proxy rebuilds the stacks of the tools
//! whose policy changed ([`super::tools::ToolProxy::apply`], driven by
//! [`super::tools::supervise`]); the agent, repair and intake roles take the workflow's
//! settings ([`follow`]) for the next task, pass or submission. A set is taken by all of them
//! or refused by all of them ([`PolicySet::workflow_policy`] checks every tool resolves), so
//! the `policy_version` an engine reports in its stats is what every part of it runs.
//!
//! What reloads and what does not (a new set reaches a running engine within [`REREAD`]):
//! - tool calls: every setting of the tool's policy (timeout, retry, budget, hedge, breaker,
//!   bulkhead, throttle; the fallback is the workflow's, not the policy's); a call in flight
//!   finishes on the stack it started with; a rebuilt tool starts with a closed breaker, a
//!   fresh retry budget and an empty hedge histogram (its counters go on), the other tools
//!   keep theirs;
//! - agent role: `deadLetter.maxDeliveries`, `retry.backoff` and `timeout.perAttempt` of
//!   deliveries, `deadLetter.replay` (the schedule of records dead-lettered from then on) and
//!   `idempotency.ttl` (inbox keys and DLQ markers written from then on);
//! - repair role: `deadLetter.replay` and `deadLetter.retention` (next pass);
//! - intake: `idempotency.ttl` of the idempotency keys of new submissions;
//! - **not reloaded** (the next start of the pod takes them): the repair role's pass
//!   interval (a quarter of the replay backoff, fixed at start) and the TTL of fan-in join
//!   records. Keys written before a reload keep the TTL they were written with.
//!
//! Publishing is idempotent: [`publish`] first reads the published set and writes nothing
//! when it is the same, so a controller re-publishing on every reconcile causes no version
//! bump and no reload storm. A read-then-write is enough here: two publishers racing with
//! different sets both write and the higher version (the later write) wins, exactly as if
//! they had not raced; one that found its set already published had nothing to change.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch as tokio_watch;

use crate::api::policy::CircuitPolicySpec;
use crate::queue::{Keys, Queue, QueueError, fields};

use super::config::{Policy, WorkflowConfig};
use super::stats::Stats;

/// How often a watcher re-reads the published set even without an announcement.
pub const REREAD: Duration = Duration::from_millis(500);

/// Hash field holding the JSON of the set.
const FIELD: &str = "policies";

/// The policies a workflow's engines run, with the version they were published under (0 = from the file).
#[derive(Clone, Debug, PartialEq)]
pub struct PolicySet {
    pub version: u64,
    pub policies: BTreeMap<String, CircuitPolicySpec>,
}

impl PolicySet {
    /// The set of the workflow file (version 0: any published set wins over it).
    pub fn from_file(cfg: &WorkflowConfig) -> Self {
        Self {
            version: 0,
            policies: cfg.policies.clone(),
        }
    }

    /// The workflow's delivery policy under this set: the CircuitPolicy its `policyRef`
    /// names (all defaults when it names none or one the set does not hold — as when the
    /// file lacks it). Refused, naming the field, when a tool of the workflow cannot resolve
    /// its policy under the set either: every role of an engine takes a set or none does,
    /// so the version an engine reports is the one all its parts run.
    pub fn workflow_policy(&self, cfg: &WorkflowConfig) -> Result<Policy, String> {
        for i in 0..cfg.spec.tools.len() {
            super::tools::tool_policy(&cfg.spec, &self.policies, i)
                .map_err(|e| format!("{}: {}", e.path, e.message))?;
        }
        let spec = cfg
            .spec
            .policy_ref
            .as_ref()
            .and_then(|n| self.policies.get(n));
        Policy::from_spec(spec).map_err(|e| {
            let name = cfg.spec.policy_ref.as_deref().unwrap_or_default();
            format!(
                "policies.{name}.spec.{}",
                e.to_string().trim_start_matches("configuration: ")
            )
        })
    }
}

/// Publish `policies` for every engine of the workflow: one atomic step (hset_versioned: the JSON of the
/// set, the new version, the announcement). Returns the version. The controller calls this.
///
/// Idempotent: when the published set is already `policies`, nothing is written and its
/// version is returned (see the module doc for why a read first is enough).
pub async fn publish(
    q: &dyn Queue,
    keys: &Keys,
    policies: &BTreeMap<String, CircuitPolicySpec>,
) -> Result<u64, QueueError> {
    let json = serde_json::to_vec(policies)
        .map_err(|e| QueueError::Invalid(format!("policies: cannot serialise: {e}")))?;
    let published = q.hgetall(&keys.policies()).await?;
    let field = |name: &str| published.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    if let (Some(current), Some(version)) = (field(FIELD), field("version").and_then(version_of))
        && current.as_ref() == json.as_slice()
    {
        return Ok(version);
    }
    q.hset_versioned(
        &keys.policies(),
        &keys.policies_version(),
        &keys.policies_channel(),
        fields([(FIELD, Bytes::from(json))]),
    )
    .await
}

fn version_of(v: &Bytes) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// The published state as stored: its version and the set, or why the set is refused.
struct Raw {
    version: u64,
    set: Result<BTreeMap<String, CircuitPolicySpec>, String>,
}

async fn read_raw(q: &dyn Queue, keys: &Keys) -> Result<Option<Raw>, QueueError> {
    let all = q.hgetall(&keys.policies()).await?;
    let mut version = None;
    let mut json = None;
    for (k, v) in all {
        match k.as_str() {
            "version" => version = Some(v),
            FIELD => json = Some(v),
            _ => {}
        }
    }
    let Some(json) = json else {
        return Ok(None);
    };
    let Some(version) = version.as_ref().and_then(version_of) else {
        return Ok(Some(Raw {
            version: 0,
            set: Err("version: missing or not an integer".into()),
        }));
    };
    let set = serde_json::from_slice::<BTreeMap<String, CircuitPolicySpec>>(&json)
        .map_err(|e| format!("policies: {e}"))
        .and_then(|set| check(&set).map(|()| set));
    Ok(Some(Raw { version, set }))
}

/// Read the published set (None if never published).
///
/// A published set that does not parse or validate is an [`QueueError::Invalid`] naming the
/// field.
pub async fn read(q: &dyn Queue, keys: &Keys) -> Result<Option<PolicySet>, QueueError> {
    match read_raw(q, keys).await? {
        None => Ok(None),
        Some(Raw { version, set }) => set
            .map(|policies| Some(PolicySet { version, policies }))
            .map_err(QueueError::Invalid),
    }
}

/// Whether every policy of the set is one an engine can run: the CRD's own checks, and the
/// resolution into a tool's stack and into a delivery policy. The error names the first
/// field at fault, `policies.<name>.spec.<field>: <why>`.
pub fn check(set: &BTreeMap<String, CircuitPolicySpec>) -> Result<(), String> {
    for (name, p) in set {
        if let Some(e) = crate::api::validate::check_policy(p).first() {
            return Err(format!("policies.{name}.{}: {}", e.path, e.message));
        }
        if let Err(e) = crate::resilience::PolicyConfig::from_spec(Some(p), None) {
            return Err(format!("policies.{name}.{}: {}", e.path, e.message));
        }
        if let Err(e) = Policy::from_spec(Some(p)) {
            let e = e.to_string();
            return Err(format!(
                "policies.{name}.spec.{}",
                e.trim_start_matches("configuration: ")
            ));
        }
    }
    Ok(())
}

/// Keep the newest set: starts with `initial` (the file's), moves to a published set with a higher version
/// on every announcement, re-subscription and every REREAD period; a set that does not parse or fails
/// validation is refused with one warning log naming the field (the engine keeps what it runs).
///
/// A published version *lower* than the running one is taken too, with a warning: the
/// counter can only have gone back because Redis lost its data (see the module doc).
/// The task ends when every receiver is dropped.
pub fn watch(
    q: Arc<dyn Queue>,
    keys: Keys,
    initial: PolicySet,
) -> tokio_watch::Receiver<Arc<PolicySet>> {
    let (tx, rx) = tokio_watch::channel(Arc::new(initial));
    tokio::spawn(async move {
        // The last version refused, so a bad set is warned about once, not every period.
        let refresh = |tx: &tokio_watch::Sender<Arc<PolicySet>>, refused: &mut Option<u64>, raw| {
            let Some(Raw { version, set }) = raw else {
                return;
            };
            let running = tx.borrow().version;
            if version == running {
                return;
            }
            match set {
                Ok(policies) => {
                    if version < running {
                        tracing::warn!(
                            version,
                            running,
                            "the published policy version went back (Redis lost or replaced its data); taking what it holds now"
                        );
                    }
                    tx.send_replace(Arc::new(PolicySet { version, policies }));
                }
                Err(why) if *refused != Some(version) => {
                    *refused = Some(version);
                    tracing::warn!(
                        version,
                        running = tx.borrow().version,
                        error = %why,
                        "published policies refused; keeping the ones running"
                    );
                }
                Err(_) => {}
            }
        };
        let channel = keys.policies_channel();
        // The version last refused (warned once), kept across re-reads.
        let refused = std::sync::Mutex::new(None::<u64>);
        let (q, keys, tx, refresh, refused) = (q.as_ref(), &keys, &tx, &refresh, &refused);
        super::follow::follow(q, &channel, REREAD, tx, |first| async move {
            match read_raw(q, keys).await {
                Ok(raw) => refresh(
                    tx,
                    &mut refused.lock().unwrap_or_else(|p| p.into_inner()),
                    raw,
                ),
                Err(e) if first => {
                    tracing::debug!(error = %e, "cannot read the published policies")
                }
                Err(_) => {}
            }
        })
        .await;
    });
    rx
}

/// How long a starting role waits for the published set before it starts on its file's.
pub const FIRST_READ: Duration = Duration::from_secs(2);

/// The set a role starts with: the published one when Redis answers within [`FIRST_READ`]
/// and the set resolves for `cfg` (see [`PolicySet::workflow_policy`]), else the file's — so
/// an engine started after a publication never handles a task or a tool call under the
/// file's older policies (the [`watch`] it starts next keeps it current either way).
pub async fn initial(q: &dyn Queue, cfg: &WorkflowConfig) -> PolicySet {
    match tokio::time::timeout(FIRST_READ, read(q, &cfg.keys)).await {
        Ok(Ok(Some(set))) => match set.workflow_policy(cfg) {
            Ok(_) => return set,
            Err(e) => tracing::warn!(
                version = set.version,
                error = %e,
                "published policies refused; starting with the workflow file's"
            ),
        },
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the published policies; starting with the workflow file's")
        }
        Err(_) => tracing::warn!(
            after = ?FIRST_READ,
            "published policies not read in time; starting with the workflow file's"
        ),
    }
    PolicySet::from_file(cfg)
}

/// The workflow's delivery policy as the published sets change it, for the agent, repair and
/// intake roles: starts with `initial` ([`initial`], or the file's), moves on with every set
/// [`watch`] takes whose workflow policy resolves (one that does not is refused with a
/// warning, the running one kept), sets `stats`' policy version and logs `policies reloaded`.
/// Ends when every receiver is dropped.
pub fn follow(
    q: Arc<dyn Queue>,
    cfg: Arc<WorkflowConfig>,
    stats: Arc<Stats>,
    initial: PolicySet,
) -> tokio_watch::Receiver<(u64, Arc<Policy>)> {
    let start = match initial.workflow_policy(&cfg) {
        Ok(p) if initial.version != 0 => p,
        _ => cfg.policy.clone(),
    };
    stats.set_policy_version(initial.version);
    let (tx, rx) = tokio_watch::channel((initial.version, Arc::new(start)));
    let mut sets = watch(q, cfg.keys.clone(), initial);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = sets.changed() => if r.is_err() { return },
                _ = tx.closed() => return,
            }
            let set = sets.borrow_and_update().clone();
            match set.workflow_policy(&cfg) {
                Ok(policy) => {
                    let old = tx.borrow().1.clone();
                    stats.set_policy_version(set.version);
                    tracing::info!(
                        version = set.version,
                        role = %stats.role,
                        changed = policy != *old,
                        "policies reloaded"
                    );
                    tx.send_replace((set.version, Arc::new(policy)));
                }
                Err(e) => tracing::warn!(
                    version = set.version,
                    error = %e,
                    "published policies refused; keeping the ones running"
                ),
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryQueue;

    fn policy(yaml: &str) -> CircuitPolicySpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn set(yaml: &str) -> BTreeMap<String, CircuitPolicySpec> {
        BTreeMap::from([("pol".to_string(), policy(yaml))])
    }

    async fn next(rx: &mut tokio_watch::Receiver<Arc<PolicySet>>, version: u64) -> Arc<PolicySet> {
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|s| s.version >= version),
        )
        .await
        .expect("no new set within 5 s")
        .expect("watcher ended")
        .clone()
    }

    #[tokio::test]
    async fn publish_read_and_republish() {
        let q = MemoryQueue::new();
        let keys = Keys::new("ns", "wf");
        assert_eq!(read(&q, &keys).await.unwrap(), None);
        let a = set("timeout: {perAttempt: 100ms}");
        let v1 = publish(&q, &keys, &a).await.unwrap();
        assert_eq!(v1, 1);
        let got = read(&q, &keys).await.unwrap().unwrap();
        assert_eq!(got.version, 1);
        assert_eq!(got.policies, a);
        // The same set again: no new version.
        assert_eq!(publish(&q, &keys, &a).await.unwrap(), 1);
        assert_eq!(read(&q, &keys).await.unwrap().unwrap().version, 1);
        // Another set: a new version, and that set.
        let b = set("timeout: {perAttempt: 2s}");
        assert_eq!(publish(&q, &keys, &b).await.unwrap(), 2);
        assert_eq!(read(&q, &keys).await.unwrap().unwrap().policies, b);
        // Back to the first: a change too.
        assert_eq!(publish(&q, &keys, &a).await.unwrap(), 3);
        // Another workflow's state is its own.
        assert_eq!(read(&q, &Keys::new("ns", "other")).await.unwrap(), None);
    }

    #[tokio::test]
    async fn watch_follows_publications() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let file = PolicySet {
            version: 0,
            policies: set("timeout: {perAttempt: 100ms}"),
        };
        let mut rx = watch(q.clone(), keys.clone(), file.clone());
        assert_eq!(**rx.borrow(), file);
        let b = set("timeout: {perAttempt: 2s}");
        let v = publish(q.as_ref(), &keys, &b).await.unwrap();
        let got = next(&mut rx, v).await;
        assert_eq!((got.version, &got.policies), (v, &b));
    }

    /// A role starting after a publication starts on the published set, not its file's; a
    /// published set its tools cannot resolve under is refused for the file's.
    #[tokio::test]
    async fn a_starting_role_begins_with_the_published_set() {
        let cfg = WorkflowConfig::from_yaml(
            "w",
            "apiVersion: r4.dev/v1alpha1\nkind: AgentWorkflow\nmetadata: {name: wf}\nspec:\n  queue: {redis: {url: \"redis://x\"}}\n  policyRef: pol\n  tools:\n    - {name: t, url: \"http://t/x\"}\n  agents:\n    - {name: a, image: i, consumes: in, tools: [t]}\n---\napiVersion: r4.dev/v1alpha1\nkind: CircuitPolicy\nmetadata: {name: pol}\nspec:\n  deadLetter: {maxDeliveries: 3}\n",
            None,
            Some("ns"),
        )
        .unwrap();
        let cfg = Arc::new(cfg);
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        assert_eq!(initial(q.as_ref(), &cfg).await, PolicySet::from_file(&cfg));
        let published = set("deadLetter: {maxDeliveries: 1}");
        let v = publish(q.as_ref(), &cfg.keys, &published).await.unwrap();
        let first = initial(q.as_ref(), &cfg).await;
        assert_eq!((first.version, &first.policies), (v, &published));
        let stats = Arc::new(Stats::new("e", "agent", Some("a")));
        let rx = follow(q.clone(), cfg.clone(), stats.clone(), first);
        assert_eq!(rx.borrow().0, v);
        assert_eq!(rx.borrow().1.max_deliveries, 1);
        assert_eq!(stats.policy_version(), v);
        // The workflow's policyRef is missing from this one: tool t cannot resolve its policy.
        let other = BTreeMap::from([("else".to_string(), policy("retry: {maxAttempts: 2}"))]);
        publish(q.as_ref(), &cfg.keys, &other).await.unwrap();
        let e = PolicySet {
            version: 9,
            policies: other,
        }
        .workflow_policy(&cfg)
        .unwrap_err();
        assert!(e.starts_with("spec.tools[0].policyRef: "), "{e}");
        assert_eq!(initial(q.as_ref(), &cfg).await, PolicySet::from_file(&cfg));
    }

    /// Redis lost its data and the controller published again: the counter restarted, and
    /// the engine takes the lower version instead of ignoring publications until a restart.
    #[tokio::test]
    async fn a_counter_that_went_back_is_followed() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let mut rx = watch(
            q.clone(),
            keys.clone(),
            PolicySet {
                version: 0,
                policies: BTreeMap::new(),
            },
        );
        publish(q.as_ref(), &keys, &set("timeout: {perAttempt: 1s}"))
            .await
            .unwrap();
        let v2 = publish(q.as_ref(), &keys, &set("timeout: {perAttempt: 2s}"))
            .await
            .unwrap();
        assert_eq!(next(&mut rx, v2).await.version, 2);
        q.del(&[keys.policies(), keys.policies_version()])
            .await
            .unwrap();
        let after = set("timeout: {perAttempt: 3s}");
        assert_eq!(publish(q.as_ref(), &keys, &after).await.unwrap(), 1);
        let got =
            tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| s.policies == after))
                .await
                .expect("the set published after the reset was never taken")
                .unwrap()
                .clone();
        assert_eq!(got.version, 1);
    }

    #[tokio::test]
    async fn a_set_published_before_start_wins_over_the_file() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let b = set("timeout: {perAttempt: 2s}");
        publish(q.as_ref(), &keys, &b).await.unwrap();
        let mut rx = watch(
            q.clone(),
            keys,
            PolicySet {
                version: 0,
                policies: set("timeout: {perAttempt: 100ms}"),
            },
        );
        assert_eq!(next(&mut rx, 1).await.policies, b);
    }

    /// A change written without its announcement (as if the message was lost while the
    /// subscription was down) is still taken, by the periodic re-read.
    #[tokio::test(start_paused = true)]
    async fn a_lost_announcement_is_caught_by_the_reread() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let mut rx = watch(
            q.clone(),
            keys.clone(),
            PolicySet {
                version: 0,
                policies: BTreeMap::new(),
            },
        );
        // Let the watcher subscribe and do its first read.
        tokio::time::sleep(REREAD / 10).await;
        let b = set("timeout: {perAttempt: 2s}");
        q.hset(
            &keys.policies(),
            fields([
                (FIELD, Bytes::from(serde_json::to_vec(&b).unwrap())),
                ("version", Bytes::from_static(b"7")),
            ]),
        )
        .await
        .unwrap();
        let started = tokio::time::Instant::now();
        let got = next(&mut rx, 7).await;
        assert_eq!(got.policies, b);
        assert!(started.elapsed() <= REREAD, "{:?}", started.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn a_bad_set_is_refused_and_the_running_one_kept() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let keys = Keys::new("ns", "wf");
        let good = set("timeout: {perAttempt: 2s}");
        publish(q.as_ref(), &keys, &good).await.unwrap();
        let mut rx = watch(
            q.clone(),
            keys.clone(),
            PolicySet {
                version: 0,
                policies: BTreeMap::new(),
            },
        );
        next(&mut rx, 1).await;
        // Valid JSON of the type, but a policy no engine can run.
        let bad = set("timeout: {perAttempt: 0s}");
        let e = check(&bad).unwrap_err();
        assert!(e.starts_with("policies.pol.spec.timeout.perAttempt"), "{e}");
        assert_eq!(publish(q.as_ref(), &keys, &bad).await.unwrap(), 2);
        // Not JSON of a policy set at all.
        q.hset_versioned(
            &keys.policies(),
            &keys.policies_version(),
            &keys.policies_channel(),
            fields([(FIELD, Bytes::from_static(b"{\"pol\": {\"timeout\": 5}}"))]),
        )
        .await
        .unwrap();
        let e = match read(q.as_ref(), &keys).await {
            Err(QueueError::Invalid(e)) => e,
            other => panic!("{other:?}"),
        };
        assert!(e.starts_with("policies: "), "{e}");
        // Several periods later the engine still runs the good set.
        tokio::time::sleep(REREAD * 4).await;
        assert_eq!(rx.borrow().version, 1);
        assert_eq!(rx.borrow().policies, good);
        assert!(!rx.has_changed().unwrap());
        // A good set after the bad ones is taken.
        let again = set("timeout: {perAttempt: 3s}");
        let v = publish(q.as_ref(), &keys, &again).await.unwrap();
        assert_eq!(v, 4);
        assert_eq!(next(&mut rx, v).await.policies, again);
    }
}
