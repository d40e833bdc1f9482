//! The example breaker (`examples/circuit-breaker-payments.yaml`) works as its comment
//! says, without a cluster: the operator compiles `examples/` and serves it over ADS; the
//! agents of two caller pods in different namespaces, on one real Redis, get the breaker of
//! Service shop/payments port 80 from it (a resource of its own, after their configuration);
//! one pod's Envoy (played by an `AccessLogService` stream) reports calls to payments, and
//! once half of at least 20 have failed, both pods' agents answer every `RateLimitService`
//! check for payments OVER_LIMIT naming the policy (Envoy's 503), and the operator's status
//! reader shows the breaker OPEN with the rate that opened it. Envoy itself does not run here;
//! the compiled listener and routes that make Envoy ask and log are checked by the compiler's
//! golden and render tests.

mod support;

use std::time::{Duration, Instant};

use breakwater_agent::StoreSettings;
use breakwater_agent::limiter::LimiterSettings;
use breakwater_agent::store::{RedisConnection, RedisSettings, RedisTopology};
use breakwater_api::agent::{BREAKER_HEADER, BREAKER_KEY, DOMAIN};
use breakwater_api::circuit_breaker::BreakerState as Shown;
use breakwater_harness::{RedisServer, unique_prefix};
use breakwater_operator::inventory::ObjectName;
use breakwater_operator::policy::breaker;
use breakwater_store::breaker::{BreakerStore, RedisBreakers};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpResponseProperties,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::google::protobuf::UInt32Value;
use support::{DEADLINE, configured, settings};

const BREAKER: &str = "shop/payments:80";
const POLICY: &str = "shop/payments";

fn calls(codes: &[u32]) -> StreamAccessLogsMessage {
    let entry = |code: u32| HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon { route_name: BREAKER.into(), ..Default::default() }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: code }),
            ..Default::default()
        }),
        ..Default::default()
    };
    StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries {
            log_entry: codes.iter().map(|c| entry(*c)).collect(),
        })),
    }
}

/// Envoy's check before a call to payments: admitted, or the policy the rejection names.
async fn check(client: &mut RateLimitServiceClient<tonic::transport::Channel>) -> Result<(), String> {
    let request = RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry { key: BREAKER_KEY.into(), value: BREAKER.into() }],
            ..Default::default()
        }],
        hits_addend: 1,
    };
    let response = client.should_rate_limit(request).await.expect("the agent answers").into_inner();
    if response.overall_code == Code::Ok as i32 {
        return Ok(());
    }
    let named = response.response_headers_to_add.iter().find(|h| h.key == BREAKER_HEADER);
    Err(named.map(|h| h.value.clone()).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_breaker_opens_for_every_caller_pod_at_half_of_twenty_calls_failed() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("flow");
    let (endpoint, _cache, inventory) = support::operator().await;
    let store = || StoreSettings::Redis(RedisSettings::new(RedisTopology::Standalone(redis.url())));
    let limiter = LimiterSettings { key_prefix: prefix.clone(), ..LimiterSettings::default() };
    let mut pods = Vec::new();
    for pod in ["shop/api-7c9f8d6b5-x2kqp", "billing/billing-worker-84c6d5f7b9-tq9vd"] {
        let agent = support::agent(
            &endpoint,
            pod,
            store(),
            breakwater_agent::Settings { limiter: limiter.clone(), ..settings() },
        )
        .await;
        configured(&agent).await;
        support::runs_breaker(&agent, BREAKER).await;
        let rls = RateLimitServiceClient::connect(format!("http://{}", agent.grpc)).await.expect("connects");
        pods.push((agent, rls));
    }
    for (_, rls) in &mut pods {
        assert_eq!(check(rls).await, Ok(()), "a fresh breaker admits");
    }

    // The api pod's Envoy logs 19 calls to payments, 10 failed: fewer than minimumCalls (20).
    let mut als =
        AccessLogServiceClient::connect(format!("http://{}", pods[0].0.grpc)).await.expect("connects");
    let (logs, stream) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let _ = als.stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(stream)).await;
    });
    logs.send(calls(&[[503; 10].as_slice(), [200; 9].as_slice()].concat())).await.expect("sent");
    let connection = RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(redis.url())))
        .await
        .expect("connects");
    let states = RedisBreakers::new(connection, prefix.clone(), Duration::from_secs(2));
    let give_up = Instant::now() + DEADLINE;
    while states.state(BREAKER).await.expect("reads").is_none_or(|s| s.calls < 19) {
        assert!(Instant::now() < give_up, "the calls never reached Redis");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(check(&mut pods[1].1).await, Ok(()), "19 calls are not judged");

    // The twentieth, failed: 11 of 20 (55%) ≥ 50% — both pods' agents refuse payments.
    logs.send(calls(&[503])).await.expect("sent");
    for (agent, rls) in &mut pods {
        let give_up = Instant::now() + DEADLINE;
        loop {
            match check(rls).await {
                Err(policy) => {
                    assert_eq!(policy, POLICY, "the rejection names the policy");
                    break;
                }
                Ok(()) => assert!(Instant::now() < give_up, "{} still admits", agent.grpc),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // What `kubectl describe circuitbreakerpolicy payments -n shop` shows of it.
    let targets = breaker::targets(&ObjectName::new("shop", "payments"), &inventory);
    let target = targets.iter().find(|t| t.id == BREAKER).expect("the policy's breaker");
    let state = states.state(BREAKER).await.expect("reads").expect("kept");
    let shown = breaker::shown(target, &state);
    assert_eq!(shown.state, Shown::Open);
    assert_eq!((shown.calls, shown.failure_rate), (20, Some(55)), "the window that opened it");
    assert!(shown.last_transition_time.is_some());
}
