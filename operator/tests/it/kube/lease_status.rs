//! LockLease status from Redis: the controller against the real API server and a real
//! `redis-server` (breakwater-harness), with grants made by the agents' own store code
//! (breakwater-store), as an agent would make them. Each test creates its LockLease for
//! real in a namespace of its own (so its lease id, `<namespace>/invoice-run`, is its own too), feeds the controller's store
//! and calls `reconcile` itself. Status is written by server-side apply, so a field the
//! operator stops applying (a released holder) is removed from the stored object — the
//! in-memory fake merged the apply and needed an interceptor to pretend that. Also the lease
//! events that trigger reconciles, resubscribed after Redis comes back.

use std::{sync::Arc, time::Duration};

use breakwater_api::LockLease;
use breakwater_harness::{RedisCluster, RedisServer, unique_prefix};
use breakwater_operator::{
    controller::{self, Context, FIELD_MANAGER, reconcile},
    http::State,
    lease::{self, Backoff, LeaseReader, RedisOptions},
    policy::lock_lease::time,
    reflectors::Reflectors,
    standalone,
};
use breakwater_store::{
    RedisConnection, RedisSettings, RedisTopology,
    lease::{Attempt, Grant, LeaseStore, RedisLeases},
};
use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, PostParams},
    runtime::{events::Reporter, watcher},
};
use tokio_util::sync::CancellationToken;

use super::{DEADLINE, admin, eventually, namespace};

const NAME: &str = "invoice-run";
const HOLDER: &str = "billing-worker-0/3f2a";

fn lock_lease(holders: u32) -> LockLease {
    serde_saphyr::from_str(&format!(
        r#"
apiVersion: breakwater.dev/v1alpha1
kind: LockLease
metadata: {{name: {NAME}}}
spec:
  ttl: 30s
  holders: {holders}
  podSelector: {{matchLabels: {{app: billing-worker}}}}
"#
    ))
    .expect("fixture parses")
}

/// What an agent uses to grant leases: the lease store code agents run (breakwater-store).
async fn agent_store(redis: &RedisServer, prefix: &str) -> RedisLeases {
    let connection = RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(redis.url())))
        .await
        .expect("redis connection");
    RedisLeases::new(connection, prefix, Duration::from_secs(2))
}

async fn grant(agent: &RedisLeases, id: &str, holder: &str, ttl: Duration, capacity: u32) -> Grant {
    match agent.try_acquire(id, holder, ttl, capacity, 0).await.expect("acquire") {
        Attempt::Granted(grant) => grant,
        busy => panic!("not granted: {busy:?}"),
    }
}

/// A namespace of its own on the real API server holding the LockLease, and the
/// controller's context reading `leases`, over a store the test feeds (the controller's
/// watch would feed it in a cluster).
struct World {
    client: Client,
    ns: String,
    api: Api<LockLease>,
    reflectors: Reflectors,
    ctx: Arc<Context>,
}

impl World {
    async fn new(lease: LockLease, leases: Option<Arc<dyn LeaseReader>>) -> Self {
        let client = admin().await;
        let ns = namespace("lease", &[]);
        let api: Api<LockLease> = Api::namespaced(client.clone(), &ns);
        let created =
            api.create(&PostParams::default(), &lease).await.expect("the API server accepts the LockLease");
        assert_eq!(created.metadata.generation, Some(1), "the API server sets the generation");
        let reflectors = Reflectors::default();
        let options = controller::Options {
            // No LockLease check looks at the root namespace; it need not exist.
            root_namespace: "breakwater-system".into(),
            reporter: Reporter { controller: "breakwater-operator".into(), instance: Some("test".into()) },
            state: Arc::new(State::default()),
            cache: None,
            leases,
        };
        let ctx = Arc::new(Context::new(client.clone(), reflectors.clone(), options));
        Self { client, ns, api, reflectors, ctx }
    }

    /// The lease's id in Redis, as agents name it: `<namespace>/<name>`.
    fn id(&self) -> String {
        format!("{}/{NAME}", self.ns)
    }

    /// Reconciles the LockLease as the API holds it now; returns it afterwards.
    async fn reconcile(&mut self) -> LockLease {
        let current = self.api.get(NAME).await.expect("lease exists");
        self.reflectors.lock_leases.apply(watcher::Event::Apply(current.clone()));
        reconcile(Arc::new(current), self.ctx.clone()).await.expect("reconcile succeeds");
        self.api.get(NAME).await.expect("lease exists")
    }

    /// The fields of the status as the API server stores them (untyped: the typed status
    /// reads an absent field and a null alike), and those the operator's apply owns there.
    async fn stored_status(&self) -> (Vec<String>, Vec<String>) {
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &self.ns, &ApiResource::erase::<LockLease>(&()));
        let object = api.get(NAME).await.expect("lease exists");
        let stored =
            object.data["status"].as_object().map(|s| s.keys().cloned().collect()).unwrap_or_default();
        let owned = object
            .managed_fields()
            .iter()
            .filter(|m| {
                m.manager.as_deref() == Some(FIELD_MANAGER) && m.subresource.as_deref() == Some("status")
            })
            .filter_map(|m| m.fields_v1.as_ref()?.0["f:status"].as_object().cloned())
            .flat_map(|fields| {
                fields.keys().filter_map(|k| k.strip_prefix("f:").map(str::to_string)).collect::<Vec<_>>()
            })
            .collect();
        (stored, owned)
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

fn strings(fields: &[&str]) -> Vec<String> {
    fields.iter().map(|f| f.to_string()).collect()
}

#[tokio::test]
async fn status_follows_grants_releases_and_redis_outages() {
    let mut redis = RedisServer::start();
    let prefix = unique_prefix("status");
    let agent = agent_store(&redis, &prefix).await;
    let mut world = World::new(lock_lease(1), Some(operator_reader(&redis, &prefix).await)).await;
    let id = world.id();

    let free = world.reconcile().await;
    assert_eq!(held_is(&free), ("False".into(), "Free".into()));
    assert_eq!(held(&free).message, "free; never granted");
    assert_eq!(held(&free).observed_generation, Some(1), "the generation the server set");
    let status = free.status.clone().expect("status");
    assert_eq!((status.holder, status.fencing_token, status.holders.len()), (None, None, 0));
    assert!(status.conditions.iter().any(|c| c.type_ == "Accepted" && c.status == "True"));
    assert_eq!(world.stored_status().await, (strings(&["conditions"]), strings(&["conditions"])));

    // An agent grants the lease: holder, token and times, Held=True.
    let first = grant(&agent, &id, HOLDER, Duration::from_secs(30), 1).await;
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
    let all = strings(&["conditions", "fencingToken", "holder", "holders"]);
    assert_eq!(world.stored_status().await, (all.clone(), all), "stored, and owned by the operator");

    // Nothing changed: nothing is written.
    let again = world.reconcile().await;
    assert_eq!(again.resource_version(), held_lease.resource_version(), "no write without a change");

    // Released: Free, no holder, the last token still shown. The operator no longer applies
    // holder and holders, and the API server removes them from the stored status (and from
    // what the operator owns), rather than keeping the old values.
    agent.release(&id, HOLDER, first.fencing_token).await.expect("release");
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
    let left = strings(&["conditions", "fencingToken"]);
    assert_eq!(world.stored_status().await, (left.clone(), left), "holder and holders are gone");

    // Held again, then Redis dies: Held=Unknown/StoreUnavailable, the last holder kept.
    let second = grant(&agent, &id, "billing-worker-1/77aa", Duration::from_secs(30), 1).await;
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
    let id = world.id();

    let long = grant(&agent, &id, "w-0/a", Duration::from_secs(30), 3).await;
    let short = grant(&agent, &id, "w-1/b", Duration::from_millis(1500), 3).await;
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
    eventually("the short grant expires by Redis's clock", DEADLINE, || async {
        let grants = reader.state(&id).await.map_err(|e| e.to_string())?.grants;
        if grants.len() <= 1 { Ok(()) } else { Err(format!("{grants:?}")) }
    })
    .await;
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
    assert_eq!(world.stored_status().await.0, ["conditions"], "no lease field is stored");
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
    const ID: &str = "billing/invoice-run";
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
    let granted = grant(&agent, ID, HOLDER, Duration::from_secs(30), 1).await;
    assert_eq!(next(&mut triggers.events, "grant event").await, ID);
    agent.release(ID, HOLDER, granted.fencing_token).await.expect("release");
    assert_eq!(next(&mut triggers.events, "release event").await, ID);

    // Redis restarts: the subscription ends, is made again once Redis answers, and asks for
    // a full resync (events published meanwhile are lost).
    redis.restart();
    next(&mut triggers.resubscribed, "resync after the restart").await;
    let agent = agent_store(&redis, &prefix).await;
    grant(&agent, ID, HOLDER, Duration::from_secs(30), 1).await;
    assert_eq!(next(&mut triggers.events, "grant event after the restart").await, ID);
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
    let id = world.id();

    // The agent grants on the Cluster (its --redis-cluster): the lease's slot may live on any
    // master, and its event still reaches the operator subscribed on the first seed.
    let connection = RedisConnection::start(RedisSettings::new(topology)).await.expect("cluster connection");
    let agent = RedisLeases::new(connection, prefix.as_str(), Duration::from_secs(2));
    let granted = grant(&agent, &id, HOLDER, Duration::from_secs(30), 1).await;
    assert_eq!(next(&mut triggers.events, "grant event").await, id);
    let lease = world.reconcile().await;
    assert_eq!(held_is(&lease), ("True".into(), "Held".into()));
    let status = lease.status.clone().expect("status");
    assert_eq!((status.holder.as_deref(), status.fencing_token), (Some(HOLDER), Some(granted.fencing_token)));
}
