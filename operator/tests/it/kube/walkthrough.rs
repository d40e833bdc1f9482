//! The README's walk-through, replayed with the pinned kubectl against the real API server
//! and an operator: apply the examples, read `kubectl get` and `kubectl describe` (the
//! README's own text blocks are compared with what the server prints), then watch the
//! conditions follow edits, a deleted and recreated target, a relabelled Namespace, and the
//! example pods' proxies acknowledging over ADS, each presenting its pod's token
//! (`Programmed`).

use std::path::{Path, PathBuf};

use breakwater_operator::{standalone::load, xds::DEFAULT_AUDIENCE};
use serde_json::Value;

use super::{DEADLINE, OPERATOR, Operator, admin, eventually, plane};

const ROOT: &str = "breakwater-system";

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn kubectl(args: &[&str]) -> String {
    plane().kubectl_ok(args)
}

/// The `text` block that follows the first line of the README containing `marker`.
fn readme_block(marker: &str) -> String {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md"))
        .expect("README.md");
    let after = &readme[readme.find(marker).unwrap_or_else(|| panic!("README lacks {marker:?}"))..];
    let start = after.find("```text\n").expect("a text block after the marker") + "```text\n".len();
    let end = after[start..].find("```").expect("the block ends");
    after[start..start + end].to_string()
}

/// A condition of a policy as the server stores it.
fn condition(kind: &str, namespace: &str, name: &str, type_: &str) -> Result<Value, String> {
    let object: Value = serde_json::from_str(&kubectl(&["get", kind, name, "-n", namespace, "-o", "json"]))
        .map_err(|e| e.to_string())?;
    let conditions = object["status"]["conditions"].as_array().cloned().unwrap_or_default();
    conditions
        .into_iter()
        .find(|c| c["type"] == type_)
        .map(|mut c| {
            c["generation"] = object["metadata"]["generation"].clone();
            c
        })
        .ok_or_else(|| format!("no {type_} condition yet: {}", object["status"]))
}

async fn wait_condition(
    kind: &str,
    namespace: &str,
    name: &str,
    type_: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let what = format!("{kind} {namespace}/{name} {type_}");
    eventually(&what, DEADLINE, || async {
        let c = condition(kind, namespace, name, type_)?;
        if want(&c) { Ok(c) } else { Err(c.to_string()) }
    })
    .await
}

/// Whitespace-separated words of each line, with timestamps and ages (`5s`, `2m10s`) dropped.
fn lines_without_times(text: &str) -> Vec<String> {
    let age = |w: &str| {
        w.starts_with(|c: char| c.is_ascii_digit())
            && w.ends_with(['d', 'h', 'm', 's'])
            && w.chars().all(|c| c.is_ascii_digit() || "dhms".contains(c))
    };
    text.lines()
        .filter(|l| !l.contains("Last Transition Time") && !l.trim().is_empty())
        .map(|l| l.split_whitespace().filter(|w| !age(w)).collect::<Vec<_>>().join(" "))
        .collect()
}

#[tokio::test]
async fn the_readme_walk_through_on_a_real_api_server() {
    let _one_operator = OPERATOR.lock().await;
    let client = admin().await;
    let operator = Operator::start(client, ROOT);

    // The README's commands, verbatim (run from the repository root), then the rest of the
    // examples and the workloads (which the kubelet and the EndpointSlice controller would
    // make in a cluster).
    let root = examples().join("..");
    let in_root = |args: &[&str]| {
        let out = std::process::Command::new(plane().kubectl_path())
            .current_dir(&root)
            .env("KUBECONFIG", &plane().kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs");
        assert!(out.status.success(), "kubectl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    in_root(&["apply", "-f", "examples/00-namespaces-and-services.yaml"]);
    in_root(&["apply", "-f", "examples/rate-limit-per-user.yaml"]);
    // The example pods run as their namespace's `default` ServiceAccount, as the
    // controller-manager and the ServiceAccount admission plugin would have them (neither
    // runs here), so that their proxies' tokens can be bound to them: create them so before
    // `kubectl apply` meets them.
    let loaded = load::load_dir(&examples(), ROOT).expect("examples load");
    for (name, pod) in &loaded.inventory.pods {
        let mut pod = serde_json::to_value(pod.as_ref()).expect("a Pod as JSON");
        pod["spec"]["serviceAccountName"] = "default".into();
        let account = serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": name.namespace},
        });
        // `create`, not `apply`: no last-applied record, or the examples' apply would try to
        // remove the (immutable) serviceAccountName their files do not set.
        for object in [account, pod] {
            let out =
                plane().kubectl_as(&plane().kubeconfig, &["create", "-f", "-"], Some(&object.to_string()));
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() || stderr.contains("AlreadyExists"), "{object}: {stderr}");
        }
    }
    in_root(&["apply", "-f", "examples/"]);

    // kubectl get: the README's columns and values (AGE aside).
    let expected = readme_block("kubectl get rlp -n shop");
    let got = eventually("kubectl get rlp -n shop shows the README's row", DEADLINE, || async {
        let got = in_root(&["get", "rlp", "-n", "shop"]);
        let strip_age = |t: &str| -> Vec<String> {
            t.lines().map(|l| l.split_whitespace().take(4).collect::<Vec<_>>().join(" ")).collect()
        };
        if strip_age(&got) == strip_age(&expected) { Ok(got) } else { Err(got) }
    })
    .await;
    assert!(got.starts_with("NAME"), "{got}");

    // Programmed: the example pods' proxies connect to the operator's ADS server, each with
    // its pod's token, and ACK.
    let endpoint = format!("http://127.0.0.1:{}", operator.xds_port);
    for pod in loaded.inventory.pods.keys() {
        let lifetime = std::time::Duration::from_secs(3600);
        let token = plane().pod_token(&pod.namespace, "default", &pod.name, DEFAULT_AUDIENCE, lifetime);
        let proxy =
            crate::support::ads::acknowledging_proxy_with_token(endpoint.clone(), pod.to_string(), token);
        tokio::spawn(proxy);
    }
    for (kind, namespace, name) in [
        ("rlp", "shop", "api-per-user"),
        ("rlp", ROOT, "production-floor"),
        ("cbp", "shop", "payments"),
        ("cbp", ROOT, "production-defaults"),
        ("ll", "billing", "invoice-run"),
    ] {
        let c = wait_condition(kind, namespace, name, "Programmed", |c| c["status"] == "True").await;
        let message = c["message"].as_str().unwrap_or_default();
        assert!(message.starts_with("acknowledged by "), "{kind} {name}: {message}");
    }

    // kubectl describe: the README's Status and Events, line for line (times aside).
    let describe = eventually("kubectl describe shows the README's events", DEADLINE, || async {
        let text = in_root(&["describe", "rlp", "api-per-user", "-n", "shop"]);
        if text.contains("Accepted is True") { Ok(text) } else { Err(text) }
    })
    .await;
    let status = &describe[describe.find("Status:").expect("describe has Status")..];
    let described = lines_without_times(status);
    for line in lines_without_times(&readme_block("laid out as\n`kubectl describe` prints it")) {
        assert!(
            described.iter().any(|d| d == &line),
            "kubectl describe lacks the README's line {line:?}:\n{status}"
        );
    }

    // Edit the policy: the generation moves and every condition follows it.
    let before = wait_condition("rlp", "shop", "api-per-user", "Accepted", |_| true).await;
    let generation = before["generation"].as_i64().expect("generation");
    kubectl(&[
        "patch",
        "rlp",
        "api-per-user",
        "-n",
        "shop",
        "--type=json",
        "-p",
        r#"[{"op": "replace", "path": "/spec/limits/0/rate/requests", "value": 50}]"#,
    ]);
    for type_ in ["Accepted", "ResolvedRefs", "Programmed"] {
        wait_condition("rlp", "shop", "api-per-user", type_, |c| {
            c["observedGeneration"].as_i64() == Some(generation + 1)
                && c["generation"].as_i64() == Some(generation + 1)
        })
        .await;
    }

    // Delete the target Service: TargetNotFound; recreate it: resolved again.
    let service = kubectl(&["get", "service", "api", "-n", "shop", "-o", "yaml"]);
    kubectl(&["delete", "service", "api", "-n", "shop"]);
    let gone =
        wait_condition("rlp", "shop", "api-per-user", "ResolvedRefs", |c| c["status"] == "False").await;
    assert_eq!(gone["reason"], "TargetNotFound", "{gone}");
    in_root(&["apply", "-f", "examples/00-namespaces-and-services.yaml"]);
    drop(service);
    wait_condition("rlp", "shop", "api-per-user", "ResolvedRefs", |c| c["status"] == "True").await;

    // Relabel a Namespace: the root policy's targets follow (the Namespace watch).
    let targets = |c: &Value| c["message"].as_str().unwrap_or_default().to_string();
    let all =
        wait_condition("rlp", ROOT, "production-floor", "Accepted", |c| targets(c).contains("all 4")).await;
    kubectl(&["label", "namespace", "billing", "breakwater.dev/tier-"]);
    let fewer =
        wait_condition("rlp", ROOT, "production-floor", "Accepted", |c| !targets(c).contains("all 4")).await;
    assert_ne!(targets(&all), targets(&fewer));
    kubectl(&["label", "namespace", "billing", "breakwater.dev/tier=production"]);
    wait_condition("rlp", ROOT, "production-floor", "Accepted", |c| targets(c).contains("all 4")).await;

    operator.stop().await;
}
