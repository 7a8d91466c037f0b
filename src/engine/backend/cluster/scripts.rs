//! The Lua scripts: one round trip per decision (or per batch of decisions
//! on one unit), atomic on the unit's keys.
//!
//! The decisions themselves are made by the replica with the same pure
//! functions as the embedded backend (`domain::unit`), on the unit's state
//! as last read from Redis; the script only *commits* them, as a
//! compare-and-set on every key the decision read: if any version changed
//! meanwhile (another replica decided first), nothing is written and the
//! current state comes back, so the replica decides again on it. So there is
//! one implementation of the decision logic, not a Rust one and a Lua one
//! that could drift apart, and a decision is linearisable per unit: it is
//! committed only on the exact state it was made on.

use redis::Script;
use std::sync::LazyLock;

/// Commit a batch of decisions on one unit.
///
/// ```text
/// KEYS: n state keys (target, groups), m settled-permit keys, [stream]
/// ARGV: n, m, has_stream, state_ttl_ms, stream_maxlen,
///       n expected versions, n new records ('' = unchanged),
///       m (first answer, ttl_ms) pairs, event count e, e events
/// ->    {1, new versions...}                       committed
///       {0, v1, d1, ..., vn, dn}                   a version changed: the current state
///       {2, j, answer, ...}                        permits already settled (1-based j)
/// ```
pub static COMMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local n = tonumber(ARGV[1])
local m = tonumber(ARGV[2])
local has_stream = ARGV[3] == '1'
local ttl = ARGV[4]
local maxlen = ARGV[5]
for i = 1, n do
  local v = redis.call('HGET', KEYS[i], 'v') or '0'
  if v ~= ARGV[5 + i] then
    local out = {0}
    for j = 1, n do
      local r = redis.call('HMGET', KEYS[j], 'v', 'd')
      out[#out + 1] = r[1] or '0'
      out[#out + 1] = r[2] or ''
    end
    return out
  end
end
local dups = {}
for j = 1, m do
  local a = redis.call('GET', KEYS[n + j])
  if a then
    dups[#dups + 1] = j
    dups[#dups + 1] = a
  end
end
if #dups > 0 then
  local out = {2}
  for _, x in ipairs(dups) do out[#out + 1] = x end
  return out
end
local out = {1}
for i = 1, n do
  local v = tonumber(ARGV[5 + i])
  local rec = ARGV[5 + n + i]
  if rec ~= '' then
    v = v + 1
    redis.call('HSET', KEYS[i], 'v', v, 'd', rec)
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
  out[#out + 1] = v
end
local a = 5 + 2 * n
for j = 1, m do
  redis.call('SET', KEYS[n + j], ARGV[a + 2 * j - 1], 'PX', ARGV[a + 2 * j])
end
a = a + 2 * m + 1
local e = tonumber(ARGV[a])
if has_stream and e > 0 then
  local stream = KEYS[n + m + 1]
  for k = 1, e do
    redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', ARGV[a + k])
  end
end
return out
"#,
    )
});

/// Read a unit's state: `{v1, d1, v2, d2, ...}` for KEYS (absent = 0, '').
pub static READ: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local out = {}
for i = 1, #KEYS do
  local r = redis.call('HMGET', KEYS[i], 'v', 'd')
  out[#out + 1] = r[1] or '0'
  out[#out + 1] = r[2] or ''
end
return out
"#,
    )
});
