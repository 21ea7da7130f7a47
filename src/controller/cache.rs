//! What the reconcilers read of the cluster without asking the API each time: reflector
//! stores of the workflows, the policies, the workflows' children and their
//! ControllerRevisions, fed by the same watches that trigger the reconciles ([`super::run`]
//! builds them and drives them), and the two rules that keep reads from them honest:
//! - **a child is applied again only when something moved** ([`Applied`]): the rendered object
//!   differs from what this controller applied last, or the live object's fingerprint (its
//!   generation and metadata for a Deployment, whose status moves on its own; its
//!   resourceVersion for the rest) differs from the one the apply returned, or it is gone from
//!   the store. Drift (an edit, a scale, a delete) moves the fingerprint, so it is repaired
//!   by the apply that follows; a store that lags behind the controller's own write only
//!   costs one apply that changes nothing;
//! - **revisions are read as this controller last wrote them** ([`Written`]) until the store
//!   shows the same (or [`EXPECTATION_TTL`] has passed: then the store wins, whoever changed
//!   it): a store that has not yet seen the revision created a moment ago must not make the
//!   next reconcile create it again, nor a phase patched a moment ago be decided again.
//!
//! The stores are per term of leadership: a standby keeps none, and a new term starts
//! with fresh stores (and forgets what it wrote). Nothing here decides anything: the
//! reconcilers do.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ControllerRevision, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};

use super::WORKFLOW_LABEL;
use super::context::Error;
use super::revision::Revision;
use crate::api::policy::CircuitPolicy;
use crate::api::workflow::AgentWorkflow;

/// How long what this controller wrote of a workflow's revisions wins over a store that does
/// not show it yet. A watch is milliseconds behind; this bounds how long a change made by
/// someone else to a revision can go unseen.
pub const EXPECTATION_TTL: Duration = Duration::from_secs(30);

/// The reflector stores of one term of leadership.
#[derive(Clone)]
pub struct Caches {
    pub workflows: Store<AgentWorkflow>,
    pub policies: Store<CircuitPolicy>,
    /// Their status says whether a revision is available; kept without their pod template
    /// ([`slim_deployment`]).
    pub deployments: Store<Deployment>,
    /// Metadata only: what an apply needs to know is whether they moved.
    pub services: Store<PartialObjectMeta<Service>>,
    pub config_maps: Store<PartialObjectMeta<ConfigMap>>,
    pub service_accounts: Store<PartialObjectMeta<ServiceAccount>>,
    /// Those labelled with a workflow.
    pub revisions: Store<ControllerRevision>,
}

impl Caches {
    /// Wait (up to `timeout`) until every store has had its first full list: a reconcile that
    /// read a store still filling would take missing revisions or children for absent.
    pub async fn ready(&self, timeout: Duration) -> Result<(), Error> {
        let all = async {
            let _ = tokio::join!(
                self.workflows.wait_until_ready(),
                self.policies.wait_until_ready(),
                self.deployments.wait_until_ready(),
                self.services.wait_until_ready(),
                self.config_maps.wait_until_ready(),
                self.service_accounts.wait_until_ready(),
                self.revisions.wait_until_ready(),
            );
        };
        tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| Error::Timeout(timeout))
    }

    /// The Deployments labelled with workflow `name` in `ns`.
    pub fn deployments_of(&self, ns: &str, name: &str) -> Vec<Deployment> {
        self.deployments
            .state_filter(|d| belongs(&d.metadata, ns, name))
            .into_iter()
            .map(|d| (*d).clone())
            .collect()
    }

    /// The names of the Services labelled with workflow `name` in `ns`.
    pub fn service_names_of(&self, ns: &str, name: &str) -> Vec<String> {
        self.services
            .state_filter(|s| belongs(&s.metadata, ns, name))
            .into_iter()
            .filter_map(|s| s.metadata.name.clone())
            .collect()
    }

    /// The ControllerRevisions labelled with workflow `name` in `ns`.
    pub fn revisions_of(&self, ns: &str, name: &str) -> Vec<Arc<ControllerRevision>> {
        self.revisions
            .state_filter(|r| belongs(&r.metadata, ns, name))
    }

    /// The workflows of namespace `ns`.
    pub fn workflows_in(&self, ns: &str) -> Vec<Arc<AgentWorkflow>> {
        self.workflows
            .state_filter(|w| w.metadata.namespace.as_deref().unwrap_or("default") == ns)
    }

    /// The CircuitPolicy `ns/name`, if the store has it.
    pub fn policy(&self, ns: &str, name: &str) -> Option<Arc<CircuitPolicy>> {
        self.policies.get(&ObjectRef::new(name).within(ns))
    }

    /// The fingerprint of the live child `kind/name` in `ns`, if the store has it (see
    /// [`fingerprint`]).
    pub fn live(&self, kind: ChildKind, ns: &str, name: &str) -> Option<u64> {
        match kind {
            ChildKind::Deployment => self
                .deployments
                .get(&ObjectRef::new(name).within(ns))
                .map(|d| fingerprint(kind, &d.metadata)),
            ChildKind::Service => self
                .services
                .get(&ObjectRef::new(name).within(ns))
                .map(|s| fingerprint(kind, &s.metadata)),
            ChildKind::ConfigMap => self
                .config_maps
                .get(&ObjectRef::new(name).within(ns))
                .map(|c| fingerprint(kind, &c.metadata)),
            ChildKind::ServiceAccount => self
                .service_accounts
                .get(&ObjectRef::new(name).within(ns))
                .map(|s| fingerprint(kind, &s.metadata)),
        }
    }
}

/// What a store keeps of an object: all but its managedFields (as the API returns an object,
/// often its largest part; a `serde_json::Value` in memory at that; read by no reconcile).
pub fn slim<K: kube::Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
}

/// What the Deployment store keeps: also not the pod template. Whether a revision is
/// available is read from the labels, generation, replicas and status; a template in the
/// store would be the rendered one, which the controller has already.
pub fn slim_deployment(d: &mut Deployment) {
    slim(d);
    d.spec.template = Default::default();
}

fn belongs(meta: &ObjectMeta, ns: &str, name: &str) -> bool {
    meta.namespace.as_deref().unwrap_or("default") == ns
        && meta
            .labels
            .as_ref()
            .and_then(|l| l.get(WORKFLOW_LABEL))
            .is_some_and(|w| w == name)
}

/// The kinds of children a workflow has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChildKind {
    Deployment,
    Service,
    ConfigMap,
    ServiceAccount,
}

impl ChildKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildKind::Deployment => "Deployment",
            ChildKind::Service => "Service",
            ChildKind::ConfigMap => "ConfigMap",
            ChildKind::ServiceAccount => "ServiceAccount",
        }
    }
}

/// What says a live child moved since the controller applied it. A Deployment's
/// resourceVersion moves with every status write of the deployment controller, so its
/// fingerprint is what only a change of the object moves: uid, generation (the spec),
/// labels, annotations, owner references, deletion. The other children have no status worth
/// the name: their resourceVersion (and uid) is the fingerprint.
pub fn fingerprint(kind: ChildKind, meta: &ObjectMeta) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.uid.hash(&mut h);
    match kind {
        ChildKind::Deployment => {
            meta.generation.hash(&mut h);
            meta.labels.hash(&mut h);
            meta.annotations.hash(&mut h);
            serde_json::to_string(&meta.owner_references)
                .unwrap_or_default()
                .hash(&mut h);
            meta.deletion_timestamp.is_some().hash(&mut h);
        }
        _ => meta.resource_version.hash(&mut h),
    }
    h.finish()
}

/// A hash of a rendered child, to tell whether it is what was applied last.
pub fn rendered_hash<T: serde::Serialize>(obj: &T) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(obj).unwrap_or_default().hash(&mut h);
    h.finish()
}

/// Per workflow, the children this controller applied: (kind, name) → (hash of the rendered
/// object, fingerprint of the object the apply returned).
#[derive(Default, Debug)]
pub struct Applied(HashMap<(ChildKind, String), (u64, u64)>);

impl Applied {
    /// Whether applying `rendered` again would change nothing: the same object was applied
    /// last and the live one (`live`, its fingerprint in the store; `None` when absent) is
    /// still the one that apply returned.
    pub fn unchanged(&self, kind: ChildKind, name: &str, rendered: u64, live: Option<u64>) -> bool {
        match (self.0.get(&(kind, name.to_owned())), live) {
            (Some((r, f)), Some(l)) => *r == rendered && *f == l,
            _ => false,
        }
    }

    /// Remember an apply of `kind/name`: the rendered hash and the returned object's fingerprint.
    pub fn record(&mut self, kind: ChildKind, name: &str, rendered: u64, returned: u64) {
        self.0.insert((kind, name.to_owned()), (rendered, returned));
    }

    /// Forget a child (deleted, or its apply failed).
    pub fn forget(&mut self, kind: ChildKind, name: &str) {
        self.0.remove(&(kind, name.to_owned()));
    }
}

/// Per workflow, its revisions as this controller last wrote them, and when.
#[derive(Debug)]
pub struct Written {
    pub revisions: Vec<Revision>,
    pub at: Instant,
}

/// The revisions to decide with: what this controller wrote, while the store (`stored`) does
/// not show the same and the write is younger than [`EXPECTATION_TTL`]; else the store's.
/// Returns them and whether the expectation still holds (false: forget it).
pub fn reconcile_revisions(
    written: Option<&Written>,
    stored: Vec<Revision>,
    now: Instant,
) -> (Vec<Revision>, bool) {
    match written {
        Some(w) if now.duration_since(w.at) < EXPECTATION_TTL && !same(&w.revisions, &stored) => {
            (w.revisions.clone(), true)
        }
        _ => (stored, false),
    }
}

/// Whether two lists of revisions say the same (number, hash, name, phase, reason, since):
/// the spec is identified by the hash.
fn same(a: &[Revision], b: &[Revision]) -> bool {
    let key = |r: &Revision| {
        (
            r.number,
            r.hash.clone(),
            r.name.clone(),
            r.phase,
            r.reason.clone(),
            r.since,
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort_by_key(|k| k.0);
    b.sort_by_key(|k| k.0);
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::revision::Phase;
    use k8s_openapi::jiff::Timestamp;

    fn meta(rv: &str, generation: i64, label: &str) -> ObjectMeta {
        ObjectMeta {
            uid: Some("u-1".into()),
            resource_version: Some(rv.into()),
            generation: Some(generation),
            labels: Some([("k".to_owned(), label.to_owned())].into()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_deployment_moves_with_its_spec_and_metadata_not_its_status() {
        let d = ChildKind::Deployment;
        let base = fingerprint(d, &meta("10", 1, "a"));
        // A status write: new resourceVersion, same generation.
        assert_eq!(base, fingerprint(d, &meta("11", 1, "a")));
        // A scale or an edit of the template.
        assert_ne!(base, fingerprint(d, &meta("12", 2, "a")));
        // A label changed by hand.
        assert_ne!(base, fingerprint(d, &meta("13", 1, "b")));
        // Deleted and created again by someone else: a new uid.
        let mut other = meta("10", 1, "a");
        other.uid = Some("u-2".into());
        assert_ne!(base, fingerprint(d, &other));
        let mut deleting = meta("14", 1, "a");
        deleting.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            Timestamp::UNIX_EPOCH,
        ));
        assert_ne!(base, fingerprint(d, &deleting));
    }

    #[test]
    fn a_stored_deployment_keeps_what_availability_reads_and_not_its_bulk() {
        let mut d: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "d", "generation": 3, "labels": {"r4.dev/revision": "2"},
                "managedFields": [{"manager": "r4", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}]},
            "spec": {"replicas": 2, "selector": {}, "template": {"spec": {"containers": [{"name": "agent", "image": "a:1"}]}}},
            "status": {"observedGeneration": 3, "availableReplicas": 2}
        }))
        .expect("test deployment");
        let before = fingerprint(ChildKind::Deployment, &d.metadata);
        slim_deployment(&mut d);
        assert!(d.metadata.managed_fields.is_none());
        let spec = &d.spec;
        assert!(spec.template.spec.is_none());
        assert_eq!(spec.replicas, Some(2));
        assert_eq!(
            d.status.as_ref().and_then(|s| s.available_replicas),
            Some(2)
        );
        assert_eq!(fingerprint(ChildKind::Deployment, &d.metadata), before);
    }

    #[test]
    fn other_children_move_with_their_resource_version() {
        let c = ChildKind::ConfigMap;
        assert_eq!(
            fingerprint(c, &meta("10", 1, "a")),
            fingerprint(c, &meta("10", 1, "a"))
        );
        assert_ne!(
            fingerprint(c, &meta("10", 1, "a")),
            fingerprint(c, &meta("11", 1, "a"))
        );
    }

    #[test]
    fn an_apply_is_skipped_only_when_both_the_rendering_and_the_live_object_are_as_left() {
        let mut a = Applied::default();
        let k = ChildKind::Deployment;
        assert!(!a.unchanged(k, "d", 1, Some(7)), "never applied");
        a.record(k, "d", 1, 7);
        assert!(a.unchanged(k, "d", 1, Some(7)));
        assert!(!a.unchanged(k, "d", 2, Some(7)), "rendered differently");
        assert!(!a.unchanged(k, "d", 1, Some(8)), "the live object moved");
        assert!(
            !a.unchanged(k, "d", 1, None),
            "deleted, or not in the store yet"
        );
        assert!(
            !a.unchanged(ChildKind::Service, "d", 1, Some(7)),
            "another kind"
        );
        a.forget(k, "d");
        assert!(!a.unchanged(k, "d", 1, Some(7)));
    }

    fn rev(number: i64, phase: Phase) -> Revision {
        let mut r = crate::controller::revision::tests::rev(number, "a:1", Phase::Progressing);
        r.phase = phase;
        r
    }

    #[test]
    fn what_was_written_wins_until_the_store_shows_it_or_it_is_old() {
        let t0 = Instant::now();
        let written = Written {
            revisions: vec![rev(1, Phase::Healthy), rev(2, Phase::Progressing)],
            at: t0,
        };
        // The store has not seen revision 2 yet, nor revision 1's new phase.
        let stale = vec![rev(1, Phase::Progressing)];
        let (got, keep) = reconcile_revisions(Some(&written), stale.clone(), t0);
        assert!(keep);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].phase, Phase::Healthy);
        // Caught up (in another order): the store's, and the expectation is dropped.
        let caught = vec![rev(2, Phase::Progressing), rev(1, Phase::Healthy)];
        let (got, keep) = reconcile_revisions(Some(&written), caught, t0);
        assert!(!keep);
        assert_eq!(got.len(), 2);
        // Too old: the store wins, whatever it says.
        let (got, keep) = reconcile_revisions(Some(&written), stale, t0 + EXPECTATION_TTL);
        assert!(!keep);
        assert_eq!(got.len(), 1);
        // Nothing written: the store.
        let (got, keep) = reconcile_revisions(None, Vec::new(), t0);
        assert!(!keep && got.is_empty());
    }
}
