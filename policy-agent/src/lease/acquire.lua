-- acquire: ARGV holder, ttl_us, capacity, floor, lease id, channel, token retention (ms).
-- Replies {1, token, acquired, renewed, expiry} when granted (or already held by this
-- holder: a retry whose first reply was lost gets the same grant, not a second slot), and
-- {0, now, free_at} when every slot is taken.
local holder = ARGV[1]
local ttl_us = tonumber(ARGV[2])
local capacity = tonumber(ARGV[3])
local floor = tonumber(ARGV[4])
local lease, channel, retention_ms = ARGV[5], ARGV[6], tonumber(ARGV[7])

local now = now_us()
local dropped = drop_expired(now)

local current = redis.call('HGET', grants, holder)
if current then
  if dropped > 0 then
    redis.call('PUBLISH', channel, lease)
  end
  local token, acquired, renewed, expiry = parse_grant(current)
  return {1, token, acquired, renewed, expiry}
end

if redis.call('ZCARD', holders) >= capacity then
  if dropped > 0 then
    redis.call('PUBLISH', channel, lease)
  end
  local first = redis.call('ZRANGE', holders, 0, 0, 'WITHSCORES')
  return {0, now, first[2] and tonumber(first[2]) or now}
end

-- The fencing-token rule: above the newest token here, above the clock (which survives a
-- restart that loses the token key), above every token the asking agent has seen.
local last = tonumber(redis.call('GET', token_key) or '0')
local token = math.max(last + 1, now, floor + 1)
local expiry = now + ttl_us
redis.call('SET', token_key, int(token))
store_grant(holder, token, now, now, expiry)
expire_keys(retention_ms)
redis.call('PUBLISH', channel, lease)
return {1, token, now, now, expiry}
