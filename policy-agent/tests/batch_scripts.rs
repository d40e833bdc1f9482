//! The quota-batch scripts (reserve, give back) against their pure twins in
//! `breakwater_agent::algorithm`, on a real Redis and a three-master Redis Cluster, step by
//! step: every reservation runs on Redis, then on the twin at the instant Redis ran it (the
//! reply carries Redis `TIME`), and must answer the same to the microsecond and leave the
//! same counter; give-backs (which read `TIME` without returning it) must match the twin at
//! the instant before or after; per-request hits in between move Redis on, and the twin is
//! read back from Redis after them. Random but seeded sequences reach partial grants, the
//! fair-share cap, refusals, window and sub-window edges, and every give-back condition.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use breakwater_agent::algorithm::{self, CounterState, Limit, SLIDING_BUCKETS};
use breakwater_agent::store::{CounterStore, RedisConnection, RedisSettings, RedisTopology};
use breakwater_api::rate_limit::Algorithm;
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue};
use support::*;

static REDIS: OnceLock<RedisServer> = OnceLock::new();
static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();

fn standalone() -> RedisTopology {
    RedisTopology::Standalone(REDIS.get_or_init(RedisServer::start).url())
}

fn cluster() -> RedisTopology {
    RedisTopology::Cluster(CLUSTER.get_or_init(RedisCluster::start).urls())
}

/// A plain connection for what the store does not offer: `TIME`, reading keys as they lie.
enum Raw {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Raw {
    async fn open(topology: &RedisTopology) -> Self {
        match topology {
            RedisTopology::Standalone(url) => Raw::Standalone(
                redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap(),
            ),
            RedisTopology::Cluster(urls) => Raw::Cluster(
                redis::cluster::ClusterClient::new(urls.clone())
                    .unwrap()
                    .get_async_connection()
                    .await
                    .unwrap(),
            ),
        }
    }

    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> T {
        match self {
            Raw::Standalone(c) => cmd.query_async(c).await.unwrap(),
            Raw::Cluster(c) => cmd.query_async(c).await.unwrap(),
        }
    }

    /// Redis `TIME` in µs.
    async fn time(&mut self) -> i64 {
        let (secs, micros): (i64, i64) = self.query(&redis::cmd("TIME")).await;
        secs * 1_000_000 + micros
    }

    /// The counter as the scripts left it, in the twin's terms.
    async fn state(&mut self, key: &str, limit: &Limit) -> Option<CounterState> {
        match limit {
            Limit::TokenBucket { .. } => {
                let tat: Option<i64> = self.query(redis::cmd("GET").arg(key)).await;
                tat.map(|tat| CounterState::TokenBucket { tat })
            }
            Limit::SlidingWindow { .. } => {
                let fields: Vec<(i64, i64)> = self.query(redis::cmd("HGETALL").arg(key)).await;
                let mut buckets = fields;
                buckets.sort_unstable();
                (!buckets.is_empty()).then_some(CounterState::SlidingWindow { buckets })
            }
            Limit::FixedWindow { .. } => {
                let (w, c): (Option<i64>, Option<i64>) =
                    self.query(redis::cmd("HMGET").arg(key).arg("w").arg("c")).await;
                Some(CounterState::FixedWindow { window: w?, count: c? })
            }
        }
    }
}

/// What of `state` can still matter at `now`: a TAT in the future, the sub-windows still in
/// the window, the current window. Redis forgets the rest by expiry (or at the next script),
/// the twin only when its store sweeps.
fn live(limit: &Limit, state: Option<CounterState>, now: i64) -> Option<CounterState> {
    match (limit, state?) {
        (Limit::TokenBucket { .. }, CounterState::TokenBucket { tat }) => {
            (tat > now).then_some(CounterState::TokenBucket { tat })
        }
        (Limit::SlidingWindow { bucket_us, .. }, CounterState::SlidingWindow { mut buckets }) => {
            buckets.retain(|(idx, _)| *idx >= now.div_euclid(*bucket_us) - SLIDING_BUCKETS);
            (!buckets.is_empty()).then_some(CounterState::SlidingWindow { buckets })
        }
        (Limit::FixedWindow { window_us, .. }, CounterState::FixedWindow { window, count }) => {
            (window == now.div_euclid(*window_us)).then_some(CounterState::FixedWindow { window, count })
        }
        (_, other) => panic!("{limit:?} holds {other:?}"),
    }
}

fn limit(algorithm: Algorithm) -> Limit {
    let (requests, period) = match algorithm {
        // T = 5 ms, C = 420: refills while the test runs.
        Algorithm::TokenBucket => (400, Duration::from_secs(2)),
        // Sub-windows of 50 ms.
        Algorithm::SlidingWindow => (300, Duration::from_secs(1)),
        Algorithm::FixedWindow => (300, Duration::from_millis(500)),
    };
    let mut r = rule("t", algorithm, requests, period);
    r.burst = if algorithm == Algorithm::TokenBucket { 20 } else { 0 };
    Limit::from_rule(&r).unwrap()
}

/// One counter on Redis and its twin, each step checked.
struct Pair {
    store: RedisConnection,
    raw: Raw,
    limit: Limit,
    key: String,
    twin: Option<CounterState>,
}

impl Pair {
    async fn new(topology: &RedisTopology, algorithm: Algorithm) -> Self {
        let store = RedisConnection::start(RedisSettings::new(topology.clone())).await.unwrap();
        assert!(store.is_up(), "connected to the test redis");
        let limit = limit(algorithm);
        let key = format!("{{{}:{}:batch}}", unique_prefix("batch"), limit.tag());
        Pair { store, raw: Raw::open(topology).await, limit, key, twin: None }
    }

    /// A reservation on Redis, then on the twin at the instant Redis ran it.
    async fn reserve(&mut self, want: u32, horizon: Duration) -> algorithm::Reservation {
        let redis = self.store.reserve(&self.key, &self.limit, want, horizon).await.unwrap();
        let horizon_us = i64::try_from(horizon.as_micros()).unwrap();
        let (expected, _) = algorithm::reserve(&self.limit, &mut self.twin, redis.now_us, want, horizon_us);
        assert_eq!(redis, expected, "reserve({want}, {horizon:?})");
        self.check().await;
        redis
    }

    /// A give-back on Redis; the script read `TIME` between the two reads around it, and the
    /// twin must answer alike at one of them (they differ only across an edge).
    async fn give_back(&mut self, mark: i64, hits: u32) -> u32 {
        let before = self.raw.time().await;
        let back = self.store.give_back(&self.key, &self.limit, mark, hits).await.unwrap();
        let after = self.raw.time().await;
        let twin = [before, after].into_iter().find_map(|now| {
            let mut state = self.twin.clone();
            (algorithm::give_back(&self.limit, &mut state, now, mark, hits) == back).then_some(state)
        });
        self.twin =
            twin.unwrap_or_else(|| panic!("give_back({mark}, {hits}) = {back} on Redis, not on the twin"));
        self.check().await;
        back
    }

    /// A per-request hit moves Redis on; the twin is read back from it.
    async fn hit(&mut self, hits: u32) {
        self.store.hit(&self.key, &self.limit, hits).await.unwrap();
        self.twin = self.raw.state(&self.key, &self.limit).await;
    }

    async fn check(&mut self) {
        let now = self.raw.time().await;
        let redis = self.raw.state(&self.key, &self.limit).await;
        assert_eq!(live(&self.limit, redis, now), live(&self.limit, self.twin.clone(), now), "the counter");
    }
}

async fn script_and_twin_agree(topology: RedisTopology, algorithm: Algorithm, seed: u64) {
    let mut pair = Pair::new(&topology, algorithm).await;
    let mut rng = fastrand::Rng::with_seed(seed);
    // (mark, hits left) of the batches reserved and not yet given back.
    let mut batches: Vec<(i64, u32)> = Vec::new();
    let (mut granted, mut partial, mut refused, mut returned, mut kept) = (0, 0, 0, 0, 0);
    for _ in 0..300 {
        // Let Redis's clock move on now and then, across sub-windows, windows and refills.
        if rng.u8(0..8) == 0 {
            tokio::time::sleep(Duration::from_millis(rng.u64(1..40))).await;
        }
        match rng.u8(0..10) {
            0..=4 => {
                let want = if rng.bool() { rng.u32(1..8) } else { rng.u32(1..500) };
                let r = pair.reserve(want, Duration::from_millis(rng.u64(1..300))).await;
                match r.granted {
                    0 => refused += 1,
                    g => {
                        granted += 1;
                        if g < want {
                            partial += 1;
                        }
                        batches.push((r.mark, g - 1));
                    }
                }
            }
            5..=6 if !batches.is_empty() => {
                // The newest batch half the time: a GCRA give-back needs nothing after it.
                let i = if rng.bool() { batches.len() - 1 } else { rng.usize(0..batches.len()) };
                let (mark, left) = batches.swap_remove(i);
                if pair.give_back(mark, rng.u32(0..=left)).await > 0 {
                    returned += 1;
                } else {
                    kept += 1;
                }
            }
            _ => pair.hit(rng.u32(1..3)).await,
        }
    }
    eprintln!(
        "{algorithm:?}: {granted} batches granted ({partial} fewer than wanted), {refused} refused; give-backs: {returned} taken, {kept} refused"
    );

    // Then, on a fresh counter, what the random run may have missed: a batch given back
    // at once (taken, whatever the algorithm), then reservations until one is refused, and
    // a give-back after that (a fixed window that refused a hit keeps refusing).
    let mut pair = Pair::new(&topology, algorithm).await;
    let horizon = Duration::from_millis(100);
    // 64 per millisecond: more than one hit unless the sub-window ends within 16 µs.
    let mut first = pair.reserve(64, Duration::from_millis(1)).await;
    for _ in 0..10 {
        if first.granted > 1 {
            break;
        }
        first = pair.reserve(64, Duration::from_millis(1)).await;
    }
    assert!(first.granted > 1, "{first:?}");
    assert_eq!(pair.give_back(first.mark, first.granted - 1).await, first.granted - 1);
    let mut last = first;
    let mut refused = false;
    for _ in 0..1000 {
        let r = pair.reserve(500, horizon).await;
        if r.granted == 0 {
            // (A token bucket refills one hit every 5 ms: the next call might be granted.)
            refused = true;
            break;
        }
        last = r;
    }
    assert!(refused, "the counter was drained to a refusal");
    let back = pair.give_back(last.mark, last.granted.saturating_sub(1)).await;
    if algorithm == Algorithm::FixedWindow {
        assert_eq!(back, 0, "a window that refused a hit takes nothing back");
    }
}

macro_rules! agree {
    ($backend:ident) => {
        mod $backend {
            use super::*;

            #[tokio::test]
            async fn token_bucket_batches_match_the_twin() {
                script_and_twin_agree(super::$backend(), Algorithm::TokenBucket, 1).await;
            }

            #[tokio::test]
            async fn sliding_window_batches_match_the_twin() {
                script_and_twin_agree(super::$backend(), Algorithm::SlidingWindow, 2).await;
            }

            #[tokio::test]
            async fn fixed_window_batches_match_the_twin() {
                script_and_twin_agree(super::$backend(), Algorithm::FixedWindow, 3).await;
            }
        }
    };
}

agree!(standalone);
agree!(cluster);
