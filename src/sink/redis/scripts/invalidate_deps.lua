-- Invalidates matroska-cache dependency sets atomically (one call, single node).
-- KEYS: dependency sets ({prefix}::rdep::{dep}).
-- ARGV[1]: "1" to delete each set after its members, "0" to keep it (the default: a reader
--          that raced this invalidation may SETEX a member after we unlinked it, and the kept
--          set lets the next change find and remove that entry).
-- Returns {keys_unlinked, sets_seen, sets_of_wrong_type}.
local chunk = 512

local function unlink_all(keys)
  local unlinked = 0
  for i = 1, #keys, chunk do
    unlinked = unlinked + redis.call('UNLINK', unpack(keys, i, math.min(i + chunk - 1, #keys)))
  end
  return unlinked
end

-- Most sets named by a change do not exist (nothing cached) and a missing key reads as an
-- empty set, so one SUNION over all of them answers the common case in one command instead of
-- one command per set: per-set calls from Lua were most of Redis's CPU draining a backlog.
if #KEYS == 0 then
  return {0, 0, 0}
end
local union = redis.pcall('SUNION', unpack(KEYS))
if not union.err then
  if #union == 0 then
    return {0, 0, 0}
  end
  -- Redis drops a set when its last member goes, so every existing key here is a non-empty set.
  local seen = redis.call('EXISTS', unpack(KEYS))
  local unlinked = unlink_all(union)
  if ARGV[1] == '1' then
    unlink_all(KEYS)
  end
  return {unlinked, seen, 0}
end
-- Any error but WRONGTYPE (an ACL denying SUNION, say) is raised: skipping the sets in silence
-- would leave their entries stale.
if not string.find(union.err, '^WRONGTYPE') then error(union) end

-- Some key is not a set: go set by set so the others are still invalidated and the odd ones
-- are counted.
local unlinked = 0
local seen = 0
local wrong_type = 0
for _, set in ipairs(KEYS) do
  local members = redis.pcall('SMEMBERS', set)
  if type(members) == 'table' and members.err then
    if not string.find(members.err, '^WRONGTYPE') then error(members) end
    -- Not a set: not ours to interpret. Reported, never fatal, never retried forever.
    wrong_type = wrong_type + 1
  elseif #members > 0 then
    seen = seen + 1
    unlinked = unlinked + unlink_all(members)
    if ARGV[1] == '1' then
      redis.call('UNLINK', set)
    end
  end
end
return {unlinked, seen, wrong_type}
