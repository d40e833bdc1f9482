//! The reconcilers against the real API server: status is written by server-side apply,
//! generations are bumped by the server, conditions follow the world, Events mark
//! transitions. Each test calls `reconcile` itself on objects it created for real, with the
//! controller's stores fed by the test (the watch path is tested by walkthrough.rs), so the
//! tests run in parallel in namespaces of their own.

use std::sync::Arc;

use breakwater_api::{CircuitBreakerPolicy, OutboxRelay, RateLimitPolicy};
use breakwater_operator::{
    compile::{PolicyVersion, Proxy, Snapshot, type_url},
    controller::{self, Context, FIELD_MANAGER, reconcile},
    http::State,
    inventory::ObjectName,
    reflectors::{Reflector, Reflectors},
    resource::Kind,
    xds::SnapshotCache,
};
use envoy_types::pb::google::protobuf::Any;
use k8s_openapi::{
    api::{
        core::v1::{Secret, Service},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    runtime::{events::Reporter, watcher},
};
use serde::de::DeserializeOwned;

use super::{DEADLINE, admin, eventually, namespace};

fn yaml<T: DeserializeOwned>(text: &str) -> T {
    serde_saphyr::from_str(text).expect("test fixture parses")
}

fn service(name: &str) -> Service {
    yaml(&format!("metadata: {{name: {name}}}\nspec: {{ports: [{{name: http, port: 80}}]}}"))
}

fn rate_limit(extra: &str) -> RateLimitPolicy {
    yaml(&format!(
        r#"
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: limits}}
spec:
  {extra}
  limits:
  - name: per-user
    key: [{{header: x-user-id}}]
    rate: {{requests: 100, per: 1m}}
"#
    ))
}

/// Namespaces of its own on the real API server, and the controllers' context over
/// reflectors the test feeds (their watches would feed them in a cluster).
struct World<K: Kind> {
    client: Client,
    /// The application namespace, and the operator's root namespace.
    ns: String,
    root: String,
    reflectors: Reflectors,
    /// The reflector of the kind under test.
    policies: fn(&Reflectors) -> &Reflector<K>,
    ctx: Arc<Context>,
    cache: Arc<SnapshotCache>,
}

impl<K: Kind> World<K> {
    async fn new(policies: fn(&Reflectors) -> &Reflector<K>) -> Self {
        let client = admin().await;
        let (ns, root) = (namespace("ctl", &[]), namespace("ctl-root", &[]));
        let reflectors = Reflectors::default();
        let cache = Arc::new(SnapshotCache::default());
        let options = controller::Options {
            root_namespace: root.clone(),
            reporter: Reporter { controller: "breakwater-operator".into(), instance: Some("test".into()) },
            state: Arc::new(State::default()),
            cache: Some(cache.clone()),
            leases: None,
        };
        let ctx = Arc::new(Context::new(client.clone(), reflectors.clone(), options));
        Self { client, ns, root, reflectors, policies, ctx, cache }
    }

    /// Creates a policy in `namespace`, as a user would.
    async fn create(&mut self, namespace: &str, object: K) -> K {
        let created =
            Api::namespaced(self.client.clone(), namespace).create(&PostParams::default(), &object).await;
        created.expect("the API server accepts the policy")
    }

    /// Creates a Service in the application namespace and adds it to the controller's store.
    async fn create_service(&mut self, name: &str) {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        let created = api.create(&PostParams::default(), &service(name)).await.expect("create service");
        self.reflectors.services.apply(watcher::Event::Apply(created));
    }

    /// Reconciles the object as the API holds it now, and returns it afterwards.
    async fn reconcile(&mut self, namespace: &str, name: &str) -> K {
        let api: Api<K> = Api::namespaced(self.client.clone(), namespace);
        let current = api.get(name).await.expect("object exists");
        (self.policies)(&self.reflectors).apply(watcher::Event::Apply(current.clone()));
        reconcile(Arc::new(current), self.ctx.clone()).await.expect("reconcile succeeds");
        api.get(name).await.expect("object exists")
    }
}

fn condition(conditions: &[Condition], type_: &str) -> (String, String, Option<i64>) {
    let c = conditions.iter().find(|c| c.type_ == type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone(), c.observed_generation)
}

fn rl_conditions(policy: &RateLimitPolicy) -> Vec<Condition> {
    policy.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default()
}

#[tokio::test]
async fn valid_policy_is_accepted_and_not_claimed_programmed() {
    let mut world = World::new(|r| &r.rate_limits).await;
    world.create_service("api").await;
    let ns = world.ns.clone();
    world.create(&ns, rate_limit("targetRefs: [{kind: Service, name: api}]")).await;
    let after = world.reconcile(&ns, "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "Accepted"), ("True".into(), "Accepted".into(), Some(1)));
    assert_eq!(condition(&conditions, "ResolvedRefs"), ("True".into(), "ResolvedRefs".into(), Some(1)));
    assert_eq!(condition(&conditions, "Programmed"), ("False".into(), "Pending".into(), Some(1)));
    assert_eq!(after.status.as_ref().map(|s| s.targets), Some(1));
    let status_managers: Vec<(String, String)> = after
        .managed_fields()
        .iter()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .map(|m| (m.manager.clone().unwrap_or_default(), m.operation.clone().unwrap_or_default()))
        .collect();
    assert_eq!(status_managers, [(FIELD_MANAGER.to_string(), "Apply".to_string())], "status by SSA");
}

#[tokio::test]
async fn missing_target_then_appearing_target() {
    let mut world = World::new(|r| &r.rate_limits).await;
    let ns = world.ns.clone();
    world.create(&ns, rate_limit("targetRefs: [{kind: Service, name: api}]")).await;
    let after = world.reconcile(&ns, "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "ResolvedRefs"), ("False".into(), "TargetNotFound".into(), Some(1)));
    let message = &conditions.iter().find(|c| c.type_ == "ResolvedRefs").expect("present").message;
    assert_eq!(message, &format!("Service {ns}/api not found"));
    let first_transition = conditions[1].last_transition_time.clone();

    // The Service appears: the controller's Service watch feeds the store and re-triggers.
    world.create_service("api").await;
    let after = world.reconcile(&ns, "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "ResolvedRefs"), ("True".into(), "ResolvedRefs".into(), Some(1)));
    assert!(conditions[1].last_transition_time.0 >= first_transition.0);

    // Events record both transitions of ResolvedRefs (Warning, then Normal), on the policy.
    let events: Api<Event> = Api::namespaced(world.client.clone(), &ns);
    let seen = eventually("both Events are stored", DEADLINE, || async {
        let list = events.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let seen: Vec<(String, String, String)> = list
            .items
            .into_iter()
            .map(|e| {
                let regarding = e.regarding.and_then(|r| r.name).unwrap_or_default();
                (e.reason.unwrap_or_default(), e.type_.unwrap_or_default(), regarding)
            })
            .collect();
        let reasons: Vec<&str> = seen.iter().map(|(r, ..)| r.as_str()).collect();
        if reasons.contains(&"TargetNotFound") && reasons.contains(&"ResolvedRefs") {
            Ok(seen)
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    for (reason, type_, regarding) in seen {
        assert_eq!(regarding, "limits", "{reason} is about the policy");
        let expected = if reason == "TargetNotFound" { "Warning" } else { "Normal" };
        assert_eq!(type_, expected, "{reason}");
    }
}

#[tokio::test]
async fn spec_change_moves_observed_generation() {
    let mut world = World::new(|r| &r.rate_limits).await;
    world.create_service("api").await;
    let ns = world.ns.clone();
    world.create(&ns, rate_limit("targetRefs: [{kind: Service, name: api}]")).await;
    world.reconcile(&ns, "limits").await;

    let api: Api<RateLimitPolicy> = Api::namespaced(world.client.clone(), &ns);
    let mut changed = api.get("limits").await.expect("get");
    changed.spec.limits[0].rate.requests = 50;
    let replaced = api.replace("limits", &PostParams::default(), &changed).await.expect("replace");
    assert_eq!(replaced.metadata.generation, Some(2), "the API server bumps the generation");
    let after = world.reconcile(&ns, "limits").await;
    let conditions = rl_conditions(&after);
    for type_ in ["Accepted", "ResolvedRefs", "Programmed"] {
        assert_eq!(condition(&conditions, type_).2, Some(2), "{type_}");
    }

    // A status write does not bump the generation (the status subresource is enabled).
    assert_eq!(after.metadata.generation, Some(2));
}

#[tokio::test]
async fn override_outside_root_namespace_is_refused() {
    let mut world = World::new(|r| &r.rate_limits).await;
    world.create_service("api").await;
    let (ns, root) = (world.ns.clone(), world.root.clone());
    world.create(&ns, rate_limit("namespaceSelector: {}\n  mode: Override")).await;
    let after = world.reconcile(&ns, "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "Accepted"), ("False".into(), "RootNamespaceOnly".into(), Some(1)));
    assert_eq!(after.status.as_ref().map(|s| s.targets), Some(0));

    // The same policy in the root namespace is accepted and selects the Service.
    world.create(&root, rate_limit("namespaceSelector: {}\n  mode: Override")).await;
    let after = world.reconcile(&root, "limits").await;
    assert_eq!(condition(&rl_conditions(&after), "Accepted").0, "True");
    assert_eq!(after.status.as_ref().map(|s| s.targets), Some(1));
}

#[tokio::test]
async fn unchanged_status_is_not_rewritten() {
    let mut world = World::new(|r| &r.rate_limits).await;
    world.create_service("api").await;
    let ns = world.ns.clone();
    world.create(&ns, rate_limit("targetRefs: [{kind: Service, name: api}]")).await;
    let first = world.reconcile(&ns, "limits").await;
    let second = world.reconcile(&ns, "limits").await;
    assert_eq!(first.resource_version(), second.resource_version(), "no write when nothing changed");
}

#[tokio::test]
async fn conflicting_circuit_breakers_older_wins() {
    let policy = |name: &str| -> CircuitBreakerPolicy {
        yaml(&format!(
            "apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: {name}}}\n\
             spec:\n  targetRefs: [{{kind: Service, name: api}}]\n  timeout: 5s\n"
        ))
    };
    let mut world = World::new(|r| &r.circuit_breakers).await;
    world.create_service("api").await;
    let ns = world.ns.clone();
    // The server stamps creationTimestamp in whole seconds; "newer" must be a second younger
    // (its name sorts first, so a tie would not show the age rule).
    let older = world.create(&ns, policy("older")).await;
    let stamp = older.metadata.creation_timestamp.clone().expect("stamped").0;
    eventually("the server's clock passes the older policy's second", DEADLINE, || async {
        let probe = server_second(&world.client, &ns).await;
        if probe > stamp.as_second() { Ok(()) } else { Err(format!("{probe} <= {}", stamp.as_second())) }
    })
    .await;
    let newer = world.create(&ns, policy("newer")).await;
    assert!(newer.metadata.creation_timestamp > older.metadata.creation_timestamp);
    let winner = world.reconcile(&ns, "older").await;
    let loser = world.reconcile(&ns, "newer").await;
    let conds =
        |p: &CircuitBreakerPolicy| p.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    assert_eq!(condition(&conds(&winner), "Accepted").1, "Accepted");
    assert_eq!(condition(&conds(&loser), "Accepted"), ("False".into(), "Conflicted".into(), Some(1)));
}

/// The API server's clock, in seconds: the creation time of a throwaway ConfigMap.
async fn server_second(client: &Client, ns: &str) -> i64 {
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let probe: ConfigMap = yaml("metadata: {generateName: clock-}");
    let created = api.create(&PostParams::default(), &probe).await.expect("create probe");
    created.metadata.creation_timestamp.expect("stamped").0.as_second()
}

#[tokio::test]
async fn outbox_relay_secret_resolution() {
    let relay: OutboxRelay = yaml(
        r#"
apiVersion: breakwater.dev/v1alpha1
kind: OutboxRelay
metadata: {name: orders}
spec:
  source: {postgres: {connectionSecretRef: {name: orders-db, key: url}, table: outbox}}
  sink: {redisStream: {stream: events}}
"#,
    );
    let mut world = World::new(|r| &r.outbox_relays).await;
    let ns = world.ns.clone();
    world.create(&ns, relay).await;
    let conds = |p: &OutboxRelay| p.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let after = world.reconcile(&ns, "orders").await;
    assert_eq!(condition(&conds(&after), "ResolvedRefs").1, "SecretNotFound");

    let secrets: Api<Secret> = Api::namespaced(world.client.clone(), &ns);
    let wrong_key: Secret = yaml("metadata: {name: orders-db}\nstringData: {dsn: x}");
    secrets.create(&PostParams::default(), &wrong_key).await.expect("create secret");
    let after = world.reconcile(&ns, "orders").await;
    assert_eq!(condition(&conds(&after), "ResolvedRefs").1, "SecretKeyNotFound");

    let mut right_key: Secret = secrets.get("orders-db").await.expect("get secret");
    right_key.string_data = Some([("url".to_string(), "postgres://x".to_string())].into());
    secrets.replace("orders-db", &PostParams::default(), &right_key).await.expect("replace secret");
    let after = world.reconcile(&ns, "orders").await;
    assert_eq!(condition(&conds(&after), "ResolvedRefs"), ("True".into(), "ResolvedRefs".into(), Some(1)));
}

#[tokio::test]
async fn programmed_follows_the_proxies_acknowledgements() {
    let mut world = World::new(|r| &r.rate_limits).await;
    world.create_service("api").await;
    let ns = world.ns.clone();
    world.create(&ns, rate_limit("targetRefs: [{kind: Service, name: api}]")).await;
    let programmed = |p: &RateLimitPolicy| {
        let c = rl_conditions(p).into_iter().find(|c| c.type_ == "Programmed").expect("Programmed");
        (c.status, c.reason, c.message)
    };
    let after = world.reconcile(&ns, "limits").await;
    assert_eq!(programmed(&after).2, "no proxy carries this policy yet");

    // A proxy backing the Service connects; its snapshot carries the policy.
    let mut snapshot = Snapshot::default();
    snapshot.insert(type_url::LISTENER, "inbound", Any::default());
    let policy =
        PolicyVersion { kind: "RateLimitPolicy", name: ObjectName::new(&ns, "limits"), generation: 1 };
    snapshot.carry(policy, type_url::LISTENER);
    let current = snapshot.version(type_url::LISTENER);
    world.cache.set_compiler(Arc::new(move |_: &Proxy| snapshot.clone()));
    let proxy = Proxy::from_node_id(&format!("{ns}/api-1")).expect("node id");
    let other = Proxy::from_node_id(&format!("{ns}/api-2")).expect("node id");
    let _streams = [world.cache.connect(&proxy), world.cache.connect(&other)];
    for proxy in [&proxy, &other] {
        world.cache.subscribe(proxy, type_url::LISTENER);
    }
    let pending = world.reconcile(&ns, "limits").await;
    assert_eq!(
        programmed(&pending),
        ("False".into(), "Pending".into(), "waiting for 2/2 proxies to acknowledge".into())
    );

    // One of the two ACKs: still Pending, in the same words, so nothing is written.
    world.cache.ack(&other, type_url::LISTENER, &current);
    let after = world.reconcile(&ns, "limits").await;
    assert_eq!(
        after.resource_version(),
        pending.resource_version(),
        "no write for an ACK that changes no verdict"
    );

    world.cache.ack(&proxy, type_url::LISTENER, &current);
    let after = world.reconcile(&ns, "limits").await;
    assert_eq!(
        programmed(&after),
        ("True".into(), "Programmed".into(), "acknowledged by 2/2 proxies".into())
    );

    world.cache.nack(&proxy, type_url::LISTENER, &current, "invalid listener");
    let after = world.reconcile(&ns, "limits").await;
    let (status, reason, message) = programmed(&after);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Rejected"));
    assert!(message.contains(&format!("{ns}/api-1: invalid listener")), "{message}");
}
