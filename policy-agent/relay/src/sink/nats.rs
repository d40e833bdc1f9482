//! NATS JetStream: each row of a wave is published at once to its subject and counts as
//! published only when the stream that captures the subject acknowledged it (a JetStream
//! publish ack, not a core NATS publish, which nobody acknowledges). The row id goes in
//! `Nats-Msg-Id`, so JetStream itself drops the copy a relay that crashed before its commit
//! publishes again, as long as it comes within the stream's duplicate window (2 minutes by
//! default).
//!
//! The relay never creates or changes streams: their subjects, retention, replicas and
//! duplicate window are the user's. A subject that no stream captures is an error for the
//! rows sent to it (core NATS would drop such a message silently), retried and parked like
//! any other refusal.

use std::time::Duration;

use async_nats::{
    HeaderMap, HeaderName, HeaderValue,
    header::NATS_MESSAGE_ID,
    jetstream::{self, context::PublishErrorKind},
};

use crate::plan::Row;

/// How long one publish may take, from sending to the stream's ack.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct NatsJetStream {
    jetstream: jetstream::Context,
    /// The server URL as configured (it may hold credentials: shown only redacted).
    pub url: String,
    /// Subject template (`{aggregateType}`, `{type}`).
    pub subject: String,
}

impl std::fmt::Debug for NatsJetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsJetStream")
            .field("url", &super::redacted(&self.url))
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl NatsJetStream {
    /// Connects to `url` once; async-nats reconnects by itself afterwards (publishes made
    /// while it is disconnected wait for it, up to their deadline).
    pub async fn connect(url: &str, subject: String) -> Result<Self, async_nats::ConnectError> {
        let client = async_nats::ConnectOptions::new()
            .name("breakwater-relay")
            .event_callback(|event| async move { tracing::info!(%event, "NATS connection") })
            .connect(url)
            .await?;
        let mut jetstream = jetstream::new(client);
        jetstream.set_timeout(PUBLISH_DEADLINE);
        Ok(NatsJetStream { jetstream, url: url.to_string(), subject })
    }

    pub async fn publish(&self, rows: &[&Row]) -> Vec<Result<(), String>> {
        futures::future::join_all(rows.iter().map(|row| self.publish_one(row))).await
    }

    async fn publish_one(&self, row: &Row) -> Result<(), String> {
        let subject = row.destination(&self.subject);
        let published = async {
            let ack = self
                .jetstream
                .publish_with_headers(subject.clone(), headers(row), row.payload.clone().into())
                .await?;
            ack.await
        };
        // The context's timeout bounds the send and the ack separately; this bounds both.
        match tokio::time::timeout(PUBLISH_DEADLINE, published).await {
            Ok(Ok(ack)) => {
                if ack.duplicate {
                    tracing::debug!(id = row.id, stream = ack.stream, "JetStream already had this row");
                }
                Ok(())
            }
            Ok(Err(error)) => Err(match error.kind() {
                PublishErrorKind::StreamNotFound => format!("no stream captures subject {subject}"),
                PublishErrorKind::TimedOut => no_ack(&subject),
                _ => format!("JetStream publish to {subject}: {error}"),
            }),
            Err(_) => Err(no_ack(&subject)),
        }
    }
}

fn no_ack(subject: &str) -> String {
    format!("no JetStream acknowledgement for subject {subject} within {PUBLISH_DEADLINE:?}")
}

/// The row's headers, then the relay's: the id as `Nats-Msg-Id` and the aggregate and type.
/// A row header NATS cannot carry (a name with `:` or control characters, a value with a
/// line break) is left out with a warning: the payload is what the row carries.
fn headers(row: &Row) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in row.header_pairs() {
        match (name.parse::<HeaderName>(), value.parse::<HeaderValue>()) {
            (Ok(name), Ok(value)) => headers.insert(name, value),
            _ => tracing::warn!(id = row.id, header = name, "header left out: NATS cannot carry it"),
        }
    }
    for (name, value) in super::row_headers(row) {
        match value.parse::<HeaderValue>() {
            Ok(value) => headers.insert(name, value),
            Err(_) => tracing::warn!(id = row.id, header = name, "header left out: NATS cannot carry it"),
        }
    }
    headers.insert(NATS_MESSAGE_ID, row.id.as_str());
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_and_the_relays_headers_override_the_rows() {
        let row = crate::sink::row_with_headers(
            r#"{"trace":"abc","Nats-Msg-Id":"forged","Breakwater-Type":"forged","bad:name":"x","multi":"a\r\nb"}"#,
        );
        let headers = headers(&row);
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_string());
        assert_eq!(get("Nats-Msg-Id").as_deref(), Some(row.id.as_str()));
        assert_eq!(get("Breakwater-Type").as_deref(), Some("Created"));
        assert_eq!(get("Breakwater-Aggregate-Type").as_deref(), Some("order"));
        assert_eq!(get("Breakwater-Aggregate-Id").as_deref(), Some("42"));
        assert_eq!(get("trace").as_deref(), Some("abc"));
        assert_eq!(get("multi"), None, "a value with a line break is left out");
        assert_eq!(headers.len(), 5, "bad:name is left out too: {headers:?}");
    }
}
