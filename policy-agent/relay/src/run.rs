//! Everything together: [`run`] takes the settings (what `main` parses from flags, or what a
//! test builds), a bound HTTP listener and a shutdown future.

use std::{sync::Arc, time::Duration};

use breakwater_api::OutboxRelaySpec;
use breakwater_store::{RedisConnection, RedisSettings, RedisTopology, lease::RedisLeases};
use tokio::sync::watch;

use crate::{
    error::{Error, Result},
    fence, http,
    metrics::Metrics,
    relay::{self, Relay},
    report::Reporter,
    sink::{
        Sink,
        nats::NatsJetStream,
        redis::RedisStreams,
        webhook::{self, Webhook},
    },
};

#[derive(Clone)]
pub struct Settings {
    pub relay: Relay,
    pub spec: OutboxRelaySpec,
    pub postgres_url: String,
    /// The agents' Redis: the relay lease, the facts for the status, the Redis Streams sink.
    pub redis_url: String,
    pub key_prefix: String,
    /// This replica (the pod name); the lease holder is it plus a random suffix.
    pub holder: String,
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for Settings {
    /// The URLs may hold passwords: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("relay", &self.relay)
            .field("holder", &self.holder)
            .field("lease_ttl", &self.lease_ttl)
            .finish_non_exhaustive()
    }
}

impl Settings {
    /// The relay of `spec` (as the operator passes it) for OutboxRelay `name`.
    pub fn relay_of(name: &str, spec: &OutboxRelaySpec) -> Relay {
        Relay {
            name: name.to_string(),
            table: spec.source.postgres.table.clone(),
            delivery: spec.delivery.clone(),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// The sink the spec names, connected (Redis, NATS) or checked (a webhook's URL), so that a
/// sink that cannot work stops the relay at start.
pub async fn sink(spec: &OutboxRelaySpec, redis_url: &str) -> Result<Sink> {
    match (&spec.sink.redis_stream, &spec.sink.nats, &spec.sink.webhook) {
        (Some(redis), _, _) => {
            Ok(Sink::Redis(RedisStreams::connect(redis_url, redis.stream.clone(), redis.max_len).await?))
        }
        (_, Some(nats), _) => {
            Ok(Sink::Nats(Box::new(NatsJetStream::connect(&nats.url, nats.subject.clone()).await?)))
        }
        (_, _, Some(webhook)) => {
            let timeout = match &webhook.timeout {
                Some(timeout) => timeout
                    .to_std()
                    .map_err(|error| Error::Spec(format!("webhook timeout {timeout}: {error}")))?,
                None => webhook::DEFAULT_TIMEOUT,
            };
            Ok(Sink::Webhook(Webhook::new(&webhook.url, timeout)?))
        }
        (None, None, None) => Err(Error::Spec("no sink: set redisStream, nats or webhook".to_string())),
    }
}

/// Relays until `shutdown` completes: contends for the lease, relays while holding it,
/// serves `/healthz`, `/readyz` and `/metrics` on `listener`; then finishes the batch in
/// flight and releases the lease.
pub async fn run(
    settings: Settings,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Settings { mut relay, spec, postgres_url, redis_url, key_prefix, holder, lease_ttl } = settings;
    relay.lease_ttl = lease_ttl;
    let sink = Arc::new(sink(&spec, &redis_url).await?);
    let redis = RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(redis_url))).await?;
    let leases = RedisLeases::new(redis.clone(), key_prefix.clone(), Duration::from_secs(1));
    let metrics = Arc::new(Metrics::default());
    let (stop_tx, stop) = watch::channel(false);
    let (token_tx, token) = watch::channel(None);
    tracing::info!(relay = relay.name, table = relay.table, sink = sink.describe(), "relay starting");
    let lease_holder = format!("{holder}/{:016x}", fastrand::u64(..));
    let lease = fence::lease_id(&relay.name);
    let lease = tokio::spawn(fence::hold(leases, lease, lease_holder, lease_ttl, token_tx, stop.clone()));
    let http = tokio::spawn(http::serve(listener, metrics.clone(), token.clone(), stop.clone()));
    let reporter = Reporter::new(redis, key_prefix, relay.name.clone(), holder);
    let relaying = tokio::spawn(relay::run(postgres_url, relay, sink, token, metrics, reporter, stop));
    shutdown.await;
    tracing::info!("stopping: the batch in flight finishes, then the lease is released");
    let _ = stop_tx.send(true);
    let _ = relaying.await;
    let _ = lease.await;
    let _ = http.await;
    Ok(())
}
