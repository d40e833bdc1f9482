//! `breakwater-agent`: parse flags, start logging, call [`breakwater_agent::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use breakwater_agent::error::report;
use breakwater_agent::lease::leader::LeaderSettings;
use breakwater_agent::limiter::LimiterSettings;
use breakwater_agent::source::ConfigSource;
use breakwater_agent::store::{RedisSettings, RedisTopology};
use breakwater_agent::{LeaseSettings, Listeners, Result, Settings, StoreSettings, pod_id};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-agent",
    version,
    about = "Breakwater per-pod agent: Envoy's rate-limit service and leases on Redis"
)]
struct Cli {
    /// The agent configuration (YAML or JSON `AgentConfig`), re-read when it changes: for
    /// standalone use. In a cluster the configuration comes from --xds-endpoint.
    #[arg(
        long,
        env = "BREAKWATER_AGENT_CONFIG",
        required_unless_present = "xds_endpoint",
        conflicts_with = "xds_endpoint"
    )]
    config: Option<PathBuf>,
    /// The operator's xDS server (`http://HOST:PORT`): the agent subscribes to its own
    /// configuration there with node id POD_NAMESPACE/POD_NAME, as the pod's Envoy does.
    #[arg(long, env = "BREAKWATER_XDS_ENDPOINT")]
    xds_endpoint: Option<String>,
    /// The pod's projected ServiceAccount token (audience breakwater.dev/xds), read again on
    /// every (re)connect and sent as `authorization: Bearer <token>`: an operator in a cluster
    /// serves a pod's configuration only to a stream that proves it is that pod.
    #[arg(long, env = "BREAKWATER_XDS_TOKEN_FILE", conflicts_with = "config")]
    xds_token_file: Option<PathBuf>,
    /// How often to check the configuration file for changes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    config_poll: Duration,
    /// The rate-limit gRPC service (Envoy's `rate_limit_service`); loopback in a pod. The
    /// default is the port the operator's Envoy bootstrap points at.
    #[arg(long, default_value = "127.0.0.1:15081")]
    grpc_addr: SocketAddr,
    /// /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9102")]
    http_addr: SocketAddr,
    /// The lease API (/v1/leases/...) the pod's containers call; keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15082")]
    lease_addr: SocketAddr,
    /// This pod's name (the downward API's metadata.name); holder ids start with
    /// NAMESPACE/POD. Defaults to $HOSTNAME, then the host name: in a pod, both are the pod
    /// name.
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This pod's namespace (the downward API's metadata.namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pod_namespace: String,
    /// Keep this lease on the pod's behalf and report whether the pod leads
    /// (GET /v1/leases/LEASE/leader, and --leader-dir). Repeatable.
    #[arg(long = "leader", value_name = "LEASE", env = "BREAKWATER_LEADER", value_delimiter = ',')]
    leaders: Vec<String>,
    /// While the pod leads a --leader lease, DIR/LEASE holds its fencing token; the file is
    /// removed when the pod steps down.
    #[arg(long, value_name = "DIR", env = "BREAKWATER_LEADER_DIR")]
    leader_dir: Option<PathBuf>,
    /// How long one lease operation waits for Redis before failing (503 StoreUnavailable).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    lease_deadline: Duration,
    /// Redis URL (`redis://[:password@]host:port[/db]`). Without it (and without
    /// --redis-cluster), counters are kept in memory: correct for one agent only.
    #[arg(long, env = "BREAKWATER_REDIS_URL", conflicts_with = "redis_cluster")]
    redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma-separated URLs.
    #[arg(long, env = "BREAKWATER_REDIS_CLUSTER", value_delimiter = ',')]
    redis_cluster: Vec<String>,
    /// Multiplexed Redis connections to spread decisions over.
    #[arg(long, default_value_t = 1)]
    redis_connections: usize,
    /// How long a decision waits for Redis before answering by the rule's failure mode.
    #[arg(long, default_value = "5ms", value_parser = parse_duration)]
    deadline: Duration,
    /// Prefix of every counter key.
    #[arg(long, default_value = "bw")]
    key_prefix: String,
    /// Over-limit counters remembered locally (0 disables the cache).
    #[arg(long, default_value_t = 65_536)]
    over_limit_cache: usize,
    /// Worker threads (default: one per core).
    #[arg(long)]
    worker_threads: Option<usize>,
    #[arg(long, env = "BREAKWATER_LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// text or json
    #[arg(long, env = "BREAKWATER_LOG_FORMAT", default_value = "text")]
    log_format: String,
}

/// A flag's duration, in the grammar of [`breakwater_api::duration`].
fn parse_duration(text: &str) -> Result<Duration, breakwater_api::duration::InvalidDuration> {
    breakwater_api::duration::parse(text)
}

fn init_logging(cli: &Cli) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cli.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(n) = cli.worker_threads {
        runtime.worker_threads(n.max(1));
    }
    let runtime = match runtime.build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(start(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// The settings the flags describe.
fn settings(cli: &Cli) -> Result<Settings> {
    let pod = pod_id(cli.pod_name.clone(), &cli.pod_namespace)?;
    let config = match (&cli.config, &cli.xds_endpoint) {
        (Some(path), _) => ConfigSource::File { path: path.clone(), poll: cli.config_poll },
        // clap requires one of the two.
        (None, endpoint) => ConfigSource::Xds { endpoint: endpoint.clone().unwrap_or_default() },
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
        },
        leases: LeaseSettings {
            leaders: cli.leaders.clone(),
            leader: LeaderSettings { dir: cli.leader_dir.clone(), ..LeaderSettings::default() },
            deadline: cli.lease_deadline,
        },
    })
}

async fn start(cli: Cli) -> Result<()> {
    let settings = settings(&cli)?;
    breakwater_agent::run::check(&settings)?;
    let listeners = Listeners::bind(cli.grpc_addr, cli.http_addr, cli.lease_addr).await?;
    breakwater_agent::run::run_with_xds_token(
        listeners,
        settings,
        cli.xds_token_file.clone(),
        shutdown_signal(),
    )
    .await
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
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
