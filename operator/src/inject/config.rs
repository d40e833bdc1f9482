//! What the injector puts into pods: images, the operator's xDS address, the token the
//! sidecars present, resources. Read once at start from the YAML file the chart renders
//! into a ConfigMap (`--inject-config`); every field has a default, so `{}` is a valid file.

use std::{collections::BTreeMap, path::Path};

use k8s_openapi::{api::core::v1::ResourceRequirements, apimachinery::pkg::api::resource::Quantity};
use serde::Deserialize;

use super::quantity;
use crate::{
    error::{Error, Result},
    xds::DEFAULT_AUDIENCE,
};

/// What is injected into a pod.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Traffic capture, Envoy and the agent: rate limits and breakers are enforced.
    #[default]
    Proxy,
    /// The agent alone (leases, outbox): no capture, no privilege.
    Agent,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Proxy => "proxy",
            Mode::Agent => "agent",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "proxy" => Some(Mode::Proxy),
            "agent" => Some(Mode::Agent),
            _ => None,
        }
    }
}

/// Requests and limits of one injected container (Kubernetes quantities).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub requests: BTreeMap<String, String>,
    #[serde(default)]
    pub limits: BTreeMap<String, String>,
}

impl Resources {
    fn new(cpu: (&str, &str), memory: (&str, &str)) -> Self {
        let pair = |(name, value): (&str, &str)| (name.to_string(), value.to_string());
        Resources {
            requests: [pair(("cpu", cpu.0)), pair(("memory", memory.0))].into(),
            limits: [pair(("cpu", cpu.1)), pair(("memory", memory.1))].into(),
        }
    }

    pub fn to_requirements(&self) -> ResourceRequirements {
        let quantities = |values: &BTreeMap<String, String>| {
            (!values.is_empty())
                .then(|| values.iter().map(|(name, value)| (name.clone(), Quantity(value.clone()))).collect())
        };
        ResourceRequirements {
            requests: quantities(&self.requests),
            limits: quantities(&self.limits),
            ..ResourceRequirements::default()
        }
    }

    fn check(&self, container: &str) -> Result<()> {
        for (name, value) in self.requests.iter().chain(&self.limits) {
            quantity::parse(value)
                .map_err(|problem| Error::InjectConfig(format!("{container}.resources.{name}: {problem}")))?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub struct Config {
    /// The image with `breakwater-agent` (the operator's own image).
    pub agent_image: String,
    /// The Envoy image; its `envoy` binary is started with the bootstrap inline.
    pub proxy_image: String,
    /// The image with `breakwater-capture` and iptables (Dockerfile target `capture`).
    pub capture_image: String,
    pub image_pull_policy: String,
    /// The operator's ADS server as the agents reach it, `http://HOST:PORT`.
    pub xds_endpoint: String,
    /// The audience of the projected token the agent presents on ADS; the operator's
    /// `--xds-token-audience` must be the same.
    pub token_audience: String,
    pub token_expiration_seconds: i64,
    /// What is injected when the pod does not say (`breakwater.dev/inject-mode`).
    pub mode: Mode,
    /// A Secret in the pod's namespace with the agents' Redis URL under key `url`,
    /// referenced as optional: without it the agent keeps counters in memory.
    pub redis_secret: Option<String>,
    /// Namespaces never injected, whatever their labels (the chart adds its own).
    pub exclude_namespaces: Vec<String>,
    pub proxy: ContainerConfig,
    pub agent: ContainerConfig,
    pub capture: ContainerConfig,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerConfig {
    pub resources: Resources,
}

/// The Envoy release the chart installs by default.
pub const DEFAULT_PROXY_IMAGE: &str = "envoyproxy/envoy:v1.35.3";

impl Default for Config {
    fn default() -> Self {
        let image =
            |suffix: &str| format!("ghcr.io/breakwater-dev/breakwater{suffix}:{}", env!("CARGO_PKG_VERSION"));
        Config {
            agent_image: image(""),
            proxy_image: DEFAULT_PROXY_IMAGE.to_string(),
            capture_image: image("-capture"),
            image_pull_policy: "IfNotPresent".to_string(),
            xds_endpoint: "http://breakwater.breakwater-system.svc:18000".to_string(),
            token_audience: DEFAULT_AUDIENCE.to_string(),
            token_expiration_seconds: 3600,
            mode: Mode::Proxy,
            redis_secret: None,
            exclude_namespaces: vec!["kube-system".to_string(), "kube-public".to_string()],
            proxy: ContainerConfig { resources: Resources::new(("100m", "1"), ("128Mi", "512Mi")) },
            agent: ContainerConfig { resources: Resources::new(("50m", "500m"), ("64Mi", "256Mi")) },
            capture: ContainerConfig { resources: Resources::new(("10m", "100m"), ("16Mi", "64Mi")) },
        }
    }
}

impl Config {
    /// Reads and checks the file; every problem names its field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| Error::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text).map_err(|err| match err {
            Error::InjectConfig(problem) => Error::InjectConfig(format!("{}: {problem}", path.display())),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self> {
        let config: Config =
            serde_saphyr::from_str(text).map_err(|err| Error::InjectConfig(err.to_string()))?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<()> {
        let problem = |text: String| Err(Error::InjectConfig(text));
        for (field, value) in [
            ("agentImage", &self.agent_image),
            ("proxyImage", &self.proxy_image),
            ("captureImage", &self.capture_image),
        ] {
            if value.trim().is_empty() {
                return problem(format!("{field} must name an image"));
            }
        }
        if !matches!(self.image_pull_policy.as_str(), "Always" | "IfNotPresent" | "Never") {
            return problem(format!(
                "imagePullPolicy {:?} is not Always, IfNotPresent or Never",
                self.image_pull_policy
            ));
        }
        if !(self.xds_endpoint.starts_with("http://") || self.xds_endpoint.starts_with("https://")) {
            return problem(format!("xdsEndpoint {:?} must be http://HOST:PORT", self.xds_endpoint));
        }
        if self.token_audience.is_empty() {
            return problem("tokenAudience must not be empty".to_string());
        }
        // The API server's own bounds for a projected token.
        if !(600..=(1 << 32)).contains(&self.token_expiration_seconds) {
            return problem(format!(
                "tokenExpirationSeconds {} must be at least 600 (the API server's minimum)",
                self.token_expiration_seconds
            ));
        }
        self.proxy.resources.check("proxy")?;
        self.agent.resources.check("agent")?;
        self.capture.resources.check("capture")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_is_the_defaults() {
        assert_eq!(Config::parse("{}").expect("valid"), Config::default());
    }

    #[test]
    fn fields_are_checked_and_named() {
        let cases = [
            ("agentImag: x", "agentImag"),
            ("imagePullPolicy: Sometimes", "imagePullPolicy"),
            ("xdsEndpoint: breakwater:18000", "xdsEndpoint"),
            ("tokenExpirationSeconds: 60", "tokenExpirationSeconds"),
            ("proxy: {resources: {requests: {cpu: lots}}}", "proxy.resources.cpu"),
            ("mode: sidecar", "mode"),
        ];
        for (text, named) in cases {
            let err = Config::parse(text).expect_err(text).to_string();
            assert!(err.contains(named), "{text}: {err}");
        }
    }

    #[test]
    fn a_partial_file_keeps_the_other_defaults() {
        let config = Config::parse("mode: agent\nredisSecret: redis\n").expect("valid");
        assert_eq!(config.mode, Mode::Agent);
        assert_eq!(config.redis_secret.as_deref(), Some("redis"));
        assert_eq!(config.proxy_image, DEFAULT_PROXY_IMAGE);
    }
}
