//! The real-cluster suite (`make e2e`): CRDs installed into a kind/k3d cluster, the operator
//! run in-process against it, and the API server's own schema and CEL checks exercised.
//! Every test is `#[ignore]`d so `cargo test` leaves it out; `make e2e` runs them, and each
//! skips with a message when `BREAKWATER_E2E_KUBECONFIG` is not set.

use std::time::Duration;

use breakwater_api::RateLimitPolicy;
use k8s_openapi::{
    api::core::v1::{Namespace, Service},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{DeleteParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde::de::DeserializeOwned;
use serde_json::json;

const MANAGER: &str = "breakwater-e2e";
const ROOT: &str = "breakwater-system";

async fn cluster() -> Option<Client> {
    let Ok(path) = std::env::var("BREAKWATER_E2E_KUBECONFIG") else {
        eprintln!(
            "skipped: set BREAKWATER_E2E_KUBECONFIG to a kind/k3d kubeconfig to run the real-cluster suite"
        );
        return None;
    };
    let kubeconfig =
        Kubeconfig::read_from(&path).unwrap_or_else(|err| panic!("cannot read kubeconfig {path}: {err}"));
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|err| panic!("invalid kubeconfig {path}: {err}"));
    Some(Client::try_from(config).expect("client from kubeconfig"))
}

/// Polls `check` every 250 ms until it returns Some, failing after `deadline`.
async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let give_up = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < give_up, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn apply<K>(api: &Api<K>, name: &str, body: serde_json::Value) -> Result<K, kube::Error>
where
    K: kube::Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(&body)).await
}

async fn install_crds(client: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in breakwater_api::crds() {
        let name = crd.metadata.name.clone().expect("CRD has a name");
        apply(&crds, &name, serde_json::to_value(&crd).expect("CRD serializes")).await.expect("apply CRD");
        wait_for(&format!("CRD {name} established"), Duration::from_secs(30), || {
            let crds = crds.clone();
            let name = name.clone();
            async move {
                let crd = crds.get(&name).await.ok()?;
                let established =
                    crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True");
                established.then_some(())
            }
        })
        .await;
    }
}

fn condition(policy: &RateLimitPolicy, type_: &str) -> Option<(String, String)> {
    let status = policy.status.as_ref()?;
    let c = status.conditions.iter().find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone()))
}

#[tokio::test]
#[ignore = "needs a cluster: make e2e with BREAKWATER_E2E_KUBECONFIG"]
async fn operator_reports_target_resolution_in_a_real_cluster() {
    let Some(client) = cluster().await else { return };
    install_crds(&client).await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns = format!("bw-e2e-{}", std::process::id());
    for name in [ROOT, ns.as_str()] {
        apply(
            &namespaces,
            name,
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
        )
        .await
        .expect("namespace");
    }

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(breakwater_operator::run::run(
        client.clone(),
        breakwater_operator::run::Options {
            root_namespace: ROOT.into(),
            metrics_addr: "127.0.0.1:0".parse().expect("address"),
            xds_addr: "127.0.0.1:0".parse().expect("address"),
            leader_election_namespace: None,
            identity: "e2e".into(),
            redis: None,
        },
        async move {
            let _ = stopped.await;
        },
    ));

    let policies: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns);
    let policy = json!({
        "apiVersion": "breakwater.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "limits"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "api"}],
                 "limits": [{"name": "per-user", "rate": {"requests": 10, "per": "1s"}}]}
    });
    apply(&policies, "limits", policy).await.expect("apply policy");
    wait_for("ResolvedRefs=False/TargetNotFound", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move {
            let p = policies.get("limits").await.ok()?;
            (condition(&p, "ResolvedRefs")? == ("False".into(), "TargetNotFound".into())).then_some(())
        }
    })
    .await;

    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
                         "spec": {"ports": [{"name": "http", "port": 80}]}});
    apply(&services, "api", service).await.expect("apply service");
    wait_for("ResolvedRefs=True once the Service exists", Duration::from_secs(60), || {
        let policies = policies.clone();
        async move {
            let p = policies.get("limits").await.ok()?;
            (condition(&p, "ResolvedRefs")?.0 == "True").then_some(())
        }
    })
    .await;

    // The API server itself refuses what CEL forbids, with the rule's message.
    let duplicate = json!({
        "apiVersion": "breakwater.dev/v1alpha1", "kind": "RateLimitPolicy",
        "metadata": {"name": "dup"},
        "spec": {"targetRefs": [{"kind": "Service", "name": "api"}],
                 "limits": [{"name": "a", "rate": {"requests": 1, "per": "1s"}},
                            {"name": "a", "rate": {"requests": 2, "per": "1s"}}]}
    });
    let err = apply(&policies, "dup", duplicate).await.expect_err("duplicate limit names refused");
    assert!(err.to_string().contains("limit names must be unique"), "{err}");

    let _ = stop.send(());
    operator.await.expect("operator task").expect("operator stops cleanly");
    namespaces.delete(&ns, &DeleteParams::default()).await.expect("delete namespace");
}
