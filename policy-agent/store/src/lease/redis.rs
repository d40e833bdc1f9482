//! Leases in Redis (standalone or Cluster): one Lua script per operation, run atomically by
//! Redis on shared connections ([`RedisConnection::run_script`]; in the agent, the counters'
//! connections), each call bounded by a deadline.
//!
//! Layout: every key of a lease shares the hash tag `{<prefix>:lease:<id>}` (prefix and id
//! percent-escaped as counter keys are), so a lease lives in one Cluster slot and a script
//! may touch all of its keys:
//!
//! - `…:holders`: sorted set, holder id → expiry in µs (Redis `TIME`). A semaphore of N is
//!   this set with at most N members;
//! - `…:grants`: hash, holder id → `token:acquired:renewed:expiry`;
//! - `…:token`: the newest fencing token.
//!
//! Every script reads the clock with `TIME` and first drops the grants that have expired,
//! so an expiry needs no timer. Holders and grants expire with the latest grant; the token
//! key [`TOKEN_RETENTION`] after that — the clock term of the token rule keeps tokens rising
//! once it is gone. Grants, releases and the expiries a script notices are published on
//! [`super::events::channel`] from inside the script, atomically with the change. Renewals
//! are not (they would make the operator rewrite a status on every renewal; its periodic
//! reconciliation picks `renewedAt` up), and neither is an expiry nobody notices — a lease's
//! last grant expires together with its keys — so readers re-read at the earliest expiry.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::{Script, ScriptInvocation, Value};

use super::{Attempt, Grant, LeaseState, LeaseStore, not_holder};
use crate::clock::micros;
use crate::key::escape_into;
use crate::reply::{ints, unexpected};
use crate::{Error, RedisConnection};

/// The deadline of one lease call when the caller has no reason to pick another. Lease
/// calls are not on a request's path, so this is far above a Redis round trip (well under a
/// millisecond) and above the stalls Redis has under a fork or a slow command, which would
/// otherwise fail renewals and make leaders step down; yet short enough that a leader
/// renewing at a fraction of even a one-second TTL can retry several times before expiry.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(100);

/// How long the token key outlives a lease's latest grant.
pub const TOKEN_RETENTION: Duration = Duration::from_secs(24 * 3600);

macro_rules! lease_script {
    ($file:literal) => {
        concat!(include_str!("common.lua"), include_str!($file))
    };
}

pub const ACQUIRE_LUA: &str = lease_script!("acquire.lua");
pub const RENEW_LUA: &str = lease_script!("renew.lua");
pub const RELEASE_LUA: &str = lease_script!("release.lua");
pub const STATE_LUA: &str = lease_script!("state.lua");

struct Scripts {
    acquire: Script,
    renew: Script,
    release: Script,
    state: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    acquire: Script::new(ACQUIRE_LUA),
    renew: Script::new(RENEW_LUA),
    release: Script::new(RELEASE_LUA),
    state: Script::new(STATE_LUA),
});

/// The keys of one lease; all share one hash tag, so one Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseKeys {
    /// Sorted set: holder id → expiry (µs).
    pub holders: String,
    /// Hash: holder id → `token:acquired:renewed:expiry`.
    pub grants: String,
    /// The newest fencing token.
    pub token: String,
}

/// `{<prefix>:lease:<id>}:holders|grants|token`, prefix and id escaped.
pub fn lease_keys(prefix: &str, lease: &str) -> LeaseKeys {
    let mut tag = String::with_capacity(prefix.len() + lease.len() + 10);
    tag.push('{');
    escape_into(&mut tag, prefix);
    tag.push_str(":lease:");
    escape_into(&mut tag, lease);
    tag.push('}');
    LeaseKeys {
        holders: format!("{tag}:holders"),
        grants: format!("{tag}:grants"),
        token: format!("{tag}:token"),
    }
}

/// Leases in Redis. Cheap to clone: the connections are the [`RedisConnection`]'s.
#[derive(Debug, Clone)]
pub struct RedisLeases {
    store: RedisConnection,
    prefix: Arc<str>,
    channel: Arc<str>,
    deadline: Duration,
}

impl RedisLeases {
    /// Leases under `key_prefix` (inside each lease's hash tag; several agents'
    /// configurations, or tests, can share one Redis), each call failing with
    /// [`Error::Timeout`] when Redis has not answered within `deadline`.
    pub fn new(store: RedisConnection, key_prefix: impl Into<String>, deadline: Duration) -> Self {
        let prefix: String = key_prefix.into();
        let channel = super::events::channel(&prefix);
        RedisLeases { store, prefix: prefix.into(), channel: channel.into(), deadline }
    }

    pub fn connection(&self) -> &RedisConnection {
        &self.store
    }

    pub fn key_prefix(&self) -> &str {
        &self.prefix
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// The channel grants and releases are published on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The keys `lease` lives in.
    pub fn keys(&self, lease: &str) -> LeaseKeys {
        lease_keys(&self.prefix, lease)
    }

    fn invocation<'a>(&self, script: &'a Script, lease: &str) -> ScriptInvocation<'a> {
        let keys = self.keys(lease);
        let mut invocation = script.key(keys.holders);
        invocation.key(keys.grants).key(keys.token);
        invocation
    }

    async fn run(&self, invocation: &ScriptInvocation<'_>) -> Result<Vec<Value>, Error> {
        match tokio::time::timeout(self.deadline, self.store.run_script(invocation)).await {
            Ok(reply) => reply,
            Err(_) => Err(Error::Timeout { call: "a lease call", deadline: self.deadline }),
        }
    }
}

impl LeaseStore for RedisLeases {
    async fn try_acquire(
        &self,
        lease: &str,
        holder: &str,
        ttl: Duration,
        capacity: u32,
        floor: i64,
    ) -> Result<Attempt, Error> {
        let mut invocation = self.invocation(&SCRIPTS.acquire, lease);
        invocation
            .arg(holder)
            .arg(micros(ttl))
            .arg(capacity)
            .arg(floor.max(0))
            .arg(lease)
            .arg(&*self.channel)
            .arg(TOKEN_RETENTION.as_millis() as u64);
        let reply = self.run(&invocation).await?;
        parse_attempt(holder, &reply)
    }

    async fn renew(&self, lease: &str, holder: &str, token: i64, ttl: Duration) -> Result<Grant, Error> {
        let mut invocation = self.invocation(&SCRIPTS.renew, lease);
        invocation
            .arg(holder)
            .arg(token)
            .arg(micros(ttl))
            .arg(lease)
            .arg(&*self.channel)
            .arg(TOKEN_RETENTION.as_millis() as u64);
        let reply = self.run(&invocation).await?;
        parse_renew(holder, &reply)?.ok_or_else(|| not_holder(lease, holder, token))
    }

    async fn release(&self, lease: &str, holder: &str, token: i64) -> Result<i64, Error> {
        let mut invocation = self.invocation(&SCRIPTS.release, lease);
        invocation.arg(holder).arg(token).arg(lease).arg(&*self.channel);
        let reply = self.run(&invocation).await?;
        parse_release(&reply)?.ok_or_else(|| not_holder(lease, holder, token))
    }

    async fn state(&self, lease: &str) -> Result<LeaseState, Error> {
        let mut invocation = self.invocation(&SCRIPTS.state, lease);
        invocation.arg(lease).arg(&*self.channel);
        let reply = self.run(&invocation).await?;
        parse_state(&reply)
    }
}

fn grant(holder: &str, [token, acquired, renewed, expires]: [i64; 4]) -> Grant {
    Grant {
        holder: holder.into(),
        fencing_token: token,
        acquired_at_us: acquired,
        renewed_at_us: renewed,
        expires_at_us: expires,
    }
}

/// `{1, token, acquired, renewed, expiry}` or `{0, now, free_at}`.
fn parse_attempt(holder: &str, reply: &[Value]) -> Result<Attempt, Error> {
    match reply.split_first() {
        Some((Value::Int(1), rest)) => ints::<4>(rest)
            .map(|g| Attempt::Granted(grant(holder, g)))
            .ok_or_else(|| unexpected("lease acquire", reply)),
        Some((Value::Int(0), rest)) => ints::<2>(rest)
            .map(|[now_us, free_at_us]| Attempt::Busy { now_us, free_at_us })
            .ok_or_else(|| unexpected("lease acquire", reply)),
        _ => Err(unexpected("lease acquire", reply)),
    }
}

/// `{1, token, acquired, renewed, expiry}` or `{0, now}` (not the holder).
fn parse_renew(holder: &str, reply: &[Value]) -> Result<Option<Grant>, Error> {
    match reply.split_first() {
        Some((Value::Int(1), rest)) => {
            ints::<4>(rest).map(|g| Some(grant(holder, g))).ok_or_else(|| unexpected("lease renew", reply))
        }
        Some((Value::Int(0), rest)) if ints::<1>(rest).is_some() => Ok(None),
        _ => Err(unexpected("lease renew", reply)),
    }
}

/// `{1, now}` (released at now) or `{0, now}` (not the holder).
fn parse_release(reply: &[Value]) -> Result<Option<i64>, Error> {
    match ints::<2>(reply) {
        Some([1, now]) => Ok(Some(now)),
        Some([0, _]) => Ok(None),
        _ => Err(unexpected("lease release", reply)),
    }
}

/// `{now, has_last, last, (holder, token, acquired, renewed, expiry)*}`.
fn parse_state(reply: &[Value]) -> Result<LeaseState, Error> {
    let bad = || unexpected("lease state", reply);
    if reply.len() < 3 || !(reply.len() - 3).is_multiple_of(5) {
        return Err(bad());
    }
    let [now_us, has_last, last] = ints::<3>(&reply[..3]).ok_or_else(bad)?;
    let last_token = match has_last {
        0 => None,
        1 => Some(last),
        _ => return Err(bad()),
    };
    let mut grants = reply[3..]
        .chunks_exact(5)
        .map(|chunk| {
            let holder = match &chunk[0] {
                Value::BulkString(bytes) => std::str::from_utf8(bytes).ok()?,
                _ => return None,
            };
            Some(grant(holder, ints::<4>(&chunk[1..])?))
        })
        .collect::<Option<Vec<Grant>>>()
        .ok_or_else(bad)?;
    grants.sort_by_key(|g| g.fencing_token);
    Ok(LeaseState { now_us, last_token, grants })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ints_of(values: &[i64]) -> Vec<Value> {
        values.iter().map(|&i| Value::Int(i)).collect()
    }

    #[test]
    fn keys_share_one_escaped_hash_tag() {
        let keys = lease_keys("bw", "billing/invoice:{run}");
        assert_eq!(keys.holders, "{bw:lease:billing/invoice%3A%7Brun%7D}:holders");
        assert_eq!(keys.grants, "{bw:lease:billing/invoice%3A%7Brun%7D}:grants");
        assert_eq!(keys.token, "{bw:lease:billing/invoice%3A%7Brun%7D}:token");
        // Distinct ids never share keys, even when one looks like another's suffix.
        assert_ne!(lease_keys("bw", "a:lease:b").holders, lease_keys("bw:lease:a", "b").holders);
    }

    #[test]
    fn scripts_share_the_prelude() {
        for script in [ACQUIRE_LUA, RENEW_LUA, RELEASE_LUA, STATE_LUA] {
            assert!(script.contains("local function live_holders"), "{script}");
        }
    }

    #[test]
    fn parses_attempts() {
        assert_eq!(
            parse_attempt("h", &ints_of(&[1, 7, 10, 11, 20])).unwrap(),
            Attempt::Granted(Grant {
                holder: "h".into(),
                fencing_token: 7,
                acquired_at_us: 10,
                renewed_at_us: 11,
                expires_at_us: 20,
            })
        );
        assert_eq!(
            parse_attempt("h", &ints_of(&[0, 5, 9])).unwrap(),
            Attempt::Busy { now_us: 5, free_at_us: 9 }
        );
        for bad in [vec![], ints_of(&[1, 7]), ints_of(&[0, 5]), ints_of(&[2, 1, 1]), vec![Value::Nil]] {
            let error = parse_attempt("h", &bad).unwrap_err();
            assert!(!error.is_transient(), "{error}");
            assert!(error.to_string().contains("lease acquire"), "{error}");
        }
    }

    #[test]
    fn parses_renewals_and_releases() {
        assert_eq!(parse_renew("h", &ints_of(&[1, 7, 10, 11, 20])).unwrap().unwrap().expires_at_us, 20);
        assert_eq!(parse_renew("h", &ints_of(&[0, 12])).unwrap(), None);
        assert!(parse_renew("h", &ints_of(&[0])).is_err());
        assert!(parse_renew("h", &[Value::Okay]).is_err());
        assert_eq!(parse_release(&ints_of(&[1, 33])).unwrap(), Some(33));
        assert_eq!(parse_release(&ints_of(&[0, 33])).unwrap(), None);
        assert!(parse_release(&ints_of(&[1])).is_err());
        assert!(parse_release(&ints_of(&[3, 1])).is_err());
    }

    #[test]
    fn parses_state_sorted_by_token() {
        let mut reply = ints_of(&[100, 1, 9]);
        for (holder, token) in [("b", 9), ("a", 4)] {
            reply.push(Value::BulkString(holder.as_bytes().to_vec()));
            reply.extend(ints_of(&[token, 50, 60, 150]));
        }
        let state = parse_state(&reply).unwrap();
        assert_eq!(state.now_us, 100);
        assert_eq!(state.last_token, Some(9));
        assert_eq!(state.grants.iter().map(|g| g.holder.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(
            parse_state(&ints_of(&[100, 0, 0])).unwrap(),
            LeaseState { now_us: 100, ..Default::default() }
        );
        assert!(parse_state(&ints_of(&[100, 1, 9, 4])).is_err());
        assert!(parse_state(&ints_of(&[100, 2, 9])).is_err());
        let mut not_a_name = ints_of(&[100, 1, 9]);
        not_a_name.extend(ints_of(&[1, 4, 50, 60, 150]));
        assert!(parse_state(&not_a_name).is_err());
    }
}
