//! The agent's ADS client (delta xDS) against the operator's real ADS server on loopback: the
//! agent fetches and ACKs its configuration (so the policy reports Programmed), NACKs one it
//! would refuse with the reason (the policy reports Rejected, the agent keeps the previous
//! configuration), gets a change to one breaker as that one resource and a removed breaker as
//! its name, and comes back by itself after the operator restarts — sent nothing when what it
//! holds is current; Envoy gets a response above 4 MiB through the agent's ADS proxy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater_agent::ads::{self, AdsSettings};
use breakwater_api::agent::{AgentConfig, BREAKER_TYPE_URL, BreakerRule, RateLimitRule, TYPE_URL};
use breakwater_api::circuit_breaker::{BreakerFallback, WindowKind};
use breakwater_api::rate_limit::{Algorithm, FailureMode};
use breakwater_operator::compile::{PolicyVersion, Proxy, Snapshot, type_url};
use breakwater_operator::http::State;
use breakwater_operator::inventory::ObjectName;
use breakwater_operator::metrics::TypeLabel;
use breakwater_operator::status;
use breakwater_operator::xds::{AdsServer, SnapshotCache};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;
use tokio_stream::StreamExt;

const NODE: &str = "shop/api-0";
const DEADLINE: Duration = Duration::from_secs(10);

fn config(requests: u32) -> AgentConfig {
    AgentConfig {
        rate_limits: vec![RateLimitRule {
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

/// The snapshot of NODE: only the agent's resource, carrying `limits` at `generation`.
fn snapshot(config: &AgentConfig, generation: i64) -> Snapshot {
    let any = Any { type_url: TYPE_URL.into(), value: breakwater_api::agent::encode(config) };
    let mut snapshot = Snapshot::default();
    snapshot.insert(type_url::AGENT, "agent", any);
    let policy =
        PolicyVersion { kind: "RateLimitPolicy", name: ObjectName::new("shop", "limits"), generation };
    snapshot.carry(policy, type_url::AGENT);
    snapshot
}

fn breaker(id: &str, failure_rate_threshold: u32) -> BreakerRule {
    BreakerRule {
        id: id.into(),
        policy: "shop/breakers".into(),
        failure_rate_threshold,
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

/// The snapshot of NODE with the agent resource of `config(5)` and `breakers`, each a
/// resource of its own, carrying the CircuitBreakerPolicy shop/breakers at `generation`.
fn with_breakers(breakers: &[BreakerRule], generation: i64) -> Snapshot {
    let mut snapshot = snapshot(&config(5), 1);
    for rule in breakers {
        let any =
            Any { type_url: BREAKER_TYPE_URL.into(), value: breakwater_api::agent::encode_breaker(rule) };
        snapshot.insert(type_url::BREAKER, rule.id.clone(), any);
    }
    let policy =
        PolicyVersion { kind: "CircuitBreakerPolicy", name: ObjectName::new("shop", "breakers"), generation };
    snapshot.carry(policy, type_url::BREAKER);
    snapshot
}

/// The operator side: a snapshot cache whose compiler serves `world`, and its ADS server in
/// a runtime of its own, so that stopping it ends its streams the way a dying process does.
struct Operator {
    cache: Arc<SnapshotCache>,
    world: Arc<Mutex<Snapshot>>,
    /// Its metrics: the responses it sent, per type.
    state: Arc<State>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

impl Operator {
    async fn start(addr: &str, first: Snapshot) -> Self {
        let cache = Arc::new(SnapshotCache::default());
        let world = Arc::new(Mutex::new(first));
        let operator = Operator { cache, world, state: Arc::new(State::default()), runtime: None };
        operator.publish();
        operator.serve(addr)
    }

    fn publish(&self) {
        let world = self.world.clone();
        self.cache.set_compiler(Arc::new(move |proxy: &Proxy| {
            if proxy.node_id() == NODE { world.lock().expect("lock").clone() } else { Snapshot::default() }
        }));
    }

    fn serve(mut self, addr: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("operator runtime");
        // Re-binding the address of a stopped operator: its runtime closes the old listener
        // in the background, and its closed connections linger in TIME_WAIT.
        let deadline = std::time::Instant::now() + DEADLINE;
        let listener = loop {
            let _context = runtime.enter();
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_reuseaddr(true).expect("SO_REUSEADDR");
            match socket.bind(addr.parse().expect("address")).and_then(|()| socket.listen(64)) {
                Ok(listener) => break listener,
                Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
                    assert!(std::time::Instant::now() < deadline, "{addr} still in use");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => panic!("bind {addr}: {error}"),
            }
        };
        let server = AdsServer::unauthenticated(self.cache.clone(), self.state.clone());
        runtime.spawn(breakwater_operator::xds::serve(listener, server, std::future::pending()));
        self.runtime = Some(runtime);
        self
    }

    /// Stops every task of the operator at once, as a crash would.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }

    fn set(&self, snapshot: Snapshot) {
        *self.world.lock().expect("lock") = snapshot;
        self.publish();
    }

    /// The rate-limit policy's `Programmed` at `generation`.
    fn programmed(&self, generation: i64) -> (bool, &'static str, String) {
        self.programmed_of("RateLimitPolicy", "limits", generation)
    }

    fn programmed_of(&self, kind: &'static str, name: &str, generation: i64) -> (bool, &'static str, String) {
        let acks = self.cache.acknowledgements(kind, &ObjectName::new("shop", name), generation);
        let verdict = status::programmed(Some(&acks));
        (verdict.ok, verdict.reason, verdict.message)
    }

    /// The responses this operator sent of `type_url`.
    fn pushes(&self, type_url: &str) -> u64 {
        self.state.metrics.xds_pushes.get_or_create(&TypeLabel::of(type_url)).get()
    }
}

/// Between the agent and the operator at `endpoint`: forwards the agent's delta streams and
/// records every response the operator sends on them.
#[derive(Clone)]
struct Tap {
    endpoint: String,
    seen: Arc<Mutex<Vec<DeltaDiscoveryResponse>>>,
}

type Responses<T> = std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Tap {
    type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;

    async fn stream_aggregated_resources(
        &self,
        _: tonic::Request<tonic::Streaming<DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::StreamAggregatedResourcesStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("the agent speaks delta"))
    }

    async fn delta_aggregated_resources(
        &self,
        request: tonic::Request<tonic::Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::DeltaAggregatedResourcesStream>, tonic::Status> {
        let mut upstream = AggregatedDiscoveryServiceClient::connect(self.endpoint.clone())
            .await
            .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
        let requests = request.into_inner().map_while(Result::ok);
        let responses = upstream.delta_aggregated_resources(requests).await?.into_inner();
        let seen = self.seen.clone();
        let recorded = responses.map(move |response| {
            if let Ok(response) = &response {
                seen.lock().expect("lock").push(response.clone());
            }
            response
        });
        Ok(tonic::Response::new(Box::pin(recorded)))
    }
}

impl Tap {
    /// Serves the tap on a free loopback port: its endpoint.
    async fn start(endpoint: String) -> (String, Arc<Mutex<Vec<DeltaDiscoveryResponse>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tap = Tap { endpoint, seen: seen.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tonic::transport::Server::builder()
            .add_service(AggregatedDiscoveryServiceServer::new(tap))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        tokio::spawn(server);
        (format!("http://{addr}"), seen)
    }
}

/// What one recorded response carried: its type, the names sent and the names removed.
fn carried(response: &DeltaDiscoveryResponse) -> (&str, Vec<&str>, Vec<&str>) {
    (
        response.type_url.as_str(),
        response.resources.iter().map(|r| r.name.as_str()).collect(),
        response.removed_resources.iter().map(String::as_str).collect(),
    )
}

/// The agent side: the ADS client publishing into a watch channel, as `breakwater-agent
/// --xds-endpoint` runs it.
fn agent(endpoint: String) -> (watch::Receiver<Option<AgentConfig>>, watch::Sender<bool>) {
    let (configs, received) = watch::channel(None);
    let (stop, stopped) = watch::channel(false);
    let settings = AdsSettings {
        backoff: (Duration::from_millis(20), Duration::from_millis(200)),
        ..AdsSettings::new(endpoint, NODE)
    };
    tokio::spawn(ads::follow(settings, configs, stopped));
    (received, stop)
}

async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = probe() {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn free_addr() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr").to_string()
}

#[tokio::test]
async fn the_agent_acks_its_configuration_and_nacks_one_it_would_refuse() {
    let addr = free_addr().await;
    let operator = Operator::start(&addr, snapshot(&config(5), 1)).await;
    let (received, _stop) = agent(format!("http://{addr}"));

    let got = eventually("the first configuration", || received.borrow().clone()).await;
    assert_eq!(got, config(5));
    eventually("Programmed after the agent's ACK", || operator.programmed(1).0.then_some(())).await;
    assert_eq!(operator.programmed(1).2, "acknowledged by 1/1 proxies");

    // A rule the agent cannot enforce: NACKed with its reason, the previous one kept.
    operator.set(snapshot(&config(0), 2));
    let (_, reason, message) =
        eventually("Rejected", || Some(operator.programmed(2)).filter(|p| p.1 == "Rejected")).await;
    assert_eq!(reason, "Rejected");
    assert!(message.contains("requests must be at least 1"), "{message}");
    assert_eq!(*received.borrow(), Some(config(5)));

    // Fixed: applied and acknowledged.
    operator.set(snapshot(&config(7), 3));
    eventually("the fixed configuration", || (*received.borrow() == Some(config(7))).then_some(())).await;
    eventually("Programmed again", || operator.programmed(3).0.then_some(())).await;
}

#[tokio::test]
async fn the_agent_comes_back_after_the_operator_restarts() {
    let addr = free_addr().await;
    let world = || with_breakers(&[breaker("shop/a:80", 50)], 1);
    let mut operator = Operator::start(&addr, world()).await;
    let (received, _stop) = agent(format!("http://{addr}"));
    let first = AgentConfig { breakers: vec![breaker("shop/a:80", 50)], ..config(5) };
    eventually("the first configuration", || (*received.borrow() == Some(first.clone())).then_some(())).await;
    eventually("Programmed", || {
        operator.programmed_of("CircuitBreakerPolicy", "breakers", 1).0.then_some(())
    })
    .await;

    // The operator goes away (its streams end) and a new one with the same configuration
    // starts on the same address: the agent names what it holds, so it is sent nothing, and
    // the new operator counts it as holding the current versions.
    operator.kill();
    let mut same = Operator::start(&addr, world()).await;
    eventually("Programmed by the restarted operator", || {
        same.programmed_of("CircuitBreakerPolicy", "breakers", 1).0.then_some(())
    })
    .await;
    assert!(same.programmed(1).0, "the agent resource too");
    assert_eq!((same.pushes(TYPE_URL), same.pushes(BREAKER_TYPE_URL)), (0, 0), "nothing was resent");
    assert_eq!(*received.borrow(), Some(first));

    // Again, with a newer configuration: sent, applied and acknowledged.
    same.kill();
    let restarted = Operator::start(&addr, snapshot(&config(9), 2)).await;
    eventually("the newer configuration", || (*received.borrow() == Some(config(9))).then_some(())).await;
    eventually("Programmed by the new operator", || restarted.programmed(2).0.then_some(())).await;
}

/// A breaker changed, removed, refused and fixed: each reaches the agent as that one
/// resource (or name), and the policy's `Programmed` follows the agent's answers.
#[tokio::test]
async fn one_breaker_reaches_the_agent_alone_and_a_refused_one_is_rejected() {
    let addr = free_addr().await;
    let (a, c) = (breaker("shop/a:80", 50), breaker("shop/c:80", 50));
    let operator =
        Operator::start(&addr, with_breakers(&[a.clone(), breaker("shop/b:80", 50), c.clone()], 1)).await;
    let (tap, seen) = Tap::start(format!("http://{addr}")).await;
    let (received, _stop) = agent(tap);
    let holds = |breakers: &[BreakerRule]| Some(AgentConfig { breakers: breakers.to_vec(), ..config(5) });
    let breakers_programmed =
        |generation| operator.programmed_of("CircuitBreakerPolicy", "breakers", generation);

    let everything = holds(&[a.clone(), breaker("shop/b:80", 50), c.clone()]);
    eventually("every breaker", || (*received.borrow() == everything).then_some(())).await;
    eventually("Programmed at 1", || breakers_programmed(1).0.then_some(())).await;
    {
        let seen = seen.lock().expect("lock");
        let first: Vec<_> = seen.iter().map(carried).collect();
        assert_eq!(
            first,
            [
                (TYPE_URL, vec!["agent"], vec![]),
                (BREAKER_TYPE_URL, vec!["shop/a:80", "shop/b:80", "shop/c:80"], vec![]),
            ],
            "its own configuration first, then the breakers"
        );
    }
    // The responses recorded so far: each step below looks at what came after.
    let mut sent = seen.lock().expect("lock").len();

    // One breaker's threshold changes: that breaker alone.
    operator.set(with_breakers(&[a.clone(), breaker("shop/b:80", 70), c.clone()], 2));
    eventually("Programmed at 2", || breakers_programmed(2).0.then_some(())).await;
    assert_eq!(*received.borrow(), holds(&[a.clone(), breaker("shop/b:80", 70), c.clone()]));
    {
        let seen = seen.lock().expect("lock");
        let new: Vec<_> = seen[sent..].iter().map(carried).collect();
        assert_eq!(new, [(BREAKER_TYPE_URL, vec!["shop/b:80"], vec![])]);
        sent = seen.len();
    }

    // A breaker goes: its name alone, and the agent no longer has it.
    operator.set(with_breakers(&[a.clone(), breaker("shop/b:80", 70)], 3));
    eventually("Programmed at 3", || breakers_programmed(3).0.then_some(())).await;
    assert_eq!(*received.borrow(), holds(&[a.clone(), breaker("shop/b:80", 70)]));
    {
        let seen = seen.lock().expect("lock");
        let new: Vec<_> = seen[sent..].iter().map(carried).collect();
        assert_eq!(new, [(BREAKER_TYPE_URL, vec![], vec!["shop/c:80"])]);
    }

    // A threshold the agent cannot run: NACKed with the reason, the policy Rejected, the
    // previous breakers kept.
    operator.set(with_breakers(&[a.clone(), breaker("shop/b:80", 0)], 4));
    let (_, _, message) =
        eventually("Rejected", || Some(breakers_programmed(4)).filter(|p| p.1 == "Rejected")).await;
    assert!(message.contains("failureRateThreshold must be 1-100, got 0"), "{message}");
    assert_eq!(*received.borrow(), holds(&[a.clone(), breaker("shop/b:80", 70)]));

    // Fixed: applied and acknowledged.
    operator.set(with_breakers(&[a.clone(), breaker("shop/b:80", 80)], 5));
    eventually("Programmed at 5", || breakers_programmed(5).0.then_some(())).await;
    assert_eq!(*received.borrow(), holds(&[a, breaker("shop/b:80", 80)]));
}

/// Envoy's stream through the agent's ADS proxy carries a response above tonic's 4 MiB
/// default: the clusters of a cluster with 10,000 Services are 4.6 MB.
#[tokio::test]
async fn envoy_gets_a_response_larger_than_4_mib_through_the_agent() {
    use breakwater_agent::ads_proxy::{self, AdsProxy};
    use envoy_types::pb::envoy::config::core::v3::Node;
    use envoy_types::pb::envoy::service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    };

    const SIZE: usize = 5 << 20;
    let addr = free_addr().await;
    let mut world = snapshot(&config(5), 1);
    let big = Any { type_url: type_url::CLUSTER.into(), value: vec![7; SIZE] };
    world.insert(type_url::CLUSTER, "big", big);
    let _operator = Operator::start(&addr, world).await;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_addr = listener.local_addr().expect("addr");
    let proxy = AdsProxy { endpoint: format!("http://{addr}"), token_file: None };
    tokio::spawn(ads_proxy::serve(listener, proxy, std::future::pending()));

    let request = DiscoveryRequest {
        node: Some(Node { id: NODE.into(), ..Node::default() }),
        type_url: type_url::CLUSTER.into(),
        ..DiscoveryRequest::default()
    };
    let mut envoy = AggregatedDiscoveryServiceClient::connect(format!("http://{proxy_addr}"))
        .await
        .expect("connect to the agent's proxy")
        .max_decoding_message_size(usize::MAX);
    let mut responses = envoy
        .stream_aggregated_resources(tokio_stream::iter([request]))
        .await
        .expect("stream through the proxy")
        .into_inner();
    let response = tokio::time::timeout(DEADLINE, responses.message())
        .await
        .expect("a response within the deadline")
        .expect("the proxy forwards the operator's response")
        .expect("a response, not the end of the stream");
    assert_eq!(response.resources.len(), 1);
    assert_eq!(response.resources[0].value.len(), SIZE);
}
