//! `breakwater-relay`: parse flags, start logging, relay (or replay parked rows).

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use breakwater_api::OutboxRelaySpec;
use breakwater_relay::{
    Error, Result,
    relay::{self, Relay},
    run::Settings,
};
use clap::{Args, Parser, Subcommand};

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
        Ok((url, Settings::relay_of(&self.relay, &spec), spec))
    }
}

async fn run(args: RunArgs) -> Result<()> {
    let (postgres_url, relay, spec) = args.relay.load()?;
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| Error::Bind { addr: args.http_addr, source })?;
    let settings = Settings {
        relay,
        spec,
        postgres_url,
        redis_url: args.redis_url,
        key_prefix: args.key_prefix,
        holder: args.holder,
        lease_ttl: args.lease_ttl,
    };
    breakwater_relay::run::run(settings, listener, shutdown_signal()).await
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
