//! The agent's own subscription on the operator's ADS server: state-of-the-world, one type
//! ([`TYPE_URL`]), node id `NAMESPACE/POD` — the same node id as the pod's Envoy, so the
//! operator counts the agent's ACKs with the pod's when it reports `Programmed`.
//!
//! Each response is checked before it is ACKed: a configuration the agent would refuse is
//! NACKed with the reason (the operator shows it in the policy's status) and the previous
//! one stays in force. Accepted configurations are published on a watch channel, which the
//! agent follows like any other [`crate::source::ConfigSource::Channel`]. The stream is
//! re-opened with backoff when it ends; the re-opening request names the version in force,
//! so the operator sends nothing when that is still current.
//!
//! In a cluster the operator serves a node id only to a stream that proves it is that pod:
//! with a token file (`--xds-token-file`, the pod's projected ServiceAccount token), every
//! (re)opened stream sends `authorization: Bearer <token>`, read from the file again each time
//! because the kubelet rotates the token in place. A file that cannot be read fails that
//! attempt, which is logged and retried with the same backoff.

use std::path::{Path, PathBuf};
use std::time::Duration;

use breakwater_api::agent::{AgentConfig, TYPE_URL};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::RuleSet;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

#[derive(Debug, Clone)]
pub struct AdsSettings {
    /// The operator's xDS endpoint, e.g. `http://breakwater-xds.breakwater-system:18000`.
    pub endpoint: String,
    /// `NAMESPACE/POD`.
    pub node_id: String,
    /// First and longest wait between attempts to (re)open the stream.
    pub backoff: (Duration, Duration),
    /// The pod's projected ServiceAccount token, presented on every stream; None presents
    /// none (an operator in standalone mode asks for none).
    pub token_file: Option<PathBuf>,
}

impl AdsSettings {
    /// Subscribes as `node_id`, reopening the stream after 100 ms, doubling up to 10 s.
    pub fn new(endpoint: impl Into<String>, node_id: impl Into<String>) -> Self {
        AdsSettings {
            endpoint: endpoint.into(),
            node_id: node_id.into(),
            backoff: (Duration::from_millis(100), Duration::from_secs(10)),
            token_file: None,
        }
    }
}

/// What the agent applies is what it ACKs: the check [`crate::source::follow`] runs.
pub fn applicable(config: &AgentConfig) -> Result<()> {
    RuleSet::compile(config, &Metrics::default()).map(|_| ())
}

/// What one response means for the agent: the configuration to apply and ACK, or why to
/// NACK it — the error's message is the NACK's (`check` is [`applicable`] outside unit
/// tests).
pub fn decode(
    response: &DiscoveryResponse,
    check: &dyn Fn(&AgentConfig) -> Result<()>,
) -> Result<AgentConfig> {
    if response.type_url != TYPE_URL {
        return Err(Error::XdsType { got: response.type_url.clone() });
    }
    let config = match response.resources.as_slice() {
        // The operator always sends the resource; none means "nothing for this pod".
        [] => AgentConfig::default(),
        [any] if any.type_url == TYPE_URL => {
            breakwater_api::agent::decode(&any.value).map_err(Error::XdsDecode)?
        }
        [any] => return Err(Error::XdsType { got: any.type_url.clone() }),
        more => return Err(Error::XdsResources(more.len())),
    };
    check(&config)?;
    Ok(config)
}

/// Follows the operator until `stop` turns true (or its sender is dropped), publishing every
/// accepted configuration.
pub async fn follow(
    settings: AdsSettings,
    configs: watch::Sender<Option<AgentConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut accepted_version = String::new();
    let mut backoff = settings.backoff.0;
    loop {
        let session = subscribe(&settings, &configs, &mut accepted_version);
        let outcome = tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            outcome = session => outcome,
        };
        match outcome {
            Ok(()) => {
                tracing::info!(endpoint = settings.endpoint, "xDS stream closed by the operator; reopening");
                backoff = settings.backoff.0;
            }
            Err(error) => {
                tracing::warn!(endpoint = settings.endpoint, %error, retry_in = ?backoff, "xDS stream failed");
            }
        }
        tokio::select! {
            _ = stop.wait_for(|stop| *stop) => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(settings.backoff.1);
    }
}

/// The metadata that proves the pod to the operator: `authorization: Bearer <token>` from
/// `token_file`, read now (the kubelet replaces the file's content when it rotates the token).
/// Failing to read the file is [`Error::ReadConfig`], the agent's error for a file it cannot
/// read, naming the file.
pub fn authorization(token_file: &Path) -> Result<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> {
    let unusable = |problem: &str| Error::ReadConfig {
        path: token_file.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, problem.to_string()),
    };
    let text = std::fs::read_to_string(token_file)
        .map_err(|source| Error::ReadConfig { path: token_file.to_path_buf(), source })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(unusable("the token file is empty"));
    }
    format!("Bearer {token}")
        .parse()
        .map_err(|_| unusable("the token holds characters gRPC metadata cannot carry"))
}

/// One stream: subscribe, then ACK or NACK every response until the stream ends.
async fn subscribe(
    settings: &AdsSettings,
    configs: &watch::Sender<Option<AgentConfig>>,
    accepted_version: &mut String,
) -> Result<()> {
    // Read before connecting: a missing token is this attempt's error, not the operator's.
    let authorization = settings.token_file.as_deref().map(authorization).transpose()?;
    let mut client = AggregatedDiscoveryServiceClient::connect(settings.endpoint.clone())
        .await
        .map_err(|source| Error::XdsConnect { endpoint: settings.endpoint.clone(), source })?;
    let (requests, outbound) = mpsc::channel(4);
    let request = |version: &str, nonce: &str, error: Option<String>| DiscoveryRequest {
        version_info: version.to_string(),
        node: Some(Node { id: settings.node_id.clone(), ..Node::default() }),
        type_url: TYPE_URL.to_string(),
        response_nonce: nonce.to_string(),
        error_detail: error.map(|message| Status { code: INVALID_ARGUMENT, message, details: vec![] }),
        ..DiscoveryRequest::default()
    };
    // The channel has room: the first send cannot wait.
    let _ = requests.send(request(accepted_version, "", None)).await;
    let mut stream = tonic::Request::new(ReceiverStream::new(outbound));
    if let Some(value) = authorization {
        stream.metadata_mut().insert("authorization", value);
    }
    let mut responses =
        client.stream_aggregated_resources(stream).await.map_err(Error::XdsStream)?.into_inner();
    tracing::info!(
        endpoint = settings.endpoint,
        node = settings.node_id,
        "subscribed to the agent configuration"
    );
    while let Some(response) = responses.message().await.map_err(Error::XdsStream)? {
        let reply = match decode(&response, &applicable) {
            Ok(config) => {
                *accepted_version = response.version_info.clone();
                configs.send_replace(Some(config));
                request(accepted_version, &response.nonce, None)
            }
            Err(reason) => {
                tracing::error!(version = response.version_info, %reason, "agent configuration rejected (NACK)");
                request(accepted_version, &response.nonce, Some(reason.to_string()))
            }
        };
        if requests.send(reply).await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::Any;

    fn response(resources: Vec<Any>) -> DiscoveryResponse {
        DiscoveryResponse { type_url: TYPE_URL.into(), resources, ..DiscoveryResponse::default() }
    }

    fn any(config: &AgentConfig) -> Any {
        Any { type_url: TYPE_URL.into(), value: breakwater_api::agent::encode(config) }
    }

    fn garbage() -> Any {
        Any { type_url: TYPE_URL.into(), value: b"{not protobuf".to_vec() }
    }

    fn accept(_: &AgentConfig) -> Result<()> {
        Ok(())
    }

    #[test]
    fn the_token_is_read_from_its_file_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first.jwt.token\n").unwrap();
        assert_eq!(authorization(&path).unwrap(), "Bearer first.jwt.token");
        // The kubelet rotates the token: the next stream presents the new one.
        std::fs::write(&path, "second.jwt.token").unwrap();
        assert_eq!(authorization(&path).unwrap(), "Bearer second.jwt.token");
    }

    #[test]
    fn an_unusable_token_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let error = authorization(&missing).unwrap_err().to_string();
        assert!(error.starts_with(&format!("cannot read {}: ", missing.display())), "{error}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, " \n").unwrap();
        let error = authorization(&empty).unwrap_err().to_string();
        assert_eq!(error, format!("cannot read {}: the token file is empty", empty.display()));
        std::fs::write(&empty, "a\u{7}b").unwrap();
        assert!(authorization(&empty).unwrap_err().to_string().contains("cannot carry"));
    }

    /// An ADS server that records the `authorization` of every stream and ends it at once,
    /// so the agent keeps reopening.
    #[derive(Clone, Default)]
    struct Recorder {
        seen: std::sync::Arc<std::sync::Mutex<Vec<Option<String>>>>,
    }

    type Responses<T> = std::pin::Pin<Box<dyn futures::Stream<Item = Result<T, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService
        for Recorder
    {
        type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
        type DeltaAggregatedResourcesStream =
            Responses<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse>;

        async fn stream_aggregated_resources(
            &self,
            request: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
            let token = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
            self.seen.lock().unwrap().push(token);
            Ok(tonic::Response::new(Box::pin(futures::stream::empty())))
        }

        async fn delta_aggregated_resources(
            &self,
            _: tonic::Request<tonic::Streaming<envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest>>,
        ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
            Err(tonic::Status::unimplemented("delta"))
        }
    }

    /// Waits (with a deadline) until `seen` holds what `done` looks for.
    async fn until(recorder: &Recorder, what: &str, done: impl Fn(&[Option<String>]) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done(&recorder.seen.lock().unwrap()) {
            assert!(tokio::time::Instant::now() < deadline, "{what}: {:?}", recorder.seen.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn every_stream_presents_the_token_the_file_holds_then() {
        use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let recorder = Recorder::default();
        let server = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(recorder.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);

        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        let settings = AdsSettings {
            backoff: (Duration::from_millis(10), Duration::from_millis(50)),
            token_file: Some(token.clone()),
            ..AdsSettings::new(endpoint, "shop/api-0")
        };
        let (configs, _received) = watch::channel(None);
        let (stop, stopped) = watch::channel(false);
        let agent = tokio::spawn(follow(settings, configs, stopped));
        // The agent starts before its token file exists: an attempt without the file fails and
        // is retried, and no stream is ever opened without a token.
        std::fs::write(&token, "token-1\n").unwrap();
        until(&recorder, "a stream with the first token", |seen| !seen.is_empty()).await;
        // The kubelet rotates the token: the streams opened after that present the new one.
        std::fs::write(&token, "token-2").unwrap();
        until(&recorder, "a stream with the rotated token", |seen| {
            seen.last() == Some(&Some("Bearer token-2".to_string()))
        })
        .await;
        let seen = recorder.seen.lock().unwrap().clone();
        assert_eq!(seen[0].as_deref(), Some("Bearer token-1"), "{seen:?}");
        assert!(
            seen.iter()
                .all(|t| t.as_deref() == Some("Bearer token-1") || t.as_deref() == Some("Bearer token-2")),
            "{seen:?}"
        );
        let _ = stop.send(true);
        agent.await.unwrap();
    }

    #[test]
    fn decodes_one_resource_or_none() {
        let config = decode(&response(vec![any(&AgentConfig::default())]), &accept).unwrap();
        assert_eq!(config, AgentConfig::default());
        assert_eq!(decode(&response(vec![]), &accept).unwrap(), AgentConfig::default());
    }

    #[test]
    fn refuses_what_it_cannot_apply() {
        let error = decode(&response(vec![garbage()]), &accept).unwrap_err().to_string();
        assert!(error.starts_with("agent configuration: not an AgentConfig message"), "{error}");
        let empty = AgentConfig::default();
        let two = decode(&response(vec![any(&empty), any(&empty)]), &accept).unwrap_err().to_string();
        assert_eq!(two, "2 resources, expected one agent configuration");
        let refused = decode(&response(vec![any(&empty)]), &|_| Err(Error::EmptyRuleId)).unwrap_err();
        assert!(matches!(refused, Error::EmptyRuleId));
        let wrong = DiscoveryResponse { type_url: "x".into(), ..DiscoveryResponse::default() };
        assert_eq!(
            decode(&wrong, &accept).unwrap_err().to_string(),
            format!("unexpected type \"x\", expected {TYPE_URL:?}")
        );
    }
}
