//! The clock of the in-memory stores, which stand in for Redis `TIME`: µs since the Unix
//! epoch. [`TokioClock`] follows `tokio::time::Instant` from a wall-clock origin, so a test
//! under tokio's paused clock controls expiry; any `Fn() -> i64` is a clock too, which is
//! how a conformance test makes an in-memory twin follow a real Redis's `TIME`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// A source of µs since the Unix epoch.
pub trait Clock: Send + Sync + 'static {
    fn now_us(&self) -> i64;
}

impl<F: Fn() -> i64 + Send + Sync + 'static> Clock for F {
    fn now_us(&self) -> i64 {
        self()
    }
}

/// A shared clock closure, as the agent's in-memory counters hold theirs.
impl Clock for std::sync::Arc<dyn Fn() -> i64 + Send + Sync> {
    fn now_us(&self) -> i64 {
        self()
    }
}

/// The wall clock when created, advanced by `tokio::time::Instant` from then on.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    origin: Instant,
    origin_us: i64,
}

impl TokioClock {
    pub fn new() -> Self {
        let origin_us = SystemTime::now().duration_since(UNIX_EPOCH).map(micros).unwrap_or(0);
        TokioClock { origin: Instant::now(), origin_us }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now_us(&self) -> i64 {
        let elapsed = Instant::now().saturating_duration_since(self.origin);
        self.origin_us.saturating_add(micros(elapsed))
    }
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn follows_the_paused_clock() {
        let clock = TokioClock::new();
        let start = clock.now_us();
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.now_us() - start, 1_500_000);
        let fixed = || 42;
        assert_eq!(fixed.now_us(), 42);
        let shared: std::sync::Arc<dyn Fn() -> i64 + Send + Sync> = std::sync::Arc::new(|| 7);
        assert_eq!(shared.now_us(), 7);
    }
}
