//! Breakers in Redis (standalone or Cluster): one Lua script, `machine.lua`, runs every
//! step atomically on Redis's clock, on the shared connections
//! ([`RedisConnection::run_script`]), each call bounded by a deadline.
//!
//! Layout: a breaker's two keys share the hash tag `{<prefix>:breaker:<id>}` (prefix and id
//! percent-escaped as every key part is), so a breaker lives in one Cluster slot:
//!
//! - `{…}`: hash — `state` (0 CLOSED, 1 OPEN, 2 HALF_OPEN), `since` (µs), `generation`,
//!   the window totals `calls`, `failures`, `slow` (while OPEN or HALF_OPEN, those of the
//!   window that opened it), and HALF_OPEN's `granted` and `ok`;
//! - `{…}:window`: list of entries `slot:calls:failures:slow`, oldest first.
//!
//! Both expire [`TTL`](super::TTL) after the script last changed them; a missing hash reads
//! CLOSED, since 0, generation 0. Transitions are published on [`super::channel`] from
//! inside the script, atomically with the change.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::{Script, ScriptInvocation, Value};

use super::{BreakerState, BreakerStore, Outcomes, Params, params_args};
use crate::key::escape_into;
use crate::reply::{ints, unexpected};
use crate::{Error, RedisConnection};

/// The machine; its ARGV and replies are documented at its top.
pub const MACHINE_LUA: &str = include_str!("machine.lua");

static MACHINE: LazyLock<Script> = LazyLock::new(|| Script::new(MACHINE_LUA));

/// The deadline of one breaker call when the caller has no reason to pick another: reports
/// and half-open probes are off the request path of a CLOSED breaker, yet a probe holds a
/// call, so this stays well under Envoy's own 20 ms for the rate-limit call.
pub const DEFAULT_DEADLINE: Duration = Duration::from_millis(10);

/// The two keys of one breaker; both share one hash tag, so one Cluster slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerKeys {
    pub hash: String,
    pub window: String,
}

/// `{<prefix>:breaker:<id>}` and `{…}:window`, prefix and id escaped.
pub fn breaker_keys(prefix: &str, id: &str) -> BreakerKeys {
    let mut hash = String::with_capacity(prefix.len() + id.len() + 12);
    hash.push('{');
    escape_into(&mut hash, prefix);
    hash.push_str(":breaker:");
    escape_into(&mut hash, id);
    hash.push('}');
    let window = format!("{hash}:window");
    BreakerKeys { hash, window }
}

/// Breakers in Redis. Cheap to clone: the connections are the [`RedisConnection`]'s.
#[derive(Debug, Clone)]
pub struct RedisBreakers {
    store: RedisConnection,
    prefix: Arc<str>,
    channel: Arc<str>,
    deadline: Duration,
}

impl RedisBreakers {
    /// Breakers under `key_prefix` (the agents' `--key-prefix`), each call failing with
    /// [`Error::Timeout`] when Redis has not answered within `deadline`.
    pub fn new(store: RedisConnection, key_prefix: impl Into<String>, deadline: Duration) -> Self {
        let prefix: String = key_prefix.into();
        let channel = super::channel(&prefix);
        RedisBreakers { store, prefix: prefix.into(), channel: channel.into(), deadline }
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

    /// The channel transitions are published on.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The keys breaker `id` lives in.
    pub fn keys(&self, id: &str) -> BreakerKeys {
        breaker_keys(&self.prefix, id)
    }

    /// An invocation of `op` on breaker `id`: keys, then op, id, channel, outcomes, params.
    fn invocation(
        &self,
        op: &str,
        id: &str,
        outcomes: Outcomes,
        params: Option<&Params>,
    ) -> ScriptInvocation<'static> {
        let keys = self.keys(id);
        let mut invocation = MACHINE.key(keys.hash);
        invocation
            .key(keys.window)
            .arg(op)
            .arg(id)
            .arg(&*self.channel)
            .arg(outcomes.calls)
            .arg(outcomes.failures)
            .arg(outcomes.slow);
        if let Some(params) = params {
            invocation.arg(params_args(params));
        }
        invocation
    }

    async fn run(&self, invocation: &ScriptInvocation<'_>) -> Result<Vec<Value>, Error> {
        match tokio::time::timeout(self.deadline, self.store.run_script(invocation)).await {
            Ok(reply) => reply,
            Err(_) => Err(Error::Timeout { call: "a breaker call", deadline: self.deadline }),
        }
    }
}

impl BreakerStore for RedisBreakers {
    async fn report(&self, id: &str, params: &Params, outcomes: Outcomes) -> Result<BreakerState, Error> {
        let reply = self.run(&self.invocation("report", id, outcomes.clamped(), Some(params))).await?;
        parse_report(&reply)
    }

    async fn probe(&self, id: &str, params: &Params) -> Result<(bool, BreakerState), Error> {
        let reply = self.run(&self.invocation("probe", id, Outcomes::default(), Some(params))).await?;
        parse_flagged("breaker probe", &reply)
    }

    async fn state(&self, id: &str) -> Result<Option<BreakerState>, Error> {
        let reply = self.run(&self.invocation("state", id, Outcomes::default(), None)).await?;
        let (exists, state) = parse_flagged("breaker state", &reply)?;
        Ok(exists.then_some(state))
    }
}

/// `[state, since, generation, calls, failures, slow, granted, ok]`.
fn parse_report(reply: &[Value]) -> Result<BreakerState, Error> {
    ints::<8>(reply).and_then(BreakerState::from_reply).ok_or_else(|| unexpected("breaker report", reply))
}

/// `[0|1, state, since, generation, calls, failures, slow, granted, ok]`.
fn parse_flagged(script: &'static str, reply: &[Value]) -> Result<(bool, BreakerState), Error> {
    let bad = || unexpected(script, reply);
    let [flag, rest @ ..] = ints::<9>(reply).ok_or_else(bad)?;
    let flag = match flag {
        0 => false,
        1 => true,
        _ => return Err(bad()),
    };
    let state = BreakerState::from_reply(rest).ok_or_else(bad)?;
    Ok((flag, state))
}

#[cfg(test)]
mod tests {
    use super::super::State;
    use super::*;

    fn ints_of(values: &[i64]) -> Vec<Value> {
        values.iter().map(|&i| Value::Int(i)).collect()
    }

    #[test]
    fn keys_share_one_escaped_hash_tag() {
        let keys = breaker_keys("bw", "shop/payments:8080");
        assert_eq!(keys.hash, "{bw:breaker:shop/payments%3A8080}");
        assert_eq!(keys.window, "{bw:breaker:shop/payments%3A8080}:window");
        assert_ne!(breaker_keys("bw", "a:breaker:b").hash, breaker_keys("bw:breaker:a", "b").hash);
    }

    #[test]
    fn the_script_keeps_the_keys_as_long_as_the_memory_twin() {
        assert_eq!(super::super::TTL.as_millis(), 24 * 3600 * 1000);
        assert!(MACHINE_LUA.contains("local TTL_MS = 24 * 3600 * 1000"));
        assert!(MACHINE_LUA.contains(&format!("local TIME_SLOTS = {}", super::super::TIME_SLOTS)));
    }

    #[test]
    fn parses_replies() {
        let state = parse_report(&ints_of(&[1, 5, 2, 0, 0, 0, 0, 0])).unwrap();
        assert_eq!((state.state, state.since_us, state.generation), (State::Open, 5, 2));
        let (admitted, state) = parse_flagged("p", &ints_of(&[1, 2, 5, 3, 0, 0, 0, 1, 0])).unwrap();
        assert!(admitted);
        assert_eq!((state.state, state.probes_granted), (State::HalfOpen, 1));
        for bad in [
            ints_of(&[1, 5, 2]),
            ints_of(&[7, 5, 2, 0, 0, 0, 0, 0]),
            vec![Value::Nil; 8],
            ints_of(&[0, 0, 5, 2, 0, 0, 0, 0, 0, 0]),
        ] {
            let error = parse_report(&bad).unwrap_err();
            assert!(!error.is_transient(), "{error}");
        }
        assert!(parse_flagged("p", &ints_of(&[2, 0, 5, 2, 0, 0, 0, 0, 0])).is_err());
        assert!(parse_flagged("p", &ints_of(&[1, 0, 5, 2, 0, 0, 0, 0])).is_err());
    }
}
