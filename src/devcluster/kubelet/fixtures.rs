//! Test fixtures: a scripted API server over `tower_test::mock` (as kube-rs's controller-rs
//! does) and object builders.

use std::collections::BTreeMap;

use http::{Request, Response};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::Client;
use kube::client::Body;
use tower_test::mock::{self, Handle, SendResponse};

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
