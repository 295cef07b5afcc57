-- Advances walsweep's published applied position, never back, and wakes its waiters.
-- KEYS[1]: the position key, also the Pub/Sub channel.
-- ARGV[1]: the LSN as decimal digits without leading zeros (compared as a string of its
-- length: Lua numbers would lose precision past 2^53).
-- Returns 1 when the position moved, 0 when it already was at or past ARGV[1].
local current = redis.call('GET', KEYS[1])
local new = ARGV[1]
if current and (#current > #new or (#current == #new and current >= new)) then
  return 0
end
redis.call('SET', KEYS[1], new)
redis.call('PUBLISH', KEYS[1], new)
return 1
