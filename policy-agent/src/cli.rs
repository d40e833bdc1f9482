//! The agent's flags (`breakwater-agent --help`) and what they start: `main` parses them,
//! starts logging and calls [`start`]; tests parse the arguments a pod spec gives the agent
//! with the same [`Cli`] and run it in process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::batch::BatchSettings;
use crate::breaker::BreakerSettings;
use crate::lease::leader::LeaderSettings;
use crate::limiter::LimiterSettings;
use crate::source::ConfigSource;
use crate::store::{RedisSettings, RedisTopology};
use crate::{LeaseSettings, Listeners, Result, Settings, StoreSettings, pod_id};

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-agent",
    version,
    about = "Breakwater per-pod agent: Envoy's rate-limit service and leases on Redis"
)]
pub struct Cli {
    /// The agent configuration (YAML or JSON `AgentConfig`), re-read when it changes: for
    /// standalone use. In a cluster the configuration comes from --xds-endpoint.
    #[arg(
        long,
        env = "BREAKWATER_AGENT_CONFIG",
        required_unless_present = "xds_endpoint",
        conflicts_with = "xds_endpoint"
    )]
    pub config: Option<PathBuf>,
    /// The operator's xDS server (`http://HOST:PORT`): the agent subscribes to its own
    /// configuration there with node id POD_NAMESPACE/POD_NAME, as the pod's Envoy does.
    #[arg(long, env = "BREAKWATER_XDS_ENDPOINT")]
    pub xds_endpoint: Option<String>,
    /// The pod's projected ServiceAccount token (audience breakwater.dev/xds), read again on
    /// every (re)connect and sent as `authorization: Bearer <token>`: an operator in a cluster
    /// serves a pod's configuration only to a stream that proves it is that pod.
    #[arg(long, env = "BREAKWATER_XDS_TOKEN_FILE", conflicts_with = "config")]
    pub xds_token_file: Option<PathBuf>,
    /// Serve Envoy's ADS here (loopback in a pod) and forward each stream to --xds-endpoint
    /// with the --xds-token-file token: the pod's Envoy reaches the operator this way.
    #[arg(long, requires = "xds_endpoint")]
    pub xds_proxy_addr: Option<SocketAddr>,
    /// How often to check the configuration file for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub config_poll: Duration,
    /// The rate-limit gRPC service (Envoy's `rate_limit_service`); loopback in a pod. The
    /// default is the port the operator's Envoy bootstrap points at.
    #[arg(long, default_value = "127.0.0.1:15081")]
    pub grpc_addr: SocketAddr,
    /// /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9102")]
    pub http_addr: SocketAddr,
    /// The lease API (/v1/leases/...) the pod's containers call; keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15082")]
    pub lease_addr: SocketAddr,
    /// This pod's name (the downward API's metadata.name); holder ids start with
    /// NAMESPACE/POD. Defaults to $HOSTNAME, then the host name: in a pod, both are the pod
    /// name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// This pod's namespace (the downward API's metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub pod_namespace: String,
    /// Keep this lease on the pod's behalf and report whether the pod leads
    /// (GET /v1/leases/LEASE/leader, and --leader-dir). Repeatable.
    #[arg(long = "leader", value_name = "LEASE", env = "BREAKWATER_LEADER", value_delimiter = ',')]
    pub leaders: Vec<String>,
    /// While the pod leads a --leader lease, DIR/LEASE holds its fencing token; the file is
    /// removed when the pod steps down.
    #[arg(long, value_name = "DIR", env = "BREAKWATER_LEADER_DIR")]
    pub leader_dir: Option<PathBuf>,
    /// How long one lease operation waits for Redis before failing (503 StoreUnavailable).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub lease_deadline: Duration,
    /// Redis URL (`redis://[:password@]host:port[/db]`). Without it (and without
    /// --redis-cluster), counters are kept in memory: correct for one agent only.
    #[arg(long, env = "BREAKWATER_REDIS_URL", conflicts_with = "redis_cluster")]
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma-separated URLs.
    #[arg(long, env = "BREAKWATER_REDIS_CLUSTER", value_delimiter = ',')]
    pub redis_cluster: Vec<String>,
    /// Multiplexed Redis connections to spread decisions over.
    #[arg(long, default_value_t = 1)]
    pub redis_connections: usize,
    /// How long a decision waits for Redis before answering by the rule's failure mode.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    pub deadline: Duration,
    /// Prefix of every counter key.
    #[arg(long, default_value = "bw")]
    pub key_prefix: String,
    /// How often the calls Envoy logged are added to the breakers' windows in Redis: bounds
    /// how late a failure counts.
    #[arg(long, default_value = "20ms", value_parser = parse_duration)]
    pub breaker_flush_interval: Duration,
    /// How long breakers keep their last known state while Redis is unreachable, before
    /// each answers by its policy's fallback.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub breaker_hold: Duration,
    /// Over-limit counters remembered locally (0 disables the cache).
    #[arg(long, default_value_t = 65_536)]
    pub over_limit_cache: usize,
    /// The most hits one quota batch may reserve from Redis for a counter under load
    /// (1 to 1000000); 1 turns batches off: every decision is one Redis call.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub quota_batch: u32,
    /// The window a counter's local rate is measured over to size its batches, and the
    /// longest a batch lives (1ms to 1m).
    #[arg(long, default_value = "1s", value_parser = parse_horizon)]
    pub quota_horizon: Duration,
    /// Worker threads (default: one per core).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    #[arg(long, env = "BREAKWATER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// text or json
    #[arg(long, env = "BREAKWATER_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// A flag's duration, in the grammar of [`breakwater_api::duration`].
fn parse_duration(text: &str) -> Result<Duration, breakwater_api::duration::InvalidDuration> {
    breakwater_api::duration::parse(text)
}

/// `--quota-horizon`: a duration from 1 ms to a minute, which keeps every product the batch
/// scripts compute (hits wanted × life in µs) exact in Lua's doubles.
fn parse_horizon(text: &str) -> Result<Duration, String> {
    let horizon = parse_duration(text).map_err(|e| e.to_string())?;
    if horizon < Duration::from_millis(1) || horizon > Duration::from_secs(60) {
        return Err(format!("{text} is not between 1ms and 1m"));
    }
    Ok(horizon)
}

/// The settings the flags describe.
pub fn settings(cli: &Cli) -> Result<Settings> {
    let pod = pod_id(cli.pod_name.clone(), &cli.pod_namespace)?;
    let config = match (&cli.config, &cli.xds_endpoint) {
        (Some(path), _) => ConfigSource::File { path: path.clone(), poll: cli.config_poll },
        // clap requires one of the two.
        (None, endpoint) => ConfigSource::Xds {
            endpoint: endpoint.clone().unwrap_or_default(),
            token_file: cli.xds_token_file.clone(),
        },
    };
    let store = match RedisTopology::from_flags(cli.redis_url.clone(), cli.redis_cluster.clone()) {
        Some(topology) => {
            let mut redis = RedisSettings::new(topology);
            redis.connections = cli.redis_connections.max(1);
            StoreSettings::Redis(redis)
        }
        None => StoreSettings::Memory,
    };
    Ok(Settings {
        pod,
        config,
        store,
        limiter: LimiterSettings {
            deadline: cli.deadline,
            key_prefix: cli.key_prefix.clone(),
            cache_capacity: cli.over_limit_cache,
            batch: BatchSettings {
                max_hits: cli.quota_batch,
                horizon: cli.quota_horizon,
                ..BatchSettings::default()
            },
        },
        leases: LeaseSettings {
            leaders: cli.leaders.clone(),
            leader: LeaderSettings { dir: cli.leader_dir.clone(), ..LeaderSettings::default() },
            deadline: cli.lease_deadline,
        },
        breakers: BreakerSettings {
            flush_interval: cli.breaker_flush_interval,
            deadline: cli.deadline,
            hold: cli.breaker_hold,
            ..BreakerSettings::default()
        },
    })
}

/// Binds what the flags name and runs the agent until `shutdown` completes: what `main` does
/// after parsing the flags and starting logging.
pub async fn start(cli: Cli, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
    let settings = settings(&cli)?;
    crate::run::check(&settings)?;
    let listeners = Listeners::bind(cli.grpc_addr, cli.http_addr, cli.lease_addr).await?;
    let listeners = match cli.xds_proxy_addr {
        Some(addr) => listeners.with_xds_proxy(addr).await?,
        None => listeners,
    };
    crate::run(listeners, settings, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configuration_from_a_file_or_the_operator() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["breakwater-agent"], args].concat());
        let xds = parse(&["--xds-endpoint", "http://breakwater-xds:18000"]).unwrap();
        assert_eq!(xds.xds_endpoint.as_deref(), Some("http://breakwater-xds:18000"));
        assert_eq!(xds.grpc_addr, "127.0.0.1:15081".parse().unwrap());
        assert!(parse(&["--config", "a.yaml"]).unwrap().config.is_some());
        assert!(parse(&[]).is_err());
        assert!(parse(&["--config", "a.yaml", "--xds-endpoint", "http://x:1"]).is_err());
        let token = parse(&["--xds-endpoint", "http://x:1", "--xds-token-file", "/var/run/token"]).unwrap();
        assert_eq!(token.xds_token_file, Some(PathBuf::from("/var/run/token")));
        assert!(
            parse(&["--config", "a.yaml", "--xds-token-file", "/t"]).is_err(),
            "a token only for the operator"
        );
    }

    #[test]
    fn lease_flags() {
        let cli = Cli::try_parse_from([
            "breakwater-agent",
            "--config",
            "a.yaml",
            "--pod-name",
            "web-0",
            "--pod-namespace",
            "shop",
            "--leader",
            "a",
            "--leader",
            "b,c",
        ])
        .unwrap();
        assert_eq!(cli.leaders, ["a", "b", "c"]);
        assert_eq!(cli.lease_addr, "127.0.0.1:15082".parse().unwrap());
        assert_eq!(cli.lease_deadline, Duration::from_secs(1));
        assert_eq!(settings(&cli).unwrap().pod, "shop/web-0");
        let bad =
            Cli::try_parse_from(["breakwater-agent", "--config", "a.yaml", "--pod-name", "a/b"]).unwrap();
        assert!(settings(&bad).unwrap_err().to_string().contains("without '/'"));
    }

    #[test]
    fn quota_batch_flags() {
        let parse =
            |args: &[&str]| Cli::try_parse_from([&["breakwater-agent", "--config", "a.yaml"], args].concat());
        let defaults = settings(&parse(&[]).unwrap()).unwrap().limiter.batch;
        assert_eq!((defaults.max_hits, defaults.horizon), (256, Duration::from_secs(1)));
        assert!(defaults.enabled());
        let off = settings(&parse(&["--quota-batch", "1"]).unwrap()).unwrap().limiter.batch;
        assert!(!off.enabled(), "--quota-batch 1 is the per-request path");
        let set = parse(&["--quota-batch", "1000", "--quota-horizon", "250ms"]).unwrap();
        assert_eq!((set.quota_batch, set.quota_horizon), (1000, Duration::from_millis(250)));
        for bad in [
            ["--quota-batch", "0"],
            ["--quota-batch", "1000001"],
            ["--quota-horizon", "0ms"],
            ["--quota-horizon", "2m"],
        ] {
            assert!(parse(&bad).is_err(), "{bad:?}");
        }
        let error = parse(&["--quota-horizon", "100us"]).unwrap_err().to_string();
        assert!(error.contains("is not a duration"), "{error}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("5ms"), Ok(Duration::from_millis(5)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("5").is_err());
        let error = Cli::try_parse_from(["breakwater-agent", "--config", "a.yaml", "--deadline", "250us"])
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not a duration"), "{error}");
    }
}
