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
//! - [`lease`]: leases (locks and semaphores) with fencing tokens, in Redis or in memory;
//! - [`grpc`], [`http`], [`metrics`]: the servers around it.
//!
//! [`run`] takes bound listeners and a shutdown future, so tests bind `127.0.0.1:0` and stop
//! the agent when they like.

use std::future::Future;
use std::sync::Arc;

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
}

/// Builds the store a [`StoreSettings`] describes.
pub async fn open_store(settings: &StoreSettings) -> Result<AnyStore> {
    Ok(match settings {
        StoreSettings::Memory => AnyStore::Memory(MemoryStore::new()),
        StoreSettings::Redis(redis) => AnyStore::Redis(RedisStore::start(redis.clone()).await?),
    })
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
    serve(listeners, store, settings.config, settings.limiter, shutdown).await
}

/// [`run`] on a store the caller built (tests inject one).
pub async fn serve<S: CounterStore>(
    listeners: Listeners,
    store: S,
    source: ConfigSource,
    limiter_settings: LimiterSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let metrics = Arc::new(Metrics::default());
    let rules = Arc::new(RuleHolder::default());
    let limiter = Arc::new(Limiter::new(store, rules.clone(), metrics.clone(), limiter_settings));

    let (stop_tx, stop_rx) = watch::channel(false);
    let on_swap: Arc<config::OnSwap> = {
        let limiter = limiter.clone();
        Arc::new(move |_: &config::RuleSet| limiter.clear_cache())
    };
    let config_task = tokio::spawn(config::follow(source, rules, metrics, on_swap, stop_rx.clone()));

    let grpc_addr = listeners.grpc.local_addr().ok();
    let http_addr = listeners.http.local_addr().ok();
    tracing::info!(grpc = ?grpc_addr, http = ?http_addr, "breakwater-agent serving");

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

    let grpc = tokio::spawn(grpc);
    let http = tokio::spawn(async move { http.await });
    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let grpc_result = grpc.await;
    let http_result = http.await;
    let _ = config_task.await;
    match grpc_result {
        Ok(result) => result?,
        Err(join) => tracing::error!(error = %join, "gRPC server task failed"),
    }
    match http_result {
        Ok(result) => result.map_err(Error::Http)?,
        Err(join) => tracing::error!(error = %join, "HTTP server task failed"),
    }
    Ok(())
}
