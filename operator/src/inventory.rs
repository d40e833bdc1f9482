//! A read-only view of everything policy evaluation looks at: Services, namespace labels,
//! Secret keys and the policies themselves. The controllers fill it from their reflector
//! stores, standalone mode from files; evaluation never knows which.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use breakwater_api::{CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy};
use k8s_openapi::api::{
    core::v1::{Pod, Secret, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;

/// A namespaced name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl ObjectName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self { namespace: namespace.into(), name: name.into() }
    }

    pub fn of<K: kube::Resource>(object: &K) -> Self {
        Self::new(object.namespace().unwrap_or_default(), object.name_any())
    }
}

impl std::fmt::Display for ObjectName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One port of a Service: the unit policies attach to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePort {
    pub service: ObjectName,
    /// The port's name, or its number when the port has no name.
    pub port: String,
}

impl std::fmt::Display for ServicePort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.service, self.port)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Policies here may select other namespaces and use mode Default/Override.
    pub root_namespace: String,
    pub services: BTreeMap<ObjectName, Arc<Service>>,
    /// EndpointSlices, by name; the Service each belongs to is its `kubernetes.io/service-name` label.
    pub endpoint_slices: BTreeMap<ObjectName, Arc<EndpointSlice>>,
    /// Pods that run a proxy (in standalone mode: the Pods of the files).
    pub pods: BTreeMap<ObjectName, Arc<Pod>>,
    /// Labels of every namespace known; a namespace seen only through its objects has none.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// The keys of the Secrets known (values are never needed for evaluation).
    pub secrets: BTreeMap<ObjectName, BTreeSet<String>>,
    pub circuit_breakers: Vec<Arc<CircuitBreakerPolicy>>,
    pub rate_limits: Vec<Arc<RateLimitPolicy>>,
    pub lock_leases: Vec<Arc<LockLease>>,
    pub outbox_relays: Vec<Arc<OutboxRelay>>,
}

impl Inventory {
    pub fn new(root_namespace: impl Into<String>) -> Self {
        Self { root_namespace: root_namespace.into(), ..Self::default() }
    }

    pub fn add_service(&mut self, service: Arc<Service>) {
        self.namespaces.entry(service.namespace().unwrap_or_default()).or_default();
        self.services.insert(ObjectName::of(service.as_ref()), service);
    }

    pub fn add_namespace(&mut self, name: String, labels: BTreeMap<String, String>) {
        self.namespaces.insert(name, labels);
    }

    /// The ports of a Service, by name (or number when unnamed).
    pub fn service_ports(&self, service: &ObjectName) -> Option<Vec<String>> {
        let svc = self.services.get(service)?;
        let ports = svc.spec.as_ref().and_then(|s| s.ports.as_ref());
        Some(
            ports
                .into_iter()
                .flatten()
                .map(|p| p.name.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| p.port.to_string()))
                .collect(),
        )
    }

    /// Records a Secret's keys (its values are never needed for evaluation).
    pub fn add_secret(&mut self, secret: &Secret) {
        let keys = secret
            .data
            .iter()
            .flat_map(|d| d.keys().cloned())
            .chain(secret.string_data.iter().flat_map(|d| d.keys().cloned()))
            .collect();
        self.secrets.insert(ObjectName::of(secret), keys);
    }

    pub fn service_labels(&self, service: &ObjectName) -> BTreeMap<String, String> {
        self.services.get(service).map(|s| s.labels().clone()).unwrap_or_default()
    }
}
