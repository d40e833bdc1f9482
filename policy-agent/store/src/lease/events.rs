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

use std::time::Duration;

use futures::{Stream, StreamExt};

use crate::connection::open;
use crate::{Error, RedisTopology};

/// How long subscribing may take (connect and `SUBSCRIBE`).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel leases under `prefix` are published on.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:lease-events")
}

/// Where to subscribe: the server, or the first Cluster seed (a Cluster delivers a
/// `PUBLISH` to the subscribers of every node).
pub fn events_url(topology: &RedisTopology) -> Result<&str, Error> {
    match topology {
        RedisTopology::Standalone(url) => Ok(url),
        RedisTopology::Cluster(seeds) => seeds.first().map(String::as_str).ok_or(Error::NoSeeds),
    }
}

/// Subscribes to the lease events under `prefix` on the Redis of `topology`: a stream of
/// lease ids as published, which ends when the connection does.
pub async fn subscribe(
    topology: &RedisTopology,
    prefix: &str,
) -> Result<impl Stream<Item = String> + Send + 'static, Error> {
    let client = open(events_url(topology)?)?;
    let channel = channel(prefix);
    let subscribed = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribed)
        .await
        .map_err(|_| Error::Timeout { call: "SUBSCRIBE", deadline: SUBSCRIBE_TIMEOUT })??;
    Ok(pubsub.into_on_message().filter_map(|message| async move {
        match message.get_payload::<String>() {
            Ok(id) => Some(id),
            Err(error) => {
                tracing::warn!(%error, "ignoring a lease event that is not a UTF-8 lease id");
                None
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribes_on_the_server_or_the_first_seed() {
        let standalone = RedisTopology::Standalone("redis://a:1".into());
        assert_eq!(events_url(&standalone).unwrap(), "redis://a:1");
        let cluster = RedisTopology::Cluster(vec!["redis://b:1".into(), "redis://c:1".into()]);
        assert_eq!(events_url(&cluster).unwrap(), "redis://b:1");
        assert!(matches!(events_url(&RedisTopology::Cluster(vec![])), Err(Error::NoSeeds)));
    }
}
