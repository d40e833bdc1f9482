//! Counters in Redis: each hit, quota batch or give-back is one `EVALSHA` of the
//! algorithm's script on the shared [`RedisConnection`]. The store never blocks a decision on connecting: while there is no
//! connection, hits fail at once with a transient error, and the limiter answers by each
//! rule's failure mode.

use std::sync::LazyLock;

use redis::Script;

use super::{CounterStore, RedisConnection, StoreError};
use crate::algorithm::{
    FIXED_WINDOW_GIVE_BACK_LUA, FIXED_WINDOW_LUA, FIXED_WINDOW_RESERVE_LUA, Limit, Reservation,
    SLIDING_WINDOW_GIVE_BACK_LUA, SLIDING_WINDOW_LUA, SLIDING_WINDOW_RESERVE_LUA, TOKEN_BUCKET_GIVE_BACK_LUA,
    TOKEN_BUCKET_LUA, TOKEN_BUCKET_RESERVE_LUA, Verdict,
};

/// One algorithm's three scripts: a hit, a batch, a give-back.
struct Scripts {
    hit: Script,
    reserve: Script,
    give_back: Script,
}

impl Scripts {
    fn new(hit: &str, reserve: &str, give_back: &str) -> Self {
        Scripts { hit: Script::new(hit), reserve: Script::new(reserve), give_back: Script::new(give_back) }
    }
}

static TOKEN_BUCKET: LazyLock<Scripts> =
    LazyLock::new(|| Scripts::new(TOKEN_BUCKET_LUA, TOKEN_BUCKET_RESERVE_LUA, TOKEN_BUCKET_GIVE_BACK_LUA));
static SLIDING_WINDOW: LazyLock<Scripts> = LazyLock::new(|| {
    Scripts::new(SLIDING_WINDOW_LUA, SLIDING_WINDOW_RESERVE_LUA, SLIDING_WINDOW_GIVE_BACK_LUA)
});
static FIXED_WINDOW: LazyLock<Scripts> =
    LazyLock::new(|| Scripts::new(FIXED_WINDOW_LUA, FIXED_WINDOW_RESERVE_LUA, FIXED_WINDOW_GIVE_BACK_LUA));

fn scripts(limit: &Limit) -> &'static Scripts {
    match limit {
        Limit::TokenBucket { .. } => &TOKEN_BUCKET,
        Limit::SlidingWindow { .. } => &SLIDING_WINDOW,
        Limit::FixedWindow { .. } => &FIXED_WINDOW,
    }
}

fn script(limit: &Limit) -> &'static Script {
    &scripts(limit).hit
}

/// The SHA1 a limit's script is invoked by (the benchmark loads it into `redis-benchmark`).
pub fn script_sha(limit: &Limit) -> String {
    script(limit).get_hash().to_string()
}

impl CounterStore for RedisConnection {
    async fn hit(&self, key: &str, limit: &Limit, hits: u32) -> Result<Verdict, StoreError> {
        let mut invocation = script(limit).key(key);
        for arg in limit.script_args(hits) {
            invocation.arg(arg);
        }
        let reply: Vec<i64> = self.run_script(&invocation).await?;
        Verdict::from_reply(&reply)
            .ok_or_else(|| StoreError::UnexpectedReply { script: "rate-limit", reply: format!("{reply:?}") })
    }

    async fn reserve(
        &self,
        key: &str,
        limit: &Limit,
        want: u32,
        horizon: std::time::Duration,
    ) -> Result<Reservation, StoreError> {
        let mut invocation = scripts(limit).reserve.key(key);
        let horizon_us = i64::try_from(horizon.as_micros()).unwrap_or(i64::MAX);
        for arg in limit.reserve_args(want, horizon_us) {
            invocation.arg(arg);
        }
        let reply: Vec<i64> = self.run_script(&invocation).await?;
        Reservation::from_reply(&reply)
            .ok_or_else(|| StoreError::UnexpectedReply { script: "quota batch", reply: format!("{reply:?}") })
    }

    async fn give_back(&self, key: &str, limit: &Limit, mark: i64, hits: u32) -> Result<u32, StoreError> {
        let mut invocation = scripts(limit).give_back.key(key);
        for arg in limit.give_back_args(mark, hits) {
            invocation.arg(arg);
        }
        let back: i64 = self.run_script(&invocation).await?;
        u32::try_from(back)
            .map_err(|_| StoreError::UnexpectedReply { script: "quota give-back", reply: back.to_string() })
    }

    fn is_up(&self) -> bool {
        RedisConnection::is_up(self)
    }

    fn backend(&self) -> &'static str {
        RedisConnection::backend(self)
    }
}
