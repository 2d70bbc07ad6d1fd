-- Shared by every ledger script. KEYS[1] is the account's hash `P` (`tollgate:{acct:ID}`);
-- every other key of the account is `P..suffix`, in the same hash slot.
--   P            hash    balance, held, holds, seq
--   P:holds      hash    hold id -> cjson {a = amount (decimal string), r, k, i}
--   P:expiry     zset    hold id by expiry (ms)
--   P:journal    stream  one entry per movement, id `seq-0` (the latest JOURNAL_MAX if > 0)
--   P:idem:KEY   hash    fp, hold, charged (PEXPIREd at the idempotency window)
--   P:topups     hash    top-up idempotency key -> amount
--   P:closed:ID  string  a hold closed before it was placed (a timed-out reserve); PX hold TTL
local P = KEYS[1]
local HOLDS, EXPIRY, JOURNAL = P .. ':holds', P .. ':expiry', P .. ':journal'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(v)
  return tonumber(v) or 0
end

-- Numbers go to Redis as exact integers (never `1e+15`).
local function int(n)
  return string.format('%d', n)
end

local function state()
  local s = redis.call('HMGET', P, 'balance', 'held', 'holds')
  return num(s[1]), num(s[2]), num(s[3])
end

local function journal(now, kind, amount, hold, id, balance, held, r, k, i)
  local seq = redis.call('HINCRBY', P, 'seq', 1)
  local fields = { 't', int(now), 'k', kind, 'a', int(amount), 'h', int(hold), 'b', int(balance), 'held', int(held) }
  if id then fields[#fields + 1] = 'id'; fields[#fields + 1] = id end
  if r and r ~= '' then fields[#fields + 1] = 'r'; fields[#fields + 1] = r end
  if k and k ~= '' then fields[#fields + 1] = 'key'; fields[#fields + 1] = k end
  if i and i ~= '' then fields[#fields + 1] = 'i'; fields[#fields + 1] = i end
  -- JOURNAL_MAX (a constant the backend prepends, 0: unbounded) keeps the latest entries only:
  -- Redis memory per account stays flat under load.
  if JOURNAL_MAX > 0 then
    redis.call('XADD', JOURNAL, 'MAXLEN', JOURNAL_MAX, string.format('%d-0', seq), unpack(fields))
  else
    redis.call('XADD', JOURNAL, string.format('%d-0', seq), unpack(fields))
  end
end

-- Close an open hold: 'settle' (charging `actual`, at most what is not held by others),
-- 'release' (nothing) or 'expire' (its amount). Returns the credits charged, or nil.
local function close(id, how, actual, now)
  local raw = redis.call('HGET', HOLDS, id)
  if not raw then return nil end
  local h = cjson.decode(raw)
  redis.call('HDEL', HOLDS, id)
  redis.call('ZREM', EXPIRY, id)
  local balance, held, holds = state()
  local amount = tonumber(h.a)
  held = held - amount
  local charged = 0
  if how == 'settle' then
    charged = math.min(actual, balance - held)
  elseif how == 'expire' then
    charged = amount
  end
  balance = balance - charged
  redis.call('HSET', P, 'balance', int(balance), 'held', int(held), 'holds', int(holds - 1))
  if h.i and h.i ~= '' then
    local ik = P .. ':idem:' .. h.i
    if redis.call('HGET', ik, 'hold') == id then
      if how == 'release' then
        redis.call('DEL', ik) -- not charged: the key may be used again
      else
        redis.call('HSET', ik, 'charged', 1)
      end
    end
  end
  journal(now, how, charged, amount, id, balance, held, h.r, h.k, h.i)
  return charged
end

-- Settle at their amount the account's holds that expired at or before `now` (at most `max`).
local function expire_due(now, max)
  local due = redis.call('ZRANGEBYSCORE', EXPIRY, '-inf', int(now), 'LIMIT', 0, int(max))
  local count, charged = 0, 0
  for _, id in ipairs(due) do
    local c = close(id, 'expire', 0, now)
    if c then count = count + 1; charged = charged + c end
  end
  return count, charged
end
