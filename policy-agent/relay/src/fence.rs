//! One active relay per `OutboxRelay`: the replicas contend for a lease in the project's lease
//! store (`breakwater-store`, the agents' Redis) and the holder's fencing token is checked in
//! PostgreSQL, in the transaction that removes the rows it published (`table::Statements::
//! fence`). The token alone makes the guarantee: a holder paused past its lease (or cut off
//! from Redis) still believes it holds, but once a newer holder has committed a batch, the
//! old one's fence update matches no row and its transaction rolls back.
//!
//! [`hold`] keeps the lease: it acquires, renews every third of the TTL, and publishes the
//! token it holds (None while it holds none) on a watch channel the relay loop reads.

use std::time::Duration;

use breakwater_store::lease::{Attempt, LeaseStore};
use tokio::sync::watch;

/// The lease of relay `relay` (`namespace/name`).
pub fn lease_id(relay: &str) -> String {
    format!("outbox/{relay}")
}

/// Holds `lease` as `holder` until `stop`, publishing the token held on `token`.
pub async fn hold<S: LeaseStore>(
    store: S,
    lease: String,
    holder: String,
    ttl: Duration,
    token: watch::Sender<Option<i64>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut floor = 0;
    loop {
        let wait = match store.try_acquire(&lease, &holder, ttl, 1, floor).await {
            Ok(Attempt::Granted(grant)) => {
                floor = grant.fencing_token;
                tracing::info!(
                    lease,
                    holder,
                    token = grant.fencing_token,
                    "relay lease acquired: this replica relays"
                );
                token.send_replace(Some(grant.fencing_token));
                renew(&store, &lease, &holder, grant.fencing_token, ttl, &mut stop).await;
                token.send_replace(None);
                if *stop.borrow() {
                    let _ = store.release(&lease, &holder, grant.fencing_token).await;
                    return;
                }
                tracing::warn!(lease, holder, "relay lease lost: this replica stops relaying");
                Duration::ZERO
            }
            Ok(Attempt::Busy { now_us, free_at_us }) => {
                let until_free = u64::try_from(free_at_us.saturating_sub(now_us)).unwrap_or(0);
                Duration::from_micros(until_free).clamp(Duration::from_millis(50), ttl)
            }
            Err(error) => {
                tracing::warn!(lease, %error, "cannot reach the lease store; retrying");
                ttl / 3
            }
        };
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Renews until a renewal is refused or cannot be made before the grant would lapse, or
/// until `stop`.
async fn renew<S: LeaseStore>(
    store: &S,
    lease: &str,
    holder: &str,
    token: i64,
    ttl: Duration,
    stop: &mut watch::Receiver<bool>,
) {
    let mut deadline = tokio::time::Instant::now() + ttl;
    loop {
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            () = tokio::time::sleep(ttl / 3) => {}
        }
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout_at(deadline, store.renew(lease, holder, token, ttl)).await {
            Ok(Ok(_)) => deadline = sent + ttl,
            Ok(Err(error)) => {
                tracing::warn!(lease, %error, "relay lease renewal refused");
                return;
            }
            Err(_) => return,
        }
    }
}
