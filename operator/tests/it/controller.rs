//! The reconcilers against an in-memory API server (kube-fake-client): status is written by
//! server-side apply, conditions follow the world, Events mark transitions.

use std::sync::Arc;

use breakwater_api::{CircuitBreakerPolicy, OutboxRelay, RateLimitPolicy};
use breakwater_operator::{
    compile::{PolicyVersion, Proxy, Snapshot, type_url},
    inventory::ObjectName,
    xds::{SnapshotCache, cache::version},
};
use breakwater_operator::{
    controller::{Context, Kind, reconcile},
    http::State,
};
use envoy_types::pb::google::protobuf::Any;
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Secret, Service},
        events::v1::Event,
    },
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PostParams},
    runtime::{
        events::Reporter,
        reflector::{self, store::Writer},
        watcher,
    },
};
use kube_fake_client::ClientBuilder;
use serde::de::DeserializeOwned;

const ROOT: &str = "breakwater-system";

fn yaml<T: DeserializeOwned>(text: &str) -> T {
    serde_saphyr::from_str(text).expect("test fixture parses")
}

fn service(namespace: &str, name: &str) -> Service {
    yaml(&format!(
        "metadata: {{name: {name}, namespace: {namespace}}}\nspec: {{ports: [{{name: http, port: 80}}]}}"
    ))
}

fn rate_limit(namespace: &str, extra: &str) -> RateLimitPolicy {
    yaml(&format!(
        r#"
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata: {{name: limits, namespace: {namespace}, generation: 1}}
spec:
  {extra}
  limits:
  - name: per-user
    key: [{{header: x-user-id}}]
    rate: {{requests: 100, per: 1m}}
"#
    ))
}

/// A world: the fake API holding the objects, and stores the test feeds by hand (the
/// controller's watches would feed them in a cluster).
struct World<K: Kind> {
    client: Client,
    policies: Writer<K>,
    services: Writer<Service>,
    ctx: Arc<Context<K>>,
    cache: Arc<SnapshotCache>,
}

impl<K: Kind> World<K> {
    async fn new(objects: Vec<K>, services: Vec<Service>, extra: ClientBuilder) -> Self {
        let mut builder = extra.with_resource::<K>().with_return_managed_fields();
        for object in &objects {
            builder = builder.with_object(object.clone());
        }
        for service in &services {
            builder = builder.with_object(service.clone());
        }
        let client = builder.build().await.expect("fake client builds");
        let (policy_reader, mut policies) = reflector::store::<K>();
        let (service_reader, mut service_writer) = reflector::store::<Service>();
        let (namespace_reader, _namespaces) = reflector::store::<Namespace>();
        let cache = Arc::new(SnapshotCache::default());
        for object in objects {
            policies.apply_watcher_event(&watcher::Event::Apply(object));
        }
        for service in services {
            service_writer.apply_watcher_event(&watcher::Event::Apply(service));
        }
        let reporter = Reporter { controller: "breakwater-operator".into(), instance: Some("test".into()) };
        let ctx = Arc::new(Context::new(
            client.clone(),
            ROOT.into(),
            (policy_reader, service_reader, namespace_reader),
            reporter,
            Arc::new(State::default()),
            Some(cache.clone()),
        ));
        Self { client, policies, services: service_writer, ctx, cache }
    }

    fn api(&self, namespace: &str) -> Api<K> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Reconciles the object as the API holds it now, and returns it afterwards.
    async fn reconcile(&mut self, namespace: &str, name: &str) -> K {
        let current = self.api(namespace).get(name).await.expect("object exists");
        self.policies.apply_watcher_event(&watcher::Event::Apply(current.clone()));
        reconcile(Arc::new(current), self.ctx.clone()).await.expect("reconcile succeeds");
        self.api(namespace).get(name).await.expect("object exists")
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
    let policy = rate_limit("shop", "targetRefs: [{kind: Service, name: api}]");
    let mut world = World::new(vec![policy], vec![service("shop", "api")], ClientBuilder::new()).await;
    let after = world.reconcile("shop", "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "Accepted"), ("True".into(), "Accepted".into(), Some(1)));
    assert_eq!(condition(&conditions, "ResolvedRefs"), ("True".into(), "ResolvedRefs".into(), Some(1)));
    assert_eq!(condition(&conditions, "Programmed"), ("False".into(), "Pending".into(), Some(1)));
    assert_eq!(after.status.as_ref().map(|s| s.targets), Some(1));
    let managers: Vec<String> = after.managed_fields().iter().filter_map(|m| m.manager.clone()).collect();
    assert!(managers.contains(&"breakwater-operator".to_string()), "status written by SSA: {managers:?}");
}

#[tokio::test]
async fn missing_target_then_appearing_target() {
    let policy = rate_limit("shop", "targetRefs: [{kind: Service, name: api}]");
    let mut world = World::new(vec![policy], vec![], ClientBuilder::new()).await;
    let after = world.reconcile("shop", "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "ResolvedRefs"), ("False".into(), "TargetNotFound".into(), Some(1)));
    let message = &conditions.iter().find(|c| c.type_ == "ResolvedRefs").expect("present").message;
    assert_eq!(message, "Service shop/api not found");
    let first_transition = conditions[1].last_transition_time.clone();

    // The Service appears: the controller's Service watch feeds the store and re-triggers.
    let api: Api<Service> = Api::namespaced(world.client.clone(), "shop");
    let created = api.create(&PostParams::default(), &service("shop", "api")).await.expect("create service");
    world.services.apply_watcher_event(&watcher::Event::Apply(created));
    let after = world.reconcile("shop", "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "ResolvedRefs"), ("True".into(), "ResolvedRefs".into(), Some(1)));
    assert!(conditions[1].last_transition_time.0 >= first_transition.0);

    // Events record both transitions of ResolvedRefs (Warning, then Normal).
    let events: Api<Event> = Api::all(world.client.clone());
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.contains(&"TargetNotFound".to_string()), "{reasons:?}");
    assert!(reasons.contains(&"ResolvedRefs".to_string()), "{reasons:?}");
}

#[tokio::test]
async fn spec_change_moves_observed_generation() {
    let policy = rate_limit("shop", "targetRefs: [{kind: Service, name: api}]");
    let mut world = World::new(vec![policy], vec![service("shop", "api")], ClientBuilder::new()).await;
    world.reconcile("shop", "limits").await;

    let api = world.api("shop");
    let mut changed = api.get("limits").await.expect("get");
    changed.spec.limits[0].rate.requests = 50;
    // The fake API does not bump generation on a spec change; the API server would.
    changed.metadata.generation = Some(2);
    api.replace("limits", &PostParams::default(), &changed).await.expect("replace");
    let after = world.reconcile("shop", "limits").await;
    let conditions = rl_conditions(&after);
    for type_ in ["Accepted", "ResolvedRefs", "Programmed"] {
        assert_eq!(condition(&conditions, type_).2, Some(2), "{type_}");
    }
}

#[tokio::test]
async fn override_outside_root_namespace_is_refused() {
    let policy = rate_limit("shop", "namespaceSelector: {}\n  mode: Override");
    let mut world = World::new(vec![policy], vec![service("shop", "api")], ClientBuilder::new()).await;
    let after = world.reconcile("shop", "limits").await;
    let conditions = rl_conditions(&after);
    assert_eq!(condition(&conditions, "Accepted"), ("False".into(), "RootNamespaceOnly".into(), Some(1)));
    assert_eq!(after.status.as_ref().map(|s| s.targets), Some(0));

    // The same policy in the root namespace is accepted and selects the shop's Service.
    let root_policy = rate_limit(ROOT, "namespaceSelector: {}\n  mode: Override");
    let mut world = World::new(vec![root_policy], vec![service("shop", "api")], ClientBuilder::new()).await;
    let after = world.reconcile(ROOT, "limits").await;
    assert_eq!(condition(&rl_conditions(&after), "Accepted").0, "True");
    assert_eq!(after.status.as_ref().map(|s| s.targets), Some(1));
}

#[tokio::test]
async fn unchanged_status_is_not_rewritten() {
    let policy = rate_limit("shop", "targetRefs: [{kind: Service, name: api}]");
    let mut world = World::new(vec![policy], vec![service("shop", "api")], ClientBuilder::new()).await;
    let first = world.reconcile("shop", "limits").await;
    let second = world.reconcile("shop", "limits").await;
    assert_eq!(first.resource_version(), second.resource_version(), "no write when nothing changed");
}

#[tokio::test]
async fn conflicting_circuit_breakers_older_wins() {
    let policy = |name: &str, created: &str| -> CircuitBreakerPolicy {
        yaml(&format!(
            r#"
apiVersion: breakwater.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {{name: {name}, namespace: shop, generation: 1, creationTimestamp: "{created}"}}
spec:
  targetRefs: [{{kind: Service, name: api}}]
  timeout: 5s
"#
        ))
    };
    let older = policy("older", "2026-01-01T00:00:00Z");
    let newer = policy("newer", "2026-02-01T00:00:00Z");
    let mut world = World::new(vec![older, newer], vec![service("shop", "api")], ClientBuilder::new()).await;
    let winner = world.reconcile("shop", "older").await;
    let loser = world.reconcile("shop", "newer").await;
    let conds =
        |p: &CircuitBreakerPolicy| p.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    assert_eq!(condition(&conds(&winner), "Accepted").1, "Accepted");
    assert_eq!(condition(&conds(&loser), "Accepted"), ("False".into(), "Conflicted".into(), Some(1)));
}

#[tokio::test]
async fn outbox_relay_secret_resolution() {
    let relay: OutboxRelay = yaml(
        r#"
apiVersion: breakwater.dev/v1alpha1
kind: OutboxRelay
metadata: {name: orders, namespace: shop, generation: 1}
spec:
  source: {postgres: {connectionSecretRef: {name: orders-db, key: url}, table: outbox}}
  sink: {redisStream: {stream: events}}
"#,
    );
    let mut world = World::new(vec![relay], vec![], ClientBuilder::new()).await;
    let conds = |p: &OutboxRelay| p.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    let after = world.reconcile("shop", "orders").await;
    assert_eq!(condition(&conds(&after), "ResolvedRefs").1, "SecretNotFound");

    let secrets: Api<Secret> = Api::namespaced(world.client.clone(), "shop");
    let wrong_key: Secret = yaml("metadata: {name: orders-db, namespace: shop}\nstringData: {dsn: x}");
    secrets.create(&PostParams::default(), &wrong_key).await.expect("create secret");
    let after = world.reconcile("shop", "orders").await;
    assert_eq!(condition(&conds(&after), "ResolvedRefs").1, "SecretKeyNotFound");

    let mut right_key: Secret = secrets.get("orders-db").await.expect("get secret");
    right_key.string_data = Some([("url".to_string(), "postgres://x".to_string())].into());
    secrets.replace("orders-db", &PostParams::default(), &right_key).await.expect("replace secret");
    let after = world.reconcile("shop", "orders").await;
    assert_eq!(condition(&conds(&after), "ResolvedRefs"), ("True".into(), "ResolvedRefs".into(), Some(1)));
}

#[tokio::test]
async fn programmed_follows_the_proxies_acknowledgements() {
    let policy = rate_limit("shop", "targetRefs: [{kind: Service, name: api}]");
    let mut world = World::new(vec![policy], vec![service("shop", "api")], ClientBuilder::new()).await;
    let programmed = |p: &RateLimitPolicy| {
        let c = rl_conditions(p).into_iter().find(|c| c.type_ == "Programmed").expect("Programmed");
        (c.status, c.reason, c.message)
    };
    let after = world.reconcile("shop", "limits").await;
    assert_eq!(programmed(&after).2, "no connected proxy carries this policy yet");

    // A proxy backing the Service connects; its snapshot carries the policy.
    let snapshot = Snapshot {
        resources: [(type_url::LISTENER, [("inbound".to_string(), Any::default())].into())].into(),
        policies: [PolicyVersion {
            kind: "RateLimitPolicy",
            name: ObjectName::new("shop", "limits"),
            generation: 1,
        }]
        .into(),
    };
    let current = version(&snapshot, type_url::LISTENER, None);
    world.cache.set_compiler(Arc::new(move |_: &Proxy| snapshot.clone()));
    let proxy = Proxy::from_node_id("shop/api-1").expect("node id");
    let _stream = world.cache.connect(&proxy);
    world.cache.subscribe(&proxy, type_url::LISTENER, None);
    let after = world.reconcile("shop", "limits").await;
    assert_eq!(programmed(&after), ("False".into(), "Pending".into(), "acknowledged by 0/1 proxies".into()));

    world.cache.ack(&proxy, type_url::LISTENER, &current);
    let after = world.reconcile("shop", "limits").await;
    assert_eq!(
        programmed(&after),
        ("True".into(), "Programmed".into(), "acknowledged by 1/1 proxies".into())
    );

    world.cache.nack(&proxy, type_url::LISTENER, &current, "invalid listener");
    let after = world.reconcile("shop", "limits").await;
    let (status, reason, message) = programmed(&after);
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Rejected"));
    assert!(message.contains("shop/api-1: invalid listener"), "{message}");
}
