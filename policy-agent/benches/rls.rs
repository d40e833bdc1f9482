//! `make bench-rls`: the rate-limit agent under load, against raw Redis in the same run.
//!
//! Starts a private `redis-server` and the real `breakwater-agent` binary (release build),
//! then, for a fixed key and for 1,000 distinct keys, at 1, 16 and 64 requests in flight:
//!
//! - drives the agent with a tonic `RateLimitServiceClient` (Envoy's RLS API) over N
//!   HTTP/2 connections, measuring decisions/s, p50 and p99 latency, and the CPU the agent
//!   process used (from /proc);
//! - runs `redis-benchmark` with the same concurrency against the same Redis, invoking the
//!   very Lua script the agent uses (`EVALSHA`, loaded with `SCRIPT LOAD`) with the same
//!   arguments: the baseline the agent's throughput is a ratio of.
//!
//! Then checks exactness under load: 64 callers send 3 N requests at a limit of N, for
//! each algorithm, and the admitted count is compared with N.
//!
//! Agent and `redis-benchmark` alternate in BENCH_ROUNDS (5) slices per row, so that load
//! from elsewhere on the machine hits both alike; ratios and percentiles are the medians of
//! the slices.
//!
//! Environment: BENCH_SECONDS (agent load per row, default 3), BENCH_CONNECTIONS (HTTP/2
//! connections from the load generator, default 2 — one per Envoy worker of a 2-core pod),
//! BENCH_OUT (also write the Markdown table there).

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
/// duration) or until `budget` requests have been sent in total.
async fn drive(
    channels: &[Channel],
    in_flight: usize,
    rule: &'static str,
    keys: usize,
    run_for: Option<Duration>,
    budget: Option<u64>,
) -> Load {
    let sent = Arc::new(AtomicU64::new(0));
    let admitted = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for caller in 0..in_flight {
        let mut client = RateLimitServiceClient::new(channels[caller % channels.len()].clone());
        let (sent, admitted) = (sent.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies: Vec<u32> = Vec::with_capacity(100_000);
            let mut i = caller;
            loop {
                let n = sent.fetch_add(1, Ordering::Relaxed);
                if budget.is_some_and(|b| n >= b) || run_for.is_some_and(|d| started.elapsed() >= d) {
                    break;
                }
                let key = if keys == 1 { "fixed".to_string() } else { (i % keys).to_string() };
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

async fn run() -> BenchResult<()> {
    let rounds: usize = std::env::var("BENCH_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(5).max(1);
    let seconds: f64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    let connections: usize =
        std::env::var("BENCH_CONNECTIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(2);
    let extra_args = std::env::var("BENCH_AGENT_ARGS").unwrap_or_default();
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
    let (grpc_port, http_port) = (free_port(), free_port());
    let agent = Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
        .arg("--config")
        .arg(&config_path)
        .args(["--redis-url", &format!("redis://127.0.0.1:{redis_port}")])
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc_port}"),
            "--http-addr",
            &format!("127.0.0.1:{http_port}"),
        ])
        .args(["--key-prefix", KEY_PREFIX, "--log-level", "warn"])
        .args(extra_args.split_whitespace())
        .spawn()
        .map_err(|e| format!("cannot start breakwater-agent: {e}"))?;
    let agent = Process(agent);
    let agent_pid = agent.0.id();
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
        "`make bench-rls` — commit {commit}, {} cores, {seconds} s of agent load per row in {rounds} slices alternating with redis-benchmark (ratio, p50, p99: medians of the slices), {connections} HTTP/2 connection(s), TokenBucket script, agent flags: `{}`\n\n",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if extra_args.is_empty() { "(defaults)" } else { extra_args.as_str() }
    ));
    table.push_str("| keys | in flight | agent decisions/s | agent p50 | agent p99 | redis-benchmark EVALSHA/s | raw p50 | raw p99 | agent / raw | agent CPU (cores) | agent CPU per decision | Redis CPU per decision (agent / raw) | load generator CPU per decision | failure-mode answers |\n");
    table.push_str("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for keys in [1usize, 1000] {
        for in_flight in [1usize, 16, 64] {
            // Warm up connections, scripts and caches.
            drive(&channels, in_flight, THROUGHPUT_RULE, keys, Some(Duration::from_millis(300)), None).await;
            let raw_key = if keys == 1 {
                "{bwraw:tb:bench/throughput:k=fixed}".to_string()
            } else {
                "{bwraw:tb:bench/throughput:k=__rand_int__}".to_string()
            };
            // Agent and raw Redis alternate in short slices, so that load from elsewhere on
            // the machine hits both alike; the ratio is the median of the slices' ratios.
            let slice = Duration::from_secs_f64(seconds / rounds as f64);
            let failed0 = failure_mode_answers(http_port).await;
            let (mut decisions, mut agent_seconds, mut agent_cpu, mut redis_cpu_agent, mut generator_cpu) =
                (0u64, 0f64, 0f64, 0f64, 0f64);
            let (mut raw_requests_total, mut redis_cpu_raw) = (0u64, 0f64);
            let (mut ratios, mut p50s, mut p99s, mut raw_rps, mut raw_p50s, mut raw_p99s) =
                (vec![], vec![], vec![], vec![], vec![], vec![]);
            for _ in 0..rounds {
                let (cpu0, rcpu0, gcpu0) =
                    (cpu_seconds(agent_pid), cpu_seconds(redis_pid), cpu_seconds(std::process::id()));
                let load = drive(&channels, in_flight, THROUGHPUT_RULE, keys, Some(slice), None).await;
                let (cpu1, rcpu1, gcpu1) =
                    (cpu_seconds(agent_pid), cpu_seconds(redis_pid), cpu_seconds(std::process::id()));
                if load.admitted != load.decisions {
                    return Err(format!(
                        "the throughput limit rejected {} decisions",
                        load.decisions - load.admitted
                    )
                    .into());
                }
                let rps = load.decisions as f64 / load.seconds;
                decisions += load.decisions;
                agent_seconds += load.seconds;
                agent_cpu += cpu1 - cpu0;
                redis_cpu_agent += rcpu1 - rcpu0;
                generator_cpu += gcpu1 - gcpu0;
                p50s.push(f64::from(load.p50_us) / 1000.0);
                p99s.push(f64::from(load.p99_us) / 1000.0);

                let requests = ((rps * slice.as_secs_f64() * 1.5) as u64).clamp(5_000, 1_000_000);
                let r0 = cpu_seconds(redis_pid);
                let raw = redis_benchmark(redis_port, in_flight, requests, &sha, &raw_key, script_args)?;
                redis_cpu_raw += cpu_seconds(redis_pid) - r0;
                raw_requests_total += requests;
                ratios.push(rps / raw.rps);
                raw_rps.push(raw.rps);
                raw_p50s.push(raw.p50_ms);
                raw_p99s.push(raw.p99_ms);
            }
            let failed = failure_mode_answers(http_port).await - failed0;
            let row = format!(
                "| {keys} | {in_flight} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms | **{:.2}** | {:.2} | {:.1} µs | {:.1} µs / {:.1} µs | {:.1} µs | {failed} |\n",
                decisions as f64 / agent_seconds,
                median(&mut p50s),
                median(&mut p99s),
                median(&mut raw_rps),
                median(&mut raw_p50s),
                median(&mut raw_p99s),
                median(&mut ratios),
                agent_cpu / agent_seconds,
                agent_cpu * 1e6 / decisions as f64,
                redis_cpu_agent * 1e6 / decisions as f64,
                redis_cpu_raw * 1e6 / raw_requests_total as f64,
                generator_cpu * 1e6 / decisions as f64,
            );
            eprint!("{row}");
            table.push_str(&row);
        }
    }

    table.push_str(
        "\nExactness under load (64 in flight, 3 N requests at a limit of N = 20,000, one counter):\n\n",
    );
    table.push_str("| algorithm | sent | admitted | allowed (N + refills during the run) | over-admitted | failure-mode answers (Closed: rejected) |\n| --- | --- | --- | --- | --- | --- |\n");
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
        let failed0 = failure_mode_answers(http_port).await;
        let load = drive(&channels, 64, rule, 1, None, Some(sent)).await;
        let refills = if algorithm == Algorithm::TokenBucket {
            // One token per 86,400 s / N = 4.32 s.
            (load.seconds / 4.32).floor() as u64 + 1
        } else {
            0
        };
        let allowed = u64::from(exact_n) + refills;
        let over = load.admitted.saturating_sub(allowed);
        let failed = failure_mode_answers(http_port).await - failed0;
        let row = format!(
            "| {algorithm:?} | {} | {} | {} | **{over}** | {failed} |\n",
            load.decisions, load.admitted, allowed
        );
        eprint!("{row}");
        table.push_str(&row);
        // Under-admission is possible (a call cut by the deadline may still consume in Redis,
        // and a Closed rule rejects while it waits); admitting more than allowed never is.
        if over > 0 {
            return Err(format!("{algorithm:?}: admitted {} with a limit of {allowed}", load.admitted).into());
        }
    }
    println!("\n{table}");
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(path, &table)?;
    }
    drop(agent);
    drop(redis);
    Ok(())
}
