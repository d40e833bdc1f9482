//! Cluster mode: health and metrics endpoints, one watch per kind shared by everything
//! (`reflectors`), the xDS server and its feed, leader election, and the four controllers.
//! Every replica watches, feeds its snapshot cache and reports ready once its stores are
//! synced; only the leader accepts ADS streams (a standby refuses them) and runs the
//! controllers, so the replica that writes `Programmed` is the one that sees every proxy's
//! ACKs. The leader labels its own pod `breakwater.dev/serving-xds` so that the chart's xDS
//! Service sends the proxies to it alone (`serving`). With Redis, the LockLease controller
//! reads who holds each lease and follows the agents' lease events, the OutboxRelay
//! controller reads how each relay goes, the CircuitBreakerPolicy controller reads each
//! shared breaker and follows its transitions (an Event each), and the RateLimitPolicy
//! controller reads what shadow limits would have rejected; every accepted relay runs as a
//! Deployment (`relay`), Redis or not.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client, runtime::events::Reporter};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{
    controller::{self, Context, Live, Triggers},
    error::{Error, Report, Result},
    http::{self, State},
    inject,
    inventory::ObjectName,
    leader::{self, LeaderElector},
    lease::{self, LeaseReader, RedisOptions},
    live::{self, BreakerReader, ShadowReader},
    reflectors::Reflectors,
    relay::{self, RelayReader},
    serving,
    xds::{self, SnapshotCache},
};

#[derive(Clone, Debug)]
pub struct Options {
    pub root_namespace: String,
    pub metrics_addr: SocketAddr,
    pub xds_addr: SocketAddr,
    /// The sidecar injection webhook; None serves none.
    pub webhook: Option<inject::WebhookOptions>,
    /// How accepted OutboxRelays run (`--relay-image`, `--relay-redis-secret`).
    pub relays: relay::Settings,
    /// The namespace of the leader Lease; None disables leader election (one replica only).
    pub leader_election_namespace: Option<String>,
    /// This replica's name (the pod name), for the Lease and for Events.
    pub identity: String,
    /// The pod this replica runs in, which the leader labels as the one serving xDS; None
    /// outside a pod (then nothing is labelled).
    pub pod: Option<ObjectName>,
    /// Where the agents keep leases; None runs without (LockLease `Held` is then Unknown).
    pub redis: Option<RedisOptions>,
    /// The audience of the projected ServiceAccount tokens ADS streams must present
    /// (`xds::identity`; default `xds::DEFAULT_AUDIENCE`).
    pub xds_token_audience: String,
}

/// Makes ring the process's TLS provider for kube's client (a no-op when one is set). rustls
/// panics on the first client when more than one provider is compiled in and none was chosen,
/// which any dependency can cause by enabling aws-lc-rs (a test dependency once did).
pub fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
}

/// Runs until `shutdown` resolves (Ok) or leadership is lost (Err: the process should exit
/// and be restarted, as client-go operators do, so no stale leader keeps writing).
pub async fn run(
    client: Client,
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let relays = options.relays.clone();
    let state = Arc::new(State::default());
    let cache = Arc::new(SnapshotCache::default());
    let stop = CancellationToken::new();
    let store = match &options.redis {
        Some(redis) => {
            let store = lease::open(redis).await.map_err(Error::Redis)?;
            tracing::info!(
                ?redis,
                "reading LockLeases, the outbox relays' facts, the breakers and the shadow counts from Redis"
            );
            Some(store)
        }
        None => {
            tracing::info!(
                "no --redis-url: LockLease holders, relay facts, breakers and shadow counts are not shown \
                 (Held, Ready, Tripped and WouldReject are Unknown)"
            );
            None
        }
    };
    let leases = store.clone().map(|store| store as Arc<dyn LeaseReader>);
    let facts = store.clone().map(|store| store as Arc<dyn RelayReader>);
    let live = match store.as_deref().map(live::open) {
        Some((breakers, shadow)) => Live {
            breakers: Some(breakers as Arc<dyn BreakerReader>),
            shadow: Some(shadow as Arc<dyn ShadowReader>),
        },
        None => Live::default(),
    };
    tracing::info!(image = relays.image, redis_secret = relays.redis_secret, "running OutboxRelays");
    let electing = options.leader_election_namespace.is_some();
    // A replica that restarts after losing the lease may still carry the label; a standby
    // must not draw ADS streams.
    let pod = options.pod.clone().filter(|_| electing);
    if let Some(pod) = &pod {
        serving::unmark(&client, pod).await;
    }
    let listener = bind(options.metrics_addr).await?;
    let addr = listener.local_addr().unwrap_or(options.metrics_addr);
    tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    let server = tokio::spawn(http::serve(listener, state.clone(), stop.clone().cancelled_owned()));
    let xds_listener = bind(options.xds_addr).await?;
    let addr = xds_listener.local_addr().unwrap_or(options.xds_addr);
    tracing::info!(
        %addr,
        audience = options.xds_token_audience,
        "serving ADS to streams with a pod's token (a standby refuses streams until it leads)"
    );
    let xds_open = Arc::new(AtomicBool::new(!electing));
    let authenticator = xds::Authenticator::token_reviews(client.clone(), options.xds_token_audience.clone());
    let ads = xds::AdsServer::authenticated(cache.clone(), state.clone(), xds_open.clone(), authenticator);
    tokio::spawn(xds::serve(xds_listener, ads, stop.clone().cancelled_owned()));
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }

    if let Some(webhook) = options.webhook.clone() {
        inject::start(client.clone(), webhook, state.clone(), stop.clone()).await?;
    }

    let reflectors = Reflectors::watch(&client, &stop);
    tokio::select! {
        () = stop.cancelled() => return finish(server).await,
        synced = reflectors.ready() => if synced.is_err() { return finish(server).await },
    }
    tracing::info!("watches synced");
    {
        let (reflectors, root) = (reflectors.clone(), options.root_namespace.clone());
        let changes = reflectors.changes();
        let inventory = move || reflectors.inventory(&root);
        tokio::spawn(xds::feed::run(changes, inventory, cache.clone(), stop.clone().cancelled_owned()));
    }
    // Ready: the stores are synced. A standby is ready too (a rolling update waits for it,
    // and it takes over at once), but it is not labelled, so it draws no ADS streams.
    state.set_ready(true);

    let mut elector = options.leader_election_namespace.as_ref().map(|ns| {
        LeaderElector::new(
            Api::<Lease>::namespaced(client.clone(), ns),
            leader::Config::new(&options.identity),
        )
    });
    if let Some(elector) = elector.as_mut() {
        tracing::info!(identity = %options.identity, "waiting for the leader lease");
        tokio::select! {
            () = stop.cancelled() => return finish(server).await,
            acquired = elector.acquire() => acquired?,
        }
        tracing::info!("became leader");
        xds_open.store(true, Ordering::Release);
        if let Some(pod) = &pod {
            serving::mark(&client, pod).await;
        }
    }
    state.metrics.leader.set(1);

    let lease_triggers = match &options.redis {
        Some(redis) => {
            Triggers::from_leases(lease::follow_redis(redis, lease::Backoff::default(), stop.child_token()))
        }
        None => Triggers::none(),
    };
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            reflectors.clone(),
            controller::Options {
                root_namespace: options.root_namespace.clone(),
                reporter: Reporter {
                    controller: "breakwater-operator".into(),
                    instance: Some(options.identity.clone()),
                },
                state: state.clone(),
                cache: Some(cache),
                leases,
            },
        )
        .with_relays(controller::Relays { settings: relays, facts })
        .with_live(live),
    );
    // Only the leader follows the breakers' transitions: each is an Event.
    let breaker_triggers = match &options.redis {
        Some(redis) => Triggers::from_breakers(
            ctx.clone(),
            live::follow_redis(redis, lease::Backoff::default(), stop.child_token()),
        ),
        None => Triggers::none(),
    };
    let controllers = {
        let stop = stop.clone();
        let stopped = move || stop.clone().cancelled_owned();
        async move {
            tokio::join!(
                controller::run(ctx.clone(), &reflectors.circuit_breakers, breaker_triggers, stopped()),
                controller::run(ctx.clone(), &reflectors.rate_limits, Triggers::none(), stopped()),
                controller::run(ctx.clone(), &reflectors.lock_leases, lease_triggers, stopped()),
                controller::run(ctx, &reflectors.outbox_relays, Triggers::none(), stopped()),
            );
        }
    };
    let outcome = match elector.as_mut() {
        Some(elector) => {
            tokio::pin!(controllers);
            tokio::select! {
                () = &mut controllers => Ok(()),
                lost = elector.hold() => {
                    tracing::error!(error = %Report(&lost), "lost leadership; stopping");
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
    if let Some(pod) = &pod {
        serving::unmark(&client, pod).await;
    }
    if let (Ok(()), Some(elector)) = (&outcome, elector.as_mut())
        && let Err(err) = elector.release().await
    {
        tracing::warn!(error = %Report(&err), "could not release the leader lease");
    }
    stop.cancel();
    outcome?;
    finish(server).await
}

async fn finish(server: tokio::task::JoinHandle<std::io::Result<()>>) -> Result<()> {
    match server.await {
        Ok(result) => result.map_err(Error::Serve),
        Err(join) => Err(Error::Task(join)),
    }
}
