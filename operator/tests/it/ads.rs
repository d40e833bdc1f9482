//! The ADS server with a real gRPC client (envoy-types' generated client) on loopback:
//! initial fetch, ACK, NACK, pushes to exactly the affected nodes, EDS by name, reconnects,
//! and the `Programmed` verdict the ACKs produce. Snapshots here are synthetic; the
//! compiler's own output is covered by its golden tests.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use breakwater_operator::{
    compile::{PolicyVersion, Proxy, Snapshot, type_url},
    http::State,
    inventory::ObjectName,
    status,
    xds::{AdsServer, Authenticator, SnapshotCache},
};
use envoy_types::pb::{
    envoy::{
        config::cluster::v3::Cluster,
        service::discovery::v3::{
            DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::protobuf::Any,
};
use prost::Message;

use crate::support::ads::{Client, DEADLINE, serve};

/// Snapshots by node id, editable by the test; the cache's compiler reads them.
#[derive(Clone, Default)]
struct World(Arc<Mutex<BTreeMap<String, Snapshot>>>);

impl World {
    fn set(&self, node: &str, snapshot: Snapshot) {
        self.0.lock().expect("lock").insert(node.to_string(), snapshot);
    }

    fn publish(&self, cache: &SnapshotCache) {
        let world = self.clone();
        cache.set_compiler(Arc::new(move |proxy: &Proxy| {
            world.0.lock().expect("lock").get(&proxy.node_id()).cloned().unwrap_or_default()
        }));
    }
}

fn snapshot(type_: &'static str, names: &[&str], policy_generation: Option<i64>) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for name in names {
        let cluster = Cluster { name: name.to_string(), ..Cluster::default() };
        snapshot.insert(type_, *name, Any { type_url: type_.to_string(), value: cluster.encode_to_vec() });
    }
    if let Some(generation) = policy_generation {
        let policy =
            PolicyVersion { kind: "RateLimitPolicy", name: ObjectName::new("shop", "limits"), generation };
        snapshot.carry(policy, type_);
    }
    snapshot
}

async fn server(world: &World) -> (String, Arc<SnapshotCache>) {
    let cache = Arc::new(SnapshotCache::default());
    world.publish(&cache);
    (serve(cache.clone()).await, cache)
}

fn names(response: &DiscoveryResponse) -> Vec<String> {
    response
        .resources
        .iter()
        .map(|any| Cluster::decode(any.value.as_slice()).expect("a Cluster").name)
        .collect()
}

/// Waits (with a deadline) until the policy's Programmed verdict has `reason`.
async fn programmed_reason(cache: &SnapshotCache, generation: i64, reason: &str) -> String {
    verdict_reason(cache, "RateLimitPolicy", &ObjectName::new("shop", "limits"), generation, reason).await
}

/// Waits (with a deadline) until the Programmed verdict of `kind` `name` at `generation`
/// has `reason`, re-reading it on every change of the cache; returns its message.
pub(crate) async fn verdict_reason(
    cache: &SnapshotCache,
    kind: &'static str,
    name: &ObjectName,
    generation: i64,
    reason: &str,
) -> String {
    let mut changes = cache.subscribe_changes();
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        let verdict = status::programmed(Some(&cache.acknowledgements(kind, name, generation)));
        if verdict.reason == reason {
            return verdict.message;
        }
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            tokio::time::timeout(left, changes.changed()).await.is_ok(),
            "Programmed never became {reason}; last: {} {}",
            verdict.reason,
            verdict.message
        );
    }
}

#[tokio::test]
async fn initial_fetch_ack_and_programmed() {
    let world = World::default();
    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1", "c2"], Some(1)));
    let (endpoint, cache) = server(&world).await;
    let mut a = Client::connect(&endpoint, "shop/a").await;
    a.subscribe(type_url::CLUSTER, &[]).await;
    let first = a.next().await;
    assert_eq!(first.type_url, type_url::CLUSTER);
    assert_eq!(names(&first), ["c1", "c2"]);
    assert!(!first.version_info.is_empty() && !first.nonce.is_empty());
    let pending = programmed_reason(&cache, 1, "Pending").await;
    assert_eq!(pending, "waiting for 1/1 proxies to acknowledge");

    a.ack(&first, &[]).await;
    let message = programmed_reason(&cache, 1, "Programmed").await;
    assert_eq!(message, "acknowledged by 1/1 proxies");
    // A newer generation is not programmed by an ACK of the old one.
    let older = cache.acknowledgements("RateLimitPolicy", &ObjectName::new("shop", "limits"), 2);
    assert_eq!(status::programmed(Some(&older)).reason, "Pending");
}

#[tokio::test]
async fn nack_keeps_the_last_good_version_and_reports_the_error() {
    let world = World::default();
    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1"], Some(1)));
    let (endpoint, cache) = server(&world).await;
    let mut a = Client::connect(&endpoint, "shop/a").await;
    a.subscribe(type_url::CLUSTER, &[]).await;
    let v1 = a.next().await;
    a.ack(&v1, &[]).await;
    programmed_reason(&cache, 1, "Programmed").await;

    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1", "bad"], Some(2)));
    world.publish(&cache);
    let v2 = a.next().await;
    assert_ne!(v2.version_info, v1.version_info);
    a.nack(&v2, &v1.version_info, "cluster bad: invalid circuit breaker threshold").await;
    let message = programmed_reason(&cache, 2, "Rejected").await;
    assert!(message.contains("shop/a: cluster bad: invalid circuit breaker threshold"), "{message}");

    // The rejected version is not sent again; the next response is the fixed one.
    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1", "good"], Some(3)));
    world.publish(&cache);
    let v3 = a.next().await;
    assert_eq!(names(&v3), ["c1", "good"]);
    a.ack(&v3, &[]).await;
    programmed_reason(&cache, 3, "Programmed").await;
}

#[tokio::test]
async fn a_change_reaches_exactly_the_affected_node() {
    let world = World::default();
    world.set("shop/a", snapshot(type_url::CLUSTER, &["a1"], None));
    world.set("shop/b", snapshot(type_url::CLUSTER, &["b1"], None));
    let (endpoint, cache) = server(&world).await;
    let (mut a, mut b) =
        (Client::connect(&endpoint, "shop/a").await, Client::connect(&endpoint, "shop/b").await);
    a.subscribe(type_url::CLUSTER, &[]).await;
    b.subscribe(type_url::CLUSTER, &[]).await;
    let (a1, b1) = (a.next().await, b.next().await);
    assert_eq!((names(&a1), names(&b1)), (vec!["a1".to_string()], vec!["b1".to_string()]));
    a.ack(&a1, &[]).await;
    b.ack(&b1, &[]).await;

    world.set("shop/a", snapshot(type_url::CLUSTER, &["a1", "a2"], None));
    world.publish(&cache);
    assert_eq!(names(&a.next().await), ["a1", "a2"]);
    // b got nothing from a's change: its next response is its own change.
    world.set("shop/b", snapshot(type_url::CLUSTER, &["b2"], None));
    world.publish(&cache);
    assert_eq!(names(&b.next().await), ["b2"]);
}

#[tokio::test]
async fn eds_is_served_by_resource_name() {
    let world = World::default();
    world.set("shop/a", snapshot(type_url::ENDPOINT, &["c1", "c2", "c3"], None));
    let (endpoint, _cache) = server(&world).await;
    let mut a = Client::connect(&endpoint, "shop/a").await;
    a.subscribe(type_url::ENDPOINT, &["c1"]).await;
    let first = a.next().await;
    assert_eq!(names(&first), ["c1"]);
    // Asking for more names (with the ACK) yields exactly those; the version is the
    // snapshot's, whatever the names.
    a.ack(&first, &["c1", "c3"]).await;
    let second = a.next().await;
    assert_eq!(names(&second), ["c1", "c3"]);
    assert_eq!(second.version_info, first.version_info);
}

#[tokio::test]
async fn reconnect_resumes_from_the_version_held() {
    let world = World::default();
    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1"], Some(1)));
    let (endpoint, cache) = server(&world).await;
    let mut a = Client::connect(&endpoint, "shop/a").await;
    a.subscribe(type_url::CLUSTER, &[]).await;
    let v1 = a.next().await;
    a.ack(&v1, &[]).await;
    programmed_reason(&cache, 1, "Programmed").await;
    drop(a);

    // The same proxy comes back (as after an operator restart) holding v1.
    let mut again = Client::connect(&endpoint, "shop/a").await;
    again.send(type_url::CLUSTER, &[], &v1.version_info, "", None).await;
    programmed_reason(&cache, 1, "Programmed").await;
    // v1 is not resent: the first response on the new stream is the next change.
    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1", "c2"], Some(2)));
    world.publish(&cache);
    let v2 = again.next().await;
    assert_eq!(names(&v2), ["c1", "c2"]);
}

#[tokio::test]
async fn stale_nonces_are_ignored_and_bad_node_ids_refused() {
    let world = World::default();
    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1"], Some(1)));
    let (endpoint, cache) = server(&world).await;
    let mut a = Client::connect(&endpoint, "shop/a").await;
    a.subscribe(type_url::CLUSTER, &[]).await;
    let v1 = a.next().await;
    a.ack(&v1, &[]).await;
    programmed_reason(&cache, 1, "Programmed").await;
    // A NACK carrying a nonce this stream never sent answers nothing: it must be ignored.
    a.send(type_url::CLUSTER, &[], &v1.version_info, "not-a-nonce", Some("stale complaint")).await;
    // Requests are handled in order, so once a later subscription is answered and ACKed,
    // the stale NACK has been seen — and must not have turned the verdict to Rejected.
    a.subscribe(type_url::ENDPOINT, &[]).await;
    let endpoints = a.next().await;
    assert_eq!(endpoints.type_url, type_url::ENDPOINT);
    a.ack(&endpoints, &[]).await;
    programmed_reason(&cache, 1, "Programmed").await;

    let mut bad = Client::connect(&endpoint, "no-namespace").await;
    bad.subscribe(type_url::CLUSTER, &[]).await;
    let status = bad.answer().await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("NAMESPACE/POD"), "{}", status.message());
}

#[tokio::test]
async fn a_standby_refuses_streams_until_it_leads() {
    let world = World::default();
    world.set("shop/a", snapshot(type_url::CLUSTER, &["c1"], None));
    let cache = Arc::new(SnapshotCache::default());
    world.publish(&cache);
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let ads = AdsServer::authenticated(
        cache.clone(),
        Arc::new(State::default()),
        open.clone(),
        Authenticator::unauthenticated(),
    );
    tokio::spawn(breakwater_operator::xds::serve(listener, ads, std::future::pending()));

    let mut client = AggregatedDiscoveryServiceClient::connect(endpoint.clone()).await.expect("connect");
    let status = client
        .stream_aggregated_resources(tokio_stream::iter(Vec::<DiscoveryRequest>::new()))
        .await
        .expect_err("a standby refuses");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(cache.connected(), 0);

    open.store(true, std::sync::atomic::Ordering::Release);
    let mut a = Client::connect(&endpoint, "shop/a").await;
    a.subscribe(type_url::CLUSTER, &[]).await;
    assert_eq!(names(&a.next().await), ["c1"]);
}
