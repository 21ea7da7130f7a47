//! Test fixtures: a scripted API server over `tower_test::mock` (as kube-rs's controller-rs
//! does) and object builders.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use tower_test::mock::{self, Handle, SendResponse};

use super::runtime::{PodRuntime, SimulatedRuntime};
use super::{Context, KubeletOptions};

/// The other end of a [`Client`]: the test reads each request and answers it.
pub struct ApiServer {
    handle: Handle<Request<Body>, Response<Body>>,
    pending: Option<SendResponse<Response<Body>>>,
}

impl ApiServer {
    pub fn new() -> (Client, ApiServer) {
        let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
        (
            Client::new(svc, "default"),
            ApiServer {
                handle,
                pending: None,
            },
        )
    }

    /// The next request and its body.
    pub async fn next(&mut self) -> (Request<()>, Vec<u8>) {
        let (req, send) = self
            .handle
            .next_request()
            .await
            .expect("the client sent a request");
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.expect("a body").to_vec();
        self.pending = Some(send);
        (Request::from_parts(parts, ()), bytes)
    }

    /// Answer the last request.
    pub fn reply(&mut self, code: u16, json: serde_json::Value) {
        let send = self.pending.take().expect("a request to answer");
        send.send_response(
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&json).expect("json")))
                .expect("a response"),
        );
    }
}

/// The wall clock the fixtures' contexts read.
pub fn t0() -> Timestamp {
    Timestamp::from_second(1_800_000_000).expect("a time")
}

/// A context on `client` whose containers are all simulated (ready after 1 s) and whose clock
/// reads [`t0`].
pub fn context(client: Client) -> Arc<Context> {
    context_with(
        client,
        vec![Arc::new(SimulatedRuntime {
            delay: Duration::from_secs(1),
        })],
    )
}

pub fn context_with(client: Client, runtimes: Vec<Arc<dyn PodRuntime>>) -> Arc<Context> {
    let mut ctx = Context::new(client, KubeletOptions::default(), runtimes);
    ctx.now = Box::new(t0);
    Arc::new(ctx)
}

/// A Deployment `name` of `replicas` pods of `image`, labelled `app: <name>`.
pub fn deployment(name: &str, replicas: i32, image: &str) -> Deployment {
    let labels: BTreeMap<String, String> = [("app".to_string(), name.to_string())].into();
    Deployment {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("default".into()),
            uid: Some(format!("uid-{name}")),
            generation: Some(1),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: name.into(),
                        image: Some(image.into()),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        status: None,
    }
}

/// A small in-memory Kubernetes API for the whole loop: list and watch (all namespaces) of
/// `deployments` and `pods`, pods listed by label, created, read and deleted (at once, as an
/// API without graceful deletion), status written through the status subresource (with the
/// resourceVersion check), ConfigMaps read. Enough for the kubelet, nothing more.
#[derive(Clone)]
pub struct FakeApi {
    state: Arc<std::sync::Mutex<FakeState>>,
    /// Bumped on every change.
    version: Arc<tokio::sync::watch::Sender<u64>>,
}

#[derive(Default)]
struct FakeState {
    /// (plural, namespace, name) → object.
    objects: BTreeMap<(String, String, String), serde_json::Value>,
    rv: u64,
    uids: u64,
    /// Every event, for watches that start from an older resourceVersion.
    log: Vec<(u64, String, serde_json::Value)>,
    watchers: Vec<(String, tokio::sync::mpsc::UnboundedSender<bytes::Bytes>)>,
}

/// A response body fed by a channel: a watch stays open while the sender lives.
pub struct ChannelBody(tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>);

impl http_body::Body for ChannelBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn plural_of(kind: &str) -> &'static str {
    match kind {
        "Deployment" => "deployments",
        "ConfigMap" => "configmaps",
        _ => "pods",
    }
}

impl FakeApi {
    pub fn new() -> Self {
        FakeApi {
            state: Arc::default(),
            version: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v += 1);
    }

    /// Wait until `cond` holds, looking again at each change; fail the test after `within`.
    pub async fn wait_until(&self, what: &str, within: Duration, cond: impl Fn(&FakeApi) -> bool) {
        let mut rx = self.version.subscribe();
        let r = tokio::time::timeout(within, async {
            loop {
                let _ = rx.borrow_and_update();
                if cond(self) {
                    return;
                }
                let _ = rx.changed().await;
            }
        })
        .await;
        assert!(r.is_ok(), "{what}: not within {within:?}");
    }

    /// A client of this API.
    pub fn client(&self) -> Client {
        let this = self.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let this = this.clone();
            async move { Ok::<_, std::convert::Infallible>(this.handle(req).await) }
        });
        Client::new(svc, "default")
    }

    /// Objects of `plural` (all namespaces).
    pub fn list<K: serde::de::DeserializeOwned>(&self, plural: &str) -> Vec<K> {
        let s = self.state.lock().expect("lock");
        s.objects
            .iter()
            .filter(|((p, _, _), _)| p == plural)
            .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    /// Create or replace an object as a user would (`kubectl apply`): a new spec bumps the
    /// generation.
    pub fn put<K: serde::Serialize>(&self, obj: &K) {
        let mut v = serde_json::to_value(obj).expect("json");
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
        let key = (plural_of(&kind).to_string(), ns, name);
        let mut s = self.state.lock().expect("lock");
        let kind_of_event = match s.objects.get(&key) {
            Some(old) => {
                let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let bump = old["spec"] != v["spec"];
                v["metadata"]["generation"] = (generation + i64::from(bump)).into();
                v["metadata"]["uid"] = old["metadata"]["uid"].clone();
                v["status"] = old["status"].clone();
                "MODIFIED"
            }
            None => {
                s.uids += 1;
                v["metadata"]["uid"] = format!("uid-{}", s.uids).into();
                v["metadata"]["generation"] = 1.into();
                "ADDED"
            }
        };
        Self::store(&mut s, key, v, kind_of_event);
        drop(s);
        self.bump();
    }

    /// Delete a pod at once (as `kubectl delete pod --grace-period=0 --force`).
    pub fn delete(&self, plural: &str, ns: &str, name: &str) {
        let mut s = self.state.lock().expect("lock");
        Self::remove(&mut s, (plural.into(), ns.into(), name.into()));
        drop(s);
        self.bump();
    }

    fn remove(s: &mut FakeState, key: (String, String, String)) -> Option<serde_json::Value> {
        let mut v = s.objects.remove(&key)?;
        s.rv += 1;
        v["metadata"]["resourceVersion"] = s.rv.to_string().into();
        Self::emit(s, &key.0, "DELETED", &v);
        Some(v)
    }

    fn store(
        s: &mut FakeState,
        key: (String, String, String),
        mut v: serde_json::Value,
        event: &str,
    ) -> serde_json::Value {
        s.rv += 1;
        v["metadata"]["resourceVersion"] = s.rv.to_string().into();
        let plural = key.0.clone();
        s.objects.insert(key, v.clone());
        Self::emit(s, &plural, event, &v);
        v
    }

    fn emit(s: &mut FakeState, plural: &str, event: &str, v: &serde_json::Value) {
        let ev = serde_json::json!({"type": event, "object": v});
        let rv = s.rv;
        s.log.push((rv, plural.to_string(), ev.clone()));
        let mut line = serde_json::to_vec(&ev).expect("json");
        line.push(b'\n');
        let line = bytes::Bytes::from(line);
        s.watchers
            .retain(|(p, tx)| p != plural || tx.send(line.clone()).is_ok());
    }

    fn respond(code: u16, v: &serde_json::Value) -> Response<ChannelBody> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let _ = tx.send(bytes::Bytes::from(serde_json::to_vec(v).expect("json")));
        Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(ChannelBody(rx))
            .expect("response")
    }

    fn status(code: u16, reason: &str) -> Response<ChannelBody> {
        Self::respond(
            code,
            &serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": reason, "code": code, "message": reason}),
        )
    }

    async fn handle(&self, req: Request<Body>) -> Response<ChannelBody> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect_bytes()
            .await
            .map(|b| b.to_vec())
            .unwrap_or_default();
        let path = parts.uri.path().to_string();
        let query: BTreeMap<String, String> = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.replace("%3D", "=").replace("%2C", ",")))
            .collect();
        let rest = path
            .strip_prefix("/apis/apps/v1/")
            .or_else(|| path.strip_prefix("/api/v1/"))
            .unwrap_or("");
        let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let (ns, segs) = match segs.as_slice() {
            ["namespaces", ns, tail @ ..] => (Some(ns.to_string()), tail.to_vec()),
            other => (None, other.to_vec()),
        };
        let (plural, name, sub) = match segs.as_slice() {
            [p] => (p.to_string(), None, None),
            [p, n] => (p.to_string(), Some(n.to_string()), None),
            [p, n, s] => (p.to_string(), Some(n.to_string()), Some(s.to_string())),
            _ => return Self::status(404, "NotFound"),
        };
        let method = parts.method.clone();
        let mut s = self.state.lock().expect("lock");
        let resp = match (method.as_str(), name, sub) {
            ("GET", None, None) if query.get("watch").map(String::as_str) == Some("true") => {
                let from: u64 = query
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                for (rv, p, ev) in &s.log {
                    if *rv > from && *p == plural {
                        let mut line = serde_json::to_vec(ev).expect("json");
                        line.push(b'\n');
                        let _ = tx.send(bytes::Bytes::from(line));
                    }
                }
                s.watchers.push((plural.clone(), tx));
                return Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(ChannelBody(rx))
                    .expect("response");
            }
            ("GET", None, None) => {
                let selector: Vec<(String, String)> = query
                    .get("labelSelector")
                    .map(|q| {
                        q.split(',')
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect()
                    })
                    .unwrap_or_default();
                let items: Vec<serde_json::Value> = s
                    .objects
                    .iter()
                    .filter(|((p, n, _), _)| *p == plural && ns.as_ref().is_none_or(|ns| ns == n))
                    .filter(|(_, v)| {
                        selector
                            .iter()
                            .all(|(k, val)| v["metadata"]["labels"][k].as_str() == Some(val))
                    })
                    .map(|(_, v)| v.clone())
                    .collect();
                Self::respond(
                    200,
                    &serde_json::json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items}),
                )
            }
            ("POST", None, None) => {
                let mut v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let ns = ns.unwrap_or_else(|| "default".into());
                let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
                let key = (plural.clone(), ns.clone(), name);
                if s.objects.contains_key(&key) {
                    Self::status(409, "AlreadyExists")
                } else {
                    s.uids += 1;
                    v["metadata"]["uid"] = format!("uid-{}", s.uids).into();
                    v["metadata"]["namespace"] = ns.into();
                    v["metadata"]["creationTimestamp"] = "2027-01-15T08:00:00Z".into();
                    let v = Self::store(&mut s, key, v, "ADDED");
                    Self::respond(201, &v)
                }
            }
            ("GET", Some(n), None) => match s.objects.get(&(plural, ns.unwrap_or_default(), n)) {
                Some(v) => Self::respond(200, v),
                None => Self::status(404, "NotFound"),
            },
            ("DELETE", Some(n), None) => {
                match Self::remove(&mut s, (plural, ns.unwrap_or_default(), n)) {
                    Some(v) => Self::respond(200, &v),
                    None => Self::status(404, "NotFound"),
                }
            }
            ("PUT", Some(n), Some(sub)) if sub == "status" => {
                let sent: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let key = (plural, ns.unwrap_or_default(), n);
                match s.objects.get(&key).cloned() {
                    None => Self::status(404, "NotFound"),
                    Some(cur)
                        if cur["metadata"]["resourceVersion"]
                            != sent["metadata"]["resourceVersion"] =>
                    {
                        Self::status(409, "Conflict")
                    }
                    Some(mut cur) => {
                        cur["status"] = sent["status"].clone();
                        let v = Self::store(&mut s, key, cur, "MODIFIED");
                        Self::respond(200, &v)
                    }
                }
            }
            _ => Self::status(405, "MethodNotAllowed"),
        };
        drop(s);
        self.bump();
        resp
    }
}
