-- ARGV: amount, idempotency key, maximum balance, then (from plan, to plan) pairs.
-- KEYS[2], when given: the key store's account hash; an applied top-up moves the account from a
-- `from` plan to its `to` plan in this same script (plan promotion), a replay never does.
-- Returns {'applied', balance, held, holds [, from, to]} | {'duplicate', balance, held, holds}
--       | {'reused', amount} | {'overflow'}
local amount, ikey, max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local S = load(false)
local previous = redis.call('HGET', P .. ':topups', ikey)
if previous then
  if tonumber(previous) == amount then return { 'duplicate', S.balance, S.held, S.holds } end
  return { 'reused', tonumber(previous) }
end
if S.balance + amount > max then return { 'overflow' } end
S.balance = S.balance + amount
redis.call('HSET', P .. ':topups', ikey, ARGV[1])
journal(S, NOW, 'top_up', amount, 0, nil, enc(ikey) .. '0:0:')
flush(S)
local balance, held, holds = S.balance, S.held, S.holds
if KEYS[2] then
  local plan = redis.call('HGET', KEYS[2], 'plan')
  if plan then
    for i = 4, #ARGV - 1, 2 do
      if ARGV[i] == plan then
        redis.call('HSET', KEYS[2], 'plan', ARGV[i + 1])
        return { 'applied', balance, held, holds, plan, ARGV[i + 1] }
      end
    end
  end
end
return { 'applied', balance, held, holds }
