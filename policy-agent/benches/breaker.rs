//! `make bench-breaker`: the shared breaker, measured on real processes.
//!
//! Starts a private `redis-server`, four `breakwater-agent` binaries (release build) on it
//! with the same breakers, and one more agent on its in-memory store, then measures:
//!
//! - **decisions**: the breaker check in CLOSED state (Redis agents: no Redis call per
//!   decision) beside the in-memory agent's rate-limit check, in alternating slices of the
//!   same run, at 16 and 64 requests in flight over tonic `RateLimitServiceClient`s;
//! - **ingestion**: access-log entries one agent counts per second from Envoy's
//!   `AccessLogService` stream (batches of 100 entries, as Envoy's buffered logger sends
//!   them), and the CPU it spends doing so;
//! - **propagation**: from the access-log entry whose failure crosses the threshold, sent to
//!   one agent, to the moment every one of the four answers OPEN (beside the moment the
//!   agent that received it does), over BENCH_TRIALS fresh breakers;
//! - **memory**: each agent's resident set size.
//!
//! Environment: BENCH_SECONDS (load per row, default 3), BENCH_ROUNDS (slices, default 5),
//! BENCH_TRIALS (propagation trials, default 40), BENCH_OUT (also write the table there).

use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use breakwater_api::agent::{AgentConfig, BREAKER_KEY, BreakerRule, DOMAIN, LIMIT_KEY, RateLimitRule};
use breakwater_api::circuit_breaker::{BreakerFallback, WindowKind};
use breakwater_api::rate_limit::{Algorithm, FailureMode};
use breakwater_harness::{RedisServer, free_port};
use breakwater_store::breaker::{BreakerStore, RedisBreakers};
use breakwater_store::{RedisConnection, RedisSettings, RedisTopology};
use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address, socket_address};
use envoy_types::pb::envoy::data::accesslog::v3::{
    AccessLogCommon, HttpAccessLogEntry, HttpRequestProperties, HttpResponseProperties,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::accesslog::v3::StreamAccessLogsMessage;
use envoy_types::pb::envoy::service::accesslog::v3::access_log_service_client::AccessLogServiceClient;
use envoy_types::pb::envoy::service::accesslog::v3::stream_access_logs_message::{
    HttpAccessLogEntries, LogEntries,
};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::google::protobuf::{Duration as PbDuration, Timestamp, UInt32Value};
use tokio::sync::mpsc;
use tonic::transport::Channel;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const HOT: &str = "bench/hot:80";
const THROUGHPUT_RULE: &str = "bench/throughput";
const PREFIX: &str = "bwbreaker";
const AGENTS: usize = 4;

fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench-breaker: skipped outside `cargo bench` (run `make bench-breaker`)");
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    match runtime.map_err(Into::into).and_then(|rt| rt.block_on(run())) {
        Ok(()) => {}
        Err(error) => {
            eprintln!("bench-breaker failed: {error}");
            std::process::exit(1);
        }
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn breaker(id: String) -> BreakerRule {
    BreakerRule {
        id,
        policy: "bench/breaker".into(),
        failure_rate_threshold: 50,
        slow_call_ms: 0,
        slow_call_rate_threshold: 0,
        window: WindowKind::Count,
        window_size: 100,
        window_ms: 0,
        minimum_calls: 100,
        // Long enough that no trial's breaker turns HALF_OPEN during the run.
        open_ms: 3_600_000,
        half_open_calls: 3,
        fallback: BreakerFallback::Admit,
    }
}

fn trial_id(trial: usize) -> String {
    format!("bench/trial-{trial}:80")
}

/// A process that is killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Agent {
    process: Process,
    grpc: String,
    http: u16,
}

impl Agent {
    fn start(config: &std::path::Path, redis: Option<&str>) -> BenchResult<Agent> {
        let (grpc, http, lease) = (free_port(), free_port(), free_port());
        let mut command = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"));
        command
            .arg("--config")
            .arg(config)
            .args(["--pod-name", &format!("bench-{grpc}"), "--pod-namespace", "bench"])
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--lease-addr", &format!("127.0.0.1:{lease}")])
            .args(["--key-prefix", PREFIX, "--log-level", "warn"]);
        if let Some(url) = redis {
            command.args(["--redis-url", url]);
        }
        let child = command.spawn().map_err(|e| format!("cannot start breakwater-agent: {e}"))?;
        Ok(Agent { process: Process(child), grpc: format!("http://127.0.0.1:{grpc}"), http })
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }

    async fn channel(&self) -> BenchResult<Channel> {
        Ok(Channel::from_shared(self.grpc.clone())?.tcp_nodelay(true).connect().await?)
    }

    async fn metric(&self, prefix: &str) -> BenchResult<f64> {
        let text = http_get(self.http, "/metrics").await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

async fn http_get(port: u16, path: &str) -> BenchResult<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    stream.read_to_string(&mut out).await?;
    Ok(out)
}

async fn wait_ready(agent: &Agent) -> BenchResult<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_get(agent.http, "/readyz").await.is_ok_and(|r| r.starts_with("HTTP/1.1 200")) {
        if Instant::now() > deadline {
            return Err("an agent did not become ready within 20s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn proc_field(pid: u32, file: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/{file}")).unwrap_or_default()
}

/// User + system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = proc_field(pid, "stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    // Linux reports in USER_HZ, 100 on every architecture this runs on.
    ticks / 100.0
}

fn rss_mb(pid: u32) -> f64 {
    let status = proc_field(pid, "status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(
            ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len().saturating_sub(1)),
        )
        .copied()
        .unwrap_or(0.0)
}

fn rls_request(key: &str, value: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![Entry { key: key.into(), value: value.into() }],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

struct Load {
    decisions: u64,
    seconds: f64,
    p99_ms: f64,
}

/// `in_flight` callers sending `request` back to back for `run_for`; every answer must be OK.
async fn drive(
    channel: &Channel,
    in_flight: usize,
    request: &RateLimitRequest,
    run_for: Duration,
) -> BenchResult<Load> {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let mut client = RateLimitServiceClient::new(channel.clone());
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(100_000);
            while started.elapsed() < run_for {
                let t = Instant::now();
                let response = client.should_rate_limit(request.clone()).await?;
                latencies.push(t.elapsed().as_micros() as u32);
                if response.get_ref().overall_code != Code::Ok as i32 {
                    return Err(tonic::Status::internal("a decision was not OK"));
                }
            }
            Ok(latencies)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await?.map_err(|s| format!("RPC: {s}"))?);
    }
    all.sort_unstable();
    let p99 = all.get((all.len() * 99 / 100).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
    Ok(Load {
        decisions: all.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        p99_ms: f64::from(p99) / 1000.0,
    })
}

/// An entry with the fields Envoy's `http_grpc` logger fills by default (addresses, timings,
/// cluster, request and response properties; about 400 bytes encoded), so decoding costs what
/// it does in a pod.
fn entry(route: &str, code: u32) -> HttpAccessLogEntry {
    let address = |ip: &str, port: u32| Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.into(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    };
    let millis = |ms: i32| Some(PbDuration { seconds: 0, nanos: ms * 1_000_000 });
    HttpAccessLogEntry {
        common_properties: Some(AccessLogCommon {
            route_name: route.into(),
            downstream_remote_address: Some(address("10.0.3.17", 48_122)),
            downstream_local_address: Some(address("10.96.12.40", 8080)),
            upstream_remote_address: Some(address("10.0.7.23", 8080)),
            upstream_local_address: Some(address("10.0.3.17", 39_044)),
            upstream_cluster: "outbound|8080|payments.shop.svc.cluster.local".into(),
            start_time: Some(Timestamp { seconds: 1_795_000_000, nanos: 123_456_000 }),
            time_to_last_rx_byte: millis(0),
            time_to_first_upstream_tx_byte: millis(0),
            time_to_last_upstream_tx_byte: millis(0),
            time_to_first_upstream_rx_byte: millis(2),
            time_to_last_upstream_rx_byte: millis(2),
            time_to_first_downstream_tx_byte: millis(2),
            time_to_last_downstream_tx_byte: millis(2),
            duration: millis(2),
            upstream_request_attempt_count: 1,
            ..Default::default()
        }),
        protocol_version: 2,
        request: Some(HttpRequestProperties {
            request_method: 2,
            scheme: "http".into(),
            authority: "payments.shop:8080".into(),
            path: "/v1/charges/ch_3PqR7sT2uV".into(),
            user_agent: "checkout/2.14.1 (go-http-client)".into(),
            request_id: "7f3c9a1e-2b4d-4c6e-8f0a-1b2c3d4e5f60".into(),
            request_headers_bytes: 412,
            request_body_bytes: 230,
            ..Default::default()
        }),
        response: Some(HttpResponseProperties {
            response_code: Some(UInt32Value { value: code }),
            response_headers_bytes: 180,
            response_body_bytes: 96,
            response_code_details: "via_upstream".into(),
            ..Default::default()
        }),
    }
}

fn batch(entries: Vec<HttpAccessLogEntry>) -> StreamAccessLogsMessage {
    StreamAccessLogsMessage {
        identifier: None,
        log_entries: Some(LogEntries::HttpLogs(HttpAccessLogEntries { log_entry: entries })),
    }
}

/// An open access-log stream to one agent, as Envoy keeps one.
async fn log_stream(agent: &Agent) -> BenchResult<mpsc::Sender<StreamAccessLogsMessage>> {
    let mut client = AccessLogServiceClient::connect(agent.grpc.clone()).await?;
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(async move {
        let _ = client.stream_access_logs(tokio_stream::wrappers::ReceiverStream::new(rx)).await;
    });
    Ok(tx)
}

async fn run() -> BenchResult<()> {
    let seconds: f64 = env_or("BENCH_SECONDS", 3.0);
    let rounds: usize = env_or("BENCH_ROUNDS", 5usize).max(1);
    let trials: usize = env_or("BENCH_TRIALS", 40usize).max(1);
    let redis = RedisServer::start();
    let dir = tempfile::tempdir()?;
    let mut breakers: Vec<BreakerRule> = (0..trials).map(|t| breaker(trial_id(t))).collect();
    breakers.push(breaker(HOT.into()));
    breakers.sort_by(|a, b| a.id.cmp(&b.id));
    let config = AgentConfig {
        rate_limits: vec![RateLimitRule {
            id: THROUGHPUT_RULE.into(),
            requests: 1_000_000_000,
            period_ms: 1000,
            burst: 0,
            algorithm: Algorithm::TokenBucket,
            shadow: false,
            failure_mode: FailureMode::Open,
        }],
        breakers,
        ..Default::default()
    };
    let path = dir.path().join("agent.json");
    std::fs::write(&path, serde_json::to_string(&config)?)?;
    // The memory baseline: an agent as it was before breakers, on the same Redis.
    let plain = dir.path().join("plain.json");
    std::fs::write(&plain, serde_json::to_string(&AgentConfig { breakers: vec![], ..config.clone() })?)?;
    let without_breakers = Agent::start(&plain, Some(&redis.url()))?;
    let memory = Agent::start(&path, None)?;
    let mut agents = Vec::new();
    for _ in 0..AGENTS {
        agents.push(Agent::start(&path, Some(&redis.url()))?);
    }
    wait_ready(&memory).await?;
    wait_ready(&without_breakers).await?;
    for agent in &agents {
        wait_ready(agent).await?;
    }
    let idle_rss: Vec<f64> = agents.iter().map(|a| rss_mb(a.pid())).collect();
    let baseline_rss = rss_mb(without_breakers.pid());
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut table = format!(
        "`make bench-breaker` — commit {commit}, {} cores, {AGENTS} agents on one Redis plus one in-memory agent, {seconds} s per row in {rounds} alternating slices (medians of the slices)\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );

    // Decisions: the breaker check (CLOSED) beside the in-memory rate-limit check.
    table.push_str("| in flight | breaker check decisions/s | p99 | agent CPU per decision | in-memory rate-limit decisions/s | p99 | agent CPU per decision | breaker / in-memory |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    let (breaker_channel, memory_channel) = (agents[0].channel().await?, memory.channel().await?);
    let breaker_request = rls_request(BREAKER_KEY, HOT);
    let memory_request = rls_request(LIMIT_KEY, THROUGHPUT_RULE);
    let slice = Duration::from_secs_f64(seconds / rounds as f64);
    for in_flight in [16usize, 64] {
        drive(&breaker_channel, in_flight, &breaker_request, Duration::from_millis(300)).await?;
        drive(&memory_channel, in_flight, &memory_request, Duration::from_millis(300)).await?;
        let mut sides = [(vec![], vec![], 0f64, 0u64), (vec![], vec![], 0f64, 0u64)];
        let mut ratios = vec![];
        for _ in 0..rounds {
            let mut rates = [0f64; 2];
            for (side, (channel, request, pid)) in [
                (&breaker_channel, &breaker_request, agents[0].pid()),
                (&memory_channel, &memory_request, memory.pid()),
            ]
            .into_iter()
            .enumerate()
            {
                let cpu0 = cpu_seconds(pid);
                let load = drive(channel, in_flight, request, slice).await?;
                let (rps, p99s, cpu, decisions) = &mut sides[side];
                rates[side] = load.decisions as f64 / load.seconds;
                rps.push(rates[side]);
                p99s.push(load.p99_ms);
                *cpu += cpu_seconds(pid) - cpu0;
                *decisions += load.decisions;
            }
            ratios.push(rates[0] / rates[1]);
        }
        let [(mut b_rps, mut b_p99, b_cpu, b_n), (mut m_rps, mut m_p99, m_cpu, m_n)] = sides;
        let row = format!(
            "| {in_flight} | {:.0} | {:.2} ms | {:.1} µs | {:.0} | {:.2} ms | {:.1} µs | **{:.2}** |\n",
            median(&mut b_rps),
            median(&mut b_p99),
            b_cpu * 1e6 / b_n as f64,
            median(&mut m_rps),
            median(&mut m_p99),
            m_cpu * 1e6 / m_n as f64,
            median(&mut ratios),
        );
        eprint!("{row}");
        table.push_str(&row);
    }

    // Ingestion: two streams (an Envoy per core) of 100-entry batches into one agent.
    let counted = "breakwater_agent_access_log_entries_total{result=\"counted\"}";
    let streams = [log_stream(&agents[0]).await?, log_stream(&agents[0]).await?];
    let message = batch((0..100).map(|i| entry(HOT, if i % 10 == 0 { 503 } else { 200 })).collect());
    let mut rates = vec![];
    let mut cores = vec![];
    let mut per_entry_us = vec![];
    for _ in 0..rounds {
        let (before, cpu0, started) =
            (agents[0].metric(counted).await?, cpu_seconds(agents[0].pid()), Instant::now());
        let sent = Arc::new(AtomicU64::new(0));
        let mut senders = Vec::new();
        for stream in &streams {
            let (stream, message, sent) = (stream.clone(), message.clone(), sent.clone());
            senders.push(tokio::spawn(async move {
                while started.elapsed() < slice {
                    if stream.send(message.clone()).await.is_err() {
                        break;
                    }
                    sent.fetch_add(100, Ordering::Relaxed);
                }
            }));
        }
        for sender in senders {
            sender.await?;
        }
        // Everything sent is counted before the slice is measured.
        let target = before + sent.load(Ordering::Relaxed) as f64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while agents[0].metric(counted).await? < target {
            if Instant::now() > deadline {
                return Err("the agent did not count every access-log entry within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = cpu_seconds(agents[0].pid()) - cpu0;
        rates.push((target - before) / wall);
        cores.push(cpu / wall);
        per_entry_us.push(cpu * 1e6 / (target - before));
    }
    drop(streams);
    let row = format!(
        "\n| access-log entries counted by one agent | per second | agent CPU (cores) | agent CPU per entry | cores at 50,000 entries/s |\n| --- | --- | --- | --- | --- |\n| 2 streams, 100-entry batches, 10% failures | **{:.0}** (slices {:.0}–{:.0}) | {:.2} | {:.2} µs | **{:.3}** |\n",
        median(&mut rates.clone()),
        rates.iter().copied().fold(f64::MAX, f64::min),
        rates.iter().copied().fold(0.0, f64::max),
        median(&mut cores.clone()),
        median(&mut per_entry_us.clone()),
        median(&mut per_entry_us) * 50_000.0 / 1e6,
    );
    eprint!("{row}");
    table.push_str(&row);

    // Propagation: the failure that crosses the threshold, to every agent answering OPEN.
    let connection =
        RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(redis.url()))).await?;
    let store = RedisBreakers::new(connection, PREFIX, Duration::from_secs(2));
    let mut streams = Vec::new();
    let mut channels = Vec::new();
    for agent in &agents {
        streams.push(log_stream(agent).await?);
        channels.push(agent.channel().await?);
    }
    let (mut to_reporter, mut to_all) = (vec![], vec![]);
    for trial in 0..trials {
        let id = trial_id(trial);
        let reporter = trial % AGENTS;
        // 99 calls, 49 failed: one short of minimumCalls, under the threshold.
        let calls: Vec<_> = (0..99).map(|i| entry(&id, if i < 49 { 503 } else { 200 })).collect();
        streams[reporter].send(batch(calls)).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.state(&id).await?.is_none_or(|s| s.calls < 99) {
            if Instant::now() > deadline {
                return Err(format!("{id}: 99 calls never reached Redis").into());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let started = Instant::now();
        let mut pollers = Vec::new();
        for channel in &channels {
            let mut client = RateLimitServiceClient::new(channel.clone());
            let request = rls_request(BREAKER_KEY, &id);
            pollers.push(tokio::spawn(async move {
                let deadline = started + Duration::from_secs(10);
                loop {
                    let response = client.should_rate_limit(request.clone()).await.ok()?;
                    if response.get_ref().overall_code == Code::OverLimit as i32 {
                        return Some(started.elapsed());
                    }
                    if Instant::now() > deadline {
                        return None;
                    }
                }
            }));
        }
        streams[reporter].send(batch(vec![entry(&id, 503)])).await?;
        let mut seen = Vec::new();
        for poller in pollers {
            seen.push(poller.await?.ok_or_else(|| format!("{id}: an agent never answered OPEN"))?);
        }
        to_reporter.push(seen[reporter].as_secs_f64() * 1000.0);
        to_all.push(seen.iter().max().copied().unwrap_or_default().as_secs_f64() * 1000.0);
    }
    to_reporter.sort_by(f64::total_cmp);
    to_all.sort_by(f64::total_cmp);
    let row = format!(
        "\n| crossing failure → OPEN ({trials} trials, flush interval 20 ms) | p50 | p99 | max |\n| --- | --- | --- | --- |\n| the agent that received it | {:.1} ms | {:.1} ms | {:.1} ms |\n| all {AGENTS} agents | {:.1} ms | **{:.1} ms** | {:.1} ms |\n",
        percentile(&to_reporter, 0.5),
        percentile(&to_reporter, 0.99),
        percentile(&to_reporter, 1.0),
        percentile(&to_all, 0.5),
        percentile(&to_all, 0.99),
        percentile(&to_all, 1.0),
    );
    eprint!("{row}");
    table.push_str(&row);

    let row = format!(
        "\n| agent resident memory | idle, {} breakers configured | after the run |\n| --- | --- | --- |\n| agent without breakers (same Redis, baseline) | {baseline_rss:.1} MB | {:.1} MB |\n| agent that ingested | {:.1} MB | {:.1} MB |\n| other agents (median) | {:.1} MB | {:.1} MB |\n| in-memory agent | | {:.1} MB |\n",
        trials + 1,
        rss_mb(without_breakers.pid()),
        idle_rss[0],
        rss_mb(agents[0].pid()),
        median(&mut idle_rss[1..].to_vec()),
        median(&mut agents[1..].iter().map(|a| rss_mb(a.pid())).collect::<Vec<_>>()),
        rss_mb(memory.pid()),
    );
    eprint!("{row}");
    table.push_str(&row);
    println!("\n{table}");
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(path, &table)?;
    }
    Ok(())
}
