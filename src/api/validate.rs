//! Offline validation of r4 manifests: the same checks the API server applies (the CRD's
//! structural schema, strict about unknown fields, and its CEL rules) plus the semantic rules a
//! schema cannot express. One implementation serves `r4 validate`, the controller's `Valid`
//! condition and `r4 run`.
//!
//! Every problem is a [`FieldError`] naming the field path the way users read it:
//! `spec.agents[1].tools: unknown tool "ledger"`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::Value;

use super::common::{DNS_LABEL, DurationStr};
use super::drill::{ChaosDrill, ChaosDrillSpec, Fault, FaultType};
use super::policy::{CircuitPolicy, CircuitPolicySpec, WindowKind};
use super::workflow::{
    AgentWorkflow, AgentWorkflowSpec, DegradedAction, LatencySpec, OutageWindow,
};
use super::{API_VERSION, crds};

/// One problem with one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field (`spec.retry.maxAttempts`).
    pub path: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// A decoded, schema-valid r4 manifest.
#[derive(Clone, Debug)]
pub enum Manifest {
    Workflow(Box<AgentWorkflow>),
    Policy(Box<CircuitPolicy>),
    Drill(Box<ChaosDrill>),
}

impl Manifest {
    pub fn kind(&self) -> &'static str {
        match self {
            Manifest::Workflow(_) => "AgentWorkflow",
            Manifest::Policy(_) => "CircuitPolicy",
            Manifest::Drill(_) => "ChaosDrill",
        }
    }

    pub fn name(&self) -> &str {
        let meta = match self {
            Manifest::Workflow(o) => &o.metadata,
            Manifest::Policy(o) => &o.metadata,
            Manifest::Drill(o) => &o.metadata,
        };
        meta.name.as_deref().unwrap_or("")
    }

    pub fn namespace(&self) -> Option<&str> {
        let meta = match self {
            Manifest::Workflow(o) => &o.metadata,
            Manifest::Policy(o) => &o.metadata,
            Manifest::Drill(o) => &o.metadata,
        };
        meta.namespace.as_deref()
    }
}

/// Split a YAML stream into documents, skipping empty ones. Each entry is the document's
/// 1-based position and its value, or a parse error naming the position.
pub fn parse_documents(text: &str) -> Vec<(usize, Result<Value, String>)> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        match Value::deserialize(doc) {
            Ok(Value::Null) => {}
            Ok(v) => out.push((i + 1, Ok(v))),
            Err(e) => {
                out.push((i + 1, Err(format!("invalid YAML: {e}"))));
                // The deserializer cannot resynchronise after a syntax error.
                break;
            }
        }
    }
    out
}

/// Validate one document: kind, structural schema, CEL rules, then the semantic rules.
/// On success the typed manifest is returned.
pub fn validate_value(value: &Value) -> Result<Manifest, Vec<FieldError>> {
    let api_version = value.get("apiVersion").and_then(Value::as_str);
    let kind = value.get("kind").and_then(Value::as_str);
    match api_version {
        Some(API_VERSION) => {}
        Some(other) => {
            return Err(vec![FieldError::new(
                "apiVersion",
                format!("must be {API_VERSION:?}, got {other:?}"),
            )]);
        }
        None => {
            return Err(vec![FieldError::new(
                "apiVersion",
                "required field missing",
            )]);
        }
    }
    let Some(kind) = kind else {
        return Err(vec![FieldError::new("kind", "required field missing")]);
    };
    let Some(schema) = schema_for(kind) else {
        return Err(vec![FieldError::new(
            "kind",
            format!("unknown kind {kind:?} (expected AgentWorkflow, CircuitPolicy or ChaosDrill)"),
        )]);
    };

    let mut errors = check_metadata(value);
    check_schema(schema, value, "", &mut errors);
    // Every problem of the document at once: after schema errors, the CEL and semantic rules
    // still run, on a copy whose bad values are replaced by well-typed placeholders; what they
    // say about a replaced value is left out (it would be about the placeholder).
    let mut repaired = Vec::new();
    let mut checked = value.clone();
    if !errors.is_empty() {
        repair(schema, &mut checked, "", &mut repaired);
    }
    let about_repaired = |e: &FieldError| repaired.iter().any(|r| related(&e.path, r));

    let decoded = match kind {
        "AgentWorkflow" => {
            serde_json::from_value(checked.clone()).map(|o| Manifest::Workflow(Box::new(o)))
        }
        "CircuitPolicy" => {
            serde_json::from_value(checked.clone()).map(|o| Manifest::Policy(Box::new(o)))
        }
        _ => serde_json::from_value(checked.clone()).map(|o| Manifest::Drill(Box::new(o))),
    };
    let manifest = match decoded {
        Ok(m) => m,
        Err(_) if !errors.is_empty() => return Err(errors),
        Err(e) => return Err(vec![FieldError::new("", format!("cannot decode: {e}"))]),
    };

    let semantic: Vec<FieldError> = match &manifest {
        Manifest::Workflow(w) => check_workflow(w.metadata.name.as_deref().unwrap_or(""), &w.spec),
        Manifest::Policy(p) => check_policy(&p.spec),
        Manifest::Drill(d) => check_drill(&d.spec, None),
    }
    .into_iter()
    .filter(|e| !about_repaired(e))
    .collect();
    for cel in check_cel(schema, &checked, None) {
        // A semantic rule at the same place already said it more precisely.
        if !semantic.iter().any(|s| s.path.starts_with(&cel.path)) && !about_repaired(&cel) {
            errors.push(cel);
        }
    }
    errors.extend(semantic);
    if errors.is_empty() {
        Ok(manifest)
    } else {
        Err(errors)
    }
}

/// Whether two field paths are the same field or one holds the other (`spec` holds
/// `spec.agents[1].name`; `spec.agents[1]` does not hold `spec.agents[10]`).
fn related(a: &str, b: &str) -> bool {
    let holds = |outer: &str, inner: &str| {
        outer.is_empty()
            || inner == outer
            || inner
                .strip_prefix(outer)
                .is_some_and(|rest| rest.starts_with(['.', '[']))
    };
    holds(a, b) || holds(b, a)
}

/// Make a document that failed the schema decodable, so the remaining rules can still run:
/// a value of the wrong type (or outside its enum) becomes a placeholder of the right type, a
/// missing required field gets one, an unknown field is removed. The paths touched, written
/// as [`check_schema`] writes them, go to `repaired`. Values that are well-typed but out of
/// range or off-pattern are kept: the rules may read them.
fn repair(schema: &Value, value: &mut Value, path: &str, repaired: &mut Vec<String>) {
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            *value = placeholder(schema);
            repaired.push(path.to_string());
        }
        return;
    }
    let ty = schema.get("type").and_then(Value::as_str);
    let in_enum = schema
        .get("enum")
        .and_then(Value::as_array)
        .is_none_or(|allowed| allowed.contains(value));
    if !has_type(ty, value) || !in_enum {
        *value = placeholder(schema);
        // An enum is a discriminator (`action`, `type`): the rules about its siblings depend
        // on the value the placeholder made up, so they are left out too.
        let scope = if schema.get("enum").is_some() {
            parent(path)
        } else {
            path
        };
        repaired.push(scope.to_string());
        return;
    }
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    match value {
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        let s = props.and_then(|p| p.get(r)).unwrap_or(&Value::Null);
                        map.insert(r.to_string(), placeholder(s));
                        repaired.push(join(path, r));
                    }
                }
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for k in keys {
                let child = if additional.is_some() && props.is_none() {
                    format!("{path}[{k:?}]")
                } else {
                    join(path, &k)
                };
                let sub = props.and_then(|p| p.get(&k)).or(additional);
                match (sub, map.get_mut(&k)) {
                    (Some(s), Some(v)) => repair(s, v, &child, repaired),
                    (None, _)
                        if !(preserve
                            || path.is_empty()
                                && matches!(k.as_str(), "apiVersion" | "kind" | "metadata")) =>
                    {
                        map.remove(&k);
                        repaired.push(child);
                    }
                    _ => {}
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter_mut().enumerate() {
                    repair(item_schema, v, &format!("{path}[{i}]"), repaired);
                }
            }
        }
        _ => {}
    }
}

/// The path of the object holding `path` (`spec.agents[1].degradedMode` for
/// `spec.agents[1].degradedMode.action`, `spec.faults` for `spec.faults[0]`).
fn parent(path: &str) -> &str {
    let cut = if path.ends_with(']') {
        path.rfind('[')
    } else {
        path.rfind('.')
    };
    cut.map_or("", |i| &path[..i])
}

/// A well-typed stand-in for a value of `schema`: its default, else its first enum value, else
/// the type's zero (objects with their required fields).
fn placeholder(schema: &Value) -> Value {
    if let Some(d) = schema.get("default") {
        return d.clone();
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
    {
        return first.clone();
    }
    let min = schema.get("minimum").and_then(Value::as_f64).unwrap_or(0.0);
    match schema.get("type").and_then(Value::as_str) {
        Some("object") => {
            let props = schema.get("properties").and_then(Value::as_object);
            let mut m = serde_json::Map::new();
            for r in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let s = props.and_then(|p| p.get(r)).unwrap_or(&Value::Null);
                m.insert(r.to_string(), placeholder(s));
            }
            Value::Object(m)
        }
        Some("array") => Value::Array(Vec::new()),
        Some("string") => Value::String(String::new()),
        Some("integer") => Value::from(min as i64),
        Some("number") => Value::from(min),
        Some("boolean") => Value::Bool(false),
        _ => Value::Null,
    }
}

/// Whether `value` has the OpenAPI type `ty` (no type: anything).
fn has_type(ty: Option<&str>, value: &Value) -> bool {
    match ty {
        Some("object") => value.is_object(),
        Some("array") => value.is_array(),
        Some("string") => value.is_string(),
        Some("boolean") => value.is_boolean(),
        Some("integer") => {
            value.as_i64().is_some()
                || value.as_u64().is_some()
                || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        Some("number") => value.is_number(),
        _ => true,
    }
}

fn schema_for(kind: &str) -> Option<&'static Value> {
    static SCHEMAS: OnceLock<BTreeMap<String, Value>> = OnceLock::new();
    SCHEMAS
        .get_or_init(|| {
            crds()
                .into_iter()
                .filter_map(|crd| {
                    let schema = crd
                        .spec
                        .versions
                        .first()?
                        .schema
                        .as_ref()?
                        .open_api_v3_schema
                        .as_ref()?;
                    Some((
                        crd.spec.names.kind.clone(),
                        serde_json::to_value(schema).ok()?,
                    ))
                })
                .collect()
        })
        .get(kind)
}

fn check_metadata(value: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let meta = value.get("metadata");
    match meta.and_then(|m| m.get("name")).and_then(Value::as_str) {
        None => errors.push(FieldError::new("metadata.name", "required field missing")),
        Some(name) if !is_dns_label(name) => errors.push(FieldError::new(
            "metadata.name",
            format!(
                "{name:?} is not a DNS-1123 label (lowercase letters, digits and '-', at most 63)"
            ),
        )),
        Some(_) => {}
    }
    if let Some(ns) = meta.and_then(|m| m.get("namespace")) {
        match ns.as_str() {
            Some(n) if is_dns_label(n) => {}
            _ => errors.push(FieldError::new(
                "metadata.namespace",
                format!("{ns} is not a DNS-1123 label"),
            )),
        }
    }
    errors
}

/// DNS-1123 label: what Kubernetes accepts as a namespace, Service or container name.
pub fn is_dns_label(s: &str) -> bool {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    s.len() <= 63 && RE.get_or_init(|| regex_or_never(DNS_LABEL)).is_match(s)
}

fn regex_or_never(pattern: &str) -> regex::Regex {
    // Patterns come from our own schema; a pattern the regex crate refuses matches nothing,
    // so the field is reported rather than the validator crashing.
    regex::Regex::new(pattern)
        .unwrap_or_else(|_| regex::Regex::new(r"[^\s\S]").unwrap_or_else(|_| unreachable!()))
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 60 {
        format!("{}…", &s[..s.floor_char_boundary(57)])
    } else {
        s
    }
}

/// Walk `value` against an OpenAPI v3 structural schema, as the API server does (with
/// `fieldValidation=Strict`: unknown fields are errors, not silently pruned).
fn check_schema(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            errors.push(FieldError::new(path, "must not be null"));
        }
        return;
    }
    let preserve = schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true);
    let ty = schema.get("type").and_then(Value::as_str);
    if !has_type(ty, value) {
        let want = ty.unwrap_or("?");
        errors.push(FieldError::new(
            path,
            format!(
                "must be {} {want}, got {} {}",
                article(want),
                type_name(value),
                short(value)
            ),
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(|v| v.to_string()).collect();
        errors.push(FieldError::new(
            path,
            format!("must be one of {}, got {}", list.join(", "), short(value)),
        ));
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
                && map.len() as u64 > max
            {
                errors.push(FieldError::new(
                    path,
                    format!("must have at most {max} entries, got {}", map.len()),
                ));
            }
            let props = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if let Some(required) = schema.get("required").and_then(Value::as_array) {
                for r in required.iter().filter_map(Value::as_str) {
                    if !map.contains_key(r) {
                        errors.push(FieldError::new(join(path, r), "required field missing"));
                    }
                }
            }
            for (k, v) in map {
                let child = if additional.is_some() && props.is_none() {
                    format!("{path}[{k:?}]")
                } else {
                    join(path, k)
                };
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    check_schema(s, v, &child, errors);
                } else if let Some(s) = additional {
                    check_schema(s, v, &child, errors);
                } else if !(preserve
                    || path.is_empty() && matches!(k.as_str(), "apiVersion" | "kind" | "metadata"))
                {
                    errors.push(FieldError::new(child, "unknown field"));
                }
            }
        }
        Value::Array(items) => {
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
                && items.len() as u64 > max
            {
                errors.push(FieldError::new(
                    path,
                    format!("must have at most {max} items, got {}", items.len()),
                ));
            }
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
                && (items.len() as u64) < min
            {
                errors.push(FieldError::new(
                    path,
                    format!("must have at least {min} item(s), got {}", items.len()),
                ));
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
                for (i, v) in items.iter().enumerate() {
                    if items[..i].contains(v) {
                        errors.push(FieldError::new(
                            format!("{path}[{i}]"),
                            format!("duplicate entry {}", short(v)),
                        ));
                    }
                }
            }
            if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("map") {
                // An associative list: no two items may share their map keys.
                let keys: Vec<&str> = schema
                    .get("x-kubernetes-list-map-keys")
                    .and_then(Value::as_array)
                    .map(|k| k.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let key_of = |v: &Value| -> Vec<Value> {
                    keys.iter()
                        .map(|k| v.get(*k).cloned().unwrap_or(Value::Null))
                        .collect()
                };
                for (i, v) in items.iter().enumerate() {
                    let k = key_of(v);
                    if items[..i].iter().any(|o| key_of(o) == k) {
                        let shown: Vec<String> = k.iter().map(short).collect();
                        errors.push(FieldError::new(
                            format!("{path}[{i}]"),
                            format!("duplicate entry with key {}", shown.join(", ")),
                        ));
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check_schema(item_schema, v, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as u64;
            if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
                && len > max
            {
                errors.push(FieldError::new(
                    path,
                    format!("must be at most {max} characters, got {len}"),
                ));
            }
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
                && len < min
            {
                errors.push(FieldError::new(
                    path,
                    format!("must be at least {min} character(s), got {len}"),
                ));
            }
            if let Some(p) = schema.get("pattern").and_then(Value::as_str)
                && !pattern_matches(p, s)
            {
                errors.push(FieldError::new(
                    path,
                    format!("{s:?} does not match {}", describe_pattern(p)),
                ));
            }
        }
        Value::Number(n) => {
            let Some(x) = n.as_f64() else { return };
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
                && x < min
            {
                errors.push(FieldError::new(
                    path,
                    format!("must be >= {}, got {n}", num(min)),
                ));
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
                && x > max
            {
                errors.push(FieldError::new(
                    path,
                    format!("must be <= {}, got {n}", num(max)),
                ));
            }
            if schema.get("format").and_then(Value::as_str) == Some("int32")
                && (x < i32::MIN as f64 || x > i32::MAX as f64)
            {
                errors.push(FieldError::new(
                    path,
                    format!("must fit in 32 bits, got {n}"),
                ));
            }
        }
        _ => {}
    }
}

fn article(ty: &str) -> &'static str {
    if ty.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

fn describe_pattern(p: &str) -> String {
    match p {
        super::common::DNS_LABEL => "a DNS-1123 label (lowercase letters, digits and '-')".into(),
        super::common::DURATION => "a duration such as 150ms, 2s, 5m, 168h or 1h30m".into(),
        super::common::HTTP_URL => "an http(s) URL".into(),
        super::common::REDIS_URL => "a redis:// or rediss:// URL".into(),
        other => format!("the pattern {other}"),
    }
}

fn pattern_matches(pattern: &str, s: &str) -> bool {
    static CACHE: OnceLock<std::sync::Mutex<BTreeMap<String, regex::Regex>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let mut guard = match cache.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    guard
        .entry(pattern.to_string())
        .or_insert_with(|| regex_or_never(pattern))
        .is_match(s)
}

/// Only the CEL rules of the document's kind (no semantic twins), as the API server would
/// report them; for tests and for tools that want the server's view.
pub fn cel_errors(value: &Value) -> Vec<FieldError> {
    match value
        .get("kind")
        .and_then(Value::as_str)
        .and_then(schema_for)
    {
        Some(schema) => check_cel(schema, value, None),
        None => vec![FieldError::new("kind", "unknown kind")],
    }
}

/// Any object against any CRD's structural schema (not only r4's kinds): the same walk
/// `r4 validate` does, for the dev API server's admission of custom resources. Unknown fields
/// are reported as `unknown field` (the caller decides whether to refuse or prune them).
pub fn schema_errors(schema: &Value, value: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    check_schema(schema, value, "", &mut errors);
    errors
}

/// Any schema's CEL `x-kubernetes-validations`, with the previous object for transition rules
/// (`oldSelf`); schema defaults are applied first, as the API server does.
pub fn cel_errors_in(schema: &Value, value: &Value, old: Option<&Value>) -> Vec<FieldError> {
    check_cel(schema, value, old)
}

/// Every CEL rule in the three CRDs with the warnings of a static analysis (compilation,
/// scope, cost against the API server's budget). Empty warnings mean the API server should
/// accept the rule.
pub fn cel_rule_report() -> Vec<(String, String, Vec<String>)> {
    fn walk(kind: &str, node: &Value, out: &mut Vec<(String, String, Vec<String>)>) {
        if let Some(rules) = node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        {
            let compiled = kube::core::cel::compile_schema(node);
            for r in rules
                .iter()
                .filter_map(|r| r.get("rule").and_then(Value::as_str))
            {
                let mut warnings: Vec<String> = kube::core::cel::analyze_rule(
                    r,
                    &compiled,
                    kube::core::cel::ScopeContext::CrdValidation,
                )
                .into_iter()
                .filter(|w| !bound_by_macro(r, w))
                .map(|w| w.message)
                .collect();
                if let Err(e) = kube::core::cel::cel::Program::compile(r) {
                    warnings.push(format!("does not compile: {e}"));
                }
                out.push((kind.to_string(), r.to_string(), warnings));
            }
        }
        match node {
            Value::Object(m) => m.values().for_each(|v| walk(kind, v, out)),
            Value::Array(a) => a.iter().for_each(|v| walk(kind, v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    for kind in ["AgentWorkflow", "CircuitPolicy", "ChaosDrill"] {
        if let Some(schema) = schema_for(kind) {
            walk(kind, schema, &mut out);
        }
    }
    out
}

/// The scope analysis does not know the variables that `all`/`exists`/`exists_one`/`map`/`filter`
/// bind (`agents.all(a, …)`); such a warning about `a` is not a problem.
fn bound_by_macro(rule: &str, w: &kube::core::cel::AnalysisWarning) -> bool {
    if w.kind != kube::core::cel::WarningKind::WrongScope {
        return false;
    }
    let var = w.message.split('\'').nth(1).unwrap_or("");
    !var.is_empty() && rule.contains(&format!("({var}, "))
}

/// Evaluate the schema's `x-kubernetes-validations` CEL rules as the API server would.
fn check_cel(schema: &Value, value: &Value, old: Option<&Value>) -> Vec<FieldError> {
    match kube::core::cel::Validator::new().validate(schema, value, old) {
        Ok(()) => Vec::new(),
        Err(errs) => errs
            .iter()
            .map(|e| {
                FieldError::new(
                    e.field_path.trim_start_matches('.').to_string(),
                    e.message.clone(),
                )
            })
            .collect(),
    }
}

fn dur(errors: &mut Vec<FieldError>, path: &str, d: &DurationStr) -> Option<Duration> {
    match d.parse() {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(FieldError::new(path, e));
            None
        }
    }
}

fn positive(errors: &mut Vec<FieldError>, path: &str, d: &DurationStr) -> Option<Duration> {
    let v = dur(errors, path, d)?;
    if v.is_zero() {
        errors.push(FieldError::new(path, "must be greater than 0"));
        return None;
    }
    Some(v)
}

/// An agent's `hedge`: only an idempotent agent may get a second, concurrent delivery of
/// the same task, and the delay is exactly one of `percentile` and `fixed`.
fn agent_hedge(
    errors: &mut Vec<FieldError>,
    p: &str,
    idempotent: Option<bool>,
    h: &crate::api::workflow::AgentHedgeSpec,
) {
    if idempotent != Some(true) {
        errors.push(FieldError::new(
            format!("{p}.hedge"),
            "only an agent marked idempotent: true may be hedged (a shadow delivery repeats its work)",
        ));
    }
    match (&h.delay.percentile, &h.delay.fixed) {
        (Some(_), None) => {}
        (None, Some(f)) => {
            positive(errors, &format!("{p}.hedge.delay.fixed"), f);
        }
        _ => errors.push(FieldError::new(
            format!("{p}.hedge.delay"),
            "exactly one of percentile and fixed must be set",
        )),
    }
    if let Some(pc) = h.delay.percentile
        && !(50.0..=99.99).contains(&pc)
    {
        errors.push(FieldError::new(
            format!("{p}.hedge.delay.percentile"),
            "must be between 50 and 99.99",
        ));
    }
    if let Some(m) = h.max_extra_load
        && !(m > 0.0 && m <= 1.0)
    {
        errors.push(FieldError::new(
            format!("{p}.hedge.maxExtraLoad"),
            "must be > 0 and <= 1",
        ));
    }
}

/// A simulated latency's tail is `ms` or `pareto`, never both or neither.
fn sim_latency(errors: &mut Vec<FieldError>, path: &str, l: &LatencySpec) {
    if let Some(t) = &l.tail
        && t.ms.is_some() == t.pareto.is_some()
    {
        errors.push(FieldError::new(
            format!("{path}.tail"),
            "exactly one of ms and pareto must be set",
        ));
    }
}

/// Simulation windows (`after`, `for`) must parse, and last.
fn sim_windows(errors: &mut Vec<FieldError>, path: &str, windows: &[OutageWindow]) {
    for (j, w) in windows.iter().enumerate() {
        dur(errors, &format!("{path}[{j}].after"), &w.after);
        positive(errors, &format!("{path}[{j}].for"), &w.for_);
    }
}

/// Semantic rules of an AgentWorkflow that the schema cannot express (or cannot name precisely).
/// `name` is `metadata.name`; child object names are derived from it.
pub fn check_workflow(name: &str, spec: &AgentWorkflowSpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    let tools: BTreeSet<&str> = spec.tools.iter().map(|t| t.name.as_str()).collect();
    let agents: BTreeSet<&str> = spec.agents.iter().map(|a| a.name.as_str()).collect();

    if let Some(url) = &spec.queue.redis.url
        && let Err(err) = redis::Client::open(url.as_str())
    {
        e.push(FieldError::new(
            "spec.queue.redis.url",
            format!("invalid Redis URL: {err}"),
        ));
    }
    if let Some(v) = &spec.queue.visibility_timeout
        && let Some(d) = positive(&mut e, "spec.queue.visibilityTimeout", v)
        && d < Duration::from_secs(1)
    {
        e.push(FieldError::new(
            "spec.queue.visibilityTimeout",
            format!("must be at least 1s, got {v}"),
        ));
    }

    let mut seen_tools = BTreeSet::new();
    for (i, t) in spec.tools.iter().enumerate() {
        if !seen_tools.insert(t.name.as_str()) {
            e.push(FieldError::new(
                format!("spec.tools[{i}].name"),
                format!("duplicate tool {:?}", t.name),
            ));
        }
        let mut seen_headers = BTreeSet::new();
        for (j, h) in t.headers_from.iter().enumerate() {
            let lower = h.name.to_ascii_lowercase();
            let path = format!("spec.tools[{i}].headersFrom[{j}].name");
            if crate::api::workflow::RESERVED_TOOL_HEADERS.contains(&lower.as_str()) {
                e.push(FieldError::new(
                    path,
                    format!("{:?} is set by the tool proxy itself", h.name),
                ));
            } else if !seen_headers.insert(lower) {
                e.push(FieldError::new(
                    path,
                    format!("duplicate header {:?} (names are case-insensitive)", h.name),
                ));
            }
        }
        if let Some(c) = t.fallback.as_ref().and_then(|f| f.cache.as_ref()) {
            positive(
                &mut e,
                &format!("spec.tools[{i}].fallback.cache.ttl"),
                &c.ttl,
            );
        }
        if let Some(sim) = &t.simulate {
            let p = format!("spec.tools[{i}].simulate");
            sim_latency(&mut e, &format!("{p}.latency"), &sim.latency);
            sim_windows(&mut e, &format!("{p}.outages"), &sim.outages);
            if let Some(th) = &sim.throttle {
                sim_windows(&mut e, &format!("{p}.throttle.windows"), &th.windows);
            }
        }
    }

    // Streams written inside the workflow: produced by an agent, or the
    // input of a joining agent (the join writes the joined task there).
    let produced: BTreeSet<&str> = spec
        .agents
        .iter()
        .flat_map(|a| a.produces.iter().map(String::as_str))
        .chain(
            spec.agents
                .iter()
                .filter(|a| a.join.is_some())
                .map(|a| a.consumes.as_str()),
        )
        .collect();
    check_joins(spec, &mut e);
    let mut seen_agents = BTreeSet::new();
    for (i, a) in spec.agents.iter().enumerate() {
        let p = format!("spec.agents[{i}]");
        if !seen_agents.insert(a.name.as_str()) {
            e.push(FieldError::new(
                format!("{p}.name"),
                format!("duplicate agent {:?}", a.name),
            ));
        }
        let child = format!("{name}-{}", a.name);
        if child.len() > 63 {
            e.push(FieldError::new(
                format!("{p}.name"),
                format!("Deployment name {child:?} would be {} characters; workflow and agent names together must fit 62", child.len()),
            ));
        }
        for t in &a.tools {
            if !tools.contains(t.as_str()) {
                e.push(FieldError::new(
                    format!("{p}.tools"),
                    format!("unknown tool {t:?}"),
                ));
            }
        }
        if a.produces.contains(&a.consumes) {
            e.push(FieldError::new(
                format!("{p}.produces"),
                format!(
                    "agent {:?} must not produce the stream it consumes ({:?})",
                    a.name, a.consumes
                ),
            ));
        }
        if let Some(d) = &a.degraded_mode {
            for t in &d.when_tools_down {
                if !a.tools.contains(t) {
                    e.push(FieldError::new(
                        format!("{p}.degradedMode.whenToolsDown"),
                        format!("tool {t:?} is not one of agent {:?}'s tools", a.name),
                    ));
                }
            }
            match (&d.action, &d.to) {
                (DegradedAction::Route, None) => e.push(FieldError::new(
                    format!("{p}.degradedMode.to"),
                    "required when action is Route",
                )),
                (DegradedAction::Route, Some(to)) if *to == a.consumes => e.push(FieldError::new(
                    format!("{p}.degradedMode.to"),
                    format!("routing to {to:?}, the agent's own input, would loop"),
                )),
                (DegradedAction::Pause | DegradedAction::Fail, Some(_)) => e.push(FieldError::new(
                    format!("{p}.degradedMode.to"),
                    "only used when action is Route",
                )),
                _ => {}
            }
        }
        if let Some(h) = &a.hedge {
            agent_hedge(&mut e, &p, a.idempotent, h);
        }
        if let Some(sim) = &a.simulate {
            sim_latency(&mut e, &format!("{p}.simulate.latency"), &sim.latency);
            sim_windows(&mut e, &format!("{p}.simulate.outages"), &sim.outages);
            for (j, w) in sim.slowdowns.iter().enumerate() {
                let wp = format!("{p}.simulate.slowdowns[{j}]");
                dur(&mut e, &format!("{wp}.after"), &w.after);
                positive(&mut e, &format!("{wp}.for"), &w.for_);
            }
            for (j, c) in sim.calls.iter().enumerate() {
                if !a.tools.contains(c) {
                    e.push(FieldError::new(
                        format!("{p}.simulate.calls[{j}]"),
                        format!("tool {c:?} is not in {p}.tools"),
                    ));
                }
            }
        }
    }
    if !spec.agents.is_empty()
        && spec
            .agents
            .iter()
            .all(|a| produced.contains(a.consumes.as_str()))
    {
        e.push(FieldError::new(
            "spec.agents",
            "no entry stream: every consumed stream is produced by another agent, so no task can enter",
        ));
    }
    // Every consumed stream needs a writer, or its agent waits forever.
    let routed: BTreeSet<&str> = spec
        .agents
        .iter()
        .filter_map(|a| a.degraded_mode.as_ref()?.to.as_deref())
        .collect();
    let entry = entry_stream(spec);
    for (i, a) in spec.agents.iter().enumerate() {
        let s = a.consumes.as_str();
        if !produced.contains(s)
            && !routed.contains(s)
            && !spec.inputs.iter().any(|x| x == s)
            && entry != Some(s)
        {
            e.push(FieldError::new(
                format!("spec.agents[{i}].consumes"),
                format!(
                    "agent {:?} consumes stream {s:?}, which no agent produces and the intake does not feed (it feeds {:?}); its tasks would never come — produce it, or list it in spec.inputs if something outside the workflow writes it",
                    a.name,
                    entry.unwrap_or("")
                ),
            ));
        }
    }
    check_graph(spec, entry, &mut e);
    let consumed: BTreeSet<&str> = spec.agents.iter().map(|a| a.consumes.as_str()).collect();
    let mut seen_inputs = BTreeSet::new();
    for (i, s) in spec.inputs.iter().enumerate() {
        let p = format!("spec.inputs[{i}]");
        if !is_dns_label(s) {
            e.push(FieldError::new(
                &p,
                format!("{s:?} is not a DNS-1123 label (a stream name)"),
            ));
        } else if !seen_inputs.insert(s.as_str()) {
            e.push(FieldError::new(&p, format!("duplicate input {s:?}")));
        } else if !consumed.contains(s.as_str()) {
            e.push(FieldError::new(
                &p,
                format!("no agent consumes stream {s:?}"),
            ));
        }
    }

    if let Some(ks) = &spec.kill_switches {
        for k in ks.agents.keys() {
            if !agents.contains(k.as_str()) {
                e.push(FieldError::new(
                    format!("spec.killSwitches.agents.{k}"),
                    format!("unknown agent {k:?}"),
                ));
            }
        }
        for k in ks.tools.keys() {
            if !tools.contains(k.as_str()) {
                e.push(FieldError::new(
                    format!("spec.killSwitches.tools.{k}"),
                    format!("unknown tool {k:?}"),
                ));
            }
        }
    }
    if let Some(slo) = &spec.slo
        && slo.success_rate >= 1.0
    {
        e.push(FieldError::new(
            "spec.slo.successRate",
            "must be < 1 (an objective of 1 leaves no error budget)",
        ));
    }
    e
}

/// The workflow graph (stream → agents consuming it → streams they
/// produce): a stream written by several agents is an error (the agent
/// reading it would run once per writer and its inbox key would drop all
/// but the first — a fan-in joins one stream per producer, `agents[].join`),
/// and so is a cycle reachable from the entry stream or an external input
/// (a task would go round for ever).
fn check_graph(spec: &AgentWorkflowSpec, entry: Option<&str>, e: &mut Vec<FieldError>) {
    let mut producers: BTreeMap<&str, Vec<(usize, &str)>> = BTreeMap::new();
    for (i, a) in spec.agents.iter().enumerate() {
        for s in a.produces.iter().collect::<BTreeSet<_>>() {
            producers
                .entry(s.as_str())
                .or_default()
                .push((i, a.name.as_str()));
        }
    }
    for (stream, by) in &producers {
        if by.len() > 1 {
            let names: Vec<String> = by.iter().map(|(_, n)| format!("{n:?}")).collect();
            e.push(FieldError::new(
                format!("spec.agents[{}].produces", by[1].0),
                format!(
                    "stream {stream:?} is produced by agents {} — the agent reading it would run once per producer and keep only the first; for a fan-in give each producer its own stream and join them (`join: {{streams: [...]}}` on the agent that needs all of them)",
                    names.join(" and ")
                ),
            ));
        }
    }
    // Depth-first from every stream a task can enter by; a stream met again
    // on the current path closes a cycle.
    // A joined stream leads to its joining agent's input.
    let next = |s: &str| -> Vec<&str> {
        spec.agents
            .iter()
            .filter(|a| {
                a.consumes == s
                    || a.join
                        .as_ref()
                        .is_some_and(|j| j.streams.iter().any(|x| x == s))
            })
            .flat_map(|a| -> Vec<&str> {
                if a.consumes == s {
                    a.produces
                        .iter()
                        .map(String::as_str)
                        .chain(a.degraded_mode.as_ref().and_then(|d| d.to.as_deref()))
                        .collect()
                } else {
                    vec![a.consumes.as_str()]
                }
            })
            .collect()
    };
    let starts: Vec<&str> = entry
        .into_iter()
        .chain(spec.inputs.iter().map(String::as_str))
        .collect();
    let mut done: BTreeSet<&str> = BTreeSet::new();
    let mut reported = false;
    for start in starts {
        let mut path: Vec<&str> = Vec::new();
        let mut stack: Vec<(&str, bool)> = vec![(start, false)];
        while let Some((s, leaving)) = stack.pop() {
            if leaving {
                path.pop();
                done.insert(s);
                continue;
            }
            if let Some(at) = path.iter().position(|p| *p == s) {
                if !reported {
                    reported = true;
                    let mut cycle: Vec<&str> = path[at..].to_vec();
                    cycle.push(s);
                    e.push(FieldError::new(
                        "spec.agents",
                        format!(
                            "the streams {} form a cycle reachable from {start:?}: a task would go round for ever",
                            cycle.join(" -> ")
                        ),
                    ));
                }
                continue;
            }
            if done.contains(s) {
                continue;
            }
            path.push(s);
            stack.push((s, true));
            for n in next(s) {
                stack.push((n, false));
            }
        }
    }
}

/// Rules of fan-in joins (`agents[].join`): a joined stream is produced by
/// exactly one agent, read by no agent (the join reads it), not an input and
/// joined once; a joining agent's input is written by its join only.
fn check_joins(spec: &AgentWorkflowSpec, e: &mut Vec<FieldError>) {
    let mut joined: BTreeMap<&str, &str> = BTreeMap::new();
    for (i, a) in spec.agents.iter().enumerate() {
        let Some(j) = &a.join else { continue };
        let p = format!("spec.agents[{i}].join");
        if let Some(t) = &j.timeout
            && let Some(d) = positive(e, &format!("{p}.timeout"), t)
            && d < Duration::from_secs(1)
        {
            e.push(FieldError::new(
                format!("{p}.timeout"),
                "must be at least 1s",
            ));
        }
        if j.streams.len() < 2 {
            e.push(FieldError::new(
                format!("{p}.streams"),
                "a join needs at least two streams",
            ));
        }
        for (k, s) in j.streams.iter().enumerate() {
            let sp = format!("{p}.streams[{k}]");
            if j.streams[..k].contains(s) {
                e.push(FieldError::new(&sp, format!("duplicate stream {s:?}")));
                continue;
            }
            if let Some(other) = joined.insert(s.as_str(), a.name.as_str()) {
                e.push(FieldError::new(
                    &sp,
                    format!("stream {s:?} is already joined by agent {other:?}"),
                ));
            }
            let producers = spec
                .agents
                .iter()
                .filter(|b| b.produces.contains(s))
                .count();
            if producers == 0 {
                e.push(FieldError::new(
                    &sp,
                    format!("no agent produces stream {s:?}: the join would never complete"),
                ));
            }
            if let Some(b) = spec.agents.iter().find(|b| b.consumes == *s) {
                e.push(FieldError::new(
                    &sp,
                    format!(
                        "stream {s:?} is consumed by agent {:?}; a joined stream is read by its join only",
                        b.name
                    ),
                ));
            }
            if spec.inputs.contains(s) {
                e.push(FieldError::new(
                    &sp,
                    format!("stream {s:?} is an external input; join streams that agents produce"),
                ));
            }
            if *s == a.consumes {
                e.push(FieldError::new(
                    &sp,
                    format!("the join writes the joined task to {s:?}; it cannot also be joined"),
                ));
            }
        }
        if let Some(b) = spec
            .agents
            .iter()
            .find(|b| b.produces.contains(&a.consumes))
        {
            e.push(FieldError::new(
                format!("spec.agents[{i}].consumes"),
                format!(
                    "agent {:?} joins its input {:?}, which agent {:?} also produces: only the join may write it",
                    a.name, a.consumes, b.name
                ),
            ));
        }
        if spec.inputs.contains(&a.consumes) {
            e.push(FieldError::new(
                format!("spec.agents[{i}].consumes"),
                format!(
                    "agent {:?} joins its input {:?}, which is listed in spec.inputs: only the join may write it",
                    a.name, a.consumes
                ),
            ));
        }
    }
}

/// The stream the intake feeds: the first stream an agent consumes that no agent produces (nor
/// routes to in degraded mode, nor joins into) and that is not an external input
/// (`spec.inputs`). `None` when there is none.
pub fn entry_stream(spec: &AgentWorkflowSpec) -> Option<&str> {
    let written = |s: &str| {
        spec.agents.iter().any(|a| {
            a.produces.iter().any(|p| p == s)
                || (a.join.is_some() && a.consumes == s)
                || a.degraded_mode
                    .as_ref()
                    .is_some_and(|d| d.to.as_deref() == Some(s))
        })
    };
    spec.agents
        .iter()
        .map(|a| a.consumes.as_str())
        .find(|s| !written(s) && !spec.inputs.iter().any(|x| x == s))
}

/// Semantic rules of a CircuitPolicy.
pub fn check_policy(spec: &CircuitPolicySpec) -> Vec<FieldError> {
    let mut e = Vec::new();
    let mut retry_horizon = Duration::ZERO;
    if let Some(t) = &spec.timeout {
        let per = t
            .per_attempt
            .as_ref()
            .and_then(|d| positive(&mut e, "spec.timeout.perAttempt", d));
        let overall = t
            .overall
            .as_ref()
            .and_then(|d| positive(&mut e, "spec.timeout.overall", d));
        if let (Some(p), Some(o)) = (per, overall)
            && p > o
        {
            e.push(FieldError::new(
                "spec.timeout.perAttempt",
                format!(
                    "must be <= timeout.overall ({}), got {}",
                    fmt_d(o),
                    fmt_d(p)
                ),
            ));
        }
        retry_horizon = overall.or(per).unwrap_or_default();
    }
    if let Some(r) = &spec.retry
        && let Some(b) = &r.backoff
    {
        let initial = positive(&mut e, "spec.retry.backoff.initial", &b.initial);
        let max = positive(&mut e, "spec.retry.backoff.max", &b.max);
        if let (Some(i), Some(m)) = (initial, max) {
            if i > m {
                e.push(FieldError::new(
                    "spec.retry.backoff.initial",
                    format!("must be <= backoff.max ({}), got {}", b.max, b.initial),
                ));
            }
            retry_horizon += m.saturating_mul(r.max_attempts.max(1) as u32);
        }
        if let Some(w) = r.budget.as_ref().and_then(|b| b.window.as_ref()) {
            positive(&mut e, "spec.retry.budget.window", w);
        }
    }
    if let Some(h) = &spec.hedge {
        if let Some(f) = h.delay.as_ref().and_then(|d| d.fixed.as_ref()) {
            positive(&mut e, "spec.hedge.delay.fixed", f);
        }
        if let Some(d) = &h.delay
            && d.fixed.is_some() == d.percentile.is_some()
        {
            e.push(FieldError::new(
                "spec.hedge.delay",
                "exactly one of percentile and fixed must be set",
            ));
        }
        if h.enabled && h.max_extra_load == Some(0.0) {
            e.push(FieldError::new(
                "spec.hedge.maxExtraLoad",
                "must be > 0 when hedging is enabled",
            ));
        }
    }
    if let Some(cb) = &spec.circuit_breaker {
        positive(
            &mut e,
            "spec.circuitBreaker.openDuration",
            &cb.open_duration,
        );
        if let Some(s) = &cb.slow_call_duration {
            positive(&mut e, "spec.circuitBreaker.slowCallDuration", s);
        }
        if cb.slow_call_rate_threshold.is_some() && cb.slow_call_duration.is_none() {
            e.push(FieldError::new(
                "spec.circuitBreaker.slowCallDuration",
                "required when slowCallRateThreshold is set",
            ));
        }
        match cb.window.kind {
            WindowKind::Count => match cb.window.size {
                None => e.push(FieldError::new(
                    "spec.circuitBreaker.window.size",
                    "required for a Count window",
                )),
                Some(size) => {
                    if let Some(m) = cb.minimum_calls
                        && m > size
                    {
                        e.push(FieldError::new(
                            "spec.circuitBreaker.minimumCalls",
                            format!("must be <= window.size ({size}), got {m}: the breaker could never open"),
                        ));
                    }
                }
            },
            WindowKind::Time => {
                if cb.window.seconds.is_none() {
                    e.push(FieldError::new(
                        "spec.circuitBreaker.window.seconds",
                        "required for a Time window",
                    ));
                }
            }
        }
        if cb.window.kind == WindowKind::Count && cb.window.seconds.is_some() {
            e.push(FieldError::new(
                "spec.circuitBreaker.window.seconds",
                "only used by a Time window",
            ));
        }
        if cb.window.kind == WindowKind::Time && cb.window.size.is_some() {
            e.push(FieldError::new(
                "spec.circuitBreaker.window.size",
                "only used by a Count window",
            ));
        }
    }
    let mut replay_horizon = Duration::ZERO;
    if let Some(dl) = &spec.dead_letter {
        if let Some(r) = &dl.retention
            && let Some(d) = positive(&mut e, "spec.deadLetter.retention", r)
            && d < Duration::from_secs(60)
        {
            e.push(FieldError::new(
                "spec.deadLetter.retention",
                format!("must be at least 1m, got {r}"),
            ));
        }
        if let Some(rp) = &dl.replay
            && let Some(b) = &rp.backoff
            && let Some(d) = positive(&mut e, "spec.deadLetter.replay.backoff", b)
        {
            // Replays back off exponentially: backoff × (2^n − 1) after n replays.
            let n = rp.max_replays.unwrap_or(3).clamp(0, 30) as u32;
            replay_horizon = d.saturating_mul((1u32 << n).saturating_sub(1));
        }
    }
    if let Some(idem) = &spec.idempotency
        && idem.ttl != "auto"
        && let Some(ttl) = positive(
            &mut e,
            "spec.idempotency.ttl",
            &DurationStr::new(idem.ttl.clone()),
        )
    {
        let horizon = retry_horizon + replay_horizon;
        if ttl < horizon {
            e.push(FieldError::new(
                "spec.idempotency.ttl",
                format!(
                    "{} is shorter than the retry and replay horizon ({}): a replayed task could repeat its effect; use `auto` or at least {}",
                    idem.ttl,
                    fmt_d(horizon),
                    fmt_d(horizon)
                ),
            ));
        }
    }
    e
}

fn fmt_d(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(3_600_000) && ms > 0 {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// Semantic rules of a ChaosDrill; with its workflow at hand, the targets are checked too.
pub fn check_drill(spec: &ChaosDrillSpec, workflow: Option<&AgentWorkflowSpec>) -> Vec<FieldError> {
    let mut e = Vec::new();
    if let Some(s) = &spec.schedule {
        let fields = s.split_whitespace().count();
        if fields != 5 && !s.trim_start().starts_with('@') {
            e.push(FieldError::new(
                "spec.schedule",
                format!("invalid cron expression {s:?}: expected 5 fields (minute hour day-of-month month day-of-week), got {fields}"),
            ));
        } else if let Err(err) = croner::parser::CronParser::new().parse(s) {
            e.push(FieldError::new(
                "spec.schedule",
                format!("invalid cron expression {s:?}: {err}"),
            ));
        }
    }
    let duration = positive(&mut e, "spec.duration", &spec.duration);
    if let Some(b) = &spec.baseline {
        positive(&mut e, "spec.baseline", b);
    }
    if let Some(d) = duration
        && d > Duration::from_secs(24 * 3600)
    {
        e.push(FieldError::new(
            "spec.duration",
            format!("must be at most 24h, got {}", spec.duration),
        ));
    }
    for (i, f) in spec.faults.iter().enumerate() {
        let p = format!("spec.faults[{i}]");
        check_fault_fields(&mut e, &p, f);
        let after = f.after.as_ref().map_or(Some(Duration::ZERO), |a| {
            dur(&mut e, &format!("{p}.after"), a)
        });
        let len = f
            .for_
            .as_ref()
            .map(|x| positive(&mut e, &format!("{p}.for"), x));
        if let (Some(a), Some(d)) = (after, duration) {
            let end = a + len.flatten().unwrap_or_default();
            if a >= d || end > d {
                e.push(FieldError::new(
                    p.clone(),
                    format!(
                        "fault window ends at {} but the drill lasts {}",
                        fmt_d(end.max(a)),
                        spec.duration
                    ),
                ));
            }
        }
        if let Some(w) = workflow {
            if let Some(t) = &f.tool
                && !w.tools.iter().any(|x| x.name == *t)
            {
                e.push(FieldError::new(
                    format!("{p}.tool"),
                    format!("unknown tool {t:?} in workflow {:?}", spec.workflow_ref),
                ));
            }
            if let Some(a) = &f.agent
                && !w.agents.iter().any(|x| x.name == *a)
            {
                e.push(FieldError::new(
                    format!("{p}.agent"),
                    format!("unknown agent {a:?} in workflow {:?}", spec.workflow_ref),
                ));
            }
            if let Some(s) = &f.stream
                && !w
                    .agents
                    .iter()
                    .any(|x| x.consumes == *s || x.produces.contains(s))
            {
                e.push(FieldError::new(
                    format!("{p}.stream"),
                    format!("unknown stream {s:?} in workflow {:?}", spec.workflow_ref),
                ));
            }
        }
    }
    e
}

fn check_fault_fields(e: &mut Vec<FieldError>, p: &str, f: &Fault) {
    use FaultType::*;
    // (field, set, the fault types that use it, the ones that require it). `percent` applies to
    // every type (default 100) except PodKill, which kills `count` pods.
    let present: [(&str, bool, &[FaultType], &[FaultType]); 9] = [
        (
            "tool",
            f.tool.is_some(),
            &[ToolOutage, ToolLatency, ToolErrors],
            &[ToolOutage, ToolLatency, ToolErrors],
        ),
        (
            "agent",
            f.agent.is_some(),
            &[PodKill, AgentSlowdown],
            &[PodKill, AgentSlowdown],
        ),
        (
            "stream",
            f.stream.is_some(),
            &[MessageCorruption, QueueThrottle],
            &[MessageCorruption, QueueThrottle],
        ),
        (
            "latencyMs",
            f.latency_ms.is_some(),
            &[ToolLatency, AgentSlowdown],
            &[ToolLatency, AgentSlowdown],
        ),
        (
            "percent",
            f.percent.is_some(),
            &[
                ToolOutage,
                ToolLatency,
                ToolErrors,
                MessageCorruption,
                QueueThrottle,
                AgentSlowdown,
            ],
            &[MessageCorruption],
        ),
        (
            "errorRate",
            f.error_rate.is_some(),
            &[ToolErrors],
            &[ToolErrors],
        ),
        ("statusCode", f.status_code.is_some(), &[ToolErrors], &[]),
        (
            "retryAfterSeconds",
            f.retry_after_seconds.is_some(),
            &[ToolErrors],
            &[],
        ),
        (
            "maxPerSecond",
            f.max_per_second.is_some(),
            &[QueueThrottle],
            &[QueueThrottle],
        ),
    ];
    for (field, set, used_by, required_by) in present {
        if set && !used_by.contains(&f.kind) {
            e.push(FieldError::new(
                format!("{p}.{field}"),
                format!("not used by a {:?} fault", f.kind),
            ));
        } else if !set && required_by.contains(&f.kind) {
            e.push(FieldError::new(
                format!("{p}.{field}"),
                format!("required for a {:?} fault", f.kind),
            ));
        }
    }
    if f.count.is_some() && f.kind != PodKill {
        e.push(FieldError::new(
            format!("{p}.count"),
            format!("not used by a {:?} fault", f.kind),
        ));
    }
}

/// Whether two documents end up in the same namespace: one without `metadata.namespace` lands
/// in whatever namespace it is applied to (as with `kubectl apply -n`), so it matches any.
pub fn same_namespace(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// How unresolved references between documents are treated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefMode {
    /// Report them as warnings (the referenced object may already be in the cluster).
    Warn,
    /// Report them as errors (`r4 run`: everything must be in the given files).
    Require,
}

/// A finding about a set of manifests: which document, and how serious.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetFinding {
    /// Index into the slice given to [`check_set`].
    pub index: usize,
    pub error: FieldError,
    pub is_error: bool,
}

/// Rules between documents: policy and workflow references, drill targets, duplicate names.
pub fn check_set(manifests: &[Manifest], mode: RefMode) -> Vec<SetFinding> {
    let mut out = Vec::new();
    let key = |m: &Manifest| {
        (
            m.kind(),
            m.namespace().unwrap_or("default").to_string(),
            m.name().to_string(),
        )
    };
    let mut seen = BTreeSet::new();
    for (i, m) in manifests.iter().enumerate() {
        if !seen.insert(key(m)) {
            out.push(SetFinding {
                index: i,
                error: FieldError::new(
                    "metadata.name",
                    format!("duplicate {} {:?}", m.kind(), m.name()),
                ),
                is_error: true,
            });
        }
    }
    let find = |kind: &str, ns: Option<&str>, name: &str| {
        manifests
            .iter()
            .find(|m| m.kind() == kind && same_namespace(m.namespace(), ns) && m.name() == name)
    };
    let unresolved = |index: usize, path: String, what: String| SetFinding {
        index,
        error: FieldError::new(path, format!("{what} not found in the given files")),
        is_error: mode == RefMode::Require,
    };
    for (i, m) in manifests.iter().enumerate() {
        let ns = m.namespace();
        match m {
            Manifest::Workflow(w) => {
                if let Some(p) = &w.spec.policy_ref
                    && find("CircuitPolicy", ns, p).is_none()
                {
                    out.push(unresolved(
                        i,
                        "spec.policyRef".into(),
                        format!("CircuitPolicy {p:?}"),
                    ));
                }
                for (j, t) in w.spec.tools.iter().enumerate() {
                    let Some(p) = &t.policy_ref else { continue };
                    match find("CircuitPolicy", ns, p) {
                        None => out.push(unresolved(
                            i,
                            format!("spec.tools[{j}].policyRef"),
                            format!("CircuitPolicy {p:?}"),
                        )),
                        // Fields only the workflow's own policy decides.
                        Some(Manifest::Policy(pol)) => {
                            let idle: Vec<&str> = [
                                ("deadLetter", pol.spec.dead_letter.is_some()),
                                ("idempotency", pol.spec.idempotency.is_some()),
                            ]
                            .into_iter()
                            .filter_map(|(f, set)| set.then_some(f))
                            .collect();
                            if !idle.is_empty() {
                                out.push(SetFinding {
                                    index: i,
                                    error: FieldError::new(
                                        format!("spec.tools[{j}].policyRef"),
                                        format!(
                                            "CircuitPolicy {p:?} sets {}, which has no effect on a tool's calls: only the workflow's policy (spec.policyRef) decides dead-lettering and idempotency",
                                            idle.join(" and ")
                                        ),
                                    ),
                                    is_error: false,
                                });
                            }
                        }
                        Some(_) => {}
                    }
                }
            }
            Manifest::Drill(d) => match find("AgentWorkflow", ns, &d.spec.workflow_ref) {
                Some(Manifest::Workflow(w)) => {
                    for err in check_drill(&d.spec, Some(&w.spec)) {
                        out.push(SetFinding {
                            index: i,
                            error: err,
                            is_error: true,
                        });
                    }
                }
                _ => out.push(unresolved(
                    i,
                    "spec.workflowRef".into(),
                    format!("AgentWorkflow {:?}", d.spec.workflow_ref),
                )),
            },
            Manifest::Policy(_) => {}
        }
    }
    // check_drill without the workflow already ran per document; keep only the target findings.
    let mut dedup = BTreeSet::new();
    out.retain(|f| dedup.insert((f.index, f.error.to_string())));
    out
}

/// The outcome of validating files: one line per problem, in the order found.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Valid manifests with their source (`file#doc`).
    pub manifests: Vec<(String, Manifest)>,
    /// `source: Kind/name: path: message`.
    pub errors: Vec<String>,
    /// Same shape, not fatal.
    pub warnings: Vec<String>,
}

/// Validate named YAML texts (a file may hold several documents), then the rules between them.
pub fn validate_texts(texts: &[(String, String)], mode: RefMode) -> Report {
    let mut report = Report::default();
    let mut labels = Vec::new();
    for (source, text) in texts {
        for (doc, parsed) in parse_documents(text) {
            let at = format!("{source}#{doc}");
            let value = match parsed {
                Ok(v) => v,
                Err(e) => {
                    report.errors.push(format!("{at}: {e}"));
                    continue;
                }
            };
            let label = describe(&value);
            match validate_value(&value) {
                Ok(m) => {
                    labels.push(format!("{at}: {label}"));
                    report.manifests.push((at, m));
                }
                Err(errs) => report
                    .errors
                    .extend(errs.iter().map(|e| format!("{at}: {label}: {e}"))),
            }
        }
    }
    let manifests: Vec<Manifest> = report.manifests.iter().map(|(_, m)| m.clone()).collect();
    for f in check_set(&manifests, mode) {
        let line = format!("{}: {}", labels[f.index], f.error);
        if f.is_error {
            report.errors.push(line)
        } else {
            report.warnings.push(line)
        }
    }
    report
}

fn describe(value: &Value) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("?");
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or("?");
    format!("{kind}/{name}")
}
