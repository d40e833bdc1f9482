//! The whole way on a real API server: a pod created in a labelled namespace comes back from
//! the operator's webhook with its sidecars; its agent — run with exactly the arguments the
//! webhook gave it, parsed by the agent's own flags, and the pod's projected token (here from
//! the TokenRequest API, as the kubelet would mount it) — subscribes for itself and proxies
//! the pod's Envoy (played by a test ADS client, since Envoy does not run here) to the
//! operator; the operator reviews the token, the two ACK, and the RateLimitPolicy on the
//! pod's Service turns `Programmed=True`. A stream through the same agent that claims
//! another pod's node id is refused.

#[path = "../../operator/tests/support/ads.rs"]
#[allow(dead_code)]
mod ads;
#[path = "../../operator/tests/support/cluster.rs"]
mod cluster;

use std::time::Duration;

use breakwater_agent::cli::Cli;
use breakwater_harness::{ControlPlane, eventually, free_port, unique_prefix};
use breakwater_operator::{
    inject::{self, WebhookOptions, certs, pod as injected},
    run,
    xds::DEFAULT_AUDIENCE,
};
use clap::Parser;
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

fn plane() -> &'static ControlPlane {
    static CRDS: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let plane = ControlPlane::shared();
    CRDS.get_or_init(|| cluster::install_crds(plane));
    plane
}

fn apply(namespace: &str, yaml: &str) {
    let plane = plane();
    let out = plane.kubectl_as(
        &plane.kubeconfig,
        &["apply", "--server-side", "-n", namespace, "-f", "-"],
        Some(yaml),
    );
    assert!(out.status.success(), "kubectl apply: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
}

const WORLD: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: api}
---
apiVersion: v1
kind: Service
metadata: {name: api}
spec: {selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.0.0.5], targetRef: {kind: Pod, name: api-0}}]
---
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: api-limits}
spec:
  targetRefs: [{kind: Service, name: api}]
  limits: [{name: all, rate: {requests: 100, per: 1s}}]
"#;

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: api-0, labels: {app: api}}
spec:
  serviceAccountName: api
  containers: [{name: api, image: example/api:1, ports: [{name: http, containerPort: 8080}]}]
"#;

/// The arguments of the container `name` of `pod`, with the address flags the test must move
/// off the pod's fixed ports replaced.
fn args_of(pod: &Value, name: &str) -> Vec<String> {
    let container = pod["spec"]["initContainers"]
        .as_array()
        .and_then(|list| list.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {name} in {pod}"));
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("text").to_string())
        .collect()
}

fn replace_flag(args: &mut [String], flag: &str, value: &str) {
    let arg =
        args.iter_mut().find(|a| a.starts_with(&format!("{flag}="))).unwrap_or_else(|| panic!("no {flag}"));
    *arg = format!("{flag}={value}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_pod_reaches_the_operator_with_its_own_token_and_programs_its_policy() {
    let plane = plane();
    let client = cluster::client(&plane.kubeconfig).await;
    let ns = unique_prefix("shop");
    plane.kubectl_ok(&["create", "namespace", &ns]);
    plane.kubectl_ok(&["label", "namespace", &ns, "breakwater.dev/inject=enabled"]);

    // The operator, with its webhook; the injected agents are told to reach its ADS port.
    let (xds_port, webhook_port) = (free_port(), free_port());
    let configuration = unique_prefix("bw-inject");
    let options = run::Options {
        root_namespace: "breakwater-system".into(),
        metrics_addr: ([127, 0, 0, 1], free_port()).into(),
        xds_addr: ([127, 0, 0, 1], xds_port).into(),
        webhook: Some(WebhookOptions {
            addr: ([127, 0, 0, 1], webhook_port).into(),
            config: inject::Config {
                xds_endpoint: format!("http://127.0.0.1:{xds_port}"),
                ..inject::Config::default()
            },
            certs: certs::Source::Managed {
                namespace: ns.clone(),
                secret: "webhook-tls".into(),
                configuration: configuration.clone(),
                dns_names: vec!["127.0.0.1".into()],
                lifetimes: certs::Lifetimes::default(),
            },
            cert_check: Duration::from_millis(500),
        }),
        relays: Default::default(),
        leader_election_namespace: None,
        identity: "injection-test".into(),
        pod: None,
        redis: None,
        xds_token_audience: DEFAULT_AUDIENCE.into(),
    };
    let label = format!("{}=enabled", injected::NAMESPACE_LABEL);
    let url = format!("https://127.0.0.1:{webhook_port}{}", inject::webhook::PATH);
    plane.register_pod_webhook(&configuration, "inject.breakwater.dev", &url, &label, &[&ns], "Fail");
    let operator = tokio::spawn(run::run(client, options, std::future::pending()));
    apply(&ns, WORLD);

    // The pod comes back with its sidecars (once the operator has given the API server its CA).
    let pod: Value = eventually("the webhook injects the pod", DEADLINE, || async {
        let out =
            plane.kubectl_as(&plane.kubeconfig, &["create", "-n", &ns, "-o", "json", "-f", "-"], Some(POD));
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    })
    .await;
    let init: Vec<&str> = pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(init, [injected::CAPTURE_CONTAINER, injected::AGENT_CONTAINER, injected::PROXY_CONTAINER]);

    // The agent with the webhook's arguments; its token as the kubelet would mount it.
    let dir = tempfile::tempdir().expect("temp dir");
    let token_file = dir.path().join("token");
    let token = plane.pod_token(&ns, "api", "api-0", DEFAULT_AUDIENCE, Duration::from_secs(3600));
    std::fs::write(&token_file, &token).expect("write the token");
    let proxy_port = free_port();
    let mut args = args_of(&pod, injected::AGENT_CONTAINER);
    replace_flag(&mut args, "--xds-token-file", &token_file.display().to_string());
    replace_flag(&mut args, "--http-addr", &format!("127.0.0.1:{}", free_port()));
    replace_flag(&mut args, "--xds-proxy-addr", &format!("127.0.0.1:{proxy_port}"));
    // The pod's downward-API environment, and the loopback ports a pod has to itself.
    args.extend([
        "--pod-name=api-0".to_string(),
        format!("--pod-namespace={ns}"),
        format!("--grpc-addr=127.0.0.1:{}", free_port()),
        format!("--lease-addr=127.0.0.1:{}", free_port()),
    ]);
    let cli = Cli::try_parse_from(std::iter::once("breakwater-agent".to_string()).chain(args.clone()))
        .unwrap_or_else(|err| panic!("the agent refuses the webhook's arguments {args:?}: {err}"));
    let agent = tokio::spawn(breakwater_agent::cli::start(cli, std::future::pending()));

    // Envoy: the node id its bootstrap names once the kubelet has expanded it, through the
    // agent's ADS proxy, as its bootstrap's breakwater_xds cluster says.
    let bootstrap: Value =
        serde_json::from_str(&args_of(&pod, injected::PROXY_CONTAINER)[1]).expect("the bootstrap is JSON");
    let node = bootstrap["node"]["id"]
        .as_str()
        .expect("node id")
        .replace("$(POD_NAMESPACE)", &ns)
        .replace("$(POD_NAME)", "api-0");
    let xds = &bootstrap["static_resources"]["clusters"][0];
    assert_eq!(xds["name"], "breakwater_xds");
    let port = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"]
        .as_u64()
        .expect("port");
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    assert_eq!(port, 15083, "the injected agent serves Envoy's ADS proxy where the bootstrap points");
    // Envoy retries until its agent listens; the stand-in connects once, so wait for that.
    eventually("the agent's ADS proxy listens", DEADLINE, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", proxy_port)).await.map(drop).map_err(|e| e.to_string())
    })
    .await;
    let envoy = tokio::spawn(ads::acknowledging_proxy(proxy.clone(), node));

    eventually("the policy is Programmed from the pod's ACKs", DEADLINE, || async {
        let path = "jsonpath={.status.conditions[?(@.type=='Programmed')]}";
        let out = plane.kubectl_ok(&["get", "rlp", "api-limits", "-n", &ns, "-o", path]);
        let condition: Value = serde_json::from_str(&out).map_err(|_| format!("no Programmed yet: {out}"))?;
        (condition["status"] == "True").then_some(()).ok_or_else(|| condition.to_string())
    })
    .await;

    // Another pod's node id through the same agent (and so with this pod's token): refused.
    let forged = ads::first_answer(&proxy, &format!("{ns}/payments-0"), None).await;
    match forged {
        Err(status) => assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}"),
        Ok(response) => panic!("another pod's configuration was served: {response:?}"),
    }
    envoy.abort();
    agent.abort();
    operator.abort();
    plane.kubectl_ok(&["delete", "mutatingwebhookconfiguration", &configuration]);
}
