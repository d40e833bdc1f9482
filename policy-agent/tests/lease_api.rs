//! The lease API of the whole agent over real HTTP, on real Redis (the harness's
//! `redis-server`): acquire, renew, release and get; every error with its status and reason;
//! a waiting acquire; configuration swaps; leader election between two agents; and the real
//! `breakwater-agent` binary killed while it holds a lease.

// Helpers outside #[test] fns unwrap too, as the tests themselves may.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use breakwater_agent::lease::leader::LeaderSettings;
use breakwater_agent::limiter::LimiterSettings;
use breakwater_agent::source::ConfigSource;
use breakwater_agent::store::{RedisSettings, RedisTopology};
use breakwater_agent::{LeaseSettings, Settings, StoreSettings};
use breakwater_api::agent::{AgentConfig, LeaseRule};
use serde_json::{Value, json};
use support::{RedisServer, Running, unique_prefix, wait_until};
use tokio::sync::watch;

fn lease(name: &str, ttl_ms: u64, holders: u32) -> LeaseRule {
    LeaseRule { id: format!("shop/{name}"), name: name.into(), ttl_ms, holders }
}

fn config(leases: Vec<LeaseRule>) -> AgentConfig {
    AgentConfig { leases, ..Default::default() }
}

struct Agent {
    running: Running,
    lease: SocketAddr,
    client: reqwest::Client,
}

struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

impl Agent {
    /// An agent on `redis` with leases under `prefix`, its configuration pushed on `configs`.
    async fn start(
        redis: &RedisServer,
        prefix: &str,
        pod: &str,
        configs: watch::Receiver<Option<AgentConfig>>,
        leader: (Vec<String>, Option<&Path>),
    ) -> Agent {
        let settings = Settings {
            pod: format!("shop/{pod}"),
            config: ConfigSource::Channel(configs),
            store: StoreSettings::Redis(RedisSettings::new(RedisTopology::Standalone(redis.url()))),
            limiter: LimiterSettings { key_prefix: prefix.to_string(), ..LimiterSettings::default() },
            leases: LeaseSettings {
                leaders: leader.0,
                leader: LeaderSettings { dir: leader.1.map(Path::to_path_buf), ..LeaderSettings::default() },
                deadline: Duration::from_secs(2),
            },
            breakers: Default::default(),
        };
        let running = Running::start(settings).await;
        let (http, lease) = (running.http, running.lease);
        let agent = Agent { running, lease, client: reqwest::Client::new() };
        wait_until("the agent serves", Duration::from_secs(10), || async {
            agent.client.get(format!("http://{http}/healthz")).send().await.is_ok()
        })
        .await;
        agent
    }

    async fn stop(self) {
        self.running.stop().await;
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> Answer {
        call(&self.client, self.lease, method, path, body).await
    }

    async fn post(&self, path: &str, body: Value) -> Answer {
        self.call(reqwest::Method::POST, path, Some(&body.to_string())).await
    }

    async fn get(&self, path: &str) -> Answer {
        self.call(reqwest::Method::GET, path, None).await
    }

    async fn acquire(&self, name: &str, wait: &str) -> Answer {
        self.post(&format!("/v1/leases/{name}/acquire"), json!({"wait": wait})).await
    }

    /// Renew or release with the holder and token of `grant`.
    async fn holder_call(&self, name: &str, verb: &str, grant: &Value) -> Answer {
        let body = json!({"holder": grant["holder"], "fencingToken": grant["fencingToken"]});
        self.post(&format!("/v1/leases/{name}/{verb}"), body).await
    }

    async fn ready(&self) -> u16 {
        let url = format!("http://{}/readyz", self.running.http);
        self.client.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0)
    }
}

async fn call(
    client: &reqwest::Client,
    addr: SocketAddr,
    method: reqwest::Method,
    path: &str,
    body: Option<&str>,
) -> Answer {
    let mut request = client.request(method, format!("http://{addr}{path}"));
    if let Some(body) = body {
        request = request.header("content-type", "application/json").body(body.to_string());
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after =
        response.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"));
    Answer { status, retry_after, body }
}

fn time(value: &Value) -> jiff::Timestamp {
    value.as_str().unwrap_or_else(|| panic!("not a time: {value}")).parse().unwrap()
}

fn token(value: &Value) -> i64 {
    value["fencingToken"].as_i64().unwrap_or_else(|| panic!("no fencingToken in {value}"))
}

#[track_caller]
fn assert_error(answer: &Answer, status: u16, reason: &str) {
    assert_eq!((answer.status, answer.body["reason"].as_str()), (status, Some(reason)), "{}", answer.body);
    assert!(answer.body["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_renew_release_and_get() {
    let redis = RedisServer::start();
    let (_configs, rx) =
        watch::channel(Some(config(vec![lease("lock", 10_000, 1), lease("pool", 10_000, 2)])));
    let agent = Agent::start(&redis, &unique_prefix("happy"), "pod-a", rx, (vec![], None)).await;
    wait_until("ready", Duration::from_secs(5), || async { agent.ready().await == 200 }).await;

    let first = agent.acquire("lock", "0s").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let grant = first.body;
    assert_eq!(grant["lease"], "lock");
    assert!(grant["holder"].as_str().unwrap().starts_with("shop/pod-a"), "{grant}");
    assert_eq!(grant["ttl"], "10s");
    let acquired = time(&grant["acquiredAt"]);
    let expires = time(&grant["expiresAt"]);
    assert_eq!(expires.duration_since(acquired), jiff::SignedDuration::from_secs(10));

    let state = agent.get("/v1/leases/lock").await;
    assert_eq!(state.status, 200, "{}", state.body);
    assert_eq!(state.body["holders"], 1);
    assert_eq!(state.body["ttl"], "10s");
    assert_eq!(state.body["fencingToken"], grant["fencingToken"]);
    let grants = state.body["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1);
    assert_eq!(
        (&grants[0]["holder"], &grants[0]["fencingToken"]),
        (&grant["holder"], &grant["fencingToken"])
    );
    assert!(time(&state.body["now"]) >= acquired);

    let renewed = agent.holder_call("lock", "renew", &grant).await;
    assert_eq!(renewed.status, 200, "{}", renewed.body);
    assert_eq!(token(&renewed.body), token(&grant), "a renewal keeps the token");
    assert_eq!(renewed.body["acquiredAt"], grant["acquiredAt"]);
    assert!(time(&renewed.body["expiresAt"]) >= expires);
    assert!(time(&renewed.body["renewedAt"]) >= acquired);

    let released = agent.holder_call("lock", "release", &grant).await;
    assert_eq!(released.status, 200, "{}", released.body);
    assert_eq!(released.body["fencingToken"], grant["fencingToken"]);
    assert!(time(&released.body["releasedAt"]) >= acquired);
    let state = agent.get("/v1/leases/lock").await;
    assert_eq!(state.body["grants"], json!([]));
    assert_eq!(state.body["fencingToken"], grant["fencingToken"], "the newest token outlives its grant");

    // An empty body tries once; the next grant's token is higher.
    let again = agent.call(reqwest::Method::POST, "/v1/leases/lock/acquire", None).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert!(token(&again.body) > token(&grant));

    // A semaphore of two: two holders, the third is refused.
    let a = agent.acquire("pool", "0s").await;
    let b = agent.acquire("pool", "0s").await;
    assert_eq!((a.status, b.status), (200, 200));
    assert_ne!(a.body["holder"], b.body["holder"]);
    assert!(token(&b.body) > token(&a.body));
    assert_error(&agent.acquire("pool", "0s").await, 423, "Held");
    assert_eq!(agent.get("/v1/leases/pool").await.body["grants"].as_array().unwrap().len(), 2);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_its_status_and_reason() {
    let redis = RedisServer::start();
    let (_configs, rx) =
        watch::channel(Some(config(vec![lease("lock", 10_000, 1), lease("short", 1_000, 1)])));
    let agent = Agent::start(&redis, &unique_prefix("errors"), "pod-a", rx, (vec![], None)).await;
    wait_until("ready", Duration::from_secs(5), || async { agent.ready().await == 200 }).await;

    assert_error(&agent.acquire("nope", "0s").await, 404, "UnknownLease");
    assert_error(&agent.get("/v1/leases/nope").await, 404, "UnknownLease");
    assert_error(&agent.get("/v1/leases/nope/leader").await, 404, "UnknownLease");
    assert_error(&agent.get("/v1/leases/lock/leader").await, 404, "NotCampaigning");
    assert_error(&agent.get("/v1/other").await, 404, "NotFound");
    assert_error(&agent.get("/v1/leases/lock/acquire").await, 405, "MethodNotAllowed");

    // Held: 423 with Retry-After up to the TTL, and the time it frees.
    let grant = agent.acquire("lock", "0s").await.body;
    let held = agent.acquire("lock", "0s").await;
    assert_error(&held, 423, "Held");
    let retry = held.retry_after.expect("Retry-After");
    assert!((1..=10).contains(&retry), "Retry-After {retry}");
    assert_eq!(held.body["freeAt"], grant["expiresAt"]);
    // Waiting does not change that while the holder keeps it, and the wait is honoured.
    let started = Instant::now();
    assert_error(&agent.acquire("lock", "300ms").await, 423, "Held");
    assert!(started.elapsed() >= Duration::from_millis(300), "{:?}", started.elapsed());

    // A stale holder: a wrong token, then after release.
    let wrong = json!({"holder": grant["holder"], "fencingToken": token(&grant) - 1});
    assert_error(&agent.post("/v1/leases/lock/renew", wrong).await, 409, "NotHolder");
    assert_eq!(agent.holder_call("lock", "release", &grant).await.status, 200);
    assert_error(&agent.holder_call("lock", "renew", &grant).await, 409, "NotHolder");
    assert_error(&agent.holder_call("lock", "release", &grant).await, 409, "NotHolder");

    // A stale holder after expiry: the grant is gone by the store's clock, never renewed.
    let short = agent.acquire("short", "0s").await.body;
    let expires = time(&short["expiresAt"]);
    wait_until("the short lease expires", Duration::from_secs(5), || async {
        time(&agent.get("/v1/leases/short").await.body["now"]) > expires
    })
    .await;
    assert_error(&agent.holder_call("short", "renew", &short).await, 409, "NotHolder");
    assert_error(&agent.holder_call("short", "release", &short).await, 409, "NotHolder");

    // Bad requests say what is wrong, in the same JSON shape.
    let bad = |body: &'static str| agent.call(reqwest::Method::POST, "/v1/leases/lock/acquire", Some(body));
    let answer = bad("{not json").await;
    assert_error(&answer, 400, "BadRequest");
    assert!(answer.body["message"].as_str().unwrap().starts_with("invalid JSON body"), "{}", answer.body);
    let answer = bad(r#"{"wiat": "5s"}"#).await;
    assert!(answer.body["message"].as_str().unwrap().contains("unknown field `wiat`"), "{}", answer.body);
    let answer = bad(r#"{"wait": "5 parsecs"}"#).await;
    assert_error(&answer, 400, "BadRequest");
    assert!(answer.body["message"].as_str().unwrap().starts_with("wait: \"5 parsecs\""), "{}", answer.body);
    let answer = bad(r#"{"wait": "10m"}"#).await;
    assert_eq!(answer.body["message"], "wait: 10m is longer than the longest wait, 5m");
    let answer = bad(r#"{"wait": 5}"#).await;
    assert_error(&answer, 400, "BadRequest");
    let answer = agent.post("/v1/leases/lock/renew", json!({"holder": "x"})).await;
    assert_error(&answer, 400, "BadRequest");
    assert!(
        answer.body["message"].as_str().unwrap().contains("missing field `fencingToken`"),
        "{}",
        answer.body
    );
    assert_error(
        &agent.call(reqwest::Method::POST, "/v1/leases/lock/release", None).await,
        400,
        "BadRequest",
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_is_granted_when_the_holder_releases() {
    let redis = RedisServer::start();
    let (_configs, rx) = watch::channel(Some(config(vec![lease("lock", 30_000, 1)])));
    let agent = Agent::start(&redis, &unique_prefix("wait"), "pod-a", rx, (vec![], None)).await;
    wait_until("ready", Duration::from_secs(5), || async { agent.ready().await == 200 }).await;

    let first = agent.acquire("lock", "0s").await.body;
    let started = Instant::now();
    let mut waiting = Box::pin(agent.acquire("lock", "20s"));
    // Still unanswered after a while: it waits (a refusal would have come at once).
    assert!(tokio::time::timeout(Duration::from_millis(300), &mut waiting).await.is_err());
    let released = agent.holder_call("lock", "release", &first).await;
    assert_eq!(released.status, 200);
    let second = tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("granted promptly");
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(started.elapsed() < Duration::from_secs(20), "granted on release, not at the wait's end");
    assert!(time(&second.body["acquiredAt"]) >= time(&released.body["releasedAt"]));
    assert!(token(&second.body) > token(&first));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configuration_swap_adds_and_removes_leases() {
    let redis = RedisServer::start();
    let (configs, rx) = watch::channel(None);
    let agent = Agent::start(&redis, &unique_prefix("swap"), "pod-a", rx, (vec![], None)).await;
    assert_eq!(agent.ready().await, 503, "not ready without a configuration");
    assert_error(&agent.acquire("a", "0s").await, 404, "UnknownLease");

    configs.send(Some(config(vec![lease("a", 10_000, 1)]))).unwrap();
    wait_until("ready", Duration::from_secs(5), || async { agent.ready().await == 200 }).await;
    let a = agent.acquire("a", "0s").await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_error(&agent.acquire("b", "0s").await, 404, "UnknownLease");

    configs.send(Some(config(vec![lease("a", 10_000, 1), lease("b", 5_000, 3)]))).unwrap();
    wait_until("b is declared", Duration::from_secs(5), || async {
        agent.get("/v1/leases/b").await.status == 200
    })
    .await;
    assert_eq!(agent.get("/v1/leases/b").await.body["holders"], 3);
    assert_eq!(agent.acquire("b", "0s").await.status, 200);

    // A bad lease refuses the whole configuration: "a" and "b" stay as they were.
    configs.send(Some(config(vec![lease("b", 5_000, 3), lease("c", 0, 1)]))).unwrap();
    wait_until("the bad configuration is refused", Duration::from_secs(5), || async {
        let metrics =
            agent.client.get(format!("http://{}/metrics", agent.running.http)).send().await.unwrap();
        metrics.text().await.unwrap().contains("breakwater_agent_config_reloads_total{reason=\"rejected\"} 1")
    })
    .await;
    assert_eq!(agent.get("/v1/leases/a").await.status, 200);
    assert_error(&agent.get("/v1/leases/c").await, 404, "UnknownLease");

    // Removing a lease: it is unknown at once, grants and all.
    configs.send(Some(config(vec![lease("b", 5_000, 3)]))).unwrap();
    wait_until("a is gone", Duration::from_secs(5), || async {
        agent.get("/v1/leases/a").await.status == 404
    })
    .await;
    assert_error(&agent.acquire("a", "0s").await, 404, "UnknownLease");
    assert_error(&agent.holder_call("a", "renew", &a.body).await, 404, "UnknownLease");
    assert_eq!(agent.get("/v1/leases/b").await.body["grants"].as_array().unwrap().len(), 1);
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_election_between_two_agents() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("leader");
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rules = config(vec![lease("lead", 3_000, 1), lease("other", 3_000, 1)]);
    let (_configs, rx) = watch::channel(Some(rules));
    let leaders = vec!["lead".to_string()];
    let a = Agent::start(&redis, &prefix, "pod-a", rx.clone(), (leaders.clone(), Some(dir_a.path()))).await;
    let leading = |agent: &Agent| {
        let (client, addr) = (agent.client.clone(), agent.lease);
        async move { call(&client, addr, reqwest::Method::GET, "/v1/leases/lead/leader", None).await.body }
    };
    wait_until("a leads", Duration::from_secs(10), || async { leading(&a).await["leader"] == true }).await;
    let a_state = leading(&a).await;
    assert!(a_state["holder"].as_str().unwrap().starts_with("shop/pod-a"), "{a_state}");
    let file_a = dir_a.path().join("lead");
    assert_eq!(std::fs::read_to_string(&file_a).unwrap(), format!("{}\n", token(&a_state)));
    assert_error(&a.get("/v1/leases/other/leader").await, 404, "NotCampaigning");

    let b = Agent::start(&redis, &prefix, "pod-b", rx, (leaders, Some(dir_b.path()))).await;
    let file_b = dir_b.path().join("lead");
    wait_until("b campaigns", Duration::from_secs(10), || async { leading(&b).await["waiting"].is_string() })
        .await;
    let b_state = leading(&b).await;
    assert_eq!(b_state["leader"], false, "{b_state}");
    assert!(!file_b.exists());

    // Renewals keep a's leadership past several TTLs, with the same token.
    let until = time(&a_state["expiresAt"]);
    wait_until("a renews past its first expiry", Duration::from_secs(10), || async {
        time(&leading(&a).await["expiresAt"]) > until + jiff::SignedDuration::from_secs(3)
    })
    .await;
    assert_eq!(leading(&a).await["fencingToken"], a_state["fencingToken"]);
    assert_eq!(leading(&b).await["leader"], false);

    // a shuts down: it steps down, releases, and b takes over at once with a higher token.
    a.stop().await;
    assert!(!file_a.exists(), "a's file is removed when it steps down");
    wait_until("b leads", Duration::from_secs(10), || async { leading(&b).await["leader"] == true }).await;
    let b_state = leading(&b).await;
    assert!(token(&b_state) > token(&a_state));
    assert_eq!(b_state["terms"], 1);
    assert_eq!(std::fs::read_to_string(&file_b).unwrap(), format!("{}\n", token(&b_state)));
    b.stop().await;
    assert!(!file_b.exists());
}

/// A child process killed (SIGKILL) when dropped, so a failing test leaves none behind.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_holding_frees_the_lease_at_its_expiry() {
    let redis = RedisServer::start();
    let prefix = unique_prefix("killed");
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("agent.yaml");
    // Long enough for a second agent to start and be refused on a loaded machine.
    std::fs::write(&config_path, "leases:\n- {id: shop/lock, name: lock, ttlMs: 5000, holders: 1}\n")
        .unwrap();
    let (http, lease_addr) = (free_addr(), free_addr());
    let child = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .arg("--config")
        .arg(&config_path)
        .args(["--redis-url", &redis.url(), "--key-prefix", &prefix])
        .args(["--grpc-addr", &free_addr().to_string(), "--http-addr", &http.to_string()])
        .args(["--lease-addr", &lease_addr.to_string(), "--pod-name", "pod-a", "--pod-namespace", "shop"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starts breakwater-agent");
    let mut child = Process(child);
    let client = reqwest::Client::new();
    let acquire = |addr: SocketAddr, wait: &'static str| {
        let client = client.clone();
        async move {
            call(
                &client,
                addr,
                reqwest::Method::POST,
                "/v1/leases/lock/acquire",
                Some(&json!({"wait": wait}).to_string()),
            )
            .await
        }
    };
    wait_until("the agent process answers", Duration::from_secs(20), || async {
        client.get(format!("http://{http}/readyz")).send().await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let first = acquire(lease_addr, "0s").await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert!(first.body["holder"].as_str().unwrap().starts_with("shop/pod-a"), "{}", first.body);
    let expires = time(&first.body["expiresAt"]);

    child.0.kill().unwrap();
    child.0.wait().unwrap();

    // Another agent on the same Redis: refused while the dead agent's grant lasts...
    let (_configs, rx) = watch::channel(Some(config(vec![lease("lock", 5_000, 1)])));
    let other = Agent::start(&redis, &prefix, "pod-b", rx, (vec![], None)).await;
    wait_until("ready", Duration::from_secs(5), || async { other.ready().await == 200 }).await;
    let refused = other.acquire("lock", "0s").await;
    assert_error(&refused, 423, "Held");
    assert_eq!(refused.body["freeAt"], first.body["expiresAt"]);
    // ... and granted once it expires, never before, with a higher token.
    let second = other.acquire("lock", "10s").await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert!(time(&second.body["acquiredAt"]) >= expires, "{} < {expires}", second.body["acquiredAt"]);
    assert!(token(&second.body) > token(&first.body));
    assert!(second.body["holder"].as_str().unwrap().starts_with("shop/pod-b"));
    other.stop().await;
}
