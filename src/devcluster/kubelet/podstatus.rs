//! The kubelet's view of a pod, as pure functions: which containers it runs (regular ones and
//! native sidecars), whether a container is made to fail ([`failure_of`]), and the pod status
//! a kubelet reports for what the containers are doing ([`pod_status`]). No I/O here.
//!
//! # Making a pod fail (for rollouts that must fail)
//! - An image whose name contains `cannot-pull` (`ghcr.io/acme/agent:cannot-pull`,
//!   `cannot-pull/web:1`) cannot be pulled: the container waits in `ImagePullBackOff`, the pod
//!   stays `Pending`, never Ready.
//! - The annotation `r4.dev/dev-fail` on the pod (or its template) fails every container of
//!   it: `ImagePullBackOff` as above, or `CrashLoopBackOff`: the container starts and exits
//!   at once, again and again (`restartCount` grows, with the kubelet's back-off of 10 s
//!   doubling up to 5 min); the pod is `Running` but never Ready, as on a cluster. Added to a
//!   running pod (`kubectl annotate`), it makes its containers exit now. Any other value is
//!   ignored (and logged).
//! - An engine container that cannot start (a workflow it cannot read, an agent without a
//!   `simulate:` block, …) crash-loops the same way, with the reason as the message.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// The annotation that makes every container of a pod fail (`ImagePullBackOff` or
/// `CrashLoopBackOff`).
pub const FAIL_ANNOTATION: &str = "r4.dev/dev-fail";
/// A container image whose name contains this cannot be pulled.
pub const CANNOT_PULL: &str = "cannot-pull";
/// The address every pod of `r4 dev` has: they all run in this process.
pub const POD_IP: &str = "127.0.0.1";

/// How a container is made to fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    ImagePullBackOff,
    CrashLoopBackOff,
}

/// Whether `container` of `pod` is made to fail, and how (see the module docs).
pub fn failure_of(pod: &Pod, container: &Container) -> Option<Failure> {
    let image = container.image.as_deref().unwrap_or("");
    if image.contains(CANNOT_PULL) {
        return Some(Failure::ImagePullBackOff);
    }
    match pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FAIL_ANNOTATION))
        .map(String::as_str)
    {
        Some("ImagePullBackOff") => Some(Failure::ImagePullBackOff),
        Some("CrashLoopBackOff") => Some(Failure::CrashLoopBackOff),
        _ => None,
    }
}

/// The value of [`FAIL_ANNOTATION`] when it is one the kubelet does not know.
pub fn unknown_failure(pod: &Pod) -> Option<&str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(FAIL_ANNOTATION))
        .map(String::as_str)
        .filter(|v| !matches!(*v, "ImagePullBackOff" | "CrashLoopBackOff"))
}

/// A container that keeps running beside the others: a native sidecar (an init container with
/// `restartPolicy: Always`).
pub fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// The containers the kubelet keeps running for `pod`: native sidecars first (they start
/// before the others), then the regular containers. Init containers that run to completion
/// are not among them: they complete at once here.
pub fn long_running(pod: &Pod) -> Vec<&Container> {
    let Some(spec) = pod.spec.as_ref() else {
        return Vec::new();
    };
    spec.init_containers
        .iter()
        .flatten()
        .filter(|c| is_sidecar(c))
        .chain(spec.containers.iter())
        .collect()
}

/// What one container is doing, as the kubelet saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Run {
    /// Not started yet.
    Creating,
    /// Not running, for `reason` (`ImagePullBackOff`, `CrashLoopBackOff`).
    Waiting { reason: String, message: String },
    /// Running since `since`; ready or not.
    Running { since: Timestamp, ready: bool },
}

/// One container's observed state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub run: Run,
    pub restarts: i32,
    /// Why it last exited, if it ever did.
    pub last_exit: Option<String>,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            run: Run::Creating,
            restarts: 0,
            last_exit: None,
        }
    }
}

fn container_status(pod_uid: &str, c: &Container, o: &Observed) -> ContainerStatus {
    let (state, ready, started) = match &o.run {
        Run::Creating => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some("ContainerCreating".into()),
                    message: None,
                }),
                ..Default::default()
            },
            false,
            false,
        ),
        Run::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: Some(message.clone()),
                }),
                ..Default::default()
            },
            false,
            false,
        ),
        Run::Running { since, ready } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(Time(*since)),
                }),
                ..Default::default()
            },
            *ready,
            true,
        ),
    };
    let image = c.image.clone().unwrap_or_default();
    ContainerStatus {
        name: c.name.clone(),
        image_id: if started {
            format!("r4-dev://{image}")
        } else {
            String::new()
        },
        image,
        container_id: started.then(|| format!("r4-dev://{pod_uid}/{}", c.name)),
        ready,
        started: Some(started),
        restart_count: o.restarts,
        state: Some(state),
        last_state: o.last_exit.as_ref().map(|m| ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 1,
                reason: Some("Error".into()),
                message: Some(m.clone()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn completed_init(c: &Container) -> ContainerStatus {
    let image = c.image.clone().unwrap_or_default();
    ContainerStatus {
        name: c.name.clone(),
        image_id: format!("r4-dev://{image}"),
        image,
        ready: false,
        started: Some(false),
        restart_count: 0,
        state: Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 0,
                reason: Some("Completed".into()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The status a kubelet reports for `pod` whose long-running containers are as `observed`
/// says (by name; a container missing there is being created), at `now`.
///
/// - `phase`: `Running` once every container has started at least once (a crash-looping one
///   has), else `Pending`.
/// - conditions `PodScheduled`, `PodReadyToStartContainers`, `Initialized`, `ContainersReady`,
///   `Ready` (the last two when every long-running container is ready, else False with
///   `ContainersNotReady` naming them); a condition keeps its transition time while its status
///   does not change, and `startTime` is kept, so the same observation gives the same status.
/// - `containerStatuses` / `initContainerStatuses` (init containers that are not sidecars have
///   completed), `podIP`/`hostIP` 127.0.0.1. Fields the API server owns (`qosClass`) are kept;
///   none that a server may drop is written, so an unchanged pod is never written again.
pub fn pod_status(pod: &Pod, observed: &BTreeMap<String, Observed>, now: Timestamp) -> PodStatus {
    let prev = pod.status.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let none = Observed::default();
    let obs = |c: &Container| observed.get(&c.name).unwrap_or(&none).clone();
    let spec = pod.spec.clone().unwrap_or_default();
    let init: Vec<ContainerStatus> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| {
            if is_sidecar(c) {
                container_status(&uid, c, &obs(c))
            } else {
                completed_init(c)
            }
        })
        .collect();
    let main: Vec<ContainerStatus> = spec
        .containers
        .iter()
        .map(|c| container_status(&uid, c, &obs(c)))
        .collect();
    let long: Vec<&ContainerStatus> = init
        .iter()
        .filter(|s| {
            s.started.is_some() && s.state.as_ref().is_some_and(|st| st.terminated.is_none())
        })
        .chain(main.iter())
        .collect();
    let unready: Vec<&str> = long
        .iter()
        .filter(|s| !s.ready)
        .map(|s| s.name.as_str())
        .collect();
    let ever_started = |s: &ContainerStatus| {
        s.started == Some(true) || s.restart_count > 0 || s.last_state.is_some()
    };
    let running = !long.is_empty() && long.iter().all(|s| ever_started(s));
    let sidecars_started = init
        .iter()
        .filter(|s| s.state.as_ref().is_some_and(|st| st.terminated.is_none()))
        .all(|s| s.started == Some(true));

    let prev_conds = prev.conditions.clone().unwrap_or_default();
    let mk = |type_: &str, ok: bool, reason: Option<&str>, message: Option<String>| {
        let status = if ok { "True" } else { "False" };
        let since = prev_conds
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .and_then(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        PodCondition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.map(str::to_owned),
            message,
            last_transition_time: Some(since),
            ..Default::default()
        }
    };
    let ready = unready.is_empty() && !long.is_empty();
    let not_ready_msg =
        (!ready).then(|| format!("containers with unready status: [{}]", unready.join(" ")));
    let not_ready_reason = (!ready).then_some("ContainersNotReady");
    let conditions = vec![
        mk("PodReadyToStartContainers", true, None, None),
        mk(
            "Initialized",
            sidecars_started,
            (!sidecars_started).then_some("ContainersNotInitialized"),
            None,
        ),
        mk("Ready", ready, not_ready_reason, not_ready_msg.clone()),
        mk("ContainersReady", ready, not_ready_reason, not_ready_msg),
        mk("PodScheduled", true, None, None),
    ];
    PodStatus {
        phase: Some(if running { "Running" } else { "Pending" }.into()),
        conditions: Some(conditions),
        container_statuses: Some(main),
        init_container_statuses: (!init.is_empty()).then_some(init),
        host_ip: Some(POD_IP.into()),
        host_ips: Some(vec![HostIP { ip: POD_IP.into() }]),
        pod_ip: Some(POD_IP.into()),
        pod_ips: Some(vec![PodIP { ip: POD_IP.into() }]),
        start_time: prev.start_time.or(Some(Time(now))),
        // Set by the API server at creation (and immutable there); kept as it is.
        qos_class: prev.qos_class,
        ..Default::default()
    }
}

/// The pod's `Ready` condition is true.
pub fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Why a container waits (`ImagePullBackOff`, `CrashLoopBackOff`, …), if it does.
#[cfg(test)]
pub(crate) fn waiting_reason(cs: &k8s_openapi::api::core::v1::ContainerStatus) -> Option<&str> {
    cs.state.as_ref()?.waiting.as_ref()?.reason.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn container(name: &str, image: &str) -> Container {
        Container {
            name: name.into(),
            image: Some(image.into()),
            ..Default::default()
        }
    }

    fn pod(containers: Vec<Container>, annotation: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("web-abc-xyz".into()),
                uid: Some("u1".into()),
                annotations: annotation
                    .map(|a| [(FAIL_ANNOTATION.to_string(), a.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers,
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn failure_modes_come_from_the_image_name_or_the_annotation() {
        let ok = container("a", "ghcr.io/acme/agent:1");
        let bad = container("a", "ghcr.io/acme/agent:cannot-pull");
        assert_eq!(failure_of(&pod(vec![], None), &ok), None);
        assert_eq!(
            failure_of(&pod(vec![], None), &bad),
            Some(Failure::ImagePullBackOff)
        );
        let p = pod(vec![], Some("CrashLoopBackOff"));
        assert_eq!(failure_of(&p, &ok), Some(Failure::CrashLoopBackOff));
        let p = pod(vec![], Some("ImagePullBackOff"));
        assert_eq!(failure_of(&p, &ok), Some(Failure::ImagePullBackOff));
        let p = pod(vec![], Some("Sometimes"));
        assert_eq!(failure_of(&p, &ok), None);
        assert_eq!(unknown_failure(&p), Some("Sometimes"));
    }

    fn cond<'a>(s: &'a PodStatus, t: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == t)
            .unwrap()
    }

    #[test]
    fn a_pod_goes_from_pending_to_running_and_ready() {
        let mut p = pod(vec![container("a", "x:1"), container("b", "y:1")], None);
        let s = pod_status(&p, &BTreeMap::new(), ts(0));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(s.start_time, Some(Time(ts(0))));
        assert_eq!(cond(&s, "Ready").status, "False");
        assert_eq!(
            cond(&s, "Ready").message.as_deref(),
            Some("containers with unready status: [a b]")
        );
        assert_eq!(cond(&s, "PodScheduled").status, "True");
        let cs = s.container_statuses.as_ref().unwrap();
        assert_eq!(waiting_reason(&cs[0]), Some("ContainerCreating"));
        p.status = Some(s);
        // Both running, one ready.
        let mut obs = BTreeMap::new();
        obs.insert(
            "a".to_string(),
            Observed {
                run: Run::Running {
                    since: ts(1),
                    ready: true,
                },
                ..Default::default()
            },
        );
        obs.insert(
            "b".to_string(),
            Observed {
                run: Run::Running {
                    since: ts(1),
                    ready: false,
                },
                ..Default::default()
            },
        );
        let s = pod_status(&p, &obs, ts(2));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(s.start_time, Some(Time(ts(0))));
        assert_eq!(
            cond(&s, "Ready").message.as_deref(),
            Some("containers with unready status: [b]")
        );
        // The Ready condition did not change status: its transition time stays.
        assert_eq!(cond(&s, "Ready").last_transition_time, Some(Time(ts(0))));
        p.status = Some(s);
        obs.get_mut("b").unwrap().run = Run::Running {
            since: ts(1),
            ready: true,
        };
        let s = pod_status(&p, &obs, ts(3));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "ContainersReady").status, "True");
        assert_eq!(cond(&s, "Ready").last_transition_time, Some(Time(ts(3))));
        assert_eq!(s.pod_ip.as_deref(), Some(POD_IP));
        let cs = &s.container_statuses.as_ref().unwrap()[1];
        assert_eq!(
            (cs.ready, cs.started, cs.restart_count),
            (true, Some(true), 0)
        );
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .running
                .as_ref()
                .unwrap()
                .started_at,
            Some(Time(ts(1)))
        );
        assert!(is_ready(&Pod {
            status: Some(s.clone()),
            ..Default::default()
        }));
        // Same observation, same status: nothing to write.
        p.status = Some(s.clone());
        assert_eq!(pod_status(&p, &obs, ts(50)), s);
    }

    #[test]
    fn failing_containers_show_their_back_off() {
        let p = pod(vec![container("a", "x:cannot-pull")], None);
        let mut obs = BTreeMap::new();
        obs.insert(
            "a".to_string(),
            Observed {
                run: Run::Waiting {
                    reason: "ImagePullBackOff".into(),
                    message: "Back-off pulling image \"x:cannot-pull\"".into(),
                },
                ..Default::default()
            },
        );
        let s = pod_status(&p, &obs, ts(0));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        assert_eq!(cond(&s, "Ready").status, "False");
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(waiting_reason(cs), Some("ImagePullBackOff"));
        // A crash loop: started before, so Running, never ready, restarts counted.
        let p = pod(vec![container("a", "x:1")], Some("CrashLoopBackOff"));
        obs.insert(
            "a".to_string(),
            Observed {
                run: Run::Waiting {
                    reason: "CrashLoopBackOff".into(),
                    message: "back-off 20s restarting failed container".into(),
                },
                restarts: 2,
                last_exit: Some("exited".into()),
            },
        );
        let s = pod_status(&p, &obs, ts(0));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").status, "False");
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(cs.restart_count, 2);
        assert_eq!(
            cs.last_state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .exit_code,
            1
        );
    }

    #[test]
    fn sidecars_run_beside_the_containers_and_init_containers_complete() {
        let mut sidecar = container("engine", "ghcr.io/acme/r4:dev");
        sidecar.restart_policy = Some("Always".into());
        let mut p = pod(vec![container("agent", "a:1")], None);
        p.spec.as_mut().unwrap().init_containers =
            Some(vec![container("setup", "busybox"), sidecar]);
        let names: Vec<&str> = long_running(&p).iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["engine", "agent"]);
        let mut obs = BTreeMap::new();
        obs.insert(
            "agent".to_string(),
            Observed {
                run: Run::Running {
                    since: ts(1),
                    ready: true,
                },
                ..Default::default()
            },
        );
        let s = pod_status(&p, &obs, ts(2));
        assert_eq!(cond(&s, "Initialized").status, "False");
        assert_eq!(
            cond(&s, "Ready").message.as_deref(),
            Some("containers with unready status: [engine]")
        );
        let init = s.init_container_statuses.as_ref().unwrap();
        assert_eq!(
            init[0]
                .state
                .as_ref()
                .unwrap()
                .terminated
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("Completed")
        );
        obs.insert(
            "engine".to_string(),
            Observed {
                run: Run::Running {
                    since: ts(1),
                    ready: true,
                },
                ..Default::default()
            },
        );
        let s = pod_status(&p, &obs, ts(2));
        assert_eq!(cond(&s, "Initialized").status, "True");
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(s.phase.as_deref(), Some("Running"));
    }
}
