//! One watch per kind, shared by everything that reads the cluster: the controllers (their
//! own kind, and the Services and Namespaces that trigger them) and the xDS feed (every kind
//! the compiler reads). Each [`Reflector`] keeps a kube-runtime store filled from a single
//! watch and hands every subscriber each object the watch applies or deletes, so a
//! subscriber triggered by a change always finds the store already holding it.
//!
//! kube-runtime's own shared streams (`store_shared`) pass applied objects only; a deleted
//! Service or policy must trigger reconciles too (a policy loses its target, a conflict
//! ends), hence this small fan-out.

use std::{
    fmt::Debug,
    sync::{Arc, Mutex, MutexGuard},
};

use breakwater_api::{CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy};
use futures::{
    StreamExt,
    stream::{self, BoxStream},
};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store, store::Writer},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::inventory::{Inventory, ObjectName};

/// What a reflector's kind must be.
pub trait Reflected:
    Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static
{
}

impl<K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static> Reflected
    for K
{
}

/// The store of one kind and the subscribers to its changes.
pub struct Reflector<K: Reflected> {
    store: Store<K>,
    shared: Arc<Mutex<Shared<K>>>,
}

struct Shared<K: Reflected> {
    writer: Writer<K>,
    subscribers: Vec<mpsc::UnboundedSender<Arc<K>>>,
}

impl<K: Reflected> Clone for Reflector<K> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone(), shared: self.shared.clone() }
    }
}

impl<K: Reflected> Debug for Reflector<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reflector").field("kind", &K::kind(&())).field("objects", &self.store.len()).finish()
    }
}

impl<K: Reflected> Default for Reflector<K> {
    /// A reflector no watch feeds: [`apply`](Self::apply) fills it (tests do).
    fn default() -> Self {
        let writer = Writer::default();
        let store = writer.as_reader();
        Self { store, shared: Arc::new(Mutex::new(Shared { writer, subscribers: Vec::new() })) }
    }
}

impl<K: Reflected> Reflector<K> {
    fn lock(&self) -> MutexGuard<'_, Shared<K>> {
        // A panic while holding the lock leaves a consistent store behind; keep going.
        self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The objects as last watched.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// Every object now in the store, then each object the watch applies or deletes from
    /// here on (a deleted one as it was last seen), and every object again after a re-list.
    pub fn subscribe(&self) -> UnboundedReceiverStream<Arc<K>> {
        let (sender, receiver) = mpsc::unbounded_channel();
        // Registered before the store is read: a change applied meanwhile is in the store
        // or sent, never lost.
        self.lock().subscribers.push(sender.clone());
        for object in self.store.state() {
            let _ = sender.send(object);
        }
        UnboundedReceiverStream::new(receiver)
    }

    /// Applies one watch event to the store, then hands the objects it touched to every
    /// subscriber (and forgets the subscribers that went away).
    pub fn apply(&self, event: watcher::Event<K>) {
        let mut shared = self.lock();
        shared.writer.apply_watcher_event(&event);
        let touched = match event {
            watcher::Event::Apply(object) | watcher::Event::Delete(object) => vec![Arc::new(object)],
            watcher::Event::InitDone => self.store.state(),
            watcher::Event::Init | watcher::Event::InitApply(_) => return,
        };
        shared.subscribers.retain(|subscriber| touched.iter().all(|o| subscriber.send(o.clone()).is_ok()));
    }

    /// Watches every object of the kind, cluster-wide, until `stop` is cancelled.
    async fn watch(self, client: Client, stop: CancellationToken) {
        let events = watcher(Api::<K>::all(client), watcher::Config::default()).default_backoff();
        tokio::pin!(events);
        loop {
            let event = tokio::select! {
                () = stop.cancelled() => return,
                event = events.next() => event,
            };
            match event {
                Some(Ok(event)) => self.apply(event),
                Some(Err(error)) => tracing::warn!(kind = %K::kind(&()), %error, "watch failed; retrying"),
                None => return,
            }
        }
    }
}

/// A reflector per kind the operator reads, each fed by one watch.
#[derive(Clone, Debug, Default)]
pub struct Reflectors {
    pub circuit_breakers: Reflector<CircuitBreakerPolicy>,
    pub rate_limits: Reflector<RateLimitPolicy>,
    pub lock_leases: Reflector<LockLease>,
    pub outbox_relays: Reflector<OutboxRelay>,
    pub services: Reflector<Service>,
    pub namespaces: Reflector<Namespace>,
    pub pods: Reflector<Pod>,
    pub endpoint_slices: Reflector<EndpointSlice>,
}

impl Reflectors {
    /// Starts one watch per kind; they run until `stop` is cancelled.
    pub fn watch(client: &Client, stop: &CancellationToken) -> Self {
        let reflectors = Self::default();
        let (client, stop) = (client.clone(), stop.clone());
        tokio::spawn(reflectors.circuit_breakers.clone().watch(client.clone(), stop.clone()));
        tokio::spawn(reflectors.rate_limits.clone().watch(client.clone(), stop.clone()));
        tokio::spawn(reflectors.lock_leases.clone().watch(client.clone(), stop.clone()));
        tokio::spawn(reflectors.outbox_relays.clone().watch(client.clone(), stop.clone()));
        tokio::spawn(reflectors.services.clone().watch(client.clone(), stop.clone()));
        tokio::spawn(reflectors.namespaces.clone().watch(client.clone(), stop.clone()));
        tokio::spawn(reflectors.pods.clone().watch(client.clone(), stop.clone()));
        tokio::spawn(reflectors.endpoint_slices.clone().watch(client, stop));
        reflectors
    }

    /// Waits until every store holds its first complete list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.circuit_breakers.store.wait_until_ready().await?;
        self.rate_limits.store.wait_until_ready().await?;
        self.lock_leases.store.wait_until_ready().await?;
        self.outbox_relays.store.wait_until_ready().await?;
        self.services.store.wait_until_ready().await?;
        self.namespaces.store.wait_until_ready().await?;
        self.pods.store.wait_until_ready().await?;
        self.endpoint_slices.store.wait_until_ready().await
    }

    /// What evaluation reads: Services, Namespaces and the four kinds (Secrets are read by
    /// name when needed; Pods and EndpointSlices only the compiler reads).
    pub fn evaluation_inventory(&self, root_namespace: &str) -> Inventory {
        let mut inventory = Inventory::new(root_namespace);
        for service in self.services.store.state() {
            inventory.add_service(service);
        }
        for namespace in self.namespaces.store.state() {
            inventory.add_namespace(namespace.name_any(), namespace.labels().clone());
        }
        inventory.circuit_breakers = self.circuit_breakers.store.state();
        inventory.rate_limits = self.rate_limits.store.state();
        inventory.lock_leases = self.lock_leases.store.state();
        inventory.outbox_relays = self.outbox_relays.store.state();
        inventory
    }

    /// What the compiler reads: the evaluation's inventory, Pods and EndpointSlices.
    pub fn inventory(&self, root_namespace: &str) -> Inventory {
        let mut inventory = self.evaluation_inventory(root_namespace);
        fn by_name<K: Reflected>(store: &Store<K>) -> std::collections::BTreeMap<ObjectName, Arc<K>> {
            store.state().into_iter().map(|object| (ObjectName::of(object.as_ref()), object)).collect()
        }
        inventory.pods = by_name(&self.pods.store);
        inventory.endpoint_slices = by_name(&self.endpoint_slices.store);
        inventory
    }

    /// One item for every object any watch applies or deletes (and for every object there
    /// is now, to begin with).
    pub fn changes(&self) -> BoxStream<'static, ()> {
        fn unit<K: Reflected>(reflector: &Reflector<K>) -> BoxStream<'static, ()> {
            reflector.subscribe().map(|_| ()).boxed()
        }
        stream::select_all([
            unit(&self.circuit_breakers),
            unit(&self.rate_limits),
            unit(&self.lock_leases),
            unit(&self.outbox_relays),
            unit(&self.services),
            unit(&self.namespaces),
            unit(&self.pods),
            unit(&self.endpoint_slices),
        ])
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    use super::*;

    fn service(name: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                ..ObjectMeta::default()
            },
            ..Service::default()
        }
    }

    fn names(received: &[Arc<Service>]) -> Vec<String> {
        received.iter().map(|s| s.name_any()).collect()
    }

    #[tokio::test]
    async fn subscribers_get_what_is_there_then_every_change_deletions_included() {
        let reflector = Reflector::<Service>::default();
        reflector.apply(watcher::Event::Init);
        reflector.apply(watcher::Event::InitApply(service("a")));
        let early = reflector.subscribe();
        reflector.apply(watcher::Event::InitDone);
        let late = reflector.subscribe();
        reflector.apply(watcher::Event::Apply(service("b")));
        reflector.apply(watcher::Event::Delete(service("a")));
        let store = reflector.store();
        assert_eq!(names(&store.state()), ["b"]);
        drop(reflector);

        let early: Vec<_> = early.collect().await;
        assert_eq!(names(&early), ["a", "b", "a"], "the list when it completes, then each change");
        let late: Vec<_> = late.collect().await;
        assert_eq!(names(&late), ["a", "b", "a"], "what the store held, then each change");
    }
}
