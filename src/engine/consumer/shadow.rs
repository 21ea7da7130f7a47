//! Agent-level hedging inside the agent role: the primary's side (wait the delay, ask a peer,
//! stop when the peer completed the step) and the shadow's side (deliver a peer's entry to our
//! own agent and complete it with the SAME atomic completion).
//!
//! When to hedge, the cap, the overload guard and the notes are [`crate::engine::hedge`]'s;
//! this file only wires them to the role's delivery, faults, kill switch, degraded mode and
//! completion, so a shadow delivery obeys exactly what a primary one does.
//!
//! # Invariants
//! - The shadow never acks, claims or dead-letters the entry: it only delivers, and on success
//!   runs the normal completion ([`super::settle`]: outputs + XACK + inbox key, one atomic
//!   step). That step is group-wide and arbitrated by XACK and the inbox key, so of the
//!   primary's and the shadow's completions exactly one publishes; the other is dropped.
//! - A failed shadow delivery changes nothing (the primary still holds the entry and decides
//!   retries and dead-lettering); a shadow never hedges in turn.
//! - The primary stops waiting only on a "done" note, which a shadow sends only after its
//!   completion published; a lost note costs the loser's work, never a task.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{Ctx, Settled, build_outputs, payload_limit, settle, slowed, wait_or_shutdown};
use crate::engine::degraded::Downgrade;
use crate::engine::delivery::{DeliveryError, DeliveryRequest, Outputs, RequestKind};
use crate::engine::hedge::{AgentHedge, Note, PRESENCE_EVERY, live_peers};
use crate::engine::stats::{AgentHedgeEvent, Outcome};
use crate::engine::task::{self, Kind, Task};

/// What the primary's delivery came to.
pub(super) enum Primary {
    /// Our agent answered (or failed): go on as without hedging.
    Answer(Result<Outputs, DeliveryError>),
    /// A shadow completed the step meanwhile: our delivery was cancelled; nothing to do.
    ShadowWon,
}

/// One delivery to our own agent, with a drill's AgentSlowdown applied.
async fn once(ctx: &Ctx, req: &mut DeliveryRequest) -> Result<Outputs, DeliveryError> {
    match ctx.faults.slowdown(&ctx.agent.name, &req.task_id) {
        None => ctx.delivery.deliver(req).await,
        Some(late) => {
            ctx.stats.fault_applied();
            slowed(ctx, req, late).await
        }
    }
}

/// The primary's delivery of entry `entry_id`: hedged once the delay passes (if the agent has
/// a `hedge`, the task is not a compensation, and the cap, the overload guard and a live peer
/// allow it).
pub(super) async fn primary(ctx: &Ctx, entry_id: &str, req: &mut DeliveryRequest) -> Primary {
    let hedge = ctx.hedge.clone().filter(|_| req.kind == RequestKind::Task);
    let Some(h) = hedge else {
        return Primary::Answer(once(ctx, req).await);
    };
    h.deposit();
    let attempt = req.attempt;
    let task_id = req.task_id.clone();
    let started = Instant::now();
    let fut = once(ctx, req);
    tokio::pin!(fut);
    let res = 'hedged: {
        let Some(delay) = h.delay() else {
            break 'hedged fut.await;
        };
        // `biased`: a seeded `r4 run` must make the same choice every time.
        tokio::select! {
            biased;
            r = &mut fut => break 'hedged r,
            _ = tokio::time::sleep(delay) => {}
        }
        if let Err(why) = h.decide() {
            tracing::debug!(task = %task_id, step = %ctx.agent.name, refused = ?why, "not hedged");
            break 'hedged fut.await;
        }
        // Wait for the shadow's note from before it can be sent.
        let won = h.wait_done(entry_id);
        let Some(peer) = ask_peer(ctx, &h, entry_id, attempt).await else {
            h.forget(entry_id);
            break 'hedged fut.await;
        };
        tracing::debug!(task = %task_id, step = %ctx.agent.name, reason = "agent-hedge", peer = %peer, delay_ms = delay.as_millis() as u64, "hedged");
        tokio::select! {
            biased;
            r = &mut fut => {
                h.forget(entry_id);
                if r.is_ok() {
                    // Our agent answered first: the shadow may stop (its completion would be
                    // dropped anyway).
                    tell(ctx, &peer, &Note::Done { entry: entry_id.to_owned() }).await;
                }
                break 'hedged r;
            }
            Ok(()) = won => {
                // Dropping `fut` cancels our delivery (the HTTP request is closed).
                tracing::debug!(task = %task_id, step = %ctx.agent.name, reason = "shadow-won", peer = %peer, "delivery cancelled: a shadow completed the step");
                return Primary::ShadowWon;
            }
        }
    };
    if !matches!(&res, Err(e) if e.unreachable) {
        h.record(started.elapsed(), res.is_ok());
    }
    Primary::Answer(res)
}

/// Hand entry `entry_id` to a live peer (another engine of the agent): the first that hears
/// the note. `None` when none does.
async fn ask_peer(ctx: &Ctx, h: &AgentHedge, entry_id: &str, attempt: u64) -> Option<String> {
    let peers = match h.peers() {
        Some(p) => p,
        None => {
            let key = ctx.cfg.keys.hedge_peers(&ctx.agent.name);
            let live = match ctx.queue.hgetall(&key).await {
                Ok(fields) => {
                    let (live, stale) = live_peers(&fields, &ctx.engine_id, task::now_ms());
                    if !stale.is_empty() {
                        let _ = ctx.queue.hdel(&key, &stale).await;
                    }
                    live
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot list the agent's engines; not hedged");
                    Vec::new()
                }
            };
            h.set_peers(live)
        }
    };
    let note = Note::Hedge {
        entry: entry_id.to_owned(),
        from: ctx.engine_id.clone(),
        attempt,
    }
    .encode();
    // A few tries at most: an engine that left keeps its consumer name for a while.
    for peer in peers.into_iter().take(3) {
        let channel = ctx.cfg.keys.hedge_channel(&ctx.agent.name, &peer);
        if matches!(ctx.queue.publish(&channel, note.clone()).await, Ok(n) if n > 0) {
            h.sent.fetch_add(1, Ordering::Relaxed);
            ctx.stats.agent_hedge(AgentHedgeEvent::Sent);
            return Some(peer);
        }
    }
    None
}

/// Send `note` to `peer` (best effort: a lost note costs work, never correctness).
async fn tell(ctx: &Ctx, peer: &str, note: &Note) {
    let channel = ctx.cfg.keys.hedge_channel(&ctx.agent.name, peer);
    if let Err(e) = ctx.queue.publish(&channel, note.encode()).await {
        tracing::debug!(error = %e, "cannot send a hedging note");
    }
}

/// Hear our channel: "done" notes wake the deliveries waiting for them; hedge requests are
/// served while the role reads (not paused, its agent up), has fewer tasks in flight than its
/// concurrency and one of its shadow slots (a quarter of the concurrency, at least one) is
/// free — a busy or stopped engine declines, so hedging never adds to an overload.
///
/// Runs until shutdown; the shadows it started end with it (a killed engine's with its task).
pub(super) async fn listen(ctx: Arc<Ctx>, h: Arc<AgentHedge>, mut shutdown: watch::Receiver<bool>) {
    let channel = ctx.cfg.keys.hedge_channel(&ctx.agent.name, &ctx.engine_id);
    let peers_key = ctx.cfg.keys.hedge_peers(&ctx.agent.name);
    let mut shadows: JoinSet<()> = JoinSet::new();
    // The role's own delivery slots are taken by its reads (it holds what is free while it
    // waits for entries), so shadows have their own few — and an engine with as many tasks in
    // flight as its concurrency declines, so a hedge never lands on a busy replica.
    let slots = Arc::new(Semaphore::new((ctx.agent.concurrency / 4).max(1)));
    while !*shutdown.borrow() {
        let mut sub = match ctx.queue.subscribe(&channel).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "cannot subscribe to hedging notes; retrying");
                if wait_or_shutdown(&mut shutdown, std::time::Duration::from_millis(500)).await {
                    break;
                }
                continue;
            }
        };
        // We hear notes now: say so, and again every PRESENCE_EVERY while we take hedges.
        let mut presence = tokio::time::interval(PRESENCE_EVERY);
        loop {
            tokio::select! {
                biased;
                m = sub.next() => {
                    let Some(m) = m else { break }; // connection lost: subscribe again
                    match Note::decode(&m) {
                        Some(Note::Done { entry }) => h.done(&entry),
                        Some(Note::Hedge { entry, from, attempt }) => {
                            if h.paused() || *shutdown.borrow() {
                                tracing::debug!(entry = %entry, "hedge declined: paused");
                                continue;
                            }
                            let busy = ctx.stats.counters().in_flight >= ctx.agent.concurrency as i64;
                            let permit = slots.clone().try_acquire_owned();
                            let Ok(permit) = permit.map_err(|_| ()).and_then(|p| if busy { Err(()) } else { Ok(p) }) else {
                                tracing::debug!(entry = %entry, "hedge declined: busy");
                                continue;
                            };
                            let (ctx, h) = (ctx.clone(), h.clone());
                            shadows.spawn(async move {
                                serve(&ctx, &h, &entry, &from, attempt, permit).await;
                            });
                        }
                        None => {}
                    }
                }
                Some(_) = shadows.join_next(), if !shadows.is_empty() => {}
                _ = presence.tick() => {
                    if !h.paused() {
                        let at = task::now_ms().to_string();
                        let _ = ctx.queue.hset(&peers_key, vec![(ctx.engine_id.clone(), at.into())]).await;
                    }
                }
                _ = shutdown.changed() => break,
            }
        }
    }
    // Safe stop: no more hedges for us (a killed engine's entry goes stale instead).
    let _ = ctx
        .queue
        .hdel(&peers_key, std::slice::from_ref(&ctx.engine_id))
        .await;
    // Safe stop: the shadows' primaries still hold their entries; nothing is lost by ending.
    shadows.abort_all();
}

/// The shadow's side: deliver `entry_id` (a peer's entry) to our agent with the task's own
/// `Idempotency-Key`, and complete it if we answer first.
async fn serve(
    ctx: &Ctx,
    h: &AgentHedge,
    entry_id: &str,
    from: &str,
    attempt: u64,
    permit: OwnedSemaphorePermit,
) {
    let started = Instant::now();
    let _in_flight = ctx.stats.in_flight();
    let entry = match ctx.queue.range(&ctx.stream, entry_id, entry_id, 1).await {
        Ok(mut v) if v.len() == 1 && v[0].id == entry_id => v.remove(0),
        other => {
            tracing::debug!(entry = %entry_id, found = ?other.map(|v| v.len()), "shadow: entry gone");
            return; // gone: completed and trimmed
        }
    };
    let Ok(mut task) = Task::decode(&entry.fields, payload_limit(ctx)) else {
        return; // the primary dead-letters it
    };
    if task.step.as_deref().is_some_and(|s| s != ctx.agent.name) || task.kind != Kind::Task {
        tracing::debug!(entry = %entry_id, "shadow: not a task of ours");
        return;
    }
    if ctx
        .downgrade
        .borrow()
        .as_ref()
        .is_some_and(Downgrade::before_delivery)
    {
        return; // degraded mode decides for the primary
    }
    let inbox = ctx.cfg.keys.inbox(&task.task_id, &ctx.agent.name);
    if matches!(ctx.queue.get(&inbox).await, Ok(Some(_))) {
        tracing::debug!(entry = %entry_id, "shadow: already done");
        return; // already done
    }
    let policy = ctx.policy();
    let mut req = DeliveryRequest {
        task_id: task.task_id.clone(),
        step: ctx.agent.name.clone(),
        kind: RequestKind::Task,
        compensation: None,
        payload: std::mem::take(&mut task.payload),
        attempt,
        idempotency_key: format!("{}:{}", task.task_id, ctx.agent.name),
        // As the primary's delivery: the current hop's span when traced, else a child of the
        // task's context (telemetry::trace, the one place traceparents are made).
        traceparent: crate::telemetry::trace::current_traceparent(task.traceparent.as_deref()),
        deadline: policy.per_attempt.min(ctx.cfg.max_hold()),
    };
    let cancelled = h.wait_done(entry_id);
    h.shadow_deliveries.fetch_add(1, Ordering::Relaxed);
    ctx.stats.agent_hedge(AgentHedgeEvent::Shadow);
    let mut shutdown = ctx.shutdown.clone();
    let t = Instant::now();
    let res = tokio::select! {
        biased;
        r = once(ctx, &mut req) => r,
        _ = cancelled => {
            tracing::debug!(task = %task.task_id, step = %ctx.agent.name, reason = "shadow-cancelled", "the primary answered first");
            return;
        }
        _ = shutdown.changed() => return,
    };
    h.forget(entry_id);
    let agent_time = t.elapsed();
    let Ok(outputs) = res else {
        return; // the primary decides what a failure means
    };
    drop(permit);
    let out = build_outputs(ctx, &task, &req.payload, outputs, None, &req.traceparent);
    if let Settled::Done(Some(Outcome::Completed)) =
        settle(ctx, &entry, &task, &inbox, out, &None).await
    {
        h.shadow_wins.fetch_add(1, Ordering::Relaxed);
        ctx.stats.agent_hedge(AgentHedgeEvent::ShadowWon);
        ctx.stats
            .record(Outcome::Completed, started.elapsed(), agent_time);
        tracing::debug!(task = %task.task_id, step = %ctx.agent.name, reason = "shadow-won", primary = %from, "completed by the shadow");
        tell(
            ctx,
            from,
            &Note::Done {
                entry: entry_id.to_owned(),
            },
        )
        .await;
    }
}
