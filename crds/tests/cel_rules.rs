//! Every CEL rule of every CRD, run through `validate_object` (the path standalone mode takes)
//! on a spec it must accept and on specs it must refuse.

mod common;

use breakwater_api::common::attachment_rules as attach;
use common::{RuleSite, errors, object, rule_sites};
use serde_json::{Value, json};

/// One rule, a spec it accepts, and specs that break only this rule.
struct Case {
    kind: &'static str,
    rule: &'static str,
    /// Where the API server reports the failure.
    path: &'static str,
    good: Value,
    bad: Vec<Value>,
}

fn case(kind: &'static str, rule: &'static str, path: &'static str, good: Value, bad: Vec<Value>) -> Case {
    Case { kind, rule, path, good, bad }
}

const CBP: &str = "CircuitBreakerPolicy";
const RLP: &str = "RateLimitPolicy";

/// A valid rate limit, for the cases that vary something else.
fn limit() -> Value {
    json!({ "name": "all", "rate": { "requests": 100, "per": "1m" } })
}

/// A RateLimitPolicy spec on the checkout Service with these limits.
fn rlp(limits: Value) -> Value {
    json!({ "targetRefs": [{ "name": "checkout" }], "limits": limits })
}

/// A CircuitBreakerPolicy spec on the payments Service with these sections.
fn cbp(sections: Value) -> Value {
    let mut spec = json!({ "targetRefs": [{ "name": "payments" }] });
    for (key, value) in sections.as_object().expect("sections are a mapping") {
        spec[key] = value.clone();
    }
    spec
}

/// An OutboxRelay spec from the outbox table to a Redis stream, with this delivery.
fn outbox(delivery: Option<Value>) -> Value {
    let mut spec = json!({
        "source": { "postgres": { "connectionSecretRef": { "name": "orders-db", "key": "url" }, "table": "outbox" } },
        "sink": { "redisStream": { "stream": "orders" } },
    });
    if let Some(delivery) = delivery {
        spec["delivery"] = delivery;
    }
    spec
}

fn cases() -> Vec<Case> {
    let selector = json!({ "matchLabels": { "tier": "public" } });
    let mut cases = Vec::new();

    // The attachment rules, on both policy kinds.
    for (kind, section) in [(CBP, json!({ "timeout": "2s" })), (RLP, json!({ "limits": [limit()] }))] {
        let spec = |fields: Value| {
            let mut spec = section.clone();
            for (key, value) in fields.as_object().expect("fields are a mapping") {
                spec[key] = value.clone();
            }
            spec
        };
        cases.extend([
            case(
                kind,
                attach::ONE_ATTACHMENT,
                "spec",
                spec(json!({ "targetRefs": [{ "name": "checkout" }] })),
                vec![
                    spec(json!({})),
                    spec(json!({ "targetRefs": [{ "name": "checkout" }], "namespaceSelector": selector })),
                ],
            ),
            case(
                kind,
                attach::SERVICE_SELECTOR,
                "spec",
                spec(json!({ "namespaceSelector": selector, "serviceSelector": { "matchLabels": { "app": "api" } } })),
                vec![spec(json!({ "targetRefs": [{ "name": "checkout" }], "serviceSelector": { "matchLabels": { "app": "api" } } }))],
            ),
            case(
                kind,
                attach::MODE,
                "spec",
                spec(json!({ "namespaceSelector": selector, "mode": "Override" })),
                vec![spec(json!({ "targetRefs": [{ "name": "checkout" }], "mode": "Default" }))],
            ),
            case(
                kind,
                attach::UNIQUE_TARGETS,
                "spec.targetRefs",
                spec(json!({ "targetRefs": [{ "name": "checkout" }, { "name": "checkout", "sectionName": "grpc" }, { "name": "cart" }] })),
                vec![
                    spec(json!({ "targetRefs": [{ "name": "checkout" }, { "name": "checkout" }] })),
                    spec(json!({ "targetRefs": [{ "name": "checkout", "sectionName": "http" }, { "name": "checkout", "sectionName": "http" }] })),
                ],
            ),
        ]);
    }

    cases.extend([
        // CircuitBreakerPolicy
        case(
            CBP,
            "has(self.connectionLimits) || has(self.outlierDetection) || has(self.retry) || has(self.timeout) || has(self.breaker)",
            "spec",
            cbp(json!({ "connectionLimits": { "maxConnections": 100 } })),
            vec![cbp(json!({}))],
        ),
        case(
            CBP,
            "!has(self.retry) || !has(self.retry.perTryTimeout) || !has(self.timeout) || duration(self.retry.perTryTimeout) <= duration(self.timeout)",
            "spec",
            cbp(json!({ "timeout": "2s", "retry": { "attempts": 2, "perTryTimeout": "2s" } })),
            vec![cbp(json!({ "timeout": "2s", "retry": { "attempts": 2, "perTryTimeout": "2001ms" } }))],
        ),
        case(
            CBP,
            "!has(self.baseEjectionTime) || duration(self.baseEjectionTime) >= duration('1s')",
            "spec.outlierDetection",
            cbp(json!({ "outlierDetection": { "consecutive5xx": 5, "baseEjectionTime": "1s" } })),
            vec![cbp(json!({ "outlierDetection": { "consecutive5xx": 5, "baseEjectionTime": "999ms" } }))],
        ),
        case(
            CBP,
            "self.all(c, self.exists_one(d, d == c))",
            "spec.retry.retryOn",
            cbp(json!({ "retry": { "attempts": 2, "retryOn": ["5xx", "reset"] } })),
            vec![cbp(json!({ "retry": { "attempts": 2, "retryOn": ["5xx", "reset", "5xx"] } }))],
        ),
        case(
            CBP,
            "duration(self.base) <= duration(self.max)",
            "spec.retry.backoff",
            cbp(json!({ "retry": { "attempts": 2, "backoff": { "base": "250ms", "max": "250ms" } } })),
            vec![cbp(json!({ "retry": { "attempts": 2, "backoff": { "base": "1s", "max": "250ms" } } }))],
        ),
        case(
            CBP,
            "self.type == 'Count' ? (has(self.size) && !has(self.duration)) : (has(self.duration) && !has(self.size))",
            "spec.breaker.slidingWindow",
            cbp(json!({ "breaker": { "failureRateThreshold": 50, "openDuration": "30s", "slidingWindow": { "type": "Count", "size": 100 } } })),
            vec![
                cbp(json!({ "breaker": { "failureRateThreshold": 50, "openDuration": "30s", "slidingWindow": { "type": "Count", "duration": "10s" } } })),
                cbp(json!({ "breaker": { "failureRateThreshold": 50, "openDuration": "30s", "slidingWindow": { "type": "Count", "size": 100, "duration": "10s" } } })),
                cbp(json!({ "breaker": { "failureRateThreshold": 50, "openDuration": "30s", "slidingWindow": { "type": "Time", "size": 100 } } })),
            ],
        ),
        case(
            CBP,
            "self.type == 'Count' ? (has(self.size) && !has(self.duration)) : (has(self.duration) && !has(self.size))",
            "spec.breaker.slidingWindow",
            cbp(json!({ "breaker": { "failureRateThreshold": 50, "openDuration": "30s", "slidingWindow": { "type": "Time", "duration": "10s" } } })),
            vec![cbp(json!({ "breaker": { "failureRateThreshold": 50, "openDuration": "30s", "slidingWindow": { "type": "Time" } } }))],
        ),
        // RateLimitPolicy
        case(
            RLP,
            "self.all(l, self.exists_one(m, m.name == l.name))",
            "spec.limits",
            rlp(json!([limit(), { "name": "burst", "rate": { "requests": 10, "per": "1s" } }])),
            vec![rlp(json!([limit(), { "name": "all", "rate": { "requests": 10, "per": "1s" } }]))],
        ),
        case(
            RLP,
            "!has(self.burst) || !has(self.algorithm) || self.algorithm == 'TokenBucket'",
            "spec.limits[0]",
            rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "burst": 20, "algorithm": "TokenBucket" }])),
            vec![
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "burst": 20, "algorithm": "SlidingWindow" }])),
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "burst": 0, "algorithm": "FixedWindow" }])),
            ],
        ),
        case(
            RLP,
            "!has(self.scope) || self.scope != 'Pod' || !has(self.algorithm) || self.algorithm == 'TokenBucket'",
            "spec.limits[0]",
            rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "scope": "Pod", "algorithm": "TokenBucket" }])),
            vec![rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "scope": "Pod", "algorithm": "SlidingWindow" }]))],
        ),
        case(
            RLP,
            "!has(self.scope) || self.scope != 'Pod' || !has(self.key) || self.key.all(k, has(k.header) || has(k.value))",
            "spec.limits[0]",
            rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "scope": "Pod", "key": [{ "header": "x-user-id" }, { "value": "free" }] }])),
            vec![
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "scope": "Pod", "key": [{ "remoteAddress": true }] }])),
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "scope": "Pod", "key": [{ "header": "x-user-id" }, { "path": true }] }])),
            ],
        ),
        case(
            RLP,
            "(has(self.header) ? 1 : 0) + (has(self.remoteAddress) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.value) ? 1 : 0) == 1",
            "spec.limits[0].key[1]",
            rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "key": [{ "header": "x-user-id" }, { "path": true }] }])),
            vec![
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "key": [{ "header": "x-user-id" }, {}] }])),
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "key": [{ "header": "x-user-id" }, { "header": "x-tenant", "remoteAddress": true }] }])),
            ],
        ),
        case(
            RLP,
            "!(has(self.path) && has(self.pathPrefix))",
            "spec.limits[0].match",
            rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "match": { "pathPrefix": "/api/" } }])),
            vec![rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1m" }, "match": { "path": "/api/cart", "pathPrefix": "/api/" } }]))],
        ),
        case(
            RLP,
            "duration(self.per) >= duration('1s') && duration(self.per) <= duration('24h')",
            "spec.limits[0].rate",
            rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "1s" } }, { "name": "daily", "rate": { "requests": 1, "per": "24h" } }])),
            vec![
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "999ms" } }])),
                rlp(json!([{ "name": "all", "rate": { "requests": 100, "per": "24h1s" } }])),
            ],
        ),
        // LockLease
        case(
            "LockLease",
            "duration(self) >= duration('1s') && duration(self) <= duration('1h')",
            "spec.ttl",
            json!({ "ttl": "1h", "podSelector": {} }),
            vec![json!({ "ttl": "500ms", "podSelector": {} }), json!({ "ttl": "61m", "podSelector": {} })],
        ),
        // OutboxRelay
        case(
            "OutboxRelay",
            "!has(self.delivery) || !has(self.delivery.deadLetterTable) || self.delivery.deadLetterTable != self.source.postgres.table",
            "spec",
            outbox(Some(json!({ "deadLetterTable": "outbox_dead" }))),
            vec![outbox(Some(json!({ "deadLetterTable": "outbox" })))],
        ),
        case(
            "OutboxRelay",
            "(has(self.redisStream) ? 1 : 0) + (has(self.nats) ? 1 : 0) + (has(self.webhook) ? 1 : 0) == 1",
            "spec.sink",
            outbox(None),
            vec![
                {
                    let mut spec = outbox(None);
                    spec["sink"] = json!({});
                    spec
                },
                {
                    let mut spec = outbox(None);
                    spec["sink"]["webhook"] = json!({ "url": "https://events.example.com/outbox" });
                    spec
                },
            ],
        ),
        case(
            "OutboxRelay",
            "!has(self.pollInterval) || (duration(self.pollInterval) >= duration('10ms') && duration(self.pollInterval) <= duration('1m'))",
            "spec.delivery",
            outbox(Some(json!({ "pollInterval": "10ms" }))),
            vec![outbox(Some(json!({ "pollInterval": "9ms" }))), outbox(Some(json!({ "pollInterval": "1m1s" })))],
        ),
    ]);
    cases
}

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
    // This spec breaks "set exactly one of targetRefs or namespaceSelector", but the schema error
    // (an unknown algorithm) is all that is reported, as with the API server.
    let spec =
        json!({ "limits": [{ "name": "all", "rate": { "requests": 1, "per": "1s" }, "algorithm": "Fast" }] });
    let found = errors(&object(RLP, spec));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].starts_with("spec.limits[0].algorithm: Unsupported value: \"Fast\""), "{found:#?}");
}

#[test]
fn a_rule_failure_is_worded_like_the_api_server() {
    let found = errors(&object("LockLease", json!({ "ttl": "2h", "podSelector": {} })));
    assert_eq!(found, ["spec.ttl: Invalid value: \"string\": ttl must be between 1s and 1h"]);
}
