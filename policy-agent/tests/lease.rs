//! Leases against every store: in memory, a real Redis and a Redis Cluster of three masters
//! (servers started here, on free ports). One macro stamps out the shared suite per backend;
//! the faults only Redis has (restart, stall, key layout, events) follow.
//!
//! Contention goes through [`LeaseManager`] with several managers (agents) over one store,
//! and every grant and release is recorded with the store's clock and checked by
//! `history::check`.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

#[path = "lease/history.rs"]
mod history;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use breakwater_agent::Error;
use breakwater_agent::lease::events;
use breakwater_agent::lease::redis::{DEFAULT_DEADLINE, TOKEN_RETENTION};
use breakwater_agent::lease::{Attempt, Grant, LeaseManager, LeaseStore, MemoryLeases, RedisLeases};
use breakwater_agent::metrics::Metrics;
use breakwater_agent::store::{RedisConnection, RedisSettings, RedisTopology, StoreError};
use breakwater_api::agent::LeaseRule;
use futures::StreamExt;
use history::{Record, check};
use support::*;

/// Per-call deadline for the exactness tests: no debug build on a busy machine misses it.
const DEADLINE: Duration = Duration::from_secs(5);

static REDIS: OnceLock<RedisServer> = OnceLock::new();
static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();

/// Where the agents of one test keep their leases: one map in memory shared by all, or one
/// Redis deployment each agent connects to on its own.
trait Backend {
    type Leases: LeaseStore;

    /// One agent's view of the store: its own connections, the shared keys.
    async fn leases(&self, prefix: &str) -> Self::Leases;

    async fn agent(&self, prefix: &str, pod: &str, rules: &[LeaseRule]) -> Arc<LeaseManager<Self::Leases>> {
        let manager = LeaseManager::new(self.leases(prefix).await, pod, Arc::new(Metrics::default()));
        manager.set_leases(rules);
        Arc::new(manager)
    }
}

impl Backend for MemoryLeases {
    type Leases = MemoryLeases;

    async fn leases(&self, _prefix: &str) -> MemoryLeases {
        self.clone()
    }
}

impl Backend for RedisTopology {
    type Leases = RedisLeases;

    async fn leases(&self, prefix: &str) -> RedisLeases {
        RedisLeases::new(redis_store(self.clone()).await, prefix, DEADLINE)
    }
}

fn memory() -> MemoryLeases {
    MemoryLeases::new()
}

fn standalone() -> RedisTopology {
    RedisTopology::Standalone(REDIS.get_or_init(RedisServer::start).url())
}

fn cluster() -> RedisTopology {
    RedisTopology::Cluster(CLUSTER.get_or_init(RedisCluster::start).urls())
}

fn redis_settings(topology: RedisTopology) -> RedisSettings {
    let mut settings = RedisSettings::new(topology);
    settings.probe_interval = Duration::from_millis(100);
    settings.connect_timeout = Duration::from_millis(300);
    settings
}

async fn redis_store(topology: RedisTopology) -> RedisConnection {
    let store = RedisConnection::start(redis_settings(topology)).await.unwrap();
    assert!(store.is_up(), "connected to the test redis");
    store
}

fn lease(name: &str, ttl: Duration, holders: u32) -> LeaseRule {
    LeaseRule { id: format!("team/{name}"), name: name.into(), ttl_ms: ttl.as_millis() as u64, holders }
}

/// Waits for `condition` with a deadline, checking every few milliseconds.
async fn eventually<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut condition: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// How contenders behave in round `r` of a contention test.
#[derive(Clone, Copy)]
struct Workload {
    /// Rounds in total, over all contenders.
    rounds: usize,
    /// Every `crash_every`-th round the holder never releases: the grant must expire.
    crash_every: usize,
    /// Every `renew_every`-th round the holder renews once before releasing.
    renew_every: usize,
    /// How long a holder holds (otherwise it only yields) every `sleep_every`-th round.
    hold: Duration,
    sleep_every: usize,
}

/// `agents` managers over one store, `per_agent` contenders each, taking turns on `rule`
/// for `workload.rounds` grants in total; returns every grant and release as recorded.
async fn contend(
    backend: &impl Backend,
    rule: &LeaseRule,
    agents: usize,
    per_agent: usize,
    workload: Workload,
) -> Vec<Record> {
    let prefix = unique_prefix("contend");
    let rounds = Arc::new(AtomicUsize::new(0));
    let history = Arc::new(Mutex::new(Vec::with_capacity(workload.rounds)));
    let mut tasks = Vec::new();
    for a in 0..agents {
        let manager = backend.agent(&prefix, &format!("pod-{a}"), std::slice::from_ref(rule)).await;
        for _ in 0..per_agent {
            let (manager, rounds, history, name) =
                (manager.clone(), rounds.clone(), history.clone(), rule.name.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let r = rounds.fetch_add(1, Ordering::SeqCst);
                    if r >= workload.rounds {
                        return;
                    }
                    let grant = manager.acquire(&name, Duration::from_secs(60)).await.unwrap();
                    let mut record = Record {
                        holder: grant.holder.clone(),
                        token: grant.fencing_token,
                        acquired_us: grant.acquired_at_us,
                        expires_us: grant.expires_at_us,
                        released_us: None,
                    };
                    if r % workload.sleep_every == 0 {
                        tokio::time::sleep(workload.hold).await;
                    } else {
                        tokio::task::yield_now().await;
                    }
                    if r % workload.renew_every == 1 {
                        match manager.renew(&name, &grant.holder, grant.fencing_token).await {
                            Ok(renewed) => record.expires_us = renewed.expires_at_us,
                            // Held past the TTL on a loaded machine: expired, which is fine.
                            Err(Error::Store(StoreError::NotHolder { .. })) => {}
                            Err(error) => panic!("renew: {error}"),
                        }
                    }
                    if r % workload.crash_every != workload.crash_every / 2 {
                        match manager.release(&name, &grant.holder, grant.fencing_token).await {
                            Ok(at) => record.released_us = Some(at),
                            Err(Error::Store(StoreError::NotHolder { .. })) => {}
                            Err(error) => panic!("release: {error}"),
                        }
                    }
                    history.lock().unwrap().push(record);
                }
            }));
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    Arc::try_unwrap(history).unwrap().into_inner().unwrap()
}

/// 32 contenders (4 agents x 8) for 2,000 grants of a lock with a short TTL; about one
/// grant in a hundred is never released and must expire.
async fn mutual_exclusion(backend: impl Backend) {
    let rule = lease("mutex", Duration::from_millis(150), 1);
    let workload = Workload {
        rounds: 2_000,
        crash_every: 100,
        renew_every: 5,
        hold: Duration::from_millis(1),
        sleep_every: 3,
    };
    let history = contend(&backend, &rule, 4, 8, workload).await;
    assert_eq!(history.len(), 2_000);
    let summary = check(&history, 1)
        .unwrap_or_else(|v| panic!("{} violations, first: {:?}", v.len(), &v[..v.len().min(5)]));
    eprintln!("mutual exclusion: {summary:?}, no violations");
    assert_eq!(summary.max_concurrent, 1);
    assert!(summary.expired >= 20, "the crashed holders' grants expired: {summary:?}");
}

/// A semaphore of 3: never more than 3 holders, and 3 at once do happen.
async fn semaphore(backend: impl Backend) {
    let rule = lease("pool", Duration::from_millis(150), 3);
    let workload = Workload {
        rounds: 600,
        crash_every: 50,
        renew_every: 7,
        hold: Duration::from_millis(2),
        sleep_every: 1,
    };
    let history = contend(&backend, &rule, 3, 4, workload).await;
    let summary = check(&history, 3)
        .unwrap_or_else(|v| panic!("{} violations, first: {:?}", v.len(), &v[..v.len().min(5)]));
    eprintln!("semaphore of 3: {summary:?}, no violations");
    assert_eq!(summary.max_concurrent, 3, "12 contenders holding 2ms each fill all 3 slots");
    assert!(summary.expired >= 12, "{summary:?}");
}

/// The checker on a real history that breaks the lock's guarantee: contenders on a lease
/// of two slots, checked as a lock, must be caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_catches_two_holders_of_a_lock() {
    let rule = lease("pair", Duration::from_millis(150), 2);
    let workload = Workload {
        rounds: 200,
        crash_every: 50,
        renew_every: 7,
        hold: Duration::from_millis(2),
        sleep_every: 1,
    };
    let history = contend(&memory(), &rule, 2, 4, workload).await;
    assert!(check(&history, 2).is_ok());
    let violations = check(&history, 1).unwrap_err();
    assert!(violations.iter().any(|v| matches!(v, history::Violation::Overlap { .. })), "{violations:?}");
}

/// Renew and release only for the holder with its token while the grant lives; unknown
/// names; a wait that ends Busy with the expiry.
async fn refusals(backend: impl Backend) {
    let prefix = unique_prefix("refusals");
    let rule = lease("lock", Duration::from_millis(800), 1);
    let agent = backend.agent(&prefix, "pod-a", std::slice::from_ref(&rule)).await;
    let other = backend.agent(&prefix, "pod-b", std::slice::from_ref(&rule)).await;
    let held = agent.acquire("lock", Duration::ZERO).await.unwrap();
    assert!(held.holder.starts_with("pod-a/"), "{held:?}");
    assert_eq!(held.expires_at_us - held.acquired_at_us, 800_000);

    fn not_holder<T>(result: &Result<T, Error>) -> bool {
        matches!(result, Err(Error::Store(StoreError::NotHolder { .. })))
    }
    let (holder, token) = (held.holder.as_str(), held.fencing_token);
    // Someone else, with the right token.
    assert!(not_holder(&other.renew("lock", "pod-b/guess", token).await));
    assert!(not_holder(&other.release("lock", "pod-b/guess", token).await));
    // The holder, with a wrong token.
    assert!(not_holder(&agent.renew("lock", holder, token + 1).await));
    assert!(not_holder(&agent.release("lock", holder, token - 1).await));
    assert_eq!(agent.metrics().lease_not_holder(&rule.id, "renew"), 1);
    assert_eq!(agent.metrics().lease_not_holder(&rule.id, "release"), 1);

    // Unknown names, whatever the store holds.
    for result in [
        agent.acquire("nope", Duration::ZERO).await.map(|_| ()),
        agent.renew("nope", holder, token).await.map(|_| ()),
        agent.release("nope", holder, token).await.map(|_| ()),
        agent.state("nope").await.map(|_| ()),
    ] {
        assert!(matches!(result, Err(Error::UnknownLease(n)) if n == "nope"));
    }

    // The holder renews; the grant is the same one, later.
    let renewed = agent.renew("lock", holder, token).await.unwrap();
    assert_eq!((renewed.fencing_token, renewed.acquired_at_us), (token, held.acquired_at_us));
    assert!(renewed.expires_at_us > held.expires_at_us && renewed.renewed_at_us > held.renewed_at_us);

    // A wait that ends while held: Busy, with when it frees.
    let started = Instant::now();
    let busy = other.acquire("lock", Duration::from_millis(100)).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(100));
    match busy {
        Error::LeaseBusy { lease, waited, free_at_us } => {
            assert_eq!((lease.as_str(), waited), ("lock", Duration::from_millis(100)));
            assert_eq!(free_at_us, renewed.expires_at_us);
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    assert_eq!(other.metrics().lease_busy(&rule.id), 1);

    // Past the expiry: another agent gets it, and the old grant is refused everything.
    let next = other.acquire("lock", Duration::from_secs(10)).await.unwrap();
    assert!(next.acquired_at_us >= renewed.expires_at_us);
    assert!(next.fencing_token > token);
    assert!(not_holder(&agent.renew("lock", holder, token).await));
    assert!(not_holder(&agent.release("lock", holder, token).await));
    let state = agent.state("lock").await.unwrap();
    assert_eq!(state.grants, vec![next.clone()]);
    assert_eq!(state.last_token, Some(next.fencing_token));
    let released = other.release("lock", &next.holder, next.fencing_token).await.unwrap();
    assert!(released >= next.acquired_at_us && released < next.expires_at_us);
    assert!(agent.state("lock").await.unwrap().grants.is_empty());
}

/// An agent killed while holding (dropped without releasing): the lease frees at expiry.
async fn agent_killed(backend: impl Backend) {
    let prefix = unique_prefix("killed");
    let rule = lease("lock", Duration::from_millis(500), 1);
    let doomed = backend.agent(&prefix, "pod-a", std::slice::from_ref(&rule)).await;
    let held = doomed.acquire("lock", Duration::ZERO).await.unwrap();
    drop(doomed);
    let survivor = backend.agent(&prefix, "pod-b", std::slice::from_ref(&rule)).await;
    let next = survivor.acquire("lock", Duration::from_secs(10)).await.unwrap();
    assert!(next.acquired_at_us >= held.expires_at_us, "{next:?} after {held:?}");
    assert!(next.fencing_token > held.fencing_token);
}

/// What a fencing token protects: keeps the highest token it accepted, refuses lower ones.
#[derive(Debug, Default)]
struct FencedResource {
    highest: Mutex<i64>,
    writes: Mutex<Vec<(i64, &'static str)>>,
}

impl FencedResource {
    fn write(&self, token: i64, value: &'static str) -> Result<(), i64> {
        let mut highest = self.highest.lock().unwrap();
        if token < *highest {
            return Err(*highest);
        }
        *highest = token;
        self.writes.lock().unwrap().push((token, value));
        Ok(())
    }
}

/// A holder paused past its TTL (a GC pause): another takes the lease, the paused one's
/// renewal is refused, and its late write with the old token is rejected by the resource.
async fn paused_holder(backend: impl Backend) {
    let prefix = unique_prefix("paused");
    let rule = lease("lock", Duration::from_secs(1), 1);
    let paused = backend.agent(&prefix, "pod-a", std::slice::from_ref(&rule)).await;
    let other = backend.agent(&prefix, "pod-b", std::slice::from_ref(&rule)).await;
    let resource = FencedResource::default();

    let stale = paused.acquire("lock", Duration::ZERO).await.unwrap();
    resource.write(stale.fencing_token, "a: before the pause").unwrap();
    // The pause: pod-a does nothing while pod-b waits for the lease to expire.
    let fresh = other.acquire("lock", Duration::from_secs(10)).await.unwrap();
    assert!(fresh.acquired_at_us >= stale.expires_at_us);
    resource.write(fresh.fencing_token, "b").unwrap();

    // pod-a wakes up and carries on as if it still held the lease.
    assert!(matches!(
        paused.renew("lock", &stale.holder, stale.fencing_token).await,
        Err(Error::Store(StoreError::NotHolder { .. }))
    ));
    assert_eq!(resource.write(stale.fencing_token, "a: after the pause"), Err(fresh.fencing_token));
    assert_eq!(
        *resource.writes.lock().unwrap(),
        [(stale.fencing_token, "a: before the pause"), (fresh.fencing_token, "b")]
    );
}

macro_rules! suite {
    ($($backend:ident),* $(,)?) => {$(
        mod $backend {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn mutual_exclusion_32_contenders_2000_rounds() {
                super::mutual_exclusion(super::$backend()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn semaphore_never_more_than_n() {
                super::semaphore(super::$backend()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn refusals_unknown_and_busy() {
                super::refusals(super::$backend()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn agent_killed_while_holding_frees_at_expiry() {
                super::agent_killed(super::$backend()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn paused_holder_is_refused_and_fenced() {
                super::paused_holder(super::$backend()).await
            }
        }
    )*};
}

suite!(memory, standalone, cluster);

fn standalone_at(server: &RedisServer) -> RedisTopology {
    RedisTopology::Standalone(server.url())
}

async fn agent_on(
    store: RedisConnection,
    prefix: &str,
    pod: &str,
    rule: &LeaseRule,
) -> LeaseManager<RedisLeases> {
    let manager =
        LeaseManager::new(RedisLeases::new(store, prefix, DEADLINE), pod, Arc::new(Metrics::default()));
    manager.set_leases(std::slice::from_ref(rule));
    manager
}

/// Waits until `manager` answers again after a restart (its first call may find the old
/// connection broken; the store then reconnects).
async fn reconnected(manager: &LeaseManager<RedisLeases>) {
    eventually("the agent reconnects to the restarted redis", Duration::from_secs(10), || async {
        manager.state("lock").await.is_ok()
    })
    .await;
}

/// Redis restarted without persistence loses every holder and the token key: a new
/// contender is granted at once, the old holder is refused, and tokens still rise — by the
/// clock term, and by the floor where the clock alone would not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restart_loses_holders_but_tokens_never_go_back() {
    let mut server = RedisServer::start();
    let prefix = unique_prefix("restart");
    let rule = lease("lock", Duration::from_secs(30), 1);
    let a = agent_on(redis_store(standalone_at(&server)).await, &prefix, "pod-a", &rule).await;
    let before = a.acquire("lock", Duration::ZERO).await.unwrap();

    server.restart();
    reconnected(&a).await;
    // Holders are gone: a fresh agent (no floor) is granted at once, above the old token by
    // the clock term alone.
    let b = agent_on(redis_store(standalone_at(&server)).await, &prefix, "pod-b", &rule).await;
    let after = b.acquire("lock", Duration::ZERO).await.unwrap();
    assert!(after.fencing_token > before.fencing_token, "{after:?} after {before:?}");
    // The old holder finds out at its next renewal.
    assert!(matches!(
        a.renew("lock", &before.holder, before.fencing_token).await,
        Err(Error::Store(StoreError::NotHolder { .. }))
    ));
    b.release("lock", &after.holder, after.fencing_token).await.unwrap();

    // Now a clock that runs behind the tokens already granted (as after a restart on a host
    // whose clock stepped back an hour): tokens an hour ahead, then the keys are lost.
    let token_key = a.store().keys(&rule.id).token;
    let ahead = after.fencing_token + 3_600_000_000;
    assert_eq!(server.cli(&["SET", &token_key, &ahead.to_string()]).trim(), "OK");
    let high = a.acquire("lock", Duration::ZERO).await.unwrap();
    assert_eq!(high.fencing_token, ahead + 1, "last + 1");
    a.release("lock", &high.holder, high.fencing_token).await.unwrap();
    server.restart();
    reconnected(&a).await;
    // The agent that saw the high token keeps above it: the floor.
    let floored = a.acquire("lock", Duration::ZERO).await.unwrap();
    assert_eq!(floored.fencing_token, high.fencing_token + 1, "floor + 1, above the clock");
    a.release("lock", &floored.holder, floored.fencing_token).await.unwrap();
    // The documented limit: once the token key is lost too, an agent that never saw those
    // tokens gets the clock term, below them. Only a clock stepping back by more than the
    // outage, with every agent that saw the old tokens gone, can do this.
    server.restart();
    let c = agent_on(redis_store(standalone_at(&server)).await, &prefix, "pod-c", &rule).await;
    let unfloored = c.acquire("lock", Duration::ZERO).await.unwrap();
    assert!(unfloored.fencing_token < high.fencing_token);
    assert!(unfloored.fencing_token > after.fencing_token, "still above every token of the real clock");
}

/// A stalled Redis (SIGSTOP): calls fail within the deadline, transiently; once it resumes,
/// the attempt that timed out may have been granted after all, and retrying with the same
/// holder returns that grant instead of taking a second slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_redis_fails_within_the_deadline_and_retries_keep_one_grant() {
    let server = RedisServer::start();
    let leases =
        RedisLeases::new(redis_store(standalone_at(&server)).await, unique_prefix("stall"), DEFAULT_DEADLINE);
    let ttl = Duration::from_secs(30);
    server.pause();
    let started = Instant::now();
    let error = leases.try_acquire("team/lock", "pod-a/1", ttl, 2, 0).await.unwrap_err();
    let elapsed = started.elapsed();
    server.resume();
    assert!(error.is_transient(), "{error}");
    assert!(
        elapsed >= DEFAULT_DEADLINE && elapsed < DEFAULT_DEADLINE + Duration::from_millis(200),
        "{elapsed:?}"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    let grant = loop {
        match leases.try_acquire("team/lock", "pod-a/1", ttl, 2, 0).await {
            Ok(Attempt::Granted(grant)) => break grant,
            Ok(busy) => panic!("one holder of two slots: {busy:?}"),
            Err(error) => assert!(Instant::now() < deadline, "redis still failing after resuming: {error}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let again = leases.try_acquire("team/lock", "pod-a/1", ttl, 2, 0).await.unwrap();
    assert_eq!(again, Attempt::Granted(grant.clone()), "the same grant, not a second slot");
    assert_eq!(leases.state("team/lock").await.unwrap().grants, vec![grant]);
}

fn pttl(output: &str) -> i64 {
    output.trim().parse().unwrap_or_else(|_| panic!("PTTL reply {output:?}"))
}

/// Every key expires, and a lease's keys share one Cluster slot (so one node holds them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_expire_and_share_one_slot() {
    let cluster = CLUSTER.get_or_init(RedisCluster::start);
    let prefix = unique_prefix("keys");
    let leases =
        RedisLeases::new(redis_store(RedisTopology::Cluster(cluster.urls())).await, prefix.clone(), DEADLINE);
    let id = "team/needs:escaping{}";
    let keys = leases.keys(id);
    let ttl = Duration::from_secs(2);
    let Attempt::Granted(grant) = leases.try_acquire(id, "pod-a/1", ttl, 1, 0).await.unwrap() else {
        panic!("a free lease")
    };
    let node = &cluster.nodes[0];
    let slots: Vec<String> = [&keys.holders, &keys.grants, &keys.token]
        .iter()
        .map(|k| node.cli(&["CLUSTER", "KEYSLOT", k]).trim().to_string())
        .collect();
    assert!(slots.iter().all(|s| s == &slots[0]), "{slots:?}");
    // Exactly one node holds them.
    let holding: Vec<u16> = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["EXISTS", &keys.holders]).trim() == "1")
        .map(|n| n.port)
        .collect();
    assert_eq!(holding.len(), 1, "{holding:?}");
    let owner = cluster.nodes.iter().find(|n| n.port == holding[0]).unwrap();
    for key in [&keys.holders, &keys.grants] {
        let left = pttl(&owner.cli(&["PTTL", key]));
        assert!(left > 0 && left <= 2_001, "{key}: {left}ms");
    }
    let retention = TOKEN_RETENTION.as_millis() as i64;
    let token_left = pttl(&owner.cli(&["PTTL", &keys.token]));
    assert!(token_left > retention && token_left <= retention + 2_001, "token: {token_left}ms");

    // Once released, only the token key remains, still expiring.
    leases.release(id, "pod-a/1", grant.fencing_token).await.unwrap();
    assert_eq!(owner.cli(&["EXISTS", &keys.holders, &keys.grants]).trim(), "0");
    assert!(pttl(&owner.cli(&["PTTL", &keys.token])) > retention);
}

async fn next<S: futures::Stream<Item = String> + Unpin>(events: &mut S) -> Option<String> {
    tokio::time::timeout(Duration::from_secs(5), events.next()).await.expect("an event within 5s")
}

/// Grants, releases and the expiries a script notices are published; renewals are not;
/// the stream ends with the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_published_on_grant_release_and_noticed_expiry() {
    let mut server = RedisServer::start();
    let prefix = unique_prefix("events");
    let leases = RedisLeases::new(redis_store(standalone_at(&server)).await, prefix.clone(), DEADLINE);
    assert_eq!(leases.channel(), events::channel(&prefix));
    assert_eq!(events::channel("bw"), "bw:lease-events");
    let mut events = Box::pin(events::subscribe(&standalone_at(&server), &prefix).await.unwrap());

    let (short, long) = (Duration::from_millis(300), Duration::from_secs(30));
    let Attempt::Granted(x1) = leases.try_acquire("team/x", "h1", short, 2, 0).await.unwrap() else {
        panic!()
    };
    assert_eq!(next(&mut events).await.as_deref(), Some("team/x"));
    let Attempt::Granted(x2) = leases.try_acquire("team/x", "h2", long, 2, 0).await.unwrap() else {
        panic!()
    };
    assert_eq!(next(&mut events).await.as_deref(), Some("team/x"));
    leases.renew("team/x", "h1", x1.fencing_token, short).await.unwrap();
    let Attempt::Granted(y) = leases.try_acquire("team/y", "h3", short, 1, 0).await.unwrap() else {
        panic!()
    };
    assert_eq!(next(&mut events).await.as_deref(), Some("team/y"), "the renewal of x published nothing");
    leases.release("team/y", "h3", y.fencing_token).await.unwrap();
    assert_eq!(next(&mut events).await.as_deref(), Some("team/y"));
    // h1's grant expires while h2's keeps the keys alive: the first call to notice drops it
    // and says so. (A lease's last grant expires with its keys, unannounced: readers
    // schedule a re-read at the earliest expiresAt.)
    eventually("h1's grant expires", Duration::from_secs(5), || {
        let leases = leases.clone();
        async move { leases.state("team/x").await.unwrap().grants.len() == 1 }
    })
    .await;
    assert_eq!(next(&mut events).await.as_deref(), Some("team/x"));
    leases.release("team/x", "h2", x2.fencing_token).await.unwrap();
    assert_eq!(next(&mut events).await.as_deref(), Some("team/x"));

    server.kill();
    assert_eq!(next(&mut events).await, None, "the stream ends with the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_to_an_unreachable_redis_fails() {
    let port = free_port();
    let error = match events::subscribe(&RedisTopology::Standalone(format!("redis://127.0.0.1:{port}")), "bw")
        .await
    {
        Ok(_) => panic!("nothing listens on {port}"),
        Err(error) => error,
    };
    assert!(error.is_transient(), "{error}");
}

/// The store's view matches the manager's grants: state lists each holder once, sorted by
/// token, with the newest token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_lists_the_live_grants_by_token() {
    state_by_token(memory()).await;
    state_by_token(standalone()).await;
}

async fn state_by_token(backend: impl Backend) {
    let prefix = unique_prefix("state");
    let rule = lease("pool", Duration::from_secs(30), 3);
    let agent = backend.agent(&prefix, "pod-a", std::slice::from_ref(&rule)).await;
    let mut grants: Vec<Grant> = Vec::new();
    for _ in 0..3 {
        grants.push(agent.acquire("pool", Duration::ZERO).await.unwrap());
    }
    let state = agent.state("pool").await.unwrap();
    assert_eq!(state.grants, grants);
    assert_eq!(state.last_token, Some(grants[2].fencing_token));
    assert!(state.now_us >= grants[2].acquired_at_us);
    for grant in &grants {
        agent.release("pool", &grant.holder, grant.fencing_token).await.unwrap();
    }
}
