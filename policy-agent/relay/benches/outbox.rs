//! `make bench-outbox`: the relay (its release binary, as a pod runs it) against real
//! PostgreSQL and a real Redis, each figure beside a baseline measured in the same run — a
//! plain loop doing the same SQL and the same `XADD`s with none of the guarantees (no
//! transaction, no fence, no per-aggregate waves, no attempts).
//!
//! - throughput: a backlog of `BACKLOG` rows (100 aggregates) drained, rows/s;
//! - lag at a fixed offered load of 2,000 rows/s for 10 s: from the row's insertion
//!   (`clock_timestamp()` in its payload) to a consumer reading it from the stream, p50/p99;
//! - memory: the relay's peak RSS (VmHWM) while draining `BACKLOG` and `BIG_BACKLOG` rows —
//!   equal peaks mean memory does not grow with the backlog.
//!
//! Each measurement runs `ROUNDS` times; medians and min–max are printed.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use breakwater_harness::{Daemon, NatsServer, PostgresServer, RedisServer, free_port};

const BACKLOG: usize = 100_000;
const BIG_BACKLOG: usize = 1_000_000;
const BATCH: usize = 500;
const ROUNDS: usize = 3;
const LAG_RATE: usize = 2_000;
const LAG_SECONDS: u64 = 10;

const OUTBOX: &str = "CREATE TABLE outbox (id uuid PRIMARY KEY, aggregatetype text NOT NULL, \
    aggregateid text NOT NULL, type text NOT NULL, payload jsonb NOT NULL, \
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()); \
    CREATE INDEX outbox_order ON outbox (created_at, id)";

fn spec(stream: &str, poll: &str) -> String {
    with_sink(serde_json::json!({"redisStream": {"stream": stream}}), poll)
}

fn with_sink(sink: serde_json::Value, poll: &str) -> String {
    serde_json::json!({
        "source": {"postgres": {"connectionSecretRef": {"name": "db", "key": "url"}, "table": "outbox"}},
        "sink": sink,
        "delivery": {"batchSize": BATCH, "pollInterval": poll},
    })
    .to_string()
}

fn fresh_database(postgres: &PostgresServer, name: &str) -> String {
    let url = postgres.create_database(name);
    postgres.psql_in(name, OUTBOX);
    url
}

fn fill(postgres: &PostgresServer, db: &str, rows: usize) {
    postgres.psql_in(
        db,
        &format!(
            "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
             SELECT gen_random_uuid(), 'order', (i % 100)::text, 'Created', jsonb_build_object('n', i) \
             FROM generate_series(1, {rows}) AS i; ANALYZE outbox"
        ),
    );
}

fn pending(postgres: &PostgresServer, db: &str) -> usize {
    postgres.psql_in(db, "SELECT count(*) FROM outbox").trim().parse().unwrap_or(usize::MAX)
}

/// The relay binary on `db` (its own relay name, so it never waits for the lease of the
/// relay killed before it); the daemon and its temp dir.
fn relay(postgres_url: &str, redis: &RedisServer, spec: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let url_file = dir.path().join("url");
    std::fs::write(&url_file, postgres_url).expect("url file");
    let args = vec![
        "run".to_string(),
        format!("--relay=bench/{}", breakwater_harness::unique_prefix("outbox")),
        format!("--spec={spec}"),
        format!("--postgres-url-file={}", url_file.display()),
        format!("--redis-url={}", redis.url()),
        format!("--http-addr=127.0.0.1:{}", free_port()),
        "--log-level=warn".to_string(),
    ];
    let daemon =
        Daemon::spawn("relay", env!("CARGO_BIN_EXE_breakwater-relay"), &args, dir.path().join("relay.log"));
    (daemon, dir)
}

/// Peak resident memory of `pid` so far, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn wait_drained(postgres: &PostgresServer, db: &str, within: Duration) -> Duration {
    let started = Instant::now();
    while pending(postgres, db) > 0 {
        assert!(started.elapsed() < within, "not drained within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// The baseline: read, XADD, delete, in a loop, no transaction or guarantee.
async fn baseline(postgres_url: &str, redis: &RedisServer, stream: &str) -> Duration {
    let (client, connection) =
        tokio_postgres::connect(postgres_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let mut redis = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let started = Instant::now();
    loop {
        let rows = client
            .query(
                "SELECT id::text, aggregatetype, aggregateid, type, payload::text FROM outbox ORDER BY created_at, id LIMIT $1",
                &[&(BATCH as i64)],
            )
            .await
            .expect("select");
        if rows.is_empty() {
            return started.elapsed();
        }
        let mut pipe = redis::pipe();
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.get(0);
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("id")
                .arg(&id)
                .arg("aggregatetype")
                .arg(row.get::<_, String>(1))
                .arg("aggregateid")
                .arg(row.get::<_, String>(2))
                .arg("type")
                .arg(row.get::<_, String>(3))
                .arg("payload")
                .arg(row.get::<_, String>(4));
            ids.push(id);
        }
        let _: Vec<redis::Value> = pipe.query_async(&mut redis).await.expect("XADD");
        client
            .execute("DELETE FROM outbox WHERE id = ANY($1::text[]::uuid[])", &[&ids])
            .await
            .expect("delete");
    }
}

/// The NATS baseline: read, publish each row and await its ack (concurrently per batch, as
/// the relay's waves are), delete; no transaction or guarantee.
async fn nats_baseline(postgres_url: &str, nats: &NatsServer, subject: &str) -> Duration {
    let (client, connection) =
        tokio_postgres::connect(postgres_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    let started = Instant::now();
    loop {
        let rows = client
            .query(
                "SELECT id::text, payload::text FROM outbox ORDER BY created_at, id LIMIT $1",
                &[&(BATCH as i64)],
            )
            .await
            .expect("select");
        if rows.is_empty() {
            return started.elapsed();
        }
        let mut acks = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let (id, payload): (String, String) = (row.get(0), row.get(1));
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", id.as_str());
            acks.push(
                jetstream
                    .publish_with_headers(subject.to_string(), headers, payload.into())
                    .await
                    .expect("publish"),
            );
            ids.push(id);
        }
        for ack in acks {
            ack.await.expect("ack");
        }
        client
            .execute("DELETE FROM outbox WHERE id = ANY($1::text[]::uuid[])", &[&ids])
            .await
            .expect("delete");
    }
}

/// Offers `LAG_RATE` rows/s for `LAG_SECONDS` and reads `stream`; the lags in ms, sorted.
async fn lag(postgres_url: &str, redis: &RedisServer, stream: &str) -> Vec<f64> {
    let (client, connection) =
        tokio_postgres::connect(postgres_url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let total = LAG_RATE * LAG_SECONDS as usize;
    let per_tick = LAG_RATE / 100;
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for start in (0..total).step_by(per_tick) {
            tick.tick().await;
            client
                .batch_execute(&format!(
                    "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                     SELECT gen_random_uuid(), 'order', (i % 100)::text, 'Created', \
                     jsonb_build_object('t', (extract(epoch from clock_timestamp()) * 1000)::float8) \
                     FROM generate_series({start}, {}) AS i",
                    start + per_tick - 1
                ))
                .await
                .expect("insert");
        }
    });
    let mut redis = redis::Client::open(redis.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let mut lags = Vec::with_capacity(total);
    let mut last = "0".to_string();
    while lags.len() < total {
        // [[stream, [[id, {field: value}], …]]], or nil when BLOCK times out.
        type Reply = Option<Vec<(String, Vec<(String, BTreeMap<String, String>)>)>>;
        let reply: Reply = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1000)
            // Shorter than the connection's response timeout (an XREAD that blocks longer is
            // reported as timed out).
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(stream)
            .arg(&last)
            .query_async(&mut redis)
            .await
            .expect("XREAD");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        for (_, entries) in reply.unwrap_or_default() {
            for (id, fields) in entries {
                last = id;
                let payload = fields.get("payload").cloned().unwrap_or_default();
                let value: serde_json::Value = serde_json::from_str(&payload).unwrap_or_default();
                if let Some(t) = value["t"].as_f64() {
                    lags.push(now - t);
                }
            }
        }
    }
    writer.await.expect("writer");
    lags.sort_by(f64::total_cmp);
    lags
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "median {:.2} (min {:.2}, max {:.2})",
        values[values.len() / 2],
        values[0],
        values[values.len() - 1]
    )
}

#[tokio::main]
async fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "make bench-outbox at {commit}: batchSize {BATCH}, {ROUNDS} rounds; PostgreSQL and Redis on this machine"
    );
    let postgres = PostgresServer::start();
    let redis = RedisServer::start();
    let nats = NatsServer::start();
    let jetstream = async_nats::jetstream::new(async_nats::connect(nats.url()).await.expect("nats"));
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: "BENCH".to_string(),
            subjects: vec!["bench.>".to_string()],
            ..Default::default()
        })
        .await
        .expect("a JetStream stream");
    let mut figures: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for round in 0..ROUNDS {
        // Throughput: the relay, then the baseline, on the same backlog.
        let db = format!("relay_{round}");
        let url = fresh_database(&postgres, &db);
        fill(&postgres, &db, BACKLOG);
        let (mut daemon, _dir) = relay(&url, &redis, &spec(&format!("relay-{round}"), "20ms"));
        let took = wait_drained(&postgres, &db, Duration::from_secs(300));
        let rss = peak_rss_mb(daemon.pid());
        daemon.kill();
        let relay_rate = BACKLOG as f64 / took.as_secs_f64();
        let db = format!("base_{round}");
        let base_url = fresh_database(&postgres, &db);
        fill(&postgres, &db, BACKLOG);
        let base_rate =
            BACKLOG as f64 / baseline(&base_url, &redis, &format!("base-{round}")).await.as_secs_f64();
        println!(
            "round {round}: relay {relay_rate:.0} rows/s, baseline {base_rate:.0} rows/s, relay/baseline {:.2}, relay peak RSS {rss:.1} MB",
            relay_rate / base_rate
        );
        figures.entry("relay rows/s").or_default().push(relay_rate);
        figures.entry("baseline rows/s").or_default().push(base_rate);
        figures.entry("relay/baseline").or_default().push(relay_rate / base_rate);
        figures.entry("peak RSS MB, 100k backlog").or_default().push(rss);

        // NATS JetStream: the relay, then the baseline.
        let db = format!("nats_{round}");
        let url = fresh_database(&postgres, &db);
        fill(&postgres, &db, BACKLOG);
        let sink = serde_json::json!({"nats": {"url": nats.url(), "subject": format!("bench.relay{round}")}});
        let (mut daemon, _dir) = relay(&url, &redis, &with_sink(sink, "20ms"));
        let took = wait_drained(&postgres, &db, Duration::from_secs(600));
        daemon.kill();
        let relay_rate = BACKLOG as f64 / took.as_secs_f64();
        let db = format!("nats_base_{round}");
        let base_url = fresh_database(&postgres, &db);
        fill(&postgres, &db, BACKLOG);
        let base_rate = BACKLOG as f64
            / nats_baseline(&base_url, &nats, &format!("bench.base{round}")).await.as_secs_f64();
        println!(
            "round {round}: NATS relay {relay_rate:.0} rows/s, baseline {base_rate:.0} rows/s, relay/baseline {:.2}",
            relay_rate / base_rate
        );
        figures.entry("NATS relay rows/s").or_default().push(relay_rate);
        figures.entry("NATS baseline rows/s").or_default().push(base_rate);
        figures.entry("NATS relay/baseline").or_default().push(relay_rate / base_rate);

        // Lag at 2,000 rows/s, pollInterval 20 ms.
        let db = format!("lag_{round}");
        let url = fresh_database(&postgres, &db);
        let stream = format!("lag-{round}");
        let (mut daemon, _dir) = relay(&url, &redis, &spec(&stream, "20ms"));
        let lags = lag(&url, &redis, &stream).await;
        daemon.kill();
        let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
        println!(
            "round {round}: lag at {LAG_RATE} rows/s: p50 {p50:.1} ms, p99 {p99:.1} ms ({} rows)",
            lags.len()
        );
        figures.entry("lag p50 ms").or_default().push(p50);
        figures.entry("lag p99 ms").or_default().push(p99);
    }
    // Memory does not grow with the backlog: drain a million rows once.
    let db = "big";
    let url = fresh_database(&postgres, db);
    fill(&postgres, db, BIG_BACKLOG);
    let (mut daemon, _dir) = relay(&url, &redis, &spec("big", "20ms"));
    let took = wait_drained(&postgres, db, Duration::from_secs(1800));
    let rss = peak_rss_mb(daemon.pid());
    daemon.kill();
    println!(
        "1,000,000-row backlog: drained in {:.1} s ({:.0} rows/s), relay peak RSS {rss:.1} MB",
        took.as_secs_f64(),
        BIG_BACKLOG as f64 / took.as_secs_f64()
    );
    println!("--- medians of {ROUNDS} rounds (min, max)");
    for (name, values) in &mut figures {
        println!("{name}: {}", summary(values));
    }
}
