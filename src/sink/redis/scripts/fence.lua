-- Raises fences before walsweep invalidates (README, "Fenced fills"): for each key, a fence key
-- holding the commit LSN, never lowered, expiring after the TTL.
-- KEYS: the fence keys (walsweep:fence:<key>, or walsweep:fence-all).
-- ARGV[1]: the LSN as decimal digits without leading zeros; ARGV[2]: the TTL in ms.
-- Returns how many fences were raised.
local lsn, ttl, raised = ARGV[1], ARGV[2], 0
for _, fence in ipairs(KEYS) do
  local at = redis.call('GET', fence)
  if not at or #lsn > #at or (#lsn == #at and lsn > at) then
    redis.call('SET', fence, lsn, 'PX', ttl)
    raised = raised + 1
  else
    redis.call('PEXPIRE', fence, ttl)
  end
end
return raised
