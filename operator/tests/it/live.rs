//! The live facts a policy's status shows are read under the ids the agents write them
//! with: the breakers `policy::breaker` reads are exactly those the compiler hands every
//! agent (same id, same policy), and the shadow limits `policy::shadow` reads are counted
//! under the rule ids of the agents' configuration.

use std::collections::{BTreeMap, BTreeSet};

use breakwater_api::agent::{AgentConfig, BreakerRule};
use breakwater_operator::{
    compile::{self, Proxy, names, type_url},
    inventory::Inventory,
    policy::{breaker, shadow},
    standalone::load,
};

use crate::support;

fn agent(inventory: &Inventory, pod: &str) -> AgentConfig {
    let snapshot = compile::compile(inventory, &Proxy::from_node_id(pod).expect("node id"));
    let any = &snapshot.get(type_url::AGENT, names::AGENT_RESOURCE).expect("agent resource").any;
    breakwater_api::agent::decode(&any.value).expect("agent config decodes")
}

/// The breaker resources of a pod's snapshot.
fn breakers(inventory: &Inventory, pod: &str) -> Vec<BreakerRule> {
    let snapshot = compile::compile(inventory, &Proxy::from_node_id(pod).expect("node id"));
    snapshot
        .resources(type_url::BREAKER)
        .map(|(_, r)| breakwater_api::agent::decode_breaker(&r.any.value).expect("breaker decodes"))
        .collect()
}

/// Breaker id → policy, as the status reads them and as the agents run them.
fn both(inventory: &Inventory) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let read = breaker::breakers(inventory).into_iter().map(|(id, t)| (id, t.policy.to_string())).collect();
    // A pod nobody knows still gets every breaker: its Envoy has every outbound route.
    let run = breakers(inventory, "nowhere/unknown").into_iter().map(|r| (r.id, r.policy)).collect();
    (read, run)
}

fn examples() -> Inventory {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    load::load_dir(&dir, "breakwater-system").expect("examples load").inventory
}

#[test]
fn the_breakers_read_are_the_breakers_the_agents_run() {
    let examples = examples();
    let (read, run) = both(&examples);
    assert!(!read.is_empty(), "the examples have breakers");
    assert_eq!(read, run);

    // Unnamed, UDP and ExternalName ports; a root Override replacing a namespace's section.
    let world = support::world::load(&format!(
        "{}\n---\n{}",
        support::world::NAMESPACES,
        r#"
apiVersion: v1
kind: Service
metadata: {name: payments, namespace: shop}
spec: {ports: [{name: http, port: 8080}, {port: 9090}, {name: dns, port: 53, protocol: UDP}]}
---
apiVersion: v1
kind: Service
metadata: {name: outside, namespace: shop}
spec: {type: ExternalName, externalName: example.com, ports: [{name: http, port: 443}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: lab}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: breakwater.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: own, namespace: shop}
spec:
  targetRefs: [{kind: Service, name: payments}, {kind: Service, name: outside}]
  breaker: {failureRateThreshold: 50, slidingWindow: {type: Count, size: 10}, openDuration: 5s}
---
apiVersion: breakwater.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: floor, namespace: breakwater-system}
spec:
  namespaceSelector: {matchLabels: {tier: sandbox}}
  mode: Override
  breaker: {failureRateThreshold: 20, slidingWindow: {type: Time, duration: 10s}, openDuration: 1m}
"#
    ));
    let (read, run) = both(&world);
    assert_eq!(read, run);
    assert_eq!(
        read.into_iter().collect::<Vec<_>>(),
        [
            ("lab/api:80".to_string(), "breakwater-system/floor".to_string()),
            ("shop/payments:8080".to_string(), "shop/own".to_string()),
            ("shop/payments:9090".to_string(), "shop/own".to_string()),
        ]
    );
}

#[test]
fn shadow_limits_are_read_under_the_agents_rule_ids() {
    let examples = examples();
    let counted: BTreeSet<String> = examples
        .pods
        .keys()
        .flat_map(|pod| agent(&examples, &pod.to_string()).rate_limits)
        .filter(|rule| rule.shadow)
        .map(|rule| rule.id)
        .collect();
    assert!(!counted.is_empty(), "the examples count a shadow limit");
    let read: BTreeSet<String> = examples
        .rate_limits
        .iter()
        .flat_map(|policy| {
            shadow::limits(&breakwater_operator::inventory::ObjectName::of(policy.as_ref()), &examples)
        })
        .map(|limit| limit.rule)
        .collect();
    assert!(counted.is_subset(&read), "counted {counted:?}, read {read:?}");
}
