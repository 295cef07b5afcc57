-- Publishes one transaction's broadcast message at most once, chained to the previous one.
-- KEYS[1]: state key holding "<16-hex-digit LSN> <LSN text>" of the last message published;
-- KEYS[2] (optional): the stream to XADD to.
-- ARGV[1]: this commit's LSN as 16 hex digits ('' for a reset message, which clears the chain);
-- ARGV[2]: the LSN text (0/16B3748); ARGV[3]: the message body, a JSON object without
-- prev_lsn; ARGV[4]: Pub/Sub channel or ''; ARGV[5]: the stream's approximate MAXLEN.
-- Returns 1 when published, 0 when this LSN was already published (a redelivery).
local last = redis.call('GET', KEYS[1])
local prev = 'null'
if last then
  local hex, text = string.match(last, '^(%x+) (.+)$')
  if hex and ARGV[1] ~= '' and hex >= ARGV[1] then return 0 end
  if text and ARGV[1] ~= '' then prev = '"' .. text .. '"' end
end
local message = '{"prev_lsn":' .. prev .. ',' .. string.sub(ARGV[3], 2)
if KEYS[2] then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'message', message)
end
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], message)
end
if ARGV[1] ~= '' then
  redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
