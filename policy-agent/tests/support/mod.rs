//! Agent test helpers: requests, rules and limiters, and the whole agent on loopback
//! ([`Running`]). The Redis harness (servers, clusters, free ports, unique key prefixes) is
//! the workspace's `breakwater-harness`, re-exported.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use breakwater_agent::batch::BatchSettings;
use breakwater_agent::config::{RuleHolder, RuleSet};
use breakwater_agent::limiter::{Limiter, LimiterSettings};
use breakwater_agent::metrics::Metrics;
use breakwater_agent::store::CounterStore;
use breakwater_agent::{Listeners, Settings};
use breakwater_api::agent::{AgentConfig, DOMAIN, LIMIT_KEY, RateLimitRule};
use breakwater_api::rate_limit::{Algorithm, FailureMode};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use tokio::sync::oneshot;

pub use breakwater_harness::*;

pub fn rule(id: &str, algorithm: Algorithm, requests: u32, period: Duration) -> RateLimitRule {
    RateLimitRule {
        id: id.into(),
        requests,
        period_ms: period.as_millis() as u64,
        burst: 0,
        algorithm,
        shadow: false,
        failure_mode: FailureMode::Open,
    }
}

pub fn limiter<S: CounterStore>(
    store: S,
    rules: Vec<RateLimitRule>,
    settings: LimiterSettings,
) -> Arc<Limiter<S>> {
    let metrics = Arc::new(Metrics::default());
    let holder = Arc::new(RuleHolder::default());
    holder.store(
        RuleSet::compile(&AgentConfig { rate_limits: rules, ..Default::default() }, &metrics)
            .expect("valid rules"),
    );
    Arc::new(Limiter::new(store, holder, metrics, settings))
}

/// Settings for exactness tests: a deadline no debug build on a busy machine misses; one
/// script call per decision (`--quota-batch 1`).
pub fn exact_settings(prefix: String) -> LimiterSettings {
    LimiterSettings {
        deadline: Duration::from_secs(5),
        key_prefix: prefix,
        cache_capacity: 1024,
        batch: BatchSettings::off(),
    }
}

/// [`exact_settings`] with quota batches as the flags' defaults set them.
pub fn batch_settings(prefix: String) -> LimiterSettings {
    LimiterSettings { batch: BatchSettings::default(), ..exact_settings(prefix) }
}

pub fn descriptor(rule: &str, parts: &[(&str, &str)]) -> RateLimitDescriptor {
    let mut entries = vec![Entry { key: LIMIT_KEY.into(), value: rule.into() }];
    entries.extend(parts.iter().map(|(k, v)| Entry { key: (*k).into(), value: (*v).into() }));
    RateLimitDescriptor { entries, ..Default::default() }
}

pub fn request(descriptors: Vec<RateLimitDescriptor>, hits: u32) -> RateLimitRequest {
    RateLimitRequest { domain: DOMAIN.into(), descriptors, hits_addend: hits }
}

pub fn header<'a>(
    response: &'a envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse,
    name: &str,
) -> Option<&'a str> {
    response.response_headers_to_add.iter().find(|h| h.key == name).map(|h| h.value.as_str())
}

/// The whole agent (`breakwater_agent::run`) on loopback ports chosen by the system.
pub struct Running {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub lease: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<breakwater_agent::Result<()>>,
}

impl Running {
    pub async fn start(settings: Settings) -> Running {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let listeners = Listeners::bind(loopback, loopback, loopback).await.expect("bind");
        let addr = |l: &tokio::net::TcpListener| l.local_addr().expect("addr");
        let (grpc, http, lease) = (addr(&listeners.grpc), addr(&listeners.http), addr(&listeners.lease));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(breakwater_agent::run(listeners, settings, async move {
            let _ = stopped.await;
        }));
        Running { grpc, http, lease, stop: Some(stop), task }
    }

    /// Shuts the agent down and waits until it has drained, cleanly.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("drains")
            .expect("the agent's task")
            .expect("clean exit");
    }
}
