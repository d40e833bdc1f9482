//! `CircuitBreakerPolicy`: how callers of the targeted Services protect themselves —
//! connection limits, outlier ejection, retries, timeouts, and a breaker shared by every
//! caller pod: one CLOSED/OPEN/HALF_OPEN state machine per target Service port, kept in
//! Redis, fed by the outcomes every caller's Envoy reports to its agent and enforced by
//! each agent from its copy of the state (an OPEN breaker answers 503 before the call
//! leaves the caller's pod).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{Attachment, Duration, Mode, TargetRef, attachment_rules as rules, conditions_schema};

/// Caller-side resilience for the targeted Services. Each section is optional; a
/// root-namespace policy merges per section (Override replaces the namespace's section,
/// Default fills a section the namespace leaves unset).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "breakwater.dev",
    version = "v1alpha1",
    kind = "CircuitBreakerPolicy",
    doc = "Caller-side resilience (connection limits, outlier detection, retries, timeout, shared breaker) for Services",
    namespaced,
    status = "CircuitBreakerPolicyStatus",
    shortname = "cbp",
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
    validation = Rule::new("has(self.connectionLimits) || has(self.outlierDetection) || has(self.retry) || has(self.timeout) || has(self.breaker)").message("set at least one of connectionLimits, outlierDetection, retry, timeout or breaker"),
    validation = Rule::new("!has(self.retry) || !has(self.retry.perTryTimeout) || !has(self.timeout) || duration(self.retry.perTryTimeout) <= duration(self.timeout)").message("retry.perTryTimeout must not exceed timeout"),
)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerPolicySpec {
    /// Services in this namespace whose callers this policy protects.
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
    /// Root namespace only: Default fills the sections a namespace leaves unset; Override
    /// replaces the namespace's sections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    /// Limits on connections and requests in flight to the Service (Envoy circuit_breakers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limits: Option<ConnectionLimits>,
    /// Ejects endpoints that keep failing from load balancing (Envoy outlier_detection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Retries of failed requests, with backoff and a budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// Deadline of a whole request, retries included.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// A CLOSED/OPEN/HALF_OPEN breaker per targeted Service port, whose state is shared by
    /// every caller pod: the failures and slow calls of all callers count in one window,
    /// and while it is OPEN every caller's proxy answers 503 without calling the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<Breaker>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimits {
    /// Connections to all endpoints of the Service, per caller pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection, per caller pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight, per caller pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_requests: Option<u32>,
    /// Retries in flight, per caller pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_retries: Option<u32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[x_kube(validation = Rule::new("!has(self.baseEjectionTime) || duration(self.baseEjectionTime) >= duration('1s')").message("baseEjectionTime must be at least 1s"))]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    /// Consecutive 5xx responses that eject an endpoint.
    #[serde(default, rename = "consecutive5xx", skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_5xx: Option<u32>,
    /// Time between ejection sweeps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,
    /// How long an endpoint stays ejected the first time; it grows with each ejection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<Duration>,
    /// At most this share of endpoints may be ejected at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
    /// Ejects endpoints whose failure percentage is above a threshold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_percentage: Option<FailurePercentage>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FailurePercentage {
    /// Failure percentage at or above which an endpoint is ejected.
    #[schemars(range(min = 0, max = 100))]
    pub threshold: u32,
    /// Requests an endpoint must have served in the interval to be considered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub request_volume: Option<u32>,
    /// Endpoints the Service must have for this detection to run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub minimum_hosts: Option<u32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Retries after the first attempt.
    #[schemars(range(min = 1, max = 10))]
    pub attempts: u32,
    /// Deadline of each attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Failures that are retried (Envoy retry_on conditions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 8))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d == c))").message("retryOn conditions must be unique"))]
    pub retry_on: Option<Vec<RetryOn>>,
    /// Exponential backoff between attempts, with jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Backoff>,
    /// Caps retries to a share of the requests in flight, so retries cannot amplify an outage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum RetryOn {
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "gateway-error")]
    GatewayError,
    #[serde(rename = "reset")]
    Reset,
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    #[serde(rename = "retriable-4xx")]
    Retriable4xx,
    #[serde(rename = "refused-stream")]
    RefusedStream,
}

impl RetryOn {
    /// The Envoy `retry_on` token.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ServerError => "5xx",
            Self::GatewayError => "gateway-error",
            Self::Reset => "reset",
            Self::ConnectFailure => "connect-failure",
            Self::Retriable4xx => "retriable-4xx",
            Self::RefusedStream => "refused-stream",
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(validation = Rule::new("duration(self.base) <= duration(self.max)").message("backoff.base must not exceed backoff.max"))]
pub struct Backoff {
    /// First backoff interval.
    pub base: Duration,
    /// Longest backoff interval.
    pub max: Duration,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    /// Retries in flight may be at most this percentage of requests in flight.
    #[schemars(range(min = 1, max = 100))]
    pub percent: u32,
    /// Retries always allowed in flight, whatever the percentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub min_concurrency: Option<u32>,
}

/// A breaker with CLOSED, OPEN and HALF_OPEN states, counted across every caller pod.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Breaker {
    /// Failure percentage in the window that opens the breaker.
    #[schemars(range(min = 1, max = 100))]
    pub failure_rate_threshold: u32,
    /// Calls slower than a duration count towards opening too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call: Option<SlowCall>,
    /// The window the rates are computed over.
    pub sliding_window: SlidingWindow,
    /// Calls the window must hold before the rates are evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub minimum_calls: Option<u32>,
    /// How long the breaker stays OPEN before letting probes through.
    pub open_duration: Duration,
    /// Probes admitted in HALF_OPEN, cluster-wide; all must succeed to close again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub half_open_calls: Option<u32>,
    /// What each caller's agent does once Redis, which holds the shared state, has been
    /// unreachable for longer than 10s (until then it keeps the last state it knew): Admit
    /// every call (the default) or Reject every call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<BreakerFallback>,
}

/// What each caller's agent does once Redis, which holds the breaker's shared state, has
/// been unreachable for longer than 10s (until then it keeps the last state it knew): Admit
/// every call (the default) or Reject every call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum BreakerFallback {
    /// Admit every call, as if the breaker were CLOSED.
    #[default]
    Admit,
    /// Reject every call, as if the breaker were OPEN.
    Reject,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SlowCall {
    /// Calls taking longer than this are slow.
    pub duration: Duration,
    /// Slow-call percentage in the window that opens the breaker.
    #[schemars(range(min = 1, max = 100))]
    pub rate_threshold: u32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[x_kube(
    validation = Rule::new("self.type == 'Count' ? (has(self.size) && !has(self.duration)) : (has(self.duration) && !has(self.size))").message("a Count window sets size (calls); a Time window sets duration"),
)]
pub struct SlidingWindow {
    /// Count: the last `size` calls. Time: the calls of the last `duration`.
    #[serde(rename = "type")]
    pub kind: WindowKind,
    /// Calls in a Count window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100_000))]
    pub size: Option<u32>,
    /// Length of a Time window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum WindowKind {
    Count,
    Time,
}

/// What the operator concluded about the policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreakerPolicyStatus {
    /// How many Service ports the policy applies to.
    #[serde(default)]
    pub targets: u32,
    /// Accepted, ResolvedRefs and Programmed, each with the generation it describes.
    #[serde(default)]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The shared breaker of each Service port the policy's breaker section applies to, as
    /// read from Redis by the operator at a low rate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub breakers: Vec<BreakerStatus>,
}

/// The live state of one Service port's shared breaker.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BreakerStatus {
    /// The Service, as `<namespace>/<name>` (a root policy applies to other namespaces).
    pub service: String,
    /// The Service port number.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// Closed: calls pass. Open: calls are answered 503 without reaching the Service.
    /// HalfOpen: a few probe calls pass, cluster-wide.
    pub state: BreakerState,
    /// Percentage of the window's calls that failed; while Open or HalfOpen, of the window
    /// that opened it (absent while the window holds no call).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_rate: Option<u32>,
    /// Percentage of the window's calls slower than slowCall.duration; while Open or
    /// HalfOpen, of the window that opened it (absent while the window holds no call, or
    /// without a slowCall rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow_call_rate: Option<u32>,
    /// Calls in the window, from every caller pod; while Open or HalfOpen, those of the
    /// window that opened it.
    #[serde(default)]
    pub calls: u64,
    /// When the breaker last changed state (Redis's clock); absent if it never did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
}

/// The state of a shared breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl Attachment for CircuitBreakerPolicySpec {
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
