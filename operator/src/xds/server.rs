//! The aggregated discovery service (ADS, v3), in both variants: incremental (delta, what the
//! sidecar's Envoy and the agent use; `delta`) and state of the world (for other clients:
//! older agents, tools). Each state-of-the-world stream serves one proxy: it answers every
//! subscribed type with the resources of the proxy's snapshot, pushes when the snapshot
//! changes, and records ACKs and NACKs in the cache. Per the xDS
//! protocol, a request whose nonce is not the last one sent on its type is stale and
//! ignored; a NACK keeps the proxy on its last good configuration and is not answered with
//! the same version again.
//!
//! Before anything is served, the stream's identity is checked (`identity`): in a cluster its
//! token names a pod, and the node id of its first request must be that pod's.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Instant,
};

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{
    cache::SnapshotCache,
    delta::{DeltaStream, Diffs, InFlight},
    identity::{Authenticator, Identity},
};
use crate::{
    compile::{Proxy, Snapshot, wants},
    http::State,
    metrics::TypeLabel,
};

#[derive(Clone, Debug)]
pub struct AdsServer {
    cache: Arc<SnapshotCache>,
    state: Arc<State>,
    /// Open while this replica may take streams: only the leader writes `Programmed`, so
    /// only the leader must hold the streams whose ACKs decide it.
    open: Arc<AtomicBool>,
    /// Who may ask for which node id.
    authenticator: Authenticator,
    /// Part differences the delta streams share, and the bytes they may have in flight.
    diffs: Arc<Diffs>,
    in_flight: Arc<InFlight>,
}

impl AdsServer {
    /// Cluster mode: streams are accepted only while `open` is set (others are told to
    /// retry), and each must prove its pod to `authenticator`.
    pub fn authenticated(
        cache: Arc<SnapshotCache>,
        state: Arc<State>,
        open: Arc<AtomicBool>,
        authenticator: Authenticator,
    ) -> Self {
        Self { cache, state, open, authenticator, diffs: Arc::default(), in_flight: Arc::default() }
    }

    /// A server that always accepts streams and believes every node id: for standalone mode
    /// on loopback and tests, where no other pod can connect.
    pub fn unauthenticated(cache: Arc<SnapshotCache>, state: Arc<State>) -> Self {
        let open = Arc::new(AtomicBool::new(true));
        Self::authenticated(cache, state, open, Authenticator::unauthenticated())
    }

    pub fn into_service(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
    }
}

/// Serves ADS on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    server: AdsServer,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Without TCP_NODELAY a small response waits for the client's delayed ACK: every new
    // stream's first answer took 44 ms (make bench-inject found it).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(server.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaResponses = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaResponses;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let (cache, state) = (self.cache.clone(), self.state.clone());
        let responses =
            self.start(request, move |proxy, tx| ProxyStream::new(proxy, cache, state, tx)).await?;
        Ok(Response::new(responses))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaResponses>, Status> {
        let (cache, state) = (self.cache.clone(), self.state.clone());
        let shared = (self.diffs.clone(), self.in_flight.clone());
        let responses =
            self.start(request, move |proxy, tx| DeltaStream::new(proxy, cache, state, shared, tx)).await?;
        Ok(Response::new(responses))
    }
}

impl AdsServer {
    /// Takes a stream, in either variant: checks who it is, then serves the session `open`
    /// makes for the proxy its first request names.
    async fn start<S: Session + Send + 'static>(
        &self,
        request: Request<Streaming<S::Request>>,
        open: impl FnOnce(Proxy, mpsc::Sender<Result<S::Response, Status>>) -> S + Send + 'static,
    ) -> Result<Pin<Box<dyn Stream<Item = Result<S::Response, Status>> + Send>>, Status> {
        let identity = self.accept(&request).await?;
        let peer = request.remote_addr();
        let (tx, rx) = mpsc::channel(32);
        let (cache, state) = (self.cache.clone(), self.state.clone());
        // The stream's response headers must go out before the first request arrives
        // (clients may wait for them), so the node is identified in the spawned task.
        tokio::spawn(async move {
            let mut inbound = request.into_inner();
            let Ok(Some(first)) = inbound.message().await else { return };
            match admit(&identity, &S::node_id(&first), &state, peer) {
                Ok(proxy) => serve_proxy(open(proxy, tx), &cache, &state, first, inbound).await,
                Err(refusal) => drop(tx.send(Err(refusal)).await),
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// Whether this replica takes the stream, and who its token says it is.
    async fn accept<T>(&self, request: &Request<T>) -> Result<Identity, Status> {
        if !self.open.load(Ordering::Acquire) {
            // Envoy reconnects with backoff and the Service sends it to another replica.
            return Err(Status::unavailable("this replica is a standby; the leader serves xDS"));
        }
        let (metrics, peer) = (&self.state.metrics, request.remote_addr());
        self.authenticator
            .authenticate(request.metadata(), metrics)
            .await
            .map_err(|refusal| refusal.record(metrics, peer))
    }
}

/// The proxy a stream serves: the node id of its first request, if its identity may ask for it.
fn admit(
    identity: &Identity,
    node_id: &str,
    state: &State,
    peer: Option<SocketAddr>,
) -> Result<Proxy, Status> {
    identity.admit(node_id).map_err(|refusal| refusal.record(&state.metrics, peer))?;
    Proxy::from_node_id(node_id)
        .ok_or_else(|| Status::invalid_argument(format!("node id {node_id:?} is not NAMESPACE/POD")))
}

/// What this stream last sent on one type.
#[derive(Debug, Default)]
struct Sent {
    names: Option<BTreeSet<String>>,
    version: Option<String>,
    nonce: String,
    at: Option<Instant>,
}

struct ProxyStream {
    proxy: Proxy,
    cache: Arc<SnapshotCache>,
    state: Arc<State>,
    tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    types: BTreeMap<String, Sent>,
    nonces: u64,
}

impl ProxyStream {
    fn new(
        proxy: Proxy,
        cache: Arc<SnapshotCache>,
        state: Arc<State>,
        tx: mpsc::Sender<Result<DiscoveryResponse, Status>>,
    ) -> Self {
        Self { proxy, cache, state, tx, types: BTreeMap::new(), nonces: 0 }
    }

    /// Handles one request: stale nonce, NACK, ACK or a (new) subscription.
    async fn handle_request(&mut self, request: DiscoveryRequest, snapshot: &Snapshot) -> Result<(), Closed> {
        let type_url = request.type_url.clone();
        let names: Option<BTreeSet<String>> =
            (!request.resource_names.is_empty()).then(|| request.resource_names.iter().cloned().collect());
        let label = TypeLabel::of(&type_url);
        let first_on_type = !self.types.contains_key(&type_url);
        let sent = self.types.entry(type_url.clone()).or_default();
        if !request.response_nonce.is_empty() && request.response_nonce != sent.nonce {
            return Ok(()); // Answers an older response: superseded, ignore.
        }
        if first_on_type {
            self.cache.subscribe(&self.proxy, &type_url);
        }
        if sent.names != names {
            // Other resources asked for: the next push sends them, whatever the version.
            sent.names = names;
            sent.version = None;
        }
        if let Some(error) = &request.error_detail {
            let rejected = sent.version.clone().unwrap_or_default();
            self.state.metrics.xds_nacks.get_or_create(&label).inc();
            tracing::warn!(node = %self.proxy.node_id(), type_url, version = rejected, error = error.message, "configuration rejected");
            self.cache.nack(&self.proxy, &type_url, &rejected, &error.message);
            return Ok(());
        }
        if !request.response_nonce.is_empty() {
            self.state.metrics.xds_acks.get_or_create(&label).inc();
            if let Some(at) = sent.at.take() {
                self.state.metrics.xds_push_latency.observe(at.elapsed().as_secs_f64());
            }
            self.cache.ack(&self.proxy, &type_url, &request.version_info);
        } else if first_on_type && !request.version_info.is_empty() {
            // A reconnecting proxy says what it holds; if that is current, nothing to send.
            let current = snapshot.version(&type_url);
            if request.version_info == current {
                sent.version = Some(current.clone());
                self.cache.ack(&self.proxy, &type_url, &current);
            }
        }
        self.push(&type_url, snapshot).await
    }

    async fn push_all(&mut self, snapshot: &Snapshot) -> Result<(), Closed> {
        let types: Vec<String> = self.types.keys().cloned().collect();
        for type_url in types {
            self.push(&type_url, snapshot).await?;
        }
        Ok(())
    }

    /// Sends the type's resources if their version differs from what was last sent.
    async fn push(&mut self, type_url: &str, snapshot: &Snapshot) -> Result<(), Closed> {
        let Some(sent) = self.types.get_mut(type_url) else { return Ok(()) };
        let current = snapshot.version(type_url);
        if sent.version.as_deref() == Some(current.as_str()) {
            return Ok(());
        }
        let resources = snapshot
            .resources(type_url)
            .filter(|(name, _)| wants(sent.names.as_ref(), name))
            .map(|(_, resource)| resource.any.clone())
            .collect();
        self.nonces += 1;
        sent.nonce = self.nonces.to_string();
        sent.version = Some(current.clone());
        sent.at = Some(Instant::now());
        let response = DiscoveryResponse {
            version_info: current,
            resources,
            type_url: type_url.to_string(),
            nonce: sent.nonce.clone(),
            ..DiscoveryResponse::default()
        };
        self.state.metrics.xds_pushes.get_or_create(&TypeLabel::of(type_url)).inc();
        self.tx.send(Ok(response)).await.map_err(|_| Closed)
    }
}

impl Session for ProxyStream {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn node_id(request: &DiscoveryRequest) -> String {
        request.node.as_ref().map(|n| n.id.clone()).unwrap_or_default()
    }

    fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    async fn handle(&mut self, request: DiscoveryRequest, snapshot: &Arc<Snapshot>) -> Result<(), Closed> {
        self.handle_request(request, snapshot).await
    }

    async fn changed(&mut self, snapshot: &Arc<Snapshot>) -> Result<(), Closed> {
        self.push_all(snapshot).await
    }
}

/// The client went away.
#[derive(Debug)]
pub(super) struct Closed;

/// One proxy's stream, in either variant: what it does with a request and with a new
/// snapshot; [`serve_proxy`] runs it.
pub(super) trait Session {
    type Request: Send + 'static;
    type Response: Send + 'static;

    /// The node id a request names (the first names the stream's proxy).
    fn node_id(request: &Self::Request) -> String;

    fn proxy(&self) -> &Proxy;

    fn handle(
        &mut self,
        request: Self::Request,
        snapshot: &Arc<Snapshot>,
    ) -> impl Future<Output = Result<(), Closed>> + Send;

    fn changed(&mut self, snapshot: &Arc<Snapshot>) -> impl Future<Output = Result<(), Closed>> + Send;

    /// When [`expire`](Self::expire) must run next; None: never.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        None
    }

    fn expire(&mut self) {}
}

/// Serves one proxy's stream from its first request until either side goes away: requests
/// as they come, the snapshot whenever the cache has a new one for the proxy.
async fn serve_proxy<S: Session>(
    mut session: S,
    cache: &SnapshotCache,
    state: &State,
    first: S::Request,
    mut inbound: Streaming<S::Request>,
) {
    let node = session.proxy().node_id();
    let mut snapshots = cache.connect(session.proxy());
    state.metrics.xds_connected.inc();
    tracing::info!(node, "proxy connected");
    let mut snapshot = snapshots.borrow_and_update().clone();
    let mut next = Some(first);
    loop {
        if let Some(request) = next.take()
            && session.handle(request, &snapshot).await.is_err()
        {
            break;
        }
        tokio::select! {
            request = inbound.message() => match request {
                Ok(Some(request)) => next = Some(request),
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(node, %status, "stream ended");
                    break;
                }
            },
            () = sleep_until_some(session.deadline()) => session.expire(),
            changed = snapshots.changed() => {
                if changed.is_err() {
                    break;
                }
                snapshot = snapshots.borrow_and_update().clone();
                if session.changed(&snapshot).await.is_err() {
                    break;
                }
            }
        }
    }
    cache.disconnect(session.proxy());
    state.metrics.xds_connected.dec();
    tracing::info!(node, "proxy disconnected");
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
