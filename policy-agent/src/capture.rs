//! The pod's traffic capture, installed by the `breakwater-capture` init container before
//! Envoy and the agent start, as Istio's `istio-iptables` does it: TCP connections arriving
//! at the pod are redirected to Envoy's inbound listener, and TCP connections the pod's
//! application opens are redirected to Envoy's outbound listener. Envoy and the agent run
//! as one UID whose own connections are never captured, or Envoy's connection upstream
//! would be sent back to Envoy.
//!
//! [`rules`] is the whole policy, a pure function from the flags to `iptables-restore`
//! input for the nat table; [`apply`] only hands it to `iptables-restore --noflush`, leaving
//! out the jumps into our chains that are already there, so a second run leaves the same
//! rules (docs/capture.md). Only IPv4 is captured: Envoy's listeners, as the operator's
//! compiler writes them, are bound to IPv4 addresses only, so an IPv6 connection redirected
//! to them would be refused instead of going through Envoy.

use std::collections::{BTreeSet, HashSet};
use std::io::Write;
use std::process::{Command, ExitStatus, Stdio};
use std::str::FromStr;

/// Envoy's inbound listener.
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
/// Envoy's outbound listener.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;
/// The UID Envoy and the agent run as.
pub const DEFAULT_PROXY_UID: u32 = 1337;
/// Ports of the sidecars themselves, reached from outside the pod as they are: Envoy's admin
/// (15000) and listeners (15001, 15006), the agent's rate-limit service (15081), lease API
/// (15082) and metrics (9102).
pub const DEFAULT_EXCLUDE_INBOUND_PORTS: [u16; 6] = [15000, 15001, 15006, 15081, 15082, 9102];

/// Connections arriving at the pod (nat PREROUTING).
pub const INBOUND_CHAIN: &str = "BREAKWATER_INBOUND";
/// Connections the pod opens (nat OUTPUT).
pub const OUTPUT_CHAIN: &str = "BREAKWATER_OUTPUT";

const IPTABLES_SAVE: &str = "iptables-save";
const IPTABLES_RESTORE: &str = "iptables-restore";

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every way the capture fails.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The program is not on PATH: the image lacks the iptables package.
    #[error("{program} not found: the capture image must contain iptables")]
    NotFound { program: &'static str },
    /// The program exists but cannot be started, or its input cannot be written.
    #[error("cannot run {program}: {source}")]
    Run {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The program ran and refused; its stderr says why (not root, no NET_ADMIN, a kernel
    /// without the nat table or the owner match).
    #[error("{program} failed ({status}): {stderr}")]
    Failed { program: &'static str, status: ExitStatus, stderr: String },
    /// A port list flag that is not comma-separated ports.
    #[error("invalid port list {text:?}: {problem:?} is not a port (1-65535)")]
    InvalidPorts { text: String, problem: String },
}

/// What the capture needs to know: the flags of `breakwater-capture`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Where connections arriving at the pod go.
    pub inbound_port: u16,
    /// Where connections the application opens go.
    pub outbound_port: u16,
    /// Connections opened by this UID are never captured: Envoy's own upstream connections
    /// would loop back into Envoy, and the agent's (to Redis, to the operator) must not be
    /// proxied.
    pub proxy_uid: u32,
    /// Destination ports of arriving connections that reach the pod as they are.
    pub exclude_inbound_ports: Vec<u16>,
    /// Destination ports of the application's connections that go out as they are.
    pub exclude_outbound_ports: Vec<u16>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            inbound_port: DEFAULT_INBOUND_PORT,
            outbound_port: DEFAULT_OUTBOUND_PORT,
            proxy_uid: DEFAULT_PROXY_UID,
            exclude_inbound_ports: DEFAULT_EXCLUDE_INBOUND_PORTS.to_vec(),
            exclude_outbound_ports: Vec::new(),
        }
    }
}

/// A comma-separated list of ports, as the flags take them; an empty text is no port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortList(pub Vec<u16>);

impl FromStr for PortList {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let port = |part: &str| match part.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(Error::InvalidPorts { text: text.to_string(), problem: part.to_string() }),
        };
        text.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(port)
            .collect::<Result<_>>()
            .map(PortList)
    }
}

/// The `iptables-restore` input that installs the capture in the nat table: our two chains
/// (declaring a chain in the input creates it, or empties it when it exists), their rules,
/// and the jumps to them from PREROUTING and OUTPUT. Excluded ports are sorted and
/// deduplicated, so the text depends only on the set of ports, not on how the flags list
/// them. Rules are written as `iptables-save` prints them, so each line can be found in its
/// output.
pub fn rules(config: &CaptureConfig) -> String {
    let mut out = String::from("*nat\n");
    for chain in [INBOUND_CHAIN, OUTPUT_CHAIN] {
        out += &format!(":{chain} - [0:0]\n");
    }
    let exclude = |chain: &str, ports: &[u16]| -> String {
        let ports: BTreeSet<u16> = ports.iter().copied().collect();
        ports.iter().map(|port| format!("-A {chain} -p tcp -m tcp --dport {port} -j RETURN\n")).collect()
    };

    out += &exclude(INBOUND_CHAIN, &config.exclude_inbound_ports);
    out += &format!("-A {INBOUND_CHAIN} -p tcp -j REDIRECT --to-ports {}\n", config.inbound_port);

    // Envoy's and the agent's own connections first: Envoy's connection upstream is one the
    // application asked for, and must not be redirected into Envoy again.
    out += &format!("-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN\n", config.proxy_uid);
    // Everything routed over lo: 127.0.0.0/8, and the pod's own addresses (the application
    // calling itself on its pod IP goes straight to itself, as in Istio). Such a connection
    // never passes nat PREROUTING (nat sees only a connection's first packet, here in
    // OUTPUT), so it is not sent to the inbound listener either.
    out += &format!("-A {OUTPUT_CHAIN} -o lo -j RETURN\n");
    out += &exclude(OUTPUT_CHAIN, &config.exclude_outbound_ports);
    out += &format!("-A {OUTPUT_CHAIN} -p tcp -j REDIRECT --to-ports {}\n", config.outbound_port);

    for jump in jumps() {
        out += &jump;
        out.push('\n');
    }
    out += "COMMIT\n";
    out
}

/// The rules that send traffic into our chains: the only lines of [`rules`] that are not
/// replaced by declaring the chains again.
fn jumps() -> [String; 2] {
    [format!("-A PREROUTING -p tcp -j {INBOUND_CHAIN}"), format!("-A OUTPUT -p tcp -j {OUTPUT_CHAIN}")]
}

/// [`rules`] without the jumps that `saved` (`iptables-save -t nat`) already has: given to
/// `iptables-restore --noflush`, the chains are emptied and filled again, and the jumps,
/// which would otherwise be appended once more on every run, are added only when missing.
pub fn restore_input(config: &CaptureConfig, saved: &str) -> String {
    let present: HashSet<&str> = saved.lines().map(str::trim_end).collect();
    let jumps = jumps();
    rules(config)
        .lines()
        .filter(|line| !(jumps.iter().any(|jump| jump == line) && present.contains(line)))
        .map(|line| format!("{line}\n"))
        .collect()
}

/// Installs the capture in the current network namespace (the pod's, in an init
/// container), leaving every rule but ours as it is; returns the input it restored.
pub fn apply(config: &CaptureConfig) -> Result<String> {
    let saved = run(IPTABLES_SAVE, &["-t", "nat"], None)?;
    let input = restore_input(config, &saved);
    run(IPTABLES_RESTORE, &["--noflush"], Some(&input))?;
    Ok(input)
}

/// Runs `program`, feeding it `stdin`; its stdout when it succeeds.
fn run(program: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound { program },
            _ => Error::Run { program, source },
        })?;
    // The input is a few hundred bytes, far less than a pipe holds, so writing it all before
    // reading the output cannot deadlock. A failed write (the program exited early) is
    // reported only when the program itself did not fail: its stderr says more.
    let written = match (stdin, child.stdin.take()) {
        (Some(text), Some(mut pipe)) => pipe.write_all(text.as_bytes()),
        _ => Ok(()),
    };
    let output = child.wait_with_output().map_err(|source| Error::Run { program, source })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        let stderr = if stderr.is_empty() { "nothing on stderr".to_string() } else { stderr };
        return Err(Error::Failed { program, status: output.status, stderr });
    }
    written.map_err(|source| Error::Run { program, source })?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_RULES: &str = "\
*nat
:BREAKWATER_INBOUND - [0:0]
:BREAKWATER_OUTPUT - [0:0]
-A BREAKWATER_INBOUND -p tcp -m tcp --dport 9102 -j RETURN
-A BREAKWATER_INBOUND -p tcp -m tcp --dport 15000 -j RETURN
-A BREAKWATER_INBOUND -p tcp -m tcp --dport 15001 -j RETURN
-A BREAKWATER_INBOUND -p tcp -m tcp --dport 15006 -j RETURN
-A BREAKWATER_INBOUND -p tcp -m tcp --dport 15081 -j RETURN
-A BREAKWATER_INBOUND -p tcp -m tcp --dport 15082 -j RETURN
-A BREAKWATER_INBOUND -p tcp -j REDIRECT --to-ports 15006
-A BREAKWATER_OUTPUT -m owner --uid-owner 1337 -j RETURN
-A BREAKWATER_OUTPUT -o lo -j RETURN
-A BREAKWATER_OUTPUT -p tcp -j REDIRECT --to-ports 15001
-A PREROUTING -p tcp -j BREAKWATER_INBOUND
-A OUTPUT -p tcp -j BREAKWATER_OUTPUT
COMMIT
";

    fn custom() -> CaptureConfig {
        CaptureConfig {
            inbound_port: 16006,
            outbound_port: 16001,
            proxy_uid: 4242,
            exclude_inbound_ports: vec![22, 8443],
            exclude_outbound_ports: vec![5432, 53],
        }
    }

    #[test]
    fn the_default_rules() {
        assert_eq!(rules(&CaptureConfig::default()), DEFAULT_RULES);
    }

    #[test]
    fn every_exclusion_returns_before_the_redirect_of_its_chain() {
        let text = rules(&custom());
        let lines: Vec<&str> = text.lines().collect();
        let at = |line: &str| {
            lines.iter().position(|l| *l == line).unwrap_or_else(|| panic!("no {line:?} in\n{text}"))
        };
        let inbound_redirect = at("-A BREAKWATER_INBOUND -p tcp -j REDIRECT --to-ports 16006");
        let outbound_redirect = at("-A BREAKWATER_OUTPUT -p tcp -j REDIRECT --to-ports 16001");
        for port in [22, 8443] {
            assert!(
                at(&format!("-A BREAKWATER_INBOUND -p tcp -m tcp --dport {port} -j RETURN"))
                    < inbound_redirect
            );
        }
        for port in [53, 5432] {
            assert!(
                at(&format!("-A BREAKWATER_OUTPUT -p tcp -m tcp --dport {port} -j RETURN"))
                    < outbound_redirect
            );
        }
        assert!(at("-A BREAKWATER_OUTPUT -m owner --uid-owner 4242 -j RETURN") < outbound_redirect);
        assert!(at("-A BREAKWATER_OUTPUT -o lo -j RETURN") < outbound_redirect);
        // Nothing else returns or redirects: an excluded port of one direction is captured in
        // the other.
        assert_eq!(text.matches("-j RETURN").count(), 6, "{text}");
        assert_eq!(text.matches("-j REDIRECT").count(), 2, "{text}");
        assert_eq!(text.matches("15006").count() + text.matches("15001").count(), 0, "{text}");
    }

    #[test]
    fn the_rules_depend_on_the_set_of_ports_only() {
        let listed = custom();
        let mut shuffled = custom();
        shuffled.exclude_inbound_ports = vec![8443, 22, 8443];
        shuffled.exclude_outbound_ports = vec![53, 5432, 53];
        assert_eq!(rules(&listed), rules(&shuffled));
        assert_eq!(rules(&listed), rules(&listed.clone()));
    }

    #[test]
    fn the_restore_input_leaves_out_only_the_jumps_already_there() {
        let config = CaptureConfig::default();
        assert_eq!(restore_input(&config, ""), rules(&config));
        let saved = "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -p tcp -j BREAKWATER_INBOUND\n\
                     -A OUTPUT -p udp -j BREAKWATER_OUTPUT\nCOMMIT\n";
        let input = restore_input(&config, saved);
        assert!(!input.contains("-A PREROUTING"), "{input}");
        assert!(input.contains("-A OUTPUT -p tcp -j BREAKWATER_OUTPUT\n"), "{input}");
        // The chains are declared, so emptied, every time.
        assert_eq!(input, rules(&config).replace("-A PREROUTING -p tcp -j BREAKWATER_INBOUND\n", ""));
    }

    #[test]
    fn port_lists() {
        let parse = |text: &str| text.parse::<PortList>().map(|list| list.0);
        assert_eq!(parse("").ok(), Some(vec![]));
        assert_eq!(parse("15000, 9102,").ok(), Some(vec![15000, 9102]));
        for bad in ["0", "http", "70000", "80,-1"] {
            let error = parse(bad).err().map(|e| e.to_string());
            assert!(error.as_deref().is_some_and(|e| e.starts_with("invalid port list")), "{bad}: {error:?}");
        }
    }

    #[test]
    fn a_missing_program_names_the_package() {
        let error = run("breakwater-no-such-program", &[], None).err().map(|e| e.to_string());
        assert_eq!(
            error.as_deref(),
            Some("breakwater-no-such-program not found: the capture image must contain iptables")
        );
    }

    #[test]
    fn a_failed_program_reports_its_stderr() {
        let error =
            run("sh", &["-c", "echo refused >&2; exit 3"], Some("input")).err().map(|e| e.to_string());
        assert_eq!(error.as_deref(), Some("sh failed (exit status: 3): refused"));
    }
}
