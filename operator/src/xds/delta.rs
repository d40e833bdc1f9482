//! Incremental ADS (delta xDS, v3): each response carries only the resources that changed
//! and the names of those removed, so a change to one Service port's timeout sends that
//! port's virtual host alone. Envoy asks for it (`api_type: DELTA_GRPC`, what the sidecar
//! bootstrap says; VHDS works only over it), and so does the agent (one breaker changed is
//! that breaker alone).
//!
//! What a stream sent is remembered as the snapshot it came from, not resource by resource:
//! snapshots share their parts, so the next response is the difference between two
//! snapshots' parts, and a part shared by thousands of streams is compared once per change
//! ([`Diffs`]). ACKs and NACKs reach the cache as the type's version of the snapshot sent,
//! the same version state-of-the-world streams report, so `Programmed` reads both alike.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as WireResource,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::Status;

use super::{
    cache::SnapshotCache,
    server::{Closed, Session},
};
use crate::{
    compile::{Part, Proxy, Resource, Snapshot, wants},
    http::State,
    metrics::TypeLabel,
};

/// What changed in one type between two parts: resources added or changed, names removed.
#[derive(Debug, Default)]
pub(super) struct PartDiff {
    changed: Vec<(String, Arc<Resource>)>,
    removed: Vec<String>,
}

impl PartDiff {
    fn between(before: Option<&Part>, after: Option<&Part>, type_url: &str) -> Self {
        let empty = BTreeMap::new();
        let old = before.and_then(|p| p.resources(type_url)).unwrap_or(&empty);
        let new = after.and_then(|p| p.resources(type_url)).unwrap_or(&empty);
        let changed = new
            .iter()
            .filter(|(name, resource)| {
                old.get(*name).is_none_or(|was| !Arc::ptr_eq(was, resource) && was.any != resource.any)
            })
            .map(|(name, resource)| (name.clone(), resource.clone()))
            .collect();
        let removed = old.keys().filter(|name| !new.contains_key(*name)).cloned().collect();
        Self { changed, removed }
    }
}

/// Part differences worked out by one stream and reused by the others: after a change every
/// stream compares the same two shared parts. Each entry holds both parts, so the addresses
/// it is keyed by cannot be reused while it lives; it is emptied when it grows past a few
/// changes' worth.
#[derive(Debug, Default)]
pub(super) struct Diffs {
    entries: Mutex<HashMap<DiffKey, Pinned>>,
}

/// Two parts by address, and a type.
type DiffKey = (usize, usize, String);

/// The two parts of a key, kept alive, and their difference.
#[derive(Debug)]
struct Pinned {
    _before: Arc<Part>,
    _after: Arc<Part>,
    diff: Arc<PartDiff>,
}

const DIFFS_KEPT: usize = 256;

impl Diffs {
    fn between(&self, before: &Arc<Part>, after: &Arc<Part>, type_url: &str) -> Arc<PartDiff> {
        let key = (Arc::as_ptr(before) as usize, Arc::as_ptr(after) as usize, type_url.to_string());
        let lock = || self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(pinned) = lock().get(&key) {
            return pinned.diff.clone();
        }
        // Worked out outside the lock; two streams racing here both compute it once.
        let diff = Arc::new(PartDiff::between(Some(before), Some(after), type_url));
        let mut entries = lock();
        if entries.len() >= DIFFS_KEPT {
            entries.clear();
        }
        entries.insert(key, Pinned { _before: before.clone(), _after: after.clone(), diff: diff.clone() });
        diff
    }
}

/// One type of one stream. At most one response of the stream is unanswered at a time (as
/// Envoy takes them, one after the other): a change that comes meanwhile is sent as the
/// difference once the client has answered, so what the client holds is always known — the
/// snapshot of its last ACK, or of the response it takes.
#[derive(Debug, Default)]
struct Subscription {
    /// The names asked for; None: every resource of the type (wildcard).
    names: Option<BTreeSet<String>>,
    /// Names asked for since the last response, to be sent whatever changed.
    asked: BTreeSet<String>,
    /// The versions the client said it held when it subscribed (after a reconnect), until
    /// the first response.
    initial: BTreeMap<String, String>,
    /// What the client holds of this type, as the snapshot it came from.
    held: Option<Arc<Snapshot>>,
    /// The unanswered response.
    pending: Option<Pending>,
    /// The snapshot of the last response the client rejected: not sent again.
    rejected: Option<Arc<Snapshot>>,
    /// What is left to send of a snapshot whose changes were too large for one response.
    owed: Option<(Arc<Snapshot>, Changes)>,
}

/// A response the client has not answered yet.
#[derive(Debug)]
struct Pending {
    nonce: String,
    at: Instant,
    /// What the client holds once it takes the response.
    snapshot: Arc<Snapshot>,
    /// Its share of the bytes in flight ([`InFlight`]), until the client answers or
    /// [`PERMIT_HOLD`] passes.
    permit: Option<OwnedSemaphorePermit>,
}

/// What all delta streams may have sent and not had answered, in units of [`UNIT`] bytes:
/// when thousands of proxies connect at once (an operator restart), each is owed its whole
/// configuration (17 MB in `make bench-xds`'s world), and building them all at once would
/// hold gigabytes. A response waits for its share before it is built; the share comes back
/// with the client's answer. A client that never answers holds it for [`PERMIT_HOLD`] only.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Semaphore>);

const UNIT: usize = 64 * 1024;
const IN_FLIGHT_UNITS: usize = 4096; // 256 MiB
const PERMIT_HOLD: Duration = Duration::from_secs(5);

impl Default for InFlight {
    fn default() -> Self {
        Self(Arc::new(Semaphore::new(IN_FLIGHT_UNITS)))
    }
}

impl InFlight {
    async fn take(&self, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let units = bytes.div_ceil(UNIT).clamp(1, IN_FLIGHT_UNITS);
        let units = u32::try_from(units).unwrap_or(u32::MAX);
        // The semaphore is never closed; None would only mean an unthrottled response.
        self.0.clone().acquire_many_owned(units).await.ok()
    }
}

/// A response being put together.
#[derive(Debug, Default)]
struct Changes {
    resources: BTreeMap<String, Arc<Resource>>,
    removed: BTreeSet<String>,
}

impl Changes {
    fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }

    /// The first resources (and every removal) up to about `bytes`, and the rest if any: at
    /// least one resource goes, however large.
    fn split(mut self, bytes: usize) -> (Self, Option<Self>) {
        let mut total = 0;
        let cut = self.resources.iter().position(|(_, r)| {
            total += r.any.value.len();
            total > bytes
        });
        // A resource larger than `bytes` goes alone.
        let Some(at) = cut.map(|at| at.max(1)) else { return (self, None) };
        let Some(first_left) = self.resources.keys().nth(at).cloned() else { return (self, None) };
        let rest = self.resources.split_off(&first_left);
        (self, Some(Changes { resources: rest, removed: BTreeSet::new() }))
    }
}

/// How large a response grows before the rest of a change goes in the next: a stream's
/// transport keeps a buffer as large as the largest message it sent for as long as it lives
/// (tonic's encoder reuses its buffer), so a proxy's first 17 MB in one message would cost
/// 17 MB for the life of its stream.
const RESPONSE_BYTES: usize = 256 * 1024;

pub(super) struct DeltaStream {
    proxy: Proxy,
    cache: Arc<SnapshotCache>,
    state: Arc<State>,
    diffs: Arc<Diffs>,
    in_flight: Arc<InFlight>,
    tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    types: BTreeMap<String, Subscription>,
    /// Types with something to send once the unanswered response is answered.
    due: BTreeSet<String>,
    nonces: u64,
}

/// What a client that subscribed to `names` holding `initial` lacks of `snapshot`.
fn first_changes(
    snapshot: &Snapshot,
    type_url: &str,
    names: Option<&BTreeSet<String>>,
    initial: &BTreeMap<String, String>,
) -> Changes {
    let mut changes = Changes::default();
    for (name, resource) in snapshot.resources(type_url) {
        if wants(names, name) && initial.get(name) != Some(&resource.version()) {
            changes.resources.insert(name.to_string(), resource.clone());
        }
    }
    for name in initial.keys() {
        if snapshot.get(type_url, name).is_none() {
            changes.removed.insert(name.clone());
        }
    }
    changes
}

impl Session for DeltaStream {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn node_id(request: &DeltaDiscoveryRequest) -> String {
        request.node.as_ref().map(|n| n.id.clone()).unwrap_or_default()
    }

    fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    async fn handle(
        &mut self,
        request: DeltaDiscoveryRequest,
        snapshot: &Arc<Snapshot>,
    ) -> Result<(), Closed> {
        self.handle_request(request, snapshot).await
    }

    async fn changed(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), Closed> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        self.push_changes(&types, snapshot).await
    }

    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.permit_deadline()
    }

    fn expire(&mut self) {
        self.expire_permits();
    }
}

impl DeltaStream {
    pub fn new(
        proxy: Proxy,
        cache: Arc<SnapshotCache>,
        state: Arc<State>,
        shared: (Arc<Diffs>, Arc<InFlight>),
        tx: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
    ) -> Self {
        let (diffs, in_flight) = shared;
        Self {
            proxy,
            cache,
            state,
            diffs,
            in_flight,
            tx,
            types: BTreeMap::new(),
            due: BTreeSet::new(),
            nonces: 0,
        }
    }

    async fn handle_request(
        &mut self,
        request: DeltaDiscoveryRequest,
        snapshot: &Arc<Snapshot>,
    ) -> Result<(), Closed> {
        let type_url = request.type_url.clone();
        let Some(subscription) = self.types.get_mut(&type_url) else {
            return self.open(request, snapshot).await;
        };
        // Subscription changes count whatever the nonce says.
        if let Some(names) = &mut subscription.names {
            for name in &request.resource_names_subscribe {
                if names.insert(name.clone()) {
                    subscription.asked.insert(name.clone());
                }
            }
            for name in &request.resource_names_unsubscribe {
                names.remove(name);
                subscription.asked.remove(name);
            }
        }
        let answers_last =
            subscription.pending.as_ref().is_some_and(|pending| pending.nonce == request.response_nonce);
        if answers_last && let Some(Pending { at, snapshot: sent, .. }) = subscription.pending.take() {
            let label = TypeLabel::of(&type_url);
            let version = sent.version(&type_url);
            if let Some(error) = &request.error_detail {
                self.state.metrics.xds_nacks.get_or_create(&label).inc();
                tracing::warn!(node = %self.proxy.node_id(), type_url, version, error = error.message, "configuration rejected");
                self.cache.nack(&self.proxy, &type_url, &version, &error.message);
                // Envoy keeps what it held before the rejected response.
                subscription.rejected = Some(sent);
                subscription.owed = None;
            } else if subscription.owed.is_none() {
                self.state.metrics.xds_acks.get_or_create(&label).inc();
                self.state.metrics.xds_push_latency.observe(at.elapsed().as_secs_f64());
                self.cache.ack(&self.proxy, &type_url, &version);
                subscription.held = Some(sent);
                subscription.rejected = None;
            }
        }
        self.due.insert(type_url);
        self.send_due(snapshot).await
    }

    /// Whether a response of this stream is unanswered.
    fn busy(&self) -> bool {
        self.types.values().any(|s| s.pending.is_some())
    }

    /// Catches up the due types in type URL order until one response goes out (the agent relies
    /// on its configuration, `…AgentConfig`, coming before its breakers, `…BreakerRule`).
    async fn send_due(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), Closed> {
        while !self.busy() {
            let Some(type_url) = self.due.pop_first() else { break };
            self.catch_up(&type_url, snapshot).await?;
        }
        Ok(())
    }

    /// The first request of a type: what the client asks for and, after a reconnect, the
    /// versions it already holds.
    async fn open(&mut self, request: DeltaDiscoveryRequest, snapshot: &Arc<Snapshot>) -> Result<(), Closed> {
        let type_url = request.type_url.clone();
        let asked: BTreeSet<String> = request.resource_names_subscribe.iter().cloned().collect();
        // No names, or "*": every resource of the type.
        let names = (!asked.is_empty() && !asked.contains("*")).then_some(asked);
        let initial = request.initial_resource_versions.into_iter().collect();
        self.types.insert(type_url.clone(), Subscription { names, initial, ..Subscription::default() });
        self.cache.subscribe(&self.proxy, &type_url);
        self.due.insert(type_url);
        self.send_due(snapshot).await
    }

    /// After a new snapshot: each type's difference from what its client holds.
    async fn push_changes(&mut self, types: &[String], snapshot: &Arc<Snapshot>) -> Result<(), Closed> {
        self.due.extend(types.iter().cloned());
        self.send_due(snapshot).await
    }

    /// Sends the client what it lacks of `snapshot` in `type_url` (called when no response
    /// is unanswered), unless it rejected this very snapshot.
    async fn catch_up(&mut self, type_url: &str, snapshot: &Arc<Snapshot>) -> Result<(), Closed> {
        let Some(subscription) = self.types.get(type_url) else { return Ok(()) };
        if subscription.rejected.as_ref().is_some_and(|r| Arc::ptr_eq(r, snapshot)) {
            return Ok(());
        }
        if let Some((owed_for, _)) = &subscription.owed {
            if Arc::ptr_eq(owed_for, snapshot)
                && let Some((_, rest)) = self.types.get_mut(type_url).and_then(|s| s.owed.take())
            {
                return self.send(type_url, snapshot, rest).await;
            }
            // A newer snapshot: what it holds is worked out again from its last ACK.
            if let Some(subscription) = self.types.get_mut(type_url) {
                subscription.owed = None;
            }
        }
        let Some(subscription) = self.types.get(type_url) else { return Ok(()) };
        let names = subscription.names.as_ref();
        let mut changes = match &subscription.held {
            Some(held) if Arc::ptr_eq(held, snapshot) => Changes::default(),
            Some(held) => self.difference(held, snapshot, type_url, names),
            None => first_changes(snapshot, type_url, names, &subscription.initial),
        };
        if !subscription.asked.is_empty() {
            for (name, resource) in snapshot.resources(type_url) {
                if wants(Some(&subscription.asked), name) {
                    changes.resources.insert(name.to_string(), resource.clone());
                }
            }
        }
        self.send(type_url, snapshot, changes).await
    }

    /// What differs in `type_url` between two snapshots, part by part, for `names`.
    fn difference(
        &self,
        before: &Snapshot,
        after: &Snapshot,
        type_url: &str,
        names: Option<&BTreeSet<String>>,
    ) -> Changes {
        let mut changes = Changes::default();
        let count = before.parts().len().max(after.parts().len());
        for index in 0..count {
            let diff = match (before.parts().get(index), after.parts().get(index)) {
                (Some(old), Some(new)) if Arc::ptr_eq(old, new) => continue,
                (Some(old), Some(new)) => self.diffs.between(old, new, type_url),
                (old, new) => {
                    Arc::new(PartDiff::between(old.map(AsRef::as_ref), new.map(AsRef::as_ref), type_url))
                }
            };
            for (name, resource) in &diff.changed {
                if wants(names, name) {
                    changes.removed.remove(name);
                    changes.resources.insert(name.clone(), resource.clone());
                }
            }
            for name in &diff.removed {
                // A name that moved between parts is changed, not removed.
                if wants(names, name) && !changes.resources.contains_key(name) {
                    changes.removed.insert(name.clone());
                }
            }
        }
        changes
    }

    /// Sends `changes` as the type's next response; with nothing to send, the client holds
    /// `snapshot` already, and the cache hears so.
    async fn send(
        &mut self,
        type_url: &str,
        snapshot: &Arc<Snapshot>,
        changes: Changes,
    ) -> Result<(), Closed> {
        let Some(subscription) = self.types.get_mut(type_url) else { return Ok(()) };
        subscription.asked.clear();
        subscription.initial.clear();
        if changes.is_empty() {
            if subscription.held.as_ref().is_none_or(|held| !Arc::ptr_eq(held, snapshot)) {
                subscription.held = Some(snapshot.clone());
                self.cache.ack(&self.proxy, type_url, &snapshot.version(type_url));
            }
            return Ok(());
        }
        let (changes, rest) = changes.split(RESPONSE_BYTES);
        // The share is taken before the response is built: building copies the bytes.
        let bytes = changes.resources.values().map(|r| r.any.value.len()).sum();
        let permit = self.in_flight.take(bytes).await;
        self.nonces += 1;
        let nonce = self.nonces.to_string();
        let response = DeltaDiscoveryResponse {
            system_version_info: snapshot.version(type_url),
            resources: changes
                .resources
                .into_iter()
                .map(|(name, resource)| WireResource {
                    version: resource.version(),
                    resource: Some(resource.any.clone()),
                    name,
                    ..WireResource::default()
                })
                .collect(),
            type_url: type_url.to_string(),
            removed_resources: changes.removed.into_iter().collect(),
            nonce,
            ..DeltaDiscoveryResponse::default()
        };
        let Some(subscription) = self.types.get_mut(type_url) else { return Ok(()) };
        subscription.owed = rest.map(|rest| (snapshot.clone(), rest));
        subscription.pending = Some(Pending {
            nonce: response.nonce.clone(),
            at: Instant::now(),
            snapshot: snapshot.clone(),
            permit,
        });
        self.state.metrics.xds_pushes.get_or_create(&TypeLabel::of(type_url)).inc();
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }

    /// When the oldest share of bytes in flight this stream holds must be given back.
    fn permit_deadline(&self) -> Option<tokio::time::Instant> {
        let oldest = self
            .types
            .values()
            .filter_map(|s| s.pending.as_ref().filter(|p| p.permit.is_some()))
            .map(|p| p.at)
            .min()?;
        Some(tokio::time::Instant::from_std(oldest + PERMIT_HOLD))
    }

    /// Gives back the shares of responses unanswered for [`PERMIT_HOLD`].
    fn expire_permits(&mut self) {
        for pending in self.types.values_mut().filter_map(|s| s.pending.as_mut()) {
            if pending.at.elapsed() >= PERMIT_HOLD {
                pending.permit = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::google::protobuf::Any;

    use super::*;

    fn changes(sizes: &[usize]) -> Changes {
        let resources = sizes
            .iter()
            .enumerate()
            .map(|(i, size)| {
                (format!("r{i}"), Resource::new(Any { type_url: "t".into(), value: vec![0; *size] }))
            })
            .collect();
        Changes { resources, removed: ["gone".to_string()].into() }
    }

    fn names(changes: &Changes) -> Vec<&str> {
        changes.resources.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_large_change_goes_in_responses_of_about_the_limit() {
        let (first, rest) = changes(&[40, 40, 40, 40]).split(100);
        assert_eq!(names(&first), ["r0", "r1"]);
        assert_eq!(first.removed.len(), 1, "removals go first");
        let rest = rest.expect("the rest");
        assert_eq!(names(&rest), ["r2", "r3"]);
        assert!(rest.removed.is_empty());
        // Small enough: one response.
        let (all, none) = changes(&[40, 40]).split(100);
        assert_eq!((names(&all).len(), none.is_none()), (2, true));
        // A resource larger than the limit goes alone.
        let (big, rest) = changes(&[500, 10]).split(100);
        assert_eq!((names(&big), names(&rest.expect("the rest"))), (vec!["r0"], vec!["r1"]));
    }
}
