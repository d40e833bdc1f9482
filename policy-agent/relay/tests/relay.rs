//! The relay against real PostgreSQL and real Redis (started by breakwater-harness): rows
//! reach the stream in order per aggregate and leave the table; MarkPublished keeps them;
//! a row the broker refuses holds back its aggregate alone, is parked after maxAttempts with
//! its error and attempt count, the aggregate moves on, and a replay moves it back.

use std::{collections::BTreeMap, time::Duration};

use breakwater_api::OutboxRelaySpec;
use breakwater_harness::{PostgresServer, RedisServer, eventually, unique_prefix};
use breakwater_relay::run::{self, Settings};
use serde_json::json;
use support::{DEADLINE, count, database, facts, insert, insert_poison, relay};

mod support;

/// A spec relaying to the Redis stream `stream`.
fn spec(stream: &str, extra: serde_json::Value) -> OutboxRelaySpec {
    support::spec(json!({"redisStream": {"stream": stream}}), extra)
}

/// The entries of `stream`: (id, aggregateid, type) in stream order.
fn entries(redis: &RedisServer, stream: &str) -> Vec<(String, String, String)> {
    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut connection = client.get_connection().expect("redis connection");
    let entries: Vec<(String, BTreeMap<String, String>)> =
        redis::cmd("XRANGE").arg(stream).arg("-").arg("+").query(&mut connection).expect("XRANGE");
    entries
        .into_iter()
        .map(|(_, mut fields)| {
            let mut take = |name: &str| fields.remove(name).unwrap_or_default();
            (take("id"), take("aggregateid"), take("type"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_reach_the_stream_in_order_per_aggregate_and_leave_the_table() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    let (db, url) = database(postgres);
    insert(postgres, &db, 0, 300, 7);
    let _relay = relay("shop/orders", spec("events", json!({})), &url, &redis).await;
    eventually("the outbox drains", DEADLINE, || async {
        let left = count(postgres, &db, "SELECT count(*) FROM outbox");
        (left == 0).then_some(()).ok_or_else(|| format!("{left} rows left"))
    })
    .await;
    let seen = entries(&redis, "events");
    assert_eq!(seen.len(), 300, "each row once (no failure, no duplicate)");
    for aggregate in 0..7 {
        let order: Vec<usize> = seen
            .iter()
            .filter(|(_, a, _)| *a == aggregate.to_string())
            .map(|(_, _, kind)| kind.trim_start_matches('T').parse().expect("T<n>"))
            .collect();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, sorted, "aggregate {aggregate} out of order");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mark_published_keeps_the_rows_with_their_time() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    let (db, url) = database(postgres);
    insert(postgres, &db, 0, 40, 3);
    let _relay =
        relay("shop/kept", spec("kept", json!({"afterPublish": "MarkPublished"})), &url, &redis).await;
    eventually("every row is marked", DEADLINE, || async {
        let left = count(postgres, &db, "SELECT count(*) FROM outbox WHERE published_at IS NULL");
        (left == 0).then_some(()).ok_or_else(|| format!("{left} unmarked"))
    })
    .await;
    assert_eq!(count(postgres, &db, "SELECT count(*) FROM outbox"), 40, "rows are kept");
    assert_eq!(entries(&redis, "kept").len(), 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_row_holds_back_its_aggregate_then_is_parked_and_replayed() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    let (db, url) = database(postgres);
    // Streams are named by type; a string under the name of type Poison makes Redis refuse
    // those rows (WRONGTYPE) and no others.
    redis.cli(&["SET", "events.Poison", "not a stream"]);
    insert_poison(postgres, &db);
    let delivery = json!({"maxAttempts": 3, "deadLetterTable": "outbox_dlq", "pollInterval": "50ms"});
    let stop = relay("shop/poison", spec("events.{type}", delivery.clone()), &url, &redis).await;
    eventually("the relay creates the dead-letter table", DEADLINE, || async {
        let exists = postgres.psql_in(&db, "SELECT to_regclass('outbox_dlq') IS NOT NULL");
        (exists.trim() == "t").then_some(()).ok_or(exists)
    })
    .await;
    eventually("the poison row is parked and its aggregate moves on", DEADLINE, || async {
        let parked = count(postgres, &db, "SELECT count(*) FROM outbox_dlq");
        let left = count(postgres, &db, "SELECT count(*) FROM outbox");
        (parked == 1 && left == 0).then_some(()).ok_or_else(|| format!("parked {parked}, left {left}"))
    })
    .await;
    let parked = postgres.psql_in(&db, "SELECT type || ' ' || attempts || ' ' || last_error FROM outbox_dlq");
    assert!(parked.starts_with("Poison 3 ") && parked.contains("WRONGTYPE"), "{parked}");
    // Aggregate a: Created, then (Poison parked) Shipped; b was never held back.
    assert_eq!(entries(&redis, "events.Created").len(), 2);
    assert_eq!(entries(&redis, "events.Shipped").len(), 2);
    drop(stop);

    // Replay: the broker is fixed, the row goes back to the end of its aggregate and out.
    redis.cli(&["DEL", "events.Poison"]);
    let settings_spec = spec("events.{type}", delivery);
    let relay_of = Settings::relay_of("shop/poison", &settings_spec);
    let moved = breakwater_relay::relay::replay(&url, &relay_of).await.expect("replay");
    assert_eq!(moved, 1);
    let _relay = relay("shop/poison", settings_spec, &url, &redis).await;
    eventually("the replayed row is published", DEADLINE, || async {
        let published = entries(&redis, "events.Poison").len();
        (published == 1).then_some(()).ok_or_else(|| format!("{published} published"))
    })
    .await;
    assert_eq!(count(postgres, &db, "SELECT count(*) FROM outbox_dlq"), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_table_without_the_layout_is_named_in_the_facts() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    let name = unique_prefix("relay").replace('-', "_");
    let url = postgres.create_database(&name);
    postgres.psql_in(&name, "CREATE TABLE outbox (id uuid PRIMARY KEY, payload jsonb)");
    let prefix = unique_prefix("bw");
    let spec = spec("events", json!({}));
    let settings = Settings {
        relay: Settings::relay_of("shop/broken", &spec),
        spec,
        postgres_url: url,
        redis_url: redis.url(),
        key_prefix: prefix.clone(),
        holder: "relay-0".to_string(),
        lease_ttl: Duration::from_secs(2),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    tokio::spawn(run::run(settings, listener, std::future::pending()));
    let facts = facts(&redis, &prefix, "shop/broken", |_| true).await;
    assert_eq!(facts.reason, "TableInvalid");
    assert!(
        facts.message.contains("missing column(s) aggregatetype, aggregateid, type"),
        "{}",
        facts.message
    );
}
