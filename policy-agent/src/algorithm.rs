//! The three limiting algorithms, written twice on purpose: as Lua scripts that Redis runs
//! atomically (with Redis `TIME` as the clock, so pod clocks never matter), and as pure Rust
//! functions over an explicit clock for the in-memory store. Both compute the same thing
//! with the same integer microsecond arithmetic; the conformance tests hold them to it.
//!
//! All three answer a [`Verdict`]: admitted or not, what is left, when the counter is fresh
//! again, and when a single further hit would fit (which is how long the over-limit cache
//! may remember a rejection without ever admitting more than the store would).

use std::time::Duration;

use breakwater_api::agent::RateLimitRule;
use breakwater_api::rate_limit::Algorithm;

/// A sliding window is counted in this many sub-windows (plus the one being filled).
/// The window a decision looks at spans between `period` and `period * (1 + 1/20)`, so it
/// never admits more than `requests` in any interval of length `period`, and under steady
/// overload admits at least `requests * 20/21` (95.2 %) per period.
pub const SLIDING_BUCKETS: i64 = 20;

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
        match *self {
            Limit::TokenBucket { emission_us, capacity } => [emission_us, capacity, i64::from(hits)],
            Limit::SlidingWindow { bucket_us, limit } => [bucket_us, limit, i64::from(hits)],
            Limit::FixedWindow { window_us, limit } => [window_us, limit, i64::from(hits)],
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
    fn replies_decode() {
        let v = Verdict::from_reply(&[0, 3, 1500, 20]).unwrap();
        assert!(!v.admitted);
        assert_eq!(v.remaining, 3);
        assert_eq!(v.retry_after, Duration::from_micros(20));
        assert!(Verdict::from_reply(&[1, 2]).is_none());
    }
}
