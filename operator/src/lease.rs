//! The operator's view of the leases in Redis. It reads a lease through the store code the
//! agents grant it with (`breakwater_store::lease`, the one reader and writer of lease keys,
//! so the two can never disagree on the layout; the operator links that crate, not the
//! agent), and follows the events agents publish on every grant and release to know which
//! LockLease to reconcile.

use std::{fmt::Debug, sync::Arc, time::Duration};

pub use breakwater_store::Error as StoreError;
use breakwater_store::{
    RedisConnection, RedisSettings, RedisTopology,
    lease::{LeaseState, LeaseStore, RedisLeases, events},
};
use futures::{StreamExt, future::BoxFuture};
use tokio_util::sync::CancellationToken;

pub use crate::follow::Backoff;
use crate::follow::{Followed, follow};

/// The key prefix agents use unless told otherwise; the operator must use the same one.
pub const DEFAULT_KEY_PREFIX: &str = "bw";

/// How long one read of a lease may take before the status says the store is unavailable.
const READ_DEADLINE: Duration = Duration::from_secs(2);

/// Reads a lease's current grants. Object-safe, so the controller holds any store (Redis in
/// a cluster, memory in tests) behind one type.
pub trait LeaseReader: Send + Sync + Debug {
    /// The grants of the lease with id `<namespace>/<name>`.
    fn state<'a>(&'a self, lease: &'a str) -> BoxFuture<'a, Result<LeaseState, StoreError>>;
}

impl<S: LeaseStore + Debug> LeaseReader for S {
    fn state<'a>(&'a self, lease: &'a str) -> BoxFuture<'a, Result<LeaseState, StoreError>> {
        Box::pin(LeaseStore::state(self, lease))
    }
}

/// Where the leases are: the Redis (standalone or Cluster) the agents use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisOptions {
    /// Its `Debug` redacts passwords.
    pub topology: RedisTopology,
    /// Must equal the agents' `--key-prefix`.
    pub key_prefix: String,
}

/// A reader of the leases in Redis. Succeeds while Redis is down (reads then fail, and the
/// status says so, until it is back); fails only on a URL that can never work.
pub async fn connect(options: &RedisOptions) -> Result<Arc<dyn LeaseReader>, StoreError> {
    Ok(open(options).await?)
}

/// The agents' Redis as the operator reads it: one connection, the agents' key prefix and a
/// deadline per read. It reads leases ([`LeaseReader`]) and the outbox relays' facts
/// (`crate::relay::RelayReader`), which the relays keep in the same Redis.
pub async fn open(options: &RedisOptions) -> Result<Arc<RedisLeases>, StoreError> {
    let connection = RedisConnection::start(RedisSettings::new(options.topology.clone())).await?;
    Ok(Arc::new(RedisLeases::new(connection, options.key_prefix.clone(), READ_DEADLINE)))
}

/// What the agents' lease events ask the controller to reconcile: lease ids
/// (`<namespace>/<name>`) that were granted, renewed away or released, and a resync after
/// every (re)subscription.
pub type Triggers = Followed<String>;

/// Follows the lease events of the agents using `options` until `stop` is cancelled.
pub fn follow_redis(options: &RedisOptions, backoff: Backoff, stop: CancellationToken) -> Triggers {
    let (topology, prefix) = (options.topology.clone(), options.key_prefix.clone());
    let subscribe = move || {
        let (topology, prefix) = (topology.clone(), prefix.clone());
        // Boxed here: the stream is 'static, but its opaque type names the borrowed values.
        async move { events::subscribe(&topology, &prefix).await.map(StreamExt::boxed) }
    };
    follow("lease events", subscribe, backoff, stop)
}

/// The `<namespace>/<name>` a lease id names, or None for an id that names no LockLease.
pub fn parse_id(id: &str) -> Option<(&str, &str)> {
    let (namespace, name) = id.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then_some((namespace, name))
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn lease_ids_name_a_namespace_and_a_name() {
        assert_eq!(parse_id("billing/invoice-run"), Some(("billing", "invoice-run")));
        assert_eq!(parse_id("billing"), None);
        assert_eq!(parse_id("/x"), None);
        assert_eq!(parse_id("a/b/c"), None);
    }
}
