//! The snapshot cache: one compiled [`Snapshot`] per connected proxy, what each proxy has
//! acknowledged or rejected, and from that the [`Acknowledgements`] of every policy: facts
//! (counts and the proxies' own messages) that `status` words as `Programmed`.
//!
//! Versions are content hashes of the resources a proxy subscribed to, so the same
//! configuration has the same version on every replica and after a restart, and a proxy
//! that reconnects with the version it holds is not sent the same bytes again.
//!
//! The facts are kept up to date as things happen, not worked out when asked: each node's
//! current version of each type it subscribed to is hashed once, when its snapshot or its
//! subscription changes, and each policy's counts change only when a node that carries it
//! connects, disconnects, gets another snapshot, or ACKs or NACKs a type that carries it.
//! So a query costs O(1) plus its rejections, and an ACK touches only the policies its type
//! carries on that node, never the other proxies: with thousands of proxies ACKing at once,
//! nothing under the one lock grows with their number. Compiling and hashing run outside
//! the lock. The cache also remembers which policies' facts changed, for the controllers to
//! reconcile just those ([`SnapshotCache::take_changes`]).

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, MutexGuard},
};

use tokio::sync::watch;

use crate::{
    compile::{Carriers, Compiled, Part, PolicyVersion, Proxy, Snapshot},
    inventory::ObjectName,
};

/// Compiles the snapshot of one proxy from the current inventory.
pub type Compiler = Arc<dyn Fn(&Proxy) -> Snapshot + Send + Sync>;

/// A policy by kind and name (any generation).
type PolicyKey = (&'static str, ObjectName);

/// What one proxy said about one resource type, and the version it should hold of it.
#[derive(Clone, Debug, Default)]
struct TypeState {
    /// The version of the type in the node's current snapshot (`Snapshot::version`).
    current: Option<String>,
    acked: Option<String>,
    /// The version it rejected last, and Envoy's message; cleared by a later ACK.
    rejected: Option<(String, Arc<str>)>,
}

impl TypeState {
    /// What the type says about every policy it carries on this node.
    fn verdict(&self) -> TypeVerdict {
        let Some(current) = &self.current else { return TypeVerdict::default() };
        TypeVerdict {
            acknowledged: self.acked.as_ref() == Some(current),
            rejected: self
                .rejected
                .as_ref()
                .filter(|(version, _)| version == current)
                .map(|(_, m)| m.clone()),
        }
    }
}

/// Whether a node acknowledged the current version of one type, and its message if it
/// rejected that version.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct TypeVerdict {
    acknowledged: bool,
    rejected: Option<Arc<str>>,
}

/// What one node adds to the facts of one policy its snapshot carries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Contribution {
    acknowledged: bool,
    rejected: Option<Arc<str>>,
}

/// Policies carried on the same resource types: a node that carries them adds the same to
/// the facts of each, so it adds it once, to their group ([`Ledger`]). The group of a part
/// every proxy shares is worked out once per part, not once per proxy.
#[derive(Debug)]
struct Carried {
    /// By key, one generation each.
    policies: Box<[(PolicyKey, i64)]>,
    /// Sorted.
    types: Box<[&'static str]>,
    /// The kinds among `policies`, for handing out changes by kind.
    kinds: Box<[&'static str]>,
}

impl Carried {
    /// Groups policies by the types that carry them and by whether `counted` says the node's
    /// pod is one of their carriers. Of two generations of one policy, the lower one counts,
    /// as it always has (the compiler never produces this).
    fn group<'a>(
        policies: impl Iterator<Item = (&'a PolicyVersion, &'a BTreeSet<&'static str>)>,
        counted: impl Fn(&PolicyVersion) -> bool,
    ) -> Vec<(Arc<Carried>, bool)> {
        let mut seen = BTreeSet::new();
        // By the types that carry them and whether the pod counts.
        type Key = (Vec<&'static str>, bool);
        let mut groups: BTreeMap<Key, Vec<(PolicyKey, i64)>> = BTreeMap::new();
        for (policy, types) in policies {
            if !seen.insert((policy.kind, &policy.name)) {
                continue;
            }
            let key = (types.iter().copied().collect(), counted(policy));
            groups.entry(key).or_default().push(((policy.kind, policy.name.clone()), policy.generation));
        }
        groups
            .into_iter()
            .map(|((types, counted), mut policies)| {
                policies.sort_by(|a, b| a.0.cmp(&b.0));
                let kinds: BTreeSet<&'static str> = policies.iter().map(|((kind, _), _)| *kind).collect();
                let carried = Carried {
                    policies: policies.into(),
                    types: types.into(),
                    kinds: kinds.into_iter().collect(),
                };
                (Arc::new(carried), counted)
            })
            .collect()
    }

    fn generation(&self, key: &PolicyKey) -> Option<i64> {
        let at = self.policies.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        Some(self.policies[at].1)
    }
}

/// A part's groups when every policy it carries is carried by every pod (the shared part
/// with the compiler's carriers): then the pod counts the same for all of them, and the
/// groups are worked out once for every proxy that has the part.
#[derive(Debug, Default)]
struct PartPlans {
    /// By the part's and the carriers' addresses (both kept alive here); None: not carried
    /// by every pod.
    parts: HashMap<(usize, usize), PartPlan>,
}

#[derive(Debug)]
struct PartPlan {
    _part: Arc<Part>,
    _carriers: Arc<CarrierPods>,
    groups: Option<Arc<[Arc<Carried>]>>,
}

/// What a snapshot carries, worked out outside the lock.
#[derive(Debug, Default)]
struct Plan {
    /// The types that carry at least one policy, sorted.
    carrying: Vec<&'static str>,
    /// Each group, whether the node's pod counts for it, and its types as indices into
    /// `carrying`.
    groups: Vec<(Arc<Carried>, bool, Box<[usize]>)>,
}

impl Plan {
    fn of(
        snapshot: &Snapshot,
        carriers: &Arc<CarrierPods>,
        pod: &ObjectName,
        plans: &Mutex<PartPlans>,
    ) -> Self {
        let counted =
            |p: &PolicyVersion| carriers.pods(p.kind, &p.name).is_some_and(|pods| pods.contains(pod));
        let parts: Vec<&Arc<Part>> = snapshot.parts().iter().filter(|p| !p.policies().is_empty()).collect();
        let mut groups = Vec::new();
        if overlap(&parts) {
            // One policy in two parts: their types are merged, as one snapshot's.
            let merged = snapshot.policies();
            groups = Carried::group(merged.iter().map(|(p, t)| (*p, t)), counted);
        } else {
            for part in parts {
                match shared_groups(part, carriers, plans) {
                    Some(shared) => {
                        let pod_counted = carriers.has_pod(pod);
                        groups.extend(shared.iter().map(|c| (c.clone(), pod_counted)));
                    }
                    None => groups.extend(Carried::group(part.policies().iter(), counted)),
                }
            }
        }
        let carrying: Vec<&'static str> = groups
            .iter()
            .flat_map(|(c, _)| c.types.iter().copied())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let groups = groups
            .into_iter()
            .map(|(carried, pod_counted)| {
                let types = carried.types.iter().filter_map(|t| carrying.binary_search(t).ok()).collect();
                (carried, pod_counted, types)
            })
            .collect();
        Self { carrying, groups }
    }
}

/// Whether two of the parts carry the same policy (by kind and name).
fn overlap(parts: &[&Arc<Part>]) -> bool {
    let carries = |part: &Part, p: &PolicyVersion| {
        let from = PolicyVersion { kind: p.kind, name: p.name.clone(), generation: i64::MIN };
        part.policies().range(from..).next().is_some_and(|(q, _)| q.kind == p.kind && q.name == p.name)
    };
    parts.iter().enumerate().any(|(i, a)| {
        parts[i + 1..].iter().any(|b| {
            let (small, large) = if a.policies().len() <= b.policies().len() { (a, b) } else { (b, a) };
            small.policies().keys().any(|p| carries(large, p))
        })
    })
}

/// The part's groups if every policy it carries is carried by every pod, worked out once.
fn shared_groups(
    part: &Arc<Part>,
    carriers: &Arc<CarrierPods>,
    plans: &Mutex<PartPlans>,
) -> Option<Arc<[Arc<Carried>]>> {
    let key = (Arc::as_ptr(part) as usize, Arc::as_ptr(carriers) as usize);
    let lock = || plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(plan) = lock().parts.get(&key) {
        return plan.groups.clone();
    }
    let all_shared = part.policies().keys().all(|p| carriers.is_shared(p.kind, &p.name));
    let groups: Option<Arc<[Arc<Carried>]>> = all_shared
        .then(|| Carried::group(part.policies().iter(), |_| true).into_iter().map(|(c, _)| c).collect());
    let plan = PartPlan { _part: part.clone(), _carriers: carriers.clone(), groups: groups.clone() };
    lock().parts.insert(key, plan);
    groups
}

#[derive(Debug)]
struct Node {
    proxy: Proxy,
    id: Arc<str>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    /// The compiler generation (`Inner::epoch`) the snapshot came from.
    epoch: u64,
    /// Bumped each time the snapshot's content changes.
    seq: u64,
    types: BTreeMap<String, TypeState>,
    streams: usize,
    /// The types that carry a policy in the snapshot, sorted.
    carrying: Vec<&'static str>,
    /// `types[carrying[i]].verdict()`, kept in step.
    verdicts: Vec<TypeVerdict>,
    /// The groups of policies its snapshot carries: into [`Ledger::groups`], with their
    /// types as indices into `carrying` (ascending, i.e. in type URL order: the order in
    /// which the first rejection is looked for).
    groups: Vec<(usize, Box<[usize]>)>,
    /// For each of `carrying`, the slots it carries.
    by_type: Vec<Vec<usize>>,
}

impl Node {
    fn new(proxy: &Proxy, snapshot: Snapshot, epoch: u64) -> Self {
        let id = proxy.node_id();
        Self {
            proxy: proxy.clone(),
            id: id.into(),
            snapshot: watch::Sender::new(Arc::new(snapshot)),
            epoch,
            seq: 0,
            types: BTreeMap::new(),
            streams: 1,
            carrying: Vec::new(),
            verdicts: Vec::new(),
            groups: Vec::new(),
            by_type: Vec::new(),
        }
    }

    fn verdict_of(&self, type_url: &str) -> TypeVerdict {
        self.types.get(type_url).map(TypeState::verdict).unwrap_or_default()
    }

    fn contribution(&self, types: &[usize]) -> Contribution {
        let verdict = |t: &usize| self.verdicts.get(*t);
        Contribution {
            acknowledged: !types.is_empty()
                && types.iter().all(|t| verdict(t).is_some_and(|v| v.acknowledged)),
            rejected: types.iter().find_map(|t| verdict(t).and_then(|v| v.rejected.clone())),
        }
    }

    /// Takes this node's part out of the facts of every policy it carries.
    fn retire(&self, ledger: &mut Ledger) {
        for (group, types) in &self.groups {
            ledger.remove(&self.id, *group, &self.contribution(types));
        }
    }

    /// Carries what `plan` says from now on, and adds this node's part to those policies'
    /// facts (after [`retire`](Self::retire), or on a new node).
    fn admit(&mut self, plan: Plan, ledger: &mut Ledger) {
        self.verdicts = plan.carrying.iter().map(|t| self.verdict_of(t)).collect();
        self.by_type = vec![Vec::new(); plan.carrying.len()];
        self.carrying = plan.carrying;
        self.groups = plan
            .groups
            .into_iter()
            .map(|(carried, pod_counted, types)| (ledger.join(carried, pod_counted), types))
            .collect();
        for (index, (group, types)) in self.groups.iter().enumerate() {
            for t in types {
                if let Some(groups) = self.by_type.get_mut(*t) {
                    groups.push(index);
                }
            }
            ledger.add(&self.id, *group, &self.contribution(types));
        }
    }

    /// After `type_url`'s state changed: moves the facts of the policies it carries here.
    fn refresh(&mut self, type_url: &str, ledger: &mut Ledger) {
        let Ok(t) = self.carrying.binary_search_by(|carrying| (*carrying).cmp(type_url)) else { return };
        let verdict = self.verdict_of(type_url);
        let Some(groups) = self.by_type.get(t) else { return };
        if self.verdicts.get(t) == Some(&verdict) {
            return;
        }
        let before: Vec<Contribution> =
            groups.iter().map(|g| self.contribution(&self.groups[*g].1)).collect();
        self.verdicts[t] = verdict;
        for (g, before) in groups.iter().zip(before) {
            let (group, types) = &self.groups[*g];
            ledger.change(&self.id, *group, &before, &self.contribution(types));
        }
    }
}

/// What the nodes carrying one group of policies said.
#[derive(Debug)]
struct Group {
    carried: Arc<Carried>,
    /// Whether these nodes' pods are among the policies' carriers.
    pod_counted: bool,
    /// Connected nodes whose snapshot carries the group.
    connected: usize,
    /// Of those, the ones that acknowledged every type that carries it.
    acknowledged: usize,
    /// By node id: the message of the first carrying type that rejected its current version.
    rejections: BTreeMap<Arc<str>, Arc<str>>,
}

/// The facts of every policy, kept by group, and which policies' facts changed since the
/// controllers last looked.
#[derive(Debug, Default)]
struct Ledger {
    /// By the group's policies' address and whether the pod counts.
    index: HashMap<(usize, bool), usize>,
    groups: Vec<Option<Group>>,
    /// Entries of `groups` no node uses any more, to reuse.
    free: Vec<usize>,
    /// The groups each policy is in.
    by_policy: HashMap<PolicyKey, Vec<usize>>,
    /// By kind, the groups whose facts changed and no one has taken yet (by address).
    dirty: HashMap<&'static str, BTreeMap<usize, Arc<Carried>>>,
}

impl Ledger {
    /// The group of `carried` for nodes whose pod counts as `pod_counted`; made on first use.
    fn join(&mut self, carried: Arc<Carried>, pod_counted: bool) -> usize {
        let key = (Arc::as_ptr(&carried) as usize, pod_counted);
        if let Some(index) = self.index.get(&key) {
            return *index;
        }
        let index = self.free.pop().unwrap_or_else(|| {
            self.groups.push(None);
            self.groups.len() - 1
        });
        for (policy, _) in carried.policies.iter() {
            self.by_policy.entry(policy.clone()).or_default().push(index);
        }
        self.groups[index] =
            Some(Group { carried, pod_counted, connected: 0, acknowledged: 0, rejections: BTreeMap::new() });
        self.index.insert(key, index);
        index
    }

    fn mark(&mut self, group: usize) {
        let Some(Some(group)) = self.groups.get(group) else { return };
        for kind in group.carried.kinds.iter() {
            let carried = &group.carried;
            self.dirty.entry(kind).or_default().insert(Arc::as_ptr(carried) as usize, carried.clone());
        }
    }

    fn add(&mut self, node: &Arc<str>, group: usize, contribution: &Contribution) {
        if let Some(Some(g)) = self.groups.get_mut(group) {
            g.connected += 1;
        }
        self.change(node, group, &Contribution::default(), contribution);
        self.mark(group);
    }

    fn remove(&mut self, node: &Arc<str>, group: usize, contribution: &Contribution) {
        self.change(node, group, contribution, &Contribution::default());
        self.mark(group);
        let Some(Some(g)) = self.groups.get_mut(group) else { return };
        g.connected = g.connected.saturating_sub(1);
        if g.connected == 0 {
            // No node carries it: forget it (its facts are all zero).
            let Some(g) = self.groups[group].take() else { return };
            self.index.remove(&(Arc::as_ptr(&g.carried) as usize, g.pod_counted));
            for (policy, _) in g.carried.policies.iter() {
                if let Some(groups) = self.by_policy.get_mut(policy) {
                    groups.retain(|other| *other != group);
                    if groups.is_empty() {
                        self.by_policy.remove(policy);
                    }
                }
            }
            self.free.push(group);
        }
    }

    fn change(&mut self, node: &Arc<str>, group: usize, before: &Contribution, after: &Contribution) {
        if before == after {
            return;
        }
        let Some(Some(g)) = self.groups.get_mut(group) else { return };
        if before.acknowledged {
            g.acknowledged = g.acknowledged.saturating_sub(1);
        }
        if after.acknowledged {
            g.acknowledged += 1;
        }
        match &after.rejected {
            Some(message) => g.rejections.insert(node.clone(), message.clone()),
            None => g.rejections.remove(node),
        };
        self.mark(group);
    }
}

/// The pods that carry each policy: the compiler's [`Carriers`], or a plain list in tests.
#[derive(Debug, Default)]
enum CarrierPods {
    #[default]
    None,
    Compiled(Carriers),
    #[cfg(test)]
    Listed(BTreeMap<PolicyKey, BTreeSet<ObjectName>>),
}

impl CarrierPods {
    /// Whether every pod carries the policy (so a node's pod counts the same for all such).
    fn is_shared(&self, kind: &'static str, name: &ObjectName) -> bool {
        match self {
            Self::Compiled(carriers) => carriers.is_shared(kind, name),
            _ => false,
        }
    }

    /// Whether `pod` is one of the pods the shared policies count.
    fn has_pod(&self, pod: &ObjectName) -> bool {
        match self {
            Self::Compiled(carriers) => carriers.has_pod(pod),
            _ => false,
        }
    }

    fn pods(&self, kind: &'static str, name: &ObjectName) -> Option<&BTreeSet<ObjectName>> {
        match self {
            Self::None => None,
            Self::Compiled(carriers) => carriers.pods(kind, name),
            #[cfg(test)]
            Self::Listed(listed) => listed.get(&(kind, name.clone())),
        }
    }
}

#[derive(Default)]
struct Inner {
    compiler: Option<Compiler>,
    /// The pods that carry each policy, connected or not (none for a bare compiler).
    carriers: Arc<CarrierPods>,
    /// Bumped with every compiler: a snapshot from an older one is never installed over a
    /// newer one.
    epoch: u64,
    nodes: BTreeMap<String, Node>,
    ledger: Ledger,
    /// Compilers being rolled out node by node: until they are done the facts mix two
    /// inventories, so no change is handed out ([`SnapshotCache::take_changes`]).
    publishing: usize,
    /// Compilers rolled out: after each, every policy's facts may have changed.
    published: u64,
}

/// What changed for the policies of one kind since the caller last asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Changes {
    /// A new inventory was published: anything may have changed.
    Everything,
    /// The facts of these policies changed (a proxy that carries them connected,
    /// disconnected, or ACKed or NACKed a type that carries them).
    Policies(Vec<ObjectName>),
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
    /// The groups of parts every proxy shares, worked out once per part.
    plans: Mutex<PartPlans>,
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
        Self { inner: Mutex::default(), plans: Mutex::default(), changes: watch::Sender::new(0) }
    }
}

/// A node's state as a compiler rollout found it, to compile outside the lock.
struct Rollout {
    id: String,
    proxy: Proxy,
    snapshot: Arc<Snapshot>,
    /// The node's snapshot sequence then.
    seq: u64,
    /// The types the node subscribed to.
    types: Vec<String>,
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

    /// How many inventories were published so far: the starting point of
    /// [`take_changes`](Self::take_changes).
    pub fn published(&self) -> u64 {
        self.lock().published
    }

    /// Hands over the policies of `kind` whose facts changed since the last call (each
    /// policy to one caller: one controller per kind takes them), or
    /// [`Changes::Everything`] when an inventory was published since `published` (which is
    /// then brought up to date). None when nothing changed, and while an inventory is being
    /// rolled out (its end is a change).
    pub fn take_changes(&self, kind: &str, published: &mut u64) -> Option<Changes> {
        let mut inner = self.lock();
        if inner.publishing > 0 {
            return None;
        }
        let dirty = inner.ledger.dirty.remove(kind).unwrap_or_default();
        let names: BTreeSet<ObjectName> = dirty
            .values()
            .flat_map(|carried| carried.policies.iter())
            .filter(|((k, _), _)| *k == kind)
            .map(|((_, name), _)| name.clone())
            .collect();
        let names: Vec<ObjectName> = names.into_iter().collect();
        if inner.published != *published {
            *published = inner.published;
            return Some(Changes::Everything);
        }
        (!names.is_empty()).then_some(Changes::Policies(names))
    }

    /// Serves what `compiled` compiles to every proxy, and counts the pods it says carry a
    /// policy in that policy's [`Acknowledgements`], connected or not.
    pub fn publish(&self, compiled: Compiled) {
        let carriers = compiled.carriers();
        let compiled = Arc::new(compiled);
        self.replace(
            Arc::new(move |proxy: &Proxy| compiled.snapshot(proxy)),
            CarrierPods::Compiled(carriers),
        );
    }

    /// Serves what `compiler` compiles (a stand-in for [`publish`](Self::publish) in tests:
    /// only connected proxies count as carrying a policy).
    pub fn set_compiler(&self, compiler: Compiler) {
        self.replace(compiler, CarrierPods::None);
    }

    /// Replaces the compiler (the inventory changed) and recompiles every connected proxy;
    /// only proxies whose snapshot differs are woken. Compiling and hashing happen outside
    /// the lock, one node at a time; the lock is held per node only to swap its snapshot and
    /// move its part of the facts.
    fn replace(&self, compiler: Compiler, carriers: CarrierPods) {
        let carriers = Arc::new(carriers);
        // The parts and carriers planned so far belong to the inventory being replaced.
        *self.plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = PartPlans::default();
        let (epoch, rollouts) = {
            let mut inner = self.lock();
            inner.epoch += 1;
            inner.compiler = Some(compiler.clone());
            inner.carriers = carriers.clone();
            inner.publishing += 1;
            let rollouts: Vec<Rollout> = inner
                .nodes
                .iter()
                .map(|(id, node)| Rollout {
                    id: id.clone(),
                    proxy: node.proxy.clone(),
                    snapshot: node.snapshot.borrow().clone(),
                    seq: node.seq,
                    types: node.types.keys().cloned().collect(),
                })
                .collect();
            (inner.epoch, rollouts)
        };
        for rollout in rollouts {
            let snapshot = compiler(&rollout.proxy);
            let plan = Plan::of(&snapshot, &carriers, &rollout.proxy.pod, &self.plans);
            let (snapshot, versions) = if *rollout.snapshot == snapshot {
                (rollout.snapshot, None)
            } else {
                let versions = rollout
                    .types
                    .into_iter()
                    .map(|t| {
                        let current = snapshot.version(&t);
                        (t, current)
                    })
                    .collect();
                (Arc::new(snapshot), Some(versions))
            };
            let install = Install { epoch, seen: rollout.seq, snapshot, versions, plan };
            self.lock().install(&rollout.id, install);
        }
        let mut inner = self.lock();
        inner.publishing = inner.publishing.saturating_sub(1);
        inner.published = inner.published.wrapping_add(1);
        drop(inner);
        self.changed();
    }

    /// Registers a stream of `proxy`; the receiver yields its current and future snapshots.
    pub fn connect(&self, proxy: &Proxy) -> watch::Receiver<Arc<Snapshot>> {
        let id = proxy.node_id();
        loop {
            let (compiler, carriers, epoch) = {
                let mut inner = self.lock();
                if let Some(node) = inner.nodes.get_mut(&id) {
                    // Another stream of the same pod (Envoy's and the agent's): its snapshot
                    // is current already.
                    node.streams += 1;
                    let receiver = node.snapshot.subscribe();
                    drop(inner);
                    self.changed();
                    return receiver;
                }
                (inner.compiler.clone(), inner.carriers.clone(), inner.epoch)
            };
            let snapshot = compiler.map(|c| c(proxy)).unwrap_or_default();
            let plan = Plan::of(&snapshot, &carriers, &proxy.pod, &self.plans);
            let mut inner = self.lock();
            if inner.epoch != epoch || inner.nodes.contains_key(&id) {
                continue; // A newer compiler, or another stream of the pod came first: again.
            }
            let Inner { nodes, ledger, .. } = &mut *inner;
            let mut node = Node::new(proxy, snapshot, epoch);
            node.admit(plan, ledger);
            let receiver = node.snapshot.subscribe();
            nodes.insert(id, node);
            drop(inner);
            self.changed();
            return receiver;
        }
    }

    /// Unregisters a stream; the proxy is forgotten when its last stream ends.
    pub fn disconnect(&self, proxy: &Proxy) {
        let mut inner = self.lock();
        let id = proxy.node_id();
        let Inner { nodes, ledger, .. } = &mut *inner;
        if let Some(node) = nodes.get_mut(&id) {
            node.streams = node.streams.saturating_sub(1);
            if node.streams == 0
                && let Some(node) = nodes.remove(&id)
            {
                node.retire(ledger);
            }
        }
        drop(inner);
        self.changed();
    }

    /// Records that a node subscribed to a type: from then on its ACKs and NACKs of the type
    /// are compared with the type's version in the node's snapshot.
    pub fn subscribe(&self, proxy: &Proxy, type_url: &str) {
        let mut inner = self.lock();
        let Inner { nodes, ledger, .. } = &mut *inner;
        let Some(node) = nodes.get_mut(&proxy.node_id()) else { return };
        if node.types.contains_key(type_url) {
            return;
        }
        let current = node.snapshot.borrow().version(type_url);
        node.types.insert(type_url.to_string(), TypeState { current: Some(current), ..TypeState::default() });
        node.refresh(type_url, ledger);
        drop(inner);
        self.changed();
    }

    fn update_type(&self, proxy: &Proxy, type_url: &str, update: impl FnOnce(&mut TypeState)) {
        let id = proxy.node_id();
        let unsubscribed = self.lock().nodes.get(&id).is_some_and(|node| !node.types.contains_key(type_url));
        if unsubscribed {
            // The server always subscribes first.
            self.subscribe(proxy, type_url);
        }
        let mut inner = self.lock();
        let Inner { nodes, ledger, .. } = &mut *inner;
        if let Some(node) = nodes.get_mut(&id)
            && let Some(state) = node.types.get_mut(type_url)
        {
            update(state);
            node.refresh(type_url, ledger);
        }
        drop(inner);
        self.changed();
    }

    pub fn ack(&self, proxy: &Proxy, type_url: &str, version: &str) {
        self.update_type(proxy, type_url, |state| {
            state.acked = Some(version.to_string());
            state.rejected = None;
        });
    }

    pub fn nack(&self, proxy: &Proxy, type_url: &str, version: &str, message: &str) {
        self.update_type(proxy, type_url, |state| {
            state.rejected = Some((version.to_string(), message.into()))
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
    /// rejecting a listener does not reject a lease its agent holds. O(1) plus the
    /// rejections: the facts are kept up to date as the proxies report.
    pub fn acknowledgements(
        &self,
        kind: &'static str,
        name: &ObjectName,
        generation: i64,
    ) -> Acknowledgements {
        let inner = self.lock();
        let pods = inner.carriers.pods(kind, name).map_or(0, BTreeSet::len);
        let key = (kind, name.clone());
        let groups = inner.ledger.by_policy.get(&key).into_iter().flatten();
        let groups: Vec<&Group> = groups.filter_map(|g| inner.ledger.groups.get(*g)?.as_ref()).collect();
        let mut rejections = BTreeMap::new();
        let (mut connected, mut connected_pods, mut acknowledged) = (0, 0, 0);
        for group in groups {
            connected += group.connected;
            connected_pods += if group.pod_counted { group.connected } else { 0 };
            if group.carried.generation(&key) == Some(generation) {
                acknowledged += group.acknowledged;
            }
            rejections.extend(group.rejections.iter().map(|(node, message)| (node.clone(), message.clone())));
        }
        Acknowledgements {
            connected,
            acknowledged,
            not_connected: pods.saturating_sub(connected_pods),
            rejections: rejections
                .into_iter()
                .map(|(node, message)| Rejection { node: node.to_string(), message: message.to_string() })
                .collect(),
        }
    }
}

/// A node's snapshot from one rollout, ready to install.
struct Install {
    /// The compiler generation it came from.
    epoch: u64,
    /// The node's snapshot sequence when the rollout read it.
    seen: u64,
    snapshot: Arc<Snapshot>,
    /// The versions of the types the node had subscribed to; None when the snapshot equals the one the rollout read (nothing was hashed).
    versions: Option<Vec<(String, String)>>,
    plan: Plan,
}

impl Inner {
    /// Installs a node's snapshot (unless one from a newer compiler is installed already)
    /// with the versions hashed for it, and moves its part of the facts.
    fn install(&mut self, id: &str, install: Install) {
        let Self { nodes, ledger, .. } = self;
        let Some(node) = nodes.get_mut(id) else { return };
        if node.epoch >= install.epoch {
            return;
        }
        node.epoch = install.epoch;
        node.retire(ledger);
        // Unchanged since the rollout read it, and equal to what it compiled: nothing to
        // swap (the carriers may still have changed).
        if node.seq != install.seen || install.versions.is_some() {
            let versions = install.versions.unwrap_or_default();
            for (type_url, state) in &mut node.types {
                // A type subscribed to while the rollout compiled: its parts are digested
                // already, so this costs one hash per part.
                let current = versions
                    .iter()
                    .find(|(t, _)| t == type_url)
                    .map_or_else(|| install.snapshot.version(type_url), |(_, current)| current.clone());
                state.current = Some(current);
            }
            node.seq = node.seq.wrapping_add(1);
            node.snapshot.send_replace(install.snapshot);
        }
        node.admit(install.plan, ledger);
    }
}

#[cfg(test)]
mod tests;
