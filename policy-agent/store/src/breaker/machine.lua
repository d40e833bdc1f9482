-- The shared breaker: one state machine per target Service port, stepped atomically on
-- Redis's clock (TIME). Its pure twin is memory::Machine (Rust); the conformance tests hold
-- them to the same replies and the same stored window, so change both or neither.
--   KEYS[1] hash: state (0 CLOSED, 1 OPEN, 2 HALF_OPEN), since (µs), generation, calls,
--           failures, slow (window totals; while OPEN or HALF_OPEN, those of the window that
--           opened it), granted, ok (HALF_OPEN probes);
--   KEYS[2] list: the window's entries "slot:calls:failures:slow", oldest first.
-- ARGV: op ('report' | 'probe' | 'state'), breaker id, channel, calls, failures, slow, then
--   params_args: failure_rate, slow_call_us (-1: no slow-call rule), slow_rate, window kind
--   (0 Count, 1 Time), window size (Count: calls; Time: slot µs), minimum_calls, open_us,
--   half_open_calls — already clamped into their ranges by the caller.
-- Replies: report {state, since, generation, calls, failures, slow, granted, ok};
--   probe {admitted 0|1, the same eight}; state {exists 0|1, the same eight}.
-- Times and counts are integers below 2^53, so Lua's doubles hold them exactly; they are
-- formatted with %d before they reach a command, since Lua's own formatting rounds them.
local hash, window = KEYS[1], KEYS[2]
local op, id, channel = ARGV[1], ARGV[2], ARGV[3]

local CLOSED, OPEN, HALF_OPEN = 0, 1, 2
local TIME_SLOTS = 20
-- Both keys live a day past their last write: an idle breaker is forgotten (read CLOSED).
local TTL_MS = 24 * 3600 * 1000
local FIELDS = {'state', 'since', 'generation', 'calls', 'failures', 'slow', 'granted', 'ok'}

local function int(n)
  return string.format('%d', n)
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- The breaker, and whether its hash exists (a missing one is CLOSED, since 0, generation 0).
local function load()
  local values = redis.call('HMGET', hash, unpack(FIELDS))
  local b = {}
  for i, field in ipairs(FIELDS) do
    b[field] = tonumber(values[i]) or 0
  end
  return b, values[1] ~= false
end

local function reply(b)
  return {b.state, b.since, b.generation, b.calls, b.failures, b.slow, b.granted, b.ok}
end

if op == 'state' then
  local b, exists = load()
  local r = reply(b)
  table.insert(r, 1, exists and 1 or 0)
  return r
end

local calls, failures, slow = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
-- Failures and slow calls are among the calls (a report claiming more reads as a rate of 100 %).
failures, slow = math.min(failures, calls), math.min(slow, calls)
local rules = {
  failure_rate = tonumber(ARGV[7]),
  slow_rule = tonumber(ARGV[8]) >= 0,
  slow_rate = tonumber(ARGV[9]),
  time_window = tonumber(ARGV[10]) == 1,
  size = tonumber(ARGV[11]),
  minimum_calls = tonumber(ARGV[12]),
  open_us = tonumber(ARGV[13]),
  half_open_calls = tonumber(ARGV[14]),
}

local now = now_us()
local b = load()
local dirty = false
local events = {}

-- Every transition bumps the generation, resets the probes and is published (after the
-- write, at the end of the script, so the change is visible to whoever hears of it).
local function transition(state)
  b.state, b.since, b.generation = state, now, b.generation + 1
  b.granted, b.ok = 0, 0
  dirty = true
  events[#events + 1] = int(b.generation) .. ' ' .. int(state) .. ' ' .. int(now) .. ' ' .. id
end

local function clear_totals()
  b.calls, b.failures, b.slow = 0, 0, 0
end

local function clear_window()
  clear_totals()
  redis.call('DEL', window)
end

-- OPEN past its time becomes HALF_OPEN; a HALF_OPEN that lasted as long without resolving
-- is re-armed (probes whose outcome never came must not hold it half-open forever).
local function advance()
  if b.state ~= CLOSED and now >= b.since + rules.open_us then
    transition(HALF_OPEN)
  end
end

local function parse_entry(raw)
  local slot, c, f, s = string.match(raw or '', '^(-?%d+):(%d+):(%d+):(%d+)$')
  if not slot then
    error('breaker window entry is missing or malformed: ' .. tostring(raw))
  end
  return {slot = tonumber(slot), calls = tonumber(c), failures = tonumber(f), slow = tonumber(s)}
end

local function format_entry(e)
  return int(e.slot) .. ':' .. int(e.calls) .. ':' .. int(e.failures) .. ':' .. int(e.slow)
end

local function subtract(e)
  b.calls, b.failures, b.slow = b.calls - e.calls, b.failures - e.failures, b.slow - e.slow
end

-- The front entry, or nil when the list is empty. An empty list holds no calls: whatever
-- the totals say then (the list was evicted without the hash) is dropped, so they can never
-- stay above what the list holds. Only CLOSED adds to the window, so only CLOSED gets here:
-- the totals OPEN and HALF_OPEN keep beside an empty list are never dropped.
local function front()
  local raw = redis.call('LINDEX', window, 0)
  if not raw then
    clear_totals()
    return nil
  end
  return parse_entry(raw)
end

-- Count: one entry per report; entries leave from the front while the calls after them
-- fill the window, and the front one loses its share of the excess (failures and slow in
-- proportion, rounded down).
local function add_count(size)
  local length = redis.call('RPUSH', window, format_entry({slot = 0, calls = calls, failures = failures, slow = slow}))
  if length == 1 then
    clear_totals()
  end
  b.calls, b.failures, b.slow = b.calls + calls, b.failures + failures, b.slow + slow
  local e = front()
  while e and b.calls - e.calls >= size do
    redis.call('LPOP', window)
    subtract(e)
    e = front()
  end
  if e and b.calls > size then
    local excess = b.calls - size
    local lost = {
      slot = 0,
      calls = excess,
      failures = math.floor(e.failures * excess / e.calls),
      slow = math.floor(e.slow * excess / e.calls),
    }
    subtract(lost)
    e.calls, e.failures, e.slow = e.calls - lost.calls, e.failures - lost.failures, e.slow - lost.slow
    redis.call('LSET', window, 0, format_entry(e))
  end
end

-- Time: one entry per slot of slot_us. Entries TIME_SLOTS slots old leave from the front,
-- and so do entries of a slot ahead of now (written under another slot size before a
-- configuration change: kept, they would never leave).
local function add_time(slot_us)
  local current = math.floor(now / slot_us)
  local e = front()
  while e and (e.slot <= current - TIME_SLOTS or e.slot > current) do
    redis.call('LPOP', window)
    subtract(e)
    e = front()
  end
  local raw = redis.call('LINDEX', window, -1)
  local last = raw and parse_entry(raw)
  if last and last.slot == current then
    last.calls, last.failures, last.slow = last.calls + calls, last.failures + failures, last.slow + slow
    redis.call('LSET', window, -1, format_entry(last))
  else
    redis.call('RPUSH', window, format_entry({slot = current, calls = calls, failures = failures, slow = slow}))
  end
  b.calls, b.failures, b.slow = b.calls + calls, b.failures + failures, b.slow + slow
end

local function trips()
  if b.calls < rules.minimum_calls then
    return false
  end
  if b.failures * 100 >= rules.failure_rate * b.calls then
    return true
  end
  return rules.slow_rule and b.slow * 100 >= rules.slow_rate * b.calls
end

local function report_closed()
  -- A report of no calls adds nothing: an entry of none would only grow the list.
  if calls == 0 then
    return
  end
  dirty = true
  if rules.time_window then
    add_time(rules.size)
  else
    add_count(rules.size)
  end
  -- Opening empties the list but keeps the totals: OPEN and HALF_OPEN show the window that
  -- opened it, and never add to it.
  if trips() then
    redis.call('DEL', window)
    transition(OPEN)
  end
end

-- Probe outcomes count in granted and ok alone: a failed probe reopens it with the totals
-- of the window that opened it, and closing starts a fresh window.
local function report_half_open()
  if failures > 0 or (rules.slow_rule and slow > 0) then
    transition(OPEN)
  elseif calls > 0 then
    b.ok = b.ok + calls
    dirty = true
    if b.ok >= rules.half_open_calls then
      clear_window()
      transition(CLOSED)
    end
  end
end

local function store()
  if not dirty then
    return
  end
  local fields = {}
  for _, field in ipairs(FIELDS) do
    fields[#fields + 1] = field
    fields[#fields + 1] = int(b[field])
  end
  redis.call('HSET', hash, unpack(fields))
  redis.call('PEXPIRE', hash, TTL_MS)
  redis.call('PEXPIRE', window, TTL_MS)
  for _, event in ipairs(events) do
    redis.call('PUBLISH', channel, event)
  end
end

advance()
if op == 'report' then
  if b.state == CLOSED then
    report_closed()
  elseif b.state == HALF_OPEN then
    report_half_open()
  end
  store()
  return reply(b)
end

if op == 'probe' then
  local admitted = 0
  if b.state == CLOSED then
    admitted = 1
  elseif b.state == HALF_OPEN and b.granted < rules.half_open_calls then
    b.granted = b.granted + 1
    dirty = true
    admitted = 1
  end
  store()
  local r = reply(b)
  table.insert(r, 1, admitted)
  return r
end

error('unknown breaker operation: ' .. tostring(op))
