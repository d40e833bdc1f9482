//! The pod's Envoy reaches the operator through its agent: Envoy opens its ADS stream to
//! this proxy on loopback, and the proxy opens one to the operator that carries the pod's
//! projected ServiceAccount token (`authorization: Bearer …`), then forwards every message
//! both ways unchanged. The operator checks the token and serves only this pod's node id
//! (docs/injection.md).
//!
//! Why not Envoy itself: Envoy's own gRPC client sends only static metadata, and its Google
//! gRPC client sends call credentials (a token read from a file) only over TLS; the token
//! rotates, and the operator's ADS port is plaintext inside the cluster. The agent already
//! holds the token for its own subscription ([`crate::ads`]), re-reads it on every stream,
//! and one loopback hop costs Envoy nothing it would notice.
//!
//! A refusal by the operator (`UNAUTHENTICATED`, `PERMISSION_DENIED`) reaches Envoy as the
//! stream's status, so Envoy logs the operator's reason and retries with its own backoff.

use std::path::PathBuf;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    aggregated_discovery_service_server::{AggregatedDiscoveryService, AggregatedDiscoveryServiceServer},
};
use futures::Stream;
use std::pin::Pin;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming, transport::Channel};

use crate::ads::authorization;

/// Forwards ADS streams to `endpoint`, with the token of `token_file` when set.
#[derive(Clone, Debug)]
pub struct AdsProxy {
    pub endpoint: String,
    pub token_file: Option<PathBuf>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;
type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsProxy {
    type StreamAggregatedResourcesStream = ResponseStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        let (mut upstream, forwarded) = self.forward(request).await?;
        let responses = upstream.stream_aggregated_resources(forwarded).await?.into_inner();
        Ok(Response::new(Box::pin(responses)))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let (mut upstream, forwarded) = self.forward(request).await?;
        let responses = upstream.delta_aggregated_resources(forwarded).await?.into_inner();
        Ok(Response::new(Box::pin(responses)))
    }
}

impl AdsProxy {
    /// A client to the operator, and Envoy's requests to send it with the pod's token.
    async fn forward<T: Send + 'static>(
        &self,
        request: Request<Streaming<T>>,
    ) -> Result<
        (AggregatedDiscoveryServiceClient<Channel>, Request<impl Stream<Item = T> + Send + 'static>),
        Status,
    >
    where
        Streaming<T>: Stream<Item = Result<T, Status>>,
    {
        let upstream = AggregatedDiscoveryServiceClient::connect(self.endpoint.clone()).await.map_err(|err| {
            tracing::warn!(endpoint = self.endpoint, error = %err, "cannot reach the operator for Envoy's ADS stream");
            Status::unavailable(format!("the agent cannot reach the operator at {}: {err}", self.endpoint))
        })?;
        // Envoy takes a response of any size; tonic's 4 MiB default would end the stream of a
        // cluster whose clusters alone are larger (10,000 Services: 4.6 MB).
        let upstream = upstream.max_decoding_message_size(usize::MAX);
        // Envoy's requests, forwarded until Envoy ends the stream or it breaks.
        let mut forwarded = Request::new(request.into_inner().map_while(Result::ok));
        if let Some(path) = &self.token_file {
            let value = authorization(path).map_err(|err| {
                tracing::warn!(error = %err, "Envoy's ADS stream has no token to present");
                Status::unavailable(err.to_string())
            })?;
            forwarded.metadata_mut().insert("authorization", value);
        }
        Ok((upstream, forwarded))
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: AdsProxy,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    // Small xDS messages must not wait for Envoy's delayed ACK (as on the operator's side).
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .add_service(AggregatedDiscoveryServiceServer::new(proxy))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
