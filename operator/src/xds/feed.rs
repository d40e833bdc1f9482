//! Keeps the snapshot cache fed in cluster mode: watches everything the compiler reads,
//! rebuilds the inventory after each burst of changes, and hands the cache a new compiler.
//! Runs on every replica, leader or not: every replica serves xDS.

use std::{fmt::Debug, sync::Arc, time::Duration};

use breakwater_api::{CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy};
use futures::{StreamExt, stream};
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{Client, Resource, ResourceExt, runtime::reflector::Store};
use serde::de::DeserializeOwned;

use super::{Compiler, SnapshotCache};
use crate::{
    compile::{Compiled, Proxy},
    inventory::{Inventory, ObjectName},
};

/// How long to wait for a burst of changes to settle before recompiling.
const SETTLE: Duration = Duration::from_millis(200);

fn reflect<K>(client: &Client) -> (Store<K>, impl futures::Stream<Item = ()> + Send + 'static)
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let (reader, events) = crate::controller::reflected::<K>(client);
    let events = events.filter_map(|event| async move {
        if let Err(err) = &event {
            tracing::warn!(error = %err, "xDS watch error");
        }
        event.ok().map(|_| ())
    });
    (reader, events)
}

/// Feeds `cache` until `shutdown` resolves.
pub async fn run(
    client: Client,
    root_namespace: String,
    cache: Arc<SnapshotCache>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let (services, e1) = reflect::<Service>(&client);
    let (namespaces, e2) = reflect::<Namespace>(&client);
    let (slices, e3) = reflect::<EndpointSlice>(&client);
    let (pods, e4) = reflect::<Pod>(&client);
    let (circuit_breakers, e5) = reflect::<CircuitBreakerPolicy>(&client);
    let (rate_limits, e6) = reflect::<RateLimitPolicy>(&client);
    let (lock_leases, e7) = reflect::<LockLease>(&client);
    let (outbox_relays, e8) = reflect::<OutboxRelay>(&client);
    let mut changes = stream::select_all([
        e1.boxed(),
        e2.boxed(),
        e3.boxed(),
        e4.boxed(),
        e5.boxed(),
        e6.boxed(),
        e7.boxed(),
        e8.boxed(),
    ]);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            change = changes.next() => if change.is_none() { return },
        }
        // Let the burst settle, draining what else arrives meanwhile.
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                () = &mut settle => break,
                change = changes.next() => if change.is_none() { return },
            }
        }
        let mut inventory = Inventory::new(&root_namespace);
        services.state().into_iter().for_each(|s| inventory.add_service(s));
        for ns in namespaces.state() {
            inventory.add_namespace(ns.name_any(), ns.labels().clone());
        }
        inventory.endpoint_slices =
            slices.state().into_iter().map(|s| (ObjectName::of(s.as_ref()), s)).collect();
        inventory.pods = pods.state().into_iter().map(|p| (ObjectName::of(p.as_ref()), p)).collect();
        inventory.circuit_breakers = circuit_breakers.state();
        inventory.rate_limits = rate_limits.state();
        inventory.lock_leases = lock_leases.state();
        inventory.outbox_relays = outbox_relays.state();
        cache.set_compiler(compiler(&inventory));
    }
}

/// A compiler over one inventory: what does not depend on the proxy is compiled once,
/// here, and shared by every proxy's snapshot.
pub fn compiler(inventory: &Inventory) -> Compiler {
    let compiled = Arc::new(Compiled::new(inventory));
    Arc::new(move |proxy: &Proxy| compiled.snapshot(proxy))
}
