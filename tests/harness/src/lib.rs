//! Test harness shared by the workspace's tests: the real servers they run against, started
//! privately on free loopback ports — `redis-server` (one server or a three-master Cluster)
//! and a Kubernetes control plane (etcd + kube-apiserver built from pinned Go modules, with
//! the matching kubectl). A test that cannot start a server fails with the reason; it never
//! skips.

mod kube;
mod nats;
mod postgres;
mod process;
mod redis;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub use kube::{ControlPlane, ServiceAccount};
pub use nats::{NATS_SERVER, NatsServer};
pub use postgres::{POSTGRES_DATABASE, POSTGRES_USER, PostgresServer};
pub use process::Daemon;
pub use redis::{REDIS_CLI, REDIS_SERVER, RedisCluster, RedisServer, ping, redis_cli};

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// A port p such that p and p + 10000 (a Redis Cluster's bus) are free right now.
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
    panic!("no free port pair found");
}

/// Fails the test, naming the Debian package, when `program` is not on PATH. `make test`
/// installs the packages (see the README's prerequisites).
pub fn require_program(program: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    assert!(
        found,
        "{program} is not installed: `make test` installs it (as root, with apt), or run \
         `apt-get install {package}`"
    );
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
        None => workspace_dir().join("target"),
    }
}

/// `cargo metadata` (JSON) of the workspace at `dir`, resolved offline and locked, for this
/// platform only: on a fresh registry, other platforms' packages were never downloaded.
/// Fails the test with cargo's message when cargo cannot resolve it.
pub fn cargo_metadata(dir: &std::path::Path) -> Vec<u8> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let rustc = std::process::Command::new("rustc").arg("-vV").output().expect("rustc -vV runs");
    let rustc = String::from_utf8_lossy(&rustc.stdout).into_owned();
    let host = rustc.lines().find_map(|l| l.strip_prefix("host: ")).expect("rustc names its host");
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--locked", "--filter-platform", host])
        .current_dir(dir)
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata cannot resolve the workspace at {}: {}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// The workspace's root directory.
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("..")
}

/// Polls `check` every 20 ms until it gives `Ok`; fails the test after `within` with the last
/// `Err` it gave (the state it last observed), so a red test explains itself.
pub async fn eventually<T, F, Fut>(what: &str, within: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not within {within:?}; last observed: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// [`eventually`] for a condition that has no state worth showing.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let check = || {
        let holds = condition();
        async move { if holds.await { Ok(()) } else { Err("the condition does not hold".to_string()) } }
    };
    eventually(what, within, check).await
}
