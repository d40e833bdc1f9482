//! Server-side apply for real: the operator owns `status` under its field manager, the
//! writers of `spec` own `spec`, and neither ever conflicts with the other (the in-memory fake
//! merged patches and kept no field ownership, so it could not show this).

use breakwater_operator::controller::FIELD_MANAGER;
use serde_json::Value;

use super::{DEADLINE, OPERATOR, Operator, admin, eventually, kubectl_apply, namespace, plane};

fn policy(requests: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: api}}\nspec: {{ports: [{{name: http, port: 80}}]}}\n---\n\
         apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {{name: limits}}\nspec:\n  \
         targetRefs: [{{kind: Service, name: api}}]\n  limits:\n  - {{name: all, rate: {{requests: {requests}, per: 1s}}}}\n"
    )
}

fn get(namespace: &str) -> Value {
    let json =
        plane().kubectl_ok(&["get", "rlp", "limits", "-n", namespace, "-o", "json", "--show-managed-fields"]);
    serde_json::from_str(&json).expect("kubectl prints JSON")
}

/// The managed-fields entries of `manager`: (subresource, owned top-level fields).
fn owned_by(object: &Value, manager: &str) -> Vec<(String, Vec<String>)> {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|entry| entry["manager"] == manager)
        .map(|entry| {
            let fields =
                entry["fieldsV1"].as_object().map(|f| f.keys().cloned().collect()).unwrap_or_default();
            (entry["subresource"].as_str().unwrap_or_default().to_string(), fields)
        })
        .collect()
}

fn observed(object: &Value) -> Option<i64> {
    object["status"]["conditions"].as_array()?.iter().map(|c| c["observedGeneration"].as_i64()).min()?
}

#[tokio::test]
async fn status_and_spec_have_separate_owners_and_never_conflict() {
    let _one_operator = OPERATOR.lock().await;
    let ns = namespace("apply", &[]);
    let operator = Operator::start(admin().await, &namespace("apply-root", &[]));

    kubectl_apply(&ns, &policy(10));
    let first = eventually("the operator writes status", DEADLINE, || async {
        let object = get(&ns);
        if observed(&object) == Some(1) { Ok(object) } else { Err(object["status"].to_string()) }
    })
    .await;
    let operator_fields = owned_by(&first, FIELD_MANAGER);
    assert_eq!(
        operator_fields,
        vec![("status".to_string(), vec!["f:status".to_string()])],
        "the operator owns status, through the status subresource, and nothing else"
    );
    let kubectl_fields = owned_by(&first, "kubectl");
    assert!(
        kubectl_fields
            .iter()
            .all(|(sub, fields)| sub.is_empty() && !fields.contains(&"f:status".to_string())),
        "the spec writer owns no status: {kubectl_fields:?}"
    );

    // The spec writer applies again, with a change, without forcing: no conflict with the
    // operator's status, and the operator follows the new generation.
    kubectl_apply(&ns, &policy(20));
    // Another writer (a GitOps tool) takes a field it did not own before, without forcing:
    // it conflicts only with the spec writer, never with the operator.
    let out = plane().kubectl_as(
        &plane().kubeconfig,
        &["apply", "--server-side", "--field-manager=gitops", "-n", &ns, "-f", "-"],
        Some(
            "apiVersion: breakwater.dev/v1alpha1\nkind: RateLimitPolicy\nmetadata: {name: limits}\n\
             spec:\n  failureMode: Closed\n",
        ),
    );
    assert!(
        out.status.success(),
        "a second spec writer conflicted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = eventually("status follows generation 3", DEADLINE, || async {
        let object = get(&ns);
        if object["metadata"]["generation"] == 3 && observed(&object) == Some(3) {
            Ok(object)
        } else {
            Err(format!("generation {}, status {}", object["metadata"]["generation"], object["status"]))
        }
    })
    .await;
    assert_eq!(owned_by(&last, FIELD_MANAGER), operator_fields, "the operator still owns only status");
    assert_eq!(last["spec"]["failureMode"], "Closed");
    assert_eq!(last["spec"]["limits"][0]["rate"]["requests"], 20);
    let gitops = owned_by(&last, "gitops");
    assert_eq!(gitops.len(), 1, "{gitops:?}");
    assert_eq!(gitops[0].1, vec!["f:spec".to_string()]);
    operator.stop().await;
}
