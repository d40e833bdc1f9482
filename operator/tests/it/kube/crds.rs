//! The CRDs as the API server takes them: Established, their field documentation published
//! in OpenAPI (what `kubectl explain` prints), short names and the `breakwater` category.

use serde_json::Value;

use super::plane;

/// The `description` of the schema node at `path` (`spec.limits`) in the generated CRD.
fn description(kind: &str, path: &str) -> String {
    let crd = breakwater_api::crds().into_iter().find(|c| c.spec.names.kind == kind).expect("CRD of kind");
    let schema = serde_json::to_value(&crd.spec.versions[0].schema).expect("schema serializes");
    let mut node = &schema["openAPIV3Schema"];
    for part in path.split('.') {
        node = &node["properties"][part];
        if node["items"].is_object() {
            node = &node["items"];
        }
    }
    node.get("description")
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{kind} {path} has no description"))
        .into()
}

/// Collapses whitespace, since kubectl re-wraps long descriptions.
fn words(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[test]
fn kubectl_explain_prints_the_field_documentation() {
    let plane = plane();
    for (kind, resource, path) in [
        ("RateLimitPolicy", "ratelimitpolicy", "spec.limits"),
        ("RateLimitPolicy", "ratelimitpolicy", "spec.limits.rate.per"),
        ("CircuitBreakerPolicy", "circuitbreakerpolicy", "spec.breaker"),
        ("LockLease", "locklease", "spec.holders"),
        ("OutboxRelay", "outboxrelay", "spec.delivery.afterPublish"),
    ] {
        let expected = description(kind, path);
        // `kubectl explain` reads the OpenAPI v3 document, which the API server publishes
        // only once it has the CRD; the plane waited for Established.
        let explained = plane.kubectl_ok(&["explain", &format!("{resource}.{path}")]);
        assert!(
            words(&explained).contains(&words(&expected)),
            "kubectl explain {resource}.{path} lacks the field's description {expected:?}:\n{explained}"
        );
        assert!(explained.contains("GROUP:      breakwater.dev"), "{explained}");
    }
}

#[test]
fn short_names_and_the_breakwater_category_resolve() {
    let plane = plane();
    let resources = plane.kubectl_ok(&["api-resources", "--api-group=breakwater.dev", "-o", "wide"]);
    for (short, name) in [
        ("cbp", "circuitbreakerpolicies"),
        ("rlp", "ratelimitpolicies"),
        ("ll", "lockleases"),
        ("outbox", "outboxrelays"),
    ] {
        let line = resources
            .lines()
            .find(|line| line.starts_with(name))
            .unwrap_or_else(|| panic!("{name} is not served:\n{resources}"));
        assert!(line.split_whitespace().any(|w| w == short), "{name} lacks short name {short}: {line}");
        assert!(line.contains("breakwater"), "{name} is not in the breakwater category: {line}");
        // The short name resolves for kubectl get.
        plane.kubectl_ok(&["get", short, "-A"]);
    }
    plane.kubectl_ok(&["get", "breakwater", "-A"]);
}
