//! The mutation itself, a pure function of the pod, its namespace and the configuration.
//!
//! The pod is handled as JSON, not as the typed `Pod`: a round trip through k8s-openapi would
//! drop fields newer than the API version this binary was built for, and the patch would
//! then remove them. Only what the injector owns is rewritten — its init containers, its
//! volume, its annotation — and the user's entries are carried over byte for byte.
//!
//! Injection is idempotent by construction: the injector's containers and volume are removed
//! by name before they are added, so mutating an injected pod again gives the same pod (and
//! a pod copied from a running one is refreshed, not doubled).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, Probe,
    ProjectedVolumeSource, SeccompProfile, SecretKeySelector, SecurityContext, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::{Map, Value, json};

use super::{
    config::{Config, Mode, Resources},
    quantity,
};
use crate::compile::names;

/// The namespace label that turns injection on (the webhook's namespaceSelector).
pub const NAMESPACE_LABEL: &str = "breakwater.dev/inject";
/// Pod annotation: `disabled` leaves the pod alone, `enabled` is the default.
pub const INJECT_ANNOTATION: &str = "breakwater.dev/inject";
/// Pod annotation: `proxy` or `agent` ([`Mode`]).
pub const MODE_ANNOTATION: &str = "breakwater.dev/inject-mode";
/// Set by the injector: the mode the pod was injected with.
pub const INJECTED_ANNOTATION: &str = "breakwater.dev/injected";
/// Pod annotations that set the sidecars' CPU and memory requests.
pub const RESOURCE_ANNOTATIONS: [(&str, Sidecar, &str); 4] = [
    ("breakwater.dev/proxy-cpu", Sidecar::Proxy, "cpu"),
    ("breakwater.dev/proxy-memory", Sidecar::Proxy, "memory"),
    ("breakwater.dev/agent-cpu", Sidecar::Agent, "cpu"),
    ("breakwater.dev/agent-memory", Sidecar::Agent, "memory"),
];

pub const CAPTURE_CONTAINER: &str = "breakwater-capture";
pub const AGENT_CONTAINER: &str = "breakwater-agent";
pub const PROXY_CONTAINER: &str = "breakwater-proxy";
pub const TOKEN_VOLUME: &str = "breakwater-xds-token";
/// Where the agent reads its projected ServiceAccount token.
pub const TOKEN_DIR: &str = "/var/run/secrets/breakwater.dev/xds";
pub const TOKEN_FILE: &str = "token";
/// The UID Envoy and the agent run as; the capture rules never redirect its traffic.
pub const PROXY_UID: i64 = 1337;
/// The agent's /healthz, /readyz and /metrics in an injected pod (a port applications
/// rarely use; the capture leaves it alone so the kubelet's probes reach it).
pub const AGENT_HTTP_PORT: u16 = 15084;
/// The agent's lease API (loopback).
pub const AGENT_LEASE_PORT: u16 = 15082;

const OWN_CONTAINERS: [&str; 3] = [CAPTURE_CONTAINER, AGENT_CONTAINER, PROXY_CONTAINER];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Sidecar {
    Proxy,
    Agent,
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// `breakwater.dev/inject: disabled`.
    OptedOut,
    /// A namespace of the configuration's `excludeNamespaces`.
    ExcludedNamespace,
    /// Capture rules in a host-network pod would rewrite the node's traffic.
    HostNetwork,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::OptedOut => "opted-out",
            Skip::ExcludedNamespace => "excluded-namespace",
            Skip::HostNetwork => "host-network",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    Skip(Skip),
    /// The pod with its sidecars.
    Inject {
        pod: Value,
        mode: Mode,
    },
    /// The pod asks for something the injector cannot do; the message says what.
    Deny(String),
}

/// Decides what happens to `pod` (its JSON as the API server sent it) in `namespace`.
pub fn inject(pod: &Value, namespace: &str, bootstrap: &str, config: &Config) -> Decision {
    let annotations = pod.pointer("/metadata/annotations").and_then(Value::as_object);
    let annotation = |key: &str| annotations.and_then(|a| a.get(key)).and_then(Value::as_str);
    match annotation(INJECT_ANNOTATION) {
        None | Some("enabled") => {}
        Some("disabled") => return Decision::Skip(Skip::OptedOut),
        Some(other) => {
            return Decision::Deny(format!(
                "annotation {INJECT_ANNOTATION}: {other:?} must be \"enabled\" or \"disabled\""
            ));
        }
    }
    if config.exclude_namespaces.iter().any(|excluded| excluded == namespace) {
        return Decision::Skip(Skip::ExcludedNamespace);
    }
    if pod.pointer("/spec/hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Decision::Skip(Skip::HostNetwork);
    }
    let mode = match annotation(MODE_ANNOTATION) {
        None => config.mode,
        Some(text) => match Mode::parse(text) {
            Some(mode) => mode,
            None => {
                return Decision::Deny(format!(
                    "annotation {MODE_ANNOTATION}: {text:?} must be \"proxy\" or \"agent\""
                ));
            }
        },
    };
    let mut resources = BTreeMap::from([
        (Sidecar::Proxy, config.proxy.resources.clone()),
        (Sidecar::Agent, config.agent.resources.clone()),
    ]);
    for (key, sidecar, resource) in RESOURCE_ANNOTATIONS {
        let Some(text) = annotation(key) else { continue };
        if let Err(problem) = quantity::parse(text) {
            return Decision::Deny(format!("annotation {key}: {problem}"));
        }
        if let Some(sidecar) = resources.get_mut(&sidecar) {
            set_request(sidecar, resource, text);
        }
    }
    if let Some(name) = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .find(|name| OWN_CONTAINERS.contains(name))
    {
        return Decision::Deny(format!("container name {name:?} is reserved for Breakwater's sidecars"));
    }

    let mut ours = Vec::new();
    if mode == Mode::Proxy {
        ours.push(capture(config));
    }
    ours.push(agent(config, mode, &resources[&Sidecar::Agent]));
    if mode == Mode::Proxy {
        ours.push(proxy(config, bootstrap, &resources[&Sidecar::Proxy]));
    }
    let mut pod = pod.clone();
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return Decision::Deny("the pod has no spec".to_string());
    };
    let init: Vec<Value> =
        ours.iter().map(to_json).chain(without_ours(spec.get("initContainers"), &OWN_CONTAINERS)).collect();
    spec.insert("initContainers".to_string(), Value::Array(init));
    let volumes: Vec<Value> = std::iter::once(to_json(&token_volume(config)))
        .chain(without_ours(spec.get("volumes"), &[TOKEN_VOLUME]))
        .collect();
    spec.insert("volumes".to_string(), Value::Array(volumes));
    let metadata = pod.as_object_mut().map(|pod| pod.entry("metadata").or_insert_with(|| json!({})));
    if let Some(metadata) = metadata.and_then(Value::as_object_mut) {
        let annotations = metadata.entry("annotations").or_insert_with(|| Value::Object(Map::new()));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(INJECTED_ANNOTATION.to_string(), Value::String(mode.as_str().to_string()));
        }
    }
    Decision::Inject { pod, mode }
}

/// An annotation sets the request; the limit is raised to it when lower, so the pod stays
/// valid (the API server refuses a request above its limit).
fn set_request(resources: &mut Resources, resource: &str, text: &str) {
    resources.requests.insert(resource.to_string(), text.to_string());
    let limit = resources.limits.get(resource).and_then(|limit| quantity::parse(limit).ok());
    if let (Some(limit), Ok(request)) = (limit, quantity::parse(text))
        && request > limit
    {
        resources.limits.insert(resource.to_string(), text.to_string());
    }
}

fn without_ours<'a>(list: Option<&'a Value>, names: &'a [&str]) -> impl Iterator<Item = Value> + 'a {
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(move |entry| {
            !entry.get("name").and_then(Value::as_str).is_some_and(|name| names.contains(&name))
        })
        .cloned()
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

fn pod_env() -> Vec<EnvVar> {
    let field = |name: &str, path: &str| EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.to_string(), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    vec![field("POD_NAME", "metadata.name"), field("POD_NAMESPACE", "metadata.namespace")]
}

/// Non-root, read-only, no privilege, no capability: the sidecars need none.
fn sidecar_security() -> SecurityContext {
    SecurityContext {
        run_as_user: Some(PROXY_UID),
        run_as_group: Some(PROXY_UID),
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_string()]), add: None }),
        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".to_string(), ..Default::default() }),
        ..Default::default()
    }
}

/// Ports the capture leaves alone: Envoy's admin and listeners, the agent's services.
pub fn excluded_inbound_ports() -> Vec<u16> {
    let mut ports = vec![
        names::ADMIN_PORT as u16,
        names::OUTBOUND_PORT as u16,
        names::INBOUND_PORT as u16,
        names::AGENT_PORT,
        AGENT_LEASE_PORT,
        names::XDS_PROXY_PORT,
        AGENT_HTTP_PORT,
    ];
    ports.sort_unstable();
    ports
}

fn join(ports: &[u16]) -> String {
    ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

/// The init container that installs the redirect rules: root with NET_ADMIN and NET_RAW
/// only (iptables needs both), and nothing else.
fn capture(config: &Config) -> Container {
    Container {
        name: CAPTURE_CONTAINER.to_string(),
        image: Some(config.capture_image.clone()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        args: Some(vec![
            format!("--inbound-port={}", names::INBOUND_PORT),
            format!("--outbound-port={}", names::OUTBOUND_PORT),
            format!("--proxy-uid={PROXY_UID}"),
            format!("--exclude-inbound-ports={}", join(&excluded_inbound_ports())),
        ]),
        resources: Some(config.capture.resources.to_requirements()),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]),
                drop: Some(vec!["ALL".to_string()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A native sidecar: an init container that keeps running, started before the app's
/// containers and stopped after them.
fn sidecar(name: &str, image: &str, config: &Config, resources: &Resources) -> Container {
    Container {
        name: name.to_string(),
        image: Some(image.to_string()),
        image_pull_policy: Some(config.image_pull_policy.clone()),
        restart_policy: Some("Always".to_string()),
        env: Some(pod_env()),
        resources: Some(resources.to_requirements()),
        security_context: Some(sidecar_security()),
        volume_mounts: Some(vec![VolumeMount {
            name: TOKEN_VOLUME.to_string(),
            mount_path: TOKEN_DIR.to_string(),
            read_only: Some(true),
            ..Default::default()
        }]),
        ..Default::default()
    }
}

fn agent(config: &Config, mode: Mode, resources: &Resources) -> Container {
    let mut args = vec![
        format!("--xds-endpoint={}", config.xds_endpoint),
        format!("--xds-token-file={TOKEN_DIR}/{TOKEN_FILE}"),
        format!("--http-addr=0.0.0.0:{AGENT_HTTP_PORT}"),
    ];
    if mode == Mode::Proxy {
        args.push(format!("--xds-proxy-addr=127.0.0.1:{}", names::XDS_PROXY_PORT));
    }
    let mut container = sidecar(AGENT_CONTAINER, &config.agent_image, config, resources);
    container.command = Some(vec!["/usr/local/bin/breakwater-agent".to_string()]);
    container.args = Some(args);
    if let (Some(secret), Some(env)) = (&config.redis_secret, container.env.as_mut()) {
        env.push(EnvVar {
            name: "BREAKWATER_REDIS_URL".to_string(),
            value_from: Some(EnvVarSource {
                secret_key_ref: Some(SecretKeySelector {
                    name: secret.clone(),
                    key: "url".to_string(),
                    optional: Some(true),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    container.ports = Some(vec![ContainerPort {
        name: Some("bw-agent-http".to_string()),
        container_port: i32::from(AGENT_HTTP_PORT),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    }]);
    container.readiness_probe = Some(Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/readyz".to_string()),
            port: IntOrString::Int(i32::from(AGENT_HTTP_PORT)),
            ..Default::default()
        }),
        period_seconds: Some(5),
        ..Default::default()
    });
    container
}

fn proxy(config: &Config, bootstrap: &str, resources: &Resources) -> Container {
    let mut container = sidecar(PROXY_CONTAINER, &config.proxy_image, config, resources);
    container.command = Some(vec!["envoy".to_string()]);
    container.args = Some(vec![
        "--config-yaml".to_string(),
        bootstrap.to_string(),
        // Hot restart needs shared memory and a second process; Kubernetes restarts the
        // container instead.
        "--disable-hot-restart".to_string(),
        "--log-level".to_string(),
        "warn".to_string(),
    ]);
    container
}

/// A token for the Breakwater audience, bound to the pod: it dies with the pod, and the
/// kubelet rotates it before it expires.
fn token_volume(config: &Config) -> Volume {
    Volume {
        name: TOKEN_VOLUME.to_string(),
        projected: Some(ProjectedVolumeSource {
            sources: Some(vec![VolumeProjection {
                service_account_token: Some(ServiceAccountTokenProjection {
                    audience: Some(config.token_audience.clone()),
                    expiration_seconds: Some(config.token_expiration_seconds),
                    path: TOKEN_FILE.to_string(),
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The node id the injected Envoy announces: the kubelet expands the references from the
/// container's downward-API environment.
pub const NODE_ID: &str = "$(POD_NAMESPACE)/$(POD_NAME)";
pub const NODE_NAMESPACE: &str = "$(POD_NAMESPACE)";

#[cfg(test)]
mod tests {
    use super::*;

    const BOOTSTRAP: &str = r#"{"node":{"id":"$(POD_NAMESPACE)/$(POD_NAME)"}}"#;

    fn pod(annotations: Value) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": "api-", "annotations": annotations},
            "spec": {
                "initContainers": [{"name": "migrate", "image": "app:1", "futureField": {"kept": true}}],
                "containers": [{"name": "app", "image": "app:1"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
            },
        })
    }

    fn injected(pod: &Value, config: &Config) -> Value {
        match inject(pod, "shop", BOOTSTRAP, config) {
            Decision::Inject { pod, .. } => pod,
            other => panic!("not injected: {other:?}"),
        }
    }

    fn names_of(pod: &Value, list: &str) -> Vec<String> {
        pod["spec"][list]
            .as_array()
            .expect(list)
            .iter()
            .map(|c| c["name"].as_str().expect("name").to_string())
            .collect()
    }

    #[test]
    fn proxy_mode_adds_capture_agent_and_envoy_before_the_apps_init_containers() {
        let pod = injected(&pod(json!({})), &Config::default());
        assert_eq!(
            names_of(&pod, "initContainers"),
            [CAPTURE_CONTAINER, AGENT_CONTAINER, PROXY_CONTAINER, "migrate"]
        );
        assert_eq!(names_of(&pod, "volumes"), [TOKEN_VOLUME, "data"]);
        assert_eq!(pod["metadata"]["annotations"][INJECTED_ANNOTATION], "proxy");
        let init = &pod["spec"]["initContainers"];
        assert_eq!(init[0].get("restartPolicy"), None, "capture runs to completion");
        assert_eq!(init[1]["restartPolicy"], "Always");
        assert_eq!(init[2]["restartPolicy"], "Always");
        assert_eq!(init[2]["args"][1], BOOTSTRAP);
        // The user's entries are carried over untouched, unknown fields included.
        assert_eq!(init[3]["futureField"]["kept"], true);
    }

    #[test]
    fn agent_mode_adds_the_agent_alone_without_privilege() {
        let pod = injected(&pod(json!({MODE_ANNOTATION: "agent"})), &Config::default());
        assert_eq!(names_of(&pod, "initContainers"), [AGENT_CONTAINER, "migrate"]);
        let security = &pod["spec"]["initContainers"][0]["securityContext"];
        assert_eq!(security["runAsNonRoot"], true);
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(security["capabilities"].get("add"), None);
        assert!(!pod["spec"]["initContainers"][0]["args"].to_string().contains("xds-proxy-addr"));
    }

    #[test]
    fn the_capture_holds_net_admin_and_net_raw_only() {
        let pod = injected(&pod(json!({})), &Config::default());
        let security = &pod["spec"]["initContainers"][0]["securityContext"];
        assert_eq!(security["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
        assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(security["privileged"], false);
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(security["readOnlyRootFilesystem"], true);
    }

    #[test]
    fn injecting_twice_equals_injecting_once() {
        for annotations in
            [json!({}), json!({MODE_ANNOTATION: "agent"}), json!({"breakwater.dev/agent-cpu": "1"})]
        {
            let once = injected(&pod(annotations), &Config::default());
            assert_eq!(injected(&once, &Config::default()), once);
        }
    }

    #[test]
    fn opted_out_excluded_and_host_network_pods_are_skipped() {
        let config = Config::default();
        assert_eq!(
            inject(&pod(json!({INJECT_ANNOTATION: "disabled"})), "shop", BOOTSTRAP, &config),
            Decision::Skip(Skip::OptedOut)
        );
        assert_eq!(
            inject(&pod(json!({})), "kube-system", BOOTSTRAP, &config),
            Decision::Skip(Skip::ExcludedNamespace)
        );
        let mut host = pod(json!({}));
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(inject(&host, "shop", BOOTSTRAP, &config), Decision::Skip(Skip::HostNetwork));
    }

    #[test]
    fn bad_annotations_are_denied_naming_the_annotation() {
        let config = Config::default();
        for (annotations, named) in [
            (json!({INJECT_ANNOTATION: "no"}), INJECT_ANNOTATION),
            (json!({MODE_ANNOTATION: "sidecar"}), MODE_ANNOTATION),
            (json!({"breakwater.dev/proxy-memory": "lots"}), "breakwater.dev/proxy-memory"),
        ] {
            match inject(&pod(annotations.clone()), "shop", BOOTSTRAP, &config) {
                Decision::Deny(message) => assert!(message.contains(named), "{message}"),
                other => panic!("{annotations}: {other:?}"),
            }
        }
        let mut reserved = pod(json!({}));
        reserved["spec"]["containers"][0]["name"] = json!(AGENT_CONTAINER);
        assert!(
            matches!(inject(&reserved, "shop", BOOTSTRAP, &config), Decision::Deny(m) if m.contains("reserved"))
        );
    }

    #[test]
    fn a_request_annotation_raises_a_lower_limit() {
        let pod = injected(
            &pod(json!({"breakwater.dev/proxy-cpu": "2", "breakwater.dev/agent-memory": "100Mi"})),
            &Config::default(),
        );
        let proxy = &pod["spec"]["initContainers"][2]["resources"];
        assert_eq!(proxy["requests"]["cpu"], "2");
        assert_eq!(proxy["limits"]["cpu"], "2", "the default limit of 1 CPU is below the request");
        let agent = &pod["spec"]["initContainers"][1]["resources"];
        assert_eq!(agent["requests"]["memory"], "100Mi");
        assert_eq!(agent["limits"]["memory"], "256Mi", "the limit above the request stays");
    }

    #[test]
    fn the_agent_gets_the_redis_secret_as_optional() {
        let config = Config { redis_secret: Some("breakwater-redis".to_string()), ..Config::default() };
        let pod = injected(&pod(json!({})), &config);
        let env = pod["spec"]["initContainers"][1]["env"].as_array().expect("env");
        let redis = env.iter().find(|e| e["name"] == "BREAKWATER_REDIS_URL").expect("redis env");
        assert_eq!(
            redis["valueFrom"]["secretKeyRef"],
            json!({"name": "breakwater-redis", "key": "url", "optional": true})
        );
    }
}
