//! Leases in this process: the Redis scripts' semantics over a map, for one agent alone
//! (standalone mode) and tests. The clock is a [`TokioClock`] (`tokio::time::Instant`,
//! mapped to µs since the Unix epoch at creation), so tests under tokio's paused clock
//! control expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::{Attempt, Grant, LeaseState, LeaseStore, not_holder};
use crate::Error;
use crate::clock::{Clock, TokioClock, micros};

/// Leases in memory. Clones share the leases.
#[derive(Debug, Clone, Default)]
pub struct MemoryLeases {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    leases: Mutex<HashMap<String, Lease>>,
    clock: TokioClock,
}

/// One lease: its live grants and its newest token (kept for the process's life, unlike the
/// Redis token key: an entry per lease id is small and ids are bounded by configuration).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Lease {
    last_token: Option<i64>,
    grants: Vec<Grant>,
}

impl MemoryLeases {
    pub fn new() -> Self {
        Self::default()
    }

    /// The store's clock, µs since the Unix epoch.
    pub fn now_us(&self) -> i64 {
        self.inner.clock.now_us()
    }

    fn leases(&self) -> MutexGuard<'_, HashMap<String, Lease>> {
        // A panic while holding the lock cannot leave a lease half-updated: every change
        // below is computed first and stored last.
        self.inner.leases.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with_lease<T>(&self, lease: &str, f: impl FnOnce(&mut Lease, i64) -> T) -> T {
        let mut leases = self.leases();
        // Read under the lock, as the scripts read TIME inside their atomic run: operations
        // are then ordered by their times, which is what the history checker relies on.
        let now = self.now_us();
        let entry = leases.entry(lease.to_string()).or_default();
        entry.drop_expired(now);
        f(entry, now)
    }
}

impl Lease {
    /// An expiry equal to now has expired, as in the scripts.
    fn drop_expired(&mut self, now: i64) {
        self.grants.retain(|g| g.expires_at_us > now);
    }

    fn acquire(&mut self, now: i64, holder: &str, ttl_us: i64, capacity: u32, floor: i64) -> Attempt {
        if let Some(current) = self.grants.iter().find(|g| g.holder == holder) {
            return Attempt::Granted(current.clone());
        }
        if self.grants.len() >= capacity as usize {
            let free_at_us = self.grants.iter().map(|g| g.expires_at_us).min().unwrap_or(now);
            return Attempt::Busy { now_us: now, free_at_us };
        }
        let token = self.last_token.unwrap_or(0).saturating_add(1).max(now).max(floor.saturating_add(1));
        let grant = Grant {
            holder: holder.into(),
            fencing_token: token,
            acquired_at_us: now,
            renewed_at_us: now,
            expires_at_us: now.saturating_add(ttl_us),
        };
        self.last_token = Some(token);
        self.grants.push(grant.clone());
        Attempt::Granted(grant)
    }

    fn position(&self, holder: &str, token: i64) -> Option<usize> {
        self.grants.iter().position(|g| g.holder == holder && g.fencing_token == token)
    }
}

impl LeaseStore for MemoryLeases {
    async fn try_acquire(
        &self,
        lease: &str,
        holder: &str,
        ttl: Duration,
        capacity: u32,
        floor: i64,
    ) -> Result<Attempt, Error> {
        Ok(self.with_lease(lease, |l, now| l.acquire(now, holder, micros(ttl), capacity, floor)))
    }

    async fn renew(&self, lease: &str, holder: &str, token: i64, ttl: Duration) -> Result<Grant, Error> {
        self.with_lease(lease, |l, now| {
            let i = l.position(holder, token)?;
            let grant = &mut l.grants[i];
            grant.renewed_at_us = now;
            grant.expires_at_us = now.saturating_add(micros(ttl));
            Some(grant.clone())
        })
        .ok_or_else(|| not_holder(lease, holder, token))
    }

    async fn release(&self, lease: &str, holder: &str, token: i64) -> Result<i64, Error> {
        self.with_lease(lease, |l, now| {
            let i = l.position(holder, token)?;
            l.grants.swap_remove(i);
            Some(now)
        })
        .ok_or_else(|| not_holder(lease, holder, token))
    }

    async fn state(&self, lease: &str) -> Result<LeaseState, Error> {
        Ok(self.with_lease(lease, |l, now| {
            let mut grants = l.grants.clone();
            grants.sort_by_key(|g| g.fencing_token);
            LeaseState { now_us: now, last_token: l.last_token, grants }
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_the_rule() {
        let mut lease = Lease::default();
        // The clock term.
        let Attempt::Granted(a) = lease.acquire(1_000, "a", 10, 2, 0) else { panic!() };
        assert_eq!(a.fencing_token, 1_000);
        // last + 1 when grants come faster than the clock.
        let Attempt::Granted(b) = lease.acquire(1_000, "b", 10, 2, 0) else { panic!() };
        assert_eq!(b.fencing_token, 1_001);
        // The floor.
        lease.drop_expired(2_000);
        let Attempt::Granted(c) = lease.acquire(2_000, "c", 10, 2, 5_000) else { panic!() };
        assert_eq!(c.fencing_token, 5_001);
    }

    #[test]
    fn busy_until_the_earliest_expiry_and_retries_get_the_same_grant() {
        let mut lease = Lease::default();
        let Attempt::Granted(a) = lease.acquire(100, "a", 50, 2, 0) else { panic!() };
        lease.acquire(120, "b", 50, 2, 0);
        assert_eq!(lease.acquire(130, "c", 50, 2, 0), Attempt::Busy { now_us: 130, free_at_us: 150 });
        assert_eq!(lease.acquire(130, "a", 50, 2, 0), Attempt::Granted(a));
        lease.drop_expired(150);
        assert!(matches!(lease.acquire(150, "c", 50, 2, 0), Attempt::Granted(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_follows_the_paused_clock() {
        let store = MemoryLeases::new();
        let Attempt::Granted(a) = store.try_acquire("l", "a", Duration::from_secs(1), 1, 0).await.unwrap()
        else {
            panic!("free lease")
        };
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(matches!(
            store.try_acquire("l", "b", Duration::from_secs(1), 1, 0).await.unwrap(),
            Attempt::Busy { .. }
        ));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(matches!(
            store.renew("l", "a", a.fencing_token, Duration::from_secs(1)).await,
            Err(Error::NotHolder { .. })
        ));
        assert!(matches!(
            store.try_acquire("l", "b", Duration::from_secs(1), 1, 0).await.unwrap(),
            Attempt::Granted(_)
        ));
    }
}
