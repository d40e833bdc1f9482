//! Where rows are published. Each sink takes the rows of one wave and answers, per row,
//! whether the broker acknowledged it: only then may the row leave the outbox. Every message
//! carries the row's id (a field, a header, an `Idempotency-Key`), so consumers and brokers
//! can drop the duplicates at-least-once delivery implies.
//!
//! - [`redis`]: Redis Streams on the agents' Redis, `XADD` pipelined per wave;
//! - [`nats`]: NATS JetStream, acknowledged by the stream (`Nats-Msg-Id` for its dedup);
//! - [`webhook`]: an HTTP POST per row (`Idempotency-Key`), with a few retries in the wave.

pub mod nats;
pub mod redis;
pub mod webhook;

use crate::plan::Row;

/// The headers every NATS message and webhook call carries besides the row's own: what the
/// Redis sink writes as fields, so a consumer can route without parsing the payload.
pub const AGGREGATE_TYPE_HEADER: &str = "Breakwater-Aggregate-Type";
pub const AGGREGATE_ID_HEADER: &str = "Breakwater-Aggregate-Id";
pub const TYPE_HEADER: &str = "Breakwater-Type";

/// The relay's own headers of `row`, in the order they are set (after the row's headers, so
/// a row cannot pass off other values under these names).
pub fn row_headers(row: &Row) -> [(&'static str, &str); 3] {
    [
        (AGGREGATE_TYPE_HEADER, row.aggregate_type.as_str()),
        (AGGREGATE_ID_HEADER, row.aggregate_id.as_str()),
        (TYPE_HEADER, row.kind.as_str()),
    ]
}

/// The configured sink: one dispatch for the relay loop.
#[derive(Debug)]
pub enum Sink {
    Redis(redis::RedisStreams),
    /// Boxed: the JetStream context is several times the size of the others.
    Nats(Box<nats::NatsJetStream>),
    Webhook(webhook::Webhook),
}

impl Sink {
    /// Publishes `rows` (one wave: no two of one aggregate); one result per row, in order.
    pub async fn publish(&self, rows: &[&Row]) -> Vec<Result<(), String>> {
        match self {
            Sink::Redis(sink) => sink.publish(rows).await,
            Sink::Nats(sink) => sink.publish(rows).await,
            Sink::Webhook(sink) => sink.publish(rows).await,
        }
    }

    /// What the sink is, for logs and status (never credentials).
    pub fn describe(&self) -> String {
        match self {
            Sink::Redis(sink) => format!("Redis stream {}", sink.stream),
            Sink::Nats(sink) => format!("NATS subject {} at {}", sink.subject, redacted(&sink.url)),
            Sink::Webhook(sink) => format!("webhook {}", redacted(&sink.url)),
        }
    }
}

/// `url` without what may be a secret: the user and password before `@`, and the query
/// (webhook URLs often carry a token there). Text, not a parsed URL, so that even a URL no
/// parser accepts is shown without them.
pub fn redacted(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(end);
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let scheme = if scheme.is_empty() { String::new() } else { format!("{scheme}://") };
    format!("{scheme}{host}{path}")
}

/// A row of aggregate `order/42`, type `Created`, with `headers` (JSON), for the sinks' tests.
#[cfg(test)]
fn row_with_headers(headers: &str) -> Row {
    Row {
        id: "0195f0a0-0000-7000-8000-000000000001".into(),
        aggregate_type: "order".into(),
        aggregate_id: "42".into(),
        kind: "Created".into(),
        payload: "{}".into(),
        headers: Some(headers.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_leave_out_credentials_and_queries() {
        assert_eq!(redacted("nats://relay:s3cret@nats.svc:4222"), "nats://nats.svc:4222");
        assert_eq!(redacted("tls://nats.svc:4222"), "tls://nats.svc:4222");
        assert_eq!(
            redacted("https://user:p@ss@hooks.example/in/orders?token=abc#x"),
            "https://hooks.example/in/orders"
        );
        assert_eq!(redacted("http://hooks.example?token=abc"), "http://hooks.example");
        assert_eq!(redacted("nats.svc:4222"), "nats.svc:4222");
    }
}
