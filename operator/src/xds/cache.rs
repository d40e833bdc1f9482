//! The snapshot cache: one compiled [`Snapshot`] per connected proxy, what each proxy has
//! acknowledged or rejected, and from that the [`Acknowledgements`] of every policy: facts
//! (counts and the proxies' own messages) that `status` words as `Programmed`.
//!
//! Versions are content hashes of the resources a proxy subscribed to, so the same
//! configuration has the same version on every replica and after a restart, and a proxy
//! that reconnects with the version it holds is not sent the same bytes again.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

use crate::{
    compile::{Carriers, Compiled, Proxy, Snapshot},
    inventory::ObjectName,
};

/// Compiles the snapshot of one proxy from the current inventory.
pub type Compiler = Arc<dyn Fn(&Proxy) -> Snapshot + Send + Sync>;

/// What one proxy said about one resource type.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TypeState {
    /// Resource names it asked for; None = all (wildcard).
    names: Option<BTreeSet<String>>,
    acked: Option<String>,
    /// The version it rejected last, and Envoy's message; cleared by a later ACK.
    rejected: Option<(String, String)>,
}

#[derive(Debug)]
struct Node {
    proxy: Proxy,
    snapshot: watch::Sender<Arc<Snapshot>>,
    types: BTreeMap<String, TypeState>,
    streams: usize,
}

#[derive(Default)]
struct Inner {
    compiler: Option<Compiler>,
    /// The pods that carry each policy, connected or not (empty for a bare compiler).
    carriers: Carriers,
    nodes: BTreeMap<String, Node>,
}

/// What the proxies that carry one policy said about its current generation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acknowledgements {
    /// Connected proxies whose configuration carries the policy.
    pub connected: usize,
    /// Of those, the ones that acknowledged the policy's generation on every resource type
    /// that carries it.
    pub acknowledged: usize,
    /// Pods whose configuration would carry the policy but that have no proxy connected.
    pub not_connected: usize,
    /// The carrying proxies that rejected the version they hold now, with their messages.
    pub rejections: Vec<Rejection>,
}

/// One proxy's NACK of the configuration that carries a policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The proxy's node id (`namespace/pod`).
    pub node: String,
    /// What the proxy said.
    pub message: String,
}

/// Shared by the ADS streams (which record ACKs) and the status side (which reads them).
pub struct SnapshotCache {
    inner: Mutex<Inner>,
    /// Bumped on every change the `Programmed` verdicts may depend on.
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for SnapshotCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotCache").field("nodes", &self.lock().nodes.len()).finish()
    }
}

impl Default for SnapshotCache {
    fn default() -> Self {
        Self { inner: Mutex::default(), changes: watch::Sender::new(0) }
    }
}

/// FNV-1a: a hash with a fixed definition, so versions stay stable across builds.
fn fnv1a(hash: &mut u64, bytes: &[u8]) {
    for byte in bytes {
        *hash ^= u64::from(*byte);
        *hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
}

/// The version of a snapshot's resources of one type, restricted to `names` when given.
pub fn version(snapshot: &Snapshot, type_url: &str, names: Option<&BTreeSet<String>>) -> String {
    let mut hash = 0xcbf2_9ce4_8422_2325;
    for (name, any) in snapshot.resources.get(type_url).into_iter().flatten() {
        if names.is_none_or(|n| n.contains(name)) {
            fnv1a(&mut hash, name.as_bytes());
            fnv1a(&mut hash, &[0]);
            fnv1a(&mut hash, &any.value);
            fnv1a(&mut hash, &[0]);
        }
    }
    format!("{hash:016x}")
}

impl SnapshotCache {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A receiver that wakes on every change of ACK state or snapshots.
    pub fn subscribe_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Serves what `compiled` compiles to every proxy, and counts the pods it says carry a
    /// policy in that policy's [`Acknowledgements`], connected or not.
    pub fn publish(&self, compiled: Compiled) {
        let carriers = compiled.carriers();
        let compiled = Arc::new(compiled);
        self.replace(Arc::new(move |proxy: &Proxy| compiled.snapshot(proxy)), carriers);
    }

    /// Serves what `compiler` compiles (a stand-in for [`publish`](Self::publish) in tests:
    /// only connected proxies count as carrying a policy).
    pub fn set_compiler(&self, compiler: Compiler) {
        self.replace(compiler, Carriers::default());
    }

    /// Replaces the compiler (the inventory changed) and recompiles every connected proxy;
    /// only proxies whose snapshot differs are woken.
    fn replace(&self, compiler: Compiler, carriers: Carriers) {
        let mut inner = self.lock();
        for node in inner.nodes.values() {
            let snapshot = compiler(&node.proxy);
            node.snapshot.send_if_modified(|current| {
                let differs = **current != snapshot;
                if differs {
                    *current = Arc::new(snapshot);
                }
                differs
            });
        }
        inner.compiler = Some(compiler);
        inner.carriers = carriers;
        drop(inner);
        self.changed();
    }

    /// Registers a stream of `proxy`; the receiver yields its current and future snapshots.
    pub fn connect(&self, proxy: &Proxy) -> watch::Receiver<Arc<Snapshot>> {
        let mut inner = self.lock();
        let snapshot = inner.compiler.as_ref().map(|c| c(proxy)).unwrap_or_default();
        let node = inner.nodes.entry(proxy.node_id()).or_insert_with(|| Node {
            proxy: proxy.clone(),
            snapshot: watch::Sender::new(Arc::new(Snapshot::default())),
            types: BTreeMap::new(),
            streams: 0,
        });
        node.streams += 1;
        node.snapshot.send_replace(Arc::new(snapshot));
        let receiver = node.snapshot.subscribe();
        drop(inner);
        self.changed();
        receiver
    }

    /// Unregisters a stream; the proxy is forgotten when its last stream ends.
    pub fn disconnect(&self, proxy: &Proxy) {
        let mut inner = self.lock();
        let id = proxy.node_id();
        if let Some(node) = inner.nodes.get_mut(&id) {
            node.streams = node.streams.saturating_sub(1);
            if node.streams == 0 {
                inner.nodes.remove(&id);
            }
        }
        drop(inner);
        self.changed();
    }

    fn update_type(&self, proxy: &Proxy, type_url: &str, update: impl FnOnce(&mut TypeState)) {
        let mut inner = self.lock();
        if let Some(node) = inner.nodes.get_mut(&proxy.node_id()) {
            update(node.types.entry(type_url.to_string()).or_default());
        }
        drop(inner);
        self.changed();
    }

    pub fn subscribe(&self, proxy: &Proxy, type_url: &str, names: Option<BTreeSet<String>>) {
        self.update_type(proxy, type_url, |state| state.names = names);
    }

    pub fn ack(&self, proxy: &Proxy, type_url: &str, version: &str) {
        self.update_type(proxy, type_url, |state| {
            state.acked = Some(version.to_string());
            state.rejected = None;
        });
    }

    pub fn nack(&self, proxy: &Proxy, type_url: &str, version: &str, message: &str) {
        self.update_type(proxy, type_url, |state| {
            state.rejected = Some((version.to_string(), message.to_string()))
        });
    }

    /// How many proxies are connected.
    pub fn connected(&self) -> usize {
        self.lock().nodes.len()
    }

    /// What the proxies carrying the policy `kind` `name` said about `generation`. A
    /// connected proxy carries the policy when its snapshot does; it has acknowledged it
    /// when its snapshot carries that generation and it ACKed the current version of every
    /// resource type that carries the policy (a type it never subscribed to is not
    /// acknowledged). ACKs and NACKs of other types say nothing about the policy: an Envoy
    /// rejecting a listener does not reject a lease its agent holds.
    pub fn acknowledgements(
        &self,
        kind: &'static str,
        name: &ObjectName,
        generation: i64,
    ) -> Acknowledgements {
        let inner = self.lock();
        let pods = inner.carriers.pods(kind, name);
        let mut facts = Acknowledgements::default();
        let mut connected_pods = 0;
        for (id, node) in &inner.nodes {
            let snapshot = node.snapshot.borrow().clone();
            let carried = snapshot.policies.iter().find(|(p, _)| p.kind == kind && &p.name == name);
            let Some((carried, types)) = carried else { continue };
            facts.connected += 1;
            if pods.is_some_and(|pods| pods.contains(&node.proxy.pod)) {
                connected_pods += 1;
            }
            let mut acknowledged = carried.generation == generation && !types.is_empty();
            let mut rejection = None;
            for type_url in types {
                let Some(state) = node.types.get(*type_url) else {
                    acknowledged = false;
                    continue;
                };
                let current = version(&snapshot, type_url, state.names.as_ref());
                if let Some((rejected, message)) = &state.rejected
                    && *rejected == current
                    && rejection.is_none()
                {
                    rejection = Some(Rejection { node: id.clone(), message: message.clone() });
                }
                acknowledged &= state.acked.as_deref() == Some(current.as_str());
            }
            if acknowledged {
                facts.acknowledged += 1;
            }
            facts.rejections.extend(rejection);
        }
        facts.not_connected = pods.map_or(0, |pods| pods.len().saturating_sub(connected_pods));
        facts
    }
}
