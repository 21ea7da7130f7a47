//! Embedded in-memory backend: the same semantics as [`crate::queue::redis`]
//! for a one-process run without Redis.
//!
//! Owns: streams with `<ms>-<seq>` ids, consumer groups with a pending list
//! (PEL: owner, delivery count, last delivery time), blocking reads woken by
//! a [`tokio::sync::Notify`], `MAXLEN` trimming (exact, which satisfies the
//! `~` contract), string/hash keys with TTLs, and pub/sub via
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
    Claimed, Completing, Completion, EntryId, Fields, PendingSummary, Queue, QueueError,
    QueueFuture, StreamEntry, Submission, Submitted, Subscription, check_fields,
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

    fn xadd(
        &mut self,
        stream: &str,
        fields: Fields,
        maxlen: Option<u64>,
    ) -> Result<String, QueueError> {
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
        if let Some(max) = maxlen {
            let max = usize::try_from(max).unwrap_or(usize::MAX);
            while s.entries.len() > max {
                s.entries.pop_first();
            }
        }
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
        maxlen: Option<u64>,
    ) -> QueueFuture<'a, String> {
        Box::pin(async move {
            let id = self.lock().xadd(stream, fields, maxlen)?;
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
    ) -> QueueFuture<'a, Claimed> {
        Box::pin(async move {
            let mut st = self.lock();
            let s = st.group_mut(stream, group)?;
            let MemStream {
                entries, groups, ..
            } = s;
            let Some(g) = groups.get_mut(group) else {
                return Ok(Claimed::default());
            };
            let now = Instant::now();
            let mut claimed = Claimed::default();
            let mut gone = Vec::new();
            let count = if count == 0 { 100 } else { count };
            for (id, p) in g.pel.iter_mut() {
                if claimed.entries.len() >= count {
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

    fn transfer<'a>(
        &'a self,
        from: &'a str,
        id: &'a str,
        to: &'a str,
        fields: Fields,
        maxlen: Option<u64>,
    ) -> QueueFuture<'a, Option<String>> {
        Box::pin(async move {
            let eid = EntryId::parse(id)?;
            check_fields(&fields)?;
            let mut st = self.lock();
            st.check_stream_key(to)?;
            let exists = st
                .streams
                .get(from)
                .is_some_and(|s| s.entries.contains_key(&eid));
            if !exists {
                return Ok(None);
            }
            let new_id = st.xadd(to, fields, maxlen)?;
            if let Some(s) = st.streams.get_mut(from) {
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
        maxlen: Option<u64>,
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
            }
            let mut published = false;
            let mut done = Vec::with_capacity(items.len());
            for (it, id) in items.into_iter().zip(ids) {
                if st.kv_live(&it.inbox_key).is_some() {
                    st.xack(stream, group, &[id]);
                    done.push(Completion::AlreadyDone);
                    continue;
                }
                let mut output_ids = Vec::with_capacity(it.outputs.len());
                for (out, fields) in it.outputs {
                    output_ids.push(st.xadd(&out, fields, maxlen)?);
                }
                let until = Instant::now() + inbox_ttl;
                for key in &it.expire {
                    if let Some(s) = st.streams.get_mut(key) {
                        s.expires_at = Some(until);
                    }
                }
                published |= !output_ids.is_empty();
                st.xack(stream, group, &[id]);
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
        entry_id: &'a str,
        dlq_stream: &'a str,
        record: Fields,
    ) -> QueueFuture<'a, String> {
        Box::pin(async move {
            let id = EntryId::parse(entry_id)?;
            let mut st = self.lock();
            let dlq_id = st.xadd(dlq_stream, record, None)?;
            st.xack(stream, group, &[id]);
            drop(st);
            self.notify.notify_waiters();
            Ok(dlq_id)
        })
    }

    fn submit_batch<'a>(
        &'a self,
        stream: &'a str,
        ttl: Duration,
        items: Vec<Submission>,
        maxlen: Option<u64>,
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
            for it in &items {
                if let Some(k) = &it.idem_key
                    && (st.streams.contains_key(k)
                        || matches!(
                            st.kv_live(k),
                            Some(KvEntry {
                                value: KvValue::Hash(_),
                                ..
                            })
                        ))
                {
                    return Err(QueueError::WrongType(k.clone()));
                }
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
                        task_id: String::from_utf8_lossy(v).into_owned(),
                        entry_id: None,
                    });
                    continue;
                }
                let mut all = Vec::with_capacity(it.fields.len() + 1);
                all.push(("task_id".to_owned(), Bytes::from(it.task_id.clone())));
                all.extend(it.fields);
                let entry_id = st.xadd(stream, all, maxlen)?;
                if let Some(k) = &it.idem_key {
                    st.set(k, Bytes::from(it.task_id.clone()), Some(ttl));
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
            if st.streams.contains_key(key) {
                return Err(QueueError::WrongType(key.to_owned()));
            }
            if st.kv_live(key).is_none() {
                st.kv.insert(
                    key.to_owned(),
                    KvEntry {
                        value: KvValue::Hash(BTreeMap::new()),
                        expires_at: None,
                    },
                );
            }
            match st.kv.get_mut(key) {
                Some(KvEntry {
                    value: KvValue::Hash(h),
                    ..
                }) => {
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
            Ok(self.sender(channel).send(message).map_or(0, |n| n as u64))
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
                let entry = st.kv.entry(hash.to_owned()).or_insert_with(|| KvEntry {
                    value: KvValue::Hash(BTreeMap::new()),
                    expires_at: None,
                });
                if let KvValue::Hash(h) = &mut entry.value {
                    h.extend(fields);
                    h.insert("version".to_owned(), Bytes::from(version.to_string()));
                }
                version
            };
            // After the write, outside the state lock: a subscriber that re-reads on the
            // message sees this version or a later one.
            let _ = self.sender(channel).send(Bytes::from(version.to_string()));
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
