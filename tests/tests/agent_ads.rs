//! The agent's ADS client against the operator's real ADS server on loopback: the agent
//! fetches and ACKs its configuration (so the policy reports Programmed), NACKs one it
//! would refuse with the reason (the policy reports Rejected, the agent keeps the previous
//! configuration), and comes back by itself after the operator restarts; Envoy gets a
//! response above 4 MiB through the agent's ADS proxy.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use breakwater_agent::ads::{self, AdsSettings};
use breakwater_api::agent::{AgentConfig, RateLimitRule, TYPE_URL};
use breakwater_api::rate_limit::{Algorithm, FailureMode};
use breakwater_operator::compile::{PolicyVersion, Proxy, Snapshot, type_url};
use breakwater_operator::http::State;
use breakwater_operator::inventory::ObjectName;
use breakwater_operator::status;
use breakwater_operator::xds::{AdsServer, SnapshotCache};
use envoy_types::pb::google::protobuf::Any;
use tokio::sync::watch;

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

/// The operator side: a snapshot cache whose compiler serves `world`, and its ADS server in
/// a runtime of its own, so that stopping it ends its streams the way a dying process does.
struct Operator {
    cache: Arc<SnapshotCache>,
    world: Arc<Mutex<Snapshot>>,
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
        let operator = Operator { cache, world, runtime: None };
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
        let server = AdsServer::unauthenticated(self.cache.clone(), Arc::new(State::default()));
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

    fn programmed(&self, generation: i64) -> (bool, &'static str, String) {
        let acks =
            self.cache.acknowledgements("RateLimitPolicy", &ObjectName::new("shop", "limits"), generation);
        let verdict = status::programmed(Some(&acks));
        (verdict.ok, verdict.reason, verdict.message)
    }
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
    let mut operator = Operator::start(&addr, snapshot(&config(5), 1)).await;
    let (received, _stop) = agent(format!("http://{addr}"));
    eventually("the first configuration", || received.borrow().clone()).await;

    // The operator goes away (its streams end) and a new one, with a newer
    // configuration, starts on the same address.
    operator.kill();
    let restarted = Operator::start(&addr, snapshot(&config(9), 2)).await;

    eventually("the newer configuration", || (*received.borrow() == Some(config(9))).then_some(())).await;
    eventually("Programmed by the new operator", || restarted.programmed(2).0.then_some(())).await;
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
