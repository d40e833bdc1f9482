//! Incremental (delta) ADS with a real gRPC client on loopback, as the sidecar's Envoy uses
//! it: the examples compiled by the real compiler, a pod's whole configuration on connect
//! (its virtual hosts over VHDS), then a one-policy change sent as exactly the resources it
//! touched, its ACK making the policy Programmed, and a reconnect with the versions held
//! sent nothing yet counted as acknowledged.

use std::{collections::BTreeMap, path::Path, sync::Arc, time::Duration};

use breakwater_api::Duration as ApiDuration;
use breakwater_operator::{
    compile::{Compiled, type_url},
    inventory::{Inventory, ObjectName},
    standalone::load,
    status,
    xds::SnapshotCache,
};
use prost::Message;

use crate::support::ads::{Client, DEADLINE, DeltaClient, ENVOY, serve};
const POD: &str = "shop/api-7c9f8d6b5-m4n8z";

fn programmed(cache: &SnapshotCache, generation: i64) -> (bool, String) {
    let name = ObjectName::new("shop", "payments");
    let verdict =
        status::programmed(Some(&cache.acknowledgements("CircuitBreakerPolicy", &name, generation)));
    (verdict.ok, verdict.message)
}

/// The example payments policy with another timeout, at `generation`.
fn set_payments_timeout(inventory: &mut Inventory, timeout: &str, generation: i64) {
    let policy =
        inventory.circuit_breakers.iter_mut().find(|p| p.metadata.name.as_deref() == Some("payments"));
    let policy = Arc::make_mut(policy.expect("the payments policy"));
    policy.spec.timeout = Some(ApiDuration::new(timeout));
    policy.metadata.generation = Some(generation);
}

async fn eventually(what: &str, mut probe: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !probe() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_timeout_change_sends_one_pod_its_two_virtual_hosts_and_nothing_else() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut loaded = load::load_dir(&examples, "breakwater-system").expect("examples load");
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(&loaded.inventory));
    let endpoint = serve(cache.clone()).await;

    // Connect: every subscribed type arrives whole; the virtual hosts one resource each.
    let mut envoy = DeltaClient::connect(&endpoint, POD).await;
    let mut held: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (type_url, names) in ENVOY {
        envoy.subscribe(type_url, names, []).await;
        let response = envoy.next().await;
        assert_eq!(response.type_url, type_url);
        assert!(response.removed_resources.is_empty());
        let versions = response.resources.iter().map(|r| (r.name.clone(), r.version.clone())).collect();
        held.insert(type_url.to_string(), versions);
        envoy.ack(&response).await;
    }
    // An agent's stream holds the breaker's rule (state of the world here: the server
    // speaks both).
    let agent = Client::connect(&endpoint, POD).await;
    agent.subscribe(type_url::BREAKER, &[]).await;
    let mut agent = agent;
    let rules = agent.next().await;
    agent.ack(&rules, &[]).await;
    let hosts = &held[type_url::VIRTUAL_HOST];
    assert!(hosts.contains_key("outbound_http/payments.shop.svc.cluster.local:80"), "{hosts:?}");
    assert!(hosts.contains_key("outbound_http/payments:80"), "shop's short name: {hosts:?}");
    assert!(hosts.keys().all(|h| h.starts_with("outbound_http/")));
    assert_eq!(held[type_url::ROUTE].len(), 1, "only outbound_http was asked for by name");
    eventually("Programmed at generation 1", || programmed(&cache, 1).0).await;

    // The payments policy's timeout changes: the two hosts of payments:80 (qualified and
    // shop's short names) are all this pod is sent.
    set_payments_timeout(&mut loaded.inventory, "7s", 2);
    cache.publish(Compiled::new(&loaded.inventory));
    let change = envoy.next().await;
    // Responses go out in type order and virtual hosts come last: a listener, cluster,
    // endpoint or route response of this change would have come first.
    assert_eq!(change.type_url, type_url::VIRTUAL_HOST);
    let names: Vec<&str> = change.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["outbound_http/payments.shop.svc.cluster.local:80", "outbound_http/payments:80"]);
    assert!(change.removed_resources.is_empty());
    let bytes = change.encoded_len();
    assert!(bytes < 2_000, "{bytes} bytes for one timeout");
    assert!(!programmed(&cache, 2).0, "not Programmed before the ACK");
    envoy.ack(&change).await;
    eventually("Programmed at generation 2", || programmed(&cache, 2).0).await;
    for resource in &change.resources {
        held.get_mut(type_url::VIRTUAL_HOST)
            .expect("held")
            .insert(resource.name.clone(), resource.version.clone());
    }

    // The pod restarts its streams; Envoy holds exactly the current versions: nothing to
    // send, and the server counts it as holding them.
    drop((envoy, agent));
    eventually("the streams gone", || cache.connected() == 0).await;
    let mut again = DeltaClient::connect(&endpoint, POD).await;
    for (type_url, names) in ENVOY {
        again.subscribe(type_url, names, held[type_url].clone()).await;
    }
    let agent = Client::connect(&endpoint, POD).await;
    agent.send(type_url::BREAKER, &[], &rules.version_info, "", None).await;
    eventually("Programmed from the versions held", || programmed(&cache, 2).0).await;
    let (_, message) = programmed(&cache, 2);
    assert!(message.starts_with("acknowledged by 1/"), "{message}");
    // A change after the reconnect is still a difference from what it holds.
    set_payments_timeout(&mut loaded.inventory, "9s", 3);
    cache.publish(Compiled::new(&loaded.inventory));
    let change = again.next().await;
    assert_eq!(change.type_url, type_url::VIRTUAL_HOST);
    assert_eq!(change.resources.len(), 2);
}
