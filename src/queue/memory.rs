//! Embedded in-memory backend: the same semantics as [`crate::queue::redis`]
//! for a one-process run without Redis.
//!
//! Owns: streams with `<ms>-<seq>` ids, consumer groups with a pending list
//! (PEL: owner, delivery count, last delivery time), blocking reads woken by
//! a [`tokio::sync::Notify`], backlog limits with trimming of what every
//! group acknowledged (as the Redis scripts do), string/hash/sorted-set keys
//! with TTLs, and pub/sub via
//! [`tokio::sync::broadcast`]. Idle and TTL times use [`tokio::time::Instant`]
//! so they follow a paused test clock. Everything lives under one
//! `std::sync::Mutex` that is never held across an await, which makes every
//! multi-key operation (`complete`, `dead_letter`, `submit_idempotent`)
//! trivially atomic.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::{Notify, broadcast};
use tokio::time::Instant;

use super::{
    Claimed, Completing, Completion, ConsumerInfo, DeadLetter, EntryId, Fields, JoinExpiry,
    JoinPart, JoinRef, PendingSummary, Queue, QueueError, QueueFuture, StreamEntry, Submission,
    Submitted, Subscription, Transfer, check_fields, check_join,
};

/// Capacity of each pub/sub channel; slow subscribers skip lagged messages.
const CHANNEL_CAPACITY: usize = 1024;

#[derive(Debug)]
struct Pending {
    consumer: String,
    delivery_count: u64,
    delivered_at: Instant,
}

#[derive(Debug, Default)]
struct Group {
    last_delivered: EntryId,
    pel: BTreeMap<EntryId, Pending>,
    /// Consumers and when each last read or claimed (XINFO CONSUMERS idle).
    consumers: HashMap<String, Instant>,
}

impl Group {
    fn seen(&mut self, consumer: &str, now: Instant) {
        self.consumers.insert(consumer.to_owned(), now);
    }
}

#[derive(Debug, Default)]
struct MemStream {
    entries: BTreeMap<EntryId, Fields>,
    last_id: EntryId,
    groups: HashMap<String, Group>,
    /// Set by a completion's `expire`; the stream is dropped after it.
    expires_at: Option<Instant>,
}

#[derive(Debug)]
enum KvValue {
    Str(Bytes),
    Hash(BTreeMap<String, Bytes>),
    /// Sorted set: member → score.
    Zset(BTreeMap<String, u64>),
}

#[derive(Debug)]
struct KvEntry {
    value: KvValue,
    expires_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    streams: HashMap<String, MemStream>,
    kv: HashMap<String, KvEntry>,
}

impl State {
    /// Live KV entry (expired ones are dropped on access).
    fn kv_live(&mut self, key: &str) -> Option<&mut KvEntry> {
        let now = Instant::now();
        if self
            .kv
            .get(key)
            .is_some_and(|e| e.expires_at.is_some_and(|t| t <= now))
        {
            self.kv.remove(key);
        }
        self.kv.get_mut(key)
    }

    fn purge_expired(&mut self) {
        let now = Instant::now();
        self.kv.retain(|_, e| e.expires_at.is_none_or(|t| t > now));
        self.streams
            .retain(|_, s| s.expires_at.is_none_or(|t| t > now));
    }

    /// Drop `key`'s stream if it has expired (checked on access, like KV).
    fn expire_stream(&mut self, key: &str) {
        let now = Instant::now();
        if self
            .streams
            .get(key)
            .is_some_and(|s| s.expires_at.is_some_and(|t| t <= now))
        {
            self.streams.remove(key);
        }
    }

    /// Fail with WRONGTYPE if `key` exists as a non-stream.
    fn check_stream_key(&mut self, key: &str) -> Result<(), QueueError> {
        if self.kv_live(key).is_some() {
            return Err(QueueError::WrongType(key.to_owned()));
        }
        self.expire_stream(key);
        Ok(())
    }

    /// Room for `n` more entries in `stream` under `limit` (see the
    /// `Queue` trait docs): trims what every group acknowledged when the
    /// stream looks full. `Err(backlog)` when there is none.
    fn room(&mut self, stream: &str, limit: Option<u64>, n: u64) -> Result<(), u64> {
        let Some(s) = self.streams.get_mut(stream) else {
            return Ok(());
        };
        let Some(l) = limit else {
            return Ok(());
        };
        let len = |s: &MemStream| s.entries.len() as u64;
        if len(s) + n <= l {
            return Ok(());
        }
        if s.groups.is_empty() {
            // A stream no group reads (the end of a graph): capped.
            let keep = usize::try_from(l.saturating_sub(n)).unwrap_or(usize::MAX);
            while s.entries.len() > keep {
                s.entries.pop_first();
            }
            return Ok(());
        }
        s.trim_acked();
        if len(s) + n > l { Err(len(s)) } else { Ok(()) }
    }

    fn full(stream: &str, backlog: u64, limit: Option<u64>) -> QueueError {
        QueueError::Full {
            stream: stream.to_owned(),
            backlog,
            limit: limit.unwrap_or(0),
        }
    }

    fn xadd(&mut self, stream: &str, fields: Fields) -> Result<String, QueueError> {
        self.check_stream_key(stream)?;
        check_fields(&fields)?;
        let s = self.streams.entry(stream.to_owned()).or_default();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let id = if now_ms > s.last_id.ms {
            EntryId { ms: now_ms, seq: 0 }
        } else {
            EntryId {
                ms: s.last_id.ms,
                seq: s.last_id.seq + 1,
            }
        };
        s.last_id = id;
        s.entries.insert(id, fields);
        Ok(id.to_string())
    }

    fn xack(&mut self, stream: &str, group: &str, ids: &[EntryId]) -> u64 {
        let Some(g) = self
            .streams
            .get_mut(stream)
            .and_then(|s| s.groups.get_mut(group))
        else {
            return 0;
        };
        ids.iter().filter(|id| g.pel.remove(id).is_some()).count() as u64
    }

    fn set(&mut self, key: &str, value: Bytes, ttl: Option<Duration>) {
        self.streams.remove(key);
        self.kv.insert(
            key.to_owned(),
            KvEntry {
                value: KvValue::Str(value),
                expires_at: ttl.map(|t| Instant::now() + t),
            },
        );
    }

    /// The live value at `key`, created as `empty()` (no TTL) when there is
    /// none; WRONGTYPE when `key` is a stream. (What HSET or ZADD finds.)
    fn value_or_insert(
        &mut self,
        key: &str,
        empty: impl FnOnce() -> KvValue,
    ) -> Result<&mut KvValue, QueueError> {
        if self.streams.contains_key(key) {
            return Err(QueueError::WrongType(key.to_owned()));
        }
        if self.kv_live(key).is_none() {
            self.kv.insert(
                key.to_owned(),
                KvEntry {
                    value: empty(),
                    expires_at: None,
                },
            );
        }
        self.kv
            .get_mut(key)
            .map(|e| &mut e.value)
            .ok_or_else(|| QueueError::WrongType(key.to_owned()))
    }

    fn zadd(&mut self, key: &str, member: &str, score: u64) -> Result<(), QueueError> {
        match self.value_or_insert(key, || KvValue::Zset(BTreeMap::new()))? {
            KvValue::Zset(z) => {
                z.insert(member.to_owned(), score);
                Ok(())
            }
            _ => Err(QueueError::WrongType(key.to_owned())),
        }
    }

    /// The live hash at `key`, if there is one (WRONGTYPE for another value).
    fn hash(&mut self, key: &str) -> Result<Option<&mut BTreeMap<String, Bytes>>, QueueError> {
        if self.streams.contains_key(key) {
            return Err(QueueError::WrongType(key.to_owned()));
        }
        match self.kv_live(key) {
            None => Ok(None),
            Some(KvEntry {
                value: KvValue::Hash(h),
                ..
            }) => Ok(Some(h)),
            Some(_) => Err(QueueError::WrongType(key.to_owned())),
        }
    }

    /// The hash at `key`, created empty when missing, its TTL set to `ttl`
    /// (what HSET followed by PEXPIRE does).
    fn hash_with_ttl(
        &mut self,
        key: &str,
        ttl: Duration,
    ) -> Result<&mut BTreeMap<String, Bytes>, QueueError> {
        self.value_or_insert(key, || KvValue::Hash(BTreeMap::new()))?;
        let e = self
            .kv
            .get_mut(key)
            .ok_or_else(|| QueueError::WrongType(key.to_owned()))?;
        e.expires_at = Some(Instant::now() + ttl.max(Duration::from_millis(1)));
        match &mut e.value {
            KvValue::Hash(h) => Ok(h),
            _ => Err(QueueError::WrongType(key.to_owned())),
        }
    }

    fn zrem(&mut self, key: &str, member: &str) {
        if let Some(KvEntry {
            value: KvValue::Zset(z),
            ..
        }) = self.kv_live(key)
        {
            z.remove(member);
        }
    }

    fn zscore(&mut self, key: &str, member: &str) -> Option<u64> {
        match self.kv_live(key) {
            Some(KvEntry {
                value: KvValue::Zset(z),
                ..
            }) => z.get(member).copied(),
            _ => None,
        }
    }

    /// Neither joined nor failed (a missing join is open).
    fn join_open(&mut self, hash: &str) -> Result<bool, QueueError> {
        Ok(self
            .hash(hash)?
            .is_none_or(|h| !h.contains_key("joined") && nfailed(h) <= 0))
    }

    /// Would recording `j` complete its join?
    fn join_fires(&mut self, j: &JoinPart) -> Result<bool, QueueError> {
        if !self.join_open(&j.join.hash)? {
            return Ok(false);
        }
        let h = self.hash(&j.join.hash)?;
        Ok(j.parts.iter().filter(|p| **p != j.part).all(|p| {
            h.as_ref()
                .is_some_and(|h| h.contains_key(&format!("p:{p}")))
        }))
    }

    /// Record a join part (see [`JoinPart`]); the joined task's id if this
    /// part completed the join.
    fn join_record(&mut self, j: JoinPart) -> Result<Option<String>, QueueError> {
        let fires = self.join_fires(&j)?;
        let open = self.join_open(&j.join.hash)?;
        let h = self.hash_with_ttl(&j.join.hash, j.join.ttl)?;
        h.entry(format!("p:{}", j.part)).or_insert(j.value);
        if fires {
            let body: Vec<String> = j
                .parts
                .iter()
                .map(|p| {
                    let v = h.get(&format!("p:{p}")).cloned().unwrap_or_default();
                    format!("\"{p}\":{}", String::from_utf8_lossy(&v))
                })
                .collect();
            let joined = Bytes::from(format!("{{{}}}", body.join(",")));
            h.insert("joined".into(), Bytes::from_static(b"1"));
            let fields = j
                .fields
                .into_iter()
                .map(|(k, v)| {
                    let v = if k == j.payload_field {
                        joined.clone()
                    } else {
                        v
                    };
                    (k, v)
                })
                .collect();
            let id = self.xadd(&j.target, fields)?;
            self.zrem(&j.join.due, &j.join.task_id);
            return Ok(Some(id));
        }
        if open && self.zscore(&j.join.due, &j.join.task_id).is_none() {
            self.zadd(&j.join.due, &j.join.task_id, j.deadline_ms)?;
        }
        Ok(None)
    }

    /// `step` failed: a join that has not completed is failed and unscheduled.
    fn join_fail(&mut self, j: &JoinRef, step: &str) -> Result<(), QueueError> {
        if self
            .hash(&j.hash)?
            .is_some_and(|h| h.contains_key("joined"))
        {
            return Ok(());
        }
        let h = self.hash_with_ttl(&j.hash, j.ttl)?;
        if !h.contains_key(&format!("failed:{step}")) {
            h.insert(format!("failed:{step}"), Bytes::from_static(b"1"));
            let n = nfailed(h) + 1;
            h.insert("nfailed".into(), Bytes::from(n.to_string()));
        }
        self.zrem(&j.due, &j.task_id);
        Ok(())
    }

    /// `step` is replayed: its failure mark goes; the last one reschedules.
    fn join_reopen(&mut self, j: &JoinRef, step: &str, deadline: u64) -> Result<(), QueueError> {
        let Some(h) = self.hash(&j.hash)? else {
            return Ok(());
        };
        if h.remove(&format!("failed:{step}")).is_none() {
            return Ok(());
        }
        let n = nfailed(h) - 1;
        h.insert("nfailed".into(), Bytes::from(n.to_string()));
        let reschedule = n <= 0 && !h.contains_key("joined");
        self.hash_with_ttl(&j.hash, j.ttl)?;
        if reschedule {
            self.zadd(&j.due, &j.task_id, deadline)?;
        }
        Ok(())
    }

    fn group_mut(&mut self, stream: &str, group: &str) -> Result<&mut MemStream, QueueError> {
        let no_group = || QueueError::NoGroup {
            stream: stream.to_owned(),
            group: group.to_owned(),
        };
        let s = self.streams.get_mut(stream).ok_or_else(no_group)?;
        if !s.groups.contains_key(group) {
            return Err(no_group());
        }
        Ok(s)
    }
}

/// A join's count of failed branches.
fn nfailed(h: &BTreeMap<String, Bytes>) -> i64 {
    h.get("nfailed")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl MemStream {
    /// Remove exactly the entries every group has read and acknowledged
    /// (below each group's oldest pending id, or up to its last delivered
    /// one when nothing is pending). Without groups nothing goes.
    fn trim_acked(&mut self) {
        let floor = self
            .groups
            .values()
            .map(|g| match g.pel.keys().next() {
                Some(first) => *first,
                None => g.last_delivered.successor().unwrap_or(EntryId::MAX),
            })
            .min();
        if let Some(floor) = floor {
            self.entries = self.entries.split_off(&floor);
        }
    }
}

/// An idempotency key's value: `<task id>` or `<task id> <fingerprint>`.
fn split_binding(v: &Bytes) -> (String, String) {
    let s = String::from_utf8_lossy(v);
    match s.split_once(' ') {
        Some((id, fp)) => (id.to_owned(), fp.to_owned()),
        None => (s.into_owned(), String::new()),
    }
}

fn parse_ids(ids: &[String]) -> Result<Vec<EntryId>, QueueError> {
    ids.iter().map(|s| EntryId::parse(s)).collect()
}

fn limit(count: usize) -> usize {
    if count == 0 { usize::MAX } else { count }
}

/// The in-memory [`Queue`].
#[derive(Debug, Default)]
pub struct MemoryQueue {
    state: Mutex<State>,
    notify: Notify,
    channels: Mutex<HashMap<String, broadcast::Sender<Bytes>>>,
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied
        // operation visible to Redis-like semantics any worse than a crash;
        // keep serving.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sender(&self, channel: &str) -> broadcast::Sender<Bytes> {
        let mut chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        chans
            .entry(channel.to_owned())
            .or_insert_with(|| broadcast::channel(CHANNEL_CAPACITY).0)
            .clone()
    }

    /// Publish on `channel`; the number of subscribers that got it. A channel nobody ever
    /// subscribed to is not created: its buffer (`CHANNEL_CAPACITY` slots) would be held for
    /// nothing, per workflow and channel in a controller that only publishes.
    fn send(&self, channel: &str, message: Bytes) -> usize {
        let chans = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        chans
            .get(channel)
            .map_or(0, |tx| tx.send(message).unwrap_or(0))
    }

    fn try_read_group(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
    ) -> Result<Vec<StreamEntry>, QueueError> {
        let mut st = self.lock();
        let s = st.group_mut(stream, group)?;
        let MemStream {
            entries, groups, ..
        } = s;
        let Some(g) = groups.get_mut(group) else {
            return Ok(Vec::new());
        };
        let now = Instant::now();
        g.seen(consumer, now);
        let mut out = Vec::new();
        let start = EntryId {
            ms: g.last_delivered.ms,
            seq: g.last_delivered.seq.saturating_add(1),
        };
        let start = if g.last_delivered.seq == u64::MAX {
            EntryId {
                ms: g.last_delivered.ms.saturating_add(1),
                seq: 0,
            }
        } else {
            start
        };
        for (id, fields) in entries.range(start..).take(limit(count)) {
            g.pel.insert(
                *id,
                Pending {
                    consumer: consumer.to_owned(),
                    delivery_count: 1,
                    delivered_at: now,
                },
            );
            g.last_delivered = *id;
            out.push(StreamEntry {
                id: id.to_string(),
                fields: fields.clone(),
                delivery_count: 1,
            });
        }
        Ok(out)
    }

    fn range_sync(
        &self,
        stream: &str,
        start: &str,
        end: &str,
        count: usize,
        rev: bool,
    ) -> Result<Vec<StreamEntry>, QueueError> {
        let lo = EntryId::parse_bound(start, true)?;
        let hi = EntryId::parse_bound(end, false)?;
        let mut st = self.lock();
        st.check_stream_key(stream)?;
        let Some(s) = st.streams.get(stream) else {
            return Ok(Vec::new());
        };
        if lo > hi {
            return Ok(Vec::new());
        }
        let to_entry = |(id, f): (&EntryId, &Fields)| StreamEntry {
            id: id.to_string(),
            fields: f.clone(),
            delivery_count: 0,
        };
        let iter = s.entries.range(lo..=hi);
        Ok(if rev {
            iter.rev().take(limit(count)).map(to_entry).collect()
        } else {
            iter.take(limit(count)).map(to_entry).collect()
        })
    }
}

impl Queue for MemoryQueue {
    fn add<'a>(
        &'a self,
        stream: &'a str,
        fields: Fields,
        limit: Option<u64>,
    ) -> QueueFuture<'a, String> {
        Box::pin(async move {
            let mut st = self.lock();
            st.check_stream_key(stream)?;
            check_fields(&fields)?;
            st.room(stream, limit, 1)
                .map_err(|b| State::full(stream, b, limit))?;
            let id = st.xadd(stream, fields)?;
            drop(st);
            self.notify.notify_waiters();
            Ok(id)
        })
    }

    fn ensure_group<'a>(&'a self, stream: &'a str, group: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut st = self.lock();
            st.check_stream_key(stream)?;
            st.streams
                .entry(stream.to_owned())
                .or_default()
                .groups
                .entry(group.to_owned())
                .or_default();
            Ok(())
        })
    }

    fn read_group<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        count: usize,
        block: Duration,
    ) -> QueueFuture<'a, Vec<StreamEntry>> {
        Box::pin(async move {
            let deadline = Instant::now() + block;
            loop {
                // Register for wake-ups before looking, so an add between the
                // look and the wait is not missed.
                let notified = self.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                let got = self.try_read_group(stream, group, consumer, count)?;
                if !got.is_empty() || block.is_zero() {
                    return Ok(got);
                }
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return Ok(Vec::new());
                }
            }
        })
    }

    fn ack<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        ids: &'a [String],
    ) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let ids = parse_ids(ids)?;
            Ok(self.lock().xack(stream, group, &ids))
        })
    }

    fn autoclaim<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        min_idle: Duration,
        count: usize,
        start: &'a str,
    ) -> QueueFuture<'a, Claimed> {
        Box::pin(async move {
            let start = EntryId::parse(start)?;
            let mut st = self.lock();
            let s = st.group_mut(stream, group)?;
            let MemStream {
                entries, groups, ..
            } = s;
            let Some(g) = groups.get_mut(group) else {
                return Ok(Claimed::default());
            };
            let now = Instant::now();
            g.seen(consumer, now);
            let mut claimed = Claimed {
                next: "0-0".into(),
                ..Claimed::default()
            };
            let mut gone = Vec::new();
            let count = if count == 0 { 100 } else { count };
            // Like Redis: look at most 10 * count pending entries per call,
            // and say where the next call should go on.
            for (scanned, (id, p)) in g.pel.range_mut(start..).enumerate() {
                if claimed.entries.len() >= count || scanned >= count * 10 {
                    claimed.next = id.to_string();
                    break;
                }
                if now.saturating_duration_since(p.delivered_at) < min_idle {
                    continue;
                }
                match entries.get(id) {
                    Some(fields) => {
                        p.consumer = consumer.to_owned();
                        p.delivery_count += 1;
                        p.delivered_at = now;
                        claimed.entries.push(StreamEntry {
                            id: id.to_string(),
                            fields: fields.clone(),
                            delivery_count: p.delivery_count,
                        });
                    }
                    None => gone.push(*id),
                }
            }
            for id in gone {
                g.pel.remove(&id);
                claimed.deleted.push(id.to_string());
            }
            Ok(claimed)
        })
    }

    fn claim<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        ids: &'a [String],
    ) -> QueueFuture<'a, Vec<StreamEntry>> {
        Box::pin(async move {
            let ids = parse_ids(ids)?;
            let mut st = self.lock();
            let s = st.group_mut(stream, group)?;
            let MemStream {
                entries, groups, ..
            } = s;
            let Some(g) = groups.get_mut(group) else {
                return Ok(Vec::new());
            };
            let now = Instant::now();
            g.seen(consumer, now);
            let mut out = Vec::new();
            for id in ids {
                let Some(p) = g.pel.get_mut(&id) else {
                    continue;
                };
                match entries.get(&id) {
                    Some(fields) => {
                        p.consumer = consumer.to_owned();
                        p.delivery_count += 1;
                        p.delivered_at = now;
                        out.push(StreamEntry {
                            id: id.to_string(),
                            fields: fields.clone(),
                            delivery_count: p.delivery_count,
                        });
                    }
                    None => {
                        g.pel.remove(&id);
                    }
                }
            }
            Ok(out)
        })
    }

    fn trim_acked<'a>(&'a self, stream: &'a str) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut st = self.lock();
            st.check_stream_key(stream)?;
            let Some(s) = st.streams.get_mut(stream) else {
                return Ok(0);
            };
            let before = s.entries.len();
            s.trim_acked();
            Ok((before - s.entries.len()) as u64)
        })
    }

    fn touch<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
        ids: &'a [String],
    ) -> QueueFuture<'a, Vec<String>> {
        Box::pin(async move {
            let ids = parse_ids(ids)?;
            let mut st = self.lock();
            let s = st.group_mut(stream, group)?;
            let Some(g) = s.groups.get_mut(group) else {
                return Ok(Vec::new());
            };
            let now = Instant::now();
            let mut out = Vec::new();
            for id in ids {
                if let Some(p) = g.pel.get_mut(&id)
                    && p.consumer == consumer
                {
                    p.delivered_at = now;
                    out.push(id.to_string());
                }
            }
            if !out.is_empty() {
                g.seen(consumer, now);
            }
            Ok(out)
        })
    }

    fn transfer(&self, t: Transfer) -> QueueFuture<'_, Option<String>> {
        Box::pin(async move {
            let eid = EntryId::parse(&t.id)?;
            check_fields(&t.fields)?;
            let mut st = self.lock();
            st.check_stream_key(&t.to)?;
            for (k, f) in &t.also {
                st.check_stream_key(k)?;
                check_fields(f)?;
            }
            for (j, _, _) in &t.reopen_joins {
                st.hash(&j.hash)?;
            }
            let exists = st
                .streams
                .get(&t.from)
                .is_some_and(|s| s.entries.contains_key(&eid));
            if !exists {
                return Ok(None);
            }
            st.room(&t.to, t.limit, 1)
                .map_err(|b| State::full(&t.to, b, t.limit))?;
            let new_id = st.xadd(&t.to, t.fields)?;
            for (k, f) in t.also {
                st.xadd(&k, f)?;
            }
            for k in &t.del {
                st.kv.remove(k);
                st.streams.remove(k);
            }
            if let Some((k, m)) = &t.unschedule
                && let Some(KvEntry {
                    value: KvValue::Zset(z),
                    ..
                }) = st.kv_live(k)
            {
                z.remove(m);
            }
            for (j, step, deadline) in &t.reopen_joins {
                st.join_reopen(j, step, *deadline)?;
            }
            if let Some(s) = st.streams.get_mut(&t.from) {
                s.entries.remove(&eid);
            }
            drop(st);
            self.notify.notify_waiters();
            Ok(Some(new_id))
        })
    }

    fn pending_summary<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> QueueFuture<'a, PendingSummary> {
        Box::pin(async move {
            let mut st = self.lock();
            let s = st.group_mut(stream, group)?;
            let Some(g) = s.groups.get(group) else {
                return Ok(PendingSummary::default());
            };
            let mut per: BTreeMap<&str, u64> = BTreeMap::new();
            for p in g.pel.values() {
                *per.entry(p.consumer.as_str()).or_default() += 1;
            }
            Ok(PendingSummary {
                count: g.pel.len() as u64,
                min_id: g.pel.keys().next().map(ToString::to_string),
                max_id: g.pel.keys().next_back().map(ToString::to_string),
                consumers: per.into_iter().map(|(c, n)| (c.to_owned(), n)).collect(),
            })
        })
    }

    fn len<'a>(&'a self, stream: &'a str) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut st = self.lock();
            st.check_stream_key(stream)?;
            Ok(st.streams.get(stream).map_or(0, |s| s.entries.len() as u64))
        })
    }

    fn range<'a>(
        &'a self,
        stream: &'a str,
        start: &'a str,
        end: &'a str,
        count: usize,
    ) -> QueueFuture<'a, Vec<StreamEntry>> {
        Box::pin(async move { self.range_sync(stream, start, end, count, false) })
    }

    fn rev_range<'a>(
        &'a self,
        stream: &'a str,
        end: &'a str,
        start: &'a str,
        count: usize,
    ) -> QueueFuture<'a, Vec<StreamEntry>> {
        Box::pin(async move { self.range_sync(stream, start, end, count, true) })
    }

    fn delete<'a>(&'a self, stream: &'a str, ids: &'a [String]) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let ids = parse_ids(ids)?;
            let mut st = self.lock();
            st.check_stream_key(stream)?;
            let Some(s) = st.streams.get_mut(stream) else {
                return Ok(0);
            };
            Ok(ids
                .iter()
                .filter(|id| s.entries.remove(id).is_some())
                .count() as u64)
        })
    }

    fn complete_batch<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        items: Vec<Completing>,
        inbox_ttl: Duration,
        limit: Option<u64>,
    ) -> QueueFuture<'a, Vec<Completion>> {
        Box::pin(async move {
            if inbox_ttl.is_zero() {
                return Err(QueueError::Invalid("inbox_ttl must be positive".into()));
            }
            let mut st = self.lock();
            // Validate everything first so a failure changes nothing.
            let mut ids = Vec::with_capacity(items.len());
            for it in &items {
                ids.push(EntryId::parse(&it.entry_id)?);
                for (out, fields) in &it.outputs {
                    st.check_stream_key(out)?;
                    check_fields(fields)?;
                }
                for j in &it.joins {
                    check_join(j)?;
                    st.check_stream_key(&j.target)?;
                    st.hash(&j.join.hash)?;
                }
            }
            let mut published = false;
            let mut done = Vec::with_capacity(items.len());
            'items: for (it, id) in items.into_iter().zip(ids) {
                if st.kv_live(&it.inbox_key).is_some() {
                    done.push(if st.xack(stream, group, &[id]) == 1 {
                        Completion::AlreadyDone
                    } else {
                        Completion::NotPending
                    });
                    continue;
                }
                if it.only_if_done {
                    done.push(Completion::NotDone);
                    continue;
                }
                let mut want: BTreeMap<&str, u64> = BTreeMap::new();
                for (out, _) in &it.outputs {
                    if !it.expire.contains(out) {
                        *want.entry(out.as_str()).or_default() += 1;
                    }
                }
                for j in &it.joins {
                    if st.join_fires(j)? {
                        *want.entry(j.target.as_str()).or_default() += 1;
                    }
                }
                for (out, n) in want {
                    if st.room(out, limit, n).is_err() {
                        done.push(Completion::Full {
                            stream: out.to_owned(),
                        });
                        continue 'items;
                    }
                }
                // The XACK is the one arbiter: acked by someone else
                // meanwhile (completed or dead-lettered) → write nothing.
                if st.xack(stream, group, &[id]) == 0 {
                    done.push(Completion::NotPending);
                    continue;
                }
                let mut output_ids = Vec::with_capacity(it.outputs.len());
                for (out, fields) in it.outputs {
                    output_ids.push(st.xadd(&out, fields)?);
                }
                for j in it.joins {
                    output_ids.extend(st.join_record(j)?);
                }
                let until = Instant::now() + inbox_ttl;
                for key in &it.expire {
                    if let Some(s) = st.streams.get_mut(key) {
                        s.expires_at = Some(until);
                    }
                }
                published |= !output_ids.is_empty();
                st.set(&it.inbox_key, Bytes::from(it.entry_id), Some(inbox_ttl));
                done.push(Completion::Published { output_ids });
            }
            drop(st);
            if published {
                self.notify.notify_waiters();
            }
            Ok(done)
        })
    }

    fn dead_letter<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        d: DeadLetter,
    ) -> QueueFuture<'a, Option<String>> {
        Box::pin(async move {
            let id = EntryId::parse(&d.entry_id)?;
            check_fields(&d.record)?;
            let mut st = self.lock();
            st.check_stream_key(&d.dlq)?;
            for (k, f) in &d.also {
                st.check_stream_key(k)?;
                check_fields(f)?;
            }
            for (j, _) in &d.fail_joins {
                st.hash(&j.hash)?;
            }
            if st.xack(stream, group, &[id]) == 0 {
                return Ok(None);
            }
            let dlq_id = st.xadd(&d.dlq, d.record)?;
            for (j, step) in &d.fail_joins {
                st.join_fail(j, step)?;
            }
            for (k, f) in d.also {
                st.xadd(&k, f)?;
            }
            if let Some((k, v)) = d.marker {
                st.set(&k, v, Some(d.marker_ttl.max(Duration::from_millis(1))));
            }
            if let Some((k, score)) = d.schedule {
                st.zadd(&k, &dlq_id, score)?;
            }
            drop(st);
            self.notify.notify_waiters();
            Ok(Some(dlq_id))
        })
    }

    fn expire_join(
        &self,
        j: JoinRef,
        now_ms: u64,
        parts_seen: u64,
        d: DeadLetter,
    ) -> QueueFuture<'_, JoinExpiry> {
        Box::pin(async move {
            check_fields(&d.record)?;
            let mut st = self.lock();
            st.check_stream_key(&d.dlq)?;
            for (k, f) in &d.also {
                st.check_stream_key(k)?;
                check_fields(f)?;
            }
            if st.zscore(&j.due, &j.task_id).is_none_or(|s| s > now_ms) {
                return Ok(JoinExpiry::Settled);
            }
            if !st.join_open(&j.hash)? {
                st.zrem(&j.due, &j.task_id);
                return Ok(JoinExpiry::Settled);
            }
            let seen = st
                .hash(&j.hash)?
                .map_or(0, |h| h.keys().filter(|k| k.starts_with("p:")).count())
                as u64;
            if seen != parts_seen {
                return Ok(JoinExpiry::Changed);
            }
            st.join_fail(&j, "timeout")?;
            let id = st.xadd(&d.dlq, d.record)?;
            for (k, f) in d.also {
                st.xadd(&k, f)?;
            }
            if let Some((k, v)) = d.marker {
                st.set(&k, v, Some(d.marker_ttl.max(Duration::from_millis(1))));
            }
            drop(st);
            self.notify.notify_waiters();
            Ok(JoinExpiry::DeadLettered(id))
        })
    }

    fn submit_batch<'a>(
        &'a self,
        stream: &'a str,
        ttl: Duration,
        items: Vec<Submission>,
        limit: Option<u64>,
    ) -> QueueFuture<'a, Vec<Submitted>> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            if ttl.is_zero() {
                return Err(QueueError::Invalid(
                    "idempotency ttl must be positive".into(),
                ));
            }
            let mut st = self.lock();
            // Everything that can fail is checked before the first write.
            st.check_stream_key(stream)?;
            let mut bound: HashMap<String, (String, String)> = HashMap::new();
            let mut fresh = 0u64;
            for (index, it) in items.iter().enumerate() {
                let Some(k) = &it.idem_key else {
                    fresh += 1;
                    continue;
                };
                if st.streams.contains_key(k) {
                    return Err(QueueError::WrongType(k.clone()));
                }
                let existing = match bound.get(k) {
                    Some(b) => Some(b.clone()),
                    None => match st.kv_live(k) {
                        None => None,
                        Some(KvEntry {
                            value: KvValue::Str(v),
                            ..
                        }) => Some(split_binding(v)),
                        Some(_) => return Err(QueueError::WrongType(k.clone())),
                    },
                };
                let fp = it.fingerprint.clone().unwrap_or_default();
                match existing {
                    Some((task_id, bound_fp)) => {
                        if !fp.is_empty() && !bound_fp.is_empty() && fp != bound_fp {
                            return Err(QueueError::Conflict { index, task_id });
                        }
                        bound.insert(k.clone(), (task_id, bound_fp));
                    }
                    None => {
                        fresh += 1;
                        bound.insert(k.clone(), (it.task_id.clone(), fp));
                    }
                }
            }
            if fresh > 0 {
                st.room(stream, limit, fresh)
                    .map_err(|b| State::full(stream, b, limit))?;
            }
            let mut out = Vec::with_capacity(items.len());
            for it in items {
                if let Some(k) = &it.idem_key
                    && let Some(KvEntry {
                        value: KvValue::Str(v),
                        ..
                    }) = st.kv_live(k)
                {
                    out.push(Submitted {
                        task_id: split_binding(v).0,
                        entry_id: None,
                    });
                    continue;
                }
                let mut all = Vec::with_capacity(it.fields.len() + 1);
                all.push(("task_id".to_owned(), Bytes::from(it.task_id.clone())));
                all.extend(it.fields);
                let entry_id = st.xadd(stream, all)?;
                if let Some(k) = &it.idem_key {
                    let v = match it.fingerprint.as_deref() {
                        Some(fp) if !fp.is_empty() => format!("{} {fp}", it.task_id),
                        _ => it.task_id.clone(),
                    };
                    st.set(k, Bytes::from(v), Some(ttl));
                }
                out.push(Submitted {
                    task_id: it.task_id,
                    entry_id: Some(entry_id),
                });
            }
            drop(st);
            self.notify.notify_waiters();
            Ok(out)
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> QueueFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let mut st = self.lock();
            if st.streams.contains_key(key) {
                return Err(QueueError::WrongType(key.to_owned()));
            }
            match st.kv_live(key) {
                None => Ok(None),
                Some(KvEntry {
                    value: KvValue::Str(v),
                    ..
                }) => Ok(Some(v.clone())),
                Some(_) => Err(QueueError::WrongType(key.to_owned())),
            }
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Option<Duration>) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            if ttl.is_some_and(|t| t.is_zero()) {
                return Err(QueueError::Invalid("ttl must be positive".into()));
            }
            self.lock().set(key, value, ttl);
            Ok(())
        })
    }

    fn del<'a>(&'a self, keys: &'a [String]) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut st = self.lock();
            let mut n = 0;
            for k in keys {
                let live = st.kv_live(k).is_some();
                if st.kv.remove(k).is_some() && live {
                    n += 1;
                }
                if st.streams.remove(k).is_some() {
                    n += 1;
                }
            }
            Ok(n)
        })
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> QueueFuture<'a, i64> {
        Box::pin(async move {
            let mut st = self.lock();
            if st.streams.contains_key(key) {
                return Err(QueueError::WrongType(key.to_owned()));
            }
            let not_int = || QueueError::Invalid(format!("value at {key:?} is not an integer"));
            let (current, expires_at) = match st.kv_live(key) {
                None => (0i64, None),
                Some(KvEntry {
                    value: KvValue::Str(v),
                    expires_at,
                }) => (
                    std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<i64>().ok())
                        .ok_or_else(not_int)?,
                    *expires_at,
                ),
                Some(_) => return Err(QueueError::WrongType(key.to_owned())),
            };
            let next = current
                .checked_add(by)
                .ok_or_else(|| QueueError::Invalid("increment overflows".into()))?;
            st.kv.insert(
                key.to_owned(),
                KvEntry {
                    value: KvValue::Str(Bytes::from(next.to_string())),
                    expires_at,
                },
            );
            Ok(next)
        })
    }

    fn hset<'a>(&'a self, key: &'a str, fields: Fields) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut st = self.lock();
            match st.value_or_insert(key, || KvValue::Hash(BTreeMap::new()))? {
                KvValue::Hash(h) => {
                    h.extend(fields);
                    Ok(())
                }
                _ => Err(QueueError::WrongType(key.to_owned())),
            }
        })
    }

    fn hgetall<'a>(&'a self, key: &'a str) -> QueueFuture<'a, Fields> {
        Box::pin(async move {
            let mut st = self.lock();
            if st.streams.contains_key(key) {
                return Err(QueueError::WrongType(key.to_owned()));
            }
            match st.kv_live(key) {
                None => Ok(Vec::new()),
                Some(KvEntry {
                    value: KvValue::Hash(h),
                    ..
                }) => Ok(h.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
                Some(_) => Err(QueueError::WrongType(key.to_owned())),
            }
        })
    }

    fn scan_prefix<'a>(&'a self, prefix: &'a str) -> QueueFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut st = self.lock();
            st.purge_expired();
            let mut keys: Vec<String> = st
                .kv
                .keys()
                .chain(st.streams.keys())
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            keys.sort();
            Ok(keys)
        })
    }

    fn publish<'a>(&'a self, channel: &'a str, message: Bytes) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            // No receivers is not an error (Redis returns 0).
            Ok(self.send(channel, message) as u64)
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> QueueFuture<'a, Subscription> {
        Box::pin(async move {
            let rx = self.sender(channel).subscribe();
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(msg) => return Some((msg, rx)),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(skipped = n, "memory pub/sub subscriber lagged");
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            Ok(Box::pin(stream) as Subscription)
        })
    }

    fn trim_older<'a>(&'a self, stream: &'a str, min_ms: u64) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut st = self.lock();
            st.check_stream_key(stream)?;
            let Some(s) = st.streams.get_mut(stream) else {
                return Ok(0);
            };
            let before = s.entries.len();
            s.entries = s.entries.split_off(&EntryId { ms: min_ms, seq: 0 });
            Ok((before - s.entries.len()) as u64)
        })
    }

    fn due<'a>(
        &'a self,
        key: &'a str,
        max_score: u64,
        count: usize,
    ) -> QueueFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut st = self.lock();
            if st.streams.contains_key(key) {
                return Err(QueueError::WrongType(key.to_owned()));
            }
            match st.kv_live(key) {
                None => Ok(Vec::new()),
                Some(KvEntry {
                    value: KvValue::Zset(z),
                    ..
                }) => {
                    let mut due: Vec<(u64, &String)> = z
                        .iter()
                        .filter(|(_, s)| **s <= max_score)
                        .map(|(m, s)| (*s, m))
                        .collect();
                    due.sort();
                    Ok(due
                        .into_iter()
                        .take(count.max(1))
                        .map(|(_, m)| m.clone())
                        .collect())
                }
                Some(_) => Err(QueueError::WrongType(key.to_owned())),
            }
        })
    }

    fn schedule<'a>(&'a self, key: &'a str, member: &'a str, score: u64) -> QueueFuture<'a, ()> {
        Box::pin(async move { self.lock().zadd(key, member, score) })
    }

    fn unschedule<'a>(&'a self, key: &'a str, member: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut st = self.lock();
            match st.kv_live(key) {
                None => Ok(()),
                Some(KvEntry {
                    value: KvValue::Zset(z),
                    ..
                }) => {
                    z.remove(member);
                    Ok(())
                }
                Some(_) => Err(QueueError::WrongType(key.to_owned())),
            }
        })
    }

    fn consumers<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> QueueFuture<'a, Vec<ConsumerInfo>> {
        Box::pin(async move {
            let mut st = self.lock();
            let s = st.group_mut(stream, group)?;
            let Some(g) = s.groups.get(group) else {
                return Ok(Vec::new());
            };
            let now = Instant::now();
            let mut out: Vec<ConsumerInfo> = g
                .consumers
                .iter()
                .map(|(name, seen)| ConsumerInfo {
                    name: name.clone(),
                    pending: g.pel.values().filter(|p| &p.consumer == name).count() as u64,
                    idle: now.saturating_duration_since(*seen),
                })
                .collect();
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(out)
        })
    }

    fn remove_consumer<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        consumer: &'a str,
    ) -> QueueFuture<'a, bool> {
        Box::pin(async move {
            let mut st = self.lock();
            let s = st.group_mut(stream, group)?;
            let Some(g) = s.groups.get_mut(group) else {
                return Ok(false);
            };
            if g.pel.values().any(|p| p.consumer == consumer) {
                return Ok(false);
            }
            Ok(g.consumers.remove(consumer).is_some())
        })
    }

    fn hset_versioned<'a>(
        &'a self,
        hash: &'a str,
        counter: &'a str,
        channel: &'a str,
        fields: Fields,
    ) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let version = {
                let mut st = self.lock();
                for key in [hash, counter] {
                    if st.streams.contains_key(key) {
                        return Err(QueueError::WrongType(key.to_owned()));
                    }
                }
                let current = match st.kv_live(counter) {
                    None => 0,
                    Some(KvEntry {
                        value: KvValue::Str(v),
                        ..
                    }) => std::str::from_utf8(v)
                        .ok()
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| {
                            QueueError::Invalid(format!("counter {counter:?} is not an integer"))
                        })?,
                    Some(_) => return Err(QueueError::WrongType(counter.to_owned())),
                };
                if matches!(
                    st.kv_live(hash),
                    Some(KvEntry {
                        value: KvValue::Str(_),
                        ..
                    })
                ) {
                    return Err(QueueError::WrongType(hash.to_owned()));
                }
                let version = current + 1;
                let expires_at = st.kv_live(counter).and_then(|e| e.expires_at);
                st.kv.insert(
                    counter.to_owned(),
                    KvEntry {
                        value: KvValue::Str(Bytes::from(version.to_string())),
                        expires_at,
                    },
                );
                if let KvValue::Hash(h) =
                    st.value_or_insert(hash, || KvValue::Hash(BTreeMap::new()))?
                {
                    h.extend(fields);
                    h.insert("version".to_owned(), Bytes::from(version.to_string()));
                }
                version
            };
            // After the write, outside the state lock: a subscriber that re-reads on the
            // message sees this version or a later one.
            let _ = self.send(channel, Bytes::from(version.to_string()));
            Ok(version)
        })
    }

    fn hdel<'a>(&'a self, key: &'a str, fields: &'a [String]) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut st = self.lock();
            if st.streams.contains_key(key) {
                return Err(QueueError::WrongType(key.to_owned()));
            }
            match st.kv_live(key) {
                None => Ok(0),
                Some(KvEntry {
                    value: KvValue::Hash(h),
                    ..
                }) => {
                    let n = fields.iter().filter(|f| h.remove(*f).is_some()).count() as u64;
                    if h.is_empty() {
                        st.kv.remove(key);
                    }
                    Ok(n)
                }
                Some(_) => Err(QueueError::WrongType(key.to_owned())),
            }
        })
    }
}
