//! The four Breakwater kinds behind one type, [`Policy`]: the one place that says how the
//! kinds differ — how each is evaluated, what it refers to, which changes of other objects
//! concern it, what its status carries (a lease's holders, a relay's facts, the breakers'
//! state, the shadow limits' counts). The
//! controllers, standalone mode and status writing treat every kind alike through it.

use std::{fmt::Debug, sync::Arc};

use breakwater_api::{
    Attachment, CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy,
    circuit_breaker::BreakerStatus, rate_limit::ShadowStatus,
};
use k8s_openapi::{
    NamespaceResourceScope,
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta},
};
use kube::Resource;
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    inventory::{Inventory, ObjectName},
    policy::{self, Assessment, lock_lease::LeaseFields, outbox_relay::RelayFields, shadow},
};

#[derive(Clone, Debug)]
pub enum Policy {
    CircuitBreaker(Arc<CircuitBreakerPolicy>),
    RateLimit(Arc<RateLimitPolicy>),
    LockLease(Arc<LockLease>),
    OutboxRelay(Arc<OutboxRelay>),
}

/// A Breakwater kind as a controller handles it: a namespaced resource that is a [`Policy`].
/// Implemented for exactly the four kinds, below.
pub trait Kind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    fn policy(self: Arc<Self>) -> Policy;
}

/// Each kind becomes its variant; that is all a kind knows of the others.
macro_rules! kinds {
    ($($kind:ty => $variant:ident),* $(,)?) => {$(
        impl Kind for $kind {
            fn policy(self: Arc<Self>) -> Policy {
                Policy::$variant(self)
            }
        }
    )*};
}

kinds! {
    CircuitBreakerPolicy => CircuitBreaker,
    RateLimitPolicy => RateLimit,
    LockLease => LockLease,
    OutboxRelay => OutboxRelay,
}

impl Policy {
    /// Every resource of the inventory, by kind then namespace/name.
    pub fn all(inventory: &Inventory) -> Vec<Policy> {
        let mut all: Vec<Policy> = inventory
            .circuit_breakers
            .iter()
            .cloned()
            .map(Kind::policy)
            .chain(inventory.rate_limits.iter().cloned().map(Kind::policy))
            .chain(inventory.lock_leases.iter().cloned().map(Kind::policy))
            .chain(inventory.outbox_relays.iter().cloned().map(Kind::policy))
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

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            Self::CircuitBreaker(p) => p.meta(),
            Self::RateLimit(p) => p.meta(),
            Self::LockLease(p) => p.meta(),
            Self::OutboxRelay(p) => p.meta(),
        }
    }

    pub fn name(&self) -> ObjectName {
        ObjectName::new(self.namespace(), self.meta().name.clone().unwrap_or_default())
    }

    fn namespace(&self) -> &str {
        self.meta().namespace.as_deref().unwrap_or_default()
    }

    /// How the resource attaches to Services; None for kinds that attach to none.
    fn attachment(&self) -> Option<&dyn Attachment> {
        match self {
            Self::CircuitBreaker(p) => Some(&p.spec),
            Self::RateLimit(p) => Some(&p.spec),
            Self::LockLease(_) | Self::OutboxRelay(_) => None,
        }
    }

    /// Whether a change of `service` may change this resource's outcome: it names the
    /// Service in its namespace, or it selects Services from the root namespace.
    pub fn may_target(&self, service: &ObjectName, root_namespace: &str) -> bool {
        let Some(attachment) = self.attachment() else { return false };
        let namespace = self.namespace();
        (namespace == root_namespace && attachment.namespace_selector().is_some())
            || (namespace == service.namespace
                && attachment.target_refs().iter().any(|t| t.name == service.name))
    }

    /// Whether a change of a Namespace's labels may change this resource's outcome: only the
    /// root namespace's Service policies select by namespace labels.
    pub fn follows_namespace_labels(&self, root_namespace: &str) -> bool {
        self.attachment().is_some() && self.namespace() == root_namespace
    }

    /// Whether a change of `other`, of the same kind, may change this resource's outcome.
    /// Service policies influence each other: root policies merge into every namespace, and
    /// namespace policies on one Service conflict or shadow a root Default.
    pub fn follows(&self, other: &Policy, root_namespace: &str) -> bool {
        let (namespace, other_namespace) = (self.namespace(), other.namespace());
        self.kind() == other.kind()
            && self.attachment().is_some()
            && (namespace != other_namespace || self.meta().name != other.meta().name)
            && (namespace == root_namespace
                || other_namespace == root_namespace
                || other_namespace == namespace)
    }

    /// The Secret whose keys evaluation needs, if any.
    pub fn secret(&self) -> Option<ObjectName> {
        match self {
            Self::OutboxRelay(relay) => {
                let name = &relay.spec.source.postgres.connection_secret_ref.name;
                Some(ObjectName::new(self.namespace(), name))
            }
            _ => None,
        }
    }

    /// The lease whose holders the status shows: a LockLease's own.
    pub fn lease(&self) -> Option<&LockLease> {
        match self {
            Self::LockLease(lease) => Some(lease),
            _ => None,
        }
    }

    /// The relay whose Deployment and facts the status shows: an OutboxRelay's own.
    pub fn relay(&self) -> Option<&OutboxRelay> {
        match self {
            Self::OutboxRelay(relay) => Some(relay),
            _ => None,
        }
    }

    /// The CircuitBreakerPolicy whose status shows the state of its shared breakers: one with
    /// a `breaker` section.
    pub fn breaker_section(&self) -> Option<&CircuitBreakerPolicy> {
        match self {
            Self::CircuitBreaker(policy) if policy.spec.breaker.is_some() => Some(policy),
            _ => None,
        }
    }

    /// The RateLimitPolicy whose status shows what its shadow limits would have rejected:
    /// one with a shadow limit of scope Cluster (counted in Redis).
    pub fn shadow_limits(&self) -> Option<&RateLimitPolicy> {
        match self {
            Self::RateLimit(policy) if shadow::has_shadow_limits(&policy.spec) => Some(policy),
            _ => None,
        }
    }

    /// The `status.breakers` the resource carries now (empty for other kinds).
    pub fn breakers(&self) -> &[BreakerStatus] {
        match self {
            Self::CircuitBreaker(p) => p.status.as_ref().map(|s| s.breakers.as_slice()).unwrap_or_default(),
            _ => &[],
        }
    }

    /// The `status.shadow` the resource carries now (empty for other kinds).
    pub fn shadow(&self) -> &[ShadowStatus] {
        match self {
            Self::RateLimit(p) => p.status.as_ref().map(|s| s.shadow.as_slice()).unwrap_or_default(),
            _ => &[],
        }
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
        self.lease().map(|lease| LeaseFields::of(lease.status.as_ref()))
    }

    /// The relay fields the resource carries now (OutboxRelay only).
    pub fn relay_fields(&self) -> Option<RelayFields> {
        self.relay().map(|relay| RelayFields::of(relay.status.as_ref()))
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ROOT: &str = "breakwater-system";

    fn rate_limit(namespace: &str, name: &str, attach: serde_json::Value) -> Policy {
        let mut spec = json!({"limits": [{"name": "all", "rate": {"requests": 1, "per": "1s"}}]});
        spec.as_object_mut().expect("object").extend(attach.as_object().expect("object").clone());
        let policy: RateLimitPolicy = serde_json::from_value(json!({
            "apiVersion": "breakwater.dev/v1alpha1",
            "kind": "RateLimitPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }))
        .expect("a RateLimitPolicy");
        Arc::new(policy).policy()
    }

    fn lease(namespace: &str, name: &str) -> Policy {
        let lease: LockLease = serde_json::from_value(json!({
            "apiVersion": "breakwater.dev/v1alpha1",
            "kind": "LockLease",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"ttl": "30s", "podSelector": {}},
        }))
        .expect("a LockLease");
        Arc::new(lease).policy()
    }

    #[test]
    fn which_changes_concern_a_policy() {
        let api = ObjectName::new("shop", "api");
        let targeting = rate_limit("shop", "p", json!({"targetRefs": [{"kind": "Service", "name": "api"}]}));
        let root = rate_limit(ROOT, "floor", json!({"namespaceSelector": {}, "mode": "Override"}));
        let elsewhere = rate_limit("lab", "p", json!({"targetRefs": [{"kind": "Service", "name": "api"}]}));
        assert!(targeting.may_target(&api, ROOT) && root.may_target(&api, ROOT));
        assert!(!elsewhere.may_target(&api, ROOT), "targetRefs name Services of the policy's namespace");
        assert!(root.follows_namespace_labels(ROOT) && !targeting.follows_namespace_labels(ROOT));
        // A root policy concerns every namespace; namespace policies concern their own.
        assert!(targeting.follows(&root, ROOT) && root.follows(&targeting, ROOT));
        assert!(!targeting.follows(&elsewhere, ROOT), "lab/p is another policy, in another namespace");
        assert!(!targeting.follows(&targeting, ROOT), "a change of itself triggers it anyway");
        // Leases attach to no Service and follow nothing.
        let lock = lease("shop", "lock");
        assert!(!lock.may_target(&api, ROOT) && !lock.follows(&lease("shop", "other"), ROOT));
        assert_eq!((lock.lease().is_some(), targeting.lease().is_some()), (true, false));
        assert_eq!(lock.secret(), None);
        assert!(lock.relay().is_none() && lock.relay_fields().is_none());
    }
}
