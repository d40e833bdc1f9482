//! Leader election against an in-memory API server, on tokio's paused clock: one holder at a
//! time, takeover only after the lease lapses, and a holder that cannot renew steps down
//! before its lease could pass to another replica.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use breakwater_operator::leader::{Config, LeaderElector};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, api::PostParams};
use kube_fake_client::{ClientBuilder, interceptor};
use tokio::time::{Instant, advance};

const NS: &str = "breakwater-system";

async fn client(api_down: Arc<AtomicBool>) -> Client {
    let (down_replace, down_update) = (api_down.clone(), api_down);
    let funcs = interceptor::Funcs::new()
        .replace(move |_| {
            if down_replace.load(Ordering::SeqCst) {
                return Err(kube_fake_client::Error::Internal("API server unavailable".into()));
            }
            Ok(None)
        })
        .update(move |_| {
            if down_update.load(Ordering::SeqCst) {
                return Err(kube_fake_client::Error::Internal("API server unavailable".into()));
            }
            Ok(None)
        });
    ClientBuilder::new().with_interceptor_funcs(funcs).build().await.expect("fake client")
}

fn elector(client: &Client, identity: &str) -> LeaderElector {
    LeaderElector::new(Api::namespaced(client.clone(), NS), Config::new(identity))
}

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    leases.get("breakwater-operator").await.ok()?.spec?.holder_identity
}

#[tokio::test(start_paused = true)]
async fn one_holder_until_the_lease_lapses() {
    let client = client(Arc::default()).await;
    let (mut a, mut b) = (elector(&client, "a"), elector(&client, "b"));
    assert!(a.try_acquire_or_renew().await.expect("a tries"));
    assert!(!b.try_acquire_or_renew().await.expect("b tries"));

    // a keeps renewing: b never gets in, however long it waits.
    for _ in 0..20 {
        advance(Duration::from_secs(2)).await;
        assert!(a.try_acquire_or_renew().await.expect("a renews"));
        assert!(!b.try_acquire_or_renew().await.expect("b tries"));
    }
    assert_eq!(holder(&client).await.as_deref(), Some("a"));

    // a stops renewing: b takes over only once the record has been unchanged for 15s.
    advance(Duration::from_secs(14)).await;
    assert!(!b.try_acquire_or_renew().await.expect("b tries"));
    advance(Duration::from_secs(2)).await;
    assert!(b.try_acquire_or_renew().await.expect("b takes over"));
    assert_eq!(holder(&client).await.as_deref(), Some("b"));
    assert!(!a.try_acquire_or_renew().await.expect("a sees b"), "a must not win it back while b renews");
}

#[tokio::test(start_paused = true)]
async fn many_candidates_after_a_lapse_one_winner() {
    let client = client(Arc::default()).await;
    let mut dead = elector(&client, "dead");
    assert!(dead.try_acquire_or_renew().await.expect("dead holder"));
    let mut candidates: Vec<LeaderElector> = (0..8).map(|i| elector(&client, &format!("c{i}"))).collect();
    for c in &mut candidates {
        assert!(!c.try_acquire_or_renew().await.expect("observe"));
    }
    advance(Duration::from_secs(16)).await;
    let results = futures::future::join_all(candidates.iter_mut().map(|c| c.try_acquire_or_renew())).await;
    let winners = results.into_iter().filter(|r| matches!(r, Ok(true))).count();
    assert_eq!(winners, 1);
}

#[tokio::test(start_paused = true)]
async fn holder_steps_down_before_its_lease_can_expire() {
    let api_down = Arc::new(AtomicBool::new(false));
    let client = client(api_down.clone()).await;
    let mut leader = elector(&client, "a");
    assert!(leader.try_acquire_or_renew().await.expect("acquire"));
    let last_renewal = Instant::now();
    api_down.store(true, Ordering::SeqCst);
    let error = leader.hold().await;
    let held_for = last_renewal.elapsed();
    assert!(error.to_string().contains("could not renew the lease in time"), "{error}");
    assert!(held_for < Duration::from_secs(15), "stepped down after {held_for:?}, past the 15s lease");
    assert!(held_for >= Duration::from_secs(10), "gave up too early: {held_for:?}");
}

#[tokio::test(start_paused = true)]
async fn holder_notices_a_takeover_and_release_hands_over_at_once() {
    let client = client(Arc::default()).await;
    let mut a = elector(&client, "a");
    assert!(a.try_acquire_or_renew().await.expect("acquire"));
    a.release().await.expect("release");
    assert_eq!(holder(&client).await, None);
    let mut b = elector(&client, "b");
    assert!(b.try_acquire_or_renew().await.expect("vacant lease is taken at once"));

    // Someone rewrites the Lease behind a's back: hold() reports it.
    let leases: Api<Lease> = Api::namespaced(client.clone(), NS);
    assert!(!a.try_acquire_or_renew().await.expect("a sees b"));
    let mut lease = leases.get("breakwater-operator").await.expect("lease");
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some("a".into());
    }
    leases.replace("breakwater-operator", &PostParams::default(), &lease).await.expect("hand to a");
    assert!(a.try_acquire_or_renew().await.expect("a holds"));
    let mut lease = leases.get("breakwater-operator").await.expect("lease");
    if let Some(spec) = lease.spec.as_mut() {
        spec.holder_identity = Some("intruder".into());
    }
    leases.replace("breakwater-operator", &PostParams::default(), &lease).await.expect("intruder");
    let error = a.hold().await;
    assert!(error.to_string().contains("another replica took the lease"), "{error}");
}
