//! The examples end to end without a cluster: compiled by the real compiler, served over
//! ADS on loopback, fetched and acknowledged by one gRPC client per example Pod — after
//! which every Service policy and LockLease reports `Programmed=True`, as standalone mode
//! prints it.

use std::{path::Path, sync::Arc, time::Duration};

use breakwater_operator::{
    compile::type_url,
    http::State,
    standalone::{self, load},
    xds::{AdsServer, SnapshotCache, feed},
};
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const TYPES: [&str; 5] =
    [type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE, type_url::AGENT];
const DEADLINE: Duration = Duration::from_secs(20);

/// A proxy that subscribes to every type and acknowledges whatever it is sent, until the
/// test ends.
pub async fn acknowledging_proxy(endpoint: String, node: String) {
    let mut client = AggregatedDiscoveryServiceClient::connect(endpoint).await.expect("connect");
    let (requests, rx) = mpsc::channel(16);
    let mut responses =
        client.stream_aggregated_resources(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let node = Some(Node { id: node, ..Node::default() });
    for type_ in TYPES {
        let request =
            DiscoveryRequest { node: node.clone(), type_url: type_.into(), ..DiscoveryRequest::default() };
        requests.send(request).await.expect("subscribe");
    }
    while let Ok(Some(response)) = responses.message().await {
        let ack = DiscoveryRequest {
            node: node.clone(),
            type_url: response.type_url,
            version_info: response.version_info,
            response_nonce: response.nonce,
            ..DiscoveryRequest::default()
        };
        if requests.send(ack).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn every_example_policy_is_programmed_once_its_proxies_ack() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let loaded = load::load_dir(&examples, "breakwater-system").expect("examples load");
    let cache = Arc::new(SnapshotCache::default());
    cache.set_compiler(feed::compiler(&loaded.inventory));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let ads = AdsServer::new(cache.clone(), Arc::new(State::default()));
    tokio::spawn(breakwater_operator::xds::serve(listener, ads, std::future::pending()));

    let evaluate = || standalone::evaluate(&loaded, Some(&cache), &Default::default(), &Time(jiff_now()));
    let before = evaluate();
    assert!(before.iter().all(|r| !programmed(r)), "nothing is programmed before any proxy connects");

    let pods: Vec<String> = loaded.inventory.pods.keys().map(|p| p.to_string()).collect();
    assert!(pods.len() >= 3, "the examples declare workloads: {pods:?}");
    for pod in pods {
        tokio::spawn(acknowledging_proxy(endpoint.clone(), pod));
    }

    let mut changes = cache.subscribe_changes();
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        let rows = evaluate();
        let service_policies: Vec<_> = rows.iter().filter(|r| r.kind != "OutboxRelay").collect();
        assert!(service_policies.iter().any(|r| r.kind == "LockLease"), "the examples declare a lease");
        if service_policies.iter().all(|r| programmed(r)) {
            for row in service_policies {
                let message = &condition(row).message;
                assert!(message.starts_with("acknowledged by "), "{}: {message}", row.name);
            }
            return;
        }
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        if tokio::time::timeout(left, changes.changed()).await.is_err() {
            let pending: Vec<String> = service_policies
                .iter()
                .filter(|r| !programmed(r))
                .map(|r| format!("{} {}: {}", r.kind, r.name, condition(r).message))
                .collect();
            panic!("not programmed within {DEADLINE:?}: {pending:#?}");
        }
    }
}

fn condition(row: &standalone::Row) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    row.status.conditions.iter().find(|c| c.type_ == "Programmed").expect("Programmed condition")
}

fn programmed(row: &standalone::Row) -> bool {
    condition(row).status == "True"
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}
