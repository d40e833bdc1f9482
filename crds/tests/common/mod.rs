//! Helpers shared by the integration tests: objects to validate, their errors as text, the CEL
//! rules of every CRD, and full examples of each kind.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};

pub const API_VERSION: &str = "breakwater.dev/v1alpha1";

/// The CRD serving `kind`.
pub fn crd(kind: &str) -> &'static CustomResourceDefinition {
    breakwater_api::crd_for(API_VERSION, kind).unwrap_or_else(|| panic!("no CRD serves {API_VERSION} {kind}"))
}

/// The `openAPIV3Schema` of the CRD's only version, as JSON.
pub fn schema(crd: &CustomResourceDefinition) -> Value {
    let version = crd.spec.versions.first().expect("the CRD has a version");
    let schema = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .expect("the version has a schema");
    serde_json::to_value(schema).expect("a schema serializes to JSON")
}

/// A whole object of `kind` with this spec.
pub fn object(kind: &str, spec: Value) -> Value {
    json!({
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": { "name": "test", "namespace": "shop" },
        "spec": spec,
    })
}

/// What `validate_object` says about an object, one line per error.
pub fn errors(object: &Value) -> Vec<String> {
    let kind = object["kind"].as_str().unwrap_or_default();
    breakwater_api::validate_object(crd(kind), object).iter().map(ToString::to_string).collect()
}

pub fn from_yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|err| panic!("test YAML does not parse: {err}\n{text}"))
}

/// One CEL rule of a CRD and where it sits.
#[derive(Debug, Clone)]
pub struct RuleSite {
    pub kind: String,
    /// The schema path, with `[]` for list items: `spec.limits[].rate`.
    pub path: String,
    /// The `type` of the schema node the rule is on, which the API server prints.
    pub node_type: String,
    pub rule: String,
    pub message: String,
}

/// Every `x-kubernetes-validations` rule of every CRD.
pub fn rule_sites() -> Vec<RuleSite> {
    fn walk(kind: &str, node: &Value, path: &str, sites: &mut Vec<RuleSite>) {
        for rule in node.get("x-kubernetes-validations").and_then(Value::as_array).into_iter().flatten() {
            sites.push(RuleSite {
                kind: kind.to_owned(),
                path: path.to_owned(),
                node_type: node["type"].as_str().unwrap_or_default().to_owned(),
                rule: rule["rule"].as_str().unwrap_or_default().to_owned(),
                message: rule["message"].as_str().unwrap_or_default().to_owned(),
            });
        }
        for (key, child) in node.get("properties").and_then(Value::as_object).into_iter().flatten() {
            let child_path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
            walk(kind, child, &child_path, sites);
        }
        if let Some(items) = node.get("items") {
            walk(kind, items, &format!("{path}[]"), sites);
        }
        if let Some(values) = node.get("additionalProperties").filter(|a| a.is_object()) {
            walk(kind, values, &format!("{path}.*"), sites);
        }
    }
    let mut sites = Vec::new();
    for crd in breakwater_api::crds() {
        walk(&crd.spec.names.kind, &schema(&crd), "", &mut sites);
    }
    sites
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
