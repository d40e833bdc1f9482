//! Where every policy field lands in the compiled configuration, how root Default and
//! Override policies reach it, which policies a snapshot says it carries, and that the same
//! inputs compile to the same bytes. Worlds are YAML, loaded by the standalone loader (so
//! every fixture passes the CRD schema and CEL rules); resources are decoded from the
//! snapshot exactly as Envoy receives them.

use std::collections::BTreeSet;

use breakwater_api::{
    agent::{AgentConfig, BreakerRule, LIMIT_KEY, LeaseRule, RateLimitRule},
    circuit_breaker::{BreakerFallback, WindowKind},
};
use breakwater_operator::{
    compile::{self, Compiled, PolicyVersion, Proxy, Snapshot, names, type_url},
    inventory::{Inventory, ObjectName},
    policy,
};
use envoy_types::pb::envoy::{
    config::{
        accesslog::v3::{access_log, access_log_filter, extension_filter},
        cluster::v3::{Cluster, OutlierDetection, circuit_breakers::Thresholds},
        core::v3::{ApiVersion, GrpcService, address, grpc_service, socket_address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
        listener::v3::Listener,
        route::v3::{
            HeaderMatcher, RateLimit, RetryPolicy, RouteAction, RouteConfiguration, VirtualHost,
            header_matcher::HeaderMatchSpecifier, rate_limit::action::ActionSpecifier, route,
        },
    },
    extensions::{
        access_loggers::{filters::cel::v3::ExpressionFilter, grpc::v3::HttpGrpcAccessLogConfig},
        common::ratelimit::v3::LocalRateLimitDescriptor,
        filters::{
            http::{local_ratelimit::v3::LocalRateLimit, ratelimit::v3::RateLimit as RateLimitFilter},
            network::http_connection_manager::v3::{HttpConnectionManager, http_filter},
        },
    },
    r#type::matcher::v3::string_matcher::MatchPattern,
};
use prost::Message;

use crate::support;

/// In the two namespaces of `support::world::NAMESPACES`: `shop/api` has a named targetPort
/// and a gRPC port, `shop/web` a numeric one; `lab/api` shares a name with `shop/api`.
const WORLD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop, labels: {public: "true"}}
spec:
  selector: {app: api}
  ports:
  - {name: http, port: 80, targetPort: http}
  - {name: grpc-admin, port: 9000, targetPort: 9000}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 8080, targetPort: 8081}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: lab}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, labels: {app: api}}
spec:
  containers: [{name: api, image: api, ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9000}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  containers: [{name: web, image: web}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: lab, labels: {app: api}}
spec:
  containers: [{name: api, image: api}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-a, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: grpc-admin, port: 9000}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: true}, zone: z1}
- {addresses: [10.0.0.2], conditions: {ready: false}, zone: z1}
- {addresses: [10.0.0.3], zone: z2}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-b, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.0.0.1], conditions: {ready: true}, zone: z1}
- {addresses: [10.0.0.4], conditions: {ready: true}, zone: z1}
"#;

fn world(policies: &str) -> Inventory {
    support::world::load(&format!("{}\n---\n{WORLD}\n---\n{policies}", support::world::NAMESPACES))
}

fn proxy(id: &str) -> Proxy {
    Proxy::from_node_id(id).expect("node id")
}

fn snapshot(policies: &str, id: &str) -> Snapshot {
    compile::compile(&world(policies), &proxy(id))
}

fn decode<M: Message + Default>(snapshot: &Snapshot, type_url: &str, name: &str) -> M {
    let resource = snapshot.get(type_url, name).unwrap_or_else(|| panic!("no {type_url} {name:?}"));
    M::decode(resource.any.value.as_slice()).expect("decodes")
}

const API_80: &str = "outbound|80|api.shop.svc.cluster.local";

fn cluster(snapshot: &Snapshot, name: &str) -> Cluster {
    decode(snapshot, type_url::CLUSTER, name)
}

fn thresholds(snapshot: &Snapshot) -> Thresholds {
    cluster(snapshot, API_80).circuit_breakers.expect("circuit breakers").thresholds[0]
}

fn outlier(snapshot: &Snapshot) -> OutlierDetection {
    cluster(snapshot, API_80).outlier_detection.expect("outlier detection")
}

/// The virtual host `host` (`svc.ns.svc.cluster.local:port`, or `svc:port` for short names).
fn virtual_host(snapshot: &Snapshot, host: &str) -> VirtualHost {
    decode(snapshot, type_url::VIRTUAL_HOST, &format!("{}/{host}", names::OUTBOUND_HTTP))
}

fn route_action(vhost: &VirtualHost) -> RouteAction {
    match vhost.routes[0].action.clone() {
        Some(route::Action::Route(action)) => action,
        other => panic!("not a route action: {other:?}"),
    }
}

fn api_route(snapshot: &Snapshot) -> RouteAction {
    route_action(&virtual_host(snapshot, "api.shop.svc.cluster.local:80"))
}

fn retry(snapshot: &Snapshot) -> RetryPolicy {
    api_route(snapshot).retry_policy.expect("retry policy")
}

fn agent(snapshot: &Snapshot) -> AgentConfig {
    let any = &snapshot.get(type_url::AGENT, names::AGENT_RESOURCE).expect("agent resource").any;
    let config = breakwater_api::agent::decode(&any.value).expect("agent config decodes");
    assert!(config.breakers.is_empty(), "breakers are resources of their own: {config:?}");
    config
}

/// The agent's breakers: every resource of the breaker type, each named by its rule's id.
fn breakers(snapshot: &Snapshot) -> Vec<BreakerRule> {
    snapshot
        .resources(type_url::BREAKER)
        .map(|(name, resource)| {
            assert_eq!(resource.any.type_url, type_url::BREAKER);
            let rule = breakwater_api::agent::decode_breaker(&resource.any.value).expect("breaker decodes");
            assert_eq!(rule.id, name, "a breaker resource is named by its id");
            rule
        })
        .collect()
}

fn inbound_route(snapshot: &Snapshot, target: u16) -> RouteAction {
    let routes: RouteConfiguration = decode(snapshot, type_url::ROUTE, &format!("inbound|{target}"));
    route_action(&routes.virtual_hosts[0])
}

fn local_rate_limit(snapshot: &Snapshot, target: u16) -> LocalRateLimit {
    let routes: RouteConfiguration = decode(snapshot, type_url::ROUTE, &format!("inbound|{target}"));
    let any = routes.virtual_hosts[0].routes[0]
        .typed_per_filter_config
        .get(names::LOCAL_RATELIMIT_FILTER)
        .expect("local rate limit on the route")
        .clone();
    LocalRateLimit::decode(any.value.as_slice()).expect("decodes")
}

/// The (key, value) entries each route-level rate limit of a port produces, as text.
fn descriptors(rate_limits: &[RateLimit]) -> Vec<Vec<String>> {
    rate_limits
        .iter()
        .map(|rl| {
            rl.actions
                .iter()
                .map(|a| match a.action_specifier.as_ref().expect("action") {
                    ActionSpecifier::GenericKey(g) => format!("{}={}", g.descriptor_key, g.descriptor_value),
                    ActionSpecifier::HeaderValueMatch(m) => {
                        format!("{}={}", m.descriptor_key, m.descriptor_value)
                    }
                    ActionSpecifier::RequestHeaders(h) => {
                        format!(
                            "{}=<{}{}>",
                            h.descriptor_key,
                            h.header_name,
                            if h.skip_if_absent { "?" } else { "" }
                        )
                    }
                    ActionSpecifier::RemoteAddress(_) => "remote_address=<client>".to_string(),
                    ActionSpecifier::Extension(e) => format!("extension={}", e.name),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .collect()
}

fn header_value_match(rate_limit: &RateLimit) -> Vec<HeaderMatcher> {
    rate_limit
        .actions
        .iter()
        .find_map(|a| match &a.action_specifier {
            Some(ActionSpecifier::HeaderValueMatch(m)) => Some(m.headers.clone()),
            _ => None,
        })
        .expect("a header_value_match action")
}

fn pattern(matcher: &HeaderMatcher) -> (String, MatchPattern) {
    match matcher.header_match_specifier.clone() {
        Some(HeaderMatchSpecifier::StringMatch(s)) => {
            (matcher.name.clone(), s.match_pattern.expect("pattern"))
        }
        other => panic!("unexpected matcher {other:?}"),
    }
}

fn cbp(spec: &str) -> String {
    format!(
        "apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: cb, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, name: api, sectionName: http}}]\n{spec}"
    )
}

fn rlp(limits: &str) -> String {
    format!(
        "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: rl, namespace: shop}}\nspec:\n  targetRefs: [{{kind: Service, name: api, sectionName: http}}]\n{limits}"
    )
}

const API_POD: &str = "shop/api-1";

// ---- CircuitBreakerPolicy: connectionLimits -> cluster circuit_breakers -----------------

#[test]
fn connection_limits_max_connections() {
    let s = snapshot(&cbp("  connectionLimits: {maxConnections: 100}"), API_POD);
    assert_eq!(thresholds(&s).max_connections.map(|v| v.value), Some(100));
    // Unset limits are unlimited, not Envoy's default of 1024.
    assert_eq!(thresholds(&s).max_requests.map(|v| v.value), Some(u32::MAX));
}

#[test]
fn connection_limits_max_pending_requests() {
    let s = snapshot(&cbp("  connectionLimits: {maxPendingRequests: 7}"), API_POD);
    assert_eq!(thresholds(&s).max_pending_requests.map(|v| v.value), Some(7));
}

#[test]
fn connection_limits_max_requests() {
    let s = snapshot(&cbp("  connectionLimits: {maxRequests: 300}"), API_POD);
    assert_eq!(thresholds(&s).max_requests.map(|v| v.value), Some(300));
}

#[test]
fn connection_limits_max_retries() {
    let s = snapshot(&cbp("  connectionLimits: {maxRetries: 0}"), API_POD);
    assert_eq!(thresholds(&s).max_retries.map(|v| v.value), Some(0));
}

#[test]
fn services_without_policy_are_unlimited() {
    let s = snapshot("", API_POD);
    let t = thresholds(&s);
    for value in [t.max_connections, t.max_pending_requests, t.max_requests, t.max_retries] {
        assert_eq!(value.map(|v| v.value), Some(u32::MAX));
    }
    assert!(cluster(&s, API_80).outlier_detection.is_none());
    assert_eq!(api_route(&s).timeout.map(|t| t.seconds), Some(0), "no deadline nobody asked for");
    assert!(api_route(&s).retry_policy.is_none());
}

// ---- outlierDetection -> cluster outlier_detection --------------------------------------

#[test]
fn outlier_detection_consecutive_5xx() {
    let s = snapshot(&cbp("  outlierDetection: {consecutive5xx: 4}"), API_POD);
    let o = outlier(&s);
    assert_eq!(o.consecutive_5xx.map(|v| v.value), Some(4));
    assert_eq!(o.enforcing_consecutive_5xx.map(|v| v.value), Some(100));
    assert_eq!(o.enforcing_success_rate.map(|v| v.value), Some(0), "success-rate ejection was not asked for");
}

#[test]
fn outlier_detection_interval() {
    let s = snapshot(&cbp("  outlierDetection: {interval: 1m30s}"), API_POD);
    assert_eq!(outlier(&s).interval.map(|d| d.seconds), Some(90));
    // Consecutive-5xx ejection (on by default in Envoy) is off when not asked for.
    assert_eq!(outlier(&s).enforcing_consecutive_5xx.map(|v| v.value), Some(0));
}

#[test]
fn outlier_detection_base_ejection_time() {
    let s = snapshot(&cbp("  outlierDetection: {baseEjectionTime: 45s}"), API_POD);
    assert_eq!(outlier(&s).base_ejection_time.map(|d| d.seconds), Some(45));
}

#[test]
fn outlier_detection_max_ejection_percent() {
    let s = snapshot(&cbp("  outlierDetection: {maxEjectionPercent: 33}"), API_POD);
    assert_eq!(outlier(&s).max_ejection_percent.map(|v| v.value), Some(33));
}

#[test]
fn outlier_detection_failure_percentage() {
    let s = snapshot(
        &cbp("  outlierDetection: {failurePercentage: {threshold: 40, requestVolume: 25, minimumHosts: 2}}"),
        API_POD,
    );
    let o = outlier(&s);
    assert_eq!(o.failure_percentage_threshold.map(|v| v.value), Some(40));
    assert_eq!(o.failure_percentage_request_volume.map(|v| v.value), Some(25));
    assert_eq!(o.failure_percentage_minimum_hosts.map(|v| v.value), Some(2));
    assert_eq!(o.enforcing_failure_percentage.map(|v| v.value), Some(100), "off by default in Envoy");
}

// ---- retry -> route retry_policy (+ budget on the cluster) ------------------------------

#[test]
fn retry_attempts() {
    let s = snapshot(&cbp("  retry: {attempts: 4}"), API_POD);
    assert_eq!(retry(&s).num_retries.map(|v| v.value), Some(4));
    assert_eq!(retry(&s).retry_on, compile::DEFAULT_RETRY_ON, "safe default without retryOn");
}

#[test]
fn retry_per_try_timeout() {
    let s = snapshot(&cbp("  retry: {attempts: 2, perTryTimeout: 750ms}"), API_POD);
    let per_try = retry(&s).per_try_timeout.expect("per try timeout");
    assert_eq!((per_try.seconds, per_try.nanos), (0, 750_000_000));
}

#[test]
fn retry_retry_on() {
    let s = snapshot(&cbp("  retry: {attempts: 2, retryOn: [gateway-error, retriable-4xx, reset]}"), API_POD);
    assert_eq!(retry(&s).retry_on, "gateway-error,retriable-4xx,reset");
}

#[test]
fn retry_backoff() {
    let s = snapshot(&cbp("  retry: {attempts: 2, backoff: {base: 10ms, max: 1s}}"), API_POD);
    let backoff = retry(&s).retry_back_off.expect("backoff");
    assert_eq!(backoff.base_interval.map(|d| d.nanos), Some(10_000_000));
    assert_eq!(backoff.max_interval.map(|d| d.seconds), Some(1));
}

#[test]
fn retry_budget() {
    let s = snapshot(&cbp("  retry: {attempts: 2, budget: {percent: 25, minConcurrency: 5}}"), API_POD);
    let budget = thresholds(&s).retry_budget.expect("retry budget");
    assert_eq!(budget.budget_percent.map(|p| p.value), Some(25.0));
    assert_eq!(budget.min_retry_concurrency.map(|v| v.value), Some(5));
}

#[test]
fn retries_try_another_endpoint() {
    let s = snapshot(&cbp("  retry: {attempts: 2}"), API_POD);
    let predicates: Vec<String> = retry(&s).retry_host_predicate.iter().map(|p| p.name.clone()).collect();
    assert_eq!(predicates, ["envoy.retry_host_predicates.previous_hosts"]);
}

// ---- timeout -> route timeout -----------------------------------------------------------

#[test]
fn timeout() {
    let s = snapshot(&cbp("  timeout: 2m"), API_POD);
    assert_eq!(api_route(&s).timeout.map(|d| d.seconds), Some(120));
}

// ---- breaker: named route + descriptor, the listener's check and log, every agent's rule --

const BREAKER: &str =
    "  breaker: {failureRateThreshold: 50, slidingWindow: {type: Count, size: 10}, openDuration: 30s}";

fn outbound_hcm(s: &Snapshot) -> HttpConnectionManager {
    let listener: Listener = decode(s, type_url::LISTENER, names::OUTBOUND_HTTP);
    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
        listener.filter_chains[0].filters[0].config_type.clone()
    else {
        panic!("no HCM")
    };
    HttpConnectionManager::decode(any.value.as_slice()).expect("hcm")
}

#[test]
fn breaker_names_the_route_and_sends_its_descriptor() {
    // Every caller's routes, in the Service's namespace (short names) and elsewhere.
    for caller in [API_POD, "lab/api-1", "shop/unknown"] {
        let s = snapshot(&cbp(BREAKER), caller);
        let host = virtual_host(&s, "api.shop.svc.cluster.local:80");
        assert_eq!(host.routes[0].name, "shop/api:80", "the breaker id, with the port's number");
        assert_eq!(
            descriptors(&route_action(&host).rate_limits),
            [[format!("{}=shop/api:80", breakwater_api::agent::BREAKER_KEY)]]
        );
        // sectionName: http — the other port has no breaker, so no name and no descriptor.
        let admin = virtual_host(&s, "api.shop.svc.cluster.local:9000");
        assert_eq!(admin.routes[0].name, "", "only breaker routes are named");
        assert!(route_action(&admin).rate_limits.is_empty());
    }
    let none = snapshot("", API_POD);
    let routes: RouteConfiguration = decode(&none, type_url::ROUTE, names::OUTBOUND_HTTP);
    assert!(routes.virtual_hosts.iter().all(|v| v.routes[0].name.is_empty()));
}

#[test]
fn the_outbound_listener_asks_the_agent_and_logs_breaker_calls_to_it() {
    let s = snapshot(&cbp(BREAKER), API_POD);
    let hcm = outbound_hcm(&s);
    let filters: Vec<&str> = hcm.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(filters, [names::RATELIMIT_FILTER, "envoy.filters.http.router"]);
    let Some(http_filter::ConfigType::TypedConfig(any)) = hcm.http_filters[0].config_type.clone() else {
        panic!("no config")
    };
    let check = RateLimitFilter::decode(any.value.as_slice()).expect("ratelimit");
    assert_eq!(check.domain, breakwater_api::agent::DOMAIN);
    assert!(!check.failure_mode_deny, "an agent that does not answer must not stop the calls");
    assert_eq!(check.timeout.map(|t| t.nanos), Some(compile::RLS_TIMEOUT_MS as i32 * 1_000_000));
    assert_eq!(check.rate_limited_status.map(|s| s.code), Some(503));
    assert!(!check.rate_limited_as_resource_exhausted, "gRPC callers get UNAVAILABLE");
    assert_eq!(check.enable_x_ratelimit_headers, 0, "no X-RateLimit-* headers");
    assert!(check.disable_x_envoy_ratelimited_header);
    let service = check.rate_limit_service.expect("service");
    assert_eq!(service.transport_api_version, ApiVersion::V3 as i32);
    assert_eq!(agent_cluster(service.grpc_service), names::AGENT_CLUSTER);

    assert_eq!(hcm.access_log.len(), 1);
    let log = &hcm.access_log[0];
    assert_eq!(log.name, "envoy.access_loggers.http_grpc");
    let Some(access_log::ConfigType::TypedConfig(any)) = log.config_type.clone() else { panic!("no config") };
    let common = HttpGrpcAccessLogConfig::decode(any.value.as_slice()).expect("grpc log").common_config;
    let common = common.expect("common config");
    assert_eq!(common.log_name, breakwater_api::agent::BREAKER_LOG_NAME);
    assert_eq!(common.transport_api_version, ApiVersion::V3 as i32);
    assert_eq!(agent_cluster(common.grpc_service), names::AGENT_CLUSTER);
    assert_eq!(common.buffer_flush_interval.map(|d| (d.seconds, d.nanos)), Some((0, 10_000_000)));
    assert_eq!(common.buffer_size_bytes.map(|v| v.value), Some(16_384));
    let Some(access_log_filter::FilterSpecifier::ExtensionFilter(filter)) =
        log.filter.clone().and_then(|f| f.filter_specifier)
    else {
        panic!("no extension filter")
    };
    assert_eq!(filter.name, "envoy.access_loggers.extension_filters.cel");
    let Some(extension_filter::ConfigType::TypedConfig(any)) = filter.config_type else { panic!("no CEL") };
    let cel = ExpressionFilter::decode(any.value.as_slice()).expect("CEL filter");
    assert_eq!(cel.expression, "xds.route_name != ''");
    assert_eq!(cel.expression, compile::BREAKER_LOG_FILTER);

    // The listener is the same with or without breakers: they come and go in RDS only.
    let listener =
        |s: &Snapshot| s.get(type_url::LISTENER, names::OUTBOUND_HTTP).expect("listener").any.clone();
    assert_eq!(listener(&s), listener(&snapshot("", API_POD)));
}

fn agent_cluster(service: Option<GrpcService>) -> String {
    match service.and_then(|s| s.target_specifier) {
        Some(grpc_service::TargetSpecifier::EnvoyGrpc(envoy)) => envoy.cluster_name,
        other => panic!("not Envoy's gRPC client: {other:?}"),
    }
}

#[test]
fn every_agent_gets_every_breaker_with_its_defaults() {
    let expected = BreakerRule {
        id: "shop/api:80".into(),
        policy: "shop/cb".into(),
        failure_rate_threshold: 50,
        slow_call_ms: 0,
        slow_call_rate_threshold: 0,
        window: WindowKind::Count,
        window_size: 10,
        window_ms: 0,
        minimum_calls: 10,
        open_ms: 30_000,
        half_open_calls: compile::DEFAULT_HALF_OPEN_CALLS,
        fallback: BreakerFallback::Admit,
    };
    // The callers of every namespace, the pods behind the Service, and a pod the inventory
    // does not know (its Envoy has the outbound routes that ask about the breaker).
    for pod in [API_POD, "shop/web-1", "lab/api-1", "shop/unknown"] {
        assert_eq!(breakers(&snapshot(&cbp(BREAKER), pod)), std::slice::from_ref(&expected), "{pod}");
    }
    assert!(breakers(&snapshot("", API_POD)).is_empty());
}

#[test]
fn a_breaker_rule_carries_every_field_in_milliseconds() {
    let spec = "  breaker:\n    failureRateThreshold: 40\n    slowCall: {duration: 1s500ms, rateThreshold: 70}\n    slidingWindow: {type: Time, duration: 1m}\n    minimumCalls: 5\n    openDuration: 45s\n    halfOpenCalls: 2\n    fallback: Reject";
    let rules = breakers(&snapshot(&cbp(spec), API_POD));
    assert_eq!(
        rules,
        [BreakerRule {
            id: "shop/api:80".into(),
            policy: "shop/cb".into(),
            failure_rate_threshold: 40,
            slow_call_ms: 1_500,
            slow_call_rate_threshold: 70,
            window: WindowKind::Time,
            window_size: 0,
            window_ms: 60_000,
            minimum_calls: 5,
            open_ms: 45_000,
            half_open_calls: 2,
            fallback: BreakerFallback::Reject,
        }]
    );
    // minimumCalls defaults to 100: as it is for a Time window, capped by a Count window.
    let time =
        "  breaker: {failureRateThreshold: 50, slidingWindow: {type: Time, duration: 10s}, openDuration: 1s}";
    let count =
        "  breaker: {failureRateThreshold: 50, slidingWindow: {type: Count, size: 500}, openDuration: 1s}";
    for (spec, minimum) in [(time, 100), (count, 100), (BREAKER, 10)] {
        assert_eq!(breakers(&snapshot(&cbp(spec), API_POD))[0].minimum_calls, minimum, "{spec}");
    }
    assert_eq!(compile::DEFAULT_MINIMUM_CALLS, 100);
}

#[test]
fn breakers_are_sorted_by_id_and_name_the_policy_their_section_came_from() {
    // A root Default breaker for every production Service port, the namespace's own on api:80.
    let root = "apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {name: root-breaker, namespace: breakwater-system}\nspec:\n  namespaceSelector: {matchLabels: {tier: production}}\n  mode: Default\n  breaker: {failureRateThreshold: 90, slidingWindow: {type: Count, size: 20}, openDuration: 5s}\n";
    let policies = format!("{root}---\n{}", cbp(BREAKER));
    let rules = breakers(&snapshot(&policies, "lab/api-1"));
    let ids: Vec<(&str, &str, u32)> =
        rules.iter().map(|r| (r.id.as_str(), r.policy.as_str(), r.failure_rate_threshold)).collect();
    assert_eq!(
        ids,
        [
            ("shop/api:80", "shop/cb", 50),
            ("shop/api:9000", "breakwater-system/root-breaker", 90),
            ("shop/web:8080", "breakwater-system/root-breaker", 90),
        ]
    );
}

// ---- targetRefs.sectionName: only that port ---------------------------------------------

#[test]
fn section_name_limits_the_policy_to_one_port() {
    let s = snapshot(&cbp("  timeout: 3s"), API_POD);
    assert_eq!(api_route(&s).timeout.map(|d| d.seconds), Some(3));
    let admin = route_action(&virtual_host(&s, "api.shop.svc.cluster.local:9000"));
    assert_eq!(admin.timeout.map(|d| d.seconds), Some(0));
}

// ---- RateLimitPolicy: scope Cluster -> route rate_limits + agent rules ------------------

const PER_USER: &str = r#"  limits:
  - name: per-user
    match: {pathPrefix: /v1/, methods: [GET, POST], headers: [{name: X-Tenant, value: gold}]}
    key: [{header: X-User-Id}, {remoteAddress: true}, {path: true}, {value: tier-1}]
    rate: {requests: 100, per: 1m}
    burst: 20
  failureMode: Closed
"#;

#[test]
fn limit_name_and_key_parts_shape_the_descriptor() {
    let s = snapshot(&rlp(PER_USER), API_POD);
    let route = inbound_route(&s, 8080);
    assert_eq!(
        descriptors(&route.rate_limits),
        [[
            format!("{LIMIT_KEY}=shop/rl/per-user"),
            format!("{}=shop/api:http", compile::TARGET_KEY),
            format!("{}=true", compile::MATCH_KEY),
            "header.x-user-id=<x-user-id?>".to_string(),
            "remote_address=<client>".to_string(),
            "extension=envoy.rate_limit_descriptors.expr".to_string(),
            "value=tier-1".to_string(),
        ]]
    );
}

#[test]
fn match_path_prefix_methods_and_headers() {
    let s = snapshot(&rlp(PER_USER), API_POD);
    let headers = header_value_match(&inbound_route(&s, 8080).rate_limits[0]);
    let patterns: Vec<(String, MatchPattern)> = headers.iter().map(pattern).collect();
    assert_eq!(
        patterns,
        [
            (":path".to_string(), MatchPattern::Prefix("/v1/".into())),
            (":method".to_string(), MatchPattern::SafeRegex(regex("^(GET|POST)$"))),
            ("x-tenant".to_string(), MatchPattern::Exact("gold".into())),
        ]
    );
}

fn regex(pattern: &str) -> envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher {
    envoy_types::pb::envoy::r#type::matcher::v3::RegexMatcher { regex: pattern.into(), ..Default::default() }
}

#[test]
fn match_exact_path_ignores_the_query_and_one_method_is_exact() {
    let limits = "  limits:\n  - name: login\n    match: {path: /v1/login.json, methods: [POST]}\n    rate: {requests: 5, per: 1m}\n";
    let s = snapshot(&rlp(limits), API_POD);
    let patterns: Vec<_> =
        header_value_match(&inbound_route(&s, 8080).rate_limits[0]).iter().map(pattern).collect();
    assert_eq!(
        patterns,
        [
            (":path".to_string(), MatchPattern::SafeRegex(regex(r"^\/v1\/login\.json(\?.*)?$"))),
            (":method".to_string(), MatchPattern::Exact("POST".into())),
        ]
    );
}

#[test]
fn rate_burst_algorithm_shadow_and_failure_mode_go_to_the_agent() {
    let limits = "  limits:\n  - name: a\n    rate: {requests: 100, per: 1m}\n    burst: 20\n  - name: b\n    rate: {requests: 7, per: 1h30m}\n    algorithm: SlidingWindow\n    shadow: true\n  failureMode: Closed\n";
    let s = snapshot(&rlp(limits), API_POD);
    let rule = |id: &str, requests, period_ms, burst, algorithm, shadow| RateLimitRule {
        id: id.into(),
        requests,
        period_ms,
        burst,
        algorithm,
        shadow,
        failure_mode: breakwater_api::rate_limit::FailureMode::Closed,
    };
    use breakwater_api::rate_limit::Algorithm;
    assert_eq!(
        agent(&s).rate_limits,
        [
            rule("shop/rl/a", 100, 60_000, 20, Algorithm::TokenBucket, false),
            rule("shop/rl/b", 7, 5_400_000, 0, Algorithm::SlidingWindow, true),
        ]
    );
}

fn inbound_filter<M: Message + Default>(s: &Snapshot, target: u16, filter: &str) -> M {
    let listener: Listener = decode(s, type_url::LISTENER, names::INBOUND);
    let chain = listener.filter_chains.iter().find(|c| c.name == format!("inbound|{target}")).expect("chain");
    let Some(envoy_types::pb::envoy::config::listener::v3::filter::ConfigType::TypedConfig(any)) =
        chain.filters[0].config_type.clone()
    else {
        panic!("no HCM")
    };
    let hcm = HttpConnectionManager::decode(any.value.as_slice()).expect("hcm");
    assert_eq!(hcm.use_remote_address.map(|b| b.value), Some(true), "remote addresses are not spoofable");
    let http = hcm.http_filters.iter().find(|f| f.name == filter).expect("filter");
    let Some(http_filter::ConfigType::TypedConfig(any)) = http.config_type.clone() else {
        panic!("no config")
    };
    M::decode(any.value.as_slice()).expect("filter config")
}

#[test]
fn failure_mode_closed_denies_when_the_agent_does_not_answer() {
    let closed = snapshot(&rlp(PER_USER), API_POD);
    let filter: RateLimitFilter = inbound_filter(&closed, 8080, "envoy.filters.http.ratelimit");
    assert!(filter.failure_mode_deny);
    assert_eq!(filter.domain, breakwater_api::agent::DOMAIN);
    assert_eq!(filter.timeout.map(|t| t.nanos), Some(compile::RLS_TIMEOUT_MS as i32 * 1_000_000));
    let open = snapshot(&rlp("  limits:\n  - name: a\n    rate: {requests: 1, per: 1s}\n"), API_POD);
    let filter: RateLimitFilter = inbound_filter(&open, 8080, "envoy.filters.http.ratelimit");
    assert!(!filter.failure_mode_deny);
}

// ---- scope Pod -> local_ratelimit on the inbound route ----------------------------------

#[test]
fn scope_pod_becomes_a_local_token_bucket() {
    let limits = "  limits:\n  - name: writes\n    match: {methods: [POST]}\n    key: [{header: x-user-id}, {value: v}]\n    rate: {requests: 50, per: 10s}\n    burst: 5\n    scope: Pod\n";
    let s = snapshot(&rlp(limits), API_POD);
    assert!(inbound_route(&s, 8080).rate_limits.is_empty(), "nothing for the agent");
    assert!(agent(&s).rate_limits.is_empty());
    let local = local_rate_limit(&s, 8080);
    let entries = |d: &LocalRateLimitDescriptor| -> Vec<String> {
        d.entries.iter().map(|e| format!("{}={}", e.key, e.value)).collect()
    };
    // One bucket per x-user-id value, and one shared by requests without the header.
    assert_eq!(
        local.descriptors.iter().map(entries).collect::<Vec<_>>(),
        [
            vec![
                format!("{LIMIT_KEY}=shop/rl/writes"),
                format!("{}=true", compile::MATCH_KEY),
                "header.x-user-id=".into(),
                "value=v".into()
            ],
            vec![
                format!("{LIMIT_KEY}=shop/rl/writes"),
                format!("{}=true", compile::MATCH_KEY),
                "value=v".into()
            ],
        ]
    );
    let bucket = local.descriptors[0].token_bucket.expect("bucket");
    assert_eq!(bucket.max_tokens, 55, "requests + burst");
    assert_eq!(bucket.tokens_per_fill.map(|v| v.value), Some(50));
    assert_eq!(bucket.fill_interval.map(|d| d.seconds), Some(10));
    assert!(!local.descriptors[0].shadow_mode);
    assert_eq!(descriptors(&local.rate_limits)[0][0], format!("{LIMIT_KEY}=shop/rl/writes"));
    assert_eq!(local.always_consume_default_token_bucket.map(|b| b.value), Some(false));
    assert!(local.filter_enforced.is_some() && local.filter_enabled.is_some());
}

#[test]
fn scope_pod_shadow_counts_without_rejecting() {
    let limits =
        "  limits:\n  - name: probe\n    rate: {requests: 1, per: 1s}\n    scope: Pod\n    shadow: true\n";
    let s = snapshot(&rlp(limits), API_POD);
    assert!(local_rate_limit(&s, 8080).descriptors[0].shadow_mode);
}

// ---- where limits land: the pods that back the Service ----------------------------------

#[test]
fn limits_land_on_the_container_port_of_backing_pods_only() {
    let policy = rlp("  limits:\n  - name: a\n    rate: {requests: 1, per: 1s}\n");
    // Named targetPort `http` resolves to the pod's container port 8080.
    let api = snapshot(&policy, API_POD);
    assert!(api.get(type_url::ROUTE, "inbound|8080").is_some());
    assert!(api.get(type_url::ROUTE, "inbound|9000").is_none(), "sectionName: http only");
    let web = snapshot(&policy, "shop/web-1");
    assert!(agent(&web).rate_limits.is_empty());
    let listener: Listener = decode(&web, type_url::LISTENER, names::INBOUND);
    assert!(listener.filter_chains.is_empty(), "web passes everything through");
    assert!(listener.default_filter_chain.is_some());
}

#[test]
fn numeric_target_port_and_http2_backends() {
    let policy = "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: rl, namespace: shop}\nspec:\n  targetRefs: [{kind: Service, name: api, sectionName: grpc-admin}, {kind: Service, name: web}]\n  limits:\n  - name: a\n    rate: {requests: 1, per: 1s}\n";
    let api = snapshot(policy, API_POD);
    // A grpc-* port is HTTP/2 to the application, and to the Service's endpoints.
    assert!(!cluster(&api, "inbound|9000").typed_extension_protocol_options.is_empty());
    assert!(
        !cluster(&api, "outbound|9000|api.shop.svc.cluster.local")
            .typed_extension_protocol_options
            .is_empty()
    );
    assert!(cluster(&api, API_80).typed_extension_protocol_options.is_empty());
    let web = snapshot(policy, "shop/web-1");
    assert!(web.get(type_url::CLUSTER, "inbound|8081").is_some());
}

#[test]
fn unknown_pods_get_the_outbound_side_only() {
    let s = snapshot(&rlp(PER_USER), "shop/api-gone");
    assert!(s.get(type_url::LISTENER, names::INBOUND).is_none());
    assert!(s.resources(type_url::CLUSTER).all(|(k, _)| k.starts_with("outbound|")));
    assert!(agent(&s).rate_limits.is_empty());
    assert!(s.policies().keys().all(|p| p.kind != compile::RATE_LIMIT_POLICY));
}

// ---- LockLease: the agent's leases --------------------------------------------------------

fn lock_lease(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: breakwater.dev/v1alpha1\nkind: LockLease\nmetadata: {{name: {name}, namespace: {namespace}, generation: 4}}\nspec:\n{spec}"
    )
}

fn leases() -> String {
    [
        lock_lease("shop", "reindex", "  ttl: 1m30s\n  holders: 3\n  podSelector: {matchLabels: {app: api}}"),
        lock_lease(
            "shop",
            "cron",
            "  ttl: 30s\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [api, web]}]}",
        ),
        lock_lease("shop", "web-only", "  ttl: 10s\n  podSelector: {matchLabels: {app: web}}"),
        lock_lease("lab", "lab-lock", "  ttl: 10s\n  podSelector: {}"),
    ]
    .join("\n---\n")
}

#[test]
fn a_pod_gets_the_leases_of_its_namespace_that_select_it_sorted_by_id() {
    let s = snapshot(&leases(), API_POD);
    let rule = |id: &str, name: &str, ttl_ms, holders| LeaseRule {
        id: id.into(),
        name: name.into(),
        ttl_ms,
        holders,
    };
    assert_eq!(
        agent(&s).leases,
        [rule("shop/cron", "cron", 30_000, 1), rule("shop/reindex", "reindex", 90_000, 3)],
        "ttl in milliseconds, holders as declared, holders defaulting to 1"
    );
    let web = snapshot(&leases(), "shop/web-1");
    let ids = |s: &Snapshot| agent(s).leases.into_iter().map(|l| l.id).collect::<Vec<_>>();
    assert_eq!(ids(&web), ["shop/cron", "shop/web-only"], "a pod the selector does not match gets nothing");
    // lab/api-1 has the labels shop/reindex selects, but leases stay in their namespace; an
    // empty podSelector selects every pod of its own.
    assert_eq!(ids(&snapshot(&leases(), "lab/api-1")), ["lab/lab-lock"]);
    // An unknown pod has no labels to match: no leases.
    assert!(agent(&snapshot(&leases(), "shop/api-gone")).leases.is_empty());
    // Without leases the configuration has none.
    let plain = snapshot("", API_POD);
    let plain = &plain.get(type_url::AGENT, names::AGENT_RESOURCE).expect("agent resource").any;
    assert!(breakwater_api::agent::decode(&plain.value).expect("decodes").leases.is_empty());
}

#[test]
fn snapshot_carries_the_leases_it_grants_at_their_generation() {
    let s = snapshot(&leases(), API_POD);
    let carried: Vec<(PolicyVersion, Vec<&str>)> = s
        .policies()
        .into_iter()
        .filter(|(p, _)| p.kind == compile::LOCK_LEASE)
        .map(|(p, types)| (p.clone(), types.into_iter().collect()))
        .collect();
    let version = |name: &str| PolicyVersion {
        kind: compile::LOCK_LEASE,
        name: ObjectName::new("shop", name),
        generation: 4,
    };
    // A lease lives in the agent's configuration alone: what Envoy says of its listeners
    // and routes says nothing about it.
    assert_eq!(
        carried,
        [(version("cron"), vec![type_url::AGENT]), (version("reindex"), vec![type_url::AGENT])]
    );
}

#[test]
fn a_refused_lease_is_neither_granted_nor_claimed() {
    // NotIn without values is refused (the API server's rule), yet would match every pod.
    let refused = lock_lease(
        "shop",
        "odd",
        "  ttl: 30s\n  podSelector: {matchExpressions: [{key: app, operator: NotIn}]}",
    );
    let s = snapshot(&refused, API_POD);
    assert!(agent(&s).leases.is_empty());
    assert!(s.policies().keys().all(|p| p.kind != compile::LOCK_LEASE), "{:?}", s.policies());
}

// ---- outbound names and endpoints --------------------------------------------------------

#[test]
fn short_names_resolve_in_the_callers_namespace_only() {
    let from_shop = snapshot("", API_POD);
    let from_lab = snapshot("", "lab/api-1");
    // The short names are a host of their own, in the namespace's part only.
    let shop_api = virtual_host(&from_shop, "api:80").domains;
    assert_eq!(shop_api, ["api", "api:80"]);
    assert!(from_lab.get(type_url::VIRTUAL_HOST, "outbound_http/api:80").is_some(), "lab's own api");
    let lab_api = virtual_host(&from_lab, "api:80");
    assert_eq!(
        route_action(&lab_api).cluster_specifier,
        route_action(&virtual_host(&from_lab, "api.lab.svc.cluster.local:80")).cluster_specifier
    );
    let qualified = virtual_host(&from_lab, "api.shop.svc.cluster.local:80").domains;
    assert!(!qualified.contains(&"api".to_string()) && qualified.contains(&"api.shop".to_string()));
    // Port-less names belong to port 80, where a Host header carries no port.
    let web = virtual_host(&from_shop, "web.shop.svc.cluster.local:8080").domains;
    assert_eq!(web, ["web.shop:8080", "web.shop.svc:8080", "web.shop.svc.cluster.local:8080"]);
    assert_eq!(virtual_host(&from_shop, "web:8080").domains, ["web:8080"]);
    // Envoy refuses a route table with a domain twice: none across a proxy's hosts.
    for snapshot in [&from_shop, &from_lab] {
        let mut all: Vec<String> = snapshot
            .resources(type_url::VIRTUAL_HOST)
            .flat_map(|(_, r)| VirtualHost::decode(r.any.value.as_slice()).expect("decodes").domains)
            .collect();
        let count = all.len();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), count);
    }
}

#[test]
fn endpoints_are_ready_addresses_by_zone_on_the_named_port() {
    let s = snapshot("", API_POD);
    let cla: ClusterLoadAssignment = decode(&s, type_url::ENDPOINT, API_80);
    let by_zone: Vec<(String, Vec<String>)> = cla
        .endpoints
        .iter()
        .map(|l| {
            let zone = l.locality.as_ref().map(|l| l.zone.clone()).unwrap_or_default();
            let addresses = l
                .lb_endpoints
                .iter()
                .map(|e| {
                    let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &e.host_identifier else {
                        panic!("not an endpoint: {e:?}")
                    };
                    let Some(address::Address::SocketAddress(socket)) =
                        endpoint.address.as_ref().and_then(|a| a.address.clone())
                    else {
                        panic!("not a socket address: {endpoint:?}")
                    };
                    let Some(socket_address::PortSpecifier::PortValue(port)) = socket.port_specifier else {
                        panic!("no port: {socket:?}")
                    };
                    format!("{}:{port}", socket.address)
                })
                .collect();
            (zone, addresses)
        })
        .collect();
    assert_eq!(
        by_zone,
        [
            ("z1".to_string(), vec!["10.0.0.1:8080".to_string(), "10.0.0.4:8080".to_string()]),
            ("z2".to_string(), vec!["10.0.0.3:8080".to_string()]),
        ]
    );
}

// ---- root Default / Override merged into the compiled output ----------------------------

const ROOT: &str = r#"
apiVersion: breakwater.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: defaults, namespace: breakwater-system, generation: 3}
spec:
  namespaceSelector: {matchLabels: {tier: production}}
  mode: Default
  timeout: 15s
  retry: {attempts: 1}
---
apiVersion: breakwater.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: ceiling, namespace: breakwater-system}
spec:
  namespaceSelector: {matchLabels: {tier: production}}
  mode: Override
  connectionLimits: {maxConnections: 64}
---
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: floor, namespace: breakwater-system}
spec:
  namespaceSelector: {matchLabels: {tier: production}}
  mode: Override
  limits: [{name: per-client, key: [{remoteAddress: true}], rate: {requests: 1000, per: 10s}}]
---
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: fallback, namespace: breakwater-system}
spec:
  namespaceSelector: {matchLabels: {tier: production}}
  mode: Default
  limits: [{name: all, rate: {requests: 5000, per: 1s}}]
"#;

#[test]
fn root_default_and_override_are_merged_into_the_output() {
    let own = format!(
        "{ROOT}\n---\n{}\n---\n{}",
        cbp("  connectionLimits: {maxConnections: 4096}\n  retry: {attempts: 5}"),
        rlp("  limits:\n  - name: own\n    rate: {requests: 10, per: 1s}\n")
    );
    let s = snapshot(&own, API_POD);
    // Override replaces the namespace's connectionLimits; the namespace keeps its retry;
    // Default fills the timeout it left unset.
    assert_eq!(thresholds(&s).max_connections.map(|v| v.value), Some(64));
    assert_eq!(retry(&s).num_retries.map(|v| v.value), Some(5));
    assert_eq!(api_route(&s).timeout.map(|d| d.seconds), Some(15));
    // Rate limits add up: the namespace's own and the Override; the Default steps aside
    // on the port with a namespace policy, and applies on the port without one.
    let ids = |target| -> Vec<String> {
        descriptors(&inbound_route(&s, target).rate_limits).iter().map(|d| d[0].clone()).collect()
    };
    assert_eq!(
        ids(8080),
        [format!("{LIMIT_KEY}=shop/rl/own"), format!("{LIMIT_KEY}=breakwater-system/floor/per-client")]
    );
    assert_eq!(
        ids(9000),
        [
            format!("{LIMIT_KEY}=breakwater-system/floor/per-client"),
            format!("{LIMIT_KEY}=breakwater-system/fallback/all")
        ]
    );
    // Cluster-wide counters are per Service port.
    let targets: Vec<String> =
        descriptors(&inbound_route(&s, 9000).rate_limits).iter().map(|d| d[1].clone()).collect();
    assert!(targets.iter().all(|t| t.ends_with("=shop/api:grpc-admin")), "{targets:?}");
    // A sandbox namespace is not selected.
    let lab = snapshot(&own, "lab/api-1");
    assert!(lab.get(type_url::ROUTE, "inbound|80").is_none());
}

// ---- Snapshot.policies: exactly what landed, at its generation ---------------------------

#[test]
fn snapshot_policies_are_exactly_those_that_landed() {
    let own = format!(
        "{ROOT}\n---\n{}\n---\n{}",
        cbp("  timeout: 1s"),
        rlp("  limits: [{name: own, rate: {requests: 10, per: 1s}}]")
    );
    let version = |kind, ns: &str, name: &str, generation| PolicyVersion {
        kind,
        name: ObjectName::new(ns, name),
        generation,
    };
    let cb = compile::CIRCUIT_BREAKER_POLICY;
    let rl = compile::RATE_LIMIT_POLICY;
    let api = snapshot(&own, API_POD);
    assert_eq!(
        api.policies().into_keys().cloned().collect::<Vec<_>>(),
        [
            version(cb, "breakwater-system", "ceiling", 1),
            version(cb, "breakwater-system", "defaults", 3),
            version(cb, "shop", "cb", 1),
            version(rl, "breakwater-system", "fallback", 1),
            version(rl, "breakwater-system", "floor", 1),
            version(rl, "shop", "rl", 1),
        ]
    );
    // web-1 backs shop/web: only the root rate limits reach it (no namespace policy there),
    // while every caller carries the circuit-breaker policies of every Service.
    let web = snapshot(&own, "shop/web-1");
    assert_eq!(
        web.policies().keys().filter(|p| p.kind == rl).map(|p| p.name.to_string()).collect::<Vec<_>>(),
        ["breakwater-system/fallback", "breakwater-system/floor"]
    );
    // lab is not production: no rate limits, the circuit breakers as a caller.
    let lab = snapshot(&own, "lab/api-1");
    assert!(lab.policies().keys().all(|p| p.kind == cb));
    assert_eq!(lab.policies().len(), 3);
}

/// Each policy is carried by the resource types that hold what it says, and only their
/// ACKs count for its `Programmed`.
#[test]
fn a_policy_is_carried_by_the_types_that_hold_it() {
    let own = format!(
        "{ROOT}\n---\n{}\n---\n{}\n---\n{}",
        cbp("  timeout: 1s\n  retry: {attempts: 2, budget: {percent: 20}}"),
        rlp("  limits: [{name: own, rate: {requests: 10, per: 1s}}]"),
        lock_lease("shop", "cron", "  ttl: 30s\n  podSelector: {}"),
    );
    let api = snapshot(&own, API_POD);
    let types = |kind, namespace: &str, name: &str| -> BTreeSet<&str> {
        let (_, types) = api
            .policies()
            .into_iter()
            .find(|(p, _)| p.kind == kind && p.name == ObjectName::new(namespace, name))
            .unwrap_or_else(|| panic!("{kind} {namespace}/{name} is carried"));
        types
    };
    let (cb, rl, ll) = (compile::CIRCUIT_BREAKER_POLICY, compile::RATE_LIMIT_POLICY, compile::LOCK_LEASE);
    // connectionLimits: the outbound cluster; timeout and retry: the virtual hosts, and a
    // retry budget the cluster too.
    assert_eq!(types(cb, "breakwater-system", "ceiling"), BTreeSet::from([type_url::CLUSTER]));
    assert_eq!(types(cb, "breakwater-system", "defaults"), BTreeSet::from([type_url::VIRTUAL_HOST]));
    assert_eq!(types(cb, "shop", "cb"), BTreeSet::from([type_url::CLUSTER, type_url::VIRTUAL_HOST]));
    // A scope Cluster limit: the inbound listener and routes, and the agent that counts it.
    let inbound = [type_url::LISTENER, type_url::ROUTE];
    assert_eq!(types(rl, "shop", "rl"), BTreeSet::from([inbound[0], inbound[1], type_url::AGENT]));
    assert_eq!(types(ll, "shop", "cron"), BTreeSet::from([type_url::AGENT]));
    // A scope Pod limit is Envoy's alone.
    let local = snapshot(&rlp("  limits: [{name: own, rate: {requests: 10, per: 1s}, scope: Pod}]"), API_POD);
    let (_, types) = local.policies().into_iter().next().expect("the limit is carried");
    assert_eq!(types, BTreeSet::from(inbound));
    // A breaker: the outbound listener (its check and log), the virtual host (its route's
    // name and descriptor) and the agent's breaker resource (its rule) — of every pod, a
    // caller or not, known or not.
    for pod in [API_POD, "lab/api-1", "shop/unknown"] {
        let breaker = snapshot(&cbp(BREAKER), pod);
        let (_, types) = breaker.policies().into_iter().next().expect("the breaker is carried");
        let expected = BTreeSet::from([type_url::LISTENER, type_url::VIRTUAL_HOST, type_url::BREAKER]);
        assert_eq!(types, expected, "{pod}");
    }
}

/// The pods that carry each policy, connected or not: every pod the shared part carries,
/// the pods a local part lands on.
#[test]
fn carriers_are_the_pods_whose_configuration_holds_the_policy() {
    let own = format!(
        "{ROOT}\n---\n{}\n---\n{}",
        rlp("  limits: [{name: own, rate: {requests: 10, per: 1s}}]"),
        leases()
    );
    let carriers = Compiled::new(&world(&own)).carriers();
    let pods = |kind, namespace: &str, name: &str| -> Vec<String> {
        let pods = carriers.pods(kind, &ObjectName::new(namespace, name));
        pods.into_iter().flatten().map(ToString::to_string).collect()
    };
    let everyone = ["lab/api-1", "shop/api-1", "shop/web-1"];
    assert_eq!(pods(compile::CIRCUIT_BREAKER_POLICY, "breakwater-system", "ceiling"), everyone);
    assert_eq!(pods(compile::RATE_LIMIT_POLICY, "shop", "rl"), ["shop/api-1"]);
    assert_eq!(
        pods(compile::RATE_LIMIT_POLICY, "breakwater-system", "fallback"),
        ["shop/api-1", "shop/web-1"]
    );
    assert_eq!(pods(compile::LOCK_LEASE, "shop", "cron"), ["shop/api-1", "shop/web-1"]);
    assert!(pods(compile::LOCK_LEASE, "shop", "nothing").is_empty());
}

/// A breaker is carried by every pod — its agent has the rule whichever Services the pod
/// backs — and the carriers agree with what each pod's snapshot claims.
#[test]
fn every_pod_carries_a_breaker() {
    let inventory = world(&cbp(BREAKER));
    let compiled = Compiled::new(&inventory);
    let carriers = compiled.carriers();
    let name = ObjectName::new("shop", "cb");
    let pods: Vec<String> = carriers
        .pods(compile::CIRCUIT_BREAKER_POLICY, &name)
        .into_iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    assert_eq!(pods, ["lab/api-1", "shop/api-1", "shop/web-1"]);
    for pod in inventory.pods.keys() {
        let snapshot = compiled.snapshot(&Proxy { pod: pod.clone() });
        assert!(snapshot.policies().keys().any(|p| p.name == name), "{pod} claims the breaker");
        assert_eq!(breakers(&snapshot).len(), 1, "{pod}'s agent has its rule");
    }
    // The shared part claims it and holds the rule: one resource, the same for every pod.
    let shared = compiled.shared().policies().iter().find(|(p, _)| p.name == name).expect("shared");
    assert!(shared.1.contains(type_url::BREAKER));
    let held = compiled.shared().resources(type_url::BREAKER).expect("the shared part holds breakers");
    assert_eq!(held.keys().collect::<Vec<_>>(), ["shop/api:80"]);
}

#[test]
fn refused_policies_are_neither_compiled_nor_claimed() {
    let refused = cbp("  outlierDetection: {interval: 0s}");
    let s = snapshot(&refused, API_POD);
    assert!(s.policies().is_empty(), "{:?}", s.policies());
    assert!(cluster(&s, API_80).outlier_detection.is_none());
    let spec = &world(&refused).circuit_breakers[0].spec;
    let err = policy::check::circuit_breaker_policy(spec).expect_err("refused");
    assert!(err.starts_with("spec.outlierDetection.interval: must be longer than 0s"), "{err}");
}

#[test]
fn checks_name_the_field_and_the_reason() {
    let cases = [
        (cbp("  timeout: 0s"), "spec.timeout: must be longer than 0s"),
        (
            cbp("  retry: {attempts: 1, perTryTimeout: 0ms}"),
            "spec.retry.perTryTimeout: must be longer than 0s",
        ),
        (
            cbp("  retry: {attempts: 1, backoff: {base: 0s, max: 1s}}"),
            "spec.retry.backoff.base: must be longer than 0s",
        ),
        (
            cbp(
                "  breaker: {failureRateThreshold: 50, slidingWindow: {type: Count, size: 10}, openDuration: 0s}",
            ),
            "spec.breaker.openDuration: must be longer than 0s",
        ),
        (
            cbp(
                "  breaker: {failureRateThreshold: 50, slidingWindow: {type: Time, duration: 0ms}, openDuration: 1s}",
            ),
            "spec.breaker.slidingWindow.duration: must be longer than 0s",
        ),
        (
            cbp(
                "  breaker: {failureRateThreshold: 50, slowCall: {duration: 0s, rateThreshold: 50}, slidingWindow: {type: Count, size: 10}, openDuration: 1s}",
            ),
            "spec.breaker.slowCall.duration: must be longer than 0s",
        ),
        (
            rlp("  limits: [{name: a, key: [{remoteAddress: false}], rate: {requests: 1, per: 1s}}]"),
            "spec.limits[0].key[0].remoteAddress: false",
        ),
        (
            rlp("  limits: [{name: a, key: [{path: false}], rate: {requests: 1, per: 1s}}]"),
            "spec.limits[0].key[0].path: false",
        ),
        (
            rlp("  limits: [{name: a, rate: {requests: 1, per: 1500ms}, scope: Pod}]"),
            "spec.limits[0].rate.per: 1500ms is not a whole number of seconds",
        ),
    ];
    for (yaml, expected) in cases {
        let inventory = world(&yaml);
        let err = match (inventory.circuit_breakers.first(), inventory.rate_limits.first()) {
            (Some(p), _) => policy::check::circuit_breaker_policy(&p.spec),
            (_, Some(p)) => policy::check::rate_limit_policy(&p.spec),
            _ => unreachable!(),
        }
        .expect_err(expected);
        assert!(err.starts_with(expected), "{err}");
        assert!(compile::compile(&inventory, &proxy(API_POD)).policies().is_empty());
    }
    // A Cluster-scope limit may use any period the agent can count.
    let ok = world(&rlp("  limits: [{name: a, rate: {requests: 1, per: 1500ms}}]"));
    assert!(policy::check::rate_limit_policy(&ok.rate_limits[0].spec).is_ok());
}

// ---- determinism -------------------------------------------------------------------------

fn encoded(snapshot: &Snapshot) -> Vec<(String, String, Vec<u8>)> {
    snapshot
        .types()
        .into_iter()
        .flat_map(|t| {
            snapshot.resources(t).map(move |(n, r)| (t.to_string(), n.to_string(), r.any.value.clone()))
        })
        .collect()
}

#[test]
fn the_same_inputs_compile_to_the_same_bytes() {
    let policies = format!(
        "{ROOT}\n---\n{}\n---\n{}",
        cbp("  retry: {attempts: 2, budget: {percent: 10}}\n  outlierDetection: {consecutive5xx: 3}"),
        rlp(PER_USER)
    );
    let pods = [API_POD, "shop/web-1", "lab/api-1", "shop/unknown"];
    // Two inventories loaded separately: nothing may depend on allocation or hash seeds.
    let (first, second) = (world(&policies), world(&policies));
    let (a, b) = (Compiled::new(&first), Compiled::new(&second));
    for pod in pods {
        let p = proxy(pod);
        assert_eq!(encoded(&a.snapshot(&p)), encoded(&b.snapshot(&p)), "{pod}");
        assert_eq!(a.snapshot(&p), compile::compile(&second, &p), "{pod}");
    }
}
