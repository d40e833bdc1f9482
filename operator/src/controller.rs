//! The controllers: one per kind, each reconciling a resource into its status. A reconcile
//! builds an [`Inventory`] from the reflector stores, runs the same pure evaluation as
//! standalone mode, and writes the status by server-side apply only when it changed.
//! Services and Namespaces are watched through the same stream that fills the stores, so a
//! reconcile they trigger always sees them.

use std::{
    collections::HashMap,
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use breakwater_api::{
    Attachment, CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy, common::GROUP,
};
use futures::{Stream, StreamExt, stream::BoxStream};
use k8s_openapi::{
    NamespaceResourceScope,
    api::core::v1::{Namespace, Secret, Service},
    apimachinery::pkg::apis::meta::v1::Time,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    error::{Error, Result},
    http::State,
    inventory::{Inventory, ObjectName},
    lease::{self, LeaseReader},
    policy::lock_lease::{self, LeaseFields, Observation},
    resource::Policy,
    status::{self, OwnedStatus, owned_status, transitions},
    xds::SnapshotCache,
};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "breakwater-operator";

/// How often every resource is re-evaluated even without a change: a safety net for
/// Secrets, which are not watched (the operator may only `get` them).
const RESYNC: Duration = Duration::from_secs(300);

/// How often a LockLease is read from Redis even without an event: renewals publish none,
/// and this keeps `renewedAt` and `expiresAt` current.
pub const LEASE_RESYNC: Duration = Duration::from_secs(30);

/// How long after a grant's expiry (by Redis's clock) its lease is read again, so that the
/// read sees it gone despite the time the reconcile itself takes to start.
const EXPIRY_MARGIN: Duration = Duration::from_millis(100);

/// A Breakwater kind the controllers reconcile.
pub trait Kind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// Whether the kind attaches to Services (and so is re-evaluated when they change).
    const ATTACHES_TO_SERVICES: bool;
    fn into_policy(self: Arc<Self>) -> Policy;
    /// Puts every resource of this kind into the inventory.
    fn fill(inventory: &mut Inventory, all: Vec<Arc<Self>>);
    /// The Secret whose keys evaluation needs, if any.
    fn secret(&self) -> Option<ObjectName> {
        None
    }
    /// Whether this resource may attach to `service` (so a change to it needs a reconcile).
    fn may_target(&self, service: &ObjectName, root_namespace: &str) -> bool {
        let _ = (service, root_namespace);
        false
    }
    /// The resources of this kind whose outcome may change when `changed` changes.
    fn related(changed: &Self, all: &[Arc<Self>], root_namespace: &str) -> Vec<ObjectRef<Self>> {
        let _ = (changed, all, root_namespace);
        Vec::new()
    }
}

/// Attachment policies influence each other: root policies merge into every namespace, and
/// namespace policies on one Service conflict or shadow a root Default.
fn related_policies<K: Kind>(changed: &K, all: &[Arc<K>], root_namespace: &str) -> Vec<ObjectRef<K>> {
    let namespace = changed.namespace().unwrap_or_default();
    all.iter()
        .filter(|other| {
            let other_ns = other.namespace().unwrap_or_default();
            other.name_any() != changed.name_any()
                && (namespace == root_namespace || other_ns == root_namespace || other_ns == namespace)
        })
        .map(|other| ObjectRef::from_obj(other.as_ref()))
        .collect()
}

fn may_target<K: Kind>(
    policy: &K,
    spec: &impl Attachment,
    service: &ObjectName,
    root_namespace: &str,
) -> bool {
    let namespace = policy.namespace().unwrap_or_default();
    (namespace == root_namespace && spec.namespace_selector().is_some())
        || (namespace == service.namespace && spec.target_refs().iter().any(|t| t.name == service.name))
}

impl Kind for CircuitBreakerPolicy {
    const ATTACHES_TO_SERVICES: bool = true;
    fn into_policy(self: Arc<Self>) -> Policy {
        Policy::CircuitBreaker(self)
    }
    fn fill(inventory: &mut Inventory, all: Vec<Arc<Self>>) {
        inventory.circuit_breakers = all;
    }
    fn may_target(&self, service: &ObjectName, root_namespace: &str) -> bool {
        may_target(self, &self.spec, service, root_namespace)
    }
    fn related(changed: &Self, all: &[Arc<Self>], root_namespace: &str) -> Vec<ObjectRef<Self>> {
        related_policies(changed, all, root_namespace)
    }
}

impl Kind for RateLimitPolicy {
    const ATTACHES_TO_SERVICES: bool = true;
    fn into_policy(self: Arc<Self>) -> Policy {
        Policy::RateLimit(self)
    }
    fn fill(inventory: &mut Inventory, all: Vec<Arc<Self>>) {
        inventory.rate_limits = all;
    }
    fn may_target(&self, service: &ObjectName, root_namespace: &str) -> bool {
        may_target(self, &self.spec, service, root_namespace)
    }
    fn related(changed: &Self, all: &[Arc<Self>], root_namespace: &str) -> Vec<ObjectRef<Self>> {
        related_policies(changed, all, root_namespace)
    }
}

impl Kind for LockLease {
    const ATTACHES_TO_SERVICES: bool = false;
    fn into_policy(self: Arc<Self>) -> Policy {
        Policy::LockLease(self)
    }
    fn fill(inventory: &mut Inventory, all: Vec<Arc<Self>>) {
        inventory.lock_leases = all;
    }
}

impl Kind for OutboxRelay {
    const ATTACHES_TO_SERVICES: bool = false;
    fn into_policy(self: Arc<Self>) -> Policy {
        Policy::OutboxRelay(self)
    }
    fn fill(inventory: &mut Inventory, all: Vec<Arc<Self>>) {
        inventory.outbox_relays = all;
    }
    fn secret(&self) -> Option<ObjectName> {
        let name = &self.spec.source.postgres.connection_secret_ref.name;
        Some(ObjectName::new(self.namespace().unwrap_or_default(), name))
    }
}

/// What a reconcile needs. The client is injected so tests can pass an in-memory API.
pub struct Context<K: Kind> {
    pub client: Client,
    pub root_namespace: String,
    pub policies: Store<K>,
    pub services: Store<Service>,
    pub namespaces: Store<Namespace>,
    pub recorder: Recorder,
    pub state: Arc<State>,
    /// The xDS snapshot cache whose ACKs decide `Programmed`; None when no xDS is served.
    pub cache: Option<Arc<SnapshotCache>>,
    /// Where LockLeases are read from; None when the operator runs without Redis.
    pub leases: Option<Arc<dyn LeaseReader>>,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<K>, u32>>,
}

impl<K: Kind> Debug for Context<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("kind", &K::kind(&()))
            .field("root_namespace", &self.root_namespace)
            .finish()
    }
}

impl<K: Kind> Context<K> {
    pub fn new(
        client: Client,
        root_namespace: String,
        stores: (Store<K>, Store<Service>, Store<Namespace>),
        reporter: Reporter,
        state: Arc<State>,
        cache: Option<Arc<SnapshotCache>>,
    ) -> Self {
        let (policies, services, namespaces) = stores;
        Self {
            cache,
            recorder: Recorder::new(client.clone(), reporter),
            client,
            root_namespace,
            policies,
            services,
            namespaces,
            state,
            leases: None,
            failures: Mutex::default(),
        }
    }

    /// Reads LockLeases from `leases` (otherwise their `Held` is Unknown: no store).
    #[must_use]
    pub fn with_leases(mut self, leases: Arc<dyn LeaseReader>) -> Self {
        self.leases = Some(leases);
        self
    }

    /// What the store says about a LockLease (`last`: the fields its status has now).
    async fn observe(&self, lease: &LockLease, last: &LeaseFields) -> lock_lease::Report {
        let Some(reader) = &self.leases else {
            return lock_lease::report(Observation::NoStore, &lease.spec, last);
        };
        let id = ObjectName::of(lease).to_string();
        match reader.state(&id).await {
            Ok(state) => lock_lease::report(Observation::Read(&state), &lease.spec, last),
            Err(error) => {
                tracing::warn!(lease = id, %error, "cannot read lease from Redis");
                let error = error.to_string();
                lock_lease::report(Observation::Unavailable(&error), &lease.spec, last)
            }
        }
    }

    async fn inventory(&self, policy: &K) -> Result<Inventory> {
        let mut inventory = Inventory::new(&self.root_namespace);
        for service in self.services.state() {
            inventory.add_service(service);
        }
        for namespace in self.namespaces.state() {
            inventory.add_namespace(namespace.name_any(), namespace.labels().clone());
        }
        K::fill(&mut inventory, self.policies.state());
        if let Some(secret) = policy.secret() {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &secret.namespace);
            if let Some(found) = api.get_opt(&secret.name).await? {
                inventory.add_secret(&found);
            }
        }
        Ok(inventory)
    }
}

/// Reconciles one resource: evaluate, then write status and Events if anything changed.
pub async fn reconcile<K: Kind>(object: Arc<K>, ctx: Arc<Context<K>>) -> Result<Action> {
    let started = Instant::now();
    let policy = object.clone().into_policy();
    let kind = policy.kind();
    let inventory = ctx.inventory(&object).await?;
    let assessment = policy.assess(&inventory);
    let now = Time(jiff::Timestamp::now());
    let generation = object.meta().generation;
    let programmed = status::programmed(&assessment, ctx.cache.as_deref(), kind, &policy.name(), generation);
    let mut status = owned_status(&assessment, programmed, generation, policy.conditions(), &now);
    let mut requeue = RESYNC;
    if let Policy::LockLease(lease) = &policy {
        let report = ctx.observe(lease, &policy.lease_fields().unwrap_or_default()).await;
        requeue = lease_requeue(&report);
        status = status::with_lease(status, report, generation, policy.conditions(), &now);
    }

    if status_changed(&policy, &status) {
        let name = object.name_any();
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default());
        let body = serde_json::json!({
            "apiVersion": format!("{GROUP}/{}", K::version(&())),
            "kind": kind,
            // A lease field left out (no holder any more) is removed by the API server: the
            // operator is its only manager and stops applying it.
            "status": status,
        });
        api.patch_status(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&body)).await?;
        ctx.state.metrics.status_writes.get_or_create(&crate::metrics::KindLabel { kind }).inc();
        publish_events(&ctx, object.as_ref(), &policy, &status).await;
        tracing::info!(kind, namespace = %policy.name().namespace, name, accepted = assessment.accepted.ok, reason = assessment.accepted.reason, "status updated");
    }
    if let Ok(mut failures) = ctx.failures.lock() {
        failures.remove(&ObjectRef::from_obj(object.as_ref()));
    }
    ctx.state.metrics.observe(kind, started.elapsed());
    Ok(Action::requeue(requeue))
}

/// When to read a lease again without an event: at its earliest expiry (nobody publishes
/// one, yet the status must turn Free then), and at least every [`LEASE_RESYNC`].
pub fn lease_requeue(report: &lock_lease::Report) -> Duration {
    report.next_expiry.map_or(LEASE_RESYNC, |expiry| (expiry + EXPIRY_MARGIN).min(LEASE_RESYNC))
}

/// Whether the computed status differs from what the object carries (transition times are
/// carried over, so an unchanged evaluation compares equal and writes nothing).
fn status_changed(policy: &Policy, status: &OwnedStatus) -> bool {
    policy.conditions() != status.conditions.as_slice()
        || policy.targets() != status.targets
        || policy.lease_fields() != status.lease
}

async fn publish_events<K: Kind>(ctx: &Context<K>, object: &K, policy: &Policy, status: &OwnedStatus) {
    let reference = object.object_ref(&());
    for condition in transitions(policy.conditions(), &status.conditions) {
        if condition.type_ == breakwater_api::common::condition_type::PROGRAMMED {
            continue; // Pending is no news until a data plane reports.
        }
        if condition.type_ == lock_lease::held::TYPE {
            continue; // A lease changes hands as often as the application likes: status only.
        }
        let event = Event {
            type_: if condition.status == "True" { EventType::Normal } else { EventType::Warning },
            reason: condition.reason.clone(),
            note: Some(format!("{} is {}: {}", condition.type_, condition.status, condition.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(error = %err, "could not publish event");
        }
    }
}

/// Backs off by error class, doubling per consecutive failure of the same object.
pub fn error_policy<K: Kind>(object: Arc<K>, error: &Error, ctx: Arc<Context<K>>) -> Action {
    let kind = object.clone().into_policy().kind();
    ctx.state
        .metrics
        .errors
        .get_or_create(&crate::metrics::ErrorLabels { kind, error: error.metric_label() })
        .inc();
    let failures = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(ObjectRef::from_obj(object.as_ref())).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = backoff(error, failures);
    tracing::warn!(kind, name = %object.name_any(), error = %error, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// The retry delay after `failures` consecutive failures: conflicts retry fast, throttling
/// and server errors slower, anything else slowest; doubling each time, capped at 5 minutes.
pub fn backoff(error: &Error, failures: u32) -> Duration {
    let base = match error {
        Error::Kube(kube::Error::Api(status)) if status.code == 409 => Duration::from_millis(200),
        Error::Kube(kube::Error::Api(status)) if status.code == 429 || status.code >= 500 => {
            Duration::from_secs(2)
        }
        Error::Kube(_) => Duration::from_secs(1),
        _ => Duration::from_secs(10),
    };
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    base.saturating_mul(factor).min(Duration::from_secs(300))
}

/// A watch of `R` that also fills a store: the stream triggers, the store is read, and
/// because both are one stream a triggered reconcile always sees the change.
pub(crate) fn reflected<R>(
    client: &Client,
) -> (Store<R>, impl Stream<Item = Result<R, watcher::Error>> + Send + 'static)
where
    R: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher::watcher(Api::<R>::all(client.clone()), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    (reader, stream)
}

/// Reconcile triggers beyond the Kubernetes watches (the lease events of agents).
pub struct Triggers<K: Kind> {
    /// Objects to reconcile.
    pub objects: BoxStream<'static, ObjectRef<K>>,
    /// Reconcile every object on each item.
    pub all: BoxStream<'static, ()>,
}

impl<K: Kind> Debug for Triggers<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers").finish_non_exhaustive()
    }
}

impl Triggers<LockLease> {
    /// The LockLeases the agents' lease events name, and all of them on each resubscription.
    pub fn from_leases(triggers: lease::Triggers) -> Self {
        let objects = triggers.leases.filter_map(|id| async move {
            let parsed = lease::parse_id(&id).map(|(ns, name)| ObjectRef::new(name).within(ns));
            if parsed.is_none() {
                tracing::debug!(id, "lease event names no LockLease");
            }
            parsed
        });
        Self { objects: objects.boxed(), all: triggers.resubscribed.boxed() }
    }
}

/// Runs the controller of kind `K` until `shutdown` resolves.
pub async fn run_controller<K: Kind>(
    client: Client,
    root_namespace: String,
    reporter: Reporter,
    state: Arc<State>,
    cache: Option<Arc<SnapshotCache>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    run_controller_with::<K>(client, root_namespace, reporter, state, cache, None, None, shutdown).await;
}

/// [`run_controller`] with a lease reader and extra triggers.
#[allow(clippy::too_many_arguments)]
pub async fn run_controller_with<K: Kind>(
    client: Client,
    root_namespace: String,
    reporter: Reporter,
    state: Arc<State>,
    cache: Option<Arc<SnapshotCache>>,
    leases: Option<Arc<dyn LeaseReader>>,
    triggers: Option<Triggers<K>>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let (services, service_events) = reflected::<Service>(&client);
    let (namespaces, namespace_events) = reflected::<Namespace>(&client);
    let config = kube::runtime::controller::Config::default().debounce(Duration::from_millis(500));
    let mut controller = Controller::new(Api::<K>::all(client.clone()), watcher::Config::default())
        .with_config(config)
        .graceful_shutdown_on(shutdown);
    let policies = controller.store();
    if K::ATTACHES_TO_SERVICES {
        let (by_service, by_namespace, related) = (policies.clone(), policies.clone(), policies.clone());
        let (root, root2, root3) = (root_namespace.clone(), root_namespace.clone(), root_namespace.clone());
        controller = controller
            .watches_stream(service_events, move |svc| targeting(&by_service, &ObjectName::of(&svc), &root))
            .watches_stream(namespace_events, move |_| in_root(&by_namespace, &root2))
            .watches(Api::<K>::all(client.clone()), watcher::Config::default(), move |changed| {
                K::related(&changed, &related.state(), &root3)
            });
    } else {
        // Keep the stores fed even when nothing maps from them.
        controller = controller
            .watches_stream(service_events, |_| Vec::<ObjectRef<K>>::new())
            .watches_stream(namespace_events, |_| Vec::<ObjectRef<K>>::new());
    }
    if let Some(cache) = &cache {
        // Programmed follows the proxies' ACKs: re-evaluate when they change (debounced).
        let acks = tokio_stream::wrappers::WatchStream::new(cache.subscribe_changes()).map(|_| ());
        controller = controller.reconcile_all_on(acks);
    }
    if let Some(triggers) = triggers {
        controller = controller.reconcile_on(triggers.objects).reconcile_all_on(triggers.all);
    }
    let stores = (policies, services, namespaces);
    let mut ctx = Context::new(client, root_namespace, stores, reporter, state, cache);
    if let Some(leases) = leases {
        ctx = ctx.with_leases(leases);
    }
    let ctx = Arc::new(ctx);
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %err, "controller event");
            }
        })
        .await;
}

/// Policies that may attach to `service`: those naming it in their namespace, and the
/// root-namespace policies (they select by labels).
fn targeting<K: Kind>(policies: &Store<K>, service: &ObjectName, root_namespace: &str) -> Vec<ObjectRef<K>> {
    policies
        .state()
        .iter()
        .filter(|p| p.may_target(service, root_namespace))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Namespace labels matter only to the root-namespace policies' selectors.
fn in_root<K: Kind>(policies: &Store<K>, root_namespace: &str) -> Vec<ObjectRef<K>> {
    policies
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(root_namespace))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> Error {
        let status = kube::core::Status::failure("test", "Test").with_code(code);
        Error::Kube(kube::Error::Api(Box::new(status)))
    }

    #[test]
    fn a_lease_is_read_again_at_its_earliest_expiry_or_every_resync() {
        use lock_lease::{Held, Report, Status};
        let report = |next_expiry| Report {
            fields: LeaseFields::default(),
            held: Held { status: Status::True, reason: "Held", message: String::new() },
            next_expiry,
        };
        assert_eq!(lease_requeue(&report(None)), LEASE_RESYNC);
        assert_eq!(lease_requeue(&report(Some(Duration::from_secs(5)))), Duration::from_millis(5_100));
        assert_eq!(lease_requeue(&report(Some(Duration::ZERO))), EXPIRY_MARGIN);
        assert_eq!(lease_requeue(&report(Some(Duration::from_secs(3600)))), LEASE_RESYNC);
    }

    #[tokio::test]
    async fn lease_events_name_the_lock_leases_to_reconcile() {
        let (ids, ids_rx) = tokio::sync::mpsc::channel(8);
        let (all, all_rx) = tokio::sync::mpsc::channel(1);
        let triggers = Triggers::from_leases(lease::Triggers {
            leases: tokio_stream::wrappers::ReceiverStream::new(ids_rx),
            resubscribed: tokio_stream::wrappers::ReceiverStream::new(all_rx),
        });
        for id in ["billing/invoice-run", "not-a-lease-id", "shop/a/b", "shop/reindex"] {
            ids.send(id.to_string()).await.expect("send");
        }
        all.send(()).await.expect("send");
        drop((ids, all));
        let objects: Vec<ObjectRef<LockLease>> = triggers.objects.collect().await;
        assert_eq!(
            objects,
            [ObjectRef::new("invoice-run").within("billing"), ObjectRef::new("reindex").within("shop")]
        );
        assert_eq!(triggers.all.count().await, 1);
    }

    #[test]
    fn backoff_depends_on_error_class_and_doubles() {
        assert_eq!(backoff(&api_error(409), 1), Duration::from_millis(200));
        assert_eq!(backoff(&api_error(409), 3), Duration::from_millis(800));
        assert_eq!(backoff(&api_error(429), 1), Duration::from_secs(2));
        assert_eq!(backoff(&api_error(503), 2), Duration::from_secs(4));
        assert_eq!(backoff(&Error::LeaderElection("x".into()), 1), Duration::from_secs(10));
        assert_eq!(backoff(&api_error(500), 40), Duration::from_secs(300), "capped");
    }
}
