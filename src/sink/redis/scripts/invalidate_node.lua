#!lua flags=allow-cross-slot-keys
-- Invalidates, on ONE primary of a Redis Cluster, the keys and dependency sets of a batch that
-- this primary serves, whatever their hash slots: one call per node instead of one command per
-- slot (a batch names thousands of keys, nearly each in a slot of its own, and a command per
-- slot was most of walsweep's and Redis's work on a cluster).
--
-- No key is declared: Redis refuses declared keys of several slots before running anything.
-- The flag lets each command here touch its own slot; Redis still checks that the slot is
-- served by this node and not moving away. A key it refuses ("non local key": its slot moved,
-- or is being migrated and the key is not here) is handed back to the client, which sends it
-- where the cluster redirects it; the rest of the call goes on, so a resharding that takes
-- minutes does not hold invalidations back. Everything here is idempotent.
--
-- ARGV[1]: how many keys to unlink follow (ARGV[2] on); every ARGV after them is a dependency
--          set ({prefix}::rdep::{dep}) to read. The members of a set usually live on other
--          nodes, so they are returned, not unlinked here; no set is changed here (the client
--          removes what it unlinked, when asked to, after unlinking it).
-- Returns {keys_unlinked, sets_of_wrong_type, {{set, member...}, ...}, {key...}, {set...}}:
--          the non-empty sets with their members, then the keys and the sets refused here.
--
-- Per key one UNLINK: a command may not span slots even here, and a batch's keys are nearly
-- all in slots of their own. Per set an EXISTS first: most sets do not exist (nothing cached)
-- and EXISTS answers with a number, where SMEMBERS builds a table for Lua to collect; that
-- garbage made the call cost Redis half again as much.

-- Whether a command's error reply means the key is served elsewhere for now. Anything else
-- (the cluster down, an ACL) is raised: skipping the key in silence would leave it stale.
local function elsewhere(reply)
  if string.find(reply.err, 'non local key', 1, true) then return true end
  error(reply)
end

local keys = tonumber(ARGV[1])
local unlinked = 0
local refused_keys = {}
for i = 2, keys + 1 do
  local reply = redis.pcall('UNLINK', ARGV[i])
  if type(reply) == 'number' then
    unlinked = unlinked + reply
  elseif elsewhere(reply) then
    refused_keys[#refused_keys + 1] = ARGV[i]
  end
end

local wrong_type = 0
local found = {}
local refused_sets = {}
for i = keys + 2, #ARGV do
  local set = ARGV[i]
  local exists = redis.pcall('EXISTS', set)
  if exists == 1 then
    local members = redis.pcall('SMEMBERS', set)
    if not members.err then
      -- Redis drops a set with its last member, so an existing set has members.
      table.insert(members, 1, set)
      found[#found + 1] = members
    elseif string.find(members.err, 'WRONGTYPE', 1, true) then
      -- Not a set: not ours to interpret. Reported, never fatal, never retried forever.
      wrong_type = wrong_type + 1
    elseif elsewhere(members) then
      refused_sets[#refused_sets + 1] = set
    end
  elseif type(exists) == 'table' and elsewhere(exists) then
    refused_sets[#refused_sets + 1] = set
  end
end
return {unlinked, wrong_type, found, refused_keys, refused_sets}
