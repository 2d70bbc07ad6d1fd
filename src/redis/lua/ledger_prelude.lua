-- Shared by every ledger function of the tollgate library (see begin below). KEYS[1] is the
-- account's hash `P` (`tollgate:{acct:ID}`); its other keys are `P..suffix`, in the same slot.
--   P            hash    balance, held, holds, seq, due, drained, and one field per
--                          h:ID    open hold: "amount expiry_ms tail"
--                          c:ID    hold closed before it was placed (a timed-out reserve):
--                                  its fence's expiry (ms)
--                          rl:POLICY|I  the account's rate-limit buckets ("sec nsec")
--                        `due` is a lower bound of every hold's and fence's expiry: until it
--                        is reached no script looks for expired holds.
--   P:log        list    one entry per movement, oldest first: "seq t kind amount hold id
--                        balance held tail" (the latest JOURNAL_MAX if > 0; with RECORD, never
--                        one after `drained`, the last entry the record holds)
--   P:idem:KEY   hash    fp, hold, charged (PEXPIREd at the idempotency window)
--   P:topups     hash    top-up idempotency key -> amount
-- `tail` is the idempotency key, the request id and the key id, each as "length:text".
-- Every ledger function of the library starts with begin(KEYS, ARGV): the call's state below is
-- the library's (made once, at FUNCTION LOAD), reset for each call.
-- This runs on every billed request, twice: it avoids what costs Redis most here (measured with
-- scripts/bench_redis_lua.py): a table per call where one made at load serves, tables grown
-- one entry at a time, numbers turned into text by `..` (`%.14g`, slower than string.format's
-- `%d`), and writing fields that did not change.
local P, LOG, NOW_S, NOW_NS, NOW, JOURNAL_MAX, RECORD
local W, D, J, NJ = {}, {}, {}, 0

-- The call's account, Redis's time, and the two arguments every ledger call ends with (taken
-- off ARGV): the journal limit (0: unbounded) and whether a durable record drains the journal.
local function begin(keys, argv)
  P = keys[1]
  LOG = P .. ':log'
  local n = #argv
  JOURNAL_MAX, RECORD = tonumber(argv[n - 1]), argv[n] == '1'
  argv[n], argv[n - 1] = nil, nil
  local time = redis.call('TIME')
  local us = tonumber(time[2])
  NOW_S, NOW_NS = tonumber(time[1]), us * 1000
  NOW = NOW_S * 1000 + math.floor(us / 1000)
  -- A call that failed before its flush left its writes: never another call's.
  if next(W) then W = {} end
  if next(D) then D = {} end
  NJ = 0
end

local function num(v)
  return tonumber(v) or 0
end

-- Numbers go to Redis as exact integers (never `1e+15`); the small ones (held, holds, amounts)
-- are kept once made (the library's `string` is only reachable once a function runs).
local SMALL = {}
local function int(n)
  local s = SMALL[n]
  if s then return s end
  s = string.format('%d', n)
  if n >= 0 and n < 1024 then SMALL[n] = s end
  return s
end

local function enc(s)
  s = s or ''
  return string.format('%d:%s', #s, s)
end

-- The tail of a hold: enc(ikey) .. enc(r) .. enc(k), in one call.
local function tail_of(ikey, r, k)
  return string.format('%d:%s%d:%s%d:%s', #ikey, ikey, #r, r, #k, k)
end

-- The call's pending writes to P (field -> value), deletions from P (field -> true) and
-- journal entries (W, D, J), made by flush() in three commands at most (and a trim).

local function put(field, value)
  W[field] = value
  D[field] = nil
end

local function del(field)
  D[field] = true
  W[field] = nil
end

-- The account's state from HMGET's first six values; b0, h0, n0: balance, held and holds as
-- read (nil when missing), so that flush writes only what changed.
local function parse_state(v)
  local balance, held, holds = tonumber(v[1]), tonumber(v[2]), tonumber(v[3])
  return {
    balance = balance or 0, held = held or 0, holds = holds or 0, seq = num(v[4]),
    due = tonumber(v[5]), drained = num(v[6]), dirty = false,
    b0 = balance, h0 = held, n0 = holds,
  }
end

local function journal(S, now, kind, amount, hold, id, tail)
  S.seq = S.seq + 1
  S.dirty = true
  NJ = NJ + 1
  J[NJ] = string.format('%d %d %s %d %d %s %d %d %s', S.seq, now, kind, amount, hold, id or '0',
    S.balance, S.held, tail)
end

-- Only the state fields that changed are written (the hash ends the same).
local function flush(S)
  -- Room for the state and three more fields, made at once (a table grown one entry at a time
  -- is rehashed at each power of two).
  local args = { false, false, false, false, false, false, false, false, false, false, false, false, false, false }
  local n = 0
  if S.dirty then
    if S.balance ~= S.b0 then
      args[1], args[2], n = 'balance', int(S.balance), 2
      S.b0 = S.balance
    end
    if S.held ~= S.h0 then
      args[n + 1], args[n + 2], n = 'held', int(S.held), n + 2
      S.h0 = S.held
    end
    if S.holds ~= S.n0 then
      args[n + 1], args[n + 2], n = 'holds', int(S.holds), n + 2
      S.n0 = S.holds
    end
    args[n + 1], args[n + 2], n = 'seq', int(S.seq), n + 2
  end
  for f, v in pairs(W) do
    args[n + 1], args[n + 2], n = f, v, n + 2
    W[f] = nil
  end
  if n > 0 then redis.call('HSET', P, unpack(args, 1, n)) end
  if next(D) then
    local dels, m = {}, 0
    for f in pairs(D) do
      m = m + 1
      dels[m] = f
      D[f] = nil
    end
    redis.call('HDEL', P, unpack(dels, 1, m))
  end
  if NJ > 0 then
    local len = redis.call('RPUSH', LOG, unpack(J, 1, NJ))
    if JOURNAL_MAX > 0 then
      local keep = JOURNAL_MAX
      -- Entries the record does not hold yet are never trimmed.
      if RECORD and S.seq - S.drained > keep then keep = S.seq - S.drained end
      if len > keep then redis.call('LTRIM', LOG, -keep, -1) end
    end
    NJ = 0
  end
  S.dirty = false
end

-- The idempotency key of a hold's tail (first in it), '' when none.
local function tail_ikey(tail)
  if string.sub(tail, 1, 2) == '0:' then return '' end
  local c = string.find(tail, ':', 1, true)
  return string.sub(tail, c + 1, c + tonumber(string.sub(tail, 1, c - 1)))
end

-- Close the open hold `id` whose field holds `raw`: 'settle' (charging `actual`, at most what
-- is not held by others), 'release' (nothing) or 'expire' (its amount). Returns the credits
-- charged.
local function close_hold(S, id, raw, how, actual, now)
  local a, _, tail = string.match(raw, '^(%d+) (%d+) (.*)$')
  local amount = tonumber(a)
  del('h:' .. id)
  S.held = S.held - amount
  S.holds = S.holds - 1
  local charged = 0
  if how == 'settle' then
    charged = math.min(actual, S.balance - S.held)
  elseif how == 'expire' then
    charged = amount
  end
  S.balance = S.balance - charged
  S.dirty = true
  local i = tail_ikey(tail)
  if i ~= '' then
    local ik = P .. ':idem:' .. i
    if redis.call('HGET', ik, 'hold') == id then
      if how == 'release' then
        redis.call('DEL', ik) -- not charged: the key may be used again
      else
        redis.call('HSET', ik, 'charged', 1)
      end
    end
  end
  journal(S, now, how, charged, amount, id, tail)
  return charged
end

-- Settle at their amount the account's holds that expired at or before `now` (at most `max`,
-- oldest first), drop the fences that expired, and move `due` to the earliest expiry left.
-- One HGETALL: it runs only once `due` is reached. Returns {holds, charged}.
local function expire_due(S, now, max)
  local all = redis.call('HGETALL', P)
  local due, fences, next_due = {}, {}, nil
  for j = 1, #all, 2 do
    local f = all[j]
    if string.sub(f, 2, 2) == ':' then
      local c = string.sub(f, 1, 1)
      if c == 'h' then
        local e = tonumber(string.match(all[j + 1], '^%d+ (%d+) '))
        if e <= now then
          due[#due + 1] = { e, tonumber(string.sub(f, 3)), string.sub(f, 3), all[j + 1] }
        elseif not next_due or e < next_due then
          next_due = e
        end
      elseif c == 'c' then
        local e = tonumber(all[j + 1])
        if e <= NOW then
          del(f)
        elseif not next_due or e < next_due then
          next_due = e
        end
      end
    end
  end
  table.sort(due, function(x, y)
    if x[1] ~= y[1] then return x[1] < y[1] end
    return x[2] < y[2]
  end)
  local count, charged = 0, 0
  for _, d in ipairs(due) do
    if count >= max then
      if not next_due or d[1] < next_due then next_due = d[1] end
      break
    end
    charged = charged + close_hold(S, d[3], d[4], 'expire', 0, now)
    count = count + 1
  end
  if next_due then put('due', int(next_due)) else del('due') end
  S.due = next_due
  return count, charged
end

-- The account's state and the values of the fields `...` of P (at v[7], v[8], ...), in one
-- HMGET; expired holds are settled first (when `due` is reached), unless `keep_due`.
local function load(keep_due, ...)
  local v = redis.call('HMGET', P, 'balance', 'held', 'holds', 'seq', 'due', 'drained', ...)
  local S = parse_state(v)
  if not keep_due and S.due and S.due <= NOW then
    expire_due(S, NOW, 64)
    flush(S)
    v = redis.call('HMGET', P, 'balance', 'held', 'holds', 'seq', 'due', 'drained', ...)
    S = parse_state(v)
  end
  return S, v
end

-- The fields of `n` rate-limit buckets whose parameters start at args[a] (every 4th), as values.
local function bucket_fields(args, a, n)
  if n < 1 then return end
  return args[a], bucket_fields(args, a + 4, n - 1)
end

-- `due` after a hold or fence expiring at `e` is added.
local function add_due(S, e)
  if not S.due or e < S.due then
    S.due = e
    put('due', int(e))
  end
end
