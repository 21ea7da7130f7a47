//! The HTTP face of the API: path routing (`/api/v1/…`, `/apis/<group>/<version>/…`),
//! discovery, content negotiation (JSON, Table), the verbs, and watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::ApiState;
use super::openapi;
use super::patch;
use super::resources::{self, ResourceInfo};
use super::selector::{FieldSelector, LabelSelector};
use super::status::{self, ApiError};
use super::store::{EventType, ListFilter, Part, Propagation, WriteCtx};
use super::table::{self, Include};

type Params = HashMap<String, String>;

fn respond(code: u16, body: &Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(e: &ApiError) -> Response {
    respond(e.code, &e.to_status())
}

/// The single entry point: every path of the API.
pub async fn handle(
    State(state): State<ApiState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params: Params = Query::<Params>::try_from_uri(&uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let path = uri.path().trim_matches('/');
    let segs: Vec<&str> = if path.is_empty() {
        Vec::new()
    } else {
        path.split('/').collect()
    };
    let req = Req {
        state: &state,
        method: &method,
        headers: &headers,
        params: &params,
        body: &body,
    };
    let result = match segs.as_slice() {
        ["version"] => Ok(respond(200, &version())),
        ["healthz"] | ["readyz"] | ["livez"] => Ok((StatusCode::OK, "ok").into_response()),
        ["api"] => Ok(respond(
            200,
            &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": state.addr_string()}]}),
        )),
        ["apis"] => Ok(respond(200, &group_list(&state))),
        ["apis", g] => group(&state, g).map(|v| respond(200, &v)),
        ["api", v] => resource_list(&state, "", v).map(|v| respond(200, &v)),
        ["apis", g, v] => resource_list(&state, g, v).map(|v| respond(200, &v)),
        ["openapi", "v3"] => {
            let s = state.store().lock();
            Ok(respond(
                200,
                &openapi::root(&s.registry, state.registry_hash(&s)),
            ))
        }
        // An empty OpenAPI v2 document (in the protobuf kubectl asks for): kubectl then
        // treats kinds it cannot find as it does against a real server (no client-side schema,
        // "ensure CRDs are installed first" for a kind not served yet) instead of failing on 404.
        ["openapi", "v2"] => Ok((
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
            )],
            Bytes::new(),
        )
            .into_response()),
        ["openapi", "v3", "api", v] => gv_doc(&state, "", v),
        ["openapi", "v3", "apis", g, v] => gv_doc(&state, g, v),
        ["api", "v1", rest @ ..] => req.resource("", "v1", rest).await,
        ["apis", g, v, rest @ ..] => req.resource(g, v, rest).await,
        _ => Err(ApiError::no_resource()),
    };
    let response = result.unwrap_or_else(|e| error(&e));
    tracing::debug!(%method, path = %uri.path(), status = response.status().as_u16(), "dev API request");
    response
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "32", "gitVersion": "v1.32.0-r4dev", "gitCommit": "",
        "gitTreeState": "clean", "buildDate": "1970-01-01T00:00:00Z", "goVersion": "rust",
        "compiler": "rustc", "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    })
}

fn gv_doc(state: &ApiState, group: &str, version: &str) -> Result<Response, ApiError> {
    let s = state.store().lock();
    openapi::group_version(&s.registry, group, version)
        .map(|d| respond(200, &d))
        .ok_or_else(ApiError::no_resource)
}

fn group_json(name: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    json!({"name": name, "versions": vs, "preferredVersion": vs.first().cloned().unwrap_or(Value::Null)})
}

fn group_list(state: &ApiState) -> Value {
    let s = state.store().lock();
    let groups: Vec<Value> = s
        .registry
        .groups()
        .iter()
        .filter(|(g, _)| !g.is_empty())
        .map(|(g, vs)| group_json(g, vs))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn group(state: &ApiState, name: &str) -> Result<Value, ApiError> {
    let s = state.store().lock();
    let groups = s.registry.groups();
    let (g, vs) = groups
        .iter()
        .find(|(g, _)| g == name && !g.is_empty())
        .ok_or_else(ApiError::no_resource)?;
    let mut v = group_json(g, vs);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Ok(v)
}

const VERBS: [&str; 8] = [
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

fn resource_list(state: &ApiState, group: &str, version: &str) -> Result<Value, ApiError> {
    let s = state.store().lock();
    let mut resources = Vec::new();
    for r in s.registry.in_group_version(group, version) {
        let mut e = json!({
            "name": r.plural, "singularName": r.singular, "namespaced": r.namespaced,
            "kind": r.kind, "verbs": VERBS,
        });
        if !r.short_names.is_empty() {
            e["shortNames"] = json!(r.short_names);
        }
        if !r.categories.is_empty() {
            e["categories"] = json!(r.categories);
        }
        resources.push(e);
        if r.status {
            resources.push(json!({
                "name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced,
                "kind": r.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        if has_scale(r) {
            resources.push(json!({
                "name": format!("{}/scale", r.plural), "singularName": "", "namespaced": r.namespaced,
                "group": "autoscaling", "version": "v1", "kind": "Scale", "verbs": ["get", "patch", "update"],
            }));
        }
    }
    if resources.is_empty() {
        return Err(ApiError::no_resource());
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Ok(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

struct Req<'a> {
    state: &'a ApiState,
    method: &'a Method,
    headers: &'a HeaderMap,
    params: &'a Params,
    body: &'a Bytes,
}

/// What the client asked the response to look like.
fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|a| {
            a.split(',')
                .next()
                .is_some_and(|first| first.contains("as=Table"))
        })
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|| "application/json".into())
}

fn decode(body: &[u8], ct: &str) -> Result<Value, ApiError> {
    if ct == "application/vnd.kubernetes.protobuf" {
        return super::protobuf::decode(body).map_err(|e| ApiError {
            message: format!("cannot decode the protobuf body: {e}"),
            ..ApiError::unsupported_media_type(ct)
        });
    }
    if ct.contains("yaml") {
        serde_yaml::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!(
                "Object 'Kind' is missing in '{}': {e}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })
    }
}

fn truthy(v: Option<&String>) -> bool {
    matches!(v.map(String::as_str), Some("true" | "1"))
}

/// Set the apiVersion a client asked for (one storage, every served version).
fn present(res: &ResourceInfo, version: &str, obj: Value) -> Value {
    let mut obj = resources::convert_event(res, obj, false);
    if let Some(o) = obj.as_object_mut() {
        o.insert("apiVersion".into(), json!(res.api_version(version)));
        o.insert("kind".into(), json!(res.kind));
    }
    obj
}

/// Kinds with a `/scale` subresource (`kubectl scale`): replicas at `.spec.replicas`.
fn has_scale(res: &ResourceInfo) -> bool {
    res.group == "apps" && matches!(res.plural.as_str(), "deployments" | "replicasets")
}

/// The `autoscaling/v1` Scale view of an object.
fn scale_of(obj: &Value) -> Value {
    let selector: Vec<String> = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    let meta = obj.get("metadata").cloned().unwrap_or(json!({}));
    let pick = |k: &str| meta.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": pick("name"), "namespace": pick("namespace"), "uid": pick("uid"),
            "resourceVersion": pick("resourceVersion"), "creationTimestamp": pick("creationTimestamp"),
        },
        "spec": {"replicas": obj.pointer("/spec/replicas").cloned().unwrap_or(json!(1))},
        "status": {
            "replicas": obj.pointer("/status/replicas").cloned().unwrap_or(json!(0)),
            "selector": selector.join(","),
        },
    })
}

impl Req<'_> {
    /// `/scale`: read or write `.spec.replicas` through an `autoscaling/v1` Scale.
    fn scale(
        &self,
        res: &Arc<ResourceInfo>,
        version: &str,
        ns: &str,
        name: &str,
    ) -> Result<Response, ApiError> {
        let ct = content_type(self.headers);
        let body = match self.method.as_str() {
            "GET" => None,
            "PUT" | "PATCH" => Some(decode(self.body, "json")?),
            m => {
                return Err(ApiError::method_not_allowed(format!(
                    "the server does not allow this method on the requested resource ({m})"
                )));
            }
        };
        let Some(body) = body else {
            let obj = self.state.store().lock().get(res, ns, name)?;
            return Ok(respond(200, &scale_of(&obj)));
        };
        let ctx = self.ctx(version);
        let method = self.method.as_str().to_string();
        let dry = self.dry_run();
        let obj = self.write(dry, |s| {
            let current = s.get(res, ns, name)?;
            let scale = scale_of(&current);
            let wanted = match (method.as_str(), ct.as_str()) {
                ("PUT", _) => body,
                (_, "application/merge-patch+json" | "application/strategic-merge-patch+json") => {
                    patch::merge_patch(&scale, &body)
                }
                (_, "application/json-patch+json") => patch::json_patch(&scale, &body)
                    .map_err(|e| ApiError::new(422, "Invalid", e.0))?,
                (_, other) => return Err(ApiError::unsupported_media_type(other)),
            };
            let replicas = wanted
                .pointer("/spec/replicas")
                .and_then(Value::as_i64)
                .filter(|r| *r >= 0)
                .ok_or_else(|| {
                    ApiError::invalid_field(
                        res,
                        name,
                        "spec.replicas",
                        "Invalid value: must be a non-negative integer",
                    )
                })?;
            let mut next = current.clone();
            // Stored objects are JSON objects; a `spec` of another type is replaced.
            if !next.get("spec").is_some_and(Value::is_object) {
                next["spec"] = json!({});
            }
            next["spec"]["replicas"] = json!(replicas);
            if let Some(rv) = wanted
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                && !rv.is_empty()
            {
                next["metadata"]["resourceVersion"] = json!(rv);
            }
            s.update(res, ns, name, next, Part::Main, &ctx)
        })?;
        Ok(respond(200, &scale_of(&obj)))
    }

    fn manager(&self) -> String {
        if let Some(m) = self.params.get("fieldManager") {
            return m.clone();
        }
        self.headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|ua| ua.split('/').next())
            .filter(|s| !s.is_empty())
            .unwrap_or("unknown")
            .to_string()
    }

    fn ctx(&self, version: &str) -> WriteCtx {
        let mut c = WriteCtx::new(&self.manager(), version);
        c.strict = self.params.get("fieldValidation").map(String::as_str) == Some("Strict");
        c
    }

    fn filter(&self, ns: Option<&str>) -> Result<ListFilter, ApiError> {
        let labels = match self.params.get("labelSelector") {
            Some(s) => LabelSelector::parse(s).map_err(ApiError::bad_request)?,
            None => LabelSelector::default(),
        };
        let fields = match self.params.get("fieldSelector") {
            Some(s) => FieldSelector::parse(s).map_err(ApiError::bad_request)?,
            None => FieldSelector::default(),
        };
        Ok(ListFilter {
            namespace: ns.map(str::to_string),
            labels,
            fields,
        })
    }

    fn dry_run(&self) -> bool {
        self.params.contains_key("dryRun")
    }

    async fn resource(
        &self,
        group: &str,
        version: &str,
        rest: &[&str],
    ) -> Result<Response, ApiError> {
        let (ns, rest) = match rest {
            ["namespaces", _ns, "status" | "finalize"] if group.is_empty() => (None, rest),
            ["namespaces", ns, r @ ..] if !r.is_empty() => (Some(*ns), r),
            _ => (None, rest),
        };
        let Some(plural) = rest.first() else {
            return Err(ApiError::no_resource());
        };
        let res = self
            .state
            .store()
            .lock()
            .registry
            .find(group, version, plural)
            .ok_or_else(ApiError::no_resource)?;
        if ns.is_some() && !res.namespaced {
            return Err(ApiError::no_resource());
        }
        let name = rest.get(1).copied();
        if rest.len() > 3 {
            return Err(ApiError::no_resource());
        }
        if res.namespaced && ns.is_none() && name.is_some() {
            return Err(ApiError::no_resource());
        }
        let ns_str = ns.unwrap_or("");
        let part = match rest.get(2).copied() {
            None => Part::Main,
            Some("status") if res.status => Part::Status,
            Some("scale") if has_scale(&res) => {
                let name = name.unwrap_or_default();
                return self.scale(&res, version, ns_str, name);
            }
            Some(_) => return Err(ApiError::no_resource()),
        };
        match (self.method.as_str(), name) {
            ("GET", None) => {
                if truthy(self.params.get("watch")) {
                    self.watch(res, version, ns).await
                } else {
                    self.list(&res, version, ns)
                }
            }
            ("POST", None) => {
                let ns = if res.namespaced {
                    ns.ok_or_else(ApiError::no_resource)?
                } else {
                    ""
                };
                let obj = decode(self.body, &content_type(self.headers))?;
                let obj = resources::convert_event(&res, obj, true);
                let ctx = self.ctx(version);
                let dry = self.dry_run();
                let created = self.write(dry, |s| s.create(&res, ns, obj, &ctx))?;
                Ok(respond(201, &present(&res, version, created)))
            }
            ("DELETE", None) => {
                let filter = self.filter(ns)?;
                let policy = self.propagation()?;
                let now = super::store::now();
                let dry = self.dry_run();
                let gone =
                    self.write(
                        dry,
                        |s| Ok(s.delete_collection(&res, &filter, policy, &now)),
                    )?;
                let items: Vec<Value> = gone
                    .into_iter()
                    .map(|o| present(&res, version, o))
                    .collect();
                Ok(respond(
                    200,
                    &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(version),
                        "metadata": {}, "items": items}),
                ))
            }
            ("GET", Some(name)) => {
                let obj = self.state.store().lock().get(&res, ns_str, name)?;
                let obj = present(&res, version, obj);
                if wants_table(self.headers) {
                    let include =
                        Include::parse(self.params.get("includeObject").map(String::as_str));
                    let rv = obj
                        .pointer("/metadata/resourceVersion")
                        .cloned()
                        .unwrap_or(json!(""));
                    return Ok(respond(
                        200,
                        &table::table(
                            &res,
                            version,
                            &[obj],
                            include,
                            true,
                            json!({"resourceVersion": rv}),
                        ),
                    ));
                }
                Ok(respond(200, &obj))
            }
            ("PUT", Some(name)) => {
                let obj = decode(self.body, &content_type(self.headers))?;
                let obj = resources::convert_event(&res, obj, true);
                let ctx = self.ctx(version);
                let dry = self.dry_run();
                let updated = self.write(dry, |s| s.update(&res, ns_str, name, obj, part, &ctx))?;
                Ok(respond(200, &present(&res, version, updated)))
            }
            ("PATCH", Some(name)) => self.patch(&res, version, ns_str, name, part),
            ("DELETE", Some(name)) => {
                let opts: Value = if self.body.is_empty() {
                    json!({})
                } else {
                    decode(self.body, "application/json")?
                };
                let policy = match opts.get("propagationPolicy").and_then(Value::as_str) {
                    Some(p) => Propagation::parse(p)?,
                    None if opts.get("orphanDependents") == Some(&json!(true)) => {
                        Propagation::Orphan
                    }
                    None => self.propagation()?,
                };
                let uid = opts.pointer("/preconditions/uid").and_then(Value::as_str);
                let rv = opts
                    .pointer("/preconditions/resourceVersion")
                    .and_then(Value::as_str);
                let now = super::store::now();
                let dry = self.dry_run()
                    || opts
                        .get("dryRun")
                        .is_some_and(|d| d.as_array().is_some_and(|a| !a.is_empty()));
                let (obj, gone) =
                    self.write(dry, |s| s.delete(&res, ns_str, name, policy, uid, rv, &now))?;
                if gone {
                    let uid = obj
                        .pointer("/metadata/uid")
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    Ok(respond(200, &status::success(&res, name, uid)))
                } else {
                    Ok(respond(202, &present(&res, version, obj)))
                }
            }
            (m, _) => Err(ApiError::method_not_allowed(format!(
                "the server does not allow this method on the requested resource ({m})"
            ))),
        }
    }

    fn propagation(&self) -> Result<Propagation, ApiError> {
        match self.params.get("propagationPolicy") {
            Some(p) => Propagation::parse(p),
            None => Ok(Propagation::Background),
        }
    }

    /// Run a write; a dry run runs it on a copy of the store and keeps nothing.
    fn write<R>(
        &self,
        dry: bool,
        f: impl FnOnce(&mut super::store::Inner) -> Result<R, ApiError>,
    ) -> Result<R, ApiError> {
        if dry {
            let mut copy = self.state.store().lock().clone();
            f(&mut copy)
        } else {
            self.state.store().write(f)
        }
    }

    fn list(
        &self,
        res: &Arc<ResourceInfo>,
        version: &str,
        ns: Option<&str>,
    ) -> Result<Response, ApiError> {
        let filter = self.filter(ns)?;
        let limit = match self.params.get("limit") {
            Some(l) => Some(l.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!(
                    "limit: Invalid value: {l:?}: must be a non-negative integer"
                ))
            })?),
            None => None,
        };
        let s = self.state.store().lock();
        let (items, cont) = s.list(
            res,
            &filter,
            limit,
            self.params.get("continue").map(String::as_str),
        )?;
        let rv = s.resource_version().to_string();
        drop(s);
        let items: Vec<Value> = items
            .into_iter()
            .map(|o| present(res, version, o))
            .collect();
        let mut meta = json!({"resourceVersion": rv});
        if let Some(c) = cont {
            meta["continue"] = json!(c);
        }
        if wants_table(self.headers) {
            let include = Include::parse(self.params.get("includeObject").map(String::as_str));
            return Ok(respond(
                200,
                &table::table(res, version, &items, include, true, meta),
            ));
        }
        Ok(respond(
            200,
            &json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(version),
                "metadata": meta, "items": items}),
        ))
    }

    fn patch(
        &self,
        res: &Arc<ResourceInfo>,
        version: &str,
        ns: &str,
        name: &str,
        part: Part,
    ) -> Result<Response, ApiError> {
        let ct = content_type(self.headers);
        let ctx = self.ctx(version);
        let dry = self.dry_run();
        if ct == "application/apply-patch+yaml" || ct == "application/apply-patch+json" {
            let applied = resources::convert_event(res, decode(self.body, "yaml")?, true);
            if !self.params.contains_key("fieldManager") {
                return Err(ApiError {
                    details: Some(
                        json!({"name": "", "group": "meta.k8s.io", "kind": "PatchOptions",
                        "causes": [{"reason": "FieldValueRequired", "message": "Required value: is required for apply patch", "field": "fieldManager"}]}),
                    ),
                    ..ApiError::new(
                        422,
                        "Invalid",
                        "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
                    )
                });
            }
            let force = truthy(self.params.get("force"));
            let existed = self.state.store().lock().get(res, ns, name).is_ok();
            let obj = self.write(dry, |s| s.apply(res, ns, name, &applied, force, part, &ctx))?;
            return Ok(respond(
                if existed { 200 } else { 201 },
                &present(res, version, obj),
            ));
        }
        let patch_doc = decode(self.body, "json")?;
        let api_version = res.api_version(version);
        let is_custom = res.crd.is_some();
        let obj = self.write(dry, |s| {
            let current = resources::convert_event(res, s.get(res, ns, name)?, false);
            let patched = match ct.as_str() {
                "application/merge-patch+json" => Ok(patch::merge_patch(&current, &patch_doc)),
                "application/json-patch+json" => patch::json_patch(&current, &patch_doc),
                "application/strategic-merge-patch+json" if !is_custom => {
                    patch::strategic_merge_patch(&current, &patch_doc, &api_version, &res.kind)
                }
                other => return Err(ApiError::unsupported_media_type(other)),
            }
            .map_err(|e| ApiError::new(422, "Invalid", e.0))?;
            let patched = resources::convert_event(res, patched, true);
            s.update(res, ns, name, patched, part, &ctx)
        })?;
        Ok(respond(200, &present(res, version, obj)))
    }

    async fn watch(
        &self,
        res: Arc<ResourceInfo>,
        version: &str,
        ns: Option<&str>,
    ) -> Result<Response, ApiError> {
        let filter = self.filter(ns)?;
        let bookmarks = truthy(self.params.get("allowWatchBookmarks"));
        let send_initial = truthy(self.params.get("sendInitialEvents"));
        let as_table = wants_table(self.headers)
            .then(|| Include::parse(self.params.get("includeObject").map(String::as_str)));
        let opts = self.state.options();
        let timeout = match self.params.get("timeoutSeconds") {
            Some(t) => Duration::from_secs(t.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("timeoutSeconds: Invalid value: {t:?}"))
            })?)
            .min(opts.max_watch),
            None => opts.max_watch,
        };
        let requested = match self.params.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(rv) => Some(rv.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!(
                    "resourceVersion: Invalid value: {rv:?}: must be an integer"
                ))
            })?),
        };
        let store = self.state.clone();
        let mut changed = store.store().subscribe();
        let gr = res.storage_resource();
        let (initial, mut last) = {
            let s = store.store().lock();
            match requested {
                Some(rv) if !send_initial => (Vec::new(), rv),
                _ => {
                    let (items, _) = s.list(&res, &filter, None, None)?;
                    (items, s.resource_version())
                }
            }
        };
        let version = version.to_string();
        let (tx, rx) = mpsc::channel::<Bytes>(256);
        let line = |ty: &str, obj: Value| -> Bytes {
            let mut s = json!({"type": ty, "object": obj}).to_string();
            s.push('\n');
            Bytes::from(s)
        };
        tokio::spawn(async move {
            let mut headers = true;
            let mut render = |obj: Value| -> Value {
                let obj = present(&res, &version, obj);
                match as_table {
                    Some(include) => {
                        let rv = obj
                            .pointer("/metadata/resourceVersion")
                            .cloned()
                            .unwrap_or(json!(""));
                        let t = table::table(
                            &res,
                            &version,
                            &[obj],
                            include,
                            headers,
                            json!({"resourceVersion": rv}),
                        );
                        headers = false;
                        t
                    }
                    None => obj,
                }
            };
            let bookmark = |rv: u64, end: bool| {
                let mut m = json!({"resourceVersion": rv.to_string()});
                if end {
                    m["annotations"] = json!({"k8s.io/initial-events-end": "true"});
                }
                json!({"kind": res.kind, "apiVersion": res.api_version(&version), "metadata": m})
            };
            for obj in initial {
                if tx.send(line("ADDED", render(obj))).await.is_err() {
                    return;
                }
            }
            if send_initial
                && bookmarks
                && tx
                    .send(line("BOOKMARK", bookmark(last, true)))
                    .await
                    .is_err()
            {
                return;
            }
            let deadline = tokio::time::Instant::now() + timeout;
            let mut next_bookmark = tokio::time::Instant::now() + opts.bookmark_interval;
            loop {
                let batch = {
                    let s = store.store().lock();
                    let evs = s.events_since(last, &gr);
                    let now_rv = s.resource_version();
                    evs.map(|e| (e, now_rv))
                };
                match batch {
                    Err(e) => {
                        let _ = tx.send(line("ERROR", e.to_status())).await;
                        return;
                    }
                    Ok((events, now_rv)) => {
                        for e in events {
                            let object = e.object.value();
                            let new_match = filter.matches(&object);
                            let old_match = e
                                .old
                                .as_ref()
                                .map(|o| filter.matches(&o.value()))
                                .unwrap_or(new_match);
                            let ty = match (e.kind, old_match, new_match) {
                                (EventType::Added, _, true) => "ADDED",
                                (EventType::Modified, true, true) => "MODIFIED",
                                (EventType::Modified, false, true) => "ADDED",
                                (EventType::Modified, true, false) => "DELETED",
                                (EventType::Deleted, _, true) => "DELETED",
                                _ => continue,
                            };
                            if tx.send(line(ty, render(object))).await.is_err() {
                                return;
                            }
                        }
                        last = last.max(now_rv);
                    }
                }
                tokio::select! {
                    r = changed.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep_until(next_bookmark) => {
                        next_bookmark = tokio::time::Instant::now() + opts.bookmark_interval;
                        if bookmarks && tx.send(line("BOOKMARK", bookmark(last, false))).await.is_err() {
                            return;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => return,
                    _ = tx.closed() => return,
                }
            }
        });
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        });
        Ok((
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-cache, private"),
            ],
            Body::from_stream(stream),
        )
            .into_response())
    }
}
