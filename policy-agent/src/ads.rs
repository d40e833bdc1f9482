//! The agent's own subscription on the operator's ADS server: incremental (delta xDS, v3),
//! node id `NAMESPACE/POD` — the same node id as the pod's Envoy, so the operator counts the
//! agent's ACKs with the pod's when it reports `Programmed`. One stream, two wildcard
//! subscriptions: [`TYPE_URL`] (one resource, `agent`: the pod's rate limits and leases) and
//! [`BREAKER_TYPE_URL`] (one resource per shared breaker of the cluster, named by its id). A
//! breaker is a resource of its own so that a change to one breaker sends that breaker alone
//! to every agent, not every breaker of the cluster; delta is what lets a response carry only
//! the resources that changed, and the names of those removed.
//!
//! The agent keeps, per type, every resource it accepted by name, with the version the
//! operator gave it ([`Held`]). Each response is applied to a copy, and the configuration the
//! copy makes — the rate limits and leases of `agent`, every breaker sorted by id — is checked
//! as [`crate::source::follow`] would apply it. When the agent would refuse it, the response
//! is NACKed with the reason (the operator shows it in the policy's status) and the resources
//! held before stay in force; otherwise the copy is kept, the configuration is published on a
//! watch channel (which the agent follows like any other
//! [`crate::source::ConfigSource::Channel`]) and the response is ACKed. Its rate limits and
//! leases come before the breakers (the operator has one response of a stream unanswered at
//! a time and answers the types in type URL order, `…AgentConfig` before `…BreakerRule`);
//! every accepted response is applied at once, so until the breakers come the agent runs
//! without them.
//!
//! The stream is re-opened with backoff when it ends; the re-opening subscriptions name the
//! version of every resource held (`initial_resource_versions`), so the operator sends only
//! what differs — nothing when all of it is current.
//!
//! In a cluster the operator serves a node id only to a stream that proves it is that pod:
//! with a token file (`--xds-token-file`, the pod's projected ServiceAccount token), every
//! (re)opened stream sends `authorization: Bearer <token>`, read from the file again each time
//! because the kubelet rotates the token in place. A file that cannot be read fails that
//! attempt, which is logged and retried with the same backoff.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use breakwater_api::agent::{AgentConfig, BREAKER_TYPE_URL, BreakerRule, DecodeError, TYPE_URL};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use envoy_types::pb::google::rpc::Status;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::config::RuleSet;
use crate::metrics::Metrics;
use crate::{Error, Result};

/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK.
const INVALID_ARGUMENT: i32 = 3;

/// The types the agent subscribes to, in the order it subscribes: its own configuration
/// first, so that its rate limits and leases come before the breakers.
pub const TYPES: [&str; 2] = [TYPE_URL, BREAKER_TYPE_URL];

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

/// One accepted resource: the version the operator gave it (named again when the stream is
/// re-opened) and what it decoded to.
#[derive(Clone, Debug, PartialEq)]
struct Versioned<T> {
    version: String,
    value: T,
}

/// The resources the agent accepted, per type by name: what its configuration is made of.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Held {
    /// Of [`TYPE_URL`]; the operator sends one, `agent`.
    agent: BTreeMap<String, Versioned<AgentConfig>>,
    /// Of [`BREAKER_TYPE_URL`], named by the breakers' ids.
    breakers: BTreeMap<String, Versioned<BreakerRule>>,
}

impl Held {
    /// `response` applied to a copy of what is held: the copy and the configuration it makes,
    /// or why the agent refuses them — the error's message is the NACK's (`check` is
    /// [`applicable`] outside unit tests). What is held does not change either way.
    pub fn apply(
        &self,
        response: &DeltaDiscoveryResponse,
        check: &dyn Fn(&AgentConfig) -> Result<()>,
    ) -> Result<(Held, AgentConfig)> {
        let mut next = self.clone();
        match response.type_url.as_str() {
            TYPE_URL => update(&mut next.agent, response, breakwater_api::agent::decode)?,
            BREAKER_TYPE_URL => update(&mut next.breakers, response, breakwater_api::agent::decode_breaker)?,
            other => return Err(Error::XdsType { got: other.to_string() }),
        }
        let config = next.config()?;
        check(&config)?;
        Ok((next, config))
    }

    /// The configuration the held resources make: the rate limits and leases of the agent
    /// resource (none before the operator sent it) and every breaker resource, sorted by id.
    /// Breakers inside the agent resource are left out: the operator sends each breaker as a
    /// resource of its own, and one place for them is what a removal can be trusted by.
    pub fn config(&self) -> Result<AgentConfig> {
        if self.agent.len() > 1 {
            return Err(Error::XdsResources(self.agent.len()));
        }
        let mut config = self.agent.values().next().map(|held| held.value.clone()).unwrap_or_default();
        let mut breakers: Vec<BreakerRule> = self.breakers.values().map(|held| held.value.clone()).collect();
        breakers.sort_by(|a, b| a.id.cmp(&b.id));
        config.breakers = breakers;
        Ok(config)
    }

    /// Name → version of the resources held of `type_url`: what a re-opened subscription says
    /// it holds, so that the operator sends only what differs.
    pub fn versions(&self, type_url: &str) -> HashMap<String, String> {
        fn of<T>(held: &BTreeMap<String, Versioned<T>>) -> HashMap<String, String> {
            held.iter().map(|(name, held)| (name.clone(), held.version.clone())).collect()
        }
        match type_url {
            TYPE_URL => of(&self.agent),
            BREAKER_TYPE_URL => of(&self.breakers),
            _ => HashMap::new(),
        }
    }
}

/// Applies one response to the resources of its type: the names removed go, the resources
/// sent are decoded and added or replaced. Every resource must be of the response's type.
fn update<T>(
    held: &mut BTreeMap<String, Versioned<T>>,
    response: &DeltaDiscoveryResponse,
    decode: fn(&[u8]) -> std::result::Result<T, DecodeError>,
) -> Result<()> {
    for name in &response.removed_resources {
        held.remove(name);
    }
    for resource in &response.resources {
        let any = resource.resource.as_ref();
        let type_url = any.map_or("", |any| any.type_url.as_str());
        if type_url != response.type_url {
            return Err(Error::XdsType { got: type_url.to_string() });
        }
        let bytes = any.map_or(&[][..], |any| any.value.as_slice());
        let value =
            decode(bytes).map_err(|source| Error::XdsDecode { name: resource.name.clone(), source })?;
        held.insert(resource.name.clone(), Versioned { version: resource.version.clone(), value });
    }
    Ok(())
}

/// Follows the operator until `stop` turns true (or its sender is dropped), publishing every
/// accepted configuration.
pub async fn follow(
    settings: AdsSettings,
    configs: watch::Sender<Option<AgentConfig>>,
    mut stop: watch::Receiver<bool>,
) {
    // Kept across streams: what a re-opened stream says it holds.
    let mut held = Held::default();
    let mut backoff = settings.backoff.0;
    loop {
        let session = subscribe(&settings, &configs, &mut held);
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

/// One stream: subscribe to both types, then ACK or NACK every response until the stream
/// ends.
async fn subscribe(
    settings: &AdsSettings,
    configs: &watch::Sender<Option<AgentConfig>>,
    held: &mut Held,
) -> Result<()> {
    // Read before connecting: a missing token is this attempt's error, not the operator's.
    let authorization = settings.token_file.as_deref().map(authorization).transpose()?;
    let mut client = AggregatedDiscoveryServiceClient::connect(settings.endpoint.clone())
        .await
        .map_err(|source| Error::XdsConnect { endpoint: settings.endpoint.clone(), source })?;
    let (requests, outbound) = mpsc::channel(4);
    let node = Some(Node { id: settings.node_id.clone(), ..Node::default() });
    for type_url in TYPES {
        // No names: every resource of the type (wildcard).
        let subscription = DeltaDiscoveryRequest {
            node: node.clone(),
            type_url: type_url.to_string(),
            initial_resource_versions: held.versions(type_url),
            ..DeltaDiscoveryRequest::default()
        };
        // The channel has room for both: these sends cannot wait.
        let _ = requests.send(subscription).await;
    }
    let mut stream = tonic::Request::new(ReceiverStream::new(outbound));
    if let Some(value) = authorization {
        stream.metadata_mut().insert("authorization", value);
    }
    let mut responses =
        client.delta_aggregated_resources(stream).await.map_err(Error::XdsStream)?.into_inner();
    tracing::info!(
        endpoint = settings.endpoint,
        node = settings.node_id,
        "subscribed to the agent configuration and the breakers"
    );
    while let Some(response) = responses.message().await.map_err(Error::XdsStream)? {
        let error_detail = match held.apply(&response, &applicable) {
            Ok((next, config)) => {
                *held = next;
                configs.send_replace(Some(config));
                None
            }
            Err(reason) => {
                tracing::error!(
                    type_url = response.type_url,
                    version = response.system_version_info,
                    %reason,
                    "agent configuration rejected (NACK)"
                );
                Some(Status { code: INVALID_ARGUMENT, message: reason.to_string(), details: vec![] })
            }
        };
        let answer = DeltaDiscoveryRequest {
            node: node.clone(),
            type_url: response.type_url,
            response_nonce: response.nonce,
            error_detail,
            ..DeltaDiscoveryRequest::default()
        };
        if requests.send(answer).await.is_err() {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use super::*;
    use breakwater_api::circuit_breaker::{BreakerFallback, WindowKind};
    use breakwater_api::rate_limit::{Algorithm, FailureMode};
    use envoy_types::pb::envoy::service::discovery::v3::Resource;
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
    use envoy_types::pb::google::protobuf::Any;

    fn limits(requests: u32) -> AgentConfig {
        AgentConfig {
            rate_limits: vec![breakwater_api::agent::RateLimitRule {
                id: "shop/limits/per-user".into(),
                requests,
                period_ms: 1000,
                burst: 0,
                algorithm: Algorithm::FixedWindow,
                shadow: false,
                failure_mode: FailureMode::Open,
            }],
            ..AgentConfig::default()
        }
    }

    fn breaker(id: &str, threshold: u32) -> BreakerRule {
        BreakerRule {
            id: id.into(),
            policy: "shop/cb".into(),
            failure_rate_threshold: threshold,
            slow_call_ms: 0,
            slow_call_rate_threshold: 0,
            window: WindowKind::Count,
            window_size: 20,
            window_ms: 0,
            minimum_calls: 10,
            open_ms: 30_000,
            half_open_calls: 5,
            fallback: BreakerFallback::Admit,
        }
    }

    fn resource(name: &str, version: &str, type_url: &str, value: Vec<u8>) -> Resource {
        Resource {
            name: name.into(),
            version: version.into(),
            resource: Some(Any { type_url: type_url.into(), value }),
            ..Resource::default()
        }
    }

    fn agent_response(config: &AgentConfig, version: &str) -> DeltaDiscoveryResponse {
        let value = breakwater_api::agent::encode(config);
        DeltaDiscoveryResponse {
            type_url: TYPE_URL.into(),
            resources: vec![resource("agent", version, TYPE_URL, value)],
            ..DeltaDiscoveryResponse::default()
        }
    }

    /// Breakers added or changed (with their versions) and names removed.
    fn breaker_response(changed: &[(&BreakerRule, &str)], removed: &[&str]) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: BREAKER_TYPE_URL.into(),
            resources: changed
                .iter()
                .map(|(rule, version)| {
                    resource(&rule.id, version, BREAKER_TYPE_URL, breakwater_api::agent::encode_breaker(rule))
                })
                .collect(),
            removed_resources: removed.iter().map(|name| name.to_string()).collect(),
            ..DeltaDiscoveryResponse::default()
        }
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

    #[test]
    fn responses_add_change_and_remove_resources_of_their_type() {
        let (a, b, c) = (breaker("shop/a:80", 50), breaker("shop/b:80", 50), breaker("shop/c:80", 50));
        let held = Held::default();
        // Breakers before the agent resource: the rate limits are empty until it comes.
        let (held, config) =
            held.apply(&breaker_response(&[(&c, "c1"), (&a, "a1"), (&b, "b1")], &[]), &accept).unwrap();
        assert_eq!(
            config,
            AgentConfig { breakers: vec![a.clone(), b.clone(), c.clone()], ..Default::default() }
        );
        let (held, config) = held.apply(&agent_response(&limits(5), "x1"), &accept).unwrap();
        assert_eq!(config, AgentConfig { breakers: vec![a.clone(), b.clone(), c.clone()], ..limits(5) });

        // One breaker changed, one removed: the others stay as they were.
        let b2 = breaker("shop/b:80", 70);
        let (held, config) = held.apply(&breaker_response(&[(&b2, "b2")], &["shop/c:80"]), &accept).unwrap();
        assert_eq!(config, AgentConfig { breakers: vec![a.clone(), b2.clone()], ..limits(5) });
        let versions = |type_url| {
            let mut versions: Vec<(String, String)> = held.versions(type_url).into_iter().collect();
            versions.sort();
            versions
        };
        let pair = |name: &str, version: &str| (name.to_string(), version.to_string());
        assert_eq!(versions(BREAKER_TYPE_URL), [pair("shop/a:80", "a1"), pair("shop/b:80", "b2")]);
        assert_eq!(versions(TYPE_URL), [pair("agent", "x1")]);

        // Breakers in the agent resource are not the operator's: the breaker resources count.
        let stray = AgentConfig { breakers: vec![c.clone()], ..limits(6) };
        let (_, config) = held.apply(&agent_response(&stray, "x2"), &accept).unwrap();
        assert_eq!(config, AgentConfig { breakers: vec![a, b2], ..limits(6) });
    }

    #[test]
    fn a_response_it_cannot_apply_is_refused_whole() {
        let a = breaker("shop/a:80", 50);
        let (held, _) = Held::default().apply(&breaker_response(&[(&a, "a1")], &[]), &accept).unwrap();
        let refuse =
            |response: &DeltaDiscoveryResponse| held.apply(response, &applicable).unwrap_err().to_string();

        // A rule the agent cannot run, sent with a good one: neither is taken.
        let (bad, good) = (breaker("shop/a:80", 0), breaker("shop/z:80", 50));
        let error = refuse(&breaker_response(&[(&bad, "a2"), (&good, "z1")], &[]));
        assert!(error.contains("failureRateThreshold must be 1-100, got 0"), "{error}");
        let mut garbage = breaker_response(&[], &[]);
        garbage.resources.push(resource("shop/x:80", "x", BREAKER_TYPE_URL, b"not protobuf".to_vec()));
        let error = refuse(&garbage);
        assert!(error.starts_with("resource \"shop/x:80\": not a BreakerRule message"), "{error}");
        // An agent configuration under the breaker type, and a type the agent never asked for.
        let mut mixed = breaker_response(&[], &[]);
        mixed.resources.push(resource("agent", "x", TYPE_URL, breakwater_api::agent::encode(&limits(5))));
        assert_eq!(
            refuse(&mixed),
            format!("unexpected type {TYPE_URL:?}, expected {TYPE_URL:?} or {BREAKER_TYPE_URL:?}")
        );
        let other = DeltaDiscoveryResponse { type_url: "x".into(), ..DeltaDiscoveryResponse::default() };
        assert!(refuse(&other).starts_with("unexpected type \"x\""));
        // Two agent configurations.
        let mut two = agent_response(&limits(5), "x1");
        two.resources.push(resource("other", "x1", TYPE_URL, breakwater_api::agent::encode(&limits(5))));
        assert_eq!(refuse(&two), "2 resources, expected one agent configuration");
        // What is held did not change.
        assert_eq!(held.config().unwrap(), AgentConfig { breakers: vec![a], ..Default::default() });
    }

    /// One stream as the [`Fake`] server saw it: its `authorization`, and its requests.
    type Recorded = (Option<String>, Vec<DeltaDiscoveryRequest>);

    /// A delta ADS server that records every stream (its `authorization` and requests), and
    /// on each stream plays one script: after the stream's first two requests (the
    /// subscriptions), each response waits for the answer to the one before; then the stream
    /// ends, so the agent reopens it.
    #[derive(Clone, Default)]
    struct Fake {
        scripts: Arc<Mutex<VecDeque<Vec<DeltaDiscoveryResponse>>>>,
        streams: Arc<Mutex<Vec<Recorded>>>,
    }

    type Responses<T> =
        std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<T, tonic::Status>> + Send>>;

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for Fake {
        type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
        type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

        async fn stream_aggregated_resources(
            &self,
            _: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
        ) -> std::result::Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status>
        {
            Err(tonic::Status::unimplemented("state of the world"))
        }

        async fn delta_aggregated_resources(
            &self,
            request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
        ) -> std::result::Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status>
        {
            let token =
                request.metadata().get("authorization").and_then(|v| v.to_str().ok()).map(String::from);
            let index = {
                let mut streams = self.streams.lock().unwrap();
                streams.push((token, Vec::new()));
                streams.len() - 1
            };
            let script = self.scripts.lock().unwrap().pop_front().unwrap_or_default();
            let streams = self.streams.clone();
            let mut inbound = request.into_inner();
            let (responses, outbound) = mpsc::channel(4);
            tokio::spawn(async move {
                let mut record = async || match inbound.message().await {
                    Ok(Some(request)) => {
                        streams.lock().unwrap()[index].1.push(request);
                        true
                    }
                    _ => false,
                };
                if !(record().await && record().await) {
                    return;
                }
                for response in script {
                    if responses.send(Ok(response)).await.is_err() || !record().await {
                        return;
                    }
                }
            });
            Ok(tonic::Response::new(Box::pin(ReceiverStream::new(outbound))))
        }
    }

    impl Fake {
        async fn serve(&self) -> String {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("http://{}", listener.local_addr().unwrap());
            let server = tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
            tokio::spawn(server);
            endpoint
        }

        fn streams(&self) -> Vec<Recorded> {
            self.streams.lock().unwrap().clone()
        }

        /// Waits (with a deadline) until the streams recorded are what `done` looks for.
        async fn until(&self, what: &str, done: impl Fn(&[Recorded]) -> bool) {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !done(&self.streams()) {
                assert!(tokio::time::Instant::now() < deadline, "{what}: {:?}", self.streams());
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn every_stream_presents_the_token_the_file_holds_then() {
        let fake = Fake::default();
        let endpoint = fake.serve().await;
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
        fake.until("a stream with the first token", |streams| !streams.is_empty()).await;
        // The kubelet rotates the token: the streams opened after that present the new one.
        std::fs::write(&token, "token-2").unwrap();
        fake.until("a stream with the rotated token", |streams| {
            streams.last().is_some_and(|(token, _)| token.as_deref() == Some("Bearer token-2"))
        })
        .await;
        let tokens: Vec<Option<String>> = fake.streams().into_iter().map(|(token, _)| token).collect();
        assert_eq!(tokens[0].as_deref(), Some("Bearer token-1"), "{tokens:?}");
        assert!(
            tokens
                .iter()
                .all(|t| t.as_deref() == Some("Bearer token-1") || t.as_deref() == Some("Bearer token-2")),
            "{tokens:?}"
        );
        let _ = stop.send(true);
        agent.await.unwrap();
    }

    /// Subscribes to both types, ACKs what it applies, NACKs what it refuses with the reason,
    /// and names what it holds when it reopens the stream.
    #[tokio::test]
    async fn acks_nacks_and_reopens_with_the_versions_it_holds() {
        let (a, b) = (breaker("shop/a:80", 50), breaker("shop/b:80", 50));
        let mut first = vec![
            agent_response(&limits(5), "x1"),
            breaker_response(&[(&a, "a1"), (&b, "b1")], &[]),
            breaker_response(&[(&breaker("shop/b:80", 0), "b2")], &[]),
        ];
        for (n, response) in first.iter_mut().enumerate() {
            response.nonce = format!("n{n}");
        }
        let fake = Fake { scripts: Arc::new(Mutex::new(VecDeque::from([first]))), ..Fake::default() };
        let endpoint = fake.serve().await;
        let settings = AdsSettings {
            backoff: (Duration::from_millis(10), Duration::from_millis(50)),
            ..AdsSettings::new(endpoint, "shop/api-0")
        };
        let (configs, received) = watch::channel(None);
        let (stop, stopped) = watch::channel(false);
        let agent = tokio::spawn(follow(settings, configs, stopped));
        fake.until("the stream reopened after the script", |streams| {
            streams.len() >= 2 && streams[1].1.len() >= 2
        })
        .await;
        let _ = stop.send(true);
        agent.await.unwrap();

        let streams = fake.streams();
        let requests = &streams[0].1;
        let types: Vec<&str> = requests.iter().map(|r| r.type_url.as_str()).collect();
        assert_eq!(types, [TYPE_URL, BREAKER_TYPE_URL, TYPE_URL, BREAKER_TYPE_URL, BREAKER_TYPE_URL]);
        for subscription in &requests[..2] {
            assert_eq!(subscription.node.as_ref().map(|n| n.id.as_str()), Some("shop/api-0"));
            assert!(subscription.resource_names_subscribe.is_empty(), "wildcard");
            assert!(subscription.initial_resource_versions.is_empty(), "nothing held yet");
            assert!(subscription.response_nonce.is_empty());
        }
        // Answers name the response; a NACK carries INVALID_ARGUMENT and the reason.
        let answers: Vec<(&str, Option<&Status>)> =
            requests[2..].iter().map(|r| (r.response_nonce.as_str(), r.error_detail.as_ref())).collect();
        assert_eq!(answers[..2], [("n0", None), ("n1", None)]);
        let (nonce, nack) = answers[2];
        let nack = nack.expect("the last response is NACKed");
        assert_eq!((nonce, nack.code), ("n2", INVALID_ARGUMENT));
        assert!(nack.message.contains("failureRateThreshold must be 1-100, got 0"), "{}", nack.message);
        // The configuration in force is the one before the NACK.
        assert_eq!(*received.borrow(), Some(AgentConfig { breakers: vec![a, b], ..limits(5) }));

        // Reopened: what it holds, without the rejected version.
        let reopened = &streams[1].1;
        assert_eq!(reopened[0].type_url, TYPE_URL);
        assert_eq!(
            reopened[0].initial_resource_versions,
            HashMap::from([("agent".to_string(), "x1".to_string())])
        );
        assert_eq!(reopened[1].type_url, BREAKER_TYPE_URL);
        let held = HashMap::from([
            ("shop/a:80".to_string(), "a1".to_string()),
            ("shop/b:80".to_string(), "b1".to_string()),
        ]);
        assert_eq!(reopened[1].initial_resource_versions, held);
    }
}
