//! The board's background work, each a loop that ends when `stop` turns true:
//! [`flush`] sends pending outcomes, [`follow`] applies the transitions other agents publish
//! and re-reads the breakers when it may have missed some, [`health`] switches the board to
//! its fallback when Redis has been away for longer than `hold`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_store::breaker::Event;
use breakwater_store::{RedisConnection, RedisTopology, breaker};
use futures::{Stream, StreamExt};
use tokio::sync::watch;

use super::Board;

/// First and longest wait between two subscription attempts.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often [`health`] looks at the connection.
const HEALTH_TICK: Duration = Duration::from_millis(100);

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Flushes pending outcomes every `flush_interval`, and once more when stopping.
pub async fn flush(board: Arc<Board>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(board.settings().flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => board.flush().await,
            () = stopped(&mut stop) => break,
        }
    }
    board.flush().await;
}

/// Subscribes to the breaker events under `prefix` and applies them; re-reads every breaker
/// after each (re)subscription, when breakers are added, and every `refresh`. Without
/// Redis (`topology` None: the memory store) there are no events, only the re-reads.
pub async fn follow(
    board: Arc<Board>,
    topology: Option<RedisTopology>,
    prefix: String,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = FIRST_BACKOFF;
    loop {
        let (events, retry): (Pin<Box<dyn Stream<Item = Event> + Send>>, _) = match &topology {
            None => (Box::pin(futures::stream::pending()), None),
            Some(topology) => match breaker::subscribe(topology, &prefix).await {
                Ok(events) => {
                    backoff = FIRST_BACKOFF;
                    (Box::pin(events), None)
                }
                Err(error) => {
                    tracing::debug!(%error, "cannot subscribe to breaker events; retrying");
                    let retry = backoff;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    (Box::pin(futures::stream::pending()), Some(retry))
                }
            },
        };
        // What was published while this agent was not subscribed is read instead.
        board.refresh().await;
        if !apply_events(&board, events, retry, &mut stop).await {
            return;
        }
    }
}

/// Applies `events` until they end or `retry` has passed (true: subscribe again) or `stop`
/// (false), re-reading the breakers when some are added and every `refresh`.
async fn apply_events(
    board: &Board,
    mut events: Pin<Box<dyn Stream<Item = Event> + Send>>,
    retry: Option<Duration>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let refresh = board.settings().refresh;
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + refresh, refresh);
    let retry = async move {
        match retry {
            Some(after) => tokio::time::sleep(after).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(retry);
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(event) => board.apply(&event),
                None => {
                    tracing::debug!("breaker events ended; resubscribing");
                    return true;
                }
            },
            () = &mut retry => return true,
            () = board.added.notified() => { board.refresh().await; }
            _ = tick.tick() => { board.refresh().await; }
            () = stopped(stop) => return false,
        }
    }
}

/// Watches the Redis connection: once it has been down for longer than `hold`, every
/// breaker answers by its fallback; when it is back, the breakers are re-read first and
/// then follow the shared state again.
pub async fn health(board: Arc<Board>, connection: RedisConnection, mut stop: watch::Receiver<bool>) {
    let hold = board.settings().hold;
    let mut down_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(HEALTH_TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stopped(&mut stop) => return,
        }
        if connection.is_up() {
            if down_since.take().is_some() && board.fallback_active() {
                if board.refresh().await {
                    board.set_fallback(false);
                } else {
                    down_since = Some(Instant::now() - hold);
                }
            }
        } else {
            let since = *down_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= hold {
                board.set_fallback(true);
            }
        }
    }
}
