//! Status writes under an ACK storm (`make bench-status`): the 5,000 proxies ACK a
//! change to 20 policies, against a real kube-apiserver and etcd that this benchmark starts
//! for itself (`ControlPlane::start`, so no other test's load shares them), with an operator
//! in cluster mode in this process (`tests/support/storm.rs`, which the real-API-server test
//! runs at 300 proxies and asserts).
//!
//! Reported per fleet: the operator's status writes per policy for the change (from the API
//! server's audit log, checked against its own metric), the ACKs the proxies sent, the time
//! from the change to the last ACK, and from the last ACK to every policy reading
//! `Programmed=True`. The baseline, from the same run: the same storm with 50 proxies (the
//! figures must not grow with the fleet), and the median time of one API write.

// The benchmark uses the storm and the client of the tests' support.
#[allow(dead_code)]
#[path = "../tests/support/cluster.rs"]
mod cluster;
#[allow(dead_code)]
#[path = "../tests/support/storm.rs"]
mod storm;

#[allow(dead_code)]
mod support;

use std::time::Duration;

use breakwater_harness::ControlPlane;
use storm::{Outcome, Storm};

/// The fleet, and the baseline's.
const PROXIES: usize = 5_000;
const BASELINE_PROXIES: usize = 50;
/// The change: 20 policies at once.
const POLICIES: usize = 20;
/// How long each wait may take (5,000 pods and tokens, then their streams, come first).
const DEADLINE: Duration = Duration::from_secs(900);

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench-status: skipped outside `cargo bench` (run `make bench-status`)");
        return;
    }
    println!("command: make bench-status (cargo bench -q -p breakwater-operator --bench status)");
    println!("commit: {}", support::commit());
    // Blocking: it builds the binaries when missing and waits for /readyz.
    let plane = tokio::task::spawn_blocking(ControlPlane::start).await.expect("the control plane starts");
    // Blocking too, before anything else runs on this runtime.
    cluster::install_crds(&plane);
    let client = cluster::client(&plane.kubeconfig).await;
    let mut rows = Vec::new();
    for proxies in [BASELINE_PROXIES, PROXIES] {
        let storm =
            Storm { proxies, policies: POLICIES, waves: 1, wave_gap: Duration::ZERO, deadline: DEADLINE };
        let outcome = storm::run(&plane, client.clone(), storm).await;
        println!("{proxies} proxies: {outcome:?}");
        rows.push((proxies, outcome));
    }
    println!();
    println!(
        "| proxies | status writes per policy (max; mean) | audit log = metric | ACKs | change → last ACK | \
         last ACK → all Programmed=True | one API write | set-up |"
    );
    println!("|---:|---|---|---:|---:|---:|---:|---:|");
    for (proxies, outcome) in &rows {
        row(*proxies, outcome);
    }
    drop(plane);
}

fn row(proxies: usize, outcome: &Outcome) {
    let mean = outcome.writes.values().sum::<usize>() as f64 / outcome.writes.len().max(1) as f64;
    let agree = if outcome.audit_writes as f64 == outcome.metric_writes { "=" } else { "≠" };
    println!(
        "| {proxies} | {} ; {mean:.2} | {} {agree} {} | {} | {:.0} ms | {:.0} ms | {:.1} ms | {:.0} s |",
        outcome.most_writes(),
        outcome.audit_writes,
        outcome.metric_writes,
        outcome.acks,
        outcome.change_to_last_ack.as_secs_f64() * 1e3,
        outcome.last_ack_to_all_true.as_secs_f64() * 1e3,
        outcome.api_write.as_secs_f64() * 1e3,
        outcome.setup.as_secs_f64(),
    );
}
