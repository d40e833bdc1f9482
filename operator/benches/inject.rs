//! What sidecar injection and ADS stream identity cost (`make bench-inject`), against a real
//! kube-apiserver and etcd that this benchmark starts for itself (`ControlPlane::start`, so no
//! other test's load shares them).
//!
//! Admission: the webhook runs in this process with its managed certificate, registered by
//! URL on loopback (`failurePolicy: Fail`) for one labelled namespace. Pods are created through
//! the API server at a fixed rate, open loop (a slow answer does not slow the next create),
//! into that namespace and, in the same rounds, into an unlabelled one: the baseline is the API
//! server's own create path with no webhook called. A third side creates, unlabelled, pods
//! already injected in process: the same stored pod without the webhook call, which splits
//! what injection adds into the call and the larger pod. The sides alternate in slices so that
//! load from elsewhere on the machine hits all three. The handler's own time comes from its
//! histogram (live, by bucket) and from replaying the same pods through `Injector::review` in
//! process (exact).
//!
//! Stream identity: 1,000 pods with a ServiceAccount, each with a pod-bound token from the
//! TokenRequest API for the ADS audience. Their streams are opened against an ADS server that
//! checks tokens with TokenReviews (cold: every review is new; warm: every one is cached) and,
//! in the same run, against one that checks nothing (the baseline). The operator's own metric
//! must show exactly one TokenReview per proxy after both passes, or the benchmark fails.

// The benchmark uses the token-presenting part of the tests' client.
#[allow(dead_code)]
#[path = "../tests/support/ads.rs"]
mod ads;
#[allow(dead_code)]
#[path = "../tests/support/cluster.rs"]
mod cluster;

#[allow(dead_code)]
mod support;

use std::{
    path::Path,
    sync::{Arc, atomic::AtomicBool},
    time::{Duration, Instant},
};

use breakwater_harness::{ControlPlane, free_port};
use breakwater_operator::{
    compile::Compiled,
    http::State,
    inject::{
        self, Injector, WebhookOptions,
        certs::{self, Lifetimes},
        pod as injected,
    },
    standalone::load,
    xds::{AdsServer, Authenticator, DEFAULT_AUDIENCE, SnapshotCache},
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{
    admissionregistration::v1::MutatingWebhookConfiguration,
    authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec},
    core::v1::{Namespace, Pod, ServiceAccount},
};
use kube::{
    Api, Client,
    api::PostParams,
    core::{DynamicObject, admission::AdmissionReview},
};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The admission rate.
const PODS_PER_SECOND: f64 = 100.0;
/// Rounds of the admission comparison; each figure is reported per round, then as the median
/// and spread over rounds.
const ROUNDS: usize = 5;
/// Slices per side in a round, the sides taking turns (3 sides × 3 slices × 80 pods at 100
/// pods/s: 7.2 s a round, 36 s for the five; 240 creates per side behind each round's p99).
const SLICES: usize = 3;
const SLICE_PODS: usize = 80;
/// Pods per side before measuring: the API server's connections to the webhook and etcd,
/// and the client's to the API server, are open by then.
const WARM_UP_PODS: usize = 50;

/// The fleet: 1,000 proxies reconnecting.
const PROXIES: usize = 1_000;
/// Streams being opened at once, as proxies reconnecting after an operator restart would be.
const STREAMS_IN_FLIGHT: usize = 64;
/// Streams opened one at a time after the passes, for the floor of a stream's latency.
const ALONE: usize = 50;
/// Requests in flight while the proxies' pods and tokens are made (setup, not measured).
const SETUP_IN_FLIGHT: usize = 32;
/// The API server refuses token lifetimes under 10 minutes.
const TOKEN_SECONDS: i64 = 3600;

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench-inject: skipped outside `cargo bench` (run `make bench-inject`)");
        return;
    }
    println!("command: make bench-inject (cargo bench -q -p breakwater-operator --bench inject)");
    println!("commit: {}", support::commit());
    // Blocking: it builds the binaries when missing and waits for /readyz.
    let plane = tokio::task::spawn_blocking(ControlPlane::start).await.expect("the control plane starts");
    let client = cluster::client(&plane.kubeconfig).await;
    admission(&client).await;
    identity(&client).await;
    drop(plane);
}

async fn create_namespace(client: &Client, name: &str, labels: Value) {
    let namespace: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("a Namespace");
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap_or_else(|err| panic!("namespace {name}: {err}"));
}

// ---------------------------------------------------------------------------------------
// Admission

const LABELLED: &str = "bench-injected";
const PLAIN: &str = "bench-plain";

/// A pod as the tests create one: the ServiceAccount admission plugin is off in the harness,
/// so the pod names its account as that plugin would have set it.
fn app_pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"serviceAccountName": "default", "containers": [{"name": "app", "image": "example/app:1"}]},
    }))
    .expect("a Pod")
}

fn init_containers(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.init_containers.as_ref())
        .map(|list| list.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

/// The MutatingWebhookConfiguration the chart would install, by URL on loopback, for the
/// labelled namespace alone.
async fn register(client: &Client, port: u16) -> String {
    let name = "breakwater-bench".to_string();
    let configuration: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": name},
        "webhooks": [{
            "name": "inject.breakwater.dev",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}{}", inject::webhook::PATH)},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "namespaceSelector": {
                "matchLabels": {injected::NAMESPACE_LABEL: "enabled"},
                "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": [LABELLED]}],
            },
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 5,
            "reinvocationPolicy": "IfNeeded",
        }],
    }))
    .expect("a MutatingWebhookConfiguration");
    Api::<MutatingWebhookConfiguration>::all(client.clone())
        .create(&PostParams::default(), &configuration)
        .await
        .expect("the webhook configuration is created");
    name
}

/// What a slice creates, and where.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// A plain pod in the labelled namespace: the webhook is called and injects it.
    Injected,
    /// A plain pod in the unlabelled namespace: no webhook.
    Baseline,
    /// The injected pod, made in process, in the unlabelled namespace: no webhook, but the
    /// API server stores and returns the same larger object.
    Preinjected,
}

impl Side {
    const ALL: [Side; 3] = [Side::Injected, Side::Baseline, Side::Preinjected];

    fn namespace(self) -> &'static str {
        match self {
            Side::Injected => LABELLED,
            Side::Baseline | Side::Preinjected => PLAIN,
        }
    }

    fn pod(self, name: &str, injector: &Injector) -> Pod {
        let pod = app_pod(name);
        if self != Side::Preinjected {
            return pod;
        }
        let json = serde_json::to_value(&pod).expect("a pod serializes");
        match injector.decide(&json, LABELLED) {
            injected::Decision::Inject { pod, .. } => serde_json::from_value(pod).expect("an injected Pod"),
            _ => panic!("the injector leaves {name} alone"),
        }
    }

    /// The init containers its pods must come back with.
    fn init_containers(self) -> &'static [&'static str] {
        match self {
            Side::Injected | Side::Preinjected => {
                &[injected::CAPTURE_CONTAINER, injected::AGENT_CONTAINER, injected::PROXY_CONTAINER]
            }
            Side::Baseline => &[],
        }
    }
}

/// What one side's creates measured over a round.
#[derive(Default)]
struct Creates {
    latencies: Vec<Duration>,
    /// Wall time of the side's slices, first send to last answer.
    busy: Duration,
    /// The stored pods, as the API server answered the creates.
    pods: Vec<Pod>,
}

impl Creates {
    fn pods_per_second(&self) -> f64 {
        self.latencies.len() as f64 / self.busy.as_secs_f64()
    }
}

/// The pods a run creates: where, their serial numbers, the injector that pre-injects.
struct Creator {
    client: Client,
    injector: Injector,
    serial: usize,
}

impl Creator {
    /// Creates `count` pods of `side` at [`PODS_PER_SECOND`], open loop: each create is sent
    /// at its scheduled time whatever the earlier ones are doing, so the latencies are those of
    /// a steady arrival rate, not of a client waiting for answers. Every pod must come back
    /// with the init containers of its side: a benchmark of a broken path is worthless.
    async fn slice(&mut self, side: Side, count: usize, into: &mut Creates) {
        let api = Api::<Pod>::namespaced(self.client.clone(), side.namespace());
        let interval = Duration::from_secs_f64(1.0 / PODS_PER_SECOND);
        let started = Instant::now();
        let mut sent = Vec::with_capacity(count);
        for i in 0..count {
            tokio::time::sleep_until((started + interval * u32::try_from(i).expect("small")).into()).await;
            self.serial += 1;
            let (api, pod) = (api.clone(), side.pod(&format!("app-{}", self.serial), &self.injector));
            sent.push(tokio::spawn(async move {
                let at = Instant::now();
                let stored = api.create(&PostParams::default(), &pod).await;
                (at.elapsed(), stored)
            }));
        }
        for task in sent {
            let (latency, stored) = task.await.expect("create task");
            let pod = stored.unwrap_or_else(|err| panic!("create in {}: {err}", side.namespace()));
            assert_eq!(init_containers(&pod), side.init_containers(), "a pod came back wrong");
            into.latencies.push(latency);
            into.pods.push(pod);
        }
        into.busy += started.elapsed();
    }
}

/// The webhook's `breakwater_admission_duration_seconds`: cumulative bucket counts by upper
/// bound, sum and count.
#[derive(Clone, Default)]
struct Histogram {
    buckets: Vec<(f64, f64)>,
    sum: f64,
    count: f64,
}

impl Histogram {
    fn read(state: &State) -> Self {
        const NAME: &str = "breakwater_admission_duration_seconds";
        let mut histogram = Histogram::default();
        for line in state.metrics.encode().lines() {
            let Some((sample, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            if let Some(le) = sample.strip_prefix(&format!("{NAME}_bucket{{le=\"")) {
                let le = le.trim_end_matches("\"}");
                histogram.buckets.push((le.parse().unwrap_or(f64::INFINITY), value));
            } else if sample == format!("{NAME}_sum") {
                histogram.sum = value;
            } else if sample == format!("{NAME}_count") {
                histogram.count = value;
            }
        }
        histogram
    }

    /// What was observed between `earlier` and `self`: (count, mean, the upper bound of the
    /// bucket holding the 99th percentile).
    fn since(&self, earlier: &Histogram) -> (f64, Duration, f64) {
        let count = self.count - earlier.count;
        let mean = Duration::from_secs_f64((self.sum - earlier.sum) / count.max(1.0));
        let p99 = self
            .buckets
            .iter()
            .zip(&earlier.buckets)
            .find(|((_, now), (_, before))| now - before >= 0.99 * count)
            .map_or(f64::INFINITY, |((le, _), _)| *le);
        (count, mean, p99)
    }
}

/// The AdmissionReview the API server sends for `pod` (a stored baseline pod, so defaulted as
/// the API server defaults before it calls webhooks; the fields it sets only after admission
/// removed), bound for the labelled namespace.
fn review_of(pod: &Pod, serial: usize) -> Vec<u8> {
    let mut object = serde_json::to_value(pod).expect("a pod serializes");
    let metadata = object["metadata"].as_object_mut().expect("metadata");
    for field in ["uid", "resourceVersion", "creationTimestamp"] {
        metadata.remove(field);
    }
    metadata.insert("namespace".into(), LABELLED.into());
    let resource = json!({"group": "", "version": "v1", "resource": "pods"});
    let kind = json!({"group": "", "version": "v1", "kind": "Pod"});
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("replay-{serial}"),
            "kind": kind, "resource": resource, "requestKind": kind, "requestResource": resource,
            "name": object["metadata"]["name"], "namespace": LABELLED, "operation": "CREATE",
            "userInfo": {"username": "breakwater-test-admin", "groups": ["system:masters", "system:authenticated"]},
            "object": object, "oldObject": null, "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }))
    .expect("a review serializes")
}

/// The handler's work on each review, timed exactly: decode the review, decide and patch,
/// encode the answer (what the HTTP handler does between TLS and the socket).
fn replay(injector: &Injector, reviews: &[Vec<u8>]) -> Vec<Duration> {
    let state = State::default();
    reviews
        .iter()
        .map(|bytes| {
            let started = Instant::now();
            let review: AdmissionReview<DynamicObject> = serde_json::from_slice(bytes).expect("a review");
            let answer = serde_json::to_vec(&injector.review(review, &state)).expect("an answer");
            let elapsed = started.elapsed();
            let answer: Value = serde_json::from_slice(&answer).expect("JSON");
            assert_eq!(answer["response"]["patchType"], "JSONPatch", "the replay injects: {answer}");
            elapsed
        })
        .collect()
}

/// The `q` quantile (nearest rank) of `values`.
fn quantile<T: Copy + PartialOrd>(values: &[T], q: f64) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("comparable"));
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One round's figures.
struct Round {
    /// Per side, in [`Side::ALL`]'s order: pods/s achieved, p50 and p99 of create latency (ms).
    sides: [(f64, f64, f64); 3],
    handler_mean: f64,
    handler_p99_bucket: f64,
    replay_p50: f64,
    replay_p99: f64,
}

impl Round {
    fn p99(&self, side: Side) -> f64 {
        self.sides[Side::ALL.iter().position(|s| *s == side).expect("a side")].2
    }

    /// What injection adds to the p99: the webhook call and the larger pod.
    fn added(&self) -> f64 {
        self.p99(Side::Injected) - self.p99(Side::Baseline)
    }

    fn ratio(&self) -> f64 {
        self.p99(Side::Injected) / self.p99(Side::Baseline)
    }

    /// What the webhook call alone adds: injected against the same pod created pre-injected.
    fn call(&self) -> f64 {
        self.p99(Side::Injected) - self.p99(Side::Preinjected)
    }
}

async fn admission(client: &Client) {
    let home = "bench-webhook";
    create_namespace(client, home, json!({})).await;
    create_namespace(client, LABELLED, json!({injected::NAMESPACE_LABEL: "enabled"})).await;
    create_namespace(client, PLAIN, json!({})).await;
    let port = free_port();
    let configuration = register(client, port).await;
    let (state, stop) = (Arc::new(State::default()), CancellationToken::new());
    let options = WebhookOptions {
        addr: ([127, 0, 0, 1], port).into(),
        config: inject::Config::default(),
        certs: certs::Source::Managed {
            namespace: home.to_string(),
            secret: "webhook-tls".to_string(),
            configuration,
            dns_names: vec!["127.0.0.1".to_string()],
            lifetimes: Lifetimes::default(),
        },
        // As `run` checks it: nothing to renew within a run.
        cert_check: Duration::from_secs(60),
    };
    inject::start(client.clone(), options, state.clone(), stop.clone()).await.expect("the webhook starts");

    // Until the API server has the CA in the caBundle, `Fail` refuses the pod.
    let labelled = Api::<Pod>::namespaced(client.clone(), LABELLED);
    let deadline = Instant::now() + Duration::from_secs(60);
    for attempt in 0.. {
        match labelled.create(&PostParams::default(), &app_pod(&format!("first-{attempt}"))).await {
            Ok(pod) if init_containers(&pod) == Side::Injected.init_containers() => break,
            Ok(pod) => panic!("{LABELLED} admitted a pod without its sidecars: {:?}", init_containers(&pod)),
            Err(err) if Instant::now() > deadline => panic!("the webhook never admitted a pod: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    let injector = Injector::new(inject::Config::default()).expect("the injector's bootstrap renders");
    let mut creator = Creator { client: client.clone(), injector, serial: 0 };
    let mut sizes = Vec::new();
    for side in Side::ALL {
        let mut warm_up = Creates::default();
        creator.slice(side, WARM_UP_PODS, &mut warm_up).await;
        sizes.push(serde_json::to_vec(&warm_up.pods[0]).expect("a pod serializes").len());
    }

    println!(
        "\nadmission: {ROUNDS} rounds; in each, {SLICES} slices of {SLICE_PODS} pods per side, the sides taking \
         turns, open loop at {PODS_PER_SECOND} pods/s; latency = one Api<Pod>::create. injected: labelled \
         namespace, webhook by URL (failurePolicy Fail); baseline: unlabelled, no webhook; pre-injected: \
         the injected pod made in process, unlabelled. Stored pod: {} B injected, {} B baseline",
        sizes[0], sizes[1]
    );
    println!(
        "| round | pods/s inj / base / pre | injected p50 / p99 | baseline p50 / p99 | pre-injected p50 / p99 \
         | injection adds to p99 (inj − base) | p99 ratio | webhook call adds to p99 (inj − pre) \
         | handler mean (live) | handler p99 (live, bucket) | handler p50 / p99 (in-process replay) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let mut creates: [Creates; 3] = Default::default();
        let before = Histogram::read(&state);
        for slice in 0..3 * SLICES {
            // Each round starts with another side, so that no side always follows the same one.
            let turn = (slice + round) % 3;
            creator.slice(Side::ALL[turn], SLICE_PODS, &mut creates[turn]).await;
        }
        let (calls, handler_mean, handler_p99) = Histogram::read(&state).since(&before);
        let injected_pods = creates[0].latencies.len() as f64;
        assert!(calls >= injected_pods, "the webhook saw {calls} reviews for {injected_pods} injected pods");
        let reviews: Vec<Vec<u8>> =
            creates[1].pods.iter().enumerate().map(|(i, p)| review_of(p, i)).collect();
        let replayed = replay(&creator.injector, &reviews);
        let figures = Round {
            sides: creates.each_ref().map(|c| {
                (c.pods_per_second(), ms(quantile(&c.latencies, 0.5)), ms(quantile(&c.latencies, 0.99)))
            }),
            handler_mean: ms(handler_mean),
            handler_p99_bucket: handler_p99 * 1e3,
            replay_p50: ms(quantile(&replayed, 0.5)),
            replay_p99: ms(quantile(&replayed, 0.99)),
        };
        let [inj, base, pre] = figures.sides;
        println!(
            "| {} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:+.1} ms | {:.2} \
             | {:+.1} ms | {:.2} ms | ≤ {} ms | {:.2} / {:.2} ms |",
            round + 1,
            inj.0,
            base.0,
            pre.0,
            inj.1,
            inj.2,
            base.1,
            base.2,
            pre.1,
            pre.2,
            figures.added(),
            figures.ratio(),
            figures.call(),
            figures.handler_mean,
            figures.handler_p99_bucket,
            figures.replay_p50,
            figures.replay_p99,
        );
        rounds.push(figures);
    }
    stop.cancel();

    println!("\nadmission, median over {ROUNDS} rounds (min–max):");
    let summary = |label: &str, unit: &str, figure: &dyn Fn(&Round) -> f64| {
        let values: Vec<f64> = rounds.iter().map(figure).collect();
        let (min, max) = (quantile(&values, 0.0), quantile(&values, 1.0));
        println!("  {label}: {:.2}{unit} ({min:.2}–{max:.2})", quantile(&values, 0.5));
    };
    for (i, side) in ["injected", "baseline", "pre-injected"].into_iter().enumerate() {
        summary(&format!("{side} pods/s"), "", &|r| r.sides[i].0);
        summary(&format!("{side} create p50"), " ms", &|r| r.sides[i].1);
        summary(&format!("{side} create p99"), " ms", &|r| r.sides[i].2);
    }
    summary("injection adds to p99 (injected − baseline)", " ms", &Round::added);
    summary("p99 ratio injected / baseline", "", &Round::ratio);
    summary("webhook call adds to p99 (injected − pre-injected)", " ms", &Round::call);
    summary("handler mean (live histogram)", " ms", &|r| r.handler_mean);
    summary("handler p99 bucket bound (live histogram)", " ms", &|r| r.handler_p99_bucket);
    summary("handler p50 (in-process replay)", " ms", &|r| r.replay_p50);
    summary("handler p99 (in-process replay)", " ms", &|r| r.replay_p99);
}

// ---------------------------------------------------------------------------------------
// Stream identity

const PROXY_NAMESPACE: &str = "bench-proxies";
const PROXY_ACCOUNT: &str = "proxy";

/// Creates the proxies' pods, running as [`PROXY_ACCOUNT`], and a token bound to each, as the
/// kubelet would request for the injected projected volume; (node id, token) per proxy.
async fn proxies(client: &Client) -> Vec<(String, String)> {
    create_namespace(client, PROXY_NAMESPACE, json!({})).await;
    let accounts = Api::<ServiceAccount>::namespaced(client.clone(), PROXY_NAMESPACE);
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": PROXY_ACCOUNT}})).expect("a ServiceAccount");
    accounts.create(&PostParams::default(), &account).await.expect("the ServiceAccount is created");
    let pods = Api::<Pod>::namespaced(client.clone(), PROXY_NAMESPACE);
    futures::stream::iter(0..PROXIES)
        .map(|i| {
            let (pods, accounts) = (pods.clone(), accounts.clone());
            async move {
                let name = format!("proxy-{i}");
                let mut pod = app_pod(&name);
                if let Some(spec) = pod.spec.as_mut() {
                    spec.service_account_name = Some(PROXY_ACCOUNT.to_string());
                }
                let pod = pods.create(&PostParams::default(), &pod).await?;
                let request = TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec![DEFAULT_AUDIENCE.to_string()],
                        bound_object_ref: Some(BoundObjectReference {
                            api_version: Some("v1".to_string()),
                            kind: Some("Pod".to_string()),
                            name: Some(name.clone()),
                            uid: pod.metadata.uid.clone(),
                        }),
                        expiration_seconds: Some(TOKEN_SECONDS),
                    },
                    ..TokenRequest::default()
                };
                let answer =
                    accounts.create_token_request(PROXY_ACCOUNT, &PostParams::default(), &request).await?;
                let token = answer.status.map(|s| s.token).unwrap_or_default();
                assert!(!token.is_empty(), "no token for {name}");
                Ok::<_, kube::Error>((format!("{PROXY_NAMESPACE}/{name}"), token))
            }
        })
        .buffer_unordered(SETUP_IN_FLIGHT)
        .try_collect()
        .await
        .expect("the proxies' pods and tokens are created")
}

/// Serves ADS from `cache` on a free loopback port with `authenticator`; the endpoint and the
/// server's state (its metrics).
async fn ads_server(cache: Arc<SnapshotCache>, authenticator: Authenticator) -> (String, Arc<State>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let state = Arc::new(State::default());
    let open = Arc::new(AtomicBool::new(true));
    let server = AdsServer::authenticated(cache, state.clone(), open, authenticator);
    tokio::spawn(breakwater_operator::xds::serve(listener, server, std::future::pending()));
    (endpoint, state)
}

/// One pass: every proxy opens a stream on a connection of its own, presenting its token, and
/// waits for its first answer, `in_flight` at a time. Streams/s and per-stream time to the
/// first answer.
async fn pass(endpoint: &str, proxies: &[(String, String)], in_flight: usize) -> (f64, Vec<Duration>) {
    let slots = Arc::new(Semaphore::new(in_flight));
    let started = Instant::now();
    let mut streams = Vec::with_capacity(proxies.len());
    for (node, token) in proxies {
        let slot = slots.clone().acquire_owned().await.expect("the semaphore is never closed");
        let (endpoint, node, token) = (endpoint.to_string(), node.clone(), token.clone());
        streams.push(tokio::spawn(async move {
            let at = Instant::now();
            if let Err(status) = ads::first_answer(&endpoint, &node, Some(&token)).await {
                panic!("{node} was refused: {status:?}");
            }
            drop(slot);
            at.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(streams.len());
    for stream in streams {
        latencies.push(stream.await.expect("stream task"));
    }
    (proxies.len() as f64 / started.elapsed().as_secs_f64(), latencies)
}

/// (TokenReviews made, of which authenticated, reviews answered from the cache).
fn reviews(state: &State) -> (f64, f64, f64) {
    let text = state.metrics.encode();
    let value = |sample: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let outcome = |o: &str| value(&format!("breakwater_xds_token_reviews_total{{outcome=\"{o}\"}}"));
    let authenticated = outcome("authenticated");
    let total = authenticated + outcome("unauthenticated") + outcome("error");
    (total, authenticated, value("breakwater_xds_token_review_cache_hits_total"))
}

async fn identity(client: &Client) {
    let setup = Instant::now();
    let proxies = proxies(client).await;
    let setup = setup.elapsed();
    // Every proxy gets the examples' configuration, as in `make bench-xds`.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let inventory = load::load_dir(&examples, "breakwater-system").expect("the examples load").inventory;
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(&inventory));
    let (open, _) = ads_server(cache.clone(), Authenticator::unauthenticated()).await;
    let reviewing = Authenticator::token_reviews(client.clone(), DEFAULT_AUDIENCE);
    let (checked, state) = ads_server(cache, reviewing).await;

    // The baseline before and after the authenticated passes, so drift over the run hits it
    // as it hits them; its figure is the mean of the two.
    let before = pass(&open, &proxies, STREAMS_IN_FLIGHT).await;
    let cold = pass(&checked, &proxies, STREAMS_IN_FLIGHT).await;
    let after_cold = reviews(&state);
    let warm = pass(&checked, &proxies, STREAMS_IN_FLIGHT).await;
    let after_warm = reviews(&state);
    let after = pass(&open, &proxies, STREAMS_IN_FLIGHT).await;
    // One stream at a time, nothing queued: the floor of a stream's time to its first answer.
    let (_, alone) = pass(&open, &proxies[..ALONE], 1).await;
    let proxies_f = PROXIES as f64;
    assert_eq!(
        after_cold,
        (proxies_f, proxies_f, 0.0),
        "(reviews, authenticated, cache hits) after the cold pass"
    );
    assert_eq!(
        after_warm,
        (proxies_f, proxies_f, proxies_f),
        "(reviews, authenticated, cache hits) after the warm pass"
    );

    let baseline = (before.0 + after.0) / 2.0;
    println!(
        "\nstream identity: {PROXIES} pods with pod-bound tokens (TokenRequest, audience {DEFAULT_AUDIENCE}; \
         made in {:.1} s), {STREAMS_IN_FLIGHT} streams opening at once, each on its own connection, \
         to its first answer",
        setup.as_secs_f64()
    );
    println!("| pass | streams/s | ÷ baseline | p50 | p99 | TokenReviews (metric) | cache hits |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, (rate, latencies): &(f64, Vec<Duration>), counted: Option<(f64, f64, f64)>| {
        let (reviews, hits) = counted.map_or(("-".to_string(), "-".to_string()), |(total, _, hits)| {
            (format!("{total}"), format!("{hits}"))
        });
        println!(
            "| {name} | {rate:.0} | {:.2} | {:.1} ms | {:.1} ms | {reviews} | {hits} |",
            rate / baseline,
            ms(quantile(latencies, 0.5)),
            ms(quantile(latencies, 0.99)),
        );
    };
    row("baseline (no token check), before", &before, None);
    row("cold (one TokenReview each)", &cold, Some(after_cold));
    row("warm (every review cached)", &warm, Some(after_warm));
    row("baseline (no token check), after", &after, None);
    println!("  baseline streams/s: {baseline:.0} (mean of before and after)");
    println!("  cold streams/s: {:.0} ({:.2} of baseline)", cold.0, cold.0 / baseline);
    println!("  warm streams/s: {:.0} ({:.2} of baseline)", warm.0, warm.0 / baseline);
    println!(
        "  one stream at a time (baseline server, {ALONE} streams): p50 {:.1} ms, p99 {:.1} ms to the first answer",
        ms(quantile(&alone, 0.5)),
        ms(quantile(&alone, 0.99)),
    );
    println!(
        "  TokenReviews after cold: {} — after warm: {} (must be {PROXIES} both)",
        after_cold.0, after_warm.0
    );
}
