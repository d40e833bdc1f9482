//! The controllers: one kube-runtime `Controller` per kind, all sharing one [`Context`] and
//! treating every kind alike through [`Policy`]. A reconcile reads an [`Inventory`] from the
//! shared stores, gathers what a status is made of — the evaluation, the proxies'
//! acknowledgements, a LockLease's holders, an OutboxRelay's Deployment and facts, a
//! CircuitBreakerPolicy's breakers, a RateLimitPolicy's shadow counts — and writes what
//! [`status::assemble`] makes of it by server-side apply, only when it changed.
//! An accepted OutboxRelay's reconcile also applies the Deployment that runs its relay
//! (`relay`), and deletes it once the resource is no longer accepted. A controller's
//! triggers are subscriptions to the shared reflectors (one watch per kind), whose stores the
//! reconcile reads, so a reconcile a Service or Namespace triggers always sees that change.
//! A breaker's transitions, as the agents' Redis publishes them, trigger the reconcile of
//! the policy whose `breaker` section it runs, and each is announced by an Event there
//! ([`Triggers::from_breakers`]). The proxies' ACKs trigger the reconcile of the policies
//! whose acknowledgement facts they changed, as the snapshot cache reports them
//! ([`acknowledgement_changes`]), not of every policy.

use std::{
    collections::HashMap,
    fmt::Debug,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use breakwater_api::{LockLease, OutboxRelay, common::condition_type};
use breakwater_store::breaker::Event as Transition;
use futures::{StreamExt, TryStreamExt, future::BoxFuture, stream::BoxStream};
use k8s_openapi::{api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::Time};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
    runtime::{
        Controller,
        controller::{self, Action},
        events::{Event, EventType, Recorder, Reporter},
        reflector::{ObjectRef, Store},
    },
};

use crate::{
    error::{Error, Report, Result},
    follow::Followed,
    http::State,
    inventory::{Inventory, ObjectName},
    lease::{self, LeaseReader},
    live::{self, BreakerReader, ShadowReader},
    metrics::{ErrorLabels, KindLabel},
    policy::{
        Verdict, breaker,
        lock_lease::{self, LeaseFields, Observation},
        outbox_relay::{self, Known, RedisSecret, RelayFields},
        shadow,
    },
    reflectors::{Reflector, Reflectors},
    relay::{self, RelayReader},
    resource::{Kind, Policy},
    status::{self, Findings, OwnedStatus, transitions},
    xds::{Changes, SnapshotCache},
};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "breakwater-operator";

/// How often every resource is re-evaluated even without a change: a safety net for
/// Secrets, which are not watched (the operator may only `get` them).
const RESYNC: Duration = Duration::from_secs(300);

/// How often a LockLease is read from Redis even without an event: renewals publish none,
/// and this keeps `renewedAt` and `expiresAt` current.
pub const LEASE_RESYNC: Duration = Duration::from_secs(30);

/// How often an OutboxRelay is read again without an event: its relay reports every 5 s,
/// and `Ready` must turn stale within a report's staleness (30 s) of the last one.
pub const RELAY_RESYNC: Duration = Duration::from_secs(10);

/// How often the live facts of a CircuitBreakerPolicy's breakers (their windows' calls and
/// rates, which change without a transition) and of a RateLimitPolicy's shadow limits (a
/// count per minute) are read without an event.
pub const LIVE_RESYNC: Duration = Duration::from_secs(30);

/// How long the policies whose acknowledgements changed are gathered before they are
/// handed to the controller. When a change is pushed every carrying proxy ACKs within about
/// a second, each ACK changing the same policies' facts: gathering them turns thousands of
/// ACKs into one request per policy per window, and the controller's debounce then runs one
/// reconcile after the storm. Short enough that the last ACK shows in status well within a
/// second (with the debounce).
pub const ACK_BATCH: Duration = Duration::from_millis(150);

/// How many breakers or shadow counts of one policy are read from Redis at once.
const READS_IN_FLIGHT: usize = 16;

/// How long after a grant's expiry (by Redis's clock) its lease is read again, so that the
/// read sees it gone despite the time the reconcile itself takes to start.
const EXPIRY_MARGIN: Duration = Duration::from_millis(100);

/// How the controllers run, besides the client and the stores.
#[derive(Clone)]
pub struct Options {
    /// Policies here may select other namespaces and set mode Default/Override.
    pub root_namespace: String,
    /// Who the Events say they come from.
    pub reporter: Reporter,
    /// What the HTTP side reads (metrics).
    pub state: Arc<State>,
    /// The xDS snapshot cache whose ACKs decide `Programmed`; None when no xDS is served.
    pub cache: Option<Arc<SnapshotCache>>,
    /// Where LockLeases are read from; None when the operator runs without Redis.
    pub leases: Option<Arc<dyn LeaseReader>>,
}

impl Debug for Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Options").field("root_namespace", &self.root_namespace).finish_non_exhaustive()
    }
}

/// How the OutboxRelay controller runs relays, and where it reads their facts.
#[derive(Clone, Debug, Default)]
pub struct Relays {
    /// The relays' image, Redis Secret and key prefix.
    pub settings: relay::Settings,
    /// Where the relays' facts are read; None when the operator runs without Redis.
    pub facts: Option<Arc<dyn RelayReader>>,
}

/// Where the breakers' state and the shadow limits' counts are read; None each when the
/// operator runs without Redis.
#[derive(Clone, Debug, Default)]
pub struct Live {
    pub breakers: Option<Arc<dyn BreakerReader>>,
    pub shadow: Option<Arc<dyn ShadowReader>>,
}

/// What a reconcile needs, shared by the four controllers. The client and the stores are
/// injected, so tests reconcile against stores they fill themselves.
pub struct Context {
    client: Client,
    reflectors: Reflectors,
    recorder: Recorder,
    options: Options,
    relays: Relays,
    live: Live,
    /// Consecutive failures per object, for exponential backoff.
    failures: Mutex<HashMap<(&'static str, ObjectName), u32>>,
}

impl Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("options", &self.options)
            .field("relays", &self.relays)
            .field("live", &self.live)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub fn new(client: Client, reflectors: Reflectors, options: Options) -> Self {
        let recorder = Recorder::new(client.clone(), options.reporter.clone());
        Self {
            client,
            reflectors,
            recorder,
            options,
            relays: Relays::default(),
            live: Live::default(),
            failures: Mutex::default(),
        }
    }

    /// Runs relays with `relays` (otherwise: the default settings, and no facts read).
    pub fn with_relays(mut self, relays: Relays) -> Self {
        self.relays = relays;
        self
    }

    /// Reads the breakers' state and the shadow counts from `live` (otherwise: the status
    /// says the operator runs without Redis).
    pub fn with_live(mut self, live: Live) -> Self {
        self.live = live;
        self
    }

    /// What evaluation reads, and for a resource that refers to a Secret, that Secret's keys.
    async fn inventory(&self, policy: &Policy) -> Result<Inventory> {
        let mut inventory = self.reflectors.evaluation_inventory(&self.options.root_namespace);
        if let Some(secret) = policy.secret() {
            let api: Api<Secret> = Api::namespaced(self.client.clone(), &secret.namespace);
            if let Some(found) = api.get_opt(&secret.name).await? {
                inventory.add_secret(&found);
            }
        }
        Ok(inventory)
    }

    /// What the store says about a LockLease, given the holders its status shows now.
    async fn read_lease(&self, lease: &LockLease) -> lock_lease::Report {
        let last = LeaseFields::of(lease.status.as_ref());
        let Some(reader) = &self.options.leases else {
            return lock_lease::report(Observation::NoStore, &lease.spec, &last);
        };
        let id = ObjectName::of(lease).to_string();
        match reader.state(&id).await {
            Ok(state) => lock_lease::report(Observation::Read(&state), &lease.spec, &last),
            Err(error) => {
                let error = Report(&error).to_string();
                tracing::warn!(lease = id, error, "cannot read lease from Redis");
                lock_lease::report(Observation::Unavailable(&error), &lease.spec, &last)
            }
        }
    }

    /// Runs an OutboxRelay as `accepted` says — its Deployment applied, or deleted — and
    /// reads how its relay goes.
    async fn run_relay(&self, relay: &OutboxRelay, accepted: &Verdict) -> Result<outbox_relay::Report> {
        let settings = &self.relays.settings;
        let (deployment, redis_secret) = if accepted.ok {
            let deployment = relay::apply(&self.client, relay, settings, FIELD_MANAGER).await?;
            let namespace = relay.metadata.namespace.as_deref().unwrap_or_default();
            (deployment, relay::redis_secret(&self.client, namespace, settings).await?)
        } else {
            relay::remove(&self.client, relay).await?;
            (outbox_relay::Deployment::None, RedisSecret::Present)
        };
        let last = RelayFields::of(relay.status.as_ref());
        let known = |observation| Known {
            accepted: accepted.ok,
            deployment: &deployment,
            redis_secret: &redis_secret,
            observation,
        };
        let Some(reader) = &self.relays.facts else {
            return Ok(outbox_relay::report(known(outbox_relay::Observation::NoStore), &last));
        };
        let id = ObjectName::of(relay).to_string();
        Ok(match reader.facts(&id).await {
            Ok(facts) => outbox_relay::report(known(outbox_relay::Observation::Read(facts.as_ref())), &last),
            Err(error) => {
                let error = Report(&error).to_string();
                tracing::warn!(relay = id, error, "cannot read the relay's facts from Redis");
                outbox_relay::report(known(outbox_relay::Observation::Unavailable(&error)), &last)
            }
        })
    }

    /// What the store says about the breakers whose `breaker` section `policy` supplies.
    /// One failed read leaves them all out: a status shows a state Redis holds, or none.
    async fn read_breakers(&self, policy: &ObjectName, inventory: &Inventory) -> breaker::Report {
        let targets = breaker::targets(policy, inventory);
        let Some(reader) = self.live.breakers.as_ref().filter(|_| !targets.is_empty()) else {
            return breaker::report(&targets, breaker::Observation::NoStore);
        };
        let ids = targets.iter().map(|target| target.id.clone()).collect();
        match read_all(reader, ids, |reader, id| reader.state(id)).await {
            Ok(states) => breaker::report(&targets, breaker::Observation::Read(&states)),
            Err(error) => {
                let error = Report(&error).to_string();
                tracing::warn!(policy = %policy, error, "cannot read breakers from Redis");
                breaker::report(&targets, breaker::Observation::Unavailable(&error))
            }
        }
    }

    /// What the store says about the shadow limits of `policy` in effect.
    async fn read_shadow(&self, policy: &ObjectName, inventory: &Inventory) -> shadow::Report {
        let limits = shadow::limits(policy, inventory);
        let Some(reader) = self.live.shadow.as_ref().filter(|_| !limits.is_empty()) else {
            return shadow::report(&limits, shadow::Observation::NoStore);
        };
        let rules = limits.iter().map(|limit| limit.rule.clone()).collect();
        match read_all(reader, rules, |reader, rule| reader.last_minute(rule)).await {
            Ok(counts) => shadow::report(&limits, shadow::Observation::Read(&counts)),
            Err(error) => {
                let error = Report(&error).to_string();
                tracing::warn!(policy = %policy, error, "cannot read shadow counts from Redis");
                shadow::report(&limits, shadow::Observation::Unavailable(&error))
            }
        }
    }

    /// Announces `transition` with an Event on the CircuitBreakerPolicy whose `breaker`
    /// section the breaker runs, and names that policy to reconcile; None when no policy's
    /// section makes that breaker (any more).
    async fn breaker_transition(&self, transition: &Transition) -> Option<ObjectName> {
        let inventory = self.reflectors.evaluation_inventory(&self.options.root_namespace);
        let Some(target) = breaker::breakers(&inventory).remove(&transition.id) else {
            tracing::debug!(id = transition.id, "breaker transition of no policy's breaker");
            return None;
        };
        let reference = ObjectRef::new(&target.policy.name).within(&target.policy.namespace);
        let policy = self.reflectors.circuit_breakers.store().get(&reference)?;
        // Read again for the rates: the event carries the state alone.
        let read = match &self.live.breakers {
            Some(reader) => reader.state(&transition.id).await.ok().flatten(),
            None => None,
        };
        let announcement = live::announce(&target, transition, read.as_ref());
        tracing::info!(id = transition.id, state = %transition.state, policy = %target.policy, "breaker transition");
        let event = Event {
            type_: if announcement.warning { EventType::Warning } else { EventType::Normal },
            reason: announcement.reason.into(),
            note: Some(announcement.note),
            action: "BreakerTransition".into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, &policy.object_ref(&())).await {
            tracing::warn!(error = %Report(&err), "could not publish event");
        }
        Some(target.policy)
    }

    /// What the status of `policy` is made of, and when to look again without an event.
    async fn findings(&self, policy: &Policy) -> Result<(Findings, Duration)> {
        let inventory = self.inventory(policy).await?;
        let assessment = policy.assess(&inventory);
        let name = policy.name();
        let breakers = match policy.breaker_section() {
            Some(_) => Some(self.read_breakers(&name, &inventory).await),
            None => None,
        };
        let shadow = match policy.shadow_limits() {
            Some(_) => Some(self.read_shadow(&name, &inventory).await),
            None => None,
        };
        let lease = match policy.lease() {
            Some(lease) => Some(self.read_lease(lease).await),
            None => None,
        };
        let relay = match policy.relay() {
            Some(relay) => Some(self.run_relay(relay, &assessment.accepted).await?),
            None => None,
        };
        let requeue = match (&lease, &relay) {
            (Some(lease), _) => lease_requeue(lease),
            (None, Some(_)) => RELAY_RESYNC,
            (None, None) if breakers.is_some() || shadow.is_some() => LIVE_RESYNC,
            (None, None) => RESYNC,
        };
        let generation = policy.meta().generation.unwrap_or(1);
        let findings = Findings {
            assessment,
            acknowledgements: self
                .options
                .cache
                .as_ref()
                .map(|cache| cache.acknowledgements(policy.kind(), &policy.name(), generation)),
            lease,
            relay,
            breakers,
            shadow,
        };
        Ok((findings, requeue))
    }
}

/// Reads every key with `read`, a few at a time, in order; the first failure fails all.
async fn read_all<R: ?Sized + Sync + Send, T>(
    reader: &Arc<R>,
    keys: Vec<String>,
    read: for<'a> fn(&'a R, &'a str) -> BoxFuture<'a, std::result::Result<T, lease::StoreError>>,
) -> std::result::Result<Vec<T>, lease::StoreError> {
    futures::stream::iter(keys)
        .map(|key| {
            let reader = reader.clone();
            async move { read(&reader, &key).await }
        })
        .buffered(READS_IN_FLIGHT)
        .try_collect()
        .await
}

/// Reconciles one resource: gathers its findings, then writes its status and Events if
/// anything changed.
pub async fn reconcile<K: Kind>(object: Arc<K>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let policy = object.clone().policy();
    let kind = policy.kind();
    let (findings, requeue) = ctx.findings(&policy).await?;
    let accepted = findings.assessment.accepted.clone();
    let now = Time(jiff::Timestamp::now());
    let status = status::assemble(findings, policy.meta().generation, policy.conditions(), &now);

    if status_changed(&policy, &status) {
        let name = policy.name();
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &name.namespace);
        let body = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": kind,
            // A lease field left out (no holder any more) is removed by the API server: the
            // operator is its only manager and stops applying it.
            "status": status,
        });
        let params = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&name.name, &params, &Patch::Apply(&body)).await?;
        ctx.options.state.metrics.status_writes.get_or_create(&KindLabel { kind }).inc();
        publish_events(&ctx.recorder, &object.object_ref(&()), &policy, &status).await;
        tracing::info!(kind, namespace = %name.namespace, name = %name.name, accepted = accepted.ok, reason = accepted.reason, "status updated");
    }
    if let Ok(mut failures) = ctx.failures.lock() {
        failures.remove(&(kind, policy.name()));
    }
    ctx.options.state.metrics.observe(kind, started.elapsed());
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
        || policy.relay_fields() != status.relay
        || policy.breakers() != status.breakers.as_slice()
        || policy.shadow() != status.shadow.as_slice()
}

async fn publish_events(
    recorder: &Recorder,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    policy: &Policy,
    status: &OwnedStatus,
) {
    for condition in transitions(policy.conditions(), &status.conditions) {
        if condition.type_ == condition_type::PROGRAMMED {
            continue; // Pending is no news until a data plane reports.
        }
        if condition.type_ == lock_lease::held::TYPE {
            continue; // A lease changes hands as often as the application likes: status only.
        }
        if condition.type_ == breaker::tripped::TYPE {
            continue; // Each breaker transition is an Event of its own, as it is published.
        }
        if condition.type_ == shadow::would_reject::TYPE {
            continue; // It follows the traffic minute by minute: status only.
        }
        let event = Event {
            type_: if condition.status == "True" { EventType::Normal } else { EventType::Warning },
            reason: condition.reason.clone(),
            note: Some(format!("{} is {}: {}", condition.type_, condition.status, condition.message)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(err) = recorder.publish(&event, reference).await {
            tracing::warn!(error = %Report(&err), "could not publish event");
        }
    }
}

/// Backs off by error class, doubling per consecutive failure of the same object.
pub fn error_policy<K: Kind>(object: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let policy = object.policy();
    let kind = policy.kind();
    ctx.options.state.metrics.errors.get_or_create(&ErrorLabels { kind, error: error.metric_label() }).inc();
    let failures = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry((kind, policy.name())).or_insert(0);
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let delay = backoff(error, failures);
    tracing::warn!(kind, name = %policy.name(), error = %Report(error), retry_in = ?delay, "reconcile failed");
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

/// Reconcile triggers beyond the Kubernetes watches (the lease events of agents).
pub struct Triggers {
    /// Objects to reconcile.
    pub objects: BoxStream<'static, ObjectName>,
    /// Reconcile every object on each item.
    pub all: BoxStream<'static, ()>,
}

impl Debug for Triggers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Triggers").finish_non_exhaustive()
    }
}

impl Triggers {
    /// No triggers beyond the watches.
    pub fn none() -> Self {
        Self { objects: futures::stream::empty().boxed(), all: futures::stream::empty().boxed() }
    }

    /// The LockLeases the agents' lease events name, and all of them on each resubscription.
    pub fn from_leases(triggers: lease::Triggers) -> Self {
        let objects = triggers.events.filter_map(|id| async move {
            let parsed = lease::parse_id(&id).map(|(namespace, name)| ObjectName::new(namespace, name));
            if parsed.is_none() {
                tracing::debug!(id, "lease event names no LockLease");
            }
            parsed
        });
        Self { objects: objects.boxed(), all: triggers.resubscribed.boxed() }
    }

    /// The CircuitBreakerPolicies whose breakers the published transitions name, each
    /// transition announced by an Event on its policy first (by `ctx`'s recorder: only the
    /// leader follows transitions, as only it reconciles), and all of them on each
    /// resubscription (transitions published meanwhile are lost, and make no Event).
    pub fn from_breakers(ctx: Arc<Context>, transitions: Followed<Transition>) -> Self {
        let (objects, objects_rx) = tokio::sync::mpsc::channel(256);
        let mut events = transitions.events;
        tokio::spawn(async move {
            while let Some(transition) = events.next().await {
                if let Some(policy) = ctx.breaker_transition(&transition).await
                    && objects.send(policy).await.is_err()
                {
                    return;
                }
            }
        });
        Self {
            objects: tokio_stream::wrappers::ReceiverStream::new(objects_rx).boxed(),
            all: transitions.resubscribed.boxed(),
        }
    }
}

/// Runs the controller of the kind `reflector` holds until `shutdown` resolves. It
/// reconciles a resource when it changes, when a Service or Namespace it
/// [follows](Policy::may_target) changes, when a policy it [follows](Policy::follows)
/// changes or goes, when the acknowledgements of the proxies that carry it change (gathered
/// over [`ACK_BATCH`]), every resource when the xDS feed publishes a new inventory, and on
/// `triggers`.
pub async fn run<K: Kind>(
    ctx: Arc<Context>,
    reflector: &Reflector<K>,
    triggers: Triggers,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let root = ctx.options.root_namespace.clone();
    let config = controller::Config::default().debounce(Duration::from_millis(500));
    let store = reflector.store();
    let (by_service, by_namespace, by_policy) = (store.clone(), store.clone(), store.clone());
    let (root_s, root_n, root_p) = (root.clone(), root.clone(), root);
    let mut controller = Controller::for_shared_stream(reflector.subscribe(), store)
        .with_config(config)
        .graceful_shutdown_on(shutdown)
        .watches_shared_stream(ctx.reflectors.services.subscribe(), move |service| {
            let service = ObjectName::of(service.as_ref());
            concerned(&by_service, |policy| policy.may_target(&service, &root_s))
        })
        .watches_shared_stream(ctx.reflectors.namespaces.subscribe(), move |_| {
            concerned(&by_namespace, |policy| policy.follows_namespace_labels(&root_n))
        })
        .watches_shared_stream(reflector.subscribe(), move |changed| {
            let changed = changed.policy();
            concerned(&by_policy, |policy| policy.follows(&changed, &root_p))
        });
    if let Some(cache) = &ctx.options.cache {
        // Programmed follows the proxies' ACKs: re-evaluate the policies whose facts changed,
        // and every policy after a new inventory is published.
        let everyone = reflector.store();
        let kind = K::kind(&()).into_owned();
        let acks = acknowledgement_changes(cache.clone(), kind).flat_map(move |changes| {
            let refs: Vec<ObjectRef<K>> = match changes {
                Changes::Everything => {
                    everyone.state().iter().map(|object| ObjectRef::from_obj(object.as_ref())).collect()
                }
                Changes::Policies(names) => {
                    names.iter().map(|name| ObjectRef::new(&name.name).within(&name.namespace)).collect()
                }
            };
            futures::stream::iter(refs)
        });
        controller = controller.reconcile_on(acks);
    }
    let objects = triggers.objects.map(|name| ObjectRef::new(&name.name).within(&name.namespace));
    controller
        .reconcile_on(objects)
        .reconcile_all_on(triggers.all)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(error = %Report(&err), "controller event");
            }
        })
        .await;
}

/// The policies of `kind` whose acknowledgement facts changed, taken from `cache` once per
/// [`ACK_BATCH`] at most, or everything after a new inventory was published.
pub fn acknowledgement_changes(cache: Arc<SnapshotCache>, kind: String) -> BoxStream<'static, Changes> {
    let published = cache.published();
    let changes = cache.subscribe_changes();
    futures::stream::unfold((cache, changes, published), move |(cache, mut changes, mut published)| {
        let kind = kind.clone();
        async move {
            loop {
                // Ends with the cache (never, while the controller runs).
                changes.changed().await.ok()?;
                tokio::time::sleep(ACK_BATCH).await;
                changes.borrow_and_update();
                if let Some(taken) = cache.take_changes(&kind, &mut published) {
                    return Some((taken, (cache, changes, published)));
                }
            }
        }
    })
    .boxed()
}

/// The resources of the store whose outcome `concerns` says a change may alter.
fn concerned<K: Kind>(store: &Store<K>, concerns: impl Fn(&Policy) -> bool) -> Vec<ObjectRef<K>> {
    store
        .state()
        .into_iter()
        .filter(|object| concerns(&object.clone().policy()))
        .map(|object| ObjectRef::from_obj(object.as_ref()))
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
            events: tokio_stream::wrappers::ReceiverStream::new(ids_rx),
            resubscribed: tokio_stream::wrappers::ReceiverStream::new(all_rx),
        });
        for id in ["billing/invoice-run", "not-a-lease-id", "shop/a/b", "shop/reindex"] {
            ids.send(id.to_string()).await.expect("send");
        }
        all.send(()).await.expect("send");
        drop((ids, all));
        let objects: Vec<ObjectName> = triggers.objects.collect().await;
        assert_eq!(objects, [ObjectName::new("billing", "invoice-run"), ObjectName::new("shop", "reindex")]);
        assert_eq!(triggers.all.count().await, 1);
    }

    /// Ten proxies connecting and ACKing a policy within one window hand it over once; a
    /// lease's ACK is not a CircuitBreakerPolicy's change; a publish hands over everything.
    #[tokio::test(start_paused = true)]
    async fn acknowledgements_are_handed_over_once_per_window_and_only_for_their_policies() {
        use crate::compile::{CIRCUIT_BREAKER_POLICY, LOCK_LEASE, PolicyVersion, Proxy, Snapshot, type_url};
        use envoy_types::pb::google::protobuf::Any;
        let cache = Arc::new(SnapshotCache::default());
        let carried = |kind, name: &str, type_url: &'static str, snapshot: &mut Snapshot| {
            let any = Any { type_url: type_url.into(), value: name.as_bytes().to_vec() };
            snapshot.insert(type_url, name, any);
            snapshot
                .carry(PolicyVersion { kind, name: ObjectName::new("shop", name), generation: 1 }, type_url);
        };
        cache.set_compiler(Arc::new(move |_: &Proxy| {
            let mut snapshot = Snapshot::default();
            carried(CIRCUIT_BREAKER_POLICY, "payments", type_url::CLUSTER, &mut snapshot);
            carried(LOCK_LEASE, "reindex", type_url::AGENT, &mut snapshot);
            snapshot
        }));
        let mut changes = acknowledgement_changes(cache.clone(), CIRCUIT_BREAKER_POLICY.into());
        let proxies: Vec<Proxy> =
            (0..10).filter_map(|n| Proxy::from_node_id(&format!("shop/api-{n}"))).collect();
        let mut snapshots = Vec::new();
        for proxy in &proxies {
            snapshots.push(cache.connect(proxy));
            cache.subscribe(proxy, type_url::CLUSTER);
        }
        let version = snapshots[0].borrow().version(type_url::CLUSTER);
        for proxy in &proxies {
            cache.ack(proxy, type_url::CLUSTER, &version);
        }
        let payments = ObjectName::new("shop", "payments");
        assert_eq!(changes.next().await, Some(Changes::Policies(vec![payments.clone()])));
        let quiet = tokio::time::timeout(ACK_BATCH * 10, changes.next()).await;
        assert!(quiet.is_err(), "handed over once: {quiet:?}");
        let acks = cache.acknowledgements(CIRCUIT_BREAKER_POLICY, &payments, 1);
        assert_eq!((acks.connected, acks.acknowledged), (10, 10));

        let agent = snapshots[0].borrow().version(type_url::AGENT);
        for proxy in &proxies {
            cache.subscribe(proxy, type_url::AGENT);
            cache.ack(proxy, type_url::AGENT, &agent);
        }
        let lease = cache.acknowledgements(LOCK_LEASE, &ObjectName::new("shop", "reindex"), 1);
        assert_eq!(lease.acknowledged, 10);
        let quiet = tokio::time::timeout(ACK_BATCH * 10, changes.next()).await;
        assert!(quiet.is_err(), "the agent's ACKs say nothing of the policy: {quiet:?}");

        cache.set_compiler(Arc::new(|_: &Proxy| Snapshot::default()));
        assert_eq!(changes.next().await, Some(Changes::Everything));
    }

    #[test]
    fn backoff_depends_on_error_class_and_doubles() {
        assert_eq!(backoff(&api_error(409), 1), Duration::from_millis(200));
        assert_eq!(backoff(&api_error(409), 3), Duration::from_millis(800));
        assert_eq!(backoff(&api_error(429), 1), Duration::from_secs(2));
        assert_eq!(backoff(&api_error(503), 2), Duration::from_secs(4));
        assert_eq!(backoff(&Error::LeaseTaken, 1), Duration::from_secs(10));
        assert_eq!(backoff(&api_error(500), 40), Duration::from_secs(300), "capped");
    }
}
