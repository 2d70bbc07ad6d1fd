-- KEYS[1]: the account's hash, KEYS[2]: its journal list. ARGV: batch size.
-- Returns {drained, entries after it (at most the batch), oldest first}. Entries trimmed before
-- a record was configured are skipped: the first one returned is the oldest still kept.
local drained = tonumber(redis.call('HGET', KEYS[1], 'drained')) or 0
local first = redis.call('LINDEX', KEYS[2], 0)
if not first then return { drained } end
local start = drained + 1 - tonumber(string.match(first, '^(%d+) '))
if start < 0 then start = 0 end
local entries = redis.call('LRANGE', KEYS[2], start, start + tonumber(ARGV[1]) - 1)
return { drained, unpack(entries) }
