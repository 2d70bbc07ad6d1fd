-- ARGV: (none). Settles expired holds first. Returns {balance, held, holds}.
expire_due(now_ms(), 64)
local balance, held, holds = state()
return { balance, held, holds }
