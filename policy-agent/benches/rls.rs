//! `make bench-rls`: the rate-limit agent under load, against raw Redis in the same run.
//!
//! Starts a private `redis-server` and three real `breakwater-agent` binaries (release
//! build): one on that Redis with quota batches (the flags' defaults, plus
//! BENCH_AGENT_ARGS), one on it with `--quota-batch 1` (one script call per decision, the
//! per-request path), and one without Redis (in-memory counters: the ceiling, no round trip
//! at all). Then, for a fixed key and for 1,000 distinct keys, at 1, 16 and 64 requests in
//! flight:
//!
//! - drives each agent with a tonic `RateLimitServiceClient` (Envoy's RLS API) over N
//!   HTTP/2 connections, measuring decisions/s, p50 and p99 latency, the CPU the agent
//!   process used (from /proc), and Redis calls per decision (from the agent's metrics);
//! - runs `redis-benchmark` with the same concurrency against the same Redis, invoking the
//!   very Lua script the per-request path uses (`EVALSHA`, loaded with `SCRIPT LOAD`) with
//!   the same arguments: the baseline the agents' throughput is a ratio of.
//!
//! Then checks exactness under load, with batches and per request: 64 callers send 3 N
//! requests at a limit of N, for each algorithm, and the admitted count is compared with N.
//!
//! The four alternate in BENCH_ROUNDS (5) slices per row, so that load from elsewhere on
//! the machine hits them alike; ratios and percentiles are the medians of the slices.
//!
//! Environment: BENCH_SECONDS (load per row and path, default 3), BENCH_CONNECTIONS (HTTP/2
//! connections from the load generator, default 2 — one per Envoy worker of a 2-core pod),
//! BENCH_AGENT_ARGS (more flags for the batching agent), BENCH_OUT (also write the Markdown
//! tables there); while developing, BENCH_KEYS and BENCH_IN_FLIGHT (comma-separated) run
//! some rows only, BENCH_EXACT=0 skips the exactness table, and BENCH_AGENT_BIN runs another
//! `breakwater-agent` binary (a build with frame pointers, to profile it under this load).

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use breakwater_agent::algorithm::Limit;
use breakwater_agent::store::redis::script_sha;
use breakwater_api::agent::{DOMAIN, LIMIT_KEY, RateLimitRule};
use breakwater_api::rate_limit::{Algorithm, FailureMode};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

type BenchResult<T> = Result<T, Box<dyn std::error::Error>>;

const THROUGHPUT_RULE: &str = "bench/throughput";
const KEY_PREFIX: &str = "bwbench";

fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench-rls: skipped outside `cargo bench` (run `make bench-rls`)");
        return;
    }
    if let Err(error) =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().map(|rt| rt.block_on(bench()))
    {
        eprintln!("bench-rls: cannot start the runtime: {error}");
        std::process::exit(1);
    }
}

fn throughput_rule() -> RateLimitRule {
    RateLimitRule {
        id: THROUGHPUT_RULE.into(),
        requests: 1_000_000_000,
        period_ms: 1000,
        burst: 0,
        algorithm: Algorithm::TokenBucket,
        shadow: false,
        failure_mode: FailureMode::Open,
    }
}

fn exact_rule(algorithm: Algorithm, requests: u32) -> RateLimitRule {
    RateLimitRule {
        id: format!("bench/exact-{algorithm:?}"),
        requests,
        // TokenBucket: 24 h, so the run refills at most a token or two; windows: 1 h.
        period_ms: if algorithm == Algorithm::TokenBucket { 86_400_000 } else { 3_600_000 },
        burst: 0,
        algorithm,
        shadow: false,
        failure_mode: FailureMode::Closed,
    }
}

/// A process that is killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(26_379)
}

fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

fn start_redis(dir: &std::path::Path) -> BenchResult<(Process, u16)> {
    let port = free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start redis-server: {e}"))?;
    let process = Process(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_cli(port, &["ping"]).trim() != "PONG" {
        if Instant::now() > deadline {
            return Err("redis-server did not answer PING".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok((process, port))
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

async fn wait_ready(http_port: u16) -> BenchResult<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await {
            let _ = s.write_all(b"GET /readyz HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            if out.starts_with("HTTP/1.1 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err("the agent did not become ready within 20s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Decisions answered by the failure mode so far (deadline missed or store error).
async fn failure_mode_answers(http_port: u16) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await else { return 0 };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out.lines()
        .filter(|l| {
            l.starts_with("breakwater_agent_rate_limit_decisions_total") && l.contains("result=\"failure_")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn request(rule: &str, key: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: DOMAIN.into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry { key: LIMIT_KEY.into(), value: rule.into() },
                Entry { key: "k".into(), value: key.into() },
            ],
            ..Default::default()
        }],
        hits_addend: 1,
    }
}

struct Load {
    decisions: u64,
    admitted: u64,
    seconds: f64,
    p50_us: u32,
    p99_us: u32,
}

/// `in_flight` callers over `channels`, each sending back to back until `stop` (a
/// duration) or until `budget` requests have been sent in total, on the key "fixed" or
/// spread over `keys` keys.
async fn drive(
    channels: &[Channel],
    in_flight: usize,
    rule: &'static str,
    keys: usize,
    run_for: Option<Duration>,
    budget: Option<u64>,
) -> Load {
    let key = (keys == 1).then(|| "fixed".to_string());
    drive_with(channels, in_flight, rule, keys, key, run_for, budget).await
}

/// [`drive`], on the one key `fixed` when it is given.
async fn drive_with(
    channels: &[Channel],
    in_flight: usize,
    rule: &'static str,
    keys: usize,
    fixed: Option<String>,
    run_for: Option<Duration>,
    budget: Option<u64>,
) -> Load {
    let sent = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..in_flight {
        let mut client = RateLimitServiceClient::new(channels[caller % channels.len()].clone());
        let (sent, admitted, fixed) = (sent.clone(), admitted.clone(), fixed.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(100_000);
            let mut i = caller;
            loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if budget.is_some_and(|b| n >= b) || run_for.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                let key = fixed.clone().unwrap_or_else(|| (i % keys).to_string());
                i = i.wrapping_add(7919);
                let t = Instant::now();
                match client.should_rate_limit(request(rule, &key)).await {
                    Ok(r) => {
                        latencies.push(t.elapsed().as_micros() as u32);
                        if r.get_ref().overall_code == Code::Ok as i32 {
                            admitted.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Err(status) => {
                        eprintln!("bench-rls: RPC failed: {status}");
                        break;
                    }
                }
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.unwrap_or_default());
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0)
    };
    Load {
        decisions: all.len() as u64,
        admitted: admitted.load(Ordering::Relaxed),
        seconds,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

struct Raw {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn redis_benchmark(
    port: u16,
    in_flight: usize,
    requests: u64,
    sha: &str,
    key: &str,
    args: [i64; 3],
) -> BenchResult<Raw> {
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-c",
            &in_flight.to_string(),
            "-n",
            &requests.to_string(),
            "-r",
            "1000",
            "--csv",
        ])
        .args(["EVALSHA", sha, "1", key])
        .args(args.iter().map(|a| a.to_string()))
        .output()
        .map_err(|e| format!("cannot run redis-benchmark: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().ok_or("redis-benchmark printed nothing")?;
    let fields: Vec<f64> =
        line.split("\",\"").skip(1).map(|f| f.trim_matches('"').parse().unwrap_or(0.0)).collect();
    if fields.len() < 6 {
        return Err(format!("unexpected redis-benchmark output: {text}").into());
    }
    Ok(Raw { rps: fields[0], p50_ms: fields[3], p99_ms: fields[5] })
}

async fn bench() {
    if let Err(error) = run().await {
        eprintln!("bench-rls failed: {error}");
        std::process::exit(1);
    }
}

/// One agent process and the connections the load generator drives it over.
struct Agent {
    /// What the table calls it.
    path: &'static str,
    process: Process,
    http_port: u16,
    channels: Vec<Channel>,
}

impl Agent {
    async fn start(
        path: &'static str,
        config: &std::path::Path,
        redis_port: Option<u16>,
        args: &[String],
        connections: usize,
    ) -> BenchResult<Agent> {
        let (grpc_port, http_port, lease_port) = (free_port(), free_port(), free_port());
        let binary = std::env::var("BENCH_AGENT_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_breakwater-agent").to_string());
        let mut command = Command::new(binary);
        command
            .arg("--config")
            .arg(config)
            .args([
                "--grpc-addr",
                &format!("127.0.0.1:{grpc_port}"),
                "--http-addr",
                &format!("127.0.0.1:{http_port}"),
                "--lease-addr",
                &format!("127.0.0.1:{lease_port}"),
            ])
            // Named here: the agent needs a pod name, and a shell may not export HOSTNAME.
            .args(["--pod-name", &format!("bench-rls-{}", path.replace(' ', "-"))])
            .args(["--key-prefix", KEY_PREFIX, "--log-level", "warn"])
            .args(args);
        if let Some(port) = redis_port {
            command.args(["--redis-url", &format!("redis://127.0.0.1:{port}")]);
        }
        let process = Process(command.spawn().map_err(|e| format!("cannot start breakwater-agent: {e}"))?);
        wait_ready(http_port).await?;
        let mut channels = Vec::new();
        for _ in 0..connections.max(1) {
            channels.push(
                Channel::from_shared(format!("http://127.0.0.1:{grpc_port}"))?
                    .tcp_nodelay(true)
                    .connect()
                    .await?,
            );
        }
        Ok(Agent { path, process, http_port, channels })
    }

    fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

/// Redis calls an agent made for a rule so far: batch reservations plus the decisions that
/// took the per-request script (admitted or refused by Redis, not from a batch or the cache).
async fn redis_calls(http_port: u16, rule: &str) -> u64 {
    let text = metrics(http_port).await;
    let value = |metric: &str, label: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(metric) && l.contains(&format!("rule=\"{rule}\"")) && l.contains(label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let decisions = "breakwater_agent_rate_limit_decisions_total";
    let hits = "breakwater_agent_quota_batch_hits_total";
    let per_request = value(decisions, "result=\"ok\"") + value(decisions, "result=\"over_limit\"")
        - value(hits, "outcome=\"served\"");
    value("breakwater_agent_quota_batches_total", "") + per_request
}

async fn metrics(http_port: u16) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").await;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    out
}

/// What one path did over a row's slices.
#[derive(Default)]
struct Tally {
    decisions: u64,
    seconds: f64,
    agent_cpu: f64,
    redis_cpu: f64,
    generator_cpu: f64,
    calls: u64,
    failed: u64,
    p50s: Vec<f64>,
    p99s: Vec<f64>,
    rps: Vec<f64>,
}

async fn run() -> BenchResult<()> {
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let connections: usize =
        std::env::var("BENCH_CONNECTIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let extra_args = std::env::var("BENCH_AGENT_ARGS").unwrap_or_default();
    let list = |name: &str, all: &[usize]| -> Vec<usize> {
        match std::env::var(name) {
            Ok(v) => v.split(',').filter_map(|n| n.trim().parse().ok()).collect(),
            Err(_) => all.to_vec(),
        }
    };
    let (key_counts, in_flights) = (list("BENCH_KEYS", &[1, 1000]), list("BENCH_IN_FLIGHT", &[1, 16, 64]));
    let exactness = std::env::var("BENCH_EXACT").map_or(true, |v| v != "0");
    let dir = tempfile::tempdir()?;
    let (redis, redis_port) = start_redis(dir.path())?;
    let redis_pid = redis.0.id();

    let exact_n = 20_000;
    let config = breakwater_api::agent::AgentConfig {
        rate_limits: vec![
            throughput_rule(),
            exact_rule(Algorithm::TokenBucket, exact_n),
            exact_rule(Algorithm::SlidingWindow, exact_n),
            exact_rule(Algorithm::FixedWindow, exact_n),
        ],
        ..Default::default()
    };
    let config_path = dir.path().join("agent.json");
    std::fs::write(&config_path, serde_json::to_string(&config)?)?;
    let batched_args: Vec<String> = extra_args.split_whitespace().map(String::from).collect();
    let agents = [
        Agent::start("batches", &config_path, Some(redis_port), &batched_args, connections).await?,
        Agent::start(
            "per request",
            &config_path,
            Some(redis_port),
            &["--quota-batch".into(), "1".into()],
            connections,
        )
        .await?,
        Agent::start("in memory", &config_path, None, &[], connections).await?,
    ];

    let limit = Limit::from_rule(&throughput_rule())?;
    let sha = script_sha(&limit);
    let loaded = redis_cli(redis_port, &["script", "load", breakwater_agent::algorithm::TOKEN_BUCKET_LUA]);
    if loaded.trim() != sha {
        return Err(format!("SCRIPT LOAD returned {loaded:?}, expected {sha}").into());
    }
    let script_args = limit.script_args(1);

    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let mut table = String::new();
    table.push_str(&format!(
        "`make bench-rls` — commit {commit}, {} cores, {seconds} s of load per row and path in {rounds} slices alternating between the three agents and redis-benchmark (ratios, p50, p99: medians of the slices), {connections} HTTP/2 connection(s), TokenBucket script, batching agent's extra flags: `{}`\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if extra_args.is_empty() { "(none: --quota-batch 256 --quota-horizon 1s)" } else { extra_args.as_str() }
    ));
    table.push_str("| keys | in flight | path | decisions/s | p50 | p99 | p99 ÷ Little's-law mean | ÷ raw | ÷ in memory | Redis calls per decision | agent CPU per decision | Redis CPU per decision | load generator CPU per decision | failure-mode answers |\n");
    table.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for &keys in &key_counts {
        for &in_flight in &in_flights {
            // Warm up connections, scripts, caches and the batches' rate estimates.
            for agent in &agents {
                drive(
                    &agent.channels,
                    in_flight,
                    THROUGHPUT_RULE,
                    keys,
                    Some(Duration::from_millis(300)),
                    None,
                )
                .await;
            }
            let raw_key = if keys == 1 {
                "{bwraw:tb:bench/throughput:k=fixed}".to_string()
            } else {
                "{bwraw:tb:bench/throughput:k=__rand_int__}".to_string()
            };
            // The agents and raw Redis alternate in short slices, so that load from
            // elsewhere on the machine hits all alike; ratios are medians of the slices'.
            let slice = Duration::from_secs_f64(seconds / rounds as f64);
            let mut tallies: Vec<Tally> = agents.iter().map(|_| Tally::default()).collect();
            let (mut raw_requests_total, mut redis_cpu_raw) = (0u64, 0f64);
            let (mut raw_rps, mut raw_p50s, mut raw_p99s) = (vec![], vec![], vec![]);
            let (mut vs_raw, mut vs_memory): (Vec<Vec<f64>>, Vec<Vec<f64>>) =
                (agents.iter().map(|_| vec![]).collect(), agents.iter().map(|_| vec![]).collect());
            for _ in 0..rounds {
                let mut slice_rps = Vec::new();
                for (agent, tally) in agents.iter().zip(tallies.iter_mut()) {
                    let (failed0, calls0) = (
                        failure_mode_answers(agent.http_port).await,
                        redis_calls(agent.http_port, THROUGHPUT_RULE).await,
                    );
                    let (cpu0, rcpu0, gcpu0) =
                        (cpu_seconds(agent.pid()), cpu_seconds(redis_pid), cpu_seconds(std::process::id()));
                    let load =
                        drive(&agent.channels, in_flight, THROUGHPUT_RULE, keys, Some(slice), None).await;
                    let (cpu1, rcpu1, gcpu1) =
                        (cpu_seconds(agent.pid()), cpu_seconds(redis_pid), cpu_seconds(std::process::id()));
                    if load.admitted != load.decisions {
                        return Err(format!(
                            "{}: the throughput limit rejected {} decisions",
                            agent.path,
                            load.decisions - load.admitted
                        )
                        .into());
                    }
                    let rps = load.decisions as f64 / load.seconds;
                    tally.decisions += load.decisions;
                    tally.seconds += load.seconds;
                    tally.agent_cpu += cpu1 - cpu0;
                    tally.redis_cpu += rcpu1 - rcpu0;
                    tally.generator_cpu += gcpu1 - gcpu0;
                    tally.failed += failure_mode_answers(agent.http_port).await - failed0;
                    tally.calls += redis_calls(agent.http_port, THROUGHPUT_RULE).await - calls0;
                    tally.p50s.push(f64::from(load.p50_us) / 1000.0);
                    tally.p99s.push(f64::from(load.p99_us) / 1000.0);
                    tally.rps.push(rps);
                    slice_rps.push(rps);
                }
                let fastest = slice_rps.iter().copied().fold(0.0, f64::max);
                let requests = ((fastest * slice.as_secs_f64() * 1.5) as u64).clamp(5_000, 1_000_000);
                let r0 = cpu_seconds(redis_pid);
                let raw = redis_benchmark(redis_port, in_flight, requests, &sha, &raw_key, script_args)?;
                redis_cpu_raw += cpu_seconds(redis_pid) - r0;
                raw_requests_total += requests;
                raw_rps.push(raw.rps);
                raw_p50s.push(raw.p50_ms);
                raw_p99s.push(raw.p99_ms);
                let memory_rps = slice_rps[2];
                for (i, rps) in slice_rps.iter().enumerate() {
                    vs_raw[i].push(rps / raw.rps);
                    vs_memory[i].push(rps / memory_rps);
                }
            }
            for (i, (agent, tally)) in agents.iter().zip(tallies.iter_mut()).enumerate() {
                let rps = tally.decisions as f64 / tally.seconds;
                let p99 = median(&mut tally.p99s);
                // Little's law: in flight = throughput × mean time in the system.
                let little_ms = in_flight as f64 / rps * 1000.0;
                let calls = if agent.path == "in memory" {
                    "0".to_string()
                } else {
                    format!("{:.3}", tally.calls as f64 / tally.decisions as f64)
                };
                let row = format!(
                    "| {keys} | {in_flight} | {} | {rps:.0} | {:.2} ms | {p99:.2} ms | {:.1} | **{:.2}** | **{:.2}** | {calls} | {:.1} µs | {:.1} µs | {:.1} µs | {} |\n",
                    agent.path,
                    median(&mut tally.p50s),
                    p99 / little_ms,
                    median(&mut vs_raw[i]),
                    median(&mut vs_memory[i]),
                    tally.agent_cpu * 1e6 / tally.decisions as f64,
                    tally.redis_cpu * 1e6 / tally.decisions as f64,
                    tally.generator_cpu * 1e6 / tally.decisions as f64,
                    tally.failed,
                );
                eprint!("{row}");
                table.push_str(&row);
            }
            let raw_median = median(&mut raw_rps);
            let row = format!(
                "| {keys} | {in_flight} | redis-benchmark | {raw_median:.0} | {:.2} ms | {:.2} ms | {:.1} | 1 | | 1 | | {:.1} µs | | |\n",
                median(&mut raw_p50s),
                median(&mut raw_p99s),
                median(&mut raw_p99s) / (in_flight as f64 / raw_median * 1000.0),
                redis_cpu_raw * 1e6 / raw_requests_total as f64,
            );
            eprint!("{row}");
            table.push_str(&row);
        }
    }

    table.push_str(
        "\nExactness under load (64 in flight, 3 N requests at a limit of N = 20,000, one counter):\n\n",
    );
    table.push_str("| path | algorithm | sent | admitted | allowed (N + refills during the run) | over-admitted | under-admitted | failure-mode answers (Closed: rejected) |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n");
    // Each path on counters of its own: the two Redis agents share the Redis.
    for (agent, round) in agents.iter().take(if exactness { 2 } else { 0 }).zip(0u32..) {
        for algorithm in [Algorithm::TokenBucket, Algorithm::SlidingWindow, Algorithm::FixedWindow] {
            let rule: &'static str = Box::leak(exact_rule(algorithm, exact_n).id.into_boxed_str());
            if algorithm == Algorithm::FixedWindow {
                // Windows are aligned to the hour: do not straddle an edge.
                let into_hour =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() % 3600;
                if into_hour > 3600 - 90 {
                    tokio::time::sleep(Duration::from_secs(3600 - into_hour + 1)).await;
                }
            }
            let sent = 3 * u64::from(exact_n);
            let failed0 = failure_mode_answers(agent.http_port).await;
            let load = drive_key(&agent.channels, 64, rule, &format!("exact-{round}"), sent).await;
            let refills = if algorithm == Algorithm::TokenBucket {
                // One token per 86,400 s / N = 4.32 s.
                (load.seconds / 4.32).floor() as u64 + 1
            } else {
                0
            };
            let allowed = u64::from(exact_n) + refills;
            let over = load.admitted.saturating_sub(allowed);
            let under = u64::from(exact_n).saturating_sub(load.admitted);
            let failed = failure_mode_answers(agent.http_port).await - failed0;
            let row = format!(
                "| {} | {algorithm:?} | {} | {} | {} | **{over}** | {under} | {failed} |\n",
                agent.path, load.decisions, load.admitted, allowed
            );
            eprint!("{row}");
            table.push_str(&row);
            // Under-admission is possible (a call cut by the deadline may still consume in
            // Redis, a Closed rule rejects while it waits, a batch may strand hits); admitting
            // more than allowed never is.
            if over > 0 {
                return Err(format!(
                    "{} {algorithm:?}: admitted {} with a limit of {allowed}",
                    agent.path, load.admitted
                )
                .into());
            }
        }
    }
    println!("\n{table}");
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(path, &table)?;
    }
    drop(agents);
    drop(redis);
    Ok(())
}

/// 64-style exactness load on one counter `key` of `rule`: `budget` requests in total.
async fn drive_key(
    channels: &[Channel],
    in_flight: usize,
    rule: &'static str,
    key: &str,
    budget: u64,
) -> Load {
    drive_with(channels, in_flight, rule, 1, Some(key.to_string()), None, Some(budget)).await
}
