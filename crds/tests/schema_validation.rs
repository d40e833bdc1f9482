//! The OpenAPI checks of `validate_object`: bad objects and the error the API server would
//! give for each, and the full examples, which must pass.

mod common;

use breakwater_api::{CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy};
use common::{API_VERSION, EXAMPLES, errors, from_yaml, object};
use serde_json::{Value, json};

fn rate_limit(limit: Value) -> Value {
    object("RateLimitPolicy", json!({ "targetRefs": [{ "name": "checkout" }], "limits": [limit] }))
}

fn lock_lease(spec: Value) -> Value {
    let mut full = json!({ "ttl": "30s", "podSelector": { "matchLabels": { "app": "cron" } } });
    for (key, value) in spec.as_object().expect("spec is a mapping") {
        full[key] = value.clone();
    }
    object("LockLease", full)
}

fn outbox_relay(delivery: Value) -> Value {
    object(
        "OutboxRelay",
        json!({
            "source": { "postgres": { "connectionSecretRef": { "name": "orders-db", "key": "url" }, "table": "outbox" } },
            "sink": { "webhook": { "url": "https://events.example.com/outbox" } },
            "delivery": delivery,
        }),
    )
}

/// Applies `change` to a copy of `value`.
fn with(value: Value, change: impl FnOnce(&mut Value)) -> Value {
    let mut value = value;
    change(&mut value);
    value
}

/// Bad objects and a fragment of the error each must produce.
fn bad_objects() -> Vec<(&'static str, Value, &'static str)> {
    let per_minute =
        |requests: Value| json!({ "name": "all", "rate": { "requests": requests, "per": "1m" } });
    vec![
        (
            "negative rate",
            rate_limit(per_minute(json!(-1))),
            "spec.limits[0].rate.requests: Invalid value: -1: spec.limits[0].rate.requests in body should be greater than or equal to 1",
        ),
        (
            "rate above the maximum",
            rate_limit(per_minute(json!(1_000_000_001))),
            "spec.limits[0].rate.requests: Invalid value: 1000000001: spec.limits[0].rate.requests in body should be less than or equal to 1000000000",
        ),
        (
            "zero holders",
            lock_lease(json!({ "holders": 0 })),
            "spec.holders: Invalid value: 0: spec.holders in body should be greater than or equal to 1",
        ),
        (
            "zero batch size",
            outbox_relay(json!({ "batchSize": 0 })),
            "spec.delivery.batchSize: Invalid value: 0: spec.delivery.batchSize in body should be greater than or equal to 1",
        ),
        (
            "duration without a unit",
            lock_lease(json!({ "ttl": "30" })),
            "spec.ttl: Invalid value: \"30\": spec.ttl in body should match '^([0-9]{1,6}(h|m|s|ms))+$'",
        ),
        (
            "duration in days",
            outbox_relay(json!({ "pollInterval": "1d" })),
            "spec.delivery.pollInterval: Invalid value: \"1d\": spec.delivery.pollInterval in body should match '^([0-9]{1,6}(h|m|s|ms))+$'",
        ),
        (
            "unknown field at the top of spec",
            lock_lease(json!({ "replicas": 2 })),
            "spec.replicas: unknown field \"spec.replicas\"",
        ),
        (
            "unknown nested field",
            rate_limit(json!({ "name": "all", "rate": { "requests": 1, "per": "1s", "burst": 5 } })),
            "spec.limits[0].rate.burst: unknown field \"spec.limits[0].rate.burst\"",
        ),
        (
            "unknown field at the root",
            with(lock_lease(json!({})), |o| o["specs"] = json!({})),
            "specs: unknown field \"specs\"",
        ),
        (
            "fields under a string",
            lock_lease(json!({ "ttl": { "seconds": 30 } })),
            "spec.ttl.seconds: unknown field \"spec.ttl.seconds\"",
        ),
        (
            "string for an integer",
            rate_limit(per_minute(json!("10"))),
            "spec.limits[0].rate.requests: Invalid value: \"string\": spec.limits[0].rate.requests in body must be of type integer: \"string\"",
        ),
        (
            "fraction for an integer",
            lock_lease(json!({ "holders": 1.5 })),
            "spec.holders: Invalid value: \"number\": spec.holders in body must be of type integer: \"number\"",
        ),
        (
            "number for a string",
            lock_lease(json!({ "ttl": 30 })),
            "spec.ttl: Invalid value: \"integer\": spec.ttl in body must be of type string: \"integer\"",
        ),
        (
            "mapping for a list",
            rate_limit(
                json!({ "name": "all", "rate": { "requests": 1, "per": "1s" }, "key": { "header": "x-user-id" } }),
            ),
            "spec.limits[0].key: Invalid value: \"object\": spec.limits[0].key in body must be of type array: \"object\"",
        ),
        (
            "missing required field",
            object("RateLimitPolicy", json!({ "targetRefs": [{ "name": "checkout" }] })),
            "spec.limits: Required value",
        ),
        ("missing spec", with(lock_lease(json!({})), |o| o["spec"] = Value::Null), "spec: Required value"),
        (
            "null for a field that is not nullable",
            lock_lease(json!({ "ttl": null })),
            "spec.ttl: Required value",
        ),
        (
            "missing required field in a list item",
            rate_limit(json!({ "name": "all" })),
            "spec.limits[0].rate: Required value",
        ),
        (
            "enum typo",
            rate_limit(json!({ "name": "all", "rate": { "requests": 1, "per": "1s" }, "algorithm": "Fast" })),
            "spec.limits[0].algorithm: Unsupported value: \"Fast\": supported values: \"TokenBucket\", \"SlidingWindow\", \"FixedWindow\"",
        ),
        (
            "enum typo in a list",
            object(
                "CircuitBreakerPolicy",
                json!({ "targetRefs": [{ "name": "payments" }], "retry": { "attempts": 2, "retryOn": ["5XX"] } }),
            ),
            "spec.retry.retryOn[0]: Unsupported value: \"5XX\": supported values: \"5xx\", \"gateway-error\", \"reset\", \"connect-failure\", \"retriable-4xx\", \"refused-stream\"",
        ),
        (
            "null for a nullable enum",
            object(
                "CircuitBreakerPolicy",
                json!({ "targetRefs": [{ "name": "payments" }], "timeout": "1s", "mode": null }),
            ),
            "spec.mode: Unsupported value: \"null\": supported values: \"Default\", \"Override\"",
        ),
        (
            "empty list",
            object("RateLimitPolicy", json!({ "targetRefs": [{ "name": "checkout" }], "limits": [] })),
            "spec.limits: Invalid value: 0: spec.limits in body should have at least 1 items",
        ),
        (
            "too many items",
            object(
                "RateLimitPolicy",
                json!({
                    "targetRefs": [{ "name": "checkout" }],
                    "limits": (0..33).map(|i| json!({ "name": format!("l{i}"), "rate": { "requests": 1, "per": "1s" } })).collect::<Vec<_>>(),
                }),
            ),
            "spec.limits: Too many: 33: must have at most 32 items",
        ),
        (
            "string too long",
            object(
                "RateLimitPolicy",
                json!({ "targetRefs": [{ "name": "a".repeat(64) }], "limits": [per_minute(json!(1))] }),
            ),
            "spec.targetRefs[0].name: Too long: may not be longer than 63",
        ),
        (
            "empty string",
            rate_limit(json!({ "name": "", "rate": { "requests": 1, "per": "1s" } })),
            "spec.limits[0].name: Invalid value: \"\": spec.limits[0].name in body should be at least 1 chars long",
        ),
        (
            "name with capitals",
            rate_limit(json!({ "name": "PerUser", "rate": { "requests": 1, "per": "1s" } })),
            "spec.limits[0].name: Invalid value: \"PerUser\": spec.limits[0].name in body should match '^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'",
        ),
        (
            "bad value in a map",
            lock_lease(json!({ "podSelector": { "matchLabels": { "app": 1 } } })),
            "spec.podSelector.matchLabels.app: Invalid value: \"integer\": spec.podSelector.matchLabels.app in body must be of type string: \"integer\"",
        ),
        (
            "no metadata.name",
            with(lock_lease(json!({})), |o| o["metadata"] = json!({})),
            "metadata.name: Required value",
        ),
        (
            "metadata.name not a DNS subdomain",
            with(lock_lease(json!({})), |o| o["metadata"]["name"] = json!("Nightly_Billing")),
            "metadata.name: Invalid value: \"Nightly_Billing\": a lowercase RFC 1123 subdomain must consist of",
        ),
        (
            "metadata.name too long",
            with(lock_lease(json!({})), |o| o["metadata"]["name"] = json!("a".repeat(254))),
            "must be no more than 253 characters",
        ),
        (
            "metadata.namespace not a DNS label",
            with(lock_lease(json!({})), |o| o["metadata"]["namespace"] = json!("team.billing")),
            "metadata.namespace: Invalid value: \"team.billing\": a lowercase RFC 1123 label must consist of",
        ),
        (
            "unknown field in status",
            with(lock_lease(json!({})), |o| o["status"] = json!({ "owner": "me" })),
            "status.owner: unknown field \"status.owner\"",
        ),
    ]
}

#[test]
fn bad_objects_are_refused_with_the_api_servers_words() {
    for (name, object, expected) in bad_objects() {
        let found = errors(&object);
        assert!(
            found.iter().any(|e| e.contains(expected)),
            "{name}: expected an error containing\n  {expected}\nbut got {found:#?}"
        );
    }
}

#[test]
fn full_examples_are_accepted_and_read_as_the_rust_types() {
    for (name, yaml) in EXAMPLES {
        let example = from_yaml(yaml);
        assert_eq!(errors(&example), Vec::<String>::new(), "{name}");
        let parsed = match example["kind"].as_str() {
            Some("RateLimitPolicy") => serde_json::from_value::<RateLimitPolicy>(example).map(drop),
            Some("CircuitBreakerPolicy") => serde_json::from_value::<CircuitBreakerPolicy>(example).map(drop),
            Some("LockLease") => serde_json::from_value::<LockLease>(example).map(drop),
            Some("OutboxRelay") => serde_json::from_value::<OutboxRelay>(example).map(drop),
            other => panic!("{name}: unexpected kind {other:?}"),
        };
        assert!(parsed.is_ok(), "{name} passes validation but does not read as its Rust type: {parsed:?}");
    }
}

#[test]
fn one_mistake_gives_one_error() {
    let found = errors(&rate_limit(json!({ "name": "all", "rate": { "requests": -1, "per": "1m" } })));
    assert_eq!(
        found,
        [
            "spec.limits[0].rate.requests: Invalid value: -1: spec.limits[0].rate.requests in body should be greater than or equal to 1"
        ]
    );
    let found = errors(&lock_lease(json!({ "owner": "me" })));
    assert_eq!(found, ["spec.owner: unknown field \"spec.owner\""]);
}

#[test]
fn status_is_dropped_on_create() {
    // With the status subresource, a create cannot set status: the API server drops it after
    // decoding, so only its unknown fields (found while decoding) are refused.
    let object = with(lock_lease(json!({})), |o| o["status"] = json!({ "fencingToken": "not a number" }));
    assert_eq!(errors(&object), Vec::<String>::new());
}

#[test]
fn defaults_fill_absent_and_null_fields() {
    // holders is defaulted to 1, so null is not a type error; delivery is defaulted whole.
    assert_eq!(errors(&lock_lease(json!({ "holders": null }))), Vec::<String>::new());
    let relay = with(outbox_relay(json!({})), |o| o["spec"]["delivery"] = Value::Null);
    assert_eq!(errors(&relay), Vec::<String>::new());
}

#[test]
fn whole_numbers_written_as_decimals_are_integers() {
    assert_eq!(errors(&lock_lease(json!({ "holders": 2.0 }))), Vec::<String>::new());
}

#[test]
fn the_input_is_not_changed() {
    let original = with(lock_lease(json!({ "surplus": true })), |o| o["status"] = json!({}));
    let copy = original.clone();
    let _ = errors(&original);
    assert_eq!(original, copy);
}

#[test]
fn objects_the_crd_does_not_serve() {
    let crd = common::crd("LockLease");
    let not_a_mapping = breakwater_api::validate_object(crd, &json!(["ttl"]));
    assert_eq!(not_a_mapping.len(), 1);
    assert_eq!(not_a_mapping[0].path, "");
    let wrong_version = with(lock_lease(json!({})), |o| o["apiVersion"] = json!("breakwater.dev/v1"));
    let found: Vec<String> =
        breakwater_api::validate_object(crd, &wrong_version).iter().map(ToString::to_string).collect();
    assert_eq!(
        found,
        [
            "apiVersion: Unsupported value: \"breakwater.dev/v1\": supported values: \"breakwater.dev/v1alpha1\""
        ]
    );
    let wrong_kind = with(lock_lease(json!({})), |o| o["kind"] = json!("Lease"));
    let found: Vec<String> =
        breakwater_api::validate_object(crd, &wrong_kind).iter().map(ToString::to_string).collect();
    assert_eq!(found, ["kind: Unsupported value: \"Lease\": supported values: \"LockLease\""]);
}

#[test]
fn crd_for_finds_only_served_breakwater_kinds() {
    for kind in ["RateLimitPolicy", "CircuitBreakerPolicy", "LockLease", "OutboxRelay"] {
        let crd = breakwater_api::crd_for(API_VERSION, kind).map(|crd| crd.spec.names.kind.as_str());
        assert_eq!(crd, Some(kind));
    }
    assert!(breakwater_api::crd_for("breakwater.dev/v1", "LockLease").is_none());
    assert!(breakwater_api::crd_for("coordination.k8s.io/v1", "Lease").is_none());
    assert!(breakwater_api::crd_for("breakwater.dev/v1alpha1", "Lease").is_none());
    assert!(breakwater_api::crd_for("breakwater.dev", "LockLease").is_none());
}

#[test]
fn repository_examples_are_accepted() {
    // examples/ is what users copy; every Breakwater document there must pass as it is.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let Ok(entries) = std::fs::read_dir(&dir) else { return };
    let mut checked = 0;
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("the example is readable");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|err| panic!("{} does not parse: {err}", path.display()));
        for document in documents {
            if document["apiVersion"].as_str().is_some_and(|v| v.starts_with("breakwater.dev/")) {
                let name = document["metadata"]["name"].clone();
                assert_eq!(errors(&document), Vec::<String>::new(), "{} ({name})", path.display());
                checked += 1;
            }
        }
    }
    assert!(checked > 0, "examples/ holds no Breakwater object");
}
