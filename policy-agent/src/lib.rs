//! `breakwater-agent`: the per-pod sidecar. This release carries its first capability, the
//! Envoy global rate-limit service (`envoy.service.ratelimit.v3`) on Redis:
//!
//! - [`algorithm`]: TokenBucket (GCRA), SlidingWindow and FixedWindow, as Redis Lua scripts
//!   and as their pure Rust twins;
//! - [`store`]: the [`store::CounterStore`] trait with the Redis (standalone, Cluster) and
//!   in-memory backends;
//! - [`limiter`]: descriptors → counters → a `RateLimitResponse`, with deadlines, failure
//!   modes and the over-limit cache ([`cache`]);
//! - [`config`]: the rules in force, swapped atomically, fed from a file or a channel;
//! - [`lease`]: leases (locks and semaphores) with fencing tokens, in Redis or in memory,
//!   granted to the pod over a loopback HTTP API, and leader election on top of them;
//! - [`grpc`], [`http`], [`metrics`]: the servers around it.
//!
//! [`run`] takes bound listeners and a shutdown future, so tests bind `127.0.0.1:0` and stop
//! the agent when they like.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod ads;
pub mod algorithm;
pub mod cache;
pub mod config;
pub mod grpc;
pub mod http;
pub mod lease;
pub mod limiter;
pub mod metrics;
pub mod store;

use config::{ConfigSource, RuleHolder};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitServiceServer;
use lease::backend::AnyLeases;
use lease::leader::{LeaderElection, LeaderSettings};
use lease::{LeaseManager, LeaseStore, MemoryLeases, RedisLeases, api};
use limiter::{Limiter, LimiterSettings};
use metrics::Metrics;
use store::{AnyStore, CounterStore, MemoryStore, RedisSettings, RedisStore, StoreError};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("counter store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Config(#[from] config::ConfigError),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("HTTP server: {0}")]
    Http(std::io::Error),
}

impl Error {
    /// A short label for metrics and exit messages.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Store(_) => "store",
            Error::Config(_) => "config",
            Error::Grpc(_) => "grpc",
            Error::Http(_) => "http",
        }
    }
}

/// The sockets the agent serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// The rate-limit service (Envoy connects here; loopback in a pod).
    pub grpc: TcpListener,
    /// `/healthz`, `/readyz`, `/metrics` (the kubelet and Prometheus connect here).
    pub http: TcpListener,
    /// The lease API (the pod's containers connect here; loopback in a pod).
    pub lease: TcpListener,
}

#[derive(Debug, Clone)]
pub enum StoreSettings {
    /// Counters in this process: one agent only (standalone mode, tests).
    Memory,
    Redis(RedisSettings),
}

#[derive(Debug)]
pub struct Settings {
    pub config: ConfigSource,
    pub store: StoreSettings,
    pub limiter: LimiterSettings,
    pub leases: LeaseSettings,
}

/// Leases: who this agent grants them to, and which it keeps for leader election.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// `NAMESPACE/POD`: every holder id this agent issues starts with it.
    pub pod: String,
    /// Leases to keep on the pod's behalf (`--leader`), by name.
    pub leaders: Vec<String>,
    pub leader: LeaderSettings,
    /// How long one lease operation waits for Redis.
    pub deadline: Duration,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        LeaseSettings {
            pod: "default/breakwater-agent".into(),
            leaders: Vec::new(),
            leader: LeaderSettings::default(),
            deadline: Duration::from_secs(1),
        }
    }
}

/// Builds the store a [`StoreSettings`] describes.
pub async fn open_store(settings: &StoreSettings) -> Result<AnyStore> {
    Ok(match settings {
        StoreSettings::Memory => AnyStore::Memory(MemoryStore::new()),
        StoreSettings::Redis(redis) => AnyStore::Redis(RedisStore::start(redis.clone()).await?),
    })
}

/// The lease backend that goes with a counter store: Redis leases on the same connections,
/// or memory leases with memory counters.
pub fn lease_store(store: &AnyStore, key_prefix: &str, deadline: Duration) -> AnyLeases {
    match store {
        AnyStore::Memory(_) => AnyLeases::Memory(MemoryLeases::default()),
        AnyStore::Redis(redis) => AnyLeases::Redis(RedisLeases::new(redis.clone(), key_prefix, deadline)),
    }
}

/// Runs the agent until `shutdown` completes: follows the configuration, serves gRPC and
/// HTTP, and drains both servers before returning.
pub async fn run(
    listeners: Listeners,
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = open_store(&settings.store).await?;
    tracing::info!(backend = store.backend(), up = store.is_up(), "counter store opened");
    let leases = lease_store(&store, &settings.limiter.key_prefix, settings.leases.deadline);
    serve(listeners, store, leases, settings.config, settings.limiter, settings.leases, shutdown).await
}

/// [`run`] on stores the caller built (tests inject them).
pub async fn serve<S: CounterStore, L: LeaseStore>(
    listeners: Listeners,
    store: S,
    leases: L,
    source: ConfigSource,
    limiter_settings: LimiterSettings,
    lease_settings: LeaseSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let rules = Arc::new(RuleHolder::default());
    let limiter = Arc::new(Limiter::new(store, rules.clone(), metrics.clone(), limiter_settings));
    let manager = Arc::new(LeaseManager::new(leases, lease_settings.pod.clone(), metrics.clone()));

    let (stop_tx, stop_rx) = watch::channel(false);
    let on_swap: Arc<config::OnSwap> = {
        let (limiter, manager) = (limiter.clone(), manager.clone());
        Arc::new(move |rules: &config::RuleSet| {
            limiter.clear_cache();
            manager.set_leases(&rules.leases);
        })
    };
    let config_task = tokio::spawn(config::follow(source, rules, metrics.clone(), on_swap, stop_rx.clone()));

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

    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listeners.grpc);
    let incoming = tokio_stream::StreamExt::map(incoming, |conn| {
        conn.inspect(|stream| {
            // Decisions are small and latency-bound: never wait to fill a segment.
            let _ = stream.set_nodelay(true);
        })
    });
    let grpc = tonic::transport::Server::builder()
        .add_service(RateLimitServiceServer::from_arc(Arc::new(grpc::RateLimitGrpc::new(limiter.clone()))))
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
    let http_result = http.await;
    let lease_result = lease_api.await;
    let _ = config_task.await;
    match grpc_result {
        Ok(result) => result?,
        Err(join) => tracing::error!(error = %join, "gRPC server task failed"),
    }
    match http_result {
        Ok(result) => result.map_err(Error::Http)?,
        Err(join) => tracing::error!(error = %join, "HTTP server task failed"),
    }
    match lease_result {
        Ok(result) => result.map_err(Error::Http)?,
        Err(join) => tracing::error!(error = %join, "lease API server task failed"),
    }
    Ok(())
}
