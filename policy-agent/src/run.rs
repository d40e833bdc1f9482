//! The whole agent: [`run`] takes bound [`Listeners`], the [`Settings`] and a shutdown future
//! (mini-redis style), so `main` only parses flags and calls it, and tests bind
//! `127.0.0.1:0` and stop the agent when they like. The backend is chosen here, once: Redis
//! counters with Redis leases on the same connections, or memory counters with memory
//! leases; everything below is generic over the two stores.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use breakwater_store::breaker::{MemoryBreakers, RedisBreakers};
use breakwater_store::shadow::RedisShadow;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_server::AccessLogServiceServer;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::ads_proxy::{self, AdsProxy};
use crate::batch::BatchSettings;
use crate::breaker::{self, Board, BreakerSettings, access_log::AccessLogGrpc};
use crate::coalesce::Coalescing;
use crate::config::{self, RuleHolder};
use crate::lease::leader::{LeaderElection, LeaderSettings};
use crate::lease::{LeaseManager, LeaseStore, MemoryLeases, RedisLeases, api};
use crate::limiter::{Limiter, LimiterSettings};
use crate::metrics::Metrics;
use crate::source::{self, ConfigSource};
use crate::store::{CounterStore, MemoryStore, RedisConnection, RedisSettings};
use crate::{Error, Result, grpc, http, shadow};

/// The sockets the agent serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The rate-limit and access-log services (Envoy connects here; loopback in a pod).
    pub grpc: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics` (the kubelet and Prometheus connect here).
    pub http: TcpListener,
    /// The lease API (the pod's containers connect here; loopback in a pod).
    pub lease: TcpListener,
    /// The ADS proxy Envoy connects to (loopback in a pod; with a [`ConfigSource::Xds`]
    /// configuration only), or None.
    pub xds_proxy: Option<TcpListener>,
}

impl Listeners {
    /// Binds the three addresses.
    pub async fn bind(grpc: SocketAddr, http: SocketAddr, lease: SocketAddr) -> Result<Self> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })
        };
        Ok(Listeners {
            grpc: bind(grpc).await?,
            http: bind(http).await?,
            lease: bind(lease).await?,
            xds_proxy: None,
        })
    }

    /// Also serves Envoy's ADS proxy on `addr`.
    pub async fn with_xds_proxy(mut self, addr: SocketAddr) -> Result<Self> {
        self.xds_proxy = Some(TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?);
        Ok(self)
    }
}

/// Where counters and leases live.
#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// In this process: one agent only (standalone mode, tests).
    Memory,
    Redis(RedisSettings),
}

#[derive(Debug)]
pub struct Settings {
    /// `NAMESPACE/POD` ([`pod_id`]): the node id the agent asks the operator's xDS server for
    /// its configuration with, and the start of every lease holder id it issues.
    pub pod: String,
    pub config: ConfigSource,
    pub store: StoreSettings,
    pub limiter: LimiterSettings,
    pub leases: LeaseSettings,
    pub breakers: BreakerSettings,
}

/// Leases: which ones the agent keeps for leader election, and how long a call may take.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// Leases to keep on the pod's behalf (`--leader`), by name.
    pub leaders: Vec<String>,
    pub leader: LeaderSettings,
    /// How long one lease operation waits for Redis.
    pub deadline: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            leaders: Vec::new(),
            leader: LeaderSettings::default(),
            deadline: Duration::from_secs(1),
        }
    }
}

/// The pod's `NAMESPACE/POD`. Without a `name` (`--pod-name`, `POD_NAME`) it is `$HOSTNAME`,
/// then the host name from the kernel: in a pod both are the pod's name, and on a
/// developer's machine the agent starts without flags.
pub fn pod_id(name: Option<String>, namespace: &str) -> Result<String> {
    let name = match name {
        Some(name) => name,
        None => match std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()) {
            Some(name) => name,
            None => hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .map_err(|source| Error::NoPodName { source })?,
        },
    };
    if name.is_empty() || name.contains('/') || namespace.is_empty() || namespace.contains('/') {
        return Err(Error::InvalidPod { name, namespace: namespace.to_string() });
    }
    Ok(format!("{namespace}/{name}"))
}

/// Refuses what can never work, where the error is visible: a configuration file that is
/// missing or does not parse, a `--leader` name no lease can have, a leader directory that
/// cannot be made (it is created here). [`run`] calls it first; `main` also calls it before
/// binding its ports, so such an error comes before any port is taken.
pub fn check(settings: &Settings) -> Result<()> {
    if let ConfigSource::File { path, .. } = &settings.config {
        config::read_file(path)?;
    }
    for lease in &settings.leases.leaders {
        config::check_lease_name(lease)
            .map_err(|problem| Error::InvalidLeader { lease: lease.clone(), problem })?;
    }
    if let Some(dir) = &settings.leases.leader.dir {
        std::fs::create_dir_all(dir).map_err(|source| Error::LeaderDir { path: dir.clone(), source })?;
    }
    Ok(())
}

/// Runs the agent until `shutdown` completes: checks the settings ([`check`]), opens the
/// store, follows the configuration, serves gRPC, HTTP and the lease API, and drains them
/// before returning.
pub async fn run(
    listeners: Listeners,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    check(&settings)?;
    let Settings { pod, config, store, mut limiter, leases, breakers } = settings;
    let metrics = Arc::new(Metrics::default());
    match store {
        StoreSettings::Memory => {
            tracing::warn!(
                "no Redis: counters, leases and breakers are kept in memory and are not shared between agents"
            );
            // A batch saves a round trip to Redis; in memory there is none to save.
            limiter.batch = BatchSettings::off();
            let board = Board::new(Arc::new(MemoryBreakers::default()), metrics.clone(), breakers);
            let stores =
                Stores { counters: MemoryStore::new(), leases: MemoryLeases::new(), board, redis: None };
            serve(listeners, stores, metrics, pod, config, limiter, leases, shutdown).await
        }
        StoreSettings::Redis(redis) => {
            let connection = RedisConnection::start(redis).await?;
            let prefix = limiter.key_prefix.clone();
            let lease_store = RedisLeases::new(connection.clone(), prefix.clone(), leases.deadline);
            let breaker_store = RedisBreakers::new(connection.clone(), prefix, breakers.deadline);
            let board = Board::new(Arc::new(breaker_store), metrics.clone(), breakers);
            let stores =
                Stores { counters: connection.clone(), leases: lease_store, board, redis: Some(connection) };
            serve(listeners, stores, metrics, pod, config, limiter, leases, shutdown).await
        }
    }
}

/// What [`run`] chose: counters, leases and the breakers' board on one backend, and the
/// Redis connection when that backend is Redis (breaker events and health follow it).
struct Stores<S, L> {
    counters: S,
    leases: L,
    board: Board,
    redis: Option<RedisConnection>,
}

/// [`run`] on the stores it chose.
#[allow(clippy::too_many_arguments)]
async fn serve<S: CounterStore, L: LeaseStore>(
    listeners: Listeners,
    stores: Stores<S, L>,
    metrics: Arc<Metrics>,
    pod: String,
    source: ConfigSource,
    limiter_settings: LimiterSettings,
    lease_settings: LeaseSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let Stores { counters, leases, board, redis } = stores;
    tracing::info!(backend = counters.backend(), up = counters.is_up(), "counter store opened");
    let rules = Arc::new(RuleHolder::default());
    let board = Arc::new(board);
    let prefix = limiter_settings.key_prefix.clone();
    let limiter = Arc::new(
        Limiter::new(counters, rules.clone(), metrics.clone(), limiter_settings).with_breakers(board.clone()),
    );
    let manager = Arc::new(LeaseManager::new(leases, pod.clone(), metrics.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let on_swap: Arc<config::OnSwap> = {
        let (limiter, manager, board) = (limiter.clone(), manager.clone(), board.clone());
        Arc::new(move |rules: &config::RuleSet| {
            limiter.clear_cache();
            manager.set_leases(&rules.leases);
            board.set_rules(&rules.breakers);
        })
    };
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let mut background = vec![
        tokio::spawn(sweep_batches(limiter.clone(), stop_rx.clone())),
        tokio::spawn(breaker::watch::flush(board.clone(), stop_rx.clone())),
        tokio::spawn(breaker::watch::follow(
            board.clone(),
            redis.as_ref().map(|r| r.topology().clone()),
            prefix.clone(),
            stop_rx.clone(),
        )),
    ];
    if let Some(connection) = redis {
        let shadow = RedisShadow::new(connection.clone(), prefix.clone(), Duration::from_secs(1));
        background.push(tokio::spawn(shadow::report(rules.clone(), shadow, stop_rx.clone())));
        background.push(tokio::spawn(breaker::watch::health(board.clone(), connection, stop_rx.clone())));
    }
    // Envoy's ADS stream goes to the operator through the agent, with the pod's token.
    let ads_proxy = match (listeners.xds_proxy, &source) {
        (Some(listener), ConfigSource::Xds { endpoint, token_file }) => {
            tracing::info!(addr = ?listener.local_addr().ok(), upstream = endpoint, "proxying Envoy's ADS stream");
            let proxy = AdsProxy { endpoint: endpoint.clone(), token_file: token_file.clone() };
            Some(tokio::spawn(ads_proxy::serve(listener, proxy, stopped(stop_rx.clone()))))
        }
        (Some(_), _) => return Err(Error::XdsProxyWithoutEndpoint),
        (None, _) => None,
    };
    let config_task =
        tokio::spawn(source::follow(source, pod, rules, metrics.clone(), on_swap, stop_rx.clone()));

    let mut leaders = HashMap::new();
    let mut leader_tasks = Vec::new();
    for name in &lease_settings.leaders {
        if leaders.contains_key(name) {
            continue;
        }
        let (election, state) = LeaderElection::new(
            manager.clone(),
            name.clone(),
            lease_settings.leader.clone(),
            metrics.lease_leader(name),
        );
        leaders.insert(name.clone(), state);
        leader_tasks.push(tokio::spawn(election.run(stop_rx.clone())));
    }

    let grpc_addr = listeners.grpc.local_addr().ok();
    let http_addr = listeners.http.local_addr().ok();
    let lease_addr = listeners.lease.local_addr().ok();
    tracing::info!(grpc = ?grpc_addr, http = ?http_addr, lease = ?lease_addr, "breakwater-agent serving");

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc);
    let incoming = tokio_stream::StreamExt::map(incoming, |conn| {
        conn.map(|stream| {
            // Decisions are small and latency-bound: never wait to fill a segment; the
            // answers ready together still leave in one write (`coalesce`).
            let _ = stream.set_nodelay(true);
            Coalescing::new(stream)
        })
    });
    let grpc = tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::from_arc(Arc::new(grpc::RateLimitGrpc::new(limiter.clone()))))
        .add_service(AccessLogServiceServer::new(AccessLogGrpc::new(board.clone(), stop_rx.clone())))
        .serve_with_incoming_shutdown(incoming, stopped(stop_rx.clone()));
    let http = axum::serve(listeners.http, http::router(limiter.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));

    let lease_api = axum::serve(listeners.lease, api::router(manager, leaders, stop_rx.clone()))
        .with_graceful_shutdown(stopped(stop_rx.clone()));

    let grpc = tokio::spawn(grpc);
    let http = tokio::spawn(async move { http.await });
    let lease_api = tokio::spawn(async move { lease_api.await });
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    // Leaders step down and release first, while the store is still open.
    for task in leader_tasks {
        let _ = task.await;
    }
    let grpc_result = grpc.await;
    // No decision will take another batch hit: give them all back while Redis is open.
    limiter.give_back_all().await;
    let http_result = http.await;
    let lease_result = lease_api.await;
    let _ = config_task.await;
    for task in background {
        let _ = task.await;
    }
    if let Some(task) = ads_proxy {
        let _ = task.await;
    }
    match grpc_result {
        Ok(result) => result.map_err(Error::Grpc)?,
        Err(join) => tracing::error!(error = %join, "gRPC server task failed"),
    }
    match http_result {
        Ok(result) => result.map_err(|source| Error::Http { server: "HTTP", source })?,
        Err(join) => tracing::error!(error = %join, "HTTP server task failed"),
    }
    match lease_result {
        Ok(result) => result.map_err(|source| Error::Http { server: "lease API", source })?,
        Err(join) => tracing::error!(error = %join, "lease API server task failed"),
    }
    Ok(())
}

/// Every horizon, ends the batches whose life is over (their unused hits given back where
/// safe) and forgets idle counters; nothing to do with batches off.
async fn sweep_batches<S: CounterStore>(limiter: Arc<Limiter<S>>, mut stop: watch::Receiver<bool>) {
    let Some(batches) = limiter.batches() else { return };
    let mut every = tokio::time::interval(batches.settings().horizon);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            // The guard `wait_for` answers is not Send: dropped inside.
            _ = async { drop(stop.wait_for(|stop| *stop).await) } => return,
            _ = every.tick() => limiter.sweep().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ids_are_namespace_slash_name() {
        assert_eq!(pod_id(Some("web-0".into()), "shop").unwrap(), "shop/web-0");
        assert!(matches!(pod_id(Some("a/b".into()), "shop"), Err(Error::InvalidPod { .. })));
        assert!(matches!(pod_id(Some("a".into()), ""), Err(Error::InvalidPod { .. })));
        // Without a name: $HOSTNAME or the kernel's host name, never an error on a machine
        // that has one.
        let id = pod_id(None, "default").unwrap();
        assert!(id.starts_with("default/") && id.len() > "default/".len(), "{id}");
    }
}
