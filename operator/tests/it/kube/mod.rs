//! The suite that runs against a real Kubernetes API server: etcd and kube-apiserver built
//! from pinned Go modules and started by the harness (`breakwater_harness::ControlPlane`),
//! or the cluster of `BREAKWATER_E2E_KUBECONFIG` (`make e2e`). It judges what only a real
//! API server judges: the CRDs' schema and CEL rules, server-side apply and field ownership,
//! watches, RBAC, leader election on a real Lease. There is no kubelet or controller-manager:
//! tests create the Pods, Pod status and EndpointSlices those would.
//!
//! Each test owns its namespaces (generated names). Tests that run an operator hold
//! [`OPERATOR`]: every operator watches the whole cluster, so two at once would both write
//! the same status.

mod apply;
mod controller;
mod crds;
mod election;
mod identity;
mod inject;
mod leader;
mod lease_status;
mod live_status;
mod outbox;
mod rbac;
mod status_writes;
mod validation;
mod walkthrough;

use std::{path::Path, sync::OnceLock, time::Duration};

pub use breakwater_harness::eventually;
use breakwater_harness::{ControlPlane, Daemon, free_port};
use kube::Client;

pub use crate::support::cluster::client;
use crate::support::cluster::install_crds;

/// Held by every test that runs an operator (see the module comment).
pub static OPERATOR: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a test waits for what a reconcile or a watch should bring about.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The shared control plane, with the CRDs from `crds/yaml` installed (once, with the pinned
/// kubectl) and Established.
pub fn plane() -> &'static ControlPlane {
    static CRDS: OnceLock<()> = OnceLock::new();
    let plane = ControlPlane::shared();
    CRDS.get_or_init(|| install_crds(plane));
    plane
}

/// A client with the admin kubeconfig.
pub async fn admin() -> Client {
    client(&plane().kubeconfig).await
}

/// Creates a namespace with a name no other test uses, labelled `labels` (`k=v,...`).
pub fn namespace(name: &str, labels: &[&str]) -> String {
    let name = breakwater_harness::unique_prefix(name);
    let plane = plane();
    plane.kubectl_ok(&["create", "namespace", &name]);
    if !labels.is_empty() {
        plane.kubectl_ok(&[&["label", "namespace", &name][..], labels].concat());
    }
    name
}

/// Applies YAML with kubectl (server-side, the admin's field manager), in `namespace`.
pub fn kubectl_apply(namespace: &str, yaml: &str) -> String {
    let plane = plane();
    let out = plane.kubectl_as(
        &plane.kubeconfig,
        &["apply", "--server-side", "-n", namespace, "-f", "-"],
        Some(yaml),
    );
    assert!(out.status.success(), "kubectl apply failed: {}\n{yaml}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An operator (the library's `run`, as the binary runs it) in this process, stopped when
/// dropped or by [`Operator::stop`].
pub struct Operator {
    pub xds_port: u16,
    pub metrics_port: u16,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<breakwater_operator::error::Result<()>>>,
}

impl Operator {
    /// Runs an operator with `root` as its root namespace and no leader election.
    pub fn start(client: Client, root: &str) -> Self {
        Self::start_with(client, root, |_| {})
    }

    /// [`Operator::start`] with options changed by `configure` (ports are already chosen).
    pub fn start_with(
        client: Client,
        root: &str,
        configure: impl FnOnce(&mut breakwater_operator::run::Options),
    ) -> Self {
        let (xds_port, metrics_port) = (free_port(), free_port());
        let mut options = breakwater_operator::run::Options {
            root_namespace: root.into(),
            metrics_addr: ([127, 0, 0, 1], metrics_port).into(),
            xds_addr: ([127, 0, 0, 1], xds_port).into(),
            webhook: None,
            relays: Default::default(),
            leader_election_namespace: None,
            identity: "kube-test".into(),
            pod: None,
            redis: None,
            xds_token_audience: breakwater_operator::xds::DEFAULT_AUDIENCE.into(),
        };
        configure(&mut options);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(breakwater_operator::run::run(client, options, async move {
            let _ = stopped.await;
        }));
        Operator { xds_port, metrics_port, stop: Some(stop), task: Some(task) }
    }

    /// The endpoint of its ADS server.
    pub fn xds_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.xds_port)
    }

    /// What it answers on `path` of its metrics port (None while it does not answer). Async:
    /// the operator runs on the test's own runtime, so a blocking read would starve it.
    pub async fn get(&self, path: &str) -> Option<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        let read = stream.read_to_string(&mut response);
        tokio::time::timeout(Duration::from_secs(5), read).await.ok()?.ok()?;
        let (_, body) = response.split_once("\r\n\r\n")?;
        Some(body.to_string())
    }

    /// The value of one sample line of its /metrics (0 when absent: counters start absent).
    pub async fn metric(&self, sample: &str) -> f64 {
        metric(&self.get("/metrics").await.unwrap_or_default(), sample).unwrap_or(0.0)
    }

    /// Stops the operator and fails the test if it stopped with an error.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("operator task").expect("operator stops cleanly");
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The `breakwater-operator run` binary as a process, with `kubeconfig`'s credentials.
pub struct OperatorProcess {
    pub metrics_port: u16,
    pub xds_port: u16,
    pub daemon: Daemon,
    _dir: tempfile::TempDir,
}

impl OperatorProcess {
    /// Starts the binary with root namespace `root`, electing a leader with a Lease in
    /// `leader_namespace` when given — as the chart runs it, in a pod named `identity` in that
    /// namespace, which it labels while it leads (create the pod with [`pod`] to see it).
    pub fn start(kubeconfig: &Path, identity: &str, root: &str, leader_namespace: Option<&str>) -> Self {
        Self::start_with_args(kubeconfig, identity, root, leader_namespace, &[])
    }

    /// [`OperatorProcess::start`] with more `run` flags.
    pub fn start_with_args(
        kubeconfig: &Path,
        identity: &str,
        root: &str,
        leader_namespace: Option<&str>,
        extra: &[String],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let (metrics_port, xds_port) = (free_port(), free_port());
        let mut args = vec![
            "run".to_string(),
            format!("--root-namespace={root}"),
            format!("--metrics-addr=127.0.0.1:{metrics_port}"),
            format!("--xds-addr=127.0.0.1:{xds_port}"),
            format!("--identity={identity}"),
        ];
        match leader_namespace {
            Some(ns) => args.extend([
                format!("--leader-election-namespace={ns}"),
                format!("--pod-name={identity}"),
                format!("--pod-namespace={ns}"),
            ]),
            None => args.push("--leader-election=false".into()),
        }
        args.extend_from_slice(extra);
        let daemon = Daemon::spawn_with_env(
            identity,
            env!("CARGO_BIN_EXE_breakwater-operator"),
            &args,
            &[("KUBECONFIG", &kubeconfig.display().to_string()), ("RUST_LOG", "info")],
            dir.path().join("operator.log"),
        );
        OperatorProcess { metrics_port, xds_port, daemon, _dir: dir }
    }

    /// What the process answers on /readyz (None while it does not answer).
    pub fn readiness(&self) -> Option<String> {
        http_get(self.metrics_port, "/readyz")
    }

    /// The Prometheus text the process serves on /metrics (empty while it does not answer).
    pub fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").unwrap_or_default()
    }

    /// The value of one sample line of /metrics, e.g. `breakwater_leader`.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        metric(&self.metrics(), sample)
    }
}

/// The value of the sample line `sample` (name and labels, e.g. `breakwater_leader`) in
/// Prometheus text.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(sample)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Creates a Pod `name` in `namespace` (no kubelet runs it: it stands for the pod an operator
/// process runs in).
pub fn pod(namespace: &str, name: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec: {{containers: [{{name: operator, image: breakwater}}]}}\n"
    );
    kubectl_apply(namespace, &yaml);
}

/// Creates ServiceAccount `service_account` (if missing) and a Pod `name` running as it in
/// `namespace`, labelled `labels` (`k: v, ...`): what a controller-manager and the
/// ServiceAccount admission plugin would ensure, so a token can be bound to the pod
/// ([`breakwater_harness::ControlPlane::pod_token`]). No kubelet runs it.
pub fn pod_with_account(namespace: &str, name: &str, service_account: &str, labels: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {service_account}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n\
         spec: {{serviceAccountName: {service_account}, containers: [{{name: app, image: example/app:1}}]}}\n"
    );
    kubectl_apply(namespace, &yaml);
}

/// The value of the label the leader puts on its pod to draw the ADS streams
/// (`breakwater_operator::serving::LABEL`), if the pod has it.
pub fn serving_label(namespace: &str, pod: &str) -> Option<String> {
    let path =
        format!("jsonpath={{.metadata.labels.{}}}", breakwater_operator::serving::LABEL.replace('.', "\\."));
    let value = plane().kubectl_ok(&["get", "pod", pod, "-n", namespace, "-o", &path]);
    Some(value.trim().to_string()).filter(|v| !v.is_empty())
}

/// A plain HTTP/1.0 GET on loopback; the body, or None when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (_, body) = response.split_once("\r\n\r\n")?;
    Some(body.to_string())
}
