//! The Breakwater objects the tests feed to standalone-mode validation, in one place: full
//! examples of each kind ([`EXAMPLES`]), which must pass, and the bad objects:
//!
//! - [`schema`]: objects the OpenAPI schema, strict decoding or metadata checks refuse
//!   (crds/tests/schema_validation.rs);
//! - [`rules`]: each CEL rule of each CRD with a spec it accepts and specs that break only it
//!   (crds/tests/cel_rules.rs);
//! - [`cli`]: the policy documents `breakwater-operator standalone` is run on
//!   (operator/tests/it/standalone_cli.rs).
//!
//! operator/tests/it/kube/validation.rs creates every bad object on a real API server and
//! checks that `validate_object` gives exactly the server's errors, and that the server accepts
//! the good ones. The operator's test binary includes this file once, with `#[path]` (in
//! standalone_cli.rs), so the file uses only what both crates depend on (breakwater_api,
//! serde_json, serde_saphyr) and nothing else from `common`.

// Each test crate uses a different subset of the corpus.
#![allow(dead_code)]

use serde_json::{Value, json};

pub const API_VERSION: &str = "breakwater.dev/v1alpha1";

/// A whole object of `kind` with this spec.
pub fn object(kind: &str, spec: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": { "name": "test", "namespace": "shop" },
        "spec": spec,
    })
}

pub fn from_yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|err| panic!("test YAML does not parse: {err}\n{text}"))
}

/// Every bad object of the corpus that the API server must refuse, named for failure messages.
pub fn bad_objects() -> Vec<(String, Value)> {
    let schema = schema::cases().into_iter().map(|(name, object, _)| (format!("schema: {name}"), object));
    let rules = rules::cases().into_iter().flat_map(|case| {
        let name = format!("rule {} {:?}", case.kind, case.rule);
        case.bad
            .into_iter()
            .enumerate()
            .map(move |(i, spec)| (format!("{name} bad[{i}]"), object(case.kind, spec)))
    });
    let cli = cli::cases()
        .into_iter()
        .filter(|case| case.refused_by == cli::RefusedBy::ApiServer)
        .map(|case| (format!("standalone: {}", case.what), from_yaml(&case.document)));
    schema.chain(rules).chain(cli).collect()
}

/// The objects of the corpus the schema accepts but the operator refuses (a condition, not a
/// field error): the API server must accept them, and so must `validate_object`.
pub fn operator_verdicts() -> Vec<(String, Value)> {
    cli::cases()
        .into_iter()
        .filter(|case| case.refused_by == cli::RefusedBy::Operator)
        .map(|case| (format!("standalone: {}", case.what), from_yaml(&case.document)))
        .collect()
}

/// The good spec of every rule case, which the API server must accept.
pub fn rule_good_objects() -> Vec<(String, Value)> {
    rules::cases()
        .into_iter()
        .map(|case| (format!("rule {} {:?} good", case.kind, case.rule), object(case.kind, case.good)))
        .collect()
}

/// A rate-limit policy with a per-user limit, a per-client-address limit and an Envoy-local one.
pub const RATE_LIMIT_POLICY: &str = r#"
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: checkout-per-user
  namespace: shop
spec:
  targetRefs:
    - name: checkout
      sectionName: http
  failureMode: Closed
  limits:
    - name: per-user
      match:
        pathPrefix: /api/
        methods: [POST, PUT]
      key:
        - header: x-user-id
      rate:
        requests: 100
        per: 1m
      burst: 20
      algorithm: TokenBucket
      scope: Cluster
    - name: per-client-address
      key:
        - remoteAddress: true
        - path: true
      rate: { requests: 1000, per: 1h }
      algorithm: SlidingWindow
    - name: free-tier
      match:
        headers:
          - name: x-tenant-tier
            value: free
      key:
        - value: free-tier
      rate: { requests: 50, per: 1s }
      scope: Pod
      shadow: true
"#;

/// A root-namespace rate-limit policy that every namespace labelled tier=public gets on top.
pub const ROOT_RATE_LIMIT_POLICY: &str = r#"
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata:
  name: public-ceiling
  namespace: breakwater-system
spec:
  namespaceSelector:
    matchLabels: { tier: public }
  serviceSelector:
    matchExpressions:
      - { key: app.kubernetes.io/component, operator: In, values: [api, gateway] }
  mode: Override
  limits:
    - name: ceiling
      rate: { requests: 10000, per: 1s }
      algorithm: FixedWindow
"#;

/// A circuit-breaker policy with every section.
pub const CIRCUIT_BREAKER_POLICY: &str = r#"
apiVersion: breakwater.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata:
  name: payments
  namespace: shop
spec:
  targetRefs:
    - name: payments
    - name: payments
      sectionName: grpc
  connectionLimits:
    maxConnections: 100
    maxPendingRequests: 50
    maxRequests: 200
    maxRetries: 3
  outlierDetection:
    consecutive5xx: 5
    interval: 10s
    baseEjectionTime: 30s
    maxEjectionPercent: 50
    failurePercentage: { threshold: 80, requestVolume: 20, minimumHosts: 3 }
  retry:
    attempts: 3
    perTryTimeout: 500ms
    retryOn: [5xx, gateway-error, reset, connect-failure]
    backoff: { base: 25ms, max: 250ms }
    budget: { percent: 20, minConcurrency: 3 }
  timeout: 2s
  breaker:
    failureRateThreshold: 50
    slowCall: { duration: 1s, rateThreshold: 80 }
    slidingWindow: { type: Count, size: 100 }
    minimumCalls: 20
    openDuration: 30s
    halfOpenCalls: 5
    fallback: Reject
"#;

/// A mutex for a nightly job.
pub const LOCK_LEASE: &str = r#"
apiVersion: breakwater.dev/v1alpha1
kind: LockLease
metadata:
  name: nightly-billing
  namespace: billing
spec:
  ttl: 15s
  holders: 1
  podSelector:
    matchLabels: { app: billing-cron }
"#;

/// An outbox relayed to NATS, with a dead-letter table.
pub const OUTBOX_RELAY: &str = r#"
apiVersion: breakwater.dev/v1alpha1
kind: OutboxRelay
metadata:
  name: orders
  namespace: orders
spec:
  source:
    postgres:
      connectionSecretRef: { name: orders-db, key: url }
      table: public.outbox
  sink:
    nats:
      url: nats://nats.messaging:4222
      subject: "orders.{aggregateType}.{type}"
  delivery:
    batchSize: 200
    pollInterval: 250ms
    ordering: PerAggregate
    maxAttempts: 10
    deadLetterTable: public.outbox_dead
    afterPublish: MarkPublished
"#;

/// Every full example, by name.
pub const EXAMPLES: &[(&str, &str)] = &[
    ("RateLimitPolicy with a per-user limit", RATE_LIMIT_POLICY),
    ("root-namespace RateLimitPolicy", ROOT_RATE_LIMIT_POLICY),
    ("CircuitBreakerPolicy with every section", CIRCUIT_BREAKER_POLICY),
    ("LockLease", LOCK_LEASE),
    ("OutboxRelay", OUTBOX_RELAY),
];

/// Objects the OpenAPI schema, strict field validation or the metadata checks refuse.
pub mod schema {
    use serde_json::{Value, json};

    use super::object;

    pub fn rate_limit(limit: Value) -> Value {
        object("RateLimitPolicy", json!({ "targetRefs": [{ "name": "checkout" }], "limits": [limit] }))
    }

    pub fn lock_lease(spec: Value) -> Value {
        let mut full = json!({ "ttl": "30s", "podSelector": { "matchLabels": { "app": "cron" } } });
        for (key, value) in spec.as_object().expect("spec is a mapping") {
            full[key] = value.clone();
        }
        object("LockLease", full)
    }

    pub fn outbox_relay(delivery: Value) -> Value {
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
    pub fn with(value: Value, change: impl FnOnce(&mut Value)) -> Value {
        let mut value = value;
        change(&mut value);
        value
    }

    /// Bad objects and a fragment of the error each must produce.
    pub fn cases() -> Vec<(&'static str, Value, &'static str)> {
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
                rate_limit(json!({ "name": "all", "rate": { "requests": 1, "per": "1s" }, "key": {} })),
                "spec.limits[0].key: Invalid value: \"object\": spec.limits[0].key in body must be of type array: \"object\"",
            ),
            (
                // Strict decoding finds the mapping's keys unknown (a list's schema declares
                // none) and refuses the object before its type is checked.
                "fields in a mapping for a list",
                rate_limit(
                    json!({ "name": "all", "rate": { "requests": 1, "per": "1s" }, "key": { "header": "x-user-id" } }),
                ),
                "spec.limits[0].key.header: unknown field \"spec.limits[0].key.header\"",
            ),
            (
                "missing required field",
                object("RateLimitPolicy", json!({ "targetRefs": [{ "name": "checkout" }] })),
                "spec.limits: Required value",
            ),
            (
                "missing spec",
                with(lock_lease(json!({})), |o| o["spec"] = Value::Null),
                "spec: Required value",
            ),
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
                rate_limit(
                    json!({ "name": "all", "rate": { "requests": 1, "per": "1s" }, "algorithm": "Fast" }),
                ),
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
                "enum typo in a nested section",
                object(
                    "CircuitBreakerPolicy",
                    json!({
                        "targetRefs": [{ "name": "payments" }],
                        "breaker": {
                            "failureRateThreshold": 50,
                            "slidingWindow": { "type": "Count", "size": 10 },
                            "openDuration": "30s",
                            "fallback": "Open",
                        },
                    }),
                ),
                "spec.breaker.fallback: Unsupported value: \"Open\": supported values: \"Admit\", \"Reject\"",
            ),
            (
                "null for a nullable enum",
                object(
                    "CircuitBreakerPolicy",
                    json!({ "targetRefs": [{ "name": "payments" }], "timeout": "1s", "mode": null }),
                ),
                "spec.mode: Unsupported value: null: supported values: \"Default\", \"Override\"",
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
                "spec.targetRefs[0].name: Too long: may not be more than 63 bytes",
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
                "metadata.name: Required value: name or generateName is required",
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
                with(lock_lease(json!({})), |o| o["metadata"]["namespace"] = json!("Team_Billing")),
                "metadata.namespace: Invalid value: \"Team_Billing\": a lowercase RFC 1123 label must consist of",
            ),
            (
                "metadata.namespace a DNS subdomain",
                with(lock_lease(json!({})), |o| o["metadata"]["namespace"] = json!("team.billing")),
                "metadata.namespace: Invalid value: \"team.billing\": must not contain dots",
            ),
            (
                "unknown field in status",
                with(lock_lease(json!({})), |o| o["status"] = json!({ "owner": "me" })),
                "status.owner: unknown field \"status.owner\"",
            ),
        ]
    }
}

/// The CEL rules, each with a good spec and bad ones.
pub mod rules {
    use breakwater_api::common::attachment_rules as attach;
    use serde_json::{Value, json};

    /// One rule, a spec it accepts, and specs that break only this rule.
    #[derive(Debug)]
    pub struct Case {
        pub kind: &'static str,
        pub rule: &'static str,
        /// Where the API server reports the failure.
        pub path: &'static str,
        pub good: Value,
        pub bad: Vec<Value>,
    }

    fn case(
        kind: &'static str,
        rule: &'static str,
        path: &'static str,
        good: Value,
        bad: Vec<Value>,
    ) -> Case {
        Case { kind, rule, path, good, bad }
    }

    pub const CBP: &str = "CircuitBreakerPolicy";
    pub const RLP: &str = "RateLimitPolicy";

    /// A valid rate limit, for the cases that vary something else.
    pub fn limit() -> Value {
        json!({ "name": "all", "rate": { "requests": 100, "per": "1m" } })
    }

    /// A RateLimitPolicy spec on the checkout Service with these limits.
    pub fn rlp(limits: Value) -> Value {
        json!({ "targetRefs": [{ "name": "checkout" }], "limits": limits })
    }

    /// A CircuitBreakerPolicy spec on the payments Service with these sections.
    pub fn cbp(sections: Value) -> Value {
        let mut spec = json!({ "targetRefs": [{ "name": "payments" }] });
        for (key, value) in sections.as_object().expect("sections are a mapping") {
            spec[key] = value.clone();
        }
        spec
    }

    /// An OutboxRelay spec from the outbox table to a Redis stream, with this delivery.
    pub fn outbox(delivery: Option<Value>) -> Value {
        let mut spec = json!({
            "source": { "postgres": { "connectionSecretRef": { "name": "orders-db", "key": "url" }, "table": "outbox" } },
            "sink": { "redisStream": { "stream": "orders" } },
        });
        if let Some(delivery) = delivery {
            spec["delivery"] = delivery;
        }
        spec
    }

    pub fn cases() -> Vec<Case> {
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
            case(
                "OutboxRelay",
                "!has(self.timeout) || duration(self.timeout) <= duration('10s')",
                "spec.sink.webhook",
                {
                    let mut spec = outbox(None);
                    spec["sink"] = json!({ "webhook": { "url": "http://events.example.com/outbox", "timeout": "10s" } });
                    spec
                },
                vec![{
                    let mut spec = outbox(None);
                    spec["sink"] = json!({ "webhook": { "url": "http://events.example.com/outbox", "timeout": "11s" } });
                    spec
                }],
            ),
        ]);
        cases
    }
}

/// The policy documents the standalone CLI tests run the binary on, with what its output must
/// name. Each is one Breakwater document; the CLI test puts a Service before it.
pub mod cli {
    /// Who refuses a document: the API server (a field error, which standalone mode reports
    /// from `validate_object`), or the operator (a condition such as `RootNamespaceOnly`: the
    /// schema accepts the object, and so does the API server).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum RefusedBy {
        ApiServer,
        Operator,
    }

    #[derive(Debug)]
    pub struct Case {
        pub what: &'static str,
        pub document: String,
        pub refused_by: RefusedBy,
        /// What the binary's output must contain.
        pub needles: Vec<&'static str>,
    }

    /// A RateLimitPolicy spec standalone mode accepts (on a Service `api` in `shop`).
    pub const GOOD_LIMITS: &str = "  targetRefs: [{kind: Service, name: api}]
  limits:
  - {name: per-user, key: [{header: x-user-id}], rate: {requests: 100, per: 1m}, burst: 20}
";

    /// A RateLimitPolicy `shop/limits` with this spec (indented YAML).
    pub fn rate_limit(spec: &str) -> String {
        format!(
            "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: limits, namespace: shop}}\nspec:\n{spec}"
        )
    }

    fn relay(delivery: &str) -> String {
        format!(
            "apiVersion: breakwater.dev/v1alpha1\nkind: OutboxRelay\nmetadata: {{name: orders, namespace: shop}}\nspec:\n  source: {{postgres: {{connectionSecretRef: {{name: db, key: url}}, table: outbox}}}}\n  sink: {{redisStream: {{stream: events}}}}\n  delivery: {delivery}\n"
        )
    }

    fn lease(spec: &str) -> String {
        format!(
            "apiVersion: breakwater.dev/v1alpha1\nkind: LockLease\nmetadata: {{name: l, namespace: shop}}\nspec: {spec}\n"
        )
    }

    fn case(what: &'static str, document: String, refused_by: RefusedBy, needles: Vec<&'static str>) -> Case {
        Case { what, document, refused_by, needles }
    }

    pub fn cases() -> Vec<Case> {
        use RefusedBy::{ApiServer, Operator};
        vec![
            case(
                "negative rate",
                rate_limit(&GOOD_LIMITS.replace("requests: 100", "requests: -5")),
                ApiServer,
                vec!["spec.limits[0].rate.requests", "greater than or equal to 1"],
            ),
            case(
                "unknown field",
                rate_limit(&format!("{GOOD_LIMITS}  failureMood: Open\n")),
                ApiServer,
                vec!["unknown field", "spec.failureMood"],
            ),
            case(
                "duplicate limit names",
                rate_limit(&format!("{GOOD_LIMITS}  - {{name: per-user, rate: {{requests: 1, per: 1s}}}}\n")),
                ApiServer,
                vec!["spec.limits", "limit names must be unique"],
            ),
            case(
                "bad duration",
                rate_limit(&GOOD_LIMITS.replace("per: 1m", "per: 1 minute")),
                ApiServer,
                vec!["spec.limits[0].rate.per", "should match"],
            ),
            case(
                "zero holders",
                lease("{ttl: 30s, holders: 0, podSelector: {}}"),
                ApiServer,
                vec!["spec.holders", "greater than or equal to 1"],
            ),
            case(
                "zero batch size",
                relay("{batchSize: 0}"),
                ApiServer,
                vec!["spec.delivery.batchSize", "greater than or equal to 1"],
            ),
            case(
                "override outside the root namespace",
                rate_limit(&GOOD_LIMITS.replace(
                    "targetRefs: [{kind: Service, name: api}]",
                    "namespaceSelector: {}\n  mode: Override",
                )),
                Operator,
                vec!["RootNamespaceOnly"],
            ),
        ]
    }
}

/// `examples/*.yaml`, the Breakwater documents in it, each named by file and object name
/// (every crate that includes this file sits one level below the repository root).
pub fn repository_examples() -> Vec<(String, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut examples = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display())) {
        let path = entry.expect("a directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("the example is readable");
        let documents: Vec<Value> = serde_saphyr::from_multiple(&text)
            .unwrap_or_else(|err| panic!("{} does not parse: {err}", path.display()));
        for document in documents {
            if document["apiVersion"].as_str().is_some_and(|v| v.starts_with("breakwater.dev/")) {
                let name = format!("{} {}", path.display(), document["metadata"]["name"]);
                examples.push((name, document));
            }
        }
    }
    assert!(!examples.is_empty(), "{} holds no Breakwater object", dir.display());
    examples
}
