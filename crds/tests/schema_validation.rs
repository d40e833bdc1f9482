//! The OpenAPI checks of `validate_object`: bad objects (`common::corpus::schema`) and the error
//! the API server gives for each, and the full examples, which must pass.

mod common;

use breakwater_api::{CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy};
use common::corpus::schema::{self, lock_lease, outbox_relay, rate_limit, with};
use common::corpus::{self as corpus, API_VERSION, EXAMPLES, from_yaml};
use common::errors;
use serde_json::{Value, json};

#[test]
fn bad_objects_are_refused_with_the_api_servers_words() {
    for (name, object, expected) in schema::cases() {
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
    assert_eq!(found, ["kind: Invalid value: \"Lease\": must be LockLease"]);
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
    for (name, document) in corpus::repository_examples() {
        assert_eq!(errors(&document), Vec::<String>::new(), "{name}");
    }
}
