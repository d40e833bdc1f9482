//! What the lease API and the leader helper call: the leases this pod may use (from the
//! configuration), holder ids, waiting for a grant, each lease's token floor, and metrics.
//! The store decides every grant atomically; nothing here can grant a lease on its own.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use breakwater_api::agent::LeaseRule;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{Attempt, Grant, LeaseState, LeaseStore};
use crate::metrics::Metrics;
use crate::store::StoreError;
use crate::{Error, Result};

/// The first pause between attempts while a lease is busy; it doubles up to [`MAX_POLL`].
const FIRST_POLL: Duration = Duration::from_millis(5);
const MAX_POLL: Duration = Duration::from_millis(100);

/// What this agent keeps per lease id, across configuration changes.
#[derive(Debug, Default)]
struct Local {
    /// The highest fencing token this agent has seen for the lease (the token rule's floor).
    floor: AtomicI64,
    /// Woken when this agent releases the lease, so its own waiters retry at once.
    released: Notify,
}

impl Local {
    fn observe(&self, token: i64) {
        self.floor.fetch_max(token, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct Entry {
    rule: LeaseRule,
    local: Arc<Local>,
}

/// The leases of one pod, over a [`LeaseStore`]. Share it behind an `Arc`.
pub struct LeaseManager<S: LeaseStore> {
    store: S,
    pod: String,
    metrics: Arc<Metrics>,
    /// By lease name: what requests look up, swapped whole on a configuration change.
    leases: ArcSwap<HashMap<String, Entry>>,
    /// By lease id: every lease this agent has served, so a floor survives the lease being
    /// removed and added again (one small entry per id).
    locals: Mutex<HashMap<String, Arc<Local>>>,
}

impl<S: LeaseStore> std::fmt::Debug for LeaseManager<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseManager")
            .field("pod", &self.pod)
            .field("leases", &self.leases.load().len())
            .finish_non_exhaustive()
    }
}

impl<S: LeaseStore> LeaseManager<S> {
    /// A manager with no leases yet; `pod` prefixes every holder id it issues.
    pub fn new(store: S, pod: impl Into<String>, metrics: Arc<Metrics>) -> Self {
        LeaseManager {
            store,
            pod: pod.into(),
            metrics,
            leases: ArcSwap::from_pointee(HashMap::new()),
            locals: Mutex::default(),
        }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    pub fn pod(&self) -> &str {
        &self.pod
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Replaces the leases this pod may use (called on every configuration change). Grants
    /// of leases no longer listed stay in the store until they expire or are released.
    pub fn set_leases(&self, leases: &[LeaseRule]) {
        let mut locals = self.locals.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entries = leases
            .iter()
            .map(|rule| {
                let local = locals.entry(rule.id.clone()).or_default().clone();
                (rule.name.clone(), Entry { rule: rule.clone(), local })
            })
            .collect();
        self.leases.store(Arc::new(entries));
    }

    /// The lease `name`, if this pod may use it.
    pub fn rule(&self, name: &str) -> Option<LeaseRule> {
        self.leases.load().get(name).map(|e| e.rule.clone())
    }

    /// Every lease this pod may use, by name.
    pub fn leases(&self) -> Vec<LeaseRule> {
        let mut rules: Vec<LeaseRule> = self.leases.load().values().map(|e| e.rule.clone()).collect();
        rules.sort_by(|a, b| a.name.cmp(&b.name));
        rules
    }

    /// The highest fencing token this agent has seen for the lease `name`.
    pub fn floor(&self, name: &str) -> Option<i64> {
        self.leases.load().get(name).map(|e| e.local.floor.load(Ordering::SeqCst))
    }

    fn entry(&self, name: &str) -> Result<(LeaseRule, Arc<Local>)> {
        self.leases
            .load()
            .get(name)
            .map(|e| (e.rule.clone(), e.local.clone()))
            .ok_or_else(|| Error::UnknownLease(name.into()))
    }

    /// A holder id no other grant has: `<pod>/<random nonce>`.
    fn new_holder(&self) -> String {
        format!("{}/{:016x}", self.pod, fastrand::u64(..))
    }

    /// Takes the lease `name` for a new holder, waiting up to `wait` for a slot; `Busy` when
    /// every slot is still taken then.
    ///
    /// Waiting wakes on this agent's own releases at once, and otherwise sleeps until the
    /// earliest grant would expire or a short poll (doubling from 5 to 100ms, jittered so
    /// waiters spread out), whichever is sooner. Polling is enough: safety never depends on
    /// when a waiter wakes (the store decides every grant atomically), expiries are known in
    /// advance, and only another agent's release is noticed late, by at most one poll — a
    /// subscription per agent would cut that but cost a connection and its own failure
    /// handling. All attempts of one call use one holder id, so an attempt whose reply was
    /// lost (deadline) and that was granted anyway is returned by the next attempt instead
    /// of taking a second slot; transient store errors are retried within the wait.
    pub async fn acquire(&self, name: &str, wait: Duration) -> Result<Grant> {
        let (rule, local) = self.entry(name)?;
        let holder = self.new_holder();
        let ttl = ttl(&rule);
        // The CRD requires at least one holder; zero would make the lease unobtainable.
        let capacity = rule.holders.max(1);
        let deadline = Instant::now() + wait;
        let mut poll = FIRST_POLL;
        loop {
            // Registered before the attempt, so a release during the attempt is not missed.
            let released = local.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();

            let floor = local.floor.load(Ordering::SeqCst);
            let attempt = self.store.try_acquire(&rule.id, &holder, ttl, capacity, floor).await;
            let now = Instant::now();
            let pause = match attempt {
                Ok(Attempt::Granted(grant)) => {
                    local.observe(grant.fencing_token);
                    self.metrics.lease_granted(&rule.id);
                    return Ok(grant);
                }
                Ok(Attempt::Busy { now_us, free_at_us }) => {
                    if now >= deadline {
                        self.metrics.lease_was_busy(&rule.id);
                        return Err(Error::LeaseBusy { lease: name.into(), waited: wait, free_at_us });
                    }
                    let until_free = Duration::from_micros(u64::try_from(free_at_us - now_us).unwrap_or(0));
                    until_free.min(jittered(poll))
                }
                Err(error) if error.is_transient() && now < deadline => {
                    self.metrics.lease_store_error(&rule.id, error.kind().label());
                    tracing::debug!(lease = %rule.id, %error, "lease store failed; retrying within the wait");
                    jittered(poll)
                }
                Err(error) => {
                    self.record_error(&rule.id, "acquire", &error);
                    return Err(error.into());
                }
            };
            poll = (poll * 2).min(MAX_POLL);
            tokio::select! {
                _ = &mut released => {}
                _ = tokio::time::sleep_until((now + pause).min(deadline)) => {}
            }
        }
    }

    /// Extends `holder`'s grant of `name` (fencing token `token`) by the lease's TTL from now.
    pub async fn renew(&self, name: &str, holder: &str, token: i64) -> Result<Grant> {
        let (rule, local) = self.entry(name)?;
        let result = self.store.renew(&rule.id, holder, token, ttl(&rule)).await;
        match &result {
            Ok(grant) => local.observe(grant.fencing_token),
            Err(error) => self.record_error(&rule.id, "renew", error),
        }
        Ok(result?)
    }

    /// Ends `holder`'s grant of `name`; returns the store time it ended at.
    pub async fn release(&self, name: &str, holder: &str, token: i64) -> Result<i64> {
        let (rule, local) = self.entry(name)?;
        let result = self.store.release(&rule.id, holder, token).await;
        match &result {
            // One slot freed: one waiter of this agent retries now.
            Ok(_) => local.released.notify_one(),
            Err(error) => self.record_error(&rule.id, "release", error),
        }
        Ok(result?)
    }

    /// The current grants of `name`.
    pub async fn state(&self, name: &str) -> Result<LeaseState> {
        let (rule, local) = self.entry(name)?;
        let result = self.store.state(&rule.id).await;
        match &result {
            Ok(state) => {
                if let Some(token) = state.last_token {
                    local.observe(token);
                }
            }
            Err(error) => self.record_error(&rule.id, "state", error),
        }
        Ok(result?)
    }

    fn record_error(&self, lease: &str, op: &'static str, error: &StoreError) {
        match error {
            StoreError::NotHolder { .. } => self.metrics.lease_refused(lease, op),
            error => {
                self.metrics.lease_store_error(lease, error.kind().label());
                tracing::debug!(lease, op, %error, "lease store failed");
            }
        }
    }
}

/// The rule's TTL; at least a millisecond, so a grant is never born expired.
fn ttl(rule: &LeaseRule) -> Duration {
    Duration::from_millis(rule.ttl_ms.max(1))
}

/// Somewhere in [poll / 2, poll], so that waiters which started together drift apart.
fn jittered(poll: Duration) -> Duration {
    poll.mul_f64(0.5 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::MemoryLeases;

    fn rule(name: &str, holders: u32) -> LeaseRule {
        LeaseRule { id: format!("ns/{name}"), name: name.into(), ttl_ms: 1_000, holders }
    }

    fn manager() -> LeaseManager<MemoryLeases> {
        let manager = LeaseManager::new(MemoryLeases::new(), "pod-a", Arc::new(Metrics::default()));
        manager.set_leases(&[rule("lock", 1), rule("pool", 2)]);
        manager
    }

    #[tokio::test(start_paused = true)]
    async fn issues_fresh_holder_ids_and_counts_grants() {
        let manager = manager();
        let a = manager.acquire("pool", Duration::ZERO).await.unwrap();
        let b = manager.acquire("pool", Duration::ZERO).await.unwrap();
        assert!(a.holder.starts_with("pod-a/") && b.holder.starts_with("pod-a/"));
        assert_ne!(a.holder, b.holder);
        assert!(b.fencing_token > a.fencing_token);
        assert_eq!(manager.metrics().lease_grants("ns/pool"), 2);
        assert_eq!(manager.floor("pool"), Some(b.fencing_token));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_names_are_refused() {
        let manager = manager();
        fn unknown<T>(r: Result<T>) -> bool {
            matches!(r, Err(Error::UnknownLease(n)) if n == "nope")
        }
        assert!(unknown(manager.acquire("nope", Duration::ZERO).await));
        assert!(unknown(manager.renew("nope", "h", 1).await));
        assert!(unknown(manager.release("nope", "h", 1).await));
        assert!(unknown(manager.state("nope").await));
        // By name, not by id.
        assert!(manager.rule("ns/lock").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_local_release_wakes_a_waiter_at_once() {
        let manager = Arc::new(manager());
        let held = manager.acquire("lock", Duration::ZERO).await.unwrap();
        let waiter = tokio::spawn({
            let manager = manager.clone();
            async move { manager.acquire("lock", Duration::from_secs(10)).await }
        });
        // Let the waiter make its first attempt and go to sleep.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let started = Instant::now();
        manager.release("lock", &held.holder, held.fencing_token).await.unwrap();
        let next = waiter.await.unwrap().unwrap();
        assert!(started.elapsed() < FIRST_POLL, "woken by the release, not by a poll");
        assert!(next.fencing_token > held.fencing_token);
    }

    #[tokio::test(start_paused = true)]
    async fn waits_until_expiry_then_busy_with_free_at() {
        let manager = manager();
        let held = manager.acquire("lock", Duration::ZERO).await.unwrap();
        let busy = manager.acquire("lock", Duration::from_millis(300)).await.unwrap_err();
        assert!(
            matches!(&busy, Error::LeaseBusy { free_at_us, waited, .. }
                if *free_at_us == held.expires_at_us && *waited == Duration::from_millis(300)),
            "{busy:?}"
        );
        assert_eq!(manager.metrics().lease_busy("ns/lock"), 1);
        // Waiting past the expiry gets the lease, without a release.
        let next = manager.acquire("lock", Duration::from_secs(5)).await.unwrap();
        assert!(next.acquired_at_us >= held.expires_at_us);
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_counted_by_operation() {
        let manager = manager();
        let held = manager.acquire("lock", Duration::ZERO).await.unwrap();
        assert!(matches!(
            manager.renew("lock", &held.holder, held.fencing_token + 1).await,
            Err(Error::Store(StoreError::NotHolder { .. }))
        ));
        assert!(matches!(
            manager.release("lock", "pod-a/other", held.fencing_token).await,
            Err(Error::Store(StoreError::NotHolder { .. }))
        ));
        assert_eq!(manager.metrics().lease_not_holder("ns/lock", "renew"), 1);
        assert_eq!(manager.metrics().lease_not_holder("ns/lock", "release"), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_floor_survives_a_configuration_change() {
        let manager = manager();
        let held = manager.acquire("lock", Duration::ZERO).await.unwrap();
        manager.set_leases(&[]);
        assert_eq!(manager.floor("lock"), None);
        manager.set_leases(&[rule("lock", 1)]);
        assert_eq!(manager.floor("lock"), Some(held.fencing_token));
    }
}
