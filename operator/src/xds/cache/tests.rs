//! The incremental bookkeeping against the straightforward definition it replaced:
//! [`SnapshotCache::reference`] computes a policy's facts from scratch, hashing every carrying
//! node's snapshot, as `acknowledgements` did before the facts were kept up to date. Random
//! sequences of connects, subscriptions, ACKs, NACKs, disconnects and publishes must give the
//! same facts after every step, and every policy whose facts changed must be handed out by
//! `take_changes`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use envoy_types::pb::google::protobuf::Any;
use proptest::prelude::*;

use super::*;
use crate::compile::{CIRCUIT_BREAKER_POLICY, LOCK_LEASE, PolicyVersion, RATE_LIMIT_POLICY, type_url};

const NODES: usize = 4;
/// Pods the carriers may list: the connected nodes' and two with no proxy.
const PODS: usize = 6;
const TYPES: [&str; 3] = [type_url::CLUSTER, type_url::LISTENER, type_url::ROUTE];
const NAMES: [&str; 3] = ["a", "b", "c"];
const GENERATIONS: std::ops::RangeInclusive<i64> = 1..=3;

fn policies() -> [PolicyKey; 3] {
    [
        (CIRCUIT_BREAKER_POLICY, ObjectName::new("shop", "p0")),
        (CIRCUIT_BREAKER_POLICY, ObjectName::new("shop", "p1")),
        (RATE_LIMIT_POLICY, ObjectName::new("shop", "p0")),
    ]
}

fn proxy(node: usize) -> Proxy {
    Proxy { pod: ObjectName::new("shop", format!("n{node}")) }
}

impl SnapshotCache {
    /// The definition the incremental facts must agree with: for every connected node, hash
    /// its snapshot's current version of each carrying type and compare.
    fn reference(&self, kind: &'static str, name: &ObjectName, generation: i64) -> Acknowledgements {
        let inner = self.lock();
        let pods = inner.carriers.pods(kind, name);
        let mut facts = Acknowledgements::default();
        let mut connected_pods = 0;
        for (id, node) in &inner.nodes {
            let snapshot = node.snapshot.borrow().clone();
            let carried = snapshot.policies().into_iter().find(|(p, _)| p.kind == kind && &p.name == name);
            let Some((carried, types)) = carried else { continue };
            facts.connected += 1;
            if pods.is_some_and(|pods| pods.contains(&node.proxy.pod)) {
                connected_pods += 1;
            }
            let mut acknowledged = carried.generation == generation && !types.is_empty();
            let mut rejection = None;
            for type_url in types {
                let Some(state) = node.types.get(type_url) else {
                    acknowledged = false;
                    continue;
                };
                let current = snapshot.version(type_url);
                if let Some((rejected, message)) = &state.rejected
                    && *rejected == current
                    && rejection.is_none()
                {
                    rejection = Some(Rejection { node: id.clone(), message: message.to_string() });
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

    /// Every policy's facts at every generation, by the reference definition.
    fn reference_world(&self) -> BTreeMap<PolicyKey, Vec<Acknowledgements>> {
        policies()
            .into_iter()
            .map(|(kind, name)| {
                let facts = GENERATIONS.map(|g| self.reference(kind, &name, g)).collect();
                ((kind, name), facts)
            })
            .collect()
    }

    /// Fails unless the kept facts equal the reference and every node's state is in step
    /// with its snapshot.
    fn check(&self) {
        for (kind, name) in policies() {
            for generation in GENERATIONS {
                assert_eq!(
                    self.acknowledgements(kind, &name, generation),
                    self.reference(kind, &name, generation),
                    "{kind} {name} at generation {generation}"
                );
            }
        }
        let inner = self.lock();
        for (id, node) in &inner.nodes {
            let snapshot = node.snapshot.borrow().clone();
            for (type_url, state) in &node.types {
                let expected = snapshot.version(type_url);
                assert_eq!(state.current.as_ref(), Some(&expected), "{id} {type_url}: version hashed");
            }
            let verdicts: Vec<TypeVerdict> = node.carrying.iter().map(|t| node.verdict_of(t)).collect();
            assert_eq!(node.verdicts, verdicts, "{id}: verdicts in step");
        }
    }

    /// The version `node` should ACK on `type_url` now (None: not connected).
    fn current_version(&self, node: usize, type_url: &str) -> Option<String> {
        let inner = self.lock();
        let node = inner.nodes.get(&proxy(node).node_id())?;
        Some(node.snapshot.borrow().version(type_url))
    }
}

/// A small deterministic mixer (splitmix64), so a seed gives the same world every run.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Bits drawn one after another from a seed.
struct Bits(u64, u64);

impl Bits {
    fn new(seed: u64) -> Self {
        Self(mix(seed), 0)
    }

    fn take(&mut self, range: u64) -> u64 {
        self.1 += 1;
        mix(self.0 ^ self.1) % range
    }
}

/// What `seed` compiles for `proxy`: a few resources per type (few distinct contents, so
/// snapshots and versions often stay the same), and some of the policies at some generation
/// on some types (sometimes none, sometimes one policy twice).
fn snapshot_for(seed: u64, proxy: &Proxy) -> Snapshot {
    let node: u64 = proxy.pod.name.bytes().map(u64::from).sum();
    let mut bits = Bits::new(seed ^ node.wrapping_mul(0x1000_0000_01b3));
    let mut snapshot = Snapshot::default();
    for type_url in TYPES {
        for name in NAMES {
            if bits.take(3) > 0 {
                let value = vec![u8::try_from(bits.take(2)).unwrap_or(0)];
                snapshot.insert(type_url, name.to_string(), Any { type_url: type_url.to_string(), value });
            }
        }
    }
    for (kind, name) in policies() {
        let copies = match bits.take(8) {
            0..=2 => 0,
            7 => 2,
            _ => 1,
        };
        for _ in 0..copies {
            let generation = i64::try_from(bits.take(3)).unwrap_or(0) + 1;
            let types: BTreeSet<&'static str> = TYPES.into_iter().filter(|_| bits.take(2) == 0).collect();
            snapshot.carry_on(PolicyVersion { kind, name: name.clone(), generation }, types);
        }
    }
    snapshot
}

/// The pods `seed` says carry each policy (some policies none, some pods with no proxy).
fn carriers_for(seed: u64) -> CarrierPods {
    let mut bits = Bits::new(seed.rotate_left(17));
    match bits.take(3) {
        0 => CarrierPods::None,
        _ => {
            let mut listed = BTreeMap::new();
            for key in policies() {
                if bits.take(4) > 0 {
                    let pods = (0..PODS).filter(|_| bits.take(2) == 0).map(|p| proxy(p).pod).collect();
                    listed.insert(key, pods);
                }
            }
            CarrierPods::Listed(listed)
        }
    }
}

#[derive(Clone, Debug)]
enum Said {
    Current,
    Stale(u8),
}

#[derive(Clone, Debug)]
enum Op {
    Connect(usize),
    Disconnect(usize),
    Subscribe(usize, usize),
    Ack(usize, usize, Said),
    Nack(usize, usize, Said, u8),
    Publish(u64),
}

fn op() -> impl Strategy<Value = Op> {
    let node = 0..NODES;
    let type_ = 0..TYPES.len();
    let said = prop_oneof![3 => Just(Said::Current), 1 => (0..2u8).prop_map(Said::Stale)];
    prop_oneof![
        2 => node.clone().prop_map(Op::Connect),
        1 => node.clone().prop_map(Op::Disconnect),
        2 => (node.clone(), type_.clone()).prop_map(|(n, t)| Op::Subscribe(n, t)),
        5 => (node.clone(), type_.clone(), said.clone()).prop_map(|(n, t, s)| Op::Ack(n, t, s)),
        2 => (node, type_, said, 0..2u8).prop_map(|(n, t, s, m)| Op::Nack(n, t, s, m)),
        1 => any::<u64>().prop_map(Op::Publish),
    ]
}

fn publish(cache: &SnapshotCache, seed: u64) {
    cache.replace(Arc::new(move |proxy: &Proxy| snapshot_for(seed, proxy)), carriers_for(seed));
}

fn apply(cache: &SnapshotCache, op: &Op) {
    let said = |node, type_url, said: &Said| match said {
        Said::Current => cache.current_version(node, type_url).unwrap_or_default(),
        Said::Stale(n) => format!("stale-{n}"),
    };
    match op {
        Op::Connect(node) => drop(cache.connect(&proxy(*node))),
        Op::Disconnect(node) => cache.disconnect(&proxy(*node)),
        Op::Subscribe(node, t) => cache.subscribe(&proxy(*node), TYPES[*t]),
        Op::Ack(node, t, s) => cache.ack(&proxy(*node), TYPES[*t], &said(*node, TYPES[*t], s)),
        Op::Nack(node, t, s, message) => {
            let message = format!("bad {message}");
            cache.nack(&proxy(*node), TYPES[*t], &said(*node, TYPES[*t], s), &message);
        }
        Op::Publish(seed) => publish(cache, *seed),
    }
}

/// Everything `take_changes` hands out now, for every kind: the policies by kind, or None
/// for a kind told "everything".
fn taken(
    cache: &SnapshotCache,
    published: &mut BTreeMap<&'static str, u64>,
) -> BTreeMap<&'static str, Option<BTreeSet<ObjectName>>> {
    [CIRCUIT_BREAKER_POLICY, RATE_LIMIT_POLICY, LOCK_LEASE]
        .into_iter()
        .map(|kind| {
            let seen = published.entry(kind).or_default();
            let changes = match cache.take_changes(kind, seen) {
                None => Some(BTreeSet::new()),
                Some(Changes::Everything) => None,
                Some(Changes::Policies(names)) => Some(names.into_iter().collect()),
            };
            (kind, changes)
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn kept_facts_equal_the_straightforward_computation(ops in proptest::collection::vec(op(), 1..60)) {
        let cache = SnapshotCache::default();
        let mut published = BTreeMap::new();
        for op in &ops {
            let before = cache.reference_world();
            apply(&cache, op);
            cache.check();
            let after = cache.reference_world();
            let taken = taken(&cache, &mut published);
            for (key, facts) in &after {
                let handed_out = &taken[key.0];
                if matches!(op, Op::Publish(_)) {
                    prop_assert!(handed_out.is_none(), "a publish changes everything: {taken:?}");
                    continue;
                }
                let handed_out = handed_out.as_ref().expect("only a publish is everything");
                let changed = before.get(key) != Some(facts);
                prop_assert!(!changed || handed_out.contains(&key.1), "{op:?}: {key:?} changed but was not handed out");
                // ACKs, NACKs, connects and disconnects hand out exactly what changed.
                if !matches!(op, Op::Subscribe(..)) {
                    prop_assert_eq!(changed, handed_out.contains(&key.1), "{:?}: {:?} handed out unchanged", op, key);
                }
            }
        }
    }
}

/// A world where both proxies carry p0 on clusters and routes, at generation 1.
fn two_proxies() -> SnapshotCache {
    let cache = SnapshotCache::default();
    cache.set_compiler(Arc::new(|_: &Proxy| {
        let mut snapshot = Snapshot::default();
        for type_url in [type_url::CLUSTER, type_url::ROUTE] {
            let any = Any { type_url: type_url.to_string(), value: vec![1] };
            snapshot.insert(type_url, "r", any);
            snapshot.carry(
                PolicyVersion {
                    kind: CIRCUIT_BREAKER_POLICY,
                    name: ObjectName::new("shop", "p0"),
                    generation: 1,
                },
                type_url,
            );
        }
        snapshot
    }));
    for node in 0..2 {
        drop(cache.connect(&proxy(node)));
        for type_url in [type_url::CLUSTER, type_url::ROUTE] {
            cache.subscribe(&proxy(node), type_url);
        }
    }
    cache
}

#[test]
fn an_ack_of_a_type_that_carries_nothing_hands_out_nothing() {
    let cache = two_proxies();
    let mut seen = cache.published();
    let _ = cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen);
    let listener = cache.current_version(0, type_url::LISTENER).expect("connected");
    cache.ack(&proxy(0), type_url::LISTENER, &listener);
    assert_eq!(cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen), None);
    let cluster = cache.current_version(0, type_url::CLUSTER).expect("connected");
    cache.ack(&proxy(0), type_url::CLUSTER, &cluster);
    assert_eq!(cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen), None, "one of two types: no change");
    let route = cache.current_version(0, type_url::ROUTE).expect("connected");
    cache.ack(&proxy(0), type_url::ROUTE, &route);
    let p0 = ObjectName::new("shop", "p0");
    assert_eq!(
        cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen),
        Some(Changes::Policies(vec![p0.clone()]))
    );
    assert_eq!(cache.acknowledgements(CIRCUIT_BREAKER_POLICY, &p0, 1).acknowledged, 1);
    // The same ACK again changes nothing.
    cache.ack(&proxy(0), type_url::ROUTE, &route);
    assert_eq!(cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen), None);
}

#[test]
fn a_publish_is_everything_and_a_policy_no_one_carries_is_forgotten() {
    let cache = two_proxies();
    let mut seen = cache.published();
    let p0 = ObjectName::new("shop", "p0");
    // The connects changed p0's facts.
    assert_eq!(
        cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen),
        Some(Changes::Policies(vec![p0.clone()]))
    );
    assert_eq!(cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen), None);
    cache.set_compiler(Arc::new(|_: &Proxy| Snapshot::default()));
    assert_eq!(cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen), Some(Changes::Everything));
    assert_eq!(cache.take_changes(CIRCUIT_BREAKER_POLICY, &mut seen), None);
    assert_eq!(cache.acknowledgements(CIRCUIT_BREAKER_POLICY, &p0, 1), Acknowledgements::default());
    let inner = cache.lock();
    assert!(inner.ledger.index.is_empty(), "reclaimed: {:?}", inner.ledger.index);
    assert!(inner.ledger.by_policy.is_empty(), "reclaimed: {:?}", inner.ledger.by_policy);
    assert!(inner.ledger.groups.iter().all(Option::is_none));
    assert_eq!(inner.ledger.free.len(), inner.ledger.groups.len());
}

/// Publishes, subscriptions, ACKs, connects and disconnects from several threads at once:
/// once they stop, every node's versions are its snapshot's and the facts the reference's.
/// The workers stop with the publisher, so that their last steps may race its last rollout.
#[test]
fn concurrent_publishes_and_acks_settle_on_the_reference() {
    use std::sync::atomic::{AtomicBool, Ordering};
    for round in 0..100 {
        let cache = Arc::new(SnapshotCache::default());
        publish(&cache, round);
        let done = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..NODES)
            .map(|node| {
                let (cache, done) = (cache.clone(), done.clone());
                std::thread::spawn(move || {
                    let mut bits = Bits::new(round * 10 + node as u64);
                    apply(&cache, &Op::Connect(node));
                    while !done.load(Ordering::Relaxed) {
                        let t = usize::try_from(bits.take(3)).unwrap_or(0);
                        let op = match bits.take(10) {
                            0 => Op::Disconnect(node),
                            1 => Op::Connect(node),
                            2..=4 => Op::Subscribe(node, t),
                            5 => Op::Nack(node, t, Said::Current, 1),
                            _ => Op::Ack(node, t, Said::Current),
                        };
                        apply(&cache, &op);
                    }
                })
            })
            .collect();
        for seed in 1..=30 {
            publish(&cache, round * 1000 + seed);
        }
        done.store(true, Ordering::Relaxed);
        for worker in workers {
            worker.join().expect("worker");
        }
        cache.check();
    }
}

/// The compiler's own snapshots and carriers, where the shared part's groups are worked out
/// once for every proxy: the kept facts of every example policy equal the reference through
/// connects (of the examples' pods and one unknown pod), ACKs of some types on some nodes,
/// a NACK, a disconnect and a publish of a changed inventory.
#[test]
fn compiled_snapshots_keep_the_reference_facts() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut loaded =
        crate::standalone::load::load_dir(&examples, "breakwater-system").expect("examples load");
    let cache = SnapshotCache::default();
    cache.publish(Compiled::new(&loaded.inventory));
    let mut proxies: Vec<Proxy> =
        loaded.inventory.pods.keys().map(|pod| Proxy { pod: pod.clone() }).collect();
    proxies.push(Proxy { pod: ObjectName::new("shop", "not-in-the-inventory") });
    let keys: Vec<(PolicyKey, i64)> = {
        let snapshot = Compiled::new(&loaded.inventory).snapshot(&proxies[0]);
        let local = proxies.iter().flat_map(|p| {
            let s = Compiled::new(&loaded.inventory).snapshot(p);
            s.policies().into_keys().map(|v| ((v.kind, v.name.clone()), v.generation)).collect::<Vec<_>>()
        });
        snapshot
            .policies()
            .into_keys()
            .map(|v| ((v.kind, v.name.clone()), v.generation))
            .chain(local)
            .collect()
    };
    let check = |cache: &SnapshotCache| {
        for ((kind, name), _) in &keys {
            for generation in 1..=3 {
                assert_eq!(
                    cache.acknowledgements(kind, name, generation),
                    cache.reference(kind, name, generation),
                    "{kind} {name} at {generation}"
                );
            }
        }
    };
    let _streams: Vec<_> = proxies.iter().map(|p| cache.connect(p)).collect();
    check(&cache);
    for (i, proxy) in proxies.iter().enumerate() {
        for (t, type_url) in type_url::ALL.iter().enumerate() {
            cache.subscribe(proxy, type_url);
            if (i + t) % 3 != 0 {
                cache.ack(proxy, type_url, &cache.current_version_of(proxy, type_url));
            }
        }
    }
    check(&cache);
    cache.nack(
        &proxies[1],
        type_url::LISTENER,
        &cache.current_version_of(&proxies[1], type_url::LISTENER),
        "bad",
    );
    cache.disconnect(&proxies[2]);
    check(&cache);
    for policy in &mut loaded.inventory.circuit_breakers {
        let policy = Arc::make_mut(policy);
        policy.metadata.generation = Some(policy.metadata.generation.unwrap_or(1) + 1);
    }
    cache.publish(Compiled::new(&loaded.inventory));
    check(&cache);
    for proxy in &proxies {
        for type_url in type_url::ALL {
            cache.ack(proxy, type_url, &cache.current_version_of(proxy, type_url));
        }
    }
    check(&cache);
}

impl SnapshotCache {
    fn current_version_of(&self, proxy: &Proxy, type_url: &str) -> String {
        let inner = self.lock();
        inner.nodes.get(&proxy.node_id()).map(|n| n.snapshot.borrow().version(type_url)).unwrap_or_default()
    }
}
