//! The server side: a listener in front of the application's ports (iptables sends every
//! inbound connection to it, Istio style) that enforces the rate limits of the Services the
//! pod backs — once, here, so that cluster-wide counters count each request once and
//! callers without a sidecar are limited too. Ports without limits pass straight through.
//!
//! Scope Cluster limits become route `rate_limits` descriptors sent to the agent's
//! rate-limit service; scope Pod limits become per-route `local_ratelimit` configuration
//! with one token bucket per limit. Both live in RDS, so changing a limit never drains the
//! listener's connections.

use std::collections::BTreeSet;

use breakwater_api::{
    agent::{DOMAIN, LIMIT_KEY},
    rate_limit::{Algorithm, FailureMode, HttpMethod, Limit, RequestMatch, Scope},
};
use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                Cluster,
                cluster::{ClusterDiscoveryType, DiscoveryType},
            },
            core::v3::{ApiVersion, TrafficDirection},
            listener::v3::{FilterChain, FilterChainMatch, Listener},
            ratelimit::v3::RateLimitServiceConfig,
            route::v3::{
                HeaderMatcher, RateLimit, Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
                header_matcher::HeaderMatchSpecifier,
                rate_limit::{
                    Action,
                    action::{ActionSpecifier, GenericKey, HeaderValueMatch, RemoteAddress, RequestHeaders},
                },
                route, route_action, route_match,
            },
        },
        extensions::{
            common::ratelimit::v3::{
                LocalRateLimitDescriptor, XRateLimitHeadersRfcVersion, rate_limit_descriptor::Entry,
            },
            filters::{
                http::{local_ratelimit::v3::LocalRateLimit, ratelimit::v3::RateLimit as RateLimitFilter},
                network::http_connection_manager::v3::{
                    HttpConnectionManager, Rds,
                    http_connection_manager::{CodecType, RouteSpecifier},
                },
            },
            rate_limit_descriptors::expr::v3::{Descriptor as ExprDescriptor, descriptor::ExprSpecifier},
        },
        r#type::v3::TokenBucket,
    },
    google::protobuf::Duration,
};

use super::{names, outbound, proto};
use crate::{
    inventory::{ObjectName, ServicePort},
    policy::rate_limit::EffectiveLimit,
};

/// How long Envoy waits for the agent's verdict before applying `failure_mode_deny`. The
/// agent answers from its own, shorter Redis deadline, so its failure mode decides first.
pub const RLS_TIMEOUT_MS: u64 = 100;
/// Distinct values kept per header-keyed scope Pod limit (Envoy's default is 20, which
/// would let a client with a fresh header value start from a full bucket).
pub const MAX_DYNAMIC_DESCRIPTORS: u32 = 10_000;
/// Descriptor keys, after the first entry (`LIMIT_KEY`, rule id).
pub const TARGET_KEY: &str = "breakwater.target";
pub const MATCH_KEY: &str = "breakwater.match";
const MATCHED: &str = "true";

/// The configuration of one application port that rate limits apply to, borrowing the
/// effective limits (a pod's local part is built for every pod: nothing is copied).
#[derive(Clone, Debug, Default)]
pub struct InboundPort<'a> {
    pub target: u16,
    /// The backend speaks HTTP/2 without TLS (a Service port that lands here says so).
    pub http2: bool,
    /// Every limit that lands here, with the Service port it came through.
    pub limits: Vec<(&'a ServicePort, &'a EffectiveLimit)>,
}

/// The id of one limit: `<policy namespace>/<policy name>/<limit name>`.
pub fn rule_id(policy: &ObjectName, limit: &Limit) -> String {
    format!("{}/{}/{}", policy.namespace, policy.name, limit.name)
}

pub fn cluster_name(target: u16) -> String {
    format!("inbound|{target}")
}

/// The application itself, on loopback.
pub fn cluster(port: &InboundPort) -> Cluster {
    let name = cluster_name(port.target);
    Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(proto::millis(5_000)),
        load_assignment: Some(outbound::load_assignment(
            &name,
            &[(String::new(), [("127.0.0.1".to_string(), port.target)].into())].into(),
        )),
        typed_extension_protocol_options: if port.http2 {
            proto::http2_upstream()
        } else {
            Default::default()
        },
        name,
        ..Default::default()
    }
}

/// The inbound listener: one HTTP filter chain per limited port; connections to other ports
/// go on to the address they were meant for.
pub fn listener(ports: &[InboundPort]) -> Listener {
    Listener {
        name: names::INBOUND.to_string(),
        address: Some(proto::socket_address("0.0.0.0", names::INBOUND_PORT)),
        listener_filters: vec![proto::original_dst()],
        filter_chains: ports.iter().map(filter_chain).collect(),
        default_filter_chain: Some(proto::tcp_passthrough(names::INBOUND_PASSTHROUGH)),
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

fn filter_chain(port: &InboundPort) -> FilterChain {
    let name = cluster_name(port.target);
    let fail_closed = port
        .limits
        .iter()
        .any(|(_, l)| l.limit.scope() == Scope::Cluster && l.failure_mode == FailureMode::Closed);
    let global = RateLimitFilter {
        domain: DOMAIN.to_string(),
        timeout: Some(proto::millis(RLS_TIMEOUT_MS)),
        failure_mode_deny: fail_closed,
        rate_limited_as_resource_exhausted: true,
        rate_limit_service: Some(RateLimitServiceConfig {
            grpc_service: Some(proto::agent_service()),
            transport_api_version: ApiVersion::V3 as i32,
        }),
        // The agent adds X-RateLimit-* and Retry-After itself (response_headers_to_add);
        // Envoy adding them too would send every header twice.
        enable_x_ratelimit_headers: XRateLimitHeadersRfcVersion::Off as i32,
        ..Default::default()
    };
    // Disabled here; each route that has scope Pod limits enables it with its own buckets.
    let local = LocalRateLimit { stat_prefix: format!("inbound_{}", port.target), ..Default::default() };
    let hcm = HttpConnectionManager {
        stat_prefix: format!("inbound_{}", port.target),
        codec_type: CodecType::Auto as i32,
        // The peer address is the caller; an X-Forwarded-For it sends is not trusted, so a
        // remoteAddress key cannot be spoofed.
        use_remote_address: proto::bool_value(true),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(proto::ads()),
            route_config_name: name.clone(),
        })),
        http_filters: vec![
            proto::http_filter(names::LOCAL_RATELIMIT_FILTER, proto::any(&local)),
            proto::http_filter(names::RATELIMIT_FILTER, proto::any(&global)),
            outbound::router(),
        ],
        ..Default::default()
    };
    FilterChain {
        name,
        filter_chain_match: Some(FilterChainMatch {
            destination_port: proto::u32_value(u32::from(port.target)),
            ..Default::default()
        }),
        filters: vec![outbound::hcm_filter(&hcm)],
        ..Default::default()
    }
}

/// The route configuration of one limited port: everything goes to the application, with
/// the scope Cluster limits as descriptors for the agent and the scope Pod limits as
/// local token buckets. No timeout: deadlines are the caller's to set.
pub fn route_config(port: &InboundPort) -> RouteConfiguration {
    let name = cluster_name(port.target);
    let mut seen = BTreeSet::new();
    let mut cluster_limits = Vec::new();
    let mut local_limits = Vec::new();
    let mut local_ids = BTreeSet::new();
    for (service_port, effective) in &port.limits {
        let id = rule_id(&effective.policy, &effective.limit);
        match effective.limit.scope() {
            // Counters are per Service port: a platform limit on every Service counts each
            // Service's traffic on its own.
            Scope::Cluster => {
                let target = service_port.to_string();
                if seen.insert((id.clone(), target.clone())) {
                    cluster_limits.push(RateLimit {
                        actions: actions(&effective.limit, &id, Some(&target)),
                        ..Default::default()
                    });
                }
            }
            // One bucket per limit on this port, whichever Service port it came through.
            Scope::Pod => {
                if local_ids.insert(id.clone()) {
                    local_limits.push((id, effective.limit.as_ref()));
                }
            }
        }
    }
    let mut route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(route_match::PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(RouteAction {
            cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(name.clone())),
            timeout: Some(Duration::default()),
            rate_limits: cluster_limits,
            ..Default::default()
        })),
        ..Default::default()
    };
    if !local_limits.is_empty() {
        // One entry: prost encodes map fields in HashMap order (see proto::http2_upstream).
        route.typed_per_filter_config.insert(
            names::LOCAL_RATELIMIT_FILTER.to_string(),
            proto::any(&local_rate_limit(port.target, &local_limits)),
        );
    }
    RouteConfiguration {
        name: name.clone(),
        virtual_hosts: vec![VirtualHost {
            name,
            domains: vec!["*".to_string()],
            routes: vec![route],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Scope Pod limits as Envoy's local rate limiter: one descriptor and token bucket per
/// limit (per value of each header key, through wildcard descriptors). Requests that match
/// no descriptor use a default bucket that never runs dry.
fn local_rate_limit(target: u16, limits: &[(String, &Limit)]) -> LocalRateLimit {
    let mut descriptors = Vec::new();
    let mut rate_limits = Vec::new();
    for (id, limit) in limits {
        rate_limits.push(RateLimit { actions: actions(limit, id, None), ..Default::default() });
        descriptors.extend(local_descriptors(id, limit));
    }
    LocalRateLimit {
        stat_prefix: format!("inbound_{target}"),
        token_bucket: Some(TokenBucket {
            max_tokens: u32::MAX,
            tokens_per_fill: proto::u32_value(u32::MAX),
            fill_interval: Some(proto::millis(1_000)),
        }),
        filter_enabled: Some(proto::all_requests()),
        filter_enforced: Some(proto::all_requests()),
        descriptors,
        always_consume_default_token_bucket: proto::bool_value(false),
        enable_x_ratelimit_headers: XRateLimitHeadersRfcVersion::DraftVersion03 as i32,
        rate_limited_as_resource_exhausted: true,
        rate_limits,
        max_dynamic_descriptors: proto::u32_value(MAX_DYNAMIC_DESCRIPTORS),
        enable_retry_after_header: true,
        ..Default::default()
    }
}

/// The token bucket of a scope Pod limit: `requests` refilled every `per` (smoothly in
/// current Envoy), holding at most `requests + burst`.
pub fn token_bucket(limit: &Limit) -> TokenBucket {
    let per = limit.rate.per.to_std().unwrap_or_default();
    let burst = if limit.algorithm() == Algorithm::TokenBucket { limit.burst.unwrap_or(0) } else { 0 };
    TokenBucket {
        max_tokens: limit.rate.requests.saturating_add(burst),
        tokens_per_fill: proto::u32_value(limit.rate.requests),
        fill_interval: Some(proto::duration(per)),
    }
}

/// The descriptors a scope Pod limit's requests produce: header entries are wildcards (one
/// bucket per value); a request without a header skips its entry (`skip_if_absent`), so
/// every subset of absent headers gets a descriptor too — those requests share a bucket.
fn local_descriptors(id: &str, limit: &Limit) -> Vec<LocalRateLimitDescriptor> {
    let parts: Vec<&breakwater_api::rate_limit::KeyPart> = limit.key.iter().flatten().collect();
    let headers: Vec<usize> = (0..parts.len()).filter(|i| parts[*i].header.is_some()).collect();
    let bucket = token_bucket(limit);
    // Bit i of `absent` set: the i-th header key is missing. 2^headers ≤ 256 (≤ 8 key parts).
    (0..1u32 << headers.len())
        .map(|absent| {
            let mut entries = vec![entry(LIMIT_KEY, id)];
            if limit.matches.is_some() {
                entries.push(entry(MATCH_KEY, MATCHED));
            }
            for (index, part) in parts.iter().enumerate() {
                if let Some(header) = &part.header {
                    let bit = headers.iter().position(|h| *h == index).unwrap_or(0);
                    if absent & (1 << bit) == 0 {
                        entries.push(entry(&header_key(header), ""));
                    }
                } else if let Some(value) = &part.value {
                    entries.push(entry(VALUE_KEY, value));
                }
            }
            LocalRateLimitDescriptor { entries, token_bucket: Some(bucket), shadow_mode: limit.shadow }
        })
        .collect()
}

fn entry(key: &str, value: &str) -> Entry {
    Entry { key: key.to_string(), value: value.to_string() }
}

const VALUE_KEY: &str = "value";
const PATH_KEY: &str = "path";

/// Header names are case-insensitive; Envoy keeps them lower-case.
fn header_key(name: &str) -> String {
    format!("header.{}", name.to_ascii_lowercase())
}

/// The descriptor of one limit: its rule id, the Service port it counts for (scope Cluster),
/// a match entry when it counts only some requests, then one entry per key part.
fn actions(limit: &Limit, id: &str, target: Option<&str>) -> Vec<Action> {
    let action = |specifier| Action { action_specifier: Some(specifier) };
    let generic = |key: &str, value: &str| {
        action(ActionSpecifier::GenericKey(GenericKey {
            descriptor_key: key.to_string(),
            descriptor_value: value.to_string(),
            ..Default::default()
        }))
    };
    let mut actions = vec![generic(LIMIT_KEY, id)];
    if let Some(target) = target {
        actions.push(generic(TARGET_KEY, target));
    }
    if let Some(matches) = &limit.matches {
        actions.push(action(ActionSpecifier::HeaderValueMatch(HeaderValueMatch {
            descriptor_key: MATCH_KEY.to_string(),
            descriptor_value: MATCHED.to_string(),
            expect_match: proto::bool_value(true),
            headers: header_matchers(matches),
            ..Default::default()
        })));
    }
    for part in limit.key.iter().flatten() {
        if let Some(header) = &part.header {
            actions.push(action(ActionSpecifier::RequestHeaders(RequestHeaders {
                header_name: header.to_ascii_lowercase(),
                descriptor_key: header_key(header),
                skip_if_absent: true,
            })));
        } else if part.remote_address == Some(true) {
            actions.push(action(ActionSpecifier::RemoteAddress(RemoteAddress {})));
        } else if part.path == Some(true) {
            // The path without its query string: `:path` would give every query its own counter.
            let expr = ExprDescriptor {
                descriptor_key: PATH_KEY.to_string(),
                skip_if_error: false,
                expr_specifier: Some(ExprSpecifier::Text("request.url_path".to_string())),
            };
            actions.push(action(ActionSpecifier::Extension(proto::typed(
                "envoy.rate_limit_descriptors.expr",
                &expr,
            ))));
        } else if let Some(value) = &part.value {
            actions.push(generic(VALUE_KEY, value));
        }
    }
    actions
}

/// A limit's `match` as header matchers (all must hold): `:path` by prefix or exactly (a
/// query string does not stop an exact match), `:method` among the methods, and headers by
/// exact value.
fn header_matchers(matches: &RequestMatch) -> Vec<HeaderMatcher> {
    let matcher = |name: &str, string_match| HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(string_match)),
        ..Default::default()
    };
    let mut headers = Vec::new();
    if let Some(prefix) = &matches.path_prefix {
        headers.push(matcher(":path", proto::prefix(prefix)));
    }
    if let Some(path) = &matches.path {
        headers.push(matcher(":path", proto::regex(format!("^{}(\\?.*)?$", proto::regex_escape(path)))));
    }
    if let Some(methods) = &matches.methods {
        let names: Vec<&str> = methods.iter().map(method_name).collect();
        let string_match = match names.as_slice() {
            [one] => proto::exact(one),
            many => proto::regex(format!("^({})$", many.join("|"))),
        };
        headers.push(matcher(":method", string_match));
    }
    for header in matches.headers.iter().flatten() {
        headers.push(matcher(&header.name.to_ascii_lowercase(), proto::exact(&header.value)));
    }
    headers
}

fn method_name(method: &HttpMethod) -> &'static str {
    match method {
        HttpMethod::GET => "GET",
        HttpMethod::HEAD => "HEAD",
        HttpMethod::POST => "POST",
        HttpMethod::PUT => "PUT",
        HttpMethod::PATCH => "PATCH",
        HttpMethod::DELETE => "DELETE",
        HttpMethod::OPTIONS => "OPTIONS",
        HttpMethod::CONNECT => "CONNECT",
        HttpMethod::TRACE => "TRACE",
    }
}
