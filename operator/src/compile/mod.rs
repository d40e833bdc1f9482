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
mod workload;

use std::{
    collections::{BTreeMap, BTreeSet},
    ops::Range,
    sync::Arc,
};

use breakwater_api::{CircuitBreakerPolicySpec, LockLease, rate_limit::Scope};
use envoy_types::pb::google::protobuf::Any;
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
};
use self::{inbound::InboundPort, workload::PortSpec};
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
    pub const AGENT: &str = breakwater_api::agent::TYPE_URL;
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

/// Everything one proxy is configured with.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Resources by type URL, then by resource name, protobuf-encoded as `Any`.
    pub resources: BTreeMap<&'static str, BTreeMap<String, Any>>,
    /// The policies whose configuration this snapshot carries, each with the resource types
    /// that carry it: only the ACKs and NACKs of those types say anything about the policy.
    pub policies: BTreeMap<PolicyVersion, BTreeSet<&'static str>>,
}

impl Snapshot {
    fn insert(&mut self, type_url: &'static str, name: impl Into<String>, any: Any) {
        self.resources.entry(type_url).or_default().insert(name.into(), any);
    }

    /// Records that resources of `type_url` carry `policy`.
    pub fn carry(&mut self, policy: PolicyVersion, type_url: &'static str) {
        self.policies.entry(policy).or_default().insert(type_url);
    }

    /// Adds another snapshot's resources and policies (the other wins on a name clash).
    pub fn merge(&mut self, other: Snapshot) {
        for (type_url, resources) in other.resources {
            self.resources.entry(type_url).or_default().extend(resources);
        }
        for (policy, types) in other.policies {
            self.policies.entry(policy).or_default().extend(types);
        }
    }
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
}

/// The snapshot of one proxy: [`Compiled::new`] then [`Compiled::snapshot`]. When many
/// proxies are compiled from one inventory, keep the [`Compiled`] and call `snapshot` for
/// each: the effective policies and the outbound side are then computed once.
pub fn compile(inventory: &Inventory, proxy: &Proxy) -> Snapshot {
    Compiled::new(inventory).snapshot(proxy)
}

/// The virtual hosts of the outbound route configuration, encoded once per inventory: what
/// every namespace's `outbound_http` is made of.
#[derive(Debug, Default)]
struct EncodedHosts {
    /// The `name` field of the route configuration.
    name: Vec<u8>,
    /// Every Service port's virtual host with the names valid everywhere, as
    /// `RouteConfiguration.virtual_hosts` fields in Service order: so each namespace's hosts
    /// are one contiguous span.
    global: Vec<u8>,
    /// Per namespace with Services: the span of its hosts in `global`, and the same hosts
    /// with the short names that resolve in that namespace only.
    namespaces: BTreeMap<String, (Range<usize>, Arc<[u8]>)>,
}

/// The outbound route configuration (`outbound_http`) as seen from one namespace, without
/// a copy of what every namespace shares. Its encoding is the route configuration's name,
/// then the global virtual hosts with the namespace's own replaced by their variants with
/// the short names: the bytes a route configuration built in one piece would have (the
/// encoding of a message with a name and a list of virtual hosts is the name's field
/// followed by each host's field), in three pieces of shared buffers.
#[derive(Clone, Debug)]
pub struct OutboundRoutes {
    hosts: Arc<EncodedHosts>,
    span: Range<usize>,
    local: Arc<[u8]>,
}

impl OutboundRoutes {
    /// The encoded `RouteConfiguration`, in the order its bytes go out.
    pub fn chunks(&self) -> [&[u8]; 4] {
        let global = self.hosts.global.as_slice();
        // The span comes from the same buffer, so it is in bounds; an empty slice otherwise.
        let before = global.get(..self.span.start).unwrap_or_default();
        let after = global.get(self.span.end..).unwrap_or_default();
        [&self.hosts.name, before, &self.local, after]
    }

    pub fn encoded_len(&self) -> usize {
        self.chunks().iter().map(|c| c.len()).sum()
    }

    /// The route configuration as a resource: the one copy of its bytes, made when it is
    /// sent.
    pub fn to_any(&self) -> Any {
        let mut value = Vec::with_capacity(self.encoded_len());
        for chunk in self.chunks() {
            value.extend_from_slice(chunk);
        }
        Any { type_url: type_url::ROUTE.to_string(), value }
    }
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
    /// The resources every proxy gets: outbound clusters, endpoints and listener.
    shared: Snapshot,
    hosts: Arc<EncodedHosts>,
    services: BTreeMap<String, Vec<ServiceEntry>>,
    rate_limits: BTreeMap<ServicePort, Vec<EffectiveLimit>>,
    /// Accepted LockLeases by namespace, in name order.
    leases: BTreeMap<String, Vec<Arc<LockLease>>>,
    /// Every Service port's shared breaker, by id, encoded once: the end of every agent's
    /// configuration.
    breakers: Vec<u8>,
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
        let mut shared = Snapshot::default();
        let mut hosts = EncodedHosts::default();
        prost::encoding::string::encode(1, &names::OUTBOUND_HTTP.to_string(), &mut hosts.name);
        // The namespace whose hosts are being encoded: where its span starts, and its hosts
        // with the short names. Services come by namespace, so each namespace is one run.
        let mut run: Option<(String, usize, Vec<u8>)> = None;
        let mut services: BTreeMap<String, Vec<ServiceEntry>> = BTreeMap::new();
        let mut breakers = BTreeMap::new();
        let empty = crate::policy::circuit_breaker::empty_spec();
        for (name, service) in &inventory.services {
            if run.as_ref().is_none_or(|(namespace, _, _)| *namespace != name.namespace) {
                hosts.close(run.take());
                run = Some((name.namespace.clone(), hosts.global.len(), Vec::new()));
            }
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
                let host = |local| outbound::virtual_host(name, port.number, &cluster, spec, local);
                prost::encoding::message::encode(2, &host(false), &mut hosts.global);
                if let Some((_, _, local)) = run.as_mut() {
                    prost::encoding::message::encode(2, &host(true), local);
                }
                if let (Some(breaker), Some(source)) = (&spec.breaker, sources.get(&Section::Breaker)) {
                    let id = breaker_id(name, port.number);
                    breakers.insert(id.clone(), agent::breaker_rule(id, source, breaker));
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
        hosts.close(run.take());
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
            shared,
            hosts: Arc::new(hosts),
            services,
            rate_limits,
            leases,
            breakers: agent::encode_breakers(breakers.into_values().collect()),
            generations,
            pods: inventory.pods.clone(),
        }
    }

    /// The full snapshot of one proxy: [`shared`](Self::shared), the
    /// [`outbound routes`](Self::outbound_routes) of its namespace, and its
    /// [`local`](Self::local) part.
    pub fn snapshot(&self, proxy: &Proxy) -> Snapshot {
        let mut snapshot = self.shared().clone();
        let routes = self.outbound_routes(&proxy.pod.namespace).to_any();
        snapshot.insert(type_url::ROUTE, names::OUTBOUND_HTTP, routes);
        snapshot.merge(self.local(proxy));
        snapshot
    }

    /// The resources every proxy gets, whatever its pod: the outbound clusters, their
    /// endpoints and the outbound listener, with the policies they carry — and those the
    /// outbound routes and every agent's breakers carry, which are the same for every pod.
    pub fn shared(&self) -> &Snapshot {
        &self.shared
    }

    /// What is particular to one pod: when the pod is known, the inbound listener, routes
    /// and clusters and the policies they carry; and the agent's configuration: the pod's
    /// rate limits and leases, and every breaker (an unknown pod's agent gets the breakers
    /// only — its Envoy has the outbound routes that ask about them).
    pub fn local(&self, proxy: &Proxy) -> Snapshot {
        let mut snapshot = Snapshot::default();
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
        snapshot.insert(type_url::AGENT, names::AGENT_RESOURCE, agent::resource(&agent, &self.breakers));
        snapshot
    }

    /// Which pods carry each policy: every pod what the shared part carries, and each pod
    /// what its local part carries (computed without encoding any resource).
    pub fn carriers(&self) -> Carriers {
        let shared = self.shared.policies.keys().map(|p| (p.kind, p.name.clone())).collect();
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

    /// The outbound route configuration (`outbound_http`) as seen from `namespace`: the
    /// same for every pod of the namespace, and made of the hosts every namespace shares
    /// plus the namespace's own. O(log namespaces): nothing is copied until
    /// [`OutboundRoutes::to_any`]. Namespaces without Services get one and the same table.
    pub fn outbound_routes(&self, namespace: &str) -> OutboundRoutes {
        let (span, local) = match self.hosts.namespaces.get(namespace) {
            Some((span, local)) => (span.clone(), local.clone()),
            None => (0..0, Arc::from(Vec::new())),
        };
        OutboundRoutes { hosts: self.hosts.clone(), span, local }
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

impl EncodedHosts {
    /// Records the span of a namespace whose hosts have all been encoded.
    fn close(&mut self, run: Option<(String, usize, Vec<u8>)>) {
        if let Some((namespace, start, local)) = run {
            self.namespaces.insert(namespace, (start..self.global.len(), Arc::from(local)));
        }
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
/// and descriptor) and the agent's configuration (the rule): all three are the same for
/// every pod, so the shared part claims them and every pod carries the policy.
fn carrying(section: Section, spec: &CircuitBreakerPolicySpec) -> &'static [&'static str] {
    match section {
        Section::ConnectionLimits | Section::OutlierDetection => &[type_url::CLUSTER],
        Section::Retry if spec.retry.as_ref().is_some_and(|r| r.budget.is_some()) => {
            &[type_url::CLUSTER, type_url::ROUTE]
        }
        Section::Retry | Section::Timeout => &[type_url::ROUTE],
        Section::Breaker => &[type_url::LISTENER, type_url::ROUTE, type_url::AGENT],
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
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

    /// The route configuration `namespace` sees, built as one message the way it reads:
    /// every Service port's host, with the short names for the namespace's own Services.
    fn in_one_piece(inventory: &Inventory, namespace: &str) -> Vec<u8> {
        let empty = circuit_breaker::empty_spec();
        let mut virtual_hosts = Vec::new();
        for (name, service) in &inventory.services {
            let mut ports = workload::ports(service);
            ports.sort_by_key(|p| p.number);
            for port in ports {
                let cluster = outbound::cluster_name(name, port.number);
                let local = name.namespace == namespace;
                virtual_hosts.push(outbound::virtual_host(name, port.number, &cluster, &empty, local));
            }
        }
        RouteConfiguration { name: names::OUTBOUND_HTTP.into(), virtual_hosts, ..Default::default() }
            .encode_to_vec()
    }

    #[test]
    fn each_namespace_sees_the_routes_built_in_one_piece() {
        let mut inventory = Inventory::new("breakwater-system");
        inventory.add_service(service("alpha", "api", &[80, 9000]));
        inventory.add_service(service("alpha", "db", &[5432]));
        inventory.add_service(service("beta", "api", &[80]));
        inventory.add_service(service("gamma", "web", &[8080, 80]));
        let compiled = Compiled::new(&inventory);
        for namespace in ["alpha", "beta", "gamma", "no-services", ""] {
            let routes = compiled.outbound_routes(namespace);
            assert_eq!(routes.to_any().value, in_one_piece(&inventory, namespace), "{namespace}");
            assert_eq!(routes.encoded_len(), routes.to_any().value.len());
        }
        // The pieces are the shared buffers, not copies.
        let (alpha, beta) = (compiled.outbound_routes("alpha"), compiled.outbound_routes("beta"));
        assert!(Arc::ptr_eq(&alpha.hosts, &beta.hosts));
        let routes = RouteConfiguration::decode(beta.to_any().value.as_slice()).expect("decodes");
        let domains: Vec<&str> =
            routes.virtual_hosts.iter().flat_map(|v| &v.domains).map(String::as_str).collect();
        assert!(domains.contains(&"api") && domains.contains(&"api.alpha"), "{domains:?}");
    }

    #[test]
    fn no_services_no_hosts() {
        let compiled = Compiled::new(&Inventory::new("breakwater-system"));
        let routes = RouteConfiguration::decode(compiled.outbound_routes("shop").to_any().value.as_slice())
            .expect("decodes");
        assert_eq!(routes.name, names::OUTBOUND_HTTP);
        assert!(routes.virtual_hosts.is_empty());
    }
}
