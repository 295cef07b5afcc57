-- Invalidates matroska-cache dependency sets atomically (one call, single node).
-- KEYS: dependency sets ({prefix}::rdep::{dep}).
-- ARGV[1]: "1" to delete each set after its members, "0" to keep it (the default: a reader
--          that raced this invalidation may SETEX a member after we unlinked it, and the kept
--          set lets the next change find and remove that entry).
-- Returns {keys_unlinked, sets_seen, sets_of_wrong_type}.
local unlinked = 0
local seen = 0
local wrong_type = 0
local chunk = 512
for _, set in ipairs(KEYS) do
  local kind = redis.call('TYPE', set).ok
  if kind == 'set' then
    seen = seen + 1
    local members = redis.call('SMEMBERS', set)
    for i = 1, #members, chunk do
      unlinked = unlinked + redis.call('UNLINK', unpack(members, i, math.min(i + chunk - 1, #members)))
    end
    if ARGV[1] == '1' then
      redis.call('UNLINK', set)
    end
  elseif kind ~= 'none' then
    -- Not a set: not ours to interpret. Reported, never fatal, never retried forever.
    wrong_type = wrong_type + 1
  end
end
return {unlinked, seen, wrong_type}
