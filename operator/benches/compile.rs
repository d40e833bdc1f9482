//! Compile benchmark (`make bench-compile`): time and peak memory of compiling P policies
//! over S Services, for P in 1k/10k/100k and S in 100/1k/10k.
//!
//! The measured unit is what the operator does when the inventory changes: evaluate the
//! effective policies of the whole inventory and build the shared outbound side and each
//! namespace's short-name virtual hosts (`Compiled::new`; `Compiled::namespace` only looks
//! a namespace's part up), then the proxy-specific part of one pod per Service
//! (`Compiled::local`), and one full snapshot (`Compiled::snapshot`: the shared and
//! namespace parts shared, the local part its own).
//!
//! Each size runs in a child process (this binary with `--size P:S`) so that its peak
//! resident memory (VmHWM from /proc/self/status) is its own. Every time is the median of
//! RUNS runs, and the compile's spread (fastest and slowest run) is printed beside it. The
//! baseline, measured the same way in the same child, is the time to serialize the input
//! objects to JSON once — what merely reading the inventory off an API server costs — and
//! the table quotes compile time as a multiple of it, since absolute times on shared
//! machines are noisy.
//!
//! The world: 10 Services per namespace, half the namespaces labelled production; each
//! Service has an HTTP and a gRPC port, one pod and an EndpointSlice with 3 endpoints. Four
//! root policies (rate-limit Override and Default, circuit-breaker Default and Override)
//! select the production namespaces; every other policy targets one Service of its own
//! namespace: 60% RateLimitPolicies (a cluster-wide per-user limit with a match and a
//! per-pod limit), 40% CircuitBreakerPolicies (all sections but the breaker).

#[path = "../tests/support/specs.rs"]
mod specs;

#[allow(dead_code)]
mod support;

use std::{
    collections::BTreeMap,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use breakwater_api::{
    CircuitBreakerPolicy, CircuitBreakerPolicySpec, Mode, RateLimitPolicy, RateLimitPolicySpec, TargetRef,
    circuit_breaker::{Backoff, ConnectionLimits, OutlierDetection, Retry, RetryBudget, RetryOn},
    rate_limit::{FailureMode, Limit, Rate, RequestMatch, Scope},
};
use breakwater_operator::{
    compile::{Compiled, Part, Proxy, type_url},
    inventory::{Inventory, ObjectName},
    policy::{breaker, circuit_breaker, rate_limit, shadow},
    resource::Policy,
};
use k8s_openapi::{
    api::{
        core::v1::{Container, ContainerPort, Pod, PodSpec, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

const SIZES: [(usize, usize); 9] = [
    (1_000, 100),
    (1_000, 1_000),
    (1_000, 10_000),
    (10_000, 100),
    (10_000, 1_000),
    (10_000, 10_000),
    (100_000, 100),
    (100_000, 1_000),
    (100_000, 10_000),
];
const SERVICES_PER_NAMESPACE: usize = 10;
/// Runs per measurement; the median is quoted.
const RUNS: usize = 7;
const ROOT: &str = "breakwater-system";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !args.iter().any(|a| a == "--bench" || a == "--size") {
        println!("bench-compile: skipped outside `cargo bench` (run `make bench-compile`)");
        return;
    }
    if let Some(size) = args.iter().position(|a| a == "--assess").and_then(|i| args.get(i + 1)) {
        let (p, s) = size.split_once(':').expect("--assess POLICIES:SERVICES");
        assess(p.parse().expect("policies"), s.parse().expect("services"));
        return;
    }
    match args.iter().position(|a| a == "--size").and_then(|i| args.get(i + 1)) {
        Some(size) => {
            let (p, s) = size.split_once(':').expect("--size POLICIES:SERVICES");
            measure(p.parse().expect("policies"), s.parse().expect("services"));
        }
        None => run_all(),
    }
}

/// Runs every size in a child process and prints the table.
fn run_all() {
    let exe = std::env::current_exe().expect("own path");
    let mut rows = Vec::new();
    for (policies, services) in SIZES {
        eprintln!("bench-compile: {policies} policies over {services} Services…");
        let out = Command::new(&exe)
            .args(["--size", &format!("{policies}:{services}")])
            .output()
            .expect("child runs");
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            panic!("size {policies}:{services} failed");
        }
        let line = String::from_utf8_lossy(&out.stdout);
        rows.push(serde_json::from_str::<serde_json::Value>(line.trim()).expect("child prints JSON"));
    }
    println!(
        "\nCompile = effective policies and shared outbound side (Compiled::new) + the outbound routes of every \
         namespace + the local part of every pod (one per Service) + one full snapshot.\n\
         Baseline = serializing the input objects to JSON once, in the same process. Every time is the median \
         of {RUNS} runs; the compile's fastest and slowest run in brackets.\n"
    );
    println!(
        "| policies | Services | compile [spread] | ÷ baseline | Compiled::new | of which effective policies | per namespace | per pod | outbound_http | one snapshot | peak RSS (input alone) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in &rows {
        let v = |k: &str| r[k].as_f64().unwrap_or_default();
        println!(
            "| {} | {} | {:.0} ms [{:.0}–{:.0}] | {:.1}× | {:.0} ms | {:.0} ms | {:.0} ns | {:.0} µs | {} | {} | {:.0} MB ({:.0} MB) |",
            r["policies"],
            r["services"],
            v("compile_ms"),
            v("compile_min_ms"),
            v("compile_max_ms"),
            v("compile_ms") / v("baseline_ms").max(0.001),
            v("new_ms"),
            v("effective_ms"),
            v("per_namespace_us") * 1e3,
            v("per_pod_us"),
            size(v("routes_bytes")),
            size(v("snapshot_bytes")),
            v("peak_rss_mb"),
            v("input_rss_mb"),
        );
    }
    let baselines: Vec<String> =
        rows.iter().map(|r| format!("{:.0}", r["baseline_ms"].as_f64().unwrap_or_default())).collect();
    println!("\nBaseline per size (ms, same order): {}", baselines.join(", "));
}

fn size(bytes: f64) -> String {
    if bytes >= 1e6 { format!("{:.1} MB", bytes / 1e6) } else { format!("{:.0} KB", bytes / 1e3) }
}

/// The times of RUNS runs, sorted, and the last run's result.
fn runs<T>(mut run: impl FnMut() -> T) -> (Vec<Duration>, T) {
    let mut times = Vec::with_capacity(RUNS);
    let mut last = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        last = Some(run());
        times.push(t.elapsed());
    }
    times.sort();
    (times, last.expect("RUNS > 0"))
}

/// The median of RUNS runs.
fn median_of<T>(run: impl FnMut() -> T) -> (Duration, T) {
    let (times, last) = runs(run);
    (times[times.len() / 2], last)
}

fn measure(policies: usize, services: usize) {
    let inventory = world(policies, services);
    let input_rss = support::vm_kb("VmRSS");

    let (baseline, _) = median_of(|| serialize_input(&inventory));
    let (effective, _) =
        median_of(|| (rate_limit::effective(&inventory).len(), circuit_breaker::effective(&inventory).len()));
    let proxies: Vec<Proxy> = inventory.pods.keys().map(|pod| Proxy { pod: pod.clone() }).collect();
    let namespaces: Vec<&String> = inventory.namespaces.keys().filter(|n| *n != ROOT).collect();
    let (compiles, full_bytes) = runs(|| {
        let compiled = Compiled::new(&inventory);
        // Every namespace's routes, kept as an xDS server would keep them for its proxies.
        let routes: Vec<_> = namespaces.iter().map(|ns| compiled.namespace(ns).clone()).collect();
        let local: usize = proxies.iter().map(|proxy| part_bytes(&compiled.local(proxy))).sum();
        std::hint::black_box((routes, local));
        compiled.snapshot(&proxies[0]).parts().iter().map(|p| part_bytes(p)).sum::<usize>()
    });
    let compile = compiles[compiles.len() / 2];
    let (new_only, _) = median_of(|| Compiled::new(&inventory).shared().digest(type_url::CLUSTER));
    let compiled = Compiled::new(&inventory);
    let (per_namespace, _) =
        median_of(|| namespaces.iter().map(|ns| part_bytes(compiled.namespace(ns))).sum::<usize>());
    let routes_bytes = part_bytes(compiled.namespace(namespaces[0]));
    let (per_pod, _) = median_of(|| proxies.iter().map(|p| part_bytes(&compiled.local(p))).sum::<usize>());
    drop(compiled);
    let row = serde_json::json!({
        "policies": policies,
        "services": services,
        "compile_ms": compile.as_secs_f64() * 1e3,
        "compile_min_ms": compiles[0].as_secs_f64() * 1e3,
        "compile_max_ms": compiles[compiles.len() - 1].as_secs_f64() * 1e3,
        "routes_bytes": routes_bytes,
        "new_ms": new_only.as_secs_f64() * 1e3,
        "effective_ms": effective.as_secs_f64() * 1e3,
        "per_namespace_us": per_namespace.as_secs_f64() * 1e6 / namespaces.len() as f64,
        "per_pod_us": per_pod.as_secs_f64() * 1e6 / proxies.len() as f64,
        "snapshot_bytes": full_bytes,
        "baseline_ms": baseline.as_secs_f64() * 1e3,
        "input_rss_mb": input_rss as f64 / 1024.0,
        "peak_rss_mb": support::vm_kb("VmHWM") as f64 / 1024.0,
    });
    println!("{row}");
}

/// What the controllers evaluate for the status of every policy after a publish: each
/// policy's assessment, and the breakers and shadow limits its status would read (`cargo
/// bench -p breakwater-operator --bench compile -- --assess P:S`; not part of the table).
fn assess(policies: usize, services: usize) {
    let inventory = world(policies, services);
    let all = Policy::all(&inventory);
    let started = Instant::now();
    let accepted = all.iter().filter(|p| p.assess(&inventory).accepted.ok).count();
    let assessed = started.elapsed();
    let started = Instant::now();
    let breakers: usize = inventory
        .circuit_breakers
        .iter()
        .map(|p| breaker::targets(&ObjectName::of(p.as_ref()), &inventory).len())
        .sum();
    let shadows: usize = inventory
        .rate_limits
        .iter()
        .map(|p| shadow::limits(&ObjectName::of(p.as_ref()), &inventory).len())
        .sum();
    println!(
        "{policies} policies over {services} Services: assessing each ({accepted} accepted) {:.0} ms; \
         the breaker targets and shadow limits of each ({breakers} and {shadows}) {:.0} ms",
        assessed.as_secs_f64() * 1e3,
        started.elapsed().as_secs_f64() * 1e3
    );
}

/// Encoded size of a part's resources.
fn part_bytes(part: &Part) -> usize {
    type_url::ALL
        .iter()
        .flat_map(|t| part.resources(t))
        .flat_map(|r| r.values())
        .map(|r| r.any.value.len())
        .sum()
}

fn serialize_input(inventory: &Inventory) -> usize {
    let mut total = 0;
    let mut add = |v: Result<Vec<u8>, serde_json::Error>| total += v.map(|b| b.len()).unwrap_or(0);
    inventory.services.values().for_each(|o| add(serde_json::to_vec(o.as_ref())));
    inventory.endpoint_slices.values().for_each(|o| add(serde_json::to_vec(o.as_ref())));
    inventory.pods.values().for_each(|o| add(serde_json::to_vec(o.as_ref())));
    inventory.rate_limits.iter().for_each(|o| add(serde_json::to_vec(o.as_ref())));
    inventory.circuit_breakers.iter().for_each(|o| add(serde_json::to_vec(o.as_ref())));
    total
}

/// A deterministic pseudo-random sequence (no dependency, same world every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}

fn meta(namespace: &str, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: (!labels.is_empty())
            .then(|| labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        generation: Some(1),
        ..Default::default()
    }
}

fn world(policies: usize, services: usize) -> Inventory {
    let mut inventory = Inventory::new(ROOT);
    let namespaces = services.div_ceil(SERVICES_PER_NAMESPACE);
    for n in 0..namespaces {
        let tier = if n % 2 == 0 { "production" } else { "staging" };
        inventory
            .add_namespace(format!("team-{n:04}"), BTreeMap::from([("tier".to_string(), tier.to_string())]));
    }
    for i in 0..services {
        let ns = format!("team-{:04}", i / SERVICES_PER_NAMESPACE);
        let name = format!("svc-{i:05}");
        let labels = [("app", name.as_str())];
        let port = |name: &str, port: i32, target: IntOrString| ServicePort {
            name: Some(name.to_string()),
            port,
            target_port: Some(target),
            ..Default::default()
        };
        inventory.add_service(Arc::new(Service {
            metadata: meta(&ns, &name, &labels),
            spec: Some(ServiceSpec {
                selector: Some(BTreeMap::from([("app".to_string(), name.clone())])),
                ports: Some(vec![
                    port("http", 80, IntOrString::String("http".into())),
                    port("grpc", 9000, IntOrString::Int(9000)),
                ]),
                ..Default::default()
            }),
            status: None,
        }));
        let pod = format!("{name}-7c9f8d6b5-x2kqp");
        let container_port = |name: &str, port| ContainerPort {
            name: Some(name.to_string()),
            container_port: port,
            ..Default::default()
        };
        inventory.pods.insert(
            ObjectName::new(&ns, &pod),
            Arc::new(Pod {
                metadata: meta(&ns, &pod, &labels),
                spec: Some(PodSpec {
                    containers: vec![Container {
                        name: "app".into(),
                        ports: Some(vec![container_port("http", 8080), container_port("grpc", 9000)]),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: None,
            }),
        );
        let slice = format!("{name}-abcde");
        inventory.endpoint_slices.insert(
            ObjectName::new(&ns, &slice),
            Arc::new(EndpointSlice {
                metadata: meta(&ns, &slice, &[("kubernetes.io/service-name", name.as_str())]),
                address_type: "IPv4".into(),
                endpoints: (0..3)
                    .map(|e| Endpoint {
                        addresses: vec![format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256 + e)],
                        conditions: Some(EndpointConditions { ready: Some(true), ..Default::default() }),
                        zone: Some(format!("zone-{e}")),
                        ..Default::default()
                    })
                    .collect(),
                ports: Some(vec![
                    EndpointPort { name: Some("http".into()), port: Some(8080), ..Default::default() },
                    EndpointPort { name: Some("grpc".into()), port: Some(9000), ..Default::default() },
                ]),
            }),
        );
    }

    let production = LabelSelector {
        match_labels: Some(BTreeMap::from([("tier".to_string(), "production".to_string())])),
        ..Default::default()
    };
    let mut rng = Lcg(42);
    let root_count = 4.min(policies);
    for p in 0..policies {
        let name = format!("policy-{p:06}");
        let (namespace, targets, selector, mode) = if p < root_count {
            let mode = if p % 2 == 0 { Mode::Override } else { Mode::Default };
            (ROOT.to_string(), None, Some(production.clone()), Some(mode))
        } else {
            let service = rng.below(services);
            let section = (rng.below(2) == 0).then_some("http");
            let target = specs::target(section, &format!("svc-{service:05}"));
            (format!("team-{:04}", service / SERVICES_PER_NAMESPACE), Some(vec![target]), None, None)
        };
        let rate_limit = if p < root_count { p < 2 } else { rng.below(10) < 6 };
        if rate_limit {
            let mut policy = RateLimitPolicy::new(&name, rate_limit_spec(p, targets, selector, mode));
            policy.metadata.namespace = Some(namespace);
            policy.metadata.generation = Some(1);
            inventory.rate_limits.push(Arc::new(policy));
        } else {
            let mut policy = CircuitBreakerPolicy::new(&name, circuit_breaker_spec(targets, selector, mode));
            policy.metadata.namespace = Some(namespace);
            policy.metadata.generation = Some(1);
            inventory.circuit_breakers.push(Arc::new(policy));
        }
    }
    inventory
}

fn rate_limit_spec(
    p: usize,
    target_refs: Option<Vec<TargetRef>>,
    namespace_selector: Option<LabelSelector>,
    mode: Option<Mode>,
) -> RateLimitPolicySpec {
    let rate = |requests, per: &str| Rate { requests, per: breakwater_api::Duration::new(per) };
    RateLimitPolicySpec {
        target_refs,
        namespace_selector,
        service_selector: None,
        mode,
        limits: vec![
            Limit {
                name: "per-user".into(),
                matches: Some(RequestMatch {
                    path_prefix: Some(format!("/v{}/", p % 3)),
                    ..Default::default()
                }),
                key: Some(vec![specs::key_part_of(Some("x-user-id".into()), None, None, None)]),
                rate: rate(100, "1m"),
                burst: Some(20),
                algorithm: None,
                scope: Some(Scope::Cluster),
                shadow: false,
            },
            Limit {
                name: "per-pod".into(),
                matches: None,
                key: None,
                rate: rate(50, "1s"),
                burst: None,
                algorithm: None,
                scope: Some(Scope::Pod),
                shadow: false,
            },
        ],
        failure_mode: FailureMode::Open,
    }
}

fn circuit_breaker_spec(
    target_refs: Option<Vec<TargetRef>>,
    namespace_selector: Option<LabelSelector>,
    mode: Option<Mode>,
) -> CircuitBreakerPolicySpec {
    let d = breakwater_api::Duration::new;
    CircuitBreakerPolicySpec {
        target_refs,
        namespace_selector,
        service_selector: None,
        mode,
        connection_limits: Some(ConnectionLimits {
            max_connections: Some(1024),
            max_pending_requests: Some(256),
            max_requests: Some(1024),
            max_retries: None,
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: Some(5),
            interval: Some(d("10s")),
            base_ejection_time: Some(d("30s")),
            max_ejection_percent: Some(50),
            failure_percentage: None,
        }),
        retry: Some(Retry {
            attempts: 3,
            per_try_timeout: Some(d("2s")),
            retry_on: Some(vec![RetryOn::ServerError, RetryOn::Reset]),
            backoff: Some(Backoff { base: d("25ms"), max: d("250ms") }),
            budget: Some(RetryBudget { percent: 20, min_concurrency: Some(3) }),
        }),
        timeout: Some(d("10s")),
        breaker: None,
    }
}
