//! OpenAPI v3 documents, what kubectl reads to decide whether the server validates fields
//! (`fieldValidation` on each PATCH operation) and what `kubectl explain` renders (the CRDs'
//! `openAPIV3Schema`, and the built-in kinds' schemas from k8s-openapi's types).

use serde_json::{Map, Value, json};

use super::resources::{Registry, ResourceInfo};

/// `apis/r4.dev/v1alpha1`, `api/v1`.
pub fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// `/openapi/v3`: one entry per group/version; the hash changes with the served resources.
pub fn root(registry: &Registry, hash: u64) -> Value {
    let mut paths = Map::new();
    for (group, versions) in registry.groups() {
        for v in versions {
            let p = gv_path(&group, &v);
            paths.insert(
                p.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={hash:016X}")}),
            );
        }
    }
    json!({"paths": paths})
}

/// The schema name of a kind: `dev.r4.v1alpha1.AgentWorkflow` (reversed group, as Kubernetes does).
fn schema_name(res: &ResourceInfo, version: &str) -> String {
    let group = if res.group.is_empty() {
        "io.k8s.api.core".to_string()
    } else {
        res.group.split('.').rev().collect::<Vec<_>>().join(".")
    };
    format!("{group}.{version}.{}", res.kind)
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

fn object_meta() -> Value {
    let s = |d: &str| json!({"type": "string", "description": d});
    json!({
        "type": "object",
        "description": "ObjectMeta is metadata that all persisted resources must have, which includes all objects users must create.",
        "properties": {
            "name": s("Name must be unique within a namespace."),
            "namespace": s("Namespace defines the space within which each name must be unique."),
            "generateName": s("An optional prefix, used by the server, to generate a unique name."),
            "uid": s("UID is the unique in time and space value for this object."),
            "resourceVersion": s("An opaque value that represents the internal version of this object."),
            "creationTimestamp": {"type": "string", "format": "date-time", "description": "When this object was created."},
            "deletionTimestamp": {"type": "string", "format": "date-time", "description": "When this object will be deleted (set when deletion is requested)."},
            "generation": {"type": "integer", "format": "int64", "description": "A sequence number representing a specific generation of the desired state."},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Map of string keys and values that can be used to organize and categorize objects."},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}, "description": "Unstructured key value map stored with a resource."},
            "finalizers": {"type": "array", "items": {"type": "string"}, "description": "Must be empty before the object is deleted from the registry."},
            "ownerReferences": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}, "description": "List of objects depended by this object."},
        }
    })
}

fn param(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn op(res: &ResourceInfo, version: &str, action: &str, body_types: &[&str]) -> Value {
    let mut o = json!({
        "operationId": format!("{action}{}", res.kind),
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": res.group, "version": version, "kind": res.kind},
        "responses": {"200": {"description": "OK"}},
    });
    if matches!(action, "post" | "put" | "patch") {
        o["parameters"] = json!([
            param("dryRun"),
            param("fieldManager"),
            param("fieldValidation")
        ]);
        if action == "patch"
            && let Some(p) = o["parameters"].as_array_mut()
        {
            p.push(json!({"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}));
        }
        let content: Map<String, Value> = body_types
            .iter()
            .map(|t| (t.to_string(), json!({"schema": {"type": "object"}})))
            .collect();
        o["requestBody"] = json!({"content": content, "required": true});
    }
    o
}

/// `/openapi/v3/apis/<group>/<version>`: paths of every resource in it, and schemas of its
/// custom resources with their `x-kubernetes-group-version-kind`.
pub fn group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let mut paths = Map::new();
    let mut schemas = Map::new();
    let mut any = false;
    for res in registry.in_group_version(group, version) {
        any = true;
        let base = format!("/{}", gv_path(group, version));
        let (collection, item) = if res.namespaced {
            (
                format!("{base}/namespaces/{{namespace}}/{}", res.plural),
                format!("{base}/namespaces/{{namespace}}/{}/{{name}}", res.plural),
            )
        } else {
            (
                format!("{base}/{}", res.plural),
                format!("{base}/{}/{{name}}", res.plural),
            )
        };
        let patch_types: &[&str] = &[
            "application/json-patch+json",
            "application/merge-patch+json",
            "application/apply-patch+yaml",
        ];
        paths.insert(
            collection,
            json!({"get": op(res, version, "list", &[]), "post": op(res, version, "post", &["application/json"])}),
        );
        paths.insert(
            item,
            json!({
                "get": op(res, version, "get", &[]),
                "put": op(res, version, "put", &["application/json"]),
                "patch": op(res, version, "patch", patch_types),
                "delete": op(res, version, "delete", &[]),
            }),
        );
        if let Some(schema) = res.schema(version) {
            let mut s = schema.clone();
            if let Some(m) = s.as_object_mut() {
                let props = m.entry("properties").or_insert_with(|| json!({}));
                if let Some(p) = props.as_object_mut() {
                    p.insert("apiVersion".into(), json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object."}));
                    p.insert("kind".into(), json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents."}));
                    p.insert("metadata".into(), json!({"allOf": [{"$ref": format!("#/components/schemas/{OBJECT_META}")}], "description": "Standard object's metadata."}));
                }
                m.insert(
                    "x-kubernetes-group-version-kind".into(),
                    json!([{"group": res.group, "version": version, "kind": res.kind}]),
                );
            }
            schemas.insert(schema_name(res, version), s);
        }
    }
    if !any {
        return None;
    }
    schemas.insert(OBJECT_META.into(), object_meta());
    builtin_schemas(group, version, &mut schemas);
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (r4 dev)", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }))
}

/// Schemas of the built-in kinds served in `group/version`, generated from k8s-openapi's types
/// (names and `$ref`s as Kubernetes publishes them: `io.k8s.api.apps.v1.Deployment`), so
/// `kubectl explain deployment.spec` works as against a real server.
fn builtin_schemas(group: &str, version: &str, out: &mut Map<String, Value>) {
    use k8s_openapi::api::{
        apps::v1 as apps, coordination::v1 as coordination, core::v1 as core, events::v1 as events,
        networking::v1 as networking, policy::v1 as policy, rbac::v1 as rbac,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    use schemars::JsonSchema;
    let mut generator = schemars::generate::SchemaSettings::openapi3().into_generator();
    let mut kinds: Vec<(&str, String)> = Vec::new();
    macro_rules! kind {
        ($t:ty, $kind:expr) => {{
            generator.subschema_for::<$t>();
            kinds.push(($kind, <$t as JsonSchema>::schema_name().into_owned()));
        }};
    }
    match (group, version) {
        ("", "v1") => {
            kind!(core::Namespace, "Namespace");
            kind!(core::Node, "Node");
            kind!(core::ConfigMap, "ConfigMap");
            kind!(core::Secret, "Secret");
            kind!(core::Service, "Service");
            kind!(core::ServiceAccount, "ServiceAccount");
            kind!(core::Pod, "Pod");
            kind!(core::Event, "Event");
        }
        ("apps", "v1") => {
            kind!(apps::Deployment, "Deployment");
            kind!(apps::ReplicaSet, "ReplicaSet");
            kind!(apps::ControllerRevision, "ControllerRevision");
        }
        ("coordination.k8s.io", "v1") => kind!(coordination::Lease, "Lease"),
        ("events.k8s.io", "v1") => kind!(events::Event, "Event"),
        ("rbac.authorization.k8s.io", "v1") => {
            kind!(rbac::ClusterRole, "ClusterRole");
            kind!(rbac::ClusterRoleBinding, "ClusterRoleBinding");
            kind!(rbac::Role, "Role");
            kind!(rbac::RoleBinding, "RoleBinding");
        }
        ("networking.k8s.io", "v1") => kind!(networking::NetworkPolicy, "NetworkPolicy"),
        ("policy", "v1") => kind!(policy::PodDisruptionBudget, "PodDisruptionBudget"),
        ("apiextensions.k8s.io", "v1") => {
            kind!(ext::CustomResourceDefinition, "CustomResourceDefinition")
        }
        _ => return,
    }
    for (name, mut schema) in generator.take_definitions(true) {
        if let Some((kind, _)) = kinds.iter().find(|(_, n)| *n == name)
            && let Some(m) = schema.as_object_mut()
        {
            m.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": group, "version": version, "kind": kind}]),
            );
        }
        // Our ObjectMeta stays (kubectl only reads descriptions from it); theirs is fuller.
        out.insert(name, schema);
    }
}
