//! Subscribing to a channel the scripts publish on (lease events, breaker events): one
//! connection of its own per subscription, each message read by the caller's parser.
//!
//! Pub/sub delivery is at most once and ends with the connection: the stream [`subscribe`]
//! returns ends when the connection drops, and the subscriber resubscribes and then re-reads
//! what it follows (a missed message is never made up for by Redis).

use std::time::Duration;

use futures::{Stream, StreamExt, future};

use crate::connection::open;
use crate::{Error, RedisTopology};

/// How long subscribing may take (connect and `SUBSCRIBE`).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where to subscribe: the server, or the first Cluster seed (a Cluster delivers a
/// `PUBLISH` to the subscribers of every node).
pub fn events_url(topology: &RedisTopology) -> Result<&str, Error> {
    match topology {
        RedisTopology::Standalone(url) => Ok(url),
        RedisTopology::Cluster(seeds) => seeds.first().map(String::as_str).ok_or(Error::NoSeeds),
    }
}

/// Subscribes to `channel` on the Redis of `topology`: a stream of the messages `parse`
/// reads, which ends when the connection does. A message that is not UTF-8, or that `parse`
/// refuses (`None`), is logged and skipped: a publisher newer than this reader must not
/// end its subscription.
pub async fn subscribe<T, F>(
    topology: &RedisTopology,
    channel: &str,
    parse: F,
) -> Result<impl Stream<Item = T> + Send + 'static + use<T, F>, Error>
where
    T: Send + 'static,
    F: Fn(&str) -> Option<T> + Send + 'static,
{
    let client = open(events_url(topology)?)?;
    let subscribed = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(channel).await?;
        Ok::<_, redis::RedisError>(pubsub)
    };
    let pubsub = tokio::time::timeout(SUBSCRIBE_TIMEOUT, subscribed)
        .await
        .map_err(|_| Error::Timeout { call: "SUBSCRIBE", deadline: SUBSCRIBE_TIMEOUT })??;
    Ok(pubsub.into_on_message().filter_map(move |message| {
        let parsed = match message.get_payload::<String>() {
            Ok(payload) => {
                let parsed = parse(&payload);
                if parsed.is_none() {
                    tracing::warn!(channel = message.get_channel_name(), %payload, "ignoring an unreadable event");
                }
                parsed
            }
            Err(error) => {
                tracing::warn!(channel = message.get_channel_name(), %error, "ignoring an event that is not UTF-8");
                None
            }
        };
        future::ready(parsed)
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
