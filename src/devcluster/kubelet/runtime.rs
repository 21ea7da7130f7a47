//! The seam between the kubelet and what "runs" a container: [`PodRuntime`] starts one
//! container of a pod and hands back a [`Running`] handle the kubelet probes and stops. The
//! kubelet asks its runtimes in order and takes the first that [`PodRuntime::runs`] the
//! container: the [`super::engine::EngineRuntime`] for `r4 engine` containers, then the
//! [`SimulatedRuntime`] for everything else.

use std::time::Duration;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Container, Pod};
use tokio::time::Instant;

/// How a running container is doing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    /// Running; not ready yet (or not any more).
    NotReady,
    /// Running and ready (`/readyz` answers 200).
    Ready,
    /// It exited, for this reason: the kubelet restarts it after a back-off.
    Exited(String),
}

/// A started container.
pub trait Running: Send + Sync {
    /// Its readiness now (cheap: called on every reconcile of the pod).
    fn ready(&self) -> Probe;
    /// Stop it safely (as on SIGTERM) and wait for it to finish, within the caller's deadline.
    fn stop(self: Box<Self>) -> BoxFuture<'static, ()>;
}

/// Something that runs containers.
pub trait PodRuntime: Send + Sync {
    /// Whether this runtime runs `container` of `pod`.
    fn runs(&self, pod: &Pod, container: &Container) -> bool;
    /// Start `container` of `pod`. An error is why it exited at once (a crash: the kubelet
    /// shows `CrashLoopBackOff` with it and tries again after a back-off).
    fn start(
        &self,
        pod: &Pod,
        container: &Container,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, String>>;
}

/// Any image: nothing runs, the container becomes ready `delay` after it started (as an app
/// whose readiness probe passes after a moment).
#[derive(Clone, Debug)]
pub struct SimulatedRuntime {
    pub delay: Duration,
}

struct SimulatedContainer {
    ready_at: Instant,
}

impl Running for SimulatedContainer {
    fn ready(&self) -> Probe {
        if Instant::now() >= self.ready_at {
            Probe::Ready
        } else {
            Probe::NotReady
        }
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

impl PodRuntime for SimulatedRuntime {
    fn runs(&self, _: &Pod, _: &Container) -> bool {
        true
    }

    fn start(
        &self,
        _: &Pod,
        _: &Container,
    ) -> BoxFuture<'static, Result<Box<dyn Running>, String>> {
        let ready_at = Instant::now() + self.delay;
        Box::pin(async move { Ok(Box::new(SimulatedContainer { ready_at }) as Box<dyn Running>) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_simulated_container_becomes_ready_after_its_delay() {
        let rt = SimulatedRuntime {
            delay: Duration::from_secs(2),
        };
        let c = Container::default();
        assert!(rt.runs(&Pod::default(), &c));
        let h = rt.start(&Pod::default(), &c).await.unwrap();
        assert_eq!(h.ready(), Probe::NotReady);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(h.ready(), Probe::Ready);
        h.stop().await;
    }
}
