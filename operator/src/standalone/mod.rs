//! Standalone mode: the controllers' validation, target resolution and merge, run on YAML
//! files instead of an API server. `--once` prints the outcome and exits; otherwise the
//! files are watched and every change is re-evaluated.

pub mod load;
pub mod output;

use std::{
    collections::BTreeMap,
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
    time::Duration,
};

use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use self::load::Loaded;
use crate::{
    compile::Compiled,
    error::{Error, Report, Result},
    http::State,
    inventory::ObjectName,
    policy::{
        Assessment, Verdict, breaker,
        lock_lease::{self, LeaseFields, Observation},
        reason, shadow,
    },
    resource::Policy,
    status::{self, Findings, OwnedStatus},
    xds::{self, AdsServer, SnapshotCache},
};

/// How the outcome is printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A table like `kubectl get`.
    Table,
    /// Every object with its computed status, as a `kind: List`.
    Json,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub dir: PathBuf,
    pub root_namespace: String,
    pub format: Format,
    pub once: bool,
    /// Where to serve ADS (not with `once`); None serves none.
    pub xds_addr: Option<std::net::SocketAddr>,
}

/// Exit codes of `standalone`.
pub mod exit {
    pub const ACCEPTED: u8 = 0;
    pub const NOT_ACCEPTED: u8 = 1;
    pub const UNREADABLE: u8 = 2;
}

/// One evaluated object: what it is and the status the API server would hold for it.
#[derive(Clone, Debug)]
pub struct Row {
    pub kind: String,
    pub name: ObjectName,
    pub object: Value,
    pub status: OwnedStatus,
}

impl Row {
    pub fn accepted(&self) -> bool {
        self.status.conditions.iter().any(|c| c.type_ == "Accepted" && c.status == "True")
    }
}

type Previous = BTreeMap<(String, ObjectName), Vec<Condition>>;

/// Evaluates every loaded object. `previous` holds the conditions of the last evaluation, so
/// that transition times only move on a change, as in the cluster.
pub fn evaluate(loaded: &Loaded, cache: Option<&SnapshotCache>, previous: &Previous, now: &Time) -> Vec<Row> {
    let inventory = &loaded.inventory;
    let policies = Policy::all(inventory).into_iter().map(|policy| {
        let generation = policy.meta().generation;
        let findings = Findings {
            assessment: policy.assess(inventory),
            acknowledgements: cache
                .map(|cache| cache.acknowledgements(policy.kind(), &policy.name(), generation.unwrap_or(1))),
            // Standalone mode reads no Redis: who holds a lease is not known here.
            lease: policy
                .lease()
                .map(|lease| lock_lease::report(Observation::NoStore, &lease.spec, &LeaseFields::default())),
            // Nor does it run relays: an OutboxRelay has no Deployment whose readiness to
            // report, so it has no Ready condition here.
            relay: None,
            // Nor the breakers' state, nor what shadow limits would have rejected.
            breakers: policy.breaker_section().map(|_| {
                breaker::report(&breaker::targets(&policy.name(), inventory), breaker::Observation::NoStore)
            }),
            shadow: policy.shadow_limits().map(|_| {
                shadow::report(&shadow::limits(&policy.name(), inventory), shadow::Observation::NoStore)
            }),
        };
        (policy.kind().to_string(), policy.name(), policy.to_json(), findings, generation)
    });
    // What the schema refuses is not accepted; whatever the proxies say is never asked.
    let rejected = loaded.rejected.iter().map(|rejected| {
        let assessment = Assessment {
            accepted: Verdict::fail(reason::INVALID, rejected.errors.join("; ")),
            resolved_refs: None,
            targets: None,
        };
        let findings = Findings {
            assessment,
            acknowledgements: None,
            lease: None,
            relay: None,
            breakers: None,
            shadow: None,
        };
        (rejected.kind.clone(), rejected.name.clone(), rejected.object.clone(), findings, None)
    });
    let mut rows: Vec<Row> = policies
        .chain(rejected)
        .map(|(kind, name, object, findings, generation)| {
            let before = previous.get(&(kind.clone(), name.clone())).map(Vec::as_slice).unwrap_or_default();
            let status = status::assemble(findings, generation, before, now);
            Row { kind, name, object, status }
        })
        .collect();
    rows.sort_by(|a, b| (&a.kind, &a.name).cmp(&(&b.kind, &b.name)));
    rows
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Loads the directory and reports what the API server would refuse; None when a file
/// cannot be read or parsed (reported too).
fn load_and_report(options: &Options) -> Option<Loaded> {
    let loaded = match load::load_dir(&options.dir, &options.root_namespace) {
        Ok(loaded) => loaded,
        Err(err) => {
            eprintln!("error: {}", Report(&err));
            return None;
        }
    };
    for rejected in &loaded.rejected {
        for error in &rejected.errors {
            eprintln!("error: {}: {} {} is invalid: {error}", rejected.source, rejected.kind, rejected.name);
        }
    }
    for (source, what) in &loaded.ignored {
        eprintln!(
            "note: {source}: ignoring {what} (standalone mode reads Namespaces, Services, EndpointSlices, Pods, Secrets and Breakwater kinds)"
        );
    }
    Some(loaded)
}

/// Evaluates and renders the outcome; remembers the conditions for transition times.
fn evaluate_and_render(
    loaded: &Loaded,
    cache: Option<&SnapshotCache>,
    format: Format,
    previous: &mut Previous,
) -> (String, u8) {
    let rows = evaluate(loaded, cache, previous, &now());
    let printed = match format {
        Format::Table => output::table(&rows),
        Format::Json => output::json(&rows),
    };
    *previous =
        rows.iter().map(|r| ((r.kind.clone(), r.name.clone()), r.status.conditions.clone())).collect();
    let code = if rows.iter().all(Row::accepted) { exit::ACCEPTED } else { exit::NOT_ACCEPTED };
    (printed, code)
}

/// Runs standalone mode until `shutdown` resolves (or once, with `--once`). Without
/// `--once` it also serves ADS, so proxies (or test clients) can connect and acknowledge,
/// and reprints whenever the outcome changes: files edited, or a proxy ACKed or NACKed.
pub async fn run(options: Options, shutdown: impl std::future::Future<Output = ()>) -> Result<u8> {
    let mut previous = Previous::new();
    if options.once {
        let Some(loaded) = load_and_report(&options) else { return Ok(exit::UNREADABLE) };
        let (printed, code) = evaluate_and_render(&loaded, None, options.format, &mut previous);
        println!("{printed}");
        return Ok(code);
    }
    let cache = Arc::new(SnapshotCache::default());
    let stop = CancellationToken::new();
    let _stop_on_return = stop.clone().drop_guard();
    if let Some(addr) = options.xds_addr {
        let listener =
            tokio::net::TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let addr = listener.local_addr().unwrap_or(addr);
        // No API server to review tokens with: whatever node id a client sends is believed,
        // which is safe only where no other pod can connect.
        tracing::info!(
            %addr,
            "serving ADS; proxies connect with node id NAMESPACE/POD. ADS streams are not authenticated in standalone mode"
        );
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "unauthenticated ADS on a non-loopback address: anyone who reaches it can read any proxy's configuration");
        }
        let ads = AdsServer::unauthenticated(cache.clone(), Arc::new(State::default()));
        tokio::spawn(xds::serve(listener, ads, stop.clone().cancelled_owned()));
    }
    let mut changes = cache.subscribe_changes();
    let mut seen = fingerprint(&options.dir);
    let mut loaded = load_and_report(&options);
    if let Some(loaded) = &loaded {
        publish(&cache, loaded);
    }
    let mut code = exit::UNREADABLE;
    let mut last = String::new();
    tokio::pin!(shutdown);
    loop {
        if let Some(current) = &loaded {
            let (printed, status) = evaluate_and_render(current, Some(&cache), options.format, &mut previous);
            code = status;
            if printed != last {
                println!("{printed}");
                last = printed;
            }
        }
        tokio::select! {
            () = &mut shutdown => return Ok(code),
            changed = changes.changed() => if changed.is_err() { return Ok(code) },
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                let current = fingerprint(&options.dir);
                if current != seen {
                    seen = current;
                    tracing::info!(dir = %options.dir.display(), "files changed; re-evaluating");
                    loaded = load_and_report(&options);
                    if let Some(loaded) = &loaded {
                        publish(&cache, loaded);
                    }
                }
            }
        }
    }
}

fn publish(cache: &SnapshotCache, loaded: &Loaded) {
    cache.publish(Compiled::new(&loaded.inventory));
}

/// A hash of every YAML file's path and contents: polling it is portable and cheap for the
/// few files a policy directory holds.
fn fingerprint(dir: &Path) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let mut stack = vec![dir.to_path_buf()];
    let mut files = Vec::new();
    while let Some(path) = stack.pop() {
        match std::fs::read_dir(&path) {
            Ok(entries) => stack.extend(entries.flatten().map(|e| e.path())),
            Err(_) => files.push(path),
        }
    }
    files.sort();
    for file in files.iter().filter(|f| f.extension().is_some_and(|e| e == "yaml" || e == "yml")) {
        file.hash(&mut hasher);
        std::fs::read(file).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}
