-- KEYS[1]: the key's hash. ARGV[1]: the key store's prefix (every key in the same slot).
-- Returns {} or {key fields, account fields, plan models or false}.
local key = redis.call('HGETALL', KEYS[1])
if #key == 0 then return {} end
local f = {}
for i = 1, #key, 2 do f[key[i]] = key[i + 1] end
local account = redis.call('HGETALL', ARGV[1] .. 'account:' .. f.account)
local plan = f.plan
if not plan or plan == '' then
  for i = 1, #account, 2 do
    if account[i] == 'plan' then plan = account[i + 1] end
  end
end
local models = false
if plan then models = redis.call('GET', ARGV[1] .. 'plan:' .. plan) end
return { key, account, models }
