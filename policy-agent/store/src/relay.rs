//! An outbox relay's live facts, which the active relay writes every few seconds and the
//! operator reads into the `OutboxRelay`'s status: who relays, the backlog, totals, and how
//! the relaying goes (a reason and a message). One hash per relay,
//! `{prefix}:relay:{<namespace/name>}`, written and read by one script each; times are Redis
//! `TIME`, so the operator can tell stale facts from fresh ones without trusting clocks.

use redis::Script;

use crate::{Error, RedisConnection, key::escape_into};

/// What the active relay reports; `published` and `dead_lettered` are added to the totals.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayReport {
    pub holder: String,
    pub pending: u64,
    pub oldest_pending_age_ms: u64,
    pub published: u64,
    pub dead_lettered: u64,
    /// `Relaying`, or why not (`PostgresUnreachable`, `TableInvalid`, `SinkRefusing`, …).
    pub reason: String,
    pub message: String,
}

/// What the operator reads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelayFacts {
    pub holder: String,
    pub pending: u64,
    pub oldest_pending_age_ms: u64,
    pub published: u64,
    pub dead_lettered: u64,
    pub reason: String,
    pub message: String,
    /// Redis time of the last report, and Redis time now, in milliseconds.
    pub reported_at_ms: u64,
    pub now_ms: u64,
}

/// A week without a report drops the facts (a relay that is gone).
const TTL_MS: u64 = 7 * 24 * 3_600_000;

pub fn key(prefix: &str, relay: &str) -> String {
    let mut key = format!("{prefix}:relay:{{");
    escape_into(&mut key, relay);
    key.push('}');
    key
}

const REPORT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'pending', ARGV[2], 'oldestPendingAgeMs', ARGV[3],
  'reason', ARGV[6], 'message', ARGV[7], 'reportedAtMs', now)
redis.call('HINCRBY', KEYS[1], 'published', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'deadLettered', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[8])
return now
";

const READ: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
return {now, redis.call('HGETALL', KEYS[1])}
";

/// Adds one report to the relay's facts.
pub async fn report(
    connection: &RedisConnection,
    prefix: &str,
    relay: &str,
    report: &RelayReport,
) -> Result<(), Error> {
    let script = Script::new(REPORT);
    let mut invocation = script.key(key(prefix, relay));
    invocation
        .arg(&report.holder)
        .arg(report.pending)
        .arg(report.oldest_pending_age_ms)
        .arg(report.published)
        .arg(report.dead_lettered)
        .arg(&report.reason)
        .arg(&report.message)
        .arg(TTL_MS);
    connection.run_script::<i64>(&invocation).await.map(drop)
}

/// The relay's facts, or None when no relay has reported.
pub async fn read(
    connection: &RedisConnection,
    prefix: &str,
    relay: &str,
) -> Result<Option<RelayFacts>, Error> {
    let script = Script::new(READ);
    let invocation = script.key(key(prefix, relay));
    let (now, fields): (u64, Vec<String>) = connection.run_script(&invocation).await?;
    if fields.is_empty() {
        return Ok(None);
    }
    let mut facts = RelayFacts { now_ms: now, ..RelayFacts::default() };
    for pair in fields.chunks(2) {
        let [name, value] = pair else { continue };
        let number = || value.parse::<u64>().unwrap_or(0);
        match name.as_str() {
            "holder" => facts.holder = value.clone(),
            "pending" => facts.pending = number(),
            "oldestPendingAgeMs" => facts.oldest_pending_age_ms = number(),
            "published" => facts.published = number(),
            "deadLettered" => facts.dead_lettered = number(),
            "reason" => facts.reason = value.clone(),
            "message" => facts.message = value.clone(),
            "reportedAtMs" => facts.reported_at_ms = number(),
            _ => {}
        }
    }
    Ok(Some(facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_hash_tag_per_relay() {
        assert_eq!(key("bw", "shop/orders"), "bw:relay:{shop/orders}");
        assert_eq!(key("bw", "a:b"), "bw:relay:{a%3Ab}");
    }
}
