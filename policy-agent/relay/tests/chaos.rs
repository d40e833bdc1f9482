//! Chaos: two `breakwater-relay` processes (the real binary) relay one outbox to a Redis
//! stream while a writer inserts rows, and the test SIGKILLs and restarts them at random
//! moments, over and over, and now and then freezes the active one (SIGSTOP) for three lease
//! TTLs, so the other takes over, and thaws it. Afterwards: every inserted row was published
//! at least once (none lost), every duplicate carries the id of its row, and each aggregate's
//! rows, duplicates dropped (first sighting kept), are in the order they were inserted.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use breakwater_harness::{Daemon, PostgresServer, RedisServer, eventually, free_port, unique_prefix};

// The shared database setup; the rest of the module serves the other suites.
#[allow(dead_code)]
mod support;

const AGGREGATES: usize = 20;
const CHUNK: usize = 60;
/// The writer runs until the relays were killed this many times.
const KILLS: usize = 30;
const LEASE_TTL: &str = "1s";

fn spec() -> String {
    serde_json::json!({
        "source": {"postgres": {"connectionSecretRef": {"name": "db", "key": "url"}, "table": "outbox"}},
        "sink": {"redisStream": {"stream": "chaos"}},
        "delivery": {"batchSize": 100, "pollInterval": "20ms"},
    })
    .to_string()
}

struct Relays {
    processes: Vec<Daemon>,
    _dir: tempfile::TempDir,
}

impl Relays {
    fn start(postgres_url: &str, redis_url: &str, prefix: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let url_file = dir.path().join("url");
        std::fs::write(&url_file, postgres_url).expect("write the URL file");
        let processes = (0..2)
            .map(|n| {
                let name = format!("relay-{n}");
                let args = vec![
                    "run".to_string(),
                    "--relay=shop/chaos".to_string(),
                    format!("--spec={}", spec()),
                    format!("--postgres-url-file={}", url_file.display()),
                    format!("--redis-url={redis_url}"),
                    format!("--key-prefix={prefix}"),
                    format!("--holder={name}"),
                    format!("--lease-ttl={LEASE_TTL}"),
                    format!("--http-addr=127.0.0.1:{}", free_port()),
                ];
                let log = dir.path().join(format!("{name}.log"));
                Daemon::spawn_with_env(
                    &name,
                    env!("CARGO_BIN_EXE_breakwater-relay"),
                    &args,
                    &[("RUST_LOG", "info")],
                    log,
                )
            })
            .collect();
        Relays { processes, _dir: dir }
    }
}

/// Inserts rows until `stop`, row `i` in aggregate `i % AGGREGATES`, type `T<i>`, in
/// transactions of `CHUNK` rows, faster than one relay can drain them at times, so the relays
/// are mid-batch most of the time they are killed; the number inserted.
async fn write(url: String, stop: Arc<AtomicBool>) -> usize {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        client
            .batch_execute(&format!(
                "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) \
                 SELECT gen_random_uuid(), 'order', (i % {AGGREGATES})::text, 'T' || i, '{{}}' \
                 FROM generate_series({next}, {}) AS i ORDER BY i",
                next + CHUNK - 1
            ))
            .await
            .expect("insert");
        next += CHUNK;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    next
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_and_frozen_relays_lose_nothing_and_keep_each_aggregates_order() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    let (db, url) = support::database(postgres);
    let mut relays = Relays::start(&url, &redis.url(), &unique_prefix("bw"));
    let stop_writing = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write(url.clone(), stop_writing.clone()));

    let (mut kills, mut freezes) = (0, 0);
    let started = Instant::now();
    while kills < KILLS && started.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(30..250))).await;
        let victim = fastrand::usize(..relays.processes.len());
        if fastrand::u8(..8) == 0 {
            // Freeze one for three TTLs: the other takes the lease; thawed, it must not commit.
            relays.processes[victim].signal("STOP");
            tokio::time::sleep(Duration::from_secs(3)).await;
            relays.processes[victim].signal("CONT");
            freezes += 1;
        } else {
            relays.processes[victim].kill();
            relays.processes[victim].restart();
            kills += 1;
        }
    }
    stop_writing.store(true, Ordering::Relaxed);
    let rows = writer.await.expect("the writer finishes");
    eventually("the outbox drains", Duration::from_secs(60), || async {
        let left = postgres.psql_in(&db, "SELECT count(*) FROM outbox");
        (left.trim() == "0").then_some(()).ok_or_else(|| {
            let logs: Vec<String> = relays.processes.iter().map(Daemon::report).collect();
            format!("{} rows left\n{}", left.trim(), logs.join("\n"))
        })
    })
    .await;

    let client = redis::Client::open(redis.url()).expect("redis url");
    let mut connection = client.get_connection().expect("redis connection");
    let entries: Vec<(String, BTreeMap<String, String>)> =
        redis::cmd("XRANGE").arg("chaos").arg("-").arg("+").query(&mut connection).expect("XRANGE");
    let mut first_seen: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut ids_of_type: BTreeMap<String, String> = BTreeMap::new();
    let mut seen = BTreeSet::new();
    let mut duplicates = 0;
    for (_, fields) in &entries {
        let (id, kind) = (fields["id"].clone(), fields["type"].clone());
        // A duplicate is the same row again: same id for the same type.
        if let Some(earlier) = ids_of_type.insert(kind.clone(), id.clone()) {
            assert_eq!(earlier, id, "{kind} published under two ids");
        }
        if !seen.insert(id) {
            duplicates += 1;
            continue;
        }
        let n: usize = kind.trim_start_matches('T').parse().expect("T<n>");
        first_seen.entry(fields["aggregateid"].clone()).or_default().push(n);
    }
    let published: usize = first_seen.values().map(Vec::len).sum();
    eprintln!(
        "chaos: {rows} rows inserted, {} messages, {published} distinct rows, {duplicates} duplicates, {} lost; \
         {kills} kills, {freezes} freezes",
        entries.len(),
        rows - published
    );
    assert_eq!(published, rows, "every row published");
    for (aggregate, order) in &first_seen {
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(order, &sorted, "aggregate {aggregate} out of order");
    }
    assert!(kills > 0, "the test killed no relay: it proved nothing");
}
