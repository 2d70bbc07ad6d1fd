-- GCRA on several buckets, all-or-nothing: the arithmetic of `ratelimit::gcra` (governor's),
-- on times relative to now so that Lua's doubles stay exact (nanoseconds, |rel| < 2^53).
-- KEYS: the buckets. A bucket's value is its theoretical arrival time `"sec nsec"`, expiring
-- when it is reached (a full bucket and a missing one are the same).
-- ARGV: frozen seconds or '' (then Redis `TIME`), frozen nanoseconds, 'check' | 'settle',
--       then per bucket: t (ns per cell), burst, cost (check) or delta (settle).
-- check returns {verdict, index, wait, rel...}: verdict 0 allowed (rel after the charge),
-- 1 refused (index of the longest wait, wait ns), 2 too large (index); rel is tat - now in ns,
-- 0 for a full bucket. settle returns {}.
local now_s, now_ns
if ARGV[1] ~= '' then
  now_s, now_ns = tonumber(ARGV[1]), tonumber(ARGV[2])
else
  local time = redis.call('TIME')
  now_s, now_ns = tonumber(time[1]), tonumber(time[2]) * 1000
end

local function rel_of(key)
  local v = redis.call('GET', key)
  if not v then return 0 end
  local s, ns = string.match(v, '^(%d+) (%d+)$')
  if not s then return 0 end
  local rel = (tonumber(s) - now_s) * 1e9 + (tonumber(ns) - now_ns)
  if rel < 0 then return 0 end
  return rel
end

local function store(key, rel)
  if rel <= 0 then
    redis.call('DEL', key)
    return
  end
  local total = now_ns + rel
  local s = now_s + math.floor(total / 1e9)
  local ns = total % 1e9
  redis.call('SET', key, string.format('%d %d', s, ns), 'PX', string.format('%d', math.ceil(rel / 1e6) + 1))
end

local n = #KEYS
local t, burst, amount = {}, {}, {}
for i = 1, n do
  local b = 3 + (i - 1) * 3
  t[i], burst[i], amount[i] = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
end

if ARGV[3] == 'settle' then
  for i = 1, n do
    local v = redis.call('EXISTS', KEYS[i])
    local rel = rel_of(KEYS[i])
    local d = amount[i]
    if d >= 0 then
      store(KEYS[i], rel + t[i] * d)
    elseif v == 1 then
      store(KEYS[i], math.max(rel + t[i] * d, 0))
    end
  end
  return {}
end

local rels, nexts = {}, {}
local refused, wait, too_large = 0, 0, 0
for i = 1, n do
  local rel = rel_of(KEYS[i])
  rels[i], nexts[i] = rel, rel
  local cost = amount[i]
  if cost > burst[i] then
    if too_large == 0 then too_large = i end
  elseif cost > 0 then
    local earliest = rel + t[i] * (cost - 1) - t[i] * (burst[i] - 1)
    if earliest > 0 then
      if refused == 0 or earliest > wait then refused, wait = i, earliest end
    else
      nexts[i] = rel + t[i] * cost
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
  for i = 1, n do
    if amount[i] > 0 then store(KEYS[i], nexts[i]) end
  end
  rels = nexts
end
for i = 1, n do reply[#reply + 1] = rels[i] end
return reply
