//! Lease events: the lease scripts publish a lease's id on `<prefix>:lease-events` whenever
//! they grant, release or drop an expired grant (from inside the script, so a subscriber
//! never hears of a change before it is visible). A message carries only the id: readers
//! fetch the state itself ([`super::LeaseStore::state`]), so a missed or duplicated message
//! costs a read, never a wrong status.
//!
//! Expiry is not reliably announced: a grant that expires is dropped (and published) only by
//! the next script that touches the lease, and a lease's last grant expires together with
//! its keys without any script running. A reader that shows grants re-reads the lease at
//! its earliest `expiresAt` (it knows it from the state it read).
//!
//! Pub/sub delivery is at most once and ends with the connection: the stream [`subscribe`]
//! returns ends when the connection drops, and the subscriber resubscribes and then re-reads
//! every lease (what the operator does, besides its periodic reconciliation).

use futures::Stream;

pub use crate::pubsub::events_url;
use crate::{Error, RedisTopology};

/// The channel leases under `prefix` are published on.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:lease-events")
}

/// Subscribes to the lease events under `prefix` on the Redis of `topology`: a stream of
/// lease ids as published, which ends when the connection does.
pub async fn subscribe(
    topology: &RedisTopology,
    prefix: &str,
) -> Result<impl Stream<Item = String> + Send + 'static, Error> {
    crate::pubsub::subscribe(topology, &channel(prefix), |id| Some(id.to_string())).await
}
