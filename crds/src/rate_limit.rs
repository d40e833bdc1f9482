//! `RateLimitPolicy`: request limits on the Services it targets, enforced by Envoy (scope
//! `Pod`) or by the agents over Redis (scope `Cluster`, shared by every pod).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Attachment, Duration, Mode, TargetRef, attachment_rules as rules, conditions_schema};

/// Limits the requests that reach the targeted Services. A request must pass every limit
/// that applies to it: the namespace's own and the root namespace's Override (or, where the
/// namespace sets none, Default) policies.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "breakwater.dev",
    version = "v1alpha1",
    kind = "RateLimitPolicy",
    doc = "Request limits for Services, enforced per pod by Envoy or cluster-wide by the agents over Redis",
    namespaced,
    status = "RateLimitPolicyStatus",
    shortname = "rlp",
    category = "breakwater",
    printcolumn = r#"{"name":"Targets","type":"integer","jsonPath":".status.targets"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Reason","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Accepted\")].reason"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[x_kube(
    validation = Rule::new(rules::ONE_ATTACHMENT).message(rules::ONE_ATTACHMENT_MSG),
    validation = Rule::new(rules::SERVICE_SELECTOR).message(rules::SERVICE_SELECTOR_MSG),
    validation = Rule::new(rules::MODE).message(rules::MODE_MSG),
)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicySpec {
    /// Services in this namespace whose inbound requests are limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    #[x_kube(validation = Rule::new(rules::UNIQUE_TARGETS).message(rules::UNIQUE_TARGETS_MSG))]
    pub target_refs: Option<Vec<TargetRef>>,
    /// Root namespace only: the namespaces whose Services this policy applies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Root namespace only: narrows namespaceSelector to the Services with these labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,
    /// Root namespace only: Default applies where a namespace limits nothing itself; Override
    /// is always enforced in addition to the namespace's limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// The limits. A request is rejected (429) when any limit that matches it is exhausted.
    #[schemars(length(min = 1, max = 32))]
    #[x_kube(validation = Rule::new("self.all(l, self.exists_one(m, m.name == l.name))").message("limit names must be unique within a policy"))]
    pub limits: Vec<Limit>,
    /// What the agents do when Redis cannot answer within its deadline: Open admits the
    /// request, Closed rejects it. Applies to scope Cluster limits.
    #[serde(default)]
    pub failure_mode: FailureMode,
}

/// One limit: which requests it counts, how they are grouped into counters, and the rate.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(
    validation = Rule::new("!has(self.burst) || !has(self.algorithm) || self.algorithm == 'TokenBucket'").message("burst is only meaningful with algorithm TokenBucket"),
    validation = Rule::new("!has(self.scope) || self.scope != 'Pod' || !has(self.algorithm) || self.algorithm == 'TokenBucket'").message("scope Pod (Envoy local rate limit) supports only algorithm TokenBucket"),
    validation = Rule::new("!has(self.scope) || self.scope != 'Pod' || !has(self.key) || self.key.all(k, has(k.header) || has(k.value))").message("scope Pod counts per header or fixed value only; use scope Cluster to key on remoteAddress or path"),
)]
#[serde(rename_all = "camelCase")]
pub struct Limit {
    /// Name of the limit, unique in the policy; it names the counter in metrics and headers.
    #[schemars(length(min = 1, max = 63), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// Which requests this limit counts. Without it, every request counts.
    #[serde(default, rename = "match", skip_serializing_if = "Option::is_none")]
    pub matches: Option<RequestMatch>,
    /// The parts of a request that select its counter; several parts form a compound key.
    /// Without a key, all matching requests share one counter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 8))]
    pub key: Option<Vec<KeyPart>>,
    /// How many requests each counter admits per period.
    pub rate: Rate,
    /// Extra requests a TokenBucket admits at once on top of the steady rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000_000))]
    pub burst: Option<u32>,
    /// TokenBucket (GCRA, smooth, with burst), SlidingWindow (no boundary bursts) or
    /// FixedWindow (compatible with envoyproxy/ratelimit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<Algorithm>,
    /// Cluster: one counter shared by every pod (agent and Redis). Pod: one counter per
    /// Envoy (local rate limit), no network hop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Count and report the requests this limit would reject, but admit them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

impl Limit {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm.unwrap_or_default()
    }

    pub fn scope(&self) -> Scope {
        self.scope.unwrap_or_default()
    }
}

/// Requests a limit counts; every condition given must hold.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.path) && has(self.pathPrefix))").message("set path or pathPrefix, not both"))]
#[serde(rename_all = "camelCase")]
pub struct RequestMatch {
    /// Request path starts with this prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    pub path_prefix: Option<String>,
    /// Request path equals this path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024), regex(pattern = "^/"))]
    pub path: Option<String>,
    /// Request method is one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 9))]
    pub methods: Option<Vec<HttpMethod>>,
    /// Request carries each of these headers with exactly this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub headers: Option<Vec<HeaderMatch>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[allow(clippy::upper_case_acronyms)]
pub enum HttpMethod {
    GET,
    HEAD,
    POST,
    PUT,
    PATCH,
    DELETE,
    OPTIONS,
    CONNECT,
    TRACE,
}

/// A request header and the exact value it must have.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct HeaderMatch {
    /// Header name (case-insensitive).
    #[schemars(length(min = 1, max = 256), regex(pattern = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub name: String,
    /// Exact header value.
    #[schemars(length(max = 4096))]
    pub value: String,
}

/// One part of a counter key; set exactly one field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[x_kube(validation = Rule::new("(has(self.header) ? 1 : 0) + (has(self.remoteAddress) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.value) ? 1 : 0) == 1").message("a key part sets exactly one of header, remoteAddress, path or value"))]
#[serde(rename_all = "camelCase")]
pub struct KeyPart {
    /// One counter per value of this request header (requests without it share one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256), regex(pattern = "^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"))]
    pub header: Option<String>,
    /// One counter per client address (the downstream remote address Envoy sees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_address: Option<bool>,
    /// One counter per request path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<bool>,
    /// A fixed value, to share one counter among limits or label it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub value: Option<String>,
}

/// A number of requests per period, for instance 100 per 1m.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
#[x_kube(validation = Rule::new("duration(self.per) >= duration('1s') && duration(self.per) <= duration('24h')").message("per must be between 1s and 24h"))]
pub struct Rate {
    /// Requests admitted per period.
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub requests: u32,
    /// The period: any length from 1s to 24h, such as 1s, 30s, 1m, 5m, 1h.
    pub per: Duration,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Algorithm {
    #[default]
    TokenBucket,
    SlidingWindow,
    FixedWindow,
}

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
pub enum Scope {
    #[default]
    Cluster,
    Pod,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FailureMode {
    /// Admit requests while Redis is unreachable.
    #[default]
    Open,
    /// Reject requests while Redis is unreachable.
    Closed,
}

/// What the operator concluded about the policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitPolicyStatus {
    /// How many Service ports the policy is enforced on.
    #[serde(default)]
    pub targets: u32,
    /// Accepted, ResolvedRefs and Programmed, each with the generation it describes.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// What each shadow limit (scope Cluster) would have rejected, read from Redis by the
    /// operator at a low rate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shadow: Vec<ShadowStatus>,
}

/// The requests one shadow limit would have rejected in the last complete minute, counted
/// by every agent together.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ShadowStatus {
    /// The limit's name.
    pub limit: String,
    /// Requests the limit would have rejected in that minute, cluster-wide.
    pub would_reject: u64,
    /// The start of that minute (Redis's clock).
    pub window_start: Time,
}

impl Attachment for RateLimitPolicySpec {
    fn target_refs(&self) -> &[TargetRef] {
        self.target_refs.as_deref().unwrap_or_default()
    }
    fn namespace_selector(&self) -> Option<&LabelSelector> {
        self.namespace_selector.as_ref()
    }
    fn service_selector(&self) -> Option<&LabelSelector> {
        self.service_selector.as_ref()
    }
    fn mode(&self) -> Option<Mode> {
        self.mode
    }
}
