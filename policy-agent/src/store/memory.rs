//! Counters in this process: for standalone mode (one agent, no Redis) and for tests. The
//! algorithms are the pure functions of [`crate::algorithm`], so the in-memory store
//! behaves exactly like Redis running the scripts. Memory stays bounded: a counter is
//! forgotten once its state can no longer affect a decision.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use super::{CounterStore, StoreError};
use crate::algorithm::{CounterState, Limit, Reservation, Verdict, apply, give_back, reserve};

const SHARDS: usize = 16;

/// The clock the in-memory store reads: microseconds since the Unix epoch.
pub type Clock = Arc<dyn Fn() -> i64 + Send + Sync>;

#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<Mutex<Shard>>,
    hasher: std::collections::hash_map::RandomState,
    clock: Clock,
}

#[derive(Default)]
struct Shard {
    counters: HashMap<Box<str>, (CounterState, i64)>,
    /// Sweep expired counters when the shard has grown past this.
    sweep_at: usize,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

/// Microseconds since the Unix epoch by the system clock.
pub fn system_clock_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_clock(Arc::new(system_clock_us))
    }

    /// A store on an explicit clock, for tests that move time by hand.
    pub fn with_clock(clock: Clock) -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                shards: (0..SHARDS)
                    .map(|_| Mutex::new(Shard { sweep_at: 1024, ..Shard::default() }))
                    .collect(),
                hasher: std::collections::hash_map::RandomState::new(),
                clock,
            }),
        }
    }

    /// How many counters are held (expired ones may linger until the next sweep).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).counters.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn hit_now(&self, key: &str, limit: &Limit, hits: u32) -> Verdict {
        self.update(key, |state, now, _| apply(limit, state, now, hits))
    }

    /// Runs `step` on the counter `key` at the store's clock (with the instant the state was
    /// to be forgotten at), under its shard's lock, and keeps the state it leaves until the
    /// instant it returns.
    fn update<T>(&self, key: &str, step: impl FnOnce(&mut Option<CounterState>, i64, i64) -> (T, i64)) -> T {
        let now = (self.inner.clock)();
        let shard = &self.inner.shards[(self.inner.hasher.hash_one(key) as usize) % SHARDS];
        // A panic while holding the lock cannot leave a counter half-updated: the new state
        // is computed first and stored last.
        let mut shard = shard.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (mut state, expired) = match shard.counters.get(key) {
            Some((state, expires)) if *expires > now => (Some(state.clone()), *expires),
            _ => (None, now),
        };
        let (verdict, expires) = step(&mut state, now, expired);
        match state {
            Some(state) if expires > now => {
                shard.counters.insert(key.into(), (state, expires));
            }
            _ => {
                shard.counters.remove(key);
            }
        }
        if shard.counters.len() >= shard.sweep_at {
            shard.counters.retain(|_, (_, expires)| *expires > now);
            shard.sweep_at = (shard.counters.len() * 2).max(1024);
        }
        verdict
    }
}

impl CounterStore for MemoryStore {
    async fn hit(&self, key: &str, limit: &Limit, hits: u32) -> Result<Verdict, StoreError> {
        Ok(self.hit_now(key, limit, hits))
    }

    async fn reserve(
        &self,
        key: &str,
        limit: &Limit,
        want: u32,
        horizon: std::time::Duration,
    ) -> Result<Reservation, StoreError> {
        let horizon_us = i64::try_from(horizon.as_micros()).unwrap_or(i64::MAX);
        Ok(self.update(key, |state, now, _| reserve(limit, state, now, want, horizon_us)))
    }

    async fn give_back(&self, key: &str, limit: &Limit, mark: i64, hits: u32) -> Result<u32, StoreError> {
        // The expiry does not move (as in Redis): a lowered TAT or count only ends sooner.
        Ok(self.update(key, |state, now, expires| (give_back(limit, state, now, mark, hits), expires)))
    }

    fn is_up(&self) -> bool {
        true
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};

    use super::*;

    #[tokio::test]
    async fn forgets_counters_that_no_longer_matter() {
        let now = Arc::new(AtomicI64::new(1_700_000_000_000_000));
        let clock = now.clone();
        let store = MemoryStore::with_clock(Arc::new(move || clock.load(Ordering::SeqCst)));
        let limit = Limit::FixedWindow { window_us: 1_000_000, limit: 5 };
        for i in 0..5000 {
            store.hit(&format!("k{i}"), &limit, 1).await.unwrap();
        }
        assert_eq!(store.len(), 5000);
        now.fetch_add(2_000_000, Ordering::SeqCst);
        for i in 0..SHARDS * 1024 {
            store.hit(&format!("n{i}"), &limit, 1).await.unwrap();
        }
        assert!(store.len() < 5000 + SHARDS * 1024, "expired counters were swept: {}", store.len());
    }
}
