//! `breakwater-operator`: parse arguments, set up logging, hand over to the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use breakwater_operator::{error::Report, inventory::ObjectName, run, standalone, telemetry};
use breakwater_store::RedisTopology;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-operator",
    version,
    about = "Kubernetes resilience policies: reconcile, or evaluate files standalone"
)]
struct Cli {
    /// Log level (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info", env = "BREAKWATER_LOG_LEVEL")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value = "text", env = "BREAKWATER_LOG_FORMAT")]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Reconcile Breakwater resources in the cluster (uses the in-cluster config or KUBECONFIG).
    Run {
        /// Policies here may select other namespaces and set mode Default/Override.
        #[arg(long, default_value = "breakwater-system", env = "BREAKWATER_ROOT_NAMESPACE")]
        root_namespace: String,
        /// Address of /healthz, /readyz and /metrics.
        #[arg(long, default_value = "0.0.0.0:8080")]
        metrics_addr: SocketAddr,
        /// Address of the ADS (xDS) server that Envoy sidecars and agents connect to.
        #[arg(long, default_value = "0.0.0.0:18000")]
        xds_addr: SocketAddr,
        #[command(flatten)]
        webhook: WebhookFlags,
        /// Elect a leader among replicas with a Lease (disable only with a single replica).
        #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
        leader_election: bool,
        /// Namespace of the leader Lease (normally the operator's own).
        #[arg(long, env = "POD_NAMESPACE", default_value = "breakwater-system")]
        leader_election_namespace: String,
        /// This replica's identity.
        #[arg(long, env = "POD_NAME", default_value = "breakwater-operator")]
        identity: String,
        /// The pod this replica runs in: while it leads, it labels the pod
        /// breakwater.dev/serving-xds, which the chart's xDS Service selects. Unset outside a pod.
        #[arg(long, env = "POD_NAME")]
        pod_name: Option<String>,
        /// The namespace of that pod.
        #[arg(long, env = "POD_NAMESPACE")]
        pod_namespace: Option<String>,
        /// Redis the agents keep leases in (redis://[:password@]host:port[/db], rediss:// for
        /// TLS): LockLease status shows who holds each lease. Without it, Held is Unknown.
        #[arg(long, env = "BREAKWATER_REDIS_URL", hide_env_values = true, conflicts_with = "redis_cluster")]
        redis_url: Option<String>,
        /// Or the seed nodes of the Redis Cluster the agents use (their --redis-cluster),
        /// comma-separated URLs.
        #[arg(long, env = "BREAKWATER_REDIS_CLUSTER", hide_env_values = true, value_delimiter = ',')]
        redis_cluster: Vec<String>,
        /// The agents' Redis key prefix (their --key-prefix).
        #[arg(long, env = "BREAKWATER_REDIS_KEY_PREFIX", default_value = breakwater_operator::lease::DEFAULT_KEY_PREFIX)]
        redis_key_prefix: String,
        /// The audience of the projected ServiceAccount token every ADS stream must present
        /// (`authorization: Bearer <token>`), checked with a TokenReview.
        #[arg(long, default_value = breakwater_operator::xds::DEFAULT_AUDIENCE)]
        xds_token_audience: String,
        /// The image each accepted OutboxRelay's Deployment runs /usr/local/bin/breakwater-relay
        /// from (the chart passes the operator's own image).
        #[arg(long, default_value = breakwater_operator::relay::DEFAULT_IMAGE)]
        relay_image: String,
        /// The Secret, in each OutboxRelay's namespace, whose key `url` holds the agents' Redis
        /// URL, which the relay's pods read (a pod cannot read another namespace's Secret).
        #[arg(long, default_value = breakwater_operator::relay::DEFAULT_REDIS_SECRET)]
        relay_redis_secret: String,
    },
    /// Evaluate policies from YAML files, without a cluster.
    Standalone {
        /// Directory of YAML files (read recursively, multi-document).
        #[arg(long, default_value = "examples")]
        dir: PathBuf,
        /// The root namespace, as in `run`.
        #[arg(long, default_value = "breakwater-system")]
        root_namespace: String,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "table")]
        output: standalone::Format,
        /// Print once and exit: 0 all accepted, 1 some not accepted, 2 unreadable files.
        #[arg(long)]
        once: bool,
        /// Where to serve ADS while running (not with --once), so proxies can connect.
        #[arg(long, default_value = "127.0.0.1:18000")]
        xds_addr: SocketAddr,
    },
    /// Print the Envoy and agent configuration compiled for a proxy (or for every Pod in
    /// DIR) as protobuf-JSON/YAML, with the sidecar bootstrap, without a cluster.
    Render {
        /// Directory of YAML files, as for `standalone` (Pods and EndpointSlices included).
        #[arg(long, default_value = "examples")]
        dir: PathBuf,
        /// The proxy to render, as its node id NAMESPACE/POD; every Pod in DIR when omitted.
        #[arg(long)]
        proxy: Option<String>,
        /// Output format.
        #[arg(long, short, value_enum, default_value = "yaml")]
        output: breakwater_operator::render::Format,
        /// The root namespace, as in `run`.
        #[arg(long, default_value = "breakwater-system")]
        root_namespace: String,
    },
    /// Print the RBAC rules the operator needs, as JSON (the chart test checks against it).
    Rbac,
    /// Print the pods of a YAML file as the injection webhook would admit them (manual
    /// injection; also checks an injection configuration file).
    Inject {
        /// The injection configuration (the chart's ConfigMap); the defaults when omitted.
        #[arg(long)]
        config: Option<PathBuf>,
        /// YAML file of Pods (multi-document).
        #[arg(long, short)]
        file: PathBuf,
        /// The namespace of pods that do not name theirs.
        #[arg(long, default_value = "default")]
        namespace: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(&cli.log_level, cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Run {
                root_namespace,
                metrics_addr,
                xds_addr,
                webhook,
                leader_election,
                leader_election_namespace,
                identity,
                pod_name,
                pod_namespace,
                redis_url,
                redis_cluster,
                redis_key_prefix,
                xds_token_audience,
                relay_image,
                relay_redis_secret,
            } => {
                let webhook = match webhook.options(pod_namespace.as_deref()) {
                    Ok(webhook) => webhook,
                    Err(problem) => {
                        tracing::error!("{problem}");
                        return ExitCode::FAILURE;
                    }
                };
                run::install_tls_provider();
                let client = match kube::Client::try_default().await {
                    Ok(client) => client,
                    Err(err) => {
                        tracing::error!(error = %Report(&err), "cannot configure a Kubernetes client");
                        return ExitCode::FAILURE;
                    }
                };
                let options = run::Options {
                    root_namespace,
                    metrics_addr,
                    xds_addr,
                    webhook,
                    relays: breakwater_operator::relay::Settings {
                        image: relay_image,
                        redis_secret: relay_redis_secret,
                        key_prefix: redis_key_prefix.clone(),
                    },
                    leader_election_namespace: leader_election.then_some(leader_election_namespace),
                    identity,
                    pod: pod_name
                        .zip(pod_namespace)
                        .map(|(name, namespace)| ObjectName::new(namespace, name)),
                    redis: redis_topology(redis_url, redis_cluster).map(|topology| {
                        breakwater_operator::lease::RedisOptions {
                            topology,
                            key_prefix: redis_key_prefix.clone(),
                        }
                    }),
                    xds_token_audience,
                };
                match run::run(client, options, shutdown_signal()).await {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(err) => {
                        tracing::error!(error = %Report(&err), "operator stopped");
                        ExitCode::FAILURE
                    }
                }
            }
            Command::Standalone { dir, root_namespace, output, once, xds_addr } => {
                let options = standalone::Options {
                    dir,
                    root_namespace,
                    format: output,
                    once,
                    xds_addr: Some(xds_addr),
                };
                match standalone::run(options, shutdown_signal()).await {
                    Ok(code) => ExitCode::from(code),
                    Err(err) => {
                        eprintln!("error: {}", Report(&err));
                        ExitCode::from(standalone::exit::UNREADABLE)
                    }
                }
            }
            Command::Render { dir, proxy, output, root_namespace } => {
                let options =
                    breakwater_operator::render::Options { dir, root_namespace, proxy, format: output };
                ExitCode::from(breakwater_operator::render::run(&options))
            }
            Command::Inject { config, file, namespace } => {
                ExitCode::from(breakwater_operator::inject::run_manual(config.as_deref(), &file, &namespace))
            }
            Command::Rbac => {
                println!("{:#}", breakwater_operator::rbac::to_json());
                ExitCode::SUCCESS
            }
        }
    })
}

/// The sidecar injection webhook's flags (docs/injection.md).
#[derive(clap::Args, Debug)]
struct WebhookFlags {
    /// Serve the sidecar injection webhook (HTTPS, path /inject) here. Unset: no webhook.
    #[arg(long, requires = "inject_config")]
    webhook_addr: Option<SocketAddr>,
    /// What the webhook injects (YAML; the chart's ConfigMap): images, the operator's xDS
    /// address, the token audience, resources. Read once at start.
    #[arg(long, env = "BREAKWATER_INJECT_CONFIG")]
    inject_config: Option<PathBuf>,
    /// The operator issues the webhook's CA and certificate into this Secret of its own
    /// namespace (POD_NAMESPACE) and renews them. Or use --webhook-cert-dir.
    #[arg(long, conflicts_with = "webhook_cert_dir", requires_all = ["webhook_configuration", "webhook_dns_names"])]
    webhook_cert_secret: Option<String>,
    /// The MutatingWebhookConfiguration whose caBundle the operator keeps current (with
    /// --webhook-cert-secret).
    #[arg(long)]
    webhook_configuration: Option<String>,
    /// The names the webhook's certificate is issued for: its Service's DNS names,
    /// comma-separated (with --webhook-cert-secret).
    #[arg(long, value_delimiter = ',')]
    webhook_dns_names: Vec<String>,
    /// A directory with tls.crt and tls.key kept by someone else (a cert-manager
    /// Certificate's Secret, mounted), reloaded when they change.
    #[arg(long)]
    webhook_cert_dir: Option<PathBuf>,
}

impl WebhookFlags {
    fn options(
        self,
        namespace: Option<&str>,
    ) -> Result<Option<breakwater_operator::inject::WebhookOptions>, String> {
        use breakwater_operator::inject::{self, certs};
        let Some(addr) = self.webhook_addr else { return Ok(None) };
        let path = self.inject_config.ok_or("--webhook-addr needs --inject-config")?;
        let config = inject::Config::load(&path).map_err(|err| Report(&err).to_string())?;
        let certs = match (self.webhook_cert_dir, self.webhook_cert_secret) {
            (Some(dir), None) => certs::Source::Files(dir),
            (None, Some(secret)) => certs::Source::Managed {
                namespace: namespace
                    .ok_or("--webhook-cert-secret needs POD_NAMESPACE (--pod-namespace)")?
                    .to_string(),
                secret,
                configuration: self.webhook_configuration.unwrap_or_default(),
                dns_names: self.webhook_dns_names,
                lifetimes: certs::Lifetimes::default(),
            },
            _ => return Err("--webhook-addr needs --webhook-cert-secret or --webhook-cert-dir".to_string()),
        };
        Ok(Some(inject::WebhookOptions {
            addr,
            config,
            certs,
            cert_check: std::time::Duration::from_secs(60),
        }))
    }
}

/// The agents' Redis, from `--redis-url` or `--redis-cluster` (empty values count as unset,
/// as a chart renders them).
fn redis_topology(url: Option<String>, cluster: Vec<String>) -> Option<RedisTopology> {
    let seeds: Vec<String> = cluster.into_iter().filter(|seed| !seed.is_empty()).collect();
    match url.filter(|url| !url.is_empty()) {
        Some(url) => Some(RedisTopology::Standalone(url)),
        None => (!seeds.is_empty()).then_some(RedisTopology::Cluster(seeds)),
    }
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("interrupted; shutting down"),
        () = term => tracing::info!("SIGTERM; shutting down"),
    }
}

#[cfg(test)]
mod redis_flags {
    use super::*;

    #[test]
    fn standalone_cluster_or_none() {
        let url = || Some("redis://r:6379".to_string());
        assert_eq!(redis_topology(url(), vec![]), Some(RedisTopology::Standalone("redis://r:6379".into())));
        let seeds = vec!["redis://a:6379".to_string(), String::new()];
        assert_eq!(redis_topology(None, seeds), Some(RedisTopology::Cluster(vec!["redis://a:6379".into()])));
        assert_eq!(redis_topology(Some(String::new()), vec![String::new()]), None);
        let both = Cli::try_parse_from([
            "breakwater-operator",
            "run",
            "--redis-url",
            "redis://r",
            "--redis-cluster",
            "redis://a",
        ]);
        assert!(both.is_err(), "one Redis or the other");
    }
}
