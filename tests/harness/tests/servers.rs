//! The harness's PostgreSQL and NATS servers, started for real: what the outbox-relay tests
//! rely on (data that survives a crash, JetStream on, stable ports, freezing, and no server
//! outliving the test binary).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use breakwater_harness::{NatsServer, PostgresServer};

#[test]
fn postgres_creates_and_reads_a_table() {
    let server = PostgresServer::start();
    assert!(server.url().starts_with("postgres://postgres@127.0.0.1:"), "{}", server.url());
    assert!(server.url().ends_with(&format!(":{}/breakwater", server.port)), "{}", server.url());
    server.psql("CREATE TABLE outbox (id bigserial PRIMARY KEY, body text NOT NULL)");
    server.psql("INSERT INTO outbox (body) VALUES ('first'), ('second')");
    assert_eq!(server.psql("SELECT id, body FROM outbox ORDER BY id"), "1|first\n2|second\n");
    // The settings the harness promises (docs/testing.md).
    assert_eq!(server.psql("SHOW fsync"), "off\n");
    assert_eq!(server.psql("SHOW listen_addresses"), "127.0.0.1\n");
    assert_eq!(server.psql("SELECT current_user, current_database()"), "postgres|breakwater\n");
}

#[test]
#[should_panic(expected = "psql on port")]
fn postgres_psql_fails_the_test_on_an_sql_error() {
    PostgresServer::start().psql("SELECT * FROM no_such_table");
}

#[test]
fn two_postgres_servers_run_at_once() {
    let (a, b) = (PostgresServer::start(), PostgresServer::start());
    assert_ne!(a.port, b.port);
    a.psql("CREATE TABLE only_in_a (n int)");
    assert_eq!(a.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"), "1\n");
    assert_eq!(b.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'only_in_a'"), "0\n");
}

#[test]
fn postgres_keeps_committed_data_across_kill_and_restart() {
    let mut server = PostgresServer::start();
    let port = server.port;
    server.psql("CREATE TABLE kept (n int); INSERT INTO kept SELECT generate_series(1, 1000)");
    let before = server.pids();
    server.kill();
    assert!(before.iter().all(|pid| !alive(*pid)), "processes {before:?} outlived kill()");
    server.restart();
    assert_eq!(server.port, port);
    assert_eq!(server.psql("SELECT count(*), sum(n) FROM kept"), "1000|500500\n");
    // restart() on a running server kills it first.
    server.restart();
    assert_eq!(server.psql("SELECT count(*) FROM kept"), "1000\n");
}

#[test]
fn postgres_pause_freezes_the_server_until_resume() {
    let server = PostgresServer::start();
    server.pause();
    let frozen = server.pids();
    assert!(frozen.len() > 1, "the postmaster and its background processes: {frozen:?}");
    for pid in &frozen {
        // A backend that was exiting as the server froze (a finished psql's) is left a zombie.
        assert!(
            matches!(state(*pid), Some('T' | 'Z') | None),
            "process {pid} is not stopped: {:?}",
            state(*pid)
        );
    }
    assert_eq!(state(frozen[0]), Some('T'), "the postmaster is not stopped");
    // A new connection is accepted by the kernel but never greeted.
    let out = Command::new("psql")
        .args(["-X", "-c", "SELECT 1", &server.url()])
        .env("PGCONNECT_TIMEOUT", "2")
        .output()
        .expect("run psql");
    assert!(!out.status.success(), "psql connected to a paused server");
    server.resume();
    assert_eq!(server.psql("SELECT 1"), "1\n");
}

#[test]
fn postgres_shared_is_one_server_with_databases_per_test() {
    let shared = PostgresServer::shared();
    assert!(std::ptr::eq(shared, PostgresServer::shared()));
    let url = shared.create_database("shared_test_own");
    assert_eq!(url, format!("postgres://postgres@127.0.0.1:{}/shared_test_own", shared.port));
    assert_eq!(shared.psql_in("shared_test_own", "SELECT current_database()"), "shared_test_own\n");
}

/// Run by `postgres_and_nats_die_with_the_test_binary` as a child process: starts a paused
/// PostgreSQL (the hardest case: its backends are stopped) and a NATS server, prints their
/// process ids and waits to be killed.
#[test]
#[ignore = "run as a child process by postgres_and_nats_die_with_the_test_binary"]
fn child_holds_servers_until_killed() {
    if std::env::var_os("BREAKWATER_HARNESS_CHILD").is_none() {
        return;
    }
    let postgres = PostgresServer::start();
    let nats = NatsServer::start();
    postgres.pause();
    let pids: Vec<String> = postgres.pids().iter().chain([&nats.pid()]).map(u32::to_string).collect();
    println!("pids {}", pids.join(" "));
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn postgres_and_nats_die_with_the_test_binary() {
    let mut child = Command::new(std::env::current_exe().expect("the test binary's path"))
        .args(["--exact", "child_holds_servers_until_killed", "--ignored", "--nocapture", "--test-threads=1"])
        .env("BREAKWATER_HARNESS_CHILD", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the test binary as a child");
    let stdout = child.stdout.take().expect("child stdout");
    // libtest may print `test NAME ... ` on the same line first.
    let pids = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| Some(line.split_once("pids ")?.1.to_string()))
        .expect("the child prints its servers' pids");
    let pids: Vec<u32> = pids.split_whitespace().map(|pid| pid.parse().expect("a pid")).collect();
    assert!(pids.len() > 2, "postmaster, backends and nats-server: {pids:?}");
    child.kill().expect("SIGKILL the child");
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|pid| alive(*pid)) {
        let left: Vec<_> = pids.iter().filter(|pid| alive(**pid)).map(|pid| (pid, state(*pid))).collect();
        assert!(Instant::now() < deadline, "still running 10s after the test binary was killed: {left:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nats_starts_with_jetstream() {
    let server = NatsServer::start();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port));
    let (status, body) = server.monitor("/healthz?js-enabled-only=true").expect("healthz answers");
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, jsz) = server.monitor("/jsz").expect("jsz answers");
    assert_eq!(status, 200);
    let jsz: serde_json::Value = serde_json::from_str(&jsz).expect("jsz is JSON");
    let store = jsz["config"]["store_dir"].as_str().expect("JetStream has a store dir");
    assert!(std::path::Path::new(store).is_dir(), "{store}");
    // Clients get the server's INFO line on the client port.
    let stream = std::net::TcpStream::connect(("127.0.0.1", server.port)).expect("connect to nats");
    stream.set_read_timeout(Some(Duration::from_secs(2))).expect("read timeout");
    let mut info = String::new();
    BufReader::new(stream).read_line(&mut info).expect("INFO line");
    assert!(info.starts_with("INFO ") && info.contains(r#""jetstream":true"#), "{info}");
}

#[test]
fn nats_restart_keeps_the_ports_and_the_streams() {
    let mut server = NatsServer::start();
    let (port, monitor_port, url) = (server.port, server.monitor_port, server.url());
    let config = r#"{"name":"OUTBOX","subjects":["outbox.>"],"storage":"file"}"#;
    let created = nats_exchange(port, &format!("$JS.API.STREAM.CREATE.OUTBOX {config}"), r#""config""#);
    assert!(!created.contains(r#""error""#), "stream create: {created}");
    nats_exchange(port, "outbox.created {\"id\":1}", r#""seq":1"#);
    server.kill();
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} open after kill()");
    server.restart();
    assert_eq!((server.port, server.monitor_port, server.url()), (port, monitor_port, url));
    let (_, jsz) = server.monitor("/jsz").expect("jsz answers");
    let jsz: serde_json::Value = serde_json::from_str(&jsz).expect("jsz is JSON");
    assert_eq!((jsz["streams"].as_u64(), jsz["messages"].as_u64()), (Some(1), Some(1)), "{jsz}");
}

#[test]
fn nats_pause_freezes_the_server_until_resume() {
    let server = NatsServer::start();
    server.pause();
    assert_eq!(server.monitor("/healthz"), None, "a paused server answered");
    server.resume();
    assert_eq!(server.monitor("/healthz").map(|(status, _)| status), Some(200));
}

/// Publishes `SUBJECT PAYLOAD` over the raw client protocol with a reply subject, and
/// returns what came back once it holds `expect` (JetStream answers on the reply subject:
/// API responses, publish acks). Fails the test with what came back after 5 s.
fn nats_exchange(port: u16, message: &str, expect: &str) -> String {
    use std::io::{Read, Write};
    let (subject, payload) = message.split_once(' ').expect("SUBJECT PAYLOAD");
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to nats");
    stream.set_read_timeout(Some(Duration::from_millis(200))).expect("read timeout");
    let request = format!(
        "CONNECT {{\"verbose\":false}}\r\nSUB _INBOX.test 1\r\nPUB {subject} _INBOX.test {}\r\n{payload}\r\n",
        payload.len()
    );
    stream.write_all(request.as_bytes()).expect("write to nats");
    let (deadline, mut received) = (Instant::now() + Duration::from_secs(5), String::new());
    while !received.contains(expect) {
        assert!(Instant::now() < deadline, "no {expect} from nats for {message}; received: {received}");
        let mut buf = [0u8; 4096];
        if let Ok(n) = stream.read(&mut buf) {
            received.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    received
}

/// The process state letter (`S`, `T` stopped, `Z` zombie, …) of `pid`, if it exists.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

fn alive(pid: u32) -> bool {
    state(pid).is_some_and(|state| state != 'Z')
}
