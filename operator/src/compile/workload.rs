//! What the compiler reads from Kubernetes workload objects: which ports of a Service get
//! a proxy configuration, which pods back a Service, which container port a Service port
//! lands on, and the ready endpoints of an EndpointSlice.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort as K8sServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One port of a Service the compiler configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSpec {
    /// The name policies use for it (`sectionName`): its name, or its number when unnamed.
    pub key: String,
    /// The port's name as the EndpointSlices carry it ("" when unnamed).
    pub name: String,
    pub number: u16,
    pub target: Option<IntOrString>,
    /// The backend speaks HTTP/2 without TLS (gRPC, h2c).
    pub http2: bool,
}

/// The TCP ports of a Service worth a proxy configuration. ExternalName Services have no
/// endpoints to balance over and are left to DNS; UDP and SCTP ports carry no HTTP.
pub fn ports(service: &Service) -> Vec<PortSpec> {
    let Some(spec) = service.spec.as_ref() else { return Vec::new() };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Vec::new();
    }
    spec.ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            let number = u16::try_from(p.port).ok().filter(|n| *n > 0)?;
            let name = p.name.clone().unwrap_or_default();
            let key = if name.is_empty() { number.to_string() } else { name.clone() };
            Some(PortSpec { key, http2: speaks_http2(p), name, number, target: p.target_port.clone() })
        })
        .collect()
}

/// `appProtocol` first (`grpc`, `http2`, `kubernetes.io/h2c`), then the port-name prefix
/// convention Istio made common (`grpc-…`, `http2-…`, `h2c-…`).
fn speaks_http2(port: &K8sServicePort) -> bool {
    if let Some(app) = port.app_protocol.as_deref() {
        return matches!(app, "grpc" | "http2" | "h2c" | "kubernetes.io/h2c");
    }
    let name = port.name.as_deref().unwrap_or_default();
    ["grpc", "http2", "h2c"].iter().any(|p| name == *p || name.starts_with(&format!("{p}-")))
}

/// Whether `pod` is one of the Service's backends: same namespace, and every label of a
/// non-empty selector present on the pod. A Service without a selector has no pods.
pub fn selects(service: &Service, pod: &Pod) -> bool {
    if service.metadata.namespace != pod.metadata.namespace {
        return false;
    }
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|s| !s.is_empty())
    else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The container port a Service port reaches on `pod`: the number, the container port of
/// that name, or the Service port itself when targetPort is unset. None when a named port
/// is not declared by any container of the pod.
pub fn target_port(port: &PortSpec, pod: &Pod) -> Option<u16> {
    match &port.target {
        None => Some(port.number),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n > 0),
        Some(IntOrString::String(name)) => pod
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// Ready endpoints of one Service port, by zone ("" when unknown), deduplicated across the
/// Service's slices. A nil `ready` counts as ready, as the EndpointSlice API asks.
pub fn endpoints<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
    port_name: &str,
) -> BTreeMap<String, BTreeSet<(String, u16)>> {
    let mut by_zone: BTreeMap<String, BTreeSet<(String, u16)>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type == "FQDN" {
            continue;
        }
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or_default() == port_name)
            .and_then(|p| p.port)
            .and_then(|p| u16::try_from(p).ok())
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            let Some(address) = endpoint.addresses.first().filter(|_| ready) else { continue };
            by_zone
                .entry(endpoint.zone.clone().unwrap_or_default())
                .or_default()
                .insert((address.clone(), port));
        }
    }
    by_zone
}
