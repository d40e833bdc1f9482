-- Shared by every lease script (prepended to each). One lease's keys, all in one hash tag:
--   KEYS[1] holders: sorted set, holder id -> expiry (µs since the epoch, Redis TIME);
--   KEYS[2] grants:  hash, holder id -> "token:acquired:renewed:expiry" (µs);
--   KEYS[3] token:   the newest fencing token granted.
-- Times are integers below 2^53, so Lua's doubles hold them exactly; they are formatted
-- with %d before they reach a command, since Lua's own number formatting rounds them.
-- Every redis.call costs about a microsecond of Redis's one thread, so the scripts make as
-- few as they can: that is what a lease costs over a bare SET NX.
local holders, grants, token_key = KEYS[1], KEYS[2], KEYS[3]

local function int(n)
  return string.format('%d', n)
end

-- Redis TIME is the only clock: every agent's grants are ordered by this one server.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Reads every holder (a lease has at most its capacity of them, and one read is cheaper
-- than several targeted ones) and drops those expired by `now` (an expiry equal to now has
-- expired). Returns the live ones as {holder, expiry} in expiry order, and how many were
-- dropped.
local function live_holders(now)
  local all = redis.call('ZRANGE', holders, 0, -1, 'WITHSCORES')
  local live, expired = {}, {}
  for i = 1, #all, 2 do
    local expiry = tonumber(all[i + 1])
    if expiry <= now then
      expired[#expired + 1] = all[i]
    else
      live[#live + 1] = {all[i], expiry}
    end
  end
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', holders, '-inf', int(now))
    for i = 1, #expired, 1000 do
      redis.call('HDEL', grants, unpack(expired, i, math.min(i + 999, #expired)))
    end
  end
  return live, #expired
end

local function parse_grant(value)
  local token, acquired, renewed, expiry = string.match(value or '', '^(%d+):(%d+):(%d+):(%d+)$')
  if not token then
    error('lease grant record is missing or malformed: ' .. tostring(value))
  end
  return tonumber(token), tonumber(acquired), tonumber(renewed), tonumber(expiry)
end

local function store_grant(holder, token, acquired, renewed, expiry)
  redis.call('ZADD', holders, int(expiry), holder)
  redis.call('HSET', grants, holder, int(token) .. ':' .. int(acquired) .. ':' .. int(renewed) .. ':' .. int(expiry))
end

-- Every key expires: the holders and their grants with the latest grant (`latest`, µs);
-- returns that time in ms, which the token key's expiry is counted from.
local function expire_grants(latest)
  local at_ms = math.floor(latest / 1000) + 1
  redis.call('PEXPIREAT', holders, int(at_ms))
  redis.call('PEXPIREAT', grants, int(at_ms))
  return at_ms
end

