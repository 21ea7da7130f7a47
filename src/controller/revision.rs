//! Revisions of an AgentWorkflow: every distinct spec is kept as a numbered, hashed
//! `ControllerRevision` (owned by the workflow, so it goes with it), with the phase the rollout
//! gave it.
//!
//! Owns what a revision holds ([`revisioned_spec`]), its name and hash, its wire shape (labels
//! [`WORKFLOW_LABEL`] and [`HASH_LABEL`], `data = {"spec": …}`, the
//! phase in annotations) and which revisions pruning may delete. Deciding what to apply and
//! when a revision fails is [`super::rollout`]'s; creating, listing and deleting the objects is
//! the reconciler's.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use k8s_openapi::jiff::Timestamp;
use kube::Resource;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::WORKFLOW_LABEL;
use crate::api::workflow::{AgentWorkflow, AgentWorkflowSpec, RevisionStatus};

/// Label holding a revision's spec hash (also the suffix of its name).
pub const HASH_LABEL: &str = "r4.dev/revision-hash";
/// Annotation holding a revision's [`Phase`].
pub const PHASE_ANNOTATION: &str = "r4.dev/phase";
/// Annotation holding why a revision is in its phase (why it failed), when there is a reason.
pub const REASON_ANNOTATION: &str = "r4.dev/reason";
/// Annotation holding when a revision entered its phase (RFC 3339).
pub const SINCE_ANNOTATION: &str = "r4.dev/phase-since";

/// Where a revision stands in its rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Applied (or about to be) and not yet judged: its Deployments are becoming available or
    /// its analysis window is running. A revision superseded before it was judged keeps this
    /// phase: it was never judged.
    Progressing,
    /// Its Deployments became available and it passed its analysis; never judged again.
    Healthy,
    /// It missed its deadline, broke its analysis or was rolled back by hand; pinned out until
    /// the spec changes to another revision or `spec.rollbackTo` names it.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "Progressing",
            Phase::Healthy => "Healthy",
            Phase::Failed => "Failed",
        }
    }

    fn parse(s: &str) -> Option<Phase> {
        match s {
            "Progressing" => Some(Phase::Progressing),
            "Healthy" => Some(Phase::Healthy),
            "Failed" => Some(Phase::Failed),
            _ => None,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One revision of a workflow's spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Revision {
    /// 1, 2, …: one more than the highest number known when it was created.
    pub number: i64,
    /// [`spec_hash`] of its spec.
    pub hash: String,
    /// Name of its ControllerRevision: `<workflow>-<hash>`.
    pub name: String,
    /// The revisioned spec ([`revisioned_spec`]).
    pub spec: AgentWorkflowSpec,
    pub phase: Phase,
    /// Why it is in its phase (set for Failed).
    pub reason: Option<String>,
    /// When it entered its phase (for Progressing: when its rollout started).
    pub since: Timestamp,
}

impl Revision {
    /// Its entry in `status.revisions`.
    pub fn to_status(&self) -> RevisionStatus {
        RevisionStatus {
            revision: self.number,
            hash: Some(self.hash.clone()),
            phase: self.phase.as_str().to_owned(),
            reason: self.reason.clone(),
        }
    }
}

/// Name of the ControllerRevision of the revision of `workflow` with `hash`.
pub fn revision_name(workflow: &str, hash: &str) -> String {
    format!("{workflow}-{hash}")
}

/// The fields a revision holds: the spec without what acts without a rollout.
///
/// Left out, so that changing them creates no revision and a rollback never undoes them:
/// - `killSwitches`: a switch must act at once, never wait for a rollout, and rolling back
///   a bad revision must not release a switch someone engaged;
/// - `rollout` and `rollbackTo`: they steer the rollout itself (changing the deadline or the
///   analysis must not restart it; `rollbackTo` is an instruction, consumed once acted on);
/// - `slo` and `economics`: they only change how the workflow is measured.
///
/// What the controller renders is the applied revision's spec with these fields taken from
/// the current spec ([`spec_to_render`]).
pub fn revisioned_spec(spec: &AgentWorkflowSpec) -> AgentWorkflowSpec {
    AgentWorkflowSpec {
        kill_switches: None,
        rollout: None,
        rollback_to: None,
        slo: None,
        economics: None,
        ..spec.clone()
    }
}

/// The spec to render while revision `revision` (a revisioned spec) is applied: its fields,
/// with the ones a revision does not hold ([`revisioned_spec`]) from the current spec.
pub fn spec_to_render(
    revision: &AgentWorkflowSpec,
    current: &AgentWorkflowSpec,
) -> AgentWorkflowSpec {
    AgentWorkflowSpec {
        kill_switches: current.kill_switches.clone(),
        rollout: current.rollout.clone(),
        rollback_to: current.rollback_to.clone(),
        slo: current.slo.clone(),
        economics: current.economics.clone(),
        ..revisioned_spec(revision)
    }
}

/// Stable hash of what a revision holds: sha256 of the canonical JSON (object keys sorted,
/// no spaces) of [`revisioned_spec`], first 10 hex characters. Equal specs hash equal
/// whatever order their fields or maps came in; a field a revision does not hold never
/// changes it.
pub fn spec_hash(spec: &AgentWorkflowSpec) -> String {
    // A spec is plain data (strings, numbers, maps with string keys): serializing it cannot
    // fail; were it ever to, hashing `null` would still give one stable answer.
    let v = serde_json::to_value(revisioned_spec(spec)).unwrap_or(Value::Null);
    let mut text = String::new();
    canonical(&v, &mut text);
    let digest = Sha256::digest(text.as_bytes());
    hex::encode(digest)[..10].to_owned()
}

/// JSON with object keys sorted, whatever map serde_json was built with.
fn canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                canonical(&m[k], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical(x, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// The ControllerRevision holding `rev`: in the workflow's namespace, owned by the workflow
/// (`controller: true`, so it is garbage-collected with it), labelled with the workflow and
/// the hash, `revision` = its number, `data = {"spec": …}`, and its phase, reason and since in
/// the annotations [`PHASE_ANNOTATION`], [`REASON_ANNOTATION`], [`SINCE_ANNOTATION`].
///
/// A workflow read from the API always has a uid; one without (built in memory) gets no owner
/// reference.
pub fn controller_revision(wf: &AgentWorkflow, rev: &Revision) -> ControllerRevision {
    let wf_name = wf.metadata.name.clone().unwrap_or_default();
    let labels = BTreeMap::from([
        (WORKFLOW_LABEL.to_owned(), wf_name),
        (HASH_LABEL.to_owned(), rev.hash.clone()),
    ]);
    let mut annotations = BTreeMap::from([
        (PHASE_ANNOTATION.to_owned(), rev.phase.as_str().to_owned()),
        (SINCE_ANNOTATION.to_owned(), rev.since.to_string()),
    ]);
    if let Some(r) = &rev.reason {
        annotations.insert(REASON_ANNOTATION.to_owned(), r.clone());
    }
    let spec = serde_json::to_value(&rev.spec).unwrap_or(Value::Null);
    ControllerRevision {
        metadata: ObjectMeta {
            name: Some(rev.name.clone()),
            namespace: wf.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: wf.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        data: RawExtension(serde_json::json!({ "spec": spec })),
        revision: Some(rev.number),
    }
}

/// The revision a ControllerRevision holds. One that is not r4's (no [`HASH_LABEL`] or
/// workflow label) or is damaged (no or unreadable spec, phase or since; a number below 1) is
/// an `Err` naming the object and what is wrong, for the caller to report and skip.
///
/// The hash is taken from the label, not recomputed: a spec written by an older r4 may
/// serialize differently today, and its revision must keep its identity.
pub fn from_controller_revision(cr: &ControllerRevision) -> Result<Revision, String> {
    let name = cr.metadata.name.clone().unwrap_or_default();
    let err = |what: &str| format!("controllerrevision {name:?}: {what}");
    let label = |key: &str| {
        cr.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(key))
            .filter(|v| !v.is_empty())
    };
    if label(WORKFLOW_LABEL).is_none() {
        return Err(err(&format!("label {WORKFLOW_LABEL} missing: not r4's")));
    }
    let hash = label(HASH_LABEL)
        .ok_or_else(|| err(&format!("label {HASH_LABEL} missing: not r4's")))?
        .clone();
    let number = cr.revision.ok_or_else(|| err("revision missing"))?;
    if number < 1 {
        return Err(err(&format!(
            "revision: {number} is not a revision number (>= 1)"
        )));
    }
    let spec = cr
        .data
        .0
        .get("spec")
        .ok_or_else(|| err("data.spec missing"))?;
    let spec: AgentWorkflowSpec =
        serde_json::from_value(spec.clone()).map_err(|e| err(&format!("data.spec: {e}")))?;
    let annotation = |key: &str| cr.metadata.annotations.as_ref().and_then(|a| a.get(key));
    let phase = annotation(PHASE_ANNOTATION)
        .ok_or_else(|| err(&format!("annotation {PHASE_ANNOTATION} missing")))?;
    let phase = Phase::parse(phase).ok_or_else(|| {
        err(&format!(
            "annotation {PHASE_ANNOTATION}: {phase:?} is not Progressing, Healthy or Failed"
        ))
    })?;
    let since = annotation(SINCE_ANNOTATION)
        .ok_or_else(|| err(&format!("annotation {SINCE_ANNOTATION} missing")))?;
    let since = since
        .parse::<Timestamp>()
        .map_err(|e| err(&format!("annotation {SINCE_ANNOTATION}: {since:?}: {e}")))?;
    Ok(Revision {
        number,
        hash,
        name,
        spec,
        phase,
        reason: annotation(REASON_ANNOTATION).cloned(),
        since,
    })
}

/// Names of the revisions to delete so that at most `limit` remain, oldest (lowest number)
/// first. Never one whose number is in `keep` (pass [`super::rollout::Plan::keep`]: the applied
/// revision, the spec's own — a Failed one must stay to stay pinned out — and the rollback
/// target), and never the newest Healthy revision, whatever `keep` says: it is what an
/// automatic rollback goes back to. So more than `limit` may remain.
pub fn to_prune(revisions: &[Revision], limit: usize, keep: &[i64]) -> Vec<String> {
    let newest_healthy = revisions
        .iter()
        .filter(|r| r.phase == Phase::Healthy)
        .map(|r| r.number)
        .max();
    let mut oldest_first: Vec<&Revision> = revisions.iter().collect();
    oldest_first.sort_by_key(|r| r.number);
    let mut excess = revisions.len().saturating_sub(limit);
    let mut out = Vec::new();
    for r in oldest_first {
        if excess == 0 {
            break;
        }
        if keep.contains(&r.number) || Some(r.number) == newest_healthy {
            continue;
        }
        out.push(r.name.clone());
        excess -= 1;
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A small valid spec whose first agent runs `image`.
    pub(crate) fn spec(image: &str) -> AgentWorkflowSpec {
        serde_json::from_value(serde_json::json!({
            "queue": {"redis": {"url": "redis://redis:6379"}},
            "agents": [
                {"name": "intake", "image": image, "consumes": "tickets", "produces": ["work"]},
                {"name": "worker", "image": "ghcr.io/acme/worker:1", "consumes": "work"}
            ]
        }))
        .unwrap()
    }

    pub(crate) fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    pub(crate) fn rev(number: i64, image: &str, phase: Phase) -> Revision {
        let spec = spec(image);
        let hash = spec_hash(&spec);
        Revision {
            number,
            name: revision_name("wf", &hash),
            hash,
            spec: revisioned_spec(&spec),
            phase,
            reason: (phase == Phase::Failed).then(|| "it broke".to_owned()),
            since: at(number * 100),
        }
    }

    fn workflow() -> AgentWorkflow {
        let mut wf = AgentWorkflow::new("wf", spec("a:1"));
        wf.metadata.namespace = Some("ns".into());
        wf.metadata.uid = Some("uid-1".into());
        wf
    }

    #[test]
    fn hash_ignores_what_acts_without_a_rollout_and_nothing_else() {
        let base = spec("a:1");
        let h = spec_hash(&base);
        assert_eq!(h.len(), 10);
        assert!(h.chars().all(|c| c.is_ascii_hexdigit()));
        let mut live = base.clone();
        live.kill_switches =
            Some(serde_json::from_value(serde_json::json!({"all": true})).unwrap());
        live.rollout =
            Some(serde_json::from_value(serde_json::json!({"strategy": "Automatic"})).unwrap());
        live.rollback_to =
            Some(serde_json::from_value(serde_json::json!({"revision": 1})).unwrap());
        live.slo = Some(serde_json::from_value(serde_json::json!({"successRate": 0.9})).unwrap());
        live.economics = Some(
            serde_json::from_value(
                serde_json::json!({"marginPerTask": 1.0, "remediationCostPerFailure": 2.0}),
            )
            .unwrap(),
        );
        assert_eq!(
            spec_hash(&live),
            h,
            "kill switches, rollout, slo… are not revisioned"
        );
        assert_ne!(
            spec_hash(&spec("a:2")),
            h,
            "an image change is a new revision"
        );
        let mut replicas = base.clone();
        replicas.agents[1].replicas = Some(3);
        assert_ne!(spec_hash(&replicas), h);
        // Stable across runs: a changed serialization would re-create every revision.
        assert_eq!(spec_hash(&base), spec_hash(&base.clone()));
    }

    #[test]
    fn hash_is_pinned() {
        // A change here re-creates a revision of every workflow on upgrade (a new rollout of
        // unchanged specs): a new spec field must serialize to nothing when unset. The value
        // is sha256 of `{"agents":[{"consumes":"tickets","image":"a:1","name":"intake",
        // "produces":["work"]},{"consumes":"work","image":"ghcr.io/acme/worker:1",
        // "name":"worker"}],"queue":{"redis":{"url":"redis://redis:6379"}}}`, computed apart.
        assert_eq!(spec_hash(&spec("a:1")), "023adb905e");
    }

    #[test]
    fn hash_does_not_depend_on_key_order() {
        let a = serde_json::json!({"b": 1, "a": {"y": [1, {"q": 2, "p": 3}], "x": "s"}});
        let mut s = String::new();
        canonical(&a, &mut s);
        assert_eq!(s, r#"{"a":{"x":"s","y":[1,{"p":3,"q":2}]},"b":1}"#);
        // Two specs equal but for the order of a map's insertion hash equal.
        let one: AgentWorkflowSpec = serde_json::from_str(
            r#"{"queue":{"redis":{"url":"redis://r"}},"agents":[{"name":"a","image":"i","consumes":"s"}],
                "intake":{"enabled":true,"replicas":2}}"#,
        )
        .unwrap();
        let two: AgentWorkflowSpec = serde_json::from_str(
            r#"{"intake":{"replicas":2,"enabled":true},"agents":[{"consumes":"s","image":"i","name":"a"}],
                "queue":{"redis":{"url":"redis://r"}}}"#,
        )
        .unwrap();
        assert_eq!(spec_hash(&one), spec_hash(&two));
    }

    #[test]
    fn spec_to_render_takes_the_live_fields_from_the_current_spec() {
        let old = revisioned_spec(&spec("a:1"));
        let mut current = spec("a:2");
        current.kill_switches =
            Some(serde_json::from_value(serde_json::json!({"all": true})).unwrap());
        let r = spec_to_render(&old, &current);
        assert_eq!(r.agents[0].image, "a:1");
        assert_eq!(r.kill_switches, current.kill_switches);
    }

    #[test]
    fn controller_revision_round_trips() {
        let wf = workflow();
        let mut r = rev(3, "a:1", Phase::Failed);
        r.reason = Some("success rate 0.412 < 0.98 over 60s (17 tasks)".into());
        let cr = controller_revision(&wf, &r);
        assert_eq!(cr.metadata.name.as_deref(), Some(r.name.as_str()));
        assert!(r.name.starts_with("wf-"));
        assert_eq!(cr.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(cr.revision, Some(3));
        let labels = cr.metadata.labels.clone().unwrap();
        assert_eq!(labels[WORKFLOW_LABEL], "wf");
        assert_eq!(labels[HASH_LABEL], r.hash);
        let owner = &cr.metadata.owner_references.clone().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("AgentWorkflow", "uid-1")
        );
        assert_eq!(owner.controller, Some(true));
        assert!(cr.data.0["spec"]["agents"].is_array());
        assert_eq!(from_controller_revision(&cr).unwrap(), r);
        // Sub-second times survive too (the annotation is full RFC 3339).
        let mut fine = rev(4, "a:2", Phase::Progressing);
        fine.since = Timestamp::from_millisecond(1_800_000_000_123).unwrap();
        let back = from_controller_revision(&controller_revision(&wf, &fine)).unwrap();
        assert_eq!(back, fine);
        assert_eq!(back.reason, None);
        assert_eq!(
            back.to_status(),
            RevisionStatus {
                revision: 4,
                hash: Some(fine.hash.clone()),
                phase: "Progressing".into(),
                reason: None
            }
        );
    }

    #[test]
    fn damaged_or_foreign_revisions_are_errors_naming_what() {
        let good = controller_revision(&workflow(), &rev(2, "a:1", Phase::Healthy));
        let broken = |f: &dyn Fn(&mut ControllerRevision)| {
            let mut cr = good.clone();
            f(&mut cr);
            from_controller_revision(&cr).unwrap_err()
        };
        let e = broken(&|cr| {
            cr.metadata.labels.as_mut().unwrap().remove(HASH_LABEL);
        });
        assert!(e.contains(HASH_LABEL) && e.contains("not r4's"), "{e}");
        let e = broken(&|cr| {
            cr.metadata.labels.as_mut().unwrap().remove(WORKFLOW_LABEL);
        });
        assert!(e.contains(WORKFLOW_LABEL), "{e}");
        let e = broken(&|cr| cr.data = RawExtension(Value::Null));
        assert!(e.contains("data.spec missing"), "{e}");
        let e = broken(&|cr| cr.data = RawExtension(serde_json::json!({"spec": {"agents": 3}})));
        assert!(
            e.starts_with("controllerrevision \"wf-") && e.contains("data.spec: "),
            "{e}"
        );
        let e = broken(&|cr| {
            cr.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(PHASE_ANNOTATION.into(), "Bad".into());
        });
        assert!(e.contains("\"Bad\" is not Progressing"), "{e}");
        let e = broken(&|cr| {
            cr.metadata
                .annotations
                .as_mut()
                .unwrap()
                .remove(PHASE_ANNOTATION);
        });
        assert!(e.contains("r4.dev/phase missing"), "{e}");
        let e = broken(&|cr| {
            cr.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(SINCE_ANNOTATION.into(), "yesterday".into());
        });
        assert!(
            e.contains(SINCE_ANNOTATION) && e.contains("yesterday"),
            "{e}"
        );
        let e = broken(&|cr| cr.metadata.annotations = None);
        assert!(e.contains("missing"), "{e}");
        let e = broken(&|cr| cr.revision = Some(0));
        assert!(e.contains("revision: 0"), "{e}");
        let e = broken(&|cr| cr.revision = None);
        assert!(e.contains("revision missing"), "{e}");
    }

    #[test]
    fn pruning_keeps_the_limit_oldest_first() {
        let revs: Vec<Revision> = (1..=5)
            .map(|n| rev(n, &format!("a:{n}"), Phase::Healthy))
            .collect();
        let names = |ns: &[i64]| -> Vec<String> {
            ns.iter()
                .map(|n| revs[*n as usize - 1].name.clone())
                .collect()
        };
        assert_eq!(to_prune(&revs, 3, &[5]), names(&[1, 2]));
        assert_eq!(to_prune(&revs, 5, &[]), Vec::<String>::new());
        assert_eq!(to_prune(&revs, 10, &[]), Vec::<String>::new());
        assert_eq!(
            to_prune(&revs, 3, &[1]),
            names(&[2, 3]),
            "kept ones are skipped, not counted"
        );
    }

    #[test]
    fn pruning_never_deletes_the_applied_or_the_newest_healthy_revision() {
        // 1 applied (rolled back by hand), 2 Healthy (the automatic rollback target),
        // 3..6 Failed; the limit asks to keep only one.
        let mut revs = vec![rev(1, "a:1", Phase::Healthy), rev(2, "a:2", Phase::Healthy)];
        revs.extend((3..=6).map(|n| rev(n, &format!("a:{n}"), Phase::Failed)));
        let pruned = to_prune(&revs, 1, &[1, 6]);
        for n in [1, 2, 6] {
            assert!(
                !pruned.contains(&revs[n - 1].name),
                "revision {n} pruned: {pruned:?}"
            );
        }
        assert_eq!(pruned.len(), 3, "3, 4 and 5 go: {pruned:?}");
        // Without keep, the newest Healthy still stays.
        let pruned = to_prune(&revs, 1, &[]);
        assert!(!pruned.contains(&revs[1].name));
        assert!(pruned.contains(&revs[0].name));
    }
}
