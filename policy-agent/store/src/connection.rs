//! The connections to Redis, standalone or Cluster, that the agent's counters and leases and
//! the operator's lease reads share. Every call is one script invocation (`EVALSHA`,
//! re-loaded by the `redis` crate when Redis answers `NOSCRIPT`, e.g. after a restart) on
//! shared multiplexed connections: concurrent calls are pipelined onto the same sockets
//! instead of waiting for a connection of their own.
//!
//! A call never waits for a connection to be made. A background task owns the connections:
//! it connects (with backoff) while there are none, replaces a connection that reported an
//! unrecoverable error, and pings Redis at an interval, which is what
//! [`RedisConnection::is_up`] (and so the agent's `/readyz`) reports. While there is no
//! connection, calls fail at once with [`Error::NotConnected`], a transient error.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, FromRedisValue, RedisError, ScriptInvocation};
use tokio::sync::{Notify, oneshot};

use crate::Error;

/// Standalone Redis, or the seed nodes of a Redis Cluster.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTopology {
    Standalone(String),
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTopology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTopology::Standalone(url) => f.debug_tuple("Standalone").field(&redact(url)).finish(),
            RedisTopology::Cluster(urls) => {
                f.debug_tuple("Cluster").field(&urls.iter().map(|u| redact(u)).collect::<Vec<_>>()).finish()
            }
        }
    }
}

impl RedisTopology {
    /// The topology a process's flags name: `--redis-url` (standalone) wins over
    /// `--redis-cluster` seeds; empty values count as unset, as a chart renders them; `None`
    /// when neither is given.
    pub fn from_flags(url: Option<String>, cluster: Vec<String>) -> Option<Self> {
        let seeds: Vec<String> = cluster.into_iter().filter(|seed| !seed.is_empty()).collect();
        match url.filter(|url| !url.is_empty()) {
            Some(url) => Some(RedisTopology::Standalone(url)),
            None => (!seeds.is_empty()).then_some(RedisTopology::Cluster(seeds)),
        }
    }
}

/// A Redis URL with any password replaced, for logs and `Debug`.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            if userinfo.contains(':') {
                format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
            } else {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
        }
        _ => url.to_string(),
    }
}

#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub topology: RedisTopology,
    /// Multiplexed connections to spread hits over (standalone; a cluster connection
    /// multiplexes per node by itself).
    pub connections: usize,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How often the background task pings Redis, and how long a ping may take.
    pub probe_interval: Duration,
    /// How long a request stays queued on a connection before the connection gives up on
    /// it (the limiter has long answered by then; this only bounds the queue).
    pub response_timeout: Duration,
}

impl RedisSettings {
    pub fn new(topology: RedisTopology) -> Self {
        RedisSettings {
            topology,
            connections: 1,
            connect_timeout: Duration::from_millis(500),
            probe_interval: Duration::from_millis(500),
            response_timeout: Duration::from_secs(1),
        }
    }
}

#[derive(Clone)]
enum Conn {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

struct Pool {
    conns: Vec<Conn>,
    next: AtomicUsize,
}

struct Inner {
    settings: RedisSettings,
    pool: ArcSwapOption<Pool>,
    up: AtomicBool,
    broken: Arc<Notify>,
    /// Dropped with the last clone, which stops the background task.
    _stop: oneshot::Sender<()>,
}

/// Shared connections to one Redis deployment. Cheap to clone: clones share the connections
/// and the background task, which stops when the last clone is dropped.
#[derive(Clone)]
pub struct RedisConnection {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConnection")
            .field("topology", &self.inner.settings.topology)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

enum Target {
    Standalone(Client),
    Cluster(Box<redis::cluster::ClusterClient>),
}

impl RedisConnection {
    /// Validates the settings and starts the connection task. Succeeds while Redis is down
    /// (calls then fail with a transient error until it is reachable); fails only on
    /// settings that can never work, such as a malformed URL.
    pub async fn start(settings: RedisSettings) -> Result<Self, Error> {
        let target = match &settings.topology {
            RedisTopology::Standalone(url) => Target::Standalone(open(url)?),
            RedisTopology::Cluster(urls) if urls.is_empty() => return Err(Error::NoSeeds),
            RedisTopology::Cluster(urls) => Target::Cluster(Box::new(
                redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
                    .connection_timeout(settings.connect_timeout)
                    .response_timeout(settings.response_timeout)
                    .retries(2)
                    .min_retry_wait(5)
                    .max_retry_wait(50)
                    .build()
                    .map_err(|source| Error::InvalidUrl {
                        url: urls.iter().map(|u| redact(u)).collect::<Vec<_>>().join(","),
                        source,
                    })?,
            )),
        };
        let (stop, stopped) = oneshot::channel();
        let inner = Arc::new(Inner {
            settings,
            pool: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            broken: Arc::new(Notify::new()),
            _stop: stop,
        });
        // Try once before returning, so a reachable Redis is used from the first decision.
        if let Ok(pool) = connect(&target, &inner.settings).await {
            inner.pool.store(Some(Arc::new(pool)));
            inner.up.store(true, Ordering::SeqCst);
        }
        tokio::spawn(maintain(Arc::downgrade(&inner), inner.broken.clone(), target, stopped));
        Ok(RedisConnection { inner })
    }

    pub fn topology(&self) -> &RedisTopology {
        &self.inner.settings.topology
    }

    /// Whether Redis answered the background task's last ping.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
    }

    /// `redis` or `redis-cluster`, for logs and metrics.
    pub fn backend(&self) -> &'static str {
        match self.inner.settings.topology {
            RedisTopology::Standalone(_) => "redis",
            RedisTopology::Cluster(_) => "redis-cluster",
        }
    }

    fn connection(&self) -> Result<(Arc<Pool>, Conn), Error> {
        let pool = self.inner.pool.load_full().ok_or(Error::NotConnected)?;
        let i = pool.next.fetch_add(1, Ordering::Relaxed) % pool.conns.len();
        let conn = pool.conns[i].clone();
        Ok((pool, conn))
    }

    /// Runs one script invocation (its keys and arguments already bound) on the shared
    /// connections and converts the reply to `T`: `EVALSHA`, re-loading the script when
    /// Redis answers `NOSCRIPT`; a failure is classified, and one that broke the connection
    /// is reported to the background task. No deadline of its own: callers bound it (the
    /// limiter's per-decision deadline, the lease store's per-call one). A reply `T` cannot
    /// be built from is a permanent error.
    pub async fn run_script<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Result<T, Error> {
        let (pool, conn) = self.connection()?;
        let reply: Result<T, RedisError> = match conn {
            Conn::Standalone(mut c) => invocation.invoke_async(&mut c).await,
            Conn::Cluster(mut c) => invocation.invoke_async(&mut c).await,
        };
        reply.map_err(|error| {
            self.report(&pool, &error);
            Error::Redis(error)
        })
    }

    fn report(&self, pool: &Arc<Pool>, error: &RedisError) {
        if error.is_unrecoverable_error() || error.is_connection_dropped() || error.is_connection_refusal() {
            self.inner.up.store(false, Ordering::SeqCst);
            // Replace the pool only if nobody has replaced it already.
            let current = self.inner.pool.load();
            if current.as_ref().is_some_and(|p| Arc::ptr_eq(p, pool)) {
                self.inner.pool.compare_and_swap(&*current, None);
            }
            self.inner.broken.notify_one();
        }
    }
}

/// A client for one standalone URL; a URL it refuses is [`Error::InvalidUrl`], redacted.
pub(crate) fn open(url: &str) -> Result<Client, Error> {
    Client::open(url).map_err(|source| Error::InvalidUrl { url: redact(url), source })
}

async fn connect(target: &Target, settings: &RedisSettings) -> Result<Pool, RedisError> {
    let conns = match target {
        Target::Standalone(client) => {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(settings.connect_timeout))
                .set_response_timeout(Some(settings.response_timeout));
            let mut conns = Vec::with_capacity(settings.connections.max(1));
            for _ in 0..settings.connections.max(1) {
                conns.push(Conn::Standalone(
                    client.get_multiplexed_async_connection_with_config(&config).await?,
                ));
            }
            conns
        }
        Target::Cluster(client) => vec![Conn::Cluster(client.get_async_connection().await?)],
    };
    let mut pool = Pool { conns, next: AtomicUsize::new(0) };
    ping(&mut pool).await?;
    Ok(pool)
}

async fn ping(pool: &mut Pool) -> Result<(), RedisError> {
    for conn in &mut pool.conns {
        let cmd = redis::cmd("PING");
        match conn {
            Conn::Standalone(c) => c.req_packed_command(&cmd).await?,
            Conn::Cluster(c) => c.req_packed_command(&cmd).await?,
        };
    }
    Ok(())
}

/// Keeps the pool connected and `up` truthful until the store is dropped.
async fn maintain(
    inner: std::sync::Weak<Inner>,
    broken: Arc<Notify>,
    target: Target,
    mut stopped: oneshot::Receiver<()>,
) {
    let mut backoff = Duration::from_millis(20);
    loop {
        let Some(store) = inner.upgrade() else { return };
        let settings = store.settings.clone();
        let wait = match store.pool.load_full() {
            None => {
                let attempt =
                    tokio::time::timeout(settings.connect_timeout * 2, connect(&target, &settings)).await;
                match attempt {
                    Ok(Ok(pool)) => {
                        store.pool.store(Some(Arc::new(pool)));
                        store.up.store(true, Ordering::SeqCst);
                        tracing::info!(backend = "redis", "connected to redis");
                        backoff = Duration::from_millis(20);
                        settings.probe_interval
                    }
                    Ok(Err(error)) => {
                        tracing::debug!(%error, "redis connection attempt failed");
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        backoff
                    }
                    Err(_) => {
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        backoff
                    }
                }
            }
            Some(pool) => {
                let mut probe = Pool { conns: pool.conns.clone(), next: AtomicUsize::new(0) };
                match tokio::time::timeout(settings.probe_interval, ping(&mut probe)).await {
                    Ok(Ok(())) => store.up.store(true, Ordering::SeqCst),
                    Ok(Err(error)) => {
                        tracing::warn!(%error, "redis ping failed");
                        store.up.store(false, Ordering::SeqCst);
                        if error.is_unrecoverable_error()
                            || error.is_connection_dropped()
                            || error.is_io_error()
                        {
                            store.pool.compare_and_swap(&Some(pool), None);
                            continue;
                        }
                    }
                    Err(_) => {
                        tracing::warn!("redis ping timed out");
                        store.up.store(false, Ordering::SeqCst);
                    }
                }
                settings.probe_interval
            }
        };
        drop(store);
        tokio::select! {
            _ = &mut stopped => return,
            _ = broken.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(redact("redis://:s3cret@redis:6379/0"), "redis://:***@redis:6379/0");
        assert_eq!(redact("redis://user:s3cret@redis:6379"), "redis://user:***@redis:6379");
        assert_eq!(redact("redis://redis:6379"), "redis://redis:6379");
        let debug = format!("{:?}", RedisTopology::Standalone("redis://u:pw@h:1".into()));
        assert!(!debug.contains("pw"), "{debug}");
    }

    #[test]
    fn topology_from_flags() {
        let url = || Some("redis://r:6379".to_string());
        assert_eq!(
            RedisTopology::from_flags(url(), vec![]),
            Some(RedisTopology::Standalone("redis://r:6379".into()))
        );
        let seeds = vec![String::new(), "redis://a:6379".into()];
        assert_eq!(
            RedisTopology::from_flags(None, seeds),
            Some(RedisTopology::Cluster(vec!["redis://a:6379".into()]))
        );
        assert_eq!(RedisTopology::from_flags(Some(String::new()), vec![String::new()]), None);
    }

    #[tokio::test]
    async fn a_cluster_without_seeds_never_works() {
        let error =
            RedisConnection::start(RedisSettings::new(RedisTopology::Cluster(vec![]))).await.unwrap_err();
        assert!(matches!(error, Error::NoSeeds), "{error}");
    }
}
