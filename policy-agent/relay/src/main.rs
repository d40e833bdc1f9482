//! `breakwater-relay`: parse flags, start logging, relay (or replay parked rows).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use breakwater_api::OutboxRelaySpec;
use breakwater_relay::{
    Error, Result, fence,
    metrics::Metrics,
    relay::{self, Relay},
    report::Reporter,
    sink::{Sink, redis::RedisStreams},
};
use breakwater_store::{RedisConnection, RedisSettings, RedisTopology, lease::RedisLeases};
use clap::{Args, Parser, Subcommand};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-relay",
    version,
    about = "Relays a PostgreSQL outbox to a broker, at least once, in order per aggregate"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[arg(long, global = true, env = "BREAKWATER_LOG_LEVEL", default_value = "info")]
    log_level: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Relay until SIGTERM: contend for the relay lease; the holder publishes.
    Run(RunArgs),
    /// Move every row parked in the dead-letter table back to the end of its aggregate.
    Replay(RelayArgs),
}

#[derive(Args, Debug)]
struct RelayArgs {
    /// The OutboxRelay, NAMESPACE/NAME (the fence row, the attempts and the lease are its).
    #[arg(long, env = "BREAKWATER_RELAY")]
    relay: String,
    /// The OutboxRelay's spec as JSON (the operator sets it from the resource).
    #[arg(long, env = "BREAKWATER_RELAY_SPEC")]
    spec: String,
    /// A file holding the PostgreSQL URL (the connection Secret, mounted by Kubernetes): the
    /// URL is never a flag or an environment variable, so it shows in no process listing.
    #[arg(long, env = "BREAKWATER_POSTGRES_URL_FILE")]
    postgres_url_file: PathBuf,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    relay: RelayArgs,
    /// The agents' Redis: the relay lease, and the Redis Streams sink.
    #[arg(long, env = "BREAKWATER_REDIS_URL", hide_env_values = true)]
    redis_url: String,
    /// The agents' Redis key prefix.
    #[arg(long, env = "BREAKWATER_REDIS_KEY_PREFIX", default_value = "bw")]
    key_prefix: String,
    /// This replica, in the lease (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "breakwater-relay")]
    holder: String,
    /// How long the lease lasts unless renewed (renewed every third of it).
    #[arg(long, default_value = "10s", value_parser = breakwater_api::duration::parse)]
    lease_ttl: Duration,
    /// /healthz, /readyz and /metrics.
    #[arg(long, default_value = "0.0.0.0:9102")]
    http_addr: SocketAddr,
}

impl RelayArgs {
    fn load(&self) -> Result<(String, Relay, OutboxRelaySpec)> {
        let spec: OutboxRelaySpec =
            serde_json::from_str(&self.spec).map_err(|error| Error::Spec(format!("--spec: {error}")))?;
        let url = std::fs::read_to_string(&self.postgres_url_file)
            .map_err(|source| Error::Read { path: self.postgres_url_file.display().to_string(), source })?
            .trim()
            .to_string();
        let relay = Relay {
            name: self.relay.clone(),
            table: spec.source.postgres.table.clone(),
            delivery: spec.delivery.clone(),
        };
        Ok((url, relay, spec))
    }
}

async fn sink(spec: &OutboxRelaySpec, redis_url: &str) -> Result<Sink> {
    match (&spec.sink.redis_stream, &spec.sink.nats, &spec.sink.webhook) {
        (Some(redis), _, _) => {
            Ok(Sink::Redis(RedisStreams::connect(redis_url, redis.stream.clone(), redis.max_len).await?))
        }
        _ => Err(Error::Spec("this build relays to Redis Streams only".to_string())),
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let (url, relay, spec) = args.relay.load()?;
    let sink = Arc::new(sink(&spec, &args.redis_url).await?);
    let topology = RedisTopology::Standalone(args.redis_url.clone());
    let redis = RedisConnection::start(RedisSettings::new(topology)).await?;
    let leases = RedisLeases::new(redis.clone(), args.key_prefix.clone(), Duration::from_secs(1));
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| Error::Bind { addr: args.http_addr, source })?;
    let (stop_tx, stop) = watch::channel(false);
    let (token_tx, token) = watch::channel(None);
    tracing::info!(relay = relay.name, table = relay.table, sink = sink.describe(), "relay starting");
    let holder = format!("{}/{:016x}", args.holder, fastrand::u64(..));
    let lease = tokio::spawn(fence::hold(
        leases,
        fence::lease_id(&relay.name),
        holder,
        args.lease_ttl,
        token_tx,
        stop.clone(),
    ));
    let http =
        tokio::spawn(breakwater_relay::http::serve(listener, metrics.clone(), token.clone(), stop.clone()));
    let reporter = Reporter::new(redis, args.key_prefix, relay.name.clone(), args.holder.clone());
    let relaying = tokio::spawn(relay::run(url, relay, sink, token, metrics, reporter, stop));
    shutdown_signal().await;
    tracing::info!("stopping: the batch in flight finishes, then the lease is released");
    let _ = stop_tx.send(true);
    let _ = relaying.await;
    let _ = lease.await;
    let _ = http.await;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Replay(args) => {
                let (url, relay, _) = args.load()?;
                let moved = relay::replay(&url, &relay).await?;
                println!("moved {moved} parked row(s) back into {}", relay.table);
                Ok(())
            }
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}
