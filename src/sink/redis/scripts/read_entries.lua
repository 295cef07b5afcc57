-- Reads mirror entries for drift checks (`walsweep verify`, the inspector), whatever type each
-- key holds, so one key of an unexpected type cannot fail the whole read.
--   KEYS: the entries' keys.
-- Returns one item per key: {'string', value}, {'hash', {field, value, ...}}, {'none'}, or
-- {type} for any other type (its content is not needed to call it wrong).
local out = {}
for i, key in ipairs(KEYS) do
  local t = redis.call('TYPE', key).ok
  if t == 'string' then
    out[i] = {t, redis.call('GET', key)}
  elseif t == 'hash' then
    out[i] = {t, redis.call('HGETALL', key)}
  else
    out[i] = {t}
  end
end
return out
