//! The world for `make bench-xds`: 10,000 Services in 500 namespaces and 5,000
//! distinct proxies, and what one policy change sends each of them.
//!
//! Each namespace has 20 Services (an HTTP and a gRPC port, 3 endpoints) and 10 Pods, each
//! Pod backing two of them; half the namespaces are labelled production. Per namespace: a
//! CircuitBreakerPolicy with timeout, retries, connection limits and outlier detection on its
//! first Service, one with a shared breaker on its second, and two RateLimitPolicies (a
//! cluster-wide per-user limit and a per-pod limit) on its third and fourth; in the root
//! namespace a CircuitBreakerPolicy Default for every namespace and a RateLimitPolicy
//! Override for production. So the proxies differ as real ones do: each namespace has its
//! own short names in `outbound_http`, each pod its own inbound listener, routes and agent
//! rules, and every agent has every breaker.
//!
//! The bytes are computed, not sent: for every proxy, the resources of each type whose bytes
//! differ between the snapshots before and after the change, and what a discovery response
//! carries for them under three protocols — this server's incremental (delta) xDS (only the
//! changed resources, and the names of removed ones), state of the world with one version
//! per type (a changed type is sent whole) and state of the world with per-resource versions
//! (Listener, Cluster and the agent's configuration must still be sent whole; the other
//! types only the changed ones). The snapshots are compared part by part — the shared part
//! once, each namespace's part once, each pod's local part — which is what they are made of.

use std::{collections::BTreeMap, fmt::Write as _, path::Path, sync::Arc, time::Instant};

use breakwater_api::{CircuitBreakerPolicy, RateLimitPolicy};
use breakwater_operator::{
    compile::{Compiled, Part, Proxy, Resource as ResourceEntry, type_url},
    inventory::Inventory,
    standalone::load::{Loaded, load_text},
};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse, Resource};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use prost::Message;

pub const NAMESPACES: usize = 500;
pub const SERVICES_PER_NAMESPACE: usize = 20;
pub const PODS_PER_NAMESPACE: usize = 10;
const ROOT: &str = "breakwater-system";

/// The world as the YAML standalone mode reads, so that every object passes the schema.
fn yaml() -> String {
    let mut out = String::new();
    for n in 0..NAMESPACES {
        let ns = format!("team-{n:03}");
        let tier = if n % 2 == 0 { "production" } else { "staging" };
        let _ = writeln!(
            out,
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{tier: {tier}}}}}\n---"
        );
        for s in 0..SERVICES_PER_NAMESPACE {
            let i = n * SERVICES_PER_NAMESPACE + s;
            let app = format!("w-{}", s / 2);
            let _ = writeln!(
                out,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s:02}, namespace: {ns}}}\nspec:\n  \
                 selector: {{app: {app}}}\n  ports: [{{name: http, port: 80, targetPort: http}}, {{name: grpc, port: 9000}}]\n---"
            );
            let addresses: Vec<String> = (0..3)
                .map(|e| {
                    format!(
                        "{{addresses: [10.{}.{}.{}], zone: zone-{e}}}",
                        i / 65536,
                        (i / 256) % 256,
                        i % 256
                    )
                })
                .collect();
            let _ = writeln!(
                out,
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{s:02}-abcde, namespace: {ns}, \
                 labels: {{kubernetes.io/service-name: svc-{s:02}}}}}\naddressType: IPv4\nendpoints: [{}]\n\
                 ports: [{{name: http, port: 8080}}, {{name: grpc, port: 9000}}]\n---",
                addresses.join(", ")
            );
        }
        for p in 0..PODS_PER_NAMESPACE {
            let _ = writeln!(
                out,
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: w-{p}-7c9f8d6b5-x2kqp, namespace: {ns}, labels: {{app: w-{p}}}}}\n\
                 spec:\n  containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}, {{name: grpc, containerPort: 9000}}]}}]\n---"
            );
        }
        let _ = writeln!(
            out,
            "apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: cb-0, namespace: {ns}}}\nspec:\n  \
             targetRefs: [{{kind: Service, name: svc-00}}]\n  timeout: 10s\n  \
             retry: {{attempts: 3, perTryTimeout: 2s, retryOn: [5xx, reset], backoff: {{base: 25ms, max: 250ms}}}}\n  \
             connectionLimits: {{maxConnections: 1024, maxPendingRequests: 256, maxRequests: 1024}}\n  \
             outlierDetection: {{consecutive5xx: 5, interval: 10s, baseEjectionTime: 30s, maxEjectionPercent: 50}}\n---\n\
             apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: cb-1, namespace: {ns}}}\nspec:\n  \
             targetRefs: [{{kind: Service, name: svc-01, sectionName: http}}]\n  \
             breaker: {{failureRateThreshold: 50, slidingWindow: {{type: Count, size: 100}}, minimumCalls: 20, openDuration: 30s}}\n---"
        );
        for (r, s) in [(2, 2), (3, 3)] {
            let _ = writeln!(
                out,
                "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: rl-{r}, namespace: {ns}}}\nspec:\n  \
                 targetRefs: [{{kind: Service, name: svc-{s:02}, sectionName: http}}]\n  limits:\n  \
                 - {{name: per-user, match: {{pathPrefix: /v1/}}, key: [{{header: x-user-id}}], rate: {{requests: 100, per: 1m}}, scope: Cluster}}\n  \
                 - {{name: per-pod, rate: {{requests: 50, per: 1s}}, scope: Pod}}\n---"
            );
        }
    }
    let _ = writeln!(
        out,
        "apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: defaults, namespace: {ROOT}}}\nspec:\n  \
         namespaceSelector: {{}}\n  mode: Default\n  timeout: 30s\n  retry: {{attempts: 2}}\n---\n\
         apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: floor, namespace: {ROOT}}}\nspec:\n  \
         namespaceSelector: {{matchLabels: {{tier: production}}}}\n  mode: Override\n  \
         limits: [{{name: per-client, key: [{{remoteAddress: true}}], rate: {{requests: 1000, per: 1s}}, scope: Cluster}}]"
    );
    out
}

pub fn inventory() -> Inventory {
    let mut loaded = Loaded { inventory: Inventory::new(ROOT), ..Loaded::default() };
    load_text(Path::new("world.yaml"), &yaml(), &mut loaded, &mut BTreeMap::new()).expect("the world loads");
    assert!(loaded.rejected.is_empty(), "the world breaks the schema: {:?}", loaded.rejected);
    loaded.inventory
}

/// One policy change (or, for comparison, one endpoint more).
pub struct Change {
    pub what: &'static str,
    pub apply: fn(&mut Inventory),
}

fn edit_cb(inventory: &mut Inventory, name: &str, edit: impl Fn(&mut CircuitBreakerPolicy)) {
    for policy in &mut inventory.circuit_breakers {
        if policy.metadata.namespace.as_deref() == Some("team-000")
            && policy.metadata.name.as_deref() == Some(name)
        {
            let mut changed = (**policy).clone();
            edit(&mut changed);
            changed.metadata.generation = Some(changed.metadata.generation.unwrap_or(1) + 1);
            *policy = Arc::new(changed);
        }
    }
}

fn edit_rl(inventory: &mut Inventory, name: &str, edit: impl Fn(&mut RateLimitPolicy)) {
    for policy in &mut inventory.rate_limits {
        if policy.metadata.namespace.as_deref() == Some("team-000")
            && policy.metadata.name.as_deref() == Some(name)
        {
            let mut changed = (**policy).clone();
            edit(&mut changed);
            changed.metadata.generation = Some(changed.metadata.generation.unwrap_or(1) + 1);
            *policy = Arc::new(changed);
        }
    }
}

pub const CHANGES: [Change; 5] = [
    Change {
        what: "timeout of one Service (CircuitBreakerPolicy team-000/cb-0: 10s → 11s)",
        apply: |inv| edit_cb(inv, "cb-0", |p| p.spec.timeout = Some(breakwater_api::Duration::new("11s"))),
    },
    Change {
        what: "connection limit of one Service (team-000/cb-0: maxConnections 1024 → 2048)",
        apply: |inv| {
            edit_cb(inv, "cb-0", |p| {
                if let Some(limits) = p.spec.connection_limits.as_mut() {
                    limits.max_connections = Some(2048);
                }
            })
        },
    },
    Change {
        what: "breaker of one Service port (team-000/cb-1: failureRateThreshold 50 → 60)",
        apply: |inv| {
            edit_cb(inv, "cb-1", |p| {
                if let Some(breaker) = p.spec.breaker.as_mut() {
                    breaker.failure_rate_threshold = 60;
                }
            })
        },
    },
    Change {
        what: "rate limit of one Service port (RateLimitPolicy team-000/rl-2: 100 → 200 a minute)",
        apply: |inv| {
            edit_rl(inv, "rl-2", |p| {
                if let Some(limit) = p.spec.limits.first_mut() {
                    limit.rate.requests = 200;
                }
            })
        },
    },
    Change {
        what: "(not a policy) one endpoint more for one Service (team-000/svc-00)",
        apply: |inv| {
            for (name, slice) in &mut inv.endpoint_slices {
                if name.namespace == "team-000" && name.name == "svc-00-abcde" {
                    let mut more: EndpointSlice = (**slice).clone();
                    more.endpoints.push(Endpoint {
                        addresses: vec!["10.255.0.1".into()],
                        zone: Some("zone-0".into()),
                        ..Default::default()
                    });
                    *slice = Arc::new(more);
                }
            }
        },
    },
];

/// Bytes of a resource whose `Any` encodes in `n` bytes, as one of a DiscoveryResponse's
/// `resources`.
fn in_sotw(n: usize) -> usize {
    1 + prost::length_delimiter_len(n) + n
}

/// Bytes of a resource named `name` whose `Any` encodes in `n` bytes, as one of a
/// DeltaDiscoveryResponse's `resources` (with a 16-character version, as this server's
/// versions are).
fn in_delta(name: &str, n: usize) -> usize {
    let resource = Resource { name: name.to_string(), version: "0".repeat(16), ..Default::default() };
    let n = resource.encoded_len() + in_sotw(n);
    1 + prost::length_delimiter_len(n) + n
}

/// The envelope of one response of `type_`: version, type URL, nonce (and, for delta, the
/// system version's place).
fn envelope(type_: &str, delta: bool) -> usize {
    if delta {
        DeltaDiscoveryResponse { type_url: type_.into(), nonce: "123456".into(), ..Default::default() }
            .encoded_len()
    } else {
        DiscoveryResponse {
            version_info: "0".repeat(16),
            type_url: type_.into(),
            nonce: "123456".into(),
            ..Default::default()
        }
        .encoded_len()
    }
}

/// What changed in one type of one part of a snapshot.
#[derive(Clone, Copy, Debug, Default)]
struct TypeDiff {
    /// Every resource after the change, as SotW response elements.
    all: usize,
    /// The changed and new ones, as SotW response elements.
    changed: usize,
    /// The changed and new ones, and the names of removed ones, as delta response elements.
    delta: usize,
    any: bool,
}

impl TypeDiff {
    fn add(self, other: TypeDiff) -> TypeDiff {
        TypeDiff {
            all: self.all + other.all,
            changed: self.changed + other.changed,
            delta: self.delta + other.delta,
            any: self.any || other.any,
        }
    }
}

fn diff(
    before: Option<&BTreeMap<String, Arc<ResourceEntry>>>,
    after: Option<&BTreeMap<String, Arc<ResourceEntry>>>,
) -> TypeDiff {
    let empty = BTreeMap::new();
    let (before, after) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
    let mut d = TypeDiff::default();
    for (name, resource) in after {
        let n = resource.any.encoded_len();
        d.all += in_sotw(n);
        if before.get(name).is_none_or(|was| was.any != resource.any) {
            d.changed += in_sotw(n);
            d.delta += in_delta(name, n);
            d.any = true;
        }
    }
    for name in before.keys().filter(|name| !after.contains_key(*name)) {
        d.delta += 1 + prost::length_delimiter_len(name.len()) + name.len();
        d.any = true;
    }
    d
}

fn diff_parts(before: &Part, after: &Part) -> BTreeMap<&'static str, TypeDiff> {
    TYPES.iter().map(|t| (*t, diff(before.resources(t), after.resources(t)))).collect()
}

const TYPES: [&str; 7] = type_url::ALL;

/// Bytes one proxy is sent for a change, under each protocol.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Delta xDS: what this server sends (Envoy and the agent both speak it).
    pub delta: usize,
    /// State of the world, one version per type: a changed type sent whole.
    pub whole: usize,
    /// State of the world with per-resource versions.
    pub per_resource: usize,
}

fn sent(types: &BTreeMap<&'static str, TypeDiff>) -> Sent {
    let mut out = Sent::default();
    for (type_, d) in types.iter().filter(|(_, d)| d.any) {
        let whole = matches!(*type_, type_url::LISTENER | type_url::CLUSTER | type_url::AGENT);
        out.delta += envelope(type_, true) + d.delta;
        out.whole += envelope(type_, false) + d.all;
        out.per_resource += envelope(type_, false) + if whole { d.all } else { d.changed };
    }
    out
}

/// The bytes every proxy of the world is sent for `change`, proxy by proxy.
pub fn bytes_per_proxy(inventory: &Inventory, before: &Compiled, after: &Compiled) -> Vec<Sent> {
    let shared = diff_parts(before.shared(), after.shared());
    let mut namespaces: BTreeMap<&str, BTreeMap<&'static str, TypeDiff>> = BTreeMap::new();
    let mut out = Vec::with_capacity(inventory.pods.len());
    for pod in inventory.pods.keys() {
        let namespace = pod.namespace.as_str();
        let own = namespaces
            .entry(namespace)
            .or_insert_with(|| diff_parts(before.namespace(namespace), after.namespace(namespace)));
        let proxy = Proxy { pod: pod.clone() };
        let local = diff_parts(&before.local(&proxy), &after.local(&proxy));
        let types = TYPES.iter().map(|t| (*t, shared[t].add(own[t]).add(local[t]))).collect();
        out.push(sent(&types));
    }
    out
}

/// What a new proxy is sent: one discovery response per type of its whole snapshot,
/// encoded; the bytes and the time it took.
pub fn encode_snapshot(compiled: &Compiled, proxy: &Proxy) -> (usize, std::time::Duration) {
    let started = Instant::now();
    let snapshot = compiled.snapshot(proxy);
    let bytes = snapshot
        .types()
        .into_iter()
        .map(|type_| {
            DiscoveryResponse {
                version_info: "0".repeat(16),
                type_url: type_.to_string(),
                resources: snapshot.resources(type_).map(|(_, r)| r.any.clone()).collect(),
                nonce: "123456".into(),
                ..DiscoveryResponse::default()
            }
            .encode_to_vec()
            .len()
        })
        .sum();
    (bytes, started.elapsed())
}
