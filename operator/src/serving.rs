//! Which replica the proxies connect to. Only the leader accepts ADS streams (it writes
//! `Programmed`, so it must see every ACK), yet every replica is Ready (rolling updates and
//! the PodDisruptionBudget count Ready pods). So the leader labels its own pod [`LABEL`], and
//! the chart's xDS Service selects that label: streams go to the leader alone. A replica
//! removes the label from its pod when it starts (it may have led before a restart) and when
//! it stops leading.

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};

use crate::{error::Report, inventory::ObjectName};

/// The label of the pod that serves xDS, with the value `"true"`.
pub const LABEL: &str = "breakwater.dev/serving-xds";

/// Labels `pod` as the one serving xDS. A failure is logged: the pod keeps serving whoever
/// reaches it, and the Service sends nobody until the label is set.
pub async fn mark(client: &Client, pod: &ObjectName) {
    label(client, pod, serde_json::Value::from("true")).await;
}

/// Removes the label from `pod` (nothing happens when it has none).
pub async fn unmark(client: &Client, pod: &ObjectName) {
    label(client, pod, serde_json::Value::Null).await;
}

async fn label(client: &Client, pod: &ObjectName, value: serde_json::Value) {
    let api: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &pod.namespace);
    // A JSON merge patch: `null` removes the label, and no read is needed either way.
    let patch = serde_json::json!({"metadata": {"labels": {LABEL: value}}});
    // Bounded: a hung API server must not hold up a shutdown.
    let patched = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        api.patch(&pod.name, &PatchParams::default(), &Patch::Merge(&patch)),
    )
    .await;
    match patched {
        Ok(Ok(_)) => {
            tracing::info!(%pod, label = LABEL, serving = !value.is_null(), "labelled the operator's own pod")
        }
        Ok(Err(error)) => {
            tracing::warn!(%pod, label = LABEL, error = %Report(&error), "cannot label the operator's own pod");
        }
        Err(_) => {
            tracing::warn!(%pod, label = LABEL, "the API server did not answer the label patch in time")
        }
    }
}
