//! The operator's view of the leases in Redis. It reads a lease through the store code the
//! agents grant it with (`breakwater_store::lease`, the one reader and writer of lease keys,
//! so the two can never disagree on the layout; the operator links that crate, not the
//! agent), and follows the events agents publish on every grant and release to know which
//! LockLease to reconcile.

use std::{fmt::Debug, future::Future, sync::Arc, time::Duration};

pub use breakwater_store::Error as StoreError;
use breakwater_store::{
    RedisConnection, RedisSettings, RedisTopology,
    lease::{LeaseState, LeaseStore, RedisLeases, events},
};
use futures::{Stream, StreamExt, future::BoxFuture};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

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

/// What the agents' events ask the controller to reconcile.
#[derive(Debug)]
pub struct Triggers {
    /// Lease ids (`<namespace>/<name>`) that were granted, renewed away or released.
    pub leases: ReceiverStream<String>,
    /// One item after every (re)subscription: events published while unsubscribed are
    /// lost, so everything must be read again.
    pub resubscribed: ReceiverStream<()>,
}

/// Backoff between subscription attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(10) }
    }
}

/// Follows the lease events of the agents using `options` until `stop` is cancelled.
pub fn follow_redis(options: &RedisOptions, backoff: Backoff, stop: CancellationToken) -> Triggers {
    let (topology, prefix) = (options.topology.clone(), options.key_prefix.clone());
    let subscribe = move || {
        let (topology, prefix) = (topology.clone(), prefix.clone());
        // Boxed here: the stream is 'static, but its opaque type names the borrowed values.
        async move { events::subscribe(&topology, &prefix).await.map(StreamExt::boxed) }
    };
    follow(subscribe, backoff, stop)
}

/// Subscribes with `subscribe`, forwards every lease id, and when the subscription ends or
/// cannot be made, subscribes again after a backoff that doubles while attempts fail. Runs
/// until `stop` is cancelled or nobody listens any more.
pub fn follow<F, Fut, S>(mut subscribe: F, backoff: Backoff, stop: CancellationToken) -> Triggers
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, StoreError>> + Send,
    S: Stream<Item = String> + Send,
{
    let (lease_tx, lease_rx) = mpsc::channel(256);
    let (all_tx, all_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut delay = backoff.initial;
        loop {
            let attempt = tokio::select! {
                () = stop.cancelled() => return,
                attempt = subscribe() => attempt,
            };
            match attempt {
                Ok(events) => {
                    delay = backoff.initial;
                    tracing::info!("following lease events");
                    // A full channel already holds a resync that has not run: one is enough.
                    let _ = all_tx.try_send(());
                    tokio::pin!(events);
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            event = events.next() => match event {
                                Some(id) => if lease_tx.send(id).await.is_err() { return },
                                None => break,
                            },
                        }
                    }
                    tracing::warn!(retry_in = ?delay, "lease events ended; subscribing again");
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?delay, "cannot subscribe to lease events");
                }
            }
            if lease_tx.is_closed() && all_tx.is_closed() {
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = delay.saturating_mul(2).min(backoff.max);
        }
    });
    Triggers { leases: ReceiverStream::new(lease_rx), resubscribed: ReceiverStream::new(all_rx) }
}

/// The `<namespace>/<name>` a lease id names, or None for an id that names no LockLease.
pub fn parse_id(id: &str) -> Option<(&str, &str)> {
    let (namespace, name) = id.split_once('/')?;
    (!namespace.is_empty() && !name.is_empty() && !name.contains('/')).then_some((namespace, name))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    /// A scripted subscription: each attempt takes the next outcome (ids then the end, or
    /// an error); after the script, subscriptions stay open without events.
    fn scripted(
        script: Vec<Result<Vec<&'static str>, ()>>,
        attempts: Arc<Mutex<Vec<Instant>>>,
    ) -> impl FnMut() -> BoxFuture<'static, Result<futures::stream::BoxStream<'static, String>, StoreError>>
    + Send
    + 'static {
        let mut script = script.into_iter();
        move || {
            attempts.lock().expect("lock").push(Instant::now());
            let next = script.next();
            Box::pin(async move {
                match next {
                    Some(Ok(ids)) => Ok(futures::stream::iter(ids.into_iter().map(String::from)).boxed()),
                    Some(Err(())) => Err(StoreError::NotConnected),
                    None => Ok(futures::stream::pending().boxed()),
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_are_forwarded_and_every_resubscription_asks_for_a_resync() {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let script = vec![Err(()), Ok(vec!["a/x", "b/y"]), Err(()), Err(()), Ok(vec!["c/z"])];
        let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(250) };
        let stop = CancellationToken::new();
        let start = Instant::now();
        let mut triggers = follow(scripted(script, attempts.clone()), backoff, stop.clone());

        let ids: Vec<String> = triggers.leases.by_ref().take(3).collect().await;
        assert_eq!(ids, ["a/x", "b/y", "c/z"]);
        // The resyncs of the 2nd and 5th attempts coalesce (one not yet consumed is enough);
        // the 6th attempt, which stays subscribed, asks again.
        assert_eq!(triggers.resubscribed.next().await, Some(()));
        assert_eq!(triggers.resubscribed.next().await, Some(()));
        let offsets: Vec<u128> =
            attempts.lock().expect("lock").iter().map(|at| (*at - start).as_millis()).collect();
        // Failures back off 100ms, doubling up to 250ms; an ended subscription is retried
        // after the initial delay, since it had been healthy.
        assert_eq!(offsets, [0, 100, 200, 400, 650, 750]);
        let pending = tokio::time::timeout(Duration::from_secs(60), triggers.resubscribed.next()).await;
        assert!(pending.is_err(), "no resync while the subscription holds");

        stop.cancel();
        assert_eq!(triggers.leases.next().await, None, "the task ends when stopped");
    }
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
