//! Cluster mode: health and metrics endpoints, the xDS server and its feed, leader
//! election, and the four controllers. Every replica runs the feed and keeps its snapshots
//! warm; only the leader accepts ADS streams and runs the controllers, so the replica that
//! writes `Programmed` is the one that sees every proxy's ACKs. With Redis, the LockLease
//! controller reads who holds each lease and follows the agents' lease events.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use breakwater_api::{CircuitBreakerPolicy, LockLease, OutboxRelay, RateLimitPolicy};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, runtime::events::Reporter};
use tokio_util::sync::CancellationToken;

use crate::{
    controller::{Kind, Triggers, run_controller, run_controller_with},
    error::{Error, Result},
    http::{self, State},
    leader::{self, LeaderElector},
    lease::{self, LeaseReader, RedisOptions},
    xds::{self, SnapshotCache},
};

#[derive(Clone, Debug)]
pub struct Options {
    pub root_namespace: String,
    pub metrics_addr: SocketAddr,
    pub xds_addr: SocketAddr,
    /// The namespace of the leader Lease; None disables leader election (one replica only).
    pub leader_election_namespace: Option<String>,
    /// This replica's name (the pod name), for the Lease and for Events.
    pub identity: String,
    /// Where the agents keep leases; None runs without (LockLease `Held` is then Unknown).
    pub redis: Option<RedisOptions>,
}

/// Makes ring the process's TLS provider for kube's client (a no-op when one is set). rustls
/// panics on the first client when more than one provider is compiled in and none was chosen,
/// which any dependency can cause by enabling aws-lc-rs (a test dependency once did).
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// What every controller shares.
#[derive(Clone)]
struct Shared {
    client: Client,
    root: String,
    reporter: Reporter,
    state: Arc<State>,
    cache: Arc<SnapshotCache>,
    stop: CancellationToken,
    leases: Option<(Arc<dyn LeaseReader>, RedisOptions)>,
}

impl Shared {
    async fn controller<K: Kind>(self) {
        let stop = self.stop.cancelled_owned();
        run_controller::<K>(self.client, self.root, self.reporter, self.state, Some(self.cache), stop).await;
    }

    /// The LockLease controller: reads Redis and follows the lease events when it has one.
    async fn lease_controller(self) {
        let Some((reader, redis)) = self.leases.clone() else {
            return self.controller::<LockLease>().await;
        };
        let events = lease::follow_redis(&redis, lease::Backoff::default(), self.stop.child_token());
        let (cache, stop) = (Some(self.cache), self.stop.cancelled_owned());
        let triggers = Some(Triggers::from_leases(events));
        run_controller_with::<LockLease>(
            self.client,
            self.root,
            self.reporter,
            self.state,
            cache,
            Some(reader),
            triggers,
            stop,
        )
        .await;
    }
}

/// Runs until `shutdown` resolves (Ok) or leadership is lost (Err: the process should exit
/// and be restarted, as client-go operators do, so no stale leader keeps writing).
pub async fn run(
    client: Client,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let state = Arc::new(State::default());
    let cache = Arc::new(SnapshotCache::default());
    let stop = CancellationToken::new();
    let leases = match &options.redis {
        Some(redis) => {
            let reader = lease::connect(redis).await.map_err(|e| Error::Redis(e.to_string()))?;
            tracing::info!(?redis, "reading LockLeases from Redis");
            Some((reader, redis.clone()))
        }
        None => {
            tracing::info!("no --redis-url: LockLease holders are not shown (Held is Unknown)");
            None
        }
    };
    let listener = tokio::net::TcpListener::bind(options.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /healthz, /readyz and /metrics");
    let server = tokio::spawn(http::serve(listener, state.clone(), stop.clone().cancelled_owned()));
    let xds_listener = tokio::net::TcpListener::bind(options.xds_addr).await?;
    tracing::info!(addr = %xds_listener.local_addr()?, "serving ADS");
    let xds_open = Arc::new(AtomicBool::new(options.leader_election_namespace.is_none()));
    let ads = xds::AdsServer::gated(cache.clone(), state.clone(), xds_open.clone());
    tokio::spawn(xds::serve(xds_listener, ads, stop.clone().cancelled_owned()));
    tokio::spawn(xds::feed::run(
        client.clone(),
        options.root_namespace.clone(),
        cache.clone(),
        stop.clone().cancelled_owned(),
    ));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }

    let mut elector = options.leader_election_namespace.as_ref().map(|ns| {
        LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), ns),
            leader::Config::new(&options.identity),
        )
    });
    if let Some(elector) = elector.as_mut() {
        // A standby replica is healthy and ready: it serves xDS, it just does not write.
        state.set_ready(true);
        tracing::info!(identity = %options.identity, "waiting for the leader lease");
        tokio::select! {
            () = stop.cancelled() => return finish(server).await,
            acquired = elector.acquire() => acquired?,
        }
        tracing::info!("became leader");
        xds_open.store(true, Ordering::Release);
    }
    state.metrics.leader.set(1);

    let shared = Shared {
        client,
        root: options.root_namespace.clone(),
        reporter: Reporter {
            controller: "breakwater-operator".into(),
            instance: Some(options.identity.clone()),
        },
        state: state.clone(),
        cache,
        stop: stop.clone(),
        leases,
    };
    let controllers = async move {
        tokio::join!(
            shared.clone().controller::<CircuitBreakerPolicy>(),
            shared.clone().controller::<RateLimitPolicy>(),
            shared.clone().lease_controller(),
            shared.controller::<OutboxRelay>(),
        );
    };
    state.set_ready(true);
    let outcome = match elector.as_mut() {
        Some(elector) => {
            tokio::pin!(controllers);
            tokio::select! {
                () = &mut controllers => Ok(()),
                lost = elector.hold() => {
                    tracing::error!(error = %lost, "lost leadership; stopping");
                    stop.cancel();
                    controllers.await;
                    Err(lost)
                }
            }
        }
        None => {
            controllers.await;
            Ok(())
        }
    };
    state.metrics.leader.set(0);
    if let (Ok(()), Some(elector)) = (&outcome, elector.as_mut())
        && let Err(err) = elector.release().await
    {
        tracing::warn!(error = %err, "could not release the leader lease");
    }
    stop.cancel();
    outcome?;
    finish(server).await
}

async fn finish(server: tokio::task::JoinHandle<std::io::Result<()>>) -> Result<()> {
    match server.await {
        Ok(result) => result.map_err(Error::from),
        Err(join) => Err(Error::Server(std::io::Error::other(join))),
    }
}
