//! Counters known to be over their limit, remembered until one more hit could fit.
//!
//! When the store rejects a hit it also says when a single further hit would be admitted
//! (`retry_after`). Until then every request on that counter would be rejected by the store
//! too, so the limiter answers OVER_LIMIT from here without a round trip — as
//! envoyproxy/ratelimit's local cache does. The cache only ever rejects, so it can never
//! admit more than the store would; at worst it rejects for up to one millisecond longer
//! than necessary (times are rounded up). It is cleared whenever the configuration changes,
//! since a raised limit may make a remembered rejection wrong.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SHARDS: usize = 16;

#[derive(Debug, Clone, Copy)]
pub struct CachedRejection {
    /// When one more hit may fit.
    pub until: Instant,
    /// When the counter is back to its full quota.
    pub reset_at: Instant,
    /// The rule set that produced it: a decision still in flight on the previous rule set
    /// may insert after the cache was cleared, and must not be believed by the new one.
    pub generation: u64,
}

#[derive(Debug)]
pub struct OverLimitCache {
    shards: Vec<Mutex<HashMap<Box<str>, CachedRejection>>>,
    hasher: std::collections::hash_map::RandomState,
    /// Entries per shard; past this a shard is swept, and if still full the new entry is
    /// dropped (the store is asked next time, which is always correct).
    shard_capacity: usize,
}

impl OverLimitCache {
    pub fn new(capacity: usize) -> Self {
        OverLimitCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            shard_capacity: capacity.div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<Box<str>, CachedRejection>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The remembered rejection of `key`, if it still holds at `now`.
    pub fn get(&self, key: &str, now: Instant, generation: u64) -> Option<CachedRejection> {
        if self.shard_capacity == 0 {
            return None;
        }
        let mut shard = self.shard(key).lock().ok()?;
        match shard.get(key) {
            Some(entry) if entry.until > now && entry.generation == generation => Some(*entry),
            Some(_) => {
                shard.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers that `key` rejects every hit for `retry_after` from `now`.
    pub fn insert(&self, key: &str, now: Instant, retry_after: Duration, reset: Duration, generation: u64) {
        if self.shard_capacity == 0 || retry_after < Duration::from_millis(1) {
            return;
        }
        let round_up = |d: Duration| now + Duration::from_millis(d.as_millis() as u64 + 1);
        let entry = CachedRejection {
            until: round_up(retry_after),
            reset_at: round_up(reset.max(retry_after)),
            generation,
        };
        let Ok(mut shard) = self.shard(key).lock() else { return };
        if shard.len() >= self.shard_capacity {
            shard.retain(|_, e| e.until > now);
            if shard.len() >= self.shard_capacity {
                return;
            }
        }
        shard.insert(key.into(), entry);
    }

    pub fn clear(&self) {
        for shard in &self.shards {
            if let Ok(mut shard) = shard.lock() {
                shard.clear();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|s| s.len()).unwrap_or(0)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_until_one_hit_fits_and_stays_bounded() {
        let cache = OverLimitCache::new(32);
        let now = Instant::now();
        cache.insert("a", now, Duration::from_millis(10), Duration::from_secs(1), 1);
        assert!(cache.get("a", now + Duration::from_millis(10), 1).is_some(), "rounded up, never early");
        assert!(cache.get("a", now, 2).is_none(), "another rule set does not believe it");
        assert!(cache.get("a", now + Duration::from_millis(11), 1).is_none());
        assert!(cache.is_empty(), "expired entries are removed on lookup");
        cache.insert("zero", now, Duration::ZERO, Duration::from_secs(1), 1);
        assert!(cache.get("zero", now, 1).is_none(), "a hit fits already: nothing to remember");
        for i in 0..1000 {
            cache.insert(&format!("k{i}"), now, Duration::from_secs(5), Duration::from_secs(5), 1);
        }
        assert!(cache.len() <= 32, "{}", cache.len());
        cache.clear();
        assert!(cache.is_empty());
    }
}
