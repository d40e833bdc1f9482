//! The live facts of a policy's status, from Redis: a CircuitBreakerPolicy's shared breakers
//! and a RateLimitPolicy's shadow counts, against the real API server and a real
//! `redis-server`. The breakers are driven in Redis with the agents' own store code
//! (`breakwater_store::breaker::RedisBreakers`: reports and probes, as agents make them),
//! the shadow counts written with `breakwater_store::shadow`'s keys. Most tests feed the
//! controller's stores and call `reconcile` themselves (as `lease_status.rs` does); one runs
//! an operator, whose followed breaker transitions reconcile the policy and become Events.

use std::{sync::Arc, time::Duration};

use breakwater_api::{
    CircuitBreakerPolicy, RateLimitPolicy,
    circuit_breaker::{BreakerState as Shown, BreakerStatus},
};
use breakwater_harness::{RedisServer, unique_prefix};
use breakwater_operator::{
    controller::{self, Context, Live, reconcile},
    http::State,
    lease::{self, RedisOptions},
    live::{self, BreakerReader, ShadowReader},
    policy::lock_lease::time,
    reflectors::Reflectors,
};
use breakwater_store::{
    RedisConnection, RedisSettings, RedisTopology,
    breaker::{BreakerState, BreakerStore, Outcomes, Params, RedisBreakers, State as Machine, Window},
    shadow::{self, RedisShadow},
};
use k8s_openapi::{
    api::{core::v1::Service, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::Condition,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject, ListParams, PostParams},
    runtime::{events::Reporter, watcher},
};
use serde::de::DeserializeOwned;

use super::{DEADLINE, OPERATOR, Operator, admin, eventually, kubectl_apply, namespace};

const POLICY: &str = "payments";

/// The Service both ports of which the policy's breaker section covers.
const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: payments}\n\
                       spec: {ports: [{name: http, port: 8080}, {name: admin, port: 9090}]}\n";

/// A CircuitBreakerPolicy with a breaker on the payments Service (`section`: one port).
fn circuit_breaker(section: Option<&str>) -> String {
    let section = section.map(|s| format!(", sectionName: {s}")).unwrap_or_default();
    format!(
        "apiVersion: breakwater.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {{name: {POLICY}}}\n\
         spec:\n  targetRefs: [{{kind: Service, name: payments{section}}}]\n  timeout: 10s\n  breaker:\n    \
         failureRateThreshold: 50\n    slowCall: {{duration: 2s, rateThreshold: 80}}\n    \
         slidingWindow: {{type: Count, size: 100}}\n    minimumCalls: 10\n    openDuration: 1s\n    \
         halfOpenCalls: 2\n"
    )
}

/// The policy's breaker section as every agent runs it.
fn params() -> Params {
    Params {
        failure_rate: 50,
        slow_call_us: Some(2_000_000),
        slow_rate: 80,
        window: Window::Count { size: 100 },
        minimum_calls: 10,
        open_us: 1_000_000,
        half_open_calls: 2,
    }
}

fn yaml<T: DeserializeOwned>(text: &str) -> T {
    serde_saphyr::from_str(text).expect("fixture parses")
}

async fn connection(redis: &RedisServer) -> RedisConnection {
    RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(redis.url()))).await.expect("redis")
}

/// What an agent steps the breakers with.
async fn agent(redis: &RedisServer, prefix: &str) -> RedisBreakers {
    RedisBreakers::new(connection(redis).await, prefix, Duration::from_secs(2))
}

fn options(redis: &RedisServer, prefix: &str) -> RedisOptions {
    RedisOptions { topology: RedisTopology::Standalone(redis.url()), key_prefix: prefix.into() }
}

/// The operator's readers of the breakers and shadow counts, as `run` opens them.
async fn live_readers(redis: &RedisServer, prefix: &str) -> Live {
    let store = lease::open(&options(redis, prefix)).await.expect("the operator's Redis");
    let (breakers, shadow) = live::open(&store);
    Live { breakers: Some(breakers as Arc<dyn BreakerReader>), shadow: Some(shadow as Arc<dyn ShadowReader>) }
}

fn failures(calls: u32, failures: u32, slow: u32) -> Outcomes {
    Outcomes { calls, failures, slow, bad: failures.max(slow) }
}

/// Probes until one is admitted: the breaker turns HALF_OPEN once its open duration has
/// passed on Redis's clock, at the first call after it.
async fn probe_until_admitted(agent: &RedisBreakers, id: &str) -> BreakerState {
    eventually("a probe is admitted once the breaker is half-open", DEADLINE, || async {
        match agent.probe(id, &params()).await.map_err(|e| e.to_string())? {
            (true, state) => Ok(state),
            (false, state) => Err(format!("refused: {state:?}")),
        }
    })
    .await
}

/// A namespace of its own on the real API server with the payments Service, and the
/// controller's context over stores the test feeds.
struct World {
    client: Client,
    ns: String,
    reflectors: Reflectors,
    ctx: Arc<Context>,
}

impl World {
    async fn new(live: Live) -> Self {
        let client = admin().await;
        let ns = namespace("live", &[]);
        let reflectors = Reflectors::default();
        let options = controller::Options {
            // No check here looks at the root namespace; it need not exist.
            root_namespace: "breakwater-system".into(),
            reporter: Reporter { controller: "breakwater-operator".into(), instance: Some("test".into()) },
            state: Arc::new(State::default()),
            cache: None,
            leases: None,
        };
        let ctx = Arc::new(Context::new(client.clone(), reflectors.clone(), options).with_live(live));
        let world = Self { client, ns, reflectors, ctx };
        world.create_service(SERVICE).await;
        world
    }

    async fn create_service(&self, yaml_text: &str) {
        let api: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        let created = api.create(&PostParams::default(), &yaml(yaml_text)).await.expect("create service");
        self.reflectors.services.apply(watcher::Event::Apply(created));
    }

    fn breaker_id(&self, port: u16) -> String {
        format!("{}/payments:{port}", self.ns)
    }

    async fn create<K>(&self, object: K) -> K
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + DeserializeOwned
            + serde::Serialize,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), &self.ns);
        api.create(&PostParams::default(), &object).await.expect("the API server accepts it")
    }

    /// Reconciles the CircuitBreakerPolicy as the API holds it now; returns it afterwards.
    async fn reconcile_breaker(&self) -> CircuitBreakerPolicy {
        let api: Api<CircuitBreakerPolicy> = Api::namespaced(self.client.clone(), &self.ns);
        let current = api.get(POLICY).await.expect("policy exists");
        self.reflectors.circuit_breakers.apply(watcher::Event::Apply(current.clone()));
        reconcile(Arc::new(current), self.ctx.clone()).await.expect("reconcile succeeds");
        api.get(POLICY).await.expect("policy exists")
    }

    async fn reconcile_rate_limit(&self, name: &str) -> RateLimitPolicy {
        let api: Api<RateLimitPolicy> = Api::namespaced(self.client.clone(), &self.ns);
        let current = api.get(name).await.expect("policy exists");
        self.reflectors.rate_limits.apply(watcher::Event::Apply(current.clone()));
        reconcile(Arc::new(current), self.ctx.clone()).await.expect("reconcile succeeds");
        api.get(name).await.expect("policy exists")
    }

    /// The top-level fields of a stored status (untyped: an absent field is not a default).
    async fn stored_status<K: Resource<DynamicType = ()>>(&self, name: &str) -> Vec<String> {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.ns, &ApiResource::erase::<K>(&()));
        let object = api.get(name).await.expect("object exists");
        object.data["status"].as_object().map(|s| s.keys().cloned().collect()).unwrap_or_default()
    }
}

fn conditions_of(conditions: Option<&Vec<Condition>>, type_: &str) -> (String, String, String) {
    conditions
        .and_then(|all| all.iter().find(|c| c.type_ == type_))
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
        .unwrap_or_default()
}

fn tripped(policy: &CircuitBreakerPolicy) -> (String, String, String) {
    conditions_of(policy.status.as_ref().map(|s| &s.conditions), "Tripped")
}

fn breakers(policy: &CircuitBreakerPolicy) -> Vec<BreakerStatus> {
    policy.status.as_ref().map(|s| s.breakers.clone()).unwrap_or_default()
}

fn status(
    ns: &str,
    port: u32,
    state: Shown,
    rates: (Option<u32>, Option<u32>),
    calls: u64,
    since_us: i64,
) -> BreakerStatus {
    BreakerStatus {
        service: format!("{ns}/payments"),
        port,
        state,
        failure_rate: rates.0,
        slow_call_rate: rates.1,
        calls,
        last_transition_time: (since_us > 0).then(|| time(since_us)),
    }
}

#[tokio::test]
async fn breaker_status_follows_the_window_the_transitions_and_redis_outages() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("breaker");
    let agent = agent(&redis, &prefix).await;
    let world = World::new(live_readers(&redis, &prefix).await).await;
    let (ns, id) = (world.ns.clone(), world.breaker_id(8080));
    world.create::<CircuitBreakerPolicy>(yaml(&circuit_breaker(None))).await;

    // Never written: CLOSED, no window, no transition.
    let fresh = world.reconcile_breaker().await;
    assert_eq!(
        breakers(&fresh),
        [
            status(&ns, 8080, Shown::Closed, (None, None), 0, 0),
            status(&ns, 9090, Shown::Closed, (None, None), 0, 0)
        ]
    );
    assert_eq!(tripped(&fresh), ("False".into(), "Closed".into(), "all 2 breakers are CLOSED".into()));

    // Calls below minimumCalls: still CLOSED, the window's rates shown (25 %, 12.5 % → 12).
    let closed = agent.report(&id, &params(), failures(8, 2, 1)).await.expect("report");
    assert_eq!(closed.state, Machine::Closed);
    let windowed = world.reconcile_breaker().await;
    assert_eq!(breakers(&windowed)[0], status(&ns, 8080, Shown::Closed, (Some(25), Some(12)), 8, 0));

    // Nothing changed: nothing is written.
    let again = world.reconcile_breaker().await;
    assert_eq!(again.resource_version(), windowed.resource_version(), "no write without a change");

    // 10 of 18 calls failed: OPEN, since Redis's time of the report. It shows the rates of
    // the window that opened it (55 %, 1 slow of 18 → 5 %) while OPEN and HALF_OPEN.
    let opened = agent.report(&id, &params(), failures(10, 8, 0)).await.expect("report");
    assert_eq!(opened.state, Machine::Open);
    let open = world.reconcile_breaker().await;
    assert_eq!(breakers(&open)[0], status(&ns, 8080, Shown::Open, (Some(55), Some(5)), 18, opened.since_us));
    assert_eq!(breakers(&open)[1], status(&ns, 9090, Shown::Closed, (None, None), 0, 0), "its own breaker");
    assert_eq!(
        tripped(&open),
        (
            "True".into(),
            "Open".into(),
            format!("1 of 2 breakers is OPEN, answered 503 by every caller: {id}")
        )
    );

    // The open duration passes; the first call after it makes it HALF_OPEN.
    let half_open = probe_until_admitted(&agent, &id).await;
    assert_eq!(half_open.state, Machine::HalfOpen);
    let probing = world.reconcile_breaker().await;
    assert_eq!(
        breakers(&probing)[0],
        status(&ns, 8080, Shown::HalfOpen, (Some(55), Some(5)), 18, half_open.since_us)
    );
    assert_eq!(tripped(&probing).1, "HalfOpen");

    // Both probes succeed: CLOSED again, with a fresh window.
    let (admitted, _) = agent.probe(&id, &params()).await.expect("probe");
    assert!(admitted, "the second probe of two");
    let recovered =
        agent.report(&id, &params(), Outcomes { calls: 2, ..Outcomes::default() }).await.expect("report");
    assert_eq!(recovered.state, Machine::Closed);
    let closed_again = world.reconcile_breaker().await;
    assert_eq!(
        breakers(&closed_again)[0],
        status(&ns, 8080, Shown::Closed, (None, None), 0, recovered.since_us)
    );
    assert_eq!(tripped(&closed_again).1, "Closed");
    assert!(world.stored_status::<CircuitBreakerPolicy>(POLICY).await.contains(&"breakers".to_string()));

    // Redis dies: the breakers are left out (the API server drops what the operator no longer
    // applies), and Tripped says why.
    redis.kill();
    let unknown = world.reconcile_breaker().await;
    assert_eq!(breakers(&unknown), []);
    let (status_, reason, message) = tripped(&unknown);
    assert_eq!((status_.as_str(), reason.as_str()), ("Unknown", "StoreUnavailable"));
    assert!(message.starts_with("cannot read the breakers from Redis: "), "{message}");
    assert!(!world.stored_status::<CircuitBreakerPolicy>(POLICY).await.contains(&"breakers".to_string()));
}

#[tokio::test]
async fn without_redis_tripped_is_unknown_and_no_breaker_is_shown() {
    let world = World::new(Live::default()).await;
    world.create::<CircuitBreakerPolicy>(yaml(&circuit_breaker(Some("http")))).await;
    let policy = world.reconcile_breaker().await;
    let (status_, reason, message) = tripped(&policy);
    assert_eq!((status_.as_str(), reason.as_str()), ("Unknown", "NoStore"));
    assert!(message.contains("--redis-url"), "{message}");
    assert_eq!(breakers(&policy), []);
    let mut stored = world.stored_status::<CircuitBreakerPolicy>(POLICY).await;
    stored.sort();
    assert_eq!(stored, ["conditions", "targets"]);
}

/// Every Event about `name` in `namespace`: (reason, type, note).
async fn events(client: &Client, namespace: &str, name: &str) -> Vec<(String, String, String)> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let list = api.list(&ListParams::default()).await.expect("list events");
    list.items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.type_.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

/// Waits for an Event of `reason` about the policy; returns (type, note).
async fn event(client: &Client, namespace: &str, reason: &str) -> (String, String) {
    eventually(&format!("a {reason} Event"), DEADLINE, || async {
        let all = events(client, namespace, POLICY).await;
        all.iter()
            .find(|(r, ..)| r == reason)
            .map(|(_, type_, note)| (type_.clone(), note.clone()))
            .ok_or_else(|| format!("{all:?}"))
    })
    .await
}

/// Waits until the policy's first breaker satisfies `check`.
async fn breaker_until(
    api: &Api<CircuitBreakerPolicy>,
    what: &str,
    within: Duration,
    check: impl Fn(&BreakerStatus) -> bool,
) -> CircuitBreakerPolicy {
    eventually(what, within, || async {
        let policy = api.get(POLICY).await.map_err(|e| e.to_string())?;
        match breakers(&policy).first() {
            Some(shown) if check(shown) => Ok(policy),
            _ => Err(format!("{:?}", policy.status)),
        }
    })
    .await
}

#[tokio::test]
async fn an_operator_follows_transitions_into_the_status_and_announces_each_with_an_event() {
    let _one_operator = OPERATOR.lock().await;
    let redis = RedisServer::start();
    let prefix = unique_prefix("transitions");
    let client = admin().await;
    let ns = namespace("transitions", &[]);
    kubectl_apply(&ns, SERVICE);
    kubectl_apply(&ns, &circuit_breaker(Some("http")));
    let redis_options = options(&redis, &prefix);
    let operator = Operator::start_with(client.clone(), &namespace("transitions-root", &[]), |o| {
        o.redis = Some(redis_options);
    });
    let api: Api<CircuitBreakerPolicy> = Api::namespaced(client.clone(), &ns);
    let closed =
        breaker_until(&api, "the breaker shows CLOSED", DEADLINE, |b| b.state == Shown::Closed).await;
    assert_eq!(breakers(&closed).len(), 1, "sectionName http: one port");
    let id = format!("{ns}/payments:8080");
    let agent = agent(&redis, &prefix).await;

    // The transitions publish events; the operator reconciles on them, well within the 30 s
    // refresh it also does.
    let within = Duration::from_secs(15);
    let opened = agent.report(&id, &params(), failures(20, 12, 0)).await.expect("report");
    assert_eq!(opened.state, Machine::Open);
    let open = breaker_until(&api, "the breaker shows OPEN", within, |b| {
        b.state == Shown::Open && b.last_transition_time == Some(time(opened.since_us))
    })
    .await;
    assert_eq!(tripped(&open).1, "Open");
    let (type_, note) = event(&client, &ns, "BreakerOpened").await;
    assert_eq!(type_, "Warning");
    assert!(note.starts_with(&format!("breaker {id} of Service {ns}/payments port 8080 opened: ")), "{note}");
    assert!(note.contains("opened: 60% of 20 calls failed, 0% slow;"), "the rates that opened it: {note}");

    probe_until_admitted(&agent, &id).await;
    assert!(agent.probe(&id, &params()).await.expect("probe").0, "the second probe of two");
    let recovered =
        agent.report(&id, &params(), Outcomes { calls: 2, ..Outcomes::default() }).await.expect("report");
    assert_eq!(recovered.state, Machine::Closed);
    let closed = breaker_until(&api, "the breaker shows CLOSED again", within, |b| {
        b.state == Shown::Closed && b.last_transition_time == Some(time(recovered.since_us))
    })
    .await;
    assert_eq!(tripped(&closed).1, "Closed");
    let (type_, note) = event(&client, &ns, "BreakerHalfOpen").await;
    assert_eq!(type_, "Normal");
    assert!(note.contains("2 probe calls across all callers decide"), "{note}");
    let (type_, note) = event(&client, &ns, "BreakerClosed").await;
    assert_eq!(
        (type_.as_str(), note),
        (
            "Normal",
            format!("breaker {id} of Service {ns}/payments port 8080 closed: its probe calls succeeded")
        )
    );
    operator.stop().await;
}

/// A RateLimitPolicy with a counted shadow limit, an enforced one, and a shadow limit of
/// scope Pod (Envoy's own, which nothing counts in Redis).
const RATE_LIMIT: &str = r#"
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: limits}
spec:
  targetRefs: [{kind: Service, name: payments, sectionName: http}]
  limits:
  - {name: per-user, key: [{header: x-user-id}], rate: {requests: 100, per: 1m}}
  - {name: per-user-trial, key: [{header: x-user-id}], rate: {requests: 10, per: 1m}, shadow: true}
  - {name: pod-trial, rate: {requests: 5, per: 1s}, scope: Pod, shadow: true}
"#;

/// The minute index (seconds / 60) by Redis's clock.
fn redis_minute(redis: &RedisServer) -> i64 {
    let time = redis.cli(&["TIME"]);
    let seconds: i64 = time.split_whitespace().next().and_then(|s| s.parse().ok()).expect("TIME");
    seconds / 60
}

fn would_reject(policy: &RateLimitPolicy) -> (String, String, String) {
    conditions_of(policy.status.as_ref().map(|s| &s.conditions), "WouldReject")
}

#[tokio::test]
async fn shadow_counts_of_the_last_complete_minute_show_in_the_status() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("shadow");
    let world = World::new(live_readers(&redis, &prefix).await).await;
    world.create::<RateLimitPolicy>(yaml(RATE_LIMIT)).await;
    let rule = format!("{}/limits/per-user-trial", world.ns);
    let agents = RedisShadow::new(connection(&redis).await, prefix.as_str(), Duration::from_secs(2));

    // What the agents counted in the previous minute shows; what they count in the current
    // one does not yet. The minute may turn between writing and reading: then write again.
    let (policy, minute) = eventually("the previous minute's count is read", DEADLINE, || async {
        let minute = redis_minute(&redis);
        let field = (minute - 1).to_string();
        redis.cli(&["HSET", &shadow::shadow_key(&prefix, &rule), &field, "42"]);
        agents.add(&rule, 5).await.map_err(|e| e.to_string())?;
        let policy = world.reconcile_rate_limit("limits").await;
        if redis_minute(&redis) == minute { Ok((policy, minute)) } else { Err("the minute turned".into()) }
    })
    .await;
    let shown = policy.status.as_ref().map(|s| s.shadow.clone()).unwrap_or_default();
    let window_start = time(shadow::minute_start_us(minute - 1));
    assert_eq!(shown.len(), 1, "only the counted shadow limit: {shown:?}");
    assert_eq!((shown[0].limit.as_str(), shown[0].would_reject), ("per-user-trial", 42));
    assert_eq!(shown[0].window_start, window_start);
    assert_eq!(
        would_reject(&policy),
        (
            "True".into(),
            "WouldReject".into(),
            format!(
                "would have rejected 42 requests in the minute from {}, cluster-wide: per-user-trial 42",
                window_start.0
            )
        )
    );

    // Redis dies: the counts are left out, and the condition says why.
    redis.kill();
    let unknown = world.reconcile_rate_limit("limits").await;
    assert_eq!(unknown.status.as_ref().map(|s| s.shadow.len()), Some(0));
    let (status_, reason, _) = would_reject(&unknown);
    assert_eq!((status_.as_str(), reason.as_str()), ("Unknown", "StoreUnavailable"));
    assert!(!world.stored_status::<RateLimitPolicy>("limits").await.contains(&"shadow".to_string()));
}
