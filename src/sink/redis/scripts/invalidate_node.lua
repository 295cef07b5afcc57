#!lua flags=allow-cross-slot-keys
-- Invalidates, on ONE primary of a Redis Cluster, the keys and dependency sets of a batch that
-- this primary serves, whatever their hash slots: one call per node instead of one command per
-- slot (a batch names thousands of keys, nearly each in a slot of its own, and a command per
-- slot was most of walsweep's and Redis's work on a cluster).
--
-- No key is declared: Redis refuses declared keys of several slots before running anything.
-- The flag lets each command here touch its own slot; Redis still checks that the slot is
-- served by this node and not moving away. If it is not ("non local key"), the error ends the
-- call and the client applies the batch again on a fresh slot map. Everything is idempotent.
--
-- ARGV[1]: how many keys to unlink follow (ARGV[2] on); every ARGV after them is a dependency
--          set ({prefix}::rdep::{dep}) to read. The members of a set usually live on other
--          nodes, so they are returned, not unlinked here; no set is changed here (the client
--          removes what it unlinked, when asked to, after unlinking it).
-- Returns {keys_unlinked, sets_of_wrong_type, {{set, member...}, ...}} (non-empty sets only).
--
-- Per key one UNLINK: a command may not span slots even here, and a batch's keys are nearly
-- all in slots of their own. Per set an EXISTS first: most sets do not exist (nothing cached)
-- and EXISTS answers with a number, where SMEMBERS builds a table for Lua to collect; that
-- garbage made the call cost Redis half again as much.
local keys = tonumber(ARGV[1])
local unlinked = 0
for i = 2, keys + 1 do
  unlinked = unlinked + redis.call('UNLINK', ARGV[i])
end

local wrong_type = 0
local found = {}
for i = keys + 2, #ARGV do
  local set = ARGV[i]
  if redis.call('EXISTS', set) == 1 then
    local members = redis.pcall('SMEMBERS', set)
    if members.err then
      -- Any error but WRONGTYPE is raised: skipping the set in silence would leave its
      -- entries stale.
      if not string.find(members.err, 'WRONGTYPE') then error(members) end
      -- Not a set: not ours to interpret. Reported, never fatal, never retried forever.
      wrong_type = wrong_type + 1
    else
      -- Redis drops a set with its last member, so an existing set has members.
      table.insert(members, 1, set)
      found[#found + 1] = members
    end
  end
end
return {unlinked, wrong_type, found}
