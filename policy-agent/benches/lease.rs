//! `make bench-lease`: lease acquire+release pairs per second against raw Redis in the same
//! run, on the same `redis-server`.
//!
//! At 1, 16 and 64 concurrent clients, each client with a lease of its own (uncontended:
//! this measures the cost of a grant, not waiting for one):
//!
//! - lease: `LeaseManager::acquire` + `release` over `RedisLeases` in this process — two
//!   `EVALSHA`s of the lease scripts per pair, on the `RedisConnection`'s multiplexed connection;
//! - raw: `SET key val NX PX ttl` + `DEL key` on a `redis::aio::MultiplexedConnection` (the
//!   connection type the store uses) — a lock with no fencing token, no semaphore, no
//!   owner check on release.
//!
//! The two alternate in BENCH_ROUNDS (5) slices of BENCH_SECONDS (1) per row, so that load
//! from elsewhere on the machine hits both alike; the table shows the medians and the median
//! of the per-round ratios. BENCH_OUT also writes the Markdown table there; BENCH_STATS
//! prints Redis's `INFO commandstats` after each row (the µs each script and command cost
//! Redis's one thread, which is what bounds the lease rows under load).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use breakwater_agent::lease::{LeaseManager, RedisLeases};
use breakwater_agent::metrics::Metrics;
use breakwater_agent::store::{RedisConnection, RedisSettings, RedisTopology};
use breakwater_api::agent::LeaseRule;
use breakwater_harness::RedisServer;
use redis::aio::MultiplexedConnection;

type BenchResult<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const CLIENTS: [usize; 3] = [1, 16, 64];
const TTL: Duration = Duration::from_secs(10);
const PREFIX: &str = "bwbench";

fn main() {
    // `cargo test --all-targets` runs bench binaries too, without `--bench`: stay quick there.
    if !std::env::args().any(|a| a == "--bench") {
        println!("bench-lease: skipped outside `cargo bench` (run `make bench-lease`)");
        return;
    }
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| -> Box<dyn std::error::Error + Send + Sync> { e.into() })
        .and_then(|rt| rt.block_on(bench()));
    if let Err(error) = result {
        eprintln!("bench-lease failed: {error}");
        std::process::exit(1);
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn lease_name(client: usize) -> String {
    format!("bench-{client}")
}

/// Runs `clients` loops of `pair` for `slice`; returns pairs per second.
async fn slice<F, Fut>(clients: usize, slice: Duration, pair: F) -> BenchResult<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = BenchResult<()>> + Send,
{
    let pair = Arc::new(pair);
    let started = Instant::now();
    let until = started + slice;
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let pair = pair.clone();
            tokio::spawn(async move {
                let mut pairs = 0u64;
                while Instant::now() < until {
                    pair(client).await?;
                    pairs += 1;
                }
                BenchResult::Ok(pairs)
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

async fn bench() -> BenchResult<()> {
    let rounds: usize = env_or("BENCH_ROUNDS", 5);
    let seconds: f64 = env_or("BENCH_SECONDS", 1.0);
    let slice_len = Duration::from_secs_f64(seconds);
    let server = RedisServer::start();

    let store = RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(server.url()))).await?;
    if !store.is_up() {
        return Err("cannot connect to the benchmark redis-server".into());
    }
    let leases = RedisLeases::new(store, PREFIX, Duration::from_secs(1));
    let manager = Arc::new(LeaseManager::new(leases, "bench-pod", Arc::new(Metrics::default())));
    let rules: Vec<LeaseRule> = (0..CLIENTS[CLIENTS.len() - 1])
        .map(|i| LeaseRule {
            id: format!("bench/{}", lease_name(i)),
            name: lease_name(i),
            ttl_ms: TTL.as_millis() as u64,
            holders: 1,
        })
        .collect();
    manager.set_leases(&rules);
    let raw: MultiplexedConnection =
        redis::Client::open(server.url())?.get_multiplexed_async_connection().await?;

    let lease_pair = {
        let manager = manager.clone();
        move |client: usize| {
            let manager = manager.clone();
            async move {
                let name = lease_name(client);
                let grant = manager.acquire(&name, Duration::from_secs(1)).await?;
                manager.release(&name, &grant.holder, grant.fencing_token).await?;
                BenchResult::Ok(())
            }
        }
    };
    let raw_pair = move |client: usize| {
        let mut conn = raw.clone();
        async move {
            let key = format!("{PREFIX}:raw:{client}");
            let set: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg("holder")
                .arg("NX")
                .arg("PX")
                .arg(TTL.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if set.is_none() {
                return Err(format!("{key} was already held").into());
            }
            let _: i64 = redis::cmd("DEL").arg(&key).query_async(&mut conn).await?;
            BenchResult::Ok(())
        }
    };
    let lease_pair = Arc::new(lease_pair);
    let raw_pair = Arc::new(raw_pair);

    println!(
        "bench-lease: {rounds} alternating slices of {seconds}s per row, each client its own lease (uncontended)"
    );
    let mut table = String::from(
        "| clients | lease acquire+release pairs/s | raw SET NX PX + DEL pairs/s | ratio |\n|---:|---:|---:|---:|\n",
    );
    for clients in CLIENTS {
        let (mut lease_rates, mut raw_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let l = {
                let pair = lease_pair.clone();
                slice(clients, slice_len, move |c| pair(c)).await?
            };
            let r = {
                let pair = raw_pair.clone();
                slice(clients, slice_len, move |c| pair(c)).await?
            };
            lease_rates.push(l);
            raw_rates.push(r);
            ratios.push(l / r);
        }
        if std::env::var_os("BENCH_STATS").is_some() {
            let stats = server.cli(&["INFO", "commandstats"]);
            for line in stats.lines().filter(|l| l.starts_with("cmdstat_")) {
                println!("    {line}");
            }
            server.cli(&["CONFIG", "RESETSTAT"]);
        }
        let (lease, raw, ratio) = (median(&mut lease_rates), median(&mut raw_rates), median(&mut ratios));
        println!("  {clients:>2} clients: lease {lease:>9.0}/s  raw {raw:>9.0}/s  ratio {ratio:.2}");
        table.push_str(&format!("| {clients} | {lease:.0} | {raw:.0} | {ratio:.2} |\n"));
    }
    println!("\n{table}");
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(&path, &table)?;
    }
    Ok(())
}
