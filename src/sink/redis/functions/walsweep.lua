#!lua name=walsweep
-- walsweep's Redis Functions: fenced fills (README, "Fenced fills"). Loaded by walsweep at start
-- and by `walsweep setup` (FUNCTION LOAD REPLACE). walsweep_version returns the version below;
-- bump it with any change here.
--
-- Fences: before walsweep unlinks a key or invalidates a dependency set for a commit, it sets
-- walsweep:fence:<that key> to the commit's LSN (a decimal number, never lowered, with a TTL);
-- a table-wide invalidation sets walsweep:fence-all. A fill that began before that commit was
-- applied (its token, walsweep's applied position then, is lower) may have read the old row, so
-- walsweep_fill refuses it.

local VERSION = '1'

-- Decimal LSNs without leading zeros: compared by length, then as strings (Lua numbers would
-- lose precision past 2^53).
local function newer(a, b)
  return #a > #b or (#a == #b and a > b)
end

-- walsweep_fill_begin: KEYS[1] = walsweep's applied-position key
-- (walsweep:<database>/<slot>:applied). Returns the token: that position, or '0'.
-- Take it before reading the database.
local function fill_begin(keys, args)
  return redis.call('GET', keys[1]) or '0'
end

-- walsweep_fill: stores a value the app read from the database, unless a commit it may have
-- missed was invalidated since its token.
--   KEYS[1] the data key          KEYS[2] its fence (walsweep:fence:<data key>)
--   KEYS[3] walsweep:fence-all    KEYS[4] the counters hash (walsweep:fills)
--   KEYS[5..] pairs: a dependency set, then its fence (walsweep:fence:<set key>)
--   ARGV[1] the token from walsweep_fill_begin   ARGV[2] the value   ARGV[3] TTL in seconds
-- Returns 1 when stored (SETEX the value, SADD the data key to each set and never shorten a
-- set's TTL, as matroska-cache's put() does), 0 when refused (nothing written).
local function fill(keys, args)
  local token, value, ttl = args[1], args[2], tonumber(args[3])
  if not ttl or ttl <= 0 then
    return redis.error_reply('walsweep_fill: ARGV[3] must be a TTL in seconds, got ' .. tostring(args[3]))
  end
  if (#keys - 4) % 2 ~= 0 then
    return redis.error_reply('walsweep_fill: KEYS[5..] must be pairs of a set and its fence')
  end
  local fences = {keys[2], keys[3]}
  for i = 6, #keys, 2 do fences[#fences + 1] = keys[i] end
  for _, fence in ipairs(fences) do
    local at = redis.call('GET', fence)
    if at and newer(at, token) then
      redis.call('HINCRBY', keys[4], 'refused', 1)
      return 0
    end
  end
  for i = 5, #keys, 2 do
    local set = keys[i]
    redis.call('SADD', set, keys[1])
    -- -1 (no TTL yet) is shorter than any TTL, as in matroska-cache.
    if redis.call('TTL', set) < ttl then redis.call('EXPIRE', set, ttl) end
  end
  redis.call('SET', keys[1], value, 'EX', ttl)
  redis.call('HINCRBY', keys[4], 'stored', 1)
  return 1
end

local function version(keys, args)
  return VERSION
end

redis.register_function{function_name = 'walsweep_fill_begin', callback = fill_begin, flags = {'no-writes'}}
redis.register_function{function_name = 'walsweep_fill', callback = fill}
redis.register_function{function_name = 'walsweep_version', callback = version, flags = {'no-writes'}}
