//! The lease store: named locks and counting semaphores, each grant with a fencing token.
//! The agent grants leases to its pod through it; the operator reads them through it to
//! report who holds each `LockLease`.
//!
//! - [`LeaseStore`]: the atomic operations (grant, renew, release with an owner check,
//!   read), with a Redis backend ([`redis`]: Lua scripts, Redis `TIME` as the only clock,
//!   one hash tag per lease) and an in-memory one ([`memory`]: one agent only; tests);
//! - [`events`]: the channel the scripts publish every grant and release on.
//!
//! Fencing tokens: `token = max(last + 1, now_us, floor + 1)` where `last` is the lease's
//! newest token in Redis, `now_us` is Redis `TIME` in microseconds and `floor` the highest
//! token the asking agent has seen for the lease. Tokens strictly increase while Redis keeps
//! its data; when it loses it (a restart without persistence), the clock term still puts
//! the next token above every earlier one unless Redis's clock stepped back by more than the
//! outage, and the floor covers that case too while any agent that saw the old tokens lives.
//! See docs/leases.md.

use std::future::Future;
use std::time::Duration;

use crate::Error;

pub mod events;
pub mod memory;
pub mod redis;

pub use memory::MemoryLeases;
pub use redis::RedisLeases;

/// One grant of a lease, as the store holds it. Times are the store's clock (Redis `TIME`)
/// in microseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    pub holder: String,
    pub fencing_token: i64,
    pub acquired_at_us: i64,
    pub renewed_at_us: i64,
    pub expires_at_us: i64,
}

/// What one acquisition attempt got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Granted(Grant),
    /// Every slot is taken; the earliest current grant ends at `free_at_us` (store clock,
    /// read at `now_us`) unless renewed.
    Busy {
        now_us: i64,
        free_at_us: i64,
    },
}

/// A lease's current grants (expired ones already dropped) and its newest token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseState {
    pub now_us: i64,
    pub last_token: Option<i64>,
    /// Sorted by fencing token.
    pub grants: Vec<Grant>,
}

/// The atomic lease operations. `lease` is the lease id (`<namespace>/<name>`); the backend
/// derives its keys from it. A renewal or release by someone who does not hold the grant is
/// [`Error::NotHolder`].
pub trait LeaseStore: Send + Sync + 'static {
    /// Grants `holder` one of `capacity` slots for `ttl` if one is free, with a fencing token
    /// above every earlier one and above `floor`.
    fn try_acquire(
        &self,
        lease: &str,
        holder: &str,
        ttl: Duration,
        capacity: u32,
        floor: i64,
    ) -> impl Future<Output = Result<Attempt, Error>> + Send;

    /// Extends `holder`'s grant with `token` to now + `ttl`; refused once it has expired.
    fn renew(
        &self,
        lease: &str,
        holder: &str,
        token: i64,
        ttl: Duration,
    ) -> impl Future<Output = Result<Grant, Error>> + Send;

    /// Ends `holder`'s grant with `token`; returns the store time of the release.
    fn release(
        &self,
        lease: &str,
        holder: &str,
        token: i64,
    ) -> impl Future<Output = Result<i64, Error>> + Send;

    /// The current grants.
    fn state(&self, lease: &str) -> impl Future<Output = Result<LeaseState, Error>> + Send;
}

/// The refusal of a renewal or release.
pub(crate) fn not_holder(lease: &str, holder: &str, token: i64) -> Error {
    Error::NotHolder { lease: lease.into(), holder: holder.into(), token }
}
