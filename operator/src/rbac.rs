//! The API access the operator needs, and nothing more. The Helm chart's RBAC is tested
//! against this list (`breakwater-operator rbac` prints it), so the two cannot drift apart,
//! and the real-API-server suite (operator/tests/it/kube/rbac.rs) runs the operator with the
//! chart's RBAC and reads the audit log: nothing is refused, and every verb here but the
//! Event `patch`, the webhook Secret's `update` and the relay Deployment's `delete` is used
//! (each has its reason there). Reflectors list and watch; nothing reads a policy, Service,
//! Pod or EndpointSlice by name, so no `get` is granted on them.
//!
//! The chart narrows the webhook-certificate rules to the objects it names (`resourceNames`),
//! which this list cannot know (they carry the release's name): the chart test compares
//! apiGroups, resources and verbs with this list, and each `resourceNames` with the name the
//! chart's Deployment passes the operator. The chart grants those rules only when the
//! operator manages the webhook's certificate (not with cert-manager).

use k8s_openapi::api::rbac::v1::PolicyRule;
use serde_json::json;

fn rule(group: &str, resources: &[&str], verbs: &[&str]) -> PolicyRule {
    PolicyRule {
        api_groups: Some(vec![group.to_string()]),
        resources: Some(resources.iter().map(|r| r.to_string()).collect()),
        verbs: verbs.iter().map(|v| v.to_string()).collect(),
        ..PolicyRule::default()
    }
}

const KINDS: [&str; 4] = ["circuitbreakerpolicies", "lockleases", "outboxrelays", "ratelimitpolicies"];

/// Cluster-wide rules: the controllers and the xDS feed (on every replica) watch every namespace.
pub fn cluster_rules() -> Vec<PolicyRule> {
    let status: Vec<String> = KINDS.iter().map(|k| format!("{k}/status")).collect();
    let status: Vec<&str> = status.iter().map(String::as_str).collect();
    vec![
        // Controllers list and watch their kind (reflector + trigger streams).
        rule(breakwater_api::common::GROUP, &KINDS, &["list", "watch"]),
        // Status is written by server-side apply (PATCH) on the status subresource.
        rule(breakwater_api::common::GROUP, &status, &["patch"]),
        // Target resolution and selectors (namespaces, services); pods because the xDS feed
        // compiles per-pod Envoy configuration from every Pod in the cluster.
        rule("", &["namespaces", "pods", "services"], &["list", "watch"]),
        // The xDS feed builds endpoints (EDS) from EndpointSlices, cluster-wide.
        rule("discovery.k8s.io", &["endpointslices"], &["list", "watch"]),
        // An OutboxRelay's connection Secret, and the Secret with the agents' Redis URL its
        // relay's pods read (relay.rs), are read by name, never listed.
        rule("", &["secrets"], &["get"]),
        // Events on condition transitions (kube's Recorder creates, and patches the count of
        // an Event that repeats within its series window, which a test run rarely sees).
        rule("events.k8s.io", &["events"], &["create", "patch"]),
        // Every ADS stream's token is checked with a TokenReview (xds::identity).
        rule("authentication.k8s.io", &["tokenreviews"], &["create"]),
        // Each accepted OutboxRelay runs as a Deployment in its namespace (relay.rs): read by
        // name to see whose it is, written by server-side apply (a PATCH; the API server
        // authorizes one that creates the Deployment as `create` too), deleted when the relay
        // is no longer accepted. Never listed or watched: the relays are requeued every 10 s,
        // which re-applies a missing or edited Deployment.
        rule("apps", &["deployments"], &["create", "delete", "get", "patch"]),
        // Managed webhook certificates (inject::certs): the webhook's MutatingWebhookConfiguration
        // is read by name and its caBundle patched (strategic merge).
        rule("admissionregistration.k8s.io", &["mutatingwebhookconfigurations"], &["get", "patch"]),
    ]
}

/// Rules in the operator's own namespace: the leader-election Lease, the label the leader
/// puts on its own pod so that the xDS Service sends the proxies to it (`serving`), and the
/// Secret of the webhook's managed certificate.
pub fn namespaced_rules() -> Vec<PolicyRule> {
    vec![
        rule("coordination.k8s.io", &["leases"], &["create", "get", "update"]),
        rule("", &["pods"], &["patch"]),
        // Managed webhook certificates (inject::certs): the Secret with the CA and the serving
        // certificate is created once and replaced when they are renewed; it is read with the
        // cluster-wide secrets `get` above.
        rule("", &["secrets"], &["create", "update"]),
    ]
}

pub fn to_json() -> serde_json::Value {
    json!({"clusterRules": cluster_rules(), "namespacedRules": namespaced_rules()})
}
