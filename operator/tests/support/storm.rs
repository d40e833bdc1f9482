//! An ACK storm on a real API server: many proxies acknowledge a change to many policies,
//! and the operator's status writes are counted. Shared by `kube/status_writes.rs` (a few
//! hundred proxies, asserted) and `make bench-status` (5,000, reported) through `#[path]`.
//!
//! The world, in a namespace of its own: a Service `api` and `proxies` Pods behind it, each
//! with a pod-bound token for the ADS audience, and `policies` RateLimitPolicies on the
//! Service (scope Pod: carried by those pods' inbound listener and routes alone, so pods of
//! other tests on the same API server change none of their counts). An operator runs in
//! cluster mode (`run::run`) as a ServiceAccount of its own, so that the API server's audit
//! log names its requests. Each proxy is an ADS stream presenting its pod's token that
//! acknowledges whatever it is sent, a hundred streams per connection; each ACK is noted.
//!
//! Once every policy is `Programmed=True` and the writes have settled, every policy's
//! `limits` is changed at once; the proxies get the new configuration and ACK it, at once or
//! in waves (so that ACKs keep arriving after the controller has reconciled). Counted,
//! for that change: the operator's status writes of each policy from the audit log, and the
//! operator's `breakwater_status_writes_total{kind="RateLimitPolicy"}` beside the audit
//! log's count of all its RateLimitPolicy status writes; the time from the change to the last
//! ACK, and from the last ACK to the moment every policy reads `Programmed=True` at the new
//! generation (read by listing every 20 ms).

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use breakwater_api::RateLimitPolicy;
use breakwater_harness::{ControlPlane, free_port, unique_prefix};
use breakwater_operator::{compile::type_url, xds::DEFAULT_AUDIENCE};
use envoy_types::pb::envoy::{
    config::core::v3::Node,
    service::discovery::v3::{
        DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
    },
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount},
    rbac::v1::ClusterRoleBinding,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Every type a proxy (Envoy and agent of one pod) subscribes to.
const TYPES: [&str; type_url::ALL.len()] = type_url::ALL;

/// ADS streams per HTTP/2 connection (the server's default limit of concurrent streams is
/// 200; one connection per proxy would cost two file descriptors each).
const STREAMS_PER_CONNECTION: usize = 100;

/// Pods and tokens made at once while setting up.
const SETUP_IN_FLIGHT: usize = 32;

/// How long the counts must stay the same to be read as settled.
const SETTLED: Duration = Duration::from_secs(2);

/// How often the policies are listed while waiting for `Programmed=True`.
const POLL: Duration = Duration::from_millis(20);

/// How big a storm.
#[derive(Clone, Copy, Debug)]
pub struct Storm {
    pub proxies: usize,
    pub policies: usize,
    /// The proxies ACK in this many waves, `wave_gap` apart (proxy i in wave i % waves): ACKs
    /// that arrive after the controller's debounce has run, changing no verdict. 1: all at
    /// once, as fast as they can.
    pub waves: usize,
    pub wave_gap: Duration,
    /// How long each wait may take (all connected and programmed, the change programmed).
    pub deadline: Duration,
}

/// What the change cost.
#[derive(Debug)]
pub struct Outcome {
    /// The operator's status writes of each policy, by name, after the change (audit log).
    pub writes: BTreeMap<String, usize>,
    /// All its RateLimitPolicy status writes after the change: by the audit log, and by its
    /// own metric.
    pub audit_writes: usize,
    pub metric_writes: f64,
    /// ACKs the proxies sent after the change.
    pub acks: usize,
    /// From the change to the last ACK before every policy read True.
    pub change_to_last_ack: Duration,
    /// From that last ACK to every policy read True at the new generation; and per policy.
    pub last_ack_to_all_true: Duration,
    pub last_ack_to_true: Vec<Duration>,
    /// Baseline: the median of 5 API writes (a ConfigMap merge patch) in the same run.
    pub api_write: Duration,
    /// How long setting up took (pods, tokens, streams, first programming).
    pub setup: Duration,
}

impl Outcome {
    /// The most status writes any one policy had.
    pub fn most_writes(&self) -> usize {
        self.writes.values().copied().max().unwrap_or(0)
    }
}

/// When the proxies acknowledged.
#[derive(Debug, Default)]
struct Acks {
    count: AtomicUsize,
    last: Mutex<Option<Instant>>,
}

impl Acks {
    fn note(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut last) = self.last.lock() {
            *last = Some(Instant::now());
        }
    }

    fn last(&self) -> Option<Instant> {
        self.last.lock().ok().and_then(|last| *last)
    }
}

fn parse<T: DeserializeOwned>(value: Value) -> T {
    serde_json::from_value(value).expect("a valid fixture")
}

/// A client for `kubeconfig`, with the operator's TLS provider installed.
async fn client(kubeconfig: &Path) -> Client {
    breakwater_operator::run::install_tls_provider();
    let config = Kubeconfig::read_from(kubeconfig).expect("a kubeconfig");
    let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .expect("a valid kubeconfig");
    Client::try_from(config).expect("a client from the kubeconfig")
}

/// `check` until it holds, or panics after `within`.
async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => panic!("{what}: not within {within:?}; last: {last}"),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The body of `path` on the operator's metrics port (empty while it does not answer).
async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
    };
    tokio::time::timeout(Duration::from_secs(5), get).await.ok().flatten().unwrap_or_default()
}

/// The operator's count of its RateLimitPolicy status writes.
async fn metric_writes(port: u16) -> f64 {
    let text = http_get(port, "/metrics").await;
    let sample = "breakwater_status_writes_total{kind=\"RateLimitPolicy\"}";
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// The status writes of RateLimitPolicies `user` made, from the audit log: all of them, and
/// those in `namespace` by policy name.
fn audit_writes(plane: &ControlPlane, user: &str, namespace: &str) -> (usize, BTreeMap<String, usize>) {
    let log = plane.audit_log().expect("the harness's own API server, with its audit log");
    let mut total = 0;
    let mut by_name = BTreeMap::new();
    for event in log.lines().filter_map(|line| serde_json::from_str::<Value>(line).ok()) {
        let object = &event["objectRef"];
        let written = event["user"]["username"] == user
            && event["verb"] == "patch"
            && object["resource"] == "ratelimitpolicies"
            && object["subresource"] == "status"
            && event["responseStatus"]["code"] == 200;
        if !written {
            continue;
        }
        total += 1;
        if object["namespace"] == namespace {
            let name = object["name"].as_str().unwrap_or_default().to_string();
            *by_name.entry(name).or_default() += 1;
        }
    }
    (total, by_name)
}

/// The generation of every policy whose `Programmed` is True at its current generation.
async fn programmed(api: &Api<RateLimitPolicy>) -> Result<BTreeMap<String, i64>, String> {
    let list = api.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|policy| {
            let generation = policy.metadata.generation?;
            let status = policy.status.as_ref()?;
            let condition = status.conditions.iter().find(|c| c.type_ == "Programmed")?;
            (condition.status == "True" && condition.observed_generation == Some(generation))
                .then(|| (policy.metadata.name.clone().unwrap_or_default(), generation))
        })
        .collect())
}

/// One proxy: subscribes to every type on its own stream of `channel`, presenting `token`,
/// and acknowledges every response `delay` after it came, noting each ACK, until the stream
/// ends.
async fn proxy(channel: Channel, node: String, token: String, delay: Duration, acks: Arc<Acks>) {
    let (requests, rx) = mpsc::channel(16);
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    let Ok(bearer) = format!("Bearer {token}").parse() else { return };
    request.metadata_mut().insert("authorization", bearer);
    let Ok(response) =
        AggregatedDiscoveryServiceClient::new(channel).stream_aggregated_resources(request).await
    else {
        return;
    };
    let mut responses = response.into_inner();
    let node = Some(Node { id: node, ..Node::default() });
    for type_ in TYPES {
        let subscribe = DiscoveryRequest { node: node.clone(), type_url: type_.into(), ..Default::default() };
        if requests.send(subscribe).await.is_err() {
            return;
        }
    }
    while let Ok(Some(response)) = responses.message().await {
        tokio::time::sleep(delay).await;
        let ack = DiscoveryRequest {
            version_info: response.version_info,
            node: node.clone(),
            type_url: response.type_url,
            response_nonce: response.nonce,
            ..Default::default()
        };
        if requests.send(ack).await.is_err() {
            return;
        }
        acks.note();
    }
}

/// A policy of the storm: a per-pod limit of `requests` a second on the Service `api`.
fn policy(name: &str, requests: u32) -> RateLimitPolicy {
    parse(json!({
        "apiVersion": "breakwater.dev/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": name},
        "spec": {
            "targetRefs": [{"kind": "Service", "name": "api"}],
            "limits": [{"name": "per-pod", "rate": {"requests": requests, "per": "1s"}, "scope": "Pod"}],
        },
    }))
}

/// Creates the namespace, its ServiceAccounts (`operator`, bound to cluster-admin: RBAC is
/// another test's concern; `proxy`) and the Service `api`.
async fn world(admin: &Client, ns: &str) {
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    namespaces
        .create(&PostParams::default(), &parse(json!({"metadata": {"name": ns}})))
        .await
        .expect("namespace");
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    for name in ["operator", "proxy"] {
        accounts
            .create(&PostParams::default(), &parse(json!({"metadata": {"name": name}})))
            .await
            .expect("account");
    }
    let binding: ClusterRoleBinding = parse(json!({
        "metadata": {"name": format!("{ns}-operator")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "operator", "namespace": ns}],
    }));
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");
    let service: Service = parse(json!({
        "metadata": {"name": "api"},
        "spec": {"selector": {"app": "api"}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }));
    Api::<Service>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &service)
        .await
        .expect("service");
}

/// `count` pods behind `api`, running as `proxy`, each with a pod-bound token for the ADS
/// audience: their node ids and tokens.
async fn pods(admin: &Client, ns: &str, count: usize) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), ns);
    futures::stream::iter(0..count)
        .map(|i| {
            let (pods, accounts) = (pods.clone(), accounts.clone());
            async move {
                let name = format!("api-{i}");
                let pod: Pod = parse(json!({
                    "metadata": {"name": name, "labels": {"app": "api"}},
                    "spec": {
                        "serviceAccountName": "proxy",
                        "containers": [{"name": "api", "image": "example/api:1", "ports": [{"containerPort": 8080}]}],
                    },
                }));
                let pod = pods.create(&PostParams::default(), &pod).await?;
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec![DEFAULT_AUDIENCE.to_string()],
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".into()),
                            kind: Some("Pod".into()),
                            name: Some(name.clone()),
                            uid: pod.metadata.uid.clone(),
                        }),
                        expiration_seconds: Some(3600),
                    },
                    ..TokenRequest::default()
                };
                let answer = accounts.create_token_request("proxy", &PostParams::default(), &request).await?;
                Ok::<_, kube::Error>((format!("{ns}/{name}"), answer.status.map(|s| s.token).unwrap_or_default()))
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_collect()
        .await
        .expect("the proxies' pods and tokens are created")
}

/// The median time of 5 merge patches of a ConfigMap: what one API write costs now.
async fn api_write(admin: &Client, ns: &str) -> Duration {
    let maps: Api<ConfigMap> = Api::namespaced(admin.clone(), ns);
    maps.create(&PostParams::default(), &parse(json!({"metadata": {"name": "baseline"}})))
        .await
        .expect("map");
    let mut times = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let patch = Patch::Merge(json!({"data": {"i": i.to_string()}}));
        maps.patch("baseline", &PatchParams::default(), &patch).await.expect("patch");
        times.push(started.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Runs the storm on `plane` (CRDs installed) with its admin client `admin`.
pub async fn run(plane: &ControlPlane, admin: Client, storm: Storm) -> Outcome {
    let started = Instant::now();
    let ns = unique_prefix("storm");
    world(&admin, &ns).await;
    let user = format!("system:serviceaccount:{ns}:operator");
    let account = plane.service_account(&ns, "operator");
    let proxies = pods(&admin, &ns, storm.proxies).await;
    let api: Api<RateLimitPolicy> = Api::namespaced(admin.clone(), &ns);
    let names: Vec<String> = (0..storm.policies).map(|i| format!("limit-{i}")).collect();
    for name in &names {
        api.create(&PostParams::default(), &policy(name, 100)).await.expect("policy");
    }

    // The operator, as the binary runs it, with no leader election.
    let (xds_port, metrics_port) = (free_port(), free_port());
    let localhost = |port| SocketAddr::from(([127, 0, 0, 1], port));
    let options = breakwater_operator::run::Options {
        root_namespace: format!("{ns}-root"),
        metrics_addr: localhost(metrics_port),
        xds_addr: localhost(xds_port),
        webhook: None,
        relays: Default::default(),
        leader_election_namespace: None,
        identity: "storm".into(),
        pod: None,
        redis: None,
        xds_token_audience: DEFAULT_AUDIENCE.into(),
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator =
        tokio::spawn(breakwater_operator::run::run(client(&account.kubeconfig).await, options, async {
            let _ = stopped.await;
        }));
    eventually("the operator is ready", storm.deadline, || async {
        let answer = http_get(metrics_port, "/readyz").await;
        if answer == "ready" { Ok(()) } else { Err(format!("/readyz: {answer:?}")) }
    })
    .await;

    let acks = Arc::new(Acks::default());
    let endpoint = format!("http://127.0.0.1:{xds_port}");
    let mut streams = Vec::new();
    for (batch, chunk) in proxies.chunks(STREAMS_PER_CONNECTION).enumerate() {
        let channel =
            Channel::from_shared(endpoint.clone()).expect("endpoint").connect().await.expect("connect");
        for (i, (node, token)) in chunk.iter().enumerate() {
            let wave = (batch * STREAMS_PER_CONNECTION + i) % storm.waves.max(1);
            let delay = storm.wave_gap * u32::try_from(wave).unwrap_or(0);
            streams.push(tokio::spawn(proxy(
                channel.clone(),
                node.clone(),
                token.clone(),
                delay,
                acks.clone(),
            )));
        }
    }
    let everyone = format!("acknowledged by {0}/{0} proxies", storm.proxies);
    eventually("every proxy connected and every policy programmed", storm.deadline, || async {
        let list = api.list(&ListParams::default()).await.map_err(|e| e.to_string())?;
        let waiting: Vec<String> = list
            .items
            .iter()
            .filter_map(|policy| {
                let status = policy.status.as_ref();
                let condition = status.and_then(|s| s.conditions.iter().find(|c| c.type_ == "Programmed"));
                let message = condition.map(|c| c.message.as_str()).unwrap_or_default();
                (message != everyone).then(|| format!("{:?}: {message}", policy.metadata.name))
            })
            .collect();
        if waiting.is_empty() && list.items.len() == storm.policies {
            Ok(())
        } else {
            Err(waiting.join("; "))
        }
    })
    .await;
    // Settled: the writes of the connects have all landed, in the audit log and the metric.
    let settled = || {
        eventually(
            "the status writes settle, the audit log agreeing with the metric",
            storm.deadline,
            || async {
                let now = (audit_writes(plane, &user, &ns).0, metric_writes(metrics_port).await);
                tokio::time::sleep(SETTLED).await;
                let again = (audit_writes(plane, &user, &ns).0, metric_writes(metrics_port).await);
                // Counts of one operator's writes since it started: equal once both have them.
                if now == again && now.0 as f64 == now.1 {
                    Ok(now)
                } else {
                    Err(format!("audit log and metric: {now:?}, then {again:?}"))
                }
            },
        )
    };
    let before = settled().await;
    let (_, writes_before) = audit_writes(plane, &user, &ns);
    let api_write = api_write(&admin, &ns).await;
    let setup = started.elapsed();

    // The change: every policy's limit at once.
    let acks_before = acks.count.load(Ordering::Relaxed);
    let changed_at = Instant::now();
    futures::stream::iter(&names)
        .map(|name| {
            let api = api.clone();
            async move {
                let patch = Patch::Merge(json!({"spec": {"limits": [
                    {"name": "per-pod", "rate": {"requests": 50, "per": "1s"}, "scope": "Pod"},
                ]}}));
                api.patch(name, &PatchParams::default(), &patch).await.map(|_| ())
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_collect::<()>()
        .await
        .expect("the policies change");
    // The last ACK is read before each list: the one before the list that finds the last
    // policy True is the last the operator can have programmed it from.
    let mut true_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut last_ack = changed_at;
    let deadline = changed_at + storm.deadline;
    while true_at.len() < storm.policies {
        assert!(
            Instant::now() < deadline,
            "{} of {} policies True within {:?}",
            true_at.len(),
            storm.policies,
            storm.deadline
        );
        tokio::time::sleep(POLL).await;
        last_ack = acks.last().unwrap_or(changed_at);
        let Ok(found) = programmed(&api).await else { continue };
        let now = Instant::now();
        for (name, generation) in found {
            if generation >= 2 {
                true_at.entry(name).or_insert(now);
            }
        }
    }
    let all_true = true_at.values().max().copied().unwrap_or(changed_at);
    let acks_after = acks.count.load(Ordering::Relaxed) - acks_before;
    let after = settled().await;
    let (_, writes_after) = audit_writes(plane, &user, &ns);
    let writes = names
        .iter()
        .map(|name| {
            let count = |w: &BTreeMap<String, usize>| w.get(name).copied().unwrap_or(0);
            (name.clone(), count(&writes_after) - count(&writes_before))
        })
        .collect();

    let _ = stop.send(());
    for stream in streams {
        stream.abort();
    }
    operator.await.expect("operator task").expect("the operator stops cleanly");
    // No kubelet or namespace controller runs: delete the pods at once, so that later tests'
    // operators do not count them.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let now = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    pods.delete_collection(&now, &ListParams::default()).await.expect("pods deleted");

    Outcome {
        writes,
        audit_writes: after.0 - before.0,
        metric_writes: after.1 - before.1,
        acks: acks_after,
        change_to_last_ack: last_ack.saturating_duration_since(changed_at),
        last_ack_to_all_true: all_true.saturating_duration_since(last_ack),
        last_ack_to_true: true_at.values().map(|at| at.saturating_duration_since(last_ack)).collect(),
        api_write,
        setup,
    }
}
