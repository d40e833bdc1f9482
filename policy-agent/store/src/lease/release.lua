-- release: ARGV holder, token, lease id, channel.
-- Replies {1, now} when `holder`'s live grant with `token` ended now, or {0, now} when there
-- was none (expired, released, or another grant's token).
local holder, token_arg = ARGV[1], ARGV[2]
local lease, channel = ARGV[3], ARGV[4]

local now = now_us()
local live, dropped = live_holders(now)

local current = redis.call('HGET', grants, holder)
if not current or int((parse_grant(current))) ~= token_arg then
  if dropped > 0 then
    redis.call('PUBLISH', channel, lease)
  end
  return {0, now}
end
if #live == 1 then
  -- The last holder: nothing else lives in these keys (the token key stays).
  redis.call('DEL', holders, grants)
else
  redis.call('ZREM', holders, holder)
  redis.call('HDEL', grants, holder)
end
redis.call('PUBLISH', channel, lease)
return {1, now}
