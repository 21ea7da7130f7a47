//! Server-side apply: field ownership (`metadata.managedFields`) and conflicts.
//!
//! placeholder, replaced at merge: another engineer owns the real implementation; only the
//! signatures here are binding. This version merges the applied configuration into the live
//! object (a merge patch), never reports a conflict and records no managed fields.

use serde_json::Value;

#[derive(Debug)]
pub struct Conflict {
    pub manager: String,
    pub field: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("conflicts: {0:?}")]
    Conflicts(Vec<Conflict>),
    #[error("{0}")]
    Invalid(String),
}

/// Server-side apply of `applied` by `manager` onto `live` (None: create). Returns the new object with `metadata.managedFields` updated (FieldsV1, operation Apply). Fields this manager applied before and omits now are removed (unless another manager also owns them); a field owned by another manager with a different value is a conflict unless `force` (then ownership moves). `list_keys(path)` gives the merge keys of an associative list at a field path (e.g. `["spec","template","spec","containers"]` → `["name"]`), None = atomic list.
// placeholder, replaced at merge
pub fn server_side_apply(
    live: Option<&Value>,
    applied: &Value,
    _manager: &str,
    _force: bool,
    _now: &str,
    _list_keys: &dyn Fn(&[String]) -> Option<Vec<String>>,
) -> Result<Value, ApplyError> {
    if !applied.is_object() {
        return Err(ApplyError::Invalid(
            "the applied configuration must be an object".into(),
        ));
    }
    Ok(match live {
        Some(live) => super::patch::merge_patch(live, applied),
        None => applied.clone(),
    })
}

/// Record a non-apply write (create/update/patch) by `manager` (operation Update): the fields whose values changed from `old` to `new` become owned by `manager` and leave other managers' sets.
// placeholder, replaced at merge
pub fn record_update(
    _old: Option<&Value>,
    new: &Value,
    _manager: &str,
    _now: &str,
    _list_keys: &dyn Fn(&[String]) -> Option<Vec<String>>,
) -> Value {
    new.clone()
}
