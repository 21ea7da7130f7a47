//! The deployment controller's decisions, as pure functions: the pod template hash, the name
//! and shape of a Deployment's pods, which pods to create or delete next ([`plan`]) and the
//! Deployment status a deployment controller writes ([`status`]). No I/O here; the kube-facing
//! side is [`super::deployment`].
//!
//! There is no ReplicaSet object: a Deployment owns its pods directly, but names and labels
//! them as its ReplicaSet would (`<deployment>-<pod-template-hash>-<5 random>`, label
//! `pod-template-hash`), so `kubectl get pods -l pod-template-hash=…` and the messages of the
//! `Progressing` condition (`ReplicaSet "web-5d8f7b9c6" is progressing.`) read as on a cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;

/// The label that ties a pod to the template it was made from.
pub const HASH_LABEL: &str = "pod-template-hash";
/// Kubernetes' default `spec.progressDeadlineSeconds`.
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;
/// Kubernetes' `rand.String` / `SafeEncodeString` alphabet: no vowels (no words), no 0/1/3.
const ALPHANUMS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// 32-bit FNV-1a, the hash Kubernetes uses for `pod-template-hash`.
fn fnv32a(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Kubernetes' `SafeEncodeString`: each byte mapped into [`ALPHANUMS`].
fn safe_encode(s: &str) -> String {
    s.bytes()
        .map(|b| ALPHANUMS[usize::from(b) % ALPHANUMS.len()] as char)
        .collect()
}

/// The `pod-template-hash` of a Deployment's template: FNV-1a of its canonical JSON (maps are
/// sorted, so equal templates hash equally) and of `status.collisionCount`, rendered as
/// Kubernetes does (the decimal hash, safe-encoded: `5d8f7b9c6`). `None` without a template
/// spec, which the API server would have refused.
pub fn template_hash(d: &Deployment) -> Option<String> {
    let template = &d.spec.template;
    template.spec.as_ref()?;
    let mut bytes = serde_json::to_vec(template).ok()?;
    if let Some(c) = d.status.as_ref().and_then(|s| s.collision_count) {
        bytes.extend_from_slice(&c.to_le_bytes());
    }
    Some(safe_encode(&fnv32a(&bytes).to_string()))
}

/// The name of the ReplicaSet the pods of `hash` would belong to (used in messages).
pub fn replica_set_name(deployment: &str, hash: &str) -> String {
    format!("{deployment}-{hash}")
}

/// Five characters of Kubernetes' name alphabet, from `draw` (a source of random numbers).
pub fn random_suffix(mut draw: impl FnMut() -> u32) -> String {
    (0..5)
        .map(|_| ALPHANUMS[draw() as usize % ALPHANUMS.len()] as char)
        .collect()
}

/// A new pod of `d` for template `hash`: named `<deployment>-<hash>-<suffix>`, labelled as the
/// template plus `pod-template-hash`, owned by the Deployment (controller, blocking its
/// deletion). `None` when the Deployment lacks a name, uid or template spec.
pub fn new_pod(d: &Deployment, hash: &str, suffix: &str) -> Option<Pod> {
    let name = d.metadata.name.as_deref()?;
    let uid = d.metadata.uid.as_deref()?;
    let template = &d.spec.template;
    let spec = template.spec.clone()?;
    let tmeta = template.metadata.clone().unwrap_or_default();
    let mut labels = tmeta.labels.unwrap_or_default();
    labels.insert(HASH_LABEL.into(), hash.into());
    Some(Pod {
        metadata: ObjectMeta {
            name: Some(format!("{}-{suffix}", replica_set_name(name, hash))),
            namespace: d.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: tmeta.annotations,
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: name.into(),
                uid: uid.into(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(spec),
        status: None,
    })
}

/// Whether `pod` is controlled by the object of `uid`.
pub fn controlled_by(pod: &Pod, uid: &str) -> bool {
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

/// What the deployment controller needs to know of one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    pub hash: Option<String>,
    /// `Ready` condition true.
    pub ready: bool,
    /// Ready for at least `minReadySeconds`.
    pub available: bool,
    /// Being deleted (`deletionTimestamp` set): counted nowhere.
    pub terminating: bool,
    /// Phase `Failed` or `Succeeded`: gone for the count, deleted and replaced.
    pub finished: bool,
    pub created: Option<Timestamp>,
}

impl PodView {
    pub fn of(pod: &Pod, min_ready_seconds: i32, now: Timestamp) -> Self {
        let status = pod.status.as_ref();
        let ready_cond = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
        let ready = ready_cond.is_some_and(|c| c.status == "True");
        let since = ready_cond
            .and_then(|c| c.last_transition_time.as_ref())
            .map(|t| t.0);
        let available = ready
            && (min_ready_seconds <= 0
                || since.is_some_and(|t| {
                    t.as_second() + i64::from(min_ready_seconds) <= now.as_second()
                }));
        let phase = status.and_then(|s| s.phase.as_deref());
        PodView {
            name: pod.metadata.name.clone().unwrap_or_default(),
            hash: pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(HASH_LABEL).cloned()),
            ready,
            available,
            terminating: pod.metadata.deletion_timestamp.is_some(),
            finished: matches!(phase, Some("Failed" | "Succeeded")),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
        }
    }
}

/// How a Deployment replaces its pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Delete every old pod, then create the new ones.
    Recreate,
    /// Never more than `desired + max_surge` pods, never fewer than `desired - max_unavailable`
    /// available.
    RollingUpdate {
        max_surge: i32,
        max_unavailable: i32,
    },
}

/// `spec.replicas`, default 1.
pub fn desired_replicas(d: &Deployment) -> i32 {
    d.spec.replicas.unwrap_or(1).max(0)
}

/// An `IntOrString` (`2` or `"25%"`) of `total`, rounded up or down; `default` when absent or
/// unreadable (the API server validates it).
fn scaled(v: Option<&IntOrString>, total: i32, round_up: bool, default: i32) -> i32 {
    match v {
        Some(IntOrString::Int(i)) => (*i).max(0),
        Some(IntOrString::String(s)) => match s.strip_suffix('%').map(str::parse::<i64>) {
            Some(Ok(p)) if p >= 0 => {
                let n = i64::from(total) * p;
                let v = if round_up { (n + 99) / 100 } else { n / 100 };
                i32::try_from(v).unwrap_or(i32::MAX)
            }
            _ => default,
        },
        None => default,
    }
}

/// The Deployment's strategy with its bounds resolved against `desired`, as Kubernetes does:
/// surge rounds up, unavailability down (defaults 25% each), and both 0 means 1 unavailable.
pub fn strategy(d: &Deployment) -> Strategy {
    let desired = desired_replicas(d);
    let s = d.spec.strategy.as_ref();
    if s.and_then(|s| s.type_.as_deref()) == Some("Recreate") {
        return Strategy::Recreate;
    }
    let ru = s.and_then(|s| s.rolling_update.as_ref());
    let quarter = IntOrString::String("25%".into());
    let max_surge = scaled(
        Some(ru.and_then(|r| r.max_surge.as_ref()).unwrap_or(&quarter)),
        desired,
        true,
        0,
    );
    let mut max_unavailable = scaled(
        Some(
            ru.and_then(|r| r.max_unavailable.as_ref())
                .unwrap_or(&quarter),
        ),
        desired,
        false,
        0,
    )
    .min(desired);
    if max_surge == 0 && max_unavailable == 0 {
        max_unavailable = 1;
    }
    Strategy::RollingUpdate {
        max_surge,
        max_unavailable,
    }
}

/// One step the deployment controller takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Create a pod of the current template.
    Create,
    /// Delete this pod.
    Delete(String),
}

/// The pods to create or delete now to move `d` towards its desired state, given the pods it
/// controls. One kind of step per call, as the deployment controller syncs: scale the new
/// template up (or down when over `replicas`), else scale the old ones down; the pod events
/// that follow bring the next call.
///
/// Pods being deleted count nowhere; finished pods (`Failed`/`Succeeded`) are deleted and
/// replaced. Rolling update: at most `replicas + maxSurge` pods; old pods go as new ones become
/// available, unavailable old pods first, never leaving fewer than `replicas - maxUnavailable`
/// available. Recreate: every old pod goes before a new one is made.
pub fn plan(d: &Deployment, pods: &[PodView]) -> Vec<Action> {
    let Some(hash) = template_hash(d) else {
        return Vec::new();
    };
    let desired = desired_replicas(d) as usize;
    let mut actions: Vec<Action> = pods
        .iter()
        .filter(|p| p.finished && !p.terminating)
        .map(|p| Action::Delete(p.name.clone()))
        .collect();
    let live: Vec<&PodView> = pods
        .iter()
        .filter(|p| !p.terminating && !p.finished)
        .collect();
    let is_new = |p: &&PodView| p.hash.as_deref() == Some(hash.as_str());
    let (new, old): (Vec<&PodView>, Vec<&PodView>) = live.iter().copied().partition(is_new);
    // Least valuable first: not available, then not ready, then youngest.
    fn by_value(mut v: Vec<&PodView>) -> Vec<&PodView> {
        v.sort_by(|a, b| {
            (a.available, a.ready, std::cmp::Reverse(a.created)).cmp(&(
                b.available,
                b.ready,
                std::cmp::Reverse(b.created),
            ))
        });
        v
    }
    match strategy(d) {
        Strategy::Recreate => {
            if !old.is_empty() {
                actions.extend(old.iter().map(|p| Action::Delete(p.name.clone())));
                return actions;
            }
            let old_terminating = pods
                .iter()
                .any(|p| p.terminating && p.hash.as_deref() != Some(hash.as_str()));
            if old_terminating {
                return actions;
            }
            scale_new(&mut actions, by_value(new), desired, desired);
        }
        Strategy::RollingUpdate {
            max_surge,
            max_unavailable,
        } => {
            let total = live.len();
            let max_total = desired + max_surge as usize;
            let before = actions.len();
            let room = max_total.saturating_sub(total) + new.len();
            scale_new(&mut actions, by_value(new.clone()), desired, room);
            if actions.len() > before || old.is_empty() {
                return actions;
            }
            let min_available = desired.saturating_sub(max_unavailable as usize);
            let new_unavailable = new.iter().filter(|p| !p.available).count();
            // Unavailable old pods first: removing them costs no availability.
            let mut cleanup = total
                .saturating_sub(min_available)
                .saturating_sub(new_unavailable);
            let mut gone = std::collections::BTreeSet::new();
            for p in by_value(old.clone()) {
                if cleanup == 0 || p.available {
                    break;
                }
                actions.push(Action::Delete(p.name.clone()));
                gone.insert(p.name.as_str());
                cleanup -= 1;
            }
            // Then as many old pods as availability above the minimum allows, least valuable
            // first (as a ReplicaSet scaled down picks them).
            let available = live.iter().filter(|p| p.available).count();
            let scale_down = available.saturating_sub(min_available);
            actions.extend(
                by_value(old)
                    .into_iter()
                    .filter(|p| !gone.contains(p.name.as_str()))
                    .take(scale_down)
                    .map(|p| Action::Delete(p.name.clone())),
            );
        }
    }
    actions
}

/// Bring the new template's pods to `desired`, creating at most up to `limit` pods of it.
fn scale_new(actions: &mut Vec<Action>, new: Vec<&PodView>, desired: usize, limit: usize) {
    let target = desired.min(limit.max(new.len().min(desired)));
    if new.len() < target {
        actions.extend(std::iter::repeat_n(Action::Create, target - new.len()));
    } else if new.len() > desired {
        let excess = new.len() - desired;
        actions.extend(
            new.iter()
                .take(excess)
                .map(|p| Action::Delete(p.name.clone())),
        );
    }
}

fn is_true(c: &DeploymentCondition) -> bool {
    c.status.as_deref() == Some("True")
}

fn condition<'a>(s: &'a DeploymentStatus, type_: &str) -> Option<&'a DeploymentCondition> {
    s.conditions
        .iter()
        .flatten()
        .find(|c| c.type_.as_deref() == Some(type_))
}

/// Kubernetes' `SetDeploymentCondition`: the same status and reason change nothing; the same
/// status keeps its transition time.
fn set_condition(s: &mut DeploymentStatus, mut c: DeploymentCondition) {
    let conds = s.conditions.get_or_insert_with(Vec::new);
    match conds.iter_mut().find(|x| x.type_ == c.type_) {
        Some(cur) if cur.status == c.status && cur.reason == c.reason => {}
        Some(cur) => {
            if cur.status == c.status {
                c.last_transition_time = cur.last_transition_time.clone();
            }
            *cur = c;
        }
        None => conds.push(c),
    }
}

fn cond(
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    now: Timestamp,
) -> DeploymentCondition {
    DeploymentCondition {
        type_: Some(type_.into()),
        status: Some(if status { "True" } else { "False" }.into()),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(Time(now)),
        last_transition_time: Some(Time(now)),
    }
}

/// `spec.progressDeadlineSeconds`, default 600.
pub fn progress_deadline(d: &Deployment) -> i64 {
    i64::from(
        d.spec
            .progress_deadline_seconds
            .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS),
    )
}

/// The status the deployment controller writes for `d` with these pods at `now`:
/// counts (`replicas` = live pods, `updatedReplicas` = pods of the current template,
/// `readyReplicas`, `availableReplicas`, `unavailableReplicas`), `observedGeneration`, and the
/// conditions, kept as Kubernetes keeps them:
/// - `Available`: True (`MinimumReplicasAvailable`) when at least `replicas - maxUnavailable`
///   pods are available, else False (`MinimumReplicasUnavailable`).
/// - `Progressing`: `NewReplicaSetCreated` when the template changed; `ReplicaSetUpdated` each
///   time the rollout moves (more updated, ready or available pods, fewer old ones), which
///   restarts the deadline clock; `NewReplicaSetAvailable` when complete; False with
///   `ProgressDeadlineExceeded` when nothing moved for `progressDeadlineSeconds`. A complete
///   Deployment stays complete while its template does not change (a pod replaced after a
///   delete is not a rollout).
pub fn status(d: &Deployment, pods: &[PodView], now: Timestamp) -> DeploymentStatus {
    let prev = d.status.clone().unwrap_or_default();
    let desired = desired_replicas(d);
    let hash = template_hash(d).unwrap_or_default();
    let live: Vec<&PodView> = pods
        .iter()
        .filter(|p| !p.terminating && !p.finished)
        .collect();
    let count = |f: &dyn Fn(&PodView) -> bool| -> i32 {
        i32::try_from(live.iter().filter(|p| f(p)).count()).unwrap_or(i32::MAX)
    };
    let replicas = count(&|_| true);
    let updated = count(&|p| p.hash.as_deref() == Some(hash.as_str()));
    let ready = count(&|p| p.ready);
    let available = count(&|p| p.available);
    let mut s = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(replicas),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        unavailable_replicas: Some((desired - available).max(0)),
        collision_count: prev.collision_count,
        conditions: prev.conditions.clone(),
        terminating_replicas: None,
    };
    let max_unavailable = match strategy(d) {
        Strategy::Recreate => 0,
        Strategy::RollingUpdate {
            max_unavailable, ..
        } => max_unavailable,
    };
    if available >= desired - max_unavailable {
        set_condition(
            &mut s,
            cond(
                "Available",
                true,
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
                now,
            ),
        );
    } else {
        set_condition(
            &mut s,
            cond(
                "Available",
                false,
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
                now,
            ),
        );
    }

    let name = d.metadata.name.clone().unwrap_or_default();
    let rs = replica_set_name(&name, &hash);
    let quoted = format!("{rs:?}");
    let progressing = condition(&s, "Progressing").cloned();
    // A template no condition speaks of yet: a new ReplicaSet in Kubernetes' terms.
    let new_template = progressing
        .as_ref()
        .is_none_or(|c| !c.message.as_deref().unwrap_or("").contains(&quoted));
    if new_template {
        let mut c = cond(
            "Progressing",
            true,
            "NewReplicaSetCreated",
            format!("Created new replica set {quoted}"),
            now,
        );
        if let Some(p) = progressing.as_ref().filter(|p| is_true(p)) {
            c.last_transition_time = p.last_transition_time.clone();
        }
        replace_condition(&mut s, c);
    }
    let progressing = condition(&s, "Progressing").cloned();
    let complete_before = replicas == updated
        && progressing.as_ref().and_then(|c| c.reason.as_deref()) == Some("NewReplicaSetAvailable");
    if !complete_before {
        let generation_seen =
            s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
        let complete =
            updated == desired && replicas == desired && available == desired && generation_seen;
        let old_replicas =
            |st: &DeploymentStatus| st.replicas.unwrap_or(0) - st.updated_replicas.unwrap_or(0);
        let moved = !new_template
            && (updated > prev.updated_replicas.unwrap_or(0)
                || old_replicas(&s) < old_replicas(&prev)
                || ready > prev.ready_replicas.unwrap_or(0)
                || available > prev.available_replicas.unwrap_or(0));
        // A paused Deployment makes no progress on purpose: it does not time out.
        let paused = d.spec.paused.unwrap_or(false);
        let timed_out = !paused
            && progressing.as_ref().is_some_and(|c| {
                c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                    || c.last_update_time
                        .as_ref()
                        .is_some_and(|t| t.0.as_second() + progress_deadline(d) < now.as_second())
            });
        if complete {
            set_condition(
                &mut s,
                cond(
                    "Progressing",
                    true,
                    "NewReplicaSetAvailable",
                    format!("ReplicaSet {quoted} has successfully progressed."),
                    now,
                ),
            );
        } else if moved {
            let mut c = cond(
                "Progressing",
                true,
                "ReplicaSetUpdated",
                format!("ReplicaSet {quoted} is progressing."),
                now,
            );
            if let Some(p) = progressing.as_ref().filter(|p| is_true(p)) {
                c.last_transition_time = p.last_transition_time.clone();
            }
            replace_condition(&mut s, c);
        } else if timed_out {
            set_condition(
                &mut s,
                cond(
                    "Progressing",
                    false,
                    "ProgressDeadlineExceeded",
                    format!("ReplicaSet {quoted} has timed out progressing."),
                    now,
                ),
            );
        }
    }
    s
}

/// Replace (or add) the condition of `c`'s type as it is, times included.
fn replace_condition(s: &mut DeploymentStatus, c: DeploymentCondition) {
    let conds = s.conditions.get_or_insert_with(Vec::new);
    match conds.iter_mut().find(|x| x.type_ == c.type_) {
        Some(cur) => *cur = c,
        None => conds.push(c),
    }
}

/// When to look again although no pod changed: at the progress deadline of a rollout under
/// way, and when a ready pod becomes available (`minReadySeconds`). `None`: nothing pending.
pub fn next_check(d: &Deployment, s: &DeploymentStatus, now: Timestamp) -> Option<i64> {
    let progressing = condition(s, "Progressing")?;
    let mut at = None::<i64>;
    if is_true(progressing) && progressing.reason.as_deref() != Some("NewReplicaSetAvailable") {
        let t = progressing.last_update_time.as_ref()?.0.as_second() + progress_deadline(d) + 1;
        at = Some(t);
    }
    let min_ready = d.spec.min_ready_seconds.unwrap_or(0);
    if min_ready > 0 && s.ready_replicas > s.available_replicas {
        let t = now.as_second() + 1;
        at = Some(at.map_or(t, |a| a.min(t)));
    }
    at.map(|t| (t - now.as_second()).max(1))
}

/// `matchLabels` of a selector as a label query (`a=b,c=d`); `None` when the selector uses
/// `matchExpressions` (then every pod of the namespace is listed and ownership decides).
pub fn selector_query(d: &Deployment) -> Option<String> {
    let sel = &d.spec.selector;
    if sel
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return None;
    }
    let labels: &BTreeMap<String, String> = sel.match_labels.as_ref()?;
    Some(
        labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(","),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentStrategy, RollingUpdateDeployment};

    fn deployment(replicas: i32, image: &str) -> Deployment {
        crate::devcluster::kubelet::fixtures::deployment("web", replicas, image)
    }

    fn pod(name: &str, hash: &str, ready: bool) -> PodView {
        PodView {
            name: name.into(),
            hash: Some(hash.into()),
            ready,
            available: ready,
            terminating: false,
            finished: false,
            created: None,
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn creates(a: &[Action]) -> usize {
        a.iter().filter(|a| **a == Action::Create).count()
    }

    fn deletes(a: &[Action]) -> Vec<&str> {
        a.iter()
            .filter_map(|a| match a {
                Action::Delete(n) => Some(n.as_str()),
                Action::Create => None,
            })
            .collect()
    }

    #[test]
    fn the_template_hash_is_stable_safe_and_follows_the_template() {
        let a = template_hash(&deployment(3, "web:1")).unwrap();
        assert_eq!(a, template_hash(&deployment(3, "web:1")).unwrap());
        // Replicas are not part of the template.
        assert_eq!(a, template_hash(&deployment(5, "web:1")).unwrap());
        assert_ne!(a, template_hash(&deployment(3, "web:2")).unwrap());
        assert!(!a.is_empty() && a.len() <= 10, "{a}");
        assert!(a.bytes().all(|b| ALPHANUMS.contains(&b)), "{a}");
        // A collision count changes it, as in Kubernetes.
        let mut d = deployment(3, "web:1");
        d.status = Some(DeploymentStatus {
            collision_count: Some(1),
            ..Default::default()
        });
        assert_ne!(a, template_hash(&d).unwrap());
        // Kubernetes' encoding of a decimal string.
        assert_eq!(safe_encode("0123456789"), "456789bcdf");
    }

    #[test]
    fn pods_are_named_labelled_and_owned_as_a_replica_set_would_make_them() {
        let d = deployment(1, "web:1");
        let hash = template_hash(&d).unwrap();
        let mut n = 0u32;
        let suffix = random_suffix(|| {
            n += 7;
            n
        });
        assert_eq!(suffix.len(), 5);
        let p = new_pod(&d, &hash, &suffix).unwrap();
        assert_eq!(
            p.metadata.name.as_deref(),
            Some(format!("web-{hash}-{suffix}").as_str())
        );
        let labels = p.metadata.labels.as_ref().unwrap();
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(labels.get(HASH_LABEL), Some(&hash));
        let o = &p.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (
                o.kind.as_str(),
                o.uid.as_str(),
                o.controller,
                o.block_owner_deletion
            ),
            ("Deployment", "uid-web", Some(true), Some(true))
        );
        assert!(controlled_by(&p, "uid-web"));
        assert!(!controlled_by(&p, "other"));
        assert_eq!(p.metadata.namespace.as_deref(), Some("default"));
    }

    #[test]
    fn strategy_bounds_resolve_like_kubernetes() {
        assert_eq!(
            strategy(&deployment(4, "x")),
            Strategy::RollingUpdate {
                max_surge: 1,
                max_unavailable: 1
            }
        );
        // 25% of 1: surge rounds up, unavailability down.
        assert_eq!(
            strategy(&deployment(1, "x")),
            Strategy::RollingUpdate {
                max_surge: 1,
                max_unavailable: 0
            }
        );
        let mut d = deployment(10, "x");
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("RollingUpdate".into()),
            rolling_update: Some(RollingUpdateDeployment {
                max_surge: Some(IntOrString::Int(0)),
                max_unavailable: Some(IntOrString::String("0%".into())),
            }),
        });
        assert_eq!(
            strategy(&d),
            Strategy::RollingUpdate {
                max_surge: 0,
                max_unavailable: 1
            }
        );
    }

    #[test]
    fn a_new_deployment_gets_its_replicas_and_a_deleted_pod_comes_back() {
        let d = deployment(3, "web:1");
        let h = template_hash(&d).unwrap();
        assert_eq!(creates(&plan(&d, &[])), 3);
        let pods = [pod("a", &h, true), pod("b", &h, true)];
        assert_eq!(plan(&d, &pods), vec![Action::Create]);
        // Terminating pods count nowhere; finished ones are deleted and replaced.
        let mut gone = pod("c", &h, false);
        gone.terminating = true;
        let mut failed = pod("f", &h, false);
        failed.finished = true;
        let pods = [pod("a", &h, true), pod("b", &h, true), gone, failed];
        let a = plan(&d, &pods);
        assert_eq!(deletes(&a), ["f"]);
        assert_eq!(creates(&a), 1);
        // Steady state: nothing to do.
        let pods = [pod("a", &h, true), pod("b", &h, true), pod("c", &h, true)];
        assert!(plan(&d, &pods).is_empty());
        // Scaled down: the least valuable pods go.
        let d1 = deployment(1, "web:1");
        let pods = [pod("a", &h, true), pod("b", &h, false), pod("c", &h, true)];
        let a = plan(&d1, &pods);
        assert_eq!(creates(&a), 0);
        assert_eq!(deletes(&a).len(), 2);
        assert!(deletes(&a).contains(&"b"));
    }

    #[test]
    fn a_rolling_update_surges_then_replaces_old_pods_as_new_ones_become_available() {
        let old = template_hash(&deployment(4, "web:1")).unwrap();
        let d = deployment(4, "web:2");
        let new = template_hash(&d).unwrap();
        let olds = |n: usize| (0..n).map(|i| pod(&format!("o{i}"), &old, true));
        // 4 old ready; maxSurge 1, maxUnavailable 1: one new pod first …
        let pods: Vec<_> = olds(4).collect();
        assert_eq!(plan(&d, &pods), vec![Action::Create]);
        // … then one old may go (3 available stays ≥ 4 - 1) while the new one starts.
        let mut pods: Vec<_> = olds(4).collect();
        pods.push(pod("n0", &new, false));
        let a = plan(&d, &pods);
        assert_eq!((creates(&a), deletes(&a).len()), (0, 1));
        // 3 old + 1 new not ready: room for one more new pod.
        let mut pods: Vec<_> = olds(3).collect();
        pods.push(pod("n0", &new, false));
        assert_eq!(plan(&d, &pods), vec![Action::Create]);
        // 3 old + 2 new, none of them ready: no old may go (3 available = the minimum).
        let mut pods: Vec<_> = olds(3).collect();
        pods.extend([pod("n0", &new, false), pod("n1", &new, false)]);
        assert!(plan(&d, &pods).is_empty());
        // The new ones ready: two old go.
        let mut pods: Vec<_> = olds(3).collect();
        pods.extend([pod("n0", &new, true), pod("n1", &new, true)]);
        let a = plan(&d, &pods);
        assert_eq!(deletes(&a).len(), 2);
        assert!(deletes(&a).iter().all(|n| n.starts_with('o')));
        // Unavailable old pods go first, whatever the new ones do.
        let mut pods: Vec<_> = olds(3).collect();
        pods.push(pod("sick", &old, false));
        pods.push(pod("n0", &new, false));
        let a = plan(&d, &pods);
        assert_eq!(deletes(&a)[0], "sick");
    }

    #[test]
    fn a_rollout_whose_new_pods_never_become_ready_keeps_the_old_ones() {
        let old = template_hash(&deployment(1, "web:1")).unwrap();
        let d = deployment(1, "cannot-pull/web:2");
        let new = template_hash(&d).unwrap();
        // replicas 1: surge 1, unavailable 0.
        assert_eq!(plan(&d, &[pod("o", &old, true)]), vec![Action::Create]);
        assert!(plan(&d, &[pod("o", &old, true), pod("n", &new, false)]).is_empty());
        assert_eq!(
            deletes(&plan(&d, &[pod("o", &old, true), pod("n", &new, true)])),
            ["o"]
        );
    }

    #[test]
    fn recreate_deletes_every_old_pod_before_making_new_ones() {
        let old = template_hash(&deployment(2, "web:1")).unwrap();
        let mut d = deployment(2, "web:2");
        d.spec.strategy = Some(DeploymentStrategy {
            type_: Some("Recreate".into()),
            rolling_update: None,
        });
        let a = plan(&d, &[pod("a", &old, true), pod("b", &old, true)]);
        assert_eq!(deletes(&a), ["a", "b"]);
        let mut t = pod("a", &old, true);
        t.terminating = true;
        assert!(plan(&d, &[t]).is_empty());
        assert_eq!(creates(&plan(&d, &[])), 2);
    }

    fn reason(s: &DeploymentStatus, t: &str) -> (String, String) {
        let c = condition(s, t).unwrap();
        (
            c.status.clone().unwrap_or_default(),
            c.reason.clone().unwrap(),
        )
    }

    #[test]
    fn status_follows_a_rollout_to_completion() {
        let mut d = deployment(2, "web:1");
        let h = template_hash(&d).unwrap();
        // Just created, no pods.
        let s = status(&d, &[], ts(0));
        assert_eq!(s.observed_generation, Some(1));
        assert_eq!(
            (
                s.replicas,
                s.updated_replicas,
                s.available_replicas,
                s.unavailable_replicas
            ),
            (Some(0), Some(0), Some(0), Some(2))
        );
        assert_eq!(
            reason(&s, "Available"),
            ("False".into(), "MinimumReplicasUnavailable".into())
        );
        assert_eq!(
            reason(&s, "Progressing"),
            ("True".into(), "NewReplicaSetCreated".into())
        );
        let msg = condition(&s, "Progressing")
            .unwrap()
            .message
            .clone()
            .unwrap();
        assert_eq!(msg, format!("Created new replica set \"web-{h}\""));
        d.status = Some(s);
        // Pods made, one ready: progress.
        let pods = [pod("a", &h, true), pod("b", &h, false)];
        let s = status(&d, &pods, ts(5));
        // 25% of 2 rounds down to 0 unavailable: not yet available.
        assert_eq!(reason(&s, "Available").0, "False");
        assert_eq!(
            reason(&s, "Progressing"),
            ("True".into(), "ReplicaSetUpdated".into())
        );
        assert_eq!(s.ready_replicas, Some(1));
        d.status = Some(s);
        // Both ready: complete.
        let pods = [pod("a", &h, true), pod("b", &h, true)];
        let s = status(&d, &pods, ts(9));
        assert_eq!(
            reason(&s, "Available"),
            ("True".into(), "MinimumReplicasAvailable".into())
        );
        assert_eq!(
            reason(&s, "Progressing"),
            ("True".into(), "NewReplicaSetAvailable".into())
        );
        assert_eq!(
            condition(&s, "Progressing").unwrap().message.as_deref(),
            Some(format!("ReplicaSet \"web-{h}\" has successfully progressed.").as_str())
        );
        assert_eq!(s.unavailable_replicas, Some(0));
        d.status = Some(s.clone());
        // Complete is stable: the same inputs give the same status (no write), and a deleted
        // pod is not a rollout.
        assert_eq!(status(&d, &pods, ts(100)), s);
        let s2 = status(&d, &[pod("a", &h, true)], ts(101));
        assert_eq!(
            reason(&s2, "Progressing"),
            ("True".into(), "NewReplicaSetAvailable".into())
        );
        assert_eq!(next_check(&d, &s, ts(100)), None);
    }

    #[test]
    fn a_stuck_rollout_exceeds_its_progress_deadline() {
        let d0 = deployment(1, "web:1");
        let old = template_hash(&d0).unwrap();
        let mut d = deployment(1, "cannot-pull/web:2");
        d.metadata.generation = Some(2);
        d.spec.progress_deadline_seconds = Some(60);
        let new = template_hash(&d).unwrap();
        // The previous status: complete on the old template.
        let mut done = d0.clone();
        done.status = Some(status(&d0, &[], ts(0)));
        let s = status(&done, &[pod("o", &old, true)], ts(1));
        let s = {
            let mut x = d0.clone();
            x.status = Some(s);
            status(&x, &[pod("o", &old, true)], ts(2))
        };
        assert_eq!(reason(&s, "Progressing").1, "NewReplicaSetAvailable");
        d.status = Some(s);
        // The template changed: a new replica set, progressing.
        let pods = [pod("o", &old, true), pod("n", &new, false)];
        let s = status(&d, &pods, ts(10));
        assert_eq!(
            reason(&s, "Progressing"),
            ("True".into(), "NewReplicaSetCreated".into())
        );
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(s.updated_replicas, Some(1));
        assert_eq!(reason(&s, "Available").0, "True");
        assert_eq!(next_check(&d, &s, ts(10)), Some(61));
        d.status = Some(s);
        // Nothing moves: still progressing until the deadline …
        let s = status(&d, &pods, ts(70));
        assert_eq!(reason(&s, "Progressing").1, "NewReplicaSetCreated");
        d.status = Some(s);
        // A paused Deployment does not time out.
        let mut paused = d.clone();
        paused.spec.paused = Some(true);
        assert_eq!(
            reason(&status(&paused, &pods, ts(500)), "Progressing").1,
            "NewReplicaSetCreated"
        );
        // … else it is exceeded, and it stays so.
        let s = status(&d, &pods, ts(71));
        assert_eq!(
            reason(&s, "Progressing"),
            ("False".into(), "ProgressDeadlineExceeded".into())
        );
        assert_eq!(
            condition(&s, "Progressing").unwrap().message.as_deref(),
            Some(format!("ReplicaSet \"web-{new}\" has timed out progressing.").as_str())
        );
        d.status = Some(s);
        let s = status(&d, &pods, ts(500));
        assert_eq!(reason(&s, "Progressing").1, "ProgressDeadlineExceeded");
        assert_eq!(next_check(&d, &s, ts(500)), None);
    }

    #[test]
    fn min_ready_seconds_delays_availability() {
        use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
        let p = Pod {
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(ts(0))),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = PodView::of(&p, 10, ts(5));
        assert!(v.ready && !v.available);
        assert!(PodView::of(&p, 10, ts(10)).available);
        assert!(PodView::of(&p, 0, ts(0)).available);
    }

    #[test]
    fn the_selector_becomes_a_label_query() {
        assert_eq!(
            selector_query(&deployment(1, "x")).as_deref(),
            Some("app=web")
        );
    }
}
