//! Redis going away and coming back, with a real `redis-server` per test: every answer
//! still comes within the deadline, by each rule's failure mode, and decisions resume
//! without restarting the agent.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_agent::limiter::{Limiter, LimiterSettings, NotReady};
use breakwater_agent::store::redis::script_sha;
use breakwater_agent::store::{RedisConnection, RedisSettings, RedisTopology};
use breakwater_api::rate_limit::{Algorithm, FailureMode};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::*;

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;
const DEADLINE: Duration = Duration::from_millis(20);
/// Time a debug build on a loaded two-core machine may add around the store call.
const SLACK: Duration = Duration::from_millis(60);

fn settings(server: &RedisServer) -> RedisSettings {
    let mut s = RedisSettings::new(RedisTopology::Standalone(server.url()));
    s.probe_interval = Duration::from_millis(100);
    s.connect_timeout = Duration::from_millis(200);
    s
}

async fn agent(store: RedisConnection) -> Arc<Limiter<RedisConnection>> {
    let mut closed = rule("shop/api/closed", Algorithm::TokenBucket, 1000, Duration::from_secs(3600));
    closed.failure_mode = FailureMode::Closed;
    let open = rule("shop/api/open", Algorithm::FixedWindow, 1000, Duration::from_secs(3600));
    limiter(
        store,
        vec![open, closed],
        LimiterSettings {
            deadline: DEADLINE,
            key_prefix: unique_prefix("failure"),
            cache_capacity: 1024,
            batch: breakwater_agent::batch::BatchSettings::off(),
        },
    )
}

/// One decision per rule; returns (open code, closed code, whether both came from Redis,
/// the slowest answer).
async fn probe(limiter: &Limiter<RedisConnection>) -> (i32, i32, bool, Duration) {
    let mut codes = Vec::new();
    let mut decided = true;
    let mut slowest = Duration::ZERO;
    for rule in ["shop/api/open", "shop/api/closed"] {
        let started = Instant::now();
        let r =
            limiter.should_rate_limit(&request(vec![descriptor(rule, &[("user", "x")])], 1)).await.unwrap();
        slowest = slowest.max(started.elapsed());
        codes.push(r.overall_code);
        // A decision from Redis carries the counter's numbers; a failure-mode answer does not.
        decided &= r.statuses[0].duration_until_reset.is_some();
    }
    (codes[0], codes[1], decided, slowest)
}

/// Asks `rounds` times from 16 concurrent callers; every answer must follow the failure
/// modes and come within the deadline.
async fn assert_failure_mode(limiter: &Arc<Limiter<RedisConnection>>, rounds: usize) -> Duration {
    let mut callers = Vec::new();
    for _ in 0..16 {
        let limiter = limiter.clone();
        callers.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            for _ in 0..rounds {
                let (open, closed, decided, took) = probe(&limiter).await;
                assert_eq!((open, closed, decided), (OK, OVER, false), "Open admits, Closed rejects");
                slowest = slowest.max(took);
            }
            slowest
        }));
    }
    let mut slowest = Duration::ZERO;
    for caller in callers {
        slowest = slowest.max(caller.await.unwrap());
    }
    assert!(slowest <= DEADLINE + SLACK, "slowest answer {slowest:?} with a {DEADLINE:?} deadline");
    slowest
}

async fn wait_for_decisions(limiter: &Limiter<RedisConnection>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (open, closed, decided, _) = probe(limiter).await;
        if decided {
            assert_eq!((open, closed), (OK, OK));
            return;
        }
        assert!(Instant::now() < deadline, "decisions did not resume within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_restarted() {
    let mut server = RedisServer::start();
    let limiter = agent(RedisConnection::start(settings(&server)).await.unwrap()).await;
    assert!(probe(&limiter).await.2, "decided by Redis while it runs");
    assert_eq!(limiter.readiness(), Ok(()));

    server.kill();
    let slowest = assert_failure_mode(&limiter, 30).await;
    eprintln!("redis down: slowest answer {slowest:?}");
    let m = limiter.metrics();
    assert!(m.store_errors("transient") + m.store_errors("timeout") > 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while limiter.readiness() != Err(NotReady::StoreDown) {
        assert!(Instant::now() < deadline, "not ready while Redis is down and a rule fails closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    server.restart();
    wait_for_decisions(&limiter, Duration::from_secs(10)).await;
    assert_eq!(limiter.readiness(), Ok(()));
    // The restarted Redis has no scripts: EVALSHA got NOSCRIPT and the scripts were reloaded.
    assert!(
        server
            .cli(&[
                "script",
                "exists",
                &script_sha(&limiter.rules().load().unwrap().rules["shop/api/open"].limit)
            ])
            .contains('1')
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_then_thawed() {
    let server = RedisServer::start();
    let limiter = agent(RedisConnection::start(settings(&server)).await.unwrap()).await;
    assert!(probe(&limiter).await.2);

    server.pause();
    let slowest = assert_failure_mode(&limiter, 10).await;
    eprintln!("redis frozen: slowest answer {slowest:?}");
    assert!(limiter.metrics().store_errors("timeout") > 0, "a frozen Redis is a timeout");

    server.resume();
    wait_for_decisions(&limiter, Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_started_before_redis() {
    let port = free_port();
    let mut s = RedisSettings::new(RedisTopology::Standalone(format!("redis://127.0.0.1:{port}")));
    s.probe_interval = Duration::from_millis(100);
    s.connect_timeout = Duration::from_millis(200);
    let store = RedisConnection::start(s).await.expect("starts without Redis");
    assert!(!store.is_up());
    let limiter = agent(store).await;
    assert_failure_mode(&limiter, 5).await;
    assert_eq!(limiter.readiness(), Err(NotReady::StoreDown));

    let _server = RedisServer::start_with(port, &[]);
    wait_for_decisions(&limiter, Duration::from_secs(10)).await;
    assert_eq!(limiter.readiness(), Ok(()));
}

#[tokio::test]
async fn a_malformed_url_is_refused_at_start() {
    let error =
        RedisConnection::start(RedisSettings::new(RedisTopology::Standalone("http://:secret@x".into())))
            .await
            .unwrap_err();
    assert!(!error.is_transient());
    assert!(!error.to_string().contains("secret"), "{error}");
}
