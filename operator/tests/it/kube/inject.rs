//! The sidecar injection webhook on the real API server: registered by URL on loopback with
//! the CA the operator issues, it mutates the pods of labelled namespaces and the API server
//! stores the result; unlabelled namespaces and opted-out pods are untouched; a bad
//! annotation is refused at create with the annotation's name; with no webhook answering,
//! each `failurePolicy` does what docs/injection.md says; the certificate and the CA are
//! renewed while admission keeps working.

use std::{sync::Arc, time::Duration};

use breakwater_harness::free_port;
use breakwater_operator::{
    http::State,
    inject::{
        self, WebhookOptions,
        certs::{self, Lifetimes},
        pod as injected,
    },
};
use k8s_openapi::{
    ByteString,
    api::{admissionregistration::v1::MutatingWebhookConfiguration, core::v1::Secret},
};
use kube::{Api, Client};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{DEADLINE, admin, eventually, namespace, plane};

/// Registers a configuration calling the webhook on loopback, as the chart's would by
/// Service, for the labelled ones of `namespaces`; its name.
fn register(port: u16, namespaces: &[&str], failure_policy: &str) -> String {
    let name = breakwater_harness::unique_prefix("bw-inject");
    let url = format!("https://127.0.0.1:{port}{}", inject::webhook::PATH);
    let label = format!("{}=enabled", injected::NAMESPACE_LABEL);
    plane().register_pod_webhook(&name, "inject.breakwater.dev", &url, &label, namespaces, failure_policy);
    name
}

/// The webhook alone (no controllers), managing its certificate in `home`.
fn start(
    client: &Client,
    port: u16,
    home: &str,
    configuration: &str,
    lifetimes: Lifetimes,
) -> (Arc<State>, CancellationToken) {
    let (state, stop) = (Arc::new(State::default()), CancellationToken::new());
    let options = WebhookOptions {
        addr: ([127, 0, 0, 1], port).into(),
        config: inject::Config::default(),
        certs: certs::Source::Managed {
            namespace: home.to_string(),
            secret: "webhook-tls".to_string(),
            configuration: configuration.to_string(),
            dns_names: vec!["127.0.0.1".to_string()],
            lifetimes,
        },
        cert_check: Duration::from_millis(500),
    };
    let (client, state2, stop2) = (client.clone(), state.clone(), stop.clone());
    tokio::spawn(async move { inject::start(client, options, state2, stop2).await.expect("webhook starts") });
    (state, stop)
}

/// A pod as the API server sees it at admission: the ServiceAccount admission plugin (off in
/// the harness, which has no controller-manager to create accounts) has set its account.
fn pod_yaml(name: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, annotations: {{{annotations}}}}}\n\
         spec: {{serviceAccountName: default, containers: [{{name: app, image: example/app:1}}]}}\n"
    )
}

/// Creates a pod with kubectl; Ok(stored pod JSON) or Err(kubectl's stderr).
fn create(namespace: &str, yaml: &str) -> Result<Value, String> {
    let plane = plane();
    let out = plane.kubectl_as(
        &plane.kubeconfig,
        &["create", "-n", namespace, "-o", "json", "-f", "-"],
        Some(yaml),
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("kubectl prints the pod"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .map(|list| list.iter().map(|c| c["name"].as_str().unwrap_or_default().to_string()).collect())
        .unwrap_or_default()
}

async fn ca_bundle(client: &Client, configuration: &str) -> Option<Vec<u8>> {
    let current = Api::<MutatingWebhookConfiguration>::all(client.clone()).get(configuration).await.ok()?;
    current
        .webhooks?
        .first()?
        .client_config
        .ca_bundle
        .clone()
        .map(|b: ByteString| b.0)
        .filter(|b| !b.is_empty())
}

async fn delete_configuration(client: &Client, name: &str) {
    let _ = Api::<MutatingWebhookConfiguration>::all(client.clone()).delete(name, &Default::default()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_of_labelled_namespaces_are_stored_with_their_sidecars() {
    let client = admin().await;
    let home = namespace("inject-home", &[]);
    let labelled = namespace("inject-on", &["breakwater.dev/inject=enabled"]);
    let plain = namespace("inject-off", &[]);
    let port = free_port();
    let configuration = register(port, &[&labelled, &plain], "Fail");
    let (state, stop) = start(&client, port, &home, &configuration, Lifetimes::default());
    eventually("the operator gives the API server its CA", DEADLINE, || async {
        ca_bundle(&client, &configuration).await.ok_or_else(|| "no caBundle yet".to_string())
    })
    .await;

    let pod = create(&labelled, &pod_yaml("api", "")).expect("the API server accepts the injected pod");
    assert_eq!(
        init_names(&pod),
        [injected::CAPTURE_CONTAINER, injected::AGENT_CONTAINER, injected::PROXY_CONTAINER]
    );
    assert_eq!(pod["metadata"]["annotations"][injected::INJECTED_ANNOTATION], "proxy");
    let init = &pod["spec"]["initContainers"];
    assert_eq!(init[1]["restartPolicy"], "Always", "the agent is a native sidecar");
    assert_eq!(init[2]["restartPolicy"], "Always", "Envoy is a native sidecar");
    let bootstrap: Value =
        serde_json::from_str(init[2]["args"][1].as_str().expect("bootstrap arg")).expect("JSON");
    assert_eq!(bootstrap["node"]["id"], "$(POD_NAMESPACE)/$(POD_NAME)");
    let token = pod["spec"]["volumes"]
        .as_array()
        .and_then(|volumes| volumes.iter().find(|v| v["name"] == injected::TOKEN_VOLUME))
        .expect("token volume");
    assert_eq!(token["projected"]["sources"][0]["serviceAccountToken"]["audience"], "breakwater.dev/xds");

    let agent = create(&labelled, &pod_yaml("worker", "breakwater.dev/inject-mode: agent")).expect("created");
    assert_eq!(init_names(&agent), [injected::AGENT_CONTAINER]);
    let opted_out =
        create(&labelled, &pod_yaml("legacy", "breakwater.dev/inject: disabled")).expect("created");
    assert_eq!(init_names(&opted_out), Vec::<String>::new());
    let untouched = create(&plain, &pod_yaml("api", "")).expect("created");
    assert_eq!(init_names(&untouched), Vec::<String>::new());
    assert_eq!(
        untouched["metadata"].get("annotations").and_then(|a| a.get(injected::INJECTED_ANNOTATION)),
        None
    );

    let refused =
        create(&labelled, &pod_yaml("typo", "breakwater.dev/inject-mode: sidecar")).expect_err("refused");
    assert!(refused.contains("breakwater.dev/inject-mode") && refused.contains("\"sidecar\""), "{refused}");

    let injections = state.metrics.encode();
    for sample in [
        r#"breakwater_injections_total{result="injected",detail="proxy"} 1"#,
        r#"breakwater_injections_total{result="injected",detail="agent"} 1"#,
        r#"breakwater_injections_total{result="skipped",detail="opted-out"} 1"#,
        r#"breakwater_injections_total{result="denied",detail="bad-annotation"} 1"#,
    ] {
        assert!(injections.contains(sample), "{sample} not in\n{injections}");
    }
    stop.cancel();
    delete_configuration(&client, &configuration).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_no_webhook_answering_fail_refuses_pods_and_ignore_admits_them_bare() {
    let client = admin().await;
    let failing = namespace("inject-fail", &["breakwater.dev/inject=enabled"]);
    let ignoring = namespace("inject-ignore", &["breakwater.dev/inject=enabled"]);
    // Nothing listens on these ports.
    let fail = register(free_port(), &[&failing], "Fail");
    let ignore = register(free_port(), &[&ignoring], "Ignore");

    let refused = create(&failing, &pod_yaml("api", "")).expect_err("Fail refuses the pod");
    assert!(
        refused.contains("failed calling webhook") && refused.contains("inject.breakwater.dev"),
        "{refused}"
    );
    let bare = create(&ignoring, &pod_yaml("api", "")).expect("Ignore admits the pod");
    assert_eq!(init_names(&bare), Vec::<String>::new(), "admitted without sidecars");

    delete_configuration(&client, &fail).await;
    delete_configuration(&client, &ignore).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_certificate_and_the_ca_are_renewed_while_admission_keeps_working() {
    let client = admin().await;
    let home = namespace("inject-certs", &[]);
    let labelled = namespace("inject-rotate", &["breakwater.dev/inject=enabled"]);
    let port = free_port();
    let configuration = register(port, &[&labelled], "Fail");
    // Renewed with a third of the lifetime left: the certificate after 4 s, the CA after 16 s.
    let lifetimes = Lifetimes { ca: Duration::from_secs(24), cert: Duration::from_secs(6) };
    let (_state, stop) = start(&client, port, &home, &configuration, lifetimes);
    let secrets = Api::<Secret>::namespaced(client.clone(), &home);
    let material = || async {
        secrets.get_opt("webhook-tls").await.ok().flatten().as_ref().and_then(certs::Material::from_secret)
    };
    let first = eventually("the certificate is issued", DEADLINE, || async {
        material().await.ok_or_else(|| "no Secret".to_string())
    })
    .await;
    eventually("the caBundle is the Secret's", DEADLINE, || async {
        (ca_bundle(&client, &configuration).await.as_deref() == Some(first.bundle.as_bytes()))
            .then_some(())
            .ok_or_else(|| "differs".to_string())
    })
    .await;
    create(&labelled, &pod_yaml("before", "")).expect("admitted with the first certificate");

    let renewed = eventually("the certificate is renewed by the same CA", DEADLINE, || async {
        let now = material().await.ok_or_else(|| "no Secret".to_string())?;
        (now.cert != first.cert && now.bundle == first.bundle)
            .then_some(now)
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    let pod = create(&labelled, &pod_yaml("after-cert", "")).expect("admitted with the renewed certificate");
    assert_eq!(init_names(&pod).len(), 3);

    let rotated = eventually("the CA is renewed, the old one kept in the bundle", DEADLINE, || async {
        let now = material().await.ok_or_else(|| "no Secret".to_string())?;
        (!now.bundle.starts_with(&renewed.bundle) && now.bundle.contains(first.bundle.trim()))
            .then_some(now)
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
    eventually("the caBundle follows", DEADLINE, || async {
        (ca_bundle(&client, &configuration).await.as_deref() == Some(rotated.bundle.as_bytes()))
            .then_some(())
            .ok_or_else(|| "differs".to_string())
    })
    .await;
    let pod =
        create(&labelled, &pod_yaml("after-ca", "")).expect("admitted with a certificate of the new CA");
    assert_eq!(init_names(&pod).len(), 3);
    stop.cancel();
    delete_configuration(&client, &configuration).await;
}
