//! The breaker's Lua script against its pure twin, on a real Redis (and a three-master
//! Cluster), step by step: every step runs on Redis, then on [`Machine`] at the instant
//! Redis ran it, and both must answer the same reply and hold the same window.
//!
//! The script reads Redis `TIME`, so the twin's clock follows Redis: each step reads `TIME`
//! before and after. A step that made a transition replies its `since`, which *is* the
//! instant Redis ran it. A step that made none answers alike at every instant of
//! `[before, after]` except across a slot boundary of a Time window, so the twin is tried at
//! `before`, at each boundary in between and at `after`, and one of them must match exactly.
//! Waits for an OPEN to pass or a slot to leave poll Redis's clock until it is reached.
//!
//! Then: transitions are published with the contract's payload, and the keys are laid out
//! and expire as documented.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use breakwater_harness::{RedisCluster, RedisServer, unique_prefix};
use breakwater_store::breaker::memory::Entry;
use breakwater_store::breaker::redis::BreakerKeys;
use breakwater_store::breaker::{
    self, BreakerState, BreakerStore, Machine, Outcomes, Params, RedisBreakers, State, TIME_SLOTS, Window,
};
use breakwater_store::{RedisConnection, RedisSettings, RedisTopology, pubsub};
use futures::{Stream, StreamExt};
use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, FromRedisValue};

/// Per-call deadline: no debug build on a busy machine misses it.
const DEADLINE: Duration = Duration::from_secs(5);
const OPEN_US: i64 = 300_000;
const ID: &str = "shop/payments:8080";

static REDIS: OnceLock<RedisServer> = OnceLock::new();
static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();

fn standalone() -> RedisTopology {
    RedisTopology::Standalone(REDIS.get_or_init(RedisServer::start).url())
}

async fn connection(topology: RedisTopology) -> RedisConnection {
    let connection = RedisConnection::start(RedisSettings::new(topology)).await.unwrap();
    assert!(connection.is_up(), "connected to the test redis");
    connection
}

/// A plain connection for what the store does not offer: `TIME`, reading keys as they lie.
enum Raw {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Raw {
    async fn open(topology: &RedisTopology) -> Self {
        match topology {
            RedisTopology::Standalone(url) => Raw::Standalone(
                redis::Client::open(url.as_str()).unwrap().get_multiplexed_async_connection().await.unwrap(),
            ),
            RedisTopology::Cluster(urls) => Raw::Cluster(
                redis::cluster::ClusterClient::new(urls.clone())
                    .unwrap()
                    .get_async_connection()
                    .await
                    .unwrap(),
            ),
        }
    }

    async fn query<T: FromRedisValue>(&mut self, cmd: &Cmd) -> T {
        match self {
            Raw::Standalone(c) => cmd.query_async(c).await.unwrap(),
            Raw::Cluster(c) => cmd.query_async(c).await.unwrap(),
        }
    }

    /// Redis `TIME` in µs.
    async fn time(&mut self) -> i64 {
        let (secs, micros): (i64, i64) = self.query(&redis::cmd("TIME")).await;
        secs * 1_000_000 + micros
    }
}

fn params(window: Window) -> Params {
    Params {
        failure_rate: 50,
        slow_call_us: Some(1_000_000),
        slow_rate: 80,
        window,
        minimum_calls: 4,
        open_us: OPEN_US,
        half_open_calls: 2,
    }
}

fn calls(calls: u32, failures: u32, slow: u32) -> Outcomes {
    Outcomes { calls, failures, slow, bad: failures.max(slow) }
}

/// The window totals a breaker holds: calls, failures, slow.
fn totals(state: &BreakerState) -> (u64, u64, u64) {
    (state.calls, state.failures, state.slow)
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Report(Outcomes),
    Probe,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reply {
    Report(BreakerState),
    Probe(bool, BreakerState),
}

impl Reply {
    fn state(&self) -> BreakerState {
        match *self {
            Reply::Report(state) | Reply::Probe(_, state) => state,
        }
    }

    fn admitted(&self) -> bool {
        matches!(self, Reply::Probe(true, _))
    }
}

/// One breaker on Redis and its twin, stepped together.
struct Pair {
    breakers: RedisBreakers,
    raw: Raw,
    keys: BreakerKeys,
    twin: Machine,
    /// Whether any step wrote (the hash exists).
    written: bool,
    steps: Vec<String>,
}

impl Pair {
    async fn new(topology: RedisTopology, name: &str) -> Self {
        let breakers = RedisBreakers::new(connection(topology.clone()).await, unique_prefix(name), DEADLINE);
        let keys = breakers.keys(ID);
        Pair {
            breakers,
            raw: Raw::open(&topology).await,
            keys,
            twin: Machine::new(),
            written: false,
            steps: Vec::new(),
        }
    }

    async fn time(&mut self) -> i64 {
        self.raw.time().await
    }

    async fn window(&mut self) -> Vec<Entry> {
        let raw: Vec<String> =
            self.raw.query(redis::cmd("LRANGE").arg(&self.keys.window).arg(0).arg(-1)).await;
        raw.iter().map(|e| Entry::parse(e).unwrap_or_else(|| panic!("window entry {e:?}"))).collect()
    }

    async fn report(&mut self, p: &Params, outcomes: Outcomes) -> BreakerState {
        self.step(p, Op::Report(outcomes)).await.state()
    }

    async fn probe(&mut self, p: &Params) -> (bool, BreakerState) {
        let reply = self.step(p, Op::Probe).await;
        (reply.admitted(), reply.state())
    }

    /// Runs `op` on Redis, then finds the instant the twin answers it the same at.
    async fn step(&mut self, p: &Params, op: Op) -> Reply {
        let before = self.time().await;
        let reply = match op {
            Op::Report(outcomes) => Reply::Report(self.breakers.report(ID, p, outcomes).await.unwrap()),
            Op::Probe => {
                let (admitted, state) = self.breakers.probe(ID, p).await.unwrap();
                Reply::Probe(admitted, state)
            }
        };
        let after = self.time().await;
        let window = self.window().await;
        self.steps.push(format!("{op:?} in [{before}, {after}] -> {reply:?}, window {window:?}"));
        let matched = candidates(before, after, p, &reply, &self.twin.state()).into_iter().find_map(|now| {
            let mut twin = self.twin.clone();
            let (answer, wrote) = run(&mut twin, now, p, op);
            let same = answer == reply && twin.window().iter().copied().eq(window.iter().copied());
            same.then_some((twin, wrote))
        });
        let Some((twin, wrote)) = matched else {
            panic!("the twin answers no step like Redis; steps so far:\n{}", self.steps.join("\n"))
        };
        self.twin = twin;
        self.written |= wrote;
        let stored = self.breakers.state(ID).await.unwrap();
        assert_eq!(stored, self.written.then_some(self.twin.state()), "state() after {op:?}");
        reply
    }

    /// Polls Redis's clock until it reaches `at_us`.
    async fn wait_until(&mut self, at_us: i64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.time().await;
            if now >= at_us {
                return;
            }
            assert!(Instant::now() < deadline, "Redis TIME did not reach {at_us} within 10s (at {now})");
            let left = u64::try_from(at_us - now).unwrap_or(0);
            tokio::time::sleep(Duration::from_micros(left.min(5_000))).await;
        }
    }

    /// Until the current OPEN (or HALF_OPEN) has lasted `open_us`.
    async fn wait_open(&mut self, p: &Params) {
        let since = self.twin.state().since_us;
        self.wait_until(since + p.open_us).await;
    }
}

fn run(m: &mut Machine, now: i64, p: &Params, op: Op) -> (Reply, bool) {
    match op {
        Op::Report(outcomes) => {
            let step = m.report(now, p, outcomes);
            (Reply::Report(step.reply), step.wrote)
        }
        Op::Probe => {
            let step = m.probe(now, p);
            (Reply::Probe(step.reply.0, step.reply.1), step.wrote)
        }
    }
}

/// The instants the twin may have to run a step at to answer as Redis did.
fn candidates(before: i64, after: i64, p: &Params, reply: &Reply, twin: &BreakerState) -> Vec<i64> {
    let state = reply.state();
    if state.generation != twin.generation {
        // A transition: `since` is the instant the script read.
        assert!(
            (before..=after).contains(&state.since_us),
            "since {} not in [{before}, {after}]",
            state.since_us
        );
        return vec![state.since_us];
    }
    let mut at = vec![before];
    if let Window::Time { slot_us } = p.window {
        let mut boundary = (before.div_euclid(slot_us) + 1) * slot_us;
        while boundary <= after {
            at.push(boundary);
            boundary += slot_us;
        }
    }
    at.push(after);
    at
}

/// Every transition, the count window's trimming and half-open probes exhausted.
async fn count_window_and_every_transition(pair: &mut Pair) {
    let p = params(Window::Count { size: 10 });
    assert_eq!(
        pair.report(&p, Outcomes::default()).await,
        BreakerState::default(),
        "no calls, nothing written"
    );
    assert!(pair.probe(&p).await.0, "a fresh breaker is CLOSED");
    pair.report(&p, calls(3, 1, 1)).await;
    pair.report(&p, calls(4, 0, 2)).await;
    // 12 calls: the front entry loses 2 calls and its share of failures and slow calls.
    pair.report(&p, calls(5, 1, 0)).await;
    // 16: whole entries leave, the next loses its share.
    let closed = pair.report(&p, calls(6, 0, 0)).await;
    assert_eq!((closed.state, closed.calls), (State::Closed, 10));
    assert!(pair.window().await.len() >= 2, "trimmed, not emptied");
    // More failures claimed than calls: all 6 failed. Opening drops the window's entries and
    // keeps its totals: 10 calls, the 6 failures, no slow call left.
    let open = pair.report(&p, calls(6, 9, 0)).await;
    assert_eq!(
        (open.state, open.generation, open.calls, open.failures, open.slow),
        (State::Open, 1, 10, 6, 0)
    );
    assert!(pair.window().await.is_empty());
    assert!(!pair.probe(&p).await.0, "OPEN refuses");
    assert_eq!(pair.report(&p, calls(2, 0, 0)).await, open, "OPEN ignores outcomes");

    pair.wait_open(&p).await;
    let (admitted, half_open) = pair.probe(&p).await;
    assert!(admitted);
    assert_eq!((half_open.state, half_open.generation, half_open.probes_granted), (State::HalfOpen, 2, 1));
    assert_eq!(totals(&half_open), totals(&open), "HALF_OPEN shows the window that opened it");
    assert!(pair.probe(&p).await.0);
    let (admitted, exhausted) = pair.probe(&p).await;
    assert!(!admitted, "half_open_calls probes, then none");
    assert_eq!(exhausted.probes_granted, 2);
    let probed = pair.report(&p, calls(1, 0, 0)).await;
    assert_eq!((probed.probes_ok, totals(&probed)), (1, totals(&open)), "probes count apart");
    let closed = pair.report(&p, calls(1, 0, 0)).await;
    assert_eq!((closed.state, closed.generation, totals(&closed)), (State::Closed, 3, (0, 0, 0)));
    assert!(pair.window().await.is_empty(), "a fresh window");
}

/// The slow-call rule, reopening from HALF_OPEN, and re-arming a HALF_OPEN left waiting.
async fn slow_calls_reopening_and_re_arming(pair: &mut Pair) {
    let p = params(Window::Count { size: 10 });
    assert_eq!(pair.report(&p, calls(4, 0, 3)).await.state, State::Closed, "75 % slow < 80 %");
    let open = pair.report(&p, calls(1, 0, 1)).await;
    assert_eq!((open.state, open.generation, totals(&open)), (State::Open, 1, (5, 0, 4)), "80 % slow");

    pair.wait_open(&p).await;
    // One step: OPEN → HALF_OPEN (advance), then a slow call → OPEN.
    let reopened = pair.report(&p, calls(1, 0, 1)).await;
    assert_eq!((reopened.state, reopened.generation, totals(&reopened)), (State::Open, 3, (5, 0, 4)));

    pair.wait_open(&p).await;
    assert!(pair.probe(&p).await.0);
    let failed_probe = pair.report(&p, calls(2, 1, 0)).await;
    assert_eq!(failed_probe.state, State::Open, "a failed probe reopens");
    assert_eq!(totals(&failed_probe), (5, 0, 4), "with the totals of the window that opened it");

    pair.wait_open(&p).await;
    assert!(pair.probe(&p).await.0);
    assert!(pair.probe(&p).await.0);
    assert!(!pair.probe(&p).await.0);
    // The probes' outcomes never come: after open_us, HALF_OPEN is re-armed.
    let generation = pair.twin.state().generation;
    pair.wait_open(&p).await;
    let (admitted, rearmed) = pair.probe(&p).await;
    assert!(admitted);
    assert_eq!(
        (rearmed.state, rearmed.generation, rearmed.probes_granted, totals(&rearmed)),
        (State::HalfOpen, generation + 1, 1, (5, 0, 4))
    );
    let closed = pair.report(&p, calls(2, 0, 0)).await;
    assert_eq!((closed.state, totals(&closed)), (State::Closed, (0, 0, 0)));

    let no_rule = Params { slow_call_us: None, ..p };
    let all_slow = pair.report(&no_rule, calls(10, 0, 10)).await;
    assert_eq!((all_slow.state, all_slow.slow), (State::Closed, 10), "slow calls counted, not judged");
}

async fn minimum_calls(pair: &mut Pair) {
    let p = params(Window::Count { size: 10 });
    for _ in 0..3 {
        assert_eq!(pair.report(&p, calls(1, 1, 0)).await.state, State::Closed, "below minimumCalls");
    }
    assert_eq!(pair.report(&p, calls(1, 1, 0)).await.state, State::Open);
}

/// Slots leave the window 20 slots on; a slot size change drops the other size's slots.
async fn time_window_slots(pair: &mut Pair) {
    let p = Params { minimum_calls: 100, ..params(Window::time(400_000)) };
    let Window::Time { slot_us } = p.window else { unreachable!() };
    assert_eq!(slot_us, 20_000);
    pair.report(&p, calls(3, 3, 0)).await;
    pair.report(&p, calls(1, 0, 1)).await;
    let first = pair.window().await[0].slot;
    pair.wait_until((first + TIME_SLOTS) * slot_us).await;
    let later = pair.report(&p, calls(1, 0, 0)).await;
    assert_eq!(later.failures, 0, "the first slot's failures left the window");

    let wider = Params { window: Window::time(20_000_000), ..p };
    let reloaded = pair.report(&wider, calls(1, 1, 0)).await;
    assert_eq!((reloaded.calls, reloaded.failures), (1, 1), "only the new slot size's calls");
    let judged = Params { minimum_calls: 4, ..wider };
    let open = pair.report(&judged, calls(3, 1, 0)).await;
    assert_eq!((open.state, totals(&open)), (State::Open, (4, 2, 0)), "2 of 4 failed, kept as it opened");
    assert!(pair.window().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn count_window_conforms() {
    count_window_and_every_transition(&mut Pair::new(standalone(), "count").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_calls_and_half_open_conform() {
    slow_calls_reopening_and_re_arming(&mut Pair::new(standalone(), "slow").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minimum_calls_conform() {
    minimum_calls(&mut Pair::new(standalone(), "minimum").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_window_conforms() {
    time_window_slots(&mut Pair::new(standalone(), "time").await).await;
}

/// A breaker's keys share one hash tag: the script runs on a Cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conforms_on_a_cluster() {
    let topology = RedisTopology::Cluster(CLUSTER.get_or_init(RedisCluster::start).urls());
    count_window_and_every_transition(&mut Pair::new(topology, "cluster").await).await;
}

async fn next<T>(events: &mut (impl Stream<Item = T> + Unpin)) -> T {
    tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .expect("an event within 5s")
        .expect("open")
}

/// Each transition is published once, in order, as `<generation> <state> <since_us> <id>`;
/// steps without one publish nothing (the next message is the next transition's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transition_is_published() {
    let mut pair = Pair::new(standalone(), "events").await;
    let prefix = pair.breakers.key_prefix().to_string();
    assert_eq!(pair.breakers.channel(), breaker::channel(&prefix));
    let mut events = Box::pin(breaker::subscribe(&standalone(), &prefix).await.unwrap());
    let mut payloads = Box::pin(
        pubsub::subscribe(&standalone(), &breaker::channel(&prefix), |s| Some(s.to_string())).await.unwrap(),
    );
    let mut expect = async |state: BreakerState| {
        let payload = next(&mut payloads).await;
        assert_eq!(payload, format!("{} {} {} {ID}", state.generation, state.state.code(), state.since_us));
        assert_eq!(next(&mut events).await, state.event(ID));
    };

    let p = params(Window::Count { size: 10 });
    pair.report(&p, calls(1, 0, 0)).await;
    let open = pair.report(&p, calls(3, 3, 0)).await;
    expect(open).await;
    pair.wait_open(&p).await;
    let (_, half_open) = pair.probe(&p).await;
    expect(half_open).await;
    pair.probe(&p).await;
    pair.probe(&p).await;
    pair.wait_open(&p).await;
    let (_, rearmed) = pair.probe(&p).await;
    expect(rearmed).await;
    let reopened = pair.report(&p, calls(1, 1, 0)).await;
    expect(reopened).await;
    pair.wait_open(&p).await;
    let closed = pair.report(&p, calls(2, 0, 0)).await;
    assert_eq!((closed.state, closed.generation), (State::Closed, 6));
    // Advanced first, at the same instant, then closed.
    expect(BreakerState { state: State::HalfOpen, generation: 5, since_us: closed.since_us, ..closed }).await;
    expect(closed).await;
}

/// The documented layout: hash fields, the window list, one day of expiry on each write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_laid_out_and_expire_as_documented() {
    let mut pair = Pair::new(standalone(), "layout").await;
    let p = params(Window::Count { size: 10 });
    assert!(pair.probe(&p).await.0);
    let exists: i64 = pair.raw.query(redis::cmd("EXISTS").arg(&pair.keys.hash)).await;
    assert_eq!(exists, 0, "a CLOSED probe writes nothing");

    let state = pair.report(&p, calls(2, 1, 0)).await;
    let fields: Vec<(String, String)> = pair.raw.query(redis::cmd("HGETALL").arg(&pair.keys.hash)).await;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    assert_eq!(field("state").as_deref(), Some("0"));
    assert_eq!(field("calls").as_deref(), Some("2"));
    assert_eq!(field("failures").as_deref(), Some("1"));
    assert_eq!(field("generation").as_deref(), Some("0"));
    assert_eq!(state.calls, 2);
    for key in [pair.keys.hash.clone(), pair.keys.window.clone()] {
        let ttl: i64 = pair.raw.query(redis::cmd("PTTL").arg(&key)).await;
        assert!(ttl > 23 * 3600 * 1000 && ttl <= 24 * 3600 * 1000, "{key} expires in {ttl} ms");
    }
}

/// A window entry the script cannot read is a permanent error, never a silent reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_window_is_a_permanent_error() {
    let mut pair = Pair::new(standalone(), "malformed").await;
    let p = params(Window::Count { size: 10 });
    pair.report(&p, calls(1, 0, 0)).await;
    let _: i64 = pair.raw.query(redis::cmd("LPUSH").arg(&pair.keys.window).arg("junk")).await;
    let error = pair.breakers.report(ID, &p, calls(20, 0, 0)).await.unwrap_err();
    assert!(!error.is_transient(), "{error}");
    assert!(error.to_string().contains("malformed"), "{error}");
}
