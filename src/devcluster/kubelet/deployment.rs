//! The deployment controller against the API: read the pods a Deployment controls, take the
//! steps [`rollout::plan`] decides (create or delete pods), write [`rollout::status`]. The
//! decisions are all in [`rollout`]; this module only reads and writes.
//!
//! Pods are listed from the API at each reconcile rather than from a cache, so a pod just
//! created is never counted twice or missed (what the real controller's "expectations"
//! are for). Pods matching the selector but not controlled by the Deployment are left alone
//! (no adoption).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use rand::Rng;

use super::rollout::{self, PodView};
use super::{Context, KubeletError};

/// One pass over a Deployment: pods, then status.
pub async fn reconcile(d: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, KubeletError> {
    // Its pods go with it (garbage collection by owner); nothing to do meanwhile.
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let (Some(ns), Some(uid)) = (d.namespace(), d.metadata.uid.clone()) else {
        return Err(KubeletError::Invalid(format!(
            "deployment {} has no namespace or uid",
            d.name_any()
        )));
    };
    let name = d.name_any();
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let owned = owned_pods(&ctx, &pods, &d, &uid).await?;
    let now = ctx.now();
    let min_ready = d.spec.min_ready_seconds.unwrap_or(0);
    let views: Vec<PodView> = owned
        .iter()
        .map(|p| PodView::of(p, min_ready, now))
        .collect();
    let paused = d.spec.paused.unwrap_or(false);
    if !paused {
        apply(&ctx, &pods, &d, rollout::plan(&d, &views)).await?;
    }
    let status = rollout::status(&d, &views, now);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &ns);
    let counts = views.clone();
    super::replace_status(&ctx, &deployments, &name, d.as_ref(), |current| {
        let s = rollout::status(current, &counts, now);
        (current.status.as_ref() != Some(&s)).then(|| {
            let mut next = current.clone();
            next.status = Some(s);
            next
        })
    })
    .await?;
    Ok(match rollout::next_check(&d, &status, now) {
        Some(secs) => Action::requeue(Duration::from_secs(u64::try_from(secs).unwrap_or(1))),
        None => Action::await_change(),
    })
}

/// The pods of `d`'s namespace that match its selector and that it controls.
async fn owned_pods(
    ctx: &Context,
    pods: &Api<Pod>,
    d: &Deployment,
    uid: &str,
) -> Result<Vec<Pod>, KubeletError> {
    let mut lp = ListParams::default();
    if let Some(q) = rollout::selector_query(d) {
        lp = lp.labels(&q);
    }
    let list = ctx.within("list pods", pods.list(&lp)).await??;
    Ok(list
        .items
        .into_iter()
        .filter(|p| rollout::controlled_by(p, uid))
        .collect())
}

/// Take the planned steps. A name already taken gets another suffix; a pod already gone is
/// deleted.
async fn apply(
    ctx: &Context,
    pods: &Api<Pod>,
    d: &Deployment,
    actions: Vec<rollout::Action>,
) -> Result<(), KubeletError> {
    let Some(hash) = rollout::template_hash(d) else {
        return Ok(());
    };
    for a in actions {
        match a {
            rollout::Action::Create => {
                for attempt in 0..3 {
                    let suffix = {
                        let mut rng = rand::rng();
                        rollout::random_suffix(|| rng.random())
                    };
                    let Some(pod) = rollout::new_pod(d, &hash, &suffix) else {
                        return Ok(());
                    };
                    match ctx
                        .within("create pod", pods.create(&PostParams::default(), &pod))
                        .await?
                    {
                        Ok(p) => {
                            tracing::info!(pod = %p.name_any(), deployment = %d.name_any(), "created pod");
                            break;
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 && attempt < 2 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            rollout::Action::Delete(name) => {
                match ctx
                    .within("delete pod", pods.delete(&name, &DeleteParams::default()))
                    .await?
                {
                    Ok(_) => tracing::info!(pod = %name, deployment = %d.name_any(), "deleted pod"),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
    Ok(())
}

/// After an error: look again soon.
pub fn error_policy(d: Arc<Deployment>, e: &KubeletError, _: Arc<Context>) -> Action {
    tracing::warn!(deployment = %d.name_any(), error = %e, kind = e.metric_label(), "deployment reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcluster::kubelet::fixtures::{ApiServer, context, deployment};
    use http::Method;

    #[tokio::test]
    async fn a_new_deployment_gets_its_pods_and_its_status() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let d = deployment("web", 2, "ghcr.io/acme/web:1");
        let hash = rollout::template_hash(&d).unwrap();
        let server = tokio::spawn(async move {
            let (req, body) = api.next().await;
            assert_eq!(req.method(), Method::GET);
            assert!(
                req.uri()
                    .path()
                    .ends_with("/api/v1/namespaces/default/pods"),
                "{}",
                req.uri()
            );
            assert!(
                req.uri()
                    .query()
                    .unwrap_or("")
                    .contains("labelSelector=app%3Dweb"),
                "{}",
                req.uri()
            );
            let _ = body;
            api.reply(200, serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}));
            let mut names = Vec::new();
            for _ in 0..2 {
                let (req, body) = api.next().await;
                assert_eq!(req.method(), Method::POST);
                let pod: Pod = serde_json::from_slice(&body).unwrap();
                names.push(pod.metadata.name.clone().unwrap());
                api.reply(201, serde_json::to_value(&pod).unwrap());
            }
            let (req, body) = api.next().await;
            assert_eq!(req.method(), Method::PUT);
            assert!(
                req.uri().path().ends_with("/deployments/web/status"),
                "{}",
                req.uri()
            );
            let d: Deployment = serde_json::from_slice(&body).unwrap();
            api.reply(200, serde_json::to_value(&d).unwrap());
            (names, d)
        });
        let action = reconcile(Arc::new(d), ctx).await.unwrap();
        let (names, written) = server.await.unwrap();
        assert!(
            names.iter().all(|n| n.starts_with(&format!("web-{hash}-"))),
            "{names:?}"
        );
        assert_ne!(names[0], names[1]);
        let s = written.status.unwrap();
        assert_eq!(s.observed_generation, Some(1));
        let p = s
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_.as_deref() == Some("Progressing"))
            .unwrap();
        assert_eq!(p.reason.as_deref(), Some("NewReplicaSetCreated"));
        // A rollout under way is looked at again by its deadline.
        assert_eq!(action, Action::requeue(Duration::from_secs(601)));
    }

    #[tokio::test]
    async fn a_status_conflict_is_settled_by_reading_again() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let mut d = deployment("web", 0, "ghcr.io/acme/web:1");
        d.metadata.resource_version = Some("1".into());
        let fresh = {
            let mut f = d.clone();
            f.metadata.resource_version = Some("2".into());
            f
        };
        let server = tokio::spawn(async move {
            let (_, _) = api.next().await;
            api.reply(200, serde_json::json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}));
            let (req, body) = api.next().await;
            assert_eq!(req.method(), Method::PUT);
            let sent: Deployment = serde_json::from_slice(&body).unwrap();
            assert_eq!(sent.metadata.resource_version.as_deref(), Some("1"));
            api.reply(409, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified"}));
            let (req, _) = api.next().await;
            assert_eq!(req.method(), Method::GET);
            api.reply(200, serde_json::to_value(&fresh).unwrap());
            let (req, body) = api.next().await;
            assert_eq!(req.method(), Method::PUT);
            let sent: Deployment = serde_json::from_slice(&body).unwrap();
            assert_eq!(sent.metadata.resource_version.as_deref(), Some("2"));
            api.reply(200, serde_json::to_value(&sent).unwrap());
        });
        reconcile(Arc::new(d), ctx).await.unwrap();
        server.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn an_api_that_does_not_answer_is_an_error_not_a_hang() {
        let (client, _api) = ApiServer::new();
        let ctx = context(client);
        let d = deployment("web", 1, "x:1");
        let err = reconcile(Arc::new(d), ctx).await.unwrap_err();
        assert_eq!(err.metric_label(), "timeout");
    }
}
