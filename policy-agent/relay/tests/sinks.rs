//! The NATS JetStream and webhook sinks, run by the relay against real PostgreSQL, Redis (the
//! lease and the facts) and a real `nats-server` (breakwater-harness), or a webhook endpoint
//! written here that fails on purpose.
//!
//! NATS: rows reach the user's stream once each, in order per aggregate, with their ids as
//! `Nats-Msg-Id`; rows published again after a crash before the commit are kept once; a
//! subject no stream captures is reported and its rows are parked. Webhook: 503 and 429 are
//! retried within the wave (with `maxAttempts: 1`, any failed attempt would park the row), a
//! 400 fails the attempt at once and the row is parked with it, a silent endpoint hits the
//! deadline.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use async_nats::jetstream::{self, message::StreamMessage, stream::Stream};
use breakwater_harness::{NatsServer, PostgresServer, RedisServer, eventually, unique_prefix};
use breakwater_relay::{plan::Row, run};
use serde_json::json;
use support::{DEADLINE, count, database, facts, insert, insert_poison, relay, relay_with_prefix, spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Waits until the outbox of `db` is empty (every row published or parked).
async fn drained(postgres: &PostgresServer, db: &str) {
    eventually("the outbox drains", DEADLINE, || async {
        let left = count(postgres, db, "SELECT count(*) FROM outbox");
        (left == 0).then_some(()).ok_or_else(|| format!("{left} rows left"))
    })
    .await;
}

/// Waits until `parked` rows are in `outbox_dlq` and none is left in the outbox; the parked
/// rows as `type attempts last_error`, one a line.
async fn parked(postgres: &PostgresServer, db: &str, parked: usize) -> String {
    eventually("the relay creates the dead-letter table", DEADLINE, || async {
        let exists = postgres.psql_in(db, "SELECT to_regclass('outbox_dlq') IS NOT NULL");
        (exists.trim() == "t").then_some(()).ok_or(exists)
    })
    .await;
    eventually("the rows are parked and the rest published", DEADLINE, || async {
        let now = count(postgres, db, "SELECT count(*) FROM outbox_dlq");
        let left = count(postgres, db, "SELECT count(*) FROM outbox");
        (now == parked && left == 0).then_some(()).ok_or_else(|| format!("parked {now}, left {left}"))
    })
    .await;
    postgres.psql_in(db, "SELECT type || ' ' || attempts || ' ' || last_error FROM outbox_dlq ORDER BY type")
}

/// The ids of the outbox rows, in the table's order.
fn ids(postgres: &PostgresServer, db: &str) -> Vec<String> {
    postgres.psql_in(db, "SELECT id FROM outbox ORDER BY created_at, id").lines().map(String::from).collect()
}

/// `T<n>` → n.
fn number(kind: &str) -> usize {
    kind.trim_start_matches('T').parse().unwrap_or(usize::MAX)
}

// --- NATS JetStream ------------------------------------------------------------------------

/// A stream capturing `subjects`, created the way a user would, before the relay runs.
async fn create_stream(nats: &NatsServer, subjects: &[&str]) -> Stream {
    let client = async_nats::connect(nats.url()).await.expect("connect to nats-server");
    jetstream::new(client)
        .create_stream(jetstream::stream::Config {
            name: "EVENTS".to_string(),
            subjects: subjects.iter().map(ToString::to_string).collect(),
            ..Default::default()
        })
        .await
        .expect("create the stream")
}

/// Everything `stream` holds, in stream order.
async fn messages(stream: &mut Stream) -> Vec<StreamMessage> {
    let state = stream.info().await.expect("stream info").state.clone();
    if state.messages == 0 {
        return Vec::new();
    }
    let mut messages = Vec::new();
    for sequence in state.first_sequence..=state.last_sequence {
        messages.push(stream.get_raw_message(sequence).await.expect("a stored message"));
    }
    messages
}

fn header(message: &StreamMessage, name: &str) -> String {
    message.headers.get(name).map(|value| value.as_str().to_string()).unwrap_or_default()
}

fn nats_sink(nats: &NatsServer, subject: &str) -> serde_json::Value {
    json!({"nats": {"url": nats.url(), "subject": subject}})
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_rows_reach_the_stream_once_in_order_per_aggregate_with_their_ids() {
    let postgres = PostgresServer::shared();
    let (redis, nats) = (RedisServer::start(), NatsServer::start());
    let mut stream = create_stream(&nats, &["events.>"]).await;
    let (db, url) = database(postgres);
    postgres.psql_in(&db, "ALTER TABLE outbox ADD COLUMN headers jsonb");
    insert(postgres, &db, 0, 200, 7);
    postgres.psql_in(&db, "UPDATE outbox SET headers = jsonb_build_object('trace', 'tr-' || type)");
    let inserted = ids(postgres, &db);
    let sink = nats_sink(&nats, "events.{aggregateType}.{type}");
    let _relay = relay("shop/nats", spec(sink, json!({})), &url, &redis).await;
    drained(postgres, &db).await;

    let messages = messages(&mut stream).await;
    let published: Vec<String> = messages.iter().map(|m| header(m, "Nats-Msg-Id")).collect();
    assert_eq!(published.len(), 200, "each row once");
    assert_eq!(
        published.iter().collect::<BTreeSet<_>>(),
        inserted.iter().collect::<BTreeSet<_>>(),
        "the rows' ids, as Nats-Msg-Id"
    );
    let mut by_aggregate: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for message in &messages {
        let kind = header(message, "Breakwater-Type");
        assert_eq!(message.subject.as_str(), format!("events.order.{kind}"));
        assert_eq!(header(message, "Breakwater-Aggregate-Type"), "order");
        assert_eq!(header(message, "trace"), format!("tr-{kind}"), "the row's own headers");
        let payload: serde_json::Value = serde_json::from_slice(&message.payload).expect("a JSON payload");
        assert_eq!(payload["n"], number(&kind));
        by_aggregate.entry(header(message, "Breakwater-Aggregate-Id")).or_default().push(number(&kind));
    }
    assert_eq!(by_aggregate.len(), 7);
    for (aggregate, order) in by_aggregate {
        assert!(order.is_sorted(), "aggregate {aggregate} out of order: {order:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_keeps_one_copy_of_rows_published_again_after_a_crash_before_the_commit() {
    let postgres = PostgresServer::shared();
    let (redis, nats) = (RedisServer::start(), NatsServer::start());
    let mut stream = create_stream(&nats, &["events.>"]).await;
    let (db, url) = database(postgres);
    insert(postgres, &db, 0, 30, 3);
    let spec = spec(nats_sink(&nats, "events.{type}"), json!({}));

    // What a relay that crashed before its commit left behind: the first wave in the stream
    // (sent twice, as a retried publish would) and every row still in the table.
    let rows: Vec<Row> = postgres
        .psql_in(
            &db,
            "SELECT id, aggregatetype, aggregateid, type, payload FROM outbox ORDER BY created_at LIMIT 3",
        )
        .lines()
        .map(|line| {
            let columns: Vec<&str> = line.split('|').collect();
            Row {
                id: columns[0].to_string(),
                aggregate_type: columns[1].to_string(),
                aggregate_id: columns[2].to_string(),
                kind: columns[3].to_string(),
                payload: columns[4].to_string(),
                headers: None,
            }
        })
        .collect();
    let wave: Vec<&Row> = rows.iter().collect();
    let sink = run::sink(&spec, &redis.url()).await.expect("the NATS sink connects");
    for _ in 0..2 {
        let results = sink.publish(&wave).await;
        assert_eq!(results, vec![Ok(()); 3], "a duplicate is acknowledged too");
    }
    assert_eq!(messages(&mut stream).await.len(), 3, "JetStream keeps one copy of each");

    let _relay = relay("shop/again", spec, &url, &redis).await;
    drained(postgres, &db).await;
    let messages = messages(&mut stream).await;
    let published: Vec<String> = messages.iter().map(|m| header(m, "Nats-Msg-Id")).collect();
    assert_eq!(published.iter().collect::<BTreeSet<_>>().len(), 30, "every row");
    assert_eq!(published.len(), 30, "and no row twice: {published:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn nats_a_subject_no_stream_captures_is_reported_and_its_rows_parked() {
    let postgres = PostgresServer::shared();
    let (redis, nats) = (RedisServer::start(), NatsServer::start());
    let mut stream = create_stream(&nats, &["events.>"]).await;
    let (db, url) = database(postgres);
    // Subjects are `<aggregatetype>.<type>`: aggregate type `lost` has no stream.
    postgres.psql_in(
        &db,
        "INSERT INTO outbox (id, aggregatetype, aggregateid, type, payload) VALUES \
         (gen_random_uuid(), 'events', 'a', 'Created', '{}'), \
         (gen_random_uuid(), 'lost', 'b', 'Created', '{}'), \
         (gen_random_uuid(), 'events', 'a', 'Shipped', '{}')",
    );
    let prefix = unique_prefix("bw");
    let delivery = json!({"maxAttempts": 2, "deadLetterTable": "outbox_dlq", "pollInterval": "50ms"});
    let spec = spec(nats_sink(&nats, "{aggregateType}.{type}"), delivery);
    let _relay = relay_with_prefix("shop/lost", spec, &url, &redis, &prefix).await;

    // The first report follows the first batch, whose `lost` row was refused.
    let facts = facts(&redis, &prefix, "shop/lost", |facts| facts.reason == "SinkRefusing").await;
    assert!(facts.message.contains("no stream captures subject lost.Created"), "{}", facts.message);

    let parked = parked(postgres, &db, 1).await;
    assert_eq!(parked.trim(), "Created 2 no stream captures subject lost.Created");
    let subjects: Vec<String> = messages(&mut stream).await.iter().map(|m| m.subject.to_string()).collect();
    assert_eq!(subjects, ["events.Created", "events.Shipped"]);
}

// --- Webhook -------------------------------------------------------------------------------

/// One call the endpoint got: its headers (names in lower case) and body.
#[derive(Clone, Debug)]
struct Call {
    headers: BTreeMap<String, String>,
    body: String,
}

impl Call {
    fn header(&self, name: &str) -> &str {
        self.headers.get(&name.to_ascii_lowercase()).map_or("", String::as_str)
    }
}

/// How the endpoint answers a call, given how many calls with its `Idempotency-Key` came
/// before: a status and a body, or never.
type Answer = Box<dyn Fn(&Call, usize) -> Option<(u16, &'static str)> + Send + Sync>;

/// A webhook endpoint on loopback: HTTP/1.1 written by hand (keep-alive, Content-Length
/// bodies: what the relay's client sends), every call kept in order.
struct Endpoint {
    url: String,
    calls: Arc<Mutex<Vec<Call>>>,
}

impl Endpoint {
    async fn start(answer: Answer) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/events", listener.local_addr().expect("address"));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let answer = Arc::new(answer);
        let kept = calls.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(serve(socket, kept.clone(), answer.clone()));
            }
        });
        Endpoint { url, calls }
    }

    fn calls(&self) -> Vec<Call> {
        self.calls.lock().expect("calls").clone()
    }

    /// The calls per `Idempotency-Key`.
    fn per_key(&self) -> BTreeMap<String, usize> {
        let mut per_key = BTreeMap::new();
        for call in self.calls() {
            *per_key.entry(call.header("Idempotency-Key").to_string()).or_default() += 1;
        }
        per_key
    }
}

async fn serve(mut socket: tokio::net::TcpStream, calls: Arc<Mutex<Vec<Call>>>, answer: Arc<Answer>) {
    let mut buffer = Vec::new();
    while let Some(call) = read_call(&mut socket, &mut buffer).await {
        let before = {
            let mut calls = calls.lock().expect("calls");
            let key = call.header("Idempotency-Key");
            let before = calls.iter().filter(|c| c.header("Idempotency-Key") == key).count();
            calls.push(call.clone());
            before
        };
        let Some((status, body)) = answer(&call, before) else {
            // Never answer: hold the connection until the client gives up on it.
            while socket.read(&mut [0; 1024]).await.is_ok_and(|n| n > 0) {}
            return;
        };
        let response = format!(
            "HTTP/1.1 {status} Test\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        if socket.write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

/// The next request on `socket` (`buffer` keeps what was read past it), or None at the end.
async fn read_call(socket: &mut tokio::net::TcpStream, buffer: &mut Vec<u8>) -> Option<Call> {
    let head_end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let mut chunk = [0; 4096];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let headers: BTreeMap<String, String> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
        .collect();
    let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
    while buffer.len() < head_end + length {
        let mut chunk = [0; 4096];
        match socket.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buffer[head_end..head_end + length]).into_owned();
    buffer.drain(..head_end + length);
    Some(Call { headers, body })
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_503_and_429_are_retried_within_the_wave_until_the_endpoint_accepts() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    // Aggregate 0: two 503s before each 200; aggregate 1: one 429; aggregate 2: 200 at once.
    let endpoint =
        Endpoint::start(Box::new(|call, before| match (call.header("Breakwater-Aggregate-Id"), before) {
            ("0", 0 | 1) => Some((503, "restarting")),
            ("1", 0) => Some((429, "slow down")),
            _ => Some((200, "")),
        }))
        .await;
    let (db, url) = database(postgres);
    postgres.psql_in(&db, "ALTER TABLE outbox ADD COLUMN headers jsonb");
    insert(postgres, &db, 0, 9, 3);
    postgres.psql_in(&db, "UPDATE outbox SET headers = jsonb_build_object('trace', 'tr-' || type)");
    let inserted = ids(postgres, &db);
    // One attempt only: a row whose attempt failed would be parked at once.
    let delivery = json!({"maxAttempts": 1, "deadLetterTable": "outbox_dlq"});
    let _relay =
        relay("shop/hook", spec(json!({"webhook": {"url": endpoint.url}}), delivery), &url, &redis).await;
    drained(postgres, &db).await;
    assert_eq!(count(postgres, &db, "SELECT count(*) FROM outbox_dlq"), 0, "no attempt failed");

    let calls = endpoint.calls();
    let per_key = endpoint.per_key();
    assert_eq!(
        per_key.keys().cloned().collect::<BTreeSet<_>>(),
        inserted.into_iter().collect(),
        "every row's id"
    );
    for call in &calls {
        let kind = call.header("Breakwater-Type");
        let aggregate = call.header("Breakwater-Aggregate-Id");
        let expected = match aggregate {
            "0" => 3,
            "1" => 2,
            _ => 1,
        };
        assert_eq!(
            per_key[call.header("Idempotency-Key")],
            expected,
            "calls for {kind} of aggregate {aggregate}"
        );
        assert_eq!(call.header("Content-Type"), "application/json");
        assert_eq!(call.header("Breakwater-Aggregate-Type"), "order");
        assert_eq!(call.header("trace"), format!("tr-{kind}"), "the row's own headers");
        let payload: serde_json::Value = serde_json::from_str(&call.body).expect("the payload");
        assert_eq!(payload["n"], number(kind));
    }
    // Each aggregate's rows were offered in order: a row only once the previous was accepted.
    for aggregate in ["0", "1", "2"] {
        let order: Vec<usize> = calls
            .iter()
            .filter(|c| c.header("Breakwater-Aggregate-Id") == aggregate)
            .map(|c| number(c.header("Breakwater-Type")))
            .collect();
        assert!(order.is_sorted(), "aggregate {aggregate}: {order:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_400_fails_the_attempt_at_once_and_the_row_is_parked_with_it() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    let endpoint = Endpoint::start(Box::new(|call, _| match call.header("Breakwater-Type") {
        "Poison" => Some((400, "{\"error\": \"missing field total\"}")),
        _ => Some((204, "")),
    }))
    .await;
    let (db, url) = database(postgres);
    insert_poison(postgres, &db);
    let delivery = json!({"maxAttempts": 3, "deadLetterTable": "outbox_dlq", "pollInterval": "50ms"});
    let _relay =
        relay("shop/bad", spec(json!({"webhook": {"url": endpoint.url}}), delivery), &url, &redis).await;
    let parked = parked(postgres, &db, 1).await;
    assert!(
        parked.starts_with(
            "Poison 3 webhook answered HTTP 400 Bad Request: {\"error\": \"missing field total\"}"
        ),
        "{parked}"
    );

    let of_a: Vec<String> = endpoint
        .calls()
        .iter()
        .filter(|call| call.header("Breakwater-Aggregate-Id") == "a")
        .map(|call| call.header("Breakwater-Type").to_string())
        .collect();
    // One call per attempt (no retry within a wave), and Shipped only once Poison is parked.
    assert_eq!(of_a, ["Created", "Poison", "Poison", "Poison", "Shipped"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn webhook_that_never_answers_hits_the_deadline() {
    let postgres = PostgresServer::shared();
    let redis = RedisServer::start();
    let endpoint = Endpoint::start(Box::new(|_, _| None)).await;
    let (db, url) = database(postgres);
    insert(postgres, &db, 0, 1, 1);
    let delivery = json!({"maxAttempts": 2, "deadLetterTable": "outbox_dlq", "pollInterval": "50ms"});
    let sink = json!({"webhook": {"url": endpoint.url, "timeout": "200ms"}});
    let _relay = relay("shop/silent", spec(sink, delivery), &url, &redis).await;
    let parked = parked(postgres, &db, 1).await;
    assert_eq!(parked.trim(), "T0 2 no answer from the webhook within 200ms (4 calls in this attempt)");
    assert_eq!(endpoint.calls().len(), 8, "each attempt: the call and 3 retries");
}
