//! Quota batches (docs/agent.md, "Quota batches").
//!
//! Exactness under contention: four whole agents (`breakwater_agent::run`) on one real
//! Redis, one shared counter, 64 requests in flight on each over real gRPC, three times the
//! limit sent, for each algorithm — never more admitted than the algorithm allows, and the
//! under-admission printed and held to the documented bound, `A · min(Q, ⌊N/16⌋)` (+1 for a
//! token bucket's prepaid time).
//!
//! Then the limiter's behaviour around batches: one reservation in flight per counter with
//! the others waiting for it (served from it, or answered by the failure mode at once when
//! it fails); hits in hand admitted while Redis is away, and nothing else; a rule whose
//! numbers change drops its batch; ended batches given back by the sweep; the table bounded;
//! an agent's batches given back at shutdown.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use breakwater_agent::algorithm::{Limit, Reservation, Verdict};
use breakwater_agent::batch::BatchSettings;
use breakwater_agent::config::RuleSet;
use breakwater_agent::limiter::{Limiter, LimiterSettings};
use breakwater_agent::source::ConfigSource;
use breakwater_agent::store::{
    CounterStore, MemoryStore, RedisConnection, RedisSettings, RedisTopology, StoreError,
};
use breakwater_agent::{Settings, StoreSettings};
use breakwater_api::agent::{AgentConfig, RateLimitRule};
use breakwater_api::rate_limit::{Algorithm, FailureMode};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use support::*;
use tokio::sync::{Semaphore, watch};

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

static REDIS: OnceLock<RedisServer> = OnceLock::new();

fn redis_settings(server: &RedisServer) -> RedisSettings {
    let mut settings = RedisSettings::new(RedisTopology::Standalone(server.url()));
    settings.probe_interval = Duration::from_millis(100);
    settings.connect_timeout = Duration::from_millis(200);
    settings
}

/// One agent's counts for a rule, from its `/metrics`.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    batches: u64,
    reserved: u64,
    served: u64,
    returned: u64,
    stranded: u64,
    failures: u64,
}

impl Counts {
    /// Hits reserved and neither admitted nor given back nor stranded: still in hand.
    fn held(&self) -> u64 {
        self.reserved - self.served - self.returned - self.stranded
    }

    fn add(self, o: Counts) -> Counts {
        Counts {
            batches: self.batches + o.batches,
            reserved: self.reserved + o.reserved,
            served: self.served + o.served,
            returned: self.returned + o.returned,
            stranded: self.stranded + o.stranded,
            failures: self.failures + o.failures,
        }
    }
}

async fn counts(http: SocketAddr, rule: &str) -> Counts {
    let text = reqwest::get(format!("http://{http}/metrics")).await.unwrap().text().await.unwrap();
    let value = |metric: &str, label: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains(&format!("rule=\"{rule}\"")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let hits = "breakwater_agent_quota_batch_hits_total";
    Counts {
        batches: value("breakwater_agent_quota_batches_total", ""),
        reserved: value(hits, "outcome=\"reserved\""),
        served: value(hits, "outcome=\"served\""),
        returned: value(hits, "outcome=\"returned\""),
        stranded: value(hits, "outcome=\"stranded\""),
        failures: value("breakwater_agent_rate_limit_decisions_total", "result=\"failure_"),
    }
}

fn config(rules: Vec<RateLimitRule>) -> Option<AgentConfig> {
    Some(AgentConfig { rate_limits: rules, ..Default::default() })
}

/// A whole agent on `redis`, with batches as the flags' defaults set them and a deadline no
/// debug build on a busy machine misses, ready.
async fn agent(
    redis: &RedisServer,
    prefix: &str,
    name: &str,
    configs: watch::Receiver<Option<AgentConfig>>,
) -> Running {
    let running = Running::start(Settings {
        pod: format!("shop/{name}"),
        config: ConfigSource::Channel(configs),
        store: StoreSettings::Redis(redis_settings(redis)),
        limiter: batch_settings(prefix.to_string()),
        leases: Default::default(),
        breakers: Default::default(),
    })
    .await;
    let readyz = format!("http://{}/readyz", running.http);
    wait_until("the agent is ready", Duration::from_secs(10), || async {
        reqwest::get(&readyz).await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    running
}

/// Windows are aligned to the hour: do not start within two minutes of its end.
async fn avoid_the_hours_end() {
    let into_hour = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() % 3600;
    if into_hour > 3600 - 120 {
        tokio::time::sleep(Duration::from_secs(3600 - into_hour + 1)).await;
    }
}

const AGENTS: usize = 4;
const IN_FLIGHT: usize = 64;
const N: u32 = 2000;

/// Four agents share one counter; with `quiet`, three of them stop sending once half the
/// limit has been sent — holding whatever batches they have — and the fourth sends the rest:
/// the case the under-admission bound describes.
async fn four_agents_on_one_counter(algorithm: Algorithm, quiet: bool) {
    let redis = REDIS.get_or_init(RedisServer::start);
    let prefix = unique_prefix("contended");
    let id = "shop/api/contended";
    // TokenBucket: a day, so the run refills at most a token (T = 43.2 s); windows: an hour.
    let period = if algorithm == Algorithm::TokenBucket { 86_400 } else { 3600 };
    let mut r = rule(id, algorithm, N, Duration::from_secs(period));
    r.failure_mode = FailureMode::Closed;
    let (_configs, rx) = watch::channel(config(vec![r.clone()]));
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        agents.push(agent(redis, &prefix, &format!("agent-{i}"), rx.clone()).await);
    }
    avoid_the_hours_end().await;

    let sent = Arc::new(AtomicU32::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut callers = Vec::new();
    for (a, agent) in agents.iter().enumerate() {
        // Two HTTP/2 connections per agent, as an Envoy with two workers opens.
        let endpoint = format!("http://{}", agent.grpc);
        let channels = [
            RateLimitServiceClient::connect(endpoint.clone()).await.unwrap(),
            RateLimitServiceClient::connect(endpoint).await.unwrap(),
        ];
        let stops_at = if quiet && a > 0 { N / 2 } else { 3 * N };
        for i in 0..IN_FLIGHT {
            let (mut client, sent, admitted) = (channels[i % 2].clone(), sent.clone(), admitted.clone());
            callers.push(tokio::spawn(async move {
                while sent.load(Ordering::SeqCst) < stops_at && sent.fetch_add(1, Ordering::SeqCst) < 3 * N {
                    let response = client
                        .should_rate_limit(request(vec![descriptor(id, &[("user", "x")])], 1))
                        .await
                        .unwrap();
                    if response.get_ref().overall_code == OK {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let elapsed = started.elapsed();
    let admitted = admitted.load(Ordering::SeqCst);
    let mut total = Counts::default();
    let mut per_agent = Vec::new();
    for agent in &agents {
        let c = counts(agent.http, id).await;
        per_agent.push(c);
        total = total.add(c);
    }

    let limit = Limit::from_rule(&r).unwrap();
    // The algorithm's bound over the run: N, and a token bucket's refills, C + ⌊d/T⌋.
    let (bound, prepaid) = match limit {
        Limit::TokenBucket { emission_us, .. } => {
            let refills = u64::try_from(elapsed.as_micros()).unwrap() / u64::try_from(emission_us).unwrap();
            // ⌈L/T⌉ with L = min(horizon, (C - 1) T / 8).
            let capacity = i64::from(N);
            let life =
                (BatchSettings::default().horizon.as_micros() as i64).min((capacity - 1) * emission_us / 8);
            (u64::from(N) + refills, u64::try_from((life + emission_us - 1) / emission_us).unwrap())
        }
        _ => (u64::from(N), 0),
    };
    let q = u64::from(BatchSettings::default().max_hits);
    let formula = AGENTS as u64 * q.min((u64::from(N) / 16).max(1)) + prepaid;
    let under = bound.saturating_sub(admitted);
    eprintln!(
        "{algorithm:?}{}: {AGENTS} agents × {IN_FLIGHT} in flight, {} sent in {:.2} s at a limit of {N}: admitted {admitted}, bound {bound}, over-admitted {}, under-admitted {under} (formula ≤ {formula}); batches {}, hits reserved {}, served {}, returned {}, stranded {}, held {}; per agent served {:?}",
        if quiet { ", three agents quiet from N/2 on" } else { "" },
        sent.load(Ordering::SeqCst).min(3 * N),
        elapsed.as_secs_f64(),
        admitted.saturating_sub(bound),
        total.batches,
        total.reserved,
        total.served,
        total.returned,
        total.stranded,
        total.held(),
        per_agent.iter().map(|c| c.served).collect::<Vec<_>>(),
    );
    assert!(admitted <= bound, "{algorithm:?}: admitted {admitted} > {bound}");
    assert_eq!(total.failures, 0, "no decision was answered by the failure mode");
    assert!(
        total.batches >= AGENTS as u64 && total.served > u64::from(N) / 2,
        "batches did most of the work"
    );
    assert!(per_agent.iter().all(|c| c.batches > 0), "every agent reserved batches: {per_agent:?}");
    assert!(under <= formula, "{algorithm:?}: under-admitted {under} > {formula}");
    if algorithm != Algorithm::TokenBucket {
        // Every hit Redis granted and no request received is in hand, stranded, or was
        // given back after the counter ran out (so at most all given back).
        assert!(
            total.held() + total.stranded <= under && under <= total.reserved - total.served,
            "{algorithm:?}: under-admitted {under}, held {} + stranded {}, reserved - served {}",
            total.held(),
            total.stranded,
            total.reserved - total.served
        );
    }
    for agent in agents {
        agent.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_agents_token_bucket_exact_under_contention() {
    four_agents_on_one_counter(Algorithm::TokenBucket, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_agents_sliding_window_exact_under_contention() {
    four_agents_on_one_counter(Algorithm::SlidingWindow, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_agents_fixed_window_exact_under_contention() {
    four_agents_on_one_counter(Algorithm::FixedWindow, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bucket_under_admission_when_three_agents_go_quiet() {
    four_agents_on_one_counter(Algorithm::TokenBucket, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sliding_window_under_admission_when_three_agents_go_quiet() {
    four_agents_on_one_counter(Algorithm::SlidingWindow, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixed_window_under_admission_when_three_agents_go_quiet() {
    four_agents_on_one_counter(Algorithm::FixedWindow, true).await;
}

/// The in-memory store, with reservations held at a gate until the test opens it, and
/// failing when told to.
#[derive(Clone)]
struct Gated {
    inner: MemoryStore,
    gate: Arc<Semaphore>,
    fail: Arc<AtomicBool>,
    reserves: Arc<AtomicU32>,
}

impl Default for Gated {
    fn default() -> Self {
        Gated {
            inner: MemoryStore::new(),
            gate: Arc::new(Semaphore::new(0)),
            fail: Arc::default(),
            reserves: Arc::default(),
        }
    }
}

impl CounterStore for Gated {
    async fn hit(&self, key: &str, limit: &Limit, hits: u32) -> Result<Verdict, StoreError> {
        self.inner.hit(key, limit, hits).await
    }

    async fn reserve(
        &self,
        key: &str,
        limit: &Limit,
        want: u32,
        horizon: Duration,
    ) -> Result<Reservation, StoreError> {
        self.reserves.fetch_add(1, Ordering::SeqCst);
        self.gate.acquire().await.unwrap().forget();
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::NotConnected);
        }
        self.inner.reserve(key, limit, want, horizon).await
    }

    async fn give_back(&self, key: &str, limit: &Limit, mark: i64, hits: u32) -> Result<u32, StoreError> {
        self.inner.give_back(key, limit, mark, hits).await
    }

    fn is_up(&self) -> bool {
        true
    }

    fn backend(&self) -> &'static str {
        "gated"
    }
}

fn counters<S: CounterStore>(limiter: &Limiter<S>, id: &str) -> breakwater_agent::metrics::RuleCounters {
    limiter.rules().load().unwrap().rules[id].counters.clone()
}

/// 16 requests arrive while one reservation is in flight: none calls Redis, all wait for
/// it — then are served from it (and the one reservation sized for them all), or answered
/// by the failure mode the moment it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reservation_in_flight_and_its_waiters() {
    for fail in [false, true] {
        let store = Gated::default();
        store.fail.store(fail, Ordering::SeqCst);
        let id = "shop/api/flight";
        let mut r = rule(id, Algorithm::FixedWindow, 100_000, Duration::from_secs(3600));
        r.failure_mode = FailureMode::Closed;
        let prefix = unique_prefix("flight");
        let limiter = limiter(store.clone(), vec![r], batch_settings(prefix.clone()));
        let rules = limiter.rules().load().unwrap();
        let key = breakwater_agent::limiter::counter_key(&prefix, &rules.rules[id], &[]);
        avoid_the_hours_end().await;
        // The first hit of a cold counter is one per-request call.
        let ask = |limiter: Arc<Limiter<Gated>>| async move {
            let started = Instant::now();
            let r = limiter.should_rate_limit(&request(vec![descriptor(id, &[])], 1)).await.unwrap();
            (r.overall_code, started.elapsed())
        };
        assert_eq!(ask(limiter.clone()).await.0, OK);
        assert_eq!(store.reserves.load(Ordering::SeqCst), 0, "a cold counter costs one per-request call");
        let tasks: Vec<_> = (0..16).map(|_| tokio::spawn(ask(limiter.clone()))).collect();
        wait_until(
            "one reservation at the gate, 15 requests waiting for it",
            Duration::from_secs(5),
            || async {
                store.reserves.load(Ordering::SeqCst) == 1 && limiter.batches().unwrap().waiting(&key) == 15
            },
        )
        .await;
        let opened = Instant::now();
        store.gate.add_permits(100);
        let mut codes = Vec::new();
        for task in tasks {
            let (code, _) = task.await.unwrap();
            codes.push(code);
        }
        let waited = opened.elapsed();
        let c = counters(&limiter, id);
        if fail {
            assert!(codes.iter().all(|c| *c == OVER), "failure mode Closed for all: {codes:?}");
            assert_eq!(c.failure_closed.get(), 16);
            assert!(waited < Duration::from_secs(1), "answered when the flight failed, not at the deadline");
            assert_eq!(store.reserves.load(Ordering::SeqCst), 1, "none of the waiters called");
        } else {
            assert!(codes.iter().all(|c| *c == OK), "{codes:?}");
            // The first was sized before the others came (2 hits), the next one for them all
            // (and one more may be reserved ahead as that one is half used).
            let reserves = store.reserves.load(Ordering::SeqCst);
            assert!((2..=3).contains(&reserves), "{reserves} calls for the 16");
            assert_eq!(
                (c.batches.get(), c.batch_served.get()),
                (u64::from(reserves), 16),
                "all 16 from batches"
            );
        }
    }
}

/// Hits in hand are admitted while Redis is away (they were counted), and nothing else:
/// once they are used, the rule's failure mode answers, within the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_in_hand_while_redis_is_away() {
    let mut redis = RedisServer::start();
    let store = RedisConnection::start(redis_settings(&redis)).await.unwrap();
    let id = "shop/api/away";
    let mut r = rule(id, Algorithm::SlidingWindow, 100_000, Duration::from_secs(3600));
    r.failure_mode = FailureMode::Closed;
    let settings = LimiterSettings {
        // A batch lives for its sub-window (3 min) or a horizon, whichever ends first.
        batch: BatchSettings { horizon: Duration::from_secs(10), ..BatchSettings::default() },
        deadline: Duration::from_millis(500),
        ..batch_settings(unique_prefix("away"))
    };
    let limiter = limiter(store, vec![r], settings);
    let ask = || async { limiter.should_rate_limit(&request(vec![descriptor(id, &[])], 1)).await.unwrap() };
    let c = counters(&limiter, id);
    // Until a batch is in hand (the second hit already asks for one).
    for _ in 0..100 {
        if c.batch_reserved.get() > c.batch_served.get() {
            break;
        }
        assert_eq!(ask().await.overall_code, OK);
    }
    let held = c.batch_reserved.get() - c.batch_served.get();
    assert!(held > 0, "a batch in hand");
    redis.kill();
    let (ok_before, served_before) = (c.ok.get(), c.batch_served.get());
    let mut refused = 0;
    for _ in 0..held + 5 {
        let started = Instant::now();
        match ask().await.overall_code {
            OK => {}
            _ => refused += 1,
        }
        assert!(started.elapsed() < Duration::from_millis(500) + Duration::from_millis(200));
    }
    assert_eq!(c.ok.get() - ok_before, held, "exactly the hits in hand were admitted");
    assert_eq!(c.batch_served.get() - served_before, held);
    assert_eq!((refused, c.failure_closed.get()), (5, 5), "then failure mode Closed");
}

/// A rule whose numbers change drops its batch (stranded); an unrelated change keeps it.
#[tokio::test]
async fn a_changed_rule_drops_its_batch() {
    let id = "shop/api/changed";
    let mut r = rule(id, Algorithm::FixedWindow, 100_000, Duration::from_secs(3600));
    let limiter = limiter(MemoryStore::new(), vec![r.clone()], batch_settings(unique_prefix("changed")));
    avoid_the_hours_end().await;
    for _ in 0..17 {
        limiter.should_rate_limit(&request(vec![descriptor(id, &[])], 1)).await.unwrap();
    }
    let c = counters(&limiter, id);
    let held = c.batch_reserved.get() - c.batch_served.get();
    assert!(held > 0);
    let swap = |rules: Vec<RateLimitRule>| {
        let metrics = limiter.metrics().clone();
        let config = AgentConfig { rate_limits: rules, ..Default::default() };
        limiter.rules().store(RuleSet::compile(&config, &metrics).unwrap());
        limiter.clear_cache();
    };
    swap(vec![r.clone(), rule("shop/api/other", Algorithm::TokenBucket, 5, Duration::from_secs(1))]);
    limiter.should_rate_limit(&request(vec![descriptor(id, &[])], 1)).await.unwrap();
    let c = counters(&limiter, id);
    assert_eq!(
        (c.batch_stranded.get(), c.batch_reserved.get() - c.batch_served.get()),
        (0, held - 1),
        "kept"
    );
    r.requests = 50_000;
    swap(vec![r]);
    limiter.should_rate_limit(&request(vec![descriptor(id, &[])], 1)).await.unwrap();
    let c = counters(&limiter, id);
    assert_eq!(c.batch_stranded.get(), held - 1, "reserved under the old numbers: dropped");
}

/// A sliding-window batch that ends unused is given back to its sub-window by the sweep.
#[tokio::test]
async fn the_sweep_gives_ended_batches_back() {
    let store = MemoryStore::new();
    let id = "shop/api/swept";
    let r = rule(id, Algorithm::SlidingWindow, 100_000, Duration::from_secs(3600));
    let settings = LimiterSettings {
        batch: BatchSettings { horizon: Duration::from_millis(20), ..BatchSettings::default() },
        ..batch_settings(unique_prefix("swept"))
    };
    let limiter = limiter(store, vec![r], settings);
    let c = counters(&limiter, id);
    let mut asked = 0;
    while c.batches.get() == 0 {
        limiter.should_rate_limit(&request(vec![descriptor(id, &[])], 1)).await.unwrap();
        asked += 1;
        assert!(asked < 1000, "a batch was reserved");
    }
    let held = c.batch_reserved.get() - c.batch_served.get();
    assert!(held > 0);
    wait_until("the ended batch is given back", Duration::from_secs(5), || async {
        limiter.sweep().await;
        c.batch_returned.get() == held
    })
    .await;
    assert_eq!(c.batch_stranded.get(), 0);
    // The counter holds exactly what was admitted: a full window's worth is left.
    let peek = descriptor(id, &[]);
    let mut peek = peek;
    peek.hits_addend = Some(envoy_types::pb::google::protobuf::UInt64Value { value: 0 });
    let r = limiter.should_rate_limit(&request(vec![peek], 1)).await.unwrap();
    assert_eq!(
        u64::from(r.statuses[0].limit_remaining),
        100_000 - c.batch_served.get() - (asked - c.batch_served.get())
    );
    wait_until("the idle counter is forgotten", Duration::from_secs(5), || async {
        limiter.sweep().await;
        limiter.batches().unwrap().is_empty()
    })
    .await;
}

/// The table stays within its capacity, however many counters see traffic; counters that
/// find no room take the per-request path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_is_bounded() {
    let id = "shop/api/many";
    let settings = LimiterSettings {
        batch: BatchSettings { capacity: 64, ..BatchSettings::default() },
        ..batch_settings(unique_prefix("many"))
    };
    let limiter = limiter(
        MemoryStore::new(),
        vec![rule(id, Algorithm::TokenBucket, 10, Duration::from_secs(3600))],
        settings,
    );
    for user in 0..2000 {
        let user = user.to_string();
        for _ in 0..3 {
            limiter.should_rate_limit(&request(vec![descriptor(id, &[("user", &user)])], 1)).await.unwrap();
        }
        assert!(limiter.batches().unwrap().len() <= 64);
    }
    assert_eq!(counters(&limiter, id).ok.get(), 6000, "every decision correct");
}

/// An agent that shuts down gives its batches back: the counter holds what was admitted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gives_its_batches_back_at_shutdown() {
    let redis = REDIS.get_or_init(RedisServer::start);
    let prefix = unique_prefix("shutdown");
    let id = "shop/api/shutdown";
    let (_configs, rx) =
        watch::channel(config(vec![rule(id, Algorithm::SlidingWindow, 100_000, Duration::from_secs(3600))]));
    let running = agent(redis, &prefix, "leaving", rx).await;
    let mut client = RateLimitServiceClient::connect(format!("http://{}", running.grpc)).await.unwrap();
    let mut admitted = 0u64;
    loop {
        let r = client.should_rate_limit(request(vec![descriptor(id, &[])], 1)).await.unwrap();
        assert_eq!(r.get_ref().overall_code, OK);
        admitted += 1;
        let c = counts(running.http, id).await;
        if c.held() > 0 {
            break;
        }
        assert!(admitted < 1000, "a batch in hand");
    }
    running.stop().await;
    let keys = redis.cli(&["--scan", "--pattern", &format!("{{{prefix}*")]);
    let key = keys.lines().next().unwrap();
    let fields = redis.cli(&["hvals", key]);
    let counted: u64 = fields.lines().filter_map(|l| l.trim().parse::<u64>().ok()).sum();
    assert_eq!(counted, admitted, "the counter holds what was admitted, nothing held");
}
