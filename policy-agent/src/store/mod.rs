//! Where counters live. One small trait, [`CounterStore`], with two backends: Redis
//! (standalone or Cluster, on a [`RedisConnection`]; what every production agent uses, so
//! that a limit holds across pods) and in-memory (standalone mode and tests). Each backend
//! applies one hit to one counter atomically and says, when it fails, whether the failure is
//! transient ([`StoreError::kind`]) — the limiter answers by the rule's failure mode either
//! way, but only transient failures mean "Redis is away" for readiness and metrics.

use std::future::Future;

pub use breakwater_store::{Error as StoreError, ErrorKind, RedisConnection, RedisSettings, RedisTopology};

use crate::algorithm::{Limit, Verdict};

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

    /// Whether the store can currently answer; what `/readyz` reports.
    fn is_up(&self) -> bool;

    /// The backend's name, for logs and metrics.
    fn backend(&self) -> &'static str;
}
