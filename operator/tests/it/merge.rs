//! Root-namespace Default and Override policies merged into each Service port's effective
//! policy, and the status each policy gets for it. Worlds are written as YAML, loaded through
//! the same loader standalone mode uses.

use breakwater_operator::{
    inventory::{Inventory, ObjectName, ServicePort},
    policy::{
        attachment::Within,
        circuit_breaker::{self, Section},
        rate_limit::{self, Origin},
    },
    resource::Policy,
};

use crate::support;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: lab}
spec: {ports: [{name: http, port: 80}]}
"#;

fn world(policies: &str) -> Inventory {
    support::world::load(&format!("{}\n---\n{SERVICES}\n---\n{policies}", support::world::NAMESPACES))
}

fn port(namespace: &str, name: &str) -> ServicePort {
    ServicePort { service: ObjectName::new(namespace, name), port: "http".into() }
}

fn accepted(inventory: &Inventory, kind: &str, namespace: &str, name: &str) -> (bool, &'static str, String) {
    let policy = Policy::all(inventory)
        .into_iter()
        .find(|p| p.kind() == kind && p.name() == ObjectName::new(namespace, name))
        .expect("policy present");
    let a = policy.assess(inventory).accepted;
    (a.ok, a.reason, a.message)
}

fn rlp(namespace: &str, name: &str, attach: &str, limit: &str, requests: u32) -> String {
    format!(
        "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec:\n  {attach}\n  limits: [{{name: {limit}, rate: {{requests: {requests}, per: 1m}}}}]\n---\n"
    )
}

/// The platform team's RateLimitPolicies: a production floor of 100 (Override) and a
/// fallback of 50 for every namespace (Default).
fn root_limits() -> String {
    [
        rlp(
            "breakwater-system",
            "floor",
            "namespaceSelector: {matchLabels: {tier: production}}\n  mode: Override",
            "floor",
            100,
        ),
        rlp("breakwater-system", "fallback", "namespaceSelector: {}\n  mode: Default", "fallback", 50),
    ]
    .concat()
}

fn limit_names(limits: &[rate_limit::EffectiveLimit]) -> Vec<(String, Origin, u32)> {
    limits.iter().map(|l| (l.limit.name.clone(), l.origin, l.limit.rate.requests)).collect()
}

#[test]
fn rate_limits_add_up_and_override_cannot_be_loosened() {
    let inventory = world(
        &[rlp("shop", "own", "targetRefs: [{kind: Service, name: api}]", "own", 10_000), root_limits()]
            .concat(),
    );
    let effective = rate_limit::effective(&inventory);

    // shop/api: its own limit and the platform floor, both enforced; the Default is not.
    assert_eq!(
        limit_names(&effective[&port("shop", "api")]),
        [("own".into(), Origin::Namespace, 10_000), ("floor".into(), Origin::RootOverride, 100)]
    );
    // shop/web sets nothing: floor plus the Default.
    assert_eq!(
        limit_names(&effective[&port("shop", "web")]),
        [("floor".into(), Origin::RootOverride, 100), ("fallback".into(), Origin::RootDefault, 50)]
    );
    // lab is not production: only the Default.
    assert_eq!(limit_names(&effective[&port("lab", "api")]), [("fallback".into(), Origin::RootDefault, 50)]);

    let (ok, reason, message) = accepted(&inventory, "RateLimitPolicy", "breakwater-system", "fallback");
    assert!(ok);
    assert_eq!(reason, "Accepted");
    assert_eq!(message, "default limits in effect on 2 of 3 Service ports selected");
}

#[test]
fn root_default_shadowed_everywhere_says_so() {
    let inventory = world(
        &[
            rlp("lab", "own", "targetRefs: [{kind: Service, name: api}]", "own", 5),
            rlp(
                "breakwater-system",
                "fallback",
                "namespaceSelector: {matchLabels: {tier: sandbox}}\n  mode: Default",
                "fallback",
                50,
            ),
        ]
        .concat(),
    );
    let (ok, reason, _) = accepted(&inventory, "RateLimitPolicy", "breakwater-system", "fallback");
    assert!(ok);
    assert_eq!(reason, "Shadowed");
    assert!(
        !rate_limit::effective(&inventory)[&port("lab", "api")]
            .iter()
            .any(|l| l.origin == Origin::RootDefault)
    );
}

fn cbp(namespace: &str, name: &str, created: &str, attach: &str, sections: &str) -> String {
    format!(
        "apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: {name}, namespace: {namespace}, creationTimestamp: \"{created}\"}}\nspec:\n  {attach}\n{sections}---\n"
    )
}

#[test]
fn circuit_breaker_sections_merge_by_precedence() {
    let inventory = world(
        &[
            cbp(
                "shop",
                "team",
                "2026-03-01T00:00:00Z",
                "targetRefs: [{kind: Service, name: api}]",
                "  timeout: 30s\n  retry: {attempts: 5}\n",
            ),
            cbp(
                "breakwater-system",
                "ceiling",
                "2026-01-01T00:00:00Z",
                "namespaceSelector: {matchLabels: {tier: production}}\n  mode: Override",
                "  retry: {attempts: 2}\n",
            ),
            cbp(
                "breakwater-system",
                "ceiling-newer",
                "2026-02-01T00:00:00Z",
                "namespaceSelector: {}\n  mode: Override",
                "  retry: {attempts: 4}\n",
            ),
            cbp(
                "breakwater-system",
                "defaults",
                "2026-01-01T00:00:00Z",
                "namespaceSelector: {}\n  mode: Default",
                "  timeout: 15s\n  connectionLimits: {maxConnections: 100}\n",
            ),
            cbp(
                "breakwater-system",
                "defaults-newer",
                "2026-02-01T00:00:00Z",
                "namespaceSelector: {}\n  mode: Default",
                "  connectionLimits: {maxConnections: 7}\n",
            ),
        ]
        .concat(),
    );
    let effective = circuit_breaker::effective(&inventory);
    let api = &effective[&port("shop", "api")];
    // The namespace's timeout beats the Default; the oldest Override's retry beats both the
    // namespace and the newer Override; the oldest Default fills connectionLimits.
    assert_eq!(api.spec.timeout.as_ref().map(|d| d.as_str()), Some("30s"));
    assert_eq!(api.spec.retry.as_ref().map(|r| r.attempts), Some(2));
    assert_eq!(api.spec.connection_limits.as_ref().and_then(|c| c.max_connections), Some(100));
    assert_eq!(api.sources[&Section::Retry], ObjectName::new("breakwater-system", "ceiling"));
    assert_eq!(api.sources[&Section::Timeout], ObjectName::new("shop", "team"));

    // lab is not production: the newer Override applies there, and Default's timeout.
    let lab = &effective[&port("lab", "api")];
    assert_eq!(lab.spec.retry.as_ref().map(|r| r.attempts), Some(4));
    assert_eq!(lab.spec.timeout.as_ref().map(|d| d.as_str()), Some("15s"));

    let (ok, reason, message) = accepted(&inventory, "CircuitBreakerPolicy", "shop", "team");
    assert!(ok);
    assert_eq!(reason, "Overridden");
    assert_eq!(
        message,
        "retry overridden by root policy breakwater-system/ceiling and breakwater-system/ceiling-newer"
    );
}

#[test]
fn one_namespace_evaluated_alone_gets_what_the_whole_evaluation_gives_it() {
    let inventory = world(
        &[
            cbp(
                "shop",
                "team",
                "2026-03-01T00:00:00Z",
                "targetRefs: [{kind: Service, name: api}]",
                "  timeout: 30s\n",
            ),
            cbp(
                "shop",
                "late",
                "2026-04-01T00:00:00Z",
                "targetRefs: [{kind: Service, name: api}]",
                "  timeout: 9s\n",
            ),
            cbp(
                "lab",
                "lab",
                "2026-03-01T00:00:00Z",
                "targetRefs: [{kind: Service, name: api}]",
                "  timeout: 5s\n",
            ),
            cbp(
                "breakwater-system",
                "ceiling",
                "2026-01-01T00:00:00Z",
                "namespaceSelector: {matchLabels: {tier: production}}\n  mode: Override",
                "  retry: {attempts: 2}\n",
            ),
            cbp(
                "breakwater-system",
                "defaults",
                "2026-01-01T00:00:00Z",
                "namespaceSelector: {}\n  mode: Default",
                "  timeout: 15s\n",
            ),
            rlp("shop", "own", "targetRefs: [{kind: Service, name: api}]", "own", 10_000),
            rlp("lab", "own", "targetRefs: [{kind: Service, name: api}]", "own", 5),
            root_limits(),
        ]
        .concat(),
    );
    let (circuit_breakers, rate_limits) =
        (circuit_breaker::effective(&inventory), rate_limit::effective(&inventory));
    for namespace in ["shop", "lab", "breakwater-system", "nowhere"] {
        let within = Within::Namespace(namespace);
        let here = |port: &&ServicePort| port.service.namespace == namespace;
        let whole: Vec<_> = circuit_breakers.iter().filter(|(p, _)| here(p)).collect();
        let alone = circuit_breaker::effective_within(&inventory, within);
        assert_eq!(alone.iter().collect::<Vec<_>>(), whole, "{namespace}");
        let whole: Vec<_> = rate_limits.iter().filter(|(p, _)| here(p)).collect();
        let alone = rate_limit::effective_within(&inventory, within);
        assert_eq!(alone.iter().collect::<Vec<_>>(), whole, "{namespace}");
    }
    // Assessing a namespace policy looks at its namespace and the root namespace only, and
    // still sees the older policy on its port and the Override of its section.
    let (ok, reason, message) = accepted(&inventory, "CircuitBreakerPolicy", "shop", "late");
    assert_eq!((ok, reason), (false, "Conflicted"), "{message}");
    assert!(message.contains("shop/team"), "{message}");
    assert_eq!(accepted(&inventory, "CircuitBreakerPolicy", "lab", "lab").1, "Accepted");
}

#[test]
fn breaker_that_could_never_trip_is_refused() {
    let inventory = world(&cbp(
        "shop",
        "odd",
        "2026-01-01T00:00:00Z",
        "targetRefs: [{kind: Service, name: api}]",
        "  breaker: {failureRateThreshold: 50, slidingWindow: {type: Count, size: 10}, minimumCalls: 20, openDuration: 30s}\n",
    ));
    let (ok, reason, message) = accepted(&inventory, "CircuitBreakerPolicy", "shop", "odd");
    assert!(!ok);
    assert_eq!(reason, "Invalid");
    assert!(message.contains("spec.breaker.minimumCalls (20) exceeds slidingWindow.size (10)"), "{message}");
    assert!(circuit_breaker::effective(&inventory).is_empty());
}

#[test]
fn what_envoy_cannot_express_is_refused_not_dropped() {
    let inventory = world(&cbp(
        "shop",
        "zero",
        "2026-01-01T00:00:00Z",
        "targetRefs: [{kind: Service, name: api}]",
        "  timeout: 0s\n",
    ));
    let (ok, reason, message) = accepted(&inventory, "CircuitBreakerPolicy", "shop", "zero");
    assert!(!ok);
    assert_eq!(reason, "Invalid");
    assert!(message.starts_with("spec.timeout"), "{message}");

    let inventory = world(&rlp("shop", "odd", "targetRefs: [{kind: Service, name: api}]", "x", 5).replace(
        "rate: {requests: 5, per: 1m}}",
        "rate: {requests: 5, per: 1m}, key: [{remoteAddress: false}]}",
    ));
    let (ok, reason, message) = accepted(&inventory, "RateLimitPolicy", "shop", "odd");
    assert!(!ok, "{message}");
    assert_eq!(reason, "Invalid");
    assert!(message.starts_with("spec.limits[0].key"), "{message}");
}
