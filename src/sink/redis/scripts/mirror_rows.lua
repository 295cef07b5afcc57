-- Writes mirrored rows and moves their sorted-set index members: one call covers a group of
-- rows and is atomic, so a reader never sees a row without its index entry or the reverse.
-- Rows are encoded back to back (see redis/mirror.rs, `push_row`):
--   ARGV: one header "<op><format><only_if_present><moved><retention>:<ttl>:<#removes>:<#adds>:
--         <#fields>:<#nulls>:<#keeps>" with op 'w' (write) or 'd' (delete), format 'J' (the
--         whole JSON document), 'j' (JSON fields to merge with the stored document) or 'h'
--         (hash), the three flags '0' / '1' and ttl seconds ('0' = none); then removes'
--         members; adds' (member, score), plus (retention min, retention max or '') when the
--         retention flag is set; then the row: 'J' one argument, the document; 'j' (name as a
--         JSON string literal, JSON value or '' for "keep the stored value") pairs; 'h'
--         (name, value) pairs; then null field names (hash: HDEL) and kept field names.
--   KEYS: target key, the source key when moved (the row's key changed), removes' index keys,
--         adds' index keys.
-- Returns {written, deleted, skipped (only_if_present and absent), incomplete (a kept field
-- had no stored value, so the row was removed instead of half-written, in either format),
-- index keys of another type (left alone)}.

local function skip_string(s, i)
  local j = i + 1
  while true do
    local q = s:find('["\\]', j)
    if not q then return nil end
    if s:byte(q) == 92 then j = q + 2 else return q + 1 end
  end
end

local function skip_value(s, i)
  local c = s:byte(i)
  if c == 34 then return skip_string(s, i) end
  if c == 123 or c == 91 then
    local depth, j = 0, i
    while true do
      local p = s:find('[{}%[%]"]', j)
      if not p then return nil end
      local b = s:byte(p)
      if b == 34 then
        j = skip_string(s, p)
        if not j then return nil end
      else
        if b == 123 or b == 91 then depth = depth + 1 else depth = depth - 1 end
        j = p + 1
        if depth == 0 then return j end
      end
    end
  end
  return s:find('[,}%]]', i)
end

-- Top-level fields of a compact JSON object walsweep wrote: name literal -> raw value text.
-- Raw text, never decoded: re-encoding would round numbers.
local function fields_of(doc)
  if type(doc) ~= 'string' or doc:byte(1) ~= 123 then return nil end
  local out = {}
  if doc:byte(2) == 125 then return out end
  local i = 2
  while true do
    if doc:byte(i) ~= 34 then return nil end
    local kend = skip_string(doc, i)
    if not kend or doc:byte(kend) ~= 58 then return nil end
    local vend = skip_value(doc, kend + 1)
    if not vend then return nil end
    out[doc:sub(i, kend - 1)] = doc:sub(kend + 1, vend - 1)
    local c = doc:byte(vend)
    if c == 125 then return out end
    if c ~= 44 then return nil end
    i = vend + 1
  end
end

local k, a = 1, 1
local written, deleted, skipped, incomplete, wrong_type = 0, 0, 0, 0, 0

-- Index keys of another type (another app's data under the same name) are reported, never
-- fatal: an error would fail the whole batch on every retry.
-- A key of another type (e.g. after switching format) counts as no stored row.
local function holds_row(key, want_type)
  return redis.call('TYPE', key).ok == want_type
end

-- Only WRONGTYPE means that: any other error (an ACL denying the command, say) is raised, so
-- walsweep stops and says so instead of leaving index entries out in silence.
local function zcall(...)
  local reply = redis.pcall(...)
  if type(reply) == 'table' and reply.err then
    if not string.find(reply.err, '^WRONGTYPE') then error(reply) end
    wrong_type = wrong_type + 1
    return false
  end
  return true
end
while a <= #ARGV do
  local op, fmt, oip, mv, ret, ttl, nrem, nadd, nfields, nnull, nkeep = string.match(ARGV[a],
    '^(%a)(%a)(%d)(%d)(%d):(%d+):(%d+):(%d+):(%d+):(%d+):(%d+)$')
  if not op then return redis.error_reply('mirror_rows: malformed row header ' .. tostring(ARGV[a])) end
  local only_present, ttl = oip == '1', tonumber(ttl)
  nrem, nadd, nfields = tonumber(nrem), tonumber(nadd), tonumber(nfields)
  nnull, nkeep = tonumber(nnull), tonumber(nkeep)
  local add_width = ret == '1' and 4 or 2
  a = a + 1
  local target = KEYS[k]
  local source = target
  k = k + 1
  if mv == '1' then
    source = KEYS[k]
    k = k + 1
  end
  for _ = 1, nrem do
    zcall('ZREM', KEYS[k], ARGV[a])
    k, a = k + 1, a + 1
  end
  local add_keys, add_args = k, a
  k, a = k + nadd, a + add_width * nadd
  local fields_at = a
  a = a + (fmt == 'J' and 1 or 2 * nfields)
  local nulls_at = a
  a = a + nnull
  local keeps_at = a
  a = a + nkeep

  local index_it = op == 'w'
  if op == 'd' then
    if target ~= '' then deleted = deleted + redis.call('UNLINK', target) end
  else
    local moved = source ~= target
    local want_type = fmt == 'h' and 'hash' or 'string'
    local from = source
    local present = true
    if only_present or nkeep > 0 then
      if holds_row(source, want_type) then
        from = source
      elseif moved and holds_row(target, want_type) then
        -- A redelivered move: the row already sits at its new key.
        from = target
      else
        present = false
      end
    end
    if only_present and not present then
      skipped = skipped + 1
      index_it = false
    elseif nkeep > 0 and not present then
      incomplete = incomplete + 1
      redis.call('UNLINK', target)
      if moved then redis.call('UNLINK', source) end
    elseif fmt == 'J' then
      -- The whole document, built by walsweep: nothing to merge.
      if moved then redis.call('UNLINK', source) end
      if ttl > 0 then
        redis.call('SET', target, ARGV[fields_at], 'EX', ttl)
      else
        redis.call('SET', target, ARGV[fields_at])
      end
      written = written + 1
    elseif fmt == 'j' then
      local kept = {}
      if nkeep > 0 then
        -- holds_row made sure `from` is a string.
        kept = fields_of(redis.call('GET', from))
      end
      if kept == nil then
        incomplete = incomplete + 1
        redis.call('UNLINK', target)
        if moved then redis.call('UNLINK', source) end
      else
        local parts, complete = {}, true
        for i = 0, nfields - 1 do
          local name, value = ARGV[fields_at + 2 * i], ARGV[fields_at + 2 * i + 1]
          if value == '' then value = kept[name] end
          if value == nil then
            complete = false
            break
          end
          parts[#parts + 1] = name .. ':' .. value
        end
        if moved then redis.call('UNLINK', source) end
        if not complete then
          incomplete = incomplete + 1
          redis.call('UNLINK', target)
        elseif ttl > 0 then
          redis.call('SET', target, '{' .. table.concat(parts, ',') .. '}', 'EX', ttl)
          written = written + 1
        else
          redis.call('SET', target, '{' .. table.concat(parts, ',') .. '}')
          written = written + 1
        end
      end
    else
      local pairs_ = {}
      for i = 0, 2 * nfields - 1 do pairs_[#pairs_ + 1] = ARGV[fields_at + i] end
      local complete = true
      if nkeep > 0 then
        -- A kept value is never NULL (only large values are TOASTed), so a stored hash without
        -- the field predates it (e.g. the field was added to `columns`): like JSON, the row is
        -- removed rather than written without it.
        local keep_names = {}
        for i = 0, nkeep - 1 do keep_names[#keep_names + 1] = ARGV[keeps_at + i] end
        local values = redis.call('HMGET', from, unpack(keep_names))
        for i = 1, nkeep do
          if not values[i] then
            complete = false
            break
          end
          if from ~= target then
            pairs_[#pairs_ + 1] = keep_names[i]
            pairs_[#pairs_ + 1] = values[i]
          end
        end
      end
      if not complete then
        incomplete = incomplete + 1
        redis.call('UNLINK', target)
        if moved then redis.call('UNLINK', source) end
      else
        if nkeep == 0 or from ~= target then
          redis.call('UNLINK', target)
        elseif nnull > 0 then
          local names = {}
          for i = 0, nnull - 1 do names[#names + 1] = ARGV[nulls_at + i] end
          redis.call('HDEL', target, unpack(names))
        end
        if moved then redis.call('UNLINK', source) end
        if #pairs_ > 0 then redis.call('HSET', target, unpack(pairs_)) end
        if ttl > 0 then redis.call('EXPIRE', target, ttl) end
        written = written + 1
      end
    end
  end
  if index_it then
    for i = 0, nadd - 1 do
      local key = KEYS[add_keys + i]
      local at = add_args + add_width * i
      if zcall('ZADD', key, ARGV[at + 1], ARGV[at]) and add_width == 4 and ARGV[at + 2] ~= '' then
        zcall('ZREMRANGEBYSCORE', key, ARGV[at + 2], '(' .. ARGV[at + 3])
      end
    end
  end
end
return {written, deleted, skipped, incomplete, wrong_type}
