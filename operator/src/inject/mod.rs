//! Sidecar injection: a mutating admission webhook that gives the pods of labelled
//! namespaces Envoy and `breakwater-agent` as native sidecars, and the traffic capture that
//! sends their connections through Envoy (docs/injection.md).
//!
//! `config` is what the chart sets, `pod` the mutation (pure), `quantity` the one check of
//! resource annotations, `certs` the serving certificate and its CA, `webhook` the HTTPS
//! endpoint.

pub mod certs;
pub mod config;
pub mod pod;
pub mod quantity;
pub mod webhook;

pub use config::{Config, Mode};
pub use webhook::Injector;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    error::{Error, Result},
    http::State,
};

/// The webhook as `run` starts it.
#[derive(Clone, Debug)]
pub struct WebhookOptions {
    pub addr: SocketAddr,
    pub config: Config,
    pub certs: certs::Source,
    /// How often the certificate is checked (renewed when due, reloaded when changed).
    pub cert_check: Duration,
}

/// Binds the webhook's port, then serves it and keeps its certificate until `stop`. Every
/// replica serves: admission does not wait for leadership.
pub async fn start(
    client: kube::Client,
    options: WebhookOptions,
    state: Arc<State>,
    stop: CancellationToken,
) -> Result<()> {
    let injector = Arc::new(Injector::new(options.config)?);
    let listener = tokio::net::TcpListener::bind(options.addr)
        .await
        .map_err(|source| Error::Bind { addr: options.addr, source })?;
    let addr = listener.local_addr().unwrap_or(options.addr);
    let resolver = Arc::new(certs::Resolver::default());
    tracing::info!(%addr, certs = ?options.certs, "serving the sidecar injection webhook");
    tokio::spawn(certs::keep(client, options.certs, resolver.clone(), options.cert_check, stop.clone()));
    tokio::spawn(async move {
        if let Err(err) = webhook::serve(listener, injector, resolver, state, stop).await {
            tracing::error!(error = %crate::error::Report(&err), "the webhook server stopped");
        }
    });
    Ok(())
}

/// `breakwater-operator inject`: what the webhook would do to the pods of a YAML file, printed
/// as YAML (manual injection, and a check of a configuration file). Returns the exit code: 0
/// printed, 1 a pod was refused (the reason on stderr), 2 unreadable input.
pub fn run_manual(config: Option<&std::path::Path>, file: &std::path::Path, namespace: &str) -> u8 {
    match manual(config, file, namespace) {
        Ok((printed, refused)) => {
            print!("{printed}");
            u8::from(refused)
        }
        Err(err) => {
            eprintln!("error: {}", crate::error::Report(&err));
            2
        }
    }
}

fn manual(
    config: Option<&std::path::Path>,
    file: &std::path::Path,
    namespace: &str,
) -> Result<(String, bool)> {
    let config = match config {
        Some(path) => Config::load(path)?,
        None => Config::default(),
    };
    let injector = Injector::new(config)?;
    let text =
        std::fs::read_to_string(file).map_err(|source| Error::Read { path: file.to_path_buf(), source })?;
    let mut printed = String::new();
    let mut refused = false;
    for document in serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .map_err(|err| Error::InjectConfig(format!("{}: {err}", file.display())))?
    {
        let namespace = document.pointer("/metadata/namespace").and_then(|n| n.as_str()).unwrap_or(namespace);
        let out = match injector.decide(&document, namespace) {
            pod::Decision::Inject { pod, .. } => pod,
            pod::Decision::Skip(why) => {
                eprintln!("note: not injected ({})", why.as_str());
                document
            }
            pod::Decision::Deny(message) => {
                eprintln!("error: {message}");
                refused = true;
                continue;
            }
        };
        printed.push_str("---\n");
        printed.push_str(&serde_saphyr::to_string(&out).map_err(Error::PrintYaml)?);
    }
    Ok((printed, refused))
}
