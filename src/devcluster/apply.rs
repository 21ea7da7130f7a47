//! Server-side apply and the managed-fields bookkeeping of every write, as pure functions on
//! JSON values: the semantics of sigs.k8s.io/structured-merge-diff's `merge.Updater`
//! (Apply, Update), encoded in `metadata.managedFields` as `FieldsV1`.
//!
//! This module owns field ownership: which manager owns which field, when an apply conflicts,
//! what an apply removes. The API server owns the rest: content types, `fieldManager` and
//! `force` query parameters, resetting `status` on the main resource (and `spec` on
//! `/status`), preconditions, defaulting, storing. There is no OpenAPI schema here: maps are
//! maps, and the list semantics come from the caller's `list_keys` (for the built-in kinds,
//! [`super::patch::builtin_list_keys`]; every other list is atomic).
//!
//! A field path given to `list_keys` is the field names from the object's root; list items
//! are not part of it (a container's env is `["spec","template","spec","containers","env"]`).
//!
//! Where this differs from a real API server, for want of a schema or by choice: every map is
//! treated as a struct (no atomic maps; a map-valued map entry is not owned itself); nulls in
//! an applied configuration are ignored; keys are single fields where upstream has
//! `containerPort`+`protocol` and `port`+`protocol` (nothing defaults `protocol` here); on
//! create every new map is owned with its `.` (Go types' zero values hide that upstream, as
//! CRs do not); entries are never written with a `subresource` (existing ones are kept); no
//! version conversion between a manager's apiVersion and the object's.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::{Map, Value};

/// A field of the applied configuration that another manager owns with another value.
#[derive(Debug)]
pub struct Conflict {
    /// The manager that owns the field.
    pub manager: String,
    /// The field, as upstream prints it: `.spec.containers[name="app"].image`.
    pub field: String,
}

/// Why an apply was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Fields owned by other managers would change (HTTP 409; `force` takes them).
    #[error("conflicts: {0:?}")]
    Conflicts(Vec<Conflict>),
    /// The applied configuration or the live object is malformed (HTTP 400/422).
    #[error("{0}")]
    Invalid(String),
}

impl ApplyError {
    /// The message of the API server's 409 Status, as kubectl prints it:
    /// `Apply failed with 1 conflict: conflict with "a": .spec.replicas`; for several,
    /// grouped by manager (sorted), one `- <field>` line each.
    pub fn status_message(&self) -> String {
        let conflicts = match self {
            ApplyError::Invalid(msg) => return msg.clone(),
            ApplyError::Conflicts(c) => c,
        };
        if let [one] = &conflicts[..] {
            return format!(
                "Apply failed with 1 conflict: conflict with {:?}: {}",
                one.manager, one.field
            );
        }
        let mut by_manager: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for c in conflicts {
            by_manager.entry(&c.manager).or_default().push(&c.field);
        }
        let mut lines = Vec::new();
        for (manager, fields) in by_manager {
            lines.push(format!("conflicts with {manager:?}:"));
            lines.extend(fields.into_iter().map(|f| format!("- {f}")));
        }
        format!(
            "Apply failed with {} conflicts: {}",
            conflicts.len(),
            lines.join("\n")
        )
    }
}

/// The list semantics at a field path: `Some(keys)` an associative list keyed by those fields,
/// `Some([])` a set of scalars, `None` an atomic list.
type ListKeys<'a> = &'a dyn Fn(&[String]) -> Option<Vec<String>>;

const APPLY: &str = "Apply";
const BEFORE_FIRST_APPLY: &str = "before-first-apply";
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
const UPDATE: &str = "Update";

/// `metadata` fields no manager owns (upstream's stripMetaManager).
const UNOWNED_META: &[&str] = &[
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "managedFields",
    "selfLink",
    "clusterName",
];

/// One step of a field path: a map field, an associative-list item by its keys (name and
/// canonical JSON of each key value, sorted by name), a set item (canonical JSON), or a
/// list index (only read from existing managedFields, never produced).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Pe {
    Field(String),
    Key(Vec<(String, String)>),
    Value(String),
    Index(usize),
}

type Path = Vec<Pe>;
/// A set of field paths; a path is in the set when the field itself (a leaf, or the `.` of a
/// map or list item) is owned.
type FieldSet = BTreeSet<Path>;

/// Server-side apply of `applied` by `manager` onto `live` (None: create).
///
/// As upstream: the configuration merges into the live object (maps by field, associative
/// lists by key, sets by value, atomic lists replaced); the manager's Apply entry becomes
/// exactly the fields the configuration sets; fields it set last time and omits now are
/// removed unless another manager owns them too (a dropped list item goes with whatever others
/// own inside it, as upstream); a changed field owned by another manager is a [`Conflict`]
/// unless `force`, which moves it to this manager. Fields
/// applied with the value they already have become co-owned, not conflicts. A manager's own
/// Update entry never conflicts with its apply (it loses the fields instead).
///
/// Returns the new object with `metadata.managedFields` rewritten. Nulls in the configuration
/// are ignored; a configuration carrying managedFields is [`ApplyError::Invalid`]. When nothing
/// but ownership changed, the entry keeps its previous `time`, so the caller can tell a no-op
/// by comparing objects without managedFields.
pub fn server_side_apply(
    live: Option<&Value>,
    applied: &Value,
    manager: &str,
    force: bool,
    now: &str,
    list_keys: &dyn Fn(&[String]) -> Option<Vec<String>>,
) -> Result<Value, ApplyError> {
    let w = Walk { list_keys };
    let Some(Value::Object(mut config)) = strip_nulls(applied.clone()) else {
        return Err(ApplyError::Invalid(
            "the applied configuration must be a JSON object".into(),
        ));
    };
    if let Some(Value::Object(meta)) = config.get_mut("metadata") {
        match meta.remove("managedFields") {
            None => {}
            Some(Value::Array(a)) if a.is_empty() => {}
            Some(_) => {
                return Err(ApplyError::Invalid(
                    "metadata.managedFields must be empty in an applied configuration".into(),
                ));
            }
        }
    }
    let live_obj = match live {
        None => Value::Object(Map::new()),
        Some(v @ Value::Object(_)) => v.clone(),
        Some(_) => {
            return Err(ApplyError::Invalid(
                "the live object is not a JSON object".into(),
            ));
        }
    };
    let mut entries = read_entries(&live_obj);
    let live_plain = without_managed_fields(live_obj);
    if live.is_some() && entries.is_empty() {
        // As upstream: an object nobody is recorded to own (managed fields reset) is first
        // owned whole by "before-first-apply", so an apply that changes it conflicts.
        let owned = record_update(None, &live_plain, BEFORE_FIRST_APPLY, now, list_keys);
        entries = read_entries(&owned);
    }
    let kubectl_config = (manager == "kubectl").then(|| config.clone());

    let mut apply_set = FieldSet::new();
    w.to_set(&config, &mut Vec::new(), &mut Vec::new(), &mut apply_set)?;
    let apply_set = strip_unowned(apply_set);
    let api_version = config
        .get("apiVersion")
        .or_else(|| live_plain.get("apiVersion"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let mut new = w.merge(Some(&live_plain), &Value::Object(config), &mut Vec::new());

    let mine = entries
        .iter()
        .position(|e| e.manager == manager && e.operation == APPLY && e.subresource.is_none());
    let last = mine.map(|i| entries[i].fields.clone()).unwrap_or_default();

    // Prune what this manager applied last time and no longer does, unless another manager
    // owns that very field: what others own under a dropped list item goes with it.
    let mut owned = apply_set.clone();
    for (i, e) in entries.iter().enumerate() {
        if Some(i) != mine {
            owned.extend(e.fields.iter().cloned());
        }
    }
    let dropped: FieldSet = last
        .difference(&apply_set)
        .filter(|p| !owned.contains(*p))
        .cloned()
        .collect();
    w.remove_set(&mut new, &tree(&dropped), &[], &mut Vec::new());

    let cmp = w.compare_objects(&live_plain, &new);
    let changed: FieldSet = cmp.added.union(&cmp.modified).cloned().collect();
    let mut conflicts = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if Some(i) == mine || e.manager == manager {
            continue;
        }
        for p in e.fields.intersection(&changed) {
            conflicts.push(Conflict {
                manager: e.manager.clone(),
                field: display(p),
            });
        }
    }
    if !force && !conflicts.is_empty() {
        return Err(ApplyError::Conflicts(conflicts));
    }
    for (i, e) in entries.iter_mut().enumerate() {
        if Some(i) != mine {
            e.fields = &(&e.fields - &changed) - &cmp.removed;
        }
    }

    let time = match mine {
        Some(i) if new == live_plain => entries[i].time.clone(),
        _ => Some(now.to_string()),
    };
    let entry = Entry {
        manager: manager.to_string(),
        operation: APPLY.into(),
        api_version,
        time,
        subresource: None,
        fields: apply_set,
    };
    match mine {
        Some(i) => entries[i] = entry,
        None => entries.push(entry),
    }
    write_entries(&mut new, entries);
    if let Some(config) = kubectl_config {
        sync_last_applied(&mut new, config);
    }
    Ok(new)
}

/// `kubectl apply --server-side` keeps kubectl's client-side annotation, where the object has
/// one, equal to what it applied (upstream's lastAppliedUpdater), so switching back to
/// client-side apply does not undo it. Ownership is not affected.
fn sync_last_applied(obj: &mut Value, mut config: Map<String, Value>) {
    let has = obj
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key(LAST_APPLIED));
    if !has {
        return;
    }
    if let Some(Value::Object(meta)) = config.get_mut("metadata")
        && let Some(Value::Object(annotations)) = meta.get_mut("annotations")
    {
        annotations.remove(LAST_APPLIED);
        if annotations.is_empty() {
            meta.remove("annotations");
        }
    }
    let text = Value::Object(config).to_string();
    if let Some(Value::Object(annotations)) = obj.pointer_mut("/metadata/annotations") {
        annotations.insert(LAST_APPLIED.into(), Value::String(text));
    }
}

/// Records a non-apply write (create, update, patch) by `manager` (None `old`: a create).
///
/// As upstream's Update: the fields that changed from `old` to `new` (on create, every field
/// set) leave every manager's set and join `manager`'s Update entry (one per manager and
/// apiVersion), whose `time` becomes `now`; removed fields leave every set; entries left empty
/// are dropped. The managed fields come from `old`, unless the request object carries its own:
/// `managedFields: []` (or `[{}]`) resets them, a non-empty list replaces them.
pub fn record_update(
    old: Option<&Value>,
    new: &Value,
    manager: &str,
    now: &str,
    list_keys: &dyn Fn(&[String]) -> Option<Vec<String>>,
) -> Value {
    if !new.is_object() {
        return new.clone();
    }
    let w = Walk { list_keys };
    let old_obj = match old {
        Some(v @ Value::Object(_)) => v.clone(),
        _ => Value::Object(Map::new()),
    };
    let mut entries = match new.pointer("/metadata/managedFields") {
        Some(Value::Array(a))
            if a.is_empty() || (a.len() == 1 && a[0] == Value::Object(Map::new())) =>
        {
            Vec::new()
        }
        Some(Value::Array(_)) => match read_entries(new) {
            e if e.is_empty() => read_entries(&old_obj),
            e => e,
        },
        _ => read_entries(&old_obj),
    };
    let old_plain = without_managed_fields(old_obj);
    let mut new_plain = without_managed_fields(new.clone());

    let cmp = w.compare_objects(&old_plain, &new_plain);
    let changed: FieldSet = cmp.added.union(&cmp.modified).cloned().collect();
    for e in &mut entries {
        e.fields = &(&e.fields - &changed) - &cmp.removed;
    }
    let api_version = new_plain
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !changed.is_empty() {
        let mine = entries.iter_mut().find(|e| {
            e.manager == manager
                && e.operation == UPDATE
                && e.api_version == api_version
                && e.subresource.is_none()
        });
        match mine {
            Some(e) => {
                e.fields.extend(changed);
                e.time = Some(now.to_string());
            }
            None => entries.push(Entry {
                manager: manager.to_string(),
                operation: UPDATE.into(),
                api_version,
                time: Some(now.to_string()),
                subresource: None,
                fields: changed,
            }),
        }
    }
    write_entries(&mut new_plain, entries);
    new_plain
}

// ---------------------------------------------------------------------------------------------
// Walking objects
// ---------------------------------------------------------------------------------------------

struct Walk<'a> {
    list_keys: ListKeys<'a>,
}

#[derive(Default)]
struct Comparison {
    added: FieldSet,
    modified: FieldSet,
    removed: FieldSet,
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    Map,
    List,
    Leaf,
}

fn shape(v: Option<&Value>) -> Option<Shape> {
    v.map(|v| match v {
        Value::Object(_) => Shape::Map,
        Value::Array(_) => Shape::List,
        _ => Shape::Leaf,
    })
}

/// The path element of a list item: its keys (None when one is missing or it is not a map),
/// or for a set its value.
fn item_pe(item: &Value, keys: &[String]) -> Option<Pe> {
    if keys.is_empty() {
        return Some(Pe::Value(canonical(item)));
    }
    let m = item.as_object()?;
    let mut pairs = keys
        .iter()
        .map(|k| m.get(k).map(|v| (k.clone(), canonical(v))))
        .collect::<Option<Vec<_>>>()?;
    pairs.sort();
    Some(Pe::Key(pairs))
}

impl Walk<'_> {
    fn keys(&self, fp: &[String]) -> Option<Vec<String>> {
        (self.list_keys)(fp)
    }

    /// The fields an applied configuration sets (upstream's ToFieldSet): leaves (scalars,
    /// empty maps, atomic lists), associative and set items with their fields.
    fn to_set(
        &self,
        m: &Map<String, Value>,
        fp: &mut Vec<String>,
        path: &mut Path,
        out: &mut FieldSet,
    ) -> Result<(), ApplyError> {
        for (k, v) in m {
            fp.push(k.clone());
            path.push(Pe::Field(k.clone()));
            match v {
                Value::Object(c) if !c.is_empty() => self.to_set(c, fp, path, out)?,
                Value::Array(items) => match self.keys(fp) {
                    None => {
                        out.insert(path.clone());
                    }
                    Some(keys) => {
                        let mut seen = BTreeSet::new();
                        for item in items {
                            let pe = item_pe(item, &keys).ok_or_else(|| {
                                ApplyError::Invalid(format!(
                                    "{}: an item of this associative list lacks a key field {keys:?}: {item}",
                                    display(path)
                                ))
                            })?;
                            if !seen.insert(pe.clone()) {
                                return Err(ApplyError::Invalid(format!(
                                    "{}: duplicate entries for {}",
                                    display(path),
                                    display(&[pe])
                                )));
                            }
                            path.push(pe);
                            out.insert(path.clone());
                            if let (false, Value::Object(im)) = (keys.is_empty(), item) {
                                self.to_set(im, fp, path, out)?;
                            }
                            path.pop();
                        }
                    }
                },
                _ => {
                    out.insert(path.clone());
                }
            }
            fp.pop();
            path.pop();
        }
        Ok(())
    }

    /// Merges an applied configuration into the live object (upstream's typed Merge).
    fn merge(&self, lhs: Option<&Value>, rhs: &Value, fp: &mut Vec<String>) -> Value {
        match (lhs, rhs) {
            (Some(Value::Object(l)), Value::Object(r)) => {
                let mut out = l.clone();
                for (k, rv) in r {
                    fp.push(k.clone());
                    let v = self.merge(l.get(k), rv, fp);
                    fp.pop();
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            (Some(Value::Array(l)), Value::Array(r)) => match self.keys(fp) {
                None => rhs.clone(),
                Some(keys) => Value::Array(self.merge_list(l, r, &keys, fp)),
            },
            _ => rhs.clone(),
        }
    }

    /// Upstream's list merge order: shared items in the configuration's order, live-only items
    /// where they were, new items where the configuration puts them.
    fn merge_list(
        &self,
        l: &[Value],
        r: &[Value],
        keys: &[String],
        fp: &mut Vec<String>,
    ) -> Vec<Value> {
        let lhs: Vec<(Option<Pe>, &Value)> = l.iter().map(|it| (item_pe(it, keys), it)).collect();
        let rhs: Vec<(Pe, &Value)> = r
            .iter()
            .filter_map(|it| item_pe(it, keys).map(|pe| (pe, it)))
            .collect();
        let mut lhs_first: BTreeMap<&Pe, &Value> = BTreeMap::new();
        for (pe, it) in &lhs {
            if let Some(pe) = pe {
                lhs_first.entry(pe).or_insert(*it);
            }
        }
        let rhs_set: BTreeSet<&Pe> = rhs.iter().map(|(pe, _)| pe).collect();
        let mut shared: VecDeque<&Pe> = rhs
            .iter()
            .map(|(pe, _)| pe)
            .filter(|pe| lhs_first.contains_key(pe))
            .collect();
        let mut next_shared = shared.pop_front();
        let mut merged_rhs: BTreeSet<&Pe> = BTreeSet::new();
        let mut out = Vec::with_capacity(l.len().max(r.len()));
        let (mut li, mut ri) = (0, 0);
        while li < lhs.len() || ri < rhs.len() {
            if li < lhs.len()
                && ri < rhs.len()
                && let Some(pe) = &lhs[li].0
            {
                if *pe == rhs[ri].0 {
                    merged_rhs.insert(pe);
                    out.push(self.merge(lhs_first.get(pe).copied(), rhs[ri].1, fp));
                    li += 1;
                    ri += 1;
                    next_shared = shared.pop_front();
                    continue;
                }
                if rhs_set.contains(pe) && next_shared.is_some_and(|n| n != pe) {
                    // A shared item, but not the one due now: it comes with the rhs.
                    li += 1;
                    continue;
                }
            }
            if li < lhs.len() {
                match &lhs[li].0 {
                    Some(pe) if rhs_set.contains(pe) => {
                        if merged_rhs.contains(pe) {
                            li += 1;
                        }
                    }
                    _ => {
                        out.push(lhs[li].1.clone());
                        li += 1;
                        continue;
                    }
                }
            }
            if ri < rhs.len() {
                let pe = &rhs[ri].0;
                merged_rhs.insert(pe);
                out.push(self.merge(lhs_first.get(pe).copied(), rhs[ri].1, fp));
                ri += 1;
                if next_shared == Some(pe) {
                    next_shared = shared.pop_front();
                }
            }
        }
        out
    }

    fn compare_objects(&self, old: &Value, new: &Value) -> Comparison {
        let mut cmp = Comparison::default();
        self.compare(
            Some(old),
            Some(new),
            &mut Vec::new(),
            &mut Vec::new(),
            &mut cmp,
        );
        Comparison {
            added: strip_unowned(cmp.added),
            modified: strip_unowned(cmp.modified),
            removed: strip_unowned(cmp.removed),
        }
    }

    /// Upstream's Compare: leaves (scalars, atomic lists, empty maps and lists) are added,
    /// removed or modified; a map or list item present on one side only is added or removed
    /// itself, with everything under it.
    fn compare(
        &self,
        l: Option<&Value>,
        r: Option<&Value>,
        fp: &mut Vec<String>,
        path: &mut Path,
        out: &mut Comparison,
    ) {
        let (sl, sr) = (shape(l), shape(r));
        match (sl, sr) {
            (None, None) => {}
            (Some(a), Some(b)) if a != b => {
                self.compare(l, None, fp, path, out);
                self.compare(None, r, fp, path, out);
                out.added.remove(path);
                out.removed.remove(path);
                out.modified.insert(path.clone());
            }
            (Some(Shape::Map), _) | (_, Some(Shape::Map)) => {
                let lm = l.and_then(Value::as_object);
                let rm = r.and_then(Value::as_object);
                if lm.is_none_or(Map::is_empty) && rm.is_none_or(Map::is_empty) {
                    return leaf(l, r, path, out);
                }
                let keys: BTreeSet<&String> =
                    lm.into_iter().chain(rm).flat_map(Map::keys).collect();
                for k in keys {
                    fp.push(k.clone());
                    path.push(Pe::Field(k.clone()));
                    self.compare(
                        lm.and_then(|m| m.get(k)),
                        rm.and_then(|m| m.get(k)),
                        fp,
                        path,
                        out,
                    );
                    fp.pop();
                    path.pop();
                }
                non_leaf(l, r, path, out);
            }
            (Some(Shape::List), _) | (_, Some(Shape::List)) => {
                let la = l.and_then(Value::as_array);
                let ra = r.and_then(Value::as_array);
                let keys = match self.keys(fp) {
                    Some(keys)
                        if !(la.is_none_or(Vec::is_empty) && ra.is_none_or(Vec::is_empty)) =>
                    {
                        keys
                    }
                    _ => return leaf(l, r, path, out),
                };
                let (l_order, l_items) = index_items(la, &keys);
                let (r_order, r_items) = index_items(ra, &keys);
                let all = l_order
                    .into_iter()
                    .chain(r_order.into_iter().filter(|pe| !l_items.contains_key(pe)));
                for pe in all {
                    path.push(pe.clone());
                    self.compare(
                        l_items.get(&pe).copied(),
                        r_items.get(&pe).copied(),
                        fp,
                        path,
                        out,
                    );
                    path.pop();
                }
                non_leaf(l, r, path, out);
            }
            _ => leaf(l, r, path, out),
        }
    }

    /// Removes the fields of `node` (a member goes with everything under it); a map or list
    /// emptied by the removal goes too. `keep` are the key fields of the list item `v` is,
    /// which stay while the item does. One walk, so dropping many items stays linear.
    /// Returns whether anything was removed.
    fn remove_set(
        &self,
        v: &mut Value,
        node: &Node,
        keep: &[String],
        fp: &mut Vec<String>,
    ) -> bool {
        let mut removed = false;
        match v {
            Value::Object(m) => {
                for (pe, child) in &node.children {
                    let Pe::Field(k) = pe else { continue };
                    if keep.contains(k) {
                        continue;
                    }
                    if child.member {
                        removed |= m.remove(k).is_some();
                        continue;
                    }
                    let Some(cv) = m.get_mut(k) else { continue };
                    fp.push(k.clone());
                    let changed = self.remove_set(cv, child, &[], fp);
                    fp.pop();
                    if changed && is_empty_container(cv) {
                        m.remove(k);
                    }
                    removed |= changed;
                }
            }
            Value::Array(items) => {
                let keys = self.keys(fp).unwrap_or_default();
                let mut kept = Vec::with_capacity(items.len());
                for mut item in std::mem::take(items) {
                    let child = item_pe(&item, &keys).and_then(|pe| node.children.get(&pe));
                    match child {
                        Some(c) if c.member => removed = true,
                        Some(c) => {
                            removed |= self.remove_set(&mut item, c, &keys, fp);
                            kept.push(item);
                        }
                        None => kept.push(item),
                    }
                }
                *items = kept;
            }
            _ => {}
        }
        removed
    }
}

/// A list's items by path element, first occurrence only, and their order; items without
/// their keys are left out.
fn index_items<'v>(
    a: Option<&'v Vec<Value>>,
    keys: &[String],
) -> (Vec<Pe>, BTreeMap<Pe, &'v Value>) {
    let mut order = Vec::new();
    let mut items = BTreeMap::new();
    for it in a.into_iter().flatten() {
        if let Some(pe) = item_pe(it, keys)
            && !items.contains_key(&pe)
        {
            order.push(pe.clone());
            items.insert(pe, it);
        }
    }
    (order, items)
}

fn leaf(l: Option<&Value>, r: Option<&Value>, path: &Path, out: &mut Comparison) {
    match (l, r) {
        (None, Some(_)) => out.added.insert(path.clone()),
        (Some(_), None) => out.removed.insert(path.clone()),
        (Some(a), Some(b)) if a != b => out.modified.insert(path.clone()),
        _ => false,
    };
}

fn non_leaf(l: Option<&Value>, r: Option<&Value>, path: &Path, out: &mut Comparison) {
    if path.is_empty() {
        return;
    }
    match (l, r) {
        (None, Some(_)) => out.added.insert(path.clone()),
        (Some(_), None) => out.removed.insert(path.clone()),
        _ => false,
    };
}

fn is_empty_container(v: &Value) -> bool {
    match v {
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// Drops the fields no manager owns: `apiVersion`, `kind`, `metadata` itself and its
/// server-set fields.
fn strip_unowned(set: FieldSet) -> FieldSet {
    set.into_iter().filter(|p| !unowned(p)).collect()
}

fn unowned(p: &[Pe]) -> bool {
    match p {
        [Pe::Field(f), ..] if f == "apiVersion" || f == "kind" => true,
        [Pe::Field(m)] => m == "metadata",
        [Pe::Field(m), Pe::Field(f), ..] => m == "metadata" && UNOWNED_META.contains(&f.as_str()),
        _ => false,
    }
}

fn strip_nulls(v: Value) -> Option<Value> {
    match v {
        Value::Null => None,
        Value::Object(m) => Some(Value::Object(
            m.into_iter()
                .filter_map(|(k, v)| strip_nulls(v).map(|v| (k, v)))
                .collect(),
        )),
        Value::Array(a) => Some(Value::Array(
            a.into_iter().filter_map(strip_nulls).collect(),
        )),
        other => Some(other),
    }
}

fn without_managed_fields(mut v: Value) -> Value {
    if let Some(Value::Object(meta)) = v.get_mut("metadata") {
        meta.remove("managedFields");
    }
    v
}

/// JSON with object members sorted, as field-path keys need one spelling per value.
fn canonical(v: &Value) -> String {
    match v {
        Value::Object(m) => {
            let mut members: Vec<_> = m.iter().collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            let inner: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), canonical(v)))
                .collect();
            format!("{{{}}}", inner.join(","))
        }
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        other => other.to_string(),
    }
}

/// A path as upstream prints it in conflicts: `.spec.containers[name="app"].image`.
fn display(p: &[Pe]) -> String {
    p.iter()
        .map(|pe| match pe {
            Pe::Field(f) => format!(".{f}"),
            Pe::Key(pairs) => {
                let inner: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!("[{}]", inner.join(","))
            }
            Pe::Value(v) => format!("[={v}]"),
            Pe::Index(i) => format!("[{i}]"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// managedFields and FieldsV1
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: Option<String>,
    subresource: Option<String>,
    fields: FieldSet,
}

/// The object's managed fields; an entry that cannot be read is dropped (upstream resets
/// undecodable managed fields rather than failing the write).
fn read_entries(obj: &Value) -> Vec<Entry> {
    let Some(Value::Array(list)) = obj.pointer("/metadata/managedFields") else {
        return Vec::new();
    };
    list.iter().filter_map(read_entry).collect()
}

fn read_entry(v: &Value) -> Option<Entry> {
    let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    if s("fieldsType").is_some_and(|t| t != "FieldsV1") {
        return None;
    }
    let mut fields = FieldSet::new();
    if let Some(f) = v.get("fieldsV1") {
        decode_fields(f, &mut Vec::new(), &mut fields)?;
    }
    Some(Entry {
        manager: s("manager").unwrap_or_default(),
        operation: s("operation")?,
        api_version: s("apiVersion").unwrap_or_default(),
        time: s("time"),
        subresource: s("subresource").filter(|s| !s.is_empty()),
        fields,
    })
}

/// As upstream, at most this many Update entries: older ones merge into one
/// "ancient-changes" entry per apiVersion, so managedFields stay bounded however many
/// clients write an object.
const MAX_UPDATE_ENTRIES: usize = 10;
const ANCIENT_CHANGES: &str = "ancient-changes";

fn cap_update_entries(entries: &mut Vec<Entry>) {
    let mut updates: Vec<usize> = (0..entries.len())
        .filter(|&i| entries[i].operation == UPDATE)
        .collect();
    if updates.len() <= MAX_UPDATE_ENTRIES {
        return;
    }
    let is_bucket = |e: &Entry| e.manager == ANCIENT_CHANGES && e.subresource.is_none();
    updates.sort_by(|&a, &b| entries[a].time.cmp(&entries[b].time));
    let mut count = updates.len();
    let mut first_of_version: BTreeMap<String, usize> = BTreeMap::new();
    let mut merged = BTreeSet::new();
    for &i in &updates {
        if count <= MAX_UPDATE_ENTRIES {
            break;
        }
        if is_bucket(&entries[i]) {
            continue;
        }
        let version = entries[i].api_version.clone();
        let bucket = (0..entries.len()).find(|&b| {
            !merged.contains(&b) && is_bucket(&entries[b]) && entries[b].api_version == version
        });
        let bucket = match (bucket, first_of_version.get(&version)) {
            (Some(b), _) => b,
            (None, Some(&first)) => {
                entries[first].manager = ANCIENT_CHANGES.into();
                entries[first].subresource = None;
                first
            }
            (None, None) => {
                first_of_version.insert(version, i);
                continue;
            }
        };
        let fields = std::mem::take(&mut entries[i].fields);
        let time = entries[i].time.clone();
        entries[bucket].fields.extend(fields);
        entries[bucket].time = time;
        merged.insert(i);
        count -= 1;
    }
    let mut i = 0;
    entries.retain(|_| {
        i += 1;
        !merged.contains(&(i - 1))
    });
}

/// Writes the entries in upstream's order (operation, time, manager, apiVersion); none left
/// removes `managedFields`.
fn write_entries(obj: &mut Value, mut entries: Vec<Entry>) {
    entries.retain(|e| !e.fields.is_empty());
    cap_update_entries(&mut entries);
    entries.sort_by(|a, b| {
        (
            &a.operation,
            &a.time,
            &a.manager,
            &a.api_version,
            &a.subresource,
        )
            .cmp(&(
                &b.operation,
                &b.time,
                &b.manager,
                &b.api_version,
                &b.subresource,
            ))
    });
    let Value::Object(root) = obj else {
        return;
    };
    if entries.is_empty() {
        if let Some(Value::Object(meta)) = root.get_mut("metadata") {
            meta.remove("managedFields");
        }
        return;
    }
    let list: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let mut m = Map::new();
            m.insert("manager".into(), Value::String(e.manager));
            m.insert("operation".into(), Value::String(e.operation));
            m.insert("apiVersion".into(), Value::String(e.api_version));
            if let Some(t) = e.time {
                m.insert("time".into(), Value::String(t));
            }
            m.insert("fieldsType".into(), Value::String("FieldsV1".into()));
            m.insert("fieldsV1".into(), encode_fields(&e.fields));
            if let Some(s) = e.subresource {
                m.insert("subresource".into(), Value::String(s));
            }
            Value::Object(m)
        })
        .collect();
    let meta = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    if let Value::Object(meta) = meta {
        meta.insert("managedFields".into(), Value::Array(list));
    }
}

#[derive(Default)]
struct Node {
    member: bool,
    children: BTreeMap<Pe, Node>,
}

/// FieldsV1: `{"f:spec":{"f:containers":{"k:{\"name\":\"app\"}":{".":{},"f:image":{}}}}}`; a
/// node is `{}` when it is a leaf, and carries `".": {}` when owned itself and has children.
fn encode_fields(set: &FieldSet) -> Value {
    encode_node(&tree(set))
}

/// The set as a tree of path elements, members marked.
fn tree(set: &FieldSet) -> Node {
    let mut root = Node::default();
    for path in set {
        let mut n = &mut root;
        for pe in path {
            n = n.children.entry(pe.clone()).or_default();
        }
        n.member = true;
    }
    root
}

fn encode_node(n: &Node) -> Value {
    let mut m = Map::new();
    if n.member && !n.children.is_empty() {
        m.insert(".".into(), Value::Object(Map::new()));
    }
    for (pe, child) in &n.children {
        m.insert(pe_key(pe), encode_node(child));
    }
    Value::Object(m)
}

fn pe_key(pe: &Pe) -> String {
    match pe {
        Pe::Field(f) => format!("f:{f}"),
        Pe::Key(pairs) => {
            let inner: Vec<String> = pairs
                .iter()
                .map(|(k, v)| format!("{}:{v}", Value::String(k.clone())))
                .collect();
            format!("k:{{{}}}", inner.join(","))
        }
        Pe::Value(v) => format!("v:{v}"),
        Pe::Index(i) => format!("i:{i}"),
    }
}

fn parse_pe(s: &str) -> Option<Pe> {
    let (kind, rest) = s.split_at_checked(2)?;
    match kind {
        "f:" => Some(Pe::Field(rest.to_string())),
        "k:" => {
            let Ok(Value::Object(m)) = serde_json::from_str::<Value>(rest) else {
                return None;
            };
            let mut pairs: Vec<(String, String)> =
                m.iter().map(|(k, v)| (k.clone(), canonical(v))).collect();
            pairs.sort();
            Some(Pe::Key(pairs))
        }
        "v:" => serde_json::from_str::<Value>(rest)
            .ok()
            .map(|v| Pe::Value(canonical(&v))),
        "i:" => rest.parse().ok().map(Pe::Index),
        _ => None,
    }
}

fn decode_fields(v: &Value, path: &mut Path, out: &mut FieldSet) -> Option<()> {
    let Value::Object(m) = v else {
        return None;
    };
    for (k, child) in m {
        if k == "." {
            if !path.is_empty() {
                out.insert(path.clone());
            }
            continue;
        }
        path.push(parse_pe(k)?);
        match child {
            Value::Object(c) if c.is_empty() => {
                out.insert(path.clone());
            }
            _ => decode_fields(child, path, out)?,
        }
        path.pop();
    }
    Some(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devcluster::patch::builtin_list_keys;
    use serde_json::json;

    const T1: &str = "2026-01-01T00:00:00Z";
    const T2: &str = "2026-01-01T00:01:00Z";
    const T3: &str = "2026-01-01T00:02:00Z";

    fn keys(p: &[String]) -> Option<Vec<String>> {
        builtin_list_keys("apps/v1", "Deployment", p)
    }

    fn apply(
        live: Option<&Value>,
        cfg: Value,
        manager: &str,
        force: bool,
        now: &str,
    ) -> Result<Value, ApplyError> {
        server_side_apply(live, &cfg, manager, force, now, &keys)
    }

    fn deployment(replicas: Option<i64>, containers: Value) -> Value {
        let mut d = json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"template": {"spec": {"containers": containers}}}
        });
        if let Some(r) = replicas {
            d["spec"]["replicas"] = json!(r);
        }
        d
    }

    /// The manager's entry for `operation`.
    fn entry<'v>(obj: &'v Value, manager: &str, operation: &str) -> Option<&'v Value> {
        obj["metadata"]["managedFields"]
            .as_array()?
            .iter()
            .find(|e| e["manager"] == manager && e["operation"] == operation)
    }

    fn owns(obj: &Value, manager: &str, operation: &str, pointer: &str) -> bool {
        entry(obj, manager, operation)
            .and_then(|e| e["fieldsV1"].pointer(pointer))
            .is_some()
    }

    fn conflicts(r: Result<Value, ApplyError>) -> Vec<(String, String)> {
        match r {
            Err(ApplyError::Conflicts(c)) => c.into_iter().map(|c| (c.manager, c.field)).collect(),
            other => panic!("expected conflicts, got {other:?}"),
        }
    }

    #[test]
    fn create_records_the_applied_fields_in_fields_v1() {
        let cfg = deployment(Some(2), json!([{"name": "app", "image": "nginx"}]));
        let out = apply(None, cfg.clone(), "mgr-a", false, T1).unwrap();
        let mut plain = out.clone();
        plain["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("managedFields");
        assert_eq!(plain, cfg);
        assert_eq!(
            out["metadata"]["managedFields"],
            json!([{
                "manager": "mgr-a",
                "operation": "Apply",
                "apiVersion": "apps/v1",
                "time": T1,
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {"f:labels": {"f:app": {}}},
                    "f:spec": {
                        "f:replicas": {},
                        "f:template": {"f:spec": {"f:containers": {
                            "k:{\"name\":\"app\"}": {".": {}, "f:image": {}, "f:name": {}}
                        }}}
                    }
                }
            }])
        );
        // Serialized exactly as kubectl shows it.
        let v1 = serde_json::to_string(
            &out["metadata"]["managedFields"][0]["fieldsV1"]["f:spec"]["f:template"],
        )
        .unwrap();
        assert_eq!(
            v1,
            r#"{"f:spec":{"f:containers":{"k:{\"name\":\"app\"}":{".":{},"f:image":{},"f:name":{}}}}}"#
        );
    }

    #[test]
    fn reapply_without_a_field_removes_it() {
        let live = apply(
            None,
            deployment(Some(2), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        )
        .unwrap();
        let out = apply(
            Some(&live),
            deployment(None, json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T2,
        )
        .unwrap();
        assert!(out["spec"].get("replicas").is_none());
        assert!(!owns(&out, "a", "Apply", "/f:spec/f:replicas"));
        assert_eq!(entry(&out, "a", "Apply").unwrap()["time"], T2);
        // Dropping the labels map drops it entirely, not leaving `labels: {}`.
        let mut cfg = deployment(None, json!([{"name": "app", "image": "nginx"}]));
        cfg["metadata"].as_object_mut().unwrap().remove("labels");
        let out = apply(Some(&out), cfg, "a", false, T3).unwrap();
        assert!(out["metadata"].get("labels").is_none());
        assert_eq!(out["metadata"]["name"], "web");
    }

    #[test]
    fn unchanged_reapply_keeps_the_time() {
        let cfg = deployment(Some(2), json!([{"name": "app", "image": "nginx"}]));
        let live = apply(None, cfg.clone(), "a", false, T1).unwrap();
        let out = apply(Some(&live), cfg, "a", false, T2).unwrap();
        assert_eq!(out, live);
    }

    #[test]
    fn two_managers_conflict_and_force_moves_ownership() {
        let live = apply(
            None,
            deployment(Some(2), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        )
        .unwrap();
        // Same value: shared ownership, no conflict.
        let mut b_cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}, "spec": {"replicas": 2}});
        let shared = apply(Some(&live), b_cfg.clone(), "b", false, T2).unwrap();
        assert!(
            owns(&shared, "a", "Apply", "/f:spec/f:replicas")
                && owns(&shared, "b", "Apply", "/f:spec/f:replicas")
        );
        // Another value: a conflict naming the owner and the field.
        b_cfg["spec"]["replicas"] = json!(3);
        assert_eq!(
            conflicts(apply(Some(&live), b_cfg.clone(), "b", false, T2)),
            [("a".to_string(), ".spec.replicas".to_string())]
        );
        // Forced: b owns it alone, a keeps the rest.
        let forced = apply(Some(&live), b_cfg, "b", true, T2).unwrap();
        assert_eq!(forced["spec"]["replicas"], 3);
        assert!(owns(&forced, "b", "Apply", "/f:spec/f:replicas"));
        assert!(!owns(&forced, "a", "Apply", "/f:spec/f:replicas"));
        assert!(owns(&forced, "a", "Apply", "/f:metadata/f:labels/f:app"));
        // a now omitting replicas does not remove b's field.
        let out = apply(
            Some(&forced),
            deployment(None, json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T3,
        )
        .unwrap();
        assert_eq!(out["spec"]["replicas"], 3);
    }

    #[test]
    fn co_owned_field_survives_one_owner_dropping_it() {
        let live = apply(
            None,
            deployment(Some(2), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        )
        .unwrap();
        let b_cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "labels": {"app": "web"}}});
        let live = apply(Some(&live), b_cfg, "b", false, T2).unwrap();
        let mut cfg = deployment(Some(2), json!([{"name": "app", "image": "nginx"}]));
        cfg["metadata"].as_object_mut().unwrap().remove("labels");
        let out = apply(Some(&live), cfg, "a", false, T3).unwrap();
        assert_eq!(out["metadata"]["labels"], json!({"app": "web"}));
        assert!(owns(&out, "b", "Apply", "/f:metadata/f:labels/f:app"));
    }

    #[test]
    fn update_by_another_manager_then_conflicting_apply() {
        let live = apply(
            None,
            deployment(Some(2), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        )
        .unwrap();
        let mut edited = live.clone();
        edited["spec"]["replicas"] = json!(5);
        edited["spec"]["paused"] = json!(true);
        let edited = record_update(Some(&live), &edited, "kubectl-edit", T2, &keys);
        assert!(owns(
            &edited,
            "kubectl-edit",
            "Update",
            "/f:spec/f:replicas"
        ));
        assert!(owns(&edited, "kubectl-edit", "Update", "/f:spec/f:paused"));
        assert!(!owns(&edited, "a", "Apply", "/f:spec/f:replicas"));
        assert_eq!(
            entry(&edited, "kubectl-edit", "Update").unwrap()["time"],
            T2
        );
        // a re-applies its replicas: the edit owns them now.
        let r = apply(
            Some(&edited),
            deployment(Some(2), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T3,
        );
        assert_eq!(
            conflicts(r),
            [("kubectl-edit".to_string(), ".spec.replicas".to_string())]
        );
        let forced = apply(
            Some(&edited),
            deployment(Some(2), json!([{"name": "app", "image": "nginx"}])),
            "a",
            true,
            T3,
        )
        .unwrap();
        assert_eq!(forced["spec"]["replicas"], 2);
        assert_eq!(forced["spec"]["paused"], true);
        assert!(owns(&forced, "kubectl-edit", "Update", "/f:spec/f:paused"));
        assert!(!owns(
            &forced,
            "kubectl-edit",
            "Update",
            "/f:spec/f:replicas"
        ));
    }

    #[test]
    fn associative_lists_merge_by_key() {
        let live = apply(
            None,
            deployment(None, json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        )
        .unwrap();
        let b_cfg = deployment(None, json!([{"name": "sidecar", "image": "envoy"}]));
        let mut b_cfg = b_cfg;
        b_cfg["metadata"].as_object_mut().unwrap().remove("labels");
        let live = apply(Some(&live), b_cfg, "b", false, T2).unwrap();
        assert_eq!(
            live["spec"]["template"]["spec"]["containers"],
            json!([{"name": "app", "image": "nginx"}, {"name": "sidecar", "image": "envoy"}])
        );
        // a changes its container's image and adds an env var: b's container is untouched.
        let a2 = deployment(
            None,
            json!([{"name": "app", "image": "nginx:2", "env": [{"name": "X", "value": "1"}]}]),
        );
        let live = apply(Some(&live), a2, "a", false, T3).unwrap();
        let cs = &live["spec"]["template"]["spec"]["containers"];
        assert_eq!(
            cs[0],
            json!({"name": "app", "image": "nginx:2", "env": [{"name": "X", "value": "1"}]})
        );
        assert_eq!(cs[1], json!({"name": "sidecar", "image": "envoy"}));
        assert!(owns(
            &live,
            "a",
            "Apply",
            "/f:spec/f:template/f:spec/f:containers/k:{\"name\":\"app\"}/f:env/k:{\"name\":\"X\"}/f:value"
        ));
        // b changing a's image conflicts at the item's field.
        let b_bad = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"template": {"spec": {"containers": [{"name": "sidecar", "image": "envoy"}, {"name": "app", "image": "evil"}]}}}});
        assert_eq!(
            conflicts(apply(Some(&live), b_bad, "b", false, T3)),
            [(
                "a".to_string(),
                ".spec.template.spec.containers[name=\"app\"].image".to_string()
            )]
        );
        // a drops its container: only b's remains.
        let live = apply(Some(&live), deployment(None, json!([])), "a", false, T3).unwrap();
        assert_eq!(
            live["spec"]["template"]["spec"]["containers"],
            json!([{"name": "sidecar", "image": "envoy"}])
        );
    }

    #[test]
    fn list_merge_order_matches_upstream() {
        // (live, applied, merged) for a set, from structured-merge-diff's merge tests.
        let cases: &[(&[&str], &[&str], &[&str])] = &[
            (&["a", "b", "c"], &["a", "b"], &["a", "b", "c"]),
            (&["a", "b"], &["a", "b", "c"], &["a", "b", "c"]),
            (&["a", "b", "c"], &[], &["a", "b", "c"]),
            (&["a", "b"], &["b", "a"], &["b", "a"]),
            (
                &["a", "b", "c"],
                &["c", "d", "e", "f"],
                &["a", "b", "c", "d", "e", "f"],
            ),
            (
                &["a", "b", "c", "g", "f"],
                &["c", "d", "e", "f"],
                &["a", "b", "c", "g", "d", "e", "f"],
            ),
            (
                &["c", "d", "e", "f"],
                &["a", "c", "e"],
                &["a", "c", "d", "e", "f"],
            ),
            (
                &["a", "b", "c", "x", "y", "z"],
                &["d", "e", "f"],
                &["a", "b", "c", "x", "y", "z", "d", "e", "f"],
            ),
            (
                &["a", "b", "c", "x", "y", "z"],
                &["d", "e", "f", "x", "y", "z"],
                &["a", "b", "c", "d", "e", "f", "x", "y", "z"],
            ),
            (
                &["c", "a", "g", "f"],
                &["c", "f", "a", "g"],
                &["c", "f", "a", "g"],
            ),
            (
                &["a", "b", "c", "d"],
                &["d", "e", "f", "a"],
                &["b", "c", "d", "e", "f", "a"],
            ),
            (
                &["c", "d", "e", "f", "g", "h", "i", "j"],
                &["2", "h", "3", "e", "4", "k", "l"],
                &[
                    "c", "d", "f", "g", "2", "h", "i", "j", "3", "e", "4", "k", "l",
                ],
            ),
            (
                &["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"],
                &["1", "b", "2", "h", "3", "e", "4", "k", "l"],
                &[
                    "a", "1", "b", "c", "d", "f", "g", "2", "h", "i", "j", "3", "e", "4", "k", "l",
                ],
            ),
            (&["a", "b", "b"], &["c"], &["a", "b", "b", "c"]),
            (&["a", "b", "b"], &["b"], &["a", "b"]),
        ];
        let set = |_: &[String]| Some(vec![]);
        let w = Walk { list_keys: &set };
        for (live, applied, want) in cases {
            let got = w.merge(Some(&json!(live)), &json!(applied), &mut vec!["s".into()]);
            assert_eq!(got, json!(want), "{live:?} + {applied:?}");
        }
    }

    #[test]
    fn update_entries_and_subresource_entries() {
        let live = apply(
            None,
            deployment(Some(1), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        )
        .unwrap();
        // A controller's status write (its entry carries the subresource) and a new container
        // added by an Update: the item is owned with its `.`.
        let mut with_status = live.clone();
        with_status["status"] = json!({"replicas": 1});
        let mut status_entry = json!({"manager": "ctrl", "operation": "Update", "apiVersion": "apps/v1",
            "time": T2, "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:replicas": {}}}, "subresource": "status"});
        with_status["metadata"]["managedFields"]
            .as_array_mut()
            .unwrap()
            .push(status_entry.take());
        let mut edited = with_status.clone();
        edited["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "debug", "image": "busybox"}));
        let out = record_update(Some(&with_status), &edited, "kubectl-edit", T3, &keys);
        assert_eq!(
            entry(&out, "kubectl-edit", "Update").unwrap()["fieldsV1"],
            json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {
                "k:{\"name\":\"debug\"}": {".": {}, "f:image": {}, "f:name": {}}}}}}})
        );
        let ctrl = entry(&out, "ctrl", "Update").unwrap();
        assert_eq!(ctrl["subresource"], "status");
        // Apply entries sort first, then by time.
        let managers: Vec<&str> = out["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["manager"].as_str())
            .collect();
        assert_eq!(managers, ["a", "ctrl", "kubectl-edit"]);
        // a's re-apply keeps status and the debug container, which it never owned.
        let again = apply(
            Some(&out),
            deployment(Some(1), json!([{"name": "app", "image": "nginx:2"}])),
            "a",
            false,
            T3,
        )
        .unwrap();
        assert_eq!(again["status"], json!({"replicas": 1}));
        assert_eq!(
            again["spec"]["template"]["spec"]["containers"]
                .as_array()
                .map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn a_dropped_item_goes_with_what_others_own_inside_it() {
        let two = json!([{"name": "app", "image": "nginx"}, {"name": "debug", "image": "busybox"}]);
        let live = apply(None, deployment(None, two), "a", false, T1).unwrap();
        let mut edited = live.clone();
        edited["spec"]["template"]["spec"]["containers"][1]["env"] =
            json!([{"name": "X", "value": "1"}]);
        let edited = record_update(Some(&live), &edited, "kubectl-edit", T2, &keys);
        let out = apply(
            Some(&edited),
            deployment(None, json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T3,
        )
        .unwrap();
        assert_eq!(
            out["spec"]["template"]["spec"]["containers"],
            json!([{"name": "app", "image": "nginx"}])
        );
        assert!(entry(&out, "kubectl-edit", "Update").is_none());
    }

    #[test]
    fn an_unowned_object_is_first_owned_by_before_first_apply() {
        let live = deployment(Some(1), json!([{"name": "app", "image": "nginx"}]));
        let r = apply(
            Some(&live),
            deployment(Some(3), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        );
        assert_eq!(
            conflicts(r),
            [(
                "before-first-apply".to_string(),
                ".spec.replicas".to_string()
            )]
        );
        let out = apply(
            Some(&live),
            deployment(Some(1), json!([{"name": "app", "image": "nginx"}])),
            "a",
            false,
            T1,
        )
        .unwrap();
        assert!(owns(&out, "a", "Apply", "/f:spec/f:replicas"));
        assert!(owns(
            &out,
            "before-first-apply",
            "Update",
            "/f:spec/f:replicas"
        ));
    }

    #[test]
    fn kubectl_server_side_apply_keeps_the_client_side_annotation_in_step() {
        let mut live = apply(None, deployment(Some(1), json!([])), "kubectl", false, T1).unwrap();
        live["metadata"]["annotations"] =
            json!({"kubectl.kubernetes.io/last-applied-configuration": "{}", "x": "y"});
        let cfg = deployment(Some(2), json!([]));
        let out = apply(Some(&live), cfg.clone(), "kubectl", false, T2).unwrap();
        let text =
            out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"]
                .as_str()
                .unwrap();
        assert_eq!(serde_json::from_str::<Value>(text).unwrap(), cfg);
        assert_eq!(out["metadata"]["annotations"]["x"], "y");
        // Other managers leave it alone.
        let out = apply(Some(&live), cfg, "r4", true, T2).unwrap();
        assert_eq!(
            out["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"],
            "{}"
        );
    }

    #[test]
    fn conflict_status_messages() {
        let c = |m: &str, f: &str| Conflict {
            manager: m.into(),
            field: f.into(),
        };
        let one = ApplyError::Conflicts(vec![c("a", ".spec.replicas")]);
        assert_eq!(
            one.status_message(),
            "Apply failed with 1 conflict: conflict with \"a\": .spec.replicas"
        );
        let three = ApplyError::Conflicts(vec![c("b", ".x"), c("a", ".y"), c("b", ".z")]);
        assert_eq!(
            three.status_message(),
            "Apply failed with 3 conflicts: conflicts with \"a\":\n- .y\nconflicts with \"b\":\n- .x\n- .z"
        );
    }

    #[test]
    fn old_update_entries_merge_into_ancient_changes() {
        let mut obj =
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {}});
        for i in 0..12 {
            let mut next = obj.clone();
            next["data"][format!("k{i}")] = json!("v");
            obj = record_update(
                Some(&obj),
                &next,
                &format!("writer-{i:02}"),
                &format!("2026-01-01T00:00:{i:02}Z"),
                &keys,
            );
        }
        let managers: Vec<&str> = obj["metadata"]["managedFields"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["manager"].as_str())
            .collect();
        assert_eq!(managers.len(), 10);
        assert!(!managers.contains(&"writer-00") && !managers.contains(&"writer-01"));
        let ancient = entry(&obj, "ancient-changes", "Update").unwrap();
        assert!(ancient["fieldsV1"].pointer("/f:data/f:k0").is_some());
        assert!(ancient["fieldsV1"].pointer("/f:data/f:k1").is_some());
        assert!(owns(&obj, "writer-11", "Update", "/f:data/f:k11"));
    }

    #[test]
    fn sets_and_atomic_lists() {
        let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "finalizers": ["a"]},
            "spec": {"template": {"spec": {"tolerations": [{"key": "k"}]}}}});
        let live = apply(None, cfg, "a", false, T1).unwrap();
        let f = &entry(&live, "a", "Apply").unwrap()["fieldsV1"];
        assert_eq!(f["f:metadata"]["f:finalizers"], json!({"v:\"a\"": {}}));
        assert_eq!(
            f["f:spec"]["f:template"]["f:spec"]["f:tolerations"],
            json!({})
        );
        let cfg = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web", "finalizers": ["b"]},
            "spec": {"template": {"spec": {"tolerations": [{"key": "x"}]}}}});
        let out = apply(Some(&live), cfg, "b", true, T2).unwrap();
        assert_eq!(out["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(
            out["spec"]["template"]["spec"]["tolerations"],
            json!([{"key": "x"}])
        );
        assert!(!owns(
            &out,
            "a",
            "Apply",
            "/f:spec/f:template/f:spec/f:tolerations"
        ));
    }

    #[test]
    fn record_update_on_create_and_reset() {
        let obj = deployment(Some(1), json!([{"name": "app", "image": "nginx"}]));
        let created = record_update(None, &obj, "kubectl-create", T1, &keys);
        let e = entry(&created, "kubectl-create", "Update").unwrap();
        assert_eq!(e["apiVersion"], "apps/v1");
        assert_eq!(e["fieldsType"], "FieldsV1");
        assert_eq!(
            e["fieldsV1"]["f:metadata"],
            json!({"f:labels": {".": {}, "f:app": {}}})
        );
        assert_eq!(e["fieldsV1"]["f:spec"]["f:replicas"], json!({}));
        // Without Go zero values every new map or list is owned itself too (as for CRs).
        assert_eq!(e["fieldsV1"]["f:spec"]["."], json!({}));
        assert_eq!(
            e["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"],
            json!({".": {}, "f:image": {}, "f:name": {}})
        );
        // No change: no new entry, the time stays.
        let same = record_update(Some(&created), &created, "other", T2, &keys);
        assert_eq!(same, created);
        // A removed field leaves every set.
        let mut smaller = created.clone();
        smaller["spec"].as_object_mut().unwrap().remove("replicas");
        let out = record_update(Some(&created), &smaller, "other", T2, &keys);
        assert!(!owns(
            &out,
            "kubectl-create",
            "Update",
            "/f:spec/f:replicas"
        ));
        assert!(entry(&out, "other", "Update").is_none());
        // `managedFields: []` in the request resets them.
        let mut reset = created.clone();
        reset["metadata"]["managedFields"] = json!([]);
        let out = record_update(Some(&created), &reset, "other", T2, &keys);
        assert!(out["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn managed_fields_survive_a_round_trip() {
        let f = json!({"f:metadata": {"f:finalizers": {".": {}, "v:\"x\"": {}}},
            "f:spec": {".": {}, "f:ports": {"k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:port": {}}}}});
        let mut set = FieldSet::new();
        decode_fields(&f, &mut Vec::new(), &mut set).unwrap();
        assert_eq!(encode_fields(&set), f);
        assert!(parse_pe("x:1").is_none() && parse_pe("k:[1]").is_none() && parse_pe("").is_none());
    }

    #[test]
    fn invalid_configurations() {
        let dup = deployment(None, json!([{"name": "a"}, {"name": "a"}]));
        assert!(
            matches!(apply(None, dup, "m", false, T1), Err(ApplyError::Invalid(e)) if e.contains("duplicate"))
        );
        let nokey = deployment(None, json!([{"image": "a"}]));
        assert!(
            matches!(apply(None, nokey, "m", false, T1), Err(ApplyError::Invalid(e)) if e.contains(".spec.template.spec.containers"))
        );
        assert!(matches!(
            apply(None, json!([1]), "m", false, T1),
            Err(ApplyError::Invalid(_))
        ));
        let mf = json!({"metadata": {"managedFields": [{"manager": "x"}]}});
        assert!(matches!(
            apply(None, mf, "m", false, T1),
            Err(ApplyError::Invalid(_))
        ));
        assert!(matches!(
            apply(Some(&json!("x")), json!({}), "m", false, T1),
            Err(ApplyError::Invalid(_))
        ));
    }

    /// Random JSON over the names that matter to patches and lists, to shake out panics.
    pub(crate) fn random_value(rng: &mut rand::rngs::SmallRng, depth: u32) -> Value {
        use rand::Rng;
        const KEYS: &[&str] = &[
            "metadata",
            "spec",
            "template",
            "containers",
            "name",
            "image",
            "finalizers",
            "env",
            "ports",
            "containerPort",
            "labels",
            "managedFields",
            "$patch",
            "$retainKeys",
            "$setElementOrder/containers",
            "$deleteFromPrimitiveList/finalizers",
            "apiVersion",
        ];
        const SCALARS: &[&str] = &["replace", "delete", "merge", "a", "b", "name", "apps/v1"];
        match rng.random_range(0..if depth == 0 { 4 } else { 7 }) {
            0 => Value::Null,
            1 => json!(rng.random_range(0..3)),
            2 => json!(SCALARS[rng.random_range(0..SCALARS.len())]),
            3 => json!(rng.random_bool(0.5)),
            4 | 5 => {
                let mut m = Map::new();
                for _ in 0..rng.random_range(0..4) {
                    let k = KEYS[rng.random_range(0..KEYS.len())];
                    m.insert(k.to_string(), random_value(rng, depth - 1));
                }
                Value::Object(m)
            }
            _ => Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| random_value(rng, depth - 1))
                    .collect(),
            ),
        }
    }

    #[test]
    fn no_panics_on_random_inputs() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
        let pod_keys = |p: &[String]| -> Option<Vec<String>> {
            // Every list keyed, to reach the associative paths as often as possible.
            if p.len().is_multiple_of(2) {
                Some(vec!["name".into()])
            } else {
                Some(vec![])
            }
        };
        let mut applied_ok = 0;
        for _ in 0..3000 {
            let live = random_value(&mut rng, 5);
            let cfg = random_value(&mut rng, 5);
            let force = live.is_object();
            for lk in [
                &keys as &dyn Fn(&[String]) -> Option<Vec<String>>,
                &pod_keys,
            ] {
                if let Ok(applied) = server_side_apply(Some(&live), &cfg, "m", force, T1, lk) {
                    applied_ok += 1;
                    let _ = server_side_apply(Some(&applied), &live, "n", true, T2, lk);
                    let _ = record_update(Some(&applied), &cfg, "u", T3, lk);
                }
                let _ = record_update(Some(&live), &cfg, "u", T3, lk);
            }
        }
        // Enough random pairs apply for the walk to reach the merge, prune and compare paths.
        assert!(applied_ok > 500, "{applied_ok}");
    }

    #[test]
    fn no_panics_on_odd_inputs() {
        let values = [
            json!(null),
            json!({}),
            json!({"metadata": "x"}),
            json!({"metadata": {"managedFields": "x"}}),
            json!({"metadata": {"managedFields": [1, {"operation": "Apply", "fieldsV1": {"q:": {}}}, {"operation": "Update", "fieldsV1": 3}]}}),
            json!({"spec": {"template": {"spec": {"containers": [1, null, {"name": {}}, {"name": {}}]}}}}),
            json!({"spec": {"template": {"spec": {"containers": {"name": "x"}}}}}),
            json!({"spec": {"template": {"spec": "x"}}, "metadata": {"finalizers": [{}, [], 1, 1]}}),
            json!({"spec": {"template": {"spec": {"containers": [{"name": "a", "env": [{"name": 1}, 2]}]}}}}),
        ];
        for live in &values {
            for cfg in &values {
                let _ = server_side_apply(Some(live), cfg, "m", false, T1, &keys);
                let _ = server_side_apply(Some(live), cfg, "m", true, T1, &keys);
                let _ = record_update(Some(live), cfg, "m", T1, &keys);
                let _ = record_update(None, cfg, "m", T1, &keys);
            }
        }
    }
}
