//! Property: any set of valid policies (valid = the CRD schema and CEL rules accept it, and
//! the compiler's own checks pass) compiles, and every resource of the snapshot decodes as
//! its type and encodes back to the same bytes; the whole snapshot renders as
//! protobuf-JSON (so every nested `Any` is a type Envoy knows).

use std::sync::Arc;

use breakwater_api::{
    CircuitBreakerPolicy, CircuitBreakerPolicySpec, Duration, Mode, RateLimitPolicy, RateLimitPolicySpec,
    TargetRef,
    circuit_breaker::{
        Backoff, Breaker, BreakerFallback, ConnectionLimits, FailurePercentage, OutlierDetection, Retry,
        RetryBudget, RetryOn, SlidingWindow, SlowCall, WindowKind,
    },
    rate_limit::{
        Algorithm, FailureMode, HeaderMatch, HttpMethod, KeyPart, Limit, Rate, RequestMatch, Scope,
    },
    validation,
};
use breakwater_operator::{
    compile::{self, Proxy, type_url},
    inventory::Inventory,
    policy, render,
};
use envoy_types::pb::envoy::config::{
    cluster::v3::Cluster,
    endpoint::v3::ClusterLoadAssignment,
    listener::v3::Listener,
    route::v3::{RouteConfiguration, VirtualHost},
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use proptest::prelude::*;
use prost::Message;

use crate::support::{
    self,
    specs::{key_part_of, target},
};

const WORLD: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {tier: production}}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: http}, {name: grpc, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: api}
  ports: [{name: web, port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: api, image: api, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-a, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: grpc, port: 9000}]
endpoints: [{addresses: [10.0.0.1], zone: z1}, {addresses: [10.0.0.2]}]
"#;

fn world() -> Inventory {
    support::world::load(WORLD)
}

fn duration(max_secs: u32) -> impl Strategy<Value = Duration> {
    prop_oneof![
        (1..=max_secs).prop_map(|s| Duration::new(format!("{s}s"))),
        (1..=999u32).prop_map(|ms| Duration::new(format!("{ms}ms"))),
        (1..=(max_secs / 60).max(1)).prop_map(|m| Duration::new(format!("{m}m"))),
    ]
}

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["x-user-id", "X-Tenant", "authorization", "x-api-key"]).prop_map(String::from)
}

fn request_match() -> impl Strategy<Value = RequestMatch> {
    let path = prop::sample::select(vec!["/", "/v1/", "/v1/login.json", "/a+b/(c)", "/ü/*"]);
    (
        prop::option::of(path.clone()),
        any::<bool>(),
        prop::option::of(prop::sample::subsequence(
            vec![HttpMethod::GET, HttpMethod::POST, HttpMethod::PUT, HttpMethod::DELETE, HttpMethod::PATCH],
            1..=3,
        )),
        prop::option::of(prop::collection::vec(
            (name(), "[a-z0-9 .]{0,12}").prop_map(|(name, value)| HeaderMatch { name, value }),
            1..=2,
        )),
    )
        .prop_map(|(path, exact, methods, headers)| RequestMatch {
            path_prefix: path.filter(|_| !exact).map(String::from),
            path: path.filter(|_| exact).map(String::from),
            methods,
            headers,
        })
}

fn key_part(pod: bool) -> BoxedStrategy<KeyPart> {
    let header = name().prop_map(|h| key_part_of(Some(h), None, None, None));
    let value = "[a-z0-9-]{1,10}".prop_map(|v| key_part_of(None, None, None, Some(v)));
    if pod {
        prop_oneof![header, value].boxed()
    } else {
        prop_oneof![
            header,
            value,
            Just(key_part_of(None, Some(true), None, None)),
            Just(key_part_of(None, None, Some(true), None)),
        ]
        .boxed()
    }
}

fn limit(index: usize) -> impl Strategy<Value = Limit> {
    any::<bool>().prop_flat_map(move |pod| {
        let per = if pod {
            (1..=86_400u32).prop_map(|s| Duration::new(format!("{s}s"))).boxed()
        } else {
            prop_oneof![
                (1..=86_400u32).prop_map(|s| Duration::new(format!("{s}s"))),
                (1..=1_440u32).prop_map(|m| Duration::new(format!("{m}m"))),
                (1..=24u32).prop_map(|h| Duration::new(format!("{h}h"))),
                (1_001..=9_999u32).prop_map(|ms| Duration::new(format!("{ms}ms"))),
            ]
            .boxed()
        };
        let algorithm = if pod {
            prop::option::of(Just(Algorithm::TokenBucket)).boxed()
        } else {
            prop::option::of(prop::sample::select(vec![
                Algorithm::TokenBucket,
                Algorithm::SlidingWindow,
                Algorithm::FixedWindow,
            ]))
            .boxed()
        };
        (
            prop::option::of(request_match()),
            prop::option::of(prop::collection::vec(key_part(pod), 1..=3)),
            1..=1_000_000_000u32,
            per,
            algorithm,
            prop::option::of(0..=1_000_000_000u32),
            any::<bool>(),
        )
            .prop_map(move |(matches, key, requests, per, algorithm, burst, shadow)| {
                let token_bucket = algorithm.is_none_or(|a| a == Algorithm::TokenBucket);
                Limit {
                    name: format!("limit-{index}"),
                    matches,
                    key,
                    rate: Rate { requests, per },
                    burst: burst.filter(|_| token_bucket),
                    algorithm,
                    scope: Some(if pod { Scope::Pod } else { Scope::Cluster }),
                    shadow,
                }
            })
    })
}

/// Where a policy attaches: a target in shop, or the root namespace with a selector.
fn attachment() -> impl Strategy<Value = (String, Option<Vec<TargetRef>>, Option<LabelSelector>, Option<Mode>)>
{
    prop_oneof![
        prop::sample::select(vec![
            vec![target(Some("http"), "api")],
            vec![target(None, "api")],
            vec![target(Some("grpc"), "api"), target(None, "web")],
        ])
        .prop_map(|refs| ("shop".to_string(), Some(refs), None, None)),
        prop::sample::select(vec![Mode::Default, Mode::Override]).prop_map(|mode| (
            "breakwater-system".to_string(),
            None,
            Some(LabelSelector::default()),
            Some(mode)
        )),
    ]
}

fn rate_limit_policy(index: usize) -> impl Strategy<Value = RateLimitPolicy> {
    (
        attachment(),
        (1..=3usize).prop_flat_map(|n| (0..n).map(limit).collect::<Vec<_>>()),
        prop::sample::select(vec![FailureMode::Open, FailureMode::Closed]),
    )
        .prop_map(move |((ns, target_refs, namespace_selector, mode), limits, failure_mode)| {
            let spec = RateLimitPolicySpec {
                target_refs,
                namespace_selector,
                service_selector: None,
                mode,
                limits,
                failure_mode,
            };
            let mut policy = RateLimitPolicy::new(&format!("rl-{index}"), spec);
            policy.metadata.namespace = Some(ns);
            policy
        })
}

fn circuit_breaker_policy(index: usize) -> impl Strategy<Value = CircuitBreakerPolicy> {
    let limits = (
        prop::option::of(1..=1_000_000u32),
        prop::option::of(1..=1_000_000u32),
        prop::option::of(1..=1_000_000u32),
        prop::option::of(0..=1_000_000u32),
    )
        .prop_map(|(a, b, c, d)| ConnectionLimits {
            max_connections: a,
            max_pending_requests: b,
            max_requests: c,
            max_retries: d,
        });
    let outlier = (
        prop::option::of(1..=1000u32),
        prop::option::of(duration(600)),
        prop::option::of((1..=600u32).prop_map(|s| Duration::new(format!("{s}s")))),
        prop::option::of(0..=100u32),
        prop::option::of((0..=100u32, prop::option::of(1..=1000u32), prop::option::of(1..=100u32))),
    )
        .prop_map(|(c, interval, base, max, fp)| OutlierDetection {
            consecutive_5xx: c,
            interval,
            base_ejection_time: base,
            max_ejection_percent: max,
            failure_percentage: fp.map(|(threshold, request_volume, minimum_hosts)| FailurePercentage {
                threshold,
                request_volume,
                minimum_hosts,
            }),
        });
    let retry = (
        1..=10u32,
        prop::option::of(1..=30u32),
        prop::option::of(prop::sample::subsequence(
            vec![
                RetryOn::ServerError,
                RetryOn::GatewayError,
                RetryOn::Reset,
                RetryOn::ConnectFailure,
                RetryOn::Retriable4xx,
                RetryOn::RefusedStream,
            ],
            1..=4,
        )),
        prop::option::of((1..=500u32, 0..=5000u32)),
        prop::option::of((1..=100u32, prop::option::of(0..=100u32))),
    )
        .prop_map(|(attempts, per_try, retry_on, backoff, budget)| Retry {
            attempts,
            per_try_timeout: per_try.map(|s| Duration::new(format!("{s}s"))),
            retry_on,
            backoff: backoff.map(|(base, extra)| Backoff {
                base: Duration::new(format!("{base}ms")),
                max: Duration::new(format!("{}ms", base + extra)),
            }),
            budget: budget.map(|(percent, min_concurrency)| RetryBudget { percent, min_concurrency }),
        });
    // A shared breaker: every agent gets it as a resource of its own.
    let window = prop_oneof![
        (1..=100_000u32).prop_map(|size| SlidingWindow {
            kind: WindowKind::Count,
            size: Some(size),
            duration: None
        }),
        duration(600).prop_map(|d| SlidingWindow { kind: WindowKind::Time, size: None, duration: Some(d) }),
    ];
    let breaker = (
        1..=100u32,
        prop::option::of((duration(60), 1..=100u32)),
        window,
        prop::option::of(1..=100_000u32),
        duration(600),
        prop::option::of(1..=1000u32),
        prop::option::of(prop::sample::select(vec![BreakerFallback::Admit, BreakerFallback::Reject])),
    )
        .prop_map(
            |(failure_rate_threshold, slow, sliding_window, minimum_calls, open, half_open, fallback)| {
                Breaker {
                    failure_rate_threshold,
                    slow_call: slow.map(|(duration, rate_threshold)| SlowCall { duration, rate_threshold }),
                    sliding_window,
                    minimum_calls,
                    open_duration: open,
                    half_open_calls: half_open,
                    fallback,
                }
            },
        );
    (
        attachment(),
        prop::option::of(limits),
        prop::option::of(outlier),
        prop::option::of(retry),
        prop::option::of(31..=600u32),
        prop::option::of(breaker),
    )
        .prop_filter("at least one section", |(_, l, o, r, t, b)| {
            l.is_some() || o.is_some() || r.is_some() || t.is_some() || b.is_some()
        })
        .prop_map(
            move |((ns, target_refs, namespace_selector, mode), limits, outlier, retry, timeout, breaker)| {
                let spec = CircuitBreakerPolicySpec {
                    target_refs,
                    namespace_selector,
                    service_selector: None,
                    mode,
                    connection_limits: limits,
                    outlier_detection: outlier,
                    retry,
                    timeout: timeout.map(|s| Duration::new(format!("{s}s"))),
                    breaker,
                };
                let mut policy = CircuitBreakerPolicy::new(&format!("cb-{index}"), spec);
                policy.metadata.namespace = Some(ns);
                policy
            },
        )
}

/// The API server would accept it: schema and CEL, through the same generated CRDs.
fn assert_schema_valid<K: serde::Serialize>(api_version: &str, kind: &str, object: &K) {
    let mut value = serde_json::to_value(object).expect("serializes");
    value["apiVersion"] = api_version.into();
    value["kind"] = kind.into();
    let crd = validation::crd_for(api_version, kind).expect("crd");
    let errors = validation::validate_object(crd, &value);
    assert!(errors.is_empty(), "{kind} is not valid: {errors:?}\n{value:#}");
}

fn round_trips<M: Message + Default>(bytes: &[u8]) -> bool {
    M::decode(bytes).map(|m| m.encode_to_vec() == bytes).unwrap_or(false)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn valid_policies_compile_and_every_resource_round_trips(
        rate_limits in (0..=3usize).prop_flat_map(|n| (0..n).map(rate_limit_policy).collect::<Vec<_>>()),
        circuit_breakers in (0..=2usize).prop_flat_map(|n| (0..n).map(circuit_breaker_policy).collect::<Vec<_>>()),
    ) {
        let mut inventory = world();
        for policy in &rate_limits {
            assert_schema_valid("breakwater.dev/v1alpha1", "RateLimitPolicy", policy);
            prop_assert!(policy::check::rate_limit_policy(&policy.spec).is_ok());
            inventory.rate_limits.push(Arc::new(policy.clone()));
        }
        for policy in &circuit_breakers {
            assert_schema_valid("breakwater.dev/v1alpha1", "CircuitBreakerPolicy", policy);
            prop_assert!(policy::check::circuit_breaker_policy(&policy.spec).is_ok());
            inventory.circuit_breakers.push(Arc::new(policy.clone()));
        }
        for pod in ["shop/api-1", "shop/unknown"] {
            let proxy = Proxy::from_node_id(pod).expect("node id");
            let snapshot = compile::compile(&inventory, &proxy);
            for type_url in snapshot.types() {
                for (name, resource) in snapshot.resources(type_url) {
                    let any = &resource.any;
                    prop_assert_eq!(any.type_url.as_str(), type_url);
                    let bytes = any.value.as_slice();
                    let ok = match type_url {
                        type_url::CLUSTER => round_trips::<Cluster>(bytes),
                        type_url::ENDPOINT => round_trips::<ClusterLoadAssignment>(bytes),
                        type_url::LISTENER => round_trips::<Listener>(bytes),
                        type_url::ROUTE => round_trips::<RouteConfiguration>(bytes),
                        type_url::VIRTUAL_HOST => round_trips::<VirtualHost>(bytes),
                        type_url::AGENT => breakwater_api::agent::decode(bytes)
                            .map(|c| breakwater_api::agent::encode(&c) == bytes)
                            .unwrap_or(false),
                        type_url::BREAKER => breakwater_api::agent::decode_breaker(bytes)
                            .map(|r| r.id == name && breakwater_api::agent::encode_breaker(&r) == bytes)
                            .unwrap_or(false),
                        other => panic!("unexpected type {other}"),
                    };
                    prop_assert!(ok, "{} {} does not round-trip", type_url, name);
                }
            }
            let rendered = render::render(&proxy, &snapshot);
            prop_assert!(rendered.is_ok(), "{:?}", rendered.err());
            let printed = render::print(&[rendered.expect("rendered")], render::Format::Json, true);
            prop_assert!(printed.is_ok(), "{:?}", printed.err());
        }
    }
}
