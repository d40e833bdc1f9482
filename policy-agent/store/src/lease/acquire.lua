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
local live, dropped = live_holders(now)

local function unchanged(reply)
  if dropped > 0 then
    redis.call('PUBLISH', channel, lease)
  end
  return reply
end

for _, entry in ipairs(live) do
  if entry[1] == holder then
    local token, acquired, renewed, expiry = parse_grant(redis.call('HGET', grants, holder))
    return unchanged({1, token, acquired, renewed, expiry})
  end
end

if #live >= capacity then
  return unchanged({0, now, live[1] and live[1][2] or now})
end

-- The fencing-token rule: above the newest token here, above the clock (which survives a
-- restart that loses the token key), above every token the asking agent has seen.
local last = tonumber(redis.call('GET', token_key) or '0')
local token = math.max(last + 1, now, floor + 1)
local expiry = now + ttl_us
local latest = math.max(expiry, live[#live] and live[#live][2] or 0)
store_grant(holder, token, now, now, expiry)
local at_ms = expire_grants(latest)
-- The token key outlives the grants by the retention (the clock term of the token rule
-- keeps tokens rising once it is gone; keeping it covers a clock stepping back by less).
redis.call('SET', token_key, int(token), 'PXAT', int(at_ms + retention_ms))
redis.call('PUBLISH', channel, lease)
return {1, token, now, now, expiry}
