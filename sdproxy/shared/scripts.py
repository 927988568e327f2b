"""The Lua scripts sdproxy runs in Redis: each one atomic, each one round trip.

Times inside scripts come from Redis' own ``TIME``, so the replicas' clocks never have to
agree. Scripts are sent once (``SCRIPT LOAD`` by redis-py on the first ``NOSCRIPT``, also after
a Redis restart) and then called by their SHA.

A lease value is ``<token>|<owner>``: the fencing token (``INCR`` per node, so it only grows)
and an owner string made of the replica id and a nonce unique to one acquire. Renewing or
releasing compares the whole value: a holder whose lease expired and went to someone else can
never renew or release the new holder's lease.
"""

from __future__ import annotations

_LEASE_PRELUDE = """
-- KEYS: 1 lease, 2 fence, 3 tickets, 4 seen, 5 seq
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function prune(now, ticket_ttl)
  local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now - ticket_ttl)
  for _, owner in ipairs(dead) do
    redis.call('ZREM', KEYS[3], owner)
    redis.call('ZREM', KEYS[4], owner)
  end
end
local function grant(owner, ttl)
  local token = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], token .. '|' .. owner, 'PX', ttl)
  redis.call('ZREM', KEYS[3], owner)
  redis.call('ZREM', KEYS[4], owner)
  return token
end
local function holder_of(value)
  local bar = string.find(value, '|', 1, true)
  if not bar then return '', 0 end
  return string.sub(value, bar + 1), tonumber(string.sub(value, 1, bar - 1))
end
-- The lease is free: the first waiting owner gets it, and hears so at once.
local function grant_next(ttl, channel, node, origin)
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not head then return end
  local token = grant(head, ttl)
  redis.call('PUBLISH', channel, cjson.encode(
    {kind = 'lease', origin = origin, node = node, owner = head, token = token}))
end
-- A ticket's place in line: its priority (the Unix ms its request started: the oldest work is
-- served first, as on one webui), else the time it came; kept when its waiter asks again.
local function enqueue(owner, now, priority)
  if not redis.call('ZSCORE', KEYS[3], owner) then
    redis.call('ZADD', KEYS[3], tonumber(priority) or now, owner)
  end
  redis.call('ZADD', KEYS[4], now, owner)
end
"""

# ARGV: 1 owner, 2 ttl_ms, 3 ticket_ttl_ms, 4 channel, 5 node, 6 origin, 7 "1" = wait in line,
# 8 priority (Unix ms, lower first; "" = the time of arrival).
# Returns {granted 0/1, token, remaining ms of the current lease}.
ACQUIRE = (
    _LEASE_PRELUDE
    + """
local owner, ttl, ticket_ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local queue = ARGV[7] == '1'
local now = now_ms()
prune(now, ticket_ttl)
local current = redis.call('GET', KEYS[1])
if current then
  local holder, token = holder_of(current)
  if holder == owner then return {1, token, redis.call('PTTL', KEYS[1])} end
  if queue then enqueue(owner, now, ARGV[8]) end
  return {0, 0, redis.call('PTTL', KEYS[1])}
end
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if (not head) or head == owner then
  return {1, grant(owner, ttl), ttl}
end
-- Free, but others were in line first (the last holder's lease expired): the first has it.
grant_next(ttl, ARGV[4], ARGV[5], ARGV[6])
if queue then enqueue(owner, now, ARGV[8]) end
return {0, 0, ttl}
"""
)

# ARGV: 1 owner, 2 token ("" = whatever token), 3 ttl_ms, 4 ticket_ttl_ms, 5 channel, 6 node,
# 7 origin. Leaves the line, gives the lease back if ``owner`` holds it, hands it on.
# Returns 1 if the owner held the lease.
LEAVE = (
    _LEASE_PRELUDE
    + """
local owner, ttl, ticket_ttl = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4])
redis.call('ZREM', KEYS[3], owner)
redis.call('ZREM', KEYS[4], owner)
local held = 0
local current = redis.call('GET', KEYS[1])
if current then
  local holder, token = holder_of(current)
  if holder == owner and (ARGV[2] == '' or tonumber(ARGV[2]) == token) then
    redis.call('DEL', KEYS[1])
    held = 1
    current = false
  end
end
if not current then
  prune(now_ms(), ticket_ttl)
  grant_next(ttl, ARGV[5], ARGV[6], ARGV[7])
end
return held
"""
)

# KEYS: 1 lease. ARGV: 1 value, 2 ttl_ms. Returns 1 if renewed, 0 if the lease is not ours.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: 1 record (hash v, d). ARGV: 1 expected version ("" = any), 2 data, 3 channel,
# 4 kind, 5 name, 6 origin. Returns {written 0/1, version now, data now if not written}.
COMPARE_AND_SET = """
local version = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= version then
  return {0, version, redis.call('HGET', KEYS[1], 'd') or ''}
end
version = version + 1
redis.call('HSET', KEYS[1], 'v', version, 'd', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], cjson.encode(
    {kind = ARGV[4], origin = ARGV[6], name = ARGV[5], version = version, data = ARGV[2]}))
end
return {1, version, ''}
"""

# KEYS: 1 list, 2 seq, 3 counters. ARGV: 1 entry (a JSON object), 2 max length, 3 channel
# ("" = none), 4 kind, 5 name, 6 origin, then field/amount pairs added to the counters.
# Returns the entry's sequence number.
APPEND = """
local seq = redis.call('INCR', KEYS[2])
local entry = cjson.decode(ARGV[1])
entry['seq'] = seq
entry = cjson.encode(entry)
redis.call('RPUSH', KEYS[1], entry)
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
for i = 7, #ARGV, 2 do
  redis.call('HINCRBY', KEYS[3], ARGV[i], ARGV[i + 1])
end
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3], cjson.encode(
    {kind = ARGV[4], origin = ARGV[6], name = ARGV[5], entry = entry}))
end
return seq
"""

# KEYS: 1 replica key, 2 replicas. ARGV: 1 state (JSON), 2 ttl_ms, 3 instance, 4 channel,
# 5 replica id, 6 "1" = broadcast the state. Returns 1 if another live instance had the id.
HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local clash = 0
local old = redis.call('GET', KEYS[1])
if old then
  local ok, state = pcall(cjson.decode, old)
  if ok and type(state) == 'table' and state['instance'] ~= ARGV[3] then clash = 1 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[5])
if ARGV[6] == '1' then
  redis.call('PUBLISH', ARGV[4], cjson.encode(
    {kind = 'replica', origin = ARGV[5], state = ARGV[1]}))
end
return clash
"""

# KEYS: 1 replicas. ARGV: 1 replica key prefix, 2 ttl_ms. Returns {id, state, id, state, ...}
# of the replicas whose heartbeat is younger than the TTL.
LIVE_REPLICAS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local state = redis.call('GET', ARGV[1] .. id)
  if state then
    table.insert(out, id)
    table.insert(out, state)
  end
end
return out
"""

# KEYS: 1 replica key, 2 replicas. ARGV: 1 instance, 2 channel, 3 replica id.
# A clean shutdown: the replica is gone at once, not when its heartbeat expires.
DEPART = """
local old = redis.call('GET', KEYS[1])
if old then
  local ok, state = pcall(cjson.decode, old)
  if ok and type(state) == 'table' and state['instance'] == ARGV[1] then
    redis.call('DEL', KEYS[1])
    redis.call('ZREM', KEYS[2], ARGV[3])
  end
end
redis.call('PUBLISH', ARGV[2], cjson.encode({kind = 'replica-gone', origin = ARGV[3]}))
return 1
"""

# KEYS: 1 catch-up lock, 2 caught-up epoch. ARGV: 1 epoch, 2 owner, 3 ttl_ms.
# Returns "done" (caught up for this epoch already), "mine" (do it) or "busy" (another does).
CATCH_UP_BEGIN = """
if redis.call('GET', KEYS[2]) == ARGV[1] then return 'done' end
local lock = redis.call('GET', KEYS[1])
if lock == ARGV[2] then return 'mine' end
if lock then return 'busy' end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 'mine'
"""

# KEYS: 1 catch-up lock, 2 caught-up epoch. ARGV: 1 epoch, 2 owner, 3 "1" = succeeded,
# 4 channel, 5 node, 6 origin. Returns 1 if the owner still held the lock.
CATCH_UP_END = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[3] == '1' then
  redis.call('SET', KEYS[2], ARGV[1])
  redis.call('PUBLISH', ARGV[4], cjson.encode(
    {kind = 'caught-up', origin = ARGV[6], node = ARGV[5], epoch = ARGV[1]}))
end
return 1
"""

# KEYS: 1 a claim. ARGV: 1 its holder. Deletes it only if still that holder's; returns 1 then.
RELEASE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('DEL', KEYS[1])
"""

ALL = (
    ACQUIRE,
    LEAVE,
    RENEW,
    COMPARE_AND_SET,
    APPEND,
    HEARTBEAT,
    LIVE_REPLICAS,
    DEPART,
    CATCH_UP_BEGIN,
    CATCH_UP_END,
    RELEASE,
)
