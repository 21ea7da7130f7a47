//! Patch functions (merge, JSON, strategic) as pure functions on `serde_json::Value`.
//!
//! placeholder, replaced at merge: another engineer owns the real implementations; only the
//! signatures here are binding. `merge_patch` is real; `json_patch` leans on the `json-patch`
//! crate; `strategic_merge_patch` is a merge patch with the strategic directives stripped.

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PatchError(pub String);

/// RFC 7386.
pub fn merge_patch(target: &Value, patch: &Value) -> Value {
    let Value::Object(p) = patch else {
        return patch.clone();
    };
    let mut out = match target {
        Value::Object(t) => t.clone(),
        _ => serde_json::Map::new(),
    };
    for (k, v) in p {
        if v.is_null() {
            out.remove(k);
        } else {
            let merged = merge_patch(out.get(k).unwrap_or(&Value::Null), v);
            out.insert(k.clone(), merged);
        }
    }
    Value::Object(out)
}

/// RFC 6902 (add, remove, replace, move, copy, test).
// placeholder, replaced at merge
pub fn json_patch(target: &Value, ops: &Value) -> Result<Value, PatchError> {
    let ops: json_patch::Patch =
        serde_json::from_value(ops.clone()).map_err(|e| PatchError(e.to_string()))?;
    let mut doc = target.clone();
    json_patch::patch(&mut doc, &ops).map_err(|e| PatchError(e.to_string()))?;
    Ok(doc)
}

/// Strategic merge patch for the built-in kinds (`api_version`, `kind` pick the list merge keys); for unknown kinds it is a merge patch.
// placeholder, replaced at merge: a merge patch (lists replaced whole) without the directives.
pub fn strategic_merge_patch(
    target: &Value,
    patch: &Value,
    _api_version: &str,
    _kind: &str,
) -> Result<Value, PatchError> {
    fn strip(v: &Value) -> Value {
        match v {
            Value::Object(m) => Value::Object(
                m.iter()
                    .filter(|(k, _)| !k.starts_with('$'))
                    .map(|(k, v)| (k.clone(), strip(v)))
                    .collect(),
            ),
            Value::Array(a) => Value::Array(a.iter().map(strip).collect()),
            other => other.clone(),
        }
    }
    Ok(merge_patch(target, &strip(patch)))
}
