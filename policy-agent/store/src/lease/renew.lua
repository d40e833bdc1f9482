-- renew: ARGV holder, token, ttl_us, lease id, channel, token retention (ms).
-- Replies {1, token, acquired, renewed, expiry}, or {0, now} when `holder` does not hold a
-- live grant with `token` (expired, released, or another grant's token).
local holder, token_arg = ARGV[1], ARGV[2]
local ttl_us = tonumber(ARGV[3])
local lease, channel, retention_ms = ARGV[4], ARGV[5], tonumber(ARGV[6])

local now = now_us()
local live, dropped = live_holders(now)
if dropped > 0 then
  redis.call('PUBLISH', channel, lease)
end

-- Expired grants are gone by now, so a grant still here is live.
local current = redis.call('HGET', grants, holder)
if not current then
  return {0, now}
end
local token, acquired = parse_grant(current)
if int(token) ~= token_arg then
  return {0, now}
end
local expiry = now + ttl_us
local latest = expiry
for _, entry in ipairs(live) do
  if entry[1] ~= holder and entry[2] > latest then
    latest = entry[2]
  end
end
store_grant(holder, token, acquired, now, expiry)
local at_ms = expire_grants(latest)
redis.call('PEXPIREAT', token_key, int(at_ms + retention_ms))
return {1, token, acquired, now, expiry}
