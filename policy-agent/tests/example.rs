//! What a newcomer runs first: the README's agent command, verbatim but for its ports, on
//! the example configuration shipped in `policy-agent/agent.example.yaml`, from the
//! repository root, with neither `--pod-name`, `POD_NAME` nor `HOSTNAME` set (a plain shell
//! does not export `HOSTNAME`).

// Helpers outside #[test] fns unwrap too, as the tests themselves may (clippy.toml).
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use breakwater_agent::config::{self, RuleSet};
use breakwater_agent::metrics::Metrics;
use support::{free_port, wait_until, workspace_dir};

#[test]
fn the_example_configuration_is_one_the_agent_applies() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent.example.yaml");
    let (config, _) = config::read_file(&path).unwrap();
    let rules = RuleSet::compile(&config, &Metrics::default()).unwrap();
    assert!(rules.rules.contains_key("shop/api-per-user/per-user"));
    assert_eq!(rules.leases.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["invoice-run"]);
}

/// The arguments of the README's `cargo run -p breakwater-agent -- ...` commands, in the
/// "Rate-limit agent" section.
fn readme_commands() -> Vec<Vec<String>> {
    let readme = std::fs::read_to_string(workspace_dir().join("README.md")).unwrap();
    let section = readme.split("\n## Rate-limit agent").nth(1).expect("a Rate-limit agent section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|line| line.trim().strip_prefix("cargo run -p breakwater-agent -- "))
        .map(|args| args.split('#').next().unwrap().split_whitespace().map(String::from).collect())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_command_runs_as_written() {
    let commands = readme_commands();
    assert!(!commands.is_empty(), "the README shows how to run the agent");
    for args in commands {
        let (grpc, http, lease) = (free_port(), free_port(), free_port());
        let mut agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_breakwater-agent"))
            .args(&args)
            // The defaults may be taken on a test machine; nothing else is added.
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc}"), "--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--lease-addr", &format!("127.0.0.1:{lease}")])
            .current_dir(workspace_dir())
            .env_remove("HOSTNAME")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("BREAKWATER_AGENT_CONFIG")
            .env_remove("BREAKWATER_REDIS_URL")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let client = reqwest::Client::new();
        wait_until(&format!("`{}` ready", args.join(" ")), Duration::from_secs(20), || async {
            let ready = client.get(format!("http://127.0.0.1:{http}/readyz")).send().await;
            ready.is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(agent.try_wait().unwrap().is_none(), "the agent runs");
        // The example's lease, granted to this machine's name in the default namespace.
        let grant: serde_json::Value = client
            .post(format!("http://127.0.0.1:{lease}/v1/leases/invoice-run/acquire"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let holder = grant["holder"].as_str().unwrap_or_default();
        assert!(holder.starts_with("default/") && holder.len() > "default/".len(), "{grant}");
        agent.kill().await.unwrap();
    }
}
