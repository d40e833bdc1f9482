//! Push latency (`make bench-xds`): 1,000 ADS streams in-process on loopback, each a proxy
//! that ACKs whatever it is sent. A policy change is published; the clock runs from
//! publishing the new inventory to the moment the server has the last ACK of the new
//! configuration (the policy reads "acknowledged by 1000/1000 proxies"). The baseline,
//! measured in the same run, is compiling and encoding one proxy's snapshot once.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use breakwater_api::{CircuitBreakerPolicy, Duration as PolicyDuration};
use breakwater_operator::{
    compile::{self, Compiled, Proxy, type_url},
    http::State,
    inventory::{Inventory, ObjectName},
    standalone::load,
    xds::{AdsServer, SnapshotCache},
};
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DiscoveryRequest, DiscoveryResponse,
        aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const CLIENTS: usize = 1_000;
const STREAMS_PER_CONNECTION: usize = 100;
const ROUNDS: usize = 7;
const TYPES: [&str; 5] =
    [type_url::CLUSTER, type_url::ENDPOINT, type_url::LISTENER, type_url::ROUTE, type_url::AGENT];

async fn acknowledging_proxy(channel: Channel, node: String) {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (requests, rx) = mpsc::channel(16);
    let Ok(response) = client.stream_aggregated_resources(ReceiverStream::new(rx)).await else { return };
    let mut responses = response.into_inner();
    let node = Some(Node { id: node, ..Node::default() });
    for type_ in TYPES {
        let request =
            DiscoveryRequest { node: node.clone(), type_url: type_.into(), ..DiscoveryRequest::default() };
        if requests.send(request).await.is_err() {
            return;
        }
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

/// The inventory with the payments policy's timeout set to `seconds` at `generation`.
fn with_timeout(base: &Inventory, seconds: u32, generation: i64) -> Inventory {
    let mut inventory = base.clone();
    inventory.circuit_breakers = base
        .circuit_breakers
        .iter()
        .map(|policy| {
            if policy.metadata.name.as_deref() != Some("payments") {
                return policy.clone();
            }
            let mut changed: CircuitBreakerPolicy = (**policy).clone();
            changed.spec.timeout = Some(PolicyDuration::new(format!("{seconds}s")));
            changed.metadata.generation = Some(generation);
            Arc::new(changed)
        })
        .collect();
    inventory
}

async fn wait_for_all_acks(cache: &SnapshotCache, generation: i64) {
    let name = ObjectName::new("shop", "payments");
    let mut changes = cache.subscribe_changes();
    loop {
        let acks = cache.acknowledgements("CircuitBreakerPolicy", &name, generation);
        if acks.acknowledged == CLIENTS {
            return;
        }
        if tokio::time::timeout(Duration::from_secs(60), changes.changed()).await.is_err() {
            panic!("no progress for 60s; last: {acks:?}");
        }
    }
}

/// Compiling and encoding one proxy's snapshot, as the discovery responses carry it.
fn encode_once(inventory: &Inventory) -> (Duration, usize) {
    let proxy = Proxy::from_node_id("shop/bench-0").expect("node id");
    let started = Instant::now();
    let snapshot = compile::compile(inventory, &proxy);
    let bytes: usize = snapshot
        .resources
        .iter()
        .map(|(type_, resources)| {
            DiscoveryResponse {
                type_url: type_.to_string(),
                resources: resources.values().cloned().collect(),
                ..DiscoveryResponse::default()
            }
            .encode_to_vec()
            .len()
        })
        .sum();
    (started.elapsed(), bytes)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench-xds: skipped outside `cargo bench` (run `make bench-xds`)");
        return;
    }
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let base = load::load_dir(&examples, "breakwater-system").expect("examples load").inventory;
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(&with_timeout(&base, 10, 1)));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let ads = AdsServer::new(cache.clone(), Arc::new(State::default()));
    tokio::spawn(breakwater_operator::xds::serve(listener, ads, std::future::pending()));
    for connection in 0..CLIENTS.div_ceil(STREAMS_PER_CONNECTION) {
        let channel =
            Channel::from_shared(endpoint.clone()).expect("endpoint").connect().await.expect("connect");
        for stream in 0..STREAMS_PER_CONNECTION {
            let node = format!("shop/bench-{}", connection * STREAMS_PER_CONNECTION + stream);
            tokio::spawn(acknowledging_proxy(channel.clone(), node));
        }
    }
    wait_for_all_acks(&cache, 1).await;
    assert_eq!(cache.connected(), CLIENTS);

    let mut pushes = Vec::new();
    let mut baselines = Vec::new();
    let mut bytes = 0;
    for round in 0..ROUNDS {
        let generation = i64::try_from(round).expect("small") + 2;
        let inventory = with_timeout(&base, 11 + u32::try_from(round).expect("small"), generation);
        let (baseline, encoded) = encode_once(&inventory);
        baselines.push(baseline);
        bytes = encoded;
        let started = Instant::now();
        cache.publish(Compiled::new(&inventory));
        wait_for_all_acks(&cache, generation).await;
        pushes.push(started.elapsed());
    }
    let (push, baseline) = (median(pushes.clone()), median(baselines));
    let worst = pushes.iter().max().copied().unwrap_or_default();
    println!(
        "| ADS clients | push → last ACK (median of {ROUNDS}) | worst | compile+encode one snapshot ({bytes} B) | ratio |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {CLIENTS} | {:.1} ms | {:.1} ms | {:.3} ms | {:.0}× |",
        push.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3,
        push.as_secs_f64() / baseline.as_secs_f64()
    );
}
