//! Where rows are published. Each sink takes the rows of one wave and answers, per row,
//! whether the broker acknowledged it: only then may the row leave the outbox. Every message
//! carries the row's id (a field, a header, an `Idempotency-Key`), so consumers and brokers
//! can drop the duplicates at-least-once delivery implies.

pub mod redis;

use crate::plan::Row;

/// The configured sink: one dispatch for the relay loop.
#[derive(Debug)]
pub enum Sink {
    Redis(redis::RedisStreams),
}

impl Sink {
    /// Publishes `rows` (one wave: no two of one aggregate); one result per row, in order.
    pub async fn publish(&self, rows: &[&Row]) -> Vec<Result<(), String>> {
        match self {
            Sink::Redis(sink) => sink.publish(rows).await,
        }
    }

    /// What the sink is, for logs and status (never credentials).
    pub fn describe(&self) -> String {
        match self {
            Sink::Redis(sink) => format!("Redis stream {}", sink.stream),
        }
    }
}
