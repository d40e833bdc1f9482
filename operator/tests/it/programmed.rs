//! The examples end to end without a cluster: compiled by the real compiler, served over
//! ADS on loopback, fetched and acknowledged by one gRPC client per example Pod — after
//! which every Service policy and LockLease reports `Programmed=True`, as standalone mode
//! prints it.

use std::{path::Path, sync::Arc, time::Duration};

use breakwater_operator::{
    compile::{Compiled, type_url},
    standalone::{self, load},
    xds::SnapshotCache,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::support::ads::{Client, acknowledging_proxy, serve};

const DEADLINE: Duration = Duration::from_secs(20);

/// The examples, compiled and served over ADS on loopback: what was loaded, the cache, and
/// the endpoint proxies connect to.
async fn serve_examples() -> (load::Loaded, Arc<SnapshotCache>, String) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let loaded = load::load_dir(&examples, "breakwater-system").expect("examples load");
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(&loaded.inventory));
    let endpoint = serve(cache.clone()).await;
    (loaded, cache, endpoint)
}

#[tokio::test]
async fn every_example_policy_is_programmed_once_its_proxies_ack() {
    let (loaded, cache, endpoint) = serve_examples().await;

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

/// The first try, as a test: the examples served, and one agent — no Envoy —
/// connected as the billing worker. Its ACKs of the agent's configuration program the lease
/// the agent holds, and nothing else: the circuit breakers live in clusters and routes no
/// Envoy has acknowledged, so they stay Pending, and the message counts the pods that carry
/// them but have nothing connected.
#[tokio::test]
async fn an_agent_alone_programs_only_what_the_agent_carries() {
    let (loaded, cache, endpoint) = serve_examples().await;

    let mut agent = Client::connect(&endpoint, "billing/billing-worker-84c6d5f7b9-tq9vd").await;
    agent.subscribe(type_url::AGENT, &[]).await;
    let config = agent.next().await;
    agent.ack(&config, &[]).await;

    let pods = loaded.inventory.pods.len();
    let mut changes = cache.subscribe_changes();
    let give_up = tokio::time::Instant::now() + DEADLINE;
    let rows = loop {
        let rows = standalone::evaluate(&loaded, Some(&cache), &Default::default(), &Time(jiff_now()));
        if rows.iter().any(|r| r.kind == "LockLease" && programmed(r)) {
            break rows;
        }
        let left = give_up.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            tokio::time::timeout(left, changes.changed()).await.is_ok(),
            "the lease was never programmed"
        );
    };
    let said = |kind: &str, name: &str| -> (String, String) {
        let row = rows.iter().find(|r| r.kind == kind && r.name.name == name).expect("row");
        let c = condition(row);
        (c.status.clone(), c.message.clone())
    };
    assert_eq!(said("LockLease", "invoice-run"), ("True".into(), "acknowledged by 1/1 proxies".into()));
    for name in ["payments", "production-defaults"] {
        assert_eq!(
            said("CircuitBreakerPolicy", name),
            (
                "False".into(),
                format!("waiting for 1/{pods} proxies to acknowledge ({} not connected)", pods - 1)
            ),
            "{name}: the agent carries the outbound clusters but never acknowledged them"
        );
    }
    // The per-user limit is carried by the two api pods alone, neither connected.
    assert_eq!(
        said("RateLimitPolicy", "api-per-user"),
        ("False".into(), "acknowledged by 0/2 proxies (2 not connected)".into())
    );
}
