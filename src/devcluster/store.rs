//! The object store: every object kept as compact JSON ([`Stored`]) keyed by (group/resource,
//! namespace, name), one global `resourceVersion` counter, a bounded event history for watches,
//! and the write semantics of the Kubernetes API (generation, status subresource, optimistic
//! concurrency, finalizers, garbage collection by `ownerReferences`, namespace deletion).
//!
//! Everything happens under one lock, so each request is one atomic step and watchers see
//! events in `resourceVersion` order. Garbage collection is synchronous: when an owner goes,
//! its dependents go (or are orphaned) in the same step.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::Rng;
use serde_json::{Map, Value, json};

use super::admit::{admit_custom, is_dns_subdomain};
use super::apply;
use super::resources::{self, Registry, ResourceInfo};
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;

/// (group/resource, namespace — empty for cluster-scoped —, name).
pub type Key = (String, String, String);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as the watch history keeps it (with the previous state, so a watch with a
/// selector can turn "stopped matching" into DELETED as the real server does).
#[derive(Clone, Debug)]
pub struct Event {
    pub rv: u64,
    pub group_resource: String,
    pub namespace: String,
    pub kind: EventType,
    pub object: Stored,
    pub old: Option<Stored>,
}

/// An object as the store and the watch history keep it: compact JSON, shared between them.
/// A `serde_json::Value` costs about ten times its JSON text; 1,000 workflows with their
/// children must fit in well under 128 MiB (`r4 bench devcluster`).
#[derive(Clone, Debug)]
pub struct Stored(Arc<str>);

impl Stored {
    fn new(v: &Value) -> Self {
        Self(Arc::from(
            serde_json::to_string(v).unwrap_or_else(|_| "null".to_string()),
        ))
    }

    /// The object (the store wrote this text itself, so it parses).
    pub fn value(&self) -> Value {
        serde_json::from_str(&self.0).unwrap_or(Value::Null)
    }
}

/// The objects by key, each [`Stored`]; reads give owned values.
#[derive(Clone, Default)]
struct Objects(BTreeMap<Key, Stored>);

impl Objects {
    fn get(&self, k: &Key) -> Option<Value> {
        self.0.get(k).map(Stored::value)
    }

    fn insert(&mut self, k: Key, v: Stored) -> Option<Stored> {
        self.0.insert(k, v)
    }

    fn remove(&mut self, k: &Key) -> Option<Value> {
        self.0.remove(k).map(|s| s.value())
    }

    fn contains_key(&self, k: &Key) -> bool {
        self.0.contains_key(k)
    }

    fn keys(&self) -> impl Iterator<Item = &Key> {
        self.0.keys()
    }

    fn range(&self, from: std::ops::RangeFrom<Key>) -> impl Iterator<Item = (&Key, Value)> {
        self.0.range(from).map(|(k, v)| (k, v.value()))
    }

    /// The objects of one group/resource (only those are decoded).
    fn of<'a>(&'a self, group_resource: &'a str) -> impl Iterator<Item = (&'a Key, Value)> {
        self.0
            .iter()
            .filter(move |(k, _)| k.0 == group_resource)
            .map(|(k, v)| (k, v.value()))
    }

    /// The objects whose JSON text contains `needle` (only those are decoded): a cheap
    /// first cut for lookups by uid.
    fn mentioning<'a>(&'a self, needle: &'a str) -> impl Iterator<Item = (&'a Key, Value)> {
        self.0
            .iter()
            .filter(move |(_, v)| v.0.contains(needle))
            .map(|(k, v)| (k, v.value()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Propagation {
    #[default]
    Background,
    Foreground,
    Orphan,
}

impl Propagation {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "Background" => Ok(Self::Background),
            "Foreground" => Ok(Self::Foreground),
            "Orphan" => Ok(Self::Orphan),
            other => Err(ApiError::bad_request(format!(
                "propagationPolicy: Unsupported value: \"{other}\": supported values: \"Foreground\", \"Background\", \"Orphan\""
            ))),
        }
    }
}

/// Which part of the object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// The object: `.status` is kept as stored when the kind has a status subresource.
    Main,
    /// `/status`: only `.status` is taken from the request.
    Status,
}

/// Who writes, and how.
#[derive(Clone, Debug)]
pub struct WriteCtx {
    pub manager: String,
    /// `fieldValidation=Strict`: unknown fields are refused instead of pruned.
    pub strict: bool,
    /// The API version the request was made in (selects a CRD version's schema).
    pub version: String,
    pub now: String,
    /// The write is a server-side apply whose `managedFields` `apply` already computed (an
    /// Update entry for the same manager must not be recorded on top).
    pub applied: bool,
}

impl WriteCtx {
    pub fn new(manager: &str, version: &str) -> Self {
        Self {
            manager: manager.into(),
            strict: false,
            version: version.into(),
            now: now(),
            applied: false,
        }
    }
}

/// The merge keys of `res`'s associative lists, as `apply` wants them.
fn list_keys(
    res: &ResourceInfo,
    version: &str,
) -> impl Fn(&[String]) -> Option<Vec<String>> + use<> {
    let res = res.clone();
    let version = version.to_string();
    move |path: &[String]| resources::list_keys(&res, &version, path)
}

/// Now, as the API server writes timestamps (RFC 3339, seconds).
pub fn now() -> String {
    let ts = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(ts.as_second())
        .map(|t| t.to_string())
        .unwrap_or_else(|_| ts.to_string())
}

/// What a list request filters on.
#[derive(Clone, Debug, Default)]
pub struct ListFilter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl ListFilter {
    pub fn matches(&self, obj: &Value) -> bool {
        let ns = obj
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        self.namespace.as_deref().is_none_or(|want| want == ns)
            && self.labels.matches_object(obj)
            && self.fields.matches(obj)
    }
}

#[derive(Clone)]
pub struct Inner {
    rv: u64,
    objects: Objects,
    uids: HashMap<String, Key>,
    history: VecDeque<Event>,
    history_cap: usize,
    /// A watch may start at any resourceVersion >= this: every later event is still in history.
    compacted: u64,
    pub registry: Registry,
}

/// The store and the signal watchers wait on.
pub struct Store {
    inner: Mutex<Inner>,
    changed: tokio::sync::watch::Sender<u64>,
}

fn meta(obj: &Value, field: &str) -> Option<String> {
    obj.get("metadata")?
        .get(field)?
        .as_str()
        .map(str::to_string)
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let Some(map) = obj.as_object_mut() else {
        unreachable!("just made an object")
    };
    let m = map.entry("metadata").or_insert_with(|| json!({}));
    if !m.is_object() {
        *m = json!({});
    }
    match m.as_object_mut() {
        Some(m) => m,
        None => unreachable!("just made an object"),
    }
}

fn finalizers(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

fn set_finalizers(obj: &mut Value, f: &[String]) {
    let m = meta_mut(obj);
    if f.is_empty() {
        m.remove("finalizers");
    } else {
        m.insert("finalizers".into(), json!(f));
    }
}

fn owner_uids(obj: &Value) -> Vec<String> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The part of an object whose change bumps `metadata.generation`.
fn spec_part(res: &ResourceInfo, obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        if res.status {
            m.remove("status");
        }
    }
    v
}

/// The object without what a no-op write may change anyway.
fn comparable(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
        m.remove("managedFields");
    }
    v
}

const FOREGROUND: &str = "foregroundDeletion";
const NAME_CHARS: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

impl Store {
    /// A store with the `default` and `kube-system` namespaces and a watch history of
    /// `history_cap` events (a watch from an older resourceVersion gets 410 Expired).
    pub fn new(history_cap: usize) -> Self {
        let mut inner = Inner {
            rv: 0,
            objects: Objects::default(),
            uids: HashMap::new(),
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            compacted: 0,
            registry: Registry::default(),
        };
        let ns = inner.registry.find("", "v1", "namespaces");
        for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            if let Some(ns) = &ns {
                let obj =
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
                // Cannot fail: fresh names in an empty store.
                let _ = inner.create(ns, "", obj, &WriteCtx::new("r4-dev", "v1"));
            }
        }
        let (changed, _) = tokio::sync::watch::channel(inner.rv);
        Self {
            inner: Mutex::new(inner),
            changed,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Run a write under the lock, then wake the watchers.
    pub fn write<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.lock();
        let r = f(&mut g);
        let rv = g.rv;
        drop(g);
        self.changed.send_replace(rv);
        r
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

impl Inner {
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn key(res: &ResourceInfo, ns: &str, name: &str) -> Key {
        let ns = if res.namespaced { ns } else { "" };
        (res.storage_resource(), ns.to_string(), name.to_string())
    }

    fn emit(&mut self, kind: EventType, key: &Key, object: Stored, old: Option<Stored>) {
        self.history.push_back(Event {
            rv: self.rv,
            group_resource: key.0.clone(),
            namespace: key.1.clone(),
            kind,
            object,
            old,
        });
        while self.history.len() > self.history_cap {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    /// Store `obj` under `key` with a new resourceVersion and record the event.
    fn put(&mut self, key: Key, mut obj: Value, kind: EventType) -> Value {
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        if let Some(uid) = meta(&obj, "uid") {
            self.uids.insert(uid, key.clone());
        }
        let stored = Stored::new(&obj);
        let old = self.objects.insert(key.clone(), stored.clone());
        self.emit(kind, &key, stored, old);
        obj
    }

    /// Events of one resource after `since`; 410 Expired when history no longer reaches back.
    pub fn events_since(&self, since: u64, group_resource: &str) -> Result<Vec<Event>, ApiError> {
        if since < self.compacted {
            return Err(ApiError::expired(since, self.compacted));
        }
        let start = self.history.partition_point(|e| e.rv <= since);
        Ok(self
            .history
            .range(start..)
            .filter(|e| e.group_resource == group_resource)
            .cloned()
            .collect())
    }

    pub fn get(&self, res: &ResourceInfo, ns: &str, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(res, ns, name))
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Objects of `res` matching `filter`, in key order, after the `continue` key, at most
    /// `limit`; returns the items and the continue token when more remain.
    pub fn list(
        &self,
        res: &ResourceInfo,
        filter: &ListFilter,
        limit: Option<usize>,
        cont: Option<&str>,
    ) -> Result<(Vec<Value>, Option<String>), ApiError> {
        let gr = res.storage_resource();
        let after: Option<(String, String)> = match cont {
            None | Some("") => None,
            Some(token) => {
                let raw = hex::decode(token)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ApiError::bad_request("continue key is not valid"))?;
                let (ns, name) = raw.split_once('\0').unwrap_or(("", &raw));
                Some((ns.to_string(), name.to_string()))
            }
        };
        let start = (gr.clone(), String::new(), String::new());
        let mut items = Vec::new();
        let mut token = None;
        for ((g, ns, name), obj) in self.objects.range(start..) {
            if *g != gr {
                break;
            }
            if let Some((ans, aname)) = &after
                && (ns, name) <= (ans, aname)
            {
                continue;
            }
            if !filter.matches(&obj) {
                continue;
            }
            if limit.is_some_and(|l| l > 0 && items.len() >= l) {
                let last: &Value = &items[items.len() - 1];
                let lns = meta(last, "namespace").unwrap_or_default();
                let lname = meta(last, "name").unwrap_or_default();
                token = Some(hex::encode(format!("{lns}\0{lname}")));
                break;
            }
            items.push(obj.clone());
        }
        Ok((items, token))
    }

    fn namespace_state(&self, ns: &str) -> Option<bool> {
        let obj = self
            .objects
            .get(&("namespaces".into(), String::new(), ns.into()))?;
        Some(obj.pointer("/metadata/deletionTimestamp").is_some())
    }

    pub fn create(
        &mut self,
        res: &Arc<ResourceInfo>,
        ns: &str,
        mut obj: Value,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        let m = meta_mut(&mut obj);
        let mut name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let generate = m
            .get("generateName")
            .and_then(Value::as_str)
            .map(str::to_string);
        if name.is_empty() {
            let Some(prefix) = generate else {
                return Err(ApiError::invalid(
                    res,
                    "",
                    vec![super::status::Cause {
                        reason: "FieldValueRequired",
                        field: "metadata.name".into(),
                        message: "Required value: name or generateName is required".into(),
                    }],
                ));
            };
            let mut rng = rand::rng();
            loop {
                let suffix: String = (0..5)
                    .map(|_| NAME_CHARS[rng.random_range(0..NAME_CHARS.len())] as char)
                    .collect();
                name = format!("{prefix}{suffix}");
                if !self.objects.contains_key(&Self::key(res, ns, &name)) {
                    break;
                }
            }
            m.insert("name".into(), json!(name));
        }
        if !is_dns_subdomain(&name) || (res.plural == "namespaces" && name.contains('.')) {
            return Err(ApiError::invalid_field(
                res,
                &name,
                "metadata.name",
                &format!(
                    "Invalid value: \"{name}\": a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
                ),
            ));
        }
        if res.namespaced {
            match m.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {}
            }
            m.insert("namespace".into(), json!(ns));
            match self.namespace_state(ns) {
                None => {
                    return Err(ApiError {
                        details: Some(json!({"name": ns, "kind": "namespaces"})),
                        ..ApiError::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
                    });
                }
                Some(true) => {
                    return Err(ApiError::forbidden(format!(
                        "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                        res.group_resource()
                    )));
                }
                Some(false) => {}
            }
        } else {
            m.remove("namespace");
        }
        let key = Self::key(res, ns, &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(res, &name));
        }
        m.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
        m.insert("creationTimestamp".into(), json!(ctx.now));
        for f in [
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
            "resourceVersion",
        ] {
            m.remove(f);
        }
        if res.generation {
            m.insert("generation".into(), json!(1));
        } else {
            m.remove("generation");
        }
        if let Some(o) = obj.as_object_mut() {
            o.insert("apiVersion".into(), json!(res.api_version(&ctx.version)));
            o.insert("kind".into(), json!(res.kind));
        }
        if res.status {
            let status = match (res.group.as_str(), res.plural.as_str()) {
                ("", "pods") => Some(json!({"phase": "Pending"})),
                ("", "namespaces") => Some(json!({"phase": "Active"})),
                ("apiextensions.k8s.io", _) => Some(resources::crd_status(&obj, &ctx.now)),
                ("", "services") => Some(json!({"loadBalancer": {}})),
                _ => None,
            };
            if let Some(o) = obj.as_object_mut() {
                match status {
                    Some(s) => o.insert("status".into(), s),
                    None => o.remove("status"),
                };
            }
        }
        if res.crd.is_some() {
            admit_custom(res, &ctx.version, &mut obj, None, ctx.strict)?;
        }
        if res.group == "apiextensions.k8s.io" {
            self.check_crd(res, &name, &obj)?;
        }
        if res.group.is_empty() && res.plural == "services" {
            self.allocate_cluster_ip(&mut obj);
        }
        let lk = list_keys(res, &ctx.version);
        let obj = if ctx.applied {
            obj
        } else {
            apply::record_update(None, &obj, &ctx.manager, &ctx.now, &lk)
        };
        if res.group == "apiextensions.k8s.io" {
            self.registry
                .register_crd(&obj)
                .map_err(|e| ApiError::invalid_field(res, &name, "spec", &e))?;
        }
        let stored = self.put(key.clone(), obj, EventType::Added);
        self.collect_if_dangling(&key);
        Ok(stored)
    }

    /// A dependent none of whose owners exists is deleted, as the garbage collector does with
    /// a dangling `ownerReference` (say, a controller that wrote a child after its parent went).
    fn collect_if_dangling(&mut self, key: &Key) {
        let Some(obj) = self.objects.get(key) else {
            return;
        };
        let owners = owner_uids(&obj);
        if owners.is_empty() || owners.iter().any(|u| self.uids.contains_key(u)) {
            return;
        }
        if let Some(res) = self.res_of(key) {
            let _ = self.delete(
                &res,
                &key.1,
                &key.2,
                Propagation::Background,
                None,
                None,
                &now(),
            );
        }
    }

    /// A Service without a cluster IP gets one from 10.96.0.0/16 (as the real allocator would
    /// from the service CIDR); headless (`None`) and `ExternalName` services get none.
    fn allocate_cluster_ip(&self, svc: &mut Value) {
        let spec = svc.get("spec");
        let ty = spec.and_then(|s| s.get("type")).and_then(Value::as_str);
        let set = spec
            .and_then(|s| s.get("clusterIP"))
            .and_then(Value::as_str);
        if ty == Some("ExternalName") || set.is_some_and(|ip| !ip.is_empty()) {
            return;
        }
        let used: std::collections::HashSet<String> = self
            .objects
            .of("services")
            .filter_map(|(_, o)| {
                o.pointer("/spec/clusterIP")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .collect();
        let Some(ip) = (1u32..65535)
            .map(|n| format!("10.96.{}.{}", n / 256, n % 256))
            .find(|ip| !used.contains(ip.as_str()) && !ip.ends_with(".0"))
        else {
            return;
        };
        if let Some(o) = svc.as_object_mut() {
            let spec = o.entry("spec").or_insert_with(|| json!({}));
            if let Some(s) = spec.as_object_mut() {
                s.insert("clusterIP".into(), json!(ip));
                s.insert("clusterIPs".into(), json!([ip]));
                s.entry("type").or_insert_with(|| json!("ClusterIP"));
            }
        }
    }

    fn check_crd(&self, res: &ResourceInfo, name: &str, crd: &Value) -> Result<(), ApiError> {
        let info = resources::crd_resource(crd)
            .map_err(|e| ApiError::invalid_field(res, name, "spec", &e))?;
        if format!("{}.{}", info.plural, info.group) != name {
            return Err(ApiError::invalid_field(
                res,
                name,
                "metadata.name",
                &format!("Invalid value: \"{name}\": must be spec.names.plural+\".\"+spec.group"),
            ));
        }
        if self
            .registry
            .all()
            .iter()
            .any(|r| r.crd.is_none() && r.group_resource() == info.group_resource())
        {
            return Err(ApiError::invalid_field(
                res,
                name,
                "spec.names.plural",
                "Invalid value: a built-in resource has this name",
            ));
        }
        Ok(())
    }

    /// PUT (or a patch's result): replace the object, keeping what a client may not change.
    /// With `create_missing`, a missing object is created (server-side apply).
    pub fn update(
        &mut self,
        res: &Arc<ResourceInfo>,
        ns: &str,
        name: &str,
        new: Value,
        part: Part,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let key = Self::key(res, ns, name);
        let Some(old) = self.objects.get(&key) else {
            return Err(ApiError::not_found(res, name));
        };
        if !new.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request must be a JSON object",
            ));
        }
        if let Some(body_name) = meta(&new, "name")
            && body_name != name
        {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if let Some(rv) = meta(&new, "resourceVersion")
            && !rv.is_empty()
            && Some(&rv) != meta(&old, "resourceVersion").as_ref()
        {
            return Err(ApiError::stale(res, name));
        }
        let mut obj = match part {
            Part::Status => {
                let mut merged = old.clone();
                if let Some(o) = merged.as_object_mut() {
                    match new.get("status") {
                        Some(s) => o.insert("status".into(), s.clone()),
                        None => o.remove("status"),
                    };
                }
                merged
            }
            Part::Main => {
                let mut obj = new;
                if res.status
                    && let Some(o) = obj.as_object_mut()
                {
                    match old.get("status") {
                        Some(s) => o.insert("status".into(), s.clone()),
                        None => o.remove("status"),
                    };
                }
                let old_meta = old.get("metadata").cloned().unwrap_or(json!({}));
                let m = meta_mut(&mut obj);
                for f in [
                    "name",
                    "namespace",
                    "uid",
                    "creationTimestamp",
                    "deletionTimestamp",
                    "deletionGracePeriodSeconds",
                    "generation",
                    "generateName",
                ] {
                    match old_meta.get(f) {
                        Some(v) => m.insert(f.into(), v.clone()),
                        None => m.remove(f),
                    };
                }
                if let Some(o) = obj.as_object_mut() {
                    o.insert("apiVersion".into(), json!(res.api_version(&ctx.version)));
                    o.insert("kind".into(), json!(res.kind));
                }
                // A Service keeps its allocated cluster IP when a write leaves it out.
                if res.group.is_empty()
                    && res.plural == "services"
                    && obj.pointer("/spec/clusterIP").is_none()
                    && let (Some(ip), Some(spec)) = (
                        old.pointer("/spec/clusterIP").cloned(),
                        obj.get_mut("spec").and_then(Value::as_object_mut),
                    )
                {
                    spec.insert("clusterIP".into(), ip);
                    if let Some(ips) = old.pointer("/spec/clusterIPs") {
                        spec.insert("clusterIPs".into(), ips.clone());
                    }
                }
                obj
            }
        };
        if res.crd.is_some() {
            admit_custom(res, &ctx.version, &mut obj, Some(&old), ctx.strict)?;
        }
        if res.group == "apiextensions.k8s.io" && part == Part::Main {
            self.check_crd(res, name, &obj)?;
        }
        if res.generation && spec_part(res, &obj) != spec_part(res, &old) {
            let g = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            meta_mut(&mut obj).insert("generation".into(), json!(g + 1));
        }
        if comparable(&obj) == comparable(&old) {
            return Ok(old);
        }
        let lk = list_keys(res, &ctx.version);
        let obj = if ctx.applied {
            obj
        } else {
            apply::record_update(Some(&old), &obj, &ctx.manager, &ctx.now, &lk)
        };
        if res.group == "apiextensions.k8s.io" && part == Part::Main {
            self.registry
                .register_crd(&obj)
                .map_err(|e| ApiError::invalid_field(res, name, "spec", &e))?;
        }
        let deleting = obj.pointer("/metadata/deletionTimestamp").is_some();
        let stored = self.put(key.clone(), obj, EventType::Modified);
        if deleting && finalizers(&stored).is_empty() {
            return Ok(self.remove(&key).unwrap_or(stored));
        }
        self.collect_if_dangling(&key);
        Ok(stored)
    }

    #[allow(clippy::too_many_arguments)]
    /// Server-side apply: `applied` by `manager` onto the stored object, created if missing.
    pub fn apply(
        &mut self,
        res: &Arc<ResourceInfo>,
        ns: &str,
        name: &str,
        applied: &Value,
        force: bool,
        part: Part,
        ctx: &WriteCtx,
    ) -> Result<Value, ApiError> {
        let live = self.objects.get(&Self::key(res, ns, name));
        let lk = list_keys(res, &ctx.version);
        let result =
            apply::server_side_apply(live.as_ref(), applied, &ctx.manager, force, &ctx.now, &lk)
                .map_err(|e| match e {
                    apply::ApplyError::Conflicts(cs) => {
                        let list: Vec<String> = cs
                            .iter()
                            .map(|c| format!("conflict with \"{}\": {}", c.manager, c.field))
                            .collect();
                        ApiError {
                            details: Some(json!({
                                "name": name, "group": res.group, "kind": res.plural,
                                "causes": cs.iter().map(|c| json!({
                                    "reason": "FieldManagerConflict",
                                    "message": format!("conflict with \"{}\"", c.manager),
                                    "field": c.field,
                                })).collect::<Vec<_>>(),
                            })),
                            ..ApiError::new(
                                409,
                                "Conflict",
                                format!(
                                    "Apply failed with {} conflict{}: {}",
                                    cs.len(),
                                    if cs.len() == 1 { "" } else { "s" },
                                    list.join(", ")
                                ),
                            )
                        }
                    }
                    apply::ApplyError::Invalid(m) => ApiError::invalid_field(res, name, "", &m),
                })?;
        let ctx = &WriteCtx {
            applied: true,
            ..ctx.clone()
        };
        match live {
            None => {
                if part == Part::Status {
                    return Err(ApiError::not_found(res, name));
                }
                let mut obj = result;
                if meta(&obj, "name").is_none() {
                    meta_mut(&mut obj).insert("name".into(), json!(name));
                }
                self.create(res, ns, obj, ctx)
            }
            Some(_) => self.update(res, ns, name, result, part, ctx),
        }
    }

    fn dependents(&self, owner_uid: &str) -> Vec<Key> {
        self.objects
            .mentioning(owner_uid)
            .filter(|(_, o)| owner_uids(o).iter().any(|u| u == owner_uid))
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn res_of(&self, key: &Key) -> Option<Arc<ResourceInfo>> {
        self.registry.find_group_resource(&key.0)
    }

    #[allow(clippy::too_many_arguments)]
    /// DELETE. Returns the object and whether it is gone (false: finalizers keep it, with
    /// `deletionTimestamp` set).
    pub fn delete(
        &mut self,
        res: &Arc<ResourceInfo>,
        ns: &str,
        name: &str,
        policy: Propagation,
        precondition_uid: Option<&str>,
        precondition_rv: Option<&str>,
        now: &str,
    ) -> Result<(Value, bool), ApiError> {
        let key = Self::key(res, ns, name);
        let Some(mut obj) = self.objects.get(&key) else {
            return Err(ApiError::not_found(res, name));
        };
        if let Some(uid) = precondition_uid
            && Some(uid) != meta(&obj, "uid").as_deref()
        {
            return Err(ApiError::conflict(
                res,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                    meta(&obj, "uid").unwrap_or_default()
                ),
            ));
        }
        if let Some(rv) = precondition_rv
            && Some(rv) != meta(&obj, "resourceVersion").as_deref()
        {
            return Err(ApiError::stale(res, name));
        }
        let uid = meta(&obj, "uid").unwrap_or_default();
        if res.group.is_empty() && res.plural == "namespaces" {
            return Ok(self.delete_namespace(&key, now));
        }
        let mut fins = finalizers(&obj);
        match policy {
            Propagation::Orphan => self.orphan_dependents(&uid),
            Propagation::Foreground => {
                if !fins.iter().any(|f| f == FOREGROUND) {
                    fins.push(FOREGROUND.into());
                }
            }
            Propagation::Background => {}
        }
        if fins.is_empty() {
            let gone = self.remove(&key).unwrap_or(obj);
            return Ok((gone, true));
        }
        let before = obj.clone();
        set_finalizers(&mut obj, &fins);
        let m = meta_mut(&mut obj);
        if !m.contains_key("deletionTimestamp") {
            m.insert("deletionTimestamp".into(), json!(now));
            m.insert("deletionGracePeriodSeconds".into(), json!(0));
        }
        if obj != before {
            self.put(key.clone(), obj, EventType::Modified);
        }
        if policy == Propagation::Foreground {
            for dep in self.dependents(&uid) {
                if let Some(dres) = self.res_of(&dep) {
                    let _ = self.delete(
                        &dres,
                        &dep.1,
                        &dep.2,
                        Propagation::Foreground,
                        None,
                        None,
                        now,
                    );
                }
            }
            self.check_foreground(&uid);
        }
        let current = self.objects.get(&key);
        match current {
            Some(o) => Ok((o, false)),
            None => Ok((
                self.history
                    .back()
                    .map(|e| e.object.value())
                    .unwrap_or_default(),
                true,
            )),
        }
    }

    /// Orphan: the dependents lose their reference to the owner and stay.
    fn orphan_dependents(&mut self, owner_uid: &str) {
        for dep in self.dependents(owner_uid) {
            if let Some(mut o) = self.objects.get(&dep) {
                if let Some(refs) = o
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(owner_uid));
                    if refs.is_empty() {
                        meta_mut(&mut o).remove("ownerReferences");
                    }
                }
                self.put(dep, o, EventType::Modified);
            }
        }
    }

    /// An owner being deleted in the foreground goes once no dependent blocks it.
    fn check_foreground(&mut self, owner_uid: &str) {
        let Some(key) = self.uids.get(owner_uid).cloned() else {
            return;
        };
        let Some(mut owner) = self.objects.get(&key) else {
            return;
        };
        let mut fins = finalizers(&owner);
        if owner.pointer("/metadata/deletionTimestamp").is_none()
            || !fins.iter().any(|f| f == FOREGROUND)
        {
            return;
        }
        let blocked = self.dependents(owner_uid).iter().any(|k| {
            self.objects.get(k).is_some_and(|o| {
                o.pointer("/metadata/ownerReferences")
                    .and_then(Value::as_array)
                    .is_some_and(|refs| {
                        refs.iter().any(|r| {
                            r.get("uid").and_then(Value::as_str) == Some(owner_uid)
                                && r.get("blockOwnerDeletion").and_then(Value::as_bool)
                                    == Some(true)
                        })
                    })
            })
        });
        if blocked {
            return;
        }
        fins.retain(|f| f != FOREGROUND);
        set_finalizers(&mut owner, &fins);
        if fins.is_empty() {
            self.objects.insert(key.clone(), Stored::new(&owner));
            self.remove(&key);
        } else {
            self.put(key, owner, EventType::Modified);
        }
    }

    fn delete_namespace(&mut self, key: &Key, now: &str) -> (Value, bool) {
        let Some(mut ns) = self.objects.get(key) else {
            return (Value::Null, true);
        };
        if ns.pointer("/metadata/deletionTimestamp").is_none() {
            meta_mut(&mut ns).insert("deletionTimestamp".into(), json!(now));
            if let Some(o) = ns.as_object_mut() {
                o.insert("status".into(), json!({"phase": "Terminating"}));
            }
            ns = self.put(key.clone(), ns, EventType::Modified);
        }
        let name = key.2.clone();
        let contents: Vec<Key> = self
            .objects
            .keys()
            .filter(|k| k.1 == name && !k.1.is_empty())
            .cloned()
            .collect();
        for k in contents {
            if let Some(res) = self.res_of(&k) {
                let _ = self.delete(&res, &k.1, &k.2, Propagation::Background, None, None, now);
            }
        }
        match self.objects.get(key) {
            Some(still) => (still.clone(), false),
            None => (ns, true),
        }
    }

    /// Take an object out of the store (its finalizers are done) and collect what depended on it.
    fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut obj = self.objects.remove(key)?;
        let uid = meta(&obj, "uid").unwrap_or_default();
        self.uids.remove(&uid);
        let rv = self.next_rv();
        meta_mut(&mut obj).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(EventType::Deleted, key, Stored::new(&obj), None);
        let now = now();
        // Background garbage collection: a dependent goes when no owner of it is left.
        for dep in self.dependents(&uid) {
            let Some(mut d) = self.objects.get(&dep) else {
                continue;
            };
            let others: Vec<String> = owner_uids(&d)
                .into_iter()
                .filter(|u| *u != uid && self.uids.contains_key(u))
                .collect();
            if others.is_empty() {
                if let Some(dres) = self.res_of(&dep) {
                    let _ = self.delete(
                        &dres,
                        &dep.1,
                        &dep.2,
                        Propagation::Background,
                        None,
                        None,
                        &now,
                    );
                }
            } else {
                if let Some(refs) = d
                    .pointer_mut("/metadata/ownerReferences")
                    .and_then(Value::as_array_mut)
                {
                    refs.retain(|r| r.get("uid").and_then(Value::as_str) != Some(uid.as_str()));
                }
                self.put(dep, d, EventType::Modified);
            }
        }
        for owner in owner_uids(&obj) {
            self.check_foreground(&owner);
        }
        // A terminating namespace goes with its last object.
        if !key.1.is_empty() && self.namespace_state(&key.1) == Some(true) {
            let empty = !self.objects.keys().any(|k| k.1 == key.1);
            if empty {
                self.remove(&("namespaces".into(), String::new(), key.1.clone()));
            }
        }
        // A CRD takes its custom resources with it.
        if key.0 == "customresourcedefinitions.apiextensions.k8s.io"
            && let Ok(info) = resources::crd_resource(&obj)
        {
            let gr = info.group_resource();
            let instances: Vec<Key> = self.objects.keys().filter(|k| k.0 == gr).cloned().collect();
            // Their finalizers are not waited for (a real server would keep the CRD
            // terminating); what they own is collected as usual.
            for k in instances {
                self.remove(&k);
            }
            self.registry.unregister(&gr);
        }
        Some(obj)
    }

    /// Every object of `res` matching `filter` deleted (DELETE on the collection).
    pub fn delete_collection(
        &mut self,
        res: &Arc<ResourceInfo>,
        filter: &ListFilter,
        policy: Propagation,
        now: &str,
    ) -> Vec<Value> {
        let (items, _) = self.list(res, filter, None, None).unwrap_or_default();
        let mut out = Vec::new();
        for it in items {
            let ns = meta(&it, "namespace").unwrap_or_default();
            let name = meta(&it, "name").unwrap_or_default();
            if let Ok((o, _)) = self.delete(res, &ns, &name, policy, None, None, now) {
                out.push(o);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"a": "1"}})
    }

    fn res(s: &Inner, plural: &str) -> Arc<ResourceInfo> {
        let group = if plural == "deployments" { "apps" } else { "" };
        s.registry.find(group, "v1", plural).expect("built-in")
    }

    fn ctx() -> WriteCtx {
        WriteCtx::new("test", "v1")
    }

    #[test]
    fn create_get_conflict_and_generate_name() {
        let store = Store::new(100);
        let mut s = store.lock();
        let cms = res(&s, "configmaps");
        let a = s.create(&cms, "default", cm("a"), &ctx()).expect("create");
        assert!(meta(&a, "uid").is_some());
        assert!(meta(&a, "creationTimestamp").is_some());
        assert_eq!(
            s.create(&cms, "default", cm("a"), &ctx())
                .unwrap_err()
                .reason,
            "AlreadyExists"
        );
        assert_eq!(
            s.create(&cms, "nope", cm("a"), &ctx()).unwrap_err().code,
            404
        );
        let g = s
            .create(
                &cms,
                "default",
                json!({"metadata": {"generateName": "x-"}}),
                &ctx(),
            )
            .expect("generateName");
        let gname = meta(&g, "name").unwrap_or_default();
        assert!(gname.starts_with("x-") && gname.len() == 7, "{gname}");
        let mut stale = a.clone();
        stale["data"]["a"] = json!("2");
        let updated = s
            .update(&cms, "default", "a", stale.clone(), Part::Main, &ctx())
            .expect("update");
        assert_ne!(
            meta(&updated, "resourceVersion"),
            meta(&a, "resourceVersion")
        );
        let err = s
            .update(&cms, "default", "a", stale, Part::Main, &ctx())
            .unwrap_err();
        assert_eq!((err.code, err.reason), (409, "Conflict"));
        // A no-op write keeps the resourceVersion.
        let again = s
            .update(&cms, "default", "a", updated.clone(), Part::Main, &ctx())
            .expect("no-op");
        assert_eq!(
            meta(&again, "resourceVersion"),
            meta(&updated, "resourceVersion")
        );
    }

    #[test]
    fn generation_and_status_subresource() {
        let store = Store::new(100);
        let mut s = store.lock();
        let deps = res(&s, "deployments");
        let d = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
            "spec": {"replicas": 1}, "status": {"replicas": 9}});
        let d = s.create(&deps, "default", d, &ctx()).expect("create");
        assert_eq!(d["metadata"]["generation"], 1);
        assert!(d.get("status").is_none(), "status is not taken on create");
        let mut labelled = d.clone();
        labelled["metadata"]["labels"] = json!({"a": "b"});
        labelled["status"] = json!({"replicas": 3});
        let l = s
            .update(&deps, "default", "d", labelled, Part::Main, &ctx())
            .expect("labels");
        assert_eq!(
            l["metadata"]["generation"], 1,
            "metadata does not bump generation"
        );
        assert!(
            l.get("status").is_none(),
            "status ignored on the main resource"
        );
        let mut st = l.clone();
        st["status"] = json!({"replicas": 3});
        st["spec"]["replicas"] = json!(5);
        let st = s
            .update(&deps, "default", "d", st, Part::Status, &ctx())
            .expect("status");
        assert_eq!(st["status"]["replicas"], 3);
        assert_eq!(st["spec"]["replicas"], 1, "spec ignored on /status");
        let mut sp = st.clone();
        sp["spec"]["replicas"] = json!(2);
        let sp = s
            .update(&deps, "default", "d", sp, Part::Main, &ctx())
            .expect("spec");
        assert_eq!(sp["metadata"]["generation"], 2);
    }

    #[test]
    fn finalizers_hold_deletion() {
        let store = Store::new(100);
        let mut s = store.lock();
        let cms = res(&s, "configmaps");
        let mut o = cm("f");
        o["metadata"]["finalizers"] = json!(["example.com/hold"]);
        s.create(&cms, "default", o, &ctx()).expect("create");
        let (held, gone) = s
            .delete(
                &cms,
                "default",
                "f",
                Propagation::Background,
                None,
                None,
                "t",
            )
            .expect("delete");
        assert!(!gone);
        assert_eq!(held["metadata"]["deletionTimestamp"], "t");
        let mut released = held.clone();
        released["metadata"]["finalizers"] = json!([]);
        s.update(&cms, "default", "f", released, Part::Main, &ctx())
            .expect("release");
        assert_eq!(s.get(&cms, "default", "f").unwrap_err().code, 404);
    }

    fn owned(name: &str, owner: &Value, block: bool) -> Value {
        let mut o = cm(name);
        o["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap",
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"], "blockOwnerDeletion": block}]);
        o
    }

    #[test]
    fn garbage_collection_policies() {
        let store = Store::new(1000);
        let mut s = store.lock();
        let cms = res(&s, "configmaps");
        let del = |s: &mut Inner, n: &str, p| s.delete(&cms, "default", n, p, None, None, "t");
        // Background: the dependent (and its dependent) go with the owner.
        let owner = s
            .create(&cms, "default", cm("owner"), &ctx())
            .expect("owner");
        let child = s
            .create(&cms, "default", owned("child", &owner, false), &ctx())
            .expect("child");
        s.create(&cms, "default", owned("grandchild", &child, false), &ctx())
            .expect("gc");
        del(&mut s, "owner", Propagation::Background).expect("delete");
        assert!(s.get(&cms, "default", "child").is_err());
        assert!(s.get(&cms, "default", "grandchild").is_err());
        // Orphan: the dependent stays without the reference.
        let owner = s
            .create(&cms, "default", cm("owner"), &ctx())
            .expect("owner");
        s.create(&cms, "default", owned("child", &owner, false), &ctx())
            .expect("child");
        del(&mut s, "owner", Propagation::Orphan).expect("delete");
        let c = s.get(&cms, "default", "child").expect("orphan stays");
        assert!(c["metadata"].get("ownerReferences").is_none());
        // Foreground: the owner waits for a blocking dependent's finalizer.
        let owner = s.create(&cms, "default", cm("fg"), &ctx()).expect("owner");
        let mut blocker = owned("blocker", &owner, true);
        blocker["metadata"]["finalizers"] = json!(["hold"]);
        s.create(&cms, "default", blocker, &ctx()).expect("blocker");
        let (o, gone) = del(&mut s, "fg", Propagation::Foreground).expect("delete");
        assert!(!gone);
        assert_eq!(o["metadata"]["finalizers"], json!([FOREGROUND]));
        let mut b = s.get(&cms, "default", "blocker").expect("blocker");
        assert!(b["metadata"]["deletionTimestamp"].is_string());
        b["metadata"]["finalizers"] = json!([]);
        s.update(&cms, "default", "blocker", b, Part::Main, &ctx())
            .expect("release");
        assert!(
            s.get(&cms, "default", "fg").is_err(),
            "owner goes after its blocker"
        );
    }

    #[test]
    fn services_get_cluster_ips() {
        let store = Store::new(100);
        let mut s = store.lock();
        let svcs = res(&s, "services");
        let svc =
            |name: &str| json!({"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}});
        let a = s.create(&svcs, "default", svc("a"), &ctx()).expect("a");
        let b = s.create(&svcs, "default", svc("b"), &ctx()).expect("b");
        assert_eq!(a["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(b["spec"]["clusterIP"], "10.96.0.2");
        let mut headless = svc("h");
        headless["spec"]["clusterIP"] = json!("None");
        let h = s.create(&svcs, "default", headless, &ctx()).expect("h");
        assert_eq!(h["spec"]["clusterIP"], "None");
    }

    #[test]
    fn dangling_owner_references_are_collected() {
        let store = Store::new(100);
        let mut s = store.lock();
        let cms = res(&s, "configmaps");
        let mut o = cm("late-child");
        o["metadata"]["ownerReferences"] = json!([{"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "no-such-uid"}]);
        s.create(&cms, "default", o, &ctx()).expect("create");
        assert!(s.get(&cms, "default", "late-child").is_err());
    }

    #[test]
    fn namespace_deletion_takes_contents() {
        let store = Store::new(1000);
        let mut s = store.lock();
        let nss = res(&s, "namespaces");
        let cms = res(&s, "configmaps");
        s.create(&nss, "", json!({"metadata": {"name": "team"}}), &ctx())
            .expect("ns");
        s.create(&cms, "team", cm("a"), &ctx()).expect("cm");
        let (_, gone) = s
            .delete(&nss, "", "team", Propagation::Background, None, None, "t")
            .expect("delete");
        assert!(gone);
        assert!(s.get(&cms, "team", "a").is_err());
    }

    #[test]
    fn history_is_bounded_and_expires() {
        let store = Store::new(3);
        let mut s = store.lock();
        let cms = res(&s, "configmaps");
        let start = s.resource_version();
        for i in 0..5 {
            s.create(&cms, "default", cm(&format!("c{i}")), &ctx())
                .expect("create");
        }
        let err = s.events_since(start, "configmaps").unwrap_err();
        assert_eq!((err.code, err.reason), (410, "Expired"));
        let recent = s
            .events_since(s.resource_version() - 2, "configmaps")
            .expect("recent");
        assert_eq!(recent.len(), 2);
        assert!(recent.iter().all(|e| e.kind == EventType::Added));
    }

    #[test]
    fn list_pages_and_selects() {
        let store = Store::new(100);
        let mut s = store.lock();
        let cms = res(&s, "configmaps");
        for i in 0..5 {
            let mut o = cm(&format!("c{i}"));
            o["metadata"]["labels"] = json!({"even": (i % 2 == 0).to_string()});
            s.create(&cms, "default", o, &ctx()).expect("create");
        }
        let f = ListFilter::default();
        let (page, token) = s.list(&cms, &f, Some(2), None).expect("page 1");
        assert_eq!(page.len(), 2);
        let (rest, end) = s
            .list(&cms, &f, Some(10), token.as_deref())
            .expect("page 2");
        assert_eq!((rest.len(), end), (3, None));
        let even = ListFilter {
            labels: LabelSelector::parse("even=true").expect("selector"),
            ..Default::default()
        };
        assert_eq!(s.list(&cms, &even, None, None).expect("list").0.len(), 3);
    }
}
