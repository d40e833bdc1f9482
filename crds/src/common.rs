//! Types every Breakwater resource shares: how a policy attaches to Services, durations,
//! and the status conditions.

use std::{fmt, time::Duration as StdDuration};

pub use crate::duration::InvalidDuration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The API group of every Breakwater resource.
pub const GROUP: &str = "breakwater.dev";
/// The API version of every Breakwater resource.
pub const VERSION: &str = "v1alpha1";

/// The pattern every duration field must match: Breakwater's one duration grammar
/// ([`crate::duration`]).
pub const DURATION_PATTERN: &str = crate::duration::PATTERN;

/// A length of time in a resource, in Breakwater's duration grammar ([`crate::duration`]):
/// `30s`, `500ms`, `1m30s`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Duration(String);

impl Duration {
    /// Wraps a duration string; it is checked by [`Duration::to_std`], not here, so that a
    /// resource that failed schema validation can still be read and reported on.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses the string into a [`std::time::Duration`].
    pub fn to_std(&self) -> Result<StdDuration, InvalidDuration> {
        crate::duration::parse(&self.0)
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

/// The only kind a policy can target today.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum TargetKind {
    #[default]
    Service,
}

/// A Service in the policy's own namespace (Gateway API direct policy attachment).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRef {
    /// API group of the target. Only the core group ("") is supported.
    #[serde(default)]
    #[schemars(length(max = 0))]
    pub group: String,
    /// Kind of the target. Only Service is supported.
    #[serde(default)]
    pub kind: TargetKind,
    /// Name of the Service, in the policy's namespace.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Name of one port of the Service. Without it the policy applies to every port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub section_name: Option<String>,
}

/// How a root-namespace policy combines with the policies of the namespaces it selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Mode {
    /// Applies only where the namespace declares no policy of this kind for the Service.
    #[default]
    Default,
    /// Always applies, and cannot be loosened: rate limits are enforced on top of the
    /// namespace's own; circuit-breaker sections replace the namespace's.
    Override,
}

/// CEL rules shared by the policy kinds that attach to Services. They sit on each spec
/// (not on a flattened struct) because the API server only sees the spec's own schema.
pub mod attachment_rules {
    pub const ONE_ATTACHMENT: &str = "has(self.targetRefs) != has(self.namespaceSelector)";
    pub const ONE_ATTACHMENT_MSG: &str = "set exactly one of targetRefs (Services in this namespace) or namespaceSelector (root namespace only)";
    pub const SERVICE_SELECTOR: &str = "!has(self.serviceSelector) || has(self.namespaceSelector)";
    pub const SERVICE_SELECTOR_MSG: &str = "serviceSelector narrows a namespaceSelector and needs one";
    pub const MODE: &str = "!has(self.mode) || has(self.namespaceSelector)";
    pub const MODE_MSG: &str =
        "mode (Default or Override) is only for namespaceSelector policies in the root namespace";
    pub const UNIQUE_TARGETS: &str = "self.all(r, self.exists_one(o, o.name == r.name && (has(o.sectionName) ? o.sectionName : '') == (has(r.sectionName) ? r.sectionName : '')))";
    pub const UNIQUE_TARGETS_MSG: &str = "each Service (and sectionName) may be targeted only once";
}

/// Where a policy applies, common to `CircuitBreakerPolicy` and `RateLimitPolicy`.
pub trait Attachment {
    fn target_refs(&self) -> &[TargetRef];
    fn namespace_selector(&self) -> Option<&LabelSelector>;
    fn service_selector(&self) -> Option<&LabelSelector>;
    fn mode(&self) -> Option<Mode>;
}

/// Builds the schema of a `conditions` list: `metav1.Condition`s keyed by `type`, so that
/// server-side apply merges them per type.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let mut schema = generator.subschema_for::<Vec<Condition>>();
    schema.insert("x-kubernetes-list-type".into(), "map".into());
    schema.insert("x-kubernetes-list-map-keys".into(), serde_json::json!(["type"]));
    schema
}

/// Condition types shared by every kind.
pub mod condition_type {
    /// The spec is valid and does not conflict with another policy.
    pub const ACCEPTED: &str = "Accepted";
    /// Every reference (target Service and port, Secret) exists.
    pub const RESOLVED_REFS: &str = "ResolvedRefs";
    /// The data plane acknowledged the configuration that carries this resource.
    pub const PROGRAMMED: &str = "Programmed";
}
