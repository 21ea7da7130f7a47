//! The dev API server judged by kube-rs: CRUD through `Api<ConfigMap>` and `DynamicObject`,
//! optimistic concurrency, the status subresource, selectors, finalizers, garbage collection,
//! and `kube::runtime::watcher` recovering from a 410 by re-listing.

mod support;

use support::eventually;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use r4::devcluster::{Handle, Options, start};
use serde_json::{Value, json};

async fn cluster(options: Options) -> (Handle, Client) {
    let handle = start("127.0.0.1:0".parse().expect("addr"), options)
        .await
        .expect("start the dev API");
    let mut config = Config::new(handle.url().parse().expect("url"));
    config.default_namespace = "default".into();
    let client = Client::try_from(config).expect("client");
    (handle, client)
}

fn cm(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().cloned().collect::<BTreeMap<_, _>>()},
        "data": {"k": "v"},
    }))
    .expect("configmap")
}

fn api_err(e: kube::Error) -> kube::core::Status {
    match e {
        kube::Error::Api(ae) => *ae,
        other => panic!("expected an API error, got {other}"),
    }
}

#[tokio::test]
async fn configmap_crud_selectors_and_conflicts() {
    let (_h, client) = cluster(Options::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PostParams::default();
    let a = cms
        .create(&pp, &cm("a", &[("app", "web")]))
        .await
        .expect("create");
    assert!(a.metadata.uid.is_some() && a.metadata.creation_timestamp.is_some());
    cms.create(&pp, &cm("b", &[("app", "db")]))
        .await
        .expect("create b");
    cms.create(&pp, &cm("c", &[("skip", "yes"), ("app", "web")]))
        .await
        .expect("create c");
    let dup = api_err(cms.create(&pp, &cm("a", &[])).await.unwrap_err());
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));

    let names = |l: kube::core::ObjectList<ConfigMap>| {
        l.items
            .into_iter()
            .filter_map(|c| c.metadata.name)
            .collect::<Vec<_>>()
    };
    let sel = |s: &str| ListParams::default().labels(s);
    assert_eq!(
        names(cms.list(&sel("app=web")).await.expect("list")),
        ["a", "c"]
    );
    assert_eq!(
        names(cms.list(&sel("app in (web,db),!skip")).await.expect("list")),
        ["a", "b"]
    );
    assert_eq!(
        names(cms.list(&sel("app notin (web)")).await.expect("list")),
        ["b"]
    );
    assert_eq!(names(cms.list(&sel("skip")).await.expect("list")), ["c"]);
    let by_name = ListParams::default().fields("metadata.name=b");
    assert_eq!(names(cms.list(&by_name).await.expect("list")), ["b"]);
    let page = cms
        .list(&ListParams::default().limit(2))
        .await
        .expect("page");
    assert_eq!(page.items.len(), 2);
    let token = page.metadata.continue_.clone().expect("continue token");
    let rest = cms
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(names(rest), ["c"]);

    // Optimistic concurrency: a replace carrying an old resourceVersion is refused.
    let mut fresh = a.clone();
    fresh.data = Some([("k".to_string(), "v2".to_string())].into());
    let replaced = cms.replace("a", &pp, &fresh).await.expect("replace");
    assert_ne!(
        replaced.metadata.resource_version,
        a.metadata.resource_version
    );
    let stale = api_err(cms.replace("a", &pp, &fresh).await.unwrap_err());
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    assert!(
        stale.message.contains("the object has been modified"),
        "{}",
        stale.message
    );

    let patched = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"x": "y"}})),
        )
        .await
        .expect("merge patch");
    assert_eq!(
        patched
            .data
            .as_ref()
            .and_then(|d| d.get("x"))
            .map(String::as_str),
        Some("y")
    );
    let jp: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/data/x", "value": "z"}]))
            .expect("patch");
    let patched = cms
        .patch("a", &PatchParams::default(), &Patch::<()>::Json(jp))
        .await
        .expect("json patch");
    assert_eq!(
        patched
            .data
            .as_ref()
            .and_then(|d| d.get("x"))
            .map(String::as_str),
        Some("z")
    );

    cms.delete("a", &DeleteParams::default())
        .await
        .expect("delete");
    let gone = api_err(cms.get("a").await.unwrap_err());
    assert_eq!((gone.code, gone.reason.as_str()), (404, "NotFound"));
    assert_eq!(gone.message, "configmaps \"a\" not found");
}

fn crd() -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com",
            "names": {"kind": "Widget", "plural": "widgets", "singular": "widget", "shortNames": ["wd"]},
            "scope": "Namespaced",
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "properties": {
                        "spec": {"type": "object", "required": ["size"], "properties": {
                            "size": {"type": "integer", "minimum": 1, "maximum": 10},
                            "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                            "parts": {"type": "array", "items": {"type": "object", "properties": {
                                "name": {"type": "string", "pattern": "^[a-z]+$"}}}},
                            "ports": {"type": "array", "x-kubernetes-list-type": "map",
                                "x-kubernetes-list-map-keys": ["port"],
                                "items": {"type": "object", "required": ["port"], "properties": {
                                    "port": {"type": "integer"}}}},
                        },
                        "x-kubernetes-validations": [{"rule": "self.size != 7", "message": "7 is unlucky"}]},
                        "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                    },
                }},
            }],
        },
    }))
    .expect("crd")
}

async fn widgets(client: &Client) -> Api<DynamicObject> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd())
        .await
        .expect("create CRD");
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let ar = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    Api::namespaced_with(client.clone(), "default", &ar)
}

fn widget(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": name}, "spec": spec, "status": {"ready": true},
    }))
    .expect("widget")
}

#[tokio::test]
async fn custom_resources_status_subresource_and_validation() {
    let (_h, client) = cluster(Options::default()).await;
    let api = widgets(&client).await;
    let pp = PostParams::default();
    let w = api
        .create(&pp, &widget("w", json!({"size": 2})))
        .await
        .expect("create");
    assert_eq!(w.data["spec"]["color"], "red", "schema default applied");
    assert!(
        w.data.get("status").is_none(),
        "status is not taken on create"
    );
    assert_eq!(w.metadata.generation, Some(1));

    // Writes to the object ignore .status; writes to /status ignore the rest.
    let p = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 3}, "status": {"ready": true}})),
        )
        .await
        .expect("patch");
    assert_eq!(p.metadata.generation, Some(2));
    assert!(p.data.get("status").is_none());
    let s = api
        .patch_status(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 9}, "status": {"ready": true}})),
        )
        .await
        .expect("patch status");
    assert_eq!(s.data["status"]["ready"], true);
    assert_eq!(s.data["spec"]["size"], 3);
    assert_eq!(
        s.metadata.generation,
        Some(2),
        "status writes keep the generation"
    );
    let l = api
        .patch(
            "w",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
        )
        .await
        .expect("label");
    assert_eq!(
        l.metadata.generation,
        Some(2),
        "metadata writes keep the generation"
    );

    // Schema and CEL violations: 422 Invalid naming the fields as a real server does.
    let bad = api_err(
        api.create(
            &pp,
            &widget(
                "bad",
                json!({"size": 11, "color": "green", "parts": [{"name": "X1"}]}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!((bad.code, bad.reason.as_str()), (422, "Invalid"));
    for field in ["spec.size", "spec.color", "spec.parts[0].name"] {
        assert!(bad.message.contains(field), "{field} in {}", bad.message);
    }
    assert!(
        bad.message
            .starts_with("Widget.example.com \"bad\" is invalid: "),
        "{}",
        bad.message
    );
    let missing = api_err(api.create(&pp, &widget("m", json!({}))).await.unwrap_err());
    assert!(
        missing.message.contains("spec.size: Required value"),
        "{}",
        missing.message
    );
    let dup = api_err(
        api.create(
            &pp,
            &widget(
                "d",
                json!({"size": 1, "ports": [{"port": 80}, {"port": 80}]}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert!(dup.message.contains("spec.ports[1]"), "{}", dup.message);
    let cel = api_err(
        api.create(&pp, &widget("c", json!({"size": 7})))
            .await
            .unwrap_err(),
    );
    assert!(cel.message.contains("7 is unlucky"), "{}", cel.message);

    // Unknown fields are pruned, or refused with fieldValidation=Strict.
    let pruned = api
        .create(&pp, &widget("p", json!({"size": 1, "extra": 1})))
        .await
        .expect("pruned");
    assert!(pruned.data["spec"].get("extra").is_none());
    let strict = PatchParams {
        field_validation: Some(kube::api::ValidationDirective::Strict),
        ..Default::default()
    };
    let refused = api_err(
        api.patch("p", &strict, &Patch::Merge(json!({"spec": {"extra": 1}})))
            .await
            .unwrap_err(),
    );
    assert_eq!(refused.code, 400);
    assert!(
        refused.message.contains("unknown field \"spec.extra\""),
        "{}",
        refused.message
    );
}

#[tokio::test]
async fn finalizers_and_garbage_collection() {
    let (_h, client) = cluster(Options::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PostParams::default();
    let mut held = cm("held", &[]);
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&pp, &held).await.expect("create");
    cms.delete("held", &DeleteParams::default())
        .await
        .expect("delete");
    let still = cms.get("held").await.expect("held by its finalizer");
    assert!(still.metadata.deletion_timestamp.is_some());
    cms.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release");
    assert_eq!(api_err(cms.get("held").await.unwrap_err()).code, 404);

    let owned = |name: &str, owner: &ConfigMap| {
        let mut c = cm(name, &[]);
        c.metadata.owner_references = Some(vec![
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap", "name": owner.metadata.name,
                "uid": owner.metadata.uid, "blockOwnerDeletion": true,
            }))
            .expect("ownerReference"),
        ]);
        c
    };
    let owner = cms.create(&pp, &cm("owner", &[])).await.expect("owner");
    cms.create(&pp, &owned("child", &owner))
        .await
        .expect("child");
    cms.delete("owner", &DeleteParams::background())
        .await
        .expect("delete owner");
    eventually(5, "the child to be collected", || async {
        cms.get_opt("child").await.ok().flatten().is_none()
    })
    .await;

    let owner = cms
        .create(&pp, &cm("owner", &[]))
        .await
        .expect("owner again");
    cms.create(&pp, &owned("orphan", &owner))
        .await
        .expect("orphan");
    cms.delete("owner", &DeleteParams::orphan())
        .await
        .expect("delete owner");
    let orphan = cms.get("orphan").await.expect("orphan stays");
    assert!(
        orphan
            .metadata
            .owner_references
            .unwrap_or_default()
            .is_empty()
    );

    let owner = cms.create(&pp, &cm("fg", &[])).await.expect("fg owner");
    let mut blocker = owned("blocker", &owner);
    blocker.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    cms.create(&pp, &blocker).await.expect("blocker");
    cms.delete("fg", &DeleteParams::foreground())
        .await
        .expect("foreground delete");
    let waiting = cms
        .get("fg")
        .await
        .expect("owner waits for its blocking dependent");
    assert_eq!(
        waiting.metadata.finalizers,
        Some(vec!["foregroundDeletion".to_string()])
    );
    cms.patch(
        "blocker",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .expect("release blocker");
    eventually(5, "the foreground owner to go", || async {
        cms.get_opt("fg").await.ok().flatten().is_none()
    })
    .await;
}

#[tokio::test]
async fn watch_from_an_expired_version_gets_410() {
    let (_h, client) = cluster(Options {
        history: 4,
        ..Options::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    for i in 0..8 {
        cms.create(&PostParams::default(), &cm(&format!("c{i}"), &[]))
            .await
            .expect("create");
    }
    let mut stream = cms
        .watch(&WatchParams::default(), "1")
        .await
        .expect("watch")
        .boxed();
    match stream.next().await {
        Some(Ok(WatchEvent::Error(e))) => assert_eq!((e.code, e.reason.as_str()), (410, "Expired")),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_watcher_recovers_from_410_by_relisting() {
    let options = Options {
        history: 4,
        bookmark_interval: Duration::from_millis(100),
        ..Options::default()
    };
    let (_h, client) = cluster(options).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    // What the watcher believes the namespace holds, and how often it (re)listed.
    let seen: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let inits = Arc::new(Mutex::new(0usize));
    let (s, i) = (seen.clone(), inits.clone());
    let mut stream = watcher(cms.clone(), watcher::Config::default()).boxed();
    let task = tokio::spawn(async move {
        let mut pending = BTreeMap::new();
        while let Some(ev) = stream.next().await {
            let name_data = |c: &ConfigMap| {
                (
                    c.metadata.name.clone().unwrap_or_default(),
                    format!("{:?}", c.data),
                )
            };
            let Ok(ev) = ev else { continue };
            let mut seen = s.lock().expect("lock");
            match ev {
                watcher::Event::Init => {
                    *i.lock().expect("lock") += 1;
                    pending.clear();
                }
                watcher::Event::InitApply(c) => {
                    let (n, d) = name_data(&c);
                    pending.insert(n, d);
                }
                watcher::Event::InitDone => *seen = std::mem::take(&mut pending),
                watcher::Event::Apply(c) => {
                    let (n, d) = name_data(&c);
                    seen.insert(n, d);
                }
                watcher::Event::Delete(c) => {
                    seen.remove(&name_data(&c).0);
                }
            }
        }
    });
    let pp = PostParams::default();
    let truth = || async {
        let list = cms.list(&ListParams::default()).await.expect("list");
        list.items
            .iter()
            .map(|c| {
                (
                    c.metadata.name.clone().unwrap_or_default(),
                    format!("{:?}", c.data),
                )
            })
            .collect::<BTreeMap<_, _>>()
    };
    eventually(5, "the first list", || async {
        *inits.lock().expect("lock") >= 1
    })
    .await;
    for i in 0..3 {
        cms.create(&pp, &cm(&format!("keep{i}"), &[]))
            .await
            .expect("create");
    }
    eventually(5, "the watcher to see three", || async {
        seen.lock().expect("lock").len() == 3
    })
    .await;
    // One request, many events: more than the history holds pass before the watcher reads
    // any of them, so its next read is from an expired version.
    for i in 0..6 {
        cms.create(&pp, &cm(&format!("tmp{i}"), &[("tmp", "yes")]))
            .await
            .expect("create");
    }
    cms.delete_collection(
        &DeleteParams::default(),
        &ListParams::default().labels("tmp=yes"),
    )
    .await
    .expect("delete collection");
    cms.create(&pp, &cm("after", &[]))
        .await
        .expect("create after");
    let want = truth().await;
    eventually(
        10,
        "the watcher to converge on the server's state",
        || async { *seen.lock().expect("lock") == want },
    )
    .await;
    assert!(
        *inits.lock().expect("lock") >= 2,
        "the watcher re-listed after 410"
    );
    task.abort();
}

#[tokio::test]
async fn discovery_serves_crd_resources() {
    let (_h, client) = cluster(Options::default()).await;
    let _ = widgets(&client).await;
    let discovery = kube::Discovery::new(client.clone())
        .run()
        .await
        .expect("discovery");
    let (ar, caps) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(ar, _)| ar.kind == "Widget")
        .expect("Widget discovered");
    assert_eq!(ar.plural, "widgets");
    assert!(
        caps.subresources
            .iter()
            .any(|(s, _)| s.plural.ends_with("status"))
    );
    assert!(discovery.has_group("apps"));
    let crds: Api<CustomResourceDefinition> = Api::all(client);
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .expect("delete CRD");
    let after = kube::Discovery::new(crds.into_client())
        .run()
        .await
        .expect("discovery");
    assert!(!after.has_group("example.com"));
}

/// Not a benchmark: a figure for the README's claims (creates/s through kube-rs, one client,
/// sequential, debug build), and a guard against a pathological slowdown.
#[tokio::test]
async fn creates_per_second_figure() {
    let (_h, client) = cluster(Options::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let n = 300;
    let start = Instant::now();
    for i in 0..n {
        cms.create(
            &PostParams::default(),
            &cm(&format!("load{i}"), &[("load", "yes")]),
        )
        .await
        .expect("create");
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    let listed = cms
        .list(&ListParams::default().labels("load=yes"))
        .await
        .expect("list");
    assert_eq!(listed.items.len(), n);
    eprintln!("dev API: {rate:.0} creates/s (sequential, one kube client)");
    assert!(rate > 20.0, "{rate:.0} creates/s");
}

#[tokio::test]
async fn streaming_list_and_selector_watches() {
    let (_h, client) = cluster(Options::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let pp = PostParams::default();
    cms.create(&pp, &cm("old", &[("app", "web")]))
        .await
        .expect("create");
    // sendInitialEvents: the existing objects, then the initial-events-end bookmark.
    let config = watcher::Config::default().streaming_lists();
    let mut stream = watcher(cms.clone(), config).boxed();
    let mut initial = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), stream.next()).await {
            Ok(Some(Ok(watcher::Event::InitApply(c)))) => {
                initial.push(c.metadata.name.unwrap_or_default())
            }
            Ok(Some(Ok(watcher::Event::InitDone))) => break,
            Ok(Some(Ok(_))) => {}
            other => panic!("streaming list did not finish: {other:?}"),
        }
    }
    assert_eq!(initial, ["old"]);

    // A watch with a label selector: an object that stops matching is DELETED for it.
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .unwrap_or_default();
    let wp = WatchParams::default().labels("app=web");
    let mut w = cms.watch(&wp, &rv).await.expect("watch").boxed();
    cms.patch(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
    )
    .await
    .expect("relabel");
    loop {
        match tokio::time::timeout(Duration::from_secs(5), w.next()).await {
            Ok(Some(Ok(WatchEvent::Deleted(c)))) => {
                assert_eq!(c.metadata.name.as_deref(), Some("old"));
                break;
            }
            Ok(Some(Ok(WatchEvent::Bookmark(_)))) => {}
            other => panic!("expected DELETED for an object leaving the selection, got {other:?}"),
        }
    }
}

/// Bad requests get a `Status` naming what is wrong, as a real server answers them.
#[tokio::test]
async fn bad_requests_are_status_objects() {
    let (h, client) = cluster(Options::default()).await;
    let _ = widgets(&client).await;
    let http = reqwest::Client::new();
    let base = h.url();
    let cms = format!("{base}/api/v1/namespaces/default/configmaps");
    let status = |v: &Value| (v["kind"].clone(), v["code"].clone(), v["reason"].clone());
    let send = |rb: reqwest::RequestBuilder| async move {
        let resp = rb.send().await.expect("request");
        let code = resp.status().as_u16();
        let body: Value = resp.json().await.expect("a JSON Status");
        (code, body)
    };

    let (code, body) = send(
        http.post(&cms)
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(
        (code, status(&body)),
        (400, (json!("Status"), json!(400), json!("BadRequest")))
    );

    let (code, body) = send(http.get(format!("{cms}?labelSelector=a%20b"))).await;
    assert_eq!(code, 400, "{body}");
    let (code, body) = send(http.get(format!("{cms}?limit=-1"))).await;
    assert_eq!(code, 400);
    assert!(
        body["message"].as_str().unwrap_or("").contains("limit"),
        "{body}"
    );
    let (code, body) = send(http.get(format!("{cms}?watch=true&resourceVersion=abc"))).await;
    assert_eq!(code, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("resourceVersion"),
        "{body}"
    );

    let (code, body) = send(http.get(format!("{base}/apis/nope.example.com/v1/things"))).await;
    assert_eq!(
        (code, status(&body)),
        (404, (json!("Status"), json!(404), json!("NotFound")))
    );
    let (code, body) = send(http.get(format!("{cms}/missing"))).await;
    assert_eq!(
        body["details"],
        json!({"name": "missing", "group": "", "kind": "configmaps"})
    );
    assert_eq!(code, 404);

    http.post(&cms)
        .json(&json!({"metadata": {"name": "x"}}))
        .send()
        .await
        .expect("create");
    let (code, body) = send(http.post(format!("{cms}/x")).json(&json!({}))).await;
    assert_eq!(
        (code, body["reason"].clone()),
        (405, json!("MethodNotAllowed"))
    );
    let (code, body) = send(
        http.patch(format!("{cms}/x"))
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await;
    assert_eq!(
        (code, body["reason"].clone()),
        (415, json!("UnsupportedMediaType"))
    );
    let (code, body) = send(
        http.patch(format!("{cms}/x"))
            .header("content-type", "application/apply-patch+yaml")
            .body("data: {a: b}"),
    )
    .await;
    assert_eq!((code, body["reason"].clone()), (422, json!("Invalid")));
    assert_eq!(body["details"]["causes"][0]["field"], "fieldManager");
    let (code, body) = send(
        http.patch(format!("{cms}/x"))
            .header("content-type", "application/json-patch+json")
            .body(r#"[{"op": "test", "path": "/data/a", "value": "zzz"}]"#),
    )
    .await;
    assert_eq!(code, 422, "{body}");

    let widgets = format!("{base}/apis/example.com/v1/namespaces/default/widgets");
    http.post(&widgets)
        .json(&json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"size": 1}}))
        .send()
        .await
        .expect("create widget");
    let (code, body) = send(
        http.patch(format!("{widgets}/w"))
            .header("content-type", "application/strategic-merge-patch+json")
            .body(r#"{"spec": {"size": 2}}"#),
    )
    .await;
    assert_eq!(
        (code, body["reason"].clone()),
        (415, json!("UnsupportedMediaType"))
    );
    let (code, body) = send(
        http.put(format!("{widgets}/w"))
            .json(&json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "other"}, "spec": {"size": 1}})),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("does not match the name"),
        "{body}"
    );
}

/// `r4 dev` as a user runs it: loopback only, a kubeconfig, the API, a clean stop on Ctrl-C.
#[tokio::test]
async fn r4_dev_binary_serves_and_stops_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let bin = env!("CARGO_BIN_EXE_r4");
    let refused = Command::new(bin)
        .args(["dev", "--listen", "0.0.0.0:6443"])
        .output()
        .expect("run r4 dev");
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("--listen"), "{err}");

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = dir.path().join("dev.kubeconfig");
    let mut child = Command::new(bin)
        .args([
            "dev",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--kubeconfig-out",
        ])
        .arg(&kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn r4 dev");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let export = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(line) if line.starts_with("export KUBECONFIG=") => break line,
            Ok(_) => {}
            Err(e) => panic!("r4 dev printed no export line: {e}"),
        }
    };
    assert!(export.ends_with("dev.kubeconfig"), "{export}");
    let config = kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig");
    assert_eq!(config.current_context.as_deref(), Some("r4-dev"));
    let options = kube::config::KubeConfigOptions::default();
    let client = Client::try_from(
        Config::from_custom_kubeconfig(config, &options)
            .await
            .expect("config"),
    )
    .expect("client");
    let version = client.apiserver_version().await.expect("/version");
    assert_eq!(
        (version.major.as_str(), version.minor.as_str()),
        ("1", "32")
    );
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "r4 dev did not stop on SIGINT");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(code.success(), "{code:?}");
}

/// kube's event Recorder writes `events.k8s.io/v1`; `kubectl get events` and `describe` read
/// core/v1. One stored Event serves both views, as on a real server.
#[tokio::test]
async fn recorder_events_are_seen_as_core_events() {
    use kube::runtime::events::{Event as RecordedEvent, EventType, Recorder};
    let (_h, client) = cluster(Options::default()).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let owner = cms
        .create(&PostParams::default(), &cm("subject", &[]))
        .await
        .expect("create");
    let recorder = Recorder::new(client.clone(), "r4-test".into());
    let ev = RecordedEvent {
        type_: EventType::Normal,
        reason: "Tested".into(),
        note: Some("recorded by the test".into()),
        action: "Test".into(),
        secondary: None,
    };
    let reference = kube::Resource::object_ref(&owner, &());
    recorder.publish(&ev, &reference).await.expect("publish");
    recorder
        .publish(&ev, &reference)
        .await
        .expect("publish again (a series patch)");
    let core: Api<k8s_openapi::api::core::v1::Event> = Api::default_namespaced(client.clone());
    let events = core
        .list(&ListParams::default())
        .await
        .expect("list core events");
    let e = events.items.first().expect("one event");
    assert_eq!(e.message.as_deref(), Some("recorded by the test"));
    assert_eq!(e.involved_object.name.as_deref(), Some("subject"));
    assert_eq!(e.reason.as_deref(), Some("Tested"));
    let new: Api<k8s_openapi::api::events::v1::Event> = Api::default_namespaced(client);
    let seen = new
        .list(&ListParams::default())
        .await
        .expect("list events.k8s.io");
    assert_eq!(seen.items.len(), 1);
    assert_eq!(seen.items[0].note.as_deref(), Some("recorded by the test"));
}

#[tokio::test]
async fn watch_bookmarks_and_timeout() {
    let options = Options {
        bookmark_interval: Duration::from_millis(100),
        ..Options::default()
    };
    let (_h, client) = cluster(options).await;
    let cms: Api<ConfigMap> = Api::default_namespaced(client);
    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .unwrap_or_default();
    let started = Instant::now();
    let mut w = cms
        .watch(&WatchParams::default().timeout(1), &rv)
        .await
        .expect("watch")
        .boxed();
    let mut bookmarks = 0;
    while let Some(ev) = tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("the watch ends by its timeoutSeconds")
    {
        if let Ok(WatchEvent::Bookmark(b)) = ev {
            assert_eq!(b.metadata.resource_version, rv);
            bookmarks += 1;
        }
    }
    assert!(bookmarks >= 2, "{bookmarks} bookmarks in a second");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

/// kube-rs' Controller against the dev API: a ConfigMap parent gets an owned Secret through
/// server-side apply; a change to the child wakes the parent's reconcile; deleting the parent
/// collects the child.
#[tokio::test]
async fn kube_controller_owns_children() {
    use k8s_openapi::api::core::v1::Secret;
    use kube::runtime::controller::{Action, Controller};
    use kube::{Resource, ResourceExt};
    let (_h, client) = cluster(Options::default()).await;
    let parents: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let secrets: Api<Secret> = Api::default_namespaced(client.clone());
    let reconciles = Arc::new(Mutex::new(0usize));
    let counter = reconciles.clone();
    let reconcile = move |cm: Arc<ConfigMap>, secrets: Arc<Api<Secret>>| {
        let counter = counter.clone();
        async move {
            *counter.lock().expect("lock") += 1;
            let owner = cm.controller_owner_ref(&()).expect("owner ref");
            let child = json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": {"name": format!("{}-child", cm.name_any()), "ownerReferences": [owner]},
                "stringData": {"from": cm.name_any()},
            });
            secrets
                .patch(
                    &format!("{}-child", cm.name_any()),
                    &PatchParams::apply("test-controller").force(),
                    &Patch::Apply(child),
                )
                .await?;
            Ok::<_, kube::Error>(Action::await_change())
        }
    };
    let controller = Controller::new(
        parents.clone(),
        watcher::Config::default().labels("app=parent"),
    )
    .owns(secrets.clone(), watcher::Config::default())
    .run(
        reconcile,
        |_, _, _| Action::requeue(Duration::from_secs(1)),
        Arc::new(secrets.clone()),
    )
    .for_each(|_| async {});
    let task = tokio::spawn(controller);
    parents
        .create(&PostParams::default(), &cm("p1", &[("app", "parent")]))
        .await
        .expect("parent");
    eventually(10, "the owned child", || async {
        secrets.get_opt("p1-child").await.ok().flatten().is_some()
    })
    .await;
    let before = *reconciles.lock().expect("lock");
    secrets
        .patch(
            "p1-child",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "yes"}}})),
        )
        .await
        .expect("touch child");
    eventually(10, "a reconcile woken by the child", || async {
        *reconciles.lock().expect("lock") > before
    })
    .await;
    parents
        .delete("p1", &DeleteParams::default())
        .await
        .expect("delete parent");
    eventually(10, "the child collected", || async {
        secrets.get_opt("p1-child").await.ok().flatten().is_none()
    })
    .await;
    task.abort();
}
