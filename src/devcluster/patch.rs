//! The three PATCH formats of the Kubernetes API, as pure functions on JSON values:
//! JSON merge patch (RFC 7386, `application/merge-patch+json`), JSON patch (RFC 6902,
//! `application/json-patch+json`) and strategic merge patch
//! (`application/strategic-merge-patch+json`, built-in kinds only).
//!
//! This module owns the patch semantics and the patchMergeKey table of the built-in kinds
//! ([`builtin_list_keys`], shared with server-side apply); the HTTP handler (content types,
//! 415 for a strategic merge patch of a custom resource, preconditions, storing) is the API
//! server's. Nothing here panics on any input: a patch that cannot apply is a [`PatchError`]
//! that names where.
//!
//! The strategic merge patch follows apimachinery's `strategicpatch` (checked against its test
//! vectors), with three choices of ours: `$patch: merge` is accepted (upstream refuses it; it
//! is what merging does anyway), nulls inside a new value are dropped (upstream leaves them
//! to its typed decoding, which this server does not have), and maps with
//! `patchStrategy: replace` are not modelled (no common built-in has one).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

/// A patch that cannot be applied; the message names the operation or field path.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, PatchError> {
    Err(PatchError(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// RFC 7386
// ---------------------------------------------------------------------------------------------

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes, anything else
/// (arrays included) replaces.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(patch) = patch else {
        return patch.clone();
    };
    let mut out = match target {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in patch {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = merge_patch(out.get(k).unwrap_or(&Value::Null), v);
            out.insert(k.clone(), merged);
        }
    }
    Value::Object(out)
}

// ---------------------------------------------------------------------------------------------
// RFC 6902
// ---------------------------------------------------------------------------------------------

/// RFC 6902 JSON patch: `add`, `remove`, `replace`, `move`, `copy`, `test` with RFC 6901
/// pointers (`~0` is `~`, `~1` is `/`, `-` appends to an array). All or nothing: on any
/// failing operation the error names it (index, op, path) and no result is returned.
pub fn json_patch(target: &Value, ops: &Value) -> Result<Value, PatchError> {
    let Value::Array(ops) = ops else {
        return err("a JSON patch must be an array of operations");
    };
    let mut doc = target.clone();
    for (i, op) in ops.iter().enumerate() {
        apply_op(&mut doc, op).map_err(|e| PatchError(format!("operation {i}: {}", e.0)))?;
    }
    Ok(doc)
}

fn apply_op(doc: &mut Value, op: &Value) -> Result<(), PatchError> {
    let Value::Object(op) = op else {
        return err("not an object");
    };
    let name = str_member(op, "op")?;
    let path = str_member(op, "path")?;
    let at = |e: PatchError| PatchError(format!("{name} {path:?}: {}", e.0));
    let tokens = parse_pointer(path).map_err(at)?;
    let value = || {
        op.get("value")
            .cloned()
            .ok_or_else(|| PatchError(format!("{name} {path:?}: missing \"value\"")))
    };
    let from = || -> Result<Vec<String>, PatchError> {
        let from = str_member(op, "from").map_err(at)?;
        parse_pointer(from).map_err(|e| PatchError(format!("{name} from {from:?}: {}", e.0)))
    };
    match name {
        "add" => add(doc, &tokens, value()?).map_err(at),
        "remove" => remove(doc, &tokens).map(drop).map_err(at),
        "replace" => {
            let v = value()?;
            *get_mut(doc, &tokens).map_err(at)? = v;
            Ok(())
        }
        "move" => {
            let from = from()?;
            if from == tokens {
                // Moving a value onto itself is a no-op, but the location must exist.
                return get_mut(doc, &from).map(drop).map_err(at);
            }
            if tokens.len() > from.len() && tokens[..from.len()] == from[..] {
                return Err(at(PatchError(
                    "cannot move a value into one of its children".into(),
                )));
            }
            let v = remove(doc, &from).map_err(at)?;
            add(doc, &tokens, v).map_err(at)
        }
        "copy" => {
            let from = from()?;
            let v = get_mut(doc, &from).map_err(at)?.clone();
            add(doc, &tokens, v).map_err(at)
        }
        "test" => {
            let expected = value()?;
            // As the API server's json-patch library: a missing member tests equal to null,
            // which kube-runtime's finalizer helper relies on (`test /metadata/finalizers null`).
            if expected.is_null()
                && let Some((last, parent)) = tokens.split_last()
                && let Value::Object(m) = get_mut(doc, parent).map_err(at)?
                && !m.contains_key(last)
            {
                return Ok(());
            }
            let actual = get_mut(doc, &tokens).map_err(at)?;
            if json_equal(actual, &expected) {
                Ok(())
            } else {
                Err(at(PatchError(format!(
                    "test failed: value is {actual}, expected {expected}"
                ))))
            }
        }
        other => err(format!("unknown op {other:?}")),
    }
}

fn str_member<'a>(op: &'a Map<String, Value>, key: &str) -> Result<&'a str, PatchError> {
    match op.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => err(format!("\"{key}\" must be a string")),
        None => err(format!("missing \"{key}\"")),
    }
}

/// RFC 6901: "" is the whole document; otherwise "/"-separated reference tokens.
fn parse_pointer(p: &str) -> Result<Vec<String>, PatchError> {
    if p.is_empty() {
        return Ok(vec![]);
    }
    let Some(rest) = p.strip_prefix('/') else {
        return err("a JSON pointer must be empty or start with \"/\"");
    };
    rest.split('/')
        .map(|t| {
            let mut out = String::with_capacity(t.len());
            let mut chars = t.chars();
            while let Some(c) = chars.next() {
                if c != '~' {
                    out.push(c);
                    continue;
                }
                match chars.next() {
                    Some('0') => out.push('~'),
                    Some('1') => out.push('/'),
                    _ => return err(format!("bad escape in JSON pointer token {t:?}")),
                }
            }
            Ok(out)
        })
        .collect()
}

/// An array index token: decimal without leading zeros (RFC 6901 §4).
fn array_index(token: &str, len: usize, allow_end: bool) -> Result<usize, PatchError> {
    if allow_end && token == "-" {
        return Ok(len);
    }
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_digit())
        && (token == "0" || !token.starts_with('0'));
    let i = if valid {
        token.parse::<usize>().ok()
    } else {
        None
    };
    match i {
        Some(i) if i < len || (allow_end && i == len) => Ok(i),
        Some(i) => err(format!("index {i} is out of bounds (length {len})")),
        None => err(format!("{token:?} is not an array index")),
    }
}

fn get_mut<'a>(doc: &'a mut Value, tokens: &[String]) -> Result<&'a mut Value, PatchError> {
    let mut cur = doc;
    for t in tokens {
        cur = match cur {
            Value::Object(m) => match m.get_mut(t) {
                Some(v) => v,
                None => return err(format!("no member {t:?}")),
            },
            Value::Array(a) => {
                let i = array_index(t, a.len(), false)?;
                &mut a[i]
            }
            _ => return err(format!("cannot descend into a scalar at {t:?}")),
        };
    }
    Ok(cur)
}

fn add(doc: &mut Value, tokens: &[String], v: Value) -> Result<(), PatchError> {
    let Some((last, parent)) = tokens.split_last() else {
        *doc = v;
        return Ok(());
    };
    match get_mut(doc, parent)? {
        Value::Object(m) => {
            m.insert(last.clone(), v);
            Ok(())
        }
        Value::Array(a) => {
            let i = array_index(last, a.len(), true)?;
            a.insert(i, v);
            Ok(())
        }
        _ => err("the parent of the target is not an object or array"),
    }
}

fn remove(doc: &mut Value, tokens: &[String]) -> Result<Value, PatchError> {
    let Some((last, parent)) = tokens.split_last() else {
        return err("cannot remove the whole document");
    };
    match get_mut(doc, parent)? {
        Value::Object(m) => m
            .remove(last)
            .ok_or_else(|| PatchError(format!("no member {last:?}"))),
        Value::Array(a) => {
            let i = array_index(last, a.len(), false)?;
            Ok(a.remove(i))
        }
        _ => err("the parent of the target is not an object or array"),
    }
}

/// RFC 6902 §4.6 equality: numbers by value (1 equals 1.0), objects regardless of member order.
fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y)) if x == y)
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_equal(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

// ---------------------------------------------------------------------------------------------
// The patchMergeKey table of the built-in kinds
// ---------------------------------------------------------------------------------------------

/// API groups served by the API server itself (not by CRDs). Gateway API and friends use
/// `*.k8s.io` groups too but are CRDs, hence a list rather than a suffix test.
const BUILTIN_GROUPS: &[&str] = &[
    "",
    "admissionregistration.k8s.io",
    "apiextensions.k8s.io",
    "apiregistration.k8s.io",
    "apps",
    "authentication.k8s.io",
    "authorization.k8s.io",
    "autoscaling",
    "batch",
    "certificates.k8s.io",
    "coordination.k8s.io",
    "discovery.k8s.io",
    "events.k8s.io",
    "flowcontrol.apiserver.k8s.io",
    "internal.apiserver.k8s.io",
    "networking.k8s.io",
    "node.k8s.io",
    "policy",
    "rbac.authorization.k8s.io",
    "resource.k8s.io",
    "scheduling.k8s.io",
    "storage.k8s.io",
    "storagemigration.k8s.io",
];

fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}

/// Whether `application/strategic-merge-patch+json` applies to this kind: only to kinds the
/// API server has Go types for. For custom resources the real API server answers
/// 415 Unsupported Media Type, and the local one should too (check this before calling
/// [`strategic_merge_patch`], which falls back to a JSON merge patch).
pub fn smp_supported(api_version: &str, _kind: &str) -> bool {
    BUILTIN_GROUPS.contains(&group_of(api_version))
}

/// The list semantics of the field at `path` (field names from the object's root; list items
/// are not part of the path, so a container's env is
/// `["spec","template","spec","containers","env"]`), from the `patchMergeKey` /
/// `listType` markers of the built-in Go types:
///
/// - `Some(keys)` with keys: an associative list, items identified by these fields
///   (strategic merge patch uses the first as its merge key);
/// - `Some([])`: a set of scalars (`patchStrategy: merge` without a key, `listType=set`);
/// - `None`: an atomic list, replaced whole (tolerations, command, args, …; every list of a
///   custom resource except `metadata`'s, as this server has no CRD list-type markers).
///
/// Keys are the patchMergeKey alone (e.g. containerPort, not containerPort+protocol), since
/// this server does not default `protocol`.
pub fn builtin_list_keys(api_version: &str, kind: &str, path: &[String]) -> Option<Vec<String>> {
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    // ObjectMeta is the same in every kind, custom resources included.
    if let ["metadata", rest @ ..] = &p[..] {
        return object_meta_list(rest).map(owned);
    }
    if !smp_supported(api_version, kind) {
        return None;
    }
    let group = group_of(api_version);
    for prefix in pod_spec_prefixes(group, kind) {
        if p.len() > prefix.len() && p[..prefix.len()] == prefix[..] {
            return pod_spec_list(&p[prefix.len()..]).map(owned);
        }
        // The pod template's own ObjectMeta sits beside its spec.
        let meta = prefix.len() - 1;
        if p.len() > prefix.len() && p[..meta] == prefix[..meta] && p[meta] == "metadata" {
            return object_meta_list(&p[meta + 1..]).map(owned);
        }
    }
    let k: &[&str] = match (group, kind, &p[..]) {
        ("", "Service", ["spec", "ports"]) => &["port"],
        ("", "Pod", ["status", "podIPs" | "hostIPs"]) => &["ip"],
        ("", "Node", ["status", "addresses"]) => &["type"],
        ("", "Node", ["spec", "podCIDRs"]) => &[],
        ("", "ServiceAccount", ["secrets"]) => &["name"],
        (
            "admissionregistration.k8s.io",
            "MutatingWebhookConfiguration" | "ValidatingWebhookConfiguration",
            ["webhooks"],
        ) => &["name"],
        (_, _, ["status", "conditions"]) => &["type"],
        _ => return None,
    };
    Some(owned(k))
}

fn owned(keys: &[&str]) -> Vec<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

fn object_meta_list(rest: &[&str]) -> Option<&'static [&'static str]> {
    match rest {
        ["finalizers"] => Some(&[]),
        ["ownerReferences"] => Some(&["uid"]),
        _ => None,
    }
}

/// Where a PodSpec sits in each kind that has one.
fn pod_spec_prefixes(group: &str, kind: &str) -> &'static [&'static [&'static str]] {
    match (group, kind) {
        ("", "Pod") => &[&["spec"]],
        ("", "PodTemplate") => &[&["template", "spec"]],
        ("", "ReplicationController")
        | ("apps", "Deployment" | "ReplicaSet" | "StatefulSet" | "DaemonSet")
        | ("batch", "Job") => &[&["spec", "template", "spec"]],
        ("batch", "CronJob") => &[&["spec", "jobTemplate", "spec", "template", "spec"]],
        _ => &[],
    }
}

fn pod_spec_list(rest: &[&str]) -> Option<&'static [&'static str]> {
    const CONTAINERS: [&str; 3] = ["containers", "initContainers", "ephemeralContainers"];
    match rest {
        [c] if CONTAINERS.contains(c) => Some(&["name"]),
        ["volumes" | "imagePullSecrets" | "schedulingGates" | "resourceClaims"] => Some(&["name"]),
        ["hostAliases"] => Some(&["ip"]),
        ["topologySpreadConstraints"] => Some(&["topologyKey"]),
        [c, field] if CONTAINERS.contains(c) => match *field {
            "ports" => Some(&["containerPort"]),
            "env" => Some(&["name"]),
            "volumeMounts" => Some(&["mountPath"]),
            "volumeDevices" => Some(&["devicePath"]),
            _ => None,
        },
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Strategic merge patch
// ---------------------------------------------------------------------------------------------

const DIRECTIVE: &str = "$patch";
const RETAIN_KEYS: &str = "$retainKeys";
const SET_ELEMENT_ORDER: &str = "$setElementOrder/";
const DELETE_FROM_PRIMITIVE_LIST: &str = "$deleteFromPrimitiveList/";

/// Strategic merge patch, as the API server applies it (`MergeParallelList` and
/// `IgnoreUnmatchedNulls` on, as for a PATCH request):
///
/// - maps merge recursively; `null` deletes; `$patch: replace` replaces the map with the rest
///   of the patch map, `$patch: delete` empties it (removes it when it is new), `$patch: merge`
///   is the default; `$retainKeys: [..]` drops the original's other keys;
/// - lists with a merge key ([`builtin_list_keys`]) merge item by item; an item
///   `{<key>: v, $patch: delete}` deletes, an item `{$patch: replace}` makes the list the
///   patch's items; lists of scalars with `patchStrategy: merge` (finalizers) are merged as
///   sets and `$deleteFromPrimitiveList/<list>: [..]` removes values; every other list is
///   replaced; `$setElementOrder/<list>` orders the merged list;
/// - order as upstream: patch items (in the patch's order) merge with the original's other
///   items in the original's order, new items first.
///
/// For kinds without Go types (custom resources, see [`smp_supported`]) this is
/// [`merge_patch`]: the real API server refuses the content type with 415 instead.
pub fn strategic_merge_patch(
    target: &Value,
    patch: &Value,
    api_version: &str,
    kind: &str,
) -> Result<Value, PatchError> {
    if !smp_supported(api_version, kind) {
        return Ok(merge_patch(target, patch));
    }
    let Value::Object(patch) = patch else {
        return err("a strategic merge patch must be a JSON object");
    };
    let original = match target {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        _ => return err("the patched object is not a JSON object"),
    };
    if patch.get(DIRECTIVE).and_then(Value::as_str) == Some("delete") {
        return err("$patch: delete cannot delete the whole object");
    }
    let list_keys = |path: &[String]| builtin_list_keys(api_version, kind, path);
    let smp = Smp {
        list_keys: &list_keys,
    };
    smp.merge_map(original, patch.clone(), &mut Vec::new())
        .map(Value::Object)
}

struct Smp<'a> {
    /// The list semantics by field path, as [`builtin_list_keys`].
    list_keys: &'a dyn Fn(&[String]) -> Option<Vec<String>>,
}

/// How a list field merges.
enum ListMerge {
    /// Items are maps identified by this field.
    ByKey(String),
    /// Items are scalars, merged as a set.
    Primitive,
    /// Replaced whole.
    Replace,
}

fn at(path: &[String]) -> String {
    if path.is_empty() {
        ".".into()
    } else {
        path.iter().map(|p| format!(".{p}")).collect()
    }
}

impl Smp<'_> {
    fn list_merge(&self, path: &[String]) -> ListMerge {
        match (self.list_keys)(path) {
            Some(keys) => match keys.into_iter().next() {
                Some(k) => ListMerge::ByKey(k),
                None => ListMerge::Primitive,
            },
            None => ListMerge::Replace,
        }
    }

    fn merge_map(
        &self,
        mut original: Map<String, Value>,
        mut patch: Map<String, Value>,
        path: &mut Vec<String>,
    ) -> Result<Map<String, Value>, PatchError> {
        if let Some(d) = patch.remove(DIRECTIVE) {
            match d.as_str() {
                Some("replace") => return Ok(remove_directives_map(patch)),
                Some("delete") => return Ok(Map::new()),
                // Upstream rejects `merge` in a map; it is what merging does anyway.
                Some("merge") => {}
                _ => return err(format!("{}: unknown $patch directive {d}", at(path))),
            }
        }
        if let Some(retain) = patch.remove(RETAIN_KEYS) {
            let Value::Array(retain) = retain else {
                return err(format!("{}: $retainKeys must be a list", at(path)));
            };
            let retained = |k: &str| retain.iter().any(|r| r.as_str() == Some(k));
            for (k, v) in &patch {
                if !v.is_null()
                    && !k.starts_with(DELETE_FROM_PRIMITIVE_LIST)
                    && !k.starts_with(SET_ELEMENT_ORDER)
                    && !retained(k)
                {
                    return err(format!(
                        "{}: {k:?} is patched but not in $retainKeys",
                        at(path)
                    ));
                }
            }
            original.retain(|k, _| retained(k));
        }

        // `$setElementOrder/<list>`: merge that list now and order it.
        let orders: Vec<String> = patch
            .keys()
            .filter(|k| k.starts_with(SET_ELEMENT_ORDER))
            .cloned()
            .collect();
        for key in orders {
            let order = patch.remove(&key).unwrap_or(Value::Null);
            let name = &key[SET_ELEMENT_ORDER.len()..];
            let Value::Array(order) = order else {
                return err(format!("{}: {key} must be a list", at(path)));
            };
            path.push(name.to_string());
            let merged = self.set_element_order(&mut original, &mut patch, name, &order, path);
            path.pop();
            if let Some(merged) = merged? {
                original.insert(name.to_string(), Value::Array(merged));
            }
        }

        for (k, patch_v) in patch {
            let (k, delete_list) = match k.strip_prefix(DELETE_FROM_PRIMITIVE_LIST) {
                Some(name) => (name.to_string(), true),
                None if k.starts_with('$') => {
                    return err(format!("{}: unknown directive {k:?}", at(path)));
                }
                None => (k, false),
            };
            if patch_v.is_null() {
                if !delete_list {
                    original.remove(&k);
                }
                continue;
            }
            path.push(k.clone());
            let result = self.merge_field(original.remove(&k), patch_v, delete_list, path);
            path.pop();
            if let Some(v) = result? {
                original.insert(k, v);
            }
        }
        Ok(original)
    }

    /// The new value of one field (None: the field is absent afterwards).
    fn merge_field(
        &self,
        original: Option<Value>,
        patch: Value,
        delete_list: bool,
        path: &mut Vec<String>,
    ) -> Result<Option<Value>, PatchError> {
        if delete_list {
            let Value::Array(to_delete) = patch else {
                return err(format!(
                    "{}: $deleteFromPrimitiveList must be a list",
                    at(path)
                ));
            };
            return Ok(original.map(|o| match o {
                Value::Array(items) => Value::Array(
                    items
                        .into_iter()
                        .filter(|v| !to_delete.contains(v))
                        .collect(),
                ),
                other => other,
            }));
        }
        match (original, patch) {
            (Some(Value::Object(o)), Value::Object(p)) => {
                self.merge_map(o, p, path).map(|m| Some(Value::Object(m)))
            }
            (Some(Value::Array(o)), Value::Array(p)) => {
                self.merge_list(o, p, path).map(|l| Some(Value::Array(l)))
            }
            // New or of another type: the patch value, without directives or nulls.
            (_, p) => Ok(remove_directives(p)),
        }
    }

    fn merge_list(
        &self,
        original: Vec<Value>,
        patch: Vec<Value>,
        path: &mut Vec<String>,
    ) -> Result<Vec<Value>, PatchError> {
        match self.list_merge(path) {
            ListMerge::Replace => Ok(remove_directives_list(patch)),
            ListMerge::Primitive => {
                if let Some(bad) = original.iter().chain(&patch).find(|v| v.is_object()) {
                    return err(format!(
                        "{}: a list of scalars contains the object {bad}",
                        at(path)
                    ));
                }
                let mut seen = HashSet::with_capacity(original.len() + patch.len());
                let merged: Vec<Value> = original
                    .iter()
                    .chain(&patch)
                    .filter(|v| seen.insert(v.to_string()))
                    .cloned()
                    .collect();
                Ok(normalize_order(merged, &patch, &original, None))
            }
            ListMerge::ByKey(key) => {
                let (mut items, patch_items) =
                    split_special_items(original.clone(), patch, &key, path)?;
                // Where each key value first sits; items are only appended, so positions hold.
                let mut slot: HashMap<String, usize> = HashMap::with_capacity(items.len());
                for (i, o) in items.iter().enumerate() {
                    if let Some(kv) = o.get(&key) {
                        slot.entry(kv.to_string()).or_insert(i);
                    }
                }
                for p in &patch_items {
                    let kv = key_of(p, &key, path)?.to_string();
                    match slot.get(&kv).copied() {
                        Some(i) => {
                            let Value::Object(o) = std::mem::take(&mut items[i]) else {
                                return err(format!("{}: an item is not an object", at(path)));
                            };
                            let Value::Object(p) = p.clone() else {
                                return err(format!("{}: an item is not an object", at(path)));
                            };
                            items[i] = Value::Object(self.merge_map(o, p, path)?);
                        }
                        None => {
                            if let Some(v) = remove_directives(p.clone()) {
                                slot.insert(kv, items.len());
                                items.push(v);
                            }
                        }
                    }
                }
                Ok(normalize_order(
                    items,
                    &patch_items,
                    &original,
                    Some(key.as_str()),
                ))
            }
        }
    }

    /// Merges `name` (when the patch or original has it) and orders the result by `order`;
    /// None: neither has the list.
    fn set_element_order(
        &self,
        original: &mut Map<String, Value>,
        patch: &mut Map<String, Value>,
        name: &str,
        order: &[Value],
        path: &mut Vec<String>,
    ) -> Result<Option<Vec<Value>>, PatchError> {
        let as_list = |v: Value| match v {
            Value::Array(a) => Ok(a),
            _ => err(format!("{}: not a list", at(path))),
        };
        let orig = original.remove(name).map(as_list).transpose()?;
        let patch_list = patch.remove(name).map(as_list).transpose()?;
        let key = match self.list_merge(path) {
            ListMerge::ByKey(k) => Some(k),
            _ => None,
        };
        if let Some(p) = &patch_list {
            check_order(p, order, key.as_deref(), path)?;
        }
        let server_order = match (&orig, &patch_list, &key) {
            (Some(o), Some(p), Some(k)) => server_order_after_merge(o, p, k),
            (Some(o), _, _) => o.clone(),
            (None, _, _) => Vec::new(),
        };
        let merged = match (&orig, patch_list) {
            (None, None) => return Ok(None),
            (Some(o), None) => o.clone(),
            (None, Some(p)) => remove_directives_list(p),
            (Some(o), Some(p)) => self.merge_list(o.clone(), p, path)?,
        };
        if let Some(k) = &key {
            for o in order {
                key_of(o, k, path)?;
            }
        }
        Ok(Some(normalize_order(
            merged,
            order,
            &server_order,
            key.as_deref(),
        )))
    }
}

/// The patch's items must come in `$setElementOrder`'s order (upstream's
/// validatePatchWithSetOrderList): a client that sends both computed them together.
fn check_order(
    patch: &[Value],
    order: &[Value],
    key: Option<&str>,
    path: &[String],
) -> Result<(), PatchError> {
    let is_delete =
        |v: &Value| key.is_some() && v.get(DIRECTIVE).and_then(Value::as_str) == Some("delete");
    let items: Vec<&Value> = patch.iter().filter(|v| !is_delete(v)).collect();
    let (mut pi, mut oi) = (0, 0);
    while pi < items.len() && oi < order.len() {
        if items[pi].get(DIRECTIVE).is_some() {
            pi += 1;
            continue;
        }
        let same = match key {
            Some(k) => key_of(items[pi], k, path)? == key_of(&order[oi], k, path)?,
            None => items[pi] == &order[oi],
        };
        if same {
            pi += 1;
        }
        oi += 1;
    }
    if pi < items.len() && !order.is_empty() {
        return err(format!(
            "{}: the patch's items are not in the order of $setElementOrder",
            at(path)
        ));
    }
    Ok(())
}

/// The order `$setElementOrder` falls back on for the items it does not name. Upstream
/// takes the original list after its merge has rewritten it in place (Go slices share their
/// array): deleted items shift the rest left, new items fill the freed slots up to the
/// original length. kubectl's client-side apply sends exactly such patches (delete one
/// container, add another), so this decides where items land on a real cluster.
fn server_order_after_merge(original: &[Value], patch: &[Value], key: &str) -> Vec<Value> {
    let mut slots = original.to_vec();
    let mut len = slots.len();
    let directive = |item: &Value| {
        item.get(DIRECTIVE)
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let mut replace = false;
    for item in patch {
        match directive(item).as_deref() {
            Some("delete") => {
                let Some(kv) = item.get(key) else { continue };
                while let Some(i) = slots[..len].iter().position(|o| o.get(key) == Some(kv)) {
                    // As `append(s[:i], s[i+1:]...)`: the last slot keeps its old value.
                    for j in i..len - 1 {
                        slots[j] = slots[j + 1].clone();
                    }
                    len -= 1;
                }
            }
            Some("replace") => replace = true,
            _ => {}
        }
    }
    if replace {
        return slots;
    }
    for item in patch.iter().filter(|i| directive(i).is_none()) {
        let Some(kv) = item.get(key) else { continue };
        if slots[..len].iter().any(|o| o.get(key) == Some(kv)) {
            continue;
        }
        if len == slots.len() {
            // The append outgrows the array: later appends no longer touch the original.
            break;
        }
        slots[len] = item.clone();
        len += 1;
    }
    slots
}

/// The merge key's value of a list item.
fn key_of<'v>(item: &'v Value, key: &str, path: &[String]) -> Result<&'v Value, PatchError> {
    match item.get(key) {
        Some(v) => Ok(v),
        None if item.is_object() => err(format!(
            "{}: an item has no merge key {key:?}: {item}",
            at(path)
        )),
        None => err(format!("{}: an item is not an object: {item}", at(path))),
    }
}

/// Applies the `$patch` items of a keyed list: `delete` removes the original's matching items,
/// `replace` drops the original. Returns (original, the patch's plain items).
fn split_special_items(
    mut original: Vec<Value>,
    patch: Vec<Value>,
    key: &str,
    path: &[String],
) -> Result<(Vec<Value>, Vec<Value>), PatchError> {
    let mut plain = Vec::with_capacity(patch.len());
    let mut replace = false;
    for item in patch {
        let Value::Object(m) = &item else {
            return err(format!("{}: an item is not an object: {item}", at(path)));
        };
        match m.get(DIRECTIVE).map(|d| d.as_str()) {
            None => plain.push(item),
            Some(Some("delete")) => {
                let kv = key_of(&item, key, path)?;
                original.retain(|o| o.get(key) != Some(kv));
            }
            Some(Some("replace")) => replace = true,
            // Upstream refuses `merge` items; an item merges anyway.
            Some(Some("merge")) => {
                let mut m = m.clone();
                m.remove(DIRECTIVE);
                plain.push(Value::Object(m));
            }
            Some(_) => {
                return err(format!("{}: unknown $patch directive in {item}", at(path)));
            }
        }
    }
    if replace {
        original.clear();
    }
    Ok((original, plain))
}

/// Upstream's `normalizeElementOrder`: the items named by `order` come in that order, the
/// others in the original's order, interleaved where the original orders both; where it does
/// not (an item new to the list) the ordered item comes first.
fn normalize_order(
    merged: Vec<Value>,
    order: &[Value],
    original: &[Value],
    key: Option<&str>,
) -> Vec<Value> {
    // Items are compared by their merge key's value (or themselves), first occurrence wins.
    let id = |v: &Value| -> Option<String> {
        match key {
            Some(k) => v.get(k).map(Value::to_string),
            None => Some(v.to_string()),
        }
    };
    let positions = |list: &[Value]| {
        let mut at: HashMap<String, usize> = HashMap::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            if let Some(id) = id(v) {
                at.entry(id).or_insert(i);
            }
        }
        at
    };
    let (in_order, in_original) = (positions(order), positions(original));
    // (position in order, position in original, item)
    let tagged = merged.into_iter().map(|v| {
        let id = id(&v);
        let o = id.as_ref().and_then(|i| in_order.get(i).copied());
        let s = id.as_ref().and_then(|i| in_original.get(i).copied());
        (o, s, v)
    });
    let (mut ordered, mut rest): (Vec<_>, Vec<_>) = tagged.partition(|(o, _, _)| o.is_some());
    ordered.sort_by_key(|(o, _, _)| *o);
    rest.sort_by_key(|(_, s, _)| *s);
    let mut out = Vec::with_capacity(ordered.len() + rest.len());
    let (mut left, mut right) = (rest.into_iter().peekable(), ordered.into_iter().peekable());
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some((_, l, _)), Some((_, r, _))) => matches!((l, r), (Some(l), Some(r)) if l < r),
        };
        let next = if take_left { left.next() } else { right.next() };
        out.extend(next.map(|(_, _, v)| v));
    }
    out
}

/// A new value from a patch: directive maps vanish, the rest of the directives and the nulls
/// are dropped (upstream keeps a new value's nulls, which its typed decoding then drops).
fn remove_directives(v: Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Object(m) => {
            if m.contains_key(DIRECTIVE) {
                return None;
            }
            Some(Value::Object(remove_directives_map(m)))
        }
        Value::Array(a) => Some(Value::Array(remove_directives_list(a))),
        other => Some(other),
    }
}

fn remove_directives_map(m: Map<String, Value>) -> Map<String, Value> {
    m.into_iter()
        .filter(|(k, _)| !k.starts_with('$'))
        .filter_map(|(k, v)| remove_directives(v).map(|v| (k, v)))
        .collect()
}

fn remove_directives_list(a: Vec<Value>) -> Vec<Value> {
    a.into_iter()
        .filter(|v| !v.is_null())
        .filter_map(remove_directives)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, want) in cases {
            assert_eq!(merge_patch(&target, &patch), want, "{target} + {patch}");
        }
    }

    #[test]
    fn merge_patch_rfc7386_section_3_example() {
        let target = json!({
            "title": "Goodbye!",
            "author": {"givenName": "John", "familyName": "Doe"},
            "tags": ["example", "sample"],
            "content": "This will be unchanged"
        });
        let patch = json!({
            "title": "Hello!",
            "phoneNumber": "+01-123-456-7890",
            "author": {"familyName": null},
            "tags": ["example"]
        });
        assert_eq!(
            merge_patch(&target, &patch),
            json!({
                "title": "Hello!",
                "author": {"givenName": "John"},
                "tags": ["example"],
                "content": "This will be unchanged",
                "phoneNumber": "+01-123-456-7890"
            })
        );
    }

    fn jp(target: Value, ops: Value) -> Result<Value, PatchError> {
        json_patch(&target, &ops)
    }

    #[test]
    fn json_patch_rfc6902_appendix_a() {
        // A.1 – A.7, A.10, A.11, A.14, A.16: the result documents.
        let ok = [
            (
                json!({"foo":"bar"}),
                json!([{"op":"add","path":"/baz","value":"qux"}]),
                json!({"baz":"qux","foo":"bar"}),
            ),
            (
                json!({"foo":["bar","baz"]}),
                json!([{"op":"add","path":"/foo/1","value":"qux"}]),
                json!({"foo":["bar","qux","baz"]}),
            ),
            (
                json!({"baz":"qux","foo":"bar"}),
                json!([{"op":"remove","path":"/baz"}]),
                json!({"foo":"bar"}),
            ),
            (
                json!({"foo":["bar","qux","baz"]}),
                json!([{"op":"remove","path":"/foo/1"}]),
                json!({"foo":["bar","baz"]}),
            ),
            (
                json!({"baz":"qux","foo":"bar"}),
                json!([{"op":"replace","path":"/baz","value":"boo"}]),
                json!({"baz":"boo","foo":"bar"}),
            ),
            (
                json!({"foo":{"bar":"baz","waldo":"fred"},"qux":{"corge":"grault"}}),
                json!([{"op":"move","from":"/foo/waldo","path":"/qux/thud"}]),
                json!({"foo":{"bar":"baz"},"qux":{"corge":"grault","thud":"fred"}}),
            ),
            (
                json!({"foo":["all","grass","cows","eat"]}),
                json!([{"op":"move","from":"/foo/1","path":"/foo/3"}]),
                json!({"foo":["all","cows","eat","grass"]}),
            ),
            (
                json!({"baz":"qux","foo":["a",2,"c"]}),
                json!([{"op":"test","path":"/baz","value":"qux"},{"op":"test","path":"/foo/1","value":2}]),
                json!({"baz":"qux","foo":["a",2,"c"]}),
            ),
            (
                json!({"foo":"bar"}),
                json!([{"op":"add","path":"/child","value":{"grandchild":{}}}]),
                json!({"foo":"bar","child":{"grandchild":{}}}),
            ),
            (
                json!({"foo":"bar"}),
                json!([{"op":"add","path":"/baz","value":"qux","xyz":123}]),
                json!({"foo":"bar","baz":"qux"}),
            ),
            (
                json!({"/":9,"~1":10}),
                json!([{"op":"test","path":"/~01","value":10}]),
                json!({"/":9,"~1":10}),
            ),
            (
                json!({"foo":["bar"]}),
                json!([{"op":"add","path":"/foo/-","value":["abc","def"]}]),
                json!({"foo":["bar",["abc","def"]]}),
            ),
        ];
        for (target, ops, want) in ok {
            assert_eq!(
                jp(target.clone(), ops.clone()).unwrap(),
                want,
                "{target} + {ops}"
            );
        }
        // A.9, A.12, A.15: errors.
        let e = jp(
            json!({"baz":"qux","foo":["a",2,"c"]}),
            json!([{"op":"test","path":"/baz","value":"bar"}]),
        );
        assert!(e.unwrap_err().0.contains("test failed"));
        let e = jp(
            json!({"foo":"bar"}),
            json!([{"op":"add","path":"/baz/bat","value":"qux"}]),
        );
        assert!(e.unwrap_err().0.contains("/baz/bat"));
        assert!(
            jp(
                json!({"/":9,"~1":10}),
                json!([{"op":"test","path":"/~01","value":"10"}])
            )
            .is_err()
        );
    }

    #[test]
    fn json_patch_details() {
        // Root replacement, copy, numeric equality, all-or-nothing.
        assert_eq!(
            jp(json!({"a":1}), json!([{"op":"add","path":"","value":[1]}])).unwrap(),
            json!([1])
        );
        assert_eq!(
            jp(
                json!({"a":{"b":1}}),
                json!([{"op":"copy","from":"/a","path":"/c"}])
            )
            .unwrap(),
            json!({"a":{"b":1},"c":{"b":1}})
        );
        assert!(
            jp(
                json!({"a":1}),
                json!([{"op":"test","path":"/a","value":1.0}])
            )
            .is_ok()
        );
        let e = jp(
            json!({"a":1}),
            json!([{"op":"remove","path":"/a"},{"op":"remove","path":"/a"}]),
        );
        assert!(e.unwrap_err().0.starts_with("operation 1"));
        let bad = [
            json!({}),
            json!([1]),
            json!([{"op":"add","path":"/a"}]),
            json!([{"op":"nope","path":"/a"}]),
            json!([{"op":"add","path":"a","value":1}]),
            json!([{"op":"add","path":"/l/01","value":1}]),
            json!([{"op":"add","path":"/l/5","value":1}]),
            json!([{"op":"remove","path":"/l/-"}]),
            json!([{"op":"replace","path":"/x","value":1}]),
            json!([{"op":"remove","path":""}]),
            json!([{"op":"move","from":"/o","path":"/o/p"}]),
            json!([{"op":"add","path":"/a~2","value":1}]),
            json!([{"op":"add","path":"/s/x","value":1}]),
        ];
        for ops in bad {
            assert!(
                jp(json!({"l":[0],"o":{},"s":"str"}), ops.clone()).is_err(),
                "{ops}"
            );
        }
    }

    #[test]
    fn json_patch_kube_runtime_finalizer_patches() {
        // kube-runtime's finalizer(): add when there are none, then remove by index.
        let obj = json!({"metadata": {"name": "x"}});
        let add = json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["r4.dev/cleanup"]}
        ]);
        let with = jp(obj.clone(), add.clone()).unwrap();
        assert_eq!(with["metadata"]["finalizers"], json!(["r4.dev/cleanup"]));
        // The same patch again fails its test: someone added finalizers meanwhile.
        assert!(jp(with.clone(), add).is_err());
        let remove = json!([
            {"op": "test", "path": "/metadata/finalizers/0", "value": "r4.dev/cleanup"},
            {"op": "remove", "path": "/metadata/finalizers/0"}
        ]);
        assert_eq!(
            jp(with, remove).unwrap(),
            json!({"metadata": {"name": "x", "finalizers": []}})
        );
        // A missing parent is still an error.
        assert!(
            jp(
                obj,
                json!([{"op": "test", "path": "/spec/x", "value": null}])
            )
            .is_err()
        );
    }

    fn deployment() -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "patch-demo", "finalizers": ["a"]},
            "spec": {
                "replicas": 2,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "30%"}},
                "template": {"spec": {
                    "containers": [{"name": "patch-demo-ctr", "image": "nginx",
                                    "env": [{"name": "A", "value": "1"}]}],
                    "tolerations": [{"effect": "NoSchedule", "key": "dedicated", "value": "test-team"}]
                }}
            }
        })
    }

    fn smp(target: &Value, patch: Value) -> Result<Value, PatchError> {
        strategic_merge_patch(target, &patch, "apps/v1", "Deployment")
    }

    fn containers(v: &Value) -> &Value {
        &v["spec"]["template"]["spec"]["containers"]
    }

    #[test]
    fn smp_merges_containers_by_name_and_replaces_tolerations() {
        // kubectl docs, "Update API objects in place": the new container comes first.
        let out = smp(
            &deployment(),
            json!({"spec":{"template":{"spec":{
                "containers": [{"name": "patch-demo-ctr-2", "image": "redis"}],
                "tolerations": [{"effect": "NoSchedule", "key": "disktype", "value": "ssd"}]
            }}}}),
        )
        .unwrap();
        assert_eq!(
            containers(&out),
            &json!([
                {"name": "patch-demo-ctr-2", "image": "redis"},
                {"name": "patch-demo-ctr", "image": "nginx", "env": [{"name": "A", "value": "1"}]}
            ])
        );
        assert_eq!(
            out["spec"]["template"]["spec"]["tolerations"],
            json!([{"effect": "NoSchedule", "key": "disktype", "value": "ssd"}])
        );
        // The same patch as a JSON merge patch replaces the list.
        let merged = merge_patch(
            &deployment(),
            &json!({"spec":{"template":{"spec":{
            "containers": [{"name": "patch-demo-ctr-2", "image": "redis"}]}}}}),
        );
        assert_eq!(containers(&merged).as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn smp_merges_nested_lists_and_deletes_fields() {
        let out = smp(
            &deployment(),
            json!({"spec":{"replicas": null, "template":{"spec":{
                "containers": [{"name": "patch-demo-ctr", "image": "nginx:2",
                                "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}]}]
            }}}}),
        )
        .unwrap();
        assert!(out["spec"].get("replicas").is_none());
        assert_eq!(
            containers(&out),
            &json!([{"name": "patch-demo-ctr", "image": "nginx:2",
                     "env": [{"name": "B", "value": "2"}, {"name": "A", "value": "3"}]}])
        );
    }

    #[test]
    fn smp_patch_directives_in_lists_and_maps() {
        let two = smp(
            &deployment(),
            json!({"spec":{"template":{"spec":{
            "containers": [{"name": "log-tailer", "image": "busybox"}]}}}}),
        )
        .unwrap();
        let out = smp(
            &two,
            json!({"spec":{"template":{"spec":{
            "containers": [{"name": "log-tailer", "$patch": "delete"}]}}}}),
        )
        .unwrap();
        assert_eq!(containers(&out), containers(&deployment()));

        let out = smp(
            &two,
            json!({"spec":{"template":{"spec":{
            "containers": [{"$patch": "replace"}, {"name": "only", "image": "x"}]}}}}),
        )
        .unwrap();
        assert_eq!(containers(&out), &json!([{"name": "only", "image": "x"}]));

        let out = smp(
            &deployment(),
            json!({"spec":{"strategy":{"$patch": "replace", "type": "Recreate"}}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));

        let out = smp(
            &deployment(),
            json!({"spec":{"strategy":{"$patch": "delete"}, "new": {"$patch": "delete"}}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["strategy"], json!({}));
        assert!(out["spec"].get("new").is_none());

        let out = smp(
            &deployment(),
            json!({"spec":{"strategy":{"$patch": "merge", "type": "Recreate"}}}),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["strategy"]["rollingUpdate"],
            json!({"maxSurge": "30%"})
        );

        assert!(smp(&deployment(), json!({"spec":{"$patch": "nonsense"}})).is_err());
        assert!(smp(&deployment(), json!({"$patch": "delete"})).is_err());
    }

    #[test]
    fn smp_retain_keys() {
        // kubectl docs: switching a Deployment to Recreate drops rollingUpdate.
        let out = smp(
            &deployment(),
            json!({"spec":{"strategy":{"$retainKeys": ["type"], "type": "Recreate"}}}),
        )
        .unwrap();
        assert_eq!(out["spec"]["strategy"], json!({"type": "Recreate"}));
        // Without the directive, rollingUpdate stays.
        let out = smp(
            &deployment(),
            json!({"spec":{"strategy":{"type": "Recreate"}}}),
        )
        .unwrap();
        assert_eq!(
            out["spec"]["strategy"]["rollingUpdate"],
            json!({"maxSurge": "30%"})
        );
        // A patched key outside $retainKeys is an error naming the path.
        let e = smp(
            &deployment(),
            json!({"spec":{"strategy":{"$retainKeys": ["type"], "other": 1}}}),
        )
        .unwrap_err();
        assert!(e.0.contains(".spec.strategy"), "{e}");
    }

    #[test]
    fn smp_finalizers_merge_as_a_set() {
        let out = smp(
            &deployment(),
            json!({"metadata":{"finalizers": ["b", "a"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b", "a"]));
        let out = smp(&deployment(), json!({"metadata":{"finalizers": ["b"]}})).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b", "a"]));
        let out = smp(
            &out,
            json!({"metadata":{"$deleteFromPrimitiveList/finalizers": ["a"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["b"]));
        let out = smp(&out, json!({"metadata":{"finalizers": null}})).unwrap();
        assert!(out["metadata"].get("finalizers").is_none());
    }

    #[test]
    fn smp_set_element_order() {
        let two = smp(
            &deployment(),
            json!({"spec":{"template":{"spec":{
            "containers": [{"name": "b", "image": "b"}]}}}}),
        )
        .unwrap();
        let names = |v: &Value| -> Vec<String> {
            containers(v)
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c["name"].as_str().map(str::to_string))
                .collect()
        };
        assert_eq!(names(&two), ["b", "patch-demo-ctr"]);
        let out = smp(
            &two,
            json!({"spec":{"template":{"spec":{
            "$setElementOrder/containers": [{"name": "patch-demo-ctr"}, {"name": "b"}],
            "containers": [{"name": "b", "image": "b2"}]}}}}),
        )
        .unwrap();
        assert_eq!(names(&out), ["patch-demo-ctr", "b"]);
        assert_eq!(containers(&out)[1]["image"], "b2");
        let out = smp(
            &deployment(),
            json!({"metadata":{
            "$setElementOrder/finalizers": ["c", "a"], "finalizers": ["c"]}}),
        )
        .unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["c", "a"]));
    }

    #[test]
    fn smp_set_element_order_with_a_delete_and_an_add() {
        // kubectl apply after replacing container x by z, with w added by someone else: w
        // stays between the items the patch orders, where a real API server puts it.
        let mut live = deployment();
        live["spec"]["template"]["spec"]["containers"] =
            json!([{"name": "x"}, {"name": "y"}, {"name": "w"}]);
        let out = smp(
            &live,
            json!({"spec":{"template":{"spec":{
            "$setElementOrder/containers": [{"name": "y"}, {"name": "z"}],
            "containers": [{"name": "z"}, {"name": "x", "$patch": "delete"}]}}}}),
        )
        .unwrap();
        assert_eq!(
            containers(&out),
            &json!([{"name": "y"}, {"name": "w"}, {"name": "z"}])
        );
        // A patch list out of $setElementOrder's order is refused.
        let e = smp(
            &live,
            json!({"spec":{"template":{"spec":{
            "$setElementOrder/containers": [{"name": "x"}, {"name": "y"}],
            "containers": [{"name": "y", "image": "b"}, {"name": "x", "image": "a"}]}}}}),
        )
        .unwrap_err();
        assert!(e.0.contains("$setElementOrder"), "{e}");
    }

    #[test]
    fn smp_kubectl_client_side_apply_patch() {
        // What `kubectl apply` sends after removing replicas and a container's resources.
        let mut live = deployment();
        live["spec"]["template"]["spec"]["containers"][0]["resources"] =
            json!({"limits": {"cpu": "1"}});
        let last = r#"{"apiVersion":"apps/v1","kind":"Deployment"}"#;
        let patch = json!({
            "metadata": {"annotations": {"kubectl.kubernetes.io/last-applied-configuration": last}},
            "spec": {
                "replicas": null,
                "template": {"spec": {
                    "$setElementOrder/containers": [{"name": "patch-demo-ctr"}],
                    "containers": [{"name": "patch-demo-ctr", "image": "nginx:3", "resources": null}]
                }}
            }
        });
        let out = smp(&live, patch).unwrap();
        assert_eq!(
            out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
            last
        );
        assert!(out["spec"].get("replicas").is_none());
        assert_eq!(
            containers(&out),
            &json!([{"name": "patch-demo-ctr", "image": "nginx:3", "env": [{"name": "A", "value": "1"}]}])
        );
    }

    #[test]
    fn smp_directives_never_reach_the_object() {
        // kubectl sends $retainKeys with volumes (patchStrategy merge,retainKeys).
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "spec": {"volumes": [{"name": "v", "emptyDir": {}}]}});
        let patch = json!({"spec": {
            "$setElementOrder/volumes": [{"name": "v"}, {"name": "w"}],
            "volumes": [
                {"$retainKeys": ["configMap", "name"], "name": "v", "configMap": {"name": "c"}},
                {"$retainKeys": ["secret", "name"], "name": "w", "secret": {"secretName": "s", "x": null}}
            ]
        }});
        let out = strategic_merge_patch(&pod, &patch, "v1", "Pod").unwrap();
        assert_eq!(
            out["spec"]["volumes"],
            json!([{"name": "v", "configMap": {"name": "c"}}, {"name": "w", "secret": {"secretName": "s"}}])
        );
    }

    #[test]
    fn smp_service_ports_merge_by_port() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "spec": {"ports": [{"port": 80, "name": "http"}]}});
        let out = strategic_merge_patch(
            &svc,
            &json!({"spec": {"ports": [{"port": 80, "targetPort": 8080}, {"port": 443}]}}),
            "v1",
            "Service",
        )
        .unwrap();
        assert_eq!(
            out["spec"]["ports"],
            json!([{"port": 80, "name": "http", "targetPort": 8080}, {"port": 443}])
        );
    }

    #[test]
    fn smp_for_custom_resources_is_a_merge_patch() {
        assert!(!smp_supported("r4.dev/v1alpha1", "AgentWorkflow"));
        assert!(!smp_supported("gateway.networking.k8s.io/v1", "Gateway"));
        assert!(smp_supported("v1", "Pod") && smp_supported("apps/v1", "Deployment"));
        let cr = json!({"spec": {"agents": [{"name": "a"}], "x": 1}});
        let out = strategic_merge_patch(
            &cr,
            &json!({"spec": {"agents": [{"name": "b"}], "x": null}}),
            "r4.dev/v1alpha1",
            "AgentWorkflow",
        )
        .unwrap();
        assert_eq!(out, json!({"spec": {"agents": [{"name": "b"}]}}));
    }

    #[test]
    fn smp_errors_name_the_path() {
        let e = smp(
            &deployment(),
            json!({"spec":{"template":{"spec":{"containers": [{"image": "x"}]}}}}),
        )
        .unwrap_err();
        assert!(
            e.0.contains(".spec.template.spec.containers") && e.0.contains("name"),
            "{e}"
        );
        assert!(smp(&deployment(), json!([1])).is_err());
        assert!(smp(&deployment(), json!({"spec":{"$unknown": 1}})).is_err());
        assert!(
            smp(
                &deployment(),
                json!({"metadata":{"finalizers": [{"a": 1}]}})
            )
            .is_err()
        );
        assert!(
            smp(
                &deployment(),
                json!({"spec":{"template":{"spec":{"$setElementOrder/containers": "x"}}}})
            )
            .is_err()
        );
    }

    #[test]
    fn list_keys_table() {
        let k = |av: &str, kind: &str, p: &[&str]| {
            builtin_list_keys(
                av,
                kind,
                &p.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            )
        };
        let s = |v: &[&str]| Some(v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            k(
                "apps/v1",
                "Deployment",
                &["spec", "template", "spec", "containers"]
            ),
            s(&["name"])
        );
        assert_eq!(
            k(
                "apps/v1",
                "Deployment",
                &["spec", "template", "spec", "containers", "env"]
            ),
            s(&["name"])
        );
        assert_eq!(
            k("v1", "Pod", &["spec", "initContainers", "ports"]),
            s(&["containerPort"])
        );
        assert_eq!(
            k("v1", "Pod", &["spec", "containers", "volumeMounts"]),
            s(&["mountPath"])
        );
        assert_eq!(k("v1", "Pod", &["spec", "volumes"]), s(&["name"]));
        assert_eq!(k("v1", "Pod", &["spec", "tolerations"]), None);
        assert_eq!(k("v1", "Pod", &["spec", "containers", "args"]), None);
        assert_eq!(k("v1", "Service", &["spec", "ports"]), s(&["port"]));
        assert_eq!(
            k(
                "batch/v1",
                "CronJob",
                &[
                    "spec",
                    "jobTemplate",
                    "spec",
                    "template",
                    "spec",
                    "imagePullSecrets"
                ]
            ),
            s(&["name"])
        );
        assert_eq!(
            k(
                "apps/v1",
                "StatefulSet",
                &["spec", "template", "metadata", "finalizers"]
            ),
            s(&[])
        );
        assert_eq!(
            k(
                "r4.dev/v1alpha1",
                "AgentWorkflow",
                &["metadata", "ownerReferences"]
            ),
            s(&["uid"])
        );
        assert_eq!(
            k(
                "r4.dev/v1alpha1",
                "AgentWorkflow",
                &["status", "conditions"]
            ),
            None
        );
        assert_eq!(
            k("apps/v1", "Deployment", &["status", "conditions"]),
            s(&["type"])
        );
        assert_eq!(
            k(
                "admissionregistration.k8s.io/v1",
                "ValidatingWebhookConfiguration",
                &["webhooks"]
            ),
            s(&["name"])
        );
        assert_eq!(
            k(
                "v1",
                "ConfigMap",
                &["spec", "template", "spec", "containers"]
            ),
            None
        );
    }

    #[test]
    fn no_panics_on_random_inputs() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(11);
        for _ in 0..3000 {
            let target = crate::devcluster::apply::tests::random_value(&mut rng, 5);
            let patch = crate::devcluster::apply::tests::random_value(&mut rng, 5);
            let _ = merge_patch(&target, &patch);
            let _ = strategic_merge_patch(&target, &patch, "apps/v1", "Deployment");
            let _ = strategic_merge_patch(&target, &patch, "v1", "Pod");
        }
    }

    #[test]
    fn no_panics_on_odd_inputs() {
        let values = [
            json!(null),
            json!(1),
            json!("s"),
            json!([]),
            json!([null, 1, {"a": []}]),
            json!({}),
            json!({"spec": [1]}),
            json!({"spec": {"template": {"spec": {"containers": [1, null, {"name": {}}]}}}}),
            json!({"metadata": {"finalizers": "x", "$deleteFromPrimitiveList/finalizers": 3}}),
            json!({"spec": {"template": {"spec": {"containers": [{"$patch": 1}], "$setElementOrder/containers": [1]}}}}),
            json!({"$retainKeys": "x"}),
            json!({"a": {"$retainKeys": [1, null]}}),
        ];
        for t in &values {
            for p in &values {
                let _ = merge_patch(t, p);
                let _ = json_patch(t, p);
                let _ = strategic_merge_patch(t, p, "apps/v1", "Deployment");
                let _ = strategic_merge_patch(t, p, "v1", "Pod");
            }
        }
    }
}
