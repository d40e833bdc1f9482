//! A LockLease from `examples/` travels the whole way without a cluster: the operator
//! compiles it into the agent configuration of the pods it selects and serves it over ADS;
//! the agent of such a pod — the whole agent, `breakwater_agent::run` with an xDS source, as
//! `breakwater-agent --xds-endpoint` runs it — subscribes with its node id, ACKs — so the LockLease reports `Programmed` — and grants the
//! lease over its HTTP API with a fencing token. The agent of a pod the lease does not
//! select refuses it. Counters and leases are in memory here; the Redis side has its own
//! suites in policy-agent/tests.

mod support;

use std::time::Duration;

use breakwater_agent::StoreSettings;
use breakwater_operator::inventory::ObjectName;
use breakwater_operator::policy::Verdict;
use breakwater_operator::status;
use breakwater_operator::xds::SnapshotCache;
use serde_json::Value;
use support::{Agent, DEADLINE, configured, settings};

async fn agent(endpoint: &str, pod: &str) -> Agent {
    support::agent(endpoint, pod, StoreSettings::Memory, settings()).await
}

async fn acquire(agent: &Agent, lease: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/leases/{lease}/acquire", agent.lease))
        .body("{}")
        .header("content-type", "application/json")
        .send()
        .await
        .expect("the lease API answers");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON body"))
}

#[tokio::test]
async fn an_example_lease_reaches_the_agents_of_the_pods_it_selects() {
    let (endpoint, cache, _) = support::operator().await;
    let lease = ObjectName::new("billing", "invoice-run");
    let programmed = |cache: &SnapshotCache| -> Verdict {
        status::programmed(Some(&cache.acknowledgements("LockLease", &lease, 1)))
    };
    assert!(!programmed(&cache).ok, "no agent has acknowledged it yet");

    let worker = agent(&endpoint, "billing/billing-worker-84c6d5f7b9-tq9vd").await;
    configured(&worker).await;
    let (status, grant) = acquire(&worker, "invoice-run").await;
    assert_eq!(status, 200, "{grant}");
    assert!(grant["fencingToken"].as_i64().is_some_and(|t| t > 0), "{grant}");
    assert!(
        grant["holder"].as_str().is_some_and(|h| h.starts_with("billing/billing-worker-84c6d5f7b9-tq9vd/")),
        "{grant}"
    );
    let (busy, refusal) = acquire(&worker, "invoice-run").await;
    assert_eq!((busy, refusal["reason"].as_str()), (423, Some("Held")), "a lock has one holder");

    let give_up = tokio::time::Instant::now() + DEADLINE;
    let verdict = loop {
        let verdict = programmed(&cache);
        if verdict.ok || tokio::time::Instant::now() > give_up {
            break verdict;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(verdict.ok, "{}: {}", verdict.reason, verdict.message);
    assert_eq!(verdict.message, "acknowledged by 1/1 proxies");

    // A pod of another namespace: its agent is configured, but not with this lease.
    let other = agent(&endpoint, "shop/api-7c9f8d6b5-x2kqp").await;
    configured(&other).await;
    let (status, refusal) = acquire(&other, "invoice-run").await;
    assert_eq!((status, refusal["reason"].as_str()), (404, Some("UnknownLease")), "{refusal}");
}
