-- state: ARGV lease id, channel.
-- Replies {now, has_last, last, holder, token, acquired, renewed, expiry, ...}: the newest
-- token (has_last 0 when there is none) and every live grant, in no particular order.
local lease, channel = ARGV[1], ARGV[2]

local now = now_us()
local _, dropped = live_holders(now)
if dropped > 0 then
  redis.call('PUBLISH', channel, lease)
end

local last = redis.call('GET', token_key)
local reply = {now, last and 1 or 0, last and tonumber(last) or 0}
-- Expired grants are gone, so every grant left is live.
local all = redis.call('HGETALL', grants)
for i = 1, #all, 2 do
  local token, acquired, renewed, expiry = parse_grant(all[i + 1])
  table.insert(reply, all[i])
  table.insert(reply, token)
  table.insert(reply, acquired)
  table.insert(reply, renewed)
  table.insert(reply, expiry)
end
return reply
