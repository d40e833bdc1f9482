//! The active relay's live facts, reported to the agents' Redis every few seconds
//! (`breakwater_store::relay`), where the operator reads them into the `OutboxRelay`'s
//! status: the backlog (one `count(*)` per report, not per batch), the totals, and a reason —
//! `Relaying`, or why not: `PostgresUnreachable`, `TableInvalid`, `SinkRefusing`,
//! `RedisUnreachable`, `Fenced`.

use std::time::{Duration, Instant};

use breakwater_store::{
    RedisConnection,
    relay::{self, RelayReport},
};
use tokio_postgres::Client;

use crate::{error::Error, metrics::Metrics, relay::BatchReport, table::Statements};

/// How often the facts are reported.
pub const EVERY: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub struct Reporter {
    connection: RedisConnection,
    prefix: String,
    relay: String,
    holder: String,
    pending: RelayReport,
    /// Rows refused since the last report, and the last reason.
    refused: u64,
    last_refusal: Option<String>,
    last: Option<Instant>,
}

impl Reporter {
    pub fn new(connection: RedisConnection, prefix: String, relay: String, holder: String) -> Self {
        Reporter {
            connection,
            prefix,
            relay,
            holder,
            pending: RelayReport::default(),
            refused: 0,
            last_refusal: None,
            last: None,
        }
    }

    fn due(&self) -> bool {
        self.last.is_none_or(|last| last.elapsed() >= EVERY)
    }

    /// After a committed batch.
    pub async fn batch(
        &mut self,
        batch: &BatchReport,
        client: &Client,
        statements: &Statements,
        metrics: &Metrics,
    ) {
        self.pending.published += batch.published as u64;
        self.pending.dead_lettered += batch.parked as u64;
        self.refused += batch.failed as u64;
        if batch.last_error.is_some() {
            self.last_refusal.clone_from(&batch.last_error);
        }
        if !self.due() {
            return;
        }
        match self.backlog(client, statements).await {
            Ok((pending, age)) => {
                metrics.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
                metrics.lag_seconds.set(age.as_secs_f64());
                self.pending.pending = pending;
                self.pending.oldest_pending_age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
            }
            Err(error) => return self.failed(&Error::Postgres(error), None).await,
        }
        (self.pending.reason, self.pending.message) = match (&self.last_refusal, self.refused) {
            (Some(error), refused) if refused > 0 => (
                "SinkRefusing".to_string(),
                format!("{refused} publish attempt(s) refused since the last report: {error}"),
            ),
            _ => ("Relaying".to_string(), format!("relayed by {}", self.holder)),
        };
        self.flush().await;
    }

    /// After a failure that committed nothing; the backlog is read when a client is given.
    pub async fn failed(&mut self, error: &Error, open: Option<(&Client, &Statements)>) {
        if !self.due() {
            return;
        }
        if let Some((client, statements)) = open
            && let Ok((pending, age)) = self.backlog(client, statements).await
        {
            self.pending.pending = pending;
            self.pending.oldest_pending_age_ms = u64::try_from(age.as_millis()).unwrap_or(u64::MAX);
        }
        self.pending.reason = error.reason().to_string();
        self.pending.message = error.to_string();
        self.flush().await;
    }

    async fn backlog(
        &self,
        client: &Client,
        statements: &Statements,
    ) -> Result<(u64, Duration), tokio_postgres::Error> {
        let row = client.query_one(&statements.backlog, &[]).await?;
        let count: i64 = row.get(0);
        let age: f64 = row.get(1);
        Ok((u64::try_from(count).unwrap_or(0), Duration::from_secs_f64(age.max(0.0))))
    }

    async fn flush(&mut self) {
        self.pending.holder.clone_from(&self.holder);
        match relay::report(&self.connection, &self.prefix, &self.relay, &self.pending).await {
            Ok(()) => {
                self.pending.published = 0;
                self.pending.dead_lettered = 0;
                self.refused = 0;
                self.last_refusal = None;
                self.last = Some(Instant::now());
            }
            Err(error) => {
                tracing::warn!(relay = self.relay, %error, "cannot report the relay's facts to Redis")
            }
        }
    }
}
