//! Who runs an OutboxRelay: a Deployment of `breakwater-relay` per accepted OutboxRelay, in
//! the relay's namespace, controlled by the OutboxRelay (Kubernetes' garbage collector
//! deletes it with the resource). [`deployment`] builds it, purely, from the resource and the
//! operator's [`Settings`]; [`apply`] applies it by server-side apply unless a Deployment of
//! that name is someone else's; [`remove`] deletes it when the resource is no longer
//! accepted. [`RelayReader`] reads the facts the active relay writes to the agents' Redis.
//!
//! Credentials never pass through the operator: the PostgreSQL URL stays in the relay's own
//! Secret, mounted into the pods as a file, and the Redis URL in a Secret of the relay's
//! namespace, referenced by name. The Deployment names Secrets; it holds no secret value.

use std::{collections::BTreeMap, fmt::Debug};

use breakwater_api::OutboxRelay;
use breakwater_store::{lease::RedisLeases, relay::RelayFacts};
use futures::future::BoxFuture;
use k8s_openapi::{
    api::{
        apps::v1::{Deployment, DeploymentSpec},
        core::v1::{
            Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, KeyToPath,
            ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
            SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume,
            VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions, PropagationPolicy},
};

use crate::{
    error::{Error, Result},
    inventory::ObjectName,
    lease::StoreError,
    policy::outbox_relay::{self, REPLICAS, RedisSecret},
};

/// The image the relays run when `--relay-image` is not given: the release's own image,
/// which holds `breakwater-relay` beside the operator and the agent (the chart passes the
/// operator's image reference, which the binary cannot know).
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/breakwater-dev/breakwater:", env!("CARGO_PKG_VERSION"));

/// The Secret, in each relay's namespace, that holds the agents' Redis URL under [`REDIS_KEY`]
/// (`--relay-redis-secret`): the injector's `redisSecret` convention, since a pod cannot
/// read a Secret of another namespace.
pub const DEFAULT_REDIS_SECRET: &str = "breakwater-redis";

/// The key of the Redis URL in that Secret.
pub const REDIS_KEY: &str = "url";

/// A relay's Deployment is its name with this suffix.
pub const NAME_SUFFIX: &str = "-relay";

/// Where the connection Secret's one key is mounted, and the file the relay reads.
pub const POSTGRES_DIR: &str = "/var/run/secrets/breakwater.dev/postgres";
pub const POSTGRES_FILE: &str = "url";

/// The relay's /healthz, /readyz and /metrics (its default `--http-addr`).
pub const HTTP_PORT: i32 = 9102;

const BINARY: &str = "/usr/local/bin/breakwater-relay";
const CONTAINER: &str = "relay";
const VOLUME: &str = "postgres";
/// The distroless image's `nonroot` user and group.
const NONROOT: i64 = 65532;
/// Owner and group may read the URL file, nobody else (the group is the pod's fsGroup).
const URL_FILE_MODE: i32 = 0o440;

/// How the operator runs relays: `run --relay-image`, `--relay-redis-secret`, and the
/// agents' key prefix (`--redis-key-prefix`), which relays must share with the agents and
/// the operator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub image: String,
    pub redis_secret: String,
    pub key_prefix: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            image: DEFAULT_IMAGE.to_string(),
            redis_secret: DEFAULT_REDIS_SECRET.to_string(),
            key_prefix: crate::lease::DEFAULT_KEY_PREFIX.to_string(),
        }
    }
}

/// The name of `relay`'s Deployment.
pub fn deployment_name(relay: &str) -> String {
    format!("{relay}{NAME_SUFFIX}")
}

/// The labels of a relay's Deployment and pods; the first two select its pods.
pub fn labels(relay: &str) -> BTreeMap<String, String> {
    [
        ("app.kubernetes.io/name", "breakwater-relay"),
        ("app.kubernetes.io/instance", relay),
        ("app.kubernetes.io/managed-by", "breakwater-operator"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The Deployment that runs `relay` (an object read from the API server: it has a namespace
/// and a uid, which the owner reference needs). The spec travels as JSON in the environment,
/// so any change of it changes the pod template and rolls the pods.
pub fn deployment(relay: &OutboxRelay, settings: &Settings) -> Result<Deployment> {
    let name = relay.name_any();
    let namespace =
        relay.namespace().ok_or_else(|| Error::Incomplete { what: "namespace", name: name.clone() })?;
    let owner = relay
        .controller_owner_ref(&())
        .ok_or_else(|| Error::Incomplete { what: "uid", name: name.clone() })?;
    let spec = serde_json::to_string(&relay.spec).map_err(Error::RelaySpec)?;
    let secret = &relay.spec.source.postgres.connection_secret_ref;
    let labels = labels(&name);
    let selector: BTreeMap<String, String> = labels
        .iter()
        .filter(|(k, _)| !k.ends_with("managed-by"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let env =
        |name: &str, value: String| EnvVar { name: name.to_string(), value: Some(value), value_from: None };
    let probe = |path: &str| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::String("http-metrics".to_string()),
            ..Default::default()
        }),
        period_seconds: Some(10),
        timeout_seconds: Some(2),
        failure_threshold: Some(3),
        ..Default::default()
    };
    let quantities = |cpu: &str, memory: &str| -> BTreeMap<String, Quantity> {
        [("cpu", cpu), ("memory", memory)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect()
    };
    let container = Container {
        name: CONTAINER.to_string(),
        image: Some(settings.image.clone()),
        image_pull_policy: Some("IfNotPresent".to_string()),
        command: Some(vec![BINARY.to_string()]),
        args: Some(vec!["run".to_string()]),
        env: Some(vec![
            env("BREAKWATER_RELAY", format!("{namespace}/{name}")),
            env("BREAKWATER_RELAY_SPEC", spec),
            env("BREAKWATER_POSTGRES_URL_FILE", format!("{POSTGRES_DIR}/{POSTGRES_FILE}")),
            EnvVar {
                name: "BREAKWATER_REDIS_URL".to_string(),
                value: None,
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: settings.redis_secret.clone(),
                        key: REDIS_KEY.to_string(),
                        optional: None,
                    }),
                    ..Default::default()
                }),
            },
            env("BREAKWATER_REDIS_KEY_PREFIX", settings.key_prefix.clone()),
            EnvVar {
                name: "POD_NAME".to_string(),
                value: None,
                value_from: Some(EnvVarSource {
                    field_ref: Some(ObjectFieldSelector {
                        field_path: "metadata.name".to_string(),
                        api_version: None,
                    }),
                    ..Default::default()
                }),
            },
        ]),
        ports: Some(vec![ContainerPort {
            name: Some("http-metrics".to_string()),
            container_port: HTTP_PORT,
            protocol: Some("TCP".to_string()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe { period_seconds: Some(5), ..probe("/readyz") }),
        liveness_probe: Some(Probe { initial_delay_seconds: Some(5), ..probe("/healthz") }),
        resources: Some(ResourceRequirements {
            requests: Some(quantities("50m", "64Mi")),
            limits: Some(quantities("500m", "256Mi")),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), add: None }),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: VOLUME.to_string(),
            mount_path: POSTGRES_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let pod = PodSpec {
        containers: vec![container],
        // The relay talks to PostgreSQL and Redis, never to the API server.
        automount_service_account_token: Some(false),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(NONROOT),
            run_as_group: Some(NONROOT),
            // The mounted URL file's group, so the non-root user may read a 0440 file.
            fs_group: Some(NONROOT),
            seccomp_profile: Some(runtime_default()),
            ..Default::default()
        }),
        volumes: Some(vec![Volume {
            name: VOLUME.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                // Only the key the relay reads, whatever else the Secret holds.
                items: Some(vec![KeyToPath {
                    key: secret.key.clone(),
                    path: POSTGRES_FILE.to_string(),
                    mode: None,
                }]),
                default_mode: Some(URL_FILE_MODE),
                optional: None,
            }),
            ..Default::default()
        }]),
        ..Default::default()
    };
    Ok(Deployment {
        metadata: ObjectMeta {
            name: Some(deployment_name(&name)),
            namespace: Some(namespace),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(REPLICAS),
            selector: LabelSelector { match_labels: Some(selector), match_expressions: None },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(pod),
            },
            ..Default::default()
        }),
        status: None,
    })
}

fn runtime_default() -> SeccompProfile {
    SeccompProfile { type_: "RuntimeDefault".to_string(), localhost_profile: None }
}

/// None when `relay` controls `deployment`; otherwise what does (for a message).
pub fn foreign_controller(deployment: &Deployment, relay: &OutboxRelay) -> Option<String> {
    let owners = deployment.owner_references();
    let controller = owners.iter().find(|owner| owner.controller == Some(true));
    match controller {
        Some(owner) if Some(&owner.uid) == relay.uid().as_ref() => None,
        Some(owner) => Some(format!("controlled by {} {} (uid {})", owner.kind, owner.name, owner.uid)),
        None => Some("it has no controller".to_string()),
    }
}

/// Applies `relay`'s Deployment (server-side apply, forced: the operator owns every field it
/// sets, so a hand edit of one is undone) unless a Deployment of that name exists that the
/// relay does not control, which is left alone. An apply that changes nothing writes
/// nothing: the API server keeps the object and its resourceVersion.
pub async fn apply(
    client: &Client,
    relay: &OutboxRelay,
    settings: &Settings,
    field_manager: &str,
) -> Result<outbox_relay::Deployment> {
    let wanted = deployment(relay, settings)?;
    let name = wanted.name_any();
    let api: Api<Deployment> = Api::namespaced(client.clone(), &wanted.namespace().unwrap_or_default());
    let live = api.get_opt(&name).await?;
    if let Some(owner) = live.as_ref().and_then(|live| foreign_controller(live, relay)) {
        tracing::debug!(relay = %ObjectName::of(relay), deployment = name, owner, "Deployment is not the relay's");
        return Ok(outbox_relay::Deployment::NotOwned { name, owner });
    }
    let params = PatchParams::apply(field_manager).force();
    let applied = api.patch(&name, &params, &Patch::Apply(&wanted)).await?;
    if live.and_then(|live| live.resource_version()) != applied.resource_version() {
        tracing::info!(relay = %ObjectName::of(relay), deployment = name, "relay Deployment applied");
    }
    Ok(outbox_relay::Deployment::Applied { name })
}

/// Deletes `relay`'s Deployment if the relay controls it (the resource is no longer
/// accepted: nothing should relay it). The uid precondition keeps a Deployment that
/// replaced it meanwhile; background propagation lets the garbage collector remove the
/// ReplicaSets and pods.
pub async fn remove(client: &Client, relay: &OutboxRelay) -> Result<()> {
    let name = deployment_name(&relay.name_any());
    let api: Api<Deployment> = Api::namespaced(client.clone(), &relay.namespace().unwrap_or_default());
    let Some(live) = api.get_opt(&name).await? else { return Ok(()) };
    if foreign_controller(&live, relay).is_some() {
        return Ok(());
    }
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        preconditions: Some(Preconditions { uid: live.uid(), resource_version: None }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {
            tracing::info!(relay = %ObjectName::of(relay), deployment = name, "relay Deployment deleted: not accepted");
            Ok(())
        }
        // Gone already, or replaced by another object of that name: nothing of ours is left.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// Whether `namespace` holds the Secret the relay's pods read the agents' Redis URL from.
/// Only its keys are looked at.
pub async fn redis_secret(client: &Client, namespace: &str, settings: &Settings) -> Result<RedisSecret> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let name = format!("{namespace}/{}", settings.redis_secret);
    let Some(secret) = api.get_opt(&settings.redis_secret).await? else {
        return Ok(RedisSecret::NotFound { name });
    };
    let has_key = secret.data.as_ref().is_some_and(|data| data.contains_key(REDIS_KEY))
        || secret.string_data.as_ref().is_some_and(|data| data.contains_key(REDIS_KEY));
    Ok(if has_key { RedisSecret::Present } else { RedisSecret::NoKey { name, key: REDIS_KEY.to_string() } })
}

/// Reads the facts the active relay of an OutboxRelay writes. Object-safe, so the
/// controller holds any implementation behind one type.
pub trait RelayReader: Send + Sync + Debug {
    /// The facts of the relay `<namespace>/<name>`; None when no relay has reported.
    fn facts<'a>(&'a self, relay: &'a str) -> BoxFuture<'a, Result<Option<RelayFacts>, StoreError>>;
}

/// The agents' Redis as the lease store opens it (connection, key prefix, deadline): the
/// relays report to the same Redis under the same prefix, through the store's own code.
impl RelayReader for RedisLeases {
    fn facts<'a>(&'a self, relay: &'a str) -> BoxFuture<'a, Result<Option<RelayFacts>, StoreError>> {
        Box::pin(async move {
            let read = breakwater_store::relay::read(self.connection(), self.key_prefix(), relay);
            tokio::time::timeout(self.deadline(), read)
                .await
                .map_err(|_| StoreError::Timeout { call: "relay facts", deadline: self.deadline() })?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(name: &str) -> OutboxRelay {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "breakwater.dev/v1alpha1",
            "kind": "OutboxRelay",
            "metadata": {"name": name, "namespace": "shop", "uid": "5f0c3a9e-1b2d-4c6e-8a7f-000000000001"},
            "spec": {
                "source": {"postgres": {"connectionSecretRef": {"name": "orders-db", "key": "dsn"}, "table": "outbox"}},
                "sink": {"redisStream": {"stream": "events.{aggregateType}"}},
            },
        }))
        .expect("an OutboxRelay")
    }

    fn settings() -> Settings {
        Settings {
            image: "registry.local/breakwater:sha-1".into(),
            redis_secret: "agents-redis".into(),
            key_prefix: "bw2".into(),
        }
    }

    fn rendered(relay: &OutboxRelay) -> serde_json::Value {
        serde_json::to_value(deployment(relay, &settings()).expect("a Deployment")).expect("JSON")
    }

    #[test]
    fn the_deployment_runs_the_relay_owned_by_its_resource() {
        let json = rendered(&relay("orders"));
        assert_eq!(json["apiVersion"], "apps/v1");
        assert_eq!(json["kind"], "Deployment");
        assert_eq!(json["metadata"]["name"], "orders-relay");
        assert_eq!(json["metadata"]["namespace"], "shop");
        assert_eq!(
            json["metadata"]["ownerReferences"],
            serde_json::json!([{
                "apiVersion": "breakwater.dev/v1alpha1", "kind": "OutboxRelay", "name": "orders",
                "uid": "5f0c3a9e-1b2d-4c6e-8a7f-000000000001", "controller": true,
            }])
        );
        let labels = serde_json::json!({
            "app.kubernetes.io/name": "breakwater-relay",
            "app.kubernetes.io/instance": "orders",
            "app.kubernetes.io/managed-by": "breakwater-operator",
        });
        assert_eq!(json["metadata"]["labels"], labels);
        assert_eq!(json["spec"]["template"]["metadata"]["labels"], labels);
        assert_eq!(
            json["spec"]["selector"]["matchLabels"],
            serde_json::json!({"app.kubernetes.io/name": "breakwater-relay", "app.kubernetes.io/instance": "orders"})
        );
        assert_eq!(json["spec"]["replicas"], 2);
        let pod = &json["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false);
        let container = &pod["containers"][0];
        assert_eq!(container["image"], "registry.local/breakwater:sha-1");
        assert_eq!(container["command"], serde_json::json!(["/usr/local/bin/breakwater-relay"]));
        assert_eq!(container["args"], serde_json::json!(["run"]));
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["ports"][0]["containerPort"], 9102);
        assert_eq!(container["resources"]["limits"], serde_json::json!({"cpu": "500m", "memory": "256Mi"}));
    }

    #[test]
    fn the_environment_names_the_relay_its_spec_and_where_the_urls_are() {
        let relay = relay("orders");
        let json = rendered(&relay);
        let env: BTreeMap<String, serde_json::Value> =
            json["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .expect("env")
                .iter()
                .map(|e| (e["name"].as_str().expect("name").to_string(), e.clone()))
                .collect();
        let value = |name: &str| env[name]["value"].as_str().expect("a value").to_string();
        assert_eq!(value("BREAKWATER_RELAY"), "shop/orders");
        let spec: breakwater_api::OutboxRelaySpec =
            serde_json::from_str(&value("BREAKWATER_RELAY_SPEC")).expect("the spec as JSON");
        assert_eq!(spec, relay.spec);
        assert_eq!(value("BREAKWATER_POSTGRES_URL_FILE"), "/var/run/secrets/breakwater.dev/postgres/url");
        assert_eq!(value("BREAKWATER_REDIS_KEY_PREFIX"), "bw2");
        assert_eq!(
            env["BREAKWATER_REDIS_URL"]["valueFrom"],
            serde_json::json!({"secretKeyRef": {"name": "agents-redis", "key": "url"}})
        );
        assert_eq!(
            env["POD_NAME"]["valueFrom"],
            serde_json::json!({"fieldRef": {"fieldPath": "metadata.name"}})
        );
        assert_eq!(env.len(), 6);
    }

    #[test]
    fn only_the_connection_key_is_mounted_read_only() {
        let json = rendered(&relay("orders"));
        let pod = &json["spec"]["template"]["spec"];
        assert_eq!(
            pod["volumes"],
            serde_json::json!([{"name": "postgres", "secret": {
                "secretName": "orders-db", "items": [{"key": "dsn", "path": "url"}], "defaultMode": 0o440,
            }}])
        );
        assert_eq!(
            pod["containers"][0]["volumeMounts"],
            serde_json::json!([{"name": "postgres", "mountPath": "/var/run/secrets/breakwater.dev/postgres", "readOnly": true}])
        );
    }

    #[test]
    fn the_pods_are_hardened() {
        let json = rendered(&relay("orders"));
        let pod = &json["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"],
            serde_json::json!({
                "runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            })
        );
        assert_eq!(
            pod["containers"][0]["securityContext"],
            serde_json::json!({
                "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
                "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
            })
        );
    }

    #[test]
    fn a_changed_spec_changes_the_pod_template() {
        let before = relay("orders");
        let mut after = before.clone();
        after.spec.delivery.batch_size = 50;
        let template = |r: &OutboxRelay| rendered(r)["spec"]["template"].clone();
        assert_ne!(template(&before), template(&after), "the pods roll");
        assert_eq!(template(&before), template(&before.clone()), "and only then");
    }

    #[test]
    fn only_an_object_from_the_api_server_can_be_deployed() {
        let mut unsaved = relay("orders");
        unsaved.metadata.uid = None;
        assert!(matches!(deployment(&unsaved, &settings()), Err(Error::Incomplete { what: "uid", .. })));
        unsaved.metadata.namespace = None;
        assert!(matches!(
            deployment(&unsaved, &settings()),
            Err(Error::Incomplete { what: "namespace", .. })
        ));
    }

    #[test]
    fn a_deployment_is_the_relays_only_when_the_relay_controls_it() {
        let relay = relay("orders");
        let ours = deployment(&relay, &settings()).expect("a Deployment");
        assert_eq!(foreign_controller(&ours, &relay), None);
        let mut other = ours.clone();
        other.metadata.owner_references.iter_mut().flatten().for_each(|o| o.uid = "another".into());
        assert_eq!(
            foreign_controller(&other, &relay).as_deref(),
            Some("controlled by OutboxRelay orders (uid another)"),
            "a relay of the same name, deleted and created again"
        );
        let mut plain = ours;
        plain.metadata.owner_references = None;
        assert_eq!(foreign_controller(&plain, &relay).as_deref(), Some("it has no controller"));
    }

    #[test]
    fn defaults_are_the_releases_image_and_the_injectors_secret_name() {
        let defaults = Settings::default();
        assert_eq!(
            defaults.image,
            format!("ghcr.io/breakwater-dev/breakwater:{}", env!("CARGO_PKG_VERSION"))
        );
        assert_eq!(
            defaults.image,
            crate::inject::Config::default().agent_image,
            "the agent's image holds the relay too"
        );
        assert_eq!(
            (defaults.redis_secret.as_str(), defaults.key_prefix.as_str()),
            ("breakwater-redis", "bw")
        );
    }
}
