//! Quota batches in this agent's memory (docs/agent.md, "Quota batches"): per counter, the
//! batch of hits Redis granted and this agent has not admitted yet (and the next one, once
//! reserved ahead), the counter's local rate, and the one reservation in flight for it.
//!
//! [`Batches::plan`] decides, under the counter's shard lock and without waiting, what one
//! single-hit request does: take a hit from the batch in hand ([`Plan::Served`], with a
//! [`Ticket`] to reserve the next batch in the background once this one is half used), take
//! the per-request script ([`Plan::Single`]: batches off for this counter, a cold or slow
//! counter, or one near its limit), reserve the next batch itself ([`Plan::Reserve`], the
//! ticket releasing the flight however the reservation ends), or wait for the reservation
//! in flight ([`Plan::Wait`]). No lock is held across an `await`: the limiter awaits Redis,
//! or the flight, with the lock released.
//!
//! A batch's hits are admitted only strictly before `sent + life`, where `sent` was read
//! before the reservation was sent, so never after the instant the algorithm's proof allows.
//! Hits left when a batch ends go to [`Batches::take_leftovers`], which the limiter gives
//! back (where the script finds it safe) or counts as stranded.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::algorithm::{FAIR_SHARE, Limit, Reservation, Verdict};
use crate::config::CompiledRule;

const SHARDS: usize = 16;

/// What `--quota-batch` and `--quota-horizon` set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchSettings {
    /// The most hits one batch may reserve; 1 turns batches off (every decision is one
    /// per-request script call).
    pub max_hits: u32,
    /// The window a counter's local rate is measured over, and the longest a batch lives.
    pub horizon: Duration,
    /// Counters remembered at most; past it a counter takes the per-request path.
    pub capacity: usize,
}

impl BatchSettings {
    /// `--quota-batch 1`: the per-request path for everything.
    pub fn off() -> Self {
        BatchSettings { max_hits: 1, ..BatchSettings::default() }
    }

    pub fn enabled(&self) -> bool {
        self.max_hits > 1 && self.capacity > 0
    }
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings { max_hits: 256, horizon: Duration::from_secs(1), capacity: 65_536 }
    }
}

/// Hits of a batch that ended unused, to give back (or count as stranded).
#[derive(Debug)]
pub struct Leftover {
    pub key: Box<str>,
    pub limit: Limit,
    pub mark: i64,
    pub hits: u32,
    /// False when giving back cannot help: a fixed-window batch that lived to its window's end.
    pub returnable: bool,
    pub rule: Arc<CompiledRule>,
}

/// What one single-hit request does next.
#[derive(Debug)]
pub enum Plan {
    /// Admitted from the batch in hand; with a ticket, this request also starts reserving
    /// the next batch, which the limiter does in the background.
    Served(Verdict, Option<Ticket>),
    /// The per-request script.
    Single,
    /// Reserve the next batch; the ticket releases the flight when dropped unfinished.
    Reserve(Ticket),
    /// Another request is reserving for this counter: wait for it, then plan again.
    Wait(Wait),
}

/// The right, and the duty, to finish one reservation: [`Ticket::complete`] installs the
/// batch; dropped without it (the reservation failed or the deadline passed), the flight is
/// marked failed and its waiters are woken to answer by the failure mode.
#[derive(Debug)]
pub struct Ticket {
    batches: Arc<Batches>,
    key: Box<str>,
    flight: u64,
    /// Hits wanted for a whole horizon.
    pub want: u32,
    /// The numbers the batch is reserved under.
    pub limit: Limit,
    /// Reserved ahead, while the batch in hand still serves: no request takes its first hit.
    ahead: bool,
    done: bool,
}

/// A reservation in flight that this request waits for.
#[derive(Debug)]
pub struct Wait {
    notify: Arc<Notify>,
    flight: u64,
}

/// Hits Redis granted to this agent, admitted strictly before `until`.
#[derive(Debug, Clone, Copy)]
struct Batch {
    left: u32,
    /// What Redis granted: the batch is half used at `left <= granted / 2`.
    granted: u32,
    until: Instant,
    mark: i64,
    returnable: bool,
    /// What Redis reported as left, and when the counter is full again, at the reservation.
    remaining: u64,
    reset_at: Instant,
}

impl Batch {
    fn empty(now: Instant) -> Self {
        Batch { left: 0, granted: 0, until: now, mark: 0, returnable: false, remaining: 0, reset_at: now }
    }

    fn new(sent: Instant, reservation: &Reservation, left: u32, limit: &Limit) -> Self {
        Batch {
            left,
            granted: reservation.granted,
            until: sent + reservation.life,
            mark: reservation.mark,
            // A fixed-window batch that lives to its window's end has nothing to give back
            // to; the others always may.
            returnable: !matches!(limit, Limit::FixedWindow { .. })
                || reservation.life < reservation.verdict.reset,
            remaining: reservation.verdict.remaining,
            reset_at: sent + reservation.verdict.reset,
        }
    }

    fn live(&self, now: Instant) -> bool {
        self.left > 0 && now < self.until
    }
}

#[derive(Debug)]
struct Entry {
    rule: Arc<CompiledRule>,
    limit: Limit,
    /// The batch in hand, and the one reserved ahead.
    cur: Batch,
    next: Option<Batch>,
    /// Redis's last word on what the counter has left (any reply); `u64::MAX` until known.
    known_remaining: u64,
    /// Hits seen in the current horizon window, and in the last one (scaled to a horizon).
    window_start: Instant,
    window_hits: u32,
    last_hits: u32,
    /// The reservation in flight, numbered; the last one that failed; requests waiting.
    in_flight: bool,
    flight: u64,
    failed: u64,
    waiting: u32,
    notify: Option<Arc<Notify>>,
    last_used: Instant,
}

impl Entry {
    fn new(rule: &Arc<CompiledRule>, now: Instant) -> Self {
        Entry {
            rule: rule.clone(),
            limit: rule.limit,
            cur: Batch::empty(now),
            next: None,
            known_remaining: u64::MAX,
            window_start: now,
            window_hits: 0,
            last_hits: 0,
            in_flight: false,
            flight: 0,
            failed: 0,
            waiting: 0,
            notify: None,
            last_used: now,
        }
    }

    fn note_hit(&mut self, now: Instant, horizon: Duration) {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= horizon {
            // The window that just ended, spread over its real length (longer after a lull).
            let scaled = u128::from(self.window_hits) * horizon.as_nanos() / elapsed.as_nanos().max(1);
            self.last_hits = u32::try_from(scaled).unwrap_or(u32::MAX);
            self.window_start = now;
            self.window_hits = 0;
        }
        self.window_hits = self.window_hits.saturating_add(1);
    }

    fn leftover(&self, key: &str, batch: &mut Batch) -> Option<Leftover> {
        if batch.left == 0 {
            return None;
        }
        Some(Leftover {
            key: key.into(),
            limit: self.limit,
            mark: batch.mark,
            hits: std::mem::take(&mut batch.left),
            returnable: batch.returnable,
            rule: self.rule.clone(),
        })
    }

    /// Ends the batches whose life is over (their hits to `out`) and moves the next batch
    /// up when the one in hand is used or over.
    fn settle(&mut self, key: &str, now: Instant, out: &mut Vec<Leftover>) {
        loop {
            if self.cur.left > 0 && now >= self.cur.until {
                let mut cur = self.cur;
                out.extend(self.leftover(key, &mut cur));
                self.cur = cur;
            }
            if self.cur.left > 0 {
                return;
            }
            match self.next.take() {
                Some(next) => self.cur = next,
                None => return,
            }
        }
    }

    /// Every batch in hand, live or not (shutdown, a changed rule).
    fn drain(&mut self, key: &str) -> Vec<Leftover> {
        let mut cur = self.cur;
        let mut out: Vec<Leftover> = self.leftover(key, &mut cur).into_iter().collect();
        self.cur = cur;
        if let Some(mut next) = self.next.take() {
            out.extend(self.leftover(key, &mut next));
        }
        out
    }

    fn held(&self) -> u32 {
        self.cur.left + self.next.map_or(0, |n| n.left)
    }

    /// Hits to ask for a whole horizon (`None`: the per-request script is the better way),
    /// given `held` hits already in hand.
    fn want(&self, settings: &BatchSettings, held: u32, now: Instant) -> Option<u32> {
        // The current window's rate, once it spans an eighth of a horizon, extrapolated to a
        // whole one: a counter that turns hot is sized by what it does now, not only by the
        // last complete window.
        let elapsed = now.saturating_duration_since(self.window_start);
        let current = if elapsed >= settings.horizon / 8 {
            let scaled =
                u128::from(self.window_hits) * settings.horizon.as_nanos() / elapsed.as_nanos().max(1);
            u32::try_from(scaled).unwrap_or(u32::MAX)
        } else {
            self.window_hits
        };
        let expected = self.last_hits.max(current).max(self.waiting.saturating_add(1));
        // Together with what is in hand, never more than --quota-batch, nor more than a
        // sixteenth of what Redis last said was left plus what this agent holds (which is at
        // most the quota): however it reserves ahead, an agent holds at most ⌊N/16⌋ hits.
        let share = (self.known_remaining.saturating_add(u64::from(held)) / FAIR_SHARE.unsigned_abs())
            .saturating_sub(u64::from(held));
        let want = expected.min(settings.max_hits).saturating_sub(held);
        let want = if held > 0 { want.min(u32::try_from(share).unwrap_or(u32::MAX)) } else { want };
        // A cold counter costs one call; so does one whose batch would hold a single hit
        // once scaled to the life its algorithm allows (want · L / H < 2); near its limit a
        // counter goes one hit per call, concurrently, as without batches.
        let horizon_us = i64::try_from(settings.horizon.as_micros()).unwrap_or(i64::MAX);
        let life_us = longest_life(&self.limit, horizon_us);
        let worth = i128::from(want) * i128::from(life_us) > i128::from(horizon_us)
            && self.known_remaining >= 2 * FAIR_SHARE.unsigned_abs();
        worth.then_some(want)
    }
}

/// The longest life a batch of `limit` can get (µs), as the batch scripts bound it: an eighth
/// of a token bucket, a sub-window, a window; at most the horizon.
fn longest_life(limit: &Limit, horizon_us: i64) -> i64 {
    let bound = match *limit {
        Limit::TokenBucket { emission_us, capacity } => (capacity - 1).saturating_mul(emission_us) / 8,
        Limit::SlidingWindow { bucket_us, .. } => bucket_us,
        Limit::FixedWindow { window_us, .. } => window_us,
    };
    bound.clamp(0, horizon_us)
}

/// The batches of every counter this agent has seen traffic on.
#[derive(Debug)]
pub struct Batches {
    settings: BatchSettings,
    shards: Vec<Mutex<HashMap<Box<str>, Entry>>>,
    hasher: std::collections::hash_map::RandomState,
    shard_capacity: usize,
    /// Hits of batches that ended, waiting to be given back.
    leftovers: Mutex<Vec<Leftover>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The maps stay consistent if a holder panicked: every update is a few plain stores.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Batches {
    pub fn new(settings: BatchSettings) -> Self {
        Batches {
            settings,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
            shard_capacity: settings.capacity.div_ceil(SHARDS),
            leftovers: Mutex::new(Vec::new()),
        }
    }

    pub fn settings(&self) -> &BatchSettings {
        &self.settings
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<Box<str>, Entry>> {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// What a single-hit request on `key` does next. `counted`: this request was counted in
    /// the local rate already (it is planning again after waiting).
    pub fn plan(self: &Arc<Self>, key: &str, rule: &Arc<CompiledRule>, now: Instant, counted: bool) -> Plan {
        let horizon = self.settings.horizon;
        let mut shard = lock(self.shard(key));
        if !shard.contains_key(key) {
            if shard.len() >= self.shard_capacity {
                let found = self.sweep_shard(&mut shard, now);
                lock(&self.leftovers).extend(found);
                if shard.len() >= self.shard_capacity {
                    return Plan::Single;
                }
            }
            shard.insert(key.into(), Entry::new(rule, now));
        }
        let Some(entry) = shard.get_mut(key) else { return Plan::Single };
        if !Arc::ptr_eq(&entry.rule, rule) {
            if entry.limit != rule.limit {
                // Reserved under numbers that no longer hold: neither admitted nor given
                // back (the give-back needs the old numbers).
                let dropped: u32 = entry.drain(key).iter().map(|l| l.hits).sum();
                entry.rule.counters.batch_stranded.inc_by(u64::from(dropped));
                entry.known_remaining = u64::MAX;
                entry.limit = rule.limit;
            }
            entry.rule = rule.clone();
        }
        entry.last_used = now;
        if !counted {
            entry.note_hit(now, horizon);
        }
        let mut ended = Vec::new();
        entry.settle(key, now, &mut ended);
        if !ended.is_empty() {
            lock(&self.leftovers).extend(ended);
        }
        if entry.cur.live(now) {
            entry.cur.left -= 1;
            entry.rule.counters.batch_served.inc();
            let verdict = Verdict {
                admitted: true,
                remaining: entry.cur.remaining.saturating_add(u64::from(entry.held())),
                reset: entry.cur.reset_at.saturating_duration_since(now),
                retry_after: Duration::ZERO,
            };
            // Half used, nothing reserved ahead yet: this request starts the next batch, so
            // that the counter's requests need not wait for Redis when this one runs out.
            let ahead = if !entry.in_flight && entry.next.is_none() && entry.cur.left <= entry.cur.granted / 2
            {
                entry
                    .want(&self.settings, entry.cur.left, now)
                    .map(|want| self.ticket(entry, key, want, true))
            } else {
                None
            };
            return Plan::Served(verdict, ahead);
        }
        if entry.in_flight {
            entry.waiting = entry.waiting.saturating_add(1);
            let notify = entry.notify.get_or_insert_with(|| Arc::new(Notify::new())).clone();
            return Plan::Wait(Wait { notify, flight: entry.flight });
        }
        match entry.want(&self.settings, 0, now) {
            Some(want) => Plan::Reserve(self.ticket(entry, key, want, false)),
            None => Plan::Single,
        }
    }

    fn ticket(self: &Arc<Self>, entry: &mut Entry, key: &str, want: u32, ahead: bool) -> Ticket {
        entry.in_flight = true;
        entry.flight += 1;
        entry.waiting = 0;
        Ticket {
            batches: self.clone(),
            key: key.into(),
            flight: entry.flight,
            want,
            limit: entry.limit,
            ahead,
            done: false,
        }
    }

    /// What a per-request reply said the counter has left (sizes the next batch).
    pub fn observe(&self, key: &str, remaining: u64) {
        if let Some(entry) = lock(self.shard(key)).get_mut(key) {
            entry.known_remaining = remaining;
        }
    }

    /// Ends batches whose life is over and forgets counters idle for two horizons; returns
    /// every batch's leftovers to give back, those found on the way included.
    pub fn take_leftovers(&self, now: Instant) -> Vec<Leftover> {
        let mut out = std::mem::take(&mut *lock(&self.leftovers));
        for shard in &self.shards {
            let mut shard = lock(shard);
            out.extend(self.sweep_shard(&mut shard, now));
        }
        out
    }

    /// Ends every batch, live or not (shutdown): its hits are given back.
    pub fn take_all(&self) -> Vec<Leftover> {
        let mut out = std::mem::take(&mut *lock(&self.leftovers));
        for shard in &self.shards {
            let mut shard = lock(shard);
            for (key, entry) in shard.iter_mut() {
                out.extend(entry.drain(key));
            }
        }
        out
    }

    fn sweep_shard(&self, shard: &mut HashMap<Box<str>, Entry>, now: Instant) -> Vec<Leftover> {
        let horizon = self.settings.horizon;
        let mut out = Vec::new();
        shard.retain(|key, entry| {
            entry.settle(key, now, &mut out);
            if let Some(mut next) = entry.next.filter(|next| now >= next.until) {
                out.extend(entry.leftover(key, &mut next));
                entry.next = None;
            }
            let idle = !entry.in_flight
                && entry.held() == 0
                && now.saturating_duration_since(entry.last_used) >= 2 * horizon;
            !idle
        });
        out
    }

    /// How many requests wait for the reservation in flight on `key` (0 without one).
    pub fn waiting(&self, key: &str) -> u32 {
        lock(self.shard(key)).get(key).filter(|e| e.in_flight).map_or(0, |e| e.waiting)
    }

    /// How many counters are remembered.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ticket {
    /// The counter this ticket reserves for.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Installs what Redis granted and wakes the requests waiting for it; returns the
    /// verdict of the request that asked (its hit is the batch's first), or, reserved ahead,
    /// the batch's own.
    pub fn complete(mut self, sent: Instant, reservation: &Reservation) -> Verdict {
        self.done = true;
        let mut shard = lock(self.batches.shard(&self.key));
        let granted = reservation.granted;
        let asked = u32::from(!self.ahead);
        let verdict = if granted > 0 {
            Verdict {
                remaining: reservation.verdict.remaining.saturating_add(u64::from(granted - asked)),
                ..reservation.verdict
            }
        } else {
            reservation.verdict
        };
        let notify = match shard.get_mut(&*self.key) {
            Some(entry) if entry.flight == self.flight => {
                entry.in_flight = false;
                let c = &entry.rule.counters;
                c.batches.inc();
                c.batch_reserved.inc_by(u64::from(granted));
                entry.known_remaining = reservation.verdict.remaining;
                if granted > 0 {
                    c.batch_served.inc_by(u64::from(asked));
                    if entry.limit == self.limit {
                        let batch = Batch::new(sent, reservation, granted - asked, &self.limit);
                        if entry.cur.live(Instant::now()) {
                            entry.next = Some(batch);
                        } else {
                            let mut ended = Vec::new();
                            entry.settle(&self.key, Instant::now(), &mut ended);
                            if !ended.is_empty() {
                                lock(&self.batches.leftovers).extend(ended);
                            }
                            if entry.cur.left == 0 {
                                entry.cur = batch;
                            } else {
                                entry.next = Some(batch);
                            }
                        }
                    } else {
                        // The rule's numbers changed while the batch was reserved.
                        c.batch_stranded.inc_by(u64::from(granted - asked));
                    }
                }
                entry.notify.clone()
            }
            // Never swept while in flight; if it is gone anyway, the hits are lost.
            _ => None,
        };
        drop(shard);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
        verdict
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut shard = lock(self.batches.shard(&self.key));
        let notify = match shard.get_mut(&*self.key) {
            Some(entry) if entry.flight == self.flight => {
                entry.in_flight = false;
                entry.failed = self.flight;
                entry.notify.clone()
            }
            _ => None,
        };
        drop(shard);
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}

impl Wait {
    /// Waits until the flight this request found ends; true when it failed (the request is
    /// then answered by the failure mode, as the one that reserved is).
    pub async fn wait(self, batches: &Batches, key: &str) -> bool {
        let notified = self.notify.notified();
        // Created before looking: a flight that ends after the look wakes it.
        let over = |shard: &HashMap<Box<str>, Entry>| match shard.get(key) {
            Some(entry) => !entry.in_flight || entry.flight != self.flight,
            None => true,
        };
        let running = !over(&lock(batches.shard(key)));
        if running {
            notified.await;
        }
        lock(batches.shard(key)).get(key).is_some_and(|entry| entry.failed == self.flight)
    }
}
