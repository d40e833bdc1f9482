//! Where counters live. One small trait, [`CounterStore`], with two backends: Redis
//! (standalone or Cluster; what every production agent uses, so that a limit holds across
//! pods) and in-memory (standalone mode and tests). Each backend applies one hit to one
//! counter atomically and says, when it fails, whether the failure is transient — the
//! limiter answers by the rule's failure mode either way, but only transient failures mean
//! "Redis is away" for readiness and metrics.

use std::future::Future;

use crate::algorithm::{Limit, Verdict};

pub mod memory;
pub mod redis;

pub use memory::MemoryStore;
pub use redis::{RedisSettings, RedisStore, RedisTopology};

/// A store failure, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} store error: {message}")]
pub struct StoreError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The store may answer if asked again: not connected, connection dropped, timed out,
    /// cluster resharding, loading.
    Transient,
    /// Asking again will not help: a script error, a wrong type, bad credentials.
    Permanent,
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl ErrorKind {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Transient => "transient",
            ErrorKind::Permanent => "permanent",
        }
    }
}

impl StoreError {
    pub fn transient(message: impl Into<String>) -> Self {
        StoreError { kind: ErrorKind::Transient, message: message.into() }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        StoreError { kind: ErrorKind::Permanent, message: message.into() }
    }

    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

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

/// The backend chosen at start-up.
#[derive(Debug, Clone)]
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl CounterStore for AnyStore {
    async fn hit(&self, key: &str, limit: &Limit, hits: u32) -> Result<Verdict, StoreError> {
        match self {
            AnyStore::Memory(store) => store.hit(key, limit, hits).await,
            AnyStore::Redis(store) => store.hit(key, limit, hits).await,
        }
    }

    fn is_up(&self) -> bool {
        match self {
            AnyStore::Memory(store) => store.is_up(),
            AnyStore::Redis(store) => store.is_up(),
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            AnyStore::Memory(store) => store.backend(),
            AnyStore::Redis(store) => store.backend(),
        }
    }
}
