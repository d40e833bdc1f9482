//! Leader election on a `coordination.k8s.io` Lease, so that of several operator replicas
//! exactly one writes status. Expiry is judged the way client-go does it: by how long the
//! Lease record has stayed unchanged on *our* clock, never by comparing our clock with the
//! holder's timestamps, so clock skew between nodes cannot hand out the lease twice.
//! Writes use the Lease's resourceVersion, so two candidates racing for it cannot both win.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, api::PostParams};
use tokio::time::Instant;

use crate::error::{Error, Report, Result};

#[derive(Clone, Debug)]
pub struct Config {
    pub lease_name: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a lease lasts without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews, and candidates retry.
    pub retry_period: Duration,
}

impl Config {
    pub fn new(identity: impl Into<String>) -> Self {
        Self {
            lease_name: "breakwater-operator".into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    config: Config,
    /// The last Lease record seen, and when we first saw it in that state.
    observed: Option<(LeaseSpec, Instant)>,
    /// When the last attempt that won or renewed the lease began.
    renewed: Option<Instant>,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, config: Config) -> Self {
        Self { api, config, observed: None, renewed: None }
    }

    /// One attempt to acquire or renew: Ok(true) while we hold the lease.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        // Our write, if it succeeds, lands after this: the lease we win is timed from here.
        let started = Instant::now();
        let wall = MicroTime(jiff::Timestamp::now());
        let current = self.api.get_opt(&self.config.lease_name).await?;
        // A record is first seen when the read *returns*, not when the attempt began: the
        // read may reach the server late (slow network, busy server) and return a renewal
        // written long after `started`; timing it from `started` would let us take over
        // while the holder's lease still runs. (client-go times it after the read, too.)
        let now = Instant::now();
        let Some(current) = current else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.config.lease_name.clone()), ..ObjectMeta::default() },
                spec: Some(self.spec(Some(wall.clone()), wall, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(created.spec.unwrap_or_default(), now);
                    self.renewed = Some(started);
                    Ok(true)
                }
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(err) => Err(err.into()),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let held_by_us = spec.holder_identity.as_deref() == Some(self.config.identity.as_str());
        if self.observed.as_ref().is_none_or(|(seen, _)| *seen != spec) {
            self.observe(spec.clone(), now);
        }
        let unchanged_since = self.observed.as_ref().map_or(now, |(_, at)| *at);
        let duration =
            Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
        let vacant = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !held_by_us && !vacant && now.duration_since(unchanged_since) < duration {
            return Ok(false);
        }
        let (acquired, transitions) = if held_by_us {
            (spec.acquire_time.clone(), spec.lease_transitions.unwrap_or(0))
        } else {
            (Some(wall.clone()), spec.lease_transitions.unwrap_or(0) + 1)
        };
        let mut lease = current;
        lease.spec = Some(self.spec(acquired, wall, transitions));
        match self.api.replace(&self.config.lease_name, &PostParams::default(), &lease).await {
            Ok(updated) => {
                self.observe(updated.spec.unwrap_or_default(), now);
                self.renewed = Some(started);
                Ok(true)
            }
            // Someone else wrote the Lease first (resourceVersion conflict).
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(err) => Err(err.into()),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&mut self) -> Result<()> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(err) => tracing::warn!(error = %Report(&err), "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.retry_period).await;
        }
    }

    /// Renews the lease until a renewal fails for longer than the lease lasts; returns the
    /// error then. The caller must stop writing before the lease could pass to another.
    pub async fn hold(&mut self) -> Error {
        // Step down one retry period before the lease could lapse, before another replica
        // may take over; counted from the start of the last attempt that won or renewed the
        // lease (its write landed after that, however late the answer came).
        let holds_for = self.config.lease_duration.saturating_sub(self.config.retry_period);
        loop {
            let step_down = *self.renewed.get_or_insert_with(Instant::now) + holds_for;
            tokio::time::sleep_until(step_down.min(Instant::now() + self.config.retry_period)).await;
            // Each attempt gets only until the step-down deadline. The client has no read
            // timeout: against an API server that hangs (connection open, nothing answered)
            // an unbounded renewal never returned, so hold() never reported the lost lease and
            // this replica went on leading after its lease lapsed and another replica took it.
            match tokio::time::timeout_at(step_down, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => continue,
                Ok(Ok(false)) => return Error::LeaseTaken,
                Ok(Err(err)) => tracing::warn!(error = %Report(&err), "lease renewal failed"),
                Err(_) => tracing::warn!("lease renewal did not finish before the step-down deadline"),
            }
            if Instant::now() >= step_down {
                return Error::LeaseNotRenewed;
            }
        }
    }

    /// Gives the lease up (on shutdown) so a standby takes over at once.
    pub async fn release(&mut self) -> Result<()> {
        // Bounded like a renewal: a hung API server must not hold up shutdown; the lease then
        // simply lapses.
        let limit = self.config.retry_period;
        tokio::time::timeout(limit, self.hand_back()).await.unwrap_or(Err(Error::LeaseNotReleased(limit)))
    }

    async fn hand_back(&mut self) -> Result<()> {
        let Some(mut lease) = self.api.get_opt(&self.config.lease_name).await? else { return Ok(()) };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.api.replace(&self.config.lease_name, &PostParams::default(), &lease).await?;
        Ok(())
    }

    fn spec(&self, acquired: Option<MicroTime>, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.config.identity.clone()),
            lease_duration_seconds: i32::try_from(self.config.lease_duration.as_secs()).ok(),
            acquire_time: acquired,
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    fn observe(&mut self, spec: LeaseSpec, at: Instant) {
        self.observed = Some((spec, at));
    }
}
