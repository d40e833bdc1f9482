//! Leader election: the agent keeps one lease on its pod's behalf and says whether the pod
//! leads, through a watch channel (what `GET /v1/leases/NAME/leader` reads) and, for apps
//! that prefer files, a file holding the fencing token while the pod leads.
//!
//! The loop: campaign (acquire, waiting up to one TTL at a time), then renew every TTL/3.
//! Leadership is *believed* only until
//!
//! ```text
//! deadline = instant the last successful acquire/renew request was sent + ttl - margin
//! ```
//!
//! Redis computed the grant's expiry from its own `TIME`, read when the script ran, which is
//! at or after the moment we sent the request; so on our clock the grant cannot end before
//! `sent + ttl`, up to the two clocks' rate difference over one TTL, which the margin
//! (TTL/10, at least 100 ms) covers. The helper steps down when a renewal is refused, or when
//! the deadline passes without a successful renewal: a renewal that hangs is raced against
//! the deadline, so a slow or partitioned Redis cannot keep a stale leader. Stepping down
//! removes the file before the watch channel says so, both before the deadline.
//!
//! After stepping down it campaigns again. On shutdown it steps down, then releases the lease
//! so that another pod takes over without waiting for the expiry.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::watch;
use tokio::time::Instant;

use super::manager::LeaseManager;
use super::{Grant, LeaseStore};
use crate::Error;
use crate::store::StoreError;

/// The least margin kept between the believed deadline and the earliest possible expiry.
pub const MIN_MARGIN: Duration = Duration::from_millis(100);

/// Whether this pod leads one lease, as the helper last published it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderState {
    pub lease: String,
    /// Set while this pod leads.
    pub leading: Option<Leadership>,
    /// Why the pod does not lead (held by another pod, lease unknown, store error), for
    /// people reading the API; `None` while leading or before the first campaign ends.
    pub waiting: Option<String>,
    /// How many times this helper has become leader: a change tells a reader that it missed
    /// a step-down in between.
    pub terms: u64,
}

impl LeaderState {
    pub fn new(lease: impl Into<String>) -> Self {
        LeaderState { lease: lease.into(), leading: None, waiting: None, terms: 0 }
    }

    pub fn is_leader(&self) -> bool {
        self.leading.is_some()
    }
}

/// The grant this pod leads with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    pub holder: String,
    pub fencing_token: i64,
    /// Store clock, microseconds since the Unix epoch.
    pub acquired_at_us: i64,
    /// The expiry in the store after the last successful renewal.
    pub expires_at_us: i64,
    /// When this pod stops believing it leads unless a renewal succeeds first (local clock).
    pub deadline: Instant,
}

#[derive(Debug, Clone)]
pub struct LeaderSettings {
    /// Where to write `<dir>/<lease name>` (the fencing token) while leading.
    pub dir: Option<PathBuf>,
    /// First and longest pause after a failed campaign (store error, unknown lease).
    pub backoff: (Duration, Duration),
}

impl Default for LeaderSettings {
    fn default() -> Self {
        LeaderSettings { dir: None, backoff: (Duration::from_millis(200), Duration::from_secs(5)) }
    }
}

/// The margin between the believed deadline and the earliest expiry: TTL/10, at least
/// [`MIN_MARGIN`].
pub fn margin(ttl: Duration) -> Duration {
    (ttl / 10).max(MIN_MARGIN)
}

/// Until when a grant whose request was sent at `sent` may be believed held. A TTL no longer
/// than the margin is never believed.
pub fn believed_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl.saturating_sub(margin(ttl))
}

/// When to renew a grant whose request was sent at `sent`.
pub fn renewal_due(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl / 3
}

/// How soon to retry a renewal that failed without being refused (store error): several
/// tries fit before the deadline.
pub fn renewal_retry(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_millis(20))
}

/// The TTL a grant was given by the store, bounded by the one the request was sent with (the
/// configuration may change the TTL between the two).
fn granted_ttl(grant: &Grant, requested: Duration) -> Duration {
    let since = grant.renewed_at_us.max(grant.acquired_at_us);
    let granted = u64::try_from(grant.expires_at_us.saturating_sub(since)).unwrap_or(0);
    Duration::from_micros(granted).min(requested)
}

/// A grant and the instant its last successful request was sent.
#[derive(Debug, Clone)]
struct Held {
    grant: Grant,
    sent: Instant,
    ttl: Duration,
}

impl Held {
    fn deadline(&self) -> Instant {
        believed_until(self.sent, self.ttl)
    }
}

enum Ended {
    /// Leadership lost or never confirmed: campaign again.
    SteppedDown,
    /// Shutdown while holding this grant: release it.
    Stopping(Held),
}

/// Keeps one lease on the pod's behalf.
#[derive(Debug)]
pub struct LeaderElection<S: LeaseStore> {
    manager: Arc<LeaseManager<S>>,
    lease: String,
    settings: LeaderSettings,
    state: watch::Sender<LeaderState>,
    gauge: Gauge,
}

impl<S: LeaseStore> LeaderElection<S> {
    /// A helper for lease `lease` (the name pods ask for) and the channel it publishes on.
    pub fn new(
        manager: Arc<LeaseManager<S>>,
        lease: impl Into<String>,
        settings: LeaderSettings,
        gauge: Gauge,
    ) -> (Self, watch::Receiver<LeaderState>) {
        let lease = lease.into();
        let (state, rx) = watch::channel(LeaderState::new(lease.clone()));
        (LeaderElection { manager, lease, settings, state, gauge }, rx)
    }

    /// Campaigns, leads, and campaigns again after stepping down, until `stop` turns true;
    /// then steps down and releases the lease.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        // A file left by an earlier process (killed while leading) claims nothing.
        self.remove_file();
        loop {
            let Some(held) = self.campaign(&mut stop).await else { return };
            match self.hold(held, &mut stop).await {
                Ended::SteppedDown => continue,
                Ended::Stopping(held) => {
                    self.step_down("the agent is shutting down".into());
                    self.release(held).await;
                    return;
                }
            }
        }
    }

    fn ttl(&self) -> Option<Duration> {
        self.manager.rule(&self.lease).map(|rule| Duration::from_millis(rule.ttl_ms))
    }

    /// Acquires the lease; `None` when stopped first.
    async fn campaign(&self, stop: &mut watch::Receiver<bool>) -> Option<Held> {
        let mut backoff = self.settings.backoff.0;
        loop {
            if *stop.borrow() {
                return None;
            }
            let Some(ttl) = self.ttl() else {
                self.wait_note(Error::UnknownLease(self.lease.clone()).to_string());
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return None,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(self.settings.backoff.1);
                continue;
            };
            let sent = Instant::now();
            let attempt = tokio::select! {
                _ = stop.wait_for(|s| *s) => return None,
                attempt = self.manager.acquire(&self.lease, ttl) => attempt,
            };
            match attempt {
                Ok(grant) => {
                    let ttl = granted_ttl(&grant, ttl);
                    tracing::info!(
                        lease = self.lease,
                        holder = grant.holder,
                        token = grant.fencing_token,
                        "lease acquired for leader election"
                    );
                    return Some(Held { grant, sent, ttl });
                }
                Err(Error::LeaseBusy { .. }) => {
                    self.wait_note("held by another holder".into());
                    backoff = self.settings.backoff.0;
                    // The manager waited up to a TTL; never spin if it answered at once.
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return None,
                        _ = tokio::time::sleep_until(sent + self.settings.backoff.0) => {}
                    }
                }
                Err(error) => {
                    tracing::warn!(lease = self.lease, %error, retry_in = ?backoff, "leader campaign failed");
                    self.wait_note(error.to_string());
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return None,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(self.settings.backoff.1);
                }
            }
        }
    }

    /// Leads while renewals succeed before the deadline.
    async fn hold(&self, mut held: Held, stop: &mut watch::Receiver<bool>) -> Ended {
        let mut leading = false;
        let mut due = renewal_due(held.sent, held.ttl);
        loop {
            let deadline = held.deadline();
            let now = Instant::now();
            if now < deadline {
                self.lead(&held, &mut leading);
            } else if leading {
                self.step_down(format!(
                    "no successful renewal within {:?} of the last one sent",
                    held.ttl.saturating_sub(margin(held.ttl))
                ));
                return Ended::SteppedDown;
            } else {
                // Won after a wait longer than the deadline allows: not believed yet, so
                // confirm with a renewal at once.
                due = now;
            }
            if now < due {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return Ended::Stopping(held),
                    _ = tokio::time::sleep_until(due.min(deadline)) => {}
                }
                continue;
            }
            // Leading, a renewal must answer before the deadline; not yet leading, it may take
            // as long as the grant can last.
            let limit = if leading { deadline } else { held.sent + held.ttl };
            let sent = Instant::now();
            let ttl = self.ttl().unwrap_or(held.ttl);
            let renewal = self.manager.renew(&self.lease, &held.grant.holder, held.grant.fencing_token);
            let result = tokio::select! {
                _ = stop.wait_for(|s| *s) => return Ended::Stopping(held),
                _ = tokio::time::sleep_until(limit) => {
                    tracing::warn!(lease = self.lease, "lease renewal did not answer before the deadline");
                    if leading {
                        self.step_down("the renewal did not answer before the deadline".into());
                    }
                    return Ended::SteppedDown;
                }
                result = renewal => result,
            };
            match result {
                Ok(grant) => {
                    let ttl = granted_ttl(&grant, ttl);
                    held = Held { grant, sent, ttl };
                    due = renewal_due(sent, ttl);
                }
                Err(error @ (Error::Store(StoreError::NotHolder { .. }) | Error::UnknownLease(_))) => {
                    tracing::warn!(lease = self.lease, %error, "lease renewal refused; stepping down");
                    if leading {
                        self.step_down(error.to_string());
                    } else {
                        self.wait_note(error.to_string());
                    }
                    return Ended::SteppedDown;
                }
                Err(error) => {
                    let retry = renewal_retry(held.ttl);
                    tracing::warn!(lease = self.lease, %error, retry_in = ?retry, "lease renewal failed; retrying until the deadline");
                    due = sent + retry;
                }
            }
        }
    }

    /// Publishes (or refreshes) leadership for `held`.
    fn lead(&self, held: &Held, leading: &mut bool) {
        let leadership = Leadership {
            holder: held.grant.holder.clone(),
            fencing_token: held.grant.fencing_token,
            acquired_at_us: held.grant.acquired_at_us,
            expires_at_us: held.grant.expires_at_us,
            deadline: held.deadline(),
        };
        if !*leading {
            *leading = true;
            // The file before the channel: an app that reads the file after the API said it
            // leads finds the token.
            self.write_file(held.grant.fencing_token);
            self.gauge.set(1);
            tracing::info!(lease = self.lease, token = held.grant.fencing_token, "this pod leads");
            self.state.send_modify(|state| {
                state.leading = Some(leadership);
                state.waiting = None;
                state.terms += 1;
            });
        } else {
            self.state.send_if_modified(|state| {
                let changed = state.leading.as_ref() != Some(&leadership);
                state.leading = Some(leadership);
                changed
            });
        }
    }

    fn step_down(&self, why: String) {
        self.remove_file();
        self.gauge.set(0);
        tracing::warn!(lease = self.lease, reason = why, "this pod no longer leads");
        self.state.send_modify(|state| {
            state.leading = None;
            state.waiting = Some(why);
        });
    }

    fn wait_note(&self, why: String) {
        self.state.send_if_modified(|state| {
            let changed = state.waiting.as_deref() != Some(why.as_str());
            state.waiting = Some(why);
            changed
        });
    }

    /// Releases the lease at shutdown, bounded by the grant's own life: after that there is
    /// nothing left to release.
    async fn release(&self, held: Held) {
        let limit = held.sent + held.ttl;
        let release = self.manager.release(&self.lease, &held.grant.holder, held.grant.fencing_token);
        match tokio::time::timeout_at(limit, release).await {
            Ok(Ok(_)) => tracing::info!(lease = self.lease, "leader lease released"),
            Ok(Err(error)) => tracing::warn!(lease = self.lease, %error, "leader lease not released"),
            Err(_) => {
                tracing::warn!(lease = self.lease, "leader lease release timed out; it frees at its expiry")
            }
        }
    }

    fn file(&self) -> Option<PathBuf> {
        self.settings.dir.as_ref().map(|dir| dir.join(&self.lease))
    }

    /// Writes the token atomically (a temporary file renamed over the target), so a reader
    /// never sees a partial token. Plain `std::fs`: a few bytes on a local volume, and the
    /// write must be done before leadership is published.
    fn write_file(&self, token: i64) {
        let Some(path) = self.file() else { return };
        if let Err(error) = write_atomically(&path, format!("{token}\n").as_bytes()) {
            tracing::error!(lease = self.lease, path = %path.display(), %error, "cannot write the leader file");
        }
    }

    fn remove_file(&self) {
        let Some(path) = self.file() else { return };
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::error!(lease = self.lease, path = %path.display(), %error, "cannot remove the leader file")
            }
        }
    }
}

/// Writes `contents` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temp, contents)?;
    std::fs::rename(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deadline_keeps_a_margin_before_the_earliest_expiry() {
        let sent = Instant::now();
        assert_eq!(margin(Duration::from_secs(30)), Duration::from_secs(3));
        assert_eq!(margin(Duration::from_millis(500)), MIN_MARGIN);
        assert_eq!(believed_until(sent, Duration::from_secs(30)), sent + Duration::from_secs(27));
        assert_eq!(believed_until(sent, Duration::from_millis(50)), sent, "never believed");
        assert_eq!(renewal_due(sent, Duration::from_secs(30)), sent + Duration::from_secs(10));
        // Renewals are due well before the deadline, with room for retries in between.
        let ttl = Duration::from_secs(1);
        assert!(renewal_due(sent, ttl) + 3 * renewal_retry(ttl) < believed_until(sent, ttl));
    }

    #[test]
    fn the_granted_ttl_is_the_stores_bounded_by_the_request() {
        let grant = |acquired, renewed, expires| Grant {
            holder: "h".into(),
            fencing_token: 1,
            acquired_at_us: acquired,
            renewed_at_us: renewed,
            expires_at_us: expires,
        };
        let ten = Duration::from_secs(10);
        assert_eq!(granted_ttl(&grant(0, 0, 10_000_000), ten), ten);
        assert_eq!(granted_ttl(&grant(0, 4_000_000, 9_000_000), ten), Duration::from_secs(5));
        assert_eq!(granted_ttl(&grant(0, 0, 20_000_000), ten), ten);
        assert_eq!(granted_ttl(&grant(5, 5, 0), ten), Duration::ZERO);
    }

    #[test]
    fn the_leader_file_is_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        write_atomically(&path, b"1\n").unwrap();
        write_atomically(&path, b"22\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "22\n");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("lock")], "no temporary file left");
    }

    /// The helper over [`MemoryLeases`] on tokio's paused clock, through a store whose
    /// renewals can be made to hang or fail.
    mod election {
        use std::sync::Mutex;

        use breakwater_api::agent::LeaseRule;
        use tokio::task::JoinHandle;

        use super::*;
        use crate::lease::{Attempt, LeaseState, MemoryLeases};
        use crate::metrics::Metrics;

        const ID: &str = "ns/lead";
        const TTL: Duration = Duration::from_secs(10);
        /// A bound on every wait (virtual time: the paused clock jumps there when stuck).
        const LIMIT: Duration = Duration::from_secs(600);

        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Renewals {
            Pass,
            /// Never answer, like a Redis that stopped responding.
            Hang,
            /// Answer with a transient error, like a Redis that is away.
            Fail,
        }

        #[derive(Debug, Clone)]
        struct Faulty {
            inner: MemoryLeases,
            renewals: Arc<Mutex<Renewals>>,
        }

        impl Faulty {
            fn set(&self, mode: Renewals) {
                *self.renewals.lock().unwrap() = mode;
            }
        }

        impl LeaseStore for Faulty {
            async fn try_acquire(
                &self,
                lease: &str,
                holder: &str,
                ttl: Duration,
                capacity: u32,
                floor: i64,
            ) -> Result<Attempt, StoreError> {
                self.inner.try_acquire(lease, holder, ttl, capacity, floor).await
            }

            async fn renew(
                &self,
                lease: &str,
                holder: &str,
                token: i64,
                ttl: Duration,
            ) -> Result<Grant, StoreError> {
                let mode = *self.renewals.lock().unwrap();
                match mode {
                    Renewals::Pass => self.inner.renew(lease, holder, token, ttl).await,
                    Renewals::Hang => std::future::pending().await,
                    Renewals::Fail => Err(StoreError::NotConnected),
                }
            }

            async fn release(&self, lease: &str, holder: &str, token: i64) -> Result<i64, StoreError> {
                self.inner.release(lease, holder, token).await
            }

            async fn state(&self, lease: &str) -> Result<LeaseState, StoreError> {
                self.inner.state(lease).await
            }
        }

        struct Running {
            store: Faulty,
            manager: Arc<LeaseManager<Faulty>>,
            state: watch::Receiver<LeaderState>,
            stop: watch::Sender<bool>,
            task: JoinHandle<()>,
            gauge: Gauge,
        }

        fn start(dir: Option<&Path>, configured: bool) -> Running {
            let store = Faulty { inner: MemoryLeases::new(), renewals: Arc::new(Mutex::new(Renewals::Pass)) };
            let manager =
                Arc::new(LeaseManager::new(store.clone(), "ns/pod-a", Arc::new(Metrics::default())));
            if configured {
                configure(&manager);
            }
            let settings = LeaderSettings { dir: dir.map(Path::to_path_buf), ..LeaderSettings::default() };
            let gauge = Gauge::default();
            let (election, state) = LeaderElection::new(manager.clone(), "lead", settings, gauge.clone());
            let (stop, stopped) = watch::channel(false);
            let task = tokio::spawn(election.run(stopped));
            Running { store, manager, state, stop, task, gauge }
        }

        fn configure(manager: &LeaseManager<Faulty>) {
            let ttl_ms = u64::try_from(TTL.as_millis()).unwrap();
            manager.set_leases(&[LeaseRule { id: ID.into(), name: "lead".into(), ttl_ms, holders: 1 }]);
        }

        impl Running {
            async fn term(&mut self, term: u64) -> Leadership {
                let wait = self.state.wait_for(|s| s.terms == term && s.is_leader());
                let state = tokio::time::timeout(LIMIT, wait).await.expect("leads in time").unwrap();
                state.leading.clone().unwrap()
            }

            async fn stepped_down(&mut self) -> LeaderState {
                let wait = self.state.wait_for(|s| !s.is_leader());
                tokio::time::timeout(LIMIT, wait).await.expect("steps down in time").unwrap().clone()
            }

            /// The store's view, read past the faults.
            async fn store_state(&self) -> LeaseState {
                self.store.inner.state(ID).await.unwrap()
            }

            /// Asserts that the store still holds `leadership`'s grant, for at least the
            /// margin: the helper stepped down strictly before the lease could expire.
            async fn assert_still_granted(&self, leadership: &Leadership) {
                let state = self.store_state().await;
                let grant = state
                    .grants
                    .iter()
                    .find(|g| g.fencing_token == leadership.fencing_token)
                    .unwrap_or_else(|| panic!("the grant is gone from the store: {state:?}"));
                let left = Duration::from_micros(u64::try_from(grant.expires_at_us - state.now_us).unwrap());
                assert!(left >= margin(TTL), "stepped down only {left:?} before the expiry");
            }
        }

        fn read(path: &Path) -> Option<String> {
            std::fs::read_to_string(path).ok()
        }

        #[tokio::test(start_paused = true)]
        async fn renewals_keep_leadership_with_one_token() {
            let dir = tempfile::tempdir().unwrap();
            let mut run = start(Some(dir.path()), true);
            let first = run.term(1).await;
            let file = dir.path().join("lead");
            assert_eq!(read(&file), Some(format!("{}\n", first.fencing_token)));
            assert_eq!(run.gauge.get(), 1);
            assert_eq!(first.deadline, Instant::now() + TTL - margin(TTL));
            // Ten TTLs later: still the first term, same token, the store's expiry moving on.
            tokio::time::sleep(TTL * 10).await;
            let now = run.state.borrow().clone();
            assert_eq!(now.terms, 1);
            let leading = now.leading.unwrap();
            assert_eq!(leading.fencing_token, first.fencing_token);
            assert!(leading.expires_at_us >= first.expires_at_us + 9 * 10_000_000, "{leading:?}");
            assert!(leading.deadline > Instant::now());
            run.stop.send(true).unwrap();
            run.task.await.unwrap();
        }

        #[tokio::test(start_paused = true)]
        async fn a_hanging_renewal_steps_down_before_the_expiry() {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("lead");
            let mut run = start(Some(dir.path()), true);
            let first = run.term(1).await;
            let led_at = Instant::now();
            run.store.set(Renewals::Hang);
            let down = run.stepped_down().await;
            // The acquire was sent at led_at (no time passes in the memory store): believed
            // for ttl - margin, not a moment longer.
            assert_eq!(Instant::now() - led_at, TTL - margin(TTL));
            run.assert_still_granted(&first).await;
            assert_eq!(read(&file), None, "the file goes with the leadership");
            assert_eq!(run.gauge.get(), 0);
            assert!(down.waiting.unwrap().contains("did not answer before the deadline"));

            // It campaigns again and wins once the abandoned grant has expired.
            run.store.set(Renewals::Pass);
            let second = run.term(2).await;
            assert!(Instant::now() - led_at >= TTL, "not before the old grant expired");
            assert!(second.fencing_token > first.fencing_token);
            assert!(second.acquired_at_us >= first.expires_at_us);
            assert_eq!(read(&file), Some(format!("{}\n", second.fencing_token)));
        }

        #[tokio::test(start_paused = true)]
        async fn failing_renewals_step_down_at_the_deadline() {
            let mut run = start(None, true);
            let first = run.term(1).await;
            let led_at = Instant::now();
            run.store.set(Renewals::Fail);
            run.stepped_down().await;
            // Renewals failed at ttl/3 and every ttl/10 after; none succeeded by the deadline.
            assert_eq!(Instant::now() - led_at, TTL - margin(TTL));
            run.assert_still_granted(&first).await;
            run.store.set(Renewals::Pass);
            let second = run.term(2).await;
            assert!(second.fencing_token > first.fencing_token);
        }

        #[tokio::test(start_paused = true)]
        async fn failing_renewals_that_recover_keep_leadership() {
            let mut run = start(None, true);
            let first = run.term(1).await;
            let led_at = Instant::now();
            run.store.set(Renewals::Fail);
            // Past the first renewal (ttl/3) and two retries, then Redis is back.
            tokio::time::sleep_until(led_at + TTL / 3 + 2 * renewal_retry(TTL) + Duration::from_millis(1))
                .await;
            assert!(run.state.borrow().is_leader());
            run.store.set(Renewals::Pass);
            tokio::time::sleep(TTL).await;
            let state = run.state.borrow().clone();
            assert_eq!((state.terms, state.leading.map(|l| l.fencing_token)), (1, Some(first.fencing_token)));
        }

        #[tokio::test(start_paused = true)]
        async fn a_refused_renewal_steps_down_at_once() {
            let dir = tempfile::tempdir().unwrap();
            let mut run = start(Some(dir.path()), true);
            let first = run.term(1).await;
            let led_at = Instant::now();
            // The grant ends behind the helper's back (as when Redis lost it): the next
            // renewal is refused by the store itself.
            run.store.inner.release(ID, &first.holder, first.fencing_token).await.unwrap();
            let second = run.term(2).await;
            // At the first renewal (tokio's timers round up to the millisecond).
            let at = Instant::now() - led_at;
            assert!(at >= TTL / 3 && at <= TTL / 3 + Duration::from_millis(1), "{at:?}");
            assert!(second.fencing_token > first.fencing_token);
            assert_eq!(read(&dir.path().join("lead")), Some(format!("{}\n", second.fencing_token)));
            assert_eq!(run.manager.metrics().lease_not_holder(ID, "renew"), 1);
        }

        #[tokio::test(start_paused = true)]
        async fn a_lease_won_after_a_long_wait_is_confirmed_before_it_is_believed() {
            let run_store = MemoryLeases::new();
            // Another holder has the lease for a full TTL from now.
            let other = run_store.try_acquire(ID, "ns/pod-b/1", TTL, 1, 0).await.unwrap();
            let Attempt::Granted(other) = other else { panic!("{other:?}") };
            tokio::time::sleep(Duration::from_millis(500)).await;
            let store = Faulty { inner: run_store, renewals: Arc::new(Mutex::new(Renewals::Pass)) };
            let manager =
                Arc::new(LeaseManager::new(store.clone(), "ns/pod-a", Arc::new(Metrics::default())));
            configure(&manager);
            let (election, mut state) =
                LeaderElection::new(manager, "lead", LeaderSettings::default(), Gauge::default());
            let (_stop, stopped) = watch::channel(false);
            let started = Instant::now();
            tokio::spawn(election.run(stopped));
            // The acquire sent at `started` waits 9.5 s for the other grant to expire; its own
            // deadline (started + 9 s) has passed by then, so a renewal confirms it first.
            let wait = state.wait_for(|s| s.is_leader());
            let leading = tokio::time::timeout(LIMIT, wait).await.unwrap().unwrap().leading.clone().unwrap();
            let now = Instant::now();
            assert!(now >= started + Duration::from_millis(9_500), "{:?}", now - started);
            assert!(leading.acquired_at_us >= other.expires_at_us);
            assert_eq!(leading.deadline, now + TTL - margin(TTL), "believed from the renewal");
            assert!(leading.expires_at_us > leading.acquired_at_us + 9_000_000);
        }

        #[tokio::test(start_paused = true)]
        async fn shutdown_steps_down_and_releases() {
            let dir = tempfile::tempdir().unwrap();
            let mut run = start(Some(dir.path()), true);
            run.term(1).await;
            run.stop.send(true).unwrap();
            (&mut run.task).await.unwrap();
            assert!(!run.state.borrow().is_leader());
            assert_eq!(read(&dir.path().join("lead")), None);
            assert_eq!(run.store_state().await.grants, vec![], "released, not left to expire");
        }

        #[tokio::test(start_paused = true)]
        async fn a_stale_file_is_removed_and_an_unknown_lease_is_waited_for() {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("lead");
            std::fs::write(&file, "7\n").unwrap();
            let mut run = start(Some(dir.path()), false);
            let wait = run.state.wait_for(|s| s.waiting.is_some());
            let waiting = tokio::time::timeout(LIMIT, wait).await.unwrap().unwrap().clone();
            assert!(waiting.waiting.unwrap().contains("no lease \"lead\""));
            assert_eq!(read(&file), None, "a file from an earlier process claims nothing");
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert!(!run.state.borrow().is_leader());
            configure(&run.manager);
            let leading = run.term(1).await;
            assert_eq!(read(&file), Some(format!("{}\n", leading.fencing_token)));
        }
    }
}
