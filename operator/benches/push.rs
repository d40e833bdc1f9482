//! `make bench-xds`, two parts.
//!
//! The world (`push/world.rs`): 10,000 Services in 500 namespaces and 5,000
//! distinct proxies; for each of a few one-policy changes, the bytes every proxy is sent
//! under this server's delta xDS, state of the world with a version per type and with
//! per-resource versions, computed from the snapshots before and after; beside the baseline
//! of encoding one proxy's whole snapshot, from the same run. Then the first change pushed to
//! live proxies (1,000 pods; `BENCH_LIVE_PROXIES` another number) in a child process: the time
//! to the last ACK, the bytes they counted, the operator side's memory.
//!
//! Push latency: 1,000 ADS streams in-process on loopback, each a proxy that ACKs whatever
//! it is sent (the tests' ADS client, `tests/support/ads.rs`), on the examples. A policy
//! change is published; the clock runs from publishing the new inventory to the moment the
//! server has the last of the 1,000 ACKs of the new configuration. The baseline, measured
//! in the same run, is compiling and encoding one proxy's snapshot once.
//!
//! `-- --world` or `-- --push` runs one part alone.

// The benchmark uses the acknowledging part of the tests' client.
#[allow(dead_code)]
#[path = "../tests/support/ads.rs"]
mod ads;
#[path = "push/world.rs"]
mod world;

mod support;

use std::{
    path::Path,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use breakwater_api::{CircuitBreakerPolicy, Duration as PolicyDuration};
use breakwater_operator::{
    compile::{self, Compiled, Proxy},
    inventory::{Inventory, ObjectName},
    standalone::load,
    xds::SnapshotCache,
};
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use prost::Message;
use tonic::transport::Channel;

const CLIENTS: usize = 1_000;
const STREAMS_PER_CONNECTION: usize = 100;
const ROUNDS: usize = 7;

/// The inventory with the payments policy's timeout set to `seconds` at `generation`.
fn with_timeout(base: &Inventory, seconds: u32, generation: i64) -> Inventory {
    let mut inventory = base.clone();
    inventory.circuit_breakers = base
        .circuit_breakers
        .iter()
        .map(|policy| {
            if policy.metadata.name.as_deref() != Some("payments") {
                return policy.clone();
            }
            let mut changed: CircuitBreakerPolicy = (**policy).clone();
            changed.spec.timeout = Some(PolicyDuration::new(format!("{seconds}s")));
            changed.metadata.generation = Some(generation);
            Arc::new(changed)
        })
        .collect();
    inventory
}

async fn wait_for_all_acks(cache: &SnapshotCache, generation: i64) {
    wait_for_acks(cache, &ObjectName::new("shop", "payments"), generation, CLIENTS).await;
}

async fn wait_for_acks(cache: &SnapshotCache, name: &ObjectName, generation: i64, proxies: usize) {
    let mut changes = cache.subscribe_changes();
    loop {
        let acks = cache.acknowledgements("CircuitBreakerPolicy", name, generation);
        if acks.acknowledged == proxies {
            return;
        }
        if tokio::time::timeout(Duration::from_secs(60), changes.changed()).await.is_err() {
            panic!("no progress for 60s; last: {acks:?}");
        }
    }
}

/// Compiling and encoding one proxy's snapshot, as the discovery responses carry it.
fn encode_once(inventory: &Inventory) -> (Duration, usize) {
    let proxy = Proxy::from_node_id("shop/bench-0").expect("node id");
    let started = Instant::now();
    let snapshot = compile::compile(inventory, &proxy);
    let bytes: usize = snapshot
        .types()
        .into_iter()
        .map(|type_| {
            DiscoveryResponse {
                type_url: type_.to_string(),
                resources: snapshot.resources(type_).map(|(_, r)| r.any.clone()).collect(),
                ..DiscoveryResponse::default()
            }
            .encode_to_vec()
            .len()
        })
        .sum();
    (started.elapsed(), bytes)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values[values.len() / 2]
}

#[tokio::main]
async fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench-xds: skipped outside `cargo bench` (run `make bench-xds`)");
        return;
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--clients") {
        run_clients(args.get(at + 1).cloned().expect("--clients ENDPOINT")).await;
        return;
    }
    println!("command: make bench-xds (cargo bench -q -p breakwater-operator --bench push)");
    println!("commit: {}", support::commit());
    let (world_only, push_only) =
        (std::env::args().any(|a| a == "--world"), std::env::args().any(|a| a == "--push"));
    if !push_only {
        let inventory = world_changes();
        world_live(&inventory).await;
    }
    if !world_only {
        push_latency().await;
    }
}

/// The world: what one policy change sends each of 5,000 proxies.
fn world_changes() -> Inventory {
    let started = Instant::now();
    let inventory = world::inventory();
    eprintln!("bench-xds: the world loaded in {:.1} s", started.elapsed().as_secs_f64());
    let compiled = Compiled::new(&inventory);
    let proxies: Vec<Proxy> = inventory.pods.keys().map(|pod| Proxy { pod: pod.clone() }).collect();
    // The baseline: a new proxy's whole snapshot, encoded as discovery responses.
    let encodings: Vec<(usize, Duration)> =
        (0..7).map(|i| world::encode_snapshot(&compiled, &proxies[i * 701 % proxies.len()])).collect();
    let snapshot_bytes = encodings[0].0;
    let encode = median(encodings.iter().map(|(_, d)| *d).collect());
    println!(
        "\nThe world: {} Services in {} namespaces, {} proxies (pods), {} policies. A new proxy's \
         snapshot: {} (encoding it: {:.1} ms, median of 7).\n",
        inventory.services.len(),
        world::NAMESPACES,
        proxies.len(),
        inventory.circuit_breakers.len() + inventory.rate_limits.len(),
        mb(snapshot_bytes),
        encode.as_secs_f64() * 1e3,
    );
    println!(
        "| change | proxies sent anything | this server (delta xDS): per proxy (mean; max) | state of the world, a version per type | SotW, per-resource versions | all proxies, this server |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    for change in &world::CHANGES {
        let mut changed = inventory.clone();
        (change.apply)(&mut changed);
        let after = Compiled::new(&changed);
        let sent = world::bytes_per_proxy(&inventory, &compiled, &after);
        let reached = sent.iter().filter(|s| s.delta > 0).count();
        let stats = |f: fn(&world::Sent) -> usize| {
            let total: usize = sent.iter().map(f).sum();
            let max = sent.iter().map(f).max().unwrap_or(0);
            (total, total / sent.len().max(1), max)
        };
        let (total, mean, max) = stats(|s| s.delta);
        let (_, whole, whole_max) = stats(|s| s.whole);
        let (_, per_resource, per_resource_max) = stats(|s| s.per_resource);
        println!(
            "| {} | {reached} | {} ({}) | {} ({}) | {} ({}) | {} |",
            change.what,
            mb(mean),
            mb(max),
            mb(whole),
            mb(whole_max),
            mb(per_resource),
            mb(per_resource_max),
            mb(total),
        );
    }
    println!(
        "\n(Bytes of the discovery responses each proxy is sent, computed from the snapshots before and after: \
         mean over all proxies, then the largest. Per-resource versions: Listener, Cluster and the agent's \
         configuration still whole, the other types only the changed resources.)\n"
    );
    inventory
}

/// Proxies of the world connected live, one pod in each namespace first: 1,000, or
/// `BENCH_LIVE_PROXIES` (at most every pod). All 5,000 would need about 17 GB on the
/// operator side (README), more than the project's machines can spare beside the clients.
fn live_proxies(inventory: &Inventory) -> Vec<String> {
    let pods: Vec<String> = inventory.pods.keys().map(ToString::to_string).collect();
    let wanted = std::env::var("BENCH_LIVE_PROXIES").ok().and_then(|n| n.parse().ok()).unwrap_or(1_000);
    // Pod i of every namespace before pod i + 1 of any.
    let mut order: Vec<usize> = (0..pods.len()).collect();
    order.sort_by_key(|i| (i % world::PODS_PER_NAMESPACE, *i));
    order.into_iter().take(wanted).map(|i| pods[i].clone()).collect()
}

/// The world's first change (the timeout of team-000/svc-00) pushed to live proxies, each
/// an Envoy and an agent, each on a delta ADS stream, as the sidecars connect: the
/// time to the last ACK, the bytes each received, and the server's memory. The proxies run in
/// a child process (this binary with `--clients`), so the resident memory measured is the
/// operator's side alone: the world, the compiled snapshots, the cache and the streams.
async fn world_live(inventory: &Inventory) {
    let rss_before = support::vm_kb("VmRSS");
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(inventory));
    let endpoint = ads::serve(cache.clone()).await;
    let pods = live_proxies(inventory);
    let mut clients = Clients::start(&endpoint, &pods);
    let started = Instant::now();
    let policy = ObjectName::new("team-000", "cb-0");
    wait_for_acks(&cache, &policy, 1, pods.len()).await;
    let connecting = started.elapsed();
    let connected_rss = support::vm_kb("VmRSS");
    let (first, _) = clients.report();
    let mut changed = inventory.clone();
    (world::CHANGES[0].apply)(&mut changed);
    let started = Instant::now();
    let compiled = Compiled::new(&changed);
    let compiling = started.elapsed();
    cache.publish(compiled);
    let publishing = started.elapsed() - compiling;
    wait_for_acks(&cache, &policy, 2, pods.len()).await;
    let elapsed = started.elapsed();
    let (mean, max) = clients.report();
    println!(
        "Live, {} proxies of the world (Envoy and the agent each on a delta ADS stream; the clients in \
         another process), the timeout change: publish → last ACK {:.0} ms (of which compiling the world {:.0} ms, the cache \
         installing every proxy's snapshot {:.0} ms); \
         received per proxy {} (max {}; counted by the clients, protobuf bytes); connecting them all took \
         {:.1} s, each receiving {}. The operator side's resident memory: {} MB before serving, {} MB with the \
         proxies connected, peak {} MB.\n",
        pods.len(),
        elapsed.as_secs_f64() * 1e3,
        compiling.as_secs_f64() * 1e3,
        publishing.as_secs_f64() * 1e3,
        mb(mean),
        mb(max),
        connecting.as_secs_f64(),
        mb(first),
        rss_before / 1024,
        connected_rss / 1024,
        support::vm_kb("VmHWM") / 1024,
    );
}

/// The proxies' process: pod names in on stdin, then `report` lines answered with the mean
/// and largest bytes a proxy received since the last report.
struct Clients {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
}

impl Clients {
    fn start(endpoint: &str, pods: &[String]) -> Self {
        use std::io::{BufRead, Write};
        let mut child = Command::new(std::env::current_exe().expect("this binary"))
            .args(["--bench", "--clients", endpoint])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("the clients' process");
        let mut stdin = child.stdin.take().expect("stdin");
        writeln!(stdin, "{}", pods.join(" ")).expect("pods sent");
        child.stdin = Some(stdin);
        let lines = std::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, lines }
    }

    fn report(&mut self) -> (usize, usize) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().expect("stdin");
        writeln!(stdin, "report").and_then(|()| stdin.flush()).expect("asked");
        let line = self.lines.next().expect("a report").expect("read");
        let mut numbers = line.split_whitespace().map(|n| n.parse().expect("a number"));
        (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0))
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--clients ENDPOINT`: the proxies of the pods named on the first line of stdin, connected
/// to ENDPOINT, 100 streams a connection; each `report` line on stdin is answered with the
/// mean and the largest bytes a proxy received since the last.
async fn run_clients(endpoint: String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let mut first = String::new();
    std::io::stdin().read_line(&mut first).expect("the pods");
    let pods: Vec<String> = first.split_whitespace().map(String::from).collect();
    let received: Arc<Vec<AtomicUsize>> = Arc::new(pods.iter().map(|_| AtomicUsize::new(0)).collect());
    let mut channel = None;
    for (i, node) in pods.iter().enumerate() {
        if i % STREAMS_PER_CONNECTION == 0 {
            let connected = Channel::from_shared(endpoint.clone()).expect("endpoint").connect().await;
            channel = Some(connected.expect("connect"));
        }
        let channel = channel.clone().expect("a connection");
        let (node, received) = (node.clone(), received.clone());
        tokio::spawn(async move {
            let envoy = ads::DeltaClient::on(channel.clone(), &node).await;
            let agent = ads::DeltaClient::on(channel, &node).await;
            let count = |bytes: usize| _ = received[i].fetch_add(bytes, Ordering::Relaxed);
            tokio::join!(
                envoy.acknowledge(&ads::ENVOY, |response| count(response.encoded_len())),
                agent.acknowledge(&ads::AGENT, |response| count(response.encoded_len())),
            );
        });
    }
    // Reports are read on a thread of their own: stdin blocks.
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines().map_while(Result::ok) {
            if line == "report" && tx.blocking_send(()).is_err() {
                break;
            }
        }
    });
    while rx.recv().await.is_some() {
        let sent: Vec<usize> = received.iter().map(|r| r.swap(0, Ordering::Relaxed)).collect();
        println!(
            "{} {}",
            sent.iter().sum::<usize>() / sent.len().max(1),
            sent.iter().copied().max().unwrap_or(0)
        );
    }
}

/// Bytes, readably.
fn mb(bytes: usize) -> String {
    match bytes {
        0 => "0".to_string(),
        b if b >= 1_000_000 => format!("{:.1} MB", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} KB", b as f64 / 1e3),
        b => format!("{b} B"),
    }
}

/// Push latency on the examples: 1,000 streams, a policy change, the last ACK.
async fn push_latency() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let base = load::load_dir(&examples, "breakwater-system").expect("examples load").inventory;
    let cache = Arc::new(SnapshotCache::default());
    cache.publish(Compiled::new(&with_timeout(&base, 10, 1)));

    let endpoint = ads::serve(cache.clone()).await;
    for connection in 0..CLIENTS.div_ceil(STREAMS_PER_CONNECTION) {
        let channel =
            Channel::from_shared(endpoint.clone()).expect("endpoint").connect().await.expect("connect");
        for stream in 0..STREAMS_PER_CONNECTION {
            let node = format!("shop/bench-{}", connection * STREAMS_PER_CONNECTION + stream);
            let channel = channel.clone();
            tokio::spawn(async move { ads::Client::on(channel, &node).await.acknowledge_everything().await });
        }
    }
    wait_for_all_acks(&cache, 1).await;
    assert_eq!(cache.connected(), CLIENTS);

    let mut pushes = Vec::new();
    let mut baselines = Vec::new();
    let mut bytes = 0;
    for round in 0..ROUNDS {
        let generation = i64::try_from(round).expect("small") + 2;
        let inventory = with_timeout(&base, 11 + u32::try_from(round).expect("small"), generation);
        let (baseline, encoded) = encode_once(&inventory);
        baselines.push(baseline);
        bytes = encoded;
        let started = Instant::now();
        cache.publish(Compiled::new(&inventory));
        wait_for_all_acks(&cache, generation).await;
        pushes.push(started.elapsed());
    }
    let (push, baseline) = (median(pushes.clone()), median(baselines));
    let worst = pushes.iter().max().copied().unwrap_or_default();
    println!(
        "| ADS clients | push → last ACK (median of {ROUNDS}) | worst | compile+encode one snapshot ({bytes} B) | ratio |"
    );
    println!("|---|---|---|---|---|");
    println!(
        "| {CLIENTS} | {:.1} ms | {:.1} ms | {:.3} ms | {:.0}× |",
        push.as_secs_f64() * 1e3,
        worst.as_secs_f64() * 1e3,
        baseline.as_secs_f64() * 1e3,
        push.as_secs_f64() / baseline.as_secs_f64()
    );
}
