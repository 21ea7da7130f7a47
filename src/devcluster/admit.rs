//! Admission of custom resources: the CRD's schema defaults, pruning (or, with
//! `fieldValidation=Strict`, refusal) of unknown fields, structural validation and CEL rules.
//! The walks themselves are `crate::api::validate`'s, which are generic over schemas.

use serde_json::Value;

use super::resources::ResourceInfo;
use super::status::{ApiError, Cause};
use crate::api::validate::{FieldError, cel_errors_in, schema_errors};

/// One step of a field path as `check_schema` writes it: `spec.agents[0].name`, `a["k"]`.
enum Seg {
    Key(String),
    Index(usize),
}

fn parse_path(path: &str) -> Vec<Seg> {
    let mut out = Vec::new();
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else { break };
            let inner = &r[..end];
            if let Ok(i) = inner.parse::<usize>() {
                out.push(Seg::Index(i));
            } else {
                out.push(Seg::Key(
                    serde_json::from_str::<String>(inner).unwrap_or_else(|_| inner.to_string()),
                ));
            }
            rest = &r[end + 1..];
        } else {
            let r = rest.strip_prefix('.').unwrap_or(rest);
            let end = r.find(['.', '[']).unwrap_or(r.len());
            out.push(Seg::Key(r[..end].to_string()));
            rest = &r[end..];
        }
    }
    out
}

fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    parse_path(path).iter().try_fold(v, |node, seg| match seg {
        Seg::Key(k) => node.get(k),
        Seg::Index(i) => node.get(*i),
    })
}

fn remove_at(v: &mut Value, path: &str) {
    let mut segs = parse_path(path);
    let Some(Seg::Key(last)) = segs.pop() else {
        return;
    };
    let mut node = v;
    for seg in &segs {
        let next = match seg {
            Seg::Key(k) => node.get_mut(k),
            Seg::Index(i) => node.get_mut(*i),
        };
        match next {
            Some(n) => node = n,
            None => return,
        }
    }
    if let Some(m) = node.as_object_mut() {
        m.remove(&last);
    }
}

fn short(v: &Value) -> String {
    match v {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn cause(obj: &Value, e: &FieldError) -> Cause {
    if e.message == "required field missing" {
        return Cause {
            reason: "FieldValueRequired",
            field: e.path.clone(),
            message: "Required value".into(),
        };
    }
    let value = at(obj, &e.path).map(short).unwrap_or_else(|| "null".into());
    let reason = if e.message.starts_with("must be one of") {
        "FieldValueNotSupported"
    } else {
        "FieldValueInvalid"
    };
    let prefix = if reason == "FieldValueNotSupported" {
        "Unsupported value"
    } else {
        "Invalid value"
    };
    Cause {
        reason,
        field: e.path.clone(),
        message: format!("{prefix}: {value}: {}", e.message),
    }
}

/// Default, prune and validate a custom resource against its CRD's schema for `version`.
/// `old` is the stored object on update (CEL transition rules see it as `oldSelf`).
pub fn admit_custom(
    res: &ResourceInfo,
    version: &str,
    obj: &mut Value,
    old: Option<&Value>,
    strict: bool,
) -> Result<(), ApiError> {
    let Some(schema) = res.schema(version) else {
        return Ok(());
    };
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    *obj = kube::core::cel::apply_defaults(schema, obj);
    // The schema's view of metadata is the API server's, not the CRD's.
    let metadata = obj.as_object_mut().and_then(|m| m.remove("metadata"));
    let errors = schema_errors(schema, obj);
    let (unknown, errors): (Vec<_>, Vec<_>) = errors
        .into_iter()
        .partition(|e| e.message == "unknown field");
    if strict && !unknown.is_empty() {
        let list: Vec<String> = unknown
            .iter()
            .map(|e| format!("unknown field \"{}\"", e.path))
            .collect();
        return Err(ApiError::bad_request(format!(
            "{} in version \"{version}\" cannot be handled as a {}: strict decoding error: {}",
            res.kind,
            res.kind,
            list.join(", ")
        )));
    }
    for u in &unknown {
        remove_at(obj, &u.path);
    }
    let mut causes: Vec<Cause> = errors.iter().map(|e| cause(obj, e)).collect();
    if causes.is_empty() {
        if let (Some(m), Some(o)) = (metadata.clone(), obj.as_object_mut()) {
            o.insert("metadata".into(), m);
        }
        for e in cel_errors_in(schema, obj, old) {
            let value = at(obj, &e.path)
                .map(short)
                .unwrap_or_else(|| "\"object\"".into());
            causes.push(Cause {
                reason: "FieldValueInvalid",
                field: e.path.clone(),
                message: format!("Invalid value: {value}: {}", e.message),
            });
        }
    } else if let (Some(m), Some(o)) = (metadata, obj.as_object_mut()) {
        o.insert("metadata".into(), m);
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(res, &name, causes))
    }
}

/// DNS-1123 subdomain: what most kinds accept as `metadata.name`.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_resolve_and_prune() {
        let mut v = json!({"spec": {"agents": [{"name": "a", "x": 1}], "m": {"k.1": 2}}});
        assert_eq!(at(&v, "spec.agents[0].name"), Some(&json!("a")));
        assert_eq!(at(&v, "spec.m[\"k.1\"]"), Some(&json!(2)));
        remove_at(&mut v, "spec.agents[0].x");
        assert_eq!(
            v,
            json!({"spec": {"agents": [{"name": "a"}], "m": {"k.1": 2}}})
        );
    }

    #[test]
    fn subdomains() {
        assert!(is_dns_subdomain("agentworkflows.r4.dev"));
        assert!(!is_dns_subdomain("Bad"));
        assert!(!is_dns_subdomain("a..b"));
    }
}
