//! Where the agent's configuration comes from, and the loop that applies each one: the
//! operator's xDS server (what a pod's agent uses: [`crate::ads`] subscribes and publishes
//! what it ACKs), a file (YAML or JSON, re-read when it changes — standalone use, tests, a
//! ConfigMap) or a watch channel (tests). It sits above both [`crate::config`] and
//! [`crate::ads`], which know nothing of each other's loops.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use breakwater_api::agent::AgentConfig;
use tokio::sync::watch;

use crate::ads::{self, AdsSettings};
use crate::config::{OnSwap, RuleHolder, apply, read_file};
use crate::metrics::Metrics;

/// Where the configuration comes from.
#[derive(Debug)]
pub enum ConfigSource {
    /// The operator's xDS server (`http://HOST:PORT`): the agent subscribes to its own
    /// configuration there with the pod's id as node id, as the pod's Envoy does, presenting
    /// the pod's projected ServiceAccount token from `token_file` when set.
    Xds { endpoint: String, token_file: Option<PathBuf> },
    /// A YAML or JSON file holding an [`AgentConfig`], checked for changes every `poll`
    /// (by modification time, size and content, so ConfigMap symlink swaps are seen).
    File { path: PathBuf, poll: Duration },
    /// Configurations pushed by another task (the ADS client, tests); `None` means none yet.
    Channel(watch::Receiver<Option<AgentConfig>>),
}

/// Follows `source` until `stop` fires, applying every configuration it yields; `pod`
/// (`NAMESPACE/POD`) is whose configuration to ask the xDS server for.
pub async fn follow(
    source: ConfigSource,
    pod: String,
    holder: Arc<RuleHolder>,
    metrics: Arc<Metrics>,
    on_swap: Arc<OnSwap>,
    mut stop: watch::Receiver<bool>,
) {
    match source {
        ConfigSource::Xds { endpoint, token_file } => {
            let (configs, received) = watch::channel(None);
            let settings = AdsSettings { token_file, ..AdsSettings::new(endpoint, pod) };
            let ads = tokio::spawn(ads::follow(settings, configs, stop.clone()));
            let channel = ConfigSource::Channel(received);
            Box::pin(follow(channel, String::new(), holder, metrics, on_swap, stop)).await;
            let _ = ads.await;
        }
        ConfigSource::File { path, poll } => {
            let mut last: Option<(Option<SystemTime>, u64, String)> = None;
            loop {
                let stamp = std::fs::metadata(&path).ok().map(|m| (m.modified().ok(), m.len()));
                let changed = match (&last, &stamp) {
                    (Some((mtime, len, _)), Some((m, l))) => mtime != m || len != l,
                    _ => true,
                };
                if changed {
                    match read_file(&path) {
                        Ok((config, text)) => {
                            let same = last.as_ref().is_some_and(|(_, _, old)| *old == text);
                            if !same && let Err(error) = apply(&holder, &metrics, &config, &*on_swap) {
                                tracing::error!(%error, "configuration refused; keeping the previous one");
                            }
                            let (m, l) = stamp.unwrap_or((None, 0));
                            last = Some((m, l, text));
                        }
                        Err(error) => {
                            if last.is_some() || holder.load().is_none() {
                                tracing::error!(%error, "configuration unreadable; keeping the previous one");
                                metrics.config_rejected();
                            }
                            // Retry on the next poll even if the stamp stays the same.
                            last = None;
                        }
                    }
                }
                tokio::select! {
                    _ = stop.changed() => return,
                    _ = tokio::time::sleep(poll) => {}
                }
            }
        }
        ConfigSource::Channel(mut rx) => loop {
            let config = rx.borrow_and_update().clone();
            if let Some(config) = config
                && let Err(error) = apply(&holder, &metrics, &config, &*on_swap)
            {
                tracing::error!(%error, "configuration refused; keeping the previous one");
            }
            tokio::select! {
                _ = stop.changed() => return,
                changed = rx.changed() => if changed.is_err() { return },
            }
        },
    }
}
