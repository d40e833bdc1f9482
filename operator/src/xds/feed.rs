//! Keeps the snapshot cache fed: after each burst of changes it reads the inventory again,
//! compiles what does not depend on the proxy once and publishes it. It knows nothing of
//! Kubernetes: it is handed the changes to follow and a way to read the inventory. In a
//! cluster it runs on every replica, leader or not, so that a standby that takes over the
//! ADS streams has its snapshots compiled already.

use std::{sync::Arc, time::Duration};

use futures::{Stream, StreamExt};

use super::SnapshotCache;
use crate::{compile::Compiled, inventory::Inventory};

/// How long to wait for a burst of changes to settle before recompiling.
const SETTLE: Duration = Duration::from_millis(200);

/// Publishes a compilation of `inventory()` after every burst of `changes`, until
/// `shutdown` resolves or the changes end.
pub async fn run(
    changes: impl Stream<Item = ()>,
    inventory: impl Fn() -> Inventory,
    cache: Arc<SnapshotCache>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(changes);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            change = changes.next() => if change.is_none() { return },
        }
        // Let the burst settle, draining what else arrives meanwhile.
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                () = &mut settle => break,
                change = changes.next() => if change.is_none() { return },
            }
        }
        cache.publish(Compiled::new(&inventory()));
    }
}
