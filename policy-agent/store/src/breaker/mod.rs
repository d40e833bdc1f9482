//! The shared circuit breaker: one CLOSED/OPEN/HALF_OPEN state machine per target Service
//! port (id `<namespace>/<name>:<port>`), kept in Redis and stepped by every caller pod's
//! agent, so one failing dependency opens the breaker for all callers at once and half-open
//! probes are counted cluster-wide.
//!
//! The machine is written twice on purpose, as the rate-limit algorithms are: a Lua script
//! that Redis runs atomically with Redis `TIME` as the only clock ([`redis`], `machine.lua`),
//! and a pure Rust function over an explicit clock ([`memory::Machine`]) that the in-memory
//! backend runs. Conformance tests (`tests/breaker.rs`) hold the two to the same replies and
//! the same stored window.
//!
//! Every call first *advances*: OPEN whose `open_us` has passed becomes HALF_OPEN, and a
//! HALF_OPEN that has lasted `open_us` without resolving is re-armed (its probes' outcomes
//! never came — a caller pod died — and must not hold the breaker half-open forever). Then
//! [`BreakerStore::report`] adds outcomes (CLOSED: to the window, then judges the rates;
//! HALF_OPEN: any failure or slow call reopens, enough good calls close; OPEN: ignored) and
//! [`BreakerStore::probe`] asks to make a call (CLOSED admits, OPEN refuses, HALF_OPEN admits
//! until `half_open_calls` probes were granted cluster-wide). Every transition bumps the
//! generation and is published on [`channel`] as an [`Event`], from inside the script.
//! Opening empties the window but keeps its totals, so an OPEN or HALF_OPEN breaker reads
//! the rates that opened it; closing starts a fresh window.
//!
//! Both backends clamp parameters outside their documented ranges into them
//! ([`params_args`]) and outcomes to `failures, slow <= calls`, so no input can make the
//! script divide by zero or the twin panic.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures::Stream;

use crate::{Error, RedisTopology};

pub mod memory;
pub mod redis;

pub use memory::{Machine, MemoryBreakers};
pub use redis::RedisBreakers;

/// A Time window is counted in this many slots: it spans between 19 and 20 slots of time.
pub const TIME_SLOTS: i64 = 20;

/// How long a breaker's keys live past their last write: an idle breaker is forgotten
/// (and reads as never written, CLOSED).
pub const TTL: Duration = Duration::from_secs(24 * 3600);

/// The smallest slot of a Time window, in µs.
pub const MIN_SLOT_US: i64 = 1000;

/// The sliding window the CLOSED state judges rates over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// The last `size` calls.
    Count { size: u32 },
    /// The calls of the last [`TIME_SLOTS`] slots of `slot_us` (see [`Window::time`]).
    Time { slot_us: i64 },
}

impl Window {
    /// A Time window of `window_us`: slots of `max(window_us / 20, 1000)` µs.
    pub fn time(window_us: i64) -> Self {
        Window::Time { slot_us: (window_us / TIME_SLOTS).max(MIN_SLOT_US) }
    }
}

/// One breaker's rules. All times in µs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// 1..=100, percent: opens when `failures * 100 >= failure_rate * calls`.
    pub failure_rate: u32,
    /// `None`: no slow-call rule. The agent classifies calls as slow; the machine only needs
    /// to know whether the rule exists.
    pub slow_call_us: Option<i64>,
    /// 1..=100: opens when `slow * 100 >= slow_rate * calls` (only with a slow-call rule).
    pub slow_rate: u32,
    pub window: Window,
    /// Rates are judged only when the window holds at least this many calls (>= 1).
    pub minimum_calls: u32,
    /// How long OPEN lasts before HALF_OPEN, and how long HALF_OPEN waits for its probes.
    pub open_us: i64,
    /// Probes granted cluster-wide in HALF_OPEN, and good calls that close it (>= 1).
    pub half_open_calls: u32,
}

/// The three states, stored as 0, 1, 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum State {
    #[default]
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The number stored, replied and published.
    pub fn code(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            0 => Some(State::Closed),
            1 => Some(State::Open),
            2 => Some(State::HalfOpen),
            _ => None,
        }
    }

    /// `CLOSED`, `OPEN` or `HALF_OPEN`, as status and docs spell them.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "CLOSED",
            State::Open => "OPEN",
            State::HalfOpen => "HALF_OPEN",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to calls to one target since the last report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcomes {
    pub calls: u32,
    pub failures: u32,
    pub slow: u32,
    /// Calls that failed or were slow (`<= calls`). The machine does not read it: the rates
    /// are judged on failures and slow calls separately.
    pub bad: u32,
}

impl Outcomes {
    /// Failures, slow and bad calls are among the calls: a report claiming more is read as
    /// all calls failed (or were slow), never as a rate above 100 %.
    pub fn clamped(self) -> Self {
        Outcomes {
            calls: self.calls,
            failures: self.failures.min(self.calls),
            slow: self.slow.min(self.calls),
            bad: self.bad.min(self.calls),
        }
    }
}

/// A breaker as stored: what a report or probe replies and a read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BreakerState {
    pub state: State,
    /// Redis time of the last transition, µs; 0 = never.
    pub since_us: i64,
    /// Transitions so far (a missing breaker is generation 0).
    pub generation: u64,
    /// Window totals; while OPEN or HALF_OPEN, those of the window that opened it (kept as
    /// it opened, probes not added: they count in `probes_ok`). Zero again once it closes.
    pub calls: u64,
    pub failures: u64,
    pub slow: u64,
    /// Probes granted, and good calls reported, in this HALF_OPEN; zero otherwise.
    pub probes_granted: u32,
    pub probes_ok: u32,
}

impl BreakerState {
    /// From the eight numbers the script replies `[state, since, generation, calls, failures,
    /// slow, granted, ok]`; `None` for an unknown state or a negative count.
    pub fn from_reply(
        [state, since, generation, calls, failures, slow, granted, ok]: [i64; 8],
    ) -> Option<Self> {
        Some(BreakerState {
            state: State::from_code(state)?,
            since_us: since,
            generation: u64::try_from(generation).ok()?,
            calls: u64::try_from(calls).ok()?,
            failures: u64::try_from(failures).ok()?,
            slow: u64::try_from(slow).ok()?,
            probes_granted: u32::try_from(granted).ok()?,
            probes_ok: u32::try_from(ok).ok()?,
        })
    }

    /// The eight numbers of [`BreakerState::from_reply`].
    pub fn to_reply(&self) -> [i64; 8] {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        [
            self.state.code(),
            self.since_us,
            n(self.generation),
            n(self.calls),
            n(self.failures),
            n(self.slow),
            i64::from(self.probes_granted),
            i64::from(self.probes_ok),
        ]
    }

    /// The event announcing this state of breaker `id`.
    pub fn event(&self, id: &str) -> Event {
        Event { id: id.to_string(), state: self.state, since_us: self.since_us, generation: self.generation }
    }
}

/// A transition, as published: `<generation> <state 0|1|2> <since_us> <id>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub state: State,
    pub since_us: i64,
    pub generation: u64,
}

impl Event {
    /// Reads a payload; the id is the rest of it, spaces included.
    pub fn parse(payload: &str) -> Option<Self> {
        let mut parts = payload.splitn(4, ' ');
        let generation = parts.next()?.parse().ok()?;
        let state = State::from_code(parts.next()?.parse().ok()?)?;
        let since_us = parts.next()?.parse().ok()?;
        let id = parts.next().filter(|id| !id.is_empty())?;
        Some(Event { id: id.to_string(), state, since_us, generation })
    }

    /// The payload the script publishes.
    pub fn format(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.generation, self.state.code(), self.since_us, self.id)
    }
}

/// The channel breakers under `prefix` publish their transitions on.
pub fn channel(prefix: &str) -> String {
    format!("{prefix}:breaker-events")
}

/// Subscribes to the transitions of the breakers under `prefix` on the Redis of `topology`:
/// a stream of events as published, which ends when the connection does (pub/sub is at
/// most once: after resubscribing, read the breakers again).
pub async fn subscribe(
    topology: &RedisTopology,
    prefix: &str,
) -> Result<impl Stream<Item = Event> + Send + 'static, Error> {
    crate::pubsub::subscribe(topology, &channel(prefix), Event::parse).await
}

/// How many numbers [`params_args`] gives.
pub const PARAMS_ARGS: usize = 8;

/// The parameters as the script reads them, clamped into their documented ranges, in this
/// order: `failure_rate` (1 to 100), `slow_call_us` (-1 when there is no slow-call rule,
/// else at least 0), `slow_rate` (1 to 100), window kind (0 Count, 1 Time), window size
/// (Count: calls; Time: slot µs; at least 1), `minimum_calls` (at least 1), `open_us` (at
/// least 0), `half_open_calls` (at least 1). The pure twin runs on the same numbers.
pub fn params_args(params: &Params) -> Vec<i64> {
    Rules::of(params).args().to_vec()
}

/// The clamped numbers of [`params_args`], which both machines run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    pub failure_rate: i64,
    /// -1 when there is no slow-call rule.
    pub slow_call_us: i64,
    pub slow_rate: i64,
    pub window: Window,
    pub minimum_calls: u64,
    pub open_us: i64,
    pub half_open_calls: u32,
}

impl Rules {
    pub fn of(p: &Params) -> Self {
        Rules {
            failure_rate: i64::from(p.failure_rate.clamp(1, 100)),
            slow_call_us: p.slow_call_us.map_or(-1, |us| us.max(0)),
            slow_rate: i64::from(p.slow_rate.clamp(1, 100)),
            window: match p.window {
                Window::Count { size } => Window::Count { size: size.max(1) },
                Window::Time { slot_us } => Window::Time { slot_us: slot_us.max(1) },
            },
            minimum_calls: u64::from(p.minimum_calls.max(1)),
            open_us: p.open_us.max(0),
            half_open_calls: p.half_open_calls.max(1),
        }
    }

    pub fn slow_rule(&self) -> bool {
        self.slow_call_us >= 0
    }

    fn args(&self) -> [i64; PARAMS_ARGS] {
        let (kind, size) = match self.window {
            Window::Count { size } => (0, i64::from(size)),
            Window::Time { slot_us } => (1, slot_us),
        };
        [
            self.failure_rate,
            self.slow_call_us,
            self.slow_rate,
            kind,
            size,
            i64::try_from(self.minimum_calls).unwrap_or(i64::MAX),
            self.open_us,
            i64::from(self.half_open_calls),
        ]
    }
}

/// The breakers' atomic operations; `id` is the breaker id, from which a backend derives its
/// keys. Every call is one atomic step of the machine on the store's clock.
pub trait BreakerStore: Send + Sync + 'static {
    /// Advances, then adds `outcomes`; replies the breaker after both.
    fn report(
        &self,
        id: &str,
        params: &Params,
        outcomes: Outcomes,
    ) -> impl Future<Output = Result<BreakerState, Error>> + Send;

    /// Advances, then asks to make one call: whether it is admitted (a HALF_OPEN probe
    /// admitted is counted), and the breaker after.
    fn probe(
        &self,
        id: &str,
        params: &Params,
    ) -> impl Future<Output = Result<(bool, BreakerState), Error>> + Send;

    /// The breaker as stored, without advancing it (an OPEN whose time has passed reads OPEN
    /// until a report or probe moves it); `None` when it was never written or has expired.
    fn state(&self, id: &str) -> impl Future<Output = Result<Option<BreakerState>, Error>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_with_the_contract_payload() {
        let event =
            Event { id: "shop/payments:8080".into(), state: State::HalfOpen, since_us: 17, generation: 3 };
        assert_eq!(event.format(), "3 2 17 shop/payments:8080");
        assert_eq!(Event::parse("3 2 17 shop/payments:8080"), Some(event));
        assert_eq!(Event::parse("1 0 5 a b").map(|e| e.id), Some("a b".into()));
        for bad in ["", "1 0 5", "1 0 5 ", "1 3 5 x", "-1 0 5 x", "a 0 5 x", "1 0 x y"] {
            assert_eq!(Event::parse(bad), None, "{bad:?}");
        }
        assert_eq!(channel("bw"), "bw:breaker-events");
    }

    #[test]
    fn states_have_codes_and_names() {
        for state in [State::Closed, State::Open, State::HalfOpen] {
            assert_eq!(State::from_code(state.code()), Some(state));
        }
        assert_eq!(State::from_code(3), None);
        assert_eq!(State::HalfOpen.to_string(), "HALF_OPEN");
    }

    #[test]
    fn replies_decode_and_refuse_what_cannot_be() {
        let state = BreakerState {
            state: State::Open,
            since_us: 9,
            generation: 2,
            calls: 0,
            failures: 0,
            slow: 0,
            probes_granted: 0,
            probes_ok: 0,
        };
        assert_eq!(BreakerState::from_reply(state.to_reply()), Some(state));
        assert_eq!(BreakerState::from_reply([5, 0, 0, 0, 0, 0, 0, 0]), None);
        assert_eq!(BreakerState::from_reply([0, 0, -1, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn params_are_clamped_into_their_ranges() {
        let params = Params {
            failure_rate: 0,
            slow_call_us: Some(-5),
            slow_rate: 250,
            window: Window::Count { size: 0 },
            minimum_calls: 0,
            open_us: -1,
            half_open_calls: 0,
        };
        assert_eq!(params_args(&params), [1, 0, 100, 0, 1, 1, 0, 1]);
        let params = Params { slow_call_us: None, window: Window::time(10_000_000), ..params };
        assert_eq!(params_args(&params), [1, -1, 100, 1, 500_000, 1, 0, 1]);
        assert_eq!(Window::time(1), Window::Time { slot_us: MIN_SLOT_US });
        assert_eq!(params_args(&Params { window: Window::Time { slot_us: 0 }, ..params })[4], 1);
    }

    #[test]
    fn outcomes_never_claim_more_failures_than_calls() {
        let o = Outcomes { calls: 3, failures: 9, slow: 4, bad: 10 }.clamped();
        assert_eq!(o, Outcomes { calls: 3, failures: 3, slow: 3, bad: 3 });
    }
}
