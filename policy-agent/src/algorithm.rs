//! The three limiting algorithms, written twice on purpose: as Lua scripts that Redis runs
//! atomically (with Redis `TIME` as the clock, so pod clocks never matter), and as pure Rust
//! functions over an explicit clock for the in-memory store. Both compute the same thing
//! with the same integer microsecond arithmetic; the conformance tests hold them to it.
//!
//! All three answer a [`Verdict`]: admitted or not, what is left, when the counter is fresh
//! again, and when a single further hit would fit (which is how long the over-limit cache
//! may remember a rejection without ever admitting more than the store would).
//!
//! Each algorithm also has a *batch* script and twin pair ([`reserve`], [`give_back`]): one
//! call reserves up to `want` hits exactly as that many single hits would be admitted, with
//! a life within which the agent may admit them (the sub-window, the fixed window, and for
//! GCRA a TAT started at the end of that life), and gives unused hits back where that is the
//! same as never having reserved them. Why each life keeps its algorithm's guarantee is
//! proved in docs/agent.md, "Quota batches".

use std::time::Duration;

use breakwater_api::agent::RateLimitRule;
use breakwater_api::rate_limit::Algorithm;

/// A sliding window is counted in this many sub-windows (plus the one being filled).
/// The window a decision looks at spans between `period` and `period * (1 + 1/20)`, so it
/// never admits more than `requests` in any interval of length `period`, and under steady
/// overload admits at least `requests * 20/21` (95.2 %) per period.
pub const SLIDING_BUCKETS: i64 = 20;

/// A batch never takes more than `1/FAIR_SHARE` of what its counter has left, so that one
/// hot counter on many agents is spread over them, and the last hits of a window go out in
/// ever smaller batches (docs/agent.md, "Adaptive size").
pub const FAIR_SHARE: i64 = 16;

/// The numbers a store needs to enforce one rule, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// GCRA. `emission_us` is the period divided by the rate, rounded up (so the sustained
    /// rate can only err low, by less than 1 µs per request); `capacity` is `requests + burst`,
    /// the number of hits a fresh counter admits at once.
    TokenBucket { emission_us: i64, capacity: i64 },
    /// Counts in `SLIDING_BUCKETS` sub-windows of `bucket_us`; see [`SLIDING_BUCKETS`].
    SlidingWindow { bucket_us: i64, limit: i64 },
    /// Windows aligned to multiples of the period since the Unix epoch; every hit is counted,
    /// admitted or not, and a request is over the limit when the count after it exceeds
    /// `limit` (the semantics of envoyproxy/ratelimit).
    FixedWindow { window_us: i64, limit: i64 },
}

impl Limit {
    /// The numbers of `rule`, or why it cannot be enforced (`config` names the rule in the
    /// [`crate::Error::InvalidRule`] it refuses the configuration with).
    pub fn from_rule(rule: &RateLimitRule) -> Result<Self, &'static str> {
        if rule.requests == 0 {
            return Err("requests must be at least 1");
        }
        if rule.period_ms == 0 {
            return Err("periodMs must be at least 1");
        }
        let period_us = i64::try_from(rule.period_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
        let requests = i64::from(rule.requests);
        Ok(match rule.algorithm {
            Algorithm::TokenBucket => Limit::TokenBucket {
                emission_us: ((period_us + requests - 1) / requests).max(1),
                capacity: requests + i64::from(rule.burst),
            },
            Algorithm::SlidingWindow => {
                Limit::SlidingWindow { bucket_us: (period_us / SLIDING_BUCKETS).max(1), limit: requests }
            }
            Algorithm::FixedWindow => Limit::FixedWindow { window_us: period_us, limit: requests },
        })
    }

    /// The most a counter can hold: what `X-RateLimit-Limit` reports.
    pub fn quota(&self) -> i64 {
        match *self {
            Limit::TokenBucket { capacity, .. } => capacity,
            Limit::SlidingWindow { limit, .. } | Limit::FixedWindow { limit, .. } => limit,
        }
    }

    /// A short tag for counter keys, so that a rule whose algorithm changes never reads a
    /// value written in another algorithm's format.
    pub fn tag(&self) -> &'static str {
        match self {
            Limit::TokenBucket { .. } => "tb",
            Limit::SlidingWindow { .. } => "sw",
            Limit::FixedWindow { .. } => "fw",
        }
    }

    /// The script arguments after the key: the algorithm's numbers, then the hits.
    pub fn script_args(&self, hits: u32) -> [i64; 3] {
        let [a, b] = self.numbers();
        [a, b, i64::from(hits)]
    }

    /// The batch script's arguments: the algorithm's numbers, the hits wanted for a whole
    /// horizon, the horizon (µs) and [`FAIR_SHARE`].
    pub fn reserve_args(&self, want: u32, horizon_us: i64) -> [i64; 5] {
        let [a, b] = self.numbers();
        [a, b, i64::from(want), horizon_us, FAIR_SHARE]
    }

    /// The give-back script's arguments: the algorithm's numbers, the batch's mark, the hits.
    pub fn give_back_args(&self, mark: i64, hits: u32) -> [i64; 4] {
        let [a, b] = self.numbers();
        [a, b, mark, i64::from(hits)]
    }

    fn numbers(&self) -> [i64; 2] {
        match *self {
            Limit::TokenBucket { emission_us, capacity } => [emission_us, capacity],
            Limit::SlidingWindow { bucket_us, limit } => [bucket_us, limit],
            Limit::FixedWindow { window_us, limit } => [window_us, limit],
        }
    }
}

/// The outcome of hitting one counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    /// Hits the counter would still admit right now.
    pub remaining: u64,
    /// Until the counter is back to its full quota (TokenBucket: the bucket is full; windows:
    /// the window holding the newest hit has passed).
    pub reset: Duration,
    /// Until one more hit would be admitted; zero when admitted.
    pub retry_after: Duration,
}

impl Verdict {
    /// Decodes the `{admitted, remaining, reset_us, retry_after_us}` array the scripts return.
    pub fn from_reply(reply: &[i64]) -> Option<Self> {
        let [admitted, remaining, reset, retry] = reply.try_into().ok()?;
        Some(Verdict {
            admitted: admitted == 1,
            remaining: u64::try_from(remaining).unwrap_or(0),
            reset: micros(reset),
            retry_after: micros(retry),
        })
    }
}

/// What a batch script answers: the hits granted, with the verdict the asking request gets,
/// and what the agent needs to admit the rest and give them back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Hits granted, the asking request's first; 0 when a single hit would be refused now,
    /// and then `verdict` is exactly the per-request script's rejection.
    pub granted: u32,
    /// `admitted` is `granted > 0`; `remaining` is what is left after the grant.
    pub verdict: Verdict,
    /// How long after the script read Redis `TIME` the granted hits may be admitted: strictly
    /// before `now + life` (for a window, that instant is the next one's first).
    pub life: Duration,
    /// What the batch was counted in, for [`give_back`]: the TAT it set (TokenBucket), its
    /// sub-window (SlidingWindow), its window (FixedWindow); 0 when nothing was granted.
    pub mark: i64,
    /// The instant (µs, Redis `TIME`) the script ran at: what the conformance tests run the
    /// twin at.
    pub now_us: i64,
}

impl Reservation {
    /// Decodes `{granted, remaining, reset_us, retry_us, life_us, mark, now_us}`.
    pub fn from_reply(reply: &[i64]) -> Option<Self> {
        let [granted, remaining, reset, retry, life, mark, now] = reply.try_into().ok()?;
        let granted = u32::try_from(granted).ok()?;
        Some(Reservation {
            granted,
            verdict: verdict(granted > 0, remaining, reset, retry),
            life: micros(life),
            mark,
            now_us: now,
        })
    }
}

fn micros(us: i64) -> Duration {
    Duration::from_micros(u64::try_from(us).unwrap_or(0))
}

/// GCRA on one key holding the theoretical arrival time (µs since the epoch).
pub const TOKEN_BUCKET_LUA: &str = r#"
-- breakwater token bucket (GCRA). KEYS[1] holds the theoretical arrival time in µs.
-- ARGV: emission interval (µs), capacity (hits), hits. Returns {admitted, remaining, reset_us, retry_us}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local tau = T * tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + hits * T
if new_tat - now <= tau then
  if hits > 0 then
    redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  end
  return {1, math.floor((tau - (new_tat - now)) / T), new_tat - now, 0}
end
local retry = tat + T - now - tau
if retry < 0 then retry = 0 end
return {0, math.floor((tau - (tat - now)) / T), tat - now, retry}
"#;

/// Sub-window counts in one hash: field = sub-window index, value = hits.
pub const SLIDING_WINDOW_LUA: &str = r#"
-- breakwater sliding window (sub-window counts). KEYS[1] is a hash {sub-window index -> hits}.
-- ARGV: sub-window length (µs), limit, hits. Returns {admitted, remaining, reset_us, retry_us}.
local K = 20
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local B = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local cur = math.floor(now / B)
local oldest = cur - K
local flat = redis.call('HGETALL', KEYS[1])
local total = 0
local newest = cur
local live = {}
local stale = {}
for i = 1, #flat, 2 do
  local idx = tonumber(flat[i])
  if idx < oldest then
    stale[#stale + 1] = flat[i]
  else
    local n = tonumber(flat[i + 1])
    total = total + n
    live[#live + 1] = {idx, n}
    if idx > newest then newest = idx end
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
if total + hits <= limit then
  if hits > 0 then
    redis.call('HINCRBY', KEYS[1], string.format('%.0f', cur), hits)
    redis.call('PEXPIRE', KEYS[1], math.ceil(((cur + K + 1) * B - now) / 1000) + 1)
  end
  return {1, limit - total - hits, (newest + K + 1) * B - now, 0}
end
local reset = (newest + K + 1) * B - now
if #live == 0 then reset = 0 end
local need = total + 1 - limit
local retry = 0
if need > 0 then
  table.sort(live, function(a, b) return a[1] < b[1] end)
  local dropped = 0
  retry = reset
  for _, bucket in ipairs(live) do
    dropped = dropped + bucket[2]
    if dropped >= need then
      retry = (bucket[1] + K + 1) * B - now
      break
    end
  end
end
local remaining = limit - total
if remaining < 0 then remaining = 0 end
return {0, remaining, reset, retry}
"#;

/// One hash {w: window index, c: hits counted in it}.
pub const FIXED_WINDOW_LUA: &str = r#"
-- breakwater fixed window (envoyproxy/ratelimit semantics). KEYS[1] is a hash {w, c}.
-- ARGV: window length (µs), limit, hits. Returns {admitted, remaining, reset_us, retry_us}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local hits = tonumber(ARGV[3])
local w = math.floor(now / W)
local stored = redis.call('HMGET', KEYS[1], 'w', 'c')
local c = 0
if tonumber(stored[1]) == w then c = tonumber(stored[2]) end
local reset = (w + 1) * W - now
c = c + hits
if hits > 0 then
  redis.call('HSET', KEYS[1], 'w', string.format('%.0f', w), 'c', string.format('%.0f', c))
  redis.call('PEXPIRE', KEYS[1], math.ceil(reset / 1000) + 1)
end
if c <= limit then return {1, limit - c, reset, 0} end
-- The rejected hits were counted too, so nothing fits before the window ends.
return {0, 0, reset, reset}
"#;

/// GCRA batch: the TAT starts at the end of the batch's life, `max(TAT, now + L)`.
pub const TOKEN_BUCKET_RESERVE_LUA: &str = r#"
-- breakwater token bucket (GCRA), batch. KEYS[1] holds the theoretical arrival time in µs.
-- ARGV: emission interval T (µs), capacity C, hits wanted per horizon, horizon H (µs), fair share F.
-- Returns {granted, remaining, reset_us, retry_us, life_us, mark (the TAT set), now_us}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local T = tonumber(ARGV[1])
local C = tonumber(ARGV[2])
local tau = T * C
local want = math.max(1, tonumber(ARGV[3]))
local H = math.max(1, tonumber(ARGV[4]))
local F = tonumber(ARGV[5])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
-- Hits admitted up to L after now are charged as if they arrived at now + L, which keeps
-- "capacity, then one per T" exact; L <= (C - 1) T / 8 so one hit always fits a full bucket
-- and a batch never prepays more than an eighth of the burst.
local life = math.max(0, math.min(H, math.floor((C - 1) * T / 8)))
local avail = math.floor((tau - (tat - now)) / T)
local start = tat
if start < now + life then start = now + life end
local fit = math.floor((tau - (start - now)) / T)
local g = math.min(math.max(1, math.floor((want * life + H - 1) / H)), fit, math.max(1, math.floor(avail / F)))
if avail >= 1 and g >= 1 then
  local new_tat = start + g * T
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
  return {g, math.floor((tau - (new_tat - now)) / T), new_tat - now, 0, life, new_tat, now}
end
local retry = tat + T - now - tau
if retry < 0 then retry = 0 end
return {0, math.floor((tau - (tat - now)) / T), tat - now, retry, 0, 0, now}
"#;

/// Sliding-window batch: counted in the current sub-window, alive until it ends.
pub const SLIDING_WINDOW_RESERVE_LUA: &str = r#"
-- breakwater sliding window, batch. KEYS[1] is a hash {sub-window index -> hits}.
-- ARGV: sub-window length B (µs), limit, hits wanted per horizon, horizon H (µs), fair share F.
-- Returns {granted, remaining, reset_us, retry_us, life_us, mark (the sub-window), now_us}.
local K = 20
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local B = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local want = math.max(1, tonumber(ARGV[3]))
local H = math.max(1, tonumber(ARGV[4]))
local F = tonumber(ARGV[5])
local cur = math.floor(now / B)
local oldest = cur - K
local flat = redis.call('HGETALL', KEYS[1])
local total = 0
local newest = cur
local live = {}
local stale = {}
for i = 1, #flat, 2 do
  local idx = tonumber(flat[i])
  if idx < oldest then
    stale[#stale + 1] = flat[i]
  else
    local n = tonumber(flat[i + 1])
    total = total + n
    live[#live + 1] = {idx, n}
    if idx > newest then newest = idx end
  end
end
if #stale > 0 then redis.call('HDEL', KEYS[1], unpack(stale)) end
local avail = limit - total
if avail >= 1 then
  -- Admitted only within sub-window cur, whose count holds them.
  local life = math.min(H, (cur + 1) * B - now)
  local g = math.min(math.max(1, math.floor((want * life + H - 1) / H)), avail, math.max(1, math.floor(avail / F)))
  redis.call('HINCRBY', KEYS[1], string.format('%.0f', cur), g)
  redis.call('PEXPIRE', KEYS[1], math.ceil(((cur + K + 1) * B - now) / 1000) + 1)
  return {g, avail - g, (newest + K + 1) * B - now, 0, life, cur, now}
end
-- Refused: exactly the per-request script's answer to one hit.
local reset = (newest + K + 1) * B - now
if #live == 0 then reset = 0 end
local need = total + 1 - limit
local retry = 0
if need > 0 then
  table.sort(live, function(a, b) return a[1] < b[1] end)
  local dropped = 0
  retry = reset
  for _, bucket in ipairs(live) do
    dropped = dropped + bucket[2]
    if dropped >= need then
      retry = (bucket[1] + K + 1) * B - now
      break
    end
  end
end
local remaining = limit - total
if remaining < 0 then remaining = 0 end
return {0, remaining, reset, retry, 0, 0, now}
"#;

/// Fixed-window batch: counted in the current window, alive until it ends.
pub const FIXED_WINDOW_RESERVE_LUA: &str = r#"
-- breakwater fixed window, batch. KEYS[1] is a hash {w, c}.
-- ARGV: window length W (µs), limit, hits wanted per horizon, horizon H (µs), fair share F.
-- Returns {granted, remaining, reset_us, retry_us, life_us, mark (the window), now_us}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local W = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local want = math.max(1, tonumber(ARGV[3]))
local H = math.max(1, tonumber(ARGV[4]))
local F = tonumber(ARGV[5])
local w = math.floor(now / W)
local stored = redis.call('HMGET', KEYS[1], 'w', 'c')
local c = 0
if tonumber(stored[1]) == w then c = tonumber(stored[2]) end
local reset = (w + 1) * W - now
local avail = limit - c
local g = 0
local life = 0
if avail >= 1 then
  life = math.min(H, reset)
  g = math.min(math.max(1, math.floor((want * life + H - 1) / H)), avail, math.max(1, math.floor(avail / F)))
  c = c + g
else
  -- Refused, and counted, as the per-request script counts a refused hit.
  c = c + 1
end
redis.call('HSET', KEYS[1], 'w', string.format('%.0f', w), 'c', string.format('%.0f', c))
redis.call('PEXPIRE', KEYS[1], math.ceil(reset / 1000) + 1)
if g >= 1 then return {g, limit - c, reset, 0, life, w, now} end
return {0, 0, reset, reset, 0, 0, now}
"#;

/// Gives a GCRA batch's unused hits back, only if no script ran on the counter since.
pub const TOKEN_BUCKET_GIVE_BACK_LUA: &str = r#"
-- breakwater token bucket, give back. KEYS[1] holds the TAT.
-- ARGV: T (µs), capacity, mark (the TAT the batch set), hits. Returns the hits given back.
local stored = redis.call('GET', KEYS[1])
if not stored or tonumber(stored) ~= tonumber(ARGV[3]) then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local hits = tonumber(ARGV[4])
local tat = tonumber(ARGV[3]) - hits * tonumber(ARGV[1])
if tat > now then
  redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
else
  redis.call('DEL', KEYS[1])
end
return hits
"#;

/// Gives a sliding-window batch's unused hits back to the sub-window they were counted in.
pub const SLIDING_WINDOW_GIVE_BACK_LUA: &str = r#"
-- breakwater sliding window, give back. KEYS[1] is a hash {sub-window index -> hits}.
-- ARGV: B (µs), limit, mark (the sub-window), hits. Returns the hits given back.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mark = tonumber(ARGV[3])
if mark < math.floor(now / tonumber(ARGV[1])) - 20 then return 0 end
local field = string.format('%.0f', mark)
local n = tonumber(redis.call('HGET', KEYS[1], field) or 0)
if n <= 0 then return 0 end
local back = math.min(n, tonumber(ARGV[4]))
if back <= 0 then return 0 end
if back == n then
  redis.call('HDEL', KEYS[1], field)
else
  redis.call('HINCRBY', KEYS[1], field, -back)
end
return back
"#;

/// Gives a fixed-window batch's unused hits back while its window lasts and has refused none.
pub const FIXED_WINDOW_GIVE_BACK_LUA: &str = r#"
-- breakwater fixed window, give back. KEYS[1] is a hash {w, c}.
-- ARGV: W (µs), limit, mark (the window), hits. Returns the hits given back.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local mark = tonumber(ARGV[3])
if math.floor(now / tonumber(ARGV[1])) ~= mark then return 0 end
local stored = redis.call('HMGET', KEYS[1], 'w', 'c')
if tonumber(stored[1]) ~= mark then return 0 end
local c = tonumber(stored[2])
-- A count over the limit means a refused hit was counted: the window stays refusing.
if c > tonumber(ARGV[2]) then return 0 end
local back = math.min(c, tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'c', string.format('%.0f', c - back))
return back
"#;

/// The in-memory state of one counter; the Rust twin of what the scripts keep in Redis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CounterState {
    TokenBucket {
        tat: i64,
    },
    /// (sub-window index, hits), oldest first.
    SlidingWindow {
        buckets: Vec<(i64, i64)>,
    },
    FixedWindow {
        window: i64,
        count: i64,
    },
}

/// Applies `hits` to `state` at `now_us`, exactly as the Lua script for `limit` would.
/// Returns the verdict and the instant (µs) after which the state may be forgotten.
pub fn apply(limit: &Limit, state: &mut Option<CounterState>, now: i64, hits: u32) -> (Verdict, i64) {
    let hits = i64::from(hits);
    match *limit {
        Limit::TokenBucket { emission_us: t, capacity } => {
            let tau = t.saturating_mul(capacity);
            let mut tat = match state {
                Some(CounterState::TokenBucket { tat }) => *tat,
                _ => now,
            };
            if tat < now {
                tat = now;
            }
            let new_tat = tat.saturating_add(hits.saturating_mul(t));
            if new_tat - now <= tau {
                if hits > 0 {
                    *state = Some(CounterState::TokenBucket { tat: new_tat });
                }
                let v = verdict(true, (tau - (new_tat - now)) / t, new_tat - now, 0);
                (v, new_tat)
            } else {
                let retry = (tat + t - now - tau).max(0);
                let v = verdict(false, (tau - (tat - now)) / t, tat - now, retry);
                (v, tat)
            }
        }
        Limit::SlidingWindow { bucket_us: b, limit } => {
            let k = SLIDING_BUCKETS;
            let cur = now.div_euclid(b);
            let mut buckets = match state.take() {
                Some(CounterState::SlidingWindow { buckets }) => buckets,
                _ => Vec::new(),
            };
            buckets.retain(|(idx, _)| *idx >= cur - k);
            let total: i64 = buckets.iter().map(|(_, n)| n).sum();
            let newest = buckets.iter().map(|(idx, _)| *idx).max().unwrap_or(cur).max(cur);
            let result = if total + hits <= limit {
                if hits > 0 {
                    match buckets.last_mut() {
                        Some((idx, n)) if *idx == cur => *n += hits,
                        _ => buckets.push((cur, hits)),
                    }
                }
                let v = verdict(true, limit - total - hits, (newest + k + 1) * b - now, 0);
                (v, (newest + k + 1) * b)
            } else {
                let reset = if buckets.is_empty() { 0 } else { (newest + k + 1) * b - now };
                let need = total + 1 - limit;
                let mut retry = 0;
                if need > 0 {
                    retry = reset;
                    let mut dropped = 0;
                    for (idx, n) in &buckets {
                        dropped += n;
                        if dropped >= need {
                            retry = (idx + k + 1) * b - now;
                            break;
                        }
                    }
                }
                let v = verdict(false, (limit - total).max(0), reset, retry);
                (v, now + reset)
            };
            if !buckets.is_empty() {
                *state = Some(CounterState::SlidingWindow { buckets });
            }
            result
        }
        Limit::FixedWindow { window_us: w, limit } => {
            let window = now.div_euclid(w);
            let mut count = match state {
                Some(CounterState::FixedWindow { window: sw, count }) if *sw == window => *count,
                _ => 0,
            };
            let reset = (window + 1) * w - now;
            count += hits;
            if hits > 0 {
                *state = Some(CounterState::FixedWindow { window, count });
            }
            let v = if count <= limit {
                verdict(true, limit - count, reset, 0)
            } else {
                // The rejected hits were counted too: nothing fits before the window ends.
                verdict(false, 0, reset, reset)
            };
            (v, (window + 1) * w)
        }
    }
}

/// Reserves a batch in `state` at `now_us`, exactly as the batch script for `limit` would:
/// up to `want` hits per `horizon_us`, scaled to the batch's life, at most what one hit at a
/// time would still admit and a [`FAIR_SHARE`] of it. Returns the reservation and the
/// instant (µs) after which the state may be forgotten.
pub fn reserve(
    limit: &Limit,
    state: &mut Option<CounterState>,
    now: i64,
    want: u32,
    horizon_us: i64,
) -> (Reservation, i64) {
    let want = i64::from(want).max(1);
    let h = horizon_us.max(1);
    // max(1, ceil(want * life / H)): the hits wanted for a whole horizon, scaled to the life.
    let scaled = |life: i64| (want * life + h - 1).div_euclid(h).max(1);
    let share = |avail: i64| avail.div_euclid(FAIR_SHARE).max(1);
    let refused = |limit: &Limit, state: &mut Option<CounterState>| {
        // Exactly the per-request script's answer to one hit (a fixed window counts it).
        let (verdict, expires) = apply(limit, state, now, 1);
        let reservation = Reservation { granted: 0, verdict, life: Duration::ZERO, mark: 0, now_us: now };
        (reservation, expires)
    };
    let granted = |g: i64, remaining: i64, reset: i64, life: i64, mark: i64| Reservation {
        granted: u32::try_from(g).unwrap_or(u32::MAX),
        verdict: verdict(true, remaining, reset, 0),
        life: micros(life),
        mark,
        now_us: now,
    };
    match *limit {
        Limit::TokenBucket { emission_us: t, capacity } => {
            let tau = t.saturating_mul(capacity);
            let tat = match state {
                Some(CounterState::TokenBucket { tat }) => (*tat).max(now),
                _ => now,
            };
            let life = ((capacity - 1).saturating_mul(t) / 8).min(h).max(0);
            let avail = (tau - (tat - now)).div_euclid(t);
            let start = tat.max(now + life);
            let fit = (tau - (start - now)).div_euclid(t);
            let g = scaled(life).min(fit).min(share(avail));
            if avail < 1 || g < 1 {
                return refused(limit, state);
            }
            let new_tat = start + g * t;
            *state = Some(CounterState::TokenBucket { tat: new_tat });
            let remaining = (tau - (new_tat - now)).div_euclid(t);
            (granted(g, remaining, new_tat - now, life, new_tat), new_tat)
        }
        Limit::SlidingWindow { bucket_us: b, limit: quota } => {
            let k = SLIDING_BUCKETS;
            let cur = now.div_euclid(b);
            let mut buckets = match state.take() {
                Some(CounterState::SlidingWindow { buckets }) => buckets,
                _ => Vec::new(),
            };
            buckets.retain(|(idx, _)| *idx >= cur - k);
            let total: i64 = buckets.iter().map(|(_, n)| n).sum();
            let avail = quota - total;
            if avail < 1 {
                if !buckets.is_empty() {
                    *state = Some(CounterState::SlidingWindow { buckets });
                }
                return refused(limit, state);
            }
            let newest = buckets.iter().map(|(idx, _)| *idx).max().unwrap_or(cur).max(cur);
            let life = ((cur + 1) * b - now).min(h);
            let g = scaled(life).min(avail).min(share(avail));
            match buckets.last_mut() {
                Some((idx, n)) if *idx == cur => *n += g,
                _ => buckets.push((cur, g)),
            }
            *state = Some(CounterState::SlidingWindow { buckets });
            let reset = (newest + k + 1) * b - now;
            (granted(g, avail - g, reset, life, cur), (newest + k + 1) * b)
        }
        Limit::FixedWindow { window_us: w, limit: quota } => {
            let window = now.div_euclid(w);
            let count = match state {
                Some(CounterState::FixedWindow { window: sw, count }) if *sw == window => *count,
                _ => 0,
            };
            let avail = quota - count;
            if avail < 1 {
                return refused(limit, state);
            }
            let reset = (window + 1) * w - now;
            let life = reset.min(h);
            let g = scaled(life).min(avail).min(share(avail));
            *state = Some(CounterState::FixedWindow { window, count: count + g });
            (granted(g, avail - g, reset, life, window), (window + 1) * w)
        }
    }
}

/// Gives `hits` of the batch counted in `mark` back to `state` at `now_us`, exactly as the
/// give-back script for `limit` would, where that is safe (docs/agent.md, "Giving hits
/// back"); returns the hits given back. The state's expiry does not move.
pub fn give_back(limit: &Limit, state: &mut Option<CounterState>, now: i64, mark: i64, hits: u32) -> u32 {
    let hits = i64::from(hits);
    let back = match (*limit, state.as_mut()) {
        (Limit::TokenBucket { emission_us: t, .. }, Some(CounterState::TokenBucket { tat }))
            if *tat == mark =>
        {
            // As if the batch had been `hits` smaller: nothing was reserved after it.
            let lowered = mark - hits * t;
            if lowered > now {
                *tat = lowered;
            } else {
                *state = None;
            }
            hits
        }
        (Limit::SlidingWindow { bucket_us: b, .. }, Some(CounterState::SlidingWindow { buckets }))
            if mark >= now.div_euclid(b) - SLIDING_BUCKETS =>
        {
            match buckets.iter().position(|(idx, _)| *idx == mark) {
                Some(i) => {
                    let back = buckets[i].1.min(hits).max(0);
                    buckets[i].1 -= back;
                    if buckets[i].1 <= 0 {
                        buckets.remove(i);
                    }
                    if buckets.is_empty() {
                        *state = None;
                    }
                    back
                }
                None => 0,
            }
        }
        (
            Limit::FixedWindow { window_us: w, limit: quota },
            Some(CounterState::FixedWindow { window, count }),
        ) if *window == mark && now.div_euclid(w) == mark && *count <= quota => {
            let back = (*count).min(hits);
            *count -= back;
            back
        }
        _ => 0,
    };
    u32::try_from(back).unwrap_or(0)
}

fn verdict(admitted: bool, remaining: i64, reset: i64, retry: i64) -> Verdict {
    Verdict {
        admitted,
        remaining: u64::try_from(remaining).unwrap_or(0),
        reset: micros(reset),
        retry_after: micros(retry),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use breakwater_api::rate_limit::FailureMode;

    fn rule(algorithm: Algorithm, requests: u32, period_ms: u64, burst: u32) -> Limit {
        Limit::from_rule(&RateLimitRule {
            id: "t".into(),
            requests,
            period_ms,
            burst,
            algorithm,
            shadow: false,
            failure_mode: FailureMode::Open,
        })
        .unwrap()
    }

    fn run(limit: &Limit, state: &mut Option<CounterState>, now: i64, n: u32) -> u32 {
        (0..n).filter(|_| apply(limit, state, now, 1).0.admitted).count() as u32
    }

    const T0: i64 = 1_700_000_000_000_000;

    #[test]
    fn token_bucket_admits_capacity_then_one_per_emission() {
        let limit = rule(Algorithm::TokenBucket, 10, 1000, 5);
        assert_eq!(limit, Limit::TokenBucket { emission_us: 100_000, capacity: 15 });
        let mut s = None;
        assert_eq!(run(&limit, &mut s, T0, 100), 15);
        let (v, _) = apply(&limit, &mut s, T0, 1);
        assert_eq!(v.retry_after, Duration::from_millis(100));
        assert_eq!(v.reset, Duration::from_millis(1500));
        assert_eq!(run(&limit, &mut s, T0 + 99_999, 10), 0);
        assert_eq!(run(&limit, &mut s, T0 + 100_000, 10), 1);
        assert_eq!(run(&limit, &mut s, T0 + 1_600_000, 100), 15);
    }

    #[test]
    fn token_bucket_rounds_emission_up() {
        assert_eq!(
            rule(Algorithm::TokenBucket, 3, 1000, 0),
            Limit::TokenBucket { emission_us: 333_334, capacity: 3 }
        );
    }

    #[test]
    fn hits_above_remaining_are_refused_whole() {
        let limit = rule(Algorithm::TokenBucket, 10, 1000, 0);
        let mut s = None;
        assert!(apply(&limit, &mut s, T0, 8).0.admitted);
        let (v, _) = apply(&limit, &mut s, T0, 3);
        assert!(!v.admitted);
        assert_eq!(v.remaining, 2);
        assert_eq!(v.retry_after, Duration::ZERO, "one hit would still fit");
        assert!(apply(&limit, &mut s, T0, 2).0.admitted);
    }

    #[test]
    fn fixed_window_counts_rejected_hits_and_resets_on_the_boundary() {
        let limit = rule(Algorithm::FixedWindow, 3, 1000, 0);
        let mut s = None;
        let start = (T0 / 1_000_000 + 1) * 1_000_000;
        assert_eq!(run(&limit, &mut s, start + 10, 5), 3);
        let (v, _) = apply(&limit, &mut s, start + 10, 1);
        assert_eq!(v.reset, Duration::from_micros(999_990));
        assert_eq!(v.retry_after, v.reset);
        assert_eq!(run(&limit, &mut s, start + 999_999, 5), 0);
        assert_eq!(run(&limit, &mut s, start + 1_000_000, 5), 3);
    }

    #[test]
    fn sliding_window_never_admits_more_than_the_limit_in_any_period() {
        let limit = rule(Algorithm::SlidingWindow, 10, 1000, 0);
        let mut s = None;
        let mut admitted: Vec<i64> = Vec::new();
        // One attempt every 7 ms for 5 s.
        let mut now = T0;
        while now < T0 + 5_000_000 {
            if apply(&limit, &mut s, now, 1).0.admitted {
                admitted.push(now);
            }
            now += 7_000;
        }
        for (i, t) in admitted.iter().enumerate() {
            let in_window = admitted[i..].iter().take_while(|u| **u < t + 1_000_000).count();
            assert!(in_window <= 10, "{in_window} admitted in the second from {t}");
        }
        // Under steady overload it admits at least 20/21 of the limit per period.
        assert!(admitted.len() >= 47, "{}", admitted.len());
    }

    #[test]
    fn sliding_window_retry_after_is_when_the_oldest_hits_leave() {
        let limit = rule(Algorithm::SlidingWindow, 2, 1000, 0);
        let mut s = None;
        let start = (T0 / 50_000) * 50_000;
        assert_eq!(run(&limit, &mut s, start, 2), 2);
        let (v, _) = apply(&limit, &mut s, start + 10_000, 1);
        assert!(!v.admitted);
        // Sub-window `start` leaves the window 21 sub-windows after it began.
        assert_eq!(v.retry_after, Duration::from_micros(21 * 50_000 - 10_000));
        assert_eq!(run(&limit, &mut s, start + 21 * 50_000 - 1, 1), 0);
        assert_eq!(run(&limit, &mut s, start + 21 * 50_000, 3), 2);
    }

    #[test]
    fn a_refused_batch_is_the_per_request_rejection() {
        for limit in [
            rule(Algorithm::TokenBucket, 10, 1000, 0),
            rule(Algorithm::SlidingWindow, 10, 1000, 0),
            rule(Algorithm::FixedWindow, 10, 1000, 0),
        ] {
            let (mut batched, mut single) = (None, None);
            let now = T0 + 7;
            assert_eq!(run(&limit, &mut batched, now, 10), 10);
            assert_eq!(run(&limit, &mut single, now, 10), 10);
            let (r, _) = reserve(&limit, &mut batched, now + 5, 100, 100_000);
            let (v, _) = apply(&limit, &mut single, now + 5, 1);
            assert_eq!((r.granted, r.verdict, r.life, r.mark), (0, v, Duration::ZERO, 0), "{limit:?}");
            assert_eq!(batched, single, "{limit:?}: the same state after (a fixed window counts the hit)");
        }
    }

    #[test]
    fn batches_are_partial_near_the_limit_and_a_fair_share_at_most() {
        let limit = rule(Algorithm::FixedWindow, 1000, 10_000, 0);
        let mut s = None;
        let start = (T0 / 10_000_000 + 1) * 10_000_000;
        // 1000 left: at most 62 (a sixteenth), though 500 are wanted.
        let (r, _) = reserve(&limit, &mut s, start, 500, 100_000);
        assert_eq!((r.granted, r.verdict.remaining, r.life), (62, 938, Duration::from_millis(100)));
        assert_eq!(r.mark, start / 10_000_000);
        assert_eq!(run(&limit, &mut s, start, 930), 930);
        // 8 left: one at a time is 8, a sixteenth of 8 rounds up to 1.
        let (r, _) = reserve(&limit, &mut s, start, 500, 100_000);
        assert_eq!((r.granted, r.verdict.remaining), (1, 7));
        // The life scales the hits wanted for a whole horizon: 10 ms before the window ends,
        // a tenth of the horizon.
        let limit = rule(Algorithm::FixedWindow, 100_000, 10_000, 0);
        let mut s = None;
        let (r, _) = reserve(&limit, &mut s, start + 9_990_000, 500, 100_000);
        assert_eq!((r.granted, r.life), (50, Duration::from_millis(10)));
    }

    #[test]
    fn a_token_bucket_batch_starts_at_the_end_of_its_life() {
        // T = 1 ms, C = 1000: a batch from a full bucket is charged from now + 100 ms.
        let limit = rule(Algorithm::TokenBucket, 1000, 1000, 0);
        let mut s = None;
        let (r, _) = reserve(&limit, &mut s, T0, 50, 100_000);
        assert_eq!((r.granted, r.life, r.mark), (50, Duration::from_millis(100), T0 + 150_000));
        assert_eq!(s, Some(CounterState::TokenBucket { tat: T0 + 150_000 }));
        assert_eq!(r.verdict.remaining, 850, "the prepaid 100 ms are 100 hits of the burst");
        // A bucket of capacity 1 gets no life: a batch is the asking hit alone.
        let one = rule(Algorithm::TokenBucket, 1, 1000, 0);
        let mut s = None;
        let (r, _) = reserve(&one, &mut s, T0, 50, 100_000);
        assert_eq!((r.granted, r.life), (1, Duration::ZERO));
        assert!(!apply(&one, &mut s, T0, 1).0.admitted);
    }

    #[test]
    fn hits_are_given_back_only_where_it_is_safe() {
        // TokenBucket: only while the TAT is the batch's.
        let limit = rule(Algorithm::TokenBucket, 1000, 1000, 0);
        let mut s = None;
        let (r, _) = reserve(&limit, &mut s, T0, 50, 100_000);
        assert_eq!(give_back(&limit, &mut s, T0 + 10, r.mark, 20), 20);
        assert_eq!(s, Some(CounterState::TokenBucket { tat: T0 + 130_000 }));
        let (r, _) = reserve(&limit, &mut s, T0 + 20, 50, 100_000);
        assert!(apply(&limit, &mut s, T0 + 30, 1).0.admitted);
        assert_eq!(give_back(&limit, &mut s, T0 + 40, r.mark, 20), 0, "a hit came after the batch");
        // SlidingWindow: to the sub-window, after it ended too, while it is in the window.
        let limit = rule(Algorithm::SlidingWindow, 1000, 1000, 0);
        let mut s = None;
        let start = (T0 / 50_000) * 50_000;
        let (r, _) = reserve(&limit, &mut s, start, 50, 100_000);
        assert_eq!((r.granted, r.life), (25, Duration::from_millis(50)), "until the sub-window ends");
        assert!(apply(&limit, &mut s, start + 60_000, 1).0.admitted);
        assert_eq!(give_back(&limit, &mut s, start + 70_000, r.mark, 24), 24);
        assert_eq!(s, Some(CounterState::SlidingWindow { buckets: vec![(r.mark, 1), (r.mark + 1, 1)] }));
        assert_eq!(give_back(&limit, &mut s, start + 21 * 50_000, r.mark, 1), 0, "out of the window");
        // FixedWindow: in its window, and only while it has refused nothing.
        let limit = rule(Algorithm::FixedWindow, 100, 1000, 0);
        let mut s = None;
        let start = (T0 / 1_000_000 + 1) * 1_000_000;
        let (r, _) = reserve(&limit, &mut s, start, 50, 100_000);
        assert_eq!(r.granted, 6);
        assert_eq!(give_back(&limit, &mut s, start + 1000, r.mark, 5), 5);
        assert_eq!(run(&limit, &mut s, start + 2000, 100), 99);
        let (r, _) = reserve(&limit, &mut s, start + 3000, 50, 100_000);
        assert_eq!(r.granted, 0);
        assert_eq!(give_back(&limit, &mut s, start + 4000, start / 1_000_000, 5), 0, "it refused hits");
    }

    /// Batches reserved, per-request hits, other agents draining the counter, and batch hits
    /// admitted at any instant of their life (its last one too), in random order: every
    /// algorithm's guarantee holds on the admitted instants. (Without the GCRA floor, or with
    /// a window batch outliving its sub-window or window, this fails within a few seeds.)
    #[test]
    fn guarantees_hold_with_batch_hits_admitted_anywhere_in_their_life() {
        for seed in 0..300u64 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let algorithm =
                [Algorithm::TokenBucket, Algorithm::SlidingWindow, Algorithm::FixedWindow][rng.usize(0..3)];
            let requests = rng.u32(1..300);
            let period_ms = rng.u64(1..3000);
            let burst = if algorithm == Algorithm::TokenBucket { rng.u32(0..50) } else { 0 };
            let limit = rule(algorithm, requests, period_ms, burst);
            let horizon = rng.i64(1..400_000);
            let period = i64::try_from(period_ms).unwrap() * 1000;
            let mut state = None;
            let mut now = T0 + rng.i64(0..period);
            let mut admitted: Vec<i64> = Vec::new();
            // (hits left, the instant they may no longer be admitted at, mark)
            let mut batches: Vec<(u32, i64, i64)> = Vec::new();
            for _ in 0..1500 {
                if rng.bool() {
                    now += rng.i64(0..period / 20 + 2);
                }
                match rng.u8(0..11) {
                    0..=1 => {
                        let hits = rng.u32(0..3);
                        if apply(&limit, &mut state, now, hits).0.admitted {
                            admitted.extend(std::iter::repeat_n(now, hits as usize));
                        }
                    }
                    // Another agent drains the counter, one hit at a time.
                    2 => {
                        while apply(&limit, &mut state, now, 1).0.admitted {
                            admitted.push(now);
                        }
                    }
                    // A batch's hits admitted at the last instant of its life.
                    9 if !batches.is_empty() => {
                        let i = rng.usize(0..batches.len());
                        let (left, until, _) = &mut batches[i];
                        if now < *until {
                            now = *until - 1;
                            admitted.extend(std::iter::repeat_n(now, *left as usize));
                            *left = 0;
                        }
                    }
                    3..=4 => {
                        let (r, _) = reserve(&limit, &mut state, now, rng.u32(1..400), horizon);
                        if r.granted > 0 {
                            admitted.push(now);
                            let life = i64::try_from(r.life.as_micros()).unwrap();
                            batches.push((r.granted - 1, now + life, r.mark));
                        }
                    }
                    5..=8 if !batches.is_empty() => {
                        let i = rng.usize(0..batches.len());
                        let (left, until, _) = &mut batches[i];
                        if now < *until {
                            let n = rng.u32(0..=*left);
                            *left -= n;
                            admitted.extend(std::iter::repeat_n(now, n as usize));
                        }
                    }
                    10 if !batches.is_empty() => {
                        let (left, _, mark) = batches.swap_remove(rng.usize(0..batches.len()));
                        give_back(&limit, &mut state, now, mark, left);
                    }
                    _ => {}
                }
            }
            admitted.sort_unstable();
            let context = format!("seed {seed}: {limit:?}, horizon {horizon} µs");
            match limit {
                Limit::TokenBucket { emission_us: t, capacity } => {
                    // Every interval [a_i, a_j] holds at most C + floor((a_j - a_i) / T) hits
                    // exactly when a fresh GCRA run over the admitted instants admits them
                    // all: its TAT after hit j is the largest a_i + (j - i + 1) T.
                    let mut tat = i64::MIN;
                    for a in &admitted {
                        tat = tat.max(*a) + t;
                        assert!(tat - a <= t * capacity, "{context}: more than C + (b - a)/T up to {a}");
                    }
                }
                Limit::SlidingWindow { limit: quota, .. } => {
                    for (i, a) in admitted.iter().enumerate() {
                        let n = admitted[i..].iter().take_while(|b| **b < a + period).count();
                        assert!(i64::try_from(n).unwrap() <= quota, "{context}: {n} in the period from {a}");
                    }
                }
                Limit::FixedWindow { window_us, limit: quota } => {
                    let mut per_window = std::collections::HashMap::new();
                    for a in &admitted {
                        *per_window.entry(a.div_euclid(window_us)).or_insert(0i64) += 1;
                    }
                    for (w, n) in per_window {
                        assert!(n <= quota, "{context}: {n} in window {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn replies_decode() {
        let v = Verdict::from_reply(&[0, 3, 1500, 20]).unwrap();
        assert!(!v.admitted);
        assert_eq!(v.remaining, 3);
        assert_eq!(v.retry_after, Duration::from_micros(20));
        assert!(Verdict::from_reply(&[1, 2]).is_none());
        let r = Reservation::from_reply(&[5, 3, 1500, 0, 100, 7, 42]).unwrap();
        assert_eq!(
            (r.granted, r.verdict.admitted, r.life, r.mark, r.now_us),
            (5, true, Duration::from_micros(100), 7, 42)
        );
        assert!(Reservation::from_reply(&[-1, 3, 1500, 0, 100, 7, 42]).is_none());
    }
}
