-- Reads index scores for drift checks: the score of member ARGV[i] in sorted set KEYS[i].
-- Returns one item per pair: the score as Redis prints it, or false when the member (or the
-- set) is absent or the key holds another type. Any other error (an ACL denying ZSCORE) is
-- raised: reading it as "absent" would report every index entry as missing.
local out = {}
for i, key in ipairs(KEYS) do
  local reply = redis.pcall('ZSCORE', key, ARGV[i])
  if type(reply) == 'table' and reply.err then
    if not string.find(reply.err, '^WRONGTYPE') then error(reply) end
    out[i] = false
  else
    out[i] = reply
  end
end
return out
