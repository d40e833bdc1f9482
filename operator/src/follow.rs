//! Following a channel the agents' Lua scripts publish on in Redis (lease events, breaker
//! transitions): subscribe, forward every message, and when the subscription ends or cannot
//! be made, subscribe again after a backoff. Pub/sub is at most once, so every
//! (re)subscription is announced: what was published meanwhile is lost, and whoever follows
//! must read everything again.

use std::{future::Future, time::Duration};

use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::lease::StoreError;

/// What a followed channel brings.
#[derive(Debug)]
pub struct Followed<T> {
    /// The messages, as the subscription parsed them.
    pub events: ReceiverStream<T>,
    /// One item after every (re)subscription: messages published while unsubscribed are
    /// lost, so everything must be read again.
    pub resubscribed: ReceiverStream<()>,
}

/// Backoff between subscription attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(10) }
    }
}

/// Subscribes with `subscribe`, forwards every message, and when the subscription ends or
/// cannot be made, subscribes again after a backoff that doubles while attempts fail. Runs
/// until `stop` is cancelled or nobody listens any more. `what` names the channel in logs
/// ("lease events").
pub fn follow<T, F, Fut, S>(
    what: &'static str,
    mut subscribe: F,
    backoff: Backoff,
    stop: CancellationToken,
) -> Followed<T>
where
    T: Send + 'static,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<S, StoreError>> + Send,
    S: Stream<Item = T> + Send,
{
    let (event_tx, event_rx) = mpsc::channel(256);
    let (all_tx, all_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut delay = backoff.initial;
        loop {
            let attempt = tokio::select! {
                () = stop.cancelled() => return,
                attempt = subscribe() => attempt,
            };
            match attempt {
                Ok(events) => {
                    delay = backoff.initial;
                    tracing::info!("following {what}");
                    // A full channel already holds a resync that has not run: one is enough.
                    let _ = all_tx.try_send(());
                    tokio::pin!(events);
                    loop {
                        tokio::select! {
                            () = stop.cancelled() => return,
                            event = events.next() => match event {
                                Some(event) => if event_tx.send(event).await.is_err() { return },
                                None => break,
                            },
                        }
                    }
                    tracing::warn!(retry_in = ?delay, "{what} ended; subscribing again");
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?delay, "cannot subscribe to {what}");
                }
            }
            if event_tx.is_closed() && all_tx.is_closed() {
                return;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = delay.saturating_mul(2).min(backoff.max);
        }
    });
    Followed { events: ReceiverStream::new(event_rx), resubscribed: ReceiverStream::new(all_rx) }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use futures::future::BoxFuture;
    use tokio::time::Instant;

    use super::*;

    /// A scripted subscription: each attempt takes the next outcome (ids then the end, or
    /// an error); after the script, subscriptions stay open without events.
    fn scripted(
        script: Vec<Result<Vec<&'static str>, ()>>,
        attempts: Arc<Mutex<Vec<Instant>>>,
    ) -> impl FnMut() -> BoxFuture<'static, Result<futures::stream::BoxStream<'static, String>, StoreError>>
    + Send
    + 'static {
        let mut script = script.into_iter();
        move || {
            attempts.lock().expect("lock").push(Instant::now());
            let next = script.next();
            Box::pin(async move {
                match next {
                    Some(Ok(ids)) => Ok(futures::stream::iter(ids.into_iter().map(String::from)).boxed()),
                    Some(Err(())) => Err(StoreError::NotConnected),
                    None => Ok(futures::stream::pending().boxed()),
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn events_are_forwarded_and_every_resubscription_asks_for_a_resync() {
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let script = vec![Err(()), Ok(vec!["a/x", "b/y"]), Err(()), Err(()), Ok(vec!["c/z"])];
        let backoff = Backoff { initial: Duration::from_millis(100), max: Duration::from_millis(250) };
        let stop = CancellationToken::new();
        let start = Instant::now();
        let mut followed = follow("test events", scripted(script, attempts.clone()), backoff, stop.clone());

        let ids: Vec<String> = followed.events.by_ref().take(3).collect().await;
        assert_eq!(ids, ["a/x", "b/y", "c/z"]);
        // The resyncs of the 2nd and 5th attempts coalesce (one not yet consumed is enough);
        // the 6th attempt, which stays subscribed, asks again.
        assert_eq!(followed.resubscribed.next().await, Some(()));
        assert_eq!(followed.resubscribed.next().await, Some(()));
        let offsets: Vec<u128> =
            attempts.lock().expect("lock").iter().map(|at| (*at - start).as_millis()).collect();
        // Failures back off 100ms, doubling up to 250ms; an ended subscription is retried
        // after the initial delay, since it had been healthy.
        assert_eq!(offsets, [0, 100, 200, 400, 650, 750]);
        let pending = tokio::time::timeout(Duration::from_secs(60), followed.resubscribed.next()).await;
        assert!(pending.is_err(), "no resync while the subscription holds");

        stop.cancel();
        assert_eq!(followed.events.next().await, None, "the task ends when stopped");
    }
}
