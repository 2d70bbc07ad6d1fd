-- GCRA on several buckets, all-or-nothing: the arithmetic of `ratelimit::gcra` (governor's),
-- on times relative to now so that Lua's doubles stay exact (nanoseconds, |rel| < 2^53).
-- A bucket's value is its theoretical arrival time `"sec nsec"`: a string key expiring when it
-- is reached (a bucket of a key or of the whole gateway), or a field of the account's hash (a
-- bucket of an account, beside its balance: the ledger's scripts read and write it with the
-- same HMGET and HSET). A full bucket and a missing one are the same. These functions only
-- compute: the scripts read the values and write the results.
-- A bucket's parameters are four ARGV from `a` on: field ('' for a string key), t (ns per
-- cell), burst, cost or delta.

local function gcra_params(ARGV, a, n)
  local field, t, burst, amount = {}, {}, {}, {}
  for i = 1, n do
    local b = a + (i - 1) * 4
    field[i], t[i], burst[i], amount[i] = ARGV[b], tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  end
  return field, t, burst, amount
end

-- The arrival time stored in `v` (a string or false), relative to now (0: full).
local function gcra_rel(v, now_s, now_ns)
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

-- The value for an arrival time `rel` from now, and its lifetime in ms; false for a full bucket
-- (delete it).
local function gcra_value(rel, now_s, now_ns)
  if rel <= 0 then return false, 0 end
  if rel > MAX_REL then rel = MAX_REL end
  local total = now_ns + rel
  local s = now_s + math.floor(total / 1e9)
  local ns = total % 1e9
  return string.format('%d %d', s, ns), math.ceil(rel / 1e6) + 1
end

-- Corrections, never refused: a positive delta consumes (possibly into debt), a negative one
-- gives back, never beyond a full bucket. `ids[i]` names bucket i (the same name twice: the
-- same bucket, corrected twice in turn), `vals[i]` its value. Returns the writes in order:
-- {i, value or false (delete), ms}, only for the buckets that change.
local function gcra_settle(ids, vals, t, burst, delta, now_s, now_ns)
  local cur, writes = {}, {}
  for i = 1, #ids do
    local v = cur[ids[i]]
    if v == nil then v = vals[i] end
    local rel = gcra_rel(v, now_s, now_ns)
    local d, out = delta[i], nil
    if d >= 0 then
      -- At most one window of debt beyond an empty bucket (as the memory limiter).
      out = math.min(rel + t[i] * d, 2 * t[i] * burst[i])
    elseif v then
      out = math.max(rel + t[i] * d, 0)
    end
    if out ~= nil then
      local value, ms = gcra_value(out, now_s, now_ns)
      cur[ids[i]] = value
      writes[#writes + 1] = { i, value, ms }
    end
  end
  return writes
end

-- Tests every bucket without writing: bucket i's parameters are `args[a + 4(i-1) ...]` (field, t,
-- burst, cost) and its value `vals[o + i]` (a string or false), so the scripts pass their ARGV and
-- HMGET reply as they are. Returns the reply {verdict, index, wait, rel...}: verdict 0 allowed
-- (rel after the charge), 1 refused (index of the longest wait, wait ns), 2 too large (index);
-- rel is tat - now in ns, 0 for a full bucket. When allowed, gcra_charge gives the writes.
local function gcra_check(args, a, n, vals, o, now_s, now_ns)
  local reply, nexts = { 0, 0, 0 }, {}
  local refused, wait, too_large = 0, 0, 0
  for i = 1, n do
    local b = a + 4 * i - 4
    local t, burst, cost = tonumber(args[b + 1]), tonumber(args[b + 2]), tonumber(args[b + 3])
    local rel = gcra_rel(vals[o + i], now_s, now_ns)
    reply[3 + i], nexts[i] = rel, rel
    if cost > burst then
      if too_large == 0 then too_large = i end
    elseif cost > 0 then
      local earliest = rel + t * (cost - 1) - t * (burst - 1)
      if earliest > 0 then
        if refused == 0 or earliest > wait then refused, wait = i, earliest end
      else
        nexts[i] = rel + t * cost
      end
    end
  end
  if too_large > 0 then
    reply[1], reply[2] = 2, too_large
  elseif refused > 0 then
    reply[1], reply[2], reply[3] = 1, refused, wait
  else
    for i = 1, n do reply[3 + i] = nexts[i] end
  end
  return reply
end

-- The charge of an allowed gcra_check (its `reply`): bucket i's new value and its lifetime in
-- ms, for each bucket whose cost is not 0, as `charge(i, value, ms)`.
local function gcra_charge(args, a, n, reply, now_s, now_ns, charge)
  for i = 1, n do
    if tonumber(args[a + 4 * i - 1]) > 0 then
      charge(i, gcra_value(reply[3 + i], now_s, now_ns))
    end
  end
end
