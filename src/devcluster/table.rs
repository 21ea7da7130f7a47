//! `meta.k8s.io/v1` Table output (what `kubectl get` asks for): a CRD's
//! `additionalPrinterColumns` through a JSONPath subset, or default columns for built-ins.

use serde_json::{Value, json};

use super::resources::ResourceInfo;

/// Evaluate a JSONPath of the subset printer columns use: `.a.b`, `.a[0]`, `.a[*].b`,
/// `.a[?(@.type=="Ready")].status` (optionally wrapped in `{}`).
pub fn jsonpath(path: &str, obj: &Value) -> Vec<Value> {
    let p = path.trim();
    let p = p
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(p);
    let p = p.strip_prefix('$').unwrap_or(p);
    let mut nodes = vec![obj.clone()];
    let mut rest = p;
    while !rest.is_empty() && !nodes.is_empty() {
        if let Some(r) = rest.strip_prefix('[') {
            let Some(end) = r.find(']') else {
                return vec![];
            };
            // A filter may hold ']' only inside quotes; printer columns do not.
            let inner = &r[..end];
            rest = &r[end + 1..];
            nodes = if inner == "*" {
                nodes
                    .iter()
                    .flat_map(|n| match n {
                        Value::Array(a) => a.clone(),
                        Value::Object(m) => m.values().cloned().collect(),
                        _ => vec![],
                    })
                    .collect()
            } else if let Some(f) = inner.strip_prefix("?(").and_then(|f| f.strip_suffix(')')) {
                let (lhs, op, rhs) = if let Some((l, r)) = f.split_once("==") {
                    (l.trim(), true, r.trim())
                } else if let Some((l, r)) = f.split_once("!=") {
                    (l.trim(), false, r.trim())
                } else {
                    return vec![];
                };
                let want: Value = serde_json::from_str(rhs)
                    .or_else(|_| serde_json::from_str(&format!("\"{}\"", rhs.trim_matches('\''))))
                    .unwrap_or(Value::Null);
                let field = lhs.strip_prefix('@').unwrap_or(lhs);
                nodes
                    .iter()
                    .filter_map(Value::as_array)
                    .flatten()
                    .filter(|item| {
                        let got = jsonpath(field, item);
                        got.first().is_some_and(|g| *g == want) == op
                    })
                    .cloned()
                    .collect()
            } else if let Ok(i) = inner.parse::<i64>() {
                nodes
                    .iter()
                    .filter_map(Value::as_array)
                    .filter_map(|a| {
                        let idx = if i < 0 { a.len() as i64 + i } else { i };
                        usize::try_from(idx).ok().and_then(|i| a.get(i)).cloned()
                    })
                    .collect()
            } else {
                let key = inner.trim_matches(['\'', '"']);
                nodes.iter().filter_map(|n| n.get(key)).cloned().collect()
            };
        } else if let Some(r) = rest.strip_prefix('.') {
            let end = r.find(['.', '[']).unwrap_or(r.len());
            let key = &r[..end];
            rest = &r[end..];
            if key.is_empty() {
                continue;
            }
            nodes = nodes.iter().filter_map(|n| n.get(key)).cloned().collect();
        } else {
            return vec![];
        }
    }
    nodes
}

/// `5s`, `3m20s`, `4h`, `2d3h`: how kubectl shows ages.
pub fn human_age(since: &str) -> String {
    let Ok(t) = since.parse::<k8s_openapi::jiff::Timestamp>() else {
        return "<invalid>".into();
    };
    let secs = (k8s_openapi::jiff::Timestamp::now().as_second() - t.as_second()).max(0);
    let (m, h, d) = (secs / 60, secs / 3600, secs / 86400);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if m < 10 && s % 60 != 0 => format!("{m}m{}s", s % 60),
        _ if h < 3 => format!("{m}m"),
        _ if h < 8 && m % 60 != 0 => format!("{h}h{}m", m % 60),
        _ if h < 48 => format!("{h}h"),
        _ if d < 8 && h % 24 != 0 => format!("{d}d{}h", h % 24),
        _ if d < 365 * 2 => format!("{d}d"),
        _ => format!("{}y", d / 365),
    }
}

struct Column {
    name: String,
    ty: String,
    description: String,
    priority: i64,
    cell: Box<dyn Fn(&Value) -> Value>,
}

fn path_column(c: &Value) -> Option<Column> {
    let path = c.get("jsonPath")?.as_str()?.to_string();
    let ty = c
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("string")
        .to_string();
    let date = ty == "date";
    Some(Column {
        name: c.get("name")?.as_str()?.to_string(),
        ty: ty.clone(),
        description: c
            .get("description")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        priority: c.get("priority").and_then(Value::as_i64).unwrap_or(0),
        cell: Box::new(move |o| {
            let found = jsonpath(&path, o);
            match found.as_slice() {
                [] => Value::Null,
                [Value::String(s)] if date => json!(human_age(s)),
                [one] => one.clone(),
                many => json!(
                    many.iter()
                        .map(|v| v
                            .as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }),
    })
}

fn simple(name: &str, f: impl Fn(&Value) -> Value + 'static) -> Column {
    Column {
        name: name.into(),
        ty: "string".into(),
        description: String::new(),
        priority: 0,
        cell: Box::new(f),
    }
}

fn age() -> Column {
    simple("Age", |o| {
        json!(human_age(
            o.pointer("/metadata/creationTimestamp")
                .and_then(Value::as_str)
                .unwrap_or("")
        ))
    })
}

fn int(o: &Value, p: &str) -> i64 {
    o.pointer(p).and_then(Value::as_i64).unwrap_or(0)
}

fn columns(res: &ResourceInfo, version: &str) -> Vec<Column> {
    let mut cols = vec![Column {
        name: "Name".into(),
        ty: "string".into(),
        description: "Name must be unique within a namespace.".into(),
        priority: 0,
        cell: Box::new(|o| o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)),
    }];
    if let Some(crd) = &res.crd {
        let defs = crd.columns.get(version).cloned().unwrap_or_default();
        if defs.is_empty() {
            cols.push(age());
        }
        cols.extend(defs.iter().filter_map(path_column));
        return cols;
    }
    match (res.group.as_str(), res.plural.as_str()) {
        ("", "pods") => {
            cols.push(simple("Ready", |o| {
                let total = o
                    .pointer("/spec/containers")
                    .and_then(Value::as_array)
                    .map_or(0, Vec::len);
                let ready = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .map_or(0, |s| {
                        s.iter()
                            .filter(|c| c.get("ready") == Some(&json!(true)))
                            .count()
                    });
                json!(format!("{ready}/{total}"))
            }));
            cols.push(simple("Status", |o| {
                if o.pointer("/metadata/deletionTimestamp").is_some() {
                    return json!("Terminating");
                }
                o.pointer("/status/phase")
                    .cloned()
                    .unwrap_or(json!("Unknown"))
            }));
            cols.push(simple("Restarts", |o| {
                let n: i64 = o
                    .pointer("/status/containerStatuses")
                    .and_then(Value::as_array)
                    .map_or(0, |s| s.iter().map(|c| int(c, "/restartCount")).sum());
                json!(n)
            }));
        }
        ("apps", "deployments") | ("apps", "replicasets") => {
            let rs = res.plural == "replicasets";
            if rs {
                cols.push(simple("Desired", |o| json!(int(o, "/spec/replicas"))));
                cols.push(simple("Current", |o| json!(int(o, "/status/replicas"))));
                cols.push(simple("Ready", |o| json!(int(o, "/status/readyReplicas"))));
            } else {
                cols.push(simple("Ready", |o| {
                    json!(format!(
                        "{}/{}",
                        int(o, "/status/readyReplicas"),
                        o.pointer("/spec/replicas")
                            .and_then(Value::as_i64)
                            .unwrap_or(1)
                    ))
                }));
                cols.push(simple("Up-to-date", |o| {
                    json!(int(o, "/status/updatedReplicas"))
                }));
                cols.push(simple("Available", |o| {
                    json!(int(o, "/status/availableReplicas"))
                }));
            }
        }
        ("", "namespaces") => cols.push(simple("Status", |o| {
            o.pointer("/status/phase").cloned().unwrap_or(Value::Null)
        })),
        ("", "configmaps") | ("", "secrets") => cols.push(simple("Data", |o| {
            json!(
                o.get("data")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len())
            )
        })),
        ("", "services") => {
            cols.push(simple("Type", |o| {
                o.pointer("/spec/type")
                    .cloned()
                    .unwrap_or(json!("ClusterIP"))
            }));
            cols.push(simple("Cluster-IP", |o| {
                o.pointer("/spec/clusterIP")
                    .cloned()
                    .unwrap_or(json!("<none>"))
            }));
        }
        ("rbac.authorization.k8s.io", "rolebindings" | "clusterrolebindings") => {
            cols.push(simple("Role", |o| {
                let at = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or("");
                json!(format!("{}/{}", at("/roleRef/kind"), at("/roleRef/name")))
            }))
        }
        ("networking.k8s.io", "networkpolicies") => cols.push(simple("Pod-Selector", |o| {
            let labels = o
                .pointer("/spec/podSelector/matchLabels")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            json!(if labels.is_empty() {
                "<none>".into()
            } else {
                labels
            })
        })),
        ("policy", "poddisruptionbudgets") => {
            let or_na = |p: &'static str| {
                move |o: &Value| match o.pointer(p) {
                    Some(Value::String(s)) => json!(s),
                    Some(Value::Number(n)) => json!(n.to_string()),
                    _ => json!("N/A"),
                }
            };
            cols.push(simple("Min Available", or_na("/spec/minAvailable")));
            cols.push(simple("Max Unavailable", or_na("/spec/maxUnavailable")));
            cols.push(simple("Allowed Disruptions", |o| {
                json!(int(o, "/status/disruptionsAllowed"))
            }));
        }
        ("apiextensions.k8s.io", _) | ("rbac.authorization.k8s.io", "roles" | "clusterroles") => {
            cols.push(simple("Created At", |o| {
                o.pointer("/metadata/creationTimestamp")
                    .cloned()
                    .unwrap_or(Value::Null)
            }));
            return cols;
        }
        ("", "events") => {
            cols.truncate(0);
            cols.push(simple("Last Seen", |o| {
                let at = [
                    "/lastTimestamp",
                    "/eventTime",
                    "/metadata/creationTimestamp",
                ]
                .iter()
                .find_map(|p| o.pointer(p).and_then(Value::as_str))
                .unwrap_or("");
                json!(human_age(at))
            }));
            cols.push(simple("Type", |o| {
                o.get("type").cloned().unwrap_or(Value::Null)
            }));
            cols.push(simple("Reason", |o| {
                o.get("reason").cloned().unwrap_or(Value::Null)
            }));
            cols.push(simple("Object", |o| {
                let kind = o
                    .pointer("/involvedObject/kind")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                let name = o
                    .pointer("/involvedObject/name")
                    .and_then(Value::as_str)
                    .unwrap_or("");
                json!(format!("{}/{name}", kind.to_lowercase()))
            }));
            cols.push(simple("Message", |o| {
                o.get("message").cloned().unwrap_or(Value::Null)
            }));
            return cols;
        }
        ("coordination.k8s.io", "leases") => cols.push(simple("Holder", |o| {
            o.pointer("/spec/holderIdentity")
                .cloned()
                .unwrap_or(Value::Null)
        })),
        _ => {}
    }
    cols.push(age());
    cols
}

/// How rows carry their object (`includeObject`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Include {
    None,
    Metadata,
    Object,
}

impl Include {
    pub fn parse(s: Option<&str>) -> Self {
        match s {
            Some("None") => Include::None,
            Some("Object") => Include::Object,
            _ => Include::Metadata,
        }
    }
}

/// A Table of `items`; `headers: false` leaves out the column definitions (watch events after
/// the first).
pub fn table(
    res: &ResourceInfo,
    version: &str,
    items: &[Value],
    include: Include,
    headers: bool,
    list_meta: Value,
) -> Value {
    let cols = columns(res, version);
    let defs: Vec<Value> = cols
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "type": c.ty,
                "format": if c.name == "Name" { "name" } else { "" },
                "description": c.description, "priority": c.priority,
            })
        })
        .collect();
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let cells: Vec<Value> = cols.iter().map(|c| (c.cell)(o)).collect();
            let mut row = json!({"cells": cells});
            match include {
                Include::None => {}
                Include::Object => row["object"] = o.clone(),
                Include::Metadata => {
                    row["object"] = json!({
                        "kind": "PartialObjectMetadata",
                        "apiVersion": "meta.k8s.io/v1",
                        "metadata": o.get("metadata").cloned().unwrap_or(json!({})),
                    })
                }
            }
            row
        })
        .collect();
    let mut t = json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": list_meta,
        "rows": rows,
    });
    if headers {
        t["columnDefinitions"] = json!(defs);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonpath_subset() {
        let o = json!({"status": {"conditions": [
            {"type": "Progressing", "status": "False"},
            {"type": "Ready", "status": "True"}
        ], "n": 3}, "spec": {"agents": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(jsonpath(".status.n", &o), vec![json!(3)]);
        assert_eq!(
            jsonpath(".status.conditions[?(@.type==\"Ready\")].status", &o),
            vec![json!("True")]
        );
        assert_eq!(jsonpath("{.spec.agents[0].name}", &o), vec![json!("a")]);
        assert_eq!(
            jsonpath(".spec.agents[*].name", &o),
            vec![json!("a"), json!("b")]
        );
        assert_eq!(jsonpath(".spec.agents[-1].name", &o), vec![json!("b")]);
        assert!(jsonpath(".status.missing", &o).is_empty());
    }

    #[test]
    fn ages() {
        assert_eq!(human_age("not a time"), "<invalid>");
        let t = k8s_openapi::jiff::Timestamp::now();
        assert!(human_age(&t.to_string()).ends_with('s'));
    }
}
