//! Status writes follow status changes, not ACKs (issue 13): 300 proxies in this process, each
//! an ADS stream presenting its pod's token to an operator in cluster mode, ACK a change to 20
//! policies (`support::storm`), in three waves a second apart. Each policy is written at most
//! twice for that change (Pending at the new generation, then True), the operator's own count
//! agrees with the API server's audit log, and every policy reads `Programmed=True` soon after
//! the last ACK (the figure is printed; the assertion's deadline is generous, as the machine
//! is shared).

use std::time::Duration;

use super::{OPERATOR, admin, plane};
use crate::support::storm::{self, Storm};

/// As many streams as two shared cores carry beside the API server in a test; `make
/// bench-status` runs the 5,000.
const PROXIES: usize = 300;
const POLICIES: usize = 20;

/// The proxies ACK in 3 waves a second apart: longer than the controller's debounce and
/// the ACK batch, so the policies are reconciled while a third or two thirds have ACKed, and
/// those reconciles, which change no verdict, must write nothing. (All at once, the ACKs beat
/// the first reconcile of the change, and one write per policy is all anyone would see.)
const WAVES: usize = 3;
const WAVE_GAP: Duration = Duration::from_secs(1);

/// The target is 2 s from the last ACK; the assertion allows for a loaded machine.
const TRUE_WITHIN: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_storm_writes_each_policy_at_most_twice() {
    let _one_operator = OPERATOR.lock().await;
    let storm = Storm {
        proxies: PROXIES,
        policies: POLICIES,
        waves: WAVES,
        wave_gap: WAVE_GAP,
        deadline: Duration::from_secs(120),
    };
    let outcome = storm::run(plane(), admin().await, storm).await;
    println!(
        "{PROXIES} proxies, {POLICIES} policies: status writes per policy {:?} (audit log {}, metric {}); \
         {} ACKs; change → last ACK {:.0} ms; last ACK → all Programmed=True {:.0} ms \
         (per policy {:?} ms); one API write {:.1} ms; set up in {:.1} s",
        outcome.writes.values().collect::<Vec<_>>(),
        outcome.audit_writes,
        outcome.metric_writes,
        outcome.acks,
        outcome.change_to_last_ack.as_secs_f64() * 1e3,
        outcome.last_ack_to_all_true.as_secs_f64() * 1e3,
        outcome.last_ack_to_true.iter().map(|d| d.as_millis()).collect::<Vec<_>>(),
        outcome.api_write.as_secs_f64() * 1e3,
        outcome.setup.as_secs_f64(),
    );
    assert_eq!(outcome.writes.len(), POLICIES);
    assert!(outcome.most_writes() <= 2, "at most 2 status writes per policy: {:?}", outcome.writes);
    assert!(
        outcome.writes.values().all(|w| *w >= 1),
        "each policy's new generation written: {:?}",
        outcome.writes
    );
    assert_eq!(outcome.audit_writes as f64, outcome.metric_writes, "the metric agrees with the audit log");
    assert!(outcome.acks >= PROXIES, "every proxy ACKed the change: {} ACKs", outcome.acks);
    assert!(
        outcome.last_ack_to_all_true < TRUE_WITHIN,
        "Programmed=True {:?} after the last ACK",
        outcome.last_ack_to_all_true
    );
}
