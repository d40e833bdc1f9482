//! The sidecar's bootstrap: who it is (node id `namespace/pod`), where its configuration
//! comes from, and the clusters that must exist before any configuration arrives. Both are
//! the pod's agent on loopback: its ADS proxy (which forwards the stream to the operator
//! with the pod's ServiceAccount token, docs/injection.md) and its rate-limit service (which
//! the inbound listener calls). Everything else comes over ADS.

use envoy_types::pb::envoy::config::{
    bootstrap::v3::{
        Admin, Bootstrap,
        bootstrap::{DynamicResources, StaticResources},
    },
    cluster::v3::{
        Cluster,
        cluster::{ClusterDiscoveryType, DiscoveryType},
    },
    core::v3::{ApiConfigSource, ApiVersion, GrpcService, Node, api_config_source::ApiType, grpc_service},
};

use super::{names, outbound, proto};

/// The bootstrap of the Envoy whose node id is `node` (`NAMESPACE/POD`) in `namespace`. The
/// injector passes Kubernetes' `$(POD_NAMESPACE)/$(POD_NAME)` references, which the kubelet
/// expands in the container's arguments.
pub fn bootstrap(node: &str, namespace: &str) -> Bootstrap {
    let ads = ApiConfigSource {
        api_type: ApiType::DeltaGrpc as i32,
        transport_api_version: ApiVersion::V3 as i32,
        grpc_services: vec![GrpcService {
            target_specifier: Some(grpc_service::TargetSpecifier::EnvoyGrpc(grpc_service::EnvoyGrpc {
                cluster_name: names::XDS_CLUSTER.to_string(),
                ..Default::default()
            })),
            ..Default::default()
        }],
        set_node_on_first_message_only: true,
        ..Default::default()
    };
    Bootstrap {
        node: Some(Node { id: node.to_string(), cluster: namespace.to_string(), ..Default::default() }),
        static_resources: Some(StaticResources {
            clusters: vec![
                loopback_grpc_cluster(names::XDS_CLUSTER, names::XDS_PROXY_PORT),
                loopback_grpc_cluster(names::AGENT_CLUSTER, names::AGENT_PORT),
            ],
            ..Default::default()
        }),
        dynamic_resources: Some(DynamicResources {
            lds_config: Some(proto::ads()),
            cds_config: Some(proto::ads()),
            ads_config: Some(ads),
            ..Default::default()
        }),
        admin: Some(Admin {
            address: Some(proto::socket_address("127.0.0.1", names::ADMIN_PORT)),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A gRPC (HTTP/2) cluster of one port of the agent, on loopback.
fn loopback_grpc_cluster(name: &str, port: u16) -> Cluster {
    let mut endpoints = std::collections::BTreeMap::new();
    endpoints.insert(String::new(), [("127.0.0.1".to_string(), port)].into());
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(proto::millis(1_000)),
        load_assignment: Some(outbound::load_assignment(name, &endpoints)),
        typed_extension_protocol_options: proto::http2_upstream(),
        ..Default::default()
    }
}
