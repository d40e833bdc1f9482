//! Two `breakwater-operator run` processes electing a leader on a real
//! `coordination.k8s.io` Lease: only the leader writes status and Events, and only the
//! leader's pod carries the label the xDS Service selects, though both are ready; SIGKILL
//! the leader, and the standby takes over once the Lease expires, labels its pod, then writes.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{
    DEADLINE, OPERATOR, OperatorProcess, eventually, kubectl_apply, namespace, plane, pod, serving_label,
};

/// The operator's lease timing (leader::Config::new): 15 s lease, 2 s retry.
const LEASE: Duration = Duration::from_secs(15);
const RETRY: Duration = Duration::from_secs(2);

fn holder(namespace: &str) -> String {
    let out = plane().kubectl(&[
        "get",
        "lease",
        "breakwater-operator",
        "-n",
        namespace,
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status_writes(operator: &OperatorProcess) -> f64 {
    let metrics = operator.metrics();
    metrics
        .lines()
        .filter(|l| l.starts_with("breakwater_status_writes_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The reporting instances of the Events in `namespace`.
fn reporters(namespace: &str) -> Vec<String> {
    let json = plane().kubectl_ok(&["get", "events.events.k8s.io", "-n", namespace, "-o", "json"]);
    let events: Value = serde_json::from_str(&json).expect("events JSON");
    let mut instances: Vec<String> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["reportingInstance"].as_str().map(String::from))
        .collect();
    instances.sort();
    instances.dedup();
    instances
}

fn observed(namespace: &str) -> Result<i64, String> {
    let json = plane().kubectl_ok(&["get", "rlp", "limits", "-n", namespace, "-o", "json"]);
    let object: Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
    object["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().filter_map(|c| c["observedGeneration"].as_i64()).min())
        .ok_or_else(|| format!("no conditions yet: {}", object["status"]))
}

const POLICY: &str = "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: limits}\n\
spec:\n  targetRefs: [{kind: Service, name: api}]\n  limits:\n  - {name: all, rate: {requests: 10, per: 1s}}\n";

#[tokio::test]
async fn the_standby_takes_over_when_the_leader_is_killed() {
    let _one_operator = OPERATOR.lock().await;
    let system = namespace("leader-system", &[]);
    let ns = namespace("leader", &[]);
    let kubeconfig = &plane().kubeconfig;
    // The pods the two processes stand for (no kubelet runs them).
    pod(&system, "operator-a");
    pod(&system, "operator-b");

    let mut first = OperatorProcess::start(kubeconfig, "operator-a", &system, Some(&system));
    eventually("operator-a holds the Lease", DEADLINE, || async {
        let h = holder(&system);
        if h == "operator-a" { Ok(()) } else { Err(format!("holder {h:?}; log:\n{}", first.daemon.log())) }
    })
    .await;
    let second = OperatorProcess::start(kubeconfig, "operator-b", &system, Some(&system));
    eventually("operator-b serves metrics as a standby", DEADLINE, || async {
        match second.metric("breakwater_leader") {
            Some(0.0) => Ok(()),
            other => Err(format!("breakwater_leader = {other:?}")),
        }
    })
    .await;
    // Both are ready (a rolling update waits for that), but only the leader's pod draws the
    // ADS streams: the xDS Service selects the label the leader puts on its own pod.
    eventually("the standby is ready", DEADLINE, || async {
        let ready = second.readiness();
        if ready.as_deref() == Some("ready") { Ok(()) } else { Err(format!("/readyz: {ready:?}")) }
    })
    .await;
    eventually("the leader's pod is labelled", DEADLINE, || async {
        let label = serving_label(&system, "operator-a");
        if label.as_deref() == Some("true") { Ok(()) } else { Err(format!("label {label:?}")) }
    })
    .await;
    assert_eq!(serving_label(&system, "operator-b"), None, "a standby's pod draws no ADS streams");

    kubectl_apply(&ns, POLICY);
    eventually("the leader writes status", DEADLINE, || async {
        let g = observed(&ns)?;
        if g == 1 { Ok(()) } else { Err(format!("observedGeneration {g}")) }
    })
    .await;
    assert!(status_writes(&first) > 0.0, "the leader counted no status write");
    assert_eq!(status_writes(&second), 0.0, "the standby wrote status");
    assert_eq!(reporters(&ns), ["operator-a"], "only the leader publishes Events");

    let killed = Instant::now();
    first.daemon.kill();
    eventually("operator-b takes the Lease", LEASE + RETRY + DEADLINE, || async {
        let h = holder(&system);
        if h == "operator-b" { Ok(()) } else { Err(format!("holder {h:?}")) }
    })
    .await;
    let took = killed.elapsed();
    eprintln!("takeover after SIGKILL: {took:?} (lease {LEASE:?}, retry {RETRY:?})");
    assert!(took <= LEASE + RETRY + Duration::from_secs(2), "took {took:?}: longer than the lease allows");
    eventually("the new leader's pod is labelled", DEADLINE, || async {
        let label = serving_label(&system, "operator-b");
        if label.as_deref() == Some("true") { Ok(()) } else { Err(format!("label {label:?}")) }
    })
    .await;

    // The new leader writes: a missing target is reported, with an Event of its own.
    let services = plane().kubectl_ok(&["get", "services", "-n", &ns, "-o", "name"]);
    assert!(services.trim().is_empty(), "no Service api exists: {services}");
    kubectl_apply(&ns, &POLICY.replace("requests: 10", "requests: 20"));
    eventually("the new leader writes status", DEADLINE, || async {
        let g = observed(&ns)?;
        if g == 2 { Ok(()) } else { Err(format!("observedGeneration {g}")) }
    })
    .await;
    assert!(status_writes(&second) > 0.0, "the new leader counted no status write");
    kubectl_apply(&ns, "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec: {ports: [{port: 80}]}\n");
    eventually("the new leader publishes Events", DEADLINE, || async {
        let r = reporters(&ns);
        if r.contains(&"operator-b".to_string()) { Ok(()) } else { Err(format!("{r:?}")) }
    })
    .await;
}
