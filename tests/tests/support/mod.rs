//! The operator and agents of the flow tests, without a cluster: the operator compiles
//! `examples/` and serves the snapshots over ADS; each agent is the whole agent
//! (`breakwater_agent::run` with an xDS source, as `breakwater-agent --xds-endpoint` runs it).

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use breakwater_agent::source::ConfigSource;
use breakwater_agent::{Listeners, Settings, StoreSettings};
use breakwater_operator::compile::Compiled;
use breakwater_operator::http::State;
use breakwater_operator::inventory::Inventory;
use breakwater_operator::standalone::load;
use breakwater_operator::xds::{AdsServer, SnapshotCache};
use tokio::net::TcpListener;

pub const DEADLINE: Duration = Duration::from_secs(20);

/// The examples' inventory, compiled and served over ADS: (endpoint, cache, inventory).
pub async fn operator() -> (String, Arc<SnapshotCache>, Inventory) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let loaded = load::load_dir(&examples, "breakwater-system").expect("examples load");
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(&loaded.inventory));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let ads = AdsServer::unauthenticated(cache.clone(), Arc::new(State::default()));
    tokio::spawn(breakwater_operator::xds::serve(listener, ads, std::future::pending()));
    (endpoint, cache, loaded.inventory)
}

/// One pod's agent: its gRPC (Envoy's side), HTTP and lease API addresses.
pub struct Agent {
    pub grpc: String,
    pub http: String,
    pub lease: String,
}

/// The agent of `pod`, configured over ADS from `endpoint`, on `store`.
pub async fn agent(endpoint: &str, pod: &str, store: StoreSettings, settings: Settings) -> Agent {
    let loopback = "127.0.0.1:0".parse().expect("address");
    let listeners = Listeners::bind(loopback, loopback, loopback).await.expect("bind");
    let address = |l: &TcpListener| l.local_addr().expect("addr").to_string();
    let (grpc, http, lease) = (address(&listeners.grpc), address(&listeners.http), address(&listeners.lease));
    let settings = Settings {
        pod: pod.to_string(),
        config: ConfigSource::Xds { endpoint: endpoint.to_string(), token_file: None },
        store,
        ..settings
    };
    tokio::spawn(breakwater_agent::run(listeners, settings, std::future::pending()));
    Agent { grpc, http, lease }
}

/// Default settings for [`agent`] (its pod, source and store are set there).
pub fn settings() -> Settings {
    Settings {
        pod: String::new(),
        config: ConfigSource::Channel(tokio::sync::watch::channel(None).1),
        store: StoreSettings::Memory,
        limiter: Default::default(),
        leases: Default::default(),
        breakers: Default::default(),
    }
}

/// Waits until the agent has a configuration and its store answers (`/readyz`).
pub async fn configured(agent: &Agent) {
    let give_up = tokio::time::Instant::now() + DEADLINE;
    while reqwest::get(format!("http://{}/readyz", agent.http)).await.map(|r| r.status().as_u16()).ok()
        != Some(200)
    {
        assert!(tokio::time::Instant::now() < give_up, "agent not configured within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the agent runs the breaker `id` (its state is in `/metrics`): the agent takes
/// its breakers in a response after its own configuration, so being configured is not
/// enough for a test that reports calls to a breaker.
pub async fn runs_breaker(agent: &Agent, id: &str) {
    let series = format!("breakwater_agent_breaker_state{{breaker=\"{id}\"}}");
    let give_up = tokio::time::Instant::now() + DEADLINE;
    loop {
        let metrics = match reqwest::get(format!("http://{}/metrics", agent.http)).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if metrics.lines().any(|line| line.starts_with(&series)) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "agent {} has no breaker {id} within {DEADLINE:?}",
            agent.http
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
