//! Protobuf request bodies, as client-go's typed clients send them: `kubectl create configmap`,
//! `create secret generic`, `create namespace` and `create serviceaccount` encode the object in
//! Kubernetes' protobuf envelope (`k8s\0` + `runtime.Unknown`), with no JSON fallback. Those
//! four kinds (and the ObjectMeta fields a client sets) are decoded here into the JSON the store
//! keeps; any other protobuf body is refused with 415. Responses are always JSON (the clients
//! accept it).

use serde_json::{Map, Value, json};

const MAGIC: &[u8] = b"k8s\0";

enum Kind {
    Str,
    Int,
    Bool,
    Msg(&'static [Field]),
    MapStr,
    MapBytes,
    RepStr,
    RepMsg(&'static [Field]),
}

struct Field {
    num: u64,
    name: &'static str,
    kind: Kind,
}

const fn f(num: u64, name: &'static str, kind: Kind) -> Field {
    Field { num, name, kind }
}

static OWNER_REFERENCE: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
    f(5, "apiVersion", Kind::Str),
    f(6, "controller", Kind::Bool),
    f(7, "blockOwnerDeletion", Kind::Bool),
];

static OBJECT_META: &[Field] = &[
    f(1, "name", Kind::Str),
    f(2, "generateName", Kind::Str),
    f(3, "namespace", Kind::Str),
    f(5, "uid", Kind::Str),
    f(6, "resourceVersion", Kind::Str),
    f(7, "generation", Kind::Int),
    f(11, "labels", Kind::MapStr),
    f(12, "annotations", Kind::MapStr),
    f(13, "ownerReferences", Kind::RepMsg(OWNER_REFERENCE)),
    f(14, "finalizers", Kind::RepStr),
];

static CONFIG_MAP: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(2, "data", Kind::MapStr),
    f(3, "binaryData", Kind::MapBytes),
    f(4, "immutable", Kind::Bool),
];

static SECRET: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(2, "data", Kind::MapBytes),
    f(3, "type", Kind::Str),
    f(4, "stringData", Kind::MapStr),
    f(5, "immutable", Kind::Bool),
];

static NAMESPACE_SPEC: &[Field] = &[f(1, "finalizers", Kind::RepStr)];

static NAMESPACE: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(2, "spec", Kind::Msg(NAMESPACE_SPEC)),
];

static OBJECT_REFERENCE: &[Field] = &[
    f(1, "kind", Kind::Str),
    f(2, "namespace", Kind::Str),
    f(3, "name", Kind::Str),
    f(4, "uid", Kind::Str),
    f(5, "apiVersion", Kind::Str),
];

static LOCAL_OBJECT_REFERENCE: &[Field] = &[f(1, "name", Kind::Str)];

static SERVICE_ACCOUNT: &[Field] = &[
    f(1, "metadata", Kind::Msg(OBJECT_META)),
    f(2, "secrets", Kind::RepMsg(OBJECT_REFERENCE)),
    f(3, "imagePullSecrets", Kind::RepMsg(LOCAL_OBJECT_REFERENCE)),
    f(4, "automountServiceAccountToken", Kind::Bool),
];

enum Wire<'a> {
    Varint(u64),
    Len(&'a [u8]),
    Fixed,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self.b.split_first().ok_or("truncated varint")?;
            self.b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("truncated field".into());
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }

    fn next(&mut self) -> Result<Option<(u64, Wire<'a>)>, String> {
        if self.b.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed
            }
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "length overflow")?;
                Wire::Len(self.take(n)?)
            }
            5 => {
                self.take(4)?;
                Wire::Fixed
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        Ok(Some((key >> 3, wire)))
    }
}

fn utf8(b: &[u8]) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| "a string field is not UTF-8".to_string())
}

fn base64(b: &[u8]) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(b.to_vec())).unwrap_or(Value::Null)
}

fn message(bytes: &[u8], schema: &[Field]) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    let mut r = Reader { b: bytes };
    while let Some((num, wire)) = r.next()? {
        let Some(field) = schema.iter().find(|f| f.num == num) else {
            continue;
        };
        let name = field.name.to_string();
        match (&field.kind, wire) {
            (Kind::Str, Wire::Len(b)) => {
                out.insert(name, json!(utf8(b)?));
            }
            (Kind::Int, Wire::Varint(v)) => {
                out.insert(name, json!(v as i64));
            }
            (Kind::Bool, Wire::Varint(v)) => {
                out.insert(name, json!(v != 0));
            }
            (Kind::Msg(s), Wire::Len(b)) => {
                out.insert(name, Value::Object(message(b, s)?));
            }
            (Kind::MapStr | Kind::MapBytes, Wire::Len(b)) => {
                let (mut key, mut value) = (String::new(), Value::Null);
                let mut e = Reader { b };
                while let Some((n, w)) = e.next()? {
                    match (n, w) {
                        (1, Wire::Len(k)) => key = utf8(k)?,
                        (2, Wire::Len(v)) if matches!(field.kind, Kind::MapStr) => {
                            value = json!(utf8(v)?)
                        }
                        (2, Wire::Len(v)) => value = base64(v),
                        _ => {}
                    }
                }
                let map = out.entry(name).or_insert_with(|| json!({}));
                if let Some(m) = map.as_object_mut() {
                    m.insert(key, if value.is_null() { json!("") } else { value });
                }
            }
            (Kind::RepStr, Wire::Len(b)) => {
                let list = out.entry(name).or_insert_with(|| json!([]));
                if let Some(a) = list.as_array_mut() {
                    a.push(json!(utf8(b)?));
                }
            }
            (Kind::RepMsg(s), Wire::Len(b)) => {
                let item = Value::Object(message(b, s)?);
                let list = out.entry(name).or_insert_with(|| json!([]));
                if let Some(a) = list.as_array_mut() {
                    a.push(item);
                }
            }
            _ => return Err(format!("field {} has an unexpected wire type", field.name)),
        }
    }
    Ok(out)
}

/// Decode a protobuf request body into the object's JSON; an error says why it cannot be.
pub fn decode(body: &[u8]) -> Result<Value, String> {
    let rest = body
        .strip_prefix(MAGIC)
        .ok_or("not a Kubernetes protobuf envelope")?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), None);
    let mut r = Reader { b: rest };
    while let Some((num, wire)) = r.next()? {
        match (num, wire) {
            (1, Wire::Len(type_meta)) => {
                let mut t = Reader { b: type_meta };
                while let Some((n, w)) = t.next()? {
                    match (n, w) {
                        (1, Wire::Len(v)) => api_version = utf8(v)?,
                        (2, Wire::Len(v)) => kind = utf8(v)?,
                        _ => {}
                    }
                }
            }
            (2, Wire::Len(b)) => raw = Some(b),
            _ => {}
        }
    }
    let schema = match (api_version.as_str(), kind.as_str()) {
        ("v1", "ConfigMap") => CONFIG_MAP,
        ("v1", "Secret") => SECRET,
        ("v1", "Namespace") => NAMESPACE,
        ("v1", "ServiceAccount") => SERVICE_ACCOUNT,
        _ => {
            return Err(format!(
                "protobuf bodies are decoded for v1 ConfigMap, Secret, Namespace and ServiceAccount only, not {api_version} {kind}; send JSON (kubectl apply/create -f)"
            ));
        }
    };
    let mut obj = message(raw.unwrap_or_default(), schema)?;
    obj.insert("apiVersion".into(), json!(api_version));
    obj.insert("kind".into(), json!(kind));
    Ok(Value::Object(obj))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn len(num: u64, b: &[u8]) -> Vec<u8> {
        let mut out = vec![((num << 3) | 2) as u8, b.len() as u8];
        out.extend_from_slice(b);
        out
    }

    #[test]
    fn decodes_a_configmap_envelope() {
        let meta = [
            len(1, b"first"),
            len(11, &[len(1, b"app"), len(2, b"web")].concat()),
        ]
        .concat();
        let cm = [
            len(1, &meta),
            len(2, &[len(1, b"a"), len(2, b"1")].concat()),
        ]
        .concat();
        let type_meta = [len(1, b"v1"), len(2, b"ConfigMap")].concat();
        let body = [MAGIC.to_vec(), len(1, &type_meta), len(2, &cm)].concat();
        let obj = decode(&body).expect("decode");
        assert_eq!(
            obj,
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "first", "labels": {"app": "web"}}, "data": {"a": "1"}})
        );
        assert!(decode(b"{}").is_err());
    }
}
