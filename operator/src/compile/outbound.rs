//! The caller side, the same for every proxy: one EDS cluster per Service port with the
//! port's connection limits, retry budget and outlier detection, its endpoints, and an HTTP
//! listener on loopback — where the capture redirects the application's connections — whose
//! HTTP virtual hosts carry timeouts, retries and the shared breakers, and which passes
//! other protocols through.
//!
//! A Service port with a breaker gets a named route that asks the agent before each call
//! (the rate-limit filter, one `BREAKER_KEY` descriptor) and whose calls the access log
//! streams to the agent, which counts them in the breaker's window.

use std::collections::{BTreeMap, BTreeSet};

use breakwater_api::{
    CircuitBreakerPolicySpec,
    agent::{BREAKER_KEY, BREAKER_LOG_NAME, DOMAIN},
    circuit_breaker::{OutlierDetection as OutlierSpec, Retry},
};
use envoy_types::pb::{
    envoy::{
        config::{
            accesslog::v3::{
                AccessLog, AccessLogFilter, ExtensionFilter, access_log, access_log_filter, extension_filter,
            },
            cluster::v3::{
                CircuitBreakers, Cluster, OutlierDetection,
                circuit_breakers::{Thresholds, thresholds::RetryBudget},
                cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig},
            },
            core::v3::{ApiVersion, Locality, RoutingPriority, TrafficDirection},
            endpoint::v3::{ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint},
            listener::v3::{Filter, FilterChain, FilterChainMatch, Listener, filter},
            ratelimit::v3::RateLimitServiceConfig,
            route::v3::{
                RateLimit, RetryPolicy, Route, RouteAction, RouteConfiguration, RouteMatch, Vhds,
                VirtualHost,
                rate_limit::{
                    Action,
                    action::{ActionSpecifier, GenericKey},
                },
                retry_policy::{RetryBackOff, RetryHostPredicate, retry_host_predicate},
                route, route_action, route_match,
            },
        },
        extensions::{
            access_loggers::{
                filters::cel::v3::ExpressionFilter,
                grpc::v3::{CommonGrpcAccessLogConfig, HttpGrpcAccessLogConfig},
            },
            common::ratelimit::v3::XRateLimitHeadersRfcVersion,
            filters::{
                http::{ratelimit::v3::RateLimit as RateLimitFilter, router::v3::Router},
                network::http_connection_manager::v3::{
                    HttpConnectionManager, HttpFilter, Rds,
                    http_connection_manager::{CodecType, RouteSpecifier},
                    http_filter,
                },
            },
            retry::host::previous_hosts::v3::PreviousHostsPredicate,
        },
        r#type::v3::{HttpStatus, Percent, StatusCode},
    },
    google::protobuf::Duration,
};

use super::{RLS_TIMEOUT_MS, names, proto, workload::PortSpec};
use crate::inventory::ObjectName;

/// Envoy's own default, stated so the configuration says what it does.
const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Retried when a policy sets `retry` without `retryOn`: failures where the request never
/// reached the application, so retrying is safe for every method.
pub const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream";
/// How often Envoy sends the breaker routes' access log entries to the agent, at the latest:
/// outcomes reach the breaker's window within about this long.
pub const BREAKER_LOG_FLUSH_MS: u64 = 10;
/// Envoy sends the buffered entries sooner once they take this many bytes.
pub const BREAKER_LOG_BUFFER_BYTES: u32 = 16 * 1024;
/// Logs a call only when its route has a name: only breaker routes have one.
pub const BREAKER_LOG_FILTER: &str = "xds.route_name != ''";

/// The id of a Service port's shared breaker, `<namespace>/<name>:<port number>`: its state's
/// key in Redis, its descriptor's value and its outbound route's name.
pub fn breaker_id(service: &ObjectName, port: u16) -> String {
    format!("{}/{}:{port}", service.namespace, service.name)
}

pub fn cluster_name(service: &ObjectName, port: u16) -> String {
    format!("outbound|{port}|{}.{}.svc.{}", service.name, service.namespace, names::CLUSTER_DOMAIN)
}

/// The EDS cluster of one Service port. Limits a policy leaves unset are unlimited rather
/// than Envoy's defaults (1024 connections, 3 retries…), which would cap traffic nobody
/// asked Breakwater to cap.
pub fn cluster(name: &str, port: &PortSpec, spec: &CircuitBreakerPolicySpec) -> Cluster {
    let limits = spec.connection_limits.clone().unwrap_or_default();
    let unlimited = |v: Option<u32>| proto::u32_value(v.unwrap_or(u32::MAX));
    let thresholds = Thresholds {
        priority: RoutingPriority::Default as i32,
        max_connections: unlimited(limits.max_connections),
        max_pending_requests: unlimited(limits.max_pending_requests),
        max_requests: unlimited(limits.max_requests),
        max_retries: unlimited(limits.max_retries),
        retry_budget: spec.retry.as_ref().and_then(|r| r.budget.as_ref()).map(|budget| RetryBudget {
            budget_percent: Some(Percent { value: f64::from(budget.percent) }),
            min_retry_concurrency: budget.min_concurrency.and_then(proto::u32_value),
            budget_interval: None,
        }),
        ..Default::default()
    };
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(proto::ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(proto::millis(CONNECT_TIMEOUT_MS)),
        circuit_breakers: Some(CircuitBreakers { thresholds: vec![thresholds], ..Default::default() }),
        outlier_detection: spec.outlier_detection.as_ref().map(outlier_detection),
        typed_extension_protocol_options: if port.http2 {
            proto::http2_upstream()
        } else {
            Default::default()
        },
        ..Default::default()
    }
}

/// Exactly the ejections the policy asks for: Envoy enables consecutive-5xx and
/// success-rate ejection by default, so the detectors a policy does not name are switched
/// off, and failure-percentage ejection (off by default) is enforced when it is named.
fn outlier_detection(spec: &OutlierSpec) -> OutlierDetection {
    let duration =
        |d: &Option<breakwater_api::Duration>| d.as_ref().and_then(|d| d.to_std().ok()).map(proto::duration);
    let failure = spec.failure_percentage.as_ref();
    OutlierDetection {
        consecutive_5xx: spec.consecutive_5xx.and_then(proto::u32_value),
        enforcing_consecutive_5xx: proto::u32_value(if spec.consecutive_5xx.is_some() { 100 } else { 0 }),
        enforcing_success_rate: proto::u32_value(0),
        interval: duration(&spec.interval),
        base_ejection_time: duration(&spec.base_ejection_time),
        max_ejection_percent: spec.max_ejection_percent.and_then(proto::u32_value),
        failure_percentage_threshold: failure.and_then(|f| proto::u32_value(f.threshold)),
        enforcing_failure_percentage: failure.and_then(|_| proto::u32_value(100)),
        failure_percentage_request_volume: failure.and_then(|f| f.request_volume).and_then(proto::u32_value),
        failure_percentage_minimum_hosts: failure.and_then(|f| f.minimum_hosts).and_then(proto::u32_value),
        ..Default::default()
    }
}

/// The endpoints of one Service port, one locality per zone.
pub fn load_assignment(
    name: &str,
    by_zone: &BTreeMap<String, BTreeSet<(String, u16)>>,
) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_zone
            .iter()
            .map(|(zone, addresses)| LocalityLbEndpoints {
                locality: (!zone.is_empty()).then(|| Locality { zone: zone.clone(), ..Default::default() }),
                lb_endpoints: addresses
                    .iter()
                    .map(|(ip, port)| LbEndpoint {
                        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                            address: Some(proto::socket_address(ip, u32::from(*port))),
                            ..Default::default()
                        })),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// Which names of a Service port a virtual host answers to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Names {
    /// `svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`: valid in every namespace.
    Qualified,
    /// `svc`: valid in the Service's own namespace only (as Kubernetes DNS resolves it).
    Short,
}

/// The names a caller may use for a Service port through the HTTP proxy. A Host header
/// carries no port for port 80, so the port-less names belong to port 80 only; every port
/// gets the `:port` forms.
pub fn domains(service: &ObjectName, port: u16, names: Names) -> Vec<String> {
    let (svc, ns, domain) = (&service.name, &service.namespace, names::CLUSTER_DOMAIN);
    let hosts = match names {
        Names::Qualified => {
            vec![format!("{svc}.{ns}"), format!("{svc}.{ns}.svc"), format!("{svc}.{ns}.svc.{domain}")]
        }
        Names::Short => vec![svc.clone()],
    };
    let mut all: Vec<String> = if port == 80 { hosts.clone() } else { Vec::new() };
    all.extend(hosts.iter().map(|h| format!("{h}:{port}")));
    all
}

/// The VHDS resource name of a Service port's virtual host with `names`, which is also the
/// host's own name (Envoy removes virtual hosts by it): `outbound_http/<first host>:<port>`.
/// Qualified hosts contain dots and short ones cannot (a Service name is a DNS label), so
/// the two never share a name.
pub fn virtual_host_name(service: &ObjectName, port: u16, names: Names) -> String {
    let host = match names {
        Names::Qualified => format!("{}.{}.svc.{}", service.name, service.namespace, names::CLUSTER_DOMAIN),
        Names::Short => service.name.clone(),
    };
    format!("{}/{host}:{port}", names::OUTBOUND_HTTP)
}

/// The virtual host of one Service port: every request goes to its cluster, with the
/// policy's timeout and retries. Without a timeout the route has none (Envoy's default of
/// 15s would cut long polls and streams nobody asked to cut). With a breaker, the route is
/// named after it and asks the agent before each call.
pub fn virtual_host(
    service: &ObjectName,
    port: u16,
    cluster: &str,
    spec: &CircuitBreakerPolicySpec,
    names: Names,
) -> VirtualHost {
    let timeout =
        spec.timeout.as_ref().and_then(|t| t.to_std().ok()).map_or_else(Duration::default, proto::duration);
    let breaker = spec.breaker.as_ref().map(|_| breaker_id(service, port));
    VirtualHost {
        name: virtual_host_name(service, port, names),
        domains: domains(service, port, names),
        routes: vec![Route {
            // Only breaker routes have a name: the access log sends the agent the calls of
            // named routes (BREAKER_LOG_FILTER), and the name says which breaker they count for.
            name: breaker.clone().unwrap_or_default(),
            r#match: Some(RouteMatch {
                path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
                ..Default::default()
            }),
            action: Some(route::Action::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster.to_string())),
                timeout: Some(timeout),
                retry_policy: spec.retry.as_ref().map(retry_policy),
                rate_limits: breaker.iter().map(|id| breaker_descriptor(id)).collect(),
                ..Default::default()
            })),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The descriptor the rate-limit filter sends the agent before each call on a breaker route:
/// one entry, `(BREAKER_KEY, breaker id)`.
fn breaker_descriptor(id: &str) -> RateLimit {
    RateLimit {
        actions: vec![Action {
            action_specifier: Some(ActionSpecifier::GenericKey(GenericKey {
                descriptor_key: BREAKER_KEY.to_string(),
                descriptor_value: id.to_string(),
                ..Default::default()
            })),
        }],
        ..Default::default()
    }
}

fn retry_policy(retry: &Retry) -> RetryPolicy {
    let retry_on = retry.retry_on.as_ref().map_or_else(
        || DEFAULT_RETRY_ON.to_string(),
        |on| on.iter().map(|c| c.as_str()).collect::<Vec<_>>().join(","),
    );
    let std = |d: &breakwater_api::Duration| d.to_std().ok().map(proto::duration);
    RetryPolicy {
        retry_on,
        num_retries: proto::u32_value(retry.attempts),
        per_try_timeout: retry.per_try_timeout.as_ref().and_then(std),
        retry_back_off: retry
            .backoff
            .as_ref()
            .map(|b| RetryBackOff { base_interval: std(&b.base), max_interval: std(&b.max) }),
        // A retry should try another endpoint than the one that just failed.
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".to_string(),
            config_type: Some(retry_host_predicate::ConfigType::TypedConfig(proto::any(
                &PreviousHostsPredicate {},
            ))),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    }
}

/// The outbound route configuration: no virtual hosts of its own, they come one by one over
/// VHDS (delta ADS), so that a change to one Service port sends that port's host alone.
pub fn route_config() -> RouteConfiguration {
    RouteConfiguration {
        name: names::OUTBOUND_HTTP.to_string(),
        vhds: Some(Vhds { config_source: Some(proto::ads()) }),
        ..Default::default()
    }
}

/// The application's HTTP proxy (`HTTP_PROXY=http://127.0.0.1:15001`). Its connection
/// manager always has the breakers' rate-limit filter and access log, whether any Service
/// has a breaker or not, so that breakers coming and going change routes only (RDS), never
/// the listener (whose change drains connections). Routes without a breaker send no
/// descriptor (the filter does not call the agent) and are not logged.
pub fn listener() -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: names::OUTBOUND_HTTP.to_string(),
        codec_type: CodecType::Auto as i32,
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(proto::ads()),
            route_config_name: names::OUTBOUND_HTTP.to_string(),
        })),
        http_filters: vec![
            proto::http_filter(names::RATELIMIT_FILTER, proto::any(&breaker_check())),
            router(),
        ],
        access_log: vec![breaker_log()],
        ..Default::default()
    };
    // HTTP goes through the route table; any other protocol (a database, TLS to the outside)
    // goes on untouched to where the application sent it.
    let http = FilterChain {
        filter_chain_match: Some(FilterChainMatch {
            application_protocols: ["http/1.0", "http/1.1", "h2c"].map(String::from).to_vec(),
            ..Default::default()
        }),
        filters: vec![hcm_filter(&hcm)],
        ..Default::default()
    };
    Listener {
        name: names::OUTBOUND_HTTP.to_string(),
        address: Some(proto::socket_address("127.0.0.1", names::OUTBOUND_PORT)),
        listener_filters: vec![proto::original_dst(), proto::http_inspector()],
        filter_chains: vec![http],
        default_filter_chain: Some(proto::tcp_passthrough(names::OUTBOUND_PASSTHROUGH)),
        traffic_direction: TrafficDirection::Outbound as i32,
        ..Default::default()
    }
}

/// The breakers' check: before each call on a breaker route, the agent answers from its copy
/// of the breaker's state; OVER_LIMIT (OPEN, or HALF_OPEN with no probe left) becomes a 503
/// with the agent's `x-breakwater-breaker` header.
fn breaker_check() -> RateLimitFilter {
    RateLimitFilter {
        domain: DOMAIN.to_string(),
        timeout: Some(proto::millis(RLS_TIMEOUT_MS)),
        // An agent that does not answer must not stop the application's calls.
        failure_mode_deny: false,
        rate_limit_service: Some(RateLimitServiceConfig {
            grpc_service: Some(proto::agent_service()),
            transport_api_version: ApiVersion::V3 as i32,
        }),
        // Not 429: the caller is not over a limit, the Service is failing. gRPC callers get
        // UNAVAILABLE (rate_limited_as_resource_exhausted stays off).
        rate_limited_status: Some(HttpStatus { code: StatusCode::ServiceUnavailable as i32 }),
        enable_x_ratelimit_headers: XRateLimitHeadersRfcVersion::Off as i32,
        // x-envoy-ratelimited would call the 503 a rate limit; the agent's header names the
        // breaker's policy instead.
        disable_x_envoy_ratelimited_header: true,
        ..Default::default()
    }
}

/// Streams the outcome of every call on a breaker route (status, duration, response flags)
/// to the agent over Envoy's gRPC access-log service.
fn breaker_log() -> AccessLog {
    let grpc = HttpGrpcAccessLogConfig {
        common_config: Some(CommonGrpcAccessLogConfig {
            log_name: BREAKER_LOG_NAME.to_string(),
            grpc_service: Some(proto::agent_service()),
            transport_api_version: ApiVersion::V3 as i32,
            buffer_flush_interval: Some(proto::millis(BREAKER_LOG_FLUSH_MS)),
            buffer_size_bytes: proto::u32_value(BREAKER_LOG_BUFFER_BYTES),
            ..Default::default()
        }),
        ..Default::default()
    };
    // Only breaker routes are named (virtual_host), so this logs their calls and no others.
    let named_routes = ExpressionFilter { expression: BREAKER_LOG_FILTER.to_string(), cel_config: None };
    AccessLog {
        name: "envoy.access_loggers.http_grpc".to_string(),
        filter: Some(AccessLogFilter {
            filter_specifier: Some(access_log_filter::FilterSpecifier::ExtensionFilter(ExtensionFilter {
                name: "envoy.access_loggers.extension_filters.cel".to_string(),
                config_type: Some(extension_filter::ConfigType::TypedConfig(proto::any(&named_routes))),
            })),
        }),
        config_type: Some(access_log::ConfigType::TypedConfig(proto::any(&grpc))),
    }
}

pub fn router() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(proto::any(&Router::default()))),
        ..Default::default()
    }
}

pub fn hcm_filter(hcm: &HttpConnectionManager) -> Filter {
    Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(proto::any(hcm))),
    }
}
