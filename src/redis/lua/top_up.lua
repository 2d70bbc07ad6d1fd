-- ARGV: amount, idempotency key, maximum balance.
-- Returns {'applied' | 'duplicate', balance, held, holds} | {'reused', amount} | {'overflow'}
local amount, ikey, max = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local now = now_ms()
expire_due(now, 64)
local balance, held, holds = state()
local previous = redis.call('HGET', P .. ':topups', ikey)
if previous then
  if tonumber(previous) == amount then return { 'duplicate', balance, held, holds } end
  return { 'reused', tonumber(previous) }
end
if balance + amount > max then return { 'overflow' } end
balance = balance + amount
redis.call('HSET', P, 'balance', int(balance), 'held', int(held), 'holds', int(holds))
redis.call('HSET', P .. ':topups', ikey, ARGV[1])
journal(now, 'top_up', amount, 0, nil, balance, held, nil, nil, ikey)
return { 'applied', balance, held, holds }
