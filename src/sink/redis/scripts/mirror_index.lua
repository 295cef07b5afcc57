-- Moves mirror index members on a Redis Cluster, where a row and its index keys live in
-- different hash slots (one-node sinks do this inside mirror_rows.lua). One call covers index
-- moves of one slot, in commit order.
--   KEYS: the index key of each move.
--   ARGV: per move, 'r' then the member (ZREM); 'a' then member and score (ZADD); or 'A' then
--         member, score, retention min and max ('' = none): ZADD, then drop members scored below
--         max (ZREMRANGEBYSCORE min (max).
-- Returns {0, 0, 0, 0, index keys of another type (left alone, as in mirror_rows.lua)}.
local wrong_type = 0

-- Only WRONGTYPE is tolerated: any other error (an ACL denying the command, say) is raised.
local function zcall(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    if not string.find(reply.err, '^WRONGTYPE') then error(reply) end
    wrong_type = wrong_type + 1
    return false
  end
  return true
end

local a = 1
for _, key in ipairs(KEYS) do
  local op = ARGV[a]
  if op == 'r' then
    zcall('ZREM', key, ARGV[a + 1])
    a = a + 2
  elseif op == 'a' or op == 'A' then
    local added = zcall('ZADD', key, ARGV[a + 2], ARGV[a + 1])
    if op == 'A' then
      if added and ARGV[a + 3] ~= '' then
        zcall('ZREMRANGEBYSCORE', key, ARGV[a + 3], '(' .. ARGV[a + 4])
      end
      a = a + 5
    else
      a = a + 3
    end
  else
    return redis.error_reply('mirror_index: malformed move ' .. tostring(op))
  end
end
return {0, 0, 0, 0, wrong_type}
