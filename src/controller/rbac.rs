//! The controller's RBAC, derived from the code: [`CALLS`] lists every (verb, group,
//! resource) the controller makes, [`role_yaml`] renders `config/rbac/role.yaml` from it
//! (`r4 rbac`, `make rbac`; a test keeps the file fresh), and [`RecordingLayer`] records the
//! calls a kube `Client` actually makes so a test run against `r4 dev` can [`audit`] the list:
//! a call made but not listed is a permission the role lacks (the controller would be refused
//! in a cluster); a call listed but never made is a permission granted for nothing.
//!
//! Whoever adds an API call to the controller adds it to [`CALLS`] in the same change; the
//! reconcilers' own tests run through [`recording_client`] and audit what they did.
//!
//! Scope: everything is in one `ClusterRole` (the controller watches its kinds in every
//! namespace and manages their children where they are) except the leader-election Lease,
//! which lives in the controller's own namespace ([`CONTROLLER_NAMESPACE`]): that is a
//! namespaced `Role` there, so the controller cannot touch other components' Leases.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Method, Request};
use tower::{Layer, Service};

/// The namespace the controller runs in (Helm chart and `config/install.yaml`).
pub const CONTROLLER_NAMESPACE: &str = "r4-system";
/// The controller's ServiceAccount, ClusterRole, Role and bindings.
pub const CONTROLLER_NAME: &str = "r4-controller";
/// The Role for the leader-election Lease in [`CONTROLLER_NAMESPACE`].
pub const LEADER_ELECTION_ROLE: &str = "r4-controller-leader-election";

/// One kind of request to the Kubernetes API, as RBAC sees it: a verb on a resource of a
/// group (`""` is core). A subresource is part of the resource: `agentworkflows/status`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Call {
    pub verb: &'static str,
    pub group: &'static str,
    pub resource: &'static str,
}

const fn call(verb: &'static str, group: &'static str, resource: &'static str) -> Call {
    Call {
        verb,
        group,
        resource,
    }
}

const R4: &str = "r4.dev";
const APPS: &str = "apps";
const CORE: &str = "";
const EVENTS: &str = "events.k8s.io";
const COORDINATION: &str = "coordination.k8s.io";

/// Every call the controller makes, grouped by who makes it. Add to it in the change that
/// adds the call.
pub const CALLS: &[Call] = &[
    // The kinds it reconciles: watched (reflector: list + watch), finalizers and a handled
    // `rollbackTo` patched, status written with a patch of the status subresource; the
    // policies a workflow names are read from the watch's store (one it lacks is read by
    // name); the workflow a drill targets is read by name.
    call("get", R4, "agentworkflows"),
    call("list", R4, "agentworkflows"),
    call("watch", R4, "agentworkflows"),
    call("patch", R4, "agentworkflows"),
    call("patch", R4, "agentworkflows/status"),
    call("get", R4, "circuitpolicies"),
    call("list", R4, "circuitpolicies"),
    call("watch", R4, "circuitpolicies"),
    call("patch", R4, "circuitpolicies/status"),
    call("list", R4, "chaosdrills"),
    call("watch", R4, "chaosdrills"),
    call("patch", R4, "chaosdrills/status"),
    // A drill's PodKill: the agent's Running pods listed by label, `count` of them deleted.
    call("list", CORE, "pods"),
    call("delete", CORE, "pods"),
    // A workflow's children: applied with server-side apply (patch), watched as owned
    // objects (list + watch); Deployments and Services no longer rendered are deleted (the
    // ServiceAccount and ConfigMap are always rendered; all go with the workflow through
    // their owner references).
    call("list", APPS, "deployments"),
    call("watch", APPS, "deployments"),
    call("patch", APPS, "deployments"),
    call("delete", APPS, "deployments"),
    call("list", CORE, "services"),
    call("watch", CORE, "services"),
    call("patch", CORE, "services"),
    call("delete", CORE, "services"),
    call("list", CORE, "configmaps"),
    call("watch", CORE, "configmaps"),
    call("patch", CORE, "configmaps"),
    call("list", CORE, "serviceaccounts"),
    call("watch", CORE, "serviceaccounts"),
    call("patch", CORE, "serviceaccounts"),
    // Revisions: one ControllerRevision per spec change (watched by label into a store, its
    // phase patched), pruned past revisionHistoryLimit.
    call("list", APPS, "controllerrevisions"),
    call("watch", APPS, "controllerrevisions"),
    call("create", APPS, "controllerrevisions"),
    call("patch", APPS, "controllerrevisions"),
    call("delete", APPS, "controllerrevisions"),
    // `spec.queue.redis.urlSecretRef`: the Redis URL of a workflow (read, never listed).
    call("get", CORE, "secrets"),
    // kube-runtime's event `Recorder` (kube 5) writes events.k8s.io/v1 Events: create, then
    // patch to count a repeat.
    call("create", EVENTS, "events"),
    call("patch", EVENTS, "events"),
    // Leader election (super::leader): kube-lease-manager gets, creates and patches the
    // Lease (never `update`); the standby watches it (list + watch) to take over at once when
    // the leader releases it.
    call("get", COORDINATION, "leases"),
    call("list", COORDINATION, "leases"),
    call("watch", COORDINATION, "leases"),
    call("create", COORDINATION, "leases"),
    call("patch", COORDINATION, "leases"),
];

/// Whether `c` is granted by the namespaced leader-election Role (not the ClusterRole).
fn in_leader_election_role(group: &str, resource: &str) -> bool {
    group == COORDINATION && resource == "leases"
}

/// `config/rbac/role.yaml`: the ClusterRole `r4-controller` and its ClusterRoleBinding, and
/// the Role `r4-controller-leader-election` in `r4-system` and its RoleBinding, all bound to
/// the ServiceAccount `r4-controller` in `r4-system`. One rule per group and resource, verbs
/// sorted, no wildcards.
pub fn role_yaml() -> String {
    let mut cluster: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    let mut leader: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    for c in CALLS {
        let rules = if in_leader_election_role(c.group, c.resource) {
            &mut leader
        } else {
            &mut cluster
        };
        rules
            .entry((c.group, c.resource))
            .or_default()
            .insert(c.verb);
    }
    let mut y = String::new();
    y.push_str(
        "# Generated from src/controller/rbac.rs (CALLS) by `r4 rbac`; do not edit: `make rbac`.\n",
    );
    y.push_str("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n");
    metadata(&mut y, CONTROLLER_NAME, None);
    rules(&mut y, &cluster);
    y.push_str("---\napiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\n");
    metadata(&mut y, CONTROLLER_NAME, None);
    binding(&mut y, "ClusterRole", CONTROLLER_NAME);
    y.push_str("---\napiVersion: rbac.authorization.k8s.io/v1\nkind: Role\n");
    metadata(&mut y, LEADER_ELECTION_ROLE, Some(CONTROLLER_NAMESPACE));
    rules(&mut y, &leader);
    y.push_str("---\napiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\n");
    metadata(&mut y, LEADER_ELECTION_ROLE, Some(CONTROLLER_NAMESPACE));
    binding(&mut y, "Role", LEADER_ELECTION_ROLE);
    y
}

fn metadata(y: &mut String, name: &str, namespace: Option<&str>) {
    let _ = writeln!(y, "metadata:\n  name: {name}");
    if let Some(ns) = namespace {
        let _ = writeln!(y, "  namespace: {ns}");
    }
    y.push_str(
        "  labels:\n    app.kubernetes.io/name: r4\n    app.kubernetes.io/component: controller\n",
    );
}

fn rules(y: &mut String, rules: &BTreeMap<(&str, &str), BTreeSet<&str>>) {
    y.push_str("rules:\n");
    for ((group, resource), verbs) in rules {
        let verbs: Vec<&str> = verbs.iter().copied().collect();
        let _ = writeln!(
            y,
            "  - apiGroups: [\"{group}\"]\n    resources: [\"{resource}\"]\n    verbs: [{}]",
            verbs
                .iter()
                .map(|v| format!("\"{v}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
}

fn binding(y: &mut String, role_kind: &str, role: &str) {
    let _ = writeln!(
        y,
        "roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: {role_kind}\n  name: {role}\n\
         subjects:\n  - kind: ServiceAccount\n    name: {CONTROLLER_NAME}\n    namespace: {CONTROLLER_NAMESPACE}"
    );
}

/// A recorded call: (verb, group, resource), resource with its subresource.
pub type RecordedCall = (String, String, String);

/// The API resource request behind `method` on `path_and_query`, as RBAC sees it; `None`
/// for a non-resource URL (`/version`, `/openapi/v2`, discovery of `/apis`).
///
/// Follows the API server's request-info rules: `/api/v1/…` is the core group,
/// `/apis/GROUP/VERSION/…` any other; `namespaces/NS/` scopes what follows (but
/// `namespaces/NS/status|finalize` are the Namespace's own subresources); a legacy
/// `/watch/` prefix or `?watch=true` turns a get or list into `watch`.
pub fn parse_call(method: &Method, path_and_query: &str) -> Option<RecordedCall> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, q),
        None => (path_and_query, ""),
    };
    let parts: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let (group, mut rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let mut watch = query.split('&').any(|kv| {
        matches!(
            kv.split_once('=').unwrap_or((kv, "")),
            ("watch", "true" | "1")
        )
    });
    if let ["watch", tail @ ..] = rest {
        watch = true;
        rest = tail;
    }
    if let ["namespaces", _ns, tail @ ..] = rest
        && !tail.is_empty()
        && !matches!(tail[0], "status" | "finalize")
    {
        rest = tail;
    }
    let (resource, named) = match rest {
        [] => return None,
        [resource] => ((*resource).to_owned(), false),
        [resource, _name] => ((*resource).to_owned(), true),
        [resource, _name, sub @ ..] => (format!("{resource}/{}", sub.join("/")), true),
    };
    let verb = match method.as_str() {
        "GET" | "HEAD" if watch => "watch",
        "GET" | "HEAD" if named => "get",
        "GET" | "HEAD" => "list",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if named => "delete",
        "DELETE" => "deletecollection",
        _ => return None,
    };
    Some((verb.to_owned(), group.to_owned(), resource))
}

/// The calls recorded by a [`RecordingLayer`], shared with the client that makes them: each
/// (verb, group, resource) with how many times it was made (the RBAC audit reads which,
/// `r4 bench controller` how many).
#[derive(Clone, Debug, Default)]
pub struct Recorder(Arc<Mutex<BTreeMap<RecordedCall, u64>>>);

impl Recorder {
    /// Every distinct call recorded so far.
    pub fn calls(&self) -> BTreeSet<RecordedCall> {
        self.counts().into_keys().collect()
    }

    /// Every call recorded so far with how many times it was made.
    pub fn counts(&self) -> BTreeMap<RecordedCall, u64> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn record(&self, c: RecordedCall) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(c)
            .or_default() += 1;
    }
}

/// A tower layer for a kube `Client`'s service that records every API resource request as a
/// call ([`parse_call`]) before passing it on unchanged.
#[derive(Clone, Debug)]
pub struct RecordingLayer {
    recorder: Recorder,
}

impl RecordingLayer {
    /// A layer and the recorder that reads what it records.
    pub fn new() -> (Self, Recorder) {
        let recorder = Recorder::default();
        (
            Self {
                recorder: recorder.clone(),
            },
            recorder,
        )
    }
}

impl<S> Layer<S> for RecordingLayer {
    type Service = Recording<S>;

    fn layer(&self, inner: S) -> Recording<S> {
        Recording {
            inner,
            recorder: self.recorder.clone(),
        }
    }
}

/// The service of [`RecordingLayer`].
#[derive(Clone, Debug)]
pub struct Recording<S> {
    inner: S,
    recorder: Recorder,
}

impl<S, B> Service<Request<B>> for Recording<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let pq = req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path(), |pq| pq.as_str());
        if let Some(c) = parse_call(req.method(), pq) {
            self.recorder.record(c);
        }
        self.inner.call(req)
    }
}

/// A kube `Client` for `config` whose every request is recorded.
pub fn recording_client(config: kube::Config) -> Result<(kube::Client, Recorder), kube::Error> {
    let (layer, recorder) = RecordingLayer::new();
    let client = kube::client::ClientBuilder::try_from(config)?
        .with_layer(&layer)
        .build();
    Ok((client, recorder))
}

/// What a run's recorded calls say about [`CALLS`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Made but not listed: the role lacks them (refused in a real cluster).
    pub missing: Vec<RecordedCall>,
    /// Listed but never made: granted for nothing.
    pub unused: Vec<Call>,
}

impl Audit {
    /// Neither missing nor unused calls.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unused.is_empty()
    }
}

/// Compare the calls a run made with `listed` ([`CALLS`], or the part of it the run was
/// meant to exercise).
pub fn audit(recorded: &BTreeSet<RecordedCall>, listed: &[Call]) -> Audit {
    let as_tuple = |c: &Call| (c.verb.to_owned(), c.group.to_owned(), c.resource.to_owned());
    let listed_set: BTreeSet<RecordedCall> = listed.iter().map(as_tuple).collect();
    let mut unused: Vec<Call> = listed
        .iter()
        .filter(|c| !recorded.contains(&as_tuple(c)))
        .cloned()
        .collect();
    unused.sort();
    unused.dedup();
    Audit {
        missing: recorded.difference(&listed_set).cloned().collect(),
        unused,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(method: Method, path: &str) -> Option<(String, String, String)> {
        parse_call(&method, path)
    }

    fn c(verb: &str, group: &str, resource: &str) -> Option<(String, String, String)> {
        Some((verb.into(), group.into(), resource.into()))
    }

    #[test]
    fn core_group_paths() {
        assert_eq!(
            p(Method::GET, "/api/v1/namespaces/ns/configmaps/a"),
            c("get", "", "configmaps")
        );
        assert_eq!(
            p(Method::GET, "/api/v1/namespaces/ns/configmaps"),
            c("list", "", "configmaps")
        );
        assert_eq!(
            p(Method::GET, "/api/v1/configmaps?labelSelector=a%3Db"),
            c("list", "", "configmaps")
        );
        assert_eq!(
            p(Method::GET, "/api/v1/pods?watch=true&resourceVersion=5"),
            c("watch", "", "pods")
        );
        assert_eq!(
            p(
                Method::GET,
                "/api/v1/namespaces/ns/pods?resourceVersion=5&watch=1"
            ),
            c("watch", "", "pods")
        );
        assert_eq!(
            p(Method::GET, "/api/v1/pods?watch=false"),
            c("list", "", "pods")
        );
        assert_eq!(
            p(Method::DELETE, "/api/v1/namespaces/ns/pods/web-1"),
            c("delete", "", "pods")
        );
        assert_eq!(
            p(Method::DELETE, "/api/v1/namespaces/ns/pods"),
            c("deletecollection", "", "pods")
        );
        assert_eq!(
            p(Method::POST, "/api/v1/namespaces/ns/pods/web-1/eviction"),
            c("create", "", "pods/eviction")
        );
        assert_eq!(
            p(
                Method::GET,
                "/api/v1/namespaces/ns/pods/web-1/log?container=x"
            ),
            c("get", "", "pods/log")
        );
        assert_eq!(
            p(Method::GET, "/api/v1/namespaces/ns/secrets/redis"),
            c("get", "", "secrets")
        );
    }

    #[test]
    fn namespaces_themselves() {
        assert_eq!(
            p(Method::GET, "/api/v1/namespaces"),
            c("list", "", "namespaces")
        );
        assert_eq!(
            p(Method::GET, "/api/v1/namespaces/ns"),
            c("get", "", "namespaces")
        );
        assert_eq!(
            p(Method::POST, "/api/v1/namespaces"),
            c("create", "", "namespaces")
        );
        assert_eq!(
            p(Method::PUT, "/api/v1/namespaces/ns/finalize"),
            c("update", "", "namespaces/finalize")
        );
        assert_eq!(
            p(Method::PATCH, "/api/v1/namespaces/ns/status"),
            c("patch", "", "namespaces/status")
        );
    }

    #[test]
    fn named_groups_cluster_and_namespaced() {
        assert_eq!(
            p(
                Method::PATCH,
                "/apis/apps/v1/namespaces/ns/deployments/web?fieldManager=r4&force=true"
            ),
            c("patch", "apps", "deployments")
        );
        assert_eq!(
            p(Method::GET, "/apis/apps/v1/deployments"),
            c("list", "apps", "deployments")
        );
        assert_eq!(
            p(
                Method::PATCH,
                "/apis/r4.dev/v1alpha1/namespaces/ns/agentworkflows/wf/status"
            ),
            c("patch", "r4.dev", "agentworkflows/status")
        );
        assert_eq!(
            p(
                Method::PUT,
                "/apis/r4.dev/v1alpha1/namespaces/ns/chaosdrills/d"
            ),
            c("update", "r4.dev", "chaosdrills")
        );
        assert_eq!(
            p(
                Method::GET,
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/x.r4.dev"
            ),
            c("get", "apiextensions.k8s.io", "customresourcedefinitions")
        );
        assert_eq!(
            p(
                Method::GET,
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            ),
            c("list", "apiextensions.k8s.io", "customresourcedefinitions")
        );
        assert_eq!(
            p(Method::POST, "/apis/events.k8s.io/v1/namespaces/ns/events"),
            c("create", "events.k8s.io", "events")
        );
        assert_eq!(
            p(
                Method::GET,
                "/apis/coordination.k8s.io/v1/namespaces/r4-system/leases?fieldSelector=metadata.name%3Dr4-controller&watch=true&timeoutSeconds=290"
            ),
            c("watch", "coordination.k8s.io", "leases")
        );
        // A resource literally named like the namespaced prefix is not confused with it.
        assert_eq!(
            p(Method::GET, "/apis/x.io/v1/namespaces/ns/namespaces"),
            c("list", "x.io", "namespaces")
        );
    }

    #[test]
    fn legacy_watch_prefix() {
        assert_eq!(
            p(Method::GET, "/api/v1/watch/namespaces/ns/pods"),
            c("watch", "", "pods")
        );
        assert_eq!(
            p(Method::GET, "/apis/apps/v1/watch/deployments"),
            c("watch", "apps", "deployments")
        );
        assert_eq!(
            p(Method::GET, "/api/v1/watch/namespaces/ns/pods/one"),
            c("watch", "", "pods")
        );
    }

    #[test]
    fn non_resource_urls_are_not_calls() {
        for path in [
            "/version",
            "/api",
            "/api/v1",
            "/apis",
            "/apis/apps",
            "/apis/apps/v1",
            "/openapi/v2",
            "/healthz",
            "",
            "/",
        ] {
            assert_eq!(p(Method::GET, path), None, "{path}");
        }
        assert_eq!(p(Method::OPTIONS, "/api/v1/pods"), None);
    }

    #[test]
    fn role_file_is_fresh() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rbac/role.yaml");
        let on_disk =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            on_disk == role_yaml(),
            "config/rbac/role.yaml is stale: run `make rbac`"
        );
    }

    #[test]
    fn calls_are_unique_lowercase_and_without_wildcards() {
        let set: BTreeSet<&Call> = CALLS.iter().collect();
        assert_eq!(set.len(), CALLS.len(), "a call is listed twice");
        const VERBS: &[&str] = &[
            "get",
            "list",
            "watch",
            "create",
            "update",
            "patch",
            "delete",
            "deletecollection",
        ];
        for c in CALLS {
            assert!(VERBS.contains(&c.verb), "{c:?}");
            assert!(!c.group.contains('*') && !c.resource.contains('*'), "{c:?}");
            assert_eq!(c.resource, c.resource.to_lowercase(), "{c:?}");
        }
    }

    #[test]
    fn role_yaml_is_valid_kubernetes_rbac_with_every_call() {
        let yaml = role_yaml();
        let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde::Deserialize::deserialize(d).expect("a YAML document"))
            .collect();
        let kinds: Vec<&str> = docs
            .iter()
            .map(|d| d["kind"].as_str().expect("kind"))
            .collect();
        assert_eq!(
            kinds,
            ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
        );
        let role: k8s_openapi::api::rbac::v1::ClusterRole =
            serde_json::from_value(docs[0].clone()).expect("a ClusterRole");
        let lease_role: k8s_openapi::api::rbac::v1::Role =
            serde_json::from_value(docs[2].clone()).expect("a Role");
        assert_eq!(
            lease_role.metadata.namespace.as_deref(),
            Some(CONTROLLER_NAMESPACE)
        );
        let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding =
            serde_json::from_value(docs[1].clone()).expect("a ClusterRoleBinding");
        let subject = &binding.subjects.expect("subjects")[0];
        assert_eq!(
            (
                subject.kind.as_str(),
                subject.name.as_str(),
                subject.namespace.as_deref()
            ),
            (
                "ServiceAccount",
                CONTROLLER_NAME,
                Some(CONTROLLER_NAMESPACE)
            )
        );

        // Every listed call is granted by exactly one of the two roles, and nothing more.
        let mut granted = BTreeSet::new();
        for (rules, ns_role) in [(role.rules, false), (lease_role.rules, true)] {
            for r in rules.expect("rules") {
                let groups = r.api_groups.expect("apiGroups");
                let resources = r.resources.expect("resources");
                assert_eq!(
                    (groups.len(), resources.len()),
                    (1, 1),
                    "one rule per resource"
                );
                let mut sorted = r.verbs.clone();
                sorted.sort();
                assert_eq!(r.verbs, sorted, "verbs sorted");
                assert_eq!(
                    in_leader_election_role(&groups[0], &resources[0]),
                    ns_role,
                    "{resources:?} in the wrong role"
                );
                for v in r.verbs {
                    assert!(!v.contains('*'));
                    assert!(granted.insert((v, groups[0].clone(), resources[0].clone())));
                }
            }
        }
        let listed: BTreeSet<RecordedCall> = CALLS
            .iter()
            .map(|c| (c.verb.into(), c.group.into(), c.resource.into()))
            .collect();
        assert_eq!(granted, listed);
    }

    #[test]
    fn audit_names_missing_and_unused_calls() {
        let listed = [call("get", CORE, "secrets"), call("list", CORE, "pods")];
        let recorded: BTreeSet<RecordedCall> = [
            ("get".into(), "".into(), "secrets".into()),
            ("delete".into(), "".into(), "pods".into()),
        ]
        .into();
        let a = audit(&recorded, &listed);
        assert_eq!(
            a.missing,
            vec![("delete".to_owned(), "".to_owned(), "pods".to_owned())]
        );
        assert_eq!(a.unused, vec![call("list", CORE, "pods")]);
        assert!(!a.is_clean());
        assert!(
            audit(
                &recorded,
                &[call("get", CORE, "secrets"), call("delete", CORE, "pods")]
            )
            .is_clean()
        );
    }

    #[tokio::test]
    async fn layer_records_and_passes_requests_through() {
        let (layer, recorder) = RecordingLayer::new();
        let (mock, mut handle) = tower_test::mock::pair::<Request<()>, &'static str>();
        let mut svc = layer.layer(mock);
        let answer = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.uri().path(), "/api/v1/namespaces/ns/pods/p");
            send.send_response("ok");
        });
        let req = Request::delete("/api/v1/namespaces/ns/pods/p")
            .body(())
            .expect("request");
        let resp = tower::ServiceExt::ready(&mut svc).await.expect("ready");
        assert_eq!(resp.call(req).await.expect("response"), "ok");
        answer.await.expect("mock");
        assert_eq!(
            recorder.calls(),
            [("delete".to_owned(), "".to_owned(), "pods".to_owned())].into()
        );
    }
}
