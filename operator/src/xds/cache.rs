//! The snapshot cache: one compiled [`Snapshot`] per connected proxy, what each proxy has
//! acknowledged or rejected, and from that the `Programmed` verdict of every policy.
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
    compile::{Proxy, Snapshot, carried_by},
    inventory::ObjectName,
    policy::{Verdict, reason},
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
    nodes: BTreeMap<String, Node>,
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

    /// Replaces the compiler (the inventory changed) and recompiles every connected proxy;
    /// only proxies whose snapshot differs are woken.
    pub fn set_compiler(&self, compiler: Compiler) {
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

    /// `Programmed` for a policy at `generation`: True once every connected proxy whose
    /// configuration carries the policy has acknowledged the version with this generation,
    /// of every type it subscribed to — or, for kinds that [`carried_by`] narrows, of those
    /// types only (a LockLease: the agent's configuration).
    pub fn programmed(&self, kind: &str, name: &ObjectName, generation: i64) -> Verdict {
        let inner = self.lock();
        let relevant = carried_by(kind);
        let mut applies = 0;
        let mut acked = 0;
        let mut rejections = Vec::new();
        for (id, node) in &inner.nodes {
            let snapshot = node.snapshot.borrow().clone();
            let carried = snapshot.policies.iter().find(|p| p.kind == kind && &p.name == name);
            let Some(carried) = carried else { continue };
            applies += 1;
            let mut all_acked = carried.generation == generation;
            let mut subscribed = false;
            let types = node.types.iter().filter(|(t, _)| relevant.is_none_or(|r| r.contains(&t.as_str())));
            for (type_url, state) in types {
                subscribed = true;
                let current = version(&snapshot, type_url, state.names.as_ref());
                if let Some((rejected, message)) = &state.rejected
                    && *rejected == current
                {
                    rejections.push(format!("{id}: {message}"));
                }
                all_acked &= state.acked.as_deref() == Some(current.as_str());
            }
            // A proxy that has not subscribed to the policy's types has acknowledged nothing.
            if all_acked && subscribed {
                acked += 1;
            }
        }
        if let Some(first) = rejections.first() {
            return Verdict::fail(
                reason::REJECTED,
                format!("rejected by {} of {applies} proxies; {first}", rejections.len()),
            );
        }
        match applies {
            0 => Verdict::fail(reason::PENDING, "no connected proxy carries this policy yet"),
            n if acked == n => {
                Verdict::ok(reason::PROGRAMMED, format!("acknowledged by {acked}/{n} proxies"))
            }
            n => Verdict::fail(reason::PENDING, format!("acknowledged by {acked}/{n} proxies")),
        }
    }
}
