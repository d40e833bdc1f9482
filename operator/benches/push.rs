//! Push latency (`make bench-xds`): 1,000 ADS streams in-process on loopback, each a proxy
//! that ACKs whatever it is sent (the tests' ADS client, `tests/support/ads.rs`). A policy
//! change is published; the clock runs from publishing the new inventory to the moment the
//! server has the last of the 1,000 ACKs of the new configuration. The baseline, measured
//! in the same run, is compiling and encoding one proxy's snapshot once.

// The benchmark uses the acknowledging part of the tests' client.
#[allow(dead_code)]
#[path = "../tests/support/ads.rs"]
mod ads;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use breakwater_api::{CircuitBreakerPolicy, Duration as PolicyDuration};
use breakwater_operator::{
    compile::{self, Compiled, Proxy},
    inventory::{Inventory, ObjectName},
    standalone::load,
    xds::SnapshotCache,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message;
use tonic::transport::Channel;

const CLIENTS: usize = 1_000;
const STREAMS_PER_CONNECTION: usize = 100;
const ROUNDS: usize = 7;

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

    let endpoint = ads::serve(cache.clone()).await;
    for connection in 0..CLIENTS.div_ceil(STREAMS_PER_CONNECTION) {
        let channel =
            Channel::from_shared(endpoint.clone()).expect("endpoint").connect().await.expect("connect");
        for stream in 0..STREAMS_PER_CONNECTION {
            let node = format!("shop/bench-{}", connection * STREAMS_PER_CONNECTION + stream);
            let channel = channel.clone();
            tokio::spawn(async move { ads::Client::on(channel, &node).await.acknowledge_everything().await });
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
