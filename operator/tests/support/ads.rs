//! ADS clients that play a proxy, for the tests and the push benchmark: state of the world
//! ([`Client`], as the agent speaks it, or a whole proxy in one stream) subscribes, ACKs and
//! NACKs by hand, or acknowledges everything it is sent ([`Client::acknowledge_everything`]);
//! delta ([`DeltaClient`], as the sidecar's Envoy speaks it, with its subscriptions
//! [`ENVOY`]); and the operator's ADS server on a loopback port
//! ([`serve`], unauthenticated). Against a cluster-mode operator a stream presents its pod's
//! token ([`Client::connect_with_token`]), as `authorization: Bearer` metadata.

use std::{sync::Arc, time::Duration};

use breakwater_operator::{
    compile::type_url,
    http::State,
    xds::{AdsServer, SnapshotCache},
};
use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
            aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Streaming, transport::Channel};

/// How long [`Client::next`] waits for a response.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// Every type a proxy (Envoy and agent of one pod) subscribes to.
pub const TYPES: &[&str] = &type_url::ALL;

/// Serves ADS from `cache` on a free loopback port until the test ends, believing every node
/// id (as standalone mode does); the endpoint.
pub async fn serve(cache: Arc<SnapshotCache>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let ads = AdsServer::unauthenticated(cache, Arc::new(State::default()));
    tokio::spawn(breakwater_operator::xds::serve(listener, ads, std::future::pending()));
    endpoint
}

/// One proxy's ADS stream: an Envoy's, or an agent's (they share the pod's node id).
pub struct Client {
    requests: mpsc::Sender<DiscoveryRequest>,
    responses: Streaming<DiscoveryResponse>,
    node: String,
}

impl Client {
    /// A stream of `node` on a connection of its own to `endpoint`.
    pub async fn connect(endpoint: &str, node: &str) -> Self {
        let channel = Channel::from_shared(endpoint.to_string()).expect("endpoint");
        Self::on(channel.connect().await.expect("connect"), node).await
    }

    /// A stream of `node` on `channel` (which many streams may share).
    pub async fn on(channel: Channel, node: &str) -> Self {
        Self::open(channel, node, None).await.expect("open stream")
    }

    /// A stream of `node` presenting `token` (`authorization: Bearer <token>`; none without),
    /// on a connection of its own; the server's refusal when it refuses the stream at once
    /// (a refusal for the node id comes as the stream's first answer instead).
    pub async fn connect_with_token(
        endpoint: &str,
        node: &str,
        token: Option<&str>,
    ) -> Result<Self, tonic::Status> {
        let channel = Channel::from_shared(endpoint.to_string()).expect("endpoint");
        Self::open(channel.connect().await.expect("connect"), node, token).await
    }

    async fn open(channel: Channel, node: &str, token: Option<&str>) -> Result<Self, tonic::Status> {
        let (requests, rx) = mpsc::channel(16);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            let value = format!("Bearer {token}")
                .parse()
                .map_err(|_| tonic::Status::invalid_argument("the token cannot travel as gRPC metadata"))?;
            request.metadata_mut().insert("authorization", value);
        }
        // As Envoy does, no limit on a response's size: tonic's default of 4 MiB is below
        // what a cluster of 10,000 Services sends (its clusters alone are 4.6 MB).
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .stream_aggregated_resources(request)
            .await?
            .into_inner();
        Ok(Self { requests, responses, node: node.to_string() })
    }

    pub async fn send(&self, type_: &str, names: &[&str], version: &str, nonce: &str, error: Option<&str>) {
        let request = DiscoveryRequest {
            version_info: version.to_string(),
            node: Some(Node { id: self.node.clone(), ..Node::default() }),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: type_.to_string(),
            response_nonce: nonce.to_string(),
            error_detail: error.map(|message| RpcStatus {
                code: 3,
                message: message.to_string(),
                details: vec![],
            }),
            ..DiscoveryRequest::default()
        };
        self.requests.send(request).await.expect("send request");
    }

    pub async fn subscribe(&self, type_: &str, names: &[&str]) {
        self.send(type_, names, "", "", None).await;
    }

    pub async fn ack(&self, response: &DiscoveryResponse, names: &[&str]) {
        self.send(&response.type_url, names, &response.version_info, &response.nonce, None).await;
    }

    pub async fn nack(&self, response: &DiscoveryResponse, previous_version: &str, message: &str) {
        self.send(&response.type_url, &[], previous_version, &response.nonce, Some(message)).await;
    }

    /// What the server answers next: a response, the end of the stream, or its refusal.
    pub async fn answer(&mut self) -> Result<Option<DiscoveryResponse>, tonic::Status> {
        tokio::time::timeout(DEADLINE, self.responses.message()).await.expect("an answer within the deadline")
    }

    /// The next response (the stream must stay healthy and open).
    pub async fn next(&mut self) -> DiscoveryResponse {
        self.answer().await.expect("stream healthy").expect("stream open")
    }

    /// Subscribes to every type and acknowledges whatever it is sent, until the stream ends.
    pub async fn acknowledge_everything(self) {
        self.acknowledge_each(|_| {}).await;
    }

    /// [`acknowledge_everything`](Self::acknowledge_everything), showing `seen` each
    /// response before it is acknowledged.
    pub async fn acknowledge_each(self, seen: impl FnMut(&DiscoveryResponse)) {
        self.acknowledge_types(TYPES, seen).await;
    }

    /// Subscribes to every resource of `types` and acknowledges whatever it is sent, showing
    /// `seen` each response first, until the stream ends.
    pub async fn acknowledge_types(mut self, types: &[&str], mut seen: impl FnMut(&DiscoveryResponse)) {
        for type_ in types {
            self.subscribe(type_, &[]).await;
        }
        while let Ok(Some(response)) = self.responses.message().await {
            seen(&response);
            self.ack(&response, &[]).await;
        }
    }
}

/// What the sidecar's Envoy subscribes to over delta ADS: listeners and clusters by wildcard,
/// endpoints of every cluster, the outbound route configuration by name, and its virtual
/// hosts by VHDS namespace.
pub const ENVOY: [(&str, &[&str]); 5] = [
    (type_url::LISTENER, &[]),
    (type_url::CLUSTER, &[]),
    (type_url::ENDPOINT, &["*"]),
    (type_url::ROUTE, &["outbound_http"]),
    (type_url::VIRTUAL_HOST, &["outbound_http"]),
];

/// What the agent subscribes to over delta ADS: its configuration and every breaker.
pub const AGENT: [(&str, &[&str]); 2] = [(type_url::AGENT, &[]), (type_url::BREAKER, &[])];

/// A delta ADS stream of one node.
pub struct DeltaClient {
    node: String,
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaClient {
    pub async fn connect(endpoint: &str, node: &str) -> Self {
        let channel = Channel::from_shared(endpoint.to_string()).expect("endpoint").connect().await;
        Self::on(channel.expect("connect"), node).await
    }

    /// A stream over an existing connection (many streams share one in the benchmark).
    pub async fn on(channel: Channel, node: &str) -> Self {
        let (requests, rx) = mpsc::channel(16);
        let responses = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .delta_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("delta stream")
            .into_inner();
        Self { node: node.to_string(), requests, responses }
    }

    async fn send(&self, request: DeltaDiscoveryRequest) {
        let node = Some(Node { id: self.node.clone(), ..Node::default() });
        // A closed stream shows in the next response.
        let _ = self.requests.send(DeltaDiscoveryRequest { node, ..request }).await;
    }

    /// Subscribes to `names` of a type (none: every resource), holding `held` (name → version)
    /// already, as Envoy does after a reconnect.
    pub async fn subscribe(
        &self,
        type_: &str,
        names: &[&str],
        held: impl IntoIterator<Item = (String, String)>,
    ) {
        self.send(DeltaDiscoveryRequest {
            type_url: type_.into(),
            resource_names_subscribe: names.iter().map(ToString::to_string).collect(),
            initial_resource_versions: held.into_iter().collect(),
            ..DeltaDiscoveryRequest::default()
        })
        .await;
    }

    pub async fn ack(&self, response: &DeltaDiscoveryResponse) {
        let (type_url, response_nonce) = (response.type_url.clone(), response.nonce.clone());
        self.send(DeltaDiscoveryRequest { type_url, response_nonce, ..DeltaDiscoveryRequest::default() })
            .await;
    }

    /// The next response (the stream must stay healthy and open, and answer in time).
    pub async fn next(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(DEADLINE, self.responses.message())
            .await
            .expect("an answer within the deadline")
            .expect("stream healthy")
            .expect("stream open")
    }

    /// Subscribes to `subscriptions` ([`ENVOY`], [`AGENT`]) and acknowledges every
    /// response, showing `seen` each first, until the stream ends.
    pub async fn acknowledge(
        mut self,
        subscriptions: &[(&str, &[&str])],
        mut seen: impl FnMut(&DeltaDiscoveryResponse),
    ) {
        for (type_, names) in subscriptions {
            self.subscribe(type_, names, []).await;
        }
        while let Ok(Some(response)) = self.responses.message().await {
            seen(&response);
            self.ack(&response).await;
        }
    }
}

/// A proxy `node` that connects to `endpoint` as a pod's sidecars do (Envoy and the agent,
/// each on a delta stream) and acknowledges everything it is sent, until the test ends
/// (spawn it).
pub async fn acknowledging_proxy(endpoint: String, node: String) {
    let envoy = DeltaClient::connect(&endpoint, &node).await;
    let agent = DeltaClient::connect(&endpoint, &node).await;
    tokio::join!(envoy.acknowledge(&ENVOY, |_| {}), agent.acknowledge(&AGENT, |_| {}));
}

/// [`acknowledging_proxy`] presenting its pod's `token`, for a cluster-mode operator.
pub async fn acknowledging_proxy_with_token(endpoint: String, node: String, token: String) {
    let client = Client::connect_with_token(&endpoint, &node, Some(&token)).await;
    client.expect("the operator accepts the pod's token").acknowledge_everything().await;
}

/// How the server answers a stream of `node` presenting `token` that subscribes to one type:
/// its first response, or its refusal (at once, or as the stream's first answer).
pub async fn first_answer(
    endpoint: &str,
    node: &str,
    token: Option<&str>,
) -> Result<DiscoveryResponse, tonic::Status> {
    let mut client = Client::connect_with_token(endpoint, node, token).await?;
    client.subscribe(type_url::AGENT, &[]).await;
    match client.answer().await {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(tonic::Status::aborted("the stream ended without an answer")),
        Err(status) => Err(status),
    }
}
