-- Shared by every lease script (prepended to each). One lease's keys, all in one hash tag:
--   KEYS[1] holders: sorted set, holder id -> expiry (µs since the epoch, Redis TIME);
--   KEYS[2] grants:  hash, holder id -> "token:acquired:renewed:expiry" (µs);
--   KEYS[3] token:   the newest fencing token granted.
-- Times are integers below 2^53, so Lua's doubles hold them exactly; they are formatted
-- with %d before they reach a command, since Lua's own number formatting rounds them.
local holders, grants, token_key = KEYS[1], KEYS[2], KEYS[3]

local function int(n)
  return string.format('%d', n)
end

-- Redis TIME is the only clock: every agent's grants are ordered by this one server.
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Drops every grant that has expired by `now` (an expiry equal to now has expired);
-- returns how many were dropped.
local function drop_expired(now)
  local expired = redis.call('ZRANGEBYSCORE', holders, '-inf', int(now))
  if #expired > 0 then
    redis.call('ZREMRANGEBYSCORE', holders, '-inf', int(now))
    for _, holder in ipairs(expired) do
      redis.call('HDEL', grants, holder)
    end
  end
  return #expired
end

local function parse_grant(value)
  local token, acquired, renewed, expiry = string.match(value, '^(%d+):(%d+):(%d+):(%d+)$')
  if not token then
    error('lease grant record is malformed: ' .. value)
  end
  return tonumber(token), tonumber(acquired), tonumber(renewed), tonumber(expiry)
end

local function store_grant(holder, token, acquired, renewed, expiry)
  redis.call('ZADD', holders, int(expiry), holder)
  redis.call('HSET', grants, holder, int(token) .. ':' .. int(acquired) .. ':' .. int(renewed) .. ':' .. int(expiry))
end

-- Every key expires: the holders and their grants when the latest grant does, the token
-- `retention_ms` later (the clock term of the token rule keeps tokens increasing after it
-- is gone; keeping it a while also covers a clock that steps back by less than that).
local function expire_keys(retention_ms)
  local latest = redis.call('ZRANGE', holders, -1, -1, 'WITHSCORES')
  if latest[2] then
    local at_ms = math.floor(tonumber(latest[2]) / 1000) + 1
    redis.call('PEXPIREAT', holders, int(at_ms))
    redis.call('PEXPIREAT', grants, int(at_ms))
    redis.call('PEXPIREAT', token_key, int(at_ms + retention_ms))
  end
end

