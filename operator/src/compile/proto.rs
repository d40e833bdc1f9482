//! Small constructors for the Envoy messages every part of the compiler needs, so that the
//! modules that shape listeners, routes and clusters read as configuration, not plumbing.

use std::collections::HashMap;

use envoy_types::pb::{
    envoy::{
        config::cluster::v3::{
            Cluster,
            cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
        },
        config::core::v3::{
            Address, AggregatedConfigSource, ApiVersion, ConfigSource, GrpcService, Http2ProtocolOptions,
            RuntimeFractionalPercent, SocketAddress, TypedExtensionConfig, address,
            config_source::ConfigSourceSpecifier, grpc_service, socket_address,
        },
        config::listener::v3::{Filter, FilterChain, ListenerFilter, filter, listener_filter},
        extensions::filters::{
            listener::{http_inspector::v3::HttpInspector, original_dst::v3::OriginalDst},
            network::{
                http_connection_manager::v3::{HttpFilter, http_filter},
                tcp_proxy::v3::{TcpProxy, tcp_proxy},
            },
        },
        extensions::upstreams::http::v3::{
            HttpProtocolOptions,
            http_protocol_options::{
                ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
            },
        },
        r#type::{
            matcher::v3::{RegexMatcher, StringMatcher, string_matcher::MatchPattern},
            v3::{FractionalPercent, fractional_percent::DenominatorType},
        },
    },
    google::protobuf::{Any, BoolValue, Duration, UInt32Value},
};
use prost::{Message, Name};

/// A cluster that connects to the address a redirected connection was meant for.
pub fn passthrough_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::OriginalDst as i32)),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: Some(millis(5_000)),
        ..Default::default()
    }
}

/// A filter chain that relays the connection's bytes to `cluster` (a passthrough cluster).
pub fn tcp_passthrough(cluster: &str) -> FilterChain {
    let proxy = TcpProxy {
        stat_prefix: cluster.to_string(),
        cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    };
    FilterChain {
        name: cluster.to_string(),
        filters: vec![Filter {
            name: "envoy.filters.network.tcp_proxy".to_string(),
            config_type: Some(filter::ConfigType::TypedConfig(any(&proxy))),
        }],
        ..Default::default()
    }
}

/// Restores the destination iptables redirected a connection from.
pub fn original_dst() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.original_dst".to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(&OriginalDst::default()))),
        ..Default::default()
    }
}

/// Tells HTTP from other protocols by the first bytes, for filter chains that match on it.
pub fn http_inspector() -> ListenerFilter {
    ListenerFilter {
        name: "envoy.filters.listener.http_inspector".to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(any(&HttpInspector::default()))),
        ..Default::default()
    }
}

/// The pod's agent (rate-limit and access-log services) as a gRPC service of Envoy's own
/// client, through the bootstrap cluster.
pub fn agent_service() -> GrpcService {
    GrpcService {
        target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
            cluster_name: super::names::AGENT_CLUSTER.to_string(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// An HTTP filter of the connection manager, by the name Envoy registers it under.
pub fn http_filter(name: &str, config: Any) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// Packs a message into an `Any` with its canonical type URL.
pub fn any<M: Message + Name>(message: &M) -> Any {
    Any { type_url: M::type_url(), value: message.encode_to_vec() }
}

/// A typed extension: the name Envoy registers it under and its configuration.
pub fn typed<M: Message + Name>(name: &str, config: &M) -> TypedExtensionConfig {
    TypedExtensionConfig { name: name.to_string(), typed_config: Some(any(config)) }
}

pub fn duration(value: std::time::Duration) -> Duration {
    Duration {
        seconds: i64::try_from(value.as_secs()).unwrap_or(i64::MAX),
        // subsec_nanos is below 10^9, so it always fits.
        nanos: i32::try_from(value.subsec_nanos()).unwrap_or(0),
    }
}

pub fn millis(ms: u64) -> Duration {
    duration(std::time::Duration::from_millis(ms))
}

pub fn u32_value(value: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value })
}

pub fn bool_value(value: bool) -> Option<BoolValue> {
    Some(BoolValue { value })
}

/// Configuration delivered over the same ADS stream as everything else.
pub fn ads() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

pub fn socket_address(ip: &str, port: u32) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    }
}

/// A runtime fraction fixed at 100% (no runtime key: nothing outside this configuration
/// can turn it down).
pub fn all_requests() -> RuntimeFractionalPercent {
    RuntimeFractionalPercent {
        default_value: Some(FractionalPercent {
            numerator: 100,
            denominator: DenominatorType::Hundred as i32,
        }),
        runtime_key: String::new(),
    }
}

/// `typed_extension_protocol_options` that make a cluster speak HTTP/2 (prior knowledge) to
/// its endpoints: gRPC and h2c backends. One map entry only: prost encodes map fields in
/// HashMap order, so a second entry would make the bytes non-deterministic.
pub fn http2_upstream() -> HashMap<String, Any> {
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
            protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())),
        })),
        ..Default::default()
    };
    HashMap::from([("envoy.extensions.upstreams.http.v3.HttpProtocolOptions".to_string(), any(&options))])
}

pub fn exact(value: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::Exact(value.to_string())), ignore_case: false }
}

pub fn prefix(value: &str) -> StringMatcher {
    StringMatcher { match_pattern: Some(MatchPattern::Prefix(value.to_string())), ignore_case: false }
}

/// A RE2 regular expression (Envoy's default engine).
pub fn regex(pattern: String) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher { regex: pattern, ..Default::default() })),
        ignore_case: false,
    }
}

/// Escapes every ASCII punctuation character, which RE2 reads literally when escaped.
pub fn regex_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if c.is_ascii_punctuation() {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regex_escape_quotes_punctuation_only() {
        assert_eq!(regex_escape("/v1/a.b?c"), r"\/v1\/a\.b\?c");
        assert_eq!(regex_escape("plain-ü"), r"plain\-ü");
    }

    #[test]
    fn durations_keep_milliseconds() {
        assert_eq!(millis(1500), Duration { seconds: 1, nanos: 500_000_000 });
    }
}
