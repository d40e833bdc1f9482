//! Shadow-mode counts on a real Redis: adds land in the minute Redis is in, the reader
//! reads the minute before, and the hash keeps no more than those two minutes.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use breakwater_harness::{RedisServer, unique_prefix};
use breakwater_store::shadow::{RedisShadow, TTL, minute_start_us, shadow_key};
use breakwater_store::{RedisConnection, RedisSettings, RedisTopology};
use redis::aio::MultiplexedConnection;

/// Per-call deadline: no debug build on a busy machine misses it.
const DEADLINE: Duration = Duration::from_secs(5);
const RULE: &str = "shop/api-per-user:0";

async fn query<T: redis::FromRedisValue>(raw: &mut MultiplexedConnection, cmd: &redis::Cmd) -> T {
    cmd.query_async(raw).await.unwrap()
}

/// The minute Redis is in (seconds since the epoch / 60).
async fn minute(raw: &mut MultiplexedConnection) -> i64 {
    let (secs, _): (i64, i64) = query(raw, &redis::cmd("TIME")).await;
    secs / 60
}

/// Adds land in the current minute; the reader reads the minute before; minutes older than
/// that are dropped by the next add; the key lives three minutes past the last add.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_counts_by_minute() {
    let server = RedisServer::start();
    let connection =
        RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(server.url()))).await.unwrap();
    let prefix = unique_prefix("shadow");
    let shadow = RedisShadow::new(connection, prefix.clone(), DEADLINE);
    let mut raw =
        redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let key = shadow_key(&prefix, RULE);
    assert_eq!(shadow.key(RULE), key);

    // The minute may turn between the reads: then the whole check runs again, in the new
    // minute (which lasts long enough for it).
    loop {
        let (_, none) = shadow.last_minute("never-added").await.unwrap();
        assert_eq!(none, 0);
        let first = minute(&mut raw).await;
        let older = [(first - 1, 11), (first - 5, 9)];
        let _: i64 = query(&mut raw, redis::cmd("HSET").arg(&key).arg(&older[..])).await;
        shadow.add(RULE, 3).await.unwrap();
        shadow.add(RULE, 4).await.unwrap();
        let last = shadow.last_minute(RULE).await.unwrap();
        let mut fields: Vec<(i64, u64)> = query(&mut raw, redis::cmd("HGETALL").arg(&key)).await;
        if minute(&mut raw).await != first {
            let _: i64 = query(&mut raw, redis::cmd("DEL").arg(&key)).await;
            continue;
        }
        assert_eq!(last, (minute_start_us(first - 1), 11));
        fields.sort();
        assert_eq!(fields, [(first - 1, 11), (first, 7)], "minutes before the previous one are dropped");
        break;
    }
    let ttl: i64 = query(&mut raw, redis::cmd("PTTL").arg(&key)).await;
    let ttl_ms = i64::try_from(TTL.as_millis()).unwrap();
    assert!(ttl > ttl_ms - 10_000 && ttl <= ttl_ms, "expires in {ttl} ms");
}
