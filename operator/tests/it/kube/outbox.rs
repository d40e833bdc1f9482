//! Who runs an OutboxRelay, on the real API server: the `breakwater-operator run` binary (as
//! the chart runs it, with `--relay-image` and a real `redis-server` for the facts) applies
//! a Deployment of `breakwater-relay` for each accepted OutboxRelay, and shows what the
//! active relay reports to Redis (written here with the relays' own store code,
//! `breakwater_store::relay::report`) in the status. There is no kubelet or
//! controller-manager: no relay pod runs (the facts are written as a relay would write them),
//! and nothing garbage-collects, so the owner reference is checked, not the deletion.
//!
//! The Secrets hold recognisable credentials; none may appear in the Deployment, the status,
//! an Event or the operator's log.

use std::collections::BTreeMap;

use breakwater_api::OutboxRelay;
use breakwater_harness::{RedisServer, unique_prefix};
use breakwater_store::{
    RedisConnection, RedisSettings, RedisTopology,
    relay::{self, RelayReport},
};
use k8s_openapi::{api::apps::v1::Deployment, apimachinery::pkg::apis::meta::v1::Condition};
use kube::{Api, ResourceExt};
use serde_json::Value;

use super::{DEADLINE, OPERATOR, OperatorProcess, admin, eventually, kubectl_apply, namespace, plane};

const POSTGRES_PASSWORD: &str = "Pg-S3cret-7f3a";
const REDIS_PASSWORD: &str = "Redis-S3cret-91c2";
const IMAGE: &str = "registry.local/breakwater:outbox-test";
const HOLDER: &str = "orders-relay-7c9f8d6b5-x2kqp";

fn connection_secret() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: orders-db}}\n\
         stringData: {{url: \"postgres://relay:{POSTGRES_PASSWORD}@db.shop:5432/orders\", other: ignored}}\n"
    )
}

fn redis_secret() -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: breakwater-redis}}\n\
         stringData: {{url: \"redis://:{REDIS_PASSWORD}@redis.data:6379\"}}\n"
    )
}

/// An OutboxRelay `name` to a Redis stream (or to `sink`), with `delivery` as its
/// `spec.delivery` fields.
fn outbox_relay(name: &str, delivery: &str, sink: Option<&str>) -> String {
    let sink = sink.unwrap_or("{redisStream: {stream: \"events.{aggregateType}\"}}");
    format!(
        "apiVersion: breakwater.dev/v1alpha1\nkind: OutboxRelay\nmetadata: {{name: {name}}}\nspec:\n  \
         source: {{postgres: {{connectionSecretRef: {{name: orders-db, key: url}}, table: outbox}}}}\n  \
         sink: {sink}\n  delivery: {{{delivery}}}\n"
    )
}

/// The operator binary as the chart runs it, on the whole cluster, with `extra` flags.
fn operator(root: &str, extra: &[String]) -> OperatorProcess {
    let mut flags = vec![format!("--relay-image={IMAGE}")];
    flags.extend_from_slice(extra);
    OperatorProcess::start_with_args(&plane().kubeconfig, "outbox-test", root, None, &flags)
}

fn condition(relay: &OutboxRelay, type_: &str) -> Option<Condition> {
    relay.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_).cloned()
}

/// (status, reason, message) of `type_`.
fn said(relay: &OutboxRelay, type_: &str) -> (String, String, String) {
    condition(relay, type_).map(|c| (c.status, c.reason, c.message)).unwrap_or_default()
}

/// Waits until the relay's status satisfies `check` (which says what it saw otherwise).
async fn relay_until<T>(
    api: &Api<OutboxRelay>,
    name: &str,
    what: &str,
    operator: &OperatorProcess,
    check: impl Fn(&OutboxRelay) -> Result<T, String>,
) -> T {
    eventually(what, DEADLINE, || async {
        let relay = api.get(name).await.map_err(|e| e.to_string())?;
        check(&relay).map_err(|seen| {
            format!("{seen}\nstatus: {:?}\noperator log:\n{}", relay.status, operator.daemon.log())
        })
    })
    .await
}

fn ready_is(relay: &OutboxRelay, status: &str, reason: &str) -> Result<(String, String, String), String> {
    let ready = said(relay, "Ready");
    if ready.0 == status && ready.1 == reason { Ok(ready) } else { Err(format!("Ready is {ready:?}")) }
}

fn env(deployment: &Deployment) -> BTreeMap<String, Value> {
    let json = serde_json::to_value(deployment).expect("JSON");
    json["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| (e["name"].as_str().expect("name").to_string(), e.clone()))
        .collect()
}

fn spec_env(deployment: &Deployment) -> Value {
    let text = env(deployment)["BREAKWATER_RELAY_SPEC"]["value"].as_str().expect("the spec").to_string();
    serde_json::from_str(&text).expect("the spec is JSON")
}

/// What the operator's status must never hold, nor anything else it writes or logs.
fn assert_no_credential(what: &str, text: &str) {
    for secret in [POSTGRES_PASSWORD, REDIS_PASSWORD] {
        assert!(!text.contains(secret), "{what} holds a credential ({secret}):\n{text}");
    }
}

async fn report(
    connection: &RedisConnection,
    prefix: &str,
    id: &str,
    reason: &str,
    message: &str,
    published: u64,
) {
    let report = RelayReport {
        holder: HOLDER.into(),
        pending: 12,
        oldest_pending_age_ms: 3_400,
        published,
        dead_lettered: 1,
        reason: reason.into(),
        message: message.into(),
    };
    relay::report(connection, prefix, id, &report).await.expect("the relay's report reaches Redis");
}

#[tokio::test]
async fn an_accepted_relay_runs_as_a_deployment_and_its_facts_show_in_the_status() {
    let _one_operator = OPERATOR.lock().await;
    let client = admin().await;
    let redis = RedisServer::start();
    let prefix = unique_prefix("outbox");
    let (ns, root) = (namespace("outbox", &[]), namespace("outbox-root", &[]));
    kubectl_apply(&ns, &connection_secret());
    let operator =
        operator(&root, &[format!("--redis-url={}", redis.url()), format!("--redis-key-prefix={prefix}")]);
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    kubectl_apply(&ns, &outbox_relay("orders", "batchSize: 100", None));

    // The Deployment, as the API server stored it (its validation and defaulting passed).
    let deployment = eventually("the operator applies the relay's Deployment", DEADLINE, || async {
        deployments.get_opt("orders-relay").await.map_err(|e| e.to_string())?.ok_or_else(|| {
            format!("no Deployment orders-relay yet\noperator log:\n{}", operator.daemon.log())
        })
    })
    .await;
    let relay = relays.get("orders").await.expect("the relay");
    let owner = &deployment.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), Some(&owner.uid), owner.controller),
        ("OutboxRelay", "orders", relay.uid().as_ref(), Some(true)),
        "the garbage collector deletes it with the relay"
    );
    let json = serde_json::to_value(&deployment).expect("JSON");
    let pod = &json["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(json["spec"]["replicas"], 2);
    assert_eq!(json["metadata"]["labels"]["app.kubernetes.io/instance"], "orders");
    assert_eq!(container["image"], IMAGE);
    assert_eq!(container["command"], serde_json::json!(["/usr/local/bin/breakwater-relay"]));
    assert_eq!(container["args"], serde_json::json!(["run"]));
    assert_eq!(
        pod["volumes"][0]["secret"]["items"],
        serde_json::json!([{"key": "url", "path": "url"}]),
        "only the connection key is mounted, not `other`"
    );
    assert_eq!(
        container["volumeMounts"],
        serde_json::json!([{"name": "postgres", "mountPath": "/var/run/secrets/breakwater.dev/postgres", "readOnly": true}])
    );
    let security = &container["securityContext"];
    assert_eq!(
        (
            &security["runAsNonRoot"],
            &security["readOnlyRootFilesystem"],
            &security["allowPrivilegeEscalation"],
            &security["capabilities"]["drop"],
            &pod["securityContext"]["seccompProfile"]["type"],
        ),
        (
            &Value::Bool(true),
            &Value::Bool(true),
            &Value::Bool(false),
            &serde_json::json!(["ALL"]),
            &Value::String("RuntimeDefault".into())
        )
    );
    let vars = env(&deployment);
    assert_eq!(vars["BREAKWATER_RELAY"]["value"], format!("{ns}/orders"));
    assert_eq!(vars["BREAKWATER_POSTGRES_URL_FILE"]["value"], "/var/run/secrets/breakwater.dev/postgres/url");
    assert_eq!(vars["BREAKWATER_REDIS_KEY_PREFIX"]["value"], prefix);
    assert_eq!(
        vars["BREAKWATER_REDIS_URL"]["valueFrom"]["secretKeyRef"],
        serde_json::json!({"name": "breakwater-redis", "key": "url"})
    );
    assert_eq!(vars["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(spec_env(&deployment)["delivery"]["batchSize"], 100);
    let first_deployment = serde_json::to_string(&deployment).expect("JSON");

    let relay = relay_until(&relays, "orders", "Accepted says how it runs", &operator, |r| {
        let accepted = said(r, "Accepted");
        if accepted.1 == "Accepted" { Ok(r.clone()) } else { Err(format!("Accepted is {accepted:?}")) }
    })
    .await;
    assert_eq!(
        said(&relay, "Accepted").2,
        "relays table outbox to Redis stream events.{aggregateType} with a Deployment of 2 replicas"
    );
    // The namespace has no Secret with the agents' Redis URL: the pods could not start.
    let (_, _, message) = relay_until(&relays, "orders", "Ready: no Redis Secret", &operator, |r| {
        ready_is(r, "False", "RedisSecretNotFound")
    })
    .await;
    assert!(
        message.starts_with(&format!("Secret {ns}/breakwater-redis, with the agents' Redis URL")),
        "{message}"
    );

    kubectl_apply(&ns, &redis_secret());
    let (_, _, message) = relay_until(&relays, "orders", "Ready: no report (10 s resync)", &operator, |r| {
        ready_is(r, "Unknown", "NoReport")
    })
    .await;
    assert_eq!(message, "no relay has reported yet (Deployment orders-relay, 2 replicas)");

    // The active relay reports, as `breakwater-relay` does every 5 s.
    let connection = RedisConnection::start(RedisSettings::new(RedisTopology::Standalone(redis.url())))
        .await
        .expect("redis connection");
    let id = format!("{ns}/orders");
    report(&connection, &prefix, &id, "Relaying", &format!("relayed by {HOLDER}"), 40).await;
    let relay = relay_until(&relays, "orders", "Ready: relaying", &operator, |r| {
        ready_is(r, "True", "Relaying").map(|_| r.clone())
    })
    .await;
    assert_eq!(said(&relay, "Ready").2, format!("relayed by {HOLDER}: 12 pending, the oldest 3s old"));
    let status = relay.status.clone().expect("status");
    assert_eq!(
        (
            status.active_relay.as_deref(),
            status.pending,
            status.oldest_pending_age.as_ref().map(|d| d.as_str()),
            status.published,
            status.dead_lettered
        ),
        (Some(HOLDER), Some(12), Some("3s"), Some(40), Some(1))
    );

    // The sink refuses: the relay's reason and message, and the totals add up.
    let refused = "3 publish attempt(s) refused since the last report: OOM command not allowed";
    report(&connection, &prefix, &id, "SinkRefusing", refused, 5).await;
    let relay = relay_until(&relays, "orders", "Ready: the sink refuses", &operator, |r| {
        ready_is(r, "False", "SinkRefusing").map(|_| r.clone())
    })
    .await;
    assert_eq!(said(&relay, "Ready").2, refused);
    assert_eq!(relay.status.as_ref().and_then(|s| s.published), Some(45));

    // Requeues re-apply an unchanged Deployment without writing it.
    let reconciles = |text: &str| super::metric(text, "breakwater_reconciles_total{kind=\"OutboxRelay\"}");
    let before = deployments.get("orders-relay").await.expect("Deployment").resource_version();
    let counted = reconciles(&operator.metrics()).unwrap_or(0.0);
    eventually("two more OutboxRelay reconciles", DEADLINE, || async {
        let now = reconciles(&operator.metrics()).unwrap_or(0.0);
        if now >= counted + 2.0 { Ok(()) } else { Err(format!("{now} reconciles, from {counted}")) }
    })
    .await;
    let after = deployments.get("orders-relay").await.expect("Deployment").resource_version();
    assert_eq!(before, after, "an unchanged apply writes nothing");

    // A changed spec is applied: the pod template changes, so the pods roll.
    kubectl_apply(&ns, &outbox_relay("orders", "batchSize: 50", None));
    eventually("the new spec reaches the Deployment", DEADLINE, || async {
        let deployment = deployments.get("orders-relay").await.map_err(|e| e.to_string())?;
        let batch = spec_env(&deployment)["delivery"]["batchSize"].clone();
        if batch == 50 { Ok(()) } else { Err(format!("batchSize {batch}")) }
    })
    .await;

    // An edit the operator refuses: nothing runs any more.
    let zero = Some("{webhook: {url: \"https://hooks.example/orders\", timeout: 0s}}");
    kubectl_apply(&ns, &outbox_relay("orders", "batchSize: 50", zero));
    eventually("the refused relay's Deployment is deleted", DEADLINE, || async {
        match deployments.get_opt("orders-relay").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(d) => {
                Err(format!("still there: {:?}\noperator log:\n{}", d.metadata, operator.daemon.log()))
            }
        }
    })
    .await;
    let relay = relay_until(&relays, "orders", "Ready: not accepted", &operator, |r| {
        ready_is(r, "False", "NotAccepted").map(|_| r.clone())
    })
    .await;
    assert_eq!(
        said(&relay, "Accepted"),
        (
            "False".into(),
            "Invalid".into(),
            "spec.sink.webhook.timeout: 0s would fail every POST before it is sent".into()
        )
    );

    // Ready's transitions were Events, as every condition's are.
    let events = plane().kubectl_ok(&["get", "events.events.k8s.io", "-n", &ns, "-o", "json"]);
    for reason in ["RedisSecretNotFound", "NoReport", "Relaying", "SinkRefusing", "NotAccepted"] {
        assert!(events.contains(&format!("\"reason\": \"{reason}\"")), "no {reason} Event:\n{events}");
    }
    assert_no_credential("the Deployment", &first_deployment);
    assert_no_credential("the status", &serde_json::to_string(&relay.status).expect("JSON"));
    assert_no_credential("the Events", &events);
    assert_no_credential("the operator's log", &operator.daemon.log());
}

#[tokio::test]
async fn without_redis_ready_is_unknown_and_what_cannot_run_runs_nothing() {
    let _one_operator = OPERATOR.lock().await;
    let client = admin().await;
    let (ns, root) = (namespace("outbox-nostore", &[]), namespace("outbox-nostore-root", &[]));
    kubectl_apply(&ns, &connection_secret());
    kubectl_apply(&ns, &redis_secret());
    // A Deployment of someone else's, with the name the relay "billing" would use.
    kubectl_apply(
        &ns,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: billing-relay}\nspec:\n  \
         selector: {matchLabels: {app: billing}}\n  template:\n    metadata: {labels: {app: billing}}\n    \
         spec: {containers: [{name: billing, image: example/billing:1}]}\n",
    );
    let operator = operator(&root, &[]);
    let relays: Api<OutboxRelay> = Api::namespaced(client.clone(), &ns);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let long = "a".repeat(64);
    for name in ["orders", "billing", long.as_str()] {
        kubectl_apply(&ns, &outbox_relay(name, "batchSize: 100", None));
    }

    let (_, _, message) =
        relay_until(&relays, "orders", "Ready: no store", &operator, |r| ready_is(r, "Unknown", "NoStore"))
            .await;
    assert!(message.contains("--redis-url"), "{message}");
    assert!(deployments.get_opt("orders-relay").await.expect("get").is_some(), "it runs, Redis or not");

    let (_, _, message) = relay_until(&relays, "billing", "Ready: a Deployment in the way", &operator, |r| {
        ready_is(r, "False", "DeploymentConflict")
    })
    .await;
    assert!(
        message.starts_with("Deployment billing-relay exists and is not this OutboxRelay's"),
        "{message}"
    );
    let theirs = deployments.get("billing-relay").await.expect("their Deployment");
    let image = theirs.spec.and_then(|s| s.template.spec).map(|p| p.containers[0].image.clone());
    assert_eq!(image, Some(Some("example/billing:1".into())), "left alone");

    let relay = relay_until(&relays, &long, "a name too long for a label is refused", &operator, |r| {
        ready_is(r, "False", "NotAccepted").map(|_| r.clone())
    })
    .await;
    let accepted = said(&relay, "Accepted");
    assert_eq!((accepted.0.as_str(), accepted.1.as_str()), ("False", "Invalid"));
    assert!(accepted.2.starts_with("metadata.name: 64 characters, at most 63"), "{}", accepted.2);
    let names: Vec<String> = deployments
        .list(&Default::default())
        .await
        .expect("list")
        .items
        .iter()
        .map(|d| d.name_any())
        .collect();
    assert_eq!(names, ["billing-relay", "orders-relay"], "nothing runs the refused relay");
}
