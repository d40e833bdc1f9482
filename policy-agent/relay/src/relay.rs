//! The relay loop. While this replica holds the relay's lease it runs batches, each one
//! PostgreSQL transaction:
//!
//! 1. hold the fence with this replica's token (`UPDATE … WHERE token <= $token`): no row
//!    means a newer holder committed, and the replica stops;
//! 2. read up to `batchSize` pending rows in order, leaving out aggregates in backoff;
//! 3. publish them wave by wave ([`crate::plan`]); a row counts as published only once the
//!    sink acknowledged it;
//! 4. remove (or mark) the published rows, count the failed attempts, park the rows that
//!    reached `maxAttempts` in the dead-letter table (their aggregate moves on), and put the
//!    aggregates of the others in backoff;
//! 5. commit.
//!
//! A crash anywhere before the commit leaves every row in the table: it is published again
//! (at least once; consumers drop duplicates by id). The fence row is locked from step 1 to
//! the commit, so a former holder that resumes waits for the newer one's transaction, then
//! finds the fence above its token.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use breakwater_api::outbox_relay::{AfterPublish, Delivery};
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::{
    error::{Error, Result},
    metrics::Metrics,
    plan::{self, Row},
    report::Reporter,
    sink::Sink,
    table::{self, Layout, Statements},
};

/// What one relay relays.
#[derive(Clone, Debug)]
pub struct Relay {
    /// `namespace/name` of the OutboxRelay: the fence row and the attempts are keyed by it.
    pub name: String,
    pub table: String,
    pub delivery: Delivery,
    /// The relay lease's TTL: it bounds how long a stalled session may hold the fence.
    pub lease_ttl: Duration,
}

impl Relay {
    fn mark_published(&self) -> bool {
        self.delivery.after_publish == AfterPublish::MarkPublished
    }

    fn poll_interval(&self) -> Duration {
        self.delivery.poll_interval.to_std().unwrap_or(Duration::from_millis(500))
    }
}

/// Aggregates whose head row failed, and until when they wait.
#[derive(Debug, Default)]
struct Backoff(HashMap<String, Instant>);

impl Backoff {
    fn blocked(&mut self, now: Instant) -> Vec<String> {
        self.0.retain(|_, until| *until > now);
        self.0.keys().cloned().collect()
    }

    /// `attempts` failures so far: wait `base · 2^(attempts-1)`, at most 30 s, ±25% jitter
    /// (so aggregates that failed together do not retry together).
    fn delay(base: Duration, attempts: i32) -> Duration {
        let exponent = u32::try_from(attempts.saturating_sub(1)).unwrap_or(0).min(16);
        let delay = base.saturating_mul(1 << exponent).min(Duration::from_secs(30));
        delay.mul_f64(0.75 + fastrand::f64() * 0.5)
    }
}

/// Connects and checks the table: the statements for its layout.
pub async fn connect(url: &str, relay: &Relay) -> Result<(Client, Statements)> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "PostgreSQL connection closed");
        }
    });
    // A holder that stops (SIGSTOP, a partition) inside a transaction holds the fence row's
    // lock: PostgreSQL ends its session after two lease TTLs, so the next holder waits at most
    // that long, and a holder never waits on the fence for more than one TTL before retrying.
    let ttl_ms = relay.lease_ttl.as_millis();
    client
        .batch_execute(&format!(
            "SET idle_in_transaction_session_timeout = {}; SET lock_timeout = {ttl_ms}",
            ttl_ms * 2
        ))
        .await?;
    for statement in table::setup() {
        client.batch_execute(&statement).await?;
    }
    client.execute(table::FENCE_ROW, &[&relay.name]).await?;
    if let Some(dlq) = &relay.delivery.dead_letter_table {
        client.batch_execute(&table::dead_letter_table(dlq)).await?;
    }
    let (schema, name) = table::split(&relay.table);
    let columns: Vec<String> =
        client.query(table::COLUMNS, &[&schema, &name]).await?.iter().map(|row| row.get(0)).collect();
    let invalid = |problem: String| Error::Table { table: relay.table.clone(), problem };
    if columns.is_empty() {
        return Err(invalid("does not exist".to_string()));
    }
    let layout = Layout::check(&columns, relay.mark_published()).map_err(invalid)?;
    let statements = table::statements(
        &relay.table,
        relay.delivery.dead_letter_table.as_deref(),
        layout,
        relay.mark_published(),
    );
    Ok((client, statements))
}

/// What one batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchReport {
    pub read: usize,
    pub published: usize,
    pub failed: usize,
    pub parked: usize,
    /// What the sink said about the last row it refused.
    pub last_error: Option<String>,
}

/// One batch, as the module comment says.
async fn batch(
    client: &mut Client,
    statements: &Statements,
    relay: &Relay,
    sink: &Sink,
    token: i64,
    backoff: &mut Backoff,
) -> Result<BatchReport> {
    let tx = client.transaction().await?;
    if tx.query_opt(&statements.fence, &[&relay.name, &token]).await?.is_none() {
        return Err(Error::Fenced { token });
    }
    let blocked = backoff.blocked(Instant::now());
    let limit = i64::from(relay.delivery.batch_size);
    let rows: Vec<Row> = tx
        .query(&statements.select, &[&limit, &blocked])
        .await?
        .iter()
        .map(|row| Row {
            id: row.get(0),
            aggregate_type: row.get(1),
            aggregate_id: row.get(2),
            kind: row.get(3),
            payload: row.get(4),
            headers: row.get(5),
        })
        .collect();
    let outcome =
        plan::run(&rows, relay.delivery.ordering, |wave| async move { sink.publish(&wave).await }).await;
    let mut report =
        BatchReport { read: rows.len(), published: outcome.published.len(), ..BatchReport::default() };
    if !outcome.published.is_empty() {
        tx.execute(&statements.done, &[&outcome.published]).await?;
        tx.execute(&statements.forget, &[&relay.name, &outcome.published]).await?;
    }
    if !outcome.failed.is_empty() {
        let (ids, errors): (Vec<String>, Vec<String>) = outcome.failed.iter().cloned().unzip();
        let counted = tx.query(&statements.attempt, &[&relay.name, &ids, &errors]).await?;
        let attempts: HashMap<String, i32> = counted.iter().map(|row| (row.get(0), row.get(1))).collect();
        let max = i32::try_from(relay.delivery.max_attempts).unwrap_or(i32::MAX);
        let exhausted: Vec<String> =
            ids.iter().filter(|id| attempts.get(*id).is_some_and(|n| *n >= max)).cloned().collect();
        let parked = match &statements.park {
            Some(park) if !exhausted.is_empty() => {
                tx.execute(park, &[&relay.name, &exhausted]).await?;
                tx.execute(&statements.remove, &[&exhausted]).await?;
                tx.execute(&statements.forget, &[&relay.name, &exhausted]).await?;
                exhausted
            }
            _ => Vec::new(),
        };
        report.failed = outcome.failed.len();
        report.parked = parked.len();
        report.last_error = outcome.failed.last().map(|(_, error)| error.clone());
        for row in rows.iter().filter(|row| ids.contains(&row.id) && !parked.contains(&row.id)) {
            let delay = Backoff::delay(relay.poll_interval(), attempts.get(&row.id).copied().unwrap_or(1));
            if relay.delivery.ordering == breakwater_api::outbox_relay::Ordering::PerAggregate {
                backoff.0.insert(row.aggregate(), Instant::now() + delay);
            }
        }
        for (id, error) in &outcome.failed {
            tracing::warn!(relay = relay.name, id, error, attempts = attempts.get(id), "publish failed");
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// Relays while `token` holds a token, until `stop`. Errors are reported on `health` and
/// retried after a pause; only [`Error::Fenced`] is left to the lease to resolve.
pub async fn run(
    url: String,
    relay: Relay,
    sink: Arc<Sink>,
    mut token: watch::Receiver<Option<i64>>,
    metrics: Arc<Metrics>,
    mut reporter: Reporter,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::default();
    let mut connection: Option<(Client, Statements)> = None;
    loop {
        let held = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            held = token.wait_for(Option::is_some) => held.map(|t| *t).ok().flatten(),
        };
        let Some(held) = held else { return };
        let (client, statements) = match connection.as_mut() {
            Some(open) if !open.0.is_closed() => open,
            _ => match connect(&url, &relay).await {
                Ok(open) => connection.insert(open),
                Err(error) => {
                    metrics.report_error(&error);
                    reporter.failed(&error, None).await;
                    tracing::warn!(relay = relay.name, %error, "cannot relay; retrying");
                    pause(&mut stop, relay.poll_interval().max(Duration::from_secs(1))).await;
                    continue;
                }
            },
        };
        let started = Instant::now();
        match batch(client, statements, &relay, &sink, held, &mut backoff).await {
            Ok(report) => {
                metrics.record(&report, started.elapsed());
                reporter.batch(&report, client, statements, &metrics).await;
                if report.read < relay.delivery.batch_size as usize {
                    pause(&mut stop, relay.poll_interval()).await;
                }
            }
            Err(error) => {
                metrics.report_error(&error);
                reporter.failed(&error, Some((&*client, &*statements))).await;
                tracing::warn!(relay = relay.name, %error, "batch not committed; its rows stay in the table");
                if matches!(error, Error::Postgres(_)) {
                    connection = None;
                }
                pause(&mut stop, relay.poll_interval().max(Duration::from_millis(200))).await;
            }
        }
    }
}

async fn pause(stop: &mut watch::Receiver<bool>, duration: Duration) {
    tokio::select! {
        _ = stop.wait_for(|stop| *stop) => {}
        () = tokio::time::sleep(duration) => {}
    }
}

/// Moves every parked row of `relay` back into the outbox, as new rows at the end of their
/// aggregates; the number moved.
pub async fn replay(url: &str, relay: &Relay) -> Result<u64> {
    let (client, statements) = connect(url, relay).await?;
    let Some(replay) = &statements.replay else {
        return Err(Error::Spec("the relay has no deadLetterTable: nothing is parked".to_string()));
    };
    let moved = client.execute(replay, &[]).await?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_thirty_seconds_with_jitter() {
        let base = Duration::from_millis(100);
        for (attempts, nominal) in [(1, 100), (2, 200), (5, 1_600), (20, 30_000)] {
            let delay = Backoff::delay(base, attempts).as_millis() as f64;
            let nominal = nominal as f64;
            assert!(delay >= nominal * 0.75 && delay <= nominal * 1.25, "{attempts}: {delay}");
        }
    }

    #[test]
    fn an_aggregate_waits_until_its_time() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        backoff.0.insert("order/1".into(), now + Duration::from_secs(1));
        assert_eq!(backoff.blocked(now), ["order/1"]);
        assert!(backoff.blocked(now + Duration::from_secs(2)).is_empty());
    }
}
