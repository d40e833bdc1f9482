//! Every CEL rule of every CRD, run through `validate_object` (the path standalone mode takes)
//! on a spec it must accept and on specs it must refuse (`common::corpus::rules`).

mod common;

use common::corpus::object;
use common::corpus::rules::{Case, RLP, cases, outbox};
use common::{RuleSite, errors, rule_sites};
use serde_json::json;

/// The rule site a case is about: same kind, same rule, at the schema path of the error path.
fn site_of<'a>(sites: &'a [RuleSite], case: &Case) -> &'a RuleSite {
    let schema_path =
        regex::Regex::new(r"\[\d+\]").expect("the index pattern compiles").replace_all(case.path, "[]");
    sites
        .iter()
        .find(|s| s.kind == case.kind && s.rule == case.rule && s.path == schema_path)
        .unwrap_or_else(|| panic!("{}: no rule {:?} at {schema_path}", case.kind, case.rule))
}

#[test]
fn every_rule_accepts_its_good_spec_and_refuses_its_bad_ones() {
    let sites = rule_sites();
    for case in cases() {
        let site = site_of(&sites, &case);
        let good = errors(&object(case.kind, case.good.clone()));
        assert!(
            good.is_empty(),
            "{} {:?}: the good spec is refused: {good:#?}\n{:#}",
            case.kind,
            case.rule,
            case.good
        );
        let expected = format!("{}: Invalid value: \"{}\": {}", case.path, site.node_type, site.message);
        for bad in &case.bad {
            let found = errors(&object(case.kind, bad.clone()));
            assert_eq!(
                found,
                std::slice::from_ref(&expected),
                "{} {:?}: wrong errors for\n{bad:#}",
                case.kind,
                case.rule
            );
        }
    }
}

#[test]
fn every_rule_in_every_crd_has_a_case() {
    let cases = cases();
    let untested: Vec<String> = rule_sites()
        .into_iter()
        .filter(|site| !cases.iter().any(|c| c.kind == site.kind && c.rule == site.rule))
        .map(|site| format!("{} {}: {}", site.kind, site.path, site.rule))
        .collect();
    assert!(untested.is_empty(), "CEL rules without a case in cel_rules.rs:\n{}", untested.join("\n"));
    for case in &cases {
        assert!(!case.bad.is_empty(), "{} {:?} has no spec that breaks it", case.kind, case.rule);
    }
}

#[test]
fn rules_see_schema_defaults() {
    // Without delivery, the API server defaults it (pollInterval 500ms) before the rules run:
    // `has(self.delivery)` holds and the pollInterval rule checks the default.
    assert_eq!(errors(&object("OutboxRelay", outbox(None))), Vec::<String>::new());
    assert_eq!(errors(&object("OutboxRelay", outbox(Some(json!({}))))), Vec::<String>::new());
}

#[test]
fn rules_do_not_run_on_an_object_the_schema_refuses() {
    // This spec breaks "set exactly one of targetRefs or namespaceSelector", but after the schema
    // error (an unknown algorithm, which blocks the rules) only the API server's note that rules
    // were skipped follows, as with the API server.
    let spec =
        json!({ "limits": [{ "name": "all", "rate": { "requests": 1, "per": "1s" }, "algorithm": "Fast" }] });
    let found = errors(&object(RLP, spec));
    assert_eq!(found.len(), 2, "{found:#?}");
    assert!(found[0].starts_with("spec.limits[0].algorithm: Unsupported value: \"Fast\""), "{found:#?}");
    assert_eq!(
        found[1],
        "Invalid value: null: some validation rules were not checked because the object was invalid; \
         correct the existing errors to complete validation"
    );
}

#[test]
fn a_rule_failure_is_worded_like_the_api_server() {
    let found = errors(&object("LockLease", json!({ "ttl": "2h", "podSelector": {} })));
    assert_eq!(found, ["spec.ttl: Invalid value: \"string\": ttl must be between 1s and 1h"]);
}
