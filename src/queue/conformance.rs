//! Conformance suite: every behaviour is written once as an
//! `async fn(Arc<dyn Queue>)` and run against both backends by the
//! `conformance!` macro at the bottom (tests `memory_backend::*` and
//! `redis_backend::*`; the Redis ones start their own `redis-server`).
//! Redis-only crash tests and memory-only paused-clock tests follow.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::time::Instant;

use super::memory::MemoryQueue;
use super::redis::RedisQueue;
use super::{Completion, Keys, Queue, QueueError, fields};
use crate::testutil::RedisServer;

type Q = Arc<dyn Queue>;

fn keys() -> Keys {
    Keys::new("conformance", &uuid::Uuid::new_v4().to_string())
}

fn f(v: &str) -> super::Fields {
    fields([("v", v.to_owned())])
}

fn val(e: &super::StreamEntry) -> String {
    e.field("v")
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default()
}

const ZERO: Duration = Duration::ZERO;
const HOUR: Duration = Duration::from_secs(3600);

pub async fn add_read_ack(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    q.ensure_group(&s, "g").await.unwrap(); // BUSYGROUP ignored
    for i in 0..3 {
        q.add(&s, fields([("v", i.to_string()), ("x", "y".into())]), None)
            .await
            .unwrap();
    }
    assert_eq!(q.len(&s).await.unwrap(), 3);
    let got = q.read_group(&s, "g", "c1", 10, ZERO).await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got.iter().map(val).collect::<Vec<_>>(), ["0", "1", "2"]);
    assert!(got.iter().all(|e| e.delivery_count == 1));
    assert_eq!(got[0].field("x"), Some(&Bytes::from("y")));
    assert_eq!(got[0].fields[0].0, "v", "field order kept");
    let p = q.pending_summary(&s, "g").await.unwrap();
    assert_eq!(p.count, 3);
    assert_eq!(p.min_id.as_deref(), Some(got[0].id.as_str()));
    assert_eq!(p.max_id.as_deref(), Some(got[2].id.as_str()));
    assert_eq!(p.consumers, vec![("c1".to_owned(), 3)]);
    let ids: Vec<String> = got[..2].iter().map(|e| e.id.clone()).collect();
    assert_eq!(q.ack(&s, "g", &ids).await.unwrap(), 2);
    assert_eq!(q.ack(&s, "g", &ids).await.unwrap(), 0);
    assert_eq!(q.pending_summary(&s, "g").await.unwrap().count, 1);
    // Nothing new to read.
    assert!(
        q.read_group(&s, "g", "c1", 10, ZERO)
            .await
            .unwrap()
            .is_empty()
    );
    // Acked entries stay in the stream.
    assert_eq!(q.len(&s).await.unwrap(), 3);
}

pub async fn group_created_from_zero_sees_existing(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.add(&s, f("early"), None).await.unwrap();
    q.ensure_group(&s, "g").await.unwrap();
    let got = q.read_group(&s, "g", "c", 10, ZERO).await.unwrap();
    assert_eq!(got.iter().map(val).collect::<Vec<_>>(), ["early"]);
}

pub async fn missing_group_is_nogroup(q: Q) {
    let k = keys();
    let s = k.stream("in");
    let err = q.read_group(&s, "nope", "c", 1, ZERO).await.unwrap_err();
    assert!(matches!(err, QueueError::NoGroup { .. }), "{err:?}");
    q.add(&s, f("a"), None).await.unwrap();
    let err = q.pending_summary(&s, "nope").await.unwrap_err();
    assert!(matches!(err, QueueError::NoGroup { .. }), "{err:?}");
    let err = q
        .read_group(&s, "nope", "c", 1, Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::NoGroup { .. }), "{err:?}");
}

pub async fn groups_split_entries(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    q.ensure_group(&s, "other").await.unwrap();
    for i in 0..4 {
        q.add(&s, f(&i.to_string()), None).await.unwrap();
    }
    let a = q.read_group(&s, "g", "a", 2, ZERO).await.unwrap();
    let b = q.read_group(&s, "g", "b", 2, ZERO).await.unwrap();
    assert_eq!(a.len(), 2);
    assert_eq!(b.len(), 2);
    let mut all: Vec<String> = a.iter().chain(&b).map(val).collect();
    all.sort();
    assert_eq!(all, ["0", "1", "2", "3"]);
    assert!(
        q.read_group(&s, "g", "c", 2, ZERO)
            .await
            .unwrap()
            .is_empty()
    );
    // Another group gets everything independently.
    assert_eq!(
        q.read_group(&s, "other", "x", 0, ZERO).await.unwrap().len(),
        4
    );
    let p = q.pending_summary(&s, "g").await.unwrap();
    assert_eq!(p.consumers, vec![("a".to_owned(), 2), ("b".to_owned(), 2)]);
}

pub async fn delivery_count_increases_on_redelivery(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    let id = q.add(&s, f("x"), None).await.unwrap();
    let first = q.read_group(&s, "g", "c1", 1, ZERO).await.unwrap();
    assert_eq!(first[0].delivery_count, 1);
    let c2 = q.autoclaim(&s, "g", "c2", ZERO, 10, "0-0").await.unwrap();
    assert_eq!(c2.entries.len(), 1);
    assert_eq!(c2.entries[0].id, id);
    assert_eq!(c2.entries[0].delivery_count, 2);
    assert_eq!(val(&c2.entries[0]), "x");
    let c3 = q.autoclaim(&s, "g", "c3", ZERO, 10, "0-0").await.unwrap();
    assert_eq!(c3.entries[0].delivery_count, 3);
    let p = q.pending_summary(&s, "g").await.unwrap();
    assert_eq!(p.consumers, vec![("c3".to_owned(), 1)]);
}

pub async fn autoclaim_respects_min_idle(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    for i in 0..3 {
        q.add(&s, f(&i.to_string()), None).await.unwrap();
    }
    // "dead" consumer takes two, a live one takes one later.
    assert_eq!(
        q.read_group(&s, "g", "dead", 2, ZERO).await.unwrap().len(),
        2
    );
    let min_idle = Duration::from_millis(300);
    let none = q
        .autoclaim(&s, "g", "rescuer", min_idle, 10, "0-0")
        .await
        .unwrap();
    assert!(none.entries.is_empty(), "{none:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Fresh delivery: not idle long enough.
    assert_eq!(
        q.read_group(&s, "g", "live", 1, ZERO).await.unwrap().len(),
        1
    );
    let got = q
        .autoclaim(&s, "g", "rescuer", min_idle, 10, "0-0")
        .await
        .unwrap();
    assert_eq!(got.entries.iter().map(val).collect::<Vec<_>>(), ["0", "1"]);
    assert!(got.entries.iter().all(|e| e.delivery_count == 2));
    assert!(got.deleted.is_empty());
    let p = q.pending_summary(&s, "g").await.unwrap();
    assert_eq!(
        p.consumers,
        vec![("live".to_owned(), 1), ("rescuer".to_owned(), 2)]
    );
}

pub async fn autoclaim_reports_deleted_entries(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    let id = q.add(&s, f("gone"), None).await.unwrap();
    q.add(&s, f("kept"), None).await.unwrap();
    assert_eq!(
        q.read_group(&s, "g", "dead", 2, ZERO).await.unwrap().len(),
        2
    );
    assert_eq!(q.delete(&s, std::slice::from_ref(&id)).await.unwrap(), 1);
    let got = q.autoclaim(&s, "g", "r", ZERO, 10, "0-0").await.unwrap();
    assert_eq!(got.deleted, vec![id]);
    assert_eq!(got.entries.iter().map(val).collect::<Vec<_>>(), ["kept"]);
    assert_eq!(q.pending_summary(&s, "g").await.unwrap().count, 1);
}

pub async fn complete_is_atomic_and_idempotent(q: Q) {
    let k = keys();
    let (input, out_a, out_b) = (k.stream("in"), k.stream("a"), k.stream("b"));
    q.ensure_group(&input, "g").await.unwrap();
    q.add(&input, f("task"), None).await.unwrap();
    let e = q
        .read_group(&input, "g", "slow", 1, ZERO)
        .await
        .unwrap()
        .remove(0);
    // The slow consumer looks dead; another takes the entry over.
    let claimed = q
        .autoclaim(&input, "g", "fast", ZERO, 1, "0-0")
        .await
        .unwrap();
    assert_eq!(claimed.entries[0].id, e.id);
    let inbox = k.inbox("t1", "step1");
    let outputs = vec![(out_a.clone(), f("A")), (out_b.clone(), f("B"))];
    let done = q
        .complete(
            &input,
            "g",
            &e.id,
            &inbox,
            HOUR,
            outputs.clone(),
            Some(1000),
        )
        .await
        .unwrap();
    let Completion::Published { output_ids } = done else {
        panic!("expected Published, got {done:?}");
    };
    assert_eq!(output_ids.len(), 2);
    assert_eq!(
        q.range(&out_a, "-", "+", 0).await.unwrap()[0].id,
        output_ids[0]
    );
    assert_eq!(
        q.range(&out_b, "-", "+", 0).await.unwrap()[0].id,
        output_ids[1]
    );
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 0);
    assert!(q.get(&inbox).await.unwrap().is_some());
    // The slow consumer wakes up and completes the same step: the entry is
    // not its own any more, nothing is written a second time.
    let again = q
        .complete(
            &input,
            "g",
            &e.id,
            &inbox,
            HOUR,
            outputs.clone(),
            Some(1000),
        )
        .await
        .unwrap();
    assert_eq!(again, Completion::NotPending);
    assert_eq!(q.len(&out_a).await.unwrap(), 1);
    assert_eq!(q.len(&out_b).await.unwrap(), 1);
    // A duplicate delivery of the same step (a second entry for it) is
    // acked without publishing.
    q.add(&input, f("task-dup"), None).await.unwrap();
    let dup = q
        .read_group(&input, "g", "c", 1, ZERO)
        .await
        .unwrap()
        .remove(0);
    let r = q
        .complete(&input, "g", &dup.id, &inbox, HOUR, outputs, Some(1000))
        .await
        .unwrap();
    assert_eq!(r, Completion::AlreadyDone);
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 0);
    assert_eq!(q.len(&out_a).await.unwrap(), 1);
    // A step with no outputs still acks and records its inbox.
    q.add(&input, f("sink"), None).await.unwrap();
    let sink = q
        .read_group(&input, "g", "c", 1, ZERO)
        .await
        .unwrap()
        .remove(0);
    let inbox2 = k.inbox("t2", "sink");
    let r = q
        .complete(&input, "g", &sink.id, &inbox2, HOUR, vec![], None)
        .await
        .unwrap();
    assert_eq!(r, Completion::Published { output_ids: vec![] });
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 0);
}

pub async fn complete_failure_changes_nothing(q: Q) {
    let k = keys();
    let (input, good, bad) = (k.stream("in"), k.stream("good"), k.stream("bad"));
    q.ensure_group(&input, "g").await.unwrap();
    q.add(&input, f("x"), None).await.unwrap();
    let e = q
        .read_group(&input, "g", "c", 1, ZERO)
        .await
        .unwrap()
        .remove(0);
    q.set(&bad, Bytes::from("not a stream"), None)
        .await
        .unwrap();
    let inbox = k.inbox("t", "s");
    let err = q
        .complete(
            &input,
            "g",
            &e.id,
            &inbox,
            HOUR,
            vec![(good.clone(), f("1")), (bad.clone(), f("2"))],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::WrongType(ref key) if *key == bad),
        "{err:?}"
    );
    assert_eq!(q.len(&good).await.unwrap(), 0);
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 1);
    assert_eq!(q.get(&inbox).await.unwrap(), None);
}

fn completing(
    k: &Keys,
    id: &str,
    task: &str,
    outputs: Vec<(String, super::Fields)>,
) -> super::Completing {
    super::Completing {
        entry_id: id.to_owned(),
        inbox_key: k.inbox(task, "s"),
        outputs,
        ..super::Completing::default()
    }
}

pub async fn complete_batch_group_commit(q: Q) {
    let k = keys();
    let (input, out) = (k.stream("in"), k.stream("out"));
    q.ensure_group(&input, "g").await.unwrap();
    for v in ["a", "b", "c"] {
        q.add(&input, f(v), None).await.unwrap();
    }
    let e = q.read_group(&input, "g", "c", 10, ZERO).await.unwrap();
    // t2 was completed before; t1 appears twice (a redelivered copy).
    q.set(&k.inbox("t2", "s"), Bytes::from_static(b"x"), None)
        .await
        .unwrap();
    let done = q
        .complete_batch(
            &input,
            "g",
            vec![
                completing(&k, &e[0].id, "t1", vec![(out.clone(), f("A"))]),
                completing(&k, &e[1].id, "t2", vec![(out.clone(), f("B"))]),
                completing(&k, &e[2].id, "t1", vec![(out.clone(), f("A again"))]),
            ],
            HOUR,
            None,
        )
        .await
        .unwrap();
    assert!(matches!(&done[0], Completion::Published { output_ids } if output_ids.len() == 1));
    assert_eq!(
        done[1..],
        [Completion::AlreadyDone, Completion::AlreadyDone]
    );
    let published: Vec<_> = q
        .range(&out, "-", "+", 0)
        .await
        .unwrap()
        .iter()
        .map(val)
        .collect();
    assert_eq!(published, ["A"]);
    assert_eq!(
        q.pending_summary(&input, "g").await.unwrap().count,
        0,
        "all acked"
    );
    assert!(
        q.complete_batch(&input, "g", vec![], HOUR, None)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn complete_batch_expires_what_it_is_told(q: Q) {
    let k = keys();
    let (input, out, log) = (k.stream("in"), k.stream("out"), k.saga("t1"));
    q.ensure_group(&input, "g").await.unwrap();
    q.add(&input, f("a"), None).await.unwrap();
    let e = q.read_group(&input, "g", "c", 1, ZERO).await.unwrap();
    let mut item = completing(
        &k,
        &e[0].id,
        "t1",
        vec![(out.clone(), f("A")), (log.clone(), f("step"))],
    );
    item.expire = vec![log.clone()];
    q.complete_batch(&input, "g", vec![item], Duration::from_millis(300), None)
        .await
        .unwrap();
    assert_eq!(q.len(&log).await.unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    while q.len(&log).await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the saga log never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        q.get(&k.inbox("t1", "s")).await.unwrap(),
        None,
        "with the inbox key"
    );
    assert_eq!(q.len(&out).await.unwrap(), 1, "other outputs stay");
}

pub async fn complete_batch_is_all_or_nothing(q: Q) {
    let k = keys();
    let (input, out, bad) = (k.stream("in"), k.stream("out"), k.stream("bad"));
    q.ensure_group(&input, "g").await.unwrap();
    for v in ["a", "b"] {
        q.add(&input, f(v), None).await.unwrap();
    }
    let e = q.read_group(&input, "g", "c", 10, ZERO).await.unwrap();
    q.set(&bad, Bytes::from("not a stream"), None)
        .await
        .unwrap();
    let err = q
        .complete_batch(
            &input,
            "g",
            vec![
                completing(&k, &e[0].id, "t1", vec![(out.clone(), f("A"))]),
                completing(&k, &e[1].id, "t2", vec![(bad.clone(), f("B"))]),
            ],
            HOUR,
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::WrongType(ref key) if *key == bad),
        "{err:?}"
    );
    assert_eq!(q.len(&out).await.unwrap(), 0);
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 2);
    assert_eq!(q.get(&k.inbox("t1", "s")).await.unwrap(), None);
}

pub async fn dead_letter_is_atomic(q: Q) {
    let k = keys();
    let (input, dlq) = (k.stream("in"), k.dlq());
    q.ensure_group(&input, "g").await.unwrap();
    q.add(&input, f("poison"), None).await.unwrap();
    let e = q
        .read_group(&input, "g", "c", 1, ZERO)
        .await
        .unwrap()
        .remove(0);
    let record = fields([
        ("source_id", e.id.clone()),
        ("reason", "too many deliveries".to_owned()),
    ]);
    let dlq_id = q
        .dead_letter(&input, "g", dl(&e.id, &dlq, record))
        .await
        .unwrap()
        .expect("pending for c");
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 0);
    let listed = q.rev_range(&dlq, "+", "-", 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, dlq_id);
    assert_eq!(
        listed[0].field("source_id"),
        Some(&Bytes::from(e.id.clone()))
    );
    // Failure (DLQ key of the wrong type) leaves the entry pending.
    q.add(&input, f("second"), None).await.unwrap();
    let e2 = q
        .read_group(&input, "g", "c", 1, ZERO)
        .await
        .unwrap()
        .remove(0);
    let bad = k.poison();
    q.set(&bad, Bytes::from("x"), None).await.unwrap();
    let err = q
        .dead_letter(&input, "g", dl(&e2.id, &bad, f("r")))
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::WrongType(_)), "{err:?}");
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 1);
}

/// A join of parts `lookups` and `fraud-scores` of task `t1` into stream
/// `decide-in`, as the engine records them.
fn join_part(k: &Keys, part: &str, value: &str, deadline_ms: u64) -> super::JoinPart {
    super::JoinPart {
        join: join_ref(k),
        part: part.to_owned(),
        value: Bytes::from(value.to_owned()),
        parts: vec!["lookups".into(), "fraud-scores".into()],
        target: k.stream("decide-in"),
        fields: fields([("task_id", "t1"), ("payload", "null"), ("tp", "x")]),
        payload_field: "payload".into(),
        deadline_ms,
    }
}

fn join_ref(k: &Keys) -> super::JoinRef {
    super::JoinRef::new(k, "decide", "t1", HOUR)
}

/// One branch entry of task t1 on `branch`'s input, read and completed
/// with `part`; returns the completion.
async fn complete_branch(q: &Q, k: &Keys, branch: &str, part: super::JoinPart) -> Completion {
    let input = k.stream(branch);
    q.ensure_group(&input, branch).await.unwrap();
    q.add(&input, f(branch), None).await.unwrap();
    let e = q.read_group(&input, branch, "c", 1, ZERO).await.unwrap();
    let item = super::Completing {
        entry_id: e[0].id.clone(),
        inbox_key: k.inbox("t1", branch),
        joins: vec![part],
        ..super::Completing::default()
    };
    q.complete_batch(&input, branch, vec![item], HOUR, Some(100))
        .await
        .unwrap()
        .remove(0)
}

pub async fn join_completes_once_with_every_part(q: Q) {
    let k = keys();
    let target = k.stream("decide-in");
    q.ensure_group(&target, "decide").await.unwrap();
    let first = complete_branch(
        &q,
        &k,
        "lookup",
        join_part(&k, "lookups", r#"{"x":1}"#, 5000),
    )
    .await;
    assert_eq!(first, Completion::Published { output_ids: vec![] });
    assert_eq!(q.len(&target).await.unwrap(), 0, "one part is not a join");
    assert_eq!(
        q.due(&k.join_due("decide"), 5000, 10).await.unwrap(),
        ["t1"]
    );
    assert!(
        q.due(&k.join_due("decide"), 4999, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let last = complete_branch(
        &q,
        &k,
        "fraud",
        join_part(&k, "fraud-scores", r#"{"y":[2]}"#, 9000),
    )
    .await;
    let Completion::Published { output_ids } = last else {
        panic!("{last:?}")
    };
    assert_eq!(output_ids.len(), 1, "the last part writes the joined task");
    let got = q.range(&target, "-", "+", 0).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].field("payload"),
        Some(&Bytes::from(
            r#"{"lookups":{"x":1},"fraud-scores":{"y":[2]}}"#
        ))
    );
    assert_eq!(got[0].field("task_id"), Some(&Bytes::from("t1")));
    assert_eq!(got[0].field("tp"), Some(&Bytes::from("x")));
    assert!(
        q.due(&k.join_due("decide"), u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // A branch done again (say, replayed by hand under a new inbox key)
    // neither joins twice nor changes the recorded part.
    let again = complete_branch(
        &q,
        &k,
        "fraud2",
        join_part(&k, "fraud-scores", r#"{"y":3}"#, 9000),
    )
    .await;
    assert_eq!(again, Completion::Published { output_ids: vec![] });
    assert_eq!(q.len(&target).await.unwrap(), 1);
    let h = q.hgetall(&k.join("decide", "t1")).await.unwrap();
    assert!(
        h.iter()
            .any(|(f, v)| f == "p:fraud-scores" && v == &Bytes::from(r#"{"y":[2]}"#))
    );
}

pub async fn join_waits_for_room_in_its_target(q: Q) {
    let k = keys();
    let target = k.stream("decide-in");
    q.ensure_group(&target, "decide").await.unwrap();
    for i in 0..100 {
        q.add(&target, f(&i.to_string()), None).await.unwrap();
    }
    let first = complete_branch(&q, &k, "lookup", join_part(&k, "lookups", "1", 5000)).await;
    assert!(matches!(first, Completion::Published { .. }), "{first:?}");
    // The last part would write the joined task into a full stream:
    // refused whole, the part not recorded, the entry still pending.
    let full = complete_branch(&q, &k, "fraud", join_part(&k, "fraud-scores", "2", 5000)).await;
    assert_eq!(
        full,
        Completion::Full {
            stream: target.clone()
        }
    );
    let h = q.hgetall(&k.join("decide", "t1")).await.unwrap();
    assert!(!h.iter().any(|(f, _)| f == "p:fraud-scores"), "{h:?}");
    assert_eq!(
        q.pending_summary(&k.stream("fraud"), "fraud")
            .await
            .unwrap()
            .count,
        1
    );
}

pub async fn join_fails_with_a_dead_branch_and_reopens_on_replay(q: Q) {
    let k = keys();
    let target = k.stream("decide-in");
    q.ensure_group(&target, "decide").await.unwrap();
    let (dlq, fraud) = (k.dlq(), k.stream("fraud"));
    complete_branch(&q, &k, "lookup", join_part(&k, "lookups", "1", 5000)).await;
    // The fraud branch dies: the join fails in the same step.
    q.ensure_group(&fraud, "fraud").await.unwrap();
    q.add(&fraud, f("task"), None).await.unwrap();
    let e = q.read_group(&fraud, "fraud", "c", 1, ZERO).await.unwrap();
    let mut d = dl(&e[0].id, &dlq, f("record"));
    d.fail_joins = vec![(join_ref(&k), "fraud".into())];
    let dlq_id = q.dead_letter(&fraud, "fraud", d).await.unwrap().unwrap();
    assert!(
        q.due(&k.join_due("decide"), u64::MAX, 10)
            .await
            .unwrap()
            .is_empty(),
        "a failed join does not time out"
    );
    // A replay of the dead branch reopens the join (and schedules it again).
    let moved = q
        .transfer(super::Transfer {
            from: dlq.clone(),
            id: dlq_id,
            to: fraud.clone(),
            fields: f("task"),
            reopen_joins: vec![(join_ref(&k), "fraud".into(), 7000)],
            ..super::Transfer::default()
        })
        .await
        .unwrap();
    assert!(moved.is_some());
    assert_eq!(
        q.due(&k.join_due("decide"), 7000, 10).await.unwrap(),
        ["t1"]
    );
    let last = complete_branch(
        &q,
        &k,
        "fraud-again",
        join_part(&k, "fraud-scores", "2", 9000),
    )
    .await;
    let Completion::Published { output_ids } = last else {
        panic!("{last:?}")
    };
    assert_eq!(output_ids.len(), 1, "the reopened join completes");
    assert_eq!(q.len(&target).await.unwrap(), 1);

    // Without a replay, a failed join never completes.
    let k2 = keys();
    let t2 = k2.stream("decide-in");
    q.ensure_group(&t2, "decide").await.unwrap();
    let f2 = k2.stream("fraud");
    q.ensure_group(&f2, "fraud").await.unwrap();
    q.add(&f2, f("task"), None).await.unwrap();
    let e = q.read_group(&f2, "fraud", "c", 1, ZERO).await.unwrap();
    let mut d = dl(&e[0].id, &k2.dlq(), f("record"));
    d.fail_joins = vec![(join_ref(&k2), "fraud".into())];
    q.dead_letter(&f2, "fraud", d).await.unwrap().unwrap();
    complete_branch(&q, &k2, "lookup", join_part(&k2, "lookups", "1", 5000)).await;
    assert_eq!(q.len(&t2).await.unwrap(), 0);
    assert!(
        q.due(&k2.join_due("decide"), u64::MAX, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn join_times_out_once(q: Q) {
    let k = keys();
    let target = k.stream("decide-in");
    q.ensure_group(&target, "decide").await.unwrap();
    complete_branch(&q, &k, "lookup", join_part(&k, "lookups", "1", 5000)).await;
    let dead = |parts: u64, now: u64| {
        let q = q.clone();
        let k = k.clone();
        async move {
            let d = super::DeadLetter {
                dlq: k.dlq(),
                record: f("join-timeout"),
                marker: Some((k.task_dlq("t1"), Bytes::from("join-timeout"))),
                marker_ttl: HOUR,
                also: vec![(k.stream("comp"), f("undo"))],
                ..super::DeadLetter::default()
            };
            q.expire_join(join_ref(&k), now, parts, d).await.unwrap()
        }
    };
    assert_eq!(
        dead(1, 4999).await,
        super::JoinExpiry::Settled,
        "not due yet"
    );
    assert_eq!(
        dead(0, 5000).await,
        super::JoinExpiry::Changed,
        "parts read are stale"
    );
    assert_eq!(q.len(&k.dlq()).await.unwrap(), 0);
    assert!(matches!(
        dead(1, 5000).await,
        super::JoinExpiry::DeadLettered(_)
    ));
    assert_eq!(q.len(&k.dlq()).await.unwrap(), 1);
    assert_eq!(q.len(&k.stream("comp")).await.unwrap(), 1);
    assert_eq!(
        q.get(&k.task_dlq("t1")).await.unwrap(),
        Some(Bytes::from("join-timeout"))
    );
    assert_eq!(dead(1, 9000).await, super::JoinExpiry::Settled, "once");
    assert_eq!(q.len(&k.dlq()).await.unwrap(), 1);
    // The late part finds the join failed: no joined task.
    complete_branch(&q, &k, "fraud", join_part(&k, "fraud-scores", "2", 5000)).await;
    assert_eq!(q.len(&target).await.unwrap(), 0);
    // A completed join never times out.
    let k2 = keys();
    q.ensure_group(&k2.stream("decide-in"), "decide")
        .await
        .unwrap();
    complete_branch(&q, &k2, "lookup", join_part(&k2, "lookups", "1", 5000)).await;
    complete_branch(&q, &k2, "fraud", join_part(&k2, "fraud-scores", "2", 5000)).await;
    let d = super::DeadLetter {
        dlq: k2.dlq(),
        record: f("x"),
        ..super::DeadLetter::default()
    };
    assert_eq!(
        q.expire_join(join_ref(&k2), 9000, 2, d).await.unwrap(),
        super::JoinExpiry::Settled
    );
    assert_eq!(q.len(&k2.dlq()).await.unwrap(), 0);
}

fn dl(id: &str, dlq: &str, record: super::Fields) -> super::DeadLetter {
    super::DeadLetter {
        entry_id: id.to_owned(),
        dlq: dlq.to_owned(),
        record,
        ..super::DeadLetter::default()
    }
}

pub async fn submit_idempotent_dedups(q: Q) {
    let k = keys();
    let s = k.stream("intake");
    let key = k.idem("order-1");
    let a = q
        .submit_idempotent(&key, HOUR, &s, f("payload"), Some(100))
        .await
        .unwrap();
    assert!(a.created());
    let b = q
        .submit_idempotent(&key, HOUR, &s, f("payload"), Some(100))
        .await
        .unwrap();
    assert!(!b.created());
    assert_eq!(a.task_id, b.task_id);
    assert_eq!(q.len(&s).await.unwrap(), 1);
    let entry = q.range(&s, "-", "+", 0).await.unwrap().remove(0);
    assert_eq!(Some(entry.id.clone()), a.entry_id);
    assert_eq!(entry.fields[0].0, "task_id");
    assert_eq!(
        entry.field("task_id"),
        Some(&Bytes::from(a.task_id.clone()))
    );
    assert_eq!(val(&entry), "payload");
    let c = q
        .submit_idempotent(&k.idem("order-2"), HOUR, &s, f("p2"), None)
        .await
        .unwrap();
    assert!(c.created());
    assert_ne!(c.task_id, a.task_id);
    assert_eq!(q.len(&s).await.unwrap(), 2);
}

fn sub(k: &Keys, key: Option<&str>, id: &str, v: &str) -> super::Submission {
    super::Submission {
        idem_key: key.map(|key| k.idem(key)),
        fingerprint: None,
        task_id: id.into(),
        fields: f(v),
    }
}

pub async fn submit_batch_in_order_and_dedups(q: Q) {
    let k = keys();
    let s = k.stream("intake");
    let before = q
        .submit_idempotent(&k.idem("old"), HOUR, &s, f("old"), None)
        .await
        .unwrap();
    let done = q
        .submit_batch(
            &s,
            HOUR,
            vec![
                sub(&k, None, "t1", "a"),
                sub(&k, Some("k2"), "t2", "b"),
                sub(&k, Some("old"), "t3", "c"),
                sub(&k, Some("k2"), "t4", "d"),
                sub(&k, None, "t5", "e"),
            ],
            Some(1000),
        )
        .await
        .unwrap();
    let ids: Vec<_> = done.iter().map(|d| d.task_id.as_str()).collect();
    assert_eq!(ids, ["t1", "t2", before.task_id.as_str(), "t2", "t5"]);
    let created: Vec<_> = done.iter().map(|d| d.created()).collect();
    assert_eq!(created, [true, true, false, false, true]);
    // Stream order is submission order; duplicates added nothing.
    let entries = q.range(&s, "-", "+", 0).await.unwrap();
    let vals: Vec<_> = entries.iter().map(val).collect();
    assert_eq!(vals, ["old", "a", "b", "e"]);
    assert_eq!(entries[1].fields[0].0, "task_id");
    assert_eq!(Some(entries[2].id.clone()), done[1].entry_id);
    assert_eq!(
        q.get(&k.idem("k2")).await.unwrap(),
        Some(Bytes::from_static(b"t2"))
    );
    // A resent batch creates nothing for its keyed tasks.
    let again = q
        .submit_batch(&s, HOUR, vec![sub(&k, Some("k2"), "t9", "b")], None)
        .await
        .unwrap();
    assert_eq!(
        (again[0].task_id.as_str(), again[0].created()),
        ("t2", false)
    );
    assert!(
        q.submit_batch(&s, HOUR, vec![], None)
            .await
            .unwrap()
            .is_empty()
    );
}

pub async fn submit_batch_is_all_or_nothing(q: Q) {
    let k = keys();
    let s = k.stream("intake");
    // The fourth key holds a hash: the whole batch fails, nothing is written.
    let bad = k.idem("bad");
    q.hset(&bad, f("x")).await.unwrap();
    let err = q
        .submit_batch(
            &s,
            HOUR,
            vec![
                sub(&k, Some("a"), "t1", "a"),
                sub(&k, None, "t2", "b"),
                sub(&k, Some("c"), "t3", "c"),
                sub(&k, Some("bad"), "t4", "d"),
            ],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::WrongType(ref key) if key == &bad),
        "{err:?}"
    );
    assert_eq!(q.len(&s).await.unwrap(), 0);
    assert_eq!(q.get(&k.idem("a")).await.unwrap(), None);
    assert_eq!(q.get(&k.idem("c")).await.unwrap(), None);
    // The same for a stream name that is not a stream.
    let not_stream = k.stream("kv");
    q.set(&not_stream, Bytes::from_static(b"v"), None)
        .await
        .unwrap();
    let err = q
        .submit_batch(&not_stream, HOUR, vec![sub(&k, Some("a"), "t1", "a")], None)
        .await
        .unwrap_err();
    assert!(matches!(err, QueueError::WrongType(_)), "{err:?}");
    assert_eq!(q.get(&k.idem("a")).await.unwrap(), None);
}

pub async fn concurrent_submits_create_one_task(q: Q) {
    let k = keys();
    let s = k.stream("intake");
    let key = k.idem("same");
    let mut handles = Vec::new();
    for _ in 0..8 {
        let (q, s, key) = (q.clone(), s.clone(), key.clone());
        handles.push(tokio::spawn(async move {
            q.submit_idempotent(&key, HOUR, &s, f("p"), None)
                .await
                .unwrap()
        }));
    }
    let mut ids = Vec::new();
    for h in handles {
        ids.push(h.await.unwrap());
    }
    assert_eq!(ids.iter().filter(|s| s.created()).count(), 1);
    assert!(ids.iter().all(|s| s.task_id == ids[0].task_id));
    assert_eq!(q.len(&s).await.unwrap(), 1);
}

pub async fn limit_refuses_and_never_drops_unacked(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    for i in 0..10 {
        q.add(&s, f(&i.to_string()), Some(10)).await.unwrap();
    }
    // Full: refused, nothing written, nothing trimmed (no group acked yet).
    let err = q.add(&s, f("10"), Some(10)).await.unwrap_err();
    assert!(
        matches!(
            err,
            QueueError::Full {
                backlog: 10,
                limit: 10,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(q.len(&s).await.unwrap(), 10);
    // Read 5, ack 3: exactly 3 entries are finished for every group.
    let got = q.read_group(&s, "g", "c", 5, ZERO).await.unwrap();
    let acked: Vec<String> = got[..3].iter().map(|e| e.id.clone()).collect();
    q.ack(&s, "g", &acked).await.unwrap();
    for i in 10..13 {
        q.add(&s, f(&i.to_string()), Some(10)).await.unwrap();
    }
    assert!(matches!(
        q.add(&s, f("13"), Some(10)).await,
        Err(QueueError::Full { .. })
    ));
    // Every entry not acked is still there, in order.
    let left: Vec<String> = q
        .range(&s, "-", "+", 0)
        .await
        .unwrap()
        .iter()
        .map(val)
        .collect();
    assert_eq!(left, (3..13).map(|i| i.to_string()).collect::<Vec<_>>());
    // A second group that has read nothing holds everything it has not read.
    let s2 = k.stream("two-groups");
    q.ensure_group(&s2, "a").await.unwrap();
    q.ensure_group(&s2, "b").await.unwrap();
    for i in 0..4 {
        q.add(&s2, f(&i.to_string()), Some(4)).await.unwrap();
    }
    let all: Vec<String> = q
        .read_group(&s2, "a", "c", 0, ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    q.ack(&s2, "a", &all).await.unwrap();
    assert!(matches!(
        q.add(&s2, f("4"), Some(4)).await,
        Err(QueueError::Full { .. })
    ));
    assert_eq!(
        q.read_group(&s2, "b", "c", 0, ZERO).await.unwrap().len(),
        4,
        "group b still gets every entry"
    );
    // A stream no group reads (the end of a graph) is capped, newest kept.
    let s3 = k.stream("no-group");
    let mut last = String::new();
    for i in 0..60 {
        last = q.add(&s3, f(&i.to_string()), Some(10)).await.unwrap();
    }
    assert_eq!(q.len(&s3).await.unwrap(), 10);
    let newest = q.rev_range(&s3, "+", "-", 1).await.unwrap();
    assert_eq!(
        (newest[0].id.as_str(), val(&newest[0]).as_str()),
        (last.as_str(), "59")
    );
    // Without a limit nothing is refused or trimmed.
    for i in 0..150 {
        q.add(&s3, f(&i.to_string()), None).await.unwrap();
    }
    assert_eq!(q.len(&s3).await.unwrap(), 160);
}

pub async fn trim_acked_removes_only_what_every_group_acked(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "a").await.unwrap();
    q.ensure_group(&s, "b").await.unwrap();
    for i in 0..10 {
        q.add(&s, f(&i.to_string()), None).await.unwrap();
    }
    let a: Vec<String> = q
        .read_group(&s, "a", "c", 0, ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    q.ack(&s, "a", &a).await.unwrap();
    let b: Vec<String> = q
        .read_group(&s, "b", "c", 6, ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    // b acked 0..=2 and 4, holds 3 and 5, has not read 6..=9.
    q.ack(
        &s,
        "b",
        &[b[0].clone(), b[1].clone(), b[2].clone(), b[4].clone()],
    )
    .await
    .unwrap();
    assert_eq!(q.trim_acked(&s).await.unwrap(), 3);
    let left: Vec<String> = q
        .range(&s, "-", "+", 0)
        .await
        .unwrap()
        .iter()
        .map(val)
        .collect();
    assert_eq!(left, ["3", "4", "5", "6", "7", "8", "9"]);
    assert_eq!(q.trim_acked(&k.stream("missing")).await.unwrap(), 0);
}

pub async fn submit_batch_respects_the_limit(q: Q) {
    let k = keys();
    let s = k.stream("intake");
    q.ensure_group(&s, "g").await.unwrap();
    let items = |from: usize, n: usize| -> Vec<super::Submission> {
        (from..from + n)
            .map(|i| sub(&k, Some(&format!("k{i}")), &format!("t{i}"), "p"))
            .collect()
    };
    q.submit_batch(&s, HOUR, items(0, 8), Some(10))
        .await
        .unwrap();
    // 3 new ones do not fit: the whole batch is refused, nothing written.
    let err = q
        .submit_batch(&s, HOUR, items(8, 3), Some(10))
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::Full { backlog: 8, .. }),
        "{err:?}"
    );
    assert_eq!(q.len(&s).await.unwrap(), 8);
    assert_eq!(q.get(&k.idem("k8")).await.unwrap(), None);
    // Resending already-applied tasks adds nothing, so it is not refused.
    let again = q
        .submit_batch(&s, HOUR, items(0, 8), Some(8))
        .await
        .unwrap();
    assert!(again.iter().all(|d| !d.created()));
}

pub async fn submit_fingerprint_conflict(q: Q) {
    let k = keys();
    let s = k.stream("intake");
    let with = |key: &str, fp: &str, id: &str| super::Submission {
        fingerprint: Some(fp.into()),
        ..sub(&k, Some(key), id, "p")
    };
    let a = q
        .submit_batch(&s, HOUR, vec![with("k", "aaa", "t1")], None)
        .await
        .unwrap();
    assert!(a[0].created());
    let same = q
        .submit_batch(&s, HOUR, vec![with("k", "aaa", "t2")], None)
        .await
        .unwrap();
    assert_eq!((same[0].task_id.as_str(), same[0].created()), ("t1", false));
    let err = q
        .submit_batch(
            &s,
            HOUR,
            vec![with("new", "x", "t3"), with("k", "bbb", "t4")],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::Conflict { index: 1, ref task_id } if task_id == "t1"),
        "{err:?}"
    );
    assert_eq!(q.len(&s).await.unwrap(), 1, "nothing of the batch written");
    assert_eq!(q.get(&k.idem("new")).await.unwrap(), None);
    // Within one batch, too.
    let err = q
        .submit_batch(
            &s,
            HOUR,
            vec![with("n2", "x", "t5"), with("n2", "y", "t6")],
            None,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, QueueError::Conflict { index: 1, .. }),
        "{err:?}"
    );
}

pub async fn complete_waits_for_room_downstream(q: Q) {
    let k = keys();
    let (input, out) = (k.stream("in"), k.stream("out"));
    q.ensure_group(&input, "g").await.unwrap();
    q.ensure_group(&out, "next").await.unwrap();
    q.add(&input, f("task"), None).await.unwrap();
    q.add(&out, f("backlog"), None).await.unwrap();
    let e = q.read_group(&input, "g", "c", 1, ZERO).await.unwrap();
    let item = completing(&k, &e[0].id, "t1", vec![(out.clone(), f("A"))]);
    let done = q
        .complete_batch(&input, "g", vec![item.clone()], HOUR, Some(1))
        .await
        .unwrap();
    assert_eq!(
        done,
        [Completion::Full {
            stream: out.clone()
        }]
    );
    assert_eq!(q.len(&out).await.unwrap(), 1);
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 1);
    assert_eq!(q.get(&k.inbox("t1", "s")).await.unwrap(), None);
    // The next agent finishes its entry: now there is room.
    let o = q.read_group(&out, "next", "c", 1, ZERO).await.unwrap();
    q.ack(&out, "next", &[o[0].id.clone()]).await.unwrap();
    let done = q
        .complete_batch(&input, "g", vec![item], HOUR, Some(1))
        .await
        .unwrap();
    assert!(matches!(&done[0], Completion::Published { .. }), "{done:?}");
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 0);
}

pub async fn complete_and_dead_letter_exclude_each_other(q: Q) {
    let k = keys();
    let (input, out, dlq) = (k.stream("in"), k.stream("out"), k.dlq());
    q.ensure_group(&input, "g").await.unwrap();
    q.add(&input, f("a"), None).await.unwrap();
    let e = q.read_group(&input, "g", "slow", 1, ZERO).await.unwrap();
    let id = e[0].id.clone();
    // A peer claims it (the slow engine looked dead) and dead-letters it.
    q.autoclaim(&input, "g", "peer", ZERO, 10, "0-0")
        .await
        .unwrap();
    let moved = q
        .dead_letter(&input, "g", dl(&id, &dlq, f("dead")))
        .await
        .unwrap();
    assert!(moved.is_some());
    // The slow engine completes it after all: nothing is written.
    let late = q
        .complete_batch(
            &input,
            "g",
            vec![completing(&k, &id, "t1", vec![(out.clone(), f("A"))])],
            HOUR,
            None,
        )
        .await
        .unwrap();
    assert_eq!(late, [Completion::NotPending]);
    assert_eq!(q.len(&out).await.unwrap(), 0);
    assert_eq!(q.get(&k.inbox("t1", "s")).await.unwrap(), None);
    // A resent dead-lettering (its reply was lost) writes no second record.
    let again = q
        .dead_letter(&input, "g", dl(&id, &dlq, f("dead")))
        .await
        .unwrap();
    assert_eq!(again, None);
    assert_eq!(q.len(&dlq).await.unwrap(), 1);
    // The other order: completed first, then a late dead-lettering.
    q.add(&input, f("b"), None).await.unwrap();
    let e = q.read_group(&input, "g", "c", 1, ZERO).await.unwrap();
    let done = q
        .complete_batch(
            &input,
            "g",
            vec![completing(&k, &e[0].id, "t2", vec![])],
            HOUR,
            None,
        )
        .await
        .unwrap();
    assert!(matches!(done[0], Completion::Published { .. }));
    let late = q
        .dead_letter(&input, "g", dl(&e[0].id, &dlq, f("dead")))
        .await
        .unwrap();
    assert_eq!(late, None);
    assert_eq!(q.len(&dlq).await.unwrap(), 1);
    // `only_if_done` acks only when the inbox key exists.
    q.add(&input, f("c"), None).await.unwrap();
    let e = q.read_group(&input, "g", "c", 1, ZERO).await.unwrap();
    let mut probe = completing(&k, &e[0].id, "t3", vec![(out.clone(), f("X"))]);
    probe.only_if_done = true;
    let r = q
        .complete_batch(&input, "g", vec![probe.clone()], HOUR, None)
        .await
        .unwrap();
    assert_eq!(r, [Completion::NotDone]);
    assert_eq!(q.pending_summary(&input, "g").await.unwrap().count, 1);
    q.set(&k.inbox("t3", "s"), Bytes::from("x"), None)
        .await
        .unwrap();
    let r = q
        .complete_batch(&input, "g", vec![probe], HOUR, None)
        .await
        .unwrap();
    assert_eq!(r, [Completion::AlreadyDone]);
    assert_eq!(q.len(&out).await.unwrap(), 0);
}

pub async fn dead_letter_writes_what_goes_with_it(q: Q) {
    let k = keys();
    let (input, comp, dlq) = (k.stream("in"), k.stream("comp"), k.dlq());
    q.ensure_group(&input, "g").await.unwrap();
    q.add(&input, f("a"), None).await.unwrap();
    let e = q.read_group(&input, "g", "c", 1, ZERO).await.unwrap();
    let mut d = dl(&e[0].id, &dlq, f("dead"));
    d.also = vec![(comp.clone(), f("undo"))];
    d.marker = Some((k.task_dlq("t1"), Bytes::from("permanent")));
    d.marker_ttl = HOUR;
    d.schedule = Some((k.dlq_due(), 1234));
    let id = q.dead_letter(&input, "g", d).await.unwrap().unwrap();
    assert_eq!(q.len(&comp).await.unwrap(), 1);
    assert_eq!(
        q.get(&k.task_dlq("t1")).await.unwrap(),
        Some(Bytes::from("permanent"))
    );
    assert!(q.due(&k.dlq_due(), 1233, 10).await.unwrap().is_empty());
    assert_eq!(
        q.due(&k.dlq_due(), 1234, 10).await.unwrap(),
        std::slice::from_ref(&id)
    );
    // Replay: the marker and the schedule go with the move.
    let back = q
        .transfer(super::Transfer {
            from: dlq.clone(),
            id: id.clone(),
            to: input.clone(),
            fields: f("again"),
            limit: None,
            also: vec![],
            del: vec![k.task_dlq("t1")],
            unschedule: Some((k.dlq_due(), id.clone())),
            reopen_joins: vec![],
        })
        .await
        .unwrap();
    assert!(back.is_some());
    assert_eq!(q.get(&k.task_dlq("t1")).await.unwrap(), None);
    assert!(q.due(&k.dlq_due(), u64::MAX, 10).await.unwrap().is_empty());
    q.schedule(&k.dlq_due(), "x", 5).await.unwrap();
    q.schedule(&k.dlq_due(), "y", 3).await.unwrap();
    assert_eq!(q.due(&k.dlq_due(), 10, 10).await.unwrap(), ["y", "x"]);
    q.unschedule(&k.dlq_due(), "y").await.unwrap();
    assert_eq!(q.due(&k.dlq_due(), 10, 10).await.unwrap(), ["x"]);
}

pub async fn autoclaim_cursor_reaches_entries_behind_live_ones(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    for i in 0..1200 {
        q.add(&s, f(&i.to_string()), None).await.unwrap();
    }
    // The first 700 are held by a live engine, the last 500 by a dead one.
    let live: Vec<String> = q
        .read_group(&s, "g", "live", 700, ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    let dead = q.read_group(&s, "g", "dead", 500, ZERO).await.unwrap();
    assert_eq!((live.len(), dead.len()), (700, 500));
    let min_idle = Duration::from_millis(300);
    // Establish idle time (this is the condition under test, not a wait).
    tokio::time::sleep(min_idle + Duration::from_millis(50)).await;
    let still = q.touch(&s, "g", "live", &live).await.unwrap();
    assert_eq!(still.len(), 700, "touch keeps the live engine's entries");
    // From 0-0 every call scans only live entries: nothing comes back.
    let first = q
        .autoclaim(&s, "g", "rescuer", min_idle, 10, "0-0")
        .await
        .unwrap();
    assert!(first.entries.is_empty(), "{}", first.entries.len());
    assert_ne!(first.next, "0-0");
    // Following the cursor reaches every dead entry.
    let mut cursor = first.next;
    let mut claimed = 0;
    for _ in 0..200 {
        let c = q
            .autoclaim(&s, "g", "rescuer", min_idle, 10, &cursor)
            .await
            .unwrap();
        claimed += c.entries.len();
        cursor = c.next;
        if cursor == "0-0" {
            break;
        }
    }
    assert_eq!(claimed, 500);
    let p = q.pending_summary(&s, "g").await.unwrap();
    assert_eq!(
        p.consumers,
        vec![("live".to_owned(), 700), ("rescuer".to_owned(), 500)]
    );
    // Touching does not count a delivery and does not steal.
    assert!(q.touch(&s, "g", "other", &live).await.unwrap().is_empty());
    let again = q.claim(&s, "g", "live", &live[..1]).await.unwrap();
    assert_eq!(again[0].delivery_count, 2);
    // An engine with nothing pending can be removed; one holding entries not.
    assert!(!q.remove_consumer(&s, "g", "live").await.unwrap());
    assert!(q.remove_consumer(&s, "g", "dead").await.unwrap());
    let names: Vec<String> = q
        .consumers(&s, "g")
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.name)
        .collect();
    assert_eq!(names, ["live", "rescuer"]);
}

pub async fn trim_older_drops_by_time(q: Q) {
    let k = keys();
    let s = k.dlq();
    let old = q.add(&s, f("old"), None).await.unwrap();
    let cut = super::EntryId::parse(&old).unwrap().ms + 1;
    while super::EntryId::parse(&q.add(&s, f("new"), None).await.unwrap())
        .unwrap()
        .ms
        < cut
    {
        tokio::task::yield_now().await;
    }
    let older = q
        .range(&s, "-", &format!("{}", cut - 1), 0)
        .await
        .unwrap()
        .len() as u64;
    assert!(older >= 1);
    assert_eq!(q.trim_older(&s, cut).await.unwrap(), older);
    assert!(!q.range(&s, "-", "+", 0).await.unwrap().is_empty());
    let left = q.range(&s, "-", "+", 0).await.unwrap();
    assert!(left.iter().all(|e| val(e) == "new"));
}

pub async fn range_rev_range_delete(q: Q) {
    let k = keys();
    let s = k.stream("in");
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(q.add(&s, f(&i.to_string()), None).await.unwrap());
    }
    let first2 = q.range(&s, "-", "+", 2).await.unwrap();
    assert_eq!(first2.iter().map(val).collect::<Vec<_>>(), ["0", "1"]);
    assert!(first2.iter().all(|e| e.delivery_count == 0));
    let mid = q.range(&s, &ids[1], &ids[3], 0).await.unwrap();
    assert_eq!(mid.iter().map(val).collect::<Vec<_>>(), ["1", "2", "3"]);
    let last2 = q.rev_range(&s, "+", "-", 2).await.unwrap();
    assert_eq!(last2.iter().map(val).collect::<Vec<_>>(), ["4", "3"]);
    let rev_mid = q.rev_range(&s, &ids[3], &ids[1], 0).await.unwrap();
    assert_eq!(rev_mid.iter().map(val).collect::<Vec<_>>(), ["3", "2", "1"]);
    // Paging with exclusive bounds, as the DLQ readers do.
    let mut paged = Vec::new();
    let mut from = "-".to_owned();
    loop {
        let page = q.range(&s, &from, "+", 2).await.unwrap();
        let Some(last) = page.last() else { break };
        from = format!("({}", last.id);
        paged.extend(page.iter().map(val));
    }
    assert_eq!(paged, ["0", "1", "2", "3", "4"]);
    let before = q
        .rev_range(&s, &format!("({}", ids[3]), "-", 0)
        .await
        .unwrap();
    assert_eq!(before.iter().map(val).collect::<Vec<_>>(), ["2", "1", "0"]);
    assert_eq!(q.delete(&s, &ids[..2]).await.unwrap(), 2);
    assert_eq!(q.delete(&s, &ids[..2]).await.unwrap(), 0);
    assert_eq!(q.len(&s).await.unwrap(), 3);
    assert!(
        q.range(&k.stream("missing"), "-", "+", 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(q.len(&k.stream("missing")).await.unwrap(), 0);
    let err = q.ack(&s, "g", &["garbage".to_owned()]).await.unwrap_err();
    assert!(matches!(err, QueueError::Invalid(_)), "{err:?}");
}

pub async fn blocking_read_wakes_on_add(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    // A timed-out block returns empty after about the block time.
    let t0 = Instant::now();
    let none = q
        .read_group(&s, "g", "c", 1, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "{:?}",
        t0.elapsed()
    );
    let reader = {
        let (q, s) = (q.clone(), s.clone());
        tokio::spawn(async move { q.read_group(&s, "g", "c", 1, Duration::from_secs(10)).await })
    };
    // While the reader blocks, other commands on the same queue still run
    // promptly (the blocked read must not hold up the shared connection).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t1 = Instant::now();
    for _ in 0..5 {
        q.len(&s).await.unwrap();
    }
    assert!(t1.elapsed() < Duration::from_secs(2), "{:?}", t1.elapsed());
    let t2 = Instant::now();
    q.add(&s, f("wake"), None).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("reader woke")
        .unwrap()
        .unwrap();
    assert_eq!(got.iter().map(val).collect::<Vec<_>>(), ["wake"]);
    assert!(t2.elapsed() < Duration::from_secs(3), "{:?}", t2.elapsed());
}

pub async fn ttl_expiry(q: Q) {
    let k = keys();
    let key = k.fault("flaky", 0);
    q.set(&key, Bytes::from("on"), Some(Duration::from_millis(200)))
        .await
        .unwrap();
    q.set(&k.killswitch(), Bytes::from("off"), None)
        .await
        .unwrap();
    assert_eq!(q.get(&key).await.unwrap(), Some(Bytes::from("on")));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(q.get(&key).await.unwrap(), None);
    assert_eq!(
        q.get(&k.killswitch()).await.unwrap(),
        Some(Bytes::from("off"))
    );
    // Idempotency keys expire too: the same key then makes a new task.
    let s = k.stream("intake");
    let idem = k.idem("x");
    let a = q
        .submit_idempotent(&idem, Duration::from_millis(200), &s, f("p"), None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let b = q
        .submit_idempotent(&idem, HOUR, &s, f("p"), None)
        .await
        .unwrap();
    assert!(b.created());
    assert_ne!(a.task_id, b.task_id);
}

pub async fn kv_helpers(q: Q) {
    let k = keys();
    assert_eq!(q.incr(&k.stats("e1"), 2).await.unwrap(), 2);
    assert_eq!(q.incr(&k.stats("e1"), 3).await.unwrap(), 5);
    assert_eq!(q.incr(&k.stats("e2"), -1).await.unwrap(), -1);
    let t = k.task("t1");
    q.hset(&t, fields([("status", "running"), ("step", "plan")]))
        .await
        .unwrap();
    q.hset(&t, fields([("status", "done")])).await.unwrap();
    assert_eq!(
        q.hgetall(&t).await.unwrap(),
        fields([("status", "done"), ("step", "plan")])
    );
    assert!(q.hgetall(&k.task("none")).await.unwrap().is_empty());
    assert_eq!(
        q.scan_prefix(&k.stats_prefix()).await.unwrap(),
        vec![k.stats("e1"), k.stats("e2")]
    );
    q.set(&k.checkpoint("a"), Bytes::from("{}"), None)
        .await
        .unwrap();
    assert_eq!(
        q.del(&[k.checkpoint("a"), k.checkpoint("none")])
            .await
            .unwrap(),
        1
    );
    assert_eq!(q.get(&k.checkpoint("a")).await.unwrap(), None);
    let err = q.incr(&t, 1).await.unwrap_err();
    assert!(matches!(err, QueueError::WrongType(_)), "{err:?}");
}

async fn next(sub: &mut super::Subscription) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .expect("message in time")
}

pub async fn pubsub(q: Q) {
    let k = keys();
    let chan = k.killswitch_channel();
    let mut sub = q.subscribe(&chan).await.unwrap();
    assert_eq!(
        q.publish(&k.stats("nobody"), Bytes::from("x"))
            .await
            .unwrap(),
        0
    );
    let n = q.publish(&chan, Bytes::from("stop")).await.unwrap();
    assert_eq!(n, 1);
    q.publish(&chan, Bytes::from("resume")).await.unwrap();
    assert_eq!(next(&mut sub).await, Some(Bytes::from("stop")));
    assert_eq!(next(&mut sub).await, Some(Bytes::from("resume")));
}

fn memory_queue() -> Q {
    Arc::new(MemoryQueue::new())
}

pub async fn claim_by_id(q: Q) {
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    let a = q.add(&s, f("a"), None).await.unwrap();
    let b = q.add(&s, f("b"), None).await.unwrap();
    let gone = q.add(&s, f("gone"), None).await.unwrap();
    let never = q.add(&s, f("never"), None).await.unwrap();
    assert_eq!(q.read_group(&s, "g", "c1", 3, ZERO).await.unwrap().len(), 3);
    q.ack(&s, "g", std::slice::from_ref(&b)).await.unwrap();
    q.delete(&s, std::slice::from_ref(&gone)).await.unwrap();
    // a: pending -> claimed; b: acked -> skipped; gone: deleted -> skipped
    // and dropped from the pending list; never: never delivered -> skipped.
    let ids = vec![a.clone(), b.clone(), gone.clone(), never.clone()];
    let got = q.claim(&s, "g", "c2", &ids).await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].id, a);
    assert_eq!(val(&got[0]), "a");
    assert_eq!(got[0].delivery_count, 2);
    let again = q
        .claim(&s, "g", "c2", std::slice::from_ref(&a))
        .await
        .unwrap();
    assert_eq!(again[0].delivery_count, 3);
    let p = q.pending_summary(&s, "g").await.unwrap();
    assert_eq!(p.count, 1);
    assert_eq!(p.consumers, vec![("c2".to_owned(), 1)]);
    // Claiming resets the idle time: an autoclaim with a long min idle skips it.
    let none = q.autoclaim(&s, "g", "c3", HOUR, 10, "0-0").await.unwrap();
    assert!(none.entries.is_empty());
    assert!(q.claim(&s, "g", "c2", &["bad".to_owned()]).await.is_err());
}

pub async fn transfer_moves_once(q: Q) {
    let k = keys();
    let (dlq, src) = (k.dlq(), k.stream("src"));
    let id = q.add(&dlq, f("dead"), None).await.unwrap();
    let kept = q.add(&dlq, f("other"), None).await.unwrap();
    let mv = |id: &str, to: &str, v: &str| super::Transfer {
        from: dlq.clone(),
        id: id.to_owned(),
        to: to.to_owned(),
        fields: f(v),
        ..super::Transfer::default()
    };
    let moved = q.transfer(mv(&id, &src, "replayed")).await.unwrap();
    let new_id = moved.expect("entry existed, so it moves");
    let in_src = q.range(&src, "-", "+", 0).await.unwrap();
    assert_eq!(in_src.len(), 1);
    assert_eq!(in_src[0].id, new_id);
    assert_eq!(val(&in_src[0]), "replayed");
    let left = q.range(&dlq, "-", "+", 0).await.unwrap();
    assert_eq!(
        left.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        [kept]
    );
    // A second mover of the same entry changes nothing.
    assert_eq!(q.transfer(mv(&id, &src, "again")).await.unwrap(), None);
    assert_eq!(q.len(&src).await.unwrap(), 1);
    // Wrong type at the destination fails before any write.
    let kv = k.fault("kv", 0);
    q.set(&kv, Bytes::from("x"), None).await.unwrap();
    let other = q.range(&dlq, "-", "+", 0).await.unwrap()[0].id.clone();
    assert!(q.transfer(mv(&other, &kv, "x")).await.is_err());
    assert_eq!(q.len(&dlq).await.unwrap(), 1);
}

async fn redis_queue() -> (RedisServer, Q) {
    let server = RedisServer::start().await.expect("redis-server starts");
    let q = RedisQueue::connect(&server.url()).await.expect("connect");
    (server, Arc::new(q))
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod memory_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::memory_queue()).await;
                }
            )*
        }
        mod redis_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let (_server, q) = super::redis_queue().await;
                    super::$name(q).await;
                }
            )*
        }
    };
}

conformance!(
    add_read_ack,
    group_created_from_zero_sees_existing,
    missing_group_is_nogroup,
    groups_split_entries,
    delivery_count_increases_on_redelivery,
    autoclaim_respects_min_idle,
    autoclaim_reports_deleted_entries,
    claim_by_id,
    transfer_moves_once,
    complete_is_atomic_and_idempotent,
    complete_failure_changes_nothing,
    complete_batch_group_commit,
    complete_batch_is_all_or_nothing,
    complete_batch_expires_what_it_is_told,
    dead_letter_is_atomic,
    join_completes_once_with_every_part,
    join_waits_for_room_in_its_target,
    join_fails_with_a_dead_branch_and_reopens_on_replay,
    join_times_out_once,
    submit_idempotent_dedups,
    submit_batch_in_order_and_dedups,
    submit_batch_is_all_or_nothing,
    concurrent_submits_create_one_task,
    limit_refuses_and_never_drops_unacked,
    submit_batch_respects_the_limit,
    trim_acked_removes_only_what_every_group_acked,
    submit_fingerprint_conflict,
    complete_waits_for_room_downstream,
    complete_and_dead_letter_exclude_each_other,
    dead_letter_writes_what_goes_with_it,
    autoclaim_cursor_reaches_entries_behind_live_ones,
    trim_older_drops_by_time,
    range_rev_range_delete,
    blocking_read_wakes_on_add,
    ttl_expiry,
    kv_helpers,
    pubsub,
);

/// Retry `op` until it succeeds (the ConnectionManager reconnects in the
/// background after a restart), under a deadline.
async fn eventually<T, F, Fut>(what: &str, mut op: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, QueueError>>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!("{what}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what} never succeeded: {e}"),
        }
    }
}

#[tokio::test]
async fn redis_complete_survives_crash_restart_with_aof() {
    let mut server = RedisServer::start_with_aof().await.expect("redis-server");
    let q = RedisQueue::connect(&server.url()).await.expect("connect");
    let k = keys();
    let (input, out) = (k.stream("in"), k.stream("out"));
    q.ensure_group(&input, "g").await.unwrap();
    q.add(&input, f("a"), None).await.unwrap();
    q.add(&input, f("b"), None).await.unwrap();
    let got = q.read_group(&input, "g", "c", 2, ZERO).await.unwrap();
    let inbox = k.inbox("t", "s");
    let r = q
        .complete(
            &input,
            "g",
            &got[0].id,
            &inbox,
            HOUR,
            vec![(out.clone(), f("A"))],
            None,
        )
        .await
        .unwrap();
    assert!(matches!(r, Completion::Published { .. }));

    server.restart().await.expect("restart");

    // The same queue (same ConnectionManager) works again after reconnecting.
    assert_eq!(eventually("XLEN", || q.len(&out)).await, 1);
    assert!(q.get(&inbox).await.unwrap().is_some());
    let p = q.pending_summary(&input, "g").await.unwrap();
    assert_eq!(p.count, 1, "only the un-completed entry is pending");
    assert_eq!(p.min_id.as_deref(), Some(got[1].id.as_str()));
    // A consumer that redoes the completed step after the crash writes
    // nothing (the entry is acked: not pending any more).
    let again = q
        .complete(
            &input,
            "g",
            &got[0].id,
            &inbox,
            HOUR,
            vec![(out.clone(), f("A"))],
            None,
        )
        .await
        .unwrap();
    assert_eq!(again, Completion::NotPending);
    assert_eq!(q.len(&out).await.unwrap(), 1);
    // The entry left pending by the crash is redelivered with a higher count.
    let claimed = q
        .autoclaim(&input, "g", "c2", ZERO, 10, "0-0")
        .await
        .unwrap();
    assert_eq!(claimed.entries.len(), 1);
    assert_eq!(claimed.entries[0].delivery_count, 2);
    // Blocking reads use fresh dedicated connections after the restart too.
    q.add(&input, f("c"), None).await.unwrap();
    let more = eventually("XREADGROUP BLOCK", || {
        q.read_group(&input, "g", "c3", 10, Duration::from_millis(200))
    })
    .await;
    assert_eq!(more.iter().map(val).collect::<Vec<_>>(), ["c"]);
}

#[tokio::test]
async fn redis_down_gives_errors_within_deadline_not_hangs() {
    let mut server = RedisServer::start().await.expect("redis-server");
    let q = RedisQueue::connect_with(
        &server.url(),
        super::redis::RedisConfig {
            op_timeout: Duration::from_millis(500),
            connect_timeout: Duration::from_millis(500),
        },
    )
    .await
    .expect("connect");
    server.kill();
    let t0 = Instant::now();
    assert!(q.len("r4:{x/y}:stream:s").await.is_err());
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}

#[tokio::test(start_paused = true)]
async fn memory_idle_and_ttl_follow_paused_clock() {
    let q = MemoryQueue::new();
    let k = keys();
    let s = k.stream("in");
    q.ensure_group(&s, "g").await.unwrap();
    q.add(&s, f("x"), None).await.unwrap();
    q.read_group(&s, "g", "dead", 1, ZERO).await.unwrap();
    q.set(
        &k.fault("f", 0),
        Bytes::from("1"),
        Some(Duration::from_secs(30)),
    )
    .await
    .unwrap();
    let min_idle = Duration::from_secs(60);
    assert!(
        q.autoclaim(&s, "g", "r", min_idle, 10, "0-0")
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(q.get(&k.fault("f", 0)).await.unwrap(), None);
    tokio::time::advance(Duration::from_secs(30)).await;
    let got = q
        .autoclaim(&s, "g", "r", min_idle, 10, "0-0")
        .await
        .unwrap();
    assert_eq!(got.entries.len(), 1);
    // A long block under the paused clock times out without real waiting.
    let none = q
        .read_group(&s, "g", "c", 1, Duration::from_secs(300))
        .await
        .unwrap();
    assert!(none.is_empty());
}
