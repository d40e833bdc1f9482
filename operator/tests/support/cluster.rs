//! A real API server as the tests see it: the CRDs installed from `crds/yaml` (Established,
//! and their OpenAPI published, which `kubectl explain` and server-side apply read), and a
//! kube client for a kubeconfig. Shared by the real-API-server suite, the workspace tests and
//! `make bench-inject` (through `#[path]`).

use std::{path::Path, time::Duration};

use breakwater_harness::ControlPlane;
use kube::{
    Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
};

/// Installs the CRDs with the pinned kubectl (server-side apply) and waits until the API
/// server serves them.
pub fn install_crds(plane: &ControlPlane) {
    // Both packages that include this file (operator, tests) sit beside crds/.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds/yaml");
    plane.kubectl_ok(&["apply", "--server-side", "-f", &dir.display().to_string()]);
    plane.kubectl_ok(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/circuitbreakerpolicies.breakwater.dev",
        "crd/ratelimitpolicies.breakwater.dev",
        "crd/lockleases.breakwater.dev",
        "crd/outboxrelays.breakwater.dev",
    ]);
    // The OpenAPI document follows a moment after Established.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for kind in ["circuitbreakerpolicy", "ratelimitpolicy", "locklease", "outboxrelay"] {
        while !plane.kubectl(&["explain", kind]).status.success() {
            assert!(
                std::time::Instant::now() < deadline,
                "the OpenAPI of {kind} was not published within 60s"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A client for `kubeconfig`, with the operator's TLS provider installed.
pub async fn client(kubeconfig: &Path) -> Client {
    breakwater_operator::run::install_tls_provider();
    let config = Kubeconfig::read_from(kubeconfig)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", kubeconfig.display()));
    let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|err| panic!("bad kubeconfig {}: {err}", kubeconfig.display()));
    Client::try_from(config).expect("a client from the kubeconfig")
}
