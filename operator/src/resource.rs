//! The four Breakwater kinds behind one type, so that evaluation, output and status writing
//! treat them alike.

use std::sync::Arc;

use breakwater_api::{CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::Resource;

use crate::{
    inventory::{Inventory, ObjectName},
    policy::{self, Assessment, lock_lease::LeaseFields},
};

#[derive(Clone, Debug)]
pub enum Policy {
    CircuitBreaker(Arc<CircuitBreakerPolicy>),
    RateLimit(Arc<RateLimitPolicy>),
    LockLease(Arc<LockLease>),
    OutboxRelay(Arc<OutboxRelay>),
}

impl Policy {
    /// Every resource of the inventory, by kind then namespace/name.
    pub fn all(inventory: &Inventory) -> Vec<Policy> {
        let mut all: Vec<Policy> = inventory
            .circuit_breakers
            .iter()
            .cloned()
            .map(Policy::CircuitBreaker)
            .chain(inventory.rate_limits.iter().cloned().map(Policy::RateLimit))
            .chain(inventory.lock_leases.iter().cloned().map(Policy::LockLease))
            .chain(inventory.outbox_relays.iter().cloned().map(Policy::OutboxRelay))
            .collect();
        all.sort_by(|a, b| (a.kind(), a.name()).cmp(&(b.kind(), b.name())));
        all
    }

    pub fn assess(&self, inventory: &Inventory) -> Assessment {
        match self {
            Self::CircuitBreaker(p) => policy::circuit_breaker::assess(p, inventory),
            Self::RateLimit(p) => policy::rate_limit::assess(p, inventory),
            Self::LockLease(p) => policy::lock_lease::assess(p),
            Self::OutboxRelay(p) => policy::outbox_relay::assess(p, inventory),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Self::CircuitBreaker(_) => "CircuitBreakerPolicy",
            Self::RateLimit(_) => "RateLimitPolicy",
            Self::LockLease(_) => "LockLease",
            Self::OutboxRelay(_) => "OutboxRelay",
        }
    }

    pub fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Self::CircuitBreaker(p) => p.meta(),
            Self::RateLimit(p) => p.meta(),
            Self::LockLease(p) => p.meta(),
            Self::OutboxRelay(p) => p.meta(),
        }
    }

    pub fn name(&self) -> ObjectName {
        ObjectName::new(
            self.meta().namespace.clone().unwrap_or_default(),
            self.meta().name.clone().unwrap_or_default(),
        )
    }

    /// The `status.targets` the resource carries now; None for kinds without it.
    pub fn targets(&self) -> Option<u32> {
        match self {
            Self::CircuitBreaker(p) => p.status.as_ref().map(|s| s.targets),
            Self::RateLimit(p) => p.status.as_ref().map(|s| s.targets),
            Self::LockLease(_) | Self::OutboxRelay(_) => None,
        }
    }

    /// The lease fields the resource carries now (LockLease only).
    pub fn lease_fields(&self) -> Option<LeaseFields> {
        match self {
            Self::LockLease(p) => Some(LeaseFields::of(p.status.as_ref())),
            _ => None,
        }
    }

    /// The conditions the resource carries now (as last written).
    pub fn conditions(&self) -> &[Condition] {
        let conditions = match self {
            Self::CircuitBreaker(p) => p.status.as_ref().map(|s| &s.conditions),
            Self::RateLimit(p) => p.status.as_ref().map(|s| &s.conditions),
            Self::LockLease(p) => p.status.as_ref().map(|s| &s.conditions),
            Self::OutboxRelay(p) => p.status.as_ref().map(|s| &s.conditions),
        };
        conditions.map(Vec::as_slice).unwrap_or_default()
    }

    /// The resource as JSON (for output), without its status.
    pub fn to_json(&self) -> serde_json::Value {
        let value = match self {
            Self::CircuitBreaker(p) => serde_json::to_value(p.as_ref()),
            Self::RateLimit(p) => serde_json::to_value(p.as_ref()),
            Self::LockLease(p) => serde_json::to_value(p.as_ref()),
            Self::OutboxRelay(p) => serde_json::to_value(p.as_ref()),
        };
        // Serializing plain derived types cannot fail; an empty object keeps output going.
        value.unwrap_or_default()
    }
}
