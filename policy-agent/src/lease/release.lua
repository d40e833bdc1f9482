-- release: ARGV holder, token, lease id, channel.
-- Replies {1, now} when `holder`'s live grant with `token` ended now, or {0, now} when there
-- was none (expired, released, or another grant's token).
local holder, token_arg = ARGV[1], ARGV[2]
local lease, channel = ARGV[3], ARGV[4]

local now = now_us()
local dropped = drop_expired(now)

local current = redis.call('HGET', grants, holder)
local token = current and parse_grant(current)
if not current or int(token) ~= token_arg then
  if dropped > 0 then
    redis.call('PUBLISH', channel, lease)
  end
  return {0, now}
end
redis.call('ZREM', holders, holder)
redis.call('HDEL', grants, holder)
redis.call('PUBLISH', channel, lease)
return {1, now}
