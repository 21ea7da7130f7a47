//! The resource registry: which kinds the API serves (the built-ins below and whatever a
//! CustomResourceDefinition registers), their names, scope, subresources and schemas, and the
//! merge keys of their associative lists.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

/// One served resource (all versions of it share one storage; there is no conversion).
#[derive(Clone, Debug)]
pub struct ResourceInfo {
    pub group: String,
    /// Served versions, preferred first.
    pub versions: Vec<String>,
    pub plural: String,
    pub singular: String,
    pub kind: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    pub categories: Vec<String>,
    /// Has a `/status` subresource (writes to the object ignore `.status`, and back).
    pub status: bool,
    /// Keeps `metadata.generation`.
    pub generation: bool,
    /// Set for custom resources: the CRD's schemas and printer columns per version.
    pub crd: Option<CrdInfo>,
    /// Another resource whose storage this one shares (`events.events.k8s.io` is `events`,
    /// converted on the way in and out).
    pub storage: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct CrdInfo {
    pub schemas: BTreeMap<String, Value>,
    pub columns: BTreeMap<String, Vec<Value>>,
}

impl ResourceInfo {
    /// `configmaps`, `deployments.apps`: how the API names the resource in messages.
    pub fn group_resource(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The store's name for the objects (shared by resources that are views of one another).
    pub fn storage_resource(&self) -> String {
        self.storage
            .clone()
            .unwrap_or_else(|| self.group_resource())
    }

    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn schema(&self, version: &str) -> Option<&Value> {
        self.crd.as_ref()?.schemas.get(version)
    }
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    short: &[&str],
    categories: &[&str],
    status: bool,
    generation: bool,
) -> ResourceInfo {
    ResourceInfo {
        group: group.into(),
        versions: vec!["v1".into()],
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        short_names: short.iter().map(|s| s.to_string()).collect(),
        categories: categories.iter().map(|s| s.to_string()).collect(),
        status,
        generation,
        crd: None,
        storage: None,
    }
}

/// The kinds every dev cluster serves before any CRD is applied.
pub fn builtins() -> Vec<ResourceInfo> {
    vec![
        builtin(
            "",
            "namespaces",
            "Namespace",
            false,
            &["ns"],
            &[],
            true,
            false,
        ),
        builtin("", "nodes", "Node", false, &["no"], &[], true, false),
        builtin(
            "",
            "configmaps",
            "ConfigMap",
            true,
            &["cm"],
            &[],
            false,
            false,
        ),
        builtin("", "secrets", "Secret", true, &[], &[], false, false),
        builtin(
            "",
            "services",
            "Service",
            true,
            &["svc"],
            &["all"],
            true,
            false,
        ),
        builtin(
            "",
            "serviceaccounts",
            "ServiceAccount",
            true,
            &["sa"],
            &[],
            false,
            false,
        ),
        builtin("", "pods", "Pod", true, &["po"], &["all"], true, false),
        builtin("", "events", "Event", true, &["ev"], &[], false, false),
        builtin(
            "apps",
            "deployments",
            "Deployment",
            true,
            &["deploy"],
            &["all"],
            true,
            true,
        ),
        builtin(
            "apps",
            "replicasets",
            "ReplicaSet",
            true,
            &["rs"],
            &["all"],
            true,
            true,
        ),
        builtin(
            "apps",
            "controllerrevisions",
            "ControllerRevision",
            true,
            &[],
            &[],
            false,
            false,
        ),
        builtin(
            "coordination.k8s.io",
            "leases",
            "Lease",
            true,
            &[],
            &[],
            false,
            false,
        ),
        ResourceInfo {
            storage: Some("events".into()),
            ..builtin(
                "events.k8s.io",
                "events",
                "Event",
                true,
                &["ev"],
                &[],
                false,
                false,
            )
        },
        // Stored and served, not acted on: r4 dev has no authorization, no network and no
        // eviction API, but an install (the chart's `config/install.yaml`) creates them, and
        // `kubectl get` must give them back.
        builtin(
            "rbac.authorization.k8s.io",
            "clusterroles",
            "ClusterRole",
            false,
            &[],
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            &[],
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "roles",
            "Role",
            true,
            &[],
            &[],
            false,
            false,
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "rolebindings",
            "RoleBinding",
            true,
            &[],
            &[],
            false,
            false,
        ),
        builtin(
            "networking.k8s.io",
            "networkpolicies",
            "NetworkPolicy",
            true,
            &["netpol"],
            &[],
            false,
            true,
        ),
        builtin(
            "policy",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            true,
            &["pdb"],
            &[],
            true,
            true,
        ),
        builtin(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            &["crd", "crds"],
            &["api-extensions"],
            true,
            true,
        ),
    ]
}

/// The served resources; CRDs add and remove entries.
#[derive(Clone, Debug)]
pub struct Registry {
    resources: Vec<Arc<ResourceInfo>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            resources: builtins().into_iter().map(Arc::new).collect(),
        }
    }
}

impl Registry {
    pub fn all(&self) -> &[Arc<ResourceInfo>] {
        &self.resources
    }

    /// The resource served at `group/version/plural`.
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceInfo>> {
        self.resources
            .iter()
            .find(|r| {
                r.group == group && r.plural == plural && r.versions.iter().any(|v| v == version)
            })
            .cloned()
    }

    /// The resource that owns a storage name (for garbage collection across kinds).
    pub fn find_group_resource(&self, group_resource: &str) -> Option<Arc<ResourceInfo>> {
        self.resources
            .iter()
            .find(|r| r.storage.is_none() && r.group_resource() == group_resource)
            .cloned()
    }

    /// The resource whose objects have this apiVersion and kind.
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<Arc<ResourceInfo>> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        self.resources
            .iter()
            .find(|r| r.group == group && r.kind == kind && r.versions.iter().any(|v| v == version))
            .cloned()
    }

    /// Groups with their versions, in registration order (core first).
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = Vec::new();
        for r in &self.resources {
            let entry = match out.iter_mut().find(|(g, _)| *g == r.group) {
                Some(e) => e,
                None => {
                    out.push((r.group.clone(), Vec::new()));
                    let last = out.len() - 1;
                    &mut out[last]
                }
            };
            for v in &r.versions {
                if !entry.1.contains(v) {
                    entry.1.push(v.clone());
                }
            }
        }
        out
    }

    pub fn in_group_version<'a>(
        &'a self,
        group: &'a str,
        version: &'a str,
    ) -> impl Iterator<Item = &'a Arc<ResourceInfo>> + 'a {
        self.resources
            .iter()
            .filter(move |r| r.group == group && r.versions.iter().any(|v| v == version))
    }

    /// Register (or re-register, after an update) the resource a CRD defines.
    pub fn register_crd(&mut self, crd: &Value) -> Result<(), String> {
        let info = crd_resource(crd)?;
        self.unregister(&info.group_resource());
        self.resources.push(Arc::new(info));
        Ok(())
    }

    pub fn unregister(&mut self, group_resource: &str) {
        self.resources
            .retain(|r| r.crd.is_none() || r.group_resource() != group_resource);
    }
}

fn strings(v: Option<&Value>) -> Vec<String> {
    v.and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What a CRD object registers; an error names the field that makes it unusable.
pub fn crd_resource(crd: &Value) -> Result<ResourceInfo, String> {
    let spec = crd.get("spec").ok_or("spec: Required value")?;
    let s = |p: &str| spec.pointer(p).and_then(Value::as_str).map(str::to_string);
    let group = s("/group").ok_or("spec.group: Required value")?;
    let plural = s("/names/plural").ok_or("spec.names.plural: Required value")?;
    let kind = s("/names/kind").ok_or("spec.names.kind: Required value")?;
    let singular = s("/names/singular").unwrap_or_else(|| kind.to_lowercase());
    let mut crd_info = CrdInfo::default();
    let mut versions = Vec::new();
    let mut status = false;
    for v in spec
        .get("versions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = v.get("name").and_then(Value::as_str) else {
            return Err("spec.versions[].name: Required value".into());
        };
        if v.get("served").and_then(Value::as_bool) == Some(false) {
            continue;
        }
        if v.get("storage").and_then(Value::as_bool) == Some(true) {
            versions.insert(0, name.to_string());
        } else {
            versions.push(name.to_string());
        }
        if let Some(schema) = v.pointer("/schema/openAPIV3Schema") {
            crd_info.schemas.insert(name.to_string(), schema.clone());
        }
        let cols = v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        crd_info.columns.insert(name.to_string(), cols);
        status |= v.pointer("/subresources/status").is_some();
    }
    if versions.is_empty() {
        return Err("spec.versions: Required value: must have exactly one version marked as storage version".into());
    }
    Ok(ResourceInfo {
        group,
        versions,
        plural,
        singular,
        kind,
        namespaced: spec.get("scope").and_then(Value::as_str) != Some("Cluster"),
        short_names: strings(spec.pointer("/names/shortNames")),
        categories: strings(spec.pointer("/names/categories")),
        status,
        generation: true,
        crd: Some(crd_info),
        storage: None,
    })
}

/// The status a CRD gets once its names are served (`Established`, `NamesAccepted`).
pub fn crd_status(crd: &Value, now: &str) -> Value {
    let cond = |t: &str, reason: &str, msg: &str| json!({"type": t, "status": "True", "reason": reason, "message": msg, "lastTransitionTime": now});
    json!({
        "acceptedNames": crd.pointer("/spec/names").cloned().unwrap_or(json!({})),
        "conditions": [
            cond("NamesAccepted", "NoConflicts", "no conflicts found"),
            cond("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "storedVersions": crd.pointer("/spec/versions").and_then(Value::as_array).map(|vs| {
            vs.iter().filter(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
                .filter_map(|v| v.get("name").cloned()).collect::<Vec<_>>()
        }).unwrap_or_default(),
    })
}

/// Merge keys of the associative list at `path` (field names from the object root, list items
/// not named): for built-ins the keys Kubernetes' types declare; for custom resources the
/// schema's `x-kubernetes-list-type: map` and `x-kubernetes-list-map-keys`. None: atomic list.
pub fn list_keys(res: &ResourceInfo, version: &str, path: &[String]) -> Option<Vec<String>> {
    let last = path.last()?.as_str();
    if path.len() == 2 && path[0] == "metadata" {
        return match last {
            "ownerReferences" => Some(vec!["uid".into()]),
            "managedFields" => None,
            _ => None,
        };
    }
    if let Some(schema) = res.schema(version) {
        let mut node = schema;
        for seg in path {
            if node.get("type").and_then(Value::as_str) == Some("array") {
                node = node.get("items")?;
            }
            node = node
                .get("properties")
                .and_then(|p| p.get(seg))
                .or_else(|| node.get("additionalProperties"))?;
        }
        if node.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
            return Some(strings(node.get("x-kubernetes-list-map-keys")));
        }
        return None;
    }
    let one = |k: &str| Some(vec![k.to_string()]);
    match last {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "containerStatuses"
        | "initContainerStatuses" => one("name"),
        "volumeMounts" => one("mountPath"),
        "volumeDevices" => one("devicePath"),
        "conditions" => one("type"),
        "hostAliases" => one("ip"),
        "ports" if path.iter().any(|p| p.ends_with("ontainers")) => {
            Some(vec!["containerPort".into(), "protocol".into()])
        }
        // A NetworkPolicy's `ports` are atomic (their items need not name a port).
        "ports" if res.plural == "services" => Some(vec!["port".into(), "protocol".into()]),
        _ => None,
    }
}

/// The `events.k8s.io/v1` names of core/v1 Event fields (one stored object, two views).
const EVENT_FIELDS: [(&str, &str); 7] = [
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

/// Convert an Event between its stored (core/v1) form and the view `res` serves.
pub fn convert_event(res: &ResourceInfo, obj: Value, to_storage: bool) -> Value {
    if res.storage.as_deref() != Some("events") {
        return obj;
    }
    let Value::Object(mut m) = obj else {
        return obj;
    };
    for (core, new) in EVENT_FIELDS {
        let (from, to) = if to_storage { (new, core) } else { (core, new) };
        if let Some(v) = m.remove(from) {
            m.insert(to.to_string(), v);
        }
    }
    if to_storage {
        m.insert("apiVersion".into(), Value::String("v1".into()));
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(p: &[&str]) -> Vec<String> {
        p.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn builtin_list_keys() {
        let reg = Registry::default();
        let deploy = reg.find("apps", "v1", "deployments").expect("deployments");
        let keys = |p: &[&str]| list_keys(&deploy, "v1", &path(p));
        assert_eq!(
            keys(&["spec", "template", "spec", "containers"]),
            Some(vec!["name".into()])
        );
        assert_eq!(
            keys(&["spec", "template", "spec", "containers", "ports"]),
            Some(vec!["containerPort".into(), "protocol".into()])
        );
        assert_eq!(
            keys(&["spec", "template", "spec", "containers", "volumeMounts"]),
            Some(vec!["mountPath".into()])
        );
        assert_eq!(
            keys(&["metadata", "ownerReferences"]),
            Some(vec!["uid".into()])
        );
        assert_eq!(
            keys(&["spec", "template", "spec", "containers", "args"]),
            None
        );
    }

    #[test]
    fn the_kinds_of_an_install_are_served_with_their_scope() {
        let reg = Registry::default();
        let scope = |g: &str, p: &str| reg.find(g, "v1", p).map(|r| (r.namespaced, r.status));
        let rbac = "rbac.authorization.k8s.io";
        assert_eq!(scope(rbac, "clusterroles"), Some((false, false)));
        assert_eq!(scope(rbac, "clusterrolebindings"), Some((false, false)));
        assert_eq!(scope(rbac, "roles"), Some((true, false)));
        assert_eq!(scope(rbac, "rolebindings"), Some((true, false)));
        assert_eq!(scope("policy", "poddisruptionbudgets"), Some((true, true)));
        let netpol = reg
            .find("networking.k8s.io", "v1", "networkpolicies")
            .expect("networkpolicies");
        // A NetworkPolicy's ports need not name a port: an atomic list, unlike a Service's.
        let ports = path(&["spec", "ingress", "ports"]);
        assert_eq!(list_keys(&netpol, "v1", &ports), None);
        let svc = reg.find("", "v1", "services").expect("services");
        assert_eq!(
            list_keys(&svc, "v1", &path(&["spec", "ports"])),
            Some(vec!["port".into(), "protocol".into()])
        );
        for (group, kind) in [(rbac, "ClusterRole"), ("policy", "PodDisruptionBudget")] {
            let doc = super::super::openapi::group_version(&reg, group, "v1").expect("openapi");
            let schemas = doc["components"]["schemas"].as_object().expect("schemas");
            assert!(
                schemas
                    .values()
                    .any(|s| s["x-kubernetes-group-version-kind"][0]["kind"] == kind),
                "no schema of {kind}"
            );
        }
    }

    #[test]
    fn crd_registers_and_declares_map_lists() {
        let crd = json!({"metadata": {"name": "things.example.com"}, "spec": {
            "group": "example.com", "scope": "Cluster",
            "names": {"kind": "Thing", "plural": "things", "shortNames": ["th"], "categories": ["all"]},
            "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object", "properties": {
                    "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["port", "protocol"],
                        "items": {"type": "object", "properties": {"port": {"type": "integer"}, "protocol": {"type": "string"}}}},
                    "tags": {"type": "array", "items": {"type": "string"}}}}}}}}]}});
        let mut reg = Registry::default();
        reg.register_crd(&crd).expect("register");
        let res = reg.find("example.com", "v1", "things").expect("served");
        assert!(!res.namespaced && res.status && res.generation);
        assert_eq!(res.short_names, ["th"]);
        assert_eq!(
            list_keys(&res, "v1", &path(&["spec", "ports"])),
            Some(vec!["port".into(), "protocol".into()])
        );
        assert_eq!(list_keys(&res, "v1", &path(&["spec", "tags"])), None);
        let doc = super::super::openapi::group_version(&reg, "example.com", "v1").expect("openapi");
        let patch = &doc["paths"]["/apis/example.com/v1/things/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Thing");
        assert!(
            patch["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "fieldValidation"))
        );
        assert!(
            doc["components"]["schemas"]["com.example.v1.Thing"]["x-kubernetes-group-version-kind"]
                .is_array()
        );
        reg.unregister("things.example.com");
        assert!(reg.find("example.com", "v1", "things").is_none());
    }
}
