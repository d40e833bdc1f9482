//! A real Kubernetes control plane for tests, started the way controller-runtime's envtest
//! starts one: etcd and kube-apiserver as child processes on free loopback ports, built from
//! the pinned Go module in `tests/control-plane` (once, into a cache), with the kubectl of
//! the same release. Nothing below the HTTP API is faked. There is no kubelet, scheduler or
//! controller-manager: Pods stay Pending, nothing garbage-collects, no controller writes
//! EndpointSlices or ServiceAccount tokens — tests create what those would.
//!
//! `BREAKWATER_E2E_KUBECONFIG` points the same suite at an external cluster instead
//! (`make e2e`); then nothing is started.
//!
//! The flags and why each is set are in `docs/testing.md`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::{free_port, process::Daemon, require_program, target_dir, workspace_dir};

/// The user the admin kubeconfig authenticates as (group `system:masters`).
const ADMIN: &str = "breakwater-test-admin";

/// What ServiceAccounts ask of the API server, and the authorizer's decision, is logged, so a
/// test can list the permissions the operator used and any it was refused.
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n\
rules:\n- level: Metadata\n  userGroups: [\"system:serviceaccounts\"]\n- level: None\n";

#[derive(Debug)]
pub struct ControlPlane {
    /// The API server's URL.
    pub server: String,
    /// A kubeconfig with full access (a static token in group `system:masters`).
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
    dir: PathBuf,
    // Local servers (none when the suite runs on an external cluster); etcd is dropped last.
    apiserver: Option<Daemon>,
    etcd: Option<Daemon>,
}

/// A ServiceAccount's token and a kubeconfig that authenticates with it.
#[derive(Debug, Clone)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub token: String,
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// The control plane this test binary shares: started on first use, stopped when the
    /// binary exits. With `BREAKWATER_E2E_KUBECONFIG` set, that cluster instead.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var_os("BREAKWATER_E2E_KUBECONFIG") {
            Some(path) => ControlPlane::external(PathBuf::from(path)),
            None => ControlPlane::start(),
        })
    }

    /// The directory holding kube-apiserver, etcd and kubectl, built by
    /// `tests/control-plane/build.sh` on first use and cached afterwards.
    pub fn binaries() -> PathBuf {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        DIR.get_or_init(|| {
            let script = workspace_dir().join("tests/control-plane/build.sh");
            let out = Command::new(&script)
                .stderr(std::process::Stdio::inherit())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            assert!(out.status.success(), "{} failed (its output is above)", script.display());
            let dir = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
            PathBuf::from(dir)
        })
        .clone()
    }

    /// Starts etcd and kube-apiserver on free loopback ports and waits for `/readyz`.
    pub fn start() -> Self {
        require_program("openssl", "openssl");
        let bin = Self::binaries();
        let dir = fresh_dir();
        certificates(&dir);
        let token = format!("admin-{}", std::process::id());
        write(&dir.join("tokens.csv"), &format!("{token},{ADMIN},{ADMIN},\"system:masters\"\n"));
        write(&dir.join("audit-policy.yaml"), AUDIT_POLICY);

        let (client, peer) = (free_port(), free_port());
        let etcd = Daemon::spawn(
            "etcd",
            bin.join("etcd"),
            &[
                "--name=default".into(),
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls=http://127.0.0.1:{client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
            dir.join("etcd.log"),
        );

        let port = free_port();
        let path = |name: &str| dir.join(name).display().to_string();
        let apiserver = Daemon::spawn(
            "kube-apiserver",
            bin.join("kube-apiserver"),
            &[
                format!("--etcd-servers=http://127.0.0.1:{client}"),
                format!("--secure-port={port}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--tls-cert-file={}", path("server.crt")),
                format!("--tls-private-key-file={}", path("server.key")),
                format!("--client-ca-file={}", path("ca.crt")),
                format!("--token-auth-file={}", path("tokens.csv")),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
                format!("--service-account-key-file={}", path("sa.pub")),
                format!("--service-account-signing-key-file={}", path("sa.key")),
                "--service-cluster-ip-range=10.96.0.0/16".into(),
                "--authorization-mode=RBAC".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
                "--allow-privileged=true".into(),
                "--profiling=false".into(),
                format!("--audit-policy-file={}", path("audit-policy.yaml")),
                format!("--audit-log-path={}", path("audit.log")),
            ],
            dir.join("kube-apiserver.log"),
        );

        let server = format!("https://127.0.0.1:{port}");
        let kubeconfig = dir.join("admin.kubeconfig");
        write(&kubeconfig, &kubeconfig_yaml(&server, &dir.join("ca.crt"), ADMIN, &token));
        let plane = ControlPlane {
            server,
            kubeconfig,
            kubectl: bin.join("kubectl"),
            dir,
            apiserver: Some(apiserver),
            etcd: Some(etcd),
        };
        plane.wait_ready(Duration::from_secs(90));
        plane
    }

    /// An external cluster (`make e2e`): only its kubeconfig and the pinned kubectl.
    fn external(kubeconfig: PathBuf) -> Self {
        let mut plane = ControlPlane {
            server: String::new(),
            kubeconfig,
            kubectl: Self::binaries().join("kubectl"),
            dir: fresh_dir(),
            apiserver: None,
            etcd: None,
        };
        plane.server =
            plane.kubectl_ok(&["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"]);
        plane.wait_ready(Duration::from_secs(30));
        plane
    }

    fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            let out = self.kubectl(&["get", "--raw", "/readyz"]);
            if out.status.success() {
                return;
            }
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if self.apiserver.as_ref().is_some_and(|a| !a.is_running()) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let servers: Vec<String> =
            [&self.etcd, &self.apiserver].into_iter().flatten().map(Daemon::report).collect();
        panic!(
            "the API server at {} was not ready within {within:?}: {last}\n{}",
            self.server,
            servers.join("\n")
        );
    }

    /// Runs the pinned kubectl with the admin kubeconfig.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_as(&self.kubeconfig, args, None)
    }

    /// Runs kubectl with `kubeconfig`, feeding `stdin` when given.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        use std::io::Write;
        let mut command = Command::new(&self.kubectl);
        // A discovery cache of its own: another run's server may have had this port.
        command.env("KUBECONFIG", kubeconfig).env("KUBECACHEDIR", self.dir.join("kubectl-cache"));
        command.args(args).stdout(std::process::Stdio::piped());
        command.stderr(std::process::Stdio::piped()).stdin(std::process::Stdio::piped());
        let mut child =
            command.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", self.kubectl.display()));
        let mut pipe = child.stdin.take().expect("kubectl stdin");
        if let Some(input) = stdin {
            pipe.write_all(input.as_bytes()).expect("write kubectl stdin");
        }
        drop(pipe);
        child.wait_with_output().expect("kubectl output")
    }

    /// Runs kubectl (admin) and returns its stdout; fails the test with stderr when it fails.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Registers MutatingWebhookConfiguration `name`: its webhook `webhook` is called at `url`
    /// (HTTPS; the `caBundle` is left to the webhook's owner to fill) for pods created in the
    /// `namespaces` listed that carry `label` (`key=value`). Listing the namespaces keeps the
    /// webhook away from other tests' namespaces on a shared API server.
    pub fn register_pod_webhook(
        &self,
        name: &str,
        webhook: &str,
        url: &str,
        label: &str,
        namespaces: &[&str],
        failure_policy: &str,
    ) {
        let (key, value) = label.split_once('=').unwrap_or((label, ""));
        let configuration = serde_json::json!({
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "MutatingWebhookConfiguration",
            "metadata": {"name": name},
            "webhooks": [{
                "name": webhook,
                "clientConfig": {"url": url},
                "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
                "namespaceSelector": {
                    "matchLabels": {key: value},
                    "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces}],
                },
                "failurePolicy": failure_policy,
                "sideEffects": "None",
                "admissionReviewVersions": ["v1"],
                "timeoutSeconds": 5,
                "reinvocationPolicy": "IfNeeded",
            }],
        });
        let out = self.kubectl_as(&self.kubeconfig, &["create", "-f", "-"], Some(&configuration.to_string()));
        assert!(out.status.success(), "registering webhook {name}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// The API server's audit log (Metadata of every ServiceAccount request, one JSON event
    /// per line); None on an external cluster.
    pub fn audit_log(&self) -> Option<String> {
        self.apiserver.as_ref()?;
        Some(std::fs::read_to_string(self.dir.join("audit.log")).unwrap_or_default())
    }

    /// Path of the pinned kubectl binary.
    pub fn kubectl_path(&self) -> &Path {
        &self.kubectl
    }

    /// A token for ServiceAccount `namespace/name` from the TokenRequest API (the account
    /// must exist), and a kubeconfig that uses it.
    pub fn service_account(&self, namespace: &str, name: &str) -> ServiceAccount {
        let token =
            self.kubectl_ok(&["create", "token", name, "-n", namespace, "--duration=2h"]).trim().to_string();
        let kubeconfig = self.dir.join(format!("{namespace}.{name}.kubeconfig"));
        let flat = self.kubectl_ok(&["config", "view", "--raw", "--minify", "--flatten"]);
        write(&kubeconfig, &flat);
        let user = format!("system:serviceaccount:{namespace}:{name}");
        let set = |args: &[&str]| {
            let out = self.kubectl_as(&kubeconfig, args, None);
            assert!(
                out.status.success(),
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        set(&["config", "set-credentials", &user, &format!("--token={token}")]);
        set(&["config", "set-context", "--current", &format!("--user={user}")]);
        ServiceAccount { namespace: namespace.into(), name: name.into(), token, kubeconfig }
    }

    /// A token for ServiceAccount `namespace/service_account` bound to Pod `namespace/pod`,
    /// for `audience`, valid for `expiration` — what the kubelet requests for a projected
    /// token volume (TokenRequest with a Pod `boundObjectRef`, name and uid). The pod must
    /// exist and run as that ServiceAccount (`spec.serviceAccountName`); the API server
    /// refuses an expiration under 10 minutes. Such a token dies with its pod.
    pub fn pod_token(
        &self,
        namespace: &str,
        service_account: &str,
        pod: &str,
        audience: &str,
        expiration: Duration,
    ) -> String {
        let uid = self.kubectl_ok(&["get", "pod", pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}"]);
        let duration = format!("--duration={}s", expiration.as_secs());
        self.kubectl_ok(&[
            "create",
            "token",
            service_account,
            "-n",
            namespace,
            "--bound-object-kind=Pod",
            &format!("--bound-object-name={pod}"),
            &format!("--bound-object-uid={}", uid.trim()),
            &format!("--audience={audience}"),
            &duration,
        ])
        .trim()
        .to_string()
    }

    /// The key the API server signs ServiceAccount tokens with (`sa.key`, P-256), as PKCS#8
    /// DER, so a test can sign a token the API server's own checks then judge (one already
    /// expired, say). None on an external cluster, whose key is not ours.
    pub fn service_account_signing_key(&self) -> Option<Vec<u8>> {
        self.apiserver.as_ref()?;
        let der = self.dir.join("sa.pk8");
        if !der.exists() {
            let (key, out) = (self.dir.join("sa.key"), der.display().to_string());
            openssl(&[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                &key.display().to_string(),
                "-outform",
                "DER",
                "-out",
                &out,
            ]);
        }
        Some(std::fs::read(&der).unwrap_or_else(|e| panic!("cannot read {}: {e}", der.display())))
    }

    /// Freezes kube-apiserver (SIGSTOP): connections stay open, nothing is answered — an API
    /// server that hangs. Only for a private plane ([`ControlPlane::start`]): the shared one
    /// serves other tests.
    pub fn pause_apiserver(&self) {
        self.apiserver.as_ref().expect("a local API server").pause();
    }

    pub fn resume_apiserver(&self) {
        self.apiserver.as_ref().expect("a local API server").resume();
    }

    /// Kills kube-apiserver and etcd now (they are also killed when the test binary exits).
    pub fn stop(&mut self) {
        if let Some(mut apiserver) = self.apiserver.take() {
            apiserver.kill();
        }
        if let Some(mut etcd) = self.etcd.take() {
            etcd.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `target/control-plane/<pid>`, after removing the directories of test processes that
/// have exited (a shared control plane lives in a static and is never dropped, and etcd
/// preallocates tens of MB).
fn fresh_dir() -> PathBuf {
    let root = target_dir().join("control-plane");
    if let Ok(entries) = std::fs::read_dir(&root) {
        for entry in entries.flatten() {
            let alive = entry
                .file_name()
                .to_str()
                .and_then(|name| name.split('-').next()?.parse::<u32>().ok())
                .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
            if !alive {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = root.join(format!("{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A CA, the API server's serving certificate for 127.0.0.1 signed by it, and the
/// ServiceAccount token signing key pair (all P-256: quick to make, and rustls takes them).
fn certificates(dir: &Path) {
    let ext = dir.join("server.ext");
    write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    );
    let p = |name: &str| dir.join(name).display().to_string();
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        &[
            &["req", "-x509"],
            &ec[..],
            &["-keyout", &p("ca.key"), "-out", &p("ca.crt"), "-days", "3650"],
            &["-subj", "/CN=breakwater-test-ca", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"],
            &ec[..],
            &["-keyout", &p("server.key"), "-out", &p("server.csr"), "-subj", "/CN=kube-apiserver"],
        ]
        .concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca.crt"),
        "-CAkey",
        &p("ca.key"),
        "-CAcreateserial",
        "-days",
        "3650",
        "-out",
        &p("server.crt"),
        "-extfile",
        &p("server.ext"),
    ]);
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &p("sa.key")]);
    openssl(&["ec", "-in", &p("sa.key"), "-pubout", "-out", &p("sa.pub")]);
}

fn openssl(args: &[&str]) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn kubeconfig_yaml(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\nusers:\n- name: {user}\n  user:\n    token: {token}\ncontexts:\n\
         - name: test\n  context:\n    cluster: test\n    user: {user}\ncurrent-context: test\n",
        ca = ca.display()
    )
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
