//! The gRPC service: called directly through the tonic trait (no socket), then over a
//! loopback socket with the `envoy-types` client against the whole agent (`serve`/`run`),
//! with its HTTP endpoints and configuration reloads.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use breakwater_agent::grpc::RateLimitGrpc;
use breakwater_agent::limiter::LimiterSettings;
use breakwater_agent::source::ConfigSource;
use breakwater_agent::store::{MemoryStore, RedisSettings, RedisTopology};
use breakwater_agent::{Settings, StoreSettings};
use breakwater_api::agent::AgentConfig;
use breakwater_api::rate_limit::Algorithm;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

const OK: i32 = Code::Ok as i32;
const OVER: i32 = Code::OverLimit as i32;

#[tokio::test]
async fn the_service_answers_through_its_trait() {
    let limiter = limiter(
        MemoryStore::new(),
        vec![rule("shop/api/direct", Algorithm::FixedWindow, 2, Duration::from_secs(3600))],
        exact_settings(unique_prefix("direct")),
    );
    let service = RateLimitGrpc::new(limiter);
    let call = |req| service.should_rate_limit(tonic::Request::new(req));
    let mut codes = Vec::new();
    for _ in 0..3 {
        let response = call(request(vec![descriptor("shop/api/direct", &[("user", "a")])], 1)).await.unwrap();
        codes.push(response.get_ref().overall_code);
    }
    // The first two may straddle a window edge only if the test runs across the hour.
    assert_eq!(codes[2], OVER, "{codes:?}");
    let mut empty = request(vec![], 1);
    empty.domain.clear();
    assert_eq!(call(empty).await.unwrap_err().code(), tonic::Code::InvalidArgument);
}

#[tokio::test]
async fn without_configuration_the_service_is_unavailable() {
    let limiter = std::sync::Arc::new(breakwater_agent::limiter::Limiter::new(
        MemoryStore::new(),
        Default::default(),
        Default::default(),
        LimiterSettings::default(),
    ));
    let status = RateLimitGrpc::new(limiter)
        .should_rate_limit(tonic::Request::new(request(vec![descriptor("x", &[])], 1)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "Envoy then applies its failure_mode_deny");
}

async fn rls_client(agent: &Running) -> RateLimitServiceClient<tonic::transport::Channel> {
    RateLimitServiceClient::connect(format!("http://{}", agent.grpc)).await.expect("connects")
}

async fn start(settings: Settings) -> Running {
    Running::start(settings).await
}

/// A bare HTTP/1.1 GET: (status, body).
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let status = raw.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_loopback_with_config_pushed_on_a_channel() {
    let (config_tx, config_rx) = watch::channel(None);
    let agent = start(Settings {
        pod: "shop/api-0".into(),
        config: ConfigSource::Channel(config_rx),
        store: StoreSettings::Memory,
        limiter: exact_settings(unique_prefix("loopback")),
        leases: Default::default(),
        breakers: Default::default(),
    })
    .await;
    wait_until("healthz", Duration::from_secs(5), || async { get(agent.http, "/healthz").await.0 == 200 })
        .await;
    let (status, body) = get(agent.http, "/readyz").await;
    assert_eq!((status, body.as_str()), (503, "not ready: no configuration yet\n"));
    let mut client = rls_client(&agent).await;
    let early =
        client.should_rate_limit(request(vec![descriptor("shop/api/wire", &[])], 1)).await.unwrap_err();
    assert_eq!(early.code(), tonic::Code::Unavailable);

    config_tx
        .send(Some(AgentConfig {
            rate_limits: vec![rule("shop/api/wire", Algorithm::TokenBucket, 3, Duration::from_secs(60))],
            ..Default::default()
        }))
        .unwrap();
    wait_until("ready", Duration::from_secs(5), || async { get(agent.http, "/readyz").await.0 == 200 }).await;

    let mut codes = Vec::new();
    for _ in 0..5 {
        let r = client
            .should_rate_limit(request(vec![descriptor("shop/api/wire", &[("u", "1")])], 1))
            .await
            .unwrap();
        codes.push(r.into_inner().overall_code);
    }
    assert_eq!(codes, vec![OK, OK, OK, OVER, OVER]);
    let last = client
        .should_rate_limit(request(vec![descriptor("shop/api/wire", &[("u", "1")])], 1))
        .await
        .unwrap()
        .into_inner();
    let headers: Vec<(&str, &str)> =
        last.response_headers_to_add.iter().map(|h| (h.key.as_str(), h.value.as_str())).collect();
    assert_eq!(
        headers,
        vec![
            ("x-ratelimit-limit", "3, 3;w=60"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "60"),
            ("retry-after", "20"),
        ]
    );

    // A new configuration swaps in atomically and clears the over-limit cache (which holds
    // this very counter for another 20 s): a burst of 10 makes room at once.
    let mut raised = rule("shop/api/wire", Algorithm::TokenBucket, 3, Duration::from_secs(60));
    raised.burst = 10;
    config_tx.send(Some(AgentConfig { rate_limits: vec![raised], ..Default::default() })).unwrap();
    let mut client2 = client.clone();
    wait_until("the raised limit is in force", Duration::from_secs(5), || {
        let mut c = client2.clone();
        async move {
            let r = c
                .should_rate_limit(request(vec![descriptor("shop/api/wire", &[("u", "1")])], 1))
                .await
                .unwrap();
            r.into_inner().overall_code == OK
        }
    })
    .await;
    let _ = client2.should_rate_limit(request(vec![descriptor("shop/api/wire", &[])], 1)).await.unwrap();

    let (status, metrics) = get(agent.http, "/metrics").await;
    assert_eq!(status, 200);
    for needle in [
        "breakwater_agent_rate_limit_decisions_total{rule=\"shop/api/wire\",result=\"ok\"}",
        "breakwater_agent_rate_limit_decisions_total{rule=\"shop/api/wire\",result=\"over_limit_cached\"}",
        "breakwater_agent_config_reloads_total{reason=\"applied\"} 2",
        "breakwater_agent_config_rules 1",
        "breakwater_agent_rate_limit_request_duration_seconds_bucket",
        "breakwater_agent_store_up 1",
    ] {
        assert!(metrics.contains(needle), "{needle} missing from\n{metrics}");
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_on_redis_with_a_config_file_that_changes() {
    let server = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.yaml");
    let write = |requests: u32| {
        std::fs::write(
            &path,
            format!(
                "rateLimits:\n- id: shop/api/file\n  requests: {requests}\n  periodMs: 60000\n  algorithm: SlidingWindow\n  failureMode: Closed\n"
            ),
        )
        .unwrap()
    };
    write(2);
    let mut redis = RedisSettings::new(RedisTopology::Standalone(server.url()));
    redis.connections = 2;
    let agent = start(Settings {
        pod: "shop/api-0".into(),
        config: ConfigSource::File { path: path.clone(), poll: Duration::from_millis(20) },
        store: StoreSettings::Redis(redis),
        limiter: exact_settings(unique_prefix("file")),
        leases: Default::default(),
        breakers: Default::default(),
    })
    .await;
    wait_until("ready", Duration::from_secs(5), || async { get(agent.http, "/readyz").await.0 == 200 }).await;
    let mut client = rls_client(&agent).await;
    let ask = || {
        let mut c = client.clone();
        async move {
            c.should_rate_limit(request(vec![descriptor("shop/api/file", &[("k", "v")])], 1))
                .await
                .unwrap()
                .into_inner()
                .overall_code
        }
    };
    assert_eq!((ask().await, ask().await, ask().await), (OK, OK, OVER));

    // A broken file is refused; the rules in force stay.
    std::fs::write(&path, "rateLimits: [{id: broken}]\n").unwrap();
    wait_until("the broken file is noticed", Duration::from_secs(5), || async {
        get(agent.http, "/metrics")
            .await
            .1
            .contains("breakwater_agent_config_reloads_total{reason=\"rejected\"} 1")
    })
    .await;
    assert_eq!(ask().await, OVER);
    assert_eq!(get(agent.http, "/readyz").await.0, 200);

    write(4);
    wait_until("the new file is in force", Duration::from_secs(5), || async { ask().await == OK }).await;
    assert_eq!(ask().await, OK);
    assert_eq!(ask().await, OVER, "4 in the window: 2 + 2");

    // Redis gone: the Closed rule rejects and the agent is not ready.
    drop(server);
    wait_until("not ready without Redis", Duration::from_secs(5), || async {
        get(agent.http, "/readyz").await.0 == 503
    })
    .await;
    client = rls_client(&agent).await;
    let r = client.should_rate_limit(request(vec![descriptor("shop/api/file", &[("k", "other")])], 1)).await;
    assert_eq!(r.unwrap().into_inner().overall_code, OVER);
    agent.stop().await;
}

#[test]
fn the_binary_refuses_a_missing_configuration() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .args([
            "--config",
            "/nonexistent/agent.yaml",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("error: cannot read /nonexistent/agent.yaml"), "{stderr}");
}
