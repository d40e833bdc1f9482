//! The same decision tests against every counter store: in-memory, Redis, and a Redis
//! Cluster of three masters (servers started here, on free ports). One macro stamps out the
//! suite per backend, so the Lua scripts and their Rust twins are held to one behaviour.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use breakwater_agent::limiter::Limiter;
use breakwater_agent::store::{CounterStore, MemoryStore, RedisConnection, RedisSettings, RedisTopology};
use breakwater_api::agent::RateLimitRule;
use breakwater_api::rate_limit::Algorithm;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use support::*;

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

static REDIS: OnceLock<RedisServer> = OnceLock::new();
static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();

async fn memory() -> MemoryStore {
    MemoryStore::new()
}

async fn redis() -> RedisConnection {
    let server = REDIS.get_or_init(RedisServer::start);
    let store =
        RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(server.url()))).await.unwrap();
    assert!(store.is_up(), "connected to the test redis-server");
    store
}

async fn redis_cluster() -> RedisConnection {
    let cluster = CLUSTER.get_or_init(RedisCluster::start);
    let store =
        RedisConnection::start(RedisSettings::new(RedisTopology::Cluster(cluster.urls()))).await.unwrap();
    assert!(store.is_up(), "connected to the test cluster");
    store
}

fn setup<S: CounterStore>(store: S, name: &str, rules: Vec<RateLimitRule>) -> Arc<Limiter<S>> {
    limiter(store, rules, exact_settings(unique_prefix(name)))
}

async fn decide(
    limiter: &Limiter<impl CounterStore>,
    rule: &str,
    parts: &[(&str, &str)],
    hits: u32,
) -> RateLimitResponse {
    limiter.should_rate_limit(&request(vec![descriptor(rule, parts)], hits)).await.expect("a decision")
}

fn no_store_failures(limiter: &Limiter<impl CounterStore>) {
    let m = limiter.metrics();
    let failures = m.store_errors("timeout") + m.store_errors("transient") + m.store_errors("permanent");
    assert_eq!(failures, 0, "every decision came from the store, none from the failure mode");
}

/// Fixed windows are aligned to the epoch: if the current one ends within `margin`, wait
/// until the next one has begun (by the store's own clock, read through a zero-hit peek).
async fn avoid_window_edge(limiter: &Limiter<impl CounterStore>, rule: &str, margin: Duration) {
    let mut peek = descriptor(rule, &[("peek", "edge")]);
    peek.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
    let response = limiter.should_rate_limit(&request(vec![peek], 1)).await.expect("peek");
    let reset = response.statuses[0].duration_until_reset.expect("reset");
    let reset = Duration::new(reset.seconds as u64, reset.nanos as u32);
    if reset < margin {
        tokio::time::sleep(reset + Duration::from_millis(20)).await;
    }
}

/// 64 callers race `total` requests at one counter of limit `n`: exactly `n` are admitted.
async fn exactly_n_under_64_callers(store: impl CounterStore, algorithm: Algorithm) {
    let n = 50;
    let total = 300;
    let limiter =
        setup(store, "exact", vec![rule("shop/api/exact", algorithm, n, Duration::from_secs(3600))]);
    avoid_window_edge(&limiter, "shop/api/exact", Duration::from_secs(60)).await;
    let sent = Arc::new(AtomicU32::new(0));
    let admitted = Arc::new(AtomicU32::new(0));
    let mut callers = Vec::new();
    for _ in 0..64 {
        let (limiter, sent, admitted) = (limiter.clone(), sent.clone(), admitted.clone());
        callers.push(tokio::spawn(async move {
            while sent.fetch_add(1, Ordering::SeqCst) < total {
                let r = decide(&limiter, "shop/api/exact", &[("user", "alice")], 1).await;
                if r.overall_code == OK {
                    admitted.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::SeqCst), n, "{algorithm:?}: admitted out of {total}");
    no_store_failures(&limiter);
}

/// With quota batches on, 64 callers race 3 N requests at one counter of N: never more than
/// N (plus a token bucket's refills) admitted, batches did the work, and whatever was not
/// admitted is exactly what batches hold or stranded.
async fn batches_are_exact_under_64_callers(store: impl CounterStore, algorithm: Algorithm) {
    let n = 2000;
    let period = if algorithm == Algorithm::TokenBucket { 86_400 } else { 3600 };
    let id = "shop/api/batched";
    let limiter = limiter(
        store,
        vec![rule(id, algorithm, n, Duration::from_secs(period))],
        batch_settings(unique_prefix("batched")),
    );
    avoid_window_edge(&limiter, id, Duration::from_secs(60)).await;
    let total = 3 * n;
    let sent = Arc::new(AtomicU32::new(0));
    let admitted = Arc::new(AtomicU32::new(0));
    let started = Instant::now();
    let mut callers = Vec::new();
    for _ in 0..64 {
        let (limiter, sent, admitted) = (limiter.clone(), sent.clone(), admitted.clone());
        callers.push(tokio::spawn(async move {
            while sent.fetch_add(1, Ordering::SeqCst) < total {
                if decide(&limiter, id, &[("user", "alice")], 1).await.overall_code == OK {
                    admitted.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let admitted = u64::from(admitted.load(Ordering::SeqCst));
    let refills = if algorithm == Algorithm::TokenBucket {
        started.elapsed().as_micros() as u64 / (u64::from(period as u32) * 1_000_000 / u64::from(n))
    } else {
        0
    };
    assert!(admitted <= u64::from(n) + refills, "{algorithm:?}: {admitted} admitted, limit {n} (+{refills})");
    let rules = limiter.rules().load().unwrap();
    let c = &rules.rules[id].counters;
    let (reserved, served, returned, stranded) =
        (c.batch_reserved.get(), c.batch_served.get(), c.batch_returned.get(), c.batch_stranded.get());
    eprintln!(
        "{algorithm:?}: admitted {admitted} of {total} at a limit of {n}; {} batches, {reserved} hits reserved, {served} served, {returned} returned, {stranded} stranded",
        c.batches.get()
    );
    assert!(c.batches.get() > 0 && served > u64::from(n) / 2, "batches admitted most of it");
    if algorithm != Algorithm::TokenBucket {
        assert_eq!(
            u64::from(n) - admitted,
            reserved - served - returned,
            "{algorithm:?}: every hit not admitted is held or stranded"
        );
    }
    no_store_failures(&limiter);
}

async fn token_bucket_burst(store: impl CounterStore) {
    let mut r = rule("shop/api/burst", Algorithm::TokenBucket, 10, Duration::from_secs(3600));
    r.burst = 5;
    let limiter = setup(store, "burst", vec![r]);
    let mut admitted = 0;
    for _ in 0..40 {
        if decide(&limiter, "shop/api/burst", &[], 1).await.overall_code == OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 15, "requests + burst at once");
    let rejected = decide(&limiter, "shop/api/burst", &[], 1).await;
    assert_eq!(rejected.overall_code, OVER);
    assert_eq!(header(&rejected, "x-ratelimit-limit"), Some("15, 15;w=3600"));
    assert_eq!(header(&rejected, "x-ratelimit-remaining"), Some("0"));
    // One token every 3600 s / 10 = 360 s.
    let retry: u64 = header(&rejected, "retry-after").unwrap().parse().unwrap();
    assert!((359..=360).contains(&retry), "retry-after {retry}");
    let reset: u64 = header(&rejected, "x-ratelimit-reset").unwrap().parse().unwrap();
    assert!((5399..=5400).contains(&reset), "the bucket is full again after 15 emissions: {reset}");
    no_store_failures(&limiter);
}

/// A window of 1 s: fill it, wait for the reset the store reported, fill it again.
async fn window_rollover(store: impl CounterStore, algorithm: Algorithm) {
    let n = 5;
    let limiter = setup(store, "rollover", vec![rule("shop/api/roll", algorithm, n, Duration::from_secs(1))]);
    avoid_window_edge(&limiter, "shop/api/roll", Duration::from_millis(300)).await;
    for round in 0..2 {
        let mut admitted = 0;
        let mut reset = Duration::ZERO;
        for _ in 0..12 {
            let r = decide(&limiter, "shop/api/roll", &[("user", "bob")], 1).await;
            if r.overall_code == OK {
                admitted += 1;
            }
            let d = r.statuses[0].duration_until_reset.unwrap();
            reset = reset.max(Duration::new(d.seconds as u64, d.nanos as u32));
        }
        assert_eq!(admitted, n, "{algorithm:?}, round {round}");
        // The store's own word on when the counter is fresh again; never a guess.
        assert!(reset <= Duration::from_millis(1_100), "{algorithm:?}: reset {reset:?}");
        tokio::time::sleep(reset + Duration::from_millis(5)).await;
    }
    no_store_failures(&limiter);
}

async fn hits_addend(store: impl CounterStore) {
    let limiter = setup(
        store,
        "hits",
        vec![
            rule("shop/api/tb", Algorithm::TokenBucket, 10, Duration::from_secs(3600)),
            rule("shop/api/fw", Algorithm::FixedWindow, 10, Duration::from_secs(3600)),
        ],
    );
    avoid_window_edge(&limiter, "shop/api/fw", Duration::from_secs(30)).await;
    let remaining = |r: &RateLimitResponse| (r.overall_code, r.statuses[0].limit_remaining);
    // TokenBucket: hits that do not fit are refused whole and not consumed.
    assert_eq!(remaining(&decide(&limiter, "shop/api/tb", &[], 4).await), (OK, 6));
    assert_eq!(remaining(&decide(&limiter, "shop/api/tb", &[], 4).await), (OK, 2));
    assert_eq!(remaining(&decide(&limiter, "shop/api/tb", &[], 4).await), (OVER, 2));
    assert_eq!(remaining(&decide(&limiter, "shop/api/tb", &[], 2).await), (OK, 0));
    // FixedWindow (envoyproxy/ratelimit): every hit counts, admitted or not.
    assert_eq!(remaining(&decide(&limiter, "shop/api/fw", &[], 4).await), (OK, 6));
    assert_eq!(remaining(&decide(&limiter, "shop/api/fw", &[], 4).await), (OK, 2));
    assert_eq!(remaining(&decide(&limiter, "shop/api/fw", &[], 4).await), (OVER, 0));
    assert_eq!(remaining(&decide(&limiter, "shop/api/fw", &[], 1).await), (OVER, 0));
    // A descriptor's own hits_addend overrides the request's.
    let mut d = descriptor("shop/api/tb", &[("user", "carol")]);
    d.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 7 });
    let r = limiter.should_rate_limit(&request(vec![d], 1)).await.unwrap();
    assert_eq!(remaining(&r), (OK, 3));
    no_store_failures(&limiter);
}

async fn one_of_several_descriptors_fails(store: impl CounterStore) {
    let limiter = setup(
        store,
        "several",
        vec![
            rule("shop/api/wide", Algorithm::TokenBucket, 100, Duration::from_secs(3600)),
            rule("shop/api/narrow", Algorithm::SlidingWindow, 2, Duration::from_secs(3600)),
        ],
    );
    let both = || {
        request(
            vec![
                descriptor("shop/api/wide", &[("tenant", "gold")]),
                descriptor("shop/api/narrow", &[("user", "dave")]),
            ],
            1,
        )
    };
    for _ in 0..2 {
        let r = limiter.should_rate_limit(&both()).await.unwrap();
        assert_eq!(r.overall_code, OK);
        assert_eq!(r.statuses.iter().map(|s| s.code).collect::<Vec<_>>(), vec![OK, OK]);
    }
    let r = limiter.should_rate_limit(&both()).await.unwrap();
    assert_eq!(r.overall_code, OVER, "every matched limit must pass");
    assert_eq!(r.statuses.iter().map(|s| s.code).collect::<Vec<_>>(), vec![OK, OVER]);
    assert_eq!(r.statuses[1].current_limit.as_ref().unwrap().name, "shop/api/narrow");
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("2, 2;w=3600"), "headers describe the rejecting limit");
    assert!(header(&r, "retry-after").is_some());
    no_store_failures(&limiter);
}

async fn shadow_rules_count_but_never_reject(store: impl CounterStore) {
    let mut shadow = rule("shop/api/shadow", Algorithm::FixedWindow, 2, Duration::from_secs(3600));
    shadow.shadow = true;
    let limiter = setup(store, "shadow", vec![shadow]);
    avoid_window_edge(&limiter, "shop/api/shadow", Duration::from_secs(30)).await;
    for _ in 0..5 {
        let r = decide(&limiter, "shop/api/shadow", &[], 1).await;
        assert_eq!(r.overall_code, OK);
        assert_eq!(r.statuses[0].code, OK);
        assert!(header(&r, "retry-after").is_none());
    }
    let rules = limiter.rules().load().unwrap();
    let counters = &rules.rules["shop/api/shadow"].counters;
    // Two admitted, three would-be rejections, and the zero-hit peek of avoid_window_edge.
    assert_eq!((counters.ok.get(), counters.shadow_over_limit.get()), (3, 3));
    no_store_failures(&limiter);
}

async fn unknown_descriptors_are_admitted_and_counted(store: impl CounterStore) {
    let limiter = setup(
        store,
        "unknown",
        vec![rule("shop/api/known", Algorithm::FixedWindow, 1, Duration::from_secs(3600))],
    );
    let mut foreign = descriptor("x", &[]);
    foreign.entries[0].key = "generic_key".into();
    let r = limiter
        .should_rate_limit(&request(vec![foreign, descriptor("shop/api/missing", &[])], 1))
        .await
        .unwrap();
    assert_eq!(r.overall_code, OK);
    assert_eq!(r.statuses.len(), 2);
    let mut other = request(vec![descriptor("shop/api/known", &[])], 1);
    other.domain = "someone-else".into();
    for _ in 0..3 {
        assert_eq!(limiter.should_rate_limit(&other).await.unwrap().overall_code, OK);
    }
    let m = limiter.metrics();
    assert_eq!(
        (
            m.unknown_descriptors("no_limit_key"),
            m.unknown_descriptors("unknown_rule"),
            m.unknown_descriptors("other_domain")
        ),
        (1, 1, 3)
    );
}

/// Different key values are different counters, however the values are spelled.
async fn keys_are_distinct_counters(store: impl CounterStore) {
    let limiter = setup(
        store,
        "keys",
        vec![rule("shop/api/keys", Algorithm::TokenBucket, 1, Duration::from_secs(3600))],
    );
    for parts in [
        vec![("user", "alice")],
        vec![("user", "bob")],
        vec![("a", "b=c")],
        vec![("a=b", "c")],
        vec![("a", "b:c")],
        vec![("a", "b"), ("c", "")],
        vec![],
    ] {
        assert_eq!(decide(&limiter, "shop/api/keys", &parts, 1).await.overall_code, OK, "{parts:?}");
        assert_eq!(decide(&limiter, "shop/api/keys", &parts, 1).await.overall_code, OVER, "{parts:?}");
    }
}

/// Once a counter is over, the cache answers without the store, and never admits.
async fn over_limit_cache_never_admits(store: impl CounterStore) {
    let limiter = setup(
        store,
        "cache",
        vec![rule("shop/api/cache", Algorithm::TokenBucket, 3, Duration::from_secs(3600))],
    );
    let mut admitted = 0;
    for _ in 0..20 {
        if decide(&limiter, "shop/api/cache", &[], 1).await.overall_code == OK {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 3);
    let rules = limiter.rules().load().unwrap();
    let counters = &rules.rules["shop/api/cache"].counters;
    assert_eq!(counters.over_limit.get(), 1, "the store was asked once after the limit was reached");
    assert_eq!(counters.over_limit_cached.get(), 16);
}

macro_rules! conformance {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn token_bucket_admits_exactly_n_under_64_callers() {
                exactly_n_under_64_callers(super::$backend().await, Algorithm::TokenBucket).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sliding_window_admits_exactly_n_under_64_callers() {
                exactly_n_under_64_callers(super::$backend().await, Algorithm::SlidingWindow).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fixed_window_admits_exactly_n_under_64_callers() {
                exactly_n_under_64_callers(super::$backend().await, Algorithm::FixedWindow).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn token_bucket_batches_are_exact_under_64_callers() {
                batches_are_exact_under_64_callers(super::$backend().await, Algorithm::TokenBucket).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sliding_window_batches_are_exact_under_64_callers() {
                batches_are_exact_under_64_callers(super::$backend().await, Algorithm::SlidingWindow).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn fixed_window_batches_are_exact_under_64_callers() {
                batches_are_exact_under_64_callers(super::$backend().await, Algorithm::FixedWindow).await;
            }

            #[tokio::test]
            async fn token_bucket_burst_is_exact() {
                token_bucket_burst(super::$backend().await).await;
            }

            #[tokio::test]
            async fn token_bucket_refills_after_its_reset() {
                window_rollover(super::$backend().await, Algorithm::TokenBucket).await;
            }

            #[tokio::test]
            async fn sliding_window_rolls_over() {
                window_rollover(super::$backend().await, Algorithm::SlidingWindow).await;
            }

            #[tokio::test]
            async fn fixed_window_rolls_over() {
                window_rollover(super::$backend().await, Algorithm::FixedWindow).await;
            }

            #[tokio::test]
            async fn hits_addend_is_honoured() {
                hits_addend(super::$backend().await).await;
            }

            #[tokio::test]
            async fn one_failing_descriptor_rejects_the_request() {
                one_of_several_descriptors_fails(super::$backend().await).await;
            }

            #[tokio::test]
            async fn shadow_rules_never_reject() {
                shadow_rules_count_but_never_reject(super::$backend().await).await;
            }

            #[tokio::test]
            async fn unknown_descriptors_are_admitted() {
                unknown_descriptors_are_admitted_and_counted(super::$backend().await).await;
            }

            #[tokio::test]
            async fn descriptor_values_name_distinct_counters() {
                keys_are_distinct_counters(super::$backend().await).await;
            }

            #[tokio::test]
            async fn over_limit_cache_never_admits_more() {
                over_limit_cache_never_admits(super::$backend().await).await;
            }
        }
    };
}

conformance!(memory);
conformance!(redis);
conformance!(redis_cluster);

#[tokio::test]
async fn cluster_counters_spread_over_the_three_masters() {
    let cluster = CLUSTER.get_or_init(RedisCluster::start);
    let prefix = unique_prefix("spread");
    let limiter = limiter(
        redis_cluster().await,
        vec![rule("shop/api/spread", Algorithm::TokenBucket, 5, Duration::from_secs(3600))],
        exact_settings(prefix.clone()),
    );
    for i in 0..60 {
        let user = format!("u{i}");
        assert_eq!(decide(&limiter, "shop/api/spread", &[("user", &user)], 1).await.overall_code, OK);
    }
    let started = Instant::now();
    let per_node: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| {
            n.cli(&["--scan", "--pattern", &format!("{{{prefix}*")]).lines().filter(|l| !l.is_empty()).count()
        })
        .collect();
    assert_eq!(per_node.iter().sum::<usize>(), 60, "{per_node:?}");
    assert!(per_node.iter().all(|n| *n > 0), "every master holds counters: {per_node:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // And every key expires.
    let node = &cluster.nodes[0];
    let key = node.cli(&["--scan", "--pattern", &format!("{{{prefix}*")]).lines().next().unwrap().to_string();
    let ttl: i64 = node.cli(&["pttl", &key]).trim().parse().unwrap();
    // One hit of 5 per hour: the bucket is full again one emission interval (720 s) later.
    assert!(ttl > 700_000 && ttl <= 720_001, "pttl {ttl}");
}
