//! Quota batches in this agent's memory (docs/agent.md, "Quota batches"): per counter, the
//! batch of hits Redis granted and this agent has not admitted yet, the counter's local
//! rate, and the one reservation in flight for it.
//!
//! [`Batches::plan`] decides, under the counter's shard lock and without waiting, what one
//! single-hit request does: take a hit from the batch in hand ([`Plan::Served`]), take the
//! per-request script ([`Plan::Single`]: batches off for this counter, a cold counter, or
//! one near its limit), reserve the next batch itself ([`Plan::Reserve`], holding a
//! [`Ticket`] that releases the flight however the reservation ends), or wait for the
//! reservation another request is making ([`Plan::Wait`]). No lock is held across an
//! `await`: the limiter awaits Redis, or the flight, with the lock released.
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
pub enum Plan<'a> {
    /// Admitted from the batch in hand.
    Served(Verdict),
    /// The per-request script.
    Single,
    /// Reserve the next batch; the ticket releases the flight when dropped unfinished.
    Reserve(Ticket<'a>),
    /// Another request is reserving for this counter: wait for it, then plan again.
    Wait(Wait),
}

/// The right, and the duty, to finish one reservation: [`Ticket::complete`] installs the
/// batch; dropped without it (the reservation failed or the deadline passed), the flight is
/// marked failed and its waiters are woken to answer by the failure mode.
#[derive(Debug)]
pub struct Ticket<'a> {
    batches: &'a Batches,
    key: &'a str,
    flight: u64,
    /// Hits wanted for a whole horizon.
    pub want: u32,
    /// The numbers the batch is reserved under.
    pub limit: Limit,
    done: bool,
}

/// A reservation in flight that this request waits for.
#[derive(Debug)]
pub struct Wait {
    notify: Arc<Notify>,
    flight: u64,
}

#[derive(Debug)]
struct Entry {
    rule: Arc<CompiledRule>,
    limit: Limit,
    /// The batch in hand: hits left, admitted only strictly before `until`.
    left: u32,
    until: Instant,
    mark: i64,
    returnable: bool,
    /// What Redis reported as left, and when the counter is full again, at the reservation.
    remaining: u64,
    reset_at: Instant,
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
            left: 0,
            until: now,
            mark: 0,
            returnable: false,
            remaining: 0,
            reset_at: now,
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

    /// Takes the hits left of a batch, if any, to give back.
    fn leftover(&mut self, key: &str) -> Option<Leftover> {
        if self.left == 0 {
            return None;
        }
        let hits = std::mem::take(&mut self.left);
        Some(Leftover {
            key: key.into(),
            limit: self.limit,
            mark: self.mark,
            hits,
            returnable: self.returnable,
            rule: self.rule.clone(),
        })
    }

    fn idle(&self, now: Instant, horizon: Duration) -> bool {
        !self.in_flight && self.left == 0 && now.saturating_duration_since(self.last_used) >= 2 * horizon
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
    pub fn plan<'a>(
        &'a self,
        key: &'a str,
        rule: &Arc<CompiledRule>,
        now: Instant,
        counted: bool,
    ) -> Plan<'a> {
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
                if entry.left > 0 {
                    entry.rule.counters.batch_stranded.inc_by(u64::from(std::mem::take(&mut entry.left)));
                }
                entry.known_remaining = u64::MAX;
                entry.limit = rule.limit;
            }
            entry.rule = rule.clone();
        }
        entry.last_used = now;
        if !counted {
            entry.note_hit(now, horizon);
        }
        if entry.left > 0 {
            if now < entry.until {
                entry.left -= 1;
                entry.rule.counters.batch_served.inc();
                return Plan::Served(Verdict {
                    admitted: true,
                    remaining: entry.remaining.saturating_add(u64::from(entry.left)),
                    reset: entry.reset_at.saturating_duration_since(now),
                    retry_after: Duration::ZERO,
                });
            }
            if let Some(leftover) = entry.leftover(key) {
                lock(&self.leftovers).push(leftover);
            }
        }
        if entry.in_flight {
            entry.waiting = entry.waiting.saturating_add(1);
            let notify = entry.notify.get_or_insert_with(|| Arc::new(Notify::new())).clone();
            return Plan::Wait(Wait { notify, flight: entry.flight });
        }
        let expected = entry.last_hits.max(entry.window_hits).max(entry.waiting.saturating_add(1));
        let want = expected.min(self.settings.max_hits);
        // A cold counter costs one call; so does one whose batch would hold a single hit
        // once scaled to the life its algorithm allows (want · L / H < 2); near its limit a
        // counter goes one hit per call, concurrently, as without batches.
        let horizon_us = i64::try_from(horizon.as_micros()).unwrap_or(i64::MAX);
        let life_us = longest_life(&entry.limit, horizon_us);
        if i128::from(want) * i128::from(life_us) <= i128::from(horizon_us)
            || entry.known_remaining < 2 * FAIR_SHARE.unsigned_abs()
        {
            return Plan::Single;
        }
        entry.in_flight = true;
        entry.flight += 1;
        entry.waiting = 0;
        Plan::Reserve(Ticket {
            batches: self,
            key,
            flight: entry.flight,
            want,
            limit: entry.limit,
            done: false,
        })
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
            out.extend(shard.iter_mut().filter_map(|(key, entry)| entry.leftover(key)));
        }
        out
    }

    fn sweep_shard(&self, shard: &mut HashMap<Box<str>, Entry>, now: Instant) -> Vec<Leftover> {
        let horizon = self.settings.horizon;
        let mut out = Vec::new();
        shard.retain(|key, entry| {
            if entry.left > 0 && now >= entry.until {
                out.extend(entry.leftover(key));
            }
            !entry.idle(now, horizon)
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

impl Ticket<'_> {
    /// Installs what Redis granted (the asking request's hit is the first) and wakes the
    /// requests waiting for it; returns the asking request's verdict.
    pub fn complete(mut self, sent: Instant, reservation: &Reservation) -> Verdict {
        self.done = true;
        let counters = |entry: &Entry| entry.rule.counters.clone();
        let mut shard = lock(self.batches.shard(self.key));
        let entry = shard.get_mut(self.key);
        let granted = reservation.granted;
        let verdict = if granted > 0 {
            Verdict {
                remaining: reservation.verdict.remaining.saturating_add(u64::from(granted - 1)),
                ..reservation.verdict
            }
        } else {
            reservation.verdict
        };
        let notify = match entry {
            Some(entry) if entry.flight == self.flight => {
                entry.in_flight = false;
                let c = counters(entry);
                c.batches.inc();
                c.batch_reserved.inc_by(u64::from(granted));
                entry.known_remaining = reservation.verdict.remaining;
                if granted > 0 {
                    c.batch_served.inc();
                    if entry.limit == self.limit {
                        entry.left = granted - 1;
                        entry.until = sent + reservation.life;
                        entry.mark = reservation.mark;
                        // A fixed-window batch that lives to its window's end has nothing to
                        // give back to; the others always may.
                        entry.returnable = !matches!(self.limit, Limit::FixedWindow { .. })
                            || reservation.life < reservation.verdict.reset;
                        entry.remaining = reservation.verdict.remaining;
                        entry.reset_at = sent + reservation.verdict.reset;
                    } else {
                        // The rule's numbers changed while the batch was reserved.
                        c.batch_stranded.inc_by(u64::from(granted - 1));
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

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut shard = lock(self.batches.shard(self.key));
        let notify = match shard.get_mut(self.key) {
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
