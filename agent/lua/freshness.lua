#!lua name=freshness
-- The Freshness function library: race-free fills for apps in any language,
-- and the operations the freshness-agent applies to keep this Redis fresh.
-- Installed (and reinstalled when missing or outdated) by the agent with
-- FUNCTION LOAD REPLACE; the reply shapes are documented in agent/README.md.
--
-- Keys it keeps, in the database the agent uses (all under `freshness:`):
--   freshness:config        hash: shards, tombstone_ms, fence_until, run_id,
--                           fail_closed:<namespace> = bound in ms
--   freshness:feed          hash: state, staleness_ms, fresh_at_ms, updated_at_ms
--   freshness:cursor        the agent's cursor (JSON)
--   freshness:v:<entity>    tombstone: highest version invalidated (expires)
--   freshness:d:<entity>    set: keys filled with a dependency on <entity>
--   freshness:s:<shard>     set: entities with dependents, per shard
--   freshness:n:<namespace> set: entities with dependents, per namespace
--   freshness:r:<shard>     fence: fills on <shard> refused until then (ms)
--   freshness:stats         hash: refused = fills refused so far
--
-- Redis Lua numbers are doubles, so versions (u64) are compared as decimal
-- strings, and the shard function fnv1a64 is computed on 16-bit limbs.

local LIBRARY_VERSION = '3'
local P = 'freshness:'
local CONFIG = P .. 'config'
local FEED = P .. 'feed'
-- unpack() takes at most a few thousand values; DEL goes in chunks.
local CHUNK = 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- shard(entity) = fnv1a64(entity bytes) mod shards, exactly as the hub.
local function shard_of(s, shards)
  local h0, h1, h2, h3 = 0x2325, 0x8422, 0x9ce4, 0xcbf2
  for i = 1, #s do
    h0 = bit.bxor(h0, string.byte(s, i))
    -- multiply by the FNV prime 0x100000001b3 (limbs 0x1b3, 0, 0x100, 0)
    local r0 = h0 * 435
    local r1 = h1 * 435
    local r2 = h2 * 435 + h0 * 256
    local r3 = h3 * 435 + h1 * 256
    local c = math.floor(r0 / 65536)
    h0 = r0 % 65536
    r1 = r1 + c
    c = math.floor(r1 / 65536)
    h1 = r1 % 65536
    r2 = r2 + c
    c = math.floor(r2 / 65536)
    h2 = r2 % 65536
    h3 = (r3 + c) % 65536
  end
  local m = h3 % shards
  m = (m * 65536 + h2) % shards
  m = (m * 65536 + h1) % shards
  return (m * 65536 + h0) % shards
end

-- A version as a canonical decimal string, or nil and why.
local function parse_version(s)
  if type(s) ~= 'string' or not string.match(s, '^%d+$') then
    return nil
  end
  local v = (string.gsub(s, '^0+', ''))
  if v == '' then
    v = '0'
  end
  if #v > 20 or (#v == 20 and v > '18446744073709551615') then
    return nil
  end
  return v
end

-- -1, 0 or 1 for canonical decimal strings a and b.
local function vcmp(a, b)
  if #a ~= #b then
    return (#a < #b) and -1 or 1
  end
  if a == b then
    return 0
  end
  return (a < b) and -1 or 1
end

-- The namespace of a valid entity, or nil.
local function namespace_of(entity)
  if #entity > 512 or string.find(entity, '%c') then
    return nil
  end
  local ns, id = string.match(entity, '^([a-z0-9][a-z0-9_%.%-]*):(.+)$')
  if ns == nil or #ns > 63 or id == nil then
    return nil
  end
  return ns
end

local function del_all(keys)
  local n = 0
  for i = 1, #keys, CHUNK do
    n = n + redis.call('DEL', unpack(keys, i, math.min(i + CHUNK - 1, #keys)))
  end
  return n
end

-- Deletes the keys that depend on entity and forgets them.
local function drop_dependents(entity)
  local dk = P .. 'd:' .. entity
  local keys = redis.call('SMEMBERS', dk)
  local n = del_all(keys)
  redis.call('DEL', dk)
  return n
end

local function config_shards()
  local s = redis.call('HGET', CONFIG, 'shards')
  return s and tonumber(s)
end

-- A refused fill: counted (the agent exports the count), and why.
local function refuse(reason)
  redis.call('HINCRBY', P .. 'stats', 'refused', 1)
  return { 0, reason }
end

-- The fill, shared by freshness_fill and freshness_fill_reason.
local function fill(keys, args)
  local key = keys[1]
  if key == nil or #keys ~= 1 then
    return redis.error_reply('ERR freshness_fill: numkeys must be 1 (the cache key)')
  end
  if string.sub(key, 1, #P) == P then
    return redis.error_reply('ERR freshness_fill: keys under ' .. P .. ' are the library\'s own: ' .. key)
  end
  local value, ttl = args[1], args[2]
  if value == nil or ttl == nil or not string.match(ttl, '^%d+$') then
    return redis.error_reply('ERR freshness_fill: TTL_MS must be a whole number of milliseconds (0 = no expiry), got ' .. tostring(ttl))
  end
  if #args < 4 or #args % 2 ~= 0 then
    return redis.error_reply('ERR freshness_fill: give VALUE TTL_MS then one or more ENTITY VERSION pairs')
  end
  local deps = {}
  for i = 3, #args, 2 do
    local entity = args[i]
    local ns = namespace_of(entity)
    if ns == nil then
      return redis.error_reply('ERR freshness_fill: argument ' .. i .. ' is not an entity namespace:id: ' .. entity)
    end
    local v = parse_version(args[i + 1])
    if v == nil then
      return redis.error_reply('ERR freshness_fill: argument ' .. (i + 1) .. ' is not a version (a u64, 0 = unknown): ' .. tostring(args[i + 1]))
    end
    deps[#deps + 1] = { entity, v, ns }
  end

  local cfg = redis.call('HMGET', CONFIG, 'shards', 'fence_until')
  if not cfg[1] then
    return refuse('not_ready')
  end
  local shards = tonumber(cfg[1])
  local now = now_ms()
  if cfg[2] and now < tonumber(cfg[2]) then
    return refuse('fenced')
  end
  for _, d in ipairs(deps) do
    local entity, v, ns = d[1], d[2], d[3]
    local bound = redis.call('HGET', CONFIG, 'fail_closed:' .. ns)
    if bound then
      local fresh_at = redis.call('HGET', FEED, 'fresh_at_ms')
      if not fresh_at or now - tonumber(fresh_at) > tonumber(bound) then
        return refuse('fail_closed ' .. ns)
      end
    end
    local shard = shard_of(entity, shards)
    d[4] = shard
    local fence = redis.call('GET', P .. 'r:' .. shard)
    if fence and now < tonumber(fence) then
      return refuse('reset ' .. entity .. ' shard ' .. shard)
    end
    local tomb = redis.call('GET', P .. 'v:' .. entity)
    if tomb and (v == '0' or vcmp(v, tomb) < 0) then
      return refuse('stale ' .. entity .. ' read ' .. v .. ' invalidated ' .. tomb)
    end
  end

  local ttl_ms = tonumber(ttl)
  if ttl_ms > 0 then
    redis.call('SET', key, value, 'PX', ttl)
  else
    redis.call('SET', key, value)
  end
  for _, d in ipairs(deps) do
    local entity, ns, shard = d[1], d[3], d[4]
    local dk = P .. 'd:' .. entity
    -- The dependency set lives as long as its longest-lived key: -2 new,
    -- -1 already without expiry (a key filled with TTL 0), else ms left.
    local left = redis.call('PTTL', dk)
    redis.call('SADD', dk, key)
    if ttl_ms == 0 then
      redis.call('PERSIST', dk)
    elseif left == -2 or (left >= 0 and left < ttl_ms) then
      redis.call('PEXPIRE', dk, ttl_ms)
    end
    redis.call('SADD', P .. 's:' .. shard, entity)
    redis.call('SADD', P .. 'n:' .. ns, entity)
  end
  return { 1, 'stored' }
end

-- FCALL freshness_fill 1 KEY VALUE TTL_MS ENTITY VERSION [ENTITY VERSION ...]
-- -> 1 stored, 0 refused
local function freshness_fill(keys, args)
  local r = fill(keys, args)
  if type(r) == 'table' and r[1] ~= nil then
    return r[1]
  end
  return r
end

-- Same arguments -> {1, "stored"} or {0, reason}
local function freshness_fill_reason(keys, args)
  return fill(keys, args)
end

-- FCALL freshness_apply 0 TOMBSTONE_MS {ENTITY VERSION SHARD NKEYS KEY...}...
-- The agent's invalidations, in order. -> {applied, ignored, deleted}
local function freshness_apply(_, args)
  if redis.call('EXISTS', CONFIG) == 0 then
    return redis.error_reply('NOINIT freshness: this database is not initialised (Redis lost its data?)')
  end
  local tomb_ms = args[1]
  local applied, ignored, deleted = 0, 0, 0
  local i = 2
  while i <= #args do
    local entity, v, shard, nk = args[i], args[i + 1], args[i + 2], tonumber(args[i + 3])
    local tk = P .. 'v:' .. entity
    local tomb = redis.call('GET', tk)
    if tomb and vcmp(v, tomb) <= 0 then
      ignored = ignored + 1
    else
      redis.call('SET', tk, v, 'PX', tomb_ms)
      if nk > 0 then
        local tkeys = {}
        for j = 1, nk do
          tkeys[j] = args[i + 3 + j]
        end
        deleted = deleted + del_all(tkeys)
      end
      -- An entity has dependents only if a fill put it in its shard's index
      -- (fills and resets keep the two together), so most invalidations
      -- stop here.
      if redis.call('SREM', P .. 's:' .. shard, entity) == 1 then
        deleted = deleted + drop_dependents(entity)
        local ns = string.match(entity, '^([^:]+):')
        if ns then
          redis.call('SREM', P .. 'n:' .. ns, entity)
        end
      end
      applied = applied + 1
    end
    i = i + 4 + nk
  end
  return { applied, ignored, deleted }
end

-- FCALL freshness_reset 0 TOMBSTONE_MS all | SHARD... -> keys deleted
-- Deletes every indexed key of the shards and refuses fills on them for
-- TOMBSTONE_MS (a fill in flight may have read before what was missed).
local function freshness_reset(_, args)
  local shards = config_shards()
  if shards == nil then
    return redis.error_reply('NOINIT freshness: this database is not initialised (Redis lost its data?)')
  end
  local tomb_ms = tonumber(args[1])
  local now = now_ms()
  local list = {}
  if args[2] == 'all' then
    for s = 0, shards - 1 do
      list[#list + 1] = s
    end
    redis.call('HSET', CONFIG, 'fence_until', now + tomb_ms)
  else
    for i = 2, #args do
      list[#list + 1] = tonumber(args[i])
    end
  end
  local deleted = 0
  for _, s in ipairs(list) do
    local sk = P .. 's:' .. s
    for _, entity in ipairs(redis.call('SMEMBERS', sk)) do
      deleted = deleted + drop_dependents(entity)
      local ns = string.match(entity, '^([^:]+):')
      if ns then
        redis.call('SREM', P .. 'n:' .. ns, entity)
      end
    end
    redis.call('DEL', sk)
    redis.call('SET', P .. 'r:' .. s, now + tomb_ms, 'PX', tomb_ms)
  end
  return deleted
end

-- FCALL freshness_drop_namespace 0 NAMESPACE -> keys deleted
-- Fail closed: the namespace's indexed keys go (fills are refused by
-- freshness_fill itself while the feed is too stale).
local function freshness_drop_namespace(_, args)
  local nk = P .. 'n:' .. args[1]
  local deleted = 0
  for _, entity in ipairs(redis.call('SMEMBERS', nk)) do
    deleted = deleted + drop_dependents(entity)
  end
  redis.call('DEL', nk)
  return deleted
end

-- FCALL freshness_init 0 SHARDS TOMBSTONE_MS RUN_ID FENCE [NAMESPACE BOUND_MS]...
-- Writes the configuration; FENCE=1 refuses every fill for TOMBSTONE_MS.
local function freshness_init(_, args)
  local now = now_ms()
  local old = redis.call('HKEYS', CONFIG)
  for _, f in ipairs(old) do
    if string.sub(f, 1, 12) == 'fail_closed:' then
      redis.call('HDEL', CONFIG, f)
    end
  end
  redis.call('HSET', CONFIG, 'shards', args[1], 'tombstone_ms', args[2], 'run_id', args[3])
  if args[4] == '1' then
    redis.call('HSET', CONFIG, 'fence_until', now + tonumber(args[2]))
  end
  for i = 5, #args, 2 do
    redis.call('HSET', CONFIG, 'fail_closed:' .. args[i], args[i + 1])
  end
  return now
end

-- FCALL freshness_feed 0 STATE STALENESS_MS(-1 = unknown) -> now (ms)
local function freshness_feed(_, args)
  local now = now_ms()
  local staleness = tonumber(args[2])
  redis.call('HSET', FEED, 'state', args[1], 'updated_at_ms', now)
  if staleness >= 0 then
    redis.call('HSET', FEED, 'staleness_ms', staleness, 'fresh_at_ms', now - staleness)
  else
    redis.call('HSET', FEED, 'staleness_ms', -1)
  end
  return now
end

-- FCALL_RO freshness_shard 0 ENTITY -> the entity's shard (checks the hash)
local function freshness_shard(_, args)
  local shards = config_shards() or tonumber(args[2])
  if shards == nil then
    return redis.error_reply('NOINIT freshness: this database is not initialised')
  end
  return shard_of(args[1], shards)
end

-- FCALL_RO freshness_version 0 -> the library's version
local function freshness_version()
  return LIBRARY_VERSION
end

redis.register_function('freshness_fill', freshness_fill)
redis.register_function('freshness_fill_reason', freshness_fill_reason)
redis.register_function('freshness_apply', freshness_apply)
redis.register_function('freshness_reset', freshness_reset)
redis.register_function('freshness_drop_namespace', freshness_drop_namespace)
redis.register_function('freshness_init', freshness_init)
redis.register_function('freshness_feed', freshness_feed)
redis.register_function{ function_name = 'freshness_shard', callback = freshness_shard, flags = { 'no-writes' } }
redis.register_function{ function_name = 'freshness_version', callback = freshness_version, flags = { 'no-writes' } }
