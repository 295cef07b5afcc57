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
  -- One call per set: most sets named by a change do not exist (nothing cached), and a missing
  -- key reads as an empty set. A key of another type answers WRONGTYPE, caught by pcall.
  local members = redis.pcall('SMEMBERS', set)
  if type(members) == 'table' and members.err then
    -- Any other error (an ACL denying SMEMBERS, say) is raised: skipping the set in silence
    -- would leave its entries stale.
    if not string.find(members.err, '^WRONGTYPE') then error(members) end
    -- Not a set: not ours to interpret. Reported, never fatal, never retried forever.
    wrong_type = wrong_type + 1
  elseif #members > 0 then
    seen = seen + 1
    for i = 1, #members, chunk do
      unlinked = unlinked + redis.call('UNLINK', unpack(members, i, math.min(i + chunk - 1, #members)))
    end
    if ARGV[1] == '1' then
      redis.call('UNLINK', set)
    end
  end
end
return {unlinked, seen, wrong_type}
