//! Counters in Redis: each hit is one `EVALSHA` of the algorithm's script on the shared
//! [`RedisConnection`]. The store never blocks a decision on connecting: while there is no
//! connection, hits fail at once with a transient error, and the limiter answers by each
//! rule's failure mode.

use std::sync::LazyLock;

use redis::Script;

use super::{CounterStore, RedisConnection, StoreError};
use crate::algorithm::{FIXED_WINDOW_LUA, Limit, SLIDING_WINDOW_LUA, TOKEN_BUCKET_LUA, Verdict};

struct Scripts {
    token_bucket: Script,
    sliding_window: Script,
    fixed_window: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    token_bucket: Script::new(TOKEN_BUCKET_LUA),
    sliding_window: Script::new(SLIDING_WINDOW_LUA),
    fixed_window: Script::new(FIXED_WINDOW_LUA),
});

fn script(limit: &Limit) -> &'static Script {
    match limit {
        Limit::TokenBucket { .. } => &SCRIPTS.token_bucket,
        Limit::SlidingWindow { .. } => &SCRIPTS.sliding_window,
        Limit::FixedWindow { .. } => &SCRIPTS.fixed_window,
    }
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

    fn is_up(&self) -> bool {
        RedisConnection::is_up(self)
    }

    fn backend(&self) -> &'static str {
        RedisConnection::backend(self)
    }
}
