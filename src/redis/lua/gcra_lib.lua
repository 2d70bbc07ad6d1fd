-- GCRA on several buckets, all-or-nothing: the arithmetic of `ratelimit::gcra` (governor's),
-- on times relative to now so that Lua's doubles stay exact (nanoseconds, |rel| < 2^53).
-- A bucket's value is its theoretical arrival time `"sec nsec"`, expiring when it is reached (a
-- full bucket and a missing one are the same). Shared by the limiter's script and the ledger's
-- reserve and close scripts (which charge or correct the account's buckets in the same call).
-- A bucket's parameters are three ARGV from `a` on: t (ns per cell), burst, cost or delta.

-- The time: frozen (tests) or the Redis server's `TIME`.
local function gcra_now(frozen_s, frozen_ns)
  if frozen_s and frozen_s ~= '' then return tonumber(frozen_s), tonumber(frozen_ns) end
  local time = redis.call('TIME')
  return tonumber(time[1]), tonumber(time[2]) * 1000
end

local function gcra_rel(key, now_s, now_ns)
  local v = redis.call('GET', key)
  if not v then return 0 end
  local s, ns = string.match(v, '^(%d+) (%d+)$')
  if not s then return 0 end
  local rel = (tonumber(s) - now_s) * 1e9 + (tonumber(ns) - now_ns)
  if rel < 0 then return 0 end
  return rel
end

-- A debt is capped at about 31 years (1e18 ns): a correction from an absurd reported usage must
-- not overflow the key's expiry and fail the script.
local MAX_REL = 1e18

local function gcra_store(key, rel, now_s, now_ns)
  if rel <= 0 then
    redis.call('DEL', key)
    return
  end
  if rel > MAX_REL then rel = MAX_REL end
  local total = now_ns + rel
  local s = now_s + math.floor(total / 1e9)
  local ns = total % 1e9
  redis.call('SET', key, string.format('%d %d', s, ns), 'PX', string.format('%d', math.ceil(rel / 1e6) + 1))
end

local function gcra_params(keys, a)
  local t, burst, amount = {}, {}, {}
  for i = 1, #keys do
    local b = a + (i - 1) * 3
    t[i], burst[i], amount[i] = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2])
  end
  return t, burst, amount
end

-- Corrections, never refused: a positive delta consumes (possibly into debt), a negative one
-- gives back, never beyond a full bucket.
local function gcra_settle(keys, a, now_s, now_ns)
  local t, burst, delta = gcra_params(keys, a)
  for i = 1, #keys do
    local v = redis.call('EXISTS', keys[i])
    local rel = gcra_rel(keys[i], now_s, now_ns)
    local d = delta[i]
    if d >= 0 then
      -- At most one window of debt beyond an empty bucket (as the memory limiter).
      gcra_store(keys[i], math.min(rel + t[i] * d, 2 * t[i] * burst[i]), now_s, now_ns)
    elseif v == 1 then
      gcra_store(keys[i], math.max(rel + t[i] * d, 0), now_s, now_ns)
    end
  end
end

-- Tests every bucket without writing. Returns the reply {verdict, index, wait, rel...} and a
-- function that applies the charges (call it only when the verdict is 0). Verdict 0 allowed
-- (rel after the charge), 1 refused (index of the longest wait, wait ns), 2 too large (index);
-- rel is tat - now in ns, 0 for a full bucket.
local function gcra_check(keys, a, now_s, now_ns)
  local t, burst, cost = gcra_params(keys, a)
  local n = #keys
  local rels, nexts = {}, {}
  local refused, wait, too_large = 0, 0, 0
  for i = 1, n do
    local rel = gcra_rel(keys[i], now_s, now_ns)
    rels[i], nexts[i] = rel, rel
    if cost[i] > burst[i] then
      if too_large == 0 then too_large = i end
    elseif cost[i] > 0 then
      local earliest = rel + t[i] * (cost[i] - 1) - t[i] * (burst[i] - 1)
      if earliest > 0 then
        if refused == 0 or earliest > wait then refused, wait = i, earliest end
      else
        nexts[i] = rel + t[i] * cost[i]
      end
    end
  end
  local reply
  if too_large > 0 then
    reply = { 2, too_large, 0 }
  elseif refused > 0 then
    reply = { 1, refused, wait }
  else
    reply = { 0, 0, 0 }
    rels = nexts
  end
  for i = 1, n do reply[#reply + 1] = rels[i] end
  local function apply()
    for i = 1, n do
      if cost[i] > 0 then gcra_store(keys[i], nexts[i], now_s, now_ns) end
    end
  end
  return reply, apply
end
