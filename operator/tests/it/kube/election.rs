//! Leader election (`breakwater_operator::leader`) on a real `coordination.k8s.io` Lease, in
//! real time with a shortened lease: one holder at a time; a takeover only once the record
//! has stayed unchanged for the lease duration on the candidate's own clock, counted from
//! when the candidate saw it; exactly one winner when many race for a lapsed lease (the
//! server's resourceVersion check decides); a released lease is taken at once and a holder
//! notices a takeover; a holder that cannot reach the API server steps down before its lease
//! could pass to another replica. Each test keeps its Lease in a namespace of its own; the
//! step-down test freezes an API server, so it runs on a private control plane.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use breakwater_harness::ControlPlane;
use breakwater_operator::leader::{Config, LeaderElector};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Namespace,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::PostParams,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
    task::JoinHandle,
    time::Instant,
};

use super::{DEADLINE, admin, eventually, namespace, plane};

/// Whole seconds: the Lease records `leaseDurationSeconds`, and candidates judge by it.
const LEASE: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(500);
/// The Lease's name (`Config::new`'s).
const NAME: &str = "breakwater-operator";

fn elector(client: &Client, ns: &str, identity: &str) -> LeaderElector {
    let config = Config { lease_duration: LEASE, retry_period: RETRY, ..Config::new(identity) };
    LeaderElector::new(Api::namespaced(client.clone(), ns), config)
}

async fn lease(client: &Client, ns: &str) -> LeaseSpec {
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
    leases.get(NAME).await.expect("the Lease exists").spec.unwrap_or_default()
}

/// Has `elector` try every retry period until it wins, for at most `within`; returns when its
/// winning attempt returned. (Waiting for a lease to lapse is waiting on time itself.)
async fn first_win(elector: &mut LeaderElector, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if elector.try_acquire_or_renew().await.expect("the candidate tries") {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the candidate did not get the lease within {within:?}");
        tokio::time::sleep(RETRY).await;
    }
}

#[tokio::test]
async fn one_holder_until_the_lease_lapses() {
    let (client, ns) = (admin().await, namespace("election", &[]));
    let (mut a, mut b) = (elector(&client, &ns, "a"), elector(&client, &ns, "b"));
    assert!(a.try_acquire_or_renew().await.expect("a tries"), "a takes the vacant lease");
    assert!(!b.try_acquire_or_renew().await.expect("b tries"), "b got a held lease");

    // a renews every retry period for two lease durations: b, trying as often, never gets in.
    let mut renewed = Instant::now();
    let until = renewed + 2 * LEASE;
    while Instant::now() < until {
        tokio::time::sleep(RETRY).await;
        assert!(a.try_acquire_or_renew().await.expect("a renews"), "a lost the lease it renews");
        renewed = Instant::now();
        assert!(!b.try_acquire_or_renew().await.expect("b tries"), "b got in while a renewed");
    }
    assert_eq!(lease(&client, &ns).await.holder_identity.as_deref(), Some("a"));

    // a stops renewing: b takes over only once the record has stayed unchanged for the lease
    // duration on b's clock, and b saw a's last renewal only after it was written.
    let won = first_win(&mut b, 3 * LEASE).await;
    let takeover = won - renewed;
    eprintln!("takeover {takeover:?} after a's last renewal (lease {LEASE:?}, retry {RETRY:?})");
    assert!(takeover >= LEASE, "b took over {takeover:?} after a's last renewal, within the {LEASE:?} lease");
    assert!(takeover < LEASE + 4 * RETRY, "b took over only {takeover:?} after a's last renewal");
    let spec = lease(&client, &ns).await;
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1), "one change of holder");

    // b renews, a keeps trying for longer than a lease: a must not win it back.
    let until = Instant::now() + LEASE + 2 * RETRY;
    while Instant::now() < until {
        assert!(!a.try_acquire_or_renew().await.expect("a tries"), "a won the lease back from b");
        tokio::time::sleep(RETRY).await;
        assert!(b.try_acquire_or_renew().await.expect("b renews"), "b lost the lease it renews");
    }
    assert_eq!(lease(&client, &ns).await.holder_identity.as_deref(), Some("b"));
}

#[tokio::test]
async fn a_lapse_is_timed_from_when_the_candidate_saw_the_record() {
    let (client, ns) = (admin().await, namespace("election", &[]));
    let gate = Gate::start(&plane().server, Hold::Requests).await;
    let mut a = elector(&client, &ns, "a");
    let mut b = elector(&gate.client(&plane().kubeconfig).await, &ns, "b");
    assert!(a.try_acquire_or_renew().await.expect("a tries"), "a takes the vacant lease");
    assert!(!b.try_acquire_or_renew().await.expect("b tries"), "b got a held lease");

    // b starts an attempt whose read reaches the server only half a lease later (a slow
    // network, a busy server), and a renews just before it does: b's read returns a record
    // written long after b's attempt began.
    gate.close();
    let attempt = tokio::spawn(async move {
        let seen = b.try_acquire_or_renew().await;
        (b, seen)
    });
    eventually("b's read of the Lease is held back", DEADLINE, || async {
        if gate.holding() == 1 { Ok(()) } else { Err(format!("{} held", gate.holding())) }
    })
    .await;
    // Time passing is the point here (the gap between b's attempt and a's renewal), not a
    // wait for something to happen.
    tokio::time::sleep(LEASE / 2).await;
    assert!(a.try_acquire_or_renew().await.expect("a renews"), "a lost the lease it renews");
    let renewed = Instant::now();
    gate.open();
    let (mut b, seen) = attempt.await.expect("b's attempt");
    assert!(!seen.expect("b tries"), "b got a lease a had just renewed");

    // The record b saw is a's renewal, new to b when its read returned: b must wait a whole
    // lease from then, not from when its attempt began.
    let won = first_win(&mut b, 3 * LEASE).await;
    let takeover = won - renewed;
    eprintln!("takeover {takeover:?} after a's renewal, which b's delayed read returned");
    assert!(takeover >= LEASE, "b took over {takeover:?} after a's renewal, within the {LEASE:?} lease");
    assert!(takeover < LEASE + 4 * RETRY, "b took over only {takeover:?} after a's renewal");
}

#[tokio::test]
async fn many_candidates_after_a_lapse_one_winner() {
    let (client, ns) = (admin().await, namespace("election", &[]));
    let gate = Gate::start(&plane().server, Hold::Responses).await;
    let mut dead = elector(&client, &ns, "dead");
    assert!(dead.try_acquire_or_renew().await.expect("the first holder tries"));
    // Eight candidates, each with a client (a connection) of its own, see the holder.
    let mut candidates = Vec::new();
    for i in 0..8 {
        let mut candidate = elector(&gate.client(&plane().kubeconfig).await, &ns, &format!("c{i}"));
        assert!(!candidate.try_acquire_or_renew().await.expect("a candidate tries"), "c{i} got a held lease");
        candidates.push((format!("c{i}"), candidate));
    }
    // The holder is gone; the lease lapses on every candidate's clock.
    tokio::time::sleep_until(Instant::now() + LEASE).await;

    // All race at once. Their reads are answered but held back until every candidate has
    // one, so all of them read the same lapsed record and all write: the server's
    // resourceVersion check must let exactly one write through, and the others must lose.
    gate.close();
    let race: Vec<_> = candidates
        .into_iter()
        .map(|(id, mut candidate)| tokio::spawn(async move { (id, candidate.try_acquire_or_renew().await) }))
        .collect();
    eventually("every candidate's read is answered and held back", DEADLINE, || async {
        if gate.holding() == 8 { Ok(()) } else { Err(format!("{} of 8 held", gate.holding())) }
    })
    .await;
    gate.open();
    let mut winners = Vec::new();
    for attempt in race {
        let (id, result) = attempt.await.expect("a candidate's attempt");
        match result {
            Ok(true) => winners.push(id),
            Ok(false) => {}
            Err(err) => panic!("{id}: a lost race must be a plain loss, not an error: {err}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let spec = lease(&client, &ns).await;
    assert_eq!(spec.holder_identity.as_ref(), winners.first(), "the Lease names the one winner");
    assert_eq!(spec.lease_transitions, Some(1), "one change of holder");
}

#[tokio::test]
async fn release_hands_over_at_once_and_a_holder_notices_a_takeover() {
    let (client, ns) = (admin().await, namespace("election", &[]));
    let mut a = elector(&client, &ns, "a");
    assert!(a.try_acquire_or_renew().await.expect("a tries"), "a takes the vacant lease");
    a.release().await.expect("release");
    assert_eq!(lease(&client, &ns).await.holder_identity, None);
    let mut b = elector(&client, &ns, "b");
    assert!(b.try_acquire_or_renew().await.expect("b tries"), "a released lease is taken at once");
    assert!(!a.try_acquire_or_renew().await.expect("a tries"), "a got the lease b holds");

    // The Lease is handed to a behind b's back: a holds it.
    let leases: Api<Lease> = Api::namespaced(client.clone(), &ns);
    let rewrite = |holder: &'static str| {
        let leases = leases.clone();
        async move {
            let mut lease = leases.get(NAME).await.expect("the Lease");
            lease.spec.get_or_insert_with(LeaseSpec::default).holder_identity = Some(holder.into());
            leases.replace(NAME, &PostParams::default(), &lease).await.expect("rewrite the Lease");
        }
    };
    rewrite("a").await;
    assert!(a.try_acquire_or_renew().await.expect("a tries"), "a renews a lease that names it");

    // Another replica writes itself in while a holds it: hold() reports it.
    rewrite("intruder").await;
    let started = Instant::now();
    let error = tokio::time::timeout(LEASE, a.hold()).await.expect("hold() notices within a lease");
    assert!(error.to_string().contains("another replica took the lease"), "{error}");
    let noticed = started.elapsed();
    assert!(noticed < LEASE - RETRY, "noticed only after {noticed:?}, when it would step down anyway");
    assert_eq!(lease(&client, &ns).await.holder_identity.as_deref(), Some("intruder"));
}

#[tokio::test]
async fn holder_steps_down_before_its_lease_can_expire() {
    // A control plane of its own: this test freezes its API server.
    let plane = tokio::task::spawn_blocking(ControlPlane::start).await.expect("a private control plane");
    let client = super::client(&plane.kubeconfig).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = Namespace {
        metadata: ObjectMeta { name: Some("election".into()), ..ObjectMeta::default() },
        ..Namespace::default()
    };
    namespaces.create(&PostParams::default(), &ns).await.expect("create the namespace");
    let mut leader = elector(&client, "election", "a");
    let attempted = Instant::now();
    assert!(leader.try_acquire_or_renew().await.expect("a tries"), "a takes the vacant lease");
    let renewed = Instant::now();

    // The API server hangs: connections stay open, nothing is answered.
    plane.pause_apiserver();
    let held = tokio::time::timeout(3 * LEASE, leader.hold()).await;
    let stepped_down = Instant::now();
    plane.resume_apiserver();
    let error = held.unwrap_or_else(|_| {
        panic!("hold() had not returned {:?} after the last renewal; the lease had lapsed", 3 * LEASE)
    });
    assert!(error.to_string().contains("could not renew the lease in time"), "{error}");
    // The renewal was written somewhere between `attempted` and `renewed`; another replica can
    // take over a lease after it from then on.
    let (since_attempt, since_renewal) = (stepped_down - attempted, stepped_down - renewed);
    eprintln!("stepped down {since_renewal:?} after the last renewal (lease {LEASE:?}, retry {RETRY:?})");
    assert!(since_attempt < LEASE, "stepped down {since_attempt:?} after the last renewal, past the lease");
    assert!(
        since_renewal >= LEASE - 2 * RETRY,
        "gave up too early: {since_renewal:?} after the last renewal"
    );

    // Unfrozen, the API server answers again; the Lease still names a, which stopped leading.
    let spec = lease(&client, "election").await;
    assert_eq!(spec.holder_identity.as_deref(), Some("a"));
    tokio::task::spawn_blocking(move || drop(plane)).await.expect("stop the private control plane");
}

/// Which way a [`Gate`] holds bytes back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Requests sent but not yet received by the API server.
    Requests,
    /// Answers given but not yet received by the client.
    Responses,
}

/// A TCP proxy in front of the API server (TLS passes through untouched) that can hold back
/// the bytes going one way on every connection, for as long as it is closed.
struct Gate {
    url: String,
    /// The API server's host, which its certificate names.
    host: String,
    open: watch::Sender<bool>,
    /// How many connections have bytes held back now.
    held: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Gate {
    async fn start(server: &str, hold: Hold) -> Self {
        let authority = server.trim_start_matches("https://").trim_end_matches('/').to_string();
        let host = authority.rsplit_once(':').map_or(authority.as_str(), |(host, _)| host).to_string();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the gate");
        let url = format!("https://{}", listener.local_addr().expect("the gate's address"));
        let (open, _) = watch::channel(true);
        let held = Arc::new(AtomicUsize::new(0));
        let (gate, count) = (open.clone(), held.clone());
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(upstream) = TcpStream::connect(authority.as_str()).await else { continue };
                let (from_client, to_client) = inbound.into_split();
                let (from_server, to_server) = upstream.into_split();
                let gated = Some((gate.subscribe(), count.clone()));
                let (requests, responses) =
                    if hold == Hold::Requests { (gated, None) } else { (None, gated) };
                tokio::spawn(pipe(from_client, to_server, requests));
                tokio::spawn(pipe(from_server, to_client, responses));
            }
        });
        Gate { url, host, open, held, accept }
    }

    /// A client for `kubeconfig`'s cluster that connects through the gate.
    async fn client(&self, kubeconfig: &Path) -> Client {
        breakwater_operator::run::install_tls_provider();
        let file = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
            .await
            .expect("a config from the kubeconfig");
        config.cluster_url = self.url.parse().expect("the gate's URL");
        config.tls_server_name.get_or_insert_with(|| self.host.clone());
        Client::try_from(config).expect("a client through the gate")
    }

    fn close(&self) {
        self.open.send_replace(false);
    }

    fn open(&self) {
        self.open.send_replace(true);
    }

    fn holding(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open.send_replace(true);
        self.accept.abort();
    }
}

/// Copies `from` to `to`, holding each read back while the gate (if any) is closed.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut gate: Option<(watch::Receiver<bool>, Arc<AtomicUsize>)>,
) {
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        if let Some((open, held)) = gate.as_mut()
            && !*open.borrow()
        {
            held.fetch_add(1, Ordering::SeqCst);
            let released = open.wait_for(|open| *open).await.is_ok();
            held.fetch_sub(1, Ordering::SeqCst);
            if !released {
                break;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
