//! The shared breaker across agents: two whole agents (`breakwater_agent::run`) on one real
//! Redis, fed real gRPC access-log streams (Envoy's `AccessLogService` protos) and asked
//! over real gRPC (Envoy's `RateLimitService`), as each pod's Envoy would. And the other
//! live fact agents share the same way: what shadow-mode limits would have rejected.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use breakwater_agent::breaker::BreakerSettings;
use breakwater_agent::source::ConfigSource;
use breakwater_agent::store::{RedisConnection, RedisSettings, RedisTopology};
use breakwater_agent::{Settings, StoreSettings};
use breakwater_api::agent::{AgentConfig, BREAKER_HEADER, BREAKER_KEY, BreakerRule, DOMAIN};
use breakwater_api::circuit_breaker::BreakerFallback;
use breakwater_api::circuit_breaker::WindowKind;
use breakwater_api::rate_limit::Algorithm;
use breakwater_store::breaker::{BreakerState, BreakerStore, RedisBreakers, State};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties, ResponseFlags,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::{Duration as PbDuration, UInt32Value};
use support::*;
use tokio::sync::{mpsc, watch};
use tonic::transport::Channel;

const ID: &str = "shop/payments:8080";
const POLICY: &str = "shop/payments";
/// Generous for a debug build on a loaded two-core machine; every wait is on a condition.
const WAIT: Duration = Duration::from_secs(10);

fn rule(id: &str) -> BreakerRule {
    BreakerRule {
        id: id.into(),
        policy: POLICY.into(),
        failure_rate_threshold: 50,
        slow_call_ms: 0,
        slow_call_rate_threshold: 0,
        window: WindowKind::Count,
        window_size: 10,
        window_ms: 0,
        minimum_calls: 10,
        open_ms: 2_000,
        half_open_calls: 3,
        fallback: BreakerFallback::Admit,
    }
}

fn config(breakers: Vec<BreakerRule>) -> Option<AgentConfig> {
    Some(AgentConfig { breakers, ..Default::default() })
}

fn redis_settings(server: &RedisServer) -> RedisSettings {
    let mut settings = RedisSettings::new(RedisTopology::Standalone(server.url()));
    settings.probe_interval = Duration::from_millis(100);
    settings.connect_timeout = Duration::from_millis(200);
    settings
}

/// One pod's agent with its Envoy's two streams: access logs in, decisions out.
struct Pod {
    agent: Running,
    logs: mpsc::Sender<StreamAccessLogsMessage>,
    rls: RateLimitServiceClient<Channel>,
}

impl Pod {
    async fn start(redis: &RedisServer, prefix: &str, configs: watch::Receiver<Option<AgentConfig>>) -> Pod {
        Pod::start_with(redis, prefix, configs, Duration::from_secs(10)).await
    }

    async fn start_with(
        redis: &RedisServer,
        prefix: &str,
        configs: watch::Receiver<Option<AgentConfig>>,
        hold: Duration,
    ) -> Pod {
        let agent = Running::start(Settings {
            pod: format!("shop/caller-{}", free_port()),
            config: ConfigSource::Channel(configs),
            store: StoreSettings::Redis(redis_settings(redis)),
            limiter: breakwater_agent::limiter::LimiterSettings {
                key_prefix: prefix.into(),
                deadline: Duration::from_millis(500),
                ..Default::default()
            },
            leases: Default::default(),
            breakers: BreakerSettings {
                flush_interval: Duration::from_millis(20),
                deadline: Duration::from_millis(500),
                hold,
                ..BreakerSettings::default()
            },
        })
        .await;
        // Ready: the configuration is in force and Redis answers.
        let readyz = format!("http://{}/readyz", agent.http);
        let deadline = Instant::now() + WAIT;
        while !reqwest::get(&readyz).await.is_ok_and(|r| r.status().is_success()) {
            assert!(Instant::now() < deadline, "the agent never became ready");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let endpoint = format!("http://{}", agent.grpc);
        let mut als = AccessLogServiceClient::connect(endpoint.clone()).await.unwrap();
        let (logs, entries) = mpsc::channel(64);
        tokio::spawn(async move {
            let _ = als.stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(entries)).await;
        });
        let rls = RateLimitServiceClient::connect(endpoint).await.unwrap();
        Pod { agent, logs, rls }
    }

    /// Envoy logging `calls` on the breaker route `id`.
    async fn log(&self, id: &str, calls: &[Call]) {
        let entries = calls.iter().map(|call| call.entry(id)).collect();
        let message = StreamAccessLogsMessage {
            identifier: None,
            log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: entries })),
        };
        self.logs.send(message).await.unwrap();
    }

    async fn ask(&mut self, id: &str) -> RateLimitResponse {
        let request = RateLimitRequest {
            domain: DOMAIN.into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry { key: BREAKER_KEY.into(), value: id.into() }],
                ..Default::default()
            }],
            hits_addend: 1,
        };
        self.rls.should_rate_limit(request).await.unwrap().into_inner()
    }

    async fn admits(&mut self, id: &str) -> bool {
        let response = self.ask(id).await;
        let admitted = response.overall_code == Code::Ok as i32;
        if !admitted {
            let header = response.response_headers_to_add.iter().find(|h| h.key == BREAKER_HEADER);
            assert_eq!(header.map(|h| h.value.as_str()), Some(POLICY), "a rejection names the policy");
        }
        admitted
    }

    async fn wait_for(&mut self, id: &str, admitted: bool, what: &str) {
        let deadline = Instant::now() + WAIT;
        while self.admits(id).await != admitted {
            assert!(
                Instant::now() < deadline,
                "{what}: still not {}",
                if admitted { "admitting" } else { "rejecting" }
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[derive(Clone, Copy)]
enum Call {
    Ok,
    Failed,
    Slow,
    /// Refused by Envoy itself (the breaker's own 503): not a call to the target.
    RateLimited,
}

impl Call {
    fn entry(self, route: &str) -> HttpAccessLogEntry {
        let (code, millis, flags) = match self {
            Call::Ok => (200, 3, ResponseFlags::default()),
            Call::Failed => (503, 3, ResponseFlags::default()),
            Call::Slow => (200, 900, ResponseFlags::default()),
            Call::RateLimited => (503, 0, ResponseFlags { rate_limited: true, ..Default::default() }),
        };
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon {
                route_name: route.into(),
                response_flags: Some(flags),
                duration: Some(PbDuration { seconds: 0, nanos: millis * 1_000_000 }),
                ..Default::default()
            }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: code }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

async fn store(redis: &RedisServer, prefix: &str) -> RedisBreakers {
    let connection = RedisConnection::start(redis_settings(redis)).await.unwrap();
    RedisBreakers::new(connection, prefix, Duration::from_secs(2))
}

async fn wait_state(
    store: &RedisBreakers,
    id: &str,
    what: &str,
    done: impl Fn(&BreakerState) -> bool,
) -> BreakerState {
    let deadline = Instant::now() + WAIT;
    loop {
        let state = store.state(id).await.unwrap().unwrap_or_default();
        if done(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "{what}: the store still holds {state:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_seen_by_one_agent_open_the_breaker_for_all_and_probes_are_counted_across_them() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("breaker");
    let (configs, rx) = watch::channel(config(vec![rule(ID)]));
    let (mut a, mut b) =
        (Pod::start(&redis, &prefix, rx.clone()).await, Pod::start(&redis, &prefix, rx).await);
    let store = store(&redis, &prefix).await;
    a.wait_for(ID, true, "a fresh breaker").await;

    // Below minimumCalls nothing is judged, whatever the failures; Envoy's own refusals
    // are not calls at all.
    a.log(ID, &[Call::Failed; 5]).await;
    a.log(ID, &[Call::RateLimited; 20]).await;
    a.log(ID, &[Call::Ok; 4]).await;
    let state = wait_state(&store, ID, "nine calls counted", |s| s.calls == 9).await;
    assert_eq!((state.state, state.failures), (State::Closed, 5));
    assert!(b.admits(ID).await, "9 calls < minimumCalls 10");

    // The tenth call, a failure through agent A: 6 of 10 failed, the breaker opens, and B
    // (which saw nothing) answers OPEN, naming the policy.
    a.log(ID, &[Call::Failed]).await;
    b.wait_for(ID, false, "B after A's failures crossed the threshold").await;
    assert!(!a.admits(ID).await);
    let opened = store.state(ID).await.unwrap().unwrap();
    assert_eq!(opened.state, State::Open);

    // After openDuration, both agents ask for probes at once: exactly halfOpenCalls are
    // admitted across the two, and the rest rejected.
    let started = Instant::now();
    let mut admitted = 0;
    let mut first_admission = None;
    while first_admission.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(500)) {
        assert!(started.elapsed() < WAIT, "no probe admitted");
        let (x, y) = tokio::join!(a.admits(ID), b.admits(ID));
        let n = usize::from(x) + usize::from(y);
        if n > 0 && first_admission.is_none() {
            first_admission = Some(Instant::now());
        }
        admitted += n;
    }
    assert_eq!(admitted, 3, "halfOpenCalls probes across both agents");
    let half = store.state(ID).await.unwrap().unwrap();
    assert_eq!((half.state, half.probes_granted), (State::HalfOpen, 3));

    // Two probes succeed through A, one through B: the breaker closes for everyone.
    a.log(ID, &[Call::Ok; 2]).await;
    b.log(ID, &[Call::Ok]).await;
    a.wait_for(ID, true, "A after the probes succeeded").await;
    b.wait_for(ID, true, "B after the probes succeeded").await;
    let closed = store.state(ID).await.unwrap().unwrap();
    assert_eq!((closed.state, closed.calls), (State::Closed, 0), "closing starts a fresh window");
    assert_eq!(closed.generation, opened.generation + 2, "OPEN → HALF_OPEN → CLOSED");

    // Open again; this time a probe fails and the breaker reopens.
    a.log(ID, &[Call::Failed; 10]).await;
    b.wait_for(ID, false, "B after the second burst of failures").await;
    let deadline = Instant::now() + WAIT;
    while !b.admits(ID).await {
        assert!(Instant::now() < deadline, "no probe the second time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    b.log(ID, &[Call::Failed]).await;
    let reopened = wait_state(&store, ID, "a failed probe", |s| {
        s.state == State::Open && s.generation > closed.generation + 2
    })
    .await;
    assert_eq!(reopened.generation, closed.generation + 3, "CLOSED → OPEN → HALF_OPEN → OPEN");
    a.wait_for(ID, false, "A after the failed probe").await;
    drop(configs);
    a.agent.stop().await;
    b.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_open_a_time_window_breaker() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("breaker-slow");
    let mut slow = rule(ID);
    slow.window = WindowKind::Time;
    slow.window_size = 0;
    slow.window_ms = 60_000;
    slow.minimum_calls = 5;
    slow.failure_rate_threshold = 100;
    slow.slow_call_ms = 500;
    slow.slow_call_rate_threshold = 60;
    let (_configs, rx) = watch::channel(config(vec![slow]));
    let mut a = Pod::start(&redis, &prefix, rx).await;
    a.wait_for(ID, true, "a fresh breaker").await;
    a.log(ID, &[Call::Slow, Call::Slow, Call::Ok, Call::Ok]).await;
    let store = store(&redis, &prefix).await;
    wait_state(&store, ID, "four calls", |s| s.calls == 4).await;
    assert!(a.admits(ID).await, "4 calls < minimumCalls 5");
    // 3 of 5 slow = 60%: opens (no call failed).
    a.log(ID, &[Call::Slow]).await;
    a.wait_for(ID, false, "60% slow calls").await;
    a.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_threshold_applies_without_a_restart_and_a_removed_breaker_admits() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("breaker-reload");
    let mut lenient = rule(ID);
    lenient.failure_rate_threshold = 100;
    let (configs, rx) = watch::channel(config(vec![lenient]));
    let mut a = Pod::start(&redis, &prefix, rx).await;
    let store = store(&redis, &prefix).await;
    a.wait_for(ID, true, "a fresh breaker").await;
    a.log(
        ID,
        &[
            Call::Failed,
            Call::Ok,
            Call::Failed,
            Call::Ok,
            Call::Failed,
            Call::Ok,
            Call::Failed,
            Call::Ok,
            Call::Failed,
        ],
    )
    .await;
    wait_state(&store, ID, "nine calls", |s| s.calls == 9).await;
    a.log(ID, &[Call::Ok]).await;
    wait_state(&store, ID, "ten calls", |s| s.calls == 10).await;
    assert!(a.admits(ID).await, "50% failures under a 100% threshold");

    // The same window judged by the new threshold at the next report.
    configs.send(config(vec![rule(ID)])).unwrap();
    let deadline = Instant::now() + WAIT;
    while a.admits(ID).await {
        assert!(Instant::now() < deadline, "the new threshold never applied");
        a.log(ID, &[Call::Failed]).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert_eq!(store.state(ID).await.unwrap().unwrap().state, State::Open);

    // A breaker removed from the configuration no longer rejects anything.
    configs.send(config(vec![])).unwrap();
    a.wait_for(ID, true, "the breaker removed").await;
    a.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_away_keeps_the_last_state_for_the_hold_then_each_policy_falls_back() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("breaker-down");
    const REJECTING: &str = "shop/ledger:8080";
    let mut reject = rule(REJECTING);
    reject.fallback = BreakerFallback::Reject;
    let (_configs, rx) = watch::channel(config(vec![rule(ID), reject]));
    let hold = Duration::from_secs(1);
    let mut a = Pod::start_with(&redis, &prefix, rx, hold).await;
    a.wait_for(ID, true, "a fresh breaker").await;
    a.wait_for(REJECTING, true, "a fresh breaker").await;
    a.log(ID, &[Call::Failed; 10]).await;
    a.wait_for(ID, false, "opened").await;

    redis.kill();
    let killed = Instant::now();
    // Within the hold, the last known states: OPEN rejects, CLOSED admits.
    assert!(!a.admits(ID).await);
    assert!(a.admits(REJECTING).await);
    assert!(killed.elapsed() < hold, "the checks above must run within the hold");
    // After it, each policy's fallback; no answer ever waits long.
    let deadline = Instant::now() + WAIT;
    loop {
        let asked = Instant::now();
        let (id, rejecting) = (a.admits(ID).await, a.admits(REJECTING).await);
        assert!(asked.elapsed() < Duration::from_secs(2), "an answer took {:?}", asked.elapsed());
        if id && !rejecting {
            break;
        }
        assert!(Instant::now() < deadline, "no fallback: {id} {rejecting}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(killed.elapsed() >= hold, "fell back after {:?}, before the hold", killed.elapsed());

    // Redis back (empty: it kept nothing): both breakers follow its state again, CLOSED.
    redis.restart();
    a.wait_for(REJECTING, true, "Redis back").await;
    assert!(a.admits(ID).await);
    a.agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_rejections_of_every_agent_add_up_in_redis() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("shadow");
    let mut limit =
        support::rule("shop/api/per-minute", Algorithm::FixedWindow, 2, Duration::from_secs(3600));
    limit.shadow = true;
    let shadowed = Some(AgentConfig { rate_limits: vec![limit], ..Default::default() });
    let (_configs, rx) = watch::channel(shadowed);
    let (mut a, mut b) =
        (Pod::start(&redis, &prefix, rx.clone()).await, Pod::start(&redis, &prefix, rx).await);
    // Ten requests on one shared counter with a limit of two: all admitted (shadow mode),
    // eight would have been rejected, whichever agent answered them.
    for pod in [&mut a, &mut b] {
        for _ in 0..5 {
            let response = pod
                .rls
                .should_rate_limit(support::request(vec![descriptor("shop/api/per-minute", &[])], 1))
                .await
                .unwrap();
            assert_eq!(response.get_ref().overall_code, Code::Ok as i32);
        }
    }
    let key = breakwater_store::shadow::shadow_key(&prefix, "shop/api/per-minute");
    let deadline = Instant::now() + WAIT;
    loop {
        let counted: u64 =
            redis.cli(&["HVALS", &key]).split_whitespace().filter_map(|n| n.parse::<u64>().ok()).sum();
        if counted == 8 {
            break;
        }
        assert!(counted < 8, "counted {counted} would-be rejections, at most 8 happened");
        assert!(Instant::now() < deadline, "Redis holds {counted} of 8 would-be rejections");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    a.agent.stop().await;
    b.agent.stop().await;
}
