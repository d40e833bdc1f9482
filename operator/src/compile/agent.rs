//! The agent's share of a pod's configuration, as the `breakwater_api::agent` contract
//! defines it: the scope Cluster rate limits of the Services the pod backs (the agent counts
//! each descriptor Envoy sends — rule id, Service port, match, key parts — in Redis), and the
//! LockLeases the pod may take.

use std::collections::BTreeMap;

use breakwater_api::{
    LockLease,
    agent::{AgentConfig, LeaseRule, RateLimitRule},
    rate_limit::{Algorithm, Scope},
};
use envoy_types::pb::google::protobuf::Any;
use kube::ResourceExt;

use super::{inbound::rule_id, type_url};
use crate::{inventory::ObjectName, policy::rate_limit::EffectiveLimit};

/// The agent configuration for the limits that land on a pod (one rule per limit id) and
/// the leases it may take (sorted by id).
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

/// The ADS resource: the configuration's protobuf message, under the agent's type URL.
pub fn resource(config: &AgentConfig) -> Any {
    Any { type_url: type_url::AGENT.to_string(), value: breakwater_api::agent::encode(config) }
}
