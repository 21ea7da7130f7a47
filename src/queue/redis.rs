//! Redis backend of [`Queue`], on [`redis::aio::ConnectionManager`] (which
//! reconnects by itself after a Redis restart).
//!
//! Owns: the command encodings, the Lua scripts that make `complete`,
//! `dead_letter`, `submit_batch` and `autoclaim` atomic, reply parsing
//! (never trusting the reply's shape), and the per-call deadlines.
//!
//! # Blocking reads
//!
//! `ConnectionManager` multiplexes one TCP connection, and Redis serves a
//! connection's commands in order: an `XREADGROUP ... BLOCK 5000` on the
//! shared connection would stall every other command queued behind it for
//! up to 5 s. So a blocking `read_group` (block > 0) runs on a *dedicated*
//! connection taken from a small pool of idle ones (a new one is opened when
//! the pool is empty, so concurrent blocked readers never share one). After a
//! clean reply it goes back to the pool (at most [`MAX_IDLE_BLOCKING`] are
//! kept); after an error or a missed deadline it is dropped, so a late reply
//! can never be mistaken for the answer to another call. Dropping a blocked
//! `read_group` future (e.g. on shutdown) drops its connection too; entries
//! Redis delivered to it in that instant stay pending for that consumer and
//! come back through `autoclaim`. Non-blocking reads
//! (block == 0) and every other command use the shared connection.
//!
//! # Deadlines
//!
//! Every network await is wrapped in `tokio::time::timeout`: `op_timeout`
//! for ordinary commands, `block + op_timeout` for blocking reads, and
//! `connect_timeout` for opening connections. `ConnectionManager`'s own
//! response timeout is set too, as a second line.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Cmd, RedisError, Script, Value};
use bytes::Bytes;
use futures::StreamExt;

use super::{
    Claimed, Completing, Completion, Fields, PendingSummary, Queue, QueueError, QueueFuture,
    StreamEntry, Submission, Submitted, Subscription, check_fields,
};

/// How many idle dedicated blocking-read connections are kept for reuse. Enough for every
/// reader of a busy process: with fewer, readers beyond the cap reconnect after each read.
pub const MAX_IDLE_BLOCKING: usize = 64;

/// Timeouts of the Redis backend.
#[derive(Debug, Clone, Copy)]
pub struct RedisConfig {
    /// Deadline of one ordinary command (and of the non-blocking part of a
    /// blocking read).
    pub op_timeout: Duration,
    /// Deadline for opening a connection.
    pub connect_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            op_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

// Group commit. KEYS[1] input stream, KEYS[2..] inbox and output keys
// (distinct); ARGV[1] group, ARGV[2] inbox ttl ms, ARGV[3] maxlen or '',
// ARGV[4] entry count, then per entry: entry id, inbox key index, output
// count m, then per output: stream key index, field count n, n pairs, then
// expire count x and x key indices (PEXPIREd with the inbox TTL).
// Output keys are type-checked before the first write (a script error does
// not undo earlier writes): the batch is applied whole or not at all.
const COMPLETE_BATCH_LUA: &str = r#"
local count = tonumber(ARGV[4])
local p = 5
local plan = {}
for e = 1, count do
  local item = {id = ARGV[p], inbox = KEYS[tonumber(ARGV[p + 1])], outs = {}}
  local m = tonumber(ARGV[p + 2])
  p = p + 3
  for o = 1, m do
    local key = KEYS[tonumber(ARGV[p])]
    local n = tonumber(ARGV[p + 1])
    local t = redis.call('TYPE', key)['ok']
    if t ~= 'stream' and t ~= 'none' then
      return redis.error_reply('WRONGTYPE ' .. key)
    end
    item.outs[o] = {key, p + 2, n}
    p = p + 2 + 2 * n
  end
  item.expire = {}
  local x = tonumber(ARGV[p])
  for i = 1, x do item.expire[i] = KEYS[tonumber(ARGV[p + i])] end
  p = p + 1 + x
  plan[e] = item
end
local out = {}
for e = 1, count do
  local item = plan[e]
  if redis.call('EXISTS', item.inbox) == 1 then
    redis.call('XACK', KEYS[1], ARGV[1], item.id)
    out[e] = {0}
  else
    local ids = {1}
    for _, o in ipairs(item.outs) do
      local args = {'XADD', o[1]}
      if ARGV[3] ~= '' then
        args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[3]
      end
      args[#args + 1] = '*'
      for j = o[2], o[2] + 2 * o[3] - 1 do args[#args + 1] = ARGV[j] end
      ids[#ids + 1] = redis.call(unpack(args))
    end
    for _, key in ipairs(item.expire) do redis.call('PEXPIRE', key, ARGV[2]) end
    redis.call('XACK', KEYS[1], ARGV[1], item.id)
    redis.call('SET', item.inbox, item.id, 'PX', ARGV[2])
    out[e] = ids
  end
end
return out
"#;

// KEYS[1] input stream, KEYS[2] dlq; ARGV[1] group, ARGV[2] entry id, ARGV[3..] fields.
const DEAD_LETTER_LUA: &str = r#"
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2])
end
local args = {'XADD', KEYS[2], '*'}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
local id = redis.call(unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
return id
"#;

// KEYS[1] stream, KEYS[2..] idempotency keys (distinct); ARGV[1] ttl ms,
// ARGV[2] maxlen or '', ARGV[3] submission count, then per submission:
// task id, key index into KEYS (0: none), field count n, n field/value pairs.
// Every key is type-checked before the first write (a script error does not
// undo earlier writes): the batch is applied whole or not at all.
const SUBMIT_BATCH_LUA: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1])
end
for i = 2, #KEYS do
  local kt = redis.call('TYPE', KEYS[i])['ok']
  if kt ~= 'string' and kt ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i])
  end
end
local out = {}
local p = 4
for n = 1, tonumber(ARGV[3]) do
  local id = ARGV[p]
  local ki = tonumber(ARGV[p + 1])
  local first = p + 3
  p = first + 2 * tonumber(ARGV[p + 2])
  local existing = false
  if ki > 0 then existing = redis.call('GET', KEYS[ki]) end
  if existing then
    out[n] = {existing}
  else
    local args = {'XADD', KEYS[1]}
    if ARGV[2] ~= '' then
      args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[2]
    end
    args[#args + 1] = '*'
    args[#args + 1] = 'task_id'; args[#args + 1] = id
    for j = first, p - 1 do args[#args + 1] = ARGV[j] end
    local eid = redis.call(unpack(args))
    if ki > 0 then redis.call('SET', KEYS[ki], id, 'PX', ARGV[1]) end
    out[n] = {id, eid}
  end
end
return out
"#;

// KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms, ARGV[4] count.
// XAUTOCLAIM does not report delivery counts; read them in the same atomic
// step with XPENDING so they cannot race with another claimer.
const AUTOCLAIM_LUA: &str = r#"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], '0-0', 'COUNT', ARGV[4])
local entries = r[2]
local counts = {}
for i, e in ipairs(entries) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  if p[1] then counts[i] = p[1][4] else counts[i] = 0 end
end
return {entries, counts, r[3] or {}}
"#;

// KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] ids. Same
// reasoning as AUTOCLAIM_LUA: read the delivery counts in the same step.
const CLAIM_LUA: &str = r#"
local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
local entries = redis.call(unpack(args))
local counts = {}
for i, e in ipairs(entries) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  if p[1] then counts[i] = p[1][4] else counts[i] = 0 end
end
return {entries, counts}
"#;

// KEYS[1] from, KEYS[2] to; ARGV[1] id, ARGV[2] maxlen or '', ARGV[3..] fields.
const TRANSFER_LUA: &str = r#"
local t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'stream' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2])
end
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local args = {'XADD', KEYS[2]}
if ARGV[2] ~= '' then
  args[#args + 1] = 'MAXLEN'; args[#args + 1] = '~'; args[#args + 1] = ARGV[2]
end
args[#args + 1] = '*'
for i = 3, #ARGV do args[#args + 1] = ARGV[i] end
local id = redis.call(unpack(args))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"#;

struct Scripts {
    complete: Script,
    dead_letter: Script,
    submit: Script,
    autoclaim: Script,
    claim: Script,
    transfer: Script,
}

/// The Redis [`Queue`].
pub struct RedisQueue {
    client: Client,
    conn: ConnectionManager,
    blocking_pool: Mutex<Vec<ConnectionManager>>,
    config: RedisConfig,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisQueue")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl RedisQueue {
    /// Connect with default timeouts.
    pub async fn connect(url: &str) -> Result<Self, QueueError> {
        Self::connect_with(url, RedisConfig::default()).await
    }

    /// Connect with explicit timeouts.
    pub async fn connect_with(url: &str, config: RedisConfig) -> Result<Self, QueueError> {
        Self::connect_client(crate::tls::redis_client(url)?, config).await
    }

    /// Connect through a client the caller built (e.g. TLS trusting a given CA,
    /// [`crate::tls::redis_client_with_ca`]).
    pub async fn connect_client(client: Client, config: RedisConfig) -> Result<Self, QueueError> {
        let conn = Self::open(&client, &config, Some(config.op_timeout)).await?;
        Ok(Self {
            client,
            conn,
            blocking_pool: Mutex::new(Vec::new()),
            config,
            scripts: Scripts {
                complete: Script::new(COMPLETE_BATCH_LUA),
                dead_letter: Script::new(DEAD_LETTER_LUA),
                submit: Script::new(SUBMIT_BATCH_LUA),
                autoclaim: Script::new(AUTOCLAIM_LUA),
                claim: Script::new(CLAIM_LUA),
                transfer: Script::new(TRANSFER_LUA),
            },
        })
    }

    async fn open(
        client: &Client,
        config: &RedisConfig,
        response_timeout: Option<Duration>,
    ) -> Result<ConnectionManager, QueueError> {
        let cm_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.connect_timeout))
            .set_response_timeout(response_timeout)
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        deadline(
            "connect",
            config.connect_timeout * 2,
            ConnectionManager::new_with_config(client.clone(), cm_config),
        )
        .await?
        .map_err(QueueError::from)
    }

    /// Run one command on the shared connection, under `op_timeout`.
    async fn query(&self, op: &'static str, cmd: &Cmd) -> Result<Value, QueueError> {
        let mut conn = self.conn.clone();
        deadline(
            op,
            self.config.op_timeout,
            cmd.query_async::<Value>(&mut conn),
        )
        .await?
        .map_err(QueueError::from)
    }

    /// Invoke a script on the shared connection, under `op_timeout`.
    async fn invoke(
        &self,
        op: &'static str,
        inv: &::redis::ScriptInvocation<'_>,
    ) -> Result<Value, QueueError> {
        let mut conn = self.conn.clone();
        deadline(
            op,
            self.config.op_timeout,
            inv.invoke_async::<Value>(&mut conn),
        )
        .await?
        .map_err(QueueError::from)
    }

    async fn take_blocking_conn(&self) -> Result<ConnectionManager, QueueError> {
        let pooled = self
            .blocking_pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        match pooled {
            Some(c) => Ok(c),
            // No response timeout of its own: the caller's deadline covers
            // the block time.
            None => Self::open(&self.client, &self.config, None).await,
        }
    }

    fn return_blocking_conn(&self, conn: ConnectionManager) {
        let mut pool = self.blocking_pool.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < MAX_IDLE_BLOCKING {
            pool.push(conn);
        }
    }
}

async fn deadline<F: std::future::Future>(
    op: &'static str,
    after: Duration,
    fut: F,
) -> Result<F::Output, QueueError> {
    tokio::time::timeout(after, fut)
        .await
        .map_err(|_| QueueError::Timeout { op, after })
}

/// Map NOGROUP / WRONGTYPE server errors to typed errors.
fn map_err(e: QueueError, stream: &str, group: &str) -> QueueError {
    match &e {
        QueueError::Redis(re) => match re.code() {
            Some("NOGROUP") => QueueError::NoGroup {
                stream: stream.to_owned(),
                group: group.to_owned(),
            },
            Some("WRONGTYPE") => QueueError::WrongType(stream.to_owned()),
            _ => e,
        },
        _ => e,
    }
}

/// Map a WRONGTYPE reply to `WrongType(key)`.
fn wrong_type(e: QueueError, key: &str) -> QueueError {
    match &e {
        QueueError::Redis(re) if re.code() == Some("WRONGTYPE") => {
            QueueError::WrongType(wrong_type_key(re).unwrap_or(key).to_owned())
        }
        _ => e,
    }
}

fn wrong_type_key(re: &RedisError) -> Option<&str> {
    // Our scripts put the offending key in the error detail.
    re.detail()
        .filter(|d| d.starts_with("r4:") || !d.contains(' '))
}

/// Validate ids client-side so both backends reject malformed ids alike
/// (Redis skips validation when the group is missing).
fn check_ids(ids: &[String]) -> Result<(), QueueError> {
    for id in ids {
        super::EntryId::parse(id)?;
    }
    Ok(())
}

fn ttl_ms(ttl: Duration, what: &str) -> Result<u64, QueueError> {
    let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(QueueError::Invalid(format!("{what} must be at least 1ms")));
    }
    Ok(ms)
}

fn maxlen_arg(maxlen: Option<u64>) -> String {
    maxlen.map(|m| m.to_string()).unwrap_or_default()
}

// ---- reply parsing: never trust the shape of a reply ----

fn proto(what: &str, v: &Value) -> QueueError {
    let mut shown = format!("{v:?}");
    shown.truncate(200);
    QueueError::Protocol(format!("expected {what}, got {shown}"))
}

fn v_bytes(v: Value) -> Result<Vec<u8>, QueueError> {
    match v {
        Value::BulkString(b) => Ok(b),
        Value::SimpleString(s) => Ok(s.into_bytes()),
        Value::Okay => Ok(b"OK".to_vec()),
        Value::Int(i) => Ok(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Ok(text.into_bytes()),
        other => Err(proto("a string", &other)),
    }
}

fn v_string(v: Value) -> Result<String, QueueError> {
    String::from_utf8(v_bytes(v)?).map_err(|_| QueueError::Protocol("non-UTF-8 string".into()))
}

fn v_opt_string(v: Value) -> Result<Option<String>, QueueError> {
    match v {
        Value::Nil => Ok(None),
        v => v_string(v).map(Some),
    }
}

fn v_int(v: Value) -> Result<i64, QueueError> {
    match v {
        Value::Int(i) => Ok(i),
        Value::BulkString(b) => std::str::from_utf8(&b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| QueueError::Protocol("expected an integer string".into())),
        other => Err(proto("an integer", &other)),
    }
}

fn v_u64(v: Value) -> Result<u64, QueueError> {
    let i = v_int(v)?;
    u64::try_from(i).map_err(|_| QueueError::Protocol(format!("negative count {i}")))
}

/// Arrays (RESP2) and sets/maps (RESP3, flattened) as a list; Nil as empty.
/// The reply of a batch script: one array per item, `n` of them.
fn per_item(v: Value, n: usize, what: &str) -> Result<Vec<Vec<Value>>, QueueError> {
    let replies = v_array(v)?;
    if replies.len() != n {
        return Err(QueueError::Protocol(format!(
            "{} {what} results for {n} items",
            replies.len()
        )));
    }
    replies.into_iter().map(v_array).collect()
}

fn v_array(v: Value) -> Result<Vec<Value>, QueueError> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Array(a) | Value::Set(a) => Ok(a),
        Value::Map(m) => Ok(m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect()),
        other => Err(proto("an array", &other)),
    }
}

/// `[f1, v1, f2, v2, ...]` (or a RESP3 map) as fields.
fn v_fields(v: Value) -> Result<Fields, QueueError> {
    if let Value::Map(m) = v {
        return m
            .into_iter()
            .map(|(k, v)| Ok((v_string(k)?, Bytes::from(v_bytes(v)?))))
            .collect();
    }
    let flat = v_array(v)?;
    if flat.len() % 2 != 0 {
        return Err(QueueError::Protocol("odd field/value list".into()));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((v_string(k)?, Bytes::from(v_bytes(v)?)));
    }
    Ok(out)
}

fn pair(v: Value, what: &str) -> Result<(Value, Value), QueueError> {
    let mut a = v_array(v)?;
    if a.len() != 2 {
        return Err(QueueError::Protocol(format!("expected a pair for {what}")));
    }
    let second = a.pop().unwrap_or(Value::Nil);
    let first = a.pop().unwrap_or(Value::Nil);
    Ok((first, second))
}

/// `[id, [f, v, ...]]`.
fn v_entry(v: Value, delivery_count: u64) -> Result<StreamEntry, QueueError> {
    let (id, fields) = pair(v, "a stream entry")?;
    Ok(StreamEntry {
        id: v_string(id)?,
        fields: v_fields(fields)?,
        delivery_count,
    })
}

fn v_entries(v: Value, delivery_count: u64) -> Result<Vec<StreamEntry>, QueueError> {
    v_array(v)?
        .into_iter()
        .map(|e| v_entry(e, delivery_count))
        .collect()
}

/// Escape glob metacharacters for SCAN MATCH.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 1);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Queue for RedisQueue {
    fn add<'a>(
        &'a self,
        stream: &'a str,
        fields: Fields,
        maxlen: Option<u64>,
    ) -> QueueFuture<'a, String> {
        Box::pin(async move {
            check_fields(&fields)?;
            let mut cmd = ::redis::cmd("XADD");
            cmd.arg(stream);
            if let Some(m) = maxlen {
                cmd.arg("MAXLEN").arg("~").arg(m);
            }
            cmd.arg("*");
            for (k, v) in &fields {
                cmd.arg(k.as_str()).arg(v.as_ref());
            }
            let v = self
                .query("XADD", &cmd)
                .await
                .map_err(|e| wrong_type(e, stream))?;
            v_string(v)
        })
    }

    fn ensure_group<'a>(&'a self, stream: &'a str, group: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("XGROUP");
            cmd.arg("CREATE")
                .arg(stream)
                .arg(group)
                .arg("0")
                .arg("MKSTREAM");
            match self.query("XGROUP CREATE", &cmd).await {
                Ok(_) => Ok(()),
                Err(QueueError::Redis(e)) if e.code() == Some("BUSYGROUP") => Ok(()),
                Err(e) => Err(wrong_type(e, stream)),
            }
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
            let mut cmd = ::redis::cmd("XREADGROUP");
            cmd.arg("GROUP").arg(group).arg(consumer);
            if count > 0 {
                cmd.arg("COUNT").arg(count);
            }
            let block_ms = u64::try_from(block.as_millis()).unwrap_or(u64::MAX);
            if block_ms > 0 {
                cmd.arg("BLOCK").arg(block_ms);
            }
            cmd.arg("STREAMS").arg(stream).arg(">");
            let reply = if block_ms == 0 {
                self.query("XREADGROUP", &cmd).await
            } else {
                let mut conn = self.take_blocking_conn().await?;
                let after = block + self.config.op_timeout;
                let res = deadline(
                    "XREADGROUP BLOCK",
                    after,
                    cmd.query_async::<Value>(&mut conn),
                )
                .await
                .and_then(|r| r.map_err(QueueError::from));
                // A reply, even a server error reply such as NOGROUP, leaves
                // the connection clean; a timeout or I/O error does not.
                let clean = match &res {
                    Ok(_) => true,
                    Err(QueueError::Redis(e)) => !is_io(e),
                    Err(_) => false,
                };
                if clean {
                    self.return_blocking_conn(conn);
                }
                res
            }
            .map_err(|e| map_err(e, stream, group))?;
            // [[stream, [entries...]]] or Nil on timeout.
            let mut out = Vec::new();
            for per_stream in v_array(reply)? {
                let (_name, entries) = pair(per_stream, "an XREADGROUP stream")?;
                out.extend(v_entries(entries, 1)?);
            }
            Ok(out)
        })
    }

    fn ack<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
        ids: &'a [String],
    ) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            check_ids(ids)?;
            if ids.is_empty() {
                return Ok(0);
            }
            let mut cmd = ::redis::cmd("XACK");
            cmd.arg(stream).arg(group).arg(ids);
            v_u64(
                self.query("XACK", &cmd)
                    .await
                    .map_err(|e| map_err(e, stream, group))?,
            )
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
            let mut inv = self.scripts.autoclaim.key(stream);
            inv.arg(group)
                .arg(consumer)
                .arg(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX))
                .arg(if count == 0 { 100 } else { count });
            let v = self
                .invoke("XAUTOCLAIM", &inv)
                .await
                .map_err(|e| map_err(e, stream, group))?;
            let mut parts = v_array(v)?.into_iter();
            let (Some(entries), Some(counts), Some(deleted)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(QueueError::Protocol("short autoclaim reply".into()));
            };
            let entries = v_entries(entries, 0)?;
            let counts = v_array(counts)?
                .into_iter()
                .map(v_u64)
                .collect::<Result<Vec<_>, _>>()?;
            if counts.len() != entries.len() {
                return Err(QueueError::Protocol("autoclaim count mismatch".into()));
            }
            Ok(Claimed {
                entries: entries
                    .into_iter()
                    .zip(counts)
                    .map(|(e, c)| StreamEntry {
                        delivery_count: c,
                        ..e
                    })
                    .collect(),
                deleted: v_array(deleted)?
                    .into_iter()
                    .map(v_string)
                    .collect::<Result<_, _>>()?,
            })
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
            check_ids(ids)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let mut inv = self.scripts.claim.key(stream);
            inv.arg(group).arg(consumer);
            for id in ids {
                inv.arg(id.as_str());
            }
            let v = self
                .invoke("XCLAIM", &inv)
                .await
                .map_err(|e| map_err(e, stream, group))?;
            let (entries, counts) = pair(v, "a claim reply")?;
            // XCLAIM answers Nil for an id whose entry was deleted (Redis < 7).
            let entries: Vec<Value> = v_array(entries)?
                .into_iter()
                .filter(|e| !matches!(e, Value::Nil))
                .collect();
            let entries = v_entries(Value::Array(entries), 0)?;
            let counts = v_array(counts)?
                .into_iter()
                .map(v_u64)
                .collect::<Result<Vec<_>, _>>()?;
            if counts.len() != entries.len() {
                return Err(QueueError::Protocol("claim count mismatch".into()));
            }
            Ok(entries
                .into_iter()
                .zip(counts)
                .map(|(e, c)| StreamEntry {
                    delivery_count: c,
                    ..e
                })
                .collect())
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
            super::EntryId::parse(id)?;
            check_fields(&fields)?;
            let mut inv = self.scripts.transfer.key(from);
            inv.key(to).arg(id).arg(maxlen_arg(maxlen));
            for (k, v) in &fields {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            let v = self
                .invoke("transfer", &inv)
                .await
                .map_err(|e| wrong_type(e, to))?;
            v_opt_string(v)
        })
    }

    fn pending_summary<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> QueueFuture<'a, PendingSummary> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("XPENDING");
            cmd.arg(stream).arg(group);
            let v = self
                .query("XPENDING", &cmd)
                .await
                .map_err(|e| map_err(e, stream, group))?;
            let mut it = v_array(v)?.into_iter();
            let (Some(count), Some(min), Some(max), Some(consumers)) =
                (it.next(), it.next(), it.next(), it.next())
            else {
                return Err(QueueError::Protocol("short XPENDING reply".into()));
            };
            let mut consumers = v_array(consumers)?
                .into_iter()
                .map(|c| {
                    let (name, n) = pair(c, "an XPENDING consumer")?;
                    Ok((v_string(name)?, v_u64(n)?))
                })
                .collect::<Result<Vec<_>, QueueError>>()?;
            consumers.sort();
            Ok(PendingSummary {
                count: v_u64(count)?,
                min_id: v_opt_string(min)?,
                max_id: v_opt_string(max)?,
                consumers,
            })
        })
    }

    fn len<'a>(&'a self, stream: &'a str) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("XLEN");
            cmd.arg(stream);
            v_u64(
                self.query("XLEN", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, stream))?,
            )
        })
    }

    fn range<'a>(
        &'a self,
        stream: &'a str,
        start: &'a str,
        end: &'a str,
        count: usize,
    ) -> QueueFuture<'a, Vec<StreamEntry>> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("XRANGE");
            cmd.arg(stream).arg(start).arg(end);
            if count > 0 {
                cmd.arg("COUNT").arg(count);
            }
            let v = self
                .query("XRANGE", &cmd)
                .await
                .map_err(|e| wrong_type(e, stream))?;
            v_entries(v, 0)
        })
    }

    fn rev_range<'a>(
        &'a self,
        stream: &'a str,
        end: &'a str,
        start: &'a str,
        count: usize,
    ) -> QueueFuture<'a, Vec<StreamEntry>> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("XREVRANGE");
            cmd.arg(stream).arg(end).arg(start);
            if count > 0 {
                cmd.arg("COUNT").arg(count);
            }
            let v = self
                .query("XREVRANGE", &cmd)
                .await
                .map_err(|e| wrong_type(e, stream))?;
            v_entries(v, 0)
        })
    }

    fn delete<'a>(&'a self, stream: &'a str, ids: &'a [String]) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            check_ids(ids)?;
            if ids.is_empty() {
                return Ok(0);
            }
            let mut cmd = ::redis::cmd("XDEL");
            cmd.arg(stream).arg(ids);
            v_u64(
                self.query("XDEL", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, stream))?,
            )
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
            if items.is_empty() {
                return Ok(Vec::new());
            }
            let ttl = ttl_ms(inbox_ttl, "inbox_ttl")?;
            for it in &items {
                super::EntryId::parse(&it.entry_id)?;
                for (_, f) in &it.outputs {
                    check_fields(f)?;
                }
            }
            let mut inv = self.scripts.complete.key(stream);
            // Distinct keys, numbered as the script sees them (KEYS[2..]).
            let mut index: HashMap<&str, usize> = HashMap::new();
            let mut args: Vec<usize> = Vec::new();
            for it in &items {
                let keys = std::iter::once(it.inbox_key.as_str())
                    .chain(it.outputs.iter().map(|(out, _)| out.as_str()))
                    .chain(it.expire.iter().map(String::as_str));
                for k in keys {
                    let next = index.len() + 2;
                    args.push(*index.entry(k).or_insert_with(|| {
                        inv.key(k);
                        next
                    }));
                }
            }
            inv.arg(group)
                .arg(ttl)
                .arg(maxlen_arg(maxlen))
                .arg(items.len());
            let mut key_ix = args.into_iter();
            for it in &items {
                inv.arg(it.entry_id.as_str())
                    .arg(key_ix.next().unwrap_or_default())
                    .arg(it.outputs.len());
                for (_, fields) in &it.outputs {
                    inv.arg(key_ix.next().unwrap_or_default()).arg(fields.len());
                    for (k, v) in fields {
                        inv.arg(k.as_str()).arg(v.as_ref());
                    }
                }
                inv.arg(it.expire.len());
                for _ in &it.expire {
                    inv.arg(key_ix.next().unwrap_or_default());
                }
            }
            let v = self
                .invoke("complete", &inv)
                .await
                .map_err(|e| wrong_type(e, stream))?;
            per_item(v, items.len(), "complete")?
                .into_iter()
                .map(|r| {
                    let mut it = r.into_iter();
                    match it.next().map(v_int).transpose()? {
                        Some(0) => Ok(Completion::AlreadyDone),
                        Some(1) => Ok(Completion::Published {
                            output_ids: it.map(v_string).collect::<Result<_, _>>()?,
                        }),
                        _ => Err(QueueError::Protocol("bad complete reply".into())),
                    }
                })
                .collect()
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
            super::EntryId::parse(entry_id)?;
            check_fields(&record)?;
            let mut inv = self.scripts.dead_letter.key(stream);
            inv.key(dlq_stream).arg(group).arg(entry_id);
            for (k, v) in &record {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            let v = self
                .invoke("dead_letter", &inv)
                .await
                .map_err(|e| wrong_type(e, dlq_stream))?;
            v_string(v)
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
            let ttl = ttl_ms(ttl, "idempotency ttl")?;
            let mut inv = self.scripts.submit.key(stream);
            // Distinct keys, numbered as the script sees them (KEYS[2..]).
            let mut key_index: HashMap<&str, usize> = HashMap::new();
            for k in items.iter().filter_map(|i| i.idem_key.as_deref()) {
                let next = key_index.len() + 2;
                key_index.entry(k).or_insert_with(|| {
                    inv.key(k);
                    next
                });
            }
            inv.arg(ttl).arg(maxlen_arg(maxlen)).arg(items.len());
            for it in &items {
                let ki = it.idem_key.as_deref().map_or(0, |k| key_index[k]);
                inv.arg(it.task_id.as_str()).arg(ki).arg(it.fields.len());
                for (k, v) in &it.fields {
                    inv.arg(k.as_str()).arg(v.as_ref());
                }
            }
            let v = self
                .invoke("submit_batch", &inv)
                .await
                .map_err(|e| wrong_type(e, stream))?;
            per_item(v, items.len(), "submit")?
                .into_iter()
                .map(|r| {
                    let mut it = r.into_iter();
                    let task_id = it
                        .next()
                        .map(v_string)
                        .transpose()?
                        .ok_or_else(|| QueueError::Protocol("empty submit result".into()))?;
                    let entry_id = it.next().map(v_string).transpose()?;
                    Ok(Submitted { task_id, entry_id })
                })
                .collect()
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> QueueFuture<'a, Option<Bytes>> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("GET");
            cmd.arg(key);
            match self
                .query("GET", &cmd)
                .await
                .map_err(|e| wrong_type(e, key))?
            {
                Value::Nil => Ok(None),
                v => Ok(Some(Bytes::from(v_bytes(v)?))),
            }
        })
    }

    fn set<'a>(&'a self, key: &'a str, value: Bytes, ttl: Option<Duration>) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("SET");
            cmd.arg(key).arg(value.as_ref());
            if let Some(t) = ttl {
                cmd.arg("PX").arg(ttl_ms(t, "ttl")?);
            }
            self.query("SET", &cmd).await?;
            Ok(())
        })
    }

    fn del<'a>(&'a self, keys: &'a [String]) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(0);
            }
            let mut cmd = ::redis::cmd("DEL");
            cmd.arg(keys);
            v_u64(self.query("DEL", &cmd).await?)
        })
    }

    fn incr<'a>(&'a self, key: &'a str, by: i64) -> QueueFuture<'a, i64> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("INCRBY");
            cmd.arg(key).arg(by);
            v_int(
                self.query("INCRBY", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, key))?,
            )
        })
    }

    fn hset<'a>(&'a self, key: &'a str, fields: Fields) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            if fields.is_empty() {
                return Ok(());
            }
            let mut cmd = ::redis::cmd("HSET");
            cmd.arg(key);
            for (k, v) in &fields {
                cmd.arg(k.as_str()).arg(v.as_ref());
            }
            self.query("HSET", &cmd)
                .await
                .map_err(|e| wrong_type(e, key))?;
            Ok(())
        })
    }

    fn hgetall<'a>(&'a self, key: &'a str) -> QueueFuture<'a, Fields> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("HGETALL");
            cmd.arg(key);
            let mut f = v_fields(
                self.query("HGETALL", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, key))?,
            )?;
            f.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(f)
        })
    }

    fn scan_prefix<'a>(&'a self, prefix: &'a str) -> QueueFuture<'a, Vec<String>> {
        Box::pin(async move {
            let pattern = format!("{}*", glob_escape(prefix));
            let mut cursor = "0".to_owned();
            let mut keys = Vec::new();
            loop {
                let mut cmd = ::redis::cmd("SCAN");
                cmd.arg(cursor.as_str())
                    .arg("MATCH")
                    .arg(pattern.as_str())
                    .arg("COUNT")
                    .arg(1000);
                let (next, batch) = pair(self.query("SCAN", &cmd).await?, "a SCAN reply")?;
                for k in v_array(batch)? {
                    keys.push(v_string(k)?);
                }
                cursor = v_string(next)?;
                if cursor == "0" {
                    break;
                }
            }
            keys.sort();
            keys.dedup();
            Ok(keys)
        })
    }

    fn publish<'a>(&'a self, channel: &'a str, message: Bytes) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("PUBLISH");
            cmd.arg(channel).arg(message.as_ref());
            v_u64(self.query("PUBLISH", &cmd).await?)
        })
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> QueueFuture<'a, Subscription> {
        Box::pin(async move {
            let after = self.config.connect_timeout;
            let mut pubsub =
                deadline("pubsub connect", after, self.client.get_async_pubsub()).await??;
            deadline(
                "SUBSCRIBE",
                self.config.op_timeout,
                pubsub.subscribe(channel),
            )
            .await??;
            let stream = pubsub
                .into_on_message()
                .map(|msg| Bytes::copy_from_slice(msg.get_payload_bytes()));
            Ok(Box::pin(stream) as Subscription)
        })
    }
}

fn is_io(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.code().is_none()
}
