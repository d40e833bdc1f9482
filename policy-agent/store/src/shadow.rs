//! Shadow-mode counts: how many requests a `RateLimitPolicy` rule in shadow mode would have
//! rejected, per minute, so a team can read it in the policy's status before enforcing.
//! Agents add what they let through; the operator reads the last complete minute.
//!
//! One hash per rule, `{<prefix>:shadow:<rule id>}` (prefix and id escaped): field = minute
//! index (Redis `TIME` in seconds / 60), value = requests. Both scripts read Redis's clock,
//! so agents' and operator's clocks never matter. The key expires [`TTL`] after the last
//! add; each add also drops the minutes before the previous one, or a rule that rejects
//! something every minute would keep every minute forever.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use redis::{Script, Value};

use crate::key::escape_into;
use crate::reply::{ints, unexpected};
use crate::{Error, RedisConnection};

/// How long a rule's counts outlive its last add: the current minute and the one before
/// are all a reader needs.
pub const TTL: Duration = Duration::from_secs(3 * 60);

/// `HINCRBY` the current minute by ARGV[1], drop minutes older than the previous one, expire
/// in ARGV[2] ms. Replies the minute index.
const ADD_LUA: &str = r"
local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60)
redis.call('HINCRBY', KEYS[1], string.format('%d', minute), ARGV[1])
for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
  local m = tonumber(field)
  if not m or m < minute - 1 then
    redis.call('HDEL', KEYS[1], field)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return minute
";

/// Replies `{previous minute index, its count}`.
const LAST_MINUTE_LUA: &str = r"
local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60) - 1
local count = redis.call('HGET', KEYS[1], string.format('%d', minute))
return {minute, tonumber(count or '0')}
";

static ADD: LazyLock<Script> = LazyLock::new(|| Script::new(ADD_LUA));
static LAST_MINUTE: LazyLock<Script> = LazyLock::new(|| Script::new(LAST_MINUTE_LUA));

/// `{<prefix>:shadow:<rule id>}`, prefix and id escaped.
pub fn shadow_key(prefix: &str, rule_id: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + rule_id.len() + 10);
    key.push('{');
    escape_into(&mut key, prefix);
    key.push_str(":shadow:");
    escape_into(&mut key, rule_id);
    key.push('}');
    key
}

/// The start of minute `index` (seconds since the epoch / 60), in µs since the epoch.
pub fn minute_start_us(index: i64) -> i64 {
    index.saturating_mul(60_000_000)
}

/// Shadow counts in Redis. Cheap to clone: the connections are the [`RedisConnection`]'s.
#[derive(Debug, Clone)]
pub struct RedisShadow {
    store: RedisConnection,
    prefix: Arc<str>,
    deadline: Duration,
}

impl RedisShadow {
    /// Counts under `key_prefix` (the agents' `--key-prefix`), each call failing with
    /// [`Error::Timeout`] when Redis has not answered within `deadline`.
    pub fn new(store: RedisConnection, key_prefix: impl Into<String>, deadline: Duration) -> Self {
        RedisShadow { store, prefix: key_prefix.into().into(), deadline }
    }

    pub fn key(&self, rule_id: &str) -> String {
        shadow_key(&self.prefix, rule_id)
    }

    /// Adds `n` requests rule `rule_id` would have rejected to the current minute.
    pub async fn add(&self, rule_id: &str, n: u64) -> Result<(), Error> {
        let mut invocation = ADD.key(self.key(rule_id));
        invocation.arg(n).arg(TTL.as_millis() as u64);
        let _minute: i64 = self.run("shadow add", self.store.run_script(&invocation)).await?;
        Ok(())
    }

    /// The last complete minute (by Redis `TIME`): its start in µs since the epoch, and how
    /// many requests rule `rule_id` would have rejected in it.
    pub async fn last_minute(&self, rule_id: &str) -> Result<(i64, u64), Error> {
        let invocation = LAST_MINUTE.key(self.key(rule_id));
        let reply: Vec<Value> = self.run("shadow read", self.store.run_script(&invocation)).await?;
        match ints::<2>(&reply) {
            Some([minute, count]) if count >= 0 => Ok((minute_start_us(minute), count.unsigned_abs())),
            _ => Err(unexpected("shadow read", &reply)),
        }
    }

    async fn run<T>(
        &self,
        call: &'static str,
        reply: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Error> {
        tokio::time::timeout(self.deadline, reply)
            .await
            .unwrap_or(Err(Error::Timeout { call, deadline: self.deadline }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_escaped_key_per_rule() {
        assert_eq!(shadow_key("bw", "shop/api-per-user:0"), "{bw:shadow:shop/api-per-user%3A0}");
        assert_eq!(minute_start_us(28_333_333), 1_699_999_980_000_000);
    }
}
