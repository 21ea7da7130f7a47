//! The rollout decision: which revision of a workflow to apply now, and what each revision's
//! phase becomes — a pure function of the spec, the known revisions, the applied one's
//! Deployments and its analysis, and the time ([`plan`]). Storing revisions, applying,
//! measuring and writing status and Events are the reconciler's.
//!
//! The rules (the README repeats them for users):
//!
//! 1. **Every distinct spec is a revision.** The spec's hash ([`revision::spec_hash`]: the
//!    spec without kill switches, rollout, rollbackTo, slo and economics) names it. No revision
//!    has it → a new one, numbered one past the highest, is created Progressing and applied.
//!    It exists and is Progressing or Healthy → it is applied (applied again after a
//!    different one, a Progressing revision starts its rollout afresh).
//! 2. **A Failed revision is pinned out.** While the spec still hashes to a Failed revision,
//!    the controller does not retry it: it stays on the applied revision if that one is not
//!    Failed, else (strategy Automatic) goes to the newest Healthy one. Changing the spec to
//!    another content gets a new rollout; changing it *back* to the content of a Failed
//!    revision does not retry it — the pin belongs to the content, not to the edit (that
//!    content failed; a GitOps re-apply of the same manifest must not retry it either). The
//!    Degraded message says so. Naming it in `spec.rollbackTo` is the explicit retry: its
//!    phase goes back to Progressing and it is judged again.
//! 3. **Judging the applied revision** (Progressing only: a Healthy revision is never judged
//!    again; not in the reconcile that (re)started it). Deployments not available and more
//!    than `progressDeadlineSeconds` (default 600) since its rollout started → Failed
//!    (`Deployments not available within 120s: <detail>`). Available: with an analysis
//!    verdict, Pending waits, Pass → Healthy, Breach → Failed with the breach as reason
//!    (the first rollout — no other Healthy revision — is Healthy once available: nothing to
//!    compare it with or return to, as Argo Rollouts promotes an initial deployment);
//!    without a verdict → Healthy if the spec has no `rollout.analysis`, else it waits for
//!    engine statistics (missing data neither passes nor fails a revision).
//! 4. **Automatic rollback.** `rollout.strategy: Automatic` only: a revision that fails is
//!    replaced by the newest Healthy other revision ([`Plan::rolled_back`]: an Event and the
//!    RolledBack condition). `Manual` — the default when `rollout` or its `strategy` is absent,
//!    so nothing is undone behind a user who did not ask for it — leaves the failed revision
//!    applied and says so ([`State::Failed`]: the Degraded condition); so does Automatic when no
//!    Healthy revision exists.
//! 5. **Rollback by hand.** `spec.rollbackTo.revision = N` (`r4 rollback WF --to N`): N must
//!    exist ([`PlanError`] otherwise); N is applied (retried if Failed); the spec's own
//!    revision, if another, is marked Failed "rolled back by hand to revision N", so the
//!    controller does not apply it again while the spec stays as it is; the controller then
//!    removes `rollbackTo` from the spec ([`Plan::clear_rollback_to`]).
//!
//! [`Plan::requeue_after`] is set whenever the outcome can change by time alone (the deadline,
//! the analysis window), so the controller looks again then without waiting for an event.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::analysis::{self, Verdict};
use super::revision::{self, Phase, Revision};
use crate::api::workflow::{AgentWorkflowSpec, RolloutStrategy};

/// Seconds a revision's Deployments have to become available when
/// `rollout.progressDeadlineSeconds` is not set (Kubernetes' own Deployment default).
pub const DEFAULT_PROGRESS_DEADLINE_SECONDS: i32 = 600;

/// The applied revision's Deployments, as the controller observed them.
#[derive(Clone, Debug, PartialEq)]
pub enum Availability {
    /// Every Deployment of the revision is available (updated, ready replicas as desired).
    Available,
    /// Not yet; `detail` says what is missing (`agent investigation: 1/2 available`).
    Progressing { detail: String },
}

/// What [`plan`] decides from.
#[derive(Clone, Debug)]
pub struct RolloutInput<'a> {
    pub now: Timestamp,
    /// The workflow's name (for messages).
    pub workflow: &'a str,
    /// The current spec (its hash names its revision; `rollout` and `rollbackTo` are read
    /// from it).
    pub spec: &'a AgentWorkflowSpec,
    /// Every known revision.
    pub revisions: &'a [Revision],
    /// The revision currently applied (`status.currentRevision`); `None` at first. A number no
    /// known revision has counts as `None`.
    pub applied: Option<i64>,
    /// Of `applied`'s Deployments.
    pub availability: Availability,
    /// For `applied`, if the controller measured one ([`analysis::judge`], with
    /// `available_for` counted from the later of the revision's `since` and the moment its
    /// Deployments became available).
    pub analysis: Option<Verdict>,
}

/// Where the rollout stands after the plan; each maps to the conditions the controller sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// The applied revision is rolling out (Deployments or analysis pending):
    /// Progressing=True.
    Progressing,
    /// The spec's own revision is applied and Healthy: Progressing=False, not Degraded.
    Complete,
    /// A Healthy revision other than the spec's own is applied (the spec's own Failed and was
    /// rolled back, automatically or by hand): Progressing=False, RolledBack=True.
    RolledBack,
    /// The applied revision Failed and stays applied (strategy Manual, or no Healthy revision
    /// to go back to): Degraded=True.
    Failed,
}

impl State {
    /// A CamelCase reason for the conditions.
    pub fn reason(self) -> &'static str {
        match self {
            State::Progressing => "RolloutInProgress",
            State::Complete => "RolloutComplete",
            State::RolledBack => "RolledBack",
            State::Failed => "RolloutFailed",
        }
    }
}

/// The decision.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// A new revision to store (the spec changed).
    pub create: Option<Revision>,
    /// The revision whose spec to render and apply now.
    pub apply: i64,
    /// Known revisions whose phase, reason or since changed (to persist).
    pub updates: Vec<Revision>,
    /// A rollback happened in this plan: the Event and the RolledBack condition.
    pub rolled_back: Option<RolledBack>,
    /// `spec.rollbackTo` was acted on: the controller removes it from the spec.
    pub clear_rollback_to: bool,
    /// When the decision may change by time alone.
    pub requeue_after: Option<Duration>,
    /// One line for the Progressing / Degraded conditions.
    pub message: String,
    /// Where the rollout stands.
    pub state: State,
    /// Revisions pruning must not delete ([`revision::to_prune`]): the applied one, the
    /// spec's own (a Failed one must stay to stay pinned out), the newest Healthy one.
    pub keep: Vec<i64>,
}

impl Plan {
    /// `known` with this plan's updates and creation applied, newest first (what
    /// `status.revisions` shows).
    pub fn revisions(&self, known: &[Revision]) -> Vec<Revision> {
        let mut out: Vec<Revision> = known
            .iter()
            .map(|r| {
                self.updates
                    .iter()
                    .find(|u| u.number == r.number)
                    .unwrap_or(r)
                    .clone()
            })
            .chain(self.create.clone())
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.number));
        out
    }
}

/// A rollback: from the revision that was applied to the one applied now.
#[derive(Clone, Debug, PartialEq)]
pub struct RolledBack {
    pub from: i64,
    pub to: i64,
    /// Why: the failed revision's reason, or "rolled back by hand to revision N".
    pub reason: String,
    /// Asked for by `spec.rollbackTo` (else automatic).
    pub manual: bool,
}

/// A spec the rollout cannot act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("spec.rollbackTo.revision: revision {revision} does not exist (known: {})", list(.known))]
    UnknownRevision { revision: i64, known: Vec<i64> },
}

fn list(ns: &[i64]) -> String {
    if ns.is_empty() {
        return "none".into();
    }
    ns.iter().map(i64::to_string).collect::<Vec<_>>().join(", ")
}

/// The strategy of a spec: Automatic only when asked for.
pub fn strategy(spec: &AgentWorkflowSpec) -> RolloutStrategy {
    spec.rollout
        .as_ref()
        .and_then(|r| r.strategy)
        .unwrap_or(RolloutStrategy::Manual)
}

/// The progress deadline of a spec.
pub fn progress_deadline(spec: &AgentWorkflowSpec) -> Duration {
    let s = spec
        .rollout
        .as_ref()
        .and_then(|r| r.progress_deadline_seconds)
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE_SECONDS);
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

/// The revision history limit of a spec (10 by default, as Deployments).
pub fn history_limit(spec: &AgentWorkflowSpec) -> usize {
    spec.rollout
        .as_ref()
        .and_then(|r| r.revision_history_limit)
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(10)
}

/// The working set of a plan: the revisions as they will be, and which changed.
struct Book {
    revs: Vec<Revision>,
    touched: BTreeSet<i64>,
    created: Option<i64>,
    now: Timestamp,
}

impl Book {
    fn get(&self, n: i64) -> Option<&Revision> {
        self.revs.iter().find(|r| r.number == n)
    }

    fn phase(&self, n: i64) -> Option<Phase> {
        self.get(n).map(|r| r.phase)
    }

    fn set(&mut self, n: i64, phase: Phase, reason: Option<String>) {
        let now = self.now;
        if let Some(r) = self.revs.iter_mut().find(|r| r.number == n) {
            r.phase = phase;
            r.reason = reason;
            r.since = now;
            self.touched.insert(n);
        }
    }

    fn newest_healthy(&self, except: i64) -> Option<i64> {
        self.revs
            .iter()
            .filter(|r| r.phase == Phase::Healthy && r.number != except)
            .map(|r| r.number)
            .max()
    }

    fn create(
        &mut self,
        spec: &AgentWorkflowSpec,
        workflow: &str,
        phase: Phase,
        reason: Option<String>,
    ) -> i64 {
        let number = self.revs.iter().map(|r| r.number).max().unwrap_or(0) + 1;
        let hash = revision::spec_hash(spec);
        self.revs.push(Revision {
            number,
            name: revision::revision_name(workflow, &hash),
            hash,
            spec: revision::revisioned_spec(spec),
            phase,
            reason,
            since: self.now,
        });
        self.created = Some(number);
        number
    }
}

/// What judging the applied Progressing revision concluded.
enum Judged {
    Stay { requeue: Duration, message: String },
    Healthy,
    Failed(String),
}

/// Decide (see the module doc for the rules).
pub fn plan(input: &RolloutInput) -> Result<Plan, PlanError> {
    let mut book = Book {
        revs: input.revisions.to_vec(),
        touched: BTreeSet::new(),
        created: None,
        now: input.now,
    };
    let strategy = strategy(input.spec);
    let deadline = progress_deadline(input.spec);
    let applied = input.applied.filter(|a| book.get(*a).is_some());
    let hash = revision::spec_hash(input.spec);
    let mut own = input
        .revisions
        .iter()
        .filter(|r| r.hash == hash)
        .map(|r| r.number)
        .max();
    let mut rolled_back = None;
    let mut clear_rollback_to = false;

    // 1. The target: what the spec, rollbackTo and the pins ask for.
    let mut target = if let Some(rb) = &input.spec.rollback_to {
        let n = rb.revision;
        if book.get(n).is_none() {
            let mut known: Vec<i64> = input.revisions.iter().map(|r| r.number).collect();
            known.sort_unstable();
            return Err(PlanError::UnknownRevision { revision: n, known });
        }
        clear_rollback_to = true;
        let reason = format!("rolled back by hand to revision {n}");
        match own {
            Some(o) if o != n => {
                if book.phase(o) != Some(Phase::Failed) {
                    book.set(o, Phase::Failed, Some(reason.clone()));
                }
            }
            Some(_) => {}
            // The spec changed together with rollbackTo: its content is stored, pinned out,
            // so clearing rollbackTo does not roll it out behind the user's back.
            None => {
                own = Some(book.create(
                    input.spec,
                    input.workflow,
                    Phase::Failed,
                    Some(reason.clone()),
                ));
            }
        }
        if book.phase(n) == Some(Phase::Failed) {
            book.set(n, Phase::Progressing, None);
        }
        if let Some(a) = applied
            && a != n
        {
            rolled_back = Some(RolledBack {
                from: a,
                to: n,
                reason,
                manual: true,
            });
        }
        n
    } else {
        match own {
            None => {
                let n = book.create(input.spec, input.workflow, Phase::Progressing, None);
                own = Some(n);
                n
            }
            Some(o) if book.phase(o) != Some(Phase::Failed) => o,
            Some(o) => match applied {
                Some(a) if book.phase(a) != Some(Phase::Failed) => a,
                Some(a) if strategy == RolloutStrategy::Manual => a,
                _ => {
                    let failed = applied.unwrap_or(o);
                    match book.newest_healthy(failed) {
                        Some(h) => {
                            if let Some(a) = applied {
                                rolled_back = Some(RolledBack {
                                    from: a,
                                    to: h,
                                    reason: book
                                        .get(a)
                                        .and_then(|r| r.reason.clone())
                                        .unwrap_or_else(|| format!("revision {a} failed")),
                                    manual: false,
                                });
                            }
                            h
                        }
                        None => failed,
                    }
                }
            },
        }
    };

    // 2. A Progressing revision applied again after another starts its rollout afresh. (Not
    // when nothing is known to be applied: a status not yet read back is no other revision.)
    if applied.is_some_and(|a| a != target)
        && book.phase(target) == Some(Phase::Progressing)
        && !book.touched.contains(&target)
        && book.created != Some(target)
    {
        book.set(target, Phase::Progressing, None);
    }

    // 3. Judge the applied revision, unless this plan (re)started it.
    let mut stay = None;
    if applied == Some(target)
        && book.phase(target) == Some(Phase::Progressing)
        && !book.touched.contains(&target)
    {
        match judge(&book, target, input, deadline) {
            Judged::Stay { requeue, message } => stay = Some((requeue, message)),
            Judged::Healthy => book.set(target, Phase::Healthy, None),
            Judged::Failed(reason) => {
                book.set(target, Phase::Failed, Some(reason.clone()));
                if strategy == RolloutStrategy::Automatic
                    && let Some(h) = book.newest_healthy(target)
                {
                    rolled_back = Some(RolledBack {
                        from: target,
                        to: h,
                        reason,
                        manual: false,
                    });
                    target = h;
                }
            }
        }
    }

    // 4. Where that leaves the rollout.
    let own = own.unwrap_or(target);
    let target_rev = book.get(target).cloned();
    let phase = target_rev.as_ref().map_or(Phase::Progressing, |r| r.phase);
    let reason_of = |n: i64| {
        book.get(n)
            .and_then(|r| r.reason.clone())
            .unwrap_or_else(|| "failed".into())
    };
    let (state, message, requeue_after) = match phase {
        Phase::Progressing => {
            let (requeue, message) =
                stay.unwrap_or_else(|| (deadline, format!("revision {target} rolling out")));
            (State::Progressing, message, Some(requeue))
        }
        Phase::Healthy if target == own => (
            State::Complete,
            format!("revision {target} is healthy"),
            None,
        ),
        Phase::Healthy => (
            State::RolledBack,
            format!(
                "revision {target} applied; revision {own} (the current spec) failed: {}; not \
                 retried until the spec changes (spec.rollbackTo.revision: {own} retries it)",
                reason_of(own)
            ),
            None,
        ),
        Phase::Failed => {
            let why = match strategy {
                RolloutStrategy::Manual => format!(
                    "strategy Manual: roll back with spec.rollbackTo (r4 rollback {})",
                    input.workflow
                ),
                RolloutStrategy::Automatic => "no Healthy revision to roll back to".to_owned(),
            };
            (
                State::Failed,
                format!("revision {target} failed: {}; {why}", reason_of(target)),
                None,
            )
        }
    };

    let mut keep: Vec<i64> = [Some(target), applied, Some(own), book.newest_healthy(0)]
        .into_iter()
        .flatten()
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let create = book.created.and_then(|n| book.get(n).cloned());
    let updates = book
        .revs
        .iter()
        .filter(|r| Some(r.number) != book.created && book.touched.contains(&r.number))
        .filter(|r| input.revisions.iter().all(|o| o != *r))
        .cloned()
        .collect();
    Ok(Plan {
        create,
        apply: target,
        updates,
        rolled_back,
        clear_rollback_to,
        requeue_after,
        message,
        state,
        keep,
    })
}

fn judge(book: &Book, n: i64, input: &RolloutInput, deadline: Duration) -> Judged {
    let Some(rev) = book.get(n) else {
        return Judged::Stay {
            requeue: deadline,
            message: format!("revision {n} rolling out"),
        };
    };
    match &input.availability {
        Availability::Progressing { detail } => {
            // A `since` in the future (clock skew between controller replicas) counts as now.
            let elapsed =
                Duration::try_from(input.now.duration_since(rev.since)).unwrap_or_default();
            if elapsed > deadline {
                Judged::Failed(format!(
                    "Deployments not available within {}s: {detail}",
                    deadline.as_secs()
                ))
            } else {
                Judged::Stay {
                    requeue: (deadline - elapsed).max(Duration::from_secs(1)),
                    message: format!("revision {n} rolling out: {detail}"),
                }
            }
        }
        // The first rollout of a workflow (no other Healthy revision) is not analysed, as
        // Argo Rollouts promotes an initial deployment at once: there is nothing to compare it
        // with or to roll back to, and a workflow with no traffic yet would wait a window.
        Availability::Available
            if !input
                .revisions
                .iter()
                .any(|r| r.number != n && r.phase == Phase::Healthy) =>
        {
            Judged::Healthy
        }
        Availability::Available => match &input.analysis {
            Some(Verdict::Pending { remaining }) => Judged::Stay {
                requeue: *remaining,
                message: format!("revision {n} available; analysis running"),
            },
            Some(Verdict::Pass(_)) => Judged::Healthy,
            Some(Verdict::Breach { reason, .. }) => Judged::Failed(reason.clone()),
            None if input
                .spec
                .rollout
                .as_ref()
                .is_some_and(|r| r.analysis.is_some()) =>
            {
                Judged::Stay {
                    requeue: analysis::RETRY_WITHOUT_STATS,
                    message: format!(
                        "revision {n} available; waiting for engine statistics to judge it"
                    ),
                }
            }
            None => Judged::Healthy,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::workflow::{AnalysisSpec, RollbackTo, RolloutSpec};
    use crate::controller::analysis::Window;
    use crate::controller::revision::tests::{at, rev, spec};

    /// A spec running `image` with the given strategy and a 120 s deadline.
    fn with(image: &str, strategy: Option<RolloutStrategy>) -> AgentWorkflowSpec {
        let mut s = spec(image);
        s.rollout = Some(RolloutSpec {
            strategy,
            progress_deadline_seconds: Some(120),
            analysis: None,
            revision_history_limit: None,
        });
        s
    }

    fn auto(image: &str) -> AgentWorkflowSpec {
        with(image, Some(RolloutStrategy::Automatic))
    }

    fn rollback_to(mut s: AgentWorkflowSpec, n: i64) -> AgentWorkflowSpec {
        s.rollback_to = Some(RollbackTo { revision: n });
        s
    }

    fn input<'a>(
        spec: &'a AgentWorkflowSpec,
        revisions: &'a [Revision],
        applied: Option<i64>,
        now: i64,
    ) -> RolloutInput<'a> {
        RolloutInput {
            now: at(now),
            workflow: "wf",
            spec,
            revisions,
            applied,
            availability: Availability::Available,
            analysis: None,
        }
    }

    fn not_ready(i: RolloutInput<'_>) -> RolloutInput<'_> {
        RolloutInput {
            availability: Availability::Progressing {
                detail: "agent intake: 0/2 available".into(),
            },
            ..i
        }
    }

    /// The revisions after `p`, oldest first, as (number, phase).
    fn phases(known: &[Revision], p: &Plan) -> Vec<(i64, Phase)> {
        let mut v: Vec<(i64, Phase)> = p
            .revisions(known)
            .iter()
            .map(|r| (r.number, r.phase))
            .collect();
        v.reverse();
        v
    }

    fn after(known: &[Revision], p: &Plan) -> Vec<Revision> {
        let mut v = p.revisions(known);
        v.reverse();
        v
    }

    use Phase::{Failed, Healthy, Progressing};

    #[test]
    fn the_first_spec_is_revision_1_rolled_out() {
        let s = spec("a:1");
        let p = plan(&input(&s, &[], None, 0)).unwrap();
        let c = p.create.clone().unwrap();
        assert_eq!((c.number, c.phase, c.since), (1, Progressing, at(0)));
        assert_eq!(c.hash, revision::spec_hash(&s));
        assert_eq!(c.name, format!("wf-{}", c.hash));
        assert_eq!(p.apply, 1);
        assert!(p.updates.is_empty() && p.rolled_back.is_none() && !p.clear_rollback_to);
        assert_eq!(p.state, State::Progressing);
        assert_eq!(
            p.requeue_after,
            Some(Duration::from_secs(600)),
            "default deadline"
        );
        assert_eq!(p.keep, vec![1]);
    }

    #[test]
    fn an_available_revision_without_analysis_becomes_healthy_and_stays_so() {
        let s = spec("a:1");
        let revs = [rev(1, "a:1", Progressing)];
        let p = plan(&input(&s, &revs, Some(1), 150)).unwrap();
        assert!(p.create.is_none());
        assert_eq!(p.updates.len(), 1);
        assert_eq!((p.updates[0].phase, p.updates[0].since), (Healthy, at(150)));
        assert_eq!(
            (p.apply, p.state, p.requeue_after),
            (1, State::Complete, None)
        );
        // Healthy is never judged again: unavailable past any deadline, a breach — nothing.
        let revs = after(&revs, &p);
        let mut i = not_ready(input(&s, &revs, Some(1), 99_999));
        i.analysis = Some(Verdict::Breach {
            reason: "x".into(),
            window: Window::default(),
        });
        let p = plan(&i).unwrap();
        assert!(p.updates.is_empty() && p.rolled_back.is_none());
        assert_eq!((p.apply, p.state), (1, State::Complete));
    }

    #[test]
    fn deadline_is_judged_at_its_boundary() {
        let s = with("a:2", None);
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Progressing)]; // 2 since t=200
        let p = plan(&not_ready(input(&s, &revs, Some(2), 260))).unwrap();
        assert!(p.updates.is_empty());
        assert_eq!(p.state, State::Progressing);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(60)));
        assert_eq!(
            p.message,
            "revision 2 rolling out: agent intake: 0/2 available"
        );
        // Exactly at the deadline: not yet (the deadline is exceeded only past it).
        let p = plan(&not_ready(input(&s, &revs, Some(2), 320))).unwrap();
        assert!(p.updates.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(1)));
        // Past it: Failed. Strategy unset is Manual: it stays applied, Degraded.
        let p = plan(&not_ready(input(&s, &revs, Some(2), 321))).unwrap();
        assert_eq!(p.updates.len(), 1);
        let f = &p.updates[0];
        assert_eq!((f.number, f.phase, f.since), (2, Failed, at(321)));
        assert_eq!(
            f.reason.as_deref(),
            Some("Deployments not available within 120s: agent intake: 0/2 available")
        );
        assert_eq!(
            (p.apply, p.state, p.requeue_after),
            (2, State::Failed, None)
        );
        assert!(p.rolled_back.is_none());
        assert!(
            p.message.contains("strategy Manual") && p.message.contains("r4 rollback wf"),
            "{}",
            p.message
        );
        // And the next reconcile keeps it there (Manual does not roll back later either).
        let revs = after(&revs, &p);
        let p = plan(&not_ready(input(&s, &revs, Some(2), 400))).unwrap();
        assert!(p.updates.is_empty() && p.rolled_back.is_none());
        assert_eq!((p.apply, p.state), (2, State::Failed));
        // Without a rollout section the deadline is 600 s.
        let plain = spec("a:2");
        let fresh = [rev(1, "a:1", Healthy), rev(2, "a:2", Progressing)];
        assert!(
            plan(&not_ready(input(&plain, &fresh, Some(2), 800)))
                .unwrap()
                .updates
                .is_empty()
        );
        assert_eq!(
            plan(&not_ready(input(&plain, &fresh, Some(2), 801)))
                .unwrap()
                .updates[0]
                .phase,
            Failed
        );
    }

    #[test]
    fn automatic_rolls_a_failed_revision_back_to_the_newest_healthy_one() {
        let s = auto("a:3");
        let revs = [
            rev(1, "a:1", Healthy),
            rev(2, "a:2", Healthy),
            rev(3, "a:3", Progressing),
        ];
        let p = plan(&not_ready(input(&s, &revs, Some(3), 421))).unwrap();
        assert_eq!(p.apply, 2);
        let rb = p.rolled_back.clone().unwrap();
        assert_eq!((rb.from, rb.to, rb.manual), (3, 2, false));
        assert!(
            rb.reason
                .starts_with("Deployments not available within 120s")
        );
        assert_eq!(
            phases(&revs, &p),
            vec![(1, Healthy), (2, Healthy), (3, Failed)]
        );
        assert_eq!(p.state, State::RolledBack);
        assert!(
            p.message.starts_with(
                "revision 2 applied; revision 3 (the current spec) failed: Deployments"
            ),
            "{}",
            p.message
        );
        assert_eq!(p.keep, vec![2, 3]);
        // The next reconcile stays on 2: no event again, no retry of 3.
        let revs = after(&revs, &p);
        let p = plan(&input(&s, &revs, Some(2), 500)).unwrap();
        assert!(p.rolled_back.is_none() && p.updates.is_empty() && p.create.is_none());
        assert_eq!((p.apply, p.state), (2, State::RolledBack));
    }

    #[test]
    fn automatic_without_a_healthy_revision_stays_and_says_so() {
        let s = auto("a:1");
        let revs = [rev(1, "a:1", Progressing)];
        let p = plan(&not_ready(input(&s, &revs, Some(1), 221))).unwrap();
        assert_eq!((p.apply, p.state), (1, State::Failed));
        assert!(p.rolled_back.is_none());
        assert!(
            p.message.ends_with("no Healthy revision to roll back to"),
            "{}",
            p.message
        );
    }

    #[test]
    fn analysis_verdicts_decide_an_available_revision() {
        let mut s = auto("a:2");
        if let Some(r) = s.rollout.as_mut() {
            r.analysis = Some(AnalysisSpec {
                min_success_rate: Some(0.98),
                max_p95_latency_ms: None,
                window_seconds: None,
            });
        }
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Progressing)];
        let with_verdict = |v: Option<Verdict>| {
            let mut i = input(&s, &revs, Some(2), 1000);
            i.analysis = v;
            plan(&i).unwrap()
        };
        let p = with_verdict(Some(Verdict::Pending {
            remaining: Duration::from_secs(17),
        }));
        assert!(p.updates.is_empty());
        assert_eq!(
            (p.state, p.requeue_after),
            (State::Progressing, Some(Duration::from_secs(17)))
        );
        assert_eq!(p.message, "revision 2 available; analysis running");
        // No verdict although the spec asks for one: wait, neither pass nor fail.
        let p = with_verdict(None);
        assert!(p.updates.is_empty());
        assert_eq!(p.requeue_after, Some(analysis::RETRY_WITHOUT_STATS));
        assert!(p.message.contains("waiting for engine statistics"));
        let p = with_verdict(Some(Verdict::Pass(Window::default())));
        assert_eq!(phases(&revs, &p), vec![(1, Healthy), (2, Healthy)]);
        assert_eq!(
            (p.apply, p.state, p.requeue_after),
            (2, State::Complete, None)
        );
        let reason = "success rate 0.412 < 0.98 over 60s (17 tasks)".to_string();
        let p = with_verdict(Some(Verdict::Breach {
            reason: reason.clone(),
            window: Window::default(),
        }));
        assert_eq!(p.updates[0].reason.as_ref(), Some(&reason));
        assert_eq!(
            p.rolled_back,
            Some(RolledBack {
                from: 2,
                to: 1,
                reason,
                manual: false
            })
        );
        assert_eq!(p.apply, 1);
    }

    #[test]
    fn two_spec_changes_in_a_row() {
        let revs = [rev(1, "a:1", Healthy)];
        let s2 = auto("a:2");
        let p = plan(&input(&s2, &revs, Some(1), 300)).unwrap();
        assert_eq!((p.create.as_ref().map(|c| c.number), p.apply), (Some(2), 2));
        let revs = after(&revs, &p);
        // Changed again before 2 was judged: 3 is rolled out; 2 was never judged and keeps
        // Progressing (not Failed: nothing went wrong with it).
        let s3 = auto("a:3");
        let p = plan(&not_ready(input(&s3, &revs, Some(2), 310))).unwrap();
        assert_eq!((p.create.as_ref().map(|c| c.number), p.apply), (Some(3), 3));
        assert!(p.updates.is_empty() && p.rolled_back.is_none());
        assert_eq!(
            phases(&revs, &p),
            vec![(1, Healthy), (2, Progressing), (3, Progressing)]
        );
        assert_eq!(p.requeue_after, Some(Duration::from_secs(120)));
        // 3 fails: the rollback goes to 1 (Healthy), never to 2 (not judged).
        let revs = after(&revs, &p);
        let p = plan(&not_ready(input(&s3, &revs, Some(3), 500))).unwrap();
        assert_eq!(p.apply, 1);
        assert_eq!(p.rolled_back.map(|r| (r.from, r.to)), Some((3, 1)));
    }

    #[test]
    fn a_change_that_is_not_revisioned_creates_nothing() {
        let revs = [rev(1, "a:1", Healthy)];
        let mut s = auto("a:1");
        s.kill_switches = Some(serde_json::from_value(serde_json::json!({"all": true})).unwrap());
        s.rollout.as_mut().unwrap().progress_deadline_seconds = Some(999);
        let p = plan(&input(&s, &revs, Some(1), 300)).unwrap();
        assert!(p.create.is_none() && p.updates.is_empty());
        assert_eq!((p.apply, p.state), (1, State::Complete));
    }

    #[test]
    fn a_failed_revision_is_not_retried_while_the_spec_is_unchanged() {
        // After the automatic rollback: 2 Failed, 1 applied, spec still 2.
        let s = auto("a:2");
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Failed)];
        for t in [300, 3000, 300_000] {
            let p = plan(&input(&s, &revs, Some(1), t)).unwrap();
            assert!(p.create.is_none() && p.updates.is_empty() && p.rolled_back.is_none());
            assert_eq!((p.apply, p.state), (1, State::RolledBack));
            assert!(
                p.message.contains("not retried until the spec changes"),
                "{}",
                p.message
            );
        }
        // With the status lost (nothing applied known), the same: the Healthy one.
        let p = plan(&input(&s, &revs, None, 300)).unwrap();
        assert_eq!((p.apply, p.rolled_back.is_none()), (1, true));
        // A number no revision has counts as nothing applied.
        assert_eq!(plan(&input(&s, &revs, Some(42), 300)).unwrap().apply, 1);
    }

    #[test]
    fn a_spec_changed_back_to_a_failed_content_is_not_retried() {
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Failed)];
        // Another content: a new rollout.
        let p = plan(&input(&auto("a:3"), &revs, Some(1), 300)).unwrap();
        assert_eq!((p.create.as_ref().map(|c| c.number), p.apply), (Some(3), 3));
        let mut revs = after(&revs, &p);
        revs[2].phase = Healthy;
        // Back to 2's content: pinned, 3 stays applied; only rollbackTo retries 2.
        let p = plan(&input(&auto("a:2"), &revs, Some(3), 400)).unwrap();
        assert!(p.create.is_none() && p.updates.is_empty() && p.rolled_back.is_none());
        assert_eq!((p.apply, p.state), (3, State::RolledBack));
        assert!(
            p.message.contains("spec.rollbackTo.revision: 2 retries it"),
            "{}",
            p.message
        );
        assert_eq!(
            p.keep,
            vec![2, 3],
            "2 stays stored: pruning it would lift the pin"
        );
    }

    #[test]
    fn manual_strategy_leaves_a_failed_revision_applied_until_automatic_is_asked_for() {
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Failed)];
        let p = plan(&input(
            &with("a:2", Some(RolloutStrategy::Manual)),
            &revs,
            Some(2),
            300,
        ))
        .unwrap();
        assert_eq!((p.apply, p.state), (2, State::Failed));
        assert!(p.rolled_back.is_none());
        // Switching to Automatic (not revisioned) rolls it back now.
        let p = plan(&input(&auto("a:2"), &revs, Some(2), 310)).unwrap();
        assert_eq!(p.apply, 1);
        let rb = p.rolled_back.unwrap();
        assert_eq!(
            (rb.from, rb.to, rb.reason.as_str(), rb.manual),
            (2, 1, "it broke", false)
        );
    }

    #[test]
    fn rollback_by_hand_to_1_from_3() {
        let revs = [
            rev(1, "a:1", Healthy),
            rev(2, "a:2", Healthy),
            rev(3, "a:3", Healthy),
        ];
        let s = rollback_to(with("a:3", None), 1);
        let p = plan(&input(&s, &revs, Some(3), 500)).unwrap();
        assert_eq!(p.apply, 1);
        assert!(p.clear_rollback_to);
        let reason = "rolled back by hand to revision 1".to_string();
        assert_eq!(
            p.rolled_back,
            Some(RolledBack {
                from: 3,
                to: 1,
                reason: reason.clone(),
                manual: true
            })
        );
        assert_eq!(p.updates.len(), 1);
        assert_eq!((p.updates[0].number, p.updates[0].phase), (3, Failed));
        assert_eq!(p.updates[0].reason.as_ref(), Some(&reason));
        assert_eq!(p.state, State::RolledBack);
        // rollbackTo removed, spec still 3: the controller stays on 1 — not on 2, the newest
        // Healthy, which would undo the user's choice.
        let revs = after(&revs, &p);
        let p = plan(&input(&with("a:3", None), &revs, Some(1), 510)).unwrap();
        assert!(p.create.is_none() && p.updates.is_empty() && p.rolled_back.is_none());
        assert_eq!((p.apply, p.state), (1, State::RolledBack));
        assert!(!p.clear_rollback_to);
        assert_eq!(p.keep, vec![1, 2, 3]);
    }

    #[test]
    fn rollback_to_an_unknown_revision_is_an_error_naming_the_field() {
        let revs = [
            rev(1, "a:1", Healthy),
            rev(3, "a:3", Healthy),
            rev(2, "a:2", Healthy),
        ];
        let e = plan(&input(&rollback_to(spec("a:3"), 9), &revs, Some(3), 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.rollbackTo.revision: revision 9 does not exist (known: 1, 2, 3)"
        );
        let e = plan(&input(&rollback_to(spec("a:1"), 1), &[], None, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.rollbackTo.revision: revision 1 does not exist (known: none)"
        );
    }

    #[test]
    fn rollback_by_hand_to_a_failed_revision_retries_it() {
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Failed)];
        let s = rollback_to(auto("a:2"), 2);
        let p = plan(&input(&s, &revs, Some(1), 600)).unwrap();
        assert_eq!(p.apply, 2);
        assert_eq!(p.updates.len(), 1);
        let u = &p.updates[0];
        assert_eq!(
            (u.number, u.phase, u.reason.clone(), u.since),
            (2, Progressing, None, at(600))
        );
        assert_eq!(
            p.rolled_back.as_ref().map(|r| (r.from, r.to, r.manual)),
            Some((1, 2, true))
        );
        assert!(p.clear_rollback_to);
        assert_eq!(
            (p.state, p.requeue_after),
            (State::Progressing, Some(Duration::from_secs(120)))
        );
        // Judged afresh: its deadline counts from the retry.
        let revs = after(&revs, &p);
        let p = plan(&not_ready(input(&auto("a:2"), &revs, Some(2), 700))).unwrap();
        assert!(p.updates.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(20)));
        let p = plan(&input(&auto("a:2"), &revs, Some(2), 700)).unwrap();
        assert_eq!(phases(&revs, &p), vec![(1, Healthy), (2, Healthy)]);
        assert_eq!(p.state, State::Complete);
    }

    #[test]
    fn a_retry_is_not_judged_in_the_reconcile_that_starts_it() {
        // Manual left 2 Failed and applied; rollbackTo 2 retries it in place. The stale
        // observations (unavailable long ago, an old breach) must not fail it again at once.
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Failed)];
        let s = rollback_to(spec("a:2"), 2);
        let mut i = not_ready(input(&s, &revs, Some(2), 5000));
        i.analysis = Some(Verdict::Breach {
            reason: "old".into(),
            window: Window::default(),
        });
        let p = plan(&i).unwrap();
        assert_eq!(phases(&revs, &p), vec![(1, Healthy), (2, Progressing)]);
        assert!(
            p.rolled_back.is_none(),
            "nothing rolled back: 2 was already applied"
        );
        assert!(p.clear_rollback_to);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(600)));
    }

    #[test]
    fn rollback_to_the_applied_revision_only_clears_the_request() {
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Healthy)];
        let p = plan(&input(&rollback_to(spec("a:2"), 2), &revs, Some(2), 300)).unwrap();
        assert!(p.clear_rollback_to && p.rolled_back.is_none() && p.updates.is_empty());
        assert_eq!((p.apply, p.state), (2, State::Complete));
        // Acted on already (its removal failed): the second look changes nothing either.
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Failed)];
        let p = plan(&input(&rollback_to(spec("a:2"), 1), &revs, Some(1), 300)).unwrap();
        assert!(p.clear_rollback_to && p.rolled_back.is_none() && p.updates.is_empty());
        assert_eq!(p.apply, 1);
    }

    #[test]
    fn a_spec_changed_together_with_rollback_to_is_stored_pinned_out() {
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Healthy)];
        let p = plan(&input(&rollback_to(spec("a:3"), 1), &revs, Some(2), 300)).unwrap();
        let c = p.create.clone().unwrap();
        assert_eq!((c.number, c.phase), (3, Failed));
        assert_eq!(
            c.reason.as_deref(),
            Some("rolled back by hand to revision 1")
        );
        assert_eq!(p.apply, 1);
        assert_eq!(p.rolled_back.as_ref().map(|r| (r.from, r.to)), Some((2, 1)));
        // Once rollbackTo is removed, 3 is not rolled out behind the user's back.
        let revs = after(&revs, &p);
        let p = plan(&input(&spec("a:3"), &revs, Some(1), 310)).unwrap();
        assert!(p.create.is_none());
        assert_eq!(p.apply, 1);
    }

    #[test]
    fn a_progressing_revision_applied_again_restarts_its_clock() {
        let revs = [
            rev(1, "a:1", Healthy),
            rev(2, "a:2", Progressing),
            rev(3, "a:3", Progressing),
        ];
        let p = plan(&not_ready(input(&auto("a:2"), &revs, Some(3), 5000))).unwrap();
        assert_eq!(p.apply, 2);
        assert_eq!(p.updates.len(), 1);
        assert_eq!(
            (p.updates[0].number, p.updates[0].phase, p.updates[0].since),
            (2, Progressing, at(5000))
        );
        assert_eq!(p.requeue_after, Some(Duration::from_secs(120)));
        assert!(p.rolled_back.is_none(), "a spec change is no rollback");
    }

    #[test]
    fn pruning_with_the_plan_keeps_the_applied_own_and_last_healthy_revisions() {
        // 1 and 2 Healthy, 3..12 Failed; the user rolled back to 1 while the spec is 12.
        let mut revs = vec![rev(1, "a:1", Healthy), rev(2, "a:2", Healthy)];
        revs.extend((3..=12).map(|n| rev(n, &format!("a:{n}"), Failed)));
        let s = with("a:12", None);
        let p = plan(&input(&s, &revs, Some(1), 2000)).unwrap();
        assert_eq!(p.keep, vec![1, 2, 12]);
        let pruned = revision::to_prune(&p.revisions(&revs), 3, &p.keep);
        let expected: Vec<String> = revs[2..11].iter().map(|r| r.name.clone()).collect();
        assert_eq!(pruned, expected);
        // A limit of 1 cannot take them either.
        let pruned = revision::to_prune(&revs, history_limit(&s).min(1), &p.keep);
        for n in [1usize, 2, 12] {
            assert!(!pruned.contains(&revs[n - 1].name));
        }
        assert_eq!(history_limit(&s), 10);
    }

    #[test]
    fn plan_revisions_are_newest_first_with_the_updates() {
        let revs = [rev(1, "a:1", Healthy), rev(2, "a:2", Progressing)];
        let p = plan(&input(&auto("a:3"), &revs, Some(2), 300)).unwrap();
        let all = p.revisions(&revs);
        assert_eq!(
            all.iter().map(|r| r.number).collect::<Vec<_>>(),
            vec![3, 2, 1]
        );
        assert_eq!(all[0].to_status().phase, "Progressing");
    }

    #[test]
    fn state_reasons_are_camel_case() {
        for s in [
            State::Progressing,
            State::Complete,
            State::RolledBack,
            State::Failed,
        ] {
            let r = s.reason();
            assert!(
                r.chars().next().unwrap().is_ascii_uppercase()
                    && r.chars().all(|c| c.is_ascii_alphabetic())
            );
        }
        assert_eq!(
            strategy(&spec("a:1")),
            RolloutStrategy::Manual,
            "Automatic only when asked for"
        );
        assert_eq!(strategy(&auto("a:1")), RolloutStrategy::Automatic);
    }
}
