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
    Claimed, Completing, Completion, ConsumerInfo, DeadLetter, Fields, JoinExpiry, JoinRef,
    PendingSummary, Queue, QueueError, QueueFuture, StreamEntry, Submission, Submitted,
    Subscription, Transfer, check_fields, check_join,
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

// Shared by every script that writes to a work stream: backlog limits
// (see the `Queue` trait docs). `trim_acked` removes exactly the entries
// every consumer group has read and acknowledged: for each group the floor
// is its oldest pending id, or the id after its last delivered one when
// nothing is pending; XTRIM MINID at the lowest floor. A stream without
// groups is never trimmed by it. `room` answers whether `n` more entries
// fit under `limit` ('' = no limit: always); a stream no group reads is
// capped at `limit` by trimming its oldest entries.
const LIMIT_LUA: &str = r#"
local function id_parts(id)
  local d = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, d - 1)), tonumber(string.sub(id, d + 1)), string.sub(id, 1, d - 1)
end
local function id_lt(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
local function trim_acked(key)
  if redis.call('TYPE', key)['ok'] ~= 'stream' then return end
  local groups = redis.call('XINFO', 'GROUPS', key)
  if #groups == 0 then return end
  local floor = nil
  for _, g in ipairs(groups) do
    local name, last
    for i = 1, #g, 2 do
      if g[i] == 'name' then name = g[i + 1] elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
    end
    local p = redis.call('XPENDING', key, name)
    local lim
    if p[1] > 0 then
      lim = p[2]
    else
      local _, seq, ms = id_parts(last)
      lim = ms .. '-' .. string.format('%d', seq + 1)
    end
    if floor == nil or id_lt(lim, floor) then floor = lim end
  end
  redis.call('XTRIM', key, 'MINID', floor)
end
local function room(key, limit, n)
  local lim = tonumber(limit)
  if not lim then return true, 0 end
  local len = redis.call('XLEN', key)
  if len + n <= lim then return true, len end
  local groups = 0
  if redis.call('TYPE', key)['ok'] == 'stream' then
    groups = #redis.call('XINFO', 'GROUPS', key)
  end
  if groups == 0 then
    -- A stream no group reads (the end of a graph): capped, oldest first.
    redis.call('XTRIM', key, 'MAXLEN', math.max(lim - n, 0))
    return true, len
  end
  trim_acked(key)
  len = redis.call('XLEN', key)
  if len + n > lim then return false, len end
  return true, len
end
local function check_stream(key)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'stream' and t ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. key)
  end
end
-- XADD to `key` the `n` field/value pairs of ARGV starting at `first`.
local function xadd_argv(key, first, n)
  local args = {'XADD', key, '*'}
  for j = first, first + 2 * n - 1 do args[#args + 1] = ARGV[j] end
  return redis.call(unpack(args))
end
-- Read the entries to add (count at ARGV[p], then per entry: key index,
-- field count n, n pairs), type-checking each key. Returns them (nil and
-- an error reply on a wrong type) and the position of the last one read.
local function read_entries(p)
  local list = {}
  for i = 1, tonumber(ARGV[p]) do
    local key = KEYS[tonumber(ARGV[p + 1])]
    local n = tonumber(ARGV[p + 2])
    local err = check_stream(key); if err then return nil, err end
    list[i] = {key, p + 3, n}
    p = p + 2 + 2 * n
  end
  return list, p
end
"#;

// Joins (see `JoinPart`): a hash per task and joining agent with the parts
// (`p:<stream>`), `joined`, `failed:<step>` and `nfailed`; the agent's due
// set of open joins by deadline. `join_record` takes {hash, due, task,
// part, value, parts, target, fields (flat k, v list), payload field,
// deadline, ttl}.
const JOIN_LUA: &str = r#"
local function join_open(hash)
  return redis.call('HEXISTS', hash, 'joined') == 0
    and tonumber(redis.call('HGET', hash, 'nfailed') or '0') <= 0
end
local function join_fires(j)
  if not join_open(j.hash) then return false end
  for _, q in ipairs(j.parts) do
    if q ~= j.part and redis.call('HEXISTS', j.hash, 'p:' .. q) == 0 then return false end
  end
  return true
end
local function join_record(j)
  local fires = join_fires(j)
  local open = join_open(j.hash)
  redis.call('HSETNX', j.hash, 'p:' .. j.part, j.value)
  redis.call('PEXPIRE', j.hash, j.ttl)
  if fires then
    local body = {}
    for i, q in ipairs(j.parts) do
      body[i] = '"' .. q .. '":' .. redis.call('HGET', j.hash, 'p:' .. q)
    end
    local args = {'XADD', j.target, '*'}
    for i = 1, #j.fields, 2 do
      args[#args + 1] = j.fields[i]
      if j.fields[i] == j.payload then
        args[#args + 1] = '{' .. table.concat(body, ',') .. '}'
      else
        args[#args + 1] = j.fields[i + 1]
      end
    end
    local id = redis.call(unpack(args))
    redis.call('HSET', j.hash, 'joined', '1')
    redis.call('ZREM', j.due, j.task)
    return id
  elseif open then
    redis.call('ZADD', j.due, 'NX', j.deadline, j.task)
  end
  return nil
end
local function join_fail(hash, due, task, step, ttl)
  if redis.call('HEXISTS', hash, 'joined') == 1 then return end
  if redis.call('HSETNX', hash, 'failed:' .. step, '1') == 1 then
    redis.call('HINCRBY', hash, 'nfailed', 1)
  end
  redis.call('PEXPIRE', hash, ttl)
  redis.call('ZREM', due, task)
end
local function join_reopen(hash, due, task, step, ttl, deadline)
  if redis.call('HDEL', hash, 'failed:' .. step) == 1 then
    local n = redis.call('HINCRBY', hash, 'nfailed', -1)
    redis.call('PEXPIRE', hash, ttl)
    if n <= 0 and redis.call('HEXISTS', hash, 'joined') == 0 then
      redis.call('ZADD', due, deadline, task)
    end
  end
end
-- Read `count` join marks (hash idx, due idx, task, step, ttl[, deadline])
-- from ARGV at p; returns them and the next position.
local function join_marks(p, with_deadline)
  local marks = {}
  local n = tonumber(ARGV[p])
  p = p + 1
  for i = 1, n do
    marks[i] = {KEYS[tonumber(ARGV[p])], KEYS[tonumber(ARGV[p + 1])], ARGV[p + 2], ARGV[p + 3], ARGV[p + 4]}
    p = p + 5
    if with_deadline then marks[i][6] = ARGV[p]; p = p + 1 end
  end
  return marks, p
end
"#;

// KEYS[1] stream; ARGV[1] limit or '', ARGV[2..] fields.
const ADD_LUA: &str = r#"
local e = check_stream(KEYS[1]); if e then return e end
local ok, len = room(KEYS[1], ARGV[1], 1)
if not ok then return {0, len} end
local args = {'XADD', KEYS[1], '*'}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
return {1, redis.call(unpack(args))}
"#;

// Group commit. KEYS[1] input stream, KEYS[2..] inbox and output keys
// (distinct); ARGV[1] group, ARGV[2] inbox ttl ms, ARGV[3] limit or '',
// ARGV[4] entry count, then per entry: entry id, inbox key
// index, only-if-done flag, output count m, then per output: stream key
// index, limited flag, field count n, n pairs, then expire count x and x
// key indices (PEXPIREd with the inbox TTL). Output keys are type-checked
// before the first write (a script error does not undo earlier writes):
// the batch is applied whole or not at all. Per entry the result is
// {1, ids...} published, {0} already done, {2} not pending (its XACK, the
// one arbiter, found it acked: nothing written), {3} not done
// (only-if-done), {4, key} an output stream full.
const COMPLETE_BATCH_LUA: &str = r#"
local count = tonumber(ARGV[4])
local p = 5
local plan = {}
for e = 1, count do
  local item = {id = ARGV[p], inbox = KEYS[tonumber(ARGV[p + 1])], only = ARGV[p + 2] == '1', outs = {}}
  local m = tonumber(ARGV[p + 3])
  p = p + 4
  for o = 1, m do
    local key = KEYS[tonumber(ARGV[p])]
    local n = tonumber(ARGV[p + 2])
    local err = check_stream(key); if err then return err end
    item.outs[o] = {key, p + 3, n, ARGV[p + 1] == '1'}
    p = p + 3 + 2 * n
  end
  item.expire = {}
  local x = tonumber(ARGV[p])
  for i = 1, x do item.expire[i] = KEYS[tonumber(ARGV[p + i])] end
  p = p + 1 + x
  item.joins = {}
  local nj = tonumber(ARGV[p])
  p = p + 1
  for i = 1, nj do
    local j = {hash = KEYS[tonumber(ARGV[p])], due = KEYS[tonumber(ARGV[p + 1])],
      target = KEYS[tonumber(ARGV[p + 2])], task = ARGV[p + 3], part = ARGV[p + 4],
      value = ARGV[p + 5], deadline = ARGV[p + 6], ttl = ARGV[p + 7], payload = ARGV[p + 8]}
    local err = check_stream(j.target); if err then return err end
    local k = tonumber(ARGV[p + 9])
    j.parts = {}
    for q = 1, k do j.parts[q] = ARGV[p + 9 + q] end
    p = p + 10 + k
    local n = tonumber(ARGV[p])
    j.fields = {}
    for q = 1, 2 * n do j.fields[q] = ARGV[p + q] end
    p = p + 1 + 2 * n
    item.joins[i] = j
  end
  plan[e] = item
end
local out = {}
for e = 1, count do
  local item = plan[e]
  if redis.call('EXISTS', item.inbox) == 1 then
    if redis.call('XACK', KEYS[1], ARGV[1], item.id) == 1 then out[e] = {0} else out[e] = {2} end
  elseif item.only then
    out[e] = {3}
  else
    local want = {}
    for _, o in ipairs(item.outs) do
      if o[4] then want[o[1]] = (want[o[1]] or 0) + 1 end
    end
    for _, j in ipairs(item.joins) do
      if join_fires(j) then want[j.target] = (want[j.target] or 0) + 1 end
    end
    local full = nil
    for key, n in pairs(want) do
      if not room(key, ARGV[3], n) then full = key; break end
    end
    if full then
      out[e] = {4, full}
    elseif redis.call('XACK', KEYS[1], ARGV[1], item.id) == 0 then
      -- Acked (completed or dead-lettered) by someone else meanwhile.
      out[e] = {2}
    else
      local ids = {1}
      for _, o in ipairs(item.outs) do
        ids[#ids + 1] = xadd_argv(o[1], o[2], o[3])
      end
      for _, j in ipairs(item.joins) do
        local id = join_record(j)
        if id then ids[#ids + 1] = id end
      end
      for _, key in ipairs(item.expire) do redis.call('PEXPIRE', key, ARGV[2]) end
      redis.call('SET', item.inbox, item.id, 'PX', ARGV[2])
      out[e] = ids
    end
  end
end
return out
"#;

// KEYS[1] input stream, KEYS[2] dlq, KEYS[3..] other keys; ARGV[1] group,
// ARGV[2] entry id, ARGV[3] marker key index (0: none), ARGV[4] marker
// value, ARGV[5] marker ttl ms, ARGV[6] schedule key index (0: none),
// ARGV[7] schedule score, ARGV[8] record field count n, n pairs,
// then `also` count m, per entry: key index, field count, pairs.
// Writes nothing unless the entry is still pending: its XACK, done first
// (the script is atomic), is the one arbiter between completion and
// dead-lettering.
const DEAD_LETTER_LUA: &str = r#"
local e = check_stream(KEYS[2]); if e then return e end
local p = 9 + 2 * tonumber(ARGV[8])
local also, at = read_entries(p)
if not also then return at end
p = at
local fails = join_marks(p + 1, false)
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then return false end
for _, m in ipairs(fails) do join_fail(m[1], m[2], m[3], m[4], m[5]) end
local id = xadd_argv(KEYS[2], 9, tonumber(ARGV[8]))
for _, a in ipairs(also) do xadd_argv(a[1], a[2], a[3]) end
if tonumber(ARGV[3]) > 0 then redis.call('SET', KEYS[tonumber(ARGV[3])], ARGV[4], 'PX', ARGV[5]) end
if tonumber(ARGV[6]) > 0 then redis.call('ZADD', KEYS[tonumber(ARGV[6])], ARGV[7], id) end
return id
"#;

// KEYS[1] stream, KEYS[2..] idempotency keys (distinct); ARGV[1] ttl ms,
// ARGV[2] limit or '', ARGV[3] submission count, then per submission:
// task id, key index into KEYS (0: none), fingerprint ('' none), field
// count n, n field/value pairs. A key's value is `<task id>` or
// `<task id> <fingerprint>`. Everything that can refuse the batch (types,
// fingerprint conflicts, the backlog limit for the new submissions) is
// checked before the first write: the batch is applied whole or not at all.
const SUBMIT_BATCH_LUA: &str = r#"
local e = check_stream(KEYS[1]); if e then return e end
for i = 2, #KEYS do
  local kt = redis.call('TYPE', KEYS[i])['ok']
  if kt ~= 'string' and kt ~= 'none' then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i])
  end
end
local items = {}
local p = 4
local fresh = 0
local seen = {}
for n = 1, tonumber(ARGV[3]) do
  local it = {id = ARGV[p], ki = tonumber(ARGV[p + 1]), fp = ARGV[p + 2], first = p + 4}
  p = it.first + 2 * tonumber(ARGV[p + 3])
  it.last = p - 1
  local bound = nil
  if it.ki > 0 then
    bound = seen[it.ki]
    if not bound then
      local v = redis.call('GET', KEYS[it.ki])
      if v then
        local sp = string.find(v, ' ', 1, true)
        if sp then bound = {string.sub(v, 1, sp - 1), string.sub(v, sp + 1)} else bound = {v, ''} end
      end
    end
  end
  if bound then
    if it.fp ~= '' and bound[2] ~= '' and it.fp ~= bound[2] then
      return redis.error_reply('CONFLICT ' .. (n - 1) .. ' ' .. bound[1])
    end
    it.existing = bound[1]
  else
    fresh = fresh + 1
    if it.ki > 0 then seen[it.ki] = {it.id, it.fp} end
  end
  items[n] = it
end
if fresh > 0 then
  local ok, len = room(KEYS[1], ARGV[2], fresh)
  if not ok then return redis.error_reply('FULL ' .. len) end
end
local out = {}
local bound_now = {}
for n, it in ipairs(items) do
  local existing = it.existing or (it.ki > 0 and bound_now[it.ki])
  if existing then
    out[n] = {existing}
  else
    local args = {'XADD', KEYS[1], '*', 'task_id', it.id}
    for j = it.first, it.last do args[#args + 1] = ARGV[j] end
    local eid = redis.call(unpack(args))
    if it.ki > 0 then
      local v = it.id
      if it.fp ~= '' then v = v .. ' ' .. it.fp end
      redis.call('SET', KEYS[it.ki], v, 'PX', ARGV[1])
      bound_now[it.ki] = it.id
    end
    out[n] = {it.id, eid}
  end
end
return out
"#;

// KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms,
// ARGV[4] count, ARGV[5] start. XAUTOCLAIM does not report delivery counts;
// read them in the same atomic step with XPENDING so they cannot race with
// another claimer. Returns {entries, counts, deleted ids, next cursor}.
const AUTOCLAIM_LUA: &str = r#"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[5], 'COUNT', ARGV[4])
local entries = r[2]
local counts = {}
for i, e in ipairs(entries) do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
  if p[1] then counts[i] = p[1][4] else counts[i] = 0 end
end
return {entries, counts, r[3] or {}, r[1]}
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

// KEYS[1] from, KEYS[2] to, KEYS[3..] other keys; ARGV[1] id, ARGV[2] limit
// or '', ARGV[3] unschedule key index (0: none), ARGV[4] member, ARGV[5]
// field count n, n pairs, then `also` count m (key index, field count,
// pairs each), then del count d and d key indices.
const TRANSFER_LUA: &str = r#"
local e = check_stream(KEYS[2]); if e then return e end
local p = 6 + 2 * tonumber(ARGV[5])
local also, at = read_entries(p)
if not also then return at end
p = at
local dels = {}
p = p + 1
for i = 1, tonumber(ARGV[p]) do dels[i] = KEYS[tonumber(ARGV[p + i])] end
local reopen = join_marks(p + 1 + tonumber(ARGV[p]), true)
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return false end
local ok, len = room(KEYS[2], ARGV[2], 1)
if not ok then return redis.error_reply('FULL ' .. len) end
local id = xadd_argv(KEYS[2], 6, tonumber(ARGV[5]))
for _, a in ipairs(also) do xadd_argv(a[1], a[2], a[3]) end
for _, k in ipairs(dels) do redis.call('DEL', k) end
if tonumber(ARGV[3]) > 0 then redis.call('ZREM', KEYS[tonumber(ARGV[3])], ARGV[4]) end
for _, m in ipairs(reopen) do join_reopen(m[1], m[2], m[3], m[4], m[5], m[6]) end
redis.call('XDEL', KEYS[1], ARGV[1])
return id
"#;

// KEYS[1] join hash, KEYS[2] due set, KEYS[3] dlq, KEYS[4..] other keys;
// ARGV[1] task id, ARGV[2] now ms, ARGV[3] parts seen, ARGV[4] hash ttl
// ms, ARGV[5] marker key index (0: none), ARGV[6] marker value, ARGV[7]
// marker ttl ms, ARGV[8] record field count n, n pairs, then `also` count
// (key index, field count, pairs each). Replies {0, id} dead-lettered, {1}
// settled, {2} the parts changed.
const EXPIRE_JOIN_LUA: &str = r#"
local e = check_stream(KEYS[3]); if e then return e end
local p = 9 + 2 * tonumber(ARGV[8])
local also, at = read_entries(p)
if not also then return at end
p = at
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return {1} end
if not join_open(KEYS[1]) then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {1}
end
local seen = 0
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if string.sub(f, 1, 2) == 'p:' then seen = seen + 1 end
end
if seen ~= tonumber(ARGV[3]) then return {2} end
join_fail(KEYS[1], KEYS[2], ARGV[1], 'timeout', ARGV[4])
local id = xadd_argv(KEYS[3], 9, tonumber(ARGV[8]))
for _, a in ipairs(also) do xadd_argv(a[1], a[2], a[3]) end
if tonumber(ARGV[5]) > 0 then redis.call('SET', KEYS[tonumber(ARGV[5])], ARGV[6], 'PX', ARGV[7]) end
return {0, id}
"#;

// KEYS[1] stream. Queue::trim_acked: returns how many entries went.
const TRIM_ACKED_LUA: &str = r#"
local before = redis.call('XLEN', KEYS[1])
trim_acked(KEYS[1])
return before - redis.call('XLEN', KEYS[1])
"#;

// KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] ids. Resets
// the idle time of the ids still pending for the consumer, without counting
// a delivery (JUSTID); returns them.
const TOUCH_LUA: &str = r#"
local out = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] ~= nil and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    out[#out + 1] = ARGV[i]
  end
end
return out
"#;

// KEYS[1] stream; ARGV[1] group, ARGV[2] consumer. Removes the consumer
// only when nothing is pending for it.
const REMOVE_CONSUMER_LUA: &str = r#"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"#;

/// An invocation of a script taking `KEYS[1]` stream and `ARGV` group,
/// consumer, then ids (claim, touch).
fn by_ids<'s>(
    script: &'s Script,
    stream: &str,
    group: &str,
    consumer: &str,
    ids: &[String],
) -> ::redis::ScriptInvocation<'s> {
    let mut inv = script.key(stream);
    inv.arg(group).arg(consumer);
    for id in ids {
        inv.arg(id.as_str());
    }
    inv
}

/// A script with the shared limit functions in front of it.
fn with_limits(body: &str) -> Script {
    Script::new(&format!("{LIMIT_LUA}\n{JOIN_LUA}\n{body}"))
}

struct Scripts {
    add: Script,
    trim_acked: Script,
    touch: Script,
    remove_consumer: Script,
    complete: Script,
    dead_letter: Script,
    submit: Script,
    autoclaim: Script,
    claim: Script,
    transfer: Script,
    expire_join: Script,
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
                add: with_limits(ADD_LUA),
                trim_acked: with_limits(TRIM_ACKED_LUA),
                touch: Script::new(TOUCH_LUA),
                remove_consumer: Script::new(REMOVE_CONSUMER_LUA),
                complete: with_limits(COMPLETE_BATCH_LUA),
                dead_letter: with_limits(DEAD_LETTER_LUA),
                submit: with_limits(SUBMIT_BATCH_LUA),
                autoclaim: Script::new(AUTOCLAIM_LUA),
                claim: Script::new(CLAIM_LUA),
                transfer: with_limits(TRANSFER_LUA),
                expire_join: with_limits(EXPIRE_JOIN_LUA),
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

/// Map our scripts' refusals (`FULL <backlog>`, `CONFLICT <index> <task>`)
/// to typed errors; anything else through [`wrong_type`].
fn refusal(e: QueueError, stream: &str, limit: Option<u64>) -> QueueError {
    if let QueueError::Redis(re) = &e {
        match re.code() {
            Some("FULL") => {
                return QueueError::Full {
                    stream: stream.to_owned(),
                    backlog: re.detail().and_then(|d| d.trim().parse().ok()).unwrap_or(0),
                    limit: limit.unwrap_or(0),
                };
            }
            Some("CONFLICT") => {
                let mut parts = re.detail().unwrap_or("").split_whitespace();
                let index = parts.next().and_then(|i| i.parse().ok()).unwrap_or(0);
                return QueueError::Conflict {
                    index,
                    task_id: parts.next().unwrap_or("").to_owned(),
                };
            }
            _ => {}
        }
    }
    wrong_type(e, stream)
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

fn limit_arg(limit: Option<u64>) -> String {
    limit.map(|m| m.to_string()).unwrap_or_default()
}

/// Numbers distinct keys as a script sees them (`KEYS[first..]`), adding
/// each to the invocation once.
struct KeyIndex<'k> {
    index: HashMap<&'k str, usize>,
    first: usize,
}

impl<'k> KeyIndex<'k> {
    fn new(first: usize) -> Self {
        Self {
            index: HashMap::new(),
            first,
        }
    }

    fn of(&mut self, inv: &mut ::redis::ScriptInvocation<'_>, key: &'k str) -> usize {
        let next = self.index.len() + self.first;
        *self.index.entry(key).or_insert_with(|| {
            inv.key(key);
            next
        })
    }
}

/// The entries a script adds besides its main write (`read_entries` in the
/// scripts): their count, then per entry its key index, field count and
/// field/value pairs.
fn push_entries(
    inv: &mut ::redis::ScriptInvocation<'_>,
    entries: &[(String, Fields)],
    ix: &[usize],
) {
    inv.arg(entries.len());
    for ((_, fields), ix) in entries.iter().zip(ix) {
        inv.arg(*ix).arg(fields.len());
        for (k, v) in fields {
            inv.arg(k.as_str()).arg(v.as_ref());
        }
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
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

/// A flat `[k1, v1, ...]` list (or RESP3 map) with values kept raw.
fn v_fields_raw(v: Value) -> Result<Vec<(String, Value)>, QueueError> {
    if let Value::Map(m) = v {
        return m.into_iter().map(|(k, v)| Ok((v_string(k)?, v))).collect();
    }
    let flat = v_array(v)?;
    if flat.len() % 2 != 0 {
        return Err(QueueError::Protocol("odd field/value list".into()));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((v_string(k)?, v));
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
        limit: Option<u64>,
    ) -> QueueFuture<'a, String> {
        Box::pin(async move {
            check_fields(&fields)?;
            let Some(_) = limit else {
                // No limit, nothing to check: a plain XADD.
                let mut cmd = ::redis::cmd("XADD");
                cmd.arg(stream).arg("*");
                for (k, v) in &fields {
                    cmd.arg(k.as_str()).arg(v.as_ref());
                }
                let v = self
                    .query("XADD", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, stream))?;
                return v_string(v);
            };
            let mut inv = self.scripts.add.key(stream);
            inv.arg(limit_arg(limit));
            for (k, v) in &fields {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            let v = self
                .invoke("add", &inv)
                .await
                .map_err(|e| wrong_type(e, stream))?;
            let (ok, v) = pair(v, "an add reply")?;
            if v_int(ok)? == 1 {
                v_string(v)
            } else {
                Err(QueueError::Full {
                    stream: stream.to_owned(),
                    backlog: v_u64(v)?,
                    limit: limit.unwrap_or(0),
                })
            }
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
        start: &'a str,
    ) -> QueueFuture<'a, Claimed> {
        Box::pin(async move {
            super::EntryId::parse(start)?;
            let mut inv = self.scripts.autoclaim.key(stream);
            inv.arg(group)
                .arg(consumer)
                .arg(ms(min_idle))
                .arg(if count == 0 { 100 } else { count })
                .arg(start);
            let v = self
                .invoke("XAUTOCLAIM", &inv)
                .await
                .map_err(|e| map_err(e, stream, group))?;
            let mut parts = v_array(v)?.into_iter();
            let (Some(entries), Some(counts), Some(deleted), Some(next)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
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
                next: v_string(next)?,
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
            let inv = by_ids(&self.scripts.claim, stream, group, consumer, ids);
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

    fn trim_acked<'a>(&'a self, stream: &'a str) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let inv = self.scripts.trim_acked.key(stream);
            v_u64(
                self.invoke("trim_acked", &inv)
                    .await
                    .map_err(|e| wrong_type(e, stream))?,
            )
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
            check_ids(ids)?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let inv = by_ids(&self.scripts.touch, stream, group, consumer, ids);
            let v = self
                .invoke("touch", &inv)
                .await
                .map_err(|e| map_err(e, stream, group))?;
            v_array(v)?.into_iter().map(v_string).collect()
        })
    }

    fn transfer(&self, t: Transfer) -> QueueFuture<'_, Option<String>> {
        Box::pin(async move {
            super::EntryId::parse(&t.id)?;
            check_fields(&t.fields)?;
            for (_, f) in &t.also {
                check_fields(f)?;
            }
            let mut inv = self.scripts.transfer.key(t.from.as_str());
            inv.key(t.to.as_str());
            let mut keys = KeyIndex::new(3);
            let also: Vec<usize> = t.also.iter().map(|(k, _)| keys.of(&mut inv, k)).collect();
            let dels: Vec<usize> = t.del.iter().map(|k| keys.of(&mut inv, k)).collect();
            let unschedule = t
                .unschedule
                .as_ref()
                .map_or(0, |(k, _)| keys.of(&mut inv, k));
            let reopen: Vec<(usize, usize)> = t
                .reopen_joins
                .iter()
                .map(|(j, _, _)| (keys.of(&mut inv, &j.hash), keys.of(&mut inv, &j.due)))
                .collect();
            inv.arg(t.id.as_str())
                .arg(limit_arg(t.limit))
                .arg(unschedule)
                .arg(t.unschedule.as_ref().map_or("", |(_, m)| m.as_str()))
                .arg(t.fields.len());
            for (k, v) in &t.fields {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            push_entries(&mut inv, &t.also, &also);
            inv.arg(dels.len());
            for ix in dels {
                inv.arg(ix);
            }
            inv.arg(reopen.len());
            for ((j, step, deadline), (h, due)) in t.reopen_joins.iter().zip(reopen) {
                inv.arg(h)
                    .arg(due)
                    .arg(j.task_id.as_str())
                    .arg(step.as_str())
                    .arg(ms(j.ttl).max(1))
                    .arg(*deadline);
            }
            let v = self
                .invoke("transfer", &inv)
                .await
                .map_err(|e| refusal(e, &t.to, t.limit))?;
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
        limit: Option<u64>,
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
                for j in &it.joins {
                    check_join(j)?;
                }
            }
            let mut inv = self.scripts.complete.key(stream);
            let mut keys = KeyIndex::new(2);
            let mut args: Vec<usize> = Vec::new();
            for it in &items {
                let all = std::iter::once(it.inbox_key.as_str())
                    .chain(it.outputs.iter().map(|(out, _)| out.as_str()))
                    .chain(it.expire.iter().map(String::as_str))
                    .chain(it.joins.iter().flat_map(|j| {
                        [j.join.hash.as_str(), j.join.due.as_str(), j.target.as_str()]
                    }));
                for k in all {
                    args.push(keys.of(&mut inv, k));
                }
            }
            inv.arg(group)
                .arg(ttl)
                .arg(limit_arg(limit))
                .arg(items.len());
            let mut key_ix = args.into_iter();
            for it in &items {
                inv.arg(it.entry_id.as_str())
                    .arg(key_ix.next().unwrap_or_default())
                    .arg(if it.only_if_done { "1" } else { "0" })
                    .arg(it.outputs.len());
                for (out, fields) in &it.outputs {
                    let limited = !it.expire.contains(out);
                    inv.arg(key_ix.next().unwrap_or_default())
                        .arg(if limited { "1" } else { "0" })
                        .arg(fields.len());
                    for (k, v) in fields {
                        inv.arg(k.as_str()).arg(v.as_ref());
                    }
                }
                inv.arg(it.expire.len());
                for _ in &it.expire {
                    inv.arg(key_ix.next().unwrap_or_default());
                }
                inv.arg(it.joins.len());
                for j in &it.joins {
                    for _ in 0..3 {
                        inv.arg(key_ix.next().unwrap_or_default());
                    }
                    inv.arg(j.join.task_id.as_str())
                        .arg(j.part.as_str())
                        .arg(j.value.as_ref())
                        .arg(j.deadline_ms)
                        .arg(ms(j.join.ttl).max(1))
                        .arg(j.payload_field.as_str())
                        .arg(j.parts.len());
                    for part in &j.parts {
                        inv.arg(part.as_str());
                    }
                    inv.arg(j.fields.len());
                    for (k, v) in &j.fields {
                        inv.arg(k.as_str()).arg(v.as_ref());
                    }
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
                        Some(2) => Ok(Completion::NotPending),
                        Some(3) => Ok(Completion::NotDone),
                        Some(4) => Ok(Completion::Full {
                            stream: it.next().map(v_string).transpose()?.unwrap_or_default(),
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
        d: DeadLetter,
    ) -> QueueFuture<'a, Option<String>> {
        Box::pin(async move {
            super::EntryId::parse(&d.entry_id)?;
            check_fields(&d.record)?;
            for (_, f) in &d.also {
                check_fields(f)?;
            }
            let mut inv = self.scripts.dead_letter.key(stream);
            inv.key(d.dlq.as_str());
            let mut keys = KeyIndex::new(3);
            let also: Vec<usize> = d.also.iter().map(|(k, _)| keys.of(&mut inv, k)).collect();
            let marker = d.marker.as_ref().map_or(0, |(k, _)| keys.of(&mut inv, k));
            let sched = d.schedule.as_ref().map_or(0, |(k, _)| keys.of(&mut inv, k));
            let fails: Vec<(usize, usize)> = d
                .fail_joins
                .iter()
                .map(|(j, _)| (keys.of(&mut inv, &j.hash), keys.of(&mut inv, &j.due)))
                .collect();
            inv.arg(group)
                .arg(d.entry_id.as_str())
                .arg(marker)
                .arg(d.marker.as_ref().map_or(&b""[..], |(_, v)| v.as_ref()))
                .arg(ms(d.marker_ttl).max(1))
                .arg(sched)
                .arg(d.schedule.as_ref().map_or(0, |(_, s)| *s))
                .arg(d.record.len());
            for (k, v) in &d.record {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            push_entries(&mut inv, &d.also, &also);
            inv.arg(fails.len());
            for ((j, step), (h, due)) in d.fail_joins.iter().zip(fails) {
                inv.arg(h)
                    .arg(due)
                    .arg(j.task_id.as_str())
                    .arg(step.as_str())
                    .arg(ms(j.ttl).max(1));
            }
            let v = self
                .invoke("dead_letter", &inv)
                .await
                .map_err(|e| wrong_type(e, &d.dlq))?;
            v_opt_string(v)
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
            for (_, f) in &d.also {
                check_fields(f)?;
            }
            let mut inv = self.scripts.expire_join.key(j.hash.as_str());
            inv.key(j.due.as_str()).key(d.dlq.as_str());
            let mut keys = KeyIndex::new(4);
            let also: Vec<usize> = d.also.iter().map(|(k, _)| keys.of(&mut inv, k)).collect();
            let marker = d.marker.as_ref().map_or(0, |(k, _)| keys.of(&mut inv, k));
            inv.arg(j.task_id.as_str())
                .arg(now_ms)
                .arg(parts_seen)
                .arg(ms(j.ttl).max(1))
                .arg(marker)
                .arg(d.marker.as_ref().map_or(&b""[..], |(_, v)| v.as_ref()))
                .arg(ms(d.marker_ttl).max(1))
                .arg(d.record.len());
            for (k, v) in &d.record {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            push_entries(&mut inv, &d.also, &also);
            let v = self
                .invoke("expire_join", &inv)
                .await
                .map_err(|e| wrong_type(e, &j.hash))?;
            let mut it = per_item(::redis::Value::Array(vec![v]), 1, "expire_join")?
                .into_iter()
                .flatten();
            match it.next().map(v_int).transpose()? {
                Some(0) => Ok(JoinExpiry::DeadLettered(
                    it.next().map(v_string).transpose()?.unwrap_or_default(),
                )),
                Some(1) => Ok(JoinExpiry::Settled),
                Some(2) => Ok(JoinExpiry::Changed),
                _ => Err(QueueError::Protocol("bad expire_join reply".into())),
            }
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
            let ttl = ttl_ms(ttl, "idempotency ttl")?;
            for it in &items {
                if it.fingerprint.as_deref().is_some_and(|f| f.contains(' ')) {
                    return Err(QueueError::Invalid("a fingerprint has no spaces".into()));
                }
            }
            let mut inv = self.scripts.submit.key(stream);
            let mut keys = KeyIndex::new(2);
            let ix: Vec<usize> = items
                .iter()
                .map(|i| i.idem_key.as_deref().map_or(0, |k| keys.of(&mut inv, k)))
                .collect();
            inv.arg(ttl).arg(limit_arg(limit)).arg(items.len());
            for (it, ki) in items.iter().zip(ix) {
                inv.arg(it.task_id.as_str())
                    .arg(ki)
                    .arg(it.fingerprint.as_deref().unwrap_or(""))
                    .arg(it.fields.len());
                for (k, v) in &it.fields {
                    inv.arg(k.as_str()).arg(v.as_ref());
                }
            }
            let v = self
                .invoke("submit_batch", &inv)
                .await
                .map_err(|e| refusal(e, stream, limit))?;
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

    fn trim_older<'a>(&'a self, stream: &'a str, min_ms: u64) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("XTRIM");
            cmd.arg(stream).arg("MINID").arg(format!("{min_ms}-0"));
            v_u64(
                self.query("XTRIM", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, stream))?,
            )
        })
    }

    fn due<'a>(
        &'a self,
        key: &'a str,
        max_score: u64,
        count: usize,
    ) -> QueueFuture<'a, Vec<String>> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("ZRANGE");
            cmd.arg(key)
                .arg("-inf")
                .arg(max_score)
                .arg("BYSCORE")
                .arg("LIMIT")
                .arg(0)
                .arg(count.max(1));
            v_array(
                self.query("ZRANGE", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, key))?,
            )?
            .into_iter()
            .map(v_string)
            .collect()
        })
    }

    fn schedule<'a>(&'a self, key: &'a str, member: &'a str, score: u64) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("ZADD");
            cmd.arg(key).arg(score).arg(member);
            self.query("ZADD", &cmd)
                .await
                .map_err(|e| wrong_type(e, key))?;
            Ok(())
        })
    }

    fn unschedule<'a>(&'a self, key: &'a str, member: &'a str) -> QueueFuture<'a, ()> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("ZREM");
            cmd.arg(key).arg(member);
            self.query("ZREM", &cmd)
                .await
                .map_err(|e| wrong_type(e, key))?;
            Ok(())
        })
    }

    fn consumers<'a>(
        &'a self,
        stream: &'a str,
        group: &'a str,
    ) -> QueueFuture<'a, Vec<ConsumerInfo>> {
        Box::pin(async move {
            let mut cmd = ::redis::cmd("XINFO");
            cmd.arg("CONSUMERS").arg(stream).arg(group);
            let v = self
                .query("XINFO CONSUMERS", &cmd)
                .await
                .map_err(|e| map_err(e, stream, group))?;
            let mut out = Vec::new();
            for c in v_array(v)? {
                let (mut name, mut pending, mut idle) = (String::new(), 0, 0);
                for (k, v) in v_fields_raw(c)? {
                    match k.as_str() {
                        "name" => name = v_string(v)?,
                        "pending" => pending = v_u64(v)?,
                        "idle" => idle = v_u64(v)?,
                        _ => {}
                    }
                }
                out.push(ConsumerInfo {
                    name,
                    pending,
                    idle: Duration::from_millis(idle),
                });
            }
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
            let mut inv = self.scripts.remove_consumer.key(stream);
            inv.arg(group).arg(consumer);
            let v = self
                .invoke("remove_consumer", &inv)
                .await
                .map_err(|e| map_err(e, stream, group))?;
            Ok(v_int(v)? == 1)
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
            let script = Script::new(HSET_VERSIONED_LUA);
            let mut inv = script.key(hash);
            inv.key(counter).arg(channel);
            for (k, v) in &fields {
                inv.arg(k.as_str()).arg(v.as_ref());
            }
            v_u64(
                self.invoke("hset_versioned", &inv)
                    .await
                    .map_err(|e| wrong_type(e, hash))?,
            )
        })
    }

    fn hdel<'a>(&'a self, key: &'a str, fields: &'a [String]) -> QueueFuture<'a, u64> {
        Box::pin(async move {
            if fields.is_empty() {
                return Ok(0);
            }
            let mut cmd = ::redis::cmd("HDEL");
            cmd.arg(key).arg(fields);
            v_u64(
                self.query("HDEL", &cmd)
                    .await
                    .map_err(|e| wrong_type(e, key))?,
            )
        })
    }
}

// Queue::hset_versioned. KEYS[1] hash, KEYS[2] counter; ARGV[1] channel,
// ARGV[2..] field/value pairs. Both keys are checked before the first write
// (a script error does not undo earlier writes).
const HSET_VERSIONED_LUA: &str = r#"
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'hash' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[1])
end
t = redis.call('TYPE', KEYS[2])['ok']
if t ~= 'string' and t ~= 'none' then
  return redis.error_reply('WRONGTYPE ' .. KEYS[2])
end
local cur = redis.call('GET', KEYS[2])
if cur and not tonumber(cur) then
  return redis.error_reply('ERR counter ' .. KEYS[2] .. ' is not an integer')
end
local v = redis.call('INCR', KEYS[2])
local args = {'HSET', KEYS[1]}
for i = 2, #ARGV do args[#args + 1] = ARGV[i] end
args[#args + 1] = 'version'
args[#args + 1] = tostring(v)
redis.call(unpack(args))
redis.call('PUBLISH', ARGV[1], tostring(v))
return v
"#;

fn is_io(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.code().is_none()
}
