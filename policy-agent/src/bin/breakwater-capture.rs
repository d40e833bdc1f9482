//! `breakwater-capture`: the init container that sends the pod's TCP traffic through Envoy
//! (docs/capture.md). Parses flags and calls [`capture::apply`]; `--dry-run` only prints
//! the `iptables-restore` input.

use std::process::ExitCode;

use breakwater_agent::capture::{self, CaptureConfig, PortList};
use breakwater_agent::error::report;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "breakwater-capture",
    version,
    about = "Breakwater's pod traffic capture: iptables rules that send the pod's TCP connections through Envoy"
)]
struct Cli {
    /// Envoy's inbound listener: TCP connections arriving at the pod are redirected here.
    #[arg(long, default_value_t = capture::DEFAULT_INBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    inbound_port: u16,
    /// Envoy's outbound listener: TCP connections the application opens are redirected here.
    #[arg(long, default_value_t = capture::DEFAULT_OUTBOUND_PORT, value_parser = clap::value_parser!(u16).range(1..))]
    outbound_port: u16,
    /// The UID Envoy and the agent run as: its connections are never captured.
    #[arg(long, default_value_t = capture::DEFAULT_PROXY_UID)]
    proxy_uid: u32,
    /// Comma-separated destination ports of arriving connections that are not redirected
    /// (Envoy's admin and listeners, the agent's services).
    #[arg(long, default_value = "15000,15001,15006,15081,15082,9102")]
    exclude_inbound_ports: PortList,
    /// Comma-separated destination ports of the application's connections that are not
    /// redirected.
    #[arg(long, default_value = "", hide_default_value = true)]
    exclude_outbound_ports: PortList,
    /// Print the iptables-restore input and exit, changing nothing.
    #[arg(long)]
    dry_run: bool,
}

impl Cli {
    fn config(&self) -> CaptureConfig {
        CaptureConfig {
            inbound_port: self.inbound_port,
            outbound_port: self.outbound_port,
            proxy_uid: self.proxy_uid,
            exclude_inbound_ports: self.exclude_inbound_ports.0.clone(),
            exclude_outbound_ports: self.exclude_outbound_ports.0.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = cli.config();
    if cli.dry_run {
        print!("{}", capture::rules(&config));
        return ExitCode::SUCCESS;
    }
    match capture::apply(&config) {
        Ok(_) => {
            // The rules now in force, for the init container's log.
            print!("{}", capture::rules(&config));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", report(&error));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_flags_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_default_flags_are_the_default_config() {
        let cli = Cli::try_parse_from(["breakwater-capture"]).map_err(|e| e.to_string());
        assert_eq!(cli.map(|cli| cli.config()), Ok(CaptureConfig::default()));
    }

    #[test]
    fn an_empty_exclusion_list_is_none() {
        let cli = Cli::try_parse_from(["breakwater-capture", "--exclude-inbound-ports", ""])
            .map_err(|e| e.to_string());
        assert_eq!(cli.map(|cli| cli.config().exclude_inbound_ports), Ok(vec![]));
    }
}
