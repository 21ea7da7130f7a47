//! Label and field selectors as list and watch requests carry them.

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Eq(String),
    Ne(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    NotExists,
}

/// A parsed `labelSelector` (`a=b,c!=d,e in (f,g),!h`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LabelSelector(Vec<(String, Op)>);

/// Split at commas outside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0usize, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 317
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
}

fn set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|v| v.trim().to_string()).collect())
}

impl LabelSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in split_top(s).into_iter().map(str::trim) {
            if part.is_empty() {
                continue;
            }
            let bad = || format!("unable to parse requirement: {part:?}");
            let (key, op) = if let Some(k) = part.strip_prefix('!') {
                (k.trim(), Op::NotExists)
            } else if let Some((k, v)) = part.split_once("!=") {
                (k.trim(), Op::Ne(v.trim().into()))
            } else if let Some((k, v)) = part.split_once("==") {
                (k.trim(), Op::Eq(v.trim().into()))
            } else if let Some((k, v)) = part.split_once('=') {
                (k.trim(), Op::Eq(v.trim().into()))
            } else if let Some((k, v)) = part.split_once(" notin ") {
                (k.trim(), Op::NotIn(set(v).ok_or_else(bad)?))
            } else if let Some((k, v)) = part.split_once(" in ") {
                (k.trim(), Op::In(set(v).ok_or_else(bad)?))
            } else {
                (part, Op::Exists)
            };
            if !valid_key(key) {
                return Err(bad());
            }
            reqs.push((key.to_string(), op));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, op)| {
            let v = labels.get(k);
            match op {
                Op::Eq(x) => v == Some(x),
                Op::Ne(x) => v != Some(x),
                Op::In(xs) => v.is_some_and(|v| xs.contains(v)),
                Op::NotIn(xs) => !v.is_some_and(|v| xs.contains(v)),
                Op::Exists => v.is_some(),
                Op::NotExists => v.is_none(),
            }
        })
    }

    pub fn matches_object(&self, obj: &Value) -> bool {
        self.0.is_empty() || self.matches(&labels(obj))
    }
}

pub fn labels(obj: &Value) -> BTreeMap<String, String> {
    obj.pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// A parsed `fieldSelector`: `path=value` / `path!=value` on any dotted field path
/// (`metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`, …).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = part.split_once('=') {
                (k, true, v)
            } else {
                return Err(format!("invalid selector: {part:?}; can't understand"));
            };
            if k.trim().is_empty() {
                return Err(format!("invalid selector: {part:?}; empty field"));
            }
            reqs.push((k.trim().to_string(), eq, v.trim().to_string()));
        }
        Ok(Self(reqs))
    }

    pub fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(path, eq, want)| {
            let mut node = Some(obj);
            for seg in path.split('.') {
                node = node.and_then(|n| n.get(seg));
            }
            let got = match node {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            };
            (got == *want) == *eq
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(labels: Value) -> Value {
        json!({"metadata": {"name": "a", "namespace": "ns", "labels": labels}, "status": {"phase": "Running"}})
    }

    #[test]
    fn label_operators() {
        let o = obj(json!({"app": "web", "tier": "front"}));
        let m = |s: &str| LabelSelector::parse(s).map(|sel| sel.matches_object(&o));
        assert_eq!(m("app=web"), Ok(true));
        assert_eq!(m("app==web"), Ok(true));
        assert_eq!(m("app!=web"), Ok(false));
        assert_eq!(m("app in (db, web)"), Ok(true));
        assert_eq!(m("app notin (db,web)"), Ok(false));
        assert_eq!(m("tier"), Ok(true));
        assert_eq!(m("!tier"), Ok(false));
        assert_eq!(m("!missing,app=web"), Ok(true));
        assert_eq!(m("missing notin (x)"), Ok(true));
        assert_eq!(m("missing!=x"), Ok(true));
        assert_eq!(m(""), Ok(true));
        assert!(LabelSelector::parse("app in web").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_paths() {
        let o = obj(json!({}));
        let m = |s: &str| FieldSelector::parse(s).map(|sel| sel.matches(&o));
        assert_eq!(m("metadata.name=a"), Ok(true));
        assert_eq!(m("metadata.name=a,metadata.namespace!=ns"), Ok(false));
        assert_eq!(m("status.phase==Running"), Ok(true));
        assert_eq!(m("spec.nodeName="), Ok(true));
        assert!(FieldSelector::parse("nonsense").is_err());
    }
}
