//! `breakwater-capture` in a real kernel with real iptables: each test makes two fresh
//! network namespaces joined by a veth pair — the "pod", where the capture runs as the init
//! container would, and a "client", another host on the pod's /30 — starts listeners that
//! answer every connection with the port they accepted it on and its original destination
//! (what Envoy reads to know where the caller meant to go), and connects as the client, as
//! the application (UID 1000) and as the proxy (UID 1337).
//!
//! Needs root (namespaces, iptables) and the programs `require_tools` names; without them
//! the tests fail, saying what is missing. They never touch the host's own namespace.

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use breakwater_agent::capture::{CaptureConfig, rules};
use breakwater_harness::{eventually, require_program};

const CAPTURE: &str = env!("CARGO_BIN_EXE_breakwater-capture");
/// The application's UID, and the proxy's (the capture's default).
const APP: u32 = 1000;
const PROXY: u32 = 1337;
const APP_PORT: u16 = 8080;
/// A port the capture excludes by default (the agent's metrics).
const EXCLUDED_INBOUND: u16 = 9102;
const SERVER_PORT: u16 = 9000;
/// Excluded with --exclude-outbound-ports where a test says so.
const EXCLUDED_OUTBOUND: u16 = 9090;

/// Listens on every port given and answers each connection with `PORT ORIGINAL`: the port
/// it was accepted on and its original destination (SO_ORIGINAL_DST, where the caller meant
/// to go before a REDIRECT; `-` where conntrack does not track it). Creates the file named
/// first once every port is bound.
const LISTENER: &str = r#"
import socket, struct, sys, threading
ready, ports = sys.argv[1], [int(port) for port in sys.argv[2:]]

def original(conn):
    try:
        raw = conn.getsockopt(socket.SOL_IP, 80, 16)  # SO_ORIGINAL_DST
    except OSError:
        return "-"
    port, addr = struct.unpack("!2xH4s8x", raw)
    return f"{socket.inet_ntoa(addr)}:{port}"

def serve(server, port):
    while True:
        conn, _ = server.accept()
        with conn:
            conn.sendall(f"{port} {original(conn)}\n".encode())

for port in ports:
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen()
    threading.Thread(target=serve, args=(server, port), daemon=True).start()
open(ready, "w").close()
threading.Event().wait()
"#;

/// Connects to `$0:$1` and prints what the listener answers (bash's /dev/tcp, so that any
/// UID can run it); `timeout` bounds a connection nobody answers.
const CONNECT: &str = r#"exec 3<>"/dev/tcp/$0/$1" && cat <&3"#;

fn require_tools() {
    let uid = std::fs::metadata("/proc/self").expect("/proc is mounted").uid();
    assert_eq!(
        uid, 0,
        "the capture tests create network namespaces and install iptables rules: run them as root"
    );
    for (program, package) in [
        ("ip", "iproute2"),
        ("iptables-restore", "iptables"),
        ("iptables-save", "iptables"),
        ("setpriv", "util-linux"),
        ("python3", "python3"),
        ("timeout", "coreutils"),
        ("bash", "bash"),
    ] {
        require_program(program, package);
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two network namespaces joined by a veth pair (`eth0` in each), with `lo` up in both, and
/// the processes started in them; all of it goes away on drop, whether the test passed.
struct Network {
    pod: String,
    client: String,
    pod_addr: String,
    client_addr: String,
    dir: tempfile::TempDir,
    children: Vec<Child>,
}

impl Network {
    fn new() -> Self {
        require_tools();
        let (pid, n) = (std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        // Each namespace routes on its own, so addresses could repeat; they differ anyway,
        // per process and per test, so that a packet or rule in a trace names its test.
        let (x, y) = (pid % 250, (n % 64) * 4);
        let network = Network {
            pod: format!("bw-pod-{pid}-{n}"),
            client: format!("bw-client-{pid}-{n}"),
            pod_addr: format!("10.200.{x}.{}", y + 2),
            client_addr: format!("10.200.{x}.{}", y + 1),
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        };
        // From here on, a failure deletes what was made.
        for ns in [&network.pod, &network.client] {
            ip(&["netns", "add", ns]);
        }
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &network.pod,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &network.client,
        ]);
        for (ns, addr) in [(&network.pod, &network.pod_addr), (&network.client, &network.client_addr)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/30"), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        network
    }

    /// `args` run inside namespace `ns`.
    fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", ns]).args(args);
        command
    }

    /// `breakwater-capture` in the pod, as its init container; fails the test if it fails.
    fn capture(&self, flags: &[&str]) -> String {
        let output = self.exec(&self.pod, &[CAPTURE]).args(flags).output().unwrap();
        assert!(output.status.success(), "breakwater-capture {flags:?}: {}", describe(&output));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The pod's nat table, without the comments (they carry the time) and the chains'
    /// counters.
    fn nat_rules(&self) -> String {
        let output = self.exec(&self.pod, &["iptables-save", "-t", "nat"]).output().unwrap();
        assert!(output.status.success(), "iptables-save: {}", describe(&output));
        let text = String::from_utf8_lossy(&output.stdout);
        text.lines().filter(|line| !line.starts_with('#')).map(|line| uncounted(line) + "\n").collect()
    }

    /// Starts a listener in `ns` on `ports` and waits until they are bound.
    async fn listen(&mut self, ns: &str, ports: &[u16]) {
        let ready = self.dir.path().join(format!("{ns}.ready"));
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        let log = self.dir.path().join(format!("{ns}.log"));
        let child = self
            .exec(ns, &["python3", "-c", LISTENER, &ready.to_string_lossy()])
            .args(&ports)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.children.push(child);
        let child = self.children.last_mut().unwrap();
        let what = format!("a listener in {ns} on {ports:?}");
        eventually(&what, Duration::from_secs(10), || {
            let state = match child.try_wait() {
                _ if ready.exists() => Ok(()),
                Ok(Some(status)) => Err(format!("it exited ({status}): {}", read(&log))),
                Ok(None) => Err("not bound yet".to_string()),
                Err(error) => Err(error.to_string()),
            };
            async move { state }
        })
        .await;
    }

    /// Connects from `ns`, as `uid` (root when none), to `addr:port`: the listener's answer,
    /// `PORT ORIGINAL`, or why there was none.
    fn connect(&self, ns: &str, uid: Option<u32>, addr: &str, port: u16) -> Result<String, String> {
        let uid = uid.map(|uid| uid.to_string());
        let mut args = Vec::new();
        if let Some(uid) = &uid {
            args.extend(["setpriv", "--reuid", uid, "--regid", uid, "--clear-groups"]);
        }
        let port = port.to_string();
        args.extend(["timeout", "5", "bash", "-c", CONNECT, addr, &port]);
        let output = self.exec(ns, &args).output().unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
        } else {
            Err(describe(&output))
        }
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in [&self.pod, &self.client] {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
    }
}

fn ip(args: &[&str]) {
    let output = Command::new("ip").args(args).output().unwrap();
    assert!(output.status.success(), "ip {}: {}", args.join(" "), describe(&output));
}

fn describe(output: &Output) -> String {
    format!(
        "{}; stdout: {:?}; stderr: {:?}",
        output.status,
        String::from_utf8_lossy(&output.stdout).trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    )
}

/// A line of `iptables-save` output without its chain's counters, which traffic changes.
fn uncounted(line: &str) -> String {
    match line.rsplit_once(" [") {
        Some((chain, _)) if line.starts_with(':') => chain.to_string(),
        _ => line.to_string(),
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|error| format!("({}: {error})", path.display()))
}

/// The port an answer says its connection landed on.
fn landed(answer: &Result<String, String>) -> Result<&str, &str> {
    match answer {
        Ok(text) => Ok(text.split(' ').next().unwrap_or_default()),
        Err(error) => Err(error),
    }
}

#[tokio::test]
async fn connections_to_the_pod_land_on_the_inbound_port_except_excluded_ports() {
    let mut net = Network::new();
    let pod = net.pod.clone();
    net.listen(&pod, &[15006, 15001, APP_PORT, EXCLUDED_INBOUND]).await;
    let (pod_addr, client) = (net.pod_addr.clone(), net.client.clone());

    // Before the capture, the application's port answers for itself.
    assert_eq!(landed(&net.connect(&client, None, &pod_addr, APP_PORT)), Ok("8080"));

    net.capture(&[]);
    assert_eq!(
        net.connect(&client, None, &pod_addr, APP_PORT),
        Ok(format!("15006 {pod_addr}:{APP_PORT}")),
        "a connection to the application lands on Envoy's inbound listener, which can read where it was going"
    );
    assert_eq!(
        net.connect(&client, None, &pod_addr, EXCLUDED_INBOUND),
        Ok(format!("{EXCLUDED_INBOUND} {pod_addr}:{EXCLUDED_INBOUND}")),
        "an excluded port is reached as it is"
    );
}

#[tokio::test]
async fn the_applications_connections_land_on_the_outbound_port_and_the_proxys_go_out() {
    let mut net = Network::new();
    let (pod, client) = (net.pod.clone(), net.client.clone());
    net.listen(&pod, &[15001, 15006, APP_PORT]).await;
    net.listen(&client, &[SERVER_PORT, EXCLUDED_OUTBOUND]).await;
    let (pod_addr, client_addr) = (net.pod_addr.clone(), net.client_addr.clone());

    net.capture(&["--exclude-outbound-ports", &EXCLUDED_OUTBOUND.to_string()]);
    assert_eq!(
        net.connect(&pod, Some(APP), &client_addr, SERVER_PORT),
        Ok(format!("15001 {client_addr}:{SERVER_PORT}")),
        "the application's connection lands on Envoy's outbound listener"
    );
    assert_eq!(
        landed(&net.connect(&pod, Some(PROXY), &client_addr, SERVER_PORT)),
        Ok("9000"),
        "the proxy's connection reaches the server"
    );
    assert_eq!(
        landed(&net.connect(&pod, Some(APP), &client_addr, EXCLUDED_OUTBOUND)),
        Ok("9090"),
        "an excluded port is reached as it is"
    );
    // Over lo: neither the application calling itself (on loopback or its pod IP) nor
    // Envoy passing a connection on to the application is captured, in either direction.
    for (uid, addr) in [(APP, "127.0.0.1"), (APP, pod_addr.as_str()), (PROXY, pod_addr.as_str())] {
        assert_eq!(
            net.connect(&pod, Some(uid), addr, APP_PORT),
            Ok(format!("{APP_PORT} {addr}:{APP_PORT}")),
            "UID {uid} to {addr}:{APP_PORT} reaches the application"
        );
    }
}

#[test]
fn applying_twice_leaves_the_same_rules_and_keeps_the_rest_of_the_table() {
    let net = Network::new();
    // A rule of someone else's (another init container, the CNI) survives the capture.
    let other = "-A OUTPUT -p udp -m udp --dport 53 -j ACCEPT";
    let mut restore =
        net.exec(&net.pod, &["iptables-restore", "--noflush"]).stdin(Stdio::piped()).spawn().unwrap();
    restore.stdin.take().unwrap().write_all(format!("*nat\n{other}\nCOMMIT\n").as_bytes()).unwrap();
    let output = restore.wait_with_output().unwrap();
    assert!(output.status.success(), "installing {other:?}: {}", describe(&output));

    let printed = net.capture(&[]);
    let once = net.nat_rules();
    assert_eq!(printed, rules(&CaptureConfig::default()), "it prints the rules in force");
    for line in printed.lines().map(uncounted) {
        assert!(once.lines().any(|l| l == line), "{line:?} is not in the nat table:\n{once}");
    }
    assert!(once.contains(other), "{other:?} is gone:\n{once}");

    net.capture(&[]);
    assert_eq!(net.nat_rules(), once, "a second run changes the nat table");

    // Other flags replace the rules; they are not added to the old ones.
    net.capture(&["--inbound-port", "16006", "--exclude-inbound-ports", "22"]);
    let changed = net.nat_rules();
    assert!(changed.contains("-A BREAKWATER_INBOUND -p tcp -j REDIRECT --to-ports 16006\n"), "{changed}");
    assert!(!changed.contains("15006") && !changed.contains("9102"), "old rules are left:\n{changed}");
    assert_eq!(changed.matches("-j BREAKWATER_INBOUND").count(), 1, "{changed}");
}

#[test]
fn a_dry_run_prints_the_rules_and_changes_nothing() {
    let net = Network::new();
    let before = net.nat_rules();
    let output = net.exec(&net.pod, &[CAPTURE, "--dry-run", "--proxy-uid", "4242"]).output().unwrap();
    assert!(output.status.success(), "{}", describe(&output));
    let expected = rules(&CaptureConfig { proxy_uid: 4242, ..CaptureConfig::default() });
    assert_eq!(String::from_utf8_lossy(&output.stdout), expected);
    assert_eq!(net.nat_rules(), before);
}

/// Runs `args` in a fresh pod namespace: they must fail, leaving the nat table without our
/// chains; their stderr.
fn failure(args: &[&str]) -> String {
    let net = Network::new();
    let output = net.exec(&net.pod, args).output().unwrap();
    assert!(!output.status.success(), "it should fail: {}", describe(&output));
    assert!(!net.nat_rules().contains("BREAKWATER"), "it changed the nat table");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn without_iptables_it_fails_saying_so() {
    let stderr = failure(&["env", "PATH=/breakwater-nowhere", CAPTURE]);
    assert_eq!(stderr, "error: iptables-save not found: the capture image must contain iptables\n");
}

#[test]
fn without_root_it_fails_with_the_message_of_iptables() {
    let stderr = failure(&["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", CAPTURE]);
    assert!(stderr.starts_with("error: iptables-save failed (exit status: "), "{stderr}");
    assert!(stderr.contains("Permission denied (you must be root)"), "{stderr}");
}

#[test]
fn net_admin_and_net_raw_are_the_only_capabilities_it_needs() {
    let net = Network::new();
    let limited = ["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_admin,+net_raw", CAPTURE];
    let output = net.exec(&net.pod, &limited).output().unwrap();
    assert!(output.status.success(), "with NET_ADMIN and NET_RAW: {}", describe(&output));
    assert!(net.nat_rules().contains("-A PREROUTING -p tcp -j BREAKWATER_INBOUND\n"));

    // The limit is real: without NET_ADMIN it fails.
    let stderr = failure(&["setpriv", "--inh-caps=-all", "--bounding-set=-all,+net_raw", CAPTURE]);
    assert!(stderr.starts_with("error: iptables-save failed"), "{stderr}");
}
