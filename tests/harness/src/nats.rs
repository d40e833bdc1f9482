//! Private `nats-server` processes with JetStream, from the Debian `nats-server` package.
//! Streams are kept in a store directory of the server's own, so a
//! [`NatsServer::restart`] (same port, same directory) comes back with them, as a real
//! server restarted after a crash does.
//!
//! The flags and why each is set are in `docs/testing.md`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{free_port, process::Daemon, require_program};

pub const NATS_SERVER: &str = "nats-server";

#[derive(Debug)]
pub struct NatsServer {
    /// The client port.
    pub port: u16,
    /// The HTTP monitoring port (`/healthz`, `/jsz`, `/varz`, …).
    pub monitor_port: u16,
    daemon: Daemon,
    // Holds the JetStream store until the server is dropped; dropped after the daemon.
    _dir: tempfile::TempDir,
}

impl NatsServer {
    /// A private server with JetStream on free loopback ports.
    pub fn start() -> Self {
        let program = nats_server_path();
        let dir = tempfile::tempdir().expect("temp dir for nats-server");
        let (port, monitor_port) = (free_port(), free_port());
        let args: Vec<String> = [
            "--addr",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--http_port",
            &monitor_port.to_string(),
            "--jetstream",
            "--store_dir",
            &dir.path().display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let daemon = Daemon::spawn("nats-server", program, &args, dir.path().join("nats-server.log"));
        let server = NatsServer { port, monitor_port, daemon, _dir: dir };
        server.wait_ready();
        server
    }

    /// Waits until JetStream is up: `/healthz?js-enabled-only=true` answers 200 only once
    /// the server listens for clients and JetStream has started (with its streams recovered).
    fn wait_ready(&self) {
        let within = Duration::from_secs(10);
        let deadline = Instant::now() + within;
        let mut last = String::from("no answer");
        while Instant::now() < deadline {
            match self.monitor("/healthz?js-enabled-only=true") {
                Some((200, _)) => return,
                Some((status, body)) => last = format!("{status} {body}"),
                None => {}
            }
            if !self.daemon.is_running() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "nats-server on port {} was not ready within {within:?} (healthz: {last}): {}",
            self.port,
            self.daemon.report()
        );
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A GET of `path` on the monitoring port: the status code and the body, or None when
    /// nothing answers (within a second).
    pub fn monitor(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.monitor_port, path)
    }

    /// Kills the server at once (SIGKILL), as a crash would; once this returns its ports are
    /// closed (the daemon waits for the process).
    pub fn kill(&mut self) {
        self.daemon.kill();
    }

    /// Starts the server again on the same ports and store directory, so streams survive,
    /// and waits until JetStream is up.
    pub fn restart(&mut self) {
        self.daemon.restart();
        self.wait_ready();
    }

    /// Freezes the server (SIGSTOP) and returns once it is stopped: connections stay open,
    /// nothing is answered.
    pub fn pause(&self) {
        self.daemon.pause();
    }

    pub fn resume(&self) {
        self.daemon.resume();
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.daemon.pid()
    }

    /// Everything the server has logged so far.
    pub fn log(&self) -> String {
        self.daemon.log()
    }
}

/// `nats-server` on PATH, else in /usr/sbin, where Debian installs it (not on a non-root
/// user's PATH). Fails the test naming the package when it is in neither.
fn nats_server_path() -> PathBuf {
    let sbin = Path::new("/usr/sbin").join(NATS_SERVER);
    let on_path = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(NATS_SERVER).is_file()));
    if !on_path && sbin.is_file() {
        return sbin;
    }
    require_program(NATS_SERVER, "nats-server");
    PathBuf::from(NATS_SERVER)
}

/// A plain HTTP/1.0 GET on loopback (the monitoring endpoints need nothing more).
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(1);
    let mut stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_write_timeout(Some(timeout)).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}
