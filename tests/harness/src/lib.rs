//! Test harness shared by the workspace's tests: real `redis-server` processes (standalone
//! or a three-master Cluster) on free ports. A test that cannot start Redis fails with the
//! reason; it never skips.
//!
//! Each server runs under a small shell that kills it when the test process's end of its
//! stdin pipe closes, so servers shared by a whole test binary (in statics, never dropped)
//! do not outlive it. Servers keep nothing on disk (`--save "" --appendonly no`), so a
//! [`RedisServer::restart`] comes back empty, as a Redis without persistence does.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const REDIS_SERVER: &str = "redis-server";
pub const REDIS_CLI: &str = "redis-cli";

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port p such that p and p + 10000 (the cluster bus) are free right now.
pub fn free_port() -> u16 {
    let base = 20_000 + (std::process::id() % 500) as u16 * 19;
    for _ in 0..2000 {
        let offset = NEXT_PORT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (base - 20_000 + offset * 7) % 9_990;
        if TcpListener::bind(("127.0.0.1", port)).is_ok()
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            return port;
        }
    }
    panic!("no free port pair found for redis-server");
}

#[derive(Debug)]
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    shell: Option<Child>,
    stdin: Option<ChildStdin>,
    pid: u32,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(free_port(), &[])
    }

    pub fn start_with(port: u16, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir for redis-server");
        let mut server = RedisServer {
            port,
            dir,
            shell: None,
            stdin: None,
            pid: 0,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = self.dir.path().join("redis.log");
        let mut args = vec![
            "--port".to_string(),
            self.port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            "".into(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
            "--logfile".into(),
            log.display().to_string(),
        ];
        args.extend(self.extra.iter().cloned());
        let script = format!(
            "{REDIS_SERVER} \"$@\" & pid=$!; echo $pid; read _; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null"
        );
        let mut shell = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {REDIS_SERVER} (is it installed at /usr/bin/redis-server?): {e}")
            });
        let mut line = String::new();
        BufReader::new(shell.stdout.take().expect("stdout")).read_line(&mut line).expect("redis pid");
        self.pid = line.trim().parse().unwrap_or_else(|_| panic!("redis-server did not start: {line:?}"));
        self.stdin = shell.stdin.take();
        self.shell = Some(shell);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if ping(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("redis-server on port {} did not answer PING within 10s; its log:\n{log}", self.port);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        signal(self.pid, "KILL");
        drop(self.stdin.take());
        if let Some(mut shell) = self.shell.take() {
            let _ = shell.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while ping(self.port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Starts the server again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        signal(self.pid, "STOP");
    }

    pub fn resume(&self) {
        signal(self.pid, "CONT");
    }

    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        signal(self.pid, "CONT");
        self.kill();
    }
}

fn signal(pid: u32, sig: &str) {
    if pid != 0 {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(pid.to_string()).status();
    }
}

pub fn ping(port: u16) -> bool {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

pub fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new(REDIS_CLI)
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {REDIS_CLI}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Three masters, slots spread by `redis-cli --cluster create`.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(
                    free_port(),
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let mut create = Command::new(REDIS_CLI);
        create.arg("--cluster").arg("create").args(&addrs).args(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = create.output().unwrap_or_else(|e| panic!("cannot run {REDIS_CLI} --cluster create: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = nodes.iter().all(|n| {
                let info = n.cli(&["cluster", "info"]);
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            });
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok within 20s");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

static PREFIX: AtomicUsize = AtomicUsize::new(0);

/// A key prefix no other test in this process uses (tests share servers, never flush).
pub fn unique_prefix(name: &str) -> String {
    format!("t{}-{}-{name}", std::process::id(), PREFIX.fetch_add(1, Ordering::SeqCst))
}

/// The workspace's target directory (`CARGO_TARGET_DIR` when set), where tests find built
/// binaries.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("..").join("target"),
    }
}

/// Polls `condition` every 20 ms until it holds; fails the test, naming `what`, when it
/// still does not after `within`.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !condition().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
