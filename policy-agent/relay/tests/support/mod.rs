//! What the relay's tests against real servers share: a fresh database with the outbox
//! table, rows, a spec, and a relay run in the test's process.

use std::time::Duration;

use breakwater_api::OutboxRelaySpec;
use breakwater_harness::{PostgresServer, RedisServer, eventually, unique_prefix};
use breakwater_relay::run::{self, Settings};
use breakwater_store::relay::RelayFacts;
use serde_json::json;

pub const DEADLINE: Duration = Duration::from_secs(30);

const OUTBOX: &str = "CREATE TABLE outbox (
    id uuid PRIMARY KEY,
    aggregatetype text NOT NULL,
    aggregateid text NOT NULL,
    type text NOT NULL,
    payload jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz)";

/// A fresh database with the outbox table; its URL.
pub fn database(postgres: &PostgresServer) -> (String, String) {
    let name = unique_prefix("relay").replace('-', "_");
    let url = postgres.create_database(&name);
    postgres.psql_in(&name, OUTBOX);
    (name, url)
}

/// Inserts `count` rows spread over `aggregates` aggregates, in one statement; row `i` is
/// aggregate `i % aggregates`, type `T<i>`.
pub fn insert(postgres: &PostgresServer, db: &str, from: usize, count: usize, aggregates: usize) {
    postgres.psql_in(
        db,
        &format!(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), 'order', (i % {aggregates})::text, 'T' || i, jsonb_build_object('n', i) \
             FROM generate_series({from}, {}) AS i ORDER BY i",
            from + count - 1
        ),
    );
}

/// Aggregate `order/a`: Created, Poison, Shipped; `order/b`: Created, Shipped. The tests make
/// the broker refuse type Poison.
pub fn insert_poison(postgres: &PostgresServer, db: &str) {
    postgres.psql_in(
        db,
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES \
         (gen_random_uuid(), 'order', 'a', 'Created', '{}'), \
         (gen_random_uuid(), 'order', 'a', 'Poison', '{}'), \
         (gen_random_uuid(), 'order', 'a', 'Shipped', '{}'), \
         (gen_random_uuid(), 'order', 'b', 'Created', '{}'), \
         (gen_random_uuid(), 'order', 'b', 'Shipped', '{}')",
    );
}

/// A spec relaying the table `outbox` to `sink` (the spec's `sink` object), with `extra`
/// merged into `delivery`.
pub fn spec(sink: serde_json::Value, extra: serde_json::Value) -> OutboxRelaySpec {
    let mut spec = json!({
        "source": {"postgres": {"connectionSecretRef": {"name": "db", "key": "url"}, "table": "outbox"}},
        "sink": sink,
        "delivery": {"batchSize": 50, "pollInterval": "20ms"},
    });
    if let (Some(delivery), Some(extra)) = (spec["delivery"].as_object_mut(), extra.as_object()) {
        delivery.extend(extra.clone());
    }
    serde_json::from_value(spec).expect("a valid spec")
}

/// Runs a relay in this process until the returned sender is dropped or sent to.
pub async fn relay(
    name: &str,
    spec: OutboxRelaySpec,
    postgres_url: &str,
    redis: &RedisServer,
) -> tokio::sync::oneshot::Sender<()> {
    relay_with_prefix(name, spec, postgres_url, redis, &unique_prefix("bw")).await
}

/// [`relay`] with the key prefix of its lease and facts in the agents' Redis.
pub async fn relay_with_prefix(
    name: &str,
    spec: OutboxRelaySpec,
    postgres_url: &str,
    redis: &RedisServer,
    key_prefix: &str,
) -> tokio::sync::oneshot::Sender<()> {
    let settings = Settings {
        relay: Settings::relay_of(name, &spec),
        spec,
        postgres_url: postgres_url.to_string(),
        redis_url: redis.url(),
        key_prefix: key_prefix.to_string(),
        holder: "relay-0".to_string(),
        lease_ttl: Duration::from_secs(2),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(run::run(settings, listener, async move {
        let _ = stopped.await;
    }));
    stop
}

pub fn count(postgres: &PostgresServer, db: &str, sql: &str) -> usize {
    postgres.psql_in(db, sql).trim().parse().unwrap_or(usize::MAX)
}

/// Waits until relay `relay` (keys under `prefix`) has reported facts that `wanted` accepts,
/// and returns them; fails with the last facts read.
pub async fn facts(
    redis: &RedisServer,
    prefix: &str,
    relay: &str,
    wanted: impl Fn(&RelayFacts) -> bool,
) -> RelayFacts {
    let connection = breakwater_store::RedisConnection::start(breakwater_store::RedisSettings::new(
        breakwater_store::RedisTopology::Standalone(redis.url()),
    ))
    .await
    .expect("redis");
    eventually(&format!("relay {relay} reports the expected facts"), DEADLINE, || async {
        match breakwater_store::relay::read(&connection, prefix, relay).await {
            Ok(Some(facts)) if wanted(&facts) => Ok(facts),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}
