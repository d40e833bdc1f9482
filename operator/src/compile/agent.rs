//! The agent's share of a pod's configuration, as the `breakwater_api::agent` contract
//! defines it: one resource per pod with the scope Cluster rate limits of the Services the
//! pod backs (the agent counts each descriptor Envoy sends — rule id, Service port, match,
//! key parts — in Redis) and the LockLeases the pod may take; and one resource per shared
//! breaker of the cluster, the same for every pod (the pod may call any Service).

use std::collections::BTreeMap;

use breakwater_api::{
    LockLease,
    agent::{AgentConfig, BreakerRule, LeaseRule, RateLimitRule},
    circuit_breaker::{Breaker, WindowKind},
    rate_limit::{Algorithm, Scope},
};
use envoy_types::pb::google::protobuf::Any;
use kube::ResourceExt;

use super::{inbound::rule_id, type_url};
use crate::{inventory::ObjectName, policy::rate_limit::EffectiveLimit};

/// Calls a breaker's window must hold before its rates are judged, when `minimumCalls` is
/// unset: Resilience4j's default, capped by a Count window's size (a window of 10 calls is
/// judged at 10).
pub const DEFAULT_MINIMUM_CALLS: u32 = 100;
/// Probes a HALF_OPEN breaker admits, cluster-wide, when `halfOpenCalls` is unset
/// (Resilience4j's default).
pub const DEFAULT_HALF_OPEN_CALLS: u32 = 10;

/// The agent configuration for the limits that land on a pod (one rule per limit id) and the
/// leases it may take (sorted by id); the breakers of the cluster are resources of their own
/// ([`breaker_resource`]).
pub fn config<'a>(
    limits: impl IntoIterator<Item = &'a EffectiveLimit>,
    leases: impl IntoIterator<Item = &'a LockLease>,
) -> AgentConfig {
    let mut rules = BTreeMap::new();
    for effective in limits.into_iter().filter(|l| l.limit.scope() == Scope::Cluster) {
        let limit = &effective.limit;
        let id = rule_id(&effective.policy, limit);
        let period = limit.rate.per.to_std().unwrap_or_default();
        let algorithm = limit.algorithm();
        rules.entry(id.clone()).or_insert_with(|| RateLimitRule {
            id,
            requests: limit.rate.requests,
            period_ms: u64::try_from(period.as_millis()).unwrap_or(u64::MAX),
            burst: if algorithm == Algorithm::TokenBucket { limit.burst.unwrap_or(0) } else { 0 },
            algorithm,
            shadow: limit.shadow,
            failure_mode: effective.failure_mode,
        });
    }
    let leases: BTreeMap<String, LeaseRule> =
        leases.into_iter().filter_map(lease_rule).map(|rule| (rule.id.clone(), rule)).collect();
    AgentConfig {
        rate_limits: rules.into_values().collect(),
        leases: leases.into_values().collect(),
        breakers: Vec::new(),
    }
}

/// The breaker `id` (a Service port, [`super::outbound::breaker_id`]) as every agent runs it,
/// from the `breaker` section of the port's effective policy, which came from `policy`.
/// Durations are whole milliseconds (the duration grammar has nothing finer); evaluation
/// refuses those the agent could not run (`0s`, `policy::check`), so none is 0 here.
pub fn breaker_rule(id: String, policy: &ObjectName, breaker: &Breaker) -> BreakerRule {
    let ms = |d: &breakwater_api::Duration| {
        u64::try_from(d.to_std().unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
    };
    let window = &breaker.sliding_window;
    let (window_size, window_ms) = match window.kind {
        WindowKind::Count => (window.size.unwrap_or(0), 0),
        WindowKind::Time => (0, window.duration.as_ref().map_or(0, ms)),
    };
    let default_minimum = match window.kind {
        WindowKind::Count => DEFAULT_MINIMUM_CALLS.min(window_size),
        WindowKind::Time => DEFAULT_MINIMUM_CALLS,
    };
    BreakerRule {
        id,
        policy: policy.to_string(),
        failure_rate_threshold: breaker.failure_rate_threshold,
        slow_call_ms: breaker.slow_call.as_ref().map_or(0, |s| ms(&s.duration)),
        slow_call_rate_threshold: breaker.slow_call.as_ref().map_or(0, |s| s.rate_threshold),
        window: window.kind,
        window_size,
        window_ms,
        minimum_calls: breaker.minimum_calls.unwrap_or(default_minimum).max(1),
        open_ms: ms(&breaker.open_duration),
        half_open_calls: breaker.half_open_calls.unwrap_or(DEFAULT_HALF_OPEN_CALLS),
        fallback: breaker.fallback.unwrap_or_default(),
    }
}

/// A LockLease as the agent grants it; None for a ttl the agent could not use (refused by
/// `policy::lock_lease::assess`, so never Accepted either).
fn lease_rule(lease: &LockLease) -> Option<LeaseRule> {
    let ttl = lease.spec.ttl.to_std().ok()?;
    Some(LeaseRule {
        id: ObjectName::of(lease).to_string(),
        name: lease.name_any(),
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        holders: lease.spec.holders,
    })
}

/// The pod's ADS resource: the configuration's protobuf message, under the agent's type URL.
pub fn resource(config: &AgentConfig) -> Any {
    Any { type_url: type_url::AGENT.to_string(), value: breakwater_api::agent::encode(config) }
}

/// One breaker's ADS resource (named by its id): a resource of its own, so that a change to
/// one breaker resends that breaker alone to every agent.
pub fn breaker_resource(rule: &BreakerRule) -> Any {
    Any { type_url: type_url::BREAKER.to_string(), value: breakwater_api::agent::encode_breaker(rule) }
}
