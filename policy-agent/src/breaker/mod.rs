//! The shared circuit breaker, as one agent runs it. The state machine lives in Redis
//! (`breakwater_store::breaker`: one per target Service port, transitions atomic in Lua on
//! Redis time); every agent keeps a local copy of each breaker's state and answers Envoy
//! from it:
//!
//! - **outcomes in** ([`access_log`]): the pod's Envoy streams an access-log entry for every
//!   call on a route with a breaker; [`Board::record`] classifies it ([`outcome`]) and adds it
//!   to the breaker's pending counts (atomics), and [`Board::flush`] — every
//!   `--breaker-flush-interval` — adds each breaker's counts to its window in Redis in one
//!   script call, whose reply is the breaker's new state;
//! - **decisions out** ([`Board::decide`]): Envoy's rate-limit filter asks before each call
//!   with the descriptor `(BREAKER_KEY, id)`. CLOSED admits from the local copy, with no
//!   Redis round trip; OPEN rejects until its open duration has passed by this pod's clock;
//!   then, and in HALF_OPEN, the agent asks Redis for one of the cluster-wide probes, and
//!   rejects locally again once it has been refused one until the breaker moves on;
//! - **learning transitions** ([`watch`]): the scripts publish every transition; agents
//!   subscribed apply it within milliseconds, and re-read every breaker after
//!   (re)subscribing, after a configuration change, and every `refresh` interval (a missed
//!   message costs a delay, never a wrong state for longer);
//! - **Redis away** ([`watch::health`]): the copy keeps its last state for `hold`, then every
//!   breaker answers by its policy's fallback (Admit or Reject) until Redis is back and has
//!   been re-read.
//!
//! The local copy orders what it learns by `(since, generation)` of the transitions, so a
//! late reply or message never takes it back to an older state.

pub mod access_log;
pub mod outcome;
pub mod watch;

use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use breakwater_api::agent::BreakerRule;
use breakwater_api::circuit_breaker::BreakerFallback;
use breakwater_store::breaker::{BreakerState, BreakerStore, Event, Outcomes, Params, State, Window};
use envoy_types::pb::envoy::data::accesslog::v3::HttpAccessLogEntry;
use futures::future::BoxFuture;
use tokio::sync::Notify;

use crate::metrics::{BreakerCounters, Metrics};
use crate::store::StoreError;

/// How long a refused probe keeps this agent from asking again, at least: bounds the calls
/// to Redis when this pod's clock runs ahead of Redis's.
const PROBE_BACKOFF: Duration = Duration::from_millis(5);
/// The least a flush or a re-read waits for Redis.
const BACKGROUND_DEADLINE: Duration = Duration::from_millis(100);

/// Timing of the breakers' background work.
#[derive(Clone, Debug)]
pub struct BreakerSettings {
    /// How often pending outcomes are added to Redis: bounds how late a failure is counted.
    pub flush_interval: Duration,
    /// How long a probe may wait for Redis (`--deadline`); flushes and re-reads, off the
    /// request path, wait at least 100 ms.
    pub deadline: Duration,
    /// How long the local copy is trusted while Redis is unreachable, before the fallback.
    pub hold: Duration,
    /// How often every breaker is re-read from Redis even when no message says it changed.
    pub refresh: Duration,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        BreakerSettings {
            flush_interval: Duration::from_millis(20),
            deadline: Duration::from_millis(5),
            hold: Duration::from_secs(10),
            refresh: Duration::from_secs(30),
        }
    }
}

/// The numbers a store needs to run `rule`'s state machine, or why it cannot be run.
pub fn params(rule: &BreakerRule) -> Result<Params, String> {
    let percent = |name: &str, value: u32| {
        if (1..=100).contains(&value) { Ok(value) } else { Err(format!("{name} must be 1-100, got {value}")) }
    };
    let micros = |ms: u64| i64::try_from(ms.saturating_mul(1000)).unwrap_or(i64::MAX);
    let window = match rule.window {
        breakwater_api::circuit_breaker::WindowKind::Count if rule.window_size > 0 => {
            Window::Count { size: rule.window_size }
        }
        breakwater_api::circuit_breaker::WindowKind::Time if rule.window_ms > 0 => {
            Window::time(micros(rule.window_ms))
        }
        kind => return Err(format!("a {kind:?} window needs a size (Count) or a duration (Time)")),
    };
    if rule.open_ms == 0 {
        return Err("openMs must be at least 1".into());
    }
    Ok(Params {
        failure_rate: percent("failureRateThreshold", rule.failure_rate_threshold)?,
        slow_call_us: (rule.slow_call_ms > 0).then(|| micros(rule.slow_call_ms)),
        slow_rate: if rule.slow_call_ms > 0 {
            percent("slowCallRateThreshold", rule.slow_call_rate_threshold)?
        } else {
            100
        },
        window,
        minimum_calls: rule.minimum_calls.max(1),
        open_us: micros(rule.open_ms),
        half_open_calls: rule.half_open_calls.max(1),
    })
}

/// A validated breaker rule, as a configuration carries it to the [`Board`].
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledBreaker {
    pub rule: BreakerRule,
    pub params: Params,
}

/// The breaker state machine's calls, object-safe so the board holds either backend.
pub trait Backend: Send + Sync + Debug {
    fn report<'a>(
        &'a self,
        id: &'a str,
        params: &'a Params,
        outcomes: Outcomes,
    ) -> BoxFuture<'a, Result<BreakerState, StoreError>>;
    fn probe<'a>(
        &'a self,
        id: &'a str,
        params: &'a Params,
    ) -> BoxFuture<'a, Result<(bool, BreakerState), StoreError>>;
    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<BreakerState>, StoreError>>;
}

impl<T: BreakerStore + Debug> Backend for T {
    fn report<'a>(
        &'a self,
        id: &'a str,
        params: &'a Params,
        outcomes: Outcomes,
    ) -> BoxFuture<'a, Result<BreakerState, StoreError>> {
        Box::pin(BreakerStore::report(self, id, params, outcomes))
    }
    fn probe<'a>(
        &'a self,
        id: &'a str,
        params: &'a Params,
    ) -> BoxFuture<'a, Result<(bool, BreakerState), StoreError>> {
        Box::pin(BreakerStore::probe(self, id, params))
    }
    fn state<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<BreakerState>, StoreError>> {
        Box::pin(BreakerStore::state(self, id))
    }
}

/// Outcomes recorded since the last flush.
#[derive(Debug, Default)]
struct Pending {
    calls: AtomicU32,
    failures: AtomicU32,
    slow: AtomicU32,
    bad: AtomicU32,
}

impl Pending {
    fn add(&self, call: outcome::Call) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if call.failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        if call.slow {
            self.slow.fetch_add(1, Ordering::Relaxed);
        }
        if call.failed || call.slow {
            self.bad.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Takes what was recorded. A call recorded concurrently may land in this take or the
    /// next, never in both or neither; `calls` is taken last so it is never below the
    /// others in one take.
    fn take(&self) -> Option<Outcomes> {
        let failures = self.failures.swap(0, Ordering::Relaxed);
        let slow = self.slow.swap(0, Ordering::Relaxed);
        let bad = self.bad.swap(0, Ordering::Relaxed);
        let calls = self.calls.swap(0, Ordering::Relaxed).max(failures).max(slow).max(bad);
        (calls > 0).then_some(Outcomes { calls, failures, slow, bad })
    }
}

/// What this agent believes about one breaker.
#[derive(Debug, Clone, Copy)]
struct Local {
    state: State,
    since_us: i64,
    generation: u64,
    /// OPEN, or HALF_OPEN with the probes refused: reject without asking Redis until then.
    ask_after: Instant,
}

/// One breaker: its rule, the outcomes waiting to be flushed, and the local copy.
#[derive(Debug)]
pub struct Breaker {
    pub rule: BreakerRule,
    params: Params,
    slow_after: Option<Duration>,
    pending: Pending,
    local: Mutex<Local>,
    counters: BreakerCounters,
}

impl Breaker {
    fn new(compiled: &CompiledBreaker, metrics: &Metrics) -> Self {
        Breaker {
            slow_after: compiled
                .params
                .slow_call_us
                .and_then(|us| u64::try_from(us).ok())
                .map(Duration::from_micros),
            rule: compiled.rule.clone(),
            params: compiled.params,
            pending: Pending::default(),
            local: Mutex::new(Local {
                state: State::Closed,
                since_us: 0,
                generation: 0,
                ask_after: Instant::now(),
            }),
            counters: metrics.breaker_counters(&compiled.rule.id),
        }
    }

    fn local(&self) -> Local {
        *self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The state as the store reported it, unless the copy already knows a later transition.
    fn adopt(&self, state: &BreakerState) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        // A store that lost its data starts over at (0, 0); nothing else can go back.
        let newer = (state.since_us, state.generation) >= (local.since_us, local.generation);
        if !newer && state.since_us != 0 {
            return;
        }
        let now = Instant::now();
        let rearm = instant_at(state.since_us + self.params.open_us, now);
        let ask_after = match state.state {
            State::Closed => now,
            State::Open => rearm,
            State::HalfOpen if state.probes_granted >= self.params.half_open_calls => rearm,
            State::HalfOpen => now,
        };
        *local =
            Local { state: state.state, since_us: state.since_us, generation: state.generation, ask_after };
        self.counters.state.set(state_value(state.state));
    }

    fn back_off(&self) {
        let mut local = self.local.lock().unwrap_or_else(PoisonError::into_inner);
        local.ask_after = local.ask_after.max(Instant::now() + PROBE_BACKOFF);
    }
}

/// The `Instant` at which the store's clock reads `at_us`, by this pod's clock.
fn instant_at(at_us: i64, now: Instant) -> Instant {
    let wall_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
    now + Duration::from_micros(u64::try_from(at_us - wall_us).unwrap_or(0))
}

fn state_value(state: State) -> i64 {
    match state {
        State::Closed => 0,
        State::Open => 1,
        State::HalfOpen => 2,
    }
}

/// What the board answered for one descriptor.
#[derive(Debug, Clone)]
pub enum Decision {
    /// No breaker of this id is configured: admitted.
    Unknown,
    Admit(Arc<Breaker>),
    Reject(Arc<Breaker>),
}

/// Every breaker this agent knows, with the store it shares their state through.
#[derive(Debug)]
pub struct Board {
    breakers: ArcSwap<HashMap<String, Arc<Breaker>>>,
    backend: Arc<dyn Backend>,
    /// Set while Redis has been unreachable for longer than `hold`.
    fallback: AtomicBool,
    /// Woken when breakers are added, so their state is read.
    added: Notify,
    metrics: Arc<Metrics>,
    settings: BreakerSettings,
}

impl Board {
    pub fn new(backend: Arc<dyn Backend>, metrics: Arc<Metrics>, settings: BreakerSettings) -> Self {
        Board {
            breakers: ArcSwap::default(),
            backend,
            fallback: AtomicBool::new(false),
            added: Notify::new(),
            metrics,
            settings,
        }
    }

    pub fn settings(&self) -> &BreakerSettings {
        &self.settings
    }

    /// Puts `breakers` in force. A breaker that stays keeps its state and pending outcomes
    /// (a changed threshold applies at its next evaluation, in Redis); a removed one is
    /// forgotten, so its route — gone from Envoy too — is not judged any more.
    pub fn set_rules(&self, breakers: &[CompiledBreaker]) {
        let current = self.breakers.load();
        let mut added = false;
        let next: HashMap<String, Arc<Breaker>> = breakers
            .iter()
            .map(|compiled| {
                let breaker = match current.get(&compiled.rule.id) {
                    Some(old) if old.rule == compiled.rule => old.clone(),
                    Some(old) => {
                        let new = Breaker::new(compiled, &self.metrics);
                        *new.local.lock().unwrap_or_else(PoisonError::into_inner) = old.local();
                        if let Some(outcomes) = old.pending.take() {
                            new.pending.calls.fetch_add(outcomes.calls, Ordering::Relaxed);
                            new.pending.failures.fetch_add(outcomes.failures, Ordering::Relaxed);
                            new.pending.slow.fetch_add(outcomes.slow, Ordering::Relaxed);
                            new.pending.bad.fetch_add(outcomes.bad, Ordering::Relaxed);
                        }
                        Arc::new(new)
                    }
                    None => {
                        added = true;
                        Arc::new(Breaker::new(compiled, &self.metrics))
                    }
                };
                (compiled.rule.id.clone(), breaker)
            })
            .collect();
        for gone in current.keys().filter(|id| !next.contains_key(*id)) {
            self.metrics.forget_breaker(gone);
        }
        self.breakers.store(Arc::new(next));
        if added {
            self.added.notify_one();
        }
    }

    pub fn get(&self, id: &str) -> Option<Arc<Breaker>> {
        self.breakers.load().get(id).cloned()
    }

    /// Whether a call on the route of breaker `id` may go ahead.
    pub async fn decide(&self, id: &str) -> Decision {
        let Some(breaker) = self.get(id) else {
            return Decision::Unknown;
        };
        let admitted = if self.fallback.load(Ordering::Relaxed) {
            breaker.counters.fallback.inc();
            breaker.rule.fallback == BreakerFallback::Admit
        } else {
            let local = breaker.local();
            match local.state {
                State::Closed => true,
                _ if Instant::now() < local.ask_after => false,
                _ => self.probe(&breaker).await,
            }
        };
        if admitted {
            breaker.counters.admitted.inc();
            Decision::Admit(breaker)
        } else {
            breaker.counters.rejected.inc();
            Decision::Reject(breaker)
        }
    }

    /// Asks the store for a probe; refused when the store does not answer in time (while
    /// Redis is away and the hold lasts, the breaker stays as it was: not CLOSED).
    async fn probe(&self, breaker: &Breaker) -> bool {
        let call = self.backend.probe(&breaker.rule.id, &breaker.params);
        match tokio::time::timeout(self.settings.deadline, call).await {
            Ok(Ok((admitted, state))) => {
                breaker.adopt(&state);
                if !admitted {
                    breaker.back_off();
                }
                breaker.counters.probes.inc();
                admitted
            }
            Ok(Err(error)) => {
                self.metrics.breaker_store_error("probe", error.kind().label());
                breaker.back_off();
                false
            }
            Err(_) => {
                self.metrics.breaker_store_error("probe", "timeout");
                breaker.back_off();
                false
            }
        }
    }

    /// Reports and reads are off the request path: they may wait longer than a decision.
    fn background_deadline(&self) -> Duration {
        self.settings.deadline.max(BACKGROUND_DEADLINE)
    }

    /// Adds the calls `entries` record to their breakers' pending outcomes (entries on
    /// routes without a known breaker, and calls Envoy refused itself, are counted apart).
    pub fn record(&self, entries: &[HttpAccessLogEntry]) {
        let breakers = self.breakers.load();
        let (mut unknown, mut ignored) = (0, 0);
        for entry in entries {
            let route = entry.common_properties.as_ref().map_or("", |c| c.route_name.as_str());
            let Some(breaker) = breakers.get(route) else {
                unknown += 1;
                continue;
            };
            match outcome::classify(entry, breaker.slow_after) {
                Some(call) => breaker.pending.add(call),
                None => ignored += 1,
            }
        }
        let counted = entries.len() - unknown - ignored;
        self.metrics.access_log_entries(counted as u64, ignored as u64, unknown as u64);
    }

    /// Adds every breaker's pending outcomes to its window in the store, all at once, and
    /// adopts the states the store answers. Outcomes the store did not take are dropped
    /// (counted in the metrics): they would be stale by the next flush anyway.
    pub async fn flush(&self) {
        let breakers = self.breakers.load_full();
        let calls = breakers.values().filter_map(|breaker| {
            let outcomes = breaker.pending.take()?;
            Some(async move {
                let call = self.backend.report(&breaker.rule.id, &breaker.params, outcomes);
                match tokio::time::timeout(self.background_deadline(), call).await {
                    Ok(Ok(state)) => breaker.adopt(&state),
                    Ok(Err(error)) => {
                        self.metrics.breaker_store_error("report", error.kind().label());
                        breaker.counters.dropped.inc_by(u64::from(outcomes.calls));
                    }
                    Err(_) => {
                        self.metrics.breaker_store_error("report", "timeout");
                        breaker.counters.dropped.inc_by(u64::from(outcomes.calls));
                    }
                }
            })
        });
        futures::future::join_all(calls).await;
    }

    /// Reads every breaker's state from the store; true when every read succeeded.
    pub async fn refresh(&self) -> bool {
        let breakers = self.breakers.load_full();
        let reads = breakers.values().map(|breaker| async move {
            let read = self.backend.state(&breaker.rule.id);
            match tokio::time::timeout(self.background_deadline(), read).await {
                Ok(Ok(state)) => {
                    breaker.adopt(&state.unwrap_or_default());
                    true
                }
                Ok(Err(error)) => {
                    self.metrics.breaker_store_error("read", error.kind().label());
                    false
                }
                Err(_) => {
                    self.metrics.breaker_store_error("read", "timeout");
                    false
                }
            }
        });
        futures::future::join_all(reads).await.into_iter().all(|ok| ok)
    }

    /// A transition another agent's script published.
    pub fn apply(&self, event: &Event) {
        if let Some(breaker) = self.get(&event.id) {
            breaker.adopt(&BreakerState {
                state: event.state,
                since_us: event.since_us,
                generation: event.generation,
                ..Default::default()
            });
        }
    }

    pub fn fallback_active(&self) -> bool {
        self.fallback.load(Ordering::SeqCst)
    }

    /// Switches every breaker to its fallback (Redis away for longer than `hold`) or back.
    pub fn set_fallback(&self, on: bool) {
        if self.fallback.swap(on, Ordering::SeqCst) != on {
            self.metrics.breaker_fallback.set(i64::from(on));
            if on {
                tracing::warn!(hold = ?self.settings.hold, "Redis unreachable: breakers answer by their fallback");
            } else {
                tracing::info!("Redis reachable again: breakers follow their shared state");
            }
        }
    }

    /// The state this agent answers from, for tests and `/debug`.
    pub fn state_of(&self, id: &str) -> Option<State> {
        self.get(id).map(|b| b.local().state)
    }
}

#[cfg(test)]
mod tests {
    use breakwater_api::circuit_breaker::WindowKind;
    use breakwater_store::breaker::MemoryBreakers;
    use envoy_types::pb::envoy::data::accesslog::v3::{AccessLogCommon, HttpResponseProperties};
    use envoy_types::pb::google::protobuf::UInt32Value;

    use super::*;

    const ID: &str = "shop/payments:80";

    fn rule(failure_rate_threshold: u32, fallback: BreakerFallback) -> CompiledBreaker {
        let rule = BreakerRule {
            id: ID.into(),
            policy: "shop/payments".into(),
            failure_rate_threshold,
            slow_call_ms: 0,
            slow_call_rate_threshold: 0,
            window: WindowKind::Count,
            window_size: 4,
            window_ms: 0,
            minimum_calls: 4,
            open_ms: 3_600_000,
            half_open_calls: 1,
            fallback,
        };
        CompiledBreaker { params: params(&rule).expect("valid"), rule }
    }

    fn board(compiled: &CompiledBreaker) -> (Board, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::default());
        let board =
            Board::new(Arc::new(MemoryBreakers::default()), metrics.clone(), BreakerSettings::default());
        board.set_rules(std::slice::from_ref(compiled));
        (board, metrics)
    }

    fn failed_call() -> HttpAccessLogEntry {
        HttpAccessLogEntry {
            common_properties: Some(AccessLogCommon { route_name: ID.into(), ..Default::default() }),
            response: Some(HttpResponseProperties {
                response_code: Some(UInt32Value { value: 503 }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A transition at `at_us` past now (by the wall clock, as Redis's would be).
    fn event(state: State, at_us: i64, generation: u64) -> Event {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        Event { id: ID.into(), state, since_us: now + at_us, generation }
    }

    fn probes(metrics: &Metrics) -> bool {
        metrics.encode().lines().any(|l| l.contains("result=\"probe\"") && !l.ends_with(" 0"))
    }

    #[tokio::test]
    async fn closed_answers_without_asking_the_store() {
        let (board, metrics) = board(&rule(50, BreakerFallback::Admit));
        for _ in 0..100 {
            assert!(matches!(board.decide(ID).await, Decision::Admit(_)));
        }
        assert!(!probes(&metrics), "{}", metrics.encode());
        assert!(matches!(board.decide("shop/other:80").await, Decision::Unknown));
    }

    #[tokio::test]
    async fn recorded_failures_open_it_at_the_flush() {
        let (board, _) = board(&rule(50, BreakerFallback::Admit));
        board.record(&[failed_call(), failed_call(), failed_call()]);
        board.flush().await;
        assert_eq!(board.state_of(ID), Some(State::Closed), "3 calls < minimumCalls 4");
        board.record(&[failed_call()]);
        board.flush().await;
        assert_eq!(board.state_of(ID), Some(State::Open));
        assert!(matches!(board.decide(ID).await, Decision::Reject(_)));
    }

    #[tokio::test]
    async fn a_late_message_never_takes_the_copy_back_but_a_store_that_lost_its_data_does() {
        let (board, _) = board(&rule(50, BreakerFallback::Admit));
        board.apply(&event(State::Open, 2_000, 2));
        board.apply(&event(State::Closed, 1_000, 1));
        assert_eq!(board.state_of(ID), Some(State::Open), "an older transition arrived late");
        board.apply(&event(State::HalfOpen, 2_000, 3));
        assert_eq!(board.state_of(ID), Some(State::HalfOpen), "same instant, later generation");
        // A store that lost its keys reads as a breaker that never moved.
        let breaker = board.get(ID).expect("configured");
        breaker.adopt(&BreakerState::default());
        assert_eq!(board.state_of(ID), Some(State::Closed));
    }

    #[tokio::test]
    async fn a_changed_rule_keeps_the_state_and_pending_outcomes_and_a_removed_one_admits() {
        let strict = rule(50, BreakerFallback::Admit);
        let (board, _) = board(&rule(100, BreakerFallback::Admit));
        board.apply(&event(State::Open, 2_000, 1));
        board.record(&[failed_call()]);
        board.set_rules(std::slice::from_ref(&strict));
        let breaker = board.get(ID).expect("kept");
        assert_eq!(breaker.rule, strict.rule);
        assert_eq!(board.state_of(ID), Some(State::Open));
        assert_eq!(breaker.pending.take().map(|o| (o.calls, o.failures)), Some((1, 1)));
        board.set_rules(&[]);
        assert!(matches!(board.decide(ID).await, Decision::Unknown));
    }

    #[tokio::test]
    async fn the_fallback_answers_once_switched_on() {
        for (fallback, admitted) in [(BreakerFallback::Admit, true), (BreakerFallback::Reject, false)] {
            let (board, _) = board(&rule(50, fallback));
            board.apply(&event(State::Open, 2_000, 1));
            board.set_fallback(true);
            assert_eq!(matches!(board.decide(ID).await, Decision::Admit(_)), admitted, "{fallback:?}");
            board.set_fallback(false);
            assert!(matches!(board.decide(ID).await, Decision::Reject(_)), "OPEN again once Redis is back");
        }
    }

    #[test]
    fn rules_the_machine_cannot_run_are_refused() {
        let mut bad = rule(50, BreakerFallback::Admit).rule;
        bad.failure_rate_threshold = 0;
        assert!(params(&bad).unwrap_err().contains("failureRateThreshold"));
        let mut bad = rule(50, BreakerFallback::Admit).rule;
        bad.window_size = 0;
        assert!(params(&bad).unwrap_err().contains("Count"));
        let mut bad = rule(50, BreakerFallback::Admit).rule;
        bad.open_ms = 0;
        assert!(params(&bad).unwrap_err().contains("openMs"));
    }
}
