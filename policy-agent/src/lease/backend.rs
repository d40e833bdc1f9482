//! The lease backend chosen at start-up: it follows the counter store (Redis counters, Redis
//! leases on the same connections; memory counters, memory leases).

use std::time::Duration;

use super::memory::MemoryLeases;
use super::redis::RedisLeases;
use super::{Attempt, Grant, LeaseError, LeaseState, LeaseStore};

#[derive(Debug, Clone)]
pub enum AnyLeases {
    Memory(MemoryLeases),
    Redis(RedisLeases),
}

impl LeaseStore for AnyLeases {
    async fn try_acquire(
        &self,
        lease: &str,
        holder: &str,
        ttl: Duration,
        capacity: u32,
        floor: i64,
    ) -> Result<Attempt, LeaseError> {
        match self {
            AnyLeases::Memory(store) => store.try_acquire(lease, holder, ttl, capacity, floor).await,
            AnyLeases::Redis(store) => store.try_acquire(lease, holder, ttl, capacity, floor).await,
        }
    }

    async fn renew(&self, lease: &str, holder: &str, token: i64, ttl: Duration) -> Result<Grant, LeaseError> {
        match self {
            AnyLeases::Memory(store) => store.renew(lease, holder, token, ttl).await,
            AnyLeases::Redis(store) => store.renew(lease, holder, token, ttl).await,
        }
    }

    async fn release(&self, lease: &str, holder: &str, token: i64) -> Result<i64, LeaseError> {
        match self {
            AnyLeases::Memory(store) => store.release(lease, holder, token).await,
            AnyLeases::Redis(store) => store.release(lease, holder, token).await,
        }
    }

    async fn state(&self, lease: &str) -> Result<LeaseState, LeaseError> {
        match self {
            AnyLeases::Memory(store) => store.state(lease).await,
            AnyLeases::Redis(store) => store.state(lease).await,
        }
    }
}
