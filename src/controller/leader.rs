//! Leader election: of all the controller's replicas, one reconciles at a time — the one that
//! holds a `coordination.k8s.io/v1` Lease ([`LEASE_NAME`] in the controller's namespace).
//!
//! Taking, renewing and releasing the Lease is `kube-lease-manager`'s. This module adds what
//! a controller needs around it ([`run_elected`]):
//! - it runs the controller (`lead`) only while leading and tells it to stop when leadership
//!   is lost, then waits for it to stop before contending again, so two replicas never
//!   reconcile at once on this replica's account;
//! - **a leader stops on its own clock**: it watches its Lease and stops leading half a renew
//!   period before `renewTime + leaseDurationSeconds` unless it has seen a renewal, or at
//!   once when the Lease names another holder — a leader cut off from the API (a renewal
//!   hanging) stops before a standby may take over, instead of when an API call finally
//!   fails. `lead` must return within that half renew period of its stop signal;
//! - **a released Lease is taken at once**: kube-lease-manager's standby sleeps until the
//!   holder's lease would expire; this module watches the Lease and, when the holder releases
//!   it (graceful shutdown), restarts the standby's attempt immediately;
//! - on shutdown it releases the Lease (if held) so a standby takes over at once.
//!
//! The Lease's times are whole seconds (its `leaseDurationSeconds`), so
//! [`LeaderOptions::lease_duration`] and [`LeaderOptions::renew_every`] are rounded to
//! seconds; the holder renews `renew_every` after each renewal.

use std::future::Future;
use std::pin::pin;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::runtime::{WatchStreamExt, watcher};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::sync::watch;
use tokio::time::Instant;

/// The Lease every replica of the controller contends for.
pub const LEASE_NAME: &str = "r4-controller";

/// Where and how to elect.
#[derive(Debug, Clone)]
pub struct LeaderOptions {
    /// Namespace of the Lease: the controller's own.
    pub namespace: String,
    /// Name of the Lease ([`LEASE_NAME`]).
    pub lease_name: String,
    /// This replica, unique among them ([`default_identity`]).
    pub identity: String,
    /// How long a holder's lease lasts after its last renewal (whole seconds, at least 2).
    pub lease_duration: Duration,
    /// How often the holder renews (whole seconds, at least 1, less than `lease_duration`).
    pub renew_every: Duration,
}

impl LeaderOptions {
    /// Lease [`LEASE_NAME`] in `namespace`, 15 s lease renewed every 5 s, identity
    /// [`default_identity`].
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            lease_name: LEASE_NAME.into(),
            identity: default_identity(),
            lease_duration: Duration::from_secs(15),
            renew_every: Duration::from_secs(5),
        }
    }

    /// (duration, renew) in whole seconds, checked.
    fn seconds(&self) -> Result<(u64, u64), LeaderError> {
        let duration = self.lease_duration.as_secs_f64().round() as u64;
        let renew = self.renew_every.as_secs_f64().round() as u64;
        if duration < 2 {
            return Err(LeaderError::Options(format!(
                "lease_duration: {:?} is under 2 s",
                self.lease_duration
            )));
        }
        if renew < 1 || renew >= duration {
            return Err(LeaderError::Options(format!(
                "renew_every: {:?} must be at least 1 s and less than lease_duration ({duration} s)",
                self.renew_every
            )));
        }
        if self.identity.is_empty() {
            return Err(LeaderError::Options("identity: empty".into()));
        }
        if self.namespace.is_empty() || self.lease_name.is_empty() {
            return Err(LeaderError::Options(
                "namespace and lease_name: must not be empty".into(),
            ));
        }
        Ok((duration, renew))
    }
}

/// The pod's name (`POD_NAME`, else `HOSTNAME`, else `r4-controller`) and a random suffix:
/// unique even when a restarted pod keeps its name while its old lease is still held.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| LEASE_NAME.to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}-{}", &suffix[..8])
}

/// Only invalid options end [`run_elected`] with an error: API trouble is retried.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election: {0}")]
    Options(String),
}

/// What this replica last saw of the Lease.
#[derive(Debug, Clone, PartialEq)]
struct LeaseView {
    holder: Option<String>,
    /// `renewTime + leaseDurationSeconds`, when both are set.
    expires: Option<SystemTime>,
}

impl LeaseView {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        let expires = match (spec.renew_time, spec.lease_duration_seconds) {
            (Some(renew), Some(secs)) => {
                let renew: SystemTime = renew.0.into();
                renew.checked_add(Duration::from_secs(u64::try_from(secs).unwrap_or(0)))
            }
            _ => None,
        };
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            expires,
        }
    }
}

/// Aborts a task when dropped (the Lease watch lives as long as [`run_elected`]).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Publish every change of the Lease to `tx` (None: absent or not yet seen).
fn watch_lease(
    api: kube::Api<Lease>,
    name: &str,
    tx: watch::Sender<Option<LeaseView>>,
) -> AbortOnDrop {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let task = tokio::spawn(async move {
        // The watcher re-lists and re-watches with backoff by itself; an error is only logged.
        let mut events = pin!(watcher::watcher(api, config).default_backoff());
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => {
                    tx.send_replace(Some(LeaseView::of(&l)));
                }
                Ok(watcher::Event::Delete(_)) => {
                    tx.send_replace(None);
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => tracing::debug!(error = %e, "watching the leader lease"),
            }
        }
    });
    AbortOnDrop(task)
}

/// Wall-clock `at` as an instant of tokio's clock (now if it has passed).
fn instant_of(at: SystemTime) -> Instant {
    Instant::now()
        + at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO)
}

/// Why a term of leadership ended.
enum TermEnd {
    Shutdown,
    Lost(&'static str),
    LeadReturned,
}

/// Run `lead` only while this process holds the lease.
///
/// Waits to acquire the Lease; once acquired, calls `lead(stop)` with a receiver that turns
/// true when leadership is lost or on `shutdown`; when leadership is lost, waits for `lead`
/// to return, then contends again. On `shutdown` it stops `lead`, waits for it, releases the
/// Lease and returns `Ok`. Should `lead` return by itself, the Lease is released and this
/// replica contends again after `renew_every` (giving a standby the first chance).
/// `is_leader` is true exactly while `lead` may act. API errors are logged and retried with
/// backoff (a replica that cannot reach the API simply never leads); only invalid options are
/// returned as errors.
pub async fn run_elected<F, Fut>(
    client: kube::Client,
    opts: LeaderOptions,
    mut shutdown: watch::Receiver<bool>,
    is_leader: watch::Sender<bool>,
    mut lead: F,
) -> Result<(), LeaderError>
where
    F: FnMut(watch::Receiver<bool>) -> Fut,
    Fut: Future<Output = ()>,
{
    let (duration, renew) = opts.seconds()?;
    let lease_duration = Duration::from_secs(duration);
    let renew_every = Duration::from_secs(renew);
    // A leader stops this long before its lease expires, so that `lead` has stopped by the
    // time a standby may start; half a renew period still tolerates a late renewal.
    let margin = renew_every / 2;
    let api: kube::Api<Lease> = kube::Api::namespaced(client.clone(), &opts.namespace);
    let (view_tx, mut view) = watch::channel(None);
    let _watch = watch_lease(api.clone(), &opts.lease_name, view_tx);
    let lease = format!("{}/{}", opts.namespace, opts.lease_name);
    is_leader.send_replace(false);
    let mut retry = Duration::from_millis(200);

    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        // A fresh manager per attempt: its first step reads the Lease anew (a kept one would
        // sleep on what it read before — the holder's expiry — past a release).
        let manager = LeaseManagerBuilder::new(client.clone(), &opts.lease_name)
            .with_namespace(&opts.namespace)
            .with_identity(&opts.identity)
            .with_duration(duration)
            .with_grace(duration - renew)
            .with_field_manager(format!("r4-leader-{}", opts.identity));
        let built = tokio::select! {
            () = stopped(&mut shutdown) => return Ok(()),
            built = tokio::time::timeout(lease_duration, manager.build()) => built,
        };
        let manager = match built {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => {
                tracing::warn!(%lease, error = %e, "leader election: cannot read the lease; retrying");
                sleep_or_shutdown(&mut shutdown, &mut retry, renew_every).await;
                continue;
            }
            Err(_) => {
                tracing::warn!(%lease, "leader election: reading the lease timed out; retrying");
                sleep_or_shutdown(&mut shutdown, &mut retry, renew_every).await;
                continue;
            }
        };

        // Standby: until the manager reports the lease ours, the holder releases it (start
        // over at once), or shutdown.
        let acquired = {
            let mut attempt = pin!(manager.changed());
            view.mark_unchanged();
            let mut watching = true;
            loop {
                tokio::select! {
                    () = stopped(&mut shutdown) => break None,
                    r = &mut attempt => break Some(r),
                    changed = view.changed(), if watching => {
                        if changed.is_err() {
                            watching = false;
                            continue;
                        }
                        let released = matches!(&*view.borrow_and_update(), Some(v) if v.holder.is_none());
                        if released {
                            tracing::debug!(%lease, "leader election: lease released; contending now");
                            break Some(Ok(false));
                        }
                    }
                }
            }
        };
        match acquired {
            None => {
                // Shutting down: a lock taken just as the attempt was dropped is given back.
                release(&manager, &lease, lease_duration).await;
                return Ok(());
            }
            Some(Err(e)) => {
                tracing::warn!(%lease, error = %e, "leader election: contending failed; retrying");
                sleep_or_shutdown(&mut shutdown, &mut retry, renew_every).await;
                continue;
            }
            Some(Ok(false)) => continue,
            Some(Ok(true)) => {}
        }
        retry = Duration::from_millis(200);

        // Leading.
        let acquired_at = Instant::now();
        tracing::info!(%lease, identity = %opts.identity, "leader election: leading");
        is_leader.send_replace(true);
        let (stop_tx, stop) = watch::channel(false);
        let mut term = pin!(lead(stop));
        // The manager renewed just now; until the watch shows a renewal, the lease is valid for
        // one duration from the acquisition.
        let mut valid_until = acquired_at + lease_duration - margin;
        let end = {
            let mut renewing = pin!(manager.changed());
            // The watch may still deliver what happened before we acquired (the previous
            // holder's release): a view that is not ours is checked against the Lease itself.
            view.mark_unchanged();
            let mut watching = true;
            loop {
                tokio::select! {
                    () = stopped(&mut shutdown) => break TermEnd::Shutdown,
                    () = &mut term => break TermEnd::LeadReturned,
                    r = &mut renewing => {
                        break match r {
                            Ok(_) => TermEnd::Lost("the lease went to another replica"),
                            Err(e) => {
                                tracing::warn!(%lease, error = %e, "leader election: renewing failed");
                                TermEnd::Lost("renewing the lease failed")
                            }
                        };
                    }
                    () = tokio::time::sleep_until(valid_until) => {
                        break TermEnd::Lost("no renewal seen before the lease expired");
                    }
                    changed = view.changed(), if watching => {
                        if changed.is_err() {
                            watching = false;
                            continue;
                        }
                        let v = view.borrow_and_update().clone();
                        let expires = match v {
                            Some(LeaseView { holder: Some(h), expires }) if h == opts.identity => expires,
                            _ => match holder_now(&api, &opts.lease_name, &opts.identity, renew_every).await {
                                Some((true, expires)) => expires,
                                Some((false, _)) => break TermEnd::Lost("the lease names another holder or none"),
                                None => None,
                            },
                        };
                        if let Some(until) = expires.and_then(|at| instant_of(at).checked_sub(margin)) {
                            valid_until = valid_until.max(until);
                        }
                    }
                }
            }
        };
        // Stop the controller and wait for it before anything else: until it has returned, it
        // may still act, so is_leader stays true and the lease is not given back.
        stop_tx.send_replace(true);
        if !matches!(end, TermEnd::LeadReturned) {
            term.await;
        }
        is_leader.send_replace(false);
        let held = acquired_at.elapsed();
        match end {
            TermEnd::Shutdown => {
                release(&manager, &lease, lease_duration).await;
                tracing::info!(%lease, ?held, "leader election: released the lease on shutdown");
                return Ok(());
            }
            TermEnd::Lost(why) => {
                tracing::warn!(%lease, ?held, reason = why, "leader election: lost the lease");
            }
            TermEnd::LeadReturned => {
                release(&manager, &lease, lease_duration).await;
                tracing::warn!(%lease, ?held, "leader election: the controller returned; released the lease");
                pause(&mut shutdown, renew_every).await;
            }
        }
    }
}

/// Give the lease back if held, within `deadline`; a failure only delays the standby until
/// the lease expires.
async fn release(manager: &LeaseManager, lease: &str, deadline: Duration) {
    match tokio::time::timeout(deadline, manager.release()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(%lease, error = %e, "leader election: releasing the lease failed")
        }
        Err(_) => tracing::warn!(%lease, "leader election: releasing the lease timed out"),
    }
}

/// Sleep `retry` (then double it, up to `max`), or less if shut down meanwhile.
async fn sleep_or_shutdown(
    shutdown: &mut watch::Receiver<bool>,
    retry: &mut Duration,
    max: Duration,
) {
    pause(shutdown, *retry).await;
    *retry = (*retry * 2).min(max);
}

/// Resolves once `shutdown` is true (or its sender is gone). Returns `()` so the future
/// holds no watch guard: [`run_elected`] stays `Send`.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// Sleep `d`, or less if shut down meanwhile.
async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        () = stopped(shutdown) => {}
        () = tokio::time::sleep(d) => {}
    }
}

/// Whether the Lease names `identity` now (and until when), read within `deadline`; `None` if
/// it could not be read (the caller's expiry watchdog covers that case).
async fn holder_now(
    api: &kube::Api<Lease>,
    name: &str,
    identity: &str,
    deadline: Duration,
) -> Option<(bool, Option<SystemTime>)> {
    match tokio::time::timeout(deadline, api.get_opt(name)).await {
        Ok(Ok(Some(l))) => {
            let v = LeaseView::of(&l);
            Some((v.holder.as_deref() == Some(identity), v.expires))
        }
        Ok(Ok(None)) => Some((false, None)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "reading the leader lease");
            None
        }
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(duration: u64, renew: u64) -> LeaderOptions {
        LeaderOptions {
            lease_duration: Duration::from_secs(duration),
            renew_every: Duration::from_secs(renew),
            ..LeaderOptions::new("ns")
        }
    }

    #[test]
    fn options_are_checked_and_name_the_field() {
        assert_eq!(opts(15, 5).seconds().expect("valid"), (15, 5));
        assert_eq!(opts(2, 1).seconds().expect("valid"), (2, 1));
        let e = opts(1, 1).seconds().expect_err("too short").to_string();
        assert!(e.contains("lease_duration"), "{e}");
        let e = opts(5, 5)
            .seconds()
            .expect_err("renew = duration")
            .to_string();
        assert!(e.contains("renew_every"), "{e}");
        let e = opts(5, 0).seconds().expect_err("renew 0").to_string();
        assert!(e.contains("renew_every"), "{e}");
        let mut o = opts(15, 5);
        o.identity.clear();
        assert!(
            o.seconds()
                .expect_err("no identity")
                .to_string()
                .contains("identity")
        );
    }

    #[allow(dead_code)]
    fn run_elected_is_send(client: kube::Client) {
        fn send<T: Send>(_: T) {}
        let (_s, shutdown) = watch::channel(false);
        let (tx, _r) = watch::channel(false);
        send(run_elected(
            client,
            LeaderOptions::new("ns"),
            shutdown,
            tx,
            |_| async {},
        ));
    }

    #[test]
    fn identities_are_unique_and_defaults_sane() {
        let o = LeaderOptions::new("r4-system");
        assert_eq!(o.lease_name, LEASE_NAME);
        assert!(o.renew_every < o.lease_duration);
        assert_ne!(default_identity(), default_identity());
    }

    #[test]
    fn lease_view_reads_holder_and_expiry() {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "l"},
            "spec": {"holderIdentity": "a", "renewTime": "2026-01-01T00:00:00.000000Z", "leaseDurationSeconds": 15}
        }))
        .expect("lease");
        let v = LeaseView::of(&lease);
        assert_eq!(v.holder.as_deref(), Some("a"));
        let expires = v.expires.expect("expiry");
        let renew: SystemTime = "2026-01-01T00:00:00Z"
            .parse::<k8s_openapi::jiff::Timestamp>()
            .expect("ts")
            .into();
        assert_eq!(
            expires.duration_since(renew).expect("after"),
            Duration::from_secs(15)
        );
        let empty: Lease = serde_json::from_value(
            serde_json::json!({"metadata": {"name": "l"}, "spec": {"holderIdentity": ""}}),
        )
        .expect("lease");
        assert_eq!(
            LeaseView::of(&empty),
            LeaseView {
                holder: None,
                expires: None
            }
        );
    }
}
