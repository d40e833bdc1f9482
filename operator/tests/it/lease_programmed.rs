//! `Programmed` for a LockLease, over real gRPC ADS streams: the lease lives in the agent's
//! configuration only, so it is programmed when the agents of the pods it selects have
//! acknowledged the agent type at its generation — whatever Envoy says about its listeners —
//! and rejected when one of those agents NACKs it.

use std::sync::Arc;

use breakwater_api::agent::AgentConfig;
use breakwater_operator::{
    compile::{self, Compiled, type_url},
    inventory::{Inventory, ObjectName},
    status,
    xds::SnapshotCache,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;

use crate::{
    ads::verdict_reason,
    support::{
        ads::{Client, serve},
        world,
    },
};

const WORKER: &str = "billing/worker-1";
const LEDGER: &str = "billing/ledger-1";

fn world(ttl: &str, generation: i64) -> Inventory {
    let text = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: worker-1, namespace: billing, labels: {{app: worker}}}}
spec: {{containers: [{{name: w, image: w}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: ledger-1, namespace: billing, labels: {{app: ledger}}}}
spec: {{containers: [{{name: l, image: l}}]}}
---
apiVersion: breakwater.dev/v1alpha1
kind: LockLease
metadata: {{name: invoice-run, namespace: billing, generation: {generation}}}
spec:
  ttl: {ttl}
  podSelector: {{matchLabels: {{app: worker}}}}
"#
    );
    world::load(&text)
}

fn lease_ttl(response: &DiscoveryResponse) -> Vec<u64> {
    let config: AgentConfig =
        breakwater_api::agent::decode(&response.resources[0].value).expect("agent config decodes");
    config.leases.iter().map(|l| l.ttl_ms).collect()
}

/// Waits (with a deadline) until the lease's Programmed verdict at `generation` has `reason`.
async fn lease_verdict(cache: &SnapshotCache, generation: i64, reason: &str) -> String {
    let name = ObjectName::new("billing", "invoice-run");
    verdict_reason(cache, compile::LOCK_LEASE, &name, generation, reason).await
}

#[tokio::test]
async fn a_lease_is_programmed_by_the_agents_of_the_pods_it_selects() {
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(&world("30s", 1)));
    let endpoint = serve(cache.clone()).await;
    // The worker carries the lease, but nothing of it is connected yet.
    assert_eq!(lease_verdict(&cache, 1, "Pending").await, "acknowledged by 0/1 proxies (1 not connected)");

    // The worker's Envoy and agent each open a stream under the pod's node id; the ledger's
    // agent connects too, but the lease does not select its pod.
    let mut envoy = Client::connect(&endpoint, WORKER).await;
    let mut agent = Client::connect(&endpoint, WORKER).await;
    let mut ledger = Client::connect(&endpoint, LEDGER).await;
    envoy.subscribe(type_url::LISTENER, &[]).await;
    agent.subscribe(type_url::AGENT, &[]).await;
    ledger.subscribe(type_url::AGENT, &[]).await;
    let listeners = envoy.next().await;
    let v1 = agent.next().await;
    assert_eq!(lease_ttl(&v1), [30_000]);
    let ledger_config = ledger.next().await;
    assert_eq!(lease_ttl(&ledger_config), Vec::<u64>::new(), "the ledger may not take the lease");
    ledger.ack(&ledger_config, &[]).await;
    assert_eq!(lease_verdict(&cache, 1, "Pending").await, "waiting for 1/1 proxies to acknowledge");

    // Envoy rejecting its listeners neither programs nor rejects the lease. A stream
    // handles requests in order, so once a later subscription is answered the NACK is in.
    envoy.nack(&listeners, "", "listener inbound: bad filter chain").await;
    envoy.subscribe(type_url::CLUSTER, &[]).await;
    assert_eq!(envoy.next().await.type_url, type_url::CLUSTER);
    let name = ObjectName::new("billing", "invoice-run");
    let verdict = status::programmed(Some(&cache.acknowledgements(compile::LOCK_LEASE, &name, 1)));
    assert_eq!(
        (verdict.reason, verdict.message.as_str()),
        ("Pending", "waiting for 1/1 proxies to acknowledge")
    );
    // ...the worker's agent acknowledging its configuration programs it.
    agent.ack(&v1, &[]).await;
    assert_eq!(lease_verdict(&cache, 1, "Programmed").await, "acknowledged by 1/1 proxies");

    // A new generation is pushed to the agent; the old ACK does not program it, a NACK
    // rejects it with the agent's message, a later ACK programs it.
    cache.publish(Compiled::new(&world("45s", 2)));
    let v2 = agent.next().await;
    assert_eq!(lease_ttl(&v2), [45_000]);
    assert_eq!(lease_verdict(&cache, 2, "Pending").await, "waiting for 1/1 proxies to acknowledge");
    agent.nack(&v2, &v1.version_info, "lease billing/invoice-run: ttl too long").await;
    let rejected = lease_verdict(&cache, 2, "Rejected").await;
    assert!(rejected.contains("billing/worker-1: lease billing/invoice-run: ttl too long"), "{rejected}");
    cache.publish(Compiled::new(&world("40s", 3)));
    let v3 = agent.next().await;
    agent.ack(&v3, &[]).await;
    assert_eq!(lease_verdict(&cache, 3, "Programmed").await, "acknowledged by 1/1 proxies");
}
