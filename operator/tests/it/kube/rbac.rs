//! The operator binary with exactly the RBAC the Helm chart grants: the chart's
//! ServiceAccount, roles and bindings (from its default render, `make chart-render`) are
//! applied, and `breakwater-operator run` authenticates with a token of that ServiceAccount
//! (TokenRequest API), as it would in a pod. It reconciles one resource of each kind and
//! serves an ADS stream that presents its pod's token (a TokenReview); with the chart's
//! webhook flags it issues the webhook's certificate into the chart's Secret, gives the CA to
//! the chart's MutatingWebhookConfiguration (registered here by URL on loopback) and injects
//! a pod. Any request the API server refuses fails the test. The API server's audit log then says
//! which granted permissions the operator used, and the test lists the ones it never did.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use breakwater_operator::xds::DEFAULT_AUDIENCE;
use serde_json::Value;

use super::{
    DEADLINE, OPERATOR, OperatorProcess, eventually, kubectl_apply, namespace, plane, pod, serving_label,
};
use crate::support::ads::first_answer;

/// Where `make chart-render` writes the chart's default render.
fn rendered() -> Vec<Value> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/chart/default.yaml");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!("cannot read {} ({e}): run `make chart-render` (make test does) first", path.display())
    });
    text.split("\n---\n")
        .filter_map(|doc| serde_saphyr::from_str::<Option<Value>>(doc).expect("the render is YAML"))
        .collect()
}

/// (apiGroup, resource, verb) triples a set of PolicyRules grants.
fn granted(docs: &[Value]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for doc in docs.iter().filter(|d| d["kind"] == "ClusterRole" || d["kind"] == "Role") {
        for rule in doc["rules"].as_array().into_iter().flatten() {
            let list = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        out.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    out
}

/// What `user` asked for in the audit log: (apiGroup, resource[/subresource], verb, decision).
/// A server-side apply that creates its object (a `patch` answered 201 Created) is
/// authorized as `create` too, and is counted as both.
fn requests(audit: &str, user: &str) -> BTreeSet<(String, String, String, String)> {
    audit
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["user"]["username"] == user && event["objectRef"].is_object())
        .flat_map(|event| {
            let object = &event["objectRef"];
            let resource = match object["subresource"].as_str() {
                Some(sub) => format!("{}/{sub}", object["resource"].as_str().unwrap_or_default()),
                None => object["resource"].as_str().unwrap_or_default().to_string(),
            };
            let decision = event["annotations"]["authorization.k8s.io/decision"].as_str().unwrap_or("?");
            let verb = event["verb"].as_str().unwrap_or_default();
            let created = verb == "patch" && event["responseStatus"]["code"] == 201;
            let verbs = if created { vec![verb, "create"] } else { vec![verb] };
            let group = object["apiGroup"].as_str().unwrap_or_default().to_string();
            verbs
                .into_iter()
                .map(|verb| (group.clone(), resource.clone(), verb.to_string(), decision.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// How many watches `user` opened, by resource (one audit ID per request; a watch is logged
/// when its response starts and again when it ends).
fn watches(audit: &str, user: &str) -> BTreeMap<String, usize> {
    let ids: BTreeSet<(String, String)> = audit
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["user"]["username"] == user && event["verb"] == "watch")
        .map(|event| {
            let resource = event["objectRef"]["resource"].as_str().unwrap_or_default().to_string();
            (resource, event["auditID"].as_str().unwrap_or_default().to_string())
        })
        .collect();
    let mut counts = BTreeMap::new();
    for (resource, _) in ids {
        *counts.entry(resource).or_default() += 1;
    }
    counts
}

/// One resource of each kind and what they refer to, in one namespace.
const WORLD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api, labels: {app: api}}
spec: {selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: api}
---
apiVersion: v1
kind: Pod
metadata: {name: api-0, labels: {app: api}}
spec:
  serviceAccountName: api
  containers: [{name: api, image: example/api:1, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-abc, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints: [{addresses: [10.0.0.5], targetRef: {kind: Pod, name: api-0}}]
---
apiVersion: v1
kind: Secret
metadata: {name: orders-db}
stringData: {url: "postgres://relay@db/orders"}
---
apiVersion: breakwater.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: limits}
spec:
  targetRefs: [{kind: Service, name: api}]
  limits: [{name: all, rate: {requests: 10, per: 1s}}]
---
apiVersion: breakwater.dev/v1alpha1
kind: CircuitBreakerPolicy
metadata: {name: breaker}
spec:
  targetRefs: [{kind: Service, name: api}]
  connectionLimits: {maxConnections: 100}
---
apiVersion: breakwater.dev/v1alpha1
kind: LockLease
metadata: {name: lock}
spec: {ttl: 30s, podSelector: {matchLabels: {app: api}}}
---
apiVersion: breakwater.dev/v1alpha1
kind: OutboxRelay
metadata: {name: orders}
spec:
  source: {postgres: {connectionSecretRef: {name: orders-db, key: url}, table: outbox}}
  sink: {redisStream: {stream: events}}
"#;

#[tokio::test]
async fn the_operator_runs_with_exactly_the_charts_rbac() {
    let _one_operator = OPERATOR.lock().await;
    let plane = plane();
    let docs = rendered();
    let rbac_kinds = ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];
    let rbac: Vec<&Value> = docs.iter().filter(|d| rbac_kinds.iter().any(|k| d["kind"] == *k)).collect();
    assert_eq!(rbac.len(), rbac_kinds.len(), "the chart renders one of each RBAC kind");
    let account = rbac.iter().find(|d| d["kind"] == "ServiceAccount").expect("a ServiceAccount");
    let (sa_namespace, sa_name) = (
        account["metadata"]["namespace"].as_str().expect("namespace"),
        account["metadata"]["name"].as_str().expect("name"),
    );
    let ns_yaml = format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {sa_namespace}}}\n");
    let out = plane.kubectl_as(&plane.kubeconfig, &["apply", "-f", "-"], Some(&ns_yaml));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifest: Vec<String> = rbac.iter().map(|d| serde_json::to_string(d).expect("JSON")).collect();
    let out = plane.kubectl_as(&plane.kubeconfig, &["apply", "-f", "-"], Some(&manifest.join("\n")));
    assert!(out.status.success(), "applying the chart's RBAC: {}", String::from_utf8_lossy(&out.stderr));
    let account = plane.service_account(sa_namespace, sa_name);
    let user = format!("system:serviceaccount:{sa_namespace}:{sa_name}");

    // Run as the chart does: root and leader-election namespace are the release namespace,
    // in a pod of its own there (which it labels once it leads).
    let ns = namespace("rbac", &[]);
    let injected = namespace("rbac-inject", &["breakwater.dev/inject=enabled"]);
    pod(sa_namespace, "rbac-test");
    let webhook = ChartWebhook::register(&docs, &injected);
    let operator = OperatorProcess::start_with_args(
        &account.kubeconfig,
        "rbac-test",
        sa_namespace,
        Some(sa_namespace),
        &webhook.flags,
    );
    eventually("the operator issues the webhook's CA and certificate", DEADLINE, || async {
        webhook
            .ca_bundle_set()
            .then_some(())
            .ok_or_else(|| format!("no caBundle yet\n{}", operator.daemon.log()))
    })
    .await;
    let pod_yaml = "apiVersion: v1\nkind: Pod\nmetadata: {name: app}\n\
                    spec: {serviceAccountName: default, containers: [{name: app, image: example/app:1}]}\n";
    let stored = plane.kubectl_as(
        &plane.kubeconfig,
        &["create", "-n", &injected, "-o", "json", "-f", "-"],
        Some(pod_yaml),
    );
    assert!(stored.status.success(), "{}", String::from_utf8_lossy(&stored.stderr));
    let stored: Value = serde_json::from_slice(&stored.stdout).expect("a pod");
    assert_eq!(stored["spec"]["initContainers"].as_array().map(Vec::len), Some(3), "injected: {stored}");
    kubectl_apply(&ns, WORLD);
    for kind in ["rlp/limits", "cbp/breaker", "ll/lock", "outbox/orders"] {
        eventually(&format!("{kind} has status written by the operator"), DEADLINE, || async {
            let json = plane.kubectl_ok(&["get", kind, "-n", &ns, "-o", "json"]);
            let object: Value = serde_json::from_str(&json).map_err(|e| e.to_string())?;
            let accepted = object["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Accepted" && c["observedGeneration"] == 1);
            if accepted {
                Ok(())
            } else {
                Err(format!("{}\noperator log:\n{}", object["status"], operator.daemon.log()))
            }
        })
        .await;
    }
    eventually("the operator published Events", DEADLINE, || async {
        let events = plane.kubectl_ok(&["get", "events.events.k8s.io", "-n", &ns, "-o", "name"]);
        if events.lines().count() >= 4 { Ok(()) } else { Err(events) }
    })
    .await;
    assert_eq!(
        serving_label(sa_namespace, "rbac-test").as_deref(),
        Some("true"),
        "the leader labels its pod"
    );
    // A proxy of api-0 connects with its pod's token: the operator reviews it (TokenReview).
    let token = plane.pod_token(&ns, "api", "api-0", DEFAULT_AUDIENCE, Duration::from_secs(3600));
    let endpoint = format!("http://127.0.0.1:{}", operator.xds_port);
    if let Err(status) = first_answer(&endpoint, &format!("{ns}/api-0"), Some(&token)).await {
        panic!("the pod's stream was refused: {status:?}\noperator log:\n{}", operator.daemon.log());
    }
    let reviewed = operator.metric("breakwater_xds_token_reviews_total{outcome=\"authenticated\"}");
    assert_eq!(reviewed, Some(1.0), "one TokenReview, which vouched for the pod");
    // SIGTERM: the operator releases its Lease, unlabels its pod and stops, as on a rolling
    // update.
    operator.daemon.signal("TERM");
    eventually("the operator exits on SIGTERM", DEADLINE, || async {
        if operator.daemon.is_running() { Err("still running".to_string()) } else { Ok(()) }
    })
    .await;
    assert_eq!(serving_label(sa_namespace, "rbac-test"), None, "a stopped leader draws no ADS streams");
    webhook.unregister();

    let log = operator.daemon.log();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("forbidden") || l.contains("Forbidden") || l.contains("403"))
        .collect();
    assert!(refused.is_empty(), "the API server refused the operator:\n{}", refused.join("\n"));

    let Some(audit) = plane.audit_log() else {
        eprintln!("external cluster: no audit log, so unused permissions are not listed");
        return;
    };
    // One watch per kind, shared by the four controllers and the xDS feed (they used to open
    // their own: Services and Namespaces were watched five times).
    let watched = watches(&audit, &user);
    let once: BTreeMap<String, usize> = [
        "circuitbreakerpolicies",
        "endpointslices",
        "lockleases",
        "namespaces",
        "outboxrelays",
        "pods",
        "ratelimitpolicies",
        "services",
    ]
    .into_iter()
    .map(|resource| (resource.to_string(), 1))
    .collect();
    assert_eq!(watched, once, "each kind is watched once");
    let asked = requests(&audit, &user);
    let forbidden: Vec<_> = asked.iter().filter(|(.., decision)| decision != "allow").collect();
    assert!(forbidden.is_empty(), "requests the chart's RBAC does not allow: {forbidden:#?}");
    let used: BTreeSet<(String, String, String)> =
        asked.into_iter().map(|(group, resource, verb, _)| (group, resource, verb)).collect();
    let unused: Vec<String> = granted(&docs)
        .difference(&used)
        .map(|(group, resource, verb)| format!("{verb} {resource}.{group}"))
        .collect();
    eprintln!("granted but not used in this run: {unused:#?}");
    assert_eq!(
        unused, UNUSED,
        "the set of granted-but-unused permissions changed: update UNUSED and docs/operations.md"
    );
}

/// Granted permissions this run does not exercise, each for a reason (docs/operations.md):
/// kube's event Recorder patches an Event only when the same one repeats within its series
/// window; the webhook's Secret is updated only when its certificate is renewed (a third of
/// 90 days left) or the Service's names change — kube/inject.rs renews with short lifetimes;
/// a relay's Deployment is deleted only when its OutboxRelay stops being accepted —
/// kube/outbox.rs edits one into a refused spec. (The OutboxRelay of the WORLD is accepted:
/// its Deployment is read, and created by a server-side apply, which needs `create`.)
const UNUSED: [&str; 3] = ["update secrets.", "delete deployments.apps", "patch events.events.k8s.io"];

/// The chart's webhook, run as the chart runs it: its `run` flags (but the address, and the
/// certificate's name, which must be the loopback address the API server calls here), its
/// ConfigMap's injection configuration, its MutatingWebhookConfiguration under its own name
/// (the RBAC names it) but called by URL and only for this test's namespace.
struct ChartWebhook {
    flags: Vec<String>,
    configuration: String,
    _dir: tempfile::TempDir,
}

impl ChartWebhook {
    fn register(docs: &[Value], namespace: &str) -> Self {
        let plane = plane();
        let kind = |kind: &str| {
            docs.iter().find(|d| d["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in the render"))
        };
        let args: Vec<&str> = kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let after = |flag: &str| {
            let at =
                args.iter().position(|a| *a == flag).unwrap_or_else(|| panic!("the chart passes no {flag}"));
            args[at + 1].to_string()
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("inject.yaml");
        let data = kind("ConfigMap")["data"]["inject.yaml"].as_str().expect("inject.yaml in the ConfigMap");
        std::fs::write(&config, data).expect("write inject.yaml");
        let secret = after("--webhook-cert-secret");
        let configuration = after("--webhook-configuration");
        let port = breakwater_harness::free_port();
        let flags = vec![
            format!("--webhook-addr=127.0.0.1:{port}"),
            format!("--inject-config={}", config.display()),
            format!("--webhook-cert-secret={secret}"),
            format!("--webhook-configuration={configuration}"),
            "--webhook-dns-names=127.0.0.1".to_string(),
        ];
        // A Secret left by an earlier run on this plane would make the operator update, not create.
        let _ =
            plane.kubectl(&["delete", "secret", &secret, "-n", "breakwater-system", "--ignore-not-found"]);
        let mut webhook = kind("MutatingWebhookConfiguration").clone();
        let hook = &mut webhook["webhooks"][0];
        hook["clientConfig"] = serde_json::json!({"url": format!("https://127.0.0.1:{port}/inject")});
        hook["namespaceSelector"]["matchExpressions"] = serde_json::json!([{"key": "kubernetes.io/metadata.name", "operator": "In", "values": [namespace]}]);
        let out = plane.kubectl_as(&plane.kubeconfig, &["apply", "-f", "-"], Some(&webhook.to_string()));
        assert!(
            out.status.success(),
            "registering the chart's webhook: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ChartWebhook { flags, configuration, _dir: dir }
    }

    fn ca_bundle_set(&self) -> bool {
        let path = "jsonpath={.webhooks[0].clientConfig.caBundle}";
        let out = plane().kubectl(&["get", "mutatingwebhookconfiguration", &self.configuration, "-o", path]);
        out.status.success() && !out.stdout.is_empty()
    }

    fn unregister(&self) {
        plane().kubectl_ok(&["delete", "mutatingwebhookconfiguration", &self.configuration]);
    }
}
