//! Group commit of completions.
//!
//! Every finished task of an agent role ends in [`Queue::complete`]: its
//! outputs, its XACK and its inbox key in one atomic step. Under load many
//! tasks finish while such calls are on the wire; instead of one Redis
//! round trip (and one script run) each, [`GroupCommit`] sends whatever
//! completions are waiting as ONE [`Queue::complete_batch`] — the group
//! commit of databases — with up to [`IN_FLIGHT`] calls on the wire at
//! once. Nothing waits on purpose: a completion that finds a free call
//! goes out at once (a batch of one), so latency at low load is unchanged
//! and groups grow only when calls are busy.
//!
//! Safety is the queue's: the batch is atomic, and each entry keeps the
//! per-entry invariant. A completion lost with the process (queued, not
//! yet sent) leaves its entry pending, which is redelivered and
//! deduplicated by its inbox key like any crash before completion.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::queue::{Completing, Completion, Queue, QueueError};

/// Most completions sent in one call.
pub const MAX_GROUP: usize = 64;

/// Calls on the wire at once: a new group goes out while earlier ones are
/// still running, so one slow reply does not hold every completion.
pub const IN_FLIGHT: usize = 4;

type Reply = oneshot::Sender<Result<Completion, QueueError>>;

/// The completions of one consumer group (one agent role).
pub struct GroupCommit {
    tx: mpsc::UnboundedSender<(Completing, Reply)>,
    /// TTL of the inbox keys, in ms: changed by a policy reload for the groups sent after it.
    inbox_ttl_ms: Arc<AtomicU64>,
}

/// Where the completions go.
struct Target {
    queue: Arc<dyn Queue>,
    stream: String,
    group: String,
    inbox_ttl_ms: Arc<AtomicU64>,
    limit: Option<u64>,
}

impl GroupCommit {
    /// Start the committer task; it ends when the last [`GroupCommit`]
    /// handle is dropped and every queued completion is sent.
    /// Completions of entries of `group` of `stream`; `limit` is the
    /// backlog limit of the output work streams.
    pub fn start(
        queue: Arc<dyn Queue>,
        stream: String,
        group: String,
        inbox_ttl: Duration,
        limit: Option<u64>,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inbox_ttl_ms = Arc::new(AtomicU64::new(ms(inbox_ttl)));
        let target = Target {
            queue,
            stream,
            group,
            inbox_ttl_ms: inbox_ttl_ms.clone(),
            limit,
        };
        tokio::spawn(commit_loop(target, rx));
        Self { tx, inbox_ttl_ms }
    }

    /// The inbox-key TTL of the completions sent from now on (a policy reload).
    pub fn set_inbox_ttl(&self, ttl: Duration) {
        self.inbox_ttl_ms.store(ms(ttl), Ordering::Relaxed);
    }

    /// Complete one entry (see [`Queue::complete`]), together with whatever
    /// other completions are waiting.
    ///
    /// Traced as one `r4.commit` span, a child of the caller's span (the delivery), from the
    /// hand-over to the answer; not traced outside a span.
    pub async fn complete(&self, item: Completing) -> Result<Completion, QueueError> {
        // Only inside a traced hop: a completion outside one (a redelivered entry's probe)
        // would be a trace of one span.
        let span = if tracing::Span::current().is_none() {
            tracing::Span::none()
        } else {
            crate::telemetry::trace::commit_span()
        };
        crate::telemetry::trace::link(&span, None);
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .map_err(|_| QueueError::Shared("group commit stopped".into()))?;
        let done = answer
            .instrument(span.clone())
            .await
            .unwrap_or_else(|_| Err(QueueError::Shared("group commit stopped".into())));
        span.record(
            "r4.outcome",
            match &done {
                Ok(Completion::AlreadyDone) => "duplicate",
                Ok(Completion::Full { .. }) => "full",
                Ok(_) => "committed",
                Err(_) => "error",
            },
        );
        done
    }
}

async fn commit_loop(t: Target, mut rx: mpsc::UnboundedReceiver<(Completing, Reply)>) {
    let t = Arc::new(t);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut group = Vec::with_capacity(MAX_GROUP);
    loop {
        while in_flight.len() >= IN_FLIGHT {
            in_flight.join_next().await;
        }
        tokio::select! {
            n = rx.recv_many(&mut group, MAX_GROUP) => {
                if n == 0 {
                    break;
                }
                let (items, replies): (Vec<_>, Vec<_>) = group.drain(..).unzip();
                in_flight.spawn(commit(t.clone(), items, replies));
            }
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
        }
    }
    while in_flight.join_next().await.is_some() {}
}

/// Send one group and answer its callers.
async fn commit(t: Arc<Target>, items: Vec<Completing>, replies: Vec<Reply>) {
    let batch = items.len() > 1;
    match t.complete(items.clone()).await {
        Ok(done) => {
            for (reply, c) in replies.into_iter().zip(done) {
                let _ = reply.send(Ok(c));
            }
        }
        // One entry's own fault (a wrong-typed output stream, a bad id):
        // complete them one by one so only that entry fails.
        Err(QueueError::WrongType(_) | QueueError::Invalid(_)) if batch => {
            for (reply, item) in replies.into_iter().zip(items) {
                let one = t.complete(vec![item]).await.and_then(|mut v| {
                    v.pop()
                        .ok_or_else(|| QueueError::Protocol("empty complete reply".into()))
                });
                let _ = reply.send(one);
            }
        }
        Err(e) => {
            let mut e = Some(e);
            let text = e.as_ref().map(ToString::to_string).unwrap_or_default();
            for reply in replies {
                let err = e.take().unwrap_or_else(|| QueueError::Shared(text.clone()));
                let _ = reply.send(Err(err));
            }
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Target {
    async fn complete(&self, items: Vec<Completing>) -> Result<Vec<Completion>, QueueError> {
        self.queue
            .complete_batch(
                &self.stream,
                &self.group,
                items,
                Duration::from_millis(self.inbox_ttl_ms.load(Ordering::Relaxed)),
                self.limit,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::memory::MemoryQueue;
    use crate::queue::{Keys, fields};
    use bytes::Bytes;

    #[tokio::test]
    async fn concurrent_completions_are_answered_and_a_bad_one_fails_alone() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let k = Keys::new("t", "commit");
        let (input, out, bad) = (k.stream("in"), k.stream("out"), k.stream("bad"));
        q.ensure_group(&input, "g").await.unwrap();
        for i in 0..100 {
            q.add(&input, fields([("n", i.to_string())]), None)
                .await
                .unwrap();
        }
        q.set(&bad, Bytes::from_static(b"kv"), None).await.unwrap();
        let entries = q
            .read_group(&input, "g", "c", 0, Duration::ZERO)
            .await
            .unwrap();
        let gc = Arc::new(GroupCommit::start(
            q.clone(),
            input.clone(),
            "g".into(),
            Duration::from_secs(60),
            None,
        ));
        let mut handles = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            let gc = gc.clone();
            let to = if i == 7 { bad.clone() } else { out.clone() };
            let item = Completing {
                entry_id: e.id,
                inbox_key: k.inbox(&format!("t{i}"), "s"),
                outputs: vec![(to, fields([("n", i.to_string())]))],
                ..Completing::default()
            };
            handles.push(tokio::spawn(async move { gc.complete(item).await }));
        }
        let mut results = Vec::new();
        for h in handles {
            results.push(h.await.unwrap());
        }
        for (i, r) in results.iter().enumerate() {
            if i == 7 {
                assert!(matches!(r, Err(QueueError::WrongType(_))), "{r:?}");
            } else {
                assert!(matches!(r, Ok(Completion::Published { .. })), "{i}: {r:?}");
            }
        }
        assert_eq!(q.len(&out).await.unwrap(), 99);
        let pending = q.pending_summary(&input, "g").await.unwrap();
        assert_eq!(pending.count, 1, "only the bad entry is left pending");
    }

    /// Script runs (EVALSHA/EVAL) Redis has served so far.
    async fn script_calls(url: &str) -> u64 {
        let mut c = ::redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let info: String = ::redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut c)
            .await
            .unwrap();
        info.lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_redis_many_completions_share_few_script_runs() {
        let server = crate::testutil::RedisServer::start().await.unwrap();
        let q: Arc<dyn Queue> = Arc::new(
            crate::queue::redis::RedisQueue::connect(&server.url())
                .await
                .unwrap(),
        );
        let k = Keys::new("t", "commit-redis");
        let (input, out) = (k.stream("in"), k.stream("out"));
        q.ensure_group(&input, "g").await.unwrap();
        const N: usize = 400;
        for i in 0..N {
            q.add(&input, fields([("n", i.to_string())]), None)
                .await
                .unwrap();
        }
        let entries = q
            .read_group(&input, "g", "c", 0, Duration::ZERO)
            .await
            .unwrap();
        let gc = Arc::new(GroupCommit::start(
            q.clone(),
            input.clone(),
            "g".into(),
            Duration::from_secs(60),
            None,
        ));
        let before = script_calls(&server.url()).await;
        let mut handles = Vec::new();
        for (i, e) in entries.into_iter().enumerate() {
            let (gc, out) = (gc.clone(), out.clone());
            let item = Completing {
                entry_id: e.id,
                inbox_key: k.inbox(&format!("t{i}"), "s"),
                outputs: vec![(out, fields([("n", i.to_string())]))],
                ..Completing::default()
            };
            handles.push(tokio::spawn(async move { gc.complete(item).await }));
        }
        for h in handles {
            assert!(matches!(h.await.unwrap(), Ok(Completion::Published { .. })));
        }
        let runs = script_calls(&server.url()).await - before;
        println!("{N} completions in {runs} script runs");
        assert_eq!(q.len(&out).await.unwrap(), N as u64);
        assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 0);
        assert!(
            runs >= (N / MAX_GROUP) as u64 && runs < N as u64 / 2,
            "{N} completions took {runs} script runs"
        );
    }

    #[tokio::test]
    async fn a_refused_completion_is_reported_to_its_caller() {
        let q: Arc<dyn Queue> = Arc::new(MemoryQueue::new());
        let gc = GroupCommit::start(q, "s".into(), "g".into(), Duration::from_secs(1), None);
        // An invalid id: the queue refuses, the caller hears it.
        let r = gc
            .complete(Completing {
                entry_id: "nope".into(),
                inbox_key: "k".into(),
                ..Completing::default()
            })
            .await;
        assert!(matches!(r, Err(QueueError::Invalid(_))), "{r:?}");
    }
}
