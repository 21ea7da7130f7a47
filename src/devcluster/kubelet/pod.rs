//! The kubelet against the API: start each long-running container of a pod through the
//! first [`PodRuntime`] that runs it, probe it, restart it after a back-off when it exits (or
//! cannot start), stop it when the pod goes, and write the pod status ([`pod_status`]) through
//! the `pods/status` subresource whenever it changes.
//!
//! A pod being deleted (`deletionTimestamp`) has its containers stopped, then its deletion
//! confirmed (grace period 0), as a kubelet does. A pod that disappeared without that (an API
//! that deletes at once) is found by [`reap`], which compares the pods running here with the
//! pods the API has.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::api::{DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::{Api, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;

use super::podstatus::{self, Failure, Observed, Run, pod_status};
use super::runtime::{PodRuntime, Probe, Running};
use super::{Context, KubeletError};

/// First back-off after a container exits; it doubles up to [`MAX_BACKOFF`] (the kubelet's).
pub const FIRST_BACKOFF: Duration = Duration::from_secs(10);
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often a ready pod's containers are probed again (to notice one that exits).
const PROBE_READY: Duration = Duration::from_secs(5);
/// How often a starting pod's containers are probed.
const PROBE_STARTING: Duration = Duration::from_millis(500);
/// How often [`reap`] looks for pods gone from the API.
const REAP_EVERY: Duration = Duration::from_secs(2);

/// The back-off before restart number `restarts + 1`.
pub fn backoff(restarts: i32) -> Duration {
    let doublings = u32::try_from(restarts.clamp(0, 16)).unwrap_or(0);
    FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(doublings))
        .min(MAX_BACKOFF)
}

/// One container of a pod this kubelet runs.
#[derive(Default)]
struct Slot {
    running: Option<Box<dyn Running>>,
    observed: Observed,
    /// While backing off after an exit: when to start it again.
    retry_at: Option<Instant>,
}

/// A pod this kubelet runs.
#[derive(Default)]
pub struct PodEntry {
    containers: BTreeMap<String, Slot>,
}

impl PodEntry {
    async fn stop(self, ctx: &Context) {
        for (_, slot) in self.containers {
            if let Some(r) = slot.running {
                stop(ctx, r).await;
            }
        }
    }
}

/// Stop a container, waiting at most [`KubeletOptions::start_timeout`](super::KubeletOptions)
/// for it (a runtime that overruns is left to finish on its own).
async fn stop(ctx: &Context, r: Box<dyn Running>) {
    if tokio::time::timeout(ctx.opts.start_timeout, r.stop())
        .await
        .is_err()
    {
        tracing::warn!(
            "a container did not stop within {:?}",
            ctx.opts.start_timeout
        );
    }
}

fn take(ctx: &Context, uid: &str) -> Option<PodEntry> {
    ctx.pods.lock().ok().and_then(|mut m| m.remove(uid))
}

fn put(ctx: &Context, uid: &str, e: PodEntry) {
    if let Ok(mut m) = ctx.pods.lock() {
        m.insert(uid.to_string(), e);
    }
}

fn runtime_for<'a>(ctx: &'a Context, pod: &Pod, c: &Container) -> Option<&'a Arc<dyn PodRuntime>> {
    ctx.runtimes.iter().find(|r| r.runs(pod, c))
}

/// The container exited (or could not start) with `why`: back off, then start it again.
fn crashed(slot: &mut Slot, name: &str, pod: &str, why: String) {
    let wait = backoff(slot.observed.restarts);
    slot.retry_at = Some(Instant::now() + wait);
    slot.observed.last_exit = Some(why);
    slot.observed.run = Run::Waiting {
        reason: "CrashLoopBackOff".into(),
        message: format!(
            "back-off {}s restarting failed container={name} pod={pod}",
            wait.as_secs()
        ),
    };
}

/// One pass over a pod: start, probe or restart its containers, then write its status.
pub async fn reconcile(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, KubeletError> {
    let (Some(uid), Some(ns)) = (pod.metadata.uid.clone(), pod.namespace()) else {
        return Err(KubeletError::Invalid(format!(
            "pod {} has no uid or namespace",
            pod.name_any()
        )));
    };
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    if pod.metadata.deletion_timestamp.is_some() {
        if let Some(e) = take(&ctx, &uid) {
            e.stop(&ctx).await;
        }
        super::forget_written(&ctx, std::slice::from_ref(&uid));
        // Containers stopped: confirm the deletion, of this very pod (not a successor of the
        // same name).
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.clone()),
                resource_version: None,
            }),
            ..Default::default()
        };
        match ctx.within("delete pod", api.delete(&name, &dp)).await? {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    }
    if let Some(v) = podstatus::unknown_failure(&pod) {
        tracing::warn!(pod = %name, value = %v, "unknown {} value, ignored (ImagePullBackOff or CrashLoopBackOff)", podstatus::FAIL_ANNOTATION);
    }

    let mut entry = take(&ctx, &uid).unwrap_or_default();
    let mut next: Option<Duration> = None;
    let mut soon = |d: Duration| next = Some(next.map_or(d, |n| n.min(d)));
    for c in podstatus::long_running(&pod) {
        let slot = entry.containers.entry(c.name.clone()).or_default();
        let failure = podstatus::failure_of(&pod, c);
        if failure == Some(Failure::ImagePullBackOff) {
            if let Some(r) = slot.running.take() {
                stop(&ctx, r).await;
            }
            slot.observed.run = Run::Waiting {
                reason: "ImagePullBackOff".into(),
                message: format!(
                    "Back-off pulling image {:?}",
                    c.image.as_deref().unwrap_or("")
                ),
            };
            continue;
        }
        // Made to crash while it runs (the annotation added to a running pod): it exits now.
        if failure == Some(Failure::CrashLoopBackOff)
            && let Some(r) = slot.running.take()
        {
            stop(&ctx, r).await;
            let why = format!("killed ({}: CrashLoopBackOff)", podstatus::FAIL_ANNOTATION);
            crashed(slot, &c.name, &name, why);
            soon(backoff(slot.observed.restarts));
            continue;
        }
        if slot.running.is_none() {
            let now = Instant::now();
            match slot.retry_at {
                Some(at) if now < at => {
                    soon(at - now);
                    continue;
                }
                Some(_) => slot.observed.restarts += 1,
                None => {}
            }
            let started = if failure == Some(Failure::CrashLoopBackOff) {
                Err(format!(
                    "exited at once ({}: CrashLoopBackOff)",
                    podstatus::FAIL_ANNOTATION
                ))
            } else {
                match runtime_for(&ctx, &pod, c) {
                    None => Err("no runtime runs this container".to_string()),
                    Some(rt) => {
                        match tokio::time::timeout(ctx.opts.start_timeout, rt.start(&pod, c)).await
                        {
                            Ok(r) => r,
                            Err(_) => {
                                Err(format!("did not start within {:?}", ctx.opts.start_timeout))
                            }
                        }
                    }
                }
            };
            match started {
                Ok(r) => {
                    slot.running = Some(r);
                    slot.retry_at = None;
                    slot.observed.run = Run::Running {
                        since: ctx.now(),
                        ready: false,
                    };
                }
                Err(why) => {
                    tracing::info!(pod = %name, container = %c.name, reason = %why, "container exited");
                    crashed(slot, &c.name, &name, why);
                    soon(backoff(slot.observed.restarts));
                    continue;
                }
            }
        }
        let probe = slot.running.as_ref().map(|r| r.ready());
        match probe {
            Some(Probe::Exited(why)) => {
                if let Some(r) = slot.running.take() {
                    stop(&ctx, r).await;
                }
                tracing::info!(pod = %name, container = %c.name, reason = %why, "container exited");
                crashed(slot, &c.name, &name, why);
                soon(backoff(slot.observed.restarts));
            }
            Some(p) => {
                let ready = p == Probe::Ready;
                if let Run::Running { since, .. } = slot.observed.run {
                    slot.observed.run = Run::Running { since, ready };
                }
                soon(if ready { PROBE_READY } else { PROBE_STARTING });
            }
            None => {}
        }
    }
    // Containers no longer in the spec (an API that lets the spec change) are stopped.
    let wanted: HashSet<String> = podstatus::long_running(&pod)
        .iter()
        .map(|c| c.name.clone())
        .collect();
    let gone: Vec<String> = entry
        .containers
        .keys()
        .filter(|k| !wanted.contains(*k))
        .cloned()
        .collect();
    for k in gone {
        if let Some(r) = entry.containers.remove(&k).and_then(|s| s.running) {
            stop(&ctx, r).await;
        }
    }
    let observed: BTreeMap<String, Observed> = entry
        .containers
        .iter()
        .map(|(k, s)| (k.clone(), s.observed.clone()))
        .collect();
    put(&ctx, &uid, entry);

    let now = ctx.now();
    super::replace_status(&ctx, &api, &name, pod.as_ref(), |current| {
        // A successor of the same name is another pod.
        if current.metadata.uid.as_deref() != Some(uid.as_str()) {
            return None;
        }
        let s = pod_status(current, &observed, now);
        (current.status.as_ref() != Some(&s)).then(|| {
            let mut next = current.clone();
            next.status = Some(s);
            next
        })
    })
    .await?;
    Ok(next.map_or(Action::await_change(), Action::requeue))
}

/// After an error: look again soon.
pub fn error_policy(pod: Arc<Pod>, e: &KubeletError, _: Arc<Context>) -> Action {
    tracing::warn!(pod = %pod.name_any(), error = %e, kind = e.metric_label(), "kubelet reconcile failed");
    Action::requeue(Duration::from_secs(2))
}

/// Stop the containers of pods the API no longer has, every 2 s, until `shutdown`.
pub async fn reap(ctx: Arc<Context>, store: Store<Pod>, mut shutdown: watch::Receiver<bool>) {
    if *shutdown.borrow() {
        return;
    }
    loop {
        tokio::select! {
            _ = tokio::time::sleep(REAP_EVERY) => {}
            r = shutdown.wait_for(|v| *v) => { let _ = r; return; }
        }
        // Before the first list, the store knows nothing: nothing can be judged gone.
        tokio::select! {
            r = store.wait_until_ready() => if r.is_err() { return },
            r = shutdown.wait_for(|v| *v) => { let _ = r; return; }
        }
        let live: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|p| p.metadata.uid.clone())
            .collect();
        reap_missing(&ctx, &live).await;
    }
}

/// Stop every pod run here whose uid is not in `live`.
pub(crate) async fn reap_missing(ctx: &Context, live: &HashSet<String>) {
    let (uids, gone): (Vec<String>, Vec<PodEntry>) = match ctx.pods.lock() {
        Ok(mut m) => {
            let uids: Vec<String> = m.keys().filter(|u| !live.contains(*u)).cloned().collect();
            let gone = uids.iter().filter_map(|u| m.remove(u)).collect();
            (uids, gone)
        }
        Err(_) => (Vec::new(), Vec::new()),
    };
    super::forget_written(ctx, &uids);
    for e in gone {
        e.stop(ctx).await;
    }
}

/// Stop every container this kubelet runs.
pub async fn stop_all(ctx: &Context) {
    reap_missing(ctx, &HashSet::new()).await;
}

/// How many pods this kubelet runs now.
pub fn running(ctx: &Context) -> usize {
    ctx.pods.lock().map(|m| m.len()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devcluster::kubelet::fixtures::{ApiServer, context, t0};
    use http::Method;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn pod(image: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-abc-xyz12".into()),
                namespace: Some("default".into()),
                uid: Some("u1".into()),
                resource_version: Some("1".into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "web".into(),
                    image: Some(image.into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            status: None,
        }
    }

    /// Answer one status write, echoing it; the pod written.
    async fn status_write(api: &mut ApiServer) -> Pod {
        let (req, body) = api.next().await;
        assert_eq!(req.method(), Method::PUT);
        assert!(
            req.uri()
                .path()
                .ends_with("/namespaces/default/pods/web-abc-xyz12/status"),
            "{}",
            req.uri()
        );
        let p: Pod = serde_json::from_slice(&body).unwrap();
        api.reply(200, serde_json::to_value(&p).unwrap());
        p
    }

    fn ready(p: &Pod) -> bool {
        podstatus::is_ready(p)
    }

    #[test]
    fn back_off_doubles_up_to_five_minutes() {
        assert_eq!(backoff(0), Duration::from_secs(10));
        assert_eq!(backoff(1), Duration::from_secs(20));
        assert_eq!(backoff(5), Duration::from_secs(300));
        assert_eq!(backoff(i32::MAX), Duration::from_secs(300));
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_runs_then_becomes_ready_and_its_status_says_so() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let p = pod("ghcr.io/acme/web:1");
        let server = tokio::spawn(async move {
            let first = status_write(&mut api).await;
            (api, first)
        });
        let action = reconcile(Arc::new(p.clone()), ctx.clone()).await.unwrap();
        let (mut api, first) = server.await.unwrap();
        let s = first.status.as_ref().unwrap();
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.pod_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(s.start_time, Some(Time(t0())));
        assert!(!ready(&first));
        assert_eq!(action, Action::requeue(PROBE_STARTING));
        assert_eq!(running(&ctx), 1);
        // The simulated container is ready after its delay.
        tokio::time::advance(Duration::from_secs(1)).await;
        let server = tokio::spawn(async move { status_write(&mut api).await });
        let action = reconcile(Arc::new(first.clone()), ctx.clone())
            .await
            .unwrap();
        let second = server.await.unwrap();
        assert!(ready(&second));
        assert_eq!(action, Action::requeue(PROBE_READY));
        // Nothing changed since: nothing is written (the mock would hang on a request).
        let action = reconcile(Arc::new(second.clone()), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(PROBE_READY));
        // Gone from the API: the reaper stops it.
        reap_missing(&ctx, &HashSet::new()).await;
        assert_eq!(running(&ctx), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_image_that_cannot_be_pulled_keeps_the_pod_pending() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let p = pod("ghcr.io/acme/web:cannot-pull");
        let server = tokio::spawn(async move { status_write(&mut api).await });
        let action = reconcile(Arc::new(p), ctx).await.unwrap();
        let written = server.await.unwrap();
        let s = written.status.as_ref().unwrap();
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        let waiting = cs.state.as_ref().unwrap().waiting.as_ref().unwrap();
        assert_eq!(waiting.reason.as_deref(), Some("ImagePullBackOff"));
        assert!(!ready(&written));
        assert_eq!(action, Action::await_change());
    }

    #[tokio::test(start_paused = true)]
    async fn a_crashing_container_restarts_with_a_growing_back_off() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let mut p = pod("ghcr.io/acme/web:1");
        p.metadata.annotations = Some(
            [(
                podstatus::FAIL_ANNOTATION.to_string(),
                "CrashLoopBackOff".to_string(),
            )]
            .into(),
        );
        let server = tokio::spawn(async move {
            let w = status_write(&mut api).await;
            (api, w)
        });
        let action = reconcile(Arc::new(p), ctx.clone()).await.unwrap();
        let (mut api, written) = server.await.unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        let cs = &written
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0];
        assert_eq!(cs.restart_count, 0);
        assert_eq!(
            super::podstatus::waiting_reason(cs),
            Some("CrashLoopBackOff")
        );
        // Before the back-off ends, nothing changes.
        let action = reconcile(Arc::new(written.clone()), ctx.clone())
            .await
            .unwrap();
        assert_eq!(action, Action::requeue(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_secs(10)).await;
        let server = tokio::spawn(async move { status_write(&mut api).await });
        let action = reconcile(Arc::new(written), ctx).await.unwrap();
        let written = server.await.unwrap();
        let cs = &written
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0];
        assert_eq!(cs.restart_count, 1);
        assert_eq!(action, Action::requeue(Duration::from_secs(20)));
        assert!(!ready(&written));
        assert_eq!(
            written.status.as_ref().unwrap().phase.as_deref(),
            Some("Running")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_being_deleted_is_stopped_and_its_deletion_confirmed() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let p = pod("ghcr.io/acme/web:1");
        let server = tokio::spawn(async move {
            let w = status_write(&mut api).await;
            (api, w)
        });
        reconcile(Arc::new(p), ctx.clone()).await.unwrap();
        let (mut api, mut written) = server.await.unwrap();
        assert_eq!(running(&ctx), 1);
        written.metadata.deletion_timestamp = Some(Time(t0()));
        let server = tokio::spawn(async move {
            let (req, body) = api.next().await;
            assert_eq!(req.method(), Method::DELETE);
            let dp: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(dp["gracePeriodSeconds"], 0);
            assert_eq!(dp["preconditions"]["uid"], "u1");
            api.reply(200, serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 200}));
        });
        let action = reconcile(Arc::new(written), ctx.clone()).await.unwrap();
        server.await.unwrap();
        assert_eq!(action, Action::await_change());
        assert_eq!(running(&ctx), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_status_the_server_normalised_is_not_written_again() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let p = pod("ghcr.io/acme/web:cannot-pull");
        let server = tokio::spawn(async move {
            let (_, body) = api.next().await;
            // The server drops a field it does not know.
            let mut p: Pod = serde_json::from_slice(&body).unwrap();
            p.status.as_mut().unwrap().host_ips = None;
            api.reply(200, serde_json::to_value(&p).unwrap());
            (api, p)
        });
        reconcile(Arc::new(p), ctx.clone()).await.unwrap();
        let (_api, stored) = server.await.unwrap();
        // Its event brings the pod back: nothing is written (a write would wait on the mock
        // until the API deadline and fail).
        reconcile(Arc::new(stored), ctx).await.unwrap();
    }

    /// A runtime whose containers start, then exit with "boom" (as an engine whose role
    /// stopped), counting the starts.
    struct Exiting(std::sync::atomic::AtomicU32);

    struct Exited;

    impl Running for Exited {
        fn ready(&self) -> Probe {
            Probe::Exited("boom".into())
        }
        fn stop(self: Box<Self>) -> futures::future::BoxFuture<'static, ()> {
            Box::pin(async {})
        }
    }

    impl PodRuntime for Exiting {
        fn runs(&self, _: &Pod, _: &Container) -> bool {
            true
        }
        fn start(
            &self,
            _: &Pod,
            _: &Container,
        ) -> futures::future::BoxFuture<'static, Result<Box<dyn Running>, String>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async { Ok(Box::new(Exited) as Box<dyn Running>) })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_that_exits_is_restarted_after_a_back_off() {
        let (client, mut api) = ApiServer::new();
        let rt = Arc::new(Exiting(Default::default()));
        let ctx = crate::devcluster::kubelet::fixtures::context_with(client, vec![rt.clone()]);
        let server = tokio::spawn(async move {
            let w = status_write(&mut api).await;
            (api, w)
        });
        let action = reconcile(Arc::new(pod("ghcr.io/acme/r4:dev")), ctx.clone())
            .await
            .unwrap();
        let (mut api, written) = server.await.unwrap();
        assert_eq!(action, Action::requeue(FIRST_BACKOFF));
        let cs = &written
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0];
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.message.as_deref(), Some("boom"));
        assert_eq!(
            super::podstatus::waiting_reason(cs),
            Some("CrashLoopBackOff")
        );
        assert_eq!(rt.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        tokio::time::advance(FIRST_BACKOFF).await;
        let server = tokio::spawn(async move { status_write(&mut api).await });
        let action = reconcile(Arc::new(written), ctx).await.unwrap();
        let written = server.await.unwrap();
        assert_eq!(rt.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        assert_eq!(
            written.status.unwrap().container_statuses.unwrap()[0].restart_count,
            1
        );
        assert_eq!(action, Action::requeue(backoff(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_running_pod_annotated_to_crash_crashes() {
        let (client, mut api) = ApiServer::new();
        let ctx = context(client);
        let server = tokio::spawn(async move {
            let w = status_write(&mut api).await;
            (api, w)
        });
        reconcile(Arc::new(pod("ghcr.io/acme/web:1")), ctx.clone())
            .await
            .unwrap();
        let (mut api, mut running_pod) = server.await.unwrap();
        running_pod.metadata.annotations = Some(
            [(
                podstatus::FAIL_ANNOTATION.to_string(),
                "CrashLoopBackOff".to_string(),
            )]
            .into(),
        );
        let server = tokio::spawn(async move { status_write(&mut api).await });
        let action = reconcile(Arc::new(running_pod), ctx).await.unwrap();
        let written = server.await.unwrap();
        assert_eq!(action, Action::requeue(FIRST_BACKOFF));
        let cs = &written.status.unwrap().container_statuses.unwrap()[0];
        assert_eq!(
            super::podstatus::waiting_reason(cs),
            Some("CrashLoopBackOff")
        );
        assert!(!cs.ready);
    }
}
