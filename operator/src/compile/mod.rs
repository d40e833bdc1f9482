//! The policy compiler: effective policies, Services, EndpointSlices and one proxy's
//! identity in, that proxy's Envoy resources and agent configuration out. Pure and
//! deterministic — the same inputs give the same bytes — so snapshots can be versioned by
//! content and golden-tested.
//!
//! [`Compiled::new`] does the work that does not depend on the proxy once per inventory
//! (effective policies, the outbound clusters, endpoints and virtual hosts);
//! [`Compiled::snapshot`] adds what is particular to one pod. [`compile`] does both. The
//! layout of the configuration is described in `docs/compiler.md`.

mod agent;
mod bootstrap;
mod inbound;
mod outbound;
mod proto;
mod snapshot;
mod workload;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use breakwater_api::{CircuitBreakerPolicySpec, LockLease, rate_limit::Scope};
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt;

pub use self::{
    agent::{DEFAULT_HALF_OPEN_CALLS, DEFAULT_MINIMUM_CALLS},
    bootstrap::bootstrap,
    inbound::{MATCH_KEY, RLS_TIMEOUT_MS, TARGET_KEY},
    outbound::{BREAKER_LOG_FILTER, DEFAULT_RETRY_ON, breaker_id},
    snapshot::{Part, Resource, Snapshot, wants},
};
use self::{inbound::InboundPort, outbound::Names, workload::PortSpec};
use crate::{
    inventory::{Inventory, ObjectName, ServicePort},
    policy::{
        circuit_breaker::{self, Section},
        lock_lease,
        rate_limit::{self, EffectiveLimit},
    },
    selector,
};

/// Names and ports of the configuration, shared with the sidecar injection and the docs.
pub mod names {
    /// The cluster DNS domain Service names are qualified with.
    pub const CLUSTER_DOMAIN: &str = "cluster.local";
    /// The outbound listener and its route configuration: where iptables redirects the
    /// application's connections (and its HTTP proxy, `HTTP_PROXY=http://127.0.0.1:15001`).
    pub const OUTBOUND_HTTP: &str = "outbound_http";
    pub const OUTBOUND_PORT: u32 = 15001;
    /// The outbound filter chain and cluster for connections that are not HTTP.
    pub const OUTBOUND_PASSTHROUGH: &str = "outbound|passthrough";
    /// The inbound listener, where iptables redirects connections to the pod.
    pub const INBOUND: &str = "inbound";
    pub const INBOUND_PORT: u32 = 15006;
    /// The inbound filter chain and cluster for ports without limits.
    pub const INBOUND_PASSTHROUGH: &str = "inbound|passthrough";
    /// The agent's rate-limit service on loopback (a bootstrap cluster).
    pub const AGENT_CLUSTER: &str = "breakwater_agent";
    pub const AGENT_PORT: u16 = 15081;
    /// The agent's ADS proxy on loopback, Envoy's way to the operator (a bootstrap cluster).
    pub const XDS_CLUSTER: &str = "breakwater_xds";
    pub const XDS_PROXY_PORT: u16 = 15083;
    /// Envoy's admin interface, on loopback only.
    pub const ADMIN_PORT: u32 = 15000;
    /// The name of the agent's resource.
    pub const AGENT_RESOURCE: &str = "agent";
    pub const LOCAL_RATELIMIT_FILTER: &str = "envoy.filters.http.local_ratelimit";
    /// The rate-limit filter that asks the agent: scope Cluster limits (inbound), breakers
    /// (outbound).
    pub const RATELIMIT_FILTER: &str = "envoy.filters.http.ratelimit";
}

pub const CIRCUIT_BREAKER_POLICY: &str = "CircuitBreakerPolicy";
pub const RATE_LIMIT_POLICY: &str = "RateLimitPolicy";
pub const LOCK_LEASE: &str = "LockLease";

/// Type URLs of the resources a snapshot carries (Envoy v3, plus the agent's own type).
pub mod type_url {
    pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub const ENDPOINT: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub const ROUTE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
    pub const VIRTUAL_HOST: &str = "type.googleapis.com/envoy.config.route.v3.VirtualHost";
    /// A pod's agent configuration: its rate limits and leases.
    pub const AGENT: &str = breakwater_api::agent::TYPE_URL;
    /// One shared breaker, for every pod's agent.
    pub const BREAKER: &str = breakwater_api::agent::BREAKER_TYPE_URL;
    /// Every type a snapshot may hold.
    pub const ALL: [&str; 7] = [LISTENER, ROUTE, VIRTUAL_HOST, CLUSTER, ENDPOINT, AGENT, BREAKER];
}

/// The pod a proxy (Envoy sidecar and agent) runs in. Its ADS node id is `namespace/pod`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proxy {
    pub pod: ObjectName,
}

impl Proxy {
    /// Parses an ADS node id (`namespace/pod`).
    pub fn from_node_id(id: &str) -> Option<Self> {
        let (namespace, pod) = id.split_once('/')?;
        (!namespace.is_empty() && !pod.is_empty() && !pod.contains('/'))
            .then(|| Self { pod: ObjectName::new(namespace, pod) })
    }

    pub fn node_id(&self) -> String {
        self.pod.to_string()
    }
}

/// A policy at one generation: what a snapshot "contains", for `Programmed`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyVersion {
    pub kind: &'static str,
    pub name: ObjectName,
    pub generation: i64,
}

/// Which pods carry each policy, whether a proxy of theirs is connected or not: what
/// `Programmed` counts the connected proxies against. Every pod carries the shared part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carriers {
    /// Every pod of the inventory.
    pods: BTreeSet<ObjectName>,
    /// The policies the shared part carries, by kind and name.
    shared: BTreeSet<(&'static str, ObjectName)>,
    /// The policies of pods' local parts, with the pods that carry each.
    local: BTreeMap<(&'static str, ObjectName), BTreeSet<ObjectName>>,
}

impl Carriers {
    /// The pods whose configuration carries the policy `kind` `name`; None when no pod does.
    pub fn pods(&self, kind: &'static str, name: &ObjectName) -> Option<&BTreeSet<ObjectName>> {
        let key = (kind, name.clone());
        if self.shared.contains(&key) { Some(&self.pods) } else { self.local.get(&key) }
    }

    /// Whether every pod carries the policy (the shared part does).
    pub fn is_shared(&self, kind: &'static str, name: &ObjectName) -> bool {
        self.shared.contains(&(kind, name.clone()))
    }

    /// Whether `pod` is a pod of the inventory (every pod carries the shared policies).
    pub fn has_pod(&self, pod: &ObjectName) -> bool {
        self.pods.contains(pod)
    }
}

/// The snapshot of one proxy: [`Compiled::new`] then [`Compiled::snapshot`]. When many
/// proxies are compiled from one inventory, keep the [`Compiled`] and call `snapshot` for
/// each: the effective policies and the outbound side are then computed once.
pub fn compile(inventory: &Inventory, proxy: &Proxy) -> Snapshot {
    Compiled::new(inventory).snapshot(proxy)
}

/// A Service with the ports the compiler configures.
#[derive(Debug)]
struct ServiceEntry {
    name: ObjectName,
    service: Arc<Service>,
    ports: Vec<PortSpec>,
}

/// Everything of an inventory that does not depend on the proxy. Owns its data, so it can
/// be shared (`Arc`) by whatever compiles snapshots for connected proxies.
#[derive(Debug)]
pub struct Compiled {
    /// The resources every proxy gets: outbound clusters, endpoints, listener, route
    /// configuration, the virtual hosts with qualified names and the agents' breakers.
    shared: Arc<Part>,
    /// Per namespace with Services, the virtual hosts with the short names of its own
    /// Services; and the empty part the other namespaces get.
    namespaces: BTreeMap<String, Arc<Part>>,
    no_namespace: Arc<Part>,
    services: BTreeMap<String, Vec<ServiceEntry>>,
    rate_limits: BTreeMap<ServicePort, Vec<EffectiveLimit>>,
    /// Accepted LockLeases by namespace, in name order.
    leases: BTreeMap<String, Vec<Arc<LockLease>>>,
    generations: BTreeMap<(&'static str, ObjectName), i64>,
    pods: BTreeMap<ObjectName, Arc<Pod>>,
}

impl Compiled {
    /// Effective policies hold only policies that evaluation accepts, so nothing the policy
    /// checks refuse (`policy::check`) reaches a snapshot.
    pub fn new(inventory: &Inventory) -> Self {
        let generations = generations(inventory);
        let circuit_breakers = circuit_breaker::effective(inventory);
        let rate_limits = rate_limit::effective(inventory);

        let slices = slices_by_service(inventory);
        let mut shared = Part::default();
        let mut namespaces: BTreeMap<String, Part> = BTreeMap::new();
        let mut services: BTreeMap<String, Vec<ServiceEntry>> = BTreeMap::new();
        let empty = crate::policy::circuit_breaker::empty_spec();
        for (name, service) in &inventory.services {
            let mut ports = workload::ports(service);
            ports.sort_by_key(|p| p.number);
            for port in &ports {
                let key = ServicePort { service: name.clone(), port: port.key.clone() };
                let (spec, sources) = match circuit_breakers.get(&key) {
                    Some(effective) => (&effective.spec, effective.sources.clone()),
                    None => (&empty, BTreeMap::new()),
                };
                let cluster = outbound::cluster_name(name, port.number);
                let endpoints = workload::endpoints(
                    slices.get(name).into_iter().flatten().map(AsRef::as_ref),
                    &port.name,
                );
                shared.insert(
                    type_url::CLUSTER,
                    &cluster,
                    proto::any(&outbound::cluster(&cluster, port, spec)),
                );
                shared.insert(
                    type_url::ENDPOINT,
                    &cluster,
                    proto::any(&outbound::load_assignment(&cluster, &endpoints)),
                );
                for (names, part) in [
                    (Names::Qualified, &mut shared),
                    (Names::Short, namespaces.entry(name.namespace.clone()).or_default()),
                ] {
                    let host = outbound::virtual_host(name, port.number, &cluster, spec, names);
                    part.insert(type_url::VIRTUAL_HOST, host.name.clone(), proto::any(&host));
                }
                if let (Some(breaker), Some(source)) = (&spec.breaker, sources.get(&Section::Breaker)) {
                    let id = breaker_id(name, port.number);
                    let rule = agent::breaker_rule(id, source, breaker);
                    shared.insert(type_url::BREAKER, rule.id.clone(), agent::breaker_resource(&rule));
                }
                for (section, source) in sources {
                    for type_url in carrying(section, spec) {
                        shared.carry(version(&generations, CIRCUIT_BREAKER_POLICY, &source), type_url);
                    }
                }
            }
            services.entry(name.namespace.clone()).or_default().push(ServiceEntry {
                name: name.clone(),
                service: service.clone(),
                ports,
            });
        }
        shared.insert(type_url::ROUTE, names::OUTBOUND_HTTP, proto::any(&outbound::route_config()));
        shared.insert(type_url::LISTENER, names::OUTBOUND_HTTP, proto::any(&outbound::listener()));
        shared.insert(
            type_url::CLUSTER,
            names::OUTBOUND_PASSTHROUGH,
            proto::any(&proto::passthrough_cluster(names::OUTBOUND_PASSTHROUGH)),
        );
        let mut leases: BTreeMap<String, Vec<Arc<LockLease>>> = BTreeMap::new();
        for lease in inventory.lock_leases.iter().filter(|l| lock_lease::assess(l).accepted.ok) {
            leases.entry(lease.namespace().unwrap_or_default()).or_default().push(lease.clone());
        }
        for of_namespace in leases.values_mut() {
            of_namespace.sort_by_key(|l| l.name_any());
        }
        Self {
            shared: Arc::new(shared),
            namespaces: namespaces.into_iter().map(|(namespace, part)| (namespace, Arc::new(part))).collect(),
            no_namespace: Arc::default(),
            services,
            rate_limits,
            leases,
            generations,
            pods: inventory.pods.clone(),
        }
    }

    /// The full snapshot of one proxy: [`shared`](Self::shared), the
    /// [`namespace`](Self::namespace) part of its namespace, and its [`local`](Self::local)
    /// part. The first two are shared with every proxy that has them, not copied.
    pub fn snapshot(&self, proxy: &Proxy) -> Snapshot {
        Snapshot::from_parts(vec![
            self.shared.clone(),
            self.namespace(&proxy.pod.namespace).clone(),
            Arc::new(self.local(proxy)),
        ])
    }

    /// The resources every proxy gets, whatever its pod: the outbound listener, route
    /// configuration, clusters, their endpoints, the virtual hosts with qualified names and
    /// the agents' breakers (one resource each), with the policies they carry.
    pub fn shared(&self) -> &Arc<Part> {
        &self.shared
    }

    /// What every proxy of `namespace` gets: the virtual hosts of the namespace's own
    /// Services with their short names (`svc`, `svc:port`), which resolve there only. One
    /// and the same empty part for namespaces without Services.
    pub fn namespace(&self, namespace: &str) -> &Arc<Part> {
        self.namespaces.get(namespace).unwrap_or(&self.no_namespace)
    }

    /// What is particular to one pod: when the pod is known, the inbound listener, routes
    /// and clusters and the policies they carry; and the agent's configuration: the pod's
    /// rate limits and leases (an empty one for an unknown pod, whose agent still gets the
    /// breakers from the shared part).
    pub fn local(&self, proxy: &Proxy) -> Part {
        let mut snapshot = Part::default();
        let mut agent = agent::config([], []);
        if let Some(pod) = self.pods.get(&proxy.pod) {
            let ports = self.inbound_ports(pod);
            let leases = self.leases_of(pod);
            for port in &ports {
                let name = inbound::cluster_name(port.target);
                snapshot.insert(type_url::CLUSTER, &name, proto::any(&inbound::cluster(port)));
                snapshot.insert(type_url::ROUTE, &name, proto::any(&inbound::route_config(port)));
                for (_, limit) in &port.limits {
                    let policy = version(&self.generations, RATE_LIMIT_POLICY, &limit.policy);
                    // The port's filter chain and its route configuration enforce the limit;
                    // a scope Cluster limit is counted by the agent too.
                    snapshot.carry(policy.clone(), type_url::LISTENER);
                    snapshot.carry(policy.clone(), type_url::ROUTE);
                    if limit.limit.scope() == Scope::Cluster {
                        snapshot.carry(policy, type_url::AGENT);
                    }
                }
            }
            snapshot.insert(
                type_url::CLUSTER,
                names::INBOUND_PASSTHROUGH,
                proto::any(&proto::passthrough_cluster(names::INBOUND_PASSTHROUGH)),
            );
            snapshot.insert(type_url::LISTENER, names::INBOUND, proto::any(&inbound::listener(&ports)));
            for lease in &leases {
                let policy = version(&self.generations, LOCK_LEASE, &ObjectName::of(lease.as_ref()));
                snapshot.carry(policy, type_url::AGENT);
            }
            agent = agent::config(
                ports.iter().flat_map(|p| p.limits.iter().map(|(_, l)| *l)),
                leases.iter().map(AsRef::as_ref),
            );
        }
        snapshot.insert(type_url::AGENT, names::AGENT_RESOURCE, agent::resource(&agent));
        snapshot
    }

    /// Which pods carry each policy: every pod what the shared part carries, and each pod
    /// what its local part carries (computed without encoding any resource).
    pub fn carriers(&self) -> Carriers {
        let shared = self.shared.policies().keys().map(|p| (p.kind, p.name.clone())).collect();
        let mut local: BTreeMap<(&'static str, ObjectName), BTreeSet<ObjectName>> = BTreeMap::new();
        for (name, pod) in &self.pods {
            let limits = self.inbound_ports(pod).into_iter().flat_map(|port| port.limits);
            let rate_limits = limits.map(|(_, limit)| (RATE_LIMIT_POLICY, limit.policy.clone()));
            let leases =
                self.leases_of(pod).into_iter().map(|lease| (LOCK_LEASE, ObjectName::of(lease.as_ref())));
            for key in rate_limits.chain(leases) {
                local.entry(key).or_default().insert(name.clone());
            }
        }
        Carriers { pods: self.pods.keys().cloned().collect(), shared, local }
    }

    /// The accepted LockLeases of the pod's namespace whose podSelector matches its labels.
    fn leases_of(&self, pod: &Pod) -> Vec<Arc<LockLease>> {
        let namespace = pod.namespace().unwrap_or_default();
        self.leases
            .get(&namespace)
            .into_iter()
            .flatten()
            .filter(|lease| selector::matches(&lease.spec.pod_selector, pod.labels()))
            .cloned()
            .collect()
    }

    /// The limited ports of a pod: the Services of its namespace that select it, their
    /// ports with rate limits, by the container port each lands on.
    fn inbound_ports(&self, pod: &Pod) -> Vec<InboundPort<'_>> {
        let mut by_target: BTreeMap<u16, InboundPort> = BTreeMap::new();
        let namespace = pod.namespace().unwrap_or_default();
        for entry in self.services.get(&namespace).into_iter().flatten() {
            if !workload::selects(&entry.service, pod) {
                continue;
            }
            for port in &entry.ports {
                let key = ServicePort { service: entry.name.clone(), port: port.key.clone() };
                let (Some((key, limits)), Some(target)) =
                    (self.rate_limits.get_key_value(&key), workload::target_port(port, pod))
                else {
                    continue;
                };
                let inbound =
                    by_target.entry(target).or_insert_with(|| InboundPort { target, ..Default::default() });
                inbound.http2 |= port.http2;
                inbound.limits.extend(limits.iter().map(|l| (key, l)));
            }
        }
        by_target.into_values().collect()
    }
}

fn generations(inventory: &Inventory) -> BTreeMap<(&'static str, ObjectName), i64> {
    let cb = inventory
        .circuit_breakers
        .iter()
        .map(|p| ((CIRCUIT_BREAKER_POLICY, ObjectName::of(p.as_ref())), p.metadata.generation));
    let rl = inventory
        .rate_limits
        .iter()
        .map(|p| ((RATE_LIMIT_POLICY, ObjectName::of(p.as_ref())), p.metadata.generation));
    let ll = inventory
        .lock_leases
        .iter()
        .map(|p| ((LOCK_LEASE, ObjectName::of(p.as_ref())), p.metadata.generation));
    cb.chain(rl).chain(ll).map(|(key, generation)| (key, generation.unwrap_or(1))).collect()
}

fn version(
    generations: &BTreeMap<(&'static str, ObjectName), i64>,
    kind: &'static str,
    name: &ObjectName,
) -> PolicyVersion {
    let generation = generations.get(&(kind, name.clone())).copied().unwrap_or(1);
    PolicyVersion { kind, name: name.clone(), generation }
}

/// The EndpointSlices of each Service (by the `kubernetes.io/service-name` label).
fn slices_by_service(inventory: &Inventory) -> BTreeMap<ObjectName, Vec<Arc<EndpointSlice>>> {
    let mut by_service: BTreeMap<ObjectName, Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    for (name, slice) in &inventory.endpoint_slices {
        if let Some(service) = slice.labels().get(workload::SERVICE_NAME_LABEL) {
            by_service.entry(ObjectName::new(&name.namespace, service)).or_default().push(slice.clone());
        }
    }
    by_service
}

/// The resource types that carry one section of a Service port's effective circuit breaker:
/// limits and outlier detection live in the outbound cluster, retries and the timeout in the
/// virtual host of the outbound routes (a retry budget in the cluster too). The breaker
/// needs the outbound listener (its rate-limit filter and access log), the route (its name
/// and descriptor) and the agent's breaker resource (the rule): all three are the same for
/// every pod, in the shared part, and every pod carries the policy.
fn carrying(section: Section, spec: &CircuitBreakerPolicySpec) -> &'static [&'static str] {
    match section {
        Section::ConnectionLimits | Section::OutlierDetection => &[type_url::CLUSTER],
        Section::Retry if spec.retry.as_ref().is_some_and(|r| r.budget.is_some()) => {
            &[type_url::CLUSTER, type_url::VIRTUAL_HOST]
        }
        Section::Retry | Section::Timeout => &[type_url::VIRTUAL_HOST],
        Section::Breaker => &[type_url::LISTENER, type_url::VIRTUAL_HOST, type_url::BREAKER],
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::route::v3::VirtualHost;
    use k8s_openapi::{
        api::core::v1::{ServicePort as K8sServicePort, ServiceSpec},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use prost::Message;

    use super::*;

    fn service(namespace: &str, name: &str, ports: &[i32]) -> Arc<Service> {
        Arc::new(Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                ports: Some(
                    ports.iter().map(|port| K8sServicePort { port: *port, ..Default::default() }).collect(),
                ),
                ..Default::default()
            }),
            status: None,
        })
    }

    fn domains(snapshot: &Snapshot) -> Vec<String> {
        snapshot
            .resources(type_url::VIRTUAL_HOST)
            .flat_map(|(_, r)| VirtualHost::decode(r.any.value.as_slice()).expect("decodes").domains)
            .collect()
    }

    #[test]
    fn short_names_resolve_in_their_own_namespace_only() {
        let mut inventory = Inventory::new("breakwater-system");
        inventory.add_service(service("alpha", "api", &[80, 9000]));
        inventory.add_service(service("beta", "api", &[80]));
        let compiled = Compiled::new(&inventory);
        let proxy = |namespace: &str| Proxy { pod: ObjectName::new(namespace, "p") };
        let alpha = domains(&compiled.snapshot(&proxy("alpha")));
        assert!(alpha.iter().any(|d| d == "api:9000") && alpha.iter().any(|d| d == "api.beta"), "{alpha:?}");
        assert_eq!(alpha.iter().filter(|d| *d == "api").count(), 1, "{alpha:?}");
        let elsewhere = domains(&compiled.snapshot(&proxy("gamma")));
        assert!(!elsewhere.iter().any(|d| d == "api" || d == "api:9000"), "{elsewhere:?}");
        // Every domain is unique within a proxy's route table, as Envoy requires.
        let unique: BTreeSet<&String> = alpha.iter().collect();
        assert_eq!(unique.len(), alpha.len());
        // The shared parts are the same allocation for every proxy of a namespace.
        let (one, two) = (compiled.snapshot(&proxy("alpha")), compiled.snapshot(&proxy("alpha")));
        assert!(
            Arc::ptr_eq(&one.parts()[0], &two.parts()[0]) && Arc::ptr_eq(&one.parts()[1], &two.parts()[1])
        );
    }
}
