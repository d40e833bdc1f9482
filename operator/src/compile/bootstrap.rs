//! The sidecar's bootstrap: who it is (node id `namespace/pod`), where its configuration
//! comes from (ADS over gRPC to the operator), and the one cluster that must exist before
//! any configuration arrives, the agent on loopback (the rate-limit service the inbound
//! listener calls). Everything else comes over ADS.

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

use super::{Proxy, names, outbound, proto};

/// Where the sidecars reach the operator's ADS server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsServer {
    pub host: String,
    pub port: u16,
}

impl Default for XdsServer {
    /// The operator Service the Helm chart installs.
    fn default() -> Self {
        Self { host: "breakwater.breakwater-system.svc".to_string(), port: 18000 }
    }
}

pub fn bootstrap(proxy: &Proxy, xds: &XdsServer) -> Bootstrap {
    let ads = ApiConfigSource {
        api_type: ApiType::Grpc as i32,
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
        node: Some(Node { id: proxy.node_id(), cluster: proxy.pod.namespace.clone(), ..Default::default() }),
        static_resources: Some(StaticResources {
            clusters: vec![
                grpc_cluster(names::XDS_CLUSTER, DiscoveryType::StrictDns, &xds.host, u32::from(xds.port)),
                grpc_cluster(names::AGENT_CLUSTER, DiscoveryType::Static, "127.0.0.1", names::AGENT_PORT),
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

/// A gRPC (HTTP/2) cluster with one address.
fn grpc_cluster(name: &str, kind: DiscoveryType, host: &str, port: u32) -> Cluster {
    let mut endpoints = std::collections::BTreeMap::new();
    endpoints.insert(String::new(), [(host.to_string(), u16::try_from(port).unwrap_or(0))].into());
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(kind as i32)),
        connect_timeout: Some(proto::millis(1_000)),
        load_assignment: Some(outbound::load_assignment(name, &endpoints)),
        typed_extension_protocol_options: proto::http2_upstream(),
        ..Default::default()
    }
}
