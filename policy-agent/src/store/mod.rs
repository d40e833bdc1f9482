//! Where counters live. One small trait, [`CounterStore`], with two backends: Redis
//! (standalone or Cluster, on a [`RedisConnection`]; what every production agent uses, so
//! that a limit holds across pods) and in-memory (standalone mode and tests). Each backend
//! applies one hit, or one quota batch, to one counter atomically and says, when it fails, whether the failure is
//! transient ([`StoreError::kind`]) — the limiter answers by the rule's failure mode either
//! way, but only transient failures mean "Redis is away" for readiness and metrics.

use std::future::Future;

pub use breakwater_store::{Error as StoreError, ErrorKind, RedisConnection, RedisSettings, RedisTopology};

use crate::algorithm::{Limit, Reservation, Verdict};

pub mod memory;
pub mod redis;

pub use memory::MemoryStore;

/// Counters, each one updated atomically.
pub trait CounterStore: Send + Sync + 'static {
    /// Adds `hits` to the counter `key` under `limit` if they fit (TokenBucket,
    /// SlidingWindow) or always (FixedWindow), and says whether they were admitted.
    fn hit(
        &self,
        key: &str,
        limit: &Limit,
        hits: u32,
    ) -> impl Future<Output = Result<Verdict, StoreError>> + Send;

    /// Reserves a quota batch on the counter `key`: up to `want` hits per `horizon`, scaled
    /// to the batch's life, each admitted exactly as a single hit would be
    /// ([`crate::algorithm::reserve`]).
    fn reserve(
        &self,
        key: &str,
        limit: &Limit,
        want: u32,
        horizon: std::time::Duration,
    ) -> impl Future<Output = Result<Reservation, StoreError>> + Send;

    /// Gives `hits` of the batch counted in `mark` back, where that is safe
    /// ([`crate::algorithm::give_back`]); answers how many were given back.
    fn give_back(
        &self,
        key: &str,
        limit: &Limit,
        mark: i64,
        hits: u32,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;

    /// Whether the store can currently answer; what `/readyz` reports.
    fn is_up(&self) -> bool;

    /// The backend's name, for logs and metrics.
    fn backend(&self) -> &'static str;
}
