//! LockLease status from Redis: the controller against an in-memory API server
//! (kube-fake-client) and a real `redis-server` (breakwater-harness), with grants made by
//! the agent's own store code, as an agent would make them. Also the lease events that
//! trigger reconciles, resubscribed after Redis comes back.

use std::{borrow::Cow, sync::Arc, time::Duration};

use breakwater_agent::{
    lease::{Attempt, Grant, LeaseStore, redis::RedisLeases},
    store::{RedisSettings, RedisStore, RedisTopology},
};
use breakwater_api::LockLease;
use breakwater_harness::{RedisCluster, RedisServer, unique_prefix};
use breakwater_operator::{
    controller::{Context, reconcile},
    http::State,
    lease::{self, Backoff, LeaseReader, RedisOptions},
    policy::lock_lease::time,
    standalone,
};
use futures::StreamExt;
use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Namespace, Service},
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta},
};
use kube::{
    Api, Resource, ResourceExt,
    api::PostParams,
    runtime::{
        events::Reporter,
        reflector::{self, store::Writer},
        watcher,
    },
};
use kube_fake_client::{ClientBuilder, PatchType, interceptor};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(10);
const ID: &str = "billing/invoice-run";
const HOLDER: &str = "billing-worker-0/3f2a";

fn lock_lease(holders: u32) -> LockLease {
    serde_saphyr::from_str(&format!(
        r#"
apiVersion: breakwater.dev/v1alpha1
kind: LockLease
metadata: {{name: invoice-run, namespace: billing, generation: 1}}
spec:
  ttl: 30s
  holders: {holders}
  podSelector: {{matchLabels: {{app: billing-worker}}}}
"#
    ))
    .expect("fixture parses")
}

/// What an agent uses to grant leases: the agent's Redis store code.
async fn agent_store(redis: &RedisServer, prefix: &str) -> RedisLeases {
    let store = RedisStore::start(RedisSettings::new(RedisTopology::Standalone(redis.url())))
        .await
        .expect("redis store");
    RedisLeases::new(store, prefix, Duration::from_secs(2))
}

async fn grant(agent: &RedisLeases, holder: &str, ttl: Duration, capacity: u32) -> Grant {
    match agent.try_acquire(ID, holder, ttl, capacity, 0).await.expect("acquire") {
        Attempt::Granted(grant) => grant,
        busy => panic!("not granted: {busy:?}"),
    }
}

/// A LockLease as untyped JSON, for the fake client's typed calls that need `Default`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLease {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

impl Default for RawLease {
    fn default() -> Self {
        Self {
            api_version: "breakwater.dev/v1alpha1".into(),
            kind: "LockLease".into(),
            metadata: ObjectMeta::default(),
            rest: serde_json::Map::new(),
        }
    }
}

impl Resource for RawLease {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;
    fn kind(_: &()) -> Cow<'_, str> {
        LockLease::kind(&())
    }
    fn group(_: &()) -> Cow<'_, str> {
        LockLease::group(&())
    }
    fn version(_: &()) -> Cow<'_, str> {
        LockLease::version(&())
    }
    fn plural(_: &()) -> Cow<'_, str> {
        LockLease::plural(&())
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// kube-fake-client merges an apply patch like a JSON merge patch, so a field the operator
/// stops applying would stay. A real API server removes it: the operator is the only
/// manager of the status, so its (forced) apply replaces the status as a whole — which is
/// what this interceptor does.
fn apply_replaces_the_status() -> interceptor::Funcs {
    interceptor::Funcs::new().patch_status(|ctx| {
        if ctx.patch_type != PatchType::ApplyPatch {
            return Ok(None);
        }
        let mut lease: RawLease = ctx.client.get(ctx.namespace, ctx.name)?;
        let status = ctx.patch.get("status").cloned().unwrap_or_default();
        lease.rest.insert("status".into(), status);
        let updated = ctx.client.update_status(ctx.namespace, &lease, &PostParams::default())?;
        Ok(Some(serde_json::to_value(updated)?))
    })
}

/// The fake API holding the LockLease, and the controller's context reading `leases`.
struct World {
    api: Api<LockLease>,
    store: Writer<LockLease>,
    ctx: Arc<Context<LockLease>>,
}

impl World {
    async fn new(lease: LockLease, leases: Option<Arc<dyn LeaseReader>>) -> Self {
        let client = ClientBuilder::new()
            .with_resource::<LockLease>()
            .with_interceptor_funcs(apply_replaces_the_status())
            .with_object(lease.clone())
            .build()
            .await
            .expect("fake client builds");
        let (reader, mut store) = reflector::store::<LockLease>();
        store.apply_watcher_event(&watcher::Event::Apply(lease));
        let (services, _) = reflector::store::<Service>();
        let (namespaces, _) = reflector::store::<Namespace>();
        let reporter = Reporter { controller: "breakwater-operator".into(), instance: Some("test".into()) };
        let mut ctx = Context::new(
            client.clone(),
            "breakwater-system".into(),
            (reader, services, namespaces),
            reporter,
            Arc::new(State::default()),
            None,
        );
        if let Some(leases) = leases {
            ctx = ctx.with_leases(leases);
        }
        Self { api: Api::namespaced(client, "billing"), store, ctx: Arc::new(ctx) }
    }

    /// Reconciles the LockLease as the API holds it now; returns it afterwards.
    async fn reconcile(&mut self) -> LockLease {
        let current = self.api.get("invoice-run").await.expect("lease exists");
        self.store.apply_watcher_event(&watcher::Event::Apply(current.clone()));
        reconcile(Arc::new(current), self.ctx.clone()).await.expect("reconcile succeeds");
        self.api.get("invoice-run").await.expect("lease exists")
    }
}

fn held(lease: &LockLease) -> Condition {
    let conditions = lease.status.as_ref().map(|s| s.conditions.clone()).unwrap_or_default();
    conditions.into_iter().find(|c| c.type_ == "Held").expect("a Held condition")
}

fn held_is(lease: &LockLease) -> (String, String) {
    let c = held(lease);
    (c.status, c.reason)
}

async fn operator_reader(redis: &RedisServer, prefix: &str) -> Arc<dyn LeaseReader> {
    lease::connect(&RedisOptions {
        topology: RedisTopology::Standalone(redis.url()),
        key_prefix: prefix.into(),
    })
    .await
    .expect("reader")
}

#[tokio::test]
async fn status_follows_grants_releases_and_redis_outages() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("status");
    let agent = agent_store(&redis, &prefix).await;
    let mut world = World::new(lock_lease(1), Some(operator_reader(&redis, &prefix).await)).await;

    let free = world.reconcile().await;
    assert_eq!(held_is(&free), ("False".into(), "Free".into()));
    assert_eq!(held(&free).message, "free; never granted");
    let status = free.status.clone().expect("status");
    assert_eq!((status.holder, status.fencing_token, status.holders.len()), (None, None, 0));
    assert!(status.conditions.iter().any(|c| c.type_ == "Accepted" && c.status == "True"));

    // An agent grants the lease: holder, token and times, Held=True.
    let first = grant(&agent, HOLDER, Duration::from_secs(30), 1).await;
    let held_lease = world.reconcile().await;
    let status = held_lease.status.clone().expect("status");
    assert_eq!(status.holder.as_deref(), Some(HOLDER));
    assert_eq!(status.fencing_token, Some(first.fencing_token));
    assert_eq!(status.holders.len(), 1);
    let shown = &status.holders[0];
    assert_eq!((shown.holder.as_str(), shown.fencing_token), (HOLDER, first.fencing_token));
    assert_eq!(shown.acquired_at, time(first.acquired_at_us));
    assert_eq!(shown.renewed_at, Some(time(first.renewed_at_us)));
    assert_eq!(shown.expires_at, time(first.expires_at_us));
    assert_eq!(held_is(&held_lease), ("True".into(), "Held".into()));
    let expected =
        format!("held by {HOLDER} (token {}) until {}", first.fencing_token, time(first.expires_at_us).0);
    assert_eq!(held(&held_lease).message, expected);

    // Nothing changed: nothing is written.
    let again = world.reconcile().await;
    assert_eq!(again.resource_version(), held_lease.resource_version(), "no write without a change");

    // Released: Free, no holder, the last token still shown.
    agent.release(ID, HOLDER, first.fencing_token).await.expect("release");
    let released = world.reconcile().await;
    assert_eq!(held_is(&released), ("False".into(), "Free".into()));
    let status = released.status.clone().expect("status");
    assert_eq!(status.holder, None, "the holder is cleared");
    assert!(status.holders.is_empty(), "{:?}", status.holders);
    assert_eq!(status.fencing_token, Some(first.fencing_token));
    assert_eq!(
        held(&released).message,
        format!("free; the last grant had fencing token {}", first.fencing_token)
    );

    // Held again, then Redis dies: Held=Unknown/StoreUnavailable, the last holder kept.
    let second = grant(&agent, "billing-worker-1/77aa", Duration::from_secs(30), 1).await;
    assert!(second.fencing_token > first.fencing_token);
    let before = world.reconcile().await;
    assert_eq!(held_is(&before), ("True".into(), "Held".into()));
    redis.kill();
    let unknown = world.reconcile().await;
    assert_eq!(held_is(&unknown), ("Unknown".into(), "StoreUnavailable".into()));
    assert!(
        held(&unknown).message.starts_with("cannot read the lease from Redis: "),
        "{}",
        held(&unknown).message
    );
    let status = unknown.status.clone().expect("status");
    assert_eq!(status.holder.as_deref(), Some("billing-worker-1/77aa"), "last known holder kept");
    assert_eq!(status.fencing_token, Some(second.fencing_token));
    assert_eq!(status.holders, before.status.clone().expect("status").holders);
}

#[tokio::test]
async fn semaphore_slots_and_expiry_by_redis_time() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("semaphore");
    let agent = agent_store(&redis, &prefix).await;
    let reader = operator_reader(&redis, &prefix).await;
    let mut world = World::new(lock_lease(3), Some(reader.clone())).await;

    let long = grant(&agent, "w-0/a", Duration::from_secs(30), 3).await;
    let short = grant(&agent, "w-1/b", Duration::from_millis(1500), 3).await;
    let lease = world.reconcile().await;
    assert_eq!(held_is(&lease), ("True".into(), "Held".into()));
    let message = held(&lease).message;
    assert!(
        message.starts_with(&format!("2/3 slots held; newest by w-1/b (token {})", short.fencing_token)),
        "{message}"
    );
    let status = lease.status.clone().expect("status");
    let tokens: Vec<i64> = status.holders.iter().map(|g| g.fencing_token).collect();
    assert_eq!(tokens, [long.fencing_token, short.fencing_token]);
    assert_eq!(status.holder.as_deref(), Some("w-1/b"));

    // Nobody publishes an expiry: the controller requeues itself for it. Wait until Redis's
    // own clock has passed it, then the status shows one slot.
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while reader.state(ID).await.expect("state").grants.len() > 1 {
        assert!(tokio::time::Instant::now() < give_up, "the short grant never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lease = world.reconcile().await;
    let status = lease.status.clone().expect("status");
    assert_eq!(status.holders.iter().map(|g| g.holder.as_str()).collect::<Vec<_>>(), ["w-0/a"]);
    assert_eq!(status.holder.as_deref(), Some("w-0/a"));
    assert_eq!(status.fencing_token, Some(short.fencing_token), "the newest token granted");
    assert!(held(&lease).message.starts_with("1/3 slots held"), "{}", held(&lease).message);
}

#[tokio::test]
async fn without_redis_held_is_unknown() {
    let mut world = World::new(lock_lease(1), None).await;
    let lease = world.reconcile().await;
    assert_eq!(held_is(&lease), ("Unknown".into(), "NoStore".into()));
    assert!(held(&lease).message.contains("--redis-url"), "{}", held(&lease).message);
    let status = lease.status.clone().expect("status");
    assert_eq!((status.holder, status.fencing_token), (None, None));
}

#[test]
fn standalone_mode_reads_no_redis() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let loaded = standalone::load::load_dir(&examples, "breakwater-system").expect("examples load");
    let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let rows = standalone::evaluate(&loaded, None, &Default::default(), &now);
    let lease = rows.iter().find(|r| r.kind == "LockLease").expect("the examples declare a LockLease");
    let held = lease.status.conditions.iter().find(|c| c.type_ == "Held").expect("Held");
    assert_eq!((held.status.as_str(), held.reason.as_str()), ("Unknown", "NoStore"));
    assert!(
        rows.iter().filter(|r| r.kind != "LockLease").all(|r| r
            .status
            .conditions
            .iter()
            .all(|c| c.type_ != "Held"))
    );
}

/// Waits for the next item of a trigger stream, with a deadline.
async fn next<S: futures::Stream + Unpin>(stream: &mut S, what: &str) -> S::Item {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {DEADLINE:?}"))
        .unwrap_or_else(|| panic!("the {what} stream ended"))
}

#[tokio::test]
async fn lease_events_trigger_reconciles_and_a_resubscription_resyncs_all() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("events");
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let options =
        RedisOptions { topology: RedisTopology::Standalone(redis.url()), key_prefix: prefix.clone() };
    let backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) };
    let mut triggers = lease::follow_redis(&options, backoff, stop);
    next(&mut triggers.resubscribed, "first subscription").await;

    let agent = agent_store(&redis, &prefix).await;
    let granted = grant(&agent, HOLDER, Duration::from_secs(30), 1).await;
    assert_eq!(next(&mut triggers.leases, "grant event").await, ID);
    agent.release(ID, HOLDER, granted.fencing_token).await.expect("release");
    assert_eq!(next(&mut triggers.leases, "release event").await, ID);

    // Redis restarts: the subscription ends, is made again once Redis answers, and asks for
    // a full resync (events published meanwhile are lost).
    redis.restart();
    next(&mut triggers.resubscribed, "resync after the restart").await;
    let agent = agent_store(&redis, &prefix).await;
    grant(&agent, HOLDER, Duration::from_secs(30), 1).await;
    assert_eq!(next(&mut triggers.leases, "grant event after the restart").await, ID);
}

#[tokio::test]
async fn agents_on_a_redis_cluster_are_read_and_followed_through_its_seeds() {
    let cluster = RedisCluster::start();
    let prefix = unique_prefix("cluster");
    let topology = RedisTopology::Cluster(cluster.urls());
    let stop = CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let options = RedisOptions { topology: topology.clone(), key_prefix: prefix.clone() };
    let backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) };
    let mut triggers = lease::follow_redis(&options, backoff, stop);
    next(&mut triggers.resubscribed, "first subscription").await;
    let reader = lease::connect(&options).await.expect("reader");
    let mut world = World::new(lock_lease(1), Some(reader)).await;

    // The agent grants on the Cluster (its --redis-cluster): the lease's slot may live on any
    // master, and its event still reaches the operator subscribed on the first seed.
    let store = RedisStore::start(RedisSettings::new(topology)).await.expect("cluster store");
    let agent = RedisLeases::new(store, prefix.as_str(), Duration::from_secs(2));
    let granted = grant(&agent, HOLDER, Duration::from_secs(30), 1).await;
    assert_eq!(next(&mut triggers.leases, "grant event").await, ID);
    let lease = world.reconcile().await;
    assert_eq!(held_is(&lease), ("True".into(), "Held".into()));
    let status = lease.status.clone().expect("status");
    assert_eq!((status.holder.as_deref(), status.fencing_token), (Some(HOLDER), Some(granted.fencing_token)));
}
