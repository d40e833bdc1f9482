//! Breakers in this process: [`Machine`], the pure twin of `machine.lua` over an explicit
//! clock, and [`MemoryBreakers`], which runs one machine per breaker id on a [`Clock`] (one
//! agent alone, standalone mode, tests). The conformance tests (`tests/breaker.rs`) hold
//! [`Machine`] to the script: same replies, same stored window, step for step.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
#[cfg(test)]
use std::time::Duration;

use tokio::sync::broadcast;

use super::{BreakerState, BreakerStore, Event, Outcomes, Params, Rules, State, TIME_SLOTS, TTL, Window};
use crate::Error;
use crate::clock::{Clock, TokioClock, micros};

/// One window entry, stored in Redis as `slot:calls:failures:slow` (Count windows: slot 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry {
    pub slot: i64,
    pub calls: u64,
    pub failures: u64,
    pub slow: u64,
}

impl Entry {
    pub fn parse(raw: &str) -> Option<Self> {
        let mut parts = raw.split(':');
        let entry = Entry {
            slot: parts.next()?.parse().ok()?,
            calls: parts.next()?.parse().ok()?,
            failures: parts.next()?.parse().ok()?,
            slow: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(entry)
    }

    pub fn format(&self) -> String {
        format!("{}:{}:{}:{}", self.slot, self.calls, self.failures, self.slow)
    }
}

/// A transition one step made (each one is an [`Event`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub state: State,
    pub since_us: i64,
    pub generation: u64,
}

impl Transition {
    pub fn event(self, id: &str) -> Event {
        Event { id: id.to_string(), state: self.state, since_us: self.since_us, generation: self.generation }
    }
}

/// What one step of the machine did: its reply, its transitions in order, and whether it
/// changed anything (the script then writes and refreshes the keys' expiry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step<T> {
    pub reply: T,
    pub transitions: Vec<Transition>,
    pub wrote: bool,
}

/// One breaker: the hash (as [`BreakerState`]) and the window list of the script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Machine {
    state: BreakerState,
    window: VecDeque<Entry>,
}

impl Machine {
    pub fn new() -> Self {
        Self::default()
    }

    /// The breaker as stored.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// The window's entries, oldest first.
    pub fn window(&self) -> &VecDeque<Entry> {
        &self.window
    }

    /// Advances at `now_us`, then adds `outcomes` (see the module of [`super`]).
    pub fn report(&mut self, now_us: i64, params: &Params, outcomes: Outcomes) -> Step<BreakerState> {
        let mut run = Run::new(self, now_us, params);
        run.advance();
        match run.m.state.state {
            State::Closed => run.report_closed(outcomes.clamped()),
            State::HalfOpen => run.report_half_open(outcomes.clamped()),
            // Calls admitted before it opened: their outcomes no longer matter.
            State::Open => {}
        }
        let reply = run.m.state;
        run.finish(reply)
    }

    /// Advances at `now_us`, then asks to make one call.
    pub fn probe(&mut self, now_us: i64, params: &Params) -> Step<(bool, BreakerState)> {
        let mut run = Run::new(self, now_us, params);
        run.advance();
        let admitted = run.probe();
        let reply = (admitted, run.m.state);
        run.finish(reply)
    }
}

/// One step in progress: the script's locals.
struct Run<'a> {
    m: &'a mut Machine,
    rules: Rules,
    now: i64,
    wrote: bool,
    transitions: Vec<Transition>,
}

impl<'a> Run<'a> {
    fn new(m: &'a mut Machine, now: i64, params: &Params) -> Self {
        Run { m, rules: Rules::of(params), now, wrote: false, transitions: Vec::new() }
    }

    fn finish<T>(self, reply: T) -> Step<T> {
        Step { reply, transitions: self.transitions, wrote: self.wrote }
    }

    fn transition(&mut self, state: State) {
        let b = &mut self.m.state;
        b.state = state;
        b.since_us = self.now;
        b.generation += 1;
        b.probes_granted = 0;
        b.probes_ok = 0;
        self.wrote = true;
        self.transitions.push(Transition { state, since_us: self.now, generation: b.generation });
    }

    fn clear_totals(&mut self) {
        let b = &mut self.m.state;
        (b.calls, b.failures, b.slow) = (0, 0, 0);
    }

    fn clear_window(&mut self) {
        self.clear_totals();
        self.m.window.clear();
    }

    /// OPEN past its time becomes HALF_OPEN; a HALF_OPEN as old is re-armed.
    fn advance(&mut self) {
        let b = &self.m.state;
        if b.state != State::Closed && self.now >= b.since_us.saturating_add(self.rules.open_us) {
            self.transition(State::HalfOpen);
        }
    }

    fn probe(&mut self) -> bool {
        match self.m.state.state {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen if self.m.state.probes_granted < self.rules.half_open_calls => {
                self.m.state.probes_granted += 1;
                self.wrote = true;
                true
            }
            State::HalfOpen => false,
        }
    }

    fn report_closed(&mut self, o: Outcomes) {
        // A report of no calls adds nothing: an entry of none would only grow the list.
        if o.calls == 0 {
            return;
        }
        self.wrote = true;
        let entry =
            Entry { slot: 0, calls: o.calls.into(), failures: o.failures.into(), slow: o.slow.into() };
        match self.rules.window {
            Window::Count { size } => self.add_count(entry, u64::from(size)),
            Window::Time { slot_us } => self.add_time(entry, slot_us),
        }
        // Opening empties the window but keeps its totals: OPEN and HALF_OPEN show the
        // window that opened it, and never add to it.
        if self.trips() {
            self.m.window.clear();
            self.transition(State::Open);
        }
    }

    /// Probe outcomes count in `probes_ok` alone: a failed probe reopens it with the totals
    /// of the window that opened it, and closing starts a fresh window.
    fn report_half_open(&mut self, o: Outcomes) {
        if o.failures > 0 || (self.rules.slow_rule() && o.slow > 0) {
            self.transition(State::Open);
        } else if o.calls > 0 {
            let b = &mut self.m.state;
            b.probes_ok = b.probes_ok.saturating_add(o.calls);
            self.wrote = true;
            if b.probes_ok >= self.rules.half_open_calls {
                self.clear_window();
                self.transition(State::Closed);
            }
        }
    }

    fn add_totals(&mut self, e: &Entry) {
        let b = &mut self.m.state;
        b.calls += e.calls;
        b.failures += e.failures;
        b.slow += e.slow;
    }

    fn subtract(&mut self, e: &Entry) {
        let b = &mut self.m.state;
        b.calls -= e.calls;
        b.failures -= e.failures;
        b.slow -= e.slow;
    }

    /// The front entry; an empty window holds no calls, whatever the totals say (as in the
    /// script, where the list may be evicted without the hash). Only CLOSED adds to the
    /// window, so only CLOSED gets here: the totals OPEN and HALF_OPEN keep beside an empty
    /// window are never dropped.
    fn front(&mut self) -> Option<Entry> {
        let front = self.m.window.front().copied();
        if front.is_none() {
            self.clear_totals();
        }
        front
    }

    /// One entry per report; whole entries leave from the front while the calls after them
    /// fill the window, then the front one loses its share of the excess.
    fn add_count(&mut self, entry: Entry, size: u64) {
        if self.m.window.is_empty() {
            self.clear_totals();
        }
        self.m.window.push_back(entry);
        self.add_totals(&entry);
        let mut front = self.front();
        while let Some(e) = front.filter(|e| self.m.state.calls - e.calls >= size) {
            self.m.window.pop_front();
            self.subtract(&e);
            front = self.front();
        }
        if let Some(mut e) = front
            && self.m.state.calls > size
        {
            let excess = self.m.state.calls - size;
            let lost = Entry {
                slot: 0,
                calls: excess,
                failures: share(e.failures, excess, e.calls),
                slow: share(e.slow, excess, e.calls),
            };
            self.subtract(&lost);
            e.calls -= lost.calls;
            e.failures -= lost.failures;
            e.slow -= lost.slow;
            self.m.window[0] = e;
        }
    }

    /// One entry per slot; entries TIME_SLOTS slots old or ahead of now leave first.
    fn add_time(&mut self, mut entry: Entry, slot_us: i64) {
        let current = self.now.div_euclid(slot_us);
        let mut front = self.front();
        while let Some(e) = front.filter(|e| e.slot <= current.saturating_sub(TIME_SLOTS) || e.slot > current)
        {
            self.m.window.pop_front();
            self.subtract(&e);
            front = self.front();
        }
        entry.slot = current;
        self.add_totals(&entry);
        match self.m.window.back_mut() {
            Some(last) if last.slot == current => {
                last.calls += entry.calls;
                last.failures += entry.failures;
                last.slow += entry.slow;
            }
            _ => self.m.window.push_back(entry),
        }
    }

    fn trips(&self) -> bool {
        let (b, r) = (&self.m.state, &self.rules);
        if b.calls < r.minimum_calls {
            return false;
        }
        let over = |count: u64, rate: i64| {
            u128::from(count) * 100 >= u128::from(rate.unsigned_abs()) * u128::from(b.calls)
        };
        over(b.failures, r.failure_rate) || (r.slow_rule() && over(b.slow, r.slow_rate))
    }
}

/// `floor(part * excess / whole)`: the share of `part` that `excess` of `whole` calls carry
/// (the script computes it in doubles, exactly while `part * excess < 2^53`).
fn share(part: u64, excess: u64, whole: u64) -> u64 {
    if whole == 0 {
        return 0;
    }
    u64::try_from(u128::from(part) * u128::from(excess) / u128::from(whole)).unwrap_or(u64::MAX)
}

/// How many events a subscriber of [`MemoryBreakers::subscribe`] may fall behind by before
/// it misses some (it then reads the breakers again, as after a lost pub/sub connection).
const EVENT_BUFFER: usize = 1024;

/// Breakers in memory, on `clock` (µs since the epoch, read under the lock as the script
/// reads `TIME` inside its atomic run). A breaker not written for [`TTL`] is forgotten, as
/// its keys expire in Redis. Clones share the breakers.
pub struct MemoryBreakers<C: Clock = TokioClock> {
    inner: Arc<Inner<C>>,
}

struct Inner<C> {
    clock: C,
    breakers: Mutex<HashMap<String, Kept>>,
    events: broadcast::Sender<Event>,
}

struct Kept {
    machine: Machine,
    expires_at_us: i64,
}

impl<C: Clock> Clone for MemoryBreakers<C> {
    fn clone(&self) -> Self {
        MemoryBreakers { inner: self.inner.clone() }
    }
}

impl<C: Clock> fmt::Debug for MemoryBreakers<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBreakers").field("breakers", &self.breakers().len()).finish_non_exhaustive()
    }
}

impl Default for MemoryBreakers {
    fn default() -> Self {
        Self::new(TokioClock::new())
    }
}

impl<C: Clock> MemoryBreakers<C> {
    pub fn new(clock: C) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        MemoryBreakers { inner: Arc::new(Inner { clock, breakers: Mutex::default(), events }) }
    }

    /// The store's clock, µs since the Unix epoch.
    pub fn now_us(&self) -> i64 {
        self.inner.clock.now_us()
    }

    /// Every transition from now on, as the script publishes them.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn breakers(&self) -> MutexGuard<'_, HashMap<String, Kept>> {
        // A panic while holding the lock cannot leave a breaker half-updated: each step runs
        // on a copy that is stored only when it completes.
        self.inner.breakers.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn step<T>(&self, id: &str, f: impl FnOnce(&mut Machine, i64) -> Step<T>) -> T {
        let mut breakers = self.breakers();
        let now = self.now_us();
        let mut machine = match live(&breakers, id, now) {
            Some(machine) => machine.clone(),
            None => {
                // Expired keys are gone in Redis too.
                breakers.remove(id);
                Machine::default()
            }
        };
        let step = f(&mut machine, now);
        if step.wrote {
            let expires_at_us = now.saturating_add(micros(TTL));
            breakers.insert(id.to_string(), Kept { machine, expires_at_us });
        }
        for transition in step.transitions {
            // No receiver is not an error: nobody follows this store's events.
            let _ = self.inner.events.send(transition.event(id));
        }
        step.reply
    }
}

/// The machine of `id` unless it was never written or has expired.
fn live<'a>(breakers: &'a HashMap<String, Kept>, id: &str, now: i64) -> Option<&'a Machine> {
    breakers.get(id).filter(|kept| now < kept.expires_at_us).map(|kept| &kept.machine)
}

impl<C: Clock> BreakerStore for MemoryBreakers<C> {
    async fn report(&self, id: &str, params: &Params, outcomes: Outcomes) -> Result<BreakerState, Error> {
        Ok(self.step(id, |m, now| m.report(now, params, outcomes)))
    }

    async fn probe(&self, id: &str, params: &Params) -> Result<(bool, BreakerState), Error> {
        Ok(self.step(id, |m, now| m.probe(now, params)))
    }

    async fn state(&self, id: &str) -> Result<Option<BreakerState>, Error> {
        let breakers = self.breakers();
        Ok(live(&breakers, id, self.now_us()).map(Machine::state))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000_000;
    const OPEN_US: i64 = 5_000_000;

    fn params(window: Window) -> Params {
        Params {
            failure_rate: 50,
            slow_call_us: Some(2_000_000),
            slow_rate: 80,
            window,
            minimum_calls: 4,
            open_us: OPEN_US,
            half_open_calls: 2,
        }
    }

    fn count(size: u32) -> Params {
        params(Window::Count { size })
    }

    fn calls(calls: u32, failures: u32, slow: u32) -> Outcomes {
        Outcomes { calls, failures, slow, bad: failures.max(slow) }
    }

    fn entry(slot: i64, calls: u64, failures: u64, slow: u64) -> Entry {
        Entry { slot, calls, failures, slow }
    }

    fn totals(m: &Machine) -> (u64, u64, u64) {
        let s = m.state();
        (s.calls, s.failures, s.slow)
    }

    /// A machine opened at T0 by failures (generation 1).
    fn opened(p: &Params) -> Machine {
        let mut m = Machine::new();
        let step = m.report(T0, p, calls(4, 4, 0));
        assert_eq!(step.reply.state, State::Open);
        m
    }

    /// A machine half-open since T0 + OPEN_US (generation 2), no probe granted yet.
    fn half_open(p: &Params) -> Machine {
        let mut m = opened(p);
        let step = m.report(T0 + OPEN_US, p, Outcomes::default());
        assert_eq!(step.reply.state, State::HalfOpen);
        m
    }

    #[test]
    fn closed_opens_when_the_failure_rate_reaches_the_threshold() {
        let p = count(10);
        let mut m = Machine::new();
        let step = m.report(T0, &p, calls(3, 1, 0));
        assert_eq!(step.reply.state, State::Closed);
        assert!(step.wrote && step.transitions.is_empty());
        // 2 failures of 4 calls: 50 % >= 50 %.
        let step = m.report(T0 + 1, &p, calls(1, 1, 0));
        assert_eq!(
            step.reply,
            BreakerState {
                state: State::Open,
                since_us: T0 + 1,
                generation: 1,
                calls: 4,
                failures: 2,
                ..BreakerState::default()
            },
            "the totals of the window that opened it"
        );
        assert_eq!(step.transitions, [Transition { state: State::Open, since_us: T0 + 1, generation: 1 }]);
        assert!(m.window().is_empty(), "the window's entries are dropped on opening");
    }

    #[test]
    fn below_the_failure_rate_stays_closed() {
        let p = count(10);
        let mut m = Machine::new();
        let step = m.report(T0, &p, calls(10, 4, 0));
        assert_eq!((step.reply.state, step.reply.calls, step.reply.failures), (State::Closed, 10, 4));
    }

    #[test]
    fn minimum_calls_before_judging() {
        let p = count(10);
        let mut m = Machine::new();
        for i in 0..3 {
            assert_eq!(m.report(T0 + i, &p, calls(1, 1, 0)).reply.state, State::Closed, "call {i}");
        }
        assert_eq!(totals(&m), (3, 3, 0));
        assert_eq!(m.report(T0 + 3, &p, calls(1, 1, 0)).reply.state, State::Open);
    }

    #[test]
    fn slow_calls_open_only_with_a_slow_call_rule() {
        let p = count(10);
        let mut m = Machine::new();
        // 3 slow of 4: 75 % < 80 %.
        assert_eq!(m.report(T0, &p, calls(4, 0, 3)).reply.state, State::Closed);
        // 4 slow of 5: 80 %.
        assert_eq!(m.report(T0, &p, calls(1, 0, 1)).reply.state, State::Open);
        assert_eq!(totals(&m), (5, 0, 4));

        let no_rule = Params { slow_call_us: None, ..p };
        let mut m = Machine::new();
        let step = m.report(T0, &no_rule, calls(10, 0, 10));
        assert_eq!((step.reply.state, step.reply.slow), (State::Closed, 10), "counted, never judged");
    }

    #[test]
    fn open_refuses_and_ignores_outcomes_until_its_time_has_passed() {
        let p = count(10);
        let mut m = opened(&p);
        let before = m.clone();
        let step = m.probe(T0 + OPEN_US - 1, &p);
        assert_eq!((step.reply.0, step.wrote), (false, false));
        let step = m.report(T0 + OPEN_US - 1, &p, calls(5, 5, 5));
        assert!(!step.wrote);
        assert_eq!(m, before, "an OPEN breaker's outcomes change nothing");
        assert_eq!(totals(&m), (4, 4, 0), "not even its totals");
    }

    #[test]
    fn open_becomes_half_open_on_the_first_call_after_open_us() {
        let p = count(10);
        let mut m = opened(&p);
        let step = m.probe(T0 + OPEN_US + 7, &p);
        assert!(step.reply.0, "the first probe is admitted");
        assert_eq!(
            step.reply.1,
            BreakerState {
                state: State::HalfOpen,
                since_us: T0 + OPEN_US + 7,
                generation: 2,
                calls: 4,
                failures: 4,
                probes_granted: 1,
                ..BreakerState::default()
            }
        );
        assert_eq!(
            step.transitions,
            [Transition { state: State::HalfOpen, since_us: T0 + OPEN_US + 7, generation: 2 }]
        );
    }

    #[test]
    fn half_open_probes_are_exhausted_at_half_open_calls() {
        let p = count(10);
        let mut m = half_open(&p);
        let t = T0 + OPEN_US + 1;
        assert!(m.probe(t, &p).reply.0);
        assert!(m.probe(t, &p).reply.0);
        let step = m.probe(t, &p);
        assert_eq!((step.reply.0, step.reply.1.probes_granted, step.wrote), (false, 2, false));
    }

    #[test]
    fn half_open_closes_after_enough_good_calls() {
        let p = count(10);
        let mut m = half_open(&p);
        let t = T0 + OPEN_US + 1;
        let step = m.report(t, &p, calls(1, 0, 0));
        assert_eq!((step.reply.state, step.reply.probes_ok), (State::HalfOpen, 1));
        assert_eq!(totals(&m), (4, 4, 0), "probes count apart from the totals");
        let step = m.report(t + 1, &p, calls(1, 0, 0));
        assert_eq!(
            step.reply,
            BreakerState { state: State::Closed, since_us: t + 1, generation: 3, ..BreakerState::default() }
        );
        // Closed again, with an empty window: one failure does not reopen it.
        assert_eq!(m.report(t + 2, &p, calls(1, 1, 0)).reply.state, State::Closed);
        assert_eq!(totals(&m), (1, 1, 0), "a fresh window");
    }

    #[test]
    fn half_open_reopens_on_a_failure_or_with_the_rule_a_slow_call() {
        let p = count(10);
        let mut m = half_open(&p);
        let t = T0 + OPEN_US + 1;
        m.report(t, &p, calls(1, 0, 0));
        let step = m.report(t + 1, &p, calls(3, 1, 0));
        assert_eq!(
            step.reply,
            BreakerState {
                state: State::Open,
                since_us: t + 1,
                generation: 3,
                calls: 4,
                failures: 4,
                ..BreakerState::default()
            },
            "reopened with the totals of the window that opened it, the probes not added"
        );
        assert!(m.window().is_empty());

        let mut m = half_open(&p);
        assert_eq!(m.report(t, &p, calls(1, 0, 1)).reply.state, State::Open);

        let no_rule = Params { slow_call_us: None, ..p };
        let mut m = half_open(&no_rule);
        let step = m.report(t, &no_rule, calls(2, 0, 2));
        assert_eq!(step.reply.state, State::Closed, "slow calls are good calls without the rule");
    }

    #[test]
    fn half_open_without_outcomes_is_re_armed_after_open_us() {
        let p = count(10);
        let mut m = half_open(&p);
        let since = T0 + OPEN_US;
        m.probe(since + 1, &p);
        m.probe(since + 2, &p);
        m.report(since + 3, &p, calls(1, 0, 0));
        assert!(!m.probe(since + OPEN_US - 1, &p).reply.0, "still exhausted");
        let step = m.probe(since + OPEN_US, &p);
        assert!(step.reply.0, "re-armed: probes granted afresh");
        assert_eq!(
            step.reply.1,
            BreakerState {
                state: State::HalfOpen,
                since_us: since + OPEN_US,
                generation: 3,
                calls: 4,
                failures: 4,
                probes_granted: 1,
                ..BreakerState::default()
            }
        );
        assert_eq!(step.transitions.len(), 1);
    }

    #[test]
    fn one_step_may_make_two_transitions() {
        let p = count(10);
        let mut m = opened(&p);
        let t = T0 + OPEN_US;
        let step = m.report(t, &p, calls(1, 1, 0));
        assert_eq!(
            step.transitions,
            [
                Transition { state: State::HalfOpen, since_us: t, generation: 2 },
                Transition { state: State::Open, since_us: t, generation: 3 },
            ]
        );
    }

    #[test]
    fn count_window_drops_whole_entries_then_trims_the_front_one() {
        let p = Params { minimum_calls: 100, ..count(10) };
        let mut m = Machine::new();
        m.report(T0, &p, calls(4, 3, 1));
        m.report(T0, &p, calls(4, 0, 2));
        assert_eq!(totals(&m), (8, 3, 3));
        // 8 + 5 = 13 > 10: the front entry (4 calls) would leave 9 < 10, so it stays and
        // loses 3 calls, floor(3*3/4) = 2 failures and floor(1*3/4) = 0 slow.
        m.report(T0, &p, calls(5, 1, 0));
        assert_eq!(m.window(), &[entry(0, 1, 1, 1), entry(0, 4, 0, 2), entry(0, 5, 1, 0)]);
        assert_eq!(totals(&m), (10, 2, 3));
        // 10 + 6 = 16: the front two entries (5 calls) leave whole, and the next loses 1 call.
        m.report(T0, &p, calls(6, 0, 0));
        assert_eq!(m.window(), &[entry(0, 4, 1, 0), entry(0, 6, 0, 0)]);
        assert_eq!(totals(&m), (10, 1, 0));
        // One report above the size keeps its share of it.
        m.report(T0, &p, calls(25, 5, 10));
        assert_eq!(m.window(), &[entry(0, 10, 2, 4)]);
        assert_eq!(totals(&m), (10, 2, 4));
    }

    #[test]
    fn count_window_judges_only_what_it_holds() {
        let p = count(4);
        let mut m = Machine::new();
        m.report(T0, &p, calls(2, 2, 0));
        m.report(T0, &p, calls(1, 0, 0));
        // 2 failures were pushed out by 4 good calls: 0 of 4.
        let step = m.report(T0, &p, calls(4, 0, 0));
        assert_eq!((step.reply.state, step.reply.calls, step.reply.failures), (State::Closed, 4, 0));
    }

    #[test]
    fn time_window_slots_expire() {
        let slot = 50_000;
        let p = Params { minimum_calls: 100, ..params(Window::Time { slot_us: slot }) };
        let start = (T0 / slot + 1) * slot;
        let mut m = Machine::new();
        m.report(start, &p, calls(3, 3, 0));
        m.report(start + slot - 1, &p, calls(1, 0, 1));
        m.report(start + slot, &p, calls(2, 1, 0));
        let first = start / slot;
        assert_eq!(m.window(), &[entry(first, 4, 3, 1), entry(first + 1, 2, 1, 0)]);
        // The first slot is still in the window 19 slots later...
        m.report(start + 19 * slot + slot - 1, &p, calls(1, 0, 0));
        assert_eq!(totals(&m), (7, 4, 1));
        // ...and leaves it 20 slots later, before the new calls are added.
        m.report(start + 20 * slot, &p, calls(1, 0, 0));
        assert_eq!(
            m.window(),
            &[entry(first + 1, 2, 1, 0), entry(first + 19, 1, 0, 0), entry(first + 20, 1, 0, 0)]
        );
        assert_eq!(totals(&m), (4, 1, 0));
        // Long idle: every slot leaves.
        m.report(start + 100 * slot, &p, calls(1, 1, 0));
        assert_eq!(m.window(), &[entry(first + 100, 1, 1, 0)]);
        assert_eq!(totals(&m), (1, 1, 0));
    }

    #[test]
    fn time_window_drops_slots_of_another_slot_size() {
        let p = Params { minimum_calls: 100, ..params(Window::Time { slot_us: 1_000 }) };
        let mut m = Machine::new();
        m.report(T0, &p, calls(5, 5, 0));
        // The window grows to slots of 1 s: the old indices are ahead of now, and leave.
        let wider = Params { window: Window::Time { slot_us: 1_000_000 }, ..p };
        m.report(T0, &wider, calls(1, 0, 0));
        assert_eq!(m.window(), &[entry(T0 / 1_000_000, 1, 0, 0)]);
        assert_eq!(totals(&m), (1, 0, 0));
    }

    #[test]
    fn time_window_opens_on_its_rates() {
        let p = params(Window::Time { slot_us: 50_000 });
        let mut m = Machine::new();
        m.report(T0, &p, calls(2, 1, 0));
        assert_eq!(m.report(T0 + 60_000, &p, calls(2, 1, 0)).reply.state, State::Open);
        assert!(m.window().is_empty());
        assert_eq!(totals(&m), (4, 2, 0), "the totals of the window that opened it");
    }

    #[test]
    fn an_empty_window_drops_the_totals_only_while_closed() {
        // OPEN and HALF_OPEN keep their totals beside an empty window, through every step.
        for p in [count(10), params(Window::Time { slot_us: 50_000 })] {
            let mut m = opened(&p);
            assert!(m.window().is_empty());
            m.report(T0 + 1, &p, calls(3, 0, 0));
            m.probe(T0 + OPEN_US, &p);
            m.report(T0 + OPEN_US, &p, calls(1, 0, 0));
            m.report(T0 + OPEN_US + 1, &p, calls(1, 1, 0));
            assert_eq!(m.state().state, State::Open, "{p:?}");
            assert_eq!(totals(&m), (4, 4, 0), "{p:?}");
            let t = T0 + 2 * OPEN_US + 1;
            m.probe(t, &p);
            m.report(t + OPEN_US, &p, Outcomes::default());
            assert_eq!((m.state().state, totals(&m)), (State::HalfOpen, (4, 4, 0)), "re-armed: {p:?}");
        }
        // CLOSED: a window evicted without the hash holds no calls, whatever the totals said.
        let p = Params { minimum_calls: 100, ..count(10) };
        let mut m = Machine::new();
        m.report(T0, &p, calls(5, 2, 1));
        m.window.clear();
        m.report(T0, &p, calls(1, 0, 0));
        assert_eq!(totals(&m), (1, 0, 0));
    }

    #[test]
    fn reports_of_no_calls_change_nothing() {
        let p = count(10);
        let mut m = Machine::new();
        let step = m.report(T0, &p, Outcomes::default());
        assert!(!step.wrote);
        assert_eq!(m, Machine::new());
        // Claimed failures above the calls count as all calls failed.
        let step = m.report(T0, &p, Outcomes { calls: 4, failures: 9, slow: 0, bad: 9 });
        assert_eq!(step.reply.state, State::Open);
    }

    #[test]
    fn closed_probes_are_admitted_without_a_write() {
        let p = count(10);
        let mut m = Machine::new();
        let step = m.probe(T0, &p);
        assert_eq!((step.reply.0, step.wrote), (true, false));
    }

    #[test]
    fn entries_round_trip() {
        let e = entry(-3, 4, 2, 1);
        assert_eq!(Entry::parse(&e.format()), Some(e));
        for bad in ["", "1:2:3", "1:2:3:4:5", "1:-2:3:4", "a:2:3:4"] {
            assert_eq!(Entry::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_share_of_an_excess_rounds_down() {
        assert_eq!(share(3, 3, 4), 2);
        assert_eq!(share(1, 3, 4), 0);
        assert_eq!(share(5, 1, 0), 0);
        assert_eq!(share(u64::MAX, u64::MAX, u64::MAX), u64::MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn memory_breakers_publish_transitions_and_forget_idle_breakers() {
        let store = MemoryBreakers::default();
        let mut events = store.subscribe();
        let p = count(10);
        assert_eq!(store.state("shop/payments:8080").await.unwrap(), None);
        assert!(store.probe("shop/payments:8080", &p).await.unwrap().0);
        assert_eq!(store.state("shop/payments:8080").await.unwrap(), None, "a CLOSED probe writes nothing");

        let opened = store.report("shop/payments:8080", &p, calls(4, 4, 0)).await.unwrap();
        assert_eq!(events.try_recv().unwrap(), opened.event("shop/payments:8080"));
        assert_eq!(store.state("shop/payments:8080").await.unwrap(), Some(opened));

        tokio::time::advance(Duration::from_micros(OPEN_US as u64)).await;
        let (admitted, half_open) = store.probe("shop/payments:8080", &p).await.unwrap();
        assert!(admitted);
        assert_eq!(
            events.try_recv().unwrap(),
            Event {
                id: "shop/payments:8080".into(),
                state: State::HalfOpen,
                since_us: half_open.since_us,
                generation: 2,
            }
        );

        tokio::time::advance(TTL).await;
        assert_eq!(store.state("shop/payments:8080").await.unwrap(), None, "expired with its keys");
        assert_eq!(store.report("shop/payments:8080", &p, calls(1, 0, 0)).await.unwrap().generation, 0);
    }

    #[test]
    fn memory_breakers_run_on_any_clock() {
        let store = MemoryBreakers::new(|| T0);
        assert_eq!(store.now_us(), T0);
        assert!(format!("{store:?}").contains("MemoryBreakers"));
    }
}
